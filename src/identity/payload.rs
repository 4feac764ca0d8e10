//! The verified JWT payload as Envoy hands it over.
//!
//! `jwt_authn` with `payload_in_metadata` stores the payload in the request's dynamic
//! metadata. Read as the property `metadata`, the whole `envoy.config.core.v3.Metadata`
//! arrives as protobuf, with every claim's JSON type intact. (Deeper property paths
//! come back in a flattened encoding where an 8-byte string and a number look alike.)
//! Decoding it here gives the plugin the claims exactly as the token carried them.
//!
//! A cache hit needs only who the user is (the user id, the issuer, the origin), and
//! decoding every claim costs more than the rest of the hit. [`root_claims`] reads the
//! payload as Envoy hands over the property `metadata.filter_metadata.<filter>.<key>`
//! instead: its root claims as raw bytes, whose type is lost, so
//! [`string_claim_from_property`] takes a value only where it cannot be anything but a
//! string.

use crate::saml::canonical::is_xml_text;
use prost::Message;
use prost_types::value::Kind;
use serde_json::{Map, Number, Value};
use std::collections::HashMap;

/// The part of `envoy.config.core.v3.Metadata` the plugin reads.
#[derive(Clone, PartialEq, Message)]
struct Metadata {
    #[prost(map = "string, message", tag = "1")]
    filter_metadata: HashMap<String, prost_types::Struct>,
}

/// The JSON object stored by filter `filter` under `key` in serialized dynamic metadata.
pub fn claims_from_metadata(metadata: &[u8], filter: &str, key: &str) -> Option<Value> {
    let metadata = Metadata::decode(metadata).ok()?;
    let value = metadata.filter_metadata.get(filter)?.fields.get(key)?;
    match &value.kind {
        Some(Kind::StructValue(payload)) => Some(struct_to_json(payload, 0)),
        _ => None,
    }
}

/// One claim read as the property `metadata.filter_metadata.<filter>.<key>.<claim...>`,
/// if it is certainly a string that can name a user; `None`: unknown, read the claims.
///
/// Envoy hands a leaf over as its raw bytes, whatever its type: a string as itself, a
/// number as the 8 bytes of a double, a boolean as 1 byte, `null` as an error, an object
/// or a list in a binary form full of bytes that XML forbids (Envoy 1.40: a 32-bit count
/// and 32-bit lengths, then NUL-terminated items; older releases: protobuf, whose tag
/// bytes are below 0x20). So a value is taken only if it is XML text, not blank, and
/// neither 1 nor 8 bytes long: nothing but a string looks like that. Everything refused
/// here goes the exact way (the decoded claims), which also names the error.
pub fn string_claim_from_property(bytes: &[u8]) -> Option<String> {
    if matches!(bytes.len(), 1 | 8) {
        return None;
    }
    let value = std::str::from_utf8(bytes).ok()?;
    (!value.trim().is_empty() && is_xml_text(value)).then(|| value.to_string())
}

/// The root claims of the payload read as the property
/// `metadata.filter_metadata.<filter>.<key>`, as `(name, raw value)`: Envoy 1.40 sends a
/// map in its pairs form (a 32-bit count, the 32-bit lengths of each name and value, then
/// each name and value followed by a NUL), each value serialized on its own (a string as
/// itself, a number as 8 bytes, a map or list as pairs again). `None` unless the bytes are
/// exactly that (older releases send protobuf): the caller then decodes the metadata.
pub fn root_claims(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    if bytes.is_empty() {
        return None; // not even a count: not a payload
    }
    crate::pairs::parse(bytes)
}

/// What the raw root claims tell of one claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawClaim {
    /// Not in the payload.
    Absent,
    /// Certainly this string (see [`string_claim_from_property`]).
    String(String),
    /// Present, but its type cannot be told from the raw bytes: decode the claims.
    Unknown,
}

