//! The zip container `torch.save` writes: member lookup, size and zip-bomb limits, and reads of
//! tensor data that inflate each storage once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use zip::{CompressionMethod, ZipArchive};

use super::{parse_state_dict, PickledTensor, StorageDtype, MAX_PICKLE_BYTES, MAX_STORAGE_BYTES};
use crate::error::{Error, Result};

/// Deflate cannot expand more than ~1032:1; a member claiming more is lying (a zip bomb).
const MAX_DEFLATE_RATIO: u64 = 1032;

/// Bytes of a storage that no tensor uses which are tolerated: this many, or 1% of the bytes the
/// tensors use if that is more. `torch.save` writes one exactly sized storage per parameter, so
/// real adapter files have none; the allowance is for a view saved with a little of its base.
const UNUSED_STORAGE_BYTES: u64 = 64;

/// Bytes shared by the archive and its readers (a memory map or an owned buffer).
#[derive(Clone)]
struct SharedBytes(Arc<dyn AsRef<[u8]> + Send + Sync>);

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}

/// Where a storage's bytes are in the archive, and which tensors view it.
#[derive(Clone, Debug)]
struct StorageEntry {
    index: usize,
    dtype: StorageDtype,
    bytes: u64,
    /// Indices into the archive's tensors of every view of this storage.
    views: Vec<usize>,
}

/// Storages already inflated, kept only while some of their views have not been read yet, so a
/// storage shared by many tensors is inflated once and the copy is dropped after its last view.
#[derive(Default)]
struct StorageCache {
    storages: HashMap<String, CachedStorage>,
    /// Tensors read at least once.
    read: HashSet<usize>,
}

struct CachedStorage {
    bytes: Vec<u8>,
    /// Views of the storage not read yet.
    unread: usize,
}

/// A `torch.save` archive of a state dict, validated when opened: the pickle is interpreted, every
/// storage it references exists with exactly the size the pickle declares, every tensor lies
/// inside its storage, and the tensors use all of each storage (up to a small allowance). Tensor
/// data is read on request; each storage is inflated once however many tensors view it.
pub struct TorchArchive {
    path: PathBuf,
    zip: ZipArchive<Cursor<SharedBytes>>,
    tensors: Vec<PickledTensor>,
    by_name: HashMap<String, usize>,
    storages: BTreeMap<String, StorageEntry>,
    cache: Mutex<StorageCache>,
    /// How many times a storage member has been inflated (read through), for the tests.
    inflations: AtomicUsize,
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
        let file = crate::io::open_regular(path)?;
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

