//! bf16 activation storage in the LayerNorm family (issue 13): the `_bf16io` kernels of
//! kernels/layernorm.cu (x, residual, y, z, dy, dz and the frozen base's γ/β in bf16; mean, rstd,
//! the `[rows, 2]` stats and dγ/dβ in f32), one body per device (`test_device!`: `*::cuda_sim` on
//! the executor in the forward, reverse and random schedules; `*::cuda` on a GPU, `SKIPPED: ...`
//! without one, a failure under `REQUIRE_GPU=1`):
//!
//! - the forward, the training forward and the backward (`dz` written and accumulated, dγ/dβ)
//!   at 1, 7 and 33 rows of 40, 48 and 384 columns, a block-per-row width (1100; 4099 for the
//!   forward) and the plans without the row cache;
//! - every pair of storage types without a kernel is `Error::Unsupported`, a bf16 view of the
//!   wrong length a shape error, and the overlap check counts bf16 views in bytes.
//!
//! f16 (issue 15): every body is generic over the 16-bit type (`Io`) and runs in bf16 and in
//! f16 (`test_both!`: `*::bf16::*`, `*::f16::*`), so each `_f16io` kernel (and
//! `residual_layernorm_forward_f16`, f32 activations over an f16 base) gets the same checks in
//! f16; every input (|x| ≤ 5, γ ≤ 1.5) is far inside f16's ±65504. bf16 and f16 never meet in one
//! launch (`mixed_16bit_pairs`).
//!
//! What is asserted, for each bf16 output (tests/support/bf16.rs, the bf16 rule): every element
//! written (outputs start as bf16 NaN) and finite, and `max|got − f32_ref| <= 2·max|plain −
//! f32_ref| + floor`, where the inputs are drawn, rounded to bf16 and uploaded as bf16, `f32_ref`
//! is the f32 computation on those rounded inputs (the f64-inside CPU reference functions,
//! rounded to f32 once) and `plain` is a plain bf16 LayerNorm written here, rounding where
//! PyTorch's bf16 ops round: the residual sum `x + residual` is a bf16 tensor, LayerNorm and its
//! backward compute in f32 from bf16 operands and round their output once, and a gradient
//! accumulated into a bf16 `.grad` is rounded before the add and after it.
//! And, because the kernels compute every value in f32 exactly as the f32 kernels do (the same
//! templated bodies, loads widened exactly) and round only on store: each bf16 output equals the
//! f32 kernel's output on the widened inputs rounded to bf16 (bit for bit on the executor, which
//! runs both with the same operations; within one bf16 ulp on a GPU, where each instantiation is
//! compiled on its own), and each f32 output (mean, rstd, stats, dγ, dβ) equals the f32 kernel's
//! (bit for bit on the executor, within 2^-20 relative on a GPU).

#[path = "support/bf16.rs"]
mod rule;
use rule::{test_both, Io};
use rule::{assert_same_f32, bits};

use bert_adapters::cpu::reference;
use bert_adapters::cuda::gpu::{ActivationScalar, BaseScalar, DeviceBuffer, DeviceScalar, Gpu};
use bert_adapters::cuda::layernorm::{
    layernorm_backward, layernorm_backward_with_plan, layernorm_param_grad_workspace_len, residual_layernorm_forward, residual_layernorm_forward_train, residual_layernorm_forward_train_with_plan, residual_layernorm_forward_with_plan,
    LayerNormBackwardInputs, LayerNormInputs, LayerNormOutputs, LayerNormParamGrads, LayerNormPlan, LayerNormTrainOutputs,
};
use bert_adapters::cuda::probe::report_line;
use bert_adapters::{test_device, Error};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BERT_EPS: f32 = 1e-12;
const ROWS: [usize; 3] = [1, 7, 33];
const COLS: [usize; 3] = [40, 48, 384];

fn up<T: DeviceScalar>(gpu: &Gpu, v: &[T]) -> DeviceBuffer<T> {
    gpu.upload(v).unwrap_or_else(|e| panic!("upload: {e}"))
}

fn down<T: DeviceScalar>(gpu: &Gpu, b: &DeviceBuffer<T>) -> Vec<T> {
    gpu.download(&b.view()).unwrap_or_else(|e| panic!("download: {e}"))
}

/// Poisoned outputs (uploaded, so a GPU's are poisoned too): an element a kernel skips stays NaN.
fn nan16<H: Io>(gpu: &Gpu, n: usize) -> DeviceBuffer<H> {
    up(gpu, &vec![H::from_f32(f32::NAN); n])
}

fn nan32(gpu: &Gpu, n: usize) -> DeviceBuffer<f32> {
    up(gpu, &vec![f32::NAN; n])
}

fn uniform(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// `rows` rows of `cols` values, each row with its own offset and spread (|mean| >> std in some
/// rows, where the rounding of z matters most), rounded to bf16.
fn rows_with_offsets<H: Io>(rng: &mut StdRng, rows: usize, cols: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let (m, s) = (rng.random_range(-3.0f32..3.0), rng.random_range(0.1f32..2.0));
        v.extend((0..cols).map(|_| rule::round_in::<H>(m + s * rng.random_range(-1.0f32..1.0))));
    }
    v
}

