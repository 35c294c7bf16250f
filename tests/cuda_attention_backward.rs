//! CUDA fused attention backward (`kernels/attention.cu`'s backward section through
//! `cuda::attention::attention_packed_backward`) vs the f64 CPU reference
//! (`bert_adapters::cpu::reference::attention_backward`, the spec: HF eager attention's gradient).
//!
//! One body per test, run by `test_device!` on every device: `*::cuda_sim` on the CPU executor
//! (feature `cuda-sim`, as in CI) in the forward, reverse and random schedules; `*::cuda` on a
//! GPU, which prints `SKIPPED: ...` without one and fails under `REQUIRE_GPU=1`. T = 97, 128 and
//! 512 run on a GPU only.
//!
//! Each case runs the CUDA forward first (its ctx and lse are what the backward gets in training),
//! then the backward on a NaN-poisoned dqkv, and compares dQ, dK, dV with the reference computed
//! from the same inputs.
//!
//! Tolerance: max|out − ref| <= 1e-4 · (1 + max|ref|), with max|ref| taken per batch row and per
//! gradient (dQ, dK, dV), so a large dV does not loosen dQ. The kernel's own error is about 1e-6
//! of that scale (f32 dot products of d <= 128 terms, sums of <= 512 bounded terms, p from the
//! forward's f32 lse: see the kernel header), so the bound has a wide margin (the tests report
//! how much they use), while any real bug (a wrong key, row, head, mask row or scale, a missed
//! tile, a missing D term) gives errors of 1e-2 or more. Every element must be finite, except
//! where the reference is NaN (every key of a batch row masked with -inf), where it must be NaN.

use bert_adapters::cpu::reference;
use bert_adapters::cuda::attention::{
    attention_backward_workspace_len, attention_packed_backward, attention_packed_backward_with, attention_packed_forward, AttentionBackwardPlan,
};
use bert_adapters::cuda::gpu::{DeviceBuffer, Gpu, GpuKind};
use bert_adapters::cuda::probe::report_line;
use bert_adapters::{test_device, Error};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;

#[path = "support/attention_case.rs"]
mod attention_case;

use attention_case::{AttentionInputs, MaskKind, PAD};

/// The forward's inputs and the gradient of its output.
struct Case {
    inputs: AttentionInputs,
    dctx: Vec<f32>,
}

impl std::ops::Deref for Case {
    type Target = AttentionInputs;
    fn deref(&self) -> &AttentionInputs {
        &self.inputs
    }
}

impl std::ops::DerefMut for Case {
    fn deref_mut(&mut self) -> &mut AttentionInputs {
        &mut self.inputs
    }
}

impl Case {
    /// [`AttentionInputs::random`], then dctx uniform in ±2.
    fn random(rng: &mut StdRng, batch: usize, seq: usize, d: usize, heads: usize, mask: MaskKind) -> Case {
        let inputs = AttentionInputs::random(rng, batch, seq, d, heads, mask);
        let dctx = (0..batch * seq * inputs.hidden).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        Case { inputs, dctx }
    }

    /// The reference gradient, packed as `[B, T, 3H]` like the kernel's output.
    fn reference(&self) -> Vec<f32> {
        let [q, k, v] = self.split();
        let (b, t, h, n) = (self.batch, self.seq, self.hidden, self.heads);
        let (dq, dk, dv) = reference::attention_backward(&self.dctx, &q, &k, &v, &self.mask, b, t, h, n, None);
        let mut out = Vec::with_capacity(3 * dq.len());
        for ((a, b), c) in dq.chunks(h).zip(dk.chunks(h)).zip(dv.chunks(h)) {
            out.extend_from_slice(a);
            out.extend_from_slice(b);
            out.extend_from_slice(c);
        }
        out
    }
}

fn up(gpu: &Gpu, v: &[f32]) -> DeviceBuffer<f32> {
    gpu.upload(v).unwrap_or_else(|e| panic!("upload: {e}"))
}

