//! A cache slot in shared data: a user's entry and the lock of that user's exchange.
//!
//! The lock lives in the slot, so it is as fine-grained as the cache: one exchange per
//! identity across all workers, and a user never waits behind another user's exchange
//! (only two identities in one slot share it: then the second goes ahead without the lock,
//! see [`Claim::Collision`]; the bench reports how often). Every write is a
//! compare-and-swap on the slot as read, so a lock and an entry never overwrite each other.
//!
//! A lock has a holder (the identity), a ticket (one per exchange attempt) and a deadline.
//! Only the ticket's owner frees it; after its deadline anyone may take it, and the late
//! holder is no longer the holder: its next [`claim`] fails unless the lock is still free.
//!
//! Shared data cannot create a key atomically (compare-and-swap is checked only for keys
//! that exist), so a slot is created under one of [`CREATE_STRIPES`] creation locks, which
//! are themselves made before the plugin serves ([`create_stripes`]) and held for the
//! microseconds of one creation.

use crate::cache::{CacheKey, Entry, ID_LEN};
use crate::host::{Clock, SharedData};

/// Prefix of the shared-data keys of slots.
pub const SLOT_PREFIX: &str = "principal-propagation/v2/slot/";
const CREATE_PREFIX: &str = "principal-propagation/v2/create/";
/// Locks guarding the creation of slots.
pub const CREATE_STRIPES: u64 = 256;
/// A creation lock is held within one callback; this only guards against a VM that
/// stopped while holding it.
const CREATE_HOLD_MS: u64 = 1_000;
/// Compare-and-swap attempts before giving up for this callback.
const ATTEMPTS: usize = 8;
/// The layout version of a slot (its first byte).
pub const FORMAT: u8 = 2;
/// `[format][holder id][ticket u64][deadline ms u64]`, then the entry (see [`Entry::encode`]).
pub const LOCK_LEN: usize = 1 + ID_LEN + 8 + 8;
/// A creation lock: `[ticket u64][deadline ms u64]`; free when the deadline is 0.
const FREE_STRIPE: [u8; 16] = [0; 16];

/// The exchange lock of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lock {
    /// The cache key id of the identity whose exchange holds it.
    pub holder: [u8; ID_LEN],
    /// The exchange attempt that holds it (never 0).
    pub ticket: u64,
    pub deadline_ms: u64,
}

/// Shared-data key of a slot.
pub fn slot_key(slot: u64) -> String {
    format!("{SLOT_PREFIX}{slot}")
}

/// The entry of `key` in a slot's bytes, if the slot holds one for this identity: what a
/// cache hit reads.
pub fn entry_in(bytes: &[u8], key: &CacheKey) -> Option<Entry> {
    if bytes.first() != Some(&FORMAT) {
        return None;
    }
    Entry::decode(bytes.get(LOCK_LEN..)?, key)
}

/// The entry of `key`, read from shared data.
pub fn read_entry(host: &(impl SharedData + ?Sized), key: &CacheKey) -> Option<Entry> {
    let (bytes, _) = host.shared_get(&slot_key(key.slot))?;
    entry_in(&bytes, key)
}

/// A slot as read: its lock, its entry bytes as they are, and its version.
struct View {
    lock: Option<Lock>,
    entry: Vec<u8>,
    /// `None`: the slot does not exist yet.
    cas: Option<u32>,
}

impl View {
    fn read(host: &(impl SharedData + ?Sized), key: &CacheKey) -> View {
        let Some((bytes, cas)) = host.shared_get(&slot_key(key.slot)) else {
            return View {
                lock: None,
                entry: Vec::new(),
                cas: None,
            };
        };
        if bytes.len() < LOCK_LEN || bytes[0] != FORMAT {
            // Not ours to read (damaged): the next write replaces it.
            return View {
                lock: None,
                entry: Vec::new(),
                cas: Some(cas),
            };
        }
        let number = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let mut holder = [0u8; ID_LEN];
        holder.copy_from_slice(&bytes[1..=ID_LEN]);
        let ticket = number(1 + ID_LEN);
        let deadline_ms = number(1 + ID_LEN + 8);
        View {
            lock: (ticket != 0).then_some(Lock {
                holder,
                ticket,
                deadline_ms,
            }),
            entry: bytes[LOCK_LEN..].to_vec(),
            cas: Some(cas),
        }
    }

    fn entry(&self, key: &CacheKey) -> Option<Entry> {
        Entry::decode(&self.entry, key)
    }

