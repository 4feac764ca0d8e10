//! SAP Destination Service's "find destination" API, answered by the gateway: an
//! application that calls its target itself (the SAP Cloud SDK, anywhere, not only on
//! BTP) asks for a destination and a ready token for its user, and the gateway answers
//! from the same destinations, keys, exchange and cache it propagates with.
//!
//! `GET <pathPrefix>/destination-configuration/v1/destinations/<name>`, the application's
//! service token in `Authorization` and the user's token in `X-user-token`, both verified
//! by Envoy's `jwt_authn` before the plugin runs. The answer has SAP's shape: `owner`,
//! `destinationConfiguration` (an allow-list of the destination's SAP properties: never a
//! secret or a gateway field) and `authTokens`.

use crate::config::destination::Carrier;
use crate::config::values::{ConfigError, Section};
use serde_json::{json, Map, Value};

/// The API's path below the configured prefix.
pub const API_PATH: &str = "/destination-configuration/v1/destinations/";
/// jwt_authn's metadata key for the service token's payload unless configured.
pub const DEFAULT_SERVICE_TOKEN_KEY: &str = "service_token";
/// `owner.SubaccountId` when neither the configuration nor the service token names one.
const DEFAULT_SUBACCOUNT: &str = "principal-propagation";
/// SAP's answer for a destination it does not have (or, here, does not expose).
pub const NOT_FOUND_MESSAGE: &str = "Configuration with the specified name was not found";
/// Claims naming the application of a client-credentials token: XSUAA's and IAS's
/// `client_id`, else OpenID Connect's `azp` (Entra ID's, too).
const CLIENT_ID_CLAIMS: [&str; 2] = ["client_id", "azp"];

/// SAP properties a destination's answer may carry: what an application needs to call
/// the target, and nothing that authenticates the gateway (`tokenServicePassword`,
/// `KeyStorePassword`, `tokenService.body.*` and `tokenServiceURL.headers.*`/`queries.*`,
/// which may hold keys) and no gateway field.
const EXPOSED_PROPERTIES: [&str; 20] = [
    "Name",
    "Type",
    "URL",
    "Authentication",
    "ProxyType",
    "Description",
    "tokenServiceURL",
    "tokenServiceURLType",
    "tokenServiceUser",
    "clientKey",
    "audience",
    "assertionIssuer",
    "nameIdFormat",
    "authnContextClassRef",
    "userIdSource",
    "scope",
    "companyId",
    "SystemUser",
    "x_user_token.jwks",
    "x_user_token.jwks_uri",
];
/// Families of SAP properties the application applies itself to its calls.
const EXPOSED_FAMILIES: [&str; 2] = ["URL.headers.", "URL.queries."];

/// The `destinationApi` plugin setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiSettings {
    /// `pathPrefix` ("" or `/…` without a trailing `/`).
    pub path_prefix: String,
    /// `serviceTokenPayloadKey`: where `jwt_authn` puts the service token's payload.
    pub service_token_key: String,
    /// `subaccountId`: `owner.SubaccountId` (default: the service token's `zid`).
    pub subaccount_id: Option<String>,
}

impl ApiSettings {
    pub fn parse(value: &Value) -> Result<Self, ConfigError> {
        let s = Section::new("destinationApi", value)?;
        for key in s.fields.keys() {
            if !["pathPrefix", "serviceTokenPayloadKey", "subaccountId"].contains(&key.as_str()) {
                return Err(ConfigError::new(
                    s.key(key),
                    "is not a destinationApi setting",
                ));
            }
        }
        let path_prefix = match s.fields.get("pathPrefix") {
            None => String::new(),
            Some(Value::String(p))
                if p.is_empty()
                    || (p.starts_with('/')
                        && !p.ends_with('/')
                        && !p.contains(['?', '#', '%'])
                        && p.bytes().all(|b| b.is_ascii_graphic())) =>
            {
                p.clone()
            }
            Some(_) => {
                return Err(ConfigError::new(
                    s.key("pathPrefix"),
                    "must be empty or a path starting with / (no trailing /, query, fragment or escapes)",
                ))
            }
        };
        Ok(ApiSettings {
            path_prefix,
            service_token_key: s
                .string("serviceTokenPayloadKey")?
                .unwrap_or_else(|| DEFAULT_SERVICE_TOKEN_KEY.into()),
            subaccount_id: s.string("subaccountId")?,
        })
    }

