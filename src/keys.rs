//! The gateway's signing key and certificate, checked once when the configuration loads.
//!
//! Keys arrive as PEM: RSA (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`, at least
//! 2048 bits, signing RSA-SHA256) or ECDSA P-256 (PKCS#8 or SEC1 `EC PRIVATE KEY`,
//! signing ECDSA-SHA256, for targets that accept it: about ten times cheaper to sign in
//! Wasm). A key that does not belong to the certificate it is configured with is
//! refused, so a wrong pairing fails at load time and not at every token server.

pub mod ecdsa_p256;
pub mod rsa_crt;

use base64::Engine;
use ecdsa_p256::{EcKey, EcSigning};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs1v15::SigningKey as RsaSigningKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
use rsa::signature::{SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use rsa_crt::{RsaCrtKey, RsaSigning};
use sha2::Sha256;
use std::fmt;
use x509_cert::der::{DecodePem, Encode};
use x509_cert::Certificate;

/// Smallest RSA modulus accepted for signing assertions.
pub const MIN_RSA_BITS: usize = 2048;

/// A private key with its certificate, ready to sign assertions.
#[derive(Clone)]
pub struct SigningKey {
    algorithm: Algorithm,
    certificate: CertificateInfo,
}

/// The key and the XML-DSig signature method it implies.
#[derive(Clone)]
enum Algorithm {
    /// `http://www.w3.org/2001/04/xmldsig-more#rsa-sha256` (RSASSA-PKCS1-v1_5), two-prime
    /// keys: constant-time CRT signing, several times faster in Wasm than the `rsa` crate.
    RsaSha256Crt(Box<RsaCrtKey>),
    /// RSA-SHA256 for the keys [`RsaCrtKey`] does not take (multi-prime): the `rsa` crate.
    RsaSha256(Box<RsaSigningKey<Sha256>>),
    /// `http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256` on P-256 (RFC 6979 nonces),
    /// computed stepwise like RSA (see [`ecdsa_p256`]).
    EcdsaP256Sha256(Box<EcKey>),
}

/// XML-DSig URI of RSA-SHA256.
pub const RSA_SHA256: &str = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256";
/// XML-DSig URI of ECDSA-SHA256.
pub const ECDSA_SHA256: &str = "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256";

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
                "is not a PEM RSA or P-256 private key (expected PKCS#8 \"PRIVATE KEY\", PKCS#1 \"RSA PRIVATE KEY\" or SEC1 \"EC PRIVATE KEY\")",
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

/// No signature could be made: the RSA result did not verify with the public key (a
/// computation fault or corrupted key material; withheld, because a faulty CRT signature
/// reveals a prime factor), or the signer refused the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignError;

impl fmt::Display for SignError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the signature could not be made or did not verify")
    }
}

/// A signature under way (see [`SigningKey::start_signing`]).
pub enum Signing {
    Rsa(RsaSigning),
    Ec(EcSigning),
    /// Signed already; `None` once the result was taken.
    Done(Option<Result<Vec<u8>, SignError>>),
}

impl Signing {
    /// Does up to `windows` units of work (see [`RsaSigning::advance`]); `Some` once the
    /// signature is done (and only once).
    pub fn advance(&mut self, windows: usize) -> Option<Result<Vec<u8>, SignError>> {
        match self {
            Signing::Rsa(signing) => signing.advance(windows),
            Signing::Ec(signing) => signing.advance(windows),
            Signing::Done(result) => result.take(),
        }
    }

    /// The signature, doing whatever work is left.
    pub fn finish(mut self) -> Result<Vec<u8>, SignError> {
        self.advance(usize::MAX).unwrap_or(Err(SignError))
    }
}

impl SigningKey {
    /// Parses and cross-checks a PEM private key and its PEM certificate.
    pub fn from_pem(private_key_pem: &str, certificate_pem: &str) -> Result<Self, KeyError> {
        let (algorithm, own_key) = parse_private_key(private_key_pem.trim())?;
        let certificate = Certificate::from_pem(certificate_pem.trim().as_bytes())
            .map_err(|_| KeyError::CertificateUnreadable)?;
        let certified_key = certificate
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .map_err(|_| KeyError::CertificateUnreadable)?;
        if certified_key != own_key {
            return Err(KeyError::CertificateDoesNotMatchKey);
        }
        let certificate_der = certificate
            .to_der()
            .map_err(|_| KeyError::CertificateUnreadable)?;
        let validity = &certificate.tbs_certificate.validity;
        Ok(SigningKey {
            algorithm,
            certificate: CertificateInfo {
                der_base64: base64::engine::general_purpose::STANDARD.encode(certificate_der),
                subject_cn: common_name(&certificate.tbs_certificate.subject),
                not_after_s: validity.not_after.to_unix_duration().as_secs(),
            },
        })
    }

