//! The device-runtime layer the CUDA backend is written over: allocate, copy, memset, launch a
//! kernel by its registry name with a `cuLaunchKernel`-style argument array, dense products,
//! events. Two implementations behind one type, [`Gpu`]:
//!
//! - **cuda**: a real GPU through cudarc (one context, one stream of our own, cudarc's
//!   per-allocation event tracking turned off: with a single stream, stream order is the
//!   synchronisation, and the tracking would add two event calls per kernel argument);
//! - **cuda-sim** (cargo feature `cuda-sim`): the CPU executor of `super::sim`, which runs the
//!   same kernel text under strict CUDA rules; its memory is host memory with guard pages, its
//!   launches are synchronous.
//!
//! Launchers (e.g. [`super::layernorm`]) take a `&Gpu` and [`DeviceView`]s, so their size checks,
//! launch plans and argument packing run in CI on the executor and unchanged on a GPU.
//!
//! Every launch is checked before it is enqueued, on both implementations, as the driver would:
//! the arguments against the kernel's parameter list read from its source (count, scalar types,
//! pointer element types), block and grid dimensions against the device limits, and dynamic
//! shared memory against 48 KiB or the kernel's opt-in ([`Gpu::allow_dynamic_shared`]).

use std::collections::HashMap;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags, CUfunction_attribute};
use cudarc::driver::{result as drv, CudaEvent, DevicePtr, LaunchConfig};

use super::gemm::{Epilogue, Gemm, GemmScalar, LtGemm, OutputType};
use super::graph::{Capture, GraphBody, LaunchGraph};
use super::pool::{Block, MemoryStats, Pool, RawBlock};
use super::registry::{KernelName, ParamKind, ScalarType};
use super::runtime::{driver_err, CudaRuntime};
use crate::error::{Error, Result};

// ---- element types ------------------------------------------------------------------------------

/// A type kernels read and write in device memory.
pub trait DeviceScalar: bytemuck::Pod + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Send + Sync + 'static {
    const TYPE: ScalarType;
}

macro_rules! device_scalars {
    ($($t:ty => $s:ident),* $(,)?) => {$(
        impl DeviceScalar for $t {
            const TYPE: ScalarType = ScalarType::$s;
        }
    )*};
}
device_scalars!(f32 => F32, f64 => F64, half::f16 => F16, half::bf16 => BF16, i32 => I32, u32 => U32, i64 => I64, u64 => U64, u16 => U16, u8 => U8);

/// A storage type of frozen-base parameters (BERT's weights, embedding tables, LayerNorm γ/β),
/// which the kernels widen to f32 as they load it: f32, or bf16 (f16) for a base loaded in bf16 (f16).
/// Launchers generic over it pick the kernel variant by [`BaseScalar::DTYPE`].
pub trait BaseScalar: DeviceScalar {
    const DTYPE: crate::tensor::DType;
    /// `v` as the pointer argument of the variant that reads this type: the header-free kernels
    /// take bf16 and f16 as their raw bits, `unsigned short*` (kernels/common.cuh `bf16_raw`,
    /// `f16_raw`).
    fn base_arg(v: &DeviceView<'_, Self>) -> KernelArg;
}

impl BaseScalar for f32 {
    const DTYPE: crate::tensor::DType = crate::tensor::DType::F32;
    fn base_arg(v: &DeviceView<'_, f32>) -> KernelArg {
        v.arg()
    }
}

impl BaseScalar for half::bf16 {
    const DTYPE: crate::tensor::DType = crate::tensor::DType::BF16;
    fn base_arg(v: &DeviceView<'_, half::bf16>) -> KernelArg {
        KernelArg::Pointer { ptr: v.device_ptr(), elem: ScalarType::U16 }
    }
}
impl BaseScalar for half::f16 {
    const DTYPE: crate::tensor::DType = crate::tensor::DType::F16;
    fn base_arg(v: &DeviceView<'_, half::f16>) -> KernelArg {
        KernelArg::Pointer { ptr: v.device_ptr(), elem: ScalarType::U16 }
    }
}

/// A storage type of activations (hidden states, residuals, Q/K/V, contexts, adapter inputs and
/// outputs): f32, or bf16 (f16) with every kernel accumulating in f32 and rounding once on store
/// (ties to even). Kernels whose activations are bf16 (f16) are the `_bf16io` (`_f16io`) variants:
/// they read a frozen base in the same 16-bit type, keep adapter weights and per-row statistics
/// (mean, rstd, lse) in f32.
/// Launchers generic over it pick the variant by [`ActivationScalar::DTYPE`].
pub trait ActivationScalar: DeviceScalar {
    const DTYPE: crate::tensor::DType;
    /// `v` as the pointer argument of the variant that stores this type (bf16, f16 as raw bits).
    fn act_arg(v: &DeviceView<'_, Self>) -> KernelArg;
    /// As [`ActivationScalar::act_arg`], for an output.
    fn act_arg_mut(v: &DeviceViewMut<'_, Self>) -> KernelArg;
}

impl ActivationScalar for f32 {
    const DTYPE: crate::tensor::DType = crate::tensor::DType::F32;
    fn act_arg(v: &DeviceView<'_, f32>) -> KernelArg {
        v.arg()
    }
    fn act_arg_mut(v: &DeviceViewMut<'_, f32>) -> KernelArg {
        v.arg()
    }
}

impl ActivationScalar for half::bf16 {
    const DTYPE: crate::tensor::DType = crate::tensor::DType::BF16;
    fn act_arg(v: &DeviceView<'_, half::bf16>) -> KernelArg {
        KernelArg::Pointer { ptr: v.device_ptr(), elem: ScalarType::U16 }
    }
    fn act_arg_mut(v: &DeviceViewMut<'_, half::bf16>) -> KernelArg {
        KernelArg::Pointer { ptr: v.device_ptr(), elem: ScalarType::U16 }
    }
}
impl ActivationScalar for half::f16 {
    const DTYPE: crate::tensor::DType = crate::tensor::DType::F16;
    fn act_arg(v: &DeviceView<'_, half::f16>) -> KernelArg {
        KernelArg::Pointer { ptr: v.device_ptr(), elem: ScalarType::U16 }
    }
    fn act_arg_mut(v: &DeviceViewMut<'_, half::f16>) -> KernelArg {
        KernelArg::Pointer { ptr: v.device_ptr(), elem: ScalarType::U16 }
    }
}

// ---- limits --------------------------------------------------------------------------------------

/// What a launch may ask for on one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchLimits {
    pub max_threads_per_block: u32,
    pub max_block_dim: (u32, u32, u32),
    pub max_grid_dim: (u32, u32, u32),
    /// Dynamic shared memory every kernel gets without an opt-in.
    pub default_dynamic_shared_bytes: usize,
    /// The most a kernel may opt in to (`cudaDevAttrMaxSharedMemoryPerBlockOptin`), static and
    /// dynamic together.
    pub max_shared_bytes_opt_in: usize,
}

impl LaunchLimits {
    /// The documented limits of compute capability `major.minor` (CUDA C++ Programming Guide,
    /// "Technical Specifications per Compute Capability"). A real GPU reads them from the driver.
    pub fn for_compute_capability(major: i32, minor: i32) -> LaunchLimits {
        let opt_in_kib = match (major, minor) {
            (7, 0) | (7, 2) => 96,
            (7, _) => 64,
            (8, 0) | (8, 7) => 163,
            (8, _) => 99,
            (9, _) | (10, _) | (11, _) => 227,
            _ => 99,
        };
        LaunchLimits {
            max_threads_per_block: 1024,
            max_block_dim: (1024, 1024, 64),
            max_grid_dim: (i32::MAX as u32, 65535, 65535),
            default_dynamic_shared_bytes: 48 * 1024,
            max_shared_bytes_opt_in: opt_in_kib * 1024,
        }
    }
}

// ---- buffers and views ---------------------------------------------------------------------------

/// `len` elements of `T` in device memory; dropping it returns its block to the [`Gpu`]'s pool
/// ([`super::pool`]), reused by later allocations in stream order.
pub struct DeviceBuffer<T: DeviceScalar> {
    block: Option<Block>,
    pool: Arc<Pool>,
    ptr: u64,
    len: usize,
    _elem: PhantomData<T>,
}

impl<T: DeviceScalar> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        if let Some(b) = self.block.take() {
            self.pool.give_back(b);
        }
    }
}

impl<T: DeviceScalar> std::fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer<{}>[{}] @ {:#x}", T::TYPE.c_name(), self.len, self.ptr)
    }
}

