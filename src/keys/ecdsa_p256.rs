//! ECDSA P-256 with SHA-256 and RFC 6979 nonces, computed a window at a time.
//!
//! Why not the `p256` crate's signer as is: it computes `k·G` in one go (about 0.7 ms in
//! V8), and a worker thread that signs holds up every request it serves meanwhile. This
//! module follows the `ecdsa` crate's `sign_prehashed` step for step and uses `p256`'s
//! own field, scalar and point arithmetic (complete formulas, constant time); only the
//! multiplication `k·G` is written out, so that it can stop between windows. `G` is fixed,
//! so its multiples are computed once per VM: row `i` of a table holds `j·16ⁱ·G` for `j` in
//! `0..16`, and `k·G` is the sum of one entry per row, picked by the 4-bit window `i` of `k`
//! (64 additions and no doublings: 0.28 ms a signature in V8 against the crate's 0.75).
//! Its output is the `p256` crate's signature byte for byte (RFC 6979 makes it
//! deterministic), which `tests/ecdsa_difftest.rs` compares.
//!
//! Constant time: all 64 windows are processed whatever `k` is, and the entry of a row is
//! picked by reading all 16 with `subtle`'s masked `conditional_select`.
//!
//! The secret scalar, the nonce `k` and the partial sum of `k·G` (its windows can be read
//! off it) are wiped when dropped (`zeroize`), and the byte copies of scalars when used.

use p256::elliptic_curve::ops::Reduce;
use p256::elliptic_curve::point::AffineCoordinates;
use p256::elliptic_curve::subtle::{ConditionallySelectable, ConstantTimeEq};
use p256::elliptic_curve::{Curve, Field, FieldBytesEncoding, PrimeField};
use p256::{FieldBytes, NistP256, ProjectivePoint, Scalar, U256};
use sha2::{Digest, Sha256};
use std::sync::OnceLock;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::SignError;

/// Bits of `k` per window.
const WINDOW_BITS: u32 = 4;
/// Windows of a 256-bit scalar: the steps of a signature at one window a step.
pub const WINDOWS: usize = 256 / WINDOW_BITS as usize;

/// Row `i`: `j·16ⁱ·G` for `j` in `0..16` (entry 0 is the identity). Projective, as the
/// additions make them: affine points would make each addition a little cheaper, but
/// cost a field inversion per point (tens of ms in V8 for the table).
type GeneratorTable = [[ProjectivePoint; 1 << WINDOW_BITS]; WINDOWS];

/// The generator table, computed when the first P-256 key loads (96 KiB).
fn generator_table() -> &'static GeneratorTable {
    static TABLE: OnceLock<Box<GeneratorTable>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = Box::new([[ProjectivePoint::IDENTITY; 1 << WINDOW_BITS]; WINDOWS]);
        let mut row_base = ProjectivePoint::GENERATOR; // 16ⁱ·G
        for row in table.iter_mut() {
            for j in 1..row.len() {
                row[j] = row[j - 1] + row_base;
            }
            row_base = row[row.len() - 1] + row_base; // 16·16ⁱ·G
        }
        table
    })
}

/// A P-256 signing key.
#[derive(Clone)]
pub struct EcKey {
    secret: Scalar,
    generator_table: &'static GeneratorTable,
}

impl EcKey {
    pub fn new(key: &p256::ecdsa::SigningKey) -> Self {
        EcKey {
            secret: *key.as_nonzero_scalar().as_ref(),
            generator_table: generator_table(),
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
        let mut secret_bytes = self.secret.to_repr();
        let mut k_bytes = rfc6979::generate_k::<Sha256, _>(
            &secret_bytes,
            &NistP256::ORDER.encode_field_bytes(),
            &z,
            &[],
        );
        let k = Option::from(Scalar::from_repr(k_bytes));
        secret_bytes.as_mut_slice().zeroize();
        k_bytes.as_mut_slice().zeroize();
        EcSigning {
            key: self.clone(),
            k,
            z,
            point: ProjectivePoint::IDENTITY,
            windows_done: 0,
        }
    }
}

impl Drop for EcKey {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl ZeroizeOnDrop for EcKey {}

/// A P-256 signature under way (see [`EcKey::start`]).
pub struct EcSigning {
    key: EcKey,
    /// The nonce; `None` if RFC 6979 gave no scalar (cannot happen: it retries until it does).
    k: Option<Scalar>,
    z: FieldBytes,
    /// `k·G` so far: the sum of the entries of the windows done, from the least
    /// significant one.
    point: ProjectivePoint,
    windows_done: usize,
}

impl EcSigning {
    /// Does up to `windows` units of work (one unit: one 4-bit window of `k·G`, a table
    /// lookup and an addition, a few µs in V8; a signature is 64 units). `Some` once
    /// the signature is done.
    pub fn advance(&mut self, windows: usize) -> Option<Result<Vec<u8>, SignError>> {
        let Some(k) = &self.k else {
            return Some(Err(SignError));
        };
        let mut k_bytes = k.to_repr(); // big-endian
        for _ in 0..windows {
            let i = self.windows_done;
            if i == WINDOWS {
                break;
            }
            let byte = k_bytes[k_bytes.len() - 1 - i / 2];
            let window = if i % 2 == 0 {
                byte & 0x0f
            } else {
                byte >> WINDOW_BITS
            };
            self.point += select(&self.key.generator_table[i], window);
            self.windows_done += 1;
        }
        k_bytes.as_mut_slice().zeroize();
        (self.windows_done == WINDOWS).then(|| self.finish(k))
    }

