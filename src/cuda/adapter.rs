//! Launcher for `kernels/adapter.cu`: one adapter location (pre step, N bottleneck cores, post
//! step; spec §3.4, §4, §6) for all N Parallel branches in one launch, the CUDA twin of
//! `Backend::adapter_location`.
//!
//! - [`LocationDescriptors`]: built once per setup from the branches' device weights
//!   ([`BranchWeights`]); validates every length against H and the bottleneck and uploads one
//!   152-byte [`BranchDescriptor`] per branch. The kernel finds a row's branch from its index and
//!   reads that branch's descriptor, so the branches need neither a loop nor a launch each.
//! - [`adapter_location_forward`]: pure size checks first ([`LocationSizes`], [`Error::Shape`]
//!   naming the operand), then at most two launches: the gate means when a branch has a gate (a
//!   cross-row reduction over each example), then the location itself.
//! - [`LocationPath`]: the fused kernel above, or the split path
//!   ([`adapter_location_forward_split`]: a pre kernel, the two bottleneck products per branch on
//!   [`Gpu::gemm`], a post kernel; the same semantics and dropout masks, few launches, no weight
//!   re-read per row). [`LocationPath::auto`] takes Split on a GPU and Fused on cuda-sim;
//!   [`adapter_location_forward_on`] dispatches. In the 16-bit pipelines the split forward can
//!   run its products on tensor cores instead ([`SplitForward::TensorCores`]: two launches a
//!   location, no GEMM). The backward has the same two paths
//!   ([`adapter_location_backward`], [`adapter_location_backward_split`]: row kernels around the
//!   products on [`Gpu::gemm`], its recompute on the tensor cores where the forward ran there),
//!   dispatched by [`adapter_location_backward_on`].
//! - [`LocationPlan`]: threads per row and rows per block. [`LocationPlan::auto`] takes one warp
//!   per row, up to 8 rows per block, for H <= 1024 (no block barriers at all), else one block per
//!   row with about 16 columns per thread.
//!
//! Replication (spec §6.1): with `replicate`, `h` and `r` are the shared `[B, T, H]` rows and
//! every branch reads them by index; nothing is tiled in memory.
//!
//! Storage: every adapter weight and the gate means are f32. The location's BERT LayerNorm γ, β
//! are f32, bf16 or f16 (a frozen base loaded in bf16 / f16), and the activations `h`, `r`, `out`
//! f32, bf16 or f16: [`LocationInputs`] / [`LocationOutputs`] are generic over γ/β's
//! [`BaseScalar`] `P` and the activations' [`ActivationScalar`] `A`, and `(A, P)` picks the
//! kernels (the same templated bodies): (f32, f32) the `_f32` ones, (f32, bf16) the `_bf16` ones
//! (γ, β widened exactly on load), (bf16, bf16) the `_bf16io` ones (h, r widened exactly, out
//! rounded once on store, to nearest even); (f32, f16) and (f16, f16) likewise the `_f16` and
//! `_f16io` ones. 16-bit activations over another LayerNorm type have no kernel:
//! `Error::Unsupported`. The fused backward takes f32 only; the split backward takes f32, (bf16,
//! bf16) and (f16, f16) activations and LayerNorm (`_bf16io` / `_f16io`: h, r, d_out, dh, dr in
//! 16 bits; weights, their gradients and the workspace f32).
//!
//! The adapter's own dropout (training with `dropout > 0`, spec §3.4: on the scaled up projection,
//! before the gate and the residual) is in the same launch: each branch's p and Philox stream
//! ([`BranchDropout`]) are in its descriptor, the seed ([`DropoutSeed`]: the model's device
//! buffer, or a value) is a launch argument, and the masks are the CPU backend's bit for bit (its
//! `apply_dropout` of the branch's `[B, T, H]` block). The backward applies the same masks.
//! [`location_dropout`] turns a location's `DropoutSpec`s into these. The bottleneck may be at most
//! [`MAX_BOTTLENECK`].

use std::marker::PhantomData;
use std::ops::Range;

use cudarc::driver::LaunchConfig;

use super::gpu::{ActivationScalar, BaseScalar, DeviceBuffer, DeviceScalar, DeviceTable, DeviceView, DeviceViewMut, Gpu, KernelArg};
use super::registry::adapter::{
    ADAPTER_LOCATION_FORWARD_BF16, ADAPTER_LOCATION_FORWARD_BF16IO, ADAPTER_LOCATION_FORWARD_F32, ADAPTER_LOCATION_GATE_BF16, ADAPTER_LOCATION_GATE_BF16IO,
    ADAPTER_LOCATION_GATE_F32, ADAPTER_SPLIT_BIAS_ACT_F32, ADAPTER_SPLIT_POST_BF16, ADAPTER_SPLIT_POST_BF16IO, ADAPTER_SPLIT_POST_F32, ADAPTER_SPLIT_PRE_BF16,
    ADAPTER_SPLIT_PRE_BF16IO, ADAPTER_SPLIT_PRE_F32, ADAPTER_LOCATION_FORWARD_F16, ADAPTER_LOCATION_FORWARD_F16IO, ADAPTER_LOCATION_GATE_F16,
    ADAPTER_LOCATION_GATE_F16IO, ADAPTER_SPLIT_POST_F16, ADAPTER_SPLIT_POST_F16IO, ADAPTER_SPLIT_BWD_PRE_DOWN_BF16IO, ADAPTER_SPLIT_BWD_PRE_DOWN_F16IO, ADAPTER_SPLIT_BWD_UP_BF16IO, ADAPTER_SPLIT_BWD_UP_F16IO, ADAPTER_SPLIT_PRE_DOWN_BF16IO, ADAPTER_SPLIT_PRE_DOWN_F16IO, ADAPTER_SPLIT_PRE_F16,
    ADAPTER_SPLIT_PRE_F16IO, ADAPTER_SPLIT_UP_POST_BF16IO, ADAPTER_SPLIT_UP_POST_F16IO,
};
use super::registry::KernelName;
use crate::backend::{Activation, AdapterLocation, DropoutSpec, LocationSteps};
use crate::config::ResidualBeforeLn;
use crate::error::{Error, Result};
use crate::tensor::DType;
use crate::train::dropout::DropoutParams;

const OP: &str = "cuda::adapter_location_forward";
const OP_DESC: &str = "cuda::LocationDescriptors";

/// The largest bottleneck the kernel takes: its activations live in shared memory, one vector per
/// row team (`reduction_factor` 0.25 at BERT-large's H = 1024).
pub const MAX_BOTTLENECK: usize = 4096;

/// Dynamic shared memory a kernel gets without an opt-in (48 KiB), less a margin for the
/// kernel's 128 bytes of static reduction scratch.
pub const DEFAULT_SHARED_BYTES: usize = 48 * 1024 - 256;

/// The most threads per block of the forward kernels (`ADAPTER_FWD_MAX_THREADS`, their
/// `__launch_bounds__`): they need about 100 registers a thread (ptxas, sm_80), so a 1024-thread
/// block would not fit the 64K-register file and the driver would refuse the launch.
pub const MAX_FORWARD_THREADS: u32 = 512;

/// Rows per block of the gate launch (one warp per row); at most 32 (its partial-sum array).
const GATE_ROWS_PER_BLOCK: usize = 8;

// ---- descriptors -------------------------------------------------------------------------------

/// Activation codes of `kernels/adapter.cu` (`ADAPTER_ACT_*`).
pub fn activation_code(a: Activation) -> i32 {
    match a {
        Activation::Relu => 0,
        Activation::Gelu => 1,
        Activation::GeluNew => 2,
        Activation::Swish => 3,
        Activation::Tanh => 4,
        Activation::Sigmoid => 5,
    }
}

/// Scaling kinds (`ADAPTER_SCALING_*`).
pub const SCALING_FIXED: i32 = 0;
pub const SCALING_LEARNED: i32 = 1;
pub const SCALING_CHANNEL: i32 = 2;

/// Which tensor the adapter residual is (`ADAPTER_RESIDUAL_*`).
pub fn residual_code(r: ResidualBeforeLn) -> i32 {
    match r {
        ResidualBeforeLn::True => 0,
        ResidualBeforeLn::False => 1,
        ResidualBeforeLn::PostAdd => 2,
    }
}

/// One branch as the kernel reads it: mirrors `struct AdapterBranchDesc` in kernels/adapter.cu
/// field for field (152 bytes, no padding). Addresses are of f32 arrays; 0 means absent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BranchDescriptor {
    /// `[m, H]`, `[m]`.
    pub down_w: u64,
    pub down_b: u64,
    /// `[H, m]`, `[H]`.
    pub up_w: u64,
    pub up_b: u64,
    /// `[H]` each, or 0.
    pub ln_before_gamma: u64,
    pub ln_before_beta: u64,
    pub ln_after_gamma: u64,
    pub ln_after_beta: u64,
    /// `[1]` (learned), `[H]` (channel), 0 (fixed).
    pub scaling: u64,
    /// `[H]` and `[1]`, or 0.
    pub gate_w: u64,
    pub gate_b: u64,
    pub bottleneck: i32,
    pub activation: i32,
    pub scaling_kind: i32,
    pub scaling_value: f32,
    pub ln_before_eps: f32,
    pub ln_after_eps: f32,
    /// The location's pre step (first child) and post step (last child), the same in every
    /// branch of a launch.
    pub residual_before_ln: i32,
    pub original_ln_before: i32,
    pub original_ln_after: i32,
    pub adapter_residual_before_ln: i32,
    /// The branch's own dropout: its Philox stream, the drop threshold `round(p·2³²)` (0: no
    /// dropout) and the keep scale `f32(1/(1−p))` (`DropoutParams`).
    pub dropout_stream: u64,
    pub dropout_threshold: u32,
    pub dropout_scale: f32,
    /// The stream index of element 0 of the branch's `[B, T, H]` block ([`BranchDropout::offset`]).
    pub dropout_offset: u64,
}

const _: () = assert!(std::mem::size_of::<BranchDescriptor>() == 152);
const WORDS_PER_DESCRIPTOR: usize = std::mem::size_of::<BranchDescriptor>() / 8;

/// An adapter-internal LayerNorm on the device (`[H]` each).
#[derive(Clone, Copy, Debug)]
pub struct DeviceLayerNorm<'a> {
    pub gamma: DeviceView<'a, f32>,
    pub beta: DeviceView<'a, f32>,
    pub eps: f32,
}

/// How the up projection is scaled.
#[derive(Clone, Copy, Debug)]
pub enum DeviceScaling<'a> {
    Fixed(f32),
    /// `[1]`, read by the kernel at every launch.
    Learned(DeviceView<'a, f32>),
    /// `[H]`.
    Channel(DeviceView<'a, f32>),
}

/// One branch's weights on the device and its core options, as `BottleneckParams` on the CPU.
#[derive(Clone, Copy, Debug)]
pub struct BranchWeights<'a> {
    /// m, the bottleneck size.
    pub bottleneck: usize,
    /// `[m, H]`, `[m]`.
    pub down_w: DeviceView<'a, f32>,
    pub down_b: DeviceView<'a, f32>,
    /// `[H, m]`, `[H]`.
    pub up_w: DeviceView<'a, f32>,
    pub up_b: DeviceView<'a, f32>,
    pub activation: Activation,
    pub ln_before: Option<DeviceLayerNorm<'a>>,
    pub ln_after: Option<DeviceLayerNorm<'a>>,
    pub scaling: DeviceScaling<'a>,
    /// Gate weight `[1, H]` (H elements) and bias `[1]`.
    pub gate: Option<(DeviceView<'a, f32>, DeviceView<'a, f32>)>,
    pub adapter_residual_before_ln: bool,
    /// The adapter's own dropout (training), None for none.
    pub dropout: Option<BranchDropout>,
}

/// A branch's own dropout: probability `p` (in `[0, 1)`; 0 draws nothing) and the Philox stream
/// its mask draws from, element `i` of the branch's `[B, T, H]` output block drawing element
/// `offset + i` of the stream: what the CPU's `apply_dropout` does with a one-block `DropoutSpec`,
/// whose stream is `spec.block_stream(0)` and offset `spec.offset` ([`BranchDropout::of`]; a
/// data-parallel shard's rows `r0..` have `offset = r0·T·H`, 0 otherwise).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BranchDropout {
    pub p: f32,
    pub stream: u64,
    pub offset: u64,
}

impl BranchDropout {
    /// The dropout of a branch's `spec`, whose rows must form one block (the model gives each
    /// branch one, `blocks = [branch id]`): a branch's mask drawn from several streams is
    /// `Error::Unsupported`.
    pub fn of(spec: &DropoutSpec) -> Result<Self> {
        if spec.blocks.len() > 1 {
            return Err(Error::Unsupported(format!(
                "{OP}: an adapter dropout over {} blocks of one branch's rows; the location kernels take one stream per branch",
                spec.blocks.len()
            )));
        }
        Ok(BranchDropout { p: spec.p, stream: spec.block_stream(0), offset: spec.offset })
    }
}

/// The seed of the branches' dropout masks for one launch. When `buffer` (the model's U32 `[2]`
/// seed buffer, low word first) is given the kernel reads the seed from it, so a captured launch
/// replays with the next step's seed; `seed` is used only without one.
#[derive(Clone, Copy, Debug)]
pub struct DropoutSeed<'a> {
    pub buffer: Option<DeviceView<'a, u32>>,
    pub seed: u64,
}

fn byte_range(ptr: u64, elems: usize) -> Range<u64> {
    ptr..ptr + (elems * std::mem::size_of::<f32>()) as u64
}

/// The bytes a view of any element type covers.
fn view_range<T: DeviceScalar>(v: &DeviceView<'_, T>) -> Range<u64> {
    v.device_ptr()..v.device_ptr() + (v.len() * std::mem::size_of::<T>()) as u64
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < a.end && b.start < b.end && a.start < b.end && b.start < a.end
}

/// Each weight's device byte range, by name ("branch 1 up bias").
pub type WeightRanges = Vec<(String, Range<u64>)>;

/// The descriptors of `branches` at a location of width `hidden`, every length checked: the
/// pure half of [`LocationDescriptors::new`]. Also returns each weight's byte range by name, for
/// the launcher's aliasing check.
pub fn describe_branches(hidden: usize, steps: LocationSteps, branches: &[BranchWeights<'_>]) -> Result<(Vec<BranchDescriptor>, WeightRanges)> {
    let fail = |msg: String| Err(Error::shape(OP_DESC, msg));
    if branches.is_empty() {
        return fail("no branches".into());
    }
    if hidden == 0 || hidden > i32::MAX as usize {
        return fail(format!("hidden size {hidden} must be in 1..={}", i32::MAX));
    }
    if steps.residual_before_ln == ResidualBeforeLn::PostAdd && !steps.original_ln_before {
        return fail("residual_before_ln = post_add needs original_ln_before (the residual is h + r, which only exists then)".into());
    }
    let mut descs = Vec::with_capacity(branches.len());
    let mut ranges = Vec::new();
    for (i, b) in branches.iter().enumerate() {
        let m = b.bottleneck;
        if m == 0 || m > MAX_BOTTLENECK {
            return fail(format!("branch {i}: bottleneck {m} must be in 1..={MAX_BOTTLENECK}"));
        }
        let mut expect = |what: &str, view: &DeviceView<'_, f32>, want: usize, why: &str| -> Result<u64> {
            if view.len() != want {
                return Err(Error::shape(OP_DESC, format!("branch {i}: {what} has {} elements, expected {want} ({why}) for H = {hidden}, bottleneck = {m}", view.len())));
            }
            ranges.push((format!("branch {i} {what}"), byte_range(view.device_ptr(), want)));
            Ok(view.device_ptr())
        };
        let down_w = expect("down weight", &b.down_w, m * hidden, "bottleneck·H")?;
        let down_b = expect("down bias", &b.down_b, m, "bottleneck")?;
        let up_w = expect("up weight", &b.up_w, hidden * m, "H·bottleneck")?;
        let up_b = expect("up bias", &b.up_b, hidden, "H")?;
        let mut ln = |which: &str, ln: &Option<DeviceLayerNorm<'_>>| -> Result<(u64, u64, f32)> {
            match ln {
                None => Ok((0, 0, 0.0)),
                Some(p) => {
                    if !p.eps.is_finite() || p.eps < 0.0 {
                        return Err(Error::shape(OP_DESC, format!("branch {i}: LayerNorm-{which} eps must be finite and >= 0, got {}", p.eps)));
                    }
                    let g = expect(&format!("LayerNorm-{which} gamma"), &p.gamma, hidden, "H")?;
                    let bt = expect(&format!("LayerNorm-{which} beta"), &p.beta, hidden, "H")?;
                    Ok((g, bt, p.eps))
                }
            }
        };
        let (ln_before_gamma, ln_before_beta, ln_before_eps) = ln("before", &b.ln_before)?;
        let (ln_after_gamma, ln_after_beta, ln_after_eps) = ln("after", &b.ln_after)?;
        let (scaling_kind, scaling, scaling_value) = match b.scaling {
            DeviceScaling::Fixed(s) => {
                if !s.is_finite() {
                    return fail(format!("branch {i}: fixed scaling must be finite, got {s}"));
                }
                (SCALING_FIXED, 0, s)
            }
            DeviceScaling::Learned(v) => (SCALING_LEARNED, expect("learned scaling", &v, 1, "one scalar")?, 0.0),
            DeviceScaling::Channel(v) => (SCALING_CHANNEL, expect("channel scaling", &v, hidden, "H")?, 0.0),
        };
        let (gate_w, gate_b) = match &b.gate {
            None => (0, 0),
            Some((w, bias)) => (expect("gate weight", w, hidden, "[1, H]")?, expect("gate bias", bias, 1, "[1]")?),
        };
        let (dropout_stream, dropout_threshold, dropout_scale, dropout_offset) = match b.dropout {
            None => (0, 0, 1.0, 0),
            Some(d) => {
                let params = DropoutParams::new(d.p).map_err(|e| Error::Input(format!("{OP_DESC}: branch {i}: adapter dropout: {e}")))?;
                (d.stream, params.threshold, params.scale, d.offset)
            }
        };
        descs.push(BranchDescriptor {
            down_w,
            down_b,
            up_w,
            up_b,
            ln_before_gamma,
            ln_before_beta,
            ln_after_gamma,
            ln_after_beta,
            scaling,
            gate_w,
            gate_b,
            bottleneck: m as i32,
            activation: activation_code(b.activation),
            scaling_kind,
            scaling_value,
            ln_before_eps,
            ln_after_eps,
            residual_before_ln: residual_code(steps.residual_before_ln),
            original_ln_before: steps.original_ln_before as i32,
            original_ln_after: steps.original_ln_after as i32,
            adapter_residual_before_ln: b.adapter_residual_before_ln as i32,
            dropout_stream,
            dropout_threshold,
            dropout_scale,
            dropout_offset,
        });
    }
    Ok((descs, ranges))
}

/// The per-branch descriptors of one location, on the device: built once per setup.
///
/// They hold the device addresses of the weights they were built from, so they borrow those
/// buffers (`'w`). An owner that must update the weights in place while keeping the descriptors
/// (an optimizer step) uses [`LocationDescriptors::detach`].
pub struct LocationDescriptors<'w> {
    buffer: DeviceTable<u64>,
    host: Vec<BranchDescriptor>,
    ranges: WeightRanges,
    hidden: usize,
    steps: LocationSteps,
    tf32_products: bool,
    split_forward: SplitForward,
    _weights: PhantomData<&'w f32>,
}

impl std::fmt::Debug for LocationDescriptors<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocationDescriptors").field("branches", &self.host.len()).field("hidden", &self.hidden).field("steps", &self.steps).finish()
    }
}

/// The environment variable that chooses how the split path's bottleneck products run in the CUDA
/// backend ([`super::backend::CudaBackend::tf32_adapter_products`]): `tf32` (TF32 tensor cores:
/// f32 range, operands rounded to 10 mantissa bits, f32 accumulation) or `f32` (strict fp32).
/// Unset, the 16-bit pipelines take TF32 (their PyTorch counterpart, autocast, runs these
/// products in bf16 / f16, which TF32 is 8 times more precise than) and f32 activations strict fp32.
pub const ADAPTER_PRODUCTS_VAR: &str = "BERT_ADAPTERS_ADAPTER_PRODUCTS";
/// The values of [`ADAPTER_PRODUCTS_VAR`]: whether TF32 is allowed.
pub const ADAPTER_PRODUCTS: &[(&str, bool)] = &[("f32", false), ("tf32", true)];

/// The environment variable that chooses [`SplitForward`] in the CUDA backend
/// ([`super::backend::CudaBackend::split_forward`]): `gemm` or `mma`.
pub const SPLIT_FORWARD_VAR: &str = "BERT_ADAPTERS_SPLIT_FORWARD";

/// How the split forward computes the bottleneck products in the 16-bit pipelines (bf16 or f16
/// activations; f32 activations always take `Gemm`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SplitForward {
    /// A pre kernel writes z (f32) to the workspace; per branch a down GEMM (cuBLASLt on a GPU,
    /// TF32 or strict fp32 as [`LocationDescriptors::tf32_products`] says; for activations other
    /// than ReLU a bias + activation pass) and an up GEMM into the workspace; a post kernel
    /// reads up.
    #[default]
    Gemm,
    /// Two launches, no GEMMs: `adapter_split_pre_down_*` keeps z for 32 rows in shared memory,
    /// rounded to the pipeline's 16-bit type, and multiplies it by W_d (rounded likewise) on the
    /// tensor cores (mma.sync, f32 accumulation), writing `a = act(z·W_dᵀ + b_d)`;
    /// `adapter_split_up_post_*` multiplies the rounded a by W_u the same way, rounds up + b_u
    /// into shared memory and runs the post kernel's steps over it. z and up never go to memory:
    /// PyTorch autocast's arithmetic for both Linears. Falls back to `Gemm` where a block does
    /// not fit the shared memory ([`split_pre_down_smem_bytes`], [`split_up_post_smem_bytes`]).
    ///
    /// The split backward follows the same choice by the same rule: its recompute is then
    /// `adapter_split_bwd_pre_down_*` and `adapter_split_bwd_up_*` (two launches for every
    /// processed branch, in place of its pre kernel and, per branch, two GEMMs and an activation
    /// pass), so pre, a and up are the forward's bit for bit, and dW_down multiplies the rounded
    /// z the product used, as autocast's saved tensors do. The backward's own products stay f32.
    TensorCores,
}

