//! Linear and its gradients on gemm: `y = x·Wᵀ + b` (gemm accumulates onto the preloaded bias),
//! `dx = dy·W` (transposes are strided views, not copies), `dW = dyᵀ·x`, `db = Σ_rows dy`.
//! Layout as `reference::linear`: `x` `[rows, d_in]`, `w` `[d_out, d_in]`, row-major.
//!
//! Threading: the row-wise products (`y`, `dx`) give each thread one contiguous block of rows and
//! call gemm single-threaded on it (measured 188–207 GFLOP/s on MiniLM's shapes against 153–199
//! for gemm's own split), then run the caller's epilogue (activation, dropout, activation
//! gradient) on that block while it is still in cache: the CPU form of a GEMM epilogue. `dW`
//! reduces over rows, so it keeps gemm's own parallel split. Numerics: f32 accumulation in gemm;
//! `db` sums in f64.

use rayon::prelude::*;

use crate::cpu::fast::matmul::{gemm_parallelism, matmul, MatRef, PARALLEL_GEMM_MIN_WORK};
use crate::error::Result;

/// The caller's epilogue on one block of output rows: `(first row, the block's rows of the
/// product, the same rows of the auxiliary output when there is one)`.
pub type Epilogue<'a> = &'a (dyn Fn(usize, &mut [f32], Option<&mut [f32]>) -> Result<()> + Sync);

/// Rows per block for a row-wise product of `work` multiply-adds over `rows` rows: all rows
/// when the product is too small to share, else one block per thread, a multiple of 16 rows
/// (gemm's micro-kernel height), so no thread gets a ragged tail.
fn rows_per_block(rows: usize, work: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    if work < PARALLEL_GEMM_MIN_WORK || threads == 1 || rows < 32 {
        return rows.max(1);
    }
    rows.div_ceil(threads).div_ceil(16) * 16
}

/// `y = x·Wᵀ + b` with `w: [d_out, d_in]`.
pub fn linear(x: &[f32], w: &[f32], b: Option<&[f32]>, rows: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    linear_epilogue(x, w, b, rows, d_in, d_out, None, None).expect("an epilogue-free product cannot fail")
}

/// `y = x·Wᵀ + b` with `epilogue` applied per row block right after its product; `aux`
/// (`rows × d_out`, e.g. the activation's output when `y` is kept as the pre-activation) is
/// handed to the epilogue block by block.
#[allow(clippy::too_many_arguments)] // the product's shape, plus the epilogue and its output
pub fn linear_epilogue(x: &[f32], w: &[f32], b: Option<&[f32]>, rows: usize, d_in: usize, d_out: usize, aux: Option<&mut [f32]>, epilogue: Option<Epilogue>) -> Result<Vec<f32>> {
    let mut y = crate::cpu::pool::buffer(rows * d_out);
    if rows == 0 || d_out == 0 {
        return Ok(y);
    }
    let block = rows_per_block(rows, rows * d_in * d_out);
    let whole = block >= rows;
    let aux_blocks: Vec<Option<&mut [f32]>> = match aux {
        Some(a) => a.chunks_mut(block * d_out).map(Some).collect(),
        None => (0..rows.div_ceil(block)).map(|_| None).collect(),
    };
    y.par_chunks_mut(block * d_out).zip(aux_blocks).enumerate().try_for_each(|(i, (yb, ab))| -> Result<()> {
        let r0 = i * block;
        let n = yb.len() / d_out;
        // Every element is written: the bias rows, or the product (gemm overwrites, k = 0 aside).
        match b {
            Some(b) => yb.chunks_mut(d_out).for_each(|row| row.copy_from_slice(b)),
            None if d_in == 0 => yb.fill(0.0),
            None => {}
        }
        if d_in > 0 {
            let lhs = MatRef { ptr: x[r0 * d_in..].as_ptr(), row_stride: d_in as isize, col_stride: 1 };
            // Wᵀ[i, o] = w[o, i]: a transposed view, no copy.
            let rhs = MatRef { ptr: w.as_ptr(), row_stride: 1, col_stride: d_in as isize };
            let par = if whole { gemm_parallelism(rows * d_in * d_out) } else { gemm::Parallelism::None };
            // SAFETY: rows r0..r0+n of x (n×d_in), w (d_out×d_in) and the block yb (n×d_out), all
            // row-major and checked by the caller.
            unsafe { matmul(yb.as_mut_ptr(), d_out, b.is_some(), lhs, rhs, n, d_out, d_in, par) };
        }
        match epilogue {
            Some(f) => f(r0, yb, ab),
            None => Ok(()),
        }
    })?;
    Ok(y)
}

/// `dx = dy·W` with `w: [d_out, d_in]`.
pub fn linear_backward_input(dy: &[f32], w: &[f32], rows: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    let mut dx = crate::cpu::pool::buffer(rows * d_in);
    linear_backward_input_into(dy, w, &mut dx, false, rows, d_in, d_out, None).expect("an epilogue-free product cannot fail");
    dx
}

/// `dx = epilogue(dy·W)`, the epilogue applied per row block right after its product.
pub fn linear_backward_input_epilogue(dy: &[f32], w: &[f32], rows: usize, d_in: usize, d_out: usize, epilogue: Option<Epilogue>) -> Result<Vec<f32>> {
    let mut dx = crate::cpu::pool::buffer(rows * d_in);
    linear_backward_input_into(dy, w, &mut dx, false, rows, d_in, d_out, epilogue)?;
    Ok(dx)
}

/// `dx = dy·W`, or `dx += dy·W` when `accumulate` (gemm reads the destination: no second pass),
/// one row block per thread, each followed by `epilogue` on its rows of `dx`.
#[allow(clippy::too_many_arguments)] // the product's shape, plus the destination mode and epilogue
pub fn linear_backward_input_into(dy: &[f32], w: &[f32], dx: &mut [f32], accumulate: bool, rows: usize, d_in: usize, d_out: usize, epilogue: Option<Epilogue>) -> Result<()> {
    if rows == 0 || d_in == 0 {
        return Ok(());
    }
    debug_assert!(dy.len() >= rows * d_out && w.len() >= d_out * d_in && dx.len() >= rows * d_in, "linear_backward_input_into: slices shorter than their shapes");
    let block = rows_per_block(rows, rows * d_in * d_out);
    let whole = block >= rows;
    dx[..rows * d_in].par_chunks_mut(block * d_in).enumerate().try_for_each(|(i, db)| -> Result<()> {
        let r0 = i * block;
        let n = db.len() / d_in;
        if d_out == 0 {
            if !accumulate {
                db.fill(0.0); // an empty sum (k = 0); the product overwrites otherwise
            }
        } else {
            let lhs = MatRef { ptr: dy[r0 * d_out..].as_ptr(), row_stride: d_out as isize, col_stride: 1 };
            let rhs = MatRef { ptr: w.as_ptr(), row_stride: d_in as isize, col_stride: 1 };
            let par = if whole { gemm_parallelism(rows * d_in * d_out) } else { gemm::Parallelism::None };
            // SAFETY: rows r0..r0+n of dy (n×d_out), w (d_out×d_in), the block db (n×d_in), all
            // row-major, lengths checked by the caller.
            unsafe { matmul(db.as_mut_ptr(), d_in, accumulate, lhs, rhs, n, d_in, d_out, par) };
        }
        match epilogue {
            Some(f) => f(r0, db, None),
            None => Ok(()),
        }
    })
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
