//! A dense, row-major tensor that lives on exactly one device.
//!
//! The model only ever sees `Tensor`; the backend that made a tensor is the only code that reads
//! its storage. There are no implicit copies between devices: `Backend::to_host` is the one way
//! back to the CPU.

use crate::device::Device;
use crate::error::{Error, Result};

/// Element type of a tensor's storage. Everything computes in f32 today; bf16/f16 storage
/// arrives with the mixed-precision work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
        }
    }
}

/// Where a tensor's elements are.
#[derive(Clone, Debug)]
pub enum Storage {
    Cpu(Vec<f32>),
}

#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage,
}

impl Tensor {
    /// A CPU tensor from its elements; fails if `data.len()` is not the product of `shape`.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::shape("Tensor::from_vec", format!("shape {shape:?} needs {n} elements, got {}", data.len())));
        }
        Ok(Tensor { shape: shape.to_vec(), dtype: DType::F32, storage: Storage::Cpu(data) })
    }

    pub fn zeros(shape: &[usize]) -> Self {
        let n = shape.iter().product();
        Tensor { shape: shape.to_vec(), dtype: DType::F32, storage: Storage::Cpu(vec![0.0; n]) }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> Device {
        match self.storage {
            Storage::Cpu(_) => Device::Cpu,
        }
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
    /// Size of the last dimension (the feature dimension for activations).
    pub fn last_dim(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
    /// Number of rows when the tensor is seen as `[elem_count / last_dim, last_dim]`.
    pub fn rows(&self) -> usize {
        self.elem_count().checked_div(self.last_dim()).unwrap_or(0)
    }

    /// The same elements under another shape with the same element count.
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.elem_count() {
            return Err(Error::shape("Tensor::reshape", format!("{:?} -> {shape:?}", self.shape)));
        }
        Ok(Tensor { shape: shape.to_vec(), ..self })
    }

    /// Host elements of a CPU tensor. Device tensors go through `Backend::to_host`.
    pub fn cpu_data(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::Cpu(v) => Ok(v),
        }
    }
    pub fn cpu_data_mut(&mut self) -> Result<&mut [f32]> {
        match &mut self.storage {
            Storage::Cpu(v) => Ok(v),
        }
    }
    pub fn into_cpu_vec(self) -> Result<Vec<f32>> {
        match self.storage {
            Storage::Cpu(v) => Ok(v),
        }
    }
}
