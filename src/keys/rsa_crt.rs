//! RSASSA-PKCS1-v1_5 with SHA-256: the private-key operation with the Chinese remainder
//! theorem on a small constant-time Montgomery arithmetic, written for WebAssembly.
//!
//! Why not the `rsa` crate's signer: its `num-bigint-dig` arithmetic is variable-time and
//! about three times as slow in V8 (`examples/sign_bench.rs` measures both). Wasm has no
//! 64×64→128-bit multiply, so numbers here are 28-bit limbs held in `u64`s: a limb product
//! takes 56 bits, and a whole column of a Montgomery product (up to 2 L limb products) is
//! summed without carrying after every step: in a `u64` up to 127 limbs (every prime, and
//! `n` up to 3072 bits), in a `u128` beyond (`n` of a 4096-bit key, only for the public-key
//! check), picked at compile time from `L` ([`Column`]). Squarings compute each cross
//! product once. With one factor's limbs reversed, a column is a plain dot product, which
//! the plugin's build computes four limb products at a time with Wasm SIMD
//! (`u64x2.extmul_*_u32x4`; [`dot`]). The `rsa` crate parses keys and is the reference of
//! the differential tests; keys of other shapes are refused at load ([`RsaCrtKey::new`]).
//!
//! A signature can be computed in steps ([`RsaCrtKey::start`], [`RsaSigning::advance`]),
//! so that the worker thread signing it can serve other requests in between.
//!
//! Constant time: the loops run over all limbs of the modulus and all bits of the
//! fixed-width exponent; their counts depend only on the key's public bit lengths. The
//! exponentiation uses a fixed 4-bit window whose table entry is picked by reading every
//! entry and keeping one with `subtle`'s masked `conditional_assign`, and the only
//! conditional subtraction (`reduce_once`) is a masked select as well. Key set-up
//! (`R^2 mod p`, ...) uses the `rsa` crate's variable-time arithmetic once, at load.
//!
//! Every signature is checked with the public key (`s^e mod n`, here too, with `n` and `e`
//! as loaded) before it is released: a computation fault in one CRT half would otherwise
//! reveal a prime factor.
//!
//! Secrets are wiped when dropped (`zeroize`): the key's primes with their Montgomery
//! constants, `dP`, `dQ`, `qInv`, and a signature's power table, running result and `m1`.
//! Copies in the arithmetic's stack temporaries are not.

use rsa::traits::{PrivateKeyParts, PublicKeyParts};
use rsa::{BigUint, RsaPrivateKey};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::{ConditionallySelectable, ConstantTimeEq};

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::{KeyError, SignError};

/// Bits per limb: 2 × 28 + 8 bits of headroom for summing limb products.
const LIMB_BITS: usize = 28;
const LIMB_MASK: u64 = (1 << LIMB_BITS) - 1;
/// Largest modulus signed: the largest size class below (`n` in 148 limbs).
pub const MAX_MODULUS_BITS: usize = 4096;
/// Largest prime that fits the largest size class: 74 limbs less the four spare bits.
pub const MAX_PRIME_BITS: usize = 74 * LIMB_BITS - 4;
/// Most limbs whose column sums fit a `u64`: `2 L` products below `2^56` each, and a carry.
const NARROW_LIMBS: usize = 127;
/// Most limbs of any modulus: [`dot`] sums up to `L` products in a `u64`.
const MAX_LIMBS: usize = 255;
const _: () = {
    let product = (LIMB_MASK as u128) * (LIMB_MASK as u128);
    assert!(2 * NARROW_LIMBS as u128 * product + (1 << 36) <= u64::MAX as u128);
    assert!(MAX_LIMBS as u128 * product <= u64::MAX as u128);
};
/// Exponent bits per window of the exponentiation.
const WINDOW_BITS: usize = 4;

/// DER of `DigestInfo { sha256, NULL }` without the digest (RFC 8017, section 9.2, note 1).
const SHA256_DIGEST_INFO: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// A number below `2^(28 L)`: `L` little-endian 28-bit limbs.
type Limbs<const L: usize> = [u64; L];

/// A two-prime RSA key (up to 4096 bits) prepared for CRT signing.
#[derive(Clone)]
pub struct RsaCrtKey(BySize);

/// By size, the smallest class whose limbs hold both primes (with the four bits to spare
/// that [`Montgomery`] needs): primes of up to 1032 bits in 37 limbs and `n` in 74, up to
/// 1536 bits in 55 and 110, up to 2068 bits in 74 and 148. Each class is compiled for its
/// sizes, so a 2048-bit key never pays for the 4096-bit one's wider column sums.
#[derive(Clone)]
enum BySize {
    Bits2048(Arc<CrtKey<37, 74>>),
    Bits3072(Arc<CrtKey<55, 110>>),
    Bits4096(Arc<CrtKey<74, 148>>),
}

impl RsaCrtKey {
    /// Prepares `key` for CRT signing; refuses what this module does not sign: more than
    /// two primes, a modulus over 4096 bits, or a prime too long for the largest class.
    pub fn new(key: &RsaPrivateKey) -> Result<Self, KeyError> {
        let primes = key.primes();
        if primes.len() != 2 {
            return Err(KeyError::MultiPrime(primes.len()));
        }
        let modulus_bits = key.n().bits();
        if modulus_bits > MAX_MODULUS_BITS {
            return Err(KeyError::RsaKeyTooLong(modulus_bits));
        }
        let prime_bits = primes.iter().map(BigUint::bits).max().unwrap_or(0);
        if prime_bits > MAX_PRIME_BITS {
            return Err(KeyError::RsaPrimeTooLong {
                modulus_bits,
                prime_bits,
            });
        }
        let sized = CrtKey::new(key)
            .map(|key| BySize::Bits2048(Arc::new(key)))
            .or_else(|| CrtKey::new(key).map(|key| BySize::Bits3072(Arc::new(key))))
            .or_else(|| CrtKey::new(key).map(|key| BySize::Bits4096(Arc::new(key))))
            .ok_or(KeyError::RsaKeyUnusable)?;
        Ok(RsaCrtKey(sized))
    }

