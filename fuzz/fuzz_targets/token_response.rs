#![no_main]
//! `cargo fuzz run token_response`: see `fuzz/harness.rs`.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::token_response(data));
