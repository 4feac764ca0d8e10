//! The request flow and the exchange engine, independent of proxy-wasm.
//!
//! A request either finds a reusable token (in the worker's own copy or the shared slot)
//! and goes on at once, or waits while one exchange per identity runs for the whole Envoy:
//!
//! - [`decision`]: what to do with a request (forward, wait, answer);
//! - [`exchanges`]: the exchanges this worker runs or waits for, in explicit states with
//!   deadlines, and their transitions;
//! - [`recipe`]: the steps of one exchange (a credential kind plugs in here);
//! - [`scheduler`]: when the worker signs, in slices, within its signing share;
//! - [`outcome`]: what a result leaves in the cache;
//! - [`hot`]: the worker's own copies of hot tokens;
//! - [`eviction`]: a token the backend refused leaves the cache;
//! - [`pacing`]: which root context drives the worker, and its tick;
//! - the cross-worker locks, notices and queue registry are in [`crate::coordination`].
//!
//! [`Worker`] is the one object per VM (per Envoy worker thread) that the proxy-wasm layer
//! calls: from requests ([`Worker::on_request`]) and from worker-level callbacks (its queue,
//! its tick, callout answers), which alone start exchanges.

pub mod decision;
pub mod eviction;
pub mod exchanges;
pub mod hot;
pub mod outcome;
pub mod pacing;
pub mod recipe;
pub mod scheduler;

use crate::cache::ID_LEN;
use crate::config::PluginConfig;
use crate::coordination::notice::Message;
use crate::coordination::{registry, slot};
use crate::error::Failure;
use crate::host::Host;
use crate::metrics::{Counters, Metric};
use crate::x509::holder::HolderKey;
use exchanges::{Exchange, State};
use hot::HotTokens;
use pacing::Roots;
use scheduler::Scheduler;
use std::collections::HashMap;

pub use outcome::FAILURE_BACKOFF_MS;

/// What to do with a request right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward with this value in the destination's carrier header (`Authorization` for a
    /// token).
    Forward(String),
    /// Pause; the worker resumes or answers the request later.
    Wait,
    /// Answer locally.
    Fail(Failure),
}

/// What a tick leaves to the proxy-wasm layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// A second has passed since the last such tick: time for the once-a-second duties
    /// (memory gauge, certificate expiry).
    pub second: bool,
}

/// Per-worker state: the exchanges this worker runs or waits for, by cache key id.
#[derive(Default)]
pub struct Worker {
    exchanges: HashMap<[u8; ID_LEN], Exchange>,
    /// Callout token → cache key id.
    callouts: HashMap<u32, [u8; ID_LEN]>,
    scheduler: Scheduler,
    hot: HotTokens,
    evictions: eviction::RecentEvictions,
    /// The public key this worker's client certificates certify.
    holder_key: HolderKey,
    counters: Counters,
    roots: Roots,
    /// The VM's queue, and the root that registered it last (it gets the messages).
    queue: Option<u32>,
    queue_owner: Option<u32>,
    /// When a wake-up was enqueued that has not arrived yet.
    wake_requested_ms: Option<u64>,
    /// Exchanges queued so far (their arrival order).
    seq: u64,
    swept_ms: u64,
    second_ms: u64,
    announced_ms: u64,
}

impl Worker {
    pub fn new() -> Self {
        Worker::default()
    }

    /// Root context `root` was configured with `config` and registered the VM's `queue`: it
    /// drives the worker from now on. Creates what shared data needs before the plugin
    /// serves, and announces the queue to the other workers.
    pub fn configure(&mut self, host: &dyn Host, root: u32, queue: u32, config: &PluginConfig) {
        self.roots.configured(root);
        self.queue = Some(queue);
        self.queue_owner = Some(root);
        self.scheduler.set_share(config.signing_share_percent);
        self.hot.set_capacity(config.worker_cache_entries);
        slot::create_stripes(host);
        registry::create(host);
        self.announce(host);
    }

