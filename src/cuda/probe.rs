//! Probing for NVRTC and a GPU without panicking.
//!
//! cudarc (dynamic loading) panics on the first call into a library it cannot `dlopen`, so every
//! probe first asks `is_culib_present()` and then wraps the real call in `catch_unwind` (a missing
//! symbol in an old library panics too). Answers are cached: a process does not gain a GPU.
//!
//! Test helpers: [`require_gpu!`](crate::require_gpu) and [`nvrtc_for_test`]. A skipped test is
//! reported as passed by libtest, so each skip is recorded by [`report_skip`]: in the file that
//! `BERT_ADAPTERS_SKIP_LOG` names, where `scripts/test.sh` counts them as skipped, or else in the
//! test's captured output (never between libtest's lines). The env vars `REQUIRE_GPU=1` /
//! `REQUIRE_NVRTC=1` turn a skip into a failure on machines where the hardware or library must be
//! there.

use std::io::Write as _;
use std::path::Path;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};

use cudarc::driver::CudaContext;

/// Whether `libnvrtc` can be loaded (it needs no GPU and no driver).
pub fn nvrtc_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    // SAFETY: only dlopens and closes the library; no symbol is called.
    *AVAILABLE.get_or_init(|| catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false))
}

/// Whether the CUDA driver library (`libcuda`) can be loaded. It may still have no device.
pub fn driver_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    // SAFETY: as above.
    *AVAILABLE.get_or_init(|| catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false))
}

/// Why NVRTC is not usable, or `None` if it is.
pub fn nvrtc_unavailable_reason() -> Option<String> {
    if nvrtc_available() {
        None
    } else {
        Some(format!(
            "libnvrtc (CUDA 13.0) cannot be loaded; LD_LIBRARY_PATH={:?}. \
             Run `source scripts/install-cuda-tools.sh` to install it from PyPI",
            std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
        ))
    }
}

/// What a GPU run needs beside the driver and is missing: NVRTC (the kernels are compiled at run
/// time) and cuBLASLt (the dense products), with how to install them; `None` when both load.
/// Neither needs a GPU to be checked.
pub fn gpu_libraries_missing() -> Option<String> {
    let missing = match (nvrtc_available(), super::gemm::cublaslt_available()) {
        (true, true) => return None,
        (false, true) => "libnvrtc (CUDA 13.0, which compiles the kernels) cannot be loaded",
        (true, false) => "libcublasLt (CUDA 13, the dense products) cannot be loaded",
        (false, false) => "neither libnvrtc nor libcublasLt (CUDA 13) can be loaded",
    };
    Some(format!(
        "{missing} (LD_LIBRARY_PATH={:?}; `CUDA_TOOLS_CUBLAS=1 source scripts/install-cuda-tools.sh` installs both from PyPI, no root needed)",
        std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
    ))
}

/// Opens device `ordinal`, or says why not. Never panics. The device-0 result is cached.
pub fn probe_gpu(ordinal: usize) -> Result<Arc<CudaContext>, String> {
    static DEVICE0: OnceLock<Result<Arc<CudaContext>, String>> = OnceLock::new();
    if ordinal == 0 {
        return DEVICE0.get_or_init(|| open(0)).clone();
    }
    open(ordinal)
}

/// How many CUDA devices the driver sees, or why it cannot say (no driver). Never panics.
pub fn device_count() -> Result<usize, String> {
    if !driver_available() {
        return Err("no CUDA driver (libcuda.so.1 cannot be loaded)".into());
    }
    match catch_unwind(CudaContext::device_count) {
        Ok(Ok(n)) => Ok(n.max(0) as usize),
        Ok(Err(e)) => Err(format!("the CUDA driver cannot count its devices: {e:?}")),
        Err(panic) => Err(format!("CUDA driver panicked while counting devices: {}", panic_message(&*panic))),
    }
}

/// `Some(context)` if libcuda loads and device 0 opens; `None` otherwise. Never panics.
pub fn try_gpu() -> Option<Arc<CudaContext>> {
    probe_gpu(0).ok()
}

fn open(ordinal: usize) -> Result<Arc<CudaContext>, String> {
    if !driver_available() {
        return Err("no CUDA driver (libcuda.so.1 cannot be loaded)".into());
    }
    match catch_unwind(AssertUnwindSafe(|| CudaContext::new(ordinal))) {
        Ok(Ok(ctx)) => Ok(ctx),
        Ok(Err(e)) => Err(format!("CUDA device {ordinal} cannot be opened: {e:?}")),
        Err(panic) => Err(format!("CUDA driver panicked while opening device {ordinal}: {}", panic_message(&*panic))),
    }
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}

