//! Attention forward and backward, one (batch, head) per rayon task, gemm on strided views of the
//! `[B, T, H]` inputs (head `h` is columns `[h·d, (h+1)·d)`) and `T×T` scratch per task.
//! Forward: `P = softmax(Q·Kᵀ·scale + mask)`, dropout on `P`, `ctx = P·V`. Backward recomputes `P`,
//! then `dV = (P⊙keep)ᵀ·dctx`, `dP = (dctx·Vᵀ)⊙keep`, `dS = P⊙(dP − rowsum(dP⊙P))·scale`,
//! `dQ = dS·K`, `dK = dSᵀ·Q`. Numerics: f32 throughout, the softmax max-subtracted, `exp` the vectorised `math::exp`.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::cpu::fast::math::{self, simd_fn, LANES};
use crate::cpu::fast::matmul::{matmul, MatRef};
use crate::cpu::reference::ProbDropout;

/// `P = softmax(Q·Kᵀ·scale + bias)` of one (batch, head) block starting at element `base` of the
/// inputs (rows `ld` elements apart), into the `T×T` buffer `p`; each row's log-sum-exp of the
/// scaled, masked scores goes to `lse` when given.
#[allow(clippy::too_many_arguments)]
fn attention_probs(p: &mut [f32], q: &[f32], k: &[f32], bias: &[f32], base: usize, seq: usize, ld: usize, d: usize, scale: f32, lse: Option<&mut [f32]>) {
    scores(p, q, k, base, seq, ld, d);
    softmax_rows(p, bias, seq, scale, lse);
}

simd_fn! {
    /// Row softmax of `p` (`T×T`) after `s·scale + bias`, in place, with each row's
    /// log-sum-exp into `lse` when given.
    fn softmax_rows(p: &mut [f32], bias: &[f32], seq: usize, scale: f32, lse: Option<&mut [f32]>) {
        let mut lse = lse;
        for (i, row) in p.chunks_mut(seq).enumerate() {
            // Lane-wise maxima and sums over blocks of LANES, so the loops vectorise.
            let mut lane_max = [f32::NEG_INFINITY; LANES];
            let mut blocks = row.chunks_exact_mut(LANES);
            let mut at = 0;
            for block in &mut blocks {
                for l in 0..LANES {
                    block[l] = block[l] * scale + bias[at + l];
                    lane_max[l] = lane_max[l].max(block[l]);
                }
                at += LANES;
            }
            let mut max = lane_max.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            for (j, v) in blocks.into_remainder().iter_mut().enumerate() {
                *v = *v * scale + bias[at + j];
                max = max.max(*v);
            }
            let mut lanes = [0f32; LANES];
            let mut blocks = row.chunks_exact_mut(LANES);
            for block in &mut blocks {
                for l in 0..LANES {
                    block[l] = math::exp_with::<FMA>(block[l] - max);
                    lanes[l] += block[l];
                }
            }
            let mut sum: f32 = lanes.iter().sum();
            for v in blocks.into_remainder() {
                *v = math::exp_with::<FMA>(*v - max);
                sum += *v;
            }
            let inv = 1.0 / sum;
            for v in row.iter_mut() {
                *v *= inv;
            }
            if let Some(l) = lse.as_deref_mut() {
                l[i] = max + sum.ln();
            }
        }
    }
}

simd_fn! {
    /// `p ← exp(p·scale + bias − lse[row])`: probabilities from the saved log-sum-exp.
    fn exp_rows_from_lse(p: &mut [f32], bias: &[f32], lse: &[f32], seq: usize, scale: f32) {
        for (row, &l) in p.chunks_mut(seq).zip(lse) {
            for j in 0..seq {
                row[j] = math::exp_with::<FMA>(row[j] * scale + bias[j] - l);
            }
        }
    }
}

/// `S = Q·Kᵀ` of one (batch, head) block into the `T×T` buffer `p`.
fn scores(p: &mut [f32], q: &[f32], k: &[f32], base: usize, seq: usize, ld: usize, d: usize) {
    let qv = MatRef { ptr: q[base..].as_ptr(), row_stride: ld as isize, col_stride: 1 };
    let kt = MatRef { ptr: k[base..].as_ptr(), row_stride: 1, col_stride: ld as isize };
    // SAFETY: both views stay inside this (b, h)'s T×d block; p holds T×T values.
    unsafe { matmul(p.as_mut_ptr(), seq, false, qv, kt, seq, seq, d, Parallelism::None) };
}

