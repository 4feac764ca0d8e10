//! One SAP destination, read with SAP's property names: `OAuth2SAMLBearerAssertion`
//! (an assertion exchanged for a token) or `PrincipalPropagation` (a short-lived client
//! certificate for the user).
//!
//! An operator can paste a destination exported from the BTP cockpit and add only the
//! gateway fields. Every property is validated here, at load time, so a request never
//! meets a configuration problem.

use super::values::{ConfigError, Section};
use crate::destination_api::Exposure;
use crate::forwarding::{Removal, GATEWAY_HEADERS};
use crate::http_url::HttpUrl;
use crate::identity::UserIdRule;
use crate::keys::KeyPair;
use crate::saml::assertion::Attribute;
use crate::saml::canonical::is_xml_text;
use crate::x509::authority::Authority;
use crate::x509::subject::{SubjectPattern, DEFAULT_PATTERN, NAME_CLAIMS};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

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

/// A validated destination: what every kind shares, and its kind's own settings.
#[derive(Debug, Clone)]
pub struct Destination {
    pub name: String,
    /// Whose credential: the cache keys it (with the identity provider).
    pub user_id: UserIdRule,
    /// `URL.headers.<k>`: added to the forwarded request.
    pub url_headers: Vec<(String, String)>,
    /// `URL.queries.<k>`: appended to the forwarded request's path.
    pub url_queries: Vec<(String, String)>,
    /// The name of the signing key in the plugin's key set (`KeyStoreLocation`, or
    /// `clientCertificateIssuerKey` for certificates).
    pub key_name: String,
    /// Inbound credentials removed from every propagated request: the defaults and
    /// `removeRequestHeaders`, `removeCookies`, `removeQueryParameters`.
    pub removal: Removal,
    /// `evictTokenOnUpstreamStatus`: a backend answer with one of these statuses drops
    /// the cached credential it was given (default 401), so the next request makes anew.
    pub evict_on_status: Vec<u16>,
    /// Where the credential goes on the propagated request.
    pub carrier: Carrier,
    pub kind: Kind,
    /// Hash of everything that shapes the credential, so a changed destination never
    /// serves credentials cached under its old settings.
    pub cache_namespace: String,
    /// `exposeToClients`: the applications that may read this destination and its
    /// tokens through the find-destination API; `None`: not exposed (the default).
    pub exposure: Option<Exposure>,
}

/// How a destination propagates the user.
#[derive(Debug, Clone)]
pub enum Kind {
    /// `OAuth2SAMLBearerAssertion`: a signed assertion exchanged for a token.
    SamlBearer(Box<SamlSettings>),
    /// `PrincipalPropagation`: a short-lived client certificate for the user.
    ClientCertificate(CertificateSettings),
}

/// The settings of an `OAuth2SAMLBearerAssertion` destination.
#[derive(Debug, Clone)]
pub struct SamlSettings {
    pub token_service: TokenService,
    pub client_key: Option<String>,
    pub audience: String,
    pub assertion_issuer: String,
    pub assertion_recipient: String,
    pub name_id_format: String,
    pub name_qualifier: Option<String>,
    pub authn_context_class_ref: String,
    pub scope: Option<String>,
    pub company_id: Option<String>,
    pub encoding: AssertionEncoding,
    pub include_certificate: bool,
    pub skip_user_attributes_prefix: bool,
    pub skip_user_uuid: bool,
    /// Where the assertion comes from when the gateway does not sign it: the user's
    /// identity provider (Microsoft Entra ID's on-behalf-of flow returning SAML).
    pub assertion_service: Option<AssertionService>,
    /// Attributes the target needs in every assertion, whatever the user (its profile's:
    /// SuccessFactors' `api_key`); they replace a user's claim of the same name.
    pub fixed_attributes: Vec<Attribute>,
    /// `targetProfile`: the kind of target, whose rules `pp check` applies too.
    pub target_profile: Option<super::profile::TargetProfile>,
}

