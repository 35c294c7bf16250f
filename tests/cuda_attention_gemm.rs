//! The GEMM attention path (`cuda::attention_gemm`: batched GEMMs plus the row and layout
//! kernels of `kernels/attention.cu`'s "GEMM path" section), f32 storage, against the f64 CPU
//! reference (`cpu::reference::attention`, `attention_lse`, `attention_backward`, the spec) and
//! against the fused kernels (`cuda::attention`), forward and backward, eval and dropout.
//! The bf16 and f16 storage is tested in tests/cuda_bf16_attention.rs (its "GEMM path" section).
//!
//! Tolerances (per batch row; per gradient dQ, dK, dV in the backward): ctx and lse within
//! 1e-5·(1 + max|ref|), the gradients within 1e-4·(1 + max|ref|) — the fused kernels' bounds
//! (tests/cuda_attention.rs and cuda_attention_backward.rs derive them); the GEMM path's own
//! error is of the same size (f32 dot products of d terms, sums of <= T bounded terms). The
//! same bounds hold between the two paths, measured against the reference's scale.
//!
//! Dropout: the two paths must drop the same probabilities. The dropout cases make every
//! probability of a row count (Q and K scaled down so each p_ij ≈ 1/T, V of size 1): one
//! differing mask element then moves a ctx element by about |v|/(T·(1 − rate)) ≥ 1e-3, a
//! hundred times the tolerance. With several dropout blocks and a shard offset.

use bert_adapters::cpu::reference;
use bert_adapters::cuda::attention::{attention_packed_backward, attention_packed_backward_dropout, attention_packed_forward, attention_packed_forward_dropout};
use bert_adapters::cuda::attention_gemm::{attention_gemm_backward, attention_gemm_forward};
use bert_adapters::cuda::elementwise::DeviceDropout;
use bert_adapters::cuda::gpu::{DeviceBuffer, Gpu};
use bert_adapters::cuda::probe::report_line;
use bert_adapters::{test_device, Error};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "support/attention_case.rs"]
mod attention_case;

use attention_case::{AttentionInputs, MaskKind, PAD};

fn up(gpu: &Gpu, v: &[f32]) -> DeviceBuffer<f32> {
    gpu.upload(v).unwrap_or_else(|e| panic!("upload: {e}"))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    Fused,
    Gemm,
}

/// ctx, lse and dqkv of one path (the backward from that path's own forward outputs).
struct Outputs {
    ctx: Vec<f32>,
    lse: Vec<f32>,
    dqkv: Vec<f32>,
}

fn run(gpu: &Gpu, path: Path, c: &AttentionInputs, dctx: &[f32], dropout: Option<&DeviceDropout<'_>>) -> Result<Outputs, Error> {
    let (b, t, h, n) = (c.batch, c.seq, c.hidden, c.heads);
    let (qkv, mask, g) = (up(gpu, &c.qkv), up(gpu, &c.mask), up(gpu, dctx));
    let mut ctx = up(gpu, &vec![f32::NAN; b * t * h]);
    let mut lse = up(gpu, &vec![f32::NAN; b * n * t]);
    let mut dqkv = up(gpu, &vec![f32::NAN; c.qkv.len()]);
    match (path, dropout) {
        (Path::Gemm, d) => {
            attention_gemm_forward(gpu, &qkv.view(), &mask.view(), &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n, d)?;
            attention_gemm_backward(gpu, &g.view(), &qkv.view(), &lse.view(), &mask.view(), &mut dqkv.view_mut(), b, t, h, n, d)?;
        }
        (Path::Fused, None) => {
            attention_packed_forward(gpu, &qkv.view(), &mask.view(), &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n)?;
            attention_packed_backward(gpu, &g.view(), &qkv.view(), &ctx.view(), &lse.view(), &mask.view(), &mut dqkv.view_mut(), b, t, h, n)?;
        }
        (Path::Fused, Some(d)) => {
            attention_packed_forward_dropout(gpu, &qkv.view(), &mask.view(), &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n, d)?;
            attention_packed_backward_dropout(gpu, &g.view(), &qkv.view(), &ctx.view(), &lse.view(), &mask.view(), &mut dqkv.view_mut(), b, t, h, n, Some(d))?;
        }
    }
    Ok(Outputs { ctx: gpu.download(&ctx.view())?, lse: gpu.download(&lse.view())?, dqkv: gpu.download(&dqkv.view())? })
}