    /// The RSASSA-PKCS1-v1_5 SHA-256 signature of `message`, `k` bytes, checked with the
    /// public key before it is returned.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let mut signing = self.start(message);
        loop {
            if let Some(result) = signing.advance(usize::MAX) {
                return result;
            }
        }
    }

    /// The same signature, computed a few exponent windows at a time by
    /// [`RsaSigning::advance`], so that a worker can serve other requests in between.
    pub fn start(&self, message: &[u8]) -> RsaSigning {
        let digest = Sha256::digest(message);
        let signing = match &self.0 {
            BySize::Bits2048(key) => {
                CrtSigning::new(key, &digest).map(|s| SigningBySize::Bits2048(Box::new(s)))
            }
            BySize::Bits3072(key) => {
                CrtSigning::new(key, &digest).map(|s| SigningBySize::Bits3072(Box::new(s)))
            }
            BySize::Bits4096(key) => {
                CrtSigning::new(key, &digest).map(|s| SigningBySize::Bits4096(Box::new(s)))
            }
        };
        RsaSigning(signing.unwrap_or(SigningBySize::Refused))
    }
}

/// An RSA signature under way (see [`RsaCrtKey::start`]).
pub struct RsaSigning(SigningBySize);

enum SigningBySize {
    Bits2048(Box<CrtSigning<37, 74>>),
    Bits3072(Box<CrtSigning<55, 110>>),
    Bits4096(Box<CrtSigning<74, 148>>),
    /// The encoded message did not fit the key (cannot happen for a key `new` took).
    Refused,
}

impl RsaSigning {
    /// Units that take about as long as four 2048-bit ones (20–40 µs in V8): a unit's cost
    /// grows with the square of the prime's limbs.
    pub fn units_per_step(&self) -> usize {
        match &self.0 {
            SigningBySize::Bits2048(_) | SigningBySize::Refused => 4,
            SigningBySize::Bits3072(_) => 2,
            SigningBySize::Bits4096(_) => 1,
        }
    }

    /// Does up to `windows` units of work (one unit: one 4-bit window of a half
    /// exponentiation, four modular squarings and a product, 5–10 µs for 2048 bits
    /// in V8, about 2× for 3072 and 4× for 4096; or the recombination; or a bit of `e`
    /// in the public-key check, a squaring modulo `n` that costs about as much as a
    /// window). With `e = 65537` a signature is 535, 787 and 1053 units. `Some` once the
    /// signature is done.
    pub fn advance(&mut self, windows: usize) -> Option<Result<Vec<u8>, SignError>> {
        match &mut self.0 {
            SigningBySize::Bits2048(signing) => signing.advance(windows),
            SigningBySize::Bits3072(signing) => signing.advance(windows),
            SigningBySize::Bits4096(signing) => signing.advance(windows),
            SigningBySize::Refused => Some(Err(SignError)),
        }
    }
}

/// The private operation of one signature in steps: `em^dP mod p`, then `em^dQ mod q`,
/// then the recombination, then the public-key check a bit of `e` at a time (in one go it
/// would be the longest step by far: 17 products modulo `n`, some 16 windows' worth).
struct CrtSigning<const P: usize, const N: usize> {
    key: Arc<CrtKey<P, N>>,
    em: Limbs<N>,
    /// `em^dP mod p` once the first half is done.
    m1: Option<Limbs<P>>,
    /// The exponentiation under way: modulo `p` while `m1` is `None`, then modulo `q`.
    power: Power<P>,
    /// `s^e mod n` for the recombined signature `s`, once both halves are done.
    check: Option<PublicPower<N>>,
}

impl<const P: usize, const N: usize> CrtSigning<P, N> {
    fn new(key: &Arc<CrtKey<P, N>>, digest: &[u8]) -> Option<Self> {
        let em: Limbs<N> = limbs(&encode(digest, key.size))?;
        let power = Power::new(&key.p, &key.p.reduce_halves(&em));
        Some(CrtSigning {
            key: Arc::clone(key),
            em,
            m1: None,
            power,
            check: None,
        })
    }

    fn advance(&mut self, mut windows: usize) -> Option<Result<Vec<u8>, SignError>> {
        let key = Arc::clone(&self.key);
        while windows > 0 {
            if let Some(check) = &mut self.check {
                let em_again = check.advance(&key.n, &key.e, &mut windows)?;
                // Released only if it verifies: a faulty CRT signature reveals a prime.
                return Some(if bool::from(em_again.ct_eq(&self.em)) {
                    Ok(to_bytes(&check.x, key.size))
                } else {
                    Err(SignError)
                });
            }
            let (modulus, exponent) = match self.m1 {
                None => (&key.p, &key.dp),
                Some(_) => (&key.q, &key.dq),
            };
            let done = Zeroizing::new(self.power.advance(modulus, exponent, &mut windows)?);
            match &self.m1 {
                None => {
                    self.m1 = Some(key.p.leave_montgomery(&done));
                    self.power = Power::new(&key.q, &key.q.reduce_halves(&self.em));
                }
                Some(_) if windows == 0 => return None, // `power` keeps its result
                Some(m1) => {
                    // The recombination is a unit of its own.
                    windows -= 1;
                    let m2 = Zeroizing::new(key.q.leave_montgomery(&done));
                    let signature = Zeroizing::new(key.combine(m1, &m2));
                    self.check = Some(PublicPower::new(&key.n, &signature, &key.e));
                }
            }
        }
        None
    }
}

impl<const P: usize, const N: usize> Drop for CrtSigning<P, N> {
    fn drop(&mut self) {
        // In place: zeroize's `Option` impl ends by writing a `None`, whose payload bytes
        // are undefined (seen holding a stack copy of `m1`). `power` wipes itself; `em`
        // is public.
        if let Some(m1) = &mut self.m1 {
            m1.zeroize();
        }
    }
}