/// Asserts every element finite and `|got − want| <= rel·(1 + max|want|)` (the f32 LayerNorm
/// tests' bound, for the f32 outputs against the f64-inside reference).
fn assert_close(label: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    let tol = rel * (1.0 + want.iter().fold(0f32, |m, v| m.max(v.abs())));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite() && (g - w).abs() <= tol, "{label}: [{i}] = {g}, reference {w}, tol {tol:e}");
    }
}

/// The worst `kernel error / plain error` seen, with its label and errors, for the report line.
#[derive(Default)]
struct Worst {
    ratio: f64,
    at: String,
    errs: (f64, f64),
}

impl Worst {
    fn note(&mut self, label: &str, (err, plain): (f64, f64)) {
        let ratio = err / plain.max(1e-30);
        if ratio >= self.ratio {
            *self = Worst { ratio, at: label.to_string(), errs: (err, plain) };
        }
    }

    fn report(&self, what: &str, gpu: &Gpu) {
        report_line(&format!("{what} on {}: worst kernel/plain error {:.3} ({:.3e} vs {:.3e}) at {}", gpu.describe(), self.ratio, self.errs.0, self.errs.1, self.at));
    }
}

// ---- plain bf16 LayerNorm (PyTorch's bf16 ops) ------------------------------------------------

/// `z = x + residual` as a bf16 tensor (each sum rounded), or `x` itself.
fn plain_sum<H: Io>(x: &[f32], residual: Option<&[f32]>) -> Vec<f32> {
    match residual {
        Some(r) => x.iter().zip(r).map(|(a, b)| rule::round_in::<H>(a + b)).collect(),
        None => x.to_vec(),
    }
}

/// `torch.nn.functional.layer_norm` on bf16 `z`, γ, β: statistics and the affine map in f32 from
/// the bf16 operands, the output rounded once.
fn plain_layernorm<H: Io>(z: &[f32], gamma: &[f32], beta: &[f32], cols: usize, eps: f32) -> Vec<f32> {
    let mut y = Vec::with_capacity(z.len());
    for zr in z.chunks(cols) {
        let mean = zr.iter().sum::<f32>() / cols as f32;
        let var = zr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / cols as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        y.extend(zr.iter().zip(gamma.iter().zip(beta)).map(|(v, (g, b))| rule::round_in::<H>((v - mean) * rstd * g + b)));
    }
    y
}

/// PyTorch's LayerNorm input gradient on bf16 `dy`, `z`, γ with f32 saved statistics: computed in
/// f32, rounded once.
fn plain_layernorm_backward<H: Io>(dy: &[f32], z: &[f32], stats: &[f32], gamma: &[f32], cols: usize) -> Vec<f32> {
    let mut dz = Vec::with_capacity(z.len());
    for (r, (zr, dyr)) in z.chunks(cols).zip(dy.chunks(cols)).enumerate() {
        let (mean, rstd) = (stats[2 * r], stats[2 * r + 1]);
        let xh: Vec<f32> = zr.iter().map(|v| (v - mean) * rstd).collect();
        let gy: Vec<f32> = dyr.iter().zip(gamma).map(|(d, g)| d * g).collect();
        let mean_gy = gy.iter().sum::<f32>() / cols as f32;
        let mean_gyx = gy.iter().zip(&xh).map(|(a, b)| a * b).sum::<f32>() / cols as f32;
        dz.extend(gy.iter().zip(&xh).map(|(g, x)| rule::round_in::<H>(rstd * (g - mean_gy - x * mean_gyx))));
    }
    dz
}

// ---- forward ---------------------------------------------------------------------------------------

