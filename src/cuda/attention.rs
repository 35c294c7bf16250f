//! Launcher for `kernels/attention.cu`: fused masked scaled dot-product attention forward over a
//! packed `[B, T, 3H]` Q, K, V, writing the context `[B, T, H]` and each row's log-sum-exp
//! `[B, heads, T]` (what the backward needs). The semantics are `cpu::reference::attention` and
//! `attention_lse` (HF eager attention, eval mode); see the kernel header for the algorithm.
//!
//! Launch configuration (see the kernel header for the thread mapping and numerics):
//! - block (32, W): W warps of [`ROWS_PER_WARP`] query rows each; grid.x = B · heads · ⌈T / 4W⌉.
//!   [`AttentionPlan::auto`] takes W = 4 (16 rows per block: each K/V tile loaded into shared
//!   memory serves 16 queries), fewer when T is short (no idle warps) or when the grid would
//!   have fewer than [`TARGET_BLOCKS`] blocks (small batches still fill an H100's 132 SMs).
//! - head dim 32 or 64 runs the kernel specialised on it (`_d32`, `_d64`), any other 1..=128 the
//!   generic one; a plan may force the generic kernel (tests compare the two).
//! - storage: the forward launchers are generic over the activation type `A` of `qkv` and `ctx`
//!   ([`ActivationScalar`]): f32 runs the `_f32` kernels, bf16 the `_bf16io` ones and f16 the
//!   `_f16io` ones (the same bodies; the mask and `lse` stay f32, the arithmetic f32, ctx rounded
//!   once on store). The
//!   backward launchers likewise, over dctx, qkv, ctx and dqkv (lse, mask and workspace f32).
//! - dynamic shared memory: K and V tiles of 32 keys, the block's Q rows and probabilities:
//!   at most 42.5 KiB with W <= 4, so every auto plan fits the 48 KiB a kernel gets without an
//!   opt-in. A plan that needs more (W > 4 with d > 100) is refused rather than opted in: it
//!   gains nothing over W = 4, and the `cuda-sim` executor caps dynamic shared memory at 48 KiB,
//!   so an opt-in path could never run in CI.
//!
//! Every length is checked against `batch`/`seq`/`hidden`/`heads` before anything is enqueued
//! ([`Error::Shape`] naming the operand and the numbers), so the kernel never indexes outside
//! the views it is given. Written once over [`Gpu`]: enqueued without a sync on a GPU, run to
//! completion on the `cuda-sim` executor.

use cudarc::driver::LaunchConfig;

use super::gpu::{ActivationScalar, DeviceView, DeviceViewMut, Gpu, KernelArg};
use super::elementwise::DeviceDropout;
use super::registry::attention::{
    ATTENTION_FORWARD_BF16IO, ATTENTION_FORWARD_BF16IO_D32, ATTENTION_FORWARD_BF16IO_D64,
    ATTENTION_FORWARD_DROPOUT_BF16IO, ATTENTION_FORWARD_DROPOUT_BF16IO_D32, ATTENTION_FORWARD_DROPOUT_BF16IO_D64, ATTENTION_FORWARD_DROPOUT_F32,
    ATTENTION_FORWARD_DROPOUT_F32_D32, ATTENTION_FORWARD_DROPOUT_F32_D64, ATTENTION_FORWARD_F32, ATTENTION_FORWARD_F32_D32, ATTENTION_FORWARD_F32_D64,
    ATTENTION_FORWARD_DROPOUT_F16IO, ATTENTION_FORWARD_DROPOUT_F16IO_D32, ATTENTION_FORWARD_DROPOUT_F16IO_D64, ATTENTION_FORWARD_F16IO,
    ATTENTION_FORWARD_F16IO_D32, ATTENTION_FORWARD_F16IO_D64,
};
use super::registry::KernelName;
use crate::tensor::DType;
use crate::train::dropout::DropoutParams;
use crate::error::{Error, Result};

const OP: &str = "cuda::attention_packed_forward";

/// Largest head dimension the kernel handles (4 output columns per lane).
pub const MAX_HEAD_DIM: usize = 128;
/// Longest sequence the launcher accepts (BERT's position table; the kernel itself streams any
/// length, but nothing longer is tested).
pub const MAX_SEQ: usize = 512;
/// Keys per shared-memory tile: one per lane.
pub const KEY_TILE: usize = 32;
/// Query rows per warp (the kernel's register blocking, a compile-time constant there).
pub const ROWS_PER_WARP: usize = 4;
/// Most warps a block may have (the kernel's `__launch_bounds__`).
pub const MAX_WARPS_PER_BLOCK: u32 = 8;
/// Dynamic shared memory every kernel gets without an opt-in: the most a plan may use.
pub const MAX_SHARED_BYTES: usize = 48 * 1024;
/// Below this many blocks `auto` trades rows per block for more blocks (about two per SM of an
/// H100's 132).
pub const TARGET_BLOCKS: usize = 256;

/// How the kernel is launched. [`AttentionPlan::auto`] is what production uses; other plans
/// exist so tests can exercise every code path at any shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionPlan {
    /// Warps per block (1..=8), each owning [`ROWS_PER_WARP`] query rows.
    pub warps_per_block: u32,
    /// Use the kernel compiled for this head dim when there is one (32, 64); `false` forces the
    /// generic kernel.
    pub specialised: bool,
}

impl AttentionPlan {
    /// The configuration described in the module docs, for `batch · heads` (b, h) pairs of
    /// `seq` queries each.
    pub fn auto(batch: usize, seq: usize, heads: usize) -> Self {
        let per_warp = seq.div_ceil(ROWS_PER_WARP).max(1);
        let mut warps = per_warp.min(4);
        let blocks = |w: usize| batch.saturating_mul(heads).saturating_mul(seq.div_ceil(w * ROWS_PER_WARP));
        while warps > 1 && blocks(warps) < TARGET_BLOCKS {
            warps = warps.div_ceil(2).min(warps - 1);
        }
        AttentionPlan { warps_per_block: warps as u32, specialised: true }
    }

    pub fn rows_per_block(&self) -> usize {
        self.warps_per_block as usize * ROWS_PER_WARP
    }

    /// The f32 kernel this plan runs for head dim `head_dim`.
    pub fn kernel(&self, head_dim: usize) -> KernelName {
        match (self.specialised, head_dim) {
            (true, 32) => ATTENTION_FORWARD_F32_D32,
            (true, 64) => ATTENTION_FORWARD_F32_D64,
            _ => ATTENTION_FORWARD_F32,
        }
    }

    /// The kernel this plan runs for head dim `head_dim` with `qkv` and `ctx` stored as
    /// `dtype`: the `_f32` kernels, or the `_bf16io` / `_f16io` ones for bf16 / f16; any other
    /// storage type is [`Error::Unsupported`].
    pub fn kernel_for(&self, dtype: DType, head_dim: usize) -> Result<KernelName> {
        match (dtype, self.specialised, head_dim) {
            (DType::F32, ..) => Ok(self.kernel(head_dim)),
            (DType::BF16, true, 32) => Ok(ATTENTION_FORWARD_BF16IO_D32),
            (DType::BF16, true, 64) => Ok(ATTENTION_FORWARD_BF16IO_D64),
            (DType::BF16, ..) => Ok(ATTENTION_FORWARD_BF16IO),
            (DType::F16, true, 32) => Ok(ATTENTION_FORWARD_F16IO_D32),
            (DType::F16, true, 64) => Ok(ATTENTION_FORWARD_F16IO_D64),
            (DType::F16, ..) => Ok(ATTENTION_FORWARD_F16IO),
            (other, ..) => Err(Error::Unsupported(format!("{OP}: Q, K, V and the context stored as {other}; the attention kernels take f32, bf16 or f16"))),
        }
    }

    /// Dynamic shared memory for head dim `head_dim`, laid out as the kernel does: K tile
    /// `32·ldk`, V tile `32·ldq`, Q `rows·ldq`, probabilities `rows·32` floats, where
    /// `ldq = ⌈d/4⌉·4` and `ldk` is `ldq` or `ldq + 4`, whichever has `ldk/4` odd.
    pub fn shared_mem_bytes(&self, head_dim: usize) -> usize {
        let ldq = head_dim.div_ceil(4) * 4;
        let ldk = if (ldq / 4) % 2 == 1 { ldq } else { ldq + 4 };
        let rows = self.rows_per_block();
        (KEY_TILE * ldk + KEY_TILE * ldq + rows * ldq + rows * KEY_TILE) * std::mem::size_of::<f32>()
    }

    /// Checks the plan against the kernel's contract for head dim `head_dim`.
    pub fn validate(&self, head_dim: usize) -> Result<()> {
        let bad = |msg: String| Err(Error::shape(OP, format!("launch plan {self:?}: {msg}")));
        if self.warps_per_block == 0 || self.warps_per_block > MAX_WARPS_PER_BLOCK {
            return bad(format!("warps_per_block must be in 1..={MAX_WARPS_PER_BLOCK}"));
        }
        if head_dim == 0 || head_dim > MAX_HEAD_DIM {
            return bad(format!("head dim {head_dim} is outside 1..={MAX_HEAD_DIM}"));
        }
        let smem = self.shared_mem_bytes(head_dim);
        if smem > MAX_SHARED_BYTES {
            return bad(format!("needs {smem} bytes of shared memory for head dim {head_dim}, more than {MAX_SHARED_BYTES}"));
        }
        Ok(())
    }

