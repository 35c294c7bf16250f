//! Launchers for `kernels/elementwise.cu`: bias + activation (where no GEMM epilogue does it),
//! add, fill, f32 ↔ bf16 casts, and the first-token gather. The spec of each is the CPU backend
//! (`cpu::reference::activation`, `Backend::{add, fill, cast, first_token}`).
//!
//! Launch configuration (see the kernel header for the thread mapping):
//! - row kernels ([`bias_act`], [`first_token`]): one warp per row, 8 rows per 256-thread block,
//!   at most [`MAX_BLOCKS`] blocks with rows grid-strided beyond that;
//! - flat kernels ([`add`], the fills and casts): 256-thread blocks, at most [`MAX_BLOCKS`], a
//!   grid-stride loop over the elements.
//!
//! Every length is checked before anything is enqueued ([`Error::Shape`] naming the operand and
//! the numbers); a rejected call writes nothing. Zero elements is a no-op. Launches are enqueued
//! without synchronising on a GPU and run to completion on `cuda-sim`.
//!
//! bf16 buffers reach the header-free kernels as `unsigned short*` (their raw bits): the
//! pointer argument is retyped here, once, in [`bf16_bits_arg`] / [`bf16_bits_arg_mut`].

use cudarc::driver::LaunchConfig;
use half::bf16;

use super::gpu::{DeviceView, DeviceViewMut, Gpu, KernelArg};
use super::registry::elementwise::{ADD_F32, BIAS_ACT_FORWARD_F32, CAST_BF16_TO_F32, CAST_F32_TO_BF16, COUNT_NONFINITE_F32, FILL_BF16, FILL_F32, FILL_U32, FIRST_TOKEN_F32};
use super::registry::ScalarType;
use crate::backend::Activation;
use crate::error::{Error, Result};

/// The most blocks a row or flat kernel is launched with; more work is grid-strided. 4096 blocks
/// of 256 threads are about four waves of a full H100 or H200 (132 SMs × 2048 threads).
pub const MAX_BLOCKS: usize = 4096;
/// Rows per block of the row kernels (one warp each).
pub const ROWS_PER_BLOCK: u32 = 8;
const FLAT_THREADS: usize = 256;

/// One warp per row, [`ROWS_PER_BLOCK`] rows per block; `rows > 0`.
pub(crate) fn row_launch(rows: usize) -> LaunchConfig {
    let blocks = rows.div_ceil(ROWS_PER_BLOCK as usize).clamp(1, MAX_BLOCKS);
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (32, ROWS_PER_BLOCK, 1), shared_mem_bytes: 0 }
}

/// A grid-stride loop over `n > 0` elements.
pub(crate) fn flat_launch(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(FLAT_THREADS).clamp(1, MAX_BLOCKS);
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (FLAT_THREADS as u32, 1, 1), shared_mem_bytes: 0 }
}

/// The kernels' `int act` code of an activation (`None`: identity); kernels/common.cuh's `ACT_*`.
pub fn activation_code(act: Option<Activation>) -> i32 {
    match act {
        None => 0,
        Some(Activation::Relu) => 1,
        Some(Activation::Gelu) => 2,
        Some(Activation::GeluNew) => 3,
        Some(Activation::Swish) => 4,
        Some(Activation::Tanh) => 5,
        Some(Activation::Sigmoid) => 6,
    }
}

/// A bf16 view as the `const unsigned short*` the header-free kernels take (the same bits).
pub fn bf16_bits_arg(v: &DeviceView<'_, bf16>) -> KernelArg {
    KernelArg::Pointer { ptr: v.device_ptr(), elem: ScalarType::U16 }
}

/// A writable bf16 view as an `unsigned short*`.
pub fn bf16_bits_arg_mut(v: &DeviceViewMut<'_, bf16>) -> KernelArg {
    KernelArg::Pointer { ptr: v.device_ptr(), elem: ScalarType::U16 }
}

/// `rows · cols` after checking both fit the kernels' `int` parameters.
pub(crate) fn checked_matrix(op: &'static str, rows: usize, cols: usize) -> Result<usize> {
    if rows > i32::MAX as usize || cols > i32::MAX as usize {
        return Err(Error::shape(op, format!("rows {rows} and cols {cols} must each fit in an i32")));
    }
    rows.checked_mul(cols).ok_or_else(|| Error::shape(op, format!("rows {rows} x cols {cols} overflows usize")))
}

