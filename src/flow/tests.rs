use super::exchanges::{RESPONSE_GRACE_MS, SIGNING_LOCK_MS, WAITER_GRACE_MS};
use super::scheduler::{
    IDLE_SIGNING_SLICES, MAX_SIGNING_SLICES, SIGNING_SLICE_US, SIGNING_WAIT_STEP_MS,
};
use super::*;
use super::{exchanges, recipe};
use crate::cache::{self, CacheKey};
use crate::coordination::notice::WAKE;
use crate::host::{Callouts, Clock, Level, Queues, Random, Requests, SharedData, Telemetry};
use crate::identity::{self, Identity};
use crate::oauth::token_request::TokenRequest;
use crate::testing::{config_json, destination_json, parse};
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// An in-memory host that records what the engine asks of it. Several workers may share
/// one (shared data and queues are per VM set, as in Envoy); queued messages are delivered
/// by the test ([`deliver`]), so a test can also lose them.
#[derive(Default)]
struct FakeHost {
    now_ns: Cell<u64>,
    /// How far the clock moves on every reading (0: it stands still).
    clock_step_ns: Cell<u64>,
    shared: crate::testing::MemoryShared,
    /// Every callout: its owner root and request (callout token = 101 + index).
    dispatched: RefCell<Vec<(u32, TokenRequest)>>,
    queues: RefCell<HashMap<u32, Vec<Vec<u8>>>>,
    resumed: RefCell<Vec<(u32, String)>>,
    /// The header each resumed request got its credential in.
    resumed_headers: RefCell<Vec<String>>,
    /// Until when each resumed request's credential may be used (ms).
    resumed_until: RefCell<Vec<u64>>,
    failed: RefCell<Vec<(u32, Failure)>>,
    gone: RefCell<Vec<u32>>,
    refuse_dispatch: Cell<bool>,
    /// Messages are accepted and vanish (a lost wake-up or notice).
    lose_messages: Cell<bool>,
    no_randomness: Cell<bool>,
    random_counter: Cell<u64>,
    logs: RefCell<Vec<String>>,
    metrics: RefCell<HashMap<Metric, u64>>,
    /// Sums of histogram samples.
    sums: RefCell<HashMap<Metric, u64>>,
}

impl Clock for FakeHost {
    fn now_ns(&self) -> u64 {
        self.now_ns
            .set(self.now_ns.get() + self.clock_step_ns.get());
        self.now_ns.get()
    }
}

impl Random for FakeHost {
    fn fill_random(&self, buf: &mut [u8]) -> bool {
        for chunk in buf.chunks_mut(8) {
            self.random_counter.set(self.random_counter.get() + 1);
            let bytes = self
                .random_counter
                .get()
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .to_be_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        !self.no_randomness.get()
    }
}

impl SharedData for FakeHost {
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.shared.shared_get(key)
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        self.shared.shared_set(key, value, cas)
    }
}

impl Queues for FakeHost {
    fn enqueue(&self, queue: u32, message: &[u8]) -> bool {
        if !self.lose_messages.get() {
            self.queues
                .borrow_mut()
                .entry(queue)
                .or_default()
                .push(message.to_vec());
        }
        true
    }
}

impl Callouts for FakeHost {
    fn dispatch(&self, owner: u32, request: &TokenRequest) -> Option<u32> {
        if self.refuse_dispatch.get() {
            return None;
        }
        self.dispatched.borrow_mut().push((owner, request.clone()));
        Some(100 + self.dispatched.borrow().len() as u32)
    }
}

impl Requests for FakeHost {
    fn resume(&self, id: u32, header: &str, value: &str, usable_until_ms: u64) -> bool {
        if self.gone.borrow().contains(&id) {
            return false;
        }
        self.resumed_headers.borrow_mut().push(header.into());
        self.resumed_until.borrow_mut().push(usable_until_ms);
        self.resumed.borrow_mut().push((id, value.into()));
        true
    }
    fn fail(&self, id: u32, failure: &Failure) -> bool {
        self.failed.borrow_mut().push((id, failure.clone()));
        true
    }
}

impl Telemetry for FakeHost {
    fn log(&self, _: Level, message: &str) {
        self.logs.borrow_mut().push(message.into());
    }
    fn record(&self, metric: Metric, amount: u64) {
        let mut metrics = self.metrics.borrow_mut();
        let value = metrics.entry(metric).or_default();
        match metric.kind() {
            crate::metrics::Kind::Gauge => *value = amount,
            crate::metrics::Kind::Counter => *value += amount,
            crate::metrics::Kind::Histogram => {
                *value += 1; // samples recorded
                *self.sums.borrow_mut().entry(metric).or_default() += amount;
            }
        }
    }
}

impl FakeHost {
    fn dispatches(&self) -> usize {
        self.dispatched.borrow().len()
    }

    fn metric(&self, metric: Metric) -> u64 {
        self.metrics.borrow().get(&metric).copied().unwrap_or(0)
    }
}

const T0: u64 = 1_795_323_921_000_000_000;
const SECOND: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const OK: &[u8] = br#"{"access_token":"tok-1","token_type":"bearer","expires_in":3600}"#;

fn config() -> Rc<PluginConfig> {
    Rc::new(parse(&config_json(vec![destination_json("d")])).unwrap())
}

fn config_with(settings: Value) -> Rc<PluginConfig> {
    let mut c = config_json(vec![destination_json("d")]);
    for (k, v) in settings.as_object().unwrap() {
        c[k] = v.clone();
    }
    Rc::new(parse(&c).unwrap())
}

fn host() -> FakeHost {
    let h = FakeHost::default();
    h.now_ns.set(T0);
    h
}

/// Worker `n`: its root context is `n` and its queue `1000 + n`.
fn worker(h: &FakeHost, c: &PluginConfig, n: u32) -> Worker {
    let mut w = Worker::new();
    w.configure(h, n, 1000 + n, c);
    w
}

/// Delivers what waits in worker `n`'s queue (wake-ups and notices), as Envoy does.
fn deliver(h: &FakeHost, w: &mut Worker, n: u32) {
    let messages = h
        .queues
        .borrow_mut()
        .remove(&(1000 + n))
        .unwrap_or_default();
    w.on_messages(h, n, &messages);
}

fn alice() -> Value {
    json!({"user_name": "alice", "email": "alice@example.com"})
}

fn bob() -> Value {
    json!({"user_name": "bob"})
}

fn user(name: &str) -> Value {
    json!({ "user_name": name })
}

fn form_of(request: &TokenRequest) -> HashMap<String, String> {
    form_urlencoded::parse(&request.body).into_owned().collect()
}

fn assertion_of(request: &TokenRequest) -> String {
    use base64::Engine;
    let xml = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&form_of(request)["assertion"])
        .unwrap();
    String::from_utf8(xml).unwrap()
}

/// The callout token of the exchange whose assertion names `user`.
fn callout_for(h: &FakeHost, user: &str) -> u32 {
    let position = h
        .dispatched
        .borrow()
        .iter()
        .position(|(_, r)| assertion_of(r).contains(&format!(">{user}<")))
        .unwrap();
    101 + position as u32
}

/// Alice's first request on worker 1: queued, dispatched and answered with [`OK`]
/// (callout 101).
fn first_exchange_for_alice(w: &mut Worker, h: &FakeHost, c: &Rc<PluginConfig>) {
    assert_eq!(w.on_request(h, c, 1, 0, &Some(&alice())), Decision::Wait);
    deliver(h, w, 1);
    w.on_callout_response(h, 1, 101, Some(200), OK);
}

/// The cache key of a user whose token names no issuer and no origin.
fn user_key(namespace: &str, user: &str, slots: u64) -> CacheKey {
    let principal = identity::Principal {
        user_id: user.into(),
        issuer: None,
        origin: None,
    };
    CacheKey::new(namespace, &principal.key(), slots)
}

/// Reuse and refresh times of the token [`first_exchange_for_alice`] cached.
fn alice_token_times(c: &PluginConfig) -> cache::TokenTimes {
    let key = user_key(&c.destinations[0].cache_namespace, "alice", c.cache_slots);
    cache::token_times(T0 / 1_000_000, 3_600_000, None, key.jitter())
}

/// Alice's token is due for refresh on worker 1: returns the host, the configuration,
/// the worker and the token's times, the clock at its refresh time.
fn alice_due_for_refresh() -> (FakeHost, Rc<PluginConfig>, Worker, cache::TokenTimes) {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    first_exchange_for_alice(&mut w, &h, &c);
    let times = alice_token_times(&c);
    h.now_ns.set(times.refresh_at_ms * MS);
    (h, c, w, times)
}

/// Runs worker `n`'s ticks until it stops signing (bounded).
fn sign_to_the_end(h: &FakeHost, w: &mut Worker, n: u32) {
    for _ in 0..10_000 {
        if !w.signing() {
            return;
        }
        h.now_ns.set(h.now_ns.get() + MS);
        w.on_tick(h, n);
    }
    panic!("signing never ended");
}

#[test]
fn concurrent_requests_of_one_user_share_one_exchange() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    for id in 1..=5 {
        assert_eq!(w.on_request(&h, &c, id, 0, &Some(&alice())), Decision::Wait);
    }
    assert_eq!(
        h.queues.borrow()[&1001],
        vec![WAKE.to_vec()],
        "one wake-up for all"
    );
    assert_eq!(h.dispatches(), 0, "dispatch waits for the worker callback");
    deliver(&h, &mut w, 1);
    assert_eq!(h.dispatches(), 1);
    w.on_callout_response(&h, 1, 101, Some(200), OK);
    let resumed = h.resumed.borrow();
    assert_eq!(resumed.len(), 5);
    assert!(resumed.iter().all(|(_, a)| a == "Bearer tok-1"));
    assert_eq!(w.in_flight(), 0);
}

