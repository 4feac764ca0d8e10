//! Test helpers shared by the unit tests: a valid configuration built from the fixtures.

use crate::config::PluginConfig;
use serde_json::{json, Value};

pub const KEY: &str = include_str!("../tests/fixtures/signing-key.pem");
pub const CERT: &str = include_str!("../tests/fixtures/signing-cert.pem");

/// A CA for users' client certificates (RSA 2048) and one with a P-256 key.
pub const CA_RSA_KEY: &str = include_str!("../tests/fixtures/ca-rsa-key.pem");
pub const CA_RSA_CERT: &str = include_str!("../tests/fixtures/ca-rsa-cert.pem");
pub const CA_EC_KEY: &str = include_str!("../tests/fixtures/ca-ec-key.pem");
pub const CA_EC_CERT: &str = include_str!("../tests/fixtures/ca-ec-cert.pem");

/// A `PrincipalPropagation` destination signing with key `ca` (see [`with_ca_keys`]).
pub fn certificate_destination_json(name: &str) -> Value {
    json!({
        "Name": name,
        "Type": "HTTP",
        "URL": "https://onprem.example",
        "Authentication": "PrincipalPropagation",
        "ProxyType": "OnPremise",
        "clientCertificateIssuerKey": "ca"
    })
}

/// `config` with the keys `ca` (RSA CA) and `ca-ec` (P-256 CA) added.
pub fn with_ca_keys(mut config: Value) -> Value {
    config["keys"]["ca"] = json!({"privateKey": CA_RSA_KEY, "certificate": CA_RSA_CERT});
    config["keys"]["ca-ec"] = json!({"privateKey": CA_EC_KEY, "certificate": CA_EC_CERT});
    config
}

/// A destination that passes validation.
pub fn destination_json(name: &str) -> Value {
    json!({
        "Name": name,
        "Type": "HTTP",
        "URL": "https://backend.example",
        "Authentication": "OAuth2SAMLBearerAssertion",
        "tokenServiceURL": "http://127.0.0.1:9100/oauth/token",
        "tokenServiceUser": "gateway-client",
        "tokenServicePassword": "gateway-secret",
        "audience": "dev-token-server",
        "assertionIssuer": "principal-propagation-gateway"
    })
}

/// A whole plugin configuration with the test key and the given destinations.
pub fn config_json(destinations: Vec<Value>) -> Value {
    json!({
        "allowInsecureTokenService": true,
        "tokenServiceCluster": "token_service",
        "keys": {"default": {"privateKey": KEY, "certificate": CERT}},
        "destinations": destinations
    })
}

pub fn no_env(_: &str) -> Option<String> {
    None
}

pub fn parse(config: &Value) -> Result<PluginConfig, crate::config::ConfigError> {
    PluginConfig::parse(config.to_string().as_bytes(), &no_env)
}

/// Shared data and a clock, in memory (what the coordination code needs); randomness
/// only when `random_works`.
#[derive(Default)]
pub struct MemoryHost {
    pub shared: MemoryShared,
    pub now_ms: std::cell::Cell<u64>,
    pub random_works: bool,
}

impl crate::host::SharedData for MemoryHost {
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.shared.shared_get(key)
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        self.shared.shared_set(key, value, cas)
    }
}

impl crate::host::Clock for MemoryHost {
    fn now_ns(&self) -> u64 {
        self.now_ms.get() * 1_000_000
    }
}

impl crate::host::Random for MemoryHost {
    fn fill_random(&self, buf: &mut [u8]) -> bool {
        buf.fill(0xa5);
        self.random_works
    }
}

/// Shared data as Envoy keeps it, in memory: compare-and-swap checked only for keys that
/// exist, and an empty value read back as no value (the SDK cannot tell them apart).
#[derive(Default)]
pub struct MemoryShared {
    pub map: std::cell::RefCell<std::collections::HashMap<String, (Vec<u8>, u32)>>,
    pub reads: std::cell::Cell<u32>,
}

impl crate::host::SharedData for MemoryShared {
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.reads.set(self.reads.get() + 1);
        self.map
            .borrow()
            .get(key)
            .filter(|(value, _)| !value.is_empty())
            .cloned()
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        let mut map = self.map.borrow_mut();
        let version = map.get(key).map_or(0, |(_, v)| *v);
        if cas.is_some_and(|c| map.contains_key(key) && c != version) {
            return false;
        }
        map.insert(key.into(), (value.to_vec(), version + 1));
        true
    }
}
