//! The plugin configuration: SAP destinations plus the gateway's own fields.
//!
//! Parsed and validated completely when the plugin loads; a bad configuration is
//! refused with a [`ConfigError`] naming the key, never discovered at request time.

pub mod destination;
pub mod profile;
pub mod values;

pub use destination::{AssertionEncoding, Destination, Kind};
pub use values::ConfigError;

use crate::destination_api::ApiSettings;
use crate::keys::{KeyError, KeyPair, SigningKey};
use crate::selection::{self, Selection};
use profile::TargetProfile;
use serde_json::Value;
use std::collections::BTreeMap;
use values::Section;

/// Where Envoy's `jwt_authn` filter leaves the verified payload by default.
pub const DEFAULT_JWT_FILTER: &str = "envoy.filters.http.jwt_authn";
/// Default size of the shared token table.
pub const DEFAULT_CACHE_SLOTS: u64 = 100_000;
/// `payload_in_metadata` key used by Istio's RequestAuthentication.
pub const DEFAULT_PAYLOAD_KEY: &str = "payload";

/// Default cap on a worker's exchanges in flight.
pub const DEFAULT_MAX_EXCHANGES_PER_WORKER: u64 = 256;
/// Default number of tokens a worker keeps its own copy of.
pub const DEFAULT_WORKER_CACHE_ENTRIES: u64 = 1024;

const TOP_LEVEL: [&str; 19] = [
    "allowInsecureTokenService",
    "destinationRules",
    "unmatchedRequests",
    "tokenCacheSlots",
    "maxExchangesPerWorker",
    "maxSigningSharePercent",
    "workerCacheEntries",
    "trustMetadataPath",
    "destinations",
    "defaultDestination",
    "tokenServiceCluster",
    "keys",
    "jwtAuthnFilterName",
    "jwtPayloadMetadataKey",
    "assertionLifetimeSeconds",
    "clockSkewSeconds",
    "tokenCacheMarginSeconds",
    "failedExchangeHoldSeconds",
    "destinationApi",
];

/// The validated plugin configuration.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    pub destinations: Vec<Destination>,
    /// How a request finds its destination: route metadata, `destinationRules`,
    /// `defaultDestination`, `unmatchedRequests`.
    pub selection: Selection,
    /// Signing keys by name; every destination's `key_name` is present here.
    pub keys: BTreeMap<String, KeyPair>,
    /// `["metadata","filter_metadata",<filter>,<key>]` holds the verified JWT payload.
    pub jwt_filter_name: String,
    pub jwt_payload_key: String,
    pub assertion_lifetime_ms: u64,
    pub clock_skew_ms: u64,
    /// Fixed reuse margin before token expiry; `None` = max(30 s, 10 % of lifetime).
    pub token_margin_ms: Option<u64>,
    /// How long a rejected exchange is remembered per user before it is retried.
    pub failure_hold_ms: u64,
    /// Size of the shared token table: at most this many users' tokens are cached.
    pub cache_slots: u64,
    /// Exchanges a worker runs or waits for at once; a new user beyond it is refused at
    /// once (503) rather than growing memory and the signing backlog.
    pub max_exchanges_per_worker: usize,
    /// The share of a worker's time signing may take (percent).
    pub signing_share_percent: u64,
    /// Tokens each worker keeps its own copy of (0: none; every hit reads shared data).
    pub worker_cache_entries: usize,
    /// Path under which the gateway answers with its SAML IdP metadata and
    /// certificates (`<path>`, `<path>/<key>`, `<path>/<key>/active.pem`, ...).
    pub trust_metadata_path: Option<String>,
    /// `destinationApi`: the find-destination API for applications, if answered.
    pub destination_api: Option<ApiSettings>,
    /// Things worth telling the operator at load that are not errors (for example a
    /// pasted property the gateway ignores).
    pub notices: Vec<String>,
}

