//! Multi-head self-attention with HF eager semantics, and its backward.
//! Forward per (batch b, head h, query i): `s_j = q_i·k_j/√d + mask_j`, `p = softmax(s)`, optional
//! dropout on `p`, `ctx_i = Σ_j p_j·keep_j·v_j`. Backward recomputes `p` and returns `(dq, dk, dv)`.
//! Layout: `q`, `k`, `v`, `ctx` are `[B, T, H]` row-major, head `h` in columns `[h·d, (h+1)·d)` with
//! `d = H/heads`; `mask_bias` is `[B, T]`, additive. Numerics: dot products in f64; the scaled score
//! is rounded to f32 before the mask is added (as in PyTorch, so a fully masked row turns uniform in
//! both); softmax and all sums in f64.

/// Fills `factors[j]` with the dropout multiplier (0 or 1/(1−p)) of probability `(b, h, i, j)`.
pub type ProbDropout = dyn Fn(usize, usize, usize, &mut [f32]) + Sync;

/// The log-sum-exp of every row of scaled, masked scores, `[B, heads, T]`, in f64 (rounded to
/// f32 once): what the attention forward saves for its backward.
#[allow(clippy::too_many_arguments)]
pub fn attention_lse(q: &[f32], k: &[f32], mask_bias: &[f32], batch: usize, seq: usize, hidden: usize, heads: usize) -> Vec<f32> {
    let d = hidden / heads;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = Vec::with_capacity(batch * heads * seq);
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..seq {
                let qi = &q[(b * seq + i) * hidden + h * d..][..d];
                let s: Vec<f64> = (0..seq)
                    .map(|j| {
                        let kj = &k[(b * seq + j) * hidden + h * d..][..d];
                        let dot: f64 = qi.iter().zip(kj).map(|(a, c)| *a as f64 * *c as f64).sum();
                        ((dot * scale) as f32 + mask_bias[(b % (mask_bias.len() / seq)) * seq + j]) as f64
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                out.push((max + s.iter().map(|v| (v - max).exp()).sum::<f64>().ln()) as f32);
            }
        }
    }
    out
}

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