    /// The signature over `message`, as `ds:SignatureValue` carries it (deterministic:
    /// needs no RNG). ECDSA values are `r || s`, 32 bytes each, as XML-DSig requires.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        self.start_signing(message).finish()
    }

    /// The same signature, to be computed by [`Signing::advance`] a slice at a time: a
    /// 2048-bit RSA signature takes milliseconds in Wasm (a P-256 one about 0.3 ms), and
    /// a worker that computed it in one go would hold up every other request on its
    /// thread meanwhile. Multi-prime RSA keys (the `rsa` crate's) are signed here, at once.
    pub fn start_signing(&self, message: &[u8]) -> Signing {
        match &self.algorithm {
            Algorithm::RsaSha256Crt(key) => Signing::Rsa(key.start(message)),
            Algorithm::EcdsaP256Sha256(key) => Signing::Ec(key.start(message)),
            Algorithm::RsaSha256(key) => Signing::Done(Some(
                key.try_sign(message)
                    .map(|signature| signature.to_vec())
                    .map_err(|_| SignError),
            )),
        }
    }

    /// The XML-DSig `SignatureMethod` URI.
    pub fn signature_method(&self) -> &'static str {
        match self.algorithm {
            Algorithm::RsaSha256Crt(_) | Algorithm::RsaSha256(_) => RSA_SHA256,
            Algorithm::EcdsaP256Sha256(_) => ECDSA_SHA256,
        }
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

/// The signing key and its public key as SubjectPublicKeyInfo DER (to compare with the
/// certificate's).
fn parse_private_key(pem: &str) -> Result<(Algorithm, Vec<u8>), KeyError> {
    let rsa = RsaPrivateKey::from_pkcs8_pem(pem).or_else(|_| RsaPrivateKey::from_pkcs1_pem(pem));
    if let Ok(key) = rsa {
        let bits = key.size() * 8;
        if bits < MIN_RSA_BITS {
            return Err(KeyError::KeyTooShort(bits));
        }
        let public = key
            .to_public_key()
            .to_public_key_der()
            .map_err(|_| KeyError::PrivateKeyUnreadable)?;
        let algorithm = match RsaCrtKey::new(&key) {
            Some(crt) => Algorithm::RsaSha256Crt(Box::new(crt)),
            None => Algorithm::RsaSha256(Box::new(RsaSigningKey::new(key))),
        };
        return Ok((algorithm, public.as_bytes().to_vec()));
    }
    let ec = p256::SecretKey::from_pkcs8_pem(pem)
        .or_else(|_| p256::SecretKey::from_sec1_pem(pem))
        .map_err(|_| KeyError::PrivateKeyUnreadable)?;
    let public = ec
        .public_key()
        .to_public_key_der()
        .map_err(|_| KeyError::PrivateKeyUnreadable)?;
    Ok((
        Algorithm::EcdsaP256Sha256(Box::new(EcKey::new(&p256::ecdsa::SigningKey::from(ec)))),
        public.as_bytes().to_vec(),
    ))
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
        assert_eq!(a.sign(b"x").unwrap(), b.sign(b"x").unwrap());
        assert_eq!(a.sign(b"x").unwrap().len(), 256);
        assert_eq!(a.signature_method(), RSA_SHA256);
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
    fn accepts_p256_keys_in_pkcs8_and_sec1_and_signs_r_s() {
        use p256::ecdsa::signature::Verifier;
        let cert = include_str!("../tests/fixtures/ec-cert.pem");
        let a = SigningKey::from_pem(include_str!("../tests/fixtures/ec-key.pem"), cert).unwrap();
        let b =
            SigningKey::from_pem(include_str!("../tests/fixtures/ec-key-sec1.pem"), cert).unwrap();
        assert_eq!(a.signature_method(), ECDSA_SHA256);
        let signature = a.sign(b"message").unwrap();
        assert_eq!(signature.len(), 64);
        assert_eq!(
            signature,
            b.sign(b"message").unwrap(),
            "RFC 6979: deterministic"
        );
        let key =
            p256::SecretKey::from_pkcs8_pem(include_str!("../tests/fixtures/ec-key.pem")).unwrap();
        let parsed = p256::ecdsa::Signature::from_slice(&signature).unwrap();
        let verifying = p256::ecdsa::VerifyingKey::from(key.public_key());
        assert!(verifying.verify(b"message", &parsed).is_ok());
        assert_eq!(
            SigningKey::from_pem(include_str!("../tests/fixtures/ec-key.pem"), CERT).unwrap_err(),
            KeyError::CertificateDoesNotMatchKey
        );
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
