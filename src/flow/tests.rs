use super::*;
use crate::testing::{config_json, destination_json, parse};
use serde_json::json;
use std::cell::{Cell, RefCell};

/// An in-memory host that records what the flow asks of it. Several workers may share
/// one (shared data is per VM set, as in Envoy); notices are delivered by the test.
#[derive(Default)]
struct FakeHost {
    now_ns: Cell<u64>,
    /// How far the clock moves on every reading (0: it stands still).
    clock_step_ns: Cell<u64>,
    shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    dispatched: RefCell<Vec<TokenRequest>>,
    wakes: Cell<u32>,
    notices: RefCell<Vec<Notice>>,
    resumed: RefCell<Vec<(u32, String)>>,
    failed: RefCell<Vec<(u32, Failure)>>,
    gone: RefCell<Vec<u32>>,
    refuse_dispatch: Cell<bool>,
    refuse_wake: Cell<bool>,
    counter: Cell<u8>,
    logs: RefCell<Vec<String>>,
}

impl Host for FakeHost {
    fn now_ns(&self) -> u64 {
        self.now_ns
            .set(self.now_ns.get() + self.clock_step_ns.get());
        self.now_ns.get()
    }
    fn fill_random(&self, buf: &mut [u8]) -> bool {
        self.counter.set(self.counter.get() + 1);
        buf.fill(self.counter.get());
        true
    }
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.shared.borrow().get(key).cloned()
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        let mut shared = self.shared.borrow_mut();
        let version = shared.get(key).map_or(0, |(_, v)| *v);
        // As in Envoy: the CAS is checked only when the key exists.
        if cas.is_some_and(|c| shared.contains_key(key) && c != version) {
            return false;
        }
        shared.insert(key.into(), (value.to_vec(), version + 1));
        true
    }
    fn dispatch(&self, request: &TokenRequest) -> Option<u32> {
        if self.refuse_dispatch.get() {
            return None;
        }
        self.dispatched.borrow_mut().push(request.clone());
        Some(100 + self.dispatched.borrow().len() as u32)
    }
    fn wake(&self) -> bool {
        self.wakes.set(self.wakes.get() + 1);
        !self.refuse_wake.get()
    }
    fn notify_all(&self, notice: &Notice) {
        self.notices.borrow_mut().push(*notice);
    }
    fn resume(&self, id: u32, authorization: &str) -> bool {
        if self.gone.borrow().contains(&id) {
            return false;
        }
        self.resumed.borrow_mut().push((id, authorization.into()));
        true
    }
    fn fail(&self, id: u32, failure: &Failure) -> bool {
        self.failed.borrow_mut().push((id, failure.clone()));
        true
    }
    fn log(&self, _: Level, message: &str) {
        self.logs.borrow_mut().push(message.into());
    }
    fn count(&self, _: Metric, _: u64) {}
}

const T0: u64 = 1_795_323_921_000_000_000;
const SECOND: u64 = 1_000_000_000;
const OK: &[u8] = br#"{"access_token":"tok-1","token_type":"bearer","expires_in":3600}"#;

fn config() -> Rc<PluginConfig> {
    Rc::new(parse(&config_json(vec![destination_json("d")])).unwrap())
}

fn host() -> FakeHost {
    let h = FakeHost::default();
    h.now_ns.set(T0);
    h
}

fn alice() -> Value {
    json!({"user_name": "alice", "email": "alice@example.com"})
}

fn bob() -> Value {
    json!({"user_name": "bob"})
}

fn form_of(request: &TokenRequest) -> HashMap<String, String> {
    form_urlencoded::parse(&request.body).into_owned().collect()
}

/// The callout token of the exchange whose assertion names `user`.
fn callout_for(h: &FakeHost, user: &str) -> u32 {
    use base64::Engine;
    let position = h
        .dispatched
        .borrow()
        .iter()
        .position(|r| {
            let xml = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(&form_of(r)["assertion"])
                .unwrap();
            String::from_utf8(xml)
                .unwrap()
                .contains(&format!(">{user}<"))
        })
        .unwrap();
    101 + position as u32
}

/// Alice's first request: queued, dispatched and answered with [`OK`] (callout 101).
fn first_exchange_for_alice(w: &mut Worker, h: &FakeHost, c: &Rc<PluginConfig>) {
    assert_eq!(w.on_request(h, c, 1, 0, &Some(&alice())), Decision::Wait);
    w.on_wake(h);
    w.on_token_response(h, 101, Some(200), OK);
}

