//! The zip container `torch.save` writes: member lookup, size and zip-bomb limits, and
//! streaming reads of tensor data.

use std::collections::{BTreeMap, HashMap};
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use zip::{CompressionMethod, ZipArchive};

use super::{parse_state_dict, PickledTensor, StorageDtype, MAX_PICKLE_BYTES, MAX_STORAGE_BYTES};
use crate::error::{Error, Result};

/// Deflate cannot expand more than ~1032:1; a member claiming more is lying (a zip bomb).
const MAX_DEFLATE_RATIO: u64 = 1032;

/// Bytes shared by the archive and its readers (a memory map or an owned buffer).
#[derive(Clone)]
struct SharedBytes(Arc<dyn AsRef<[u8]> + Send + Sync>);

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}

/// Where a storage's bytes are in the archive.
#[derive(Clone, Debug)]
struct StorageEntry {
    index: usize,
    dtype: StorageDtype,
    bytes: u64,
}

/// A `torch.save` archive of a state dict, validated when opened: the pickle is interpreted, every
/// storage it references exists with exactly the size the pickle declares, and every tensor lies
/// inside its storage. Tensor data is read on request.
pub struct TorchArchive {
    path: PathBuf,
    zip: ZipArchive<Cursor<SharedBytes>>,
    tensors: Vec<PickledTensor>,
    storages: BTreeMap<String, StorageEntry>,
}

/// Whether `bytes` start like a zip archive (what `torch.save` writes since torch 1.6).
pub fn looks_like_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06")
}

/// The start of a legacy (torch < 1.6) `torch.save` file: protocol 2 and torch's magic number.
const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19";

/// Whether `bytes` are a `torch.save` file of either generation (never a valid safetensors
/// file: those would declare an absurd header length).
pub fn looks_like_torch(bytes: &[u8]) -> bool {
    looks_like_zip(bytes) || bytes.starts_with(LEGACY_MAGIC)
}

