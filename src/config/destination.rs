//! One SAP `OAuth2SAMLBearerAssertion` destination, read with SAP's property names.
//!
//! An operator can paste a destination exported from the BTP cockpit and add only the
//! gateway fields. Every property is validated here, at load time, so a request never
//! meets a configuration problem.

use super::values::{ConfigError, Section};
use crate::forwarding::{Removal, GATEWAY_HEADERS};
use crate::http_url::HttpUrl;
use crate::identity::UserIdRule;
use crate::saml::canonical::is_xml_text;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// `nameIdFormat` values with a built-in user id claim (SAP rules).
pub const NAMEID_UNSPECIFIED: &str = "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified";
pub const NAMEID_EMAIL: &str = "urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress";
const DEFAULT_AUTHN_CONTEXT: &str = "urn:oasis:names:tc:SAML:2.0:ac:classes:PreviousSession";
const DEFAULT_READ_TIMEOUT_S: u64 = 10;

/// How the assertion is encoded in the `assertion` form field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssertionEncoding {
    /// RFC 7522: base64url without padding (SAP's default).
    Base64Url,
    /// Standard base64 with padding (SuccessFactors).
    Base64,
}

/// Where and how to ask for tokens.
#[derive(Debug, Clone)]
pub struct TokenService {
    pub url: HttpUrl,
    /// Envoy cluster that reaches `url`.
    pub cluster: String,
    /// HTTP Basic client credentials (`tokenServiceUser` / `tokenServicePassword`, or
    /// `tokenServicePasswordEnv` naming an environment variable of the Wasm VM).
    pub basic_auth: Option<(String, String)>,
    /// `tokenServiceURL.headers.<k>`.
    pub headers: Vec<(String, String)>,
    /// `tokenServiceURL.queries.<k>`.
    pub queries: Vec<(String, String)>,
    /// `tokenService.body.<k>`.
    pub body: Vec<(String, String)>,
    /// `tokenServiceURL.SocketReadTimeoutInSeconds`, in milliseconds.
    pub timeout_ms: u64,
}

/// A validated destination.
#[derive(Debug, Clone)]
pub struct Destination {
    pub name: String,
    pub token_service: TokenService,
    pub client_key: Option<String>,
    pub audience: String,
    pub assertion_issuer: String,
    pub assertion_recipient: String,
    pub name_id_format: String,
    pub name_qualifier: Option<String>,
    pub authn_context_class_ref: String,
    pub user_id: UserIdRule,
    pub scope: Option<String>,
    pub company_id: Option<String>,
    pub encoding: AssertionEncoding,
    pub include_certificate: bool,
    pub skip_user_attributes_prefix: bool,
    pub skip_user_uuid: bool,
    /// `URL.headers.<k>`: added to the forwarded request.
    pub url_headers: Vec<(String, String)>,
    /// `URL.queries.<k>`: appended to the forwarded request's path.
    pub url_queries: Vec<(String, String)>,
    /// `KeyStoreLocation`: the name of the signing key in the plugin's key set.
    pub key_name: String,
    /// Inbound credentials removed from every propagated request: the defaults and
    /// `removeRequestHeaders`, `removeCookies`, `removeQueryParameters`.
    pub removal: Removal,
    /// `evictTokenOnUpstreamStatus`: a backend answer with one of these statuses drops
    /// the cached token it was given (default 401), so the next request exchanges anew.
    pub evict_on_status: Vec<u16>,
    /// Hash of everything that shapes the token, so a changed destination never serves
    /// tokens cached under its old settings.
    pub cache_namespace: String,
}

/// SAP properties that describe a destination but do not change what the gateway does.
const INFORMATIONAL: [&str; 3] = ["Description", "ProxyType", "tokenServiceURLType"];

