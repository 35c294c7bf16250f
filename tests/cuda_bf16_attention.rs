//! CUDA fused attention with bf16 storage (the `_bf16io` kernels of `kernels/attention.cu`:
//! packed Q, K, V and the context in bf16; the mask and the row log-sum-exp in f32; f32
//! arithmetic) through `cuda::attention`'s launchers with `half::bf16` views: eval and
//! probability-dropout forward, and (the "backward" section at the end of this file, with its own
//! docs) the backward, dctx in and dqkv out in bf16.
//!
//! f16 storage (the `_f16io` kernels, `half::f16` views) is held to the same checks by the same
//! bodies, generic over the 16-bit type `H` ([`Io`]): every "bf16" below reads "H" (rounding,
//! ulps, the plain twin and the rule's floor are `H`'s); each test runs as `<name>::bf16` and
//! `<name>::f16`. The inputs fit f16's range as drawn (|Q|, |K| ≤ √6, |V|, |dctx| ≤ 2, the mask's
//! -10000 and the plain twin's scores, at most d·6 ≤ 768, are far below 65504), so the f16 cases
//! use the bf16 cases' draws unchanged; `f16_context_past_65504` checks where the range ends (a
//! context past 65504 is +inf, the f32 kernel's value rounded once). `backend_dispatch` checks
//! `CudaBackend`'s attention ops route bf16 and f16 tensors to these kernels.
//!
//! The rule of tests/support/bf16.rs: Q, K, V are drawn, rounded to bf16 and uploaded as bf16;
//! `f32_ref` is the f64 CPU reference (`cpu::reference::attention`, `attention_lse`, rounded to
//! f32 once) on those rounded values, and `plain` a plain bf16 attention written here as
//! PyTorch's bf16 eager path (HF `BertSelfAttention`) computes it:
//!     S = bf16(Q·Kᵀ, accumulated in f32);  S = bf16(S / √d);  S = bf16(S + bf16(mask))
//!     P = bf16(softmax(S) computed in f32);  [training: P = bf16(P · keep/(1 − p))]
//!     O = bf16(P·V, accumulated in f32)
//! The kernel's ctx must lie within 2·max|plain − f32_ref| (+ the rule's floor) of f32_ref.
//! The lse: the plain twin is torch.logsumexp over the plain bf16 S (in f32), under the same 2x
//! rule; and, tighter, since the kernel reads exactly the rounded values the reference reads,
//! the f32 kernel's own tolerance applies: |lse − ref| <= 1e-5·(1 + max|ref|) per batch row
//! (tests/cuda_attention.rs derives it: score rounding ~√d·2^-24·Σ|q·k|, the l sum ~2e-6).
//!
//! Exactness: a bf16 load widens exactly, so the bf16io kernel computes every score, weight, l,
//! lse and acc·(1/l) with the same f32 operations in the same order as the `_f32` kernel on the
//! rounded inputs uploaded in f32; the only new rounding is the context's one store. So ctx =
//! bf16(ctx of the f32 kernel) and lse = lse of the f32 kernel, asserted bit for bit on the
//! executor, and within one bf16 ulp (ctx) and the f32 tolerance (lse) on a GPU, where NVRTC
//! compiles the two instantiations separately.
//!
//! Outputs start as NaN (bf16 NaN for ctx), so an element the kernel never writes fails the
//! finiteness check of the rule. One body per test, run by `test_device!` on every device
//! (`*::cuda_sim` in the executor's three schedules; `*::cuda` on a GPU, skipped without one).

#[path = "support/bf16.rs"]
mod bf16_rule;

use bert_adapters::cpu::reference::{self, ProbDropout};
use bert_adapters::cuda::attention::{attention_packed_forward, attention_packed_forward_dropout, attention_packed_forward_with_plan, AttentionPlan};
use bert_adapters::cuda::elementwise::DeviceDropout;
use bert_adapters::cuda::gpu::{ActivationScalar, DeviceBuffer, DeviceScalar, Gpu, GpuKind};
use bert_adapters::cuda::probe::report_line;
use bert_adapters::train::dropout::{dropout_range, DropoutRng};
use bert_adapters::{test_device, Error};
use bf16_rule::{assert_within_twice_plain_in, round_all_in, round_in, to_half, widen_from, test_both, Half, Io};
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "support/attention_case.rs"]
mod attention_case;

use attention_case::{AttentionInputs, MaskKind, PAD};


/// A case: `qkv` already rounded to `H` (held as f32).
type Case = AttentionInputs;

impl Case {
    /// [`AttentionInputs::random`] with Q, K and V rounded to `H`.
    fn rounded<H: Half>(rng: &mut StdRng, batch: usize, seq: usize, d: usize, heads: usize, mask: MaskKind) -> Case {
        let mut case = AttentionInputs::random(rng, batch, seq, d, heads, mask);
        case.qkv = round_all_in::<H>(&case.qkv);
        case
    }

    /// (ctx, lse) of the f64 reference on the rounded inputs (each rounded to f32 once).
    fn reference(&self, dropout: Option<&ProbDropout>) -> (Vec<f32>, Vec<f32>) {
        let [q, k, v] = self.split();
        let (b, t, h, n) = (self.batch, self.seq, self.hidden, self.heads);
        (reference::attention(&q, &k, &v, &self.mask, b, t, h, n, dropout), reference::attention_lse(&q, &k, &self.mask, b, t, h, n))
    }

    /// (ctx, lse) of the plain bf16 attention of the module docs: ctx rounded to bf16 (as f32),
    /// lse in f32 from the plain bf16 scores.
    fn plain<H: Half>(&self, dropout: Option<&ProbDropout>) -> (Vec<f32>, Vec<f32>) {
        let [q, k, v] = self.split();
        let (batch, seq, hidden, heads) = (self.batch, self.seq, self.hidden, self.heads);
        let d = self.head_dim();
        let sqrt_d = (d as f32).sqrt();
        let mut ctx = vec![0f32; batch * seq * hidden];
        let mut lse = Vec::with_capacity(batch * heads * seq);
        let mut keep = vec![1f32; seq];
        let mut p = vec![0f32; seq];
        for b in 0..batch {
            let mask = &self.mask[(b % self.mask_rows()) * seq..][..seq];
            for h in 0..heads {
                for i in 0..seq {
                    let qi = &q[(b * seq + i) * hidden + h * d..][..d];
                    for (j, pj) in p.iter_mut().enumerate() {
                        let kj = &k[(b * seq + j) * hidden + h * d..][..d];
                        let dot = qi.iter().zip(kj).fold(0f32, |acc, (a, c)| acc + a * c); // bf16 products are exact in f32
                        *pj = round_in::<H>(round_in::<H>(round_in::<H>(dot) / sqrt_d) + round_in::<H>(mask[j]));
                    }
                    let max = p.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                    let mut sum = 0f32;
                    for pj in p.iter_mut() {
                        *pj = (*pj - max).exp();
                        sum += *pj;
                    }
                    lse.push(max + sum.ln());
                    if let Some(drop) = dropout {
                        drop(b, h, i, &mut keep);
                    }
                    for (pj, f) in p.iter_mut().zip(&keep) {
                        *pj = round_in::<H>(*pj / sum);
                        if dropout.is_some() {
                            *pj = round_in::<H>(*pj * f);
                        }
                    }
                    for c in 0..d {
                        let acc = p.iter().enumerate().fold(0f32, |acc, (j, pj)| acc + pj * v[(b * seq + j) * hidden + h * d + c]);
                        ctx[(b * seq + i) * hidden + h * d + c] = round_in::<H>(acc);
                    }
                }
            }
        }
        (ctx, lse)
    }

}

/// `cpu::prob_dropout`'s multipliers (what the CPU backend and the `_dropout` kernels draw):
/// probability (b, h, i, j) is element ((b_local·heads + h)·T + i)·T + j of its block's stream.
fn prob_dropout(d: &DeviceDropout<'_>, batch: usize, seq: usize, heads: usize) -> Box<ProbDropout> {
    let rng = DropoutRng::new(d.seed);
    let (p, streams) = (d.p, d.streams.clone());
    let per_block = batch / streams.len();
    Box::new(move |b: usize, h: usize, i: usize, factors: &mut [f32]| {
        factors.iter_mut().for_each(|f| *f = 1.0);
        let offset = (((b % per_block) * heads + h) * seq + i) * seq;
        dropout_range(factors, p, &rng, streams[b / per_block], offset).unwrap();
    })
}

struct Outputs {
    ctx: Vec<f32>,
    lse: Vec<f32>,
}

fn up<T: DeviceScalar>(gpu: &Gpu, v: &[T]) -> DeviceBuffer<T> {
    gpu.upload(v).unwrap_or_else(|e| panic!("upload: {e}"))
}

/// Runs the forward with `A` storage (f32 or bf16 uploads of the rounded qkv) on NaN-poisoned
/// outputs: the auto plan, or `plan`, or the dropout launcher; ctx widened to f32.
fn run_as<A: ActivationScalar>(gpu: &Gpu, case: &Case, plan: Option<AttentionPlan>, dropout: Option<&DeviceDropout<'_>>, conv: impl Fn(&[f32]) -> Vec<A>, back: impl Fn(&[A]) -> Vec<f32>) -> Result<Outputs, Error> {
    let (qkv, mask) = (up(gpu, &conv(&case.qkv)), up(gpu, &case.mask));
    let mut ctx = up(gpu, &conv(&vec![f32::NAN; case.batch * case.seq * case.hidden]));
    let mut lse = up(gpu, &vec![f32::NAN; case.batch * case.heads * case.seq]);
    let (b, t, h, n) = (case.batch, case.seq, case.hidden, case.heads);
    match (plan, dropout) {
        (_, Some(d)) => attention_packed_forward_dropout(gpu, &qkv.view(), &mask.view(), &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n, d)?,
        (Some(p), None) => attention_packed_forward_with_plan(gpu, &qkv.view(), &mask.view(), &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n, p)?,
        (None, None) => attention_packed_forward(gpu, &qkv.view(), &mask.view(), &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n)?,
    }
    Ok(Outputs { ctx: back(&gpu.download(&ctx.view())?), lse: gpu.download(&lse.view())? })
}

fn run_half<H: Io>(gpu: &Gpu, case: &Case, plan: Option<AttentionPlan>, dropout: Option<&DeviceDropout<'_>>) -> Outputs {
    run_as::<H>(gpu, case, plan, dropout, to_half::<H>, widen_from::<H>).unwrap_or_else(|e| panic!("{} {}io: {e}", case.label(), H::NAME))
}

