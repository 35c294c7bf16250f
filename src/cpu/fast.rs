//! The fast CPU path the model runs on: `gemm` for every matrix product, rayon across rows and
//! heads, f32 accumulation. Tested against `reference` at awkward shapes in `tests/cpu.rs`.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::backend::{Activation, TokenBatch};
use crate::cpu::reference::ProbDropout;

/// Below this many multiply-adds a product runs on one thread: forking costs more than it saves.
const PARALLEL_GEMM_MIN_WORK: usize = 1 << 18;

fn gemm_parallelism(work: usize) -> Parallelism {
    if work >= PARALLEL_GEMM_MIN_WORK {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    }
}

/// Elements per block of the finiteness scan: large enough to amortise a rayon task, small
/// enough that a non-finite value early on stops the scan soon.
const FINITE_BLOCK: usize = 1 << 16;

/// Whether no element is NaN or ±inf: blocks in parallel; inside a block the test has no early
/// exit (an OR over the exponent bits), so it vectorises.
pub fn all_finite(x: &[f32]) -> bool {
    const EXP: u32 = 0x7f80_0000; // all exponent bits set: inf or NaN
    let block_ok = |b: &[f32]| !b.iter().fold(false, |bad, v| bad | (v.to_bits() & EXP == EXP));
    if x.len() <= FINITE_BLOCK {
        block_ok(x)
    } else {
        x.par_chunks(FINITE_BLOCK).all(block_ok)
    }
}

/// A strided view of a row-major-or-not f32 matrix for `gemm`.
#[derive(Clone, Copy)]
struct MatRef {
    ptr: *const f32,
    row_stride: isize,
    col_stride: isize,
}

/// `dst[m, n] (row-major, leading dimension ld_dst) = beta_dst·dst + lhs[m,k]·rhs[k,n]`.
///
/// # Safety
/// Every view must cover its `m×k`, `k×n` and `m×n` extent.
#[allow(clippy::too_many_arguments)] // a thin wrapper over gemm's 19-argument entry point
unsafe fn matmul(dst: *mut f32, ld_dst: usize, accumulate: bool, lhs: MatRef, rhs: MatRef, m: usize, n: usize, k: usize, par: Parallelism) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        ld_dst as isize,
        accumulate,
        lhs.ptr,
        lhs.col_stride,
        lhs.row_stride,
        rhs.ptr,
        rhs.col_stride,
        rhs.row_stride,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        par,
    )
}

/// `y = x·Wᵀ + b` with `w: [d_out, d_in]`.
pub fn linear(x: &[f32], w: &[f32], b: Option<&[f32]>, rows: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    let mut y = match b {
        Some(b) => b.iter().copied().cycle().take(rows * d_out).collect(),
        None => vec![0f32; rows * d_out],
    };
    if rows == 0 || d_out == 0 {
        return y;
    }
    let lhs = MatRef { ptr: x.as_ptr(), row_stride: d_in as isize, col_stride: 1 };
    // Wᵀ[i, o] = w[o, i]: a transposed view, no copy.
    let rhs = MatRef { ptr: w.as_ptr(), row_stride: 1, col_stride: d_in as isize };
    // SAFETY: x is rows×d_in, w is d_out×d_in, y is rows×d_out, all row-major and checked by the caller.
    unsafe { matmul(y.as_mut_ptr(), d_out, b.is_some(), lhs, rhs, rows, d_out, d_in, gemm_parallelism(rows * d_in * d_out)) };
    y
}

pub fn embedding(tokens: &TokenBatch, word: &[f32], position: &[f32], token_type: &[f32], hidden: usize) -> Vec<f32> {
    let mut y = vec![0f32; tokens.batch * tokens.seq_len * hidden];
    y.par_chunks_mut(hidden).enumerate().for_each(|(row, out)| {
        let t = row % tokens.seq_len;
        let w = &word[tokens.input_ids[row] as usize * hidden..][..hidden];
        let ty = &token_type[tokens.token_type_ids[row] as usize * hidden..][..hidden];
        let p = &position[t * hidden..][..hidden];
        for h in 0..hidden {
            out[h] = (w[h] + ty[h]) + p[h];
        }
    });
    y
}