impl<const P: usize, const N: usize> ZeroizeOnDrop for CrtSigning<P, N> {}

/// The key with primes in `P` limbs and the modulus in `N = 2 P`.
#[derive(Clone)]
struct CrtKey<const P: usize, const N: usize> {
    /// Modulus size in bytes (`k` in RFC 8017).
    size: usize,
    n: Montgomery<N>,
    e: Limbs<N>,
    p: Montgomery<P>,
    q: Montgomery<P>,
    /// `d mod (p - 1)`, `d mod (q - 1)`, `q^-1 mod p` (PKCS#1 `exponent1`, ... `coefficient`).
    dp: Limbs<P>,
    dq: Limbs<P>,
    q_inv: Limbs<P>,
}

impl<const P: usize, const N: usize> CrtKey<P, N> {
    /// `None` unless `key` has two primes that fit `P` limbs (and so `n` fits `N`).
    fn new(key: &RsaPrivateKey) -> Option<Self> {
        let [p, q] = key.primes() else {
            return None;
        };
        if N != 2 * P {
            return None;
        }
        // The primes first: they decide the class, and a miss costs nothing then.
        let (p, q) = (Montgomery::new(p)?, Montgomery::new(q)?);
        Some(CrtKey {
            size: key.size(),
            n: Montgomery::new(key.n())?,
            e: limbs(&key.e().to_bytes_be())?,
            p,
            q,
            dp: secret_limbs(key.dp()?)?,
            dq: secret_limbs(key.dq()?)?,
            q_inv: secret_limbs(&Zeroizing::new(key.crt_coefficient()?))?,
        })
    }

    /// `h = qInv (m1 - m2) mod p`, `s = m2 + h q` (RFC 8017, 5.1.2).
    fn combine(&self, m1: &Limbs<P>, m2: &Limbs<P>) -> Limbs<N> {
        // (m1 - m2) qInv in p's Montgomery form: m1 R + 2p - m2 R is positive and below 4p.
        let difference = Zeroizing::new(
            self.p
                .sub(&self.p.enter_montgomery(m1), &self.p.enter_montgomery(m2)),
        );
        let q_inv = Zeroizing::new(self.p.enter_montgomery(&self.q_inv));
        let h = Zeroizing::new(self.p.leave_montgomery(&self.p.mul(&difference, &q_inv)));
        multiply_add(&h, &self.q.modulus, m2)
    }

    /// The signature of `digest` in one go.
    #[cfg(test)]
    fn sign(&self, digest: &[u8]) -> Result<Vec<u8>, SignError> {
        let mut signing = CrtSigning::new(&Arc::new(self.clone()), digest).ok_or(SignError)?;
        signing.advance(usize::MAX).expect("all windows done")
    }

    /// `em^d mod n` in one go.
    #[cfg(test)]
    fn private_operation(&self, em: &Limbs<N>) -> Limbs<N> {
        let half = |m: &Montgomery<P>, d: &Limbs<P>| {
            m.leave_montgomery(&Power::new(m, &m.reduce_halves(em)).finish(m, d))
        };
        self.combine(&half(&self.p, &self.dp), &half(&self.q, &self.dq))
    }
}

impl<const P: usize, const N: usize> Drop for CrtKey<P, N> {
    fn drop(&mut self) {
        // `p`, `q` (and the public `n`) wipe themselves.
        self.dp.zeroize();
        self.dq.zeroize();
        self.q_inv.zeroize();
    }
}

impl<const P: usize, const N: usize> ZeroizeOnDrop for CrtKey<P, N> {}

/// Montgomery arithmetic modulo an odd `modulus` with `R = 2^(28 L) >= 16 modulus`:
/// products of numbers below `4 modulus` come out below `2 modulus`, so no subtraction is
/// needed between steps (only `leave_montgomery` reduces fully).
#[derive(Clone)]
struct Montgomery<const L: usize> {
    modulus: Limbs<L>,
    /// `-modulus^-1 mod 2^28`.
    neg_inv: u64,
    /// `R^2 mod modulus` and `R^3 mod modulus`, to enter Montgomery form.
    r2: Limbs<L>,
    r3: Limbs<L>,
    /// `2 modulus`, for subtraction without going negative.
    twice: Limbs<L>,
    /// The limbs of `modulus` in reverse order, as the product loops read them.
    modulus_reversed: [u32; L],
}

impl<const L: usize> Montgomery<L> {
    /// `None` if `modulus` is even or does not fit `L` limbs with four bits to spare.
    /// Everything derived from a prime is secret (`R mod p` reveals `p` with `n`).
    fn new(modulus: &BigUint) -> Option<Self> {
        if L > MAX_LIMBS || modulus.bits() + 4 > L * LIMB_BITS {
            return None;
        }
        let modulus_limbs = Zeroizing::new(secret_limbs::<L>(modulus)?);
        let low = modulus_limbs[0];
        if low & 1 == 0 {
            return None;
        }
        let r = BigUint::from(1u8) << (L * LIMB_BITS);
        let reduced = |power: BigUint| secret_limbs(&Zeroizing::new(power % modulus));
        // Newton's iteration doubles the correct low bits: 3 (any odd m is its own inverse
        // modulo 8), 6, 12, 24, 48.
        let mut inverse = low;
        for _ in 0..4 {
            inverse = inverse.wrapping_mul(2u64.wrapping_sub(low.wrapping_mul(inverse)));
        }
        Some(Montgomery {
            neg_inv: inverse.wrapping_neg() & LIMB_MASK,
            r2: reduced(&r * &r)?,
            r3: reduced(&r * &r * &r)?,
            twice: secret_limbs(&Zeroizing::new(modulus << 1))?,
            modulus_reversed: reversed(&modulus_limbs),
            modulus: *modulus_limbs,
        })
    }

