//! bf16 and f16 dense products (`cuda::gemm` with `InputType::BF16` / `InputType::F16`, issues 13
//! and 15): `Gpu::gemm` over 16-bit A and B with an f32 or a 16-bit D of the same type, and
//! `linear_bf16io` / `linear_f16io` (16-bit x, W, b and y). Every body is generic over the 16-bit
//! type `H` and instantiated for both (`bf16_*` and `f16_*` tests), one body per device
//! (`test_device!`: `*::cuda_sim` runs `gemm_host_typed` under the executor; `*::cuda` runs
//! cuBLASLt on a GPU, `SKIPPED: ...` without one, a failure under `REQUIRE_GPU=1`).
//!
//! Inputs are uniform in [-1, 1) rounded to `H` and uploaded as `H`; the bias is `H`-valued too
//! (stored in D's type, cuBLASLt's bias type). Every sum stays far inside f16's range (at most 97
//! products of magnitude ≤ 1), so f16 runs the same cases as bf16. Checks, for every product:
//! - the bf16 rule of `tests/support/bf16.rs`: `max|got − f32_ref| ≤ 2·max|plain − f32_ref| +
//!   floor`, where `f32_ref` is the product of the rounded operands accumulated in f64 with the
//!   epilogue in f64, cast to f32, and `plain` is `plain_linear` (f32 accumulation, bias added,
//!   rounded once) and for GELU its twin `round(gelu(round(x·Wᵀ + b)))` (the tanh GELU, cuBLASLt's);
//! - with an f32 D, also the fp32 bound `1e-5·(1 + max|ref|)` (sums of at most 97 products of
//!   bf16 values in [-1, 1]: f32 summation error ~√k·2^-24·|terms|, far below it);
//! - C starts NaN (beta = 0 does not read it): every written element must be finite, every
//!   element outside the product (padding rows of ldc) keeps its NaN bits;
//! - on cuda-sim only, exactness: a bf16 D equals, bit for bit, `gemm_host` (f32) on the widened
//!   operands rounded once to bf16 (RNE), and an f32 D equals it exactly. `gemm_host_typed` widens
//!   and runs that same f32 executor, so the summation order is the same and this must be
//!   exact; a GPU sums in its own order and rounds with cuBLASLt's conversion, so there only the
//!   bf16 rule applies.
//!
//! (All of this with "bf16" read as `H`: the f16 rule, plain twin and rounding are f16's.)
//!
//! The scaled, batched case (alpha, beta·C with a 16-bit C, broadcast A) has no plain twin in
//! `support/bf16.rs`; its bound is one rounding of the f32 result, `u·|ref|` with `u` the unit
//! roundoff of `H` (2^-8 for bf16, 2^-11 for f16), plus the fp32 bound.

#[path = "support/bf16.rs"]
mod rule;

use bert_adapters::cuda::backend::CudaBackend;
use bert_adapters::cuda::elementwise::LinearDims;
use bert_adapters::cuda::gemm::{gelu_tanh, gemm_host, linear_16io, linear_bf16io, linear_f16io, Epilogue, Gemm, GemmScalar, InputType, OutputType, Transpose};
use bert_adapters::cuda::gpu::{DeviceBuffer, DeviceScalar, Gpu, GpuKind};
use bert_adapters::cuda::probe::report_line;
use bert_adapters::{test_device, Activation, Backend, DType, Error};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rule::Half;
use std::marker::PhantomData;
use rand::{Rng, SeedableRng};

const SIZES: [usize; 5] = [1, 7, 33, 40, 97];
const PAIRS: [(Transpose, Transpose); 4] =
    [(Transpose::No, Transpose::No), (Transpose::No, Transpose::Yes), (Transpose::Yes, Transpose::No), (Transpose::Yes, Transpose::Yes)];

fn up<T: DeviceScalar>(gpu: &Gpu, v: &[T]) -> DeviceBuffer<T> {
    gpu.upload(v).unwrap_or_else(|e| panic!("upload: {e}"))
}

fn down<T: DeviceScalar>(gpu: &Gpu, b: &DeviceBuffer<T>) -> Vec<T> {
    gpu.download(&b.view()).unwrap_or_else(|e| panic!("download: {e}"))
}

/// A 16-bit type under test: its rule ([`Half`]), its GEMM element type and its tensor dtype.
trait H16: Half + GemmScalar + DeviceScalar {
    const DTYPE: DType;
}
impl H16 for bf16 {
    const DTYPE: DType = DType::BF16;
}
impl H16 for f16 {
    const DTYPE: DType = DType::F16;
}

/// `n` values uniform in [-1, 1), rounded to `H` (as f32).
fn half_values<H: H16>(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rule::round_in::<H>(rng.random_range(-1.0f32..1.0))).collect()
}

