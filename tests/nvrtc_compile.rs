//! Every embedded kernel source compiles with NVRTC for sm_80 (A100) and sm_90 (H100/H200) to a
//! CUBIN, ptxas reports every kernel, no kernel spills, and the kernels launched with a row plan
//! fit their largest plan's block in the register file. Needs libnvrtc, not a GPU.
//!
//! Without NVRTC the tests print `SKIPPED: ...` and pass, unless `REQUIRE_NVRTC=1` (set by the
//! project's test script after `scripts/install-cuda-tools.sh`), where they fail.

use bert_adapters::cuda::probe::{nvrtc_for_test, report_line};
use bert_adapters::cuda::registry::{planned_block_limit, ALL_SOURCES};
use bert_adapters::cuda::kernel_cache::CubinOrigin;
use bert_adapters::cuda::runtime::{cached_cubin, cubin_through, nvrtc_version};
use bert_adapters::cuda::{compile_with_report, CompileReport};

const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

fn compile(file: &str, code: &str, arch: &str) -> CompileReport {
    match compile_with_report(code, arch, &[]) {
        Ok(r) => r,
        Err(e) => panic!("{file} for {arch}: {e}"),
    }
}

/// The most threads a block of a kernel with `registers` a thread can have on sm_80 and sm_90:
/// 64K registers an SM, allocated to warps in units of 256.
fn threads_within_register_file(registers: u32) -> u32 {
    let per_warp = (registers * 32).div_ceil(256) * 256;
    ((65536 / per_warp.max(1)) * 32).min(1024)
}

#[test]
fn the_register_file_bound_matches_the_driver() {
    // The H100's driver said 896 threads for a kernel of 72 registers (docs/gpu-log.md).
    assert_eq!(threads_within_register_file(72), 896);
    assert_eq!(threads_within_register_file(64), 1024);
    assert_eq!(threads_within_register_file(128), 512);
    assert_eq!(threads_within_register_file(94), 672);
}