/// |got − want| <= tol·(1 + max|scale_ref|) per chunk of `per` elements (a batch row, or a
/// gradient's block of one). NaN in `nan_ref` must be NaN in `got` (and is skipped). Returns the
/// fraction of the bound used.
fn assert_close(label: &str, got: &[f32], want: &[f32], scale_ref: &[f32], idx: &[usize], tol: f64) -> f64 {
    let scale = idx.iter().map(|&i| scale_ref[i]).filter(|v| !v.is_nan()).fold(0f64, |m, v| m.max(v.abs() as f64));
    let bound = tol * (1.0 + scale);
    let mut used = 0f64;
    for &i in idx {
        let (g, w) = (got[i], want[i]);
        if scale_ref[i].is_nan() {
            assert!(g.is_nan(), "{label}[{i}] = {g}, the reference is NaN");
            continue;
        }
        let err = (g as f64 - w as f64).abs();
        assert!(g.is_finite() && err <= bound, "{label}[{i}] = {g}, expected {w}: |err| {err:e} > {bound:e}");
        used = used.max(err / bound);
    }
    used
}

/// The indices of batch row `b` in a `[B, rows, cols]` tensor.
fn row_block(b: usize, per: usize) -> Vec<usize> {
    (b * per..(b + 1) * per).collect()
}

/// The indices of gradient `part` (dQ, dK, dV) of batch row `b` in dqkv `[B, T, 3H]`.
fn grad_block(b: usize, part: usize, seq: usize, hidden: usize) -> Vec<usize> {
    (0..seq).flat_map(|t| (0..hidden).map(move |c| (b * seq + t) * 3 * hidden + part * hidden + c)).collect()
}

/// Compares `got` with `want` (the reference, or the other path), scaled by the reference;
/// returns the worst fractions used (forward, backward).
fn compare(label: &str, got: &Outputs, want: &Outputs, reference: &Outputs, c: &AttentionInputs) -> (f64, f64) {
    let (b, t, h, n) = (c.batch, c.seq, c.hidden, c.heads);
    let (mut fwd, mut bwd) = (0f64, 0f64);
    for row in 0..b {
        fwd = fwd.max(assert_close(&format!("{label} ctx (batch row {row})"), &got.ctx, &want.ctx, &reference.ctx, &row_block(row, t * h), 1e-5));
        fwd = fwd.max(assert_close(&format!("{label} lse (batch row {row})"), &got.lse, &want.lse, &reference.lse, &row_block(row, n * t), 1e-5));
        for (part, name) in ["dQ", "dK", "dV"].iter().enumerate() {
            bwd = bwd.max(assert_close(&format!("{label} {name} (batch row {row})"), &got.dqkv, &want.dqkv, &reference.dqkv, &grad_block(row, part, t, h), 1e-4));
        }
    }
    (fwd, bwd)
}

/// The f64 reference's ctx, lse and dqkv (packed [B, T, 3H]), each rounded to f32 once.
fn reference_outputs(c: &AttentionInputs, dctx: &[f32]) -> Outputs {
    let [q, k, v] = c.split();
    let (b, t, h, n) = (c.batch, c.seq, c.hidden, c.heads);
    let ctx = reference::attention(&q, &k, &v, &c.mask, b, t, h, n, None);
    let lse = reference::attention_lse(&q, &k, &c.mask, b, t, h, n);
    let (dq, dk, dv) = reference::attention_backward(dctx, &q, &k, &v, &c.mask, b, t, h, n, None);
    let mut dqkv = Vec::with_capacity(3 * dq.len());
    for ((x, y), z) in dq.chunks(h).zip(dk.chunks(h)).zip(dv.chunks(h)) {
        dqkv.extend_from_slice(x);
        dqkv.extend_from_slice(y);
        dqkv.extend_from_slice(z);
    }
    Outputs { ctx, lse, dqkv }
}

