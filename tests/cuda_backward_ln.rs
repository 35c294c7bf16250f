//! The CUDA training step's backward and optimizer kernels against the CPU backend, one body per
//! device (`test_device!`: `*::cuda_sim` on the executor in the forward, reverse and random
//! schedules; `*::cuda` on a GPU, `SKIPPED: ...` without one, a failure under `REQUIRE_GPU=1`):
//!
//! - the training LayerNorm forward (`y`, `z`, `[mean, rstd]`) vs `Backend::residual_layernorm_stats`;
//! - the LayerNorm backward `dz` vs `Backend::layernorm_backward_stats`, overwrite and accumulate,
//!   and dγ/dβ (only when asked) vs an f64 sum from the same statistics;
//! - `dy ⊙ act'(pre)` for every activation vs `cpu::reference::activation_backward`;
//! - the Linear backward over `Gpu::gemm` (`dx`, `dx ⊙ act'`, `dW`, `db`, overwrite and accumulate)
//!   vs `Backend::linear_backward_{input_into, input_act, params_into}`;
//! - the first-token scatter vs `Backend::first_token_backward_into`, bit for bit;
//! - the gradient norm and clip vs `Backend::clip_grad_norm` (a NaN and an infinite gradient
//!   included), and AdamW over several steps (segments skipped, a non-finite flag, a new learning
//!   rate) vs `Backend::adamw`;
//! - the three executor schedules agree bit for bit, and every size error is refused before a
//!   launch (the NaN-poisoned outputs stay NaN).
//!
//! Tolerances, against the CPU backend's reference mode (f64 inside, rounded to f32 once):
//! outputs (the forward's y and statistics) `max|out − ref| <= 1e-5·(1 + max|ref|)`, gradients
//! `1e-4·(1 + max|ref|)` (the LayerNorm tests' bounds). The kernels' own error is ~1e-6 of the
//! scale (f32 sums of a few dozen terms per thread before fixed trees; the GEMM's f32 dot products
//! of at most 384 O(1) terms), so the bounds leave a wide margin yet catch any wrong index,
//! missed element or formula (errors of 1e-2 and more). The gradient norm is compared within
//! 1e-6 relative (it is f64 inside, like the CPU's), AdamW bit for bit on the executor (the same
//! f32 operations and fmas in the same order, glibc's pow) and within 1e-6 relative on a GPU (CUDA's
//! f64 pow is within 2 ulp). Every output starts as NaN, so an element a kernel skips cannot pass.

use std::ops::Range;

use bert_adapters::cpu::reference;
use bert_adapters::cuda::elementwise::{activation_backward, activation_backward_in_place, bias_grad, bias_grad_workspace_len, first_token_backward, linear_backward_input, linear_backward_input_act, linear_backward_params, ColumnChunks, LinearDims, LinearParamGrads};
use bert_adapters::cuda::gpu::{DeviceBuffer, DeviceScalar, Gpu, GpuKind};
use bert_adapters::cuda::layernorm::{
    layernorm_backward, layernorm_backward_plan, layernorm_backward_shared_bytes, layernorm_backward_with_plan, layernorm_param_grad_workspace_len, residual_layernorm_forward_train, residual_layernorm_forward_train_with_plan, LayerNormBackwardInputs,
    LayerNormInputs, LayerNormParamGrads, LayerNormPlan, LayerNormTrainOutputs,
};
use bert_adapters::cuda::optim::{adamw, clip_grad_norm, grad_norm, AdamWBuffers, AdamWSegments, GradViews};
use bert_adapters::cuda::probe::report_line;
use bert_adapters::train::optim::{split_f64, AdamWConfig, AdamWLaunch};
use bert_adapters::{test_device, Activation, Backend, CpuBackend, Error, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ALL_ACTS: [Option<Activation>; 7] = [None, Some(Activation::Relu), Some(Activation::Gelu), Some(Activation::GeluNew), Some(Activation::Swish), Some(Activation::Tanh), Some(Activation::Sigmoid)];
const BERT_EPS: f32 = 1e-12;

fn up<T: DeviceScalar>(gpu: &Gpu, v: &[T]) -> DeviceBuffer<T> {
    gpu.upload(v).unwrap_or_else(|e| panic!("upload: {e}"))
}

fn nan_buf(gpu: &Gpu, n: usize) -> DeviceBuffer<f32> {
    up(gpu, &vec![f32::NAN; n])
}

fn down<T: DeviceScalar>(gpu: &Gpu, b: &DeviceBuffer<T>) -> Vec<T> {
    gpu.download(&b.view()).unwrap_or_else(|e| panic!("download: {e}"))
}

fn uniform(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn t(data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(data.to_vec(), shape).unwrap()
}

fn host(cpu: &CpuBackend, x: &Tensor) -> Vec<f32> {
    cpu.to_host(x).unwrap()
}

/// Asserts every element finite and `|got − want| <= rel·(1 + max|want|)`; returns max|err|/tol.
fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let tol = rel * (1.0 + scale);
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        if !g.is_finite() || err.is_nan() || err > tol {
            panic!("{what}: [{i}] = {g}, reference {w}, |err| {err:e} > tol {tol:e}");
        }
        worst = worst.max(err / tol);
    }
    worst
}

fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}: [{i}] = {g}, expected {w} bit for bit");
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn expect_err(what: &str, r: Result<(), Error>) {
    match r {
        Err(Error::Shape { .. }) | Err(Error::Input(_)) => {}
        Err(e) => panic!("{what}: expected a shape or input error, got {e}"),
        Ok(()) => panic!("{what}: expected an error, the call succeeded"),
    }
}

/// The row counts and widths every family runs: a single row, a partial block, several blocks;
/// below, at and above a warp's multiple, and BERT-small's 384. A width above 1024 (the
/// block-per-row plans) runs separately.
const ROWS: [usize; 3] = [1, 7, 33];
const COLS: [usize; 3] = [40, 48, 384];

// ---- LayerNorm: training forward -----------------------------------------------------------------

struct TrainFwd {
    y: Vec<f32>,
    z: Vec<f32>,
    stats: Vec<f32>,
}

