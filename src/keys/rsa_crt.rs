//! RSASSA-PKCS1-v1_5 with SHA-256, the private-key operation done with the Chinese
//! remainder theorem on RustCrypto's constant-time Montgomery arithmetic (`crypto-bigint`).
//!
//! Why not the `rsa` crate's own signer: its `num-bigint-dig` arithmetic is variable-time
//! and costs 10–16 ms per RSA-2048 signature in V8; this costs a fraction of that. The
//! `rsa` crate still parses keys, signs keys of other shapes (see [`RsaCrtKey::new`]) and
//! verifies every signature made here before it is released.
//!
//! Constant time: with `p`, `q`, `dP`, `dQ`, `qInv` secret, the operation uses only
//! `DynResidue::{new, pow, sub, mul, retrieve}` and `Uint::{from_be_slice, mul_wide, adc}`,
//! whose loops run over all limbs and all exponent bits (`pow` takes every bit of a
//! fixed-width exponent, 4-bit windows, table entries chosen with `ct_select`), and whose
//! carries and final Montgomery subtractions are masks, not branches. Which of the sizes
//! below a key uses depends only on the bit lengths of `p` and `q`, which are public.

use crypto_bigint::modular::runtime_mod::{DynResidue, DynResidueParams};
use crypto_bigint::zeroize::Zeroize;
use crypto_bigint::{Integer, Limb, Uint, U1024, U1536, U2048};
use rsa::traits::{PrivateKeyParts, PublicKeyParts};
use rsa::{BigUint, Pkcs1v15Sign, RsaPrivateKey, RsaPublicKey};
use sha2::{Digest, Sha256};

use super::SignError;

/// DER of `DigestInfo { sha256, NULL }` without the digest (RFC 8017, section 9.2, note 1).
const SHA256_DIGEST_INFO: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// A two-prime RSA key prepared for CRT signing.
#[derive(Clone)]
pub(crate) struct RsaCrtKey {
    public: RsaPublicKey,
    primes: Primes,
}

/// The two primes with their CRT values, at the smallest supported width that holds them.
#[derive(Clone)]
enum Primes {
    Bits1024(CrtPrimes<{ U1024::LIMBS }>),
    Bits1536(CrtPrimes<{ U1536::LIMBS }>),
    Bits2048(CrtPrimes<{ U2048::LIMBS }>),
}

/// `p`, `q` and `qInv = q^-1 mod p`, as PKCS#1 names them.
#[derive(Clone)]
struct CrtPrimes<const L: usize> {
    p: Prime<L>,
    q: Prime<L>,
    q_value: Uint<L>,
    q_inv: DynResidue<L>,
}

/// One prime with the private exponent reduced modulo `prime - 1`.
#[derive(Clone)]
struct Prime<const L: usize> {
    params: DynResidueParams<L>,
    exponent: Uint<L>,
    /// `2^(64 L)` (or `2^(32 L)` with 32-bit limbs) modulo the prime, to reduce a number of
    /// twice the width as `high * 2^(bits) + low` without a (variable-time) division.
    two_pow_bits: DynResidue<L>,
}

impl RsaCrtKey {
    /// Prepares `key` for CRT signing, or `None` for keys this module does not handle:
    /// more than two primes, or primes wider than 2048 bits (such keys are signed by the
    /// `rsa` crate instead). Keys of 2048, 3072 and 4096 bits from the usual generators
    /// (`pp-keys`, OpenSSL) all qualify.
    pub(crate) fn new(key: &RsaPrivateKey) -> Option<Self> {
        let [p, q] = key.primes() else {
            return None;
        };
        let (dp, dq) = (key.dp()?, key.dq()?);
        let q_inv = key.crt_coefficient()?;
        let bits = p.bits().max(q.bits());
        let primes = if bits <= 1024 {
            Primes::Bits1024(CrtPrimes::new(p, q, dp, dq, &q_inv)?)
        } else if bits <= 1536 {
            Primes::Bits1536(CrtPrimes::new(p, q, dp, dq, &q_inv)?)
        } else if bits <= 2048 {
            Primes::Bits2048(CrtPrimes::new(p, q, dp, dq, &q_inv)?)
        } else {
            return None;
        };
        Some(RsaCrtKey {
            public: key.to_public_key(),
            primes,
        })
    }

    /// The RSASSA-PKCS1-v1_5 SHA-256 signature of `message` (`k` bytes, `k` the modulus
    /// size), checked with the public key before it is returned.
    pub(crate) fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let digest = Sha256::digest(message);
        let k = self.public.size();
        let signature = match &self.primes {
            Primes::Bits1024(primes) => primes.sign_padded(&encode(&digest, k, 2 * U1024::BYTES)),
            Primes::Bits1536(primes) => primes.sign_padded(&encode(&digest, k, 2 * U1536::BYTES)),
            Primes::Bits2048(primes) => primes.sign_padded(&encode(&digest, k, 2 * U2048::BYTES)),
        };
        // The result is below n, so all but its last k bytes are zero.
        let signature = signature[signature.len() - k..].to_vec();
        self.public
            .verify(Pkcs1v15Sign::new::<Sha256>(), &digest, &signature)
            .map_err(|_| SignError)?;
        Ok(signature)
    }
}

