#![no_main]
//! `cargo fuzz run destination_api`: see `fuzz/harness.rs`.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::destination_api(data));