/// A read-only table in device memory (launch descriptors, view tables), uploaded once per
/// distinct content by [`Gpu::upload_table`] and shared by every holder of that content: a step
/// that rebuilds the same descriptors finds them on the device and copies nothing, so it can be
/// captured in a graph. There is no way to write into it.
pub struct DeviceTable<T: DeviceScalar> {
    shared: Arc<SharedBlock>,
    len: usize,
    _elem: PhantomData<T>,
}

/// A block owned by the table cache and its users; back to the pool when the last one goes.
struct SharedBlock {
    block: Option<Block>,
    pool: Arc<Pool>,
}

impl Drop for SharedBlock {
    fn drop(&mut self) {
        if let Some(b) = self.block.take() {
            self.pool.give_back(b);
        }
    }
}

impl SharedBlock {
    fn ptr(&self) -> u64 {
        self.block.as_ref().map_or(0, |b| b.ptr)
    }
}

impl<T: DeviceScalar> DeviceTable<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn view(&self) -> DeviceView<'_, T> {
        DeviceView { ptr: self.shared.ptr(), len: self.len, _borrow: PhantomData }
    }
}

impl<T: DeviceScalar> std::fmt::Debug for DeviceTable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceTable<{}>[{}] @ {:#x}", T::TYPE.c_name(), self.len, self.shared.ptr())
    }
}

/// The distinct tables on the device, by element type and content; the oldest goes first past
/// [`TABLE_CACHE_ENTRIES`] (a holder keeps its table alive regardless).
#[derive(Default)]
struct TableCache {
    entries: HashMap<(ScalarType, Vec<u8>), Arc<SharedBlock>>,
    order: std::collections::VecDeque<(ScalarType, Vec<u8>)>,
    uploads: u64,
}

/// Enough for every location's descriptors of a 24-layer model forward and backward, both
/// optimizer tables, and several setups.
const TABLE_CACHE_ENTRIES: usize = 512;

/// A read-only window of a [`DeviceBuffer`]: a device address and a length, borrowed.
#[derive(Clone, Copy)]
pub struct DeviceView<'a, T> {
    ptr: u64,
    len: usize,
    _borrow: PhantomData<&'a T>,
}

impl<T: DeviceScalar> std::fmt::Debug for DeviceView<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceView<{}>[{}] @ {:#x}", T::TYPE.c_name(), self.len, self.ptr)
    }
}

impl<T: DeviceScalar> std::fmt::Debug for DeviceViewMut<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceViewMut<{}>[{}] @ {:#x}", T::TYPE.c_name(), self.len, self.ptr)
    }
}

/// A writable window of a [`DeviceBuffer`].
pub struct DeviceViewMut<'a, T> {
    ptr: u64,
    len: usize,
    _borrow: PhantomData<&'a mut T>,
}

fn check_range(what: &str, range: &Range<usize>, len: usize) -> Result<()> {
    if range.start > range.end || range.end > len {
        return Err(Error::Input(format!("{what}: range {}..{} is outside a device buffer of {len} elements", range.start, range.end)));
    }
    Ok(())
}

impl<T: DeviceScalar> DeviceBuffer<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn view(&self) -> DeviceView<'_, T> {
        DeviceView { ptr: self.ptr, len: self.len, _borrow: PhantomData }
    }
    pub fn view_mut(&mut self) -> DeviceViewMut<'_, T> {
        DeviceViewMut { ptr: self.ptr, len: self.len, _borrow: PhantomData }
    }
    /// Elements `range` of the buffer.
    pub fn slice(&self, range: Range<usize>) -> Result<DeviceView<'_, T>> {
        check_range("DeviceBuffer::slice", &range, self.len)?;
        Ok(DeviceView { ptr: self.ptr + (range.start * std::mem::size_of::<T>()) as u64, len: range.len(), _borrow: PhantomData })
    }
    pub fn slice_mut(&mut self, range: Range<usize>) -> Result<DeviceViewMut<'_, T>> {
        check_range("DeviceBuffer::slice_mut", &range, self.len)?;
        Ok(DeviceViewMut { ptr: self.ptr + (range.start * std::mem::size_of::<T>()) as u64, len: range.len(), _borrow: PhantomData })
    }
}

impl<'a, T: DeviceScalar> DeviceView<'a, T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The device address (a host address on cuda-sim).
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
    /// This view as a kernel argument for a `const T*` / `T*` parameter.
    pub fn arg(&self) -> KernelArg {
        KernelArg::Pointer { ptr: self.ptr, elem: T::TYPE }
    }

    /// The same elements, writable.
    ///
    /// # Safety
    /// Nothing else may read or write these elements while the returned view is used (a backend
    /// writing into a tensor it has just allocated, or whose aliasing it has checked).
    pub unsafe fn assume_writable(self) -> DeviceViewMut<'a, T> {
        DeviceViewMut { ptr: self.ptr, len: self.len, _borrow: PhantomData }
    }

    /// A view of `len` elements at device address `ptr` (a weight recorded in a descriptor).
    ///
    /// # Safety
    /// `ptr` must address `len` live elements of `T` on this crate's device for `'a`, not written
    /// while the view is used.
    pub(crate) unsafe fn from_raw(ptr: u64, len: usize) -> DeviceView<'a, T> {
        DeviceView { ptr, len, _borrow: PhantomData }
    }
}

impl<'a, T: DeviceScalar> DeviceViewMut<'a, T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
    pub fn arg(&self) -> KernelArg {
        KernelArg::Pointer { ptr: self.ptr, elem: T::TYPE }
    }
    /// A read-only view of the same elements, for as long as this borrow lasts.
    pub fn as_view(&self) -> DeviceView<'_, T> {
        DeviceView { ptr: self.ptr, len: self.len, _borrow: PhantomData }
    }
    /// Reborrows, so a view can be passed to several calls in turn.
    pub fn reborrow(&mut self) -> DeviceViewMut<'_, T> {
        DeviceViewMut { ptr: self.ptr, len: self.len, _borrow: PhantomData }
    }
}

// ---- kernel arguments ------------------------------------------------------------------------------

/// One kernel argument, checked against the kernel's parameter list before a launch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    /// A device pointer to elements of `elem` (from [`DeviceView::arg`] / [`DeviceViewMut::arg`]).
    Pointer { ptr: u64, elem: ScalarType },
    /// A null pointer, for optional inputs (accepted by any pointer parameter).
    Null,
    F32(f32),
    F64(f64),
    I32(i32),
    U32(u32),
    I64(i64),
    U64(u64),
}

impl KernelArg {
    fn matches(&self, kind: ParamKind) -> bool {
        match (self, kind) {
            (KernelArg::Pointer { elem, .. }, ParamKind::Pointer(t)) => *elem == t,
            (KernelArg::Null, ParamKind::Pointer(_)) => true,
            (KernelArg::F32(_), ParamKind::Scalar(ScalarType::F32))
            | (KernelArg::F64(_), ParamKind::Scalar(ScalarType::F64))
            | (KernelArg::I32(_), ParamKind::Scalar(ScalarType::I32))
            | (KernelArg::U32(_), ParamKind::Scalar(ScalarType::U32))
            | (KernelArg::I64(_), ParamKind::Scalar(ScalarType::I64))
            | (KernelArg::U64(_), ParamKind::Scalar(ScalarType::U64)) => true,
            _ => false,
        }
    }

    fn describe(&self) -> String {
        match self {
            KernelArg::Pointer { elem, .. } => format!("a {}* pointer", elem.c_name()),
            KernelArg::Null => "a null pointer".into(),
            KernelArg::F32(v) => format!("float {v}"),
            KernelArg::F64(v) => format!("double {v}"),
            KernelArg::I32(v) => format!("int {v}"),
            KernelArg::U32(v) => format!("unsigned {v}"),
            KernelArg::I64(v) => format!("long long {v}"),
            KernelArg::U64(v) => format!("unsigned long long {v}"),
        }
    }

    /// The argument's bytes, in an 8-byte slot (`cuLaunchKernel` reads `sizeof(param)` bytes
    /// from the slot's address; x86-64 and aarch64 are little-endian).
    fn slot(&self) -> u64 {
        match *self {
            KernelArg::Pointer { ptr, .. } => ptr,
            KernelArg::Null => 0,
            KernelArg::F32(v) => v.to_bits() as u64,
            KernelArg::F64(v) => v.to_bits(),
            KernelArg::I32(v) => v as u32 as u64,
            KernelArg::U32(v) => v as u64,
            KernelArg::I64(v) => v as u64,
            KernelArg::U64(v) => v,
        }
    }
}