impl PluginConfig {
    /// Parses the plugin configuration. `env` resolves `*Env` key references (the Wasm
    /// VM's environment in Envoy, a map in tests).
    pub fn parse(json: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let root: Value = serde_json::from_slice(json)
            .map_err(|e| ConfigError::new("(configuration)", format!("is not valid JSON: {e}")))?;
        let top = Section::new("", &root)
            .map_err(|_| ConfigError::new("(configuration)", "must be a JSON object"))?;
        for key in top.fields.keys() {
            if !TOP_LEVEL.contains(&key.as_str()) {
                return Err(ConfigError::new(
                    key.clone(),
                    "is not a supported plugin setting",
                ));
            }
        }

        let keys = parse_keys(&top, env)?;
        let allow_insecure = top.boolean("allowInsecureTokenService", false)?;
        let default_cluster = top.string("tokenServiceCluster")?;
        let list = match top.fields.get("destinations") {
            Some(Value::Array(list)) if !list.is_empty() => list,
            _ => {
                return Err(ConfigError::new(
                    "destinations",
                    "is required: a non-empty list of destinations",
                ))
            }
        };
        let destination_api = top
            .fields
            .get("destinationApi")
            .map(ApiSettings::parse)
            .transpose()?;
        let mut notices = Vec::new();
        let mut destinations: Vec<Destination> = Vec::with_capacity(list.len());
        for (i, value) in list.iter().enumerate() {
            let path = format!("destinations[{i}]");
            let profile = match value.get("targetProfile") {
                None => None,
                Some(Value::String(name)) => Some(TargetProfile::parse(name).ok_or_else(|| {
                    ConfigError::new(
                        format!("{path}.targetProfile"),
                        format!(
                            "is {name:?}; the profiles are {}",
                            profile::NAMES.join(", ")
                        ),
                    )
                })?),
                Some(_) => {
                    return Err(ConfigError::new(
                        format!("{path}.targetProfile"),
                        "must be a string",
                    ))
                }
            };
            // The profile's defaults, for what the destination leaves unset.
            let mut raw = value.as_object().cloned().unwrap_or_default();
            if let Some(profile) = profile {
                profile.fill_defaults(&mut raw);
            } else if raw.contains_key("apiKey") {
                notices.push(format!(
                    "{path}.apiKey is ignored: it is the api_key attribute of targetProfile successfactors"
                ));
            }
            let value = &Value::Object(raw);
            let mut d = destination::parse(&path, value, default_cluster.as_deref(), &keys, env)?;
            if value.get("KeyStorePassword").is_some() {
                notices.push(format!(
                    "{path}.KeyStorePassword is ignored: the gateway's keys come from `keys`"
                ));
            }
            if d.exposure.is_some() && destination_api.is_none() {
                return Err(ConfigError::new(
                    format!("{path}.exposeToClients"),
                    "needs the top-level destinationApi setting (the API that serves it)",
                ));
            }
            if destinations.iter().any(|other| other.name == d.name) {
                return Err(ConfigError::new(
                    format!("{path}.Name"),
                    format!("{:?} is used by another destination", d.name),
                ));
            }
            let Some(saml) = d.saml() else {
                destinations.push(d);
                continue;
            };
            let cleartext = !saml.token_service.url.full.starts_with("https://");
            let service = saml.assertion_service.as_ref();
            let service_cleartext = service.is_some_and(|s| !s.url.full.starts_with("https://"));
            match service {
                // Signs client assertions only with a key that is named, never a default.
                Some(s) => {
                    if matches!(s.credential, destination::ClientCredential::AssertionKey(_))
                        && !keys.contains_key(&d.key_name)
                    {
                        return Err(ConfigError::new(
                            format!("{path}.assertionServiceClientAssertionKey"),
                            format!("names no key in `keys`: {:?}", d.key_name),
                        ));
                    }
                }
                None => d.key_name = resolve_key_name(&path, &d.key_name, &keys)?,
            }
            if !allow_insecure && service_cleartext {
                return Err(ConfigError::new(
                    format!("{path}.assertionServiceURL"),
                    "must be https:// (the user's token, client credentials and assertions cross it); \
                     set allowInsecureTokenService to true only for a development token service",
                ));
            }
            if !allow_insecure && cleartext {
                return Err(ConfigError::new(
                    format!("{path}.tokenServiceURL"),
                    "must be https:// (client credentials, assertions and tokens cross it); \
                     set allowInsecureTokenService to true only for a development token service",
                ));
            }
            if let (Some(profile), Some(raw)) = (profile, value.as_object()) {
                profile.check(&path, &d, raw, &keys, &mut notices)?;
                if let Kind::SamlBearer(saml) = &mut d.kind {
                    saml.fixed_attributes = profile.fixed_attributes(saml);
                    saml.target_profile = Some(profile);
                }
            }
            destinations.push(d);
        }
        let default_destination = match top.string("defaultDestination")? {
            None => None,
            Some(name) => Some(
                destinations
                    .iter()
                    .position(|d| d.name == name)
                    .ok_or_else(|| {
                        ConfigError::new(
                            "defaultDestination",
                            format!("names no destination: {name:?}"),
                        )
                    })?,
            ),
        };

        let index = |name: &str| destinations.iter().position(|d| d.name == name);
        let selection = selection::parse(&top, default_destination, &index)?;
        Ok(PluginConfig {
            destinations,
            selection,
            keys,
            jwt_filter_name: top
                .string("jwtAuthnFilterName")?
                .unwrap_or_else(|| DEFAULT_JWT_FILTER.into()),
            jwt_payload_key: top
                .string("jwtPayloadMetadataKey")?
                .unwrap_or_else(|| DEFAULT_PAYLOAD_KEY.into()),
            assertion_lifetime_ms: top.integer("assertionLifetimeSeconds", 10..=3000, 300)? * 1000,
            clock_skew_ms: top.integer("clockSkewSeconds", 0..=600, 60)? * 1000,
            token_margin_ms: match top.fields.get("tokenCacheMarginSeconds") {
                None => None,
                Some(_) => Some(top.integer("tokenCacheMarginSeconds", 0..=86_400, 0)? * 1000),
            },
            failure_hold_ms: top.integer("failedExchangeHoldSeconds", 0..=3600, 5)? * 1000,
            cache_slots: top.integer("tokenCacheSlots", 1..=10_000_000, DEFAULT_CACHE_SLOTS)?,
            max_exchanges_per_worker: top.integer(
                "maxExchangesPerWorker",
                1..=100_000,
                DEFAULT_MAX_EXCHANGES_PER_WORKER,
            )? as usize,
            signing_share_percent: top.integer(
                "maxSigningSharePercent",
                5..=100,
                crate::flow::scheduler::DEFAULT_SHARE_PERCENT,
            )?,
            worker_cache_entries: top.integer(
                "workerCacheEntries",
                0..=1_000_000,
                DEFAULT_WORKER_CACHE_ENTRIES,
            )? as usize,
            trust_metadata_path: match top.string("trustMetadataPath")? {
                Some(path)
                    if path.starts_with('/')
                        && !path.ends_with('/')
                        && !path.contains(['?', '#']) =>
                {
                    Some(path)
                }
                Some(_) => {
                    return Err(ConfigError::new(
                        "trustMetadataPath",
                        "must be a path starting with / (no trailing /, query or fragment)",
                    ))
                }
                None => None,
            },
            destination_api,
            notices,
        })
    }

