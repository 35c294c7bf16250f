//! Launchers for `kernels/elementwise.cu`: bias + activation (where no GEMM epilogue does it),
//! add, fill, f32 ↔ bf16 and f32 ↔ f16 casts, and the first-token gather. The spec of each is the CPU backend
//! (`cpu::reference::activation`, `Backend::{add, fill, cast, first_token}`). The backward
//! launchers follow, after their own section note: `dy ⊙ act'`, the deterministic bias gradient,
//! the first-token scatter, and the Linear backward over [`Gpu::gemm`].
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
//! bf16 and f16 buffers reach the header-free kernels as `unsigned short*` (their raw bits): the
//! pointer argument is retyped once, by [`ActivationScalar::act_arg`] (and [`bf16_bits_arg`] /
//! [`bf16_bits_arg_mut`] for bf16).
//!
//! Activations may be stored in bf16: [`bias_act`], [`bias_act_in_place`], [`add`] and
//! [`first_token`] are generic over the [`ActivationScalar`] `A` of every operand (the bias too:
//! a frozen base's, bf16 with bf16 activations) and pick the `_f32`, `_bf16io` or `_f16io` kernel
//! by `A::DTYPE` (a storage type without a kernel would be [`Error::Unsupported`]). The bf16io and
//! f16io kernels compute in f32 from exactly widened loads and round each stored value once
//! (nearest even), so their outputs are the f32 kernels' on the widened inputs, rounded once. The
//! casts and fills exist for both 16-bit types ([`cast_from_f32`], [`cast_to_f32`],
//! [`cast_from_f32_strided`] pick by type; [`cast_f32_to_f16`] etc. are the named forms).

use cudarc::driver::LaunchConfig;
use half::{bf16, f16};

use super::gpu::{ActivationScalar, DeviceView, DeviceViewMut, Gpu, KernelArg};
use super::registry::elementwise::{
    ADD_BF16IO, ADD_F16IO, ADD_F32, BIAS_ACT_FORWARD_BF16IO, BIAS_ACT_FORWARD_F16IO, BIAS_ACT_FORWARD_F32, CAST_BF16_TO_F32, CAST_F16_TO_F32, CAST_F32_TO_BF16, CAST_F32_TO_BF16_STRIDED, CAST_F32_TO_F16,
    CAST_F32_TO_F16_STRIDED, COUNT_NONFINITE_F32, FILL_BF16, FILL_F16, FILL_F32, FILL_U32, FIRST_TOKEN_BF16IO, FIRST_TOKEN_F16IO, FIRST_TOKEN_F32,
};
use super::registry::{KernelName, ScalarType};
use crate::backend::Activation;
use crate::error::{Error, Result};
use crate::tensor::DType;

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

/// The kernel of a family `[f32, bf16io, f16io]` for activations stored as `A`.
pub(crate) fn pick_activation_kernel<A: ActivationScalar>(op: &str, [f32_kernel, bf16io_kernel, f16io_kernel]: [KernelName; 3]) -> Result<KernelName> {
    match A::DTYPE {
        DType::F32 => Ok(f32_kernel),
        DType::BF16 => Ok(bf16io_kernel),
        DType::F16 => Ok(f16io_kernel),
        other => Err(Error::Unsupported(format!("{op}: no kernel for {other} activations (there are: f32, bf16, f16)"))),
    }
}

/// The kernel of a 16-bit pair `[bf16, f16]` for `H` (a cast or fill: f32 has none).
fn pick_half_kernel<H: ActivationScalar>(op: &str, [bf16_kernel, f16_kernel]: [KernelName; 2]) -> Result<KernelName> {
    match H::DTYPE {
        DType::BF16 => Ok(bf16_kernel),
        DType::F16 => Ok(f16_kernel),
        other => Err(Error::Unsupported(format!("{op}: {other} is not a 16-bit storage type (bf16, f16)"))),
    }
}

/// `(name, address, bytes)` of `len` elements of `A`, for [`check_disjoint_bytes`].
fn act_span<A: ActivationScalar>(name: &str, ptr: u64, len: usize) -> Operand<'_> {
    (name, ptr, len * std::mem::size_of::<A>())
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
/// erf form. Every operand is of `A` (f32, or bf16: `bias_act_forward_bf16io`, where `pre` is the
/// f32 sum rounded once and `y` the activation of the unrounded sum, rounded once). `y` and `pre`
/// must not overlap each other or an input (use [`bias_act_in_place`] for `y = x`).
pub fn bias_act<A: ActivationScalar>(gpu: &Gpu, x: &DeviceView<'_, A>, bias: Option<&DeviceView<'_, A>>, act: Option<Activation>, cols: usize, y: &mut DeviceViewMut<'_, A>, pre: Option<&mut DeviceViewMut<'_, A>>) -> Result<()> {
    const OP: &str = "cuda::bias_act";
    let kernel = pick_activation_kernel::<A>(OP, [BIAS_ACT_FORWARD_F32, BIAS_ACT_FORWARD_BF16IO, BIAS_ACT_FORWARD_F16IO])?;
    let rows = bias_act_rows(OP, x.len(), bias.map(|b| b.len()), cols)?;
    expect_len(OP, "y", y.len(), x.len(), "x's length")?;
    let mut outputs = vec![act_span::<A>("y", y.device_ptr(), y.len())];
    if let Some(p) = &pre {
        expect_len(OP, "pre", p.len(), x.len(), "x's length")?;
        outputs.push(act_span::<A>("pre", p.device_ptr(), p.len()));
    }
    let mut inputs = vec![act_span::<A>("x", x.device_ptr(), x.len())];
    if let Some(b) = bias {
        inputs.push(act_span::<A>("bias", b.device_ptr(), b.len()));
    }
    check_disjoint_bytes(OP, &outputs, &inputs)?;
    if rows == 0 {
        return Ok(());
    }
    let args = [
        A::act_arg_mut(y),
        pre.as_ref().map_or(KernelArg::Null, |p| A::act_arg_mut(p)),
        A::act_arg(x),
        bias.map_or(KernelArg::Null, A::act_arg),
        KernelArg::I32(rows as i32),
        KernelArg::I32(cols as i32),
        KernelArg::I32(activation_code(act)),
    ];
    // SAFETY: x, y and pre hold rows·cols elements and bias cols, and no output overlaps another
    // operand (checked above).
    unsafe { gpu.launch(kernel, row_launch(rows), &args) }
}

