//! The on-disk CUBIN cache: what NVRTC compiled, kept across processes, so a machine pays each
//! kernel family's compile once (attention.cu alone is ~37 s a GPU arch on a 2-core host), not
//! once per `train` run or per MPI rank.
//!
//! - **Where.** `$BERT_ADAPTERS_KERNEL_CACHE` when set (`off`, `0`, `false`, `none`, `no` or empty
//!   turn the cache off), else `$XDG_CACHE_HOME/bert-adapters/kernels`, else
//!   `$HOME/.cache/bert-adapters/kernels`; neither set, no cache. Folders it creates are private
//!   (mode 0700); a folder the variable names is used as it is, so keep it writable by you alone:
//!   an image found there runs on your GPU. Every entry can be deleted at any time: it is compiled
//!   again when next needed.
//! - **Key.** An xxh3-128 digest of everything the CUBIN depends on: the source text, the arch,
//!   every NVRTC option, NVRTC's version and the identity (path, size, mtime) of the loaded
//!   libnvrtc and of the header folder, so a reinstalled or upgraded toolchain misses rather than
//!   reuses an image it did not make. The entry's file name is `FAMILY-ARCH-DIGEST.cubin`.
//! - **Entry.** A 40-byte header (magic, the key digest again, the image's length and its xxh3-64
//!   checksum), then the CUBIN. A truncated, damaged or mis-keyed entry is a miss: it is compiled
//!   again and rewritten, with one line on stderr. A file at an entry's name that is not one of
//!   ours (no magic) is left alone; the compile's result is then simply not kept.
//! - **Writes** go through [`crate::io::atomic::write_atomic`] (a private temporary, fsynced, then
//!   renamed), so a reader never sees half an entry and a failed write leaves the earlier one; the
//!   temporaries a killed writer left beside an entry go when it is next written.
//! - **Processes.** The first process to miss an entry holds an advisory lock (`.NAME.lock`,
//!   `flock`) while it compiles; the others wait for it and then read its entry, so eight MPI
//!   ranks on a fresh node compile once, not eight times. The wait is bounded (10 minutes): past
//!   it a process compiles for itself.
//! - **Failure is never fatal.** An unwritable folder, a full disk or a lock that cannot be taken
//!   costs the cache, not the run: the kernel is compiled as if there were no cache, and stderr
//!   says why once per process.
//!
//! The driver can still refuse a cached image it would not refuse freshly compiled; the runtime
//! then compiles again and replaces the entry ([`crate::cuda::runtime::CudaRuntime::module`]).

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, UNIX_EPOCH};

use crate::error::{Error, Result};

/// The environment variable that relocates the cache or turns it off.
pub const CACHE_ENV: &str = "BERT_ADAPTERS_KERNEL_CACHE";

const MAGIC: &[u8; 8] = b"BACUBIN\x01";
const HEADER_BYTES: usize = 8 + 16 + 8 + 8;
/// No kernel family's CUBIN comes near this; a larger file is not one of our entries, and is not
/// read (memory stays bounded whatever sits in the folder).
const MAX_ENTRY_BYTES: u64 = 256 << 20;
const LOCK_WAIT: Duration = Duration::from_secs(600);

/// Where a CUBIN came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CubinOrigin {
    /// Read from the disk cache.
    Disk,
    /// Compiled by NVRTC in this call.
    Compiled,
}

/// What an entry is keyed by; see the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryKey {
    /// `FAMILY-ARCH-DIGEST.cubin`.
    pub file_name: String,
    pub digest: u128,
}

impl EntryKey {
    /// The entry for `code` compiled for `arch` with the full NVRTC option list `options`, by the
    /// toolchain `toolchain` describes (see [`toolchain_identity`]).
    pub fn new(family: &str, code: &str, arch: &str, options: &[String], toolchain: &str) -> EntryKey {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        // Length-prefixed fields, so no two field lists hash the same bytes.
        let mut field = |bytes: &[u8]| {
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(MAGIC);
        field(env!("CARGO_PKG_VERSION").as_bytes());
        field(toolchain.as_bytes());
        field(arch.as_bytes());
        for o in options {
            field(o.as_bytes());
        }
        field(code.as_bytes());
        let digest = h.digest128();
        let stem: String =
            family.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).take(64).collect();
        let arch_part: String = arch.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        EntryKey { file_name: format!("{stem}-{arch_part}-{digest:032x}.cubin"), digest }
    }
}

