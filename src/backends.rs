//! The run-time choice of a backend: the one place that names both the seam's implementations,
//! so the ground floor (`device`) depends on none of them.

use std::sync::Arc;

use crate::backend::Backend;
use crate::cpu::CpuBackend;
use crate::device::Device;
use crate::error::{Error, Result};

/// The backend that runs the model on `device`: the fast CPU path, or CUDA.
pub fn backend_for(device: Device) -> Result<Arc<dyn Backend>> {
    match device {
        Device::Cpu => Ok(Arc::new(CpuBackend::fast())),
        Device::Cuda(_) => Err(cuda_backend_missing()),
        Device::CudaSim => {
            // Says so first when the binary cannot run the executor at all.
            crate::cuda::Gpu::open(device)?;
            Err(cuda_backend_missing())
        }
    }
}

fn cuda_backend_missing() -> Error {
    Error::Unsupported(
        "the CUDA model backend is not built yet (its device-runtime layer and first kernel, the fused residual + \
         LayerNorm, exist and are tested on cuda-sim); use --device cpu"
            .into(),
    )
}
