//! CUDA benchmarks (issue 15): the kernel families and the whole training step, on a GPU or on
//! the `cuda-sim` executor.
//!
//! ```text
//! cargo bench --bench cuda                                   # a GPU (device 0) when there is one
//! cargo bench --bench cuda --features cuda-sim -- --test     # each bench once, tiny shapes, on cuda-sim
//! cargo bench --bench cuda --features cuda-sim               # timed on cuda-sim (wall time; tiny shapes)
//! ```
//!
//! Device (`CUDA_BENCH_DEVICE`): `auto` (the default: device 0 when a GPU and its driver are
//! there, else cuda-sim when this binary was built with the feature, else a printed reason and
//! exit 0), `cuda` (device 0 or exit 1) or `cuda-sim` (the executor or exit 1).
//!
//! Shapes (`CUDA_BENCH_SHAPES`): `real` (the default on a GPU: BERT-base widths, N = 4096 and
//! 65536 tokens for the row-wise kernels, attention at 32×128 and 8×512, the step at BERT-base
//! 32×128 and 8×512 and MiniLM 16×64) or `tiny` (the default on cuda-sim: H = 64, a few dozen
//! tokens, a 2-layer BERT). `CUDA_BENCH_ROWS=4096,65536` overrides the row-wise kernels' token
//! counts (each a multiple of the shape's sequence length).
//!
//! Timing: criterion's `iter_custom` with two [`Gpu::record_event`]s around `iters` back-to-back
//! launches and [`Gpu::elapsed_ms`] (GPU time, no host synchronisation inside the loop, so the
//! launch cost overlaps as in a model; a step's own host work counts where it is slower than the
//! GPU). On cuda-sim the events are host instants: wall time of the CPU executor, useful only to
//! keep the benches running (`-- --test` in CI-like checks), never as a GPU figure.
//!
//! Groups (criterion ids `<group>/<shape>/<function>`), each with a `Throughput`:
//! - `adapter_location/<B>x<T>`: one pfeiffer location (relu, r = H/16), `fused` (one launch)
//!   and `split` (pre kernel, the two bottleneck products on cuBLASLt, post kernel:
//!   `LocationPath::Split`; `split_unstaged` the same with `RowStaging::Off`; `split_tf32` with
//!   its two products on TF32 tensor cores, as the 16-bit pipelines run them) against `unfused`
//!   (add, LayerNorm, GEMM, bias+ReLU, GEMM, bias, add,
//!   add, LayerNorm: the eager sequence from the existing launchers). Bytes: h and r read, out
//!   written once.
//! - `adapter_location_bf16/<B>x<T>`: a Parallel layer's location (two pfeiffer branches) in the
//!   bf16 pipeline, the split forward with its products on TF32 (`split_tf32`, the default)
//!   against the split forward on tensor cores (`split_mma`: `SplitForward::TensorCores`, two
//!   launches, no GEMM). Bytes: h and r read, out written, in bf16.
//! - `adapter_location_backward/<model>_<B>x<T>`: its backward with the branch trainable and the
//!   input gradients needed, `fused` (the one-launch kernel) against `split` (row kernels around
//!   the products and weight gradients on cuBLASLt: `LocationPath::Split`, its row kernels
//!   staging their rows in shared memory), `split_unstaged` (the same with `RowStaging::Off`),
//!   `split_tf32` (its products on TF32 tensor cores) and `split_two_warps_a_row` (its row kernels
//!   with a block of 64 threads a row instead of a warp), at BERT-base 32×128 and MiniLM 16×64 (H = 384, r = 24; tiny: H = 64 and 40). Bytes: d_out,
//!   h, r read, dh, dr written.
//! - `adapter_location_backward_bf16/<B>x<T>`: the backward of `adapter_location_bf16`'s location
//!   (both branches trainable, input gradients), `split_tf32` (the recompute's pre kernel and
//!   GEMMs on TF32) against `split_mma` (the recompute on tensor cores, as after `split_mma`'s
//!   forward: `adapter_split_bwd_pre_down_*` and `adapter_split_bwd_up_*`). Bytes: d_out, h, r
//!   read, dh, dr written, in bf16.
//! - `adapter_branches/<B>x<T>` (inputs already replicated, `[2·B, T, H]`) and
//!   `adapter_branches_shared/<B>x<T>` (the first adapter layer: both branches read one `[B, T, H]`
//!   input): two pfeiffer branches in `one_launch` against `two_launches` (fused) and `split`.
//! - `residual_layernorm/<B>x<T>`: `forward` (inference: y, mean, rstd) and `forward_train`
//!   (y, z = x + r, stats); `layernorm_backward/<B>x<T>`: dz from dy, z, stats (γ frozen).
//! - `attention/<B>x<T>`: fused `forward` and `backward` over a packed QKV, 12 heads of 64 (tiny:
//!   4 of 16), 20 % padding, against the GEMM path (`gemm_forward`, `gemm_backward`:
//!   `AttentionPath::Gemm`, batched GEMMs plus row kernels), each in f32 and with bf16 storage
//!   (`bf16_*`), and `bf16_mma_forward` / `bf16_mma_backward` (`AttentionPath::TensorCores`:
//!   the GEMM forward in one tensor-core kernel, and the GEMM backward in two; T <= 512 (past 128
//!   in key tiles, at 8×512) and d 16, 32 or 64, so at the tiny shapes too); FLOPs 4·B·T²·H forward, 8·B·T²·H backward (no recompute counted).
//! - `train_step/<model>_<B>x<T>`: the training step `train` runs — Parallel(scorenn, tasknn),
//!   pfeiffer adapters, 3-class heads, dropout on (a new seed each step), 20 % padding, tasknn
//!   and scorenn alternating every 10 steps with their own objectives and AdamW — `launched`
//!   (`BertModel::train_step`) against `replayed` (`replay_train_step` of a graph captured per
//!   adapter), in f32 (activations and base), and `bf16_launched` / `bf16_replayed`: the same step
//!   in bf16 (base, activations and activation gradients bf16; adapters, heads, gradients and
//!   AdamW f32), `train`'s default on a GPU; `f16_launched`: the same in f16, loss-scaled at
//!   `train --precision f16`'s first scale (2^16). Variants of `bf16_replayed`:
//!   `bf16_replayed_share` (`FrozenRows::Share`: the tape keeps views of tasknn's rows, no
//!   copies) and `bf16_replayed_cublaslt` (`LinearEpilogue::Cublaslt`: the frozen Linears' biases
//!   added by cuBLASLt, as PyTorch does), and `bf16_replayed_share_cublaslt` with both;
//!   `bf16_replayed_mma` (every tensor-core kernel: `SplitForward::TensorCores`, each adapter
//!   location's forward in two tensor-core kernels, z and up never in memory, and its backward's
//!   recompute in two more; and `AttentionPath::TensorCores`, the attention forward in one and
//!   its backward in two). Throughput: B·T positions (padding included) per step.
//!   Random weights (N(0, 0.02) like BERT's init, uniform).
//!
//! Setup (weights, buffers, the warm-up launch that compiles and loads each kernel) happens on a
//! benchmark's first call, so a criterion filter skips the setup of what it leaves out. After
//! each timed step benchmark the last step's loss is read once (outside the timing) and a
//! non-finite value is reported.

#[allow(dead_code)]
#[path = "../tests/support/adapter_location.rs"]
mod adapter_location;

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use adapter_location::{BranchSpec, DeviceBranch, HostBranch, PFEIFFER};
use bert_adapters::cuda::adapter::{
    adapter_location_backward, adapter_location_backward_split, adapter_location_backward_split_with_plan, adapter_location_forward, adapter_location_forward_split,
    adapter_location_forward_split_with_plan, backward_workspace_len, split_backward_plan_auto, BranchGrads, LocationBackwardOutputs, LocationBackwardWorkspace,
    LocationDescriptors, LocationInputs, LocationOutputs, LocationPath, LocationPlan, LocationShape, RowStaging, SplitForward,
};
use bert_adapters::cuda::attention::{attention_backward_workspace_len, attention_packed_backward_with, attention_packed_forward, AttentionBackwardPlan};
use bert_adapters::cuda::attention_gemm::{attention_gemm_backward, attention_gemm_forward, attention_mma_backward, attention_mma_forward, AttentionPath};
use bert_adapters::cuda::backend::{CudaBackend, LinearEpilogue};
use bert_adapters::cuda::elementwise::{add, bias_act};
use bert_adapters::cuda::gemm::{Gemm, GemmScalar, SurveyOptions, Transpose};
use bert_adapters::cuda::gpu::{ActivationScalar, DeviceBuffer};
use half::bf16;
use bert_adapters::cuda::layernorm::{
    layernorm_backward, residual_layernorm_forward, residual_layernorm_forward_train, LayerNormBackwardInputs, LayerNormInputs, LayerNormOutputs, LayerNormTrainOutputs,
};
use bert_adapters::cuda::probe::probe_gpu;
use bert_adapters::cuda::{Gpu, GpuKind};
use bert_adapters::model::graph::TrainStepGraph;
use bert_adapters::model::FrozenRows;
use bert_adapters::model::heads::HeadConfig;
use bert_adapters::model::step::{TrainStepConfig, TrainStepOutput};
use bert_adapters::profile::ProfiledBackend;
use bert_adapters::train::{AdamW, AdamWConfig, Objective};
use bert_adapters::io::LayerWeights;
use bert_adapters::{Activation, AdapterConfig, AdapterSetup, Backend, BertConfig, BertModel, BertWeights, DType, HiddenAct, InputBatch, Tensor};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::SeedableRng;

const F32: usize = std::mem::size_of::<f32>();
/// BERT's LayerNorm eps.
const EPS: f32 = 1e-12;
/// `train`'s default: each adapter trains for this many steps, then the other.
const ALTERNATE: u64 = 10;
/// `train`'s clipping (its objectives are `Objective::TASKNN` and `Objective::SCORENN`).
const MAX_GRAD_NORM: f32 = 1.0;