/// A cache folder. Entries are named by [`EntryKey`], which does not depend on the folder.
#[derive(Clone, Debug)]
pub struct DiskCache {
    dir: PathBuf,
}

/// The folder the environment names, or `None` when the cache is off. Pure, for tests:
/// `value` is `$BERT_ADAPTERS_KERNEL_CACHE`, `xdg` `$XDG_CACHE_HOME`, `home` `$HOME`, and a
/// relative folder is taken against `cwd`.
pub fn cache_dir_from(value: Option<&OsStr>, xdg: Option<&OsStr>, home: Option<&OsStr>, cwd: &Path) -> Option<PathBuf> {
    let absolute = |p: PathBuf| if p.is_absolute() { p } else { cwd.join(p) };
    if let Some(v) = value {
        let text = v.to_string_lossy();
        return match text.trim().to_ascii_lowercase().as_str() {
            "" | "0" | "off" | "false" | "none" | "no" => None,
            _ => Some(absolute(PathBuf::from(v))),
        };
    }
    // XDG says a relative $XDG_CACHE_HOME is invalid and to be ignored.
    let xdg = xdg.filter(|x| Path::new(x).is_absolute()).map(|x| PathBuf::from(x).join("bert-adapters/kernels"));
    let home = || home.filter(|h| !h.is_empty()).map(|h| absolute(PathBuf::from(h)).join(".cache/bert-adapters/kernels"));
    xdg.or_else(home)
}