#[test]
fn every_kernel_compiles_without_spills() {
    if !nvrtc_for_test("nvrtc_compile::every_kernel_compiles_without_spills") {
        return;
    }
    let (major, minor) = nvrtc_version().expect("NVRTC loads, so its version is readable");
    report_line(&format!("NVRTC {major}.{minor}"));
    // One thread an arch: each compiles every source (NVRTC and ptxas are the test's ~2 minutes
    // on one core; the programs are independent), then the reports are checked in order.
    let reports: Vec<Vec<CompileReport>> = std::thread::scope(|scope| {
        let per_arch: Vec<_> = ARCHS.iter().map(|&arch| scope.spawn(move || ALL_SOURCES.iter().map(|src| compile(src.file, src.code, arch)).collect::<Vec<_>>())).collect();
        per_arch.into_iter().map(|t| t.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    });
    for (i, src) in ALL_SOURCES.iter().enumerate() {
        for (a, arch) in ARCHS.into_iter().enumerate() {
            let report = &reports[a][i];
            assert!(!report.cubin.is_empty(), "{} {arch}: empty CUBIN", src.file);
            for &kernel in src.kernels {
                let Some(k) = report.kernel(kernel) else {
                    panic!("{} {arch}: ptxas did not report `{kernel}`; log:\n{}", src.file, report.log);
                };
                report_line(&format!(
                    "{arch} {kernel}: {} registers, {} B stack, {} B spill stores, {} B spill loads, {} B smem, {} barriers",
                    k.registers, k.stack_frame_bytes, k.spill_store_bytes, k.spill_load_bytes, k.smem_bytes, k.barriers
                ));
                assert_eq!(k.arch, arch, "{kernel}: report for the wrong arch");
                assert!(k.registers > 0, "{kernel} {arch}: register count not parsed; log:\n{}", report.log);
                assert_eq!(
                    (k.spill_store_bytes, k.spill_load_bytes),
                    (0, 0),
                    "{kernel} {arch} spills; log:\n{}",
                    report.log
                );
                if let Some(most) = planned_block_limit(kernel) {
                    let fits = threads_within_register_file(k.registers);
                    assert!(
                        fits >= most,
                        "{kernel} {arch}: {} registers a thread allow {fits} threads a block, but its launch plans allow {most} (give it __launch_bounds__({most}))",
                        k.registers
                    );
                }
            }
            // Nothing but the kernels of this file may show up (a typo'd registry would not).
            for k in &report.kernels {
                assert!(src.kernels.contains(&k.name.as_str()), "{}: unexpected kernel {} in report", src.file, k.name);
            }
        }
    }
}

/// NVRTC ships no headers; the runtime passes the CUDA include folder beside the loaded libnvrtc,
/// so kernels may use `cuda_bf16.h` (whose conversions cuda-sim's stub headers mirror bit for bit).
#[test]
fn kernels_can_include_the_cuda_half_headers() {
    if !nvrtc_for_test("nvrtc_compile::kernels_can_include_the_cuda_half_headers") {
        return;
    }
    let src = r#"
#include <cuda_bf16.h>
#include <cuda_fp16.h>
extern "C" __global__ void to_bf16(__nv_bfloat16* out, __half* out16, const float* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { out[i] = __float2bfloat16(x[i]); out16[i] = __float2half(x[i]); }
}
"#;
    // Compile first: NVRTC is loaded then, and the folder is found beside it.
    let report = compile("to_bf16 test source", src, "sm_90");
    let dir = bert_adapters::cuda::runtime::cuda_include_dir().expect("the CUDA headers beside libnvrtc (the nvidia-cuda-runtime wheel)");
    report_line(&format!("CUDA headers for NVRTC: {}", dir.display()));
    assert!(report.kernel("to_bf16").is_some(), "{}", report.log);
}

#[test]
fn compile_errors_carry_the_nvrtc_log() {
    if !nvrtc_for_test("nvrtc_compile::compile_errors_carry_the_nvrtc_log") {
        return;
    }
    let bad = "extern \"C\" __global__ void broken(float* y) { y[0] = undefined_name; }";
    let err = compile_with_report(bad, "sm_90", &[]).unwrap_err().to_string();
    assert!(err.contains("undefined_name"), "the log should name the error: {err}");
    let err = compile_with_report("", "sm_90", &["--no-such-option"]).unwrap_err().to_string();
    assert!(err.contains("no-such-option") || err.contains("INVALID_OPTION"), "{err}");
    assert!(compile_with_report("", "compute_90", &[]).is_err());
    assert!(compile_with_report("", "sm_90", &["a\0b"]).is_err());
}

#[test]
fn cubins_compile_once_per_process() {
    if !nvrtc_for_test("nvrtc_compile::cubins_compile_once_per_process") {
        return;
    }
    // The smallest source: the cache is what is tested, and this test runs beside the
    // every-kernel compile on CI's two cores.
    let src = ALL_SOURCES.iter().min_by_key(|s| s.code.len()).expect("kernel sources");
    // Private defines make these keys unique to this test, so parallel tests cannot interfere;
    // no disk cache, so the first request is a compile whatever an earlier run left on disk.
    let first = cubin_through(src.file, src.code, "sm_80", &["-DCACHE_TEST=1"], None).expect("compiles");
    assert_eq!(first.origin, CubinOrigin::Compiled);
    let second = cached_cubin(src.file, src.code, "sm_80", &["-DCACHE_TEST=1"]).expect("cached");
    assert!(std::sync::Arc::ptr_eq(&first.image, &second), "the second request must be served from the cache");
    // A different option set is a different key.
    let other = cubin_through(src.file, src.code, "sm_80", &["-DCACHE_TEST=2"], None).expect("compiles").image;
    assert!(!std::sync::Arc::ptr_eq(&first.image, &other));
}

#[test]
fn the_disk_cache_keeps_what_nvrtc_compiled() {
    use bert_adapters::cuda::kernel_cache::DiskCache;
    use bert_adapters::cuda::runtime::{compile_cubin, entry_key};
    if !nvrtc_for_test("nvrtc_compile::the_disk_cache_keeps_what_nvrtc_compiled") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("nvrtc-disk-cache-{}-{:x}", std::process::id(), rand::random::<u64>()));
    let cache = DiskCache::new(&dir);
    // A source of its own (and a define unique to this run) so the in-process map cannot answer.
    let code = "extern \"C\" __global__ void disk_cache_probe(float* x) { x[threadIdx.x] = 2.0f * x[threadIdx.x] + DISK_CACHE_RUN; }\n";
    let define = format!("-DDISK_CACHE_RUN={}", rand::random::<u16>());
    let opts = [define.as_str()];

    let first = cubin_through("probe.cu", code, "sm_80", &opts, Some(&cache)).expect("compiles");
    assert_eq!(first.origin, CubinOrigin::Compiled);
    let key = entry_key("probe.cu", code, "sm_80", &opts).expect("NVRTC is loaded");
    assert!(key.file_name.starts_with("probe-sm_80-"), "{}", key.file_name);
    assert!(cache.entry_path(&key).is_file(), "the compile is kept on disk");

    // What another process would find: the same bytes, and no compile.
    let (image, origin) = cache.fetch_or_compile(&key, || panic!("an entry on disk must not be compiled again")).unwrap();
    assert_eq!(origin, CubinOrigin::Disk);
    assert_eq!(image, *first.image);
    // NVRTC is deterministic, which the runtime's "refused twice" rule relies on.
    assert_eq!(compile_cubin("probe.cu", code, "sm_80", &opts).unwrap(), *first.image);

    // Everything the image depends on is in the key: another arch, another option, another source.
    let others = [
        entry_key("probe.cu", code, "sm_90", &opts).unwrap(),
        entry_key("probe.cu", code, "sm_80", &[define.as_str(), "-DX=1"]).unwrap(),
        entry_key("probe.cu", &code.replace("2.0f", "3.0f"), "sm_80", &opts).unwrap(),
    ];
    for other in &others {
        assert_ne!(other.file_name, key.file_name);
        assert!(cache.load(other).is_none());
    }

    // A damaged entry is compiled again and rewritten.
    let path = cache.entry_path(&key);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let (image, origin) = cache.fetch_or_compile(&key, || compile_cubin("probe.cu", code, "sm_80", &opts)).unwrap();
    assert_eq!((origin, &image), (CubinOrigin::Compiled, &*first.image));
    assert_eq!(cache.load(&key).as_deref(), Some(&first.image[..]), "the rewritten entry is sound");

    // A compile error is reported as NVRTC's, with no entry left behind.
    let broken = "extern \"C\" __global__ void broken( { }\n";
    let err = cubin_through("broken.cu", broken, "sm_80", &opts, Some(&cache)).unwrap_err().to_string();
    assert!(err.contains("broken.cu"), "{err}");
    assert!(!cache.entry_path(&entry_key("broken.cu", broken, "sm_80", &opts).unwrap()).exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn precompile_keeps_going_past_a_family_that_fails() {
    use bert_adapters::cuda::kernel_cache::{CubinOrigin, DiskCache};
    use bert_adapters::cuda::registry::KernelSource;
    use bert_adapters::cuda::runtime::precompile;
    if !nvrtc_for_test("nvrtc_compile::precompile_keeps_going_past_a_family_that_fails") {
        return;
    }
    static BROKEN: KernelSource = KernelSource { family: "broken", file: "broken.cu", code: "extern \"C\" __global__ void broken( {}\n", kernels: &[] };
    static FINE: KernelSource = KernelSource {
        family: "fine",
        file: "fine.cu",
        code: "extern \"C\" __global__ void fine(float* x) { x[threadIdx.x] *= 3.0f; }\n",
        kernels: &["fine"],
    };
    let dir = std::env::temp_dir().join(format!("precompile-{}-{:x}", std::process::id(), rand::random::<u64>()));
    let cache = DiskCache::new(&dir);
    let heard = std::sync::Mutex::new(Vec::new());
    let results = precompile(&cache, &[&BROKEN, &FINE], "sm_80", 2, |source, result| heard.lock().unwrap().push((source.family, result.is_ok()))).unwrap();
    let mut heard = heard.into_inner().unwrap();
    heard.sort();
    assert_eq!(heard, vec![("broken", false), ("fine", true)], "each source is reported as it finishes");
    assert_eq!(results.len(), 2);
    let err = results[0].as_ref().unwrap_err().to_string();
    assert!(err.contains("broken.cu"), "{err}");
    let fine = results[1].as_ref().unwrap();
    assert_eq!((fine.family, fine.origin), ("fine", CubinOrigin::Compiled));
    // A second pass only reads.
    let again = precompile(&cache, &[&FINE], "sm_80", 1, |_, _| {}).unwrap();
    assert_eq!(again[0].as_ref().unwrap().origin, CubinOrigin::Disk);
    assert!(precompile(&cache, &[&FINE], "compute_80", 1, |_, _| {}).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