impl SplitForward {
    /// `gemm` or `mma` (as [`SPLIT_FORWARD_VAR`] spells them).
    pub fn parse(v: &str) -> Result<SplitForward> {
        super::probe::parse_choice(SPLIT_FORWARD_VAR, v, Self::NAMES)
    }

    pub(crate) const NAMES: &[(&str, SplitForward)] = &[("gemm", SplitForward::Gemm), ("mma", SplitForward::TensorCores)];
}

/// Rows per block of the tensor-core kernels (`TC_ROWS` in kernels/adapter.cu) and their warps (`TC_WARPS`).
pub const TENSOR_CORE_ROWS: usize = 32;
const TENSOR_CORE_WARPS: usize = 8;

/// Dynamic shared memory of an `adapter_split_pre_down_*` block for hidden size `hidden`,
/// activations of `act_bytes` bytes and the branches' bottlenecks, in bytes (kernels/adapter.cu):
/// the tile of z, 32 rows of `⌈H/16⌉·16 + 8` 16-bit values, then the larger of the 8 warps' row
/// regions (the f32 row buffer and the staged h and r rows: [`split_forward_team_bytes`], staged)
/// and the partial sums of the k slices (`(S − 1)·MT·16·32` floats for MT = ⌈m/16⌉ tiles of W_d,
/// S = 8 / MT slices).
pub fn split_pre_down_smem_bytes(hidden: usize, act_bytes: usize, bottlenecks: impl IntoIterator<Item = usize>) -> usize {
    let kp = hidden.div_ceil(16) * 16;
    let tile = stage_region_bytes(TENSOR_CORE_ROWS * (kp + 8), 2);
    let rows = TENSOR_CORE_WARPS * split_forward_team_bytes(hidden, act_bytes, true);
    let partials = bottlenecks
        .into_iter()
        .map(|m| {
            let mt = m.div_ceil(16).max(1);
            let slices = if mt >= TENSOR_CORE_WARPS { 1 } else { TENSOR_CORE_WARPS / mt };
            (slices - 1) * mt * 16 * TENSOR_CORE_ROWS * 4
        })
        .max()
        .unwrap_or(0);
    tile + rows.max(partials)
}

/// Dynamic shared memory of an `adapter_split_up_post_*` block, in bytes (kernels/adapter.cu):
/// the tile of a, 32 rows of `⌈m/16⌉·16 + 8` 16-bit values for the largest bottleneck, the tile
/// of up, 32 rows of `⌈H/8⌉·8 + 8`, then the 8 warps' row regions ([`split_forward_team_bytes`],
/// staged).
pub fn split_up_post_smem_bytes(hidden: usize, act_bytes: usize, bottlenecks: impl IntoIterator<Item = usize>) -> usize {
    split_bwd_up_smem_bytes(bottlenecks)
        + stage_region_bytes(TENSOR_CORE_ROWS * (hidden.div_ceil(8) * 8 + 8), 2)
        + TENSOR_CORE_WARPS * split_forward_team_bytes(hidden, act_bytes, true)
}

/// Dynamic shared memory of an `adapter_split_bwd_up_*` block, in bytes (kernels/adapter.cu): the
/// tile of a, 32 rows of `⌈m/16⌉·16 + 8` 16-bit values for the largest bottleneck (the first
/// region of an `adapter_split_up_post_*` block too).
pub fn split_bwd_up_smem_bytes(bottlenecks: impl IntoIterator<Item = usize>) -> usize {
    let m = bottlenecks.into_iter().max().unwrap_or(0);
    stage_region_bytes(TENSOR_CORE_ROWS * (m.div_ceil(16) * 16 + 8), 2)
}

/// The tensor-core kernels' shared memory a block, `(pre + down, up + post)`, where
/// [`SplitForward::TensorCores`] applies to these descriptors (asked for, and both blocks within
/// `max_shared`), else None (the GEMM path). The caller checks the activations' type. The
/// backward decides by the same rule, so that its recompute takes the path the forward took.
fn split_tensor_core_bytes(descriptors: &LocationDescriptors<'_>, act_bytes: usize, max_shared: usize) -> Option<(usize, usize)> {
    if descriptors.split_forward() != SplitForward::TensorCores {
        return None;
    }
    let hidden = descriptors.hidden();
    let bottlenecks = || descriptors.descriptors().iter().map(|d| d.bottleneck as usize);
    let (pre, post) = (split_pre_down_smem_bytes(hidden, act_bytes, bottlenecks()), split_up_post_smem_bytes(hidden, act_bytes, bottlenecks()));
    (pre.max(post) <= max_shared).then_some((pre, post))
}

impl<'w> LocationDescriptors<'w> {
    /// Validates `branches` (see [`describe_branches`]) and uploads their descriptors to `gpu`,
    /// the device that holds the weights. `steps` is the location's pre step (the first child's
    /// config) and post step (the last child's), spec §6.4.
    /// The split path's bottleneck products run strict fp32 unless
    /// [`LocationDescriptors::with_tf32_products`] allows TF32.
    pub fn new(gpu: &Gpu, hidden: usize, steps: LocationSteps, branches: &[BranchWeights<'w>]) -> Result<Self> {
        let (host, ranges) = describe_branches(hidden, steps, branches)?;
        let buffer = gpu.upload_table(bytemuck::cast_slice::<BranchDescriptor, u64>(&host))?;
        Ok(LocationDescriptors { buffer, host, ranges, hidden, steps, tf32_products: false, split_forward: SplitForward::Gemm, _weights: PhantomData })
    }

    /// How the split forward's bottleneck products run in the 16-bit pipelines ([`SplitForward`]).
    pub fn with_split_forward(mut self, forward: SplitForward) -> Self {
        self.set_split_forward(forward);
        self
    }
    /// As [`LocationDescriptors::with_split_forward`], in place.
    pub fn set_split_forward(&mut self, forward: SplitForward) {
        self.split_forward = forward;
    }
    /// The split forward's bottleneck products ([`LocationDescriptors::with_split_forward`]).
    pub fn split_forward(&self) -> SplitForward {
        self.split_forward
    }

    /// Lets the split path's bottleneck products (the down and up projections, forward and
    /// backward, and their weight gradients; not the fused kernels' CUDA-core products) round
    /// their f32 operands to TF32 for the tensor cores ([`Gemm::with_tf32`]), or not: strict fp32.
    pub fn with_tf32_products(mut self, on: bool) -> Self {
        self.set_tf32_products(on);
        self
    }
    /// As [`LocationDescriptors::with_tf32_products`], in place.
    pub fn set_tf32_products(&mut self, on: bool) {
        self.tf32_products = on;
    }
    /// Whether the split path's bottleneck products may use TF32.
    pub fn tf32_products(&self) -> bool {
        self.tf32_products
    }

    pub fn branches(&self) -> usize {
        self.host.len()
    }
    pub fn hidden(&self) -> usize {
        self.hidden
    }
    pub fn steps(&self) -> LocationSteps {
        self.steps
    }
    /// What was uploaded.
    pub fn descriptors(&self) -> &[BranchDescriptor] {
        &self.host
    }
    pub fn max_bottleneck(&self) -> usize {
        self.host.iter().map(|d| d.bottleneck as usize).max().unwrap_or(0)
    }
    pub fn has_gate(&self) -> bool {
        self.host.iter().any(|d| d.gate_w != 0)
    }
    /// The first branch that drops out (p > 0), if any: the launch then needs a seed.
    pub fn first_dropout(&self) -> Option<usize> {
        self.host.iter().position(|d| d.dropout_threshold != 0)
    }
    /// The uploaded descriptors, `18·N` words.
    pub fn view(&self) -> DeviceView<'_, u64> {
        self.buffer.view()
    }

    /// Ends the borrow of the weights.
    ///
    /// # Safety
    /// Every weight buffer the descriptors were built from must stay allocated, at the same
    /// address and length, for as long as the returned value is used in a launch. Writing new
    /// values into them (an optimizer step) is fine between launches.
    pub unsafe fn detach(self) -> LocationDescriptors<'static> {
        LocationDescriptors {
            buffer: self.buffer,
            host: self.host,
            ranges: self.ranges,
            hidden: self.hidden,
            steps: self.steps,
            tf32_products: self.tf32_products,
            split_forward: self.split_forward,
            _weights: PhantomData,
        }
    }
}

/// A location's adapter dropout as the kernels take it: per branch its [`BranchDropout`] (None
/// without dropout), and the spec whose seed the launch uses (None when no branch has one). For
/// the backend glue, before it builds [`BranchWeights`] from a location.
///
/// Refused with `Error::Unsupported` is what the CPU's `adapter_location` computes but the
/// kernels do not: a branch whose mask spans several blocks ([`BranchDropout::of`]), and
/// branches drawing from different seeds (one seed per launch; the model's branches share the
/// step's).
pub fn location_dropout<'a>(loc: &AdapterLocation<'a>) -> Result<(Vec<Option<BranchDropout>>, Option<&'a DropoutSpec>)> {
    let branches: &'a [crate::backend::BottleneckParams<'a>] = loc.branches;
    let mut seed: Option<&'a DropoutSpec> = None;
    let mut out = Vec::with_capacity(branches.len());
    for (i, b) in branches.iter().enumerate() {
        let Some(spec) = &b.dropout else {
            out.push(None);
            continue;
        };
        match seed {
            Some(first) if (first.seed, &first.seed_buffer) != (spec.seed, &spec.seed_buffer) => {
                return Err(Error::Unsupported(format!(
                    "{OP}: branch {i}'s adapter dropout draws from another seed than an earlier branch's; the location kernels take one seed per launch"
                )));
            }
            Some(_) => {}
            None => seed = Some(spec),
        }
        out.push(Some(BranchDropout::of(spec)?));
    }
    Ok((out, seed))
}

/// Refuses what the CPU's `adapter_location` computes but the kernels do not (see
/// [`location_dropout`]); the adapter's dropout itself is supported.
pub fn refuse_unsupported(loc: &AdapterLocation<'_>) -> Result<()> {
    location_dropout(loc).map(|_| ())
}

// ---- the launch ----------------------------------------------------------------------------------

/// The shape of one launch: `batch` examples of `seq_len` rows per branch, `branches` branches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocationShape {
    pub batch: usize,
    pub seq_len: usize,
    pub hidden: usize,
    pub branches: usize,
    /// `h` and `r` are the shared `[B, T, H]` input of every branch (before the replication
    /// point), else `[N·B, T, H]` with branch i's rows at `[i·B, (i+1)·B)`.
    pub replicate: bool,
}

/// What the forward's and the backward's size checks share: the shape against the descriptors,
/// the row count and element counts (which the kernels index with int rows and size_t elements),
/// and the messages' description of the shape.
struct CheckedShape {
    op: &'static str,
    hidden: usize,
    rows: usize,
    n_out: usize,
    n_in: usize,
    in_what: &'static str,
    dims: String,
}

impl LocationShape {
    fn checked(&self, op: &'static str, descriptor_hidden: usize, descriptor_branches: usize) -> Result<CheckedShape> {
        let LocationShape { batch, seq_len, hidden, branches, replicate } = *self;
        let fail = |msg: String| Err(Error::shape(op, msg));
        if hidden == 0 || branches == 0 {
            return fail(format!("hidden {hidden} and branches {branches} must each be at least 1"));
        }
        if hidden != descriptor_hidden {
            return fail(format!("hidden {hidden}, but the descriptors were built for H = {descriptor_hidden}"));
        }
        if branches != descriptor_branches {
            return fail(format!("{branches} branches, but there are {descriptor_branches} descriptors"));
        }
        let rows = batch.checked_mul(seq_len).and_then(|bt| bt.checked_mul(branches)).filter(|&n| n <= i32::MAX as usize);
        let Some(rows) = rows else {
            return fail(format!("branches {branches} x batch {batch} x seq_len {seq_len} rows must fit in an i32"));
        };
        if hidden > i32::MAX as usize {
            return fail(format!("hidden {hidden} must fit in an i32"));
        }
        let Some(n_out) = rows.checked_mul(hidden) else {
            return fail(format!("{rows} rows x hidden {hidden} overflows usize"));
        };
        Ok(CheckedShape {
            op,
            hidden,
            rows,
            n_out,
            n_in: if replicate { n_out / branches } else { n_out },
            in_what: if replicate { "B·T·H" } else { "N·B·T·H" },
            dims: format!("B = {batch}, T = {seq_len}, H = {hidden}, N = {branches}, replicate = {replicate}"),
        })
    }
}

impl CheckedShape {
    /// `got == want` elements, else a shape error naming the tensor and the shape.
    fn expect(&self, name: &str, got: usize, want: usize, what: &str) -> Result<()> {
        if got != want {
            return Err(Error::shape(self.op, format!("{name} has {got} elements, expected {want} ({what}) for {}", self.dims)));
        }
        Ok(())
    }

    /// The inputs both directions read: `h`, `r` and the BERT LayerNorm.
    fn expect_inputs(&self, h: usize, r: usize, ln_gamma: usize, ln_beta: usize) -> Result<()> {
        self.expect("h", h, self.n_in, self.in_what)?;
        self.expect("r", r, self.n_in, self.in_what)?;
        self.expect("LayerNorm gamma", ln_gamma, self.hidden, "H")?;
        self.expect("LayerNorm beta", ln_beta, self.hidden, "H")
    }
}

/// The inputs: the sub-layer output `h`, its input `r` (activations of `A`: f32 or bf16), the
/// location's BERT LayerNorm (γ, β of `P`: f32 or bf16), and the seed of the branches' own
/// dropout (required when a descriptor has dropout, ignored otherwise).
pub struct LocationInputs<'a, P = f32, A = f32> {
    pub h: DeviceView<'a, A>,
    pub r: DeviceView<'a, A>,
    pub ln_gamma: DeviceView<'a, P>,
    pub ln_beta: DeviceView<'a, P>,
    pub ln_eps: f32,
    pub dropout_seed: Option<DropoutSeed<'a>>,
}

/// The seed arguments of a launch (buffer, low word, high word) for `descriptors`: a branch with
/// dropout needs a seed (`Error::Input`), and a seed buffer holds 2 words (`Error::Shape`).
fn seed_args(op: &'static str, descriptors: &LocationDescriptors<'_>, seed: Option<&DropoutSeed<'_>>) -> Result<[KernelArg; 3]> {
    if let Some(buf) = seed.and_then(|s| s.buffer.as_ref()) {
        if buf.len() != 2 {
            return Err(Error::shape(op, format!("the dropout seed buffer has {} elements, expected 2 (a u64 seed as two u32 words)", buf.len())));
        }
    }
    match (seed, descriptors.first_dropout()) {
        (None, Some(i)) => Err(Error::Input(format!("{op}: branch {i} has adapter dropout, but no dropout seed was given"))),
        (None, None) => Ok([KernelArg::Null, KernelArg::U32(0), KernelArg::U32(0)]),
        (Some(s), _) => Ok([s.buffer.as_ref().map_or(KernelArg::Null, |b| b.arg()), KernelArg::U32(s.seed as u32), KernelArg::U32((s.seed >> 32) as u32)]),
    }
}

/// The bytes of the seed buffer, if any, for the aliasing checks.
fn seed_range(seed: Option<&DropoutSeed<'_>>) -> Option<(String, Range<u64>)> {
    seed.and_then(|s| s.buffer.as_ref()).map(|b| ("the dropout seed buffer".to_string(), view_range(b)))
}

/// The outputs: `out` is `[N·B, T, H]`; `gate` is `[N·B]`, each example's gate value per branch
/// (1 for branches without a gate), required when a branch has a gate and optional otherwise.
/// `out` is stored as the inputs' activation type `A`; the gate is f32 either way.
pub struct LocationOutputs<'a, A = f32> {
    pub out: DeviceViewMut<'a, A>,
    pub gate: Option<DeviceViewMut<'a, f32>>,
}

/// The lengths a launch needs, checked before anything is enqueued. Pure, so it is unit-tested
/// without a device.
#[derive(Clone, Copy, Debug)]
pub struct LocationSizes {
    pub shape: LocationShape,
    pub h: usize,
    pub r: usize,
    pub ln_gamma: usize,
    pub ln_beta: usize,
    pub out: usize,
    pub gate: Option<usize>,
    /// What the descriptors were built for.
    pub descriptor_branches: usize,
    pub descriptor_hidden: usize,
    pub needs_gate: bool,
}

impl LocationSizes {
    pub fn check(&self, ln_eps: f32) -> Result<()> {
        let LocationShape { batch, branches, .. } = self.shape;
        let fail = |msg: String| Err(Error::shape(OP, msg));
        let s = self.shape.checked(OP, self.descriptor_hidden, self.descriptor_branches)?;
        let (rows, n_out) = (s.rows, s.n_out);
        s.expect_inputs(self.h, self.r, self.ln_gamma, self.ln_beta)?;
        let expect = |name: &str, got: usize, want: usize, what: &str| s.expect(name, got, want, what);
        expect("out", self.out, n_out, "N·B·T·H")?;
        match self.gate {
            Some(g) => expect("gate", g, branches * batch, "N·B")?,
            None if self.needs_gate && rows > 0 => return fail(format!("a branch has a gate, so the [N·B] = [{}] gate output is required", branches * batch)),
            None => {}
        }
        if !ln_eps.is_finite() || ln_eps < 0.0 {
            return Err(Error::Input(format!("{OP}: LayerNorm eps must be finite and >= 0, got {ln_eps}")));
        }
        Ok(())
    }
}

/// How the location kernel is launched. [`LocationPlan::auto`] is what production uses; other
/// plans exist so tests can run every code path at any width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocationPlan {
    /// Threads cooperating on one row: a multiple of 32, at most 1024.
    pub threads_per_row: u32,
    /// Rows per block; must be 1 when a row has more than one warp (the team is the block).
    pub rows_per_block: u32,
}

impl LocationPlan {
    /// One warp per row and up to 8 rows per block (fewer when their shared memory would pass
    /// 48 KiB) for H <= 1024; else one block per row, about 16 columns per thread.
    pub fn auto(hidden: usize, bottleneck_stride: usize) -> Self {
        if hidden <= 1024 {
            let mut rows = 8u32;
            while rows > 1 && rows as usize * (hidden + bottleneck_stride) * 4 > DEFAULT_SHARED_BYTES {
                rows /= 2;
            }
            LocationPlan { threads_per_row: 32, rows_per_block: rows }
        } else {
            let threads = hidden.div_ceil(16).div_ceil(32) * 32;
            LocationPlan { threads_per_row: threads.clamp(128, MAX_FORWARD_THREADS as usize) as u32, rows_per_block: 1 }
        }
    }

    /// Dynamic shared memory: per row, the row and the bottleneck vector.
    pub fn shared_mem_bytes(&self, hidden: usize, bottleneck_stride: usize) -> usize {
        self.rows_per_block as usize * (hidden + bottleneck_stride) * std::mem::size_of::<f32>()
    }

    /// Checks the plan against the kernel's contract; `max_shared` is the dynamic shared memory
    /// the device allows with an opt-in.
    pub fn validate(&self, hidden: usize, bottleneck_stride: usize, max_shared: usize) -> Result<()> {
        let t = self.threads_per_row;
        let bad = |msg: String| Err(Error::shape(OP, format!("launch plan {self:?}: {msg}")));
        if t == 0 || !t.is_multiple_of(32) || t > MAX_FORWARD_THREADS {
            return bad(format!("threads_per_row must be a multiple of 32 in 32..={MAX_FORWARD_THREADS}"));
        }
        if self.rows_per_block == 0 || t as u64 * self.rows_per_block as u64 > MAX_FORWARD_THREADS as u64 {
            return bad(format!("rows_per_block must be >= 1 with at most {MAX_FORWARD_THREADS} threads per block"));
        }
        if t > 32 && self.rows_per_block != 1 {
            return bad("rows_per_block must be 1 when a row has more than one warp".into());
        }
        let smem = self.shared_mem_bytes(hidden, bottleneck_stride);
        if smem > max_shared {
            return bad(format!("needs {smem} bytes of shared memory for H = {hidden} and bottleneck {bottleneck_stride}, more than the {max_shared} allowed"));
        }
        Ok(())
    }

    pub fn launch_config(&self, rows: usize, hidden: usize, bottleneck_stride: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.div_ceil(self.rows_per_block as usize) as u32, 1, 1),
            block_dim: (self.threads_per_row, self.rows_per_block, 1),
            shared_mem_bytes: self.shared_mem_bytes(hidden, bottleneck_stride) as u32,
        }
    }
}

/// The location's output for all branches, with the automatic plan. See the module docs.
pub fn adapter_location_forward<P: BaseScalar, A: ActivationScalar>(
    gpu: &Gpu,
    inputs: &LocationInputs<'_, P, A>,
    descriptors: &LocationDescriptors<'_>,
    outputs: &mut LocationOutputs<'_, A>,
    shape: LocationShape,
) -> Result<()> {
    let plan = LocationPlan::auto(shape.hidden, descriptors.max_bottleneck());
    adapter_location_forward_with_plan(gpu, inputs, descriptors, outputs, shape, plan)
}

/// The (location, gate) kernels for activations stored as `A` and the BERT LayerNorm as `P`.
fn kernels<P: BaseScalar, A: ActivationScalar>() -> Result<(KernelName, KernelName)> {
    match (A::DTYPE, P::DTYPE) {
        (DType::F32, DType::F32) => Ok((ADAPTER_LOCATION_FORWARD_F32, ADAPTER_LOCATION_GATE_F32)),
        (DType::F32, DType::BF16) => Ok((ADAPTER_LOCATION_FORWARD_BF16, ADAPTER_LOCATION_GATE_BF16)),
        (DType::BF16, DType::BF16) => Ok((ADAPTER_LOCATION_FORWARD_BF16IO, ADAPTER_LOCATION_GATE_BF16IO)),
        (DType::F32, DType::F16) => Ok((ADAPTER_LOCATION_FORWARD_F16, ADAPTER_LOCATION_GATE_F16)),
        (DType::F16, DType::F16) => Ok((ADAPTER_LOCATION_FORWARD_F16IO, ADAPTER_LOCATION_GATE_F16IO)),
        (a, p) => Err(Error::Unsupported(format!(
            "{OP}: activations (h, r, out) in {a:?} with the BERT LayerNorm in {p:?}: no kernel (f32 activations take an f32, bf16 or f16 LayerNorm, bf16 / f16 activations one of their own type)"
        ))),
    }
}

