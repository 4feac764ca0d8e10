//! `pp keys`: creates and renews the gateway's signing trust.
//!
//! ```text
//! pp keys generate --issuer <CN> --key <key.pem> --cert <cert.pem> [--bits 2048|3072 | --algorithm ec] [--days 730]
//! pp keys renew    --key <key.pem> --cert <cert.pem> [--issuer <CN>] [--days 730]
//! pp keys sample-certificate --key <ca-key.pem> --cert <ca-cert.pem> --user <id> ...
//! ```
//!
//! `generate` makes a new RSA key and a self-signed certificate; `renew` issues a new
//! certificate for the existing key (targets that pin the key keep working). The
//! certificate's subject CN is the assertion issuer: S/4HANA Cloud takes the provider
//! name from it. Validity defaults to two years, as SAP's Destination Service does.

use principal_propagation::keys::SigningKey;
use rand_core::{OsRng, RngCore};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs1v15::SigningKey as RsaSigningKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::RsaPrivateKey;
use sha2::Sha256;
use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime};
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::der::EncodePem;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::{Time, Validity};

const DEFAULT_DAYS: u64 = 730;
/// A CA's default validity: a year, as the Cloud Connector's generated CAs.
const DEFAULT_CA_DAYS: u64 = 365;

pub fn run(args: Vec<String>) -> Result<String, String> {
    let (command, options) = args.split_first().ok_or_else(usage)?;
    let options = crate::parse_options(options)?;
    let get = |name: &str| options.get(name).map(String::as_str);
    let required =
        |name: &str| get(name).ok_or_else(|| format!("--{name} is required\n{}", usage()));
    let days = match get("days") {
        None => DEFAULT_DAYS,
        Some(d) => d
            .parse()
            .ok()
            .filter(|d| (1..=3650).contains(d))
            .ok_or("--days must be 1 to 3650")?,
    };
    let (key_path, cert_path) = (Path::new(required("key")?), Path::new(required("cert")?));
    let ca = match get("ca") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err("--ca must be true or false".into()),
    };
    let days = if ca && get("days").is_none() {
        DEFAULT_CA_DAYS
    } else {
        days
    };
    match command.as_str() {
        "generate" => {
            let issuer = required("issuer")?;
            let (key, described) = match get("algorithm").unwrap_or("rsa") {
                "rsa" => {
                    let bits = match get("bits").unwrap_or("2048") {
                        "2048" => 2048,
                        "3072" => 3072,
                        "4096" => 4096,
                        _ => return Err("--bits must be 2048, 3072 or 4096".into()),
                    };
                    let key = RsaPrivateKey::new(&mut OsRng, bits)
                        .map_err(|e| format!("key generation failed: {e}"))?;
                    (Key::Rsa(Box::new(key)), format!("{bits}-bit RSA"))
                }
                "ec" => (
                    Key::P256(p256::SecretKey::random(&mut OsRng)),
                    "P-256 ECDSA".to_string(),
                ),
                _ => return Err("--algorithm must be rsa or ec".into()),
            };
            let cert = key.self_signed(issuer, days, ca)?;
            write_private(key_path, key.pkcs8_pem()?.as_bytes())?;
            fs::write(cert_path, &cert).map_err(|e| format!("{}: {e}", cert_path.display()))?;
            check(key_path, cert_path)?;
            let what = if ca { "CA certificate" } else { "certificate" };
            Ok(format!(
                "generated a {described} key ({}) and a {what} for CN={issuer}, valid {days} days ({})",
                key_path.display(),
                cert_path.display()
            ))
        }
        "sample-certificate" => sample_certificate(key_path, cert_path, &options),
        "renew" => {
            let pem =
                fs::read_to_string(key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
            let key = Key::from_pem(&pem).ok_or_else(|| {
                format!(
                    "{} is not a PEM RSA or P-256 private key",
                    key_path.display()
                )
            })?;
            let issuer = match get("issuer") {
                Some(issuer) => issuer.to_string(),
                None => current_cn(key_path, cert_path)?,
            };
            let was_ca = is_ca(key_path, cert_path);
            let cert = key.self_signed(&issuer, days, ca || was_ca)?;
            fs::write(cert_path, &cert).map_err(|e| format!("{}: {e}", cert_path.display()))?;
            check(key_path, cert_path)?;
            Ok(format!(
                "renewed the certificate for CN={issuer} with the same key, valid {days} days ({})",
                cert_path.display()
            ))
        }
        _ => Err(usage()),
    }
}

/// The private key of a trust: RSA or P-256.
/// A fresh RSA-2048 key and a one-day self-signed certificate for `cn`, as PEM: stands in
/// for the operator's key where a configuration is checked before the key exists.
pub fn throwaway_pair(cn: &str) -> Result<(String, String), String> {
    let key = Key::Rsa(Box::new(
        RsaPrivateKey::new(&mut OsRng, 2048).map_err(|e| format!("key generation failed: {e}"))?,
    ));
    Ok((key.pkcs8_pem()?, key.self_signed(cn, 1, false)?))
}