/// One forward input set, every value already a bf16 (as f32).
struct FwdCase {
    rows: usize,
    cols: usize,
    x: Vec<f32>,
    residual: Option<Vec<f32>>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

impl FwdCase {
    fn random<H: Io>(rng: &mut StdRng, rows: usize, cols: usize, with_residual: bool) -> FwdCase {
        let x = rows_with_offsets::<H>(rng, rows, cols);
        let residual = with_residual.then(|| rule::round_all_in::<H>(&uniform(rng, rows * cols, -2.0, 2.0)));
        let gamma = rule::round_all_in::<H>(&uniform(rng, cols, 0.5, 1.5));
        let beta = rule::round_all_in::<H>(&uniform(rng, cols, -0.5, 0.5));
        FwdCase { rows, cols, x, residual, gamma, beta }
    }
}

/// What a forward launch wrote: y as f32 (widened from bf16 for the bf16io kernel), mean and rstd.
struct FwdGot<A> {
    y: Vec<A>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

/// Uploads `case` with activations as `A` and γ/β as `P` (every value exact in either), runs the
/// forward (auto plan if `plan` is None), and downloads what it wrote.
fn run_forward<A: ActivationScalar, P: BaseScalar>(gpu: &Gpu, case: &FwdCase, plan: Option<LayerNormPlan>, act: fn(f32) -> A, par: fn(f32) -> P) -> Result<FwdGot<A>, Error> {
    let conv_a = |v: &[f32]| v.iter().map(|&x| act(x)).collect::<Vec<A>>();
    let conv_p = |v: &[f32]| v.iter().map(|&x| par(x)).collect::<Vec<P>>();
    let (rows, cols) = (case.rows, case.cols);
    let (x, gamma, beta) = (up(gpu, &conv_a(&case.x)), up(gpu, &conv_p(&case.gamma)), up(gpu, &conv_p(&case.beta)));
    let residual = case.residual.as_deref().map(|r| up(gpu, &conv_a(r)));
    let mut y = up(gpu, &vec![act(f32::NAN); rows * cols]);
    let (mut mean, mut rstd) = (nan32(gpu, rows), nan32(gpu, rows));
    {
        let inputs = LayerNormInputs { x: x.view(), residual: residual.as_ref().map(|r| r.view()), gamma: gamma.view(), beta: beta.view(), rows, cols, eps: BERT_EPS };
        let mut out = LayerNormOutputs { y: y.view_mut(), mean: mean.view_mut(), rstd: rstd.view_mut() };
        match plan {
            None => residual_layernorm_forward(gpu, &inputs, &mut out)?,
            Some(p) => residual_layernorm_forward_with_plan(gpu, &inputs, &mut out, p)?,
        }
    }
    Ok(FwdGot { y: down(gpu, &y), mean: down(gpu, &mean), rstd: down(gpu, &rstd) })
}

fn id(x: f32) -> f32 {
    x
}

/// The shapes of the forward tests: ROWS x COLS with the auto plan, a block-per-row width (cached
/// and not), and the warp-per-row plan without the row cache.
fn forward_shapes(wide: usize) -> Vec<(usize, usize, Option<LayerNormPlan>)> {
    let mut shapes: Vec<(usize, usize, Option<LayerNormPlan>)> = ROWS.iter().flat_map(|&r| COLS.iter().map(move |&c| (r, c, None))).collect();
    shapes.push((3, wide, None));
    shapes.push((7, 384, Some(LayerNormPlan { threads_per_row: 32, rows_per_block: 8, cache_row: false })));
    shapes.push((3, 1100, Some(LayerNormPlan { threads_per_row: 64, rows_per_block: 1, cache_row: false })));
    shapes
}

fn forward_bf16io_follows_the_rule<H: Io>(gpu: &Gpu) {
    let h = H::NAME;
    let mut rng = StdRng::seed_from_u64(0xbf16_001a);
    let mut worst = Worst::default();
    for (rows, cols, plan) in forward_shapes(4099) {
        for with_residual in [false, true] {
            let label = format!("{} {h}io forward rows={rows} cols={cols} residual={with_residual} {plan:?}", gpu.describe());
            let case = FwdCase::random::<H>(&mut rng, rows, cols, with_residual);
            let got = run_forward(gpu, &case, plan, H::from_f32, H::from_f32).unwrap_or_else(|e| panic!("{label}: {e}"));
            let f32_kernel = run_forward(gpu, &case, plan, id, id).unwrap_or_else(|e| panic!("{label}: f32 kernel: {e}"));
            let f32_ref = reference::residual_layernorm(&case.x, case.residual.as_deref(), &case.gamma, &case.beta, cols, BERT_EPS);
            let plain = plain_layernorm::<H>(&plain_sum::<H>(&case.x, case.residual.as_deref()), &case.gamma, &case.beta, cols, BERT_EPS);
            let y = rule::widen_from(&got.y);
            worst.note(&label, rule::assert_within_twice_plain_in::<H>(&format!("{label}: y"), &y, &f32_ref.y, &plain));
            rule::assert_rounded_f32_kernel_in(gpu, &format!("{label}: y"), &got.y, &f32_kernel.y);
            assert_same_f32(gpu, &format!("{label}: mean"), &got.mean, &f32_kernel.mean);
            assert_same_f32(gpu, &format!("{label}: rstd"), &got.rstd, &f32_kernel.rstd);
            assert_close(&format!("{label}: mean"), &got.mean, &f32_ref.mean, 1e-5);
            assert_close(&format!("{label}: rstd"), &got.rstd, &f32_ref.rstd, 1e-5);
            // f32 activations over a 16-bit base (residual_layernorm_forward_bf16 / _f16): the f32
            // kernel on the widened γ/β (exact), bit for bit on the executor.
            let base16 = run_forward(gpu, &case, plan, id, H::from_f32).unwrap_or_else(|e| panic!("{label}: {h} base, f32 activations: {e}"));
            assert_same_f32(gpu, &format!("{label}: y over a {h} base"), &base16.y, &f32_kernel.y);
            assert_same_f32(gpu, &format!("{label}: mean over a {h} base"), &base16.mean, &f32_kernel.mean);
        }
    }
    worst.report(&format!("layernorm {h}io forward y"), gpu);
}
test_both!(forward, forward_bf16io_follows_the_rule);

// ---- training forward ------------------------------------------------------------------------------

struct TrainGot<A> {
    y: Vec<A>,
    z: Vec<A>,
    stats: Vec<f32>,
}

fn run_train<A: ActivationScalar + BaseScalar>(gpu: &Gpu, case: &FwdCase, plan: Option<LayerNormPlan>, act: fn(f32) -> A) -> Result<TrainGot<A>, Error> {
    let conv = |v: &[f32]| v.iter().map(|&x| act(x)).collect::<Vec<A>>();
    let (rows, cols) = (case.rows, case.cols);
    let (x, gamma, beta) = (up(gpu, &conv(&case.x)), up(gpu, &conv(&case.gamma)), up(gpu, &conv(&case.beta)));
    let residual = case.residual.as_deref().map(|r| up(gpu, &conv(r)));
    let (mut y, mut z) = (up(gpu, &vec![act(f32::NAN); rows * cols]), up(gpu, &vec![act(f32::NAN); rows * cols]));
    let mut stats = nan32(gpu, 2 * rows);
    {
        // γ/β in the activations' type: f32 with f32, bf16 with bf16 (the pairs with a kernel).
        let inputs = LayerNormInputs { x: x.view(), residual: residual.as_ref().map(|r| r.view()), gamma: gamma.view(), beta: beta.view(), rows, cols, eps: BERT_EPS };
        let mut out = LayerNormTrainOutputs { y: y.view_mut(), z: z.view_mut(), stats: stats.view_mut() };
        match plan {
            None => residual_layernorm_forward_train::<A, A>(gpu, &inputs, &mut out)?,
            Some(p) => residual_layernorm_forward_train_with_plan::<A, A>(gpu, &inputs, &mut out, p)?,
        }
    }
    Ok(TrainGot { y: down(gpu, &y), z: down(gpu, &z), stats: down(gpu, &stats) })
}

fn train_forward_bf16io_follows_the_rule<H: Io>(gpu: &Gpu) {
    let h = H::NAME;
    let mut rng = StdRng::seed_from_u64(0xbf16_007a);
    let (mut worst_y, mut worst_z) = (Worst::default(), Worst::default());
    for (rows, cols, plan) in forward_shapes(1100) {
        for with_residual in [false, true] {
            let label = format!("{} {h}io train forward rows={rows} cols={cols} residual={with_residual} {plan:?}", gpu.describe());
            let case = FwdCase::random::<H>(&mut rng, rows, cols, with_residual);
            let got = run_train(gpu, &case, plan, H::from_f32).unwrap_or_else(|e| panic!("{label}: {e}"));
            let f32_kernel = run_train(gpu, &case, plan, id).unwrap_or_else(|e| panic!("{label}: f32 kernel: {e}"));
            let f32_ref = reference::residual_layernorm(&case.x, case.residual.as_deref(), &case.gamma, &case.beta, cols, BERT_EPS);
            // z: the f32 sum (the reference's, and the f32 kernel's bit for bit); plain: its bf16 tensor.
            let z_ref: Vec<f32> = match &case.residual {
                Some(r) => case.x.iter().zip(r).map(|(a, b)| a + b).collect(),
                None => case.x.clone(),
            };
            let z_plain = plain_sum::<H>(&case.x, case.residual.as_deref());
            let y_plain = plain_layernorm::<H>(&z_plain, &case.gamma, &case.beta, cols, BERT_EPS);
            worst_y.note(&label, rule::assert_within_twice_plain_in::<H>(&format!("{label}: y"), &rule::widen_from(&got.y), &f32_ref.y, &y_plain));
            worst_z.note(&label, rule::assert_within_twice_plain_in::<H>(&format!("{label}: z"), &rule::widen_from(&got.z), &z_ref, &z_plain));
            rule::assert_rounded_f32_kernel_in(gpu, &format!("{label}: y"), &got.y, &f32_kernel.y);
            assert_eq!(bits(&f32_kernel.z), bits(&z_ref), "{label}: the f32 kernel's z is not the f32 sum");
            // z is one f32 add rounded once, on every device: bit for bit.
            assert_eq!(got.z, rule::to_half::<H>(&z_ref), "{label}: z is not the f32 sum rounded to bf16");
            assert_same_f32(gpu, &format!("{label}: stats"), &got.stats, &f32_kernel.stats);
            let ref_stats: Vec<f32> = f32_ref.mean.iter().zip(&f32_ref.rstd).flat_map(|(&m, &r)| [m, r]).collect();
            assert_close(&format!("{label}: stats"), &got.stats, &ref_stats, 1e-5);
            // The training forward is the forward's body: the same y and statistics.
            let fwd = run_forward(gpu, &case, plan, H::from_f32, H::from_f32).unwrap_or_else(|e| panic!("{label}: forward: {e}"));
            assert_eq!(fwd.y, got.y, "{label}: y differs from the {h}io forward's");
            let fwd_stats: Vec<f32> = fwd.mean.iter().zip(&fwd.rstd).flat_map(|(&m, &r)| [m, r]).collect();
            assert_eq!(bits(&fwd_stats), bits(&got.stats), "{label}: stats differ from the {h}io forward's mean and rstd");
        }
    }
    worst_y.report(&format!("layernorm {h}io train forward y"), gpu);
    worst_z.report(&format!("layernorm {h}io train forward z"), gpu);
}
test_both!(train_forward, train_forward_bf16io_follows_the_rule);

// ---- backward ---------------------------------------------------------------------------------------

/// A backward input set: `dy`, `z`, γ already bf16 values; `stats` the f32 statistics of `z`.
struct BwdCase {
    rows: usize,
    cols: usize,
    dy: Vec<f32>,
    z: Vec<f32>,
    stats: Vec<f32>,
    gamma: Vec<f32>,
}

impl BwdCase {
    fn random<H: Io>(rng: &mut StdRng, rows: usize, cols: usize) -> BwdCase {
        let z = rows_with_offsets::<H>(rng, rows, cols);
        let gamma = rule::round_all_in::<H>(&uniform(rng, cols, 0.5, 1.5));
        let out = reference::residual_layernorm(&z, None, &gamma, &vec![0f32; cols], cols, BERT_EPS);
        let stats = out.mean.iter().zip(&out.rstd).flat_map(|(&m, &r)| [m, r]).collect();
        BwdCase { rows, cols, dy: rule::round_all_in::<H>(&uniform(rng, rows * cols, -1.0, 1.0)), z, stats, gamma }
    }