    /// `r = x(k·G) mod n`, `s = k⁻¹ (z + r d) mod n` (as `ecdsa::hazmat::sign_prehashed`).
    fn finish(&self, k: &Scalar) -> Result<Vec<u8>, SignError> {
        let mut k_inverse: Scalar = Option::from(k.invert()).ok_or(SignError)?;
        let z = <Scalar as Reduce<U256>>::reduce_bytes(&self.z);
        let r = <Scalar as Reduce<U256>>::reduce_bytes(&self.point.to_affine().x());
        let s = k_inverse * (z + r * self.key.secret);
        k_inverse.zeroize();
        if bool::from(r.is_zero() | s.is_zero()) {
            return Err(SignError);
        }
        let mut signature = r.to_repr().to_vec();
        signature.extend_from_slice(&s.to_repr());
        Ok(signature)
    }
}

impl Drop for EcSigning {
    fn drop(&mut self) {
        // `k` in place (see `rsa_crt`'s `CrtSigning`: zeroize's `Option` impl leaves
        // undefined payload bytes). `key` wipes itself; `z` is the message digest, public.
        if let Some(k) = &mut self.k {
            k.zeroize();
        }
        self.point.zeroize();
    }
}

impl ZeroizeOnDrop for EcSigning {}

/// `table[index]`, reading every entry (the index is secret).
fn select(table: &[ProjectivePoint], index: u8) -> ProjectivePoint {
    let mut out = ProjectivePoint::IDENTITY;
    for (i, entry) in table.iter().enumerate() {
        out.conditional_assign(entry, (i as u8).ct_eq(&index));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::elliptic_curve::group::Group;

    #[test]
    fn dropping_a_key_or_a_signing_wipes_its_secrets() {
        let pem = include_str!("../../tests/fixtures/ec-key.pem");
        let secret = <p256::SecretKey as p256::pkcs8::DecodePrivateKey>::from_pkcs8_pem(pem)
            .expect("fixture key");
        let key = EcKey::new(&p256::ecdsa::SigningKey::from(secret));
        let mut signing = key.start(b"m");
        assert!(signing.advance(WINDOWS / 2).is_none());
        assert!(
            !bool::from(signing.point.is_identity()),
            "half of k·G so far"
        );
        let mut slot = std::mem::ManuallyDrop::new((key, signing));
        // SAFETY: dropped once, here; afterwards only the fields' bytes are read, whose
        // memory stays in `slot` (a scalar is four `u64` limbs, a point three field
        // elements of four; the `Option` a tag and a scalar, all initialized).
        unsafe { std::ptr::drop_in_place(&mut *slot) };
        let (key, signing) = &*slot;
        let bytes = |p: *const u8, len: usize| unsafe { std::slice::from_raw_parts(p, len) };
        assert_eq!(key.secret, Scalar::ZERO, "secret left behind");
        assert_eq!(
            signing.key.secret,
            Scalar::ZERO,
            "the signing's copy left behind"
        );
        let k = &signing.k as *const Option<Scalar> as *const u8;
        let k_len = std::mem::size_of::<Option<Scalar>>();
        let k_payload = &bytes(k, k_len)[k_len - 32..];
        assert!(k_payload.iter().all(|&b| b == 0), "k left behind");
        assert!(
            bool::from(signing.point.is_identity()),
            "k·G so far left behind"
        );
    }
}