/// Benchmarks (a family, or one step shape) that panicked: reported, and the exit status is 1.
static FAILED: AtomicUsize = AtomicUsize::new(0);

/// Runs `f`; a panic (a failed launch, a missing graph) is reported and counted, and the
/// benchmarks after it still run.
fn guarded(what: &str, f: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        FAILED.fetch_add(1, Ordering::SeqCst);
        println!("FAILED: {what} (the panic message is above); continuing with the next benchmarks");
    }
}

// ---- device and shapes ---------------------------------------------------------------------------

struct Bench {
    backend: Arc<CudaBackend>,
    shapes: Shapes,
}

impl Bench {
    fn gpu(&self) -> &Gpu {
        self.backend.gpu()
    }
}

/// Model dimensions of a step benchmark.
#[derive(Clone, Copy, Debug)]
struct Dims {
    name: &'static str,
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    intermediate: usize,
    max_positions: usize,
}

const BERT_BASE: Dims = Dims { name: "bert_base", vocab: 30522, hidden: 768, layers: 12, heads: 12, intermediate: 3072, max_positions: 512 };
const MINILM: Dims = Dims { name: "minilm", vocab: 30522, hidden: 384, layers: 6, heads: 12, intermediate: 1536, max_positions: 512 };
const TINY: Dims = Dims { name: "tiny", vocab: 128, hidden: 64, layers: 2, heads: 4, intermediate: 128, max_positions: 64 };

#[derive(Clone, Debug)]
struct Shapes {
    label: &'static str,
    /// Row-wise kernels (adapter location, LayerNorm): (B, T) pairs.
    rows: Vec<(usize, usize)>,
    /// Attention: (B, T) pairs.
    attention: Vec<(usize, usize)>,
    hidden: usize,
    heads: usize,
    /// The pfeiffer bottleneck at `hidden` (reduction factor 16).
    bottleneck: usize,
    steps: Vec<(Dims, usize, usize)>,
    /// The adapter location's backward: (model name, H, bottleneck, B, T).
    location_backward: Vec<(&'static str, usize, usize, usize, usize)>,
}

impl Shapes {
    fn real() -> Shapes {
        Shapes {
            label: "real",
            rows: vec![(32, 128), (512, 128)],
            attention: vec![(32, 128), (8, 512)],
            hidden: 768,
            heads: 12,
            bottleneck: 48,
            steps: vec![(BERT_BASE, 32, 128), (BERT_BASE, 8, 512), (MINILM, 16, 64)],
            location_backward: vec![("bert_base", 768, 48, 32, 128), ("minilm", 384, 24, 16, 64)],
        }
    }

    fn tiny() -> Shapes {
        Shapes {
            label: "tiny",
            rows: vec![(2, 16)],
            attention: vec![(2, 16), (1, 32)],
            hidden: 64,
            heads: 4,
            bottleneck: 4,
            steps: vec![(TINY, 2, 16), (TINY, 1, 32), (TINY, 4, 8)],
            location_backward: vec![("tiny", 64, 4, 2, 16), ("tiny_h40", 40, 3, 2, 8)],
        }
    }

    /// `CUDA_BENCH_ROWS=4096,65536`: token counts for the row-wise kernels, split as (N/T, T)
    /// with T the first row shape's sequence length.
    fn with_rows_from_env(mut self) -> Shapes {
        let Ok(list) = std::env::var("CUDA_BENCH_ROWS") else { return self };
        let t = self.rows[0].1;
        let mut rows = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item.parse::<usize>() {
                Ok(n) if n > 0 && n % t == 0 => rows.push((n / t, t)),
                _ => exit_with(&format!("CUDA_BENCH_ROWS: `{item}` is not a positive multiple of the sequence length {t}")),
            }
        }
        if !rows.is_empty() {
            self.rows = rows;
        }
        self
    }
}

fn exit_with(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1)
}

#[cfg(feature = "cuda-sim")]
fn sim() -> Option<Gpu> {
    Some(Gpu::sim(bert_adapters::cuda::gpu::SimConfig::default()))
}

#[cfg(not(feature = "cuda-sim"))]
fn sim() -> Option<Gpu> {
    None
}

/// The device `CUDA_BENCH_DEVICE` asks for (see the module docs), or `None` after printing why
/// there is none.
fn open() -> Option<Bench> {
    let want = std::env::var("CUDA_BENCH_DEVICE").unwrap_or_default();
    let gpu = match want.as_str() {
        "cuda" => Gpu::cuda(0).unwrap_or_else(|e| exit_with(&format!("CUDA_BENCH_DEVICE=cuda, but device 0 cannot be opened: {e}"))),
        "cuda-sim" => sim().unwrap_or_else(|| exit_with("CUDA_BENCH_DEVICE=cuda-sim, but this bench was built without the `cuda-sim` feature (add --features cuda-sim)")),
        "" | "auto" => match probe_gpu(0) {
            Ok(_) => Gpu::cuda(0).unwrap_or_else(|e| exit_with(&format!("a GPU was probed but device 0 cannot be opened: {e}"))),
            Err(reason) => match sim() {
                Some(g) => g,
                None => {
                    println!("SKIPPED: cuda benchmarks: no GPU ({reason}) and built without the `cuda-sim` feature (add --features cuda-sim to run them on the executor)");
                    return None;
                }
            },
        },
        other => exit_with(&format!("CUDA_BENCH_DEVICE must be auto, cuda or cuda-sim, not `{other}`")),
    };
    let shapes = match std::env::var("CUDA_BENCH_SHAPES").unwrap_or_default().as_str() {
        "real" => Shapes::real(),
        "tiny" => Shapes::tiny(),
        "" if gpu.kind() == GpuKind::Cuda => Shapes::real(),
        "" => Shapes::tiny(),
        other => exit_with(&format!("CUDA_BENCH_SHAPES must be real or tiny, not `{other}`")),
    }
    .with_rows_from_env();
    println!("cuda benchmarks on {} with {} shapes", gpu.describe(), shapes.label);
    Some(Bench { backend: Arc::new(CudaBackend::on(gpu)), shapes })
}

// ---- helpers -------------------------------------------------------------------------------------

/// SplitMix64: fast enough to fill BERT-base's 110 M weights.
struct Fill(u64);

impl Fill {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

fn upload(gpu: &Gpu, v: &[f32]) -> DeviceBuffer<f32> {
    gpu.upload(v).expect("upload")
}

fn zeros(gpu: &Gpu, n: usize) -> DeviceBuffer<f32> {
    gpu.alloc_zeros::<f32>(n).expect("device allocation")
}

/// Real-token lengths of a padded batch: row i keeps `T − ⌊0.4·T·i/B⌋` tokens, so row 0 is full
/// (the batch stays T long) and about 20 % of the positions are padding. tools/bench_torch.py
/// uses the same rule.
fn lengths(batch: usize, seq: usize) -> Vec<usize> {
    (0..batch).map(|i| (seq - (2 * seq * i) / (5 * batch)).max(1)).collect()
}

/// The additive attention mask of [`lengths`]: 0 on real tokens, `f32::MIN` on padding (the
/// model's `mask_bias`).
fn mask_bias(batch: usize, seq: usize) -> Vec<f32> {
    lengths(batch, seq).into_iter().flat_map(|n| (0..seq).map(move |j| if j < n { 0.0 } else { f32::MIN })).collect()
}

/// `iters` runs of `f` between two device events: GPU time (host time on cuda-sim).
fn timed(gpu: &Gpu, iters: u64, mut f: impl FnMut()) -> Duration {
    let start = gpu.record_event().expect("record_event");
    for _ in 0..iters {
        f();
    }
    let end = gpu.record_event().expect("record_event");
    let ms = gpu.elapsed_ms(&start, &end).expect("elapsed_ms");
    Duration::from_secs_f64(ms as f64 / 1e3)
}

/// A criterion function whose state is built on its first call (a filtered-out benchmark builds
/// nothing), then timed with [`timed`].
/// A panic (a failed launch) is reported with the group and id and counted ([`guarded`]).
fn bench_lazy<S>(group: &mut BenchmarkGroup<'_, WallTime>, gpu: &Gpu, id: &str, setup: impl Fn() -> S, mut run: impl FnMut(&mut S)) {
    let mut state: Option<S> = None;
    let what = format!("{} {id}", GROUP.with_borrow(|g| g.clone()));
    guarded(&what, || {
        group.bench_function(id, |b| {
            let s = state.get_or_insert_with(|| {
                let mut s = setup();
                // Compile and load every kernel the run uses, outside the timing.
                run(&mut s);
                gpu.synchronize().expect("synchronize");
                s
            });
            b.iter_custom(|iters| timed(gpu, iters, || run(s)))
        });
    });
}

thread_local! {
    /// The group being benchmarked, for [`bench_lazy`]'s failure reports.
    static GROUP: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// `c.benchmark_group(name)`, remembering the name for failure reports.
fn new_group<'a>(c: &'a mut Criterion, name: String) -> BenchmarkGroup<'a, WallTime> {
    GROUP.with_borrow_mut(|g| g.clone_from(&name));
    c.benchmark_group(name)
}

fn shape_name(b: usize, t: usize) -> String {
    format!("{b}x{t}")
}

// ---- the adapter location ------------------------------------------------------------------------

/// One location's inputs and branch weights on the device.
struct Location {
    rows: usize,
    hidden: usize,
    bottleneck: usize,
    shape: LocationShape,
    h: DeviceBuffer<f32>,
    r: DeviceBuffer<f32>,
    gamma: DeviceBuffer<f32>,
    beta: DeviceBuffer<f32>,
    out: DeviceBuffer<f32>,
    /// The descriptors of all branches, and of each alone (same weights).
    all: LocationDescriptors<'static>,
    each: Vec<LocationDescriptors<'static>>,
    // Declared after the descriptors that point into them.
    branches: Vec<DeviceBranch>,
}