/// True when `var` is set to something other than empty or `0`.
pub fn env_flag(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The one of `choices` named `v` (the value of `var`); another value is an `Error::Input` naming
/// the variable, the value and the names it takes.
pub fn parse_choice<T: Copy>(var: &str, v: &str, choices: &[(&str, T)]) -> crate::Result<T> {
    choices.iter().find(|(name, _)| *name == v).map(|&(_, t)| t).ok_or_else(|| {
        let names: Vec<String> = choices.iter().map(|(name, _)| format!("{name:?}")).collect();
        crate::Error::Input(format!("{var}={v:?}: expected {}", names.join(" or ")))
    })
}

/// `var`'s value among `choices`, `None` when it is unset ([`parse_choice`]; a value that is not
/// Unicode is an `Error::Input` too).
pub fn env_choice<T: Copy>(var: &str, choices: &[(&str, T)]) -> crate::Result<Option<T>> {
    match std::env::var(var) {
        Ok(v) => parse_choice(var, &v, choices).map(Some),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => Err(crate::Error::Input(format!("{var}: {e}"))),
    }
}

/// Writes one line to the process's real stderr, bypassing libtest's output capture, so that
/// skips are visible in a plain `cargo test`.
pub fn report_line(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// The variable naming the file that [`report_skip`] appends to (`scripts/test.sh` sets it).
pub const SKIP_LOG: &str = "BERT_ADAPTERS_SKIP_LOG";

/// For tests: the running test skips (`label`, `reason`; `kind` is the short cause a summary
/// counts by, e.g. `no GPU`). libtest counts such a test as passed, so the skip is recorded: with
/// [`SKIP_LOG`] set, as one line `<test binary>\t<test>\t<kind>\t<label>: <reason>` appended to
/// that file, printing nothing; otherwise as `SKIPPED: <label>: <reason>` in the test's captured
/// output (shown with `--nocapture`, or when the test fails).
pub fn report_skip(label: &str, kind: &str, reason: &str) {
    match std::env::var_os(SKIP_LOG).filter(|p| !p.is_empty()) {
        Some(path) => {
            if let Err(e) = append_line(Path::new(&path), &skip_record(label, kind, reason)) {
                panic!("{SKIP_LOG}={}: cannot record the skip of {label}: {e}", Path::new(&path).display());
            }
        }
        None => eprintln!("SKIPPED: {label}: {reason}"),
    }
}

/// The skip log line of the running test: its binary and its name (libtest names each test's
/// thread after the test), so that a test that skips twice is counted once.
fn skip_record(label: &str, kind: &str, reason: &str) -> String {
    let binary = std::env::current_exe().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_default();
    let thread = std::thread::current();
    let test = thread.name().filter(|n| *n != "main").unwrap_or(label);
    let clean = |s: &str| s.replace(['\t', '\n', '\r'], " ");
    format!("{}\t{}\t{}\t{}: {}\n", clean(&binary), clean(test), clean(kind), clean(label), clean(reason))
}

/// Append `line` in one write (O_APPEND), so lines from parallel tests do not mix.
fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new().create(true).append(true).open(path)?.write_all(line.as_bytes())
}

/// For tests: the device-0 context, or `None` after recording the skip ([`report_skip`]).
///
/// # Panics
/// When `REQUIRE_GPU` is set (see [`env_flag`]) and no GPU is usable: on a GPU machine a silent
/// skip would hide a broken library path. This is the one intended panic, and only tests call it.
pub fn gpu_for_test(label: &str) -> Option<Arc<CudaContext>> {
    match probe_gpu(0) {
        Ok(ctx) => Some(ctx),
        Err(reason) if env_flag("REQUIRE_GPU") => panic!("REQUIRE_GPU is set but {label} cannot run: {reason}"),
        Err(reason) => {
            report_skip(label, "no GPU", &reason);
            None
        }
    }
}

/// For tests: whether NVRTC is usable; if not, records the skip ([`report_skip`]) and returns false.
///
/// # Panics
/// When `REQUIRE_NVRTC` is set and NVRTC cannot be loaded (the CI script sets it after installing
/// the wheels, so a broken install fails instead of skipping).
pub fn nvrtc_for_test(label: &str) -> bool {
    match nvrtc_unavailable_reason() {
        None => true,
        Some(reason) if env_flag("REQUIRE_NVRTC") => panic!("REQUIRE_NVRTC is set but {label} cannot run: {reason}"),
        Some(reason) => {
            report_skip(label, "no NVRTC", &reason);
            false
        }
    }
}

/// In a test: `let ctx = require_gpu!();` (or `require_gpu!("label")`) binds the device-0
/// context, or returns early after recording the skip; fails under `REQUIRE_GPU=1`.
#[macro_export]
macro_rules! require_gpu {
    () => {
        $crate::require_gpu!(module_path!())
    };
    ($label:expr) => {
        match $crate::cuda::probe::gpu_for_test($label) {
            Some(ctx) => ctx,
            None => return,
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probing_never_panics_and_is_stable() {
        let first = try_gpu().is_some();
        assert_eq!(first, try_gpu().is_some());
        if !driver_available() {
            assert!(probe_gpu(0).unwrap_err().contains("libcuda"));
        }
        let _ = nvrtc_available();
    }

    #[test]
    fn a_skip_is_recorded_under_the_test_binary_and_the_test_name() {
        let line = skip_record("label", "no GPU", "no\tdriver\nhere");
        let fields: Vec<&str> = line.trim_end_matches('\n').split('\t').collect();
        let binary = std::env::current_exe().unwrap().file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(fields, [binary.as_str(), "cuda::probe::tests::a_skip_is_recorded_under_the_test_binary_and_the_test_name", "no GPU", "label: no driver here"]);
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("skips");
        append_line(&log, &line).unwrap();
        append_line(&log, &line).unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), format!("{line}{line}"));
    }

    #[test]
    fn env_flag_semantics() {
        // A name no one sets; the helper must treat unset as false.
        assert!(!env_flag("BERT_ADAPTERS_SURELY_UNSET_FLAG"));
    }
}
