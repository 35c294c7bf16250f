//! LayerNorm forward, one row per rayon task: `z = x + residual` is written into the output row,
//! two-pass mean and variance in f32 lane sums (vectorised), the normalisation in f32. Layout as
//! `reference::residual_layernorm`. The backward is `reference::layernorm_backward` (see `Prims`).

use rayon::prelude::*;

use crate::cpu::fast::math::simd_fn;

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

/// Lanes of the row sums: independent accumulators, so the reductions vectorise.
const LANES: usize = 8;

simd_fn! {
    /// Normalise one row in place (it holds `z` on entry): two-pass statistics in f32 over
    /// `LANES` interleaved partial sums (each adds `cols/LANES` values: rounding error ~1e-7
    /// relative at BERT widths, against PyTorch's own f32 reduction), the normalisation in f32.
    /// Returns the row's `(mean, rstd)`.
    fn normalize_row(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) -> (f32, f32) {
        let cols = row.len();
        let lane_sum = |row: &[f32], shift: f32, square: bool| -> f32 {
            let mut lanes = [0f32; LANES];
            let mut blocks = row.chunks_exact(LANES);
            for block in &mut blocks {
                for l in 0..LANES {
                    let v = block[l] - shift;
                    lanes[l] += if square { v * v } else { v };
                }
            }
            let mut sum: f32 = lanes.iter().sum();
            for &v in blocks.remainder() {
                let v = v - shift;
                sum += if square { v * v } else { v };
            }
            sum
        };
        let mean = lane_sum(row, 0.0, false) / cols as f32;
        let var = lane_sum(row, mean, true) / cols as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        for c in 0..cols.min(gamma.len()).min(beta.len()) {
            row[c] = (row[c] - mean) * rstd * gamma[c] + beta[c];
        }
        (mean, rstd)
    }
}
