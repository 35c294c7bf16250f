//! CUDA fused residual + LayerNorm forward vs the f64 CPU reference
//! (`bert_adapters::cpu::reference::residual_layernorm`, the spec).
//!
//! Needs a GPU: without one every test prints `SKIPPED: ...` and passes; with `REQUIRE_GPU=1`
//! (set on the GPU machine by scripts/device-check.sh) a missing GPU fails instead.
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
use bert_adapters::cuda::layernorm::{
    residual_layernorm_forward, residual_layernorm_forward_with_plan, LayerNormInputs, LayerNormOutputs, LayerNormPlan,
};
use bert_adapters::cuda::probe::report_line;
use bert_adapters::cuda::CudaRuntime;
use bert_adapters::Error;
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

fn runtime(ctx: std::sync::Arc<cudarc::driver::CudaContext>) -> CudaRuntime {
    CudaRuntime::new(ctx).unwrap_or_else(|e| panic!("CUDA runtime: {e}"))
}

/// Uploads `case`, runs the kernel (auto plan if `plan` is None), and downloads the outputs.
fn run_gpu(rt: &CudaRuntime, case: &Case, plan: Option<LayerNormPlan>) -> Result<Outputs, Error> {
    let s = rt.stream();
    let up = |v: &[f32]| s.clone_htod(v).unwrap_or_else(|e| panic!("upload: {e:?}"));
    let n = case.rows * case.cols;
    let (dx, dgamma, dbeta) = (up(&case.x), up(&case.gamma), up(&case.beta));
    let dres = case.residual.as_deref().map(up);
    // NaN sentinels: an output element the kernel skips fails the comparison.
    let mut dy = up(&vec![f32::NAN; n]);
    let mut dmean = up(&vec![f32::NAN; case.rows]);
    let mut drstd = up(&vec![f32::NAN; case.rows]);
    {
        let inputs = LayerNormInputs {
            x: dx.as_view(),
            residual: dres.as_ref().map(|r| r.as_view()),
            gamma: dgamma.as_view(),
            beta: dbeta.as_view(),
            rows: case.rows,
            cols: case.cols,
            eps: case.eps,
        };
        let mut outputs = LayerNormOutputs { y: dy.as_view_mut(), mean: dmean.as_view_mut(), rstd: drstd.as_view_mut() };
        match plan {
            None => residual_layernorm_forward(rt, &inputs, &mut outputs)?,
            Some(p) => residual_layernorm_forward_with_plan(rt, &inputs, &mut outputs, p)?,
        }
    }
    rt.synchronize()?;
    let down = |d: &cudarc::driver::CudaSlice<f32>| s.clone_dtoh(d).unwrap_or_else(|e| panic!("download: {e:?}"));
    Ok(Outputs { y: down(&dy), mean: down(&dmean), rstd: down(&drstd) })
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

/// Runs one case against the reference; returns the largest fraction of the tolerance used.
fn check(rt: &CudaRuntime, case: &Case, plan: Option<LayerNormPlan>, label: &str) -> f32 {
    let got = run_gpu(rt, case, plan).unwrap_or_else(|e| panic!("{label}: {e}"));
    let want = reference::residual_layernorm(&case.x, case.residual.as_deref(), &case.gamma, &case.beta, case.cols, case.eps);
    assert_close("y", label, &got.y, &want.y)
        .max(assert_close("mean", label, &got.mean, &want.mean))
        .max(assert_close("rstd", label, &got.rstd, &want.rstd))
}

#[test]
fn matches_reference_at_awkward_shapes() {
    let ctx = bert_adapters::require_gpu!("layernorm::matches_reference_at_awkward_shapes");
    let rt = runtime(ctx);
    let mut rng = StdRng::seed_from_u64(0x1a7e_5eed);
    let mut worst = (0f32, String::new());
    for rows in [1, 7, 130, 1000] {
        for cols in [1, 31, 48, 384, 768, 1000, 4099] {
            for with_residual in [false, true] {
                let case = Case::random(&mut rng, rows, cols, with_residual, BERT_EPS);
                let label = format!("rows={rows} cols={cols} residual={with_residual} (auto plan)");
                let used = check(&rt, &case, None, &label);
                if used > worst.0 {
                    worst = (used, label);
                }
            }
        }
    }
    // Recorded in docs/gpu-log.md: how close the kernel came to the tolerance.
    report_line(&format!("layernorm: 56 cases pass; worst max|err|/tol = {:.3} at {}", worst.0, worst.1));
}

#[test]
fn every_launch_plan_matches_reference() {
    let ctx = bert_adapters::require_gpu!("layernorm::every_launch_plan_matches_reference");
    let rt = runtime(ctx);
    let mut rng = StdRng::seed_from_u64(7);
    let plans = [
        LayerNormPlan { threads_per_row: 32, rows_per_block: 8, cache_row: false },
        LayerNormPlan { threads_per_row: 32, rows_per_block: 1, cache_row: true },
        LayerNormPlan { threads_per_row: 64, rows_per_block: 1, cache_row: true },
        LayerNormPlan { threads_per_row: 96, rows_per_block: 1, cache_row: false },
        LayerNormPlan { threads_per_row: 1024, rows_per_block: 1, cache_row: true },
        LayerNormPlan { threads_per_row: 1024, rows_per_block: 1, cache_row: false },
    ];
    for plan in plans {
        for cols in [1, 33, 768, 4099] {
            if plan.validate(cols).is_err() {
                continue;
            }
            let case = Case::random(&mut rng, 130, cols, true, 1e-5);
            let label = format!("cols={cols} {plan:?}");
            check(&rt, &case, Some(plan), &label);
            // Fixed reduction order: the same launch must give the same bits.
            let a = run_gpu(&rt, &case, Some(plan)).unwrap_or_else(|e| panic!("{label}: {e}"));
            let b = run_gpu(&rt, &case, Some(plan)).unwrap_or_else(|e| panic!("{label}: {e}"));
            assert!(a.y.iter().zip(&b.y).all(|(p, q)| p.to_bits() == q.to_bits()), "{label}: not deterministic");
        }
    }
}

#[test]
fn wrong_sizes_are_errors_and_nothing_is_written() {
    let ctx = bert_adapters::require_gpu!("layernorm::wrong_sizes_are_errors_and_nothing_is_written");
    let rt = runtime(ctx);
    let s = rt.stream();
    let (rows, cols) = (4, 8);
    let x = s.clone_htod(&vec![1f32; rows * cols]).expect("upload");
    let short_gamma = s.clone_htod(&vec![1f32; cols - 1]).expect("upload");
    let beta = s.clone_htod(&vec![0f32; cols]).expect("upload");
    let mut y = s.clone_htod(&vec![f32::NAN; rows * cols]).expect("upload");
    let mut mean = s.clone_htod(&vec![f32::NAN; rows]).expect("upload");
    let mut rstd = s.clone_htod(&vec![f32::NAN; rows]).expect("upload");
    {
        let inputs = LayerNormInputs {
            x: x.as_view(),
            residual: None,
            gamma: short_gamma.as_view(),
            beta: beta.as_view(),
            rows,
            cols,
            eps: 1e-5,
        };
        let mut out = LayerNormOutputs { y: y.as_view_mut(), mean: mean.as_view_mut(), rstd: rstd.as_view_mut() };
        let err = residual_layernorm_forward(&rt, &inputs, &mut out).expect_err("gamma is one short");
        assert!(matches!(err, Error::Shape { .. }), "{err}");
        // A residual of the wrong length, and a y view of the wrong length.
        let inputs = LayerNormInputs { gamma: beta.as_view(), residual: Some(x.slice(0..cols)), ..inputs };
        assert!(matches!(residual_layernorm_forward(&rt, &inputs, &mut out), Err(Error::Shape { .. })));
    }
    rt.synchronize().expect("sync");
    assert!(s.clone_dtoh(&y).expect("download").iter().all(|v| v.is_nan()), "a rejected launch wrote y");
}

#[test]
fn zero_rows_is_a_no_op() {
    let ctx = bert_adapters::require_gpu!("layernorm::zero_rows_is_a_no_op");
    let rt = runtime(ctx);
    let s = rt.stream();
    let mut buf = s.clone_htod(&[0f32; 16]).expect("upload");
    let params = s.clone_htod(&[1f32; 16]).expect("upload");
    let (mut a, mut b) = (s.clone_htod(&[0f32; 1]).expect("upload"), s.clone_htod(&[0f32; 1]).expect("upload"));
    let inputs = LayerNormInputs {
        x: params.slice(0..0),
        residual: None,
        gamma: params.as_view(),
        beta: params.as_view(),
        rows: 0,
        cols: 16,
        eps: 1e-5,
    };
    let mut out = LayerNormOutputs { y: buf.slice_mut(0..0), mean: a.slice_mut(0..0), rstd: b.slice_mut(0..0) };
    residual_layernorm_forward(&rt, &inputs, &mut out).expect("zero rows is valid");
}
