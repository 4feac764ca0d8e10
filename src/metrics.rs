//! Every metric the plugin reports, declared once: the host defines them from
//! [`Metric::ALL`] and Envoy shows them as `wasmcustom.<name>`.

/// What kind of value a metric holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Histogram,
    Gauge,
}

/// The plugin's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    CacheHit,
    CacheMiss,
    ExchangeOk,
    ExchangeRejected,
    ExchangeFailed,
    /// A request that waited for another worker's exchange.
    JoinedRemote,
    /// A token refreshed ahead of its reuse limit.
    Refresh,
    /// A new user refused at once: the worker had its cap of exchanges in flight.
    AdmissionRefused,
    /// An exchange ended by its deadline (a callout that never answered, a signature that
    /// could not be finished in time).
    DeadlinePassed,
    /// Two identities met in one cache slot while both exchanged: the second went ahead
    /// without the cross-worker lock.
    LockCollision,
    /// An exchange started again because its callout went with a retired root context.
    Restarted,
    /// A cached token dropped because the backend refused it (`evictTokenOnUpstreamStatus`).
    TokenEvicted,
    /// Microseconds spent building and signing one assertion with an RSA key.
    SigningMicros,
    /// The same with a P-256 key.
    SigningEcMicros,
    /// Microseconds from a result being stored to a waiting worker picking it up.
    WakeMicros,
    /// VMs with a live queue: one per worker, and the main thread's (each sets it in turn).
    WorkersRegistered,
    /// A worker VM's linear memory in bytes (each worker sets it in turn).
    WasmMemoryBytes,
}

impl Metric {
    pub const ALL: [Metric; 17] = [
        Metric::CacheHit,
        Metric::CacheMiss,
        Metric::ExchangeOk,
        Metric::ExchangeRejected,
        Metric::ExchangeFailed,
        Metric::JoinedRemote,
        Metric::Refresh,
        Metric::AdmissionRefused,
        Metric::DeadlinePassed,
        Metric::LockCollision,
        Metric::Restarted,
        Metric::TokenEvicted,
        Metric::SigningMicros,
        Metric::SigningEcMicros,
        Metric::WakeMicros,
        Metric::WorkersRegistered,
        Metric::WasmMemoryBytes,
    ];

    /// The name Envoy shows after `wasmcustom.`.
    pub fn name(self) -> &'static str {
        match self {
            Metric::CacheHit => "principal_propagation.cache_hit",
            Metric::CacheMiss => "principal_propagation.cache_miss",
            Metric::ExchangeOk => "principal_propagation.token_exchange.ok",
            Metric::ExchangeRejected => "principal_propagation.token_exchange.rejected",
            Metric::ExchangeFailed => "principal_propagation.token_exchange.failed",
            Metric::JoinedRemote => "principal_propagation.joined_other_worker",
            Metric::Refresh => "principal_propagation.refresh_ahead",
            Metric::AdmissionRefused => "principal_propagation.admission_refused",
            Metric::DeadlinePassed => "principal_propagation.exchange_deadline_passed",
            Metric::LockCollision => "principal_propagation.lock_collision",
            Metric::Restarted => "principal_propagation.exchange_restarted",
            Metric::TokenEvicted => "principal_propagation.token_evicted",
            Metric::SigningMicros => "principal_propagation.signing_us",
            Metric::SigningEcMicros => "principal_propagation.signing_ec_us",
            Metric::WakeMicros => "principal_propagation.wake_us",
            Metric::WorkersRegistered => "principal_propagation.workers_registered",
            Metric::WasmMemoryBytes => "principal_propagation.wasm_memory_bytes",
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            Metric::SigningMicros | Metric::SigningEcMicros | Metric::WakeMicros => Kind::Histogram,
            Metric::WorkersRegistered | Metric::WasmMemoryBytes => Kind::Gauge,
            _ => Kind::Counter,
        }
    }

    /// Position in [`Metric::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Counter increments gathered between two flushes: a cache hit then costs no host call
/// for its counter (the worker flushes once a second).
#[derive(Debug, Default)]
pub struct Counters([u64; Metric::ALL.len()]);

impl Counters {
    pub fn add(&mut self, metric: Metric, amount: u64) {
        self.0[metric.index()] = self.0[metric.index()].saturating_add(amount);
    }

    /// The gathered increments, emptied.
    pub fn drain(&mut self) -> impl Iterator<Item = (Metric, u64)> + '_ {
        Metric::ALL
            .iter()
            .zip(self.0.iter_mut())
            .filter(|(_, n)| **n > 0)
            .map(|(m, n)| (*m, std::mem::take(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_its_place_a_unique_name_and_a_kind() {
        for (i, metric) in Metric::ALL.iter().enumerate() {
            assert_eq!(metric.index(), i);
            assert!(metric.name().starts_with("principal_propagation."));
        }
        let mut names: Vec<_> = Metric::ALL.iter().map(|m| m.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Metric::ALL.len());
        assert_eq!(Metric::WakeMicros.kind(), Kind::Histogram);
        assert_eq!(Metric::CacheHit.kind(), Kind::Counter);
    }

    #[test]
    fn counters_gather_and_drain() {
        let mut c = Counters::default();
        c.add(Metric::CacheHit, 2);
        c.add(Metric::CacheHit, 3);
        c.add(Metric::Refresh, 1);
        let drained: Vec<_> = c.drain().collect();
        assert_eq!(drained, vec![(Metric::CacheHit, 5), (Metric::Refresh, 1)]);
        assert_eq!(c.drain().count(), 0);
    }
}