fn run_f32(gpu: &Gpu, case: &Case, plan: Option<AttentionPlan>, dropout: Option<&DeviceDropout<'_>>) -> Outputs {
    run_as::<f32>(gpu, case, plan, dropout, |v| v.to_vec(), |v| v.to_vec()).unwrap_or_else(|e| panic!("{} f32: {e}", case.label()))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Distance in `H` ulps between two `H` values held as f32 (on a line that orders -0 < +0
/// next to each other, so a sign change counts the steps through zero).
fn half_ulps<H: Half>(a: f32, b: f32) -> u32 {
    let key = |x: f32| {
        let u = H::from_f32(x).to_bits() as i32;
        if u & 0x8000 != 0 { -(u & 0x7fff) - 1 } else { u }
    };
    key(a).abs_diff(key(b))
}

/// The f32 kernel's tolerance against the f64 reference (tests/cuda_attention.rs): per batch
/// row, |got − ref| <= 1e-5·(1 + max|ref|). Returns the fraction of it used.
fn assert_f32_close(label: &str, got: &[f32], want: &[f32], batch: usize) -> f64 {
    assert_eq!(got.len(), want.len(), "{label}: length");
    let per = want.len() / batch;
    let mut used = 0f64;
    for (b, (g, w)) in got.chunks(per).zip(want.chunks(per)).enumerate() {
        let tol = 1e-5 * (1.0 + w.iter().fold(0f64, |m, v| m.max(v.abs() as f64)));
        for (i, (g, w)) in g.iter().zip(w).enumerate() {
            let err = (*g as f64 - *w as f64).abs();
            assert!(g.is_finite() && err <= tol, "{label}: [{}] = {g}, reference {w}, |err| {err:e} > tol {tol:e}", b * per + i);
            used = used.max(err / tol);
        }
    }
    used
}

/// The bf16io kernel against the f32 kernel on the same rounded inputs: ctx is the f32 kernel's
/// rounded once and lse is the same (bitwise on the executor; one bf16 ulp and the f32
/// tolerance on a GPU, see the module docs).
fn assert_matches_f32_kernel<H: Io>(gpu: &Gpu, label: &str, got: &Outputs, f32_kernel: &Outputs, lse_ref: &[f32], batch: usize) {
    let rounded = round_all_in::<H>(&f32_kernel.ctx);
    if gpu.kind() == GpuKind::Sim {
        assert_eq!(bits(&got.ctx), bits(&rounded), "{label}: ctx is not the f32 kernel's rounded to {}", H::NAME);
        assert_eq!(bits(&got.lse), bits(&f32_kernel.lse), "{label}: lse differs from the f32 kernel's");
    } else {
        let (worst, at) = got.ctx.iter().zip(&rounded).enumerate().fold((0, 0), |(w, a), (i, (x, y))| if half_ulps::<H>(*x, *y) > w { (half_ulps::<H>(*x, *y), i) } else { (w, a) });
        assert!(worst <= 1, "{label}: ctx[{at}] = {} is {worst} {} ulps from the f32 kernel's rounded {}", got.ctx[at], H::NAME, rounded[at]);
        assert_f32_close(&format!("{label}: lse"), &got.lse, lse_ref, batch);
    }
}

/// One case, eval forward (auto plan or `plan`): the 2x-plain rule on ctx and lse, lse at the f32
/// tolerance, and equality with the f32 kernel. Returns (ctx error, plain ctx error, lse error,
/// plain lse error).
fn check<H: Io>(gpu: &Gpu, case: &Case, plan: Option<AttentionPlan>) -> (Outputs, [f64; 4]) {
    let label = format!("{} {} {} {plan:?}", H::NAME, gpu.describe(), case.label());
    let got = run_half::<H>(gpu, case, plan, None);
    let (ref_ctx, ref_lse) = case.reference(None);
    let (plain_ctx, plain_lse) = case.plain::<H>(None);
    let (e, pe) = assert_within_twice_plain_in::<H>(&format!("{label}: ctx"), &got.ctx, &ref_ctx, &plain_ctx);
    let (le, ple) = assert_within_twice_plain_in::<H>(&format!("{label}: lse"), &got.lse, &ref_lse, &plain_lse);
    assert_f32_close(&format!("{label}: lse"), &got.lse, &ref_lse, case.batch);
    assert_matches_f32_kernel::<H>(gpu, &label, &got, &run_f32(gpu, case, plan, None), &ref_lse, case.batch);
    (got, [e, pe, le, ple])
}

/// Sequence lengths: one key, a few, just past one key tile, and past two tiles (not a multiple
/// of 4).
const SEQS: [usize; 4] = [1, 7, 33, 70];

/// (batch, head dim, heads, mask): the generic kernel at d = 8, 12, 24, 40, 128 and the d = 32 and
/// d = 64 kernels (on the GEMM path, d = 12 is not a whole number of the layout kernels' 16-byte
/// units: element by element); batch 1..=3, heads 1..=3; padded masks and masks shared by replicated
/// branches (3 batch rows reading 1 mask row).
const SHAPES: [(usize, usize, usize, MaskKind); 10] = [
    (1, 8, 1, MaskKind::Zeros),
    (2, 12, 2, MaskKind::Padded),
    (3, 8, 3, MaskKind::Padded),
    (2, 24, 2, MaskKind::Padded),
    (3, 40, 1, MaskKind::Shared(1)),
    (1, 32, 2, MaskKind::Padded),
    (3, 32, 3, MaskKind::Shared(1)),
    (3, 64, 1, MaskKind::Padded),
    (2, 64, 3, MaskKind::Zeros),
    (1, 128, 1, MaskKind::Padded),
];

fn forward_matches_the_rule_at_awkward_shapes<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xbf16_a77e);
    let mut worst = (0f64, String::new());
    for seq in SEQS {
        for (batch, d, heads, mask) in SHAPES {
            let case = Case::rounded::<H>(&mut rng, batch, seq, d, heads, mask);
            let (_, [e, pe, le, ple]) = check::<H>(gpu, &case, None);
            if seq > 1 {
                // A real plain error exists (the rule is not vacuous) and the kernel is well inside
                // it: one rounding of an f32 result against the plain twin's four.
                assert!(pe > 0.0, "{}: the plain {} twin equals the reference", case.label(), H::NAME);
            }
            let ratio = if pe > 0.0 { e / pe } else { 0.0 };
            if ratio > worst.0 {
                worst = (ratio, case.label());
            }
            if seq == 70 && matches!(d, 8 | 64 | 128) {
                report_line(&format!("{}io attention {} {}: ctx err {e:.2e} (plain {pe:.2e}), lse err {le:.2e} (plain {ple:.2e})", H::NAME, gpu.describe(), case.label()));
            }
        }
    }
    report_line(&format!("{}io attention on {}: {} cases pass; worst ctx err / plain err = {:.3} at {}", H::NAME, gpu.describe(), SEQS.len() * SHAPES.len(), worst.0, worst.1));
}
test_both!(awkward_shapes, forward_matches_the_rule_at_awkward_shapes);

/// Every block shape (1..=8 warps), specialised and generic kernels: the specialised bf16io
/// kernels equal the generic one bit for bit on the executor (same body, same order), each
/// passes the rule, and d = 128 with 8 warps is refused as for f32.
fn every_plan_of_the_io_kernels<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xbf16_91a2);
    for (batch, d, heads) in [(1, 32, 2), (2, 64, 1), (1, 24, 3), (1, 128, 1)] {
        let case = Case::rounded::<H>(&mut rng, batch, 33, d, heads, MaskKind::Padded);
        for warps in [1, 2, 3, 4, 8] {
            let plan = AttentionPlan { warps_per_block: warps, specialised: true };
            if d == 128 && warps == 8 {
                let err = run_as::<H>(gpu, &case, Some(plan), None, to_half::<H>, widen_from::<H>).err();
                assert!(matches!(err, Some(Error::Shape { .. })), "{}: a 52.5 KiB plan must be refused, got {err:?}", case.label());
                continue;
            }
            let (a, _) = check::<H>(gpu, &case, Some(plan));
            let (g, _) = check::<H>(gpu, &case, Some(AttentionPlan { specialised: false, ..plan }));
            if gpu.kind() == GpuKind::Sim {
                let label = format!("{} {plan:?}", case.label());
                assert_eq!(bits(&a.ctx), bits(&g.ctx), "{label}: ctx of the generic and specialised {}io kernels differ", H::NAME);
                assert_eq!(bits(&a.lse), bits(&g.lse), "{label}: lse of the generic and specialised {}io kernels differ", H::NAME);
            }
        }
    }
}
test_both!(every_plan, every_plan_of_the_io_kernels);

/// Probability dropout (training): the `_dropout_bf16io` kernels (d = 8 and 24 generic, 32, 64)
/// under the rule against the reference and plain twin with the CPU's Philox multipliers, equal
/// to the f32 dropout kernel rounded, two dropout blocks (Parallel branches: batch rows b and
/// b + B/2 draw different streams); and dropout changed the context.
fn dropout_forward_matches_the_rule<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xbf16_d40b);
    for (batch, seq, d, heads, mask, streams) in [
        (2usize, 37usize, 8usize, 2usize, MaskKind::Shared(1), vec![(5u64 << 8) | 1, 5 << 8]),
        (1, 7, 32, 1, MaskKind::Padded, vec![3 << 8]),
        (2, 33, 64, 2, MaskKind::Padded, vec![(1 << 8) | 2, (1 << 8) | 3]),
        (3, 70, 24, 3, MaskKind::Shared(1), vec![9 << 8]),
    ] {
        let case = Case::rounded::<H>(&mut rng, batch, seq, d, heads, mask);
        let drop = DeviceDropout { seed_buffer: None, seed: 0xabc0 + d as u64, p: 0.2, streams, offset: 0 };
        let factors = prob_dropout(&drop, batch, seq, heads);
        let label = format!("{} {} {} dropout {:?}", H::NAME, gpu.describe(), case.label(), drop.streams);
        let got = run_half::<H>(gpu, &case, None, Some(&drop));
        let (ref_ctx, ref_lse) = case.reference(Some(&*factors));
        let (plain_ctx, plain_lse) = case.plain::<H>(Some(&*factors));
        let (e, pe) = assert_within_twice_plain_in::<H>(&format!("{label}: ctx"), &got.ctx, &ref_ctx, &plain_ctx);
        let (le, ple) = assert_within_twice_plain_in::<H>(&format!("{label}: lse"), &got.lse, &ref_lse, &plain_lse);
        assert_f32_close(&format!("{label}: lse"), &got.lse, &ref_lse, batch);
        assert_matches_f32_kernel::<H>(gpu, &label, &got, &run_f32(gpu, &case, None, Some(&drop)), &ref_lse, batch);
        let undropped = case.reference(None).0;
        assert!(undropped.iter().zip(&got.ctx).any(|(a, b)| (a - b).abs() > 0.05), "{label}: dropout changed nothing");
        report_line(&format!("{}io attention dropout {label}: ctx err {e:.2e} (plain {pe:.2e}), lse err {le:.2e} (plain {ple:.2e})", H::NAME));
    }
}
test_both!(dropout, dropout_forward_matches_the_rule);

/// Rows whose every key is masked with -inf: ctx is NaN (stored as a bf16 NaN) and lse NaN, as
/// in the f32 kernel and the reference; a row with one finite key among -inf ones attends to
/// exactly that key (weight exp(0) = 1), so its ctx is that V row, exact in bf16.
fn masked_rows_in_half<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xbf16_dead);
    let (batch, seq, d, heads) = (2, 33, 16, 2);
    let mut case = Case::rounded::<H>(&mut rng, batch, seq, d, heads, MaskKind::Zeros);
    case.mask[..seq].fill(f32::NEG_INFINITY);
    case.mask[seq..2 * seq - 1].fill(f32::NEG_INFINITY);
    let got = run_half::<H>(gpu, &case, None, None);
    let hidden = case.hidden;
    assert!(got.ctx[..seq * hidden].iter().all(|v| v.is_nan()), "row 0 (all -inf): ctx must be NaN");
    assert!(got.lse[..heads * seq].iter().all(|v| v.is_nan()), "row 0 (all -inf): lse must be NaN");
    let [_, _, v] = case.split();
    let want = &v[(2 * seq - 1) * hidden..][..hidden];
    for t in 0..seq {
        assert_eq!(&got.ctx[(seq + t) * hidden..][..hidden], want, "row 1 token {t}: ctx is not the one finite key's V");
    }
    assert!(got.lse[heads * seq..].iter().all(|v| v.is_finite()), "row 1: lse must be finite");
}
test_both!(masked_rows, masked_rows_in_half);

