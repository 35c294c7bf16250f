//! cuda-sim's memory side (feature `cuda-sim`): device allocations with guard pages, out-of-bounds
//! global accesses reported with kernel, block, thread, bytes and source line, static `__shared__`
//! arrays poisoned per block, the per-launch dynamic shared memory limit; and the process going on
//! after every planted fault. Kernels: tests/sim_kernels/memory.cu (the line numbers below are
//! the planted lines there).
//!
//! The tests named `*_fault_*` deliberately fault into guard pages; scripts/valgrind-kernels.sh
//! skips them (and the two that read tail padding or poison on purpose).
#![cfg(feature = "cuda-sim")]

use std::ffi::c_void;

use bert_adapters::cuda::sim::{self, arg, LaunchOptions, Schedule, SimAllocation};
use cudarc::driver::LaunchConfig;

const SCHEDULES: [Schedule; 3] = [Schedule::Forward, Schedule::Reverse, Schedule::Random(0x3e3)];
const POISON: u32 = 0x7fc0dead;
const FILE: &str = "tests/sim_kernels/memory.cu";

fn cfg(blocks: u32, threads: u32, smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem }
}

fn opts(schedule: Schedule) -> LaunchOptions {
    LaunchOptions { schedule, ..LaunchOptions::default() }
}

/// An allocation of `n` f32 holding `f(i)`.
fn floats(n: usize, f: impl Fn(usize) -> f32) -> SimAllocation {
    let a = SimAllocation::new(n * 4).unwrap();
    // SAFETY: the allocation holds n f32, 16-byte aligned, and nothing else uses it.
    let s = unsafe { std::slice::from_raw_parts_mut(a.as_ptr().cast::<f32>(), n) };
    for (i, v) in s.iter_mut().enumerate() {
        *v = f(i);
    }
    a
}

fn read_f32(a: &SimAllocation) -> Vec<f32> {
    // SAFETY: `a` holds len() bytes; f32 has no invalid bit patterns.
    unsafe { std::slice::from_raw_parts(a.as_ptr().cast::<f32>(), a.len() / 4) }.to_vec()
}

fn ptr(a: &SimAllocation) -> *mut f32 {
    a.as_ptr().cast()
}

/// `mem_shifted_copy(out, in, shift)` over `blocks` x 32 threads.
fn shifted_copy(out: &SimAllocation, input: *const f32, shift: i32, blocks: u32, o: &LaunchOptions) -> Result<(), sim::SimError> {
    let (mut po, mut pi, mut s) = (ptr(out), input, shift);
    // SAFETY: mem_shifted_copy(float*, const float*, int); out holds blocks * 32 floats.
    unsafe { sim::launch_by_name("mem_shifted_copy", cfg(blocks, 32, 0), &mut [arg(&mut po), arg(&mut pi), arg(&mut s)], o) }
}

/// `mem_read_one(out, in, who, index)` over one block of 32 threads: thread `who` reads in[index].
fn read_one(out: &SimAllocation, input: *const f32, who: i32, index: i32) -> Result<(), sim::SimError> {
    let (mut po, mut pi, mut w, mut i) = (ptr(out), input, who, index);
    // SAFETY: mem_read_one(float*, const float*, int, int) writes out[0] only.
    unsafe { sim::launch_by_name("mem_read_one", cfg(1, 32, 0), &mut [arg(&mut po), arg(&mut pi), arg(&mut w), arg(&mut i)], &LaunchOptions::default()) }
}

fn assert_mentions(err: &str, needles: &[&str]) {
    for n in needles {
        assert!(err.contains(n), "`{err}` does not mention `{n}`");
    }
}

/// The source line when this process can name it (asserted below to be so in the usual test
/// build), else the sync-point description, which every report carries.
fn line(n: u32) -> String {
    if sim::source_lines_available() {
        format!(" at {FILE}:{n} (")
    } else {
        " (".to_string()
    }
}