#[test]
fn workers_share_one_exchange_through_the_lock_and_the_notice() {
    let (h, c) = (host(), config());
    let (mut w1, mut w2) = (worker(&h, &c, 1), worker(&h, &c, 2));
    w1.on_request(&h, &c, 1, 0, &Some(&alice()));
    w2.on_request(&h, &c, 2, 0, &Some(&alice()));
    w2.on_request(&h, &c, 3, 0, &Some(&alice()));
    deliver(&h, &mut w1, 1);
    deliver(&h, &mut w2, 2);
    assert_eq!(h.dispatches(), 1, "the second worker found the lock taken");
    assert!(w2.waits_elsewhere());
    w1.on_callout_response(&h, 1, 101, Some(200), OK);
    assert_eq!(h.resumed.borrow().len(), 1);
    deliver(&h, &mut w2, 2);
    assert_eq!(h.resumed.borrow().len(), 3);
    assert!(h.resumed.borrow().iter().all(|(_, a)| a == "Bearer tok-1"));
    assert_eq!((w1.in_flight(), w2.in_flight()), (0, 0));
    w2.flush_metrics(&h);
    assert_eq!(h.metric(Metric::JoinedRemote), 2);
    assert_eq!(h.metric(Metric::WakeMicros), 1, "one wake-up measured");
}

#[test]
fn a_failed_exchange_reaches_waiters_on_every_worker_and_is_retried_after_backoff() {
    let (h, c) = (host(), config());
    let (mut w1, mut w2) = (worker(&h, &c, 1), worker(&h, &c, 2));
    w1.on_request(&h, &c, 1, 0, &Some(&alice()));
    w2.on_request(&h, &c, 2, 0, &Some(&alice()));
    deliver(&h, &mut w1, 1);
    deliver(&h, &mut w2, 2);
    w1.on_callout_response(&h, 1, 101, Some(504), b"upstream request timeout");
    deliver(&h, &mut w2, 2);
    assert_eq!(
        *h.failed.borrow(),
        vec![(1, Failure::Timeout), (2, Failure::Timeout)]
    );
    // Within the backoff, answered without an exchange; after it, retried.
    assert_eq!(
        w2.on_request(&h, &c, 3, 0, &Some(&alice())),
        Decision::Fail(Failure::Timeout)
    );
    h.now_ns.set(T0 + FAILURE_BACKOFF_MS * MS);
    assert_eq!(w2.on_request(&h, &c, 4, 0, &Some(&alice())), Decision::Wait);
    deliver(&h, &mut w2, 2);
    assert_eq!(h.dispatches(), 2);
    w1.flush_metrics(&h);
    assert_eq!(h.metric(Metric::ExchangeFailed), 1);
}

#[test]
fn a_vanished_lock_holder_is_taken_over_after_its_deadline() {
    let (h, c) = (host(), config());
    let (mut w1, mut w2) = (worker(&h, &c, 1), worker(&h, &c, 2));
    w1.on_request(&h, &c, 1, 0, &Some(&alice()));
    w2.on_request(&h, &c, 2, 0, &Some(&alice()));
    deliver(&h, &mut w1, 1);
    deliver(&h, &mut w2, 2);
    drop(w1); // its VM is gone: its callout never answers, it never releases the lock
    h.now_ns.set(T0 + SECOND);
    w2.on_tick(&h, 2);
    assert_eq!(h.dispatches(), 1, "still within the holder's deadline");
    let timeout_ms = c.destinations[0].saml().unwrap().token_service.timeout_ms;
    h.now_ns.set(T0 + (timeout_ms + RESPONSE_GRACE_MS) * MS);
    w2.on_tick(&h, 2);
    assert_eq!(h.dispatches(), 2);
    w2.on_callout_response(&h, 2, 102, Some(200), OK);
    assert_eq!(*h.resumed.borrow(), vec![(2, "Bearer tok-1".to_string())]);
}

#[test]
fn a_lost_notice_is_made_up_by_the_sweep() {
    let (h, c) = (host(), config());
    let (mut w1, mut w2) = (worker(&h, &c, 1), worker(&h, &c, 2));
    w1.on_request(&h, &c, 1, 0, &Some(&alice()));
    w2.on_request(&h, &c, 2, 0, &Some(&alice()));
    deliver(&h, &mut w1, 1);
    deliver(&h, &mut w2, 2);
    h.lose_messages.set(true);
    w1.on_callout_response(&h, 1, 101, Some(200), OK);
    assert!(
        h.queues.borrow().get(&1002).is_none(),
        "the notice was lost"
    );
    h.now_ns.set(T0 + pacing::SWEEP_MS * MS);
    w2.on_tick(&h, 2);
    assert_eq!(h.resumed.borrow().len(), 2);
}

#[test]
fn cached_token_serves_until_the_margin_then_a_new_exchange_runs() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    first_exchange_for_alice(&mut w, &h, &c);
    assert_eq!(
        w.on_request(&h, &c, 2, 0, &Some(&alice())),
        Decision::Forward("Bearer tok-1".into())
    );
    let times = alice_token_times(&c);
    h.now_ns.set(times.reuse_until_ms * MS - 1);
    assert_eq!(
        w.on_request(&h, &c, 3, 0, &Some(&alice())),
        Decision::Forward("Bearer tok-1".into())
    );
    h.now_ns.set(times.reuse_until_ms * MS);
    assert_eq!(w.on_request(&h, &c, 4, 0, &Some(&alice())), Decision::Wait);
}

#[test]
fn tokens_are_refreshed_ahead_in_the_background_without_making_anyone_wait() {
    let (h, c, mut w, _) = alice_due_for_refresh();
    for id in 2..=3 {
        assert_eq!(
            w.on_request(&h, &c, id, 0, &Some(&alice())),
            Decision::Forward("Bearer tok-1".into())
        );
    }
    deliver(&h, &mut w, 1);
    assert_eq!(h.dispatches(), 2, "one refresh, not one per request");
    w.on_callout_response(
        &h,
        1,
        102,
        Some(200),
        br#"{"access_token":"tok-2","token_type":"bearer","expires_in":3600}"#,
    );
    assert_eq!(
        w.on_request(&h, &c, 4, 0, &Some(&alice())),
        Decision::Forward("Bearer tok-2".into())
    );
    assert_eq!(w.in_flight(), 0);
    w.flush_metrics(&h);
    assert_eq!(h.metric(Metric::Refresh), 1);
}

#[test]
fn a_failed_refresh_keeps_the_token_and_backs_off() {
    let (h, c, mut w, times) = alice_due_for_refresh();
    w.on_request(&h, &c, 2, 0, &Some(&alice()));
    deliver(&h, &mut w, 1);
    w.on_callout_response(&h, 1, 102, Some(503), b"down");
    assert_eq!(
        w.on_request(&h, &c, 3, 0, &Some(&alice())),
        Decision::Forward("Bearer tok-1".into())
    );
    deliver(&h, &mut w, 1);
    assert_eq!(h.dispatches(), 2, "no new refresh within the backoff");
    h.now_ns
        .set(times.refresh_at_ms * MS + FAILURE_BACKOFF_MS * MS);
    w.on_request(&h, &c, 4, 0, &Some(&alice()));
    deliver(&h, &mut w, 1);
    assert_eq!(h.dispatches(), 3);
}

#[test]
fn every_exchange_gets_a_fresh_assertion_id() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    w.on_request(&h, &c, 1, 0, &Some(&alice()));
    deliver(&h, &mut w, 1);
    w.on_callout_response(&h, 1, 101, Some(503), b"down");
    h.now_ns.set(T0 + 2 * SECOND);
    w.on_request(&h, &c, 2, 0, &Some(&alice()));
    deliver(&h, &mut w, 1);
    let ids: Vec<String> = h
        .dispatched
        .borrow()
        .iter()
        .map(|(_, r)| {
            let xml = assertion_of(r);
            let start = xml.find(" ID=\"").unwrap() + 5;
            xml[start..start + 33].to_string()
        })
        .collect();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
}

#[test]
fn users_and_failures_are_kept_apart() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    w.on_request(&h, &c, 1, 0, &Some(&alice()));
    w.on_request(&h, &c, 2, 0, &Some(&bob()));
    deliver(&h, &mut w, 1);
    assert_eq!(h.dispatches(), 2);
    let (bob_call, alice_call) = (callout_for(&h, "bob"), callout_for(&h, "alice"));
    w.on_callout_response(&h, 1, bob_call, Some(400), br#"{"error":"invalid_grant"}"#);
    w.on_callout_response(&h, 1, alice_call, Some(200), OK);
    assert_eq!(
        *h.failed.borrow(),
        vec![(
            2,
            Failure::Rejected {
                code: "invalid_grant".into()
            }
        )]
    );
    assert_eq!(*h.resumed.borrow(), vec![(1, "Bearer tok-1".to_string())]);
    // bob's rejection is held briefly and answered without a new exchange.
    assert_eq!(
        w.on_request(&h, &c, 3, 0, &Some(&bob())),
        Decision::Fail(Failure::Rejected {
            code: "invalid_grant".into()
        })
    );
    h.now_ns.set(T0 + 5 * SECOND);
    assert_eq!(w.on_request(&h, &c, 4, 0, &Some(&bob())), Decision::Wait);
    assert!(h.logs.borrow().iter().all(|l| !l.contains("tok-1")));
    assert!(h
        .logs
        .borrow()
        .iter()
        .any(|l| l.contains("\"bob\"") && l.contains("invalid_grant")));
}

#[test]
fn a_slot_taken_by_another_user_is_a_miss_not_their_token() {
    let c = config_with(json!({"tokenCacheSlots": 1, "workerCacheEntries": 0}));
    let h = host();
    let mut w = worker(&h, &c, 1);
    first_exchange_for_alice(&mut w, &h, &c);
    assert_eq!(w.on_request(&h, &c, 2, 0, &Some(&bob())), Decision::Wait);
    deliver(&h, &mut w, 1);
    w.on_callout_response(
        &h,
        1,
        102,
        Some(200),
        br#"{"access_token":"tok-bob","token_type":"bearer","expires_in":3600}"#,
    );
    assert_eq!(
        h.resumed.borrow().last().unwrap(),
        &(2, "Bearer tok-bob".to_string())
    );
    let slots = h
        .shared
        .map
        .borrow()
        .keys()
        .filter(|k| k.starts_with(crate::coordination::slot::SLOT_PREFIX))
        .count();
    assert_eq!(slots, 1);
    assert_eq!(
        w.on_request(&h, &c, 3, 0, &Some(&alice())),
        Decision::Wait,
        "evicted, never bob's token"
    );
}