impl Location {
    /// `branches` pfeiffer branches over `[B, T, H]` inputs (`replicate`) or `[N·B, T, H]`.
    fn new(gpu: &Gpu, s: &Shapes, (batch, seq): (usize, usize), branches: usize, replicate: bool) -> Location {
        let (hidden, m) = (s.hidden, s.bottleneck);
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let mut fill = Fill(7);
        let rows_in = if replicate { batch * seq } else { branches * batch * seq };
        let host: Vec<HostBranch> = (0..branches).map(|_| HostBranch::random(&mut rng, hidden, BranchSpec::plain(m, Activation::Relu))).collect();
        let dev: Vec<DeviceBranch> = host.iter().map(|b| DeviceBranch::upload(gpu, b)).collect();
        // SAFETY: `branches` (the weights) lives in the same struct as the descriptors and is
        // never changed or dropped before them.
        let all = unsafe { LocationDescriptors::new(gpu, hidden, PFEIFFER, &dev.iter().map(DeviceBranch::weights).collect::<Vec<_>>()).expect("descriptors").detach() };
        let each = dev.iter().map(|d| unsafe { LocationDescriptors::new(gpu, hidden, PFEIFFER, &[d.weights()]).expect("descriptors").detach() }).collect();
        Location {
            rows: batch * seq,
            hidden,
            bottleneck: m,
            shape: LocationShape { batch, seq_len: seq, hidden, branches, replicate },
            h: upload(gpu, &fill.vec(rows_in * hidden, -1.0, 1.0)),
            r: upload(gpu, &fill.vec(rows_in * hidden, -1.0, 1.0)),
            gamma: upload(gpu, &fill.vec(hidden, 0.5, 1.5)),
            beta: upload(gpu, &fill.vec(hidden, -0.5, 0.5)),
            out: zeros(gpu, branches * batch * seq * hidden),
            all,
            each,
            branches: dev,
        }
    }

    fn inputs(&self) -> LocationInputs<'_> {
        LocationInputs { h: self.h.view(), r: self.r.view(), ln_gamma: self.gamma.view(), ln_beta: self.beta.view(), ln_eps: EPS, dropout_seed: None }
    }

    /// This location with its split-path products on TF32 tensor cores (the 16-bit pipelines').
    fn with_tf32_products(mut self) -> Location {
        self.all.set_tf32_products(true);
        self
    }

    /// All branches in one launch.
    fn fused(&mut self, gpu: &Gpu) {
        let inputs = LocationInputs { h: self.h.view(), r: self.r.view(), ln_gamma: self.gamma.view(), ln_beta: self.beta.view(), ln_eps: EPS, dropout_seed: None };
        let mut outputs = LocationOutputs { out: self.out.view_mut(), gate: None };
        adapter_location_forward(gpu, &inputs, &self.all, &mut outputs, self.shape).expect("adapter_location_forward");
    }

    /// All branches on the split path: pre kernel, two GEMMs per branch, post kernel.
    fn split(&mut self, gpu: &Gpu) {
        let inputs = LocationInputs { h: self.h.view(), r: self.r.view(), ln_gamma: self.gamma.view(), ln_beta: self.beta.view(), ln_eps: EPS, dropout_seed: None };
        let mut outputs = LocationOutputs { out: self.out.view_mut(), gate: None };
        adapter_location_forward_split(gpu, &inputs, &self.all, &mut outputs, self.shape).expect("adapter_location_forward_split");
    }

    /// As [`Location::split`] with the row kernels reading every row from global memory in each
    /// pass (`RowStaging::Off`): what the staging gains.
    fn split_unstaged(&mut self, gpu: &Gpu) {
        let inputs = LocationInputs { h: self.h.view(), r: self.r.view(), ln_gamma: self.gamma.view(), ln_beta: self.beta.view(), ln_eps: EPS, dropout_seed: None };
        let mut outputs = LocationOutputs { out: self.out.view_mut(), gate: None };
        let plan = LocationPlan::auto(self.hidden, 0);
        adapter_location_forward_split_with_plan(gpu, &inputs, &self.all, &mut outputs, self.shape, plan, RowStaging::Off).expect("adapter_location_forward_split");
    }

    /// One launch per branch, each over its rows (or the shared rows when replicating).
    fn per_branch(&mut self, gpu: &Gpu) {
        let block = self.rows * self.hidden;
        let one = LocationShape { branches: 1, replicate: false, ..self.shape };
        for (i, desc) in self.each.iter().enumerate() {
            let at = if self.shape.replicate { 0 } else { i * block };
            let inputs = LocationInputs {
                h: self.h.slice(at..at + block).expect("slice"),
                r: self.r.slice(at..at + block).expect("slice"),
                ln_gamma: self.gamma.view(),
                ln_beta: self.beta.view(),
                ln_eps: EPS,
                dropout_seed: None,
            };
            let mut outputs = LocationOutputs { out: self.out.slice_mut(i * block..(i + 1) * block).expect("slice"), gate: None };
            adapter_location_forward(gpu, &inputs, desc, &mut outputs, one).expect("adapter_location_forward");
        }
    }
}

/// The location of a Parallel layer in the bf16 pipeline: two pfeiffer branches over their own
/// rows, bf16 h, r, out and LayerNorm (the `_bf16io` kernels), f32 adapter weights, the split
/// path's products on TF32 (that pipeline's default) or the whole split forward on tensor cores.
struct HalfLocation {
    loc: Location,
    h: DeviceBuffer<bf16>,
    r: DeviceBuffer<bf16>,
    gamma: DeviceBuffer<bf16>,
    beta: DeviceBuffer<bf16>,
    out: DeviceBuffer<bf16>,
}

impl HalfLocation {
    fn new(gpu: &Gpu, s: &Shapes, bt: (usize, usize), forward: SplitForward) -> HalfLocation {
        let mut loc = Location::new(gpu, s, bt, 2, false).with_tf32_products();
        loc.all.set_split_forward(forward);
        let half = |b: &DeviceBuffer<f32>| -> DeviceBuffer<bf16> {
            let v: Vec<bf16> = gpu.download(&b.view()).expect("download").iter().map(|&x| bf16::from_f32(x)).collect();
            gpu.upload(&v).expect("upload")
        };
        let (h, r, gamma, beta) = (half(&loc.h), half(&loc.r), half(&loc.gamma), half(&loc.beta));
        let out = gpu.alloc_zeros::<bf16>(loc.out.len()).expect("device allocation");
        HalfLocation { loc, h, r, gamma, beta, out }
    }

    fn split(&mut self, gpu: &Gpu) {
        let inputs = LocationInputs { h: self.h.view(), r: self.r.view(), ln_gamma: self.gamma.view(), ln_beta: self.beta.view(), ln_eps: EPS, dropout_seed: None };
        let mut outputs = LocationOutputs { out: self.out.view_mut(), gate: None };
        adapter_location_forward_split(gpu, &inputs, &self.loc.all, &mut outputs, self.loc.shape).expect("adapter_location_forward_split");
    }
}

/// The same location as the eager sequence of separate launches (one branch, pfeiffer):
/// v = h + r; x = LN(v); z = relu(x·Wdᵀ + bd); u = z·Wuᵀ + bu; y = u + h; out = LN(y + r).
struct Unfused {
    loc: Location,
    v: DeviceBuffer<f32>,
    x: DeviceBuffer<f32>,
    z0: DeviceBuffer<f32>,
    z: DeviceBuffer<f32>,
    u0: DeviceBuffer<f32>,
    u: DeviceBuffer<f32>,
    mean: DeviceBuffer<f32>,
    rstd: DeviceBuffer<f32>,
}

impl Unfused {
    fn new(gpu: &Gpu, s: &Shapes, bt: (usize, usize)) -> Unfused {
        let loc = Location::new(gpu, s, bt, 1, false);
        let (n, h, m) = (loc.rows, loc.hidden, loc.bottleneck);
        Unfused {
            v: zeros(gpu, n * h),
            x: zeros(gpu, n * h),
            z0: zeros(gpu, n * m),
            z: zeros(gpu, n * m),
            u0: zeros(gpu, n * h),
            u: zeros(gpu, n * h),
            mean: zeros(gpu, n),
            rstd: zeros(gpu, n),
            loc,
        }
    }

    fn run(&mut self, gpu: &Gpu) {
        let Unfused { loc, v, x, z0, z, u0, u, mean, rstd } = self;
        let (n, h, m) = (loc.rows, loc.hidden, loc.bottleneck);
        let (gamma, beta) = (loc.gamma.view(), loc.beta.view());
        let mut layernorm = |x: &DeviceBuffer<f32>, y: &mut DeviceBuffer<f32>| {
            let inputs = LayerNormInputs { x: x.view(), residual: None, gamma, beta, rows: n, cols: h, eps: EPS };
            let mut outputs = LayerNormOutputs { y: y.view_mut(), mean: mean.view_mut(), rstd: rstd.view_mut() };
            residual_layernorm_forward(gpu, &inputs, &mut outputs).expect("layernorm");
        };
        let w = &loc.branches[0];
        add(gpu, &loc.h.view(), &loc.r.view(), &mut v.view_mut()).expect("add");
        layernorm(v, x);
        gpu.gemm(&Gemm::new(Transpose::Yes, Transpose::No, m, n, h), &w.down_w.view(), &x.view(), &mut z0.view_mut(), None).expect("gemm");
        bias_act(gpu, &z0.view(), Some(&w.down_b.view()), Some(Activation::Relu), m, &mut z.view_mut(), None).expect("bias_act");
        gpu.gemm(&Gemm::new(Transpose::Yes, Transpose::No, h, n, m), &w.up_w.view(), &z.view(), &mut u0.view_mut(), None).expect("gemm");
        bias_act(gpu, &u0.view(), Some(&w.up_b.view()), None, h, &mut u.view_mut(), None).expect("bias_act");
        // y = u + h (the adapter residual) into u0, then y + r (the location's residual) into u.
        add(gpu, &u.view(), &loc.h.view(), &mut u0.view_mut()).expect("add");
        add(gpu, &u0.view(), &loc.r.view(), &mut u.view_mut()).expect("add");
        layernorm(u, &mut loc.out);
    }
}

