//! Dense products: one GEMM description ([`Gemm`]) with cuBLAS/cuBLASLt semantics, and its two
//! executors: [`gemm_host`] on the CPU (the `gemm` crate, rayon) and [`LtGemm`] on the GPU
//! (cuBLASLt through cudarc). The CUDA backend describes every dense product once and hands the
//! description to whichever executor runs it; CI checks the CPU one, a GPU run checks that both agree.
//!
//! # What a [`Gemm`] computes
//!
//! For each batch `i` in `0..batch`, with every matrix **column-major** as in cuBLAS:
//!
//! ```text
//! D_i = act(alpha · op(A_i) · op(B_i) + beta · C_i + bias)      D_i is written over C_i
//! ```
//!
//! - `op(A)` is `m × k`, `op(B)` is `k × n`, `C` and `D` are `m × n`; `op(X)` is `X` or `Xᵀ`
//!   ([`Transpose`]). `A_i` starts `i · stride_a` elements into A's buffer, and likewise for B
//!   and C; element `(r, c)` of a stored matrix is at `r + c · ld`.
//! - `bias` has `m` elements and is broadcast over the `n` columns and over every batch
//!   (cuBLASLt's `CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE` left at its default 0). It is added
//!   *after* `beta · C` and *before* the activation: cuBLASLt documents the epilogue input as
//!   `alpha·op(A)op(B) + beta·C + bias` ("Aux_temp" in its FP8 section) and the bias epilogues
//!   as "apply bias and then ReLU/GELU" (`cublasLtEpilogue_t`).
//! - `act` is the identity ([`Epilogue::None`], [`Epilogue::Bias`]), `max(x, 0)`
//!   ([`Epilogue::ReluBias`]) or cuBLASLt's GELU ([`Epilogue::GeluBias`]), which is the **tanh
//!   approximation** `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` (footnote to
//!   `CUBLASLT_EPILOGUE_GELU_BIAS`). It is *not* BERT's exact `0.5·x·(1 + erf(x/√2))`; the two
//!   differ by up to about 5e-4 (at |x| ≈ 2), so a BERT FFN must not use it where parity with
//!   PyTorch's `gelu` matters.
//! - `beta == 0` means C is **not read** (cuBLAS's rule, "if beta == 0 then C does not have to be
//!   a valid input"): NaN or garbage in C does not reach D. `alpha == 0` still multiplies (NaN or
//!   inf in A or B propagate), as in any fp32 kernel.
//! - `k == 0` is a legal empty sum: `D = act(beta·C + bias)`. `m == 0`, `n == 0` or `batch == 0`
//!   is a no-op that touches no buffer.
//! - Elements of C's buffer outside the `m × n` blocks (padding rows when `ldc > m`, gaps between
//!   batches) are never written.
//!
//! A row-major linear layer `Y[t, out] = X[t, in] · Wᵀ + b` (HF layout, `W` is `[out, in]`) is the
//! column-major product `Yᵀ = W · Xᵀ`, where `Yᵀ`, `W` (as `Wᵀ` stored) and `Xᵀ` are the same bytes:
//!
//! ```
//! use bert_adapters::cuda::gemm::{gemm_host, Epilogue, Gemm, Transpose};
//! let (t, inp, out) = (2, 3, 4);
//! let w: Vec<f32> = (0..out * inp).map(|i| i as f32).collect(); // [out, in] row-major
//! let x = vec![1.0f32; t * inp];                                   // [t, in] row-major
//! let b = vec![0.5f32; out];
//! let mut y = vec![0.0f32; t * out];                               // [t, out] row-major
//! let g = Gemm::new(Transpose::Yes, Transpose::No, out, t, inp).with_epilogue(Epilogue::Bias);
//! gemm_host(&g, &w, &x, &mut y, Some(&b))?;
//! assert_eq!(&y[..out], &[3.5, 12.5, 21.5, 30.5]);
//! # Ok::<(), bert_adapters::Error>(())
//! ```
//!
//! # Precision
//!
//! Inputs, C/D, bias, alpha and beta are f32 and products accumulate in f32. On the GPU the compute
//! type is `CUBLAS_COMPUTE_32F`, never `CUBLAS_COMPUTE_32F_FAST_TF32` (which cudarc's own f32
//! `Matmul` uses): TF32 rounds inputs to 10 mantissa bits and would break fp32 parity with the
//! CPU path. The heuristic is additionally restricted (`CUBLASLT_MATMUL_PREF_IMPL_MASK`) to
//! algorithms whose multiply inputs are fp32, so a library-wide emulation or TF32 setting cannot
//! slip in. [`InputType`] names the element type of A and B so that bf16 inputs (cuBLASLt's
//! `CUDA_R_16BF` A/B with f32 C/D under `CUBLAS_COMPUTE_32F`) can be added without changing the
//! description's shape rules, which are in elements.
//!
//! # Errors
//!
//! [`Gemm::validate`] (called by [`gemm_host`]; [`LtGemm::run`] calls the checks that need no
//! buffer lengths) returns [`Error::Shape`] for dimensions, leading dimensions, strides, buffer
//! lengths and bias presence, and [`Error::Input`] for non-finite `alpha`/`beta` or bad device
//! pointers; every message names the operand and the numbers. Nothing here panics on bad input.


