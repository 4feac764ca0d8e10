//! One fixed assertion, signed with the test key: the golden file
//! `tests/fixtures/golden-assertion.xml` must equal it natively and under wasm, and
//! the end-to-end suite verifies that file with xmlsec1 and signxml.

use principal_propagation::keys::SigningKey;
use principal_propagation::saml::assertion::{write, AssertionContent, Attribute};
use principal_propagation::saml::signature::sign_enveloped;

#[allow(dead_code)] // used by the tests, not by the example
pub const GOLDEN: &str = include_str!("../fixtures/golden-assertion.xml");
#[allow(dead_code)]
pub const GOLDEN_EC: &str = include_str!("../fixtures/golden-assertion-ec.xml");

/// The sample signed with the RSA test key.
pub fn signed_sample() -> String {
    signed_sample_with(
        include_str!("../fixtures/signing-key.pem"),
        include_str!("../fixtures/signing-cert.pem"),
    )
}

/// The sample signed with the P-256 test key (RFC 6979: deterministic too).
#[allow(dead_code)]
pub fn signed_sample_ec() -> String {
    signed_sample_with(
        include_str!("../fixtures/ec-key.pem"),
        include_str!("../fixtures/ec-cert.pem"),
    )
}

/// The fixed assertion fields of the samples, around a given user and attributes.
pub fn content<'a>(
    name_id: &'a str,
    name_qualifier: Option<&'a str>,
    attributes: &'a [Attribute],
) -> AssertionContent<'a> {
    AssertionContent {
        id: "_0123456789abcdef0123456789abcdef",
        issue_instant_ms: 1_795_323_921_000,
        issuer: "principal-propagation-test",
        name_id,
        name_id_format: "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified",
        name_qualifier,
        recipient: "https://ts.example/oauth/token",
        audience: "https://ts.example",
        authn_context_class_ref: "urn:oasis:names:tc:SAML:2.0:ac:classes:PreviousSession",
        not_before_ms: 1_795_323_861_000,
        not_on_or_after_ms: 1_795_324_221_000,
        attributes,
    }
}

fn signed_sample_with(key_pem: &str, cert_pem: &str) -> String {
    let key =
        SigningKey::from_pem(key_pem, cert_pem).expect("test key and certificate belong together");
    let attributes = [Attribute {
        name: "Groups".into(),
        values: vec!["a&b".into(), "<c>".into()],
    }];
    let content = content("<ä&b>\r\n\"x\" ]]> 𝄞", Some("q\"\t\n"), &attributes);
    let unsigned = write(&content).expect("all values are XML text");
    sign_enveloped(&unsigned, content.id, &key, true).expect("signature")
}