fn adapter_location(c: &mut Criterion, bench: &Bench) {
    let (gpu, s) = (bench.gpu(), &bench.shapes);
    for &bt in &s.rows {
        let n = bt.0 * bt.1;
        let mut group = new_group(c, format!("adapter_location/{}", shape_name(bt.0, bt.1)));
        group.throughput(Throughput::Bytes((3 * n * s.hidden * F32) as u64));
        bench_lazy(&mut group, gpu, "fused", || Location::new(gpu, s, bt, 1, false), |l| l.fused(gpu));
        bench_lazy(&mut group, gpu, "split", || Location::new(gpu, s, bt, 1, false), |l| l.split(gpu));
        bench_lazy(&mut group, gpu, "split_unstaged", || Location::new(gpu, s, bt, 1, false), |l| l.split_unstaged(gpu));
        bench_lazy(&mut group, gpu, "split_tf32", || Location::new(gpu, s, bt, 1, false).with_tf32_products(), |l| l.split(gpu));
        bench_lazy(&mut group, gpu, "unfused", || Unfused::new(gpu, s, bt), |u| u.run(gpu));
        group.finish();
        // The bf16 pipeline's location of a Parallel layer: the split forward with its products
        // on TF32 against the whole split forward on tensor cores. Bytes: h, r read, out written
        // (bf16, both branches).
        let mut group = new_group(c, format!("adapter_location_bf16/{}", shape_name(bt.0, bt.1)));
        group.throughput(Throughput::Bytes((3 * 2 * n * s.hidden * 2) as u64));
        bench_lazy(&mut group, gpu, "split_tf32", || HalfLocation::new(gpu, s, bt, SplitForward::Gemm), |l| l.split(gpu));
        bench_lazy(&mut group, gpu, "split_mma", || HalfLocation::new(gpu, s, bt, SplitForward::TensorCores), |l| l.split(gpu));
        group.finish();
    }
}

fn adapter_branches(c: &mut Criterion, bench: &Bench) {
    let (gpu, s) = (bench.gpu(), &bench.shapes);
    const N: usize = 2;
    for &bt in &s.rows {
        let n = bt.0 * bt.1;
        // Inputs already replicated: every branch reads and writes its own rows.
        let mut group = new_group(c, format!("adapter_branches/{}", shape_name(bt.0, bt.1)));
        group.throughput(Throughput::Bytes((3 * N * n * s.hidden * F32) as u64));
        bench_lazy(&mut group, gpu, "one_launch", || Location::new(gpu, s, bt, N, false), |l| l.fused(gpu));
        bench_lazy(&mut group, gpu, "two_launches", || Location::new(gpu, s, bt, N, false), |l| l.per_branch(gpu));
        bench_lazy(&mut group, gpu, "split", || Location::new(gpu, s, bt, N, false), |l| l.split(gpu));
        group.finish();
        // The first adapter layer: one shared input, N outputs.
        let mut group = new_group(c, format!("adapter_branches_shared/{}", shape_name(bt.0, bt.1)));
        group.throughput(Throughput::Bytes(((2 + N) * n * s.hidden * F32) as u64));
        bench_lazy(&mut group, gpu, "one_launch", || Location::new(gpu, s, bt, N, true), |l| l.fused(gpu));
        bench_lazy(&mut group, gpu, "two_launches", || Location::new(gpu, s, bt, N, true), |l| l.per_branch(gpu));
        bench_lazy(&mut group, gpu, "split", || Location::new(gpu, s, bt, N, true), |l| l.split(gpu));
        group.finish();
    }
}

/// The location's backward: its one branch trainable, input gradients needed.
struct LocationBackward {
    loc: Location,
    d_out: DeviceBuffer<f32>,
    dh: DeviceBuffer<f32>,
    dr: DeviceBuffer<f32>,
    grads: [DeviceBuffer<f32>; 4],
    workspace: LocationBackwardWorkspace,
}

impl LocationBackward {
    fn new(gpu: &Gpu, s: &Shapes, bt: (usize, usize)) -> LocationBackward {
        let loc = Location::new(gpu, s, bt, 1, false);
        let (n, h, m) = (loc.rows, loc.hidden, loc.bottleneck);
        let len = backward_workspace_len(&loc.all, loc.shape, &[true]).expect("workspace length");
        LocationBackward {
            d_out: upload(gpu, &Fill(11).vec(n * h, -1.0, 1.0)),
            dh: zeros(gpu, n * h),
            dr: zeros(gpu, n * h),
            grads: [zeros(gpu, m * h), zeros(gpu, m), zeros(gpu, h * m), zeros(gpu, h)],
            workspace: LocationBackwardWorkspace::new(gpu, len).expect("workspace"),
            loc,
        }
    }

    /// This backward with its split-path products on TF32 tensor cores.
    fn with_tf32_products(mut self) -> LocationBackward {
        self.loc = self.loc.with_tf32_products();
        self
    }

    /// The fused kernel (with its workspace) when `split` is None, else the split path (its own
    /// workspace from the pool) with that row staging.
    fn run(&mut self, gpu: &Gpu, split: Option<RowStaging>) {
        let plan = split_backward_plan_auto(self.loc.hidden);
        self.run_with_plan(gpu, split, plan);
    }

    /// As [`LocationBackward::run`], the split path with `plan` for its row kernels.
    fn run_with_plan(&mut self, gpu: &Gpu, split: Option<RowStaging>, plan: LocationPlan) {
        let LocationBackward { loc, d_out, dh, dr, grads, workspace } = self;
        let [dwd, dbd, dwu, dbu] = grads;
        let branch = BranchGrads {
            down_w: dwd.view_mut(),
            down_b: dbd.view_mut(),
            up_w: dwu.view_mut(),
            up_b: dbu.view_mut(),
            ln_before: None,
            ln_after: None,
            scaling: None,
            gate: None,
            accumulate: false,
        };
        let mut g = [Some(branch)];
        let mut outputs = LocationBackwardOutputs { input_grads: Some((dh.view_mut(), dr.view_mut())), grads: &mut g };
        match split {
            None => adapter_location_backward(gpu, &loc.inputs(), &d_out.view(), &loc.all, &mut outputs, workspace, loc.shape).expect("adapter_location_backward"),
            Some(staging) => {
                adapter_location_backward_split_with_plan(gpu, &loc.inputs(), &d_out.view(), &loc.all, &mut outputs, loc.shape, plan, staging).expect("adapter_location_backward_split")
            }
        }
    }
}

/// The backward of [`HalfLocation`] (both branches trainable, input gradients needed): bf16
/// d_out, dh, dr, f32 weight gradients, the split backward with its recompute as the forward ran
/// (`SplitForward::Gemm`: the pre kernel and GEMMs on TF32; `TensorCores`: the two tensor-core
/// recompute kernels).
struct HalfLocationBackward {
    half: HalfLocation,
    d_out: DeviceBuffer<bf16>,
    dh: DeviceBuffer<bf16>,
    dr: DeviceBuffer<bf16>,
    grads: Vec<[DeviceBuffer<f32>; 4]>,
}

impl HalfLocationBackward {
    fn new(gpu: &Gpu, s: &Shapes, bt: (usize, usize), forward: SplitForward) -> HalfLocationBackward {
        let half = HalfLocation::new(gpu, s, bt, forward);
        let (n, h, m) = (half.out.len(), half.loc.hidden, half.loc.bottleneck);
        let d_out: Vec<bf16> = Fill(13).vec(n, -1.0, 1.0).iter().map(|&x| bf16::from_f32(x)).collect();
        HalfLocationBackward {
            d_out: gpu.upload(&d_out).expect("upload"),
            dh: gpu.alloc_zeros::<bf16>(n).expect("device allocation"),
            dr: gpu.alloc_zeros::<bf16>(n).expect("device allocation"),
            grads: (0..2).map(|_| [zeros(gpu, m * h), zeros(gpu, m), zeros(gpu, h * m), zeros(gpu, h)]).collect(),
            half,
        }
    }

    fn run(&mut self, gpu: &Gpu) {
        let HalfLocationBackward { half, d_out, dh, dr, grads } = self;
        let mut g: Vec<Option<BranchGrads>> = grads
            .iter_mut()
            .map(|[dwd, dbd, dwu, dbu]| {
                Some(BranchGrads { down_w: dwd.view_mut(), down_b: dbd.view_mut(), up_w: dwu.view_mut(), up_b: dbu.view_mut(), ln_before: None, ln_after: None, scaling: None, gate: None, accumulate: false })
            })
            .collect();
        let inputs = LocationInputs { h: half.h.view(), r: half.r.view(), ln_gamma: half.gamma.view(), ln_beta: half.beta.view(), ln_eps: EPS, dropout_seed: None };
        let mut outputs = LocationBackwardOutputs { input_grads: Some((dh.view_mut(), dr.view_mut())), grads: &mut g };
        adapter_location_backward_split(gpu, &inputs, &d_out.view(), &half.loc.all, &mut outputs, half.loc.shape).expect("adapter_location_backward_split");
    }
}