    /// The destination with `name`, if configured.
    pub fn destination(&self, name: &str) -> Option<&Destination> {
        self.destinations.iter().find(|d| d.name == name)
    }

    /// The name of `destinations[index]`, for log lines (`?` if there is none).
    pub fn destination_name(&self, index: usize) -> &str {
        self.destinations
            .get(index)
            .map_or("?", |d| d.name.as_str())
    }

    /// The index of the destination with `name`, if configured.
    pub fn destination_index(&self, name: &str) -> Option<usize> {
        self.destinations.iter().position(|d| d.name == name)
    }
}

/// `keys`: `{ "<name>": <key> }` where `<key>` is `{ "privateKey"|"privateKeyEnv": ...,
/// "certificate"|"certificateEnv": ... }` (active only) or
/// `{ "active": <that>, "passive": <that> }` (the passive one published, not used).
fn parse_keys(
    top: &Section<'_>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, KeyPair>, ConfigError> {
    let value = top
        .fields
        .get("keys")
        .ok_or_else(|| ConfigError::new("keys", "is required: at least one signing key"))?;
    let section = Section::new("keys", value)?;
    if section.fields.is_empty() {
        return Err(ConfigError::new(
            "keys",
            "is required: at least one signing key",
        ));
    }
    let mut keys = BTreeMap::new();
    for (name, entry) in section.fields {
        let entry = Section::new(section.key(name), entry)?;
        let pair = if entry.fields.contains_key("active") || entry.fields.contains_key("passive") {
            for field in entry.fields.keys() {
                if field != "active" && field != "passive" {
                    return Err(ConfigError::new(
                        entry.key(field),
                        "is not supported next to active/passive",
                    ));
                }
            }
            let active = entry.fields.get("active").ok_or_else(|| {
                ConfigError::new(entry.key("active"), "is required next to passive")
            })?;
            KeyPair {
                active: parse_key(&Section::new(entry.key("active"), active)?, env)?,
                passive: match entry.fields.get("passive") {
                    Some(passive) => Some(parse_key(
                        &Section::new(entry.key("passive"), passive)?,
                        env,
                    )?),
                    None => None,
                },
            }
        } else {
            KeyPair {
                active: parse_key(&entry, env)?,
                passive: None,
            }
        };
        keys.insert(name.clone(), pair);
    }
    Ok(keys)
}

