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
//! Products accumulate in f32 and `alpha`, `beta` and the epilogue are f32 (cuBLASLt's
//! `CUBLAS_COMPUTE_32F` with scale type `CUDA_R_32F`). The element types are one of three
//! combinations, set with [`Gemm::with_types`] and checked against the buffers by every executor:
//!
//! | A, B ([`InputType`]) | C, D and bias ([`OutputType`]) | use |
//! |---|---|---|
//! | f32  | f32  | every product of the f32 pipeline (the default) |
//! | bf16 | f32  | a bf16 product kept in f32 |
//! | bf16 | bf16 | the bf16 activation pipeline: [`linear_bf16io`] |
//! | f16  | f32  | an f16 product kept in f32 |
//! | f16  | f16  | the f16 activation pipeline: [`linear_f16io`] |
//!
//! These are rows of cuBLASLt's "Datatypes Supported" table for `cublasLtMatmul` under
//! `CUBLAS_COMPUTE_32F`; f32 A/B with a 16-bit D, or a D of the other 16-bit type, is not in it
//! and is refused with [`Error::Unsupported`]. The bias has D's type: cuBLASLt's `CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE`
//! defaults to "the same type as the elements of the output matrix (Dtype)", which is what the
//! table lists for these rows, so the descriptor leaves it unset.
//!
//! With f32 inputs the GPU compute type is `CUBLAS_COMPUTE_32F`, never
//! `CUBLAS_COMPUTE_32F_FAST_TF32` (which cudarc's own f32 `Matmul` uses): TF32 rounds inputs to 10
//! mantissa bits and would break fp32 parity with the CPU path. The heuristic is additionally
//! restricted (`CUBLASLT_MATMUL_PREF_IMPL_MASK`) to algorithms whose multiply inputs are fp32, so a
//! library-wide emulation or TF32 setting cannot slip in; with bf16 inputs, to algorithms whose
//! multiply inputs hold bf16 exactly (bf16, TF32 or fp32) and whose accumulator is f32 (plus the
//! f16-inputs flag, which cuBLASLt 13.0 reports for its sm_90 nvjet bf16 kernels: see
//! `impl_mask`; a GPU test checks that bf16 operands keep their range); with f16
//! inputs likewise (f16, TF32 or fp32: TF32 keeps f16's 10 mantissa bits and f32's exponent
//! range, so f16 subnormals too) with an f32 accumulator, never an f16 one.
//!
//! A bf16 or f16 D with an epilogue or `beta != 0` is computed by [`Gpu::gemm`] with an f32 D in
//! a staging buffer and rounded once by a cast kernel: cuBLASLt's own bf16-output epilogues round
//! before the bias and activation and compute them in reduced precision on sm_90 (measured on an
//! H100: up to 3.7 ulp; see `Gpu::gemm_half_staged`); an f16 D takes the same path.
//!
//! bf16 and f16 operands are exact in f32, so a 16-bit product differs from the f32 product of
//! the same (16-bit-valued) operands only by summation order and by the one rounding of D when D
//! is 16-bit. An f16 D is ±inf beyond ±65504 (the f32 result rounded once, as any f16 store).
//! [`gemm_host_typed`] makes that literal: it widens A, B, C and the bias to f32, runs the f32
//! executor (same summation order as [`gemm_host`] on the widened operands) and rounds each
//! written element of D once, to nearest even. On a GPU cuBLASLt converts the f32 result of the
//! epilogue to D's type once; its rounding mode is not documented, so GPU tests hold a bf16 D to
//! twice the error of a plain bf16 (f16) product (`tests/support/bf16.rs`), not to bit equality.
//!
//! # Errors
//!
//! [`Gemm::validate`] (called by [`gemm_host`]; [`LtGemm::run`] calls the checks that need no
//! buffer lengths) returns [`Error::Shape`] for dimensions, leading dimensions, strides, buffer
//! lengths and bias presence, and [`Error::Input`] for non-finite `alpha`/`beta` or bad device
//! pointers; every message names the operand and the numbers. Nothing here panics on bad input.

use std::collections::HashMap;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::cublaslt::result as lt_result;
use cudarc::cublaslt::sys as lt;
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use gemm::Parallelism;
use rayon::prelude::*;

use super::elementwise::LinearDims;
use super::gpu::{DeviceScalar, DeviceView, DeviceViewMut, Gpu};
use super::probe;
use crate::config::Activation;
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

    fn lt(self) -> lt::cublasLtEpilogue_t {
        match self {
            Epilogue::None => lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
            Epilogue::Bias => lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            Epilogue::ReluBias => lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU_BIAS,
            Epilogue::GeluBias => lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS,
        }
    }
}

/// The element type of A and B (`CUDA_R_32F`, `CUDA_R_16BF` or `CUDA_R_16F`). `alpha`, `beta`, the accumulator
/// and the epilogue are f32 whatever this is; see the module docs for the allowed combinations
/// with [`OutputType`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum InputType {
    #[default]
    F32,
    /// bf16 A and B, widened exactly; products accumulate in f32 (`CUBLAS_COMPUTE_32F`).
    BF16,
    /// IEEE f16 A and B, widened exactly; products accumulate in f32 (`CUBLAS_COMPUTE_32F`).
    F16,
}

/// The element type of C, D and the bias (cuBLASLt's Ctype = Dtype, and the bias type it
/// defaults to). A bf16 or f16 D is the f32 result of the epilogue rounded once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OutputType {
    #[default]
    F32,
    BF16,
    F16,
}

impl InputType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            InputType::F32 => 4,
            InputType::BF16 | InputType::F16 => 2,
        }
    }

    fn lt(self) -> lt::cudaDataType {
        match self {
            InputType::F32 => lt::cudaDataType_t::CUDA_R_32F,
            InputType::BF16 => lt::cudaDataType_t::CUDA_R_16BF,
            InputType::F16 => lt::cudaDataType_t::CUDA_R_16F,
        }
    }

    /// `"f32"`, `"bf16"` or `"f16"`.
    pub fn name(self) -> &'static str {
        match self {
            InputType::F32 => "f32",
            InputType::BF16 => "bf16",
            InputType::F16 => "f16",
        }
    }
}