/// `Err(Shape)` unless `got == want`, naming the operand and what `want` is.
pub(crate) fn expect_len(op: &'static str, name: &str, got: usize, want: usize, what: &str) -> Result<()> {
    if got != want {
        return Err(Error::shape(op, format!("{name} has {got} elements, expected {want} ({what})")));
    }
    Ok(())
}

/// The kernels' `long long n`.
fn flat_len(op: &'static str, n: usize) -> Result<KernelArg> {
    i64::try_from(n).map(KernelArg::I64).map_err(|_| Error::shape(op, format!("{n} elements do not fit in an i64")))
}

// ---- bias + activation ---------------------------------------------------------------------------

/// `y = act(x + bias)` row-wise over `x: [rows, cols]` (`rows = x.len() / cols`), with `bias:
/// [cols]` optional and `act` `None` for the identity. When `pre` is given it receives `x + bias`
/// (the pre-activation the backward reads). Every [`Activation`] is supported; GELU is the exact
/// erf form.
pub fn bias_act(gpu: &Gpu, x: &DeviceView<'_, f32>, bias: Option<&DeviceView<'_, f32>>, act: Option<Activation>, cols: usize, y: &mut DeviceViewMut<'_, f32>, pre: Option<&mut DeviceViewMut<'_, f32>>) -> Result<()> {
    const OP: &str = "cuda::bias_act";
    let rows = bias_act_rows(OP, x.len(), bias.map(|b| b.len()), cols)?;
    expect_len(OP, "y", y.len(), x.len(), "x's length")?;
    if let Some(p) = &pre {
        expect_len(OP, "pre", p.len(), x.len(), "x's length")?;
    }
    if rows == 0 {
        return Ok(());
    }
    let args = [
        y.arg(),
        pre.as_ref().map_or(KernelArg::Null, |p| p.arg()),
        x.arg(),
        bias.map_or(KernelArg::Null, |b| b.arg()),
        KernelArg::I32(rows as i32),
        KernelArg::I32(cols as i32),
        KernelArg::I32(activation_code(act)),
    ];
    // SAFETY: x, y and pre hold rows·cols elements and bias cols (checked above).
    unsafe { gpu.launch(BIAS_ACT_FORWARD_F32, row_launch(rows), &args) }
}

/// `y = act(y + bias)` in place, `y: [rows, cols]`.
pub fn bias_act_in_place(gpu: &Gpu, y: &mut DeviceViewMut<'_, f32>, bias: Option<&DeviceView<'_, f32>>, act: Option<Activation>, cols: usize) -> Result<()> {
    const OP: &str = "cuda::bias_act_in_place";
    let rows = bias_act_rows(OP, y.len(), bias.map(|b| b.len()), cols)?;
    if rows == 0 {
        return Ok(());
    }
    // The kernel's x and y carry no __restrict__: reading and writing one element per thread
    // through the same pointer is well defined.
    let args = [
        y.arg(),
        KernelArg::Null,
        y.arg(),
        bias.map_or(KernelArg::Null, |b| b.arg()),
        KernelArg::I32(rows as i32),
        KernelArg::I32(cols as i32),
        KernelArg::I32(activation_code(act)),
    ];
    // SAFETY: y holds rows·cols elements and bias cols (checked above).
    unsafe { gpu.launch(BIAS_ACT_FORWARD_F32, row_launch(rows), &args) }
}

/// Rows of a `[rows, cols]` operand of `len` elements, with its optional `[cols]` bias checked.
fn bias_act_rows(op: &'static str, len: usize, bias: Option<usize>, cols: usize) -> Result<usize> {
    if cols == 0 {
        return Err(Error::shape(op, format!("cols must be at least 1 (x has {len} elements)")));
    }
    if !len.is_multiple_of(cols) {
        return Err(Error::shape(op, format!("x has {len} elements, not a whole number of rows of {cols} columns")));
    }
    let rows = len / cols;
    checked_matrix(op, rows, cols)?;
    if let Some(b) = bias {
        expect_len(op, "bias", b, cols, "cols")?;
    }
    Ok(rows)
}