/// `y = act(y + bias)` in place, `y: [rows, cols]`, every operand of `A` (f32 or bf16); `bias`
/// must not overlap `y`.
pub fn bias_act_in_place<A: ActivationScalar>(gpu: &Gpu, y: &mut DeviceViewMut<'_, A>, bias: Option<&DeviceView<'_, A>>, act: Option<Activation>, cols: usize) -> Result<()> {
    const OP: &str = "cuda::bias_act_in_place";
    let kernel = pick_activation_kernel::<A>(OP, [BIAS_ACT_FORWARD_F32, BIAS_ACT_FORWARD_BF16IO, BIAS_ACT_FORWARD_F16IO])?;
    let rows = bias_act_rows(OP, y.len(), bias.map(|b| b.len()), cols)?;
    if let Some(b) = bias {
        check_disjoint_bytes(OP, &[act_span::<A>("y", y.device_ptr(), y.len())], &[act_span::<A>("bias", b.device_ptr(), b.len())])?;
    }
    if rows == 0 {
        return Ok(());
    }
    // The kernel's x and y carry no __restrict__: reading and writing one element per thread
    // through the same pointer is well defined.
    let args = [
        A::act_arg_mut(y),
        KernelArg::Null,
        A::act_arg_mut(y),
        bias.map_or(KernelArg::Null, A::act_arg),
        KernelArg::I32(rows as i32),
        KernelArg::I32(cols as i32),
        KernelArg::I32(activation_code(act)),
    ];
    // SAFETY: y holds rows·cols elements and bias cols, bias apart from y (checked above).
    unsafe { gpu.launch(kernel, row_launch(rows), &args) }
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

/// `y = a + b` elementwise (any shape: the three lengths must agree), every operand of `A` (f32,
/// or bf16: `add_bf16io`, the f32 sum rounded once). `y` may be `a` or `b` itself (the same
/// elements: each is read, then written, by one thread), but not overlap either otherwise.
pub fn add<A: ActivationScalar>(gpu: &Gpu, a: &DeviceView<'_, A>, b: &DeviceView<'_, A>, y: &mut DeviceViewMut<'_, A>) -> Result<()> {
    const OP: &str = "cuda::add";
    let kernel = pick_activation_kernel::<A>(OP, [ADD_F32, ADD_BF16IO, ADD_F16IO])?;
    expect_len(OP, "b", b.len(), a.len(), "a's length")?;
    expect_len(OP, "y", y.len(), a.len(), "a's length")?;
    let n = flat_len(OP, a.len())?;
    // The same range as y is in place; any other overlap would let one thread read what another
    // has written.
    let out = act_span::<A>("y", y.device_ptr(), y.len());
    let partial: Vec<Operand<'_>> = [act_span::<A>("a", a.device_ptr(), a.len()), act_span::<A>("b", b.device_ptr(), b.len())].into_iter().filter(|i| i.1 != out.1).collect();
    check_disjoint_bytes(OP, &[out], &partial)?;
    if a.is_empty() {
        return Ok(());
    }
    // SAFETY: a, b and y hold n elements each; y is a, b or apart from both (checked above).
    unsafe { gpu.launch(kernel, flat_launch(a.len()), &[A::act_arg_mut(y), A::act_arg(a), A::act_arg(b), n]) }
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
    fill_16bit(gpu, y, bf16::from_f32(value).to_bits())
}

/// Every element of `y` set to `value` rounded to f16 (nearest even, as `half::f16::from_f32`:
/// beyond ±65504 that is ±inf).
pub fn fill_f16(gpu: &Gpu, y: &mut DeviceViewMut<'_, f16>, value: f32) -> Result<()> {
    fill_16bit(gpu, y, f16::from_f32(value).to_bits())
}

/// Every element of a 16-bit `y` set to `bits`.
fn fill_16bit<H: ActivationScalar>(gpu: &Gpu, y: &mut DeviceViewMut<'_, H>, bits: u16) -> Result<()> {
    const OP: &str = "cuda::fill_half";
    let kernel = pick_half_kernel::<H>(OP, [FILL_BF16, FILL_F16])?;
    let n = flat_len(OP, y.len())?;
    if y.is_empty() {
        return Ok(());
    }
    // SAFETY: y holds n 16-bit elements, the kernel's type.
    unsafe { gpu.launch(kernel, flat_launch(y.len()), &[H::act_arg_mut(y), KernelArg::U32(bits as u32), n]) }
}

/// `y = bf16(x)`, round to nearest even: bit-exact with `half::bf16::from_f32` for every non-NaN
/// input (±inf, subnormals and overflow to inf included); NaN becomes 0x7fff (CUDA's canonical
/// bf16 NaN; `half` keeps the sign and payload).
pub fn cast_f32_to_bf16(gpu: &Gpu, x: &DeviceView<'_, f32>, y: &mut DeviceViewMut<'_, bf16>) -> Result<()> {
    cast_from_f32(gpu, x, y)
}

/// `y = f16(x)`, round to nearest even: bit-exact with `half::f16::from_f32` for every non-NaN
/// input (|x| ≥ 65520 to ±inf, subnormals below 2^-14, ±0 at |x| ≤ 2^-25); NaN becomes 0x7fff
/// (CUDA's canonical f16 NaN).
pub fn cast_f32_to_f16(gpu: &Gpu, x: &DeviceView<'_, f32>, y: &mut DeviceViewMut<'_, f16>) -> Result<()> {
    cast_from_f32(gpu, x, y)
}

/// [`cast_f32_to_bf16`] or [`cast_f32_to_f16`] by `H` (`cast_f32_to_bf16` / `cast_f32_to_f16`).
pub fn cast_from_f32<H: ActivationScalar>(gpu: &Gpu, x: &DeviceView<'_, f32>, y: &mut DeviceViewMut<'_, H>) -> Result<()> {
    const OP: &str = "cuda::cast_from_f32";
    let kernel = pick_half_kernel::<H>(OP, [CAST_F32_TO_BF16, CAST_F32_TO_F16])?;
    expect_len(OP, "y", y.len(), x.len(), "x's length")?;
    let n = flat_len(OP, x.len())?;
    if x.is_empty() {
        return Ok(());
    }
    // SAFETY: x and y hold n elements each, y of the kernel's type.
    unsafe { gpu.launch(kernel, flat_launch(x.len()), &[H::act_arg_mut(y), x.arg(), n]) }
}

/// Where a strided batch of column-major matrices lies in a buffer: element (r, c, b) of the
/// `rows × cols` matrices is at `b·batch_stride + c·ld + r` (cuBLASLt's layout of C).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StridedMatrices {
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    pub batch: usize,
    pub batch_stride: usize,
}

impl StridedMatrices {
    /// Elements from the first to one past the last element (0 when any size is 0), or `None`
    /// on overflow.
    pub fn span(&self) -> Option<usize> {
        if self.rows == 0 || self.cols == 0 || self.batch == 0 {
            return Some(0);
        }
        (self.batch - 1).checked_mul(self.batch_stride)?.checked_add((self.cols - 1).checked_mul(self.ld)?)?.checked_add(self.rows)
    }
}

/// [`cast_f32_to_bf16`] over the elements of `layout` only: x and y share the layout, and
/// elements of y between columns (`ld > rows`) or between batches keep their bits. Both views
/// must hold at least the layout's span; `rows <= ld` ([`Error::Shape`] otherwise).
pub fn cast_f32_to_bf16_strided(gpu: &Gpu, x: &DeviceView<'_, f32>, y: &mut DeviceViewMut<'_, bf16>, layout: StridedMatrices) -> Result<()> {
    cast_from_f32_strided(gpu, x, y, layout)
}