/// A token service that issues the SAML assertion for the user in exchange for the
/// user's own token (Entra ID on-behalf-of, `requested_token_type` SAML): SAP's
/// assertion provided by the client, here provided by the gateway's identity provider.
#[derive(Debug, Clone)]
pub struct AssertionService {
    /// `assertionServiceURL`: the token endpoint (`…/oauth2/v2.0/token`).
    pub url: HttpUrl,
    /// `assertionServiceCluster`: the Envoy cluster that reaches it.
    pub cluster: String,
    /// `assertionServiceClientId`: the gateway's application (its `client_id`).
    pub client_id: String,
    pub credential: ClientCredential,
    /// `assertionServiceScope` (default `<audience>/.default`, or `spn:<audience>/.default`
    /// for an audience without a URI scheme).
    pub scope: String,
    /// `assertionServiceTokenType`: the `requested_token_type` URN (SAML 2.0 unless
    /// `saml1`).
    pub token_type: &'static str,
    /// `assertionServiceTimeoutInSeconds`, in milliseconds.
    pub timeout_ms: u64,
}

/// How the gateway authenticates at the assertion service.
#[derive(Clone)]
pub enum ClientCredential {
    /// `assertionServiceClientSecret` (or `…Env`).
    Secret(String),
    /// `assertionServiceClientAssertionKey`: a key in `keys` that signs an RFC 7523
    /// `client_assertion` JWT (Entra's certificate credential).
    AssertionKey(String),
}

impl std::fmt::Debug for ClientCredential {
    /// Never prints the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientCredential::Secret(_) => f.write_str("Secret(..)"),
            ClientCredential::AssertionKey(key) => write!(f, "AssertionKey({key:?})"),
        }
    }
}

/// `requested_token_type` values.
pub const SAML2_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:saml2";
pub const SAML1_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:saml1";

/// The settings of a `PrincipalPropagation` destination.
#[derive(Debug, Clone)]
pub struct CertificateSettings {
    /// `clientCertificateSubjectPattern` (default `CN=${name}`).
    pub subject: SubjectPattern,
    /// `clientCertificateValidityMinutes`, in milliseconds.
    pub validity_ms: u64,
    /// The CA of `clientCertificateIssuerKey`.
    pub authority: Authority,
}

/// The header that carries the credential, and what precedes the credential in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carrier {
    /// Lower case.
    pub header: String,
    pub prefix: &'static str,
}

impl Carrier {
    /// The header value for `credential`.
    pub fn value(&self, credential: &str) -> String {
        let mut value = String::with_capacity(self.prefix.len() + credential.len());
        value.push_str(self.prefix);
        value.push_str(credential);
        value
    }

    /// The credential in a header value this carrier wrote.
    pub fn credential<'v>(&self, value: &'v str) -> Option<&'v str> {
        value.strip_prefix(self.prefix)
    }
}

impl Destination {
    /// The SAML settings, for a destination of that kind.
    pub fn saml(&self) -> Option<&SamlSettings> {
        match &self.kind {
            Kind::SamlBearer(saml) => Some(saml.as_ref()),
            Kind::ClientCertificate(_) => None,
        }
    }

    /// How long making a credential may take: the token service's read timeout (plus
    /// the identity provider's, whose call comes first, for an assertion from there), or
    /// for a certificate (a signature, no callout) the default one.
    pub fn exchange_timeout_ms(&self) -> u64 {
        match &self.kind {
            Kind::SamlBearer(saml) => {
                let first = saml.assertion_service.as_ref().map_or(0, |s| s.timeout_ms);
                first + saml.token_service.timeout_ms
            }
            Kind::ClientCertificate(_) => DEFAULT_READ_TIMEOUT_S * 1000,
        }
    }
}

/// `Authentication` values.
pub const SAML_BEARER: &str = "OAuth2SAMLBearerAssertion";
pub const PRINCIPAL_PROPAGATION: &str = "PrincipalPropagation";

/// SAP properties that describe a destination but do not change what the gateway does.
const INFORMATIONAL: [&str; 3] = ["Description", "ProxyType", "tokenServiceURLType"];

/// Keys every destination may have. `x_user_token.*` name the keys that verify an
/// application's `X-user-token` (SAP's fields, passed on to applications through the
/// find-destination API; the gateway's `jwt_authn` verifies the token); `KeyStorePassword`
/// (a cockpit export's) is ignored: keys come from `keys`.
const COMMON: [&str; 11] = [
    "Name",
    "Type",
    "URL",
    "Authentication",
    "removeRequestHeaders",
    "removeCookies",
    "removeQueryParameters",
    "evictTokenOnUpstreamStatus",
    "x_user_token.jwks",
    "x_user_token.jwks_uri",
    "KeyStorePassword",
];

