//! CUDA fused attention forward (`kernels/attention.cu` through `cuda::attention`) vs the f64 CPU
//! reference (`bert_adapters::cpu::reference::attention` and `attention_lse`, the spec: HF eager
//! attention, the scaled score rounded to f32 before the additive mask).
//!
//! One body per test, run by `test_device!` on every device: `*::cuda_sim` on the CPU executor
//! (feature `cuda-sim`, as in CI) in the forward, reverse and random schedules; `*::cuda` on a
//! GPU, which prints `SKIPPED: ...` without one and fails under `REQUIRE_GPU=1`. T = 97, 128 and
//! 512 run on a GPU only (the executor runs one fiber per CUDA thread).
//!
//! Tolerance, for ctx and lse alike: max|out - ref| <= 1e-5 · (1 + max|ref|), with max|ref| taken
//! per batch row (so a fully padded row, whose lse is about -10000, does not loosen the others).
//! Why that size is right for an f32 kernel against an f64 reference:
//! - each score is a d-term f32 dot product (d <= 128) times 1/√d: with the realistic scores used
//!   here (|s| up to about 10) its rounding error is about √d·2^-24·Σ|q_c·k_c|/√d ≈ 1e-6, and a
//!   score error δ moves each softmax weight by a relative δ, so ctx by about δ·max|v|;
//! - the softmax weights are bounded (0 <= p <= 1, Σp = 1): the kernel sums at most T = 512
//!   products p_j·v_j by fma, rescaled at most T/32 times by the online softmax, so the context
//!   carries about √(T + 16)·2^-24·max|v| ≈ 1.4e-6·max|v| of rounding (worst case, all errors
//!   aligned, 3e-5·max|v|; they are not aligned in practice);
//! - lse = m + log(l) with l >= 1 summed over <= 16 terms per lane and a 5-level tree: ≈ 2e-6
//!   absolute, plus the score error.
//!   That is a few 1e-6 of the output's scale, so 1e-5 leaves margin (the tests report how much
//!   they use), yet any real bug (a wrong key, head, mask row or scale, a missed tile, a stale
//!   rescale) gives errors of 1e-3 or more. Outputs start as NaN, so an element the kernel never
//!   writes cannot pass; every output is checked to be finite (except where the reference
//!   itself is NaN: a row whose every key is masked with -inf).

use bert_adapters::cpu::reference;
use bert_adapters::cuda::attention::{attention_packed_forward, attention_packed_forward_with_plan, AttentionPlan};
use bert_adapters::cuda::gpu::{DeviceBuffer, Gpu, GpuKind};
use bert_adapters::cuda::probe::report_line;
use bert_adapters::{test_device, Error};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "support/attention_case.rs"]
mod attention_case;

use attention_case::{AttentionInputs, MaskKind, PAD};

type Case = AttentionInputs;

impl Case {
    /// (ctx, lse) from the f64 reference.
    fn reference(&self) -> (Vec<f32>, Vec<f32>) {
        let [q, k, v] = self.split();
        let (b, t, h, n) = (self.batch, self.seq, self.hidden, self.heads);
        (reference::attention(&q, &k, &v, &self.mask, b, t, h, n, None), reference::attention_lse(&q, &k, &self.mask, b, t, h, n))
    }
}

struct Outputs {
    ctx: Vec<f32>,
    lse: Vec<f32>,
}

fn up(gpu: &Gpu, v: &[f32]) -> DeviceBuffer<f32> {
    gpu.upload(v).unwrap_or_else(|e| panic!("upload: {e}"))
}

/// Uploads `case`, runs the kernel (auto plan if `plan` is None) on NaN-poisoned outputs, and
/// downloads them.
fn run(gpu: &Gpu, case: &Case, plan: Option<AttentionPlan>) -> Result<Outputs, Error> {
    let (qkv, mask) = (up(gpu, &case.qkv), up(gpu, &case.mask));
    let mut ctx = up(gpu, &vec![f32::NAN; case.batch * case.seq * case.hidden]);
    let mut lse = up(gpu, &vec![f32::NAN; case.batch * case.heads * case.seq]);
    let (b, t, h, n) = (case.batch, case.seq, case.hidden, case.heads);
    match plan {
        None => attention_packed_forward(gpu, &qkv.view(), &mask.view(), &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n)?,
        Some(p) => attention_packed_forward_with_plan(gpu, &qkv.view(), &mask.view(), &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n, p)?,
    }
    Ok(Outputs { ctx: gpu.download(&ctx.view())?, lse: gpu.download(&lse.view())? })
}