fn random_dctx(rng: &mut StdRng, c: &AttentionInputs) -> Vec<f32> {
    (0..c.batch * c.seq * c.hidden).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

/// Sequence lengths: one key, a few, past one 32-key tile, past two (not a multiple of 4).
const SEQS: [usize; 4] = [1, 7, 33, 70];

/// (batch, head dim, heads, mask): d 16, 24, 32, 64 (and 8), heads 1..=12, padded masks, masks
/// shared by replicated branches; d 6 (not a whole number of the layout kernels' 16-byte units,
/// so they go element by element) and 12 (whole units in f32, not in bf16).
const SHAPES: [(usize, usize, usize, MaskKind); 9] = [
    (2, 6, 3, MaskKind::Padded),
    (2, 12, 2, MaskKind::Zeros),
    (1, 16, 1, MaskKind::Zeros),
    (3, 8, 3, MaskKind::Padded),
    (2, 24, 2, MaskKind::Padded),
    (3, 32, 3, MaskKind::Shared(1)),
    (3, 64, 1, MaskKind::Padded),
    (2, 16, 12, MaskKind::Padded),
    (4, 24, 5, MaskKind::Shared(2)),
];

fn gemm_path_matches_reference_and_fused(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x6e44_a77e);
    let mut cases: Vec<AttentionInputs> = Vec::new();
    for seq in SEQS {
        for (batch, d, heads, mask) in SHAPES {
            cases.push(AttentionInputs::random(&mut rng, batch, seq, d, heads, mask));
        }
    }
    cases.push(AttentionInputs::random(&mut rng, 1, 128, 64, 2, MaskKind::Zeros));
    cases.push(AttentionInputs::random(&mut rng, 2, 128, 16, 3, MaskKind::Padded));
    // Past 128 keys: the row kernels with four groups of keys a lane (up to 128, the _t128 ones
    // with one), whole groups (160) and not (130).
    cases.push(AttentionInputs::random(&mut rng, 2, 130, 16, 3, MaskKind::Padded));
    cases.push(AttentionInputs::random(&mut rng, 3, 160, 24, 2, MaskKind::Shared(1)));
    let (mut worst_ref, mut worst_fused) = ((0f64, 0f64), (0f64, 0f64));
    for c in &cases {
        let dctx = random_dctx(&mut rng, c);
        let label = format!("{} {}", gpu.describe(), c.label());
        let gemm = run(gpu, Path::Gemm, c, &dctx, None).unwrap_or_else(|e| panic!("{label}: gemm: {e}"));
        let fused = run(gpu, Path::Fused, c, &dctx, None).unwrap_or_else(|e| panic!("{label}: fused: {e}"));
        let reference = reference_outputs(c, &dctx);
        let r = compare(&format!("{label} gemm vs reference"), &gemm, &reference, &reference, c);
        let f = compare(&format!("{label} gemm vs fused"), &gemm, &fused, &reference, c);
        worst_ref = (worst_ref.0.max(r.0), worst_ref.1.max(r.1));
        worst_fused = (worst_fused.0.max(f.0), worst_fused.1.max(f.1));
    }
    report_line(&format!(
        "{}: GEMM attention, {} cases: vs reference {:.3} (forward) {:.3} (backward) of the bound, vs fused {:.3} / {:.3}",
        gpu.describe(),
        cases.len(),
        worst_ref.0,
        worst_ref.1,
        worst_fused.0,
        worst_fused.1
    ));
}
test_device!(awkward_shapes, gemm_path_matches_reference_and_fused);

