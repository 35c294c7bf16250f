//! The CUDA runtime: one context, one stream, and the NVRTC compile cache.
//!
//! Kernels are compiled at run time by NVRTC to a CUBIN for the device's exact architecture
//! (`sm_XY`), not to PTX: a CUBIN does not depend on the driver's PTX JIT accepting the PTX
//! version of a possibly newer NVRTC (CuPy made the same choice). Compiled images are cached per
//! process under (source hash, arch, options), and on disk across processes
//! ([`super::kernel_cache`]), so each kernel family compiles once per machine; each
//! [`CudaRuntime`] additionally caches its loaded modules and functions. [`precompile`] fills the
//! disk cache ahead of time, one compile a core (`bert-adapters kernels`).
//!
//! [`compile_with_report`] needs no GPU: it compiles for a named arch with `--ptxas-options=-v`
//! and parses ptxas' register/spill/shared-memory report from the NVRTC log, which is how CI
//! checks every kernel for spills on a machine without a GPU.
//!
//! Every failure is a [`crate::Error::Cuda`] carrying the NVRTC log or driver error; calls into
//! cudarc that can panic when a library or symbol is missing are guarded.

use std::collections::HashMap;
use std::ffi::CString;
use std::path::Path;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::{sys::CUresult, CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys, Ptx};

use super::kernel_cache::{toolchain_identity, warn, CubinOrigin, DiskCache, EntryKey};
use super::probe;
use super::registry::{KernelName, KernelSource};
use crate::error::{Error, Result};

// ---- GPU-less compilation -----------------------------------------------------------------------

/// Resource usage of one kernel, as reported by ptxas (`--ptxas-options=-v`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub name: String,
    pub arch: String,
    pub registers: u32,
    pub stack_frame_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    /// Static shared memory (dynamic shared memory is chosen at launch and not included).
    pub smem_bytes: u32,
    pub barriers: u32,
}

/// What [`compile_with_report`] returns.
#[derive(Clone, Debug)]
pub struct CompileReport {
    pub arch: String,
    /// The complete NVRTC log (ptxas lines and any warnings).
    pub log: String,
    /// One entry per kernel (entry function) that ptxas reported, in report order.
    pub kernels: Vec<KernelResources>,
    pub cubin: Vec<u8>,
}

impl CompileReport {
    pub fn kernel(&self, name: &str) -> Option<&KernelResources> {
        self.kernels.iter().find(|k| k.name == name)
    }
}

/// Compiles `source` to a CUBIN for `arch` (e.g. `"sm_80"`, `"sm_90a"`) with ptxas' verbose
/// report on, and parses the report. Needs libnvrtc, not a GPU.
pub fn compile_with_report(source: &str, arch: &str, extra_options: &[&str]) -> Result<CompileReport> {
    check_arch(arch)?;
    let mut options = vec![format!("--gpu-architecture={arch}"), "--ptxas-options=-v".to_string()];
    options.extend(extra_options.iter().map(|s| s.to_string()));
    let (cubin, log) = nvrtc_compile(source, "kernel.cu", &options)?;
    let kernels = parse_ptxas_report(&log);
    Ok(CompileReport { arch: arch.to_string(), log, kernels, cubin })
}

/// The NVRTC version as (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    ensure_nvrtc()?;
    guard("nvrtcVersion", || {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| Error::Cuda(format!("nvrtcVersion failed: {e:?}")))?;
        Ok((major, minor))
    })
}

