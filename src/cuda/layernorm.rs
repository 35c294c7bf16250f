//! Launcher for `kernels/layernorm.cu`: fused residual-add + LayerNorm forward. The training
//! forward and the backward (dz; dγ/dβ only when asked) follow it, after their own section note.
//!
//! Launch configuration (see the kernel header for the thread mapping and numerics):
//! - `cols <= 1024`: one warp per row, 8 rows per block (256 threads). BERT widths (384, 768)
//!   land here: 12-24 columns per lane, reductions entirely in shuffles, no block barriers.
//! - `cols > 1024`: one block per row with about 16 columns per thread (128..1024 threads), so
//!   wide rows still spread over enough threads to hide memory latency.
//! - The row's `x + residual` is cached in dynamic shared memory when `rows_per_block · cols`
//!   floats fit in the 48 KiB a kernel gets without an opt-in (cols <= 12224 block-per-row);
//!   otherwise the kernel re-reads x and residual in each of its three passes.
//!
//! γ and β are f32 or bf16 (a frozen base loaded in bf16): [`LayerNormInputs`] is generic over
//! their [`BaseScalar`] `P` and over the [`ActivationScalar`] `A` of x, the residual, y (and the
//! training forward's z, the backward's dy, z and dz). The launchers pick the kernel by
//! `(A::DTYPE, P::DTYPE)`: (f32, f32) `_f32`, (f32, bf16) `_bf16` (the forward only), (bf16,
//! bf16) `_bf16io` (every kernel of the file); any other pair is [`Error::Unsupported`], before
//! anything is launched. All variants are one templated body each, computing in f32: mean, rstd,
//! the stats and the dγ/dβ partials stay f32, and a bf16 output is the f32 kernel's output on the
//! widened inputs rounded once (to nearest even). f16 is the same: (f32, f16) `_f16` and (f16,
//! f16) `_f16io`, the same bodies over f16 storage; bf16 and f16 never pair.
//!
//! The launcher validates every length against `rows`/`cols` and returns [`Error::Shape`] before
//! launching, so the kernel never indexes outside the views it is given. It is written once over
//! [`Gpu`]: it enqueues on a real GPU's stream without synchronising, and runs to completion on
//! the `cuda-sim` executor.

use cudarc::driver::LaunchConfig;

use super::gpu::{ActivationScalar, BaseScalar, DeviceScalar, DeviceView, DeviceViewMut, Gpu, KernelArg};
use super::registry::layernorm::{
    RESIDUAL_LAYERNORM_FORWARD_BF16, RESIDUAL_LAYERNORM_FORWARD_BF16IO, RESIDUAL_LAYERNORM_FORWARD_F16, RESIDUAL_LAYERNORM_FORWARD_F16IO, RESIDUAL_LAYERNORM_FORWARD_F32,
};
use super::registry::KernelName;
use crate::error::{Error, Result};
use crate::tensor::DType;

const OP: &str = "cuda::residual_layernorm_forward";

/// Dynamic shared memory the kernel may use without `cuFuncSetAttribute` (48 KiB), less a margin
/// for its 128 bytes of static reduction scratch.
pub const MAX_ROW_CACHE_BYTES: usize = 48 * 1024 - 256;

/// The inputs: `x` and `residual` are `[rows, cols]` of activations `A` (f32 or bf16),
/// `gamma`/`beta` are `[cols]` of `P` (f32 or bf16). `P` comes first, so `LayerNormInputs<'_, P>`
/// still names the f32-activation inputs.
pub struct LayerNormInputs<'a, P = f32, A = f32> {
    pub x: DeviceView<'a, A>,
    /// Added to `x` before normalising; `None` for a plain LayerNorm.
    pub residual: Option<DeviceView<'a, A>>,
    pub gamma: DeviceView<'a, P>,
    pub beta: DeviceView<'a, P>,
    pub rows: usize,
    pub cols: usize,
    pub eps: f32,
}

/// The outputs: `y` is `[rows, cols]` of activations `A`; `mean` and `rstd` (`1/sqrt(var +
/// eps)`) are `[rows]` of f32 whatever `A`, saved for the backward.
pub struct LayerNormOutputs<'a, A = f32> {
    pub y: DeviceViewMut<'a, A>,
    pub mean: DeviceViewMut<'a, f32>,
    pub rstd: DeviceViewMut<'a, f32>,
}

