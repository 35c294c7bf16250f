//! A safetensors file, memory-mapped and validated once; tensors are decoded on request.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

pub struct TensorFile {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    metadata: Metadata,
}

impl TensorFile {
    /// Map `path` and validate its header: offsets in range, contiguous, not overlapping, and
    /// covering the file exactly. Nothing is read beyond the header until a tensor is requested.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only; a concurrent writer could change bytes under us, which
        // safetensors' validation cannot prevent either, but it cannot cause unsoundness in the
        // decoding below (we only copy bytes out).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| Error::malformed(&path, format!("not a valid safetensors file: {e}")))?;
        Ok(TensorFile { path, data_start: 8 + header_len, metadata, mmap })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in file order.
    pub fn names(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.metadata.info(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.info(name).is_some()
    }

    fn bytes(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let info = self.info(name).ok_or_else(|| Error::tensor(&self.path, name, "missing"))?;
        let (a, b) = info.data_offsets;
        Ok((info, &self.mmap[self.data_start + a..self.data_start + b]))
    }

    /// A floating-point tensor as f32 (F32, F16 and BF16 are accepted and widened exactly).
    pub fn read_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let (info, bytes) = self.bytes(name)?;
        let data: Vec<f32> = match info.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => {
                return Err(Error::tensor(&self.path, name, format!("dtype {other:?} is not a float type (expected F32, F16 or BF16)")))
            }
        };
        Ok((data, info.shape.clone()))
    }

    /// An integer tensor as i64 (I64, I32, and for masks also BOOL/U8/I8).
    pub fn read_i64(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        let (info, bytes) = self.bytes(name)?;
        let data: Vec<i64> = match info.dtype {
            Dtype::I64 => bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("chunk of 8"))).collect(),
            Dtype::I32 => bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("chunk of 4")) as i64).collect(),
            Dtype::BOOL | Dtype::U8 => bytes.iter().map(|&b| b as i64).collect(),
            Dtype::I8 => bytes.iter().map(|&b| b as i8 as i64).collect(),
            other => {
                return Err(Error::tensor(&self.path, name, format!("dtype {other:?} is not an integer type (expected I64 or I32)")))
            }
        };
        Ok((data, info.shape.clone()))
    }
}

/// One tensor to write: F32 data or I64 data.
pub enum OutTensor {
    F32 { shape: Vec<usize>, data: Vec<f32> },
    I64 { shape: Vec<usize>, data: Vec<i64> },
}

/// Write named tensors as a safetensors file, atomically: a temporary file in the same folder,
/// fsync, rename. A failure leaves any earlier file at `path` untouched.
pub fn write_safetensors(path: &Path, tensors: &[(String, OutTensor)], metadata: Option<&[(&str, &str)]>) -> Result<()> {
    let mut header = serde_json::Map::new();
    if let Some(meta) = metadata {
        let m: serde_json::Map<String, serde_json::Value> =
            meta.iter().map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string()))).collect();
        header.insert("__metadata__".into(), m.into());
    }
    let mut offset = 0usize;
    for (name, t) in tensors {
        let (dtype, shape, len) = match t {
            OutTensor::F32 { shape, data } => ("F32", shape, data.len() * 4),
            OutTensor::I64 { shape, data } => ("I64", shape, data.len() * 8),
        };
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut header_bytes = serde_json::to_vec(&header).map_err(|e| Error::malformed(path, e.to_string()))?;
    // Pad the header with spaces so the data section starts 8-byte aligned, as the format allows.
    while (header_bytes.len() + 8) % 8 != 0 {
        header_bytes.push(b' ');
    }
    let mut buf = Vec::with_capacity(8 + header_bytes.len() + offset);
    buf.extend_from_slice(&(header_bytes.len() as u64).to_le_bytes());
    buf.extend_from_slice(&header_bytes);
    for (_, t) in tensors {
        match t {
            OutTensor::F32 { data, .. } => buf.extend_from_slice(bytemuck::cast_slice(data)),
            OutTensor::I64 { data, .. } => data.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes())),
        }
    }
    write_atomic(path, &buf)
}

/// Replace `path` with `bytes` atomically (temp file in the same folder, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().ok_or_else(|| Error::malformed(path, "not a file path"))?;
    let tmp = dir.join(format!(".{}.tmp-{}", file_name.to_string_lossy(), std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all(); // make the rename durable where the platform allows
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}