enum Key {
    Rsa(Box<RsaPrivateKey>),
    P256(p256::SecretKey),
}

impl Key {
    fn from_pem(pem: &str) -> Option<Key> {
        if let Ok(key) =
            RsaPrivateKey::from_pkcs8_pem(pem).or_else(|_| RsaPrivateKey::from_pkcs1_pem(pem))
        {
            return Some(Key::Rsa(Box::new(key)));
        }
        p256::SecretKey::from_pkcs8_pem(pem)
            .or_else(|_| p256::SecretKey::from_sec1_pem(pem))
            .ok()
            .map(Key::P256)
    }

    fn pkcs8_pem(&self) -> Result<String, String> {
        let pem = match self {
            Key::Rsa(key) => key.to_pkcs8_pem(LineEnding::LF),
            Key::P256(key) => key.to_pkcs8_pem(LineEnding::LF),
        };
        pem.map(|p| p.to_string()).map_err(|e| e.to_string())
    }

    /// A self-signed certificate with subject `CN=<issuer>`: an end entity, or with
    /// `ca` a CA (basicConstraints cA, keyUsage keyCertSign and cRLSign) that can sign
    /// the users' client certificates.
    fn self_signed(&self, issuer: &str, days: u64, ca: bool) -> Result<String, String> {
        let certificate = match self {
            Key::Rsa(key) => {
                let spki = key
                    .to_public_key()
                    .to_public_key_der()
                    .map_err(|e| e.to_string())?;
                let signer = RsaSigningKey::<Sha256>::new(key.as_ref().clone());
                certificate_builder(spki.as_bytes(), &signer, issuer, days, ca)?
                    .build::<rsa::pkcs1v15::Signature>()
                    .map_err(|e| e.to_string())?
            }
            Key::P256(key) => {
                let spki = key
                    .public_key()
                    .to_public_key_der()
                    .map_err(|e| e.to_string())?;
                let signer = p256::ecdsa::SigningKey::from(key.clone());
                certificate_builder(spki.as_bytes(), &signer, issuer, days, ca)?
                    .build::<p256::ecdsa::DerSignature>()
                    .map_err(|e| e.to_string())?
            }
        };
        certificate
            .to_pem(LineEnding::LF)
            .map_err(|e| e.to_string())
    }
}

pub fn usage() -> String {
    "usage: pp keys generate --issuer <CN> --key <key.pem> --cert <cert.pem> [--bits 2048|3072|4096 | --algorithm ec] [--days N] [--ca true]\n       \
     pp keys renew --key <key.pem> --cert <cert.pem> [--issuer <CN>] [--days N]\n       \
     pp keys sample-certificate --key <ca-key.pem> --cert <ca-cert.pem> --user <user id> [--subject-pattern 'CN=${name}'] [--claims '<JSON>'] [--minutes N] [--out <sample.pem>]"
        .into()
}

/// A user's certificate exactly as the plugin makes it (same code), for the backend's
/// certificate mapping (ABAP transaction CERTRULE imports one as its sample).
fn sample_certificate(
    key_path: &Path,
    cert_path: &Path,
    options: &HashMap<String, String>,
) -> Result<String, String> {
    let get = |name: &str| options.get(name).map(String::as_str);
    use base64::Engine;
    use principal_propagation::identity::UserIdRule;
    use principal_propagation::x509::authority::{self, Authority, Request};
    use principal_propagation::x509::subject::{SubjectPattern, DEFAULT_PATTERN, NAME_CLAIMS};
    let read =
        |path: &Path| fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()));
    let key = SigningKey::from_pem(&read(key_path)?, &read(cert_path)?)
        .map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let ca = Authority::of(&key).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let user = get("user").ok_or_else(|| format!("--user is required\n{}", usage()))?;
    let mut claims: serde_json::Value = match get("claims") {
        Some(text) => serde_json::from_str(text).map_err(|e| format!("--claims: {e}"))?,
        None => serde_json::json!({}),
    };
    let object = claims
        .as_object_mut()
        .ok_or("--claims must be a JSON object")?;
    object.insert("user_name".into(), user.into());
    let pattern = SubjectPattern::parse(get("subject-pattern").unwrap_or(DEFAULT_PATTERN))
        .map_err(|e| format!("--subject-pattern {e}"))?;
    let subject = pattern
        .resolve(&claims, &UserIdRule::first_claim(&NAME_CLAIMS))
        .map_err(|e| e.to_string())?;
    let minutes: u64 = get("minutes")
        .unwrap_or("10")
        .parse()
        .map_err(|_| "--minutes must be a number")?;
    let holder = p256::SecretKey::random(&mut OsRng)
        .public_key()
        .to_public_key_der()
        .map_err(|e| e.to_string())?;
    let holder =
        SubjectPublicKeyInfoOwned::try_from(holder.as_bytes()).map_err(|e| e.to_string())?;
    let mut serial = [0u8; 16];
    OsRng.fill_bytes(&mut serial);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let unsigned = authority::write(
        &ca,
        &Request {
            subject,
            holder_key: &holder,
            serial,
            not_before_s: now - 60,
            not_after_s: now + minutes * 60,
        },
    )
    .map_err(|_| "the certificate could not be written".to_string())?;
    let signature = key
        .sign(&unsigned.to_be_signed)
        .map_err(|e| e.to_string())?;
    let der = unsigned
        .signed(&signature)
        .map_err(|_| "the certificate could not be written".to_string())?;
    let base64 = base64::engine::general_purpose::STANDARD.encode(der);
    let pem = principal_propagation::keys::CertificateInfo {
        der_base64: base64,
        subject_cn: None,
        not_after_s: 0,
    }
    .pem();
    match get("out") {
        Some(out) => {
            fs::write(out, &pem).map_err(|e| format!("{out}: {e}"))?;
            Ok(format!("wrote a sample user certificate to {out}"))
        }
        None => Ok(pem.trim_end().to_string()),
    }
}