/// Runs the CUDA forward on `case` (ctx, lse), then the backward (auto plan and allocated
/// workspace if `plan` is None) into a NaN-poisoned dqkv, and downloads it.
fn run(gpu: &Gpu, case: &Case, plan: Option<AttentionBackwardPlan>) -> Result<Vec<f32>, Error> {
    let (b, t, h, n) = (case.batch, case.seq, case.hidden, case.heads);
    let (qkv, mask, dctx) = (up(gpu, &case.qkv), up(gpu, &case.mask), up(gpu, &case.dctx));
    let mut ctx = up(gpu, &vec![f32::NAN; b * t * h]);
    let mut lse = up(gpu, &vec![f32::NAN; b * n * t]);
    attention_packed_forward(gpu, &qkv.view(), &mask.view(), &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n)?;
    let mut dqkv = up(gpu, &vec![f32::NAN; case.qkv.len()]);
    match plan {
        None => attention_packed_backward(gpu, &dctx.view(), &qkv.view(), &ctx.view(), &lse.view(), &mask.view(), &mut dqkv.view_mut(), b, t, h, n)?,
        Some(p) => {
            let mut ws = up(gpu, &vec![f32::NAN; attention_backward_workspace_len(b, t, n)?]);
            attention_packed_backward_with(gpu, &dctx.view(), &qkv.view(), &ctx.view(), &lse.view(), &mask.view(), &mut dqkv.view_mut(), &mut ws.view_mut(), b, t, h, n, p)?
        }
    }
    gpu.download(&dqkv.view())
}

/// Asserts the tolerance per batch row and per gradient (dQ, dK, dV: the column blocks of the
/// packed `[B, T, 3H]` layout) and returns how much of it was used (max |err| / tol). A NaN
/// reference must be matched by a NaN.
fn assert_close(label: &str, got: &[f32], want: &[f32], batch: usize, seq: usize, hidden: usize) -> f32 {
    assert_eq!(got.len(), want.len(), "{label}: dqkv length");
    let mut worst = 0f32;
    for b in 0..batch {
        for (part, name) in ["dQ", "dK", "dV"].iter().enumerate() {
            let at = |t: usize, c: usize| (b * seq + t) * 3 * hidden + part * hidden + c;
            let idx: Vec<usize> = (0..seq).flat_map(|t| (0..hidden).map(move |c| at(t, c))).collect();
            let scale = idx.iter().map(|&i| want[i]).filter(|v| !v.is_nan()).fold(0f32, |m, v| m.max(v.abs()));
            let tol = 1e-4 * (1.0 + scale);
            for &i in &idx {
                let (g, w) = (got[i], want[i]);
                let (t, c) = ((i / (3 * hidden)) % seq, i % hidden);
                if w.is_nan() {
                    assert!(g.is_nan(), "{label}: {name}[b={b}, t={t}, c={c}] = {g}, the reference is NaN (every key masked with -inf)");
                    continue;
                }
                let err = (g - w).abs();
                if !g.is_finite() || err.is_nan() || err > tol {
                    panic!("{label}: {name}[b={b}, t={t}, c={c}] = {g}, reference {w}, |err| {err:e} > tol {tol:e}");
                }
                worst = worst.max(err / tol);
            }
        }
    }
    worst
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Runs one case against the reference; returns dqkv and the largest fraction of the tolerance used.
fn check(gpu: &Gpu, case: &Case, plan: Option<AttentionBackwardPlan>) -> (Vec<f32>, f32) {
    let label = format!("{} {} {plan:?}", gpu.describe(), case.label());
    let got = run(gpu, case, plan).unwrap_or_else(|e| panic!("{label}: {e}"));
    let used = assert_close(&label, &got, &case.reference(), case.batch, case.seq, case.hidden);
    (got, used)
}

/// (batch, head dim, heads, mask): every head-dim path (generic d = 1, 8, 20, 128; the d = 32
/// and d = 64 kernels), heads 1..=4, B = 1 and 3, padded masks, and masks shared by replicated
/// branches (B = 6 over 3 mask rows, B = 3 over 1).
const SHAPES: [(usize, usize, usize, MaskKind); 9] = [
    (1, 8, 1, MaskKind::Zeros),
    (3, 8, 4, MaskKind::Padded),
    (3, 20, 3, MaskKind::Padded),
    (1, 32, 2, MaskKind::Padded),
    (3, 32, 4, MaskKind::Shared(1)),
    (3, 64, 1, MaskKind::Padded),
    (6, 64, 2, MaskKind::Shared(3)),
    (1, 128, 1, MaskKind::Padded),
    (3, 1, 3, MaskKind::Padded),
];

fn matches_reference_at_awkward_shapes(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xbac_5eed);
    let mut worst = (0f32, String::new());
    let mut cases = 0;
    let start = Instant::now();
    let mut seqs = vec![1, 7, 33];
    if gpu.kind() == GpuKind::Cuda {
        seqs.extend([97, 128, 512]);
    }
    for seq in seqs {
        for (batch, d, heads, mask) in SHAPES {
            // The f64 reference is O(B·heads·T²·d): at T = 512 two shapes are enough.
            if seq == 512 && !(d == 64 || d == 128) {
                continue;
            }
            let case = Case::random(&mut rng, batch, seq, d, heads, mask);
            let (_, used) = check(gpu, &case, None);
            cases += 1;
            if used > worst.0 {
                worst = (used, case.label());
            }
        }
    }
    report_line(&format!(
        "attention backward on {}: {cases} cases pass in {:.2} s; worst max|err|/tol = {:.4} at {}",
        gpu.describe(),
        start.elapsed().as_secs_f64(),
        worst.0,
        worst.1
    ));
}
test_device!(awkward_shapes_match_reference, matches_reference_at_awkward_shapes);

