//! Devices and their names (`cpu`, `cuda:N`); the backend for one is chosen in `crate::backends`.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
    /// The CUDA kernels on the CPU executor (`cuda-sim`, in binaries built with that feature):
    /// for tests and for kernel authors without a GPU, not for speed.
    CudaSim,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::CudaSim => write!(f, "cuda-sim"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            "cuda-sim" => Ok(Device::CudaSim),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Device::Cuda(i)),
                _ => Err(Error::Input(format!("unknown device `{s}` (expected cpu, cuda, cuda:N or cuda-sim)"))),
            },
        }
    }
}
