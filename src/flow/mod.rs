//! The request flow, independent of proxy-wasm.
//!
//! A request either finds a reusable token in shared data and goes on at once, or waits
//! while one exchange per user and destination runs for the whole Envoy:
//!
//! - On a worker, the first request queues the exchange and later ones join it.
//! - Across workers, an exchange lock in shared data (taken with compare-and-swap)
//!   lets one worker exchange; the others wait for its result.
//! - The worker that exchanged stores the result in shared data, releases the lock and
//!   notifies every worker through its queue; each resumes (or answers) its waiters.
//!   A periodic check ([`Worker::on_tick`]) covers a lost notice or a vanished holder.
//!
//! Exchanges start from a worker-level callback ([`Worker::on_wake`]), never from a
//! request's own context, so a client that goes away cannot cancel an exchange other
//! requests wait for. The assertion is signed in slices of a quarter millisecond
//! ([`Worker::on_slice`], from the host's millisecond tick), so that the milliseconds
//! an RSA signature takes in Wasm do not hold up the worker's cache hits meanwhile. Tokens are refreshed in the background shortly before they
//! stop being reused, so steady users never wait.

use crate::cache::{self, CacheKey, Entry};
use crate::config::PluginConfig;
use crate::error::Failure;
use crate::exchange::{self, assertion_id, BuildError};
use crate::identity::{self, attributes, Identity, UserIdRule};
use crate::keys::SignError;
use crate::oauth::token_request;
use crate::oauth::token_request::TokenRequest;
use crate::oauth::token_response;
use crate::saml::assertion::Attribute;
use crate::saml::canonical::is_xml_text;
use crate::saml::signature::EnvelopedSigning;
use serde_json::Value;
use std::collections::HashMap;
use std::rc::Rc;

/// How long a transport failure (unreachable, garbage, timeout) is answered from
/// shared data before the next request tries again. Short, so that service resumes
/// within a second of the token service healing (this plus one exchange); long enough
/// that a failing token service sees at most two exchanges a second per user and
/// destination, however many requests arrive (they share one exchange anyway).
pub const FAILURE_BACKOFF_MS: u64 = 500;
/// A callout that ends without a response after this share of its timeout (percent) is
/// taken for a timeout: Envoy resets a callout whose response headers arrived but whose
/// body was still trickling in when the timeout hit, and reports no status. Envoy arms
/// the timer from its event loop's cached clock, so it fires some tens of milliseconds
/// before the timeout as measured here (seen: 970–991 ms of 1000).
const TIMEOUT_SHARE_PERCENT: u64 = 90;
/// Extra time on top of the callout timeout before a lock is presumed abandoned.
const LOCK_GRACE_MS: u64 = 2_000;
/// How a worker signs (RSA: milliseconds of CPU in Wasm) without holding up the cache
/// hits it serves meanwhile. Three sources of signing time:
///
/// - The tick: a slice of [`SIGNING_SLICE_US`] every millisecond, oldest signature first.
///   A hit arriving meanwhile waits for one slice at most. That gives signing a fifth of
///   a worker: 40 to 60 RSA-2048 signatures a second.
/// - The worker's requests: while a signature is under way, each request does one step
///   of it (20–40 µs, [`WINDOWS_PER_CLOCK_READ`]) before its own work. A busy worker
///   has many requests, so a little from each finishes a signature in tens of
///   milliseconds without holding any of them up for long.
/// - Larger slices when nobody waits: [`IDLE_SIGNING_SLICES`] when no request came since
///   the last slice, and one more slice per [`SIGNING_WAIT_STEP_MS`] that the oldest
///   signature has waited (up to [`MAX_SIGNING_SLICES`]), so that a wave of new users is
///   still signed, at the price of longer holds for the hits meanwhile.
pub const SIGNING_SLICE_US: u64 = 250;
const IDLE_SIGNING_SLICES: u64 = 4;
const SIGNING_WAIT_STEP_MS: u64 = 250;
const MAX_SIGNING_SLICES: u64 = 8;
/// Signing units (see [`crate::keys::Signing::advance`], 5–10 µs each for RSA-2048
/// in V8) between two looks at the clock, and per request that helps.
const WINDOWS_PER_CLOCK_READ: usize = 4;