/// The folder holding the CUDA headers that match the loaded NVRTC (`cuda_bf16.h`, `cuda_fp16.h`,
/// `mma.h`): `$BERT_ADAPTERS_CUDA_INCLUDE` when set, else the `include/` beside the folder libnvrtc
/// was loaded from (the PyPI wheels' `nvidia/cu13/{lib,include}`, or a toolkit's
/// `targets/*/{lib,include}`), else `/usr/local/cuda/include`. NVRTC ships no headers of its own,
/// so without this a kernel cannot include them; every compile passes it with `-I`.
pub fn cuda_include_dir() -> Option<std::path::PathBuf> {
    use std::path::{Path, PathBuf};
    static FOUND: OnceLock<PathBuf> = OnceLock::new();
    if let Some(d) = FOUND.get() {
        return Some(d.clone());
    }
    let has_headers = |d: &Path| d.join("cuda_bf16.h").is_file();
    if let Some(d) = std::env::var_os("BERT_ADAPTERS_CUDA_INCLUDE").map(PathBuf::from) {
        return has_headers(&d).then(|| FOUND.get_or_init(|| d).clone());
    }
    // Where libnvrtc is: this process's memory map once cudarc has loaded it, else the folders
    // the loader searches (LD_LIBRARY_PATH).
    let mapped = mapped_nvrtc().into_iter().map(|p| p.parent().map(Path::to_path_buf));
    let search = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    let on_path = search.split(':').filter(|d| !d.is_empty() && Path::new(d).join("libnvrtc.so.13").exists()).map(|d| Some(PathBuf::from(d)));
    let beside = mapped.chain(on_path).flatten().filter_map(|lib| lib.parent().map(|d| d.join("include")));
    let found = beside.chain([PathBuf::from("/usr/local/cuda/include")]).find(|d| has_headers(d))?;
    Some(FOUND.get_or_init(|| found).clone())
}

/// The `libnvrtc.so*` files this process has mapped (none before cudarc loads NVRTC), from
/// `/proc/self/maps`. Not `libnvrtc-builtins`, which only the first compile maps.
fn mapped_nvrtc() -> Vec<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let is_nvrtc = |p: &Path| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libnvrtc.so"));
    let mut found: Vec<std::path::PathBuf> = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).map(std::path::PathBuf::from).filter(|p| is_nvrtc(p)).collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// How many NVRTC compilations this process has run (the cache's hit rate is visible in tests).
pub fn nvrtc_compilations() -> usize {
    COMPILATIONS.load(Ordering::Relaxed)
}

static COMPILATIONS: AtomicUsize = AtomicUsize::new(0);