fn run_train_forward(gpu: &Gpu, x: &[f32], residual: Option<&[f32]>, gamma: &[f32], beta: &[f32], (rows, cols): (usize, usize), plan: Option<LayerNormPlan>) -> TrainFwd {
    let (dx, dg, db) = (up(gpu, x), up(gpu, gamma), up(gpu, beta));
    let dr = residual.map(|r| up(gpu, r));
    let (mut y, mut z, mut stats) = (nan_buf(gpu, rows * cols), nan_buf(gpu, rows * cols), nan_buf(gpu, 2 * rows));
    {
        let inputs = LayerNormInputs { x: dx.view(), residual: dr.as_ref().map(|r| r.view()), gamma: dg.view(), beta: db.view(), rows, cols, eps: BERT_EPS };
        let mut out = LayerNormTrainOutputs { y: y.view_mut(), z: z.view_mut(), stats: stats.view_mut() };
        match plan {
            None => residual_layernorm_forward_train(gpu, &inputs, &mut out),
            Some(p) => residual_layernorm_forward_train_with_plan(gpu, &inputs, &mut out, p),
        }
        .unwrap_or_else(|e| panic!("rows={rows} cols={cols}: {e}"));
    }
    TrainFwd { y: down(gpu, &y), z: down(gpu, &z), stats: down(gpu, &stats) }
}

fn train_forward_matches_cpu(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x7a1_f0d);
    let cpu = CpuBackend::reference();
    let mut worst = 0f32;
    let mut shapes: Vec<(usize, usize, Option<LayerNormPlan>)> = ROWS.iter().flat_map(|&r| COLS.iter().map(move |&c| (r, c, None))).collect();
    shapes.push((3, 1100, None)); // a block per row, cached
    shapes.push((7, 384, Some(LayerNormPlan { threads_per_row: 32, rows_per_block: 8, cache_row: false })));
    shapes.push((3, 1100, Some(LayerNormPlan { threads_per_row: 64, rows_per_block: 1, cache_row: false })));
    for (rows, cols, plan) in shapes {
        for with_residual in [false, true] {
            let label = format!("{} train forward rows={rows} cols={cols} residual={with_residual} {plan:?}", gpu.describe());
            let x = uniform(&mut rng, rows * cols, -2.0, 2.0);
            let r = with_residual.then(|| uniform(&mut rng, rows * cols, -2.0, 2.0));
            let (g, b) = (uniform(&mut rng, cols, 0.5, 1.5), uniform(&mut rng, cols, -0.5, 0.5));
            let got = run_train_forward(gpu, &x, r.as_deref(), &g, &b, (rows, cols), plan);
            let rt = r.as_ref().map(|r| t(r, &[rows, cols]));
            let (y, z, stats) = cpu.residual_layernorm_stats(&t(&x, &[rows, cols]), rt.as_ref(), &t(&g, &[cols]), &t(&b, &[cols]), BERT_EPS).unwrap();
            assert_eq!(stats.shape(), &[rows, 2]);
            worst = worst.max(assert_close(&format!("{label}: y"), &got.y, &host(&cpu, &y), 1e-5));
            assert_bits(&format!("{label}: z = x + residual"), &got.z, &host(&cpu, &z));
            worst = worst.max(assert_close(&format!("{label}: stats"), &got.stats, &host(&cpu, &stats), 1e-5));
        }
    }
    report_line(&format!("layernorm train forward on {}: worst max|err|/tol = {worst:.3}", gpu.describe()));
}
test_device!(train_forward, train_forward_matches_cpu);

// ---- LayerNorm: backward ----------------------------------------------------------------------------

struct LnCase {
    rows: usize,
    cols: usize,
    dy: Vec<f32>,
    z: Vec<f32>,
    stats: Vec<f32>,
    gamma: Vec<f32>,
}