impl OutputType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            OutputType::F32 => 4,
            OutputType::BF16 | OutputType::F16 => 2,
        }
    }

    fn lt(self) -> lt::cudaDataType {
        match self {
            OutputType::F32 => lt::cudaDataType_t::CUDA_R_32F,
            OutputType::BF16 => lt::cudaDataType_t::CUDA_R_16BF,
            OutputType::F16 => lt::cudaDataType_t::CUDA_R_16F,
        }
    }

    /// `"f32"`, `"bf16"` or `"f16"`.
    pub fn name(self) -> &'static str {
        match self {
            OutputType::F32 => "f32",
            OutputType::BF16 => "bf16",
            OutputType::F16 => "f16",
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// An element type a product reads or writes: f32, bf16 or f16. Executors taking typed buffers
/// ([`gemm_host_typed`], [`Gpu::gemm`]) check the buffers' types against the description's
/// [`InputType`] and [`OutputType`] with it. Sealed: only f32, bf16 and f16.
pub trait GemmScalar: DeviceScalar + sealed::Sealed {
    /// The [`InputType`] of A and B stored as this type.
    const INPUT: InputType;
    /// The [`OutputType`] of C, D and the bias stored as this type.
    const OUTPUT: OutputType;
    /// The value, exactly, as f32.
    fn widen(self) -> f32;
    /// `x` rounded to this type (to nearest, ties to even; the identity for f32).
    fn narrow(x: f32) -> Self;
}

impl GemmScalar for f32 {
    const INPUT: InputType = InputType::F32;
    const OUTPUT: OutputType = OutputType::F32;
    fn widen(self) -> f32 {
        self
    }
    fn narrow(x: f32) -> f32 {
        x
    }
}

impl GemmScalar for half::bf16 {
    const INPUT: InputType = InputType::BF16;
    const OUTPUT: OutputType = OutputType::BF16;
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(x: f32) -> half::bf16 {
        half::bf16::from_f32(x)
    }
}

impl GemmScalar for half::f16 {
    const INPUT: InputType = InputType::F16;
    const OUTPUT: OutputType = OutputType::F16;
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(x: f32) -> half::f16 {
        half::f16::from_f32(x)
    }
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
    /// The element type of A and B.
    pub inputs: InputType,
    /// The element type of C, D and the bias.
    pub output: OutputType,
    /// f32 inputs only: let the product round A and B to TF32 (10 explicit mantissa bits, f32's
    /// range) for the tensor cores, accumulating in f32 (`CUBLAS_COMPUTE_32F_FAST_TF32`, and the
    /// algorithms whose multiply inputs are TF32 or fp32); the host executor rounds A and B with
    /// [`round_tf32`]. Off by default: every f32 product is strict fp32 unless asked
    /// ([`Gemm::with_tf32`]).
    pub tf32: bool,
    /// A bf16 or f16 D with an epilogue: let cuBLASLt apply it and write D in its own kernel, as
    /// PyTorch's autocast Linear does (`addmm` → cuBLASLt's bias epilogue), instead of
    /// [`super::Gpu::gemm`]'s staged f32 D rounded once by our cast kernel. One write of D in
    /// 16 bits instead of an f32 D, a cast pass and its read; on sm_90 cuBLASLt rounds before the
    /// bias (up to 1 ulp with a bias, more with `beta·C` or an activation: docs/gpu-log.md
    /// 2026-11-27), which is PyTorch's arithmetic. The host executor rounds once either way. Off
    /// by default ([`Gemm::with_fused_half_epilogue`]).
    pub fused_half_epilogue: bool,
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
            output: OutputType::F32,
            tf32: false,
            fused_half_epilogue: false,
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

    /// Sets the element types of A and B (`inputs`) and of C, D and the bias (`output`); see the
    /// module docs for the combinations that exist.
    pub fn with_types(mut self, inputs: InputType, output: OutputType) -> Gemm {
        self.inputs = inputs;
        self.output = output;
        self
    }

    /// Allows TF32 multiply inputs for this f32 product (see [`Gemm::tf32`]).
    pub fn with_tf32(mut self, on: bool) -> Gemm {
        self.tf32 = on;
        self
    }

    /// Lets cuBLASLt apply a 16-bit D's epilogue itself (see [`Gemm::fused_half_epilogue`]).
    pub fn with_fused_half_epilogue(mut self, on: bool) -> Gemm {
        self.fused_half_epilogue = on;
        self
    }

    /// [`Error::Unsupported`] for element types cuBLASLt has no `CUBLAS_COMPUTE_32F` product for,
    /// and for TF32 with 16-bit inputs (which TF32 holds exactly: nothing to allow).
    fn check_types(&self) -> Result<()> {
        if self.tf32 && self.inputs != InputType::F32 {
            return Err(Error::Unsupported(format!("{OP}: TF32 multiply inputs with A and B in {}: only f32 inputs are rounded to TF32", self.inputs.name())));
        }
        match (self.inputs, self.output) {
            (InputType::F32, OutputType::F32)
            | (InputType::BF16, OutputType::F32)
            | (InputType::BF16, OutputType::BF16)
            | (InputType::F16, OutputType::F32)
            | (InputType::F16, OutputType::F16) => Ok(()),
            (i, o) => Err(Error::Unsupported(format!(
                "{OP}: D (and C, bias) in {} with A and B in {}: cuBLASLt has no such product under CUBLAS_COMPUTE_32F \
                 (a bf16 D needs bf16 A and B, an f16 D f16 A and B; f32 A and B give an f32 D)",
                o.name(),
                i.name()
            ))),
        }
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
    pub(crate) fn is_noop(&self) -> bool {
        self.m == 0 || self.n == 0 || self.batch == 0
    }

    /// Every check that needs no buffer length, and the buffer lengths the product needs.
    ///
    /// Checks: `m`, `n`, `k` and `batch` fit cuBLAS's `int`; each leading dimension covers its
    /// operand's stored rows (and is at least 1); leading dimensions and strides fit cuBLASLt's
    /// `int64_t`; C's batches do not overlap; `alpha` and `beta` are finite; the extents do not
    /// overflow. Element types cuBLASLt has no product for are [`Error::Unsupported`].
    pub fn required_lengths(&self) -> Result<GemmLengths> {
        self.check_types()?;
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

    /// That buffers of `I` (A and B) and `O` (C, D and the bias) are what the description says:
    /// [`Error::Input`] naming the operand otherwise (after [`Error::Unsupported`] for a
    /// combination that does not exist).
    pub fn check_element_types<I: GemmScalar, O: GemmScalar>(&self) -> Result<()> {
        self.check_types()?;
        if I::INPUT != self.inputs {
            return Err(Error::Input(format!(
                "{OP}: A and B: the description says {} (inputs = {:?}) but the buffers hold {}",
                self.inputs.name(),
                self.inputs,
                I::INPUT.name()
            )));
        }
        if O::OUTPUT != self.output {
            return Err(Error::Input(format!(
                "{OP}: C (D) and bias: the description says {} (output = {:?}) but the buffers hold {}",
                self.output.name(),
                self.output,
                O::OUTPUT.name()
            )));
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
/// (see the module docs), validated first with [`Gemm::validate`]. f32 operands only (`g` must
/// have the default types); [`gemm_host_typed`] takes bf16 and f16 ones too.
///
/// Products go to the `gemm` crate (which computes `dst = α·dst + β·lhs·rhs`, so cuBLAS's
/// `beta` becomes its `α` and `alpha` its `β`; `beta == 0` tells it not to read C at all).
/// Batches run in parallel when there are at least as many as rayon threads or each is small;
/// otherwise each product is itself parallel. The epilogue (bias, activation, and `beta·C` when
/// `k == 0`) is one more pass over each batch's block, fused per batch.
pub fn gemm_host(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32], bias: Option<&[f32]>) -> Result<()> {
    gemm_host_typed(g, a, b, c, bias)
}

/// [`gemm_host`] over f32, bf16 or f16 buffers: A and B of `I` (`g.inputs`), C, D and the bias of
/// `O` (`g.output`), checked with [`Gemm::check_element_types`] after [`Gemm::validate`].
///
/// 16-bit operands are widened (exactly) into f32 copies and the f32 executor runs on them, so the
/// summation order is [`gemm_host`]'s on the widened values; a 16-bit D is each written element of
/// that f32 result rounded once to nearest even. Elements of C's buffer outside the product keep
/// their bits, as with f32.
pub fn gemm_host_typed<I: GemmScalar, O: GemmScalar>(g: &Gemm, a: &[I], b: &[I], c: &mut [O], bias: Option<&[O]>) -> Result<()> {
    g.validate(a.len(), b.len(), c.len(), bias.map(<[O]>::len))?;
    g.check_element_types::<I, O>()?;
    if g.is_noop() {
        return Ok(());
    }
    let (mut a, mut b) = (widened(a), widened(b));
    if g.tf32 {
        // What the tensor cores multiply: A and B rounded to TF32 (cuBLASLt's own rounding mode
        // is not documented; GPU tests allow either nearest or truncation).
        a = std::borrow::Cow::Owned(a.iter().map(|&v| round_tf32(v)).collect());
        b = std::borrow::Cow::Owned(b.iter().map(|&v| round_tf32(v)).collect());
    }
    let bias = bias.map(widened);
    if O::OUTPUT == OutputType::F32 {
        let c = bytemuck::try_cast_slice_mut::<O, f32>(c).map_err(|e| Error::internal(format!("{OP}: an f32 C is not an f32 slice: {e}")))?;
        return gemm_host_f32(g, &a, &b, c, bias.as_deref());
    }
    // A narrower D: the f32 result in a widened copy of C (beta·C reads the widened values;
    // with beta == 0 it is not read), then each written element rounded once.
    let mut wide: Vec<f32> = c.iter().map(|&v| v.widen()).collect();
    gemm_host_f32(g, &a, &b, &mut wide, bias.as_deref())?;
    for i in 0..g.batch {
        for j in 0..g.n {
            let start = i * g.stride_c + j * g.ldc;
            for (d, &v) in c[start..start + g.m].iter_mut().zip(&wide[start..start + g.m]) {
                *d = O::narrow(v);
            }
        }
    }
    Ok(())
}

/// `x` rounded to TF32 (f32's sign and exponent, 10 explicit mantissa bits) to nearest, ties away
/// from zero (PTX's `cvt.rna.tf32.f32`): the host executor's model of a [`Gemm::with_tf32`]
/// product's inputs. Infinities and NaN pass through; a value that rounds past f32's largest
/// finite one becomes infinite, as the conversion does.
pub fn round_tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    // Add half of the 13 dropped bits' weight to the magnitude, then drop them.
    f32::from_bits(x.to_bits().wrapping_add(0x1000) & !0x1fff)
}

/// `s` as f32: itself when it is f32, else an exact widened copy.
fn widened<T: GemmScalar>(s: &[T]) -> std::borrow::Cow<'_, [f32]> {
    match bytemuck::try_cast_slice::<T, f32>(s) {
        Ok(f) if T::INPUT == InputType::F32 => std::borrow::Cow::Borrowed(f),
        _ => std::borrow::Cow::Owned(s.iter().map(|&v| v.widen()).collect()),
    }
}

/// The f32 executor, on a validated f32 description.
fn gemm_host_f32(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32], bias: Option<&[f32]>) -> Result<()> {
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

// ---- a bf16 or f16 Linear ------------------------------------------------------------------------

/// `y[rows, d_out] = act(x[rows, d_in]·Wᵀ + b)` with x, `W: [d_out, d_in]` (HF layout), b and y
/// all bf16: the bf16 activation pipeline's Linear. One product ([`Gpu::gemm`]: cuBLASLt on a
/// GPU, [`gemm_host_typed`] on cuda-sim) with bf16 A and B, f32 accumulation, and the bias and
/// activation in its epilogue, in f32; y is that f32 value rounded once to bf16. [`linear_f16io`]
/// is the same in f16; [`linear_16io`] is both. As everywhere
/// here it is the column-major `yᵀ = W·xᵀ` on the same bytes (transa = Yes, m = d_out, n = rows,
/// k = d_in).
///
/// `act` is the epilogue's activation: `None` (the bias alone, or nothing without a bias),
/// [`Activation::Relu`], or [`Activation::GeluNew`], the tanh GELU that cuBLASLt's GELU epilogue
/// computes. BERT's erf [`Activation::Gelu`] and the others have no epilogue and are
/// [`Error::Unsupported`] (apply them as their own pass over the pre-activation), as is an
/// activation without a bias (this crate describes no bias-free activation epilogue).
///
/// Every view must hold exactly its tensor (`x`: rows·d_in, `w`: d_out·d_in, `b`: d_out, `y`:
/// rows·d_out): [`Error::Shape`] naming the operand otherwise; `y` may not overlap an input.
pub fn linear_bf16io(gpu: &Gpu, x: &DeviceView<'_, half::bf16>, w: &DeviceView<'_, half::bf16>, b: Option<&DeviceView<'_, half::bf16>>, dims: LinearDims, act: Option<Activation>, y: &mut DeviceViewMut<'_, half::bf16>) -> Result<()> {
    linear_16io(gpu, x, w, b, dims, act, y)
}

/// [`linear_bf16io`] in f16: x, W, b and y f16, f32 accumulation and epilogue, y rounded once
/// (±inf beyond ±65504).
pub fn linear_f16io(gpu: &Gpu, x: &DeviceView<'_, half::f16>, w: &DeviceView<'_, half::f16>, b: Option<&DeviceView<'_, half::f16>>, dims: LinearDims, act: Option<Activation>, y: &mut DeviceViewMut<'_, half::f16>) -> Result<()> {
    linear_16io(gpu, x, w, b, dims, act, y)
}

/// [`linear_bf16io`] or [`linear_f16io`] by the 16-bit storage `H`; f32 is [`Error::Unsupported`]
/// (the f32 pipeline's Linear is the backend's).
pub fn linear_16io<H: GemmScalar>(gpu: &Gpu, x: &DeviceView<'_, H>, w: &DeviceView<'_, H>, b: Option<&DeviceView<'_, H>>, dims: LinearDims, act: Option<Activation>, y: &mut DeviceViewMut<'_, H>) -> Result<()> {
    linear_16io_with(gpu, x, w, b, dims, act, y, false)
}

/// [`linear_16io`], with the epilogue in cuBLASLt's own kernel when `fused_epilogue` (see
/// [`Gemm::fused_half_epilogue`]: PyTorch's autocast Linear), else staged and rounded once.
#[allow(clippy::too_many_arguments)] // linear_16io's operands and the one choice
pub fn linear_16io_with<H: GemmScalar>(gpu: &Gpu, x: &DeviceView<'_, H>, w: &DeviceView<'_, H>, b: Option<&DeviceView<'_, H>>, dims: LinearDims, act: Option<Activation>, y: &mut DeviceViewMut<'_, H>, fused_epilogue: bool) -> Result<()> {
    let op = match H::INPUT {
        InputType::BF16 => "cuda::linear_bf16io",
        InputType::F16 => "cuda::linear_f16io",
        InputType::F32 => return Err(Error::Unsupported("cuda::linear_16io: f32 x, W and y are not a 16-bit Linear".into())),
    };
    let LinearDims { rows, d_in, d_out } = dims;
    let what = format!("rows = {rows}, d_in = {d_in}, d_out = {d_out}");
    let mul = |a: usize, c: usize| a.checked_mul(c).ok_or_else(|| Error::shape(op, format!("{what}: {a} × {c} overflows usize")));
    let lens = [("x", x.len(), mul(rows, d_in)?, "rows·d_in"), ("W", w.len(), mul(d_out, d_in)?, "d_out·d_in"), ("y", y.len(), mul(rows, d_out)?, "rows·d_out")];
    for (name, got, want, formula) in lens.into_iter().chain(b.map(|b| ("b", b.len(), d_out, "d_out"))) {
        if got != want {
            return Err(Error::shape(op, format!("{name} has {got} elements, expected {formula} = {want} ({what})")));
        }
    }
    let epilogue = match (act, b.is_some()) {
        (None, false) => Epilogue::None,
        (None, true) => Epilogue::Bias,
        (Some(Activation::Relu), true) => Epilogue::ReluBias,
        (Some(Activation::GeluNew), true) => Epilogue::GeluBias,
        (Some(a @ (Activation::Relu | Activation::GeluNew)), false) => {
            return Err(Error::Unsupported(format!("{op}: activation {a:?} without a bias: only the bias + activation epilogues are described (give a zero bias)")));
        }
        (Some(a), _) => {
            return Err(Error::Unsupported(format!(
                "{op}: activation {a:?} has no cuBLASLt epilogue (only Relu and GeluNew, the tanh GELU, do); apply it as its own pass"
            )));
        }
    };
    let g = Gemm::new(Transpose::Yes, Transpose::No, d_out, rows, d_in).with_epilogue(epilogue).with_types(H::INPUT, H::OUTPUT).with_fused_half_epilogue(fused_epilogue);
    gpu.gemm(&g, w, x, y, b)
}

// ---- the GPU executor (cuBLASLt) -------------------------------------------------------------------

/// The cuBLASLt workspace [`LtGemm::new`] allocates for a device of compute capability `major.x`:
/// 32 MiB on Hopper and Blackwell (sm_90 and later), 4 MiB before, the sizes the cuBLAS docs
/// recommend for a user workspace (`cublasSetWorkspace`). Algorithms needing more are not chosen.
pub fn workspace_bytes(compute_capability_major: i32) -> usize {
    if compute_capability_major >= 9 {
        32 << 20
    } else {
        4 << 20
    }
}

/// Whether `libcublasLt` can be loaded (no GPU needed). Cached.
pub fn cublaslt_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    // SAFETY: only dlopens and closes the library; no symbol is called.
    *AVAILABLE.get_or_init(|| catch_unwind(|| unsafe { lt::is_culib_present() }).unwrap_or(false))
}

/// `cublasLtNumericalImplFlags_t` bits (cublasLt.h defines them as macros, cudarc has no constants):
/// the multiply-input kinds with the f16, bf16, TF32 and fp32 ones, and the accumulator kinds with fp32.
const IMPL_FLAGS_OP_INPUT_TYPE_MASK: u64 = 0xff << 16;
const IMPL_FLAGS_INPUT_16F: u64 = 0x01 << 16;
const IMPL_FLAGS_INPUT_16BF: u64 = 0x02 << 16;
const IMPL_FLAGS_INPUT_TF32: u64 = 0x04 << 16;
const IMPL_FLAGS_INPUT_32F: u64 = 0x08 << 16;
const IMPL_FLAGS_ACCUMULATOR_TYPE_MASK: u64 = 0xff << 8;
const IMPL_FLAGS_ACCUMULATOR_32F: u64 = 0x02 << 8;

/// `CUBLASLT_MATMUL_PREF_IMPL_MASK` for `inputs`: the heuristic keeps an algorithm only if all
/// its implementation flags are in the mask. f32 inputs: fp32 multiply inputs only (no TF32, no
/// bf16 emulation). bf16 inputs: any multiply input that holds a bf16 value exactly (bf16 tensor
/// cores, or bf16 converted to TF32 or fp32 for a SIMT fallback, which odd leading dimensions may
/// need), and an fp32 accumulator; and the f16-inputs flag, because cuBLASLt 13.0 reports its
/// sm_90 "nvjet" algorithm (id 66) with that flag whatever the product's types. Seen on an H100
/// (docs/gpu-log.md, 2026-11-27): without it a bf16 product fell back to the older sm90 xmma
/// kernels at 130–165 TFLOP/s where the same shape in f16 ran at 460–660, and the bf16 step
/// took 35.8 ms against f16's 23.8. Under `CUBLAS_COMPUTE_32F` cuBLASLt may not narrow a bf16
/// operand, and `tests/cuda_bf16_gemm.rs` (`bf16_exponent_range`) checks on the GPU that none
/// does (operands at 2^20 and 2^-30, inf and 0 in f16). f16 inputs: f16 tensor cores, or TF32 or
/// fp32 (which hold every f16 value exactly, subnormals included), and an fp32 accumulator:
/// never the f16-accumulating kernels.
fn impl_mask(inputs: InputType, tf32: bool) -> u64 {
    match inputs {
        InputType::F32 if tf32 => !IMPL_FLAGS_OP_INPUT_TYPE_MASK | IMPL_FLAGS_INPUT_TF32 | IMPL_FLAGS_INPUT_32F,
        InputType::F32 => !IMPL_FLAGS_OP_INPUT_TYPE_MASK | IMPL_FLAGS_INPUT_32F,
        InputType::BF16 => {
            !(IMPL_FLAGS_OP_INPUT_TYPE_MASK | IMPL_FLAGS_ACCUMULATOR_TYPE_MASK)
                | IMPL_FLAGS_INPUT_16BF
                | IMPL_FLAGS_INPUT_16F
                | IMPL_FLAGS_INPUT_TF32
                | IMPL_FLAGS_INPUT_32F
                | IMPL_FLAGS_ACCUMULATOR_32F
        }
        InputType::F16 => {
            !(IMPL_FLAGS_OP_INPUT_TYPE_MASK | IMPL_FLAGS_ACCUMULATOR_TYPE_MASK) | IMPL_FLAGS_INPUT_16F | IMPL_FLAGS_INPUT_TF32 | IMPL_FLAGS_INPUT_32F | IMPL_FLAGS_ACCUMULATOR_32F
        }
    }
}

/// Runs `f`, turning a panic inside cudarc (a missing library or symbol) into an error.
fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => Err(Error::Cuda(format!("{what}: cuBLASLt call panicked: {}", probe::panic_message(&*panic)))),
    }
}