/// Every plain key a destination may have (families are matched by prefix).
const KNOWN: [&str; 33] = [
    "Name",
    "Type",
    "URL",
    "Authentication",
    "tokenServiceURL",
    "tokenServiceUser",
    "tokenServicePassword",
    "tokenServicePasswordEnv",
    "clientKey",
    "audience",
    "assertionIssuer",
    "assertionRecipient",
    "nameIdFormat",
    "nameQualifier",
    "authnContextClassRef",
    "userIdSource",
    "scope",
    "companyId",
    "SystemUser",
    "samlAssertionEncoding",
    "includeSigningCertificateInSAMLAssertion",
    "skipUserAttributesPrefixInSAMLAttributes",
    "skipUserUuidInSAMLAttributes",
    "KeyStoreLocation",
    "tokenServiceURL.SocketReadTimeoutInSeconds",
    "tokenServiceCluster",
    "removeRequestHeaders",
    "removeCookies",
    "removeQueryParameters",
    "evictTokenOnUpstreamStatus",
    "Description",
    "ProxyType",
    "tokenServiceURLType",
];

/// Families of `<prefix><name>` keys.
const FAMILIES: [&str; 5] = [
    "tokenService.body.",
    "tokenServiceURL.headers.",
    "tokenServiceURL.queries.",
    "URL.headers.",
    "URL.queries.",
];

/// Form fields the plugin writes itself; `tokenService.body.*` may not replace them.
const RESERVED_BODY: [&str; 5] = [
    "grant_type",
    "assertion",
    "client_id",
    "scope",
    "company_id",
];

/// Reads one destination. `default_cluster` is the plugin-wide `tokenServiceCluster`.
pub fn parse(
    path: &str,
    value: &Value,
    default_cluster: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Destination, ConfigError> {
    let d = Section::new(path, value)?;
    reject_unknown_keys(&d)?;

    let name = d.required_string("Name")?;
    if let Some(kind) = d.string("Type")? {
        if kind != "HTTP" {
            return Err(ConfigError::new(d.key("Type"), "must be HTTP"));
        }
    }
    if let Some(proxy) = d.string("ProxyType")? {
        if proxy != "Internet" {
            return Err(ConfigError::new(
                d.key("ProxyType"),
                "must be Internet (on-premise targets are reached through Envoy clusters)",
            ));
        }
    }
    if let Some(url) = d.string("URL")? {
        HttpUrl::parse(&url).map_err(|p| ConfigError::new(d.key("URL"), p))?;
    }
    let authentication = d.required_string("Authentication")?;
    if authentication != "OAuth2SAMLBearerAssertion" {
        return Err(ConfigError::new(
            d.key("Authentication"),
            format!("is {authentication:?}; only OAuth2SAMLBearerAssertion is supported"),
        ));
    }

    let token_url_text = d.required_string("tokenServiceURL")?;
    let token_url = HttpUrl::parse(&token_url_text)
        .map_err(|p| ConfigError::new(d.key("tokenServiceURL"), p))?;
    let cluster = match d.string("tokenServiceCluster")? {
        Some(c) => c,
        None => default_cluster.map(str::to_string).ok_or_else(|| {
            ConfigError::new(
                d.key("tokenServiceCluster"),
                "is required (here or at the top level): the Envoy cluster that reaches tokenServiceURL",
            )
        })?,
    };
    let basic_auth = match (
        d.string("tokenServiceUser")?,
        d.inline_or_env("tokenServicePassword", env)?,
    ) {
        (Some(user), Some(password)) => Some((user, password)),
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::new(
                d.key("tokenServicePassword"),
                "is required when tokenServiceUser is set",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                d.key("tokenServiceUser"),
                "is required when tokenServicePassword is set",
            ))
        }
    };
    let timeout_s = d.integer(
        "tokenServiceURL.SocketReadTimeoutInSeconds",
        1..=600,
        DEFAULT_READ_TIMEOUT_S,
    )?;

    let name_id_format = d
        .string("nameIdFormat")?
        .unwrap_or_else(|| NAMEID_UNSPECIFIED.to_string());
    let user_id = user_id_rule(&d, &name_id_format)?;

    let encoding = match d.string("samlAssertionEncoding")?.as_deref() {
        None | Some("base64url") => AssertionEncoding::Base64Url,
        Some("base64") => AssertionEncoding::Base64,
        Some(_) => {
            return Err(ConfigError::new(
                d.key("samlAssertionEncoding"),
                "must be base64url or base64",
            ))
        }
    };

    let token_service = TokenService {
        cluster,
        basic_auth,
        headers: family(&d, "tokenServiceURL.headers.", check_header_name)?,
        queries: family(&d, "tokenServiceURL.queries.", |_| Ok(()))?,
        body: family(&d, "tokenService.body.", check_body_field)?,
        timeout_ms: timeout_s * 1000,
        url: token_url,
    };
    let mut destination = Destination {
        client_key: d.string("clientKey")?,
        audience: d.required_string("audience")?,
        assertion_issuer: d.required_string("assertionIssuer")?,
        assertion_recipient: d
            .string("assertionRecipient")?
            .unwrap_or_else(|| token_url_text.clone()),
        name_id_format,
        name_qualifier: d.string("nameQualifier")?,
        authn_context_class_ref: d
            .string("authnContextClassRef")?
            .unwrap_or_else(|| DEFAULT_AUTHN_CONTEXT.to_string()),
        user_id,
        scope: d.string("scope")?,
        company_id: d.string("companyId")?,
        encoding,
        include_certificate: d.boolean("includeSigningCertificateInSAMLAssertion", false)?,
        skip_user_attributes_prefix: d
            .boolean("skipUserAttributesPrefixInSAMLAttributes", false)?,
        skip_user_uuid: d.boolean("skipUserUuidInSAMLAttributes", false)?,
        url_headers: family(&d, "URL.headers.", check_header_name)?,
        url_queries: family(&d, "URL.queries.", |_| Ok(()))?,
        key_name: d.string("KeyStoreLocation")?.unwrap_or_default(),
        removal: removal(&d)?,
        evict_on_status: evict_on_status(&d)?,
        cache_namespace: String::new(),
        token_service,
        name,
    };
    destination.cache_namespace = namespace_of(value);
    check_assertion_values(&d, &destination)?;
    Ok(destination)
}

