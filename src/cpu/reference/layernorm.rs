//! LayerNorm over the last dimension, optionally of `x + residual`, and its backward.
//! Forward: `y = (z − mean)·rstd·γ + β` with `z = x + residual`, biased variance and
//! `rstd = 1/√(var + eps)`. Backward from `z` (statistics recomputed, nothing saved):
//! `dz = rstd·(gy − mean(gy) − x̂·mean(gy⊙x̂))` with `gy = dy⊙γ`; `dγ = Σ_rows dy⊙x̂`, `dβ = Σ_rows dy`.
//! Layout: `[rows, cols]` row-major, `γ`, `β` `[cols]`. Numerics: `z` is rounded to f32 first (as
//! PyTorch materialises it), then two-pass statistics and everything after them in f64.

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

/// LayerNorm backward from its input `z` and the forward's statistics (`mean`, `rstd` per row):
/// the same formula as `layernorm_backward`, in f64, without recomputing them.
pub fn layernorm_backward_from_stats(dy: &[f32], z: &[f32], mean: &[f32], rstd: &[f32], gamma: &[f32], cols: usize) -> Vec<f32> {
    let mut dz = crate::cpu::pool::buffer(z.len());
    for (r, (dzr, (zr, dyr))) in dz.chunks_mut(cols).zip(z.chunks(cols).zip(dy.chunks(cols))).enumerate() {
        let (m, rs) = (mean[r] as f64, rstd[r] as f64);
        let xhat: Vec<f64> = zr.iter().map(|&v| (v as f64 - m) * rs).collect();
        let gy: Vec<f64> = dyr.iter().zip(gamma).map(|(&d, &g)| d as f64 * g as f64).collect();
        let mean_gy = gy.iter().sum::<f64>() / cols as f64;
        let mean_gyx = gy.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / cols as f64;
        for c in 0..cols {
            dzr[c] = (rs * (gy[c] - mean_gy - xhat[c] * mean_gyx)) as f32;
        }
    }
    dz
}