/// Everything the flow needs from the host. The proxy-wasm layer implements it over
/// Envoy; tests implement it in memory.
pub trait Host {
    /// Host clock, nanoseconds since the Unix epoch.
    fn now_ns(&self) -> u64;
    /// Fills `buf` with cryptographically secure random bytes; false if unavailable.
    fn fill_random(&self, buf: &mut [u8]) -> bool;
    /// A shared-data value with its compare-and-swap version.
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes a shared-data value; with `cas`, only if the version is still `cas`.
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool;
    /// Starts the callout; returns its token, or `None` if the host refused it.
    fn dispatch(&self, request: &TokenRequest) -> Option<u32>;
    /// Asks for [`Worker::on_wake`] to be called soon from a worker-level callback;
    /// false if the host cannot.
    fn wake(&self) -> bool;
    /// Delivers `notice` to [`Worker::on_notice`] on every worker (this one too).
    fn notify_all(&self, notice: &Notice);
    /// Adds `authorization` to the paused request and resumes it; false if it is gone.
    fn resume(&self, request_id: u32, authorization: &str) -> bool;
    /// Answers the paused request locally with `failure`; false if it is gone.
    fn fail(&self, request_id: u32, failure: &Failure) -> bool;
    fn log(&self, level: Level, message: &str);
    fn count(&self, metric: Metric, amount: u64);
}

/// "An exchange under this lock has ended": sent by the worker that exchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notice {
    pub lock_stripe: u64,
    /// When the result was stored (host ns), to measure how fast waiters wake.
    pub stored_at_ns: u64,
}

impl Notice {
    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.lock_stripe.to_be_bytes());
        out[8..].copy_from_slice(&self.stored_at_ns.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Notice> {
        let bytes: &[u8; 16] = bytes.try_into().ok()?;
        let (stripe, at) = bytes.split_at(8);
        Some(Notice {
            lock_stripe: u64::from_be_bytes(stripe.try_into().ok()?),
            stored_at_ns: u64::from_be_bytes(at.try_into().ok()?),
        })
    }
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
    /// Microseconds spent building and signing one assertion with an RSA key.
    SigningMicros,
    /// The same with a P-256 key.
    SigningEcMicros,
    /// Microseconds from a result being stored to a waiting worker picking it up.
    WakeMicros,
    /// A request that waited for another worker's exchange.
    JoinedRemote,
    /// A token refreshed ahead of its reuse limit.
    Refresh,
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

/// Where an exchange this worker waits for stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Waits for [`Worker::on_wake`] to take the lock and dispatch.
    Queued,
    /// This worker holds the lock and signs the assertion, a slice at a time.
    Signing,
    /// This worker holds the lock; the callout runs.
    Dispatched,
    /// Another worker holds the lock until `deadline_ms`.
    Elsewhere { deadline_ms: u64 },
}

/// An exchange this worker owes its waiting requests (none for a background refresh).
struct Pending {
    key: CacheKey,
    config: Rc<PluginConfig>,
    destination: usize,
    user_id: String,
    attributes: Vec<Attribute>,
    waiters: Vec<u32>,
    stage: Stage,
    /// When the callout was dispatched (host ms), to tell a timeout from a reset.
    dispatched_at_ms: u64,
    /// The assertion being signed (in [`Stage::Signing`]).
    signing: Option<Box<EnvelopedSigning>>,
    /// Time spent writing and signing the assertion so far (ns), for [`Metric::SigningMicros`].
    signing_ns: u64,
    /// When signing began (host ms).
    signing_since_ms: u64,
    /// A signature a request finished (see [`Worker::help_sign`]), to be dispatched from
    /// a worker-level callback.
    signed: Option<Result<String, SignError>>,
}

