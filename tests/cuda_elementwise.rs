//! The small CUDA kernel families against the CPU backend, one body per device (`test_device!`:
//! `*::cuda_sim` on the executor in the forward, reverse and random schedules; `*::cuda` on a
//! GPU, `SKIPPED: ...` without one, a failure under `REQUIRE_GPU=1`):
//!
//! - embedding gather + sum + LayerNorm vs `cpu::reference::{embedding, residual_layernorm}`,
//!   and its device-side id check (the first bad token named by batch and position);
//! - bias + activation (every `Activation`, and the identity) vs `cpu::reference::activation`;
//! - add, fill, f32 ↔ bf16 and f32 ↔ f16 casts, first-token gather: bit-exact (the `half` crate
//!   for casts, with CUDA's canonical NaN 0x7fff for a rounded NaN; `CpuBackend::first_token` for
//!   the gather); the f16 casts on every f16 pattern and on every f16 midpoint, its neighbours,
//!   the 65504/65520 overflow edge and the subnormals, also through the backend's `cast`;
//! - NICE forward and inverse vs `CpuBackend::reference().nice`, and inverse ∘ forward = id;
//! - every size error, with nothing written.
//!
//! Tolerance where results are not exact: max|out − ref| <= 1e-5 · (1 + max|ref|), the LayerNorm
//! tests' bound. For these kernels: the embedding's statistics carry a few 1e-7 relative (as in
//! tests/layernorm.rs); an activation is one f32 add (exact against the f32 `pre` the reference
//! starts from) and one library call within a few ulp, checked per element against
//! 1e-5 · (1 + |ref_i|) (stricter: its inputs span ±100); NICE is two f32 GEMMs of at most 192
//! terms (scaled so outputs are O(1): ~sqrt(k)·2^-24 ≈ 1e-6) plus an f32 add. A wrong index, a
//! missed element or a wrong formula moves an element by far more than 1e-5. Every output starts
//! as NaN, so an element the kernel skips cannot pass, and every element must be finite.

use bert_adapters::backend::NiceParams;
use bert_adapters::cpu::reference;
use bert_adapters::cuda::elementwise::{
    add, bias_act, bias_act_in_place, cast_bf16_to_f32, cast_f16_to_f32, cast_f32_to_bf16, cast_f32_to_bf16_strided, cast_f32_to_f16, cast_from_f32_strided, fill_bf16, fill_f16, fill_f32, fill_u32, first_token, StridedMatrices,
};
use bert_adapters::cuda::embedding::{check_flag, embedding_layernorm_forward, embedding_layernorm_forward_with_plan, new_error_flag, EmbeddingInputs, EmbeddingOutputs};
use bert_adapters::cuda::gpu::{DeviceBuffer, DeviceScalar, Gpu};
use bert_adapters::cuda::layernorm::LayerNormPlan;
use bert_adapters::cuda::nice::{nice_forward, nice_forward_with_workspace, NiceDeviceParams, NiceDims, NiceWorkspace};
use bert_adapters::cuda::probe::report_line;
use bert_adapters::cuda::backend::CudaBackend;
use bert_adapters::{test_device, Activation, Backend, CpuBackend, DType, Error, Tensor};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "support/embedding_case.rs"]
mod embedding_case;
use embedding_case::{EmbeddingCase, BERT_EPS, MAX_POSITIONS, TYPE_VOCAB, VOCAB};

const ALL_ACTS: [Activation; 6] = [Activation::Relu, Activation::Gelu, Activation::GeluNew, Activation::Swish, Activation::Tanh, Activation::Sigmoid];

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

