//! The memory pool under `Gpu::alloc` and graph capture (`Gpu::begin_capture` / `end_capture` /
//! `replay`), one body per device: the executor's recorded launch list in CI, a CUDA graph on a
//! GPU.

use bert_adapters::cuda::elementwise::{add, fill_f32};
use bert_adapters::cuda::gemm::{Gemm, Transpose};
use bert_adapters::cuda::gpu::{Gpu, GpuKind};
use bert_adapters::{test_device, Error};

/// A freed buffer's block is reused by the next allocation of its size class: no device
/// allocation; on the executor the reused block is poisoned again, as fresh memory is.
fn freed_blocks_are_reused(gpu: &Gpu) {
    let before = gpu.memory_stats();
    let first = gpu.upload(&[1.0f32; 300]).unwrap();
    let addr = first.view().device_ptr();
    let after_first = gpu.memory_stats();
    assert_eq!(after_first.device_allocations, before.device_allocations + 1);
    drop(first);
    assert_eq!(gpu.memory_stats().cached_bytes, after_first.cached_bytes + gpu_class(gpu, 1200));
    let again = gpu.alloc::<f32>(300).unwrap();
    let s = gpu.memory_stats();
    assert_eq!(again.view().device_ptr(), addr, "the freed block was not the one reused");
    assert_eq!(s.device_allocations, after_first.device_allocations, "a reuse reached the device allocator");
    assert_eq!(s.reused, after_first.reused + 1);
    if gpu.kind() == GpuKind::Sim {
        assert!(gpu.download(&again.view()).unwrap().iter().all(|v| v.to_bits() == 0x7fc0dead), "a reused block was not poisoned again");
    }
    // A different size class is a new allocation; the same count of another type of the same
    // bytes reuses.
    let other = gpu.alloc::<f32>(301).unwrap();
    assert_eq!(gpu.memory_stats().device_allocations, s.device_allocations + 1);
    drop(again);
    let as_u32 = gpu.alloc::<u32>(300).unwrap();
    assert_eq!(as_u32.view().device_ptr(), addr);
    drop((other, as_u32));
    // release_cached hands everything back: the next allocation is fresh again.
    gpu.release_cached();
    assert_eq!(gpu.memory_stats().cached_bytes, 0);
    let n = gpu.memory_stats().device_allocations;
    let _fresh = gpu.alloc::<f32>(300).unwrap();
    assert_eq!(gpu.memory_stats().device_allocations, n + 1);
}
test_device!(pool_reuse, freed_blocks_are_reused);

fn gpu_class(gpu: &Gpu, bytes: usize) -> usize {
    match gpu.kind() {
        GpuKind::Sim => bytes,
        GpuKind::Cuda => bytes.div_ceil(512) * 512,
    }
}