/// How the kernel is launched. [`LayerNormPlan::auto`] is what production uses; other plans
/// exist so tests and benches can exercise every code path of the kernel at any width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerNormPlan {
    /// Threads cooperating on one row: a multiple of 32, at most 1024.
    pub threads_per_row: u32,
    /// Rows per block; must be 1 when `threads_per_row > 32` (the kernel's reduction scratch
    /// serves one team per block).
    pub rows_per_block: u32,
    /// Keep `x + residual` in shared memory between the kernel's passes.
    pub cache_row: bool,
}

impl LayerNormPlan {
    /// The configuration described in the module docs.
    pub fn auto(cols: usize) -> Self {
        let (threads_per_row, rows_per_block) = if cols <= 1024 {
            (32, 8)
        } else {
            let per_16 = cols.div_ceil(16).div_ceil(32) * 32;
            (per_16.clamp(128, 1024) as u32, 1)
        };
        let cache_row = rows_per_block as usize * cols * 4 <= MAX_ROW_CACHE_BYTES;
        LayerNormPlan { threads_per_row, rows_per_block, cache_row }
    }

    /// Dynamic shared memory for `cols`-wide rows.
    pub fn shared_mem_bytes(&self, cols: usize) -> usize {
        if self.cache_row {
            self.rows_per_block as usize * cols * std::mem::size_of::<f32>()
        } else {
            0
        }
    }

    /// Checks the plan against the kernel's contract for `cols`-wide rows.
    pub fn validate(&self, cols: usize) -> Result<()> {
        let t = self.threads_per_row;
        let bad = |msg: String| Err(Error::shape(OP, format!("launch plan {self:?}: {msg}")));
        if t == 0 || !t.is_multiple_of(32) || t > 1024 {
            return bad("threads_per_row must be a multiple of 32 in 32..=1024".into());
        }
        if self.rows_per_block == 0 || t as u64 * self.rows_per_block as u64 > 1024 {
            return bad("rows_per_block must be >= 1 with at most 1024 threads per block".into());
        }
        if t > 32 && self.rows_per_block != 1 {
            return bad("rows_per_block must be 1 when a row has more than one warp".into());
        }
        let smem = self.shared_mem_bytes(cols);
        if smem > MAX_ROW_CACHE_BYTES {
            return bad(format!("row cache needs {smem} bytes of shared memory, more than {MAX_ROW_CACHE_BYTES}"));
        }
        Ok(())
    }

    /// Grid, block and dynamic shared memory for `rows` rows of `cols` columns.
    pub fn launch_config(&self, rows: usize, cols: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.div_ceil(self.rows_per_block as usize) as u32, 1, 1),
            block_dim: (self.threads_per_row, self.rows_per_block, 1),
            shared_mem_bytes: self.shared_mem_bytes(cols) as u32,
        }
    }
}

/// The lengths a launch needs, checked before anything is enqueued. Pure, so it is unit-tested
/// without a GPU.
#[derive(Clone, Copy, Debug)]
pub struct LayerNormSizes {
    pub rows: usize,
    pub cols: usize,
    pub x: usize,
    pub residual: Option<usize>,
    pub gamma: usize,
    pub beta: usize,
    pub y: usize,
    pub mean: usize,
    pub rstd: usize,
}

/// The sizes of a launch's inputs and outputs.
macro_rules! launch_sizes {
    ($inputs:expr, $outputs:expr) => {
        LayerNormSizes {
            rows: $inputs.rows,
            cols: $inputs.cols,
            x: $inputs.x.len(),
            residual: $inputs.residual.as_ref().map(|r| r.len()),
            gamma: $inputs.gamma.len(),
            beta: $inputs.beta.len(),
            y: $outputs.y.len(),
            mean: $outputs.mean.len(),
            rstd: $outputs.rstd.len(),
        }
    };
}

