//! RSASSA-PKCS1-v1_5 with SHA-256: the private-key operation with the Chinese remainder
//! theorem on a small constant-time Montgomery arithmetic, written for WebAssembly.
//!
//! Why not the `rsa` crate's signer: its `num-bigint-dig` arithmetic is variable-time and
//! costs 10–16 ms per RSA-2048 signature in V8 (`crypto-bigint` 0.5, constant-time, still
//! about 6 ms). Wasm has no 64×64→128-bit multiply, so numbers here are 28-bit limbs held
//! in `u64`s: a limb product takes 56 bits, and a whole column of a Montgomery product
//! (at most 2 × 74 limb products for 2048-bit primes, below 2^64) is summed without carrying
//! after every step. The `rsa` crate still parses keys, signs keys of other shapes (see
//! [`RsaCrtKey::new`]), and is the reference of the differential tests.
//!
//! Constant time: the loops run over all limbs of the modulus and all bits of the
//! fixed-width exponent; their counts depend only on the key's public bit lengths. The
//! exponentiation uses a fixed 4-bit window whose table entry is picked by reading every
//! entry and keeping one with `subtle`'s masked `conditional_assign`, and the only
//! conditional subtraction (`reduce_once`) is a masked select as well. Key set-up
//! (`R^2 mod p`, ...) uses the `rsa` crate's variable-time arithmetic once, at load.
//!
//! Every signature is checked with the public key (`s^e mod n`, here too) before it is
//! released: a computation fault in one CRT half would otherwise reveal a prime factor.

use rsa::traits::{PrivateKeyParts, PublicKeyParts};
use rsa::{BigUint, RsaPrivateKey};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::SignError;

/// Bits per limb: 2 × 28 + 8 bits of headroom for summing limb products.
const LIMB_BITS: usize = 28;
const LIMB_MASK: u64 = (1 << LIMB_BITS) - 1;
/// Largest modulus handled: a column of a product sums up to `2 × limbs` limb products
/// of 56 bits, so at most 127 limbs fit a `u64`; 3072-bit `n` (four bits to spare) take 110.
const MAX_MODULUS_BITS: usize = 3072;
const MAX_LIMBS: usize = (MAX_MODULUS_BITS + 4).div_ceil(LIMB_BITS);
/// Exponent bits per window of the exponentiation.
const WINDOW_BITS: usize = 4;

/// DER of `DigestInfo { sha256, NULL }` without the digest (RFC 8017, section 9.2, note 1).
const SHA256_DIGEST_INFO: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// A number below `2^(28 len)`: little-endian 28-bit limbs, the first `len` used (fixed
/// storage, so arithmetic needs no allocation).
type Limbs = [u64; MAX_LIMBS];

/// A two-prime RSA key prepared for CRT signing.
#[derive(Clone)]
pub(crate) struct RsaCrtKey {
    /// Modulus size in bytes (`k` in RFC 8017).
    size: usize,
    n: Montgomery,
    e: Limbs,
    p: Montgomery,
    q: Montgomery,
    /// `d mod (p - 1)`, `d mod (q - 1)`, `q^-1 mod p` (PKCS#1 `exponent1`, ... `coefficient`).
    dp: Limbs,
    dq: Limbs,
    q_inv: Limbs,
}

impl RsaCrtKey {
    /// Prepares `key` for CRT signing, or `None` for keys this module does not take: more
    /// than two primes, or a modulus over 3072 bits (those are signed by the `rsa` crate).
    pub(crate) fn new(key: &RsaPrivateKey) -> Option<Self> {
        let [p, q] = key.primes() else {
            return None;
        };
        if key.n().bits() > MAX_MODULUS_BITS {
            return None;
        }
        // Both primes share one limb count, so that numbers below q fit p's and back.
        let prime_limbs = (p.bits().max(q.bits()) + 4).div_ceil(LIMB_BITS);
        let n = Montgomery::new(key.n(), (key.n().bits() + 4).div_ceil(LIMB_BITS))?;
        let p_context = Montgomery::new(p, prime_limbs)?;
        let q_context = Montgomery::new(q, prime_limbs)?;
        Some(RsaCrtKey {
            size: key.size(),
            e: limbs(&key.e().to_bytes_be(), n.len)?,
            dp: limbs(&key.dp()?.to_bytes_be(), prime_limbs)?,
            dq: limbs(&key.dq()?.to_bytes_be(), prime_limbs)?,
            q_inv: limbs(&key.crt_coefficient()?.to_bytes_be(), prime_limbs)?,
            n,
            p: p_context,
            q: q_context,
        })
    }