/// Per-worker state: the exchanges this worker waits for, by cache key id.
#[derive(Default)]
pub struct Worker {
    pending: HashMap<[u8; cache::ID_LEN], Pending>,
    /// Callout token → cache key id.
    callouts: HashMap<u32, [u8; cache::ID_LEN]>,
    /// Requests decided since the last signing slice (none: the worker is idle).
    requests_since_slice: u32,
}

impl Worker {
    pub fn new() -> Self {
        Worker::default()
    }

    /// Number of exchanges queued, running or awaited and not yet settled.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// True while this worker signs assertions: the host should call
    /// [`Worker::on_slice`] about every millisecond until it is false again.
    pub fn signing(&self) -> bool {
        self.pending.values().any(|p| p.stage == Stage::Signing)
    }

    /// True when some exchange waits on another worker (the host should call
    /// [`Worker::on_tick`] now and then).
    pub fn waits_elsewhere(&self) -> bool {
        self.pending
            .values()
            .any(|p| matches!(p.stage, Stage::Elsewhere { .. }))
    }

    /// Decides a request for `config.destinations[destination]` from the user's verified
    /// `identity` (all claims are read only when the user id needs them or an exchange
    /// is due).
    pub fn on_request(
        &mut self,
        host: &dyn Host,
        config: &Rc<PluginConfig>,
        request_id: u32,
        destination: usize,
        identity: &dyn Identity,
    ) -> Decision {
        self.requests_since_slice = self.requests_since_slice.saturating_add(1);
        self.help_sign(host);
        let Some(dest) = config.destinations.get(destination) else {
            return Decision::Fail(Failure::Internal {
                reason: "unknown destination",
            });
        };
        let mut claims = None;
        let fast_user_id = match &dest.user_id {
            UserIdRule::Claim { path, .. } => identity.string_claim(path),
            UserIdRule::SystemUser(_) => None,
        };
        let user_id = match fast_user_id {
            Some(user_id) => user_id,
            None => {
                let Some(all) = identity.claims() else {
                    return Decision::Fail(Failure::NotAuthenticated);
                };
                match identity::user_id(&dest.user_id, claims.insert(all)) {
                    Ok(user_id) => user_id,
                    Err(e) => return Decision::Fail(Failure::UserId(e)),
                }
            }
        };
        if !is_xml_text(&user_id) {
            return Decision::Fail(Failure::UserIdNotXml);
        }
        let mut attributes = || {
            let claims = claims.take().or_else(|| identity.claims())?;
            Some(attributes_of(&claims, dest))
        };
        let key = CacheKey::new(&dest.cache_namespace, &user_id, config.cache_slots);
        let now_ms = now_ms(host);
        match read_entry(host, &key).and_then(|e| e.live_at(now_ms)) {
            Some(Entry::Token {
                access_token,
                times,
            }) => {
                host.count(Metric::CacheHit, 1);
                if now_ms >= times.refresh_at_ms && !self.pending.contains_key(&key.id) {
                    // Refresh in the background; this request goes on with the current token.
                    if let Some(attributes) = attributes() {
                        self.queue(host, key, config, destination, user_id, attributes, None);
                        host.count(Metric::Refresh, 1);
                    }
                }
                return Decision::Forward(bearer(&access_token));
            }
            Some(entry) => return Decision::Fail(failure_of(entry)),
            None => host.count(Metric::CacheMiss, 1),
        }
        if let Some(pending) = self.pending.get_mut(&key.id) {
            pending.waiters.push(request_id);
            return Decision::Wait;
        }
        let Some(attributes) = attributes() else {
            return Decision::Fail(Failure::NotAuthenticated);
        };
        if self.queue(
            host,
            key,
            config,
            destination,
            user_id,
            attributes,
            Some(request_id),
        ) {
            Decision::Wait
        } else {
            Decision::Fail(Failure::Internal {
                reason: "cannot schedule the token exchange",
            })
        }
    }

