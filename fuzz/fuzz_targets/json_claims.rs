#![no_main]
//! `cargo fuzz run json_claims`: see `fuzz/harness.rs`.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::json_claims(data));
