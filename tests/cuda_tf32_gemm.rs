//! TF32 products (`Gemm::with_tf32`): what the split adapter path's bottleneck products run on in
//! the 16-bit pipelines (`CudaBackend::tf32_adapter_products`). A and B are rounded to TF32 (f32's
//! sign and exponent, 10 explicit mantissa bits) and the products accumulate in f32.
//!
//! Against the f64 product of the *unrounded* operands, every element's error is within the
//! componentwise bound of that arithmetic (Higham, Accuracy and Stability, §3.5):
//! `|D − A·B| ≤ (2·u_tf32 + u_tf32² + γ_k)·(|A|·|B|)`, with `u_tf32 = 2^-10` (a conversion that
//! truncates; round to nearest halves it) and `γ_k = k·2^-24 / (1 − k·2^-24)` for the f32 sums.
//! The operands are drawn so that rounding them to TF32 changes them (24 random mantissa bits), at
//! 2^±60 and 2^±30 too, where TF32 keeps f32's range and f16 inputs would overflow or flush to 0.
//! One more case pins the precision: A all 1 + 3·2^-10 (a TF32 value, which bf16's 7 explicit
//! mantissa bits round to 1), B all 1: the sums must be k·(1 + 3·2^-10) within f32's bound, which
//! bf16 inputs would miss by k·3·2^-10.
//!
//! That the mode is on: the TF32 product differs from the strict f32 product of the same operands
//! by more than the strict product's own bound allows, somewhere in each case; and a strict f32
//! product on the same operands stays within `γ_k·(|A|·|B|)`. On cuda-sim the executor rounds the
//! operands to nearest (`round_tf32`), so there the result is also the strict product of the
//! rounded operands, up to f32 summation order.

use bert_adapters::cuda::gemm::{round_tf32, Gemm, Transpose};
use bert_adapters::cuda::gpu::{Gpu, GpuKind};
use bert_adapters::cuda::probe::report_line;
use bert_adapters::test_device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One operand of `len` elements: random 24-bit mantissas in ±[1, 2), times 2^`exp`, with every
/// fourth element 2^8 times larger so that the sums cancel.
fn operand(rng: &mut StdRng, len: usize, exp: i32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let sign = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
            let big = if i % 4 == 0 { 256.0 } else { 1.0 };
            sign * rng.random_range(1.0f32..2.0) * big * 2f32.powi(exp)
        })
        .collect()
}

fn tf32_products_are_within_their_bound(gpu: &Gpu) {
    use Transpose::{No, Yes};
    let mut rng = StdRng::seed_from_u64(0x7f32_ada9);
    // The adapter's products at small sizes: the down projection (Yes·No, k = H), the up
    // projection (k = the bottleneck), a weight gradient (No·Yes, k = the rows) and the input
    // gradient (No·No); the last one at BERT-base's sizes on a GPU.
    let big = gpu.kind() == GpuKind::Cuda;
    let cases = [(Yes, No, 48, 40, 96, 60), (Yes, No, 96, 40, 48, -60), (No, Yes, 48, 96, 300, 0), (No, No, 96, 40, 48, 30), if big { (No, Yes, 768, 48, 4096, 0) } else { (No, Yes, 42, 9, 130, 0) }];
    let mut worst_ratio = 0f64;
    for (ta, tb, m, n, k, exp) in cases {
        let label = format!("{ta:?}·{tb:?} {m}×{n}×{k}, operands near 2^{exp} and 2^{}", -exp);
        let (a, b) = (operand(&mut rng, m * k, exp), operand(&mut rng, k * n, -exp));
        assert!(a.iter().chain(&b).any(|&v| round_tf32(v) != v), "{label}: the operands must not be TF32 values already");
        let at = |i: usize, l: usize| if ta == No { a[l * m + i] } else { a[i * k + l] } as f64;
        let bt = |l: usize, j: usize| if tb == No { b[j * k + l] } else { b[l * n + j] } as f64;
        let exact: Vec<f64> = (0..m * n).map(|e| (0..k).map(|l| at(e % m, l) * bt(l, e / m)).sum()).collect();
        let magnitude: Vec<f64> = (0..m * n).map(|e| (0..k).map(|l| (at(e % m, l) * bt(l, e / m)).abs()).sum()).collect();
        let (u, kf) = (2f64.powi(-10), k as f64 * 2f64.powi(-24));
        let gamma_k = kf / (1.0 - kf);
        let run = |tf32: bool| -> Vec<f32> {
            let g = Gemm::new(ta, tb, m, n, k).with_tf32(tf32);
            let (da, db) = (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap());
            let mut c = gpu.upload(&vec![f32::NAN; m * n]).unwrap();
            gpu.gemm(&g, &da.view(), &db.view(), &mut c.view_mut(), None).unwrap_or_else(|e| panic!("{label}, tf32 {tf32}: {e}"));
            gpu.download(&c.view()).unwrap()
        };
        let (tf32, strict) = (run(true), run(false));
        let mut beyond_strict = 0usize;
        for e in 0..m * n {
            let tf32_bound = (2.0 * u + u * u + gamma_k) * magnitude[e];
            let strict_bound = gamma_k * magnitude[e];
            let (err, strict_err) = ((tf32[e] as f64 - exact[e]).abs(), (strict[e] as f64 - exact[e]).abs());
            assert!(err <= tf32_bound, "{label}: [{e}] = {}, exact {}, error {err:e} > the TF32 bound {tf32_bound:e}", tf32[e], exact[e]);
            assert!(strict_err <= strict_bound, "{label}, strict f32: [{e}] = {}, exact {}, error {strict_err:e} > {strict_bound:e}", strict[e], exact[e]);
            worst_ratio = worst_ratio.max(err / tf32_bound);
            beyond_strict += ((tf32[e] as f64 - strict[e] as f64).abs() > 2.0 * strict_bound) as usize;
        }
        assert!(beyond_strict > 0, "{label}: the TF32 product equals the strict one everywhere: TF32 was not used");
    }
    // The precision: a TF32 value that bf16 cannot hold, summed k times without rounding error.
    let (m, n, k) = (40, 8, 256);
    let v = 1.0 + 3.0 * 2f32.powi(-10);
    let (da, db) = (gpu.upload(&vec![v; m * k]).unwrap(), gpu.upload(&vec![1f32; k * n]).unwrap());
    let mut c = gpu.upload(&vec![f32::NAN; m * n]).unwrap();
    gpu.gemm(&Gemm::new(Yes, No, m, n, k).with_tf32(true), &da.view(), &db.view(), &mut c.view_mut(), None).unwrap();
    let want = k as f64 * v as f64;
    for (e, got) in gpu.download(&c.view()).unwrap().iter().enumerate() {
        assert!((*got as f64 - want).abs() <= 1e-6 * want, "[{e}] = {got}, want {want}: the products lost TF32's 10 mantissa bits");
    }
    report_line(&format!("tf32 products on {}: worst error {worst_ratio:.3} of the TF32 bound", gpu.describe()));
}
test_device!(tf32_products, tf32_products_are_within_their_bound);
