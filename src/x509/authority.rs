//! The CA that signs the users' certificates, and the certificate each user gets.
//!
//! RustCrypto's `x509-cert` builder writes the certificate; its finalize/assemble split
//! lets the signature run on the stepwise signers ([`crate::keys::Signing`]) instead of a
//! blocking `Signer`, so a new user's certificate never stalls the worker's cache hits.

use crate::keys::{SigningKey, ECDSA_SHA256};
use base64::Engine;
use sha2::Digest;
use std::time::Duration;
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::der::asn1::{BitString, GeneralizedTime, ObjectIdentifier, OctetString};
use x509_cert::der::{Decode, Document, Encode};
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages,
    SubjectKeyIdentifier,
};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::{
    AlgorithmIdentifierOwned, DynSignatureAlgorithmIdentifier, EncodePublicKey,
    SubjectPublicKeyInfoOwned,
};
use x509_cert::time::{Time, Validity};
use x509_cert::Certificate;

const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const CLIENT_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.2");

/// The public side of a CA key: who issues, with which key identifier and algorithm.
#[derive(Debug, Clone)]
pub struct Authority {
    subject: Name,
    /// The CA certificate's subject key identifier (or, without one, the SHA-1 of its
    /// key, RFC 5280's method 1): the users' certificates name it, and verifiers such as
    /// OpenSSL match the two.
    key_id: Vec<u8>,
    public_key: Vec<u8>,
    algorithm: AlgorithmIdentifierOwned,
    ec: bool,
}

/// Why a key cannot issue certificates (a configuration error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAnAuthority {
    Unreadable,
    /// No basicConstraints with `cA` TRUE.
    NotCa,
    /// No keyUsage, or one without keyCertSign.
    NoKeyCertSign,
}

impl std::fmt::Display for NotAnAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NotAnAuthority::Unreadable => "has a certificate that cannot be read",
            NotAnAuthority::NotCa => {
                "has a certificate that is not a CA (basicConstraints cA TRUE is required; `pp keys generate --ca true` makes one)"
            }
            NotAnAuthority::NoKeyCertSign => {
                "has a CA certificate without keyUsage keyCertSign (`pp keys generate --ca true` makes one)"
            }
        })
    }
}

impl Authority {
    /// The authority of `key`, whose certificate must be a CA's.
    pub fn of(key: &SigningKey) -> Result<Authority, NotAnAuthority> {
        let der = base64::engine::general_purpose::STANDARD
            .decode(key.certificate_base64())
            .map_err(|_| NotAnAuthority::Unreadable)?;
        let certificate = Certificate::from_der(&der).map_err(|_| NotAnAuthority::Unreadable)?;
        let tbs = certificate.tbs_certificate;
        let extension = |oid: ObjectIdentifier| {
            tbs.extensions
                .iter()
                .flatten()
                .find(|e| e.extn_id == oid)
                .map(|e| e.extn_value.as_bytes().to_vec())
        };
        let ca = extension(ObjectIdentifier::new_unwrap("2.5.29.19"))
            .and_then(|v| BasicConstraints::from_der(&v).ok())
            .is_some_and(|b| b.ca);
        if !ca {
            return Err(NotAnAuthority::NotCa);
        }
        // SAP asks for keyUsage keyCertSign on the Cloud Connector's CA; a certificate
        // without keyUsage (as `openssl req -x509` makes by default) is not taken for one.
        let signs_certificates = extension(ObjectIdentifier::new_unwrap("2.5.29.15"))
            .and_then(|usage| KeyUsage::from_der(&usage).ok())
            .is_some_and(|usage| usage.key_cert_sign());
        if !signs_certificates {
            return Err(NotAnAuthority::NoKeyCertSign);
        }
        let spki = &tbs.subject_public_key_info;
        let key_id = match extension(ObjectIdentifier::new_unwrap("2.5.29.14")) {
            Some(ski) => SubjectKeyIdentifier::from_der(&ski)
                .map_err(|_| NotAnAuthority::Unreadable)?
                .0
                .as_bytes()
                .to_vec(),
            None => sha1::Sha1::digest(spki.subject_public_key.raw_bytes()).to_vec(),
        };
        let ec = key.signature_method() == ECDSA_SHA256;
        Ok(Authority {
            subject: tbs.subject.clone(),
            key_id,
            public_key: spki.to_der().map_err(|_| NotAnAuthority::Unreadable)?,
            algorithm: AlgorithmIdentifierOwned {
                oid: if ec {
                    ECDSA_WITH_SHA256
                } else {
                    SHA256_WITH_RSA
                },
                // RFC 4055: sha256WithRSAEncryption has NULL parameters; RFC 5758: ECDSA
                // algorithms have none.
                parameters: (!ec).then_some(x509_cert::der::asn1::Null.into()),
            },
            ec,
        })
    }

