//! The device-runtime layer (`cuda::gpu::Gpu`): memory, copies, memset, views, launch checks and
//! events, from one test body per behaviour on every device (`test_device!`): the `cuda-sim`
//! executor in CI, a real GPU where there is one.

use bert_adapters::cuda::gpu::{Gpu, GpuKind, KernelArg};
use bert_adapters::cuda::registry::layernorm::RESIDUAL_LAYERNORM_FORWARD_F32 as LAYERNORM;
use bert_adapters::{test_device, Error};
use cudarc::driver::LaunchConfig;

fn copies_round_trip(gpu: &Gpu) {
    let host: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
    let buf = gpu.upload(&host).unwrap();
    assert_eq!(buf.len(), 1000);
    assert_eq!(gpu.download(&buf.view()).unwrap(), host);

    // Device to device into a window of a larger buffer; the rest keeps its zeros.
    let mut big = gpu.alloc_zeros::<f32>(1200).unwrap();
    gpu.copy_dtod(&buf.slice(100..400).unwrap(), &mut big.slice_mut(500..800).unwrap()).unwrap();
    let got = gpu.download(&big.view()).unwrap();
    assert!(got[..500].iter().chain(&got[800..]).all(|&v| v == 0.0));
    assert_eq!(&got[500..800], &host[100..400]);

    // Host to device into a window, then memset of another window.
    gpu.copy_htod(&[1.5f32; 10], &mut big.slice_mut(0..10).unwrap()).unwrap();
    gpu.memset_bytes(&mut big.slice_mut(10..20).unwrap(), 0xff).unwrap();
    let got = gpu.download(&big.slice(0..21).unwrap()).unwrap();
    assert!(got[..10].iter().all(|&v| v == 1.5));
    assert!(got[10..20].iter().all(|v| v.to_bits() == u32::MAX));
    assert_eq!(got[20], 0.0);

    // Other element types keep their bits.
    let ints: Vec<i32> = (-50..50).collect();
    assert_eq!(gpu.download(&gpu.upload(&ints).unwrap().view()).unwrap(), ints);
    let halves: Vec<half::bf16> = (0..64).map(|i| half::bf16::from_f32(i as f32 / 3.0)).collect();
    assert_eq!(gpu.download(&gpu.upload(&halves).unwrap().view()).unwrap(), halves);

    // Empty buffers and copies are fine.
    let empty = gpu.alloc::<f32>(0).unwrap();
    assert!(gpu.download(&empty.view()).unwrap().is_empty());
}
test_device!(copies, copies_round_trip);

fn bad_copies_are_errors(gpu: &Gpu) {
    let mut buf = gpu.alloc_zeros::<f32>(8).unwrap();
    assert!(matches!(gpu.copy_htod(&[1f32; 9], &mut buf.view_mut()), Err(Error::Input(_))));
    let mut host = [0f32; 7];
    assert!(matches!(gpu.copy_dtoh(&buf.view(), &mut host), Err(Error::Input(_))));
    let e = buf.slice(4..9).unwrap_err().to_string();
    assert!(e.contains("4..9") && e.contains("8 elements"), "{e}");
    #[allow(clippy::reversed_empty_ranges)]
    let reversed = buf.slice(5..4);
    assert!(reversed.is_err());
    assert!(matches!(gpu.alloc::<f32>(usize::MAX / 2), Err(Error::Input(_))), "a size that overflows is refused");
    assert_eq!(gpu.download(&buf.view()).unwrap(), vec![0f32; 8], "a refused copy wrote");
}
test_device!(bad_copies, bad_copies_are_errors);

/// A valid LayerNorm launch over `rows` rows of 32 columns (warp per row), for launch checks.
struct LayerNormBuffers {
    x: bert_adapters::cuda::DeviceBuffer<f32>,
    params: bert_adapters::cuda::DeviceBuffer<f32>,
    y: bert_adapters::cuda::DeviceBuffer<f32>,
    stats: bert_adapters::cuda::DeviceBuffer<f32>,
}