/// Lengths are counted in bf16 elements and checked before anything is written.
fn half_sizes_are_checked<H: Io>(gpu: &Gpu) {
    let (b, t, h, n) = (2, 7, 16, 2);
    let qkv = up(gpu, &vec![H::from_f32(0.5); b * t * 3 * h]);
    let mask = up(gpu, &vec![0f32; b * t]);
    let mut ctx = up(gpu, &vec![H::from_f32(f32::NAN); b * t * h]);
    let mut lse = up(gpu, &vec![f32::NAN; b * n * t]);
    let shape_err = |r: Result<(), Error>, needle: &str| match r {
        Err(Error::Shape { msg, .. }) => assert!(msg.contains(needle), "`{msg}` does not mention `{needle}`"),
        other => panic!("expected a shape error mentioning `{needle}`, got {other:?}"),
    };
    let (q, m) = (qkv.view(), mask.view());
    shape_err(attention_packed_forward(gpu, &qkv.slice(0..b * t * 3 * h - 1).unwrap(), &m, &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n), "qkv has 671 elements, expected 672");
    shape_err(attention_packed_forward(gpu, &q, &m, &mut ctx.slice_mut(1..b * t * h).unwrap(), &mut lse.view_mut(), b, t, h, n), "ctx has 223 elements, expected 224");
    shape_err(attention_packed_forward(gpu, &q, &m, &mut ctx.view_mut(), &mut lse.slice_mut(0..b * n * t - 1).unwrap(), b, t, h, n), "lse has 27 elements, expected 28");
    // The tensor-core forward (d = 16: its kernel applies) and backward make the same checks.
    shape_err(attention_mma_forward(gpu, &qkv.slice(0..b * t * 3 * h - 1).unwrap(), &m, &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n, None), "qkv has 671 elements, expected 672");
    shape_err(attention_mma_forward(gpu, &q, &m, &mut ctx.view_mut(), &mut lse.slice_mut(0..b * n * t - 1).unwrap(), b, t, h, n, None), "lse has 27 elements, expected 28");
    let (dctx, mut dqkv) = (up(gpu, &vec![H::from_f32(0.5); b * t * h]), up(gpu, &vec![H::from_f32(f32::NAN); b * t * 3 * h]));
    shape_err(attention_mma_backward(gpu, &dctx.slice(1..b * t * h).unwrap(), &q, &lse.view(), &m, &mut dqkv.view_mut(), b, t, h, n, None), "dctx has 223 elements, expected 224");
    shape_err(attention_mma_backward(gpu, &dctx.view(), &q, &lse.view(), &m, &mut dqkv.slice_mut(0..b * t * 3 * h - 1).unwrap(), b, t, h, n, None), "dqkv has 671 elements, expected 672");
    assert!(gpu.download(&dqkv.view()).unwrap().iter().all(|v| v.to_f32().is_nan()), "a rejected launch wrote dqkv");
    assert!(gpu.download(&ctx.view()).unwrap().iter().all(|v| v.to_f32().is_nan()), "a rejected launch wrote ctx");
    assert!(gpu.download(&lse.view()).unwrap().iter().all(|v| v.is_nan()), "a rejected launch wrote lse");
    attention_packed_forward(gpu, &q, &m, &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n).expect("the right sizes");
    // Uniform Q, K: uniform weights; V = 0.5 everywhere, so ctx = 0.5 exactly.
    assert!(gpu.download(&ctx.view()).unwrap().iter().all(|v| v.to_f32() == 0.5), "ctx of a constant V");
}
test_both!(sizes, half_sizes_are_checked);

/// f16's range ends at 65504: a context past it is stored as +inf, the f32 kernel's value rounded
/// once (65520 and up round to inf), never saturated. Q = K = 0 gives each of the T = 16 keys the
/// weight 1/16; V = 60000 everywhere and p = 0.5 dropout (keep factor 2) make ctx = 7500·kept,
/// exact in f32: past 65504 where a row keeps 9 or more keys, 60000 or less otherwise.
fn f16_context_past_its_range_is_inf(gpu: &Gpu) {
    let (batch, seq, d, heads) = (2, 16, 8, 2);
    let hidden = d * heads;
    let mut qkv = vec![0f32; batch * seq * 3 * hidden];
    for row in qkv.chunks_mut(3 * hidden) {
        row[2 * hidden..].fill(60000.0);
    }
    let case = Case { qkv, mask: vec![0f32; batch * seq], batch, seq, hidden, heads };
    let drop = DeviceDropout { seed_buffer: None, seed: 0xf160, p: 0.5, streams: vec![7 << 8], offset: 0 };
    let got = run_half::<f16>(gpu, &case, None, Some(&drop));
    let f32_kernel = run_f32(gpu, &case, None, Some(&drop));
    assert!(f32_kernel.ctx.iter().all(|v| v.is_finite() && v % 7500.0 == 0.0), "the f32 ctx is 7500·kept");
    let want = round_all_in::<f16>(&f32_kernel.ctx);
    assert!(want.iter().any(|v| v.is_infinite()) && want.iter().any(|v| v.is_finite() && *v >= 30000.0), "the draw must reach past 65504 and stay under it");
    for (i, ((g, w), f)) in got.ctx.iter().zip(&want).zip(&f32_kernel.ctx).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "ctx[{i}] = {g}: the f32 kernel's {f} rounds to {w}");
        assert_eq!(g.is_infinite(), *f >= 65520.0, "ctx[{i}] = {g} from {f}");
    }
    if gpu.kind() == GpuKind::Sim {
        assert_eq!(bits(&got.lse), bits(&f32_kernel.lse), "lse (f32) is the f32 kernel's");
    } else {
        assert_f32_close("lse", &got.lse, &f32_kernel.lse, batch);
    }
}
test_device!(f16_context_past_65504, f16_context_past_its_range_is_inf);

// ==== backward =================================================================================
//
// The `_bf16io` backward kernels (`attention_packed_backward*` with bf16 views): dctx, the packed
// Q, K, V and the forward's ctx in bf16, lse (and the workspace) f32, dqkv written in bf16. Each
// case runs the bf16io forward first (its bf16 ctx and f32 lse are what the backward gets in
// training), then the backward into a NaN-poisoned dqkv.
//
// The rule of tests/support/bf16.rs, per gradient (dQ, dK, dV: the column blocks of dqkv):
// `f32_ref` is the f64 reference gradient (`cpu::reference::attention_backward`, which recomputes
// the softmax from Q, K, V) on the rounded Q, K, V and dctx, rounded to f32 once; `plain` is
// PyTorch's bf16 eager backward of the plain forward above, op by op (autograd through HF's
// `BertSelfAttention`; every op's output rounded to bf16, products and reductions accumulated in
// f32):
//     dP' = bf16(dO·Vᵀ);  dV = bf16(P'ᵀ·dO);  [training: dP = bf16(dP' · keep/(1 − p))]
//     dS = bf16(P ⊙ (dP − rowsum(dP ⊙ P)))   (softmax backward, in f32 from the bf16 P and dP)
//     dS = bf16(dS / √d)                       (the division's backward; the mask add passes it)
//     dQ = bf16(dS·K);  dK = bf16(dSᵀ·Q)
// with P (and the dropped P') the plain forward's bf16 probabilities.
//
// Exactness: the kernels widen every bf16 load exactly and run the `_f32` kernels' operations in
// the same order, so dqkv = bf16(the `_f32` backward's dqkv on the widened dctx, qkv, ctx and the
// same lse): bit for bit on the executor, within one bf16 ulp on a GPU.
//
// T = 1: softmax over one key is constant, so the exact dQ and dK are 0 (the plain twin's too:
// dP − rowsum(dP·P) is dP − dP); the kernels' D = dO·O (from the stored ctx, a different
// summation order than dP) leaves f32 noise of about 2^-24·Σ|dO·v|·scale·|k|, which no bf16 twin
// has. There dQ and dK are held to 2·d²·2^-24·max|dO|·max|v|·max|k|/√d instead (the worst-case
// error of the two d-term f32 dot products, derived in `check_backward`, not taken from the
// kernel's output); dV (= dO) stays under the rule.

use bert_adapters::cuda::attention::{
    attention_backward_workspace_len, attention_packed_backward, attention_packed_backward_dropout_as, attention_packed_backward_with, AttentionBackwardPlan,
};

/// A backward case: the forward case and the output gradient, rounded to bf16 (held as f32).
struct BwdCase {
    fwd: Case,
    dctx: Vec<f32>,
}

impl BwdCase {
    fn random<H: Half>(rng: &mut StdRng, batch: usize, seq: usize, d: usize, heads: usize, mask: MaskKind) -> BwdCase {
        let fwd = Case::rounded::<H>(rng, batch, seq, d, heads, mask);
        let dctx = (0..batch * seq * fwd.hidden).map(|_| rng.random_range(-2.0f32..2.0)).collect::<Vec<_>>();
        BwdCase { fwd, dctx: round_all_in::<H>(&dctx) }
    }

    /// The f64 reference gradient, packed `[B, T, 3H]`, each element rounded to f32 once.
    fn reference(&self, dropout: Option<&ProbDropout>) -> Vec<f32> {
        let c = &self.fwd;
        let [q, k, v] = c.split();
        let (dq, dk, dv) = reference::attention_backward(&self.dctx, &q, &k, &v, &c.mask, c.batch, c.seq, c.hidden, c.heads, dropout);
        pack(&dq, &dk, &dv, c.hidden)
    }

