//! The per-worker request flow, independent of proxy-wasm.
//!
//! A request either finds a reusable token in shared data and goes on at once, or waits
//! while one exchange per user and destination runs on this worker: the first request
//! queues the exchange, later ones join it, and all are resumed (or answered) together
//! when the token service answers. Exchanges are started from a worker-level callback
//! ([`Worker::on_wake`]), never from a request's own context, so a client that goes away
//! cannot cancel an exchange other requests wait for.

use crate::cache::{self, Entry};
use crate::config::{Destination, PluginConfig};
use crate::error::Failure;
use crate::exchange::{self, assertion_id};
use crate::identity::{self, attributes};
use crate::oauth::token_request::TokenRequest;
use crate::oauth::token_response;
use crate::saml::assertion::Attribute;
use crate::saml::canonical::is_xml_text;
use serde_json::Value;
use std::collections::HashMap;
use std::rc::Rc;

/// Everything the flow needs from the host. The proxy-wasm layer implements it over
/// Envoy; tests implement it in memory.
pub trait Host {
    /// Host clock, nanoseconds since the Unix epoch.
    fn now_ns(&self) -> u64;
    /// Fills `buf` with cryptographically secure random bytes; false if unavailable.
    fn fill_random(&self, buf: &mut [u8]) -> bool;
    fn shared_get(&self, key: &str) -> Option<Vec<u8>>;
    fn shared_set(&self, key: &str, value: &[u8]);
    /// Starts the callout; returns its token, or `None` if the host refused it.
    fn dispatch(&self, request: &TokenRequest) -> Option<u32>;
    /// Asks for [`Worker::on_wake`] to be called soon from a worker-level callback;
    /// false if the host cannot.
    fn wake(&self) -> bool;
    /// Adds `authorization` to the paused request and resumes it; false if it is gone.
    fn resume(&self, request_id: u32, authorization: &str) -> bool;
    /// Answers the paused request locally with `failure`; false if it is gone.
    fn fail(&self, request_id: u32, failure: &Failure) -> bool;
    fn log(&self, level: Level, message: &str);
    fn count(&self, metric: Metric, amount: u64);
}

/// Log levels the flow uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// Counters and histograms the flow reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    CacheHit,
    CacheMiss,
    ExchangeOk,
    ExchangeRejected,
    ExchangeFailed,
    /// Microseconds spent building and signing one assertion.
    SigningMicros,
}

/// What to do with a request right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward with this `Authorization` value.
    Forward(String),
    /// Pause; the worker resumes or answers the request later.
    Wait,
    /// Answer locally.
    Fail(Failure),
}

/// An exchange this worker owes its waiting requests.
struct Pending {
    config: Rc<PluginConfig>,
    destination: usize,
    user_id: String,
    attributes: Vec<Attribute>,
    waiters: Vec<u32>,
}

/// Per-worker state: the configuration and the exchanges in flight.
pub struct Worker {
    config: Rc<PluginConfig>,
    pending: HashMap<String, Pending>,
    /// Cache keys whose exchange waits for [`Worker::on_wake`].
    queued: Vec<String>,
    /// Callout token → cache key.
    callouts: HashMap<u32, String>,
}

impl Worker {
    pub fn new(config: Rc<PluginConfig>) -> Self {
        Worker {
            config,
            pending: HashMap::new(),
            queued: Vec::new(),
            callouts: HashMap::new(),
        }
    }

    pub fn config(&self) -> &Rc<PluginConfig> {
        &self.config
    }

    /// Uses `config` for new requests; exchanges in flight finish under the one they
    /// started with.
    pub fn reconfigure(&mut self, config: Rc<PluginConfig>) {
        self.config = config;
    }

    /// Number of exchanges started or queued and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Decides a request for destination index `destination` with the verified
    /// `claims` (`None`: no authenticated user).
    pub fn on_request(
        &mut self,
        host: &dyn Host,
        request_id: u32,
        destination: usize,
        claims: Option<&Value>,
    ) -> Decision {
        let Some(dest) = self.config.destinations.get(destination) else {
            return Decision::Fail(Failure::Internal {
                reason: "unknown destination",
            });
        };
        let Some(claims) = claims else {
            return Decision::Fail(Failure::NotAuthenticated);
        };
        let user_id = match identity::user_id(&dest.user_id, claims) {
            Ok(user_id) => user_id,
            Err(e) => return Decision::Fail(Failure::UserId(e)),
        };
        if !is_xml_text(&user_id) {
            return Decision::Fail(Failure::UserIdNotXml);
        }
        let key = cache::cache_key(&dest.cache_namespace, &user_id);
        let now_ms = host.now_ns() / 1_000_000;
        match host
            .shared_get(&key)
            .and_then(|b| Entry::decode(&b))
            .and_then(|e| e.live_at(now_ms))
        {
            Some(Entry::Token { access_token, .. }) => {
                host.count(Metric::CacheHit, 1);
                return Decision::Forward(bearer(&access_token));
            }
            Some(Entry::Rejected { code, .. }) => {
                return Decision::Fail(Failure::Rejected { code })
            }
            None => host.count(Metric::CacheMiss, 1),
        }
        if let Some(pending) = self.pending.get_mut(&key) {
            pending.waiters.push(request_id);
            return Decision::Wait;
        }
        let attributes = attributes::from_claims(
            claims,
            dest.skip_user_attributes_prefix,
            dest.skip_user_uuid,
        )
        .into_iter()
        .filter(|a| is_xml_text(&a.name) && a.values.iter().all(|v| is_xml_text(v)))
        .collect();
        self.pending.insert(
            key.clone(),
            Pending {
                config: Rc::clone(&self.config),
                destination,
                user_id,
                attributes,
                waiters: vec![request_id],
            },
        );
        if self.queued.is_empty() && !host.wake() {
            self.pending.remove(&key);
            return Decision::Fail(Failure::Internal {
                reason: "cannot schedule the token exchange",
            });
        }
        self.queued.push(key);
        Decision::Wait
    }