impl LnCase {
    fn random(rng: &mut StdRng, cpu: &CpuBackend, rows: usize, cols: usize) -> LnCase {
        // z with an offset and spread per row (|mean| >> std in some rows), its statistics from
        // the CPU's training forward, as the backward receives them.
        let mut z = Vec::with_capacity(rows * cols);
        for _ in 0..rows {
            let (m, s) = (rng.random_range(-3.0f32..3.0), rng.random_range(0.1f32..2.0));
            z.extend((0..cols).map(|_| m + s * rng.random_range(-1.0f32..1.0)));
        }
        let gamma = uniform(rng, cols, 0.5, 1.5);
        let beta = vec![0f32; cols];
        let (_, _, stats) = cpu.residual_layernorm_stats(&t(&z, &[rows, cols]), None, &t(&gamma, &[cols]), &t(&beta, &[cols]), BERT_EPS).unwrap();
        LnCase { rows, cols, dy: uniform(rng, rows * cols, -1.0, 1.0), z, stats: host(cpu, &stats), gamma }
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

struct LnGot {
    dz: Vec<f32>,
    dgamma: Vec<f32>,
    dbeta: Vec<f32>,
}

/// Runs the backward with `init` in every destination (NaN to check writes, values to check
/// accumulation); `which` = (dγ asked, dβ asked).
fn run_ln_backward(gpu: &Gpu, c: &LnCase, init: (&[f32], &[f32], &[f32]), accumulate: bool, which: Option<(bool, bool)>, plan: Option<LayerNormPlan>) -> Result<LnGot, Error> {
    let (dy, z, stats, gamma) = (up(gpu, &c.dy), up(gpu, &c.z), up(gpu, &c.stats), up(gpu, &c.gamma));
    let (mut dz, mut dg, mut db) = (up(gpu, init.0), up(gpu, init.1), up(gpu, init.2));
    let mut ws = nan_buf(gpu, layernorm_param_grad_workspace_len(c.rows, c.cols).max(1));
    {
        let inputs = LayerNormBackwardInputs { dy: dy.view(), z: z.view(), stats: stats.view(), gamma: gamma.view(), rows: c.rows, cols: c.cols };
        let mut params = which.map(|(g, b)| LayerNormParamGrads { dgamma: g.then(|| dg.view_mut()), dbeta: b.then(|| db.view_mut()), workspace: ws.view_mut(), accumulate });
        match plan {
            None => layernorm_backward(gpu, &inputs, &mut dz.view_mut(), accumulate, params.as_mut())?,
            Some(p) => layernorm_backward_with_plan(gpu, &inputs, &mut dz.view_mut(), accumulate, params.as_mut(), p)?,
        }
    }
    Ok(LnGot { dz: down(gpu, &dz), dgamma: down(gpu, &dg), dbeta: down(gpu, &db) })
}

fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

fn ln_backward_matches_cpu(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x1b_ac4);
    let cpu = CpuBackend::reference();
    let mut worst = 0f32;
    let mut shapes: Vec<(usize, usize, Option<LayerNormPlan>)> = ROWS.iter().flat_map(|&r| COLS.iter().map(move |&c| (r, c, None))).collect();
    shapes.push((200, 48, None)); // several column-sum chunks
    shapes.push((3, 1100, None)); // a block per row, cached
    shapes.push((7, 384, Some(LayerNormPlan { threads_per_row: 32, rows_per_block: 8, cache_row: false })));
    shapes.push((3, 1100, Some(LayerNormPlan { threads_per_row: 96, rows_per_block: 1, cache_row: false })));
    shapes.push((3, 40, Some(LayerNormPlan { threads_per_row: 1024, rows_per_block: 1, cache_row: true })));
    for (rows, cols, plan) in shapes {
        let label = format!("{} layernorm backward rows={rows} cols={cols} {plan:?}", gpu.describe());
        let c = LnCase::random(&mut rng, &cpu, rows, cols);
        let want_dz = host(&cpu, &cpu.layernorm_backward_stats(&t(&c.dy, &[rows, cols]), &t(&c.z, &[rows, cols]), &t(&c.stats, &[rows, 2]), &t(&c.gamma, &[cols])).unwrap());
        let (want_dg, want_db) = c.param_grads();
        let nan = (vec![f32::NAN; rows * cols], vec![f32::NAN; cols], vec![f32::NAN; cols]);
        // Overwrite, with both parameter gradients.
        let got = run_ln_backward(gpu, &c, (&nan.0, &nan.1, &nan.2), false, Some((true, true)), plan).unwrap_or_else(|e| panic!("{label}: {e}"));
        worst = worst.max(assert_close(&format!("{label}: dz"), &got.dz, &want_dz, 1e-4));
        worst = worst.max(assert_close(&format!("{label}: dgamma"), &got.dgamma, &want_dg, 1e-4));
        worst = worst.max(assert_close(&format!("{label}: dbeta"), &got.dbeta, &want_db, 1e-4));
        // The same launch again gives the same bits (fixed reduction orders).
        let again = run_ln_backward(gpu, &c, (&nan.0, &nan.1, &nan.2), false, Some((true, true)), plan).unwrap();
        assert_eq!((bits(&got.dz), bits(&got.dgamma)), (bits(&again.dz), bits(&again.dgamma)), "{label}: not deterministic");
        // Accumulate into existing values.
        let init = (uniform(&mut rng, rows * cols, -1.0, 1.0), uniform(&mut rng, cols, -1.0, 1.0), uniform(&mut rng, cols, -1.0, 1.0));
        let acc = run_ln_backward(gpu, &c, (&init.0, &init.1, &init.2), true, Some((true, true)), plan).unwrap();
        worst = worst.max(assert_close(&format!("{label}: dz +="), &acc.dz, &add(&init.0, &want_dz), 1e-4));
        worst = worst.max(assert_close(&format!("{label}: dgamma +="), &acc.dgamma, &add(&init.1, &want_dg), 1e-4));
        worst = worst.max(assert_close(&format!("{label}: dbeta +="), &acc.dbeta, &add(&init.2, &want_db), 1e-4));
        if plan.is_none() && cols == 48 {
            // Frozen LayerNorm (no parameter gradients), only dγ, only dβ: the others untouched.
            let frozen = run_ln_backward(gpu, &c, (&nan.0, &nan.1, &nan.2), false, None, None).unwrap();
            assert_eq!(bits(&frozen.dz), bits(&got.dz), "{label}: dz without parameter gradients");
            assert!(frozen.dgamma.iter().chain(&frozen.dbeta).all(|v| v.is_nan()), "{label}: a frozen LayerNorm wrote dgamma/dbeta");
            let only_g = run_ln_backward(gpu, &c, (&nan.0, &nan.1, &nan.2), false, Some((true, false)), None).unwrap();
            assert_eq!(bits(&only_g.dgamma), bits(&got.dgamma), "{label}: dgamma alone");
            assert!(only_g.dbeta.iter().all(|v| v.is_nan()), "{label}: dbeta written when not asked");
            let only_b = run_ln_backward(gpu, &c, (&nan.0, &nan.1, &nan.2), false, Some((false, true)), None).unwrap();
            assert_eq!(bits(&only_b.dbeta), bits(&got.dbeta), "{label}: dbeta alone");
            assert!(only_b.dgamma.iter().all(|v| v.is_nan()), "{label}: dgamma written when not asked");
        }
    }
    report_line(&format!("layernorm backward on {}: worst max|err|/tol = {worst:.3}", gpu.describe()));
}
test_device!(layernorm_backward_grads, ln_backward_matches_cpu);

// ---- activation backward ---------------------------------------------------------------------------

fn activation_backward_matches_cpu(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xac7);
    let mut worst = 0f32;
    for act in ALL_ACTS {
        for (rows, cols) in [(1, 40), (7, 48), (33, 384)] {
            let n = rows * cols;
            let dy = uniform(&mut rng, n, -2.0, 2.0);
            let mut pre = uniform(&mut rng, n, -6.0, 6.0);
            // The tails and the kinks: large |x| (exp overflow in swish/sigmoid), 0, tiny values.
            for (i, v) in [-100.0, -30.0, -9.0, -1e-30, 0.0, 1e-30, 9.0, 30.0, 100.0].into_iter().enumerate() {
                if i < n {
                    pre[i] = v;
                }
            }
            let label = format!("{} activation_backward {act:?} rows={rows} cols={cols}", gpu.describe());
            let want = match act {
                Some(a) => reference::activation_backward(&dy, &pre, a),
                None => dy.clone(),
            };
            let (ddy, dpre) = (up(gpu, &dy), up(gpu, &pre));
            let mut dx = nan_buf(gpu, n);
            activation_backward(gpu, &ddy.view(), &dpre.view(), act, &mut dx.view_mut()).unwrap_or_else(|e| panic!("{label}: {e}"));
            let got = down(gpu, &dx);
            worst = worst.max(assert_close(&label, &got, &want, 1e-4));
            // In place gives the same bits.
            let mut d = up(gpu, &dy);
            activation_backward_in_place(gpu, &mut d.view_mut(), &dpre.view(), act).unwrap();
            assert_bits(&format!("{label} in place"), &down(gpu, &d), &got);
        }
    }
    report_line(&format!("activation backward on {}: worst max|err|/tol = {worst:.3}", gpu.describe()));
}
test_device!(activation_backward_all, activation_backward_matches_cpu);

// ---- Linear backward -----------------------------------------------------------------------------------