/// Reuse and refresh times of the token [`first_exchange_for_alice`] cached.
fn alice_token_times(c: &PluginConfig) -> cache::TokenTimes {
    let key = CacheKey::new(&c.destinations[0].cache_namespace, "alice", c.cache_slots);
    cache::token_times(T0 / 1_000_000, 3_600_000, None, key.jitter())
}

/// Delivers the notices sent so far to `worker`.
fn deliver(h: &FakeHost, worker: &mut Worker) {
    for notice in h.notices.borrow().clone() {
        worker.on_notice(h, &notice);
    }
}

#[test]
fn concurrent_requests_of_one_user_share_one_exchange() {
    let (mut w, h, c) = (Worker::new(), host(), config());
    for id in 1..=5 {
        assert_eq!(w.on_request(&h, &c, id, 0, &Some(&alice())), Decision::Wait);
    }
    assert_eq!(h.wakes.get(), 1);
    assert!(
        h.dispatched.borrow().is_empty(),
        "dispatch waits for the worker callback"
    );
    w.on_wake(&h);
    assert_eq!(h.dispatched.borrow().len(), 1);
    w.on_token_response(&h, 101, Some(200), OK);
    let resumed = h.resumed.borrow();
    assert_eq!(resumed.len(), 5);
    assert!(resumed.iter().all(|(_, a)| a == "Bearer tok-1"));
    assert_eq!(w.in_flight(), 0);
}

#[test]
fn workers_share_one_exchange_through_the_lock_and_the_notice() {
    let (h, c) = (host(), config());
    let (mut w1, mut w2) = (Worker::new(), Worker::new());
    w1.on_request(&h, &c, 1, 0, &Some(&alice()));
    w2.on_request(&h, &c, 2, 0, &Some(&alice()));
    w2.on_request(&h, &c, 3, 0, &Some(&alice()));
    w1.on_wake(&h);
    w2.on_wake(&h);
    assert_eq!(
        h.dispatched.borrow().len(),
        1,
        "the second worker found the lock taken"
    );
    assert!(w2.waits_elsewhere());
    w1.on_token_response(&h, 101, Some(200), OK);
    assert_eq!(h.resumed.borrow().len(), 1);
    deliver(&h, &mut w2);
    assert_eq!(h.resumed.borrow().len(), 3);
    assert!(h.resumed.borrow().iter().all(|(_, a)| a == "Bearer tok-1"));
    assert_eq!((w1.in_flight(), w2.in_flight()), (0, 0));
}

#[test]
fn a_failed_exchange_reaches_waiters_on_every_worker_and_is_retried_after_backoff() {
    let (h, c) = (host(), config());
    let (mut w1, mut w2) = (Worker::new(), Worker::new());
    w1.on_request(&h, &c, 1, 0, &Some(&alice()));
    w2.on_request(&h, &c, 2, 0, &Some(&alice()));
    w1.on_wake(&h);
    w2.on_wake(&h);
    w1.on_token_response(&h, 101, Some(504), b"upstream request timeout");
    deliver(&h, &mut w2);
    assert_eq!(
        *h.failed.borrow(),
        vec![(1, Failure::Timeout), (2, Failure::Timeout)]
    );
    // Within the backoff, answered without an exchange; after it, retried.
    assert_eq!(
        w2.on_request(&h, &c, 3, 0, &Some(&alice())),
        Decision::Fail(Failure::Timeout)
    );
    h.now_ns.set(T0 + FAILURE_BACKOFF_MS * 1_000_000);
    assert_eq!(w2.on_request(&h, &c, 4, 0, &Some(&alice())), Decision::Wait);
    w2.on_wake(&h);
    assert_eq!(h.dispatched.borrow().len(), 2);
}

#[test]
fn a_vanished_lock_holder_is_taken_over_after_its_deadline() {
    let (h, c) = (host(), config());
    let (mut w1, mut w2) = (Worker::new(), Worker::new());
    w1.on_request(&h, &c, 1, 0, &Some(&alice()));
    w2.on_request(&h, &c, 2, 0, &Some(&alice()));
    w1.on_wake(&h);
    w2.on_wake(&h);
    drop(w1); // its callout never answers
    w2.on_tick(&h);
    assert_eq!(
        h.dispatched.borrow().len(),
        1,
        "still within the holder's deadline"
    );
    h.now_ns.set(T0 + 13 * SECOND); // 10 s timeout + 2 s grace
    w2.on_tick(&h);
    assert_eq!(h.dispatched.borrow().len(), 2);
    w2.on_token_response(&h, 102, Some(200), OK);
    assert_eq!(*h.resumed.borrow(), vec![(2, "Bearer tok-1".to_string())]);
}