/// Whether the certificate in place is a CA's (renew keeps it one).
fn is_ca(key_path: &Path, cert_path: &Path) -> bool {
    let (Ok(key), Ok(cert)) = (fs::read_to_string(key_path), fs::read_to_string(cert_path)) else {
        return false;
    };
    SigningKey::from_pem(&key, &cert)
        .ok()
        .is_some_and(|k| principal_propagation::x509::authority::Authority::of(&k).is_ok())
}

/// Subject, serial, validity and profile of the gateway's certificate.
fn certificate_builder<'s, S>(
    spki_der: &[u8],
    signer: &'s S,
    issuer: &str,
    days: u64,
    ca: bool,
) -> Result<CertificateBuilder<'s, S>, String>
where
    S: x509_cert::spki::DynSignatureAlgorithmIdentifier + rsa::signature::Keypair,
    S::VerifyingKey: x509_cert::spki::EncodePublicKey,
{
    let subject =
        Name::from_str(&format!("CN={}", escape_rdn_value(issuer))).map_err(|e| e.to_string())?;
    let mut serial = [0u8; 16];
    OsRng.fill_bytes(&mut serial);
    serial[0] &= 0x7f; // positive
    let now = SystemTime::now();
    let validity = Validity {
        not_before: time(now - Duration::from_secs(300))?,
        not_after: time(now + Duration::from_secs(days * 86_400))?,
    };
    let spki = SubjectPublicKeyInfoOwned::try_from(spki_der).map_err(|e| e.to_string())?;
    let profile = if ca {
        Profile::Root
    } else {
        Profile::Leaf {
            issuer: subject.clone(),
            enable_key_agreement: false,
            enable_key_encipherment: false,
            include_subject_key_identifier: true,
        }
    };
    CertificateBuilder::new(
        profile,
        SerialNumber::new(&serial).map_err(|e| e.to_string())?,
        validity,
        subject,
        spki,
        signer,
    )
    .map_err(|e| e.to_string())
}

fn time(at: SystemTime) -> Result<Time, String> {
    Time::try_from(at).map_err(|e| e.to_string())
}

/// RFC 4514 escaping of an attribute value.
fn escape_rdn_value(value: &str) -> String {
    let mut out = String::new();
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == value.chars().count() && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The CN of the certificate now in place (renew keeps it unless told otherwise).
fn current_cn(key_path: &Path, cert_path: &Path) -> Result<String, String> {
    let key = fs::read_to_string(key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
    let cert = fs::read_to_string(cert_path).map_err(|e| {
        format!(
            "{}: {e} (give --issuer to renew without it)",
            cert_path.display()
        )
    })?;
    let signing =
        SigningKey::from_pem(&key, &cert).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    signing
        .certificate()
        .subject_cn
        .clone()
        .ok_or_else(|| "the current certificate has no CN: give --issuer".to_string())
}

/// The files must pass the same check the plugin applies at load time.
fn check(key_path: &Path, cert_path: &Path) -> Result<(), String> {
    let key = fs::read_to_string(key_path).map_err(|e| e.to_string())?;
    let cert = fs::read_to_string(cert_path).map_err(|e| e.to_string())?;
    SigningKey::from_pem(&key, &cert)
        .map(|_| ())
        .map_err(|e| format!("written files fail the plugin's check: {e}"))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(bytes)
        .map_err(|e| format!("{}: {e}", path.display()))
}