impl LayerNormSizes {
    pub fn check(&self, eps: f32) -> Result<()> {
        let (rows, cols) = (self.rows, self.cols);
        let fail = |msg: String| Err(Error::shape(OP, msg));
        if cols == 0 {
            return fail("cols must be at least 1".into());
        }
        // The kernel takes int sizes; its offsets are 64-bit.
        if rows > i32::MAX as usize || cols > i32::MAX as usize {
            return fail(format!("rows {rows} and cols {cols} must each fit in an i32"));
        }
        let Some(n) = rows.checked_mul(cols) else {
            return fail(format!("rows {rows} x cols {cols} overflows usize"));
        };
        let expect = |name: &str, got: usize, want: usize, what: &str| -> Result<()> {
            if got != want {
                return fail(format!("{name} has {got} elements, expected {want} ({what}) for rows={rows}, cols={cols}"));
            }
            Ok(())
        };
        expect("x", self.x, n, "rows·cols")?;
        if let Some(r) = self.residual {
            expect("residual", r, n, "rows·cols")?;
        }
        expect("gamma", self.gamma, cols, "cols")?;
        expect("beta", self.beta, cols, "cols")?;
        expect("y", self.y, n, "rows·cols")?;
        expect("mean", self.mean, rows, "rows")?;
        expect("rstd", self.rstd, rows, "rows")?;
        if !eps.is_finite() || eps < 0.0 {
            return Err(Error::Input(format!("{OP}: eps must be finite and >= 0, got {eps}")));
        }
        Ok(())
    }
}

/// The kernel variant for activations stored as `A` and γ, β stored as `P`, of the family
/// `[f32, bf16, f16, bf16io, f16io]` (`None` where the file has no such kernel; `bf16` and `f16`
/// are f32 activations over a 16-bit base); `Error::Unsupported` for a pair without one.
fn pick_kernel<A: ActivationScalar, P: BaseScalar>(op: &str, [f32_kernel, bf16_kernel, f16_kernel, bf16io_kernel, f16io_kernel]: [Option<KernelName>; 5]) -> Result<KernelName> {
    let kernel = match (A::DTYPE, P::DTYPE) {
        (DType::F32, DType::F32) => f32_kernel,
        (DType::F32, DType::BF16) => bf16_kernel,
        (DType::F32, DType::F16) => f16_kernel,
        (DType::BF16, DType::BF16) => bf16io_kernel,
        (DType::F16, DType::F16) => f16io_kernel,
        _ => None,
    };
    kernel.ok_or_else(|| {
        Error::Unsupported(format!(
            "{op}: no kernel for {} activations with {} LayerNorm parameters (there are: f32 with f32{}, bf16 with bf16, f16 with f16)",
            A::DTYPE,
            P::DTYPE,
            if bf16_kernel.is_some() { ", bf16 or f16" } else { "" }
        ))
    })
}

/// `v` as a kernel argument for a `T*` parameter where `T` is the storage of `A` (bf16 as raw bits).
fn act<A: ActivationScalar>(v: &DeviceView<'_, A>) -> KernelArg {
    A::act_arg(v)
}

/// As [`act`], for an output.
fn act_mut<A: ActivationScalar>(v: &DeviceViewMut<'_, A>) -> KernelArg {
    A::act_arg_mut(v)
}

/// `(name, address, bytes)` of `len` elements of `T`, for [`check_disjoint_bytes`] (operands of
/// different element sizes side by side).
fn span<T: DeviceScalar>(name: &str, ptr: u64, len: usize) -> (&str, u64, usize) {
    (name, ptr, len * std::mem::size_of::<T>())
}

/// `y = LayerNorm(x + residual)` row-wise with the automatic launch plan; writes `mean`/`rstd`.
pub fn residual_layernorm_forward<P: BaseScalar, A: ActivationScalar>(gpu: &Gpu, inputs: &LayerNormInputs<'_, P, A>, outputs: &mut LayerNormOutputs<'_, A>) -> Result<()> {
    residual_layernorm_forward_with_plan(gpu, inputs, outputs, LayerNormPlan::auto(inputs.cols))
}

