//! cuda-sim intrinsics (feature `cuda-sim`): atomics, warp vote / reduce / match, bit intrinsics
//! and the bf16/f16 conversions of the stub <cuda_bf16.h> / <cuda_fp16.h>, run on the CPU executor
//! from tests/sim_kernels/intrinsics.cu. Every expectation is computed here from CUDA's documented
//! rules (or by the `half` crate for the 16-bit conversions), never taken from the executor; misuse
//! must come back as a message naming kernel, block, thread and line.
//!
//! NaN in the 16-bit conversions, where CUDA and `half` differ (NVIDIA's cuda_bf16.hpp /
//! cuda_fp16.hpp software paths `__internal_float2bfloat16`, `__internal_float2half`,
//! `__internal_half2float`; CUDART_NAN_BF16 / CUDART_NAN_FP16 = 0x7fff, "canonical NaN"; the CUDA
//! Programming Guide's "Floating-Point Standard": an f32 operation with a NaN input gives
//! 0x7fffffff): f32 -> bf16 and f32 -> f16 give 0x7fff for every NaN (`half` keeps the sign and the
//! top payload bits and sets the quiet bit); f16 -> f32 gives 0x7fffffff (`half` keeps sign and
//! payload); bf16 -> f32 moves the bits (`mov.b32 {0,h}` below sm_90 and on the host), while `half`
//! also sets the quiet bit, so the two differ on the 126 signaling bf16 NaNs only.
#![cfg(feature = "cuda-sim")]

use std::collections::HashMap;
use std::ffi::c_void;
use std::io::Write as _;
use std::process::{Command, Stdio};

use bert_adapters::cuda::sim::{self, arg, Schedule, SimError};
use cudarc::driver::LaunchConfig;
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SCHEDULES: [Schedule; 3] = [Schedule::Forward, Schedule::Reverse, Schedule::Random(0x1a7)];
const FILE: &str = "tests/sim_kernels/intrinsics.cu";
const SRC: &str = include_str!("sim_kernels/intrinsics.cu");

/// The one call into the executor: a 1-D launch of `grid` blocks of `block` threads.
///
/// # Safety
/// As `sim::launch_by_name`: `args` point at values of the kernel's parameter types, in order,
/// and every access the kernel makes through them is valid.
unsafe fn launch(name: &str, grid: u32, block: u32, smem: u32, args: &mut [*mut c_void], schedule: Schedule) -> Result<(), SimError> {
    let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: smem };
    // SAFETY: forwarded to the caller.
    unsafe { sim::launch_by_name(name, cfg, args, &sim::LaunchOptions { schedule, ..sim::LaunchOptions::default() }) }
}

/// The line of intrinsics.cu carrying `// @mark:NAME`.
fn line_of(mark: &str) -> usize {
    let tag = format!("@mark:{mark}");
    1 + SRC.lines().position(|l| l.contains(&tag)).unwrap_or_else(|| panic!("no `{tag}` in {FILE}"))
}

fn sorted<T: Ord + Copy>(v: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut v: Vec<T> = v.into_iter().collect();
    v.sort_unstable();
    v
}

// ---------------------------------------------------------------------------------------------
// Atomics
// ---------------------------------------------------------------------------------------------

/// 24 blocks add 512 rows into 48 column sums, racing on two OS threads. Tolerance: the worst-case
/// error of n - 1 f32 additions in any order, γ(n)·Σ|x| with γ(n) = n·u/(1 - n·u), u = 2^-24
/// (Higham); a lost update would be off by a whole element, far more.
#[test]
fn float_atomic_add_column_sums_match_f64() {
    let (rows, cols) = (512usize, 48usize);
    let mut rng = StdRng::seed_from_u64(0xc0_1005);
    let x: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let u = f64::from(f32::EPSILON) / 2.0;
    let gamma = rows as f64 * u / (1.0 - rows as f64 * u);
    for schedule in SCHEDULES {
        let mut sums = vec![0f32; cols];
        let (mut px, mut r, mut c, mut ps) = (x.as_ptr(), rows as i32, cols as i32, sums.as_mut_ptr());
        // SAFETY: intr_column_sums(const float* x, int rows, int cols, float* sums) reads x[..rows*cols] and adds into sums[..cols].
        unsafe { launch("intr_column_sums", 24, 128, 0, &mut [arg(&mut px), arg(&mut r), arg(&mut c), arg(&mut ps)], schedule) }.unwrap();
        for (j, &got) in sums.iter().enumerate() {
            let exact: f64 = (0..rows).map(|i| f64::from(x[i * cols + j])).sum();
            let tol = gamma * (0..rows).map(|i| f64::from(x[i * cols + j]).abs()).sum::<f64>();
            let err = (f64::from(got) - exact).abs();
            assert!(err <= tol, "{schedule:?}: column {j} = {got}, f64 sum {exact}, |err| {err:e} > {tol:e}");
        }
    }
}

/// Shared-memory (dynamic and static) and global integer atomics: exact counts.
#[test]
fn integer_histogram_is_exact() {
    let (n, nbins) = (20_000usize, 37usize);
    let mut rng = StdRng::seed_from_u64(0x4157);
    let v: Vec<u32> = (0..n).map(|_| rng.random::<u32>() >> rng.random_range(0..32)).collect();
    let mut want = vec![0u32; nbins];
    for &x in &v {
        want[(x % nbins as u32) as usize] += 1;
    }
    for schedule in SCHEDULES {
        let mut bins = vec![0u32; nbins];
        let mut total = 0u32;
        let (mut pv, mut pn, mut pb, mut pnb, mut pt) = (v.as_ptr(), n as i32, bins.as_mut_ptr(), nbins as i32, &mut total as *mut u32);
        // SAFETY: intr_histogram(const unsigned* v, int n, unsigned* bins, int nbins, unsigned* total): v[..n], bins[..nbins], *total; nbins words of dynamic shared memory.
        unsafe {
            launch("intr_histogram", 8, 128, (nbins * 4) as u32, &mut [arg(&mut pv), arg(&mut pn), arg(&mut pb), arg(&mut pnb), arg(&mut pt)], schedule)
        }
        .unwrap();
        assert_eq!(bins, want, "{schedule:?}");
        assert_eq!(total, n as u32, "{schedule:?}");
    }
}

/// The atomicCAS loop that keeps a float maximum, from a -inf start.
#[test]
fn cas_loop_float_max_is_exact() {
    let mut rng = StdRng::seed_from_u64(0xca5);
    for (lo, hi) in [(-1e6f32, 1e6f32), (-5.0, -1.0)] {
        let x: Vec<f32> = (0..5000).map(|_| rng.random_range(lo..hi)).collect();
        let want = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for schedule in SCHEDULES {
            let mut out = f32::NEG_INFINITY;
            let (mut px, mut pn, mut po) = (x.as_ptr(), x.len() as i32, &mut out as *mut f32);
            // SAFETY: intr_cas_max(const float* x, int n, float* out): x[..n] and *out.
            unsafe { launch("intr_cas_max", 6, 96, 0, &mut [arg(&mut px), arg(&mut pn), arg(&mut po)], schedule) }.unwrap();
            assert_eq!(out.to_bits(), want.to_bits(), "{schedule:?}: max {out}, want {want}");
        }
    }
}