    /// Grid, block and dynamic shared memory; the sizes must have passed [`AttentionSizes::check`].
    pub fn launch_config(&self, batch: usize, seq: usize, heads: usize, head_dim: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((batch * heads * seq.div_ceil(self.rows_per_block())) as u32, 1, 1),
            block_dim: (32, self.warps_per_block, 1),
            shared_mem_bytes: self.shared_mem_bytes(head_dim) as u32,
        }
    }
}

/// The lengths a launch needs, checked before anything is enqueued. Pure, so it is unit-tested
/// without a GPU.
#[derive(Clone, Copy, Debug)]
pub struct AttentionSizes {
    pub batch: usize,
    pub seq: usize,
    pub hidden: usize,
    pub heads: usize,
    pub qkv: usize,
    pub mask: usize,
    pub ctx: usize,
    pub lse: usize,
}

/// What a checked launch works with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionDims {
    pub head_dim: usize,
    /// Rows of the mask: batch row `b` reads mask row `b % mask_rows` (0 when `seq` is 0).
    pub mask_rows: usize,
}

impl AttentionSizes {
    pub fn check(&self) -> Result<AttentionDims> {
        let AttentionSizes { batch, seq, hidden, heads, .. } = *self;
        let fail = |msg: String| Error::shape(OP, msg);
        if heads == 0 || !hidden.is_multiple_of(heads) {
            return Err(fail(format!("hidden {hidden} is not divisible by {heads} heads")));
        }
        let head_dim = hidden / heads;
        if head_dim == 0 || head_dim > MAX_HEAD_DIM {
            return Err(fail(format!("head dim {head_dim} (hidden {hidden} / {heads} heads) is outside 1..={MAX_HEAD_DIM}")));
        }
        if seq > MAX_SEQ {
            return Err(fail(format!("sequence length {seq} exceeds {MAX_SEQ}")));
        }
        // The kernel takes int sizes (its offsets are 64-bit) and a 1-D grid of B·heads·⌈T/4⌉ blocks.
        if hidden > (i32::MAX / 3) as usize {
            return Err(fail(format!("hidden {hidden} must fit in an i32 three times over")));
        }
        let blocks = batch.checked_mul(heads).and_then(|n| n.checked_mul(seq.div_ceil(ROWS_PER_WARP)));
        if blocks.is_none_or(|n| n > i32::MAX as usize) {
            return Err(fail(format!("batch {batch} x {heads} heads x seq {seq} is too large for one launch")));
        }
        let rows = batch * seq; // fits: the block count above bounds it
        let count = |what: &str, n: Option<usize>| n.ok_or_else(|| fail(format!("{what} overflows usize for batch {batch}, seq {seq}, hidden {hidden}")));
        let qkv_len = count("qkv", rows.checked_mul(hidden).and_then(|n| n.checked_mul(3)))?;
        let ctx_len = count("ctx", rows.checked_mul(hidden))?;
        let expect = |name: &str, got: usize, want: usize, what: &str| -> Result<()> {
            if got != want {
                return Err(fail(format!("{name} has {got} elements, expected {want} ({what}) for batch={batch}, seq={seq}, hidden={hidden}, heads={heads}")));
            }
            Ok(())
        };
        expect("qkv", self.qkv, qkv_len, "batch·seq·3·hidden")?;
        expect("ctx", self.ctx, ctx_len, "batch·seq·hidden")?;
        expect("lse", self.lse, batch * heads * seq, "batch·heads·seq")?;
        let mask = self.mask;
        let mask_rows = match mask.checked_div(seq) {
            None => {
                expect("mask_bias", mask, 0, "mask rows · seq with seq = 0")?;
                0
            }
            Some(m) => {
                if m == 0 || !mask.is_multiple_of(seq) || !batch.is_multiple_of(m) {
                    return Err(fail(format!("mask_bias has {mask} elements, expected [B_mask, {seq}] with B_mask >= 1 dividing batch {batch}")));
                }
                m
            }
        };
        Ok(AttentionDims { head_dim, mask_rows })
    }
}

/// Fails when two device ranges, each (address, length in bytes), overlap (the kernel's pointers
/// are `__restrict__`; views of different element types, bf16 `qkv` and f32 `lse`, compare in
/// bytes).
pub(super) fn disjoint_bytes(names: (&str, &str), a: (u64, usize), b: (u64, usize)) -> Result<()> {
    let end = |(p, n): (u64, usize)| p + n as u64;
    if a.1 > 0 && b.1 > 0 && a.0 < end(b) && b.0 < end(a) {
        return Err(Error::Input(format!("{OP}: {} overlaps {}; outputs must not alias inputs or each other", names.0, names.1)));
    }
    Ok(())
}

/// A view as (address, length in bytes), for [`disjoint_bytes`].
pub(super) fn byte_range<T>(ptr: u64, len: usize) -> (u64, usize) {
    (ptr, len * std::mem::size_of::<T>())
}

/// Fused attention forward with the automatic launch plan: `ctx = softmax(QKᵀ/√d + mask)·V` per
/// head from the packed `qkv` (`[batch, seq, 3·hidden]`), and `lse` (`[batch, heads, seq]`) the
/// natural-log log-sum-exp of each row of scaled, masked scores. `mask_bias` is `[B_mask, seq]`
/// additive with `B_mask` dividing `batch`; batch row `b` reads mask row `b % B_mask`.
/// `qkv` and `ctx` are f32, or bf16 / f16 (the `_bf16io` / `_f16io` kernels: f32 arithmetic, ctx rounded once).
#[allow(clippy::too_many_arguments)] // the packed attention's operands and its four sizes
pub fn attention_packed_forward<A: ActivationScalar>(
    gpu: &Gpu,
    qkv: &DeviceView<A>,
    mask_bias: &DeviceView<f32>,
    ctx: &mut DeviceViewMut<A>,
    lse: &mut DeviceViewMut<f32>,
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
) -> Result<()> {
    let plan = AttentionPlan::auto(batch, seq, heads);
    attention_packed_forward_with_plan(gpu, qkv, mask_bias, ctx, lse, batch, seq, hidden, heads, plan)
}

/// As [`attention_packed_forward`], with an explicit launch plan (validated).
#[allow(clippy::too_many_arguments)]
pub fn attention_packed_forward_with_plan<A: ActivationScalar>(
    gpu: &Gpu,
    qkv: &DeviceView<A>,
    mask_bias: &DeviceView<f32>,
    ctx: &mut DeviceViewMut<A>,
    lse: &mut DeviceViewMut<f32>,
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    plan: AttentionPlan,
) -> Result<()> {
    forward_launch(gpu, qkv, mask_bias, ctx, lse, batch, seq, hidden, heads, plan, None)
}

/// [`attention_packed_forward`] in training mode: probability `(b, h, i, j)` goes through the
/// CPU backend's Philox mask for `dropout` (`cpu::prob_dropout`: element
/// `((b_local·heads + h)·T + i)·T + j` of its block's stream); `lse` keeps the undropped
/// probabilities. At most [`MAX_DROPOUT_BLOCKS`] blocks, each id below 256. `qkv` and `ctx`
/// f32, bf16 or f16, as in [`attention_packed_forward`].
#[allow(clippy::too_many_arguments)]
pub fn attention_packed_forward_dropout<A: ActivationScalar>(
    gpu: &Gpu,
    qkv: &DeviceView<A>,
    mask_bias: &DeviceView<f32>,
    ctx: &mut DeviceViewMut<A>,
    lse: &mut DeviceViewMut<f32>,
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    dropout: &DeviceDropout<'_>,
) -> Result<()> {
    let plan = AttentionPlan::auto(batch, seq, heads);
    forward_launch(gpu, qkv, mask_bias, ctx, lse, batch, seq, hidden, heads, plan, Some(dropout))
}

/// Dropout blocks (Parallel branches) the attention kernels take: their ids travel packed, one
/// byte each, in one 64-bit argument, so a launch needs no device table.
pub const MAX_DROPOUT_BLOCKS: usize = 8;

/// The dropout variant of a forward attention kernel (same parameters, then the policy's); the
/// backward picks its kernels in [`AttentionBackwardPlan::kernels_for`].
fn dropout_kernel(k: KernelName) -> KernelName {
    match k.name {
        "attention_forward_f32_d32" => ATTENTION_FORWARD_DROPOUT_F32_D32,
        "attention_forward_f32_d64" => ATTENTION_FORWARD_DROPOUT_F32_D64,
        "attention_forward_f32" => ATTENTION_FORWARD_DROPOUT_F32,
        "attention_forward_bf16io_d32" => ATTENTION_FORWARD_DROPOUT_BF16IO_D32,
        "attention_forward_bf16io_d64" => ATTENTION_FORWARD_DROPOUT_BF16IO_D64,
        "attention_forward_bf16io" => ATTENTION_FORWARD_DROPOUT_BF16IO,
        "attention_forward_f16io_d32" => ATTENTION_FORWARD_DROPOUT_F16IO_D32,
        "attention_forward_f16io_d64" => ATTENTION_FORWARD_DROPOUT_F16IO_D64,
        _ => ATTENTION_FORWARD_DROPOUT_F16IO, // "attention_forward_f16io": kernel_for returns nothing else
    }
}