#[test]
fn unusable_users_are_refused_before_any_exchange() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    assert_eq!(
        w.on_request(&h, &c, 1, 0, &None),
        Decision::Fail(Failure::NotAuthenticated)
    );
    assert!(matches!(
        w.on_request(&h, &c, 2, 0, &Some(&json!({"sub": "x"}))),
        Decision::Fail(Failure::UserId(_))
    ));
    assert_eq!(
        w.on_request(&h, &c, 3, 0, &Some(&json!({"user_name": "a\u{1}"}))),
        Decision::Fail(Failure::UserIdNotXml)
    );
    assert!(h.queues.borrow().is_empty());
}

#[test]
fn a_refused_callout_fails_its_waiters_and_frees_the_lock() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    h.refuse_dispatch.set(true);
    w.on_request(&h, &c, 1, 0, &Some(&alice()));
    deliver(&h, &mut w, 1);
    assert!(matches!(
        h.failed.borrow()[0],
        (1, Failure::Unavailable { .. })
    ));
    assert_eq!(w.in_flight(), 0);
    h.refuse_dispatch.set(false);
    h.now_ns.set(T0 + FAILURE_BACKOFF_MS * MS);
    w.on_request(&h, &c, 2, 0, &Some(&alice()));
    deliver(&h, &mut w, 1);
    assert_eq!(h.dispatches(), 1, "the lock was released");
}

#[test]
fn requests_that_went_away_are_skipped_and_the_rest_still_resume() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    for id in 1..=3 {
        w.on_request(&h, &c, id, 0, &Some(&alice()));
    }
    w.forget_request(1);
    h.gone.borrow_mut().push(2);
    deliver(&h, &mut w, 1);
    w.on_callout_response(&h, 1, 101, Some(200), OK);
    assert_eq!(*h.resumed.borrow(), vec![(3, "Bearer tok-1".to_string())]);
}

#[test]
fn short_lived_tokens_serve_their_waiters_but_are_not_cached() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    w.on_request(&h, &c, 1, 0, &Some(&alice()));
    deliver(&h, &mut w, 1);
    w.on_callout_response(
        &h,
        1,
        101,
        Some(200),
        br#"{"access_token":"t","token_type":"bearer","expires_in":20}"#,
    );
    assert_eq!(*h.resumed.borrow(), vec![(1, "Bearer t".to_string())]);
    assert_eq!(w.on_request(&h, &c, 2, 0, &Some(&alice())), Decision::Wait);
}

#[test]
fn an_unconfigured_worker_or_no_randomness_fails_the_request_closed() {
    let (h, c) = (host(), config());
    let mut bare = Worker::new();
    assert!(matches!(
        bare.on_request(&h, &c, 1, 0, &Some(&alice())),
        Decision::Fail(Failure::Internal { .. })
    ));
    assert_eq!(bare.in_flight(), 0);
    let mut w = worker(&h, &c, 1);
    h.no_randomness.set(true);
    assert!(matches!(
        w.on_request(&h, &c, 2, 0, &Some(&alice())),
        Decision::Fail(Failure::Internal { .. })
    ));
    h.no_randomness.set(false);
    assert_eq!(w.on_request(&h, &c, 3, 0, &Some(&alice())), Decision::Wait);
    assert_eq!(w.in_flight(), 1);
}

#[test]
fn a_callout_without_response_is_a_timeout_only_once_its_timeout_has_passed() {
    let timeout_ns = config().destinations[0]
        .saml()
        .unwrap()
        .token_service
        .timeout_ms
        * MS;
    for (elapsed_ns, expected) in [
        (SECOND, "reset"),
        (timeout_ns / 10 * 9 - MS, "reset"),
        (timeout_ns / 10 * 9, "timeout"),
        (timeout_ns, "timeout"),
    ] {
        let (h, c) = (host(), config());
        let mut w = worker(&h, &c, 1);
        w.on_request(&h, &c, 1, 0, &Some(&alice()));
        deliver(&h, &mut w, 1);
        h.now_ns.set(T0 + elapsed_ns);
        w.on_callout_response(&h, 1, 101, None, b"");
        let failed = h.failed.borrow();
        match expected {
            "timeout" => assert_eq!(failed[0], (1, Failure::Timeout)),
            _ => assert!(
                matches!(failed[0], (1, Failure::Unavailable { .. })),
                "{elapsed_ns}"
            ),
        }
        assert_eq!(
            failed[0].1.reply().status,
            if expected == "timeout" { 504 } else { 503 }
        );
    }
}

#[test]
fn unusable_answers_are_never_cached_and_a_healed_service_is_used_after_the_backoff() {
    let answers: [(Option<u16>, &[u8]); 9] = [
        (None, b""),
        (Some(503), b"<html>down</html>"),
        (Some(500), b"<html>oops</html>"),
        (Some(200), b""),
        (Some(200), b"access_token=bad&token_type=bearer"),
        (Some(200), br#"{"token_type":"bearer","expires_in":60}"#),
        (
            Some(200),
            br#"{"access_token":"bad","token_type":"bearer","expires_in":-60}"#,
        ),
        (
            Some(200),
            br#"{"access_token":"bad","token_type":"bearer","expires_in":"soon"}"#,
        ),
        (
            Some(200),
            br#"{"access_token":"bad","token_type":"mac","expires_in":60}"#,
        ),
    ];
    for (status, body) in answers {
        let (h, c) = (host(), config());
        let mut w = worker(&h, &c, 1);
        w.on_request(&h, &c, 1, 0, &Some(&alice()));
        deliver(&h, &mut w, 1);
        w.on_callout_response(&h, 1, 101, status, body);
        assert!(h.resumed.borrow().is_empty());
        let reply = h.failed.borrow()[0].1.reply();
        assert_eq!(reply.status, 503, "{body:?}");
        assert!(!reply.body.contains("bad"));
        // Held for the backoff (no exchange), then tried again.
        h.now_ns.set(T0 + (FAILURE_BACKOFF_MS - 1) * MS);
        assert!(matches!(
            w.on_request(&h, &c, 2, 0, &Some(&alice())),
            Decision::Fail(Failure::Unavailable { .. })
        ));
        h.now_ns.set(T0 + FAILURE_BACKOFF_MS * MS);
        assert_eq!(w.on_request(&h, &c, 3, 0, &Some(&alice())), Decision::Wait);
        deliver(&h, &mut w, 1);
        assert_eq!(h.dispatches(), 2);
        w.on_callout_response(&h, 1, 102, Some(200), OK);
        assert_eq!(*h.resumed.borrow(), vec![(3, "Bearer tok-1".to_string())]);
        assert_eq!(
            w.on_request(&h, &c, 4, 0, &Some(&alice())),
            Decision::Forward("Bearer tok-1".into())
        );
    }
}

#[test]
fn rsa_signing_runs_in_short_slices_while_the_lock_is_held() {
    let (h, c) = (host(), config());
    let (mut w1, mut w2) = (worker(&h, &c, 1), worker(&h, &c, 2));
    // 100 µs per clock reading, that is per 4 units: a 250 µs slice is 3 readings.
    h.clock_step_ns.set(100_000);
    assert_eq!(w1.on_request(&h, &c, 1, 0, &Some(&alice())), Decision::Wait);
    deliver(&h, &mut w1, 1);
    assert!(
        w1.signing(),
        "the first slice did not finish a 2048-bit signature"
    );
    assert_eq!(h.dispatches(), 0);
    // Meanwhile: the same user joins here, and another worker waits for the lock.
    assert_eq!(w1.on_request(&h, &c, 2, 0, &Some(&alice())), Decision::Wait);
    assert_eq!(w2.on_request(&h, &c, 3, 0, &Some(&alice())), Decision::Wait);
    deliver(&h, &mut w2, 2);
    assert!(!w2.signing(), "w2 does not sign: w1 holds the lock");
    let mut slices = 1;
    while w1.signing() && slices < 1_000 {
        // A busy worker: a request (unauthenticated: answered at once) between slices.
        w1.on_request(&h, &c, 900, 0, &None);
        h.now_ns.set(h.now_ns.get() + MS);
        let before = h.now_ns.get();
        w1.slice(&h, 1);
        let spent_us = (h.now_ns.get() - before) / 1000;
        // (The last slice also dispatches, at 100 µs a clock reading here.)
        assert!(
            spent_us <= SIGNING_SLICE_US + 300 || !w1.signing(),
            "a slice took {spent_us} µs"
        );
        slices += 1;
    }
    // 518 units; 8 to 12 a slice (the fake clock also moves on the slice's own reads)
    // and 4 by each request.
    assert!((30..=45).contains(&slices), "{slices} slices");
    assert_eq!(h.dispatches(), 1);
    w1.on_callout_response(&h, 1, 101, Some(200), OK);
    assert_eq!(
        *h.resumed.borrow(),
        vec![
            (1, "Bearer tok-1".to_string()),
            (2, "Bearer tok-1".to_string())
        ]
    );
    deliver(&h, &mut w2, 2);
    assert_eq!(h.resumed.borrow().len(), 3);
    assert_eq!(h.dispatches(), 1, "one exchange for all");
    w1.flush_metrics(&h);
    assert_eq!(h.metric(Metric::SigningMicros), 1, "one signature recorded");
}

#[test]
fn the_slice_grows_only_when_a_signature_has_waited() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    h.clock_step_ns.set(100_000);
    // On a busy worker (a request since the last slice).
    let slice_us = |w: &mut Worker| {
        w.on_request(&h, &c, 900, 0, &None);
        let before = h.now_ns.get();
        w.slice(&h, 1);
        (h.now_ns.get() - before) / 1000
    };
    for id in 1..=6 {
        w.on_request(&h, &c, id, 0, &Some(&user(&format!("u{id}"))));
    }
    deliver(&h, &mut w, 1);
    let signing_since = h.now_ns.get();
    let spent = slice_us(&mut w);
    assert!(spent <= SIGNING_SLICE_US + 300, "fresh: {spent} µs");
    // The host was busy: the oldest signature has waited 250 ms, then 1.75 s (within the
    // signing lock's deadline).
    let long_wait_ms = (MAX_SIGNING_SLICES - 1) * SIGNING_WAIT_STEP_MS;
    assert!(long_wait_ms < SIGNING_LOCK_MS);
    for (waited_ms, slices) in [
        (SIGNING_WAIT_STEP_MS, 2),
        (long_wait_ms, MAX_SIGNING_SLICES),
    ] {
        h.now_ns.set(signing_since + waited_ms * MS);
        let spent = slice_us(&mut w);
        let grown = slices * SIGNING_SLICE_US;
        assert!(
            (grown..=grown + 300).contains(&spent),
            "waited {waited_ms} ms: {spent} µs"
        );
    }
    sign_to_the_end(&h, &mut w, 1);
    assert_eq!(h.dispatches(), 6);
}

