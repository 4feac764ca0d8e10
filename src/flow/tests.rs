use super::*;
use crate::testing::{config_json, destination_json, parse};
use serde_json::json;
use std::cell::{Cell, RefCell};

/// An in-memory host that records what the flow asks of it.
#[derive(Default)]
struct FakeHost {
    now_ns: Cell<u64>,
    shared: RefCell<HashMap<String, Vec<u8>>>,
    dispatched: RefCell<Vec<TokenRequest>>,
    wakes: Cell<u32>,
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
        self.now_ns.get()
    }
    fn fill_random(&self, buf: &mut [u8]) -> bool {
        self.counter.set(self.counter.get() + 1);
        buf.fill(self.counter.get());
        true
    }
    fn shared_get(&self, key: &str) -> Option<Vec<u8>> {
        self.shared.borrow().get(key).cloned()
    }
    fn shared_set(&self, key: &str, value: &[u8]) {
        self.shared.borrow_mut().insert(key.into(), value.to_vec());
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
const OK: &[u8] = br#"{"access_token":"tok-1","token_type":"bearer","expires_in":3600}"#;

fn worker() -> Worker {
    Worker::new(Rc::new(
        parse(&config_json(vec![destination_json("d")])).unwrap(),
    ))
}

fn host() -> FakeHost {
    let h = FakeHost::default();
    h.now_ns.set(T0);
    h
}

fn alice() -> Value {
    json!({"user_name": "alice", "email": "alice@example.com"})
}

fn form_of(request: &TokenRequest) -> HashMap<String, String> {
    form_urlencoded::parse(&request.body).into_owned().collect()
}

#[test]
fn concurrent_requests_of_one_user_share_one_exchange() {
    let (mut w, h) = (worker(), host());
    for id in 1..=5 {
        assert_eq!(w.on_request(&h, id, 0, Some(&alice())), Decision::Wait);
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
fn cached_token_serves_until_the_margin_then_a_new_exchange_runs() {
    let (mut w, h) = (worker(), host());
    w.on_request(&h, 1, 0, Some(&alice()));
    w.on_wake(&h);
    w.on_token_response(&h, 101, Some(200), OK);
    assert_eq!(
        w.on_request(&h, 2, 0, Some(&alice())),
        Decision::Forward("Bearer tok-1".into())
    );
    // 3600 s lifetime, margin 360 s: still good at 3239 s, not at 3240 s.
    h.now_ns.set(T0 + 3_239_000_000_000);
    assert_eq!(
        w.on_request(&h, 3, 0, Some(&alice())),
        Decision::Forward("Bearer tok-1".into())
    );
    h.now_ns.set(T0 + 3_240_000_000_000);
    assert_eq!(w.on_request(&h, 4, 0, Some(&alice())), Decision::Wait);
    w.on_wake(&h);
    assert_eq!(h.dispatched.borrow().len(), 2);
}

#[test]
fn every_exchange_gets_a_fresh_assertion_id() {
    let (mut w, h) = (worker(), host());
    w.on_request(&h, 1, 0, Some(&alice()));
    w.on_wake(&h);
    w.on_token_response(&h, 101, Some(503), b"down");
    w.on_request(&h, 2, 0, Some(&alice()));
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
    let (mut w, h) = (worker(), host());
    w.on_request(&h, 1, 0, Some(&alice()));
    w.on_request(&h, 2, 0, Some(&json!({"user_name": "bob"})));
    w.on_wake(&h);
    assert_eq!(h.dispatched.borrow().len(), 2);
    w.on_token_response(&h, 102, Some(400), br#"{"error":"invalid_grant"}"#);
    w.on_token_response(&h, 101, Some(200), OK);
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
        w.on_request(&h, 3, 0, Some(&json!({"user_name": "bob"}))),
        Decision::Fail(Failure::Rejected {
            code: "invalid_grant".into()
        })
    );
    h.now_ns.set(T0 + 5_000_000_000);
    assert_eq!(
        w.on_request(&h, 4, 0, Some(&json!({"user_name": "bob"}))),
        Decision::Wait
    );
    // The log names the user and the code, never the token.
    assert!(h.logs.borrow().iter().all(|l| !l.contains("tok-1")));
}

#[test]
fn unusable_users_are_refused_before_any_exchange() {
    let (mut w, h) = (worker(), host());
    assert_eq!(
        w.on_request(&h, 1, 0, None),
        Decision::Fail(Failure::NotAuthenticated)
    );
    assert!(matches!(
        w.on_request(&h, 2, 0, Some(&json!({"sub": "x"}))),
        Decision::Fail(Failure::UserId(_))
    ));
    assert_eq!(
        w.on_request(&h, 3, 0, Some(&json!({"user_name": "a\u{1}"}))),
        Decision::Fail(Failure::UserIdNotXml)
    );
    assert_eq!(h.wakes.get(), 0);
}

#[test]
fn transport_failures_reach_every_waiter_and_are_not_cached() {
    let (mut w, h) = (worker(), host());
    w.on_request(&h, 1, 0, Some(&alice()));
    w.on_request(&h, 2, 0, Some(&alice()));
    w.on_wake(&h);
    w.on_token_response(&h, 101, None, b"");
    assert_eq!(h.failed.borrow().len(), 2);
    assert!(h.shared.borrow().is_empty());
    h.refuse_dispatch.set(true);
    w.on_request(&h, 3, 0, Some(&alice()));
    w.on_wake(&h);
    assert!(matches!(
        h.failed.borrow()[2],
        (3, Failure::Unavailable { .. })
    ));
    assert_eq!(w.in_flight(), 0);
}

#[test]
fn requests_that_went_away_are_skipped_and_the_rest_still_resume() {
    let (mut w, h) = (worker(), host());
    for id in 1..=3 {
        w.on_request(&h, id, 0, Some(&alice()));
    }
    w.forget_request(1);
    h.gone.borrow_mut().push(2);
    w.on_wake(&h);
    w.on_token_response(&h, 101, Some(200), OK);
    assert_eq!(*h.resumed.borrow(), vec![(3, "Bearer tok-1".to_string())]);
    assert!(
        h.shared.borrow().values().next().is_some(),
        "token cached for later requests"
    );
}

#[test]
fn short_lived_tokens_serve_their_waiters_but_are_not_cached() {
    let (mut w, h) = (worker(), host());
    w.on_request(&h, 1, 0, Some(&alice()));
    w.on_wake(&h);
    w.on_token_response(
        &h,
        101,
        Some(200),
        br#"{"access_token":"t","token_type":"bearer","expires_in":20}"#,
    );
    assert_eq!(*h.resumed.borrow(), vec![(1, "Bearer t".to_string())]);
    assert!(h.shared.borrow().is_empty());
}

#[test]
fn a_host_that_cannot_schedule_the_exchange_fails_the_request_closed() {
    let (mut w, h) = (worker(), host());
    h.refuse_wake.set(true);
    assert!(matches!(
        w.on_request(&h, 1, 0, Some(&alice())),
        Decision::Fail(Failure::Internal { .. })
    ));
    assert_eq!(w.in_flight(), 0);
    h.refuse_wake.set(false);
    assert_eq!(w.on_request(&h, 2, 0, Some(&alice())), Decision::Wait);
    assert_eq!(w.in_flight(), 1);
}
