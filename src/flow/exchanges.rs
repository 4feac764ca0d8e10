//! The exchange table: every exchange this worker runs or waits for, each in exactly one
//! [`State`] with a deadline, and the transitions between them.
//!
//! ```text
//!  queued ──claim──► signing ──► signed ──► calling ──► dispatched ──► settled
//!    │  (lock held)     (a slice a time)  (needs the driver root)  │
//!    └──► elsewhere (another worker holds the lock) ──notice/tick──┘
//! ```
//!
//! Transitions run from worker-level callbacks (the queue, the tick, a callout's answer),
//! never from a request's own context, so a client that goes away cannot cancel what other
//! requests wait for; a request only helps a signature along. The sweep
//! ([`Worker::sweep`], on the tick) ends every state past its deadline with the error
//! contract's answer for its waiters, releases the lock and lets the next request start
//! afresh; it also answers any waiter past its own deadline (its destination's timeout plus
//! [`WAITER_GRACE_MS`]) and starts what a lost wake-up left behind.

use super::outcome::{self, answer_of};
use super::recipe::{Answer, Issued, Recipe, Start, Step, Stepwise};
use super::scheduler;
use super::Worker;
use crate::cache::{CacheKey, Entry, ID_LEN};
use crate::config::destination::Carrier;
use crate::config::PluginConfig;
use crate::coordination::notice::{Notice, WAKE};
use crate::coordination::registry;
use crate::coordination::slot::{self, Claim};
use crate::error::Failure;
use crate::host::{Host, Level};
use crate::keys::SignError;
use crate::metrics::Metric;
use crate::oauth::token_request::TokenRequest;
use std::rc::Rc;

/// How long a signature may hold the lock before its callout is dispatched. Signatures run
/// oldest first, at most [`SIGNING_AT_ONCE`] at a time, so this is a few signatures' time
/// at the worker's signing share (an RSA-4096 signature: tens of milliseconds).
pub const SIGNING_LOCK_MS: u64 = 2_000;
/// Time beyond a callout's timeout for its answer to arrive before the exchange is ended:
/// Envoy answers a timed-out callout itself, so only a lost callout gets here.
pub const RESPONSE_GRACE_MS: u64 = 500;
/// How much longer than its destination's timeout a request may wait for an exchange.
pub const WAITER_GRACE_MS: u64 = 900;
/// Exchanges signing at once on a worker (the others wait, queued, without the lock).
pub const SIGNING_AT_ONCE: usize = 4;
/// A wake-up not delivered within this time is taken for lost: the sweep does its work.
const WAKE_LOST_MS: u64 = 50;

/// A paused request and when it must be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    pub request: u32,
    pub answer_by_ms: u64,
}

/// Where an exchange stands. Every state but `Queued` and `Elsewhere` holds the lock (or
/// went on without it after a collision).
pub enum State {
    /// Waits for a worker-level callback and its turn to sign; holds no lock.
    Queued { since_ms: u64 },
    /// The signature is under way, a slice at a time.
    Signing {
        work: Box<dyn Stepwise>,
        since_ms: u64,
        deadline_ms: u64,
    },
    /// A request finished the signature; the next worker-level callback goes on.
    Signed {
        result: Result<String, SignError>,
        deadline_ms: u64,
    },
    /// The callout is ready; it waits for a callback of the driving root to be dispatched.
    Calling {
        request: TokenRequest,
        deadline_ms: u64,
    },
    /// The callout runs; its owner root gets the answer.
    Dispatched {
        callout: u32,
        owner: u32,
        at_ms: u64,
        timeout_ms: u64,
        deadline_ms: u64,
    },
    /// Another worker holds the lock until `until_ms`: wait for its notice (or the tick).
    Elsewhere { until_ms: u64 },
}

impl State {
    /// The state's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            State::Queued { .. } => "queued",
            State::Signing { .. } => "signing",
            State::Signed { .. } => "signed",
            State::Calling { .. } => "calling",
            State::Dispatched { .. } => "dispatched",
            State::Elsewhere { .. } => "waiting on another worker",
        }
    }

    /// What a waiter gets when this state runs out of time.
    fn expiry_failure(&self) -> Failure {
        match self {
            State::Dispatched { .. } | State::Elsewhere { .. } => Failure::Timeout,
            _ => Failure::Overloaded {
                reason: "the token exchange could not start in time",
            },
        }
    }
}

