//! LayerNorm forward, one row per rayon task: `z = x + residual` is written into the output row,
//! two-pass mean and variance in f32 lane sums (vectorised), the normalisation in f32. Layout as
//! `reference::residual_layernorm`. The backward, beside it, recomputes or reads those statistics
//! and reduces its two row sums the same way; `dγ`/`dβ` sum per block of rows, blocks in order.

use rayon::prelude::*;

use crate::cpu::fast::math::{simd_fn, LANES};

/// `LN(x + residual)`, one row per rayon task (statistics as in `normalize_row`).
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

simd_fn! {
    /// Normalise one row in place (it holds `z` on entry): two-pass statistics in f32 over
    /// `LANES` interleaved partial sums (each adds `cols/LANES` values: rounding error ~1e-7
    /// relative at BERT widths, against PyTorch's own f32 reduction), the normalisation in f32.
    /// Returns the row's `(mean, rstd)`.
    fn normalize_row(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) -> (f32, f32) {
        let (mean, rstd) = row_stats(row, eps);
        for c in 0..row.len().min(gamma.len()).min(beta.len()) {
            row[c] = (row[c] - mean) * rstd * gamma[c] + beta[c];
        }
        (mean, rstd)
    }
}

/// Rows per task of the backward: enough to amortise a task and its `dγ`/`dβ` partial sums.
const BACKWARD_ROWS: usize = 64;

/// `(dz, dγ, dβ)` of `LN(z)` for upstream `dy` (statistics recomputed as the forward computes
/// them). Rows in parallel blocks; `dγ`, `dβ` summed per block and the block sums added in
/// order (deterministic).
pub fn layernorm_backward(dy: &[f32], z: &[f32], gamma: &[f32], cols: usize, eps: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dz = crate::cpu::pool::buffer(z.len());
    let block = BACKWARD_ROWS * cols.max(1);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dz
        .par_chunks_mut(block)
        .zip(z.par_chunks(block).zip(dy.par_chunks(block)))
        .map(|(dzb, (zb, dyb))| {
            let (mut dg, mut db) = (vec![0f32; cols], vec![0f32; cols]);
            for ((dzr, zr), dyr) in dzb.chunks_mut(cols).zip(zb.chunks(cols)).zip(dyb.chunks(cols)) {
                let (mean, rstd) = row_stats(zr, eps);
                backward_row(dzr, zr, dyr, gamma, mean, rstd);
                param_grads_row(&mut dg, &mut db, zr, dyr, mean, rstd);
            }
            (dg, db)
        })
        .collect();
    let (mut dgamma, mut dbeta) = (vec![0f32; cols], vec![0f32; cols]);
    for (dg, db) in partials {
        dgamma.iter_mut().zip(dg).for_each(|(a, v)| *a += v);
        dbeta.iter_mut().zip(db).for_each(|(a, v)| *a += v);
    }
    (dz, dgamma, dbeta)
}

/// `dz` of `LN(z)` from the forward's per-row `mean` and `rstd` (frozen γ: no parameter gradients).
pub fn layernorm_backward_from_stats(dy: &[f32], z: &[f32], mean: &[f32], rstd: &[f32], gamma: &[f32], cols: usize) -> Vec<f32> {
    let mut dz = crate::cpu::pool::buffer(z.len());
    dz.par_chunks_mut(cols.max(1)).zip(z.par_chunks(cols.max(1)).zip(dy.par_chunks(cols.max(1)))).enumerate().for_each(|(r, (dzr, (zr, dyr)))| {
        backward_row(dzr, zr, dyr, gamma, mean[r], rstd[r]);
    });
    dz
}

/// A row's `Σ` over lanes (see `LANES`) of `f(i)`.
#[allow(clippy::needless_range_loop)] // counted lanes are what vectorises
#[inline(always)]
fn lane_sum(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let full = n / LANES * LANES;
    let mut i = 0;
    while i < full {
        for l in 0..LANES {
            lanes[l] += f(i + l);
        }
        i += LANES;
    }
    let mut sum: f32 = lanes.iter().sum();
    for j in full..n {
        sum += f(j);
    }
    sum
}

simd_fn! {
    /// A row's `(mean, rstd)`, as the forward computes them (`normalize_row`).
    fn row_stats(z: &[f32], eps: f32) -> (f32, f32) {
        let cols = z.len();
        let mean = lane_sum(cols, |i| z[i]) / cols as f32;
        let var = lane_sum(cols, |i| (z[i] - mean) * (z[i] - mean)) / cols as f32;
        (mean, 1.0 / (var + eps).sqrt())
    }
}

simd_fn! {
    /// `dz = rstd·(gy − mean(gy) − x̂·mean(gy⊙x̂))` for one row, `gy = dy⊙γ`, `x̂ = (z − mean)·rstd`.
    fn backward_row(dz: &mut [f32], z: &[f32], dy: &[f32], gamma: &[f32], mean: f32, rstd: f32) {
        let cols = dz.len().min(z.len()).min(dy.len()).min(gamma.len());
        let mean_gy = lane_sum(cols, |i| dy[i] * gamma[i]) / cols as f32;
        let mean_gyx = lane_sum(cols, |i| dy[i] * gamma[i] * ((z[i] - mean) * rstd)) / cols as f32;
        for c in 0..cols {
            let xhat = (z[c] - mean) * rstd;
            dz[c] = rstd * (dy[c] * gamma[c] - mean_gy - xhat * mean_gyx);
        }
    }
}

simd_fn! {
    /// `dγ += dy⊙x̂`, `dβ += dy` for one row.
    fn param_grads_row(dg: &mut [f32], db: &mut [f32], z: &[f32], dy: &[f32], mean: f32, rstd: f32) {
        let cols = dg.len().min(db.len()).min(z.len()).min(dy.len());
        for c in 0..cols {
            dg[c] += dy[c] * ((z[c] - mean) * rstd);
            db[c] += dy[c];
        }
    }
}
