//! Times assertion signing with the plugin's key code (RSA-2048 CRT, P-256 in steps) and,
//! for comparison in the same run, with the `rsa` and `p256` crates' own signers (what the
//! plugin used before). Meant for V8 without Envoy: build for wasm32-wasip1 and run under
//! Node with `bench/sign_v8.mjs`; natively: `cargo run --release --example sign_bench`.
//!
//! Usage: `sign_bench [rounds] [signatures-per-round]`. Prints, per signer and round, the
//! median, minimum and maximum microseconds per signature of CPU time (under WASI: the
//! process CPU clock, so other load on the machine does not count; natively: wall time).
use principal_propagation::keys::SigningKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::signature::{SignatureEncoding, Signer};

const KEY: &str = include_str!("../tests/fixtures/signing-key.pem");
const CERT: &str = include_str!("../tests/fixtures/signing-cert.pem");
const EC_KEY: &str = include_str!("../tests/fixtures/ec-key.pem");
const EC_CERT: &str = include_str!("../tests/fixtures/ec-cert.pem");

/// One signer under measurement: message in, signature out.
type Sign<'a> = &'a dyn Fn(&[u8]) -> Vec<u8>;

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let per_round: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);

    let rsa = SigningKey::from_pem(KEY, CERT).expect("fixture key");
    let ec = SigningKey::from_pem(EC_KEY, EC_CERT).expect("fixture key");
    let rsa_crate = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(
        rsa::RsaPrivateKey::from_pkcs8_pem(KEY).expect("fixture key"),
    );
    assert_eq!(
        rsa.sign(b"same bytes").expect("signature"),
        rsa_crate.sign(b"same bytes").to_vec()
    );
    let p256_crate = p256::ecdsa::SigningKey::from(
        p256::SecretKey::from_pkcs8_pem(EC_KEY).expect("fixture key"),
    );
    let p256_crate_sign = |m: &[u8]| -> Vec<u8> {
        let signature: p256::ecdsa::Signature = p256_crate.sign(m);
        signature.to_bytes().to_vec()
    };
    assert_eq!(
        ec.sign(b"same bytes").expect("signature"),
        p256_crate_sign(b"same bytes")
    );
    let signers: [(&str, Sign); 4] = [
        ("rsa2048 (plugin CRT)", &|m| rsa.sign(m).expect("signature")),
        ("rsa2048 (rsa crate) ", &|m| rsa_crate.sign(m).to_vec()),
        ("p256 (plugin steps) ", &|m| ec.sign(m).expect("signature")),
        ("p256 (p256 crate)   ", &p256_crate_sign),
    ];
    let mut message = *b"<ds:SignedInfo>0000</ds:SignedInfo>";
    for round in 0..rounds {
        for (name, sign) in &signers {
            let mut times = Vec::with_capacity(per_round);
            for i in 0..per_round {
                message[15..19].copy_from_slice(format!("{:04}", i % 10_000).as_bytes());
                let start = clock::micros();
                std::hint::black_box(sign(&message));
                times.push(clock::micros() - start);
            }
            times.sort_by(f64::total_cmp);
            println!(
                "{name} round {round}: median {:.0} us, min {:.0} us, max {:.0} us ({per_round} signatures)",
                times[per_round / 2],
                times[0],
                times[per_round - 1]
            );
        }
    }
}

#[path = "common/clock.rs"]
mod clock;
