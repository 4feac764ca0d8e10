//! When a worker signs: in slices, so that the milliseconds an RSA signature takes in Wasm
//! never hold up the cache hits the same worker serves meanwhile, and never more than a
//! share of the worker's time.
//!
//! Three sources of signing time, all paid from one budget:
//!
//! - Worker-level callbacks: a slice of [`SIGNING_SLICE_US`] on every tick (every
//!   millisecond while a signature is under way), every queue message (wake-ups, other
//!   workers' notices) and every callout answer, oldest signature first. A hit arriving
//!   meanwhile waits for one slice at most.
//! - The worker's requests: while a signature is under way, each request does one step
//!   of it (20–40 µs, [`Stepwise::units_per_step`]) before its own work. A busy worker has many
//!   requests, so a little from each finishes a signature in tens of milliseconds without
//!   holding any of them up for long.
//! - Larger slices when nobody waits: [`IDLE_SIGNING_SLICES`] when no request came since
//!   the last slice, and one more slice per [`SIGNING_WAIT_STEP_MS`] that the oldest
//!   signature has waited (up to [`MAX_SIGNING_SLICES`]), so that a wave of new users is
//!   still signed, at the price of longer holds for the hits meanwhile.
//!
//! The budget fills at the configured share of wall time (`maxSigningSharePercent`,
//! default 50) and holds at most [`MAX_SIGNING_SLICES`] slices: over any period, signing
//! takes at most that share of the worker plus one burst.

use super::recipe::Stepwise;
use crate::host::Clock;
use crate::keys::SignError;

pub const SIGNING_SLICE_US: u64 = 250;
pub const IDLE_SIGNING_SLICES: u64 = 4;
pub const SIGNING_WAIT_STEP_MS: u64 = 250;
pub const MAX_SIGNING_SLICES: u64 = 8;
/// The default share of a worker's time that signing may take.
pub const DEFAULT_SHARE_PERCENT: u64 = 50;
const MAX_BUDGET_NS: u64 = MAX_SIGNING_SLICES * SIGNING_SLICE_US * 1000;

/// A worker's signing budget and pace.
#[derive(Debug)]
pub struct Scheduler {
    share_percent: u64,
    budget_ns: u64,
    refilled_at_ns: u64,
    /// Requests decided since the last slice (none: the worker is idle).
    requests_since_slice: u32,
}

impl Default for Scheduler {
    fn default() -> Self {
        Scheduler::new(DEFAULT_SHARE_PERCENT)
    }
}

impl Scheduler {
    pub fn new(share_percent: u64) -> Self {
        Scheduler {
            share_percent: share_percent.clamp(1, 100),
            budget_ns: MAX_BUDGET_NS,
            refilled_at_ns: 0,
            requests_since_slice: 0,
        }
    }

    pub fn set_share(&mut self, share_percent: u64) {
        self.share_percent = share_percent.clamp(1, 100);
    }

    /// A request was decided (the worker is not idle).
    pub fn note_request(&mut self) {
        self.requests_since_slice = self.requests_since_slice.saturating_add(1);
    }

    fn refill(&mut self, now_ns: u64) {
        let elapsed = now_ns.saturating_sub(self.refilled_at_ns);
        self.refilled_at_ns = now_ns.max(self.refilled_at_ns);
        let earned = elapsed.saturating_mul(self.share_percent) / 100;
        self.budget_ns = self.budget_ns.saturating_add(earned).min(MAX_BUDGET_NS);
    }

    /// How long the slice starting at `now_ns` may run, given how long the oldest signature
    /// under way has waited; 0 when the budget is spent.
    pub fn slice_ns(&mut self, now_ns: u64, oldest_waited_ms: u64) -> u64 {
        self.refill(now_ns);
        let idle = std::mem::take(&mut self.requests_since_slice) == 0;
        let slices = (1 + oldest_waited_ms / SIGNING_WAIT_STEP_MS)
            .max(if idle { IDLE_SIGNING_SLICES } else { 1 })
            .min(MAX_SIGNING_SLICES);
        (slices * SIGNING_SLICE_US * 1000).min(self.budget_ns)
    }

    /// Whether a request may do a step of signing now.
    pub fn may_help(&mut self, now_ns: u64) -> bool {
        self.refill(now_ns);
        self.budget_ns > 0
    }

    /// Signing took `ns` of the worker's time.
    pub fn spend(&mut self, ns: u64) {
        self.budget_ns = self.budget_ns.saturating_sub(ns);
    }
}

/// Advances `work`, starting at `now_ns`, until it is done or the clock reaches `end_ns`
/// (looked at after every step of [`Stepwise::units_per_step`] units; at least one step
/// is done): the result if done, and the clock's last reading.
pub fn run(
    clock: &(impl Clock + ?Sized),
    work: &mut dyn Stepwise,
    mut now_ns: u64,
    end_ns: u64,
) -> (Option<Result<String, SignError>>, u64) {
    let step = work.units_per_step();
    loop {
        let result = work.advance(step);
        now_ns = clock.now_ns().max(now_ns);
        if result.is_some() || now_ns >= end_ns {
            return (result, now_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn the_budget_holds_signing_to_its_share_of_the_worker() {
        let mut s = Scheduler::new(50);
        let mut now = 10_000 * MS;
        let (mut signed, start) = (0, now);
        // A signature always waiting, the worker idle: as much as the budget allows.
        for _ in 0..1_000 {
            now += MS;
            let slice = s.slice_ns(now, 10_000);
            s.spend(slice);
            signed += slice;
            now += slice;
        }
        let share = signed * 100 / (now - start);
        assert!((45..=52).contains(&share), "{share}% of the worker");
        let mut quarter = Scheduler::new(25);
        quarter.spend(MAX_BUDGET_NS);
        assert_eq!(quarter.slice_ns(4 * MS, 0), MS, "4 ms at 25% earns 1 ms");
    }

    #[test]
    fn slices_grow_when_idle_or_long_waited_within_the_budget() {
        let mut s = Scheduler::new(100);
        s.note_request();
        assert_eq!(s.slice_ns(MS, 0), SIGNING_SLICE_US * 1000, "busy, fresh");
        assert_eq!(
            s.slice_ns(2 * MS, 0),
            IDLE_SIGNING_SLICES * SIGNING_SLICE_US * 1000,
            "idle"
        );
        s.note_request();
        assert_eq!(
            s.slice_ns(3 * MS, 100_000),
            MAX_SIGNING_SLICES * SIGNING_SLICE_US * 1000,
            "waited long"
        );
        s.spend(MAX_BUDGET_NS);
        assert!(!s.may_help(3 * MS));
        assert!(s.may_help(3 * MS + 1_000));
    }
}
