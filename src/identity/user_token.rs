//! The user's own JWT, for an on-behalf-of exchange that passes it to the identity
//! provider. Envoy's `jwt_authn` verifies the token and hands the plugin its payload, not
//! the token: the plugin reads the raw token from the request's `Authorization` header
//! (the provider must keep it there: `forward: true`) and takes it only if its payload is
//! exactly the verified one, so a second, unverified token can never be passed on.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::Value;

/// The token of an `Authorization: Bearer <token>` value: a compact JWS (three
/// base64url parts).
pub fn bearer_token(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?.trim_matches([' ', '\t']);
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    compact_jws(token.trim_start_matches(' '))
}

/// The token of a header that carries it bare (SAP's `X-user-token`).
pub fn bare_token(value: &[u8]) -> Option<&str> {
    compact_jws(std::str::from_utf8(value).ok()?.trim_matches([' ', '\t']))
}

/// `token` if it has the form of a compact JWS.
fn compact_jws(token: &str) -> Option<&str> {
    let parts = token.split('.').count();
    let alphabet = token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    (parts == 3 && alphabet && !token.is_empty()).then_some(token)
}

/// Whether the payload of `token` is the verified `claims` (numbers compared by value:
/// Envoy hands them over as doubles).
pub fn payload_matches(token: &str, claims: &Value) -> bool {
    let Some(payload) = token.split('.').nth(1) else {
        return false;
    };
    let Ok(bytes) = URL_SAFE_NO_PAD.decode(payload) else {
        return false;
    };
    let Ok(payload) = serde_json::from_slice::<Value>(&bytes) else {
        return false;
    };
    same(&payload, claims)
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn token(payload: &Value) -> String {
        format!(
            "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
            URL_SAFE_NO_PAD.encode(payload.to_string())
        )
    }

    #[test]
    fn only_the_verified_token_is_taken() {
        let claims = json!({"sub": "u1", "exp": 1800000000, "aud": ["a", "b"], "x": {"y": 1.5}});
        let raw =
            token(&json!({"sub": "u1", "exp": 1800000000, "aud": ["a", "b"], "x": {"y": 1.5}}));
        let header = format!("Bearer {raw}");
        assert_eq!(bearer_token(header.as_bytes()), Some(raw.as_str()));
        assert!(payload_matches(&raw, &claims));
        // Envoy's protobuf Struct carries numbers as doubles.
        let from_envoy =
            json!({"sub": "u1", "exp": 1800000000.0, "aud": ["a", "b"], "x": {"y": 1.5}});
        assert!(payload_matches(&raw, &from_envoy));
        let other =
            token(&json!({"sub": "u2", "exp": 1800000000, "aud": ["a", "b"], "x": {"y": 1.5}}));
        assert!(!payload_matches(&other, &claims));
        let more = token(
            &json!({"sub": "u1", "exp": 1800000000, "aud": ["a", "b"], "x": {"y": 1.5}, "z": 1}),
        );
        assert!(!payload_matches(&more, &claims));
        assert_eq!(bearer_token(b"bearer a.b.c"), Some("a.b.c"));
        assert_eq!(bearer_token(b"Basic a.b.c"), None);
        assert_eq!(bearer_token(b"Bearer a.b"), None);
        assert_eq!(bearer_token(b"Bearer a.b.c\r\nX: y"), None);
        assert_eq!(bearer_token(b"Bearer a+b.c.d"), None);
        assert!(!payload_matches("a.!!!.c", &claims));
    }
}