fn adapter_location_backward_bench(c: &mut Criterion, bench: &Bench) {
    let gpu = bench.gpu();
    for &(model, hidden, bottleneck, b, t) in &bench.shapes.location_backward {
        // The location at this model's width (pfeiffer, relu, reduction factor 16).
        let s = Shapes { hidden, bottleneck, ..bench.shapes.clone() };
        let n = b * t;
        let mut group = new_group(c, format!("adapter_location_backward/{model}_{}", shape_name(b, t)));
        group.throughput(Throughput::Bytes((5 * n * hidden * F32) as u64));
        bench_lazy(&mut group, gpu, "fused", || LocationBackward::new(gpu, &s, (b, t)), |l| l.run(gpu, None));
        // `split` stages its rows when they fit (the default, RowStaging::Auto); `split_unstaged`
        // reads them from global memory in every pass, as before staging.
        bench_lazy(&mut group, gpu, "split", || LocationBackward::new(gpu, &s, (b, t)), |l| l.run(gpu, Some(RowStaging::Auto)));
        bench_lazy(&mut group, gpu, "split_unstaged", || LocationBackward::new(gpu, &s, (b, t)), |l| l.run(gpu, Some(RowStaging::Off)));
        // The bottleneck products on TF32 tensor cores, as the 16-bit pipelines run them.
        bench_lazy(&mut group, gpu, "split_tf32", || LocationBackward::new(gpu, &s, (b, t)).with_tf32_products(), |l| l.run(gpu, Some(RowStaging::Auto)));
        // Two warps a row (a block a row) instead of the automatic plan's warp a row: the row
        // kernels' staged rows (15 KB a team for the input kernel at H = 768) allow ~14 warps an
        // SM with one warp a team, ~28 with two; the reductions then cross warps (block barriers).
        let wide = LocationPlan { threads_per_row: 64, rows_per_block: 1 };
        bench_lazy(&mut group, gpu, "split_two_warps_a_row", || LocationBackward::new(gpu, &s, (b, t)), move |l| l.run_with_plan(gpu, Some(RowStaging::Auto), wide));
        group.finish();
    }
    // The bf16 pipeline's Parallel location: the recompute on TF32 GEMMs against the tensor-core
    // recompute. Bytes: d_out, h, r read, dh, dr written (bf16, both branches).
    let s = &bench.shapes;
    for &bt in &s.rows {
        let n = bt.0 * bt.1;
        let mut group = new_group(c, format!("adapter_location_backward_bf16/{}", shape_name(bt.0, bt.1)));
        group.throughput(Throughput::Bytes((5 * 2 * n * s.hidden * 2) as u64));
        bench_lazy(&mut group, gpu, "split_tf32", || HalfLocationBackward::new(gpu, s, bt, SplitForward::Gemm), |l| l.run(gpu));
        bench_lazy(&mut group, gpu, "split_mma", || HalfLocationBackward::new(gpu, s, bt, SplitForward::TensorCores), |l| l.run(gpu));
        group.finish();
    }
}

// ---- residual + LayerNorm ------------------------------------------------------------------------

struct Ln {
    rows: usize,
    cols: usize,
    x: DeviceBuffer<f32>,
    r: DeviceBuffer<f32>,
    gamma: DeviceBuffer<f32>,
    beta: DeviceBuffer<f32>,
    y: DeviceBuffer<f32>,
    z: DeviceBuffer<f32>,
    stats: DeviceBuffer<f32>,
    mean: DeviceBuffer<f32>,
    rstd: DeviceBuffer<f32>,
    dy: DeviceBuffer<f32>,
    dz: DeviceBuffer<f32>,
}

impl Ln {
    fn new(gpu: &Gpu, rows: usize, cols: usize) -> Ln {
        let mut fill = Fill(3);
        let n = rows * cols;
        let mut ln = Ln {
            rows,
            cols,
            x: upload(gpu, &fill.vec(n, -2.0, 2.0)),
            r: upload(gpu, &fill.vec(n, -2.0, 2.0)),
            gamma: upload(gpu, &fill.vec(cols, 0.5, 1.5)),
            beta: upload(gpu, &fill.vec(cols, -0.5, 0.5)),
            y: zeros(gpu, n),
            z: zeros(gpu, n),
            stats: zeros(gpu, 2 * rows),
            mean: zeros(gpu, rows),
            rstd: zeros(gpu, rows),
            dy: upload(gpu, &fill.vec(n, -1.0, 1.0)),
            dz: zeros(gpu, n),
        };
        // The backward reads the training forward's z and stats.
        ln.forward_train(gpu);
        ln
    }

    fn forward(&mut self, gpu: &Gpu) {
        let inputs = LayerNormInputs { x: self.x.view(), residual: Some(self.r.view()), gamma: self.gamma.view(), beta: self.beta.view(), rows: self.rows, cols: self.cols, eps: EPS };
        let mut out = LayerNormOutputs { y: self.y.view_mut(), mean: self.mean.view_mut(), rstd: self.rstd.view_mut() };
        residual_layernorm_forward(gpu, &inputs, &mut out).expect("residual_layernorm_forward");
    }

    fn forward_train(&mut self, gpu: &Gpu) {
        let inputs = LayerNormInputs { x: self.x.view(), residual: Some(self.r.view()), gamma: self.gamma.view(), beta: self.beta.view(), rows: self.rows, cols: self.cols, eps: EPS };
        let mut out = LayerNormTrainOutputs { y: self.y.view_mut(), z: self.z.view_mut(), stats: self.stats.view_mut() };
        residual_layernorm_forward_train(gpu, &inputs, &mut out).expect("residual_layernorm_forward_train");
    }

    fn backward(&mut self, gpu: &Gpu) {
        let inputs = LayerNormBackwardInputs { dy: self.dy.view(), z: self.z.view(), stats: self.stats.view(), gamma: self.gamma.view(), rows: self.rows, cols: self.cols };
        layernorm_backward(gpu, &inputs, &mut self.dz.view_mut(), false, None).expect("layernorm_backward");
    }
}

fn residual_layernorm(c: &mut Criterion, bench: &Bench) {
    let (gpu, s) = (bench.gpu(), &bench.shapes);
    for &(b, t) in &s.rows {
        let (rows, cols) = (b * t, s.hidden);
        let (n, stats) = (rows * cols * F32, 2 * rows * F32);
        let mut group = new_group(c, format!("residual_layernorm/{}", shape_name(b, t)));
        // Read x and r, write y (and mean, rstd); the training forward also writes z.
        group.throughput(Throughput::Bytes((3 * n + stats) as u64));
        bench_lazy(&mut group, gpu, "forward", || Ln::new(gpu, rows, cols), |l| l.forward(gpu));
        group.throughput(Throughput::Bytes((4 * n + stats) as u64));
        bench_lazy(&mut group, gpu, "forward_train", || Ln::new(gpu, rows, cols), |l| l.forward_train(gpu));
        group.finish();
        // Read dy, z, stats, write dz (γ frozen: no parameter gradients).
        let mut group = new_group(c, format!("layernorm_backward/{}", shape_name(b, t)));
        group.throughput(Throughput::Bytes((3 * n + stats) as u64));
        bench_lazy(&mut group, gpu, "backward", || Ln::new(gpu, rows, cols), |l| l.backward(gpu));
        group.finish();
    }
}

// ---- attention -----------------------------------------------------------------------------------

struct Attention<A: ActivationScalar + GemmScalar> {
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    qkv: DeviceBuffer<A>,
    mask: DeviceBuffer<f32>,
    ctx: DeviceBuffer<A>,
    lse: DeviceBuffer<f32>,
    dctx: DeviceBuffer<A>,
    dqkv: DeviceBuffer<A>,
    workspace: DeviceBuffer<f32>,
}

impl<A: ActivationScalar + GemmScalar> Attention<A> {
    fn new(gpu: &Gpu, s: &Shapes, (batch, seq): (usize, usize)) -> Attention<A> {
        let (hidden, heads) = (s.hidden, s.heads);
        let mut fill = Fill(5);
        let n = batch * seq;
        let up = |v: Vec<f32>| gpu.upload(&v.into_iter().map(A::narrow).collect::<Vec<A>>()).expect("upload");
        let mut a = Attention {
            batch,
            seq,
            hidden,
            heads,
            qkv: up(fill.vec(n * 3 * hidden, -1.0, 1.0)),
            mask: upload(gpu, &mask_bias(batch, seq)),
            ctx: up(vec![0.0; n * hidden]),
            lse: zeros(gpu, batch * heads * seq),
            dctx: up(fill.vec(n * hidden, -1.0, 1.0)),
            dqkv: up(vec![0.0; n * 3 * hidden]),
            workspace: zeros(gpu, attention_backward_workspace_len(batch, seq, heads).expect("workspace length")),
        };
        // The backward reads the forward's ctx and lse.
        a.forward(gpu);
        a
    }

    fn forward(&mut self, gpu: &Gpu) {
        attention_packed_forward(gpu, &self.qkv.view(), &self.mask.view(), &mut self.ctx.view_mut(), &mut self.lse.view_mut(), self.batch, self.seq, self.hidden, self.heads).expect("attention forward");
    }

    fn backward(&mut self, gpu: &Gpu) {
        let plan = AttentionBackwardPlan::auto(self.batch, self.seq, self.heads);
        attention_packed_backward_with(
            gpu,
            &self.dctx.view(),
            &self.qkv.view(),
            &self.ctx.view(),
            &self.lse.view(),
            &self.mask.view(),
            &mut self.dqkv.view_mut(),
            &mut self.workspace.view_mut(),
            self.batch,
            self.seq,
            self.hidden,
            self.heads,
            plan,
        )
        .expect("attention backward");
    }

    fn gemm_forward(&mut self, gpu: &Gpu) {
        attention_gemm_forward(gpu, &self.qkv.view(), &self.mask.view(), &mut self.ctx.view_mut(), &mut self.lse.view_mut(), self.batch, self.seq, self.hidden, self.heads, None).expect("GEMM attention forward");
    }

    fn mma_forward(&mut self, gpu: &Gpu) {
        attention_mma_forward(gpu, &self.qkv.view(), &self.mask.view(), &mut self.ctx.view_mut(), &mut self.lse.view_mut(), self.batch, self.seq, self.hidden, self.heads, None).expect("tensor-core attention forward");
    }

    fn mma_backward(&mut self, gpu: &Gpu) {
        attention_mma_backward(gpu, &self.dctx.view(), &self.qkv.view(), &self.lse.view(), &self.mask.view(), &mut self.dqkv.view_mut(), self.batch, self.seq, self.hidden, self.heads, None)
            .expect("tensor-core attention backward");
    }

    fn gemm_backward(&mut self, gpu: &Gpu) {
        attention_gemm_backward(gpu, &self.dctx.view(), &self.qkv.view(), &self.lse.view(), &self.mask.view(), &mut self.dqkv.view_mut(), self.batch, self.seq, self.hidden, self.heads, None)
            .expect("GEMM attention backward");
    }
}