    /// Writes `lock` and `entry` over the slot as read; false if it changed meanwhile.
    fn write(
        &self,
        host: &(impl SharedData + ?Sized),
        key: &CacheKey,
        lock: Option<Lock>,
        entry: &[u8],
    ) -> bool {
        let Some(cas) = self.cas else { return false };
        let mut bytes = Vec::with_capacity(LOCK_LEN + entry.len());
        bytes.push(FORMAT);
        let lock = lock.unwrap_or(Lock {
            holder: [0; ID_LEN],
            ticket: 0,
            deadline_ms: 0,
        });
        bytes.extend_from_slice(&lock.holder);
        bytes.extend_from_slice(&lock.ticket.to_be_bytes());
        bytes.extend_from_slice(&lock.deadline_ms.to_be_bytes());
        bytes.extend_from_slice(entry);
        host.shared_set(&slot_key(key.slot), &bytes, Some(cas))
    }
}

/// Where an exchange stands after [`claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The slot holds an entry that answers the exchange (as `accept` judged).
    Found(Entry),
    /// The lock is ours (with the ticket and deadline asked for).
    Held,
    /// Another exchange of the same identity holds the lock until `until_ms`: wait for it.
    Wait { until_ms: u64 },
    /// An exchange of another identity that shares the slot holds the lock: go on without
    /// it (this identity's exchange is then single-flight per worker only).
    Collision,
    /// No consistent view within a few attempts: try again from a later callback.
    Busy,
}

/// Takes the lock of `key`'s slot for `ticket` until `deadline_ms`, or extends it if
/// `ticket` holds it still, unless the slot's entry answers the exchange (`accept`). A
/// lock past its deadline is free, for its late holder too.
pub fn claim(
    host: &(impl SharedData + Clock + ?Sized),
    key: &CacheKey,
    ticket: u64,
    deadline_ms: u64,
    accept: &dyn Fn(&Entry) -> bool,
) -> Claim {
    for _ in 0..ATTEMPTS {
        let view = View::read(host, key);
        if view.cas.is_none() {
            create(host, key, ticket);
            continue;
        }
        if let Some(entry) = view.entry(key).filter(|e| accept(e)) {
            return Claim::Found(entry);
        }
        let now_ms = host.now_ms();
        match view.lock {
            Some(lock) if lock.deadline_ms > now_ms && lock.ticket != ticket => {
                return if lock.holder == key.id {
                    Claim::Wait {
                        until_ms: lock.deadline_ms,
                    }
                } else {
                    Claim::Collision
                };
            }
            Some(lock) if lock.ticket == ticket && lock.deadline_ms <= now_ms => {
                // Ours, but overrun: we are no longer the holder. Retaking it is fine only
                // as long as nobody else has: the write below is a compare-and-swap.
            }
            _ => {}
        }
        let lock = Lock {
            holder: key.id,
            ticket,
            deadline_ms,
        };
        if view.write(host, key, Some(lock), &view.entry) {
            return Claim::Held;
        }
    }
    Claim::Busy
}

/// The lock of `key`'s slot as it stands (for a worker waiting on another's exchange).
pub fn lock_of(host: &(impl SharedData + ?Sized), key: &CacheKey) -> Option<Lock> {
    View::read(host, key).lock
}

/// Ends an exchange: stores `merge(the slot's current entry for key)` if it is `Some` (else
/// leaves the entry as it is) and frees the lock if `ticket` still holds it. Another
/// exchange's lock is kept. False if the slot could not be written (contention).
pub fn finish(
    host: &(impl SharedData + ?Sized),
    key: &CacheKey,
    ticket: Option<u64>,
    merge: &dyn Fn(Option<Entry>) -> Option<Entry>,
) -> bool {
    for _ in 0..ATTEMPTS {
        let view = View::read(host, key);
        let ours = |lock: &Lock| Some(lock.ticket) == ticket;
        let lock = view.lock.filter(|l| !ours(l));
        let stored = merge(view.entry(key));
        if stored.is_none() && lock == view.lock {
            return true; // nothing to change
        }
        if view.cas.is_none() {
            return false; // no slot to write: never created
        }
        let entry = match &stored {
            Some(entry) => entry.encode(key),
            None => view.entry.clone(),
        };
        if view.write(host, key, lock, &entry) {
            return true;
        }
    }
    false
}

/// Drops `key`'s token if it is still `access_token` (a newer one, stored meanwhile, stays),
/// keeping the slot's lock. True if it was dropped.
pub fn evict(host: &(impl SharedData + ?Sized), key: &CacheKey, access_token: &str) -> bool {
    for _ in 0..ATTEMPTS {
        let view = View::read(host, key);
        match view.entry(key) {
            Some(Entry::Token {
                access_token: stored,
                ..
            }) if stored == access_token => {}
            _ => return false,
        }
        if view.write(host, key, view.lock, &[]) {
            return true;
        }
    }
    false
}