    /// Queues an exchange and asks for a worker-level callback; false if the host cannot.
    #[allow(clippy::too_many_arguments)]
    fn queue(
        &mut self,
        host: &dyn Host,
        key: CacheKey,
        config: &Rc<PluginConfig>,
        destination: usize,
        user_id: String,
        attributes: Vec<Attribute>,
        waiter: Option<u32>,
    ) -> bool {
        let first_queued = !self.pending.values().any(|p| p.stage == Stage::Queued);
        if first_queued && !host.wake() {
            return false;
        }
        self.pending.insert(
            key.id,
            Pending {
                key,
                config: Rc::clone(config),
                destination,
                user_id,
                attributes,
                waiters: waiter.into_iter().collect(),
                stage: Stage::Queued,
                dispatched_at_ms: 0,
                signing: None,
                signing_ns: 0,
                signing_since_ms: 0,
                signed: None,
            },
        );
        true
    }

    /// A request went away (client closed, stream reset): it no longer waits.
    pub fn forget_request(&mut self, request_id: u32) {
        for pending in self.pending.values_mut() {
            pending.waiters.retain(|&id| id != request_id);
        }
    }

    /// Starts every queued exchange this worker can lock (and signs a first slice);
    /// waits for the others.
    pub fn on_wake(&mut self, host: &dyn Host) {
        let queued: Vec<[u8; cache::ID_LEN]> = self
            .pending
            .iter()
            .filter(|(_, p)| p.stage == Stage::Queued)
            .map(|(id, _)| *id)
            .collect();
        for id in queued {
            self.advance(host, id);
        }
        self.on_slice(host);
    }