/// [`cast_f32_to_bf16_strided`] or its f16 twin (`cast_f32_to_f16_strided`) by `H`.
pub fn cast_from_f32_strided<H: ActivationScalar>(gpu: &Gpu, x: &DeviceView<'_, f32>, y: &mut DeviceViewMut<'_, H>, layout: StridedMatrices) -> Result<()> {
    const OP: &str = "cuda::cast_from_f32_strided";
    let kernel = pick_half_kernel::<H>(OP, [CAST_F32_TO_BF16_STRIDED, CAST_F32_TO_F16_STRIDED])?;
    let StridedMatrices { rows, cols, ld, batch, batch_stride } = layout;
    if rows > ld {
        return Err(Error::shape(OP, format!("rows = {rows} exceed the leading dimension ld = {ld}")));
    }
    let span = layout.span().ok_or_else(|| Error::shape(OP, format!("{layout:?}: the span overflows usize")))?;
    for (name, len) in [("x", x.len()), ("y", y.len())] {
        if len < span {
            return Err(Error::shape(OP, format!("{name} has {len} elements, the layout {layout:?} spans {span}")));
        }
    }
    let count = rows.checked_mul(cols).and_then(|v| v.checked_mul(batch)).ok_or_else(|| Error::shape(OP, format!("{layout:?}: the element count overflows usize")))?;
    if count == 0 {
        return Ok(());
    }
    flat_len(OP, span)?;
    let arg = |v: usize| KernelArg::I64(v as i64); // each is at most the span, which fits an i64
    // SAFETY: x and y hold the span; the kernel touches only elements of the layout.
    unsafe {
        gpu.launch(
            kernel,
            flat_launch(count),
            &[H::act_arg_mut(y), x.arg(), arg(rows), arg(cols), arg(ld), arg(batch), arg(batch_stride)],
        )
    }
}

/// `y = f32(x)`, exact (bits shifted; a NaN keeps its payload).
pub fn cast_bf16_to_f32(gpu: &Gpu, x: &DeviceView<'_, bf16>, y: &mut DeviceViewMut<'_, f32>) -> Result<()> {
    cast_to_f32(gpu, x, y)
}

/// `y = f32(x)`, exact (subnormals included; a NaN keeps its sign and payload, shifted).
pub fn cast_f16_to_f32(gpu: &Gpu, x: &DeviceView<'_, f16>, y: &mut DeviceViewMut<'_, f32>) -> Result<()> {
    cast_to_f32(gpu, x, y)
}

/// [`cast_bf16_to_f32`] or [`cast_f16_to_f32`] by `H`.
pub fn cast_to_f32<H: ActivationScalar>(gpu: &Gpu, x: &DeviceView<'_, H>, y: &mut DeviceViewMut<'_, f32>) -> Result<()> {
    const OP: &str = "cuda::cast_to_f32";
    let kernel = pick_half_kernel::<H>(OP, [CAST_BF16_TO_F32, CAST_F16_TO_F32])?;
    expect_len(OP, "y", y.len(), x.len(), "x's length")?;
    let n = flat_len(OP, x.len())?;
    if x.is_empty() {
        return Ok(());
    }
    // SAFETY: x and y hold n elements each, x of the kernel's type.
    unsafe { gpu.launch(kernel, flat_launch(x.len()), &[y.arg(), H::act_arg(x), n]) }
}

// ---- first-token gather ---------------------------------------------------------------------------

/// `y[b, :] = x[b, 0, :]`: `x: [batch, seq_len, hidden]` → `y: [batch, hidden]` (the pooler's
/// input), both of `A` (f32, or bf16: `first_token_bf16io`, an exact copy but for NaN payloads,
/// which become 0x7fff); `y` must not overlap `x`. `seq_len` must be at least 1 when `batch > 0`.
pub fn first_token<A: ActivationScalar>(gpu: &Gpu, x: &DeviceView<'_, A>, batch: usize, seq_len: usize, hidden: usize, y: &mut DeviceViewMut<'_, A>) -> Result<()> {
    const OP: &str = "cuda::first_token";
    let kernel = pick_activation_kernel::<A>(OP, [FIRST_TOKEN_F32, FIRST_TOKEN_BF16IO, FIRST_TOKEN_F16IO])?;
    if seq_len == 0 && batch > 0 {
        return Err(Error::shape(OP, format!("sequence length 0 with batch {batch}: there is no first token")));
    }
    let per_seq = checked_matrix(OP, seq_len, hidden)?;
    checked_matrix(OP, batch, hidden)?;
    let total = batch.checked_mul(per_seq).ok_or_else(|| Error::shape(OP, format!("batch {batch} x seq_len {seq_len} x hidden {hidden} overflows usize")))?;
    let dims = format!("batch={batch}, seq_len={seq_len}, hidden={hidden}");
    expect_len(OP, "x", x.len(), total, &format!("batch·seq_len·hidden for {dims}"))?;
    expect_len(OP, "y", y.len(), batch * hidden, &format!("batch·hidden for {dims}"))?;
    check_disjoint_bytes(OP, &[act_span::<A>("y", y.device_ptr(), y.len())], &[act_span::<A>("x", x.device_ptr(), x.len())])?;
    if batch == 0 || hidden == 0 {
        return Ok(());
    }
    let args = [A::act_arg_mut(y), A::act_arg(x), KernelArg::I32(batch as i32), KernelArg::I32(seq_len as i32), KernelArg::I32(hidden as i32)];
    // SAFETY: x holds batch·seq_len·hidden elements and y batch·hidden, apart (checked above).
    unsafe { gpu.launch(kernel, row_launch(batch), &args) }
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

// ---- backward: activation, bias gradient, first-token scatter, linear --------------------------------
//
// The spec of each is the CPU backend: `cpu::reference::activation_backward`,
// `Backend::linear_backward_{input_into, input_act, params_into}` and
// `Backend::first_token_backward_into`. Destinations are written, or added to when `accumulate`
// (a GEMM with beta = 1 for the products). Every length is checked before anything is enqueued;
// an output that overlaps an input (other than `dx == dy` in place) is refused.
//
// bf16 activations: the activation backward, the bias gradient's input and the first-token
// scatter are generic over the [`ActivationScalar`] `A` of their activation operands and pick the
// `_f32` or `_bf16io` kernel by `A::DTYPE` (the same bodies: exact widening, f32 arithmetic, each
// bf16 store rounded once). Bias gradients stay f32 (trainable biases have f32 master copies; see
// the kernel header). [`activation_backward`] and [`first_token_backward`] keep f32 signatures,
// which callers typed by inference rely on; [`activation_backward_as`] and
// [`first_token_backward_as`] are the generic launchers behind them.

use super::gemm::{Gemm, GemmScalar, OutputType, Transpose};
use super::registry::elementwise::{
    ACTIVATION_BACKWARD_BF16IO, ACTIVATION_BACKWARD_F16IO, ACTIVATION_BACKWARD_F32, COLUMN_SUMS_FINALIZE_F32, COLUMN_SUMS_PARTIAL_BF16IO, COLUMN_SUMS_PARTIAL_F16IO, COLUMN_SUMS_PARTIAL_F32,
    FIRST_TOKEN_BACKWARD_BF16IO, FIRST_TOKEN_BACKWARD_F16IO, FIRST_TOKEN_BACKWARD_F32,
};

/// Rows per chunk of a column sum are at least this many (8 per row lane of a block).
pub const MIN_ROWS_PER_CHUNK: usize = 64;
/// A column sum has at most this many chunks (the second stage adds them in order).
pub const MAX_COLUMN_CHUNKS: usize = 512;

/// How a deterministic column sum over `rows` rows is split: stage one sums each chunk of
/// `rows_per_chunk` rows into a workspace row, stage two adds the `chunks` rows in order. It
/// depends on `rows` only, so the result's bits do not depend on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnChunks {
    pub rows_per_chunk: usize,
    pub chunks: usize,
}

