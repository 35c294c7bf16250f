//! A dense, row-major tensor that lives on exactly one device.
//!
//! A `Tensor` is a handle: `(storage, dtype, offset, shape)`. The storage is shared and
//! reference-counted, so `clone` never copies elements, and a contiguous block of a tensor (the
//! rows of one Parallel branch, one parameter inside an adapter's flat arena) is a view of the
//! same storage at another offset.
//!
//! `Storage` has one variant per backend. The CPU variant is a host buffer behind a lock; a device
//! backend adds its own variant and touches nothing else. The model only ever sees `Tensor`; the
//! backend that made a tensor is the only code that reads its elements. There are no implicit
//! copies between devices: `Backend::to_host` is the one way back to the CPU.
//!
//! Writes go through the backend too (ops that write into a given output). A CPU op takes its
//! input locks before its output lock and never waits for a lock: an output that aliases one of
//! the op's inputs, or a tensor written by one thread while another uses it, is an error, never a
//! deadlock or a data race.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut, Range};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

use half::{bf16, f16};

use crate::device::Device;
use crate::error::{Error, Result};

/// Element type of a tensor's storage. Arithmetic is f32 (bf16/f16 storage is widened to f32
/// and accumulated in f32); U32 holds token ids and masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    U32,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
    /// Whether the elements are floating point (and so can be cast to and from f32).
    pub fn is_float(self) -> bool {
        !matches!(self, DType::U32)
    }
    /// Whether the elements are 16-bit floats (bf16, f16): a 16-bit pipeline's activations.
    pub fn is_half(self) -> bool {
        matches!(self, DType::BF16 | DType::F16)
    }
    /// The dtype an activation (or its gradient) computed from one of this dtype is stored in:
    /// this dtype when it is 16-bit, f32 otherwise.
    pub fn half_or_f32(self) -> DType {
        if self.is_half() {
            self
        } else {
            DType::F32
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::U32 => "u32",
        })
    }
}

/// A host buffer of one element type.
#[derive(Debug)]
pub enum CpuBuffer {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    U32(Vec<u32>),
}