/// Keys of `OAuth2SAMLBearerAssertion` destinations only.
const SAML_KEYS: [&str; 25] = [
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
    "exposeToClients",
    "targetProfile",
    "apiKey",
];

/// Keys of an `OAuth2SAMLBearerAssertion` destination whose assertion comes from an
/// assertion service.
const ASSERTION_SERVICE_KEYS: [&str; 9] = [
    "assertionServiceURL",
    "assertionServiceCluster",
    "assertionServiceClientId",
    "assertionServiceClientSecret",
    "assertionServiceClientSecretEnv",
    "assertionServiceClientAssertionKey",
    "assertionServiceScope",
    "assertionServiceTokenType",
    "assertionServiceTimeoutInSeconds",
];

/// Keys that shape the assertion the gateway signs: meaningless when an assertion
/// service writes it (refused rather than silently ignored).
const GATEWAY_ASSERTION_KEYS: [&str; 10] = [
    "assertionIssuer",
    "assertionRecipient",
    "nameIdFormat",
    "nameQualifier",
    "authnContextClassRef",
    "SystemUser",
    "includeSigningCertificateInSAMLAssertion",
    "skipUserAttributesPrefixInSAMLAttributes",
    "skipUserUuidInSAMLAttributes",
    "KeyStoreLocation",
];

/// Keys of `PrincipalPropagation` destinations only.
const CERTIFICATE_KEYS: [&str; 4] = [
    "clientCertificateIssuerKey",
    "clientCertificateSubjectPattern",
    "clientCertificateValidityMinutes",
    "clientCertificateHeader",
];

/// Families of `<prefix><name>` keys every destination may have.
const COMMON_FAMILIES: [&str; 2] = ["URL.headers.", "URL.queries."];

/// Families of `OAuth2SAMLBearerAssertion` destinations only.
const SAML_FAMILIES: [&str; 3] = [
    "tokenService.body.",
    "tokenServiceURL.headers.",
    "tokenServiceURL.queries.",
];

/// Form fields the plugin writes itself; `tokenService.body.*` may not replace them.
const RESERVED_BODY: [&str; 5] = [
    "grant_type",
    "assertion",
    "client_id",
    "scope",
    "company_id",
];

/// The Cloud Connector's largest certificate validity (minutes).
pub const MAX_CERTIFICATE_MINUTES: u64 = 43_200;
/// Validity of a user's certificate unless configured: a few minutes, reused meanwhile.
pub const DEFAULT_CERTIFICATE_MINUTES: u64 = 10;
/// The header of the user's certificate unless configured (SAP ICM's default).
pub const DEFAULT_CERTIFICATE_HEADER: &str = "SSL_CLIENT_CERT";