/// Every operand's length against the shape and the descriptors ([`LocationSizes::check`]): the
/// same checks for the fused and the split path.
fn check_sizes<P: BaseScalar, A: ActivationScalar>(inputs: &LocationInputs<'_, P, A>, descriptors: &LocationDescriptors<'_>, outputs: &LocationOutputs<'_, A>, shape: LocationShape) -> Result<()> {
    LocationSizes {
        shape,
        h: inputs.h.len(),
        r: inputs.r.len(),
        ln_gamma: inputs.ln_gamma.len(),
        ln_beta: inputs.ln_beta.len(),
        out: outputs.out.len(),
        gate: outputs.gate.as_ref().map(|g| g.len()),
        descriptor_branches: descriptors.branches(),
        descriptor_hidden: descriptors.hidden(),
        needs_gate: descriptors.has_gate(),
    }
    .check(inputs.ln_eps)
}

/// As [`adapter_location_forward`], with an explicit launch plan (validated).
pub fn adapter_location_forward_with_plan<P: BaseScalar, A: ActivationScalar>(
    gpu: &Gpu,
    inputs: &LocationInputs<'_, P, A>,
    descriptors: &LocationDescriptors<'_>,
    outputs: &mut LocationOutputs<'_, A>,
    shape: LocationShape,
    plan: LocationPlan,
) -> Result<()> {
    let (location_kernel, gate_kernel) = kernels::<P, A>()?;
    check_sizes(inputs, descriptors, outputs, shape)?;
    let stride = descriptors.max_bottleneck();
    let max_shared = gpu.limits().max_shared_bytes_opt_in.saturating_sub(256);
    plan.validate(shape.hidden, stride, max_shared)?;
    let seed = seed_args(OP, descriptors, inputs.dropout_seed.as_ref())?;
    check_aliasing(inputs, descriptors, outputs)?;
    let LocationShape { batch, seq_len, hidden, branches, replicate } = shape;
    let rows = branches * batch * seq_len;
    if rows == 0 {
        return Ok(()); // a zero-sized grid is a launch error; there is nothing to do
    }
    let (b, t, hd, rep) = (KernelArg::I32(batch as i32), KernelArg::I32(seq_len as i32), KernelArg::I32(hidden as i32), KernelArg::I32(replicate as i32));
    let (ln_gamma, ln_beta) = (P::base_arg(&inputs.ln_gamma), P::base_arg(&inputs.ln_beta));

    if let Some(gate) = outputs.gate.as_mut() {
        // Parameter order: gate, h, r, ln_gamma, ln_beta, descs, batch, seq_len, hidden,
        // replicate, ln_eps (checked against kernels/adapter.cu by Gpu::launch).
        let args = [gate.arg(), A::act_arg(&inputs.h), A::act_arg(&inputs.r), ln_gamma, ln_beta, descriptors.view().arg(), b, t, hd, rep, KernelArg::F32(inputs.ln_eps)];
        let cfg = LaunchConfig { grid_dim: ((branches * batch) as u32, 1, 1), block_dim: (32, seq_len.min(GATE_ROWS_PER_BLOCK) as u32, 1), shared_mem_bytes: 0 };
        // SAFETY: the sizes were checked above: gate has N·B elements, h and r the rows the
        // kernel reads for this shape and replicate flag, γ/β H; the descriptors were validated
        // against H and their weights are borrowed (or, detached, kept alive by the owner).
        unsafe { gpu.launch(gate_kernel, cfg, &args)? };
    }

    let cfg = plan.launch_config(rows, hidden, stride);
    if cfg.shared_mem_bytes as usize > gpu.dynamic_shared_limit(location_kernel) {
        gpu.allow_dynamic_shared(location_kernel, cfg.shared_mem_bytes as usize)?;
    }
    let gate_arg = outputs.gate.as_ref().map_or(KernelArg::Null, |g| g.arg());
    // Parameter order: out, gate, h, r, ln_gamma, ln_beta, descs, batch, seq_len, hidden,
    // branches, replicate, ln_eps, bottleneck_stride, seed_buf, seed_lo, seed_hi.
    let [seed_buf, seed_lo, seed_hi] = seed;
    let args = [
        A::act_arg_mut(&outputs.out),
        gate_arg,
        A::act_arg(&inputs.h),
        A::act_arg(&inputs.r),
        ln_gamma,
        ln_beta,
        descriptors.view().arg(),
        b,
        t,
        hd,
        KernelArg::I32(branches as i32),
        rep,
        KernelArg::F32(inputs.ln_eps),
        KernelArg::I32(stride as i32),
        seed_buf,
        seed_lo,
        seed_hi,
    ];
    // SAFETY: as for the gate launch; out has N·B·T·H elements, the gate (read only for gated
    // branches, which make it required) N·B, the seed buffer (if any) 2 words, and the plan was
    // validated against the shared memory it needs with the largest bottleneck as the stride.
    unsafe { gpu.launch(location_kernel, cfg, &args) }
}

/// The kernel's pointers are `__restrict__`: an output may overlap no input, weight or other
/// output.
fn check_aliasing<P: DeviceScalar, A: DeviceScalar>(inputs: &LocationInputs<'_, P, A>, descriptors: &LocationDescriptors<'_>, outputs: &LocationOutputs<'_, A>) -> Result<()> {
    let mut reads: Vec<(String, Range<u64>)> = vec![
        ("h".into(), view_range(&inputs.h)),
        ("r".into(), view_range(&inputs.r)),
        ("LayerNorm gamma".into(), view_range(&inputs.ln_gamma)),
        ("LayerNorm beta".into(), view_range(&inputs.ln_beta)),
        ("the descriptors".into(), descriptors.view().device_ptr()..descriptors.view().device_ptr() + (descriptors.view().len() * 8) as u64),
    ];
    reads.extend(descriptors.ranges.iter().cloned());
    reads.extend(seed_range(inputs.dropout_seed.as_ref()));
    let out = outputs.out.device_ptr()..outputs.out.device_ptr() + (outputs.out.len() * std::mem::size_of::<A>()) as u64;
    let gate = outputs.gate.as_ref().map(|g| byte_range(g.device_ptr(), g.len()));
    for (name, range) in &reads {
        if overlaps(&out, range) {
            return Err(Error::Input(format!("{OP}: out overlaps {name}; the output must not alias an input")));
        }
        if let Some(g) = &gate {
            if overlaps(g, range) {
                return Err(Error::Input(format!("{OP}: the gate output overlaps {name}; an output must not alias an input")));
            }
        }
    }
    if let Some(g) = &gate {
        if overlaps(g, &out) {
            return Err(Error::Input(format!("{OP}: the gate output overlaps out")));
        }
    }
    Ok(())
}

// ---- the split path --------------------------------------------------------------------------------

/// The environment variable that overrides [`LocationPath::auto`]: `fused` or `split`.
pub const LOCATION_PATH_VAR: &str = "BERT_ADAPTERS_LOCATION_PATH";

/// How one adapter location's forward and backward run (every branch, either way).
///
/// - `Fused`: [`adapter_location_forward`], one launch (two with a gate); the bottleneck
///   products on CUDA cores in every row team, which re-reads W_down and W_up for every row.
/// - `Split`: [`adapter_location_forward_split`]: a pre kernel (the pre step and the adapter's
///   LayerNorm before, per row), the two bottleneck products per branch on [`Gpu::gemm`]
///   (cuBLASLt on a GPU), and a post kernel (scaling, dropout, gate, LayerNorm after, residual,
///   post step). The same semantics within the fused kernel's tolerances; the same dropout masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocationPath {
    Fused,
    Split,
}

impl LocationPath {
    /// `Split` on a GPU, `Fused` on cuda-sim (whose kernels are what the CPU tests exercise most),
    /// unless [`LOCATION_PATH_VAR`] says `fused` or `split` (another value is `Error::Input`).
    pub fn auto(gpu: &Gpu) -> Result<LocationPath> {
        Ok(super::probe::env_choice(LOCATION_PATH_VAR, Self::NAMES)?.unwrap_or(match gpu.kind() {
            super::gpu::GpuKind::Cuda => LocationPath::Split,
            super::gpu::GpuKind::Sim => LocationPath::Fused,
        }))
    }

    /// `fused` or `split` (as [`LOCATION_PATH_VAR`] spells them); an empty value is `auto`'s
    /// device rule's business, so it is refused here too.
    pub fn parse(v: &str) -> Result<LocationPath> {
        super::probe::parse_choice(LOCATION_PATH_VAR, v, Self::NAMES)
    }

    const NAMES: &[(&str, LocationPath)] = &[("fused", LocationPath::Fused), ("split", LocationPath::Split)];
}

/// The location's forward on `path`, with the automatic plan.
pub fn adapter_location_forward_on<P: BaseScalar, A: ActivationScalar>(
    gpu: &Gpu,
    inputs: &LocationInputs<'_, P, A>,
    descriptors: &LocationDescriptors<'_>,
    outputs: &mut LocationOutputs<'_, A>,
    shape: LocationShape,
    path: LocationPath,
) -> Result<()> {
    match path {
        LocationPath::Fused => adapter_location_forward(gpu, inputs, descriptors, outputs, shape),
        LocationPath::Split => adapter_location_forward_split(gpu, inputs, descriptors, outputs, shape),
    }
}

/// The (pre, post) kernels of the split path for activations `A` and BERT LayerNorm `P`.
fn split_kernels<P: BaseScalar, A: ActivationScalar>() -> Result<(KernelName, KernelName)> {
    match (A::DTYPE, P::DTYPE) {
        (DType::F32, DType::F32) => Ok((ADAPTER_SPLIT_PRE_F32, ADAPTER_SPLIT_POST_F32)),
        (DType::F32, DType::BF16) => Ok((ADAPTER_SPLIT_PRE_BF16, ADAPTER_SPLIT_POST_BF16)),
        (DType::BF16, DType::BF16) => Ok((ADAPTER_SPLIT_PRE_BF16IO, ADAPTER_SPLIT_POST_BF16IO)),
        (DType::F32, DType::F16) => Ok((ADAPTER_SPLIT_PRE_F16, ADAPTER_SPLIT_POST_F16)),
        (DType::F16, DType::F16) => Ok((ADAPTER_SPLIT_PRE_F16IO, ADAPTER_SPLIT_POST_F16IO)),
        _ => kernels::<P, A>(), // the same refusal as the fused path
    }
}

/// The tensor-core (pre + down, up + post) kernels for activations `A` and BERT LayerNorm `P`:
/// the 16-bit pipelines only.
fn split_tensor_core_kernels<P: BaseScalar, A: ActivationScalar>() -> Option<(KernelName, KernelName)> {
    match (A::DTYPE, P::DTYPE) {
        (DType::BF16, DType::BF16) => Some((ADAPTER_SPLIT_PRE_DOWN_BF16IO, ADAPTER_SPLIT_UP_POST_BF16IO)),
        (DType::F16, DType::F16) => Some((ADAPTER_SPLIT_PRE_DOWN_F16IO, ADAPTER_SPLIT_UP_POST_F16IO)),
        _ => None,
    }
}

/// The backward's recompute on the tensor cores (pre + down, up) for 16-bit activations.
fn split_bwd_tensor_core_kernels<P: BaseScalar, A: ActivationScalar>() -> Option<(KernelName, KernelName)> {
    match (A::DTYPE, P::DTYPE) {
        (DType::BF16, DType::BF16) => Some((ADAPTER_SPLIT_BWD_PRE_DOWN_BF16IO, ADAPTER_SPLIT_BWD_UP_BF16IO)),
        (DType::F16, DType::F16) => Some((ADAPTER_SPLIT_BWD_PRE_DOWN_F16IO, ADAPTER_SPLIT_BWD_UP_F16IO)),
        _ => None,
    }
}

/// The f32 workspace of the split path for `descriptors` at `shape`, in elements: the rows' z
/// (then the up products) `[N·B·T, H]`, each branch's down product `[B·T, m_i]`, and the pre
/// step's statistics `[N·B·T, 2]` when ρ is x after the original LayerNorm.
pub fn split_workspace_len(descriptors: &LocationDescriptors<'_>, shape: LocationShape) -> Result<usize> {
    let s = shape.checked(OP, descriptors.hidden(), descriptors.branches())?;
    let per_branch = s.rows / shape.branches;
    let mut len = s.n_out;
    for d in descriptors.descriptors() {
        len = per_branch.checked_mul(d.bottleneck as usize).and_then(|n| n.checked_add(len)).ok_or_else(|| Error::shape(OP, format!("the split workspace for {} overflows usize", s.dims)))?;
    }
    if needs_pre_stats(descriptors.steps()) {
        len = len.checked_add(2 * s.rows).ok_or_else(|| Error::shape(OP, format!("the split workspace for {} overflows usize", s.dims)))?;
    }
    Ok(len)
}

/// ρ = x with the original LayerNorm first: the post kernel recomputes x from the pre step's
/// statistics.
fn needs_pre_stats(steps: LocationSteps) -> bool {
    steps.original_ln_before && steps.residual_before_ln == ResidualBeforeLn::False
}

/// The location's output for all branches on the split path ([`LocationPath::Split`]), with the
/// automatic row-team plan of the pre and post kernels. The same contract as
/// [`adapter_location_forward`]; the workspace ([`split_workspace_len`]) is allocated from the
/// pool.
pub fn adapter_location_forward_split<P: BaseScalar, A: ActivationScalar>(
    gpu: &Gpu,
    inputs: &LocationInputs<'_, P, A>,
    descriptors: &LocationDescriptors<'_>,
    outputs: &mut LocationOutputs<'_, A>,
    shape: LocationShape,
) -> Result<()> {
    adapter_location_forward_split_with_plan(gpu, inputs, descriptors, outputs, shape, LocationPlan::auto(shape.hidden, 0), RowStaging::Auto)
}

/// Shared memory per team of the split forward's pre and post kernels, in bytes: the row buffer
/// (H f32) and, staged, the team's h and r rows (`act_bytes` an element), each region rounded up
/// to 16 bytes (kernels/adapter.cu, split_team_rows).
pub fn split_forward_team_bytes(hidden: usize, act_bytes: usize, staged: bool) -> usize {
    let row = stage_region_bytes(hidden, 4);
    if staged { row + 2 * stage_region_bytes(hidden, act_bytes) } else { row }
}

/// The kernels' stage_region_bytes: `count` elements of `size` bytes, rounded up to 16 bytes.
fn stage_region_bytes(count: usize, size: usize) -> usize {
    (count * size).div_ceil(16) * 16
}

/// Resolves a [`RowStaging`] choice for `op`'s launch: whether to stage, given whether its teams
/// fit `max_shared` staged (`staged_bytes` a block).
fn resolve_staging(op: &'static str, staging: RowStaging, staged_bytes: usize, max_shared: usize, plan: LocationPlan, hidden: usize) -> Result<bool> {
    let fits = staged_bytes <= max_shared;
    match staging {
        RowStaging::Off => Ok(false),
        RowStaging::Auto => Ok(fits),
        RowStaging::On if fits => Ok(true),
        RowStaging::On => Err(Error::shape(op, format!("launch plan {plan:?} with row staging needs {staged_bytes} bytes of shared memory a block for H = {hidden}, more than the {max_shared} allowed"))),
    }
}

/// As [`adapter_location_forward_split`], with an explicit plan for the pre and post kernels
/// (validated with no bottleneck vector in shared memory) and row staging choice.
pub fn adapter_location_forward_split_with_plan<P: BaseScalar, A: ActivationScalar>(
    gpu: &Gpu,
    inputs: &LocationInputs<'_, P, A>,
    descriptors: &LocationDescriptors<'_>,
    outputs: &mut LocationOutputs<'_, A>,
    shape: LocationShape,
    plan: LocationPlan,
    staging: RowStaging,
) -> Result<()> {
    let (_, gate_kernel) = kernels::<P, A>()?;
    let (pre_kernel, post_kernel) = split_kernels::<P, A>()?;
    check_sizes(inputs, descriptors, outputs, shape)?;
    let max_shared = gpu.limits().max_shared_bytes_opt_in.saturating_sub(256);
    plan.validate(shape.hidden, 0, max_shared)?;
    let act_bytes = std::mem::size_of::<A>();
    let staged_block = plan.rows_per_block as usize * split_forward_team_bytes(shape.hidden, act_bytes, true);
    let staged = resolve_staging(OP, staging, staged_block, max_shared, plan, shape.hidden)?;
    let [seed_buf, seed_lo, seed_hi] = seed_args(OP, descriptors, inputs.dropout_seed.as_ref())?;
    check_aliasing(inputs, descriptors, outputs)?;
    let LocationShape { batch, seq_len, hidden, branches, replicate } = shape;
    let per_branch = batch * seq_len;
    let rows = branches * per_branch;
    if rows == 0 {
        return Ok(());
    }
    let (b, t, hd, rep) = (KernelArg::I32(batch as i32), KernelArg::I32(seq_len as i32), KernelArg::I32(hidden as i32), KernelArg::I32(replicate as i32));
    let (ln_gamma, ln_beta) = (P::base_arg(&inputs.ln_gamma), P::base_arg(&inputs.ln_beta));
    let n = rows * hidden;

    if let Some(gate) = outputs.gate.as_mut() {
        // The fused path's gate launch (parameter order as there).
        let args = [gate.arg(), A::act_arg(&inputs.h), A::act_arg(&inputs.r), ln_gamma, ln_beta, descriptors.view().arg(), b, t, hd, rep, KernelArg::F32(inputs.ln_eps)];
        let cfg = LaunchConfig { grid_dim: ((branches * batch) as u32, 1, 1), block_dim: (32, seq_len.min(GATE_ROWS_PER_BLOCK) as u32, 1), shared_mem_bytes: 0 };
        // SAFETY: as in adapter_location_forward_with_plan: the sizes were checked above.
        unsafe { gpu.launch(gate_kernel, cfg, &args)? };
    }

    // The tensor-core kernels, where asked for, available and fitting: then z and up stay on
    // chip and the workspace holds only the down products and the statistics.
    let tensor_cores = split_tensor_core_kernels::<P, A>().zip(split_tensor_core_bytes(descriptors, act_bytes, max_shared)).map(|((pre_down, up_post), (pre_bytes, post_bytes))| [(pre_down, pre_bytes), (up_post, post_bytes)]);

    // Workspace: zu [N·B·T, H] (z, then each branch's up product over its own z; not on the
    // tensor-core path), the down products, the statistics.
    let zu_len = if tensor_cores.is_some() { 0 } else { n };
    let work_len = split_workspace_len(descriptors, shape)? - n + zu_len;
    let work = gpu.alloc::<f32>(work_len.max(1))?;
    let base = work.view().device_ptr();
    // Windows of the workspace, which lives to the end of this function and is written only
    // through these windows, each by one launch or product at a time.
    let window = |start: usize, len: usize| -> Result<DeviceView<'_, f32>> {
        if start + len > work_len {
            return Err(Error::Internal(format!("{OP}: window {start}..{} of a split workspace of {work_len} elements", start + len)));
        }
        // SAFETY: inside `work` (checked), which outlives every window (borrowed by the closure).
        Ok(unsafe { DeviceView::<f32>::from_raw(base + (start * std::mem::size_of::<f32>()) as u64, len) })
    };
    let mut offsets = Vec::with_capacity(branches);
    let mut at = zu_len;
    for d in descriptors.descriptors() {
        offsets.push(at);
        at += per_branch * d.bottleneck as usize;
    }
    let stats_arg = if needs_pre_stats(descriptors.steps()) { window(at, 2 * rows)?.arg() } else { KernelArg::Null };
    let gate_arg = outputs.gate.as_ref().map_or(KernelArg::Null, |g| g.arg());

    if let Some([(pre_down, pre_bytes), (up_post, post_bytes)]) = tensor_cores {
        for (kernel, bytes) in [(pre_down, pre_bytes), (up_post, post_bytes)] {
            if bytes > gpu.dynamic_shared_limit(kernel) {
                gpu.allow_dynamic_shared(kernel, bytes)?;
            }
        }
        let grid = (per_branch.div_ceil(TENSOR_CORE_ROWS) as u32, branches as u32, 1);
        let block = (32, TENSOR_CORE_WARPS as u32, 1);
        let acts = window(zu_len, at - zu_len)?.arg();
        // Pre and down: a of every branch (and the statistics). Parameter order: acts, stats, h,
        // r, ln_gamma, ln_beta, descs, batch, seq_len, hidden, replicate, ln_eps.
        let args = [acts, stats_arg, A::act_arg(&inputs.h), A::act_arg(&inputs.r), ln_gamma, ln_beta, descriptors.view().arg(), b, t, hd, rep, KernelArg::F32(inputs.ln_eps)];
        // SAFETY: the down products' windows of every branch, laid end to end as the kernel
        // indexes them (Σ_{k<i} B·T·m_k), and the statistics (when passed, 2·N·B·T) are fresh
        // workspace; h, r, γ, β were checked as for the fused launch; the grid covers B·T rows of
        // each branch and the shared memory is the kernel's layout for these bottlenecks.
        unsafe { gpu.launch(pre_down, LaunchConfig { grid_dim: grid, block_dim: block, shared_mem_bytes: pre_bytes as u32 }, &args)? };
        // Up and post: out. Parameter order: out, acts, stats, gate, h, r, ln_gamma, ln_beta,
        // descs, batch, seq_len, hidden, replicate, ln_eps, seed_buf, seed_lo, seed_hi.
        let args = [A::act_arg_mut(&outputs.out), acts, stats_arg, gate_arg, A::act_arg(&inputs.h), A::act_arg(&inputs.r), ln_gamma, ln_beta, descriptors.view().arg(), b, t, hd, rep, KernelArg::F32(inputs.ln_eps), seed_buf, seed_lo, seed_hi];
        // SAFETY: out has N·B·T·H elements; the down products as just written; the gate (when a
        // branch gates) as the gate launch wrote it; the rest as for the pre + down launch and the
        // fused path's seed.
        unsafe { gpu.launch(up_post, LaunchConfig { grid_dim: grid, block_dim: block, shared_mem_bytes: post_bytes as u32 }, &args)? };
        drop(work); // back to the pool only after the last launch that reads it was enqueued
        return Ok(());
    }

    let cfg = LaunchConfig { shared_mem_bytes: (plan.rows_per_block as usize * split_forward_team_bytes(hidden, act_bytes, staged)) as u32, ..plan.launch_config(rows, hidden, 0) };
    let stage_arg = KernelArg::I32(staged as i32);
    for kernel in [pre_kernel, post_kernel] {
        if cfg.shared_mem_bytes as usize > gpu.dynamic_shared_limit(kernel) {
            gpu.allow_dynamic_shared(kernel, cfg.shared_mem_bytes as usize)?;
        }
    }

    // Pre: z (and the statistics).
    {
        // Parameter order: z, stats, h, r, ln_gamma, ln_beta, descs, batch, seq_len, hidden,
        // branches, replicate, ln_eps, stage.
        let args = [window(0, n)?.arg(), stats_arg, A::act_arg(&inputs.h), A::act_arg(&inputs.r), ln_gamma, ln_beta, descriptors.view().arg(), b, t, hd, KernelArg::I32(branches as i32), rep, KernelArg::F32(inputs.ln_eps), stage_arg];
        // SAFETY: z has N·B·T·H elements and the statistics (when passed) 2·N·B·T, both fresh
        // workspace; h, r, γ, β were checked as for the fused launch; the plan was validated
        // and its shared memory is the kernel's layout for `stage` (split_forward_team_bytes).
        unsafe { gpu.launch(pre_kernel, cfg, &args)? };
    }

    // The two products of each branch. The descriptors' weights were validated against H and m
    // when they were built, and they stay borrowed (or, detached, alive by the owner's promise).
    for (i, d) in descriptors.descriptors().iter().enumerate() {
        let m = d.bottleneck as usize;
        // SAFETY: see above: [m, H], [m], [H, m], [H] f32 arrays, not written during the launch.
        let (wd, bd, wu, bu) = unsafe {
            (DeviceView::<f32>::from_raw(d.down_w, m * hidden), DeviceView::<f32>::from_raw(d.down_b, m), DeviceView::<f32>::from_raw(d.up_w, hidden * m), DeviceView::<f32>::from_raw(d.up_b, hidden))
        };
        let z = window(i * per_branch * hidden, per_branch * hidden)?;
        let a = window(offsets[i], per_branch * m)?;
        // a = act(z·W_dᵀ + b_d): column-major aᵀ (m x B·T) = W_d (stored H x m, transposed) · zᵀ.
        // ReLU goes into cuBLASLt's epilogue: max(x + b, 0) is exactly the kernel's function.
        // Every other activation, gelu_new included, is adapter_split_bias_act_f32 (the fused
        // kernel's adapter_activation): cuBLASLt's GELU epilogue is the same tanh formula, but
        // its tanh is unspecified (tests/gemm.rs allows it 1e-3 relative: tanh.approx.f32 is
        // within 2^-11), which the fp32 bound of 1e-5 would not survive.
        let epilogue = if d.activation == 0 { Epilogue::ReluBias } else { Epilogue::None };
        {
            // SAFETY: the branch's own window of the down products, read by nothing meanwhile.
            let mut a_out = unsafe { a.assume_writable() };
            let gm = Gemm::new(Transpose::Yes, Transpose::No, m, per_branch, hidden).with_ld(hidden, hidden, m).with_epilogue(epilogue).with_tf32(descriptors.tf32_products());
            gpu.gemm(&gm, &wd, &z, &mut a_out, epilogue.needs_bias().then_some(&bd))?;
            if epilogue == Epilogue::None {
                let len = per_branch * m;
                let args = [a_out.arg(), bd.arg(), KernelArg::I64(len as i64), KernelArg::I32(m as i32), KernelArg::I32(d.activation)];
                // SAFETY: a holds B·T·m elements, the bias m; the bias is a weight, apart from
                // the workspace.
                unsafe { gpu.launch(ADAPTER_SPLIT_BIAS_ACT_F32, super::elementwise::flat_launch(len), &args)? };
            }
        }
        // up = a·W_uᵀ + b_u over the branch's z, which is no longer read.
        // SAFETY: the branch's rows of zu; its z was consumed by the down product above.
        let mut u = unsafe { z.assume_writable() };
        let gm = Gemm::new(Transpose::Yes, Transpose::No, hidden, per_branch, m).with_ld(m, m, hidden).with_epilogue(Epilogue::Bias).with_tf32(descriptors.tf32_products());
        gpu.gemm(&gm, &wu, &a, &mut u, Some(&bu))?;
    }

    // Post: out.
    let up_arg = window(0, n)?.arg();
    // Parameter order: out, up, stats, gate, h, r, ln_gamma, ln_beta, descs, batch, seq_len,
    // hidden, branches, replicate, ln_eps, seed_buf, seed_lo, seed_hi, stage.
    let args = [
        A::act_arg_mut(&outputs.out),
        up_arg,
        stats_arg,
        gate_arg,
        A::act_arg(&inputs.h),
        A::act_arg(&inputs.r),
        ln_gamma,
        ln_beta,
        descriptors.view().arg(),
        b,
        t,
        hd,
        KernelArg::I32(branches as i32),
        rep,
        KernelArg::F32(inputs.ln_eps),
        seed_buf,
        seed_lo,
        seed_hi,
        stage_arg,
    ];
    // SAFETY: out has N·B·T·H elements, up (workspace) the same, the statistics 2·N·B·T; the
    // rest as for the pre launch and the fused path's gate and seed.
    unsafe { gpu.launch(post_kernel, cfg, &args)? };
    drop(work); // back to the pool only after the last launch that reads it was enqueued
    Ok(())
}