    /// `a b / R mod modulus`, below `2 modulus` if `a b < R modulus` (e.g. both factors
    /// below `4 modulus`, as `R >= 16 modulus`).
    fn mul(&self, a: &Limbs<L>, b: &Limbs<L>) -> Limbs<L> {
        let (a, b_reversed) = (narrow(a), reversed(b));
        // Column `from..to`: the sum of a[j] b[from + to - 1 - j] = b_reversed[L - to + j - from].
        self.reduce_product(|from, to| dot(&a[from..to], &b_reversed[L - to..L - from]))
    }

    /// `a a / R mod modulus`, as [`Montgomery::mul`] but a quarter fewer limb products:
    /// each cross product of a column is computed once and doubled.
    fn square(&self, a: &Limbs<L>) -> Limbs<L> {
        let (a, a_reversed) = (narrow(a), reversed(a));
        self.reduce_product(|from, to| {
            let half = (to - from) / 2;
            let cross = dot(&a[from..from + half], &a_reversed[L - to..L - to + half]);
            let middle = if (to - from) % 2 == 1 {
                u64::from(a[from + half]).pow(2)
            } else {
                0
            };
            2 * cross + middle
        })
    }

    /// `(x + t modulus) / R` for the product `x` whose column over limbs `from..to` (the
    /// sum of `x_j y_(from+to-1-j)`) is `product_column(from, to)`. Product scanning: each
    /// column of `x + t modulus` is summed in one [`Column`], the Montgomery digit `t[i]`
    /// chosen so that the column's low 28 bits are zero. A column sums up to `2 L` limb
    /// products and a carry: below `2^64` up to [`NARROW_LIMBS`], else in a `u128` (this
    /// branch is on a constant, so each size keeps one loop).
    fn reduce_product(&self, product_column: impl Fn(usize, usize) -> u64) -> Limbs<L> {
        if L <= NARROW_LIMBS {
            self.reduce_product_in::<u64>(product_column)
        } else {
            self.reduce_product_in::<u128>(product_column)
        }
    }

    #[inline(always)]
    fn reduce_product_in<C: Column>(
        &self,
        product_column: impl Fn(usize, usize) -> u64,
    ) -> Limbs<L> {
        let m = &self.modulus_reversed;
        let mut t = [0u32; L];
        let mut out = [0u64; L];
        let mut column = C::ZERO;
        for i in 0..L {
            // The sum of t[j] modulus[i - j] for j < i (each `dot` alone fits a u64).
            column = column
                .plus(product_column(0, i + 1))
                .plus(dot(&t[..i], &m[L - 1 - i..L - 1]));
            let digit = column.low().wrapping_mul(self.neg_inv) & LIMB_MASK;
            t[i] = digit as u32;
            column = column.plus(digit * self.modulus[0]).carry();
        }
        for i in L..2 * L - 1 {
            let from = i + 1 - L;
            // The sum of t[j] modulus[i - j] for j from `from`.
            column = column
                .plus(product_column(from, L))
                .plus(dot(&t[from..], &m[..L - from]));
            out[i - L] = column.low() & LIMB_MASK;
            column = column.carry();
        }
        out[L - 1] = column.low();
        out
    }

    /// `x R mod modulus` (below `2 modulus`) for any `x < R`.
    fn enter_montgomery(&self, x: &Limbs<L>) -> Limbs<L> {
        self.mul(x, &self.r2)
    }

    /// `x / R mod modulus`, fully reduced, for `x < 4 modulus`.
    fn leave_montgomery(&self, x: &Limbs<L>) -> Limbs<L> {
        let mut one = [0; L];
        one[0] = 1;
        // (x + t modulus) / R < (4 modulus + R modulus) / R <= modulus + 1.
        self.reduce_once(&self.mul(x, &one))
    }

    /// The number `high R + low` (both below `R`) in Montgomery form, below `4 modulus`.
    fn reduce(&self, low: &Limbs<L>, high: &Limbs<L>) -> Limbs<L> {
        // low R^2 / R + high R^3 / R = (high R + low) R.
        add(&self.mul(low, &self.r2), &self.mul(high, &self.r3))
    }

    /// `x mod modulus` in Montgomery form, below `4 modulus`, for `x` of `M = 2 L` limbs.
    fn reduce_halves<const M: usize>(&self, x: &Limbs<M>) -> Limbs<L> {
        let low: Limbs<L> = std::array::from_fn(|i| x[i]);
        let high: Limbs<L> = std::array::from_fn(|i| x.get(L + i).copied().unwrap_or(0));
        self.reduce(&low, &high)
    }

    /// `a - b + 2 modulus` for `a, b < 2 modulus`: positive, below `4 modulus`.
    fn sub(&self, a: &Limbs<L>, b: &Limbs<L>) -> Limbs<L> {
        let mut out = [0; L];
        let mut carry = 0i64;
        for i in 0..L {
            let limb = a[i] as i64 + self.twice[i] as i64 - b[i] as i64 + carry;
            out[i] = limb as u64 & LIMB_MASK;
            carry = limb >> LIMB_BITS;
        }
        out
    }

    /// `x mod modulus` for `x < 2 modulus`: subtracts, then keeps `x` instead where that
    /// borrowed, with a masked select.
    fn reduce_once(&self, x: &Limbs<L>) -> Limbs<L> {
        let mut difference = [0; L];
        let mut borrow = 0u64;
        for i in 0..L {
            let limb = x[i].wrapping_sub(self.modulus[i]).wrapping_sub(borrow);
            difference[i] = limb & LIMB_MASK;
            borrow = limb >> 63;
        }
        let x_is_smaller = borrow.ct_eq(&1);
        for (d, x) in difference.iter_mut().zip(x) {
            d.conditional_assign(x, x_is_smaller);
        }
        difference
    }

    /// `x^e mod modulus`, fully reduced, for a public `e`, in one go.
    #[cfg(test)]
    fn pow_public(&self, x: &Limbs<L>, e: &Limbs<L>) -> Limbs<L> {
        let mut all = usize::MAX;
        PublicPower::new(self, x, e)
            .advance(self, e, &mut all)
            .expect("all bits done")
    }
}

