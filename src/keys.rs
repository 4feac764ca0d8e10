//! The gateway's signing key and certificate, checked once when the configuration loads.
//!
//! Keys arrive as PEM (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`). A key is
//! refused when it is shorter than 2048 bits or does not belong to the certificate it is
//! configured with, so a wrong pairing fails at load time and not at every token server.

use base64::Engine;
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs1v15::SigningKey as RsaSigningKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
use rsa::signature::{SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use sha2::Sha256;
use std::fmt;
use x509_cert::der::{DecodePem, Encode};
use x509_cert::Certificate;

/// Smallest RSA modulus accepted for signing assertions.
pub const MIN_RSA_BITS: usize = 2048;

/// A private key with its certificate, ready to sign assertions with RSA-SHA256.
#[derive(Clone)]
pub struct SigningKey {
    rsa: RsaSigningKey<Sha256>,
    certificate: CertificateInfo,
}

/// The public facts of a signing certificate: what targets must trust, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Base64 of the DER, as `ds:X509Certificate` and metadata `KeyDescriptor`s carry it.
    pub der_base64: String,
    /// Subject common name (S/4HANA Cloud takes the provider name from it).
    pub subject_cn: Option<String>,
    /// End of validity, Unix seconds.
    pub not_after_s: u64,
}

impl CertificateInfo {
    /// The certificate as PEM (public material only).
    pub fn pem(&self) -> String {
        let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in self.der_base64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
        pem
    }
}

/// A named key of the key set: assertions are signed with `active`; `passive` is the
/// next (or previous) certificate, published so targets can trust it before a rotation.
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub active: SigningKey,
    pub passive: Option<SigningKey>,
}

impl fmt::Debug for SigningKey {
    /// Never prints key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

/// Why a key or certificate was refused (never includes the material itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    PrivateKeyUnreadable,
    KeyTooShort(usize),
    CertificateUnreadable,
    CertificateDoesNotMatchKey,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::PrivateKeyUnreadable => f.write_str(
                "is not a PEM RSA private key (expected PKCS#8 \"PRIVATE KEY\" or PKCS#1 \"RSA PRIVATE KEY\")",
            ),
            KeyError::KeyTooShort(bits) => {
                write!(f, "is a {bits}-bit RSA key; at least {MIN_RSA_BITS} bits are required")
            }
            KeyError::CertificateUnreadable => f.write_str("is not a PEM X.509 certificate"),
            KeyError::CertificateDoesNotMatchKey => {
                f.write_str("does not certify the configured private key")
            }
        }
    }
}

impl SigningKey {
    /// Parses and cross-checks a PEM private key and its PEM certificate.
    pub fn from_pem(private_key_pem: &str, certificate_pem: &str) -> Result<Self, KeyError> {
        let private_key = parse_private_key(private_key_pem.trim())?;
        let bits = private_key.size() * 8;
        if bits < MIN_RSA_BITS {
            return Err(KeyError::KeyTooShort(bits));
        }
        let certificate = Certificate::from_pem(certificate_pem.trim().as_bytes())
            .map_err(|_| KeyError::CertificateUnreadable)?;
        let certified_key = certificate
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .map_err(|_| KeyError::CertificateUnreadable)?;
        let own_key = private_key
            .to_public_key()
            .to_public_key_der()
            .map_err(|_| KeyError::PrivateKeyUnreadable)?;
        if certified_key != own_key.as_bytes() {
            return Err(KeyError::CertificateDoesNotMatchKey);
        }
        let certificate_der = certificate
            .to_der()
            .map_err(|_| KeyError::CertificateUnreadable)?;
        let validity = &certificate.tbs_certificate.validity;
        Ok(SigningKey {
            rsa: RsaSigningKey::<Sha256>::new(private_key),
            certificate: CertificateInfo {
                der_base64: base64::engine::general_purpose::STANDARD.encode(certificate_der),
                subject_cn: common_name(&certificate.tbs_certificate.subject),
                not_after_s: validity.not_after.to_unix_duration().as_secs(),
            },
        })
    }

