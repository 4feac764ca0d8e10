//! Differential test of the plugin's stepwise P-256 signer (`src/keys/ecdsa_p256.rs`)
//! against the `p256` crate's: for random keys and messages both must give the same
//! signature, byte for byte (RFC 6979 nonces make ECDSA deterministic). Ours runs in
//! steps of a random number of windows, as the plugin runs it.
//!
//! `cargo test` compares 300 keys from a fixed seed. `make difftest` compares
//! `PP_DIFFTEST_KEYS` keys from a fresh seed (`PP_DIFFTEST_SEED`, printed, so that a
//! failure can be replayed).
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use principal_propagation::keys::ecdsa_p256::{EcKey, WINDOWS};
use std::time::Instant;

mod common;

use common::random::Random;

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
}

#[test]
fn stepwise_signatures_equal_the_p256_crate_ones() {
    let started = Instant::now();
    let wanted = env_number("PP_DIFFTEST_KEYS").unwrap_or(300) as usize;
    let seed = env_number("PP_DIFFTEST_SEED").unwrap_or(1);
    let mut random = Random(seed);
    let (mut keys, mut not_scalars) = (0, 0);
    while keys < wanted {
        // A random 32-byte string is a key unless it is 0 or at least the group order.
        let Ok(key) = SigningKey::from_slice(&random.bytes(32)) else {
            not_scalars += 1;
            assert!(not_scalars < 10, "seed {seed}: random bytes are keys");
            continue;
        };
        let message = random.message();
        let expected: Signature = key.sign(&message);
        let expected = expected.to_bytes().to_vec();
        let ours = EcKey::new(&key);
        assert_eq!(
            ours.sign(&message).expect("signs"),
            expected,
            "seed {seed}, key {keys}"
        );

        let windows = 1 + (random.next() % 70) as usize;
        let mut signing = ours.start(&message);
        let mut steps = 1;
        let signature = loop {
            match signing.advance(windows) {
                Some(result) => break result.expect("signs"),
                None => steps += 1,
            }
        };
        assert_eq!(
            signature, expected,
            "seed {seed}, key {keys}, {windows} windows a step"
        );
        assert_eq!(
            steps,
            WINDOWS.div_ceil(windows),
            "a step does `windows` windows"
        );
        keys += 1;
    }
    eprintln!(
        "differential test: {keys} P-256 keys and messages (seed {seed}), identical signatures, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