/// One exchange this worker runs or waits for.
pub struct Exchange {
    pub key: CacheKey,
    pub state: State,
    recipe: Box<dyn Recipe>,
    config: Rc<PluginConfig>,
    waiters: Vec<Waiter>,
    /// A background refresh: ends when done even if nobody waits.
    refresh: bool,
    /// Arrival order: signatures run oldest first.
    seq: u64,
    /// When it was queued: how long the oldest new user has waited decides how large the
    /// signing slices grow (see [`super::scheduler`]).
    queued_at_ms: u64,
    /// The ticket of this exchange's lock attempts (random, never 0).
    ticket: u64,
    /// Whether the ticket holds the slot's lock (false: not yet, or going on without it).
    holds_lock: bool,
    /// Until when the lock was claimed for the signature (the deadline of the states
    /// before dispatch).
    lock_until_ms: u64,
    /// Whether its requests were counted as waiting on another worker.
    counted_remote: bool,
    /// How long a request may wait: the destination's timeout plus [`WAITER_GRACE_MS`].
    patience_ms: u64,
    signing_ns: u64,
    /// For the worker's copy of the token: the destination's namespace and the principal
    /// (see [`crate::identity::Principal::key`]).
    namespace: Rc<str>,
    principal: String,
    /// Where the waiting requests get the credential.
    carrier: Carrier,
}

/// What is needed to queue an exchange.
pub struct NewExchange {
    pub key: CacheKey,
    pub recipe: Box<dyn Recipe>,
    pub config: Rc<PluginConfig>,
    pub waiter: Option<u32>,
    pub timeout_ms: u64,
    pub namespace: Rc<str>,
    pub principal: String,
    pub carrier: Carrier,
}

impl Worker {
    /// Queues an exchange and asks for a worker-level callback; false if the host can give
    /// neither a ticket nor a wake-up (the request is then refused, fail closed).
    pub(super) fn queue(&mut self, host: &dyn Host, new: NewExchange) -> bool {
        let mut ticket = [0u8; 8];
        if !host.fill_random(&mut ticket) {
            return false;
        }
        let now_ms = host.now_ms();
        if !self.request_wake(host, now_ms) {
            return false;
        }
        self.seq += 1;
        let patience_ms = new.timeout_ms + WAITER_GRACE_MS;
        let exchange = Exchange {
            key: new.key,
            state: State::Queued { since_ms: now_ms },
            recipe: new.recipe,
            config: new.config,
            waiters: new
                .waiter
                .map(|request| Waiter {
                    request,
                    answer_by_ms: now_ms + patience_ms,
                })
                .into_iter()
                .collect(),
            refresh: new.waiter.is_none(),
            seq: self.seq,
            queued_at_ms: now_ms,
            ticket: u64::from_be_bytes(ticket) | 1,
            holds_lock: false,
            lock_until_ms: 0,
            counted_remote: false,
            patience_ms,
            signing_ns: 0,
            namespace: new.namespace,
            principal: new.principal,
            carrier: new.carrier,
        };
        self.exchanges.insert(new.key.id, exchange);
        true
    }

    /// Adds `request` to the exchange for `key_id`; false if there is none.
    pub(super) fn join(&mut self, key_id: &[u8; ID_LEN], request: u32, now_ms: u64) -> bool {
        let Some(exchange) = self.exchanges.get_mut(key_id) else {
            return false;
        };
        exchange.waiters.push(Waiter {
            request,
            answer_by_ms: now_ms + exchange.patience_ms,
        });
        true
    }

    /// Enqueues a wake-up to the worker's own queue unless one is on its way; false if
    /// the worker has no queue (it was never configured: nothing would run the exchange).
    /// A wake-up the host refuses or loses is made up by the sweep.
    fn request_wake(&mut self, host: &dyn Host, now_ms: u64) -> bool {
        let Some(queue) = self.queue else {
            return false;
        };
        if self.wake_requested_ms.is_none() && host.enqueue(queue, WAKE) {
            self.wake_requested_ms = Some(now_ms);
        }
        true
    }