use gemm::Parallelism;
use rayon::prelude::*;

use crate::error::{Error, Result};

const OP: &str = "cuda::gemm";

/// Whether an operand is used as stored (`No`) or transposed (`Yes`): cuBLAS's `CUBLAS_OP_N`/`CUBLAS_OP_T`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transpose {
    No,
    Yes,
}

/// What happens to `alpha·op(A)·op(B) + beta·C` before it is stored (cuBLASLt's epilogues of the
/// same names). Every variant but `None` adds the `m`-element bias, broadcast over columns and
/// batches, before the activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Epilogue {
    /// `CUBLASLT_EPILOGUE_DEFAULT`: no bias, no activation.
    None,
    /// `CUBLASLT_EPILOGUE_BIAS`: `+ bias`.
    Bias,
    /// `CUBLASLT_EPILOGUE_RELU_BIAS`: `max(x + bias, 0)`. On the CPU a NaN stays NaN; what
    /// cuBLASLt's ReLU does with NaN is not documented.
    ReluBias,
    /// `CUBLASLT_EPILOGUE_GELU_BIAS`: the **tanh-approximated** GELU of `x + bias` (see the module
    /// docs); not BERT's erf GELU.
    GeluBias,
}

impl Epilogue {
    /// Whether this epilogue reads a bias vector.
    pub fn needs_bias(self) -> bool {
        !matches!(self, Epilogue::None)
    }
}

/// The element type of A and B. C, D, bias, `alpha`, `beta` and the accumulator are f32 whatever
/// this is. Only `F32` exists today; bf16 inputs are the planned addition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum InputType {
    #[default]
    F32,
}

/// One (strided-batched) GEMM with cuBLASLt semantics; see the module docs for the formula.
///
/// All sizes, leading dimensions and strides are in elements. Build one with [`Gemm::new`] (packed
/// operands, `alpha = 1`, `beta = 0`, one batch, no epilogue) and adjust it with the `with_*`
/// methods or by setting fields; [`Gemm::validate`] checks it against buffer lengths.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub transa: Transpose,
    pub transb: Transpose,
    /// Rows of `op(A)`, C and D; also the bias length.
    pub m: usize,
    /// Columns of `op(B)`, C and D.
    pub n: usize,
    /// Columns of `op(A)` = rows of `op(B)`: the length of each dot product. May be 0.
    pub k: usize,
    pub alpha: f32,
    /// 0 means C is not read.
    pub beta: f32,
    /// Leading dimension of A as stored: at least `max(1, m)` if `transa == No`, else `max(1, k)`.
    pub lda: usize,
    /// Leading dimension of B as stored: at least `max(1, k)` if `transb == No`, else `max(1, n)`.
    pub ldb: usize,
    /// Leading dimension of C (= D): at least `max(1, m)`.
    pub ldc: usize,
    /// Number of products; 0 is a no-op.
    pub batch: usize,
    /// Elements from one batch's A to the next; 0 reuses one A for every batch.
    pub stride_a: usize,
    /// Elements from one batch's B to the next; 0 reuses one B for every batch.
    pub stride_b: usize,
    /// Elements from one batch's C to the next; with more than one batch it must keep the written
    /// blocks apart: `stride_c >= (n - 1)·ldc + m` (so never 0).
    pub stride_c: usize,
    pub epilogue: Epilogue,
    pub inputs: InputType,
}