    /// dγ, dβ in f64 from the same statistics.
    fn param_grads(&self) -> (Vec<f32>, Vec<f32>) {
        let (mut dg, mut db) = (vec![0f64; self.cols], vec![0f64; self.cols]);
        for r in 0..self.rows {
            let (m, rs) = (self.stats[2 * r] as f64, self.stats[2 * r + 1] as f64);
            for c in 0..self.cols {
                let i = r * self.cols + c;
                dg[c] += self.dy[i] as f64 * (self.z[i] as f64 - m) * rs;
                db[c] += self.dy[i] as f64;
            }
        }
        (dg.into_iter().map(|v| v as f32).collect(), db.into_iter().map(|v| v as f32).collect())
    }
}

struct BwdGot<A> {
    dz: Vec<A>,
    dgamma: Vec<f32>,
    dbeta: Vec<f32>,
}

/// Runs the backward with `dz0` (or NaN) in dz, and dγ/dβ starting as `dparams0` (or NaN).
fn run_backward<A: ActivationScalar + BaseScalar>(gpu: &Gpu, c: &BwdCase, dz0: Option<&[f32]>, dparams0: Option<(&[f32], &[f32])>, plan: Option<LayerNormPlan>, act: fn(f32) -> A) -> Result<BwdGot<A>, Error> {
    let conv = |v: &[f32]| v.iter().map(|&x| act(x)).collect::<Vec<A>>();
    let (rows, cols) = (c.rows, c.cols);
    let (dy, z, stats, gamma) = (up(gpu, &conv(&c.dy)), up(gpu, &conv(&c.z)), up(gpu, &c.stats), up(gpu, &conv(&c.gamma)));
    let mut dz = up(gpu, &dz0.map_or_else(|| vec![act(f32::NAN); rows * cols], conv));
    let nan = vec![f32::NAN; cols];
    let (mut dg, mut db) = (up(gpu, dparams0.map_or(&nan[..], |p| p.0)), up(gpu, dparams0.map_or(&nan[..], |p| p.1)));
    let mut ws = nan32(gpu, layernorm_param_grad_workspace_len(rows, cols).max(1));
    let accumulate = dz0.is_some();
    {
        let inputs = LayerNormBackwardInputs { dy: dy.view(), z: z.view(), stats: stats.view(), gamma: gamma.view(), rows, cols };
        let mut params = LayerNormParamGrads { dgamma: Some(dg.view_mut()), dbeta: Some(db.view_mut()), workspace: ws.view_mut(), accumulate: dparams0.is_some() };
        match plan {
            None => layernorm_backward::<A, A>(gpu, &inputs, &mut dz.view_mut(), accumulate, Some(&mut params))?,
            Some(p) => layernorm_backward_with_plan::<A, A>(gpu, &inputs, &mut dz.view_mut(), accumulate, Some(&mut params), p)?,
        }
    }
    Ok(BwdGot { dz: down(gpu, &dz), dgamma: down(gpu, &dg), dbeta: down(gpu, &db) })
}

fn backward_bf16io_follows_the_rule<H: Io>(gpu: &Gpu) {
    let h = H::NAME;
    let mut rng = StdRng::seed_from_u64(0xbf16_00b4);
    let (mut worst, mut worst_acc) = (Worst::default(), Worst::default());
    let mut shapes: Vec<(usize, usize, Option<LayerNormPlan>)> = ROWS.iter().flat_map(|&r| COLS.iter().map(move |&c| (r, c, None))).collect();
    shapes.push((200, 48, None)); // several column-sum chunks
    shapes.push((3, 1100, None)); // a block per row, cached
    shapes.push((7, 384, Some(LayerNormPlan { threads_per_row: 32, rows_per_block: 8, cache_row: false })));
    shapes.push((3, 1100, Some(LayerNormPlan { threads_per_row: 96, rows_per_block: 1, cache_row: false })));
    for (rows, cols, plan) in shapes {
        let label = format!("{} {h}io layernorm backward rows={rows} cols={cols} {plan:?}", gpu.describe());
        let c = BwdCase::random::<H>(&mut rng, rows, cols);
        let (mean, rstd): (Vec<f32>, Vec<f32>) = c.stats.chunks(2).map(|s| (s[0], s[1])).unzip();
        let f32_ref = reference::layernorm_backward_from_stats(&c.dy, &c.z, &mean, &rstd, &c.gamma, cols);
        let plain = plain_layernorm_backward::<H>(&c.dy, &c.z, &c.stats, &c.gamma, cols);
        let (want_dg, want_db) = c.param_grads();

        // Overwrite: dz, dγ and dβ from NaN.
        let got = run_backward(gpu, &c, None, None, plan, H::from_f32).unwrap_or_else(|e| panic!("{label}: {e}"));
        let f32_kernel = run_backward(gpu, &c, None, None, plan, id).unwrap_or_else(|e| panic!("{label}: f32 kernel: {e}"));
        worst.note(&label, rule::assert_within_twice_plain_in::<H>(&format!("{label}: dz"), &rule::widen_from(&got.dz), &f32_ref, &plain));
        rule::assert_rounded_f32_kernel_in(gpu, &format!("{label}: dz"), &got.dz, &f32_kernel.dz);
        assert_same_f32(gpu, &format!("{label}: dgamma"), &got.dgamma, &f32_kernel.dgamma);
        assert_same_f32(gpu, &format!("{label}: dbeta"), &got.dbeta, &f32_kernel.dbeta);
        assert_close(&format!("{label}: dgamma"), &got.dgamma, &want_dg, 1e-4);
        assert_close(&format!("{label}: dbeta"), &got.dbeta, &want_db, 1e-4);

        // Accumulate: dz += (old dz in bf16, the sum rounded once); dγ, dβ += in f32.
        let dz0 = rule::round_all_in::<H>(&uniform(&mut rng, rows * cols, -1.0, 1.0));
        let (dg0, db0) = (uniform(&mut rng, cols, -1.0, 1.0), uniform(&mut rng, cols, -1.0, 1.0));
        let acc = run_backward(gpu, &c, Some(&dz0), Some((&dg0, &db0)), plan, H::from_f32).unwrap_or_else(|e| panic!("{label} +=: {e}"));
        let acc32 = run_backward(gpu, &c, Some(&dz0), Some((&dg0, &db0)), plan, id).unwrap_or_else(|e| panic!("{label} +=: f32 kernel: {e}"));
        let acc_ref: Vec<f32> = f32_ref.iter().zip(&dz0).map(|(a, b)| a + b).collect();
        // PyTorch accumulating into a bf16 .grad: the new gradient is a bf16 tensor, then the sum.
        let acc_plain: Vec<f32> = plain.iter().zip(&dz0).map(|(a, b)| rule::round_in::<H>(a + b)).collect();
        worst_acc.note(&label, rule::assert_within_twice_plain_in::<H>(&format!("{label}: dz +="), &rule::widen_from(&acc.dz), &acc_ref, &acc_plain));
        rule::assert_rounded_f32_kernel_in(gpu, &format!("{label}: dz +="), &acc.dz, &acc32.dz);
        assert_same_f32(gpu, &format!("{label}: dgamma +="), &acc.dgamma, &acc32.dgamma);
        assert_same_f32(gpu, &format!("{label}: dbeta +="), &acc.dbeta, &acc32.dbeta);
        let add = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x + y).collect::<Vec<f32>>();
        assert_close(&format!("{label}: dgamma +="), &acc.dgamma, &add(&dg0, &want_dg), 1e-4);
        assert_close(&format!("{label}: dbeta +="), &acc.dbeta, &add(&db0, &want_db), 1e-4);
    }
    worst.report(&format!("layernorm {h}io backward dz"), gpu);
    worst_acc.report(&format!("layernorm {h}io backward dz +="), gpu);
}
test_both!(backward, backward_bf16io_follows_the_rule);

// ---- refusals ---------------------------------------------------------------------------------------

fn expect_unsupported(label: &str, r: Result<(), Error>) {
    match r {
        Err(Error::Unsupported(msg)) => assert!(msg.contains("activations") && msg.contains("LayerNorm parameters"), "{label}: {msg}"),
        Err(e) => panic!("{label}: expected Error::Unsupported, got {e}"),
        Ok(()) => panic!("{label}: expected Error::Unsupported, the call succeeded"),
    }
}

fn pairs_without_a_kernel_are_refused<H: Io>(gpu: &Gpu) {
    let (rows, cols) = (3, 40);
    let n = rows * cols;
    let (x16, p16) = (up(gpu, &vec![H::from_f32(1.0); n]), up(gpu, &vec![H::from_f32(1.0); cols]));
    let (x32, p32) = (up(gpu, &vec![1f32; n]), up(gpu, &vec![1f32; cols]));
    let stats = up(gpu, &vec![0f32; 2 * rows]);
    let (mut y16, mut z16, mut y32, mut z32) = (nan16::<H>(gpu, n), nan16::<H>(gpu, n), nan32(gpu, n), nan32(gpu, n));
    let (mut mean, mut rstd, mut st) = (nan32(gpu, rows), nan32(gpu, rows), nan32(gpu, 2 * rows));
    {
        // bf16 activations with f32 γ/β: no forward kernel.
        let inputs = LayerNormInputs { x: x16.view(), residual: None, gamma: p32.view(), beta: p32.view(), rows, cols, eps: 1e-5 };
        let mut out = LayerNormOutputs { y: y16.view_mut(), mean: mean.view_mut(), rstd: rstd.view_mut() };
        expect_unsupported("forward bf16 x, f32 gamma", residual_layernorm_forward(gpu, &inputs, &mut out));
        let mut out = LayerNormTrainOutputs { y: y16.view_mut(), z: z16.view_mut(), stats: st.view_mut() };
        expect_unsupported("train forward bf16 x, f32 gamma", residual_layernorm_forward_train(gpu, &inputs, &mut out));
        // f32 activations with bf16 γ/β: the forward has it (_bf16), the training forward not.
        let inputs = LayerNormInputs { x: x32.view(), residual: None, gamma: p16.view(), beta: p16.view(), rows, cols, eps: 1e-5 };
        let mut out = LayerNormTrainOutputs { y: y32.view_mut(), z: z32.view_mut(), stats: st.view_mut() };
        expect_unsupported("train forward f32 x, bf16 gamma", residual_layernorm_forward_train(gpu, &inputs, &mut out));
        // The backward: bf16 dy/z with f32 γ, and f32 dy/z with bf16 γ.
        let inputs = LayerNormBackwardInputs { dy: x16.view(), z: x16.view(), stats: stats.view(), gamma: p32.view(), rows, cols };
        expect_unsupported("backward bf16 dy, f32 gamma", layernorm_backward(gpu, &inputs, &mut y16.view_mut(), false, None));
        let inputs = LayerNormBackwardInputs { dy: x32.view(), z: x32.view(), stats: stats.view(), gamma: p16.view(), rows, cols };
        expect_unsupported("backward f32 dy, bf16 gamma", layernorm_backward(gpu, &inputs, &mut y32.view_mut(), false, None));
    }
    assert!(down(gpu, &y16).iter().chain(&down(gpu, &z16)).all(|v| v.to_f32().is_nan()), "a refused launch wrote a bf16 output");
    assert!(down(gpu, &y32).iter().chain(&down(gpu, &z32)).chain(&down(gpu, &mean)).chain(&down(gpu, &st)).all(|v| v.is_nan()), "a refused launch wrote an f32 output");
}
test_both!(unsupported_pairs, pairs_without_a_kernel_are_refused);

/// Lengths count bf16 elements, and the overlap check bytes: two bf16 outputs side by side in one
/// buffer (an odd width, so the second starts in the middle of a 4-byte word) are accepted, one
/// element of overlap is refused.
fn bf16_views_are_checked_in_their_own_units<H: Io>(gpu: &Gpu) {
    let (rows, cols) = (1, 41);
    let mut rng = StdRng::seed_from_u64(0xbf16_000b);
    let case = FwdCase::random::<H>(&mut rng, rows, cols, true);
    let (x, r) = (up(gpu, &rule::to_half::<H>(&case.x)), up(gpu, &rule::to_half::<H>(case.residual.as_deref().unwrap())));
    let (g, b) = (up(gpu, &rule::to_half::<H>(&case.gamma)), up(gpu, &rule::to_half::<H>(&case.beta)));
    let both = nan16::<H>(gpu, 2 * cols);
    let mut stats = nan32(gpu, 2);
    let inputs = LayerNormInputs { x: x.view(), residual: Some(r.view()), gamma: g.view(), beta: b.view(), rows, cols, eps: BERT_EPS };
    {
        // y = [0, 41), z = [40, 81): one bf16 element shared.
        let (head, tail) = (both.slice(0..cols).unwrap().device_ptr(), both.slice(cols - 1..2 * cols - 1).unwrap());
        assert_eq!(tail.device_ptr(), head + 2 * (cols as u64 - 1));
        // SAFETY: nothing else uses `both` while these views live; the launcher must refuse them.
        let (y, z) = unsafe { (both.slice(0..cols).unwrap().assume_writable(), tail.assume_writable()) };
        let mut out = LayerNormTrainOutputs { y, z, stats: stats.view_mut() };
        match residual_layernorm_forward_train(gpu, &inputs, &mut out) {
            Err(Error::Input(msg)) => assert!(msg.contains("overlaps"), "{msg}"),
            other => panic!("overlapping y and z: expected an overlap error, got {other:?}"),
        }
    }
    assert!(down(gpu, &both).iter().all(|v| v.to_f32().is_nan()), "a refused launch wrote");
    {
        // y = [0, 41), z = [41, 82): adjacent, z starting at byte 82 (not a multiple of 4).
        // SAFETY: nothing else uses `both` while these views live, and they are disjoint.
        let (y, z) = unsafe { (both.slice(0..cols).unwrap().assume_writable(), both.slice(cols..2 * cols).unwrap().assume_writable()) };
        let mut out = LayerNormTrainOutputs { y, z, stats: stats.view_mut() };
        residual_layernorm_forward_train(gpu, &inputs, &mut out).expect("adjacent bf16 y and z do not overlap");
    }
    let got = down(gpu, &both);
    let alone = run_train(gpu, &case, None, H::from_f32).unwrap();
    assert_eq!((&got[..cols], &got[cols..]), (&alone.y[..], &alone.z[..]), "y and z side by side");
    // A bf16 x one element short is a shape error, before any launch.
    let short = LayerNormInputs { x: x.slice(0..cols - 1).unwrap(), ..inputs };
    let mut y = nan16::<H>(gpu, cols);
    let (mut mean, mut rstd) = (nan32(gpu, 1), nan32(gpu, 1));
    let mut out = LayerNormOutputs { y: y.view_mut(), mean: mean.view_mut(), rstd: rstd.view_mut() };
    assert!(matches!(residual_layernorm_forward(gpu, &short, &mut out), Err(Error::Shape { .. })), "a short bf16 x");
}
test_both!(view_units, bf16_views_are_checked_in_their_own_units);

/// bf16 and f16 never meet in one launch: f16 activations with bf16 γ/β, and bf16 activations with
/// f16 γ/β, have no kernel (forward, training forward, backward), and a refused launch writes
/// nothing.
fn mixed_16bit_pairs_are_refused(gpu: &Gpu) {
    let (rows, cols) = (3, 40);
    let n = rows * cols;
    let (xb, pb) = (up(gpu, &vec![bf16::ONE; n]), up(gpu, &vec![bf16::ONE; cols]));
    let (xh, ph) = (up(gpu, &vec![f16::ONE; n]), up(gpu, &vec![f16::ONE; cols]));
    let stats = up(gpu, &vec![0f32; 2 * rows]);
    let (mut yb, mut yh, mut zh) = (nan16::<bf16>(gpu, n), nan16::<f16>(gpu, n), nan16::<f16>(gpu, n));
    let (mut mean, mut rstd, mut st) = (nan32(gpu, rows), nan32(gpu, rows), nan32(gpu, 2 * rows));
    {
        let inputs = LayerNormInputs { x: xh.view(), residual: None, gamma: pb.view(), beta: pb.view(), rows, cols, eps: 1e-5 };
        let mut out = LayerNormOutputs { y: yh.view_mut(), mean: mean.view_mut(), rstd: rstd.view_mut() };
        expect_unsupported("forward f16 x, bf16 gamma", residual_layernorm_forward(gpu, &inputs, &mut out));
        let mut out = LayerNormTrainOutputs { y: yh.view_mut(), z: zh.view_mut(), stats: st.view_mut() };
        expect_unsupported("train forward f16 x, bf16 gamma", residual_layernorm_forward_train(gpu, &inputs, &mut out));
        let inputs = LayerNormInputs { x: xb.view(), residual: None, gamma: ph.view(), beta: ph.view(), rows, cols, eps: 1e-5 };
        let mut out = LayerNormOutputs { y: yb.view_mut(), mean: mean.view_mut(), rstd: rstd.view_mut() };
        expect_unsupported("forward bf16 x, f16 gamma", residual_layernorm_forward(gpu, &inputs, &mut out));
        let inputs = LayerNormBackwardInputs { dy: xh.view(), z: xh.view(), stats: stats.view(), gamma: pb.view(), rows, cols };
        expect_unsupported("backward f16 dy, bf16 gamma", layernorm_backward(gpu, &inputs, &mut yh.view_mut(), false, None));
    }
    assert!(down(gpu, &yh).iter().chain(&down(gpu, &zh)).all(|v| v.is_nan()) && down(gpu, &yb).iter().all(|v| v.is_nan()), "a refused launch wrote a 16-bit output");
    assert!(down(gpu, &mean).iter().chain(&down(gpu, &st)).all(|v| v.is_nan()), "a refused launch wrote an f32 output");
}
test_device!(mixed_16bit_pairs, mixed_16bit_pairs_are_refused);