/// Claim `name` among the raw root claims.
pub fn raw_claim(pairs: &[(&[u8], &[u8])], name: &str) -> RawClaim {
    match pairs.iter().rev().find(|(n, _)| *n == name.as_bytes()) {
        None => RawClaim::Absent,
        Some((_, value)) => match string_claim_from_property(value) {
            Some(s) => RawClaim::String(s),
            None => RawClaim::Unknown,
        },
    }
}

/// Claims nested deeper than this are dropped (protects the stack on hostile input).
const MAX_DEPTH: usize = 32;

fn struct_to_json(s: &prost_types::Struct, depth: usize) -> Value {
    let mut map = Map::new();
    for (key, value) in &s.fields {
        map.insert(key.clone(), value_to_json(value, depth + 1));
    }
    Value::Object(map)
}

fn value_to_json(value: &prost_types::Value, depth: usize) -> Value {
    if depth > MAX_DEPTH {
        return Value::Null;
    }
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => Number::from_f64(*n).map_or(Value::Null, json_number),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StructValue(s)) => struct_to_json(s, depth),
        Some(Kind::ListValue(list)) => Value::Array(
            list.values
                .iter()
                .map(|v| value_to_json(v, depth + 1))
                .collect(),
        ),
    }
}

/// Whole numbers (as JSON had them, e.g. `exp`) stay integers.
fn json_number(n: Number) -> Value {
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
        _ => Value::Number(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::{ListValue, Struct, Value as PValue};
    use std::collections::BTreeMap;

    fn v(kind: Kind) -> PValue {
        PValue { kind: Some(kind) }
    }

    #[test]
    fn decodes_the_jwt_payload_from_envoy_metadata() {
        let mut inner = BTreeMap::new();
        inner.insert("id".to_string(), v(Kind::StringValue("A1".into())));
        let mut fields = BTreeMap::new();
        fields.insert(
            "user_name".to_string(),
            v(Kind::StringValue("alice".into())),
        );
        fields.insert("exp".to_string(), v(Kind::NumberValue(1.7e9)));
        fields.insert("ok".to_string(), v(Kind::BoolValue(true)));
        fields.insert(
            "ext".to_string(),
            v(Kind::StructValue(Struct { fields: inner })),
        );
        fields.insert(
            "groups".to_string(),
            v(Kind::ListValue(ListValue {
                values: vec![v(Kind::StringValue("g".into())), v(Kind::NullValue(0))],
            })),
        );
        let mut jwt = BTreeMap::new();
        jwt.insert(
            "payload".to_string(),
            v(Kind::StructValue(Struct { fields })),
        );
        let mut filter_metadata = HashMap::new();
        filter_metadata.insert(
            "envoy.filters.http.jwt_authn".to_string(),
            Struct { fields: jwt },
        );
        let bytes = Metadata { filter_metadata }.encode_to_vec();
        let claims =
            claims_from_metadata(&bytes, "envoy.filters.http.jwt_authn", "payload").unwrap();
        assert_eq!(
            claims,
            serde_json::json!({"user_name": "alice", "exp": 1_700_000_000, "ok": true,
                               "ext": {"id": "A1"}, "groups": ["g", null]})
        );
        assert!(claims_from_metadata(&bytes, "other", "payload").is_none());
        assert!(claims_from_metadata(&bytes, "envoy.filters.http.jwt_authn", "x").is_none());
        assert!(claims_from_metadata(&[0xff, 0xff, 0xff], "a", "b").is_none());
    }

    /// The payload as Envoy 1.40 handed it over (seen in the demo, for
    /// `{"g": ["a","b"], "n": 5, "iss": "http://127.0.0.1:9000", "exp": …, "iat": …,
    /// "origin": "sap.default", "aud": …, "sub": "alice", "user_name": "alice"}`).
    #[test]
    fn reads_the_root_claims_in_envoys_pairs_form() {
        let hex = "09000000010000001a0000000100000008000000030000001500000003000000080000000300000008000000060000000b000000030000001a0000000300000005000000090000000500000067000200000001000000000000000100000000000000610000620000006e0000000000000014400069737300687474703a2f2f3132372e302e302e313a3930303000657870000000002957c5da410069617400000000a553c5da41006f726967696e007361702e64656661756c7400617564007072696e636970616c2d70726f7061676174696f6e2d64656d6f0073756200616c69636500757365725f6e616d6500616c69636500";
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let pairs = root_claims(&bytes).unwrap();
        assert_eq!(pairs.len(), 9);
        let claim = |name| raw_claim(&pairs, name);
        assert_eq!(claim("user_name"), RawClaim::String("alice".into()));
        assert_eq!(
            claim("iss"),
            RawClaim::String("http://127.0.0.1:9000".into())
        );
        assert_eq!(claim("origin"), RawClaim::String("sap.default".into()));
        assert_eq!(claim("n"), RawClaim::Unknown, "a number");
        assert_eq!(claim("g"), RawClaim::Unknown, "a list");
        assert_eq!(claim("email"), RawClaim::Absent);
        // Anything but exactly that form is refused (then the metadata is decoded).
        for cut in 0..bytes.len() {
            assert!(root_claims(&bytes[..cut]).is_none(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(root_claims(&longer).is_none());
        assert!(root_claims(&[0xff, 0xff, 0xff, 0xff]).is_none());
        let object = Struct {
            fields: [("sub".to_string(), v(Kind::StringValue("alice".into())))].into(),
        };
        assert!(root_claims(&object.encode_to_vec()).is_none(), "protobuf");
        assert_eq!(root_claims(&[0, 0, 0, 0]), Some(vec![]));
    }

    /// What Envoy's property serializer makes of each JSON type (see
    /// `string_claim_from_property`): only real strings come through.
    #[test]
    fn takes_a_property_as_a_claim_only_when_it_is_certainly_a_string() {
        let take = string_claim_from_property;
        assert_eq!(take(b"alice").as_deref(), Some("alice"));
        assert_eq!(take("ä.b@x".as_bytes()).as_deref(), Some("ä.b@x"));
        // A number: 8 bytes, here ones that read as "bobsmith".
        let number = f64::from_le_bytes(*b"bobsmith");
        assert_eq!(take(&number.to_le_bytes()), None);
        assert_eq!(take(b"P0001234"), None, "8-byte strings go the exact way");
        assert_eq!(take(&[1]), None, "a boolean");
        assert_eq!(take(b"x"), None);
        assert_eq!(take(b""), None);
        assert_eq!(take(b"  \t "), None, "blank");
        assert_eq!(take(b"a\x01b"), None, "not XML text");
        assert_eq!(take(&[0xc3, 0x28, 0x41]), None, "not UTF-8");
        // Objects and lists as Envoy 1.40 sends them (seen: `["alice"]`, `{"name":"alice"}`).
        assert_eq!(take(b"\x01\0\0\0\x05\0\0\0\0\0\0\0alice\0\0"), None);
        assert_eq!(take(b"\x01\0\0\0\x04\0\0\0\x05\0\0\0name\0alice\0"), None);
        assert_eq!(take(&[0; 4]), None, "empty");
        // As older releases send them: protobuf `Struct` and `ListValue`.
        let object = Struct {
            fields: [("name".to_string(), v(Kind::StringValue("alice".repeat(9))))].into(),
        };
        assert_eq!(take(&object.encode_to_vec()), None);
        for value in [
            Kind::StringValue("alice".repeat(9)),
            Kind::NumberValue(f64::from_le_bytes(*b"alicealc")),
            Kind::BoolValue(false),
            Kind::NullValue(0),
            Kind::StructValue(Struct::default()),
            Kind::ListValue(ListValue::default()),
            Kind::StructValue(object.clone()),
        ] {
            let list = ListValue {
                values: vec![v(value.clone())],
            };
            assert_eq!(take(&list.encode_to_vec()), None, "{value:?}");
        }
    }
}
