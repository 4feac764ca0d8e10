//! Times assertion signing with the plugin's key code (RSA CRT at 2048, 3072 and 4096 bits,
//! P-256 in steps) and, for comparison in the same run, with the `rsa` and `p256` crates'
//! own signers (what the plugin used before). Meant for V8 without Envoy: build for
//! wasm32-wasip1 and run under Node with `bench/sign_v8.mjs`; natively: `cargo run
//! --release --example sign_bench`.
//!
//! Usage: `sign_bench [rounds] [signatures-per-round]`. Prints, per signer and round, the
//! median, minimum and maximum microseconds per signature of CPU time (under WASI: the
//! process CPU clock, so other load on the machine does not count; natively: wall time).
//! Then, per RSA size, how long one step of 4 units (what a request does for the flow)
//! takes, and the last step, which also recombines and checks the signature.
use principal_propagation::keys::SigningKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::signature::{SignatureEncoding, Signer};

const KEY: &str = include_str!("../tests/fixtures/signing-key.pem");
const CERT: &str = include_str!("../tests/fixtures/signing-cert.pem");
const KEY_3072: &str = include_str!("../tests/fixtures/rsa-3072-key.pem");
const CERT_3072: &str = include_str!("../tests/fixtures/rsa-3072-cert.pem");
const KEY_4096: &str = include_str!("../tests/fixtures/rsa-4096-key.pem");
const CERT_4096: &str = include_str!("../tests/fixtures/rsa-4096-cert.pem");
const EC_KEY: &str = include_str!("../tests/fixtures/ec-key.pem");
const EC_CERT: &str = include_str!("../tests/fixtures/ec-cert.pem");

/// One signer under measurement: message in, signature out.
type Sign<'a> = &'a dyn Fn(&[u8]) -> Vec<u8>;

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let per_round: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);

    let rsa = SigningKey::from_pem(KEY, CERT).expect("fixture key");
    let rsa_3072 = SigningKey::from_pem(KEY_3072, CERT_3072).expect("fixture key");
    let rsa_4096 = SigningKey::from_pem(KEY_4096, CERT_4096).expect("fixture key");
    let ec = SigningKey::from_pem(EC_KEY, EC_CERT).expect("fixture key");
    let rsa_crate = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(
        rsa::RsaPrivateKey::from_pkcs8_pem(KEY).expect("fixture key"),
    );
    assert_eq!(
        rsa.sign(b"same bytes").expect("signature"),
        rsa_crate.sign(b"same bytes").to_vec()
    );
    let rsa_crate_4096 = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(
        rsa::RsaPrivateKey::from_pkcs8_pem(KEY_4096).expect("fixture key"),
    );
    assert_eq!(
        rsa_4096.sign(b"same bytes").expect("signature"),
        rsa_crate_4096.sign(b"same bytes").to_vec()
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
    let signers: [(&str, Sign); 7] = [
        ("rsa2048 (plugin CRT)", &|m| rsa.sign(m).expect("signature")),
        ("rsa2048 (rsa crate) ", &|m| rsa_crate.sign(m).to_vec()),
        ("rsa3072 (plugin CRT)", &|m| {
            rsa_3072.sign(m).expect("signature")
        }),
        ("rsa4096 (plugin CRT)", &|m| {
            rsa_4096.sign(m).expect("signature")
        }),
        ("rsa4096 (rsa crate) ", &|m| rsa_crate_4096.sign(m).to_vec()),
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
    let sizes = [
        ("rsa2048", &rsa),
        ("rsa3072", &rsa_3072),
        ("rsa4096", &rsa_4096),
    ];
    for (name, key) in sizes {
        let (mut steps, mut lasts) = (Vec::new(), Vec::new());
        for _ in 0..per_round.min(10) {
            let mut signing = key.start_signing(&message);
            loop {
                let start = clock::micros();
                let done = signing.advance(4).is_some();
                let took = clock::micros() - start;
                if done {
                    lasts.push(took);
                    break;
                }
                steps.push(took);
            }
        }
        steps.sort_by(f64::total_cmp);
        lasts.sort_by(f64::total_cmp);
        println!(
            "{name} steps of 4 units: median {:.0} us, max {:.0} us; last step median {:.0} us ({} signatures)",
            steps.get(steps.len() / 2).copied().unwrap_or(0.0),
            steps.last().copied().unwrap_or(0.0),
            lasts[lasts.len() / 2],
            lasts.len()
        );
    }
}

#[path = "common/clock.rs"]
mod clock;