fn attention(c: &mut Criterion, bench: &Bench) {
    let (gpu, s) = (bench.gpu(), &bench.shapes);
    for &(b, t) in &s.attention {
        let fwd = 4 * b * t * t * s.hidden;
        let mut group = new_group(c, format!("attention/{}", shape_name(b, t)));
        group.throughput(Throughput::Elements(fwd as u64));
        bench_lazy(&mut group, gpu, "forward", || Attention::<f32>::new(gpu, s, (b, t)), |a| a.forward(gpu));
        bench_lazy(&mut group, gpu, "gemm_forward", || Attention::<f32>::new(gpu, s, (b, t)), |a| a.gemm_forward(gpu));
        bench_lazy(&mut group, gpu, "bf16_forward", || Attention::<bf16>::new(gpu, s, (b, t)), |a| a.forward(gpu));
        bench_lazy(&mut group, gpu, "bf16_gemm_forward", || Attention::<bf16>::new(gpu, s, (b, t)), |a| a.gemm_forward(gpu));
        bench_lazy(&mut group, gpu, "bf16_mma_forward", || Attention::<bf16>::new(gpu, s, (b, t)), |a| a.mma_forward(gpu));
        group.throughput(Throughput::Elements(2 * fwd as u64));
        bench_lazy(&mut group, gpu, "backward", || Attention::<f32>::new(gpu, s, (b, t)), |a| a.backward(gpu));
        bench_lazy(&mut group, gpu, "gemm_backward", || Attention::<f32>::new(gpu, s, (b, t)), |a| a.gemm_backward(gpu));
        bench_lazy(&mut group, gpu, "bf16_backward", || Attention::<bf16>::new(gpu, s, (b, t)), |a| a.backward(gpu));
        bench_lazy(&mut group, gpu, "bf16_gemm_backward", || Attention::<bf16>::new(gpu, s, (b, t)), |a| a.gemm_backward(gpu));
        bench_lazy(&mut group, gpu, "bf16_mma_backward", || Attention::<bf16>::new(gpu, s, (b, t)), |a| a.mma_backward(gpu));
        group.finish();
    }
}

// ---- the training step ---------------------------------------------------------------------------

/// A BERT of `d` with random weights (N(0, 0.02) in spread, as BERT's init; LayerNorms at
/// γ = 1, β = 0) on `backend`, the base stored as `base` (f32, or bf16 for bf16 training).
fn random_model(d: Dims, backend: Arc<dyn Backend>, base: DType) -> BertModel {
    let config = BertConfig {
        vocab_size: d.vocab,
        hidden_size: d.hidden,
        num_hidden_layers: d.layers,
        num_attention_heads: d.heads,
        intermediate_size: d.intermediate,
        hidden_act: HiddenAct::Gelu,
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
        max_position_embeddings: d.max_positions,
        type_vocab_size: 2,
        layer_norm_eps: EPS,
        pad_token_id: 0,
        model_type: bert_adapters::ModelType::Bert,
    };
    let (h, i) = (d.hidden, d.intermediate);
    let be = backend.as_ref();
    let mut fill = Fill(42);
    // Uniform in ±0.02·√3: standard deviation 0.02.
    let a = 0.02 * 3f32.sqrt();
    let stored = |t: Tensor| if base == DType::F32 { t } else { be.cast(&t, base).expect("cast the base") };
    let mut w = |shape: &[usize]| stored(be.upload(fill.vec(shape.iter().product(), -a, a), shape).expect("upload"));
    let ones = |n: usize| stored(be.upload(vec![1.0; n], &[n]).expect("upload"));
    let zero = |n: usize| stored(be.upload(vec![0.0; n], &[n]).expect("upload"));
    let layers = (0..d.layers)
        .map(|_| LayerWeights {
            qkv_w: w(&[3 * h, h]),
            qkv_b: zero(3 * h),
            attn_out_w: w(&[h, h]),
            attn_out_b: zero(h),
            attn_ln_gamma: ones(h),
            attn_ln_beta: zero(h),
            intermediate_w: w(&[i, h]),
            intermediate_b: zero(i),
            output_w: w(&[h, i]),
            output_b: zero(h),
            output_ln_gamma: ones(h),
            output_ln_beta: zero(h),
        })
        .collect();
    let weights = BertWeights {
        word_embeddings: w(&[d.vocab, h]),
        position_embeddings: w(&[d.max_positions, h]),
        token_type_embeddings: w(&[2, h]),
        embeddings_ln_gamma: ones(h),
        embeddings_ln_beta: zero(h),
        layers,
        pooler: Some((w(&[h, h]), zero(h))),
    };
    BertModel::new(config, weights, backend)
}

/// A padded batch of random ids ([`lengths`]: 20 % padding), and labels `i % 3`.
fn random_batch(d: Dims, batch: usize, seq: usize) -> (InputBatch, Vec<usize>) {
    let mut fill = Fill(99);
    let lens = lengths(batch, seq);
    let mut ids = Vec::with_capacity(batch * seq);
    let mut mask = Vec::with_capacity(batch * seq);
    for &n in &lens {
        for j in 0..seq {
            let real = j < n;
            ids.push(if real { 1 + (fill.next() % (d.vocab as u64 - 1)) as u32 } else { 0 });
            mask.push(real as u32);
        }
    }
    let b = InputBatch { batch, seq_len: seq, input_ids: ids, attention_mask: mask, token_type_ids: vec![0; batch * seq] };
    (b, (0..batch).map(|i| i % 3).collect())
}

const SCORENN: &str = "scorenn";
const TASKNN: &str = "tasknn";

/// What `train` optimises when it trains `adapter`.
fn step_config(adapter: &str) -> TrainStepConfig {
    let objective = if adapter == TASKNN { Objective::TASKNN } else { Objective::SCORENN };
    TrainStepConfig { objective, trained: adapter.to_string(), max_grad_norm: Some(MAX_GRAD_NORM) }
}

/// `train`'s alternation: tasknn for [`ALTERNATE`] steps, then scorenn, and so on.
fn trained_at(step: u64) -> &'static str {
    if (step / ALTERNATE).is_multiple_of(2) {
        TASKNN
    } else {
        SCORENN
    }
}

struct Step {
    model: BertModel,
    batch: InputBatch,
    labels: Vec<usize>,
    optimizers: BTreeMap<&'static str, AdamW>,
    graphs: BTreeMap<&'static str, TrainStepGraph>,
    /// Why a capture failed, if one did (`replayed` then fails with this reason).
    capture_error: Option<String>,
    step: u64,
    last: Option<TrainStepOutput>,
}

/// What a step benchmark changes from the defaults: the tape's frozen rows, the 16-bit Linears'
/// epilogues, the split forward's down projection and the attention path (None: the backend's
/// own choice).
#[derive(Clone, Copy, PartialEq, Eq)]
struct StepVariant {
    frozen_rows: FrozenRows,
    linear_epilogue: Option<LinearEpilogue>,
    split_forward: Option<SplitForward>,
    attention_path: Option<AttentionPath>,
}

impl StepVariant {
    const DEFAULT: StepVariant = StepVariant { frozen_rows: FrozenRows::Copy, linear_epilogue: None, split_forward: None, attention_path: None };
    const SHARE: StepVariant = StepVariant { frozen_rows: FrozenRows::Share, ..StepVariant::DEFAULT };
    const CUBLASLT: StepVariant = StepVariant { linear_epilogue: Some(LinearEpilogue::Cublaslt), ..StepVariant::DEFAULT };
    const SHARE_CUBLASLT: StepVariant = StepVariant { frozen_rows: FrozenRows::Share, linear_epilogue: Some(LinearEpilogue::Cublaslt), ..StepVariant::DEFAULT };
    const MMA: StepVariant = StepVariant { split_forward: Some(SplitForward::TensorCores), attention_path: Some(AttentionPath::TensorCores), ..StepVariant::DEFAULT };

    /// The variants as `CUDA_BENCH_STEP_VARIANT` spells them.
    const NAMES: [(&'static str, StepVariant); 5] =
        [("default", StepVariant::DEFAULT), ("share", StepVariant::SHARE), ("cublaslt", StepVariant::CUBLASLT), ("share+cublaslt", StepVariant::SHARE_CUBLASLT), ("mma", StepVariant::MMA)];

    /// How `CUDA_BENCH_STEP_VARIANT` spells it.
    fn label(&self) -> &'static str {
        StepVariant::NAMES.iter().find(|(_, v)| v == self).map_or("default", |(n, _)| n)
    }

    /// `CUDA_BENCH_STEP_VARIANT` for the step profiles (`CUDA_BENCH_PROFILE`): `default`,
    /// `share`, `cublaslt`, `share+cublaslt` or `mma`.
    fn from_env() -> Result<StepVariant, String> {
        match std::env::var("CUDA_BENCH_STEP_VARIANT") {
            Err(_) => Ok(StepVariant::DEFAULT),
            Ok(v) => StepVariant::NAMES.iter().find(|(n, _)| *n == v).map(|(_, s)| *s).ok_or_else(|| {
                format!("CUDA_BENCH_STEP_VARIANT: `{v}` is not one of {}", StepVariant::NAMES.map(|(n, _)| n).join(", "))
            }),
        }
    }
}

impl Step {
    /// The step with activations in `precision` (f32, or bf16 / f16 over a base in that dtype;
    /// f16 loss-scaled as `train` starts it), with the model's [`FrozenRows`] and the backend's
    /// [`LinearEpilogue`] of `variant`, set before the first step (so the captured graphs record
    /// them too).
    fn variant(bench: &Bench, d: Dims, batch: usize, seq: usize, precision: DType, variant: StepVariant) -> Step {
        Step::on(bench, d, batch, seq, precision, |b| b, variant)
    }