    /// The call a request's `:path` makes, or `None` if it is not for the API.
    pub fn call(&self, path: &[u8]) -> Option<Call> {
        let rest = path.strip_prefix(self.path_prefix.as_bytes())?;
        let rest = rest.strip_prefix(API_PATH.as_bytes())?;
        let (segment, query) = match rest.iter().position(|&b| b == b'?') {
            Some(at) => (&rest[..at], Some(&rest[at + 1..])),
            None => (rest, None),
        };
        let name = percent_decode(segment)
            .and_then(|n| String::from_utf8(n).ok())
            .filter(|n| !n.is_empty() && !n.contains('/'));
        let skip_token_retrieval = query.is_some_and(|q| {
            q.split(|&b| b == b'&').any(|pair| {
                let (key, value) = match pair.iter().position(|&b| b == b'=') {
                    Some(at) => (&pair[..at], &pair[at + 1..]),
                    None => (pair, &b""[..]),
                };
                percent_decode(key).as_deref() == Some(b"$skipTokenRetrieval")
                    && percent_decode(value).is_some_and(|v| v.eq_ignore_ascii_case(b"true"))
            })
        });
        Some(Call {
            name,
            skip_token_retrieval,
        })
    }
}

/// One call of the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The destination's name; `None` for a path that names none (answered 404).
    pub name: Option<String>,
    /// `$skipTokenRetrieval=true`: the configuration only, no exchange.
    pub skip_token_retrieval: bool,
}

/// `%XX` escapes decoded; `None` for a malformed one.
fn percent_decode(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let text = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(text, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// What a destination shows applications: who may read it, and the properties they get.
#[derive(Debug, Clone, PartialEq)]
pub struct Exposure {
    /// `exposeToClients`: the client ids of the applications that may read it.
    pub clients: Vec<String>,
    /// The `destinationConfiguration` object (serialized once, at load).
    pub configuration: String,
}

impl Exposure {
    /// The exposure of a destination given as `raw` (its JSON object) to `clients`.
    pub fn of(raw: &Map<String, Value>, clients: Vec<String>) -> Self {
        let configuration: Map<String, Value> = raw
            .iter()
            .filter(|(key, value)| {
                let key = key.as_str();
                let allowed = EXPOSED_PROPERTIES.contains(&key)
                    || EXPOSED_FAMILIES.iter().any(|f| key.starts_with(f));
                allowed && !value.is_null()
            })
            .map(|(key, value)| {
                // SAP's answer carries every property as a string.
                let text = match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (key.clone(), Value::String(text))
            })
            .collect();
        Exposure {
            clients,
            configuration: Value::Object(configuration).to_string(),
        }
    }

    pub fn allows(&self, client: &str) -> bool {
        self.clients.iter().any(|c| c == client)
    }
}

/// The application a verified service token belongs to.
pub fn client_id(service_claims: &Value) -> Option<&str> {
    CLIENT_ID_CLAIMS
        .iter()
        .find_map(|claim| service_claims.get(claim)?.as_str())
        .filter(|id| !id.is_empty())
}

/// `owner.SubaccountId`: configured, else the service token's tenant (`zid`).
pub fn subaccount<'a>(settings: &'a ApiSettings, service_claims: &'a Value) -> &'a str {
    settings
        .subaccount_id
        .as_deref()
        .or_else(|| service_claims.get("zid").and_then(Value::as_str))
        .unwrap_or(DEFAULT_SUBACCOUNT)
}

/// An answer being written: everything but the token, known before the exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    owner: String,
    configuration: String,
    scope: String,
}

/// The token part of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenPart {
    /// `$skipTokenRetrieval`: no `authTokens`.
    Skipped,
    /// The token and the header value that carries it; usable for `expires_in` seconds.
    Token {
        token: String,
        header_value: String,
        expires_in: u64,
    },
    /// The exchange failed: SAP's error entry (empty `type` and `value`). `expires_in` is
    /// "0", so that the SAP Cloud SDK does not keep the failure in its destination cache
    /// (without one it keeps it 5 minutes); the gateway holds failures itself.
    Error(String),
}

