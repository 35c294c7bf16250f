//! Kernel micro-benchmarks: `cargo bench --bench kernels`.
//!
//! Groups are `residual_layernorm/<rows>x<cols>` with `Throughput::Bytes` (x and residual read
//! once, y written once: the minimum traffic), so criterion reports GB/s:
//! - `cpu_reference`: the f64 spec (`cpu::reference`), for scale only;
//! - `cpu_fast`: the rayon path the CPU backend runs;
//! - `cuda`: the NVRTC kernel, timed with CUDA events around `iters` back-to-back launches on
//!   the runtime's stream (no host sync inside the loop, so launch overhead overlaps as it does
//!   in a model). Skipped, with a printed line, when there is no GPU.
//!
//! Runs are short on purpose (10 samples, 2 s measurement) so the bench fits a GPU session.

use std::hint::black_box;
use std::time::Duration;

use bert_adapters::cpu::{fast, reference};
use bert_adapters::Activation;
use bert_adapters::cuda::layernorm::{residual_layernorm_forward, LayerNormInputs, LayerNormOutputs};
use bert_adapters::cuda::probe::probe_gpu;
use bert_adapters::cuda::Gpu;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ROWS: usize = 4096;
const EPS: f32 = 1e-12;

fn gpu_runtime() -> Option<Gpu> {
    match probe_gpu(0).and_then(|_| Gpu::cuda(0).map_err(|e| e.to_string())) {
        Ok(rt) => Some(rt),
        Err(reason) => {
            println!("SKIPPED: cuda benchmarks: {reason}");
            None
        }
    }
}