fn gelu_tanh_f64(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

/// One product's operands, every value `H`-representable; C is NaN when beta = 0.
struct Case<H> {
    g: Gemm,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    bias: Option<Vec<f32>>,
    half: PhantomData<H>,
}

impl<H: H16> Case<H> {
    fn new(g: Gemm, seed: u64) -> Case<H> {
        let mut rng = StdRng::seed_from_u64(seed);
        let need = g.required_lengths().unwrap_or_else(|e| panic!("{g:?}: {e}"));
        let (a, b) = (half_values::<H>(&mut rng, need.a), half_values::<H>(&mut rng, need.b));
        let c = if g.beta == 0.0 { vec![f32::NAN; need.c] } else { half_values::<H>(&mut rng, need.c) };
        let bias = g.epilogue.needs_bias().then(|| half_values::<H>(&mut rng, g.m));
        Case { g, a, b, c, bias, half: PhantomData }
    }

    /// The indices of C's buffer the product writes, batch by batch, column by column.
    fn written(&self) -> Vec<usize> {
        let g = &self.g;
        (0..g.batch).flat_map(|i| (0..g.n).flat_map(move |j| (0..g.m).map(move |r| i * g.stride_c + j * g.ldc + r))).collect()
    }

    fn a_at(&self, batch: usize, r: usize, l: usize) -> f32 {
        let g = &self.g;
        self.a[batch * g.stride_a + if g.transa == Transpose::No { r + l * g.lda } else { l + r * g.lda }]
    }

    fn b_at(&self, batch: usize, l: usize, j: usize) -> f32 {
        let g = &self.g;
        self.b[batch * g.stride_b + if g.transb == Transpose::No { l + j * g.ldb } else { j + l * g.ldb }]
    }

    /// The f32 reference at the written indices: products of the `H` values summed in f64,
    /// alpha, beta·C, bias and activation in f64, cast to f32.
    fn reference(&self) -> Vec<f32> {
        let g = &self.g;
        let mut out = Vec::with_capacity(g.batch * g.m * g.n);
        for i in 0..g.batch {
            for j in 0..g.n {
                for r in 0..g.m {
                    let acc: f64 = (0..g.k).map(|l| self.a_at(i, r, l) as f64 * self.b_at(i, l, j) as f64).sum();
                    let mut x = g.alpha as f64 * acc;
                    if g.beta != 0.0 {
                        x += g.beta as f64 * self.c[i * g.stride_c + j * g.ldc + r] as f64;
                    }
                    if let Some(bias) = &self.bias {
                        x += bias[r] as f64;
                    }
                    let y = match g.epilogue {
                        Epilogue::None | Epilogue::Bias => x,
                        Epilogue::ReluBias => x.max(0.0),
                        Epilogue::GeluBias => gelu_tanh_f64(x),
                    };
                    out.push(y as f32);
                }
            }
        }
        out
    }

    /// The plain `H` twin (one batch, alpha = 1, beta = 0): `plain_linear_in` on op(A) as rows and
    /// op(B)ᵀ as rows, which is the column-major D; for GELU, `round(gelu(that))`.
    fn plain(&self) -> Vec<f32> {
        let g = &self.g;
        assert!(g.batch == 1 && g.alpha == 1.0 && g.beta == 0.0, "the plain twin covers single unscaled products");
        // plain_linear(x [rows, k], w [out, k]) = x·wᵀ, row-major [rows, out]: with x = op(B)ᵀ
        // (n rows) and w = op(A) (m rows) that is D column-major, D[r + j·m].
        let op_a: Vec<f32> = (0..g.m).flat_map(|r| (0..g.k).map(move |l| (r, l))).map(|(r, l)| self.a_at(0, r, l)).collect();
        let op_bt: Vec<f32> = (0..g.n).flat_map(|j| (0..g.k).map(move |l| (j, l))).map(|(j, l)| self.b_at(0, l, j)).collect();
        let pre = rule::plain_linear_in::<H>(&op_bt, &op_a, self.bias.as_deref(), g.n, g.m, g.k);
        match g.epilogue {
            Epilogue::None | Epilogue::Bias => pre,
            Epilogue::ReluBias => pre.into_iter().map(|v| v.max(0.0)).collect(),
            Epilogue::GeluBias => pre.into_iter().map(|v| rule::round_in::<H>(gelu_tanh(v))).collect(),
        }
    }

    /// `gemm_host` in f32 on the same (`H`-valued) operands: C's whole buffer after it.
    fn host_f32(&self) -> Vec<f32> {
        let mut c = self.c.clone();
        let g = self.g.with_types(InputType::F32, OutputType::F32);
        gemm_host(&g, &self.a, &self.b, &mut c, self.bias.as_deref()).unwrap_or_else(|e| panic!("{g:?}: {e}"));
        c
    }

    /// The product on `gpu` with A and B of `H` and a D of `O`; C's whole buffer after it, widened.
    fn run<O: GemmScalar>(&self, gpu: &Gpu) -> Vec<f32> {
        let g = self.g.with_types(H::INPUT, O::OUTPUT);
        // k = 0 reads neither A nor B: one element each, so no allocation is empty.
        let operand = |v: &[f32]| up(gpu, &rule::to_half::<H>(if v.is_empty() { &[0.0] } else { v }));
        let (a, b) = (operand(&self.a), operand(&self.b));
        let narrow = |v: &[f32]| v.iter().map(|&x| O::narrow(x)).collect::<Vec<O>>();
        let mut c = up(gpu, &narrow(&self.c));
        let bias = self.bias.as_ref().map(|b| up(gpu, &narrow(b)));
        gpu.gemm(&g, &a.view(), &b.view(), &mut c.view_mut(), bias.as_ref().map(|b| b.view()).as_ref()).unwrap_or_else(|e| panic!("{g:?} on {}: {e}", gpu.describe()));
        down(gpu, &c).into_iter().map(O::widen).collect()
    }
}

/// Runs `case` with a D of `O` and checks it (see the header); returns (error, plain error), or
/// (error, half-ulp bound) when there is no plain twin.
fn check<H: H16, O: GemmScalar>(gpu: &Gpu, case: &Case<H>, label: &str) -> (f64, f64) {
    let label = format!("{label} {:?} {:?} → {:?} on {}", case.g, H::INPUT, O::OUTPUT, gpu.describe());
    let out = case.run::<O>(gpu);
    let idx = case.written();
    let mut is_written = vec![false; out.len()];
    for &i in &idx {
        is_written[i] = true;
    }
    for (i, (&o, &c)) in out.iter().zip(&case.c).enumerate() {
        if !is_written[i] {
            assert_eq!(o.to_bits(), O::widen(O::narrow(c)).to_bits(), "{label}: element {i} is outside the product but changed to {o}");
        }
    }
    let got: Vec<f32> = idx.iter().map(|&i| out[i]).collect();
    let reference = case.reference();
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("{label}: written element {i} is {} (unwritten, or C was read)", got[i]);
    }
    let scale = reference.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
    let (err, _) = rule::max_abs_diff(&got, &reference);
    let fp32_tol = 1e-5 * (1.0 + scale);
    if O::OUTPUT == OutputType::F32 {
        assert!(err <= fp32_tol, "{label}: f32 D error {err:.3e} > fp32 bound {fp32_tol:.3e}");
    }
    if gpu.kind() == GpuKind::Sim {
        // Exact on the executor: gemm_host_typed is gemm_host on the widened operands, rounded once.
        let host = case.host_f32();
        for (n, &i) in idx.iter().enumerate() {
            let want = O::widen(O::narrow(host[i]));
            assert_eq!(got[n].to_bits(), want.to_bits(), "{label}: element {i} is {} but gemm_host on the widened operands, rounded once, is {want}", got[n]);
        }
    }
    let single = case.g.batch == 1 && case.g.alpha == 1.0 && case.g.beta == 0.0;
    if single {
        rule::assert_within_twice_plain_in::<H>(&label, &got, &reference, &case.plain())
    } else {
        // No plain twin: one rounding of an f32 result, half an ulp of H's significand.
        let mut worst = 0f64;
        for (n, (&o, &r)) in got.iter().zip(&reference).enumerate() {
            let bound = if O::OUTPUT == H::OUTPUT { (r as f64).abs() * H::UNIT_ROUNDOFF } else { 0.0 } + fp32_tol;
            let e = (o as f64 - r as f64).abs();
            assert!(e <= bound, "{label}: written element {n} is {o}, reference {r}: error {e:.3e} > {bound:.3e}");
            worst = worst.max(e);
        }
        (worst, 0.0)
    }
}

