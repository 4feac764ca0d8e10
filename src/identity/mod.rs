//! Who the user is: the user id for the NameID and the attributes for the assertion,
//! taken from the claims of the JWT that Envoy already verified.

pub mod attributes;
pub mod payload;
pub mod user_token;

use serde_json::Value;
use std::fmt;

/// A request's verified identity, read lazily: a cache hit needs only the principal, and
/// the host may tell it much more cheaply than it decodes every claim.
pub trait Identity {
    /// The principal for `rule` if the host can tell it cheaply and with certainty;
    /// `None` means "unknown": the plugin decodes [`Identity::claims`] instead.
    fn quick_principal(&self, _rule: &UserIdRule) -> Option<Principal> {
        None
    }

    /// Every verified claim; `None`: no authenticated user.
    fn claims(&self) -> Option<Value>;

    /// The user's JWT as the client sent it (`Authorization: Bearer`), for an exchange
    /// that passes it on (on-behalf-of); `None` if the request has none. Only its match
    /// with [`Identity::claims`] makes it the verified one (see [`user_token`]).
    fn raw_token(&self) -> Option<String> {
        None
    }
}

/// Claims already at hand (tests, or a host that decodes them anyway).
impl Identity for Option<&Value> {
    fn claims(&self) -> Option<Value> {
        self.cloned()
    }
}

/// Who a token is for: the user id within the identity provider that vouched for it.
/// Two identity providers (several `jwt_authn` providers, or XSUAA origins) can issue the
/// same user name, so the cache keys the whole principal, never the user id alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The NameID.
    pub user_id: String,
    /// The `iss` claim, if the token has one.
    pub issuer: Option<String>,
    /// The `origin` claim (the XSUAA identity provider), if the token has one.
    pub origin: Option<String>,
}

/// Claims naming the identity provider, keyed together with the user id.
pub const ISSUER_CLAIM: &str = "iss";
pub const ORIGIN_CLAIM: &str = "origin";

impl Principal {
    /// A text that differs for every two principals: each optional part length-prefixed
    /// (or marked absent), then the user id.
    pub fn key(&self) -> String {
        use std::fmt::Write;
        let mut key = String::with_capacity(self.user_id.len() + 64);
        for part in [&self.issuer, &self.origin] {
            match part {
                // Writing into a String cannot fail.
                Some(text) => drop(write!(key, "+{}:{text}", text.len())),
                None => key.push('-'),
            }
        }
        key.push_str(&self.user_id);
        key
    }

    /// The one principal of a destination with `SystemUser`: every user shares its token.
    fn system(user: &str) -> Principal {
        Principal {
            user_id: user.to_string(),
            issuer: None,
            origin: None,
        }
    }
}

/// The principal for `rule` from the verified claims.
pub fn principal(rule: &UserIdRule, claims: &Value) -> Result<Principal, UserIdError> {
    if let UserIdRule::SystemUser(user) = rule {
        return Ok(Principal::system(user));
    }
    let provider = |claim: &str| match claims.get(claim) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(UserIdError::NotAString {
            claim: claim.to_string(),
        }),
    };
    Ok(Principal {
        user_id: user_id(rule, claims)?,
        issuer: provider(ISSUER_CLAIM)?,
        origin: provider(ORIGIN_CLAIM)?,
    })
}

/// The principal for `rule` from the payload's raw root claims (see
/// [`payload::root_claims`]), if every part is certain; `None`: decode the claims. A user
/// id read through a JSON path always takes the exact way: a nested value's raw bytes
/// could be a string that merely looks like a map.
pub fn principal_from_raw(rule: &UserIdRule, pairs: &[(&[u8], &[u8])]) -> Option<Principal> {
    use payload::{raw_claim, RawClaim};
    let user_id = match rule {
        UserIdRule::SystemUser(user) => return Some(Principal::system(user)),
        UserIdRule::Claim { path, .. } if path.len() == 1 => match raw_claim(pairs, &path[0]) {
            RawClaim::String(user_id) => user_id,
            RawClaim::Absent | RawClaim::Unknown => return None,
        },
        UserIdRule::Claim { .. } => return None,
        UserIdRule::FirstClaim(claims) => {
            let mut found = None;
            for claim in claims {
                match raw_claim(pairs, claim) {
                    RawClaim::String(user_id) => {
                        found = Some(user_id);
                        break;
                    }
                    RawClaim::Absent => continue,
                    RawClaim::Unknown => return None,
                }
            }
            found?
        }
    };
    let provider = |claim| match raw_claim(pairs, claim) {
        RawClaim::Absent => Some(None),
        RawClaim::String(s) => Some(Some(s)),
        RawClaim::Unknown => None,
    };
    Some(Principal {
        user_id,
        issuer: provider(ISSUER_CLAIM)?,
        origin: provider(ORIGIN_CLAIM)?,
    })
}

