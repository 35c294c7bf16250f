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

/// Whether no element is NaN or ±inf.
pub fn all_finite(x: &[f32]) -> bool {
    x.iter().all(|v| v.is_finite())
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

/// Fills `factors[j]` with the dropout multiplier (0 or 1/(1−p)) of probability `(b, h, i, j)`.
pub type ProbDropout = dyn Fn(usize, usize, usize, &mut [f32]) + Sync;

/// Multi-head attention, HF eager semantics: `dropout(softmax(QKᵀ/√d + mask))·V` per head.
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
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f32; batch * seq * hidden];
    let mut p = vec![0f64; seq];
    let mut keep = vec![1f32; seq];
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..seq {
                let qi = &q[(b * seq + i) * hidden + h * d..][..d];
                for (j, pj) in p.iter_mut().enumerate() {
                    let kj = &k[(b * seq + j) * hidden + h * d..][..d];
                    let dot: f64 = qi.iter().zip(kj).map(|(a, c)| *a as f64 * *c as f64).sum();
                    // The bias is added in f32 like PyTorch, so a fully masked row becomes
                    // uniform there and here alike.
                    *pj = ((dot * scale) as f32 + mask_bias[(b % (mask_bias.len() / seq)) * seq + j]) as f64;
                }
                let max = p.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let mut sum = 0.0;
                for pj in p.iter_mut() {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                if let Some(drop) = dropout {
                    drop(b, h, i, &mut keep);
                }
                for c in 0..d {
                    let mut acc = 0.0;
                    for (j, pj) in p.iter().enumerate() {
                        acc += pj / sum * keep[j] as f64 * v[(b * seq + j) * hidden + h * d + c] as f64;
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

// ---- backward ----------------------------------------------------------------------------------

/// Input gradient of a Linear: `dx[r, i] = Σ_o dy[r, o]·w[o, i]`.
pub fn linear_backward_input(dy: &[f32], w: &[f32], rows: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    let mut dx = vec![0f32; rows * d_in];
    for r in 0..rows {
        for i in 0..d_in {
            let mut acc = 0f64;
            for o in 0..d_out {
                acc += dy[r * d_out + o] as f64 * w[o * d_in + i] as f64;
            }
            dx[r * d_in + i] = acc as f32;
        }
    }
    dx
}

/// Parameter gradients of a Linear: `dw[o, i] = Σ_r dy[r, o]·x[r, i]`, `db[o] = Σ_r dy[r, o]`.
pub fn linear_backward_params(dy: &[f32], x: &[f32], rows: usize, d_in: usize, d_out: usize) -> (Vec<f32>, Vec<f32>) {
    let mut dw = vec![0f32; d_out * d_in];
    let mut db = vec![0f32; d_out];
    for o in 0..d_out {
        let mut bsum = 0f64;
        for r in 0..rows {
            bsum += dy[r * d_out + o] as f64;
        }
        db[o] = bsum as f32;
        for i in 0..d_in {
            let mut acc = 0f64;
            for r in 0..rows {
                acc += dy[r * d_out + o] as f64 * x[r * d_in + i] as f64;
            }
            dw[o * d_in + i] = acc as f32;
        }
    }
    (dw, db)
}

/// Derivative of an activation at `x`, in f64.
pub fn activation_derivative(act: Activation, x: f64) -> f64 {
    let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
    match act {
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Gelu => {
            let cdf = 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            cdf + x * pdf
        }
        Activation::GeluNew => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let inner = c * (x + 0.044715 * x * x * x);
            let t = inner.tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
        }
        Activation::Swish => {
            let s = sigmoid(x);
            s * (1.0 + x * (1.0 - s))
        }
        Activation::Tanh => 1.0 - x.tanh().powi(2),
        Activation::Sigmoid => {
            let s = sigmoid(x);
            s * (1.0 - s)
        }
    }
}

/// `dx = dy ⊙ act'(pre)`.
pub fn activation_backward(dy: &[f32], pre: &[f32], act: Activation) -> Vec<f32> {
    dy.iter().zip(pre).map(|(&g, &x)| (g as f64 * activation_derivative(act, x as f64)) as f32).collect()
}

/// LayerNorm backward from its input `z` (statistics recomputed):
/// `dz = rstd·(gy − mean(gy) − x̂·mean(gy⊙x̂))` with `gy = dy⊙γ`; also `dγ = Σ dy⊙x̂`, `dβ = Σ dy`.
pub fn layernorm_backward(dy: &[f32], z: &[f32], gamma: &[f32], cols: usize, eps: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = z.len() / cols;
    let mut dz = vec![0f32; z.len()];
    let mut dgamma = vec![0f64; cols];
    let mut dbeta = vec![0f64; cols];
    for r in 0..rows {
        let zr = &z[r * cols..(r + 1) * cols];
        let dyr = &dy[r * cols..(r + 1) * cols];
        let mean = zr.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = zr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        let xhat: Vec<f64> = zr.iter().map(|&v| (v as f64 - mean) * rstd).collect();
        let gy: Vec<f64> = dyr.iter().zip(gamma).map(|(&d, &g)| d as f64 * g as f64).collect();
        let mean_gy = gy.iter().sum::<f64>() / cols as f64;
        let mean_gyx = gy.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / cols as f64;
        for c in 0..cols {
            dz[r * cols + c] = (rstd * (gy[c] - mean_gy - xhat[c] * mean_gyx)) as f32;
            dgamma[c] += dyr[c] as f64 * xhat[c];
            dbeta[c] += dyr[c] as f64;
        }
    }
    (dz, dgamma.into_iter().map(|v| v as f32).collect(), dbeta.into_iter().map(|v| v as f32).collect())
}

/// Attention backward (probabilities recomputed): returns `(dq, dk, dv)`, each `[B, T, H]`.
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
    let scale = 1.0 / (d as f64).sqrt();
    let n = batch * seq * hidden;
    let (mut dq, mut dk, mut dv) = (vec![0f64; n], vec![0f64; n], vec![0f64; n]);
    let mut keep = vec![1f32; seq];
    let at = |b: usize, t: usize, h: usize, c: usize| (b * seq + t) * hidden + h * d + c;
    let mut p = vec![0f64; seq];
    let mut dp = vec![0f64; seq];
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..seq {
                for j in 0..seq {
                    let dot: f64 = (0..d).map(|c| q[at(b, i, h, c)] as f64 * k[at(b, j, h, c)] as f64).sum();
                    p[j] = ((dot * scale) as f32 + mask_bias[(b % (mask_bias.len() / seq)) * seq + j]) as f64;
                }
                let max = p.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let mut sum = 0.0;
                for pj in p.iter_mut() {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                p.iter_mut().for_each(|pj| *pj /= sum);
                if let Some(drop) = dropout {
                    drop(b, h, i, &mut keep);
                }
                // ctx = (P ⊙ keep)·V: dV uses the dropped probabilities, dP passes the mask back.
                for j in 0..seq {
                    let kj = keep[j] as f64;
                    dp[j] = kj * (0..d).map(|c| dctx[at(b, i, h, c)] as f64 * v[at(b, j, h, c)] as f64).sum::<f64>();
                    for c in 0..d {
                        dv[at(b, j, h, c)] += p[j] * kj * dctx[at(b, i, h, c)] as f64;
                    }
                }
                let row_dot: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for j in 0..seq {
                    let ds = p[j] * (dp[j] - row_dot) * scale;
                    for c in 0..d {
                        dq[at(b, i, h, c)] += ds * k[at(b, j, h, c)] as f64;
                        dk[at(b, j, h, c)] += ds * q[at(b, i, h, c)] as f64;
                    }
                }
            }
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    (f(dq), f(dk), f(dv))
}