/// Asserts every element finite and within 1e-5·(1 + max|ref|); returns max|err| / tol.
fn assert_close(what: &str, got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let tol = 1e-5 * (1.0 + scale);
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

/// The per-element form, `|err_i| <= 1e-5·(1 + |ref_i|)`, for outputs whose magnitudes differ a
/// lot (an activation of values from -100 to 100): the row-wide bound would grow with the largest
/// element and let a 5e-4 error on a small one (tanh GELU instead of erf GELU) pass.
fn assert_close_each(what: &str, got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (err, tol) = ((g - w).abs(), 1e-5 * (1.0 + w.abs()));
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

fn expect_shape_err(what: &str, r: Result<(), Error>) {
    match r {
        Err(Error::Shape { .. }) => {}
        Err(e) => panic!("{what}: expected a shape error, got {e}"),
        Ok(()) => panic!("{what}: expected a shape error, the call succeeded"),
    }
}

// ---- embedding ----------------------------------------------------------------------------------


struct EmbeddingRun {
    y: Vec<f32>,
    mean: Option<Vec<f32>>,
    rstd: Option<Vec<f32>>,
    flag: Result<(), Error>,
}

fn run_embedding(gpu: &Gpu, c: &EmbeddingCase, stats: bool, plan: Option<LayerNormPlan>) -> EmbeddingRun {
    let rows = c.batch * c.seq_len;
    let (ids, types) = (up(gpu, &c.ids), up(gpu, &c.types));
    let (word, position, token_type) = (up(gpu, &c.word), up(gpu, &c.position), up(gpu, &c.token_type));
    let (gamma, beta) = (up(gpu, &c.gamma), up(gpu, &c.beta));
    let mut y = nan_buf(gpu, rows * c.hidden);
    let mut mean = stats.then(|| nan_buf(gpu, rows));
    let mut rstd = stats.then(|| nan_buf(gpu, rows));
    let mut flag = new_error_flag(gpu).unwrap();
    let inputs = EmbeddingInputs {
        input_ids: ids.view(),
        token_type_ids: types.view(),
        word: word.view(),
        position: position.view(),
        token_type: token_type.view(),
        gamma: gamma.view(),
        beta: beta.view(),
        batch: c.batch,
        seq_len: c.seq_len,
        hidden: c.hidden,
        positions: c.positions,
        eps: BERT_EPS,
    };
    {
        let mut out = EmbeddingOutputs { y: y.view_mut(), mean: mean.as_mut().map(|m| m.view_mut()), rstd: rstd.as_mut().map(|r| r.view_mut()), error_flag: flag.view_mut() };
        match plan {
            None => embedding_layernorm_forward(gpu, &inputs, &mut out),
            Some(p) => embedding_layernorm_forward_with_plan(gpu, &inputs, &mut out, p),
        }
        .unwrap_or_else(|e| panic!("{}: embedding launch: {e}", gpu.describe()));
    }
    EmbeddingRun { y: down(gpu, &y), mean: mean.map(|m| down(gpu, &m)), rstd: rstd.map(|r| down(gpu, &r)), flag: check_flag(gpu, &flag.view()) }
}

fn embedding_matches_reference(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x000e_3bed);
    let mut worst = (0f32, String::new());
    // rows = batch·seq_len = 1, 7, 33 (a partial last block of 8 rows).
    for (batch, seq_len) in [(1, 1), (1, 7), (3, 11)] {
        for hidden in [40, 48, 384] {
            let case = EmbeddingCase::random(&mut rng, batch, seq_len, hidden, uniform);
            let want = case.reference();
            for stats in [true, false] {
                let label = format!("{} batch={batch} seq_len={seq_len} hidden={hidden} stats={stats}", gpu.describe());
                let got = run_embedding(gpu, &case, stats, None);
                got.flag.unwrap_or_else(|e| panic!("{label}: every id is in range, yet {e}"));
                let mut used = assert_close(&format!("{label} y"), &got.y, &want.y);
                if stats {
                    used = used.max(assert_close(&format!("{label} mean"), got.mean.as_deref().unwrap(), &want.mean));
                    used = used.max(assert_close(&format!("{label} rstd"), got.rstd.as_deref().unwrap(), &want.rstd));
                }
                if used > worst.0 {
                    worst = (used, label);
                }
            }
        }
    }
    // The kernel's other paths: no row cache, several warps per row, one row per block.
    let case = EmbeddingCase::random(&mut rng, 3, 11, 48, uniform);
    let want = case.reference();
    for plan in [
        LayerNormPlan { threads_per_row: 32, rows_per_block: 8, cache_row: false },
        LayerNormPlan { threads_per_row: 64, rows_per_block: 1, cache_row: true },
        LayerNormPlan { threads_per_row: 96, rows_per_block: 1, cache_row: false },
    ] {
        let got = run_embedding(gpu, &case, true, Some(plan));
        got.flag.unwrap();
        let label = format!("{} {plan:?}", gpu.describe());
        assert_close(&format!("{label} y"), &got.y, &want.y);
        assert_close(&format!("{label} rstd"), got.rstd.as_deref().unwrap(), &want.rstd);
    }
    report_line(&format!("embedding on {}: worst max|err|/tol = {:.3} at {}", gpu.describe(), worst.0, worst.1));
}
test_device!(embedding_layernorm, embedding_matches_reference);

fn out_of_range_ids_are_reported_with_their_position(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x000b_ad1d);
    let (batch, seq_len, hidden) = (3, 11, 40);
    let clean = EmbeddingCase::random(&mut rng, batch, seq_len, hidden, uniform);
    let want = clean.reference();
    // Word ids past the table at (1, 3) and (2, 0), a type id past its table at (1, 5) and at
    // (0, 9): the flag names the first in (batch, position) order.
    let mut case = clean.clone();
    let bad = [(seq_len + 3, true, VOCAB as u32), (2 * seq_len, true, u32::MAX), (seq_len + 5, false, TYPE_VOCAB as u32), (9, false, 7)];
    for &(row, word, id) in &bad {
        if word {
            case.ids[row] = id;
        } else {
            case.types[row] = id;
        }
    }
    let got = run_embedding(gpu, &case, true, None);
    let err = got.flag.expect_err("out-of-range ids must be reported").to_string();
    assert!(err.contains("token type id 7 at batch 0, position 9"), "{}: {err}", gpu.describe());
    let bad_rows: Vec<usize> = bad.iter().map(|b| b.0).collect();
    for r in 0..batch * seq_len {
        let (gy, wy) = (&got.y[r * hidden..(r + 1) * hidden], &want.y[r * hidden..(r + 1) * hidden]);
        if bad_rows.contains(&r) {
            assert!(gy.iter().all(|v| v.is_nan()), "row {r} has a bad id and must be NaN");
            assert!(got.mean.as_ref().unwrap()[r].is_nan() && got.rstd.as_ref().unwrap()[r].is_nan(), "row {r} stats");
        } else {
            assert_close(&format!("{} good row {r}", gpu.describe()), gy, wy);
        }
    }
    // Without the type error at (0, 9) the first is the word id at (1, 3).
    case.types[9] = clean.types[9];
    let err = run_embedding(gpu, &case, false, None).flag.expect_err("still bad").to_string();
    assert!(err.contains(&format!("token id {VOCAB} at batch 1, position 3")), "{}: {err}", gpu.describe());
    // A token with both ids bad reports the word id.
    case.types[seq_len + 3] = 5;
    let err = run_embedding(gpu, &case, false, None).flag.expect_err("still bad").to_string();
    assert!(err.contains(&format!("token id {VOCAB} at batch 1, position 3")), "{}: {err}", gpu.describe());
}
test_device!(bad_token_ids, out_of_range_ids_are_reported_with_their_position);

/// RoBERTa's positions (`Positions::FromIds`, padding_idx 1), counted by the kernel from the ids:
/// trailing pads, a pad id inside each longer sequence, one sequence without padding, on every
/// launch plan (a team of one warp, of several warps, with and without the row cache).
fn roberta_positions_match_reference(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x0017_0be7);
    // 11 tokens need 1 + 1 + 11 = 13 of the 16 position rows.
    let case = EmbeddingCase::random(&mut rng, 3, 11, 48, uniform).with_roberta_positions(&[0, 4, 9]);
    assert!(case.ids.iter().filter(|&&id| id == 1).count() >= 13 + 2, "the case has pads");
    let want = case.reference();
    // The positions matter: read as BERT's 0..T, the same ids give another output.
    let bert = EmbeddingCase { positions: bert_adapters::Positions::Sequential, ..case.clone() }.reference();
    assert!(want.y.iter().zip(&bert.y).any(|(a, b)| (a - b).abs() > 1e-2));
    let mut worst = 0f32;
    for plan in [
        None,
        Some(LayerNormPlan { threads_per_row: 32, rows_per_block: 8, cache_row: false }),
        Some(LayerNormPlan { threads_per_row: 64, rows_per_block: 1, cache_row: true }),
        Some(LayerNormPlan { threads_per_row: 96, rows_per_block: 1, cache_row: false }),
    ] {
        let got = run_embedding(gpu, &case, true, plan);
        got.flag.unwrap();
        let label = format!("{} roberta positions {plan:?}", gpu.describe());
        worst = worst.max(assert_close(&format!("{label} y"), &got.y, &want.y));
        assert_close(&format!("{label} mean"), got.mean.as_deref().unwrap(), &want.mean);
        assert_close(&format!("{label} rstd"), got.rstd.as_deref().unwrap(), &want.rstd);
    }
    // (A table too short for padding_idx + 1 + seq_len rows: src/cuda/embedding.rs's unit tests.)
    report_line(&format!("embedding with roberta positions on {}: worst max|err|/tol = {worst:.3}", gpu.describe()));
}
test_device!(embedding_roberta_positions, roberta_positions_match_reference);

