//! The subject of a user's certificate: the destination's subject pattern (the Cloud
//! Connector's form, `CN=${name}` by default) filled in from the user's verified claims.
//!
//! The name is built as ASN.1 values, never parsed back from text, so a user id such as
//! `a,CN=admin` stays one attribute value: the backend reads exactly the intended subject.
//! Values a DN cannot carry (too long for RFC 5280's upper bounds, control characters,
//! blank, a country that is not two letters, a non-ASCII e-mail address) are refused.

use crate::identity::{self, UserIdRule};
use serde_json::Value;
use std::fmt;
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::der::asn1::Utf8StringRef;
use x509_cert::der::asn1::{Any, Ia5StringRef, ObjectIdentifier, PrintableStringRef, SetOfVec};
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};

/// The DN fields a subject pattern may use (the Cloud Connector's list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    CommonName,
    Email,
    Locality,
    Organization,
    OrganizationalUnit,
    State,
    Country,
}

impl Field {
    fn parse(label: &str) -> Option<Field> {
        Some(match label.to_ascii_uppercase().as_str() {
            "CN" => Field::CommonName,
            "EMAIL" => Field::Email,
            "L" => Field::Locality,
            "O" => Field::Organization,
            "OU" => Field::OrganizationalUnit,
            "ST" => Field::State,
            "C" => Field::Country,
            _ => return None,
        })
    }

    /// The label in patterns and error messages.
    pub fn label(self) -> &'static str {
        match self {
            Field::CommonName => "CN",
            Field::Email => "EMAIL",
            Field::Locality => "L",
            Field::Organization => "O",
            Field::OrganizationalUnit => "OU",
            Field::State => "ST",
            Field::Country => "C",
        }
    }

    fn oid(self) -> ObjectIdentifier {
        ObjectIdentifier::new_unwrap(match self {
            Field::CommonName => "2.5.4.3",
            Field::Email => "1.2.840.113549.1.9.1",
            Field::Locality => "2.5.4.7",
            Field::Organization => "2.5.4.10",
            Field::OrganizationalUnit => "2.5.4.11",
            Field::State => "2.5.4.8",
            Field::Country => "2.5.4.6",
        })
    }

    /// RFC 5280's upper bound (characters).
    fn max_chars(self) -> usize {
        match self {
            Field::CommonName | Field::Organization | Field::OrganizationalUnit => 64,
            Field::Locality | Field::State => 128,
            Field::Email => 255,
            Field::Country => 2,
        }
    }

    /// The value as its ASN.1 string type: `C` is a PrintableString of two letters,
    /// `EMAIL` an IA5String (ASCII), the others UTF8String.
    fn encode(self, value: &str) -> Result<Any, Unfit> {
        if value.trim().is_empty() {
            return Err(Unfit::Blank);
        }
        if value.chars().any(char::is_control) {
            return Err(Unfit::ControlCharacter);
        }
        if value.chars().count() > self.max_chars() {
            return Err(Unfit::TooLong(self.max_chars()));
        }
        let any = match self {
            Field::Country => {
                if value.len() != 2 || !value.bytes().all(|b| b.is_ascii_alphabetic()) {
                    return Err(Unfit::NotACountry);
                }
                PrintableStringRef::new(value).and_then(|v| Any::encode_from(&v))
            }
            Field::Email => {
                if !value.is_ascii() {
                    return Err(Unfit::NotAscii);
                }
                Ia5StringRef::new(value).and_then(|v| Any::encode_from(&v))
            }
            _ => Utf8StringRef::new(value).and_then(|v| Any::encode_from(&v)),
        };
        any.map_err(|_| Unfit::NotEncodable)
    }
}

/// Why a value cannot be a DN attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfit {
    Blank,
    ControlCharacter,
    TooLong(usize),
    NotACountry,
    NotAscii,
    NotEncodable,
}