    /// A request went away (client closed, stream reset): it no longer waits.
    pub fn forget_request(&mut self, request_id: u32) {
        for exchange in self.exchanges.values_mut() {
            exchange.waiters.retain(|w| w.request != request_id);
        }
    }

    /// The worker-level work: goes on with finished signatures, dispatches ready callouts
    /// (from the driving root only) and starts queued exchanges (oldest first, while fewer
    /// than [`SIGNING_AT_ONCE`] sign).
    pub(super) fn run_ready(&mut self, host: &dyn Host, root: u32) {
        self.wake_requested_ms = None;
        let signed: Vec<_> = self
            .exchanges
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Signed { .. } | State::Calling { .. }))
            .map(|(id, _)| *id)
            .collect();
        for id in signed {
            self.go_on(host, root, id);
        }
        let signing = self
            .exchanges
            .values()
            .filter(|e| matches!(e.state, State::Signing { .. }))
            .count();
        let mut queued: Vec<(u64, [u8; ID_LEN])> = self
            .exchanges
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Queued { .. }))
            .map(|(id, e)| (e.seq, *id))
            .collect();
        queued.sort_unstable();
        for (_, id) in queued
            .into_iter()
            .take(SIGNING_AT_ONCE.saturating_sub(signing))
        {
            self.start(host, root, id);
        }
    }

    /// Whether the stored entry answers this exchange: any live entry does for waiting
    /// requests; a refresh without waiters needs a token fresher than the one it replaces.
    fn accepts(exchange: &Exchange, now_ms: u64) -> impl Fn(&Entry) -> bool {
        let refresh_only = exchange.refresh && exchange.waiters.is_empty();
        move |entry: &Entry| match entry.clone().live_at(now_ms) {
            Some(Entry::Token { times, .. }) if refresh_only => now_ms < times.refresh_at_ms,
            Some(_) => !refresh_only,
            None => false,
        }
    }

    /// Claims the lock for a queued exchange and runs its first step.
    fn start(&mut self, host: &dyn Host, root: u32, id: [u8; ID_LEN]) {
        let Some(exchange) = self.exchanges.get(&id) else {
            return;
        };
        if exchange.waiters.is_empty() && !exchange.refresh {
            self.drop_exchange(host, id); // everyone who waited went away or was answered
            return;
        }
        let now_ms = host.now_ms();
        let accept = Self::accepts(exchange, now_ms);
        let lock_until_ms = now_ms + SIGNING_LOCK_MS;
        let claim = slot::claim(host, &exchange.key, exchange.ticket, lock_until_ms, &accept);
        match claim {
            Claim::Found(entry) => return self.settle_from_entry(host, id, entry),
            Claim::Wait { until_ms } => return self.wait_elsewhere(id, until_ms),
            Claim::Busy => return, // stays queued; the next callback tries again
            Claim::Collision => self.counters.add(Metric::LockCollision, 1),
            Claim::Held => {}
        }
        let Some(exchange) = self.exchanges.get_mut(&id) else {
            return;
        };
        exchange.holds_lock = claim == Claim::Held;
        exchange.lock_until_ms = lock_until_ms;
        let mut random = [0u8; 16];
        if !host.fill_random(&mut random) {
            return self.conclude(
                host,
                id,
                Err(Failure::Internal {
                    reason: "no randomness for the assertion ID",
                }),
            );
        }
        let Some(exchange) = self.exchanges.get_mut(&id) else {
            return;
        };
        let started_ns = host.now_ns();
        let step = exchange.recipe.start(&Start {
            now_ms,
            random,
            log: host,
        });
        exchange.signing_ns = host.now_ns().saturating_sub(started_ns);
        self.proceed(host, root, id, step);
    }

    fn wait_elsewhere(&mut self, id: [u8; ID_LEN], until_ms: u64) {
        if let Some(exchange) = self.exchanges.get_mut(&id) {
            exchange.state = State::Elsewhere { until_ms };
            exchange.holds_lock = false;
            if !exchange.counted_remote {
                exchange.counted_remote = true;
                self.counters
                    .add(Metric::JoinedRemote, exchange.waiters.len() as u64);
            }
        }
    }

    /// Moves an exchange on with its recipe's next step.
    fn proceed(&mut self, host: &dyn Host, root: u32, id: [u8; ID_LEN], step: Step) {
        let now_ms = host.now_ms();
        let Some(exchange) = self.exchanges.get_mut(&id) else {
            return;
        };
        match step {
            Step::Sign(work) => {
                exchange.state = State::Signing {
                    work,
                    since_ms: now_ms,
                    deadline_ms: exchange.lock_until_ms,
                };
            }
            Step::Call(request) => {
                exchange.state = State::Calling {
                    deadline_ms: exchange.lock_until_ms,
                    request,
                };
                if self.roots.driver() == Some(root) {
                    self.go_on(host, root, id);
                } else {
                    self.request_wake(host, now_ms);
                }
            }
            Step::Done(result) => self.conclude(host, id, result),
        }
    }

    /// Goes on with a finished signature or a ready callout.
    fn go_on(&mut self, host: &dyn Host, root: u32, id: [u8; ID_LEN]) {
        let driving = self.roots.driver() == Some(root);
        let Some(exchange) = self.exchanges.get_mut(&id) else {
            return;
        };
        match &exchange.state {
            State::Signed { .. } => {}
            State::Calling { .. } if driving => {}
            _ => return,
        }
        // Taken out for the next step, which always sets a new state.
        match std::mem::replace(&mut exchange.state, State::Queued { since_ms: 0 }) {
            State::Signed { result, .. } => {
                let step = exchange.recipe.signed(result, host);
                self.proceed(host, root, id, step);
            }
            State::Calling {
                request,
                deadline_ms,
            } => self.dispatch(host, root, id, request, deadline_ms),
            other => exchange.state = other,
        }
    }

    /// Dispatches a callout, keeping (or retaking) the lock until its timeout passes.
    fn dispatch(
        &mut self,
        host: &dyn Host,
        root: u32,
        id: [u8; ID_LEN],
        request: TokenRequest,
        calling_deadline_ms: u64,
    ) {
        let now_ms = host.now_ms();
        let Some(exchange) = self.exchanges.get_mut(&id) else {
            return;
        };
        let deadline_ms = now_ms + request.timeout_ms + RESPONSE_GRACE_MS;
        let accept = Self::accepts(exchange, now_ms);
        match slot::claim(host, &exchange.key, exchange.ticket, deadline_ms, &accept) {
            Claim::Found(entry) => return self.settle_from_entry(host, id, entry),
            // The lock ran out and another worker took it: it exchanges, not us.
            Claim::Wait { until_ms } => return self.wait_elsewhere(id, until_ms),
            Claim::Busy => {
                exchange.state = State::Calling {
                    deadline_ms: calling_deadline_ms,
                    request,
                };
                return;
            }
            Claim::Held => exchange.holds_lock = true,
            Claim::Collision => exchange.holds_lock = false,
        }
        match host.dispatch(root, &request) {
            Some(callout) => {
                exchange.state = State::Dispatched {
                    callout,
                    owner: root,
                    at_ms: now_ms,
                    timeout_ms: request.timeout_ms,
                    deadline_ms,
                };
                self.callouts.insert(callout, id);
            }
            None => {
                let (destination, _) = exchange.recipe.describe();
                host.log(
                    Level::Error,
                    &format!(
                        "destination {destination}: callout to cluster {:?} refused by the host (is the cluster defined?)",
                        request.cluster
                    ),
                );
                self.conclude(
                    host,
                    id,
                    Err(Failure::Unavailable {
                        reason: "token service cluster not available",
                    }),
                );
            }
        }
    }

    /// The callout `callout` of root `root` ended (`status` `None`: no response).
    pub fn on_callout_response(
        &mut self,
        host: &dyn Host,
        root: u32,
        callout: u32,
        status: Option<u16>,
        body: &[u8],
    ) {
        let Some(id) = self.callouts.remove(&callout) else {
            return; // ended by its deadline already, or not ours
        };
        let now_ms = host.now_ms();
        let Some(exchange) = self.exchanges.get_mut(&id) else {
            return;
        };
        let State::Dispatched {
            callout: expected,
            at_ms,
            timeout_ms,
            ..
        } = exchange.state
        else {
            return;
        };
        if expected != callout {
            return;
        }
        let answer = Answer {
            status,
            body,
            elapsed_ms: now_ms.saturating_sub(at_ms),
            timeout_ms,
        };
        let step = exchange.recipe.answered(&answer, host);
        self.proceed(host, root, id, step);
        // A worker-level callback: a chance to sign a slice (see [`scheduler`]).
        self.slice(host, root);
    }

    /// The exchange is over: reports it, stores what the cache should keep, releases the
    /// lock (if still ours), tells the other workers and answers the waiters.
    fn conclude(&mut self, host: &dyn Host, id: [u8; ID_LEN], result: Result<Issued, Failure>) {
        let Some(exchange) = self.exchanges.remove(&id) else {
            return;
        };
        self.forget_callout(&exchange);
        let now_ms = host.now_ms();
        let elapsed_ms = match exchange.state {
            State::Dispatched { at_ms, .. } => now_ms.saturating_sub(at_ms),
            _ => 0,
        };
        let counters = &mut self.counters;
        outcome::report(
            host,
            exchange.recipe.as_ref(),
            &result,
            elapsed_ms,
            &mut |m| counters.add(m, 1),
        );
        let stored = std::cell::RefCell::new(None);
        let ticket = exchange.holds_lock.then_some(exchange.ticket);
        slot::finish(host, &exchange.key, ticket, &|current| {
            let entry =
                outcome::entry_after(&result, current, &exchange.config, &exchange.key, now_ms);
            stored.replace(entry.clone());
            entry
        });
        let mut usable_until_ms = 0;
        if let Some(Entry::Token {
            access_token,
            times,
        }) = stored.into_inner()
        {
            usable_until_ms = times.reuse_until_ms;
            self.hot.put(
                &exchange.namespace,
                &exchange.principal,
                exchange.key.id,
                &access_token,
                times,
            );
        }
        self.notify_others(host, &exchange.key);
        answer(
            host,
            &exchange.waiters,
            &exchange.carrier,
            result.map(|issued| (issued.access_token, usable_until_ms)),
        );
    }

    /// Settles an exchange from an entry another worker stored.
    fn settle_from_entry(&mut self, host: &dyn Host, id: [u8; ID_LEN], entry: Entry) {
        let Some(exchange) = self.exchanges.remove(&id) else {
            return;
        };
        self.forget_callout(&exchange);
        if exchange.holds_lock {
            slot::finish(host, &exchange.key, Some(exchange.ticket), &|_| None);
        }
        if let Entry::Token {
            access_token,
            times,
        } = &entry
        {
            self.hot.put(
                &exchange.namespace,
                &exchange.principal,
                exchange.key.id,
                access_token,
                *times,
            );
        }
        answer(host, &exchange.waiters, &exchange.carrier, answer_of(entry));
    }

    /// Ends an exchange nobody needs any more, releasing its lock.
    fn drop_exchange(&mut self, host: &dyn Host, id: [u8; ID_LEN]) {
        if let Some(exchange) = self.exchanges.remove(&id) {
            self.forget_callout(&exchange);
            if exchange.holds_lock {
                slot::finish(host, &exchange.key, Some(exchange.ticket), &|_| None);
                self.notify_others(host, &exchange.key);
            }
            answer(
                host,
                &exchange.waiters,
                &exchange.carrier,
                Err(exchange.state.expiry_failure()),
            );
        }
    }

    fn forget_callout(&mut self, exchange: &Exchange) {
        if let State::Dispatched { callout, .. } = exchange.state {
            self.callouts.remove(&callout);
        }
    }

    /// Tells every other live worker that the exchange for `key` ended.
    pub(super) fn notify_others(&self, host: &dyn Host, key: &CacheKey) {
        let notice = Notice {
            key_id: key.id,
            stored_at_ns: host.now_ns(),
        }
        .encode();
        for queue in registry::live_queues(host) {
            if Some(queue) != self.queue {
                host.enqueue(queue, &notice);
            }
        }
    }

    /// Another worker ended an exchange: forget this worker's copy of the identity's
    /// token, and settle (or take over) what waited on it here.
    pub(super) fn on_notice(&mut self, host: &dyn Host, root: u32, notice: &Notice) {
        self.hot.forget(&notice.key_id);
        let waiting = self
            .exchanges
            .get(&notice.key_id)
            .is_some_and(|e| matches!(e.state, State::Elsewhere { .. }));
        if waiting {
            host.record(
                Metric::WakeMicros,
                host.now_ns().saturating_sub(notice.stored_at_ns) / 1000,
            );
            self.pick_up(host, root, notice.key_id);
        }
    }

    /// Looks again at an exchange awaited elsewhere: settles it from the stored result,
    /// keeps waiting while the holder's lock stands, or takes over.
    fn pick_up(&mut self, host: &dyn Host, root: u32, id: [u8; ID_LEN]) {
        if let Some(exchange) = self.exchanges.get_mut(&id) {
            exchange.state = State::Queued {
                since_ms: host.now_ms(),
            };
            self.start(host, root, id);
        }
    }

    /// Ends what is past its deadline and makes up for lost wake-ups and notices (see the
    /// module's documentation). Runs on the driving root's tick.
    pub(super) fn sweep(&mut self, host: &dyn Host, root: u32) {
        let now_ms = host.now_ms();
        // Waiters past their own deadline are answered, whatever the exchange's state.
        for exchange in self.exchanges.values_mut() {
            if exchange.waiters.iter().all(|w| w.answer_by_ms > now_ms) {
                continue;
            }
            let failure = exchange.state.expiry_failure();
            let (late, waiting): (Vec<Waiter>, Vec<Waiter>) = exchange
                .waiters
                .iter()
                .partition(|w| w.answer_by_ms <= now_ms);
            exchange.waiters = waiting;
            answer(host, &late, &exchange.carrier, Err(failure));
        }
        let ids: Vec<[u8; ID_LEN]> = self.exchanges.keys().copied().collect();
        for id in ids {
            let Some(exchange) = self.exchanges.get(&id) else {
                continue;
            };
            let abandoned = exchange.waiters.is_empty() && !exchange.refresh;
            match &exchange.state {
                State::Dispatched { .. } => {} // its answer may still be cached for others
                _ if abandoned => {
                    self.drop_exchange(host, id);
                    continue;
                }
                _ => {}
            }
            match &exchange.state {
                State::Queued { since_ms } if now_ms >= since_ms + exchange.patience_ms => {
                    self.expire(host, id);
                }
                // Waits on the holder's notice; a lost one, or a holder gone past its
                // deadline, is found here.
                State::Elsewhere { .. } => self.pick_up(host, root, id),
                state if exchange_deadline(state).is_some_and(|d| now_ms >= d) => {
                    self.expire(host, id);
                }
                _ => {}
            }
        }
        let lost_wake = self
            .wake_requested_ms
            .is_some_and(|at| now_ms.saturating_sub(at) >= WAKE_LOST_MS);
        let ready = self.exchanges.values().any(|e| {
            matches!(
                e.state,
                State::Queued { .. } | State::Signed { .. } | State::Calling { .. }
            )
        });
        if lost_wake || ready {
            self.run_ready(host, root);
        }
    }

    /// Ends an exchange by its deadline: its waiters get the state's failure, its lock is
    /// released, nothing is stored (the next request starts afresh).
    fn expire(&mut self, host: &dyn Host, id: [u8; ID_LEN]) {
        let Some(exchange) = self.exchanges.get(&id) else {
            return;
        };
        let (destination, _) = exchange.recipe.describe();
        let state = exchange.state.name();
        if !exchange.waiters.is_empty() || exchange.holds_lock {
            host.log(
                Level::Warn,
                &format!(
                    "destination {destination}: token exchange ended by its deadline while {state}"
                ),
            );
        }
        self.counters.add(Metric::DeadlinePassed, 1);
        self.drop_exchange(host, id);
    }

    /// Signs for one slice of time (see [`scheduler`]), oldest signature first. The slice
    /// grows with the wait of the oldest exchange that needs signing, queued ones included
    /// (a wave of new users waits mostly queued, behind [`SIGNING_AT_ONCE`] signatures).
    pub(super) fn slice(&mut self, host: &dyn Host, root: u32) {
        let mut signing: Vec<(u64, u64, [u8; ID_LEN])> = self
            .exchanges
            .iter()
            .filter_map(|(id, e)| match e.state {
                State::Signing { since_ms, .. } => Some((since_ms, e.seq, *id)),
                _ => None,
            })
            .collect();
        signing.sort_unstable();
        if signing.is_empty() {
            return;
        }
        let oldest_ms = self
            .exchanges
            .values()
            .filter(|e| matches!(e.state, State::Signing { .. } | State::Queued { .. }))
            .map(|e| e.queued_at_ms)
            .min()
            .unwrap_or(0);
        let start_ns = host.now_ns();
        let slice_ns = self
            .scheduler
            .slice_ns(start_ns, (start_ns / 1_000_000).saturating_sub(oldest_ms));
        if slice_ns == 0 {
            return;
        }
        let end_ns = start_ns + slice_ns;
        let mut now_ns = start_ns;
        for (_, _, id) in signing {
            if now_ns >= end_ns {
                break;
            }
            let Some(exchange) = self.exchanges.get_mut(&id) else {
                continue;
            };
            let State::Signing { work, .. } = &mut exchange.state else {
                continue;
            };
            let (result, then_ns) = scheduler::run(host, work.as_mut(), now_ns, end_ns);
            let spent = then_ns.saturating_sub(now_ns);
            now_ns = then_ns;
            exchange.signing_ns += spent;
            self.scheduler.spend(spent);
            if let Some(result) = result {
                self.signature_done(host, id, result);
                self.go_on(host, root, id);
                // A place to sign is free: the next queued exchange starts.
                self.run_ready(host, root);
                now_ns = host.now_ns();
            }
        }
    }

    /// One step of the oldest signature under way, from a request's context. A request
    /// cannot dispatch the callout (it would own it), so a finished signature is left for
    /// the next worker-level callback, woken at once.
    pub(super) fn help_sign(&mut self, host: &dyn Host) {
        if self.exchanges.is_empty() {
            return; // the common case
        }
        let Some((&id, _)) = self
            .exchanges
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Signing { .. }))
            .min_by_key(|(_, e)| e.seq)
        else {
            return;
        };
        let started_ns = host.now_ns();
        if !self.scheduler.may_help(started_ns) {
            return;
        }
        let Some(exchange) = self.exchanges.get_mut(&id) else {
            return;
        };
        let State::Signing { work, .. } = &mut exchange.state else {
            return;
        };
        let result = work.advance(work.units_per_step());
        let spent = host.now_ns().saturating_sub(started_ns);
        exchange.signing_ns += spent;
        self.scheduler.spend(spent);
        if let Some(result) = result {
            self.signature_done(host, id, result);
            let now_ms = host.now_ms();
            self.request_wake(host, now_ms);
        }
    }

    /// Records the signing time and keeps the signature for the next step.
    fn signature_done(
        &mut self,
        host: &dyn Host,
        id: [u8; ID_LEN],
        result: Result<String, SignError>,
    ) {
        let Some(exchange) = self.exchanges.get_mut(&id) else {
            return;
        };
        if let State::Signing {
            work, deadline_ms, ..
        } = &exchange.state
        {
            host.record(work.metric(), exchange.signing_ns / 1000);
            exchange.state = State::Signed {
                result,
                deadline_ms: *deadline_ms,
            };
        }
    }

    /// Whether callouts dispatched by `root` are still out (a root that Envoy shuts down
    /// is kept until their answers came: they come within their timeouts).
    pub(super) fn owns_callouts(&self, root: u32) -> bool {
        self.exchanges
            .values()
            .any(|e| matches!(e.state, State::Dispatched { owner, .. } if owner == root))
    }
}

/// The deadline of a state that has one of its own.
fn exchange_deadline(state: &State) -> Option<u64> {
    match state {
        State::Signing { deadline_ms, .. }
        | State::Signed { deadline_ms, .. }
        | State::Calling { deadline_ms, .. }
        | State::Dispatched { deadline_ms, .. } => Some(*deadline_ms),
        State::Queued { .. } | State::Elsewhere { .. } => None,
    }
}

/// Resumes (with the credential, usable until the given time) or answers (with the
/// failure) every waiter.
fn answer(
    host: &dyn Host,
    waiters: &[Waiter],
    carrier: &Carrier,
    outcome: Result<(String, u64), Failure>,
) {
    match outcome {
        Ok((credential, usable_until_ms)) => {
            let value = carrier.value(&credential);
            for waiter in waiters {
                host.resume(waiter.request, &carrier.header, &value, usable_until_ms);
            }
        }
        Err(failure) => {
            for waiter in waiters {
                host.fail(waiter.request, &failure);
            }
        }
    }
}