impl ColumnChunks {
    /// At least [`MIN_ROWS_PER_CHUNK`] rows per chunk (a multiple of 8), at most
    /// [`MAX_COLUMN_CHUNKS`] chunks; 0 chunks for 0 rows.
    pub fn for_rows(rows: usize) -> ColumnChunks {
        let rows_per_chunk = rows.div_ceil(MAX_COLUMN_CHUNKS).max(MIN_ROWS_PER_CHUNK).next_multiple_of(8);
        ColumnChunks { rows_per_chunk, chunks: rows.div_ceil(rows_per_chunk) }
    }

    /// Workspace floats for one sum over `cols` columns: `chunks · cols`.
    pub fn workspace_len(&self, cols: usize) -> usize {
        self.chunks.saturating_mul(cols)
    }

    /// Stage one's launch: blocks of (32, 8), grid (ceil(cols / 32), chunks); `chunks > 0`.
    pub(crate) fn partial_launch(&self, cols: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (cols.div_ceil(32) as u32, self.chunks as u32, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 }
    }
}

/// Stage two's launch: a thread per column, 256 per block; `cols > 0`.
pub(crate) fn finalize_launch(cols: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (cols.div_ceil(FLAT_THREADS) as u32, 1, 1), block_dim: (FLAT_THREADS as u32, 1, 1), shared_mem_bytes: 0 }
}

/// The workspace floats [`bias_grad`] needs for `dy: [rows, cols]`.
pub fn bias_grad_workspace_len(rows: usize, cols: usize) -> usize {
    ColumnChunks::for_rows(rows).workspace_len(cols)
}

/// A device byte range, for the overlap checks: `(name, address, elements)` of f32s
/// ([`check_disjoint`]) or `(name, address, bytes)` ([`check_disjoint_bytes`]).
pub(crate) type Operand<'n> = (&'n str, u64, usize);

/// `Err(Input)` when an output's bytes overlap another output's or an input's (empty operands
/// overlap nothing). Kernels take their operands `__restrict__`; an alias would be a data race.
pub(crate) fn check_disjoint(op: &'static str, outputs: &[Operand<'_>], inputs: &[Operand<'_>]) -> Result<()> {
    disjoint(op, outputs, inputs, 4)
}

/// As [`check_disjoint`] with each operand's extent in bytes (operands of 2-byte bf16 beside f32).
pub(crate) fn check_disjoint_bytes(op: &'static str, outputs: &[Operand<'_>], inputs: &[Operand<'_>]) -> Result<()> {
    disjoint(op, outputs, inputs, 1)
}

/// The overlap check over extents of `unit` bytes each.
fn disjoint(op: &'static str, outputs: &[Operand<'_>], inputs: &[Operand<'_>], unit: u64) -> Result<()> {
    let overlaps = |a: &Operand<'_>, b: &Operand<'_>| a.2 > 0 && b.2 > 0 && a.1 < b.1 + unit * b.2 as u64 && b.1 < a.1 + unit * a.2 as u64;
    for (i, out) in outputs.iter().enumerate() {
        if let Some(other) = outputs[..i].iter().chain(inputs).find(|o| overlaps(out, o)) {
            return Err(Error::Input(format!("{op}: the output `{}` overlaps `{}`", out.0, other.0)));
        }
    }
    Ok(())
}

/// `dx = dy ⊙ act'(pre)` elementwise (any shape; the three lengths must agree), `act` `None` for
/// the identity, f32 operands (see [`activation_backward_as`] for bf16). `dx` must not overlap
/// `dy` or `pre` (see [`activation_backward_in_place`]).
pub fn activation_backward(gpu: &Gpu, dy: &DeviceView<'_, f32>, pre: &DeviceView<'_, f32>, act: Option<Activation>, dx: &mut DeviceViewMut<'_, f32>) -> Result<()> {
    activation_backward_as(gpu, dy, pre, act, dx)
}

/// [`activation_backward`] with every operand of `A` (f32, or bf16: `activation_backward_bf16io`,
/// `dy·act'(pre)` in f32 from the widened operands, rounded once).
pub fn activation_backward_as<A: ActivationScalar>(gpu: &Gpu, dy: &DeviceView<'_, A>, pre: &DeviceView<'_, A>, act: Option<Activation>, dx: &mut DeviceViewMut<'_, A>) -> Result<()> {
    const OP: &str = "cuda::activation_backward";
    let kernel = pick_activation_kernel::<A>(OP, [ACTIVATION_BACKWARD_F32, ACTIVATION_BACKWARD_BF16IO, ACTIVATION_BACKWARD_F16IO])?;
    expect_len(OP, "pre", pre.len(), dy.len(), "dy's length")?;
    expect_len(OP, "dx", dx.len(), dy.len(), "dy's length")?;
    check_disjoint_bytes(OP, &[act_span::<A>("dx", dx.device_ptr(), dx.len())], &[act_span::<A>("dy", dy.device_ptr(), dy.len()), act_span::<A>("pre", pre.device_ptr(), pre.len())])?;
    let n = flat_len(OP, dy.len())?;
    if dy.is_empty() {
        return Ok(());
    }
    let args = [A::act_arg_mut(dx), A::act_arg(dy), A::act_arg(pre), n, KernelArg::I32(activation_code(act))];
    // SAFETY: dx, dy and pre hold n elements of A each (the kernel's type, picked above) and dx
    // overlaps neither input.
    unsafe { gpu.launch(kernel, flat_launch(dy.len()), &args) }
}