/// Reads one destination. `default_cluster` is the plugin-wide `tokenServiceCluster`;
/// `keys` the plugin's keys (a certificate destination's CA is checked against them).
pub fn parse(
    path: &str,
    value: &Value,
    default_cluster: Option<&str>,
    keys: &BTreeMap<String, KeyPair>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Destination, ConfigError> {
    let d = Section::new(path, value)?;
    let authentication = d.required_string("Authentication")?;
    let certificate = match authentication.as_str() {
        SAML_BEARER => false,
        PRINCIPAL_PROPAGATION => true,
        _ => {
            return Err(ConfigError::new(
                d.key("Authentication"),
                format!(
                    "is {authentication:?}; supported are {SAML_BEARER} and {PRINCIPAL_PROPAGATION}"
                ),
            ))
        }
    };
    reject_unknown_keys(&d, certificate)?;

    let name = d.required_string("Name")?;
    if let Some(kind) = d.string("Type")? {
        if kind != "HTTP" {
            return Err(ConfigError::new(d.key("Type"), "must be HTTP"));
        }
    }
    if let Some(proxy) = d.string("ProxyType")? {
        let on_premise = certificate && proxy == "OnPremise";
        if proxy != "Internet" && !on_premise {
            return Err(ConfigError::new(
                d.key("ProxyType"),
                "must be Internet (or OnPremise for PrincipalPropagation; targets are reached through Envoy clusters)",
            ));
        }
    }
    if let Some(url) = d.string("URL")? {
        HttpUrl::parse(&url).map_err(|p| ConfigError::new(d.key("URL"), p))?;
    }
    let (kind, user_id, key_name, carrier) = if certificate {
        certificate_settings(&d, keys)?
    } else {
        saml_settings(&d, default_cluster, env)?
    };
    let mut removal = removal(&d)?;
    if carrier.header != "authorization" {
        // A client must never bring its own copy of the header the gateway fills.
        removal.add_header(&carrier.header);
    }
    let mut destination = Destination {
        user_id,
        url_headers: family(&d, "URL.headers.", check_header_name)?,
        url_queries: family(&d, "URL.queries.", |_| Ok(()))?,
        key_name,
        removal,
        evict_on_status: evict_on_status(&d)?,
        carrier,
        kind,
        cache_namespace: String::new(),
        exposure: exposure(&d)?,
        name,
    };
    destination.cache_namespace = namespace_of(value, &destination.kind);
    if let Kind::SamlBearer(saml) = &destination.kind {
        check_assertion_values(&d, saml, &destination.user_id)?;
    }
    Ok(destination)
}

/// `exposeToClients`, with the properties the find-destination API shows.
fn exposure(d: &Section<'_>) -> Result<Option<Exposure>, ConfigError> {
    for jwks in ["x_user_token.jwks", "x_user_token.jwks_uri"] {
        d.string(jwks)?;
    }
    if !d.fields.contains_key("exposeToClients") {
        return Ok(None);
    }
    let clients = d.string_list("exposeToClients")?;
    if clients.is_empty() {
        return Err(ConfigError::new(
            d.key("exposeToClients"),
            "must name at least one client id (leave it out to expose nothing)",
        ));
    }
    Ok(Some(Exposure::of(d.fields, clients)))
}

type KindParts = (Kind, UserIdRule, String, Carrier);

/// An `OAuth2SAMLBearerAssertion` destination's own settings.
fn saml_settings(
    d: &Section<'_>,
    default_cluster: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<KindParts, ConfigError> {
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

    let assertion_service = assertion_service(d, env)?;
    let name_id_format = d
        .string("nameIdFormat")?
        .unwrap_or_else(|| NAMEID_UNSPECIFIED.to_string());
    let user_id = match (&assertion_service, d.string("userIdSource")?) {
        // The identity provider names the user in its assertion; the cache keys the
        // principal by the token's `sub` (present in every JWT) unless told otherwise.
        (Some(_), None) => {
            UserIdRule::claim("sub").map_err(|p| ConfigError::new(d.key("userIdSource"), p))?
        }
        _ => user_id_rule(d, &name_id_format)?,
    };

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
        headers: family(d, "tokenServiceURL.headers.", check_header_name)?,
        queries: family(d, "tokenServiceURL.queries.", |_| Ok(()))?,
        body: family(d, "tokenService.body.", check_body_field)?,
        timeout_ms: timeout_s * 1000,
        url: token_url,
    };
    let audience = d.required_string("audience")?;
    let assertion_service = match assertion_service {
        Some(mut service) => {
            if service.scope.is_empty() {
                service.scope = default_scope(&audience);
            }
            Some(service)
        }
        None => None,
    };
    let assertion_issuer = match &assertion_service {
        Some(_) => String::new(),
        None => d.required_string("assertionIssuer")?,
    };
    let saml = SamlSettings {
        client_key: d.string("clientKey")?,
        audience,
        assertion_issuer,
        assertion_recipient: d
            .string("assertionRecipient")?
            .unwrap_or_else(|| token_url_text.clone()),
        name_id_format,
        name_qualifier: d.string("nameQualifier")?,
        authn_context_class_ref: d
            .string("authnContextClassRef")?
            .unwrap_or_else(|| DEFAULT_AUTHN_CONTEXT.to_string()),
        scope: d.string("scope")?,
        company_id: d.string("companyId")?,
        encoding,
        include_certificate: d.boolean("includeSigningCertificateInSAMLAssertion", false)?,
        skip_user_attributes_prefix: d
            .boolean("skipUserAttributesPrefixInSAMLAttributes", false)?,
        skip_user_uuid: d.boolean("skipUserUuidInSAMLAttributes", false)?,
        token_service,
        assertion_service,
        fixed_attributes: Vec::new(),
        target_profile: None,
    };
    let carrier = Carrier {
        header: "authorization".into(),
        prefix: "Bearer ",
    };
    let key_name = match &saml.assertion_service {
        Some(AssertionService {
            credential: ClientCredential::AssertionKey(key),
            ..
        }) => key.clone(),
        _ => d.string("KeyStoreLocation")?.unwrap_or_default(),
    };
    Ok((Kind::SamlBearer(Box::new(saml)), user_id, key_name, carrier))
}

/// `assertionService*`: where the assertion comes from when the gateway does not sign
/// it; `None` when `assertionServiceURL` is not set. The scope is left empty when not
/// configured (its default needs the audience).
fn assertion_service(
    d: &Section<'_>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<AssertionService>, ConfigError> {
    let Some(url_text) = d.string("assertionServiceURL")? else {
        if let Some(key) = first_set(d, &ASSERTION_SERVICE_KEYS) {
            return Err(ConfigError::new(
                d.key(key),
                "needs assertionServiceURL (the token endpoint that issues the assertion)",
            ));
        }
        return Ok(None);
    };
    if let Some(key) = first_set(d, &GATEWAY_ASSERTION_KEYS) {
        return Err(ConfigError::new(
            d.key(key),
            "does not apply: the identity provider at assertionServiceURL writes the assertion",
        ));
    }
    let url =
        HttpUrl::parse(&url_text).map_err(|p| ConfigError::new(d.key("assertionServiceURL"), p))?;
    let secret = d.inline_or_env("assertionServiceClientSecret", env)?;
    let key = d.string("assertionServiceClientAssertionKey")?;
    let credential = match (secret, key) {
        (Some(secret), None) => ClientCredential::Secret(secret),
        (None, Some(key)) => ClientCredential::AssertionKey(key),
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                d.key("assertionServiceClientAssertionKey"),
                "and assertionServiceClientSecret are both set; use one",
            ))
        }
        (None, None) => {
            return Err(ConfigError::new(
                d.key("assertionServiceClientSecret"),
                "is required (or assertionServiceClientSecretEnv, or assertionServiceClientAssertionKey)",
            ))
        }
    };
    let token_type = match d.string("assertionServiceTokenType")?.as_deref() {
        None | Some("saml2") => SAML2_TOKEN_TYPE,
        Some("saml1") => SAML1_TOKEN_TYPE,
        Some(_) => {
            return Err(ConfigError::new(
                d.key("assertionServiceTokenType"),
                "must be saml2 or saml1",
            ))
        }
    };
    Ok(Some(AssertionService {
        url,
        cluster: d.required_string("assertionServiceCluster")?,
        client_id: d.required_string("assertionServiceClientId")?,
        credential,
        scope: d.string("assertionServiceScope")?.unwrap_or_default(),
        token_type,
        timeout_ms: d.integer(
            "assertionServiceTimeoutInSeconds",
            1..=600,
            DEFAULT_READ_TIMEOUT_S,
        )? * 1000,
    }))
}