impl TorchArchive {
    /// Map `path` and validate it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Err(Error::malformed(path, "empty file (expected a torch.save zip archive)"));
        }
        // SAFETY: read-only map; bytes changing underneath can only make reads fail or give
        // other numbers, every access is bounds-checked.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_shared(SharedBytes(Arc::new(mmap)), path)
    }

    /// Validate an archive held in memory; `origin` names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, origin: &Path) -> Result<Self> {
        Self::from_shared(SharedBytes(Arc::new(bytes)), origin)
    }

    fn from_shared(bytes: SharedBytes, path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::malformed(path, msg);
        let data = bytes.as_ref();
        if data.is_empty() {
            return Err(bad("empty file (expected a torch.save zip archive)".into()));
        }
        if !looks_like_zip(data) {
            let legacy = data.starts_with(LEGACY_MAGIC);
            return Err(bad(if legacy {
                "a legacy (pre-zip, torch < 1.6) torch.save file, which is not supported; re-save it with a current torch".into()
            } else {
                "not a torch.save zip archive (no zip signature)".into()
            }));
        }
        let file_len = data.len() as u64;
        let mut zip = ZipArchive::new(Cursor::new(bytes.clone())).map_err(|e| bad(format!("not a readable zip archive: {e}")))?;

        // `<prefix>/data.pkl`; torch names the prefix after the file but reads any single one.
        let mut pickles = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, raw) in zip.file_names_raw().enumerate() {
            let Ok(name) = std::str::from_utf8(raw) else { continue };
            if let Some(prefix) = name.strip_suffix("/data.pkl") {
                if !prefix.is_empty() && !prefix.contains('/') {
                    pickles.push((prefix.to_string(), i));
                }
            }
            if names.insert(name.to_string(), i).is_some() {
                return Err(bad(format!("member `{name}` appears twice in the archive")));
            }
        }
        let (prefix, pkl_index) = match pickles.as_slice() {
            [one] => one.clone(),
            [] => return Err(bad("no `<archive>/data.pkl` member: not a torch.save archive".into())),
            _ => return Err(bad(format!("{} `data.pkl` members: ambiguous archive", pickles.len()))),
        };
        let member = |suffix: &str| names.get(&format!("{prefix}/{suffix}")).copied();

        if let Some(i) = member("byteorder") {
            let order = read_member(&mut zip, i, 16, file_len).map_err(|e| bad(format!("`{prefix}/byteorder`: {e}")))?;
            if order.as_slice() != b"little" {
                return Err(bad(format!(
                    "byte order `{}`: only little-endian archives are supported",
                    String::from_utf8_lossy(&order).escape_default()
                )));
            }
        }
        let pkl = read_member(&mut zip, pkl_index, MAX_PICKLE_BYTES, file_len).map_err(|e| bad(format!("`{prefix}/data.pkl`: {e}")))?;
        let tensors = parse_state_dict(&pkl).map_err(|e| bad(format!("`{prefix}/data.pkl`: {e}")))?;

        let mut storages = BTreeMap::new();
        let mut total = 0u64;
        for t in &tensors {
            if storages.contains_key(&t.storage.key) {
                continue;
            }
            let member_name = format!("{prefix}/data/{}", t.storage.key);
            let Some(index) = member(&format!("data/{}", t.storage.key)) else {
                return Err(Error::tensor(path, &t.name, format!("its storage `{member_name}` is not in the archive")));
            };
            let want = t.storage.numel.checked_mul(t.storage.dtype.size() as u64);
            let entry = zip.by_index_raw(index).map_err(|e| bad(format!("`{member_name}`: {e}")))?;
            let (size, compressed, method) = (entry.size(), entry.compressed_size(), entry.compression());
            drop(entry);
            check_member_size(size, compressed, method, file_len).map_err(|e| bad(format!("`{member_name}`: {e}")))?;
            if want != Some(size) {
                return Err(Error::tensor(
                    path,
                    &t.name,
                    format!(
                        "storage `{member_name}` holds {size} bytes, but the pickle declares {} {} elements",
                        t.storage.numel,
                        t.storage.dtype.name()
                    ),
                ));
            }
            total = total.saturating_add(size);
            if total > MAX_STORAGE_BYTES {
                return Err(bad(format!("storages total more than {MAX_STORAGE_BYTES} bytes; refusing to read them")));
            }
            storages.insert(t.storage.key.clone(), StorageEntry { index, dtype: t.storage.dtype, bytes: size });
        }
        Ok(TorchArchive { path: path.to_path_buf(), zip, tensors, storages })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state dict's tensors, in pickle order.
    pub fn tensors(&self) -> &[PickledTensor] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&PickledTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// One tensor's elements as f32. Streams through its storage: the bytes before the view are
    /// skipped, the view is kept, the rest is read only to let the zip CRC check run.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(name).ok_or_else(|| Error::tensor(&self.path, name, "not in the archive"))?;
        let entry = self.storages.get(&t.storage.key).ok_or_else(|| Error::tensor(&self.path, name, "its storage is missing"))?;
        let es = entry.dtype.size() as u64;
        // Both fit: checked against the storage size when the archive was opened.
        let (skip, len) = (t.offset * es, t.numel() * es);
        let fail = |e: std::io::Error| Error::tensor(&self.path, name, format!("reading storage `{}`: {e}", t.storage.key));
        let mut zip = self.zip.clone();
        let mut reader = zip.by_index(entry.index).map_err(|e| fail(std::io::Error::other(e)))?;
        // One byte past the declared size: reading to the member's end runs the CRC check, and
        // an overlong member shows up as extra bytes.
        let mut limited = (&mut reader).take(entry.bytes + 1);
        let skipped = std::io::copy(&mut (&mut limited).take(skip), &mut std::io::sink()).map_err(fail)?;
        if skipped != skip {
            return Err(fail(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let mut buf = vec![0u8; len as usize];
        limited.read_exact(&mut buf).map_err(fail)?;
        let rest = std::io::copy(&mut limited, &mut std::io::sink()).map_err(fail)?;
        if skip + len + rest != entry.bytes {
            return Err(fail(std::io::Error::other(format!("member holds {} bytes, declared {}", skip + len + rest, entry.bytes))));
        }
        Ok(entry.dtype.decode(&buf))
    }
}

/// A member's declared sizes must be possible: STORED data is as long as it says, compressed
/// data cannot expand beyond deflate's limit, and neither can exceed what the file holds.
fn check_member_size(size: u64, compressed: u64, method: CompressionMethod, file_len: u64) -> std::result::Result<(), String> {
    if compressed > file_len {
        return Err(format!("declares {compressed} compressed bytes in a file of {file_len} bytes"));
    }
    match method {
        CompressionMethod::Stored if size != compressed => Err(format!("stored member declares {size} bytes but holds {compressed}")),
        CompressionMethod::Stored => Ok(()),
        CompressionMethod::Deflated if size > compressed.saturating_mul(MAX_DEFLATE_RATIO).saturating_add(1024) => Err(format!(
            "declares {size} bytes from {compressed} compressed bytes, more than deflate can expand (a zip bomb); refused"
        )),
        CompressionMethod::Deflated => Ok(()),
        other => Err(format!("compression method {other:?} is not supported (torch writes members stored)")),
    }
}

/// A whole member, at most `cap` bytes, checked against its declared size.
fn read_member(zip: &mut ZipArchive<Cursor<SharedBytes>>, index: usize, cap: u64, file_len: u64) -> std::result::Result<Vec<u8>, String> {
    let mut f = zip.by_index(index).map_err(|e| e.to_string())?;
    let (size, compressed, method) = (f.size(), f.compressed_size(), f.compression());
    if size > cap {
        return Err(format!("declares {size} bytes, more than the {cap} accepted"));
    }
    check_member_size(size, compressed, method, file_len)?;
    let mut out = Vec::with_capacity(size as usize);
    (&mut f).take(size + 1).read_to_end(&mut out).map_err(|e| e.to_string())?;
    if out.len() as u64 != size {
        return Err(format!("holds {} bytes but declares {size}", out.len()));
    }
    Ok(out)
}