/// As [`residual_layernorm_forward`], with an explicit launch plan (validated).
pub fn residual_layernorm_forward_with_plan<P: BaseScalar, A: ActivationScalar>(gpu: &Gpu, inputs: &LayerNormInputs<'_, P, A>, outputs: &mut LayerNormOutputs<'_, A>, plan: LayerNormPlan) -> Result<()> {
    let (rows, cols) = (inputs.rows, inputs.cols);
    let kernel = pick_kernel::<A, P>(OP, [Some(RESIDUAL_LAYERNORM_FORWARD_F32), Some(RESIDUAL_LAYERNORM_FORWARD_BF16), Some(RESIDUAL_LAYERNORM_FORWARD_F16), Some(RESIDUAL_LAYERNORM_FORWARD_BF16IO), Some(RESIDUAL_LAYERNORM_FORWARD_F16IO)])?;
    launch_sizes!(inputs, outputs).check(inputs.eps)?;
    plan.validate(cols)?;
    if rows == 0 {
        return Ok(()); // a zero-sized grid is a launch error; there is nothing to do
    }
    // The kernel's parameter order: y, mean, rstd, x, residual (null for none), gamma, beta,
    // rows, cols, eps, cache_row; Gpu::launch checks it against kernels/layernorm.cu.
    let args = [
        act_mut(&outputs.y),
        outputs.mean.arg(),
        outputs.rstd.arg(),
        act(&inputs.x),
        inputs.residual.as_ref().map_or(KernelArg::Null, act),
        P::base_arg(&inputs.gamma),
        P::base_arg(&inputs.beta),
        KernelArg::I32(rows as i32),
        KernelArg::I32(cols as i32),
        KernelArg::F32(inputs.eps),
        KernelArg::I32(plan.cache_row as i32),
    ];
    // SAFETY: every view was checked above to have exactly the length the kernel indexes for
    // these rows/cols, and the plan against the kernel's block-shape and shared-memory contract.
    unsafe { gpu.launch(kernel, plan.launch_config(rows, cols), &args) }
}

// ---- training forward and backward -------------------------------------------------------------
//
// - [`residual_layernorm_forward_train`]: `Backend::residual_layernorm_stats`, the forward that
//   also writes `z = x + residual` and the interleaved `[rows, 2]` `[mean, rstd]`; same plans as
//   the forward (the row cache holds z).
// - [`layernorm_backward`]: the input gradient `dz` from `z` and the stats, written or added;
//   and, only when [`LayerNormParamGrads`] are given (a trainable LayerNorm, never BERT's frozen
//   ones), dγ/dβ through a deterministic two-stage column reduction (no atomics).
//   Plan: a warp per row with 4 rows per block up to 1024 columns (so the row cache, 2·cols
//   floats per row, fits 48 KiB up to 1024 columns), a block per row above, as the forward.

use super::elementwise::{check_disjoint_bytes, expect_len, finalize_launch, ColumnChunks};
use super::registry::elementwise::COLUMN_SUMS_FINALIZE_F32;
use super::registry::layernorm::{
    LAYERNORM_BACKWARD_BF16IO, LAYERNORM_BACKWARD_F16IO, LAYERNORM_BACKWARD_F32, LAYERNORM_PARAM_GRAD_PARTIAL_BF16IO, LAYERNORM_PARAM_GRAD_PARTIAL_F16IO, LAYERNORM_PARAM_GRAD_PARTIAL_F32,
    RESIDUAL_LAYERNORM_FORWARD_TRAIN_BF16IO, RESIDUAL_LAYERNORM_FORWARD_TRAIN_F16IO, RESIDUAL_LAYERNORM_FORWARD_TRAIN_F32,
};

const OP_TRAIN: &str = "cuda::residual_layernorm_forward_train";
const OP_BWD: &str = "cuda::layernorm_backward";

/// The training forward's outputs: `y` and `z` are `[rows, cols]` of activations `A`, `stats` is
/// `[rows, 2]` = `[mean, rstd]` per row in f32 (`Backend::residual_layernorm_stats`' layout). With
/// bf16 activations z holds the f32 sum rounded once, and the stats are those of the f32 sum
/// (kernels/layernorm.cu, training forward).
pub struct LayerNormTrainOutputs<'a, A = f32> {
    pub y: DeviceViewMut<'a, A>,
    pub z: DeviceViewMut<'a, A>,
    pub stats: DeviceViewMut<'a, f32>,
}

/// `y = LayerNorm(x + residual)`, also writing `z = x + residual` and `stats`, with the automatic
/// launch plan. Kernels: f32 activations with f32 γ/β, or bf16 with bf16 (`_bf16io`).
pub fn residual_layernorm_forward_train<P: BaseScalar, A: ActivationScalar>(gpu: &Gpu, inputs: &LayerNormInputs<'_, P, A>, outputs: &mut LayerNormTrainOutputs<'_, A>) -> Result<()> {
    residual_layernorm_forward_train_with_plan(gpu, inputs, outputs, LayerNormPlan::auto(inputs.cols))
}