impl fmt::Display for Unfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unfit::Blank => f.write_str("is empty"),
            Unfit::ControlCharacter => f.write_str("contains control characters"),
            Unfit::TooLong(max) => write!(f, "is longer than {max} characters"),
            Unfit::NotACountry => f.write_str("is not a two-letter country code"),
            Unfit::NotAscii => f.write_str("is not ASCII"),
            Unfit::NotEncodable => f.write_str("cannot be encoded"),
        }
    }
}

/// A variable of a subject pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Variable {
    /// `${name}`: the user id (`user_name`, `email`, `mail`, `user_uuid`, `sub`).
    Name,
    /// Any other: the first present of its claims.
    Claims(&'static [&'static str]),
    /// A claim by its own name.
    Claim(String),
}

/// The claims `${name}` is read from, in this order (the Cloud Connector's rule for JWTs).
pub const NAME_CLAIMS: [&str; 5] = ["user_name", "email", "mail", "user_uuid", "sub"];

impl Variable {
    fn parse(name: &str) -> Option<Variable> {
        const MAIL: &[&str] = &["mail", "email"];
        const DISPLAY_NAME: &[&str] = &["display_name", "name"];
        const LOGIN_NAME: &[&str] = &["login_name", "user_name"];
        Some(match name {
            "name" => Variable::Name,
            "mail" => Variable::Claims(MAIL),
            "display_name" => Variable::Claims(DISPLAY_NAME),
            "login_name" => Variable::Claims(LOGIN_NAME),
            _ if !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b)) =>
            {
                Variable::Claim(name.to_string())
            }
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Variable(Variable),
}

/// A parsed subject pattern: RDNs in the order written (`CN=${name},O=ACME,C=DE`), each a
/// field and a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectPattern {
    rdns: Vec<(Field, Vec<Piece>)>,
}

/// The pattern of a destination without one.
pub const DEFAULT_PATTERN: &str = "CN=${name}";

/// Why no subject could be made for a user; maps to 401 (never names the value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubjectError {
    /// A variable's claims are all absent.
    Missing { variable: String },
    /// A variable's claim is not a string.
    NotAString { variable: String },
    /// The filled-in value of a field cannot be put in a DN.
    Unfit { field: &'static str, why: Unfit },
}

impl fmt::Display for SubjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the user's certificate subject cannot be made: ")?;
        match self {
            SubjectError::Missing { variable } => write!(f, "${{{variable}}} has no claim"),
            SubjectError::NotAString { variable } => {
                write!(f, "the claim for ${{{variable}}} is not a string")
            }
            SubjectError::Unfit { field, why } => write!(f, "the {field} value {why}"),
        }
    }
}

impl SubjectPattern {
    /// Parses `CN=${name},OU=Users,O=ACME`: comma-separated `FIELD=template`, `\` escapes
    /// the next character of literal text, `${var}` a variable.
    pub fn parse(text: &str) -> Result<SubjectPattern, String> {
        let mut rdns = Vec::new();
        for part in split_unescaped(text, ',') {
            let (label, template) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not FIELD=value"))?;
            let field = Field::parse(label.trim()).ok_or_else(|| {
                format!(
                    "{:?} is not a DN field of the pattern (CN, EMAIL, L, O, OU, ST, C)",
                    label.trim()
                )
            })?;
            let pieces = parse_template(template.trim())?;
            if pieces.is_empty() {
                return Err(format!("{} has no value", field.label()));
            }
            // Literal text must itself fit (a variable-free value is checked whole).
            if let [Piece::Text(text)] = pieces.as_slice() {
                field
                    .encode(text)
                    .map_err(|why| format!("the {} value {why}", field.label()))?;
            }
            rdns.push((field, pieces));
        }
        if rdns.is_empty() {
            return Err("is empty".into());
        }
        Ok(SubjectPattern { rdns })
    }