/// Values written into every assertion must be XML text, or no assertion could be built.
fn check_assertion_values(d: &Section<'_>, dest: &Destination) -> Result<(), ConfigError> {
    let values = [
        ("audience", Some(&dest.audience)),
        ("assertionIssuer", Some(&dest.assertion_issuer)),
        ("assertionRecipient", Some(&dest.assertion_recipient)),
        ("nameIdFormat", Some(&dest.name_id_format)),
        ("nameQualifier", dest.name_qualifier.as_ref()),
        ("authnContextClassRef", Some(&dest.authn_context_class_ref)),
        (
            "SystemUser",
            match &dest.user_id {
                UserIdRule::SystemUser(user) => Some(user),
                UserIdRule::Claim { .. } => None,
            },
        ),
    ];
    for (key, value) in values {
        if value.is_some_and(|v| !is_xml_text(v)) {
            return Err(ConfigError::new(
                d.key(key),
                "contains characters that XML 1.0 cannot carry",
            ));
        }
    }
    Ok(())
}

/// Refuses keys that are neither SAP properties we support, informational SAP
/// properties, nor members of a supported family; explains the near misses.
fn reject_unknown_keys(d: &Section<'_>) -> Result<(), ConfigError> {
    for key in d.fields.keys() {
        if KNOWN.contains(&key.as_str()) || INFORMATIONAL.contains(&key.as_str()) {
            continue;
        }
        if let Some(prefix) = FAMILIES.iter().find(|p| key.starts_with(*p)) {
            if key.len() > prefix.len() {
                continue;
            }
            return Err(ConfigError::new(
                d.key(key),
                "needs a name after the prefix",
            ));
        }
        let problem = match key.as_str() {
            "x_user_token.jwks" | "x_user_token.jwks_uri" => {
                "is not supported yet: verify user JWTs with Envoy's jwt_authn filter (or Istio RequestAuthentication)"
            }
            "tokenServiceURL.ConnectionTimeoutInSeconds" => {
                "is not supported: set connect_timeout on the Envoy cluster that reaches the token service"
            }
            _ => "is not a supported destination property",
        };
        return Err(ConfigError::new(d.key(key), problem));
    }
    Ok(())
}