/// `P` recomputed from the saved row log-sum-exp: `exp(S·scale + bias − lse)`, one pass, no
/// row reductions (what the backward does, as a flash-attention backward does).
#[allow(clippy::too_many_arguments)]
fn attention_probs_from_lse(p: &mut [f32], q: &[f32], k: &[f32], bias: &[f32], lse: &[f32], base: usize, seq: usize, ld: usize, d: usize, scale: f32) {
    scores(p, q, k, base, seq, ld, d);
    exp_rows_from_lse(p, bias, lse, seq, scale);
    // The saved lse is f32. Where it is large (a row whose every key is masked has |lse| near
    // |mask|, 1e4 or f32::MAX), its rounding scales every p of the row (by up to 2 with f32::MIN
    // masks: p = 1 instead of 1/T); renormalise such rows, as the f64 reference's softmax sums to 1.
    for (row, &l) in p.chunks_mut(seq).zip(lse) {
        if l.abs() >= 64.0 {
            let sum: f32 = row.iter().sum();
            if sum.is_finite() && sum > 0.0 {
                row.iter_mut().for_each(|v| *v /= sum);
            }
        }
    }
}

/// Attention per (batch, head) in parallel: scores with one gemm, a row softmax, then P·V with a
/// second gemm, all on strided views of the `[B, T, H]` inputs.
#[allow(clippy::too_many_arguments)]
pub fn attention(q: &[f32], k: &[f32], v: &[f32], mask_bias: &[f32], batch: usize, seq: usize, hidden: usize, heads: usize, dropout: Option<&ProbDropout>) -> Vec<f32> {
    attention_strided(q, k, v, hidden, mask_bias, batch, seq, hidden, heads, dropout).0
}

/// `attention` on inputs whose rows are `ld` elements apart: `ld = H` for separate Q, K, V, and
/// `ld = 3H` with `q, k, v` starting at columns 0, H, 2H of one packed `[B, T, 3H]` product (no
/// copy). Returns the context `[B, T, H]` and each row's log-sum-exp `[B, heads, T]` (of the
/// scaled, masked scores, before dropout) for the backward.
#[allow(clippy::too_many_arguments)]
pub fn attention_strided(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    ld: usize,
    mask_bias: &[f32],
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    dropout: Option<&ProbDropout>,
) -> (Vec<f32>, Vec<f32>) {
    let d = hidden / heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = crate::cpu::pool::buffer(batch * seq * hidden);
    let mut lse = crate::cpu::pool::buffer(batch * heads * seq);
    // Each (b, h) writes a disjoint column block of its batch's rows, and its own T log-sum-exps;
    // hand out raw pointers.
    struct SendPtr(*mut f32);
    unsafe impl Sync for SendPtr {}
    let out_ptr = SendPtr(out.as_mut_ptr());
    let lse_ptr = SendPtr(lse.as_mut_ptr());
    (0..batch * heads).into_par_iter().for_each_init(
        || vec![0f32; seq * seq],
        |scores, bh| {
            let (b, h) = (bh / heads, bh % heads);
            let (base_in, base_out) = (b * seq * ld + h * d, b * seq * hidden + h * d);
            let _ = &lse_ptr;
            // SAFETY: elements [bh·T, (bh+1)·T) of `lse` belong to this task alone.
            let lse_row = unsafe { std::slice::from_raw_parts_mut(lse_ptr.0.add(bh * seq), seq) };
            attention_probs(scores, q, k, &mask_bias[(b % (mask_bias.len() / seq)) * seq..][..seq], base_in, seq, ld, d, scale, Some(lse_row));
            if let Some(drop) = dropout {
                let mut keep = vec![1f32; seq];
                for (i, row) in scores.chunks_mut(seq).enumerate() {
                    drop(b, h, i, &mut keep);
                    row.iter_mut().zip(&keep).for_each(|(s, k)| *s *= k);
                }
            }
            let p = MatRef { ptr: scores.as_ptr(), row_stride: seq as isize, col_stride: 1 };
            let vv = MatRef { ptr: v[base_in..].as_ptr(), row_stride: ld as isize, col_stride: 1 };
            let _ = &out_ptr;
            // SAFETY: the destination block is this (b, h)'s own T×d columns; no other task writes it.
            unsafe { matmul(out_ptr.0.add(base_out), hidden, false, p, vv, seq, d, seq, Parallelism::None) };
        },
    );
    (out, lse)
}

/// Attention backward per (batch, head) in parallel, probabilities recomputed with gemm.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dctx: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask_bias: &[f32],
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    dropout: Option<&ProbDropout>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = batch * seq * hidden;
    let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    // SAFETY: three separate [B, T, H] outputs with rows `hidden` apart.
    unsafe { attention_backward_into(dctx, q, k, v, hidden, None, mask_bias, batch, seq, hidden, heads, dropout, [dq.as_mut_ptr(), dk.as_mut_ptr(), dv.as_mut_ptr()], hidden) };
    (dq, dk, dv)
}

