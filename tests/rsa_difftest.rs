//! Differential test of the plugin's RSA CRT signer (`src/keys/rsa_crt.rs`) against the
//! `rsa` crate: for random two-prime keys and random messages, both must give the same
//! RSASSA-PKCS1-v1_5 SHA-256 signature, byte for byte. The CRT signer runs in steps of a
//! random number of exponent windows, as the plugin runs it.
//!
//! Keys are pairs of primes from a pool, in the order drawn, so `p < q` and `p > q` both
//! occur. `cargo test` uses the committed pools (`tests/fixtures/primes-*.txt`, OpenSSL
//! primes: all 276 pairs of 24 1024-bit primes and all 28 of 8 1536-bit ones, two
//! messages each). `make difftest` runs it on fresh OpenSSL primes taken two by two, so
//! each key has primes of its own: `PP_DIFFTEST_PRIMES=<file of hex primes, one a line>`
//! (every pair is tried), `PP_DIFFTEST_KEYS=<least number of keys compared>` (release
//! build, all cores).
use principal_propagation::keys::rsa_crt::RsaCrtKey;
use rsa::{BigUint, Pkcs1v15Sign, RsaPrivateKey};
use sha2::{Digest, Sha256};
use std::time::Instant;

#[path = "common/random.rs"]
mod random;
use random::Random;

fn primes(text: &str) -> Vec<BigUint> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| BigUint::parse_bytes(line.trim().as_bytes(), 16).expect("hex prime"))
        .collect()
}

/// Signs `messages_per_key` random messages with every key both ways; returns how many
/// keys were compared and how many had `p < q` (pairs whose `p - 1` or `q - 1` shares a
/// factor with 65537 are no RSA keys and are skipped by `from_p_q`, and counted out).
fn compare(pairs: &[(BigUint, BigUint)], messages_per_key: usize, seed: u64) -> (usize, usize) {
    let mut random = Random(seed);
    let (mut keys, mut p_below_q) = (0, 0);
    for (p, q) in pairs {
        let Ok(key) = RsaPrivateKey::from_p_q(p.clone(), q.clone(), BigUint::from(65_537u32))
        else {
            continue;
        };
        let crt = RsaCrtKey::new(&key).expect("two primes, at most 3072 bits");
        for _ in 0..messages_per_key {
            let message = random.message();
            let expected = key
                .sign(Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(&message))
                .expect("rsa crate signs");
            // In steps of a random size, as the plugin signs between other requests.
            let windows = 1 + (random.next() % 600) as usize;
            let mut signing = crt.start(&message);
            let signature = loop {
                if let Some(result) = signing.advance(windows) {
                    break result.expect("CRT signs");
                }
            };
            assert_eq!(
                signature, expected,
                "key {keys} (p = {p:x}), message {message:02x?}, {windows} windows a step"
            );
        }
        keys += 1;
        p_below_q += usize::from(p < q);
    }
    (keys, p_below_q)
}

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
            ] {
                let pool = primes(pool);
                let pairs: Vec<_> = pool
                    .iter()
                    .enumerate()
                    .flat_map(|(i, p)| pool[i + 1..].iter().map(move |q| (p.clone(), q.clone())))
                    .collect();
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
