//! The SAML bearer token request (RFC 7522 §2.1) for one destination.

use crate::config::destination::SamlSettings;
use crate::config::AssertionEncoding;
use crate::http_url::append_query;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;

/// RFC 7522 grant type.
pub const SAML2_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:saml2-bearer";

/// An HTTP request ready for the host's callout.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenRequest {
    pub cluster: String,
    /// Pseudo-headers first (`:method`, `:path`, `:authority`), then the rest.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
}

impl std::fmt::Debug for TokenRequest {
    /// The body holds the assertion and headers may hold credentials: never print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRequest")
            .field("cluster", &self.cluster)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// Builds the form POST that exchanges `signed_assertion` at the destination's token service.
pub fn build(destination: &SamlSettings, signed_assertion: &str) -> TokenRequest {
    let assertion = match destination.encoding {
        AssertionEncoding::Base64Url => URL_SAFE_NO_PAD.encode(signed_assertion),
        AssertionEncoding::Base64 => STANDARD.encode(signed_assertion),
    };
    build_encoded(destination, &assertion)
}

/// The same request for an assertion that is encoded already: one an identity provider
/// issued, passed on as issued.
pub fn build_encoded(destination: &SamlSettings, assertion: &str) -> TokenRequest {
    let service = &destination.token_service;

    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", SAML2_BEARER_GRANT);
    form.append_pair("assertion", assertion);
    if let Some(client_id) = &destination.client_key {
        form.append_pair("client_id", client_id);
    }
    if let Some(scope) = &destination.scope {
        form.append_pair("scope", scope);
    }
    if let Some(company_id) = &destination.company_id {
        form.append_pair("company_id", company_id);
    }
    for (name, value) in &service.body {
        form.append_pair(name, value);
    }

    let mut headers = vec![
        (":method".to_string(), "POST".to_string()),
        (
            ":path".to_string(),
            append_query(&service.url.path_and_query, &service.queries),
        ),
        (":authority".to_string(), service.url.authority.clone()),
        (
            "content-type".to_string(),
            "application/x-www-form-urlencoded".to_string(),
        ),
        ("accept".to_string(), "application/json".to_string()),
    ];
    if let Some((user, password)) = &service.basic_auth {
        headers.push((
            "authorization".to_string(),
            basic_authorization(user, password),
        ));
    }
    headers.extend(service.headers.iter().cloned());

    TokenRequest {
        cluster: service.cluster.clone(),
        headers,
        body: form.finish().into_bytes(),
        timeout_ms: service.timeout_ms,
    }
}

/// RFC 6749 §2.3.1: client id and secret are form-encoded, then joined and base64'd.
pub fn basic_authorization(user: &str, password: &str) -> String {
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", encode(user), encode(password)))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::destination;
    use serde_json::json;

    #[test]
    fn encodes_client_credentials_per_rfc6749() {
        // "a b:c" -> "a+b%3Ac"; "p@ss w" -> "p%40ss+w"
        assert_eq!(
            basic_authorization("a b:c", "p@ss w"),
            format!("Basic {}", STANDARD.encode("a+b%3Ac:p%40ss+w"))
        );
    }

    #[test]
    fn builds_the_form_and_headers() {
        let d = destination::parse(
            "d",
            &json!({
                "Name": "sf", "Authentication": "OAuth2SAMLBearerAssertion",
                "tokenServiceURL": "https://api.sf.example/oauth/token?x=1",
                "tokenServiceUser": "u", "tokenServicePassword": "p",
                "clientKey": "cid", "audience": "www.successfactors.com",
                "assertionIssuer": "www.successfactors.com", "scope": "a b",
                "companyId": "ACME", "samlAssertionEncoding": "base64",
                "tokenService.body.new_token": "true",
                "tokenServiceURL.headers.X-Tenant": "t1",
                "tokenServiceURL.queries.q": "v w",
                "tokenServiceURL.SocketReadTimeoutInSeconds": "7"
            }),
            Some("ts"),
            &Default::default(),
            &|_| None,
        )
        .unwrap();
        let r = build(d.saml().unwrap(), "<a>é</a>");
        assert_eq!(r.cluster, "ts");
        assert_eq!(r.timeout_ms, 7000);
        let h = |n: &str| {
            r.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(h(":path"), Some("/oauth/token?x=1&q=v+w"));
        assert_eq!(h(":authority"), Some("api.sf.example"));
        assert_eq!(h("X-Tenant"), Some("t1"));
        assert_eq!(
            h("authorization"),
            Some(basic_authorization("u", "p").as_str())
        );
        let form: Vec<(String, String)> = form_urlencoded::parse(&r.body).into_owned().collect();
        let expected_assertion = STANDARD.encode("<a>é</a>");
        assert_eq!(
            form,
            vec![
                ("grant_type".into(), SAML2_BEARER_GRANT.into()),
                ("assertion".into(), expected_assertion),
                ("client_id".into(), "cid".into()),
                ("scope".into(), "a b".into()),
                ("company_id".into(), "ACME".into()),
                ("new_token".into(), "true".into()),
            ]
        );
        assert!(!format!("{r:?}").contains("Basic"));
    }
}