/// Asserts the tolerance per batch row (`got` and `want` split into `batch` equal chunks) and
/// returns how much of it was used (max |err| / tol). A NaN reference must be matched by a NaN.
fn assert_close(what: &str, label: &str, got: &[f32], want: &[f32], batch: usize) -> f32 {
    assert_eq!(got.len(), want.len(), "{label}: {what} length");
    if want.is_empty() {
        return 0.0;
    }
    let per = want.len() / batch;
    let mut worst = 0f32;
    for (b, (g, w)) in got.chunks(per).zip(want.chunks(per)).enumerate() {
        let scale = w.iter().filter(|v| !v.is_nan()).fold(0f32, |m, v| m.max(v.abs()));
        let tol = 1e-5 * (1.0 + scale);
        for (i, (g, w)) in g.iter().zip(w).enumerate() {
            let at = b * per + i;
            if w.is_nan() {
                assert!(g.is_nan(), "{label}: {what}[{at}] = {g}, the reference is NaN (every key masked with -inf)");
                continue;
            }
            let err = (g - w).abs();
            if !g.is_finite() || err.is_nan() || err > tol {
                panic!("{label}: {what}[{at}] = {g}, reference {w}, |err| {err:e} > tol {tol:e}");
            }
            worst = worst.max(err / tol);
        }
    }
    worst
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Runs one case against the reference; returns the outputs and the largest fraction of the
/// tolerance used.
fn check(gpu: &Gpu, case: &Case, plan: Option<AttentionPlan>) -> (Outputs, f32) {
    let label = format!("{} {} {plan:?}", gpu.describe(), case.label());
    let got = run(gpu, case, plan).unwrap_or_else(|e| panic!("{label}: {e}"));
    let (ctx, lse) = case.reference();
    let used = assert_close("ctx", &label, &got.ctx, &ctx, case.batch).max(assert_close("lse", &label, &got.lse, &lse, case.batch));
    (got, used)
}

/// Sequence lengths: around one key tile (32) and a block's rows everywhere; longer ones where a
/// GPU runs them.
fn seqs(gpu: &Gpu) -> Vec<usize> {
    let mut v = vec![1, 7, 33];
    if gpu.kind() == GpuKind::Cuda {
        v.extend([97, 128, 512]);
    }
    v
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
    let mut rng = StdRng::seed_from_u64(0xa77e_5eed);
    let mut worst = (0f32, String::new());
    let mut cases = 0;
    for seq in seqs(gpu) {
        for (batch, d, heads, mask) in SHAPES {
            let case = Case::random(&mut rng, batch, seq, d, heads, mask);
            let (_, used) = check(gpu, &case, None);
            cases += 1;
            if used > worst.0 {
                worst = (used, case.label());
            }
        }
    }
    report_line(&format!("attention on {}: {cases} cases pass; worst max|err|/tol = {:.3} at {}", gpu.describe(), worst.0, worst.1));
}
test_device!(awkward_shapes_match_reference, matches_reference_at_awkward_shapes);

/// Every block shape the launcher accepts (1..=8 warps; 8 warps at d = 128 would need more than
/// 48 KiB of shared memory and is refused), generic and specialised kernels. The specialised kernels do the same operations in
/// the same order as the generic one, so on the executor they must agree bit for bit; and one
/// launch repeated gives the same bits (fixed reduction order).
fn every_launch_plan_matches_reference(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x9_1a25);
    let seq = if gpu.kind() == GpuKind::Sim { 33 } else { 97 };
    for (batch, d, heads) in [(1, 32, 2), (2, 64, 1), (1, 128, 1), (1, 24, 2)] {
        let case = Case::random(&mut rng, batch, seq, d, heads, MaskKind::Padded);
        for warps in [1, 2, 3, 4, 8] {
            let plan = AttentionPlan { warps_per_block: warps, specialised: true };
            if d == 128 && warps == 8 {
                let err = run(gpu, &case, Some(plan)).err();
                assert!(matches!(err, Some(Error::Shape { .. })), "{}: a 52.5 KiB plan must be refused, got {err:?}", case.label());
                continue;
            }
            let (a, _) = check(gpu, &case, Some(plan));
            let generic = AttentionPlan { specialised: false, ..plan };
            let (g, _) = check(gpu, &case, Some(generic));
            let label = format!("{} {} {plan:?}", gpu.describe(), case.label());
            if gpu.kind() == GpuKind::Sim {
                assert_eq!(bits(&a.ctx), bits(&g.ctx), "{label}: ctx of the generic and specialised kernels differ");
                assert_eq!(bits(&a.lse), bits(&g.lse), "{label}: lse of the generic and specialised kernels differ");
            } else {
                let diff = a.ctx.iter().zip(&g.ctx).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                report_line(&format!("attention {label}: generic vs specialised max |diff| {diff:e}"));
            }
            let again = run(gpu, &case, Some(plan)).unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_eq!(bits(&a.ctx), bits(&again.ctx), "{label}: ctx not deterministic");
            assert_eq!(bits(&a.lse), bits(&again.lse), "{label}: lse not deterministic");
        }
    }
}
test_device!(every_plan_matches_reference, every_launch_plan_matches_reference);

