//! Differential test of the plugin's RSA CRT signer (`src/keys/rsa_crt.rs`) against the
//! `rsa` crate: for random two-prime keys and random messages, both must give the same
//! RSASSA-PKCS1-v1_5 SHA-256 signature, byte for byte. The CRT signer runs in steps of a
//! random number of exponent windows, as the plugin runs it.
//!
//! Keys are pairs of primes from a pool, in the order drawn, so `p < q` and `p > q` both
//! occur. `cargo test` uses the committed pools (`tests/fixtures/primes-*.txt`, OpenSSL
//! primes: all 276 pairs of 24 1024-bit primes, all 28 of 8 1536-bit ones and all 15 of
//! 6 2048-bit ones, two messages each). `make difftest` runs it on fresh OpenSSL primes
//! taken two by two, so each key has primes of its own: `PP_DIFFTEST_PRIMES=<file of hex
//! primes, one a line>` (every pair is tried), `PP_DIFFTEST_KEYS=<least number of keys
//! compared>` (release build, all cores).

mod common;

use common::rsa_reference::{all_pairs, compare, primes};
use std::time::Instant;

#[test]
fn crt_signatures_equal_the_rsa_crate_ones() {
    let started = Instant::now();
    let (keys, p_below_q, messages) = match std::env::var("PP_DIFFTEST_PRIMES") {
        Ok(path) => {
            let pool = primes(&std::fs::read_to_string(&path).expect("prime file"));
            let wanted: usize = std::env::var("PP_DIFFTEST_KEYS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(pool.len() / 2);
            // Every pair is tried (the file holds spares for the pairs that make no key).
            let pairs: Vec<_> = pool
                .chunks_exact(2)
                .map(|pair| (pair[0].clone(), pair[1].clone()))
                .collect();
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
            let results: Vec<(usize, usize)> = std::thread::scope(|scope| {
                let chunk = pairs.len().div_ceil(threads);
                let handles: Vec<_> = pairs
                    .chunks(chunk)
                    .enumerate()
                    .map(|(i, part)| scope.spawn(move || compare(part, 1, 0x5eed + i as u64)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("worker"))
                    .collect()
            });
            let keys = results.iter().map(|r| r.0).sum::<usize>();
            assert!(
                keys >= wanted,
                "{path}: {keys} keys compared, fewer than {wanted}"
            );
            (keys, results.iter().map(|r| r.1).sum(), keys)
        }
        Err(_) => {
            let mut total = (0, 0, 0);
            for (pool, seed) in [
                (include_str!("fixtures/primes-1024.txt"), 1),
                (include_str!("fixtures/primes-1536.txt"), 2),
                (include_str!("fixtures/primes-2048.txt"), 3),
            ] {
                let pairs = all_pairs(&primes(pool));
                let (keys, below) = compare(&pairs, 2, seed);
                assert!(keys + 2 >= pairs.len(), "almost every pair is a key");
                total = (total.0 + keys, total.1 + below, total.2 + 2 * keys);
            }
            total
        }
    };
    assert!(p_below_q > 0 && p_below_q < keys, "both prime orders occur");
    eprintln!(
        "differential test: {keys} keys ({p_below_q} with p < q), {messages} messages, identical signatures, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
