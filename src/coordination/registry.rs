//! The registry of worker queues (moved from the proxy-wasm layer unchanged, to be tested).

use crate::host::{Random, SharedData};

/// Shared-data key listing every worker's queue (u32 tokens, big-endian), newest last.
const REGISTRY_KEY: &str = "principal-propagation/workers";
/// Registry length kept: VMs replaced by a code update leave stale entries behind.
const REGISTRY_MAX: usize = 64;

/// Adds `queue` to the registry (compare-and-swap, a few tries).
pub fn announce(host: &(impl SharedData + ?Sized), queue: u32) {
    for _ in 0..8 {
        let (current, cas) = match host.shared_get(REGISTRY_KEY) {
            Some((value, cas)) => (value, Some(cas)),
            None => (Vec::new(), None),
        };
        let mut queues = decode_queues(&current);
        if queues.contains(&queue) {
            return;
        }
        queues.push(queue);
        let skip = queues.len().saturating_sub(REGISTRY_MAX);
        let encoded: Vec<u8> = queues[skip..]
            .iter()
            .flat_map(|q| q.to_be_bytes())
            .collect();
        if host.shared_set(REGISTRY_KEY, &encoded, cas) {
            return;
        }
    }
}

pub fn registered_queues(host: &(impl SharedData + ?Sized)) -> Vec<u32> {
    match host.shared_get(REGISTRY_KEY) {
        Some((value, _)) => decode_queues(&value),
        None => Vec::new(),
    }
}

fn decode_queues(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The VM's queue name: random, so each worker has its own.
pub fn queue_name(random: &(impl Random + ?Sized)) -> Option<String> {
    let mut bytes = [0u8; 8];
    let suffix: String = if random.fill_random(&mut bytes) {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    } else {
        String::new()
    };
    Some(format!("principal-propagation/worker/{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Shared(RefCell<HashMap<String, (Vec<u8>, u32)>>, bool);

    impl SharedData for Shared {
        fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.0.borrow().get(key).cloned()
        }
        fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
            let mut map = self.0.borrow_mut();
            let version = map.get(key).map_or(0, |(_, v)| *v);
            if cas.is_some_and(|c| map.contains_key(key) && c != version) {
                return false;
            }
            map.insert(key.into(), (value.to_vec(), version + 1));
            true
        }
    }

    impl Random for Shared {
        fn fill_random(&self, buf: &mut [u8]) -> bool {
            buf.fill(1);
            self.1
        }
    }

    #[test]
    fn repro_more_than_64_workers_all_keep_their_wake_ups() {
        let shared = Shared::default();
        for queue in 1..=80 {
            announce(&shared, queue);
        }
        let live = registered_queues(&shared);
        assert!(
            (1..=80).all(|q| live.contains(&q)),
            "{} registered",
            live.len()
        );
    }

    #[test]
    fn repro_a_failed_random_get_is_an_error_not_a_shared_name() {
        let shared = Shared::default();
        assert_eq!(queue_name(&shared), None);
    }
}