/// The backend's Linear layout (transa = Yes: `yᵀ = W·xᵀ`) at every (m, n, k) in SIZES³, with no
/// epilogue, a bias, and bias + GELU, each into an f32 and an `H` D.
fn linear_layout_at_awkward_shapes<H: H16>(gpu: &Gpu) {
    let mut seed = 0;
    let mut worst = (0f64, 0f64, String::new());
    for m in SIZES {
        for n in SIZES {
            for k in SIZES {
                for epilogue in [Epilogue::None, Epilogue::Bias, Epilogue::GeluBias] {
                    seed += 1;
                    let case = Case::<H>::new(Gemm::new(Transpose::Yes, Transpose::No, m, n, k).with_epilogue(epilogue), seed);
                    check::<H, f32>(gpu, &case, "linear layout");
                    let (err, plain) = check::<H, H>(gpu, &case, "linear layout");
                    if plain > 0.0 && err / plain > worst.0 / worst.1.max(f64::MIN_POSITIVE) {
                        worst = (err, plain, format!("{m}×{n}×{k} {epilogue:?}"));
                    }
                }
            }
        }
    }
    report_line(&format!("{0} gemm, linear layout, {0} D on {1}: worst error/plain {2:.3e}/{3:.3e} at {4}", H::NAME, gpu.describe(), worst.0, worst.1, worst.2));
}
fn bf16_linear_layout_at_awkward_shapes(gpu: &Gpu) {
    linear_layout_at_awkward_shapes::<bf16>(gpu)
}
fn f16_linear_layout_at_awkward_shapes(gpu: &Gpu) {
    linear_layout_at_awkward_shapes::<f16>(gpu)
}
test_device!(bf16_linear_layout, bf16_linear_layout_at_awkward_shapes);
test_device!(f16_linear_layout, f16_linear_layout_at_awkward_shapes);