/// Runs a destroy call, ignoring its status and any panic (destructors must not panic).
fn quietly(f: impl FnOnce()) {
    let _ = catch_unwind(AssertUnwindSafe(f));
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Entries are inserted whole, so a panic elsewhere cannot leave a half-written one.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn lt_err(what: &'static str) -> impl Fn(lt_result::CublasError) -> Error {
    move |e| Error::Cuda(format!("{what} failed: {:?}", e.0))
}

struct Handle(lt::cublasLtHandle_t);
impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtCreate and destroyed only here.
        quietly(|| {
            let _ = unsafe { lt_result::destroy_handle(self.0) };
        });
    }
}

struct Desc(lt::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: as for Handle.
        quietly(|| {
            let _ = unsafe { lt_result::destroy_matmul_desc(self.0) };
        });
    }
}

struct Layout(lt::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: as for Handle.
        quietly(|| {
            let _ = unsafe { lt_result::destroy_matrix_layout(self.0) };
        });
    }
}

struct Pref(lt::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: as for Handle.
        quietly(|| {
            let _ = unsafe { lt_result::destroy_matmul_pref(self.0) };
        });
    }
}

/// Sets one descriptor attribute from a plain value (cuBLASLt checks the byte size).
macro_rules! set_attr {
    ($setter:path, $obj:expr, $attr:expr, $value:expr, $what:literal) => {{
        let value = $value;
        $setter($obj, $attr, (&value as *const _) as *const c_void, std::mem::size_of_val(&value)).map_err(lt_err($what))
    }};
}