        let mut storages: BTreeMap<String, StorageEntry> = BTreeMap::new();
        let mut total = 0u64;
        for (i, t) in tensors.iter().enumerate() {
            if let Some(entry) = storages.get_mut(&t.storage.key) {
                entry.views.push(i);
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
            storages.insert(t.storage.key.clone(), StorageEntry { index, dtype: t.storage.dtype, bytes: size, views: vec![i] });
        }
        // A storage must be what its tensors need: otherwise a small deflated archive could make
        // every read inflate gigabytes that no tensor uses.
        for (key, entry) in &storages {
            let es = entry.dtype.size() as u64;
            let ranges: Vec<(u64, u64)> = entry.views.iter().map(|&i| (tensors[i].offset, tensors[i].offset + tensors[i].numel())).collect();
            let used = covered(ranges) * es;
            let allowed = UNUSED_STORAGE_BYTES.max(used / 100);
            if entry.bytes.saturating_sub(used) > allowed {
                return Err(bad(format!(
                    "storage `{prefix}/data/{key}` holds {} bytes, but its tensors use only {used} of them; refused (at most {allowed} \
                     unused bytes are accepted; torch.save writes a view's whole storage, so save `tensor.clone()` instead)",
                    entry.bytes
                )));
            }
        }
        let by_name = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(TorchArchive {
            path: path.to_path_buf(),
            zip,
            tensors,
            by_name,
            storages,
            cache: Mutex::new(StorageCache::default()),
            inflations: AtomicUsize::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many times a storage has been read through so far.
    #[cfg(test)]
    pub(crate) fn inflations(&self) -> usize {
        self.inflations.load(Ordering::Relaxed)
    }

    /// The state dict's tensors, in pickle order.
    pub fn tensors(&self) -> &[PickledTensor] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&PickledTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// One tensor's elements as f32. The first read of a storage inflates all of it (checking its
    /// size and CRC); the copy is kept for the storage's other views until each has been read.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let &i = self.by_name.get(name).ok_or_else(|| Error::tensor(&self.path, name, "not in the archive"))?;
        let t = &self.tensors[i];
        let key = &t.storage.key;
        let entry = self.storages.get(key).ok_or_else(|| Error::tensor(&self.path, name, "its storage is missing"))?;
        let fail = |msg: String| Error::tensor(&self.path, name, format!("reading storage `{key}`: {msg}"));
        if t.numel() == 0 {
            return Ok(Vec::new()); // its offset is unchecked: nothing of the storage is read
        }
        let es = entry.dtype.size() as u64;
        // Inside the storage (checked when the archive was opened), so no overflow in u64.
        let (start, end) = (t.offset * es, (t.offset + t.numel()) * es);
        let range = usize::try_from(start).and_then(|a| Ok(a..usize::try_from(end)?)).map_err(|_| fail("too large for this machine".into()))?;
        let view = |bytes: &[u8]| -> Result<Vec<f32>> {
            let b = bytes.get(range.clone()).ok_or_else(|| fail(format!("view {range:?} is outside its {} bytes", bytes.len())))?;
            Ok(entry.dtype.decode(b))
        };

        let mut guard = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let cache = &mut *guard;
        let first_read = cache.read.insert(i);
        if let Some(cached) = cache.storages.get_mut(key) {
            let out = view(&cached.bytes)?;
            if first_read {
                cached.unread -= 1;
                if cached.unread == 0 {
                    cache.storages.remove(key);
                }
            }
            return Ok(out);
        }
        let bytes = self.inflate(entry).map_err(fail)?;
        let out = view(&bytes)?;
        // Views with no elements never read the storage, so they are not waited for.
        let unread = entry.views.iter().filter(|&&j| self.tensors[j].numel() > 0 && !cache.read.contains(&j)).count();
        if unread > 0 {
            cache.storages.insert(key.clone(), CachedStorage { bytes, unread });
        }
        Ok(out)
    }

    /// A storage member's bytes, read to its end so the zip CRC check runs; a member shorter or
    /// longer than declared is an error.
    fn inflate(&self, entry: &StorageEntry) -> std::result::Result<Vec<u8>, String> {
        self.inflations.fetch_add(1, Ordering::Relaxed);
        let mut zip = self.zip.clone();
        let reader = zip.by_index(entry.index).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let cap = usize::try_from(entry.bytes).map_err(|_| "too large for this machine".to_string())?;
        out.try_reserve_exact(cap).map_err(|e| format!("cannot allocate {} bytes: {e}", entry.bytes))?;
        // One byte past the declared size: an overlong member shows up as an extra byte.
        reader.take(entry.bytes + 1).read_to_end(&mut out).map_err(|e| e.to_string())?;
        if out.len() as u64 != entry.bytes {
            return Err(format!("member holds {} bytes, declared {}", out.len(), entry.bytes));
        }
        Ok(out)
    }
}

/// How many elements the union of the half-open ranges `[start, end)` covers.
fn covered(mut ranges: Vec<(u64, u64)>) -> u64 {
    ranges.sort_unstable();
    let (mut total, mut reach) = (0u64, 0u64);
    for (start, end) in ranges {
        let start = start.max(reach);
        if end > start {
            total += end - start;
            reach = end;
        }
    }
    total
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// One F32 view: (name, storage key, storage numel, offset, shape).
    type View<'a> = (&'a str, &'a str, u32, u32, &'a [u32]);

    /// A protocol-2 pickle of a state dict of contiguous F32 views, as `torch.save` writes it.
    fn pickle(views: &[View]) -> Vec<u8> {
        let int = |p: &mut Vec<u8>, v: u32| {
            p.push(b'J');
            p.extend_from_slice(&v.to_le_bytes());
        };
        let s = |p: &mut Vec<u8>, v: &str| {
            p.push(b'X');
            p.extend_from_slice(&(v.len() as u32).to_le_bytes());
            p.extend_from_slice(v.as_bytes());
        };
        let mut p = vec![0x80, 2, b'}', b'('];
        for &(name, key, numel, offset, shape) in views {
            s(&mut p, name);
            p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
            s(&mut p, "storage");
            p.extend_from_slice(b"ctorch\nFloatStorage\n");
            s(&mut p, key);
            s(&mut p, "cpu");
            int(&mut p, numel);
            p.extend_from_slice(b"tQ");
            int(&mut p, offset);
            p.push(b'(');
            shape.iter().for_each(|&d| int(&mut p, d));
            p.extend_from_slice(b"t(");
            let mut stride: Vec<u32> = shape.iter().rev().scan(1, |acc, &d| Some(std::mem::replace(acc, *acc * d))).collect();
            stride.reverse();
            stride.iter().for_each(|&d| int(&mut p, d));
            p.extend_from_slice(b"t\x89ccollections\nOrderedDict\n)RtR");
        }
        p.extend_from_slice(b"u.");
        p
    }

    /// A `torch.save`-like zip: `a/data.pkl` stored, each `a/data/<key>` deflated.
    fn archive(pkl: &[u8], storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = |m| zip::write::SimpleFileOptions::default().compression_method(m);
        w.start_file("a/data.pkl", opts(CompressionMethod::Stored)).unwrap();
        w.write_all(pkl).unwrap();
        for (key, data) in storages {
            w.start_file(format!("a/data/{key}"), opts(CompressionMethod::Deflated)).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn a_storage_shared_by_many_tensors_is_inflated_once() {
        // 64 views of 256 floats, one after the other, in one deflated storage (and a second
        // storage with one tensor of its own, read in between).
        let (n, len) = (64u32, 256u32);
        let values: Vec<f32> = (0..n * len).map(|i| i as f32 * 0.25).collect();
        let names: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
        let shape = [len];
        let mut views: Vec<View> = names.iter().zip(0..).map(|(name, i)| (name.as_str(), "0", n * len, i * len, &shape[..])).collect();
        views.push(("own", "1", 3, 0, &[3]));
        views.push(("empty", "0", n * len, i32::MAX as u32, &[2, 0])); // no elements: its offset is not checked
        let bytes = archive(&pickle(&views), &[("0", f32_bytes(&values)), ("1", f32_bytes(&[1.0, 2.0, 3.0]))]);
        let a = TorchArchive::from_bytes(bytes, Path::new("shared.bin")).unwrap();
        assert_eq!(a.inflations(), 0, "opening reads no storage");
        assert_eq!(a.read_f32("empty").unwrap(), Vec::<f32>::new());
        for (name, i) in names.iter().zip(0..) {
            let at = (i * len) as usize;
            assert_eq!(a.read_f32(name).unwrap(), &values[at..at + len as usize], "{name}");
            if i == 10 {
                assert_eq!(a.read_f32("own").unwrap(), [1.0, 2.0, 3.0]);
            }
        }
        assert_eq!(a.inflations(), 2, "one inflation per storage");
        // Every view has been read, so the copy is gone: reading one again reads the member again.
        assert_eq!(a.read_f32("t5").unwrap(), &values[5 * 256..6 * 256]);
        assert_eq!(a.inflations(), 3);
    }

    #[test]
    fn a_storage_far_larger_than_its_tensors_is_refused_when_opened() {
        // 4 Mi floats (16 MiB, deflated to ~16 KiB) of which the tensors use 6 at each end.
        let numel = 4u32 << 20;
        let zeros = vec![0u8; numel as usize * 4];
        let cases: [(&[View], &str); 2] = [
            (&[("w", "0", numel, 0, &[3, 2])], "its tensors use only 24 of them"),
            (&[("a", "0", numel, 0, &[6]), ("b", "0", numel, numel - 6, &[6])], "its tensors use only 48 of them"),
        ];
        for (views, says) in cases {
            let bytes = archive(&pickle(views), &[("0", zeros.clone())]);
            assert!(bytes.len() < 1 << 20);
            let err = TorchArchive::from_bytes(bytes, Path::new("sparse.bin")).err().expect("refused");
            let msg = err.to_string();
            assert!(matches!(err, Error::Malformed { .. }), "{msg}");
            for s in ["sparse.bin: ", "storage `a/data/0` holds 16777216 bytes", says, "at most 64 unused bytes are accepted"] {
                assert!(msg.contains(s), "`{s}` not in: {msg}");
            }
        }
        // Exactly covered storages, views overlapping or not, and a small slack are accepted.
        let ok: [&[View]; 3] = [
            &[("a", "0", 16, 0, &[6]), ("b", "0", 16, 6, &[4]), ("c", "0", 16, 10, &[3, 2])],
            &[("w", "0", 16, 0, &[16]), ("w2", "0", 16, 0, &[16])],
            &[("head", "0", 16 + 16, 0, &[16])],
        ];
        for views in ok {
            let bytes = archive(&pickle(views), &[("0", vec![0; views[0].2 as usize * 4])]);
            TorchArchive::from_bytes(bytes, Path::new("ok.bin")).unwrap();
        }
    }
}