/// The policy's kernel arguments for `dropout` over `batch` rows of `heads·seq·seq` probabilities
/// (each block's first drawing element `d.offset` of its stream), or `None` for p = 0 (the
/// no-dropout kernels: the CPU's factors are then exactly 1).
pub(super) fn dropout_args(op: &'static str, d: &DeviceDropout<'_>, batch: usize, heads: usize, seq: usize) -> Result<Option<[KernelArg; 9]>> {
    let params = DropoutParams::new(d.p)?;
    if let Some(buf) = &d.seed_buffer {
        if buf.len() != 2 {
            return Err(Error::shape(op, format!("the seed buffer has {} elements, expected 2", buf.len())));
        }
    }
    let n = d.streams.len();
    if n == 0 || !batch.is_multiple_of(n) {
        return Err(Error::shape(op, format!("batch {batch} does not split into {n} dropout blocks")));
    }
    let base = d.streams[0] & !0xff;
    if n > MAX_DROPOUT_BLOCKS || d.streams.iter().any(|s| s & !0xff != base) {
        return Err(Error::Unsupported(format!("{op}: probability dropout over {n} blocks (Parallel branches); the CUDA kernels take at most {MAX_DROPOUT_BLOCKS}, with ids below 256")));
    }
    if params.threshold == 0 {
        return Ok(None);
    }
    // The last probability's index (b_local·heads + h)·T² + i·T + j + offset must fit in 64 bits.
    let probs = ((batch / n) as u64).checked_mul(heads as u64).and_then(|v| v.checked_mul(seq as u64)).and_then(|v| v.checked_mul(seq as u64));
    if probs.and_then(|v| v.checked_add(d.offset)).is_none() {
        return Err(Error::shape(op, format!("the dropout offset {} plus the probabilities of {} rows passes 2^64", d.offset, batch / n)));
    }
    let ids = d.streams.iter().enumerate().fold(0u64, |acc, (j, s)| acc | (s & 0xff) << (8 * j));
    let per_block = i32::try_from(batch / n).map_err(|_| Error::shape(op, format!("batch {batch} does not fit in an i32")))?;
    Ok(Some([
        d.seed_buffer.as_ref().map_or(KernelArg::Null, |b| b.arg()),
        KernelArg::U32(d.seed as u32),
        KernelArg::U32((d.seed >> 32) as u32),
        KernelArg::U64(base),
        KernelArg::U64(ids),
        KernelArg::I32(per_block.max(1)),
        KernelArg::U32(params.threshold),
        KernelArg::F32(params.scale),
        KernelArg::U64(d.offset),
    ]))
}

/// The forward's checks, shared by every attention forward (fused, GEMM, tensor-core): the
/// sizes ([`AttentionSizes::check`]), the outputs apart from the inputs and from each other, and
/// the dropout's kernel arguments (None without dropout or at rate 0).
#[allow(clippy::type_complexity)] // the dims and the dropout arguments, as the launchers take them
pub(super) fn checked_forward<A: ActivationScalar>(
    op: &'static str,
    qkv: &DeviceView<A>,
    mask_bias: &DeviceView<f32>,
    ctx: &DeviceViewMut<A>,
    lse: &DeviceViewMut<f32>,
    (batch, seq, hidden, heads): (usize, usize, usize, usize),
    dropout: Option<&DeviceDropout<'_>>,
) -> Result<(AttentionDims, Option<[KernelArg; 9]>)> {
    let sizes = AttentionSizes { batch, seq, hidden, heads, qkv: qkv.len(), mask: mask_bias.len(), ctx: ctx.len(), lse: lse.len() };
    let dims = sizes.check()?;
    let (q, m, c, l) = (byte_range::<A>(qkv.device_ptr(), qkv.len()), byte_range::<f32>(mask_bias.device_ptr(), mask_bias.len()), byte_range::<A>(ctx.device_ptr(), ctx.len()), byte_range::<f32>(lse.device_ptr(), lse.len()));
    disjoint_bytes(("ctx", "qkv"), c, q)?;
    disjoint_bytes(("ctx", "mask_bias"), c, m)?;
    disjoint_bytes(("lse", "qkv"), l, q)?;
    disjoint_bytes(("lse", "mask_bias"), l, m)?;
    disjoint_bytes(("ctx", "lse"), c, l)?;
    let drop = dropout.map(|d| dropout_args(op, d, batch, heads, seq)).transpose()?.flatten();
    Ok((dims, drop))
}

/// The arguments of a forward kernel that reads the packed qkv and writes ctx and the lse (the
/// fused kernels and the tensor-core one): ctx, lse, qkv, mask_bias, seq, hidden, heads,
/// mask_rows, scale = 1/√d (ctx and qkv as `unsigned short*` for bf16 and f16), then the dropout
/// policy's; Gpu::launch checks them against kernels/attention.cu.
pub(super) fn forward_args<A: ActivationScalar>(
    qkv: &DeviceView<A>,
    mask_bias: &DeviceView<f32>,
    ctx: &DeviceViewMut<A>,
    lse: &DeviceViewMut<f32>,
    (seq, hidden, heads, mask_rows): (usize, usize, usize, usize),
    head_dim: usize,
    drop: Option<[KernelArg; 9]>,
) -> Vec<KernelArg> {
    let scale = (1.0 / (head_dim as f64).sqrt()) as f32;
    let args = [
        A::act_arg_mut(ctx),
        lse.arg(),
        A::act_arg(qkv),
        mask_bias.arg(),
        KernelArg::I32(seq as i32),
        KernelArg::I32(hidden as i32),
        KernelArg::I32(heads as i32),
        KernelArg::I32(mask_rows as i32),
        KernelArg::F32(scale),
    ];
    args.into_iter().chain(drop.into_iter().flatten()).collect()
}

#[allow(clippy::too_many_arguments)]
fn forward_launch<A: ActivationScalar>(
    gpu: &Gpu,
    qkv: &DeviceView<A>,
    mask_bias: &DeviceView<f32>,
    ctx: &mut DeviceViewMut<A>,
    lse: &mut DeviceViewMut<f32>,
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    plan: AttentionPlan,
    dropout: Option<&DeviceDropout<'_>>,
) -> Result<()> {
    let (AttentionDims { head_dim, mask_rows }, drop) = checked_forward(OP, qkv, mask_bias, ctx, lse, (batch, seq, hidden, heads), dropout)?;
    plan.validate(head_dim)?;
    let base = plan.kernel_for(A::DTYPE, head_dim)?;
    if batch == 0 || seq == 0 {
        return Ok(()); // a zero-sized grid is a launch error; there is nothing to do
    }
    let kernel = if drop.is_some() { dropout_kernel(base) } else { base };
    let args = forward_args(qkv, mask_bias, ctx, lse, (seq, hidden, heads, mask_rows), head_dim, drop);
    // SAFETY: every view was checked above to have exactly the length the kernel indexes for
    // these sizes (qkv B·T·3H, ctx B·T·H elements of A, lse B·heads·T, mask a multiple of T whose
    // row count divides B), the kernel reads and writes A (kernel_for), the outputs alias
    // nothing (byte ranges), and the plan fits the kernel's block and
    // shared-memory contract (the specialised kernels run only when hidden = d·heads with their
    // d); the dropout arguments' seed buffer holds 2 words and the batch splits into its blocks.
    unsafe { gpu.launch(kernel, plan.launch_config(batch, seq, heads, head_dim), &args) }
}

// ==== backward ===================================================================================
//
// `kernels/attention.cu`'s backward section: the gradient of `attention_packed_forward` with
// respect to its packed input, from the output gradient `dctx`, the forward's `ctx` and `lse`.
// Three launches (see the kernel section header for the algorithm, thread mapping and numerics):
// - `attention_backward_prep_{f32|bf16io|f16io}`: grid ⌈B·heads·T / 8⌉, block (32, 8): per row D = dO·O
//   and the normaliser c (1 unless |lse| >= 64) into a workspace of
//   [`attention_backward_workspace_len`] floats;
// - `attention_backward_dkv[_dropout]_{f32|bf16io|f16io}[_d32|_d64]`: grid B·heads·⌈T/32⌉, block
//   (32, W) with W = 4 or 8;
// - `attention_backward_dq[_dropout]_{f32|bf16io|f16io}[_d32|_d64]`: grid B·heads·⌈T/4W⌉, block
//   (32, W) with W in 1..=8.
// Storage: the launchers are generic over the activation type `A` of dctx, qkv, ctx and dqkv
// ([`ActivationScalar`]): f32 runs the `_f32` kernels, bf16 / f16 the `_bf16io` / `_f16io` ones
// (the same bodies: loads widen exactly, f32 arithmetic, dqkv rounded once on store); lse, the mask and the
// workspace stay f32.
// No float atomics: the output is bitwise reproducible. Dynamic shared memory above 48 KiB
// (d > ~100, or W = 8 at d >= 72) is opted in per kernel through `Gpu::allow_dynamic_shared`.