// Words per descriptor, for the kernel's view of the buffer (19 u64s).
const _: () = assert!(WORDS_PER_DESCRIPTOR == 19);

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(batch: usize, seq_len: usize, hidden: usize, branches: usize, replicate: bool) -> LocationShape {
        LocationShape { batch, seq_len, hidden, branches, replicate }
    }

    fn sizes(s: LocationShape) -> LocationSizes {
        let n_out = s.branches * s.batch * s.seq_len * s.hidden;
        let n_in = if s.replicate { n_out / s.branches } else { n_out };
        LocationSizes {
            shape: s,
            h: n_in,
            r: n_in,
            ln_gamma: s.hidden,
            ln_beta: s.hidden,
            out: n_out,
            gate: None,
            descriptor_branches: s.branches,
            descriptor_hidden: s.hidden,
            needs_gate: false,
        }
    }

    #[test]
    fn storage_types_pick_the_kernels() {
        let names = |k: Result<(KernelName, KernelName)>| k.map(|(l, g)| (l.name, g.name));
        assert_eq!(names(kernels::<f32, f32>()).unwrap(), ("adapter_location_forward_f32", "adapter_location_gate_f32"));
        assert_eq!(names(kernels::<half::bf16, f32>()).unwrap(), ("adapter_location_forward_bf16", "adapter_location_gate_bf16"));
        assert_eq!(names(kernels::<half::bf16, half::bf16>()).unwrap(), ("adapter_location_forward_bf16io", "adapter_location_gate_bf16io"));
        assert_eq!(names(kernels::<half::f16, f32>()).unwrap(), ("adapter_location_forward_f16", "adapter_location_gate_f16"));
        assert_eq!(names(kernels::<half::f16, half::f16>()).unwrap(), ("adapter_location_forward_f16io", "adapter_location_gate_f16io"));
        for err in [names(kernels::<f32, half::bf16>()).unwrap_err(), names(kernels::<half::bf16, half::f16>()).unwrap_err(), names(kernels::<half::f16, half::bf16>()).unwrap_err()] {
            assert!(matches!(err, Error::Unsupported(_)), "{err}");
        }
    }

    #[test]
    fn storage_types_pick_the_split_kernels() {
        let names = |k: Result<(KernelName, KernelName)>| k.map(|(l, g)| (l.name, g.name));
        assert_eq!(names(split_kernels::<f32, f32>()).unwrap(), ("adapter_split_pre_f32", "adapter_split_post_f32"));
        assert_eq!(names(split_kernels::<half::bf16, f32>()).unwrap(), ("adapter_split_pre_bf16", "adapter_split_post_bf16"));
        assert_eq!(names(split_kernels::<half::bf16, half::bf16>()).unwrap(), ("adapter_split_pre_bf16io", "adapter_split_post_bf16io"));
        assert_eq!(names(split_kernels::<half::f16, f32>()).unwrap(), ("adapter_split_pre_f16", "adapter_split_post_f16"));
        assert_eq!(names(split_kernels::<half::f16, half::f16>()).unwrap(), ("adapter_split_pre_f16io", "adapter_split_post_f16io"));
        for err in [names(split_kernels::<f32, half::bf16>()).unwrap_err(), names(split_kernels::<f32, half::f16>()).unwrap_err(), names(split_kernels::<half::bf16, half::f16>()).unwrap_err()] {
            assert!(matches!(err, Error::Unsupported(_)), "{err}");
        }
    }

    #[test]
    fn location_paths_parse_and_refuse_other_values() {
        assert_eq!(LocationPath::parse("fused").unwrap(), LocationPath::Fused);
        assert_eq!(LocationPath::parse("split").unwrap(), LocationPath::Split);
        for bad in ["", "Split", "gemm", " fused"] {
            let err = LocationPath::parse(bad).unwrap_err();
            assert!(matches!(err, Error::Input(_)) && err.to_string().contains(LOCATION_PATH_VAR), "{bad:?}: {err}");
        }
        // Statistics only where the post kernel recomputes x after the original LayerNorm.
        let steps = |r, before| LocationSteps { residual_before_ln: r, original_ln_before: before, original_ln_after: true };
        assert!(needs_pre_stats(steps(ResidualBeforeLn::False, true)));
        assert!(!needs_pre_stats(steps(ResidualBeforeLn::False, false)));
        assert!(!needs_pre_stats(steps(ResidualBeforeLn::True, true)));
        assert!(!needs_pre_stats(steps(ResidualBeforeLn::PostAdd, true)));
    }

    #[test]
    fn consistent_sizes_pass() {
        sizes(shape(2, 7, 40, 3, true)).check(1e-12).unwrap();
        sizes(shape(2, 7, 40, 3, false)).check(1e-12).unwrap();
        sizes(shape(0, 7, 40, 1, false)).check(1e-12).unwrap();
        LocationSizes { gate: Some(6), needs_gate: true, ..sizes(shape(2, 7, 40, 3, true)) }.check(0.0).unwrap();
        // No rows: nothing is read, so a missing gate output does not matter.
        LocationSizes { needs_gate: true, ..sizes(shape(0, 7, 40, 3, true)) }.check(0.0).unwrap();
    }

    #[test]
    fn every_wrong_length_is_a_shape_error_naming_the_operand() {
        let ok = sizes(shape(2, 7, 40, 3, true));
        let cases: [(LocationSizes, &str); 12] = [
            (LocationSizes { h: 2 * 7 * 40 * 3, ..ok }, "h has 1680 elements, expected 560 (B·T·H)"),
            (LocationSizes { r: 559, ..ok }, "r has 559"),
            (LocationSizes { ln_gamma: 39, ..ok }, "LayerNorm gamma has 39 elements, expected 40 (H)"),
            (LocationSizes { ln_beta: 41, ..ok }, "LayerNorm beta"),
            (LocationSizes { out: 560, ..ok }, "out has 560 elements, expected 1680 (N·B·T·H)"),
            (LocationSizes { gate: Some(5), ..ok }, "gate has 5 elements, expected 6 (N·B)"),
            (LocationSizes { needs_gate: true, ..ok }, "gate output is required"),
            (LocationSizes { descriptor_hidden: 48, ..ok }, "built for H = 48"),
            (LocationSizes { descriptor_branches: 2, ..ok }, "3 branches, but there are 2 descriptors"),
            (LocationSizes { shape: shape(2, 7, 0, 3, true), ..ok }, "hidden 0"),
            (LocationSizes { shape: shape(2, 7, 40, 0, true), ..ok }, "branches 0"),
            (sizes(shape(2, 7, 40, 3, false)), "ok"),
        ];
        for (c, want) in &cases[..11] {
            let err = c.check(1e-12).unwrap_err();
            assert!(matches!(err, Error::Shape { .. }), "{c:?}: {err}");
            assert!(err.to_string().contains(want), "{err} should contain {want:?}");
        }
        cases[11].0.check(1e-12).unwrap();
        let not_replicated = sizes(shape(2, 7, 40, 3, false));
        let err = LocationSizes { h: 560, ..not_replicated }.check(1e-12).unwrap_err().to_string();
        assert!(err.contains("expected 1680 (N·B·T·H)"), "{err}");
        let huge = LocationSizes { shape: shape(1 << 20, 1 << 10, 40, 3, false), ..ok };
        assert!(huge.check(1e-12).unwrap_err().to_string().contains("must fit in an i32"));
        assert!(matches!(ok.check(f32::NAN), Err(Error::Input(_))));
        assert!(matches!(ok.check(-1.0), Err(Error::Input(_))));
    }

    #[test]
    fn auto_plans_follow_the_documented_rules() {
        for (h, m) in [(1, 1), (40, 3), (384, 48), (768, 64), (1024, 4096)] {
            let p = LocationPlan::auto(h, m);
            assert_eq!(p.threads_per_row, 32, "H {h}");
            p.validate(h, m, DEFAULT_SHARED_BYTES).unwrap();
        }
        assert_eq!(LocationPlan::auto(384, 48).rows_per_block, 8);
        // 8 rows of 1024 + 4096 floats would need 160 KiB: 2 rows of 40 KiB fit.
        assert_eq!(LocationPlan::auto(1024, 4096).rows_per_block, 2);
        assert_eq!(LocationPlan::auto(1025, 8), LocationPlan { threads_per_row: 128, rows_per_block: 1 });
        assert_eq!(LocationPlan::auto(4099, 8), LocationPlan { threads_per_row: 288, rows_per_block: 1 });
        assert_eq!(LocationPlan::auto(1 << 16, 8).threads_per_row, MAX_FORWARD_THREADS);
    }

    #[test]
    fn invalid_plans_are_rejected() {
        let bad = [
            LocationPlan { threads_per_row: 48, rows_per_block: 1 },
            LocationPlan { threads_per_row: 0, rows_per_block: 1 },
            LocationPlan { threads_per_row: 2048, rows_per_block: 1 },
            // Past the forward kernels' __launch_bounds__ (their registers would not fit).
            LocationPlan { threads_per_row: 1024, rows_per_block: 1 },
            LocationPlan { threads_per_row: 64, rows_per_block: 2 },
            LocationPlan { threads_per_row: 32, rows_per_block: 33 },
            LocationPlan { threads_per_row: 32, rows_per_block: 0 },
            LocationPlan { threads_per_row: 32, rows_per_block: 8 }, // 8·(2000 + 48)·4 > 48 KiB
        ];
        for p in bad {
            let err = p.validate(2000, 48, DEFAULT_SHARED_BYTES).unwrap_err();
            assert!(matches!(err, Error::Shape { .. }), "{p:?}: {err}");
        }
    }

    #[test]
    fn codes_match_the_kernel() {
        let src = crate::cuda::registry::adapter::SOURCE.code;
        for (a, name) in [
            (Activation::Relu, "ADAPTER_ACT_RELU"),
            (Activation::Gelu, "ADAPTER_ACT_GELU"),
            (Activation::GeluNew, "ADAPTER_ACT_GELU_NEW"),
            (Activation::Swish, "ADAPTER_ACT_SWISH"),
            (Activation::Tanh, "ADAPTER_ACT_TANH"),
            (Activation::Sigmoid, "ADAPTER_ACT_SIGMOID"),
        ] {
            assert!(src.contains(&format!("#define {name} {}\n", activation_code(a))), "{name}");
        }
        for (code, name) in [(SCALING_FIXED, "FIXED"), (SCALING_LEARNED, "LEARNED"), (SCALING_CHANNEL, "CHANNEL")] {
            assert!(src.contains(&format!("#define ADAPTER_SCALING_{name} {code}\n")), "{name}");
        }
        for (r, name) in [(ResidualBeforeLn::True, "H"), (ResidualBeforeLn::False, "X"), (ResidualBeforeLn::PostAdd, "V")] {
            assert!(src.contains(&format!("#define ADAPTER_RESIDUAL_{name} {}", residual_code(r))), "{name}");
        }
        assert!(src.contains("static_assert(sizeof(AdapterBranchDesc) == 152"));
    }
}

// ---- backward ------------------------------------------------------------------------------------
//
// The launcher of `adapter_location_backward_f32` (kernels/adapter.cu), the CUDA twin of
// `Backend::adapter_location_backward_into`: see `adapter_location_backward`.

use super::elementwise::fill_f32;
use super::gemm::{Epilogue, Gemm, Transpose};
use super::registry::adapter::{ADAPTER_LOCATION_BACKWARD_F32, ADAPTER_LOCATION_BACKWARD_GATE_F32};

const OP_BWD: &str = "cuda::adapter_location_backward";

/// The most branches one backward launch takes (its branch masks are 32-bit words).
pub const MAX_BACKWARD_BRANCHES: usize = 32;

/// The most threads per block of the backward kernel (`ADAPTER_BWD_MAX_THREADS`, its
/// `__launch_bounds__`): it needs about 150 registers a thread.
pub const MAX_BACKWARD_THREADS: u32 = 256;

/// Workspace regions start on 64-float (256-byte) boundaries, what cuBLASLt likes best.
const WORKSPACE_ALIGN: usize = 64;

/// Column offsets of one row of a trainable branch's pack: the per-row vectors whose sums over
/// rows are its parameter gradients. Mirrors `AdapterPackLayout` / `adapter_pack_layout` in
/// kernels/adapter.cu, field for field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackLayout {
    /// `[H]` dup = s ⊙ du_s (the gradient of the up projection's output).
    pub dup: usize,
    /// `[H]` the down projection's input z0; None when it is h's own rows (replicated, no
    /// LayerNorm before it), which the GEMM then reads directly.
    pub z0: Option<usize>,
    /// `[H]` each: dy ⊙ x̂ and dy of LN_after.
    pub ln_after: Option<(usize, usize)>,
    /// `[H]` each: dz0 ⊙ x̂ and dz0 of LN_before.
    pub ln_before: Option<(usize, usize)>,
    /// `[H]` du_s ⊙ up (channel) or `[1]` its row sum (learned).
    pub scaling: Option<usize>,
    /// `[H]` the gate's input x, when it differs from z0 (a gate behind LN_before).
    pub x: Option<usize>,
    /// `[m]` act(pre) and dpre.
    pub act: usize,
    pub dpre: usize,
    /// `[1]` the gate logit's gradient.
    pub dlogit: Option<usize>,
    /// Floats per row, a multiple of 4.
    pub width: usize,
}

impl PackLayout {
    /// The layout of branch `d`'s pack at width `hidden`.
    pub fn of(d: &BranchDescriptor, hidden: usize, replicate: bool) -> PackLayout {
        let ln_before = d.ln_before_gamma != 0;
        let mut k = 0;
        let mut take = |n: usize| {
            let at = k;
            k += n;
            at
        };
        let dup = take(hidden);
        let z0 = (ln_before || d.original_ln_before != 0 || !replicate).then(|| take(hidden));
        let ln_after = (d.ln_after_gamma != 0).then(|| (take(hidden), take(hidden)));
        let ln_before_cols = ln_before.then(|| (take(hidden), take(hidden)));
        let mut scaling = (d.scaling_kind == SCALING_CHANNEL).then(|| take(hidden));
        let x = (d.gate_w != 0 && ln_before).then(|| take(hidden));
        let m = d.bottleneck as usize;
        let act = take(m);
        let dpre = take(m);
        if d.scaling_kind == SCALING_LEARNED {
            scaling = Some(take(1));
        }
        let dlogit = (d.gate_w != 0).then(|| take(1));
        PackLayout { dup, z0, ln_after, ln_before: ln_before_cols, scaling, x, act, dpre, dlogit, width: k.div_ceil(4) * 4 }
    }
}

/// Where things live in the backward's workspace (in floats).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackwardWorkspaceLayout {
    /// `[B·T]` ones (the right-hand side of the column-sum GEMMs); empty when nothing trains.
    pub ones: Range<usize>,
    /// `[N·B]` gate means and `[N·B·T]` gate row terms; empty without a gated branch.
    pub gate: Range<usize>,
    pub gate_q: Range<usize>,
    /// Where the packs start; the trainable branches' packs follow in branch order, `B·T` rows
    /// each (the kernel finds them the same way).
    pub packs: usize,
    /// Per branch: its pack's start and layout, None when the branch is not trainable.
    pub branch_packs: Vec<Option<(usize, PackLayout)>>,
    /// Floats in all.
    pub len: usize,
}

fn align_up(n: usize) -> usize {
    n.div_ceil(WORKSPACE_ALIGN) * WORKSPACE_ALIGN
}

