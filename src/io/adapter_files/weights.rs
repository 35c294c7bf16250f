//! Adapter and head weights files in either format: safetensors or a `torch.save` archive.

use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::error::{Error, Result};
use crate::io::pickle::{looks_like_torch, StorageDtype, TorchArchive};

/// File bytes: a read-only map of the file or an owned buffer.
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A tensor as a weights file declares it, before any data is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredTensor {
    pub name: String,
    /// The dtype as the file spells it (`F32`, `I64`, ...).
    pub dtype: String,
    /// Set when the dtype is one we read (F32, F16, BF16).
    pub float: Option<StorageDtype>,
    pub shape: Vec<usize>,
}

enum Format {
    Safetensors { bytes: Bytes, data_start: usize, metadata: Metadata },
    Torch(TorchArchive),
}

/// An adapter or head weights file in either format, validated when opened; tensor data is
/// decoded on request, so a caller can check names, dtypes and shapes first.
pub struct WeightsFile {
    path: PathBuf,
    format: Format,
    tensors: Vec<StoredTensor>,
}

impl WeightsFile {
    /// Open a safetensors file or a `torch.save` archive (told apart by their first bytes).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = crate::io::open_regular(path)?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Err(Error::malformed(path, "empty file (expected safetensors or a torch.save archive)"));
        }
        // SAFETY: read-only map; bytes changing underneath can only yield other numbers or
        // errors, every access is bounds-checked.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        if looks_like_torch(&mmap) {
            drop(mmap);
            return Self::from_torch(TorchArchive::open(path)?);
        }
        refuse_other_bin(&mmap, path)?;
        Self::from_safetensors(Bytes::Mapped(mmap), path)
    }

    /// The same from bytes in memory; `origin` names them in errors.
    pub fn from_bytes(bytes: Vec<u8>, origin: &Path) -> Result<Self> {
        if looks_like_torch(&bytes) {
            return Self::from_torch(TorchArchive::from_bytes(bytes, origin)?);
        }
        refuse_other_bin(&bytes, origin)?;
        Self::from_safetensors(Bytes::Owned(bytes), origin)
    }

    fn from_torch(archive: TorchArchive) -> Result<Self> {
        let tensors = archive
            .tensors()
            .iter()
            .map(|t| StoredTensor {
                name: t.name.clone(),
                dtype: t.storage.dtype.name().into(),
                float: Some(t.storage.dtype),
                shape: t.shape.clone(),
            })
            .collect();
        Ok(WeightsFile { path: archive.path().to_path_buf(), format: Format::Torch(archive), tensors })
    }

    fn from_safetensors(bytes: Bytes, path: &Path) -> Result<Self> {
        let (header_len, metadata) = read_safetensors_header(&bytes, path)?;
        let mut tensors = Vec::new();
        for name in metadata.offset_keys() {
            let Some(info) = metadata.info(&name) else { continue };
            let float = match info.dtype {
                Dtype::F32 => Some(StorageDtype::F32),
                Dtype::F16 => Some(StorageDtype::F16),
                Dtype::BF16 => Some(StorageDtype::BF16),
                _ => None,
            };
            tensors.push(StoredTensor { name, dtype: format!("{:?}", info.dtype), float, shape: info.shape.clone() });
        }
        Ok(WeightsFile { path: path.to_path_buf(), format: Format::Safetensors { bytes, data_start: 8 + header_len, metadata }, tensors })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor, in file order.
    pub fn tensors(&self) -> &[StoredTensor] {
        &self.tensors
    }

    /// A float tensor's elements as f32 (F16/BF16 widen exactly).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensors.iter().find(|t| t.name == name).ok_or_else(|| Error::tensor(&self.path, name, "not in the file"))?;
        let Some(dtype) = t.float else {
            return Err(Error::tensor(&self.path, name, format!("dtype {} is not supported (expected F32, F16 or BF16)", t.dtype)));
        };
        match &self.format {
            Format::Torch(archive) => archive.read_f32(name),
            Format::Safetensors { bytes, data_start, metadata } => {
                let info = metadata.info(name).ok_or_else(|| Error::tensor(&self.path, name, "not in the file"))?;
                let (a, b) = info.data_offsets;
                // Validated against the file length when the header was read.
                let data = bytes.get(data_start + a..data_start + b).ok_or_else(|| Error::tensor(&self.path, name, "data out of range"))?;
                Ok(dtype.decode(data))
            }
        }
    }
}

/// A `.bin` that is not a torch.save zip archive is not safetensors either: say what it is
/// rather than reading its first bytes as a safetensors header length.
fn refuse_other_bin(bytes: &[u8], path: &Path) -> Result<()> {
    if path.extension().is_none_or(|e| e != "bin") {
        return Ok(());
    }
    Err(Error::malformed(
        path,
        match bytes.first() {
            // A pickle stream's PROTO opcode: torch.save's legacy format (before torch 1.6).
            Some(0x80) => "torch.save's legacy (pre-1.6, not zip) format, which is not read: save it again with torch >= 1.6, or as adapter.safetensors",
            _ => "not a torch.save archive (no zip header) nor safetensors",
        }
        .to_string(),
    ))
}

/// The safetensors header, with one clear message per way it can be broken.
fn read_safetensors_header(bytes: &[u8], path: &Path) -> Result<(usize, Metadata)> {
    let bad = |msg: String| Error::malformed(path, msg);
    if bytes.is_empty() {
        return Err(bad("empty file (expected safetensors)".into()));
    }
    if bytes.len() < 8 {
        return Err(bad(format!("{} bytes: too short for a safetensors file (the 8-byte header length is cut off)", bytes.len())));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(len8);
    let room = bytes.len() as u64 - 8;
    if n > room {
        return Err(bad(format!("header length {n} runs past the end of the file ({room} bytes follow it): truncated or not safetensors")));
    }
    SafeTensors::read_metadata(bytes).map_err(|e| {
        bad(match e {
            SafeTensorError::InvalidHeader(_) | SafeTensorError::InvalidHeaderDeserialization(_) => {
                format!("safetensors header is not valid JSON of tensor entries: {e}")
            }
            SafeTensorError::HeaderTooLarge => format!("safetensors header of {n} bytes is larger than the format allows"),
            SafeTensorError::InvalidOffset(name) => {
                format!("tensor `{name}`: data offsets out of order, overlapping, or leaving a gap (they must tile the data section)")
            }
            SafeTensorError::MetadataIncompleteBuffer => {
                "the header's data offsets do not end at the end of the file (truncated or padded data section)".into()
            }
            SafeTensorError::TensorInvalidInfo => "a tensor's data offsets do not match its dtype and shape".into(),
            SafeTensorError::ValidationOverflow => "a tensor's shape overflows when multiplied out".into(),
            other => format!("not a valid safetensors file: {other}"),
        })
    })
}