fn linear_backward_matches_cpu(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x11ea4);
    let cpu = CpuBackend::reference();
    let mut worst = 0f32;
    for rows in [0, 1, 7, 33, 200] {
        for (d_in, d_out) in [(40, 48), (48, 384), (384, 40)] {
            if (rows == 200 || rows == 0) && d_in != 40 {
                continue;
            }
            let dims = LinearDims { rows, d_in, d_out };
            let label = format!("{} linear backward rows={rows} d_in={d_in} d_out={d_out}", gpu.describe());
            let s = 1.0 / (d_in as f32).sqrt();
            let (x, w, dy) = (uniform(&mut rng, rows * d_in, -1.0, 1.0), uniform(&mut rng, d_out * d_in, -s, s), uniform(&mut rng, rows * d_out, -1.0, 1.0));
            let (tx, tw, tdy) = (t(&x, &[rows, d_in]), t(&w, &[d_out, d_in]), t(&dy, &[rows, d_out]));
            let (gx, gw, gdy) = (up(gpu, &x), up(gpu, &w), up(gpu, &dy));
            for accumulate in [false, true] {
                let tag = format!("{label} accumulate={accumulate}");
                // Input gradient.
                let init = if accumulate { uniform(&mut rng, rows * d_in, -1.0, 1.0) } else { vec![f32::NAN; rows * d_in] };
                let want = t(&init, &[rows, d_in]);
                cpu.linear_backward_input_into(&tdy, &tw, &want, accumulate).unwrap();
                let mut dx = up(gpu, &init);
                linear_backward_input(gpu, &gdy.view(), &gw.view(), dims, &mut dx.view_mut(), accumulate).unwrap_or_else(|e| panic!("{tag}: {e}"));
                worst = worst.max(assert_close(&format!("{tag}: dx"), &down(gpu, &dx), &host(&cpu, &want), 1e-4));
                // Parameter gradients.
                let (init_w, init_b) = if accumulate { (uniform(&mut rng, d_out * d_in, -1.0, 1.0), uniform(&mut rng, d_out, -1.0, 1.0)) } else { (vec![f32::NAN; d_out * d_in], vec![f32::NAN; d_out]) };
                let (want_w, want_b) = (t(&init_w, &[d_out, d_in]), t(&init_b, &[d_out]));
                cpu.linear_backward_params_into(&tdy, &tx, &want_w, Some(&want_b), accumulate).unwrap();
                let (mut dw, mut db) = (up(gpu, &init_w), up(gpu, &init_b));
                let mut ws = nan_buf(gpu, bias_grad_workspace_len(rows, d_out));
                let mut grads = LinearParamGrads { dw: dw.view_mut(), db: Some(db.view_mut()), workspace: Some(ws.view_mut()), accumulate };
                linear_backward_params(gpu, &gdy.view(), &gx.view(), dims, &mut grads).unwrap_or_else(|e| panic!("{tag}: {e}"));
                worst = worst.max(assert_close(&format!("{tag}: dw"), &down(gpu, &dw), &host(&cpu, &want_w), 1e-4));
                worst = worst.max(assert_close(&format!("{tag}: db"), &down(gpu, &db), &host(&cpu, &want_b), 1e-4));
            }
            // Without a bias: dw only, no workspace needed.
            let want_w = t(&vec![0f32; d_out * d_in], &[d_out, d_in]);
            cpu.linear_backward_params_into(&tdy, &tx, &want_w, None, false).unwrap();
            let mut dw = nan_buf(gpu, d_out * d_in);
            linear_backward_params(gpu, &gdy.view(), &gx.view(), dims, &mut LinearParamGrads { dw: dw.view_mut(), db: None, workspace: None, accumulate: false }).unwrap();
            worst = worst.max(assert_close(&format!("{label}: dw without bias"), &down(gpu, &dw), &host(&cpu, &want_w), 1e-4));
            // (dy·W) ⊙ act'(pre).
            let pre = uniform(&mut rng, rows * d_in, -4.0, 4.0);
            let gpre = up(gpu, &pre);
            for act in [Activation::Gelu, Activation::Relu, Activation::Tanh] {
                let want = host(&cpu, &cpu.linear_backward_input_act(&tdy, &tw, &t(&pre, &[rows, d_in]), act).unwrap());
                let mut dx = nan_buf(gpu, rows * d_in);
                linear_backward_input_act(gpu, &gdy.view(), &gw.view(), &gpre.view(), Some(act), dims, &mut dx.view_mut()).unwrap();
                worst = worst.max(assert_close(&format!("{label}: dx ⊙ {act:?}'"), &down(gpu, &dx), &want, 1e-4));
            }
        }
    }
    report_line(&format!("linear backward on {}: worst max|err|/tol = {worst:.3}", gpu.describe()));
}
test_device!(linear_backward_grads, linear_backward_matches_cpu);

fn bias_grad_matches_cpu(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xb1a5);
    for rows in [0, 1, 7, 33, 200, 1030] {
        for cols in [1, 40, 384] {
            if rows * cols > 200 * 384 {
                continue;
            }
            let label = format!("{} bias_grad rows={rows} cols={cols}", gpu.describe());
            let dy = uniform(&mut rng, rows * cols, -1.0, 1.0);
            let mut want = vec![0f64; cols];
            for r in 0..rows {
                for c in 0..cols {
                    want[c] += dy[r * cols + c] as f64;
                }
            }
            let want: Vec<f32> = want.into_iter().map(|v| v as f32).collect();
            let gdy = up(gpu, &dy);
            let mut db = nan_buf(gpu, cols);
            let mut ws = nan_buf(gpu, bias_grad_workspace_len(rows, cols).max(1));
            bias_grad(gpu, &gdy.view(), cols, &mut db.view_mut(), false, &mut ws.view_mut()).unwrap_or_else(|e| panic!("{label}: {e}"));
            let got = down(gpu, &db);
            assert_close(&label, &got, &want, 1e-4);
            bias_grad(gpu, &gdy.view(), cols, &mut db.view_mut(), true, &mut ws.view_mut()).unwrap();
            assert_close(&format!("{label} +="), &down(gpu, &db), &add(&got, &want), 1e-4);
        }
    }
}
test_device!(bias_grad_column_sums, bias_grad_matches_cpu);

// ---- first-token scatter ------------------------------------------------------------------------------

fn first_token_backward_matches_cpu(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xf1b);
    let cpu = CpuBackend::reference();
    for (batch, seq_len) in [(1, 1), (7, 1), (7, 5), (33, 3)] {
        for hidden in [40, 48, 384] {
            let n = batch * seq_len * hidden;
            let d = uniform(&mut rng, batch * hidden, -2.0, 2.0);
            let gd = up(gpu, &d);
            for accumulate in [false, true] {
                let label = format!("{} first_token_backward batch={batch} seq_len={seq_len} hidden={hidden} accumulate={accumulate}", gpu.describe());
                let init = if accumulate { uniform(&mut rng, n, -1.0, 1.0) } else { vec![f32::NAN; n] };
                let want = t(&init, &[batch, seq_len, hidden]);
                cpu.first_token_backward_into(&t(&d, &[batch, hidden]), &want, accumulate).unwrap();
                let mut out = up(gpu, &init);
                first_token_backward(gpu, &gd.view(), batch, seq_len, hidden, &mut out.view_mut(), accumulate).unwrap_or_else(|e| panic!("{label}: {e}"));
                assert_bits(&label, &down(gpu, &out), &host(&cpu, &want));
            }
        }
    }
}
test_device!(first_token_scatter, first_token_backward_matches_cpu);