/// As [`residual_layernorm_forward_train`], with an explicit launch plan (validated).
pub fn residual_layernorm_forward_train_with_plan<P: BaseScalar, A: ActivationScalar>(gpu: &Gpu, inputs: &LayerNormInputs<'_, P, A>, outputs: &mut LayerNormTrainOutputs<'_, A>, plan: LayerNormPlan) -> Result<()> {
    let (rows, cols) = (inputs.rows, inputs.cols);
    let kernel = pick_kernel::<A, P>(OP_TRAIN, [Some(RESIDUAL_LAYERNORM_FORWARD_TRAIN_F32), None, None, Some(RESIDUAL_LAYERNORM_FORWARD_TRAIN_BF16IO), Some(RESIDUAL_LAYERNORM_FORWARD_TRAIN_F16IO)])?;
    // The forward's checks (mean and rstd stand for the stats' two columns), then z and stats.
    let sizes = LayerNormSizes {
        rows,
        cols,
        x: inputs.x.len(),
        residual: inputs.residual.as_ref().map(|r| r.len()),
        gamma: inputs.gamma.len(),
        beta: inputs.beta.len(),
        y: outputs.y.len(),
        mean: rows,
        rstd: rows,
    };
    sizes.check(inputs.eps).map_err(|e| retag(e, OP_TRAIN))?;
    let n = rows * cols; // no overflow: checked above
    expect_len(OP_TRAIN, "z", outputs.z.len(), n, &format!("rows·cols for rows={rows}, cols={cols}"))?;
    expect_len(OP_TRAIN, "stats", outputs.stats.len(), 2 * rows, &format!("[rows, 2] for rows={rows}"))?;
    plan.validate(cols).map_err(|e| retag(e, OP_TRAIN))?;
    let oa = |name, v: &DeviceViewMut<'_, A>| span::<A>(name, v.device_ptr(), v.len());
    let ia = |name, v: &DeviceView<'_, A>| span::<A>(name, v.device_ptr(), v.len());
    let ip = |name, v: &DeviceView<'_, P>| span::<P>(name, v.device_ptr(), v.len());
    let mut ins = vec![ia("x", &inputs.x), ip("gamma", &inputs.gamma), ip("beta", &inputs.beta)];
    if let Some(r) = &inputs.residual {
        ins.push(ia("residual", r));
    }
    let stats = span::<f32>("stats", outputs.stats.device_ptr(), outputs.stats.len());
    check_disjoint_bytes(OP_TRAIN, &[oa("y", &outputs.y), oa("z", &outputs.z), stats], &ins)?;
    if rows == 0 {
        return Ok(());
    }
    let args = [
        act_mut(&outputs.y),
        act_mut(&outputs.z),
        outputs.stats.arg(),
        act(&inputs.x),
        inputs.residual.as_ref().map_or(KernelArg::Null, act),
        P::base_arg(&inputs.gamma),
        P::base_arg(&inputs.beta),
        KernelArg::I32(rows as i32),
        KernelArg::I32(cols as i32),
        KernelArg::F32(inputs.eps),
        KernelArg::I32(plan.cache_row as i32),
    ];
    // SAFETY: every view has exactly the length the kernel indexes for rows/cols (checked above),
    // no output overlaps another operand, and the plan satisfies the kernel's contract.
    unsafe { gpu.launch(kernel, plan.launch_config(rows, cols), &args) }
}

/// A shape error of the forward's shared checks, renamed to the op that ran them.
fn retag(e: Error, op: &'static str) -> Error {
    match e {
        Error::Shape { msg, .. } => Error::shape(op, msg),
        Error::Input(msg) => Error::Input(msg.replacen(OP, op, 1)),
        other => other,
    }
}

/// The backward's inputs: `dy` and `z` are `[rows, cols]` of activations `A`, `stats` is
/// `[rows, 2]` (f32) from the training forward, `gamma` is `[cols]` of `P`. Kernels: f32 with
/// f32, or bf16 with bf16 (`_bf16io`, whose dz is bf16 too; dγ/dβ stay f32).
pub struct LayerNormBackwardInputs<'a, P = f32, A = f32> {
    pub dy: DeviceView<'a, A>,
    pub z: DeviceView<'a, A>,
    pub stats: DeviceView<'a, f32>,
    pub gamma: DeviceView<'a, P>,
    pub rows: usize,
    pub cols: usize,
}

