//! Elementwise f32 functions for the fast path, written so that loops over them vectorise: no
//! branches (selects only), no calls into `libm`. `simd_fn!` defines a kernel compiled for
//! AVX2+FMA, used when the CPU has them (detected at run time, so one binary runs anywhere).
//!
//! Numerics (checked against f64 in tests/fast_math.rs):
//! - `exp`: `2^n·e^r` with `n = round(x·log₂e)` and `r = x − n·ln2` (ln2 split in a short high part
//!   and a low part, so `n·ln2_hi` is exact), `e^r` by its degree-7 Taylor polynomial on
//!   `|r| ≤ ln2/2` (truncation 5e-9): within 2 ulp. Results below `f32::MIN_POSITIVE` flush to 0
//!   (no subnormals), above `f32::MAX` are +inf; NaN stays NaN.
//! - `erfc` of `z ≥ 0`: the Chebyshev-fitted form `t·exp(−z² + P(t))`, `t = 1/(1 + z/2)`, with
//!   relative error below 1.2e-7 for every z (Numerical Recipes §6.2); in f32, within 3e-7.
//! - `gelu(x) = x·Φ(x)` with `Φ(x) = erfc(−x/√2)/2` taken from the side where it is small, so both
//!   tails stay accurate: absolute error ≤ 3e-7·|x|.
//!
//! Plain `a*b + c` is used, never `mul_add`: every CPU rounds it the same way, so the AVX2 clone
//! and the baseline build give bit-identical results.

pub(crate) use crate::simd::simd_fn;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4; // 0x3f318000: 9 significant bits, so n·LN2_HI is exact for |n| < 2^15
const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
/// `1.5·2^23`: adding it rounds a float below 2^22 in magnitude to an integer, ties to even.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// Below this `e^x` is under `f32::MIN_POSITIVE` (flushed to 0); above the next, over `f32::MAX`.
const EXP_MIN_X: f32 = -87.336_55;
const EXP_MAX_X: f32 = 88.722_83;

/// `e^x` (see the module docs for its error bound).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(EXP_MIN_X, EXP_MAX_X);
    let shifted = xc * LOG2E + ROUND_MAGIC;
    let n = shifted - ROUND_MAGIC;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n by its exponent bits; n ∈ [-126, 128], and 2^128 (x near the top) is split in two.
    // The integer n sits in the low mantissa bits of `shifted` (a float in [2^23, 2^24)): an
    // integer subtraction reads it, where `n as i32` would compile to scalar saturating code.
    let n = shifted.to_bits() as i32 - ROUND_MAGIC.to_bits() as i32;
    let half = n >> 1;
    let two_a = f32::from_bits(((half + 127) << 23) as u32);
    let two_b = f32::from_bits(((n - half + 127) << 23) as u32);
    let y = p * two_a * two_b;
    // A NaN fails both tests and stays NaN through the arithmetic above.
    let y = if x < EXP_MIN_X { 0.0 } else { y };
    if x > EXP_MAX_X {
        f32::INFINITY
    } else {
        y
    }
}

/// `erfc(z)` for `z ≥ 0` (a NaN stays NaN).
#[inline(always)]
pub fn erfc_nonneg(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18 + t * (-0.186_288_06 + t * (0.278_868_07 + t * (-1.135_204 + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t * exp(-z * z + poly)
}

/// The standard normal CDF `Φ(x) = erfc(−x/√2)/2`, from whichever tail is small.
#[inline(always)]
pub fn normal_cdf(x: f32) -> f32 {
    let half_tail = 0.5 * erfc_nonneg(x.abs() * std::f32::consts::FRAC_1_SQRT_2);
    if x < 0.0 {
        half_tail
    } else {
        1.0 - half_tail
    }
}

/// `GELU(x) = x·Φ(x)` (BERT's erf GELU).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    x * normal_cdf(x)
}

/// `GELU'(x) = Φ(x) + x·φ(x)`, `φ(x) = e^{−x²/2}/√(2π)`.
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    normal_cdf(x) + x * INV_SQRT_2PI * exp(-0.5 * x * x)
}

/// `σ(x) = 1/(1 + e^{−x})`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}
