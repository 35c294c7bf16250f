//! LayerNorm forward, one row per rayon task: `z = x + residual` is written into the output row,
//! two-pass mean and variance accumulate in f64, the normalisation runs in f32. Layout as
//! `reference::residual_layernorm`. The backward is `reference::layernorm_backward` (see `Prims`).

use rayon::prelude::*;

/// `LN(x + residual)`, one row per rayon task; the two-pass statistics accumulate in f64, which
/// costs nothing next to the row traffic and keeps parity with PyTorch within a few ulps.
pub fn residual_layernorm(x: &[f32], residual: Option<&[f32]>, gamma: &[f32], beta: &[f32], cols: usize, eps: f32) -> Vec<f32> {
    let mut y = crate::cpu::pool::buffer(x.len());
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
        normalize_row(out, gamma, beta, eps);
    });
    y
}

/// `LN(z)` of an already summed residual stream `z`, with each row's `(mean, rstd)`: the same
/// arithmetic as `residual_layernorm`, so `y` is bit-identical to it.
pub fn layernorm_with_stats(z: &[f32], gamma: &[f32], beta: &[f32], cols: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut y = crate::cpu::pool::buffer(z.len());
    y.copy_from_slice(z);
    let mut stats = crate::cpu::pool::buffer(2 * (z.len() / cols.max(1)));
    y.par_chunks_mut(cols).zip(stats.par_chunks_mut(2)).for_each(|(out, st)| {
        let (mean, rstd) = normalize_row(out, gamma, beta, eps);
        st.copy_from_slice(&[mean, rstd]);
    });
    (y, stats)
}

/// Normalise one row in place (it holds `z` on entry): two-pass statistics in f64, the
/// normalisation in f32. Returns the row's `(mean, rstd)`.
fn normalize_row(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) -> (f32, f32) {
    let cols = row.len();
    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
    let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
    let rstd = (1.0 / (var + eps as f64).sqrt()) as f32;
    let mean = mean as f32;
    for c in 0..cols {
        row[c] = (row[c] - mean) * rstd * gamma[c] + beta[c];
    }
    (mean, rstd)
}