use super::registry::attention::{
    ATTENTION_BACKWARD_DKV_BF16IO, ATTENTION_BACKWARD_DKV_BF16IO_D32, ATTENTION_BACKWARD_DKV_BF16IO_D64, ATTENTION_BACKWARD_DKV_DROPOUT_BF16IO,
    ATTENTION_BACKWARD_DKV_DROPOUT_BF16IO_D32, ATTENTION_BACKWARD_DKV_DROPOUT_BF16IO_D64, ATTENTION_BACKWARD_DKV_DROPOUT_F32, ATTENTION_BACKWARD_DKV_DROPOUT_F32_D32,
    ATTENTION_BACKWARD_DKV_DROPOUT_F32_D64, ATTENTION_BACKWARD_DKV_F32, ATTENTION_BACKWARD_DKV_F32_D32, ATTENTION_BACKWARD_DKV_F32_D64, ATTENTION_BACKWARD_DQ_BF16IO,
    ATTENTION_BACKWARD_DQ_BF16IO_D32, ATTENTION_BACKWARD_DQ_BF16IO_D64, ATTENTION_BACKWARD_DQ_DROPOUT_BF16IO, ATTENTION_BACKWARD_DQ_DROPOUT_BF16IO_D32,
    ATTENTION_BACKWARD_DQ_DROPOUT_BF16IO_D64, ATTENTION_BACKWARD_DQ_DROPOUT_F32, ATTENTION_BACKWARD_DQ_DROPOUT_F32_D32, ATTENTION_BACKWARD_DQ_DROPOUT_F32_D64,
    ATTENTION_BACKWARD_DQ_F32, ATTENTION_BACKWARD_DQ_F32_D32, ATTENTION_BACKWARD_DQ_F32_D64, ATTENTION_BACKWARD_PREP_BF16IO, ATTENTION_BACKWARD_PREP_F32,
    ATTENTION_BACKWARD_DKV_F16IO, ATTENTION_BACKWARD_DKV_F16IO_D32, ATTENTION_BACKWARD_DKV_F16IO_D64, ATTENTION_BACKWARD_DKV_DROPOUT_F16IO,
    ATTENTION_BACKWARD_DKV_DROPOUT_F16IO_D32, ATTENTION_BACKWARD_DKV_DROPOUT_F16IO_D64, ATTENTION_BACKWARD_DQ_F16IO, ATTENTION_BACKWARD_DQ_F16IO_D32,
    ATTENTION_BACKWARD_DQ_F16IO_D64, ATTENTION_BACKWARD_DQ_DROPOUT_F16IO, ATTENTION_BACKWARD_DQ_DROPOUT_F16IO_D32, ATTENTION_BACKWARD_DQ_DROPOUT_F16IO_D64,
    ATTENTION_BACKWARD_PREP_F16IO,
};

const BWD_OP: &str = "cuda::attention_packed_backward";
/// Rows (one warp each) per block of the prep kernel.
pub const BACKWARD_PREP_WARPS: u32 = 8;
/// The most dynamic shared memory a backward plan may use: 99 KiB, the opt-in maximum of the
/// smallest sm_80+ part (sm_86/89); the largest plan (d = 128, 8 warps) needs 73.5 KiB.
pub const MAX_BACKWARD_SHARED_BYTES: usize = 99 * 1024;

/// How the two main backward kernels are launched. [`AttentionBackwardPlan::auto`] is what
/// production uses; other plans exist so tests can exercise every code path at any shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionBackwardPlan {
    /// Warps per block of the dK/dV kernel: 4 or 8 (32/W keys of the block's 32 per warp in
    /// its accumulation phase; 4W query rows per step of its loop).
    pub dkv_warps: u32,
    /// Warps per block of the dQ kernel, 1..=8, each owning [`ROWS_PER_WARP`] query rows.
    pub dq_warps: u32,
    /// Use the kernels compiled for this head dim when there are some (32, 64); `false` forces
    /// the generic ones.
    pub specialised: bool,
}

impl AttentionBackwardPlan {
    /// The dQ kernel takes the forward's block shape (its loop is the forward's: 16 rows per
    /// block, fewer for short sequences or small grids). The dK/dV kernel's grid does not depend
    /// on W (one block per 32 keys), so W only sets how many query rows a block takes per step:
    /// 8 warps when the grid is small (fewer than [`TARGET_BLOCKS`] blocks) and T spans more
    /// than one 16-row step, else 4.
    pub fn auto(batch: usize, seq: usize, heads: usize) -> Self {
        let dq_warps = AttentionPlan::auto(batch, seq, heads).warps_per_block;
        let dkv_blocks = batch.saturating_mul(heads).saturating_mul(seq.div_ceil(KEY_TILE));
        let dkv_warps = if dkv_blocks < TARGET_BLOCKS && seq > 4 * ROWS_PER_WARP { 8 } else { 4 };
        AttentionBackwardPlan { dkv_warps, dq_warps, specialised: true }
    }

    /// The f32 dK/dV kernel for head dim `head_dim` (no dropout).
    pub fn dkv_kernel(&self, head_dim: usize) -> KernelName {
        match (self.specialised, head_dim) {
            (true, 32) => ATTENTION_BACKWARD_DKV_F32_D32,
            (true, 64) => ATTENTION_BACKWARD_DKV_F32_D64,
            _ => ATTENTION_BACKWARD_DKV_F32,
        }
    }

    /// The f32 dQ kernel for head dim `head_dim` (no dropout).
    pub fn dq_kernel(&self, head_dim: usize) -> KernelName {
        match (self.specialised, head_dim) {
            (true, 32) => ATTENTION_BACKWARD_DQ_F32_D32,
            (true, 64) => ATTENTION_BACKWARD_DQ_F32_D64,
            _ => ATTENTION_BACKWARD_DQ_F32,
        }
    }

    /// The (prep, dK/dV, dQ) kernels this plan runs for head dim `head_dim` with dctx, qkv, ctx
    /// and dqkv stored as `dtype`, with the Philox dropout policy or without: the `_f32`
    /// kernels, or the `_bf16io` / `_f16io` ones for bf16 / f16; any other storage type is
    /// [`Error::Unsupported`].
    pub fn kernels_for(&self, dtype: DType, head_dim: usize, dropout: bool) -> Result<[KernelName; 3]> {
        let t = match dtype {
            DType::F32 => 0,
            DType::BF16 => 1,
            DType::F16 => 2,
            other => return Err(Error::Unsupported(format!("{BWD_OP}: dctx, Q, K, V, the context and dqkv stored as {other}; the attention backward kernels take f32, bf16 or f16"))),
        };
        let width = match (self.specialised, head_dim) {
            (true, 32) => 1,
            (true, 64) => 2,
            _ => 0,
        };
        // [storage][dropout][width]: generic, d32, d64.
        const DKV: [[[KernelName; 3]; 2]; 3] = [
            [
                [ATTENTION_BACKWARD_DKV_F32, ATTENTION_BACKWARD_DKV_F32_D32, ATTENTION_BACKWARD_DKV_F32_D64],
                [ATTENTION_BACKWARD_DKV_DROPOUT_F32, ATTENTION_BACKWARD_DKV_DROPOUT_F32_D32, ATTENTION_BACKWARD_DKV_DROPOUT_F32_D64],
            ],
            [
                [ATTENTION_BACKWARD_DKV_BF16IO, ATTENTION_BACKWARD_DKV_BF16IO_D32, ATTENTION_BACKWARD_DKV_BF16IO_D64],
                [ATTENTION_BACKWARD_DKV_DROPOUT_BF16IO, ATTENTION_BACKWARD_DKV_DROPOUT_BF16IO_D32, ATTENTION_BACKWARD_DKV_DROPOUT_BF16IO_D64],
            ],
            [
                [ATTENTION_BACKWARD_DKV_F16IO, ATTENTION_BACKWARD_DKV_F16IO_D32, ATTENTION_BACKWARD_DKV_F16IO_D64],
                [ATTENTION_BACKWARD_DKV_DROPOUT_F16IO, ATTENTION_BACKWARD_DKV_DROPOUT_F16IO_D32, ATTENTION_BACKWARD_DKV_DROPOUT_F16IO_D64],
            ],
        ];
        const DQ: [[[KernelName; 3]; 2]; 3] = [
            [
                [ATTENTION_BACKWARD_DQ_F32, ATTENTION_BACKWARD_DQ_F32_D32, ATTENTION_BACKWARD_DQ_F32_D64],
                [ATTENTION_BACKWARD_DQ_DROPOUT_F32, ATTENTION_BACKWARD_DQ_DROPOUT_F32_D32, ATTENTION_BACKWARD_DQ_DROPOUT_F32_D64],
            ],
            [
                [ATTENTION_BACKWARD_DQ_BF16IO, ATTENTION_BACKWARD_DQ_BF16IO_D32, ATTENTION_BACKWARD_DQ_BF16IO_D64],
                [ATTENTION_BACKWARD_DQ_DROPOUT_BF16IO, ATTENTION_BACKWARD_DQ_DROPOUT_BF16IO_D32, ATTENTION_BACKWARD_DQ_DROPOUT_BF16IO_D64],
            ],
            [
                [ATTENTION_BACKWARD_DQ_F16IO, ATTENTION_BACKWARD_DQ_F16IO_D32, ATTENTION_BACKWARD_DQ_F16IO_D64],
                [ATTENTION_BACKWARD_DQ_DROPOUT_F16IO, ATTENTION_BACKWARD_DQ_DROPOUT_F16IO_D32, ATTENTION_BACKWARD_DQ_DROPOUT_F16IO_D64],
            ],
        ];
        const PREP: [KernelName; 3] = [ATTENTION_BACKWARD_PREP_F32, ATTENTION_BACKWARD_PREP_BF16IO, ATTENTION_BACKWARD_PREP_F16IO];
        let d = dropout as usize;
        Ok([PREP[t], DKV[t][d][width], DQ[t][d][width]])
    }