/// The smallest buffers (in elements) a [`Gemm`] touches: one past the last element of the last
/// batch of each operand, or 0 for an operand it does not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmLengths {
    pub a: usize,
    pub b: usize,
    pub c: usize,
    /// `m` when the epilogue adds a bias, else 0. The bias must have exactly this many elements.
    pub bias: usize,
}

/// Rows and columns of an operand as stored, given its `op` shape.
fn stored(trans: Transpose, op_rows: usize, op_cols: usize) -> (usize, usize) {
    match trans {
        Transpose::No => (op_rows, op_cols),
        Transpose::Yes => (op_cols, op_rows),
    }
}

/// One past the last element of the last batch of a `rows × cols` column-major operand, or
/// `Some(0)` when it has no element; `None` on overflow.
fn extent(rows: usize, cols: usize, ld: usize, stride: usize, batch: usize) -> Option<usize> {
    if rows == 0 || cols == 0 || batch == 0 {
        return Some(0);
    }
    (batch - 1).checked_mul(stride)?.checked_add((cols - 1).checked_mul(ld)?)?.checked_add(rows)
}

fn shape_err<T>(msg: String) -> Result<T> {
    Err(Error::shape(OP, msg))
}

impl Gemm {
    /// `D = op(A)·op(B)` for one batch of packed operands: `lda`, `ldb`, `ldc` are the stored row
    /// counts (at least 1), strides are one packed matrix, `alpha = 1`, `beta = 0`, no epilogue.
    pub fn new(transa: Transpose, transb: Transpose, m: usize, n: usize, k: usize) -> Gemm {
        let (ar, ac) = stored(transa, m, k);
        let (br, bc) = stored(transb, k, n);
        let (lda, ldb, ldc) = (ar.max(1), br.max(1), m.max(1));
        Gemm {
            transa,
            transb,
            m,
            n,
            k,
            alpha: 1.0,
            beta: 0.0,
            lda,
            ldb,
            ldc,
            batch: 1,
            stride_a: lda.saturating_mul(ac),
            stride_b: ldb.saturating_mul(bc),
            stride_c: ldc.saturating_mul(n),
            epilogue: Epilogue::None,
            inputs: InputType::F32,
        }
    }

    /// Sets `alpha` and `beta`.
    pub fn with_scalars(mut self, alpha: f32, beta: f32) -> Gemm {
        self.alpha = alpha;
        self.beta = beta;
        self
    }

    /// Sets the leading dimensions (strides are left as they are).
    pub fn with_ld(mut self, lda: usize, ldb: usize, ldc: usize) -> Gemm {
        self.lda = lda;
        self.ldb = ldb;
        self.ldc = ldc;
        self
    }

    /// Sets the batch count and the per-batch strides.
    pub fn with_batch(mut self, batch: usize, stride_a: usize, stride_b: usize, stride_c: usize) -> Gemm {
        self.batch = batch;
        self.stride_a = stride_a;
        self.stride_b = stride_b;
        self.stride_c = stride_c;
        self
    }

    pub fn with_epilogue(mut self, epilogue: Epilogue) -> Gemm {
        self.epilogue = epilogue;
        self
    }

    /// A as stored: (rows, cols).
    pub fn a_stored(&self) -> (usize, usize) {
        stored(self.transa, self.m, self.k)
    }

    /// B as stored: (rows, cols).
    pub fn b_stored(&self) -> (usize, usize) {
        stored(self.transb, self.k, self.n)
    }

    /// Whether the product touches anything at all.
    fn is_noop(&self) -> bool {
        self.m == 0 || self.n == 0 || self.batch == 0
    }