impl TokenPart {
    /// The entry for a credential `value` (as `carrier` writes it into its header)
    /// usable until `usable_until_ms`.
    pub fn of(carrier: &Carrier, value: &str, usable_until_ms: u64, now_ms: u64) -> Self {
        match carrier.credential(value) {
            Some(token) => TokenPart::Token {
                token: token.to_string(),
                header_value: value.to_string(),
                expires_in: usable_until_ms.saturating_sub(now_ms) / 1000,
            },
            None => TokenPart::Error("the gateway's credential is not a token".into()),
        }
    }
}

impl Answer {
    pub fn new(subaccount: &str, exposure: &Exposure, scope: Option<&str>) -> Self {
        Answer {
            owner: json!({"SubaccountId": subaccount, "InstanceId": null}).to_string(),
            configuration: exposure.configuration.clone(),
            scope: scope.unwrap_or_default().to_string(),
        }
    }

    /// The JSON body with `part`.
    pub fn body(&self, part: &TokenPart) -> String {
        let tokens = match part {
            TokenPart::Skipped => None,
            TokenPart::Token {
                token,
                header_value,
                expires_in,
            } => Some(json!([{
                "type": "Bearer",
                "value": token,
                "http_header": {"key": "Authorization", "value": header_value},
                "expires_in": expires_in.to_string(),
                "scope": self.scope,
            }])),
            TokenPart::Error(text) => Some(json!([{
                "type": "",
                "value": "",
                "error": text,
                "expires_in": "0",
            }])),
        };
        let mut body = format!(
            "{{\"owner\":{},\"destinationConfiguration\":{}",
            self.owner, self.configuration
        );
        if let Some(tokens) = tokens {
            body.push_str(",\"authTokens\":");
            body.push_str(&tokens.to_string());
        }
        body.push('}');
        body
    }
}

/// The API's own refusals, in SAP's `{"ErrorMessage": …}` shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No verified service token.
    Unauthenticated,
    /// The service token names no client, or one the destination is not exposed to.
    Forbidden,
    /// No such destination, or one not exposed to applications.
    NotFound,
    /// Not a GET.
    MethodNotAllowed,
}