/// `LN(x + residual)`, one row per rayon task; the two-pass statistics accumulate in f64, which
/// costs nothing next to the row traffic and keeps parity with PyTorch within a few ulps.
pub fn residual_layernorm(x: &[f32], residual: Option<&[f32]>, gamma: &[f32], beta: &[f32], cols: usize, eps: f32) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(cols).enumerate().for_each(|(r, out)| {
        let xr = &x[r * cols..][..cols];
        match residual {
            Some(res) => {
                let rr = &res[r * cols..][..cols];
                for c in 0..cols {
                    out[c] = xr[c] + rr[c];
                }
            }
            None => out.copy_from_slice(xr),
        }
        let mean = out.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = out.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
        let rstd = (1.0 / (var + eps as f64).sqrt()) as f32;
        let mean = mean as f32;
        for c in 0..cols {
            out[c] = (out[c] - mean) * rstd * gamma[c] + beta[c];
        }
    });
    y
}

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

pub fn activation(x: &[f32], act: Activation) -> Vec<f32> {
    let mut y = x.to_vec();
    y.par_chunks_mut(4096).for_each(|chunk| {
        for v in chunk {
            *v = activation_f32(*v, act);
        }
    });
    y
}

#[inline]
fn activation_f32(x: f32, act: Activation) -> f32 {
    match act {
        Activation::Relu => x.max(0.0),
        Activation::Gelu => 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2)),
        Activation::GeluNew => {
            const C: f32 = 0.797_884_6; // √(2/π)
            0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
        }
        Activation::Swish => x / (1.0 + (-x).exp()),
        Activation::Tanh => x.tanh(),
        Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
    }
}

// ---- backward ----------------------------------------------------------------------------------

/// `dx = dy·W` with `w: [d_out, d_in]`.
pub fn linear_backward_input(dy: &[f32], w: &[f32], rows: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    let mut dx = vec![0f32; rows * d_in];
    if rows == 0 || d_in == 0 {
        return dx;
    }
    let lhs = MatRef { ptr: dy.as_ptr(), row_stride: d_out as isize, col_stride: 1 };
    let rhs = MatRef { ptr: w.as_ptr(), row_stride: d_in as isize, col_stride: 1 };
    // SAFETY: dy is rows×d_out, w is d_out×d_in, dx is rows×d_in, all row-major.
    unsafe { matmul(dx.as_mut_ptr(), d_in, false, lhs, rhs, rows, d_in, d_out, gemm_parallelism(rows * d_in * d_out)) };
    dx
}

/// `dw = dyᵀ·x`, `db = Σ_rows dy`.
pub fn linear_backward_params(dy: &[f32], x: &[f32], rows: usize, d_in: usize, d_out: usize) -> (Vec<f32>, Vec<f32>) {
    let mut dw = vec![0f32; d_out * d_in];
    if rows > 0 && d_in > 0 && d_out > 0 {
        // dyᵀ[o, r] = dy[r, o]: a transposed view.
        let lhs = MatRef { ptr: dy.as_ptr(), row_stride: 1, col_stride: d_out as isize };
        let rhs = MatRef { ptr: x.as_ptr(), row_stride: d_in as isize, col_stride: 1 };
        // SAFETY: dy is rows×d_out, x is rows×d_in, dw is d_out×d_in.
        unsafe { matmul(dw.as_mut_ptr(), d_in, false, lhs, rhs, d_out, d_in, rows, gemm_parallelism(rows * d_in * d_out)) };
    }
    let mut db = vec![0f64; d_out];
    for row in dy.chunks(d_out.max(1)) {
        db.iter_mut().zip(row).for_each(|(a, &g)| *a += g as f64);
    }
    (dw, db.into_iter().map(|v| v as f32).collect())
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