impl<const L: usize> Drop for Montgomery<L> {
    fn drop(&mut self) {
        self.modulus.zeroize();
        self.neg_inv.zeroize();
        self.r2.zeroize();
        self.r3.zeroize();
        self.twice.zeroize();
        self.modulus_reversed.zeroize();
    }
}

impl<const L: usize> ZeroizeOnDrop for Montgomery<L> {}

/// A column sum of [`Montgomery::reduce_product`]: `u64` where it fits, else `u128`.
trait Column: Copy {
    const ZERO: Self;
    /// `self + x`.
    fn plus(self, x: u64) -> Self;
    /// The low 64 bits.
    fn low(self) -> u64;
    /// `self >> LIMB_BITS`: what carries into the next column.
    fn carry(self) -> Self;
}

impl Column for u64 {
    const ZERO: Self = 0;
    #[inline(always)]
    fn plus(self, x: u64) -> Self {
        self + x
    }
    #[inline(always)]
    fn low(self) -> u64 {
        self
    }
    #[inline(always)]
    fn carry(self) -> Self {
        self >> LIMB_BITS
    }
}

impl Column for u128 {
    const ZERO: Self = 0;
    #[inline(always)]
    fn plus(self, x: u64) -> Self {
        self + u128::from(x)
    }
    #[inline(always)]
    fn low(self) -> u64 {
        self as u64
    }
    #[inline(always)]
    fn carry(self) -> Self {
        self >> LIMB_BITS
    }
}

/// `x^e mod modulus` for a public `e` (variable time in `e` only): square and multiply, a
/// bit of `e` at a time from the top.
struct PublicPower<const L: usize> {
    /// `x` itself (the signature, once it verifies), and in Montgomery form.
    x: Limbs<L>,
    base: Limbs<L>,
    result: Limbs<L>,
    /// Bits of `e` still to do, below its top one.
    bits_left: usize,
}

impl<const L: usize> PublicPower<L> {
    fn new(m: &Montgomery<L>, x: &Limbs<L>, e: &Limbs<L>) -> Self {
        let base = m.enter_montgomery(x);
        let top = (0..L * LIMB_BITS).rev().find(|&bit| bit_of(e, bit));
        PublicPower {
            x: *x,
            base,
            result: base,
            bits_left: top.unwrap_or(0),
        }
    }

    /// Works through up to `*units` more bits of `e` (one squaring, and a product where
    /// the bit is set, each); the power, fully reduced, once the last one is done.
    fn advance(&mut self, m: &Montgomery<L>, e: &Limbs<L>, units: &mut usize) -> Option<Limbs<L>> {
        while self.bits_left > 0 {
            if *units == 0 {
                return None;
            }
            self.bits_left -= 1;
            self.result = m.square(&self.result);
            if bit_of(e, self.bits_left) {
                self.result = m.mul(&self.result, &self.base);
            }
            *units -= 1;
        }
        Some(m.leave_montgomery(&self.result))
    }
}

impl<const L: usize> Drop for PublicPower<L> {
    /// A signature that fails the check reveals a prime: wiped like the secrets.
    fn drop(&mut self) {
        self.x.zeroize();
        self.base.zeroize();
        self.result.zeroize();
    }
}

impl<const L: usize> ZeroizeOnDrop for PublicPower<L> {}

/// Bit `bit` of `x`.
fn bit_of<const L: usize>(x: &Limbs<L>, bit: usize) -> bool {
    x[bit / LIMB_BITS] >> (bit % LIMB_BITS) & 1 == 1
}

/// `base^exponent` in Montgomery form (`base` in Montgomery form, below `4 modulus`),
/// a window at a time, looking at every bit of the exponent: 4 squarings and one
/// multiplication per 4-bit window, whatever the exponent.
struct Power<const L: usize> {
    /// `base^0 .. base^15`.
    table: [Limbs<L>; 1 << WINDOW_BITS],
    result: Limbs<L>,
    /// Windows done, from the most significant one.
    windows_done: usize,
}

impl<const L: usize> Power<L> {
    const WINDOWS_PER_LIMB: usize = LIMB_BITS / WINDOW_BITS;

    fn new(m: &Montgomery<L>, base: &Limbs<L>) -> Self {
        let mut one = [0; L];
        one[0] = 1;
        let one = m.enter_montgomery(&one);
        let mut table = [one; 1 << WINDOW_BITS];
        for i in 1..table.len() {
            table[i] = m.mul(&table[i - 1], base);
        }
        Power {
            table,
            result: one,
            windows_done: 0,
        }
    }

    /// Works through up to `*windows` more windows of `exponent` (counting them off);
    /// the result once the last one is done.
    fn advance(
        &mut self,
        m: &Montgomery<L>,
        exponent: &Limbs<L>,
        windows: &mut usize,
    ) -> Option<Limbs<L>> {
        let total = L * Self::WINDOWS_PER_LIMB;
        while self.windows_done < total {
            if *windows == 0 {
                return None;
            }
            let from_top = self.windows_done;
            let limb = exponent[L - 1 - from_top / Self::WINDOWS_PER_LIMB];
            let shift =
                (Self::WINDOWS_PER_LIMB - 1 - from_top % Self::WINDOWS_PER_LIMB) * WINDOW_BITS;
            for _ in 0..WINDOW_BITS {
                self.result = m.square(&self.result);
            }
            let window = (limb >> shift) & ((1 << WINDOW_BITS) - 1);
            self.result = m.mul(&self.result, &select(&self.table, window));
            self.windows_done += 1;
            *windows -= 1;
        }
        Some(self.result)
    }

    /// The whole exponentiation.
    #[cfg(test)]
    fn finish(mut self, m: &Montgomery<L>, exponent: &Limbs<L>) -> Limbs<L> {
        let mut all = usize::MAX;
        self.advance(m, exponent, &mut all)
            .expect("all windows done")
    }
}