impl Refusal {
    /// Status, extra headers and body.
    pub fn reply(self) -> (u32, Vec<(&'static str, &'static str)>, String) {
        let (status, message, headers): (u32, &str, Vec<(&str, &str)>) = match self {
            Refusal::Unauthenticated => (
                401,
                "a valid service token (Authorization: Bearer, a client-credentials JWT) is required",
                vec![("www-authenticate", "Bearer")],
            ),
            Refusal::Forbidden => (
                403,
                "this client may not read this destination",
                Vec::new(),
            ),
            Refusal::NotFound => (404, NOT_FOUND_MESSAGE, Vec::new()),
            Refusal::MethodNotAllowed => (
                405,
                "only GET is supported",
                vec![("allow", "GET")],
            ),
        };
        (
            status,
            headers,
            json!({ "ErrorMessage": message }).to_string(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(prefix: &str) -> ApiSettings {
        ApiSettings::parse(&json!({"pathPrefix": prefix})).unwrap()
    }

    #[test]
    fn recognizes_its_paths_only() {
        let api = settings("");
        let call = api
            .call(b"/destination-configuration/v1/destinations/dev")
            .unwrap();
        assert_eq!(call.name.as_deref(), Some("dev"));
        assert!(!call.skip_token_retrieval);
        assert!(api.call(b"/hello").is_none());
        assert!(api
            .call(b"/destination-configuration/v1/destinations")
            .is_none());
        let call = api
            .call(b"/destination-configuration/v1/destinations/")
            .unwrap();
        assert_eq!(call.name, None, "no name: 404");
        let call = api
            .call(b"/destination-configuration/v1/destinations/a/b")
            .unwrap();
        assert_eq!(call.name, None);
        let prefixed = settings("/gw");
        assert!(prefixed
            .call(b"/destination-configuration/v1/destinations/dev")
            .is_none());
        assert_eq!(
            prefixed
                .call(b"/gw/destination-configuration/v1/destinations/my%20dest")
                .unwrap()
                .name
                .as_deref(),
            Some("my dest")
        );
        assert_eq!(
            api.call(b"/destination-configuration/v1/destinations/%zz")
                .unwrap()
                .name,
            None,
            "a malformed escape names nothing"
        );
    }

    #[test]
    fn reads_skip_token_retrieval_in_any_escaping() {
        let api = settings("");
        for (query, skip) in [
            ("$skipTokenRetrieval=true", true),
            ("%24skipTokenRetrieval=TRUE", true),
            ("a=1&$skipTokenRetrieval=true", true),
            ("$skipTokenRetrieval=false", false),
            ("skipTokenRetrieval=true", false),
            ("$skipTokenRetrieval", false),
        ] {
            let path = format!("/destination-configuration/v1/destinations/dev?{query}");
            let call = api.call(path.as_bytes()).unwrap();
            assert_eq!(call.skip_token_retrieval, skip, "{query}");
            assert_eq!(call.name.as_deref(), Some("dev"));
        }
    }

    #[test]
    fn refuses_bad_settings() {
        for bad in [
            json!({"pathPrefix": "gw"}),
            json!({"pathPrefix": "/gw/"}),
            json!({"pathPrefix": "/g?w"}),
            json!({"serviceTokenPayloadKey": ""}),
            json!({"other": 1}),
            json!("x"),
        ] {
            assert!(ApiSettings::parse(&bad).is_err(), "{bad}");
        }
        let s = ApiSettings::parse(&json!({})).unwrap();
        assert_eq!(s.service_token_key, DEFAULT_SERVICE_TOKEN_KEY);
        assert_eq!(s.path_prefix, "");
    }

    #[test]
    fn exposes_an_allow_list_of_properties_as_strings() {
        let raw = json!({
            "Name": "dev", "Type": "HTTP", "URL": "https://t", "Authentication": "OAuth2SAMLBearerAssertion",
            "tokenServiceURL": "https://t/oauth/token", "tokenServiceUser": "u",
            "tokenServicePassword": "secret-1", "tokenServicePasswordEnv": "ENV",
            "KeyStorePassword": "secret-2", "KeyStoreLocation": "default",
            "tokenService.body.api_key": "secret-3", "tokenServiceURL.headers.X-Key": "secret-4",
            "tokenServiceURL.queries.key": "secret-5", "assertionServiceClientSecret": "secret-6",
            "tokenServiceCluster": "c", "exposeToClients": ["app"],
            "URL.headers.X-Ok": "1", "URL.queries.sap-client": "100",
            "x_user_token.jwks_uri": "https://idp/jwks", "SystemUser": null,
            "includeSigningCertificateInSAMLAssertion": true, "companyId": 7
        });
        let exposure = Exposure::of(raw.as_object().unwrap(), vec!["app".into()]);
        assert!(
            !exposure.configuration.contains("secret"),
            "{}",
            exposure.configuration
        );
        let config: Value = serde_json::from_str(&exposure.configuration).unwrap();
        for key in [
            "tokenServiceCluster",
            "exposeToClients",
            "KeyStoreLocation",
            "SystemUser",
            "includeSigningCertificateInSAMLAssertion",
            "tokenServicePasswordEnv",
        ] {
            assert!(config.get(key).is_none(), "{key}");
        }
        assert_eq!(config["URL.queries.sap-client"], "100");
        assert_eq!(config["x_user_token.jwks_uri"], "https://idp/jwks");
        assert_eq!(config["companyId"], "7");
        assert!(exposure.allows("app") && !exposure.allows("other"));
    }

    #[test]
    fn writes_sap_shaped_answers() {
        let raw = json!({"Name": "dev", "URL": "https://t"});
        let exposure = Exposure::of(raw.as_object().unwrap(), vec![]);
        let answer = Answer::new("zid-1", &exposure, Some("read"));
        let ok: Value = serde_json::from_str(&answer.body(&TokenPart::Token {
            token: "t\"1".into(),
            header_value: "Bearer t\"1".into(),
            expires_in: 42,
        }))
        .unwrap();
        assert_eq!(ok["owner"]["SubaccountId"], "zid-1");
        assert_eq!(ok["destinationConfiguration"]["Name"], "dev");
        let entry = &ok["authTokens"][0];
        assert_eq!(entry["value"], "t\"1");
        assert_eq!(entry["http_header"]["value"], "Bearer t\"1");
        assert_eq!(entry["expires_in"], "42");
        assert_eq!(entry["scope"], "read");
        let failed: Value =
            serde_json::from_str(&answer.body(&TokenPart::Error("refused: x".into()))).unwrap();
        let entry = &failed["authTokens"][0];
        assert_eq!(
            (entry["type"].as_str(), entry["value"].as_str()),
            (Some(""), Some(""))
        );
        assert_eq!(entry["error"], "refused: x");
        assert_eq!(entry["expires_in"], "0");
        let skipped: Value = serde_json::from_str(&answer.body(&TokenPart::Skipped)).unwrap();
        assert!(skipped.get("authTokens").is_none());
    }

    #[test]
    fn a_token_entry_counts_the_seconds_left_before_the_margin() {
        let carrier = Carrier {
            header: "authorization".into(),
            prefix: "Bearer ",
        };
        assert_eq!(
            TokenPart::of(&carrier, "Bearer t", 61_999, 2_000),
            TokenPart::Token {
                token: "t".into(),
                header_value: "Bearer t".into(),
                expires_in: 59
            }
        );
        assert!(matches!(
            TokenPart::of(&carrier, "Bearer t", 1_000, 2_000),
            TokenPart::Token { expires_in: 0, .. }
        ));
        assert!(matches!(
            TokenPart::of(&carrier, "Basic x", 9_000, 0),
            TokenPart::Error(_)
        ));
    }

    #[test]
    fn names_the_client_and_the_owner() {
        let settings = settings("");
        let claims = json!({"client_id": "app", "azp": "other", "zid": "t-1"});
        assert_eq!(client_id(&claims), Some("app"));
        assert_eq!(client_id(&json!({"azp": "entra-app"})), Some("entra-app"));
        assert_eq!(client_id(&json!({"client_id": ""})), None);
        assert_eq!(client_id(&json!({"sub": "x"})), None);
        assert_eq!(subaccount(&settings, &claims), "t-1");
        assert_eq!(subaccount(&settings, &json!({})), DEFAULT_SUBACCOUNT);
        let fixed = ApiSettings::parse(&json!({"subaccountId": "acct"})).unwrap();
        assert_eq!(subaccount(&fixed, &claims), "acct");
    }

    #[test]
    fn refusals_have_saps_shape() {
        let (status, headers, body) = Refusal::NotFound.reply();
        assert_eq!(status, 404);
        assert!(headers.is_empty());
        assert_eq!(body, json!({"ErrorMessage": NOT_FOUND_MESSAGE}).to_string());
        let (status, headers, _) = Refusal::Unauthenticated.reply();
        assert_eq!(
            (status, headers),
            (401, vec![("www-authenticate", "Bearer")])
        );
        assert_eq!(Refusal::Forbidden.reply().0, 403);
        assert_eq!(Refusal::MethodNotAllowed.reply().0, 405);
    }
}