/// `d = d ⊙ act'(pre)` in place (the input gradient of a Linear, then its activation's); f32 or
/// bf16 operands as in [`activation_backward_as`].
pub fn activation_backward_in_place<A: ActivationScalar>(gpu: &Gpu, d: &mut DeviceViewMut<'_, A>, pre: &DeviceView<'_, A>, act: Option<Activation>) -> Result<()> {
    const OP: &str = "cuda::activation_backward_in_place";
    let kernel = pick_activation_kernel::<A>(OP, [ACTIVATION_BACKWARD_F32, ACTIVATION_BACKWARD_BF16IO, ACTIVATION_BACKWARD_F16IO])?;
    expect_len(OP, "pre", pre.len(), d.len(), "d's length")?;
    check_disjoint_bytes(OP, &[act_span::<A>("d", d.device_ptr(), d.len())], &[act_span::<A>("pre", pre.device_ptr(), pre.len())])?;
    let n = flat_len(OP, d.len())?;
    if d.is_empty() {
        return Ok(());
    }
    // The kernel's dx and dy carry no __restrict__: each thread reads then writes its own element.
    let args = [A::act_arg_mut(d), A::act_arg_mut(d), A::act_arg(pre), n, KernelArg::I32(activation_code(act))];
    // SAFETY: d and pre hold n elements of A each and do not overlap.
    unsafe { gpu.launch(kernel, flat_launch(d.len()), &args) }
}

/// `db = Σ_rows dy` (or `db += Σ_rows dy` when `accumulate`) for `dy: [rows, cols]`
/// (`rows = dy.len() / cols`), deterministically in two launches through `workspace` (at least
/// [`bias_grad_workspace_len`] floats; its contents are scratch). `dy` is f32 or bf16
/// (`column_sums_partial_bf16io`: the f32 kernel's sums of the widened values, bit for bit);
/// `db` and the workspace are f32.
pub fn bias_grad<A: ActivationScalar>(gpu: &Gpu, dy: &DeviceView<'_, A>, cols: usize, db: &mut DeviceViewMut<'_, f32>, accumulate: bool, workspace: &mut DeviceViewMut<'_, f32>) -> Result<()> {
    const OP: &str = "cuda::bias_grad";
    pick_activation_kernel::<A>(OP, [COLUMN_SUMS_PARTIAL_F32, COLUMN_SUMS_PARTIAL_BF16IO, COLUMN_SUMS_PARTIAL_F16IO])?;
    let rows = bias_act_rows(OP, dy.len(), None, cols)?;
    expect_len(OP, "db", db.len(), cols, "cols")?;
    let plan = ColumnChunks::for_rows(rows);
    let need = plan.workspace_len(cols);
    if workspace.len() < need {
        return Err(Error::shape(OP, format!("workspace has {} elements, at least {need} needed (chunks {} x cols {cols}) for rows={rows}", workspace.len(), plan.chunks)));
    }
    let ws = ("workspace", workspace.device_ptr(), 4 * need);
    check_disjoint_bytes(OP, &[("db", db.device_ptr(), 4 * db.len()), ws], &[act_span::<A>("dy", dy.device_ptr(), dy.len())])?;
    column_sums(gpu, dy, rows, cols, plan, workspace, db, accumulate)
}

/// The two stages of a column sum over `x` of `A` into f32; every size checked by the caller.
#[allow(clippy::too_many_arguments)] // the sum's input, shape and plan, its workspace and output
fn column_sums<A: ActivationScalar>(gpu: &Gpu, x: &DeviceView<'_, A>, rows: usize, cols: usize, plan: ColumnChunks, workspace: &mut DeviceViewMut<'_, f32>, out: &mut DeviceViewMut<'_, f32>, accumulate: bool) -> Result<()> {
    const OP: &str = "cuda::column_sums";
    let partial = pick_activation_kernel::<A>(OP, [COLUMN_SUMS_PARTIAL_F32, COLUMN_SUMS_PARTIAL_BF16IO, COLUMN_SUMS_PARTIAL_F16IO])?;
    if cols == 0 {
        return Ok(());
    }
    if plan.chunks > 0 {
        let args = [workspace.arg(), A::act_arg(x), KernelArg::I32(rows as i32), KernelArg::I32(cols as i32), KernelArg::I32(plan.rows_per_chunk as i32)];
        // SAFETY: x holds rows·cols elements of A (the kernel's type), the workspace at least
        // chunks·cols (checked by the caller), and the grid covers exactly the chunks and column
        // tiles.
        unsafe { gpu.launch(partial, plan.partial_launch(cols), &args) }?;
    }
    let args = [out.arg(), KernelArg::Null, workspace.arg(), KernelArg::Null, KernelArg::I32(plan.chunks as i32), KernelArg::I32(cols as i32), KernelArg::I32(accumulate as i32)];
    // SAFETY: out holds cols elements and the workspace chunks·cols.
    unsafe { gpu.launch(COLUMN_SUMS_FINALIZE_F32, finalize_launch(cols), &args) }
}

/// The adjoint of [`first_token`]: `out: [batch, seq_len, hidden]` receives `d: [batch, hidden]`
/// at position 0 of each sequence and zeros elsewhere, or, when `accumulate`, `d` added at
/// position 0 and every other position left as it is. f32 operands (see
/// [`first_token_backward_as`] for bf16).
pub fn first_token_backward(gpu: &Gpu, d: &DeviceView<'_, f32>, batch: usize, seq_len: usize, hidden: usize, out: &mut DeviceViewMut<'_, f32>, accumulate: bool) -> Result<()> {
    first_token_backward_as(gpu, d, batch, seq_len, hidden, out, accumulate)
}

/// [`first_token_backward`] with `d` and `out` of `A` (f32, or bf16: `first_token_backward_bf16io`,
/// the copy and zeros exact, `+=` the f32 sum of the widened values rounded once).
pub fn first_token_backward_as<A: ActivationScalar>(gpu: &Gpu, d: &DeviceView<'_, A>, batch: usize, seq_len: usize, hidden: usize, out: &mut DeviceViewMut<'_, A>, accumulate: bool) -> Result<()> {
    const OP: &str = "cuda::first_token_backward";
    let kernel = pick_activation_kernel::<A>(OP, [FIRST_TOKEN_BACKWARD_F32, FIRST_TOKEN_BACKWARD_BF16IO, FIRST_TOKEN_BACKWARD_F16IO])?;
    if seq_len == 0 && batch > 0 {
        return Err(Error::shape(OP, format!("sequence length 0 with batch {batch}: there is no first token")));
    }
    let per_seq = checked_matrix(OP, seq_len, hidden)?;
    checked_matrix(OP, batch, hidden)?;
    let total = batch.checked_mul(per_seq).ok_or_else(|| Error::shape(OP, format!("batch {batch} x seq_len {seq_len} x hidden {hidden} overflows usize")))?;
    let dims = format!("batch={batch}, seq_len={seq_len}, hidden={hidden}");
    expect_len(OP, "d", d.len(), batch * hidden, &format!("batch·hidden for {dims}"))?;
    expect_len(OP, "out", out.len(), total, &format!("batch·seq_len·hidden for {dims}"))?;
    check_disjoint_bytes(OP, &[act_span::<A>("out", out.device_ptr(), out.len())], &[act_span::<A>("d", d.device_ptr(), d.len())])?;
    if total == 0 {
        return Ok(());
    }
    let rows = if accumulate { batch } else { batch * seq_len };
    let args = [A::act_arg_mut(out), A::act_arg(d), KernelArg::I32(batch as i32), KernelArg::I32(seq_len as i32), KernelArg::I32(hidden as i32), KernelArg::I32(accumulate as i32)];
    // SAFETY: out holds batch·seq_len·hidden elements of A and d batch·hidden (checked above), the
    // kernel's type (picked above); the kernel's 64-bit row indices cover batch·seq_len rows.
    unsafe { gpu.launch(kernel, row_launch(rows), &args) }
}

