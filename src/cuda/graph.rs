//! Captured launch sequences: a CUDA graph on a GPU, a recorded launch list on cuda-sim.
//!
//! [`super::Gpu::begin_capture`] starts recording the work enqueued on the `Gpu` (kernels, dense
//! products, memsets, device-to-device copies) instead of running it; [`super::Gpu::end_capture`]
//! returns it as a [`LaunchGraph`], and [`super::Gpu::replay`] runs the whole sequence again, on
//! the same buffers, with whatever they hold by then. On a GPU this is `cuStreamBeginCapture` /
//! `cuStreamEndCapture` / `cuGraphLaunch` on the `Gpu`'s stream; on the executor each operation is
//! kept as a closure over its arguments (addresses and scalars as they were at capture) and
//! replayed in order, so CI exercises exactly what a graph bakes in.
//!
//! The rules of stream capture hold on both, so code that captures on the executor captures on
//! a GPU:
//! - no host transfer and no synchronisation while capturing (`copy_htod`, `copy_dtoh`,
//!   `synchronize`, events): they are errors. Inputs go into fixed buffers before a replay;
//! - no device allocation: buffers come from the pool ([`super::pool`]), so a capture follows an
//!   uncaptured run at the same shapes. Blocks freed during the capture stay reserved for the
//!   graph until it is dropped;
//! - scalar arguments are fixed at capture: what changes per replay (a learning rate, a step
//!   count, a dropout seed) must be read by the kernels from device memory.

use std::sync::Arc;

use cudarc::driver::CudaGraph;

use super::pool::{Block, Pool};
#[cfg(feature = "cuda-sim")]
use crate::error::Result;

/// One recorded operation of the executor: the host code that performs it, with its addresses
/// and scalars captured.
#[cfg(feature = "cuda-sim")]
pub(crate) type RecordedOp = Box<dyn Fn() -> Result<()> + Send + Sync>;

/// A capture in progress on a [`super::Gpu`].
pub(crate) enum Capture {
    /// The stream is capturing (cuStreamBeginCapture).
    Cuda,
    /// The operations recorded so far.
    #[cfg(feature = "cuda-sim")]
    Sim(Vec<RecordedOp>),
}

pub(crate) enum GraphBody {
    Cuda(CudaGraph),
    #[cfg(feature = "cuda-sim")]
    Sim(Vec<RecordedOp>),
}

/// A captured sequence of device work, replayed by [`super::Gpu::replay`].
pub struct LaunchGraph {
    pub(crate) body: GraphBody,
    /// Blocks freed during the capture: the replay writes them, so nobody else may get them.
    reserved: Vec<Block>,
    pub(crate) pool: Arc<Pool>,
}

impl LaunchGraph {
    pub(crate) fn new(body: GraphBody, reserved: Vec<Block>, pool: Arc<Pool>) -> LaunchGraph {
        LaunchGraph { body, reserved, pool }
    }

    /// The operations recorded, on the executor (`None` for a CUDA graph, whose nodes the driver
    /// keeps).
    pub fn recorded_ops(&self) -> Option<usize> {
        match &self.body {
            GraphBody::Cuda(_) => None,
            #[cfg(feature = "cuda-sim")]
            GraphBody::Sim(ops) => Some(ops.len()),
        }
    }

    /// Bytes of the blocks the graph holds for its scratch.
    pub fn reserved_bytes(&self) -> usize {
        self.reserved.iter().map(|b| b.bytes).sum()
    }
}

impl std::fmt::Debug for LaunchGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaunchGraph").field("recorded_ops", &self.recorded_ops()).field("reserved_bytes", &self.reserved_bytes()).finish()
    }
}

impl Drop for LaunchGraph {
    fn drop(&mut self) {
        self.pool.return_reserved(std::mem::take(&mut self.reserved));
    }
}