/// The product handed to cuBLASLt: a [`Gemm`] after the `k == 0` rewrite, without the scalars
/// (which the heuristic does not see). Also the algorithm cache's key, with pointer alignments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct LtProblem {
    transa: Transpose,
    transb: Transpose,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    batch: usize,
    stride_a: usize,
    stride_b: usize,
    stride_c: usize,
    epilogue: Epilogue,
    inputs: InputType,
    output: OutputType,
    tf32: bool,
}

impl LtProblem {
    /// `g` without its scalars (the `k == 0` rewrite is the caller's).
    fn of(g: &Gemm) -> LtProblem {
        LtProblem {
            transa: g.transa,
            transb: g.transb,
            m: g.m,
            n: g.n,
            k: g.k,
            lda: g.lda,
            ldb: g.ldb,
            ldc: g.ldc,
            batch: g.batch,
            stride_a: g.stride_a,
            stride_b: g.stride_b,
            stride_c: g.stride_c,
            epilogue: g.epilogue,
            inputs: g.inputs,
            output: g.output,
            tf32: g.tf32,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct AlgoKey {
    problem: LtProblem,
    /// Alignment in bytes (at most 256) of A, B, C and the bias, as given to the heuristic.
    align: [u32; 4],
}

/// Device pointers of one call.
#[derive(Clone, Copy)]
struct LtPointers {
    a: CUdeviceptr,
    b: CUdeviceptr,
    c: CUdeviceptr,
    bias: Option<CUdeviceptr>,
}

/// The largest power of two (at most 256, cuBLASLt's default assumption) dividing `addr` and,
/// when the operand has several batches, its batch stride in bytes (`elem_size` bytes an
/// element): the alignment every batch's matrix has.
fn alignment(addr: CUdeviceptr, stride_elems: usize, batch: usize, elem_size: usize) -> u32 {
    let mut bits = addr;
    if batch > 1 && stride_elems > 0 {
        bits |= (stride_elems as u64).wrapping_mul(elem_size as u64);
    }
    if bits == 0 {
        256
    } else {
        (1u32 << bits.trailing_zeros().min(8)).min(256)
    }
}

/// The environment variable that sets [`AlgoSelection`]: `heuristic` (the default) or `timed`.
pub const GEMM_ALGO_VAR: &str = "BERT_ADAPTERS_GEMM_ALGO";
/// How many of the heuristic's results [`AlgoSelection::Timed`] times.
pub const TIMED_CANDIDATES: usize = 8;
/// Runs per candidate when timing (after one warm-up run).
const TIMED_REPS: usize = 5;

/// How [`LtGemm`] picks an algorithm for a product (shape, types, layout, alignments) it has not
/// run before. Either way the choice is cached, and every candidate is under the same numerical
/// mask (`impl_mask`), so the choice changes speed and summation order, never the precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlgoSelection {
    /// cuBLASLt's heuristic's first result: deterministic for a given GPU and library.
    Heuristic,
    /// The fastest of the heuristic's first [`TIMED_CANDIDATES`] results, each timed once on the
    /// stream at the product's first use (a synchronisation; into a scratch D). During a graph
    /// capture, where nothing may be timed, the heuristic's first. Which algorithm wins can vary
    /// from run to run when two are close, and with it the last bits of the results.
    Timed,
}

impl AlgoSelection {
    /// From [`GEMM_ALGO_VAR`]; unset is [`AlgoSelection::Heuristic`], another value an
    /// [`Error::Input`] naming the variable.
    pub fn from_env() -> Result<AlgoSelection> {
        Ok(probe::env_choice(GEMM_ALGO_VAR, Self::NAMES)?.unwrap_or(AlgoSelection::Heuristic))
    }

    /// `heuristic` or `timed` (as [`GEMM_ALGO_VAR`] spells them).
    pub fn parse(v: &str) -> Result<AlgoSelection> {
        probe::parse_choice(GEMM_ALGO_VAR, v, Self::NAMES)
    }

    const NAMES: &[(&str, AlgoSelection)] = &[("heuristic", AlgoSelection::Heuristic), ("timed", AlgoSelection::Timed)];
}

/// How much [`LtGemm::survey`] looks at: up to `candidates` heuristic results per mask, each
/// timed over `reps` runs after a warm-up run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SurveyOptions {
    pub candidates: usize,
    pub reps: usize,
}

impl Default for SurveyOptions {
    fn default() -> Self {
        SurveyOptions { candidates: 12, reps: 10 }
    }
}

/// One cuBLASLt algorithm as [`LtGemm::survey`] saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct AlgoReport {
    /// Offered under this library's numerical mask (`true`) or with no mask.
    pub masked: bool,
    /// Its place in the heuristic's answer (0: the heuristic's choice).
    pub rank: usize,
    /// Configuration id, tile, stages and numerical implementation flags.
    pub describe: AlgoDescription,
    pub workspace_bytes: usize,
    /// The heuristic's estimate of the waves of thread blocks the product takes.
    pub waves: f32,
    /// Mean time per product in microseconds (`None`: cuBLASLt refused to run it).
    pub micros: Option<f32>,
}

/// What identifies a cuBLASLt algorithm (`CUBLASLT_ALGO_CONFIG_ID`, `..._TILE_ID`,
/// `..._STAGES_ID`) and how it computes (`CUBLASLT_ALGO_CAP_NUMERICAL_IMPL_FLAGS`: the op type
/// in bits 0–7, the accumulator in 8–15, the multiply inputs in 16–23).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AlgoDescription {
    pub id: i32,
    pub tile: u32,
    pub stages: u32,
    pub impl_flags: u64,
}

impl std::fmt::Display for AlgoDescription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let op = match self.impl_flags & 0xff {
            0x01 => "FMA",
            0x02 => "HMMA",
            0x04 => "IMMA",
            0x08 => "DMMA",
            _ => "op?",
        };
        let input = match (self.impl_flags >> 16) & 0xff {
            0x01 => "f16",
            0x02 => "bf16",
            0x04 => "tf32",
            0x08 => "f32",
            _ => "in?",
        };
        let acc = match (self.impl_flags >> 8) & 0xff {
            0x01 => "f16",
            0x02 => "f32",
            _ => "acc?",
        };
        write!(f, "id {} tile {} stages {} ({op}, {input} inputs, {acc} accumulator, flags {:#x})", self.id, self.tile, self.stages, self.impl_flags)
    }
}

/// Reads an algorithm's configuration and capability attributes (zeros where one cannot be read).
fn describe_algo(algo: &lt::cublasLtMatmulAlgo_t) -> AlgoDescription {
    fn config<T: Default + Copy>(algo: &lt::cublasLtMatmulAlgo_t, attr: lt::cublasLtMatmulAlgoConfigAttributes_t) -> T {
        let mut v = T::default();
        let mut written = 0usize;
        // SAFETY: a live algorithm struct; the buffer is the attribute's documented size.
        let _ = unsafe { lt::cublasLtMatmulAlgoConfigGetAttribute(algo, attr, (&mut v as *mut T).cast(), std::mem::size_of::<T>(), &mut written) };
        v
    }
    use lt::cublasLtMatmulAlgoConfigAttributes_t as C;
    let mut impl_flags = 0u64;
    let mut written = 0usize;
    // SAFETY: as above; the flags are a uint64.
    let _ = unsafe {
        lt::cublasLtMatmulAlgoCapGetAttribute(algo, lt::cublasLtMatmulAlgoCapAttributes_t::CUBLASLT_ALGO_CAP_NUMERICAL_IMPL_FLAGS, (&mut impl_flags as *mut u64).cast(), 8, &mut written)
    };
    AlgoDescription { id: config::<i32>(algo, C::CUBLASLT_ALGO_CONFIG_ID), tile: config::<u32>(algo, C::CUBLASLT_ALGO_CONFIG_TILE_ID), stages: config::<u32>(algo, C::CUBLASLT_ALGO_CONFIG_STAGES_ID), impl_flags }
}

