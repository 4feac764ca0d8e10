//! ECDSA P-256 with SHA-256 and RFC 6979 nonces, computed a window at a time.
//!
//! Why not the `p256` crate's signer as is: it computes `k·G` in one go (about 0.7 ms in
//! V8), and a worker thread that signs holds up every request it serves meanwhile. This
//! module follows the `ecdsa` crate's `sign_prehashed` step for step and uses `p256`'s
//! own field, scalar and point arithmetic (complete formulas, constant time); only the
//! multiplication `k·G` is written out, as a fixed 4-bit window over a table of `0·G ..
//! 15·G`, so that it can stop between windows. Its output is the `p256` crate's
//! signature byte for byte (RFC 6979 makes it deterministic), which `tests/ecdsa_difftest.rs`
//! compares.
//!
//! Constant time: all 64 windows are processed whatever `k` is, and the table entry of a
//! window is picked by reading every entry with `subtle`'s masked `conditional_select`.

use p256::elliptic_curve::group::Group as _;
use p256::elliptic_curve::ops::Reduce;
use p256::elliptic_curve::point::AffineCoordinates;
use p256::elliptic_curve::subtle::{ConditionallySelectable, ConstantTimeEq};
use p256::elliptic_curve::{Curve, Field, FieldBytesEncoding, PrimeField};
use p256::{FieldBytes, NistP256, ProjectivePoint, Scalar, U256};
use sha2::{Digest, Sha256};
use std::sync::Arc;

use super::SignError;

/// Bits of `k` per window.
const WINDOW_BITS: u32 = 4;
/// Windows of a 256-bit scalar: the steps of a signature at one window a step.
pub const WINDOWS: usize = 256 / WINDOW_BITS as usize;

/// A P-256 signing key with the generator table of the stepwise multiplication.
#[derive(Clone)]
pub struct EcKey {
    secret: Scalar,
    /// `i·G` for `i` in `0..16`, computed once per key.
    generator_multiples: Arc<[ProjectivePoint; 1 << WINDOW_BITS]>,
}

impl EcKey {
    pub fn new(key: &p256::ecdsa::SigningKey) -> Self {
        let mut table = [ProjectivePoint::IDENTITY; 1 << WINDOW_BITS];
        for i in 1..table.len() {
            table[i] = table[i - 1] + ProjectivePoint::GENERATOR;
        }
        EcKey {
            secret: *key.as_nonzero_scalar().as_ref(),
            generator_multiples: Arc::new(table),
        }
    }

    /// The signature of `message`, `r || s` (32 bytes each), in one go.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        self.start(message)
            .advance(usize::MAX)
            .unwrap_or(Err(SignError))
    }

    /// The same signature, computed by [`EcSigning::advance`] a window at a time.
    pub fn start(&self, message: &[u8]) -> EcSigning {
        // For SHA-256 on P-256 the digest is exactly a field element's bytes (`bits2field`
        // takes it as is).
        let z = FieldBytes::clone_from_slice(&Sha256::digest(message));
        let k_bytes = rfc6979::generate_k::<Sha256, _>(
            &self.secret.to_repr(),
            &NistP256::ORDER.encode_field_bytes(),
            &z,
            &[],
        );
        EcSigning {
            key: self.clone(),
            k: Option::from(Scalar::from_repr(k_bytes)),
            z,
            point: ProjectivePoint::IDENTITY,
            windows_done: 0,
        }
    }
}

/// A P-256 signature under way (see [`EcKey::start`]).
pub struct EcSigning {
    key: EcKey,
    /// The nonce; `None` if RFC 6979 gave no scalar (cannot happen: it retries until it does).
    k: Option<Scalar>,
    z: FieldBytes,
    /// `k·G` so far: the windows done, from the most significant one.
    point: ProjectivePoint,
    windows_done: usize,
}

impl EcSigning {
    /// Does up to `windows` units of work (one unit: one 4-bit window of `k·G`, four
    /// doublings and an addition, about 10 µs in V8; a signature is 64 units). `Some`
    /// once the signature is done.
    pub fn advance(&mut self, windows: usize) -> Option<Result<Vec<u8>, SignError>> {
        let Some(k) = self.k else {
            return Some(Err(SignError));
        };
        let k_bytes = k.to_repr();
        for _ in 0..windows {
            if self.windows_done == WINDOWS {
                break;
            }
            let byte = k_bytes[self.windows_done / 2];
            let window = if self.windows_done % 2 == 0 {
                byte >> WINDOW_BITS
            } else {
                byte & 0x0f
            };
            for _ in 0..WINDOW_BITS {
                self.point = self.point.double();
            }
            self.point += select(&self.key.generator_multiples[..], window);
            self.windows_done += 1;
        }
        (self.windows_done == WINDOWS).then(|| self.finish(&k))
    }

    /// `r = x(k·G) mod n`, `s = k⁻¹ (z + r d) mod n` (as `ecdsa::hazmat::sign_prehashed`).
    fn finish(&self, k: &Scalar) -> Result<Vec<u8>, SignError> {
        let k_inverse: Scalar = Option::from(k.invert()).ok_or(SignError)?;
        let z = <Scalar as Reduce<U256>>::reduce_bytes(&self.z);
        let r = <Scalar as Reduce<U256>>::reduce_bytes(&self.point.to_affine().x());
        let s = k_inverse * (z + r * self.key.secret);
        if bool::from(r.is_zero() | s.is_zero()) {
            return Err(SignError);
        }
        let mut signature = r.to_repr().to_vec();
        signature.extend_from_slice(&s.to_repr());
        Ok(signature)
    }
}

/// `table[index]`, reading every entry (the index is secret).
fn select(table: &[ProjectivePoint], index: u8) -> ProjectivePoint {
    let mut out = ProjectivePoint::IDENTITY;
    for (i, entry) in table.iter().enumerate() {
        out.conditional_assign(entry, (i as u8).ct_eq(&index));
    }
    out
}
