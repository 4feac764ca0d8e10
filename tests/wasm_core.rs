//! The host-independent core under wasm (Node, via wasm-bindgen-test): the same bytes,
//! the same decisions as natively. Run by `make test-wasm`.
#![cfg(target_arch = "wasm32")]

mod common;

use principal_propagation::config::PluginConfig;
use principal_propagation::credentials::saml_bearer;
use principal_propagation::oauth::token_request;
use principal_propagation::time::xs_date_time;
use wasm_bindgen_test::wasm_bindgen_test;

#[wasm_bindgen_test]
fn signed_assertion_is_the_golden_one() {
    assert_eq!(common::sample::signed_sample(), common::sample::GOLDEN);
}

#[wasm_bindgen_test]
fn ecdsa_signed_assertion_is_the_golden_one() {
    assert_eq!(
        common::sample::signed_sample_ec(),
        common::sample::GOLDEN_EC
    );
}

/// The RSA signer's limb products use Wasm SIMD here (natively they do not): the
/// differential test of `tests/rsa_difftest.rs` on 69 keys of the committed pools (the
/// 4096-bit ones also sum the public-key check's columns in a `u128`).
#[wasm_bindgen_test]
fn rsa_crt_signatures_equal_the_rsa_crate_ones_under_simd() {
    use common::rsa_reference::{all_pairs, compare, primes};
    let pairs_2048 = all_pairs(&primes(include_str!("fixtures/primes-1024.txt")));
    let pairs_3072 = all_pairs(&primes(include_str!("fixtures/primes-1536.txt")));
    let pairs_4096 = all_pairs(&primes(include_str!("fixtures/primes-2048.txt")));
    let (keys_2048, _) = compare(&pairs_2048[..60], 1, 3);
    let (keys_3072, _) = compare(&pairs_3072[..6], 1, 4);
    let (keys_4096, _) = compare(&pairs_4096[..3], 1, 5);
    assert!(
        keys_2048 >= 58 && keys_3072 >= 5 && keys_4096 == 3,
        "{keys_2048} + {keys_3072} + {keys_4096} keys"
    );
}

#[wasm_bindgen_test]
fn host_time_formats_like_natively() {
    assert_eq!(xs_date_time(951_827_696_789), "2000-02-29T12:34:56.789Z");
}

#[wasm_bindgen_test]
fn configuration_and_token_request_work_in_wasm() {
    let config = serde_json::json!({
        "tokenServiceCluster": "ts",
        "keys": {"default": {
            "privateKeyEnv": "KEY",
            "certificate": include_str!("fixtures/signing-cert.pem")
        }},
        "destinations": [{
            "Name": "d", "Authentication": "OAuth2SAMLBearerAssertion",
            "tokenServiceURL": "https://ts.example/oauth/token",
            "audience": "https://ts.example", "assertionIssuer": "gw"
        }]
    });
    let env =
        |name: &str| (name == "KEY").then(|| include_str!("fixtures/signing-key.pem").to_string());
    let config =
        PluginConfig::parse(config.to_string().as_bytes(), &env).expect("valid configuration");
    let destination = &config.destinations[0];
    let saml = destination.saml().expect("a SAML destination");
    let signed = saml_bearer::start(
        &config,
        destination,
        saml,
        "alice",
        &[],
        1_795_323_921_000,
        "_a1",
    )
    .expect("assertion")
    .finish()
    .expect("signature");
    let request = token_request::build(saml, &signed);
    let form: Vec<(String, String)> = form_urlencoded::parse(&request.body).into_owned().collect();
    assert_eq!(form[0].1, "urn:ietf:params:oauth:grant-type:saml2-bearer");
    assert!(!form[1].1.contains('='), "base64url without padding");
}

/// The user's certificate is written by the x509-cert builder and signed by the stepwise
/// signers in wasm as natively: the same DER for the same inputs (RSA is deterministic,
/// P-256 uses RFC 6979 nonces).
#[wasm_bindgen_test]
fn a_user_certificate_is_the_same_in_wasm() {
    common::sample::assert_user_certificates_are_golden();
}