    /// The subject for the user with `claims`. `name_rule` reads `${name}`.
    pub fn resolve(&self, claims: &Value, name_rule: &UserIdRule) -> Result<Name, SubjectError> {
        let mut rdns = Vec::with_capacity(self.rdns.len());
        // RFC 4514 text lists the last RDN first: written `CN=..,O=..`, encoded O then CN.
        for (field, pieces) in self.rdns.iter().rev() {
            let mut value = String::new();
            for piece in pieces {
                match piece {
                    Piece::Text(text) => value.push_str(text),
                    Piece::Variable(variable) => {
                        value.push_str(&fill(variable, claims, name_rule)?)
                    }
                }
            }
            let any = field.encode(&value).map_err(|why| SubjectError::Unfit {
                field: field.label(),
                why,
            })?;
            let attribute = AttributeTypeAndValue {
                oid: field.oid(),
                value: any,
            };
            let set = SetOfVec::try_from(vec![attribute]).map_err(|_| SubjectError::Unfit {
                field: field.label(),
                why: Unfit::NotEncodable,
            })?;
            rdns.push(RelativeDistinguishedName(set));
        }
        Ok(RdnSequence(rdns))
    }

    /// Whether the pattern reads claims other than the user id.
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.rdns.iter().flat_map(|(_, pieces)| {
            pieces.iter().filter_map(|p| match p {
                Piece::Variable(Variable::Name) => Some("name"),
                Piece::Variable(Variable::Claims(claims)) => Some(claims[0]),
                Piece::Variable(Variable::Claim(claim)) => Some(claim.as_str()),
                Piece::Text(_) => None,
            })
        })
    }
}

/// The value of `variable` for the user.
fn fill(
    variable: &Variable,
    claims: &Value,
    name_rule: &UserIdRule,
) -> Result<String, SubjectError> {
    let named = |candidates: &[&str]| -> Result<String, SubjectError> {
        let label = candidates[0].to_string();
        for claim in candidates {
            match claims.get(*claim) {
                None | Some(Value::Null) => continue,
                Some(Value::String(s)) => return Ok(s.clone()),
                Some(_) => return Err(SubjectError::NotAString { variable: label }),
            }
        }
        Err(SubjectError::Missing { variable: label })
    };
    match variable {
        Variable::Name => identity::user_id(name_rule, claims).map_err(|e| match e {
            identity::UserIdError::NotAString { .. } => SubjectError::NotAString {
                variable: "name".into(),
            },
            identity::UserIdError::Missing { .. } => SubjectError::Missing {
                variable: "name".into(),
            },
            identity::UserIdError::Empty { .. } => SubjectError::Unfit {
                field: "name",
                why: Unfit::Blank,
            },
        }),
        Variable::Claims(candidates) => named(candidates),
        Variable::Claim(claim) => named(&[claim.as_str()]),
    }
}

/// Splits at `separator` where it is not escaped by `\` (escapes are kept for the parts).
fn split_unescaped(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            c if c == separator => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts.into_iter().filter(|p| !p.trim().is_empty()).collect()
}