    /// RSASSA-PKCS1-v1_5 with SHA-256 over `message` (deterministic: needs no RNG).
    pub fn sign_rsa_sha256(&self, message: &[u8]) -> Vec<u8> {
        self.rsa.sign(message).to_vec()
    }

    /// The certificate as base64 DER, for `ds:KeyInfo/ds:X509Data/ds:X509Certificate`.
    pub fn certificate_base64(&self) -> &str {
        &self.certificate.der_base64
    }

    /// Public facts of the certificate.
    pub fn certificate(&self) -> &CertificateInfo {
        &self.certificate
    }
}

/// The first `CN` of a distinguished name, if it is a string.
fn common_name(name: &x509_cert::name::Name) -> Option<String> {
    use x509_cert::der::asn1::{PrintableStringRef, Utf8StringRef};
    const COMMON_NAME: x509_cert::der::asn1::ObjectIdentifier =
        x509_cert::der::asn1::ObjectIdentifier::new_unwrap("2.5.4.3");
    name.0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|attribute| attribute.oid == COMMON_NAME)
        .and_then(|attribute| {
            let value = &attribute.value;
            value
                .decode_as::<Utf8StringRef<'_>>()
                .map(|s| s.as_str().to_string())
                .or_else(|_| {
                    value
                        .decode_as::<PrintableStringRef<'_>>()
                        .map(|s| s.as_str().to_string())
                })
                .ok()
        })
}

fn parse_private_key(pem: &str) -> Result<RsaPrivateKey, KeyError> {
    RsaPrivateKey::from_pkcs8_pem(pem)
        .or_else(|_| RsaPrivateKey::from_pkcs1_pem(pem))
        .map_err(|_| KeyError::PrivateKeyUnreadable)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const KEY_PKCS8: &str = include_str!("../tests/fixtures/signing-key.pem");
    pub(crate) const KEY_PKCS1: &str = include_str!("../tests/fixtures/signing-key-pkcs1.pem");
    pub(crate) const CERT: &str = include_str!("../tests/fixtures/signing-cert.pem");
    const OTHER_CERT: &str = include_str!("../tests/fixtures/other-cert.pem");
    const SHORT_KEY: &str = include_str!("../tests/fixtures/short-key.pem");

    pub(crate) fn test_key() -> SigningKey {
        SigningKey::from_pem(KEY_PKCS8, CERT).unwrap()
    }

    #[test]
    fn accepts_pkcs8_and_pkcs1_keys_with_their_certificate() {
        let a = SigningKey::from_pem(KEY_PKCS8, CERT).unwrap();
        let b = SigningKey::from_pem(KEY_PKCS1, CERT).unwrap();
        assert_eq!(a.sign_rsa_sha256(b"x"), b.sign_rsa_sha256(b"x"));
        assert_eq!(a.sign_rsa_sha256(b"x").len(), 256);
        assert!(CERT.contains(&a.certificate_base64()[..60]));
        assert_eq!(format!("{a:?}"), "SigningKey(..)");
        let info = a.certificate();
        assert_eq!(
            info.subject_cn.as_deref(),
            Some("principal-propagation-test")
        );
        assert!(
            info.not_after_s > 1_795_323_921,
            "fixture valid for ten years"
        );
        assert_eq!(info.pem().replace('\n', ""), CERT.replace('\n', "").trim());
    }

    #[test]
    fn refuses_bad_material_with_a_reason() {
        assert_eq!(
            SigningKey::from_pem("nope", CERT).unwrap_err(),
            KeyError::PrivateKeyUnreadable
        );
        assert_eq!(
            SigningKey::from_pem(KEY_PKCS8, "nope").unwrap_err(),
            KeyError::CertificateUnreadable
        );
        assert_eq!(
            SigningKey::from_pem(KEY_PKCS8, OTHER_CERT).unwrap_err(),
            KeyError::CertificateDoesNotMatchKey
        );
        assert_eq!(
            SigningKey::from_pem(SHORT_KEY, CERT).unwrap_err(),
            KeyError::KeyTooShort(1024)
        );
    }
}
