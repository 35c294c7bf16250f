//! Attention as batched GEMMs ([`AttentionPath::Gemm`]): the same operation as the fused kernels
//! of [`super::attention`] (forward: ctx and the row log-sum-exp; backward: dqkv from the lse,
//! without the forward's ctx), with the `T × T` scores materialised per (batch row, head) so the
//! four products of the forward and backward run on [`Gpu::gemm`] (cuBLASLt tensor cores on a
//! GPU, the CPU GEMM on cuda-sim). For BERT's short sequences (T <= 512) the scores are small
//! (BERT-base 32 × 128: 12.6 MB in bf16), and dense products beat the fused kernels' SIMT dot
//! products several times over. See `kernels/attention.cu`'s "GEMM path" section for the row
//! kernels (algorithm, thread mapping, numerics).
//!
//! Launches (`BH = batch·heads`; every product batched over BH with strides, column-major
//! descriptions of row-major `[T, d]` and `[T, T]` blocks):
//! - forward: `attention_gemm_to_heads` (qkv → Q, K, V as `[3][BH, T, d]`), `S = Q·Kᵀ` (f32),
//!   `attention_gemm_softmax[_dropout]` (P in the activation type, lse), `O = P·V`,
//!   `attention_gemm_from_heads` (O → ctx): 5 launches;
//! - backward: `to_heads` of qkv and of dctx, `S = Q·Kᵀ` and `dP = dO·Vᵀ` (f32),
//!   `attention_gemm_softmax_backward[_dropout]` (P∘M and dS in the activation type),
//!   `dV = (P∘M)ᵀ·dO`, `dQ = scale·dS·K`, `dK = scale·dSᵀ·Q`, `from_heads` → dqkv: 9 launches.
//!
//! Tensor cores ([`AttentionPath::TensorCores`], 16-bit activations, `T <= 128` with `d` 16, 32 or
//! 64, or `T <= 512` with `d` 64; kernels/attention_mma.cu): [`attention_mma_forward`] is the forward
//! in one launch (`attention_mma_forward_dropout_*`, eval at rate 0: S and P·V on mma.sync, the softmax in
//! registers, straight from the packed qkv to ctx and lse), and [`attention_mma_backward`] the
//! backward in two (`attention_mma_backward_scores_dropout_*`: P∘M and dS, in place of the two
//! score products and the row kernel; `attention_mma_backward_grads_*`: dQ, dK, dV straight into
//! the packed dqkv, in place of the layouts and the three products): 1 and 2 launches against 5
//! and 9, without the f32 scores (`BH·T²` and `2·BH·T²` floats) or any layout copy. The same
//! roundings and dropout masks as the GEMM path; where they do not apply, they are the GEMM path.
//!
//! Storage: generic over the activation type `A` (f32, or bf16 / f16 with the `_bf16io` /
//! `_f16io` row kernels, the 16-bit layout kernels and bf16 / f16 GEMM inputs, f32 accumulation,
//! f32 scores and statistics). Scratch comes from
//! the pool ([`Gpu::alloc`]): forward `4·B·T·H` activations + `BH·T²` floats + `BH·T²`
//! activations; backward `8·B·T·H` activations + `2·BH·T²` floats + `2·BH·T²` activations.
//!
//! Dropout on the probabilities is the fused kernels' (the same Philox element mapping, shard
//! offset included, through the same kernel arguments), so both paths drop the same elements.

use cudarc::driver::LaunchConfig;

use super::attention::{byte_range, checked_forward, disjoint_bytes, dropout_args, forward_args, AttentionBackwardSizes, AttentionDims};
use super::elementwise::DeviceDropout;
use super::gemm::{Gemm, GemmScalar, OutputType, Transpose};
use super::gpu::{ActivationScalar, DeviceBuffer, DeviceView, DeviceViewMut, Gpu, GpuKind, KernelArg};
use super::registry::attention::{
    ATTENTION_GEMM_FROM_HEADS_BF16IO, ATTENTION_GEMM_FROM_HEADS_F32, ATTENTION_GEMM_SOFTMAX_BACKWARD_BF16IO,
    ATTENTION_GEMM_SOFTMAX_BACKWARD_DROPOUT_BF16IO, ATTENTION_GEMM_SOFTMAX_BACKWARD_DROPOUT_F32, ATTENTION_GEMM_SOFTMAX_BACKWARD_F32,
    ATTENTION_GEMM_SOFTMAX_BF16IO, ATTENTION_GEMM_SOFTMAX_DROPOUT_BF16IO, ATTENTION_GEMM_SOFTMAX_DROPOUT_F32, ATTENTION_GEMM_SOFTMAX_F32,
    ATTENTION_GEMM_TO_HEADS_BF16IO, ATTENTION_GEMM_TO_HEADS_F32, ATTENTION_GEMM_SOFTMAX_BACKWARD_DROPOUT_F16IO,
    ATTENTION_GEMM_SOFTMAX_BACKWARD_F16IO, ATTENTION_GEMM_SOFTMAX_DROPOUT_F16IO, ATTENTION_GEMM_SOFTMAX_F16IO, ATTENTION_GEMM_FROM_HEADS_X16,
    ATTENTION_GEMM_TO_HEADS_X16, ATTENTION_GEMM_SOFTMAX_F32_T128, ATTENTION_GEMM_SOFTMAX_DROPOUT_F32_T128, ATTENTION_GEMM_SOFTMAX_BACKWARD_F32_T128,
    ATTENTION_GEMM_SOFTMAX_BACKWARD_DROPOUT_F32_T128, ATTENTION_GEMM_SOFTMAX_BF16IO_T128, ATTENTION_GEMM_SOFTMAX_DROPOUT_BF16IO_T128,
    ATTENTION_GEMM_SOFTMAX_BACKWARD_BF16IO_T128, ATTENTION_GEMM_SOFTMAX_BACKWARD_DROPOUT_BF16IO_T128, ATTENTION_GEMM_SOFTMAX_F16IO_T128,
    ATTENTION_GEMM_SOFTMAX_DROPOUT_F16IO_T128, ATTENTION_GEMM_SOFTMAX_BACKWARD_F16IO_T128, ATTENTION_GEMM_SOFTMAX_BACKWARD_DROPOUT_F16IO_T128,
};
use super::registry::attention_mma::{
    ATTENTION_MMA_BACKWARD_GRADS_LONG_BF16IO_D64, ATTENTION_MMA_BACKWARD_GRADS_LONG_F16IO_D64, ATTENTION_MMA_BACKWARD_SCORES_LONG_DROPOUT_BF16IO_D64,
    ATTENTION_MMA_BACKWARD_SCORES_LONG_DROPOUT_F16IO_D64, ATTENTION_MMA_FORWARD_LONG_DROPOUT_BF16IO_D64, ATTENTION_MMA_FORWARD_LONG_DROPOUT_F16IO_D64,
    ATTENTION_MMA_BACKWARD_GRADS_BF16IO_D16, ATTENTION_MMA_BACKWARD_GRADS_BF16IO_D32, ATTENTION_MMA_BACKWARD_GRADS_BF16IO_D64,
    ATTENTION_MMA_BACKWARD_GRADS_F16IO_D16, ATTENTION_MMA_BACKWARD_GRADS_F16IO_D32, ATTENTION_MMA_BACKWARD_GRADS_F16IO_D64,
    ATTENTION_MMA_BACKWARD_SCORES_DROPOUT_BF16IO_D16, ATTENTION_MMA_BACKWARD_SCORES_DROPOUT_BF16IO_D32,
    ATTENTION_MMA_BACKWARD_SCORES_DROPOUT_BF16IO_D64, ATTENTION_MMA_BACKWARD_SCORES_DROPOUT_F16IO_D16,
    ATTENTION_MMA_BACKWARD_SCORES_DROPOUT_F16IO_D32, ATTENTION_MMA_BACKWARD_SCORES_DROPOUT_F16IO_D64, ATTENTION_MMA_FORWARD_DROPOUT_BF16IO_D16,
    ATTENTION_MMA_FORWARD_DROPOUT_BF16IO_D32, ATTENTION_MMA_FORWARD_DROPOUT_BF16IO_D64, ATTENTION_MMA_FORWARD_DROPOUT_F16IO_D16,
    ATTENTION_MMA_FORWARD_DROPOUT_F16IO_D32, ATTENTION_MMA_FORWARD_DROPOUT_F16IO_D64,
};
use super::registry::{KernelName, ScalarType};
use crate::error::{Error, Result};
use crate::tensor::DType;

