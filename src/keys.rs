//! The gateway's signing key and certificate, checked once when the configuration loads.
//!
//! Keys arrive as PEM: RSA (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`, two primes,
//! 2048 to 4096 bits, signing RSA-SHA256) or ECDSA P-256 (PKCS#8 or SEC1 `EC PRIVATE KEY`,
//! signing ECDSA-SHA256, for targets that accept it: about ten times cheaper to sign in
//! Wasm). Every key is signed stepwise, in constant time ([`rsa_crt`], [`ecdsa_p256`]);
//! a key of another shape is refused here, at load, rather than signed some slower way.
//! A key that does not belong to the certificate it is configured with is refused too,
//! so a wrong pairing fails at load time and not at every token server.

pub mod ecdsa_p256;
pub mod rsa_crt;

use base64::Engine;
use ecdsa_p256::{EcKey, EcSigning};
use rsa::pkcs1::der::{Decode, SecretDocument};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use rsa_crt::{RsaCrtKey, RsaSigning};
use std::fmt;
use x509_cert::der::{DecodePem, Encode};
use x509_cert::Certificate;

/// Smallest RSA modulus accepted for signing assertions.
pub const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus accepted: the stepwise signer's largest size.
pub const MAX_RSA_BITS: usize = rsa_crt::MAX_MODULUS_BITS;

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
    RsaSha256(Box<RsaCrtKey>),
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
    /// An RSA key of this many primes (RFC 8017 multi-prime): the CRT signer takes two.
    MultiPrime(usize),
    /// An RSA modulus of this many bits, over [`MAX_RSA_BITS`].
    RsaKeyTooLong(usize),
    /// A prime too long for the signer's largest size (very unequal primes).
    RsaPrimeTooLong {
        modulus_bits: usize,
        prime_bits: usize,
    },
    /// Factors of fitting sizes with no CRT form (an even one, or no `qInv`).
    RsaKeyUnusable,
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
            KeyError::MultiPrime(primes) => write!(
                f,
                "is a {primes}-prime RSA key; only two-prime RSA keys are supported"
            ),
            KeyError::RsaKeyTooLong(bits) => {
                write!(f, "is a {bits}-bit RSA key; at most {MAX_RSA_BITS} bits are supported")
            }
            KeyError::RsaPrimeTooLong {
                modulus_bits,
                prime_bits,
            } => write!(
                f,
                "is a {modulus_bits}-bit RSA key with a {prime_bits}-bit prime factor; each may have at most {} bits",
                rsa_crt::MAX_PRIME_BITS
            ),
            KeyError::RsaKeyUnusable => f.write_str(
                "is an RSA key whose factors have no CRT form (an even factor, or factors with a common divisor)",
            ),
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
}

impl Signing {
    /// How many units make a step of 20–40 µs in V8 (what a request may do in passing,
    /// and how often a slice looks at the clock).
    pub fn units_per_step(&self) -> usize {
        match self {
            Signing::Rsa(signing) => signing.units_per_step(),
            Signing::Ec(_) => 4,
        }
    }

    /// Does up to `windows` units of work (see [`RsaSigning::advance`]); `Some` once the
    /// signature is done (and only once).
    pub fn advance(&mut self, windows: usize) -> Option<Result<Vec<u8>, SignError>> {
        match self {
            Signing::Rsa(signing) => signing.advance(windows),
            Signing::Ec(signing) => signing.advance(windows),
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
    /// thread meanwhile.
    pub fn start_signing(&self, message: &[u8]) -> Signing {
        match &self.algorithm {
            Algorithm::RsaSha256(key) => Signing::Rsa(key.start(message)),
            Algorithm::EcdsaP256Sha256(key) => Signing::Ec(key.start(message)),
        }
    }

    /// The XML-DSig `SignatureMethod` URI.
    pub fn signature_method(&self) -> &'static str {
        match self.algorithm {
            Algorithm::RsaSha256(_) => RSA_SHA256,
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
pub fn common_name(name: &x509_cert::name::Name) -> Option<String> {
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
        let algorithm = Algorithm::RsaSha256(Box::new(RsaCrtKey::new(&key)?));
        return Ok((algorithm, public.as_bytes().to_vec()));
    }
    if let Some(primes) = rsa_prime_count(pem).filter(|&primes| primes > 2) {
        return Err(KeyError::MultiPrime(primes));
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

/// How many primes a PEM RSA private key has, read from its `otherPrimeInfos` (RFC 8017,
/// A.1.2): the `rsa` crate refuses multi-prime keys as unreadable, which would hide why.
fn rsa_prime_count(pem: &str) -> Option<usize> {
    let (label, document) = SecretDocument::from_pem(pem).ok()?;
    let pkcs1 = match label {
        "RSA PRIVATE KEY" => document.as_bytes(),
        "PRIVATE KEY" => {
            let info = rsa::pkcs8::PrivateKeyInfo::from_der(document.as_bytes()).ok()?;
            if info.algorithm.oid != rsa::pkcs1::ALGORITHM_OID {
                return None;
            }
            info.private_key
        }
        _ => return None,
    };
    let key = rsa::pkcs1::RsaPrivateKey::from_der(pkcs1).ok()?;
    Some(2 + key.other_prime_infos.map_or(0, |others| others.len()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rsa::pkcs1v15::SigningKey as RsaSigningKey;
    use rsa::signature::{SignatureEncoding, Signer};
    use sha2::Sha256;

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

    /// RSA fixtures of every size the stepwise signer takes, with the units a signature
    /// takes at one unit a call: two half exponentiations of 7 windows per prime limb, the
    /// recombination, and the public-key check's 16 bits of `e = 65537` below the top one.
    pub(crate) const RSA_SIZES: [(&str, &str, usize, usize); 3] = [
        (KEY_PKCS8, CERT, 2048, 2 * 37 * 7 + 17),
        (
            include_str!("../tests/fixtures/rsa-3072-key.pem"),
            include_str!("../tests/fixtures/rsa-3072-cert.pem"),
            3072,
            2 * 55 * 7 + 17,
        ),
        (
            include_str!("../tests/fixtures/rsa-4096-key.pem"),
            include_str!("../tests/fixtures/rsa-4096-cert.pem"),
            4096,
            2 * 74 * 7 + 17,
        ),
    ];

    #[test]
    fn rsa_keys_of_2048_3072_and_4096_bits_sign_in_steps() {
        for (pem, cert, bits, units) in RSA_SIZES {
            let key = SigningKey::from_pem(pem, cert).unwrap();
            let reference =
                RsaSigningKey::<Sha256>::new(RsaPrivateKey::from_pkcs8_pem(pem).unwrap());
            let mut signing = key.start_signing(b"message");
            let mut calls = 1;
            let signature = loop {
                match signing.advance(1) {
                    Some(result) => break result.unwrap(),
                    None => calls += 1,
                }
            };
            assert_eq!(calls, units, "{bits} bits: one unit a call");
            assert_eq!(signature.len(), bits / 8);
            assert_eq!(
                signature,
                reference.sign(b"message").to_vec(),
                "{bits} bits"
            );
        }
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
