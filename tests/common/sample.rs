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

#[allow(dead_code)]
pub const USER_CERTIFICATE_RSA: &str = include_str!("../fixtures/golden-user-certificate-rsa.b64");
#[allow(dead_code)]
pub const USER_CERTIFICATE_EC: &str = include_str!("../fixtures/golden-user-certificate-ec.b64");

/// Both golden user certificates are made again, byte for byte.
#[allow(dead_code)]
pub fn assert_user_certificates_are_golden() {
    assert_eq!(user_certificate(false), USER_CERTIFICATE_RSA);
    assert_eq!(user_certificate(true), USER_CERTIFICATE_EC);
}

/// A fixed user's certificate (a hostile CN, fixed serial, holder key and times), signed
/// by the RSA or the P-256 test CA: single-line base64 of the DER, as the header carries it.
#[allow(dead_code)]
pub fn user_certificate(ec: bool) -> String {
    use base64::Engine;
    use principal_propagation::identity::UserIdRule;
    use principal_propagation::x509::authority::{self, Authority, Request};
    use principal_propagation::x509::holder::HolderKey;
    use principal_propagation::x509::subject::{SubjectPattern, NAME_CLAIMS};
    let (key_pem, cert_pem) = if ec {
        (
            include_str!("../fixtures/ca-ec-key.pem"),
            include_str!("../fixtures/ca-ec-cert.pem"),
        )
    } else {
        (
            include_str!("../fixtures/ca-rsa-key.pem"),
            include_str!("../fixtures/ca-rsa-cert.pem"),
        )
    };
    let key = SigningKey::from_pem(key_pem, cert_pem).expect("test CA");
    let ca = Authority::of(&key).expect("a CA");
    let claims = serde_json::json!({"user_name": "#a,b+c=\"d\"\\<e>;ü ", "email": "a@example.com"});
    let subject = SubjectPattern::parse("CN=${name},EMAIL=${mail},O=ACME,C=DE")
        .expect("pattern")
        .resolve(&claims, &UserIdRule::first_claim(&NAME_CLAIMS))
        .expect("subject");
    let holder = HolderKey::default()
        .at(0, |seed| {
            seed.fill(7);
            true
        })
        .expect("holder key");
    let unsigned = authority::write(
        &ca,
        &Request {
            subject,
            holder_key: &holder,
            serial: [0x5a; 16],
            not_before_s: 1_800_000_000,
            not_after_s: 1_800_000_660,
        },
    )
    .expect("certificate");
    let signature = key.sign(&unsigned.to_be_signed).expect("signature");
    let der = unsigned.signed(&signature).expect("signed certificate");
    base64::engine::general_purpose::STANDARD.encode(der)
}