/// How a destination finds the user id (SAP order: `SystemUser`, `userIdSource`, then
/// the claim implied by `nameIdFormat`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserIdRule {
    /// A fixed technical user (SAP's deprecated `SystemUser`).
    SystemUser(String),
    /// A claim: a root key, or a `$.`-prefixed JSON path such as `$.ext_attr.user`.
    Claim { name: String, path: Vec<String> },
    /// The first present of these root claims (the Cloud Connector's `${name}`).
    FirstClaim(Vec<String>),
}

impl UserIdRule {
    /// A rule reading the first present of `claims`.
    pub fn first_claim(claims: &[&str]) -> Self {
        UserIdRule::FirstClaim(claims.iter().map(|c| c.to_string()).collect())
    }

    /// A rule reading `source`: a root claim name, or a JSON path starting with `$.`.
    pub fn claim(source: &str) -> Result<Self, &'static str> {
        let path: Vec<String> = match source.strip_prefix("$.") {
            Some(p) => p.split('.').map(str::to_string).collect(),
            None => vec![source.to_string()],
        };
        if path.iter().any(String::is_empty) {
            return Err("must be a claim name or a JSON path like $.a.b");
        }
        Ok(UserIdRule::Claim {
            name: source.to_string(),
            path,
        })
    }
}

/// Why no usable user id came out of the claims; maps to 401 naming the claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserIdError {
    Missing { claim: String },
    NotAString { claim: String },
    Empty { claim: String },
}

impl fmt::Display for UserIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserIdError::Missing { claim } => {
                write!(
                    f,
                    "user ID could not be determined: claim '{claim}' is missing"
                )
            }
            UserIdError::NotAString { claim } => {
                write!(
                    f,
                    "user ID could not be determined: claim '{claim}' is not a string"
                )
            }
            UserIdError::Empty { claim } => {
                write!(
                    f,
                    "user ID could not be determined: claim '{claim}' is empty"
                )
            }
        }
    }
}

/// The user id for `rule` from the verified claims.
pub fn user_id(rule: &UserIdRule, claims: &Value) -> Result<String, UserIdError> {
    let (name, path) = match rule {
        UserIdRule::SystemUser(user) => return Ok(user.clone()),
        UserIdRule::Claim { name, path } => (name, path),
        UserIdRule::FirstClaim(names) => {
            let present = names
                .iter()
                .find(|n| !matches!(claims.get(n.as_str()), None | Some(Value::Null)));
            return match present {
                Some(name) => string_value(name, &claims[name.as_str()]),
                None => Err(UserIdError::Missing {
                    claim: names.join(", "),
                }),
            };
        }
    };
    let mut value = claims;
    for step in path {
        value = value
            .get(step.as_str())
            .ok_or_else(|| UserIdError::Missing {
                claim: name.clone(),
            })?;
    }
    string_value(name, value)
}