    /// The plain bf16 backward of the module section's docs, packed `[B, T, 3H]`.
    fn plain<H: Half>(&self, dropout: Option<&ProbDropout>) -> Vec<f32> {
        let c = &self.fwd;
        let [q, k, v] = c.split();
        let (batch, seq, hidden, heads) = (c.batch, c.seq, c.hidden, c.heads);
        let d = c.head_dim();
        let sqrt_d = (d as f32).sqrt();
        let n = batch * seq * hidden;
        let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let at = |b: usize, t: usize, h: usize| (b * seq + t) * hidden + h * d;
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |acc, (x, y)| acc + x * y);
        let mut keep = vec![1f32; seq];
        for b in 0..batch {
            let mask = &c.mask[(b % c.mask_rows()) * seq..][..seq];
            for h in 0..heads {
                // Forward: P, the dropout factors and the dropped P' (row-major [i][j]).
                let (mut p, mut pd, mut fac) = (vec![0f32; seq * seq], vec![0f32; seq * seq], vec![1f32; seq * seq]);
                for i in 0..seq {
                    let row = &mut p[i * seq..][..seq];
                    for (j, s) in row.iter_mut().enumerate() {
                        *s = round_in::<H>(round_in::<H>(round_in::<H>(dot(&q[at(b, i, h)..][..d], &k[at(b, j, h)..][..d])) / sqrt_d) + round_in::<H>(mask[j]));
                    }
                    let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                    let mut sum = 0f32;
                    for s in row.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    row.iter_mut().for_each(|s| *s = round_in::<H>(*s / sum));
                    if let Some(drop) = dropout {
                        drop(b, h, i, &mut keep);
                        fac[i * seq..][..seq].copy_from_slice(&keep);
                    }
                    for j in 0..seq {
                        pd[i * seq + j] = if dropout.is_some() { round_in::<H>(p[i * seq + j] * fac[i * seq + j]) } else { p[i * seq + j] };
                    }
                }
                // Backward.
                let mut ds = vec![0f32; seq * seq];
                for i in 0..seq {
                    let go = &self.dctx[at(b, i, h)..][..d];
                    let dp: Vec<f32> = (0..seq)
                        .map(|j| {
                            let g = round_in::<H>(dot(go, &v[at(b, j, h)..][..d]));
                            if dropout.is_some() { round_in::<H>(g * fac[i * seq + j]) } else { g }
                        })
                        .collect();
                    let rowsum = (0..seq).fold(0f32, |acc, j| acc + dp[j] * p[i * seq + j]);
                    for j in 0..seq {
                        ds[i * seq + j] = round_in::<H>(round_in::<H>(p[i * seq + j] * (dp[j] - rowsum)) / sqrt_d);
                    }
                }
                for t in 0..seq {
                    for col in 0..d {
                        let dv_acc = (0..seq).fold(0f32, |acc, i| acc + pd[i * seq + t] * self.dctx[at(b, i, h) + col]);
                        let dk_acc = (0..seq).fold(0f32, |acc, i| acc + ds[i * seq + t] * q[at(b, i, h) + col]);
                        let dq_acc = (0..seq).fold(0f32, |acc, j| acc + ds[t * seq + j] * k[at(b, j, h) + col]);
                        dv[at(b, t, h) + col] = round_in::<H>(dv_acc);
                        dk[at(b, t, h) + col] = round_in::<H>(dk_acc);
                        dq[at(b, t, h) + col] = round_in::<H>(dq_acc);
                    }
                }
            }
        }
        pack(&dq, &dk, &dv, hidden)
    }

    fn label(&self) -> String {
        self.fwd.label()
    }
}

/// dQ, dK, dV (`[B, T, H]` each) side by side as `[B, T, 3H]`.
fn pack(dq: &[f32], dk: &[f32], dv: &[f32], hidden: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(3 * dq.len());
    for ((a, b), c) in dq.chunks(hidden).zip(dk.chunks(hidden)).zip(dv.chunks(hidden)) {
        out.extend_from_slice(a);
        out.extend_from_slice(b);
        out.extend_from_slice(c);
    }
    out
}

/// Column block `part` (0 dQ, 1 dK, 2 dV) of a packed `[rows, 3H]` gradient.
fn part(packed: &[f32], hidden: usize, part: usize) -> Vec<f32> {
    packed.chunks(3 * hidden).flat_map(|row| row[part * hidden..(part + 1) * hidden].iter().copied()).collect()
}

/// The forward's outputs the backward reads: bf16 ctx (widened) and f32 lse of the bf16io
/// forward (with `dropout` when given).
fn forward_for_backward<H: Io>(gpu: &Gpu, case: &Case, dropout: Option<&DeviceDropout<'_>>) -> Outputs {
    run_half::<H>(gpu, case, None, dropout)
}

/// Runs the backward with `A` storage on a NaN-poisoned dqkv: `plan` with a NaN-poisoned
/// workspace, or the auto plan (dropout or not). `ctx` holds bf16 values (the bf16io forward's).
#[allow(clippy::too_many_arguments)]
fn run_bwd_as<A: ActivationScalar>(
    gpu: &Gpu,
    case: &BwdCase,
    fwd: &Outputs,
    plan: Option<AttentionBackwardPlan>,
    dropout: Option<&DeviceDropout<'_>>,
    conv: impl Fn(&[f32]) -> Vec<A>,
) -> Result<Vec<A>, Error> {
    let c = &case.fwd;
    let (b, t, h, n) = (c.batch, c.seq, c.hidden, c.heads);
    let (qkv, dctx, ctx) = (up(gpu, &conv(&c.qkv)), up(gpu, &conv(&case.dctx)), up(gpu, &conv(&fwd.ctx)));
    let (lse, mask) = (up(gpu, &fwd.lse), up(gpu, &c.mask));
    let mut dqkv = up(gpu, &conv(&vec![f32::NAN; c.qkv.len()]));
    match (plan, dropout) {
        (Some(p), None) => {
            let mut ws = up(gpu, &vec![f32::NAN; attention_backward_workspace_len(b, t, n)?]);
            attention_packed_backward_with(gpu, &dctx.view(), &qkv.view(), &ctx.view(), &lse.view(), &mask.view(), &mut dqkv.view_mut(), &mut ws.view_mut(), b, t, h, n, p)?
        }
        (None, None) => attention_packed_backward(gpu, &dctx.view(), &qkv.view(), &ctx.view(), &lse.view(), &mask.view(), &mut dqkv.view_mut(), b, t, h, n)?,
        (_, Some(d)) => attention_packed_backward_dropout_as(gpu, &dctx.view(), &qkv.view(), &ctx.view(), &lse.view(), &mask.view(), &mut dqkv.view_mut(), b, t, h, n, Some(d))?,
    }
    gpu.download(&dqkv.view())
}

/// The rule per gradient, equality with the f32 backward kernel rounded once, and the T = 1
/// bound of the section docs. Returns the bf16 dqkv (widened) and, per gradient, (kernel error,
/// plain error).
fn check_backward<H: Io>(gpu: &Gpu, case: &BwdCase, plan: Option<AttentionBackwardPlan>, drop: Option<&DeviceDropout<'_>>) -> (Vec<f32>, [(f64, f64); 3]) {
    let c = &case.fwd;
    let label = format!("{} {} {} {plan:?} dropout {:?}", H::NAME, gpu.describe(), case.label(), drop.map(|d| (d.p, d.streams.clone())));
    let fwd = forward_for_backward::<H>(gpu, c, drop);
    let got = run_bwd_as::<H>(gpu, case, &fwd, plan, drop, to_half::<H>).unwrap_or_else(|e| panic!("{label} io: {e}"));
    let f32_kernel = run_bwd_as::<f32>(gpu, case, &fwd, plan, drop, |v| v.to_vec()).unwrap_or_else(|e| panic!("{label} f32: {e}"));
    bf16_rule::assert_rounded_f32_kernel_in::<H>(gpu, &format!("{label}: dqkv vs the f32 kernel"), &got, &f32_kernel);
    let got = widen_from::<H>(&got);
    let factors = drop.map(|d| prob_dropout(d, c.batch, c.seq, c.heads));
    let want = case.reference(factors.as_deref());
    let plain = case.plain::<H>(factors.as_deref());
    let mut errs = [(0f64, 0f64); 3];
    for (i, name) in ["dQ", "dK", "dV"].iter().enumerate() {
        let (g, w, p) = (part(&got, c.hidden, i), part(&want, c.hidden, i), part(&plain, c.hidden, i));
        if c.seq == 1 && i < 2 {
            let dmax = case.dctx.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
            let vmax = c.qkv.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
            // dS = dP − D, two d-term f32 dot products of the same exact values (p = 1 and ctx = v
            // exactly at T = 1), each off by at most γ_d·Σ|dO·v| ≤ d·2^-24·d·max|dO|·max|v|;
            // times scale·max|k| (or |q|), then one bf16 rounding (2^-9 relative, inside the
            // factor 2 spent on γ_d ≈ d·2^-24).
            let d = c.head_dim() as f64;
            let tol = 2.0 * d * 2f64.powi(-24) * d * dmax * vmax / d.sqrt() * vmax;
            assert!(w.iter().all(|x| *x == 0.0), "{label}: the reference {name} at T = 1 is not 0");
            assert!(g.iter().all(|x| (*x as f64).abs() <= tol), "{label}: {name} at T = 1 exceeds {tol:e}");
            continue;
        }
        errs[i] = assert_within_twice_plain_in::<H>(&format!("{label}: {name}"), &g, &w, &p);
    }
    (got, errs)
}

/// Ratio kernel error / plain error (0 where the plain error is 0: T = 1's dQ, dK).
fn ratio((e, p): (f64, f64)) -> f64 {
    if p > 0.0 { e / p } else { 0.0 }
}

/// Awkward shapes, eval backward, auto plan: T 1, 7, 33, 70 against every head-dim path (generic
/// d = 8, 24, 40, 128; the d = 32 and d = 64 kernels), padded and shared masks.
fn backward_matches_the_rule_at_awkward_shapes<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xbf16_bac0);
    let mut worst = (0f64, String::new());
    let mut cases = 0;
    for seq in SEQS {
        for (batch, d, heads, mask) in SHAPES {
            // The executor runs each case in three schedules: at T = 70 one shape per kernel.
            if seq == 70 && !matches!((batch, d, heads), (3, 8, 3) | (2, 24, 2) | (1, 32, 2) | (3, 64, 1) | (1, 128, 1)) {
                continue;
            }
            let case = BwdCase::random::<H>(&mut rng, batch, seq, d, heads, mask);
            let (_, errs) = check_backward::<H>(gpu, &case, None, None);
            cases += 1;
            for (e, name) in errs.iter().zip(["dQ", "dK", "dV"]) {
                if seq > 1 {
                    assert!(e.1 > 0.0, "{}: the plain {} {name} equals the reference", case.label(), H::NAME);
                }
                if ratio(*e) > worst.0 {
                    worst = (ratio(*e), format!("{} {name}", case.label()));
                }
            }
            if seq == 70 {
                let [q, k, v] = errs;
                report_line(&format!(
                    "{}io attention backward {} {}: dQ err {:.2e} (plain {:.2e}), dK {:.2e} ({:.2e}), dV {:.2e} ({:.2e})",
                    H::NAME,
                    gpu.describe(),
                    case.label(),
                    q.0,
                    q.1,
                    k.0,
                    k.1,
                    v.0,
                    v.1
                ));
            }
        }
    }
    report_line(&format!("{}io attention backward on {}: {cases} cases pass; worst err / plain err = {:.3} at {}", H::NAME, gpu.describe(), worst.0, worst.1));
}
test_both!(backward_awkward_shapes, backward_matches_the_rule_at_awkward_shapes);

/// Every backward plan (dK/dV 4 or 8 warps, dQ 1..=8, d = 128 over 48 KiB opted in), specialised
/// and generic bf16io kernels: each under the rule and equal to the f32 kernel rounded; on the
/// executor the specialised and generic ones agree bit for bit.
fn every_plan_of_the_io_backward<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xbf16_9bac);
    for (batch, d, heads) in [(1, 32, 2), (2, 64, 1), (1, 24, 2), (1, 128, 1)] {
        let case = BwdCase::random::<H>(&mut rng, batch, 33, d, heads, MaskKind::Padded);
        for (dkv_warps, dq_warps) in [(4, 1), (8, 3), (4, 8), (8, 8)] {
            let plan = AttentionBackwardPlan { dkv_warps, dq_warps, specialised: true };
            let (a, _) = check_backward::<H>(gpu, &case, Some(plan), None);
            let (g, _) = check_backward::<H>(gpu, &case, Some(AttentionBackwardPlan { specialised: false, ..plan }), None);
            if gpu.kind() == GpuKind::Sim {
                assert_eq!(bits(&a), bits(&g), "{} {plan:?}: the generic and specialised {}io backward kernels differ", case.label(), H::NAME);
            }
        }
    }
}
test_both!(backward_every_plan, every_plan_of_the_io_backward);

