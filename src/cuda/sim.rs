//! `cuda-sim`: runs the kernels of `kernels/*.cu` on the CPU under strict CUDA semantics
//! (cargo feature `cuda-sim`; design in the shared docs' `KERNELS_ON_CPU.md`).
//!
//! `build.rs` compiles the C++20 runtime in `src/cuda/sim/` with the kernel text (one namespace per
//! family, `#line` markers naming the real files; only `__shared__` declarations are rewritten,
//! each on its own line). Launches take the shape of
//! `cuLaunchKernel`: a kernel name, grid, block, dynamic shared bytes and one pointer per kernel
//! parameter. Device pointers are host pointers here.
//!
//! What the executor checks, each failure naming kernel, block, thread and source line:
//! - every live thread of a block reaches the same `__syncthreads` line, and no thread exits while
//!   others wait at one;
//! - warp shuffles and `__syncwarp` follow the PTX `shfl.sync` rules (width, clamping); every lane
//!   named by the mask must arrive (an exited or diverged lane is an error, not a hang), the calling
//!   lane must be in its mask, and a value read from a lane outside the mask is NaN;
//! - dynamic shared memory is exactly the launch's size, filled with NaN, and followed by a canary
//!   that is checked every time a thread yields, so an overflow names the thread; static
//!   `__shared__` arrays are NaN-poisoned for every block;
//! - device memory ([`SimAllocation`]) ends directly before a guard page, so a read or write past
//!   the end (or a null pointer, a use after free, a stack overflow) stops the launch with a
//!   message naming the access, the allocation and the source line;
//! - launch configurations beyond the device limits (1024 threads, the launch's dynamic shared
//!   memory limit in [`LaunchOptions`]) are refused.
//!
//! Threads of a block run as fibers (a hand-written context switch on x86-64, ucontext elsewhere
//! or with `CUDA_SIM_SWITCH=ucontext`) in a [`Schedule`] order; blocks are spread over OS threads
//! (`CUDA_SIM_THREADS`, default: all cores). Atomics, warp votes/reductions/matches and bf16/f16
//! conversions are in `sim/sim_intrinsics.cuh` and `sim/include/` (docs/CUDA_SIM.md).

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::NonNull;

use cudarc::driver::LaunchConfig;

use super::registry::KernelName;

extern "C" {
    fn bert_sim_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        smem: usize,
        max_smem: usize,
        opted_in: i32,
        args: *mut *mut c_void,
        nargs: usize,
        schedule: i32,
        seed: u64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn bert_sim_kernel_count() -> usize;
    fn bert_sim_kernel_name(i: usize) -> *const c_char;
    fn bert_sim_alloc(bytes: usize, out: *mut *mut c_void, err: *mut c_char, err_len: usize) -> i32;
    fn bert_sim_free(p: *mut c_void, err: *mut c_char, err_len: usize) -> i32;
    fn bert_sim_source_lines_available() -> i32;
}

/// Runs a C entry point that reports failure as 1 plus a message in a buffer.
fn checked(call: impl FnOnce(*mut c_char, usize) -> i32) -> Result<(), SimError> {
    let mut err = vec![0u8; 2048];
    if call(err.as_mut_ptr().cast(), err.len()) == 0 {
        return Ok(());
    }
    let msg = CStr::from_bytes_until_nul(&err).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Err(SimError(msg))
}

/// The order in which a block's threads run between sync points. A race-free kernel gives the
/// same bits in every order; a missing barrier shows up in some order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    Forward,
    Reverse,
    /// A fresh permutation every round, from this seed (mixed with the block index).
    Random(u64),
}

impl Schedule {
    /// `CUDA_SIM_SCHEDULE` = `forward` (the default when unset), `reverse`, `random` or
    /// `random:SEED`.
    pub fn from_env() -> Result<Schedule, SimError> {
        match std::env::var("CUDA_SIM_SCHEDULE") {
            Err(_) => Ok(Schedule::Forward),
            Ok(s) => Schedule::parse(&s),
        }
    }

    pub fn parse(s: &str) -> Result<Schedule, SimError> {
        match s.trim() {
            "" | "forward" => Ok(Schedule::Forward),
            "reverse" => Ok(Schedule::Reverse),
            "random" => Ok(Schedule::Random(0x5eed)),
            other => match other.strip_prefix("random:").map(str::parse::<u64>) {
                Some(Ok(seed)) => Ok(Schedule::Random(seed)),
                _ => Err(SimError(format!("CUDA_SIM_SCHEDULE: expected forward, reverse, random or random:SEED, got `{s}`"))),
            },
        }
    }
}