/// Kernels and a dense product recorded in a capture run only at replay, on whatever the input
/// buffers hold then; every replay gives the same bits as the same work launched directly.
fn capture_records_and_replays(gpu: &Gpu) {
    let (m, n, k) = (5, 7, 3);
    let a_host: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.25 - 1.0).collect();
    let b_host: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut a = gpu.upload(&a_host).unwrap();
    let b = gpu.upload(&b_host).unwrap();
    let mut c = gpu.alloc::<f32>(m * n).unwrap();
    let mut y = gpu.alloc::<f32>(m * n).unwrap();
    // Column-major D[m×n] = A[m×k]·B[k×n], as cuBLASLt reads them.
    let g = Gemm::new(Transpose::No, Transpose::No, m, n, k);
    // Warm-up (uncaptured), so the capture's scratch comes from the pool.
    let direct = |gpu: &Gpu, a: &bert_adapters::cuda::DeviceBuffer<f32>, c: &mut bert_adapters::cuda::DeviceBuffer<f32>, y: &mut bert_adapters::cuda::DeviceBuffer<f32>| {
        let mut scratch = gpu.alloc::<f32>(m * n).unwrap();
        fill_f32(gpu, &mut scratch.view_mut(), 0.5).unwrap();
        gpu.gemm(&g, &a.view(), &b.view(), &mut c.view_mut(), None).unwrap();
        add(gpu, &c.view(), &scratch.view(), &mut y.view_mut()).unwrap();
    };
    direct(gpu, &a, &mut c, &mut y);
    let want_first = gpu.download(&y.view()).unwrap();

    gpu.memset_zero(&mut y.view_mut()).unwrap();
    let allocations = gpu.memory_stats().device_allocations;
    gpu.begin_capture().unwrap();
    assert!(gpu.is_capturing());
    direct(gpu, &a, &mut c, &mut y);
    // Host transfers, synchronisation and fresh allocations are refused while capturing.
    assert!(matches!(gpu.download(&y.view()), Err(Error::Unsupported(_))));
    assert!(matches!(gpu.copy_htod(&a_host, &mut a.view_mut()), Err(Error::Unsupported(_))));
    assert!(matches!(gpu.synchronize(), Err(Error::Unsupported(_))));
    let miss = gpu.alloc::<f32>(12_345).unwrap_err();
    assert!(miss.to_string().contains("during a graph capture"), "{miss}");
    assert!(gpu.begin_capture().is_err(), "a second capture started inside the first");
    let graph = gpu.end_capture().unwrap();
    assert!(gpu.end_capture().is_err());
    assert_eq!(gpu.memory_stats().device_allocations, allocations, "the capture allocated device memory");
    if let Some(ops) = graph.recorded_ops() {
        assert_eq!(ops, 3, "fill, gemm, add");
    }
    assert!(graph.reserved_bytes() >= m * n * 4, "the scratch freed during the capture is reserved for the graph");
    // Nothing ran: y still holds the zeros written before the capture.
    assert!(gpu.download(&y.view()).unwrap().iter().all(|&v| v == 0.0), "captured work ran at capture time");
    // The scratch block is the graph's: an allocation of its size now is fresh, not the scratch.
    let during = gpu.memory_stats().device_allocations;
    let outside = gpu.alloc::<f32>(m * n).unwrap();
    assert_eq!(gpu.memory_stats().device_allocations, during + 1, "a block reserved by the graph was handed out");

    // SAFETY: a, b, c, y are alive; the scratch is held by the graph.
    unsafe { gpu.replay(&graph) }.unwrap();
    assert_eq!(gpu.download(&y.view()).unwrap(), want_first);
    // New inputs in the same buffer: the replay reads them.
    let a2: Vec<f32> = a_host.iter().map(|v| v * -2.0 + 0.125).collect();
    gpu.copy_htod(&a2, &mut a.view_mut()).unwrap();
    unsafe { gpu.replay(&graph) }.unwrap();
    let replayed = gpu.download(&y.view()).unwrap();
    direct(gpu, &a, &mut c, &mut y);
    assert_eq!(replayed, gpu.download(&y.view()).unwrap(), "a replay differs from the same work launched directly");
    assert_ne!(replayed, want_first);
    drop(outside);
    // Dropping the graph returns its blocks to the pool.
    let cached = gpu.memory_stats().cached_bytes;
    drop(graph);
    assert!(gpu.memory_stats().cached_bytes > cached);
}
test_device!(capture_replay, capture_records_and_replays);

/// A graph replays only on the Gpu that captured it.
fn replay_on_another_gpu_is_refused(gpu: &Gpu) {
    let mut y = gpu.alloc::<f32>(8).unwrap();
    fill_f32(gpu, &mut y.view_mut(), 1.0).unwrap();
    gpu.begin_capture().unwrap();
    fill_f32(gpu, &mut y.view_mut(), 2.0).unwrap();
    let graph = gpu.end_capture().unwrap();
    let other = gpu.reopen().unwrap();
    let err = unsafe { other.replay(&graph) }.unwrap_err();
    assert!(err.to_string().contains("another Gpu"), "{err}");
    unsafe { gpu.replay(&graph) }.unwrap();
    assert_eq!(gpu.download(&y.view()).unwrap(), vec![2.0; 8]);
}
test_device!(replay_elsewhere, replay_on_another_gpu_is_refused);