impl DiskCache {
    /// A cache in `dir` (created on the first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DiskCache { dir: dir.into() }
    }

    /// The cache the environment configures, read once per process; `None` when it is off.
    pub fn configured() -> Option<&'static DiskCache> {
        static CONFIGURED: OnceLock<Option<DiskCache>> = OnceLock::new();
        CONFIGURED
            .get_or_init(|| {
                let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
                let env = |k: &str| std::env::var_os(k);
                cache_dir_from(env(CACHE_ENV).as_deref(), env("XDG_CACHE_HOME").as_deref(), env("HOME").as_deref(), &cwd)
                    .map(DiskCache::new)
            })
            .as_ref()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn entry_path(&self, key: &EntryKey) -> PathBuf {
        self.dir.join(&key.file_name)
    }

    /// The CUBIN stored under `key`, if there is a sound entry; a damaged one is reported (once
    /// a process) and treated as absent.
    pub fn load(&self, key: &EntryKey) -> Option<Vec<u8>> {
        let path = self.entry_path(key);
        match read_entry(&path, key.digest) {
            Ok(cubin) => cubin,
            Err(why) => {
                warn_once(&DAMAGED, &format!("ignoring the kernel cache entry {}: {why}; compiling it again", path.display()));
                None
            }
        }
    }

    /// Stores `cubin` under `key`, replacing an earlier entry of ours. A file of another kind at
    /// that name is refused, not overwritten.
    pub fn store(&self, key: &EntryKey, cubin: &[u8]) -> Result<()> {
        let path = self.entry_path(key);
        if let Some(why) = foreign_file(&path) {
            return Err(Error::Cuda(format!("kernel cache: {} is not a cache entry ({why}); left as it is", path.display())));
        }
        self.create_dir()?;
        // What a process killed while writing this entry left (only its exact temporaries, only
        // of processes no longer alive).
        let _ = crate::io::atomic::clean_leftovers(&self.dir, &[&key.file_name], &[]);
        let mut bytes = Vec::with_capacity(HEADER_BYTES + cubin.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&key.digest.to_le_bytes());
        bytes.extend_from_slice(&(cubin.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(cubin).to_le_bytes());
        bytes.extend_from_slice(cubin);
        crate::io::atomic::write_atomic(&path, &bytes)
    }

    /// The entry under `key`, or `compile()`'s result, which is then stored. Across processes one
    /// compiles while the others wait (see the module documentation). A cache that cannot be
    /// read or written only costs the compile; `compile`'s own error is returned as it is.
    pub fn fetch_or_compile(&self, key: &EntryKey, compile: impl FnOnce() -> Result<Vec<u8>>) -> Result<(Vec<u8>, CubinOrigin)> {
        if let Some(cubin) = self.load(key) {
            return Ok((cubin, CubinOrigin::Disk));
        }
        let _lock = match self.lock(key) {
            Ok(lock) => {
                // Another process may have written the entry while this one waited.
                if let Some(cubin) = self.load(key) {
                    return Ok((cubin, CubinOrigin::Disk));
                }
                Some(lock)
            }
            Err(e) => {
                self.unusable(e);
                None
            }
        };
        let cubin = compile()?;
        if let Err(e) = self.store(key, &cubin) {
            self.unusable(e);
        }
        Ok((cubin, CubinOrigin::Compiled))
    }

    /// Removes this folder's entries for `archs` whose names are not in `keep` (entries an earlier
    /// version of the kernels or of the toolchain left), with their lock files. Only files named
    /// as entries are (`FAMILY-ARCH-DIGEST.cubin`) whose header is the cache's are touched, so
    /// nothing the cache did not write goes. Returns how many entries went, and their bytes.
    pub fn prune(&self, archs: &[&str], keep: &[String]) -> Result<(usize, u64)> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
            Err(e) => return Err(Error::io(&self.dir, e)),
        };
        let (mut removed, mut bytes) = (0, 0);
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(arch) = entry_arch(&name) else { continue };
            if !archs.contains(&arch) || keep.contains(&name) {
                continue;
            }
            let path = entry.path();
            if foreign_file(&path).is_some() {
                continue;
            }
            let len = entry.metadata().map_or(0, |m| m.len());
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            let _ = std::fs::remove_file(self.dir.join(format!(".{name}.lock")));
            removed += 1;
            bytes += len;
        }
        Ok((removed, bytes))
    }

    /// The one line (a process) that says the folder cannot serve, and why.
    fn unusable(&self, e: Error) {
        warn_once(&UNWRITABLE, &format!("kernel cache {}: {e}; kernels are compiled without it", self.dir.display()));
    }

    fn create_dir(&self) -> Result<()> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&self.dir).map_err(|e| Error::io(&self.dir, e))
    }

    /// The advisory lock for `key`, waited for up to [`LOCK_WAIT`]; released when dropped.
    fn lock(&self, key: &EntryKey) -> Result<EntryLock> {
        self.create_dir()?;
        let path = self.dir.join(format!(".{}.lock", key.file_name));
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| Error::io(&path, e))?;
        let start = Instant::now();
        loop {
            match try_lock(&file) {
                Ok(true) => return Ok(EntryLock { _file: file }),
                Ok(false) if start.elapsed() < LOCK_WAIT => std::thread::sleep(Duration::from_millis(50)),
                Ok(false) => {
                    return Err(Error::Cuda(format!(
                        "{} has been held for {} s; compiling without waiting for it",
                        path.display(),
                        LOCK_WAIT.as_secs()
                    )))
                }
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
    }
}

/// An advisory lock; the kernel drops it with the file (and when the process dies).
struct EntryLock {
    _file: std::fs::File,
}