/// Every block shape the launcher accepts (dK/dV: 4 or 8 warps; dQ: 1..=8), generic and
/// specialised kernels, d = 128 included (over 48 KiB of shared memory: opted in). The
/// specialised kernels do the same operations in the same order as the generic ones, so on the
/// executor they agree bit for bit; and one launch repeated gives the same bits.
fn every_launch_plan_matches_reference(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x9_1a26);
    let seq = if gpu.kind() == GpuKind::Sim { 33 } else { 97 };
    for (batch, d, heads) in [(1, 32, 2), (2, 64, 1), (1, 128, 1), (1, 24, 2)] {
        let case = Case::random(&mut rng, batch, seq, d, heads, MaskKind::Padded);
        for (dkv_warps, dq_warps) in [(4, 1), (8, 2), (4, 3), (8, 4), (4, 8), (8, 8)] {
            let plan = AttentionBackwardPlan { dkv_warps, dq_warps, specialised: true };
            let label = format!("{} {} {plan:?}", gpu.describe(), case.label());
            let (a, _) = check(gpu, &case, Some(plan));
            let (g, _) = check(gpu, &case, Some(AttentionBackwardPlan { specialised: false, ..plan }));
            if gpu.kind() == GpuKind::Sim {
                assert_eq!(bits(&a), bits(&g), "{label}: the generic and specialised kernels differ");
            } else {
                let diff = a.iter().zip(&g).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                report_line(&format!("attention backward {label}: generic vs specialised max |diff| {diff:e}"));
            }
            let again = run(gpu, &case, Some(plan)).unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_eq!(bits(&a), bits(&again), "{label}: not deterministic");
        }
    }
}
test_device!(every_plan_matches_reference, every_launch_plan_matches_reference);

/// The executor's schedules reorder the threads of a block between sync points; race-free
/// kernels with fixed-order reductions give the same bits in each of them.
#[cfg(feature = "cuda-sim")]
#[test]
fn schedules_agree_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(0x5c4e_d01f);
    for (batch, d, heads, dkv_warps, dq_warps) in [(3, 64, 2, 4, 4), (3, 20, 3, 8, 2), (2, 32, 1, 4, 8)] {
        let case = Case::random(&mut rng, batch, 33, d, heads, MaskKind::Shared(1));
        let plan = AttentionBackwardPlan { dkv_warps, dq_warps, specialised: true };
        let runs: Vec<Vec<f32>> = bert_adapters::cuda::gpu::sims_for_test().iter().map(|gpu| check(gpu, &case, Some(plan)).0).collect();
        for r in &runs[1..] {
            assert_eq!(bits(&runs[0]), bits(r), "{} {plan:?}: dqkv differs between schedules", case.label());
        }
    }
}