    /// Every check that needs no buffer length, and the buffer lengths the product needs.
    ///
    /// Checks: `m`, `n`, `k` and `batch` fit cuBLAS's `int`; each leading dimension covers its
    /// operand's stored rows (and is at least 1); leading dimensions and strides fit cuBLASLt's
    /// `int64_t`; C's batches do not overlap; `alpha` and `beta` are finite; the extents do not
    /// overflow.
    pub fn required_lengths(&self) -> Result<GemmLengths> {
        for (name, value) in [("m", self.m), ("n", self.n), ("k", self.k), ("batch", self.batch)] {
            if value > i32::MAX as usize {
                return shape_err(format!("{name} = {value} exceeds cuBLAS's int range (at most {})", i32::MAX));
            }
        }
        for (name, value) in [("alpha", self.alpha), ("beta", self.beta)] {
            if !value.is_finite() {
                return Err(Error::Input(format!("{OP}: {name} must be finite, got {value}")));
            }
        }
        let (ar, ac) = self.a_stored();
        let (br, bc) = self.b_stored();
        let lds = [
            ("A", "lda", self.lda, ar, format!("transa = {:?}, op(A) is m×k = {}×{}", self.transa, self.m, self.k)),
            ("B", "ldb", self.ldb, br, format!("transb = {:?}, op(B) is k×n = {}×{}", self.transb, self.k, self.n)),
            ("C", "ldc", self.ldc, self.m, format!("C is m×n = {}×{}", self.m, self.n)),
        ];
        for (operand, name, ld, rows, what) in lds {
            if ld < rows.max(1) {
                return shape_err(format!("{operand}: {name} = {ld} must be at least max(1, {rows}), the rows of {operand} as stored ({what})"));
            }
            if ld > i64::MAX as usize {
                return shape_err(format!("{operand}: {name} = {ld} exceeds cuBLASLt's int64 range"));
            }
        }
        for (operand, name, stride) in [("A", "stride_a", self.stride_a), ("B", "stride_b", self.stride_b), ("C", "stride_c", self.stride_c)] {
            if self.batch > 1 && stride > i64::MAX as usize {
                return shape_err(format!("{operand}: {name} = {stride} exceeds cuBLASLt's int64 range"));
            }
        }
        let bias = if self.epilogue.needs_bias() { self.m } else { 0 };
        if self.is_noop() {
            return Ok(GemmLengths { a: 0, b: 0, c: 0, bias });
        }
        if self.batch > 1 {
            let Some(block) = (self.n - 1).checked_mul(self.ldc).and_then(|x| x.checked_add(self.m)) else {
                return shape_err(format!("C: (n - 1)·ldc + m overflows usize for n = {}, ldc = {}, m = {}", self.n, self.ldc, self.m));
            };
            if self.stride_c < block {
                return shape_err(format!(
                    "C: stride_c = {} lets the {} batches overlap: it must be at least (n - 1)·ldc + m = {block} \
                     (n = {}, ldc = {}, m = {}); stride 0 broadcasts A or B, never C",
                    self.stride_c, self.batch, self.n, self.ldc, self.m
                ));
            }
        }
        let need = |operand: &str, rows: usize, cols: usize, ld: usize, stride: usize| -> Result<usize> {
            extent(rows, cols, ld, stride, self.batch).map_or_else(
                || shape_err(format!("{operand}: the extent of {} batches of {rows}×{cols} with ld {ld} and stride {stride} overflows usize", self.batch)),
                Ok,
            )
        };
        Ok(GemmLengths {
            a: need("A", ar, ac, self.lda, self.stride_a)?,
            b: need("B", br, bc, self.ldb, self.stride_b)?,
            c: need("C", self.m, self.n, self.ldc, self.stride_c)?,
            bias,
        })
    }

    /// A bias is given exactly when the epilogue adds one.
    fn check_bias_presence(&self, given: bool) -> Result<()> {
        match (self.epilogue.needs_bias(), given) {
            (true, false) => shape_err(format!("bias: epilogue {:?} adds a bias of m = {} elements, but none was given", self.epilogue, self.m)),
            (false, true) => shape_err("bias: a bias was given but epilogue None adds none (use Epilogue::Bias)".into()),
            _ => Ok(()),
        }
    }