impl<const L: usize> Drop for Power<L> {
    fn drop(&mut self) {
        self.table.zeroize();
        self.result.zeroize();
    }
}

impl<const L: usize> ZeroizeOnDrop for Power<L> {}

/// Limbs (below 2^28 each) as `u32`s, the lanes the product loops multiply.
fn narrow<const L: usize>(x: &Limbs<L>) -> [u32; L] {
    std::array::from_fn(|i| x[i] as u32)
}

/// [`narrow`], last limb first: a column of a product pairs limbs from opposite ends, so
/// with one factor reversed it is a plain dot product of two runs of limbs.
fn reversed<const L: usize>(x: &Limbs<L>) -> [u32; L] {
    std::array::from_fn(|i| x[L - 1 - i] as u32)
}

/// `Σ a[j] b[j]` over two slices of the same length: the innermost loop of a signature.
/// Each product takes 56 bits and a run has at most [`MAX_LIMBS`], so the sum fits a `u64`.
fn dot(a: &[u32], b: &[u32]) -> u64 {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return simd::dot(a, b);
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    return dot_scalar(a, b);
}

fn dot_scalar(a: &[u32], b: &[u32]) -> u64 {
    a.iter()
        .zip(b)
        .map(|(&a, &b)| u64::from(a) * u64::from(b))
        .sum()
}

/// [`dot`] with Wasm SIMD (the plugin's build enables `simd128`; V8 has it): four limb
/// products per pair of instructions (`u64x2.extmul_{low,high}_u32x4`, `pmuludq` on x86).
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd {
    use core::arch::wasm32::{
        u64x2_add, u64x2_extmul_high_u32x4, u64x2_extmul_low_u32x4, u64x2_extract_lane,
        u64x2_splat, v128, v128_load,
    };

    pub fn dot(a: &[u32], b: &[u32]) -> u64 {
        // One `v128.load` of four limbs (built lane by lane, LLVM splits the products).
        // SAFETY: `chunks_exact(4)` gives slices of exactly 16 bytes; Wasm loads need no
        // alignment.
        let lanes = |x: &[u32]| -> v128 { unsafe { v128_load(x.as_ptr().cast()) } };
        let (a4, b4) = (a.chunks_exact(4), b.chunks_exact(4));
        let rest = super::dot_scalar(a4.remainder(), b4.remainder());
        let mut sums = u64x2_splat(0);
        for (x, y) in a4.zip(b4) {
            let (x, y) = (lanes(x), lanes(y));
            let products = u64x2_add(u64x2_extmul_low_u32x4(x, y), u64x2_extmul_high_u32x4(x, y));
            sums = u64x2_add(sums, products);
        }
        u64x2_extract_lane::<0>(sums) + u64x2_extract_lane::<1>(sums) + rest
    }
}

/// `table[index]`, reading every entry (the index is secret).
fn select<const L: usize>(table: &[Limbs<L>], index: u64) -> Limbs<L> {
    let mut out = [0; L];
    for (i, entry) in table.iter().enumerate() {
        let chosen = (i as u64).ct_eq(&index);
        for (o, e) in out.iter_mut().zip(entry) {
            o.conditional_assign(e, chosen);
        }
    }
    out
}

/// `a + b` (the caller knows the sum fits).
fn add<const L: usize>(a: &Limbs<L>, b: &Limbs<L>) -> Limbs<L> {
    let mut out = [0; L];
    let mut carry = 0;
    for i in 0..L {
        let limb = a[i] + b[i] + carry;
        out[i] = limb & LIMB_MASK;
        carry = limb >> LIMB_BITS;
    }
    out
}

/// `a b + c` in twice the limbs (`N = 2 P`, so it fits).
fn multiply_add<const P: usize, const N: usize>(
    a: &Limbs<P>,
    b: &Limbs<P>,
    c: &Limbs<P>,
) -> Limbs<N> {
    let mut out = [0; N];
    let mut column = 0u64;
    for (i, limb) in out.iter_mut().enumerate() {
        for j in i.saturating_sub(P - 1)..=i.min(P - 1) {
            column += a[j] * b[i - j];
        }
        if i < P {
            column += c[i];
        }
        *limb = column & LIMB_MASK;
        column >>= LIMB_BITS;
    }
    out
}

/// A secret number as `L` limbs (see [`limbs`]), its big-endian bytes wiped after.
fn secret_limbs<const L: usize>(x: &BigUint) -> Option<Limbs<L>> {
    let mut bytes = x.to_bytes_be();
    let out = limbs(&bytes);
    bytes.as_mut_slice().zeroize();
    out
}