impl CpuBuffer {
    pub fn dtype(&self) -> DType {
        match self {
            CpuBuffer::F32(_) => DType::F32,
            CpuBuffer::BF16(_) => DType::BF16,
            CpuBuffer::F16(_) => DType::F16,
            CpuBuffer::U32(_) => DType::U32,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            CpuBuffer::F32(v) => v.len(),
            CpuBuffer::BF16(v) => v.len(),
            CpuBuffer::F16(v) => v.len(),
            CpuBuffer::U32(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn zeros(dtype: DType, n: usize) -> Self {
        match dtype {
            DType::F32 => CpuBuffer::F32(vec![0.0; n]),
            DType::BF16 => CpuBuffer::BF16(vec![bf16::ZERO; n]),
            DType::F16 => CpuBuffer::F16(vec![f16::ZERO; n]),
            DType::U32 => CpuBuffer::U32(vec![0; n]),
        }
    }
}

/// Element types a CPU tensor can be read or written as.
pub trait CpuElement: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn slice(buf: &CpuBuffer) -> Option<&[Self]>;
    fn slice_mut(buf: &mut CpuBuffer) -> Option<&mut [Self]>;
    fn wrap(v: Vec<Self>) -> CpuBuffer;
}

macro_rules! cpu_element {
    ($t:ty, $variant:ident) => {
        impl CpuElement for $t {
            const DTYPE: DType = DType::$variant;
            fn slice(buf: &CpuBuffer) -> Option<&[Self]> {
                match buf {
                    CpuBuffer::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(buf: &mut CpuBuffer) -> Option<&mut [Self]> {
                match buf {
                    CpuBuffer::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn wrap(v: Vec<Self>) -> CpuBuffer {
                CpuBuffer::$variant(v)
            }
        }
    };
}
cpu_element!(f32, F32);
cpu_element!(bf16, BF16);
cpu_element!(f16, F16);
cpu_element!(u32, U32);

/// Where a tensor's elements are: host memory, or a device backend's memory.
#[derive(Clone, Debug)]
pub enum Storage {
    Cpu(Arc<CpuStorage>),
    /// Memory of a device backend (the CUDA backend's buffers); only that backend reads it.
    Device(Arc<dyn DeviceStorage>),
}

/// What a device backend's storage tells the rest of the crate; the backend downcasts
/// (`as_any`) to reach its buffer.
pub trait DeviceStorage: std::fmt::Debug + Send + Sync + 'static {
    fn device(&self) -> Device;
    /// Bytes of the whole allocation.
    fn bytes(&self) -> usize;
    fn as_any(&self) -> &dyn std::any::Any;
}

/// A host buffer behind its lock, and the pool it goes back to when its last handle drops.
#[derive(Debug)]
pub struct CpuStorage {
    buf: RwLock<CpuBuffer>,
    pool: Option<Arc<HostPool>>,
}

impl Drop for CpuStorage {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            let buf = self.buf.get_mut().unwrap_or_else(|e| e.into_inner());
            if let CpuBuffer::F32(v) = std::mem::replace(buf, CpuBuffer::F32(Vec::new())) {
                pool.give(v);
            }
        }
    }
}

/// A caching pool of f32 host buffers, by exact length: what a device backend's caching allocator
/// is to device memory. A tensor made from the pool returns its buffer when its last handle
/// drops, so a loop of repeated shapes draws every buffer from the pool after its first pass,
/// in the same order. Buffers kept idle are bounded (`MAX_IDLE_BYTES`); beyond that they are freed.
#[derive(Debug, Default)]
pub struct HostPool {
    free: std::sync::Mutex<std::collections::HashMap<usize, Vec<Vec<f32>>>>,
    idle_bytes: std::sync::atomic::AtomicUsize,
    created: std::sync::atomic::AtomicUsize,
    reused: std::sync::atomic::AtomicUsize,
    wrapped: std::sync::atomic::AtomicUsize,
    /// Addresses handed out, in order, while tracing (`trace`).
    trace: std::sync::Mutex<Option<Vec<usize>>>,
}

/// Storages made outside any pool (`from_vec`, `from_elems`, `zeros_of`), process-wide: with
/// the pool's counters, what proves that a loop creates no buffer.
static UNPOOLED_STORAGES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many tensor storages have been made outside a pool in this process.
pub fn unpooled_storages() -> usize {
    UNPOOLED_STORAGES.load(std::sync::atomic::Ordering::Relaxed)
}

/// How many bytes of idle buffers a pool keeps at most (beyond it, returned buffers are freed).
pub const MAX_IDLE_BYTES: usize = 4 << 30;

/// Buffers a pool has allocated and handed out again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolCounts {
    /// Buffers allocated because no idle one of the length was there.
    pub created: usize,
    /// Buffers handed out again.
    pub reused: usize,
    /// Tensors made on pool buffers (`Tensor::from_pool`): equal to `created + reused` when
    /// every pooled tensor's buffer came from the pool.
    pub wrapped: usize,
}

impl std::ops::Sub for PoolCounts {
    type Output = PoolCounts;
    fn sub(self, o: PoolCounts) -> PoolCounts {
        PoolCounts { created: self.created - o.created, reused: self.reused - o.reused, wrapped: self.wrapped - o.wrapped }
    }
}

impl HostPool {
    /// A zeroed buffer of `n` elements: an idle one of that length when there is one.
    pub fn take_zeroed(&self, n: usize) -> Vec<f32> {
        let mut v = self.take(n);
        v.fill(0.0);
        v
    }

    /// A buffer of `n` elements whose contents are unspecified (an idle one keeps what it held):
    /// for outputs the kernel overwrites entirely.
    pub fn take(&self, n: usize) -> Vec<f32> {
        use std::sync::atomic::Ordering::Relaxed;
        // The lowest idle address of that length: which buffer serves a request depends only on
        // which are idle, not on the order they came back, so repeated work gets the same buffers.
        let idle = self.free.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&n).and_then(|list| {
            let i = (0..list.len()).min_by_key(|&i| list[i].as_ptr() as usize)?;
            Some(list.swap_remove(i))
        });
        let v = match idle {
            Some(v) => {
                self.idle_bytes.fetch_sub(n * 4, Relaxed);
                self.reused.fetch_add(1, Relaxed);
                v
            }
            None => {
                self.created.fetch_add(1, Relaxed);
                vec![0f32; n]
            }
        };
        if let Some(trace) = self.trace.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            trace.push(v.as_ptr() as usize);
        }
        v
    }