/// Refuses arguments that do not match `kernel`'s parameter list.
pub fn check_args(kernel: KernelName, args: &[KernelArg]) -> Result<()> {
    if args.len() != kernel.params.len() {
        return Err(Error::Cuda(format!(
            "launching `{}` ({}): {} arguments given, the kernel takes {}",
            kernel.name,
            kernel.source.file,
            args.len(),
            kernel.params.len()
        )));
    }
    for (i, (a, p)) in args.iter().zip(kernel.params).enumerate() {
        if !a.matches(p.kind) {
            return Err(Error::Cuda(format!(
                "launching `{}` ({}): argument {i} (`{}`) must be {}, got {}",
                kernel.name,
                kernel.source.file,
                p.name,
                p.kind,
                a.describe()
            )));
        }
    }
    Ok(())
}

// ---- events ------------------------------------------------------------------------------------

/// A point in the stream, for timing ([`Gpu::elapsed_ms`]).
pub struct GpuEvent {
    inner: EventInner,
}

enum EventInner {
    Cuda(CudaEvent),
    #[cfg_attr(not(feature = "cuda-sim"), allow(dead_code))]
    Host(Instant),
}

// ---- the runtime ---------------------------------------------------------------------------------

/// Which implementation a [`Gpu`] runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuKind {
    Cuda,
    Sim,
}

enum Backend {
    Cuda(CudaRuntime),
    #[cfg(feature = "cuda-sim")]
    Sim(SimConfig),
}

/// The executor's settings.
#[cfg(feature = "cuda-sim")]
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub schedule: super::sim::Schedule,
    /// The compute capability whose launch limits the executor enforces.
    pub compute_capability: (i32, i32),
    /// Device memory the executor lets this `Gpu` hold (live and cached blocks together), as a
    /// GPU's is finite: past it an allocation fails as `cudaMalloc` would. `None`: the host's.
    pub memory_limit: Option<usize>,
}

#[cfg(feature = "cuda-sim")]
impl Default for SimConfig {
    /// The H100's limits (sm_90), forward schedule or `CUDA_SIM_SCHEDULE`'s when it parses.
    fn default() -> Self {
        SimConfig { schedule: super::sim::Schedule::from_env().unwrap_or(super::sim::Schedule::Forward), compute_capability: (9, 0), memory_limit: None }
    }
}

/// The static `__shared__` bytes assumed of a kernel on cuda-sim ([`Gpu::static_shared_bytes`]):
/// the room the planners leave beside dynamic shared memory (`MAX_ROW_CACHE_BYTES`,
/// `DEFAULT_SHARED_BYTES`: 48 KB less 256). Kernels with more static arrays (the LayerNorm
/// parameter gradients' 2112 bytes) use no dynamic shared memory; one that did, near the limit,
/// would fail the simulator's exact check of static plus dynamic bytes.
pub const SIM_STATIC_SHARED_BOUND: usize = 256;

/// Bytes in MiB, for the out-of-memory message.
fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Why the device gave no block: out of memory (what the driver or the executor said), which
/// releasing the pool's cached blocks may cure, or anything else.
enum FreshError {
    OutOfMemory(String),
    Other(Error),
}

/// A GPU, real or simulated; see the module docs.
pub struct Gpu {
    backend: Backend,
    limits: LaunchLimits,
    arch: String,
    /// Dynamic shared memory opted in per kernel (cuFuncSetAttribute), by kernel name.
    opted_in: Mutex<HashMap<&'static str, usize>>,
    /// Each kernel's static `__shared__` bytes, as the driver reports them (real GPU only).
    static_shared: Mutex<HashMap<&'static str, usize>>,
    /// The cuBLASLt handle and workspace, created by the first GEMM on a real GPU.
    lt: Mutex<Option<Arc<LtGemm>>>,
    /// Freed buffers' blocks, reused by later allocations.
    pool: Arc<Pool>,
    /// The graph being captured, if any ([`Gpu::begin_capture`]).
    capture: Mutex<Option<Capture>>,
    /// Read-only tables by content ([`Gpu::upload_table`]).
    tables: Mutex<TableCache>,
    /// Launches by kernel, and dense products ([`Gpu::launch_counts`]).
    counts: Mutex<LaunchCounts>,
    /// Set once [`Gpu::check_tensor_core_layout`] has passed.
    tensor_core_layout: std::sync::OnceLock<()>,
}

/// What a [`Gpu`] has been asked to run: kernel launches by name, dense products and their
/// multiply-adds (recorded in a capture included; a graph's replays are not launches).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaunchCounts {
    pub kernels: std::collections::BTreeMap<&'static str, u64>,
    pub gemm_calls: u64,
    pub gemm_macs: u64,
}

impl LaunchCounts {
    /// Launches of `kernel`.
    pub fn of(&self, kernel: &str) -> u64 {
        self.kernels.get(kernel).copied().unwrap_or(0)
    }
    /// Launches of every kernel whose name starts with `prefix`.
    pub fn with_prefix(&self, prefix: &str) -> u64 {
        self.kernels.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, n)| n).sum()
    }
    /// What ran since `earlier`.
    pub fn since(&self, earlier: &LaunchCounts) -> LaunchCounts {
        let kernels = self.kernels.iter().map(|(k, n)| (*k, n - earlier.of(k))).filter(|(_, n)| *n > 0).collect();
        LaunchCounts { kernels, gemm_calls: self.gemm_calls - earlier.gemm_calls, gemm_macs: self.gemm_macs - earlier.gemm_macs }
    }
}

/// The most free bytes a pool keeps: enough for a training step's activations at large shapes
/// on a GPU; less on the executor, whose memory is the host's (and tests open many at once).
const POOL_CAP_CUDA: usize = 8 << 30;
#[cfg(feature = "cuda-sim")]
const POOL_CAP_SIM: usize = 512 << 20;

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("kind", &self.kind()).field("arch", &self.arch).finish()
    }
}

impl Gpu {
    /// The device `device` names: `cuda:N` (a real GPU) or `cuda-sim` (the CPU executor, in a
    /// binary built with the `cuda-sim` feature). `cpu` is not a GPU.
    pub fn open(device: crate::Device) -> Result<Gpu> {
        match device {
            crate::Device::Cuda(ordinal) => Gpu::cuda(ordinal),
            crate::Device::CudaSim => {
                #[cfg(feature = "cuda-sim")]
                return Ok(Gpu::sim(SimConfig::default()));
                #[cfg(not(feature = "cuda-sim"))]
                return Err(Error::Unsupported(
                    "device `cuda-sim`: this binary was built without the `cuda-sim` feature (rebuild with `--features cuda-sim`; it needs a C++20 compiler)".into(),
                ));
            }
            crate::Device::Cpu => Err(Error::Input("device `cpu` is not a GPU".into())),
        }
    }