/// The workspace a backward of `shape` needs when the branches with `trainable[i]` get parameter
/// gradients. Pure; errors are `Error::Shape` (sizes that overflow, a wrong mask length).
pub fn backward_workspace_layout(descs: &[BranchDescriptor], hidden: usize, shape: LocationShape, trainable: &[bool]) -> Result<BackwardWorkspaceLayout> {
    let fail = |msg: String| Err(Error::shape(OP_BWD, msg));
    if trainable.len() != descs.len() {
        return fail(format!("{} trainable flags for {} branches", trainable.len(), descs.len()));
    }
    let per_branch = shape.batch.checked_mul(shape.seq_len).filter(|&r| r <= i32::MAX as usize);
    let Some(per_branch) = per_branch else {
        return fail(format!("batch {} x seq_len {} rows must fit in an i32", shape.batch, shape.seq_len));
    };
    let overflow = || Error::shape(OP_BWD, format!("the workspace for B·T = {per_branch}, H = {hidden}, N = {} overflows usize", descs.len()));
    let any_train = trainable.iter().any(|&t| t);
    let gated = descs.iter().any(|d| d.gate_w != 0);
    let n = descs.len();
    let ones = 0..if any_train { per_branch } else { 0 };
    let gate_start = align_up(ones.end);
    let gate = gate_start..gate_start + if gated { n * shape.batch } else { 0 };
    let q_start = align_up(gate.end);
    let gate_q_len = if gated { n.checked_mul(per_branch).ok_or_else(overflow)? } else { 0 };
    let gate_q = q_start..q_start + gate_q_len;
    let packs = align_up(gate_q.end);
    let mut at = packs;
    let mut branch_packs = Vec::with_capacity(n);
    for (d, &t) in descs.iter().zip(trainable) {
        if !t {
            branch_packs.push(None);
            continue;
        }
        let layout = PackLayout::of(d, hidden, shape.replicate);
        if layout.width > i32::MAX as usize {
            return fail(format!("a pack row of {} floats must fit in an i32 (H = {hidden})", layout.width));
        }
        branch_packs.push(Some((at, layout)));
        at = per_branch.checked_mul(layout.width).and_then(|b| at.checked_add(b)).ok_or_else(overflow)?;
    }
    Ok(BackwardWorkspaceLayout { ones, gate, gate_q, packs, branch_packs, len: at })
}

/// Floats of workspace [`adapter_location_backward`] needs for `shape` with these trainable
/// branches (an upper bound for every subset of them).
pub fn backward_workspace_len(descriptors: &LocationDescriptors<'_>, shape: LocationShape, trainable: &[bool]) -> Result<usize> {
    Ok(backward_workspace_layout(descriptors.descriptors(), descriptors.hidden(), shape, trainable)?.len)
}

/// Device scratch for [`adapter_location_backward`]: the ones vector, the gate's per-example
/// terms and the trainable branches' per-row packs. Allocate it once per shape (from
/// [`backward_workspace_len`]) and reuse it: a backward allocates nothing.
pub struct LocationBackwardWorkspace {
    buffer: DeviceBuffer<f32>,
    /// How many leading elements already hold 1.0 (filled on first need, then kept).
    ones: usize,
}

impl std::fmt::Debug for LocationBackwardWorkspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocationBackwardWorkspace").field("len", &self.buffer.len()).finish()
    }
}

impl LocationBackwardWorkspace {
    /// `len` floats (at least 1, so that a zero-length workspace is still a valid buffer).
    pub fn new(gpu: &Gpu, len: usize) -> Result<Self> {
        Ok(LocationBackwardWorkspace { buffer: gpu.alloc(len.max(1))?, ones: 0 })
    }
    pub fn len(&self) -> usize {
        self.buffer.len()
    }
    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }
}

/// Where one trainable branch's parameter gradients go: views shaped like its parameters (an
/// option the branch lacks has none), overwritten, or added to when `accumulate` (the
/// `GradsOut` rule). Two branches of one adapter may name the same destinations: the branches'
/// products run in order, so the later one (accumulating) adds to the earlier one's result.
#[derive(Debug)]
pub struct BranchGrads<'a> {
    /// `[m, H]`, `[m]`.
    pub down_w: DeviceViewMut<'a, f32>,
    pub down_b: DeviceViewMut<'a, f32>,
    /// `[H, m]`, `[H]`.
    pub up_w: DeviceViewMut<'a, f32>,
    pub up_b: DeviceViewMut<'a, f32>,
    /// γ, β `[H]` each.
    pub ln_before: Option<(DeviceViewMut<'a, f32>, DeviceViewMut<'a, f32>)>,
    pub ln_after: Option<(DeviceViewMut<'a, f32>, DeviceViewMut<'a, f32>)>,
    /// `[1]` (learned) or `[H]` (channel).
    pub scaling: Option<DeviceViewMut<'a, f32>>,
    /// Weight `[1, H]` (H elements), bias `[1]`.
    pub gate: Option<(DeviceViewMut<'a, f32>, DeviceViewMut<'a, f32>)>,
    pub accumulate: bool,
}

/// What the backward writes.
#[derive(Debug)]
pub struct LocationBackwardOutputs<'a, 'g, A: DeviceScalar = f32> {
    /// `(dh, dr)`, `[B, T, H]` when the location replicates (summed over the branches), else
    /// `[N·B, T, H]`; None when the input gradients are not needed (then only trainable branches'
    /// rows are computed).
    pub input_grads: Option<(DeviceViewMut<'a, A>, DeviceViewMut<'a, A>)>,
    /// One entry per branch: its gradient destinations, or None for a frozen branch.
    pub grads: &'g mut [Option<BranchGrads<'a>>],
}

/// The element counts of one branch's gradient destinations, for [`check_branch_grads`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BranchGradLens {
    pub down_w: usize,
    pub down_b: usize,
    pub up_w: usize,
    pub up_b: usize,
    pub ln_before: Option<(usize, usize)>,
    pub ln_after: Option<(usize, usize)>,
    pub scaling: Option<usize>,
    pub gate: Option<(usize, usize)>,
}

impl BranchGradLens {
    pub fn of(g: &BranchGrads<'_>) -> Self {
        let pair = |p: &Option<(DeviceViewMut<'_, f32>, DeviceViewMut<'_, f32>)>| p.as_ref().map(|(a, b)| (a.len(), b.len()));
        BranchGradLens {
            down_w: g.down_w.len(),
            down_b: g.down_b.len(),
            up_w: g.up_w.len(),
            up_b: g.up_b.len(),
            ln_before: pair(&g.ln_before),
            ln_after: pair(&g.ln_after),
            scaling: g.scaling.as_ref().map(|s| s.len()),
            gate: pair(&g.gate),
        }
    }
}

/// Branch `i`'s destinations against its descriptor: every length, and a destination given if
/// and only if the branch has that parameter. Pure.
pub fn check_branch_grads(i: usize, d: &BranchDescriptor, hidden: usize, g: &BranchGradLens) -> Result<()> {
    let m = d.bottleneck as usize;
    let expect = |what: &str, got: usize, want: usize, why: &str| -> Result<()> {
        if got != want {
            return Err(Error::shape(OP_BWD, format!("branch {i}: the {what} gradient has {got} elements, expected {want} ({why}) for H = {hidden}, bottleneck = {m}")));
        }
        Ok(())
    };
    let presence = |what: &str, given: bool, has: bool| -> Result<()> {
        if given != has {
            let (a, b) = if has { ("has", "none is given") } else { ("has none", "one is given") };
            return Err(Error::shape(OP_BWD, format!("branch {i}: the adapter {a} {what}, but {b} a gradient destination")));
        }
        Ok(())
    };
    expect("down weight", g.down_w, m * hidden, "bottleneck·H")?;
    expect("down bias", g.down_b, m, "bottleneck")?;
    expect("up weight", g.up_w, hidden * m, "H·bottleneck")?;
    expect("up bias", g.up_b, hidden, "H")?;
    presence("a LayerNorm before", g.ln_before.is_some(), d.ln_before_gamma != 0)?;
    if let Some((gm, bt)) = g.ln_before {
        expect("LayerNorm-before gamma", gm, hidden, "H")?;
        expect("LayerNorm-before beta", bt, hidden, "H")?;
    }
    presence("a LayerNorm after", g.ln_after.is_some(), d.ln_after_gamma != 0)?;
    if let Some((gm, bt)) = g.ln_after {
        expect("LayerNorm-after gamma", gm, hidden, "H")?;
        expect("LayerNorm-after beta", bt, hidden, "H")?;
    }
    presence("a learned or channel scaling", g.scaling.is_some(), d.scaling_kind != SCALING_FIXED)?;
    if let Some(s) = g.scaling {
        let (want, why) = if d.scaling_kind == SCALING_LEARNED { (1, "learned: one scalar") } else { (hidden, "channel: H") };
        expect("scaling", s, want, why)?;
    }
    presence("a gate", g.gate.is_some(), d.gate_w != 0)?;
    if let Some((w, b)) = g.gate {
        expect("gate weight", w, hidden, "[1, H]")?;
        expect("gate bias", b, 1, "[1]")?;
    }
    Ok(())
}

/// A backward over no rows: every gradient is an empty sum, so the overwritten destinations
/// become 0 (accumulated ones keep their values).
fn zero_empty_grads<A: DeviceScalar>(gpu: &Gpu, outputs: &mut LocationBackwardOutputs<'_, '_, A>) -> Result<()> {
    for g in outputs.grads.iter_mut().flatten() {
        if !g.accumulate {
            for_each_dest(g, |v| gpu.memset_zero(v))?;
        }
    }
    Ok(())
}

/// A backward's branch masks `(train_mask, branch_mask)`: the trainable branches (those given
/// gradient destinations), and the branches whose rows run (every branch when the input
/// gradients are asked for, else the trainable ones). `branches` <= 32 (checked before).
fn backward_masks<A: DeviceScalar>(outputs: &LocationBackwardOutputs<'_, '_, A>, branches: usize) -> (u32, u32) {
    let all: u32 = if branches == 32 { u32::MAX } else { (1u32 << branches) - 1 };
    let train_mask: u32 = outputs.grads.iter().enumerate().filter(|(_, g)| g.is_some()).fold(0, |m, (i, _)| m | (1 << i));
    (train_mask, if outputs.input_grads.is_some() { all } else { train_mask })
}

/// The lengths a backward needs, checked before anything is enqueued. Pure.
#[derive(Clone, Copy, Debug)]
pub struct LocationBackwardSizes {
    pub shape: LocationShape,
    pub h: usize,
    pub r: usize,
    pub ln_gamma: usize,
    pub ln_beta: usize,
    pub d_out: usize,
    /// `(dh, dr)` when the input gradients are asked for.
    pub input_grads: Option<(usize, usize)>,
    /// Entries in the per-branch gradient list.
    pub grads: usize,
    pub descriptor_branches: usize,
    pub descriptor_hidden: usize,
    /// The workspace given and the one this call needs.
    pub workspace: usize,
    pub workspace_needed: usize,
}

impl LocationBackwardSizes {
    /// The lengths of one backward call's operands (the fused and the split entry points), with
    /// the workspace given and the one the call needs (0 and 0 where the path plans its own).
    fn of<P: DeviceScalar, A: DeviceScalar>(
        inputs: &LocationInputs<'_, P, A>,
        d_out: &DeviceView<'_, A>,
        descriptors: &LocationDescriptors<'_>,
        outputs: &LocationBackwardOutputs<'_, '_, A>,
        shape: LocationShape,
        workspace: usize,
        workspace_needed: usize,
    ) -> Self {
        LocationBackwardSizes {
            shape,
            h: inputs.h.len(),
            r: inputs.r.len(),
            ln_gamma: inputs.ln_gamma.len(),
            ln_beta: inputs.ln_beta.len(),
            d_out: d_out.len(),
            input_grads: outputs.input_grads.as_ref().map(|(dh, dr)| (dh.len(), dr.len())),
            grads: outputs.grads.len(),
            descriptor_branches: descriptors.branches(),
            descriptor_hidden: descriptors.hidden(),
            workspace,
            workspace_needed,
        }
    }

    pub fn check(&self, ln_eps: f32) -> Result<()> {
        let branches = self.shape.branches;
        let fail = |msg: String| Err(Error::shape(OP_BWD, msg));
        let s = self.shape.checked(OP_BWD, self.descriptor_hidden, self.descriptor_branches)?;
        if branches > MAX_BACKWARD_BRANCHES {
            return Err(Error::Unsupported(format!("{OP_BWD}: {branches} Parallel branches; the backward kernel takes at most {MAX_BACKWARD_BRANCHES}")));
        }
        if self.grads != branches {
            return fail(format!("{} gradient entries for {branches} branches (one per branch, None when frozen)", self.grads));
        }
        let (n_in, n_out, in_what, dims) = (s.n_in, s.n_out, s.in_what, &s.dims);
        s.expect_inputs(self.h, self.r, self.ln_gamma, self.ln_beta)?;
        let expect = |name: &str, got: usize, want: usize, what: &str| s.expect(name, got, want, what);
        expect("d_out", self.d_out, n_out, "N·B·T·H")?;
        if let Some((dh, dr)) = self.input_grads {
            expect("dh", dh, n_in, in_what)?;
            expect("dr", dr, n_in, in_what)?;
        }
        if self.workspace < self.workspace_needed {
            return fail(format!("the workspace has {} floats, this backward needs {} (backward_workspace_len) for {dims}", self.workspace, self.workspace_needed));
        }
        if !ln_eps.is_finite() || ln_eps < 0.0 {
            return Err(Error::Input(format!("{OP_BWD}: LayerNorm eps must be finite and >= 0, got {ln_eps}")));
        }
        Ok(())
    }
}

/// The automatic plan of the backward: the forward's mappings (one warp per row, up to 8 rows per
/// block, for H <= 1024; else one block per row of about 16 columns per thread, at most
/// [`MAX_BACKWARD_THREADS`]), with rows per block halved until the team buffers fit 48 KiB.
pub fn backward_plan_auto(hidden: usize, bottleneck_stride: usize) -> LocationPlan {
    if hidden <= 1024 {
        let mut rows = 8u32;
        while rows > 1 && backward_shared_mem_bytes(LocationPlan { threads_per_row: 32, rows_per_block: rows }, hidden, bottleneck_stride) > DEFAULT_SHARED_BYTES {
            rows /= 2;
        }
        LocationPlan { threads_per_row: 32, rows_per_block: rows }
    } else {
        let threads = hidden.div_ceil(16).div_ceil(32) * 32;
        LocationPlan { threads_per_row: threads.clamp(128, MAX_BACKWARD_THREADS as usize) as u32, rows_per_block: 1 }
    }
}

/// Dynamic shared memory of the backward: per team `4·H + 3·stride` floats.
pub fn backward_shared_mem_bytes(plan: LocationPlan, hidden: usize, bottleneck_stride: usize) -> usize {
    plan.rows_per_block as usize * (4 * hidden + 3 * bottleneck_stride) * std::mem::size_of::<f32>()
}

/// Checks a plan against the backward kernel's contract (as [`LocationPlan::validate`], with the
/// backward's shared memory and at most [`MAX_BACKWARD_THREADS`] threads per block).
pub fn validate_backward_plan(plan: LocationPlan, hidden: usize, bottleneck_stride: usize, max_shared: usize) -> Result<()> {
    if plan.threads_per_row as u64 * plan.rows_per_block as u64 > MAX_BACKWARD_THREADS as u64 {
        return Err(Error::shape(OP_BWD, format!("launch plan {plan:?}: the backward takes at most {MAX_BACKWARD_THREADS} threads per block")));
    }
    // The thread-shape rules are the forward's; its shared-memory rule is checked with no limit.
    plan.validate(hidden, bottleneck_stride, usize::MAX).map_err(|e| match e {
        Error::Shape { msg, .. } => Error::shape(OP_BWD, msg),
        other => other,
    })?;
    let smem = backward_shared_mem_bytes(plan, hidden, bottleneck_stride);
    if smem > max_shared {
        return Err(Error::shape(
            OP_BWD,
            format!("launch plan {plan:?}: needs {smem} bytes of shared memory for H = {hidden} and bottleneck {bottleneck_stride}, more than the {max_shared} allowed"),
        ));
    }
    Ok(())
}

/// The gradient of [`adapter_location_forward`] for every branch of a location, with the
/// automatic plan.
///
/// - `d_out` is `[N·B, T, H]`, the gradient of the location's output.
/// - Input gradients `(dh, dr)` are written when `outputs.input_grads` is given (summed over the
///   branches when the location replicates). Parameter gradients go to `outputs.grads[i]` for the
///   trainable branches (written, or added when `accumulate`). Rows of a branch that is frozen are
///   not computed at all when the input gradients are not needed.
/// - One launch of the location kernel for all branches (two when a branch gates, plus the gate
///   means), then, per trainable branch, the weight gradients as GEMMs over the per-row packs
///   (`dW_up = dupᵀ·act`, `dW_down = dpreᵀ·z0`) and every bias, LayerNorm, scaling and gate
///   gradient as a column sum (a GEMM with a ones vector): deterministic, no atomics.
/// - Pure size checks come first ([`LocationBackwardSizes`], [`check_branch_grads`]: `Error::Shape`
///   naming the operand), then the plan, then aliasing (`Error::Input`). More than
///   [`MAX_BACKWARD_BRANCHES`] branches is `Error::Unsupported`.
/// - The branches' own dropout: the forward's masks, from the descriptors and
///   `inputs.dropout_seed` (required when a branch has dropout), applied to the gradient that
///   flows through them (and to the gate's and the scaling's terms, which read the dropped
///   values).
#[allow(clippy::too_many_arguments)] // the forward's operands plus d_out, the outputs and the workspace
pub fn adapter_location_backward<P: BaseScalar, A: ActivationScalar>(
    gpu: &Gpu,
    inputs: &LocationInputs<'_, P, A>,
    d_out: &DeviceView<'_, A>,
    descriptors: &LocationDescriptors<'_>,
    outputs: &mut LocationBackwardOutputs<'_, '_, A>,
    workspace: &mut LocationBackwardWorkspace,
    shape: LocationShape,
) -> Result<()> {
    let plan = backward_plan_auto(shape.hidden, descriptors.max_bottleneck());
    adapter_location_backward_with_plan(gpu, inputs, d_out, descriptors, outputs, workspace, shape, plan)
}

