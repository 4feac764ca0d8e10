//! Token cache policy and the encoding of its entries.
//!
//! Entries live in the host's shared data (see [`crate::coordination::slot`]): one map for
//! all workers of a VM, which has no expiry and cannot delete keys. So the cache is a fixed
//! table of slots: a user's entry goes to slot `hash(destination, user) mod slots`, and the
//! entry carries the full hash so a slot taken over by another user is never mistaken for
//! one's own. The number of keys, and so the memory, is bounded by the slot count however
//! many users come and go. Keys are hashes: user ids never become shared-data keys.
//!
//! A token is served only until its expiry minus a margin (less a per-user jitter, so
//! users who logged in together do not all expire together), and refreshed ahead of
//! that. Failed exchanges are remembered briefly, never as tokens.

use sha2::{Digest, Sha256};

/// Smallest default reuse margin before expiry.
pub const MIN_MARGIN_MS: u64 = 30_000;
/// Length of the identity hash stored in entries.
pub const ID_LEN: usize = 20;

/// Which cache slot a destination's token of one user lives in, and whose it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// Hash of (destination namespace, user id).
    pub id: [u8; ID_LEN],
    pub slot: u64,
}

impl CacheKey {
    /// The key for `user_id` at a destination, in a table of `slots` slots.
    pub fn new(destination_namespace: &str, user_id: &str, slots: u64) -> Self {
        let mut hash = Sha256::new();
        // Length-prefixed, so no (namespace, user) pair can collide with another.
        hash.update((destination_namespace.len() as u64).to_be_bytes());
        hash.update(destination_namespace.as_bytes());
        hash.update(user_id.as_bytes());
        let digest = hash.finalize();
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&digest[..ID_LEN]);
        let mut slot_bytes = [0u8; 8];
        slot_bytes.copy_from_slice(&digest[ID_LEN..ID_LEN + 8]);
        CacheKey {
            id,
            slot: u64::from_be_bytes(slot_bytes) % slots.max(1),
        }
    }

    /// A number in [0, 1) fixed for this key: spreads expiry across users.
    pub fn jitter(&self) -> f64 {
        f64::from(u16::from_be_bytes([self.id[0], self.id[1]])) / 65_536.0
    }
}

/// When a freshly issued token should be refreshed, and until when it may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenTimes {
    pub refresh_at_ms: u64,
    pub reuse_until_ms: u64,
}

/// Times for a token issued at `now_ms` that lives `lifetime_ms`: reused until expiry
/// minus the margin (`margin_ms`, or max(30 s, 10 % of the lifetime)) minus up to 5 %
/// of the lifetime of jitter; refreshed ahead in the last 10 % of the lifetime before
/// that, but never in the first half of the reuse period.
pub fn token_times(
    now_ms: u64,
    lifetime_ms: u64,
    margin_ms: Option<u64>,
    jitter: f64,
) -> TokenTimes {
    let margin = margin_ms.unwrap_or_else(|| MIN_MARGIN_MS.max(lifetime_ms / 10));
    let spread = (lifetime_ms as f64 / 20.0 * jitter.clamp(0.0, 1.0)) as u64;
    let reuse_until_ms = (now_ms + lifetime_ms).saturating_sub(margin + spread);
    let usable = reuse_until_ms.saturating_sub(now_ms);
    let refresh_at_ms = reuse_until_ms
        .saturating_sub(lifetime_ms / 10)
        .max(now_ms + usable / 2);
    TokenTimes {
        refresh_at_ms,
        reuse_until_ms,
    }
}

/// What a slot holds for its owner.
#[derive(Clone, PartialEq, Eq)]
pub enum Entry {
    /// An access token, reusable while `now < reuse_until_ms`.
    Token {
        access_token: String,
        times: TokenTimes,
    },
    /// The token service rejected this user's exchange with `code`; held until `until_ms`.
    Rejected { code: String, until_ms: u64 },
    /// The last exchange failed in transport (`timeout` or unavailable); retried after
    /// `until_ms`.
    Failed { timeout: bool, until_ms: u64 },
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Entry::Token { times, .. } => write!(f, "Token({times:?})"),
            Entry::Rejected { code, until_ms } => {
                write!(f, "Rejected({code}, until_ms: {until_ms})")
            }
            Entry::Failed { timeout, until_ms } => {
                write!(f, "Failed(timeout: {timeout}, until_ms: {until_ms})")
            }
        }
    }
}

const TOKEN: u8 = 1;
const REJECTED: u8 = 2;
const FAILED_UNAVAILABLE: u8 = 3;
const FAILED_TIMEOUT: u8 = 4;
const HEADER: usize = 1 + ID_LEN + 8 + 8;