/// Training: the `_dropout_bf16io` backward kernels (generic d = 8 and 24, d = 32, d = 64) with
/// p = 0.1 and 0.5, one and two dropout blocks (Parallel branches), the CPU's Philox factors in
/// the reference and the plain twin; equal to the f32 dropout backward rounded; and the factors
/// changed the gradient.
fn dropout_backward_matches_the_rule<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xbf16_dbac);
    for (batch, seq, d, heads, mask, p, streams) in [
        (2usize, 37usize, 8usize, 2usize, MaskKind::Shared(1), 0.1f32, vec![(5u64 << 8) | 1, 5 << 8]),
        (1, 7, 32, 1, MaskKind::Padded, 0.5, vec![3 << 8]),
        (2, 33, 64, 2, MaskKind::Padded, 0.1, vec![(1 << 8) | 2, (1 << 8) | 3]),
        (3, 70, 24, 3, MaskKind::Shared(1), 0.5, vec![9 << 8]),
    ] {
        let case = BwdCase::random::<H>(&mut rng, batch, seq, d, heads, mask);
        let drop = DeviceDropout { seed_buffer: None, seed: 0xd0_0000 + d as u64, p, streams, offset: 0 };
        let (got, errs) = check_backward::<H>(gpu, &case, None, Some(&drop));
        let undropped = case.reference(None);
        let moved = part(&undropped, case.fwd.hidden, 2).iter().zip(&part(&got, case.fwd.hidden, 2)).any(|(a, b)| (a - b).abs() > 0.05);
        assert!(moved, "{}: dropout changed nothing in dV", case.label());
        let [q, k, v] = errs;
        report_line(&format!(
            "{}io attention backward dropout p={p} {} {}: dQ err {:.2e} (plain {:.2e}), dK {:.2e} ({:.2e}), dV {:.2e} ({:.2e}); worst ratio {:.3}",
            H::NAME,
            gpu.describe(),
            case.label(),
            q.0,
            q.1,
            k.0,
            k.1,
            v.0,
            v.1,
            errs.iter().map(|e| ratio(*e)).fold(0f64, f64::max)
        ));
    }
}
test_both!(backward_dropout, dropout_backward_matches_the_rule);

/// Batch rows whose every key is padded with -10000: the lse is about -10000, so the prep kernel
/// renormalises (its bf16 Q·K recomputation path); the gradient follows the reference's uniform
/// weights under the rule and equals the f32 kernel's rounded.
fn fully_padded_rows_in_half<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xbf16_0fad);
    for seq in [7, 33] {
        let mut case = BwdCase::random::<H>(&mut rng, 3, seq, 16, 2, MaskKind::Padded);
        case.fwd.mask[seq..2 * seq].fill(PAD);
        let (got, _) = check_backward::<H>(gpu, &case, None, None);
        let row = &got[seq * 3 * case.fwd.hidden..2 * seq * 3 * case.fwd.hidden];
        assert!(row.iter().any(|v| *v != 0.0), "{}: the fully padded row's gradient is all zero", case.label());
    }
}
test_both!(backward_fully_padded_rows, fully_padded_rows_in_half);

/// bf16 lengths are counted in bf16 elements, errors name the operand, and nothing is written;
/// the workspace stays f32.
fn half_backward_sizes_are_checked<H: Io>(gpu: &Gpu) {
    let (b, t, h, n) = (2, 7, 16, 2);
    let qkv = up(gpu, &vec![H::from_f32(0.5); b * t * 3 * h]);
    let ctx = up(gpu, &vec![H::from_f32(0.5); b * t * h]);
    let dctx = up(gpu, &vec![H::from_f32(1.0); b * t * h]);
    let lse = up(gpu, &vec![1f32; b * n * t]);
    let mask = up(gpu, &vec![0f32; b * t]);
    let mut dqkv = up(gpu, &vec![H::from_f32(f32::NAN); b * t * 3 * h]);
    let mut ws = up(gpu, &vec![f32::NAN; 2 * b * n * t]);
    let shape_err = |r: Result<(), Error>, needle: &str| match r {
        Err(Error::Shape { op, msg }) => {
            assert_eq!(op, "cuda::attention_packed_backward");
            assert!(msg.contains(needle), "`{msg}` does not mention `{needle}`");
        }
        other => panic!("expected a shape error mentioning `{needle}`, got {other:?}"),
    };
    let (dc, q, c, l, m) = (dctx.view(), qkv.view(), ctx.view(), lse.view(), mask.view());
    shape_err(attention_packed_backward(gpu, &dctx.slice(0..b * t * h - 1).unwrap(), &q, &c, &l, &m, &mut dqkv.view_mut(), b, t, h, n), "dctx has 223 elements, expected 224");
    shape_err(attention_packed_backward(gpu, &dc, &qkv.slice(0..b * t * 3 * h - 2).unwrap(), &c, &l, &m, &mut dqkv.view_mut(), b, t, h, n), "qkv has 670 elements, expected 672");
    shape_err(attention_packed_backward(gpu, &dc, &q, &ctx.slice(0..5).unwrap(), &l, &m, &mut dqkv.view_mut(), b, t, h, n), "ctx has 5 elements, expected 224");
    shape_err(attention_packed_backward(gpu, &dc, &q, &c, &lse.slice(0..b * n * t - 1).unwrap(), &m, &mut dqkv.view_mut(), b, t, h, n), "lse has 27 elements, expected 28");
    shape_err(attention_packed_backward(gpu, &dc, &q, &c, &l, &m, &mut dqkv.slice_mut(1..b * t * 3 * h).unwrap(), b, t, h, n), "dqkv has 671 elements, expected 672");
    let plan = AttentionBackwardPlan::auto(b, t, n);
    shape_err(
        attention_packed_backward_with(gpu, &dc, &q, &c, &l, &m, &mut dqkv.view_mut(), &mut ws.slice_mut(0..2 * b * n * t - 1).unwrap(), b, t, h, n, plan),
        "workspace has 55 elements, expected at least 56",
    );
    assert!(gpu.download(&dqkv.view()).unwrap().iter().all(|v| v.to_f32().is_nan()), "a rejected launch wrote dqkv");
    // Aliasing is judged in bf16 bytes: dqkv directly followed by ctx in one buffer is fine, one
    // element of overlap is refused.
    let (nq, nc) = (b * t * 3 * h, b * t * h);
    let big = up(gpu, &vec![H::from_f32(0.5); nq + nc]);
    // SAFETY (both views): the kernels write only dqkv, and the overlapping launch is refused
    // before any kernel runs.
    let mut out = unsafe { big.slice(0..nq).unwrap().assume_writable() };
    let r = attention_packed_backward(gpu, &dc, &q, &big.slice(nq - 1..nq - 1 + nc).unwrap(), &l, &m, &mut out, b, t, h, n);
    assert!(matches!(r, Err(Error::Input(ref msg)) if msg.contains("dqkv overlaps ctx")), "{r:?}");
    let mut out = unsafe { big.slice(0..nq).unwrap().assume_writable() };
    attention_packed_backward(gpu, &dc, &q, &big.slice(nq..nq + nc).unwrap(), &l, &m, &mut out, b, t, h, n).expect("adjacent bf16 views do not overlap");
    // The right sizes, on the forward's own ctx and lse. Uniform Q, K: uniform weights and ctx =
    // 0.5 (the forward's sizes test), so D = dO·O = 8·0.5 = dP = dO·v for every key (d = 8, exact
    // in f32): dS = 0, dQ = dK = 0 exactly; dV = Σ_i p_ij·1 = 1 within a few f32 ulps, which is
    // 1.0 in bf16.
    let mut ctx_f = up(gpu, &vec![H::from_f32(f32::NAN); b * t * h]);
    let mut lse_f = up(gpu, &vec![f32::NAN; b * n * t]);
    attention_packed_forward(gpu, &q, &m, &mut ctx_f.view_mut(), &mut lse_f.view_mut(), b, t, h, n).expect("forward");
    attention_packed_backward(gpu, &dc, &q, &ctx_f.view(), &lse_f.view(), &m, &mut dqkv.view_mut(), b, t, h, n).expect("the right sizes");
    let got = widen_from::<H>(&gpu.download(&dqkv.view()).unwrap());
    for (i, v) in got.iter().enumerate() {
        let want = if (i % (3 * h)) >= 2 * h { 1.0 } else { 0.0 };
        assert_eq!(*v, want, "dqkv[{i}] of the constant case");
    }
}
test_both!(backward_sizes, half_backward_sizes_are_checked);

//
// ---- the GEMM path with bf16 storage (`cuda::attention_gemm` with bf16 views) -----------------
//
// bf16 Q, K, V and dctx; bf16 GEMM operands P (forward), P∘M and dS (backward), each rounded once
// from its f32 value; f32 scores, dP, lse and row statistics; ctx and dqkv rounded once by the
// GEMMs' bf16 stores (kernels/attention.cu, "GEMM path"). Held to the same rule as the fused
// bf16io kernels, against the same f64 reference and the same plain bf16 twins above (which round
// S, P, dP and dS as PyTorch's eager bf16 attention does), forward and backward, eval and
// dropout; the lse, computed from f32 scores of the exact bf16 inputs, also to the f32 kernel's
// tolerance. No bitwise tie to an f32 run exists here (P and dS are rounded before their GEMMs),
// so there is no "equal to the f32 kernel rounded" check. f16 (`gemm_path_rule::f16`): the same
// with f16 operands and outputs (the `_f16io` row kernels, f16 GEMMs), under the f16 rule.

use bert_adapters::cuda::attention_gemm::{attention_gemm_backward, attention_gemm_forward};

/// The GEMM path's `H` forward on NaN-poisoned outputs; ctx widened.
fn run_gemm_half<H: Io>(gpu: &Gpu, case: &Case, dropout: Option<&DeviceDropout<'_>>) -> Outputs {
    let (b, t, h, n) = (case.batch, case.seq, case.hidden, case.heads);
    let (qkv, mask) = (up(gpu, &to_half::<H>(&case.qkv)), up(gpu, &case.mask));
    let mut ctx = up(gpu, &to_half::<H>(&vec![f32::NAN; b * t * h]));
    let mut lse = up(gpu, &vec![f32::NAN; b * n * t]);
    attention_gemm_forward(gpu, &qkv.view(), &mask.view(), &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n, dropout).unwrap_or_else(|e| panic!("{}: gemm {}: {e}", case.label(), H::NAME));
    Outputs { ctx: widen_from::<H>(&gpu.download(&ctx.view()).unwrap()), lse: gpu.download(&lse.view()).unwrap() }
}