    /// Signs for one slice of time (see [`SIGNING_SLICE_US`]) and dispatches the
    /// exchanges whose assertions are done.
    pub fn on_slice(&mut self, host: &dyn Host) {
        let signed: Vec<[u8; cache::ID_LEN]> = self
            .pending
            .iter()
            .filter(|(_, p)| p.signed.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in signed {
            if let Some(result) = self.pending.get_mut(&id).and_then(|p| p.signed.take()) {
                self.dispatch(host, id, result);
            }
        }
        let mut signing: Vec<(u64, [u8; cache::ID_LEN])> = self
            .pending
            .iter()
            .filter(|(_, p)| p.stage == Stage::Signing && p.signing.is_some())
            .map(|(id, p)| (p.signing_since_ms, *id))
            .collect();
        signing.sort_unstable(); // oldest first
        let Some(&(oldest_ms, _)) = signing.first() else {
            return;
        };
        let start_ns = host.now_ns();
        let waited_ms = (start_ns / 1_000_000).saturating_sub(oldest_ms);
        let idle = std::mem::take(&mut self.requests_since_slice) == 0;
        let slices = (1 + waited_ms / SIGNING_WAIT_STEP_MS)
            .max(if idle { IDLE_SIGNING_SLICES } else { 1 })
            .min(MAX_SIGNING_SLICES);
        let end_ns = start_ns + slices * SIGNING_SLICE_US * 1000;
        for (_, id) in signing {
            let Some(pending) = self.pending.get_mut(&id) else {
                continue;
            };
            let Some(signing) = pending.signing.as_mut() else {
                continue;
            };
            let mut now_ns = host.now_ns();
            let result = loop {
                let result = signing.advance(WINDOWS_PER_CLOCK_READ);
                let then_ns = now_ns;
                now_ns = host.now_ns();
                pending.signing_ns += now_ns.saturating_sub(then_ns);
                if result.is_some() || now_ns >= end_ns {
                    break result;
                }
            };
            match result {
                Some(signed) => self.dispatch(host, id, signed),
                None => return, // out of time: the next slice goes on
            }
        }
    }

    /// One step of the oldest signature under way, from a request's context. A request
    /// cannot dispatch the callout (it would own it), so a finished signature is left for
    /// [`Worker::on_slice`], woken at once.
    fn help_sign(&mut self, host: &dyn Host) {
        if self.pending.is_empty() {
            return; // the common case
        }
        let Some(pending) = self
            .pending
            .values_mut()
            .filter(|p| p.signing.is_some())
            .min_by_key(|p| p.signing_since_ms)
        else {
            return;
        };
        let started_ns = host.now_ns();
        let Some(signing) = pending.signing.as_mut() else {
            return;
        };
        let result = signing.advance(WINDOWS_PER_CLOCK_READ);
        pending.signing_ns += host.now_ns().saturating_sub(started_ns);
        if result.is_some() {
            pending.signing = None;
            pending.signed = result;
            host.wake();
        }
    }

    /// Moves one queued or abandoned exchange on: settle from a stored result, take
    /// the lock and dispatch, or wait for the worker holding it.
    fn advance(&mut self, host: &dyn Host, id: [u8; cache::ID_LEN]) {
        let Some(pending) = self.pending.get(&id) else {
            return;
        };
        let key = pending.key;
        let now_ms = now_ms(host);
        let refreshing = pending.waiters.is_empty();
        match read_entry(host, &key).and_then(|e| e.live_at(now_ms)) {
            // Another worker refreshed already.
            Some(Entry::Token {
                access_token,
                times,
            }) if refreshing && now_ms < times.refresh_at_ms => {
                self.settle(host, id, Ok(access_token));
                return;
            }
            Some(entry) if !refreshing => {
                self.settle(host, id, entry_outcome(entry));
                return;
            }
            _ => {}
        }
        let timeout_ms = pending
            .config
            .destinations
            .get(pending.destination)
            .map_or(0, |d| d.token_service.timeout_ms);
        match take_lock(host, &key, now_ms + timeout_ms + LOCK_GRACE_MS) {
            Lock::Taken => {
                let started_ns = host.now_ns();
                match self.start_signing(host, id) {
                    Ok(signing) => {
                        if let Some(p) = self.pending.get_mut(&id) {
                            p.stage = Stage::Signing;
                            p.signing = Some(Box::new(signing));
                            p.signing_ns = host.now_ns().saturating_sub(started_ns);
                            p.signing_since_ms = started_ns / 1_000_000;
                        }
                    }
                    Err(failure) => {
                        release_lock(host, &key);
                        self.settle(host, id, Err(failure));
                    }
                }
            }
            Lock::HeldUntil(deadline_ms) => {
                if let Some(p) = self.pending.get_mut(&id) {
                    p.stage = Stage::Elsewhere { deadline_ms };
                    host.count(Metric::JoinedRemote, p.waiters.len() as u64);
                }
            }
        }
    }

    /// Writes the assertion for exchange `id` and starts its signature.
    fn start_signing(
        &self,
        host: &dyn Host,
        id: [u8; cache::ID_LEN],
    ) -> Result<EnvelopedSigning, Failure> {
        let pending = self.pending.get(&id).ok_or(Failure::Internal {
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
        exchange::start(
            config,
            dest,
            &pending.user_id,
            &pending.attributes,
            now_ms(host),
            &assertion_id(&random),
        )
        .map_err(|e| cannot_build(host, &dest.name, &e))
    }

    /// The assertion of exchange `id` is signed (or failed to be): dispatch the callout,
    /// or release the lock and answer the waiters.
    fn dispatch(
        &mut self,
        host: &dyn Host,
        id: [u8; cache::ID_LEN],
        signed: Result<String, SignError>,
    ) {
        let Some(pending) = self.pending.get_mut(&id) else {
            return;
        };
        pending.signing = None;
        let key = pending.key;
        let config = Rc::clone(&pending.config);
        let result = match config.destinations.get(pending.destination) {
            None => Err(Failure::Internal {
                reason: "unknown destination",
            }),
            Some(dest) => {
                let signing = match config
                    .keys
                    .get(&dest.key_name)
                    .map(|k| k.active.signature_method())
                {
                    Some(crate::keys::ECDSA_SHA256) => Metric::SigningEcMicros,
                    _ => Metric::SigningMicros,
                };
                host.count(signing, pending.signing_ns / 1000);
                signed
                    .map_err(|e| cannot_build(host, &dest.name, &BuildError::Signing(e)))
                    .and_then(|signed| {
                        let request = token_request::build(dest, &signed);
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
                    })
            }
        };
        match result {
            Ok(callout) => {
                self.callouts.insert(callout, id);
                if let Some(p) = self.pending.get_mut(&id) {
                    p.stage = Stage::Dispatched;
                    p.dispatched_at_ms = now_ms(host);
                }
            }
            Err(failure) => {
                release_lock(host, &key);
                self.settle(host, id, Err(failure));
            }
        }
    }

    /// The token service answered callout `callout` (`status` `None`: no response).
    /// Stores the result for every worker, releases the lock, notifies all workers
    /// and releases this worker's waiters.
    pub fn on_token_response(
        &mut self,
        host: &dyn Host,
        callout: u32,
        status: Option<u16>,
        body: &[u8],
    ) {
        let Some(id) = self.callouts.remove(&callout) else {
            return;
        };
        let Some(pending) = self.pending.get(&id) else {
            return;
        };
        let (key, config) = (pending.key, Rc::clone(&pending.config));
        let dest_name = config
            .destinations
            .get(pending.destination)
            .map_or("?", |d| d.name.as_str());
        let now_ms = now_ms(host);
        let timeout_ms = config
            .destinations
            .get(pending.destination)
            .map_or(0, |d| d.token_service.timeout_ms);
        let elapsed_ms = now_ms.saturating_sub(pending.dispatched_at_ms);
        let timed_out = status.is_none() && elapsed_ms * 100 >= timeout_ms * TIMEOUT_SHARE_PERCENT;
        let outcome = if timed_out {
            Err(Failure::Timeout)
        } else {
            token_response::parse(status, body)
        };
        let entry = match &outcome {
            Ok(token) => {
                host.count(Metric::ExchangeOk, 1);
                let times = cache::token_times(
                    now_ms,
                    token.expires_in_s * 1000,
                    config.token_margin_ms,
                    key.jitter(),
                );
                (times.reuse_until_ms > now_ms).then(|| Entry::Token {
                    access_token: token.access_token.clone(),
                    times,
                })
            }
            Err(Failure::Rejected { code }) => {
                host.count(Metric::ExchangeRejected, 1);
                host.log(
                    Level::Warn,
                    &format!(
                        "destination {dest_name}: token service rejected the assertion for user {:?}: {code}",
                        pending.user_id
                    ),
                );
                (config.failure_hold_ms > 0).then(|| Entry::Rejected {
                    code: code.clone(),
                    until_ms: now_ms + config.failure_hold_ms,
                })
            }
            Err(failure) => {
                host.count(Metric::ExchangeFailed, 1);
                host.log(
                    Level::Warn,
                    &format!(
                        "destination {dest_name}: token exchange failed after {} ms: {}",
                        elapsed_ms,
                        failure.description()
                    ),
                );
                Some(Entry::Failed {
                    timeout: *failure == Failure::Timeout,
                    until_ms: now_ms + FAILURE_BACKOFF_MS,
                })
            }
        };
        let current = read_entry(host, &key).and_then(|e| e.live_at(now_ms));
        let stored = match (entry, current) {
            // A failed refresh leaves the still-usable token in place and tries again
            // after the backoff, not on every request.
            (
                Some(Entry::Rejected { .. } | Entry::Failed { .. }) | None,
                Some(Entry::Token {
                    access_token,
                    mut times,
                }),
            ) => {
                times.refresh_at_ms = (now_ms + FAILURE_BACKOFF_MS).min(times.reuse_until_ms);
                Some(Entry::Token {
                    access_token,
                    times,
                })
            }
            (entry, _) => entry,
        };
        if let Some(entry) = stored {
            host.shared_set(&key.entry_key(), &entry.encode(&key), None);
        }
        release_lock(host, &key);
        host.notify_all(&Notice {
            lock_stripe: key.lock_stripe(),
            stored_at_ns: host.now_ns(),
        });
        self.settle(host, id, outcome.map(|token| token.access_token));
    }

    /// A worker finished an exchange under `notice.lock_stripe`: settle what waited on
    /// that lock (or try again, if the exchange was another user's).
    pub fn on_notice(&mut self, host: &dyn Host, notice: &Notice) {
        let waiting: Vec<[u8; cache::ID_LEN]> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                p.key.lock_stripe() == notice.lock_stripe
                    && matches!(p.stage, Stage::Elsewhere { .. })
            })
            .map(|(id, _)| *id)
            .collect();
        if !waiting.is_empty() {
            host.count(
                Metric::WakeMicros,
                host.now_ns().saturating_sub(notice.stored_at_ns) / 1000,
            );
        }
        for id in waiting {
            self.pick_up(host, id);
        }
        self.on_slice(host);
    }

    /// Periodic check for exchanges awaited elsewhere: a result whose notice was lost,
    /// or a lock whose holder vanished (its deadline passed).
    pub fn on_tick(&mut self, host: &dyn Host) {
        let now_ms = now_ms(host);
        let waiting: Vec<([u8; cache::ID_LEN], u64)> = self
            .pending
            .iter()
            .filter_map(|(id, p)| match p.stage {
                Stage::Elsewhere { deadline_ms } => Some((*id, deadline_ms)),
                _ => None,
            })
            .collect();
        for (id, deadline_ms) in waiting {
            if now_ms >= deadline_ms {
                if let Some(p) = self.pending.get_mut(&id) {
                    p.stage = Stage::Queued;
                }
                self.advance(host, id);
            } else {
                self.pick_up(host, id);
            }
        }
        self.on_slice(host);
    }

    /// Settles an exchange awaited elsewhere from the stored result, or, when there is
    /// none for it (the slot went to another user, the holder failed), tries again.
    fn pick_up(&mut self, host: &dyn Host, id: [u8; cache::ID_LEN]) {
        let Some(pending) = self.pending.get(&id) else {
            return;
        };
        let key = pending.key;
        let now_ms = now_ms(host);
        match read_entry(host, &key).and_then(|e| e.live_at(now_ms)) {
            // A background refresh ends when the exchange elsewhere ends, fresh token or not.
            Some(Entry::Token { access_token, .. }) if pending.waiters.is_empty() => {
                self.settle(host, id, Ok(access_token));
            }
            Some(entry) => self.settle(host, id, entry_outcome(entry)),
            None => {
                let lock_free = host
                    .shared_get(&key.lock_key())
                    .and_then(|(value, _)| cache::lock_deadline(&value))
                    .is_none_or(|deadline| deadline <= now_ms);
                if lock_free {
                    if let Some(p) = self.pending.get_mut(&id) {
                        p.stage = Stage::Queued;
                    }
                    self.advance(host, id);
                }
            }
        }
    }

    /// Releases this worker's requests waiting for exchange `id`.
    fn settle(
        &mut self,
        host: &dyn Host,
        id: [u8; cache::ID_LEN],
        outcome: Result<String, Failure>,
    ) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        match outcome {
            Ok(access_token) => {
                let authorization = bearer(&access_token);
                for request in pending.waiters {
                    host.resume(request, &authorization);
                }
            }
            Err(failure) => {
                for request in pending.waiters {
                    host.fail(request, &failure);
                }
            }
        }
    }
}