    /// Dynamic shared memory of the dK/dV kernel, laid out as the kernel does: K and V tiles
    /// `2·32·ldk`, Q and dO `2·rows·ldq`, p and dS `2·rows·32`, row stats `4·rows` floats, with
    /// `rows = 4W` and `ldq`, `ldk` as in [`AttentionPlan::shared_mem_bytes`].
    pub fn dkv_shared_mem_bytes(&self, head_dim: usize) -> usize {
        let (ldq, ldk) = strides(head_dim);
        let rows = self.dkv_warps as usize * ROWS_PER_WARP;
        (2 * KEY_TILE * ldk + 2 * rows * ldq + 2 * rows * KEY_TILE + 4 * rows) * std::mem::size_of::<f32>()
    }

    /// Dynamic shared memory of the dQ kernel: as the dK/dV kernel's with dS only (no p).
    pub fn dq_shared_mem_bytes(&self, head_dim: usize) -> usize {
        let (ldq, ldk) = strides(head_dim);
        let rows = self.dq_warps as usize * ROWS_PER_WARP;
        (2 * KEY_TILE * ldk + 2 * rows * ldq + rows * KEY_TILE + 4 * rows) * std::mem::size_of::<f32>()
    }

    /// Checks the plan against the kernels' contract for head dim `head_dim`.
    pub fn validate(&self, head_dim: usize) -> Result<()> {
        let bad = |msg: String| Err(Error::shape(BWD_OP, format!("launch plan {self:?}: {msg}")));
        if self.dkv_warps != 4 && self.dkv_warps != 8 {
            return bad("dkv_warps must be 4 or 8".into());
        }
        if self.dq_warps == 0 || self.dq_warps > MAX_WARPS_PER_BLOCK {
            return bad(format!("dq_warps must be in 1..={MAX_WARPS_PER_BLOCK}"));
        }
        if head_dim == 0 || head_dim > MAX_HEAD_DIM {
            return bad(format!("head dim {head_dim} is outside 1..={MAX_HEAD_DIM}"));
        }
        for (what, smem) in [("dK/dV", self.dkv_shared_mem_bytes(head_dim)), ("dQ", self.dq_shared_mem_bytes(head_dim))] {
            if smem > MAX_BACKWARD_SHARED_BYTES {
                return bad(format!("the {what} kernel needs {smem} bytes of shared memory for head dim {head_dim}, more than {MAX_BACKWARD_SHARED_BYTES}"));
            }
        }
        Ok(())
    }

    /// Grids, blocks and dynamic shared memory of the (prep, dK/dV, dQ) launches; the sizes must
    /// have passed [`AttentionBackwardSizes::check`].
    pub fn launch_configs(&self, batch: usize, seq: usize, heads: usize, head_dim: usize) -> [LaunchConfig; 3] {
        let bh = batch * heads;
        let prep = LaunchConfig {
            grid_dim: ((bh * seq).div_ceil(BACKWARD_PREP_WARPS as usize) as u32, 1, 1),
            block_dim: (32, BACKWARD_PREP_WARPS, 1),
            shared_mem_bytes: 0,
        };
        let dkv = LaunchConfig {
            grid_dim: ((bh * seq.div_ceil(KEY_TILE)) as u32, 1, 1),
            block_dim: (32, self.dkv_warps, 1),
            shared_mem_bytes: self.dkv_shared_mem_bytes(head_dim) as u32,
        };
        let dq = LaunchConfig {
            grid_dim: ((bh * seq.div_ceil(self.dq_warps as usize * ROWS_PER_WARP)) as u32, 1, 1),
            block_dim: (32, self.dq_warps, 1),
            shared_mem_bytes: self.dq_shared_mem_bytes(head_dim) as u32,
        };
        [prep, dkv, dq]
    }
}

/// `(ldq, ldk)`: a row of `head_dim` floats rounded up to a float4, and that or 4 more so that
/// `ldk / 4` is odd (the kernels' shared-memory strides).
fn strides(head_dim: usize) -> (usize, usize) {
    let ldq = head_dim.div_ceil(4) * 4;
    (ldq, if (ldq / 4) % 2 == 1 { ldq } else { ldq + 4 })
}

/// Floats of workspace the backward needs: `(D, c)` per row of `[batch, heads, seq]`.
pub fn attention_backward_workspace_len(batch: usize, seq: usize, heads: usize) -> Result<usize> {
    batch
        .checked_mul(heads)
        .and_then(|n| n.checked_mul(seq))
        .and_then(|n| n.checked_mul(2))
        .ok_or_else(|| Error::shape(BWD_OP, format!("the workspace for batch {batch} x {heads} heads x seq {seq} overflows usize")))
}

/// The lengths a backward launch needs, checked before anything is allocated or enqueued.
/// `workspace: None` skips its check (the allocating launcher sizes it itself).
#[derive(Clone, Copy, Debug)]
pub struct AttentionBackwardSizes {
    pub batch: usize,
    pub seq: usize,
    pub hidden: usize,
    pub heads: usize,
    pub dctx: usize,
    pub qkv: usize,
    pub ctx: usize,
    pub lse: usize,
    pub mask: usize,
    pub dqkv: usize,
    pub workspace: Option<usize>,
}

impl AttentionBackwardSizes {
    pub fn check(&self) -> Result<AttentionDims> {
        let AttentionBackwardSizes { batch, seq, hidden, heads, .. } = *self;
        let forward = AttentionSizes { batch, seq, hidden, heads, qkv: self.qkv, mask: self.mask, ctx: self.ctx, lse: self.lse };
        let dims = forward.check().map_err(|e| match e {
            Error::Shape { msg, .. } => Error::shape(BWD_OP, msg),
            other => other,
        })?;
        let fail = |msg: String| Err(Error::shape(BWD_OP, msg));
        // Lengths that passed the forward's check: B·T·H and B·T·3H fit in usize.
        let (ctx_len, qkv_len) = (batch * seq * hidden, batch * seq * 3 * hidden);
        if self.dctx != ctx_len {
            return fail(format!("dctx has {} elements, expected {ctx_len} (batch·seq·hidden) for batch={batch}, seq={seq}, hidden={hidden}, heads={heads}", self.dctx));
        }
        if self.dqkv != qkv_len {
            return fail(format!("dqkv has {} elements, expected {qkv_len} (batch·seq·3·hidden) for batch={batch}, seq={seq}, hidden={hidden}, heads={heads}", self.dqkv));
        }
        // The prep kernel takes the row count B·heads·T as an int (lse has that many elements).
        if self.lse > i32::MAX as usize {
            return fail(format!("batch {batch} x {heads} heads x seq {seq} rows do not fit in an i32"));
        }
        if let Some(ws) = self.workspace {
            let need = 2 * self.lse;
            if ws < need {
                return fail(format!("workspace has {ws} elements, expected at least {need} (2·batch·heads·seq) for batch={batch}, seq={seq}, heads={heads}"));
            }
        }
        Ok(dims)
    }
}

/// Fails when two device ranges, each (address, length in bytes), overlap (the kernels' pointers
/// are `__restrict__`).
fn bwd_disjoint(names: (&str, &str), a: (u64, usize), b: (u64, usize)) -> Result<()> {
    disjoint_bytes(names, a, b).map_err(|_| Error::Input(format!("{BWD_OP}: {} overlaps {}; outputs must not alias inputs or each other", names.0, names.1)))
}