fn embedding_size_errors(gpu: &Gpu) {
    let (batch, seq_len, hidden) = (2, 5, 8);
    let n = batch * seq_len;
    let ids = up(gpu, &vec![0u32; n + 1]);
    let table = up(gpu, &vec![0.5f32; 20 * hidden + 1]);
    let mut y = nan_buf(gpu, n * hidden + 1);
    let mut stats = nan_buf(gpu, n + 1);
    let mut flag = up(gpu, &[0u64, 0]);
    let good = EmbeddingInputs {
        input_ids: ids.slice(0..n).unwrap(),
        token_type_ids: ids.slice(0..n).unwrap(),
        word: table.slice(0..11 * hidden).unwrap(),
        position: table.slice(0..MAX_POSITIONS * hidden).unwrap(),
        token_type: table.slice(0..2 * hidden).unwrap(),
        gamma: table.slice(0..hidden).unwrap(),
        beta: table.slice(0..hidden).unwrap(),
        batch,
        seq_len,
        hidden,
        positions: bert_adapters::Positions::Sequential,
        eps: 1e-12,
    };
    let bad_inputs = [
        ("input_ids", EmbeddingInputs { input_ids: ids.view(), ..good }),
        ("token_type_ids", EmbeddingInputs { token_type_ids: ids.slice(0..n - 1).unwrap(), ..good }),
        ("word", EmbeddingInputs { word: table.slice(0..11 * hidden + 1).unwrap(), ..good }),
        ("empty word", EmbeddingInputs { word: table.slice(0..0).unwrap(), ..good }),
        ("short position", EmbeddingInputs { position: table.slice(0..(seq_len - 1) * hidden).unwrap(), ..good }),
        ("token_type", EmbeddingInputs { token_type: table.slice(0..2 * hidden - 1).unwrap(), ..good }),
        ("gamma", EmbeddingInputs { gamma: table.slice(0..hidden - 1).unwrap(), ..good }),
        ("beta", EmbeddingInputs { beta: table.slice(0..hidden + 1).unwrap(), ..good }),
        ("hidden 0", EmbeddingInputs { hidden: 0, ..good }),
        ("batch", EmbeddingInputs { batch: 3, ..good }),
    ];
    for (what, inputs) in &bad_inputs {
        let mut out = EmbeddingOutputs { y: y.slice_mut(0..n * hidden).unwrap(), mean: None, rstd: None, error_flag: flag.slice_mut(0..1).unwrap() };
        expect_shape_err(what, embedding_layernorm_forward(gpu, inputs, &mut out));
    }
    let shapes = [("y", n * hidden + 1, n, n, 1), ("mean", n * hidden, n + 1, n, 1), ("rstd", n * hidden, n, n - 1, 1), ("error_flag", n * hidden, n, n, 2)];
    for (what, ylen, mlen, rlen, flen) in shapes {
        let (mut m2, mut r2) = (nan_buf(gpu, mlen), nan_buf(gpu, rlen));
        let mut out = EmbeddingOutputs { y: y.slice_mut(0..ylen).unwrap(), mean: Some(m2.view_mut()), rstd: Some(r2.view_mut()), error_flag: flag.slice_mut(0..flen).unwrap() };
        expect_shape_err(what, embedding_layernorm_forward(gpu, &good, &mut out));
    }
    {
        let bad_plan = LayerNormPlan { threads_per_row: 48, rows_per_block: 1, cache_row: false };
        let mut out = EmbeddingOutputs { y: y.slice_mut(0..n * hidden).unwrap(), mean: Some(stats.slice_mut(0..n).unwrap()), rstd: None, error_flag: flag.slice_mut(0..1).unwrap() };
        expect_shape_err("plan", embedding_layernorm_forward_with_plan(gpu, &good, &mut out, bad_plan));
        let nan_eps = EmbeddingInputs { eps: f32::NAN, ..good };
        assert!(matches!(embedding_layernorm_forward(gpu, &nan_eps, &mut out), Err(Error::Input(_))));
    }
    assert!(down(gpu, &y).iter().all(|v| v.is_nan()), "a refused launch wrote y");
    assert!(down(gpu, &stats).iter().all(|v| v.is_nan()), "a refused launch wrote mean");
    assert_eq!(down(gpu, &flag), [0, 0], "a refused launch wrote the flag");
    expect_shape_err("check_flag of 2", check_flag(gpu, &flag.view()));
}
test_device!(embedding_sizes, embedding_size_errors);

// ---- bias + activation --------------------------------------------------------------------------

fn bias_act_matches_reference(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xb1a5);
    let mut worst = (0f32, String::new());
    let acts: Vec<Option<Activation>> = std::iter::once(None).chain(ALL_ACTS.iter().map(|&a| Some(a))).collect();
    let mut case = 0usize;
    for act in acts {
        for rows in [1, 7, 33] {
            for cols in [40, 48, 384] {
                case += 1;
                let (with_bias, with_pre) = (case.is_multiple_of(2), !case.is_multiple_of(3));
                let mut x = uniform(&mut rng, rows * cols, -6.0, 6.0);
                // The tails and the special points of each activation.
                let len = x.len();
                for (i, v) in [0.0, -0.0, 1e-30, -30.0, 30.0, -100.0, 100.0, -88.5, 10.0, -10.0].iter().enumerate() {
                    x[i * 3 % len] = *v;
                }
                let bias = with_bias.then(|| uniform(&mut rng, cols, -1.0, 1.0));
                let pre_want: Vec<f32> = match &bias {
                    Some(b) => x.iter().enumerate().map(|(i, v)| v + b[i % cols]).collect(),
                    None => x.clone(),
                };
                let want = match act {
                    Some(a) => reference::activation(&pre_want, a),
                    None => pre_want.clone(),
                };
                let label = format!("{} {act:?} rows={rows} cols={cols} bias={with_bias} pre={with_pre}", gpu.describe());
                let (dx, db) = (up(gpu, &x), bias.as_ref().map(|b| up(gpu, b)));
                let mut y = nan_buf(gpu, rows * cols);
                let mut pre = with_pre.then(|| nan_buf(gpu, rows * cols));
                {
                    let mut pre_view = pre.as_mut().map(|p| p.view_mut());
                    bias_act(gpu, &dx.view(), db.as_ref().map(|b| b.view()).as_ref(), act, cols, &mut y.view_mut(), pre_view.as_mut()).unwrap_or_else(|e| panic!("{label}: {e}"));
                }
                let used = assert_close_each(&label, &down(gpu, &y), &want);
                if let Some(p) = &pre {
                    assert_bits(&format!("{label} pre"), &down(gpu, p), &pre_want);
                }
                if used > worst.0 {
                    worst = (used, label.clone());
                }
                // In place gives the same bits.
                let mut inplace = up(gpu, &x);
                bias_act_in_place(gpu, &mut inplace.view_mut(), db.as_ref().map(|b| b.view()).as_ref(), act, cols).unwrap_or_else(|e| panic!("{label} in place: {e}"));
                assert_bits(&format!("{label} in place"), &down(gpu, &inplace), &down(gpu, &y));
            }
        }
    }
    report_line(&format!("bias_act on {}: worst max|err|/tol = {:.3} at {}", gpu.describe(), worst.0, worst.1));
}
test_device!(bias_activation, bias_act_matches_reference);