#[test]
fn an_idle_worker_signs_in_larger_slices() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    h.clock_step_ns.set(100_000);
    w.on_request(&h, &c, 1, 0, &Some(&alice()));
    deliver(&h, &mut w, 1); // counts the request: this slice is a busy one
    h.now_ns.set(h.now_ns.get() + MS);
    let before = h.now_ns.get();
    w.slice(&h, 1);
    let spent = (h.now_ns.get() - before) / 1000;
    let idle = IDLE_SIGNING_SLICES * SIGNING_SLICE_US;
    assert!((idle..=idle + 300).contains(&spent), "{spent} µs");
}

#[test]
fn signing_never_takes_more_than_its_share_of_the_worker() {
    // A wave of new users on an idle worker: signing as fast as the budget allows.
    for share in [50u64, 25] {
        let c =
            config_with(json!({ "maxSigningSharePercent": share, "maxExchangesPerWorker": 1000 }));
        let h = host();
        let mut w = worker(&h, &c, 1);
        h.clock_step_ns.set(20_000);
        for id in 1..=300 {
            w.on_request(&h, &c, id, 0, &Some(&user(&format!("u{id}"))));
        }
        let started = h.now_ns.get();
        deliver(&h, &mut w, 1);
        for _ in 0..400 {
            h.now_ns.set(h.now_ns.get() + MS); // the worker's other work meanwhile
            w.on_tick(&h, 1);
        }
        assert!(w.signing(), "more to sign than the time allowed");
        let signing_us = h.sums.borrow()[&Metric::SigningMicros];
        let percent = signing_us * 1000 * 100 / (h.now_ns.get() - started);
        assert!(percent <= share + 2, "{percent}% with a {share}% share");
        assert!(percent + 10 >= share, "{percent}%: the share is used");
    }
}

#[test]
fn requests_help_a_signature_under_way_and_leave_the_dispatch_to_the_worker() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    h.clock_step_ns.set(100_000);
    assert_eq!(w.on_request(&h, &c, 1, 0, &Some(&alice())), Decision::Wait);
    deliver(&h, &mut w, 1);
    assert!(w.signing());
    // The clock stands still from here: only requests can move the signature on.
    h.clock_step_ns.set(0);
    let mut requests = 0;
    while h.queues.borrow().get(&1001).is_none() && requests < 1_000 {
        requests += 1;
        w.on_request(&h, &c, 1_000 + requests, 0, &Some(&alice()));
    }
    // 4 units a request (535 for RSA-2048); the first slice had done some already.
    assert!((60..=134).contains(&requests), "{requests} requests");
    assert_eq!(h.dispatches(), 0, "a request does not own the callout");
    deliver(&h, &mut w, 1);
    assert_eq!(h.dispatches(), 1);
    assert!(!w.signing());
    w.on_callout_response(&h, 1, 101, Some(200), OK);
    assert_eq!(h.resumed.borrow().len() as u32, 1 + requests);
}

/// An identity whose host hands the root claims over cheaply as raw bytes (as Envoy
/// does: a string as itself, anything else in a form that is not a string), and which
/// counts how often all the claims were read.
struct CheapClaims {
    claims: Value,
    full_reads: Cell<u32>,
}

impl Identity for CheapClaims {
    fn quick_principal(&self, rule: &identity::UserIdRule) -> Option<identity::Principal> {
        let raw: Vec<(String, Vec<u8>)> = self
            .claims
            .as_object()?
            .iter()
            .map(|(name, value)| match value {
                Value::String(s) => (name.clone(), s.as_bytes().to_vec()),
                _ => (name.clone(), vec![0; 8]),
            })
            .collect();
        let pairs: Vec<(&[u8], &[u8])> = raw
            .iter()
            .map(|(n, v)| (n.as_bytes(), v.as_slice()))
            .collect();
        identity::principal_from_raw(rule, &pairs)
    }
    fn claims(&self) -> Option<Value> {
        self.full_reads.set(self.full_reads.get() + 1);
        Some(self.claims.clone())
    }
}

#[test]
fn all_claims_are_read_only_for_an_exchange_never_for_a_plain_hit() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    let alice = CheapClaims {
        claims: alice(),
        full_reads: Cell::new(0),
    };
    assert_eq!(w.on_request(&h, &c, 1, 0, &alice), Decision::Wait);
    assert_eq!(alice.full_reads.get(), 1, "the assertion's attributes");
    assert_eq!(w.on_request(&h, &c, 2, 0, &alice), Decision::Wait);
    assert_eq!(alice.full_reads.get(), 1, "joining an exchange needs none");
    deliver(&h, &mut w, 1);
    w.on_callout_response(&h, 1, 101, Some(200), OK);
    let hit = Decision::Forward("Bearer tok-1".into());
    assert_eq!(w.on_request(&h, &c, 3, 0, &alice), hit);
    assert_eq!(alice.full_reads.get(), 1, "a hit needs only the principal");
    // The same answer as from the decoded claims.
    assert_eq!(w.on_request(&h, &c, 4, 0, &Some(&alice.claims)), hit);
    h.now_ns.set(alice_token_times(&c).refresh_at_ms * MS);
    assert_eq!(w.on_request(&h, &c, 5, 0, &alice), hit);
    assert_eq!(alice.full_reads.get(), 2, "the refresh's attributes");
    deliver(&h, &mut w, 1);
    assert_eq!(h.dispatches(), 2);
    // A claim the host cannot read cheaply goes the exact way, error included.
    let numbered = CheapClaims {
        claims: json!({"user_name": 5}),
        full_reads: Cell::new(0),
    };
    assert_eq!(
        w.on_request(&h, &c, 6, 0, &numbered),
        Decision::Fail(Failure::UserId(identity::UserIdError::NotAString {
            claim: "user_name".into()
        }))
    );
    assert_eq!(numbered.full_reads.get(), 1);
}

#[test]
fn a_hit_is_served_from_the_workers_copy_without_reading_shared_data() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    first_exchange_for_alice(&mut w, &h, &c);
    let reads = h.shared.reads.get();
    for id in 2..=10 {
        assert_eq!(
            w.on_request(&h, &c, id, 0, &Some(&alice())),
            Decision::Forward("Bearer tok-1".into())
        );
    }
    assert_eq!(h.shared.reads.get(), reads, "no shared-data read on a hit");
    w.flush_metrics(&h);
    assert_eq!(h.metric(Metric::CacheHit), 9);
    // Switched off, every hit reads the slot.
    let c = config_with(json!({"workerCacheEntries": 0}));
    let h = host();
    let mut w = worker(&h, &c, 1);
    first_exchange_for_alice(&mut w, &h, &c);
    let reads = h.shared.reads.get();
    w.on_request(&h, &c, 2, 0, &Some(&alice()));
    assert_eq!(h.shared.reads.get(), reads + 1);
}

#[test]
fn another_workers_exchange_drops_this_workers_copy() {
    let (h, c) = (host(), config());
    let (mut w1, mut w2) = (worker(&h, &c, 1), worker(&h, &c, 2));
    first_exchange_for_alice(&mut w1, &h, &c);
    let hit = |w: &mut Worker, id| w.on_request(&h, &c, id, 0, &Some(&alice()));
    assert_eq!(hit(&mut w2, 2), Decision::Forward("Bearer tok-1".into()));
    deliver(&h, &mut w2, 2); // the first exchange's notice
    assert_eq!(
        hit(&mut w2, 3),
        Decision::Forward("Bearer tok-1".into()),
        "copied"
    );
    // w1 refreshes; w2's copy must not outlive the notice. (Both renew their registry
    // entries on the tick, as they do every two seconds.)
    h.now_ns.set(alice_token_times(&c).refresh_at_ms * MS);
    w1.on_tick(&h, 1);
    w2.on_tick(&h, 2);
    assert_eq!(hit(&mut w1, 4), Decision::Forward("Bearer tok-1".into()));
    deliver(&h, &mut w1, 1);
    w1.on_callout_response(
        &h,
        1,
        102,
        Some(200),
        br#"{"access_token":"tok-2","token_type":"bearer","expires_in":3600}"#,
    );
    deliver(&h, &mut w2, 2);
    assert_eq!(hit(&mut w2, 5), Decision::Forward("Bearer tok-2".into()));
}

// ---- Issue 13: the defects found by reading, reproduced (they failed before the fix) ----

/// A configuration of two destinations with the given callout timeouts (seconds).
fn two_destinations(first_s: u64, second_s: u64) -> Rc<PluginConfig> {
    let mut a = destination_json("slow-target");
    a["tokenServiceURL.SocketReadTimeoutInSeconds"] = json!(first_s.to_string());
    let mut b = destination_json("quick-target");
    b["tokenServiceURL.SocketReadTimeoutInSeconds"] = json!(second_s.to_string());
    Rc::new(parse(&config_json(vec![a, b])).unwrap())
}

#[test]
fn repro_a_callout_that_never_answers_is_ended_and_the_user_starts_afresh() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    assert_eq!(w.on_request(&h, &c, 1, 0, &Some(&alice())), Decision::Wait);
    deliver(&h, &mut w, 1);
    assert_eq!(h.dispatches(), 1);
    // The host drops the callout (its root context was torn down): no response ever.
    let timeout_ns = c.destinations[0].saml().unwrap().token_service.timeout_ms * MS;
    h.now_ns.set(T0 + timeout_ns + SECOND);
    w.on_tick(&h, 1);
    assert_eq!(
        *h.failed.borrow(),
        vec![(1, Failure::Timeout)],
        "the waiter is answered within the timeout plus a second"
    );
    assert_eq!(w.on_request(&h, &c, 2, 0, &Some(&alice())), Decision::Wait);
    deliver(&h, &mut w, 1);
    assert_eq!(h.dispatches(), 2, "a fresh exchange, not a join");
    w.flush_metrics(&h);
    assert_eq!(h.metric(Metric::DeadlinePassed), 1);
}

