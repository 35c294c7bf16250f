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
//! `exp`, `gelu`, `gelu_grad` and `sigmoid` come in two forms: `f` with plain `a*b + c` (what the
//! baseline clone of a `simd_fn!` kernel runs, and the form the tests read), and `f_with::<FMA>`, which the AVX2+FMA
//! clone runs with fused multiply-adds (one rounding instead of two, and half the latency of the
//! polynomial chains). The two forms differ in the last bits; both meet the bounds above.

pub(crate) use crate::simd::simd_fn;

/// Independent accumulators of a kernel's row reductions (sums, maxima): eight let the loop
/// vectorise, where a single f32 accumulator is a serial chain the compiler may not reorder.
pub(crate) const LANES: usize = 8;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4; // 0x3f318000: 9 significant bits, so n·LN2_HI is exact for |n| < 2^15
const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
/// `1.5·2^23`: adding it rounds a float below 2^22 in magnitude to an integer, ties to even.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// Below this `e^x` is under `f32::MIN_POSITIVE` (flushed to 0); above the next, over `f32::MAX`.
const EXP_MIN_X: f32 = -87.336_55;
const EXP_MAX_X: f32 = 88.722_83;

/// `a·b + c`: fused (one rounding) in the FMA clone of a kernel, a multiply then an add otherwise.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `Σ cᵢ·xⁱ` by Horner's rule, coefficients from the highest degree down.
#[inline(always)]
fn horner<const FMA: bool, const N: usize>(x: f32, coeffs: [f32; N]) -> f32 {
    let mut acc = coeffs[0];
    for &c in &coeffs[1..] {
        acc = madd::<FMA>(acc, x, c);
    }
    acc
}

/// `e^x` (see the module docs for its error bound), with plain multiplies and adds.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp_with::<false>(x)
}

/// `exp`, fused multiply-adds when `FMA` (what `simd_fn!`'s AVX2 clone passes).
#[inline(always)]
pub fn exp_with<const FMA: bool>(x: f32) -> f32 {
    let xc = x.clamp(EXP_MIN_X, EXP_MAX_X);
    let shifted = madd::<FMA>(xc, LOG2E, ROUND_MAGIC);
    let n = shifted - ROUND_MAGIC;
    let r = madd::<FMA>(-n, LN2_LO, madd::<FMA>(-n, LN2_HI, xc));
    let p = horner::<FMA, 8>(r, [1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0]);
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
pub fn erfc_nonneg_with<const FMA: bool>(z: f32) -> f32 {
    let t = 1.0 / madd::<FMA>(0.5, z, 1.0);
    let poly = horner::<FMA, 10>(t, [0.170_872_77, -0.822_152_23, 1.488_515_9, -1.135_204, 0.278_868_07, -0.186_288_06, 0.096_784_18, 0.374_091_96, 1.000_023_7, -1.265_512_2]);
    t * exp_with::<FMA>(madd::<FMA>(-z, z, poly))
}

/// The standard normal CDF `Φ(x) = erfc(−x/√2)/2`, from whichever tail is small.
#[inline(always)]
pub fn normal_cdf_with<const FMA: bool>(x: f32) -> f32 {
    let half_tail = 0.5 * erfc_nonneg_with::<FMA>(x.abs() * std::f32::consts::FRAC_1_SQRT_2);
    if x < 0.0 {
        half_tail
    } else {
        1.0 - half_tail
    }
}

/// `GELU(x) = x·Φ(x)` (BERT's erf GELU), plain multiplies and adds.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    gelu_with::<false>(x)
}

/// `gelu`, fused multiply-adds when `FMA`.
#[inline(always)]
pub fn gelu_with<const FMA: bool>(x: f32) -> f32 {
    x * normal_cdf_with::<FMA>(x)
}

/// `GELU'(x) = Φ(x) + x·φ(x)`, `φ(x) = e^{−x²/2}/√(2π)`, plain multiplies and adds.
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    gelu_grad_with::<false>(x)
}

/// `gelu_grad`, fused multiply-adds when `FMA`.
#[inline(always)]
pub fn gelu_grad_with<const FMA: bool>(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    madd::<FMA>(x * INV_SQRT_2PI, exp_with::<FMA>(-0.5 * x * x), normal_cdf_with::<FMA>(x))
}

/// `σ(x) = 1/(1 + e^{−x})`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    sigmoid_with::<false>(x)
}

/// `sigmoid`, fused multiply-adds when `FMA`.
#[inline(always)]
pub fn sigmoid_with<const FMA: bool>(x: f32) -> f32 {
    1.0 / (1.0 + exp_with::<FMA>(-x))
}