    /// The RSASSA-PKCS1-v1_5 SHA-256 signature of `message`, `k` bytes, checked with the
    /// public key before it is returned.
    pub(crate) fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let em = encode(&Sha256::digest(message), self.size);
        let signature = self.private_operation(&em);
        let em_again = self
            .n
            .pow_public(&limbs(&signature, self.n.len).ok_or(SignError)?, &self.e);
        let em_limbs = limbs(&em, self.n.len).ok_or(SignError)?;
        if !bool::from(em_again[..self.n.len].ct_eq(&em_limbs[..self.n.len])) {
            return Err(SignError);
        }
        Ok(signature)
    }

    /// `em^d mod n` as `k` bytes: `m1 = em^dP mod p`, `m2 = em^dQ mod q`,
    /// `h = qInv (m1 - m2) mod p`, `s = m2 + h q` (RFC 8017, 5.1.2).
    fn private_operation(&self, em: &[u8]) -> Vec<u8> {
        let len = self.p.len;
        let mut em_limbs = [0; 2 * MAX_LIMBS];
        to_limbs(em, &mut em_limbs[..2 * len]);
        let (low, high) = em_limbs.split_at(len);
        let m1 = self
            .p
            .from_montgomery(&self.p.pow(&self.p.reduce(low, high), &self.dp));
        let m2 = self
            .q
            .from_montgomery(&self.q.pow(&self.q.reduce(low, high), &self.dq));
        // (m1 - m2) qInv in p's Montgomery form: m1 R + 2p - m2 R is positive and below 4p.
        let difference = self
            .p
            .sub(&self.p.to_montgomery(&m1), &self.p.to_montgomery(&m2));
        let h = self
            .p
            .from_montgomery(&self.p.mul(&difference, &self.p.to_montgomery(&self.q_inv)));
        let mut s = [0; 2 * MAX_LIMBS];
        multiply_add(
            &h[..len],
            &self.q.modulus[..len],
            &m2[..len],
            &mut s[..2 * len],
        );
        to_bytes(&s[..2 * len], self.size)
    }
}

/// Montgomery arithmetic modulo an odd `modulus` with `R = 2^(28 len) >= 16 modulus`:
/// products of numbers below `4 modulus` come out below `2 modulus`, so no subtraction is
/// needed between steps (only `from_montgomery` reduces fully).
#[derive(Clone)]
struct Montgomery {
    len: usize,
    modulus: Limbs,
    /// `-modulus^-1 mod 2^28`.
    neg_inv: u64,
    /// `R^2 mod modulus` and `R^3 mod modulus`, to enter Montgomery form.
    r2: Limbs,
    r3: Limbs,
    /// `2 modulus`, for subtraction without going negative.
    twice: Limbs,
}

