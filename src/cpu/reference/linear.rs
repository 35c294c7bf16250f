//! Linear, `y = x·Wᵀ + b`, and its gradients: `dx = dy·W`, `dW = dyᵀ·x`, `db = Σ_rows dy`.
//! Layout: `x`, `dx` are `[rows, d_in]`, `y`, `dy` `[rows, d_out]`, `w` `[d_out, d_in]` (as
//! PyTorch's nn.Linear), all row-major. Numerics: every dot product and every row sum accumulates
//! in f64 and is rounded to f32 once.

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