    /// Checks the description against buffer lengths (in elements): everything
    /// [`Gemm::required_lengths`] checks, that the last element of the last batch of A, B and C
    /// lies inside its buffer, and that a bias is given exactly when the epilogue needs one, with
    /// exactly `m` elements.
    pub fn validate(&self, a_len: usize, b_len: usize, c_len: usize, bias_len: Option<usize>) -> Result<()> {
        let need = self.required_lengths()?;
        self.check_bias_presence(bias_len.is_some())?;
        let (ar, ac) = self.a_stored();
        let (br, bc) = self.b_stored();
        let fits = [
            ("A", a_len, need.a, ar, ac, "lda", self.lda, "stride_a", self.stride_a),
            ("B", b_len, need.b, br, bc, "ldb", self.ldb, "stride_b", self.stride_b),
            ("C", c_len, need.c, self.m, self.n, "ldc", self.ldc, "stride_c", self.stride_c),
        ];
        for (operand, len, need, rows, cols, ld_name, ld, stride_name, stride) in fits {
            if len < need {
                return shape_err(format!(
                    "{operand}: the buffer has {len} elements but the last element of batch {} is at index {} \
                     ({rows}×{cols} as stored, {ld_name} = {ld}, {stride_name} = {stride}, batch = {})",
                    self.batch - 1,
                    need - 1,
                    self.batch
                ));
            }
        }
        if let Some(len) = bias_len {
            if len != need.bias {
                return shape_err(format!("bias: has {len} elements, expected m = {}", self.m));
            }
        }
        Ok(())
    }
}

// ---- the CPU executor ----------------------------------------------------------------------------

/// Below this many multiply-adds a product runs on one thread (forking costs more than it saves).
const PARALLEL_MIN_WORK: usize = 1 << 18;
/// Below this many elements the epilogue pass runs on one thread.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;

/// `√(2/π)`, the constant of the tanh-approximated GELU.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// cuBLASLt's GELU: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, in f32.
pub fn gelu_tanh(x: f32) -> f32 {
    let inner = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    0.5 * x * (1.0 + inner.tanh())
}

fn relu(x: f32) -> f32 {
    // `f32::max` would turn NaN into 0 and hide it from the non-finite checks downstream.
    if x > 0.0 || x.is_nan() {
        x
    } else {
        0.0
    }
}

/// Runs `g` on the CPU: `c` holds C on entry and D on return. Same semantics as [`LtGemm::run`]
/// (see the module docs), validated first with [`Gemm::validate`].
///
/// Products go to the `gemm` crate (which computes `dst = α·dst + β·lhs·rhs`, so cuBLAS's
/// `beta` becomes its `α` and `alpha` its `β`; `beta == 0` tells it not to read C at all).
/// Batches run in parallel when there are at least as many as rayon threads or each is small;
/// otherwise each product is itself parallel. The epilogue (bias, activation, and `beta·C` when
/// `k == 0`) is one more pass over each batch's block, fused per batch.
pub fn gemm_host(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32], bias: Option<&[f32]>) -> Result<()> {
    g.validate(a.len(), b.len(), c.len(), bias.map(<[f32]>::len))?;
    match g.inputs {
        InputType::F32 => {}
    }
    if g.is_noop() {
        return Ok(());
    }
    let layout = HostLayout::new(g)?;
    let bias = bias.unwrap_or(&[]);
    let work = g.m.saturating_mul(g.n).saturating_mul(g.k.max(1));
    let one_batch_parallel = work >= PARALLEL_MIN_WORK;
    if g.batch == 1 {
        host_batch(g, &layout, a, b, c, bias, 0, one_batch_parallel);
    } else if g.batch >= rayon::current_num_threads() || !one_batch_parallel {
        // stride_c >= (n-1)·ldc + m >= 1 was validated, so each chunk holds its batch's block.
        c.par_chunks_mut(g.stride_c).take(g.batch).enumerate().for_each(|(i, block)| host_batch(g, &layout, a, b, block, bias, i, false));
    } else {
        for (i, block) in c.chunks_mut(g.stride_c).take(g.batch).enumerate() {
            host_batch(g, &layout, a, b, block, bias, i, true);
        }
    }
    Ok(())
}

/// `gemm`'s (column stride, row stride) for `op(A)`, `op(B)` and C, as `isize`.
struct HostLayout {
    lhs: (isize, isize),
    rhs: (isize, isize),
    dst_cs: isize,
}

impl HostLayout {
    fn new(g: &Gemm) -> Result<HostLayout> {
        let ld = |name: &str, v: usize| isize::try_from(v).or_else(|_| shape_err(format!("{name} = {v} does not fit isize")));
        let (lda, ldb, ldc) = (ld("lda", g.lda)?, ld("ldb", g.ldb)?, ld("ldc", g.ldc)?);
        // op(A)[i, l] is A[i + l·lda] (No) or A[l + i·lda] (Yes); op(B)[l, j] likewise with ldb.
        let lhs = match g.transa {
            Transpose::No => (lda, 1),
            Transpose::Yes => (1, lda),
        };
        let rhs = match g.transb {
            Transpose::No => (ldb, 1),
            Transpose::Yes => (1, ldb),
        };
        Ok(HostLayout { lhs, rhs, dst_cs: ldc })
    }
}