impl Montgomery {
    /// `None` if `modulus` is even or does not fit `len` limbs with four bits to spare.
    fn new(modulus: &BigUint, len: usize) -> Option<Self> {
        if modulus.bits() + 4 > len * LIMB_BITS {
            return None;
        }
        let modulus_limbs = limbs(&modulus.to_bytes_be(), len)?;
        let low = modulus_limbs[0];
        if low & 1 == 0 {
            return None;
        }
        let r = BigUint::from(1u8) << (len * LIMB_BITS);
        let reduced = |power: BigUint| limbs(&(power % modulus).to_bytes_be(), len);
        // Newton's iteration doubles the correct low bits: 3 (any odd m is its own inverse modulo 8), 6, 12, 24, 48.
        let mut inverse = low;
        for _ in 0..4 {
            inverse = inverse.wrapping_mul(2u64.wrapping_sub(low.wrapping_mul(inverse)));
        }
        Some(Montgomery {
            len,
            modulus: modulus_limbs,
            neg_inv: inverse.wrapping_neg() & LIMB_MASK,
            r2: reduced(&r * &r)?,
            r3: reduced(&r * &r * &r)?,
            twice: limbs(&(modulus << 1).to_bytes_be(), len)?,
        })
    }

    /// `a b / R mod modulus`, below `2 modulus` if `a b < R modulus` (e.g. both factors
    /// below `4 modulus`, as `R >= 16 modulus`).
    /// Product scanning: column `i` of `a b + t modulus` is summed in one `u64`, the
    /// Montgomery digit `t[i]` chosen so that the column's low 28 bits are zero.
    fn mul(&self, a: &Limbs, b: &Limbs) -> Limbs {
        let (n, m) = (self.len, &self.modulus);
        let mut t = [0u64; MAX_LIMBS];
        let mut out = [0u64; MAX_LIMBS];
        let mut column = 0u64;
        for i in 0..n {
            for j in 0..i {
                column += a[j] * b[i - j] + t[j] * m[i - j];
            }
            column += a[i] * b[0];
            t[i] = column.wrapping_mul(self.neg_inv) & LIMB_MASK;
            column += t[i] * m[0];
            column >>= LIMB_BITS;
        }
        for i in n..2 * n - 1 {
            for j in i + 1 - n..n {
                column += a[j] * b[i - j] + t[j] * m[i - j];
            }
            out[i - n] = column & LIMB_MASK;
            column >>= LIMB_BITS;
        }
        out[n - 1] = column;
        out
    }

    /// `x R mod modulus` (below `2 modulus`) for any `x < R`.
    fn to_montgomery(&self, x: &Limbs) -> Limbs {
        self.mul(x, &self.r2)
    }

    /// `x / R mod modulus`, fully reduced, for `x < 4 modulus`.
    fn from_montgomery(&self, x: &Limbs) -> Limbs {
        let mut one = [0; MAX_LIMBS];
        one[0] = 1;
        // (x + t modulus) / R < (4 modulus + R modulus) / R <= modulus + 1.
        self.reduce_once(&self.mul(x, &one))
    }

    /// The number `high R + low` (both below `R`) in Montgomery form, below `4 modulus`.
    fn reduce(&self, low: &[u64], high: &[u64]) -> Limbs {
        let (mut l, mut h) = ([0; MAX_LIMBS], [0; MAX_LIMBS]);
        l[..self.len].copy_from_slice(&low[..self.len]);
        h[..self.len].copy_from_slice(&high[..self.len]);
        // low R^2 / R + high R^3 / R = (high R + low) R.
        add(&self.mul(&l, &self.r2), &self.mul(&h, &self.r3), self.len)
    }

    /// `a - b + 2 modulus` for `a, b < 2 modulus`: positive, below `4 modulus`.
    fn sub(&self, a: &Limbs, b: &Limbs) -> Limbs {
        let mut out = [0; MAX_LIMBS];
        let mut carry = 0i64;
        for i in 0..self.len {
            let limb = a[i] as i64 + self.twice[i] as i64 - b[i] as i64 + carry;
            out[i] = limb as u64 & LIMB_MASK;
            carry = limb >> LIMB_BITS;
        }
        out
    }