    /// A request went away (client closed, stream reset): it no longer waits.
    pub fn forget_request(&mut self, request_id: u32) {
        for pending in self.pending.values_mut() {
            pending.waiters.retain(|&id| id != request_id);
        }
    }

    /// Starts every queued exchange: a fresh assertion ID, sign, dispatch.
    pub fn on_wake(&mut self, host: &dyn Host) {
        for key in std::mem::take(&mut self.queued) {
            match self.start_exchange(host, &key) {
                Ok(callout) => {
                    self.callouts.insert(callout, key);
                }
                Err(failure) => self.settle(host, &key, Err(failure)),
            }
        }
    }

    fn start_exchange(&self, host: &dyn Host, key: &str) -> Result<u32, Failure> {
        let pending = self.pending.get(key).ok_or(Failure::Internal {
            reason: "lost exchange",
        })?;
        let config = &pending.config;
        let dest = config
            .destinations
            .get(pending.destination)
            .ok_or(Failure::Internal {
                reason: "unknown destination",
            })?;
        let mut random = [0u8; 16];
        if !host.fill_random(&mut random) {
            return Err(Failure::Internal {
                reason: "no randomness for the assertion ID",
            });
        }
        let started_ns = host.now_ns();
        let request = exchange::token_request(
            config,
            dest,
            &pending.user_id,
            &pending.attributes,
            started_ns / 1_000_000,
            &assertion_id(&random),
        )
        .map_err(|e| {
            host.log(
                Level::Error,
                &format!("destination {}: cannot build assertion: {e:?}", dest.name),
            );
            Failure::Internal {
                reason: "cannot build the SAML assertion",
            }
        })?;
        host.count(
            Metric::SigningMicros,
            host.now_ns().saturating_sub(started_ns) / 1000,
        );
        host.dispatch(&request).ok_or_else(|| {
            host.log(
                Level::Error,
                &format!(
                    "destination {}: callout to cluster {:?} refused by the host (is the cluster defined?)",
                    dest.name, request.cluster
                ),
            );
            Failure::Unavailable { reason: "token service cluster not available" }
        })
    }

    /// The token service answered callout `callout` (`status` `None`: no response).
    pub fn on_token_response(
        &mut self,
        host: &dyn Host,
        callout: u32,
        status: Option<u16>,
        body: &[u8],
    ) {
        let Some(key) = self.callouts.remove(&callout) else {
            return;
        };
        let outcome = token_response::parse(status, body);
        self.settle(host, &key, outcome);
    }

    /// Caches the outcome of an exchange and releases every request waiting for it.
    fn settle(
        &mut self,
        host: &dyn Host,
        key: &str,
        outcome: Result<token_response::IssuedToken, Failure>,
    ) {
        let Some(pending) = self.pending.remove(key) else {
            return;
        };
        let config = Rc::clone(&pending.config);
        let dest_name = config
            .destinations
            .get(pending.destination)
            .map_or("?", |d: &Destination| d.name.as_str());
        let now_ms = host.now_ns() / 1_000_000;
        match outcome {
            Ok(token) => {
                host.count(Metric::ExchangeOk, 1);
                let reuse_until_ms =
                    cache::reuse_until(now_ms, token.expires_in_s * 1000, config.token_margin_ms);
                if reuse_until_ms > now_ms {
                    let entry = Entry::Token {
                        access_token: token.access_token.clone(),
                        reuse_until_ms,
                    };
                    host.shared_set(key, &entry.encode());
                }
                let authorization = bearer(&token.access_token);
                for id in pending.waiters {
                    host.resume(id, &authorization);
                }
            }
            Err(failure) => {
                if let Failure::Rejected { code } = &failure {
                    host.count(Metric::ExchangeRejected, 1);
                    host.log(
                        Level::Warn,
                        &format!("destination {dest_name}: token service rejected the assertion for user {:?}: {code}", pending.user_id),
                    );
                    if config.failure_hold_ms > 0 {
                        let entry = Entry::Rejected {
                            code: code.clone(),
                            until_ms: now_ms + config.failure_hold_ms,
                        };
                        host.shared_set(key, &entry.encode());
                    }
                } else {
                    host.count(Metric::ExchangeFailed, 1);
                    host.log(
                        Level::Warn,
                        &format!("destination {dest_name}: token exchange failed: {failure:?}"),
                    );
                }
                for id in pending.waiters {
                    host.fail(id, &failure);
                }
            }
        }
    }
}

fn bearer(access_token: &str) -> String {
    format!("Bearer {access_token}")
}

#[cfg(test)]
mod tests;
