//! Test helpers shared by the unit tests: a valid configuration built from the fixtures.

use crate::config::PluginConfig;
use serde_json::{json, Value};

pub const KEY: &str = include_str!("../tests/fixtures/signing-key.pem");
pub const CERT: &str = include_str!("../tests/fixtures/signing-cert.pem");

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