// ---- gradient norm and clip ---------------------------------------------------------------------------

/// Gradient tensors of awkward lengths: one element, a partial block, empty, several blocks.
const GRAD_LENS: [usize; 5] = [1, 40, 0, 5000, 9000];

/// Runs the device clip on `grads` (a list of host vectors, uploaded into one arena as disjoint
/// views) and the CPU's on the same values; compares the norm and the gradients.
fn check_clip(gpu: &Gpu, grads: &[Vec<f32>], max_norm: f32, label: &str) -> (f32, Vec<Vec<f32>>) {
    let cpu = CpuBackend::reference();
    let tensors: Vec<Tensor> = grads.iter().map(|g| t(g, &[g.len()])).collect();
    let norm_t = t(&[f32::NAN], &[1]);
    cpu.clip_grad_norm(&tensors, max_norm, &norm_t).unwrap();
    let want_norm = host(&cpu, &norm_t)[0];
    let flat: Vec<f32> = grads.concat();
    let arena = up(gpu, &flat);
    let mut norm = nan_buf(gpu, 1);
    {
        let mut at = 0;
        let views: Vec<_> = grads
            .iter()
            .map(|g| {
                at += g.len();
                // SAFETY: disjoint windows of one buffer, as a gradient arena hands them out;
                // nothing else touches the arena while they live.
                unsafe { arena.slice(at - g.len()..at).unwrap().assume_writable() }
            })
            .collect();
        let mut table = GradViews::new(gpu, &views).unwrap_or_else(|e| panic!("{label}: {e}"));
        if max_norm.is_infinite() {
            grad_norm(gpu, &mut table, &mut norm.view_mut()).unwrap();
        } else {
            clip_grad_norm(gpu, &mut table, max_norm, &mut norm.view_mut()).unwrap_or_else(|e| panic!("{label}: {e}"));
        }
    }
    let got_norm = down(gpu, &norm)[0];
    if want_norm.is_nan() {
        assert!(got_norm.is_nan(), "{label}: norm {got_norm}, expected NaN");
    } else {
        let tol = 1e-6 * want_norm.abs();
        assert!((got_norm - want_norm).abs() <= tol || got_norm == want_norm, "{label}: norm {got_norm}, CPU {want_norm}");
    }
    let got = down(gpu, &arena);
    let mut at = 0;
    let mut out = Vec::new();
    for (i, tensor) in tensors.iter().enumerate() {
        let w = host(&cpu, tensor);
        let g = &got[at..at + w.len()];
        for (j, (a, b)) in g.iter().zip(&w).enumerate() {
            let ok = (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-6 * b.abs() || a == b;
            assert!(ok, "{label}: grad {i}[{j}] = {a}, CPU {b}");
        }
        at += w.len();
        out.push(g.to_vec());
    }
    (got_norm, out)
}

fn clip_matches_cpu(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xc11b);
    let grads: Vec<Vec<f32>> = GRAD_LENS.iter().map(|&n| uniform(&mut rng, n, -0.05, 0.05)).collect();
    // The total norm here is about 0.05·sqrt(14041/3) ≈ 3.4.
    for max_norm in [1.0, 3.0, 1e3, f32::INFINITY, 0.0] {
        check_clip(gpu, &grads, max_norm, &format!("{} clip max_norm={max_norm}", gpu.describe()));
    }
    // A NaN gradient: the norm is NaN and every gradient becomes NaN, as torch's.
    let mut bad = grads.clone();
    bad[3][1234] = f32::NAN;
    let (norm, out) = check_clip(gpu, &bad, 1.0, &format!("{} clip with a NaN", gpu.describe()));
    assert!(norm.is_nan() && out.iter().flatten().all(|v| v.is_nan()));
    // An infinite gradient: norm inf, factor 0, finite gradients become 0 and the inf NaN.
    let mut bad = grads.clone();
    bad[1][7] = f32::INFINITY;
    let (norm, _) = check_clip(gpu, &bad, 1.0, &format!("{} clip with an inf", gpu.describe()));
    assert_eq!(norm, f32::INFINITY);
    // No views, only empty views.
    check_clip(gpu, &[], 1.0, "no gradients");
    check_clip(gpu, &[vec![], vec![]], 1.0, "empty gradients");
}
test_device!(clip_grad_norm_device, clip_matches_cpu);

// ---- AdamW -----------------------------------------------------------------------------------------------

/// An arena of tensors of these lengths: partial blocks, several blocks, one element.
const ARENA: [usize; 5] = [40, 5000, 1, 2048, 300];

fn arena_ranges() -> Vec<Range<usize>> {
    let mut at = 0;
    ARENA.iter().map(|&n| {
        at += n;
        at - n..at
    })
    .collect()
}

