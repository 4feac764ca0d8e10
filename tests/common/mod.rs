//! Shared by the test crates; each uses only some of it.
#![allow(dead_code)]

pub mod random;
pub mod rsa_reference;
pub mod sample;