#[cfg(unix)]
fn try_lock(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a valid descriptor owned by `file`; flock only changes the lock state.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

#[cfg(not(unix))]
fn try_lock(_file: &std::fs::File) -> std::io::Result<bool> {
    Ok(true)
}

/// The arch part of an entry's file name (`FAMILY-ARCH-DIGEST.cubin`), if `name` has that form.
fn entry_arch(name: &str) -> Option<&str> {
    let (rest, digest) = name.strip_suffix(".cubin")?.rsplit_once('-')?;
    let (family, arch) = rest.rsplit_once('-')?;
    let hex = digest.len() == 32 && digest.bytes().all(|b| b.is_ascii_hexdigit());
    (hex && !family.is_empty() && arch.starts_with("sm_")).then_some(arch)
}

/// `Ok(None)`: no entry. `Err(why)`: a file is there but is not a sound entry for `digest`.
fn read_entry(path: &Path, digest: u128) -> std::result::Result<Option<Vec<u8>>, String> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot be opened ({e})")),
    };
    let len = file.metadata().map_err(|e| format!("cannot be read ({e})"))?.len();
    if len > MAX_ENTRY_BYTES {
        return Err(format!("{len} bytes, more than any kernel image"));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(MAX_ENTRY_BYTES).read_to_end(&mut bytes).map_err(|e| format!("cannot be read ({e})"))?;
    if bytes.len() < HEADER_BYTES || &bytes[..8] != MAGIC {
        return Err("not a cache entry (no header)".into());
    }
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let stored_digest = u128::from_le_bytes(bytes[8..24].try_into().expect("16 bytes"));
    if stored_digest != digest {
        return Err("its header names another key".into());
    }
    let (image_len, checksum) = (word(24), word(32));
    let image = bytes.split_off(HEADER_BYTES);
    if image.len() as u64 != image_len {
        return Err(format!("truncated or padded: {} image bytes, the header says {image_len}", image.len()));
    }
    if xxhash_rust::xxh3::xxh3_64(&image) != checksum {
        return Err("its checksum does not match (damaged)".into());
    }
    if !image.starts_with(b"\x7fELF") {
        return Err("the image is not an ELF CUBIN".into());
    }
    Ok(Some(image))
}

/// Why the file at `path` is not ours to replace, if it is not (a missing file is fine).
fn foreign_file(path: &Path) -> Option<String> {
    match std::fs::symlink_metadata(path) {
        Err(_) => None,
        Ok(m) if !m.is_file() => Some("not a regular file".into()),
        Ok(_) => {
            let mut head = [0u8; 8];
            let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head));
            match read {
                Ok(()) if &head == MAGIC => None,
                Ok(()) => Some("it does not start with the cache's header".into()),
                Err(e) => Some(format!("its header cannot be read: {e}")),
            }
        }
    }
}

static DAMAGED: AtomicBool = AtomicBool::new(false);
static UNWRITABLE: AtomicBool = AtomicBool::new(false);

fn warn_once(flag: &AtomicBool, message: &str) {
    if !flag.swap(true, Ordering::Relaxed) {
        warn(&format!("{message} (set {CACHE_ENV}=off to run without the cache)"));
    }
}

/// One warning line on stderr. Not `eprintln!`, which panics when stderr is closed.
pub(crate) fn warn(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "bert-adapters: warning: {message}");
}

