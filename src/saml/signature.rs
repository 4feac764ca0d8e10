//! Enveloped XML-DSig over the assertion: exclusive c14n, SHA-256 digest, RSA-SHA256 or
//! ECDSA-SHA256 (by the key).
//!
//! The assertion is already canonical (see [`super::assertion`]), so its digest is the
//! SHA-256 of its unsigned bytes. `SignedInfo` is written canonical as well, carrying the
//! `ds` namespace declaration that exclusive c14n gives it when it is canonicalized on
//! its own, which is exactly what a verifier does before checking the signature value.

use super::assertion::CanonicalAssertion;
use crate::keys::{SignError, Signing, SigningKey};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha256};

const DS_NS: &str = "http://www.w3.org/2000/09/xmldsig#";

/// Signs `assertion` (whose root carries `ID="<id>"`) and returns the signed document:
/// the signature sits right after `Issuer`, as SAML core requires.
pub fn sign_enveloped(
    assertion: &CanonicalAssertion,
    id: &str,
    key: &SigningKey,
    include_certificate: bool,
) -> Result<String, SignError> {
    EnvelopedSigning::start(assertion, id, key, include_certificate).finish()
}

/// An enveloped signature under way: the digest and `SignedInfo` are done, the signature
/// value is computed by [`EnvelopedSigning::advance`] a slice at a time.
pub struct EnvelopedSigning {
    head: String,
    tail: String,
    signed_info: String,
    /// `ds:X509Certificate` content, if the document carries it.
    certificate: Option<String>,
    signing: Signing,
}

impl EnvelopedSigning {
    pub fn start(
        assertion: &CanonicalAssertion,
        id: &str,
        key: &SigningKey,
        include_certificate: bool,
    ) -> Self {
        let digest = Sha256::digest(assertion.unsigned().as_bytes());
        let signed_info = signed_info(id, &STANDARD.encode(digest), key.signature_method());
        EnvelopedSigning {
            signing: key.start_signing(signed_info.as_bytes()),
            head: assertion.head.clone(),
            tail: assertion.tail.clone(),
            signed_info,
            certificate: include_certificate.then(|| key.certificate_base64().to_owned()),
        }
    }

    /// See [`Signing::units_per_step`].
    pub fn units_per_step(&self) -> usize {
        self.signing.units_per_step()
    }

    /// Does up to `windows` units of signing work (see [`Signing::advance`]); `Some`
    /// with the signed document once done.
    pub fn advance(&mut self, windows: usize) -> Option<Result<String, SignError>> {
        let signature = self.signing.advance(windows)?;
        Some(signature.map(|value| self.document(&STANDARD.encode(value))))
    }

    /// The signed document, doing whatever signing work is left.
    pub fn finish(mut self) -> Result<String, SignError> {
        self.advance(usize::MAX).unwrap_or(Err(SignError))
    }

    fn document(&self, signature_value: &str) -> String {
        // In the document SignedInfo inherits `ds` from Signature: drop the repeated declaration.
        let inherited = format!(" xmlns:ds=\"{DS_NS}\"");
        let signed_info_in_place = self.signed_info.replacen(&inherited, "", 1);
        let mut out = String::with_capacity(
            self.head.len() + self.tail.len() + self.signed_info.len() + 2048,
        );
        out.push_str(&self.head);
        out.push_str("<ds:Signature");
        out.push_str(&inherited);
        out.push('>');
        out.push_str(&signed_info_in_place);
        out.push_str("<ds:SignatureValue>");
        out.push_str(signature_value);
        out.push_str("</ds:SignatureValue>");
        if let Some(certificate) = &self.certificate {
            out.push_str("<ds:KeyInfo><ds:X509Data><ds:X509Certificate>");
            out.push_str(certificate);
            out.push_str("</ds:X509Certificate></ds:X509Data></ds:KeyInfo>");
        }
        out.push_str("</ds:Signature>");
        out.push_str(&self.tail);
        out
    }
}

/// `SignedInfo` in exclusive-canonical form, as signed. `id` is an NCName we generated,
/// so it needs no escaping.
fn signed_info(id: &str, digest_base64: &str, signature_method: &str) -> String {
    format!(
        "<ds:SignedInfo xmlns:ds=\"{DS_NS}\">\
         <ds:CanonicalizationMethod Algorithm=\"http://www.w3.org/2001/10/xml-exc-c14n#\"></ds:CanonicalizationMethod>\
         <ds:SignatureMethod Algorithm=\"{signature_method}\"></ds:SignatureMethod>\
         <ds:Reference URI=\"#{id}\"><ds:Transforms>\
         <ds:Transform Algorithm=\"http://www.w3.org/2000/09/xmldsig#enveloped-signature\"></ds:Transform>\
         <ds:Transform Algorithm=\"http://www.w3.org/2001/10/xml-exc-c14n#\"></ds:Transform>\
         </ds:Transforms>\
         <ds:DigestMethod Algorithm=\"http://www.w3.org/2001/04/xmlenc#sha256\"></ds:DigestMethod>\
         <ds:DigestValue>{digest_base64}</ds:DigestValue></ds:Reference></ds:SignedInfo>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::tests::test_key;
    use crate::saml::assertion::{tests::sample, write};

    #[test]
    fn places_signature_after_issuer_and_signs_canonical_signed_info() {
        let content = sample(&[]);
        let doc = write(&content).unwrap();
        let key = test_key();
        let signed = sign_enveloped(&doc, content.id, &key, true).unwrap();
        assert!(signed.starts_with(&doc.head));
        assert!(signed.ends_with(&doc.tail));
        let signature = &signed[doc.head.len()..signed.len() - doc.tail.len()];
        assert!(signature.starts_with(
            "<ds:Signature xmlns:ds=\"http://www.w3.org/2000/09/xmldsig#\"><ds:SignedInfo><ds:Canon"
        ));
        assert!(signature.contains("<ds:Reference URI=\"#_0123456789abcdef0123456789abcdef\">"));
        assert!(signature.contains(key.certificate_base64()));

        // The digest is over the unsigned canonical assertion.
        let digest = STANDARD.encode(Sha256::digest(doc.unsigned().as_bytes()));
        assert!(signature.contains(&format!("<ds:DigestValue>{digest}</ds:DigestValue>")));
        // The signature value is over SignedInfo with its own ds declaration.
        let expected = STANDARD.encode(
            key.sign(signed_info(content.id, &digest, crate::keys::RSA_SHA256).as_bytes())
                .unwrap(),
        );
        assert!(signature.contains(&expected));

        let without_cert = sign_enveloped(&doc, content.id, &key, false).unwrap();
        assert!(!without_cert.contains("KeyInfo"));
    }
}