#[test]
fn allocation_is_send_sync_and_source_lines_resolve() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<SimAllocation>();
    // The test profile keeps line information; a symbolizer is on PATH wherever binutils is
    // (CUDA_SIM_ADDR2LINE= turns lines off: the other tests then check the fallback wording).
    let has_tool = ["llvm-addr2line", "addr2line"].iter().any(|t| std::process::Command::new(t).arg("--version").output().is_ok_and(|o| o.status.success()));
    let turned_off = std::env::var_os("CUDA_SIM_ADDR2LINE").is_some_and(|v| v.is_empty());
    if cfg!(debug_assertions) && has_tool && !turned_off {
        assert!(sim::source_lines_available(), "addr2line is installed but cuda-sim cannot resolve a source line");
    }
}

#[test]
fn read_fault_one_past_the_end_names_thread_bytes_and_line() {
    let input = floats(64, |i| i as f32 * 0.5);
    let out = floats(64, |_| -1.0);
    for schedule in SCHEDULES {
        shifted_copy(&out, ptr(&input), 0, 2, &opts(schedule)).unwrap();
        assert_eq!(read_f32(&out), read_f32(&input), "{schedule:?}: the copy without the shift");
        let end = input.as_ptr() as usize + 256;
        let err = shifted_copy(&out, ptr(&input), 1, 2, &opts(schedule)).unwrap_err().0;
        assert_mentions(
            &err,
            &[
                "kernel `mem_shifted_copy`, block (1,0,0), thread (31,0,0): ",
                &format!("out-of-bounds global read of 4 bytes at {end:#x}: 0 bytes past the end of a 256-byte cuda-sim allocation ({:#x})", input.as_ptr() as usize),
                &format!("{}before its first sync point)", line(11)),
            ],
        );
    }
}

#[test]
fn write_fault_one_past_the_end_is_a_write() {
    let out = floats(64, |_| -1.0);
    let end = out.as_ptr() as usize + 256;
    for schedule in SCHEDULES {
        // SAFETY: `out` holds 64 f32 and no launch is running.
        unsafe { std::slice::from_raw_parts_mut(ptr(&out), 64) }.fill(-1.0);
        let (mut po, mut s) = (ptr(&out), 1i32);
        // SAFETY: mem_shifted_store(float*, int); with shift 1 its last thread writes past the end,
        // which the guard page turns into an error.
        let err = unsafe { sim::launch_by_name("mem_shifted_store", cfg(2, 32, 0), &mut [arg(&mut po), arg(&mut s)], &opts(schedule)) }.unwrap_err().0;
        assert_mentions(
            &err,
            &[
                "kernel `mem_shifted_store`, block (1,0,0), thread (31,0,0): ",
                &format!("out-of-bounds global write of 4 bytes at {end:#x}: 0 bytes past the end of a 256-byte cuda-sim allocation"),
                &line(18),
            ],
        );
        // In forward order threads 0..=30 of block 1 ran before thread 31 faulted (i writes i + 1).
        if schedule == Schedule::Forward {
            assert_eq!(read_f32(&out)[33..], (32..63).map(|i| i as f32).collect::<Vec<_>>());
        }
    }
}

/// Up to 15 bytes after the end share the last 16-byte granule (poisoned, not caught); the next
/// byte is the guard page. A 40-byte allocation: index 10 and 11 read poison, index 12 faults 8
/// bytes past the end. An allocation that fills its pages has the leading guard page right before
/// it, so index -1 faults too.
#[test]
fn fault_after_tail_padding_and_before_the_start() {
    let input = floats(10, |i| i as f32);
    let out = floats(1, |_| 0.0);
    for index in [10, 11] {
        read_one(&out, ptr(&input), 5, index).unwrap();
        assert_eq!(read_f32(&out)[0].to_bits(), POISON, "index {index} reads the tail padding's poison");
    }
    let err = read_one(&out, ptr(&input), 5, 12).unwrap_err().0;
    assert_mentions(
        &err,
        &[
            "kernel `mem_read_one`, block (0,0,0), thread (5,0,0): ",
            &format!("out-of-bounds global read of 4 bytes at {:#x}: 8 bytes past the end of a 40-byte cuda-sim allocation", input.as_ptr() as usize + 48),
            &format!("{}after __syncthreads at {FILE}:24)", line(26)),
        ],
    );
    let page = floats(1024, |_| 1.0);
    let err = read_one(&out, ptr(&page), 9, -1).unwrap_err().0;
    assert_mentions(&err, &["thread (9,0,0)", "out-of-bounds global read of 4 bytes", "4 bytes before the start of a 4096-byte cuda-sim allocation"]);
}

