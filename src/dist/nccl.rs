//! The NCCL communicator (cargo feature `nccl`): one GPU per rank, through cudarc's NCCL
//! bindings (libnccl is loaded at run time, like the rest of CUDA).
//!
//! NCCL needs its unique id handed from rank 0 to the others before it can talk: `new` takes
//! another communicator for that (the MPI one, under `mpirun`), which carries the id's 128
//! bytes once. After that every collective runs on the GPU.
//!
//! The gradient arena is reduced where it lies: [`NcclComm::on_gpu`] builds the communicator on
//! the CUDA backend's own stream, and [`Communicator::all_reduce_sum_tensor`] hands NCCL the
//! arena's device address, queued behind the backward's kernels and ahead of the clipping's,
//! with no copy of the arena. The host-slice collectives ([`Communicator`]'s other
//! methods: a few floats of flags, losses and ids) copy the buffer to the GPU, reduce it there
//! (NCCL's ring: every rank gets the same bits) and copy it back.

use std::sync::Arc;

use cudarc::driver::{sys::CUdeviceptr, CudaSlice, CudaStream, DevicePtrMut, DeviceSlice, SyncOnDrop};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::{all_reduce_sum_tensor_via_host, check_root, Communicator};
use crate::backend::Backend;
use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// NCCL's unique id is 128 bytes.
const ID_BYTES: usize = 128;

pub struct NcclComm {
    comm: Comm,
    stream: Arc<CudaStream>,
}

fn nccl_err(op: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("NCCL {op}: {e:?}"))
}

impl NcclComm {
    /// This rank's NCCL communicator on GPU `ordinal`, on a stream of its own, with as many
    /// ranks as `bootstrap` has; `bootstrap` carries rank 0's id to the others (one broadcast of
    /// 128 values). A missing driver, GPU or libnccl is an `Error::Cuda` naming it, never a panic.
    pub fn new(ordinal: usize, bootstrap: &dyn Communicator) -> Result<Self> {
        let ctx = crate::cuda::probe::probe_gpu(ordinal).map_err(Error::Cuda)?;
        Self::on_stream(ctx.default_stream(), bootstrap)
    }

    /// This rank's NCCL communicator on `gpu`'s stream (a CUDA GPU, not cuda-sim), so that its
    /// all-reduce of a tensor of the backend on `gpu` is ordered with the backend's kernels.
    pub fn on_gpu(gpu: &Gpu, bootstrap: &dyn Communicator) -> Result<Self> {
        let rt = gpu.cuda_runtime().ok_or_else(|| Error::Unsupported(format!("NCCL needs a CUDA GPU, not {}", gpu.describe())))?;
        Self::on_stream(rt.stream().clone(), bootstrap)
    }

    fn on_stream(stream: Arc<CudaStream>, bootstrap: &dyn Communicator) -> Result<Self> {
        // cudarc panics on first use of a library it cannot load: ask first.
        // SAFETY: only dlopens and closes the library; no symbol is called.
        let present = std::panic::catch_unwind(|| unsafe { cudarc::nccl::sys::is_culib_present() }).unwrap_or(false);
        if !present {
            return Err(Error::Cuda("libnccl cannot be loaded (install NCCL, e.g. the nvidia-nccl-cu13 wheel, and put its lib/ on LD_LIBRARY_PATH)".into()));
        }
        let mut bytes = vec![0f32; ID_BYTES];
        if bootstrap.rank() == 0 {
            let id = Id::new().map_err(|e| nccl_err("get unique id", e))?;
            for (b, &c) in bytes.iter_mut().zip(id.internal().iter()) {
                *b = c as u8 as f32; // 0..=255: exact in f32
            }
        }
        bootstrap.broadcast(&mut bytes, 0)?;
        let mut internal = [0 as std::ffi::c_char; ID_BYTES];
        for (c, &b) in internal.iter_mut().zip(&bytes) {
            *c = b as u8 as std::ffi::c_char;
        }
        let comm = Comm::from_rank(stream.clone(), bootstrap.rank(), bootstrap.size(), Id::uninit(internal)).map_err(|e| nccl_err("init rank", e))?;
        Ok(NcclComm { comm, stream })
    }

    /// Sum `buf` over the ranks in place on the GPU (queued on this communicator's stream).
    pub fn all_reduce_device(&self, buf: &mut CudaSlice<f32>) -> Result<()> {
        self.comm.all_reduce_in_place(buf, &ReduceOp::Sum).map_err(|e| nccl_err("all-reduce", e))?;
        Ok(())
    }

    fn staged(&self, buf: &mut [f32], op: impl FnOnce(&mut CudaSlice<f32>) -> Result<()>) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut dev = self.stream.clone_htod(&*buf).map_err(|e| Error::Cuda(format!("NCCL staging upload: {e}")))?;
        op(&mut dev)?;
        self.stream.memcpy_dtoh(&dev, buf).map_err(|e| Error::Cuda(format!("NCCL staging download: {e}")))?;
        self.stream.synchronize().map_err(|e| Error::Cuda(format!("NCCL synchronize: {e}")))
    }
}

/// `len` f32 values at device address `ptr` on `stream`'s context, owned elsewhere (a tensor of
/// the CUDA backend), in the form cudarc's NCCL calls take. The memory is only ever used on
/// `stream`, so no event needs recording around it.
struct BorrowedF32 {
    ptr: CUdeviceptr,
    len: usize,
    stream: Arc<CudaStream>,
}

impl DeviceSlice<f32> for BorrowedF32 {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl DevicePtrMut<f32> for BorrowedF32 {
    fn device_ptr_mut<'a>(&'a mut self, _stream: &'a CudaStream) -> (CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

impl Communicator for NcclComm {
    /// On the GPU when `t` is an f32 tensor of a CUDA backend on this communicator's stream
    /// ([`NcclComm::on_gpu`]): NCCL sums it in place, queued on the stream, and `extra` goes
    /// through the host; anything else through the host with `extra` in the same all-reduce.
    fn all_reduce_sum_tensor(&self, be: &dyn Backend, t: &Tensor, extra: &mut [f32]) -> Result<()> {
        let same_stream = be.gpu().and_then(Gpu::cuda_runtime).is_some_and(|rt| Arc::ptr_eq(rt.stream(), &self.stream));
        let Some((ptr, len)) = crate::cuda::backend::cuda_f32_device_ptr(t).filter(|_| same_stream) else {
            return all_reduce_sum_tensor_via_host(self, be, t, extra);
        };
        if len > 0 {
            let mut mem = BorrowedF32 { ptr, len, stream: self.stream.clone() };
            self.comm.all_reduce_in_place(&mut mem, &ReduceOp::Sum).map_err(|e| nccl_err("all-reduce of the gradient arena", e))?;
        }
        self.all_reduce_sum(extra)
    }

    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn size(&self) -> usize {
        self.comm.world_size()
    }

    fn name(&self) -> String {
        format!("NCCL, {} ranks", self.size())
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.staged(buf, |dev| self.all_reduce_device(dev))
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        check_root(root, self.size())?;
        self.staged(buf, |dev| {
            self.comm.broadcast_in_place(dev, root as i32).map_err(|e| nccl_err("broadcast", e))?;
            Ok(())
        })
    }

    fn barrier(&self) -> Result<()> {
        let mut one = [0f32];
        self.all_reduce_sum(&mut one)
    }
}
