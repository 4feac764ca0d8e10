//! Reading the token service's answer (RFC 6749 §5.1 success, §5.2 error).
//!
//! The answer comes from the network: it is bounded, parsed strictly and never trusted
//! to be well-formed. A token is only accepted if it can go into an HTTP header as is.
//!
//! Where RFC 6749 leaves room, the rules are:
//! - `token_type` must be `bearer` in any letter case (§5.1: case-insensitive); anything
//!   else, or none, is refused: the plugin only knows how to send bearer tokens.
//! - `expires_in` is a non-negative number of seconds; fractions are dropped and more
//!   than [`MAX_LIFETIME_S`] is capped (a token is re-exchanged at least daily, whatever
//!   the server claims). A string of decimal digits is read as that number: some token
//!   services send one, and it has exactly one meaning. Negative values, other strings
//!   and other types are refused: the server's clock or code is broken.
//! - `expires_in` missing, `null` or `0` means "lifetime unknown": the token serves the
//!   requests that waited for it and is not cached (like Spring Security, which assumes
//!   one second), rather than guessing a lifetime the token may not have.

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
    /// Lifetime in seconds, capped at [`MAX_LIFETIME_S`]; 0 when the server gave none
    /// (the token is then not cached).
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
    Ok(IssuedToken {
        access_token: access_token.to_string(),
        expires_in_s: expires_in(json.get("expires_in"))?,
    })
}

/// The cache lifetime in seconds `expires_in` allows (see the module rules).
fn expires_in(value: Option<&Value>) -> Result<u64, Failure> {
    let seconds = match value {
        None | Some(Value::Null) => 0.0,
        Some(Value::Number(n)) => n.as_f64().unwrap_or(-1.0),
        // At most 10 digits: any longer is far above the cap, and parses as a u64 anyway.
        Some(Value::String(s))
            if (1..=10).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) =>
        {
            s.parse::<u64>().map_or(-1.0, |v| v as f64)
        }
        Some(_) => {
            return Err(Failure::Unavailable {
                reason: "expires_in is not a number",
            })
        }
    };
    if seconds.is_finite() && seconds >= 0.0 {
        Ok((seconds as u64).min(MAX_LIFETIME_S))
    } else {
        Err(Failure::Unavailable {
            reason: "expires_in is negative",
        })
    }
}

/// The RFC 6749 §5.2 `error` code of an error answer, with Microsoft Entra's numeric
/// code when it gives one (`invalid_grant AADSTS500133`): what an operator looks up.
/// `None` if the body is no such answer.
pub fn error_detail(body: &[u8]) -> Option<(String, Option<u64>)> {
    if body.len() > MAX_RESPONSE_BYTES {
        return None;
    }
    let code = oauth_error(body)?;
    let json: Value = serde_json::from_slice(body).ok()?;
    let numeric = json
        .get("error_codes")
        .and_then(Value::as_array)
        .and_then(|codes| codes.first())
        .and_then(Value::as_u64)
        .or_else(|| {
            // Older answers carry it only as the description's prefix: "AADSTS50013: …".
            let description = json.get("error_description")?.as_str()?;
            let digits = description.strip_prefix("AADSTS")?;
            let end = digits
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(digits.len());
            digits[..end.min(9)].parse().ok()
        });
    Some((code, numeric))
}