impl Entry {
    /// `[kind][id][until ms][refresh-at ms][UTF-8 token or error code]` (big-endian).
    pub fn encode(&self, key: &CacheKey) -> Vec<u8> {
        let (kind, until, refresh, text) = match self {
            Entry::Token {
                access_token,
                times,
            } => (
                TOKEN,
                times.reuse_until_ms,
                times.refresh_at_ms,
                access_token.as_str(),
            ),
            Entry::Rejected { code, until_ms } => (REJECTED, *until_ms, 0, code.as_str()),
            Entry::Failed { timeout, until_ms } => {
                let kind = if *timeout {
                    FAILED_TIMEOUT
                } else {
                    FAILED_UNAVAILABLE
                };
                (kind, *until_ms, 0, "")
            }
        };
        let mut out = Vec::with_capacity(HEADER + text.len());
        out.push(kind);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&until.to_be_bytes());
        out.extend_from_slice(&refresh.to_be_bytes());
        out.extend_from_slice(text.as_bytes());
        out
    }

    /// Decodes the slot's entry if it belongs to `key`; anything malformed, emptied or
    /// owned by another user is no entry.
    pub fn decode(bytes: &[u8], key: &CacheKey) -> Option<Entry> {
        let header = bytes.get(..HEADER)?;
        if header[1..=ID_LEN] != key.id {
            return None;
        }
        let number = |at: usize| -> Option<u64> {
            Some(u64::from_be_bytes(header.get(at..at + 8)?.try_into().ok()?))
        };
        let until = number(1 + ID_LEN)?;
        let refresh = number(1 + ID_LEN + 8)?;
        let text = std::str::from_utf8(&bytes[HEADER..]).ok()?.to_string();
        match header[0] {
            TOKEN if !text.is_empty() => Some(Entry::Token {
                access_token: text,
                times: TokenTimes {
                    refresh_at_ms: refresh,
                    reuse_until_ms: until,
                },
            }),
            REJECTED if !text.is_empty() => Some(Entry::Rejected {
                code: text,
                until_ms: until,
            }),
            FAILED_UNAVAILABLE => Some(Entry::Failed {
                timeout: false,
                until_ms: until,
            }),
            FAILED_TIMEOUT => Some(Entry::Failed {
                timeout: true,
                until_ms: until,
            }),
            _ => None,
        }
    }

    /// The entry if it still applies at `now_ms`.
    pub fn live_at(self, now_ms: u64) -> Option<Entry> {
        let until = match &self {
            Entry::Token { times, .. } => times.reuse_until_ms,
            Entry::Rejected { until_ms, .. } | Entry::Failed { until_ms, .. } => *until_ms,
        };
        (now_ms < until).then_some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hide_user_ids_stay_in_their_table_and_separate_destinations() {
        let a = CacheKey::new("ns1", "alice", 1000);
        assert!(a.slot < 1000);
        assert_ne!(a.id, CacheKey::new("ns2", "alice", 1000).id);
        assert_ne!(
            CacheKey::new("ns1", "a\u{0}b", 10).id,
            CacheKey::new("ns1\u{0}a", "b", 10).id
        );
        assert_eq!(CacheKey::new("ns1", "alice", 1).slot, 0);
        assert!((0.0..1.0).contains(&a.jitter()));
    }

    #[test]
    fn margin_jitter_and_refresh_ahead() {
        // 3600 s: margin 360 s, jitter up to 180 s, refresh in the 360 s before reuse ends.
        let t = token_times(0, 3_600_000, None, 0.0);
        assert_eq!(t.reuse_until_ms, 3_240_000);
        assert_eq!(t.refresh_at_ms, 2_880_000);
        let t = token_times(0, 3_600_000, None, 0.5);
        assert_eq!(t.reuse_until_ms, 3_240_000 - 90_000);
        // 60 s: margin 30 s; refresh never in the first half of the 30 s reuse.
        let t = token_times(1000, 60_000, None, 0.0);
        assert_eq!((t.reuse_until_ms, t.refresh_at_ms), (31_000, 25_000));
        let t = token_times(1000, 33_000, None, 0.0);
        assert_eq!((t.reuse_until_ms, t.refresh_at_ms), (4_000, 2_500));
        assert_eq!(token_times(1000, 20_000, None, 0.0).reuse_until_ms, 0);
        assert_eq!(
            token_times(1000, 60_000, Some(5_000), 0.0).reuse_until_ms,
            56_000
        );
        // Never past expiry minus the margin, whatever the jitter.
        for j in [0.0, 0.3, 0.999] {
            let t = token_times(7, 100_000, None, j);
            assert!(
                t.refresh_at_ms <= t.reuse_until_ms && t.reuse_until_ms <= 7 + 100_000 - 30_000
            );
        }
    }

    #[test]
    fn entries_round_trip_belong_to_their_user_and_expire() {
        let key = CacheKey::new("ns", "alice", 64);
        let other = CacheKey::new("ns", "bob", 64);
        let times = TokenTimes {
            refresh_at_ms: 400,
            reuse_until_ms: 500,
        };
        let t = Entry::Token {
            access_token: "tok".into(),
            times,
        };
        assert_eq!(Entry::decode(&t.encode(&key), &key), Some(t.clone()));
        assert_eq!(
            Entry::decode(&t.encode(&key), &other),
            None,
            "a slot shared with another user"
        );
        assert_eq!(t.clone().live_at(499), Some(t.clone()));
        assert_eq!(t.clone().live_at(500), None);
        for e in [
            Entry::Rejected {
                code: "invalid_grant".into(),
                until_ms: 9,
            },
            Entry::Failed {
                timeout: true,
                until_ms: 9,
            },
            Entry::Failed {
                timeout: false,
                until_ms: 9,
            },
        ] {
            assert_eq!(Entry::decode(&e.encode(&key), &key), Some(e));
        }
        assert_eq!(Entry::decode(b"", &key), None);
        assert_eq!(Entry::decode(&t.encode(&key)[..HEADER], &key), None);
        assert!(!format!("{t:?}").contains("tok"));
    }
}