/// Masked rows as tests/cuda_attention_backward.rs defines them: -10000 and finfo.min on every
/// key (finite: uniform weights; the backward's exact normalisation for |lse| >= 64), -inf on
/// every key (NaN for ctx, lse and the whole batch row's gradient, as the reference and the
/// fused path), -inf on all keys but the last, and a control row. Q, K multiples of 1/8 with
/// d = 16, so the scores are exact (see that file for why that matters at -10000).
fn masked_rows_follow_the_reference(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xdead_6e44);
    for seq in [7, 33] {
        let (batch, heads, d) = (5, 2, 16);
        let hidden = heads * d;
        let qkv: Vec<f32> = (0..batch * seq * 3 * hidden).map(|_| rng.random_range(-16i32..=16) as f32 / 8.0).collect();
        let mut mask = vec![0f32; batch * seq];
        mask[..seq].fill(PAD);
        mask[seq..2 * seq].fill(f32::MIN);
        mask[2 * seq..3 * seq].fill(f32::NEG_INFINITY);
        mask[3 * seq..4 * seq - 1].fill(f32::NEG_INFINITY);
        let c = AttentionInputs { qkv, mask, batch, seq, hidden, heads };
        let dctx = random_dctx(&mut rng, &c);
        let label = format!("{} masked rows T={seq}", gpu.describe());
        let gemm = run(gpu, Path::Gemm, &c, &dctx, None).unwrap_or_else(|e| panic!("{label}: {e}"));
        let fused = run(gpu, Path::Fused, &c, &dctx, None).unwrap_or_else(|e| panic!("{label}: {e}"));
        let reference = reference_outputs(&c, &dctx);
        assert!(reference.dqkv[2 * seq * 3 * hidden..3 * seq * 3 * hidden].iter().all(|v| v.is_nan()), "the reference's -inf row is NaN");
        compare(&format!("{label} gemm vs reference"), &gemm, &reference, &reference, &c);
        compare(&format!("{label} gemm vs fused"), &gemm, &fused, &reference, &c);
    }
}
test_device!(masked_rows, masked_rows_follow_the_reference);

/// Inputs where every probability matters (see the module docs): Q, K scaled by 1/32, V ±1.
fn flat_case(rng: &mut StdRng, batch: usize, seq: usize, d: usize, heads: usize) -> AttentionInputs {
    let mut c = AttentionInputs::random(rng, batch, seq, d, heads, MaskKind::Zeros);
    let h = c.hidden;
    for row in c.qkv.chunks_mut(3 * h) {
        row[..2 * h].iter_mut().for_each(|x| *x /= 32.0);
        row[2 * h..].iter_mut().for_each(|x| *x = x.signum());
    }
    c
}

/// Dropout with p 0.1 and 0.5, one and two dropout blocks (Parallel branches), shard offsets 0
/// and a data-parallel shard's (first row 3 of a larger batch) and ones that start mid Philox
/// block: the GEMM path's ctx, lse and dqkv equal the fused path's within the f32 tolerances,
/// which one differing mask element exceeds a hundredfold. The row kernels draw four keys' factors
/// from one Philox block when T and the offset are multiples of 4 (T = 20), else from the two
/// blocks they span (T = 12 with a +2 offset: whole 16-byte groups, every row mid block; odd T:
/// the shift changes from row to row).
fn dropout_masks_are_the_fused_paths(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xd40b_6e44);
    let mut worst = (0f64, 0f64);
    let cases = [
        (0.1f32, 33, 16, 2, vec![7u64], 0usize, 0usize),
        (0.5, 20, 24, 3, vec![0x300, 0x301], 3, 0),
        (0.5, 7, 8, 1, vec![5], 1, 0),
        (0.1, 70, 32, 2, vec![9], 2, 5),
        (0.5, 12, 16, 2, vec![11], 1, 2),
    ];
    for (p, seq, d, heads, streams, first_row, mid_block) in cases {
        let batch = 2 * streams.len();
        let c = flat_case(&mut rng, batch, seq, d, heads);
        let dctx = random_dctx(&mut rng, &c);
        // A shard whose first global row is `first_row` draws elements from first_row·heads·T² on;
        // `mid_block` more starts it mid Philox block of 4.
        let offset = (first_row * heads * seq * seq + mid_block) as u64;
        let drop = DeviceDropout { seed_buffer: None, seed: 0x6e44 + seq as u64, p, streams: streams.clone(), offset };
        let label = format!("{} p={p} blocks={} offset={offset} {}", gpu.describe(), streams.len(), c.label());
        let gemm = run(gpu, Path::Gemm, &c, &dctx, Some(&drop)).unwrap_or_else(|e| panic!("{label}: gemm: {e}"));
        let fused = run(gpu, Path::Fused, &c, &dctx, Some(&drop)).unwrap_or_else(|e| panic!("{label}: fused: {e}"));
        let undropped = run(gpu, Path::Gemm, &c, &dctx, None).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert!(gemm.ctx.iter().zip(&undropped.ctx).any(|(a, b)| (a - b).abs() > 1e-2), "{label}: dropout changed nothing");
        let r = compare(&format!("{label} gemm vs fused"), &gemm, &fused, &fused, &c);
        worst = (worst.0.max(r.0), worst.1.max(r.1));
        // A different offset must give different masks (the offset is honoured at all).
        let other = DeviceDropout { offset: offset + 1, ..drop.clone() };
        let moved = run(gpu, Path::Gemm, &c, &dctx, Some(&other)).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert!(moved.ctx.iter().zip(&gemm.ctx).any(|(a, b)| (a - b).abs() > 1e-3), "{label}: offset + 1 gives the same ctx");
    }
    report_line(&format!("{}: GEMM attention dropout vs fused: {:.3} (forward) {:.3} (backward) of the bound", gpu.describe(), worst.0, worst.1));
}
test_device!(dropout_masks, dropout_masks_are_the_fused_paths);

