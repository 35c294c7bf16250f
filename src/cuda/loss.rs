//! Launcher for `kernels/loss.cu`: the training objectives (`train::loss`) on head logits, their
//! gradient and the batch loss in two launches, with nothing read back (the caller reads `loss`
//! when it wants the number).
//!
//! Sizes are checked before anything is enqueued; labels live on the device, so one out of range
//! makes the loss and gradient NaN there (the model checks labels when it writes them).

use cudarc::driver::LaunchConfig;

use super::gpu::{DeviceView, DeviceViewMut, Gpu, KernelArg};
use super::registry::loss::{LOSS_FINISH_F32, LOSS_ROWS_F32};
use crate::error::{Error, Result};
use crate::train::loss::Objective;

const OP: &str = "cuda::loss";
const ROW_THREADS: u32 = 64;
const FINISH_THREADS: u32 = 256;

/// The kernel's objective code and its two parameters.
fn objective_args(objective: Objective) -> (i32, f64, f64) {
    match objective {
        Objective::CrossEntropy => (0, 0.0, 0.0),
        Objective::TaskEnergy { lambda } => (1, lambda, 0.0),
        Objective::ScoreMargin { margin, ce_weight } => (2, margin, ce_weight),
    }
}

/// The logits and labels of one loss evaluation: `trained` and `other` are `[rows, classes]`
/// (`other` exactly for the two-branch objectives), `labels` `[rows]`.
pub struct LossInputs<'a> {
    pub objective: Objective,
    pub trained: DeviceView<'a, f32>,
    pub other: Option<DeviceView<'a, f32>>,
    pub labels: DeviceView<'a, u32>,
    pub rows: usize,
    pub classes: usize,
}

/// Writes `dlogits` (`[rows, classes]`, ∂(total/B)/∂trained) and `loss` (`[2]`: total/B and the
/// cross-entropy part/B), as `train::loss::reference` computes them.
pub fn loss_forward_backward(gpu: &Gpu, inputs: &LossInputs<'_>, dlogits: &mut DeviceViewMut<'_, f32>, loss: &mut DeviceViewMut<'_, f32>) -> Result<()> {
    let (rows, classes) = (inputs.rows, inputs.classes);
    if rows == 0 || classes == 0 || rows > i32::MAX as usize || classes > i32::MAX as usize {
        return Err(Error::shape(OP, format!("{rows} rows of {classes} classes (each must be in 1..=i32::MAX)")));
    }
    let n = rows.checked_mul(classes).ok_or_else(|| Error::shape(OP, format!("{rows} x {classes} overflows")))?;
    let expect = |name: &str, got: usize, want: usize| -> Result<()> {
        if got != want {
            return Err(Error::shape(OP, format!("{name} has {got} elements, expected {want} for {rows} rows of {classes} classes")));
        }
        Ok(())
    };
    expect("trained logits", inputs.trained.len(), n)?;
    expect("labels", inputs.labels.len(), rows)?;
    expect("dlogits", dlogits.len(), n)?;
    expect("loss", loss.len(), 2)?;
    let two_branch = !matches!(inputs.objective, Objective::CrossEntropy);
    match (&inputs.other, two_branch) {
        (Some(o), true) => expect("the other branch's logits", o.len(), n)?,
        (None, false) => {}
        (o, _) => return Err(Error::shape(OP, format!("{:?} takes the other branch's logits exactly when it is a two-branch objective (given: {})", inputs.objective, o.is_some()))),
    }
    let (code, p0, p1) = objective_args(inputs.objective);
    if !p0.is_finite() || !p1.is_finite() {
        return Err(Error::Input(format!("{OP}: objective parameters must be finite: {:?}", inputs.objective)));
    }
    let partial = gpu.alloc::<f64>(2 * rows)?; // (total, CE) per row
    let bad = gpu.alloc::<i32>(rows)?;
    let other = inputs.other.as_ref().map_or(KernelArg::Null, |o| o.arg());
    let partial_arg = partial.view().arg();
    let rows_cfg = LaunchConfig { grid_dim: ((rows as u32).div_ceil(ROW_THREADS), 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 };
    let args = [
        dlogits.arg(),
        partial_arg,
        bad.view().arg(),
        inputs.trained.arg(),
        other,
        inputs.labels.arg(),
        KernelArg::I32(rows as i32),
        KernelArg::I32(classes as i32),
        KernelArg::I32(code),
        KernelArg::F64(p0),
        KernelArg::F64(p1),
    ];
    // SAFETY: every view was checked above to hold what the kernels index for rows x classes;
    // the scratch buffers hold 2·rows f64 and rows ints.
    unsafe { gpu.launch(LOSS_ROWS_F32, rows_cfg, &args) }?;
    let finish_cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (FINISH_THREADS, 1, 1), shared_mem_bytes: 0 };
    let finish = [loss.arg(), dlogits.arg(), partial_arg, bad.view().arg(), KernelArg::I32(rows as i32), KernelArg::I32(classes as i32)];
    // SAFETY: as above.
    unsafe { gpu.launch(LOSS_FINISH_F32, finish_cfg, &finish) }
}
