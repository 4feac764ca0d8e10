#![no_main]
//! `cargo fuzz run payload_pairs`: see `fuzz/harness.rs`.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::payload_pairs(data));