    /// The CA's key identifier (the users' certificates' authority key identifier).
    pub fn key_id(&self) -> &[u8] {
        &self.key_id
    }

    /// The subject of the CA certificate (the users' certificates' issuer).
    pub fn subject(&self) -> &Name {
        &self.subject
    }
}

/// What a user's certificate says.
pub struct Request<'a> {
    pub subject: Name,
    pub holder_key: &'a SubjectPublicKeyInfoOwned,
    /// At least 64 random bits (RFC 5280 allows up to 20 octets).
    pub serial: [u8; 16],
    pub not_before_s: u64,
    pub not_after_s: u64,
}

/// A certificate waiting for its signature: the bytes to sign, and the rest.
pub struct Unsigned {
    pub to_be_signed: Vec<u8>,
    certificate: Certificate,
    ec: bool,
}

/// Why no certificate could be written (a value the builder refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CannotWrite;

/// The user's certificate without its signature: X.509 v3, the CA's subject as issuer,
/// keyUsage digitalSignature (critical), extendedKeyUsage clientAuth, basicConstraints
/// not a CA, and the CA's key identifier.
pub fn write(authority: &Authority, request: &Request<'_>) -> Result<Unsigned, CannotWrite> {
    let mut serial = request.serial;
    // Positive and of full length: the first octet is 01xxxxxx (126 random bits).
    serial[0] = (serial[0] & 0x3f) | 0x40;
    let validity = Validity {
        not_before: time(request.not_before_s)?,
        not_after: time(request.not_after_s)?,
    };
    let mut builder = CertificateBuilder::new(
        Profile::Manual {
            issuer: Some(authority.subject.clone()),
        },
        SerialNumber::new(&serial).map_err(|_| CannotWrite)?,
        validity,
        request.subject.clone(),
        request.holder_key.clone(),
        authority,
    )
    .map_err(|_| CannotWrite)?;
    let key_id = OctetString::new(authority.key_id.clone()).map_err(|_| CannotWrite)?;
    let extensions = [
        builder.add_extension(&BasicConstraints {
            ca: false,
            path_len_constraint: None,
        }),
        builder.add_extension(&KeyUsage(KeyUsages::DigitalSignature.into())),
        builder.add_extension(&ExtendedKeyUsage(vec![CLIENT_AUTH])),
        builder.add_extension(&AuthorityKeyIdentifier {
            key_identifier: Some(key_id),
            authority_cert_issuer: None,
            authority_cert_serial_number: None,
        }),
    ];
    if extensions.iter().any(Result::is_err) {
        return Err(CannotWrite);
    }
    let to_be_signed = builder.finalize().map_err(|_| CannotWrite)?;
    // The signature is set once computed (see `Unsigned::sign`).
    let certificate = builder
        .assemble(BitString::new(0, Vec::new()).map_err(|_| CannotWrite)?)
        .map_err(|_| CannotWrite)?;
    Ok(Unsigned {
        to_be_signed,
        certificate,
        ec: authority.ec,
    })
}

impl Unsigned {
    /// The certificate's DER with `signature` as the signing key made it (RSA: the
    /// PKCS#1 v1.5 value; ECDSA: `r || s`, which X.509 wants as a DER SEQUENCE).
    pub fn signed(mut self, signature: &[u8]) -> Result<Vec<u8>, CannotWrite> {
        let value = if self.ec {
            p256::ecdsa::Signature::from_slice(signature)
                .map_err(|_| CannotWrite)?
                .to_der()
                .as_bytes()
                .to_vec()
        } else {
            signature.to_vec()
        };
        self.certificate.signature = BitString::from_bytes(&value).map_err(|_| CannotWrite)?;
        self.certificate.to_der().map_err(|_| CannotWrite)
    }
}

fn time(unix_s: u64) -> Result<Time, CannotWrite> {
    let at = GeneralizedTime::from_unix_duration(Duration::from_secs(unix_s))
        .map_err(|_| CannotWrite)?;
    // The builder writes it as UTCTime through 2049, as RFC 5280 asks.
    Ok(Time::GeneralTime(at))
}

/// The builder takes its issuer's public key and algorithm from a signer; the CA's
/// private key never enters it (it signs stepwise, elsewhere).
impl signature::Keypair for Authority {
    type VerifyingKey = PublicKey;

    fn verifying_key(&self) -> PublicKey {
        PublicKey(self.public_key.clone())
    }
}

impl DynSignatureAlgorithmIdentifier for Authority {
    fn signature_algorithm_identifier(&self) -> x509_cert::spki::Result<AlgorithmIdentifierOwned> {
        Ok(self.algorithm.clone())
    }
}

/// A public key as SPKI DER.
#[derive(Clone)]
pub struct PublicKey(Vec<u8>);

impl EncodePublicKey for PublicKey {
    fn to_public_key_der(&self) -> x509_cert::spki::Result<Document> {
        Ok(Document::try_from(self.0.as_slice())?)
    }
}