/// The user id in claim `name`'s `value`: a string that is not blank.
fn string_value(name: &str, value: &Value) -> Result<String, UserIdError> {
    let claim = name.to_string();
    match value {
        // A blank id names nobody: refused like an empty one.
        Value::String(s) if s.trim().is_empty() => Err(UserIdError::Empty { claim }),
        Value::String(s) => Ok(s.clone()),
        Value::Null => Err(UserIdError::Missing { claim }),
        _ => Err(UserIdError::NotAString { claim }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn follows_sap_rules() {
        let claims =
            json!({"user_name": "alice", "email": "a@x", "ext": {"id": "A1"}, "n": 5, "e": ""});
        let rule = |s| UserIdRule::claim(s).unwrap();
        assert_eq!(user_id(&rule("user_name"), &claims).unwrap(), "alice");
        assert_eq!(user_id(&rule("$.ext.id"), &claims).unwrap(), "A1");
        assert_eq!(
            user_id(&UserIdRule::SystemUser("TECH".into()), &claims).unwrap(),
            "TECH"
        );
        assert_eq!(
            user_id(&rule("missing"), &claims),
            Err(UserIdError::Missing {
                claim: "missing".into()
            })
        );
        assert_eq!(
            user_id(&rule("n"), &claims),
            Err(UserIdError::NotAString { claim: "n".into() })
        );
        assert_eq!(
            user_id(&rule("e"), &claims),
            Err(UserIdError::Empty { claim: "e".into() })
        );
        let blank = json!({"b": " \t\r\n"});
        assert_eq!(
            user_id(&rule("b"), &blank),
            Err(UserIdError::Empty { claim: "b".into() })
        );
        let padded = json!({"p": " a "});
        assert_eq!(user_id(&rule("p"), &padded).unwrap(), " a ");
        assert!(UserIdRule::claim("$.a..b").is_err());
        assert!(user_id(&rule("$.ext.id.deeper"), &claims).is_err());
    }

    #[test]
    fn the_principal_is_the_user_within_its_identity_provider() {
        let rule = UserIdRule::claim("user_name").unwrap();
        let of = |claims: Value| principal(&rule, &claims).unwrap();
        let a = of(json!({"user_name": "alice", "iss": "https://idp-a"}));
        let b = of(json!({"user_name": "alice", "iss": "https://idp-b"}));
        let c = of(json!({"user_name": "alice", "iss": "https://idp-a", "origin": "ldap"}));
        let d = of(json!({"user_name": "alice"}));
        let keys = [a.key(), b.key(), c.key(), d.key()];
        for (i, k) in keys.iter().enumerate() {
            assert!(keys[i + 1..].iter().all(|other| other != k), "{keys:?}");
        }
        assert_eq!(a.user_id, "alice");
        // No part can run into the next.
        let tricky = of(json!({"user_name": "a", "iss": "x", "origin": "+1:y"}));
        let plain = of(json!({"user_name": "+1:ya", "iss": "x"}));
        assert_ne!(tricky.key(), plain.key());
        assert_eq!(
            principal(&rule, &json!({"user_name": "alice", "iss": 5})),
            Err(UserIdError::NotAString {
                claim: "iss".into()
            })
        );
        assert_eq!(
            principal(&rule, &json!({"user_name": "alice", "origin": ["a"]})),
            Err(UserIdError::NotAString {
                claim: "origin".into()
            })
        );
        let system = principal(&UserIdRule::SystemUser("TECH".into()), &json!({"iss": "x"}));
        assert_eq!(system.unwrap().key(), "--TECH", "one token for everyone");
    }

    #[test]
    fn the_raw_claims_give_a_principal_only_when_certain() {
        let rule = UserIdRule::claim("user_name").unwrap();
        let pairs: Vec<(&[u8], &[u8])> = vec![
            (b"user_name", b"alice"),
            (b"iss", b"https://idp-a"),
            (b"origin", b"ldap"),
        ];
        let quick = principal_from_raw(&rule, &pairs).unwrap();
        let exact = principal(
            &rule,
            &json!({"user_name": "alice", "iss": "https://idp-a", "origin": "ldap"}),
        )
        .unwrap();
        assert_eq!(quick, exact);
        let eight: Vec<(&[u8], &[u8])> = vec![(b"user_name", b"alice"), (b"origin", b"8bytes!!")];
        assert_eq!(principal_from_raw(&rule, &eight), None, "could be a number");
        let absent: Vec<(&[u8], &[u8])> = vec![(b"iss", b"https://idp-a")];
        assert_eq!(
            principal_from_raw(&rule, &absent),
            None,
            "the exact way names the claim"
        );
        let nested = UserIdRule::claim("$.ext.id").unwrap();
        assert_eq!(principal_from_raw(&nested, &pairs), None);
        let system = UserIdRule::SystemUser("TECH".into());
        assert_eq!(principal_from_raw(&system, &[]).unwrap().user_id, "TECH");
    }
}
