//! The NCCL communicator (cargo feature `nccl`): one GPU per rank, through cudarc's NCCL
//! bindings (libnccl is loaded at run time, like the rest of CUDA).
//!
//! NCCL needs its unique id handed from rank 0 to the others before it can talk: `new` takes
//! another communicator for that (the MPI one, under `mpirun`), which carries the id's 128
//! bytes once. After that every collective runs on the GPU.
//!
//! [`Communicator`] works on host slices, so its methods here copy the buffer to the GPU,
//! all-reduce it there (NCCL's ring: every rank gets the same bits) and copy it back;
//! [`NcclComm::all_reduce_device`] reduces a buffer that already lives on the GPU.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::{check_root, Communicator};
use crate::error::{Error, Result};

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
    /// This rank's NCCL communicator on GPU `ordinal`, with as many ranks as `bootstrap` has;
    /// `bootstrap` carries rank 0's id to the others (one broadcast of 128 values).
    /// A missing driver, GPU or libnccl is an `Error::Cuda` naming it, never a panic.
    pub fn new(ordinal: usize, bootstrap: &dyn Communicator) -> Result<Self> {
        let ctx = crate::cuda::probe::probe_gpu(ordinal).map_err(Error::Cuda)?;
        // cudarc panics on first use of a library it cannot load: ask first.
        // SAFETY: only dlopens and closes the library; no symbol is called.
        let present = std::panic::catch_unwind(|| unsafe { cudarc::nccl::sys::is_culib_present() }).unwrap_or(false);
        if !present {
            return Err(Error::Cuda("libnccl cannot be loaded (install NCCL, e.g. the nvidia-nccl-cu13 wheel, and put its lib/ on LD_LIBRARY_PATH)".into()));
        }
        let stream = ctx.default_stream();
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

impl Communicator for NcclComm {
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