/// The GEMM path's `H` backward from `lse` (the GEMM forward's) into a NaN-poisoned dqkv; widened.
fn run_gemm_bwd_half<H: Io>(gpu: &Gpu, case: &BwdCase, lse: &[f32], dropout: Option<&DeviceDropout<'_>>) -> Vec<f32> {
    let c = &case.fwd;
    let (b, t, h, n) = (c.batch, c.seq, c.hidden, c.heads);
    let (qkv, dctx, lse, mask) = (up(gpu, &to_half::<H>(&c.qkv)), up(gpu, &to_half::<H>(&case.dctx)), up(gpu, lse), up(gpu, &c.mask));
    let mut dqkv = up(gpu, &to_half::<H>(&vec![f32::NAN; c.qkv.len()]));
    attention_gemm_backward(gpu, &dctx.view(), &qkv.view(), &lse.view(), &mask.view(), &mut dqkv.view_mut(), b, t, h, n, dropout).unwrap_or_else(|e| panic!("{}: gemm {} backward: {e}", case.label(), H::NAME));
    widen_from::<H>(&gpu.download(&dqkv.view()).unwrap())
}

/// Awkward shapes (T 1, 7, 33, 70; d 8..=128; padded and shared masks), eval and dropout (p 0.1
/// and 0.5, one and two blocks): ctx, lse and dQ, dK, dV of the GEMM path under the 2x-plain rule.
fn gemm_path_matches_the_rule<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xbf16_6e44);
    let mut worst = (0f64, String::new());
    let mut cases = 0;
    // Past 128 keys the row kernels hold four groups of keys a lane (below, the _t128 ones hold
    // one): T = 130 runs those, at a quarter of the shapes (with and without dropout).
    for seq in SEQS.into_iter().chain([130]) {
        for (i, (batch, d, heads, mask)) in SHAPES.into_iter().enumerate() {
            if (seq == 70 && i % 2 == 1) || (seq == 130 && i % 4 != 1) {
                continue; // the executor runs every case in three schedules
            }
            let case = BwdCase::random::<H>(&mut rng, batch, seq, d, heads, mask);
            let drop = match i % 3 {
                0 => None,
                1 => Some(DeviceDropout { seed_buffer: None, seed: 0x6e44 + d as u64, p: 0.1, streams: vec![(2u64 << 8) | 1], offset: 0 }),
                _ if batch % 2 == 0 => Some(DeviceDropout { seed_buffer: None, seed: 0x6e45 + d as u64, p: 0.5, streams: vec![(3u64 << 8) | 4, (3u64 << 8) | 5], offset: 0 }),
                _ => Some(DeviceDropout { seed_buffer: None, seed: 0x6e46 + d as u64, p: 0.5, streams: vec![4u64 << 8], offset: 0 }),
            };
            let c = &case.fwd;
            let label = format!("{} {} {} GEMM path dropout {:?}", H::NAME, gpu.describe(), case.label(), drop.as_ref().map(|d| (d.p, d.streams.clone())));
            let factors = drop.as_ref().map(|d| prob_dropout(d, c.batch, c.seq, c.heads));
            let fwd = run_gemm_half::<H>(gpu, c, drop.as_ref());
            let (ref_ctx, ref_lse) = c.reference(factors.as_deref());
            let (plain_ctx, plain_lse) = c.plain::<H>(factors.as_deref());
            let ctx_err = assert_within_twice_plain_in::<H>(&format!("{label}: ctx"), &fwd.ctx, &ref_ctx, &plain_ctx);
            assert_within_twice_plain_in::<H>(&format!("{label}: lse"), &fwd.lse, &ref_lse, &plain_lse);
            assert_f32_close(&format!("{label}: lse"), &fwd.lse, &ref_lse, c.batch);
            let got = run_gemm_bwd_half::<H>(gpu, &case, &fwd.lse, drop.as_ref());
            let want = case.reference(factors.as_deref());
            let plain = case.plain::<H>(factors.as_deref());
            cases += 1;
            let mut errs = vec![("ctx", ctx_err)];
            for (i, name) in ["dQ", "dK", "dV"].into_iter().enumerate() {
                errs.push((name, assert_within_twice_plain_in::<H>(&format!("{label}: {name}"), &part(&got, c.hidden, i), &part(&want, c.hidden, i), &part(&plain, c.hidden, i))));
            }
            for (name, e) in errs {
                if ratio(e) > worst.0 {
                    worst = (ratio(e), format!("{} {name}", case.label()));
                }
            }
        }
    }
    report_line(&format!("{} GEMM attention on {}: {cases} cases pass; worst err / plain err = {:.3} at {}", H::NAME, gpu.describe(), worst.0, worst.1));
}
test_both!(gemm_path_rule, gemm_path_matches_the_rule);

/// Through `Backend` (what `CudaBackend::with_activations` runs): `attention_packed` and
/// `attention_packed_backward` on `H` Q, K, V and dctx return `H` ctx and dqkv (f32 lse) from the
/// `_*io` launchers tested above, on the three attention paths: the same bits as those launchers
/// called directly on the same operands (the fused backward from the backend's own forward ctx and
/// lse, which it recomputes; the GEMM backward, or its tensor-core twin, from the lse). The
/// dispatch is what this checks.
fn backend_dispatches_half_attention<H: Io>(gpu: &Gpu) {
    use bert_adapters::cuda::attention_gemm::AttentionPath;
    use bert_adapters::cuda::backend::CudaBackend;
    use bert_adapters::Backend;
    let mut rng = StdRng::seed_from_u64(0xbe16_a77e);
    let case = BwdCase::random::<H>(&mut rng, 2, 9, 32, 2, MaskKind::Padded);
    let c = &case.fwd;
    let dtype = <H as ActivationScalar>::DTYPE;
    for path in [AttentionPath::Fused, AttentionPath::Gemm, AttentionPath::TensorCores] {
        let be = CudaBackend::on(gpu.reopen().unwrap()).with_attention_path(path);
        let label = format!("{} {} backend {path:?} {}", H::NAME, gpu.describe(), c.label());
        let in_type = |v: &[f32], shape: &[usize]| be.cast(&be.upload(v.to_vec(), shape).unwrap(), dtype).unwrap();
        let qkv = in_type(&c.qkv, &[c.batch, c.seq, 3 * c.hidden]);
        let dctx = in_type(&case.dctx, &[c.batch, c.seq, c.hidden]);
        let mask = be.upload(c.mask.clone(), &[c.mask_rows(), c.seq]).unwrap();
        let (ctx, lse) = be.attention_packed(&qkv, &mask, c.heads, None).unwrap();
        let dqkv = be.attention_packed_backward(&dctx, &qkv, &lse, &mask, c.heads, None).unwrap();
        assert_eq!((ctx.dtype(), lse.dtype(), dqkv.dtype()), (dtype, bert_adapters::DType::F32, dtype), "{label}");
        let got = Outputs { ctx: be.to_host(&ctx).unwrap(), lse: be.to_host(&lse).unwrap() };
        let (want, want_dqkv) = match path {
            AttentionPath::Fused => {
                let fwd = run_half::<H>(gpu, c, None, None);
                let dqkv = run_bwd_as::<H>(gpu, &case, &fwd, None, None, to_half::<H>).unwrap();
                (fwd, widen_from::<H>(&dqkv))
            }
            AttentionPath::Gemm => {
                let fwd = run_gemm_half::<H>(gpu, c, None);
                let dqkv = run_gemm_bwd_half::<H>(gpu, &case, &fwd.lse, None);
                (fwd, dqkv)
            }
            AttentionPath::TensorCores => {
                let (fwd, counts) = run_mma_half::<H>(gpu, c, None);
                assert_eq!(counts, (1, 0), "{label}: the tensor-core forward ran");
                let (dqkv, counts) = run_mma_bwd_half::<H>(gpu, &case, &fwd.lse, None);
                assert_eq!(counts, MMA_BWD, "{label}: the tensor-core backward ran");
                (fwd, dqkv)
            }
        };
        if gpu.kind() == GpuKind::Sim {
            assert_eq!(bits(&got.ctx), bits(&want.ctx), "{label}: ctx");
            assert_eq!(bits(&got.lse), bits(&want.lse), "{label}: lse");
            assert_eq!(bits(&be.to_host(&dqkv).unwrap()), bits(&want_dqkv), "{label}: dqkv");
        } else {
            // The same kernels on the same operands; cuBLASLt may pick another algorithm per call.
            let dq = be.to_host(&dqkv).unwrap();
            for (name, g, w) in [("ctx", &got.ctx, &want.ctx), ("dqkv", &dq, &want_dqkv)] {
                let worst = g.iter().zip(w.iter()).map(|(a, b)| half_ulps::<H>(*a, *b)).max().unwrap_or(0);
                assert!(worst <= 1, "{label}: {name} {worst} ulps from the launcher's");
            }
        }
    }
}
test_both!(backend_dispatch, backend_dispatches_half_attention);

//
// ---- the tensor-core forward (`attention_mma_forward`: one launch, T <= 512, d 16, 32 or 64) --
//
// The GEMM path's forward in one kernel (kernels/attention.cu, "the tensor-core forward"): S and
// O on mma.sync, the softmax in registers, the same roundings (P and ctx once each) and dropout
// masks. Checked three ways:
// - the rule: ctx within twice the plain bf16 twin's error of the f64 reference, the lse within
//   the f32 kernel's tolerance of it and of the GEMM forward's lse (every score S = Q·Kᵀ feeds
//   the lse, so a misplaced Q or K element moves it far past 1e-5), at T 1..=257 (one key tile,
//   and at d = 64 two or three: the `_long_` kernel's two passes) with padded and shared masks,
//   eval and dropout;
// - exactly: where every rounding is exact (Q = 0, so every unmasked score is 0 and l counts the
//   row's keys; V small integers, so each P·V sum is a multiple of the row's one probability, exact
//   in any order), ctx and lse equal the GEMM forward's bit for bit: any misplaced V, P, dropout
//   factor or ctx element shows;
// - where it does not apply (d = 40, T > 128 at d = 32, f32, a misaligned qkv) it is the GEMM
//   forward.
// Each call must launch exactly one `attention_mma_forward*` kernel and no GEMM-path kernel.

use bert_adapters::cuda::attention_gemm::{attention_mma_forward, attention_mma_forward_applies};

/// The tensor-core forward on `H` (NaN-poisoned outputs; ctx widened), and how many kernels of
/// the tensor-core forward and of the GEMM path it launched.
fn run_mma_half<H: Io>(gpu: &Gpu, case: &Case, dropout: Option<&DeviceDropout<'_>>) -> (Outputs, (u64, u64)) {
    let (b, t, h, n) = (case.batch, case.seq, case.hidden, case.heads);
    let (qkv, mask) = (up(gpu, &to_half::<H>(&case.qkv)), up(gpu, &case.mask));
    let mut ctx = up(gpu, &to_half::<H>(&vec![f32::NAN; b * t * h]));
    let mut lse = up(gpu, &vec![f32::NAN; b * n * t]);
    let before = gpu.launch_counts();
    attention_mma_forward(gpu, &qkv.view(), &mask.view(), &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n, dropout).unwrap_or_else(|e| panic!("{}: mma {}: {e}", case.label(), H::NAME));
    let launched = gpu.launch_counts().since(&before);
    let counts = (launched.with_prefix("attention_mma_forward"), launched.with_prefix("attention_gemm"));
    (Outputs { ctx: widen_from::<H>(&gpu.download(&ctx.view()).unwrap()), lse: gpu.download(&lse.view()).unwrap() }, counts)
}