/// SAP user id rules: `SystemUser`, else `userIdSource`, else a claim implied by
/// `nameIdFormat`; any other format without `userIdSource` cannot name a claim.
fn user_id_rule(d: &Section<'_>, name_id_format: &str) -> Result<UserIdRule, ConfigError> {
    if let Some(user) = d.string("SystemUser")? {
        return Ok(UserIdRule::SystemUser(user));
    }
    if let Some(source) = d.string("userIdSource")? {
        return UserIdRule::claim(&source).map_err(|p| ConfigError::new(d.key("userIdSource"), p));
    }
    match name_id_format {
        NAMEID_EMAIL => {
            Ok(UserIdRule::claim("email")
                .map_err(|p| ConfigError::new(d.key("nameIdFormat"), p))?)
        }
        NAMEID_UNSPECIFIED => Ok(UserIdRule::claim("user_name")
            .map_err(|p| ConfigError::new(d.key("nameIdFormat"), p))?),
        _ => Err(ConfigError::new(
            d.key("nameIdFormat"),
            "has no default user id claim: set userIdSource (or SystemUser)",
        )),
    }
}

/// The `<prefix><name>` entries of a family, sorted by name so output is stable.
fn family(
    d: &Section<'_>,
    prefix: &str,
    check_name: fn(&str) -> Result<(), &'static str>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut entries = Vec::new();
    for (key, value) in d.fields.iter() {
        let Some(name) = key.strip_prefix(prefix) else {
            continue;
        };
        check_name(name).map_err(|p| ConfigError::new(d.key(key), p))?;
        let text = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => return Err(ConfigError::new(d.key(key), "must be a string")),
        };
        if text.chars().any(|c| c.is_control() && c != '\t') {
            return Err(ConfigError::new(
                d.key(key),
                "must not contain control characters",
            ));
        }
        entries.push((name.to_string(), text));
    }
    entries.sort();
    Ok(entries)
}

/// The inbound credentials a destination removes: the defaults and its own additions.
fn removal(d: &Section<'_>) -> Result<Removal, ConfigError> {
    let headers = d.string_list("removeRequestHeaders")?;
    for name in &headers {
        let bare = name.strip_suffix('*').unwrap_or(name);
        if bare.is_empty() {
            return Err(ConfigError::new(
                d.key("removeRequestHeaders"),
                format!("{name:?} would match every header"),
            ));
        }
        check_header_name(bare).map_err(|problem| {
            ConfigError::new(d.key("removeRequestHeaders"), format!("{name:?} {problem}"))
        })?;
    }
    let cookies = d.string_list("removeCookies")?;
    if let Some(bad) = cookies.iter().find(|c| !is_token(c)) {
        return Err(ConfigError::new(
            d.key("removeCookies"),
            format!("{bad:?} is not a cookie name"),
        ));
    }
    let parameters = d.string_list("removeQueryParameters")?;
    if let Some(bad) = parameters.iter().find(|p| p.contains(['&', '=', '#'])) {
        return Err(ConfigError::new(
            d.key("removeQueryParameters"),
            format!("{bad:?} is not a query parameter name"),
        ));
    }
    Ok(Removal::with_extra(&headers, &cookies, &parameters))
}

/// Backend statuses that drop the token the request carried (default 401; `[]`: none).
fn evict_on_status(d: &Section<'_>) -> Result<Vec<u16>, ConfigError> {
    const KEY: &str = "evictTokenOnUpstreamStatus";
    if !d.fields.contains_key(KEY) {
        return Ok(vec![401]);
    }
    d.string_list(KEY)?
        .iter()
        .map(|s| match s.parse::<u16>() {
            Ok(status) if (400..=599).contains(&status) => Ok(status),
            _ => Err(ConfigError::new(
                d.key(KEY),
                format!("{s:?} is not an HTTP error status (400-599)"),
            )),
        })
        .collect()
}

/// An RFC 9110 token (header and cookie names).
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Header names must be RFC 9110 tokens and must not be ones the plugin or Envoy owns.
fn check_header_name(name: &str) -> Result<(), &'static str> {
    if !is_token(name) {
        return Err("names an invalid HTTP header");
    }
    if GATEWAY_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
        return Err("names a header the gateway sets itself");
    }
    Ok(())
}

fn check_body_field(name: &str) -> Result<(), &'static str> {
    if RESERVED_BODY.contains(&name) {
        return Err("would replace a form field the gateway sets itself");
    }
    Ok(())
}

/// A short hash of the destination's whole JSON (serde_json keeps object keys sorted).
fn namespace_of(value: &Value) -> String {
    let digest = Sha256::digest(value.to_string().as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}