/// `attention_backward` on a packed `[B, T, 3H]` Q, K, V (rows `3H` apart, no copy), with the
/// probabilities recomputed from the forward's row log-sum-exp `lse` (`[B, heads, T]`), writing
/// the packed gradient `[B, T, 3H]` (dQ, dK, dV side by side) for one product through `[3H, H]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_packed(dctx: &[f32], qkv: &[f32], lse: &[f32], mask_bias: &[f32], batch: usize, seq: usize, hidden: usize, heads: usize, dropout: Option<&ProbDropout>) -> Vec<f32> {
    let ld = 3 * hidden;
    let mut out = crate::cpu::pool::buffer(batch * seq * ld);
    let p = out.as_mut_ptr();
    // SAFETY: dQ, dK, dV are the column blocks [0, H), [H, 2H), [2H, 3H) of `out`, rows `3H` apart.
    unsafe { attention_backward_into(dctx, qkv, &qkv[hidden..], &qkv[2 * hidden..], ld, Some(lse), mask_bias, batch, seq, hidden, heads, dropout, [p, p.add(hidden), p.add(2 * hidden)], ld) };
    out
}

/// The backward kernel: inputs with rows `ld_in` apart, outputs at `out` with rows `ld_out` apart;
/// `P` from the saved log-sum-exp when given (`[B, heads, T]`), else recomputed with its softmax.
///
/// # Safety
/// Each output pointer must address `batch·seq` rows of `hidden` columns at row stride `ld_out`,
/// and no two (b, h) blocks of them may overlap.
#[allow(clippy::too_many_arguments)]
unsafe fn attention_backward_into(
    dctx: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    ld_in: usize,
    lse: Option<&[f32]>,
    mask_bias: &[f32],
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    dropout: Option<&ProbDropout>,
    out: [*mut f32; 3],
    ld_out: usize,
) {
    let d = hidden / heads;
    let scale = 1.0 / (d as f32).sqrt();
    struct SendPtr(*mut f32);
    unsafe impl Sync for SendPtr {}
    let (pq, pk, pv) = (SendPtr(out[0]), SendPtr(out[1]), SendPtr(out[2]));
    (0..batch * heads).into_par_iter().for_each_init(
        || (vec![0f32; seq * seq], vec![0f32; seq * seq], vec![1f32; seq * seq]),
        |(p, dp, keep), bh| {
            let (b, h) = (bh / heads, bh % heads);
            let (base_in, base_d, base_out) = (b * seq * ld_in + h * d, b * seq * hidden + h * d, b * seq * ld_out + h * d);
            let view = |m: &[f32]| MatRef { ptr: m[base_in..].as_ptr(), row_stride: ld_in as isize, col_stride: 1 };
            let view_t = |m: &[f32]| MatRef { ptr: m[base_in..].as_ptr(), row_stride: 1, col_stride: ld_in as isize };
            let dview = MatRef { ptr: dctx[base_d..].as_ptr(), row_stride: hidden as isize, col_stride: 1 };
            let sq = |m: &[f32]| MatRef { ptr: m.as_ptr(), row_stride: seq as isize, col_stride: 1 };
            let sq_t = |m: &[f32]| MatRef { ptr: m.as_ptr(), row_stride: 1, col_stride: seq as isize };
            let _ = (&pq, &pk, &pv);
            // SAFETY (all calls): views stay inside this (b, h)'s T×d blocks and the T×T scratch;
            // the destination blocks belong to this task alone (the caller's contract).
            unsafe {
                let bias = &mask_bias[(b % (mask_bias.len() / seq)) * seq..][..seq];
                match lse {
                    Some(l) => attention_probs_from_lse(p, q, k, bias, &l[bh * seq..][..seq], base_in, seq, ld_in, d, scale),
                    None => attention_probs(p, q, k, bias, base_in, seq, ld_in, d, scale, None),
                }
                // With dropout ctx = (P ⊙ keep)·V: dV uses the dropped P, dP gets the mask back.
                if let Some(drop) = dropout {
                    for (i, krow) in keep.chunks_mut(seq).enumerate() {
                        drop(b, h, i, krow);
                    }
                    let dropped: Vec<f32> = p.iter().zip(keep.iter()).map(|(a, k)| a * k).collect();
                    matmul(pv.0.add(base_out), ld_out, false, sq_t(&dropped), dview, seq, d, seq, Parallelism::None);
                } else {
                    matmul(pv.0.add(base_out), ld_out, false, sq_t(p), dview, seq, d, seq, Parallelism::None);
                }
                matmul(dp.as_mut_ptr(), seq, false, dview, view_t(v), seq, seq, d, Parallelism::None);
                if dropout.is_some() {
                    dp.iter_mut().zip(keep.iter()).for_each(|(g, k)| *g *= k);
                }
                // dS = P ⊙ (dP − rowsum(dP ⊙ P)), scaled
                for (prow, dprow) in p.chunks(seq).zip(dp.chunks_mut(seq)) {
                    let dot: f32 = prow.iter().zip(dprow.iter()).map(|(a, b)| a * b).sum();
                    dprow.iter_mut().zip(prow).for_each(|(g, &pp)| *g = pp * (*g - dot) * scale);
                }
                // dQ = dS·K; dK = dSᵀ·Q
                matmul(pq.0.add(base_out), ld_out, false, sq(dp), view(k), seq, d, seq, Parallelism::None);
                matmul(pk.0.add(base_out), ld_out, false, sq_t(dp), view(q), seq, d, seq, Parallelism::None);
            }
        },
    );
}