#[test]
fn null_pointer_fault_is_an_invalid_read() {
    let out = floats(1, |_| 0.0);
    let err = read_one(&out, std::ptr::null(), 7, 0).unwrap_err().0;
    assert_mentions(&err, &["kernel `mem_read_one`, block (0,0,0), thread (7,0,0): invalid global read at address 0x0 (a 4-byte access", &line(26)]);
    let err = read_one(&out, std::ptr::null(), 0, 3).unwrap_err().0;
    assert_mentions(&err, &["thread (0,0,0): invalid global read at address 0xc "]);
}

#[test]
fn empty_allocation_fault_on_any_read() {
    let empty = SimAllocation::new(0).unwrap();
    assert!(empty.is_empty());
    assert_eq!(empty.len(), 0);
    assert_eq!(empty.as_ptr() as usize % 16, 0);
    let out = floats(1, |_| 0.0);
    let err = read_one(&out, ptr(&empty), 2, 0).unwrap_err().0;
    assert_mentions(&err, &["thread (2,0,0)", &format!("out-of-bounds global read of 4 bytes at {:#x}: 0 bytes past the end of a 0-byte cuda-sim allocation", empty.as_ptr() as usize)]);
}

#[test]
fn use_after_free_fault_is_named() {
    let out = floats(1, |_| 0.0);
    let freed = floats(16, |i| i as f32);
    let p = ptr(&freed);
    drop(freed);
    let err = read_one(&out, p, 4, 3).unwrap_err().0;
    assert_mentions(
        &err,
        &["thread (4,0,0)", &format!("use after free: global read of 4 bytes at {:#x}, 12 bytes from the start of a 64-byte cuda-sim allocation ({:#x}) that was freed", p as usize + 12, p as usize)],
    );
}

#[test]
fn stack_overflow_fault_is_named() {
    let out = floats(1, |_| 0.0);
    let run = |levels: i32| {
        let (mut po, mut l) = (ptr(&out), levels);
        // SAFETY: mem_stack_overflow(float*, int) writes out[0] from thread 3.
        unsafe { sim::launch_by_name("mem_stack_overflow", cfg(1, 8, 0), &mut [arg(&mut po), arg(&mut l)], &LaunchOptions::default()) }
    };
    run(50).unwrap();
    assert_eq!(read_f32(&out)[0], 2500.0, "sum over d = 0..=50 of d + max(d - 1, 0)");
    let err = run(1 << 20).unwrap_err().0;
    assert_mentions(&err, &["kernel `mem_stack_overflow`, block (0,0,0), thread (3,0,0): stack overflow: the thread used up its 256 KiB cuda-sim stack"]);
    run(50).unwrap();
}

/// Every block reads its static `__shared__` arrays (1-D, scalar, 2-D, file scope) before writing them and
/// must see poison, never an earlier block's values. 1024 blocks on at most as many workers as
/// cores: workers run several blocks each, whatever CUDA_SIM_THREADS says.
#[test]
fn static_shared_is_poisoned_for_every_block() {
    let blocks = 1024usize;
    let out = floats(blocks * 64, |_| 0.0);
    let scalars = floats(blocks * 3, |_| 0.0);
    for schedule in SCHEDULES {
        let (mut po, mut ps) = (ptr(&out), scalars.as_ptr().cast::<u32>());
        // SAFETY: mem_static_shared(float* out, unsigned* scalars): out[b * 64 + t], scalars[3b..3b+3].
        unsafe { sim::launch_by_name("mem_static_shared", cfg(blocks as u32, 64, 0), &mut [arg(&mut po), arg(&mut ps)], &opts(schedule)) }.unwrap();
        let seen = read_f32(&out);
        assert!(seen[0].is_nan(), "{schedule:?}: an unwritten static shared float reads as NaN");
        for (i, v) in seen.iter().enumerate() {
            assert_eq!(v.to_bits(), POISON, "{schedule:?}: block {} thread {} read {v} before writing", i / 64, i % 64);
        }
        for (i, v) in read_f32(&scalars).iter().enumerate() {
            assert_eq!(v.to_bits(), POISON, "{schedule:?}: block {} {} read {:#x}", i / 3, ["counter", "grid2[3][32]", "file_scope_tile[7]"][i % 3], v.to_bits());
        }
    }
}