/// The executor's schedules reorder the threads of a block between sync points; a race-free
/// kernel with fixed-order reductions gives the same bits in each of them.
#[cfg(feature = "cuda-sim")]
#[test]
fn schedules_agree_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(0x5c4e_d01e);
    for (batch, d, heads, warps) in [(3, 64, 2, 4), (3, 20, 3, 2), (2, 32, 1, 8)] {
        let case = Case::random(&mut rng, batch, 33, d, heads, MaskKind::Shared(1));
        let plan = AttentionPlan { warps_per_block: warps, specialised: true };
        let runs: Vec<Outputs> = bert_adapters::cuda::gpu::sims_for_test().iter().map(|gpu| check(gpu, &case, Some(plan)).0).collect();
        for r in &runs[1..] {
            assert_eq!(bits(&runs[0].ctx), bits(&r.ctx), "{} {plan:?}: ctx differs between schedules", case.label());
            assert_eq!(bits(&runs[0].lse), bits(&r.lse), "{} {plan:?}: lse differs between schedules", case.label());
        }
    }
}

/// Rows whose keys are all masked, as the reference (and PyTorch) treat them:
/// - all -10000 (HF's extended mask for a fully padded sequence): softmax of the shifted scores;
/// - all f32::MIN (`torch.finfo.min`, newer HF): every score rounds to f32::MIN, uniform weights;
/// - all -inf: NaN (0/0) in ctx and lse, in the reference, PyTorch and the kernel alike;
/// - -inf on every key of the first tile and finite on one key of the second: the online
///   softmax starts from a -inf maximum and must not turn it into NaN (ctx = v of that key).
///
/// Q and K are multiples of 1/8 in [-2, 2] with d = 16, so every dot product is exact in f32 and
/// scale = 1/4 is exact: the scaled scores are identical to the reference's, and adding -10000
/// rounds them identically (its ulp is 2^-10, so a score off by 1e-7 could otherwise round to a
/// neighbour and move a weight by 1e-3).
fn fully_masked_rows_follow_the_reference(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xdead_0001);
    for seq in [7, 33] {
        let (batch, heads, d) = (4, 2, 16);
        let hidden = heads * d;
        let qkv: Vec<f32> = (0..batch * seq * 3 * hidden).map(|_| rng.random_range(-16i32..=16) as f32 / 8.0).collect();
        let mut mask = vec![0f32; batch * seq];
        mask[..seq].fill(PAD);
        mask[seq..2 * seq].fill(f32::MIN);
        mask[2 * seq..3 * seq].fill(f32::NEG_INFINITY);
        // The last key is the only finite one: with seq 33 the whole first tile is -inf.
        let first_finite = seq - 1;
        mask[3 * seq..3 * seq + first_finite].fill(f32::NEG_INFINITY);
        let case = Case { qkv, mask, batch, seq, hidden, heads };
        let (got, _) = check(gpu, &case, None);
        let (ref_ctx, ref_lse) = case.reference();
        assert!(ref_ctx[2 * seq * hidden..3 * seq * hidden].iter().all(|v| v.is_nan()), "the reference's -inf row is NaN");
        assert!(got.lse[2 * heads * seq..3 * heads * seq].iter().all(|v| v.is_nan()), "{}: -inf row lse must be NaN", case.label());
        assert!(ref_lse[..heads * seq].iter().all(|l| (*l - PAD).abs() < 30.0), "the -10000 row's lse is about -10000");
        // Row 3 attends to its one finite key: weight exp(0) = 1 exactly, so ctx is that V row.
        let [_, _, v] = case.split();
        for t in 0..seq {
            let (at, want) = ((3 * seq + t) * hidden, (3 * seq + first_finite) * hidden);
            assert_eq!(got.ctx[at..at + hidden], v[want..want + hidden], "{}: row 3 token {t}", case.label());
        }
    }
}
test_device!(fully_masked_rows, fully_masked_rows_follow_the_reference);

/// Replicated branches: a batch of 6 reading 3 mask rows gives the same bits as the same batch
/// with the mask rows written out 6 times.
fn shared_mask_rows_equal_a_replicated_mask(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x5ba4ed);
    let mut case = Case::random(&mut rng, 6, 33, 20, 2, MaskKind::Shared(3));
    let shared = run(gpu, &case, None).unwrap_or_else(|e| panic!("{e}"));
    case.mask = case.mask.repeat(2);
    let full = run(gpu, &case, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(bits(&shared.ctx), bits(&full.ctx), "ctx: mask read by row % B_mask differs from the written-out mask");
    assert_eq!(bits(&shared.lse), bits(&full.lse), "lse: mask read by row % B_mask differs from the written-out mask");
}
test_device!(shared_mask_rows, shared_mask_rows_equal_a_replicated_mask);