/// The dropout of case `i` (none, p 0.1 in one block, p 0.5 in two blocks or one), as the GEMM
/// rule test draws them (offset 0: the reference's `prob_dropout` takes none).
fn mma_case_dropout(i: usize, batch: usize, d: usize) -> Option<DeviceDropout<'static>> {
    match i % 3 {
        0 => None,
        1 => Some(DeviceDropout { seed_buffer: None, seed: 0x3a44 + d as u64, p: 0.1, streams: vec![(2u64 << 8) | 1], offset: 0 }),
        _ if batch.is_multiple_of(2) => Some(DeviceDropout { seed_buffer: None, seed: 0x3a45 + d as u64, p: 0.5, streams: vec![(3u64 << 8) | 4, (3u64 << 8) | 5], offset: 0 }),
        _ => Some(DeviceDropout { seed_buffer: None, seed: 0x3a46 + d as u64, p: 0.5, streams: vec![4u64 << 8], offset: 0 }),
    }
}

/// T 1..=128 (one and two blocks of 64 query rows, part 16-key slices), d 16, 32 and 64, padded,
/// zero and shared masks, eval and dropout: ctx under the 2x-plain rule, the lse within the f32
/// tolerance of the reference and of the GEMM forward's. Past one key tile (T 144 and 257: two
/// and three tiles, the last of 16 keys; the `_long_` kernel's two passes) at one d = 64 shape
/// each, the last batch row masked with PAD on every key (uniform weights at a finite max of
/// -10000).
fn mma_forward_matches_the_rule<H: Io>(gpu: &Gpu) {
    const MMA_SHAPES: [(usize, usize, usize, MaskKind); 5] =
        [(1, 32, 2, MaskKind::Padded), (3, 32, 3, MaskKind::Shared(1)), (3, 64, 1, MaskKind::Padded), (2, 64, 3, MaskKind::Zeros), (2, 16, 3, MaskKind::Padded)];
    let mut rng = StdRng::seed_from_u64(0x3a_0f0e);
    let (mut worst, mut cases, mut differing, mut elements) = ((0f64, String::new()), 0, 0usize, 0usize);
    for seq in [1, 7, 33, 64, 70, 128, 144, 257] {
        for (i, (batch, d, heads, mask)) in MMA_SHAPES.into_iter().enumerate() {
            // Past 128 one d = 64 shape a length (the executor's time): i = 2 at 144, i = 3 at 257.
            let long_shape = if seq == 144 { 2 } else { 3 };
            if seq > 128 && i != long_shape {
                continue;
            }
            let mut c = Case::rounded::<H>(&mut rng, batch, seq, d, heads, mask);
            if seq > 128 {
                let last = c.mask.len() - seq;
                c.mask[last..].fill(PAD);
            }
            assert!(attention_mma_forward_applies(<H as ActivationScalar>::DTYPE, seq, c.hidden, heads), "{}", c.label());
            let drop = mma_case_dropout(i + seq, batch, d);
            let label = format!("{} {} {} mma dropout {:?}", H::NAME, gpu.describe(), c.label(), drop.as_ref().map(|d| (d.p, d.streams.clone())));
            let factors = drop.as_ref().map(|d| prob_dropout(d, c.batch, c.seq, c.heads));
            let (got, (mma, gemm)) = run_mma_half::<H>(gpu, &c, drop.as_ref());
            assert_eq!((mma, gemm), (1, 0), "{label}: launches of the tensor-core forward and of the GEMM path's kernels");
            let (ref_ctx, ref_lse) = c.reference(factors.as_deref());
            let (plain_ctx, _) = c.plain::<H>(factors.as_deref());
            let (e, p) = assert_within_twice_plain_in::<H>(&format!("{label}: ctx"), &got.ctx, &ref_ctx, &plain_ctx);
            assert_f32_close(&format!("{label}: lse"), &got.lse, &ref_lse, c.batch);
            let gemm_path = run_gemm_half::<H>(gpu, &c, drop.as_ref());
            assert_f32_close(&format!("{label}: lse against the GEMM forward's"), &got.lse, &gemm_path.lse, c.batch);
            differing += got.ctx.iter().zip(&gemm_path.ctx).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            elements += got.ctx.len();
            cases += 1;
            if ratio((e, p)) > worst.0 {
                worst = (ratio((e, p)), c.label());
            }
        }
    }
    report_line(&format!(
        "{} tensor-core attention forward on {}: {cases} cases pass; worst err / plain err = {:.3} at {}; ctx differs from the GEMM forward's in {differing} of {elements} elements",
        H::NAME,
        gpu.describe(),
        worst.0,
        worst.1
    ));
}
test_both!(mma_forward_rule, mma_forward_matches_the_rule);

/// Q = 0 and V in small integers (the section's docs): ctx and lse equal the GEMM forward's bit for
/// bit, eval and dropout (with a shard offset too), padded masks, and a batch row masked with
/// -inf on every key (NaN ctx and lse in both).
fn mma_forward_is_exact_where_its_roundings_are<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x3a_e8ac);
    // 160: two key tiles (the `_long_` kernel: the max and sum over tiles, then P·V over them;
    // one head, to keep the executor's time down).
    for (k, (seq, d)) in [(7, 32), (16, 64), (70, 64), (128, 64), (33, 16), (160, 64)].into_iter().enumerate() {
        let (batch, heads) = (4, if seq > 128 { 1 } else { 2 });
        let mut c = Case::rounded::<H>(&mut rng, batch, seq, d, heads, MaskKind::Padded);
        let hidden = c.hidden;
        for (idx, x) in c.qkv.iter_mut().enumerate() {
            match (idx % (3 * hidden)) / hidden {
                0 => *x = 0.0,
                2 => *x = rng.random_range(-8i32..=8) as f32,
                _ => {}
            }
        }
        c.mask[3 * seq..4 * seq].fill(f32::NEG_INFINITY);
        for i in 0..4 {
            // The fourth: a data-parallel shard's offset, not a multiple of 4 (rows start mid
            // Philox block), against the GEMM forward's handling of it.
            let drop = match i {
                3 => Some(DeviceDropout { seed_buffer: None, seed: 0x3a47, p: 0.3, streams: vec![(5u64 << 8) | 2, (5u64 << 8) | 3], offset: 4 * 128 * 128 + 30 }),
                _ => mma_case_dropout(i + k, batch, d),
            };
            let label = format!("{} {} {} exact mma dropout {:?}", H::NAME, gpu.describe(), c.label(), drop.as_ref().map(|d| (d.p, d.streams.clone())));
            let (got, counts) = run_mma_half::<H>(gpu, &c, drop.as_ref());
            assert_eq!(counts, (1, 0), "{label}: launches");
            let want = run_gemm_half::<H>(gpu, &c, drop.as_ref());
            for (name, g, w, per) in [("ctx", &got.ctx, &want.ctx, seq * hidden), ("lse", &got.lse, &want.lse, heads * seq)] {
                for (j, (a, b)) in g.iter().zip(w.iter()).enumerate() {
                    let dead = j / per == 3;
                    assert_eq!(dead, a.is_nan(), "{label}: {name}[{j}] = {a} (batch row 3 is masked on every key)");
                    assert!(dead && b.is_nan() || a.to_bits() == b.to_bits(), "{label}: {name}[{j}] = {a}, the GEMM forward's {b}");
                }
            }
        }
    }
}
test_both!(mma_forward_exact, mma_forward_is_exact_where_its_roundings_are);

/// Where the tensor-core kernel does not apply it runs the GEMM forward: the same bits, no
/// tensor-core launch. d = 40 (not 16, 32 or 64), T = 130 at d = 32 (past one key tile, only d = 64
/// has the `_long_` kernels), and a qkv view one element into its buffer (not 16-byte aligned);
/// f32 activations.
fn mma_forward_falls_back_to_the_gemm_forward<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x3a_fa11);
    for (seq, d) in [(9, 40), (130, 32)] {
        let c = Case::rounded::<H>(&mut rng, 2, seq, d, 2, MaskKind::Padded);
        assert!(!attention_mma_forward_applies(<H as ActivationScalar>::DTYPE, seq, c.hidden, 2), "{}", c.label());
        let (got, counts) = run_mma_half::<H>(gpu, &c, None);
        assert_eq!(counts.0, 0, "{}: no tensor-core launch", c.label());
        assert!(counts.1 > 0, "{}: the GEMM forward ran", c.label());
        let want = run_gemm_half::<H>(gpu, &c, None);
        assert_eq!(bits(&got.ctx), bits(&want.ctx), "{}: ctx", c.label());
        assert_eq!(bits(&got.lse), bits(&want.lse), "{}: lse", c.label());
    }
    // Misaligned: qkv starts one element into its buffer.
    let c = Case::rounded::<H>(&mut rng, 2, 9, 32, 2, MaskKind::Padded);
    let (b, t, h, n) = (c.batch, c.seq, c.hidden, c.heads);
    let mut shifted = vec![H::from_f32(0.0)];
    shifted.extend(to_half::<H>(&c.qkv));
    let (qkv, mask) = (up(gpu, &shifted), up(gpu, &c.mask));
    let qkv_view = qkv.slice(1..shifted.len()).unwrap();
    let mut ctx = up(gpu, &to_half::<H>(&vec![f32::NAN; b * t * h]));
    let mut lse = up(gpu, &vec![f32::NAN; b * n * t]);
    let before = gpu.launch_counts();
    attention_mma_forward(gpu, &qkv_view, &mask.view(), &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n, None).unwrap();
    assert_eq!(gpu.launch_counts().since(&before).with_prefix("attention_mma_forward"), 0, "a misaligned qkv takes the GEMM forward");
    let want = run_gemm_half::<H>(gpu, &c, None);
    assert_eq!(bits(&widen_from::<H>(&gpu.download(&ctx.view()).unwrap())), bits(&want.ctx), "misaligned qkv: ctx");
    assert_eq!(bits(&gpu.download(&lse.view()).unwrap()), bits(&want.lse), "misaligned qkv: lse");
    // f32 activations: the GEMM forward's f32 kernels.
    let (qkv, mut ctx, mut lse) = (up(gpu, &c.qkv), up(gpu, &vec![f32::NAN; b * t * h]), up(gpu, &vec![f32::NAN; b * n * t]));
    let before = gpu.launch_counts();
    attention_mma_forward(gpu, &qkv.view(), &mask.view(), &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n, None).unwrap();
    let launched = gpu.launch_counts().since(&before);
    assert_eq!((launched.with_prefix("attention_mma_forward"), launched.of("attention_gemm_softmax_f32_t128")), (0, 1), "f32 takes the GEMM forward");
}
test_both!(mma_forward_fallback, mma_forward_falls_back_to_the_gemm_forward);

// The backward on the tensor cores (`attention_mma_backward`): one kernel for the scores (in place
// of the GEMM backward's S and dP products and its row kernel) and one for the gradient products
// (in place of its layouts and three products), so two launches in all. Checked as the forward:
// dQ, dK, dV under the 2x-plain rule from the tensor-core forward's lse; bit for bit with the GEMM
// backward where every rounding is exact (Q = 0, so p is one value a row computed by the same
// expf of the same operands; V zero but for one key per (batch row, head), so D has one nonzero
// term; small-integer K, V and dO, so dP is exact and so are the products: dS takes two values a
// row and P∘M one, times small integers, sums within f32's 24 bits in any order; d 16 and 64,
// whose scale 1/√d is a power of two); and the fallbacks. Each call must launch one kernel of
// each and nothing of the GEMM path.

