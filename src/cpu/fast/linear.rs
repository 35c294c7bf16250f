//! Linear and its gradients on gemm: `y = x·Wᵀ + b` (gemm accumulates onto the preloaded bias),
//! `dx = dy·W`, `dW = dyᵀ·x` (transposes are strided views, not copies), `db = Σ_rows dy`.
//! Layout as `reference::linear`: `x` `[rows, d_in]`, `w` `[d_out, d_in]`, row-major. Numerics:
//! f32 accumulation in gemm; `db` sums in f64.

use crate::cpu::fast::matmul::{gemm_parallelism, matmul, MatRef};

/// `y = x·Wᵀ + b` with `w: [d_out, d_in]`.
pub fn linear(x: &[f32], w: &[f32], b: Option<&[f32]>, rows: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    // Every element is written: the bias rows, or the product (gemm overwrites, k = 0 aside).
    let mut y = crate::cpu::pool::buffer(rows * d_out);
    match b {
        Some(b) => y.chunks_mut(d_out.max(1)).for_each(|row| row.copy_from_slice(b)),
        None if d_in == 0 => y.fill(0.0),
        None => {}
    }
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

/// `dx = dy·W` with `w: [d_out, d_in]`.
pub fn linear_backward_input(dy: &[f32], w: &[f32], rows: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    let mut dx = crate::cpu::pool::buffer(rows * d_in);
    linear_backward_input_into(dy, w, &mut dx, false, rows, d_in, d_out);
    dx
}

/// `dx = dy·W`, or `dx += dy·W` when `accumulate` (gemm reads the destination: no second pass).
pub fn linear_backward_input_into(dy: &[f32], w: &[f32], dx: &mut [f32], accumulate: bool, rows: usize, d_in: usize, d_out: usize) {
    if rows == 0 || d_in == 0 || d_out == 0 {
        if !accumulate {
            dx.fill(0.0); // an empty sum (k = 0); the product overwrites otherwise
        }
        return;
    }
    let lhs = MatRef { ptr: dy.as_ptr(), row_stride: d_out as isize, col_stride: 1 };
    let rhs = MatRef { ptr: w.as_ptr(), row_stride: d_in as isize, col_stride: 1 };
    debug_assert!(dy.len() >= rows * d_out && w.len() >= d_out * d_in && dx.len() >= rows * d_in, "linear_backward_input_into: slices shorter than their shapes");
    // SAFETY: dy is rows×d_out, w is d_out×d_in, dx is rows×d_in, all row-major, checked by the caller.
    unsafe { matmul(dx.as_mut_ptr(), d_in, accumulate, lhs, rhs, rows, d_in, d_out, gemm_parallelism(rows * d_in * d_out)) };
}

/// `dw = dyᵀ·x`, `db = Σ_rows dy`.
pub fn linear_backward_params(dy: &[f32], x: &[f32], rows: usize, d_in: usize, d_out: usize) -> (Vec<f32>, Vec<f32>) {
    let mut dw = crate::cpu::pool::buffer(d_out * d_in);
    linear_backward_weight_into(dy, x, &mut dw, false, rows, d_in, d_out);
    let mut db = crate::cpu::pool::buffer(d_out);
    bias_backward_into(dy, &mut db, false, d_out);
    (dw, db)
}

/// `dw = dyᵀ·x`, or `dw += dyᵀ·x` when `accumulate` (in the product).
pub fn linear_backward_weight_into(dy: &[f32], x: &[f32], dw: &mut [f32], accumulate: bool, rows: usize, d_in: usize, d_out: usize) {
    if rows == 0 || d_in == 0 || d_out == 0 {
        if !accumulate {
            dw.fill(0.0); // a sum over no rows
        }
        return;
    }
    // dyᵀ[o, r] = dy[r, o]: a transposed view.
    let lhs = MatRef { ptr: dy.as_ptr(), row_stride: 1, col_stride: d_out as isize };
    let rhs = MatRef { ptr: x.as_ptr(), row_stride: d_in as isize, col_stride: 1 };
    debug_assert!(dy.len() >= rows * d_out && x.len() >= rows * d_in && dw.len() >= d_out * d_in, "linear_backward_weight_into: slices shorter than their shapes");
    // SAFETY: dy is rows×d_out, x is rows×d_in, dw is d_out×d_in, checked by the caller.
    unsafe { matmul(dw.as_mut_ptr(), d_in, accumulate, lhs, rhs, d_out, d_in, rows, gemm_parallelism(rows * d_in * d_out)) };
}

/// `db = Σ_rows dy` (summed in f64, rounded once), or `db += Σ_rows dy` when `accumulate`.
pub fn bias_backward_into(dy: &[f32], db: &mut [f32], accumulate: bool, d_out: usize) {
    let mut sum = vec![0f64; d_out];
    for row in dy.chunks(d_out.max(1)) {
        sum.iter_mut().zip(row).for_each(|(a, &g)| *a += g as f64);
    }
    for (o, v) in db.iter_mut().zip(sum) {
        *o = if accumulate { *o + v as f32 } else { v as f32 };
    }
}