// ---- add, fill, cast ----------------------------------------------------------------------------

/// `y = a + b` elementwise (any shape: the three lengths must agree).
pub fn add(gpu: &Gpu, a: &DeviceView<'_, f32>, b: &DeviceView<'_, f32>, y: &mut DeviceViewMut<'_, f32>) -> Result<()> {
    const OP: &str = "cuda::add";
    expect_len(OP, "b", b.len(), a.len(), "a's length")?;
    expect_len(OP, "y", y.len(), a.len(), "a's length")?;
    let n = flat_len(OP, a.len())?;
    if a.is_empty() {
        return Ok(());
    }
    // SAFETY: a, b and y hold n elements each.
    unsafe { gpu.launch(ADD_F32, flat_launch(a.len()), &[y.arg(), a.arg(), b.arg(), n]) }
}

/// Every element of `y` set to `value`.
pub fn fill_f32(gpu: &Gpu, y: &mut DeviceViewMut<'_, f32>, value: f32) -> Result<()> {
    let n = flat_len("cuda::fill_f32", y.len())?;
    if y.is_empty() {
        return Ok(());
    }
    // SAFETY: y holds n elements.
    unsafe { gpu.launch(FILL_F32, flat_launch(y.len()), &[y.arg(), KernelArg::F32(value), n]) }
}

/// Every element of `y` set to `value`.
pub fn fill_u32(gpu: &Gpu, y: &mut DeviceViewMut<'_, u32>, value: u32) -> Result<()> {
    let n = flat_len("cuda::fill_u32", y.len())?;
    if y.is_empty() {
        return Ok(());
    }
    // SAFETY: y holds n elements.
    unsafe { gpu.launch(FILL_U32, flat_launch(y.len()), &[y.arg(), KernelArg::U32(value), n]) }
}

/// Every element of `y` set to `value` rounded to bf16 (nearest even, as `half::bf16::from_f32`).
pub fn fill_bf16(gpu: &Gpu, y: &mut DeviceViewMut<'_, bf16>, value: f32) -> Result<()> {
    let n = flat_len("cuda::fill_bf16", y.len())?;
    if y.is_empty() {
        return Ok(());
    }
    let bits = KernelArg::U32(bf16::from_f32(value).to_bits() as u32);
    // SAFETY: y holds n elements.
    unsafe { gpu.launch(FILL_BF16, flat_launch(y.len()), &[bf16_bits_arg_mut(y), bits, n]) }
}

/// `y = bf16(x)`, round to nearest even: bit-exact with `half::bf16::from_f32` for every non-NaN
/// input (±inf, subnormals and overflow to inf included); NaN becomes 0x7fff (CUDA's canonical
/// bf16 NaN; `half` keeps the sign and payload).
pub fn cast_f32_to_bf16(gpu: &Gpu, x: &DeviceView<'_, f32>, y: &mut DeviceViewMut<'_, bf16>) -> Result<()> {
    const OP: &str = "cuda::cast_f32_to_bf16";
    expect_len(OP, "y", y.len(), x.len(), "x's length")?;
    let n = flat_len(OP, x.len())?;
    if x.is_empty() {
        return Ok(());
    }
    // SAFETY: x and y hold n elements each.
    unsafe { gpu.launch(CAST_F32_TO_BF16, flat_launch(x.len()), &[bf16_bits_arg_mut(y), x.arg(), n]) }
}

/// `y = f32(x)`, exact (bits shifted; a NaN keeps its payload).
pub fn cast_bf16_to_f32(gpu: &Gpu, x: &DeviceView<'_, bf16>, y: &mut DeviceViewMut<'_, f32>) -> Result<()> {
    const OP: &str = "cuda::cast_bf16_to_f32";
    expect_len(OP, "y", y.len(), x.len(), "x's length")?;
    let n = flat_len(OP, x.len())?;
    if x.is_empty() {
        return Ok(());
    }
    // SAFETY: x and y hold n elements each.
    unsafe { gpu.launch(CAST_BF16_TO_F32, flat_launch(x.len()), &[y.arg(), bf16_bits_arg(x), n]) }
}