use bert_adapters::cuda::attention_gemm::attention_mma_backward;

/// What a backward launched: tensor-core scores kernels, tensor-core gradient kernels, GEMM-path
/// kernels (row and layout kernels), GEMMs.
type BwdLaunches = (u64, u64, u64, u64);
/// The tensor-core backward alone: one scores kernel, one gradient kernel, nothing else.
const MMA_BWD: BwdLaunches = (1, 1, 0, 0);

/// The tensor-core backward on `H` from `lse` into a NaN-poisoned dqkv (widened), and what it
/// launched.
fn run_mma_bwd_half<H: Io>(gpu: &Gpu, case: &BwdCase, lse: &[f32], dropout: Option<&DeviceDropout<'_>>) -> (Vec<f32>, BwdLaunches) {
    let c = &case.fwd;
    let (b, t, h, n) = (c.batch, c.seq, c.hidden, c.heads);
    let (qkv, dctx, lse, mask) = (up(gpu, &to_half::<H>(&c.qkv)), up(gpu, &to_half::<H>(&case.dctx)), up(gpu, lse), up(gpu, &c.mask));
    let mut dqkv = up(gpu, &to_half::<H>(&vec![f32::NAN; c.qkv.len()]));
    let before = gpu.launch_counts();
    attention_mma_backward(gpu, &dctx.view(), &qkv.view(), &lse.view(), &mask.view(), &mut dqkv.view_mut(), b, t, h, n, dropout).unwrap_or_else(|e| panic!("{}: mma {} backward: {e}", case.label(), H::NAME));
    let launched = gpu.launch_counts().since(&before);
    let counts = (launched.with_prefix("attention_mma_backward_scores"), launched.with_prefix("attention_mma_backward_grads"), launched.with_prefix("attention_gemm"), launched.gemm_calls);
    (widen_from::<H>(&gpu.download(&dqkv.view()).unwrap()), counts)
}

/// T 1..=128, d 16, 32 and 64, padded, zero and shared masks, eval and dropout: the tensor-core
/// forward then the tensor-core backward, dQ, dK and dV under the 2x-plain rule. Past one key tile
/// (T 144 and 257: the `_long_` kernels) at a d = 64 shape each, the last mask row -1e9 on every
/// key: the scores and the lse round to -1e9 (its f32 ulp is 64), so exp(s − lse) is 1 for every
/// key and only the scores kernel's extra pass for the exact normaliser (|lse| >= 64) makes p 1/T.
fn mma_backward_matches_the_rule<H: Io>(gpu: &Gpu) {
    const SHAPES: [(usize, usize, usize, MaskKind); 4] = [(2, 32, 2, MaskKind::Padded), (3, 64, 1, MaskKind::Shared(1)), (2, 16, 3, MaskKind::Padded), (1, 64, 2, MaskKind::Zeros)];
    let mut rng = StdRng::seed_from_u64(0x3a_b4c4);
    let (mut worst, mut cases) = ((0f64, String::new()), 0);
    const LONG_SHAPES: [(usize, usize, usize, MaskKind); 2] = [(2, 64, 2, MaskKind::Padded), (4, 64, 1, MaskKind::Shared(2))];
    for seq in [1, 7, 33, 64, 128, 144, 257] {
        // Past 128 one shape a length (the executor's time).
        let shapes: &[_] = match seq {
            144 => &LONG_SHAPES[..1],
            257 => &LONG_SHAPES[1..],
            _ => &SHAPES,
        };
        for (i, &(batch, d, heads, mask)) in shapes.iter().enumerate() {
            let mut case = BwdCase::random::<H>(&mut rng, batch, seq, d, heads, mask);
            if seq > 128 {
                let last = case.fwd.mask.len() - seq;
                // f16's plain twin cannot hold -1e9 (past 65504): PAD there (|lse| >= 64 still
                // runs the pass, whose effect is then within f16's precision).
                case.fwd.mask[last..].fill(if H::NAME == "f16" { PAD } else { -1e9 });
            }
            let c = &case.fwd;
            let drop = mma_case_dropout(i + seq, batch, d);
            let label = format!("{} {} {} mma backward dropout {:?}", H::NAME, gpu.describe(), case.label(), drop.as_ref().map(|d| (d.p, d.streams.clone())));
            let factors = drop.as_ref().map(|d| prob_dropout(d, c.batch, c.seq, c.heads));
            let (fwd, _) = run_mma_half::<H>(gpu, c, drop.as_ref());
            let (got, counts) = run_mma_bwd_half::<H>(gpu, &case, &fwd.lse, drop.as_ref());
            assert_eq!(counts, MMA_BWD, "{label}: launches (tensor-core scores, tensor-core products, GEMM-path kernels, GEMMs)");
            let (want, plain) = (case.reference(factors.as_deref()), case.plain::<H>(factors.as_deref()));
            for (k, name) in ["dQ", "dK", "dV"].into_iter().enumerate() {
                let e = assert_within_twice_plain_in::<H>(&format!("{label}: {name}"), &part(&got, c.hidden, k), &part(&want, c.hidden, k), &part(&plain, c.hidden, k));
                if ratio(e) > worst.0 {
                    worst = (ratio(e), format!("{} {name}", case.label()));
                }
            }
            cases += 1;
        }
    }
    report_line(&format!("{} tensor-core attention backward on {}: {cases} cases pass; worst err / plain err = {:.3} at {}", H::NAME, gpu.describe(), worst.0, worst.1));
}
test_both!(mma_backward_rule, mma_backward_matches_the_rule);

/// Where the roundings are exact (the section's docs): dqkv equal to the GEMM backward's bit for
/// bit from the same lse, eval and dropout (a shard offset too), padded masks, T odd and even, and
/// a batch row masked on every key (NaN in both).
fn mma_backward_is_exact_where_its_roundings_are<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x3a_b4e8);
    // 131: two key tiles, the last of 3 keys, T odd (the `_long_` kernels: D over tiles, then the
    // outputs, scalar stores; query tiles for dK and dV; one head, to keep the executor's time
    // down; the rule test has three tiles).
    for (k, (seq, d)) in [(7, 64), (33, 16), (128, 64), (131, 64)].into_iter().enumerate() {
        let (batch, heads) = (4, if seq > 128 { 1 } else { 2 });
        let mut case = BwdCase::random::<H>(&mut rng, batch, seq, d, heads, MaskKind::Padded);
        let hidden = case.fwd.hidden;
        for (idx, x) in case.fwd.qkv.iter_mut().enumerate() {
            let (token, col) = (idx / (3 * hidden), idx % (3 * hidden));
            let (b, j, part, head) = (token / seq, token % seq, col / hidden, (col % hidden) / d);
            *x = match part {
                0 => 0.0,
                1 => rng.random_range(-4i32..=4) as f32,
                _ if j == (3 * b + 5 * head) % seq => rng.random_range(-4i32..=4) as f32,
                _ => 0.0,
            };
        }
        case.dctx.iter_mut().for_each(|x| *x = rng.random_range(-4i32..=4) as f32);
        case.fwd.mask[3 * seq..4 * seq].fill(f32::NEG_INFINITY);
        for i in 0..4 {
            let drop = match i {
                3 => Some(DeviceDropout { seed_buffer: None, seed: 0x3a48, p: 0.3, streams: vec![(5u64 << 8) | 2, (5u64 << 8) | 3], offset: 4 * 128 * 128 + 30 }),
                _ => mma_case_dropout(i + k, batch, d),
            };
            let label = format!("{} {} {} exact mma backward dropout {:?}", H::NAME, gpu.describe(), case.label(), drop.as_ref().map(|d| (d.p, d.streams.clone())));
            let lse = run_gemm_half::<H>(gpu, &case.fwd, drop.as_ref()).lse;
            let (got, counts) = run_mma_bwd_half::<H>(gpu, &case, &lse, drop.as_ref());
            assert_eq!(counts, MMA_BWD, "{label}: launches");
            let want = run_gemm_bwd_half::<H>(gpu, &case, &lse, drop.as_ref());
            let per = seq * 3 * hidden;
            for (j, (a, b)) in got.iter().zip(&want).enumerate() {
                let dead = j / per == 3;
                assert_eq!(dead, a.is_nan(), "{label}: dqkv[{j}] = {a} (batch row 3 is masked on every key)");
                assert!(dead && b.is_nan() || a.to_bits() == b.to_bits(), "{label}: dqkv[{j}] = {a}, the GEMM backward's {b}");
            }
            assert!(got.iter().any(|v| v.is_finite() && *v != 0.0), "{label}: some gradient is nonzero");
        }
    }
}
test_both!(mma_backward_exact, mma_backward_is_exact_where_its_roundings_are);

/// Where it does not apply (d = 40, T = 130 at d = 32, a dctx view one element in: not 4-byte
/// aligned) the tensor-core backward is the GEMM backward: the same bits, the row kernel launched.
fn mma_backward_falls_back_to_the_gemm_backward<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x3a_bfa1);
    for (seq, d) in [(9, 40), (130, 32)] {
        let case = BwdCase::random::<H>(&mut rng, 2, seq, d, 2, MaskKind::Padded);
        let lse = run_gemm_half::<H>(gpu, &case.fwd, None).lse;
        let (got, counts) = run_mma_bwd_half::<H>(gpu, &case, &lse, None);
        assert_eq!((counts.0, counts.1, counts.3), (0, 0, 5), "{}: the GEMM backward (5 products), no tensor-core launch", case.label());
        assert_eq!(bits(&got), bits(&run_gemm_bwd_half::<H>(gpu, &case, &lse, None)), "{}: dqkv", case.label());
    }
    let case = BwdCase::random::<H>(&mut rng, 2, 9, 32, 2, MaskKind::Padded);
    let c = &case.fwd;
    let lse = run_gemm_half::<H>(gpu, c, None).lse;
    let mut shifted = vec![H::from_f32(0.0)];
    shifted.extend(to_half::<H>(&case.dctx));
    let (qkv, dctx, l, mask) = (up(gpu, &to_half::<H>(&c.qkv)), up(gpu, &shifted), up(gpu, &lse), up(gpu, &c.mask));
    let mut dqkv = up(gpu, &to_half::<H>(&vec![f32::NAN; c.qkv.len()]));
    let before = gpu.launch_counts();
    attention_mma_backward(gpu, &dctx.slice(1..shifted.len()).unwrap(), &qkv.view(), &l.view(), &mask.view(), &mut dqkv.view_mut(), c.batch, c.seq, c.hidden, c.heads, None).unwrap();
    assert_eq!(gpu.launch_counts().since(&before).with_prefix("attention_mma_backward"), 0, "a misaligned dctx takes the GEMM backward");
    assert_eq!(bits(&widen_from::<H>(&gpu.download(&dqkv.view()).unwrap())), bits(&run_gemm_bwd_half::<H>(gpu, &case, &lse, None)), "misaligned dctx: dqkv");
}
test_both!(mma_backward_fallback, mma_backward_falls_back_to_the_gemm_backward);