/// Gradient of [`attention_packed_forward`] with the automatic launch plan, allocating its
/// workspace: `dqkv` (`[batch, seq, 3·hidden]`, dQ, dK, dV side by side) from the output gradient
/// `dctx` (`[batch, seq, hidden]`), the forward's input `qkv`, output `ctx` and row log-sum-exp
/// `lse` (`[batch, heads, seq]`), and its `mask_bias` (`[B_mask, seq]`, batch row `b` reading
/// mask row `b % B_mask`). Every element of `dqkv` is written. `dctx`, `qkv`, `ctx` and `dqkv`
/// are f32, or bf16 / f16 (the `_bf16io` / `_f16io` kernels: f32 arithmetic, dqkv rounded once); `lse` and the
/// mask f32.
#[allow(clippy::too_many_arguments)] // the forward's operands, its output and the two gradients
pub fn attention_packed_backward<A: ActivationScalar>(
    gpu: &Gpu,
    dctx: &DeviceView<A>,
    qkv: &DeviceView<A>,
    ctx: &DeviceView<A>,
    lse: &DeviceView<f32>,
    mask_bias: &DeviceView<f32>,
    dqkv: &mut DeviceViewMut<A>,
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
) -> Result<()> {
    attention_packed_backward_dropout_as(gpu, dctx, qkv, ctx, lse, mask_bias, dqkv, batch, seq, hidden, heads, None)
}

/// [`attention_packed_backward`] of [`attention_packed_forward_dropout`], f32 storage: `ctx` is
/// that forward's (dropped) output, and each probability's factor is drawn again from `dropout`.
/// [`attention_packed_backward_dropout_as`] is the same for any activation type; this one keeps
/// the element type fixed so callers whose views are typed by inference need not name it.
#[allow(clippy::too_many_arguments)]
pub fn attention_packed_backward_dropout(
    gpu: &Gpu,
    dctx: &DeviceView<f32>,
    qkv: &DeviceView<f32>,
    ctx: &DeviceView<f32>,
    lse: &DeviceView<f32>,
    mask_bias: &DeviceView<f32>,
    dqkv: &mut DeviceViewMut<f32>,
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    dropout: Option<&DeviceDropout<'_>>,
) -> Result<()> {
    attention_packed_backward_dropout_as(gpu, dctx, qkv, ctx, lse, mask_bias, dqkv, batch, seq, hidden, heads, dropout)
}

/// [`attention_packed_backward_dropout`] with `dctx`, `qkv`, `ctx` and `dqkv` stored as `A`
/// (f32, bf16 or f16, as in [`attention_packed_backward`]).
#[allow(clippy::too_many_arguments)]
pub fn attention_packed_backward_dropout_as<A: ActivationScalar>(
    gpu: &Gpu,
    dctx: &DeviceView<A>,
    qkv: &DeviceView<A>,
    ctx: &DeviceView<A>,
    lse: &DeviceView<f32>,
    mask_bias: &DeviceView<f32>,
    dqkv: &mut DeviceViewMut<A>,
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    dropout: Option<&DeviceDropout<'_>>,
) -> Result<()> {
    let sizes = AttentionBackwardSizes {
        batch,
        seq,
        hidden,
        heads,
        dctx: dctx.len(),
        qkv: qkv.len(),
        ctx: ctx.len(),
        lse: lse.len(),
        mask: mask_bias.len(),
        dqkv: dqkv.len(),
        workspace: None,
    };
    sizes.check()?;
    let plan = AttentionBackwardPlan::auto(batch, seq, heads);
    let mut ws = gpu.alloc::<f32>(attention_backward_workspace_len(batch, seq, heads)?)?;
    backward_launch(gpu, dctx, qkv, ctx, lse, mask_bias, dqkv, &mut ws.view_mut(), batch, seq, hidden, heads, plan, dropout)
}

/// As [`attention_packed_backward`], with caller-owned scratch (`workspace`: at least
/// [`attention_backward_workspace_len`] floats; nothing is allocated) and an explicit launch
/// plan (validated). f32, bf16 or f16 storage as in [`attention_packed_backward`].
#[allow(clippy::too_many_arguments)]
pub fn attention_packed_backward_with<A: ActivationScalar>(
    gpu: &Gpu,
    dctx: &DeviceView<A>,
    qkv: &DeviceView<A>,
    ctx: &DeviceView<A>,
    lse: &DeviceView<f32>,
    mask_bias: &DeviceView<f32>,
    dqkv: &mut DeviceViewMut<A>,
    workspace: &mut DeviceViewMut<f32>,
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    plan: AttentionBackwardPlan,
) -> Result<()> {
    backward_launch(gpu, dctx, qkv, ctx, lse, mask_bias, dqkv, workspace, batch, seq, hidden, heads, plan, None)
}