#[test]
fn a_lost_notice_is_made_up_by_the_tick() {
    let (h, c) = (host(), config());
    let (mut w1, mut w2) = (Worker::new(), Worker::new());
    w1.on_request(&h, &c, 1, 0, &Some(&alice()));
    w2.on_request(&h, &c, 2, 0, &Some(&alice()));
    w1.on_wake(&h);
    w2.on_wake(&h);
    w1.on_token_response(&h, 101, Some(200), OK);
    w2.on_tick(&h);
    assert_eq!(h.resumed.borrow().len(), 2);
}

#[test]
fn cached_token_serves_until_the_margin_then_a_new_exchange_runs() {
    let (mut w, h, c) = (Worker::new(), host(), config());
    first_exchange_for_alice(&mut w, &h, &c);
    assert_eq!(
        w.on_request(&h, &c, 2, 0, &Some(&alice())),
        Decision::Forward("Bearer tok-1".into())
    );
    let times = alice_token_times(&c);
    h.now_ns.set(times.reuse_until_ms * 1_000_000 - 1);
    assert_eq!(
        w.on_request(&h, &c, 3, 0, &Some(&alice())),
        Decision::Forward("Bearer tok-1".into())
    );
    h.now_ns.set(times.reuse_until_ms * 1_000_000);
    assert_eq!(w.on_request(&h, &c, 4, 0, &Some(&alice())), Decision::Wait);
}

#[test]
fn tokens_are_refreshed_ahead_in_the_background_without_making_anyone_wait() {
    let (mut w, h, c) = (Worker::new(), host(), config());
    first_exchange_for_alice(&mut w, &h, &c);
    let times = alice_token_times(&c);
    h.now_ns.set(times.refresh_at_ms * 1_000_000);
    assert_eq!(
        w.on_request(&h, &c, 2, 0, &Some(&alice())),
        Decision::Forward("Bearer tok-1".into())
    );
    assert_eq!(
        w.on_request(&h, &c, 3, 0, &Some(&alice())),
        Decision::Forward("Bearer tok-1".into())
    );
    w.on_wake(&h);
    assert_eq!(
        h.dispatched.borrow().len(),
        2,
        "one refresh, not one per request"
    );
    w.on_token_response(
        &h,
        102,
        Some(200),
        br#"{"access_token":"tok-2","token_type":"bearer","expires_in":3600}"#,
    );
    assert_eq!(
        w.on_request(&h, &c, 4, 0, &Some(&alice())),
        Decision::Forward("Bearer tok-2".into())
    );
    assert_eq!(w.in_flight(), 0);
}

#[test]
fn a_failed_refresh_keeps_the_token_and_backs_off() {
    let (mut w, h, c) = (Worker::new(), host(), config());
    first_exchange_for_alice(&mut w, &h, &c);
    let times = alice_token_times(&c);
    h.now_ns.set(times.refresh_at_ms * 1_000_000);
    w.on_request(&h, &c, 2, 0, &Some(&alice()));
    w.on_wake(&h);
    w.on_token_response(&h, 102, Some(503), b"down");
    assert_eq!(
        w.on_request(&h, &c, 3, 0, &Some(&alice())),
        Decision::Forward("Bearer tok-1".into())
    );
    w.on_wake(&h);
    assert_eq!(
        h.dispatched.borrow().len(),
        2,
        "no new refresh within the backoff"
    );
    h.now_ns
        .set(times.refresh_at_ms * 1_000_000 + FAILURE_BACKOFF_MS * 1_000_000);
    w.on_request(&h, &c, 4, 0, &Some(&alice()));
    w.on_wake(&h);
    assert_eq!(h.dispatched.borrow().len(), 3);
}

#[test]
fn every_exchange_gets_a_fresh_assertion_id() {
    let (mut w, h, c) = (Worker::new(), host(), config());
    w.on_request(&h, &c, 1, 0, &Some(&alice()));
    w.on_wake(&h);
    w.on_token_response(&h, 101, Some(503), b"down");
    h.now_ns.set(T0 + 2 * SECOND);
    w.on_request(&h, &c, 2, 0, &Some(&alice()));
    w.on_wake(&h);
    let ids: Vec<String> = h
        .dispatched
        .borrow()
        .iter()
        .map(|r| {
            use base64::Engine;
            let xml = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(&form_of(r)["assertion"])
                .unwrap();
            let xml = String::from_utf8(xml).unwrap();
            let start = xml.find(" ID=\"").unwrap() + 5;
            xml[start..start + 33].to_string()
        })
        .collect();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
}