    /// Device `ordinal` through cudarc (probed first: no GPU is an error, not a panic).
    pub fn cuda(ordinal: usize) -> Result<Gpu> {
        let rt = CudaRuntime::open(ordinal)?;
        // SAFETY: this runtime uses one stream for every allocation, copy and launch, so stream
        // order already orders each use of a buffer after its allocation and before its free.
        unsafe { rt.context().disable_event_tracking() };
        let (major, minor) = rt.compute_capability();
        let mut limits = LaunchLimits::for_compute_capability(major, minor);
        let ctx = rt.context();
        let attr = |a: CUdevice_attribute| ctx.attribute(a).map_err(driver_err("reading a device attribute"));
        limits.max_threads_per_block = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK)? as u32;
        limits.max_shared_bytes_opt_in = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize;
        limits.max_block_dim = (
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X)? as u32,
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y)? as u32,
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z)? as u32,
        );
        limits.max_grid_dim = (
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X)? as u32,
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y)? as u32,
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z)? as u32,
        );
        let arch = rt.arch().to_string();
        Ok(Gpu {
            backend: Backend::Cuda(rt),
            limits,
            arch,
            opted_in: Mutex::new(HashMap::new()),
            static_shared: Mutex::new(HashMap::new()),
            lt: Mutex::new(None),
            pool: Arc::new(Pool::new(POOL_CAP_CUDA, 512)),
            capture: Mutex::new(None),
            tables: Mutex::new(TableCache::default()),
            counts: Mutex::new(LaunchCounts::default()),
            tensor_core_layout: std::sync::OnceLock::new(),
        })
    }

    /// The CPU executor, enforcing the launch limits of `config.compute_capability`.
    #[cfg(feature = "cuda-sim")]
    pub fn sim(config: SimConfig) -> Gpu {
        let (major, minor) = config.compute_capability;
        Gpu {
            limits: LaunchLimits::for_compute_capability(major, minor),
            arch: format!("sm_{major}{minor}"),
            backend: Backend::Sim(config),
            opted_in: Mutex::new(HashMap::new()),
            static_shared: Mutex::new(HashMap::new()),
            lt: Mutex::new(None),
            pool: Arc::new(Pool::new(POOL_CAP_SIM, 1)),
            capture: Mutex::new(None),
            tables: Mutex::new(TableCache::default()),
            counts: Mutex::new(LaunchCounts::default()),
            tensor_core_layout: std::sync::OnceLock::new(),
        }
    }

    /// Whether this device's tensor cores hold `mma.sync`'s fragments as the tensor-core kernels
    /// lay them out ([`super::mma::check_tensor_core_layout`]): checked on the first call (a few
    /// launches and a download, so not inside a graph capture), remembered once it passes.
    pub fn check_tensor_core_layout(&self) -> Result<()> {
        if self.tensor_core_layout.get().is_none() {
            super::mma::check_tensor_core_layout(self)?;
            let _ = self.tensor_core_layout.set(());
        }
        Ok(())
    }

    /// Another handle on the same device with the same settings (schedule and limits on
    /// cuda-sim), e.g. for a backend that owns its `Gpu`.
    pub fn reopen(&self) -> Result<Gpu> {
        match &self.backend {
            Backend::Cuda(rt) => Gpu::cuda(rt.context().ordinal()),
            #[cfg(feature = "cuda-sim")]
            Backend::Sim(c) => Ok(Gpu::sim(c.clone())),
        }
    }

    pub fn kind(&self) -> GpuKind {
        match self.backend {
            Backend::Cuda(_) => GpuKind::Cuda,
            #[cfg(feature = "cuda-sim")]
            Backend::Sim(_) => GpuKind::Sim,
        }
    }

    /// `sm_XY` of the device (or of the limits the executor enforces).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    pub fn limits(&self) -> LaunchLimits {
        self.limits
    }

    /// "cuda:0 (sm_90)" or "cuda-sim (sm_90 limits, reverse schedule)", for logs and test labels.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Cuda(rt) => format!("cuda:{} ({})", rt.context().ordinal(), self.arch),
            #[cfg(feature = "cuda-sim")]
            Backend::Sim(c) => format!("cuda-sim ({} limits, {:?} schedule)", self.arch, c.schedule),
        }
    }

    /// The cudarc runtime underneath, on a real GPU.
    pub fn cuda_runtime(&self) -> Option<&CudaRuntime> {
        match &self.backend {
            Backend::Cuda(rt) => Some(rt),
            #[cfg(feature = "cuda-sim")]
            Backend::Sim(_) => None,
        }
    }

    // ---- memory --------------------------------------------------------------------------------

    /// `len` uninitialised elements (NaN-poisoned on cuda-sim, so a read before a write shows),
    /// from the pool when it holds a block of this size class, else from the device.
    pub fn alloc<T: DeviceScalar>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| Error::Input(format!("device allocation of {len} {} elements overflows", T::TYPE.c_name())))?;
        let class = self.pool.class(bytes);
        let block = match self.pool.take(class) {
            Some(b) => {
                #[cfg(feature = "cuda-sim")]
                if let RawBlock::Sim(a) = &b.raw {
                    a.poison();
                }
                b
            }
            None if self.pool.capturing() => {
                return Err(Error::Cuda(format!(
                    "allocating {bytes} bytes during a graph capture: the pool holds no free block of this size (capture a step only after running it once uncaptured at the same shape)"
                )))
            }
            None => {
                let b = self.fresh_block_or_release(class)?;
                self.pool.note_fresh(class);
                b
            }
        };
        Ok(DeviceBuffer { ptr: block.ptr, len, block: Some(block), pool: self.pool.clone(), _elem: PhantomData })
    }

    /// A block from the device; when the device is out of memory, the pool's cached free blocks
    /// go back to it first and the allocation is tried once more (as PyTorch's caching allocator
    /// does), and only then is it an error, one that says how much was asked and held.
    fn fresh_block_or_release(&self, bytes: usize) -> Result<Block> {
        let cached = match self.fresh_block(bytes) {
            Err(FreshError::OutOfMemory(_)) if self.pool.stats().cached_bytes > 0 => {
                let cached = self.pool.stats().cached_bytes;
                self.pool.release_cached();
                cached
            }
            other => return other.map_err(|e| self.fresh_error(e, bytes, 0)),
        };
        self.fresh_block(bytes).map_err(|e| self.fresh_error(e, bytes, cached))
    }

    fn fresh_error(&self, e: FreshError, bytes: usize, released: usize) -> Error {
        match e {
            FreshError::Other(e) => e,
            FreshError::OutOfMemory(why) => {
                let held = self.pool.stats();
                let released = if released > 0 { format!("; its {:.1} MiB of cached free blocks were returned to the device first", mib(released)) } else { String::new() };
                Error::Cuda(format!(
                    "out of device memory on {}: allocating {:.1} MiB more, with {:.1} MiB held in this process's buffers{released} ({why}); a smaller batch or shorter sequences need less",
                    self.describe(),
                    mib(bytes),
                    mib(held.live_bytes + held.cached_bytes),
                ))
            }
        }
    }

    fn fresh_block(&self, bytes: usize) -> std::result::Result<Block, FreshError> {
        match &self.backend {
            Backend::Cuda(rt) => {
                // SAFETY: u8 is plain data; uninitialised device memory is only ever read by
                // kernels, which cannot observe it as anything but bits.
                let slice = unsafe { rt.stream().alloc::<u8>(bytes) }.map_err(|e| {
                    if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                        let free = rt.context().mem_get_info().map_or_else(|_| String::new(), |(free, total)| {
                            format!("the device has {:.1} of {:.1} MiB free", mib(free), mib(total))
                        });
                        FreshError::OutOfMemory(if free.is_empty() { format!("{e:?}") } else { free })
                    } else {
                        FreshError::Other(Error::Cuda(format!("allocating {bytes} bytes on {}: {e:?}", self.arch)))
                    }
                })?;
                // With event tracking off, the guard records nothing.
                let ptr = slice.device_ptr(rt.stream()).0;
                Ok(Block { raw: RawBlock::Cuda(slice), ptr, bytes })
            }
            #[cfg(feature = "cuda-sim")]
            Backend::Sim(config) => {
                if let Some(limit) = config.memory_limit {
                    let held = self.pool.stats();
                    if held.live_bytes + held.cached_bytes + bytes > limit {
                        return Err(FreshError::OutOfMemory(format!("the executor's memory limit is {limit} bytes")));
                    }
                }
                let a = super::sim::SimAllocation::new(bytes).map_err(|e| FreshError::Other(Error::Cuda(e.0)))?;
                Ok(Block { ptr: a.as_ptr() as u64, raw: RawBlock::Sim(a), bytes })
            }
        }
    }

    /// What the memory pool holds and how many device allocations were made.
    pub fn memory_stats(&self) -> MemoryStats {
        self.pool.stats()
    }

    /// Starts the pool's peaks ([`MemoryStats::peak_live_bytes`], `peak_bytes`) afresh from
    /// what it holds now, to measure one step's peak (torch's `reset_peak_memory_stats`).
    pub fn reset_peak_memory(&self) {
        self.pool.reset_peaks()
    }

    /// Returns every cached (free) block to the device.
    pub fn release_cached(&self) {
        self.pool.release_cached()
    }

    /// `len` zeroed elements.
    pub fn alloc_zeros<T: DeviceScalar>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        let mut b = self.alloc(len)?;
        self.memset_zero(&mut b.view_mut())?;
        Ok(b)
    }

    /// A new buffer holding `host`.
    pub fn upload<T: DeviceScalar>(&self, host: &[T]) -> Result<DeviceBuffer<T>> {
        let mut b = self.alloc(host.len())?;
        self.copy_htod(host, &mut b.view_mut())?;
        Ok(b)
    }

    /// `host` as a read-only [`DeviceTable`]: the table already on the device when one with the
    /// same element type and content was uploaded before (and is still cached or held), else a
    /// new upload. So per-call descriptor tables cost one copy per distinct content.
    pub fn upload_table<T: DeviceScalar>(&self, host: &[T]) -> Result<DeviceTable<T>> {
        let key = (T::TYPE, bytemuck::cast_slice::<T, u8>(host).to_vec());
        if let Some(shared) = lock(&self.tables).entries.get(&key) {
            return Ok(DeviceTable { shared: shared.clone(), len: host.len(), _elem: PhantomData });
        }
        let mut buf = self.upload(host)?;
        let shared = Arc::new(SharedBlock { block: buf.block.take(), pool: self.pool.clone() });
        let mut cache = lock(&self.tables);
        cache.uploads += 1;
        if cache.order.len() >= TABLE_CACHE_ENTRIES {
            if let Some(oldest) = cache.order.pop_front() {
                cache.entries.remove(&oldest);
            }
        }
        cache.order.push_back(key.clone());
        cache.entries.insert(key, shared.clone());
        Ok(DeviceTable { shared, len: host.len(), _elem: PhantomData })
    }

    /// The kernels and products launched so far.
    pub fn launch_counts(&self) -> LaunchCounts {
        lock(&self.counts).clone()
    }

    /// How many tables [`Gpu::upload_table`] has copied to the device (cache misses).
    pub fn table_uploads(&self) -> u64 {
        lock(&self.tables).uploads
    }

    /// `dst = src`; the lengths must match. Returns once `src` may be reused.
    pub fn copy_htod<T: DeviceScalar>(&self, src: &[T], dst: &mut DeviceViewMut<'_, T>) -> Result<()> {
        same_len("copy_htod", src.len(), dst.len)?;
        self.refuse_while_capturing("copy_htod (a host-to-device copy)")?;
        if src.is_empty() {
            return Ok(());
        }
        match &self.backend {
            Backend::Cuda(rt) => {
                bind(rt)?;
                // SAFETY: dst covers src.len() elements (checked); from pageable memory the copy
                // has staged `src` before it returns, so `src` may be reused at once.
                unsafe { drv::memcpy_htod_async(dst.ptr, src, rt.stream().cu_stream()) }.map_err(driver_err("copying host to device"))
            }
            #[cfg(feature = "cuda-sim")]
            Backend::Sim(_) => {
                // SAFETY: dst is a live executor allocation of dst.len elements (checked equal).
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.ptr as *mut T, src.len()) };
                Ok(())
            }
        }
    }

    /// `dst = src`, waiting for the work before it on the stream; the lengths must match.
    pub fn copy_dtoh<T: DeviceScalar>(&self, src: &DeviceView<'_, T>, dst: &mut [T]) -> Result<()> {
        same_len("copy_dtoh", src.len, dst.len())?;
        self.refuse_while_capturing("copy_dtoh (a device-to-host copy)")?;
        if dst.is_empty() {
            return Ok(());
        }
        match &self.backend {
            Backend::Cuda(rt) => {
                bind(rt)?;
                // SAFETY: src covers dst.len() elements (checked); the stream is synchronised
                // before `dst` is handed back.
                unsafe { drv::memcpy_dtoh_async(dst, src.ptr, rt.stream().cu_stream()) }.map_err(driver_err("copying device to host"))?;
                rt.synchronize()
            }
            #[cfg(feature = "cuda-sim")]
            Backend::Sim(_) => {
                // SAFETY: src is a live executor allocation of src.len elements (checked equal).
                unsafe { std::ptr::copy_nonoverlapping(src.ptr as *const T, dst.as_mut_ptr(), dst.len()) };
                Ok(())
            }
        }
    }

    /// The contents of `src`.
    pub fn download<T: DeviceScalar>(&self, src: &DeviceView<'_, T>) -> Result<Vec<T>> {
        let mut v = vec![T::zeroed(); src.len];
        self.copy_dtoh(src, &mut v)?;
        Ok(v)
    }

    /// `dst = src` on the device; the lengths must match (overlap is allowed on neither side).
    pub fn copy_dtod<T: DeviceScalar>(&self, src: &DeviceView<'_, T>, dst: &mut DeviceViewMut<'_, T>) -> Result<()> {
        same_len("copy_dtod", src.len, dst.len)?;
        let bytes = src.len * std::mem::size_of::<T>();
        if bytes == 0 {
            return Ok(());
        }
        match &self.backend {
            Backend::Cuda(rt) => {
                bind(rt)?;
                // SAFETY: both ranges are live device memory of `bytes` bytes (checked).
                unsafe { drv::memcpy_dtod_async(dst.ptr, src.ptr, bytes, rt.stream().cu_stream()) }.map_err(driver_err("copying device to device"))
            }
            #[cfg(feature = "cuda-sim")]
            Backend::Sim(_) => {
                let (from, to) = (src.ptr, dst.ptr);
                self.sim_run(move || {
                    // SAFETY: both are live executor allocations of `bytes` bytes (at capture: a
                    // replay's contract); `copy` tolerates overlap.
                    unsafe { std::ptr::copy(from as *const u8, to as *mut u8, bytes) };
                    Ok(())
                })
            }
        }
    }

    /// Sets every byte of `dst` to zero.
    pub fn memset_zero<T: DeviceScalar>(&self, dst: &mut DeviceViewMut<'_, T>) -> Result<()> {
        self.memset_bytes(dst, 0)
    }

    /// Sets every byte of `dst` to `value` (`cuMemsetD8`).
    pub fn memset_bytes<T: DeviceScalar>(&self, dst: &mut DeviceViewMut<'_, T>, value: u8) -> Result<()> {
        let bytes = dst.len * std::mem::size_of::<T>();
        if bytes == 0 {
            return Ok(());
        }
        match &self.backend {
            Backend::Cuda(rt) => {
                bind(rt)?;
                // SAFETY: dst is live device memory of `bytes` bytes.
                unsafe { drv::memset_d8_async(dst.ptr, value, bytes, rt.stream().cu_stream()) }.map_err(driver_err("memset on the device"))
            }
            #[cfg(feature = "cuda-sim")]
            Backend::Sim(_) => {
                let to = dst.ptr;
                self.sim_run(move || {
                    // SAFETY: a live executor allocation of `bytes` bytes (at capture: a replay's
                    // contract).
                    unsafe { std::ptr::write_bytes(to as *mut u8, value, bytes) };
                    Ok(())
                })
            }
        }
    }

    // ---- launches ------------------------------------------------------------------------------

    /// Lets `kernel` use up to `bytes` of dynamic shared memory (`cuFuncSetAttribute` with
    /// `MAX_DYNAMIC_SHARED_SIZE_BYTES`), refused beyond the device's opt-in maximum.
    pub fn allow_dynamic_shared(&self, kernel: KernelName, bytes: usize) -> Result<()> {
        if bytes > self.limits.max_shared_bytes_opt_in {
            return Err(Error::Cuda(format!(
                "`{}`: {bytes} bytes of dynamic shared memory exceed the {} a kernel may opt in to on {}",
                kernel.name, self.limits.max_shared_bytes_opt_in, self.arch
            )));
        }
        #[cfg_attr(not(feature = "cuda-sim"), allow(irrefutable_let_patterns))]
        if let Backend::Cuda(rt) = &self.backend {
            let f = rt.function(kernel)?;
            f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
                .map_err(driver_err("cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)"))?;
        }
        lock(&self.opted_in).insert(kernel.name, bytes);
        Ok(())
    }

    /// The static `__shared__` bytes of `kernel`. On a GPU the driver's count
    /// (`CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES`); cuda-sim learns a kernel's static arrays only as a
    /// block reaches them, so there it is [`SIM_STATIC_SHARED_BOUND`], a bound on every kernel's
    /// (the simulator then checks the exact sum at run time, as the driver does at launch).
    pub fn static_shared_bytes(&self, kernel: KernelName) -> Result<usize> {
        match &self.backend {
            Backend::Cuda(rt) => {
                if let Some(&b) = lock(&self.static_shared).get(kernel.name) {
                    return Ok(b);
                }
                let b = rt
                    .function(kernel)?
                    .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
                    .map_err(driver_err("cuFuncGetAttribute(SHARED_SIZE_BYTES)"))? as usize;
                lock(&self.static_shared).insert(kernel.name, b);
                Ok(b)
            }
            #[cfg(feature = "cuda-sim")]
            Backend::Sim(_) => Ok(SIM_STATIC_SHARED_BOUND),
        }
    }

    /// The dynamic shared memory `kernel` may use now: what was opted in for it, else what the
    /// 48 KB a block gets without an opt-in leaves beside its static `__shared__` arrays (the
    /// driver refuses a launch whose static and dynamic bytes together pass it; launchers opt in
    /// above this). Where the static size cannot be read, the cuda-sim bound stands in.
    pub fn dynamic_shared_limit(&self, kernel: KernelName) -> usize {
        let default = self.limits.default_dynamic_shared_bytes.saturating_sub(self.static_shared_bytes(kernel).unwrap_or(SIM_STATIC_SHARED_BOUND));
        lock(&self.opted_in).get(kernel.name).copied().unwrap_or(0).max(default)
    }

    /// Checks a launch configuration against the device limits, as the driver would.
    pub fn check_launch_config(&self, kernel: KernelName, cfg: &LaunchConfig) -> Result<()> {
        let l = &self.limits;
        let (b, g) = (cfg.block_dim, cfg.grid_dim);
        let fail = |why: String| Err(Error::Cuda(format!("launching `{}` on {}: {why}", kernel.name, self.arch)));
        if b.0 == 0 || b.1 == 0 || b.2 == 0 || g.0 == 0 || g.1 == 0 || g.2 == 0 {
            return fail(format!("grid {g:?} and block {b:?} must have no zero dimension"));
        }
        let threads = b.0 as u64 * b.1 as u64 * b.2 as u64;
        if threads > l.max_threads_per_block as u64 || b.0 > l.max_block_dim.0 || b.1 > l.max_block_dim.1 || b.2 > l.max_block_dim.2 {
            return fail(format!("block {b:?} ({threads} threads) exceeds the limits ({} threads, {:?})", l.max_threads_per_block, l.max_block_dim));
        }
        if g.0 > l.max_grid_dim.0 || g.1 > l.max_grid_dim.1 || g.2 > l.max_grid_dim.2 {
            return fail(format!("grid {g:?} exceeds the limits {:?}", l.max_grid_dim));
        }
        let allowed = self.dynamic_shared_limit(kernel);
        if cfg.shared_mem_bytes as usize > allowed {
            return fail(format!(
                "{} bytes of dynamic shared memory exceed the {allowed} this kernel may use (opt in with Gpu::allow_dynamic_shared, up to {})",
                cfg.shared_mem_bytes, l.max_shared_bytes_opt_in
            ));
        }
        Ok(())
    }

    /// Launches `kernel` over `cfg` with `args`, after checking the arguments against its
    /// parameter list and the configuration against the device limits. Enqueued on a GPU;
    /// finished when this returns on cuda-sim.
    ///
    /// # Safety
    /// Every pointer argument must point at device memory of this `Gpu` large enough for every
    /// access the kernel makes with these scalar arguments and this configuration (the
    /// launcher's size checks establish it), and stay alive until the kernel has run.
    pub unsafe fn launch(&self, kernel: KernelName, cfg: LaunchConfig, args: &[KernelArg]) -> Result<()> {
        check_args(kernel, args)?;
        self.check_launch_config(kernel, &cfg)?;
        *lock(&self.counts).kernels.entry(kernel.name).or_default() += 1;
        let mut slots: Vec<u64> = args.iter().map(KernelArg::slot).collect();
        let mut params: Vec<*mut c_void> = slots.iter_mut().map(|s| (s as *mut u64).cast()).collect();
        match &self.backend {
            Backend::Cuda(rt) => {
                let f = rt.function(kernel)?;
                // What this compiled kernel can take (its registers against the register file),
                // said in words instead of CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES.
                let most = f.max_threads_per_block().map_err(driver_err("reading the kernel's thread limit"))?;
                let threads = cfg.block_dim.0 as u64 * cfg.block_dim.1 as u64 * cfg.block_dim.2 as u64;
                if most > 0 && threads > most as u64 {
                    return Err(Error::Cuda(format!(
                        "launching `{}` on {}: {threads} threads per block, but this kernel takes at most {most} ({} registers a thread)",
                        kernel.name,
                        self.arch,
                        f.num_regs().unwrap_or(-1)
                    )));
                }
                bind(rt)?;
                // SAFETY: the arguments match the kernel's parameters (checked); the memory contract
                // is the caller's. `slots` outlives the call, which copies the parameters.
                unsafe { drv::launch_kernel(f.cu_function(), cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes, rt.stream().cu_stream(), &mut params) }
                    .map_err(|e| Error::Cuda(format!("launching `{}` with {cfg:?}: {e:?}", kernel.name)))
            }
            #[cfg(feature = "cuda-sim")]
            Backend::Sim(c) => {
                let opts = super::sim::LaunchOptions { schedule: c.schedule, max_dynamic_shared_bytes: self.dynamic_shared_limit(kernel), opted_in: lock(&self.opted_in).contains_key(kernel.name) };
                drop(params);
                self.sim_run(move || {
                    let mut slots = slots.clone();
                    let mut params: Vec<*mut c_void> = slots.iter_mut().map(|s| (s as *mut u64).cast()).collect();
                    // SAFETY: as above (at capture: a replay's contract); device pointers are host
                    // pointers on the executor.
                    unsafe { super::sim::launch(kernel, cfg, &mut params, &opts) }
                        .map_err(|e| Error::Cuda(if e.0.starts_with("cuda-sim") { e.0 } else { format!("cuda-sim: {}", e.0) }))
                })
            }
        }
    }

    // ---- dense products ------------------------------------------------------------------------

    /// `C = act(alpha·op(A)·op(B) + beta·C + bias)` with cuBLASLt semantics (see
    /// [`super::gemm`]): cuBLASLt on a GPU, the same description on the CPU under cuda-sim
    /// ([`super::gemm::gemm_host_typed`]). A and B are `I`, C and the bias `O` (f32, bf16 or f16), as
    /// the description's `inputs` and `output` say. Every length and type is validated first; C
    /// may not overlap A, B or the bias.
    pub fn gemm<I: GemmScalar, O: GemmScalar>(&self, g: &Gemm, a: &DeviceView<'_, I>, b: &DeviceView<'_, I>, c: &mut DeviceViewMut<'_, O>, bias: Option<&DeviceView<'_, O>>) -> Result<()> {
        g.validate(a.len, b.len, c.len, bias.map(|v| v.len))?;
        g.check_element_types::<I, O>()?;
        {
            let mut c = lock(&self.counts);
            c.gemm_calls += 1;
            c.gemm_macs += (g.m * g.n * g.k * g.batch) as u64;
        }
        let c_range = byte_range::<O>(c.ptr, c.len);
        for (name, r) in [("A", Some(byte_range::<I>(a.ptr, a.len))), ("B", Some(byte_range::<I>(b.ptr, b.len))), ("bias", bias.map(|v| byte_range::<O>(v.ptr, v.len)))] {
            if let Some(r) = r {
                if r.start < c_range.end && c_range.start < r.end {
                    return Err(Error::Input(format!("gemm: C overlaps {name}; the output must not alias an input")));
                }
            }
        }
        if O::OUTPUT != OutputType::F32 && (g.epilogue != Epilogue::None || g.beta != 0.0) && !g.is_noop() && !g.fused_half_epilogue {
            return match O::OUTPUT {
                OutputType::F16 => self.gemm_half_staged::<I, O, half::f16>(g, a, b, c, bias),
                _ => self.gemm_half_staged::<I, O, half::bf16>(g, a, b, c, bias),
            };
        }
        self.gemm_validated(g, a, b, c, bias)
    }

    /// A bf16 or f16 D (`H`, which is `O`) with an epilogue or `beta != 0`, rounded once. cuBLASLt's bf16-output kernels on
    /// sm_90 apply the bias, the activation and `beta·C` after an intermediate rounding and in
    /// reduced precision (seen on an H100, docs/gpu-log.md 2026-11-27: up to 1 ulp with the bias,
    /// 2.7 ulp with `beta·C`, 3.7 ulp with the GELU, where one rounding is ½ ulp), which breaks
    /// the bf16 rule of docs/STYLE.md. So the product runs with an f32 D in a staging copy of C's
    /// span, with the bias widened to f32 (exact), and our cast kernel rounds each element of the
    /// product once (C's span is widened into the staging copy first when `beta·C` reads it; a
    /// padded C's gaps are never written). Both executors take this path, so cuda-sim runs it.
    /// An f16 D goes the same way: one rounding of the f32 epilogue, the bf16 rule's semantics.
    fn gemm_half_staged<I: GemmScalar, O: GemmScalar, H: GemmScalar + ActivationScalar>(&self, g: &Gemm, a: &DeviceView<'_, I>, b: &DeviceView<'_, I>, c: &mut DeviceViewMut<'_, O>, bias: Option<&DeviceView<'_, O>>) -> Result<()> {
        if O::OUTPUT != H::OUTPUT {
            return Err(Error::internal(format!("gemm: a {} D staged as {}", O::OUTPUT.name(), H::OUTPUT.name())));
        }
        let span = g.required_lengths()?.c;
        // O is H (checked above): the same 2-byte elements, retyped for the cast kernels.
        let mut c16 = DeviceViewMut::<H> { ptr: c.ptr, len: span, _borrow: PhantomData };
        let mut wide = self.alloc::<f32>(span)?;
        if g.beta != 0.0 {
            super::elementwise::cast_to_f32(self, &c16.as_view(), &mut wide.view_mut())?;
        }
        let wide_bias = match bias {
            Some(v) => {
                let mut w = self.alloc::<f32>(v.len)?;
                super::elementwise::cast_to_f32(self, &DeviceView::<H> { ptr: v.ptr, len: v.len, _borrow: PhantomData }, &mut w.view_mut())?;
                Some(w)
            }
            None => None,
        };
        let g32 = g.with_types(g.inputs, OutputType::F32);
        self.gemm_validated::<I, f32>(&g32, a, b, &mut wide.view_mut(), wide_bias.as_ref().map(|w| w.view()).as_ref())?;
        if span == g.m * g.n * g.batch {
            super::elementwise::cast_from_f32(self, &wide.view(), &mut c16)
        } else {
            let layout = super::elementwise::StridedMatrices { rows: g.m, cols: g.n, ld: g.ldc, batch: g.batch, batch_stride: g.stride_c };
            super::elementwise::cast_from_f32_strided(self, &wide.view(), &mut c16, layout)
        }
    }

    /// This GPU's cuBLASLt object, created at the first product.
    fn lt_gemm(&self, rt: &CudaRuntime) -> Result<Arc<LtGemm>> {
        let mut slot = lock(&self.lt);
        if let Some(lt) = &*slot {
            return Ok(lt.clone());
        }
        let lt = Arc::new(LtGemm::new(rt.stream().clone())?);
        *slot = Some(lt.clone());
        Ok(lt)
    }

    /// What cuBLASLt offers for the product [`Gpu::gemm`] would run on these operands, each
    /// algorithm described and timed ([`LtGemm::survey`]: the heuristic's results under this
    /// library's numerical mask and with none, as many and timed as often as `options` says).
    /// C is neither read nor written.
    /// A GPU only: [`Error::Unsupported`] on cuda-sim, which has no cuBLASLt.
    pub fn gemm_survey<I: GemmScalar, O: GemmScalar>(&self, g: &Gemm, a: &DeviceView<'_, I>, b: &DeviceView<'_, I>, c: &DeviceViewMut<'_, O>, bias: Option<&DeviceView<'_, O>>, options: super::gemm::SurveyOptions) -> Result<Vec<super::gemm::AlgoReport>> {
        g.validate(a.len, b.len, c.len, bias.map(|v| v.len))?;
        g.check_element_types::<I, O>()?;
        self.refuse_while_capturing("gemm_survey")?;
        match &self.backend {
            // SAFETY: every operand was validated against its view's length and type, and the
            // views are device memory of this Gpu's stream; C is not touched.
            Backend::Cuda(rt) => unsafe { self.lt_gemm(rt)?.survey(g, a.ptr, b.ptr, c.ptr, bias.map(|v| v.ptr), options) },
            #[cfg(feature = "cuda-sim")]
            Backend::Sim(_) => Err(Error::Unsupported("gemm_survey: cuda-sim has no cuBLASLt algorithms to survey".into())),
        }
    }

    /// [`Gpu::gemm`]'s executors, after its checks.
    fn gemm_validated<I: GemmScalar, O: GemmScalar>(&self, g: &Gemm, a: &DeviceView<'_, I>, b: &DeviceView<'_, I>, c: &mut DeviceViewMut<'_, O>, bias: Option<&DeviceView<'_, O>>) -> Result<()> {
        match &self.backend {
            Backend::Cuda(rt) => {
                let lt = self.lt_gemm(rt)?;
                // SAFETY: every operand was validated against its view's length, the views are
                // device memory of this Gpu's stream, and C aliases no input.
                unsafe { lt.run(g, a.ptr, b.ptr, c.ptr, bias.map(|v| v.ptr)) }
            }
            #[cfg(feature = "cuda-sim")]
            Backend::Sim(_) => {
                let (g, a, b, c, bias) = (*g, (a.ptr, a.len), (b.ptr, b.len), (c.ptr, c.len), bias.map(|v| (v.ptr, v.len)));
                self.sim_run(move || {
                    // SAFETY: the views are live executor allocations of their lengths (host
                    // memory; at capture: a replay's contract), C overlaps none of the inputs
                    // (checked), and nothing else runs meanwhile.
                    let (a, b) = unsafe { (host_slice::<I>(a.0, a.1), host_slice::<I>(b.0, b.1)) };
                    let bias = bias.map(|v| unsafe { host_slice::<O>(v.0, v.1) });
                    let c = unsafe { std::slice::from_raw_parts_mut(c.0 as *mut O, c.1) };
                    super::gemm::gemm_host_typed(&g, a, b, c, bias)
                })
            }
        }
    }

    // ---- synchronisation and timing ----------------------------------------------------------

    /// Waits for everything enqueued so far.
    pub fn synchronize(&self) -> Result<()> {
        self.refuse_while_capturing("synchronize")?;
        match &self.backend {
            Backend::Cuda(rt) => rt.synchronize(),
            #[cfg(feature = "cuda-sim")]
            Backend::Sim(_) => Ok(()),
        }
    }

    /// Records a timing event at this point of the stream.
    pub fn record_event(&self) -> Result<GpuEvent> {
        self.refuse_while_capturing("record_event")?;
        match &self.backend {
            Backend::Cuda(rt) => {
                let e = rt.stream().record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver_err("recording an event"))?;
                Ok(GpuEvent { inner: EventInner::Cuda(e) })
            }
            #[cfg(feature = "cuda-sim")]
            Backend::Sim(_) => Ok(GpuEvent { inner: EventInner::Host(Instant::now()) }),
        }
    }

    /// Milliseconds between two events of this `Gpu` (waits for `end`).
    pub fn elapsed_ms(&self, start: &GpuEvent, end: &GpuEvent) -> Result<f32> {
        match (&start.inner, &end.inner) {
            (EventInner::Cuda(s), EventInner::Cuda(e)) => {
                e.synchronize().map_err(driver_err("waiting for an event"))?;
                s.elapsed_ms(e).map_err(driver_err("reading an event interval"))
            }
            (EventInner::Host(s), EventInner::Host(e)) => Ok(e.saturating_duration_since(*s).as_secs_f32() * 1e3),
            _ => Err(Error::Input("elapsed_ms: the two events come from different kinds of device".into())),
        }
    }

    /// Opens (`true`) or closes the range a profiler attached with "profile from start off"
    /// records (`cuProfilerStart` / `cuProfilerStop`; Nsight Compute's `--profile-from-start off`),
    /// after waiting for the work already enqueued so the range holds only what follows. Without
    /// a profiler attached it does nothing else; on cuda-sim it only returns.
    pub fn profiler_range(&self, open: bool) -> Result<()> {
        self.synchronize()?;
        match &self.backend {
            Backend::Cuda(rt) => {
                bind(rt)?;
                // SAFETY: plain driver calls on the bound context; neither takes pointers.
                let status = unsafe { if open { cudarc::driver::sys::cuProfilerStart() } else { cudarc::driver::sys::cuProfilerStop() } };
                status.result().map_err(driver_err(if open { "cuProfilerStart" } else { "cuProfilerStop" }))
            }
            #[cfg(feature = "cuda-sim")]
            Backend::Sim(_) => Ok(()),
        }
    }
}