/// One private key with its certificate.
fn parse_key(
    entry: &Section<'_>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<SigningKey, ConfigError> {
    for field in entry.fields.keys() {
        if ![
            "privateKey",
            "privateKeyEnv",
            "certificate",
            "certificateEnv",
        ]
        .contains(&field.as_str())
        {
            return Err(ConfigError::new(
                entry.key(field),
                "is not a supported key setting",
            ));
        }
    }
    let private_key = inline_or_env(entry, "privateKey", env)?;
    let certificate = inline_or_env(entry, "certificate", env)?;
    SigningKey::from_pem(&private_key, &certificate).map_err(|e| {
        let field = match e {
            KeyError::CertificateUnreadable | KeyError::CertificateDoesNotMatchKey => "certificate",
            KeyError::PrivateKeyUnreadable
            | KeyError::KeyTooShort(_)
            | KeyError::MultiPrime(_)
            | KeyError::RsaKeyTooLong(_)
            | KeyError::RsaPrimeTooLong { .. }
            | KeyError::RsaKeyUnusable => "privateKey",
        };
        ConfigError::new(entry.key(field), e.to_string())
    })
}

/// A PEM given inline under `field`, or in the environment variable named by `<field>Env`.
fn inline_or_env(
    entry: &Section<'_>,
    field: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    entry
        .inline_or_env(field, env)?
        .ok_or_else(|| ConfigError::new(entry.key(field), format!("is required (or {field}Env)")))
}

/// `KeyStoreLocation` if set, else the key named `default`, else the only key.
fn resolve_key_name(
    path: &str,
    requested: &str,
    keys: &BTreeMap<String, KeyPair>,
) -> Result<String, ConfigError> {
    if !requested.is_empty() {
        return if keys.contains_key(requested) {
            Ok(requested.to_string())
        } else {
            Err(ConfigError::new(
                format!("{path}.KeyStoreLocation"),
                format!("names no key in `keys`: {requested:?}"),
            ))
        };
    }
    if keys.contains_key("default") {
        return Ok("default".into());
    }
    match keys.keys().next() {
        Some(only) if keys.len() == 1 => Ok(only.clone()),
        _ => Err(ConfigError::new(
            format!("{path}.KeyStoreLocation"),
            "is required: there are several keys and none is named \"default\"",
        )),
    }
}

#[cfg(test)]
mod tests;
