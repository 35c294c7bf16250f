//! CUDA fused residual + LayerNorm forward vs the f64 CPU reference
//! (`bert_adapters::cpu::reference::residual_layernorm`, the spec).
//!
//! One body per test, run by `test_device!` on every device: `*::cuda_sim` on the CPU executor
//! (feature `cuda-sim`, as in CI) in the forward, reverse and random schedules, which must agree
//! bit for bit; `*::cuda` on a GPU, which prints `SKIPPED: ...` without one and fails under
//! `REQUIRE_GPU=1` (set on the GPU machine by scripts/device-check.sh).
//!
//! Tolerance, for y, mean and rstd alike: max|out - ref| <= 1e-5 · (1 + max|ref|).
//! Why that is the right size for an fp32 kernel against an f64 reference: the kernel adds
//! x + residual in f32 exactly like the reference, then sums at most a few dozen terms per
//! thread before a fixed tree, so mean and variance carry a relative error of a few 1e-7 (a
//! few ulp per term, partly cancelling); rstd adds <= 2 ulp (IEEE sqrt and divide), and y one
//! fma more. That is roughly 1e-6 of the output's scale at the widest row tested (4099), so
//! 1e-5 leaves a 10x margin yet still fails on any real bug (a wrong index, a missed element or
//! row, a wrong eps or biased/unbiased variance mix-up all give errors of 1e-3 or more). The
//! `1 +` makes it an absolute 1e-5 floor for outputs near zero (means of centred data).
//! Outputs start as NaN, so an element the kernel never writes cannot pass.

use bert_adapters::cpu::reference;
use bert_adapters::cuda::gpu::{Gpu, GpuKind};
use bert_adapters::cuda::layernorm::{residual_layernorm_forward, residual_layernorm_forward_with_plan, LayerNormInputs, LayerNormOutputs, LayerNormPlan};
use bert_adapters::cuda::probe::report_line;
use bert_adapters::{test_device, Error};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BERT_EPS: f32 = 1e-12;

struct Case {
    x: Vec<f32>,
    residual: Option<Vec<f32>>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    rows: usize,
    cols: usize,
    eps: f32,
}

impl Case {
    fn random(rng: &mut StdRng, rows: usize, cols: usize, with_residual: bool, eps: f32) -> Case {
        let mut v = |n: usize, lo: f32, hi: f32| (0..n).map(|_| rng.random_range(lo..hi)).collect::<Vec<f32>>();
        let x = v(rows * cols, -2.0, 2.0);
        let residual = with_residual.then(|| v(rows * cols, -2.0, 2.0));
        // gamma around 1 and beta around 0, like trained LayerNorms, but never trivially so.
        let gamma = v(cols, 0.5, 1.5);
        let beta = v(cols, -0.5, 0.5);
        Case { x, residual, gamma, beta, rows, cols, eps }
    }
}