#[test]
fn repro_a_lost_wake_is_made_up_by_the_tick() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    // The wake-ups for alice's and bob's exchanges are lost.
    h.lose_messages.set(true);
    assert_eq!(w.on_request(&h, &c, 1, 0, &Some(&alice())), Decision::Wait);
    assert_eq!(w.on_request(&h, &c, 2, 0, &Some(&bob())), Decision::Wait);
    h.now_ns.set(T0 + pacing::SWEEP_MS * MS);
    w.on_tick(&h, 1);
    assert_eq!(h.dispatches(), 2, "both exchanges started");
}

#[test]
fn repro_users_whose_locks_share_a_stripe_do_not_wait_for_each_other() {
    // alice's destination waits 600 s for its token service, the other one 1 s. Under the
    // old 4096 lock stripes, `user<i>` shared alice's stripe.
    let c = two_destinations(600, 1);
    let alice_key = user_key(&c.destinations[0].cache_namespace, "alice", c.cache_slots);
    let other = (0..1_000_000)
        .map(|i| format!("user{i}"))
        .find(|u| {
            let k = user_key(&c.destinations[1].cache_namespace, u, c.cache_slots);
            k.slot % 4096 == alice_key.slot % 4096 && k.slot != alice_key.slot
        })
        .unwrap();
    let h = host();
    let (mut w1, mut w2) = (worker(&h, &c, 1), worker(&h, &c, 2));
    w1.on_request(&h, &c, 1, 0, &Some(&alice()));
    deliver(&h, &mut w1, 1);
    assert_eq!(h.dispatches(), 1);
    assert_eq!(
        w2.on_request(&h, &c, 2, 1, &Some(&user(&other))),
        Decision::Wait
    );
    deliver(&h, &mut w2, 2);
    assert_eq!(
        h.dispatches(),
        2,
        "another user's exchange does not wait behind alice's"
    );
}

#[test]
fn repro_a_holder_that_comes_back_late_neither_duplicates_nor_releases_the_new_lock() {
    // Rejections are not held, so nothing but the lock keeps w3 from exchanging.
    let (h, c) = (host(), config_with(json!({"failedExchangeHoldSeconds": 0})));
    let (mut w1, mut w2, mut w3) = (worker(&h, &c, 1), worker(&h, &c, 2), worker(&h, &c, 3));
    w1.on_request(&h, &c, 1, 0, &Some(&alice()));
    deliver(&h, &mut w1, 1);
    assert_eq!(h.dispatches(), 1);
    // w1's callout overruns the lock's deadline (w1 is stuck: no tick ends it); w2 takes
    // over and exchanges.
    let timeout_ms = c.destinations[0].saml().unwrap().token_service.timeout_ms;
    h.now_ns.set(T0 + (timeout_ms + RESPONSE_GRACE_MS + 1) * MS);
    w2.on_request(&h, &c, 2, 0, &Some(&alice()));
    deliver(&h, &mut w2, 2);
    assert_eq!(h.dispatches(), 2, "w2 took over the abandoned lock");
    // w1's answer arrives late: it must not free the lock w2 now holds.
    w1.on_callout_response(&h, 1, 101, Some(400), br#"{"error":"invalid_grant"}"#);
    w3.on_request(&h, &c, 3, 0, &Some(&alice()));
    deliver(&h, &mut w3, 3);
    assert_eq!(
        h.dispatches(),
        2,
        "w3 joins w2's exchange instead of starting a third"
    );
    assert!(w3.waits_elsewhere());
}

#[test]
fn repro_a_holder_whose_signing_overran_the_lock_does_not_exchange_as_well() {
    let (h, c) = (host(), config());
    let (mut w1, mut w2) = (worker(&h, &c, 1), worker(&h, &c, 2));
    h.clock_step_ns.set(100_000);
    w1.on_request(&h, &c, 1, 0, &Some(&alice()));
    deliver(&h, &mut w1, 1);
    assert!(w1.signing(), "signing is under way, the lock taken");
    // A signing backlog: w1 does not get to its slices until the lock's deadline passed.
    h.now_ns.set(T0 + (SIGNING_LOCK_MS + 1) * MS);
    w2.on_request(&h, &c, 2, 0, &Some(&alice()));
    deliver(&h, &mut w2, 2);
    sign_to_the_end(&h, &mut w2, 2);
    assert_eq!(h.dispatches(), 1, "w2 exchanges");
    // w1's signature finishes (its slices, not its sweep, came first).
    while w1.signing() {
        w1.on_request(&h, &c, 900, 0, &None);
        w1.on_messages(&h, 1, &[]);
        w1.slice(&h, 1);
    }
    w1.on_messages(&h, 1, &[WAKE.to_vec()]);
    assert_eq!(
        h.dispatches(),
        1,
        "w1, no longer the holder, joins instead of exchanging too"
    );
    assert!(w1.waits_elsewhere());
}

#[test]
fn repro_new_users_beyond_the_admission_cap_are_refused_at_once_without_signing() {
    let c = config_with(json!({"maxExchangesPerWorker": 8}));
    let h = host();
    let mut w = worker(&h, &c, 1);
    for id in 0..20u32 {
        let decision = w.on_request(&h, &c, id, 0, &Some(&user(&format!("u{id}"))));
        if id < 8 {
            assert_eq!(decision, Decision::Wait);
        } else {
            let Decision::Fail(failure) = decision else {
                panic!("{id} admitted")
            };
            let reply = failure.reply();
            assert_eq!(reply.status, 503);
            assert!(reply.headers.iter().any(|(k, _)| *k == "retry-after"));
        }
    }
    assert_eq!(w.in_flight(), 8);
    // Cached users are never refused, and a user already waiting may join.
    assert_eq!(
        w.on_request(&h, &c, 99, 0, &Some(&user("u3"))),
        Decision::Wait
    );
    w.flush_metrics(&h);
    assert_eq!(h.metric(Metric::AdmissionRefused), 12);
}

#[test]
fn repro_a_refresh_too_short_lived_to_cache_is_not_retried_every_half_second() {
    let (h, c, mut w, times) = alice_due_for_refresh();
    w.on_request(&h, &c, 2, 0, &Some(&alice()));
    deliver(&h, &mut w, 1);
    assert_eq!(h.dispatches(), 2, "the refresh");
    w.on_callout_response(
        &h,
        1,
        102,
        Some(200),
        br#"{"access_token":"short","token_type":"bearer","expires_in":20}"#,
    );
    // The old token still serves; no refresh every 500 ms until it runs out.
    for step in 1..=10 {
        h.now_ns
            .set(times.refresh_at_ms * MS + step * FAILURE_BACKOFF_MS * MS);
        assert_eq!(
            w.on_request(&h, &c, 10 + step as u32, 0, &Some(&alice())),
            Decision::Forward("Bearer tok-1".into())
        );
        deliver(&h, &mut w, 1);
    }
    assert_eq!(h.dispatches(), 2, "no retry of a successful refresh");
}

// ---- The explicit states and their deadlines ----

#[test]
fn every_waiter_is_answered_within_its_destinations_timeout_whatever_the_state() {
    // A worker that never gets to sign (its slices never come): the waiters get 503 at
    // their deadline, the lock is released and the next request starts afresh.
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    w.on_request(&h, &c, 1, 0, &Some(&alice()));
    h.clock_step_ns.set(100_000);
    deliver(&h, &mut w, 1);
    h.clock_step_ns.set(0);
    let timeout_ms = c.destinations[0].saml().unwrap().token_service.timeout_ms;
    // A request joins later; it waits its own full time.
    h.now_ns.set(T0 + SECOND);
    w.on_request(&h, &c, 2, 0, &Some(&alice()));
    assert!(w.signing());
    // Past the signing lock's deadline: the exchange ends, both waiters are answered.
    h.now_ns.set(T0 + SIGNING_LOCK_MS * MS + SECOND);
    w.sweep(&h, 1);
    let failed = h.failed.borrow().clone();
    assert_eq!(failed.len(), 2);
    assert!(failed.iter().all(|(_, f)| f.reply().status == 503));
    assert!(SIGNING_LOCK_MS < timeout_ms + WAITER_GRACE_MS);
    assert_eq!(w.in_flight(), 0);
    assert_eq!(w.on_request(&h, &c, 3, 0, &Some(&alice())), Decision::Wait);
    deliver(&h, &mut w, 1);
    assert_eq!(h.dispatches(), 1, "afresh: the lock was released");
}

#[test]
fn waiters_on_another_worker_are_answered_at_their_own_deadline() {
    let (h, c) = (host(), config());
    let (mut w1, mut w2) = (worker(&h, &c, 1), worker(&h, &c, 2));
    w1.on_request(&h, &c, 1, 0, &Some(&alice()));
    deliver(&h, &mut w1, 1);
    w2.on_request(&h, &c, 2, 0, &Some(&alice()));
    deliver(&h, &mut w2, 2);
    assert!(w2.waits_elsewhere());
    let timeout_ms = c.destinations[0].saml().unwrap().token_service.timeout_ms;
    h.now_ns.set(T0 + (timeout_ms + WAITER_GRACE_MS) * MS);
    w2.on_tick(&h, 2);
    assert_eq!(*h.failed.borrow(), vec![(2, Failure::Timeout)]);
    assert_eq!(w2.in_flight(), 0, "nobody waits for it any more");
}

#[test]
fn only_the_driving_root_dispatches_and_a_retiring_root_is_kept_for_its_callouts() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    w.on_request(&h, &c, 1, 0, &Some(&alice()));
    deliver(&h, &mut w, 1);
    assert_eq!(h.dispatched.borrow()[0].0, 1, "owned by root 1");
    // A configuration update: root 2 drives from now on.
    w.configure(&h, 2, 1001, &c);
    assert_eq!(w.tick_period_ms(1), pacing::IDLE_ROOT_TICK_MS);
    assert_eq!(w.tick_period_ms(2), pacing::SWEEP_MS);
    // Root 1 is shut down while its callout is out: it must stay for the answer.
    assert!(!w.root_done(1));
    assert!(!w.root_drained(1));
    w.on_request(&h, &c, 2, 0, &Some(&bob()));
    w.on_tick(&h, 1); // the old root's tick does nothing
    assert_eq!(h.dispatches(), 1);
    deliver(&h, &mut w, 2);
    assert_eq!(h.dispatched.borrow()[1].0, 2, "bob's callout is root 2's");
    w.on_callout_response(&h, 1, 101, Some(200), OK);
    assert_eq!(*h.resumed.borrow(), vec![(1, "Bearer tok-1".to_string())]);
    assert!(w.root_drained(1), "answered: root 1 may go");
    // Root 3 takes over while bob's callout (root 2's) is out; root 1, without callouts
    // now, and root 2, once answered, may go.
    w.configure(&h, 3, 1001, &c);
    assert!(!w.root_done(2));
    w.on_callout_response(&h, 2, 102, Some(200), OK);
    assert!(w.root_drained(2));
    w.configure(&h, 4, 1001, &c);
    assert!(w.root_done(3), "no callouts: it goes at once");
}

