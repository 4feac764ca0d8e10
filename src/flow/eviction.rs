//! A token the backend refused is dropped (as Kong's `purge_token_on_upstream_status_codes`
//! does): when the backend answers a propagated request with one of the destination's
//! `evictTokenOnUpstreamStatus` (default 401), the token that request carried leaves the
//! shared slot and every worker's copy, so the next request exchanges anew. The client gets
//! the backend's answer unchanged.
//!
//! A backend that refuses a user whatever the token would otherwise cost an exchange per
//! request: a worker evicts an identity's token at most once per
//! `failedExchangeHoldSeconds` (the hold that spares the token service a broken user).

use super::Worker;
use crate::cache::{CacheKey, ID_LEN};
use crate::config::PluginConfig;
use crate::coordination::slot;
use crate::host::{Host, Level};
use crate::identity::{self, Identity};
use crate::metrics::Metric;
use std::collections::HashMap;

/// Identities whose token this worker evicted recently, at most this many (older ones
/// are forgotten first once it is full).
const REMEMBERED: usize = 1024;

/// When this worker last evicted each identity's token.
#[derive(Default)]
pub struct RecentEvictions(HashMap<[u8; ID_LEN], u64>);

impl RecentEvictions {
    /// True if `id` was evicted within `hold_ms` before `now_ms`.
    fn recently(&self, id: &[u8; ID_LEN], now_ms: u64, hold_ms: u64) -> bool {
        self.0
            .get(id)
            .is_some_and(|at| now_ms.saturating_sub(*at) < hold_ms)
    }

    /// Notes an eviction of `id` at `now_ms`.
    fn note(&mut self, id: [u8; ID_LEN], now_ms: u64, hold_ms: u64) {
        if self.0.len() >= REMEMBERED {
            self.0.retain(|_, at| now_ms.saturating_sub(*at) < hold_ms);
            if self.0.len() >= REMEMBERED {
                self.0.clear();
            }
        }
        self.0.insert(id, now_ms);
    }
}

impl Worker {
    /// The backend answered a request for `config.destinations[destination]` that carried
    /// `carried` (the value of its credential header) with one of the destination's
    /// eviction statuses: drops that credential for the request's principal, here and on
    /// every worker. True if one was dropped.
    pub fn on_backend_refused(
        &mut self,
        host: &dyn Host,
        config: &PluginConfig,
        destination: usize,
        identity: &dyn Identity,
        carried: &str,
    ) -> bool {
        let Some(dest) = config.destinations.get(destination) else {
            return false;
        };
        let Some(access_token) = dest.carrier.credential(carried) else {
            return false;
        };
        let principal = match identity.quick_principal(&dest.user_id) {
            Some(principal) => principal,
            None => match identity
                .claims()
                .and_then(|claims| identity::principal(&dest.user_id, &claims).ok())
            {
                Some(principal) => principal,
                None => return false,
            },
        };
        let key = CacheKey::new(&dest.cache_namespace, &principal.key(), config.cache_slots);
        let now_ms = host.now_ms();
        if self
            .evictions
            .recently(&key.id, now_ms, config.failure_hold_ms)
        {
            return false;
        }
        self.hot.forget(&key.id);
        if !slot::evict(host, &key, access_token) {
            return false; // a newer token is stored already
        }
        self.evictions.note(key.id, now_ms, config.failure_hold_ms);
        self.notify_others(host, &key);
        self.counters.add(Metric::TokenEvicted, 1);
        host.log(
            Level::Info,
            &format!(
                "destination {}: the backend refused the token of user {}; it is dropped",
                dest.name, principal.user_id
            ),
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_is_evicted_at_most_once_per_hold() {
        let mut recent = RecentEvictions::default();
        assert!(!recent.recently(&[1; ID_LEN], 1_000, 5_000));
        recent.note([1; ID_LEN], 1_000, 5_000);
        assert!(recent.recently(&[1; ID_LEN], 5_999, 5_000));
        assert!(
            !recent.recently(&[2; ID_LEN], 5_999, 5_000),
            "another identity"
        );
        assert!(!recent.recently(&[1; ID_LEN], 6_000, 5_000));
        assert!(!recent.recently(&[1; ID_LEN], 1_000, 0), "no hold");
        for i in 0..5_000u32 {
            let mut id = [0; ID_LEN];
            id[..4].copy_from_slice(&i.to_be_bytes());
            recent.note(id, 7_000, 5_000);
            assert!(recent.0.len() <= REMEMBERED);
        }
    }
}