const ROWS: usize = 4;
const COLS: usize = 32;

impl LayerNormBuffers {
    fn new(gpu: &Gpu) -> Self {
        let x: Vec<f32> = (0..ROWS * COLS).map(|i| (i % 7) as f32).collect();
        LayerNormBuffers {
            x: gpu.upload(&x).unwrap(),
            params: gpu.upload(&[1f32; COLS]).unwrap(),
            y: gpu.upload(&[f32::NAN; ROWS * COLS]).unwrap(),
            stats: gpu.upload(&[f32::NAN; 2 * ROWS]).unwrap(),
        }
    }
    fn args(&mut self, cache_row: i32) -> Vec<KernelArg> {
        let (y, mean, rstd) = (self.y.view_mut().arg(), self.stats.slice(0..ROWS).unwrap().arg(), self.stats.slice(ROWS..2 * ROWS).unwrap().arg());
        let p = self.params.view().arg();
        vec![y, mean, rstd, self.x.view().arg(), KernelArg::Null, p, p, KernelArg::I32(ROWS as i32), KernelArg::I32(COLS as i32), KernelArg::F32(1e-5), KernelArg::I32(cache_row)]
    }
}

fn config(block: (u32, u32, u32), smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (1, 1, 1), block_dim: block, shared_mem_bytes: smem }
}

fn launches_are_checked_like_the_driver(gpu: &Gpu) {
    let mut b = LayerNormBuffers::new(gpu);
    let args = b.args(0);
    // SAFETY (every launch below): the buffers hold ROWS x COLS inputs and outputs, which a
    // warp-per-row block of (32, ROWS) indexes exactly; refused launches run nothing.
    let launch = |cfg: LaunchConfig, args: &[KernelArg]| unsafe { gpu.launch(LAYERNORM, cfg, args) };
    let err = |r: bert_adapters::Result<()>| r.expect_err("must be refused").to_string();

    let e = err(launch(config((32, 33, 1), 0), &args));
    assert!(e.contains("1056 threads") && e.contains("exceeds the limits"), "{e}");
    let e = err(launch(LaunchConfig { grid_dim: (0, 1, 1), ..config((32, 4, 1), 0) }, &args));
    assert!(e.contains("no zero dimension"), "{e}");
    let e = err(launch(LaunchConfig { grid_dim: (1, 70000, 1), ..config((32, 4, 1), 0) }, &args));
    assert!(e.contains("grid") && e.contains("exceeds"), "{e}");
    let e = err(launch(config((32, 4, 1), 64 * 1024), &args));
    // Without an opt-in a block has 48 KB of shared memory, static arrays included: the kernel's
    // `scratch[32]` floats (128 bytes) on a GPU, as the driver reports them; cuda-sim assumes the
    // planners' 256-byte room for them.
    let static_bytes = if gpu.kind() == GpuKind::Cuda { 128 } else { bert_adapters::cuda::gpu::SIM_STATIC_SHARED_BOUND };
    assert_eq!(gpu.static_shared_bytes(LAYERNORM).unwrap(), static_bytes);
    let limit = 48 * 1024 - static_bytes;
    assert!(e.contains(&format!("65536 bytes of dynamic shared memory exceed the {limit} this kernel may use")), "{e}");
    // One byte over what the static arrays leave is refused here, before the driver would (it
    // answers CUDA_ERROR_INVALID_VALUE); the last byte is allowed.
    let e = err(launch(config((32, 4, 1), (limit + 4) as u32), &args));
    assert!(e.contains(&format!("{} bytes of dynamic shared memory exceed the {limit}", limit + 4)), "{e}");
    let e = err(launch(config((32, 4, 1), 0), &args[..10]));
    assert!(e.contains("10 arguments given, the kernel takes 11"), "{e}");
    let mut wrong = args.clone();
    wrong[7] = KernelArg::F32(4.0);
    let e = err(launch(config((32, 4, 1), 0), &wrong));
    assert!(e.contains("argument 7 (`rows`) must be int, got float 4"), "{e}");
    assert!(gpu.download(&b.y.view()).unwrap().iter().all(|v| v.is_nan()), "a refused launch ran");

    // Opting in raises the limit up to the architecture's maximum, as cuFuncSetAttribute does.
    let over = gpu.limits().max_shared_bytes_opt_in + 1;
    let e = gpu.allow_dynamic_shared(LAYERNORM, over).unwrap_err().to_string();
    assert!(e.contains("may opt in to"), "{e}");
    gpu.allow_dynamic_shared(LAYERNORM, 64 * 1024).unwrap();
    assert_eq!(gpu.dynamic_shared_limit(LAYERNORM), 64 * 1024);
    launch(config((32, 4, 1), 64 * 1024), &b.args(1)).unwrap();
    let y = gpu.download(&b.y.view()).unwrap();
    assert!(y.iter().all(|v| v.is_finite()), "the opted-in launch ran and wrote every element");
}
test_device!(launch_checks, launches_are_checked_like_the_driver);