/// atomicInc/atomicDec follow CUDA's wrap rules; in any order the old values are the first n
/// terms of old -> f(old) from the start value, and the counter ends at the n-th.
#[test]
fn atomic_inc_dec_wrap_around() {
    let (n, limit) = (1000usize, 6u32);
    let inc = |old: u32| if old >= limit { 0 } else { old + 1 };
    let dec = |old: u32| if old == 0 || old > limit { limit } else { old - 1 };
    let starts = [0u32, 1000, limit, 1000, 0];
    let steps: [&dyn Fn(u32) -> u32; 5] = [&inc, &inc, &dec, &dec, &dec];
    for schedule in SCHEDULES {
        let mut counters = starts;
        let mut olds = vec![u32::MAX; 5 * n];
        let (mut pc, mut pl, mut po, mut pn) = (counters.as_mut_ptr(), limit, olds.as_mut_ptr(), n as i32);
        // SAFETY: intr_inc_dec(unsigned* counters, unsigned limit, unsigned* olds, int n): counters[..5], olds[..5n].
        unsafe { launch("intr_inc_dec", 8, 128, 0, &mut [arg(&mut pc), arg(&mut pl), arg(&mut po), arg(&mut pn)], schedule) }.unwrap();
        for c in 0..5 {
            let mut seq = vec![starts[c]];
            for _ in 0..n {
                let next = steps[c](*seq.last().unwrap());
                seq.push(next);
            }
            assert_eq!(counters[c], seq[n], "{schedule:?}: counter {c} (start {})", starts[c]);
            assert_eq!(sorted(olds[c * n..(c + 1) * n].iter().copied()), sorted(seq[..n].iter().copied()), "{schedule:?}: counter {c} old values");
        }
    }
    // The rules themselves, spelled out: inc wraps after `limit`, dec wraps at 0 and from above.
    assert_eq!((inc(5), inc(6), inc(1000)), (6, 0, 0));
    assert_eq!((dec(1), dec(0), dec(1000)), (0, 6, 6));
}

/// The threadfence-reduction pattern: the block that takes the last atomicInc ticket sums the
/// partials, and the counter wraps back to 0, ready for the next launch.
#[test]
fn last_block_sum_with_threadfence_and_ticket() {
    let n = 10_000usize;
    let grid = 12u32;
    let mut rng = StdRng::seed_from_u64(0x7ee);
    let x: Vec<f32> = (0..n).map(|_| rng.random_range(0.0f32..1.0)).collect();
    let exact: f64 = x.iter().map(|&v| f64::from(v)).sum();
    let u = f64::from(f32::EPSILON) / 2.0;
    let tol = n as f64 * u / (1.0 - n as f64 * u) * exact; // γ(n)·Σ|x|, any order
    let mut ticket = 0u32;
    for schedule in SCHEDULES {
        for _ in 0..2 {
            let mut partial = vec![f32::NAN; grid as usize];
            let mut result = f32::NAN;
            let (mut px, mut pn, mut pp, mut pt, mut pr) = (x.as_ptr(), n as i32, partial.as_mut_ptr(), &mut ticket as *mut u32, &mut result as *mut f32);
            // SAFETY: intr_last_block_sum(const float* x, int n, float* partial, unsigned* ticket, float* result): x[..n], partial[..grid], *ticket, *result; 128 threads fit its acc[256].
            unsafe { launch("intr_last_block_sum", grid, 128, 0, &mut [arg(&mut px), arg(&mut pn), arg(&mut pp), arg(&mut pt), arg(&mut pr)], schedule) }.unwrap();
            assert_eq!(ticket, 0, "{schedule:?}: the ticket counter did not wrap");
            assert!((f64::from(result) - exact).abs() <= tol, "{schedule:?}: sum {result}, f64 {exact}, tol {tol:e}");
        }
    }
}

/// Mirrors `AtomicSlots` in intrinsics.cu (which asserts the same 176 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
struct AtomicSlots {
    llmin: i64,
    llmax: i64,
    ullmin: u64,
    ullmax: u64,
    ulland: u64,
    ullor: u64,
    ullxor: u64,
    ulladd: u64,
    ullexch: u64,
    ullcas: u64,
    dadd: f64,
    imin: i32,
    imax: i32,
    iand: i32,
    ior: i32,
    ixor: i32,
    isub: i32,
    iadd: i32,
    iexch: i32,
    icas: i32,
    umin: u32,
    umax: u32,
    uand: u32,
    uor: u32,
    uxor: u32,
    usub: u32,
    uadd: u32,
    uexch: u32,
    ucas: u32,
    fexch: f32,
    uscas: [u16; 4],
}

/// The exchange checks: in any order, the old values plus the final one are the start value
/// plus every value written.
fn assert_exchanged<T: Ord + Copy + std::fmt::Debug>(what: &str, olds: &[T], last: T, start: T, written: &[T]) {
    let got = sorted(olds.iter().copied().chain([last]));
    let want = sorted(written.iter().copied().chain([start]));
    assert_eq!(got, want, "{what}");
}

/// Compare-and-swap against a sentinel: exactly one thread wins and stores its value, and every
/// other thread saw the winner's value.
fn assert_claimed<T: PartialEq + Copy + std::fmt::Debug>(what: &str, olds: &[T], last: T, sentinel: T, mine: &[T]) {
    let winners: Vec<usize> = (0..olds.len()).filter(|&i| olds[i] == sentinel).collect();
    assert_eq!(winners.len(), 1, "{what}: threads that saw the sentinel: {winners:?}");
    assert_eq!(last, mine[winners[0]], "{what}: the final value is not the winner's");
    assert!(olds.iter().enumerate().all(|(i, &o)| i == winners[0] || o == last), "{what}: a loser saw something else than the winner's value");
}

