//! The one matrix-product entry point of the fast path: strided f32 views handed to `gemm`, so
//! transposes and per-head column blocks cost no copies. Layout: operands with any strides; the
//! destination row-major with a leading dimension. Numerics: f32, in gemm's blocked order; products
//! under `PARALLEL_GEMM_MIN_WORK` multiply-adds run on one thread.

use gemm::Parallelism;

/// Below this many multiply-adds a product runs on one thread: forking costs more than it saves.
pub(super) const PARALLEL_GEMM_MIN_WORK: usize = 1 << 18;

pub(super) fn gemm_parallelism(work: usize) -> Parallelism {
    if work >= PARALLEL_GEMM_MIN_WORK {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    }
}

/// A strided view of a row-major-or-not f32 matrix for `gemm`.
#[derive(Clone, Copy)]
pub(super) struct MatRef {
    pub ptr: *const f32,
    pub row_stride: isize,
    pub col_stride: isize,
}

/// `dst[m, n] (row-major, leading dimension ld_dst) = beta_dst·dst + lhs[m,k]·rhs[k,n]`.
///
/// # Safety
/// Every view must cover its `m×k`, `k×n` and `m×n` extent.
#[allow(clippy::too_many_arguments)] // a thin wrapper over gemm's 19-argument entry point
pub(super) unsafe fn matmul(dst: *mut f32, ld_dst: usize, accumulate: bool, lhs: MatRef, rhs: MatRef, m: usize, n: usize, k: usize, par: Parallelism) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        ld_dst as isize,
        accumulate,
        lhs.ptr,
        lhs.col_stride,
        lhs.row_stride,
        rhs.ptr,
        rhs.col_stride,
        rhs.row_stride,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        par,
    )
}