    /// [`Step::variant`] on the backend `wrap` makes of the precision's backend (a profiler).
    fn on(bench: &Bench, d: Dims, batch: usize, seq: usize, precision: DType, wrap: impl FnOnce(Arc<dyn Backend>) -> Arc<dyn Backend>, variant: StepVariant) -> Step {
        let backend: Arc<dyn Backend> = match precision {
            DType::F32 => bench.backend.clone(),
            other => {
                let mut b = bench.backend.sharing_gpu(other).expect("a 16-bit backend");
                if let Some(e) = variant.linear_epilogue {
                    b = b.with_linear_epilogue(e);
                }
                if let Some(forward) = variant.split_forward {
                    // On the split path, whose forward it changes (a GPU's default already;
                    // cuda-sim's is the fused kernel).
                    b = b.with_location_path(LocationPath::Split).with_split_forward(forward);
                }
                if let Some(path) = variant.attention_path {
                    b = b.with_attention_path(path);
                }
                Arc::new(b)
            }
        };
        let backend = wrap(backend);
        // What the pool held before this model: the other steps' models (which share the GPU).
        let held_before = bench.gpu().memory_stats().live_bytes;
        let mut model = random_model(d, backend, precision);
        model.set_frozen_rows(variant.frozen_rows);
        if precision == DType::F16 {
            model.set_loss_scale(bert_adapters::train::LossScalerConfig::default().init_scale).expect("loss scale");
        }
        for (seed, name) in [(1, SCORENN), (2, TASKNN)] {
            model.add_adapter_seeded(name, AdapterConfig::named("pfeiffer").expect("pfeiffer"), seed).expect("add_adapter");
            model.add_classification_head(name, HeadConfig::classification(3)).expect("head");
        }
        model.set_active_adapters(Some(AdapterSetup::Parallel(vec![SCORENN.into(), TASKNN.into()]))).expect("setup");
        let (batch, labels) = random_batch(d, batch, seq);
        let optimizers = [SCORENN, TASKNN].into_iter().map(|n| (n, AdamW::new(AdamWConfig { lr: 1e-3, ..AdamWConfig::default() }).expect("AdamW"))).collect();
        let mut s = Step { model, batch, labels, optimizers, graphs: BTreeMap::new(), capture_error: None, step: 0, last: None };
        let gpu = bench.gpu();
        // One launched step of each adapter: kernels compiled, arenas packed, the pool filled;
        // the launches of one step counted.
        for name in [SCORENN, TASKNN] {
            let before = gpu.launch_counts();
            s.prepare(name, 0);
            let out = s.model.train_step(&s.batch, &s.labels, &step_config(name), s.optimizers.get_mut(name).expect("optimizer")).expect("train_step");
            let n = gpu.launch_counts().since(&before);
            let kernels: u64 = n.kernels.values().sum();
            println!("launches: {} {precision} {name} step: {kernels} kernel launches and {} GEMMs ({:.3} GFLOP in GEMMs)", d.name, n.gemm_calls, 2.0 * n.gemm_macs as f64 / 1e9);
            drop(out);
        }
        // This model's device memory in use at the peak of one launched tasknn step, as torch's
        // max_memory_allocated counts it in a process of its own (weights, adapter and optimizer
        // state, inputs, the step's activations and workspaces; in the pool's size classes), for
        // S9 against tools/bench_torch.py's peak_mem_mb. The other steps' models are left out.
        s.prepare(TASKNN, 0);
        gpu.reset_peak_memory();
        drop(s.model.train_step(&s.batch, &s.labels, &step_config(TASKNN), s.optimizers.get_mut(TASKNN).expect("optimizer")).expect("train_step"));
        let peak = gpu.memory_stats().peak_live_bytes.saturating_sub(held_before);
        println!("memory: {} {precision} {} step: peak {:.1} MiB in use during a launched tasknn step", d.name, variant.label(), peak as f64 / (1u64 << 20) as f64);
        // Then the captures, once both arenas exist (a graph captured before the other adapter's
        // first step would hold that adapter's parameters where they were before its arena took
        // them, and its replay is refused), each right after a launched step of its adapter, so
        // the pool holds free blocks of every size the capture allocates (the other graph keeps
        // its own).
        for name in [SCORENN, TASKNN] {
            s.prepare(name, 0);
            drop(s.model.train_step(&s.batch, &s.labels, &step_config(name), s.optimizers.get_mut(name).expect("optimizer")).expect("train_step"));
            // A failed capture costs the `replayed` function only.
            match s.model.capture_train_step(&s.batch, &s.labels, &step_config(name), s.optimizers.get_mut(name).expect("optimizer")) {
                Ok(graph) => {
                    s.graphs.insert(name, graph);
                }
                Err(e) => {
                    println!("WARNING: {} {name}: capture_train_step failed: {e}", d.name);
                    s.capture_error.get_or_insert(e.to_string());
                }
            }
        }
        gpu.synchronize().expect("synchronize");
        s
    }

    /// What `train` does before each step: select the adapter, a new dropout seed.
    fn prepare(&mut self, adapter: &str, step: u64) {
        self.model.train_adapter(&[adapter]).expect("train_adapter");
        self.model.set_dropout(Some(0x5eed + step));
    }

    fn launched(&mut self) {
        let name = trained_at(self.step);
        self.prepare(name, self.step);
        let opt = self.optimizers.get_mut(name).expect("optimizer");
        self.last = Some(self.model.train_step(&self.batch, &self.labels, &step_config(name), opt).expect("train_step"));
        self.step += 1;
    }

    fn replayed(&mut self) {
        let name = trained_at(self.step);
        self.prepare(name, self.step);
        let Step { model, batch, labels, optimizers, graphs, capture_error, .. } = self;
        let Some(graph) = graphs.get(name) else { panic!("no captured step of {name}: {}", capture_error.as_deref().unwrap_or("not captured")) };
        model.replay_train_step(graph, batch, labels, optimizers.get_mut(name).expect("optimizer")).expect("replay_train_step");
        self.step += 1;
    }