#[test]
fn integer_and_exchange_atomics_are_exact() {
    assert_eq!(std::mem::size_of::<AtomicSlots>(), 176);
    let n = 777usize;
    let mut rng = StdRng::seed_from_u64(0xa70);
    let vals: Vec<i32> = (0..n).map(|_| rng.random()).collect();
    let u: Vec<u32> = vals.iter().map(|&v| (v as u32).wrapping_mul(2_654_435_761)).collect();
    let ll: Vec<i64> = vals.iter().map(|&v| i64::from(v) * 1_000_003).collect();
    let ull: Vec<u64> = vals.iter().enumerate().map(|(i, &v)| (u64::from(v as u32) << 32) | (i as u64 * 7919)).collect();
    assert!(!u.contains(&u32::MAX) && !ull.contains(&u64::MAX), "a value equals a CAS sentinel; pick another seed");
    let start = AtomicSlots {
        llmin: i64::MAX,
        llmax: i64::MIN,
        ullmin: u64::MAX,
        ullmax: 0,
        ulland: u64::MAX,
        ullor: 0,
        ullxor: 0x0123_4567_89ab_cdef,
        ulladd: 1 << 63,
        ullexch: 0xabad_1dea,
        ullcas: u64::MAX,
        dadd: 0.5,
        imin: i32::MAX,
        imax: i32::MIN,
        iand: -1,
        ior: 0,
        ixor: 0x5a5a_5a5a,
        isub: 1000,
        iadd: -3,
        iexch: -5,
        icas: -1,
        umin: u32::MAX,
        umax: 0,
        uand: u32::MAX,
        uor: 0,
        uxor: 0xdead_beef,
        usub: 7,
        uadd: 11,
        uexch: 0xfeed,
        ucas: u32::MAX,
        fexch: 0.25,
        uscas: [0x1234, 0xffff, 0x5678, 0x9abc],
    };
    for schedule in SCHEDULES {
        let mut s = start;
        let mut olds = vec![u64::MAX; 8 * n];
        let (mut pv, mut pn, mut ps, mut po) = (vals.as_ptr(), n as i32, &mut s as *mut AtomicSlots, olds.as_mut_ptr());
        // SAFETY: intr_atomic_ops(const int* vals, int n, AtomicSlots* s, unsigned long long* olds): vals[..n], *s (same layout), olds[..8n].
        unsafe { launch("intr_atomic_ops", 7, 128, 0, &mut [arg(&mut pv), arg(&mut pn), arg(&mut ps), arg(&mut po)], schedule) }.unwrap();
        let l = format!("{schedule:?}");
        assert_eq!((s.imin, s.imax), (*vals.iter().min().unwrap(), *vals.iter().max().unwrap()), "{l}: int min/max");
        assert_eq!((s.umin, s.umax), (*u.iter().min().unwrap(), *u.iter().max().unwrap()), "{l}: unsigned min/max");
        assert_eq!((s.llmin, s.llmax), (*ll.iter().min().unwrap(), *ll.iter().max().unwrap()), "{l}: long long min/max");
        assert_eq!((s.ullmin, s.ullmax), (*ull.iter().min().unwrap(), *ull.iter().max().unwrap()), "{l}: unsigned long long min/max");
        assert_eq!(s.iand, vals.iter().fold(-1, |a, &v| a & (v | 0x10000)), "{l}: int and");
        assert_eq!(s.ior, vals.iter().fold(0, |a, &v| a | (v & 0x0f0f_0f0f)), "{l}: int or");
        assert_eq!(s.ixor, vals.iter().fold(0x5a5a_5a5a, |a, &v| a ^ v), "{l}: int xor");
        assert_eq!(s.uand, u.iter().fold(u32::MAX, |a, &v| a & (v | 0x8000_0001)), "{l}: unsigned and");
        assert_eq!(s.uor, u.iter().fold(0, |a, &v| a | (v & 0x00ff_00ff)), "{l}: unsigned or");
        assert_eq!(s.uxor, u.iter().fold(0xdead_beef, |a, &v| a ^ v), "{l}: unsigned xor");
        assert_eq!(s.ulland, ull.iter().fold(u64::MAX, |a, &v| a & (v | 0x8000_0000_0000_0001)), "{l}: ull and");
        assert_eq!(s.ullor, ull.iter().fold(0, |a, &v| a | (v & 0x00ff_00ff_00ff_00ff)), "{l}: ull or");
        assert_eq!(s.ullxor, ull.iter().fold(0x0123_4567_89ab_cdef, |a, &v| a ^ v), "{l}: ull xor");
        assert_eq!(s.isub, vals.iter().fold(1000i32, |a, &v| a.wrapping_sub(v)), "{l}: int sub");
        assert_eq!(s.usub, u.iter().fold(7u32, |a, &v| a.wrapping_sub(v)), "{l}: unsigned sub");
        assert_eq!(s.iadd, vals.iter().fold(-3i32, |a, &v| a.wrapping_add(v)), "{l}: int add");
        assert_eq!(s.uadd, u.iter().fold(11u32, |a, &v| a.wrapping_add(v)), "{l}: unsigned add");
        assert_eq!(s.ulladd, ull.iter().fold(1u64 << 63, |a, &v| a.wrapping_add(v)), "{l}: ull add");
        // Integers below 2^42 in total: the double sum is exact in any order.
        assert_eq!(s.dadd, 0.5 + vals.iter().map(|&v| f64::from(v)).sum::<f64>(), "{l}: double add");

        let row = |k: usize| &olds[k * n..(k + 1) * n];
        let ids: Vec<u32> = (0..n as u32).collect();
        let as_u32 = |k: usize| row(k).iter().map(|&o| o as u32).collect::<Vec<u32>>();
        assert_exchanged(&format!("{l}: int exch"), &as_u32(0), s.iexch as u32, start.iexch as u32, &ids);
        assert_exchanged(&format!("{l}: unsigned exch"), &as_u32(1), s.uexch, start.uexch, &u);
        assert_exchanged(&format!("{l}: ull exch"), row(2), s.ullexch, start.ullexch, &ull);
        let fbits: Vec<u32> = vals.iter().map(|&v| (v as f32).to_bits()).collect();
        assert_exchanged(&format!("{l}: float exch"), &as_u32(3), s.fexch.to_bits(), start.fexch.to_bits(), &fbits);
        assert_claimed(&format!("{l}: int CAS"), &as_u32(4), s.icas as u32, u32::MAX, &ids);
        assert_claimed(&format!("{l}: unsigned CAS"), &as_u32(5), s.ucas, u32::MAX, &u);
        assert_claimed(&format!("{l}: ull CAS"), row(6), s.ullcas, u64::MAX, &ull);
        let ushort_olds: Vec<u16> = row(7).iter().map(|&o| o as u16).collect();
        assert_claimed(&format!("{l}: unsigned short CAS"), &ushort_olds, s.uscas[1], 0xffff, &ids.iter().map(|&i| i as u16).collect::<Vec<_>>());
        assert_eq!([s.uscas[0], s.uscas[2], s.uscas[3]], [0x1234, 0x5678, 0x9abc], "{l}: a 16-bit CAS touched its neighbours");
    }
}

