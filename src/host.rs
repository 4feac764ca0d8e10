//! What the core needs from the host, in small pieces: each part of the engine takes only
//! the traits it uses, so its tests need only those. The proxy-wasm layer implements all of
//! them over Envoy (`filter::envoy_host`); unit tests implement them in memory.

use crate::error::Failure;
use crate::metrics::Metric;
use crate::oauth::token_request::TokenRequest;

/// The host's clock.
pub trait Clock {
    /// Nanoseconds since the Unix epoch.
    fn now_ns(&self) -> u64;

    fn now_ms(&self) -> u64 {
        self.now_ns() / 1_000_000
    }
}

/// Cryptographically secure randomness (WASI `random_get` in Envoy).
pub trait Random {
    /// Fills `buf`; false if the host has none to give.
    fn fill_random(&self, buf: &mut [u8]) -> bool;
}

/// The host's shared data: one map for every worker of the VM.
pub trait SharedData {
    /// A value with its compare-and-swap version; `None` if the key does not exist.
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes a value; with `cas`, only if the version is still `cas` (hosts check it only
    /// when the key exists).
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool;
}

/// The host's shared queues: how workers wake themselves and tell each other.
pub trait Queues {
    /// Appends `message` to queue `queue`; false if the host refused.
    fn enqueue(&self, queue: u32, message: &[u8]) -> bool;
}

/// HTTP callouts.
pub trait Callouts {
    /// Starts `request` owned by root context `owner` (its answer comes to that root); the
    /// callout's token, or `None` if the host refused.
    fn dispatch(&self, owner: u32, request: &TokenRequest) -> Option<u32>;
}

/// The requests paused while they wait for an exchange.
pub trait Requests {
    /// Sets `header` to `value` on the paused request and resumes it (the credential: an
    /// `Authorization` or a client certificate header, usable until `usable_until_ms`, 0
    /// if unknown); false if it is gone.
    fn resume(&self, request_id: u32, header: &str, value: &str, usable_until_ms: u64) -> bool;
    /// Answers the paused request locally with `failure`; false if it is gone.
    fn fail(&self, request_id: u32, failure: &Failure) -> bool;
}

/// Log levels the core uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// Logs and metrics (see [`Metric`] for the names).
pub trait Telemetry {
    fn log(&self, level: Level, message: &str);
    /// Adds `amount` to a counter, records a histogram sample or sets a gauge.
    fn record(&self, metric: Metric, amount: u64);
}

/// Everything at once: what the worker hands down to its parts.
pub trait Host: Clock + Random + SharedData + Queues + Callouts + Requests + Telemetry {}

impl<T: Clock + Random + SharedData + Queues + Callouts + Requests + Telemetry + ?Sized> Host
    for T
{
}