#[test]
fn a_callout_readied_under_an_old_root_is_dispatched_by_the_driver() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    w.configure(&h, 2, 1001, &c); // root 2 drives
    h.clock_step_ns.set(100_000);
    w.on_request(&h, &c, 1, 0, &Some(&alice()));
    // The wake-up reaches root 1 (registered the queue before): it signs but may not
    // dispatch.
    w.on_messages(&h, 1, &[WAKE.to_vec()]);
    while w.signing() {
        w.slice(&h, 1);
    }
    assert_eq!(h.dispatches(), 0);
    w.on_messages(&h, 2, &[WAKE.to_vec()]);
    assert_eq!(h.dispatched.borrow()[0].0, 2);
}

#[test]
fn two_identities_in_one_slot_exchange_at_once_and_count_a_collision() {
    let c = config_with(json!({"tokenCacheSlots": 1}));
    let h = host();
    let (mut w1, mut w2) = (worker(&h, &c, 1), worker(&h, &c, 2));
    w1.on_request(&h, &c, 1, 0, &Some(&alice()));
    deliver(&h, &mut w1, 1);
    w2.on_request(&h, &c, 2, 0, &Some(&bob()));
    deliver(&h, &mut w2, 2);
    assert_eq!(h.dispatches(), 2, "bob does not wait for alice");
    w2.on_callout_response(
        &h,
        2,
        102,
        Some(200),
        br#"{"access_token":"tok-bob","token_type":"bearer","expires_in":3600}"#,
    );
    w1.on_callout_response(&h, 1, 101, Some(200), OK);
    assert_eq!(h.resumed.borrow().len(), 2);
    w2.flush_metrics(&h);
    assert_eq!(h.metric(Metric::LockCollision), 1);
    // Alice's lock was not freed by bob, and was freed by alice.
    let alice = user_key(&c.destinations[0].cache_namespace, "alice", 1);
    assert_eq!(crate::coordination::slot::lock_of(&h, &alice), None);
}

#[test]
fn the_registry_heartbeat_and_gauge_run_on_the_tick() {
    let (h, c) = (host(), config());
    let (mut w1, _w2) = (worker(&h, &c, 1), worker(&h, &c, 2));
    h.now_ns
        .set(T0 + crate::coordination::registry::HEARTBEAT_MS * MS);
    w1.on_tick(&h, 1);
    assert_eq!(h.metric(Metric::WorkersRegistered), 2);
    assert_eq!(
        crate::coordination::registry::live_queues(&h),
        vec![1002, 1001]
    );
}

// ---- Other credential kinds plug in as recipes, without touching the engine ----

/// Work of `units` steps that yields `artifact`.
struct Countdown {
    units: usize,
    artifact: String,
}

impl recipe::Stepwise for Countdown {
    fn advance(&mut self, units: usize) -> Option<Result<String, crate::keys::SignError>> {
        self.units = self.units.saturating_sub(units);
        (self.units == 0).then(|| Ok(std::mem::take(&mut self.artifact)))
    }
    fn metric(&self) -> Metric {
        Metric::SigningEcMicros
    }
    fn units_per_step(&self) -> usize {
        4
    }
}

/// A recipe of `calls` callouts in a row (an assertion fetched from the user's identity
/// provider, then exchanged), or of one signature and no callout (a short-lived
/// certificate) when `calls` is 0.
struct Scripted {
    calls: u32,
    answered: u32,
}

impl recipe::Recipe for Scripted {
    fn start(&mut self, _: &recipe::Start<'_>) -> recipe::Step {
        if self.calls == 0 {
            return recipe::Step::Sign(Box::new(Countdown {
                units: 40,
                artifact: "certificate".into(),
            }));
        }
        recipe::Step::Call(self.request())
    }
    fn signed(
        &mut self,
        signed: Result<String, crate::keys::SignError>,
        _: &dyn Telemetry,
    ) -> recipe::Step {
        recipe::Step::Done(
            signed
                .map(|artifact| recipe::Issued {
                    access_token: artifact,
                    lifetime_ms: 600_000,
                })
                .map_err(|_| Failure::Internal { reason: "signing" }),
        )
    }
    fn answered(&mut self, answer: &recipe::Answer<'_>, _: &dyn Telemetry) -> recipe::Step {
        self.answered += 1;
        if answer.status != Some(200) {
            return recipe::Step::Done(Err(Failure::Unavailable {
                reason: "step failed",
            }));
        }
        if self.answered < self.calls {
            return recipe::Step::Call(self.request());
        }
        recipe::Step::Done(Ok(recipe::Issued {
            access_token: format!("after-{}-calls", self.answered),
            lifetime_ms: 600_000,
        }))
    }
    fn describe(&self) -> (&str, &str) {
        ("scripted", "user")
    }
}

impl Scripted {
    fn request(&self) -> TokenRequest {
        TokenRequest {
            cluster: format!("step-{}", self.answered),
            headers: Vec::new(),
            body: Vec::new(),
            timeout_ms: 1_000,
        }
    }
}

fn queue_scripted(
    w: &mut Worker,
    h: &FakeHost,
    c: &Rc<PluginConfig>,
    calls: u32,
    waiter: u32,
) -> CacheKey {
    let key = CacheKey::new("scripted", "user", c.cache_slots);
    assert!(w.queue(
        h,
        exchanges::NewExchange {
            key,
            recipe: Box::new(Scripted { calls, answered: 0 }),
            config: Rc::clone(c),
            waiter: Some(waiter),
            timeout_ms: 1_000,
            namespace: Rc::from("scripted"),
            principal: "user".into(),
            carrier: c.destinations[0].carrier.clone(),
        }
    ));
    key
}

#[test]
fn a_credential_made_by_one_signature_needs_no_callout() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    let key = queue_scripted(&mut w, &h, &c, 0, 7);
    deliver(&h, &mut w, 1);
    sign_to_the_end(&h, &mut w, 1);
    assert_eq!(h.dispatches(), 0);
    assert_eq!(
        *h.resumed.borrow(),
        vec![(7, "Bearer certificate".to_string())]
    );
    assert!(matches!(
        crate::coordination::slot::read_entry(&h, &key),
        Some(cache::Entry::Token { access_token, .. }) if access_token == "certificate"
    ));
    assert_eq!(
        crate::coordination::slot::lock_of(&h, &key),
        None,
        "released"
    );
}

#[test]
fn a_credential_made_by_two_callouts_in_a_row_keeps_the_lock_across_both() {
    let (h, c) = (host(), config());
    let (mut w1, mut w2) = (worker(&h, &c, 1), worker(&h, &c, 2));
    let key = queue_scripted(&mut w1, &h, &c, 2, 7);
    deliver(&h, &mut w1, 1);
    assert_eq!(h.dispatched.borrow()[0].1.cluster, "step-0");
    // The same identity on another worker waits for the whole recipe.
    queue_scripted(&mut w2, &h, &c, 2, 8);
    deliver(&h, &mut w2, 2);
    assert!(w2.waits_elsewhere());
    h.now_ns.set(T0 + 900 * MS); // the first answer comes late in its timeout
    w1.on_callout_response(&h, 1, 101, Some(200), b"");
    assert_eq!(
        h.dispatched.borrow()[1].1.cluster,
        "step-1",
        "the second callout"
    );
    let lock = crate::coordination::slot::lock_of(&h, &key).unwrap();
    assert!(
        lock.deadline_ms >= (T0 + 900 * MS) / MS + 1_000,
        "the deadline runs from the second dispatch"
    );
    h.now_ns.set(T0 + 1_600 * MS); // past the first callout's deadline, within the second's
    w2.on_tick(&h, 2);
    assert_eq!(h.dispatches(), 2, "w2 still waits: the lock stands");
    w1.on_callout_response(&h, 1, 102, Some(200), b"");
    assert_eq!(
        *h.resumed.borrow(),
        vec![(7, "Bearer after-2-calls".to_string())]
    );
    deliver(&h, &mut w2, 2);
    assert_eq!(h.resumed.borrow().len(), 2);
    assert_eq!(
        h.resumed.borrow()[1],
        (8, "Bearer after-2-calls".to_string())
    );
}

#[test]
fn randomness_failing_at_the_start_answers_the_waiters_and_frees_the_lock() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    assert_eq!(w.on_request(&h, &c, 1, 0, &Some(&alice())), Decision::Wait);
    h.no_randomness.set(true);
    deliver(&h, &mut w, 1);
    assert!(matches!(
        h.failed.borrow()[0],
        (1, Failure::Internal { .. })
    ));
    assert_eq!(h.dispatches(), 0);
    let key = user_key(&c.destinations[0].cache_namespace, "alice", c.cache_slots);
    assert_eq!(crate::coordination::slot::lock_of(&h, &key), None);
}

