//! The public key the users' certificates certify.
//!
//! Nobody ever proves possession of it: the backend trusts the certificate because it
//! arrives in a header over the gateway's own authenticated TLS connection, as with the
//! SAP Cloud Connector. A fresh key per certificate would therefore protect nothing and
//! would cost a P-256 scalar multiplication (about a millisecond in V8, not stepwise) on a
//! new user's path; so each worker makes one, keeps only its public half (the private
//! scalar is wiped at once) and makes a new one every [`ROTATION_MS`].

use std::rc::Rc;
use x509_cert::spki::{EncodePublicKey, SubjectPublicKeyInfoOwned};

/// How long one worker's holder key is used.
pub const ROTATION_MS: u64 = 3_600_000;

/// A worker's current holder key.
#[derive(Default)]
pub struct HolderKey {
    current: Option<(Rc<SubjectPublicKeyInfoOwned>, u64)>,
}

impl HolderKey {
    /// The key to certify at `now_ms`; a new one from `random` (32 bytes asked for when
    /// needed) when there is none or it is due. `None`: no randomness.
    pub fn at(
        &mut self,
        now_ms: u64,
        random: impl FnOnce(&mut [u8; 32]) -> bool,
    ) -> Option<Rc<SubjectPublicKeyInfoOwned>> {
        if let Some((key, made_ms)) = &self.current {
            if now_ms.saturating_sub(*made_ms) < ROTATION_MS {
                return Some(Rc::clone(key));
            }
        }
        let mut seed = [0u8; 32];
        if !random(&mut seed) {
            return None;
        }
        // A seed of zero or beyond the group order (about 2^-32 of all) is refused.
        let secret = p256::SecretKey::from_slice(&seed).ok();
        zeroize::Zeroize::zeroize(&mut seed);
        let der = secret?.public_key().to_public_key_der().ok()?;
        let key = Rc::new(SubjectPublicKeyInfoOwned::try_from(der.as_bytes()).ok()?);
        self.current = Some((Rc::clone(&key), now_ms));
        Some(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_per_rotation_period() {
        let mut holder = HolderKey::default();
        let mut fill = |byte: u8| {
            move |seed: &mut [u8; 32]| {
                seed.fill(byte);
                true
            }
        };
        let first = holder.at(0, fill(1)).unwrap();
        let same = holder.at(ROTATION_MS - 1, fill(2)).unwrap();
        assert_eq!(first, same);
        let next = holder.at(ROTATION_MS, fill(2)).unwrap();
        assert_ne!(first, next);
        assert!(HolderKey::default().at(0, |_| false).is_none());
        assert!(
            HolderKey::default().at(0, fill(0)).is_none(),
            "zero is no key"
        );
        let _ = &mut fill;
    }
}
