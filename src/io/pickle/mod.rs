//! `pytorch_adapter.bin`: the archive `torch.save` writes, read without executing anything.
//!
//! The archive is a zip with `<prefix>/data.pkl` (a pickle) and `<prefix>/data/<key>` (the raw
//! storages), plus `byteorder` and `version` records. A pickle is a program for a stack machine
//! that may import and call any Python function; `torch.load` trusts it. This reader is an
//! interpreter for the small subset `torch.save(state_dict)` emits, and nothing else:
//!
//! * the top-level object is a `dict` or a `collections.OrderedDict` of `str` to tensor;
//! * a tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
//!   OrderedDict())`, where `storage` is a persistent id
//!   `("storage", torch.{Float,Half,BFloat16}Storage, key, location, numel)`;
//! * the only globals are those four names plus `collections.OrderedDict`, and they can only be
//!   used in those positions.
//!
//! Every other opcode and global is refused with an error naming it. Sizes are checked against
//! the bytes before anything is allocated, so a hostile file costs at most its own size in
//! memory (plus bounded decompression; see [`TorchArchive`]). A storage larger than what its
//! tensors use is refused, and each storage is inflated at most once however many tensors view
//! it, so reading costs time in proportion to the tensor data returned.

mod archive;
mod interpreter;
mod values;

pub use archive::{looks_like_torch, looks_like_zip, TorchArchive};
pub use interpreter::parse_state_dict;

/// Largest `data.pkl` accepted. A whole BERT-large state dict pickles to under 100 KiB.
pub const MAX_PICKLE_BYTES: u64 = 4 << 20;
/// Largest total of all storages an archive may declare. Adapters are megabytes; this bounds the
/// work a lying archive can ask for.
pub const MAX_STORAGE_BYTES: u64 = 4 << 30;


/// Element types of the storages accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    F16,
    BF16,
}

impl StorageDtype {
    pub fn size(self) -> usize {
        match self {
            StorageDtype::F32 => 4,
            StorageDtype::F16 | StorageDtype::BF16 => 2,
        }
    }

    /// The safetensors spelling, used in messages and reports.
    pub fn name(self) -> &'static str {
        match self {
            StorageDtype::F32 => "F32",
            StorageDtype::F16 => "F16",
            StorageDtype::BF16 => "BF16",
        }
    }

    /// Little-endian bytes to f32 (F16 and BF16 widen exactly).
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            StorageDtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            StorageDtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            StorageDtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        }
    }
}

/// A storage as a persistent id names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageRef {
    /// The member name under `<prefix>/data/`.
    pub key: String,
    pub dtype: StorageDtype,
    /// Number of elements of the whole storage.
    pub numel: u64,
}

/// One entry of the state dict: a contiguous view into a storage, checked to lie inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickledTensor {
    pub name: String,
    pub storage: StorageRef,
    /// Offset of the first element, in elements.
    pub offset: u64,
    pub shape: Vec<usize>,
}

impl PickledTensor {
    pub fn numel(&self) -> u64 {
        // Checked to fit when the tensor was built.
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// Why a pickle was refused, with the byte offset of the opcode at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickleError {
    pub offset: usize,
    pub msg: String,
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pickle byte {}: {}", self.offset, self.msg)
    }
}