/// Batch rows whose keys are all masked, as the reference (and PyTorch) treat them:
/// - all -10000 (HF's extended mask for an empty sequence): the lse is about -10000, where an f32
///   carries 5e-4 of rounding, and the kernel renormalises (c_i), so it matches the reference;
/// - all f32::MIN (`torch.finfo.min`): the lse rounds to f32::MIN itself, exp(s − lse) = 1 for
///   every key; the renormalisation gives the reference's uniform 1/T;
/// - all -inf: NaN (0/0) in the forward, and in the reference's dQ, dK and dV for the whole
///   batch row; the kernel gives NaN exactly there;
/// - -inf on every key but the last: finite, the gradient of attending to one key.
///
/// Q and K are multiples of 1/8 in [-2, 2] with d = 16, so every dot product is exact in f32 and
/// scale = 1/4 is exact: the scaled scores equal the reference's, and adding -10000 rounds them
/// identically (its ulp is 2^-10, so a score off by 1e-7 could otherwise round to a neighbour and
/// move a weight by 1e-3).
fn fully_masked_rows_follow_the_reference(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xdead_0002);
    for seq in [7, 33] {
        let (batch, heads, d) = (5, 2, 16);
        let hidden = heads * d;
        let qkv: Vec<f32> = (0..batch * seq * 3 * hidden).map(|_| rng.random_range(-16i32..=16) as f32 / 8.0).collect();
        let dctx: Vec<f32> = (0..batch * seq * hidden).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let mut mask = vec![0f32; batch * seq];
        mask[..seq].fill(PAD);
        mask[seq..2 * seq].fill(f32::MIN);
        mask[2 * seq..3 * seq].fill(f32::NEG_INFINITY);
        mask[3 * seq..4 * seq - 1].fill(f32::NEG_INFINITY);
        // Row 4: unmasked, a control.
        let case = Case { inputs: AttentionInputs { qkv, mask, batch, seq, hidden, heads }, dctx };
        let (got, _) = check(gpu, &case, None);
        let want = case.reference();
        let row = |v: &[f32], b: usize| v[b * seq * 3 * hidden..(b + 1) * seq * 3 * hidden].to_vec();
        assert!(row(&want, 2).iter().all(|v| v.is_nan()), "the reference's -inf row is NaN");
        assert!(row(&got, 2).iter().all(|v| v.is_nan()), "{}: the -inf row must be NaN", case.label());
        for b in [0, 1, 3, 4] {
            assert!(row(&want, b).iter().all(|v| v.is_finite()), "reference row {b} is finite");
            assert!(row(&got, b).iter().any(|v| *v != 0.0), "{}: row {b} is not all zero", case.label());
        }
    }
}
test_device!(fully_masked_rows, fully_masked_rows_follow_the_reference);

/// Replicated branches: a batch of 6 reading 3 mask rows gives the same bits as the same batch
/// with the mask rows written out 6 times.
fn shared_mask_rows_equal_a_replicated_mask(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x5ba4ee);
    let mut case = Case::random(&mut rng, 6, 33, 20, 2, MaskKind::Shared(3));
    let shared = run(gpu, &case, None).unwrap_or_else(|e| panic!("{e}"));
    case.mask = case.mask.repeat(2);
    let full = run(gpu, &case, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(bits(&shared), bits(&full), "dqkv: mask read by row % B_mask differs from the written-out mask");
}
test_device!(shared_mask_rows, shared_mask_rows_equal_a_replicated_mask);

