//! The run-time choice of a backend: the one place that names both the seam's implementations,
//! so the ground floor (`device`) depends on none of them.

use std::sync::Arc;

use crate::backend::Backend;
use crate::cpu::CpuBackend;
use crate::device::Device;
use crate::error::Result;

/// The backend that runs the model on `device`: the fast CPU path, or CUDA.
pub fn backend_for(device: Device) -> Result<Arc<dyn Backend>> {
    match device {
        Device::Cpu => Ok(Arc::new(CpuBackend::fast())),
        Device::Cuda(_) | Device::CudaSim => Ok(Arc::new(crate::cuda::backend::CudaBackend::open(device)?)),
    }
}