/// The RFC 6749 §5.2 `error` code, if the body is such an answer with a valid code; or,
/// for SuccessFactors, which answers in its own shape (`{"errorHttpCode": "401",
/// "errorMessage": "Unable to verify the signature …"}`, KBA 2668018), its message as
/// the code (what an operator needs; printable ASCII, at most 160 characters).
fn oauth_error(body: &[u8]) -> Option<String> {
    let json: Value = serde_json::from_slice(body).ok()?;
    let printable = |b: u8| matches!(b, 0x20..=0x21 | 0x23..=0x5b | 0x5d..=0x7e);
    if let Some(code) = json.get("error").and_then(Value::as_str) {
        let valid = !code.is_empty() && code.len() <= 64 && code.bytes().all(printable);
        return valid.then(|| code.to_string());
    }
    let message = json.get("errorMessage")?.as_str()?;
    let text: String = message
        .chars()
        .map(|c| {
            if c.is_ascii() && printable(c as u8) {
                c
            } else {
                ' '
            }
        })
        .take(160)
        .collect();
    let text = text.trim();
    (!text.is_empty()).then(|| format!("SuccessFactors: {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> Result<IssuedToken, Failure> {
        parse(Some(200), body.as_bytes())
    }

    #[test]
    fn reads_entra_error_codes() {
        let entra = br#"{"error":"invalid_grant","error_description":"AADSTS500133: Assertion is not within its valid time range.","error_codes":[500133]}"#;
        assert_eq!(
            error_detail(entra),
            Some(("invalid_grant".into(), Some(500133)))
        );
        let prefix_only = br#"{"error":"invalid_grant","error_description":"AADSTS65001: The user or administrator has not consented"}"#;
        assert_eq!(
            error_detail(prefix_only),
            Some(("invalid_grant".into(), Some(65001)))
        );
        assert_eq!(
            error_detail(br#"{"error":"invalid_client"}"#),
            Some(("invalid_client".into(), None))
        );
        assert_eq!(error_detail(br#"{"error":"bad\"code"}"#), None);
        assert_eq!(error_detail(b"<html>"), None);
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
    }

    fn lifetime(expires_in: &str) -> Result<u64, Failure> {
        let body = format!(r#"{{"access_token":"a","token_type":"bearer"{expires_in}}}"#);
        ok(&body).map(|t| t.expires_in_s)
    }

    #[test]
    fn expires_in_huge_is_capped_at_a_day() {
        assert_eq!(lifetime(r#","expires_in":86400"#), Ok(86_400));
        assert_eq!(lifetime(r#","expires_in":86401"#), Ok(MAX_LIFETIME_S));
        assert_eq!(lifetime(r#","expires_in":1e12"#), Ok(MAX_LIFETIME_S));
        assert_eq!(
            lifetime(r#","expires_in":18446744073709551615"#),
            Ok(MAX_LIFETIME_S)
        );
        assert_eq!(lifetime(r#","expires_in":1e300"#), Ok(MAX_LIFETIME_S));
        // Beyond what a double holds, the JSON parser refuses the whole answer.
        assert!(matches!(
            lifetime(r#","expires_in":1e400"#),
            Err(Failure::Unavailable { .. })
        ));
    }

    #[test]
    fn expires_in_fractions_are_dropped() {
        assert_eq!(lifetime(r#","expires_in":3599.9"#), Ok(3599));
    }

    #[test]
    fn expires_in_missing_null_or_zero_means_not_cached() {
        assert_eq!(lifetime(""), Ok(0));
        assert_eq!(lifetime(r#","expires_in":null"#), Ok(0));
        assert_eq!(lifetime(r#","expires_in":0"#), Ok(0));
        assert_eq!(lifetime(r#","expires_in":-0.0"#), Ok(0));
    }

    #[test]
    fn expires_in_negative_is_refused() {
        for e in ["-1", "-3600", "-0.5", "-1e300"] {
            assert_eq!(
                lifetime(&format!(r#","expires_in":{e}"#)),
                Err(Failure::Unavailable {
                    reason: "expires_in is negative"
                }),
                "{e}"
            );
        }
    }

    #[test]
    fn expires_in_as_a_digit_string_is_read_as_a_number() {
        assert_eq!(lifetime(r#","expires_in":"3600""#), Ok(3600));
        assert_eq!(lifetime(r#","expires_in":"0""#), Ok(0));
        assert_eq!(
            lifetime(r#","expires_in":"9999999999""#),
            Ok(MAX_LIFETIME_S)
        );
    }

    #[test]
    fn expires_in_other_strings_and_types_are_refused() {
        for e in [
            r#""one hour""#,
            r#""""#,
            r#"" 3600""#,
            r#""3600 ""#,
            r#""+3600""#,
            r#""-1""#,
            r#""3.5""#,
            r#""1e3""#,
            r#""0x10""#,
            r#""99999999999""#,
            "true",
            "[3600]",
            r#"{"s":3600}"#,
        ] {
            assert_eq!(
                lifetime(&format!(r#","expires_in":{e}"#)),
                Err(Failure::Unavailable {
                    reason: "expires_in is not a number"
                }),
                "{e}"
            );
        }
    }

    #[test]
    fn token_type_is_bearer_in_any_case_and_nothing_else() {
        for t in ["bearer", "Bearer", "BEARER", "bEaReR"] {
            let body = format!(r#"{{"access_token":"a","token_type":"{t}","expires_in":60}}"#);
            assert_eq!(ok(&body).map(|t| t.expires_in_s), Ok(60), "{t}");
        }
        for t in [
            r#""mac""#,
            r#""DPoP""#,
            r#""bearer ""#,
            r#""""#,
            "null",
            "1",
        ] {
            let body = format!(r#"{{"access_token":"a","token_type":{t}}}"#);
            assert_eq!(
                ok(&body),
                Err(Failure::Unavailable {
                    reason: "token_type is not bearer"
                }),
                "{t}"
            );
        }
        assert!(
            ok(r#"{"access_token":"a"}"#).is_err(),
            "token_type is required"
        );
    }

    #[test]
    fn bodies_over_the_limit_are_refused_whatever_they_hold() {
        let mut body = br#"{"access_token":"a","token_type":"bearer","pad":""#.to_vec();
        body.resize(MAX_RESPONSE_BYTES - 2, b'x');
        body.extend_from_slice(br#""}"#);
        assert!(parse(Some(200), &body).is_ok(), "exactly at the limit");
        body.insert(body.len() - 2, b'x');
        assert_eq!(
            parse(Some(200), &body),
            Err(Failure::Unavailable {
                reason: "response too large"
            })
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
            "access_token=a&token_type=bearer",
            "{}",
            "[]",
            r#"{"access_token":"","token_type":"bearer"}"#,
            r#"{"access_token":42,"token_type":"bearer"}"#,
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
        // SuccessFactors' own shape: its message, made printable and bounded.
        let sf = br#"{"errorHttpCode":"401","errorMessage":"Unable to verify the signature of the SAML assertion.\n\"x\" \u00e9"}"#;
        assert_eq!(
            parse(Some(401), sf),
            Err(Failure::Rejected {
                code:
                    "SuccessFactors: Unable to verify the signature of the SAML assertion.  x    "
                        .trim_end()
                        .into()
            })
        );
        let long = format!(r#"{{"errorMessage":"{}"}}"#, "y".repeat(500));
        match parse(Some(400), long.as_bytes()) {
            Err(Failure::Rejected { code }) => {
                assert_eq!(code.len(), "SuccessFactors: ".len() + 160)
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(Some(400), br#"{"errorMessage":"  "}"#),
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
