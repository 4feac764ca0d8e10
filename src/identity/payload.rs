//! The verified JWT payload as Envoy hands it over.
//!
//! `jwt_authn` with `payload_in_metadata` stores the payload in the request's dynamic
//! metadata. Read as the property `metadata`, the whole `envoy.config.core.v3.Metadata`
//! arrives as protobuf, with every claim's JSON type intact. (Deeper property paths
//! come back in a flattened encoding where an 8-byte string and a number look alike.)
//! Decoding it here gives the plugin the claims exactly as the token carried them.

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
}
