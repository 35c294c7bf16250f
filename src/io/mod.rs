//! Files in and out: safetensors tensors, HF BERT weights, input batches, output dumps.

pub mod adapter_files;
pub mod atomic;
pub mod batch;
pub mod pickle;
pub mod tensor_file;
pub mod weights;

pub use batch::InputBatch;
pub use tensor_file::{write_safetensors, OutDtype, OutTensor, SafetensorsWriter, TensorFile};
pub use weights::{BertWeights, LayerWeights, LoadOptions, LoadReport};

use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};

/// Open `path` for reading if it is a regular file (a link to one included). Opening a FIFO
/// would block until a writer came, and a device could stream forever: both are refused
/// before the open.
pub fn open_regular(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        let what = if meta.is_dir() { "a folder" } else { "not a regular file (a FIFO, a device or a socket)" };
        return Err(Error::malformed(path, format!("is {what}; expected a file")));
    }
    File::open(path).map_err(|e| Error::io(path, e))
}

/// The whole of the regular file `path`, refused past `cap` bytes (without reading more).
pub fn read_capped(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    open_regular(path)?.take(cap + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > cap {
        return Err(Error::malformed(path, format!("larger than {cap} bytes; not {what}")));
    }
    Ok(bytes)
}