fn bias_act_size_errors(gpu: &Gpu) {
    let (rows, cols) = (3, 8);
    let x = up(gpu, &vec![1f32; rows * cols + 1]);
    let bias = up(gpu, &vec![1f32; cols + 1]);
    let mut y = nan_buf(gpu, rows * cols + 1);
    let mut pre = nan_buf(gpu, rows * cols + 1);
    let n = rows * cols;
    let xv = x.slice(0..n).unwrap();
    let act = Some(Activation::Gelu);
    expect_shape_err("x not whole rows", bias_act(gpu, &x.view(), None, act, cols, &mut y.slice_mut(0..n + 1).unwrap(), None));
    expect_shape_err("cols 0", bias_act(gpu, &xv, None, act, 0, &mut y.slice_mut(0..n).unwrap(), None));
    expect_shape_err("bias", bias_act(gpu, &xv, Some(&bias.view()), act, cols, &mut y.slice_mut(0..n).unwrap(), None));
    expect_shape_err("y", bias_act(gpu, &xv, None, act, cols, &mut y.slice_mut(0..n - 1).unwrap(), None));
    expect_shape_err("pre", bias_act(gpu, &xv, None, act, cols, &mut y.slice_mut(0..n).unwrap(), Some(&mut pre.slice_mut(0..n + 1).unwrap())));
    expect_shape_err("in place bias", bias_act_in_place(gpu, &mut y.slice_mut(0..n).unwrap(), Some(&bias.view()), act, cols));
    expect_shape_err("in place rows", bias_act_in_place(gpu, &mut y.slice_mut(0..n - 1).unwrap(), None, act, cols));
    assert!(down(gpu, &y).iter().chain(&down(gpu, &pre)).all(|v| v.is_nan()), "a refused launch wrote its output");
    // Zero rows is a no-op.
    bias_act(gpu, &x.slice(0..0).unwrap(), Some(&bias.slice(0..cols).unwrap()), act, cols, &mut y.slice_mut(0..0).unwrap(), None).unwrap();
}
test_device!(bias_activation_sizes, bias_act_size_errors);

// ---- add, fill, cast ----------------------------------------------------------------------------

/// f32 values whose bf16 rounding is delicate: ties both ways, just off ties, subnormals, the
/// largest finite values (which round to inf), infinities and signed zeros.
fn cast_specials() -> Vec<f32> {
    let from = f32::from_bits;
    vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        from(0x3f80_8000), // tie, rounds down to even 0x3f80
        from(0x3f81_8000), // tie, rounds up to even 0x3f82
        from(0x3f80_8001),
        from(0x3f80_7fff),
        from(0x0000_0001), // smallest subnormal
        from(0x0000_8000), // subnormal tie
        from(0x0001_8000),
        from(0x807f_ffff),
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::MIN,
        from(0x7f7f_7fff), // rounds down to the largest bf16
        from(0x7f7f_8000), // ties to even: up, to inf
        f32::INFINITY,
        f32::NEG_INFINITY,
        3.140_625,
        -65_504.0,
        1e-40,
    ]
}

fn add_fill_cast_are_exact(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xadd);
    for n in [1, 7, 33 * 40, 5000] {
        let (a, b) = (uniform(&mut rng, n, -3.0, 3.0), uniform(&mut rng, n, -3.0, 3.0));
        let mut y = nan_buf(gpu, n);
        add(gpu, &up(gpu, &a).view(), &up(gpu, &b).view(), &mut y.view_mut()).unwrap();
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_bits(&format!("{} add n={n}", gpu.describe()), &down(gpu, &y), &want);

        fill_f32(gpu, &mut y.view_mut(), -2.5).unwrap();
        assert!(down(gpu, &y).iter().all(|v| v.to_bits() == (-2.5f32).to_bits()), "fill_f32 n={n}");
        let mut u = up(gpu, &vec![0u32; n]);
        fill_u32(gpu, &mut u.view_mut(), 0xdead_beef).unwrap();
        assert!(down(gpu, &u).iter().all(|&v| v == 0xdead_beef), "fill_u32 n={n}");
        let mut h = up(gpu, &vec![bf16::from_bits(0x7fc1); n]);
        let tie = f32::from_bits(0x3f80_8000); // 1 + 2^-8, halfway between two bf16: even is 1.0
        fill_bf16(gpu, &mut h.view_mut(), tie).unwrap();
        assert!(down(gpu, &h).iter().all(|v| v.to_bits() == bf16::from_f32(tie).to_bits() && v.to_bits() == 0x3f80), "fill_bf16 n={n}");

        // Casts: random values across many binades plus the specials, bit-exact with `half`.
        let mut x: Vec<f32> = (0..n).map(|_| f32::from_bits(rng.random::<u32>() & 0xff7f_ffff)).collect();
        for (i, s) in cast_specials().into_iter().enumerate().take(n) {
            x[i] = s;
        }
        let mut hb = up(gpu, &vec![bf16::from_bits(0x7fc1); n]);
        cast_f32_to_bf16(gpu, &up(gpu, &x).view(), &mut hb.view_mut()).unwrap();
        let got = down(gpu, &hb);
        for (i, (&v, g)) in x.iter().zip(&got).enumerate() {
            let want = bf16::from_f32(v);
            if v.is_nan() {
                assert!(g.is_nan(), "cast [{i}]: NaN {:#x} became {:#x}", v.to_bits(), g.to_bits());
            } else {
                assert_eq!(g.to_bits(), want.to_bits(), "cast [{i}] of {v:e} ({:#010x})", v.to_bits());
            }
        }
        let mut back = nan_buf(gpu, n);
        cast_bf16_to_f32(gpu, &hb.view(), &mut back.view_mut()).unwrap();
        let want_back: Vec<f32> = got.iter().map(|h| h.to_f32()).collect();
        for (i, (g, w)) in down(gpu, &back).iter().zip(&want_back).enumerate() {
            assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "widen [{i}]: {g:e} vs {w:e}");
        }
    }
    // NaN: CUDA's canonical 0x7fff, and widening keeps a NaN a NaN.
    let nans = [f32::NAN, -f32::NAN, f32::from_bits(0x7f80_0001), f32::from_bits(0xffff_ffff)];
    let mut hb = up(gpu, &[bf16::ZERO; 4]);
    cast_f32_to_bf16(gpu, &up(gpu, &nans).view(), &mut hb.view_mut()).unwrap();
    assert!(down(gpu, &hb).iter().all(|h| h.to_bits() == 0x7fff), "NaN casts: {:?}", down(gpu, &hb));
}
test_device!(add_fill_cast, add_fill_cast_are_exact);

