//! SAML attributes from the user's claims, following SAP's destination service rules.
//!
//! XSUAA-style root claims go in as they are; `user_attributes.<k>` entries become
//! `user_attributes.<k>` (or `<k>` with `skipUserAttributesPrefixInSAMLAttributes`);
//! SAML groups become `Groups`; `user_uuid` is added unless
//! `skipUserUuidInSAMLAttributes`. Values that are not strings (or lists of strings) are
//! left out rather than guessed at.
//!
//! Every attribute name appears once. With the prefix skipped, a user attribute could
//! otherwise add a second `Groups` (roles) or `email` (user mapping) next to the ones the
//! identity provider sets, and users can often edit their own custom attributes: a user
//! attribute named like an attribute the gateway writes from the root claims
//! ([`GATEWAY_NAMES`], in any letter case) is left out, whether that root claim is
//! present or not.

use crate::saml::assertion::Attribute;
use serde_json::Value;

/// Root claims copied as attributes of the same name.
const ROOT_CLAIMS: [&str; 5] = ["email", "given_name", "family_name", "origin", "zid"];

/// Names of the attributes the gateway writes from root claims; a user attribute never
/// takes one of them.
pub const GATEWAY_NAMES: [&str; 7] = [
    "email",
    "given_name",
    "family_name",
    "origin",
    "zid",
    "user_uuid",
    "Groups",
];

/// Builds the AttributeStatement's attributes from `claims`.
pub fn from_claims(claims: &Value, skip_prefix: bool, skip_user_uuid: bool) -> Vec<Attribute> {
    let mut attributes = Vec::new();
    for name in ROOT_CLAIMS {
        push(&mut attributes, name.to_string(), claims.get(name));
    }
    if !skip_user_uuid {
        push(&mut attributes, "user_uuid".into(), claims.get("user_uuid"));
    }
    let mut groups = strings(
        claims
            .get("xs.system.attributes")
            .and_then(|a| a.get("xs.saml.groups")),
    );
    if let Some(Value::Object(user_attributes)) = claims.get("user_attributes") {
        for (name, value) in user_attributes {
            if name == "xs.saml.groups" {
                groups.extend(strings(Some(value)));
                continue;
            }
            let name = if skip_prefix {
                if GATEWAY_NAMES.iter().any(|g| g.eq_ignore_ascii_case(name)) {
                    continue;
                }
                name.clone()
            } else {
                format!("user_attributes.{name}")
            };
            push(&mut attributes, name, Some(value));
        }
    }
    if !groups.is_empty() {
        attributes.push(Attribute {
            name: "Groups".into(),
            values: groups,
        });
    }
    attributes
}

fn push(attributes: &mut Vec<Attribute>, name: String, value: Option<&Value>) {
    let values = strings(value);
    if !values.is_empty() {
        attributes.push(Attribute { name, values });
    }
}

/// A string, or the strings of a list; anything else yields nothing.
fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(a: &[Attribute]) -> Vec<&str> {
        a.iter().map(|x| x.name.as_str()).collect()
    }

    #[test]
    fn maps_claims_like_sap() {
        let claims = json!({
            "email": "a@x", "user_uuid": "u-1", "n": 1,
            "user_attributes": {"dept": ["D1", "D2"], "xs.saml.groups": ["g2"], "bad": [1]},
            "xs.system.attributes": {"xs.saml.groups": ["g1"]}
        });
        let a = from_claims(&claims, false, false);
        assert_eq!(
            names(&a),
            ["email", "user_uuid", "user_attributes.dept", "Groups"]
        );
        assert_eq!(a[2].values, ["D1", "D2"]);
        assert_eq!(a[3].values, ["g1", "g2"]);
        let b = from_claims(&claims, true, true);
        assert_eq!(names(&b), ["email", "dept", "Groups"]);
        assert!(from_claims(&json!({"sub": "x"}), false, false).is_empty());
    }

    #[test]
    fn a_user_attribute_never_doubles_an_attribute_the_gateway_writes() {
        let claims = json!({
            "email": "alice@idp",
            "user_attributes": {
                "email": ["boss@corp"], "Groups": ["Admin"], "groups": ["Admin"],
                "ORIGIN": ["other-idp"], "user_uuid": ["u-boss"], "zid": ["t"], "dept": ["D1"]
            },
            "xs.system.attributes": {"xs.saml.groups": ["Staff"]}
        });
        let a = from_claims(&claims, true, false);
        assert_eq!(names(&a), ["email", "dept", "Groups"]);
        assert_eq!(a[0].values, ["alice@idp"], "the root claim's value");
        assert_eq!(a[2].values, ["Staff"], "the IdP's groups only");
        let mut unique = names(&a);
        unique.dedup();
        assert_eq!(unique.len(), a.len());
        // With SAP's prefix the names cannot meet: every user attribute is kept.
        let prefixed = from_claims(&claims, false, true);
        assert_eq!(prefixed.len(), 9);
    }
}