/// The gradients of a trainable LayerNorm's γ and β (`[cols]` each; either may be left out),
/// written or, when `accumulate`, added to, and the scratch their reduction needs: at least
/// [`layernorm_param_grad_workspace_len`] floats.
pub struct LayerNormParamGrads<'a> {
    pub dgamma: Option<DeviceViewMut<'a, f32>>,
    pub dbeta: Option<DeviceViewMut<'a, f32>>,
    pub workspace: DeviceViewMut<'a, f32>,
    pub accumulate: bool,
}

/// The workspace floats [`LayerNormParamGrads`] needs for `[rows, cols]`: one chunk row each for
/// dγ and dβ.
pub fn layernorm_param_grad_workspace_len(rows: usize, cols: usize) -> usize {
    ColumnChunks::for_rows(rows).workspace_len(cols).saturating_mul(2)
}

/// The backward's automatic plan: a warp per row, 4 rows per block, up to 1024 columns; a block
/// per row (the forward's thread count) above; the row cache (`2·cols` floats per row) when it
/// fits [`MAX_ROW_CACHE_BYTES`].
pub fn layernorm_backward_plan(cols: usize) -> LayerNormPlan {
    let forward = LayerNormPlan::auto(cols);
    let rows_per_block = if forward.threads_per_row == 32 { 4 } else { 1 };
    let cache_row = rows_per_block as usize * cols * 8 <= MAX_ROW_CACHE_BYTES;
    LayerNormPlan { threads_per_row: forward.threads_per_row, rows_per_block, cache_row }
}

/// The backward's dynamic shared memory: `rows_per_block · 2 · cols` floats with the row cache.
pub fn layernorm_backward_shared_bytes(plan: &LayerNormPlan, cols: usize) -> usize {
    if plan.cache_row {
        plan.rows_per_block as usize * cols * 2 * std::mem::size_of::<f32>()
    } else {
        0
    }
}

/// `dz = LayerNorm'(dy)` from `z` and `stats` (written, or added when `accumulate`), and the
/// parameter gradients when `params` is given, with the automatic plan.
pub fn layernorm_backward<P: BaseScalar, A: ActivationScalar>(gpu: &Gpu, inputs: &LayerNormBackwardInputs<'_, P, A>, dz: &mut DeviceViewMut<'_, A>, accumulate: bool, params: Option<&mut LayerNormParamGrads<'_>>) -> Result<()> {
    layernorm_backward_with_plan(gpu, inputs, dz, accumulate, params, layernorm_backward_plan(inputs.cols))
}