/// How to run one launch: the thread order, and the dynamic shared memory the driver would allow
/// (48 KiB without an opt-in; up to the device's maximum after
/// `cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)`, which the caller models).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchOptions {
    pub schedule: Schedule,
    pub max_dynamic_shared_bytes: usize,
    /// Whether the kernel was opted in (`cuFuncSetAttribute`): then only the dynamic bytes are
    /// held to `max_dynamic_shared_bytes`; without an opt-in a block's static `__shared__` arrays
    /// and its dynamic memory together get 48 KiB, as the driver allows.
    pub opted_in: bool,
}

impl LaunchOptions {
    /// What a kernel may use without `cuFuncSetAttribute` on every architecture.
    pub const DEFAULT_MAX_DYNAMIC_SHARED_BYTES: usize = 48 * 1024;

    /// The default limit, the schedule from `CUDA_SIM_SCHEDULE` (see [`Schedule::from_env`]).
    pub fn from_env() -> Result<LaunchOptions, SimError> {
        Ok(LaunchOptions { schedule: Schedule::from_env()?, ..LaunchOptions::default() })
    }
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions { schedule: Schedule::Forward, max_dynamic_shared_bytes: Self::DEFAULT_MAX_DYNAMIC_SHARED_BYTES, opted_in: false }
    }
}

/// A schedule with the default limit (for launchers that only pick the order).
impl From<Schedule> for LaunchOptions {
    fn from(schedule: Schedule) -> Self {
        LaunchOptions { schedule, ..LaunchOptions::default() }
    }
}

/// Device memory for the executor, as `cudaMalloc` would give it, with the checks a GPU lacks:
///
/// - the usable bytes start 16-byte aligned (enough for every vector load; `cudaMalloc` aligns to
///   256) and end at most 15 bytes before a `PROT_NONE` guard page (another guards the start), so
///   a kernel that reads or writes past the end stops with "out-of-bounds global read of 4 bytes
///   at 0x…: 0 bytes past the end of a 256-byte cuda-sim allocation" and its thread and line
///   (accesses into the up to 15 bytes of tail padding are not caught; valgrind reports them);
/// - the contents start poisoned (every 4-byte word `0x7fc0dead`, a NaN as f32), tail padding
///   included: `cudaMalloc` memory is uninitialised, and a kernel that reads what nobody wrote
///   should see NaN, not zeros;
/// - after drop, the addresses stay unmapped for a while, so a launch that still uses them
///   reports a use after free.
///
/// `new(0)` is valid: its pointer sits directly on the guard page.
#[derive(Debug)]
pub struct SimAllocation {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: an allocation is plain memory owned by this value; the registry behind it is locked.
unsafe impl Send for SimAllocation {}
// SAFETY: &SimAllocation only hands out the address and length.
unsafe impl Sync for SimAllocation {}

impl SimAllocation {
    pub fn new(bytes: usize) -> Result<SimAllocation, SimError> {
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: `p` outlives the call; the error buffer is sized by `checked`.
        checked(|err, len| unsafe { bert_sim_alloc(bytes, &mut p, err, len) })?;
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| SimError("cuda-sim: the allocator returned null".into()))?;
        Ok(SimAllocation { ptr, len: bytes })
    }

    /// The device address (a host address here), valid for `len()` bytes.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The bytes asked for.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fills the allocation with the executor's poison (NaN words, as a fresh allocation holds),
    /// for a block the pool hands out again.
    pub fn poison(&self) {
        const POISON_WORD: u32 = 0x7fc0dead; // sim_internal.h kPoisonWord
        let bytes = POISON_WORD.to_le_bytes();
        // SAFETY: the allocation owns `len` writable bytes; nothing runs on it while the pool
        // hands it out.
        let mem = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) };
        for (i, b) in mem.iter_mut().enumerate() {
            *b = if i < self.len - self.len % 4 { bytes[i % 4] } else { 0xff };
        }
    }
}

impl Drop for SimAllocation {
    fn drop(&mut self) {
        // SAFETY: the pointer came from bert_sim_alloc and is freed once, here. It cannot fail for
        // such a pointer, and a destructor has nobody to tell.
        let _ = checked(|err, len| unsafe { bert_sim_free(self.ptr.as_ptr().cast(), err, len) });
    }
}

