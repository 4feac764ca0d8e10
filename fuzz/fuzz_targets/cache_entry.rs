#![no_main]
//! `cargo fuzz run cache_entry`: see `fuzz/harness.rs`.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::cache_entry(data));