const OP: &str = "cuda::attention_gemm_forward";
const BWD_OP: &str = "cuda::attention_gemm_backward";

/// The longest sequence the GEMM path takes: the row kernels hold a row of scores in registers,
/// 16 per lane (and [`AttentionPath::auto`] takes it only while the `T × T` scores are small).
pub const GEMM_MAX_SEQ: usize = 512;
/// Warps (rows) per block of the row kernels.
pub const ROW_WARPS: u32 = 8;
/// Threads per block of the layout kernels.
pub const LAYOUT_THREADS: u32 = 256;

/// The environment variable that overrides [`AttentionPath::auto`]: `fused` or `gemm`.
pub const ATTENTION_PATH_VAR: &str = "BERT_ADAPTERS_ATTENTION_PATH";

/// How `attention_packed` and its backward run.
///
/// - `Fused`: the flash-style kernels of [`super::attention`] (online softmax, no `T × T`
///   tensor; the backward reads the forward's ctx).
/// - `Gemm`: this module: the scores as batched GEMMs plus row kernels (same semantics within
///   the fused kernels' tolerances, the same dropout masks; the backward needs no ctx).
/// - `TensorCores`: `Gemm`, with the forward in one tensor-core kernel where it applies
///   ([`attention_mma_forward`]: 16-bit activations, `T <= 128` with `d` 16, 32 or 64, or
///   `T <= 512` with `d` 64), and the backward in two ([`attention_mma_backward`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionPath {
    Fused,
    Gemm,
    TensorCores,
}

impl AttentionPath {
    /// `Gemm` on a GPU while `seq <= GEMM_MAX_SEQ` (the scores fit), `Fused` otherwise and on
    /// cuda-sim (whose fused kernels are what the CPU tests exercise most), unless
    /// [`ATTENTION_PATH_VAR`] says `fused`, `gemm` or `mma` (another value is `Error::Input`).
    /// `mma` ([`AttentionPath::TensorCores`]) is opt-in until a GPU has timed it.
    pub fn auto(gpu: &Gpu, seq: usize) -> Result<AttentionPath> {
        Ok(super::probe::env_choice(ATTENTION_PATH_VAR, Self::NAMES)?.unwrap_or(match gpu.kind() {
            GpuKind::Cuda if seq <= GEMM_MAX_SEQ => AttentionPath::Gemm,
            _ => AttentionPath::Fused,
        }))
    }

    /// `fused`, `gemm` or `mma` (as [`ATTENTION_PATH_VAR`] spells them).
    pub fn parse(v: &str) -> Result<AttentionPath> {
        super::probe::parse_choice(ATTENTION_PATH_VAR, v, Self::NAMES)
    }

    /// Whether the backward is the GEMM path's (it reads the lse, not the forward's ctx).
    pub fn gemm_backward(self) -> bool {
        matches!(self, AttentionPath::Gemm | AttentionPath::TensorCores)
    }

    const NAMES: &[(&str, AttentionPath)] = &[("fused", AttentionPath::Fused), ("gemm", AttentionPath::Gemm), ("mma", AttentionPath::TensorCores)];
}

/// The longest sequence the `_t128` row kernels take (one group of 4 keys a lane).
pub const T128_MAX_SEQ: usize = 128;

/// The row kernels for a storage type and a sequence length: `[softmax, softmax_dropout,
/// backward, backward_dropout]`. Up to [`T128_MAX_SEQ`] the `_t128` ones, which hold one group of
/// 4 keys a lane instead of four and so take fewer registers (more warps an SM); the same
/// arithmetic, so the same bits.
fn kernels(dtype: DType, seq: usize, op: &str) -> Result<[KernelName; 4]> {
    let short = seq <= T128_MAX_SEQ;
    match (dtype, short) {
        (DType::F32, false) => Ok([ATTENTION_GEMM_SOFTMAX_F32, ATTENTION_GEMM_SOFTMAX_DROPOUT_F32, ATTENTION_GEMM_SOFTMAX_BACKWARD_F32, ATTENTION_GEMM_SOFTMAX_BACKWARD_DROPOUT_F32]),
        (DType::BF16, false) => Ok([ATTENTION_GEMM_SOFTMAX_BF16IO, ATTENTION_GEMM_SOFTMAX_DROPOUT_BF16IO, ATTENTION_GEMM_SOFTMAX_BACKWARD_BF16IO, ATTENTION_GEMM_SOFTMAX_BACKWARD_DROPOUT_BF16IO]),
        (DType::F16, false) => Ok([ATTENTION_GEMM_SOFTMAX_F16IO, ATTENTION_GEMM_SOFTMAX_DROPOUT_F16IO, ATTENTION_GEMM_SOFTMAX_BACKWARD_F16IO, ATTENTION_GEMM_SOFTMAX_BACKWARD_DROPOUT_F16IO]),
        (DType::F32, true) => Ok([ATTENTION_GEMM_SOFTMAX_F32_T128, ATTENTION_GEMM_SOFTMAX_DROPOUT_F32_T128, ATTENTION_GEMM_SOFTMAX_BACKWARD_F32_T128, ATTENTION_GEMM_SOFTMAX_BACKWARD_DROPOUT_F32_T128]),
        (DType::BF16, true) => Ok([ATTENTION_GEMM_SOFTMAX_BF16IO_T128, ATTENTION_GEMM_SOFTMAX_DROPOUT_BF16IO_T128, ATTENTION_GEMM_SOFTMAX_BACKWARD_BF16IO_T128, ATTENTION_GEMM_SOFTMAX_BACKWARD_DROPOUT_BF16IO_T128]),
        (DType::F16, true) => Ok([ATTENTION_GEMM_SOFTMAX_F16IO_T128, ATTENTION_GEMM_SOFTMAX_DROPOUT_F16IO_T128, ATTENTION_GEMM_SOFTMAX_BACKWARD_F16IO_T128, ATTENTION_GEMM_SOFTMAX_BACKWARD_DROPOUT_F16IO_T128]),
        (other, _) => Err(Error::Unsupported(format!("{op}: activations in {other}; the GEMM attention kernels take f32, bf16 or f16"))),
    }
}