#[allow(clippy::too_many_arguments)]
fn backward_launch<A: ActivationScalar>(
    gpu: &Gpu,
    dctx: &DeviceView<A>,
    qkv: &DeviceView<A>,
    ctx: &DeviceView<A>,
    lse: &DeviceView<f32>,
    mask_bias: &DeviceView<f32>,
    dqkv: &mut DeviceViewMut<A>,
    workspace: &mut DeviceViewMut<f32>,
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    plan: AttentionBackwardPlan,
    dropout: Option<&DeviceDropout<'_>>,
) -> Result<()> {
    let sizes = AttentionBackwardSizes {
        batch,
        seq,
        hidden,
        heads,
        dctx: dctx.len(),
        qkv: qkv.len(),
        ctx: ctx.len(),
        lse: lse.len(),
        mask: mask_bias.len(),
        dqkv: dqkv.len(),
        workspace: Some(workspace.len()),
    };
    let AttentionDims { head_dim, mask_rows } = sizes.check()?;
    plan.validate(head_dim)?;
    let act = |v: &DeviceView<A>| byte_range::<A>(v.device_ptr(), v.len());
    let f = |v: &DeviceView<f32>| byte_range::<f32>(v.device_ptr(), v.len());
    let inputs = [("dctx", act(dctx)), ("qkv", act(qkv)), ("ctx", act(ctx)), ("lse", f(lse)), ("mask_bias", f(mask_bias))];
    let (out, ws) = (byte_range::<A>(dqkv.device_ptr(), dqkv.len()), byte_range::<f32>(workspace.device_ptr(), workspace.len()));
    for (name, r) in inputs {
        bwd_disjoint(("dqkv", name), out, r)?;
        bwd_disjoint(("workspace", name), ws, r)?;
    }
    bwd_disjoint(("dqkv", "workspace"), out, ws)?;
    let drop = dropout.map(|d| dropout_args(BWD_OP, d, batch, heads, seq)).transpose()?.flatten();
    let [prep_kernel, dkv_kernel, dq_kernel] = plan.kernels_for(A::DTYPE, head_dim, drop.is_some())?;
    if batch == 0 || seq == 0 {
        return Ok(()); // a zero-sized grid is a launch error; there is nothing to do
    }
    let [prep_cfg, dkv_cfg, dq_cfg] = plan.launch_configs(batch, seq, heads, head_dim);
    for (kernel, cfg) in [(dkv_kernel, &dkv_cfg), (dq_kernel, &dq_cfg)] {
        let bytes = cfg.shared_mem_bytes as usize;
        if bytes > gpu.dynamic_shared_limit(kernel) {
            gpu.allow_dynamic_shared(kernel, bytes)?;
        }
    }
    let scale = (1.0 / (head_dim as f64).sqrt()) as f32;
    let rows = (batch * heads * seq) as i32; // checked to fit
    let ws_arg = workspace.arg();
    // The prep kernel's parameters (dctx, ctx, qkv of A): rowstat, dctx, ctx, qkv, lse, mask_bias, rows, seq, hidden,
    // heads, mask_rows, scale; Gpu::launch checks them against kernels/attention.cu.
    let prep_args = [
        ws_arg,
        A::act_arg(dctx),
        A::act_arg(ctx),
        A::act_arg(qkv),
        lse.arg(),
        mask_bias.arg(),
        KernelArg::I32(rows),
        KernelArg::I32(seq as i32),
        KernelArg::I32(hidden as i32),
        KernelArg::I32(heads as i32),
        KernelArg::I32(mask_rows as i32),
        KernelArg::F32(scale),
    ];
    // The main kernels' (pointers to A as `unsigned short*` for bf16 and f16): dqkv, dctx, qkv, lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale.
    let main_args = [
        A::act_arg_mut(dqkv),
        A::act_arg(dctx),
        A::act_arg(qkv),
        lse.arg(),
        ws_arg,
        mask_bias.arg(),
        KernelArg::I32(seq as i32),
        KernelArg::I32(hidden as i32),
        KernelArg::I32(heads as i32),
        KernelArg::I32(mask_rows as i32),
        KernelArg::F32(scale),
    ];
    let main_args: Vec<KernelArg> = main_args.into_iter().chain(drop.into_iter().flatten()).collect();
    // SAFETY: every view was checked above to have exactly the length the kernels index for these
    // sizes (dctx and ctx B·T·H, qkv and dqkv B·T·3H elements of A, lse B·heads·T, the workspace
    // at least 2·B·heads·T, the mask a multiple of T whose row count divides B); the kernels read
    // and write A (kernels_for); the outputs (dqkv, the workspace) alias nothing (byte ranges);
    // the plan fits the kernels' block and shared-memory contract (opted
    // in above where over 48 KiB; the specialised kernels run only when hidden = d·heads with their
    // d). The three launches run in stream order: the workspace is written before it is read.
    unsafe {
        gpu.launch(prep_kernel, prep_cfg, &prep_args)?;
        gpu.launch(dkv_kernel, dkv_cfg, &main_args)?;
        gpu.launch(dq_kernel, dq_cfg, &main_args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(batch: usize, seq: usize, hidden: usize, heads: usize, mask_rows: usize) -> AttentionSizes {
        AttentionSizes { batch, seq, hidden, heads, qkv: batch * seq * 3 * hidden, mask: mask_rows * seq, ctx: batch * seq * hidden, lse: batch * heads * seq }
    }

    #[test]
    fn consistent_sizes_pass() {
        assert_eq!(sizes(3, 7, 40, 5, 3).check().unwrap(), AttentionDims { head_dim: 8, mask_rows: 3 });
        assert_eq!(sizes(6, 33, 64, 2, 3).check().unwrap().mask_rows, 3);
        assert_eq!(sizes(4, 512, 768, 12, 1).check().unwrap().head_dim, 64);
        assert_eq!(sizes(1, 1, 128, 1, 1).check().unwrap().head_dim, 128);
        assert_eq!(sizes(0, 7, 8, 1, 1).check().unwrap().mask_rows, 1);
        assert_eq!(sizes(2, 0, 8, 1, 0).check().unwrap().mask_rows, 0);
    }

    #[test]
    fn every_wrong_size_is_a_shape_error() {
        let ok = sizes(4, 7, 48, 3, 2);
        let cases = [
            AttentionSizes { qkv: ok.qkv - 1, ..ok },
            AttentionSizes { qkv: ok.qkv + 48, ..ok },
            AttentionSizes { ctx: ok.ctx + 1, ..ok },
            AttentionSizes { lse: ok.lse - 7, ..ok },
            AttentionSizes { mask: 0, ..ok },
            AttentionSizes { mask: 13, ..ok },     // not a multiple of seq
            AttentionSizes { mask: 3 * 7, ..ok },  // 3 rows do not divide batch 4
            AttentionSizes { mask: 8 * 7, ..ok },  // more rows than the batch
            AttentionSizes { heads: 0, ..ok },
            AttentionSizes { heads: 5, ..ok },     // 48 % 5
            sizes(1, 1, 129, 1, 1),               // head dim above 128
            sizes(1, 1, 0, 1, 1),                 // head dim 0
            sizes(1, 513, 8, 1, 1),               // seq above 512
            AttentionSizes { mask: 7, ..sizes(2, 0, 8, 1, 0) }, // seq 0 with a mask
        ];
        for c in cases {
            let err = c.check().unwrap_err();
            assert!(matches!(err, Error::Shape { .. }), "{c:?}: {err}");
        }
        let e = AttentionSizes { ctx: ok.ctx + 1, ..ok }.check().unwrap_err().to_string();
        assert!(e.contains("ctx has 1345 elements, expected 1344"), "{e}");
        let e = AttentionSizes { mask: 3 * 7, ..ok }.check().unwrap_err().to_string();
        assert!(e.contains("mask_bias has 21 elements") && e.contains("dividing batch 4"), "{e}");
        let huge = AttentionSizes { batch: usize::MAX / 2, ..ok };
        assert!(huge.check().is_err());
    }

    #[test]
    fn auto_plans_follow_the_documented_rules() {
        // Short sequences: no more warps than rows; small grids: fewer rows per block.
        assert_eq!(AttentionPlan::auto(1, 1, 1).warps_per_block, 1);
        assert_eq!(AttentionPlan::auto(1, 7, 1).warps_per_block, 1);
        assert_eq!(AttentionPlan::auto(64, 7, 12).warps_per_block, 2);
        assert_eq!(AttentionPlan::auto(32, 128, 12).warps_per_block, 4); // BERT-base batch 32: 3072 blocks
        assert_eq!(AttentionPlan::auto(1, 128, 12).warps_per_block, 1); // 12 (b, h): 384 blocks of one warp
        assert_eq!(AttentionPlan::auto(8, 512, 12).warps_per_block, 4);
        for (b, t, h) in [(1, 1, 1), (3, 33, 4), (1, 512, 12), (64, 512, 16)] {
            let p = AttentionPlan::auto(b, t, h);
            assert!(p.specialised);
            for d in [1, 8, 20, 32, 64, 127, 128] {
                p.validate(d).unwrap();
            }
        }
    }

    #[test]
    fn shared_memory_follows_the_kernel_layout() {
        let p = |w| AttentionPlan { warps_per_block: w, specialised: true };
        // d = 64: ldq 64, ldk 68 (17 float4s, odd); 16 rows.
        assert_eq!(p(4).shared_mem_bytes(64), (32 * 68 + 32 * 64 + 16 * 64 + 16 * 32) * 4);
        // d = 20: ldq = ldk = 20 (5 float4s, odd).
        assert_eq!(p(1).shared_mem_bytes(20), (32 * 20 + 32 * 20 + 4 * 20 + 4 * 32) * 4);
        // d = 1: ldq 4, ldk 4.
        assert_eq!(p(1).shared_mem_bytes(1), (32 * 4 + 32 * 4 + 4 * 4 + 4 * 32) * 4);
        assert_eq!(p(4).shared_mem_bytes(128), (32 * 132 + 32 * 128 + 16 * 128 + 16 * 32) * 4);
        p(4).validate(128).unwrap();
        p(8).validate(96).unwrap();
        let e = p(8).validate(128).unwrap_err().to_string(); // 52.5 KiB
        assert!(e.contains("needs 53760 bytes of shared memory for head dim 128, more than 49152"), "{e}");
    }

    #[test]
    fn invalid_plans_are_rejected_and_kernels_chosen() {
        for w in [0, 9, 32] {
            assert!(AttentionPlan { warps_per_block: w, specialised: true }.validate(64).is_err(), "{w}");
        }
        let p = AttentionPlan { warps_per_block: 2, specialised: true };
        assert!(p.validate(0).is_err());
        assert!(p.validate(129).is_err());
        assert_eq!(p.kernel(32).name, "attention_forward_f32_d32");
        assert_eq!(p.kernel(64).name, "attention_forward_f32_d64");
        assert_eq!(p.kernel(48).name, "attention_forward_f32");
        assert_eq!(AttentionPlan { specialised: false, ..p }.kernel(64).name, "attention_forward_f32");
    }

    #[test]
    fn storage_types_pick_their_kernels() {
        let p = AttentionPlan { warps_per_block: 2, specialised: true };
        let generic = AttentionPlan { specialised: false, ..p };
        let name = |plan: AttentionPlan, dtype, d| plan.kernel_for(dtype, d).unwrap().name;
        for d in [8, 24, 32, 64, 128] {
            assert_eq!(name(p, DType::F32, d), p.kernel(d).name, "d {d}");
        }
        for (dtype, io) in [(DType::BF16, "bf16io"), (DType::F16, "f16io")] {
            assert_eq!(name(p, dtype, 32), format!("attention_forward_{io}_d32"));
            assert_eq!(name(p, dtype, 64), format!("attention_forward_{io}_d64"));
            assert_eq!(name(p, dtype, 24), format!("attention_forward_{io}"));
            assert_eq!(name(generic, dtype, 64), format!("attention_forward_{io}"));
            for suffix in ["", "_d32", "_d64"] {
                let (base, drop) = (format!("attention_forward_{io}{suffix}"), format!("attention_forward_dropout_{io}{suffix}"));
                let k = [32, 64, 8].iter().map(|&d| p.kernel_for(dtype, d).unwrap()).find(|k| k.name == base).unwrap();
                assert_eq!(dropout_kernel(k).name, drop);
            }
        }
        assert_eq!(dropout_kernel(p.kernel_for(DType::F32, 64).unwrap()).name, "attention_forward_dropout_f32_d64");
        let e = p.kernel_for(DType::U32, 64).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
        assert!(e.to_string().contains("take f32, bf16 or f16"), "{e}");
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let f = |p: u64, n: usize| byte_range::<f32>(p, n);
        assert!(disjoint_bytes(("a", "b"), f(0, 4), f(16, 4)).is_ok());
        assert!(disjoint_bytes(("a", "b"), f(0, 5), f(16, 4)).is_err());
        assert!(disjoint_bytes(("a", "b"), f(16, 4), f(0, 5)).is_err());
        assert!(disjoint_bytes(("a", "b"), f(0, 0), f(0, 4)).is_ok());
        // bf16 elements are 2 bytes: 8 of them end where 4 floats would.
        assert!(disjoint_bytes(("a", "b"), byte_range::<half::bf16>(0, 8), f(16, 4)).is_ok());
        assert!(disjoint_bytes(("a", "b"), byte_range::<half::bf16>(0, 9), f(16, 4)).is_err());
    }
}

#[cfg(test)]
mod backward_tests {
    use super::*;

    fn sizes(batch: usize, seq: usize, hidden: usize, heads: usize, mask_rows: usize) -> AttentionBackwardSizes {
        let (ctx, qkv, lse) = (batch * seq * hidden, batch * seq * 3 * hidden, batch * heads * seq);
        AttentionBackwardSizes { batch, seq, hidden, heads, dctx: ctx, qkv, ctx, lse, mask: mask_rows * seq, dqkv: qkv, workspace: Some(2 * lse) }
    }

    #[test]
    fn consistent_sizes_pass() {
        assert_eq!(sizes(3, 7, 40, 5, 3).check().unwrap(), AttentionDims { head_dim: 8, mask_rows: 3 });
        assert_eq!(sizes(6, 33, 64, 2, 3).check().unwrap().mask_rows, 3);
        assert_eq!(sizes(4, 512, 768, 12, 1).check().unwrap().head_dim, 64);
        assert_eq!(sizes(0, 7, 8, 1, 1).check().unwrap().mask_rows, 1);
        assert_eq!(sizes(2, 0, 8, 1, 0).check().unwrap().mask_rows, 0);
        // A larger workspace (an arena slot) is fine; none at all skips the check.
        AttentionBackwardSizes { workspace: Some(1000), ..sizes(1, 7, 8, 1, 1) }.check().unwrap();
        AttentionBackwardSizes { workspace: None, ..sizes(1, 7, 8, 1, 1) }.check().unwrap();
        assert_eq!(attention_backward_workspace_len(3, 7, 5).unwrap(), 210);
        assert!(attention_backward_workspace_len(usize::MAX, 2, 1).is_err());
    }

    #[test]
    fn every_wrong_size_is_a_shape_error_of_the_backward() {
        let ok = sizes(4, 7, 48, 3, 2);
        let cases = [
            (AttentionBackwardSizes { dctx: ok.dctx - 1, ..ok }, "dctx has 1343 elements, expected 1344"),
            (AttentionBackwardSizes { qkv: ok.qkv + 1, ..ok }, "qkv has 4033 elements, expected 4032"),
            (AttentionBackwardSizes { ctx: ok.ctx + 48, ..ok }, "ctx has 1392 elements"),
            (AttentionBackwardSizes { lse: ok.lse - 1, ..ok }, "lse has 83 elements, expected 84"),
            (AttentionBackwardSizes { dqkv: ok.dqkv - 3, ..ok }, "dqkv has 4029 elements, expected 4032"),
            (AttentionBackwardSizes { workspace: Some(167), ..ok }, "workspace has 167 elements, expected at least 168"),
            (AttentionBackwardSizes { mask: 3 * 7, ..ok }, "mask_bias has 21 elements"),
            (AttentionBackwardSizes { mask: 0, ..ok }, "mask_bias has 0 elements"),
            (AttentionBackwardSizes { heads: 5, ..ok }, "hidden 48 is not divisible by 5 heads"),
            (sizes(1, 1, 129, 1, 1), "head dim 129"),
            (sizes(1, 513, 8, 1, 1), "sequence length 513 exceeds 512"),
        ];
        for (c, needle) in cases {
            match c.check() {
                Err(Error::Shape { op, msg }) => {
                    assert_eq!(op, BWD_OP, "{c:?}");
                    assert!(msg.contains(needle), "{c:?}: `{msg}` does not mention `{needle}`");
                }
                other => panic!("{c:?}: expected a shape error, got {other:?}"),
            }
        }
        let huge = AttentionBackwardSizes { batch: usize::MAX / 2, ..ok };
        assert!(huge.check().is_err());
    }

    #[test]
    fn auto_plans_follow_the_documented_rules() {
        let p = AttentionBackwardPlan::auto(1, 128, 12); // 48 dK/dV blocks: 8 warps
        assert_eq!((p.dkv_warps, p.dq_warps), (8, 1));
        let p = AttentionBackwardPlan::auto(32, 128, 12); // 1536 blocks
        assert_eq!((p.dkv_warps, p.dq_warps), (4, 4));
        assert_eq!(AttentionBackwardPlan::auto(1, 7, 1).dkv_warps, 4); // one 16-row step
        for (b, t, h) in [(1, 1, 1), (3, 33, 4), (1, 512, 12), (64, 512, 16)] {
            let p = AttentionBackwardPlan::auto(b, t, h);
            assert!(p.specialised);
            for d in [1, 8, 20, 32, 64, 127, 128] {
                p.validate(d).unwrap();
            }
        }
    }

    #[test]
    fn shared_memory_follows_the_kernel_layout() {
        let p = |dkv, dq| AttentionBackwardPlan { dkv_warps: dkv, dq_warps: dq, specialised: true };
        // d = 64: ldq 64, ldk 68; 16 rows.
        assert_eq!(p(4, 4).dkv_shared_mem_bytes(64), (2 * 32 * 68 + 2 * 16 * 64 + 2 * 16 * 32 + 4 * 16) * 4);
        assert_eq!(p(4, 4).dq_shared_mem_bytes(64), (2 * 32 * 68 + 2 * 16 * 64 + 16 * 32 + 4 * 16) * 4);
        // d = 20: ldq = ldk = 20; d = 1: 4 and 4.
        assert_eq!(p(4, 1).dq_shared_mem_bytes(20), (2 * 32 * 20 + 2 * 4 * 20 + 4 * 32 + 4 * 4) * 4);
        assert_eq!(p(8, 1).dkv_shared_mem_bytes(1), (2 * 32 * 4 + 2 * 32 * 4 + 2 * 32 * 32 + 4 * 32) * 4);
        // Every d fits 48 KiB with 4 warps up to d = 100; the largest plan needs 73.5 KiB.
        assert!(p(4, 4).dkv_shared_mem_bytes(100) <= 48 * 1024);
        assert!(p(4, 4).dkv_shared_mem_bytes(128) > 48 * 1024);
        assert_eq!(p(8, 8).dkv_shared_mem_bytes(128), 75264);
        p(8, 8).validate(128).unwrap();
    }

    #[test]
    fn invalid_plans_are_rejected_and_kernels_chosen() {
        let p = AttentionBackwardPlan { dkv_warps: 4, dq_warps: 2, specialised: true };
        for w in [0, 1, 2, 3, 5, 16] {
            assert!(AttentionBackwardPlan { dkv_warps: w, ..p }.validate(64).is_err(), "dkv {w}");
        }
        for w in [0, 9] {
            assert!(AttentionBackwardPlan { dq_warps: w, ..p }.validate(64).is_err(), "dq {w}");
        }
        assert!(p.validate(0).is_err());
        assert!(p.validate(129).is_err());
        assert_eq!(p.dkv_kernel(32).name, "attention_backward_dkv_f32_d32");
        assert_eq!(p.dq_kernel(64).name, "attention_backward_dq_f32_d64");
        assert_eq!(p.dkv_kernel(48).name, "attention_backward_dkv_f32");
        assert_eq!(AttentionBackwardPlan { specialised: false, ..p }.dq_kernel(64).name, "attention_backward_dq_f32");
        let names = |plan: AttentionBackwardPlan, dtype, d, drop| plan.kernels_for(dtype, d, drop).unwrap().map(|k| k.name);
        let generic = AttentionBackwardPlan { specialised: false, ..p };
        for d in [8, 32, 64, 128] {
            assert_eq!(names(p, DType::F32, d, false), ["attention_backward_prep_f32", p.dkv_kernel(d).name, p.dq_kernel(d).name], "d {d}");
        }
        assert_eq!(names(p, DType::F32, 32, true), ["attention_backward_prep_f32", "attention_backward_dkv_dropout_f32_d32", "attention_backward_dq_dropout_f32_d32"]);
        assert_eq!(names(generic, DType::F32, 64, true), ["attention_backward_prep_f32", "attention_backward_dkv_dropout_f32", "attention_backward_dq_dropout_f32"]);
        for (dtype, io) in [(DType::BF16, "bf16io"), (DType::F16, "f16io")] {
            let prep = format!("attention_backward_prep_{io}");
            assert_eq!(names(p, dtype, 24, false), [prep.clone(), format!("attention_backward_dkv_{io}"), format!("attention_backward_dq_{io}")]);
            assert_eq!(names(p, dtype, 32, false), [prep.clone(), format!("attention_backward_dkv_{io}_d32"), format!("attention_backward_dq_{io}_d32")]);
            assert_eq!(names(p, dtype, 64, true), [prep.clone(), format!("attention_backward_dkv_dropout_{io}_d64"), format!("attention_backward_dq_dropout_{io}_d64")]);
            assert_eq!(names(generic, dtype, 64, false), [prep.clone(), format!("attention_backward_dkv_{io}"), format!("attention_backward_dq_{io}")]);
            assert_eq!(names(generic, dtype, 32, true), [prep, format!("attention_backward_dkv_dropout_{io}"), format!("attention_backward_dq_dropout_{io}")]);
        }
        let e = p.kernels_for(DType::U32, 64, false).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)) && e.to_string().contains("take f32, bf16 or f16"), "{e}");
        let [prep, dkv, dq] = p.launch_configs(3, 33, 4, 64);
        assert_eq!((prep.grid_dim.0, prep.block_dim), ((3 * 4 * 33_u32).div_ceil(8), (32, 8, 1)));
        assert_eq!((dkv.grid_dim.0, dkv.block_dim), (3 * 4 * 2, (32, 4, 1)));
        assert_eq!((dq.grid_dim.0, dq.block_dim), (3 * 4 * 5, (32, 2, 1)));
    }
}
