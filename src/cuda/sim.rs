//! `cuda-sim`: runs the kernels of `kernels/*.cu` on the CPU under strict CUDA semantics
//! (cargo feature `cuda-sim`; design in the shared docs' `KERNELS_ON_CPU.md`).
//!
//! `build.rs` compiles the C++20 runtime in `src/cuda/sim/` with the unmodified kernel text (one
//! namespace per family, `#line` markers naming the real files). Launches take the shape of
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
//!   that is checked every time a thread yields, so an overflow names the thread;
//! - launch configurations beyond the device limits (1024 threads, 48 KiB dynamic shared) are
//!   refused.
//!
//! Threads of a block run as fibers (ucontext) in a [`Schedule`] order; blocks are spread over
//! OS threads (`CUDA_SIM_THREADS`, default: all cores). Not yet supported: atomics, ballots,
//! bf16/f16, out-of-bounds global-memory checks; static `__shared__` arrays are not poisoned.

use std::ffi::{c_char, c_void, CStr, CString};

use cudarc::driver::LaunchConfig;

use super::registry::KernelName;

extern "C" {
    fn bert_sim_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        smem: usize,
        args: *mut *mut c_void,
        nargs: usize,
        schedule: i32,
        seed: u64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn bert_sim_kernel_count() -> usize;
    fn bert_sim_kernel_name(i: usize) -> *const c_char;
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

/// How a launch runs: the fiber order, and the dynamic shared memory this launch may use (the
/// runtime computes it from the target arch and any opt-in, as the driver does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchOptions {
    pub schedule: Schedule,
    pub max_dynamic_shared_bytes: usize,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions { schedule: Schedule::Forward, max_dynamic_shared_bytes: 48 * 1024 }
    }
}

/// Memory for kernels on the executor ("device" memory), 16-byte aligned, NaN-poisoned.
#[derive(Debug)]
pub struct SimAllocation {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory owned by this value; kernels and copies synchronise through launches.
unsafe impl Send for SimAllocation {}
unsafe impl Sync for SimAllocation {}

impl SimAllocation {
    pub fn new(bytes: usize) -> Result<SimAllocation, SimError> {
        let layout = std::alloc::Layout::from_size_align(bytes.max(16), 16).map_err(|e| SimError(format!("cuda-sim: cannot allocate {bytes} bytes: {e}")))?;
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            return Err(SimError(format!("cuda-sim: out of memory allocating {bytes} bytes")));
        }
        for i in 0..layout.size() / 4 {
            // SAFETY: inside the allocation, 4-byte aligned.
            unsafe { ptr.cast::<u32>().add(i).write(0x7fc0_dead) };
        }
        Ok(SimAllocation { ptr, len: bytes })
    }
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for SimAllocation {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, std::alloc::Layout::from_size_align_unchecked(self.len.max(16), 16)) };
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
/// block has finished (or the first violation).
///
/// # Safety
/// `args` holds one pointer per kernel parameter, in order, each pointing at a value of that
/// parameter's exact type (a device pointer is a host pointer here, passed as a pointer to it),
/// and every memory access the kernel makes through those pointers must be valid.
pub unsafe fn launch_by_name(name: &str, cfg: LaunchConfig, args: &mut [*mut c_void], opts: &LaunchOptions) -> Result<(), SimError> {
    if cfg.shared_mem_bytes as usize > opts.max_dynamic_shared_bytes {
        return Err(SimError(format!("cuda-sim: kernel `{name}`: {} bytes of dynamic shared memory exceed the limit of {} for this launch", cfg.shared_mem_bytes, opts.max_dynamic_shared_bytes)));
    }
    let schedule = opts.schedule;
    let cname = CString::new(name).map_err(|_| SimError(format!("kernel name `{name}` contains NUL")))?;
    let grid = [cfg.grid_dim.0, cfg.grid_dim.1, cfg.grid_dim.2];
    let block = [cfg.block_dim.0, cfg.block_dim.1, cfg.block_dim.2];
    let (sched, seed) = match schedule {
        Schedule::Forward => (0, 0),
        Schedule::Reverse => (1, 0),
        Schedule::Random(s) => (2, s),
    };
    let mut err = vec![0u8; 2048];
    // SAFETY: the arrays live across the call; the argument contract is the caller's.
    let rc = unsafe {
        bert_sim_launch(
            cname.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            cfg.shared_mem_bytes as usize,
            args.as_mut_ptr(),
            args.len(),
            sched,
            seed,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let msg = CStr::from_bytes_until_nul(&err).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Err(SimError(msg))
}

/// A pointer to `v`, as one entry of a launch's argument array.
pub fn arg<T>(v: &mut T) -> *mut c_void {
    (v as *mut T).cast()
}