/// The CUDA Programming Guide ("Floating-Point Standard"): f32 atomicAdd on global memory is
/// FADD.F32.FTZ.RN (subnormal inputs and result flushed to sign-preserving zero), on shared memory
/// FADD.F32.RN; a NaN result is 0x7fffffff.
#[test]
fn float_atomic_add_flushes_subnormals_on_global_memory_only() {
    let m = f32::MIN_POSITIVE;
    let nan_payload = f32::from_bits(0xffc0_0001);
    let start = [0.0, m, 1.5 * m, -1.5 * m, f32::INFINITY, nan_payload, 1.0, 3e-39];
    let operand = [1e-40, -0.5 * m, -m, m, f32::NEG_INFINITY, 1.0, 2.0, 0.0];
    let canonical = |r: f32| if r.is_nan() { 0x7fff_ffff } else { r.to_bits() };
    let ftz = |x: f32| if x.is_subnormal() { 0.0f32.copysign(x) } else { x };
    let want_global: Vec<u32> = (0..8).map(|i| canonical(ftz(ftz(start[i]) + ftz(operand[i])))).collect();
    let want_shared: Vec<u32> = (0..8).map(|i| canonical(start[i] + operand[i])).collect();
    // The cases as numbers: global flushes 1e-40, m/2 and ±m/2 (sign kept), shared keeps them.
    assert_eq!(want_global[..4], [0, m.to_bits(), 0, 0x8000_0000]);
    assert_eq!(want_shared[..4], [1e-40f32.to_bits(), (0.5 * m).to_bits(), (0.5 * m).to_bits(), (-0.5 * m).to_bits()]);
    assert_eq!((want_global[4], want_global[5], want_global[6], want_global[7]), (0x7fff_ffff, 0x7fff_ffff, 3.0f32.to_bits(), 0));
    assert_eq!(want_shared[7], 3e-39f32.to_bits());
    for schedule in SCHEDULES {
        let mut global = start;
        let mut out = [f32::NAN; 40];
        let (mut ps, mut po, mut pg, mut pout) = (start.as_ptr(), operand.as_ptr(), global.as_mut_ptr(), out.as_mut_ptr());
        // SAFETY: intr_atomic_fadd_modes(const float* start, const float* operand, float* global, float* out): [8], [8], [8], [40]; 8 floats of dynamic shared memory.
        unsafe { launch("intr_atomic_fadd_modes", 1, 32, 32, &mut [arg(&mut ps), arg(&mut po), arg(&mut pg), arg(&mut pout)], schedule) }.unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        let start_bits = bits(&start);
        assert_eq!(bits(&out[0..8]), start_bits, "{schedule:?}: global atomicAdd old values");
        assert_eq!(bits(&global), want_global, "{schedule:?}: global results");
        assert_eq!(bits(&out[8..16]), start_bits, "{schedule:?}: static shared old values");
        assert_eq!(bits(&out[16..24]), want_shared, "{schedule:?}: static __shared__ results");
        assert_eq!(bits(&out[24..32]), start_bits, "{schedule:?}: dynamic shared old values");
        assert_eq!(bits(&out[32..40]), want_shared, "{schedule:?}: dynamic shared results");
    }
}

// ---------------------------------------------------------------------------------------------
// Warp collectives
// ---------------------------------------------------------------------------------------------

#[test]
fn ballot_and_popc_count_positive_values() {
    let n = 3001usize; // not a multiple of the block: the last trip has lanes past the end
    let mut rng = StdRng::seed_from_u64(0xba1);
    let x: Vec<i32> = (0..n).map(|_| rng.random_range(-100..100)).collect();
    let want = x.iter().filter(|&&v| v > 0).count() as u32;
    for schedule in SCHEDULES {
        let mut count = 0u32;
        let (mut px, mut pn, mut pc) = (x.as_ptr(), n as i32, &mut count as *mut u32);
        // SAFETY: intr_ballot_count(const int* x, int n, unsigned* count): x[..n] (guarded), *count.
        unsafe { launch("intr_ballot_count", 5, 64, 0, &mut [arg(&mut px), arg(&mut pn), arg(&mut pc)], schedule) }.unwrap();
        assert_eq!(count, want, "{schedule:?}");
    }
}

const WARP_OUTPUTS: usize = 20;
const UNTOUCHED: u32 = 0xdead_beef;

/// What intr_warp_ops writes for the lanes of `mask` in one warp (`x`, `key`: its 32 inputs).
fn warp_ops_reference(mask: u32, x: &[i32], key: &[i64]) -> Vec<[u32; WARP_OUTPUTS]> {
    let lanes: Vec<usize> = (0..32).filter(|&l| (mask >> l) & 1 == 1).collect();
    let fold = |init: u32, f: &dyn Fn(u32, u32) -> u32, v: &dyn Fn(usize) -> u32| lanes.iter().fold(init, |a, &l| f(a, v(l)));
    let xs = |l: usize| x[l] as u32;
    let ballot = fold(0, &|a, b| a | b, &|l| u32::from(x[l] > 0) << l);
    let any = u32::from(lanes.iter().any(|&l| x[l] % 5 == 0));
    let all = u32::from(lanes.iter().all(|&l| x[l] % 5 != 0));
    let add = fold(0, &|a, b| a.wrapping_add(b), &xs);
    let min_u = lanes.iter().map(|&l| x[l] as u32).min().unwrap();
    let min_i = lanes.iter().map(|&l| x[l]).min().unwrap() as u32;
    let max_u = lanes.iter().map(|&l| x[l] as u32).max().unwrap();
    let max_i = lanes.iter().map(|&l| x[l]).max().unwrap() as u32;
    let and = fold(u32::MAX, &|a, b| a & b, &|l| x[l] as u32 | 0x8000_0001);
    let or = fold(0, &|a, b| a | b, &|l| x[l] as u32 & 0x00ff_00ff);
    let xor = fold(0, &|a, b| a ^ b, &xs);
    let group = |l: usize, same: &dyn Fn(usize, usize) -> bool| lanes.iter().filter(|&&m| same(l, m)).fold(0u32, |a, &m| a | 1 << m);
    let all32 = lanes.iter().all(|&m| key[m] as u32 == key[lanes[0]] as u32);
    let all64 = lanes.iter().all(|&m| key[m] == key[lanes[0]]);
    let mut out = vec![[UNTOUCHED; WARP_OUTPUTS]; 32];
    for &l in &lanes {
        out[l] = [
            ballot,
            any,
            all,
            add,
            add,
            min_u,
            min_i,
            max_u,
            max_i,
            and,
            or,
            xor,
            group(l, &|a, b| key[a] as i32 == key[b] as i32),
            group(l, &|a, b| key[a] == key[b]),
            if all32 { mask } else { 0 },
            u32::from(all32),
            if all64 { mask } else { 0 },
            u32::from(all64),
            group(l, &|a, b| key[a] & 1 == key[b] & 1),
            group(l, &|a, b| key[a] >> 32 == key[b] >> 32),
        ];
    }
    out
}