/// The strided cast rounds exactly the layout's elements (bit-exact with `half`) and leaves every
/// gap of y (NaN payloads that a round trip through f32 would canonicalise) untouched.
fn strided_cast_touches_only_the_layout(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x5751);
    let gap = bf16::from_bits(0x7fc1);
    for (rows, cols, ld, batch, batch_stride) in [(7, 33, 9, 1, 0), (1, 1, 1, 1, 1), (33, 7, 34, 3, 243), (5, 4, 5, 2, 20), (40, 3, 41, 2, 130)] {
        let layout = StridedMatrices { rows, cols, ld, batch, batch_stride };
        let span = layout.span().unwrap();
        let x: Vec<f32> = (0..span).map(|_| f32::from_bits(rng.random::<u32>() & 0xff7f_ffff)).collect();
        let mut y = up(gpu, &vec![gap; span]);
        cast_f32_to_bf16_strided(gpu, &up(gpu, &x).view(), &mut y.view_mut(), layout).unwrap();
        let got = down(gpu, &y);
        let mut inside = vec![false; span];
        for b in 0..batch {
            for c in 0..cols {
                for r in 0..rows {
                    inside[b * batch_stride + c * ld + r] = true;
                }
            }
        }
        for (i, (&g, &v)) in got.iter().zip(&x).enumerate() {
            let want = if inside[i] { bf16::from_f32(v) } else { gap };
            assert_eq!(g.to_bits(), want.to_bits(), "{} {layout:?}: element {i} (inside: {})", gpu.describe(), inside[i]);
        }
    }
    let layout = StridedMatrices { rows: 4, cols: 2, ld: 3, batch: 1, batch_stride: 0 };
    let (x, mut y) = (up(gpu, &[0f32; 16]), up(gpu, &[gap; 16]));
    expect_shape_err("rows > ld", cast_f32_to_bf16_strided(gpu, &x.view(), &mut y.view_mut(), layout));
    let layout = StridedMatrices { rows: 4, cols: 2, ld: 4, batch: 2, batch_stride: 9 };
    expect_shape_err("short y", cast_f32_to_bf16_strided(gpu, &x.view(), &mut y.slice_mut(0..12).unwrap(), layout));
}
test_device!(strided_cast, strided_cast_touches_only_the_layout);

/// What `cast_f32_to_f16` must give: `half`'s rounding (nearest even, |x| >= 65520 to inf,
/// subnormals below 2^-14), and CUDA's canonical f16 NaN 0x7fff for any NaN (as
/// tests/cuda_sim_intrinsics.rs `want_f16`).
fn want_f16(x: f32) -> u16 {
    if x.is_nan() {
        0x7fff
    } else {
        f16::from_f32(x).to_bits()
    }
}

/// What `cast_f16_to_f32` must give: the exact value (`half`'s widening) for every non-NaN, and
/// 0x7fffffff for every NaN (CUDA's cvt.f32.f16, which the kernels' f16_bits_to_f32 issues on a
/// GPU and matches on the executor; `half` would keep the payload and set the quiet bit).
fn want_f16_to_f32(h: u16) -> u32 {
    let v = f16::from_bits(h);
    if v.is_nan() {
        0x7fff_ffff // CUDA's cvt.f32.f16: every f16 NaN gives the canonical f32 NaN
    } else {
        v.to_f32().to_bits()
    }
}

/// f32 inputs whose f16 rounding is delicate: specials, the overflow edge (65504 is the largest
/// f16, 65520 the tie above it that rounds to inf), the normal/subnormal boundary and the
/// smallest subnormal's tie, every f16 midpoint with its two f32 neighbours, signed, and random
/// bits (every exponent) plus random values on f16's exponents.
fn f16_cast_inputs(rng: &mut StdRng) -> Vec<f32> {
    let mut v: Vec<u32> = vec![0x0000_0000, 0x8000_0000, 0x7f80_0000, 0xff80_0000, 0x7fc0_0000, 0xffc0_0000, 0x7f80_0001, 0xff80_0001, 0x7fff_ffff, 0x7f7f_ffff, 0xff7f_ffff, 0x0000_0001, 0x8000_0001];
    v.extend([65504.0f32, 65519.996, 65520.0, 65520.004, 65536.0, -65504.0, -65520.0, -65519.996, 6.103_515_6e-5, 6.097_555e-5, 5.960_464_5e-8, 2.980_232_2e-8, 2.980_232_5e-8, 2.980_231_9e-8, 8.940_697e-8].map(f32::to_bits));
    for h in 0..0x7c00u16 {
        let (lo, hi) = (f16::from_bits(h).to_f32(), f16::from_bits(h + 1).to_f32());
        let mid = ((f64::from(lo) + f64::from(hi)) / 2.0) as f32; // exact: 12 significant bits
        for x in [mid.to_bits(), mid.to_bits() - 1, mid.to_bits() + 1] {
            v.extend([x, x | 0x8000_0000]);
        }
    }
    v.extend((0..40_000).map(|_| rng.random::<u32>()));
    v.extend((0..40_000).map(|_| rng.random_range(100u32 << 23..145 << 23) | (rng.random_range(0..2u32) << 31)));
    v.into_iter().map(f32::from_bits).collect()
}