/// What identifies the compiler a CUBIN came from: NVRTC's version, and the path, size and mtime
/// of the loaded libnvrtc (`libraries`) and of the header folder `-I` names. `nvrtc_version` is
/// [`crate::cuda::runtime::nvrtc_version`]'s answer.
pub fn toolchain_identity(nvrtc_version: (i32, i32), libraries: &[PathBuf], include_dir: Option<&Path>) -> String {
    fn stamp(path: &Path) -> String {
        match std::fs::metadata(path) {
            Ok(m) => {
                let mtime = m.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
                format!("{}:{}:{}", path.display(), m.len(), mtime)
            }
            Err(_) => format!("{}:?", path.display()),
        }
    }
    let mut identity = format!("nvrtc {}.{}", nvrtc_version.0, nvrtc_version.1);
    for lib in libraries {
        identity.push_str(&format!(" lib {}", stamp(lib)));
    }
    if let Some(dir) = include_dir {
        identity.push_str(&format!(" include {}", stamp(&dir.join("cuda_bf16.hpp"))));
    }
    identity
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kernel-cache-unit-{label}-{}-{:x}", std::process::id(), rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn elf(n: usize) -> Vec<u8> {
        let mut v = b"\x7fELF".to_vec();
        v.extend((0..n).map(|i| (i * 7 + 3) as u8));
        v
    }

    #[test]
    fn the_folder_comes_from_the_environment() {
        let cwd = Path::new("/work");
        let os = |s: &'static str| Some(OsStr::new(s));
        assert_eq!(cache_dir_from(os("/c"), os("/x"), os("/h"), cwd), Some(PathBuf::from("/c")));
        assert_eq!(cache_dir_from(os("rel/dir"), None, None, cwd), Some(PathBuf::from("/work/rel/dir")));
        for off in ["", "0", "off", "OFF", "false", "none", "no", " off "] {
            assert_eq!(cache_dir_from(Some(OsStr::new(off)), os("/x"), os("/h"), cwd), None, "{off:?}");
        }
        assert_eq!(cache_dir_from(None, os("/x"), os("/h"), cwd), Some(PathBuf::from("/x/bert-adapters/kernels")));
        assert_eq!(cache_dir_from(None, os("x"), os("/h"), cwd), Some(PathBuf::from("/h/.cache/bert-adapters/kernels")));
        assert_eq!(cache_dir_from(None, None, os("/h"), cwd), Some(PathBuf::from("/h/.cache/bert-adapters/kernels")));
        assert_eq!(cache_dir_from(None, None, os(""), cwd), None);
        assert_eq!(cache_dir_from(None, None, None, cwd), None);
    }

    #[test]
    fn keys_change_with_everything_the_image_depends_on() {
        let opts = |s: &[&str]| s.iter().map(|o| o.to_string()).collect::<Vec<_>>();
        let base = EntryKey::new("attention", "code", "sm_90", &opts(&["-a"]), "nvrtc 13.0");
        assert_eq!(base, EntryKey::new("attention", "code", "sm_90", &opts(&["-a"]), "nvrtc 13.0"));
        assert!(base.file_name.starts_with("attention-sm_90-") && base.file_name.ends_with(".cubin"), "{}", base.file_name);
        let others = [
            EntryKey::new("attention", "code!", "sm_90", &opts(&["-a"]), "nvrtc 13.0"),
            EntryKey::new("attention", "code", "sm_80", &opts(&["-a"]), "nvrtc 13.0"),
            EntryKey::new("attention", "code", "sm_90", &opts(&["-b"]), "nvrtc 13.0"),
            EntryKey::new("attention", "code", "sm_90", &opts(&["-a", ""]), "nvrtc 13.0"),
            EntryKey::new("attention", "code", "sm_90", &opts(&["-a"]), "nvrtc 13.1"),
            // Field boundaries count: the option's tail moved into the code is another key.
            EntryKey::new("attention", "acode", "sm_90", &opts(&["-"]), "nvrtc 13.0"),
        ];
        for other in &others {
            assert_ne!(other.digest, base.digest);
        }
        // Odd family names cannot leave the folder.
        let odd = EntryKey::new("../../etc/passwd", "code", "sm_90", &[], "t");
        assert!(!odd.file_name.contains('/') && !odd.file_name.contains(".."), "{}", odd.file_name);
    }

    #[test]
    fn entries_round_trip_and_damage_is_a_miss() {
        let dir = tmp("entries");
        let cache = DiskCache::new(dir.join("nested/kernels"));
        let key = EntryKey::new("layernorm", "code", "sm_90", &[], "t");
        assert_eq!(cache.load(&key), None, "empty cache");
        let image = elf(1000);
        cache.store(&key, &image).unwrap();
        assert_eq!(cache.load(&key).as_deref(), Some(&image[..]));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(cache.dir()).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "the folders the cache creates are private");
        }
        let path = cache.entry_path(&key);
        let good = std::fs::read(&path).unwrap();

        let flip = |at: usize| {
            let mut b = good.clone();
            b[at] ^= 1;
            b
        };
        let damaged: Vec<(&str, Vec<u8>)> = vec![
            ("a flipped image byte", flip(HEADER_BYTES + 500)),
            ("a flipped digest byte", flip(10)),
            ("a flipped length byte", flip(24)),
            ("a flipped magic byte", flip(0)),
            ("truncated", good[..good.len() - 1].to_vec()),
            ("padded", [&good[..], b"x"].concat()),
            ("header only", good[..HEADER_BYTES].to_vec()),
            ("empty", Vec::new()),
        ];
        for (what, bytes) in damaged {
            std::fs::write(&path, &bytes).unwrap();
            assert_eq!(cache.load(&key), None, "{what}");
        }
        // Another key's sound entry at this name (a copied file) is a miss too.
        let other = EntryKey::new("layernorm", "code2", "sm_90", &[], "t");
        cache.store(&other, &image).unwrap();
        std::fs::copy(cache.entry_path(&other), &path).unwrap();
        assert_eq!(cache.load(&key), None);
        // A header that is sound over an image that is not ELF.
        cache.store(&key, b"not an elf image").unwrap();
        assert_eq!(cache.load(&key), None);

        // A damaged entry of ours is replaced by the next store.
        std::fs::write(&path, flip(HEADER_BYTES + 3)).unwrap();
        cache.store(&key, &image).unwrap();
        assert_eq!(cache.load(&key).as_deref(), Some(&image[..]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_killed_writers_temporary_goes_with_the_next_write() {
        let dir = tmp("leftovers");
        let cache = DiskCache::new(&dir);
        let key = EntryKey::new("embedding", "code", "sm_90", &[], "t");
        // A temporary of a process that no longer exists, one of a live process (this one), and a
        // file of the same shape for another entry: only the first goes.
        let dead = dir.join(format!(".{}.tmp-2147483600-00112233aabbccdd", key.file_name));
        let live = dir.join(format!(".{}.tmp-{}-00112233aabbccdd", key.file_name, std::process::id()));
        let other = dir.join(".other.cubin.tmp-2147483600-00112233aabbccdd");
        for p in [&dead, &live, &other] {
            std::fs::write(p, b"partial").unwrap();
        }
        cache.store(&key, &elf(16)).unwrap();
        assert!(!dead.exists(), "a dead writer's temporary is removed");
        assert!(live.exists() && other.exists(), "nothing else is touched");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn prune_removes_only_stale_entries_of_the_named_archs() {
        let dir = tmp("prune");
        let cache = DiskCache::new(&dir);
        let current = EntryKey::new("attention", "new code", "sm_90", &[], "t");
        let stale = EntryKey::new("attention", "old code", "sm_90", &[], "t");
        let other_arch = EntryKey::new("attention", "old code", "sm_80", &[], "t");
        for k in [&current, &stale, &other_arch] {
            cache.store(k, &elf(100)).unwrap();
            cache.lock(k).unwrap();
        }
        // Files of the entries' name form that the cache did not write, and files of other forms.
        let foreign = dir.join(format!("notes-sm_90-{}.cubin", "ab".repeat(16)));
        std::fs::write(&foreign, b"mine").unwrap();
        let unrelated = dir.join("README");
        std::fs::write(&unrelated, b"mine").unwrap();

        let (removed, bytes) = cache.prune(&["sm_90"], std::slice::from_ref(&current.file_name)).unwrap();
        assert_eq!((removed, bytes), (1, (HEADER_BYTES + 104) as u64));
        assert!(!cache.entry_path(&stale).exists() && !dir.join(format!(".{}.lock", stale.file_name)).exists());
        assert!(cache.load(&current).is_some() && cache.load(&other_arch).is_some(), "kept: the current entry and other archs");
        assert_eq!(std::fs::read(&foreign).unwrap(), b"mine");
        assert_eq!(std::fs::read(&unrelated).unwrap(), b"mine");
        assert_eq!(DiskCache::new(dir.join("absent")).prune(&["sm_90"], &[]).unwrap(), (0, 0));
        assert_eq!(entry_arch(&current.file_name), Some("sm_90"));
        for not_entry in ["x.cubin", "a-sm_90-12.cubin", "-sm_90-00112233445566778899aabbccddeeff.cubin", "a-b-00112233445566778899aabbccddeeff.cubin"] {
            assert_eq!(entry_arch(not_entry), None, "{not_entry}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_that_is_not_ours_is_never_replaced() {
        let dir = tmp("foreign");
        let cache = DiskCache::new(&dir);
        let key = EntryKey::new("adapter", "code", "sm_80", &[], "t");
        let path = cache.entry_path(&key);
        std::fs::write(&path, b"a user's notes").unwrap();
        let err = cache.store(&key, &elf(10)).unwrap_err().to_string();
        assert!(err.contains("not a cache entry") && err.contains(&key.file_name), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"a user's notes");
        // fetch_or_compile still answers, with the compiled image, and still leaves the file.
        let (cubin, origin) = cache.fetch_or_compile(&key, || Ok(elf(10))).unwrap();
        assert_eq!((cubin, origin), (elf(10), CubinOrigin::Compiled));
        assert_eq!(std::fs::read(&path).unwrap(), b"a user's notes");
        // A folder at the entry's name is not replaced either.
        let key2 = EntryKey::new("adapter", "code2", "sm_80", &[], "t");
        std::fs::create_dir(cache.entry_path(&key2)).unwrap();
        assert!(cache.store(&key2, &elf(10)).is_err());
        assert!(cache.entry_path(&key2).is_dir());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fetch_or_compile_compiles_once_and_survives_an_unusable_folder() {
        let dir = tmp("fetch");
        let cache = DiskCache::new(dir.join("k"));
        let key = EntryKey::new("loss", "code", "sm_90", &[], "t");
        let mut compiles = 0;
        let mut compile = || {
            compiles += 1;
            Ok(elf(64))
        };
        assert_eq!(cache.fetch_or_compile(&key, &mut compile).unwrap(), (elf(64), CubinOrigin::Compiled));
        assert_eq!(cache.fetch_or_compile(&key, &mut compile).unwrap(), (elf(64), CubinOrigin::Disk));
        assert_eq!(compiles, 1);
        // Nothing but the entry and its lock file is left in the folder (no temporaries).
        let mut names: Vec<String> = std::fs::read_dir(cache.dir()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, vec![format!(".{}.lock", key.file_name), key.file_name.clone()]);

        // The compile's own error passes through, and nothing is stored.
        let failing = EntryKey::new("loss", "bad code", "sm_90", &[], "t");
        let err = cache.fetch_or_compile(&failing, || Err(Error::Cuda("NVRTC said no".into()))).unwrap_err();
        assert!(err.to_string().contains("NVRTC said no"));
        assert!(!cache.entry_path(&failing).exists());

        // A cache folder that cannot exist (under a regular file) costs the cache, not the answer.
        std::fs::write(dir.join("file"), b"x").unwrap();
        let broken = DiskCache::new(dir.join("file/kernels"));
        let key = EntryKey::new("loss", "code", "sm_90", &[], "t");
        let mut compiles = 0;
        for _ in 0..2 {
            let got = broken.fetch_or_compile(&key, || {
                compiles += 1;
                Ok(elf(8))
            });
            assert_eq!(got.unwrap(), (elf(8), CubinOrigin::Compiled));
        }
        assert_eq!(compiles, 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_waiting_process_reads_what_the_lock_holder_wrote() {
        // Two "processes" (threads with their own file handles: flock locks are per open file).
        let dir = tmp("lock");
        let cache = DiskCache::new(&dir);
        let key = EntryKey::new("nice", "code", "sm_90", &[], "t");
        let held = cache.lock(&key).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let (cache, key) = (cache.clone(), key.clone());
            std::thread::spawn(move || {
                tx.send(()).unwrap();
                cache.fetch_or_compile(&key, || Ok(elf(1))).unwrap()
            })
        };
        rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(!waiter.is_finished(), "the waiter must wait for the lock holder");
        cache.store(&key, &elf(32)).unwrap();
        drop(held);
        assert_eq!(waiter.join().unwrap(), (elf(32), CubinOrigin::Disk), "the waiter reads the holder's entry");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_toolchain_identity_names_the_headers() {
        let dir = tmp("toolchain");
        std::fs::write(dir.join("cuda_bf16.hpp"), b"v1").unwrap();
        let lib = dir.join("libnvrtc.so.13");
        std::fs::write(&lib, b"lib").unwrap();
        let a = toolchain_identity((13, 0), std::slice::from_ref(&lib), Some(&dir));
        assert!(a.starts_with("nvrtc 13.0") && a.contains("cuda_bf16.hpp:2:") && a.contains("libnvrtc.so.13:3:"), "{a}");
        std::fs::write(dir.join("cuda_bf16.hpp"), b"v2 longer").unwrap();
        let b = toolchain_identity((13, 0), std::slice::from_ref(&lib), Some(&dir));
        assert_ne!(b, a, "another header is another toolchain");
        std::fs::write(&lib, b"another build").unwrap();
        assert_ne!(toolchain_identity((13, 0), std::slice::from_ref(&lib), Some(&dir)), b, "another libnvrtc is another toolchain");
        assert_ne!(toolchain_identity((13, 1), &[], Some(&dir)), toolchain_identity((13, 0), &[], Some(&dir)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