/// Every transpose pair (the backward products use No/No and No/Yes), packed and with padded
/// leading dimensions (C's padding rows must stay NaN), bias and bias + ReLU/GELU.
fn every_transpose_pair<H: H16>(gpu: &Gpu) {
    let mut seed = 1000;
    for (ta, tb) in PAIRS {
        for (m, n, k) in [(7, 33, 40), (97, 1, 33), (1, 97, 7), (40, 7, 97), (33, 40, 1)] {
            for epilogue in [Epilogue::Bias, Epilogue::ReluBias, Epilogue::GeluBias] {
                seed += 1;
                let g = Gemm::new(ta, tb, m, n, k).with_epilogue(epilogue);
                let case = Case::<H>::new(g, seed);
                check::<H, f32>(gpu, &case, "packed");
                check::<H, H>(gpu, &case, "packed");
                let case = Case::<H>::new(g.with_ld(g.lda + 3, g.ldb + 1, g.ldc + 2).with_batch(1, 0, 0, 0), seed);
                check::<H, f32>(gpu, &case, "padded");
                check::<H, H>(gpu, &case, "padded");
            }
        }
    }
}
fn bf16_every_transpose_pair(gpu: &Gpu) {
    every_transpose_pair::<bf16>(gpu)
}
fn f16_every_transpose_pair(gpu: &Gpu) {
    every_transpose_pair::<f16>(gpu)
}
test_device!(bf16_transposes, bf16_every_transpose_pair);
test_device!(f16_transposes, f16_every_transpose_pair);

/// alpha, beta·C with C read in D's type, strided batches with a broadcast A, padded C, and k = 0.
fn scaled_and_batched<H: H16>(gpu: &Gpu) {
    let mut seed = 2000;
    for epilogue in [Epilogue::None, Epilogue::ReluBias, Epilogue::GeluBias] {
        let g = Gemm::new(Transpose::Yes, Transpose::No, 33, 7, 40).with_scalars(0.75, 0.5).with_epilogue(epilogue);
        let g = g.with_ld(g.lda, g.ldb, g.ldc + 1);
        for (label, g) in [("scaled", g), ("A broadcast", g.with_batch(3, 0, g.stride_b + 2, g.ldc * g.n + 5)), ("k = 0", Gemm { k: 0, ..g })] {
            seed += 1;
            let case = Case::<H>::new(g, seed);
            check::<H, f32>(gpu, &case, label);
            check::<H, H>(gpu, &case, label);
        }
    }
}
fn bf16_scaled_and_batched(gpu: &Gpu) {
    scaled_and_batched::<bf16>(gpu)
}
fn f16_scaled_and_batched(gpu: &Gpu) {
    scaled_and_batched::<f16>(gpu)
}
test_device!(bf16_scaled, bf16_scaled_and_batched);
test_device!(f16_scaled, f16_scaled_and_batched);