/// The f16 casts, fill and strided cast, bit for bit: every f16 pattern widened, the delicate f32
/// inputs rounded (`f16_cast_inputs`), the same through `CudaBackend::cast` (f32 → f16 → f32).
fn f16_casts_are_exact(gpu: &Gpu) {
    let label = gpu.describe();
    // Every f16 pattern (2048 NaNs among them) to f32.
    let pats: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
    let mut wide = nan_buf(gpu, pats.len());
    cast_f16_to_f32(gpu, &up(gpu, &pats).view(), &mut wide.view_mut()).unwrap();
    for (h, g) in pats.iter().zip(down(gpu, &wide)) {
        assert_eq!(g.to_bits(), want_f16_to_f32(h.to_bits()), "{label}: f16 {:#06x} -> f32", h.to_bits());
    }
    // f32 to f16.
    let mut rng = StdRng::seed_from_u64(0xf16c);
    let x = f16_cast_inputs(&mut rng);
    let mut y = up(gpu, &vec![f16::from_bits(0x7e01); x.len()]);
    cast_f32_to_f16(gpu, &up(gpu, &x).view(), &mut y.view_mut()).unwrap();
    let got = down(gpu, &y);
    let mut bad: Vec<String> = Vec::new();
    for (&v, g) in x.iter().zip(&got) {
        if g.to_bits() != want_f16(v) && bad.len() < 10 {
            bad.push(format!("{v:e} ({:#010x}) -> {:#06x}, want {:#06x}", v.to_bits(), g.to_bits(), want_f16(v)));
        }
    }
    assert!(bad.is_empty(), "{label}: f32 -> f16 of {} inputs: {bad:?}", x.len());
    let edge = |v: f32| got[x.iter().position(|&e| e.to_bits() == v.to_bits()).unwrap()].to_bits();
    assert_eq!((edge(65504.0), edge(65519.996), edge(65520.0), edge(-65520.0)), (0x7bff, 0x7bff, 0x7c00, 0xfc00), "{label}: the overflow edge");
    assert_eq!((edge(5.960_464_5e-8), edge(2.980_232_2e-8), edge(2.980_232_5e-8)), (0x0001, 0x0000, 0x0001), "{label}: the smallest subnormal and its tie");

    // Through the backend: f32 -> f16 -> f32 is `half`'s round trip, NaN stays NaN; cast between
    // bf16 and f16 is refused (it would round twice).
    let be = CudaBackend::on(gpu.reopen().unwrap());
    let finite: Vec<f32> = x.iter().copied().filter(|v| !v.is_nan()).collect();
    let t = be.upload(finite.clone(), &[finite.len()]).unwrap();
    let t16 = be.cast(&t, DType::F16).unwrap();
    assert_eq!(t16.dtype(), DType::F16);
    let back = be.to_host(&be.cast(&t16, DType::F32).unwrap()).unwrap();
    for (v, g) in finite.iter().zip(&back) {
        assert_eq!(g.to_bits(), f16::from_f32(*v).to_f32().to_bits(), "{label}: backend cast of {v:e}");
    }
    assert_eq!(be.to_host(&t16).unwrap(), back, "{label}: to_host of an f16 tensor widens it exactly");
    // Every finite and infinite f16 value through the backend: f32 -> f16 -> f32 gives it back.
    let values: Vec<f32> = pats.iter().filter(|h| !h.is_nan()).map(|h| h.to_f32()).collect();
    let tv = be.cast(&be.upload(values.clone(), &[values.len()]).unwrap(), DType::F16).unwrap();
    assert_bits(&format!("{label}: every f16 value through Backend::cast and to_host"), &be.to_host(&tv).unwrap(), &values);
    assert_bits(&format!("{label}: every f16 value through Backend::cast back to f32"), &be.to_host(&be.cast(&tv, DType::F32).unwrap()).unwrap(), &values);
    let nan = be.cast(&be.upload(vec![f32::NAN, 1.0], &[2]).unwrap(), DType::F16).unwrap();
    let nan_back = be.to_host(&nan).unwrap();
    assert!(nan_back[0].is_nan() && nan_back[1] == 1.0, "{label}: {nan_back:?}");
    assert!(!be.all_finite(&nan).unwrap() && be.all_finite(&t16).unwrap() == finite.iter().all(|v| f16::from_f32(*v).is_finite()));
    for (from, to) in [(DType::F16, DType::BF16), (DType::BF16, DType::F16)] {
        let src = be.cast(&t, from).unwrap();
        let e = be.cast(&src, to).expect_err("bf16 <-> f16");
        assert!(matches!(e, Error::Unsupported(_)) && e.to_string().contains(&format!("cast from {from} to {to}")), "{e}");
    }

    // fill_f16 rounds on the host: 1 + 2^-11 is a tie (even: 1.0), 65520 overflows to inf.
    for (value, bits) in [(1.0 + 2f32.powi(-11), 0x3c00u16), (65520.0, 0x7c00), (-2.5, 0xc100), (1e-8, 0x0000)] {
        let mut h = up(gpu, &[f16::from_bits(0x7e01); 37]);
        fill_f16(gpu, &mut h.view_mut(), value).unwrap();
        assert!(down(gpu, &h).iter().all(|v| v.to_bits() == bits && bits == f16::from_f32(value).to_bits()), "{label}: fill_f16({value:e})");
    }
    let tf = be.zeros(&[5], DType::F16).unwrap();
    be.fill(&tf, -2.5).unwrap();
    assert_eq!(be.to_host(&tf).unwrap(), vec![-2.5; 5], "{label}: Backend::fill on f16");

    // The strided f16 cast (the f16 GEMM's staging): the layout's elements rounded, gaps untouched.
    let gap = f16::from_bits(0x7e01);
    for (rows, cols, ld, batch, batch_stride) in [(7, 33, 9, 1, 0), (33, 7, 34, 3, 243), (40, 3, 41, 2, 130)] {
        let layout = StridedMatrices { rows, cols, ld, batch, batch_stride };
        let span = layout.span().unwrap();
        let xs: Vec<f32> = (0..span).map(|i| x[(i * 7919) % x.len()]).collect();
        let mut y = up(gpu, &vec![gap; span]);
        cast_from_f32_strided(gpu, &up(gpu, &xs).view(), &mut y.view_mut(), layout).unwrap();
        let got = down(gpu, &y);
        let mut inside = vec![false; span];
        for b in 0..batch {
            for c in 0..cols {
                for r in 0..rows {
                    inside[b * batch_stride + c * ld + r] = true;
                }
            }
        }
        for (i, (&g, &v)) in got.iter().zip(&xs).enumerate() {
            let want = if inside[i] { want_f16(v) } else { gap.to_bits() };
            assert_eq!(g.to_bits(), want, "{label} {layout:?}: element {i} (inside: {})", inside[i]);
        }
    }
    // Lengths are checked in f16 elements.
    let (a, mut h) = (up(gpu, &[1f32; 4]), up(gpu, &[f16::ZERO; 5]));
    expect_shape_err("cast to f16", cast_f32_to_f16(gpu, &a.view(), &mut h.view_mut()));
    expect_shape_err("cast f16 to f32", cast_f16_to_f32(gpu, &h.view(), &mut nan_buf(gpu, 4).view_mut()));
    assert!(down(gpu, &h).iter().all(|v| v.to_bits() == 0));
}
test_device!(f16_casts, f16_casts_are_exact);

fn add_fill_cast_size_errors(gpu: &Gpu) {
    let a = up(gpu, &[1f32; 4]);
    let mut y = nan_buf(gpu, 5);
    expect_shape_err("add b", add(gpu, &a.view(), &a.slice(0..3).unwrap(), &mut y.slice_mut(0..4).unwrap()));
    expect_shape_err("add y", add(gpu, &a.view(), &a.view(), &mut y.view_mut()));
    let mut h = up(gpu, &[bf16::ZERO; 5]);
    expect_shape_err("cast to bf16", cast_f32_to_bf16(gpu, &a.view(), &mut h.view_mut()));
    expect_shape_err("cast to f32", cast_bf16_to_f32(gpu, &h.view(), &mut y.slice_mut(0..4).unwrap()));
    assert!(down(gpu, &y).iter().all(|v| v.is_nan()));
    assert!(down(gpu, &h).iter().all(|v| v.to_bits() == 0));
    // Empty operands are no-ops.
    add(gpu, &a.slice(0..0).unwrap(), &a.slice(0..0).unwrap(), &mut y.slice_mut(0..0).unwrap()).unwrap();
    fill_f32(gpu, &mut y.slice_mut(0..0).unwrap(), 1.0).unwrap();
    assert!(down(gpu, &y).iter().all(|v| v.is_nan()));
}
test_device!(add_fill_cast_sizes, add_fill_cast_size_errors);

// ---- first token -----------------------------------------------------------------------------------

fn first_token_matches_cpu(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xf1);
    let cpu = CpuBackend::reference();
    for (batch, seq_len) in [(1, 1), (7, 1), (7, 5), (33, 3)] {
        for hidden in [40, 48, 384] {
            let x = uniform(&mut rng, batch * seq_len * hidden, -2.0, 2.0);
            let want = cpu.to_host(&cpu.first_token(&Tensor::from_vec(x.clone(), &[batch, seq_len, hidden]).unwrap()).unwrap()).unwrap();
            let mut y = nan_buf(gpu, batch * hidden);
            first_token(gpu, &up(gpu, &x).view(), batch, seq_len, hidden, &mut y.view_mut()).unwrap();
            assert_bits(&format!("{} first_token batch={batch} seq_len={seq_len} hidden={hidden}", gpu.describe()), &down(gpu, &y), &want);
        }
    }
}
test_device!(first_token_gather, first_token_matches_cpu);

