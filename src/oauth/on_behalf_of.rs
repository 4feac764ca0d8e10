//! The on-behalf-of request to the user's identity provider (Microsoft Entra ID's v2
//! token endpoint): the user's token in, a SAML assertion for the target out. The client
//! authenticates with a secret or with an RFC 7523 `client_assertion` JWT signed by a
//! gateway key (Entra's certificate credential).

use super::token_request::{basic_authorization, TokenRequest};
use crate::config::destination::{AssertionService, ClientCredential};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::json;
use sha2::{Digest, Sha256};

/// RFC 7523 grant type: a JWT as the authorization grant.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// RFC 7523 client assertion type.
pub const JWT_CLIENT_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How long a client assertion is valid (Entra accepts up to ten minutes).
pub const CLIENT_ASSERTION_LIFETIME_S: u64 = 300;

/// The on-behalf-of form POST for the user's `user_token`; `client_assertion` when the
/// gateway authenticates with a key (else the secret goes in HTTP Basic, which Entra
/// accepts like the form fields).
pub fn request(
    service: &AssertionService,
    user_token: &str,
    client_assertion: Option<&str>,
) -> TokenRequest {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", JWT_BEARER_GRANT);
    form.append_pair("assertion", user_token);
    form.append_pair("client_id", &service.client_id);
    form.append_pair("scope", &service.scope);
    form.append_pair("requested_token_use", "on_behalf_of");
    form.append_pair("requested_token_type", service.token_type);
    if let Some(assertion) = client_assertion {
        form.append_pair("client_assertion_type", JWT_CLIENT_ASSERTION);
        form.append_pair("client_assertion", assertion);
    }
    let mut headers = vec![
        (":method".to_string(), "POST".to_string()),
        (":path".to_string(), service.url.path_and_query.clone()),
        (":authority".to_string(), service.url.authority.clone()),
        (
            "content-type".to_string(),
            "application/x-www-form-urlencoded".to_string(),
        ),
        ("accept".to_string(), "application/json".to_string()),
    ];
    if let ClientCredential::Secret(secret) = &service.credential {
        headers.push((
            "authorization".to_string(),
            basic_authorization(&service.client_id, secret),
        ));
    }
    TokenRequest {
        cluster: service.cluster.clone(),
        headers,
        body: form.finish().into_bytes(),
        timeout_ms: service.timeout_ms,
    }
}

/// The part of a client assertion JWT that is signed (`header.payload`), RFC 7523 §3:
/// `iss` = `sub` = the client id, `aud` = the token endpoint, a fresh `jti`. `alg` is
/// `RS256` or `ES256` (the gateway's key), `x5t#S256` the thumbprint of its certificate,
/// by which Entra finds the credential.
pub fn client_assertion_input(
    service: &AssertionService,
    alg: &str,
    certificate_der: &[u8],
    now_s: u64,
    jti: &[u8; 16],
) -> String {
    let header = json!({
        "alg": alg,
        "typ": "JWT",
        "x5t#S256": URL_SAFE_NO_PAD.encode(Sha256::digest(certificate_der)),
    });
    let jti: String = jti.iter().map(|b| format!("{b:02x}")).collect();
    let payload = json!({
        "aud": service.url.full,
        "iss": service.client_id,
        "sub": service.client_id,
        "jti": jti,
        "iat": now_s,
        "nbf": now_s,
        "exp": now_s + CLIENT_ASSERTION_LIFETIME_S,
    });
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload.to_string())
    )
}

/// The compact JWT: the signed input and the signature (RS256: the PKCS#1 v1.5 value;
/// ES256: `r || s`, which is what the P-256 signer gives).
pub fn client_assertion(input: &str, signature: &[u8]) -> String {
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_url::HttpUrl;

    fn service(credential: ClientCredential) -> AssertionService {
        AssertionService {
            url: HttpUrl::parse("https://login.example/tenant/oauth2/v2.0/token").unwrap(),
            cluster: "sts".into(),
            client_id: "client-1".into(),
            credential,
            scope: "spn:dev-token-server/.default".into(),
            token_type: crate::config::destination::SAML2_TOKEN_TYPE,
            timeout_ms: 7_000,
        }
    }

    #[test]
    fn the_on_behalf_of_form_carries_the_user_token_and_asks_for_saml() {
        let r = request(
            &service(ClientCredential::Secret("s3cret".into())),
            "eyJ.user.tok",
            None,
        );
        let form: Vec<(String, String)> = form_urlencoded::parse(&r.body).into_owned().collect();
        let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(field("grant_type"), Some(JWT_BEARER_GRANT));
        assert_eq!(field("assertion"), Some("eyJ.user.tok"));
        assert_eq!(field("requested_token_use"), Some("on_behalf_of"));
        assert_eq!(
            field("requested_token_type"),
            Some("urn:ietf:params:oauth:token-type:saml2")
        );
        assert_eq!(field("scope"), Some("spn:dev-token-server/.default"));
        assert_eq!(field("client_assertion"), None);
        assert!(
            !String::from_utf8_lossy(&r.body).contains("s3cret"),
            "the secret goes in Basic"
        );
        assert!(r
            .headers
            .iter()
            .any(|(k, v)| k == "authorization" && v.starts_with("Basic ")));
        assert_eq!((r.cluster.as_str(), r.timeout_ms), ("sts", 7_000));
        let keyed = request(
            &service(ClientCredential::AssertionKey("k".into())),
            "u",
            Some("a.b.c"),
        );
        let form: Vec<(String, String)> =
            form_urlencoded::parse(&keyed.body).into_owned().collect();
        assert!(form.contains(&("client_assertion".into(), "a.b.c".into())));
        assert!(form.contains(&("client_assertion_type".into(), JWT_CLIENT_ASSERTION.into())));
        assert!(!keyed.headers.iter().any(|(k, _)| k == "authorization"));
    }

    #[test]
    fn the_client_assertion_names_the_client_and_the_endpoint() {
        let input = client_assertion_input(
            &service(ClientCredential::AssertionKey("k".into())),
            "RS256",
            b"certificate",
            1_800_000_000,
            &[0xab; 16],
        );
        let (header, payload) = input.split_once('.').unwrap();
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
        let payload: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(header["alg"], "RS256");
        assert_eq!(
            header["x5t#S256"],
            URL_SAFE_NO_PAD.encode(Sha256::digest(b"certificate"))
        );
        assert_eq!(
            payload["aud"],
            "https://login.example/tenant/oauth2/v2.0/token"
        );
        assert_eq!(
            (payload["iss"].as_str(), payload["sub"].as_str()),
            (Some("client-1"), Some("client-1"))
        );
        assert_eq!(payload["exp"], 1_800_000_300u64);
        assert_eq!(payload["jti"], "ab".repeat(16));
        assert_eq!(client_assertion("h.p", &[1, 2]), "h.p.AQI");
    }
}
