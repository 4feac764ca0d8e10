//! Which root context drives the worker, and how often it ticks.
//!
//! A VM (one per Envoy worker) can hold several root contexts: one per plugin
//! configuration, and after a configuration update the old one lives on until the
//! requests it created are done. Callouts and queue messages belong to the root context
//! that made them, and an old root's callouts are cancelled (without an answer) when it
//! goes. So one root drives: the newest. It alone dispatches callouts, owns the worker's
//! queue and runs the timer; the others tick once a second only to see whether they have
//! become the driver. The tick runs every millisecond while the worker signs (one slice a
//! tick) and every [`SWEEP_MS`] otherwise, so that deadlines are kept to that precision.

/// How often the driver ticks while no signature is under way; the sweep of deadlines
/// runs at most this often.
pub const SWEEP_MS: u64 = 100;
/// The tick while the worker signs: a slice of signing a millisecond.
pub const SIGNING_TICK_MS: u64 = 1;
/// The tick of a root that does not drive.
pub const IDLE_ROOT_TICK_MS: u64 = 1_000;

/// The VM's root contexts, oldest first.
#[derive(Debug, Default)]
pub struct Roots {
    live: Vec<u32>,
    /// Roots Envoy is shutting down that still own callouts.
    retiring: Vec<u32>,
}

impl Roots {
    /// `root` was (re)configured: it drives from now on.
    pub fn configured(&mut self, root: u32) {
        self.live.retain(|&r| r != root);
        self.retiring.retain(|&r| r != root);
        self.live.push(root);
    }

    /// Envoy is shutting `root` down; it stays known until [`Roots::gone`] while it still
    /// owns callouts.
    pub fn retire(&mut self, root: u32) {
        self.live.retain(|&r| r != root);
        if !self.retiring.contains(&root) {
            self.retiring.push(root);
        }
    }

    pub fn gone(&mut self, root: u32) {
        self.live.retain(|&r| r != root);
        self.retiring.retain(|&r| r != root);
    }

    /// The root that dispatches callouts and runs the timer.
    pub fn driver(&self) -> Option<u32> {
        self.live.last().copied()
    }

    pub fn is_retiring(&self, root: u32) -> bool {
        self.retiring.contains(&root)
    }
}

/// The tick period `root` should have.
pub fn tick_period_ms(driver: bool, signing: bool) -> u64 {
    match (driver, signing) {
        (false, _) => IDLE_ROOT_TICK_MS,
        (true, true) => SIGNING_TICK_MS,
        (true, false) => SWEEP_MS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_root_drives_and_an_older_one_takes_over_when_it_goes() {
        let mut roots = Roots::default();
        assert_eq!(roots.driver(), None);
        roots.configured(1);
        roots.configured(2);
        assert_eq!(roots.driver(), Some(2));
        roots.configured(1); // reconfigured: the newest configuration
        assert_eq!(roots.driver(), Some(1));
        roots.retire(1);
        assert!(roots.is_retiring(1));
        assert_eq!(roots.driver(), Some(2));
        roots.gone(1);
        assert!(!roots.is_retiring(1));
        assert_eq!(tick_period_ms(true, true), 1);
        assert_eq!(tick_period_ms(true, false), SWEEP_MS);
        assert_eq!(tick_period_ms(false, true), IDLE_ROOT_TICK_MS);
    }
}