/// The sizes of a Linear `y[rows, d_out] = x[rows, d_in]·Wᵀ + b`, `W: [d_out, d_in]` (HF layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearDims {
    pub rows: usize,
    pub d_in: usize,
    pub d_out: usize,
}

impl LinearDims {
    /// `rows·d_in`, `rows·d_out` and `d_out·d_in`, refused when one overflows.
    fn lens(&self, op: &'static str) -> Result<(usize, usize, usize)> {
        let LinearDims { rows, d_in, d_out } = *self;
        let mul = |a: usize, b: usize| a.checked_mul(b).ok_or_else(|| Error::shape(op, format!("rows={rows}, d_in={d_in}, d_out={d_out}: {a} x {b} overflows usize")));
        Ok((mul(rows, d_in)?, mul(rows, d_out)?, mul(d_out, d_in)?))
    }
}

/// `dx = dy·W` (or `dx += dy·W` when `accumulate`: the GEMM's beta = 1), the input gradient of a
/// Linear: `dy: [rows, d_out]`, `w: [d_out, d_in]`, `dx: [rows, d_in]`.
///
/// Column-major (see [`super::gemm`]): `dxᵀ (d_in × rows) = Wᵀ (d_in × d_out) · dyᵀ (d_out × rows)`,
/// where the row-major W, dy and dx are, as stored, exactly the column-major Wᵀ (ld d_in), dyᵀ
/// (ld d_out) and dxᵀ (ld d_in): no transpose, m = d_in, n = rows, k = d_out.
///
/// Generic over the storage `A` of all three (f32, or bf16 for bf16 training over a bf16 base:
/// the tensor-core product with f32 accumulation, `dx` rounded once; with `accumulate` the sum
/// `dx + dy·W` is formed in f32 before that one rounding, see [`Gpu::gemm`]).
pub fn linear_backward_input<A: ActivationScalar + GemmScalar>(gpu: &Gpu, dy: &DeviceView<'_, A>, w: &DeviceView<'_, A>, dims: LinearDims, dx: &mut DeviceViewMut<'_, A>, accumulate: bool) -> Result<()> {
    const OP: &str = "cuda::linear_backward_input";
    let (n_x, n_y, n_w) = dims.lens(OP)?;
    let what = format!("for rows={}, d_in={}, d_out={}", dims.rows, dims.d_in, dims.d_out);
    expect_len(OP, "dy", dy.len(), n_y, &format!("rows·d_out {what}"))?;
    expect_len(OP, "w", w.len(), n_w, &format!("d_out·d_in {what}"))?;
    expect_len(OP, "dx", dx.len(), n_x, &format!("rows·d_in {what}"))?;
    check_disjoint_bytes(OP, &[act_span::<A>("dx", dx.device_ptr(), dx.len())], &[act_span::<A>("dy", dy.device_ptr(), dy.len()), act_span::<A>("w", w.device_ptr(), w.len())])?;
    let g = Gemm::new(Transpose::No, Transpose::No, dims.d_in, dims.rows, dims.d_out);
    if accumulate && A::DTYPE != DType::F32 {
        // A 16-bit dx += dy·W: the product with an f32 D, then one pass adds it to dx and rounds
        // once (cuBLASLt's beta·C into a 16-bit D rounds before adding; staging dx through f32
        // for it took three passes).
        let mut product = gpu.alloc::<f32>(dx.len())?;
        gpu.gemm(&g.with_types(A::INPUT, OutputType::F32), w, dy, &mut product.view_mut(), None)?;
        return accumulate_f32::<A>(gpu, dx, &product.view());
    }
    gpu.gemm(&g.with_scalars(1.0, if accumulate { 1.0 } else { 0.0 }).with_types(A::INPUT, A::OUTPUT), w, dy, dx, None)
}

/// `dx = (dy·W) ⊙ act'(pre)`: the input gradient of a Linear followed by its activation's
/// (`Backend::linear_backward_input_act`), `pre: [rows, d_in]` the saved pre-activation. Written,
/// never accumulated: the product lands in `dx`, then one elementwise pass multiplies in place.
#[allow(clippy::too_many_arguments)] // linear_backward_input's operands plus the pre-activation and activation
/// With bf16 storage the product is rounded to bf16 before the activation's derivative is
/// applied (one more rounding), as a plain bf16 model's matmul backward then GELU backward does.
pub fn linear_backward_input_act<A: ActivationScalar + GemmScalar>(gpu: &Gpu, dy: &DeviceView<'_, A>, w: &DeviceView<'_, A>, pre: &DeviceView<'_, A>, act: Option<Activation>, dims: LinearDims, dx: &mut DeviceViewMut<'_, A>) -> Result<()> {
    const OP: &str = "cuda::linear_backward_input_act";
    let (n_x, _, _) = dims.lens(OP)?;
    expect_len(OP, "pre", pre.len(), n_x, &format!("rows·d_in for rows={}, d_in={}", dims.rows, dims.d_in))?;
    check_disjoint_bytes(OP, &[act_span::<A>("dx", dx.device_ptr(), dx.len())], &[act_span::<A>("pre", pre.device_ptr(), pre.len())])?;
    linear_backward_input(gpu, dy, w, dims, dx, false)?;
    activation_backward_in_place(gpu, dx, pre, act)
}

/// The parameter-gradient destinations of a Linear: `dw: [d_out, d_in]`, the optional
/// `db: [d_out]` with the `workspace` its column sum needs (at least
/// [`bias_grad_workspace_len`]`(rows, d_out)` floats), written or, when `accumulate`, added to.
pub struct LinearParamGrads<'a> {
    pub dw: DeviceViewMut<'a, f32>,
    pub db: Option<DeviceViewMut<'a, f32>>,
    pub workspace: Option<DeviceViewMut<'a, f32>>,
    pub accumulate: bool,
}

