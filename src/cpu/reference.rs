//! The plain reference: clear loops, f64 accumulation. This is the specification that the fast
//! CPU path and every CUDA kernel are tested against, so it favours obviousness over speed.
//! All functions work on row-major slices; shapes are checked by the caller (`CpuBackend`).

use crate::backend::{Activation, TokenBatch};

/// `y[r, o] = Σ_i x[r, i]·w[o, i] + b[o]`.
pub fn linear(x: &[f32], w: &[f32], b: Option<&[f32]>, rows: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    let mut y = vec![0f32; rows * d_out];
    for r in 0..rows {
        let xr = &x[r * d_in..(r + 1) * d_in];
        for o in 0..d_out {
            let wo = &w[o * d_in..(o + 1) * d_in];
            let mut acc = b.map_or(0.0, |b| b[o] as f64);
            for i in 0..d_in {
                acc += xr[i] as f64 * wo[i] as f64;
            }
            y[r * d_out + o] = acc as f32;
        }
    }
    y
}

/// `word[id] + position[t] + token_type[tt]` for every token, `[B·T, H]`.
pub fn embedding(tokens: &TokenBatch, word: &[f32], position: &[f32], token_type: &[f32], hidden: usize) -> Vec<f32> {
    let mut y = vec![0f32; tokens.batch * tokens.seq_len * hidden];
    for b in 0..tokens.batch {
        for t in 0..tokens.seq_len {
            let row = b * tokens.seq_len + t;
            let id = tokens.input_ids[row] as usize;
            let tt = tokens.token_type_ids[row] as usize;
            for h in 0..hidden {
                // Same association order as HF: (word + type) + position.
                let v = (word[id * hidden + h] + token_type[tt * hidden + h]) + position[t * hidden + h];
                y[row * hidden + h] = v;
            }
        }
    }
    y
}

/// What a LayerNorm forward produces; `mean` and `rstd` are kept for the backward.
pub struct LayerNormOut {
    pub y: Vec<f32>,
    pub mean: Vec<f32>,
    pub rstd: Vec<f32>,
}

/// `LN(x + residual)` row by row: biased variance, two-pass in f64.
pub fn residual_layernorm(
    x: &[f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    cols: usize,
    eps: f32,
) -> LayerNormOut {
    let rows = x.len() / cols;
    let mut out = LayerNormOut { y: vec![0.0; x.len()], mean: vec![0.0; rows], rstd: vec![0.0; rows] };
    let mut z = vec![0f64; cols];
    for r in 0..rows {
        for (c, zc) in z.iter_mut().enumerate() {
            let i = r * cols + c;
            // The sum is rounded to f32 first, exactly as PyTorch materialises `x + residual`.
            *zc = (x[i] + residual.map_or(0.0, |res| res[i])) as f64;
        }
        let mean = z.iter().sum::<f64>() / cols as f64;
        let var = z.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / cols as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for (c, y) in out.y[r * cols..(r + 1) * cols].iter_mut().enumerate() {
            *y = ((z[c] - mean) * rstd * gamma[c] as f64 + beta[c] as f64) as f32;
        }
        out.mean[r] = mean as f32;
        out.rstd[r] = rstd as f32;
    }
    out
}

/// Multi-head attention, HF eager semantics: `softmax(QKᵀ/√d + mask)·V` per head.
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
) -> Vec<f32> {
    let d = hidden / heads;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f32; batch * seq * hidden];
    let mut p = vec![0f64; seq];
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..seq {
                let qi = &q[(b * seq + i) * hidden + h * d..][..d];
                for (j, pj) in p.iter_mut().enumerate() {
                    let kj = &k[(b * seq + j) * hidden + h * d..][..d];
                    let dot: f64 = qi.iter().zip(kj).map(|(a, c)| *a as f64 * *c as f64).sum();
                    // The bias is added in f32 like PyTorch, so a fully masked row becomes
                    // uniform there and here alike.
                    *pj = ((dot * scale) as f32 + mask_bias[b * seq + j]) as f64;
                }
                let max = p.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let mut sum = 0.0;
                for pj in p.iter_mut() {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                for c in 0..d {
                    let mut acc = 0.0;
                    for (j, pj) in p.iter().enumerate() {
                        acc += pj / sum * v[(b * seq + j) * hidden + h * d + c] as f64;
                    }
                    out[(b * seq + i) * hidden + h * d + c] = acc as f32;
                }
            }
        }
    }
    out
}

pub fn activation(x: &[f32], act: Activation) -> Vec<f32> {
    x.iter().map(|&v| act.apply_f64(v as f64) as f32).collect()
}

/// `[B, T, H] -> [B, H]`, the first token of each sequence.
pub fn first_token(x: &[f32], batch: usize, seq: usize, hidden: usize) -> Vec<f32> {
    (0..batch).flat_map(|b| x[b * seq * hidden..][..hidden].iter().copied()).collect()
}