/// Wrong lengths are shape errors naming the operand; T above 512 is refused; empty batches are
/// no-ops; outputs may not alias inputs.
fn sizes_are_checked(gpu: &Gpu) {
    let (b, t, h, n) = (2, 5, 8, 2);
    let qkv = up(gpu, &vec![0.5; b * t * 3 * h]);
    let mask = up(gpu, &vec![0.0; b * t]);
    let mut ctx = up(gpu, &vec![f32::NAN; b * t * h]);
    let mut lse = up(gpu, &vec![f32::NAN; b * n * t]);
    let e = attention_gemm_forward(gpu, &qkv.slice(0..b * t * 3 * h - 1).unwrap(), &mask.view(), &mut ctx.view_mut(), &mut lse.view_mut(), b, t, h, n, None).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }) && e.to_string().contains("qkv has 239 elements"), "{e}");
    let e = attention_gemm_forward(gpu, &qkv.view(), &mask.view(), &mut ctx.view_mut(), &mut lse.slice_mut(0..3).unwrap(), b, t, h, n, None).unwrap_err();
    assert!(e.to_string().contains("lse has 3 elements"), "{e}");
    let dctx = up(gpu, &vec![1.0; b * t * h]);
    let mut dqkv = up(gpu, &vec![f32::NAN; b * t * 3 * h]);
    let e = attention_gemm_backward(gpu, &dctx.slice(0..7).unwrap(), &qkv.view(), &lse.view(), &mask.view(), &mut dqkv.view_mut(), b, t, h, n, None).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }) && e.to_string().contains("dctx has 7 elements"), "{e}");
    let e = attention_gemm_backward(gpu, &dctx.view(), &qkv.view(), &lse.view(), &mask.view(), &mut dqkv.slice_mut(0..9).unwrap(), b, t, h, n, None).unwrap_err();
    assert!(e.to_string().contains("dqkv has 9 elements"), "{e}");
    assert!(gpu.download(&dqkv.view()).unwrap().iter().all(|v| v.is_nan()), "a refused launch wrote dqkv");
    assert!(gpu.download(&ctx.view()).unwrap().iter().all(|v| v.is_nan()), "a refused launch wrote ctx");
    let long = 513;
    let qkv_long = up(gpu, &vec![0.0; long * 3 * h]);
    let mask_long = up(gpu, &vec![0.0; long]);
    let mut ctx_long = up(gpu, &vec![0.0; long * h]);
    let mut lse_long = up(gpu, &vec![0.0; n * long]);
    let e = attention_gemm_forward(gpu, &qkv_long.view(), &mask_long.view(), &mut ctx_long.view_mut(), &mut lse_long.view_mut(), 1, long, h, n, None).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }) && e.to_string().contains("513"), "{e}");
    let empty = up(gpu, &[]);
    attention_gemm_forward(gpu, &empty.view(), &mask.slice(0..t).unwrap(), &mut up(gpu, &[]).view_mut(), &mut up(gpu, &[]).view_mut(), 0, t, h, n, None).unwrap();
    attention_gemm_backward(gpu, &empty.view(), &empty.view(), &empty.view(), &mask.slice(0..t).unwrap(), &mut up(gpu, &[]).view_mut(), 0, t, h, n, None).unwrap();
}
test_device!(sizes, sizes_are_checked);

