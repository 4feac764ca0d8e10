//! Who the user is: the user id for the NameID and the attributes for the assertion,
//! taken from the claims of the JWT that Envoy already verified.

pub mod attributes;
pub mod payload;

use serde_json::Value;
use std::fmt;

/// A request's verified identity, read lazily: a cache hit needs only the user id, and
/// the host may read one claim much more cheaply than all of them.
pub trait Identity {
    /// The claim at `path` (from the root of the claims) if the host can tell cheaply
    /// that it is a non-blank string fit for XML; `None` means "unknown": the plugin
    /// reads [`Identity::claims`] instead.
    fn string_claim(&self, _path: &[String]) -> Option<String> {
        None
    }

    /// Every verified claim; `None`: no authenticated user.
    fn claims(&self) -> Option<Value>;
}

/// Claims already at hand (tests, or a host that decodes them anyway).
impl Identity for Option<&Value> {
    fn claims(&self) -> Option<Value> {
        self.cloned()
    }
}

/// How a destination finds the user id (SAP order: `SystemUser`, `userIdSource`, then
/// the claim implied by `nameIdFormat`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserIdRule {
    /// A fixed technical user (SAP's deprecated `SystemUser`).
    SystemUser(String),
    /// A claim: a root key, or a `$.`-prefixed JSON path such as `$.ext_attr.user`.
    Claim { name: String, path: Vec<String> },
}

impl UserIdRule {
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
    };
    let mut value = claims;
    for step in path {
        value = value
            .get(step.as_str())
            .ok_or_else(|| UserIdError::Missing {
                claim: name.clone(),
            })?;
    }
    match value {
        // A blank id names nobody: refused like an empty one.
        Value::String(s) if s.trim().is_empty() => Err(UserIdError::Empty {
            claim: name.clone(),
        }),
        Value::String(s) => Ok(s.clone()),
        Value::Null => Err(UserIdError::Missing {
            claim: name.clone(),
        }),
        _ => Err(UserIdError::NotAString {
            claim: name.clone(),
        }),
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
}