/// cuBLASLt bound to one stream: a handle, a workspace and a cache of heuristic results.
///
/// Create one per stream with [`LtGemm::new`] and call [`LtGemm::run`] for every product; it
/// enqueues and never synchronises.
///
/// What it relies on in cuBLASLt (cuBLAS docs, sections `cublasLtMatmul`, `cublasLtEpilogue_t`,
/// `cublasLtMatmulDescAttributes_t`, `cublasLtMatmulPreferenceAttributes_t`,
/// `cublasLtMatrixLayoutAttribute_t`, and cublasLt.h):
/// - `CUBLAS_COMPUTE_32F` with scale type `CUDA_R_32F`; A and B `CUDA_R_32F`, `CUDA_R_16BF` or
///   `CUDA_R_16F`, C and D `CUDA_R_32F`, or A's 16-bit type (the module docs' table); the
///   bias in D's type (`CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE` left at its default). The heuristic
///   is limited through `CUBLASLT_MATMUL_PREF_IMPL_MASK` (see `impl_mask`) to fp32 multiply
///   inputs for f32, and to exact multiply inputs with an fp32 accumulator for bf16 and f16.
/// - In place: C and D are the same pointer with the same layout (`C == D and Cdesc == Ddesc`).
///   `CUBLASLT_MATMUL_DESC_TRANSC` only supports N, which is all `Gemm` describes.
/// - Strided batches: `CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT` and `..._STRIDED_BATCH_OFFSET` on each
///   layout, stride 0 for a broadcast A or B. The bias pointer goes in
///   `CUBLASLT_MATMUL_DESC_BIAS_POINTER`, `..._BIAS_BATCH_STRIDE` stays 0 (one bias for all batches).
/// - Alignment: the heuristic assumes 256-byte-aligned A, B, C and D unless told otherwise
///   (`CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES`, default 256), and reads the bias pointer's
///   alignment from the descriptor. Pointers into the middle of a buffer are common here (views,
///   per-head blocks), so every call reports each operand's real alignment (including its batch
///   stride) and the algorithm cache is keyed by it.
/// - Restrictions: cuBLASLt documents that not every size and configuration has a kernel
///   (e.g. batches above 65535 on many kernels, which it tries to split itself). When the
///   heuristic finds no algorithm for a batched product, `run` falls back to one
///   `cublasLtMatmul` per batch; when a single product has none either (possible for an epilogue
///   on some architectures), it returns [`Error::Unsupported`] naming the problem rather than
///   computing something else.
/// - `k == 0`: rather than hand cuBLASLt an empty dimension, `run` multiplies a zero `m × 1`
///   column by a zero `1 × n` row (both broadcast over batches, from a zero buffer kept here), so
///   the product is exactly 0 and D = act(beta·C + bias) follows from the normal path. The
///   buffer's all-zero bits are zeros of bf16 and f16 too, and twice as many of them.
/// - `beta == 0` must leave C unread; cuBLAS states this for its GEMMs and the GPU test in
///   `tests/gemm.rs` checks it for cuBLASLt with a NaN-filled C.
pub struct LtGemm {
    stream: Arc<CudaStream>,
    handle: Handle,
    workspace: CudaSlice<u8>,
    workspace_bytes: usize,
    /// Heuristic results per problem and alignment; `None` records that there is no algorithm.
    algos: Mutex<HashMap<AlgoKey, Option<lt::cublasLtMatmulAlgo_t>>>,
    /// How a product seen for the first time gets its algorithm.
    selection: AlgoSelection,
    /// Zeros standing in for A and B when k == 0; grown on demand.
    zeros: Mutex<Option<CudaSlice<f32>>>,
}

// SAFETY: cuBLASLt may be called from several host threads with one handle (its thread-safety
// rule is cuBLAS's); every kernel that uses the workspace is enqueued on `stream`, so two calls
// never use it at the same time on the device; the caches are behind mutexes.
unsafe impl Send for LtGemm {}
unsafe impl Sync for LtGemm {}

impl std::fmt::Debug for LtGemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LtGemm").field("workspace_bytes", &self.workspace_bytes).field("cached_algos", &lock(&self.algos).len()).finish()
    }
}

