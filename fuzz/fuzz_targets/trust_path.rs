#![no_main]
//! `cargo fuzz run trust_path`: see `fuzz/harness.rs`.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::trust_path(data));