    /// True when `root` drives but did not register the queue (the root that did is
    /// gone): the proxy-wasm layer registers it again, then calls [`Worker::queue_registered`].
    pub fn needs_queue(&self, root: u32) -> bool {
        self.roots.driver() == Some(root) && self.queue_owner != Some(root)
    }

    pub fn queue_registered(&mut self, host: &dyn Host, root: u32) {
        self.queue_owner = Some(root);
        self.announce(host);
    }

    /// Envoy shuts root context `root` down. True if it may go now; false while callouts
    /// it dispatched are out (Envoy would cancel them without an answer): the proxy-wasm
    /// layer then lets it go when [`Worker::root_drained`] says so.
    pub fn root_done(&mut self, root: u32) -> bool {
        self.roots.retire(root);
        self.root_drained(root)
    }

    /// True once a retiring root owns no callout any more.
    pub fn root_drained(&mut self, root: u32) -> bool {
        if self.roots.is_retiring(root) && !self.owns_callouts(root) {
            self.roots.gone(root);
            return true;
        }
        false
    }

    /// Messages from the worker's queue (delivered to the root that registered it). Like
    /// every worker-level callback, it also signs a slice.
    pub fn on_messages(&mut self, host: &dyn Host, root: u32, messages: &[Vec<u8>]) {
        let mut wake = false;
        for message in messages {
            match Message::decode(message) {
                Some(Message::Notice(notice)) => self.on_notice(host, root, &notice),
                Some(Message::Wake) => wake = true,
                None => {}
            }
        }
        if wake || self.wake_requested_ms.is_some() {
            self.run_ready(host, root);
        }
        self.slice(host, root);
    }

    /// Root `root`'s timer: a slice of signing, the sweep of deadlines every
    /// [`pacing::SWEEP_MS`], counters and the queue's heartbeat once a second. Only the
    /// driving root does anything.
    pub fn on_tick(&mut self, host: &dyn Host, root: u32) -> Tick {
        if self.roots.driver() != Some(root) {
            return Tick { second: false };
        }
        let now_ms = host.now_ms();
        if now_ms.saturating_sub(self.swept_ms) >= pacing::SWEEP_MS {
            self.swept_ms = now_ms;
            self.sweep(host, root);
        }
        self.slice(host, root);
        if now_ms.saturating_sub(self.announced_ms) >= registry::HEARTBEAT_MS {
            self.announce(host);
        }
        let second = now_ms.saturating_sub(self.second_ms) >= 1_000;
        if second {
            self.second_ms = now_ms;
            self.flush_metrics(host);
        }
        Tick { second }
    }

    /// The tick period root `root` should have (ms).
    pub fn tick_period_ms(&self, root: u32) -> u64 {
        pacing::tick_period_ms(self.roots.driver() == Some(root), self.signing())
    }

    /// Reports the counters gathered since the last flush.
    pub fn flush_metrics(&mut self, host: &dyn Host) {
        for (metric, amount) in self.counters.drain() {
            host.record(metric, amount);
        }
    }

    /// Renews the queue's entry in the registry of live workers.
    fn announce(&mut self, host: &dyn Host) {
        let Some(queue) = self.queue else { return };
        self.announced_ms = host.now_ms();
        if let Some(live) = registry::announce(host, queue) {
            host.record(Metric::WorkersRegistered, live as u64);
        }
    }

    /// Number of exchanges queued, running or awaited and not yet settled.
    pub fn in_flight(&self) -> usize {
        self.exchanges.len()
    }

    /// True while this worker signs assertions (the driver then ticks every millisecond).
    pub fn signing(&self) -> bool {
        self.exchanges
            .values()
            .any(|e| matches!(e.state, State::Signing { .. }))
    }

    /// True when some exchange waits on another worker.
    pub fn waits_elsewhere(&self) -> bool {
        self.exchanges
            .values()
            .any(|e| matches!(e.state, State::Elsewhere { .. }))
    }
}

#[cfg(test)]
mod tests;