/// Outcome of taking an exchange lock.
enum Lock {
    Taken,
    HeldUntil(u64),
}

/// Creates every exchange lock that does not exist yet. Called when the plugin is
/// configured, before it serves requests (see [`cache::LOCK_STRIPES`]).
pub fn create_locks(host: &dyn Host) {
    for stripe in 0..cache::LOCK_STRIPES {
        let key = cache::lock_key(stripe);
        if host.shared_get(&key).is_none() {
            host.shared_set(&key, &cache::FREE_LOCK, None);
        }
    }
}

/// Takes an exchange lock with compare-and-swap. Locks are created up front by
/// [`create_locks`]; one still missing is created here as a fallback.
fn take_lock(host: &dyn Host, key: &CacheKey, deadline_ms: u64) -> Lock {
    let lock_key = key.lock_key();
    let now_ms = now_ms(host);
    let current = match host.shared_get(&lock_key) {
        Some(current) => current,
        None => {
            host.shared_set(&lock_key, &cache::FREE_LOCK, None);
            match host.shared_get(&lock_key) {
                Some(current) => current,
                None => return Lock::HeldUntil(deadline_ms),
            }
        }
    };
    let (value, cas) = current;
    if let Some(held_until) = cache::lock_deadline(&value).filter(|&d| d > now_ms) {
        return Lock::HeldUntil(held_until);
    }
    if host.shared_set(&lock_key, &cache::encode_lock(key, deadline_ms), Some(cas)) {
        Lock::Taken
    } else {
        let held_until = host
            .shared_get(&lock_key)
            .and_then(|(value, _)| cache::lock_deadline(&value))
            .unwrap_or(deadline_ms);
        Lock::HeldUntil(held_until)
    }
}