fn adamw_matches_cpu(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xada);
    let cpu = CpuBackend::reference();
    let n: usize = ARENA.iter().sum();
    let ranges = arena_ranges();
    let config = AdamWConfig { lr: 0.0, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01 };
    let params0 = uniform(&mut rng, n, -1.0, 1.0);
    // CPU state.
    let (cp, cm, cv) = (t(&params0, &[n]), t(&vec![0f32; n], &[n]), t(&vec![0f32; n], &[n]));
    let csteps = Tensor::from_elems(vec![0u32; ARENA.len()], &[ARENA.len()]).unwrap();
    // Device state.
    let (mut gp, mut gm, mut gv) = (up(gpu, &params0), up(gpu, &vec![0f32; n]), up(gpu, &vec![0f32; n]));
    let mut gsteps = up(gpu, &vec![0u32; ARENA.len()]);
    // (tensors with a gradient, lr, the flag's value): skipped tensors, a changed rate, a NaN and
    // an infinite norm (nothing updated), and a step after them.
    let schedule: [(&[usize], f64, Option<f32>); 8] = [
        (&[0, 1, 2, 3, 4], 1e-3, None),
        (&[1, 3], 1e-3, Some(2.5)),
        (&[0, 2, 4], 3e-4, Some(0.1)),
        (&[0, 1, 2, 3, 4], 3e-4, Some(f32::NAN)),
        (&[4, 0], 3e-4, Some(f32::INFINITY)),
        (&[4, 0], 1e-2, Some(1.0)),
        (&[3], 1e-2, None),
        (&[0, 1, 2, 3, 4], 1e-2, Some(0.5)),
    ];
    let exact = gpu.kind() == GpuKind::Sim;
    // One table per set of segments, reused as a training loop would (its ticket counter must be
    // back at 0 after each launch, and untouched by a skipped one).
    let mut tables: Vec<(Vec<usize>, AdamWSegments)> = Vec::new();
    for (step, (with_grad, lr, flag)) in schedule.into_iter().enumerate() {
        let label = format!("{} adamw step {step} tensors {with_grad:?} lr {lr} flag {flag:?}", gpu.describe());
        let grads = uniform(&mut rng, n, -0.5, 0.5);
        let segments: Vec<(usize, Range<usize>)> = with_grad.iter().map(|&i| (i, ranges[i].clone())).collect();
        let lr_pair = split_f64(lr);
        let (cg, clr) = (t(&grads, &[n]), t(&lr_pair, &[2]));
        let cflag = flag.map(|f| t(&[f], &[1]));
        cpu.adamw(&AdamWLaunch { config, params: &cp, grads: &cg, exp_avg: &cm, exp_avg_sq: &cv, segments: &segments, steps: &csteps, lr: &clr, skip_unless_finite: cflag.as_ref() }).unwrap();
        let (gg, glr) = (up(gpu, &grads), up(gpu, &lr_pair));
        let gflag = flag.map(|f| up(gpu, &[f]));
        if !tables.iter().any(|(k, _)| k == with_grad) {
            tables.push((with_grad.to_vec(), AdamWSegments::new(gpu, &segments, n, ARENA.len()).unwrap_or_else(|e| panic!("{label}: {e}"))));
        }
        let table = &mut tables.iter_mut().find(|(k, _)| k == with_grad).expect("made above").1;
        let mut bufs = AdamWBuffers {
            params: gp.view_mut(),
            grads: gg.view(),
            exp_avg: gm.view_mut(),
            exp_avg_sq: gv.view_mut(),
            steps: gsteps.view_mut(),
            lr: glr.view(),
            skip_unless_finite: gflag.as_ref().map(|f| f.view()),
        };
        adamw(gpu, &config, table, &mut bufs).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(down(gpu, &gsteps), cpu.to_host_u32(&csteps).unwrap(), "{label}: step counts");
        for (what, got, want) in [("params", down(gpu, &gp), host(&cpu, &cp)), ("exp_avg", down(gpu, &gm), host(&cpu, &cm)), ("exp_avg_sq", down(gpu, &gv), host(&cpu, &cv))] {
            if exact {
                assert_bits(&format!("{label}: {what}"), &got, &want);
            } else {
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-6 * b.abs() + 1e-30, "{label}: {what}[{i}] = {a}, CPU {b}");
                }
            }
        }
    }
    assert_ne!(down(gpu, &gp), params0, "AdamW changed nothing");
}
test_device!(adamw_device, adamw_matches_cpu);

// ---- determinism across the executor's schedules --------------------------------------------------------

/// The schedules reorder the threads of a block between sync points; race-free kernels with
/// fixed-order reductions give the same bits in each (and any missing barrier shows up as NaN).
#[cfg(feature = "cuda-sim")]
#[test]
fn schedules_agree_bit_for_bit() {
    let cpu = CpuBackend::reference();
    let mut outputs: Vec<Vec<u32>> = Vec::new();
    for gpu in bert_adapters::cuda::gpu::sims_for_test() {
        let mut rng = StdRng::seed_from_u64(0x5c4ed);
        let mut out = Vec::new();
        for (rows, cols, plan) in [(33, 384, None), (200, 40, None), (3, 1100, Some(LayerNormPlan { threads_per_row: 96, rows_per_block: 1, cache_row: true }))] {
            let c = LnCase::random(&mut rng, &cpu, rows, cols);
            let nan = (vec![f32::NAN; rows * cols], vec![f32::NAN; cols], vec![f32::NAN; cols]);
            let got = run_ln_backward(&gpu, &c, (&nan.0, &nan.1, &nan.2), false, Some((true, true)), plan).unwrap();
            out.extend(bits(&got.dz).into_iter().chain(bits(&got.dgamma)).chain(bits(&got.dbeta)));
            let x = uniform(&mut rng, rows * cols, -2.0, 2.0);
            let f = run_train_forward(&gpu, &x, Some(&c.z), &c.gamma, &c.gamma, (rows, cols), plan);
            out.extend(bits(&f.y).into_iter().chain(bits(&f.stats)));
        }
        let grads: Vec<Vec<f32>> = GRAD_LENS.iter().map(|&n| uniform(&mut rng, n, -0.05, 0.05)).collect();
        let (norm, g) = check_clip(&gpu, &grads, 1.0, "schedules");
        out.push(norm.to_bits());
        out.extend(bits(&g.concat()));
        outputs.push(out);
    }
    for o in &outputs[1..] {
        assert!(o == &outputs[0], "the schedules disagree");
    }
}

// ---- size errors -------------------------------------------------------------------------------------------

