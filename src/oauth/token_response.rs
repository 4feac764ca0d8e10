//! Reading the token service's answer (RFC 6749 §5.1 success, §5.2 error).
//!
//! The answer comes from the network: it is bounded, parsed strictly and never trusted
//! to be well-formed. A token is only accepted if it can go into an HTTP header as is.

use crate::error::Failure;
use serde_json::Value;

/// Answers larger than this are refused unread.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Tokens are cached at most this long, whatever `expires_in` claims.
pub const MAX_LIFETIME_S: u64 = 24 * 3600;

/// An access token the token service issued.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedToken {
    pub access_token: String,
    /// Lifetime in seconds, capped at [`MAX_LIFETIME_S`]; 0 when the server gave none.
    pub expires_in_s: u64,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IssuedToken(expires_in_s: {})", self.expires_in_s)
    }
}

/// Interprets a callout answer. `status` is `None` when the host saw no `:status`
/// (connection failure or reset).
pub fn parse(status: Option<u16>, body: &[u8]) -> Result<IssuedToken, Failure> {
    let status = status.ok_or(Failure::Unavailable {
        reason: "no response (connection failed or was reset)",
    })?;
    if body.len() > MAX_RESPONSE_BYTES {
        return Err(Failure::Unavailable {
            reason: "response too large",
        });
    }
    match status {
        200 => parse_success(body),
        400..=499 => Err(oauth_error(body).map_or(
            Failure::Unavailable {
                reason: "unexpected client error without an OAuth error",
            },
            |code| Failure::Rejected { code },
        )),
        504 => Err(Failure::Timeout),
        500..=599 => Err(Failure::Unavailable {
            reason: "unreachable or failing (HTTP 5xx)",
        }),
        _ => Err(Failure::Unavailable {
            reason: "unexpected HTTP status",
        }),
    }
}

fn parse_success(body: &[u8]) -> Result<IssuedToken, Failure> {
    let garbage = |reason| Failure::Unavailable { reason };
    let json: Value = serde_json::from_slice(body).map_err(|_| garbage("response is not JSON"))?;
    let access_token = json
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty() && t.bytes().all(|b| (0x21..=0x7e).contains(&b)))
        .ok_or(garbage("response has no usable access_token"))?;
    match json.get("token_type").and_then(Value::as_str) {
        Some(t) if t.eq_ignore_ascii_case("bearer") => {}
        _ => return Err(garbage("token_type is not bearer")),
    }
    let expires_in_s = match json.get("expires_in") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if f >= 0.0 && f.is_finite() => (f as u64).min(MAX_LIFETIME_S),
            _ => return Err(garbage("expires_in is negative or not a number")),
        },
        Some(_) => return Err(garbage("expires_in is not a number")),
    };
    Ok(IssuedToken {
        access_token: access_token.to_string(),
        expires_in_s,
    })
}

/// The RFC 6749 §5.2 `error` code, if the body is such an answer with a valid code.
fn oauth_error(body: &[u8]) -> Option<String> {
    let json: Value = serde_json::from_slice(body).ok()?;
    let code = json.get("error")?.as_str()?;
    let valid = !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| matches!(b, 0x20..=0x21 | 0x23..=0x5b | 0x5d..=0x7e));
    valid.then(|| code.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> Result<IssuedToken, Failure> {
        parse(Some(200), body.as_bytes())
    }

    #[test]
    fn accepts_a_bearer_token() {
        let t =
            ok(r#"{"access_token":"abc.def","token_type":"Bearer","expires_in":3600,"scope":"x"}"#)
                .unwrap();
        assert_eq!((t.access_token.as_str(), t.expires_in_s), ("abc.def", 3600));
        assert_eq!(
            ok(r#"{"access_token":"a","token_type":"bearer"}"#)
                .unwrap()
                .expires_in_s,
            0
        );
        assert_eq!(
            ok(r#"{"access_token":"a","token_type":"bearer","expires_in":1e12}"#)
                .unwrap()
                .expires_in_s,
            MAX_LIFETIME_S
        );
    }

    #[test]
    fn refuses_unusable_answers() {
        for body in [
            "",
            "<html>",
            r#"{"token_type":"bearer"}"#,
            r#"{"access_token":"a b","token_type":"bearer"}"#,
            r#"{"access_token":"a\r\nx: y","token_type":"bearer"}"#,
            r#"{"access_token":"a","token_type":"mac"}"#,
            r#"{"access_token":"a","token_type":"bearer","expires_in":-1}"#,
            r#"{"access_token":"a","token_type":"bearer","expires_in":"3600"}"#,
        ] {
            assert!(
                matches!(ok(body), Err(Failure::Unavailable { .. })),
                "{body}"
            );
        }
        assert!(matches!(
            parse(Some(200), &vec![b' '; MAX_RESPONSE_BYTES + 1]),
            Err(Failure::Unavailable { .. })
        ));
    }

    #[test]
    fn maps_errors_and_transport_failures() {
        assert_eq!(
            parse(
                Some(400),
                br#"{"error":"invalid_grant","error_description":"x"}"#
            ),
            Err(Failure::Rejected {
                code: "invalid_grant".into()
            })
        );
        assert_eq!(
            parse(Some(401), br#"{"error":"invalid_client"}"#),
            Err(Failure::Rejected {
                code: "invalid_client".into()
            })
        );
        assert!(matches!(
            parse(Some(400), br#"{"error":"a\"b"}"#),
            Err(Failure::Unavailable { .. })
        ));
        assert!(matches!(
            parse(Some(404), b"<html>"),
            Err(Failure::Unavailable { .. })
        ));
        assert!(matches!(
            parse(Some(503), b"x"),
            Err(Failure::Unavailable { .. })
        ));
        assert_eq!(
            parse(Some(504), b"upstream request timeout"),
            Err(Failure::Timeout)
        );
        assert!(matches!(parse(None, b""), Err(Failure::Unavailable { .. })));
    }
}
