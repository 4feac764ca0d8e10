//! The worker's own copies of hot tokens: a cache hit finds the user's token in Wasm memory
//! instead of copying it out of shared data (a host call and an 800-byte copy) and hashing
//! the cache key.
//!
//! The copies are a cache of the cache: shared data stays the truth. A copy is used only
//! until the token's refresh time (then the request looks at shared data, where another
//! worker may have stored a newer token), and the notice a worker sends when an exchange
//! ended drops every worker's copy of that identity, so a token replaced or withdrawn
//! anywhere is not served from a copy. Memory is bounded: two generations of at most half
//! the capacity each; a copy not used while a whole generation filled is dropped.

use crate::cache::{TokenTimes, ID_LEN};
use std::collections::HashMap;

/// A token this worker served recently.
#[derive(Clone)]
struct Copy {
    key_id: [u8; ID_LEN],
    access_token: String,
    times: TokenTimes,
}

/// Copies by destination namespace and principal (see [`crate::identity::Principal::key`]).
#[derive(Default)]
pub struct HotTokens {
    capacity: usize,
    current: HashMap<String, Copy>,
    previous: HashMap<String, Copy>,
}

/// The lookup key: the namespace is a fixed-length hex hash, so it never runs into the
/// user id.
fn lookup(namespace: &str, user_id: &str) -> String {
    let mut key = String::with_capacity(namespace.len() + 1 + user_id.len());
    key.push_str(namespace);
    key.push('/');
    key.push_str(user_id);
    key
}

impl HotTokens {
    /// At most `capacity` copies (0: none).
    pub fn new(capacity: usize) -> Self {
        HotTokens {
            capacity,
            ..HotTokens::default()
        }
    }

    /// Changes the capacity (a new configuration); copies beyond it go.
    pub fn set_capacity(&mut self, capacity: usize) {
        if capacity != self.capacity {
            *self = HotTokens::new(capacity);
        }
    }

    /// The user's token if this worker holds a copy that needs no refresh yet.
    pub fn get(
        &mut self,
        namespace: &str,
        user_id: &str,
        now_ms: u64,
    ) -> Option<(&str, TokenTimes)> {
        if self.capacity == 0 {
            return None;
        }
        let key = lookup(namespace, user_id);
        if !self.current.contains_key(&key) {
            let copy = self.previous.remove(&key)?;
            self.insert(key.clone(), copy);
        }
        self.current
            .get(&key)
            .filter(|c| now_ms < c.times.refresh_at_ms)
            .map(|c| (c.access_token.as_str(), c.times))
    }

    /// Keeps a copy of a token read from (or stored in) shared data.
    pub fn put(
        &mut self,
        namespace: &str,
        user_id: &str,
        key_id: [u8; ID_LEN],
        access_token: &str,
        times: TokenTimes,
    ) {
        if self.capacity == 0 {
            return;
        }
        let key = lookup(namespace, user_id);
        self.previous.remove(&key);
        self.insert(
            key,
            Copy {
                key_id,
                access_token: access_token.to_owned(),
                times,
            },
        );
    }

    /// Drops every copy of the identity `key_id` (its exchange ended somewhere).
    pub fn forget(&mut self, key_id: &[u8; ID_LEN]) {
        if self.current.is_empty() && self.previous.is_empty() {
            return;
        }
        self.current.retain(|_, c| c.key_id != *key_id);
        self.previous.retain(|_, c| c.key_id != *key_id);
    }

    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert(&mut self, key: String, copy: Copy) {
        if self.current.len() >= self.capacity.div_ceil(2) {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key, copy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times(refresh_at_ms: u64) -> TokenTimes {
        TokenTimes {
            refresh_at_ms,
            reuse_until_ms: refresh_at_ms + 100,
        }
    }

    #[test]
    fn a_copy_serves_until_its_refresh_time_and_is_forgotten_on_notice() {
        let mut hot = HotTokens::new(8);
        hot.put("ns", "alice", [1; ID_LEN], "tok", times(1_000));
        assert_eq!(hot.get("ns", "alice", 999), Some(("tok", times(1_000))));
        assert_eq!(hot.get("ns", "alice", 1_000), None, "due for refresh");
        assert_eq!(hot.get("other", "alice", 0), None);
        assert_eq!(hot.get("ns", "bob", 0), None);
        hot.forget(&[2; ID_LEN]);
        assert_eq!(hot.get("ns", "alice", 0), Some(("tok", times(1_000))));
        hot.forget(&[1; ID_LEN]);
        assert_eq!(hot.get("ns", "alice", 0), None);
    }

    #[test]
    fn memory_stays_bounded_and_used_copies_survive() {
        let mut hot = HotTokens::new(4);
        hot.put("ns", "keep", [0; ID_LEN], "k", times(1_000));
        for i in 0..100u8 {
            hot.put("ns", &format!("u{i}"), [i; ID_LEN], "t", times(1_000));
            assert!(hot.get("ns", "keep", 0).is_some(), "used, so kept");
            assert!(hot.len() <= 4);
        }
        let mut off = HotTokens::new(0);
        off.put("ns", "a", [0; ID_LEN], "t", times(1_000));
        assert!(off.get("ns", "a", 0).is_none() && off.is_empty());
    }
}
