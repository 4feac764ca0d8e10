//! The benchmarks' clock: process CPU time under WASI, wall time natively.

#[cfg(target_os = "wasi")]
mod imp {
    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    extern "C" {
        fn clock_time_get(id: u32, precision: u64, time: *mut u64) -> u16;
    }
    const PROCESS_CPUTIME: u32 = 2;

    /// Process CPU time in microseconds.
    pub fn micros() -> f64 {
        let mut nanos = 0u64;
        // SAFETY: WASI writes one u64 through the valid pointer.
        let errno = unsafe { clock_time_get(PROCESS_CPUTIME, 1, &mut nanos) };
        assert_eq!(errno, 0, "WASI process CPU clock");
        nanos as f64 / 1e3
    }
}

#[cfg(not(target_os = "wasi"))]
mod imp {
    use std::sync::OnceLock;
    use std::time::Instant;

    /// Wall time in microseconds since the first call.
    pub fn micros() -> f64 {
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_secs_f64() * 1e6
    }
}

pub use imp::micros;