fn size_errors_are_refused(gpu: &Gpu) {
    let (rows, cols) = (4, 8);
    let n = rows * cols;
    let ones = up(gpu, &vec![1f32; 4 * n]);
    let v = |r: Range<usize>| ones.slice(r).unwrap();
    let outbuf = nan_buf(gpu, 16 * n);
    // Disjoint writable windows of the poisoned buffer; no call below may launch, so none is
    // written (checked at the end).
    // SAFETY: every window is only handed to calls that are refused before touching it.
    let o = |r: Range<usize>| unsafe { outbuf.slice(r).unwrap().assume_writable() };
    let (y, z, st) = (0..n, n..2 * n, 2 * n..2 * n + 2 * rows);
    let ws = 8 * n..16 * n;

    // The training forward.
    let inputs = LayerNormInputs { x: v(0..n), residual: None, gamma: v(0..cols), beta: v(0..cols), rows, cols, eps: 1e-5 };
    let run_fwd = |yr: Range<usize>, zr: Range<usize>, sr: Range<usize>, inputs: &LayerNormInputs<'_>| residual_layernorm_forward_train(gpu, inputs, &mut LayerNormTrainOutputs { y: o(yr), z: o(zr), stats: o(sr) });
    expect_err("train forward: short z", run_fwd(y.clone(), n..2 * n - 1, st.clone(), &inputs));
    expect_err("train forward: stats [rows]", run_fwd(y.clone(), z.clone(), 2 * n..2 * n + rows, &inputs));
    expect_err("train forward: long y", run_fwd(0..n + 1, n + 1..2 * n + 1, 3 * n..3 * n + 2 * rows, &inputs));
    expect_err("train forward: z overlaps y", run_fwd(y.clone(), n - 1..2 * n - 1, st.clone(), &inputs));
    expect_err("train forward: short gamma", run_fwd(y.clone(), z.clone(), st.clone(), &LayerNormInputs { gamma: v(0..cols - 1), ..inputs }));
    let bad_plan = LayerNormPlan { threads_per_row: 48, rows_per_block: 1, cache_row: false };
    expect_err("train forward: bad plan", residual_layernorm_forward_train_with_plan(gpu, &inputs, &mut LayerNormTrainOutputs { y: o(y.clone()), z: o(z.clone()), stats: o(st.clone()) }, bad_plan));

    // The backward.
    let bwd = |dy: Range<usize>, zr: Range<usize>, sr: Range<usize>, g: Range<usize>, cols: usize| LayerNormBackwardInputs { dy: v(dy), z: v(zr), stats: v(sr), gamma: v(g), rows, cols };
    let good = || bwd(0..n, n..2 * n, 2 * n..2 * n + 2 * rows, 0..cols, cols);
    let params = |g: Range<usize>, b: Range<usize>, w: Range<usize>| LayerNormParamGrads { dgamma: Some(o(g)), dbeta: Some(o(b)), workspace: o(w), accumulate: false };
    let (pg, pb) = (4 * n..4 * n + cols, 5 * n..5 * n + cols);
    let bad_inputs = [
        ("short dy", bwd(0..n - 1, n..2 * n, 2 * n..2 * n + 2 * rows, 0..cols, cols)),
        ("short z", bwd(0..n, n..2 * n - 1, 2 * n..2 * n + 2 * rows, 0..cols, cols)),
        ("stats [rows]", bwd(0..n, n..2 * n, 2 * n..2 * n + rows, 0..cols, cols)),
        ("long gamma", bwd(0..n, n..2 * n, 2 * n..2 * n + 2 * rows, 0..cols + 1, cols)),
        ("cols 0", bwd(0..0, 0..0, 0..2 * rows, 0..0, 0)),
    ];
    for (what, inputs) in bad_inputs {
        expect_err(&format!("layernorm backward: {what}"), layernorm_backward(gpu, &inputs, &mut o(y.clone()), false, None));
    }
    expect_err("layernorm backward: short dz", layernorm_backward(gpu, &good(), &mut o(0..n - 1), false, None));
    expect_err("layernorm backward: long dgamma", layernorm_backward(gpu, &good(), &mut o(y.clone()), false, Some(&mut params(4 * n..4 * n + cols + 1, pb.clone(), ws.clone()))));
    expect_err("layernorm backward: short dbeta", layernorm_backward(gpu, &good(), &mut o(y.clone()), false, Some(&mut params(pg.clone(), 5 * n..5 * n + cols - 1, ws.clone()))));
    expect_err("layernorm backward: short workspace", layernorm_backward(gpu, &good(), &mut o(y.clone()), false, Some(&mut params(pg.clone(), pb.clone(), 8 * n..8 * n + 2 * cols - 1))));
    expect_err("layernorm backward: dgamma overlaps dz", layernorm_backward(gpu, &good(), &mut o(y.clone()), false, Some(&mut params(n - 1..n - 1 + cols, pb.clone(), ws.clone()))));
    expect_err("layernorm backward: bad plan", layernorm_backward_with_plan(gpu, &good(), &mut o(y.clone()), false, None, bad_plan));
    let too_big = LayerNormPlan { threads_per_row: 32, rows_per_block: 8, cache_row: true };
    let wide_gamma = up(gpu, &[1f32; 1000]);
    let wide = LayerNormBackwardInputs { gamma: wide_gamma.view(), ..bwd(0..0, 0..0, 0..0, 0..0, 1000) };
    expect_err("layernorm backward: row cache too big", layernorm_backward_with_plan(gpu, &wide, &mut o(0..0), false, None, too_big));
    // dz aliasing dy: an input view over the output's memory.
    let alias = LayerNormBackwardInputs { dy: outbuf.slice(y.clone()).unwrap(), ..good() };
    expect_err("layernorm backward: dz is dy", layernorm_backward(gpu, &alias, &mut o(y.clone()), false, None));

    // Activation backward, bias gradient, first-token scatter.
    expect_err("activation_backward: short pre", activation_backward(gpu, &v(0..n), &v(0..n - 1), Some(Activation::Gelu), &mut o(y.clone())));
    expect_err("activation_backward: long dx", activation_backward(gpu, &v(0..n), &v(0..n), None, &mut o(0..n + 1)));
    expect_err("activation_backward_in_place: short pre", activation_backward_in_place(gpu, &mut o(y.clone()), &v(0..n - 1), None));
    expect_err("bias_grad: long db", bias_grad(gpu, &v(0..n), cols, &mut o(pg.clone().start..pg.end + 1), false, &mut o(ws.clone())));
    expect_err("bias_grad: ragged dy", bias_grad(gpu, &v(0..n - 1), cols, &mut o(pg.clone()), false, &mut o(ws.clone())));
    expect_err("bias_grad: cols 0", bias_grad(gpu, &v(0..n), 0, &mut o(0..0), false, &mut o(ws.clone())));
    expect_err("bias_grad: short workspace", bias_grad(gpu, &v(0..n), cols, &mut o(pg.clone()), false, &mut o(8 * n..8 * n + cols - 1)));
    expect_err("first_token_backward: short out", first_token_backward(gpu, &v(0..2 * cols), 2, 3, cols, &mut o(0..6 * cols - 1), false));
    expect_err("first_token_backward: long d", first_token_backward(gpu, &v(0..2 * cols + 1), 2, 3, cols, &mut o(0..6 * cols), true));
    expect_err("first_token_backward: seq_len 0", first_token_backward(gpu, &v(0..2 * cols), 2, 0, cols, &mut o(0..0), false));

    // Linear backward.
    let dims = LinearDims { rows, d_in: cols, d_out: 3 };
    let (dyl, wl, xl) = (v(0..rows * 3), v(0..3 * cols), v(0..n));
    expect_err("linear_backward_input: short dy", linear_backward_input(gpu, &v(0..rows * 3 - 1), &wl, dims, &mut o(y.clone()), false));
    expect_err("linear_backward_input: long w", linear_backward_input(gpu, &dyl, &v(0..3 * cols + 1), dims, &mut o(y.clone()), false));
    expect_err("linear_backward_input: short dx", linear_backward_input(gpu, &dyl, &wl, dims, &mut o(0..n - 1), true));
    expect_err("linear_backward_input_act: short pre", linear_backward_input_act(gpu, &dyl, &wl, &v(0..n - 1), Some(Activation::Relu), dims, &mut o(y.clone())));
    let lin = |dw: Range<usize>, db: Option<Range<usize>>, w: Option<Range<usize>>| LinearParamGrads { dw: o(dw), db: db.map(o), workspace: w.map(o), accumulate: false };
    let dwr = 4 * n..4 * n + 3 * cols;
    let dbr = 6 * n..6 * n + 3;
    expect_err("linear_backward_params: short x", linear_backward_params(gpu, &dyl, &v(0..n - 1), dims, &mut lin(dwr.clone(), None, None)));
    expect_err("linear_backward_params: long dw", linear_backward_params(gpu, &dyl, &xl, dims, &mut lin(4 * n..4 * n + 3 * cols + 1, None, None)));
    expect_err("linear_backward_params: short db", linear_backward_params(gpu, &dyl, &xl, dims, &mut lin(dwr.clone(), Some(6 * n..6 * n + 2), Some(ws.clone()))));
    expect_err("linear_backward_params: db without workspace", linear_backward_params(gpu, &dyl, &xl, dims, &mut lin(dwr.clone(), Some(dbr.clone()), None)));
    expect_err("linear_backward_params: short workspace", linear_backward_params(gpu, &dyl, &xl, dims, &mut lin(dwr.clone(), Some(dbr.clone()), Some(8 * n..8 * n + 2))));
    expect_err("linear_backward_params: db overlaps dw", linear_backward_params(gpu, &dyl, &xl, dims, &mut lin(dwr.clone(), Some(dwr.start..dwr.start + 3), Some(ws.clone()))));

    // Clip and AdamW.
    expect_err("GradViews: overlapping views", GradViews::new(gpu, &[o(0..10), o(5..12)]).map(|_| ()));
    let mut views = GradViews::new(gpu, &[o(0..10), o(10..12)]).unwrap();
    expect_err("clip_grad_norm: norm [2]", clip_grad_norm(gpu, &mut views, 1.0, &mut o(12..14)));
    expect_err("clip_grad_norm: NaN max_norm", clip_grad_norm(gpu, &mut views, f32::NAN, &mut o(12..13)));
    expect_err("clip_grad_norm: negative max_norm", clip_grad_norm(gpu, &mut views, -1.0, &mut o(12..13)));
    drop(views);
    expect_err("AdamWSegments: tensor out of range", AdamWSegments::new(gpu, &[(2, 0..4)], n, 2).map(|_| ()));
    expect_err("AdamWSegments: past the arena", AdamWSegments::new(gpu, &[(0, 0..n + 1)], n, 2).map(|_| ()));
    let mut segs = AdamWSegments::new(gpu, &[(0, 0..4), (1, 4..n)], n, 2).unwrap();
    let steps_buf = up(gpu, &[7u32, 7, 7]);
    let config = AdamWConfig::default();
    let mut run_adamw = |p: Range<usize>, steps: usize, lr: Range<usize>, flag: Option<Range<usize>>, config: &AdamWConfig| {
        // SAFETY: as `o`; the steps window is refused before use as well.
        let st = unsafe { steps_buf.slice(0..steps).unwrap().assume_writable() };
        let mut bufs = AdamWBuffers { params: o(p), grads: v(0..n), exp_avg: o(4 * n..5 * n), exp_avg_sq: o(5 * n..6 * n), steps: st, lr: v(lr), skip_unless_finite: flag.map(v) };
        adamw(gpu, config, &mut segs, &mut bufs)
    };
    expect_err("adamw: short params", run_adamw(0..n - 1, 2, 0..2, None, &config));
    expect_err("adamw: steps [3]", run_adamw(0..n, 3, 0..2, None, &config));
    expect_err("adamw: lr [1]", run_adamw(0..n, 2, 0..1, None, &config));
    expect_err("adamw: flag [2]", run_adamw(0..n, 2, 0..2, Some(0..2), &config));
    expect_err("adamw: beta1 = 1", run_adamw(0..n, 2, 0..2, None, &AdamWConfig { betas: (1.0, 0.999), ..config }));
    expect_err("adamw: params overlap exp_avg", run_adamw(3 * n + 1..4 * n + 1, 2, 0..2, None, &config));

    assert!(down(gpu, &outbuf).iter().all(|v| v.is_nan()), "a refused call wrote an output");
    assert_eq!(down(gpu, &steps_buf), [7, 7, 7], "a refused AdamW advanced the step counts");
}
test_device!(size_errors, size_errors_are_refused);