struct Outputs {
    y: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

fn up(gpu: &Gpu, v: &[f32]) -> bert_adapters::cuda::DeviceBuffer<f32> {
    gpu.upload(v).unwrap_or_else(|e| panic!("upload: {e}"))
}

/// Uploads `case`, runs the kernel (auto plan if `plan` is None), and downloads the outputs.
fn run(gpu: &Gpu, case: &Case, plan: Option<LayerNormPlan>) -> Result<Outputs, Error> {
    let n = case.rows * case.cols;
    let (dx, dgamma, dbeta) = (up(gpu, &case.x), up(gpu, &case.gamma), up(gpu, &case.beta));
    let dres = case.residual.as_deref().map(|r| up(gpu, r));
    // NaN sentinels: an output element the kernel skips fails the comparison.
    let mut dy = up(gpu, &vec![f32::NAN; n]);
    let mut dmean = up(gpu, &vec![f32::NAN; case.rows]);
    let mut drstd = up(gpu, &vec![f32::NAN; case.rows]);
    {
        let inputs = LayerNormInputs {
            x: dx.view(),
            residual: dres.as_ref().map(|r| r.view()),
            gamma: dgamma.view(),
            beta: dbeta.view(),
            rows: case.rows,
            cols: case.cols,
            eps: case.eps,
        };
        let mut outputs = LayerNormOutputs { y: dy.view_mut(), mean: dmean.view_mut(), rstd: drstd.view_mut() };
        match plan {
            None => residual_layernorm_forward(gpu, &inputs, &mut outputs)?,
            Some(p) => residual_layernorm_forward_with_plan(gpu, &inputs, &mut outputs, p)?,
        }
    }
    Ok(Outputs { y: gpu.download(&dy.view())?, mean: gpu.download(&dmean.view())?, rstd: gpu.download(&drstd.view())? })
}

/// Asserts the tolerance and returns how much of it was used (max |err| / tol).
fn assert_close(what: &str, label: &str, got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "{label}: {what} length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let tol = 1e-5 * (1.0 + scale);
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        if err.is_nan() || err > tol {
            panic!("{label}: {what}[{i}] = {g}, reference {w}, |err| {err:e} > tol {tol:e}");
        }
        worst = worst.max(err / tol);
    }
    worst
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Runs one case against the reference; returns the outputs and the largest fraction of the
/// tolerance used.
fn check(gpu: &Gpu, case: &Case, plan: Option<LayerNormPlan>, label: &str) -> (Outputs, f32) {
    let label = format!("{} {label}", gpu.describe());
    let got = run(gpu, case, plan).unwrap_or_else(|e| panic!("{label}: {e}"));
    let want = reference::residual_layernorm(&case.x, case.residual.as_deref(), &case.gamma, &case.beta, case.cols, case.eps);
    let used = assert_close("y", &label, &got.y, &want.y)
        .max(assert_close("mean", &label, &got.mean, &want.mean))
        .max(assert_close("rstd", &label, &got.rstd, &want.rstd));
    (got, used)
}

/// The awkward shapes: widths below, at and above a warp and the 1024-column switch to
/// block-per-row, odd widths, BERT's 384/768, and row counts that leave a partial last block.
/// The executor runs 1000 rows only at narrow widths (a CPU thread per CUDA thread is slow);
/// every width and every row count still runs there.
fn awkward_shapes(gpu: &Gpu) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for rows in [1, 7, 130, 1000] {
        for cols in [1, 31, 48, 384, 768, 1000, 4099] {
            if gpu.kind() == GpuKind::Sim && rows * cols > 130 * 4099 {
                continue;
            }
            v.push((rows, cols));
        }
    }
    v
}

fn matches_reference_at_awkward_shapes(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x1a7e_5eed);
    let mut worst = (0f32, String::new());
    let mut cases = 0;
    for (rows, cols) in awkward_shapes(gpu) {
        for with_residual in [false, true] {
            let case = Case::random(&mut rng, rows, cols, with_residual, BERT_EPS);
            let label = format!("rows={rows} cols={cols} residual={with_residual} (auto plan)");
            let (_, used) = check(gpu, &case, None, &label);
            cases += 1;
            if used > worst.0 {
                worst = (used, label);
            }
        }
    }
    // Recorded in docs/gpu-log.md: how close the kernel came to the tolerance.
    report_line(&format!("layernorm on {}: {cases} cases pass; worst max|err|/tol = {:.3} at {}", gpu.describe(), worst.0, worst.1));
}
test_device!(awkward_shapes_match_reference, matches_reference_at_awkward_shapes);

/// Every plan the launcher accepts: the other code paths of the kernel (no cache, one row per
/// block, several warps per row with the shared-memory exchange, a full 1024-thread block).
fn every_launch_plan_matches_reference(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(7);
    let plans = [
        LayerNormPlan { threads_per_row: 32, rows_per_block: 8, cache_row: false },
        LayerNormPlan { threads_per_row: 32, rows_per_block: 1, cache_row: true },
        LayerNormPlan { threads_per_row: 64, rows_per_block: 1, cache_row: true },
        LayerNormPlan { threads_per_row: 96, rows_per_block: 1, cache_row: false },
        LayerNormPlan { threads_per_row: 1024, rows_per_block: 1, cache_row: true },
        LayerNormPlan { threads_per_row: 1024, rows_per_block: 1, cache_row: false },
    ];
    let rows = if gpu.kind() == GpuKind::Sim { 7 } else { 130 };
    for plan in plans {
        for cols in [1, 33, 384, 768, 4099] {
            if plan.validate(cols).is_err() {
                continue;
            }
            let case = Case::random(&mut rng, rows, cols, true, 1e-5);
            let label = format!("rows={rows} cols={cols} {plan:?}");
            let (a, _) = check(gpu, &case, Some(plan), &label);
            // Fixed reduction order: the same launch must give the same bits.
            let b = run(gpu, &case, Some(plan)).unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_eq!(bits(&a.y), bits(&b.y), "{label}: not deterministic");
        }
    }
}
test_device!(every_plan_matches_reference, every_launch_plan_matches_reference);