/// The gradient is the derivative of the forward launcher's output: for L(qkv) = Σ ctx ⊙ G,
/// central differences (step 1e-2, loss summed in f64 from the downloaded f32 ctx) of a few
/// coordinates of Q, K and V, and of one random direction, agree with Σ dqkv ⊙ u for dctx = G.
/// A sanity check independent of the reference: its truncation error is O(step²) ≈ 1e-5 and its
/// f32 rounding ≈ 1e-5, so 2e-3 · (1 + |g|) separates a right gradient from a wrong one.
fn finite_differences_agree(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xfd_0001);
    let (batch, seq, d, heads) = (2, 6, 4, 2);
    let mut case = Case::random(&mut rng, batch, seq, d, heads, MaskKind::Padded);
    case.mask[seq + 4..].fill(PAD); // batch row 1 attends to 4 keys
    let (b, t, h, n) = (batch, seq, case.hidden, heads);
    let grad = run(gpu, &case, None).unwrap_or_else(|e| panic!("{e}"));
    let (mask, g) = (up(gpu, &case.mask), case.dctx.clone());
    let loss = |x: &[f32]| -> f64 {
        let qkv = up(gpu, x);
        let mut ctx = up(gpu, &vec![f32::NAN; b * t * h]);
        let mut lse = up(gpu, &vec![f32::NAN; b * n * t]);
        attention_packed_forward(gpu, &qkv.view(), &mask.view(), &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n).unwrap();
        gpu.download(&ctx.view()).unwrap().iter().zip(&g).map(|(c, g)| *c as f64 * *g as f64).sum()
    };
    let step = 1e-2f32;
    let fd = |u: &[f32]| -> f64 {
        let plus: Vec<f32> = case.qkv.iter().zip(u).map(|(x, u)| x + step * u).collect();
        let minus: Vec<f32> = case.qkv.iter().zip(u).map(|(x, u)| x - step * u).collect();
        (loss(&plus) - loss(&minus)) / (2.0 * step as f64)
    };
    let mut directions: Vec<Vec<f32>> = Vec::new();
    // Coordinates: Q, K, V of both batch rows, a padded key of row 1 (dK = dV = 0 there).
    for (row, col) in [(0, 0), (1, 5), (2, 8 + 3), (4, 8 + 6), (5, 16 + 1), (3, 16 + 7), (t + 2, 2), (t + 1, 8 + 4), (t + 3, 16 + 5), (t + 5, 8 + 1), (t + 5, 16 + 2)] {
        let mut u = vec![0f32; case.qkv.len()];
        u[row * 3 * h + col] = 1.0;
        directions.push(u);
    }
    let norm = (case.qkv.len() as f32).sqrt();
    directions.push((0..case.qkv.len()).map(|_| rng.random_range(-1.0f32..1.0) / norm * 4.0).collect());
    for u in &directions {
        let want = fd(u);
        let got: f64 = grad.iter().zip(u).map(|(g, u)| *g as f64 * *u as f64).sum();
        let tol = 2e-3 * (1.0 + got.abs());
        assert!((got - want).abs() <= tol, "{}: directional derivative {got} vs central difference {want} (tol {tol:e})", gpu.describe());
    }
    // The padded key of batch row 1 gets no gradient.
    let padded = (t + 5) * 3 * h;
    assert!(grad[padded + h..padded + 3 * h].iter().all(|v| v.abs() < 1e-6), "a padded key got dK/dV");
}
test_device!(finite_differences, finite_differences_agree);