/// Every size error is refused before launching (Error::Shape naming the operand), and nothing
/// is written.
fn wrong_sizes_are_errors_and_nothing_is_written(gpu: &Gpu) {
    let (b, t, h, n) = (4, 7, 16, 2);
    let qkv = up(gpu, &vec![0.5f32; b * t * 3 * h]);
    let mask = up(gpu, &vec![0f32; b * t]);
    let mut ctx = up(gpu, &vec![f32::NAN; b * t * h]);
    let mut lse = up(gpu, &vec![f32::NAN; b * n * t]);
    let shape_err = |r: Result<(), Error>, needle: &str| match r {
        Err(Error::Shape { msg, .. }) => assert!(msg.contains(needle), "`{msg}` does not mention `{needle}`"),
        other => panic!("expected a shape error mentioning `{needle}`, got {other:?}"),
    };
    let (q, m) = (qkv.view(), mask.view());
    let mask_cut = |len: usize| mask.slice(0..len).unwrap();
    shape_err(attention_packed_forward(gpu, &qkv.slice(0..b * t * 3 * h - 1).unwrap(), &m, &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n), "qkv has 1343 elements, expected 1344");
    shape_err(attention_packed_forward(gpu, &q, &m, &mut ctx.slice_mut(1..b * t * h).unwrap(), &mut lse.view_mut(), b, t, h, n), "ctx has 447 elements, expected 448");
    shape_err(attention_packed_forward(gpu, &q, &m, &mut ctx.view_mut(), &mut lse.slice_mut(0..b * n * t - 1).unwrap(), b, t, h, n), "lse has 55 elements, expected 56");
    // 3 mask rows do not divide a batch of 4; 5 is not a multiple of T; no mask at all.
    for (len, needle) in [(3 * t, "mask_bias has 21 elements"), (5, "mask_bias has 5 elements"), (0, "mask_bias has 0 elements")] {
        shape_err(attention_packed_forward(gpu, &q, &mask_cut(len), &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n), needle);
    }
    // 4 mask rows for a batch of 2.
    let q2 = qkv.slice(0..2 * t * 3 * h).unwrap();
    shape_err(attention_packed_forward(gpu, &q2, &m, &mut ctx.slice_mut(0..2 * t * h).unwrap(), &mut lse.slice_mut(0..2 * n * t).unwrap(), 2, t, h, n), "mask_bias has 28 elements");
    shape_err(attention_packed_forward(gpu, &q, &m, &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, 3), "hidden 16 is not divisible by 3 heads");
    shape_err(attention_packed_forward(gpu, &q, &m, &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, 0), "0 heads");
    shape_err(attention_packed_forward(gpu, &q, &m, &mut ctx.view_mut(), &mut lse.view_mut(), 1, 513, 16, 1), "sequence length 513 exceeds 512");
    shape_err(attention_packed_forward(gpu, &q, &m, &mut ctx.view_mut(), &mut lse.view_mut(), 1, 1, 258, 2), "head dim 129");
    let bad = AttentionPlan { warps_per_block: 9, specialised: true };
    shape_err(attention_packed_forward_with_plan(gpu, &q, &m, &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n, bad), "warps_per_block must be in 1..=8");
    assert!(gpu.download(&ctx.view()).unwrap().iter().all(|v| v.is_nan()), "a rejected launch wrote ctx");
    assert!(gpu.download(&lse.view()).unwrap().iter().all(|v| v.is_nan()), "a rejected launch wrote lse");
}
test_device!(wrong_sizes_are_refused, wrong_sizes_are_errors_and_nothing_is_written);

/// An empty batch or sequence launches nothing and succeeds, as the CPU backend does.
fn empty_inputs_are_a_no_op(gpu: &Gpu) {
    let mask = up(gpu, &[0f32; 7]);
    let mut buf = up(gpu, &[0f32; 4]);
    let mut lse = up(gpu, &[0f32; 4]);
    attention_packed_forward(gpu, &mask.slice(0..0).unwrap(), &mask.view(), &mut buf.slice_mut(0..0).unwrap(), &mut lse.slice_mut(0..0).unwrap(), 0, 7, 16, 2).expect("batch 0");
    attention_packed_forward(gpu, &mask.slice(0..0).unwrap(), &mask.slice(0..0).unwrap(), &mut buf.slice_mut(0..0).unwrap(), &mut lse.slice_mut(0..0).unwrap(), 3, 0, 16, 2).expect("seq 0");
}
test_device!(empty_inputs, empty_inputs_are_a_no_op);