/// Big-endian `bytes` as `L` limbs, `None` if the number does not fit.
fn limbs<const L: usize>(bytes: &[u8]) -> Option<Limbs<L>> {
    let mut out = [0; L];
    let significant = bytes.iter().skip_while(|&&b| b == 0);
    let bits = match significant.clone().next() {
        Some(first) => significant.count() * 8 - first.leading_zeros() as usize,
        None => 0,
    };
    (bits <= L * LIMB_BITS).then(|| {
        to_limbs(bytes, &mut out);
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
    use rsa::pkcs8::DecodePrivateKey;

    fn fixture() -> RsaPrivateKey {
        RsaPrivateKey::from_pkcs8_pem(crate::keys::tests::KEY_PKCS8).unwrap()
    }

    fn crt_2048(key: &RsaPrivateKey) -> CrtKey<37, 74> {
        CrtKey::new(key).expect("2048-bit two-prime key")
    }

    /// The private operation on chosen representatives, against `em^d mod n`.
    fn check_representatives(key: &RsaPrivateKey) {
        let crt = crt_2048(key);
        let [p, q] = key.primes() else {
            panic!("two primes")
        };
        let n = key.n();
        let one = BigUint::from(1u8);
        let chosen = [
            BigUint::from(0u8),
            one.clone(),
            BigUint::from(2u8),
            p - &one,
            p.clone(),
            p + &one,
            q - &one,
            q.clone(),
            q + &one,
            p * BigUint::from(3u8),
            q * BigUint::from(5u8) + &one,
            n - &one,
            n - p,
            (&one << 2040) - &one,
        ];
        for em in &chosen {
            let em_limbs: Limbs<74> = limbs(&em.to_bytes_be()).unwrap();
            let s = crt.private_operation(&em_limbs);
            let expected = em.modpow(key.d(), n);
            assert_eq!(
                BigUint::from_bytes_be(&to_bytes(&s, 256)),
                expected,
                "em = {em:x}"
            );
        }
    }

    #[test]
    fn private_operation_is_em_to_the_d_near_p_q_and_n_in_both_prime_orders() {
        let key = fixture();
        check_representatives(&key);
        let [p, q] = key.primes() else {
            panic!("two primes")
        };
        let swapped = RsaPrivateKey::from_components(
            key.n().clone(),
            key.e().clone(),
            key.d().clone(),
            vec![q.clone(), p.clone()],
        )
        .unwrap();
        assert_ne!(p < q, swapped.primes()[0] < swapped.primes()[1]);
        check_representatives(&swapped);
    }

    #[test]
    fn signing_in_steps_of_any_size_gives_the_same_signature() {
        let key = RsaCrtKey::new(&fixture()).unwrap();
        let whole = key.sign(b"message").unwrap();
        for windows in [1, 3, 7, 259, 260, 517, 518, 519, 534, 535] {
            let mut signing = key.start(b"message");
            let mut calls = 1;
            let signature = loop {
                match signing.advance(windows) {
                    Some(result) => break result.unwrap(),
                    None => calls += 1,
                }
            };
            assert_eq!(signature, whole, "{windows} windows a step");
            // 2 × 259 windows (37 limbs × 7), the recombination and the 16 bits of
            // e = 65537 below its top one; the call doing the last one finishes.
            assert_eq!(calls, 535usize.div_ceil(windows));
        }
        assert!(key.start(b"m").advance(0).is_none(), "no work, no result");
    }

    #[test]
    fn a_faulty_private_operation_is_withheld_not_released() {
        let key = fixture();
        let mut crt = crt_2048(&key);
        let good = crt.sign(&Sha256::digest(b"m")).unwrap();
        crt.dp[0] ^= 1;
        assert_eq!(crt.sign(&Sha256::digest(b"m")), Err(SignError));
        crt.dp[0] ^= 1;
        crt.q.modulus[3] ^= 1 << 5;
        assert_eq!(crt.sign(&Sha256::digest(b"m")), Err(SignError));
        assert_eq!(good.len(), 256);
    }

    fn pool(text: &str) -> Vec<BigUint> {
        text.lines()
            .map(|l| BigUint::parse_bytes(l.as_bytes(), 16).unwrap())
            .collect()
    }

    /// The key of `p` and `q` (`e = 65537`), which the `rsa` crate does not check for
    /// primality: a product of pool primes stands in for a long prime.
    fn key_of(p: &BigUint, q: &BigUint) -> RsaPrivateKey {
        RsaPrivateKey::from_p_q(p.clone(), q.clone(), BigUint::from(65_537u32)).unwrap()
    }

    /// The class `key` lands in, after checking its signatures against the `rsa` crate's.
    fn class_signing_like_the_rsa_crate(key: &RsaPrivateKey) -> usize {
        let crt = RsaCrtKey::new(key).unwrap();
        let expected = key
            .sign(rsa::Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(b"m"))
            .unwrap();
        let mut signing = crt.start(b"m");
        let signature = loop {
            if let Some(result) = signing.advance(7) {
                break result.unwrap();
            }
        };
        assert_eq!(signature, expected, "{}-bit modulus", key.n().bits());
        match crt.0 {
            BySize::Bits2048(_) => 2048,
            BySize::Bits3072(_) => 3072,
            BySize::Bits4096(_) => 4096,
        }
    }

    #[test]
    fn every_size_to_4096_bits_whose_primes_fit_signs_in_the_smallest_class() {
        let [p1024, q1024] =
            [0, 1].map(|i| pool(include_str!("../../tests/fixtures/primes-1024.txt"))[i].clone());
        let p1536 = pool(include_str!("../../tests/fixtures/primes-1536.txt"))[0].clone();
        let [p2048, q2048] =
            [0, 1].map(|i| pool(include_str!("../../tests/fixtures/primes-2048.txt"))[i].clone());
        // Primes of 1025, 1032, 1033, 1537, 2027, 2028, 2068 and 2069 bits: the classes' edges.
        let edge = pool(include_str!("../../tests/fixtures/edge-primes.txt"));
        let shapes = [
            (&p1024, &q1024, 2048, 2048),
            (&edge[0], &p1024, 2049, 2048), // k = 257 bytes
            (&edge[1], &p1024, 2056, 2048), // 1032 bits: the 37-limb class's largest prime
            (&edge[2], &p1024, 2057, 3072),
            (&p1536, &p1024, 2560, 3072),
            (&edge[3], &p1024, 2561, 4096), // 1537 bits: too long for 55 limbs
            (&edge[3], &p1536, 3073, 4096),
            (&p2048, &p1536, 3584, 4096),
            (&p2048, &q2048, 4096, 4096),
            (&edge[6], &edge[5], 4096, 4096), // 2068 bits: the largest prime taken
            (&edge[6], &edge[4], 4095, 4096),
        ];
        for (p, q, bits, class) in shapes {
            let key = key_of(p, q);
            assert_eq!(key.n().bits(), bits);
            assert_eq!(class_signing_like_the_rsa_crate(&key), class, "{bits} bits");
        }
    }

    #[test]
    fn multi_prime_keys_moduli_over_4096_bits_and_primes_too_long_are_refused() {
        let primes_1024 = pool(include_str!("../../tests/fixtures/primes-1024.txt"));
        let primes_2048 = pool(include_str!("../../tests/fixtures/primes-2048.txt"));
        let edge = pool(include_str!("../../tests/fixtures/edge-primes.txt"));
        let three = RsaPrivateKey::from_primes(primes_1024[..3].to_vec(), BigUint::from(65_537u32))
            .unwrap();
        assert_eq!(RsaCrtKey::new(&three).err(), Some(KeyError::MultiPrime(3)));
        let wide = key_of(&edge[6], &primes_2048[0]);
        assert_eq!(
            RsaCrtKey::new(&wide).err(),
            Some(KeyError::RsaKeyTooLong(4116))
        );
        let lopsided = key_of(&edge[7], &edge[4]);
        assert_eq!(lopsided.n().bits(), 4096);
        assert_eq!(
            RsaCrtKey::new(&lopsided).err(),
            Some(KeyError::RsaPrimeTooLong {
                modulus_bits: 4096,
                prime_bits: 2069
            })
        );
    }

    #[test]
    fn a_148_limb_modulus_with_every_limb_at_its_largest_computes_like_biguint() {
        // 148 limbs sum their columns in a u128 (2 × 148 products of up to 2^56 each can
        // pass 2^64); all limbs of the modulus and of `x` at their largest.
        let modulus = (BigUint::from(1u8) << (148 * LIMB_BITS - 4)) - BigUint::from(1u8);
        let m = Montgomery::<148>::new(&modulus).unwrap();
        let x = &modulus - BigUint::from(1u8);
        let x_limbs: Limbs<148> = limbs(&x.to_bytes_be()).unwrap();
        let e: Limbs<148> = limbs(&[1, 0, 1]).unwrap();
        let expected = x.modpow(&BigUint::from(65_537u32), &modulus);
        let got = BigUint::from_bytes_be(&to_bytes(&m.pow_public(&x_limbs, &e), 518));
        assert_eq!(got, expected);
    }

    /// The types that hold secrets wipe them on drop (a compile-time check).
    #[test]
    fn secret_holders_are_zeroize_on_drop() {
        fn zeroize_on_drop<T: ZeroizeOnDrop>() {}
        zeroize_on_drop::<Montgomery<37>>();
        zeroize_on_drop::<CrtKey<74, 148>>();
        zeroize_on_drop::<Power<55>>();
        zeroize_on_drop::<CrtSigning<37, 74>>();
        zeroize_on_drop::<PublicPower<148>>();
        zeroize_on_drop::<crate::keys::ecdsa_p256::EcKey>();
        zeroize_on_drop::<crate::keys::ecdsa_p256::EcSigning>();
    }

    /// Drops `value` in place and hands back its memory's remains to look at.
    fn remains_after_drop<T>(value: T, look: impl FnOnce(&T)) {
        let mut slot = std::mem::ManuallyDrop::new(value);
        // SAFETY: dropped once, here; afterwards only plain integer arrays are read, whose
        // memory stays allocated (and initialized) in `slot`.
        unsafe { std::ptr::drop_in_place(&mut *slot) };
        look(&slot);
    }

    #[test]
    fn dropping_a_key_or_a_signing_wipes_its_secrets() {
        let key = crt_2048(&fixture());
        assert!(key.dp.iter().any(|&l| l != 0) && key.p.r2.iter().any(|&l| l != 0));
        remains_after_drop(key, |key| {
            for (name, limbs) in [
                ("dP", &key.dp[..]),
                ("dQ", &key.dq),
                ("qInv", &key.q_inv),
                ("p", &key.p.modulus),
                ("q", &key.q.modulus),
                ("R^2 mod p", &key.p.r2),
                ("R^3 mod q", &key.q.r3),
                ("2p", &key.p.twice),
            ] {
                assert!(limbs.iter().all(|&l| l == 0), "{name} left behind");
            }
            assert!(key.p.modulus_reversed.iter().all(|&l| l == 0));
            assert_eq!(key.p.neg_inv, 0);
        });
        let key = Arc::new(crt_2048(&fixture()));
        let mut signing = CrtSigning::new(&key, &Sha256::digest(b"m")).unwrap();
        assert!(signing.advance(300).is_none(), "past p's half: m1 is set");
        assert!(signing.m1.is_some());
        remains_after_drop(signing, |signing| {
            // The bytes of the whole `Option`, as a copy left in it would show.
            // SAFETY: `Option<[u64; 37]>` is a tag and the array, all initialized here.
            let m1: &[u64; std::mem::size_of::<Option<Limbs<37>>>() / 8] =
                unsafe { &*(&signing.m1 as *const Option<Limbs<37>>).cast() };
            assert!(
                m1.iter().skip(1).all(|&l| l == 0),
                "m1 left behind: {m1:x?}"
            );
            assert!(signing.power.table.iter().flatten().all(|&l| l == 0));
            assert!(signing.power.result.iter().all(|&l| l == 0));
        });
        let mut signing = CrtSigning::new(&key, &Sha256::digest(b"m")).unwrap();
        assert!(signing.advance(520).is_none(), "recombined, checking");
        remains_after_drop(signing, |signing| {
            let check = signing.check.as_ref().expect("the check under way");
            for limbs in [&check.x, &check.base, &check.result] {
                assert!(
                    limbs.iter().all(|&l| l == 0),
                    "the unchecked signature left behind"
                );
            }
        });
    }

    #[test]
    fn limbs_round_trip_and_refuse_numbers_too_wide() {
        let bytes: Vec<u8> = (1..=129).collect();
        let l: Limbs<37> = limbs(&bytes).unwrap();
        assert_eq!(to_bytes(&l, 129), bytes);
        assert!(limbs::<37>(&[0x10; 130]).is_none(), "1037 bits > 37 × 28");
        assert!(limbs::<37>(&[0x08; 130]).is_some(), "1036 bits fit");
        assert!(
            limbs::<37>(&[0; 300]).is_some(),
            "leading zeros do not count"
        );
    }
}