/// `linear_16io` (views: `linear_bf16io` / `linear_f16io`) and the backend's 16-bit Linear
/// (tensors): x, W, b, y of `H`, with and without a bias, with the ReLU and tanh-GELU epilogues,
/// against `plain_linear_in::<H>` and its GELU twin.
fn linear_16io_matches_the_rule<H: H16>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xbf16);
    let mut report = Vec::new();
    let nan = H::from_f32(f32::NAN);
    for (rows, d_in, d_out) in [(1, 40, 33), (7, 97, 40), (33, 40, 97), (40, 1, 7)] {
        let (x, w, b) = (half_values::<H>(&mut rng, rows * d_in), half_values::<H>(&mut rng, d_out * d_in), half_values::<H>(&mut rng, d_out));
        let (dx, dw, db) = (up(gpu, &rule::to_half::<H>(&x)), up(gpu, &rule::to_half::<H>(&w)), up(gpu, &rule::to_half::<H>(&b)));
        for (bias, act) in [(false, None), (true, None), (true, Some(Activation::Relu)), (true, Some(Activation::GeluNew))] {
            let label = format!("linear_{}io rows={rows} d_in={d_in} d_out={d_out} bias={bias} act={act:?} on {}", H::NAME, gpu.describe());
            let mut y = up(gpu, &vec![nan; rows * d_out]);
            let dims = LinearDims { rows, d_in, d_out };
            linear_16io(gpu, &dx.view(), &dw.view(), bias.then(|| db.view()).as_ref(), dims, act, &mut y.view_mut()).unwrap_or_else(|e| panic!("{label}: {e}"));
            let got = rule::widen_from(&down(gpu, &y));
            let bias_v = bias.then_some(&b[..]);
            let f32_ref: Vec<f32> = (0..rows * d_out)
                .map(|i| {
                    let (t, o) = (i / d_out, i % d_out);
                    let pre: f64 = (0..d_in).map(|l| x[t * d_in + l] as f64 * w[o * d_in + l] as f64).sum::<f64>() + bias_v.map_or(0.0, |b| b[o] as f64);
                    let y = match act {
                        None => pre,
                        Some(Activation::Relu) => pre.max(0.0),
                        _ => gelu_tanh_f64(pre),
                    };
                    y as f32
                })
                .collect();
            let plain: Vec<f32> = rule::plain_linear_in::<H>(&x, &w, bias_v, rows, d_out, d_in)
                .into_iter()
                .map(|v| match act {
                    None => v,
                    Some(Activation::Relu) => v.max(0.0),
                    _ => rule::round_in::<H>(gelu_tanh(v)),
                })
                .collect();
            let (err, plain_err) = rule::assert_within_twice_plain_in::<H>(&label, &got, &f32_ref, &plain);
            report.push(format!("{rows}×{d_in}→{d_out} bias={bias} {act:?}: {err:.2e} vs plain {plain_err:.2e}"));
        }
        // The backend's entry point over tensors: the same bits as the view-level function.
        if H::DTYPE != DType::BF16 {
            continue; // the backend's f16 mode comes with its own commit
        }
        let be = CudaBackend::on(gpu.reopen().unwrap());
        let bf = |v: &[f32], shape: &[usize]| be.cast(&be.upload(v.to_vec(), shape).unwrap(), H::DTYPE).unwrap();
        let (tx, tw, tb) = (bf(&x, &[rows, d_in]), bf(&w, &[d_out, d_in]), bf(&b, &[d_out]));
        let ty = be.linear_bf16io(&tx, &tw, Some(&tb), Some(Activation::GeluNew)).unwrap();
        assert_eq!((ty.dtype(), ty.shape()), (H::DTYPE, &[rows, d_out][..]));
        let mut y = up(gpu, &vec![nan; rows * d_out]);
        linear_16io(gpu, &dx.view(), &dw.view(), Some(&db.view()), LinearDims { rows, d_in, d_out }, Some(Activation::GeluNew), &mut y.view_mut()).unwrap();
        assert_eq!(be.to_host(&ty).unwrap(), rule::widen_from(&down(gpu, &y)), "the backend's 16-bit Linear vs linear_16io");
    }
    report_line(&format!("linear_{}io on {}: {}", H::NAME, gpu.describe(), report.join("; ")));
}
fn linear_bf16io_matches_the_rule(gpu: &Gpu) {
    linear_16io_matches_the_rule::<bf16>(gpu)
}
fn linear_f16io_matches_the_rule(gpu: &Gpu) {
    linear_16io_matches_the_rule::<f16>(gpu)
}
test_device!(linear_bf16io_rule, linear_bf16io_matches_the_rule);
test_device!(linear_f16io_rule, linear_f16io_matches_the_rule);