/// The executor's schedules reorder the threads of a block between sync points; a race-free
/// kernel with fixed-order reductions gives the same bits in each of them.
#[cfg(feature = "cuda-sim")]
#[test]
fn schedules_agree_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(0x51_3a7e);
    for (cols, plan) in [(384, LayerNormPlan::auto(384)), (40, LayerNormPlan { threads_per_row: 96, rows_per_block: 1, cache_row: true })] {
        let case = Case::random(&mut rng, 7, cols, true, BERT_EPS);
        let runs: Vec<Outputs> = bert_adapters::cuda::gpu::sims_for_test().iter().map(|gpu| check(gpu, &case, Some(plan), &format!("cols={cols}")).0).collect();
        for r in &runs[1..] {
            assert_eq!(bits(&runs[0].y), bits(&r.y), "cols={cols} {plan:?}: y differs between schedules");
            assert_eq!(bits(&runs[0].rstd), bits(&r.rstd), "cols={cols} {plan:?}: rstd differs between schedules");
        }
    }
}

fn wrong_sizes_are_errors_and_nothing_is_written(gpu: &Gpu) {
    let (rows, cols) = (4, 8);
    let x = up(gpu, &vec![1f32; rows * cols]);
    let short_gamma = up(gpu, &vec![1f32; cols - 1]);
    let beta = up(gpu, &vec![0f32; cols]);
    let mut y = up(gpu, &vec![f32::NAN; rows * cols]);
    let mut mean = up(gpu, &vec![f32::NAN; rows]);
    let mut rstd = up(gpu, &vec![f32::NAN; rows]);
    {
        let inputs = LayerNormInputs { x: x.view(), residual: None, gamma: short_gamma.view(), beta: beta.view(), rows, cols, eps: 1e-5 };
        let mut out = LayerNormOutputs { y: y.view_mut(), mean: mean.view_mut(), rstd: rstd.view_mut() };
        let err = residual_layernorm_forward(gpu, &inputs, &mut out).expect_err("gamma is one short");
        assert!(matches!(err, Error::Shape { .. }), "{err}");
        // A residual of the wrong length.
        let inputs = LayerNormInputs { gamma: beta.view(), residual: Some(x.slice(0..cols).unwrap()), ..inputs };
        assert!(matches!(residual_layernorm_forward(gpu, &inputs, &mut out), Err(Error::Shape { .. })));
        // An invalid plan.
        let inputs = LayerNormInputs { residual: None, ..inputs };
        let bad = LayerNormPlan { threads_per_row: 48, rows_per_block: 1, cache_row: false };
        assert!(matches!(residual_layernorm_forward_with_plan(gpu, &inputs, &mut out, bad), Err(Error::Shape { .. })));
    }
    assert!(gpu.download(&y.view()).unwrap().iter().all(|v| v.is_nan()), "a rejected launch wrote y");
}
test_device!(wrong_sizes_are_refused, wrong_sizes_are_errors_and_nothing_is_written);

fn zero_rows_is_a_no_op(gpu: &Gpu) {
    let mut buf = up(gpu, &[0f32; 16]);
    let params = up(gpu, &[1f32; 16]);
    let (mut a, mut b) = (up(gpu, &[0f32; 1]), up(gpu, &[0f32; 1]));
    let inputs = LayerNormInputs { x: params.slice(0..0).unwrap(), residual: None, gamma: params.view(), beta: params.view(), rows: 0, cols: 16, eps: 1e-5 };
    let mut out = LayerNormOutputs { y: buf.slice_mut(0..0).unwrap(), mean: a.slice_mut(0..0).unwrap(), rstd: b.slice_mut(0..0).unwrap() };
    residual_layernorm_forward(gpu, &inputs, &mut out).expect("zero rows is valid");
}
test_device!(zero_rows, zero_rows_is_a_no_op);
