//! Times RSA-2048 (and P-256) assertion signing with the plugin's own key code, so the cost
//! inside V8 can be measured without Envoy: build for wasm32-wasip1 and run it under Node
//! with `bench/sign_v8.mjs` (natively: `cargo run --release --example sign_bench`).
//! Prints one line per round: the median microseconds per signature of that round.
use principal_propagation::keys::SigningKey;
use std::time::Instant;

const KEY: &str = include_str!("../tests/fixtures/signing-key.pem");
const CERT: &str = include_str!("../tests/fixtures/signing-cert.pem");
const EC_KEY: &str = include_str!("../tests/fixtures/ec-key.pem");
const EC_CERT: &str = include_str!("../tests/fixtures/ec-cert.pem");

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let per_round: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
    let ec = args.next().as_deref() == Some("ec");
    let key = if ec {
        SigningKey::from_pem(EC_KEY, EC_CERT)
    } else {
        SigningKey::from_pem(KEY, CERT)
    }
    .expect("fixture key");
    let mut message = *b"<ds:SignedInfo>0000</ds:SignedInfo>";
    for round in 0..rounds {
        let mut times = Vec::with_capacity(per_round);
        for i in 0..per_round {
            message[15..19].copy_from_slice(format!("{:04}", i % 10_000).as_bytes());
            let start = Instant::now();
            let signature = key.sign(&message).expect("signature");
            times.push(start.elapsed().as_secs_f64() * 1e6);
            std::hint::black_box(signature);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "round {round}: median {:.0} us, min {:.0} us, max {:.0} us ({per_round} signatures)",
            times[per_round / 2],
            times[0],
            times[per_round - 1]
        );
    }
}