fn release_lock(host: &dyn Host, key: &CacheKey) {
    host.shared_set(&key.lock_key(), &cache::FREE_LOCK, None);
}

fn read_entry(host: &dyn Host, key: &CacheKey) -> Option<Entry> {
    host.shared_get(&key.entry_key())
        .and_then(|(bytes, _)| Entry::decode(&bytes, key))
}

/// What waiters get from a stored entry.
fn entry_outcome(entry: Entry) -> Result<String, Failure> {
    match entry {
        Entry::Token { access_token, .. } => Ok(access_token),
        other => Err(failure_of(other)),
    }
}

fn failure_of(entry: Entry) -> Failure {
    match entry {
        Entry::Rejected { code, .. } => Failure::Rejected { code },
        Entry::Failed { timeout: true, .. } => Failure::Timeout,
        Entry::Failed { timeout: false, .. } => Failure::Unavailable {
            reason: "the last exchange failed moments ago; retrying shortly",
        },
        Entry::Token { .. } => Failure::Internal {
            reason: "unexpected token entry",
        },
    }
}

/// SAML attributes for the assertion; values XML cannot carry are left out.
fn attributes_of(claims: &Value, dest: &crate::config::Destination) -> Vec<Attribute> {
    attributes::from_claims(
        claims,
        dest.skip_user_attributes_prefix,
        dest.skip_user_uuid,
    )
    .into_iter()
    .filter(|a| is_xml_text(&a.name) && a.values.iter().all(|v| is_xml_text(v)))
    .collect()
}

/// Logs why no assertion could be made (no user data in the message) and the answer.
fn cannot_build(host: &dyn Host, destination: &str, error: &BuildError) -> Failure {
    host.log(
        Level::Error,
        &format!("destination {destination}: cannot build assertion: {error:?}"),
    );
    Failure::Internal {
        reason: "cannot build the SAML assertion",
    }
}

fn now_ms(host: &dyn Host) -> u64 {
    host.now_ns() / 1_000_000
}

fn bearer(access_token: &str) -> String {
    format!("Bearer {access_token}")
}

#[cfg(test)]
mod tests;