/// As [`adapter_location_backward`], with an explicit launch plan (validated).
#[allow(clippy::too_many_arguments)]
pub fn adapter_location_backward_with_plan<P: BaseScalar, A: ActivationScalar>(
    gpu: &Gpu,
    inputs: &LocationInputs<'_, P, A>,
    d_out: &DeviceView<'_, A>,
    descriptors: &LocationDescriptors<'_>,
    outputs: &mut LocationBackwardOutputs<'_, '_, A>,
    workspace: &mut LocationBackwardWorkspace,
    shape: LocationShape,
    plan: LocationPlan,
) -> Result<()> {
    if (A::DTYPE, P::DTYPE) != (DType::F32, DType::F32) {
        return Err(Error::Unsupported(format!(
            "{OP_BWD}: the fused backward takes f32 activations and an f32 LayerNorm, not {:?} / {:?}; bf16 and f16 activations take the split path (LocationPath::Split)",
            A::DTYPE,
            P::DTYPE
        )));
    }
    let descs = descriptors.descriptors();
    let trainable: Vec<bool> = outputs.grads.iter().map(Option::is_some).collect();
    // The workspace layout needs a mask as long as the descriptors; a wrong count is reported by
    // the size check below.
    let layout = if trainable.len() == descs.len() && shape.branches == descs.len() && shape.hidden == descriptors.hidden() {
        Some(backward_workspace_layout(descs, shape.hidden, shape, &trainable)?)
    } else {
        None
    };
    LocationBackwardSizes::of(inputs, d_out, descriptors, outputs, shape, workspace.len(), layout.as_ref().map_or(0, |l| l.len)).check(inputs.ln_eps)?;
    let Some(layout) = layout else {
        return Err(Error::Internal(format!("{OP_BWD}: sizes passed but no workspace layout")));
    };
    for (i, g) in outputs.grads.iter().enumerate() {
        if let Some(g) = g {
            check_branch_grads(i, &descs[i], shape.hidden, &BranchGradLens::of(g))?;
        }
    }
    let stride = descriptors.max_bottleneck();
    let max_shared = gpu.limits().max_shared_bytes_opt_in.saturating_sub(256);
    validate_backward_plan(plan, shape.hidden, stride, max_shared)?;
    let [seed_buf, seed_lo, seed_hi] = seed_args(OP_BWD, descriptors, inputs.dropout_seed.as_ref())?;
    check_backward_aliasing(inputs, d_out, descriptors, outputs)?;

    let LocationShape { batch, seq_len, hidden, branches, replicate } = shape;
    let per_branch = batch * seq_len;
    let need_input = outputs.input_grads.is_some();
    let beta = |g: &BranchGrads<'_>| if g.accumulate { 1.0 } else { 0.0 };
    if per_branch == 0 {
        return zero_empty_grads(gpu, outputs);
    }
    let (train_mask, branch_mask) = backward_masks(outputs, branches);
    if branch_mask == 0 {
        return Ok(()); // nothing is asked for
    }
    let gated_mask: u32 = descs.iter().enumerate().filter(|(_, d)| d.gate_w != 0).fold(0, |m, (i, _)| m | (1 << i)) & branch_mask;

    if train_mask != 0 && workspace.ones < per_branch {
        let mut ones = workspace.buffer.slice_mut(layout.ones.clone())?;
        fill_f32(gpu, &mut ones, 1.0)?;
        workspace.ones = per_branch;
    }
    let (b, t, hd, rep) = (KernelArg::I32(batch as i32), KernelArg::I32(seq_len as i32), KernelArg::I32(hidden as i32), KernelArg::I32(replicate as i32));
    let gate_arg = if gated_mask != 0 { workspace.buffer.slice(layout.gate.clone())?.arg() } else { KernelArg::Null };
    let gate_q_arg = if gated_mask != 0 { workspace.buffer.slice(layout.gate_q.clone())?.arg() } else { KernelArg::Null };
    let pack_arg = if train_mask != 0 { workspace.buffer.slice(layout.packs..layout.len)?.arg() } else { KernelArg::Null };
    let (dh_arg, dr_arg) = outputs.input_grads.as_ref().map_or((KernelArg::Null, KernelArg::Null), |(dh, dr)| (dh.arg(), dr.arg()));

    if gated_mask != 0 {
        // The gate means of the gated branches' examples (the forward's gate, masked).
        let args = [
            gate_arg,
            A::act_arg(&inputs.h),
            A::act_arg(&inputs.r),
            P::base_arg(&inputs.ln_gamma),
            P::base_arg(&inputs.ln_beta),
            descriptors.view().arg(),
            b,
            t,
            hd,
            rep,
            KernelArg::F32(inputs.ln_eps),
            KernelArg::U32(gated_mask),
        ];
        let cfg = LaunchConfig { grid_dim: ((branches * batch) as u32, 1, 1), block_dim: (32, seq_len.min(GATE_ROWS_PER_BLOCK) as u32, 1), shared_mem_bytes: 0 };
        // SAFETY: the sizes were checked: the gate region holds N·B floats, h and r the rows the
        // kernel reads for this shape and replicate flag, γ/β H; the descriptors were validated.
        unsafe { gpu.launch(ADAPTER_LOCATION_BACKWARD_GATE_F32, cfg, &args)? };
    }
    let smem = backward_shared_mem_bytes(plan, hidden, stride);
    if smem > gpu.dynamic_shared_limit(ADAPTER_LOCATION_BACKWARD_F32) {
        gpu.allow_dynamic_shared(ADAPTER_LOCATION_BACKWARD_F32, smem)?;
    }
    let phases: &[(i32, u32)] = if gated_mask != 0 { &[(0, gated_mask), (1, branch_mask)] } else { &[(1, branch_mask)] };
    for &(phase, mask) in phases {
        let teams = if replicate { per_branch } else { mask.count_ones() as usize * per_branch };
        let cfg = LaunchConfig {
            grid_dim: (teams.div_ceil(plan.rows_per_block as usize) as u32, 1, 1),
            block_dim: (plan.threads_per_row, plan.rows_per_block, 1),
            shared_mem_bytes: smem as u32,
        };
        // Parameter order: dh, dr, pack, gate_q, gate, d_out, h, r, ln_gamma, ln_beta, descs,
        // batch, seq_len, hidden, branches, replicate, ln_eps, bottleneck_stride, branch_mask,
        // train_mask, need_input, phase, seed_buf, seed_lo, seed_hi (checked against
        // kernels/adapter.cu by Gpu::launch).
        let args = [
            dh_arg,
            dr_arg,
            pack_arg,
            gate_q_arg,
            gate_arg,
            A::act_arg(d_out),
            A::act_arg(&inputs.h),
            A::act_arg(&inputs.r),
            P::base_arg(&inputs.ln_gamma),
            P::base_arg(&inputs.ln_beta),
            descriptors.view().arg(),
            b,
            t,
            hd,
            KernelArg::I32(branches as i32),
            rep,
            KernelArg::F32(inputs.ln_eps),
            KernelArg::I32(stride as i32),
            KernelArg::U32(mask),
            KernelArg::U32(train_mask),
            KernelArg::I32(need_input as i32),
            KernelArg::I32(phase),
            seed_buf,
            seed_lo,
            seed_hi,
        ];
        // SAFETY: every length was checked above (dh/dr: the input rows; d_out: N·B·T·H; the
        // workspace regions: backward_workspace_layout for this shape and trainable set, which
        // the kernel's adapter_pack_layout mirrors; the seed buffer, if any: 2 words), the plan
        // was validated against the shared memory it needs, and no output aliases an input.
        unsafe { gpu.launch(ADAPTER_LOCATION_BACKWARD_F32, cfg, &args)? };
    }

    // Parameter gradients: sums over the branch's rows of its pack's columns, in branch order.
    let rows = per_branch;
    let ones = workspace.buffer.slice(0..rows)?;
    for (i, g) in outputs.grads.iter_mut().enumerate() {
        let (Some(g), Some((start, lay))) = (g.as_mut(), layout.branch_packs[i]) else {
            continue;
        };
        let k = lay.width;
        let beta = beta(g);
        // Columns [col, col + len) of the pack's rows: a column-major len x rows matrix, ld k.
        let cols = |col: usize, len: usize| workspace.buffer.slice(start + col..start + (rows - 1) * k + col + len);
        // The branch's own rows of h (replicated: h itself).
        let h_rows = || -> Result<DeviceView<'_, f32>> {
            if replicate {
                // SAFETY: A is f32 (refused otherwise at entry), so h's elements are f32s.
                Ok(unsafe { DeviceView::<f32>::from_raw(inputs.h.device_ptr(), inputs.h.len()) })
            } else {
                Err(Error::Internal(format!("{OP_BWD}: branch {i}'s z0 is not in its pack without replication")))
            }
        };
        let m = descs[i].bottleneck as usize;
        // dW_up [H, m] row-major = (act'·dupᵀ) column-major m x H: act' is m x rows, dup' H x rows.
        let gm = Gemm::new(Transpose::No, Transpose::Yes, m, hidden, rows).with_ld(k, k, m).with_scalars(1.0, beta);
        gpu.gemm(&gm, &cols(lay.act, m)?, &cols(lay.dup, hidden)?, &mut g.up_w, None)?;
        // dW_down [m, H] row-major = (z0'·dpreᵀ) column-major H x m.
        let (z0, ldz) = match lay.z0 {
            Some(c) => (cols(c, hidden)?, k),
            None => (h_rows()?, hidden),
        };
        let gm = Gemm::new(Transpose::No, Transpose::Yes, hidden, m, rows).with_ld(ldz, k, hidden).with_scalars(1.0, beta);
        gpu.gemm(&gm, &z0, &cols(lay.dpre, m)?, &mut g.down_w, None)?;
        // Column sums: pack' (len x rows, ld k) times the ones vector.
        let colsum = |col: usize, len: usize, dest: &mut DeviceViewMut<'_, f32>| -> Result<()> {
            let gm = Gemm::new(Transpose::No, Transpose::No, len, 1, rows).with_ld(k, rows, len).with_scalars(1.0, beta);
            gpu.gemm(&gm, &cols(col, len)?, &ones, dest, None)
        };
        colsum(lay.dup, hidden, &mut g.up_b)?;
        colsum(lay.dpre, m, &mut g.down_b)?;
        if let (Some((gc, bc)), Some((gd, bd))) = (lay.ln_after, g.ln_after.as_mut()) {
            colsum(gc, hidden, gd)?;
            colsum(bc, hidden, bd)?;
        }
        if let (Some((gc, bc)), Some((gd, bd))) = (lay.ln_before, g.ln_before.as_mut()) {
            colsum(gc, hidden, gd)?;
            colsum(bc, hidden, bd)?;
        }
        if let (Some(c), Some(dest)) = (lay.scaling, g.scaling.as_mut()) {
            let len = if descs[i].scaling_kind == SCALING_LEARNED { 1 } else { hidden };
            colsum(c, len, dest)?;
        }
        if let (Some(c), Some((wd, bd))) = (lay.dlogit, g.gate.as_mut()) {
            colsum(c, 1, bd)?;
            // dW_gate [1, H] = x'·dlogit: x' is H x rows; dlogit a 1 x rows row of the pack (ld k).
            let (x, ldx) = match (lay.x, lay.z0) {
                (Some(c), _) | (None, Some(c)) => (cols(c, hidden)?, k),
                (None, None) => (h_rows()?, hidden),
            };
            let gm = Gemm::new(Transpose::No, Transpose::Yes, hidden, 1, rows).with_ld(ldx, k, hidden).with_scalars(1.0, beta);
            gpu.gemm(&gm, &x, &cols(c, 1)?, wd, None)?;
        }
    }
    Ok(())
}

/// Calls `f` on every destination of `g`.
fn for_each_dest(g: &mut BranchGrads<'_>, mut f: impl FnMut(&mut DeviceViewMut<'_, f32>) -> Result<()>) -> Result<()> {
    f(&mut g.down_w)?;
    f(&mut g.down_b)?;
    f(&mut g.up_w)?;
    f(&mut g.up_b)?;
    for (a, b) in [g.ln_before.as_mut(), g.ln_after.as_mut(), g.gate.as_mut()].into_iter().flatten() {
        f(a)?;
        f(b)?;
    }
    if let Some(s) = g.scaling.as_mut() {
        f(s)?;
    }
    Ok(())
}

/// Outputs may not overlap an input, a weight or each other; two branches' gradient destinations
/// may (the same adapter in two branches), since their products run one after the other.
fn check_backward_aliasing<P: DeviceScalar, A: DeviceScalar>(
    inputs: &LocationInputs<'_, P, A>,
    d_out: &DeviceView<'_, A>,
    descriptors: &LocationDescriptors<'_>,
    outputs: &LocationBackwardOutputs<'_, '_, A>,
) -> Result<()> {
    let mut reads: Vec<(String, Range<u64>)> = vec![
        ("h".into(), view_range(&inputs.h)),
        ("r".into(), view_range(&inputs.r)),
        ("d_out".into(), view_range(d_out)),
        ("LayerNorm gamma".into(), view_range(&inputs.ln_gamma)),
        ("LayerNorm beta".into(), view_range(&inputs.ln_beta)),
        ("the descriptors".into(), descriptors.view().device_ptr()..descriptors.view().device_ptr() + (descriptors.view().len() * 8) as u64),
    ];
    reads.extend(descriptors.ranges.iter().cloned());
    reads.extend(seed_range(inputs.dropout_seed.as_ref()));
    let mut shared: Vec<(String, Range<u64>)> = Vec::new(); // written by the kernel
    if let Some((dh, dr)) = &outputs.input_grads {
        let bytes = |v: &DeviceViewMut<'_, A>| v.device_ptr()..v.device_ptr() + (v.len() * std::mem::size_of::<A>()) as u64;
        shared.push(("dh".into(), bytes(dh)));
        shared.push(("dr".into(), bytes(dr)));
    }
    let check_set = |writes: &[(String, Range<u64>)]| -> Result<()> {
        for (k, (name, range)) in writes.iter().enumerate() {
            for (other, r) in reads.iter().chain(&writes[..k]) {
                if overlaps(range, r) {
                    return Err(Error::Input(format!("{OP_BWD}: {name} overlaps {other}; an output must not alias an input or another output")));
                }
            }
        }
        Ok(())
    };
    check_set(&shared)?;
    for (i, g) in outputs.grads.iter().enumerate() {
        let Some(g) = g else { continue };
        let mut writes = shared.clone();
        let mut add = |what: &str, v: &DeviceViewMut<'_, f32>| writes.push((format!("branch {i}'s {what} gradient"), byte_range(v.device_ptr(), v.len())));
        add("down weight", &g.down_w);
        add("down bias", &g.down_b);
        add("up weight", &g.up_w);
        add("up bias", &g.up_b);
        if let Some((a, b)) = &g.ln_before {
            add("LayerNorm-before gamma", a);
            add("LayerNorm-before beta", b);
        }
        if let Some((a, b)) = &g.ln_after {
            add("LayerNorm-after gamma", a);
            add("LayerNorm-after beta", b);
        }
        if let Some(s) = &g.scaling {
            add("scaling", s);
        }
        if let Some((a, b)) = &g.gate {
            add("gate weight", a);
            add("gate bias", b);
        }
        check_set(&writes)?;
    }
    Ok(())
}

// ---- the split backward ------------------------------------------------------------------------------
//
// The launcher of the split path's backward (kernels/adapter.cu, section "split backward"): see
// `adapter_location_backward_split`.

use super::elementwise::{bias_grad, bias_grad_workspace_len, flat_launch};
use super::registry::adapter::{
    ADAPTER_LOCATION_BACKWARD_GATE_BF16IO, ADAPTER_SPLIT_ACT_BWD_F32, ADAPTER_SPLIT_ACT_F32, ADAPTER_SPLIT_BWD_INPUT_BF16IO, ADAPTER_SPLIT_BWD_INPUT_F32,
    ADAPTER_SPLIT_BWD_POST_BF16IO, ADAPTER_SPLIT_BWD_POST_F32, ADAPTER_SPLIT_BWD_PRE_BF16IO, ADAPTER_SPLIT_BWD_PRE_F32, ADAPTER_LOCATION_BACKWARD_GATE_F16IO,
    ADAPTER_SPLIT_BWD_INPUT_F16IO, ADAPTER_SPLIT_BWD_POST_F16IO, ADAPTER_SPLIT_BWD_PRE_F16IO,
};

/// The location's backward on `path`: [`adapter_location_backward`] (with a workspace from the
/// pool) or [`adapter_location_backward_split`], each with its automatic plan.
pub fn adapter_location_backward_on<P: BaseScalar, A: ActivationScalar>(
    gpu: &Gpu,
    inputs: &LocationInputs<'_, P, A>,
    d_out: &DeviceView<'_, A>,
    descriptors: &LocationDescriptors<'_>,
    outputs: &mut LocationBackwardOutputs<'_, '_, A>,
    shape: LocationShape,
    path: LocationPath,
) -> Result<()> {
    match path {
        LocationPath::Fused => {
            let trainable: Vec<bool> = outputs.grads.iter().map(Option::is_some).collect();
            // A wrong count of gradient entries is the launcher's size error to report.
            let len = if trainable.len() == descriptors.branches() { backward_workspace_len(descriptors, shape, &trainable).unwrap_or(0) } else { 0 };
            let mut workspace = LocationBackwardWorkspace::new(gpu, len)?;
            adapter_location_backward(gpu, inputs, d_out, descriptors, outputs, &mut workspace, shape)
        }
        LocationPath::Split => adapter_location_backward_split(gpu, inputs, d_out, descriptors, outputs, shape),
    }
}

/// The split backward's kernels for activations `A` and BERT LayerNorm `P`: the gate means, pre,
/// post and input kernels. f32 / f32 (`_f32`), bf16 / bf16 (`_bf16io`) and f16 / f16 (`_f16io`);
/// anything else is `Error::Unsupported`.
fn split_backward_kernels<P: BaseScalar, A: ActivationScalar>() -> Result<[KernelName; 4]> {
    match (A::DTYPE, P::DTYPE) {
        (DType::F32, DType::F32) => Ok([ADAPTER_LOCATION_BACKWARD_GATE_F32, ADAPTER_SPLIT_BWD_PRE_F32, ADAPTER_SPLIT_BWD_POST_F32, ADAPTER_SPLIT_BWD_INPUT_F32]),
        (DType::BF16, DType::BF16) => Ok([ADAPTER_LOCATION_BACKWARD_GATE_BF16IO, ADAPTER_SPLIT_BWD_PRE_BF16IO, ADAPTER_SPLIT_BWD_POST_BF16IO, ADAPTER_SPLIT_BWD_INPUT_BF16IO]),
        (DType::F16, DType::F16) => Ok([ADAPTER_LOCATION_BACKWARD_GATE_F16IO, ADAPTER_SPLIT_BWD_PRE_F16IO, ADAPTER_SPLIT_BWD_POST_F16IO, ADAPTER_SPLIT_BWD_INPUT_F16IO]),
        (a, p) => Err(Error::Unsupported(format!(
            "{OP_BWD}: activations (h, r, d_out, dh, dr) in {a:?} with the BERT LayerNorm in {p:?}: no backward kernel (f32 activations take an f32 LayerNorm, bf16 / f16 activations one of their own type)"
        ))),
    }
}

/// Where the split backward's f32 workspace holds what (element ranges of one buffer; empty when
/// the backward does not need it). Row-indexed arrays have `N·B·T` rows (row = branch·B·T +
/// local), of which only the rows of the processed branches are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitBackwardLayout {
    /// `[N·B·T, H]`: z0, then dz0 = dpre·W_d.
    pub z: Range<usize>,
    /// `[N·B·T, H]`: up, then dup.
    pub up: Range<usize>,
    /// `[N·B·T, H]` dρ and the post step's dr term (input gradients; the latter with the post
    /// step's LayerNorm).
    pub rho_grad: Range<usize>,
    pub r_grad: Range<usize>,
    /// `[N·B·T, H]` each: LN_after's and LN_before's per-row γ and β terms (trainable branches).
    pub ln_after: (Range<usize>, Range<usize>),
    pub ln_before: (Range<usize>, Range<usize>),
    /// `[N·B·T, H]` channel and `[N·B·T]` learned scaling terms.
    pub scale_channel: Range<usize>,
    pub scale_learned: Range<usize>,
    /// `[N·B·T, H]` the gate's input x and `[N·B·T]` dlogit (trainable gated branches).
    pub gate_x: Range<usize>,
    pub dlogit: Range<usize>,
    /// `[N·B·T]` the gate's row terms and `[N·B]` the gate means (gated branches).
    pub gate_q: Range<usize>,
    pub gate: Range<usize>,
    /// `[N·B·T, 2]` the pre step's statistics, when ρ = x after the original LayerNorm.
    pub stats: Range<usize>,
    /// The processed branches' `[B·T, m_i]` pre-activations, end to end in branch order (the
    /// tensor-core kernels index them so), and likewise their activations.
    pub pres: Range<usize>,
    pub acts: Range<usize>,
    /// Per branch (None when not processed): its `[B·T, m]` pre-activation and activation (within
    /// `pres` and `acts`) and da / dpre.
    pub branch: Vec<Option<[Range<usize>; 3]>>,
    /// The column sums' scratch.
    pub colsum: Range<usize>,
    pub len: usize,
}

/// The split backward's workspace for `descs` at `shape`, processing the branches of
/// `branch_mask` with parameter gradients for those of `train_mask`. Pure; `Error::Shape` when a
/// size overflows.
pub fn split_backward_layout(descs: &[BranchDescriptor], hidden: usize, shape: LocationShape, branch_mask: u32, train_mask: u32, need_input: bool) -> Result<SplitBackwardLayout> {
    let per_branch = shape.batch * shape.seq_len;
    let n = descs.len();
    let overflow = || Error::shape(OP_BWD, format!("the split workspace for B·T = {per_branch}, H = {hidden}, N = {n} overflows usize"));
    let rows = per_branch.checked_mul(n).ok_or_else(overflow)?;
    let rh = rows.checked_mul(hidden).ok_or_else(overflow)?;
    let mut at = 0usize;
    let mut take = |len: usize| -> Result<Range<usize>> {
        if len == 0 {
            return Ok(0..0);
        }
        let start = at.checked_next_multiple_of(WORKSPACE_ALIGN).ok_or_else(overflow)?;
        at = start.checked_add(len).ok_or_else(overflow)?;
        Ok(start..at)
    };
    let in_mask = |i: usize| (branch_mask >> i) & 1 == 1;
    let trains = |i: usize| (train_mask >> i) & 1 == 1;
    let any_train = |f: &dyn Fn(&BranchDescriptor) -> bool| descs.iter().enumerate().any(|(i, d)| trains(i) && f(d));
    let post = descs.first().is_some_and(|d| d.original_ln_after != 0);
    let steps_stats = descs.first().is_some_and(|d| d.original_ln_before != 0 && d.residual_before_ln == residual_code(ResidualBeforeLn::False));
    let gated = descs.iter().enumerate().any(|(i, d)| in_mask(i) && d.gate_w != 0);
    let z = take(rh)?;
    let up = take(rh)?;
    let rho_grad = take(if need_input { rh } else { 0 })?;
    let r_grad = take(if need_input && post { rh } else { 0 })?;
    let la = if any_train(&|d| d.ln_after_gamma != 0) { rh } else { 0 };
    let ln_after = (take(la)?, take(la)?);
    let lb = if any_train(&|d| d.ln_before_gamma != 0) { rh } else { 0 };
    let ln_before = (take(lb)?, take(lb)?);
    let scale_channel = take(if any_train(&|d| d.scaling_kind == SCALING_CHANNEL) { rh } else { 0 })?;
    let scale_learned = take(if any_train(&|d| d.scaling_kind == SCALING_LEARNED) { rows } else { 0 })?;
    let train_gated = any_train(&|d| d.gate_w != 0);
    let gate_x = take(if train_gated { rh } else { 0 })?;
    let dlogit = take(if train_gated { rows } else { 0 })?;
    let gate_q = take(if gated { rows } else { 0 })?;
    let gate = take(if gated { n * shape.batch } else { 0 })?;
    let stats = take(if steps_stats { 2 * rows } else { 0 })?;
    let lens = descs.iter().enumerate().map(|(i, d)| if in_mask(i) { per_branch.checked_mul(d.bottleneck as usize) } else { Some(0) }).collect::<Option<Vec<usize>>>().ok_or_else(overflow)?;
    let total = lens.iter().try_fold(0usize, |t, &l| t.checked_add(l)).ok_or_else(overflow)?;
    let (pres, acts) = (take(total)?, take(total)?);
    let mut branch = Vec::with_capacity(n);
    let mut widest = hidden;
    let mut offset = 0;
    for (i, d) in descs.iter().enumerate() {
        if !in_mask(i) {
            branch.push(None);
            continue;
        }
        widest = widest.max(d.bottleneck as usize);
        let len = lens[i];
        branch.push(Some([pres.start + offset..pres.start + offset + len, acts.start + offset..acts.start + offset + len, take(len)?]));
        offset += len;
    }
    let colsum = take(if train_mask != 0 { bias_grad_workspace_len(per_branch, widest) } else { 0 })?;
    Ok(SplitBackwardLayout { z, up, rho_grad, r_grad, ln_after, ln_before, scale_channel, scale_learned, gate_x, dlogit, gate_q, gate, stats, pres, acts, branch, colsum, len: at })
}

/// The automatic plan of the split backward's row kernels: the forward's rule
/// ([`LocationPlan::auto`]) with the input kernel's 4H floats of shared memory per team.
pub fn split_backward_plan_auto(hidden: usize) -> LocationPlan {
    LocationPlan::auto(hidden, 3 * hidden)
}

/// Whether the split path's row kernels copy the global rows they read into shared memory before
/// their passes over the row (kernels/adapter.cu, "row staging"): one trip to memory a row, with
/// 16-byte loads, instead of one a column. Staging needs more shared memory per team; the result
/// is the same either way, bit for bit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RowStaging {
    /// Stage when the plan's teams fit the device's shared memory staged, else not.
    #[default]
    Auto,
    /// Always stage (an error when the plan's teams do not fit).
    On,
    /// Never: every pass reads global memory (the row kernels before staging).
    Off,
}

/// Shared memory per team of the split backward's row kernels, in bytes, as `[pre, post, input]`:
/// pre as the split forward's ([`split_forward_team_bytes`]); post two f32 rows (u_d, y / dy)
/// and, staged, the rows of up (f32) and of h, r, d_out (`act_bytes` an element); input four f32
/// rows (x, dx, dh, dr) and, staged, h and r; each region rounded up to 16 bytes (the kernels'
/// stage_region_bytes).
pub fn split_backward_team_bytes(hidden: usize, act_bytes: usize, staged: bool) -> [usize; 3] {
    let (f32_row, act_row) = (stage_region_bytes(hidden, 4), stage_region_bytes(hidden, act_bytes));
    let post = if staged { 3 * f32_row + 3 * act_row } else { 2 * f32_row };
    [split_forward_team_bytes(hidden, act_bytes, staged), post, split_backward_input_team_bytes(hidden, act_bytes, staged, true)]
}