/// Bad combinations and bad shapes are errors naming the operand, and nothing is written.
fn bf16_bad_inputs_are_errors(gpu: &Gpu) {
    let h = |v: f32, n: usize| up(gpu, &vec![bf16::from_f32(v); n]);
    let f = |v: f32, n: usize| up(gpu, &vec![v; n]);
    let g = Gemm::new(Transpose::Yes, Transpose::No, 3, 4, 5);
    let (a16, b16, a32, b32) = (h(1.0, 15), h(1.0, 20), f(1.0, 15), f(1.0, 20));
    let (mut c16, mut c32) = (h(7.0, 12), f(7.0, 12));
    let expect = |r: bert_adapters::Result<()>, kind: &str, words: &[&str]| {
        let e = r.expect_err("an error");
        let ok_kind = match kind {
            "unsupported" => matches!(e, Error::Unsupported(_)),
            "input" => matches!(e, Error::Input(_)),
            _ => matches!(e, Error::Shape { .. }),
        };
        assert!(ok_kind, "expected a {kind} error, got {e:?}");
        for w in words {
            assert!(e.to_string().contains(w), "{e} does not contain {w:?}");
        }
    };
    // f32 A/B with a bf16 D: not a cuBLASLt product.
    expect(gpu.gemm(&g.with_types(InputType::F32, OutputType::BF16), &a32.view(), &b32.view(), &mut c16.view_mut(), None), "unsupported", &["bf16 with A and B in f32"]);
    // Buffers that are not what the description says.
    expect(gpu.gemm(&g.with_types(InputType::BF16, OutputType::F32), &a32.view(), &b32.view(), &mut c32.view_mut(), None), "input", &["A and B", "bf16", "hold f32"]);
    expect(gpu.gemm(&g, &a16.view(), &b16.view(), &mut c32.view_mut(), None), "input", &["A and B", "says f32", "hold bf16"]);
    expect(gpu.gemm(&g.with_types(InputType::BF16, OutputType::F32), &a16.view(), &b16.view(), &mut c16.view_mut(), None), "input", &["C (D) and bias", "says f32", "hold bf16"]);
    // Lengths and the bias, in elements of the element type.
    let bf = g.with_types(InputType::BF16, OutputType::BF16);
    expect(gpu.gemm(&bf, &h(1.0, 14).view(), &b16.view(), &mut c16.view_mut(), None), "shape", &["A: the buffer has 14"]);
    expect(gpu.gemm(&bf.with_epilogue(Epilogue::GeluBias), &a16.view(), &b16.view(), &mut c16.view_mut(), None), "shape", &["bias", "GeluBias"]);
    expect(gpu.gemm(&bf.with_epilogue(Epilogue::Bias), &a16.view(), &b16.view(), &mut c16.view_mut(), Some(&h(0.0, 4).view())), "shape", &["bias: has 4", "m = 3"]);
    // C aliasing an input (bf16 bytes).
    {
        let both = h(1.0, 40);
        let alias = both.slice(10..30).unwrap();
        // SAFETY: the call must refuse before touching either view.
        let mut c_alias = unsafe { both.slice(0..12).unwrap().assume_writable() };
        expect(gpu.gemm(&bf, &a16.view(), &alias, &mut c_alias, None), "input", &["C overlaps B"]);
        assert_eq!(down(gpu, &both), vec![bf16::from_f32(1.0); 40]);
    }
    // f16 and bf16 never mix: a D of the other 16-bit type is not a product, and f16 buffers under
    // a bf16 description (or the reverse) are named.
    let (a_h, b_h, mut c_h) = (up(gpu, &[f16::ONE; 15]), up(gpu, &[f16::ONE; 20]), up(gpu, &[f16::from_f32(7.0); 12]));
    expect(gpu.gemm(&g.with_types(InputType::BF16, OutputType::F16), &a16.view(), &b16.view(), &mut c_h.view_mut(), None), "unsupported", &["in f16 with A and B in bf16"]);
    expect(gpu.gemm(&g.with_types(InputType::F16, OutputType::BF16), &a_h.view(), &b_h.view(), &mut c16.view_mut(), None), "unsupported", &["in bf16 with A and B in f16"]);
    expect(gpu.gemm(&g.with_types(InputType::F16, OutputType::F16), &a16.view(), &b16.view(), &mut c_h.view_mut(), None), "input", &["A and B", "says f16", "hold bf16"]);
    expect(gpu.gemm(&bf, &a_h.view(), &b_h.view(), &mut c16.view_mut(), None), "input", &["A and B", "says bf16", "hold f16"]);
    expect(linear_f16io(gpu, &a_h.view(), &up(gpu, &[f16::ONE; 14]).view(), None, LinearDims { rows: 3, d_in: 5, d_out: 3 }, None, &mut c_h.view_mut()), "shape", &["cuda::linear_f16io", "W has 14 elements"]);
    assert_eq!(down(gpu, &c_h), vec![f16::from_f32(7.0); 12], "nothing written by a refused f16 product");
    assert_eq!(down(gpu, &c16), vec![bf16::from_f32(7.0); 12], "nothing written by a refused product");
    assert_eq!(down(gpu, &c32), vec![7.0f32; 12]);

    // linear_bf16io: lengths name the operand; activations without an epilogue are refused.
    let dims = LinearDims { rows: 4, d_in: 5, d_out: 3 };
    let (x, w, b) = (h(1.0, 20), h(1.0, 15), h(1.0, 3));
    let mut y = h(7.0, 12);
    expect(linear_bf16io(gpu, &h(1.0, 19).view(), &w.view(), None, dims, None, &mut y.view_mut()), "shape", &["x has 19 elements, expected rows·d_in = 20"]);
    expect(linear_bf16io(gpu, &x.view(), &h(1.0, 16).view(), None, dims, None, &mut y.view_mut()), "shape", &["W has 16 elements"]);
    expect(linear_bf16io(gpu, &x.view(), &w.view(), Some(&h(1.0, 4).view()), dims, None, &mut y.view_mut()), "shape", &["b has 4 elements, expected d_out = 3"]);
    expect(linear_bf16io(gpu, &x.view(), &w.view(), None, dims, None, &mut h(0.0, 13).view_mut()), "shape", &["y has 13 elements"]);
    expect(linear_bf16io(gpu, &x.view(), &w.view(), Some(&b.view()), dims, Some(Activation::Gelu), &mut y.view_mut()), "unsupported", &["Gelu has no cuBLASLt epilogue"]);
    expect(linear_bf16io(gpu, &x.view(), &w.view(), Some(&b.view()), dims, Some(Activation::Swish), &mut y.view_mut()), "unsupported", &["Swish"]);
    expect(linear_bf16io(gpu, &x.view(), &w.view(), None, dims, Some(Activation::GeluNew), &mut y.view_mut()), "unsupported", &["GeluNew without a bias"]);
    assert_eq!(down(gpu, &y), vec![bf16::from_f32(7.0); 12]);

    // The backend: every tensor of linear_bf16io in bf16, named otherwise; linear takes f32 x.
    let be = CudaBackend::on(gpu.reopen().unwrap());
    let t32 = |n: usize, shape: &[usize]| be.upload(vec![0.5; n], shape).unwrap();
    let t16 = |n: usize, shape: &[usize]| be.cast(&t32(n, shape), DType::BF16).unwrap();
    let (x16, w16, b16, x32, w32, b32) = (t16(20, &[4, 5]), t16(15, &[3, 5]), t16(3, &[3]), t32(20, &[4, 5]), t32(15, &[3, 5]), t32(3, &[3]));
    let words = |r: bert_adapters::Result<bert_adapters::Tensor>, kind: &str, w: &[&str]| expect(r.map(|_| ()), kind, w);
    words(be.linear_bf16io(&x32, &w16, Some(&b16), None), "unsupported", &["the input x [4, 5] is f32"]);
    words(be.linear_bf16io(&x16, &w32, Some(&b16), None), "unsupported", &["the weight W [3, 5] is f32"]);
    words(be.linear_bf16io(&x16, &w16, Some(&b32), None), "unsupported", &["the bias b [3] is f32"]);
    words(be.linear_bf16io(&t16(24, &[4, 6]), &w16, None, None), "shape", &["in-features 5"]);
    words(be.linear_bf16io(&x16, &w16, Some(&t16(4, &[4])), None), "shape", &["bias [4] for 3 out-features"]);
    // The model's `linear` dispatches bf16 activations to the same product (the bf16 eval
    // forward); a bf16 x over an f32 weight is refused there, naming the weight.
    let via_linear = be.to_host(&be.linear(&x16, &w16, Some(&b16)).unwrap()).unwrap();
    assert_eq!(via_linear, be.to_host(&be.linear_bf16io(&x16, &w16, Some(&b16), None).unwrap()).unwrap(), "Backend::linear on bf16 x vs linear_bf16io");
    let e = be.linear(&x16, &w32, Some(&b32)).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_) | Error::Input(_)) && e.to_string().contains("weight"), "{e}");
}
test_device!(bf16_bad_inputs, bf16_bad_inputs_are_errors);