/// Which way a layout kernel permutes: packed `[B, T, parts·H]` to `parts × [B·heads, T, d]`, or back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    ToHeads,
    FromHeads,
}

impl Layout {
    /// The element kernel for storage type `A` (the 16-bit ones copy bit patterns: bf16 and f16
    /// alike) and the 16-byte-unit kernel, which serves every type.
    fn kernels<A: ActivationScalar>(self) -> (KernelName, KernelName) {
        let half = A::DTYPE != DType::F32;
        match self {
            Layout::ToHeads => (if half { ATTENTION_GEMM_TO_HEADS_BF16IO } else { ATTENTION_GEMM_TO_HEADS_F32 }, ATTENTION_GEMM_TO_HEADS_X16),
            Layout::FromHeads => (if half { ATTENTION_GEMM_FROM_HEADS_BF16IO } else { ATTENTION_GEMM_FROM_HEADS_F32 }, ATTENTION_GEMM_FROM_HEADS_X16),
        }
    }
}

/// Sizes past the shared checks: the row count `B·heads·T` (an int in the row kernels) and the
/// score count `B·heads·T²`.
fn score_sizes(op: &'static str, batch: usize, seq: usize, heads: usize) -> Result<(usize, usize)> {
    if seq > GEMM_MAX_SEQ {
        return Err(Error::shape(op, format!("sequence length {seq} exceeds the GEMM path's {GEMM_MAX_SEQ}")));
    }
    let rows = batch.checked_mul(heads).and_then(|n| n.checked_mul(seq)).filter(|&n| n <= i32::MAX as usize);
    let rows = rows.ok_or_else(|| Error::shape(op, format!("batch {batch} x {heads} heads x seq {seq} rows do not fit in an i32")))?;
    let scores = rows.checked_mul(seq).ok_or_else(|| Error::shape(op, format!("the scores of {rows} rows of {seq} overflow usize")))?;
    Ok((rows, scores))
}

/// The three product shapes, batched over `bh` blocks of row-major `[T, d]` / `[T, T]`
/// matrices (column-major views of the same bytes).
struct Products {
    bh: usize,
    seq: usize,
    d: usize,
}

impl Products {
    /// `S[i][j] = x_i·y_j` (`[T, T]` from two `[T, d]`): `gemm(a = y, b = x)`.
    fn scores<A: GemmScalar>(&self) -> Gemm {
        let (t, d) = (self.seq, self.d);
        Gemm::new(Transpose::Yes, Transpose::No, t, t, d).with_batch(self.bh, t * d, t * d, t * t).with_types(A::INPUT, OutputType::F32)
    }

    /// `O[i][c] = alpha·Σ_j P[i][j]·X[j][c]` (`[T, d]` from `[T, T]` and `[T, d]`): `gemm(a = X, b = P)`.
    fn p_x<A: GemmScalar>(&self, alpha: f32) -> Gemm {
        let (t, d) = (self.seq, self.d);
        Gemm::new(Transpose::No, Transpose::No, d, t, t).with_batch(self.bh, t * d, t * t, t * d).with_scalars(alpha, 0.0).with_types(A::INPUT, A::OUTPUT)
    }

    /// `O[j][c] = alpha·Σ_i P[i][j]·X[i][c]` (`Pᵀ·X`): `gemm(a = X, b = P)`.
    fn pt_x<A: GemmScalar>(&self, alpha: f32) -> Gemm {
        let (t, d) = (self.seq, self.d);
        Gemm::new(Transpose::No, Transpose::Yes, d, t, t).with_batch(self.bh, t * d, t * t, t * d).with_scalars(alpha, 0.0).with_types(A::INPUT, A::OUTPUT)
    }
}

/// The row kernels' grid: (query rows of one (batch row, head) in blocks of [`ROW_WARPS`], heads,
/// batch rows), so a warp reads its (b, h, i) off the block indices instead of dividing a flat
/// row index (two runtime divisions a row fewer). The y and z extents must stay within CUDA's
/// 65535 (an [`Error::Shape`] naming the op otherwise).
fn row_config(op: &'static str, batch: usize, heads: usize, seq: usize) -> Result<LaunchConfig> {
    const MAX_YZ: usize = 65535;
    if heads > MAX_YZ || batch > MAX_YZ {
        return Err(Error::shape(op, format!("{batch} batch rows and {heads} heads: the attention row kernels' grid takes at most {MAX_YZ} of each")));
    }
    Ok(LaunchConfig { grid_dim: (seq.div_ceil(ROW_WARPS as usize) as u32, heads as u32, batch as u32), block_dim: (32, ROW_WARPS, 1), shared_mem_bytes: 0 })
}

/// `[B, T, parts·H]` ↔ `parts × [B·heads, T, d]`, as `direction` says. In 16-byte units
/// (`attention_gemm_{to,from}_heads_x16`) when a head's `d` elements are whole units and both
/// buffers start 16-byte aligned (then every unit is: rows and parts are whole heads), else element
/// by element. The same permutation either way: the same bits.
#[allow(clippy::too_many_arguments)] // the two buffers and the layout's five sizes
fn layout<A: ActivationScalar>(gpu: &Gpu, direction: Layout, out: &DeviceViewMut<A>, input: &DeviceView<A>, batch: usize, seq: usize, hidden: usize, heads: usize, parts: usize) -> Result<()> {
    let want = batch * seq * hidden * parts; // callers checked that it fits
    if out.len() != want || input.len() != want {
        return Err(Error::shape(OP, format!("layout buffers of {} and {} elements, expected {want}", out.len(), input.len())));
    }
    let cfg = LaunchConfig { grid_dim: ((batch * seq) as u32, 1, 1), block_dim: (LAYOUT_THREADS, 1, 1), shared_mem_bytes: 0 };
    let unit = 16 / std::mem::size_of::<A>(); // elements per 16 bytes: 4 (f32) or 8 (16-bit)
    let whole_units = heads > 0 && (hidden / heads).is_multiple_of(unit);
    let aligned = out.device_ptr().is_multiple_of(16) && input.device_ptr().is_multiple_of(16);
    let (elements, x16) = direction.kernels::<A>();
    let (kernel, args) = if whole_units && aligned {
        let bits = |ptr: u64| KernelArg::Pointer { ptr, elem: ScalarType::U32 };
        (x16, [bits(out.device_ptr()), bits(input.device_ptr()), KernelArg::I32(batch as i32), KernelArg::I32(seq as i32), KernelArg::I32((hidden / unit) as i32), KernelArg::I32(heads as i32), KernelArg::I32(parts as i32)])
    } else {
        (elements, [A::act_arg_mut(out), A::act_arg(input), KernelArg::I32(batch as i32), KernelArg::I32(seq as i32), KernelArg::I32(hidden as i32), KernelArg::I32(heads as i32), KernelArg::I32(parts as i32)])
    };
    // SAFETY: both views hold exactly B·T·parts·H elements of A, the kernel's whole index range
    // (block per token, columns below parts·H, or its 16-byte units; the split index is a
    // permutation of it); they are distinct allocations or disjoint slices (callers); the x16
    // kernels read and write whole aligned units of these bytes only.
    unsafe { gpu.launch(kernel, cfg, &args) }
}

