//! Which worker queues are alive: a list in shared data of `(queue, last seen)` that every
//! worker renews on its tick.
//!
//! Envoy keeps a shared queue until its `vm_id` goes away, and `enqueue` to the queue of a
//! VM that was replaced (a code update) still succeeds and keeps the message: a notice sent
//! to it would grow memory for ever. So an entry not renewed for [`STALE_MS`] is no longer
//! enqueued to, and the next worker that writes the list drops it. There is no fixed number
//! of workers: the list holds every live one (up to [`MAX_QUEUES`], a bound on the value's
//! size that no Envoy reaches).

use crate::host::{Clock, Random, SharedData};

/// Shared-data key of the registry: a format byte, then `[queue u32][last seen ms u64]` per
/// worker, big-endian. (Never empty: Envoy hands an empty value back as no value.)
pub const REGISTRY_KEY: &str = "principal-propagation/v2/workers";
const FORMAT: u8 = 2;
/// How often a worker renews its entry.
pub const HEARTBEAT_MS: u64 = 2_000;
/// An entry not renewed for this long belongs to a VM that is gone (or stuck).
pub const STALE_MS: u64 = 10_000;
/// Most entries kept (the oldest go first).
pub const MAX_QUEUES: usize = 4096;
const ENTRY_LEN: usize = 4 + 8;
const ATTEMPTS: usize = 8;

/// Creates the (empty) registry if it does not exist, so that every later change can be
/// guarded by compare-and-swap. Called when the plugin is configured, before it serves.
pub fn create(host: &(impl SharedData + ?Sized)) {
    if host.shared_get(REGISTRY_KEY).is_none() {
        host.shared_set(REGISTRY_KEY, &[FORMAT], None);
    }
}

/// Adds or renews `queue`, dropping stale entries; the number of live queues, or `None` if
/// the list could not be written (contention, or a registry [`create`] never made).
pub fn announce(host: &(impl SharedData + Clock + ?Sized), queue: u32) -> Option<usize> {
    for _ in 0..ATTEMPTS {
        let (value, cas) = host.shared_get(REGISTRY_KEY)?;
        let now_ms = host.now_ms();
        let mut entries: Vec<(u32, u64)> = decode(&value)
            .filter(|&(q, seen)| q != queue && !stale(seen, now_ms))
            .collect();
        entries.push((queue, now_ms));
        if entries.len() > MAX_QUEUES {
            // Oldest first (a stable sort keeps this worker, just renewed, last).
            entries.sort_by_key(|&(_, seen)| seen);
            let excess = entries.len() - MAX_QUEUES;
            entries.drain(..excess);
        }
        let encoded: Vec<u8> = std::iter::once(FORMAT)
            .chain(
                entries
                    .iter()
                    .flat_map(|(q, seen)| q.to_be_bytes().into_iter().chain(seen.to_be_bytes())),
            )
            .collect();
        if host.shared_set(REGISTRY_KEY, &encoded, Some(cas)) {
            return Some(entries.len());
        }
    }
    None
}

/// The queues of the live workers.
pub fn live_queues(host: &(impl SharedData + Clock + ?Sized)) -> Vec<u32> {
    let Some((value, _)) = host.shared_get(REGISTRY_KEY) else {
        return Vec::new();
    };
    let now_ms = host.now_ms();
    decode(&value)
        .filter(|&(_, seen)| !stale(seen, now_ms))
        .map(|(q, _)| q)
        .collect()
}

fn stale(seen_ms: u64, now_ms: u64) -> bool {
    now_ms.saturating_sub(seen_ms) > STALE_MS
}

/// The entries; none if the value is not of this format.
fn decode(bytes: &[u8]) -> impl Iterator<Item = (u32, u64)> + '_ {
    let entries = match bytes.split_first() {
        Some((&FORMAT, entries)) => entries,
        _ => &[],
    };
    entries.chunks_exact(ENTRY_LEN).map(|c| {
        let mut queue = [0u8; 4];
        let mut seen = [0u8; 8];
        queue.copy_from_slice(&c[..4]);
        seen.copy_from_slice(&c[4..]);
        (u32::from_be_bytes(queue), u64::from_be_bytes(seen))
    })
}

/// The name of a VM's queue: random, so that each worker has its own (a name is owned by
/// whoever registered it last). `None` without randomness: every VM would share one name
/// and all but one would miss their wake-ups, so the plugin refuses to load.
pub fn queue_name(random: &(impl Random + ?Sized)) -> Option<String> {
    let mut bytes = [0u8; 16];
    if !random.fill_random(&mut bytes) {
        return None;
    }
    let suffix: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("principal-propagation/v2/worker/{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemoryHost;

    type Host = MemoryHost;

    fn host() -> Host {
        let h = Host::default();
        h.now_ms.set(1_000_000);
        create(&h);
        h
    }

    #[test]
    fn repro_more_than_64_workers_all_keep_their_wake_ups() {
        let h = host();
        for queue in 1..=80 {
            announce(&h, queue);
        }
        let live = live_queues(&h);
        assert!(
            (1..=80).all(|q| live.contains(&q)),
            "{} registered",
            live.len()
        );
        assert_eq!(announce(&h, 500), Some(81));
    }

    #[test]
    fn a_queue_nobody_renews_is_no_longer_enqueued_to_and_leaves_the_list() {
        let h = host();
        announce(&h, 1);
        announce(&h, 2);
        for _ in 0..6 {
            h.now_ms.set(h.now_ms.get() + HEARTBEAT_MS);
            announce(&h, 2); // worker 1's VM was replaced: it renews no more
        }
        assert_eq!(live_queues(&h), vec![2]);
        let (value, _) = h.shared_get(REGISTRY_KEY).unwrap();
        assert_eq!(value.len(), 1 + ENTRY_LEN, "the stale entry was dropped");
        // A worker that renews within the staleness window stays.
        h.now_ms.set(h.now_ms.get() + STALE_MS);
        assert_eq!(live_queues(&h), vec![2]);
    }

    #[test]
    fn renewing_moves_no_entry_and_the_list_stays_bounded() {
        let h = host();
        for queue in 0..(MAX_QUEUES as u32 + 10) {
            announce(&h, queue);
        }
        assert_eq!(live_queues(&h).len(), MAX_QUEUES);
        assert!(
            live_queues(&h).contains(&(MAX_QUEUES as u32 + 9)),
            "newest kept"
        );
        announce(&h, MAX_QUEUES as u32 + 9);
        assert_eq!(
            live_queues(&h).len(),
            MAX_QUEUES,
            "renewed, not added twice"
        );
    }

    #[test]
    fn without_a_registry_nothing_is_written_blindly() {
        let h = Host::default();
        assert_eq!(announce(&h, 1), None);
        assert!(h.shared.map.borrow().is_empty());
    }

    #[test]
    fn repro_a_failed_random_get_is_an_error_not_a_shared_name() {
        let h = Host::default();
        assert_eq!(queue_name(&h), None);
        let working = Host {
            random_works: true,
            ..Host::default()
        };
        let name = queue_name(&working).unwrap();
        assert!(name.starts_with("principal-propagation/v2/worker/") && name.len() > 40);
    }
}