    /// `x mod modulus` for `x < 2 modulus`: subtracts, then keeps `x` instead where that
    /// borrowed, with a masked select.
    fn reduce_once(&self, x: &Limbs) -> Limbs {
        let mut difference = [0; MAX_LIMBS];
        let mut borrow = 0u64;
        for i in 0..self.len {
            let limb = x[i].wrapping_sub(self.modulus[i]).wrapping_sub(borrow);
            difference[i] = limb & LIMB_MASK;
            borrow = limb >> 63;
        }
        let x_is_smaller = borrow.ct_eq(&1);
        for (d, x) in difference.iter_mut().zip(x).take(self.len) {
            d.conditional_assign(x, x_is_smaller);
        }
        difference
    }

    /// `base^exponent` in Montgomery form (`base` in Montgomery form, below `4 modulus`),
    /// looking at every bit of the `len`-limb exponent: 4 squarings and one multiplication
    /// per 4-bit window, whatever the exponent.
    fn pow(&self, base: &Limbs, exponent: &Limbs) -> Limbs {
        let one = self.to_montgomery(&{
            let mut one = [0; MAX_LIMBS];
            one[0] = 1;
            one
        });
        let mut table = [one; 1 << WINDOW_BITS];
        for i in 1..table.len() {
            table[i] = self.mul(&table[i - 1], base);
        }
        let mut result = one;
        for limb in exponent[..self.len].iter().rev() {
            for shift in (0..LIMB_BITS).step_by(WINDOW_BITS).rev() {
                for _ in 0..WINDOW_BITS {
                    result = self.mul(&result, &result);
                }
                let window = (limb >> shift) & ((1 << WINDOW_BITS) - 1);
                result = self.mul(&result, &select(&table, window, self.len));
            }
        }
        result
    }

    /// `x^e mod modulus`, fully reduced, for a public `e` (variable time): square and multiply.
    fn pow_public(&self, x: &Limbs, e: &Limbs) -> Limbs {
        let x = self.to_montgomery(x);
        let mut result = x;
        let bits = (0..self.len * LIMB_BITS)
            .rev()
            .skip_while(|&bit| e[bit / LIMB_BITS] >> (bit % LIMB_BITS) & 1 == 0)
            .skip(1);
        for bit in bits {
            result = self.mul(&result, &result);
            if e[bit / LIMB_BITS] >> (bit % LIMB_BITS) & 1 == 1 {
                result = self.mul(&result, &x);
            }
        }
        self.from_montgomery(&result)
    }
}

/// `table[index]`, reading every entry (the index is secret).
fn select(table: &[Limbs], index: u64, len: usize) -> Limbs {
    let mut out = [0; MAX_LIMBS];
    for (i, entry) in table.iter().enumerate() {
        let chosen = (i as u64).ct_eq(&index);
        for (o, e) in out.iter_mut().zip(entry).take(len) {
            o.conditional_assign(e, chosen);
        }
    }
    out
}

/// `a + b` over `len` limbs (the caller knows the sum fits).
fn add(a: &Limbs, b: &Limbs, len: usize) -> Limbs {
    let mut out = [0; MAX_LIMBS];
    let mut carry = 0;
    for i in 0..len {
        let limb = a[i] + b[i] + carry;
        out[i] = limb & LIMB_MASK;
        carry = limb >> LIMB_BITS;
    }
    out
}

/// `out = a b + c`, `out` twice as long as `a`, `b` and `c` (so it fits).
fn multiply_add(a: &[u64], b: &[u64], c: &[u64], out: &mut [u64]) {
    let n = a.len();
    let mut column = 0u64;
    for (i, limb) in out.iter_mut().enumerate() {
        for j in i.saturating_sub(n - 1)..=i.min(n - 1) {
            column += a[j] * b[i - j];
        }
        if i < n {
            column += c[i];
        }
        *limb = column & LIMB_MASK;
        column >>= LIMB_BITS;
    }
}

/// Big-endian `bytes` as `len` limbs, `None` if the number does not fit.
fn limbs(bytes: &[u8], len: usize) -> Option<Limbs> {
    let mut out = [0; MAX_LIMBS];
    let significant = bytes.iter().skip_while(|&&b| b == 0);
    let bits = match significant.clone().next() {
        Some(first) => significant.count() * 8 - first.leading_zeros() as usize,
        None => 0,
    };
    (len <= MAX_LIMBS && bits <= len * LIMB_BITS).then(|| {
        to_limbs(bytes, &mut out[..len]);
        out
    })
}