/// The input kernel's shared memory per team: x and dx (f32 rows), and dh and dr accumulators
/// only when a team sums several branches (`sums_branches`: replication with input gradients;
/// a team of one branch forms dh and dr at the store); staged, h and r. Each region rounded up
/// to 16 bytes.
pub fn split_backward_input_team_bytes(hidden: usize, act_bytes: usize, staged: bool, sums_branches: bool) -> usize {
    let (f32_row, act_row) = (stage_region_bytes(hidden, 4), stage_region_bytes(hidden, act_bytes));
    let rows = if sums_branches { 4 } else { 2 };
    rows * f32_row + if staged { 2 * act_row } else { 0 }
}

/// Checks a plan against the split backward's row kernels (the forward's thread rules; each
/// kernel's shared memory, [`split_backward_team_bytes`] per team, within `max_shared`) and
/// resolves `staging`: whether the row kernels stage their rows.
pub fn validate_split_backward_plan(plan: LocationPlan, hidden: usize, act_bytes: usize, staging: RowStaging, max_shared: usize) -> Result<bool> {
    plan.validate(hidden, 3 * hidden, max_shared).map_err(|e| match e {
        Error::Shape { msg, .. } => Error::shape(OP_BWD, msg),
        other => other,
    })?;
    let staged_block = split_backward_team_bytes(hidden, act_bytes, true).iter().max().copied().unwrap_or(0) * plan.rows_per_block as usize;
    resolve_staging(OP_BWD, staging, staged_block, max_shared, plan, hidden)
}

/// The gradient of the location on the split path ([`LocationPath::Split`]) with the automatic
/// plan: the same contract, outputs and refusals as [`adapter_location_backward`] (which it
/// matches within the fused kernel's tolerances, with the same dropout masks), and 16-bit
/// activations too: with `A = P = bf16` (the `_bf16io` kernels) or `A = P = f16` (`_f16io`) h,
/// r, d_out, dh and dr are bf16 / f16
/// (dh, dr rounded once on store) while every weight, weight gradient and the workspace stay f32.
/// The bottleneck products run on [`Gpu::gemm`] (f32, cuBLASLt on a GPU), except the
/// recompute's two forward products under [`SplitForward::TensorCores`] (the forward's tensor-core
/// arithmetic, where the forward took it); the workspace ([`split_backward_layout`]) comes from
/// the pool.
pub fn adapter_location_backward_split<P: BaseScalar, A: ActivationScalar>(
    gpu: &Gpu,
    inputs: &LocationInputs<'_, P, A>,
    d_out: &DeviceView<'_, A>,
    descriptors: &LocationDescriptors<'_>,
    outputs: &mut LocationBackwardOutputs<'_, '_, A>,
    shape: LocationShape,
) -> Result<()> {
    adapter_location_backward_split_with_plan(gpu, inputs, d_out, descriptors, outputs, shape, split_backward_plan_auto(shape.hidden), RowStaging::Auto)
}

/// As [`adapter_location_backward_split`], with an explicit plan for its row kernels and row
/// staging choice (validated).
#[allow(clippy::too_many_arguments)] // the backward's operands plus the plan
pub fn adapter_location_backward_split_with_plan<P: BaseScalar, A: ActivationScalar>(
    gpu: &Gpu,
    inputs: &LocationInputs<'_, P, A>,
    d_out: &DeviceView<'_, A>,
    descriptors: &LocationDescriptors<'_>,
    outputs: &mut LocationBackwardOutputs<'_, '_, A>,
    shape: LocationShape,
    plan: LocationPlan,
    staging: RowStaging,
) -> Result<()> {
    let [gate_kernel, pre_kernel, post_kernel, input_kernel] = split_backward_kernels::<P, A>()?;
    let descs = descriptors.descriptors();
    LocationBackwardSizes::of(inputs, d_out, descriptors, outputs, shape, 0, 0).check(inputs.ln_eps)?;
    for (i, g) in outputs.grads.iter().enumerate() {
        if let Some(g) = g {
            check_branch_grads(i, &descs[i], shape.hidden, &BranchGradLens::of(g))?;
        }
    }
    let max_shared = gpu.limits().max_shared_bytes_opt_in.saturating_sub(256);
    let staged = validate_split_backward_plan(plan, shape.hidden, std::mem::size_of::<A>(), staging, max_shared)?;
    let [seed_buf, seed_lo, seed_hi] = seed_args(OP_BWD, descriptors, inputs.dropout_seed.as_ref())?;
    check_backward_aliasing(inputs, d_out, descriptors, outputs)?;

    let LocationShape { batch, seq_len, hidden, branches, replicate } = shape;
    let per_branch = batch * seq_len;
    let need_input = outputs.input_grads.is_some();
    if per_branch == 0 {
        return zero_empty_grads(gpu, outputs);
    }
    let (train_mask, branch_mask) = backward_masks(outputs, branches);
    if branch_mask == 0 {
        return Ok(()); // nothing is asked for
    }
    let mask_of = |f: &dyn Fn(&BranchDescriptor) -> bool| descs.iter().enumerate().filter(|(_, d)| f(d)).fold(0u32, |m, (i, _)| m | (1 << i));
    let gated_mask = mask_of(&|d| d.gate_w != 0) & branch_mask;
    // The input kernel: every branch with input gradients, else the trainable ones whose
    // parameters need it (LN_before's γ, β; the gate's dlogit).
    let input_mask = if need_input { branch_mask } else { train_mask & mask_of(&|d| d.ln_before_gamma != 0 || d.gate_w != 0) };
    let layout = split_backward_layout(descs, hidden, shape, branch_mask, train_mask, need_input)?;
    let work = gpu.alloc::<f32>(layout.len.max(1))?;
    let base = work.view().device_ptr();
    // Windows of the workspace, which lives to the end of this function; each region is written
    // by one launch or product at a time (the layout keeps them apart).
    let window = |r: &Range<usize>| -> Result<DeviceView<'_, f32>> {
        if r.end > layout.len.max(1) {
            return Err(Error::Internal(format!("{OP_BWD}: window {r:?} of a split workspace of {} elements", layout.len)));
        }
        // SAFETY: inside `work` (checked), which outlives every window (borrowed by the closure).
        Ok(unsafe { DeviceView::<f32>::from_raw(base + (r.start * std::mem::size_of::<f32>()) as u64, r.len()) })
    };
    let arg = |r: &Range<usize>| -> Result<KernelArg> { if r.is_empty() { Ok(KernelArg::Null) } else { Ok(window(r)?.arg()) } };
    // Rows [i·B·T, (i+1)·B·T) of a row-indexed [N·B·T, width] region.
    let rows_of = |r: &Range<usize>, i: usize, width: usize| -> Result<DeviceView<'_, f32>> { window(&(r.start + i * per_branch * width..r.start + (i + 1) * per_branch * width)) };
    let (b, t, hd, rep) = (KernelArg::I32(batch as i32), KernelArg::I32(seq_len as i32), KernelArg::I32(hidden as i32), KernelArg::I32(replicate as i32));
    let (ln_gamma, ln_beta) = (P::base_arg(&inputs.ln_gamma), P::base_arg(&inputs.ln_beta));
    let eps = KernelArg::F32(inputs.ln_eps);
    let teams = |mask: u32| mask.count_ones() as usize * per_branch;
    let row_cfg = |teams: usize, bytes_per_team: usize| LaunchConfig {
        grid_dim: (teams.div_ceil(plan.rows_per_block as usize) as u32, 1, 1),
        block_dim: (plan.threads_per_row, plan.rows_per_block, 1),
        shared_mem_bytes: (plan.rows_per_block as usize * bytes_per_team) as u32,
    };
    let [pre_bytes, post_bytes, _] = split_backward_team_bytes(hidden, std::mem::size_of::<A>(), staged);
    let input_bytes = split_backward_input_team_bytes(hidden, std::mem::size_of::<A>(), staged, replicate && need_input);
    let stage_arg = KernelArg::I32(staged as i32);
    for (kernel, team_bytes) in [(pre_kernel, pre_bytes), (post_kernel, post_bytes), (input_kernel, input_bytes)] {
        let bytes = plan.rows_per_block as usize * team_bytes;
        if bytes > gpu.dynamic_shared_limit(kernel) {
            gpu.allow_dynamic_shared(kernel, bytes)?;
        }
    }

    if gated_mask != 0 {
        // The gate means of the gated branches' examples (the forward's gate, masked).
        let args = [arg(&layout.gate)?, A::act_arg(&inputs.h), A::act_arg(&inputs.r), ln_gamma, ln_beta, descriptors.view().arg(), b, t, hd, rep, eps, KernelArg::U32(gated_mask)];
        let cfg = LaunchConfig { grid_dim: ((branches * batch) as u32, 1, 1), block_dim: (32, seq_len.min(GATE_ROWS_PER_BLOCK) as u32, 1), shared_mem_bytes: 0 };
        // SAFETY: the sizes were checked: the gate region holds N·B floats, h and r the rows the
        // kernel reads for this shape and replicate flag, γ/β H; the descriptors were validated.
        unsafe { gpu.launch(gate_kernel, cfg, &args)? };
    }

    // The recompute on the tensor cores where the forward ran there (the same rule), so that
    // pre, a and up are the forward's bit for bit: two launches for every processed branch.
    let tensor_cores = split_bwd_tensor_core_kernels::<P, A>().zip(split_tensor_core_bytes(descriptors, std::mem::size_of::<A>(), max_shared));
    if let Some(((pre_down, up), (pre_bytes, _))) = tensor_cores {
        let up_bytes = split_bwd_up_smem_bytes(descs.iter().map(|d| d.bottleneck as usize));
        for (kernel, bytes) in [(pre_down, pre_bytes), (up, up_bytes)] {
            if bytes > gpu.dynamic_shared_limit(kernel) {
                gpu.allow_dynamic_shared(kernel, bytes)?;
            }
        }
        let grid = (per_branch.div_ceil(TENSOR_CORE_ROWS) as u32, branch_mask.count_ones(), 1);
        let block = (32, TENSOR_CORE_WARPS as u32, 1);
        let mask = KernelArg::U32(branch_mask);
        // Parameter order: acts, pres, z0, stats, h, r, ln_gamma, ln_beta, descs, batch,
        // seq_len, hidden, replicate, ln_eps, branch_mask.
        let args = [arg(&layout.acts)?, arg(&layout.pres)?, arg(&layout.z)?, arg(&layout.stats)?, A::act_arg(&inputs.h), A::act_arg(&inputs.r), ln_gamma, ln_beta, descriptors.view().arg(), b, t, hd, rep, eps, mask];
        // SAFETY: acts and pres hold the processed branches' [B·T, m_i] end to end in branch
        // order, as the kernel indexes them (split_backward_layout), z0 N·B·T·H and the statistics
        // (when passed) 2·N·B·T, all workspace; h, r, γ, β were checked; grid.y is the mask's
        // branch count and the shared memory the forward's pre + down block for these bottlenecks.
        unsafe { gpu.launch(pre_down, LaunchConfig { grid_dim: grid, block_dim: block, shared_mem_bytes: pre_bytes as u32 }, &args)? };
        // Parameter order: up, acts, descs, batch, seq_len, hidden, branch_mask.
        let args = [arg(&layout.up)?, arg(&layout.acts)?, descriptors.view().arg(), b, t, hd, mask];
        // SAFETY: up holds N·B·T·H elements (the processed branches' rows written), acts as just
        // written; the shared memory is the a tile of the largest bottleneck.
        unsafe { gpu.launch(up, LaunchConfig { grid_dim: grid, block_dim: block, shared_mem_bytes: up_bytes as u32 }, &args)? };
    }

    // Pre: z0 (and the statistics) of the processed rows.
    if tensor_cores.is_none() {
        // Parameter order: z0, stats, h, r, ln_gamma, ln_beta, descs, batch, seq_len, hidden,
        // replicate, ln_eps, branch_mask, stage.
        let args = [arg(&layout.z)?, arg(&layout.stats)?, A::act_arg(&inputs.h), A::act_arg(&inputs.r), ln_gamma, ln_beta, descriptors.view().arg(), b, t, hd, rep, eps, KernelArg::U32(branch_mask), stage_arg];
        // SAFETY: z has N·B·T·H elements and the statistics (when passed) 2·N·B·T, both workspace;
        // h, r, γ, β were checked; the plan was validated against the kernel's shared memory for
        // `stage` (split_backward_team_bytes).
        unsafe { gpu.launch(pre_kernel, row_cfg(teams(branch_mask), pre_bytes), &args)? };
    }

    // The weights of branch i as views: [m, H], [m], [H, m], [H].
    let weights = |d: &BranchDescriptor| {
        let m = d.bottleneck as usize;
        // SAFETY: the descriptors were validated against H and m when they were built and their
        // weights stay borrowed (or, detached, alive by the owner's promise); nothing writes
        // them during this call (the aliasing check keeps the gradients apart).
        unsafe { (DeviceView::<f32>::from_raw(d.down_w, m * hidden), DeviceView::<f32>::from_raw(d.down_b, m), DeviceView::<f32>::from_raw(d.up_w, hidden * m), DeviceView::<f32>::from_raw(d.up_b, hidden)) }
    };

    // Forward products: pre = z0·W_dᵀ + b_d, a = act(pre), up = a·W_uᵀ + b_u (the GEMM path).
    for (i, d) in descs.iter().enumerate().filter(|_| tensor_cores.is_none()) {
        let Some([pre_r, act_r, _]) = &layout.branch[i] else { continue };
        let m = d.bottleneck as usize;
        let (wd, bd, wu, bu) = weights(d);
        let z = rows_of(&layout.z, i, hidden)?;
        let (pre, act) = (window(pre_r)?, window(act_r)?);
        // SAFETY (assume_writable, here and below): each window is the branch's own region of the
        // workspace, written by this one product or launch while nothing reads it.
        let gm = Gemm::new(Transpose::Yes, Transpose::No, m, per_branch, hidden).with_ld(hidden, hidden, m).with_epilogue(Epilogue::Bias).with_tf32(descriptors.tf32_products());
        gpu.gemm(&gm, &wd, &z, &mut unsafe { pre.assume_writable() }, Some(&bd))?;
        let len = per_branch * m;
        let args = [act.arg(), pre.arg(), KernelArg::I64(len as i64), KernelArg::I32(d.activation)];
        // SAFETY: a and pre hold B·T·m elements each, in disjoint regions.
        unsafe { gpu.launch(ADAPTER_SPLIT_ACT_F32, flat_launch(len), &args)? };
        let gm = Gemm::new(Transpose::Yes, Transpose::No, hidden, per_branch, m).with_ld(m, m, hidden).with_epilogue(Epilogue::Bias).with_tf32(descriptors.tf32_products());
        gpu.gemm(&gm, &wu, &act, &mut unsafe { rows_of(&layout.up, i, hidden)?.assume_writable() }, Some(&bu))?;
    }

    // Post: dup over up, dρ, the dr term, the gate's row terms and the per-row parameter terms.
    {
        // Parameter order: up_dup, rho_grad, r_grad, la_gamma, la_beta, scale_ch, scale_l,
        // gate_q, stats, gate, d_out, h, r, ln_gamma, ln_beta, descs, batch, seq_len, hidden,
        // replicate, ln_eps, branch_mask, train_mask, seed_buf, seed_lo, seed_hi, stage.
        let args = [
            arg(&layout.up)?,
            arg(&layout.rho_grad)?,
            arg(&layout.r_grad)?,
            arg(&layout.ln_after.0)?,
            arg(&layout.ln_after.1)?,
            arg(&layout.scale_channel)?,
            arg(&layout.scale_learned)?,
            arg(&layout.gate_q)?,
            arg(&layout.stats)?,
            arg(&layout.gate)?,
            A::act_arg(d_out),
            A::act_arg(&inputs.h),
            A::act_arg(&inputs.r),
            ln_gamma,
            ln_beta,
            descriptors.view().arg(),
            b,
            t,
            hd,
            rep,
            eps,
            KernelArg::U32(branch_mask),
            KernelArg::U32(train_mask),
            seed_buf,
            seed_lo,
            seed_hi,
            stage_arg,
        ];
        // SAFETY: every region was sized by split_backward_layout for these masks (a null one is
        // never touched: the kernel writes a term only for the branches that need it), d_out has
        // N·B·T·H elements, the seed buffer (if any) 2 words; the shared memory of a team as the
        // kernel lays it out for `stage` (split_backward_team_bytes).
        unsafe { gpu.launch(post_kernel, row_cfg(teams(branch_mask), post_bytes), &args)? };
    }

    // Backward products per branch: dW_up, db_up, dpre, dW_down, db_down, dz0 (over z0).
    let colsum = window(&layout.colsum)?;
    let column_sums = |x: &DeviceView<'_, f32>, cols: usize, dest: &mut DeviceViewMut<'_, f32>, accumulate: bool| -> Result<()> {
        // SAFETY: the scratch region of the workspace, used by one column sum at a time.
        bias_grad(gpu, x, cols, dest, accumulate, &mut unsafe { colsum.assume_writable() })
    };
    for (i, d) in descs.iter().enumerate() {
        let Some([pre_r, act_r, da_r]) = &layout.branch[i] else { continue };
        let m = d.bottleneck as usize;
        let (wd, _, wu, _) = weights(d);
        let (pre, act, da) = (window(pre_r)?, window(act_r)?, window(da_r)?);
        let dup = rows_of(&layout.up, i, hidden)?;
        let z = rows_of(&layout.z, i, hidden)?;
        let mut grads = outputs.grads[i].as_mut();
        if let Some(g) = grads.as_deref_mut() {
            let beta = if g.accumulate { 1.0 } else { 0.0 };
            // dW_up [H, m] row-major = column-major m x H: a' (m x B·T) · dup'ᵀ (B·T x H).
            let gm = Gemm::new(Transpose::No, Transpose::Yes, m, hidden, per_branch).with_ld(m, hidden, m).with_scalars(1.0, beta).with_tf32(descriptors.tf32_products());
            gpu.gemm(&gm, &act, &dup, &mut g.up_w, None)?;
            column_sums(&dup, hidden, &mut g.up_b, g.accumulate)?;
        }
        // da = dup·W_u: column-major m x B·T = W_u' (m x H, ld m) · dup' (H x B·T).
        let gm = Gemm::new(Transpose::No, Transpose::No, m, per_branch, hidden).with_ld(m, hidden, m).with_tf32(descriptors.tf32_products());
        gpu.gemm(&gm, &wu, &dup, &mut unsafe { da.assume_writable() }, None)?;
        let len = per_branch * m;
        let args = [da.arg(), pre.arg(), KernelArg::I64(len as i64), KernelArg::I32(d.activation)];
        // SAFETY: da and pre hold B·T·m elements each, in disjoint regions; da in place.
        unsafe { gpu.launch(ADAPTER_SPLIT_ACT_BWD_F32, flat_launch(len), &args)? };
        if let Some(g) = grads.as_deref_mut() {
            let beta = if g.accumulate { 1.0 } else { 0.0 };
            // dW_down [m, H] row-major = column-major H x m: z0' (H x B·T) · dpre'ᵀ (B·T x m).
            let gm = Gemm::new(Transpose::No, Transpose::Yes, hidden, m, per_branch).with_ld(hidden, m, hidden).with_scalars(1.0, beta).with_tf32(descriptors.tf32_products());
            gpu.gemm(&gm, &z, &da, &mut g.down_w, None)?;
            column_sums(&da, m, &mut g.down_b, g.accumulate)?;
        }
        if need_input || (grads.is_some() && d.ln_before_gamma != 0) {
            // dz0 = dpre·W_d over z0 (read for the last time above): column-major H x B·T =
            // W_d' (H x m, ld H) · dpre' (m x B·T).
            let gm = Gemm::new(Transpose::No, Transpose::No, hidden, per_branch, m).with_ld(hidden, m, hidden).with_tf32(descriptors.tf32_products());
            gpu.gemm(&gm, &wd, &da, &mut unsafe { z.assume_writable() }, None)?;
        }
    }

    // Input: LN_before, the gate's dlogit, dx, the pre step; dh and dr.
    if input_mask != 0 {
        let (dh_arg, dr_arg) = outputs.input_grads.as_ref().map_or((KernelArg::Null, KernelArg::Null), |(dh, dr)| (A::act_arg_mut(dh), A::act_arg_mut(dr)));
        let dz_needed = need_input || descs.iter().enumerate().any(|(i, d)| (train_mask >> i) & 1 == 1 && d.ln_before_gamma != 0);
        // Parameter order: dh, dr, lb_gamma, lb_beta, gate_x, dlogit, dz0, rho_grad, r_grad,
        // gate_q, h, r, ln_gamma, ln_beta, descs, batch, seq_len, hidden, branches, replicate,
        // ln_eps, branch_mask, train_mask, need_input, stage.
        let args = [
            dh_arg,
            dr_arg,
            arg(&layout.ln_before.0)?,
            arg(&layout.ln_before.1)?,
            arg(&layout.gate_x)?,
            arg(&layout.dlogit)?,
            if dz_needed { arg(&layout.z)? } else { KernelArg::Null },
            arg(&layout.rho_grad)?,
            arg(&layout.r_grad)?,
            arg(&layout.gate_q)?,
            A::act_arg(&inputs.h),
            A::act_arg(&inputs.r),
            ln_gamma,
            ln_beta,
            descriptors.view().arg(),
            b,
            t,
            hd,
            KernelArg::I32(branches as i32),
            rep,
            eps,
            KernelArg::U32(input_mask),
            KernelArg::U32(train_mask),
            KernelArg::I32(need_input as i32),
            stage_arg,
        ];
        let n_teams = if replicate && need_input { per_branch } else { teams(input_mask) };
        // SAFETY: dh and dr (when given) hold the input rows (checked), every region was sized
        // by split_backward_layout for these masks, dz0 holds the products of every branch the
        // kernel reads it for; its shared memory for `stage` (the validated plan).
        unsafe { gpu.launch(input_kernel, row_cfg(n_teams, input_bytes), &args)? };
    }

    // The per-row terms' column sums, and dW_gate = xᵀ·dlogit.
    for (i, d) in descs.iter().enumerate() {
        let Some(g) = outputs.grads[i].as_mut() else { continue };
        let acc = g.accumulate;
        if let Some((gd, bd)) = g.ln_after.as_mut() {
            column_sums(&rows_of(&layout.ln_after.0, i, hidden)?, hidden, gd, acc)?;
            column_sums(&rows_of(&layout.ln_after.1, i, hidden)?, hidden, bd, acc)?;
        }
        if let Some((gd, bd)) = g.ln_before.as_mut() {
            column_sums(&rows_of(&layout.ln_before.0, i, hidden)?, hidden, gd, acc)?;
            column_sums(&rows_of(&layout.ln_before.1, i, hidden)?, hidden, bd, acc)?;
        }
        if let Some(s) = g.scaling.as_mut() {
            if d.scaling_kind == SCALING_LEARNED {
                column_sums(&rows_of(&layout.scale_learned, i, 1)?, 1, s, acc)?;
            } else {
                column_sums(&rows_of(&layout.scale_channel, i, hidden)?, hidden, s, acc)?;
            }
        }
        if let Some((wd, bd)) = g.gate.as_mut() {
            let dl = rows_of(&layout.dlogit, i, 1)?;
            column_sums(&dl, 1, bd, acc)?;
            // dW_gate [1, H] = x' (H x B·T) · dlogit (B·T x 1).
            let gm = Gemm::new(Transpose::No, Transpose::No, hidden, 1, per_branch).with_ld(hidden, per_branch, hidden).with_scalars(1.0, if acc { 1.0 } else { 0.0 });
            gpu.gemm(&gm, &rows_of(&layout.gate_x, i, hidden)?, &dl, wd, None)?;
        }
    }
    drop(work); // back to the pool only after the last launch that reads it was enqueued
    Ok(())
}