/// `dW = dyᵀ·x` and `db = Σ_rows dy` (`Backend::linear_backward_params_into`): `dy: [rows, d_out]`,
/// `x: [rows, d_in]`.
///
/// Column-major: `dWᵀ (d_in × d_out) = xᵀ (d_in × rows) · dy (rows × d_out)`, where the row-major x
/// is the column-major xᵀ (ld d_in), the row-major dy is the column-major dyᵀ (ld d_out), used
/// transposed, and the row-major dW is the column-major dWᵀ (ld d_in): m = d_in, n = d_out,
/// k = rows, B transposed; beta = 1 when accumulating. `rows = 0` gives zeros (an empty sum).
pub fn linear_backward_params(gpu: &Gpu, dy: &DeviceView<'_, f32>, x: &DeviceView<'_, f32>, dims: LinearDims, grads: &mut LinearParamGrads<'_>) -> Result<()> {
    const OP: &str = "cuda::linear_backward_params";
    let (n_x, n_y, n_w) = dims.lens(OP)?;
    let what = format!("for rows={}, d_in={}, d_out={}", dims.rows, dims.d_in, dims.d_out);
    expect_len(OP, "dy", dy.len(), n_y, &format!("rows·d_out {what}"))?;
    expect_len(OP, "x", x.len(), n_x, &format!("rows·d_in {what}"))?;
    expect_len(OP, "dw", grads.dw.len(), n_w, &format!("d_out·d_in {what}"))?;
    let plan = ColumnChunks::for_rows(dims.rows);
    let mut outputs = vec![("dw", grads.dw.device_ptr(), grads.dw.len())];
    if let Some(db) = &grads.db {
        expect_len(OP, "db", db.len(), dims.d_out, &format!("d_out {what}"))?;
        checked_matrix(OP, dims.rows, dims.d_out)?; // the column sum's int sizes
        let need = plan.workspace_len(dims.d_out);
        let ws = grads.workspace.as_ref().ok_or_else(|| Error::shape(OP, format!("db needs a workspace of at least {need} elements {what}; none given")))?;
        if ws.len() < need {
            return Err(Error::shape(OP, format!("workspace has {} elements, at least {need} needed (chunks {} x d_out {}) {what}", ws.len(), plan.chunks, dims.d_out)));
        }
        outputs.push(("db", db.device_ptr(), db.len()));
        outputs.push(("workspace", ws.device_ptr(), need));
    }
    check_disjoint(OP, &outputs, &[("dy", dy.device_ptr(), dy.len()), ("x", x.device_ptr(), x.len())])?;
    let beta = if grads.accumulate { 1.0 } else { 0.0 };
    let g = Gemm::new(Transpose::No, Transpose::Yes, dims.d_in, dims.d_out, dims.rows).with_scalars(1.0, beta);
    gpu.gemm(&g, x, dy, &mut grads.dw, None)?;
    if let (Some(db), Some(ws)) = (grads.db.as_mut(), grads.workspace.as_mut()) {
        column_sums(gpu, dy, dims.rows, dims.d_out, plan, ws, db, grads.accumulate)?;
    }
    Ok(())
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


// ---- dropout ----------------------------------------------------------------------------------------
//
// The spec is `crate::train::dropout` (Philox4x32-10, the integer threshold) as the CPU backend
// applies a `DropoutSpec`: a tensor's elements split evenly into `streams.len()` blocks, block j
// drawing from `streams[j]` with element indices counted from `offset` at its start.

use super::registry::elementwise::{DROPOUT_BF16IO, DROPOUT_F16IO, DROPOUT_F32};
use crate::train::dropout::DropoutParams;

/// A `DropoutSpec` resolved for a launch.
#[derive(Clone, Debug)]
pub struct DeviceDropout<'a> {
    /// The seed's `[2]` U32 device buffer (low word first), read by the kernel when given.
    pub seed_buffer: Option<DeviceView<'a, u32>>,
    /// The seed, used when there is no buffer.
    pub seed: u64,
    pub p: f32,
    /// The stream of each block (at least one).
    pub streams: Vec<u64>,
    /// The stream index of each block's first element (`DropoutSpec::offset`): a data-parallel
    /// shard holding rows `r0..` of the global batch passes `r0 ·` elements per row, so it draws
    /// what those rows draw in the whole batch. 0 otherwise.
    pub offset: u64,
}

/// The launch's pieces after validation: threshold, scale and the block length.
fn dropout_plan(op: &'static str, len: usize, d: &DeviceDropout<'_>) -> Result<(DropoutParams, usize)> {
    let params = DropoutParams::new(d.p)?;
    if let Some(buf) = &d.seed_buffer {
        expect_len(op, "the seed buffer", buf.len(), 2, "a u64 seed as two u32 words")?;
    }
    let blocks = d.streams.len();
    if blocks == 0 || !len.is_multiple_of(blocks) {
        return Err(Error::shape(op, format!("{len} elements do not split into {blocks} dropout blocks")));
    }
    flat_len(op, len)?;
    if d.offset.checked_add((len / blocks) as u64).is_none() {
        return Err(Error::shape(op, format!("the dropout offset {} plus {} elements per block passes 2^64", d.offset, len / blocks)));
    }
    Ok((params, len / blocks))
}

/// Launches the mask over `y` reading `x` (the same pointer for in place); `x` and `y` hold `len`.
/// `operands` are the arguments before the block's range: `[y, x]`, then for the Linear's
/// dropout epilogue its bias and column count.
fn dropout_launch(gpu: &Gpu, kernel: KernelName, operands: &[KernelArg], params: DropoutParams, block_len: usize, d: &DeviceDropout<'_>) -> Result<()> {
    if block_len == 0 {
        return Ok(());
    }
    let seed = d.seed_buffer.as_ref().map_or(KernelArg::Null, |b| b.arg());
    // Philox blocks the range touches: a partial one at each end when the offset is not a multiple of 4.
    let quads = (d.offset % 4) as usize + block_len;
    for (j, &stream) in d.streams.iter().enumerate() {
        let range = [
            KernelArg::I64((j * block_len) as i64),
            KernelArg::I64(block_len as i64),
            seed,
            KernelArg::U32(d.seed as u32),
            KernelArg::U32((d.seed >> 32) as u32),
            KernelArg::U64(stream),
            KernelArg::U64(d.offset),
            KernelArg::U32(params.threshold),
            KernelArg::F32(params.scale),
        ];
        let args: Vec<KernelArg> = operands.iter().copied().chain(range).collect();
        // SAFETY: x and y hold streams·block_len elements of the kernel's type (the callers check
        // and pick the kernel by it), the seed buffer 2, and `extra` what the kernel reads beside.
        unsafe { gpu.launch(kernel, flat_launch(quads.div_ceil(4)), &args) }?;
    }
    Ok(())
}

/// `y = dropout(x)` with the CPU's masks for `d`, f32 or bf16 (`dropout_bf16io`: x widened, the
/// f32 kernel's product rounded once; the same mask). p = 0 copies `x` exactly (no scale, no
/// draws). `x` and `y` do not overlap (in place is [`dropout_in_place`]).
pub fn dropout<A: ActivationScalar>(gpu: &Gpu, x: &DeviceView<'_, A>, y: &mut DeviceViewMut<'_, A>, d: &DeviceDropout<'_>) -> Result<()> {
    const OP: &str = "cuda::dropout";
    let kernel = pick_activation_kernel::<A>(OP, [DROPOUT_F32, DROPOUT_BF16IO, DROPOUT_F16IO])?;
    expect_len(OP, "y", y.len(), x.len(), "x's length")?;
    check_disjoint_bytes(OP, &[act_span::<A>("y", y.device_ptr(), y.len())], &[act_span::<A>("x", x.device_ptr(), x.len())])?;
    let (params, block_len) = dropout_plan(OP, x.len(), d)?;
    if params.threshold == 0 {
        return if x.is_empty() { Ok(()) } else { gpu.copy_dtod(x, y) };
    }
    dropout_launch(gpu, kernel, &[A::act_arg_mut(y), A::act_arg(x)], params, block_len, d)
}