// ---- graph capture ---------------------------------------------------------------------------------

impl Gpu {
    /// Starts capturing: from now until [`Gpu::end_capture`], kernels, dense products, memsets
    /// and device copies are recorded, not run (see [`super::graph`] for the rules; a host
    /// transfer, a synchronisation or a device allocation is an error meanwhile).
    pub fn begin_capture(&self) -> Result<()> {
        let mut slot = lock(&self.capture);
        if slot.is_some() {
            return Err(Error::Input("begin_capture: a capture is already running on this device".into()));
        }
        let capture = match &self.backend {
            Backend::Cuda(rt) => {
                rt.stream()
                    .begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(driver_err("cuStreamBeginCapture"))?;
                Capture::Cuda
            }
            #[cfg(feature = "cuda-sim")]
            Backend::Sim(_) => Capture::Sim(Vec::new()),
        };
        self.pool.begin_capture();
        *slot = Some(capture);
        Ok(())
    }

    /// Ends the capture and returns what it recorded (an error if none was running, or if the
    /// driver invalidated it).
    pub fn end_capture(&self) -> Result<LaunchGraph> {
        let capture = lock(&self.capture).take().ok_or_else(|| Error::Input("end_capture: no capture is running on this device".into()))?;
        let reserved = self.pool.end_capture();
        let body = match (capture, &self.backend) {
            (Capture::Cuda, Backend::Cuda(rt)) => {
                let graph = rt.stream().end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)).map_err(driver_err("cuStreamEndCapture"))?;
                GraphBody::Cuda(graph.ok_or_else(|| Error::Cuda("cuStreamEndCapture returned no graph (nothing was captured)".into()))?)
            }
            #[cfg(feature = "cuda-sim")]
            (Capture::Sim(ops), _) => GraphBody::Sim(ops),
            #[cfg(feature = "cuda-sim")]
            _ => return Err(Error::Internal("a capture ended on another kind of device".into())),
        };
        Ok(LaunchGraph::new(body, reserved, self.pool.clone()))
    }

    /// Whether a capture is running.
    pub fn is_capturing(&self) -> bool {
        lock(&self.capture).is_some()
    }

    /// Runs a captured graph again (enqueued on a GPU; finished when this returns on cuda-sim).
    ///
    /// # Safety
    /// Every buffer the captured work used, other than those freed during the capture (the graph
    /// keeps those), must still be alive and of the same size: the graph holds their addresses.
    pub unsafe fn replay(&self, graph: &LaunchGraph) -> Result<()> {
        if !Arc::ptr_eq(&graph.pool, &self.pool) {
            return Err(Error::Input("replay: the graph was captured on another Gpu".into()));
        }
        self.refuse_while_capturing("replay")?;
        match (&graph.body, &self.backend) {
            (GraphBody::Cuda(g), Backend::Cuda(_)) => g.launch().map_err(driver_err("cuGraphLaunch")),
            #[cfg(feature = "cuda-sim")]
            (GraphBody::Sim(ops), _) => ops.iter().try_for_each(|op| op()),
            #[cfg(feature = "cuda-sim")]
            _ => Err(Error::Internal("a graph replayed on another kind of device".into())),
        }
    }

    fn refuse_while_capturing(&self, what: &str) -> Result<()> {
        if lock(&self.capture).is_some() {
            return Err(Error::Unsupported(format!(
                "{what} while a graph is being captured (a captured step may not move data to or from the host or wait: inputs go into fixed buffers before a replay)"
            )));
        }
        Ok(())
    }

    /// On the executor: runs `op` now, or records it while a capture runs.
    #[cfg(feature = "cuda-sim")]
    fn sim_run(&self, op: impl Fn() -> Result<()> + Send + Sync + 'static) -> Result<()> {
        if let Some(Capture::Sim(ops)) = lock(&self.capture).as_mut() {
            ops.push(Box::new(op));
            return Ok(());
        }
        op()
    }
}