/// Attention forward on the GEMM path: writes `ctx` (`[batch, seq, hidden]`) and `lse`
/// (`[batch, heads, seq]`) from the packed `qkv` (`[batch, seq, 3·hidden]`) and the additive
/// `mask_bias` (`[B_mask, seq]`, batch row `b` reading row `b % B_mask`), as
/// [`super::attention::attention_packed_forward`] (and, with `dropout`, its `_dropout` twin, with
/// the same masks). `qkv` and `ctx` are f32, bf16 or f16 (16-bit GEMM inputs, f32 scores and lse).
#[allow(clippy::too_many_arguments)] // the packed attention's operands and its four sizes
pub fn attention_gemm_forward<A: ActivationScalar + GemmScalar>(
    gpu: &Gpu,
    qkv: &DeviceView<A>,
    mask_bias: &DeviceView<f32>,
    ctx: &mut DeviceViewMut<A>,
    lse: &mut DeviceViewMut<f32>,
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    dropout: Option<&DeviceDropout<'_>>,
) -> Result<()> {
    let (AttentionDims { head_dim, mask_rows }, drop) = checked_forward(OP, qkv, mask_bias, ctx, lse, (batch, seq, hidden, heads), dropout)?;
    let (rows, scores) = score_sizes(OP, batch, seq, heads)?;
    let [softmax, softmax_dropout, _, _] = kernels(A::DTYPE, seq, OP)?;
    if batch == 0 || seq == 0 {
        return Ok(());
    }
    let part = batch * seq * hidden;
    let mut heads_qkv: DeviceBuffer<A> = gpu.alloc(3 * part)?;
    layout(gpu, Layout::ToHeads, &heads_qkv.view_mut(), qkv, batch, seq, hidden, heads, 3)?;
    let prod = Products { bh: batch * heads, seq, d: head_dim };
    let mut s = gpu.alloc::<f32>(scores)?;
    let (qh, kh, vh) = (heads_qkv.slice(0..part)?, heads_qkv.slice(part..2 * part)?, heads_qkv.slice(2 * part..3 * part)?);
    gpu.gemm::<A, f32>(&prod.scores::<A>(), &kh, &qh, &mut s.view_mut(), None)?;
    let mut p: DeviceBuffer<A> = gpu.alloc(scores)?;
    let scale = (1.0 / (head_dim as f64).sqrt()) as f32;
    let kernel = if drop.is_some() { softmax_dropout } else { softmax };
    // The row kernel's parameters: p, lse, s, mask_bias, rows, seq, heads, mask_rows, scale (then
    // the dropout policy's); Gpu::launch checks them against kernels/attention.cu.
    let args = [
        A::act_arg_mut(&p.view_mut()),
        lse.arg(),
        s.view().arg(),
        mask_bias.arg(),
        KernelArg::I32(rows as i32),
        KernelArg::I32(seq as i32),
        KernelArg::I32(heads as i32),
        KernelArg::I32(mask_rows as i32),
        KernelArg::F32(scale),
    ];
    let args: Vec<KernelArg> = args.into_iter().chain(drop.into_iter().flatten()).collect();
    // SAFETY: p and s hold B·heads·T² elements, lse B·heads·T (checked), the mask a multiple of
    // T whose row count divides B; the grid covers exactly `rows` warps (the rest return); the
    // outputs (p, lse) alias nothing; the dropout seed buffer holds 2 words.
    unsafe { gpu.launch(kernel, row_config(OP, batch, heads, seq)?, &args)? };
    let mut o: DeviceBuffer<A> = gpu.alloc(part)?;
    gpu.gemm::<A, A>(&prod.p_x::<A>(1.0), &vh, &p.view(), &mut o.view_mut(), None)?;
    layout(gpu, Layout::FromHeads, ctx, &o.view(), batch, seq, hidden, heads, 1)
}

/// The longest sequence the tensor-core kernels take: the GEMM path's (their backward writes its
/// P∘M and dS). Up to [`MMA_KEY_TILE`] keys a warp holds a row tile's scores against every key in
/// registers (head sizes 16, 32 and 64); past it the `_long_` kernels walk key tiles, for a head
/// size of 64 only (kernels/attention_mma.cu).
pub const MMA_MAX_SEQ: usize = GEMM_MAX_SEQ;
/// Keys a tensor-core warp holds at a time (`ATTN_MMA_KEY_TILE`).
pub const MMA_KEY_TILE: usize = 128;
/// Query rows per block of the tensor-core forward (`ATTN_MMA_ROWS`: 4 warps of 16 rows).
const MMA_ROWS: usize = 64;
const MMA_THREADS: u32 = 128;

/// The tensor-core forward kernel for activations in `dtype`, head size `head_dim` and `seq` keys,
/// if there is one: 16-bit storage, and `seq <= MMA_KEY_TILE` with `head_dim` 16, 32 or 64, or
/// `seq <= MMA_MAX_SEQ` with `head_dim` 64. Training and eval alike: eval passes
/// [`rate_zero_dropout`].
fn mma_forward_kernel(dtype: DType, seq: usize, head_dim: usize) -> Option<KernelName> {
    if seq > MMA_MAX_SEQ {
        return None;
    }
    if seq > MMA_KEY_TILE {
        return match (dtype, head_dim) {
            (DType::BF16, 64) => Some(ATTENTION_MMA_FORWARD_LONG_DROPOUT_BF16IO_D64),
            (DType::F16, 64) => Some(ATTENTION_MMA_FORWARD_LONG_DROPOUT_F16IO_D64),
            _ => None,
        };
    }
    Some(match (dtype, head_dim) {
        (DType::BF16, 16) => ATTENTION_MMA_FORWARD_DROPOUT_BF16IO_D16,
        (DType::BF16, 32) => ATTENTION_MMA_FORWARD_DROPOUT_BF16IO_D32,
        (DType::BF16, 64) => ATTENTION_MMA_FORWARD_DROPOUT_BF16IO_D64,
        (DType::F16, 16) => ATTENTION_MMA_FORWARD_DROPOUT_F16IO_D16,
        (DType::F16, 32) => ATTENTION_MMA_FORWARD_DROPOUT_F16IO_D32,
        (DType::F16, 64) => ATTENTION_MMA_FORWARD_DROPOUT_F16IO_D64,
        _ => return None,
    })
}