/// Batch `i`: the product into `block` (C's buffer from this batch's first element on), then the
/// epilogue pass.
#[allow(clippy::too_many_arguments)] // private; one call per batch from gemm_host
fn host_batch(g: &Gemm, layout: &HostLayout, a: &[f32], b: &[f32], block: &mut [f32], bias: &[f32], i: usize, parallel: bool) {
    if g.k > 0 {
        // k > 0 and the batch is not empty, so A and B have elements and `validate` proved that
        // batch i's A starts at i·stride_a < a.len() (likewise B): the slicing cannot fail.
        let a_batch = &a[i * g.stride_a..];
        let b_batch = &b[i * g.stride_b..];
        let parallelism = if parallel { Parallelism::Rayon(0) } else { Parallelism::None };
        // SAFETY: `validate` checked that the last element of the last batch of A, B and C lies
        // inside its buffer, so every element (r, c) of batch i that gemm reads or writes, at
        // r·row_stride + c·col_stride from these pointers, is inside `a_batch`, `b_batch` and
        // `block` (batch i's C block lies within its chunk because stride_c >= (n-1)·ldc + m).
        // `block` is a unique borrow, so C aliases neither A nor B. With `read_dst == false`
        // (beta == 0) gemm never reads C.
        unsafe {
            gemm::gemm(
                g.m,
                g.n,
                g.k,
                block.as_mut_ptr(),
                layout.dst_cs,
                1,
                g.beta != 0.0,
                a_batch.as_ptr(),
                layout.lhs.0,
                layout.lhs.1,
                b_batch.as_ptr(),
                layout.rhs.0,
                layout.rhs.1,
                g.beta,
                g.alpha,
                false,
                false,
                false,
                parallelism,
            )
        };
    }
    // k == 0: the product is an empty sum, so D = beta·C (C unread when beta == 0).
    let scale_c = (g.k == 0).then_some(g.beta);
    if scale_c.is_none() && !g.epilogue.needs_bias() {
        return;
    }
    let (m, epilogue) = (g.m, g.epilogue);
    let column = |col: &mut [f32]| {
        for (r, x) in col[..m].iter_mut().enumerate() {
            let mut v = match scale_c {
                // beta == 0 (either sign): C is not read, so NaN in it cannot leak.
                Some(0.0) => 0.0,
                Some(beta) => beta * *x,
                None => *x,
            };
            if epilogue.needs_bias() {
                v += bias[r];
            }
            *x = match epilogue {
                Epilogue::None | Epilogue::Bias => v,
                Epilogue::ReluBias => relu(v),
                Epilogue::GeluBias => gelu_tanh(v),
            };
        }
    };
    // Columns start ldc apart and ldc >= m, so the first m elements of each chunk are a column.
    if parallel && m.saturating_mul(g.n) >= PARALLEL_MIN_ELEMENTS {
        block.par_chunks_mut(g.ldc).take(g.n).for_each(column);
    } else {
        block.chunks_mut(g.ldc).take(g.n).for_each(column);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(transa: Transpose, transb: Transpose, m: usize, n: usize, k: usize) -> Gemm {
        Gemm::new(transa, transb, m, n, k)
    }

    /// The error of `r`, which must be `Shape` (or `Input` when `input`), naming `operand`.
    fn expect_err(r: Result<()>, input: bool, operand: &str, numbers: &[&str]) {
        let err = r.expect_err("expected an error");
        let msg = err.to_string();
        match (&err, input) {
            (Error::Shape { .. }, false) | (Error::Input(_), true) => {}
            _ => panic!("wrong error kind: {err:?}"),
        }
        assert!(msg.contains(operand), "message does not name {operand}: {msg}");
        for n in numbers {
            assert!(msg.contains(n), "message does not contain {n}: {msg}");
        }
    }

    #[test]
    fn packed_lengths() {
        let p = g(Transpose::No, Transpose::Yes, 3, 4, 5);
        assert_eq!((p.lda, p.ldb, p.ldc), (3, 4, 3));
        assert_eq!(p.required_lengths().unwrap(), GemmLengths { a: 15, b: 20, c: 12, bias: 0 });
        let p = g(Transpose::Yes, Transpose::No, 3, 4, 5).with_epilogue(Epilogue::GeluBias);
        assert_eq!((p.lda, p.ldb), (5, 5));
        assert_eq!(p.required_lengths().unwrap(), GemmLengths { a: 15, b: 20, c: 12, bias: 3 });
        // Padded, batched, A broadcast: the last element of the last batch, plus one.
        let p = g(Transpose::No, Transpose::No, 3, 4, 5).with_ld(4, 6, 5).with_batch(3, 0, 30, 20);
        assert_eq!(p.required_lengths().unwrap(), GemmLengths { a: 4 * 4 + 3, b: 2 * 30 + 3 * 6 + 5, c: 2 * 20 + 3 * 5 + 3, bias: 0 });
        p.validate(19, 83, 58, None).unwrap();
    }

    #[test]
    fn empty_products_need_no_buffers() {
        for p in [g(Transpose::No, Transpose::No, 0, 4, 5), g(Transpose::No, Transpose::No, 3, 0, 5), g(Transpose::No, Transpose::No, 3, 4, 5).with_batch(0, 0, 0, 0)] {
            assert_eq!(p.required_lengths().unwrap(), GemmLengths { a: 0, b: 0, c: 0, bias: 0 });
            p.validate(0, 0, 0, None).unwrap();
        }
        let p = g(Transpose::No, Transpose::No, 3, 4, 0);
        assert_eq!(p.required_lengths().unwrap(), GemmLengths { a: 0, b: 0, c: 12, bias: 0 });
        p.validate(0, 0, 12, None).unwrap();
    }

    #[test]
    fn every_validation_error() {
        let ok = g(Transpose::No, Transpose::No, 3, 4, 5);
        ok.validate(15, 20, 12, None).unwrap();
        let nn = Transpose::No;
        // Dimensions beyond cuBLAS's int.
        let big = i32::MAX as usize + 1;
        expect_err(g(nn, nn, big, 1, 1).validate(0, 0, 0, None), false, "m", &["2147483648"]);
        expect_err(g(nn, nn, 1, big, 1).validate(0, 0, 0, None), false, "n", &["2147483648"]);
        expect_err(g(nn, nn, 1, 1, big).validate(0, 0, 0, None), false, "k", &["2147483648"]);
        expect_err(ok.with_batch(big, 15, 20, 12).validate(0, 0, 0, None), false, "batch", &["2147483648"]);
        // Leading dimensions below the stored rows.
        expect_err(ok.with_ld(2, 5, 3).validate(15, 20, 12, None), false, "A: lda = 2", &["max(1, 3)"]);
        expect_err(g(Transpose::Yes, nn, 3, 4, 5).with_ld(4, 5, 3).validate(15, 20, 12, None), false, "A: lda = 4", &["max(1, 5)"]);
        expect_err(ok.with_ld(3, 4, 3).validate(15, 20, 12, None), false, "B: ldb = 4", &["max(1, 5)"]);
        expect_err(g(nn, Transpose::Yes, 3, 4, 5).with_ld(3, 3, 3).validate(15, 20, 12, None), false, "B: ldb = 3", &["max(1, 4)"]);
        expect_err(ok.with_ld(3, 5, 2).validate(15, 20, 12, None), false, "C: ldc = 2", &["max(1, 3)"]);
        expect_err(g(nn, nn, 0, 4, 5).with_ld(0, 5, 1).validate(0, 0, 0, None), false, "A: lda = 0", &["max(1, 0)"]);
        // Leading dimension beyond int64.
        expect_err(ok.with_ld(usize::MAX, 5, 3).validate(15, 20, 12, None), false, "A: lda", &["int64"]);
        // Strides: beyond int64, C overlapping (stride 0 included).
        expect_err(ok.with_batch(2, usize::MAX, 20, 12).validate(15, 40, 24, None), false, "A: stride_a", &["int64"]);
        expect_err(ok.with_batch(2, 0, 20, 11).validate(15, 40, 24, None), false, "C: stride_c = 11", &["(n - 1)·ldc + m = 12"]);
        expect_err(ok.with_batch(2, 0, 0, 0).validate(15, 20, 12, None), false, "C: stride_c = 0", &["12"]);
        // Extents overflowing usize.
        let huge = (i64::MAX as usize) / 2;
        expect_err(ok.with_batch(9, huge, 20, 12).validate(15, 180, 108, None), false, "A: the extent", &["overflows"]);
        // Buffers too short: the message gives the length and the last index.
        expect_err(ok.validate(14, 20, 12, None), false, "A: the buffer has 14", &["index 14"]);
        expect_err(ok.validate(15, 19, 12, None), false, "B: the buffer has 19", &["index 19"]);
        expect_err(ok.validate(15, 20, 11, None), false, "C: the buffer has 11", &["index 11"]);
        expect_err(ok.with_batch(2, 15, 20, 12).validate(30, 40, 23, None), false, "C: the buffer has 23", &["batch 1", "index 23"]);
        // Bias: missing, unexpected, wrong length.
        let biased = ok.with_epilogue(Epilogue::ReluBias);
        biased.validate(15, 20, 12, Some(3)).unwrap();
        expect_err(biased.validate(15, 20, 12, None), false, "bias", &["ReluBias", "m = 3"]);
        expect_err(ok.validate(15, 20, 12, Some(3)), false, "bias", &["Epilogue::Bias"]);
        expect_err(biased.validate(15, 20, 12, Some(4)), false, "bias: has 4", &["m = 3"]);
        // Non-finite scalars are input errors.
        expect_err(ok.with_scalars(f32::NAN, 0.0).validate(15, 20, 12, None), true, "alpha", &["NaN"]);
        expect_err(ok.with_scalars(1.0, f32::INFINITY).validate(15, 20, 12, None), true, "beta", &["inf"]);
    }

    #[test]
    fn host_rejects_before_touching_c() {
        let p = g(Transpose::No, Transpose::No, 2, 2, 2).with_scalars(1.0, 1.0);
        let mut c = vec![7.0f32; 3];
        assert!(matches!(gemm_host(&p, &[1.0; 4], &[1.0; 4], &mut c, None), Err(Error::Shape { .. })));
        assert_eq!(c, vec![7.0; 3]);
    }

    #[test]
    fn small_exact_products() {
        // A = [[1, 2], [3, 4]] (column-major [1, 3, 2, 4]), B = [[5, 6], [7, 8]].
        let a = [1.0, 3.0, 2.0, 4.0];
        let b = [5.0, 7.0, 6.0, 8.0];
        let mut c = [f32::NAN; 4];
        gemm_host(&g(Transpose::No, Transpose::No, 2, 2, 2), &a, &b, &mut c, None).unwrap();
        assert_eq!(c, [19.0, 43.0, 22.0, 50.0]);
        // Aᵀ·Bᵀ = (B·A)ᵀ; 0.5·that + 2·C + bias, ReLU.
        let mut c = [1.0, -100.0, 1.0, 1.0];
        let p = g(Transpose::Yes, Transpose::Yes, 2, 2, 2).with_scalars(0.5, 2.0).with_epilogue(Epilogue::ReluBias);
        gemm_host(&p, &a, &b, &mut c, Some(&[1.0, -1.0])).unwrap();
        // Aᵀ = [[1, 3], [2, 4]], Bᵀ = [[5, 7], [6, 8]]: AᵀBᵀ = [[23, 31], [34, 46]].
        assert_eq!(c, [0.5 * 23.0 + 2.0 + 1.0, 0.0, 0.5 * 31.0 + 2.0 + 1.0, 0.5 * 46.0 + 2.0 - 1.0]);
    }

    #[test]
    fn gelu_is_the_tanh_form() {
        assert_eq!(gelu_tanh(0.0), 0.0);
        // Reference values of 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) in f64.
        for (x, want) in [(1.0f32, 0.841_191_990_608_277_f64), (-1.0, -0.158_808_009_391_723), (3.0, 2.996_362_607_918_227)] {
            assert!((gelu_tanh(x) as f64 - want).abs() < 1e-6, "gelu_tanh({x}) = {}", gelu_tanh(x));
        }
        // Not the erf form: gelu_erf(1) = 0.841344746...
        assert!((gelu_tanh(1.0) as f64 - 0.841_344_746_068_543).abs() > 1e-4);
        assert_eq!(relu(-2.0), 0.0);
        assert!(relu(f32::NAN).is_nan());
    }
}