/// `kernel(out, n)` (`mem_dynamic_shared` or `mem_dynamic_and_static_shared`) over 64 threads
/// with exactly n floats of dynamic shared memory, under `opts`.
fn dynamic_shared_in(kernel: &str, n: usize, opts: LaunchOptions) -> Result<Vec<f32>, sim::SimError> {
    let out = floats(64, |_| 0.0);
    let (mut po, mut pn) = (ptr(&out), n as i32);
    // SAFETY: both kernels take (float*, int), use n floats of dynamic shared memory and write
    // out[0..64].
    unsafe { sim::launch_by_name(kernel, cfg(2, 64, (n * 4) as u32), &mut [arg(&mut po), arg(&mut pn)], &opts) }?;
    Ok(read_f32(&out))
}

/// `mem_dynamic_shared(out, n)` with a limit of `max` bytes.
fn dynamic_shared(n: usize, max: usize) -> Result<Vec<f32>, sim::SimError> {
    dynamic_shared_in("mem_dynamic_shared", n, LaunchOptions { max_dynamic_shared_bytes: max, ..LaunchOptions::default() })
}

#[test]
fn dynamic_shared_limit_is_the_launch_options() {
    let default = LaunchOptions::default().max_dynamic_shared_bytes;
    assert_eq!(default, 48 * 1024);
    let want = |n: usize| (0..64).map(|t| (n - 1 - t) as f32).collect::<Vec<f32>>();
    assert_eq!(dynamic_shared(default / 4, default).unwrap(), want(default / 4), "48 KiB is allowed without an opt-in");
    let err = dynamic_shared(default / 4 + 1, default).unwrap_err().0;
    assert_mentions(&err, &["kernel `mem_dynamic_shared`: 49156 bytes of dynamic shared memory exceed this launch's limit of 49152 bytes (what a kernel gets without a cuFuncSetAttribute opt-in)"]);
    let opted_in = 100 * 1024;
    assert_eq!(dynamic_shared(opted_in / 4, opted_in).unwrap(), want(opted_in / 4), "an opt-in limit is usable to its last byte");
    let err = dynamic_shared(opted_in / 4 + 1, opted_in).unwrap_err().0;
    assert_mentions(&err, &["102404 bytes of dynamic shared memory exceed this launch's limit of 102400 bytes"]);
    assert!(!err.contains("cuFuncSetAttribute"), "{err}");
}

#[test]
fn static_shared_counts_against_the_limit_without_an_opt_in() {
    // The driver refuses 48 KB of dynamic shared memory beside a kernel's static arrays
    // (CUDA_ERROR_INVALID_VALUE, seen on an H100); the simulator refuses it too.
    let run = |n: usize, max: usize, opted_in: bool| {
        dynamic_shared_in("mem_dynamic_and_static_shared", n, LaunchOptions { max_dynamic_shared_bytes: max, opted_in, ..LaunchOptions::default() })
    };
    let default = LaunchOptions::default().max_dynamic_shared_bytes;
    let fits = (default - 128) / 4;
    let want = |n: usize| (0..64).map(|t| (n - 1 - t) as f32 + 1.0).collect::<Vec<f32>>();
    assert_eq!(run(fits, default, false).unwrap(), want(fits), "48 KB less the 128 static bytes fits");
    let err = run(fits + 1, default, false).unwrap_err().0;
    assert_mentions(&err, &["kernel `mem_dynamic_and_static_shared`", "128 bytes of static __shared__ memory plus 49028 dynamic exceed the 49152"]);
    // With an opt-in, the dynamic bytes are checked against the opted-in limit alone, even one of
    // exactly 48 KB (which the launchers ask for when the static arrays leave less).
    assert_eq!(run(default / 4, default, true).unwrap(), want(default / 4));
    assert_eq!(run(default / 4, default + 1024, true).unwrap(), want(default / 4));
}