fn events_time_the_stream(gpu: &Gpu) {
    let mut b = LayerNormBuffers::new(gpu);
    let args = b.args(1);
    let start = gpu.record_event().unwrap();
    for _ in 0..3 {
        // SAFETY: as in launches_are_checked_like_the_driver.
        unsafe { gpu.launch(LAYERNORM, config((32, 4, 1), (4 * COLS * 4) as u32), &args) }.unwrap();
    }
    let end = gpu.record_event().unwrap();
    let ms = gpu.elapsed_ms(&start, &end).unwrap();
    assert!(ms.is_finite() && ms >= 0.0, "{ms}");
    if gpu.kind() == GpuKind::Sim {
        // The executor is synchronous: three launches of 128 fibers take measurable time.
        assert!(ms > 0.0, "{ms}");
    }
}
test_device!(events, events_time_the_stream);

#[test]
fn device_names_parse_and_cuda_sim_opens_only_with_the_feature() {
    let d: bert_adapters::Device = "cuda-sim".parse().unwrap();
    assert_eq!(d.to_string(), "cuda-sim");
    match Gpu::open(d) {
        #[cfg(feature = "cuda-sim")]
        Ok(gpu) => assert_eq!(gpu.kind(), GpuKind::Sim),
        #[cfg(not(feature = "cuda-sim"))]
        Err(Error::Unsupported(msg)) => assert!(msg.contains("--features cuda-sim"), "{msg}"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(Gpu::open(bert_adapters::Device::Cpu).is_err());
}

/// Column-major `C = act(alpha·op(A)·op(B) + beta·C + bias)` per batch, written out directly.
#[allow(clippy::too_many_arguments)]
fn naive_gemm(ta: bool, tb: bool, m: usize, n: usize, k: usize, alpha: f32, beta: f32, a: &[f32], b: &[f32], c: &mut [f32], bias: &[f32], relu: bool, batch: usize) {
    let (lda, ldb, ldc) = (if ta { k } else { m }, if tb { n } else { k }, m);
    let (sa, sb, sc) = (m * k, k * n, m * n);
    for i in 0..batch {
        for col in 0..n {
            for row in 0..m {
                let mut acc = 0f64;
                for p in 0..k {
                    let av = if ta { a[i * sa + p + row * lda] } else { a[i * sa + row + p * lda] };
                    let bv = if tb { b[i * sb + col + p * ldb] } else { b[i * sb + p + col * ldb] };
                    acc += av as f64 * bv as f64;
                }
                let v = alpha as f64 * acc + beta as f64 * c[i * sc + row + col * ldc] as f64 + bias[row] as f64;
                c[i * sc + row + col * ldc] = if relu { v.max(0.0) as f32 } else { v as f32 };
            }
        }
    }
}

/// A strided-batched product with both transposes, alpha/beta and a bias + ReLU epilogue, through
/// `Gpu::gemm` (cuBLASLt on a GPU). Inputs are multiples of 1/8 in [-1, 1] and alpha/beta of 1/2,
/// so every result is exact in f32 whatever the summation order: equality is the right check.
fn gemm_matches_a_direct_product(gpu: &Gpu) {
    use bert_adapters::cuda::gemm::{Epilogue, Gemm, Transpose};
    let (m, n, k, batch) = (33, 7, 65, 3);
    let eighths = |len: usize, seed: usize| -> Vec<f32> { (0..len).map(|i| (((i * 37 + seed * 11) % 17) as f32 - 8.0) / 8.0).collect() };
    let (a, b, c0, bias) = (eighths(batch * m * k, 1), eighths(batch * k * n, 2), eighths(batch * m * n, 3), eighths(m, 4));
    let g = Gemm::new(Transpose::Yes, Transpose::Yes, m, n, k)
        .with_ld(k, n, m)
        .with_batch(batch, m * k, k * n, m * n)
        .with_scalars(0.5, -1.5)
        .with_epilogue(Epilogue::ReluBias);
    let (da, db, dbias) = (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap(), gpu.upload(&bias).unwrap());
    let mut dc = gpu.upload(&c0).unwrap();
    gpu.gemm(&g, &da.view(), &db.view(), &mut dc.view_mut(), Some(&dbias.view())).unwrap();
    let got = gpu.download(&dc.view()).unwrap();
    let mut want = c0.clone();
    naive_gemm(true, true, m, n, k, 0.5, -1.5, &a, &b, &mut want, &bias, true, batch);
    assert_eq!(got, want, "{}", gpu.describe());
    assert!(want.contains(&0.0) && want.iter().any(|&v| v > 0.0), "the case exercises the ReLU");

    // Lengths are validated before anything runs, and C keeps its contents.
    let short = gpu.upload(&a[..a.len() - 1]).unwrap();
    assert!(matches!(gpu.gemm(&g, &short.view(), &db.view(), &mut dc.view_mut(), Some(&dbias.view())), Err(Error::Shape { .. })));
    assert!(gpu.gemm(&g, &da.view(), &db.view(), &mut dc.view_mut(), None).is_err(), "the epilogue needs its bias");
    assert_eq!(gpu.download(&dc.view()).unwrap(), got);
}
test_device!(gemm, gemm_matches_a_direct_product);

/// On a real GPU: a disk-cache entry the driver refuses (a sound entry holding an image for
/// another arch, under this device's key) is compiled again, loaded, and replaced on disk by the
/// image that loads.
#[test]
fn a_cached_image_the_driver_refuses_is_compiled_again() {
    use bert_adapters::cuda::kernel_cache::DiskCache;
    use bert_adapters::cuda::registry::KernelSource;
    use bert_adapters::cuda::runtime::{compile_cubin, entry_key};
    use bert_adapters::cuda::CudaRuntime;
    let ctx = bert_adapters::require_gpu!("gpu_runtime::a_cached_image_the_driver_refuses_is_compiled_again");
    // A source no other test loads, so the process's own map cannot answer.
    static SOURCE: KernelSource = KernelSource {
        family: "refusal_probe",
        file: "refusal_probe.cu",
        code: "extern \"C\" __global__ void refusal_probe(float* x) { x[threadIdx.x] += 1.0f; }\n",
        kernels: &["refusal_probe"],
    };
    let mut rt = CudaRuntime::new(ctx).unwrap();
    let dir = std::env::temp_dir().join(format!("refused-cubin-{}", std::process::id()));
    let cache = DiskCache::new(&dir);
    let arch = rt.arch().to_string();
    let other_arch = if arch == "sm_80" { "sm_90" } else { "sm_80" };
    let wrong = compile_cubin(SOURCE.file, SOURCE.code, other_arch, &[]).unwrap();
    let key = entry_key(SOURCE.file, SOURCE.code, &arch, &[]).unwrap();
    cache.store(&key, &wrong).unwrap();
    assert_eq!(cache.load(&key).as_deref(), Some(&wrong[..]), "the planted entry is sound");

    rt.set_kernel_cache(Some(cache.clone()));
    let module = rt.module(&SOURCE, &[]).expect("the refused image is compiled again and loads");
    module.load_function("refusal_probe").expect("the kernel is in the module");
    let fresh = compile_cubin(SOURCE.file, SOURCE.code, &arch, &[]).unwrap();
    assert_ne!(fresh, wrong);
    assert_eq!(cache.load(&key), Some(fresh), "the entry now holds the image this GPU loads");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Device memory is finite: an allocation that does not fit first returns the pool's cached free
/// blocks to the device and tries again (PyTorch's caching allocator does the same), and only
/// then fails, saying how much was asked and held. On the executor, with a memory limit.
#[cfg(feature = "cuda-sim")]
#[test]
fn an_allocation_that_does_not_fit_returns_the_cached_blocks_first() {
    use bert_adapters::cuda::gpu::SimConfig;
    let gpu = Gpu::sim(SimConfig { memory_limit: Some(1 << 20), ..SimConfig::default() });
    // 600 KiB allocated and freed: the pool keeps it for reuse.
    drop(gpu.alloc::<u8>(600 << 10).unwrap());
    let before = gpu.memory_stats();
    assert_eq!(before.cached_bytes, 600 << 10);
    // 700 KiB does not fit beside it: the cached block goes back, and the allocation succeeds.
    let held = gpu.alloc::<u8>(700 << 10).unwrap();
    let after = gpu.memory_stats();
    assert_eq!((after.cached_bytes, after.live_bytes), (0, 700 << 10));
    assert_eq!(after.released, before.released + 1);
    // Nothing cached to return: a clear error naming the sizes.
    let e = gpu.alloc::<f32>(100 << 10).unwrap_err().to_string();
    assert!(e.contains("out of device memory on cuda-sim") && e.contains("allocating 0.4 MiB more, with 0.7 MiB held"), "{e}");
    assert!(e.contains("smaller batch") && !e.contains("returned"), "{e}");
    // A cached block that is not enough: returned, tried again, and the error says so.
    drop(held);
    let e = gpu.alloc::<u8>(2 << 20).unwrap_err().to_string();
    assert!(e.contains("allocating 2.0 MiB more") && e.contains("its 0.7 MiB of cached free blocks were returned to the device first"), "{e}");
    assert_eq!(gpu.memory_stats().cached_bytes, 0);
    // Within the limit again, everything works.
    let fits = gpu.upload(&vec![1.5f32; 1000]).unwrap();
    assert_eq!(gpu.download(&fits.view()).unwrap(), vec![1.5f32; 1000]);
}

/// On a real GPU: more than the device holds is an error naming the sizes and the device's
/// free memory, not a panic or a bare driver code.
#[test]
fn more_than_the_gpu_holds_is_a_clear_error() {
    let _ctx = bert_adapters::require_gpu!("gpu_runtime::more_than_the_gpu_holds_is_a_clear_error");
    let gpu = Gpu::open(bert_adapters::Device::Cuda(0)).unwrap();
    let e = gpu.alloc::<u8>(1 << 50).unwrap_err().to_string();
    assert!(e.contains("out of device memory on cuda:0") && e.contains("MiB free"), "{e}");
    // The device is still usable afterwards.
    let b = gpu.upload(&[3.0f32; 16]).unwrap();
    assert_eq!(gpu.download(&b.view()).unwrap(), vec![3.0f32; 16]);
}