#[cfg(test)]
mod backward_tests {
    use super::*;

    fn desc(m: i32) -> BranchDescriptor {
        BranchDescriptor {
            down_w: 64,
            down_b: 64,
            up_w: 64,
            up_b: 64,
            ln_before_gamma: 0,
            ln_before_beta: 0,
            ln_after_gamma: 0,
            ln_after_beta: 0,
            scaling: 0,
            gate_w: 0,
            gate_b: 0,
            bottleneck: m,
            activation: 0,
            scaling_kind: SCALING_FIXED,
            scaling_value: 1.0,
            ln_before_eps: 0.0,
            ln_after_eps: 0.0,
            residual_before_ln: 0,
            original_ln_before: 0,
            original_ln_after: 1,
            adapter_residual_before_ln: 0,
            dropout_stream: 0,
            dropout_threshold: 0,
            dropout_scale: 1.0,
            dropout_offset: 0,
        }
    }

    fn full(m: i32) -> BranchDescriptor {
        BranchDescriptor { ln_before_gamma: 64, ln_before_beta: 64, ln_after_gamma: 64, ln_after_beta: 64, scaling: 64, scaling_kind: SCALING_CHANNEL, gate_w: 64, gate_b: 64, ..desc(m) }
    }

    fn shape(batch: usize, seq_len: usize, hidden: usize, branches: usize, replicate: bool) -> LocationShape {
        LocationShape { batch, seq_len, hidden, branches, replicate }
    }

    #[test]
    fn pack_layouts_follow_the_kernel() {
        // Houlsby, replicated: z0 is h, read in place.
        let p = PackLayout::of(&desc(3), 40, true);
        assert_eq!((p.dup, p.z0, p.act, p.dpre, p.width), (0, None, 40, 43, 48));
        // Not replicated (or the original LayerNorm first): z0 is packed after dup.
        assert_eq!(PackLayout::of(&desc(3), 40, false).z0, Some(40));
        assert_eq!(PackLayout::of(&BranchDescriptor { original_ln_before: 1, ..desc(3) }, 40, true).z0, Some(40));
        // Everything: dup, z0, LN after (2), LN before (2), channel scaling, x, act, dpre, dlogit.
        let p = PackLayout::of(&full(5), 16, true);
        assert_eq!(p.z0, Some(16));
        assert_eq!((p.ln_after, p.ln_before, p.scaling, p.x), (Some((32, 48)), Some((64, 80)), Some(96), Some(112)));
        assert_eq!((p.act, p.dpre, p.dlogit, p.width), (128, 133, Some(138), 140));
        // Learned scaling is one column after dpre; the gate's x is z0 without LN before.
        let p = PackLayout::of(&BranchDescriptor { scaling_kind: SCALING_LEARNED, ln_before_gamma: 0, ln_before_beta: 0, ..full(2) }, 8, false);
        // dup [0, 8), z0 [8, 16) (not replicated), LN after [16, 32), then the m-sized columns.
        assert_eq!((p.x, p.act, p.dpre, p.scaling, p.dlogit, p.width), (None, 32, 34, Some(36), Some(37), 40));
        // The kernel's struct has these fields in this order.
        let src = crate::cuda::registry::adapter::SOURCE.code;
        assert!(src.contains("p.width = (k + 3) & ~3;"));
        assert!(src.contains("if (ln_before || d.original_ln_before != 0 || !replicate) {"));
    }

    #[test]
    fn workspace_layouts_hold_what_the_launch_needs() {
        let descs = [desc(3), full(5), desc(48)];
        let s = shape(2, 7, 40, 3, true);
        let l = backward_workspace_layout(&descs, 40, s, &[true, false, true]).unwrap();
        assert_eq!(l.ones, 0..14);
        assert_eq!(l.gate, 64..70); // N·B, aligned to 64 floats
        assert_eq!(l.gate_q, 128..170); // N·B·T
        assert_eq!(l.packs, 192);
        let w0 = PackLayout::of(&descs[0], 40, true).width;
        assert_eq!(l.branch_packs[0], Some((192, PackLayout::of(&descs[0], 40, true))));
        assert_eq!(l.branch_packs[1], None);
        assert_eq!(l.branch_packs[2].unwrap().0, 192 + 14 * w0);
        assert_eq!(l.len, 192 + 14 * (w0 + PackLayout::of(&descs[2], 40, true).width));
        // Nothing trains, no gate: nothing at all.
        let l = backward_workspace_layout(&[desc(3)], 40, s, &[false]).unwrap();
        assert_eq!((l.ones.len(), l.gate.len(), l.gate_q.len(), l.len), (0, 0, 0, 0));
        // A subset of the trainable branches never needs more than all of them.
        let all = backward_workspace_layout(&descs, 40, s, &[true; 3]).unwrap().len;
        for mask in 0..8u32 {
            let t: Vec<bool> = (0..3).map(|i| mask >> i & 1 == 1).collect();
            assert!(backward_workspace_layout(&descs, 40, s, &t).unwrap().len <= all);
        }
        let err = backward_workspace_layout(&descs, 40, s, &[true]).unwrap_err().to_string();
        assert!(err.contains("1 trainable flags for 3 branches"), "{err}");
        assert!(backward_workspace_layout(&descs, 40, shape(1 << 20, 1 << 12, 40, 3, true), &[true; 3]).is_err());
    }

    #[test]
    fn branch_gradient_destinations_are_checked() {
        let (h, m) = (16, 4);
        let ok = BranchGradLens { down_w: m * h, down_b: m, up_w: h * m, up_b: h, ln_before: Some((h, h)), ln_after: Some((h, h)), scaling: Some(h), gate: Some((h, 1)) };
        check_branch_grads(0, &full(m as i32), h, &ok).unwrap();
        let plain = BranchGradLens { ln_before: None, ln_after: None, scaling: None, gate: None, ..ok };
        check_branch_grads(0, &desc(m as i32), h, &plain).unwrap();
        let learned = BranchDescriptor { scaling_kind: SCALING_LEARNED, ..desc(m as i32) };
        check_branch_grads(0, &learned, h, &BranchGradLens { scaling: Some(1), ..plain }).unwrap();
        let cases: [(BranchDescriptor, BranchGradLens, &str); 9] = [
            (full(4), BranchGradLens { down_w: 63, ..ok }, "branch 2: the down weight gradient has 63 elements, expected 64 (bottleneck·H) for H = 16, bottleneck = 4"),
            (full(4), BranchGradLens { down_b: 5, ..ok }, "down bias gradient has 5 elements, expected 4"),
            (full(4), BranchGradLens { up_w: 1, ..ok }, "up weight gradient has 1"),
            (full(4), BranchGradLens { up_b: 15, ..ok }, "up bias gradient has 15 elements, expected 16 (H)"),
            (full(4), BranchGradLens { ln_before: None, ..ok }, "the adapter has a LayerNorm before, but none is given a gradient destination"),
            (desc(4), BranchGradLens { ln_after: Some((h, h)), ..plain }, "the adapter has none a LayerNorm after, but one is given"),
            (full(4), BranchGradLens { ln_after: Some((h, h - 1)), ..ok }, "LayerNorm-after beta gradient has 15"),
            (learned, BranchGradLens { scaling: Some(h), ..plain }, "scaling gradient has 16 elements, expected 1 (learned: one scalar)"),
            (full(4), BranchGradLens { gate: Some((h, 2)), ..ok }, "gate bias gradient has 2 elements, expected 1 ([1])"),
        ];
        for (d, g, want) in cases {
            let err = check_branch_grads(2, &d, h, &g).unwrap_err();
            assert!(matches!(err, Error::Shape { .. }) && err.to_string().contains(want), "{err} should contain {want:?}");
        }
    }

    fn sizes(s: LocationShape) -> LocationBackwardSizes {
        let n_out = s.branches * s.batch * s.seq_len * s.hidden;
        let n_in = if s.replicate { n_out / s.branches } else { n_out };
        LocationBackwardSizes {
            shape: s,
            h: n_in,
            r: n_in,
            ln_gamma: s.hidden,
            ln_beta: s.hidden,
            d_out: n_out,
            input_grads: Some((n_in, n_in)),
            grads: s.branches,
            descriptor_branches: s.branches,
            descriptor_hidden: s.hidden,
            workspace: 10,
            workspace_needed: 10,
        }
    }

    #[test]
    fn backward_sizes_name_the_operand() {
        let ok = sizes(shape(2, 7, 40, 3, true));
        ok.check(1e-12).unwrap();
        sizes(shape(2, 7, 40, 3, false)).check(1e-12).unwrap();
        sizes(shape(0, 7, 40, 1, false)).check(1e-12).unwrap();
        LocationBackwardSizes { input_grads: None, ..ok }.check(1e-12).unwrap();
        let cases: [(LocationBackwardSizes, &str); 12] = [
            (LocationBackwardSizes { h: 561, ..ok }, "h has 561 elements, expected 560 (B·T·H)"),
            (LocationBackwardSizes { r: 1680, ..ok }, "r has 1680"),
            (LocationBackwardSizes { ln_gamma: 39, ..ok }, "LayerNorm gamma has 39"),
            (LocationBackwardSizes { ln_beta: 41, ..ok }, "LayerNorm beta has 41"),
            (LocationBackwardSizes { d_out: 560, ..ok }, "d_out has 560 elements, expected 1680 (N·B·T·H)"),
            (LocationBackwardSizes { input_grads: Some((559, 560)), ..ok }, "dh has 559"),
            (LocationBackwardSizes { input_grads: Some((560, 1680)), ..ok }, "dr has 1680"),
            (LocationBackwardSizes { grads: 2, ..ok }, "2 gradient entries for 3 branches"),
            (LocationBackwardSizes { descriptor_hidden: 48, ..ok }, "built for H = 48"),
            (LocationBackwardSizes { descriptor_branches: 2, ..ok }, "3 branches, but there are 2 descriptors"),
            (LocationBackwardSizes { workspace: 9, ..ok }, "the workspace has 9 floats, this backward needs 10"),
            (LocationBackwardSizes { shape: shape(1 << 20, 1 << 10, 40, 3, false), ..ok }, "must fit in an i32"),
        ];
        for (c, want) in cases {
            let err = c.check(1e-12).unwrap_err();
            assert!(matches!(err, Error::Shape { .. }) && err.to_string().contains(want), "{err} should contain {want:?}");
        }
        let many = sizes(shape(1, 1, 8, 33, true));
        assert!(matches!(many.check(1e-12), Err(Error::Unsupported(_))));
        assert!(matches!(ok.check(f32::NAN), Err(Error::Input(_))));
    }

    #[test]
    fn split_backward_kernels_by_storage_type() {
        let names = |k: Result<[KernelName; 4]>| k.map(|ks| ks.map(|k| k.name));
        assert_eq!(
            names(split_backward_kernels::<f32, f32>()).unwrap(),
            ["adapter_location_backward_gate_f32", "adapter_split_bwd_pre_f32", "adapter_split_bwd_post_f32", "adapter_split_bwd_input_f32"]
        );
        assert_eq!(
            names(split_backward_kernels::<half::bf16, half::bf16>()).unwrap(),
            ["adapter_location_backward_gate_bf16io", "adapter_split_bwd_pre_bf16io", "adapter_split_bwd_post_bf16io", "adapter_split_bwd_input_bf16io"]
        );
        assert_eq!(
            names(split_backward_kernels::<half::f16, half::f16>()).unwrap(),
            ["adapter_location_backward_gate_f16io", "adapter_split_bwd_pre_f16io", "adapter_split_bwd_post_f16io", "adapter_split_bwd_input_f16io"]
        );
        for err in [
            names(split_backward_kernels::<half::bf16, f32>()).unwrap_err(),
            names(split_backward_kernels::<f32, half::bf16>()).unwrap_err(),
            names(split_backward_kernels::<half::f16, f32>()).unwrap_err(),
            names(split_backward_kernels::<half::bf16, half::f16>()).unwrap_err(),
        ] {
            assert!(matches!(err, Error::Unsupported(_)), "{err}");
        }
    }

    #[test]
    fn split_backward_layouts_hold_only_what_the_masks_need() {
        let descs = [desc(3), full(5), BranchDescriptor { scaling_kind: SCALING_LEARNED, scaling: 64, ..desc(48) }];
        let s = shape(2, 7, 40, 3, true);
        let (rows, rh) = (3 * 14, 3 * 14 * 40);
        // Everything processed, branches 0 and 2 trainable, input gradients.
        let l = split_backward_layout(&descs, 40, s, 0b111, 0b101, true).unwrap();
        assert_eq!((l.z.len(), l.up.len(), l.rho_grad.len(), l.r_grad.len()), (rh, rh, rh, rh));
        // Branch 1 (the only one with LayerNorms, a channel scaling and a gate) is frozen: no
        // per-row terms for them; its gate still needs the means and the row terms.
        assert_eq!((l.ln_after.0.len(), l.ln_before.1.len(), l.scale_channel.len(), l.gate_x.len(), l.dlogit.len()), (0, 0, 0, 0, 0));
        assert_eq!((l.scale_learned.len(), l.gate_q.len(), l.gate.len(), l.stats.len()), (rows, rows, 6, 0));
        assert_eq!(l.branch.iter().map(|b| b.as_ref().map(|r| r[0].len())).collect::<Vec<_>>(), [Some(14 * 3), Some(14 * 5), Some(14 * 48)]);
        assert_eq!(l.colsum.len(), bias_grad_workspace_len(14, 48));
        // Regions are aligned and disjoint, inside len.
        let mut regions = vec![l.z.clone(), l.up.clone(), l.rho_grad.clone(), l.r_grad.clone(), l.scale_learned.clone(), l.gate_q.clone(), l.gate.clone(), l.colsum.clone()];
        regions.extend([l.pres.clone(), l.acts.clone()]);
        regions.extend(l.branch.iter().flatten().map(|r| r[2].clone()));
        regions.sort_by_key(|r| r.start);
        for w in regions.windows(2) {
            assert!(w[0].end <= w[1].start && w[1].start % WORKSPACE_ALIGN == 0, "{w:?}");
        }
        assert!(regions.last().unwrap().end <= l.len);
        // Each branch's pre-activation and activation lie end to end in branch order in pres and
        // acts (the tensor-core kernels' indexing).
        for (k, whole) in [(0, &l.pres), (1, &l.acts)] {
            let parts: Vec<Range<usize>> = l.branch.iter().flatten().map(|r| r[k].clone()).collect();
            assert_eq!((parts[0].start, parts[2].end), (whole.start, whole.end));
            assert!(parts.windows(2).all(|w| w[0].end == w[1].start), "{parts:?}");
        }
        // No input gradients, only branch 1 trains: no dρ / dr terms, its per-row terms, no
        // products for the others.
        let l = split_backward_layout(&descs, 40, s, 0b010, 0b010, false).unwrap();
        assert_eq!((l.rho_grad.len(), l.r_grad.len(), l.scale_learned.len()), (0, 0, 0));
        assert_eq!((l.ln_after.0.len(), l.ln_before.1.len(), l.scale_channel.len(), l.gate_x.len(), l.dlogit.len()), (rh, rh, rh, rh, rows));
        assert_eq!(l.branch.iter().map(Option::is_some).collect::<Vec<_>>(), [false, true, false]);
        assert_eq!((l.pres.len(), l.branch[1].as_ref().map(|r| r[1].clone())), (14 * 5, Some(l.acts.clone())));
        // The pre step's statistics only where ρ = x after the original LayerNorm.
        let x_after_ln = |d: BranchDescriptor| BranchDescriptor { original_ln_before: 1, residual_before_ln: residual_code(ResidualBeforeLn::False), ..d };
        assert_eq!(split_backward_layout(&[x_after_ln(desc(3))], 40, shape(2, 7, 40, 1, false), 1, 1, true).unwrap().stats.len(), 28);
        assert!(split_backward_layout(&descs, 40, shape(1 << 40, 1 << 20, 40, 3, true), 0b111, 0b111, true).is_err());
    }

    #[test]
    fn backward_plans_follow_the_documented_rules() {
        for (h, m) in [(1, 1), (40, 3), (384, 48), (768, 64), (1024, 4096)] {
            let p = backward_plan_auto(h, m);
            assert_eq!(p.threads_per_row, 32, "H {h}");
            // What the launcher validates against: the opt-in maximum (sm_90), less the margin.
            validate_backward_plan(p, h, m, 227 * 1024 - 256).unwrap();
        }
        // 8 rows of 4·384 + 3·48 floats would need 53 KiB: 4 rows fit.
        assert_eq!(backward_plan_auto(384, 48).rows_per_block, 4);
        assert_eq!(backward_plan_auto(40, 3).rows_per_block, 8);
        assert_eq!(backward_plan_auto(1100, 8), LocationPlan { threads_per_row: 128, rows_per_block: 1 });
        assert_eq!(backward_plan_auto(4099, 8), LocationPlan { threads_per_row: 256, rows_per_block: 1 });
        assert_eq!(backward_plan_auto(1 << 16, 8).threads_per_row, MAX_BACKWARD_THREADS);
        for bad in [LocationPlan { threads_per_row: 512, rows_per_block: 1 }, LocationPlan { threads_per_row: 32, rows_per_block: 9 }, LocationPlan { threads_per_row: 48, rows_per_block: 1 }] {
            assert!(matches!(validate_backward_plan(bad, 40, 3, DEFAULT_SHARED_BYTES), Err(Error::Shape { .. })), "{bad:?}");
        }
        let err = validate_backward_plan(LocationPlan { threads_per_row: 32, rows_per_block: 8 }, 2000, 48, DEFAULT_SHARED_BYTES).unwrap_err().to_string();
        assert!(err.contains("bytes of shared memory"), "{err}");
        let src = crate::cuda::registry::adapter::SOURCE.code;
        assert!(src.contains(&format!("#define ADAPTER_BWD_MAX_THREADS {MAX_BACKWARD_THREADS}\n")));
        assert!(src.contains(&format!("#define ADAPTER_BWD_MAX_BRANCHES {MAX_BACKWARD_BRANCHES}\n")));
    }

    #[test]
    fn row_staging_shared_memory() {
        // Per team, bytes: pre (row buffer; staged + h, r), post (u_d, y; staged + up, h, r,
        // d_out), input (x, dx, dh, dr; staged + h, r). H = 768 in bf16: rows of 3072 and 1536.
        assert_eq!(split_backward_team_bytes(768, 2, false), [3072, 6144, 12288]);
        assert_eq!(split_backward_team_bytes(768, 2, true), [3072 + 3072, 9216 + 4608, 12288 + 3072]);
        assert_eq!(split_forward_team_bytes(768, 2, true), 6144);
        // H = 42: 168-byte f32 rows and 84-byte bf16 rows, each region padded to 176 and 96.
        assert_eq!(split_backward_team_bytes(42, 2, true), [176 + 192, 3 * 176 + 3 * 96, 4 * 176 + 2 * 96]);
        // A team of one branch keeps x and dx only.
        assert_eq!(split_backward_input_team_bytes(768, 2, true, false), 6144 + 3072);
        assert_eq!(split_backward_input_team_bytes(768, 4, false, false), 6144);
        assert_eq!(split_backward_input_team_bytes(42, 2, true, true), split_backward_team_bytes(42, 2, true)[2]);
        assert_eq!(split_forward_team_bytes(42, 4, false), 176);
        // The choice: On refuses what does not fit, Auto falls back, Off never stages.
        let plan = LocationPlan { threads_per_row: 32, rows_per_block: 4 };
        let staged = 4 * (12288 + 3072);
        assert!(validate_split_backward_plan(plan, 768, 2, RowStaging::Auto, staged).unwrap());
        assert!(!validate_split_backward_plan(plan, 768, 2, RowStaging::Auto, staged - 1).unwrap());
        assert!(!validate_split_backward_plan(plan, 768, 2, RowStaging::Off, 1 << 20).unwrap());
        let err = validate_split_backward_plan(plan, 768, 2, RowStaging::On, staged - 1).unwrap_err().to_string();
        assert!(err.contains(&format!("needs {staged} bytes of shared memory a block for H = 768")), "{err}");
    }
}