/// A launch the executor refused or a kernel that broke a CUDA rule, with its message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SimError(pub String);

/// Every kernel compiled into the executor (kernels/*.cu and the test-only tests/sim_kernels/).
pub fn kernel_names() -> Vec<String> {
    // SAFETY: the table is static; each name is a NUL-terminated literal.
    unsafe {
        (0..bert_sim_kernel_count())
            .map(|i| CStr::from_ptr(bert_sim_kernel_name(i)).to_string_lossy().into_owned())
            .collect()
    }
}

/// Launches a registry kernel; see [`launch_by_name`].
///
/// # Safety
/// As [`launch_by_name`].
pub unsafe fn launch(kernel: KernelName, cfg: LaunchConfig, args: &mut [*mut c_void], opts: &LaunchOptions) -> Result<(), SimError> {
    // SAFETY: forwarded to the caller.
    unsafe { launch_by_name(kernel.name, cfg, args, opts) }
}

/// Runs `name` over `cfg.grid_dim` blocks of `cfg.block_dim` threads and returns when every
/// block has finished (or the first violation). A launch asking for more dynamic shared memory
/// than `opts.max_dynamic_shared_bytes` is refused, as the driver would.
///
/// # Safety
/// `args` holds one pointer per kernel parameter, in order, each pointing at a value of that
/// parameter's exact type (a device pointer is a host pointer here, passed as a pointer to it).
/// Memory the kernel reaches through those pointers should be [`SimAllocation`]s: an access
/// outside one is caught only where it faults (guard pages, unmapped addresses); an access that
/// lands in other live host memory is undefined behaviour, as on a GPU.
pub unsafe fn launch_by_name(name: &str, cfg: LaunchConfig, args: &mut [*mut c_void], opts: &LaunchOptions) -> Result<(), SimError> {
    let cname = CString::new(name).map_err(|_| SimError(format!("kernel name `{name}` contains NUL")))?;
    let grid = [cfg.grid_dim.0, cfg.grid_dim.1, cfg.grid_dim.2];
    let block = [cfg.block_dim.0, cfg.block_dim.1, cfg.block_dim.2];
    let (sched, seed) = match opts.schedule {
        Schedule::Forward => (0, 0),
        Schedule::Reverse => (1, 0),
        Schedule::Random(s) => (2, s),
    };
    // SAFETY: the arrays live across the call; the argument contract is the caller's.
    checked(|err, len| unsafe {
        bert_sim_launch(
            cname.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            cfg.shared_mem_bytes as usize,
            opts.max_dynamic_shared_bytes,
            opts.opted_in as i32,
            args.as_mut_ptr(),
            args.len(),
            sched,
            seed,
            err,
            len,
        )
    })
}

/// Whether a fault in kernel code is reported with its source line in this process: needs
/// `llvm-addr2line` or `addr2line` on `PATH` (or `CUDA_SIM_ADDR2LINE`) and a binary that kept its
/// line information (cargo strips it from release builds unless `debug` is on). Otherwise the
/// report names the sync points around the fault.
pub fn source_lines_available() -> bool {
    // SAFETY: no arguments; the C side caches its answer.
    unsafe { bert_sim_source_lines_available() != 0 }
}

/// A pointer to `v`, as one entry of a launch's argument array.
pub fn arg<T>(v: &mut T) -> *mut c_void {
    (v as *mut T).cast()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free(p: *mut c_void) -> Result<(), SimError> {
        // SAFETY: bert_sim_free checks the pointer against its registry before touching anything.
        checked(|err, len| unsafe { bert_sim_free(p, err, len) })
    }

    #[test]
    fn bad_frees_are_errors() {
        let mut local = 0u32;
        let err = free((&mut local as *mut u32).cast()).unwrap_err().0;
        assert!(err.contains("which is not a cuda-sim allocation"), "{err}");
        let a = SimAllocation::new(64).unwrap();
        // SAFETY: inside the allocation.
        let inner = unsafe { a.as_ptr().add(8) };
        let err = free(inner.cast()).unwrap_err().0;
        assert!(err.contains("which is 8 bytes into the 64-byte allocation at"), "{err}");
        let p = a.as_ptr();
        drop(a);
        let err = free(p.cast()).unwrap_err().0;
        assert!(err.contains("double free of the 64-byte allocation at"), "{err}");
    }
}
