//! The bf16 rule (docs/STYLE.md, after flash-attention's tests): a kernel that stores activations
//! in bf16 is checked against an f32 reference computed on the same bf16-rounded inputs, and its
//! error must be at most twice the error of a *plain* bf16 implementation of the same op (one
//! that rounds to bf16 wherever PyTorch's bf16 ops would: every op's output, with f32
//! accumulation inside a product or a reduction). A small absolute floor keeps the bound
//! meaningful where the plain error is itself a single rounding of a tiny value.
//! The same rule holds for f16 (the `_in::<f16>` forms, through [`Half`]): its unit roundoff is
//! 2^-11 where bf16's is 2^-8, and its range ends at 65504.
//! Included with `#[path]`, not a crate.
#![allow(dead_code)]

use half::{bf16, f16};

/// A 16-bit storage type the rule applies to: bf16 or f16.
pub trait Half: Copy + PartialEq + std::fmt::Debug + std::fmt::Display {
    /// The unit roundoff (half an ulp at 1): 2^-8 for bf16, 2^-11 for f16.
    const UNIT_ROUNDOFF: f64;
    const NAME: &'static str;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    fn to_bits(self) -> u16;
    fn is_finite(self) -> bool;
}

impl Half for bf16 {
    const UNIT_ROUNDOFF: f64 = 1.0 / 256.0;
    const NAME: &'static str = "bf16";
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn to_bits(self) -> u16 {
        bf16::to_bits(self)
    }
    fn is_finite(self) -> bool {
        bf16::is_finite(self)
    }
}

impl Half for f16 {
    const UNIT_ROUNDOFF: f64 = 1.0 / 2048.0;
    const NAME: &'static str = "f16";
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn to_bits(self) -> u16 {
        f16::to_bits(self)
    }
    fn is_finite(self) -> bool {
        f16::is_finite(self)
    }
}

/// A 16-bit type the CUDA kernels store activations (the `_bf16io` / `_f16io` variants) and a
/// frozen base in, and the GEMMs take: bf16 or f16.
pub trait Io: Half + bert_adapters::cuda::gpu::ActivationScalar + bert_adapters::cuda::gpu::BaseScalar + bert_adapters::cuda::gemm::GemmScalar {}
impl<H: Half + bert_adapters::cuda::gpu::ActivationScalar + bert_adapters::cuda::gpu::BaseScalar + bert_adapters::cuda::gemm::GemmScalar> Io for H {}

/// `test_device!(name, body)` for a body generic over [`Io`]: the tests `name::bf16::*` and
/// `name::f16::*`, each on every device.
#[allow(unused_macros)]
macro_rules! test_both {
    ($name:ident, $body:ident) => {
        mod $name {
            fn with_bf16(gpu: &bert_adapters::cuda::Gpu) {
                super::$body::<half::bf16>(gpu)
            }
            fn with_f16(gpu: &bert_adapters::cuda::Gpu) {
                super::$body::<half::f16>(gpu)
            }
            bert_adapters::test_device!(bf16, with_bf16);
            bert_adapters::test_device!(f16, with_f16);
        }
    };
}
#[allow(unused_imports)]
pub(crate) use test_both;

/// `x` rounded to the nearest `H` (ties to even), as f32.
pub fn round_in<H: Half>(x: f32) -> f32 {
    H::from_f32(x).to_f32()
}

/// Every element rounded to `H`.
pub fn round_all_in<H: Half>(xs: &[f32]) -> Vec<f32> {
    xs.iter().map(|&x| round_in::<H>(x)).collect()
}

/// Every element as `H` (for upload).
pub fn to_half<H: Half>(xs: &[f32]) -> Vec<H> {
    xs.iter().map(|&x| H::from_f32(x)).collect()
}

/// `H` values widened to f32 (after download).
pub fn widen_from<H: Half>(xs: &[H]) -> Vec<f32> {
    xs.iter().map(|x| x.to_f32()).collect()
}

/// `x` rounded to the nearest bf16 (ties to even), as f32.
pub fn round(x: f32) -> f32 {
    round_in::<bf16>(x)
}

/// Every element rounded to bf16.
pub fn round_all(xs: &[f32]) -> Vec<f32> {
    round_all_in::<bf16>(xs)
}

/// Every element as bf16 (for upload).
pub fn to_bf16(xs: &[f32]) -> Vec<bf16> {
    to_half(xs)
}

/// bf16 values widened to f32 (after download).
pub fn widen(xs: &[bf16]) -> Vec<f32> {
    widen_from(xs)
}

/// `max|a − b|` and where, NaN counting as infinitely far.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f64, usize) {
    assert_eq!(a.len(), b.len());
    let (mut worst, mut at) = (0f64, 0usize);
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let d = if x.is_finite() && y.is_finite() { (x as f64 - y as f64).abs() } else { f64::INFINITY };
        if d > worst {
            worst = d;
            at = i;
        }
    }
    (worst, at)
}

/// The absolute floor of the rule: one bf16 rounding at 2^-10 of the reference's scale, so a plain
/// error that happens to be zero (or a rounding of a near-zero value) does not demand exactness.
pub fn floor(reference: &[f32]) -> f64 {
    floor_in::<bf16>(reference)
}