/// Literal text and `${var}`s; `\x` is a literal `x`.
fn parse_template(template: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(next) => text.push(next),
                None => return Err("ends with a lone \\".into()),
            },
            '$' if chars.peek() == Some(&'{') => {
                chars.next();
                let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                let variable = Variable::parse(&name)
                    .ok_or_else(|| format!("${{{name}}} is not a variable (a claim name)"))?;
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Variable(variable));
            }
            _ => text.push(c),
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use x509_cert::der::Encode;

    fn name_rule() -> UserIdRule {
        UserIdRule::first_claim(&NAME_CLAIMS)
    }

    fn text(name: &Name) -> String {
        name.to_string()
    }

    #[test]
    fn the_default_pattern_names_the_user() {
        let pattern = SubjectPattern::parse(DEFAULT_PATTERN).unwrap();
        let name = pattern
            .resolve(&json!({"user_name": "alice", "sub": "x"}), &name_rule())
            .unwrap();
        assert_eq!(text(&name), "CN=alice");
        let by_sub = pattern
            .resolve(&json!({"sub": "S1"}), &name_rule())
            .unwrap();
        assert_eq!(text(&by_sub), "CN=S1");
        let by_mail = pattern
            .resolve(&json!({"mail": "m@x", "user_uuid": "u"}), &name_rule())
            .unwrap();
        assert_eq!(text(&by_mail), "CN=m@x");
    }

    #[test]
    fn fields_variables_and_order() {
        let pattern = SubjectPattern::parse(
            r"CN=${name}, OU=Users\, external, O=${org}, L=${display_name}, ST=${st}, C=DE",
        )
        .unwrap();
        let claims = json!({"user_name": "alice", "org": "ACME", "name": "Alice A", "st": "BW"});
        let name = pattern.resolve(&claims, &name_rule()).unwrap();
        assert_eq!(
            text(&name),
            r"CN=alice,OU=Users\, external,O=ACME,L=Alice A,ST=BW,C=DE"
        );
        assert_eq!(
            pattern.variables().collect::<Vec<_>>(),
            ["name", "org", "display_name", "st"]
        );
        let email = SubjectPattern::parse("CN=${name},EMAIL=${mail}").unwrap();
        let name = email
            .resolve(&json!({"user_name": "a", "email": "a@x"}), &name_rule())
            .unwrap();
        let atv = name.0[0].0.get(0).unwrap();
        assert_eq!(atv.oid.to_string(), "1.2.840.113549.1.9.1");
        assert_eq!(atv.value.to_der().unwrap(), b"\x16\x03a@x", "an IA5String");
    }

    #[test]
    fn hostile_values_stay_one_value_or_are_refused() {
        let pattern = SubjectPattern::parse(DEFAULT_PATTERN).unwrap();
        let resolve = |user: &str| pattern.resolve(&json!({ "user_name": user }), &name_rule());
        let name = resolve("a,CN=admin+O=x").unwrap();
        assert_eq!(name.0.len(), 1, "one RDN");
        assert_eq!(text(&name), r"CN=a\,CN=admin\+O=x");
        assert!(resolve(&"x".repeat(64)).is_ok());
        assert_eq!(
            resolve(&"x".repeat(65)),
            Err(SubjectError::Unfit {
                field: "CN",
                why: Unfit::TooLong(64)
            })
        );
        assert!(resolve("Ünïcødé 用户").is_ok());
        assert!(matches!(
            resolve("a\u{0}b"),
            Err(SubjectError::Unfit { .. })
        ));
        assert!(matches!(resolve("a\nb"), Err(SubjectError::Unfit { .. })));
        assert!(matches!(resolve("   "), Err(SubjectError::Unfit { .. })));
        let country = SubjectPattern::parse("CN=${name},C=${c}").unwrap();
        let with = |c: &str| country.resolve(&json!({"user_name": "a", "c": c}), &name_rule());
        assert!(with("DE").is_ok());
        assert!(with("DEU").is_err());
        assert!(with("D1").is_err());
        let email = SubjectPattern::parse("EMAIL=${mail}").unwrap();
        assert!(email
            .resolve(&json!({"mail": "ü@x"}), &name_rule())
            .is_err());
        assert_eq!(
            email.resolve(&json!({"user_name": "a"}), &name_rule()),
            Err(SubjectError::Missing {
                variable: "mail".into()
            })
        );
        assert_eq!(
            email.resolve(&json!({"mail": 5}), &name_rule()),
            Err(SubjectError::NotAString {
                variable: "mail".into()
            })
        );
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "",
            "CN",
            "XX=${name}",
            "CN=${}",
            "CN=${a b}",
            "CN=",
            "C=Germany",
            "CN=a\\",
        ] {
            assert!(SubjectPattern::parse(bad).is_err(), "{bad:?}");
        }
        assert!(SubjectPattern::parse("cn=${name},ou=x").is_ok());
    }
}