/// Whether [`attention_mma_forward`] runs its tensor-core kernel for these activations (and
/// not the GEMM forward): 16-bit storage, and `seq <= MMA_KEY_TILE` with a head size of 16, 32 or
/// 64, or `seq <= MMA_MAX_SEQ` with a head size of 64. The
/// launch also needs `qkv` and `ctx` to start 16-byte aligned (pool allocations do).
pub fn attention_mma_forward_applies(dtype: DType, seq: usize, hidden: usize, heads: usize) -> bool {
    heads > 0 && hidden.is_multiple_of(heads) && mma_forward_kernel(dtype, seq, hidden / heads).is_some()
}

/// `(Tp, kt)`: the keys padded to whole 16-key slices, `Tp = ⌈T / 16⌉·16`, and the rows of a key
/// tile, `min(Tp, MMA_KEY_TILE)`.
fn mma_key_rows(seq: usize) -> (usize, usize) {
    let kp = seq.div_ceil(16) * 16;
    (kp, kp.min(MMA_KEY_TILE))
}

/// Dynamic shared memory of a tensor-core forward block, in bytes (kernels/attention_mma.cu's
/// `AttnMmaSmem`): the block's Q rows and a key tile's K rows (`[row][d + 8]`, 16-bit), its Vᵀ
/// (`[d][kt + 8]`) and the whole mask row (f32), for `Tp = ⌈T / 16⌉·16` keys and tiles of
/// `kt = min(Tp, MMA_KEY_TILE)`.
pub fn attention_mma_smem_bytes(seq: usize, head_dim: usize) -> usize {
    let (kp, kt) = mma_key_rows(seq);
    2 * (MMA_ROWS * (head_dim + 8) + kt * (head_dim + 8) + head_dim * (kt + 8)) + 4 * kp
}

/// The launch of a tensor-core attention kernel: grid (⌈T / 64⌉, heads, B), 4 warps a block,
/// `smem` bytes of dynamic shared memory; the y and z extents within CUDA's 65535 (an
/// [`Error::Shape`] naming `op` otherwise).
fn mma_config(op: &'static str, batch: usize, seq: usize, heads: usize, smem: usize) -> Result<LaunchConfig> {
    const MAX_YZ: usize = 65535;
    if heads > MAX_YZ || batch > MAX_YZ {
        return Err(Error::shape(op, format!("{batch} batch rows and {heads} heads: the tensor-core attention's grid takes at most {MAX_YZ} of each")));
    }
    Ok(LaunchConfig { grid_dim: (seq.div_ceil(MMA_ROWS) as u32, heads as u32, batch as u32), block_dim: (MMA_THREADS, 1, 1), shared_mem_bytes: smem as u32 })
}

/// Attention forward with the tensor-core kernel (`attention_mma_forward_dropout_*`,
/// kernels/attention_mma.cu): [`attention_gemm_forward`]'s operation (ctx and lse, the same
/// roundings and dropout masks) in one launch, without the head-layout copies, the f32 scores or
/// P in memory. Where it does not apply ([`attention_mma_forward_applies`], or `qkv` / `ctx` not
/// 16-byte aligned) it runs [`attention_gemm_forward`] itself, so any input the GEMM path takes
/// is taken here.
#[allow(clippy::too_many_arguments)] // the packed attention's operands and its four sizes
pub fn attention_mma_forward<A: ActivationScalar + GemmScalar>(
    gpu: &Gpu,
    qkv: &DeviceView<A>,
    mask_bias: &DeviceView<f32>,
    ctx: &mut DeviceViewMut<A>,
    lse: &mut DeviceViewMut<f32>,
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    dropout: Option<&DeviceDropout<'_>>,
) -> Result<()> {
    let (AttentionDims { head_dim, mask_rows }, drop) = checked_forward(OP, qkv, mask_bias, ctx, lse, (batch, seq, hidden, heads), dropout)?;
    let aligned = qkv.device_ptr().is_multiple_of(16) && ctx.device_ptr().is_multiple_of(16);
    let kernel = mma_forward_kernel(A::DTYPE, seq, head_dim).filter(|_| aligned);
    let Some(kernel) = kernel else {
        return attention_gemm_forward(gpu, qkv, mask_bias, ctx, lse, batch, seq, hidden, heads, dropout);
    };
    if batch == 0 || seq == 0 {
        return Ok(());
    }
    let cfg = mma_config(OP, batch, seq, heads, attention_mma_smem_bytes(seq, head_dim))?;
    let args = forward_args(qkv, mask_bias, ctx, lse, (seq, hidden, heads, mask_rows), head_dim, Some(drop.unwrap_or_else(|| rate_zero_dropout(batch))));
    // SAFETY: qkv holds B·T·3H elements, ctx B·T·H and lse B·heads·T (checked), both 16-byte
    // aligned with H = heads·d and d 16, 32 or 64, so every 16-byte unit of a head's row the kernel
    // loads or 4-byte pair it stores lies inside them and is aligned; the kernel reads rows below
    // T only; the mask holds mask_rows rows of T; the outputs alias nothing (checked); the dropout
    // seed buffer holds 2 words; the shared memory is the kernel's layout for (T, d).
    unsafe { gpu.launch(kernel, cfg, &args) }
}

/// Attention backward on the GEMM path: `dqkv` (`[batch, seq, 3·hidden]`, dQ, dK, dV side by
/// side) from `dctx`, the forward's `qkv`, its `lse` and `mask_bias`, as
/// [`super::attention::attention_packed_backward_dropout_as`] but without the forward's ctx (the
/// softmax Jacobian's row term is `rowsum(P∘dP∘M)`, computed from the recomputed scores). With
/// `dropout` the factors are the forward's. f32, bf16 or f16 storage as [`attention_gemm_forward`].
#[allow(clippy::too_many_arguments)]
pub fn attention_gemm_backward<A: ActivationScalar + GemmScalar>(
    gpu: &Gpu,
    dctx: &DeviceView<A>,
    qkv: &DeviceView<A>,
    lse: &DeviceView<f32>,
    mask_bias: &DeviceView<f32>,
    dqkv: &mut DeviceViewMut<A>,
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    dropout: Option<&DeviceDropout<'_>>,
) -> Result<()> {
    gemm_backward(gpu, dctx, qkv, lse, mask_bias, dqkv, (batch, seq, hidden, heads), dropout, false)
}