#[test]
fn slices_grow_with_the_wait_of_users_queued_behind_the_signatures() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    for id in 1..=8 {
        w.on_request(&h, &c, id, 0, &Some(&user(&format!("u{id}"))));
    }
    h.clock_step_ns.set(100_000);
    deliver(&h, &mut w, 1); // four start signing, a slice's worth done
                            // The first four are done 0.9 s later (the clock standing still meanwhile: the slice
                            // finishes them); the next four start then.
    h.clock_step_ns.set(0);
    h.now_ns.set(T0 + 900 * MS);
    while h.dispatches() < 4 {
        w.slice(&h, 1);
    }
    // The next four started 0.1 s ago, but their users have waited a second already.
    h.now_ns.set(T0 + SECOND);
    h.clock_step_ns.set(100_000);
    w.on_request(&h, &c, 900, 0, &None); // a busy worker
    let before = h.now_ns.get();
    w.slice(&h, 1);
    let spent_us = (h.now_ns.get() - before) / 1000;
    let grown = (1 + 1000 / SIGNING_WAIT_STEP_MS) * SIGNING_SLICE_US;
    assert!((grown..=grown + 300).contains(&spent_us), "{spent_us} µs");
}

#[test]
fn the_same_user_name_from_two_identity_providers_gets_two_tokens() {
    let (h, c) = (host(), config());
    let mut w = worker(&h, &c, 1);
    let from = |iss: &str, origin: Option<&str>| {
        let mut claims = json!({"user_name": "alice", "iss": iss});
        if let Some(origin) = origin {
            claims["origin"] = json!(origin);
        }
        claims
    };
    let idp_a = from("https://idp-a", None);
    let idp_b = from("https://idp-b", None);
    let ldap = from("https://idp-a", Some("ldap"));
    assert_eq!(w.on_request(&h, &c, 1, 0, &Some(&idp_a)), Decision::Wait);
    assert_eq!(w.on_request(&h, &c, 2, 0, &Some(&idp_b)), Decision::Wait);
    assert_eq!(w.on_request(&h, &c, 3, 0, &Some(&ldap)), Decision::Wait);
    assert_eq!(w.on_request(&h, &c, 4, 0, &Some(&idp_a)), Decision::Wait);
    deliver(&h, &mut w, 1);
    assert_eq!(h.dispatches(), 3, "one exchange per identity provider");
    for (call, token) in [(101, "tok-a"), (102, "tok-b"), (103, "tok-ldap")] {
        let body =
            format!(r#"{{"access_token":"{token}","token_type":"bearer","expires_in":3600}}"#);
        w.on_callout_response(&h, 1, call, Some(200), body.as_bytes());
    }
    let mut resumed = h.resumed.borrow().clone();
    resumed.sort();
    let expected: Vec<(u32, String)> = [(1, "tok-a"), (2, "tok-b"), (3, "tok-ldap"), (4, "tok-a")]
        .iter()
        .map(|(id, t)| (*id, format!("Bearer {t}")))
        .collect();
    assert_eq!(resumed, expected);
    for (claims, token) in [(&idp_a, "tok-a"), (&idp_b, "tok-b"), (&ldap, "tok-ldap")] {
        assert_eq!(
            w.on_request(&h, &c, 5, 0, &Some(claims)),
            Decision::Forward(format!("Bearer {token}"))
        );
    }
}

#[test]
fn a_system_user_token_carries_no_users_attributes_and_serves_everyone() {
    let mut d = destination_json("d");
    d["SystemUser"] = json!("TECH_USER");
    d["skipUserAttributesPrefixInSAMLAttributes"] = json!(true);
    let c = Rc::new(parse(&config_json(vec![d])).unwrap());
    let h = host();
    let mut w = worker(&h, &c, 1);
    let boss = json!({"user_name": "boss", "email": "boss@corp", "iss": "https://idp",
                      "user_attributes": {"dept": ["D1"]},
                      "xs.system.attributes": {"xs.saml.groups": ["Admin"]}});
    assert_eq!(w.on_request(&h, &c, 1, 0, &Some(&boss)), Decision::Wait);
    assert_eq!(w.on_request(&h, &c, 2, 0, &Some(&bob())), Decision::Wait);
    deliver(&h, &mut w, 1);
    assert_eq!(h.dispatches(), 1, "one token for every user");
    let assertion = assertion_of(&h.dispatched.borrow()[0].1);
    assert!(
        assertion.contains(">TECH_USER</saml2:NameID>"),
        "{assertion}"
    );
    for personal in ["AttributeStatement", "boss", "Admin", "D1"] {
        assert!(!assertion.contains(personal), "{personal} in {assertion}");
    }
    w.on_callout_response(&h, 1, 101, Some(200), OK);
    assert_eq!(h.resumed.borrow().len(), 2);
    assert_eq!(
        w.on_request(&h, &c, 3, 0, &Some(&alice())),
        Decision::Forward("Bearer tok-1".into())
    );
    assert_eq!(
        w.on_request(&h, &c, 4, 0, &None),
        Decision::Fail(Failure::NotAuthenticated),
        "an authenticated user is still required"
    );
}

#[test]
fn a_token_the_backend_refused_is_dropped_everywhere_and_exchanged_anew() {
    let (h, c) = (host(), config());
    let (mut w1, mut w2) = (worker(&h, &c, 1), worker(&h, &c, 2));
    first_exchange_for_alice(&mut w1, &h, &c);
    let hit = Decision::Forward("Bearer tok-1".into());
    assert_eq!(
        w2.on_request(&h, &c, 2, 0, &Some(&alice())),
        hit,
        "w2 copies it"
    );
    // Another token than the one cached: nothing is dropped.
    assert!(!w1.on_backend_refused(&h, &c, 0, &Some(&alice()), "Bearer tok-0"));
    assert_eq!(w1.on_request(&h, &c, 3, 0, &Some(&alice())), hit);
    assert!(w1.on_backend_refused(&h, &c, 0, &Some(&alice()), "Bearer tok-1"));
    deliver(&h, &mut w2, 2);
    assert_eq!(
        w2.on_request(&h, &c, 4, 0, &Some(&alice())),
        Decision::Wait,
        "w2's copy went"
    );
    assert_eq!(w1.on_request(&h, &c, 5, 0, &Some(&alice())), Decision::Wait);
    deliver(&h, &mut w1, 1);
    deliver(&h, &mut w2, 2);
    assert_eq!(h.dispatches(), 2, "one new exchange for both workers");
    let tok2 = br#"{"access_token":"tok-2","token_type":"bearer","expires_in":3600}"#;
    w1.on_callout_response(&h, 1, 102, Some(200), tok2);
    deliver(&h, &mut w2, 2);
    let fresh = Decision::Forward("Bearer tok-2".into());
    assert_eq!(w2.on_request(&h, &c, 6, 0, &Some(&alice())), fresh);
    // A backend that refuses the fresh token too does not cost an exchange per request:
    // the worker evicts an identity at most once per failedExchangeHoldSeconds.
    assert!(!w1.on_backend_refused(&h, &c, 0, &Some(&alice()), "Bearer tok-2"));
    assert_eq!(w1.on_request(&h, &c, 7, 0, &Some(&alice())), fresh);
    h.now_ns.set(T0 + 5 * SECOND);
    assert!(w1.on_backend_refused(&h, &c, 0, &Some(&alice()), "Bearer tok-2"));
    w1.flush_metrics(&h);
    assert_eq!(h.metric(Metric::TokenEvicted), 2);
    assert!(
        h.logs.borrow().iter().all(|l| !l.contains("tok-")),
        "no token logged"
    );
}

/// A configuration whose destination 0 makes client certificates (`PrincipalPropagation`).
fn certificate_config(pattern: &str) -> Rc<PluginConfig> {
    let mut d = crate::testing::certificate_destination_json("onprem");
    d["clientCertificateSubjectPattern"] = json!(pattern);
    let config = crate::testing::with_ca_keys(config_json(vec![d, destination_json("saml")]));
    Rc::new(parse(&config).unwrap())
}

#[test]
fn a_client_certificate_is_minted_once_carried_in_its_header_and_reused() {
    use base64::Engine;
    use x509_cert::der::Decode;
    let (h, c) = (host(), certificate_config("CN=${name},O=ACME"));
    let mut w = worker(&h, &c, 1);
    for id in 1..=3 {
        assert_eq!(w.on_request(&h, &c, id, 0, &Some(&alice())), Decision::Wait);
    }
    deliver(&h, &mut w, 1);
    sign_to_the_end(&h, &mut w, 1);
    assert_eq!(h.dispatches(), 0, "no callout");
    let resumed = h.resumed.borrow().clone();
    assert_eq!(resumed.len(), 3);
    assert!(h
        .resumed_headers
        .borrow()
        .iter()
        .all(|n| n == "ssl_client_cert"));
    let value = &resumed[0].1;
    assert!(
        resumed.iter().all(|(_, v)| v == value),
        "one certificate for all"
    );
    let der = base64::engine::general_purpose::STANDARD
        .decode(value)
        .expect("single-line base64");
    let certificate = x509_cert::Certificate::from_der(&der).unwrap();
    let tbs = &certificate.tbs_certificate;
    assert_eq!(tbs.subject.to_string(), "CN=alice,O=ACME");
    assert_eq!(
        tbs.issuer.to_string(),
        "O=principal-propagation tests,CN=Test users CA"
    );
    let not_before = tbs.validity.not_before.to_unix_duration().as_secs();
    let not_after = tbs.validity.not_after.to_unix_duration().as_secs();
    assert_eq!(
        not_before,
        (T0 / MS - 60_000) / 1000,
        "backdated by the clock skew"
    );
    assert_eq!(
        not_after,
        (T0 / MS + 600_000) / 1000,
        "ten minutes by default"
    );
    // Cached: the next request is a hit with the same certificate, without a prefix.
    assert_eq!(
        w.on_request(&h, &c, 9, 0, &Some(&alice())),
        Decision::Forward(value.clone())
    );
    // Another user gets another certificate with another serial.
    assert_eq!(w.on_request(&h, &c, 10, 0, &Some(&bob())), Decision::Wait);
    deliver(&h, &mut w, 1);
    sign_to_the_end(&h, &mut w, 1);
    let bob_value = h.resumed.borrow().last().unwrap().1.clone();
    let bob_der = base64::engine::general_purpose::STANDARD
        .decode(&bob_value)
        .unwrap();
    let bob_certificate = x509_cert::Certificate::from_der(&bob_der).unwrap();
    assert_eq!(
        bob_certificate.tbs_certificate.subject.to_string(),
        "CN=bob,O=ACME"
    );
    assert_ne!(
        bob_certificate.tbs_certificate.serial_number,
        tbs.serial_number
    );
    assert_eq!(
        bob_certificate.tbs_certificate.subject_public_key_info, tbs.subject_public_key_info,
        "one holder key per worker and period"
    );
}

#[test]
fn claims_that_make_no_subject_are_refused_before_any_signature() {
    let (h, c) = (host(), certificate_config("CN=${name},EMAIL=${mail}"));
    let mut w = worker(&h, &c, 1);
    let long = json!({"user_name": "x".repeat(10_240), "email": "a@x"});
    let no_mail = json!({"user_name": "carol"});
    let control = json!({"user_name": "a\u{1}b", "email": "a@x"});
    for (id, claims) in [(1, long), (2, no_mail), (3, control)] {
        match w.on_request(&h, &c, id, 0, &Some(&claims)) {
            Decision::Fail(failure @ Failure::Subject(_)) => {
                assert_eq!(failure.reply().status, 401);
                assert!(
                    !failure.description().contains("xxxx"),
                    "never echoes the value"
                );
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(!w.signing());
    // The SAML destination next to it still refuses a user id XML cannot carry.
    assert_eq!(
        w.on_request(&h, &c, 4, 1, &Some(&json!({"user_name": "a\u{1}b"}))),
        Decision::Fail(Failure::UserIdNotXml)
    );
}

/// A request's identity with the raw token the client sent.
struct WithToken {
    claims: Value,
    token: Option<String>,
}

impl Identity for WithToken {
    fn claims(&self) -> Option<Value> {
        Some(self.claims.clone())
    }
    fn raw_token(&self) -> Option<String> {
        self.token.clone()
    }
}

/// A compact JWT whose payload is `claims` (the signature is not checked here: Envoy's
/// jwt_authn verified it).
fn jwt_of(claims: &Value) -> String {
    use base64::Engine;
    let b64 = |v: String| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!(
        "{}.{}.c2ln",
        b64(r#"{"alg":"RS256"}"#.into()),
        b64(claims.to_string())
    )
}

/// Destination 0 gets its assertion from an on-behalf-of identity provider.
fn on_behalf_of_config(credential: Value) -> Rc<PluginConfig> {
    let mut d = destination_json("entra");
    let fields = d.as_object_mut().unwrap();
    fields.remove("assertionIssuer");
    fields.insert(
        "assertionServiceURL".into(),
        json!("https://login.example/t/oauth2/v2.0/token"),
    );
    fields.insert("assertionServiceCluster".into(), json!("sts"));
    fields.insert("assertionServiceClientId".into(), json!("gateway-app"));
    for (k, v) in credential.as_object().unwrap() {
        fields.insert(k.clone(), v.clone());
    }
    Rc::new(parse(&config_json(vec![d])).unwrap())
}

fn entra_user(name: &str) -> WithToken {
    let claims =
        json!({"sub": format!("sub-{name}"), "preferred_username": name, "exp": 1_900_000_000});
    WithToken {
        token: Some(jwt_of(&claims)),
        claims,
    }
}

fn saml_answer(xml: &str) -> Vec<u8> {
    use base64::Engine;
    json!({
        "token_type": "Bearer",
        "access_token": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(xml),
        "issued_token_type": "urn:ietf:params:oauth:token-type:saml2",
        "expires_in": 3599
    })
    .to_string()
    .into_bytes()
}

#[test]
fn an_identity_provider_assertion_is_exchanged_in_two_callouts_and_only_the_token_is_cached() {
    use base64::Engine;
    let (h, c) = (
        host(),
        on_behalf_of_config(json!({"assertionServiceClientSecret": "app-secret"})),
    );
    let mut w = worker(&h, &c, 1);
    let alice = entra_user("alice");
    assert_eq!(w.on_request(&h, &c, 1, 0, &alice), Decision::Wait);
    assert_eq!(w.on_request(&h, &c, 2, 0, &alice), Decision::Wait, "joins");
    deliver(&h, &mut w, 1);
    let (_, obo) = h.dispatched.borrow()[0].clone();
    assert_eq!(obo.cluster, "sts");
    let form = form_of(&obo);
    assert_eq!(form["assertion"], alice.token.clone().unwrap());
    assert_eq!(form["requested_token_use"], "on_behalf_of");
    assert_eq!(form["scope"], "spn:dev-token-server/.default");
    assert!(obo
        .headers
        .iter()
        .any(|(k, v)| k == "authorization" && v.starts_with("Basic ")));
    let xml = "<saml2:Assertion ID=\"_1\">alice</saml2:Assertion>";
    w.on_callout_response(&h, 1, 101, Some(200), &saml_answer(xml));
    let (_, exchange) = h.dispatched.borrow()[1].clone();
    assert_eq!(exchange.cluster, "token_service");
    let assertion = form_of(&exchange)["assertion"].clone();
    assert_eq!(
        assertion,
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(xml),
        "passed on as issued"
    );
    w.on_callout_response(&h, 1, 102, Some(200), OK);
    assert_eq!(
        *h.resumed.borrow(),
        vec![
            (1, "Bearer tok-1".to_string()),
            (2, "Bearer tok-1".to_string())
        ]
    );
    assert_eq!(
        w.on_request(&h, &c, 3, 0, &alice),
        Decision::Forward("Bearer tok-1".into()),
        "the token is cached; no third callout"
    );
    assert_eq!(h.dispatches(), 2);
}

#[test]
fn identity_provider_refusals_map_to_401_or_502_and_the_token_must_be_the_verified_one() {
    let c = on_behalf_of_config(json!({"assertionServiceClientSecret": "app-secret"}));
    let refusal = |body: &str| {
        let h = host();
        let mut w = worker(&h, &c, 1);
        assert_eq!(
            w.on_request(&h, &c, 1, 0, &entra_user("bob")),
            Decision::Wait
        );
        deliver(&h, &mut w, 1);
        w.on_callout_response(&h, 1, 101, Some(400), body.as_bytes());
        assert_eq!(h.dispatches(), 1, "no RFC 7522 call after a refusal");
        let failure = h.failed.borrow()[0].1.clone();
        failure
    };
    let expired = refusal(
        r#"{"error":"invalid_grant","error_description":"AADSTS500133: Assertion is not within its valid time range.","error_codes":[500133]}"#,
    );
    assert_eq!(
        expired,
        Failure::UserTokenRefused {
            code: "invalid_grant AADSTS500133".into()
        }
    );
    assert_eq!(expired.reply().status, 401);
    let consent = refusal(
        r#"{"error":"invalid_grant","error_description":"AADSTS65001: The user or administrator has not consented","error_codes":[65001]}"#,
    );
    assert_eq!(consent.reply().status, 502);
    assert!(consent.description().contains("invalid_grant AADSTS65001"));
    let mfa = refusal(r#"{"error":"interaction_required","error_codes":[50076]}"#);
    assert_eq!(mfa.reply().status, 502);

    let (h, mut w) = {
        let h = host();
        let w = worker(&h, &c, 1);
        (h, w)
    };
    let mut forged = entra_user("carol");
    forged.token = Some(jwt_of(
        &json!({"sub": "sub-admin", "preferred_username": "admin"}),
    ));
    assert_eq!(
        w.on_request(&h, &c, 1, 0, &forged),
        Decision::Fail(Failure::NotAuthenticated),
        "a token other than the verified one is never passed on"
    );
    let mut missing = entra_user("dave");
    missing.token = None;
    assert!(matches!(
        w.on_request(&h, &c, 2, 0, &missing),
        Decision::Fail(Failure::Internal { .. })
    ));
    assert_eq!(h.dispatches(), 0);
}

#[test]
fn a_key_credential_signs_a_client_assertion_before_the_on_behalf_of_call() {
    use base64::Engine;
    let (h, c) = (
        host(),
        on_behalf_of_config(json!({"assertionServiceClientAssertionKey": "default"})),
    );
    let mut w = worker(&h, &c, 1);
    assert_eq!(
        w.on_request(&h, &c, 1, 0, &entra_user("erin")),
        Decision::Wait
    );
    deliver(&h, &mut w, 1);
    sign_to_the_end(&h, &mut w, 1);
    let (_, obo) = h.dispatched.borrow()[0].clone();
    let form = form_of(&obo);
    assert_eq!(
        form["client_assertion_type"],
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
    let parts: Vec<&str> = form["client_assertion"].split('.').collect();
    assert_eq!(parts.len(), 3);
    let payload: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(payload["iss"], "gateway-app");
    assert_eq!(payload["aud"], "https://login.example/t/oauth2/v2.0/token");
    let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(parts[2])
        .unwrap();
    assert_eq!(signature.len(), 256, "RS256 with the 2048-bit test key");
    assert!(!obo.headers.iter().any(|(k, _)| k == "authorization"));
}

/// The find-destination API tells applications how long a token may still be used: the
/// waiters of the exchange and every later hit (the worker's copy, or another worker's
/// read of the shared slot) get the cached token's reuse limit.
#[test]
fn forwards_report_until_when_the_credential_may_be_used() {
    let (h, c) = (host(), config());
    let (mut w1, mut w2) = (worker(&h, &c, 1), worker(&h, &c, 2));
    first_exchange_for_alice(&mut w1, &h, &c);
    let until = alice_token_times(&c).reuse_until_ms;
    assert!(until > T0 / 1_000_000);
    assert_eq!(*h.resumed_until.borrow(), vec![until], "the waiter's");
    let hit = w1.on_request_with_expiry(&h, &c, 2, 0, &Some(&alice()));
    assert_eq!(
        hit,
        (Decision::Forward("Bearer tok-1".into()), until),
        "own copy"
    );
    let hit = w2.on_request_with_expiry(&h, &c, 3, 0, &Some(&alice()));
    assert_eq!(
        hit,
        (Decision::Forward("Bearer tok-1".into()), until),
        "shared slot"
    );
    let miss = w2.on_request_with_expiry(&h, &c, 4, 0, &Some(&bob()));
    assert_eq!(miss, (Decision::Wait, 0));
}