/// f16's range: an f16 D is the f32 result of the whole epilogue rounded once, so a product past
/// 65504 that a bias brings back into range is finite (rounding the product first would give
/// inf), and one that stays past 65520 (the overflow tie) is +inf; beta·C is likewise summed in
/// f32 first. Every operand is an exact f16 (200 = 25·2^3, 60000 = 1875·2^5).
fn f16_range_is_one_rounding(gpu: &Gpu) {
    let h = |v: &[f32]| up(gpu, &rule::to_half::<f16>(v));
    let (a, b) = (h(&[200.0, 200.0]), h(&[200.0, 200.0])); // a·b = 80000 > 65504
    let g = Gemm::new(Transpose::No, Transpose::No, 1, 1, 2).with_types(InputType::F16, OutputType::F16);
    let run = |g: Gemm, c0: f32, bias: Option<f32>| {
        let mut c = h(&[c0]);
        let bias = bias.map(|v| h(&[v]));
        gpu.gemm(&g, &a.view(), &b.view(), &mut c.view_mut(), bias.as_ref().map(|b| b.view()).as_ref()).unwrap_or_else(|e| panic!("{g:?}: {e}"));
        down(gpu, &c)[0].to_f32()
    };
    assert_eq!(run(g, 0.0, None), f32::INFINITY, "80000 rounds to +inf in f16");
    assert_eq!(run(g.with_epilogue(Epilogue::Bias), 0.0, Some(-20000.0)), 60000.0, "80000 - 20000 formed in f32, then rounded");
    assert_eq!(run(g.with_scalars(1.0, 1.0), -20000.0, None), 60000.0, "beta·C added in f32 before the rounding");
    // The largest finite f16 stays finite; 65520, the tie above it, rounds to the even +inf.
    assert_eq!(run(g.with_epilogue(Epilogue::ReluBias), 0.0, Some(-14496.0)), 65504.0, "80000 - 14496 = 65504");
    assert_eq!(run(g.with_epilogue(Epilogue::ReluBias), 0.0, Some(-14480.0)), f32::INFINITY, "80000 - 14480 = 65520, the overflow tie");
    // An f32 D keeps the f32 value.
    let mut c = up(gpu, &[0f32]);
    gpu.gemm(&g.with_types(InputType::F16, OutputType::F32), &a.view(), &b.view(), &mut c.view_mut(), None).unwrap();
    assert_eq!(down(gpu, &c), vec![80000.0]);
}
test_device!(f16_range, f16_range_is_one_rounding);

