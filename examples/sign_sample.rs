//! Prints one signed sample assertion (test key) so independent verifiers can check it.
use principal_propagation::keys::SigningKey;
use principal_propagation::saml::{assertion, signature};

fn main() {
    let key = SigningKey::from_pem(
        include_str!("../tests/fixtures/signing-key.pem"),
        include_str!("../tests/fixtures/signing-cert.pem"),
    )
    .expect("test key");
    let name_id = std::env::args().nth(1).unwrap_or_else(|| "alice".into());
    let attrs = [assertion::Attribute {
        name: "Groups".into(),
        values: vec!["a&b".into(), "<c>".into()],
    }];
    let content = assertion::AssertionContent {
        id: "_0123456789abcdef0123456789abcdef",
        issue_instant_ms: 1_795_323_921_000,
        issuer: "gateway",
        name_id: &name_id,
        name_id_format: "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified",
        name_qualifier: Some("q\"\t\n"),
        recipient: "https://ts.example/oauth/token",
        audience: "https://ts.example",
        authn_context_class_ref: "urn:oasis:names:tc:SAML:2.0:ac:classes:PreviousSession",
        not_before_ms: 1_795_323_861_000,
        not_on_or_after_ms: 1_795_324_221_000,
        attributes: &attrs,
    };
    let doc = assertion::write(&content).expect("writable");
    print!(
        "{}",
        signature::sign_enveloped(&doc, content.id, &key, true)
    );
}