fn first_token_size_errors(gpu: &Gpu) {
    let x = up(gpu, &[1f32; 2 * 3 * 4 + 1]);
    let mut y = nan_buf(gpu, 2 * 4 + 1);
    expect_shape_err("x", first_token(gpu, &x.view(), 2, 3, 4, &mut y.slice_mut(0..8).unwrap()));
    expect_shape_err("y", first_token(gpu, &x.slice(0..24).unwrap(), 2, 3, 4, &mut y.view_mut()));
    expect_shape_err("seq_len 0", first_token(gpu, &x.slice(0..0).unwrap(), 2, 0, 4, &mut y.slice_mut(0..8).unwrap()));
    expect_shape_err("huge", first_token(gpu, &x.view(), 1, 1, 1 << 31, &mut y.view_mut()));
    assert!(down(gpu, &y).iter().all(|v| v.is_nan()));
    first_token(gpu, &x.slice(0..0).unwrap(), 0, 3, 4, &mut y.slice_mut(0..0).unwrap()).unwrap();
}
test_device!(first_token_sizes, first_token_size_errors);

// ---- NICE --------------------------------------------------------------------------------------------

/// One NICE block's host weights, HF layout, scaled 1/sqrt(fan-in) so every layer stays O(1).
struct NiceHost {
    hidden: usize,
    /// (weight, bias) of F.0, F.2, G.0, G.2.
    layers: [(Vec<f32>, Vec<f32>); 4],
    act: Activation,
}

impl NiceHost {
    fn random(rng: &mut StdRng, hidden: usize, rf: usize, act: Activation) -> Self {
        let (s1, s2) = (hidden / 2, hidden - hidden / 2);
        let (kf, kg) = (s2 / rf, s1 / rf);
        let mut linear = |out: usize, inp: usize| {
            let s = 1.0 / (inp.max(1) as f32).sqrt();
            (uniform(rng, out * inp, -s, s), uniform(rng, out, -0.5, 0.5))
        };
        NiceHost { hidden, layers: [linear(kf, s2), linear(s1, kf), linear(kg, s1), linear(s2, kg)], act }
    }

    fn cpu(&self, x: &[f32], rows: usize, inverse: bool) -> Vec<f32> {
        // Weight shapes [out, in]: F.0 [kf, s2], F.2 [s1, kf], G.0 [kg, s1], G.2 [s2, kg].
        let (s1, s2) = (self.hidden / 2, self.hidden - self.hidden / 2);
        let (kf, kg) = (self.layers[0].1.len(), self.layers[2].1.len());
        let fan_in = [s2, kf, s1, kg];
        let t: Vec<(Tensor, Tensor)> = self
            .layers
            .iter()
            .zip(fan_in)
            .map(|((w, b), inp)| (Tensor::from_vec(w.clone(), &[b.len(), inp]).unwrap(), Tensor::from_vec(b.clone(), &[b.len()]).unwrap()))
            .collect();
        let p = NiceParams { f0: (&t[0].0, &t[0].1), f2: (&t[1].0, &t[1].1), g0: (&t[2].0, &t[2].1), g2: (&t[3].0, &t[3].1), activation: self.act };
        let cpu = CpuBackend::reference();
        let y = cpu.nice(&Tensor::from_vec(x.to_vec(), &[rows, self.hidden]).unwrap(), &p, inverse).unwrap();
        cpu.to_host(&y).unwrap()
    }
}

/// The device copies of a [`NiceHost`], viewed as [`NiceDeviceParams`].
struct NiceDevice(Vec<(DeviceBuffer<f32>, DeviceBuffer<f32>)>, Activation);

impl NiceDevice {
    fn new(gpu: &Gpu, h: &NiceHost) -> Self {
        NiceDevice(h.layers.iter().map(|(w, b)| (up(gpu, w), up(gpu, b))).collect(), h.act)
    }
    fn params(&self) -> NiceDeviceParams<'_> {
        let l = |i: usize| (self.0[i].0.view(), self.0[i].1.view());
        NiceDeviceParams { f0: l(0), f2: l(1), g0: l(2), g2: l(3), activation: self.1 }
    }
}

fn run_nice(gpu: &Gpu, dev: &NiceDevice, x: &[f32], inverse: bool) -> Vec<f32> {
    let mut y = nan_buf(gpu, x.len());
    nice_forward(gpu, &up(gpu, x).view(), &dev.params(), inverse, &mut y.view_mut()).unwrap_or_else(|e| panic!("{}: nice: {e}", gpu.describe()));
    down(gpu, &y)
}

fn nice_matches_cpu(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x41ce);
    let mut worst = (0f32, String::new());
    // H 41 and 66/rf 3 give s1 != s2 and kf != kg.
    let configs = [(40, 2, Activation::Relu), (41, 2, Activation::Swish), (48, 2, Activation::Gelu), (66, 3, Activation::Tanh), (384, 2, Activation::Swish)];
    for (hidden, rf, act) in configs {
        let host = NiceHost::random(&mut rng, hidden, rf, act);
        let dev = NiceDevice::new(gpu, &host);
        for rows in [1, 7, 33] {
            let x = uniform(&mut rng, rows * hidden, -2.0, 2.0);
            for inverse in [false, true] {
                let label = format!("{} nice H={hidden} rf={rf} {act:?} rows={rows} inverse={inverse}", gpu.describe());
                let used = assert_close(&label, &run_nice(gpu, &dev, &x, inverse), &host.cpu(&x, rows, inverse));
                if used > worst.0 {
                    worst = (used, label);
                }
            }
            // inverse(forward(x)) = x, up to the rounding of two couplings.
            let there = run_nice(gpu, &dev, &x, false);
            assert_close(&format!("{} H={hidden} inverse∘forward rows={rows}", gpu.describe()), &run_nice(gpu, &dev, &there, true), &x);
        }
    }
    // rf larger than a half gives empty subnets (k = 0): F and G are then their output biases,
    // so y1 = x1 + f2 and y2 = x2 + g2 exactly. (The CPU backend refuses k = 0, so this is
    // checked against the formula.)
    let host = NiceHost::random(&mut rng, 41, 100, Activation::Relu);
    let dev = NiceDevice::new(gpu, &host);
    let (f2, g2) = (&host.layers[1].1, &host.layers[3].1);
    let x = uniform(&mut rng, 7 * 41, -2.0, 2.0);
    let want: Vec<f32> = x.iter().enumerate().map(|(i, v)| if i % 41 < 20 { v + f2[i % 41] } else { v + g2[i % 41 - 20] }).collect();
    assert_bits(&format!("{} nice k=0", gpu.describe()), &run_nice(gpu, &dev, &x, false), &want);
    assert_bits(&format!("{} nice k=0 inverse", gpu.describe()), &run_nice(gpu, &dev, &want, true), &x.iter().enumerate().map(|(i, _)| if i % 41 < 20 { want[i] - f2[i % 41] } else { want[i] - g2[i % 41 - 20] }).collect::<Vec<f32>>());
    report_line(&format!("nice on {}: worst max|err|/tol = {:.3} at {}", gpu.describe(), worst.0, worst.1));
}
test_device!(nice_coupling, nice_matches_cpu);

