//! The `cuda-sim` executor's checks, proven on deliberately broken kernels
//! (tests/sim_kernels/planted_bugs.cu), and its warp-shuffle semantics. The kernels of
//! kernels/*.cu run through their launchers in their own test files (tests/layernorm.rs, ...), on
//! the executor and on a GPU from one test body.
#![cfg(feature = "cuda-sim")]

use bert_adapters::cuda::sim::{self, arg, LaunchOptions, Schedule, SimError};
use cudarc::driver::LaunchConfig;

const SCHEDULES: [Schedule; 3] = [Schedule::Forward, Schedule::Reverse, Schedule::Random(0x51b)];

/// Launches a one-argument test kernel over `out`.
fn launch_planted(name: &str, block: u32, smem: u32, out: &mut [f32], schedule: Schedule) -> Result<(), SimError> {
    let mut p = out.as_mut_ptr();
    let cfg = LaunchConfig { grid_dim: (2, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: smem };
    // SAFETY: each planted kernel takes one float* and touches out[0..blockDim.x].
    unsafe { sim::launch_by_name(name, cfg, &mut [arg(&mut p)], &LaunchOptions { schedule, ..LaunchOptions::default() }) }
}

fn expect_error(name: &str, block: u32, smem: u32, needles: &[&str]) {
    for schedule in SCHEDULES {
        let mut out = vec![0f32; block as usize];
        let err = launch_planted(name, block, smem, &mut out, schedule).expect_err(name).0;
        for n in needles {
            assert!(err.contains(n), "{name} {schedule:?}: `{err}` does not mention `{n}`");
        }
    }
}

#[test]
fn early_return_before_a_barrier_is_reported() {
    expect_error(
        "planted_early_return",
        64,
        0,
        &["kernel `planted_early_return`", "thread (0,0,0)", "exited while 63 other threads wait at __syncthreads (tests/sim_kernels/planted_bugs.cu:11)"],
    );
}

#[test]
fn write_past_dynamic_shared_memory_is_reported() {
    expect_error(
        "planted_shared_overflow",
        32,
        32 * 4,
        &["kernel `planted_shared_overflow`", "thread (31,0,0)", "wrote past the end of dynamic shared memory (128 bytes; its canary changed) between the kernel's start and __syncthreads at tests/sim_kernels/planted_bugs.cu:20"],
    );
}

#[test]
fn shuffle_in_a_divergent_branch_is_reported() {
    expect_error("planted_divergent_shuffle", 32, 0, &["__shfl_xor_sync (tests/sim_kernels/planted_bugs.cu:29) with mask 0xffffffff waits for lane 16 (thread (16,0,0))", "which has exited"]);
}

#[test]
fn different_barriers_are_reported() {
    expect_error("planted_split_barrier", 64, 0, &["reached __syncthreads at tests/sim_kernels/planted_bugs.cu:", "kernel `planted_split_barrier`"]);
}

#[test]
fn launch_errors_are_messages() {
    let mut out = vec![0f32; 64];
    let err = launch_planted("no_such_kernel", 32, 0, &mut out, Schedule::Forward).unwrap_err().0;
    assert!(err.contains("no kernel named `no_such_kernel`"), "{err}");
    let err = launch_planted("planted_early_return", 2048, 0, &mut out, Schedule::Forward).unwrap_err().0;
    assert!(err.contains("exceeds the device limits"), "{err}");
    let err = launch_planted("planted_early_return", 32, 64 * 1024, &mut out, Schedule::Forward).unwrap_err().0;
    assert!(err.contains("65536 bytes of dynamic shared memory exceed this launch's limit of 49152 bytes"), "{err}");
    let mut p = out.as_mut_ptr();
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: refused before running: the argument count is wrong.
    let err = unsafe { sim::launch_by_name("planted_early_return", cfg, &mut [arg(&mut p), arg(&mut p)], &LaunchOptions::default()) }.unwrap_err().0;
    assert!(err.contains("takes 1 parameters, 2 given"), "{err}");
    assert!(sim::kernel_names().iter().any(|k| k == "residual_layernorm_forward_f32"));
}

/// The PTX shfl.sync rules, computed independently: with `width` < 32 each segment of `width`
/// lanes may read earlier segments but not later ones (own value instead; CUDA's documented
/// `__shfl_xor_sync` behaviour); down clamps at the segment's end, up at its start, idx wraps.
#[test]
fn shuffles_follow_ptx_rules() {
    for width in [32i32, 16, 8, 1] {
        for schedule in SCHEDULES {
            let n = 64usize;
            let mut out = vec![-1i32; 4 * n];
            let mut p = out.as_mut_ptr();
            let mut w = width;
            let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (n as u32, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: sim_shuffle_modes(int* out, int width) writes out[0..4 * blockDim.x].
            unsafe { sim::launch_by_name("sim_shuffle_modes", cfg, &mut [arg(&mut p), arg(&mut w)], &LaunchOptions { schedule, ..LaunchOptions::default() }) }.unwrap();
            let w = width as usize;
            for t in 0..n {
                let (lane, base) = (t % 32, t - t % 32);
                let seg = lane / w * w;
                let xor = if lane ^ 5 < seg + w { lane ^ 5 } else { lane };
                let down = if lane + 3 < seg + w { lane + 3 } else { lane };
                let up = if lane >= seg + 3 { lane - 3 } else { lane };
                let idx = seg + (7 + t) % w;
                let want = [xor, down, up, idx].map(|j| (base + j) as i32);
                let got = [out[t], out[n + t], out[2 * n + t], out[3 * n + t]];
                assert_eq!(got, want, "width {width} thread {t} {schedule:?}");
            }
        }
    }
}

#[test]
fn schedule_parses_from_text() {
    assert_eq!(Schedule::parse("reverse").unwrap(), Schedule::Reverse);
    assert_eq!(Schedule::parse("random:9").unwrap(), Schedule::Random(9));
    assert_eq!(Schedule::parse("").unwrap(), Schedule::Forward);
    assert!(Schedule::parse("backwards").is_err());
}

/// A missing barrier is not a reported error (there is no race detector yet), but the poisoned
/// shared memory makes the result wrong in some schedule instead of silently right.
#[test]
fn missing_barrier_gives_poison_in_some_schedule() {
    let block = 32u32;
    let mut poisoned = Vec::new();
    for schedule in SCHEDULES {
        let mut out = vec![0f32; block as usize];
        launch_planted("planted_missing_barrier", block, block * 4, &mut out, schedule).unwrap();
        if out.iter().any(|v| v.is_nan()) {
            poisoned.push(schedule);
        }
    }
    assert!(poisoned.contains(&Schedule::Forward), "poison seen only in {poisoned:?}");
}