/// [`attention_gemm_backward`] on the tensor cores where they apply (kernels/attention_mma.cu: the
/// same conditions as [`attention_mma_forward_applies`], `qkv` and `dctx` 16-byte and `dqkv`
/// 4-byte aligned), in two launches:
/// - `attention_mma_backward_scores_dropout_*` (eval at rate 0) in place of the `S = Q·Kᵀ` and `dP = dO·Vᵀ`
///   products and the softmax row kernel: the same P∘M and dS (the same roundings and dropout
///   masks), without the f32 scores in memory;
/// - `attention_mma_backward_grads_*` in place of the layouts and the dV, dQ, dK products: the
///   products' arithmetic (f32 sums, alpha on the sum, one rounding), from the packed qkv and
///   dctx straight into the packed dqkv.
///
/// Elsewhere it is [`attention_gemm_backward`].
#[allow(clippy::too_many_arguments)]
pub fn attention_mma_backward<A: ActivationScalar + GemmScalar>(
    gpu: &Gpu,
    dctx: &DeviceView<A>,
    qkv: &DeviceView<A>,
    lse: &DeviceView<f32>,
    mask_bias: &DeviceView<f32>,
    dqkv: &mut DeviceViewMut<A>,
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    dropout: Option<&DeviceDropout<'_>>,
) -> Result<()> {
    gemm_backward(gpu, dctx, qkv, lse, mask_bias, dqkv, (batch, seq, hidden, heads), dropout, true)
}

/// The tensor-core backward's kernels, where there are (as [`mma_forward_kernel`]): the scores
/// kernel (eval at [`rate_zero_dropout`]) and the gradient products.
fn mma_backward_kernels(dtype: DType, seq: usize, head_dim: usize) -> Option<(KernelName, KernelName)> {
    if seq > MMA_MAX_SEQ {
        return None;
    }
    if seq > MMA_KEY_TILE {
        return match (dtype, head_dim) {
            (DType::BF16, 64) => Some((ATTENTION_MMA_BACKWARD_SCORES_LONG_DROPOUT_BF16IO_D64, ATTENTION_MMA_BACKWARD_GRADS_LONG_BF16IO_D64)),
            (DType::F16, 64) => Some((ATTENTION_MMA_BACKWARD_SCORES_LONG_DROPOUT_F16IO_D64, ATTENTION_MMA_BACKWARD_GRADS_LONG_F16IO_D64)),
            _ => None,
        };
    }
    Some(match (dtype, head_dim) {
        (DType::BF16, 16) => (ATTENTION_MMA_BACKWARD_SCORES_DROPOUT_BF16IO_D16, ATTENTION_MMA_BACKWARD_GRADS_BF16IO_D16),
        (DType::BF16, 32) => (ATTENTION_MMA_BACKWARD_SCORES_DROPOUT_BF16IO_D32, ATTENTION_MMA_BACKWARD_GRADS_BF16IO_D32),
        (DType::BF16, 64) => (ATTENTION_MMA_BACKWARD_SCORES_DROPOUT_BF16IO_D64, ATTENTION_MMA_BACKWARD_GRADS_BF16IO_D64),
        (DType::F16, 16) => (ATTENTION_MMA_BACKWARD_SCORES_DROPOUT_F16IO_D16, ATTENTION_MMA_BACKWARD_GRADS_F16IO_D16),
        (DType::F16, 32) => (ATTENTION_MMA_BACKWARD_SCORES_DROPOUT_F16IO_D32, ATTENTION_MMA_BACKWARD_GRADS_F16IO_D32),
        (DType::F16, 64) => (ATTENTION_MMA_BACKWARD_SCORES_DROPOUT_F16IO_D64, ATTENTION_MMA_BACKWARD_GRADS_F16IO_D64),
        _ => return None,
    })
}

/// The dropout arguments of rate 0 for `batch` rows (no seed buffer, threshold 0, every factor 1):
/// the tensor-core kernels' eval, the same bits as an eval kernel would give (p·1 is p).
fn rate_zero_dropout(batch: usize) -> [KernelArg; 9] {
    [
        KernelArg::Null,
        KernelArg::U32(0),
        KernelArg::U32(0),
        KernelArg::U64(0),
        KernelArg::U64(0),
        KernelArg::I32(i32::try_from(batch.max(1)).unwrap_or(i32::MAX)),
        KernelArg::U32(0),
        KernelArg::F32(1.0),
        KernelArg::U64(0),
    ]
}

/// Dynamic shared memory of a tensor-core gradient-products block, in bytes: in one key tile
/// (`T <= MMA_KEY_TILE`) Kᵀ, Qᵀ and dOᵀ as `[d][Tp + 8]` 16-bit rows (51 KiB at d = 64, T = 128:
/// opted in); past it one such tile at a time (17 KiB at d = 64).
pub fn attention_mma_backward_grads_smem_bytes(seq: usize, head_dim: usize) -> usize {
    let (kp, kt) = mma_key_rows(seq);
    let slots = if kp == kt { 3 } else { 1 };
    slots * 2 * head_dim * (kt + 8)
}

/// Dynamic shared memory of a tensor-core backward-scores block, in bytes: a key tile's K and V
/// rows (`[row][d + 8]`, 16-bit) and the whole mask row (f32), `Tp` and `kt` as in
/// [`attention_mma_smem_bytes`].
pub fn attention_mma_backward_smem_bytes(seq: usize, head_dim: usize) -> usize {
    let (kp, kt) = mma_key_rows(seq);
    4 * kt * (head_dim + 8) + 4 * kp
}