/// bf16 products keep bf16's exponent range. cuBLASLt 13.0 reports its sm_90 "nvjet" algorithm
/// (id 66) with the f16-inputs implementation flag for bf16 products too (seen on an H100,
/// docs/gpu-log.md 2026-11-27), so the library's mask admits that flag for bf16 inputs (see
/// `impl_mask` in src/cuda/gemm.rs); this is the check that no admitted algorithm narrows a bf16
/// operand to f16. A holds ±2^20·u and B ±2^-30·u (u an exact bf16 in [1, 2)): in f16 the first
/// would be inf and the second 0. At the step's shapes on a GPU (where the heuristic picks that
/// algorithm: 768 × 4096 × 768, forward T·N and input-gradient N·N layouts, f32 and bf16 D), a
/// smaller one on cuda-sim. Bound: the fp32 rule against the f64 sum (an f32 D) and one bf16
/// rounding more (a bf16 D).
fn bf16_exponent_range_is_kept(gpu: &Gpu) {
    let (m, n, k) = if gpu.kind() == GpuKind::Sim { (40, 64, 96) } else { (768, 4096, 768) };
    let mut rng = StdRng::seed_from_u64(0xb16e0);
    let scaled = |rng: &mut StdRng, len: usize, exp: i32| -> Vec<f32> {
        (0..len).map(|_| rule::round_in::<bf16>(rng.random_range(1.0f32..2.0)) * if rng.random_bool(0.5) { 1.0 } else { -1.0 } * 2f32.powi(exp)).collect()
    };
    let (a, b) = (scaled(&mut rng, m * k, 20), scaled(&mut rng, k * n, -30));
    let (da, db) = (up(gpu, &rule::to_half::<bf16>(&a)), up(gpu, &rule::to_half::<bf16>(&b)));
    for (ta, tb) in [(Transpose::Yes, Transpose::No), (Transpose::No, Transpose::No)] {
        // The f64 reference of op(A)·op(B), column-major m × n, as `gemm_host` would index it.
        let at = |i: usize, l: usize| if ta == Transpose::No { a[l * m + i] } else { a[i * k + l] } as f64;
        let bt = |l: usize, j: usize| if tb == Transpose::No { b[j * k + l] } else { b[l * n + j] } as f64;
        let reference: Vec<f64> = (0..m * n).map(|e| (0..k).map(|l| at(e % m, l) * bt(l, e / m)).sum()).collect();
        let max_ref = reference.iter().fold(0f64, |x, v| x.max(v.abs()));
        assert!(max_ref > 1e-3 && max_ref < 1e3, "the sums must be ordinary numbers: {max_ref}");
        let label = format!("{ta:?}·{tb:?} {m}×{n}×{k}");
        let g = Gemm::new(ta, tb, m, n, k).with_types(InputType::BF16, OutputType::F32);
        let mut c = up(gpu, &vec![0f32; m * n]);
        gpu.gemm(&g, &da.view(), &db.view(), &mut c.view_mut(), None).unwrap_or_else(|e| panic!("{label}: {e}"));
        let tol = 1e-5 * (1.0 + max_ref);
        for (i, (got, want)) in down(gpu, &c).iter().zip(&reference).enumerate() {
            assert!((*got as f64 - want).abs() <= tol, "{label}, f32 D: [{i}] = {got}, exact {want}, tol {tol:e}: a bf16 operand lost its range");
        }
        let g = g.with_types(InputType::BF16, OutputType::BF16);
        let mut c = up(gpu, &vec![bf16::ZERO; m * n]);
        gpu.gemm(&g, &da.view(), &db.view(), &mut c.view_mut(), None).unwrap_or_else(|e| panic!("{label}: {e}"));
        for (i, (got, want)) in down(gpu, &c).iter().zip(&reference).enumerate() {
            let bound = want.abs() * 2f64.powi(-8) + tol;
            assert!((got.to_f64() - want).abs() <= bound, "{label}, bf16 D: [{i}] = {got}, exact {want}, bound {bound:e}");
        }
    }
}
test_device!(bf16_exponent_range, bf16_exponent_range_is_kept);