/// One workspace serves any row count up to its own, in both directions, with the same bits as
/// the allocating form.
fn nice_workspace_is_reusable(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x3a);
    let host = NiceHost::random(&mut rng, 41, 2, Activation::Gelu);
    let dev = NiceDevice::new(gpu, &host);
    let params = dev.params();
    let mut ws = NiceWorkspace::new(gpu, 33, NiceDims::of(&params).unwrap()).unwrap();
    for (rows, inverse) in [(33, false), (7, true), (1, false), (33, true)] {
        let x = uniform(&mut rng, rows * 41, -2.0, 2.0);
        let mut y = nan_buf(gpu, x.len());
        nice_forward_with_workspace(gpu, &up(gpu, &x).view(), &params, inverse, &mut y.view_mut(), &mut ws).unwrap();
        assert_bits(&format!("{} workspace rows={rows} inverse={inverse}", gpu.describe()), &down(gpu, &y), &run_nice(gpu, &dev, &x, inverse));
    }
    let x = up(gpu, &vec![0f32; 34 * 41]);
    let mut y = nan_buf(gpu, 34 * 41);
    expect_shape_err("workspace too small", nice_forward_with_workspace(gpu, &x.view(), &params, false, &mut y.view_mut(), &mut ws));
    let other = NiceDevice::new(gpu, &NiceHost::random(&mut rng, 40, 2, Activation::Gelu));
    let x40 = up(gpu, &[0f32; 40]);
    let mut y40 = nan_buf(gpu, 40);
    expect_shape_err("workspace of other widths", nice_forward_with_workspace(gpu, &x40.view(), &other.params(), false, &mut y40.view_mut(), &mut ws));
    assert!(down(gpu, &y).iter().chain(&down(gpu, &y40)).all(|v| v.is_nan()));
}
test_device!(nice_workspace, nice_workspace_is_reusable);

fn nice_size_errors(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x5);
    let host = NiceHost::random(&mut rng, 40, 2, Activation::Relu);
    let dev = NiceDevice::new(gpu, &host);
    let spare = up(gpu, &vec![0f32; 1000]);
    let x = up(gpu, &vec![0.5f32; 3 * 40 + 1]);
    let mut y = nan_buf(gpu, 3 * 40 + 1);
    let good = dev.params();
    let xv = x.slice(0..120).unwrap();
    expect_shape_err("x not whole rows", nice_forward(gpu, &x.view(), &good, false, &mut y.view_mut()));
    expect_shape_err("out", nice_forward(gpu, &xv, &good, false, &mut y.view_mut()));
    // Each weight and bias one element off.
    for i in 0..8 {
        let mut p = good;
        let slot = match i / 2 {
            0 => &mut p.f0,
            1 => &mut p.f2,
            2 => &mut p.g0,
            _ => &mut p.g2,
        };
        let target = if i % 2 == 0 { &mut slot.0 } else { &mut slot.1 };
        *target = spare.slice(0..target.len() + 1).unwrap();
        expect_shape_err(&format!("parameter {i}"), nice_forward(gpu, &xv, &p, i % 4 == 3, &mut y.slice_mut(0..120).unwrap()));
    }
    assert!(down(gpu, &y).iter().all(|v| v.is_nan()), "a refused call wrote out");
    // Zero rows is a no-op.
    nice_forward(gpu, &x.slice(0..0).unwrap(), &good, false, &mut y.slice_mut(0..0).unwrap()).unwrap();
}
test_device!(nice_sizes, nice_size_errors);

// ---- schedules -------------------------------------------------------------------------------------

/// The executor reorders a block's threads between sync points; these kernels have no races, so
/// every schedule gives the same bits (the embedding's reductions are fixed-order).
#[cfg(feature = "cuda-sim")]
#[test]
fn schedules_agree_bit_for_bit() {
    let sims = bert_adapters::cuda::gpu::sims_for_test();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    let mut rng = StdRng::seed_from_u64(0x5c4e);
    let emb = EmbeddingCase::random(&mut rng, 3, 11, 384, uniform);
    let x = uniform(&mut rng, 33 * 48, -3.0, 3.0);
    let bias = uniform(&mut rng, 48, -1.0, 1.0);
    let host = NiceHost::random(&mut rng, 41, 2, Activation::Gelu);
    let nx = uniform(&mut rng, 33 * 41, -2.0, 2.0);
    let runs: Vec<[Vec<u32>; 4]> = sims
        .iter()
        .map(|gpu| {
            let e = run_embedding(gpu, &emb, true, Some(LayerNormPlan { threads_per_row: 128, rows_per_block: 1, cache_row: true }));
            let mut y = nan_buf(gpu, x.len());
            bias_act(gpu, &up(gpu, &x).view(), Some(&up(gpu, &bias).view()), Some(Activation::Gelu), 48, &mut y.view_mut(), None).unwrap();
            let dev = NiceDevice::new(gpu, &host);
            [bits(&e.y), bits(e.rstd.as_deref().unwrap()), bits(&down(gpu, &y)), bits(&run_nice(gpu, &dev, &nx, false))]
        })
        .collect();
    for (gpu, r) in sims.iter().zip(&runs).skip(1) {
        for (k, what) in ["embedding y", "embedding rstd", "bias_act", "nice"].iter().enumerate() {
            assert_eq!(r[k], runs[0][k], "{what} differs between {} and {}", sims[0].describe(), gpu.describe());
        }
    }
}

/// The device-side finiteness count behind `Backend::all_finite`: exact counts of NaN and ±inf
/// at lengths around the warp and block sizes, wherever the bad elements are.
fn nonfinite_elements_are_counted(gpu: &Gpu) {
    for n in [1usize, 31, 32, 33, 255, 1000, 4099] {
        let mut x: Vec<f32> = (0..n).map(|i| i as f32 * 0.25 - 3.0).collect();
        let clean = gpu.upload(&x).unwrap();
        assert_eq!(bert_adapters::cuda::elementwise::count_nonfinite(gpu, &clean.view()).unwrap(), 0, "n={n}");
        let bad: Vec<usize> = [0, n / 2, n - 1, n / 3].into_iter().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        for (k, &i) in bad.iter().enumerate() {
            x[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][k % 3];
        }
        let dirty = gpu.upload(&x).unwrap();
        assert_eq!(bert_adapters::cuda::elementwise::count_nonfinite(gpu, &dirty.view()).unwrap(), bad.len() as u64, "n={n} bad at {bad:?}");
    }
}
test_device!(nonfinite_count, nonfinite_elements_are_counted);