/// The automatic choice: the fused kernels on cuda-sim, the GEMM path on a GPU for T <= 512
/// (unless BERT_ADAPTERS_ATTENTION_PATH overrides it, which this test then leaves alone); an
/// explicit path wins.
fn automatic_path_follows_the_device(gpu: &Gpu) {
    use bert_adapters::cuda::attention_gemm::{AttentionPath, ATTENTION_PATH_VAR};
    if std::env::var_os(ATTENTION_PATH_VAR).is_none() {
        let want = if gpu.kind() == bert_adapters::cuda::GpuKind::Sim { AttentionPath::Fused } else { AttentionPath::Gemm };
        assert_eq!(AttentionPath::auto(gpu, 128).unwrap(), want);
        assert_eq!(AttentionPath::auto(gpu, 513).unwrap(), AttentionPath::Fused);
    }
    let be = bert_adapters::cuda::backend::CudaBackend::open(bert_adapters::Device::CudaSim);
    if let Ok(be) = be {
        let be = be.with_attention_path(AttentionPath::Gemm);
        assert_eq!(be.attention_path(128).unwrap(), AttentionPath::Gemm);
        assert!(bert_adapters::Backend::name(&be).contains("GEMM attention"));
    }
}
test_device!(automatic_path, automatic_path_follows_the_device);

/// The layout kernels' two forms give the same bits: the GEMM path on aligned buffers (d 16: the
/// 16-byte-unit kernels) and on the same data one element past the start of each buffer (qkv,
/// dctx, ctx, dqkv: misaligned, so every layout goes element by element), forward and backward.
fn layout_units_and_elements_agree(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x1a_0ff5);
    for (batch, seq, d, heads) in [(2usize, 7usize, 16usize, 3usize), (1, 33, 32, 2)] {
        let c = AttentionInputs::random(&mut rng, batch, seq, d, heads, MaskKind::Padded);
        let (t, h) = (c.seq, c.hidden);
        let dctx: Vec<f32> = (0..batch * t * h).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let before = gpu.launch_counts();
        let aligned = run(gpu, Path::Gemm, &c, &dctx, None).unwrap();
        let mid = gpu.launch_counts();
        // 16-byte units: qkv and ctx forward; qkv, dctx and dqkv backward.
        assert_eq!((mid.since(&before).with_prefix("attention_gemm_to_heads_x16"), mid.since(&before).with_prefix("attention_gemm_from_heads_x16")), (3, 2), "aligned: the unit kernels");
        // One leading element more in each buffer; the views start past it.
        let padded = |v: &[f32]| up(gpu, &[&[0.0f32][..], v].concat());
        let (qkv, g, mask) = (padded(&c.qkv), padded(&dctx), up(gpu, &c.mask));
        let mut ctx = padded(&vec![f32::NAN; batch * t * h]);
        let mut lse = up(gpu, &vec![f32::NAN; batch * heads * t]);
        let mut dqkv = padded(&vec![f32::NAN; c.qkv.len()]);
        let n_ctx = batch * t * h;
        let n_qkv = c.qkv.len();
        attention_gemm_forward(gpu, &qkv.slice(1..1 + n_qkv).unwrap(), &mask.view(), &mut ctx.slice_mut(1..1 + n_ctx).unwrap(), &mut lse.view_mut(), batch, t, h, heads, None).unwrap();
        attention_gemm_backward(gpu, &g.slice(1..1 + n_ctx).unwrap(), &qkv.slice(1..1 + n_qkv).unwrap(), &lse.view(), &mask.view(), &mut dqkv.slice_mut(1..1 + n_qkv).unwrap(), batch, t, h, heads, None).unwrap();
        let after = gpu.launch_counts().since(&mid);
        assert_eq!((after.with_prefix("attention_gemm_to_heads_x16") + after.with_prefix("attention_gemm_from_heads_x16"), after.with_prefix("attention_gemm_to_heads_f32") + after.with_prefix("attention_gemm_from_heads_f32")), (0, 5), "misaligned: element by element");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let label = format!("{} batch {batch} seq {seq} d {d} heads {heads}", gpu.describe());
        assert_eq!(bits(&gpu.download(&ctx.view()).unwrap()[1..]), bits(&aligned.ctx), "{label}: ctx");
        assert_eq!(bits(&gpu.download(&lse.view()).unwrap()), bits(&aligned.lse), "{label}: lse");
        assert_eq!(bits(&gpu.download(&dqkv.view()).unwrap()[1..]), bits(&aligned.dqkv), "{label}: dqkv");
    }
}
test_device!(layout_forms, layout_units_and_elements_agree);