/// Parses ptxas `-v` output. Entry functions are introduced by "Compiling entry function 'NAME'
/// for 'ARCH'"; the following "Function properties for NAME" / "N bytes stack frame, ..." and
/// "Used N registers, ..." lines belong to the entry being reported. Lines it does not know
/// (gmem, cmem, warnings) are ignored rather than rejected, so new ptxas wording degrades to
/// missing numbers, which the tests then notice.
pub fn parse_ptxas_report(log: &str) -> Vec<KernelResources> {
    let mut kernels: Vec<KernelResources> = Vec::new();
    // Properties may name a non-entry (device) function; only attach them to the current entry.
    let mut properties_for_current = false;
    for line in log.lines() {
        if let Some(rest) = line.split_once("Compiling entry function").map(|(_, r)| r) {
            let mut quoted = rest.split('\'').skip(1).step_by(2);
            let name = quoted.next().unwrap_or_default().to_string();
            let arch = quoted.next().unwrap_or_default().to_string();
            kernels.push(KernelResources { name, arch, ..Default::default() });
            properties_for_current = false;
        } else if let Some((_, name)) = line.split_once("Function properties for") {
            let name = name.trim();
            properties_for_current = kernels.last().is_some_and(|k| k.name == name);
        } else if line.contains("bytes stack frame") {
            // "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
            if let (true, Some(k)) = (properties_for_current, kernels.last_mut()) {
                k.stack_frame_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_store_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_load_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
            }
        } else if line.contains(": Used ") {
            // "ptxas info    : Used 24 registers, used 1 barriers, 128 bytes smem, 424 bytes cmem[0]"
            if let Some(k) = kernels.last_mut() {
                k.registers = number_before(line, "registers").unwrap_or(0);
                k.barriers = number_before(line, "barriers").unwrap_or(0);
                k.smem_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    kernels
}

/// The integer written just before `keyword` in `line` ("…, 128 bytes smem" → 128 for "bytes smem").
fn number_before(line: &str, keyword: &str) -> Option<u32> {
    let (before, _) = line.split_once(keyword)?;
    before.split_whitespace().last()?.parse().ok()
}

/// Whether `arch` names a real GPU architecture, `sm_XY[a|f]`: a CUBIN needs one, not a
/// virtual `compute_XY`.
pub fn is_real_arch(arch: &str) -> bool {
    let digits = arch.strip_prefix("sm_").map(|r| r.trim_end_matches(['a', 'f']));
    matches!(digits, Some(d) if (2..=3).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
}

fn check_arch(arch: &str) -> Result<()> {
    match is_real_arch(arch) {
        true => Ok(()),
        false => Err(Error::Cuda(format!("invalid GPU architecture `{arch}` (expected e.g. sm_80, sm_90, sm_90a)"))),
    }
}

fn ensure_nvrtc() -> Result<()> {
    match probe::nvrtc_unavailable_reason() {
        None => Ok(()),
        Some(reason) => Err(Error::Cuda(reason)),
    }
}

/// Runs `f`, turning a panic inside cudarc (missing library or symbol) into an error.
fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => Err(Error::Cuda(format!("{what}: CUDA library call panicked: {}", probe::panic_message(&*panic)))),
    }
}

/// Destroys the NVRTC program on every exit path.
struct Program(nvrtc_sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by create_program and destroyed only here.
        let _ = unsafe { nvrtc::destroy_program(self.0) };
    }
}

fn c_chars_to_string(chars: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles one translation unit to a CUBIN; returns (cubin, log). `options` must name a real
/// `sm_XY` architecture, or NVRTC produces no CUBIN (reported as an error).
fn nvrtc_compile(source: &str, program_name: &str, options: &[String]) -> Result<(Vec<u8>, String)> {
    ensure_nvrtc()?;
    let src = CString::new(source).map_err(|_| Error::Cuda(format!("{program_name}: kernel source contains a NUL byte")))?;
    let name = CString::new(program_name).map_err(|_| Error::Cuda("program name contains a NUL byte".into()))?;
    if let Some(bad) = options.iter().find(|o| o.contains('\0')) {
        // cudarc's compile_program would panic on this.
        return Err(Error::Cuda(format!("NVRTC option {bad:?} contains a NUL byte")));
    }
    let mut options = options.to_vec();
    if let Some(dir) = cuda_include_dir() {
        options.push(format!("-I{}", dir.display()));
    }
    let options = &options[..];
    guard("NVRTC", || {
        let prog = Program(
            nvrtc::create_program(&src, Some(name.as_c_str()))
                .map_err(|e| Error::Cuda(format!("{program_name}: nvrtcCreateProgram failed: {e:?}")))?,
        );
        COMPILATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `prog` is live until dropped; src/name outlive it (declared before it).
        let compiled = unsafe { nvrtc::compile_program(prog.0, options) };
        let log = unsafe { nvrtc::get_program_log(prog.0) }.map(|l| c_chars_to_string(&l)).unwrap_or_default();
        if let Err(e) = compiled {
            return Err(Error::Cuda(format!(
                "NVRTC failed to compile {program_name} with {options:?}: {e:?}\n{}",
                log.trim_end()
            )));
        }
        let mut size = 0usize;
        // SAFETY: valid program and out-pointer; the buffer below has exactly `size` bytes.
        unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog.0, &mut size) }
            .result()
            .map_err(|e| Error::Cuda(format!("{program_name}: no CUBIN ({e:?}); options {options:?} need an sm_XY arch")))?;
        if size == 0 {
            return Err(Error::Cuda(format!("{program_name}: NVRTC produced an empty CUBIN with {options:?}")));
        }
        let mut cubin = vec![0u8; size];
        unsafe { nvrtc_sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast()) }
            .result()
            .map_err(|e| Error::Cuda(format!("{program_name}: nvrtcGetCUBIN failed: {e:?}")))?;
        Ok((cubin, log))
    })
}

