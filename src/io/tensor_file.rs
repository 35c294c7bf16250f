//! A safetensors file, memory-mapped and validated once; tensors are decoded on request.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
pub use crate::io::atomic::write_atomic;
use crate::io::atomic::StagedFile;

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
        let file = crate::io::open_regular(&path)?;
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
                return Err(Error::tensor(&self.path, name, format!("dtype {other:?} is not supported (expected F32, F16 or BF16)")))
            }
        };
        Ok((data, info.shape.clone()))
    }

    /// An integer tensor (ids, labels) as i64: I64 or I32 only.
    pub fn read_i64(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        self.read_integers(name, false)
    }

    /// A 0/1 mask as i64: I64 or I32, and also BOOL, U8 or I8 (Hugging Face masks are often bool).
    /// The values are not checked here.
    pub fn read_mask(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        self.read_integers(name, true)
    }

    fn read_integers(&self, name: &str, byte_types: bool) -> Result<(Vec<i64>, Vec<usize>)> {
        let (info, bytes) = self.bytes(name)?;
        let expected = if byte_types { "I64, I32, BOOL, U8 or I8" } else { "I64 or I32" };
        let data: Vec<i64> = match info.dtype {
            Dtype::I64 => bytes.chunks_exact(8).map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect(),
            Dtype::I32 => bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect(),
            Dtype::BOOL | Dtype::U8 if byte_types => bytes.iter().map(|&b| b as i64).collect(),
            Dtype::I8 if byte_types => bytes.iter().map(|&b| b as i8 as i64).collect(),
            Dtype::BOOL | Dtype::U8 | Dtype::I8 | Dtype::I16 | Dtype::U16 | Dtype::U32 | Dtype::U64 => {
                return Err(Error::tensor(&self.path, name, format!("dtype {:?} is not accepted (expected {expected})", info.dtype)))
            }
            other => return Err(Error::tensor(&self.path, name, format!("dtype {other:?} is not an integer type (expected {expected})"))),
        };
        Ok((data, info.shape.clone()))
    }
}

/// One tensor to write: F32 data or I64 data.
pub enum OutTensor {
    F32 { shape: Vec<usize>, data: Vec<f32> },
    I64 { shape: Vec<usize>, data: Vec<i64> },
}

/// The element type of a tensor written by [`SafetensorsWriter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDtype {
    F32,
    I64,
}

impl OutDtype {
    pub fn size(self) -> usize {
        match self {
            OutDtype::F32 => 4,
            OutDtype::I64 => 8,
        }
    }

    fn name(self) -> &'static str {
        match self {
            OutDtype::F32 => "F32",
            OutDtype::I64 => "I64",
        }
    }
}

impl OutTensor {
    fn dtype_shape(&self) -> (OutDtype, &[usize]) {
        match self {
            OutTensor::F32 { shape, .. } => (OutDtype::F32, shape),
            OutTensor::I64 { shape, .. } => (OutDtype::I64, shape),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self {
            OutTensor::F32 { data, .. } => bytemuck::cast_slice(data).to_vec(),
            OutTensor::I64 { data, .. } => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// One tensor's place in a file being written.
struct Slot {
    name: String,
    start: u64,
    len: u64,
    written: u64,
}

/// A safetensors file whose header is written first and whose tensor data is then written in
/// pieces, in any order (e.g. row blocks of several tensors per batch), so an output far larger
/// than memory streams to disk. Staged under a temporary name and made visible by `commit`,
/// which also checks that every byte of every tensor was written.
pub struct SafetensorsWriter {
    staged: StagedFile,
    slots: Vec<Slot>,
}

impl SafetensorsWriter {
    /// Lay out `tensors` (name, dtype, shape) in order and write the header.
    pub fn create(path: &Path, tensors: &[(String, OutDtype, Vec<usize>)], metadata: Option<&[(&str, &str)]>) -> Result<Self> {
        let mut header = serde_json::Map::new();
        if let Some(meta) = metadata {
            let m: serde_json::Map<String, serde_json::Value> =
                meta.iter().map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string()))).collect();
            header.insert("__metadata__".into(), m.into());
        }
        let mut offset = 0u64;
        let mut slots = Vec::with_capacity(tensors.len());
        for (name, dtype, shape) in tensors {
            let len = shape
                .iter()
                .try_fold(dtype.size() as u64, |n, &d| n.checked_mul(d as u64))
                .ok_or_else(|| Error::tensor(path, name, format!("shape {shape:?} is too large to write")))?;
            if header.contains_key(name) {
                return Err(Error::tensor(path, name, "written twice"));
            }
            header.insert(name.clone(), serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, offset + len]}));
            slots.push(Slot { name: name.clone(), start: offset, len, written: 0 });
            offset += len;
        }
        let mut header_bytes = serde_json::to_vec(&header).map_err(|e| Error::internal(format!("{}: header: {e}", path.display())))?;
        // Pad the header with spaces so the data section starts 8-byte aligned, as the format allows.
        while (header_bytes.len() + 8) % 8 != 0 {
            header_bytes.push(b' ');
        }
        let data_start = 8 + header_bytes.len() as u64;
        let mut staged = StagedFile::create(path)?;
        let io = |e| Error::io(path, e);
        let file = staged.file();
        file.write_all(&(header_bytes.len() as u64).to_le_bytes()).map_err(io)?;
        file.write_all(&header_bytes).map_err(io)?;
        file.set_len(data_start + offset).map_err(io)?;
        slots.iter_mut().for_each(|s| s.start += data_start);
        Ok(SafetensorsWriter { staged, slots })
    }

    /// Write `bytes` into tensor number `tensor` (in `create` order) at `offset` bytes from its start.
    pub fn write_at(&mut self, tensor: usize, offset: u64, bytes: &[u8]) -> Result<()> {
        let path = self.staged.dest().to_path_buf();
        let slot = self.slots.get_mut(tensor).ok_or_else(|| Error::malformed(&path, format!("no tensor number {tensor}")))?;
        if offset.checked_add(bytes.len() as u64).is_none_or(|end| end > slot.len) {
            return Err(Error::tensor(&path, &slot.name, format!("{} bytes at offset {offset} overrun its {} bytes", bytes.len(), slot.len)));
        }
        slot.written += bytes.len() as u64;
        let at = slot.start + offset;
        let file = self.staged.file();
        file.seek(SeekFrom::Start(at)).and_then(|_| file.write_all(bytes)).map_err(|e| Error::io(&path, e))
    }

    /// Check that every tensor was written in full, then make the file visible atomically.
    pub fn commit(self) -> Result<()> {
        if let Some(s) = self.slots.iter().find(|s| s.written != s.len) {
            return Err(Error::tensor(self.staged.dest(), &s.name, format!("{} of its {} bytes were written", s.written, s.len)));
        }
        self.staged.commit()
    }
}

/// Write named tensors as a safetensors file, atomically: a temporary file in the same folder,
/// fsync, rename. A failure leaves any earlier file at `path` untouched.
pub fn write_safetensors(path: &Path, tensors: &[(String, OutTensor)], metadata: Option<&[(&str, &str)]>) -> Result<()> {
    let specs: Vec<(String, OutDtype, Vec<usize>)> = tensors
        .iter()
        .map(|(name, t)| {
            let (dtype, shape) = t.dtype_shape();
            (name.clone(), dtype, shape.to_vec())
        })
        .collect();
    let mut writer = SafetensorsWriter::create(path, &specs, metadata)?;
    for (i, (_, t)) in tensors.iter().enumerate() {
        writer.write_at(i, 0, &t.bytes())?;
    }
    writer.commit()
}