/// `EM = 0x00 || 0x01 || 0xFF.. || 0x00 || DigestInfo || H`, `k` bytes (RFC 8017, 9.2),
/// left-padded with zeros to `width` bytes.
fn encode(digest: &[u8], k: usize, width: usize) -> Vec<u8> {
    let t_len = SHA256_DIGEST_INFO.len() + digest.len();
    let mut em = vec![0u8; width];
    let em_start = width - k;
    em[em_start + 1] = 0x01;
    em[em_start + 2..width - t_len - 1].fill(0xff);
    em[width - t_len..width - digest.len()].copy_from_slice(&SHA256_DIGEST_INFO);
    em[width - digest.len()..].copy_from_slice(digest);
    em
}

impl<const L: usize> CrtPrimes<L> {
    fn new(p: &BigUint, q: &BigUint, dp: &BigUint, dq: &BigUint, q_inv: &BigUint) -> Option<Self> {
        let p = Prime::new(p, dp)?;
        let q_inv = DynResidue::new(&uint(q_inv)?, p.params);
        Some(CrtPrimes {
            p,
            q: Prime::new(q, dq)?,
            q_value: uint(q)?,
            q_inv,
        })
    }

    /// `em^d mod pq` for `em` of `2 L` limbs in big-endian bytes (below `pq`), as bytes of
    /// the same width: `m1 = em^dP mod p`, `m2 = em^dQ mod q`, `h = qInv (m1 - m2) mod p`,
    /// `s = m2 + h q` (RFC 8017, 5.1.2).
    fn sign_padded(&self, em: &[u8]) -> Vec<u8> {
        let (high, low) = em.split_at(Uint::<L>::BYTES);
        let (high, low) = (Uint::<L>::from_be_slice(high), Uint::from_be_slice(low));
        let m1 = self.p.reduce(&high, &low).pow(&self.p.exponent);
        let m2 = self.q.reduce(&high, &low).pow(&self.q.exponent).retrieve();
        let m2_mod_p = DynResidue::new(&m2, self.p.params);
        let h = ((m1 - m2_mod_p) * self.q_inv).retrieve();
        // h q + m2 <= (p - 1) q + q - 1 < pq: two limb-widths, no carry out of the top.
        let (low, high) = h.mul_wide(&self.q_value);
        let (low, carry) = low.adc(&m2, Limb::ZERO);
        let (high, _) = high.adc(&Uint::ZERO, carry);
        let mut signature = Vec::with_capacity(2 * Uint::<L>::BYTES);
        for word in low.as_words().iter().chain(high.as_words()).rev() {
            signature.extend_from_slice(&word.to_be_bytes());
        }
        signature
    }
}

impl<const L: usize> Prime<L> {
    fn new(prime: &BigUint, private_exponent: &BigUint) -> Option<Self> {
        let modulus = uint(prime)?;
        if !bool::from(modulus.is_odd()) {
            return None;
        }
        let params = DynResidueParams::new(&modulus);
        Some(Prime {
            params,
            exponent: uint(private_exponent)?,
            // MAX + 1 = 2^bits; both terms are below 2^bits, as `DynResidue::new` requires.
            two_pow_bits: DynResidue::new(&Uint::MAX, params) + DynResidue::one(params),
        })
    }

    /// `high * 2^bits + low` modulo the prime.
    fn reduce(&self, high: &Uint<L>, low: &Uint<L>) -> DynResidue<L> {
        DynResidue::new(high, self.params) * self.two_pow_bits + DynResidue::new(low, self.params)
    }
}

impl<const L: usize> Drop for Prime<L> {
    fn drop(&mut self) {
        self.exponent.zeroize();
        self.two_pow_bits.zeroize();
    }
}

impl<const L: usize> Drop for CrtPrimes<L> {
    fn drop(&mut self) {
        self.q_value.zeroize();
        self.q_inv.zeroize();
    }
}

/// A number as `L` limbs, `None` if it does not fit; the temporary bytes are wiped.
fn uint<const L: usize>(n: &BigUint) -> Option<Uint<L>> {
    let mut bytes = n.to_bytes_be();
    let mut padded = vec![0u8; Uint::<L>::BYTES];
    let value = (bytes.len() <= padded.len()).then(|| {
        let start = padded.len() - bytes.len();
        padded[start..].copy_from_slice(&bytes);
        Uint::from_be_slice(&padded)
    });
    bytes.zeroize();
    padded.zeroize();
    value
}
