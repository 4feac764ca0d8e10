//! Token cache policy and the shared-data encoding of its entries.
//!
//! Entries live in the host's shared data (one map for all workers of a VM). Keys are
//! hashes of destination and user, so user ids never become shared-data keys verbatim.
//! A token is served only until its expiry minus a margin; a rejected exchange is held
//! briefly so a broken user cannot hammer the token service, and is never a token.

use sha2::{Digest, Sha256};

/// Prefix of every shared-data key this plugin writes.
pub const KEY_PREFIX: &str = "principal-propagation/token/";
/// Smallest default reuse margin before expiry.
pub const MIN_MARGIN_MS: u64 = 30_000;

/// The shared-data key for a destination's token of `user_id`.
pub fn cache_key(destination_namespace: &str, user_id: &str) -> String {
    let mut hash = Sha256::new();
    // Length-prefixed, so no (namespace, user) pair can collide with another.
    hash.update((destination_namespace.len() as u64).to_be_bytes());
    hash.update(destination_namespace.as_bytes());
    hash.update(user_id.as_bytes());
    let digest = hash.finalize();
    let mut key = String::with_capacity(KEY_PREFIX.len() + 40);
    key.push_str(KEY_PREFIX);
    for b in &digest[..20] {
        key.push_str(&format!("{b:02x}"));
    }
    key
}

/// Until when a token that lives `lifetime_ms` from `now_ms` may be reused:
/// expiry minus `margin_ms`, or by default minus max(30 s, 10 % of the lifetime).
pub fn reuse_until(now_ms: u64, lifetime_ms: u64, margin_ms: Option<u64>) -> u64 {
    let margin = margin_ms.unwrap_or_else(|| MIN_MARGIN_MS.max(lifetime_ms / 10));
    (now_ms + lifetime_ms).saturating_sub(margin)
}

/// What shared data holds for one key.
#[derive(Clone, PartialEq, Eq)]
pub enum Entry {
    /// An access token, reusable while `now < reuse_until_ms`.
    Token {
        access_token: String,
        reuse_until_ms: u64,
    },
    /// The token service rejected this user's exchange with `code`; held until `until_ms`.
    Rejected { code: String, until_ms: u64 },
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Entry::Token { reuse_until_ms, .. } => {
                write!(f, "Token(reuse_until_ms: {reuse_until_ms})")
            }
            Entry::Rejected { code, until_ms } => {
                write!(f, "Rejected({code}, until_ms: {until_ms})")
            }
        }
    }
}

const TOKEN: u8 = 1;
const REJECTED: u8 = 2;

impl Entry {
    /// `[kind][valid-until ms, big-endian u64][UTF-8 token or error code]`.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, until, text) = match self {
            Entry::Token {
                access_token,
                reuse_until_ms,
            } => (TOKEN, reuse_until_ms, access_token),
            Entry::Rejected { code, until_ms } => (REJECTED, until_ms, code),
        };
        let mut out = Vec::with_capacity(9 + text.len());
        out.push(kind);
        out.extend_from_slice(&until.to_be_bytes());
        out.extend_from_slice(text.as_bytes());
        out
    }

    /// Decodes an entry; anything malformed (or an emptied key) is no entry.
    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        let (&kind, rest) = bytes.split_first()?;
        let until = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
        let text = std::str::from_utf8(rest.get(8..)?).ok()?.to_string();
        if text.is_empty() {
            return None;
        }
        match kind {
            TOKEN => Some(Entry::Token {
                access_token: text,
                reuse_until_ms: until,
            }),
            REJECTED => Some(Entry::Rejected {
                code: text,
                until_ms: until,
            }),
            _ => None,
        }
    }

    /// The entry if it still applies at `now_ms`.
    pub fn live_at(self, now_ms: u64) -> Option<Entry> {
        let until = match &self {
            Entry::Token { reuse_until_ms, .. } => *reuse_until_ms,
            Entry::Rejected { until_ms, .. } => *until_ms,
        };
        (now_ms < until).then_some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hide_user_ids_and_separate_destinations() {
        let a = cache_key("ns1", "alice");
        assert!(a.starts_with(KEY_PREFIX) && !a.contains("alice"));
        assert_eq!(a.len(), KEY_PREFIX.len() + 40);
        assert_ne!(a, cache_key("ns2", "alice"));
        assert_ne!(cache_key("ns1", "a\u{0}b"), cache_key("ns1\u{0}a", "b"));
    }

    #[test]
    fn margin_is_the_larger_of_30s_and_10_percent() {
        assert_eq!(
            reuse_until(1000, 3_600_000, None),
            1000 + 3_600_000 - 360_000
        );
        assert_eq!(reuse_until(1000, 60_000, None), 1000 + 30_000);
        assert_eq!(reuse_until(1000, 20_000, None), 0);
        assert_eq!(reuse_until(1000, 60_000, Some(5_000)), 56_000);
    }

    #[test]
    fn entries_round_trip_and_expire() {
        let t = Entry::Token {
            access_token: "tok".into(),
            reuse_until_ms: 500,
        };
        assert_eq!(Entry::decode(&t.encode()), Some(t.clone()));
        assert_eq!(t.clone().live_at(499), Some(t.clone()));
        assert_eq!(t.clone().live_at(500), None);
        let r = Entry::Rejected {
            code: "invalid_grant".into(),
            until_ms: 9,
        };
        assert_eq!(Entry::decode(&r.encode()), Some(r));
        assert_eq!(Entry::decode(b""), None);
        assert_eq!(Entry::decode(&[1, 0, 0]), None);
        assert_eq!(Entry::decode(&[1, 0, 0, 0, 0, 0, 0, 0, 9]), None);
        assert!(!format!("{t:?}").contains("tok"));
    }
}