fn byte_range<T>(ptr: u64, len: usize) -> Range<u64> {
    ptr..ptr + (len * std::mem::size_of::<T>()) as u64
}

/// # Safety
/// `ptr` is the host address of `len` live `T`s (an executor allocation), not written meanwhile.
#[cfg(feature = "cuda-sim")]
unsafe fn host_slice<'a, T>(ptr: u64, len: usize) -> &'a [T] {
    if len == 0 {
        return &[];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(ptr as *const T, len) }
}

fn same_len(what: &str, a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(Error::Input(format!("{what}: source has {a} elements, destination {b}")));
    }
    Ok(())
}

/// Raw driver calls act on the calling thread's current context.
fn bind(rt: &CudaRuntime) -> Result<()> {
    rt.context().bind_to_thread().map_err(driver_err("binding the CUDA context"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---- one test body for both implementations -------------------------------------------------

/// For tests: device 0 as a [`Gpu`], or `None` after recording the skip (`probe::report_skip`)
/// (a failure when `REQUIRE_GPU` is set; see [`super::probe::gpu_for_test`]).
pub fn cuda_for_test(label: &str) -> Option<Gpu> {
    super::probe::gpu_for_test(label)?;
    match Gpu::cuda(0) {
        Ok(gpu) => Some(gpu),
        Err(e) => panic!("{label}: a GPU was probed but cannot be opened: {e}"),
    }
}

/// For tests: the executor in every schedule a kernel test must pass — forward, reverse and a
/// random order — or only the one `CUDA_SIM_SCHEDULE` names. A race-free kernel gives the same
/// bits in each; a missing barrier fails in at least one.
#[cfg(feature = "cuda-sim")]
pub fn sims_for_test() -> Vec<Gpu> {
    use super::sim::Schedule;
    let schedules = match std::env::var("CUDA_SIM_SCHEDULE") {
        Ok(s) => vec![Schedule::parse(&s).unwrap_or_else(|e| panic!("{e}"))],
        Err(_) => vec![Schedule::Forward, Schedule::Reverse, Schedule::Random(0x5eed)],
    };
    schedules.into_iter().map(|schedule| Gpu::sim(SimConfig { schedule, ..SimConfig::default() })).collect()
}

/// Defines a module of tests that run one body, a `fn(&Gpu)`, on every device:
/// `NAME::cuda_sim` (feature `cuda-sim`: the executor in each schedule of `sims_for_test`) and
/// `NAME::cuda` (device 0; records why it skips without one, fails under `REQUIRE_GPU=1`).
///
/// ```ignore
/// fn adds_rows(gpu: &Gpu) { /* upload, launch, download, compare */ }
/// bert_adapters::test_device!(adds_rows_on, adds_rows);
/// ```
#[macro_export]
macro_rules! test_device {
    ($name:ident, $body:ident) => {
        mod $name {
            #[cfg(feature = "cuda-sim")]
            #[test]
            fn cuda_sim() {
                for gpu in $crate::cuda::gpu::sims_for_test() {
                    super::$body(&gpu);
                }
            }

            #[test]
            fn cuda() {
                if let Some(gpu) = $crate::cuda::gpu::cuda_for_test(concat!(module_path!(), "::", stringify!($body))) {
                    super::$body(&gpu);
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::registry::layernorm::RESIDUAL_LAYERNORM_FORWARD_F32 as LN;

    fn ln_args() -> Vec<KernelArg> {
        let p = KernelArg::Pointer { ptr: 64, elem: ScalarType::F32 };
        vec![p, p, p, p, KernelArg::Null, p, p, KernelArg::I32(3), KernelArg::I32(8), KernelArg::F32(1e-5), KernelArg::I32(1)]
    }

    #[test]
    fn arguments_are_checked_against_the_signature() {
        check_args(LN, &ln_args()).unwrap();
        let mut a = ln_args();
        a.pop();
        let e = check_args(LN, &a).unwrap_err().to_string();
        assert!(e.contains("10 arguments given, the kernel takes 11"), "{e}");
        let mut a = ln_args();
        a[8] = KernelArg::U32(8);
        let e = check_args(LN, &a).unwrap_err().to_string();
        assert!(e.contains("argument 8 (`cols`) must be int, got unsigned 8"), "{e}");
        let mut a = ln_args();
        a[3] = KernelArg::Pointer { ptr: 64, elem: ScalarType::BF16 };
        let e = check_args(LN, &a).unwrap_err().to_string();
        assert!(e.contains("argument 3 (`x`) must be float*, got a __nv_bfloat16* pointer"), "{e}");
        let mut a = ln_args();
        a[9] = KernelArg::Null;
        assert!(check_args(LN, &a).is_err(), "a null pointer is not a float scalar");
    }

    #[test]
    fn argument_slots_hold_the_little_endian_bits() {
        assert_eq!(KernelArg::I32(-1).slot(), 0xffff_ffff);
        assert_eq!(KernelArg::F32(1.0).slot(), 0x3f80_0000);
        assert_eq!(KernelArg::Null.slot(), 0);
        assert_eq!(KernelArg::I64(-2).slot(), u64::MAX - 1);
    }

    #[test]
    fn documented_limits_per_architecture() {
        assert_eq!(LaunchLimits::for_compute_capability(9, 0).max_shared_bytes_opt_in, 227 * 1024);
        assert_eq!(LaunchLimits::for_compute_capability(8, 0).max_shared_bytes_opt_in, 163 * 1024);
        assert_eq!(LaunchLimits::for_compute_capability(8, 9).max_shared_bytes_opt_in, 99 * 1024);
        assert_eq!(LaunchLimits::for_compute_capability(7, 5).max_shared_bytes_opt_in, 64 * 1024);
        assert_eq!(LaunchLimits::for_compute_capability(9, 0).default_dynamic_shared_bytes, 48 * 1024);
    }
}