/// As [`layernorm_backward`], with an explicit plan for the `dz` kernel (validated; its row cache
/// holds `2·cols` floats per row).
pub fn layernorm_backward_with_plan<P: BaseScalar, A: ActivationScalar>(
    gpu: &Gpu,
    inputs: &LayerNormBackwardInputs<'_, P, A>,
    dz: &mut DeviceViewMut<'_, A>,
    accumulate: bool,
    params: Option<&mut LayerNormParamGrads<'_>>,
    plan: LayerNormPlan,
) -> Result<()> {
    let (rows, cols) = (inputs.rows, inputs.cols);
    let dz_kernel = pick_kernel::<A, P>(OP_BWD, [Some(LAYERNORM_BACKWARD_F32), None, None, Some(LAYERNORM_BACKWARD_BF16IO), Some(LAYERNORM_BACKWARD_F16IO)])?;
    let partial_kernel = pick_kernel::<A, P>(OP_BWD, [Some(LAYERNORM_PARAM_GRAD_PARTIAL_F32), None, None, Some(LAYERNORM_PARAM_GRAD_PARTIAL_BF16IO), Some(LAYERNORM_PARAM_GRAD_PARTIAL_F16IO)])?;
    if cols == 0 {
        return Err(Error::shape(OP_BWD, "cols must be at least 1".to_string()));
    }
    let n = super::elementwise::checked_matrix(OP_BWD, rows, cols)?;
    let what = format!("for rows={rows}, cols={cols}");
    expect_len(OP_BWD, "dy", inputs.dy.len(), n, &format!("rows·cols {what}"))?;
    expect_len(OP_BWD, "z", inputs.z.len(), n, &format!("rows·cols {what}"))?;
    expect_len(OP_BWD, "stats", inputs.stats.len(), 2 * rows, &format!("[rows, 2] {what}"))?;
    expect_len(OP_BWD, "gamma", inputs.gamma.len(), cols, "cols")?;
    expect_len(OP_BWD, "dz", dz.len(), n, &format!("rows·cols {what}"))?;
    LayerNormPlan { cache_row: false, ..plan }.validate(cols).map_err(|e| retag(e, OP_BWD))?;
    let smem = layernorm_backward_shared_bytes(&plan, cols);
    if smem > MAX_ROW_CACHE_BYTES {
        return Err(Error::shape(OP_BWD, format!("launch plan {plan:?}: the row cache needs {smem} bytes of shared memory, more than {MAX_ROW_CACHE_BYTES}")));
    }
    let chunks = ColumnChunks::for_rows(rows);
    let inputs_list = [
        span::<A>("dy", inputs.dy.device_ptr(), inputs.dy.len()),
        span::<A>("z", inputs.z.device_ptr(), inputs.z.len()),
        span::<f32>("stats", inputs.stats.device_ptr(), inputs.stats.len()),
        span::<P>("gamma", inputs.gamma.device_ptr(), inputs.gamma.len()),
    ];
    let mut outputs = vec![span::<A>("dz", dz.device_ptr(), dz.len())];
    if let Some(p) = params.as_deref() {
        for (name, g) in [("dgamma", &p.dgamma), ("dbeta", &p.dbeta)] {
            if let Some(g) = g {
                expect_len(OP_BWD, name, g.len(), cols, "cols")?;
                outputs.push(span::<f32>(name, g.device_ptr(), g.len()));
            }
        }
        let need = 2 * chunks.workspace_len(cols);
        if p.workspace.len() < need {
            return Err(Error::shape(OP_BWD, format!("workspace has {} elements, at least {need} needed (2 x chunks {} x cols {cols}) {what}", p.workspace.len(), chunks.chunks)));
        }
        outputs.push(span::<f32>("workspace", p.workspace.device_ptr(), need));
    }
    check_disjoint_bytes(OP_BWD, &outputs, &inputs_list)?;
    if rows > 0 {
        let cfg = LaunchConfig { shared_mem_bytes: smem as u32, ..plan.launch_config(rows, cols) };
        let args = [
            act_mut(dz),
            act(&inputs.dy),
            act(&inputs.z),
            inputs.stats.arg(),
            P::base_arg(&inputs.gamma),
            KernelArg::I32(rows as i32),
            KernelArg::I32(cols as i32),
            KernelArg::I32(accumulate as i32),
            KernelArg::I32(plan.cache_row as i32),
        ];
        // SAFETY: every view has the length the kernel indexes for rows/cols, dz overlaps no
        // input, and the plan (block shape, shared memory) was validated above.
        unsafe { gpu.launch(dz_kernel, cfg, &args) }?;
    }
    let Some(p) = params else { return Ok(()) };
    if p.dgamma.is_none() && p.dbeta.is_none() {
        return Ok(());
    }
    let per = chunks.workspace_len(cols);
    let ws = p.workspace.device_ptr();
    let ws_g = KernelArg::Pointer { ptr: ws, elem: super::registry::ScalarType::F32 };
    let ws_b = KernelArg::Pointer { ptr: ws + 4 * per as u64, elem: super::registry::ScalarType::F32 };
    if chunks.chunks > 0 {
        let args = [
            if p.dgamma.is_some() { ws_g } else { KernelArg::Null },
            if p.dbeta.is_some() { ws_b } else { KernelArg::Null },
            act(&inputs.dy),
            act(&inputs.z),
            inputs.stats.arg(),
            KernelArg::I32(rows as i32),
            KernelArg::I32(cols as i32),
            KernelArg::I32(chunks.rows_per_chunk as i32),
        ];
        // SAFETY: the workspace holds 2·chunks·cols floats (checked), the inputs rows·cols and
        // 2·rows, and the grid covers exactly chunks × ceil(cols/32) tiles.
        unsafe { gpu.launch(partial_kernel, chunks.partial_launch(cols), &args) }?;
    }
    // The finalize kernel's `a` pair must be present: put whichever output exists there.
    let (out_a, part_a, out_b, part_b) = match (&p.dgamma, &p.dbeta) {
        (Some(g), Some(b)) => (g.arg(), ws_g, b.arg(), ws_b),
        (Some(g), None) => (g.arg(), ws_g, KernelArg::Null, KernelArg::Null),
        (None, Some(b)) => (b.arg(), ws_b, KernelArg::Null, KernelArg::Null),
        (None, None) => return Ok(()),
    };
    let args = [out_a, out_b, part_a, part_b, KernelArg::I32(chunks.chunks as i32), KernelArg::I32(cols as i32), KernelArg::I32(p.accumulate as i32)];
    // SAFETY: dgamma/dbeta hold cols floats, their workspace halves chunks·cols each.
    unsafe { gpu.launch(COLUMN_SUMS_FINALIZE_F32, finalize_launch(cols), &args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(rows: usize, cols: usize) -> LayerNormSizes {
        let n = rows * cols;
        LayerNormSizes { rows, cols, x: n, residual: Some(n), gamma: cols, beta: cols, y: n, mean: rows, rstd: rows }
    }

    #[test]
    fn consistent_sizes_pass() {
        assert!(sizes(7, 31).check(1e-5).is_ok());
        assert!(sizes(0, 31).check(1e-5).is_ok());
        assert!(LayerNormSizes { residual: None, ..sizes(3, 4) }.check(0.0).is_ok());
    }

    #[test]
    fn every_wrong_length_is_an_error() {
        let ok = sizes(5, 8);
        let cases = [
            LayerNormSizes { x: 39, ..ok },
            LayerNormSizes { x: 41, ..ok },
            LayerNormSizes { residual: Some(8), ..ok },
            LayerNormSizes { gamma: 7, ..ok },
            LayerNormSizes { beta: 9, ..ok },
            LayerNormSizes { y: 39, ..ok },
            LayerNormSizes { mean: 4, ..ok },
            LayerNormSizes { rstd: 6, ..ok },
            LayerNormSizes { cols: 0, ..ok },
        ];
        for c in cases {
            let err = c.check(1e-5).unwrap_err();
            assert!(matches!(err, Error::Shape { .. }), "{c:?}: {err}");
        }
        assert!(sizes(1, 1usize << 31).check(1e-5).is_err());
        assert!(matches!(ok.check(f32::NAN), Err(Error::Input(_))));
        assert!(ok.check(-1.0).is_err());
    }

    #[test]
    fn auto_plans_follow_the_documented_rules() {
        for cols in [1, 31, 48, 384, 768, 1000, 1024] {
            let p = LayerNormPlan::auto(cols);
            assert_eq!((p.threads_per_row, p.rows_per_block, p.cache_row), (32, 8, true), "cols {cols}");
            p.validate(cols).unwrap();
        }
        let p = LayerNormPlan::auto(1025);
        assert_eq!((p.threads_per_row, p.rows_per_block, p.cache_row), (128, 1, true));
        let p = LayerNormPlan::auto(4099);
        assert_eq!((p.threads_per_row, p.rows_per_block, p.cache_row), (288, 1, true));
        let p = LayerNormPlan::auto(12224);
        assert!(p.cache_row);
        let p = LayerNormPlan::auto(12225);
        assert!(!p.cache_row);
        let p = LayerNormPlan::auto(1 << 20);
        assert_eq!((p.threads_per_row, p.rows_per_block, p.cache_row), (1024, 1, false));
        for cols in [1025, 4099, 12225, 1 << 20] {
            LayerNormPlan::auto(cols).validate(cols).unwrap();
        }
    }

    #[test]
    fn invalid_plans_are_rejected() {
        let bad = [
            LayerNormPlan { threads_per_row: 48, rows_per_block: 1, cache_row: false },
            LayerNormPlan { threads_per_row: 0, rows_per_block: 1, cache_row: false },
            LayerNormPlan { threads_per_row: 2048, rows_per_block: 1, cache_row: false },
            LayerNormPlan { threads_per_row: 64, rows_per_block: 2, cache_row: false },
            LayerNormPlan { threads_per_row: 32, rows_per_block: 33, cache_row: false },
            LayerNormPlan { threads_per_row: 32, rows_per_block: 0, cache_row: false },
            LayerNormPlan { threads_per_row: 32, rows_per_block: 8, cache_row: true }, // 8·2000·4 > 48 KiB
        ];
        for p in bad {
            assert!(p.validate(2000).is_err(), "{p:?}");
        }
    }
}