    /// The loss of the latest step (read once, after the timing): a diverged run is reported.
    fn check(&self, id: &str) {
        let out = match (&self.last, self.graphs.get(trained_at(self.step.saturating_sub(1)))) {
            (Some(o), _) => o,
            (None, Some(g)) => g.output(),
            (None, None) => return,
        };
        if let Err(e) = out.read(self.model.backend().as_ref()) {
            println!("WARNING: {id}: the last step's loss is not finite ({e}); the timing covers steps that updated nothing");
        }
    }
}

fn train_step(c: &mut Criterion, bench: &Bench) {
    for &(d, b, t) in &bench.shapes.steps {
        let id = format!("train_step/{}_{}", d.name, shape_name(b, t));
        guarded(&id, || train_step_shape(c, bench, d, (b, t), &id));
    }
}

fn train_step_shape(c: &mut Criterion, bench: &Bench, d: Dims, (b, t): (usize, usize), id: &str) {
    let gpu = bench.gpu();
    let mut group = new_group(c, id.to_string());
    group.throughput(Throughput::Elements((b * t) as u64));
    // One model per precision for both functions: launched steps and replays share its weights
    // and pool. f32 is the strict-parity step; bf16 is `train`'s default on a GPU.
    // Variants of the bf16 replayed step, each on a model of its own: `_share` with
    // FrozenRows::Share (no copies of the live branch's rows into the tape), `_cublaslt` with
    // LinearEpilogue::Cublaslt (the frozen Linears' biases added by cuBLASLt, no f32 D).
    // `_mma` with SplitForward::TensorCores (the split forward in two tensor-core kernels).
    let mut states: [Option<Step>; 7] = [None, None, None, None, None, None, None];
    let functions = [
        ("launched", false, DType::F32, StepVariant::DEFAULT),
        ("replayed", true, DType::F32, StepVariant::DEFAULT),
        ("bf16_launched", false, DType::BF16, StepVariant::DEFAULT),
        ("bf16_replayed", true, DType::BF16, StepVariant::DEFAULT),
        ("bf16_replayed_share", true, DType::BF16, StepVariant::SHARE),
        ("bf16_replayed_cublaslt", true, DType::BF16, StepVariant::CUBLASLT),
        ("bf16_replayed_share_cublaslt", true, DType::BF16, StepVariant::SHARE_CUBLASLT),
        ("bf16_replayed_mma", true, DType::BF16, StepVariant::MMA),
        ("f16_launched", false, DType::F16, StepVariant::DEFAULT),
    ];
    for (function, replay, precision, variant) in functions {
        let state = &mut states[match (precision, variant) {
            (DType::BF16, StepVariant::SHARE) => 3,
            (DType::BF16, StepVariant::CUBLASLT) => 4,
            (DType::BF16, StepVariant::SHARE_CUBLASLT) => 5,
            (DType::BF16, StepVariant::MMA) => 6,
            (DType::BF16, _) => 1,
            (DType::F16, _) => 2,
            _ => 0,
        }];
        guarded(&format!("{id} {function}"), || {
            group.bench_function(function, |bn| {
                let s = state.get_or_insert_with(|| Step::variant(bench, d, b, t, precision, variant));
                bn.iter_custom(|iters| timed(gpu, iters, || if replay { s.replayed() } else { s.launched() }));
                s.check(&format!("{id}/{function}"));
                s.last = None;
            });
        });
    }
    group.finish();
}

// ---- where the step's time goes ---------------------------------------------------------------------

/// Launched steps timed per op ([`ProfiledBackend`]) after the warm-up ones.
const PROFILE_STEPS: u64 = 5;

/// `CUDA_BENCH_PROFILE=1`: instead of the criterion benchmarks, each training step shape in
/// each precision of `CUDA_BENCH_PROFILE_PRECISIONS` (default `bf16 f32`) on a
/// [`ProfiledBackend`]: two launched steps of tasknn, then [`PROFILE_STEPS`] more timed per op
/// on the device (two events around each op; the table gives GPU time, host enqueue time,
/// launches and the products' FLOP rate per op, and the kernels each op launched). Markdown on
/// stdout (the device check keeps it as step-profile.md).
///
/// Both take the model and backend of `CUDA_BENCH_STEP_VARIANT` ([`StepVariant::from_env`]).
///
/// `CUDA_BENCH_PROFILE=ncu`: the first step shape in bf16, two warm-up steps, then one launched
/// step inside [`Gpu::profiler_range`], for Nsight Compute with `--profile-from-start off`: every
/// kernel of exactly one step, each timed alone (scripts/device-check.sh, `NCU=1`).
fn profile(bench: &Bench, mode: &str) -> Result<(), String> {
    let precisions = std::env::var("CUDA_BENCH_PROFILE_PRECISIONS").unwrap_or_else(|_| "bf16 f32".into());
    let mut dtypes = Vec::new();
    for p in precisions.split_whitespace() {
        dtypes.push(match p {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            other => return Err(format!("CUDA_BENCH_PROFILE_PRECISIONS: `{other}` is not f32, bf16 or f16")),
        });
    }
    let variant = StepVariant::from_env()?;
    let gpu = bench.gpu();
    match mode {
        "1" => {
            println!("# Where the training step's time goes ({}, {} shapes)\n", gpu.describe(), bench.shapes.label);
            for &(d, b, t) in &bench.shapes.steps {
                for &precision in &dtypes {
                    let id = format!("train_step/{}_{}", d.name, shape_name(b, t));
                    guarded(&format!("profile {id} {precision}"), || {
                        let mut handle = None;
                        let mut s = Step::on(
                            bench,
                            d,
                            b,
                            t,
                            precision,
                            |inner| {
                                let p = Arc::new(ProfiledBackend::new(inner));
                                handle = Some(p.clone());
                                p
                            },
                            variant,
                        );
                        let profiled = handle.expect("the step's backend is the profiler");
                        for _ in 0..2 {
                            s.launched();
                        }
                        profiled.reset();
                        for _ in 0..PROFILE_STEPS {
                            s.launched();
                        }
                        s.check(&id);
                        let per_step = profiled.device_span().map(|d| format!("{:.2} ms", d.as_secs_f64() * 1e3 / PROFILE_STEPS as f64)).unwrap_or_else(|| "no device span".into());
                        println!("## {id} in {precision}: tasknn trained, {PROFILE_STEPS} launched steps; GPU span per step {per_step}\n");
                        println!("Totals over the {PROFILE_STEPS} steps.\n\n{}", profiled.report());
                        println!("Kernels per op call:\n\n{}", profiled.kernel_report());
                    });
                }
            }
            Ok(())
        }
        "ncu" => {
            let &(d, b, t) = bench.shapes.steps.first().ok_or("no step shape")?;
            let precision = dtypes.first().copied().unwrap_or(DType::BF16);
            let mut s = Step::variant(bench, d, b, t, precision, variant);
            for _ in 0..2 {
                s.launched();
            }
            gpu.profiler_range(true).map_err(|e| e.to_string())?;
            s.launched();
            gpu.profiler_range(false).map_err(|e| e.to_string())?;
            s.check("ncu step");
            println!("profiled one launched {} {}x{} {precision} step (tasknn) inside cuProfilerStart/Stop", d.name, b, t);
            Ok(())
        }
        "gemm" => {
            println!("# cuBLASLt's algorithms for the step's 16-bit Linear products ({})\n", gpu.describe());
            gemm_survey(gpu);
            Ok(())
        }
        other => Err(format!("CUDA_BENCH_PROFILE must be 1, ncu or gemm, not `{other}`")),
    }
}

/// `CUDA_BENCH_PROFILE=gemm` on a GPU: for the 16-bit Linear products of a BERT-base 32×128 step
/// (forward `Wᵀ·x` into f32, input gradient `W·dy` into the 16-bit type and into f32), in bf16
/// and in f16, every algorithm cuBLASLt's heuristic offers under the library's numerical mask and
/// with none, described and timed ([`Gpu::gemm_survey`]). The first masked row is what a
/// product gets by default; the fastest masked row is what `BERT_ADAPTERS_GEMM_ALGO=timed` picks.
fn gemm_survey(gpu: &Gpu) {
    if gpu.kind() == GpuKind::Sim {
        println!("(cuda-sim has no cuBLASLt: nothing to survey)");
        return;
    }
    let rows = 32 * 128;
    // (what, transa, transb, m, n, k): the Linear forward is Gemm(T, N, out, rows, in), the input
    // gradient Gemm(N, N, in, rows, out) (src/cuda/backend.rs, src/cuda/elementwise.rs).
    let problems = [
        ("QKV forward", Transpose::Yes, Transpose::No, 2304, rows, 768),
        ("FFN up forward", Transpose::Yes, Transpose::No, 3072, rows, 768),
        ("FFN down forward", Transpose::Yes, Transpose::No, 768, rows, 3072),
        ("FFN up input gradient", Transpose::No, Transpose::No, 768, rows, 3072),
        ("FFN down input gradient", Transpose::No, Transpose::No, 3072, rows, 768),
    ];
    for (what, ta, tb, m, n, k) in problems {
        guarded(&format!("gemm survey {what}"), || {
            survey_one::<bf16, f32>(gpu, what, ta, tb, m, n, k, bf16::from_f32);
            survey_one::<half::f16, f32>(gpu, what, ta, tb, m, n, k, half::f16::from_f32);
            if ta == Transpose::No {
                survey_one::<bf16, bf16>(gpu, what, ta, tb, m, n, k, bf16::from_f32);
                survey_one::<half::f16, half::f16>(gpu, what, ta, tb, m, n, k, half::f16::from_f32);
            }
        });
    }
    // The split adapter path's f32 products at pfeiffer's r = 48 (src/cuda/adapter.rs), strict
    // and with TF32 (the 16-bit pipelines' default): the down projection Gemm(T, N, r, rows, H),
    // the up projection Gemm(T, N, H, rows, r), the up weight gradient Gemm(N, T, r, H, rows) and
    // the input gradient of the down projection Gemm(N, N, H, rows, r).
    let adapter = [
        ("adapter down forward", Transpose::Yes, Transpose::No, 48, rows, 768),
        ("adapter up forward", Transpose::Yes, Transpose::No, 768, rows, 48),
        ("adapter up weight gradient", Transpose::No, Transpose::Yes, 48, 768, rows),
        ("adapter down input gradient", Transpose::No, Transpose::No, 768, rows, 48),
    ];
    for (what, ta, tb, m, n, k) in adapter {
        guarded(&format!("gemm survey {what}"), || {
            for tf32 in [false, true] {
                let g = Gemm::new(ta, tb, m, n, k).with_tf32(tf32);
                survey_gemm::<f32, f32>(gpu, &format!("{what}{}", if tf32 { " (TF32)" } else { "" }), g, |x| x);
            }
        });
    }
}

#[allow(clippy::too_many_arguments)]
fn survey_one<I: GemmScalar, O: GemmScalar>(gpu: &Gpu, what: &str, ta: Transpose, tb: Transpose, m: usize, n: usize, k: usize, narrow: fn(f32) -> I) {
    survey_gemm::<I, O>(gpu, what, Gemm::new(ta, tb, m, n, k).with_types(I::INPUT, O::OUTPUT), narrow);
}

/// Surveys the product `g` on random operands (see [`gemm_survey`]) and prints its table.
fn survey_gemm<I: GemmScalar, O: GemmScalar>(gpu: &Gpu, what: &str, g: Gemm, narrow: fn(f32) -> I) {
    let (ta, tb, m, n, k) = (g.transa, g.transb, g.m, g.n, g.k);
    let mut fill = Fill(0x5eed ^ (m * n * k) as u64);
    let a = gpu.upload(&fill.vec(m * k, -1.0, 1.0).into_iter().map(narrow).collect::<Vec<I>>()).expect("upload");
    let b = gpu.upload(&fill.vec(k * n, -1.0, 1.0).into_iter().map(narrow).collect::<Vec<I>>()).expect("upload");
    let mut c = gpu.alloc_zeros::<O>(m * n).expect("device allocation");
    let reports = gpu.gemm_survey(&g, &a.view(), &b.view(), &c.view_mut(), None, SurveyOptions::default()).expect("gemm survey");
    let flop = 2.0 * (m * n * k) as f64;
    println!("## {what}: m {m} n {n} k {k}, {:?}{:?}, {} × {} → {}\n", ta, tb, I::INPUT.name(), I::INPUT.name(), O::OUTPUT.name());
    println!("| mask | rank | µs | TFLOP/s | algorithm | workspace | waves |\n|---|---:|---:|---:|---|---:|---:|");
    for r in &reports {
        let (us, tflops) = r.micros.map_or(("refused".to_string(), String::new()), |us| (format!("{us:.1}"), format!("{:.0}", flop / (us as f64 * 1e6))));
        println!("| {} | {} | {us} | {tflops} | {} | {} | {:.2} |", if r.masked { "ours" } else { "none" }, r.rank, r.describe, r.workspace_bytes, r.waves);
    }
    println!();
}

/// One benchmark family: its groups at every shape.
type Family = fn(&mut Criterion, &Bench);

fn main() {
    let Some(bench) = open() else { return };
    if let Ok(mode) = std::env::var("CUDA_BENCH_PROFILE") {
        if let Err(e) = profile(&bench, &mode) {
            exit_with(&e);
        }
        let failed = FAILED.load(Ordering::SeqCst);
        if failed > 0 {
            exit_with(&format!("{failed} profile(s) failed (FAILED lines above)"));
        }
        return;
    }
    let sim = bench.gpu().kind() == GpuKind::Sim;
    // Short runs so the whole bench fits a GPU session (the device check's arguments override
    // these); the executor is slow, so shorter still there.
    let mut c = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(if sim { 200 } else { 1000 })).measurement_time(Duration::from_secs(if sim { 1 } else { 3 })).configure_from_args();
    let families: [(&str, Family); 6] = [
        ("adapter_location", adapter_location),
        ("adapter_branches", adapter_branches),
        ("adapter_location_backward", adapter_location_backward_bench),
        ("residual_layernorm", residual_layernorm),
        ("attention", attention),
        ("train_step", train_step),
    ];
    for (what, family) in families {
        guarded(what, || family(&mut c, &bench));
    }
    c.final_summary();
    let failed = FAILED.load(Ordering::SeqCst);
    if failed > 0 {
        eprintln!("error: {failed} benchmark(s) failed (FAILED lines above)");
        std::process::exit(1);
    }
}