/// Big-endian `bytes` into little-endian limbs; bits beyond `out` are dropped.
fn to_limbs(bytes: &[u8], out: &mut [u64]) {
    let (mut buffer, mut buffered, mut next) = (0u64, 0, 0);
    for &byte in bytes.iter().rev() {
        buffer |= u64::from(byte) << buffered;
        buffered += 8;
        if buffered >= LIMB_BITS {
            if let Some(limb) = out.get_mut(next) {
                *limb = buffer & LIMB_MASK;
            }
            (buffer, buffered, next) = (buffer >> LIMB_BITS, buffered - LIMB_BITS, next + 1);
        }
    }
    if let Some(limb) = out.get_mut(next) {
        *limb = buffer;
    }
}

/// Limbs as `size` big-endian bytes (higher bits dropped: callers know they are zero).
fn to_bytes(limbs: &[u64], size: usize) -> Vec<u8> {
    let mut out = vec![0u8; size];
    let (mut buffer, mut buffered) = (0u64, 0);
    let mut bytes = out.iter_mut().rev();
    for &limb in limbs {
        buffer |= limb << buffered;
        buffered += LIMB_BITS;
        while buffered >= 8 {
            if let Some(byte) = bytes.next() {
                *byte = buffer as u8;
            }
            (buffer, buffered) = (buffer >> 8, buffered - 8);
        }
    }
    if let Some(byte) = bytes.next() {
        *byte = buffer as u8;
    }
    out
}

/// `EM = 0x00 || 0x01 || 0xFF.. || 0x00 || DigestInfo || H`, `k` bytes (RFC 8017, 9.2).
fn encode(digest: &[u8], k: usize) -> Vec<u8> {
    let t_len = SHA256_DIGEST_INFO.len() + digest.len();
    let mut em = vec![0xffu8; k];
    em[0] = 0x00;
    em[1] = 0x01;
    em[k - t_len - 1] = 0x00;
    em[k - t_len..k - digest.len()].copy_from_slice(&SHA256_DIGEST_INFO);
    em[k - digest.len()..].copy_from_slice(digest);
    em
}

#[cfg(test)]
mod tests {
    use super::*;

    fn big(x: &Limbs, len: usize) -> BigUint {
        BigUint::from_bytes_be(&to_bytes(&x[..len], len * LIMB_BITS / 8 + 1))
    }

    #[test]
    fn debug_pieces() {
        let m = BigUint::parse_bytes(b"f123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef1", 16).unwrap();
        let len = (m.bits() + 4).div_ceil(LIMB_BITS);
        let ctx = Montgomery::new(&m, len).unwrap();
        assert_eq!(big(&ctx.modulus, len), m);
        let a = &m - 12345u32;
        let al = limbs(&a.to_bytes_be(), len).unwrap();
        assert_eq!(big(&al, len), a);
        let r = BigUint::from(1u8) << (len * LIMB_BITS);
        let am = ctx.to_montgomery(&al);
        assert_eq!(big(&am, len) % &m, (&a * &r) % &m, "to_montgomery");
        assert_eq!(big(&ctx.from_montgomery(&am), len), a, "round trip");
        let sq = ctx.from_montgomery(&ctx.mul(&am, &am));
        assert_eq!(big(&sq, len), (&a * &a) % &m, "square");
        let e = limbs(&[1, 0, 1], len).unwrap();
        assert_eq!(big(&ctx.pow_public(&al, &e), len), a.modpow(&BigUint::from(65537u32), &m));
        let p = ctx.from_montgomery(&ctx.pow(&am, &e));
        assert_eq!(big(&p, len), a.modpow(&BigUint::from(65537u32), &m), "pow");
    }
}