/// [`floor`] for `H`: one unit roundoff of `H` at 2^-10 of the reference's scale.
pub fn floor_in<H: Half>(reference: &[f32]) -> f64 {
    let max_ref = reference.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
    max_ref * H::UNIT_ROUNDOFF * 2f64.powi(-10) + 1e-30
}

/// Assert the bf16 rule: `max|got − f32_ref| ≤ 2·max|plain − f32_ref| + floor`, every element of
/// `got` finite. Returns `(kernel error, plain error)` so a test can also print or bound them.
#[track_caller]
pub fn assert_within_twice_plain(label: &str, got: &[f32], f32_ref: &[f32], plain: &[f32]) -> (f64, f64) {
    assert_within_twice_plain_in::<bf16>(label, got, f32_ref, plain)
}

/// [`assert_within_twice_plain`] for `H` (its floor; `plain` is the plain `H` result).
#[track_caller]
pub fn assert_within_twice_plain_in<H: Half>(label: &str, got: &[f32], f32_ref: &[f32], plain: &[f32]) -> (f64, f64) {
    assert_eq!(got.len(), f32_ref.len(), "{label}: length {} vs reference {}", got.len(), f32_ref.len());
    assert_eq!(plain.len(), f32_ref.len(), "{label}: plain bf16 length {} vs reference {}", plain.len(), f32_ref.len());
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("{label}: element {i} is {} (unwritten or non-finite)", got[i]);
    }
    let (err, at) = max_abs_diff(got, f32_ref);
    let (plain_err, _) = max_abs_diff(plain, f32_ref);
    assert!(plain_err.is_finite(), "{label}: the plain {} reference is not finite", H::NAME);
    let bound = 2.0 * plain_err + floor_in::<H>(f32_ref);
    assert!(
        err <= bound,
        "{label}: {} kernel error {err:.3e} at {at} (got {}, f32 ref {}) exceeds 2 x plain-{} error {plain_err:.3e} (+ floor)",
        H::NAME,
        got[at],
        f32_ref[at],
        H::NAME
    );
    (err, plain_err)
}

/// A plain bf16 matrix product as PyTorch's bf16 matmul: `a` [m, k] · `b`ᵀ ([n, k], a Linear's
/// weight) accumulated in f32 from bf16 operands, plus `bias` in the epilogue, rounded once to bf16.
pub fn plain_linear(a: &[f32], b: &[f32], bias: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f32> {
    plain_linear_in::<bf16>(a, b, bias, m, n, k)
}

/// [`plain_linear`] in `H`.
pub fn plain_linear_in<H: Half>(a: &[f32], b: &[f32], bias: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f32> {
    let round = round_in::<H>;
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for p in 0..k {
                acc += round(a[i * k + p]) * round(b[j * k + p]);
            }
            out[i * n + j] = round(acc + bias.map_or(0.0, |bias| round(bias[j])));
        }
    }
    out
}

/// The bits of each f32, for bit-for-bit comparisons.
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A bf16 value's position on the number line in ulps (-0 and +0 both 0).
pub fn ordinal(b: bf16) -> i32 {
    ordinal_in(b)
}

/// [`ordinal`] for `H` (both are sign-magnitude with the sign in bit 15).
pub fn ordinal_in<H: Half>(b: H) -> i32 {
    let u = b.to_bits() as i32;
    if u & 0x8000 != 0 {
        -(u & 0x7fff)
    } else {
        u
    }
}

/// Every bf16 output element finite and equal to `want` (an f32 kernel's output, or an f32 value
/// computed from one) rounded to bf16: bit for bit on the executor, within one bf16 ulp on a GPU
/// (whose f32 kernel may round its own last bits differently).
#[track_caller]
pub fn assert_rounded_f32_kernel(gpu: &bert_adapters::cuda::Gpu, label: &str, got: &[bf16], want: &[f32]) {
    assert_rounded_f32_kernel_in(gpu, label, got, want)
}

/// [`assert_rounded_f32_kernel`] for `H`.
#[track_caller]
pub fn assert_rounded_f32_kernel_in<H: Half>(gpu: &bert_adapters::cuda::Gpu, label: &str, got: &[H], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    let most = if gpu.kind() == bert_adapters::cuda::GpuKind::Sim { 0 } else { 1 };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let r = H::from_f32(w);
        assert!(g.is_finite() && r.is_finite(), "{label}: [{i}] = {g}, f32 kernel {w}");
        let ulps = (ordinal_in(g) - ordinal_in(r)).abs();
        assert!(ulps <= most, "{label}: [{i}] = {g} but the f32 kernel's {w} rounds to {r}: {ulps} {} ulps apart", H::NAME);
    }
}

/// An f32 output equal to the f32 kernel's: bit for bit on the executor, within 2^-20 relative on
/// a GPU.
#[track_caller]
pub fn assert_same_f32(gpu: &bert_adapters::cuda::Gpu, label: &str, got: &[f32], f32_kernel: &[f32]) {
    if gpu.kind() == bert_adapters::cuda::GpuKind::Sim {
        assert_eq!(bits(got), bits(f32_kernel), "{label}: differs from the f32 kernel's");
        return;
    }
    assert_eq!(got.len(), f32_kernel.len(), "{label}: length");
    for (i, (g, w)) in got.iter().zip(f32_kernel).enumerate() {
        assert!(g.is_finite() && (g - w).abs() <= w.abs() * 2f32.powi(-20), "{label}: [{i}] = {g}, the f32 kernel's {w}");
    }
}