/// The first of `keys` the destination sets.
fn first_set<'k>(d: &Section<'_>, keys: &[&'k str]) -> Option<&'k str> {
    keys.iter().copied().find(|k| d.fields.contains_key(*k))
}

/// Entra's scope for a SAML target: `<entity id>/.default`, with `spn:` before an entity
/// id that has no URI scheme.
fn default_scope(audience: &str) -> String {
    if audience.contains("://") {
        format!("{audience}/.default")
    } else {
        format!("spn:{audience}/.default")
    }
}

/// A `PrincipalPropagation` destination's own settings.
fn certificate_settings(
    d: &Section<'_>,
    keys: &BTreeMap<String, KeyPair>,
) -> Result<KindParts, ConfigError> {
    const ISSUER_KEY: &str = "clientCertificateIssuerKey";
    let key_name = d.required_string(ISSUER_KEY)?;
    let pair = keys.get(&key_name).ok_or_else(|| {
        ConfigError::new(
            d.key(ISSUER_KEY),
            format!("names no key in `keys`: {key_name:?}"),
        )
    })?;
    let authority = Authority::of(&pair.active).map_err(|e| {
        ConfigError::new(
            d.key(ISSUER_KEY),
            format!("names key {key_name:?}, which {e}"),
        )
    })?;
    let pattern = d
        .string("clientCertificateSubjectPattern")?
        .unwrap_or_else(|| DEFAULT_PATTERN.to_string());
    let subject = SubjectPattern::parse(&pattern)
        .map_err(|p| ConfigError::new(d.key("clientCertificateSubjectPattern"), p))?;
    let minutes = d.integer(
        "clientCertificateValidityMinutes",
        1..=MAX_CERTIFICATE_MINUTES,
        DEFAULT_CERTIFICATE_MINUTES,
    )?;
    let header = d
        .string("clientCertificateHeader")?
        .unwrap_or_else(|| DEFAULT_CERTIFICATE_HEADER.to_string());
    check_header_name(&header)
        .map_err(|p| ConfigError::new(d.key("clientCertificateHeader"), p))?;
    let settings = CertificateSettings {
        subject,
        validity_ms: minutes * 60_000,
        authority,
    };
    let carrier = Carrier {
        header: header.to_ascii_lowercase(),
        prefix: "",
    };
    Ok((
        Kind::ClientCertificate(settings),
        UserIdRule::first_claim(&NAME_CLAIMS),
        key_name,
        carrier,
    ))
}

/// Values written into every assertion must be XML text, or no assertion could be built.
fn check_assertion_values(
    d: &Section<'_>,
    dest: &SamlSettings,
    user_id: &UserIdRule,
) -> Result<(), ConfigError> {
    let values = [
        ("audience", Some(&dest.audience)),
        ("assertionIssuer", Some(&dest.assertion_issuer)),
        ("assertionRecipient", Some(&dest.assertion_recipient)),
        ("nameIdFormat", Some(&dest.name_id_format)),
        ("nameQualifier", dest.name_qualifier.as_ref()),
        ("authnContextClassRef", Some(&dest.authn_context_class_ref)),
        (
            "SystemUser",
            match user_id {
                UserIdRule::SystemUser(user) => Some(user),
                UserIdRule::Claim { .. } | UserIdRule::FirstClaim(_) => None,
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

/// Refuses keys that are neither SAP properties we support for this kind, informational
/// SAP properties, nor members of a supported family; explains the near misses.
fn reject_unknown_keys(d: &Section<'_>, certificate: bool) -> Result<(), ConfigError> {
    let (own, own_families, other, other_kind): (&[&str], &[&str], &[&str], &str) = if certificate {
        (&CERTIFICATE_KEYS, &[], &SAML_KEYS, SAML_BEARER)
    } else {
        (
            &SAML_KEYS,
            &SAML_FAMILIES,
            &CERTIFICATE_KEYS,
            PRINCIPAL_PROPAGATION,
        )
    };
    for key in d.fields.keys() {
        let key_str = key.as_str();
        let service_key = !certificate && ASSERTION_SERVICE_KEYS.contains(&key_str);
        if COMMON.contains(&key_str)
            || own.contains(&key_str)
            || INFORMATIONAL.contains(&key_str)
            || service_key
        {
            continue;
        }
        let families = COMMON_FAMILIES.iter().chain(own_families);
        if let Some(prefix) = families.clone().find(|p| key.starts_with(*p)) {
            if key.len() > prefix.len() {
                continue;
            }
            return Err(ConfigError::new(
                d.key(key),
                "needs a name after the prefix",
            ));
        }
        let saml_family = SAML_FAMILIES.iter().any(|p| key.starts_with(p));
        let other_kind_key =
            other.contains(&key_str) || (certificate && ASSERTION_SERVICE_KEYS.contains(&key_str));
        if other_kind_key || (certificate && saml_family) {
            return Err(ConfigError::new(
                d.key(key),
                format!("applies to {other_kind} destinations only"),
            ));
        }
        let problem = match key_str {
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

/// A short hash of the destination's whole JSON (serde_json keeps object keys sorted) and,
/// for certificates, of the CA that signs them: a new CA key makes new certificates.
fn namespace_of(value: &Value, kind: &Kind) -> String {
    let mut hash = Sha256::new();
    hash.update(value.to_string().as_bytes());
    if let Kind::ClientCertificate(settings) = kind {
        hash.update(settings.authority.key_id());
    }
    let digest = hash.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}