/// Every size error is refused before launching (Error::Shape naming the operand), and nothing
/// is written.
fn wrong_sizes_are_errors_and_nothing_is_written(gpu: &Gpu) {
    let (b, t, h, n) = (4, 7, 16, 2);
    let qkv = up(gpu, &vec![0.5f32; b * t * 3 * h]);
    let mask = up(gpu, &vec![0f32; b * t]);
    let ctx = up(gpu, &vec![0.25f32; b * t * h]);
    let dctx = up(gpu, &vec![1f32; b * t * h]);
    let lse = up(gpu, &vec![1f32; b * n * t]);
    let mut dqkv = up(gpu, &vec![f32::NAN; b * t * 3 * h]);
    let mut ws = up(gpu, &vec![f32::NAN; 2 * b * n * t]);
    let shape_err = |r: Result<(), Error>, needle: &str| match r {
        Err(Error::Shape { op, msg }) => {
            assert_eq!(op, "cuda::attention_packed_backward");
            assert!(msg.contains(needle), "`{msg}` does not mention `{needle}`");
        }
        other => panic!("expected a shape error mentioning `{needle}`, got {other:?}"),
    };
    let (dc, q, c, l, m) = (dctx.view(), qkv.view(), ctx.view(), lse.view(), mask.view());
    fn cut(buf: &DeviceBuffer<f32>, len: usize) -> bert_adapters::cuda::gpu::DeviceView<'_, f32> {
        buf.slice(0..len).unwrap()
    }
    shape_err(attention_packed_backward(gpu, &cut(&dctx, b * t * h - 1), &q, &c, &l, &m, &mut dqkv.view_mut(), b, t, h, n), "dctx has 447 elements, expected 448");
    shape_err(attention_packed_backward(gpu, &dc, &cut(&qkv, b * t * 3 * h - 1), &c, &l, &m, &mut dqkv.view_mut(), b, t, h, n), "qkv has 1343 elements, expected 1344");
    shape_err(attention_packed_backward(gpu, &dc, &q, &cut(&ctx, 5), &l, &m, &mut dqkv.view_mut(), b, t, h, n), "ctx has 5 elements, expected 448");
    shape_err(attention_packed_backward(gpu, &dc, &q, &c, &cut(&lse, b * n * t - 1), &m, &mut dqkv.view_mut(), b, t, h, n), "lse has 55 elements, expected 56");
    shape_err(attention_packed_backward(gpu, &dc, &q, &c, &l, &cut(&mask, 3 * t), &mut dqkv.view_mut(), b, t, h, n), "mask_bias has 21 elements");
    shape_err(attention_packed_backward(gpu, &dc, &q, &c, &l, &cut(&mask, 0), &mut dqkv.view_mut(), b, t, h, n), "mask_bias has 0 elements");
    shape_err(attention_packed_backward(gpu, &dc, &q, &c, &l, &m, &mut dqkv.slice_mut(1..b * t * 3 * h).unwrap(), b, t, h, n), "dqkv has 1343 elements, expected 1344");
    shape_err(attention_packed_backward(gpu, &dc, &q, &c, &l, &m, &mut dqkv.view_mut(), b, t, h, 3), "hidden 16 is not divisible by 3 heads");
    shape_err(attention_packed_backward(gpu, &dc, &q, &c, &l, &m, &mut dqkv.view_mut(), b, t, h, 0), "0 heads");
    shape_err(attention_packed_backward(gpu, &dc, &q, &c, &l, &m, &mut dqkv.view_mut(), 1, 513, 16, 1), "sequence length 513 exceeds 512");
    shape_err(attention_packed_backward(gpu, &dc, &q, &c, &l, &m, &mut dqkv.view_mut(), 1, 1, 258, 2), "head dim 129");
    let plan = AttentionBackwardPlan::auto(b, t, n);
    shape_err(
        attention_packed_backward_with(gpu, &dc, &q, &c, &l, &m, &mut dqkv.view_mut(), &mut ws.slice_mut(0..2 * b * n * t - 1).unwrap(), b, t, h, n, plan),
        "workspace has 111 elements, expected at least 112",
    );
    for bad in [AttentionBackwardPlan { dkv_warps: 2, ..plan }, AttentionBackwardPlan { dq_warps: 9, ..plan }] {
        let r = attention_packed_backward_with(gpu, &dc, &q, &c, &l, &m, &mut dqkv.view_mut(), &mut ws.view_mut(), b, t, h, n, bad);
        shape_err(r, "launch plan");
    }
    // Outputs may not alias inputs or each other.
    // SAFETY (both views): the launcher refuses the aliasing before any kernel could write.
    let mut ws_on_qkv = unsafe { qkv.slice(0..2 * b * n * t).unwrap().assume_writable() };
    let r = attention_packed_backward_with(gpu, &dc, &q, &c, &l, &m, &mut dqkv.view_mut(), &mut ws_on_qkv, b, t, h, n, plan);
    assert!(matches!(r, Err(Error::Input(ref msg)) if msg.contains("workspace overlaps qkv")), "{r:?}");
    let big = up(gpu, &vec![f32::NAN; b * t * 3 * h + 100]);
    let mut out = unsafe { big.slice(0..b * t * 3 * h).unwrap().assume_writable() };
    let mut ws_on_out = unsafe { big.slice(b * t * 3 * h - 12..b * t * 3 * h + 100).unwrap().assume_writable() };
    let r = attention_packed_backward_with(gpu, &dc, &q, &c, &l, &m, &mut out, &mut ws_on_out, b, t, h, n, plan);
    assert!(matches!(r, Err(Error::Input(ref msg)) if msg.contains("dqkv overlaps workspace")), "{r:?}");
    assert!(gpu.download(&dqkv.view()).unwrap().iter().all(|v| v.is_nan()), "a rejected launch wrote dqkv");
    assert!(gpu.download(&ws.view()).unwrap().iter().all(|v| v.is_nan()), "a rejected launch wrote the workspace");
}
test_device!(wrong_sizes_are_refused, wrong_sizes_are_errors_and_nothing_is_written);

/// An empty batch or sequence launches nothing and succeeds, as the CPU backend does.
fn empty_inputs_are_a_no_op(gpu: &Gpu) {
    let buf = up(gpu, &[0f32; 7]);
    let mut out = up(gpu, &[0f32; 4]);
    let e = || buf.slice(0..0).unwrap();
    attention_packed_backward(gpu, &e(), &e(), &e(), &e(), &buf.view(), &mut out.slice_mut(0..0).unwrap(), 0, 7, 16, 2).expect("batch 0");
    attention_packed_backward(gpu, &e(), &e(), &e(), &e(), &e(), &mut out.slice_mut(0..0).unwrap(), 3, 0, 16, 2).expect("seq 0");
}
test_device!(empty_inputs, empty_inputs_are_a_no_op);
