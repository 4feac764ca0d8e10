//! Times the host-independent work of a cache hit, step by step: the principal (user id,
//! issuer, origin) from the payload's root claims as Envoy hands them over, the cache key
//! and the stored entry; and, for comparison, what an exchange adds: decoding every claim
//! from Envoy's metadata.
//! Meant for V8 without Envoy (`EXAMPLE=hit_bench node bench/sign_v8.mjs`, after
//! `cargo build --release --target wasm32-wasip1 --example hit_bench`), to see what a hit
//! costs beyond the host calls. Prints the median microseconds per step over 5 rounds.
use principal_propagation::cache::{self, CacheKey, Entry};
use principal_propagation::config::PluginConfig;
use principal_propagation::flow::hot::HotTokens;
use principal_propagation::identity;
use principal_propagation::identity::payload::{claims_from_metadata, root_claims};
use principal_propagation::pairs;
use prost::Message;
use prost_types::{value::Kind, ListValue, Struct, Value};
use std::cell::RefCell;
use std::collections::HashMap;

#[path = "common/clock.rs"]
mod clock;

#[derive(Clone, PartialEq, Message)]
struct Metadata {
    #[prost(map = "string, message", tag = "1")]
    filter_metadata: HashMap<String, Struct>,
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

/// The claims of an XSUAA-like token (about 20).
fn claims() -> Vec<(&'static str, Value)> {
    let mut claims: Vec<(&str, Value)> = vec![
        ("user_name", string("alice.anderson@example.com")),
        ("email", string("alice.anderson@example.com")),
        ("given_name", string("Alice")),
        ("family_name", string("Anderson")),
        ("origin", string("sap.default")),
        ("zid", string("a1b2c3d4-e5f6-7890-abcd-ef1234567890")),
        ("user_uuid", string("0f0e0d0c-0b0a-0908-0706-050403020100")),
        (
            "iss",
            string("https://tenant.authentication.eu10.hana.ondemand.com/oauth/token"),
        ),
        ("client_id", string("sb-app!t123")),
        ("cid", string("sb-app!t123")),
        ("grant_type", string("authorization_code")),
        ("jti", string("5d41402abc4b2a76b9719d911017c592")),
        (
            "exp",
            Value {
                kind: Some(Kind::NumberValue(1_795_327_521.0)),
            },
        ),
        (
            "iat",
            Value {
                kind: Some(Kind::NumberValue(1_795_323_921.0)),
            },
        ),
    ];
    let list = |items: &[&str]| Value {
        kind: Some(Kind::ListValue(ListValue {
            values: items.iter().map(|s| string(s)).collect(),
        })),
    };
    claims.push((
        "scope",
        list(&["openid", "app!t123.Display", "app!t123.Edit"]),
    ));
    claims.push(("aud", list(&["sb-app!t123", "openid", "app!t123"])));
    claims.push(("groups", list(&["Sales", "Managers"])));
    claims
}

/// The payload read as the property `metadata.filter_metadata.<jwt_authn>.payload`, as
/// Envoy 1.40 serializes it: a string as itself, a number as 8 bytes, a list as pairs.
fn payload_property(claims: &[(&str, Value)]) -> Vec<u8> {
    let raw = |value: &Value| match &value.kind {
        Some(Kind::StringValue(s)) => s.as_bytes().to_vec(),
        Some(Kind::NumberValue(n)) => n.to_le_bytes().to_vec(),
        Some(Kind::ListValue(list)) => pairs::serialize(
            &list
                .values
                .iter()
                .map(|v| match &v.kind {
                    Some(Kind::StringValue(s)) => (s.as_bytes(), &b""[..]),
                    _ => (&b""[..], &b""[..]),
                })
                .collect::<Vec<_>>(),
        ),
        _ => Vec::new(),
    };
    let raw: Vec<(&[u8], Vec<u8>)> = claims
        .iter()
        .map(|(name, value)| (name.as_bytes(), raw(value)))
        .collect();
    pairs::serialize(
        &raw.iter()
            .map(|(name, value)| (*name, value.as_slice()))
            .collect::<Vec<_>>(),
    )
}

/// Metadata as `jwt_authn` leaves it.
fn metadata(claims: Vec<(&str, Value)>) -> Vec<u8> {
    let payload = Struct {
        fields: claims
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    };
    let jwt = Struct {
        fields: [(
            "payload".to_string(),
            Value {
                kind: Some(Kind::StructValue(payload)),
            },
        )]
        .into(),
    };
    Metadata {
        filter_metadata: [("envoy.filters.http.jwt_authn".to_string(), jwt)].into(),
    }
    .encode_to_vec()
}

fn main() {
    let config = serde_json::json!({
        "tokenServiceCluster": "ts",
        "keys": {"default": {"privateKey": include_str!("../tests/fixtures/signing-key.pem"),
                             "certificate": include_str!("../tests/fixtures/signing-cert.pem")}},
        "destinations": [{"Name": "d", "Authentication": "OAuth2SAMLBearerAssertion",
                          "tokenServiceURL": "https://ts.example/oauth/token",
                          "audience": "https://ts.example", "assertionIssuer": "gw"}]
    });
    let config = PluginConfig::parse(config.to_string().as_bytes(), &|_| None).expect("config");
    let dest = &config.destinations[0];
    let payload = payload_property(&claims());
    let metadata = metadata(claims());
    let claims = claims_from_metadata(&metadata, &config.jwt_filter_name, &config.jwt_payload_key)
        .expect("claims");
    let principal = identity::principal(&dest.user_id, &claims).expect("principal");
    let quick =
        root_claims(&payload).and_then(|pairs| identity::principal_from_raw(&dest.user_id, &pairs));
    assert_eq!(quick.as_ref(), Some(&principal), "the hit's principal");
    let user = principal.key();
    let key = CacheKey::new(&dest.cache_namespace, &user, config.cache_slots);
    let times = cache::token_times(1_795_323_921_000, 3_600_000, None, key.jitter());
    let entry = Entry::Token {
        access_token: "b".repeat(800),
        times,
    }
    .encode(&key);
    // The worker's copies, with as many other users as it keeps by default.
    let hot = RefCell::new(HotTokens::new(1024));
    for i in 0..1000 {
        let other = format!("user-{i}@example.com");
        let token = "b".repeat(800);
        hot.borrow_mut()
            .put(&dest.cache_namespace, &other, [0; 20], &token, times);
    }
    hot.borrow_mut().put(
        &dest.cache_namespace,
        &user,
        key.id,
        &"b".repeat(800),
        times,
    );
    let now_ms = 1_795_323_921_000;

    type Step<'a> = (&'a str, &'a dyn Fn());
    let steps: [Step; 6] = [
        ("hit: principal, raw claims", &|| {
            let pairs = root_claims(&payload);
            std::hint::black_box(
                pairs.and_then(|p| identity::principal_from_raw(&dest.user_id, &p)),
            );
        }),
        ("hit: the worker's copy   ", &|| {
            let mut hot = hot.borrow_mut();
            std::hint::black_box(
                hot.get(&dest.cache_namespace, &user, now_ms)
                    .map(|(token, _)| token.len()),
            );
        }),
        ("miss: all claims decoded ", &|| {
            std::hint::black_box(claims_from_metadata(
                &metadata,
                &config.jwt_filter_name,
                &config.jwt_payload_key,
            ));
        }),
        ("miss: principal from claims", &|| {
            std::hint::black_box(identity::principal(&dest.user_id, &claims).ok());
        }),
        ("shared: cache key (SHA-256)", &|| {
            std::hint::black_box(CacheKey::new(
                &dest.cache_namespace,
                &user,
                config.cache_slots,
            ));
        }),
        ("shared: entry, 800 B token", &|| {
            std::hint::black_box(Entry::decode(&entry, &key));
        }),
    ];
    const PER_ROUND: usize = 2_000;
    for (name, step) in &steps {
        let mut medians = Vec::new();
        for _ in 0..5 {
            let start = clock::micros();
            for _ in 0..PER_ROUND {
                step();
            }
            medians.push((clock::micros() - start) / PER_ROUND as f64);
        }
        medians.sort_by(f64::total_cmp);
        println!(
            "{name}: {:.2} us (rounds: {:.2}..{:.2})",
            medians[2], medians[0], medians[4]
        );
    }
}