impl LtGemm {
    /// A cuBLASLt handle and a [`workspace_bytes`]-sized workspace for `stream`. An error, not a
    /// panic, when libcublasLt cannot be loaded or the allocation fails.
    pub fn new(stream: Arc<CudaStream>) -> Result<LtGemm> {
        if !cublaslt_available() {
            return Err(Error::Cuda(format!(
                "libcublasLt (CUDA 13) cannot be loaded; LD_LIBRARY_PATH={:?}",
                std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
            )));
        }
        guard("cublasLtCreate", || {
            let ctx = stream.context();
            ctx.bind_to_thread().map_err(|e| Error::Cuda(format!("binding the CUDA context: {e:?}")))?;
            let (major, _) = ctx.compute_capability().map_err(|e| Error::Cuda(format!("reading the compute capability: {e:?}")))?;
            let workspace_bytes = workspace_bytes(major);
            let workspace = stream
                .alloc_zeros::<u8>(workspace_bytes)
                .map_err(|e| Error::Cuda(format!("allocating the {workspace_bytes}-byte cuBLASLt workspace: {e:?}")))?;
            let handle = Handle(lt_result::create_handle().map_err(lt_err("cublasLtCreate"))?);
            let selection = AlgoSelection::from_env()?;
            Ok(LtGemm { stream, handle, workspace, workspace_bytes, algos: Mutex::new(HashMap::new()), selection, zeros: Mutex::new(None) })
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The workspace size in bytes.
    pub fn workspace_bytes(&self) -> usize {
        self.workspace_bytes
    }

    /// How this object picks an algorithm for a product it has not run before.
    pub fn selection(&self) -> AlgoSelection {
        self.selection
    }

    /// Enqueues `g` on this object's stream: C at `c` is overwritten by D (see the module docs).
    /// Checks everything [`Gemm::required_lengths`] checks (the element types included), that a
    /// bias is given exactly when the epilogue needs one, and that the pointers it will use are
    /// non-null and aligned to their element size.
    ///
    /// # Safety
    /// The pointers must be device memory of this stream's context holding at least
    /// [`Gemm::required_lengths`] elements each (`bias`: `m`) of the description's element types
    /// (A and B `g.inputs`, C and the bias `g.output`), valid until the product has run on the
    /// stream; C must not overlap A, B or the bias.
    pub unsafe fn run(&self, g: &Gemm, a: CUdeviceptr, b: CUdeviceptr, c: CUdeviceptr, bias: Option<CUdeviceptr>) -> Result<()> {
        g.required_lengths()?;
        g.check_bias_presence(bias.is_some())?;
        if g.is_noop() {
            return Ok(());
        }
        let (in_size, out_size) = (g.inputs.size(), g.output.size());
        let mut used = vec![("C", c, out_size)];
        if g.k > 0 {
            used.extend([("A", a, in_size), ("B", b, in_size)]);
        }
        used.extend(bias.map(|p| ("bias", p, out_size)));
        for (operand, ptr, size) in used {
            if ptr == 0 || !ptr.is_multiple_of(size as u64) {
                return Err(Error::Input(format!("{OP}: {operand} device pointer {ptr:#x} is null or not {size}-byte aligned")));
            }
        }
        guard("cublasLtMatmul", || {
            self.stream.context().bind_to_thread().map_err(|e| Error::Cuda(format!("binding the CUDA context: {e:?}")))?;
            let problem = LtProblem::of(g);
            let ptrs = LtPointers { a, b, c, bias };
            if g.k > 0 {
                // SAFETY: the caller's contract.
                return unsafe { self.run_problem(&problem, ptrs, g.alpha, g.beta) };
            }
            // k == 0: a zero m×1 column times a zero 1×n row, both broadcast over the batches.
            let mut zeros = lock(&self.zeros);
            let need = g.m.max(g.n);
            if zeros.as_ref().is_none_or(|z| z.len() < need) {
                // The old buffer, if any, is freed in stream order after the work that used it.
                *zeros = Some(self.stream.alloc_zeros::<f32>(need).map_err(|e| Error::Cuda(format!("allocating {need} zeros for k = 0: {e:?}")))?);
            }
            let Some(z) = zeros.as_ref() else {
                return Err(Error::internal("cuda::gemm: the k = 0 zero buffer was not allocated"));
            };
            let (zp, _record) = z.device_ptr(&self.stream);
            let rewritten = LtProblem {
                transa: Transpose::No,
                transb: Transpose::No,
                k: 1,
                lda: g.m.max(1),
                ldb: 1,
                stride_a: 0,
                stride_b: 0,
                ..problem
            };
            // SAFETY: the zero buffer holds max(m, n) elements, what a packed m×1 A and 1×n B
            // read with stride 0; C and the bias are the caller's.
            unsafe { self.run_problem(&rewritten, LtPointers { a: zp, b: zp, ..ptrs }, g.alpha, g.beta) }
        })
    }

    /// The batched product if cuBLASLt has an algorithm for it, else one product per batch.
    unsafe fn run_problem(&self, p: &LtProblem, ptrs: LtPointers, alpha: f32, beta: f32) -> Result<()> {
        // SAFETY (all calls below): the caller's contract on `ptrs` for `p`.
        if let Some(algo) = unsafe { self.algo(p, ptrs)? } {
            return unsafe { self.matmul(p, ptrs, &algo, alpha, beta) };
        }
        let kind = format!("{} × {} → {} (f32 accumulation)", p.inputs.name(), p.inputs.name(), p.output.name());
        if p.batch == 1 {
            return Err(Error::Unsupported(format!("{OP}: cuBLASLt has no {kind} algorithm for {p:?} on this GPU")));
        }
        let single = LtProblem { batch: 1, ..*p };
        let bytes = |elems: usize, i: usize, size: usize| (elems as u64).wrapping_mul(i as u64).wrapping_mul(size as u64);
        let (in_size, out_size) = (p.inputs.size(), p.output.size());
        for i in 0..p.batch {
            let batch_ptrs = LtPointers {
                a: ptrs.a.wrapping_add(bytes(p.stride_a, i, in_size)),
                b: ptrs.b.wrapping_add(bytes(p.stride_b, i, in_size)),
                c: ptrs.c.wrapping_add(bytes(p.stride_c, i, out_size)),
                bias: ptrs.bias,
            };
            let Some(algo) = (unsafe { self.algo(&single, batch_ptrs)? }) else {
                return Err(Error::Unsupported(format!(
                    "{OP}: cuBLASLt has no {kind} algorithm for {p:?} on this GPU, batched or one batch at a time"
                )));
            };
            unsafe { self.matmul(&single, batch_ptrs, &algo, alpha, beta)? };
        }
        Ok(())
    }

    /// Descriptors for `p`: the matmul descriptor (transposes, epilogue, bias pointer) and the
    /// layouts of A, B and C (= D).
    unsafe fn descriptors(&self, p: &LtProblem, bias: Option<CUdeviceptr>) -> Result<(Desc, Layout, Layout, Layout)> {
        use lt::cublasLtMatmulDescAttributes_t as D;
        use lt::cublasLtMatrixLayoutAttribute_t as L;
        let desc = Desc(
            lt_result::create_matmul_desc(
                if p.tf32 { lt::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32 } else { lt::cublasComputeType_t::CUBLAS_COMPUTE_32F },
                lt::cudaDataType_t::CUDA_R_32F,
            )
                .map_err(lt_err("cublasLtMatmulDescCreate"))?,
        );
        let op = |t: Transpose| -> i32 {
            match t {
                Transpose::No => 0,  // CUBLAS_OP_N
                Transpose::Yes => 1, // CUBLAS_OP_T
            }
        };
        // SAFETY: live descriptors; each value has the attribute's documented type.
        unsafe {
            set_attr!(lt_result::set_matmul_desc_attribute, desc.0, D::CUBLASLT_MATMUL_DESC_TRANSA, op(p.transa), "setting TRANSA")?;
            set_attr!(lt_result::set_matmul_desc_attribute, desc.0, D::CUBLASLT_MATMUL_DESC_TRANSB, op(p.transb), "setting TRANSB")?;
            set_attr!(lt_result::set_matmul_desc_attribute, desc.0, D::CUBLASLT_MATMUL_DESC_EPILOGUE, p.epilogue.lt() as u32, "setting EPILOGUE")?;
            if let Some(bias) = bias {
                set_attr!(lt_result::set_matmul_desc_attribute, desc.0, D::CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias, "setting BIAS_POINTER")?;
            }
        }
        let (ar, ac) = stored(p.transa, p.m, p.k);
        let (br, bc) = stored(p.transb, p.k, p.n);
        let layout = |dtype: lt::cudaDataType, rows: usize, cols: usize, ld: usize, stride: usize| -> Result<Layout> {
            let l = Layout(lt_result::create_matrix_layout(dtype, rows as u64, cols as u64, ld as i64).map_err(lt_err("cublasLtMatrixLayoutCreate"))?);
            if p.batch > 1 {
                // SAFETY: a live layout; int32 batch count and int64 stride as documented
                // (both range-checked by `required_lengths`).
                unsafe {
                    set_attr!(lt_result::set_matrix_layout_attribute, l.0, L::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, p.batch as i32, "setting BATCH_COUNT")?;
                    set_attr!(lt_result::set_matrix_layout_attribute, l.0, L::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, stride as i64, "setting STRIDED_BATCH_OFFSET")?;
                }
            }
            Ok(l)
        };
        let a = layout(p.inputs.lt(), ar, ac, p.lda, p.stride_a)?;
        let b = layout(p.inputs.lt(), br, bc, p.ldb, p.stride_b)?;
        let c = layout(p.output.lt(), p.m, p.n, p.ldc, p.stride_c)?;
        Ok((desc, a, b, c))
    }

    /// The alignments (bytes, at most 256) of A, B, C and the bias that the heuristic is told.
    fn alignments(p: &LtProblem, ptrs: LtPointers) -> [u32; 4] {
        let (in_size, out_size) = (p.inputs.size(), p.output.size());
        [
            alignment(ptrs.a, p.stride_a, p.batch, in_size),
            alignment(ptrs.b, p.stride_b, p.batch, in_size),
            alignment(ptrs.c, p.stride_c, p.batch, out_size),
            ptrs.bias.map_or(256, |bias| alignment(bias, 0, 1, out_size)),
        ]
    }

    /// The cached or freshly chosen algorithm for `p` at these pointers' alignments: the
    /// heuristic's first, or with [`AlgoSelection::Timed`] (outside a capture) the fastest of its
    /// first [`TIMED_CANDIDATES`].
    unsafe fn algo(&self, p: &LtProblem, ptrs: LtPointers) -> Result<Option<lt::cublasLtMatmulAlgo_t>> {
        let align = Self::alignments(p, ptrs);
        let key = AlgoKey { problem: *p, align };
        if let Some(hit) = lock(&self.algos).get(&key) {
            return Ok(*hit);
        }
        let timed = self.selection == AlgoSelection::Timed && !self.capturing();
        // SAFETY: descriptors only; the heuristic dereferences no pointer.
        let candidates = unsafe { self.heuristic(p, ptrs.bias, align, Some(impl_mask(p.inputs, p.tf32)), if timed { TIMED_CANDIDATES } else { 1 })? };
        let found = if candidates.len() > 1 {
            // SAFETY: the caller's contract on `ptrs` for `p` (C is not written: the timing runs
            // into a scratch D).
            let times = unsafe { self.time_candidates(p, ptrs, &candidates, TIMED_REPS)? };
            let best = times.iter().enumerate().filter_map(|(i, t)| t.map(|t| (i, t))).min_by(|x, y| x.1.total_cmp(&y.1));
            Some(candidates[best.map_or(0, |(i, _)| i)].algo)
        } else {
            candidates.first().map(|r| r.algo)
        };
        lock(&self.algos).insert(key, found);
        Ok(found)
    }

    /// Whether this object's stream is capturing a graph (timing is not allowed then). An error
    /// reading the status counts as capturing: the heuristic's first choice is always safe.
    fn capturing(&self) -> bool {
        !matches!(self.stream.capture_status(), Ok(cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE))
    }

    /// Up to `count` usable heuristic results for `p` (state success, workspace within ours), best
    /// first as cuBLASLt ranks them, under `mask` (`CUBLASLT_MATMUL_PREF_IMPL_MASK`; `None` leaves
    /// the preference at its default, all algorithms).
    unsafe fn heuristic(&self, p: &LtProblem, bias: Option<CUdeviceptr>, align: [u32; 4], mask: Option<u64>, count: usize) -> Result<Vec<lt::cublasLtMatmulHeuristicResult_t>> {
        // SAFETY: descriptors only; the heuristic dereferences no pointer.
        let (desc, a, b, c) = unsafe { self.descriptors(p, bias)? };
        let pref = Pref(lt_result::create_matmul_pref().map_err(lt_err("cublasLtMatmulPreferenceCreate"))?);
        use lt::cublasLtMatmulPreferenceAttributes_t as P;
        // SAFETY: a live preference; each value has the attribute's documented type.
        unsafe {
            set_attr!(lt_result::set_matmul_pref_attribute, pref.0, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, self.workspace_bytes as u64, "setting MAX_WORKSPACE_BYTES")?;
            set_attr!(lt_result::set_matmul_pref_attribute, pref.0, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align[0], "setting MIN_ALIGNMENT_A_BYTES")?;
            set_attr!(lt_result::set_matmul_pref_attribute, pref.0, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align[1], "setting MIN_ALIGNMENT_B_BYTES")?;
            set_attr!(lt_result::set_matmul_pref_attribute, pref.0, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align[2], "setting MIN_ALIGNMENT_C_BYTES")?;
            set_attr!(lt_result::set_matmul_pref_attribute, pref.0, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align[2], "setting MIN_ALIGNMENT_D_BYTES")?;
            if let Some(mask) = mask {
                set_attr!(lt_result::set_matmul_pref_attribute, pref.0, P::CUBLASLT_MATMUL_PREF_IMPL_MASK, mask, "setting IMPL_MASK")?;
            }
        }
        let count = count.clamp(1, 64);
        // SAFETY: an all-zero heuristic result is a valid value of this plain C struct.
        let mut results: Vec<lt::cublasLtMatmulHeuristicResult_t> = vec![unsafe { std::mem::zeroed() }; count];
        let mut returned: std::ffi::c_int = 0;
        // SAFETY: live handle and descriptors (D's layout is C's: in place); room for `count` results.
        let status = unsafe { lt::cublasLtMatmulAlgoGetHeuristic(self.handle.0, desc.0, a.0, b.0, c.0, c.0, pref.0, count as std::ffi::c_int, results.as_mut_ptr(), &mut returned) };
        match status {
            lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS => {
                results.truncate((returned.max(0) as usize).min(count));
                results.retain(|r| r.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS && r.workspaceSize <= self.workspace_bytes);
                Ok(results)
            }
            lt::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED => Ok(Vec::new()),
            other => Err(Error::Cuda(format!("cublasLtMatmulAlgoGetHeuristic failed: {other:?} for {p:?}"))),
        }
    }

    /// Each candidate's mean time in microseconds over `reps` runs after one warm-up run (`None`
    /// where cuBLASLt refused to run it), with D in a zeroed scratch buffer of C's extent, so the
    /// caller's C is neither read nor written. Synchronises with the stream.
    unsafe fn time_candidates(&self, p: &LtProblem, ptrs: LtPointers, candidates: &[lt::cublasLtMatmulHeuristicResult_t], reps: usize) -> Result<Vec<Option<f32>>> {
        let elems = if p.batch == 0 { 0 } else { (p.batch - 1) * p.stride_c + (p.n.max(1) - 1) * p.ldc + p.m };
        let bytes = (elems * p.output.size()).max(1);
        let scratch = self.stream.alloc_zeros::<u8>(bytes).map_err(|e| Error::Cuda(format!("allocating {bytes} bytes to time cuBLASLt's algorithms: {e:?}")))?;
        let (d, _record) = scratch.device_ptr(&self.stream);
        let timed = LtPointers { c: d, ..ptrs };
        let event = || self.stream.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| Error::Cuda(format!("recording a timing event: {e:?}")));
        let mut times = Vec::with_capacity(candidates.len());
        for r in candidates {
            // SAFETY: the caller's contract on A, B and the bias; D is the scratch of C's extent.
            if unsafe { self.matmul(p, timed, &r.algo, 1.0, 0.0) }.is_err() {
                times.push(None);
                continue;
            }
            let start = event()?;
            let mut ok = true;
            for _ in 0..reps.max(1) {
                // SAFETY: as above.
                ok &= unsafe { self.matmul(p, timed, &r.algo, 1.0, 0.0) }.is_ok();
            }
            let end = event()?;
            let ms = start.elapsed_ms(&end).map_err(|e| Error::Cuda(format!("timing cuBLASLt's algorithms: {e:?}")))?;
            times.push(ok.then_some(ms * 1e3 / reps.max(1) as f32));
        }
        Ok(times)
    }

    /// What cuBLASLt offers for `g` on these operands: up to `options.candidates` heuristic
    /// results under this library's numerical mask and as many with no mask, each described
    /// (configuration id, tile, stages, numerical implementation flags) and timed over
    /// `options.reps` runs into a scratch D. A diagnostic (`CUDA_BENCH_PROFILE=gemm` in
    /// benches/cuda.rs): which algorithm a product gets, and what the others would cost.
    ///
    /// # Safety
    /// As for [`LtGemm::run`]; C is not written (nor read).
    pub unsafe fn survey(&self, g: &Gemm, a: CUdeviceptr, b: CUdeviceptr, c: CUdeviceptr, bias: Option<CUdeviceptr>, options: SurveyOptions) -> Result<Vec<AlgoReport>> {
        g.required_lengths()?;
        g.check_bias_presence(bias.is_some())?;
        if g.is_noop() || g.k == 0 {
            return Ok(Vec::new());
        }
        guard("cuBLASLt survey", || {
            self.stream.context().bind_to_thread().map_err(|e| Error::Cuda(format!("binding the CUDA context: {e:?}")))?;
            let p = LtProblem::of(g);
            let ptrs = LtPointers { a, b, c, bias };
            let align = Self::alignments(&p, ptrs);
            let mut reports = Vec::new();
            for mask in [Some(impl_mask(p.inputs, p.tf32)), None] {
                // SAFETY: the caller's contract (as for `run`); D goes to a scratch buffer.
                let found = unsafe { self.heuristic(&p, bias, align, mask, options.candidates)? };
                let times = unsafe { self.time_candidates(&p, ptrs, &found, options.reps)? };
                for (rank, (r, micros)) in found.iter().zip(times).enumerate() {
                    reports.push(AlgoReport { masked: mask.is_some(), rank, describe: describe_algo(&r.algo), workspace_bytes: r.workspaceSize, waves: r.wavesCount, micros });
                }
            }
            Ok(reports)
        })
    }

    /// One `cublasLtMatmul` call with `algo`, in place on C.
    unsafe fn matmul(&self, p: &LtProblem, ptrs: LtPointers, algo: &lt::cublasLtMatmulAlgo_t, alpha: f32, beta: f32) -> Result<()> {
        // SAFETY: descriptors only.
        let (desc, a, b, c) = unsafe { self.descriptors(p, ptrs.bias)? };
        let (workspace, _record) = self.workspace.device_ptr(&self.stream);
        let dev = |p: CUdeviceptr| p as usize as *const c_void;
        // SAFETY: the caller's contract on the pointers; alpha/beta are host scalars read during
        // the call (CUBLASLT_POINTER_MODE_HOST, the default); the workspace is ours, on this
        // stream, with the size the heuristic was limited to.
        unsafe {
            lt::cublasLtMatmul(
                self.handle.0,
                desc.0,
                (&alpha as *const f32).cast(),
                dev(ptrs.a),
                a.0,
                dev(ptrs.b),
                b.0,
                (&beta as *const f32).cast(),
                dev(ptrs.c),
                c.0,
                dev(ptrs.c) as *mut c_void,
                c.0,
                algo,
                workspace as usize as *mut c_void,
                self.workspace_bytes,
                self.stream.cu_stream() as lt::cudaStream_t,
            )
        }
        .result()
        .map_err(|e| Error::Cuda(format!("cublasLtMatmul failed: {:?} for {p:?}", e.0)))
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
    fn algo_selection_names() {
        assert_eq!(AlgoSelection::parse("heuristic").unwrap(), AlgoSelection::Heuristic);
        assert_eq!(AlgoSelection::parse("timed").unwrap(), AlgoSelection::Timed);
        let e = AlgoSelection::parse("fastest").unwrap_err();
        assert!(matches!(e, Error::Input(_)) && e.to_string().contains(r#"BERT_ADAPTERS_GEMM_ALGO="fastest": expected "heuristic" or "timed""#), "{e}");
    }

    /// The flags decode by cuBLASLt's `cublasLtNumericalImplFlags_t` fields: op type, accumulator,
    /// multiply inputs; what the mask admits for each input type.
    #[test]
    fn algo_descriptions_and_masks() {
        let bf16_tensor_core = 0x02 | IMPL_FLAGS_ACCUMULATOR_32F | IMPL_FLAGS_INPUT_16BF;
        let d = AlgoDescription { id: 66, tile: 20, stages: 35, impl_flags: bf16_tensor_core };
        assert_eq!(d.to_string(), "id 66 tile 20 stages 35 (HMMA, bf16 inputs, f32 accumulator, flags 0x20202)");
        let admits = |inputs: InputType, flags: u64| flags & !impl_mask(inputs, false) == 0;
        assert!(admits(InputType::BF16, bf16_tensor_core));
        // cuBLASLt 13.0's nvjet algorithm as an H100 reported it for a bf16 × bf16 → f32 product.
        assert!(admits(InputType::BF16, 0x10202), "the nvjet algorithm, which reports f16 inputs");
        assert!(!admits(InputType::BF16, 0x02 | (0x01 << 8) | IMPL_FLAGS_INPUT_16BF), "never an f16 accumulator");
        assert!(!admits(InputType::F32, bf16_tensor_core), "f32 products never take bf16 multiply inputs");
        let f16_acc16 = 0x02 | (0x01 << 8) | IMPL_FLAGS_INPUT_16F;
        assert!(!admits(InputType::F16, f16_acc16), "never an f16 accumulator");
        assert!(admits(InputType::F16, 0x02 | IMPL_FLAGS_ACCUMULATOR_32F | IMPL_FLAGS_INPUT_16F));
        assert!(admits(InputType::F32, 0x01 | IMPL_FLAGS_ACCUMULATOR_32F | IMPL_FLAGS_INPUT_32F));
        assert!(!admits(InputType::F32, 0x02 | IMPL_FLAGS_ACCUMULATOR_32F | IMPL_FLAGS_INPUT_TF32), "no TF32 for f32");
        // Asked for (Gemm::with_tf32): TF32 tensor cores, or fp32; never bf16 or f16 inputs.
        let tf32 = |flags: u64| flags & !impl_mask(InputType::F32, true) == 0;
        assert!(tf32(0x02 | IMPL_FLAGS_ACCUMULATOR_32F | IMPL_FLAGS_INPUT_TF32));
        assert!(tf32(0x01 | IMPL_FLAGS_ACCUMULATOR_32F | IMPL_FLAGS_INPUT_32F));
        assert!(!tf32(bf16_tensor_core) && !tf32(0x02 | IMPL_FLAGS_ACCUMULATOR_32F | IMPL_FLAGS_INPUT_16F));
    }

    /// TF32 rounding (the host executor's model of a `with_tf32` product's inputs): 10 explicit
    /// mantissa bits, to nearest with ties away from zero; the range and specials of f32.
    #[test]
    fn tf32_rounding() {
        let ulp = 2f32.powi(-10); // TF32's ulp at 1
        assert_eq!(round_tf32(1.0 + ulp), 1.0 + ulp);
        assert_eq!(round_tf32(1.0 + 0.49 * ulp), 1.0);
        assert_eq!(round_tf32(1.0 + 0.51 * ulp), 1.0 + ulp);
        assert_eq!(round_tf32(1.0 + 0.5 * ulp), 1.0 + ulp, "a tie goes away from zero");
        assert_eq!(round_tf32(-(1.0 + 0.5 * ulp)), -(1.0 + ulp));
        // Subnormals keep f32's range on TF32's grid (steps of 2^13 in the bit pattern): a tie
        // at 1.5 steps goes to 2, the smallest f32 subnormal to 0.
        assert_eq!(round_tf32(f32::from_bits(0x3000)), f32::from_bits(0x4000));
        assert_eq!(round_tf32(f32::from_bits(1)), 0.0);
        assert_eq!(round_tf32(f32::MAX), f32::INFINITY);
        assert!(round_tf32(f32::NAN).is_nan());
        assert_eq!(round_tf32(f32::NEG_INFINITY), f32::NEG_INFINITY);
        assert_eq!(round_tf32(-0.0).to_bits(), (-0.0f32).to_bits());
        // A product with TF32 allowed is the strict product of the rounded inputs, here exactly.
        let (a, b) = ([1.0 + 0.6 * ulp, 3.0], [2.0, 1.0 + 0.3 * ulp]);
        let g = Gemm::new(Transpose::No, Transpose::No, 1, 1, 2).with_tf32(true);
        let mut c = [0f32];
        gemm_host(&g, &a, &b, &mut c, None).unwrap();
        assert_eq!(c[0], (1.0 + ulp) * 2.0 + 3.0);
        let mut strict = [0f32];
        gemm_host(&g.with_tf32(false), &a, &b, &mut strict, None).unwrap();
        assert_ne!(strict[0], c[0]);
        // Only f32 inputs are rounded; with 16-bit ones TF32 is refused.
        let e = Gemm::new(Transpose::No, Transpose::No, 1, 1, 1).with_types(InputType::BF16, OutputType::F32).with_tf32(true).validate(1, 1, 1, None).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
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

    #[test]
    fn element_types() {
        let ok = g(Transpose::Yes, Transpose::No, 3, 4, 5);
        for (i, o) in [(InputType::F32, OutputType::F32), (InputType::BF16, OutputType::F32), (InputType::BF16, OutputType::BF16), (InputType::F16, OutputType::F32), (InputType::F16, OutputType::F16)] {
            ok.with_types(i, o).validate(15, 20, 12, None).unwrap();
        }
        // A 16-bit D needs A and B of the same 16-bit type; f16 and bf16 never mix.
        for (i, o, words) in [
            (InputType::F32, OutputType::F16, "in f16 with A and B in f32"),
            (InputType::BF16, OutputType::F16, "in f16 with A and B in bf16"),
            (InputType::F16, OutputType::BF16, "in bf16 with A and B in f16"),
        ] {
            let e = ok.with_types(i, o).validate(15, 20, 12, None).expect_err(words);
            assert!(matches!(e, Error::Unsupported(_)) && e.to_string().contains(words), "{e}");
        }
        let hf = ok.with_types(InputType::F16, OutputType::F16);
        hf.check_element_types::<half::f16, half::f16>().unwrap();
        let e = hf.check_element_types::<half::bf16, half::f16>().unwrap_err();
        assert!(matches!(e, Error::Input(_)) && e.to_string().contains("A and B: the description says f16") && e.to_string().contains("hold bf16"), "{e}");
        let e = hf.check_element_types::<half::f16, half::bf16>().unwrap_err();
        assert!(matches!(e, Error::Input(_)) && e.to_string().contains("C (D) and bias: the description says f16") && e.to_string().contains("hold bf16"), "{e}");
        assert_eq!((InputType::F16.size(), OutputType::F16.size()), (2, 2));
        // f32 A/B with a bf16 D is not a cuBLASLt product: Unsupported, from every entry point.
        let bad = ok.with_types(InputType::F32, OutputType::BF16);
        for r in [bad.validate(15, 20, 12, None), bad.required_lengths().map(|_| ()), bad.check_element_types::<f32, half::bf16>()] {
            let e = r.expect_err("f32 × f32 → bf16");
            assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
            assert!(e.to_string().contains("D (and C, bias) in bf16 with A and B in f32"), "{e}");
        }
        // Buffers of another type than the description's: an input error naming the operands.
        let bf = ok.with_types(InputType::BF16, OutputType::BF16);
        bf.check_element_types::<half::bf16, half::bf16>().unwrap();
        let e = bf.check_element_types::<f32, half::bf16>().unwrap_err();
        assert!(matches!(e, Error::Input(_)) && e.to_string().contains("A and B: the description says bf16") && e.to_string().contains("hold f32"), "{e}");
        let e = bf.check_element_types::<half::bf16, f32>().unwrap_err();
        assert!(matches!(e, Error::Input(_)) && e.to_string().contains("C (D) and bias: the description says bf16"), "{e}");
        let mut c = [half::bf16::from_f32(7.0); 12];
        assert!(matches!(gemm_host_typed(&ok, &[0.0f32; 15], &[0.0f32; 20], &mut c, None), Err(Error::Unsupported(_) | Error::Input(_))));
        assert_eq!(c, [half::bf16::from_f32(7.0); 12], "nothing written on an error");
        assert_eq!((InputType::BF16.size(), OutputType::BF16.size(), InputType::F32.size(), OutputType::F32.size()), (2, 2, 4, 4));
    }

    #[test]
    fn implementation_masks() {
        // f32: every flag but the multiply-input kinds, and of those fp32 alone.
        let f = impl_mask(InputType::F32, false);
        assert_eq!(f & IMPL_FLAGS_OP_INPUT_TYPE_MASK, 0x08 << 16);
        assert_eq!(f & IMPL_FLAGS_ACCUMULATOR_TYPE_MASK, IMPL_FLAGS_ACCUMULATOR_TYPE_MASK);
        // bf16: bf16, TF32 or fp32 multiply inputs, and the fp16 flag that cuBLASLt 13.0's nvjet
        // kernels report for bf16 products too (not int8: 0x20), fp32 accumulation only.
        let b = impl_mask(InputType::BF16, false);
        assert_eq!(b & IMPL_FLAGS_OP_INPUT_TYPE_MASK, (0x01 | 0x02 | 0x04 | 0x08) << 16);
        assert_eq!(b & IMPL_FLAGS_ACCUMULATOR_TYPE_MASK, 0x02 << 8);
        assert_eq!(b & 0xff, 0xff, "any instruction kind (FMA, HMMA, ...)");
        // f16: f16, TF32 or fp32 multiply inputs (not bf16: 0x02), fp32 accumulation only (not fp16: 0x01 << 8).
        let h = impl_mask(InputType::F16, false);
        assert_eq!(h & IMPL_FLAGS_OP_INPUT_TYPE_MASK, (0x01 | 0x04 | 0x08) << 16);
        assert_eq!(h & IMPL_FLAGS_ACCUMULATOR_TYPE_MASK, 0x02 << 8);
        assert_eq!(h & 0xff, 0xff);
    }

    #[test]
    fn alignment_is_the_weakest_of_pointer_and_stride() {
        assert_eq!(alignment(0x1000, 0, 1, 4), 256);
        assert_eq!(alignment(0x1004, 0, 1, 4), 4);
        assert_eq!(alignment(0x1010, 0, 1, 4), 16);
        assert_eq!(alignment(0x1000, 3, 2, 4), 4); // 12-byte batch stride
        assert_eq!(alignment(0x1000, 3, 2, 2), 2); // 6-byte batch stride of bf16
        assert_eq!(alignment(0x1002, 0, 1, 2), 2);
        assert_eq!(alignment(0x1000, 3, 1, 4), 256); // one batch: the stride is irrelevant
        assert_eq!(alignment(0x1000, 64, 2, 4), 256);
        assert_eq!(alignment(0x1000, 64, 2, 2), 128);
        assert_eq!(workspace_bytes(9), 32 << 20);
        assert_eq!(workspace_bytes(8), 4 << 20);
    }
}
