//! principal-propagation: propagates the authenticated user to OAuth-protected backends
//! through a signed SAML 2.0 bearer assertion (RFC 7522), inside Envoy or Istio.
//!
//! Everything except [`filter`] is host-independent: it takes time, randomness and host
//! data as inputs, builds natively and for `wasm32-unknown-unknown` (tested under Node).

pub mod cache;
pub mod config;
pub mod coordination;
pub mod credentials;
pub mod destination_api;
pub mod error;
#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
pub mod filter;
pub mod flow;
pub mod forwarding;
pub mod host;
pub mod http_url;
pub mod identity;
pub mod keys;
pub mod metrics;
pub mod oauth;
pub mod pairs;
pub mod saml;
pub mod selection;
#[cfg(test)]
mod testing;
pub mod time;
pub mod trust;
pub mod x509;