// ---- the process-wide CUBIN cache --------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ModuleKey {
    source_hash: u64,
    source_len: usize,
    arch: String,
    options: Vec<String>,
}

impl ModuleKey {
    fn new(code: &str, arch: &str, options: &[&str]) -> Self {
        ModuleKey {
            source_hash: fnv1a(code.as_bytes()),
            source_len: code.len(),
            arch: arch.to_string(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// FNV-1a, for the in-process map (the disk cache keys by a 128-bit digest of its own).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock cannot leave a half-written map entry behind.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A CUBIN held by the process-wide cache, and whether it was read from the disk cache (an image
/// the driver may still refuse, which a fresh compile then replaces).
#[derive(Clone, Debug)]
pub struct CachedCubin {
    pub image: Arc<Vec<u8>>,
    pub origin: CubinOrigin,
}

fn memory_cache() -> &'static Mutex<HashMap<ModuleKey, CachedCubin>> {
    static CACHE: OnceLock<Mutex<HashMap<ModuleKey, CachedCubin>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The CUBIN for `code` on `arch` with `options`, compiled at most once per process and, through
/// the disk cache the environment configures ([`DiskCache::configured`]), once per machine.
pub fn cached_cubin(program_name: &str, code: &str, arch: &str, options: &[&str]) -> Result<Arc<Vec<u8>>> {
    Ok(cubin_through(program_name, code, arch, options, DiskCache::configured())?.image)
}

/// [`cached_cubin`] with the disk cache `disk` (or none), saying where the image came from.
pub fn cubin_through(program_name: &str, code: &str, arch: &str, options: &[&str], disk: Option<&DiskCache>) -> Result<CachedCubin> {
    check_arch(arch)?;
    let key = ModuleKey::new(code, arch, options);
    // Held across the compile on purpose: concurrent first users of a kernel wait for one compile.
    let mut cache = lock(memory_cache());
    if let Some(hit) = cache.get(&key) {
        return Ok(hit.clone());
    }
    let compile = || compile_cubin(program_name, code, arch, options);
    let (image, origin) = match disk.map(|d| (d, entry_key(program_name, code, arch, options))) {
        Some((d, Ok(entry))) => d.fetch_or_compile(&entry, compile)?,
        // No NVRTC version to key by: the compile reports why NVRTC is missing.
        Some((_, Err(_))) | None => (compile()?, CubinOrigin::Compiled),
    };
    let entry = CachedCubin { image: Arc::new(image), origin };
    cache.insert(key, entry.clone());
    Ok(entry)
}

/// Compiles again, bypassing both caches, and replaces their entries: the driver refused the
/// image the disk cache held.
fn recompile_refused(program_name: &str, code: &str, arch: &str, options: &[&str], disk: Option<&DiskCache>) -> Result<CachedCubin> {
    let mut cache = lock(memory_cache());
    let image = compile_cubin(program_name, code, arch, options)?;
    if let Some(d) = disk {
        let stored = entry_key(program_name, code, arch, options).and_then(|entry| d.store(&entry, &image));
        if let Err(e) = stored {
            warn(&format!("the kernel cache entry for {program_name} ({arch}) was not replaced: {e}"));
        }
    }
    let entry = CachedCubin { image: Arc::new(image), origin: CubinOrigin::Compiled };
    cache.insert(ModuleKey::new(code, arch, options), entry.clone());
    Ok(entry)
}

/// NVRTC's full option list for a CUBIN of `code` on `arch` with `options`.
fn full_options(arch: &str, options: &[&str]) -> Vec<String> {
    let mut all = vec![format!("--gpu-architecture={arch}")];
    all.extend(options.iter().map(|s| s.to_string()));
    all
}

/// Compiles `code` to a CUBIN for `arch` with `options`, with no cache at all.
pub fn compile_cubin(program_name: &str, code: &str, arch: &str, options: &[&str]) -> Result<Vec<u8>> {
    check_arch(arch)?;
    Ok(nvrtc_compile(code, program_name, &full_options(arch, options))?.0)
}

/// The disk cache's entry for `code` on `arch` with `options`, keyed by the NVRTC this process
/// loaded (so it needs libnvrtc).
pub fn entry_key(program_name: &str, code: &str, arch: &str, options: &[&str]) -> Result<EntryKey> {
    let family = Path::new(program_name).file_stem().and_then(|s| s.to_str()).unwrap_or(program_name);
    let toolchain = toolchain_identity(nvrtc_version()?, &mapped_nvrtc(), cuda_include_dir().as_deref());
    Ok(EntryKey::new(family, code, arch, &full_options(arch, options), &toolchain))
}

/// What [`precompile`] did for one kernel source.
#[derive(Clone, Debug)]
pub struct Precompiled {
    pub family: &'static str,
    /// `Disk`: the entry was already there; `Compiled`: NVRTC made it now.
    pub origin: CubinOrigin,
    pub seconds: f64,
}

/// Compiles `sources` for `arch` into `disk`, `jobs` NVRTC compiles at a time (NVRTC is
/// thread-safe; each compile uses one core), the largest first so the longest compile does not
/// start last. Entries already on disk are only checked. One result a source, in `sources`' order:
/// a source that fails to compile does not stop the others. This is what later processes then
/// read instead of compiling ([`cached_cubin`], with the same options: none beyond the arch).
/// `on_done` hears of each source as it finishes (from the compile threads), for progress.
pub fn precompile(
    disk: &DiskCache,
    sources: &[&'static KernelSource],
    arch: &str,
    jobs: usize,
    on_done: impl Fn(&KernelSource, &Result<Precompiled>) + Sync,
) -> Result<Vec<Result<Precompiled>>> {
    check_arch(arch)?;
    ensure_nvrtc()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs.max(1))
        .build()
        .map_err(|e| Error::Cuda(format!("cannot start {jobs} compile threads: {e}")))?;
    let mut order: Vec<usize> = (0..sources.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sources[i].code.len()));
    let mut results: Vec<(usize, Result<Precompiled>)> = pool.install(|| {
        use rayon::prelude::*;
        order
            .par_iter()
            .with_max_len(1)
            .map(|&i| {
                let source = sources[i];
                let start = std::time::Instant::now();
                let done = entry_key(source.file, source.code, arch, &[]).and_then(|key| {
                    let (_, origin) = disk.fetch_or_compile(&key, || compile_cubin(source.file, source.code, arch, &[]))?;
                    // fetch_or_compile only warns when it cannot keep a compile; here keeping it is the point.
                    match disk.load(&key) {
                        Some(_) => Ok(origin),
                        None => Err(Error::Cuda(format!("{}: compiled, but not kept in {}", source.file, disk.entry_path(&key).display()))),
                    }
                });
                let result = done.map(|origin| Precompiled { family: source.family, origin, seconds: start.elapsed().as_secs_f64() });
                on_done(source, &result);
                (i, result)
            })
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
    Ok(results.into_iter().map(|(_, r)| r).collect())
}

/// Loads `entry` with `load`; where the driver refuses an image the disk cache supplied, compiles
/// afresh with `recompile` and loads that instead (the same bytes refused twice are an error).
fn load_or_recompile<M>(entry: CachedCubin, load: impl Fn(&[u8]) -> Result<M>, recompile: impl FnOnce() -> Result<CachedCubin>) -> Result<M> {
    let refused = match load(&entry.image) {
        Ok(m) => return Ok(m),
        Err(e) if entry.origin == CubinOrigin::Disk => e,
        Err(e) => return Err(e),
    };
    warn(&format!("the driver refused a cached kernel image ({refused}); compiling it again"));
    let fresh = recompile()?;
    if fresh.image == entry.image {
        return Err(refused);
    }
    load(&fresh.image)
}

// ---- the runtime ---------------------------------------------------------------------------------

/// A device context, the stream launchers enqueue on, and the loaded kernels.
pub struct CudaRuntime {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    compute_capability: (i32, i32),
    arch: String,
    modules: Mutex<HashMap<ModuleKey, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    /// Where compiled images are kept across processes; the environment's by default.
    disk_cache: Option<DiskCache>,
}

impl std::fmt::Debug for CudaRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaRuntime").field("ordinal", &self.ctx.ordinal()).field("arch", &self.arch).finish()
    }
}

impl CudaRuntime {
    /// Opens device `ordinal` (probing first, so a machine without CUDA gets an error, not a panic).
    pub fn open(ordinal: usize) -> Result<Self> {
        let ctx = probe::probe_gpu(ordinal).map_err(Error::Cuda)?;
        Self::new(ctx)
    }

    /// A runtime on `ctx` with a new stream of its own. Not the legacy default stream: that one
    /// synchronises with every other stream and cannot be captured into a CUDA graph.
    pub fn new(ctx: Arc<CudaContext>) -> Result<Self> {
        let stream = guard("cuStreamCreate", || ctx.new_stream().map_err(driver_err("creating a stream")))?;
        Self::with_stream(ctx, stream)
    }

    /// A runtime that enqueues on `stream` (which must belong to `ctx`).
    pub fn with_stream(ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Result<Self> {
        let compute_capability =
            guard("compute capability", || ctx.compute_capability().map_err(driver_err("reading the compute capability")))?;
        let (major, minor) = compute_capability;
        Ok(CudaRuntime {
            ctx,
            stream,
            compute_capability,
            arch: format!("sm_{major}{minor}"),
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            disk_cache: DiskCache::configured().cloned(),
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// (major, minor), e.g. (9, 0) on an H100.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }
    /// The NVRTC target for this device, e.g. `"sm_90"`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The disk cache this runtime compiles through (see [`super::kernel_cache`]).
    pub fn kernel_cache(&self) -> Option<&DiskCache> {
        self.disk_cache.as_ref()
    }

    /// Compile through `cache` instead of the environment's (`None`: no disk cache). Modules
    /// already loaded stay loaded.
    pub fn set_kernel_cache(&mut self, cache: Option<DiskCache>) {
        self.disk_cache = cache;
    }

    /// The module for `source` built with `options` (beyond the arch), compiled and loaded once.
    /// An image from the disk cache that the driver refuses is compiled again and replaced.
    pub fn module(&self, source: &KernelSource, options: &[&str]) -> Result<Arc<CudaModule>> {
        let key = ModuleKey::new(source.code, &self.arch, options);
        let mut modules = lock(&self.modules);
        if let Some(m) = modules.get(&key) {
            return Ok(m.clone());
        }
        let (file, code, arch, disk) = (source.file, source.code, self.arch.as_str(), self.disk_cache.as_ref());
        let cubin = cubin_through(file, code, arch, options, disk)?;
        let module = load_or_recompile(cubin, |image| self.load_image(file, image), || recompile_refused(file, code, arch, options, disk))?;
        modules.insert(key, module.clone());
        Ok(module)
    }

    fn load_image(&self, file: &str, image: &[u8]) -> Result<Arc<CudaModule>> {
        let arch = &self.arch;
        guard("cuModuleLoadData", || {
            self.ctx.load_module(Ptx::from_binary(image.to_vec())).map_err(|e| {
                let hint = match e.0 {
                    CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU
                    | CUresult::CUDA_ERROR_INVALID_IMAGE
                    | CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => {
                        " (the CUBIN does not match this GPU or driver: NVRTC must be CUDA 13.0 for driver 580)"
                    }
                    _ => "",
                };
                Error::Cuda(format!("loading {file} built for {arch}: {e:?}{hint}"))
            })
        })
    }

    /// The kernel `kernel`, from its source built with default options.
    pub fn function(&self, kernel: KernelName) -> Result<CudaFunction> {
        if let Some(f) = lock(&self.functions).get(kernel.name) {
            return Ok(f.clone());
        }
        let module = self.module(kernel.source, &[])?;
        let f = guard("cuModuleGetFunction", || {
            module.load_function(kernel.name).map_err(|e| {
                let why = if e.0 == CUresult::CUDA_ERROR_NOT_FOUND { "not found in the module" } else { "cannot be loaded" };
                Error::Cuda(format!("kernel `{}` {why} ({} built for {}): {e:?}", kernel.name, kernel.source.file, self.arch))
            })
        })?;
        lock(&self.functions).insert(kernel.name, f.clone());
        Ok(f)
    }

    /// Waits for everything enqueued on this runtime's stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver_err("synchronising the stream"))
    }
}

/// Maps a driver error to `Error::Cuda`, naming what was being done.
pub(crate) fn driver_err(what: &'static str) -> impl Fn(DriverError) -> Error {
    move |e| Error::Cuda(format!("{what}: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from NVRTC 13.0.88 (PyPI wheel) compiling kernels/layernorm.cu for sm_80 with
    // --ptxas-options=-v.
    const LAYERNORM_SM80: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'residual_layernorm_forward_f32' for 'sm_80'
ptxas info    : Function properties for residual_layernorm_forward_f32
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 24 registers, used 1 barriers, 128 bytes smem, 424 bytes cmem[0]
ptxas info    : Compile time = 21.447 ms
";

    // Captured from the same NVRTC: two entries, a non-inlined device function, a warning and
    // --maxrregcount=16 (raised to 24 by ptxas).
    const TWO_KERNELS_SM90: &str = "\
ptxas warning : For profile sm_90 adjusting per thread register count of 16 to lower bound of 24
ptxas info    : Overriding maximum register limit 256 for 'tiny' with  24 of maxrregcount option
ptxas info    : Overriding maximum register limit 256 for 'spill' with  24 of maxrregcount option
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'tiny' for 'sm_90'
ptxas info    : Function properties for tiny
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers
ptxas info    : Compile time = 1.302 ms
ptxas info    : Compiling entry function 'spill' for 'sm_90'
ptxas info    : Function properties for spill
ptxas         .     256 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 256 bytes cumulative stack size
ptxas info    : Compile time = 13.138 ms
ptxas info    : Function properties for _Z6helperPfi
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
";

    // Captured from the same NVRTC: a register-hungry kernel squeezed by --maxrregcount=32.
    const SPILLING_SM90: &str = "\
ptxas info    : Overriding maximum register limit 256 for 'hot' with  32 of maxrregcount option
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'hot' for 'sm_90'
ptxas info    : Function properties for hot
ptxas         .     344 bytes stack frame, 656 bytes spill stores, 724 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 344 bytes cumulative stack size
ptxas info    : Compile time = 28.252 ms
";

    #[test]
    fn parses_a_single_kernel_report() {
        let k = parse_ptxas_report(LAYERNORM_SM80);
        assert_eq!(
            k,
            vec![KernelResources {
                name: "residual_layernorm_forward_f32".into(),
                arch: "sm_80".into(),
                registers: 24,
                stack_frame_bytes: 0,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
                smem_bytes: 128,
                barriers: 1,
            }]
        );
    }

    #[test]
    fn attributes_lines_to_the_right_entry_and_ignores_device_functions() {
        let k = parse_ptxas_report(TWO_KERNELS_SM90);
        assert_eq!(k.len(), 2, "{k:#?}");
        assert_eq!((k[0].name.as_str(), k[0].registers, k[0].stack_frame_bytes, k[0].barriers), ("tiny", 8, 0, 0));
        assert_eq!((k[1].name.as_str(), k[1].registers, k[1].stack_frame_bytes, k[1].smem_bytes), ("spill", 24, 256, 0));
        assert!(k.iter().all(|k| k.arch == "sm_90"));
    }

    #[test]
    fn reads_spill_figures() {
        let k = parse_ptxas_report(SPILLING_SM90);
        assert_eq!(k.len(), 1);
        assert_eq!((k[0].stack_frame_bytes, k[0].spill_store_bytes, k[0].spill_load_bytes), (344, 656, 724));
        assert_eq!(k[0].registers, 32);
    }

    #[test]
    fn tolerates_empty_and_foreign_logs() {
        assert!(parse_ptxas_report("").is_empty());
        assert!(parse_ptxas_report("kernel.cu(3): error: identifier \"x\" is undefined\n").is_empty());
        // Properties before any entry are not attached anywhere.
        assert!(parse_ptxas_report("ptxas info    : Function properties for f\nptxas . 8 bytes stack frame").is_empty());
    }

    #[test]
    fn arch_validation() {
        assert!(check_arch("sm_80").is_ok());
        assert!(check_arch("sm_90a").is_ok());
        assert!(check_arch("sm_100f").is_ok());
        assert!(check_arch("compute_90").is_err());
        assert!(check_arch("sm_9").is_err());
        assert!(check_arch("sm_90;rm -rf").is_err());
    }

    #[test]
    fn fnv_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn a_refused_cached_image_is_compiled_again_once() {
        use std::cell::Cell;
        let entry = |bytes: &[u8], origin| CachedCubin { image: Arc::new(bytes.to_vec()), origin };
        // The driver stand-in accepts only the image "good".
        let loads = Cell::new(0);
        let load = |image: &[u8]| {
            loads.set(loads.get() + 1);
            if image == b"good" { Ok(image.len()) } else { Err(Error::Cuda(format!("refused {}", String::from_utf8_lossy(image)))) }
        };
        let recompiles = Cell::new(0);
        let recompile = |bytes: &'static [u8]| {
            let recompiles = &recompiles;
            move || {
                recompiles.set(recompiles.get() + 1);
                Ok(entry(bytes, CubinOrigin::Compiled))
            }
        };
        // A disk image the driver refuses: compiled again, and the fresh image loads.
        assert_eq!(load_or_recompile(entry(b"stale", CubinOrigin::Disk), load, recompile(b"good")).unwrap(), 4);
        assert_eq!((loads.get(), recompiles.get()), (2, 1));
        // An accepted image is not compiled again.
        assert_eq!(load_or_recompile(entry(b"good", CubinOrigin::Disk), load, recompile(b"good")).unwrap(), 4);
        assert_eq!(recompiles.get(), 1);
        // A freshly compiled image the driver refuses is the driver's error; nothing is retried.
        let err = load_or_recompile(entry(b"new", CubinOrigin::Compiled), load, recompile(b"good")).unwrap_err();
        assert!(err.to_string().contains("refused new"), "{err}");
        assert_eq!(recompiles.get(), 1);
        // The same bytes again: the driver's first answer, not a second load of the same image.
        loads.set(0);
        let err = load_or_recompile(entry(b"same", CubinOrigin::Disk), load, recompile(b"same")).unwrap_err();
        assert!(err.to_string().contains("refused same"), "{err}");
        assert_eq!((loads.get(), recompiles.get()), (1, 2));
        // A failed recompile is that failure.
        let err = load_or_recompile(entry(b"stale", CubinOrigin::Disk), load, || Err(Error::Cuda("NVRTC missing".into()))).unwrap_err();
        assert!(err.to_string().contains("NVRTC missing"), "{err}");
    }
}
