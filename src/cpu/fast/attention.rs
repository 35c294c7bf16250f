//! Attention forward and backward, one (batch, head) per rayon task, gemm on strided views of the
//! `[B, T, H]` inputs (head `h` is columns `[h·d, (h+1)·d)`) and `T×T` scratch per task.
//! Forward: `P = softmax(Q·Kᵀ·scale + mask)`, dropout on `P`, `ctx = P·V`. Backward recomputes `P`,
//! then `dV = (P⊙keep)ᵀ·dctx`, `dP = (dctx·Vᵀ)⊙keep`, `dS = P⊙(dP − rowsum(dP⊙P))·scale`,
//! `dQ = dS·K`, `dK = dSᵀ·Q`. Numerics: f32 throughout, the softmax max-subtracted.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::cpu::fast::matmul::{matmul, MatRef};
use crate::cpu::reference::ProbDropout;

/// `P = softmax(Q·Kᵀ·scale + bias)` of one (batch, head) block starting at element `base` of the
/// `[B, T, H]` inputs, into the `T×T` buffer `p`.
#[allow(clippy::too_many_arguments)]
fn attention_probs(p: &mut [f32], q: &[f32], k: &[f32], bias: &[f32], base: usize, seq: usize, hidden: usize, d: usize, scale: f32) {
    let qv = MatRef { ptr: q[base..].as_ptr(), row_stride: hidden as isize, col_stride: 1 };
    let kt = MatRef { ptr: k[base..].as_ptr(), row_stride: 1, col_stride: hidden as isize };
    // SAFETY: both views stay inside this (b, h)'s T×d block; p holds T×T values.
    unsafe { matmul(p.as_mut_ptr(), seq, false, qv, kt, seq, seq, d, Parallelism::None) };
    for row in p.chunks_mut(seq) {
        let mut max = f32::NEG_INFINITY;
        for (s, m) in row.iter_mut().zip(bias) {
            *s = *s * scale + m;
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in row.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|s| *s *= inv);
    }
}

/// Attention per (batch, head) in parallel: scores with one gemm, a row softmax, then P·V with a
/// second gemm, all on strided views of the `[B, T, H]` inputs.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask_bias: &[f32],
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    dropout: Option<&ProbDropout>,
) -> Vec<f32> {
    let d = hidden / heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; batch * seq * hidden];
    // Each (b, h) writes a disjoint column block of its batch's rows; hand out raw pointers.
    struct SendPtr(*mut f32);
    unsafe impl Sync for SendPtr {}
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..batch * heads).into_par_iter().for_each_init(
        || vec![0f32; seq * seq],
        |scores, bh| {
            let (b, h) = (bh / heads, bh % heads);
            let base = b * seq * hidden + h * d;
            let view = |m: &[f32]| MatRef { ptr: m[base..].as_ptr(), row_stride: hidden as isize, col_stride: 1 };
            attention_probs(scores, q, k, &mask_bias[(b % (mask_bias.len() / seq)) * seq..][..seq], base, seq, hidden, d, scale);
            if let Some(drop) = dropout {
                let mut keep = vec![1f32; seq];
                for (i, row) in scores.chunks_mut(seq).enumerate() {
                    drop(b, h, i, &mut keep);
                    row.iter_mut().zip(&keep).for_each(|(s, k)| *s *= k);
                }
            }
            let p = MatRef { ptr: scores.as_ptr(), row_stride: seq as isize, col_stride: 1 };
            let _ = &out_ptr;
            // SAFETY: the destination block is this (b, h)'s own T×d columns; no other task writes it.
            unsafe { matmul(out_ptr.0.add(base), hidden, false, p, view(v), seq, d, seq, Parallelism::None) };
        },
    );
    out
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
    let d = hidden / heads;
    let scale = 1.0 / (d as f32).sqrt();
    let n = batch * seq * hidden;
    let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    struct SendPtr(*mut f32);
    unsafe impl Sync for SendPtr {}
    let (pq, pk, pv) = (SendPtr(dq.as_mut_ptr()), SendPtr(dk.as_mut_ptr()), SendPtr(dv.as_mut_ptr()));
    (0..batch * heads).into_par_iter().for_each_init(
        || (vec![0f32; seq * seq], vec![0f32; seq * seq], vec![1f32; seq * seq]),
        |(p, dp, keep), bh| {
            let (b, h) = (bh / heads, bh % heads);
            let base = b * seq * hidden + h * d;
            let view = |m: &[f32]| MatRef { ptr: m[base..].as_ptr(), row_stride: hidden as isize, col_stride: 1 };
            let view_t = |m: &[f32]| MatRef { ptr: m[base..].as_ptr(), row_stride: 1, col_stride: hidden as isize };
            let sq = |m: &[f32]| MatRef { ptr: m.as_ptr(), row_stride: seq as isize, col_stride: 1 };
            let sq_t = |m: &[f32]| MatRef { ptr: m.as_ptr(), row_stride: 1, col_stride: seq as isize };
            let _ = (&pq, &pk, &pv);
            // SAFETY (all calls): views stay inside this (b, h)'s T×d blocks and the T×T scratch;
            // the destination blocks belong to this task alone.
            unsafe {
                attention_probs(p, q, k, &mask_bias[(b % (mask_bias.len() / seq)) * seq..][..seq], base, seq, hidden, d, scale);
                // With dropout ctx = (P ⊙ keep)·V: dV uses the dropped P, dP gets the mask back.
                if let Some(drop) = dropout {
                    for (i, krow) in keep.chunks_mut(seq).enumerate() {
                        drop(b, h, i, krow);
                    }
                    let dropped: Vec<f32> = p.iter().zip(keep.iter()).map(|(a, k)| a * k).collect();
                    matmul(pv.0.add(base), hidden, false, sq_t(&dropped), view(dctx), seq, d, seq, Parallelism::None);
                } else {
                    matmul(pv.0.add(base), hidden, false, sq_t(p), view(dctx), seq, d, seq, Parallelism::None);
                }
                matmul(dp.as_mut_ptr(), seq, false, view(dctx), view_t(v), seq, seq, d, Parallelism::None);
                if dropout.is_some() {
                    dp.iter_mut().zip(keep.iter()).for_each(|(g, k)| *g *= k);
                }
                // dS = P ⊙ (dP − rowsum(dP ⊙ P)), scaled
                for (prow, dprow) in p.chunks(seq).zip(dp.chunks_mut(seq)) {
                    let dot: f32 = prow.iter().zip(dprow.iter()).map(|(a, b)| a * b).sum();
                    dprow.iter_mut().zip(prow).for_each(|(g, &pp)| *g = pp * (*g - dot) * scale);
                }
                // dQ = dS·K; dK = dSᵀ·Q
                matmul(pq.0.add(base), hidden, false, sq(dp), view(k), seq, d, seq, Parallelism::None);
                matmul(pk.0.add(base), hidden, false, sq_t(dp), view(q), seq, d, seq, Parallelism::None);
            }
        },
    );
    (dq, dk, dv)
}
