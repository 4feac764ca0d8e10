#![no_main]
//! `cargo fuzz run metadata_claims`: see `fuzz/harness.rs`.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::metadata_claims(data));