#[test]
fn fresh_allocations_are_poisoned_and_aligned() {
    for n in [1usize, 3, 4, 15, 16, 40, 4095, 4096, 4097, 100_000] {
        let a = SimAllocation::new(n).unwrap();
        assert_eq!(a.len(), n);
        assert!(!a.is_empty());
        assert_eq!(a.as_ptr() as usize % 16, 0, "{n} bytes: 16-byte aligned");
        // The tail padding up to the next 16 bytes is mapped and poisoned too.
        let padded = n.div_ceil(16) * 16;
        // SAFETY: the allocation's pages hold `padded` bytes from its start.
        let words = unsafe { std::slice::from_raw_parts(a.as_ptr().cast::<u32>(), padded / 4) };
        assert!(words.iter().all(|&w| w == POISON), "{n} bytes: {:#x?}", &words[..words.len().min(8)]);
    }
    let err = SimAllocation::new(usize::MAX).unwrap_err().0;
    assert!(err.contains(&format!("cannot allocate {} bytes of device memory", usize::MAX)), "{err}");
    // Poisoning would commit it all: more than the machine's memory is refused, not OOM-killed.
    let err = SimAllocation::new(1 << 50).unwrap_err().0;
    assert!(err.contains(&format!("cannot allocate {} bytes of device memory (the machine has", 1u64 << 50)), "{err}");
}

/// After every kind of fault the next launches run normally, on fresh workers and on the same
/// process-wide signal handler.
#[test]
fn process_survives_repeated_faults() {
    let input = floats(64, |i| i as f32);
    let out = floats(64, |_| 0.0);
    let o = LaunchOptions::default();
    for round in 0..20 {
        let shift = 1 + round % 3;
        let err = shifted_copy(&out, ptr(&input), shift, 2, &o).unwrap_err().0;
        assert!(err.contains("out-of-bounds global read of 4 bytes"), "round {round}: {err}");
        let err = shifted_copy(&out, std::ptr::null(), 0, 2, &o).unwrap_err().0;
        // Both blocks fault; whichever reports first read element 0 of its block: 0x0 or 0x80.
        assert!(err.contains("invalid global read at address 0x0 ") || err.contains("invalid global read at address 0x80 "), "round {round}: {err}");
        shifted_copy(&out, ptr(&input), 0, 2, &o).unwrap();
        assert_eq!(read_f32(&out), read_f32(&input), "round {round}");
    }
}

/// Not a benchmark (nothing is asserted about time): prints the cost of a context switch, and
/// checks every thread passed every barrier. `CUDA_SIM_SWITCH=ucontext` compares the fallback.
#[test]
fn barrier_rounds_complete_and_print_switch_cost() {
    let (blocks, threads, rounds) = (4u32, 256u32, 200i32);
    let a = SimAllocation::new((blocks * threads) as usize * 4).unwrap();
    let (mut p, mut r) = (a.as_ptr().cast::<i32>(), rounds);
    let args: &mut [*mut c_void] = &mut [arg(&mut p), arg(&mut r)];
    let t = std::time::Instant::now();
    // SAFETY: mem_barrier_rounds(int*, int) writes out[0..blocks * threads].
    unsafe { sim::launch_by_name("mem_barrier_rounds", cfg(blocks, threads, 0), args, &LaunchOptions::default()) }.unwrap();
    let dt = t.elapsed();
    // SAFETY: the allocation holds blocks * threads i32, written by the kernel.
    let got = unsafe { std::slice::from_raw_parts(a.as_ptr().cast::<i32>(), (blocks * threads) as usize) };
    assert!(got.iter().all(|&v| v == rounds), "every thread counts {rounds} barriers");
    let switches = 2.0 * f64::from(blocks * threads) * f64::from(rounds + 1);
    println!("cuda-sim: {switches} context switches in {dt:?}: {:.0} ns each (all workers)", dt.as_nanos() as f64 / switches);
}