    fn give(&self, v: Vec<f32>) {
        use std::sync::atomic::Ordering::Relaxed;
        let bytes = v.len() * 4;
        if v.is_empty() || self.idle_bytes.load(Relaxed) + bytes > MAX_IDLE_BYTES {
            return; // freed
        }
        self.idle_bytes.fetch_add(bytes, Relaxed);
        self.free.lock().unwrap_or_else(|e| e.into_inner()).entry(v.len()).or_default().push(v);
    }

    /// Start recording the address of every buffer handed out (replacing a running trace).
    pub fn start_trace(&self) {
        *self.trace.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    }

    /// Stop recording and return the addresses handed out since `start_trace`, in order: equal
    /// sequences for two runs of the same work mean a captured replay would find its buffers.
    pub fn take_trace(&self) -> Vec<usize> {
        self.trace.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default()
    }

    pub fn counts(&self) -> PoolCounts {
        use std::sync::atomic::Ordering::Relaxed;
        PoolCounts { created: self.created.load(Relaxed), reused: self.reused.load(Relaxed), wrapped: self.wrapped.load(Relaxed) }
    }
}

impl Storage {
    /// Bytes held by the whole storage (all views of it together).
    pub fn bytes(&self) -> usize {
        match self {
            Storage::Cpu(b) => {
                let g = b.buf.read().unwrap_or_else(|e| e.into_inner());
                g.len() * g.dtype().size_in_bytes()
            }
            Storage::Device(d) => d.bytes(),
        }
    }

    /// An address that identifies the storage (for counting shared storage once).
    pub fn id(&self) -> usize {
        match self {
            Storage::Cpu(b) => Arc::as_ptr(b) as usize,
            Storage::Device(d) => Arc::as_ptr(d) as *const () as usize,
        }
    }
}

#[derive(Clone)]
pub struct Tensor {
    storage: Storage,
    dtype: DType,
    /// First element of this view, in elements of `dtype`.
    offset: usize,
    shape: Vec<usize>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({}, {:?}, {}, offset {})", self.device(), self.shape, self.dtype, self.offset)
    }
}

/// A read view of a CPU tensor's elements (holds the storage's read lock).
pub struct CpuRead<'a, T> {
    guard: RwLockReadGuard<'a, CpuBuffer>,
    range: Range<usize>,
    _t: PhantomData<T>,
}

impl<T: CpuElement> Deref for CpuRead<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // The element type was checked when the view was made.
        &T::slice(&self.guard).unwrap_or(&[])[self.range.clone()]
    }
}

impl<T: CpuElement + std::fmt::Debug> std::fmt::Debug for CpuRead<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl<T: CpuElement + PartialEq> PartialEq for CpuRead<'_, T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: CpuElement + PartialEq, const N: usize> PartialEq<&[T; N]> for CpuRead<'_, T> {
    fn eq(&self, other: &&[T; N]) -> bool {
        **self == other[..]
    }
}

impl<T: CpuElement + PartialEq> PartialEq<&[T]> for CpuRead<'_, T> {
    fn eq(&self, other: &&[T]) -> bool {
        **self == **other
    }
}

impl<T: CpuElement + PartialEq> PartialEq<Vec<T>> for CpuRead<'_, T> {
    fn eq(&self, other: &Vec<T>) -> bool {
        **self == other[..]
    }
}

impl<'a, T: CpuElement> IntoIterator for &'a CpuRead<'_, T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// A write view of a CPU tensor's elements (holds the storage's write lock).
pub struct CpuWrite<'a, T> {
    guard: RwLockWriteGuard<'a, CpuBuffer>,
    range: Range<usize>,
    _t: PhantomData<T>,
}

impl<T: CpuElement> Deref for CpuWrite<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &T::slice(&self.guard).unwrap_or(&[])[self.range.clone()]
    }
}