/// Creates every creation lock that does not exist yet. Called when the plugin is
/// configured, before it serves (a creation lock made while others take it could be
/// held twice).
pub fn create_stripes(host: &(impl SharedData + ?Sized)) {
    for stripe in 0..CREATE_STRIPES {
        let key = stripe_key(stripe);
        if host.shared_get(&key).is_none() {
            host.shared_set(&key, &FREE_STRIPE, None);
        }
    }
}

fn stripe_key(stripe: u64) -> String {
    format!("{CREATE_PREFIX}{stripe}")
}

/// Creates `key`'s slot (empty, lock free) under its creation lock, unless it exists.
fn create(host: &(impl SharedData + Clock + ?Sized), key: &CacheKey, ticket: u64) {
    let stripe = stripe_key(key.slot % CREATE_STRIPES);
    // Never made blindly here: see `create_stripes`.
    let Some((value, cas)) = host.shared_get(&stripe) else {
        return;
    };
    let now_ms = host.now_ms();
    let held_until = value
        .get(8..16)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes);
    if held_until > now_ms {
        return;
    }
    let mut mine = [0u8; 16];
    mine[..8].copy_from_slice(&ticket.to_be_bytes());
    mine[8..].copy_from_slice(&(now_ms + CREATE_HOLD_MS).to_be_bytes());
    if !host.shared_set(&stripe, &mine, Some(cas)) {
        return;
    }
    let slot = slot_key(key.slot);
    if host.shared_get(&slot).is_none() {
        let mut empty = vec![0u8; LOCK_LEN];
        empty[0] = FORMAT;
        host.shared_set(&slot, &empty, None);
    }
    if let Some((value, cas)) = host.shared_get(&stripe) {
        if value == mine {
            host.shared_set(&stripe, &FREE_STRIPE, Some(cas));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::TokenTimes;
    use crate::testing::MemoryHost;

    type Host = MemoryHost;

    fn host() -> Host {
        let h = Host::default();
        h.now_ms.set(1_000);
        create_stripes(&h);
        h
    }

    fn token(text: &str, until: u64) -> Entry {
        Entry::Token {
            access_token: text.into(),
            times: TokenTimes {
                refresh_at_ms: until - 10,
                reuse_until_ms: until,
            },
        }
    }

    const ANY: &dyn Fn(&Entry) -> bool = &|_| true;
    const NONE: &dyn Fn(&Entry) -> bool = &|_| false;

    #[test]
    fn one_holder_per_identity_and_the_same_user_waits_for_it() {
        let h = host();
        let alice = CacheKey::new("ns", "alice", 100);
        assert_eq!(claim(&h, &alice, 1, 5_000, NONE), Claim::Held);
        assert_eq!(
            claim(&h, &alice, 2, 5_000, NONE),
            Claim::Wait { until_ms: 5_000 }
        );
        assert_eq!(claim(&h, &alice, 1, 9_000, NONE), Claim::Held, "extended");
        assert_eq!(lock_of(&h, &alice).unwrap().deadline_ms, 9_000);
    }

    #[test]
    fn evicting_drops_only_the_token_that_was_refused() {
        let h = host();
        let alice = CacheKey::new("ns", "alice", 1);
        let bob = CacheKey::new("ns", "bob", 1);
        assert_eq!(claim(&h, &alice, 7, 5_000, NONE), Claim::Held);
        assert!(finish(&h, &alice, None, &|_| Some(token("old", 9_000))));
        assert!(!evict(&h, &alice, "other"), "not the token it holds");
        assert!(!evict(&h, &bob, "old"), "not bob's slot entry");
        assert_eq!(read_entry(&h, &alice), Some(token("old", 9_000)));
        assert!(evict(&h, &alice, "old"));
        assert_eq!(read_entry(&h, &alice), None);
        assert_eq!(lock_of(&h, &alice).unwrap().ticket, 7, "the lock stays");
        assert!(!evict(&h, &alice, "old"), "once");
    }

    #[test]
    fn another_identity_in_the_slot_is_a_collision_not_a_wait() {
        let h = host();
        let alice = CacheKey::new("ns", "alice", 1);
        let bob = CacheKey::new("ns", "bob", 1);
        assert_eq!(alice.slot, bob.slot);
        assert_eq!(claim(&h, &alice, 1, 5_000, NONE), Claim::Held);
        assert_eq!(claim(&h, &bob, 2, 5_000, NONE), Claim::Collision);
        // Bob's result goes in without freeing alice's lock.
        assert!(finish(&h, &bob, None, &|_| Some(token("b", 9_000))));
        assert_eq!(lock_of(&h, &alice).unwrap().ticket, 1);
        assert_eq!(read_entry(&h, &bob), Some(token("b", 9_000)));
        assert_eq!(read_entry(&h, &alice), None);
    }

    #[test]
    fn a_late_holder_neither_frees_nor_retakes_its_successors_lock() {
        let h = host();
        let alice = CacheKey::new("ns", "alice", 100);
        assert_eq!(claim(&h, &alice, 1, 5_000, NONE), Claim::Held);
        h.now_ms.set(5_000);
        assert_eq!(
            claim(&h, &alice, 2, 20_000, NONE),
            Claim::Held,
            "taken over"
        );
        // The first holder comes back: it may store its token, but the lock stays 2's.
        assert!(finish(&h, &alice, Some(1), &|_| Some(token(
            "late", 30_000
        ))));
        assert_eq!(lock_of(&h, &alice).unwrap().ticket, 2);
        assert_eq!(
            claim(&h, &alice, 1, 20_000, NONE),
            Claim::Wait { until_ms: 20_000 }
        );
        assert!(finish(&h, &alice, Some(2), &|_| None));
        assert_eq!(lock_of(&h, &alice), None, "freed by its holder");
        assert_eq!(read_entry(&h, &alice), Some(token("late", 30_000)));
    }

    #[test]
    fn an_overrun_lock_nobody_took_can_be_taken_again_by_its_holder() {
        let h = host();
        let alice = CacheKey::new("ns", "alice", 100);
        assert_eq!(claim(&h, &alice, 1, 5_000, NONE), Claim::Held);
        h.now_ms.set(6_000);
        assert_eq!(claim(&h, &alice, 1, 9_000, NONE), Claim::Held);
    }

    #[test]
    fn a_stored_entry_answers_the_claim_when_accepted() {
        let h = host();
        let alice = CacheKey::new("ns", "alice", 100);
        assert_eq!(claim(&h, &alice, 1, 5_000, NONE), Claim::Held);
        assert!(finish(&h, &alice, Some(1), &|_| Some(token("t", 9_000))));
        assert_eq!(
            claim(&h, &alice, 2, 5_000, ANY),
            Claim::Found(token("t", 9_000))
        );
        assert_eq!(claim(&h, &alice, 2, 5_000, NONE), Claim::Held);
        // A merge sees the current entry.
        assert!(finish(&h, &alice, Some(2), &|current| {
            assert_eq!(current, Some(token("t", 9_000)));
            None
        }));
        assert_eq!(read_entry(&h, &alice), Some(token("t", 9_000)), "kept");
    }

    #[test]
    fn slots_are_created_once_under_their_creation_lock() {
        let h = host();
        let alice = CacheKey::new("ns", "alice", 100);
        // Another worker holds the creation lock of alice's stripe right now.
        let stripe = stripe_key(alice.slot % CREATE_STRIPES);
        let mut held = [0u8; 16];
        held[8..].copy_from_slice(&2_000u64.to_be_bytes());
        h.shared_set(&stripe, &held, None);
        assert_eq!(claim(&h, &alice, 1, 5_000, NONE), Claim::Busy);
        assert!(h.shared_get(&slot_key(alice.slot)).is_none());
        h.now_ms.set(2_000); // it let go (or its hold ran out)
        assert_eq!(claim(&h, &alice, 1, 5_000, NONE), Claim::Held);
        assert_eq!(h.shared_get(&stripe).unwrap().0, FREE_STRIPE, "released");
        // Without the creation locks (never made) nothing is created blindly.
        let bare = Host::default();
        assert_eq!(claim(&bare, &alice, 1, 5_000, NONE), Claim::Busy);
        assert!(bare.shared.map.borrow().is_empty());
        assert!(!finish(&bare, &alice, Some(1), &|_| Some(token(
            "t", 9_000
        ))));
    }

    #[test]
    fn hits_read_the_entry_past_the_lock_and_ignore_strangers() {
        let h = host();
        let alice = CacheKey::new("ns", "alice", 100);
        claim(&h, &alice, 1, 5_000, NONE);
        finish(&h, &alice, None, &|_| Some(token("t", 9_000)));
        let (bytes, _) = h.shared_get(&slot_key(alice.slot)).unwrap();
        assert_eq!(entry_in(&bytes, &alice), Some(token("t", 9_000)));
        assert_eq!(lock_of(&h, &alice).unwrap().ticket, 1, "still locked");
        assert_eq!(entry_in(&bytes[1..], &alice), None);
        assert_eq!(entry_in(b"", &alice), None);
        // A damaged slot is neither read nor a lock, and the next write repairs it.
        h.shared_set(&slot_key(alice.slot), b"garbage", None);
        assert_eq!(read_entry(&h, &alice), None);
        assert_eq!(claim(&h, &alice, 3, 5_000, NONE), Claim::Held);
    }
}