/// `dropout` in place (f32 or bf16). p = 0 leaves `y` untouched.
pub fn dropout_in_place<A: ActivationScalar>(gpu: &Gpu, y: &mut DeviceViewMut<'_, A>, d: &DeviceDropout<'_>) -> Result<()> {
    const OP: &str = "cuda::dropout_in_place";
    let kernel = pick_activation_kernel::<A>(OP, [DROPOUT_F32, DROPOUT_BF16IO, DROPOUT_F16IO])?;
    let (params, block_len) = dropout_plan(OP, y.len(), d)?;
    if params.threshold == 0 {
        return Ok(());
    }
    // The kernel's x and y carry no __restrict__: each element is read, then written, by one thread.
    dropout_launch(gpu, kernel, &[A::act_arg_mut(y), A::act_arg_mut(y)], params, block_len, d)
}

// ---- 16-bit Linear epilogues ------------------------------------------------------------------------

use super::registry::elementwise::{ACCUMULATE_F32_BF16IO, ACCUMULATE_F32_F16IO, LINEAR_EPILOGUE_BF16IO, LINEAR_EPILOGUE_DROPOUT_BF16IO, LINEAR_EPILOGUE_DROPOUT_F16IO, LINEAR_EPILOGUE_F16IO};

/// The 16-bit Linear's epilogue over its f32 product `acc: [rows, cols]` (kernels/elementwise.cu
/// `linear_epilogue_*`): `v = acc + bias` in f32, `pre = H(v)` (written when given) and
/// `y = H(act(H(v)))`: the activation at the rounded product, as a bf16 model's Linear feeds its
/// activation and as the backward differentiates it (bit for bit the product rounded and then
/// [`bias_act`] over it). `act` `None` is the identity, `y = H(v)`. `bias: [cols]` is the base's,
/// in `H`.
pub fn linear_epilogue<H: ActivationScalar>(gpu: &Gpu, acc: &DeviceView<'_, f32>, bias: Option<&DeviceView<'_, H>>, act: Option<Activation>, cols: usize, y: &mut DeviceViewMut<'_, H>, pre: Option<&mut DeviceViewMut<'_, H>>) -> Result<()> {
    const OP: &str = "cuda::linear_epilogue";
    let kernel = pick_half_kernel::<H>(OP, [LINEAR_EPILOGUE_BF16IO, LINEAR_EPILOGUE_F16IO])?;
    let rows = bias_act_rows(OP, acc.len(), bias.map(|b| b.len()), cols)?;
    expect_len(OP, "y", y.len(), acc.len(), "the product's length")?;
    let mut outputs = vec![act_span::<H>("y", y.device_ptr(), y.len())];
    if let Some(p) = &pre {
        expect_len(OP, "pre", p.len(), acc.len(), "the product's length")?;
        outputs.push(act_span::<H>("pre", p.device_ptr(), p.len()));
    }
    let mut inputs = vec![act_span::<f32>("acc", acc.device_ptr(), acc.len())];
    if let Some(b) = bias {
        inputs.push(act_span::<H>("bias", b.device_ptr(), b.len()));
    }
    check_disjoint_bytes(OP, &outputs, &inputs)?;
    if let [a, b] = outputs[..] {
        check_disjoint_bytes(OP, &[a], &[b])?;
    }
    if rows == 0 {
        return Ok(());
    }
    let args = [
        H::act_arg_mut(y),
        pre.as_ref().map_or(KernelArg::Null, |p| H::act_arg_mut(p)),
        acc.arg(),
        bias.map_or(KernelArg::Null, H::act_arg),
        KernelArg::I32(rows as i32),
        KernelArg::I32(cols as i32),
        KernelArg::I32(activation_code(act)),
    ];
    // SAFETY: acc, y and pre hold rows·cols elements and bias cols; no output overlaps another
    // operand (checked above).
    unsafe { gpu.launch(kernel, row_launch(rows), &args) }
}

/// The 16-bit Linear's epilogue followed by dropout (`linear_epilogue_dropout_*`):
/// `y = keep ? H((acc + bias)·scale) : 0` with the masks [`dropout`] draws for `d` over `y`
/// (blocks, streams and shard offset alike), rounded once. p = 0 is [`linear_epilogue`] without
/// an activation.
pub fn linear_epilogue_dropout<H: ActivationScalar>(gpu: &Gpu, acc: &DeviceView<'_, f32>, bias: Option<&DeviceView<'_, H>>, cols: usize, y: &mut DeviceViewMut<'_, H>, d: &DeviceDropout<'_>) -> Result<()> {
    const OP: &str = "cuda::linear_epilogue_dropout";
    let kernel = pick_half_kernel::<H>(OP, [LINEAR_EPILOGUE_DROPOUT_BF16IO, LINEAR_EPILOGUE_DROPOUT_F16IO])?;
    bias_act_rows(OP, acc.len(), bias.map(|b| b.len()), cols)?;
    expect_len(OP, "y", y.len(), acc.len(), "the product's length")?;
    let mut inputs = vec![act_span::<f32>("acc", acc.device_ptr(), acc.len())];
    if let Some(b) = bias {
        inputs.push(act_span::<H>("bias", b.device_ptr(), b.len()));
    }
    check_disjoint_bytes(OP, &[act_span::<H>("y", y.device_ptr(), y.len())], &inputs)?;
    let (params, block_len) = dropout_plan(OP, acc.len(), d)?;
    if params.threshold == 0 {
        return linear_epilogue(gpu, acc, bias, None, cols, y, None);
    }
    let operands = [H::act_arg_mut(y), acc.arg(), bias.map_or(KernelArg::Null, H::act_arg), KernelArg::I64(cols as i64)];
    dropout_launch(gpu, kernel, &operands, params, block_len, d)
}

/// `y = H(widen(y) + x)`: a 16-bit destination plus an f32 product, rounded once
/// (`accumulate_f32_*`).
pub fn accumulate_f32<H: ActivationScalar>(gpu: &Gpu, y: &mut DeviceViewMut<'_, H>, x: &DeviceView<'_, f32>) -> Result<()> {
    const OP: &str = "cuda::accumulate_f32";
    let kernel = pick_half_kernel::<H>(OP, [ACCUMULATE_F32_BF16IO, ACCUMULATE_F32_F16IO])?;
    expect_len(OP, "x", x.len(), y.len(), "y's length")?;
    check_disjoint_bytes(OP, &[act_span::<H>("y", y.device_ptr(), y.len())], &[act_span::<f32>("x", x.device_ptr(), x.len())])?;
    let n = flat_len(OP, y.len())?;
    if y.is_empty() {
        return Ok(());
    }
    // SAFETY: x and y hold n elements each and do not overlap.
    unsafe { gpu.launch(kernel, flat_launch(y.len()), &[H::act_arg_mut(y), x.arg(), n]) }
}