fn residual_layernorm(c: &mut Criterion) {
    let gpu = gpu_runtime();
    let mut rng = StdRng::seed_from_u64(42);
    for cols in [384usize, 768] {
        let n = ROWS * cols;
        let mut v = |len: usize| (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect::<Vec<f32>>();
        let (x, residual, gamma, beta) = (v(n), v(n), v(cols), v(cols));

        let mut group = c.benchmark_group(format!("residual_layernorm/{ROWS}x{cols}"));
        group.throughput(Throughput::Bytes((3 * n * std::mem::size_of::<f32>()) as u64));
        group.bench_function("cpu_reference", |b| {
            b.iter(|| reference::residual_layernorm(black_box(&x), Some(black_box(&residual)), &gamma, &beta, cols, EPS))
        });
        group.bench_function("cpu_fast", |b| {
            b.iter(|| fast::residual_layernorm(black_box(&x), Some(black_box(&residual)), &gamma, &beta, cols, EPS))
        });
        if let Some(g) = &gpu {
            bench_cuda(&mut group, g, &x, &residual, &gamma, &beta, cols);
        }
        group.finish();
    }
}

fn bench_cuda(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    gpu: &Gpu,
    x: &[f32],
    residual: &[f32],
    gamma: &[f32],
    beta: &[f32],
    cols: usize,
) {
    let up = |v: &[f32]| gpu.upload(v).expect("upload");
    let (dx, dres, dgamma, dbeta) = (up(x), up(residual), up(gamma), up(beta));
    let mut dy = gpu.alloc_zeros::<f32>(x.len()).expect("alloc y");
    let mut dmean = gpu.alloc_zeros::<f32>(ROWS).expect("alloc mean");
    let mut drstd = gpu.alloc_zeros::<f32>(ROWS).expect("alloc rstd");
    let inputs = LayerNormInputs { x: dx.view(), residual: Some(dres.view()), gamma: dgamma.view(), beta: dbeta.view(), rows: ROWS, cols, eps: EPS };
    let mut outputs = LayerNormOutputs { y: dy.view_mut(), mean: dmean.view_mut(), rstd: drstd.view_mut() };
    // Compile, load and warm the kernel outside the timed region.
    residual_layernorm_forward(gpu, &inputs, &mut outputs).expect("first launch");
    gpu.synchronize().expect("sync");

    // CUDA events around the launches: GPU time, not host enqueue time.
    group.bench_function("cuda", |b| {
        b.iter_custom(|iters| {
            let start = gpu.record_event().expect("event");
            for _ in 0..iters {
                residual_layernorm_forward(gpu, &inputs, &mut outputs).expect("launch");
            }
            let end = gpu.record_event().expect("event");
            let ms = gpu.elapsed_ms(&start, &end).expect("elapsed");
            Duration::from_secs_f64(ms as f64 / 1e3)
        })
    });
}

/// The dense products of a MiniLM Parallel step (2 branches × 16 × 64 rows): QKV, attention
/// output, FFN in and out. `Throughput::Elements` counts floating-point operations (2·m·n·k), so
/// criterion's `elem/s` reads as FLOP/s.
fn linear(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(7);
    let rows = 2048;
    for (d_in, d_out) in [(384usize, 1152usize), (384, 384), (384, 1536), (1536, 384)] {
        let mut v = |len: usize| (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<f32>>();
        let (x, w, b) = (v(rows * d_in), v(d_out * d_in), v(d_out));
        let mut group = c.benchmark_group(format!("linear/{rows}x{d_in}x{d_out}"));
        group.throughput(Throughput::Elements((2 * rows * d_in * d_out) as u64));
        group.bench_function("cpu_fast", |bn| bn.iter(|| fast::linear(black_box(&x), &w, Some(&b), rows, d_in, d_out)));
        group.finish();
    }
}

/// GELU forward and backward over one FFN activation of the MiniLM step (2048 × 1536),
/// `Throughput::Elements`: the vectorised fast path against the f64 reference.
fn gelu(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(9);
    let n = 2048 * 1536;
    let x: Vec<f32> = (0..n).map(|_| rng.random_range(-4.0f32..4.0)).collect();
    let dy: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let mut group = c.benchmark_group("gelu/2048x1536");
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function("cpu_fast_forward", |b| b.iter(|| fast::activation(black_box(&x), Activation::Gelu)));
    group.bench_function("cpu_fast_backward", |b| b.iter(|| fast::activation_backward(black_box(&dy), &x, Activation::Gelu)));
    group.bench_function("cpu_reference_forward", |b| b.iter(|| reference::activation(black_box(&x), Activation::Gelu)));
    group.finish();
}

/// Attention on a packed QKV product at the MiniLM Parallel shape (32 sequences of 64 tokens,
/// 12 heads of 32), forward and backward, `Throughput::Elements` = the four T×T×d products'
/// FLOPs (forward) and the five of the backward.
fn attention(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(10);
    let (batch, seq, hidden, heads) = (32usize, 64usize, 384usize, 12usize);
    let qkv: Vec<f32> = (0..batch * seq * 3 * hidden).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let mask = vec![0f32; batch * seq];
    let (q, k, v) = (&qkv[..], &qkv[hidden..], &qkv[2 * hidden..]);
    let mut group = c.benchmark_group("attention/32x64x384");
    group.throughput(Throughput::Elements((4 * batch * seq * seq * hidden) as u64));
    group.bench_function("cpu_fast_forward", |b| b.iter(|| fast::attention_strided(black_box(q), k, v, 3 * hidden, &mask, batch, seq, hidden, heads, None)));
    group.finish();
}

/// Training dropout (Philox4x32-10 per 4 elements) over one hidden-state tensor of the MiniLM
/// Parallel step (2048 × 384), in place, `Throughput::Elements`.
fn dropout(c: &mut Criterion) {
    use bert_adapters::train::{dropout_forward, DropoutRng};
    let n = 2048 * 384;
    let mut x = vec![1f32; n];
    let rng = DropoutRng::new(42);
    let mut group = c.benchmark_group("dropout/2048x384");
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function("cpu_fast", |b| b.iter(|| dropout_forward(black_box(&mut x), 0.1, &rng, 7).expect("valid p")));
    group.finish();
}

criterion_group! {
    name = kernels;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = residual_layernorm, linear, gelu, attention, dropout
}
criterion_main!(kernels);