/// Every vote, reduce and match under full and partial masks, against a lane-by-lane reference.
/// Warp 0 has equal keys and no multiple of 5, warp 1 keys equal in their low 32 bits only, warp
/// 2 random small keys; lanes outside the mask keep the 0xdeadbeef the output starts with.
#[test]
fn warp_vote_reduce_and_match_with_full_and_partial_masks() {
    let n = 96usize;
    let mut rng = StdRng::seed_from_u64(0x3a7c);
    let x: Vec<i32> = (0..n)
        .map(|t| {
            let v = rng.random_range(-1000..1000);
            if t < 32 && v % 5 == 0 { v + 1 } else { v }
        })
        .collect();
    let key: Vec<i64> = (0..n)
        .map(|t| match t / 32 {
            0 => (3 << 32) | 9,
            1 => ((t as i64 % 3) << 32) | 9,
            _ => (rng.random_range(0..3i64) << 32) | rng.random_range(0..4i64),
        })
        .collect();
    let mut seen = HashMap::new();
    for mask in [u32::MAX, 0x0000_ffff, 0xa5a5_a5a5, 0x0000_0001, 0x8000_0000, 0x7fff_fffe] {
        let want: Vec<[u32; WARP_OUTPUTS]> = (0..n / 32).flat_map(|w| warp_ops_reference(mask, &x[w * 32..][..32], &key[w * 32..][..32])).collect();
        for w in &want {
            for (k, name) in [(1, "any"), (2, "all"), (15, "match_all 32"), (17, "match_all 64")] {
                if w[1] != UNTOUCHED {
                    *seen.entry((name, w[k])).or_insert(0) += 1;
                }
            }
        }
        for schedule in SCHEDULES {
            let mut out = vec![UNTOUCHED; WARP_OUTPUTS * n];
            let (mut px, mut pk, mut pm, mut po) = (x.as_ptr(), key.as_ptr(), mask, out.as_mut_ptr());
            // SAFETY: intr_warp_ops(const int* x, const long long* key, unsigned mask, unsigned* out): x[..n], key[..n], out[..20n] for n = 96 threads.
            unsafe { launch("intr_warp_ops", 1, n as u32, 0, &mut [arg(&mut px), arg(&mut pk), arg(&mut pm), arg(&mut po)], schedule) }.unwrap();
            for t in 0..n {
                let got: [u32; WARP_OUTPUTS] = std::array::from_fn(|k| out[k * n + t]);
                assert_eq!(got, want[t], "mask {mask:#010x} {schedule:?} thread {t}");
            }
        }
    }
    // Both outcomes of every predicate occurred, so no case passed by a constant answer.
    for name in ["any", "all", "match_all 32", "match_all 64"] {
        assert!(seen.contains_key(&(name, 0)) && seen.contains_key(&(name, 1)), "{name}: outcomes {seen:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Bit intrinsics
// ---------------------------------------------------------------------------------------------

/// CUDA Math API: byte n of the result is input byte s<4n+2:4n>, input bytes 0-3 from x, 4-7 from y.
fn byte_perm(x: u32, y: u32, s: u32) -> u32 {
    let input = ((u64::from(y) << 32) | u64::from(x)).to_le_bytes();
    (0..4).fold(0, |r, n| r | (u32::from(input[((s >> (4 * n)) & 7) as usize]) << (8 * n)))
}

#[test]
fn bit_intrinsics_match_their_definitions() {
    let mut rng = StdRng::seed_from_u64(0xb175);
    let mut x: Vec<u32> = vec![0, 1, 2, 0x8000_0000, 0xffff_ffff, 0x7fff_ffff, 0x0001_0000, 0x1234_5678, 31, 32, 33, 63, 64];
    x.extend((0..32).map(|b| 1u32 << b));
    x.extend((0..2000).map(|_| rng.random::<u32>() >> rng.random_range(0..32)));
    let n = x.len();
    for schedule in [Schedule::Forward, Schedule::Random(3)] {
        let mut out = vec![UNTOUCHED; 14 * n];
        let (mut px, mut pn, mut po) = (x.as_ptr(), n as i32, out.as_mut_ptr());
        // SAFETY: intr_bits(const unsigned* x, int n, unsigned* out): x[..n], out[..14n].
        unsafe { launch("intr_bits", 4, 128, 0, &mut [arg(&mut px), arg(&mut pn), arg(&mut po)], schedule) }.unwrap();
        for i in 0..n {
            let (a, b, c) = (x[i], x[(i + 1) % n], x[(i + 7) % n]);
            let ab = (u64::from(b) << 32) | u64::from(a);
            let ffs = |v: u64| if v == 0 { 0 } else { v.trailing_zeros() + 1 };
            let clamp = (c & 63).min(32);
            let want = [
                a.count_ones(),
                ab.count_ones(),
                a.leading_zeros(),
                ab.leading_zeros(),
                ffs(u64::from(a)),
                ffs(ab),
                a.reverse_bits(),
                ab.reverse_bits() as u32,
                (ab.reverse_bits() >> 32) as u32,
                byte_perm(a, b, c),
                ((ab << (c & 31)) >> 32) as u32,
                (ab >> (c & 31)) as u32,
                ((u128::from(ab) << clamp) >> 32) as u32,
                (ab >> clamp) as u32,
            ];
            let got: [u32; 14] = std::array::from_fn(|k| out[k * n + i]);
            assert_eq!(got, want, "{schedule:?}: a={a:#x} b={b:#x} c={c:#x}");
        }
    }
    // Spot values of the definitions themselves.
    assert_eq!(byte_perm(0x4433_2211, 0x8877_6655, 0x0000_7531), 0x8866_4422);
    assert_eq!(byte_perm(0x4433_2211, 0x8877_6655, 0xffff_8888), 0x1111_1111);
}

// ---------------------------------------------------------------------------------------------
// Tensor cores: common.cuh's mma_m16n8k16_{bf16,f16}, through kernels/mma.cu's check kernel (on
// random operands here; cuda::mma::check_tensor_core_layout runs it on a GPU too)
// ---------------------------------------------------------------------------------------------

const MMA_WARPS: usize = 3;

/// Runs kernels/mma.cu's mma_layout_check over MMA_WARPS tiles: a [w][16][32], b [w][32][8] (as f32 values that the
/// 16-bit type holds exactly), c [w][16][8]; returns d [w][16][8].
fn mma_tiles(f16: bool, a: &[f32], b: &[f32], c: &[f32], schedule: Schedule) -> Vec<f32> {
    let bits = |x: f32| if f16 { want_f16(x) } else { want_bf16(x) };
    let a16: Vec<u16> = a.iter().map(|&x| bits(x)).collect();
    // B's columns, each contiguous in k (the "col" operand).
    let bt16: Vec<u16> = (0..MMA_WARPS * 8 * 32).map(|i| bits(b[(i / 256) * 256 + (i % 32) * 8 + (i % 256) / 32])).collect();
    let mut d = vec![f32::NAN; MMA_WARPS * 128];
    let (mut pa, mut pb, mut pc, mut pd, mut pf) = (a16.as_ptr(), bt16.as_ptr(), c.as_ptr(), d.as_mut_ptr(), i32::from(f16));
    // SAFETY: mma_layout_check(const unsigned short* a, const unsigned short* bt, const float* c,
    // float* d, int f16): warp w of the block touches a[w·512..], bt[w·256..], c and d [w·128..],
    // each of MMA_WARPS tiles.
    unsafe { launch("mma_layout_check", 1, 32 * MMA_WARPS as u32, 0, &mut [arg(&mut pa), arg(&mut pb), arg(&mut pc), arg(&mut pd), arg(&mut pf)], schedule) }
        .unwrap();
    d
}

/// C + A·B in f64, and Σ|terms| per output (for the summation bound).
fn mma_reference(a: &[f32], b: &[f32], c: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let (mut want, mut mag) = (vec![0f64; MMA_WARPS * 128], vec![0f64; MMA_WARPS * 128]);
    for w in 0..MMA_WARPS {
        for i in 0..16 {
            for j in 0..8 {
                let o = w * 128 + i * 8 + j;
                let (mut s, mut m) = (f64::from(c[o]), f64::from(c[o]).abs());
                for k in 0..32 {
                    let p = f64::from(a[w * 512 + i * 32 + k]) * f64::from(b[w * 256 + k * 8 + j]);
                    s += p;
                    m += p.abs();
                }
                want[o] = s;
                mag[o] = m;
            }
        }
    }
    (want, mag)
}

/// Small integers: every product and partial sum is exact in f32, so any order gives the exact
/// result, and a fragment mapped to the wrong row, column or half shows as a wrong sum.
#[test]
fn mma_of_small_integers_is_exact_in_every_warp() {
    let mut rng = StdRng::seed_from_u64(0x3a3a);
    for f16 in [false, true] {
        let a: Vec<f32> = (0..MMA_WARPS * 512).map(|_| rng.random_range(-8i32..=8) as f32).collect();
        let b: Vec<f32> = (0..MMA_WARPS * 256).map(|_| rng.random_range(-8i32..=8) as f32).collect();
        let c: Vec<f32> = (0..MMA_WARPS * 128).map(|_| rng.random_range(-64i32..=64) as f32).collect();
        let (want, _) = mma_reference(&a, &b, &c);
        for schedule in SCHEDULES {
            let d = mma_tiles(f16, &a, &b, &c, schedule);
            for (o, (&got, &w)) in d.iter().zip(&want).enumerate() {
                assert_eq!(f64::from(got), w, "f16 {f16}, {schedule:?}: warp {}, D[{}][{}]", o / 128, (o % 128) / 8, o % 8);
            }
        }
    }
}

/// Real values (rounded to the operand type): within the bound of 32 f32 additions in any
/// order, γ(33)·Σ|terms| with γ(n) = n·u/(1 − n·u), u = 2^-24 (Higham); the products are exact.
#[test]
fn mma_of_real_values_is_within_the_summation_bound() {
    let mut rng = StdRng::seed_from_u64(0x3a3b);
    let u = f64::powi(2.0, -24);
    let gamma = 33.0 * u / (1.0 - 33.0 * u);
    for f16 in [false, true] {
        let round = |x: f32| if f16 { f16::from_f32(x).to_f32() } else { bf16::from_f32(x).to_f32() };
        let a: Vec<f32> = (0..MMA_WARPS * 512).map(|_| round(rng.random_range(-3.0f32..3.0))).collect();
        let b: Vec<f32> = (0..MMA_WARPS * 256).map(|_| round(rng.random_range(-3.0f32..3.0))).collect();
        let c: Vec<f32> = (0..MMA_WARPS * 128).map(|_| rng.random_range(-10.0f32..10.0)).collect();
        let (want, mag) = mma_reference(&a, &b, &c);
        let d = mma_tiles(f16, &a, &b, &c, Schedule::Random(0x3a3b));
        for o in 0..d.len() {
            let err = (f64::from(d[o]) - want[o]).abs();
            assert!(err <= gamma * mag[o], "f16 {f16}: D[{o}] = {} against {}: error {err:e} over the bound {:e}", d[o], want[o], gamma * mag[o]);
        }
    }
}

#[test]
fn mma_waiting_for_an_exited_lane_is_reported() {
    let common = include_str!("../kernels/common.cuh");
    let line = 1 + common.lines().position(|l| l.contains("__sim_mma_m16n8k16_bf16(d, a, b, c);")).expect("the bf16 mma's executor call in common.cuh");
    let want = format!(
        "kernel `intr_mma_after_exit`, block (0,0,0), thread (0,0,0): mma.sync.m16n8k16 (bf16) (kernels/common.cuh:{line}) with mask 0xffffffff waits for lane 16 (thread (16,0,0)), which has exited"
    );
    for schedule in SCHEDULES {
        assert_eq!(planted_error("intr_mma_after_exit", schedule), want, "{schedule:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Planted misuse
// ---------------------------------------------------------------------------------------------

fn planted_error(name: &str, schedule: Schedule) -> String {
    let mut out = vec![0f32; 32];
    let mut p = out.as_mut_ptr();
    // SAFETY: each planted kernel takes one float* and touches out[..blockDim.x] at most.
    unsafe { launch(name, 1, 32, 0, &mut [arg(&mut p)], schedule) }.expect_err(name).0
}

#[test]
fn vote_with_a_mask_that_misses_the_calling_lane_is_reported() {
    let want = format!(
        "kernel `intr_ballot_mask_misses_lane`, block (0,0,0), thread (5,0,0): __ballot_sync at {FILE}:{} with mask 0x00000010, which does not include the calling lane 5",
        line_of("ballot-misses-lane")
    );
    for schedule in SCHEDULES {
        assert_eq!(planted_error("intr_ballot_mask_misses_lane", schedule), want, "{schedule:?}");
    }
}

#[test]
fn vote_waiting_for_an_exited_lane_is_reported() {
    let want = format!(
        "kernel `intr_vote_after_exit`, block (0,0,0), thread (0,0,0): __any_sync ({FILE}:{}) with mask 0xffffffff waits for lane 16 (thread (16,0,0)), which has exited",
        line_of("any-after-exit")
    );
    for schedule in SCHEDULES {
        assert_eq!(planted_error("intr_vote_after_exit", schedule), want, "{schedule:?}");
    }
}

#[test]
fn two_collectives_under_one_mask_are_a_reported_deadlock() {
    let want = format!(
        "kernel `intr_mixed_collectives`, block (0,0,0), thread (0,0,0): deadlock: __ballot_sync ({FILE}:{}) with mask 0xffffffff waits for lane 16 (thread (16,0,0)), which is at __reduce_add_sync ({FILE}:{}) with mask 0xffffffff",
        line_of("mixed-ballot"),
        line_of("mixed-reduce")
    );
    for schedule in SCHEDULES {
        assert_eq!(planted_error("intr_mixed_collectives", schedule), want, "{schedule:?}");
    }
}

#[test]
fn match_with_different_value_sizes_is_a_reported_deadlock() {
    let want = format!(
        "kernel `intr_match_size_mismatch`, block (0,0,0), thread (0,0,0): deadlock: __match_any_sync ({FILE}:{}) with mask 0xffffffff waits for lane 16 (thread (16,0,0)), which is at __match_any_sync ({FILE}:{}) with mask 0xffffffff and a value of 8 bytes (this lane's has 4)",
        line_of("match-int"),
        line_of("match-longlong")
    );
    for schedule in SCHEDULES {
        assert_eq!(planted_error("intr_match_size_mismatch", schedule), want, "{schedule:?}");
    }
}

#[test]
fn misaligned_atomic_is_reported() {
    let mut buf = vec![0u64; 4];
    let mut p = buf.as_mut_ptr();
    let want = format!(
        "kernel `intr_misaligned_atomic`, block (0,0,0), thread (3,0,0): atomicAdd at {FILE}:{} on address {:#x}, which is not aligned to its 8-byte operand (misaligned address)",
        line_of("misaligned"),
        p as usize + 4
    );
    for schedule in SCHEDULES {
        // SAFETY: intr_misaligned_atomic(unsigned long long* p) is stopped before it touches p.
        let err = unsafe { launch("intr_misaligned_atomic", 1, 32, 0, &mut [arg(&mut p)], schedule) }.unwrap_err().0;
        assert_eq!(err, want, "{schedule:?}");
    }
    assert_eq!(buf, [0; 4], "the misaligned atomic wrote");
}

/// `__activemask()` stops the executor's build with a message saying why (a failure for any
/// other reason would not carry the message).
#[test]
fn activemask_is_refused_at_compile_time() {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/src/cuda/sim");
    let mut child = Command::new(&cxx)
        .args(["-std=c++20", "-fsyntax-only", "-I", include, "-x", "c++", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{cxx}` (the cuda-sim build needs a C++20 compiler): {e}"));
    let src = "#include \"sim.cuh\"\nextern \"C\" __global__ void k(unsigned* out) { out[threadIdx.x] = __activemask(); }\n";
    child.stdin.take().unwrap().write_all(src.as_bytes()).unwrap();
    let refused = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "__activemask() compiled");
    assert!(
        stderr.contains("cuda-sim: __activemask() has no strict meaning on the CPU executor")
            && stderr.contains("name the lanes that must take part instead, e.g. 0xffffffff"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("error:").count(), 1, "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// bf16 / f16
// ---------------------------------------------------------------------------------------------

/// CUDA's f32 -> bf16 / f16: `half`'s round to nearest even, every NaN -> 0x7fff (module notes).
fn want_bf16(x: f32) -> u16 {
    if x.is_nan() { 0x7fff } else { bf16::from_f32(x).to_bits() }
}
fn want_f16(x: f32) -> u16 {
    if x.is_nan() { 0x7fff } else { f16::from_f32(x).to_bits() }
}
/// CUDA's bf16 -> f32 moves the bits, NaN payloads included; f16 -> f32 gives NaN 0x7fffffff.
fn want_bf16_to_f32(h: u16) -> u32 {
    let b = bf16::from_bits(h);
    if b.is_nan() { u32::from(h) << 16 } else { b.to_f32().to_bits() }
}
fn want_f16_to_f32(h: u16) -> u32 {
    let b = f16::from_bits(h);
    if b.is_nan() { 0x7fff_ffff } else { b.to_f32().to_bits() }
}

#[test]
fn every_16_bit_pattern_to_f32_and_back() {
    let pats: Vec<u16> = (0..=u16::MAX).collect();
    let n = pats.len();
    let (mut bf_f32, mut hf_f32) = (vec![0f32; n], vec![0f32; n]);
    let (mut bf_back, mut hf_back) = (vec![0u16; n], vec![0u16; n]);
    let (mut ph, mut pn, mut p1, mut p2, mut p3, mut p4) = (pats.as_ptr(), n as i32, bf_f32.as_mut_ptr(), hf_f32.as_mut_ptr(), bf_back.as_mut_ptr(), hf_back.as_mut_ptr());
    // SAFETY: intr_16_roundtrip(const unsigned short* h, int n, float*, float*, unsigned short*, unsigned short*): every array has n elements.
    unsafe { launch("intr_16_roundtrip", 8, 256, 0, &mut [arg(&mut ph), arg(&mut pn), arg(&mut p1), arg(&mut p2), arg(&mut p3), arg(&mut p4)], Schedule::Forward) }
        .unwrap();
    let (mut bf_nan, mut hf_nan, mut differs_from_half) = (0, 0, 0);
    for (i, &h) in pats.iter().enumerate() {
        let (b, f) = (bf16::from_bits(h), f16::from_bits(h));
        assert_eq!(bf_f32[i].to_bits(), want_bf16_to_f32(h), "bf16 {h:#06x} -> f32");
        assert_eq!(hf_f32[i].to_bits(), want_f16_to_f32(h), "f16 {h:#06x} -> f32");
        if b.is_nan() {
            bf_nan += 1;
            assert!(bf_f32[i].is_nan());
            assert_eq!(bf_back[i], 0x7fff, "bf16 NaN {h:#06x} back");
            differs_from_half += usize::from(bf_f32[i].to_bits() != b.to_f32().to_bits());
        } else {
            assert_eq!(bf_back[i], h, "bf16 {h:#06x} round trip");
        }
        if f.is_nan() {
            hf_nan += 1;
            assert!(hf_f32[i].is_nan());
            assert_eq!(hf_back[i], 0x7fff, "f16 NaN {h:#06x} back");
        } else {
            assert_eq!(hf_back[i], h, "f16 {h:#06x} round trip");
        }
    }
    assert_eq!((bf_nan, hf_nan), (2 * 127, 2 * 1023));
    // bf16 -> f32 differs from `half` only on the signaling NaNs, which `half` quiets.
    assert_eq!(differs_from_half, 2 * 63);
    assert_eq!((bf_f32[0x7f81].to_bits(), bf16::from_bits(0x7f81).to_f32().to_bits()), (0x7f81_0000, 0x7fc1_0000));
}

/// Specials, every bf16 tie and its neighbours, every f16 midpoint and its neighbours, the f16
/// subnormal and overflow boundaries, and random bits: about 4.6 million inputs.
fn conversion_inputs() -> Vec<f32> {
    let mut v: Vec<u32> = vec![
        0x0000_0000, 0x8000_0000, 0x7f80_0000, 0xff80_0000, 0x7fc0_0000, 0xffc0_0000, 0x7f80_0001, 0xff80_0001, 0x7fff_ffff, 0x7fc0_0001,
        0x7f7f_ffff, 0xff7f_ffff, 0x0080_0000, 0x0000_0001, 0x007f_ffff, 0x8000_0001,
    ];
    v.extend([65504.0f32, 65519.996, 65520.0, 65520.004, 65536.0, -65520.0, 6.1035156e-5, 5.9604645e-8, 2.9802322e-8].map(f32::to_bits));
    for e in [0x3300_0000u32, 0x3380_0000, 0x3880_0000, 0x477f_f000] {
        v.extend((0..16).flat_map(|d| [e - 8 + d, (e - 8 + d) | 0x8000_0000]));
    }
    for hi in 0..=u32::from(u16::MAX) {
        v.extend([0x0000, 0x0001, 0x7fff, 0x8000, 0x8001, 0xffff].map(|lo| (hi << 16) | lo));
    }
    for h in 0..0x7c00u16 {
        let (lo, hi) = (f16::from_bits(h).to_f32(), f16::from_bits(h + 1).to_f32());
        let mid = ((f64::from(lo) + f64::from(hi)) / 2.0) as f32; // exact: 12 significant bits
        for x in [mid.to_bits(), mid.to_bits() - 1, mid.to_bits() + 1, lo.to_bits() + 1] {
            v.extend([x, x | 0x8000_0000]);
        }
    }
    let mut rng = StdRng::seed_from_u64(0xf16);
    v.extend((0..3_000_000).map(|_| rng.random::<u32>()));
    // Concentrated on f16's exponents (2^-27 .. 2^17), where its rounding has the most cases.
    v.extend((0..1_000_000).map(|_| rng.random_range(100u32 << 23..145 << 23) | (rng.random_range(0..2u32) << 31)));
    v.into_iter().map(f32::from_bits).collect()
}

#[test]
fn f32_to_bf16_and_f16_round_like_half() {
    let x = conversion_inputs();
    let n = x.len();
    assert!(n > 4_000_000, "{n} inputs");
    let (mut bf, mut hf) = (vec![0u16; n], vec![0u16; n]);
    let (mut px, mut pn, mut pb, mut ph) = (x.as_ptr(), n as i32, bf.as_mut_ptr(), hf.as_mut_ptr());
    // SAFETY: intr_f32_to_16(const float* x, int n, unsigned short* bf, unsigned short* hf): each array has n elements.
    unsafe { launch("intr_f32_to_16", 16, 256, 0, &mut [arg(&mut px), arg(&mut pn), arg(&mut pb), arg(&mut ph)], Schedule::Forward) }.unwrap();
    let mut bad = Vec::new();
    for i in 0..n {
        if bf[i] != want_bf16(x[i]) || hf[i] != want_f16(x[i]) {
            bad.push(format!("{:#010x}: bf16 {:#06x} (want {:#06x}) f16 {:#06x} (want {:#06x})", x[i].to_bits(), bf[i], want_bf16(x[i]), hf[i], want_f16(x[i])));
        }
    }
    assert!(bad.is_empty(), "{} of {n} differ, first: {:?}", bad.len(), &bad[..bad.len().min(8)]);
    // Named cases, as numbers: ties to even, overflow, the f16 subnormal edge, NaN.
    let at = |bits: u32| x.iter().position(|v| v.to_bits() == bits).unwrap();
    assert_eq!(bf[at(0x3f80_8000)], 0x3f80); // 1 + 2^-8: tie, down to even
    assert_eq!(bf[at(0x3f81_8000)], 0x3f82); // tie, up to even
    assert_eq!(bf[at(0x7f7f_ffff)], 0x7f80); // rounds past the largest bf16: inf
    assert_eq!(hf[at(65520f32.to_bits())], 0x7c00); // the tie above 65504: inf
    assert_eq!(hf[at(65519.996f32.to_bits())], 0x7bff);
    assert_eq!(hf[at(0x3300_0000)], 0x0000); // 2^-25: tie between 0 and the smallest subnormal
    assert_eq!(hf[at(0x3300_0001)], 0x0001);
    assert_eq!(hf[at(0x8000_0001)], 0x8000); // -0 kept
    for nan in [0x7fc0_0000u32, 0xffc0_0000, 0x7f80_0001, 0x7fc0_0001] {
        let i = at(nan);
        assert_eq!((bf[i], hf[i]), (0x7fff, 0x7fff), "NaN {nan:#010x}");
    }
    // Where `half` differs: it keeps sign and payload and sets the quiet bit.
    assert_eq!((bf16::from_f32(f32::from_bits(0xffc0_0000)).to_bits(), f16::from_f32(f32::from_bits(0xffc0_0000)).to_bits()), (0xffc0, 0xfe00));
}

#[test]
fn pair_conversions_pack_low_then_high() {
    let mut x: Vec<f32> = [0.0f32, -0.0, 1.0, -2.5, 65520.0, 1e-40, f32::NAN, f32::INFINITY, 3.0e38, 5.9604645e-8].to_vec();
    let mut rng = StdRng::seed_from_u64(0x9a1);
    x.extend((0..4000).map(|_| f32::from_bits(rng.random::<u32>())));
    let pairs = x.len() / 2;
    let (mut bf2, mut hf2) = (vec![0u32; pairs], vec![0u32; pairs]);
    let (mut bf_back, mut hf_back) = (vec![0f32; x.len()], vec![0f32; x.len()]);
    let (mut px, mut pp, mut p1, mut p2, mut p3, mut p4) = (x.as_ptr(), pairs as i32, bf2.as_mut_ptr(), hf2.as_mut_ptr(), bf_back.as_mut_ptr(), hf_back.as_mut_ptr());
    // SAFETY: intr_pairs(const float* x, int pairs, unsigned*, unsigned*, float*, float*): x and the float outputs have 2·pairs elements, the packed ones pairs.
    unsafe { launch("intr_pairs", 4, 128, 0, &mut [arg(&mut px), arg(&mut pp), arg(&mut p1), arg(&mut p2), arg(&mut p3), arg(&mut p4)], Schedule::Forward) }.unwrap();
    for j in 0..pairs {
        let (a, b) = (x[2 * j], x[2 * j + 1]);
        assert_eq!(bf2[j], u32::from(want_bf16(a)) | (u32::from(want_bf16(b)) << 16), "bf16x2 of ({a}, {b})");
        assert_eq!(hf2[j], u32::from(want_f16(a)) | (u32::from(want_f16(b)) << 16), "f16x2 of ({a}, {b})");
        for (k, v) in [(0, a), (1, b)] {
            assert_eq!(bf_back[2 * j + k].to_bits(), want_bf16_to_f32(want_bf16(v)), "bf16 of {v} back to f32");
            assert_eq!(hf_back[2 * j + k].to_bits(), want_f16_to_f32(want_f16(v)), "f16 of {v} back to f32");
        }
    }
    assert_eq!(bf2[0], 0x8000_0000); // (0.0, -0.0): -0 in the high half
    assert_eq!(hf2[1], 0xc100_3c00); // (1.0, -2.5)
    assert_eq!(hf_back[6].to_bits(), 0x7fff_ffff); // NaN through f16 and back
}