#[allow(clippy::too_many_arguments)] // attention_gemm_backward's operands, and the tensor-core choice
fn gemm_backward<A: ActivationScalar + GemmScalar>(
    gpu: &Gpu,
    dctx: &DeviceView<A>,
    qkv: &DeviceView<A>,
    lse: &DeviceView<f32>,
    mask_bias: &DeviceView<f32>,
    dqkv: &mut DeviceViewMut<A>,
    (batch, seq, hidden, heads): (usize, usize, usize, usize),
    dropout: Option<&DeviceDropout<'_>>,
    tensor_cores: bool,
) -> Result<()> {
    let sizes = AttentionBackwardSizes {
        batch,
        seq,
        hidden,
        heads,
        dctx: dctx.len(),
        qkv: qkv.len(),
        // No ctx on this path: the shared check gets its expected length, so dctx is what it judges.
        ctx: batch.checked_mul(seq).and_then(|n| n.checked_mul(hidden)).unwrap_or(dctx.len()),
        lse: lse.len(),
        mask: mask_bias.len(),
        dqkv: dqkv.len(),
        workspace: None,
    };
    let AttentionDims { head_dim, mask_rows } = sizes.check()?;
    let (rows, scores) = score_sizes(BWD_OP, batch, seq, heads)?;
    let [_, _, backward, backward_dropout] = kernels(A::DTYPE, seq, BWD_OP)?;
    let out = byte_range::<A>(dqkv.device_ptr(), dqkv.len());
    let inputs = [("dctx", byte_range::<A>(dctx.device_ptr(), dctx.len())), ("qkv", byte_range::<A>(qkv.device_ptr(), qkv.len())), ("lse", byte_range::<f32>(lse.device_ptr(), lse.len())), ("mask_bias", byte_range::<f32>(mask_bias.device_ptr(), mask_bias.len()))];
    for (name, r) in inputs {
        disjoint_bytes(("dqkv", name), out, r).map_err(|_| Error::Input(format!("{BWD_OP}: dqkv overlaps {name}; the output must not alias an input")))?;
    }
    let drop = dropout.map(|d| dropout_args(BWD_OP, d, batch, heads, seq)).transpose()?.flatten();
    if batch == 0 || seq == 0 {
        return Ok(());
    }
    let scale = (1.0 / (head_dim as f64).sqrt()) as f32;
    let aligned = qkv.device_ptr().is_multiple_of(16) && dctx.device_ptr().is_multiple_of(16) && dqkv.device_ptr().is_multiple_of(4);
    let mma = mma_backward_kernels(A::DTYPE, seq, head_dim).filter(|_| tensor_cores && aligned);
    let mut pd: DeviceBuffer<A> = gpu.alloc(scores)?;
    let mut ds: DeviceBuffer<A> = gpu.alloc(scores)?;
    if let Some((scores_kernel, grads_kernel)) = mma {
        // pd, ds, qkv, dctx, lse, mask_bias, seq, hidden, heads, mask_rows, scale (then the
        // dropout policy's); Gpu::launch checks them against kernels/attention_mma.cu.
        let args = [
            A::act_arg_mut(&pd.view_mut()),
            A::act_arg_mut(&ds.view_mut()),
            A::act_arg(qkv),
            A::act_arg(dctx),
            lse.arg(),
            mask_bias.arg(),
            KernelArg::I32(seq as i32),
            KernelArg::I32(hidden as i32),
            KernelArg::I32(heads as i32),
            KernelArg::I32(mask_rows as i32),
            KernelArg::F32(scale),
        ];
        let args: Vec<KernelArg> = args.into_iter().chain(drop.unwrap_or_else(|| rate_zero_dropout(batch))).collect();
        // SAFETY: pd and ds hold B·heads·T² elements (fresh allocations); qkv holds B·T·3H
        // elements and dctx B·T·H, both 16-byte aligned (checked), with H = heads·d and d 16, 32
        // or 64, so the 16-byte units of K and V rows and the 4-byte fragment pairs of Q and dO
        // rows below T that the kernel reads lie inside them, aligned; lse holds B·heads·T, the
        // mask mask_rows rows of T; the shared memory is the kernel's layout.
        unsafe { gpu.launch(scores_kernel, mma_config(BWD_OP, batch, seq, heads, attention_mma_backward_smem_bytes(seq, head_dim))?, &args)? };
        let smem = attention_mma_backward_grads_smem_bytes(seq, head_dim);
        gpu.allow_dynamic_shared(grads_kernel, smem)?;
        // dqkv, pd, ds, qkv, dctx, seq, hidden, heads, scale.
        let args = [
            A::act_arg_mut(dqkv),
            A::act_arg(&pd.view()),
            A::act_arg(&ds.view()),
            A::act_arg(qkv),
            A::act_arg(dctx),
            KernelArg::I32(seq as i32),
            KernelArg::I32(hidden as i32),
            KernelArg::I32(heads as i32),
            KernelArg::F32(scale),
        ];
        // SAFETY: dqkv holds B·T·3H elements, 4-byte aligned (its 32-bit pair stores, rows below
        // T), and aliases no input (checked); pd and ds hold B·heads·T² elements the scores
        // kernel wrote (the same stream, so before this launch reads them); qkv and dctx as above
        // (16-byte units of K, Q and dO rows below T); the shared memory is the kernel's layout,
        // opted in above.
        return unsafe { gpu.launch(grads_kernel, mma_config(BWD_OP, batch, seq, heads, smem)?, &args) };
    }
    let part = batch * seq * hidden;
    let mut heads_qkv: DeviceBuffer<A> = gpu.alloc(3 * part)?;
    layout(gpu, Layout::ToHeads, &heads_qkv.view_mut(), qkv, batch, seq, hidden, heads, 3)?;
    let mut heads_do: DeviceBuffer<A> = gpu.alloc(part)?;
    layout(gpu, Layout::ToHeads, &heads_do.view_mut(), dctx, batch, seq, hidden, heads, 1)?;
    let prod = Products { bh: batch * heads, seq, d: head_dim };
    let (qh, kh, vh, doh) = (heads_qkv.slice(0..part)?, heads_qkv.slice(part..2 * part)?, heads_qkv.slice(2 * part..3 * part)?, heads_do.view());
    let mut s = gpu.alloc::<f32>(scores)?;
    gpu.gemm::<A, f32>(&prod.scores::<A>(), &kh, &qh, &mut s.view_mut(), None)?;
    let mut dp = gpu.alloc::<f32>(scores)?;
    gpu.gemm::<A, f32>(&prod.scores::<A>(), &vh, &doh, &mut dp.view_mut(), None)?;
    let kernel = if drop.is_some() { backward_dropout } else { backward };
    // The row kernel's parameters: pd, ds, s, dp, lse, mask_bias, rows, seq, heads, mask_rows,
    // scale (then the dropout policy's).
    let args = [
        A::act_arg_mut(&pd.view_mut()),
        A::act_arg_mut(&ds.view_mut()),
        s.view().arg(),
        dp.view().arg(),
        lse.arg(),
        mask_bias.arg(),
        KernelArg::I32(rows as i32),
        KernelArg::I32(seq as i32),
        KernelArg::I32(heads as i32),
        KernelArg::I32(mask_rows as i32),
        KernelArg::F32(scale),
    ];
    let args: Vec<KernelArg> = args.into_iter().chain(drop.into_iter().flatten()).collect();
    // SAFETY: pd, ds, s and dp hold B·heads·T² elements (fresh allocations), lse B·heads·T, the
    // mask a multiple of T whose row count divides B (checked); the grid covers `rows` warps.
    unsafe { gpu.launch(kernel, row_config(BWD_OP, batch, heads, seq)?, &args)? };
    let mut grads: DeviceBuffer<A> = gpu.alloc(3 * part)?;
    gpu.gemm::<A, A>(&prod.p_x::<A>(scale), &kh, &ds.view(), &mut grads.slice_mut(0..part)?, None)?;
    gpu.gemm::<A, A>(&prod.pt_x::<A>(scale), &qh, &ds.view(), &mut grads.slice_mut(part..2 * part)?, None)?;
    gpu.gemm::<A, A>(&prod.pt_x::<A>(1.0), &doh, &pd.view(), &mut grads.slice_mut(2 * part..3 * part)?, None)?;
    layout(gpu, Layout::FromHeads, dqkv, &grads.view(), batch, seq, hidden, heads, 3)
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse() {
        assert_eq!(AttentionPath::parse("fused").unwrap(), AttentionPath::Fused);
        assert_eq!(AttentionPath::parse("gemm").unwrap(), AttentionPath::Gemm);
        assert_eq!(AttentionPath::parse("mma").unwrap(), AttentionPath::TensorCores);
        for bad in ["", "GEMM", "split", "auto"] {
            let e = AttentionPath::parse(bad).unwrap_err();
            assert!(matches!(e, Error::Input(_)) && e.to_string().contains(ATTENTION_PATH_VAR), "{bad}: {e}");
        }
    }

    #[test]
    fn products_describe_the_row_major_blocks() {
        // Two heads of T = 3, d = 2, row-major [T, d] blocks: checks each description against a
        // direct triple loop on the host executor.
        let (bh, t, d) = (2usize, 3usize, 2usize);
        let x: Vec<f32> = (0..bh * t * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let y: Vec<f32> = (0..bh * t * d).map(|i| (i as f32 * 0.71).cos()).collect();
        let p: Vec<f32> = (0..bh * t * t).map(|i| (i as f32 * 0.53).sin()).collect();
        let prod = Products { bh, seq: t, d };
        let mut s = vec![0f32; bh * t * t];
        super::super::gemm::gemm_host(&prod.scores::<f32>(), &y, &x, &mut s, None).unwrap();
        let mut o = vec![0f32; bh * t * d];
        super::super::gemm::gemm_host(&prod.p_x::<f32>(2.0), &x, &p, &mut o, None).unwrap();
        let mut ot = vec![0f32; bh * t * d];
        super::super::gemm::gemm_host(&prod.pt_x::<f32>(1.0), &x, &p, &mut ot, None).unwrap();
        for b in 0..bh {
            let (xb, yb, pb) = (&x[b * t * d..], &y[b * t * d..], &p[b * t * t..]);
            for i in 0..t {
                for j in 0..t {
                    let want: f32 = (0..d).map(|c| xb[i * d + c] * yb[j * d + c]).sum();
                    assert!((s[b * t * t + i * t + j] - want).abs() < 1e-6, "S[{b}][{i}][{j}]");
                }
                for c in 0..d {
                    let want: f32 = 2.0 * (0..t).map(|j| pb[i * t + j] * xb[j * d + c]).sum::<f32>();
                    assert!((o[b * t * d + i * d + c] - want).abs() < 1e-6, "P·X[{b}][{i}][{c}]");
                    let want: f32 = (0..t).map(|k| pb[k * t + i] * xb[k * d + c]).sum();
                    assert!((ot[b * t * d + i * d + c] - want).abs() < 1e-6, "Pᵀ·X[{b}][{i}][{c}]");
                }
            }
        }
    }

    /// Which tensor-core kernels a shape gets, and shared memory each launch can take without an
    /// opt-in where the launcher sets none (the forward and the scores kernels): 48 KiB.
    #[test]
    fn tensor_core_kernels_and_their_shared_memory() {
        let fwd = |t, seq, d| mma_forward_kernel(t, seq, d).map(|k| k.name);
        let bwd = |t, seq, d| mma_backward_kernels(t, seq, d).map(|(s, g)| (s.name, g.name));
        assert_eq!(fwd(DType::BF16, 128, 32), Some("attention_mma_forward_dropout_bf16io_d32"));
        assert_eq!(fwd(DType::BF16, 129, 64), Some("attention_mma_forward_long_dropout_bf16io_d64"));
        assert_eq!(fwd(DType::F16, 512, 64), Some("attention_mma_forward_long_dropout_f16io_d64"));
        assert_eq!(bwd(DType::BF16, 512, 64), Some(("attention_mma_backward_scores_long_dropout_bf16io_d64", "attention_mma_backward_grads_long_bf16io_d64")));
        assert_eq!(bwd(DType::F16, 16, 16), Some(("attention_mma_backward_scores_dropout_f16io_d16", "attention_mma_backward_grads_f16io_d16")));
        // Past one tile only d = 64; past 512 nothing (the GEMM path refuses it too); f32 nothing.
        for (t, seq, d) in [(DType::BF16, 129, 32), (DType::F16, 300, 16), (DType::BF16, 513, 64), (DType::F32, 64, 64), (DType::BF16, 64, 40)] {
            assert_eq!((fwd(t, seq, d), bwd(t, seq, d)), (None, None), "{t:?} T={seq} d={d}");
        }
        const NO_OPT_IN: usize = 48 * 1024;
        for seq in [1, 16, 100, 128, 129, 144, 257, 400, 512] {
            for d in [16, 32, 64] {
                assert!(attention_mma_smem_bytes(seq, d) <= NO_OPT_IN, "forward T={seq} d={d}");
                assert!(attention_mma_backward_smem_bytes(seq, d) <= NO_OPT_IN, "scores T={seq} d={d}");
            }
        }
        // The kernels' layouts (kernels/attention_mma.cu's headers).
        assert_eq!(attention_mma_smem_bytes(128, 64), 45568);
        assert_eq!(attention_mma_smem_bytes(512, 64), 47104);
        assert_eq!(attention_mma_backward_smem_bytes(512, 64), 38912);
        assert_eq!(attention_mma_backward_grads_smem_bytes(128, 64), 52224);
        assert_eq!(attention_mma_backward_grads_smem_bytes(512, 64), 17408);
    }

    #[test]
    fn score_sizes_are_checked() {
        assert_eq!(score_sizes(OP, 2, 5, 3).unwrap(), (30, 150));
        assert!(matches!(score_sizes(OP, 1, 513, 1), Err(Error::Shape { .. })));
        assert!(score_sizes(OP, 1 << 20, 512, 1 << 12).is_err());
        assert!(matches!(kernels(DType::U32, 64, OP), Err(Error::Unsupported(_))));
        let names = |t, seq| kernels(t, seq, OP).unwrap().map(|k| k.name);
        assert_eq!(names(DType::F16, 129), ["attention_gemm_softmax_f16io", "attention_gemm_softmax_dropout_f16io", "attention_gemm_softmax_backward_f16io", "attention_gemm_softmax_backward_dropout_f16io"]);
        assert_eq!(names(DType::BF16, 128), ["attention_gemm_softmax_bf16io_t128", "attention_gemm_softmax_dropout_bf16io_t128", "attention_gemm_softmax_backward_bf16io_t128", "attention_gemm_softmax_backward_dropout_bf16io_t128"]);
        assert_eq!(names(DType::F32, 1)[3], "attention_gemm_softmax_backward_dropout_f32_t128");
        // One 16-bit element kernel per direction (bits are copied), and one unit kernel for all.
        let layout = |l: Layout, k: (KernelName, KernelName)| (l, k.0.name, k.1.name);
        for l in [Layout::ToHeads, Layout::FromHeads] {
            assert_eq!(layout(l, l.kernels::<half::f16>()), layout(l, l.kernels::<half::bf16>()));
            assert_eq!(l.kernels::<f32>().1.name, l.kernels::<half::bf16>().1.name);
            assert_ne!(l.kernels::<f32>().0.name, l.kernels::<half::bf16>().0.name);
        }
        assert_eq!((Layout::ToHeads.kernels::<f32>().0.name, Layout::FromHeads.kernels::<half::bf16>().1.name), ("attention_gemm_to_heads_f32", "attention_gemm_from_heads_x16"));
    }
}
