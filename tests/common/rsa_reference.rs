//! The differential test of the RSA CRT signer, shared by `tests/rsa_difftest.rs` (native)
//! and `tests/wasm_core.rs` (under wasm, where the limb products use SIMD).

use super::random::Random;
use principal_propagation::keys::rsa_crt::RsaCrtKey;
use rsa::{BigUint, Pkcs1v15Sign, RsaPrivateKey};
use sha2::{Digest, Sha256};

/// Hex primes, one a line.
pub fn primes(text: &str) -> Vec<BigUint> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| BigUint::parse_bytes(line.trim().as_bytes(), 16).expect("hex prime"))
        .collect()
}

/// Every pair of primes from `pool`, each in the order drawn (so `p < q` and `p > q` occur).
pub fn all_pairs(pool: &[BigUint]) -> Vec<(BigUint, BigUint)> {
    pool.iter()
        .enumerate()
        .flat_map(|(i, p)| pool[i + 1..].iter().map(move |q| (p.clone(), q.clone())))
        .collect()
}

/// Signs `messages_per_key` random messages with every key both ways; returns how many
/// keys were compared and how many had `p < q` (pairs whose `p - 1` or `q - 1` shares a
/// factor with 65537 are no RSA keys and are skipped by `from_p_q`, and counted out).
pub fn compare(pairs: &[(BigUint, BigUint)], messages_per_key: usize, seed: u64) -> (usize, usize) {
    let mut random = Random(seed);
    let (mut keys, mut p_below_q) = (0, 0);
    for (p, q) in pairs {
        let Ok(key) = RsaPrivateKey::from_p_q(p.clone(), q.clone(), BigUint::from(65_537u32))
        else {
            continue;
        };
        let crt = RsaCrtKey::new(&key).expect("two primes, at most 4096 bits");
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