impl<T: CpuElement> DerefMut for CpuWrite<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        let range = self.range.clone();
        &mut T::slice_mut(&mut self.guard).unwrap_or(&mut [])[range]
    }
}

/// A tensor's elements as f32: borrowed when it is f32, widened when it is bf16 or f16.
pub enum F32Data<'a> {
    Borrowed(CpuRead<'a, f32>),
    Widened(Vec<f32>),
}

impl F32Data<'_> {
    /// The elements as an owned vector (moved when they were widened, copied when borrowed).
    pub fn into_vec(self) -> Vec<f32> {
        match self {
            F32Data::Borrowed(r) => r.to_vec(),
            F32Data::Widened(v) => v,
        }
    }
}

impl Deref for F32Data<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            F32Data::Borrowed(r) => r,
            F32Data::Widened(v) => v,
        }
    }
}

fn check_len(op: &'static str, shape: &[usize], n: usize) -> Result<()> {
    let want = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if want != Some(n) {
        return Err(Error::shape(op, format!("shape {shape:?} needs {} elements, got {n}", want.map_or("too many".into(), |w| w.to_string()))));
    }
    Ok(())
}

impl Tensor {
    /// A CPU f32 tensor from its elements; fails if `data.len()` is not the product of `shape`.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Self> {
        Self::from_elems(data, shape)
    }

    /// A CPU tensor of any element type from its elements.
    pub fn from_elems<T: CpuElement>(data: Vec<T>, shape: &[usize]) -> Result<Self> {
        check_len("Tensor::from_vec", shape, data.len())?;
        Ok(Self::whole(T::wrap(data), shape))
    }

    /// A tensor over the whole of a device backend's storage (which holds `shape`'s elements).
    pub fn from_device(storage: Arc<dyn DeviceStorage>, dtype: DType, shape: &[usize]) -> Self {
        Tensor { storage: Storage::Device(storage), dtype, offset: 0, shape: shape.to_vec() }
    }

    fn whole(buf: CpuBuffer, shape: &[usize]) -> Self {
        UNPOOLED_STORAGES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dtype = buf.dtype();
        Tensor { storage: Storage::Cpu(Arc::new(CpuStorage { buf: RwLock::new(buf), pool: None })), dtype, offset: 0, shape: shape.to_vec() }
    }

    /// A CPU f32 tensor of `data` (taken from `pool`) that gives its buffer back to `pool` when its
    /// last handle drops.
    pub fn from_pool(pool: &Arc<HostPool>, data: Vec<f32>, shape: &[usize]) -> Result<Self> {
        check_len("Tensor::from_pool", shape, data.len())?;
        pool.wrapped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Tensor { storage: Storage::Cpu(Arc::new(CpuStorage { buf: RwLock::new(CpuBuffer::F32(data)), pool: Some(pool.clone()) })), dtype: DType::F32, offset: 0, shape: shape.to_vec() })
    }

    /// A CPU f32 tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Self::zeros_of(DType::F32, shape)
    }

    /// A CPU tensor of zeros of any element type.
    pub fn zeros_of(dtype: DType, shape: &[usize]) -> Self {
        Self::whole(CpuBuffer::zeros(dtype, shape.iter().product()), shape)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    /// First element of this view inside its storage.
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Device(d) => d.device(),
        }
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes of this view's elements.
    pub fn size_in_bytes(&self) -> usize {
        self.elem_count() * self.dtype.size_in_bytes()
    }
    /// Size of the last dimension (the feature dimension for activations).
    pub fn last_dim(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
    /// Number of rows when the tensor is seen as `[elem_count / last_dim, last_dim]`.
    pub fn rows(&self) -> usize {
        self.elem_count().checked_div(self.last_dim()).unwrap_or(0)
    }

    /// Whether two tensors are views of the same storage (clones and views are).
    pub fn shares_storage(&self, other: &Tensor) -> bool {
        match (&self.storage, &other.storage) {
            (Storage::Cpu(a), Storage::Cpu(b)) => Arc::ptr_eq(a, b),
            (Storage::Device(a), Storage::Device(b)) => std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b)),
            _ => false,
        }
    }

    /// Whether this is the only handle on its storage (no clone or view of it is alive elsewhere),
    /// so writing into it cannot change what another holder reads.
    pub fn is_unique(&self) -> bool {
        match &self.storage {
            Storage::Cpu(a) => Arc::strong_count(a) == 1,
            Storage::Device(a) => Arc::strong_count(a) == 1,
        }
    }

    /// Whether the element ranges of two views of one storage overlap.
    pub fn overlaps(&self, other: &Tensor) -> bool {
        self.shares_storage(other) && self.offset < other.offset + other.elem_count() && other.offset < self.offset + self.elem_count()
    }

    /// A new storage holding a copy of this view's elements (`clone` shares the storage; a
    /// snapshot that later in-place updates must not change needs this). CPU tensors; a device
    /// backend copies on its device.
    pub fn copy(&self) -> Result<Self> {
        match self.dtype {
            DType::F32 => Self::from_elems(self.cpu_slice::<f32>()?.to_vec(), &self.shape),
            DType::BF16 => Self::from_elems(self.cpu_slice::<bf16>()?.to_vec(), &self.shape),
            DType::F16 => Self::from_elems(self.cpu_slice::<f16>()?.to_vec(), &self.shape),
            DType::U32 => Self::from_elems(self.cpu_slice::<u32>()?.to_vec(), &self.shape),
        }
    }

    /// The same elements under another shape with the same element count (no copy).
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.elem_count() {
            return Err(Error::shape("Tensor::reshape", format!("{:?} -> {shape:?}", self.shape)));
        }
        Ok(Tensor { shape: shape.to_vec(), ..self })
    }

    /// Rows `[start, start + len)` of dim 0, as a view of the same storage (no copy).
    pub fn narrow_rows(&self, start: usize, len: usize) -> Result<Self> {
        let rows = self.shape.first().copied().unwrap_or(0);
        if start.checked_add(len).is_none_or(|end| end > rows) || self.rank() == 0 {
            return Err(Error::shape("Tensor::narrow_rows", format!("rows {start}..{} of a tensor of shape {:?}", start.saturating_add(len), self.shape)));
        }
        let per_row: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = len;
        Ok(Tensor { storage: self.storage.clone(), dtype: self.dtype, offset: self.offset + start * per_row, shape })
    }

    /// Elements `[offset, offset + prod(shape))` of this (flat) view as a tensor of `shape`, a view
    /// of the same storage (how an arena hands out its parameters).
    pub fn view(&self, offset: usize, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if offset.checked_add(n).is_none_or(|end| end > self.elem_count()) {
            return Err(Error::shape("Tensor::view", format!("elements {offset}..{} of a tensor of {}", offset.saturating_add(n), self.elem_count())));
        }
        Ok(Tensor { storage: self.storage.clone(), dtype: self.dtype, offset: self.offset + offset, shape: shape.to_vec() })
    }

    fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.elem_count()
    }

    pub(crate) fn expect_dtype(&self, want: DType) -> Result<()> {
        if self.dtype != want {
            return Err(Error::Unsupported(format!("a {} tensor was given where {want} is needed (shape {:?})", self.dtype, self.shape)));
        }
        Ok(())
    }

    /// A device tensor handed to host code is an error naming the device, not a crash.
    fn cpu_storage(&self) -> Result<&Arc<CpuStorage>> {
        match &self.storage {
            Storage::Cpu(st) => Ok(st),
            Storage::Device(d) => Err(Error::Unsupported(format!(
                "a tensor {:?} on {} was given to code that reads host memory (copy it with Backend::to_host)",
                self.shape,
                d.device()
            ))),
        }
    }

    /// Host elements of a CPU tensor of element type `T`. Waits for no lock: a tensor being
    /// written right now is an error. Device tensors go through `Backend::to_host`.
    pub fn cpu_slice<T: CpuElement>(&self) -> Result<CpuRead<'_, T>> {
        self.expect_dtype(T::DTYPE)?;
        let st = self.cpu_storage()?;
        let guard = match st.buf.try_read() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => {
                return Err(Error::Internal(format!("a tensor {:?} was read while it is being written (an op's output aliases its input)", self.shape)))
            }
        };
        Ok(CpuRead { guard, range: self.range(), _t: PhantomData })
    }

    /// Host elements of a CPU f32 tensor.
    pub fn cpu_data(&self) -> Result<CpuRead<'_, f32>> {
        self.cpu_slice()
    }

    /// Host elements as f32 for any float dtype (bf16/f16 widened exactly).
    pub fn f32_data(&self) -> Result<F32Data<'_>> {
        match self.dtype {
            DType::F32 => Ok(F32Data::Borrowed(self.cpu_slice()?)),
            DType::BF16 => Ok(F32Data::Widened(self.cpu_slice::<bf16>()?.iter().map(|v| v.to_f32()).collect())),
            DType::F16 => Ok(F32Data::Widened(self.cpu_slice::<f16>()?.iter().map(|v| v.to_f32()).collect())),
            DType::U32 => Err(Error::Unsupported(format!("a u32 tensor {:?} was given where floats are needed", self.shape))),
        }
    }

    /// Writable host elements of a CPU tensor of type `T`: every view of the storage is locked
    /// while this lives. Fails (never waits) when the storage is being read or written.
    pub fn cpu_slice_mut<T: CpuElement>(&self) -> Result<CpuWrite<'_, T>> {
        self.expect_dtype(T::DTYPE)?;
        let st = self.cpu_storage()?;
        let guard = match st.buf.try_write() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => {
                return Err(Error::Internal(format!("a tensor {:?} was written while it is being read (an op's output aliases its input)", self.shape)))
            }
        };
        Ok(CpuWrite { guard, range: self.range(), _t: PhantomData })
    }

    /// Writable host elements of a CPU f32 tensor.
    pub fn cpu_data_mut(&self) -> Result<CpuWrite<'_, f32>> {
        self.cpu_slice_mut()
    }

    /// The elements of this view as a host vector (a copy).
    pub fn into_cpu_vec(self) -> Result<Vec<f32>> {
        Ok(self.cpu_data()?.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clone_and_views_share_storage() {
        let t = Tensor::from_vec((0..12).map(|v| v as f32).collect(), &[4, 3]).unwrap();
        let c = t.clone();
        assert!(c.shares_storage(&t));
        let rows = t.narrow_rows(1, 2).unwrap();
        assert_eq!(rows.shape(), &[2, 3]);
        assert_eq!(&*rows.cpu_data().unwrap(), &[3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        // A write through one handle is seen by the others: it is one storage.
        rows.cpu_data_mut().unwrap()[0] = 100.0;
        assert_eq!(t.cpu_data().unwrap()[3], 100.0);
        assert!(rows.overlaps(&t));
        assert!(!rows.overlaps(&t.narrow_rows(3, 1).unwrap()));
        assert!(t.narrow_rows(3, 2).is_err());
    }

    #[test]
    fn aliasing_write_is_an_error_not_a_deadlock() {
        let t = Tensor::from_vec(vec![1.0; 4], &[4]).unwrap();
        let read = t.cpu_data().unwrap();
        assert!(matches!(t.cpu_data_mut().err(), Some(Error::Internal(_))));
        drop(read);
        let write = t.cpu_data_mut().unwrap();
        assert!(matches!(t.cpu_data().err(), Some(Error::Internal(_))));
        drop(write);
    }

    #[test]
    fn into_cpu_vec_of_a_view_copies_only_its_range() {
        let t = Tensor::from_vec((0..6).map(|v| v as f32).collect(), &[3, 2]).unwrap();
        let v = t.narrow_rows(2, 1).unwrap();
        assert_eq!(v.into_cpu_vec().unwrap(), vec![4.0, 5.0]);
        assert_eq!(t.into_cpu_vec().unwrap().len(), 6);
    }

    #[test]
    fn dtype_is_checked_on_access() {
        let t = Tensor::zeros_of(DType::BF16, &[2]);
        assert!(t.cpu_data().is_err());
        assert_eq!(&*t.f32_data().unwrap(), &[0.0, 0.0]);
        assert_eq!(t.size_in_bytes(), 4);
    }
}