#[test]
fn users_and_failures_are_kept_apart() {
    let (mut w, h, c) = (Worker::new(), host(), config());
    w.on_request(&h, &c, 1, 0, &Some(&alice()));
    w.on_request(&h, &c, 2, 0, &Some(&bob()));
    w.on_wake(&h);
    assert_eq!(h.dispatched.borrow().len(), 2);
    let (bob_call, alice_call) = (callout_for(&h, "bob"), callout_for(&h, "alice"));
    w.on_token_response(&h, bob_call, Some(400), br#"{"error":"invalid_grant"}"#);
    w.on_token_response(&h, alice_call, Some(200), OK);
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
}

#[test]
fn locks_are_created_up_front_and_never_overwritten() {
    let h = host();
    create_locks(&h);
    assert_eq!(h.shared.borrow().len(), cache::LOCK_STRIPES as usize);
    let key = cache::lock_key(7);
    h.shared_set(&key, &[1; 28], None);
    create_locks(&h);
    assert_eq!(h.shared.borrow()[&key].0, vec![1; 28]);
}

#[test]
fn a_slot_taken_by_another_user_is_a_miss_not_their_token() {
    let mut config = config_json(vec![destination_json("d")]);
    config["tokenCacheSlots"] = json!(1);
    let c = Rc::new(parse(&config).unwrap());
    let (mut w, h) = (Worker::new(), host());
    first_exchange_for_alice(&mut w, &h, &c);
    assert_eq!(w.on_request(&h, &c, 2, 0, &Some(&bob())), Decision::Wait);
    w.on_wake(&h);
    w.on_token_response(
        &h,
        102,
        Some(200),
        br#"{"access_token":"tok-bob","token_type":"bearer","expires_in":3600}"#,
    );
    assert_eq!(
        h.resumed.borrow().last().unwrap(),
        &(2, "Bearer tok-bob".to_string())
    );
    assert_eq!(
        h.shared
            .borrow()
            .keys()
            .filter(|k| k.starts_with(cache::ENTRY_PREFIX))
            .count(),
        1
    );
    assert_eq!(
        w.on_request(&h, &c, 3, 0, &Some(&alice())),
        Decision::Wait,
        "evicted, never bob's token"
    );
}

#[test]
fn unusable_users_are_refused_before_any_exchange() {
    let (mut w, h, c) = (Worker::new(), host(), config());
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
    assert_eq!(h.wakes.get(), 0);
}

#[test]
fn a_refused_callout_fails_its_waiters_and_frees_the_lock() {
    let (mut w, h, c) = (Worker::new(), host(), config());
    h.refuse_dispatch.set(true);
    w.on_request(&h, &c, 1, 0, &Some(&alice()));
    w.on_wake(&h);
    assert!(matches!(
        h.failed.borrow()[0],
        (1, Failure::Unavailable { .. })
    ));
    assert_eq!(w.in_flight(), 0);
    h.refuse_dispatch.set(false);
    w.on_request(&h, &c, 2, 0, &Some(&alice()));
    w.on_wake(&h);
    assert_eq!(h.dispatched.borrow().len(), 1, "the lock was released");
}

#[test]
fn requests_that_went_away_are_skipped_and_the_rest_still_resume() {
    let (mut w, h, c) = (Worker::new(), host(), config());
    for id in 1..=3 {
        w.on_request(&h, &c, id, 0, &Some(&alice()));
    }
    w.forget_request(1);
    h.gone.borrow_mut().push(2);
    w.on_wake(&h);
    w.on_token_response(&h, 101, Some(200), OK);
    assert_eq!(*h.resumed.borrow(), vec![(3, "Bearer tok-1".to_string())]);
}

#[test]
fn short_lived_tokens_serve_their_waiters_but_are_not_cached() {
    let (mut w, h, c) = (Worker::new(), host(), config());
    w.on_request(&h, &c, 1, 0, &Some(&alice()));
    w.on_wake(&h);
    w.on_token_response(
        &h,
        101,
        Some(200),
        br#"{"access_token":"t","token_type":"bearer","expires_in":20}"#,
    );
    assert_eq!(*h.resumed.borrow(), vec![(1, "Bearer t".to_string())]);
    assert_eq!(w.on_request(&h, &c, 2, 0, &Some(&alice())), Decision::Wait);
}

#[test]
fn a_host_that_cannot_schedule_the_exchange_fails_the_request_closed() {
    let (mut w, h, c) = (Worker::new(), host(), config());
    h.refuse_wake.set(true);
    assert!(matches!(
        w.on_request(&h, &c, 1, 0, &Some(&alice())),
        Decision::Fail(Failure::Internal { .. })
    ));
    assert_eq!(w.in_flight(), 0);
    h.refuse_wake.set(false);
    assert_eq!(w.on_request(&h, &c, 2, 0, &Some(&alice())), Decision::Wait);
    assert_eq!(w.in_flight(), 1);
}

#[test]
fn a_callout_without_response_is_a_timeout_only_once_its_timeout_has_passed() {
    let timeout_ns = config().destinations[0].token_service.timeout_ms * 1_000_000;
    for (elapsed_ns, expected) in [
        (SECOND, "reset"),
        (timeout_ns / 10 * 9 - 1_000_000, "reset"),
        (timeout_ns / 10 * 9, "timeout"),
        (timeout_ns, "timeout"),
        (timeout_ns + SECOND, "timeout"),
    ] {
        let (mut w, h, c) = (Worker::new(), host(), config());
        w.on_request(&h, &c, 1, 0, &Some(&alice()));
        w.on_wake(&h);
        h.now_ns.set(T0 + elapsed_ns);
        w.on_token_response(&h, 101, None, b"");
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
        let (mut w, h, c) = (Worker::new(), host(), config());
        w.on_request(&h, &c, 1, 0, &Some(&alice()));
        w.on_wake(&h);
        w.on_token_response(&h, 101, status, body);
        assert!(h.resumed.borrow().is_empty());
        let reply = h.failed.borrow()[0].1.reply();
        assert_eq!(reply.status, 503, "{body:?}");
        assert!(!reply.body.contains("bad"));
        // Held for the backoff (no exchange), then tried again.
        h.now_ns.set(T0 + (FAILURE_BACKOFF_MS - 1) * 1_000_000);
        assert!(matches!(
            w.on_request(&h, &c, 2, 0, &Some(&alice())),
            Decision::Fail(Failure::Unavailable { .. })
        ));
        h.now_ns.set(T0 + FAILURE_BACKOFF_MS * 1_000_000);
        assert_eq!(w.on_request(&h, &c, 3, 0, &Some(&alice())), Decision::Wait);
        w.on_wake(&h);
        assert_eq!(h.dispatched.borrow().len(), 2);
        w.on_token_response(&h, 102, Some(200), OK);
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
    let (mut w1, mut w2) = (Worker::new(), Worker::new());
    // 100 µs per clock reading, that is per 4 windows: a 250 µs slice is 3 readings.
    h.clock_step_ns.set(100_000);
    assert_eq!(w1.on_request(&h, &c, 1, 0, &Some(&alice())), Decision::Wait);
    w1.on_wake(&h);
    assert!(
        w1.signing(),
        "the first slice did not finish a 2048-bit signature"
    );
    assert!(h.dispatched.borrow().is_empty());
    // Meanwhile: the same user joins here, and another worker waits for the lock.
    assert_eq!(w1.on_request(&h, &c, 2, 0, &Some(&alice())), Decision::Wait);
    assert_eq!(w2.on_request(&h, &c, 3, 0, &Some(&alice())), Decision::Wait);
    w2.on_wake(&h);
    assert!(!w2.signing(), "w2 does not sign: w1 holds the lock");
    let mut slices = 1;
    while w1.signing() && slices < 1_000 {
        // A busy worker: a request (unauthenticated: answered at once) between slices.
        w1.on_request(&h, &c, 900, 0, &None);
        let before = h.now_ns.get();
        w1.on_slice(&h);
        let spent_us = (h.now_ns.get() - before) / 1000;
        assert!(
            spent_us <= SIGNING_SLICE_US + 300,
            "a slice took {spent_us} µs"
        );
        slices += 1;
    }
    // 518 windows; 8 to 12 a slice (the fake clock also moves on the slice's own reads)
    // and 4 by each request.
    assert!((30..=45).contains(&slices), "{slices} slices");
    assert_eq!(h.dispatched.borrow().len(), 1);
    w1.on_token_response(&h, 101, Some(200), OK);
    assert_eq!(
        *h.resumed.borrow(),
        vec![
            (1, "Bearer tok-1".to_string()),
            (2, "Bearer tok-1".to_string())
        ]
    );
    deliver(&h, &mut w2);
    assert_eq!(h.resumed.borrow().len(), 3);
    assert_eq!(h.dispatched.borrow().len(), 1, "one exchange for all");
}

#[test]
fn the_slice_grows_only_when_a_signature_has_waited() {
    let (h, c) = (host(), config());
    let mut w = Worker::new();
    h.clock_step_ns.set(100_000);
    // On a busy worker (a request since the last slice).
    let slice_us = |w: &mut Worker| {
        w.on_request(&h, &c, 900, 0, &None);
        let before = h.now_ns.get();
        w.on_slice(&h);
        (h.now_ns.get() - before) / 1000
    };
    for id in 1..=6 {
        w.on_request(
            &h,
            &c,
            id,
            0,
            &Some(&json!({ "user_name": format!("u{id}") })),
        );
    }
    w.on_wake(&h);
    let spent = slice_us(&mut w);
    assert!(spent <= SIGNING_SLICE_US + 300, "fresh: {spent} µs");
    // The host was busy: the oldest signature has waited 250 ms, then 10 s.
    for (waited_ms, slices) in [(SIGNING_WAIT_STEP_MS, 2), (10_000, MAX_SIGNING_SLICES)] {
        h.now_ns.set(T0 + waited_ms * 1_000_000);
        let spent = slice_us(&mut w);
        let grown = slices * SIGNING_SLICE_US;
        assert!(
            (grown..=grown + 300).contains(&spent),
            "waited {waited_ms} ms: {spent} µs"
        );
    }
    while w.signing() {
        w.on_slice(&h);
    }
    assert_eq!(h.dispatched.borrow().len(), 6);
}

#[test]
fn an_idle_worker_signs_in_larger_slices() {
    let (h, c) = (host(), config());
    let mut w = Worker::new();
    h.clock_step_ns.set(100_000);
    w.on_request(&h, &c, 1, 0, &Some(&alice()));
    w.on_wake(&h); // counts the request: this slice is a busy one
    let before = h.now_ns.get();
    w.on_slice(&h);
    let spent = (h.now_ns.get() - before) / 1000;
    let idle = IDLE_SIGNING_SLICES * SIGNING_SLICE_US;
    assert!((idle..=idle + 300).contains(&spent), "{spent} µs");
}

#[test]
fn requests_help_a_signature_under_way_and_leave_the_dispatch_to_the_worker() {
    let (h, c) = (host(), config());
    let mut w = Worker::new();
    h.clock_step_ns.set(100_000);
    assert_eq!(w.on_request(&h, &c, 1, 0, &Some(&alice())), Decision::Wait);
    w.on_wake(&h);
    assert!(w.signing());
    // The clock stands still from here: only requests can move the signature on.
    h.clock_step_ns.set(0);
    let wakes = h.wakes.get();
    let mut requests = 0;
    while h.wakes.get() == wakes && requests < 1_000 {
        requests += 1;
        w.on_request(&h, &c, 1_000 + requests, 0, &Some(&alice()));
    }
    // 4 windows a request; the first slice had done some already.
    assert!((60..=130).contains(&requests), "{requests} requests");
    assert!(
        h.dispatched.borrow().is_empty(),
        "a request does not own the callout"
    );
    assert!(w.signing(), "the tick goes on until it is dispatched");
    w.on_wake(&h);
    assert_eq!(h.dispatched.borrow().len(), 1);
    assert!(!w.signing());
    w.on_token_response(&h, 101, Some(200), OK);
    assert_eq!(h.resumed.borrow().len() as u32, 1 + requests);
}

/// An identity whose host reads single string claims cheaply, and which counts how often
/// all the claims were read.
struct CheapClaims {
    claims: Value,
    full_reads: Cell<u32>,
}

impl Identity for CheapClaims {
    fn string_claim(&self, path: &[String]) -> Option<String> {
        let mut value = &self.claims;
        for step in path {
            value = value.get(step)?;
        }
        value.as_str().map(str::to_string)
    }
    fn claims(&self) -> Option<Value> {
        self.full_reads.set(self.full_reads.get() + 1);
        Some(self.claims.clone())
    }
}

#[test]
fn all_claims_are_read_only_for_an_exchange_never_for_a_plain_hit() {
    let (mut w, h, c) = (Worker::new(), host(), config());
    let alice = CheapClaims {
        claims: alice(),
        full_reads: Cell::new(0),
    };
    assert_eq!(w.on_request(&h, &c, 1, 0, &alice), Decision::Wait);
    assert_eq!(alice.full_reads.get(), 1, "the assertion's attributes");
    assert_eq!(w.on_request(&h, &c, 2, 0, &alice), Decision::Wait);
    assert_eq!(alice.full_reads.get(), 1, "joining an exchange needs none");
    w.on_wake(&h);
    w.on_token_response(&h, 101, Some(200), OK);
    let hit = Decision::Forward("Bearer tok-1".into());
    assert_eq!(w.on_request(&h, &c, 3, 0, &alice), hit);
    assert_eq!(alice.full_reads.get(), 1, "a hit needs only the user id");
    // The same answer as from the decoded claims.
    assert_eq!(w.on_request(&h, &c, 4, 0, &Some(&alice.claims)), hit);
    h.now_ns
        .set(alice_token_times(&c).refresh_at_ms * 1_000_000);
    assert_eq!(w.on_request(&h, &c, 5, 0, &alice), hit);
    assert_eq!(alice.full_reads.get(), 2, "the refresh's attributes");
    w.on_wake(&h);
    assert_eq!(h.dispatched.borrow().len(), 2);
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

// ---- Issue 13: reproductions of the defects found by reading (fail before the fix) ----

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
    let (mut w, h, c) = (Worker::new(), host(), config());
    assert_eq!(w.on_request(&h, &c, 1, 0, &Some(&alice())), Decision::Wait);
    w.on_wake(&h);
    assert_eq!(h.dispatched.borrow().len(), 1);
    // The host drops the callout (its root context was torn down): no response ever.
    let timeout_ns = c.destinations[0].token_service.timeout_ms * 1_000_000;
    h.now_ns.set(T0 + timeout_ns + SECOND);
    w.on_tick(&h);
    assert_eq!(
        *h.failed.borrow(),
        vec![(1, Failure::Timeout)],
        "the waiter is answered within the timeout plus a second"
    );
    assert_eq!(w.on_request(&h, &c, 2, 0, &Some(&alice())), Decision::Wait);
    w.on_wake(&h);
    assert_eq!(
        h.dispatched.borrow().len(),
        2,
        "a fresh exchange, not a join"
    );
}

#[test]
fn repro_a_lost_wake_is_made_up_by_the_tick() {
    let (mut w, h, c) = (Worker::new(), host(), config());
    // The wake for alice's exchange is requested but never delivered.
    assert_eq!(w.on_request(&h, &c, 1, 0, &Some(&alice())), Decision::Wait);
    assert_eq!(w.on_request(&h, &c, 2, 0, &Some(&bob())), Decision::Wait);
    h.now_ns.set(T0 + SECOND);
    w.on_tick(&h);
    assert_eq!(h.dispatched.borrow().len(), 2, "both exchanges started");
}

#[test]
fn repro_users_whose_locks_share_a_stripe_do_not_wait_for_each_other() {
    // alice's destination waits 600 s for its token service, the other one 1 s.
    let c = two_destinations(600, 1);
    let alice_key = CacheKey::new(&c.destinations[0].cache_namespace, "alice", c.cache_slots);
    let other = (0..1_000_000)
        .map(|i| format!("user{i}"))
        .find(|u| {
            let k = CacheKey::new(&c.destinations[1].cache_namespace, u, c.cache_slots);
            k.lock_stripe() == alice_key.lock_stripe() && k.slot != alice_key.slot
        })
        .unwrap();
    let h = host();
    let (mut w1, mut w2) = (Worker::new(), Worker::new());
    w1.on_request(&h, &c, 1, 0, &Some(&alice()));
    w1.on_wake(&h);
    assert_eq!(h.dispatched.borrow().len(), 1);
    let claims = json!({ "user_name": other });
    assert_eq!(w2.on_request(&h, &c, 2, 1, &Some(&claims)), Decision::Wait);
    w2.on_wake(&h);
    assert_eq!(
        h.dispatched.borrow().len(),
        2,
        "another user's exchange does not wait behind alice's"
    );
}

#[test]
fn repro_a_holder_that_comes_back_late_neither_duplicates_nor_releases_the_new_lock() {
    // Rejections are not held, so nothing but the lock keeps w3 from exchanging.
    let mut config = config_json(vec![destination_json("d")]);
    config["failedExchangeHoldSeconds"] = json!(0);
    let (h, c) = (host(), Rc::new(parse(&config).unwrap()));
    let (mut w1, mut w2, mut w3) = (Worker::new(), Worker::new(), Worker::new());
    w1.on_request(&h, &c, 1, 0, &Some(&alice()));
    w1.on_wake(&h);
    assert_eq!(h.dispatched.borrow().len(), 1);
    // w1's callout overruns the lock's deadline; w2 takes over and exchanges.
    h.now_ns.set(T0 + 13 * SECOND);
    w2.on_request(&h, &c, 2, 0, &Some(&alice()));
    w2.on_wake(&h);
    assert_eq!(
        h.dispatched.borrow().len(),
        2,
        "w2 took over the abandoned lock"
    );
    // w1's answer arrives late: it must not free the lock w2 now holds.
    w1.on_token_response(&h, 101, Some(400), br#"{"error":"invalid_grant"}"#);
    w3.on_request(&h, &c, 3, 0, &Some(&alice()));
    w3.on_wake(&h);
    assert_eq!(
        h.dispatched.borrow().len(),
        2,
        "w3 joins w2's exchange instead of starting a third"
    );
}

#[test]
fn repro_a_holder_whose_signing_overran_the_lock_does_not_exchange_as_well() {
    let (h, c) = (host(), config());
    let (mut w1, mut w2) = (Worker::new(), Worker::new());
    h.clock_step_ns.set(100_000);
    w1.on_request(&h, &c, 1, 0, &Some(&alice()));
    w1.on_wake(&h);
    assert!(w1.signing(), "signing is under way, the lock taken");
    // A signing backlog: w1 does not get to its slices until the lock's deadline passed.
    h.now_ns.set(T0 + 13 * SECOND);
    w2.on_request(&h, &c, 2, 0, &Some(&alice()));
    w2.on_wake(&h);
    while w2.signing() {
        w2.on_slice(&h);
    }
    assert_eq!(h.dispatched.borrow().len(), 1, "w2 exchanges");
    while w1.signing() {
        w1.on_slice(&h);
    }
    assert_eq!(
        h.dispatched.borrow().len(),
        1,
        "w1, no longer the holder, joins instead of exchanging too"
    );
}

#[test]
fn repro_new_users_beyond_the_admission_cap_are_refused_at_once_without_signing() {
    let mut config = config_json(vec![destination_json("d")]);
    config["maxExchangesPerWorker"] = json!(8);
    let c = Rc::new(parse(&config).expect("maxExchangesPerWorker is a setting"));
    let (mut w, h) = (Worker::new(), host());
    for id in 0..20u32 {
        let claims = json!({ "user_name": format!("u{id}") });
        let decision = w.on_request(&h, &c, id, 0, &Some(&claims));
        if id < 8 {
            assert_eq!(decision, Decision::Wait);
        } else {
            assert!(matches!(
                decision,
                Decision::Fail(Failure::Unavailable { .. })
            ));
        }
    }
    assert_eq!(w.in_flight(), 8);
}

#[test]
fn repro_a_refresh_too_short_lived_to_cache_is_not_retried_every_half_second() {
    let (mut w, h, c) = (Worker::new(), host(), config());
    first_exchange_for_alice(&mut w, &h, &c);
    let times = alice_token_times(&c);
    h.now_ns.set(times.refresh_at_ms * 1_000_000);
    w.on_request(&h, &c, 2, 0, &Some(&alice()));
    w.on_wake(&h);
    assert_eq!(h.dispatched.borrow().len(), 2, "the refresh");
    w.on_token_response(
        &h,
        102,
        Some(200),
        br#"{"access_token":"short","token_type":"bearer","expires_in":20}"#,
    );
    // The old token still serves; no refresh every 500 ms until it runs out.
    for step in 1..=10 {
        h.now_ns
            .set(times.refresh_at_ms * 1_000_000 + step * FAILURE_BACKOFF_MS * 1_000_000);
        assert_eq!(
            w.on_request(&h, &c, 10 + step as u32, 0, &Some(&alice())),
            Decision::Forward("Bearer tok-1".into())
        );
        w.on_wake(&h);
    }
    assert_eq!(
        h.dispatched.borrow().len(),
        2,
        "no retry of a successful refresh"
    );
}