// ---- pure plans ----------------------------------------------------------------------------------------------

#[test]
fn column_chunks_follow_the_documented_rule() {
    assert_eq!(ColumnChunks::for_rows(0), ColumnChunks { rows_per_chunk: 64, chunks: 0 });
    assert_eq!(ColumnChunks::for_rows(1), ColumnChunks { rows_per_chunk: 64, chunks: 1 });
    assert_eq!(ColumnChunks::for_rows(200), ColumnChunks { rows_per_chunk: 64, chunks: 4 });
    assert_eq!(ColumnChunks::for_rows(4096), ColumnChunks { rows_per_chunk: 64, chunks: 64 });
    let big = ColumnChunks::for_rows(1 << 20);
    assert_eq!(big, ColumnChunks { rows_per_chunk: 2048, chunks: 512 });
    assert_eq!(ColumnChunks::for_rows(1_000_003), ColumnChunks { rows_per_chunk: 1960, chunks: 511 });
    assert_eq!(bias_grad_workspace_len(200, 40), 160);
    assert_eq!(layernorm_param_grad_workspace_len(200, 40), 320);
}

#[test]
fn backward_plans_cache_rows_where_they_fit() {
    for cols in [1, 40, 384, 768, 1024] {
        let p = layernorm_backward_plan(cols);
        assert_eq!((p.threads_per_row, p.rows_per_block, p.cache_row), (32, 4, true), "cols {cols}");
        assert_eq!(layernorm_backward_shared_bytes(&p, cols), 4 * cols * 8);
    }
    let p = layernorm_backward_plan(4099);
    assert_eq!((p.threads_per_row, p.rows_per_block, p.cache_row), (288, 1, true));
    let p = layernorm_backward_plan(6200);
    assert!(!p.cache_row);
    assert_eq!(layernorm_backward_shared_bytes(&p, 6200), 0);
}