// ---- first-token gather ---------------------------------------------------------------------------

/// `y[b, :] = x[b, 0, :]`: `x: [batch, seq_len, hidden]` → `y: [batch, hidden]` (the pooler's
/// input). `seq_len` must be at least 1 when `batch > 0`.
pub fn first_token(gpu: &Gpu, x: &DeviceView<'_, f32>, batch: usize, seq_len: usize, hidden: usize, y: &mut DeviceViewMut<'_, f32>) -> Result<()> {
    const OP: &str = "cuda::first_token";
    if seq_len == 0 && batch > 0 {
        return Err(Error::shape(OP, format!("sequence length 0 with batch {batch}: there is no first token")));
    }
    let per_seq = checked_matrix(OP, seq_len, hidden)?;
    checked_matrix(OP, batch, hidden)?;
    let total = batch.checked_mul(per_seq).ok_or_else(|| Error::shape(OP, format!("batch {batch} x seq_len {seq_len} x hidden {hidden} overflows usize")))?;
    let dims = format!("batch={batch}, seq_len={seq_len}, hidden={hidden}");
    expect_len(OP, "x", x.len(), total, &format!("batch·seq_len·hidden for {dims}"))?;
    expect_len(OP, "y", y.len(), batch * hidden, &format!("batch·hidden for {dims}"))?;
    if batch == 0 || hidden == 0 {
        return Ok(());
    }
    let args = [y.arg(), x.arg(), KernelArg::I32(batch as i32), KernelArg::I32(seq_len as i32), KernelArg::I32(hidden as i32)];
    // SAFETY: x holds batch·seq_len·hidden elements and y batch·hidden (checked above).
    unsafe { gpu.launch(FIRST_TOKEN_F32, row_launch(batch), &args) }
}

/// How many elements of `x` are NaN or ±inf (one launch and a 4-byte read; synchronises).
pub fn count_nonfinite(gpu: &Gpu, x: &DeviceView<'_, f32>) -> Result<u64> {
    let n = flat_len("cuda::count_nonfinite", x.len())?;
    if x.is_empty() {
        return Ok(0);
    }
    let mut count = gpu.alloc_zeros::<u32>(1)?;
    // SAFETY: x holds n elements and count one; the kernel's blocks are whole warps (the ballot).
    unsafe { gpu.launch(COUNT_NONFINITE_F32, flat_launch(x.len()), &[count.view_mut().arg(), x.arg(), n]) }?;
    Ok(gpu.download(&count.view())?[0] as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_shapes_cover_every_row_and_cap_the_grid() {
        assert_eq!(row_launch(1).grid_dim, (1, 1, 1));
        assert_eq!(row_launch(33).grid_dim, (5, 1, 1));
        assert_eq!(row_launch(33).block_dim, (32, 8, 1));
        assert_eq!(row_launch(usize::MAX / 2).grid_dim.0 as usize, MAX_BLOCKS);
        assert_eq!(flat_launch(257).grid_dim, (2, 1, 1));
        assert_eq!(flat_launch(1 << 40).grid_dim.0 as usize, MAX_BLOCKS);
    }

    #[test]
    fn every_activation_has_a_distinct_code() {
        let acts = [None, Some(Activation::Relu), Some(Activation::Gelu), Some(Activation::GeluNew), Some(Activation::Swish), Some(Activation::Tanh), Some(Activation::Sigmoid)];
        let codes: Vec<i32> = acts.iter().map(|&a| activation_code(a)).collect();
        assert_eq!(codes, [0, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn bias_act_shapes_are_checked() {
        assert_eq!(bias_act_rows("t", 12, Some(4), 4).unwrap(), 3);
        assert_eq!(bias_act_rows("t", 0, None, 4).unwrap(), 0);
        for (len, bias, cols) in [(12, Some(3), 4), (13, None, 4), (12, None, 0)] {
            assert!(matches!(bias_act_rows("t", len, bias, cols), Err(Error::Shape { .. })), "{len} {bias:?} {cols}");
        }
        assert!(checked_matrix("t", 1, 1 << 31).is_err());
    }
}

