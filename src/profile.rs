//! Per-op timers: `ProfiledBackend` wraps any backend and records, for every `Backend` method,
//! how often it ran and the host wall time it took. It changes no result (every call is passed
//! through unchanged), so a whole training step can be profiled by op family:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use bert_adapters::{CpuBackend, profile::ProfiledBackend};
//! let profiled = Arc::new(ProfiledBackend::new(Arc::new(CpuBackend::fast())));
//! // ... build a model on `profiled.clone()`, run steps, then:
//! println!("{}", profiled.report());
//! ```
//!
//! On the CPU every op is synchronous, so the host time is the op's. Over a CUDA backend (a GPU,
//! or cuda-sim) the host time is only the time to enqueue, so each op is also bracketed by two
//! events on the backend's stream ([`Gpu::record_event`]) and its GPU time is the interval
//! between them, read when the table is asked for (no synchronisation inside a step), together
//! with the kernels and dense products it launched ([`Gpu::launch_counts`]). The interval runs
//! from when the GPU reaches the op's first marker to when it passes the second: where the host
//! enqueues an op more slowly than the GPU runs it (small ops), the GPU's wait for those launches
//! is inside the interval, and the host column shows it. Nothing is timed on the device while a
//! graph is being captured. `cargo bench --bench op_profile` prints the CPU table for the MiniLM
//! Parallel step; `CUDA_BENCH_PROFILE=1 cargo bench --bench cuda` the GPU tables of the training
//! step (benches/cuda.rs).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backend::{Activation, AdapterLocation, Backend, BottleneckGrads, DropoutSpec, GradsOut, LocationGrads, NiceGrads, NiceParams};
use crate::cuda::gpu::GpuEvent;
use crate::cuda::Gpu;
use crate::device::Device;
use crate::error::Result;
use crate::tensor::{DType, Tensor};

/// Calls and times of one op.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OpTime {
    pub calls: u64,
    /// Host wall time (on an asynchronous device: the time to enqueue).
    pub total: Duration,
    /// Calls timed on the device (calls outside a graph capture, over a CUDA backend).
    pub device_calls: u64,
    /// GPU time between each call's two events.
    pub device: Duration,
    /// Kernels and dense products the device calls launched, and the products' multiply-adds.
    pub kernel_launches: u64,
    pub gemm_calls: u64,
    pub gemm_macs: u64,
}

/// An op call whose events the GPU may not have passed yet.
struct PendingCall {
    op: &'static str,
    start: GpuEvent,
    end: GpuEvent,
}

/// The device side of the timers.
#[derive(Default)]
struct DeviceClock {
    pending: Vec<PendingCall>,
    /// The first start event since the last reset, and the latest end event read.
    window_start: Option<GpuEvent>,
    window_end: Option<GpuEvent>,
    /// Kernels per op, summed over its device calls.
    kernels: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    /// Why the device timing stopped, if it did (an event failed): the table says so.
    failure: Option<String>,
}

/// Pending calls beyond this are read at once (which waits for the GPU), so a long run keeps a
/// bounded number of events.
const MAX_PENDING: usize = 4096;

/// A backend that times every op of the backend it wraps.
pub struct ProfiledBackend {
    inner: Arc<dyn Backend>,
    times: Mutex<BTreeMap<&'static str, OpTime>>,
    device: Mutex<DeviceClock>,
}

/// A poisoned lock only means another thread panicked mid-update: the counts stay usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ProfiledBackend {
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        ProfiledBackend { inner, times: Mutex::new(BTreeMap::new()), device: Mutex::new(DeviceClock::default()) }
    }

    /// The backend being timed.
    pub fn inner(&self) -> &Arc<dyn Backend> {
        &self.inner
    }

    /// The GPU whose stream this op runs on, when its calls can be timed there now.
    fn clock(&self) -> Option<&Gpu> {
        let gpu = self.inner.gpu()?;
        (!gpu.is_capturing() && lock(&self.device).failure.is_none()).then_some(gpu)
    }

    fn time<T>(&self, op: &'static str, f: impl FnOnce() -> T) -> T {
        let gpu = self.clock();
        let before = gpu.map(|g| (g.launch_counts(), g.record_event()));
        let start = Instant::now();
        let out = f();
        let spent = start.elapsed();
        let device = match (gpu, before) {
            (Some(g), Some((counts, Ok(start_event)))) => match g.record_event() {
                Ok(end_event) => Some((g, g.launch_counts().since(&counts), start_event, end_event)),
                Err(e) => self.fail(format!("recording an event after {op}: {e}")),
            },
            (_, Some((_, Err(e)))) => self.fail(format!("recording an event before {op}: {e}")),
            _ => None,
        };
        let mut times = lock(&self.times);
        let e = times.entry(op).or_default();
        e.calls += 1;
        e.total += spent;
        if let Some((gpu, launched, start, end)) = device {
            e.kernel_launches += launched.kernels.values().sum::<u64>();
            e.gemm_calls += launched.gemm_calls;
            e.gemm_macs += launched.gemm_macs;
            drop(times);
            let mut clock = lock(&self.device);
            let per_op = clock.kernels.entry(op).or_default();
            for (k, n) in launched.kernels {
                *per_op.entry(k).or_default() += n;
            }
            clock.pending.push(PendingCall { op, start, end });
            if clock.pending.len() >= MAX_PENDING {
                self.resolve(gpu, &mut clock);
            }
        }
        out
    }

    /// Stops the device timing for good, saying why (the host timing goes on).
    fn fail<T>(&self, why: String) -> Option<T> {
        lock(&self.device).failure.get_or_insert(why);
        None
    }

    /// Reads every pending call's GPU time (waiting for the GPU to pass its events).
    fn resolve(&self, gpu: &Gpu, clock: &mut DeviceClock) {
        let pending = std::mem::take(&mut clock.pending);
        let mut times = lock(&self.times);
        for call in pending {
            match gpu.elapsed_ms(&call.start, &call.end) {
                Ok(ms) => {
                    let e = times.entry(call.op).or_default();
                    e.device_calls += 1;
                    e.device += Duration::from_secs_f64(ms.max(0.0) as f64 / 1e3);
                }
                Err(e) => {
                    clock.failure.get_or_insert(format!("reading the events of {}: {e}", call.op));
                    continue;
                }
            }
            if clock.window_start.is_none() {
                clock.window_start = Some(call.start);
            }
            clock.window_end = Some(call.end);
        }
    }

    /// Every pending device time read (waits for the GPU).
    fn settle(&self) {
        if let Some(gpu) = self.inner.gpu() {
            let mut clock = lock(&self.device);
            self.resolve(gpu, &mut clock);
        }
    }

    /// Every op timed so far, most expensive first (by GPU time where there is one, else host
    /// time). Waits for the GPU to finish what was timed.
    pub fn times(&self) -> Vec<(&'static str, OpTime)> {
        self.settle();
        let times = lock(&self.times);
        let mut v: Vec<_> = times.iter().map(|(k, t)| (*k, *t)).collect();
        v.sort_by(|a, b| b.1.device.cmp(&a.1.device).then(b.1.total.cmp(&a.1.total)).then(a.0.cmp(b.0)));
        v
    }

    /// The kernels each op launched (summed over its device-timed calls), by op.
    pub fn kernels(&self) -> BTreeMap<&'static str, BTreeMap<&'static str, u64>> {
        lock(&self.device).kernels.clone()
    }

    /// GPU time from the first timed op's start to the last one's end: the device's span of the
    /// timed window, gaps between ops included. `None` without device timing.
    pub fn device_span(&self) -> Option<Duration> {
        self.settle();
        let gpu = self.inner.gpu()?;
        let clock = lock(&self.device);
        let ms = gpu.elapsed_ms(clock.window_start.as_ref()?, clock.window_end.as_ref()?).ok()?;
        Some(Duration::from_secs_f64(ms.max(0.0) as f64 / 1e3))
    }

    /// Why device timing stopped, if it did.
    pub fn device_failure(&self) -> Option<String> {
        lock(&self.device).failure.clone()
    }

    /// Forget what was timed (e.g. after warm-up steps). Waits for the GPU's pending events.
    pub fn reset(&self) {
        self.settle();
        lock(&self.times).clear();
        let mut clock = lock(&self.device);
        let failure = clock.failure.take();
        *clock = DeviceClock { failure, ..DeviceClock::default() };
    }

    /// A Markdown table: op, calls, total ms, share of the timed total, µs per call; over a CUDA
    /// backend also the GPU time, its share, the launches per call and the dense products'
    /// FLOP rate over the op's GPU time, and the device span below the table.
    pub fn report(&self) -> String {
        let times = self.times();
        let host: Duration = times.iter().map(|(_, t)| t.total).sum();
        let device: Duration = times.iter().map(|(_, t)| t.device).sum();
        let pct = |part: Duration, all: Duration| if all.is_zero() { 0.0 } else { part.as_secs_f64() / all.as_secs_f64() * 100.0 };
        let mut s = String::new();
        if device.is_zero() {
            s += "| op | calls | total (ms) | share | per call (µs) |\n|---|---:|---:|---:|---:|\n";
            for (op, t) in &times {
                let per = t.total.as_secs_f64() * 1e6 / t.calls.max(1) as f64;
                s += &format!("| {op} | {} | {:.1} | {:.1} % | {per:.0} |\n", t.calls, t.total.as_secs_f64() * 1e3, pct(t.total, host));
            }
            s += &format!("| **all ops** | | **{:.1}** | 100 % | |\n", host.as_secs_f64() * 1e3);
        } else {
            s += "| op | calls | GPU (ms) | GPU share | GPU per call (µs) | host (ms) | launches per call | GEMM TFLOP/s |\n|---|---:|---:|---:|---:|---:|---:|---:|\n";
            for (op, t) in &times {
                let per = t.device.as_secs_f64() * 1e6 / t.device_calls.max(1) as f64;
                let launches = (t.kernel_launches + t.gemm_calls) as f64 / t.device_calls.max(1) as f64;
                let tflops = if t.gemm_macs == 0 || t.device.is_zero() { "".to_string() } else { format!("{:.1}", 2.0 * t.gemm_macs as f64 / t.device.as_secs_f64() / 1e12) };
                s += &format!(
                    "| {op} | {} | {:.2} | {:.1} % | {per:.1} | {:.2} | {launches:.1} | {tflops} |\n",
                    t.calls,
                    t.device.as_secs_f64() * 1e3,
                    pct(t.device, device),
                    t.total.as_secs_f64() * 1e3
                );
            }
            s += &format!("| **all ops** | | **{:.2}** | 100 % | | **{:.2}** | | |\n", device.as_secs_f64() * 1e3, host.as_secs_f64() * 1e3);
            if let Some(span) = self.device_span() {
                s += &format!(
                    "\nGPU span of the timed window: {:.2} ms; the ops' intervals cover {:.1} % of it (the rest is the GPU between ops: host work and launch latency).\n",
                    span.as_secs_f64() * 1e3,
                    pct(device, span)
                );
            }
        }
        if let Some(why) = self.device_failure() {
            s += &format!("\nDevice timing stopped: {why}; the GPU columns cover the calls before that.\n");
        }
        s
    }

    /// The kernels per op as Markdown lines, `op (calls): kernel ×n per call, …`, for the ops in
    /// [`ProfiledBackend::times`]'s order.
    pub fn kernel_report(&self) -> String {
        let kernels = self.kernels();
        let mut s = String::new();
        for (op, t) in self.times() {
            let Some(ks) = kernels.get(op) else { continue };
            let calls = t.device_calls.max(1) as f64;
            let mut parts: Vec<String> = ks.iter().map(|(k, n)| format!("`{k}` ×{}", trim(*n as f64 / calls))).collect();
            if t.gemm_calls > 0 {
                parts.push(format!("{} GEMMs ({:.3} GFLOP)", trim(t.gemm_calls as f64 / calls), 2.0 * t.gemm_macs as f64 / calls / 1e9));
            }
            if !parts.is_empty() {
                s += &format!("- {op} ({} calls), per call: {}\n", t.device_calls, parts.join(", "));
            }
        }
        s
    }
}

/// `3` for 3.0, `2.5` for 2.5: counts per call that are usually whole.
fn trim(x: f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

impl Backend for ProfiledBackend {
    fn device(&self) -> Device {
        self.inner.device()
    }

    fn name(&self) -> String {
        format!("{} (profiled)", self.inner.name())
    }

    fn length_bucket(&self) -> usize {
        self.inner.length_bucket()
    }

    fn supports_training(&self) -> bool {
        self.inner.supports_training()
    }

    /// The wrapped backend's: graph capture, NCCL's stream check and the device timers go
    /// through it.
    fn gpu(&self) -> Option<&Gpu> {
        self.inner.gpu()
    }

    fn embedding_layernorm(&self, input_ids: &Tensor, token_type_ids: &Tensor, word: &Tensor, position: &Tensor, token_type: &Tensor, positions: crate::backend::Positions, ln: crate::backend::LayerNormParams<'_>, dropout: Option<&DropoutSpec>) -> Result<Tensor> {
        self.time("embedding_layernorm", || self.inner.embedding_layernorm(input_ids, token_type_ids, word, position, token_type, positions, ln, dropout))
    }

    fn upload(&self, data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        self.time("upload", || self.inner.upload(data, shape))
    }

    fn to_host(&self, t: &Tensor) -> Result<Vec<f32>> {
        self.time("to_host", || self.inner.to_host(t))
    }

    fn upload_u32(&self, data: Vec<u32>, shape: &[usize]) -> Result<Tensor> {
        self.time("upload_u32", || self.inner.upload_u32(data, shape))
    }

    fn to_host_u32(&self, t: &Tensor) -> Result<Vec<u32>> {
        self.time("to_host_u32", || self.inner.to_host_u32(t))
    }

    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.time("zeros", || self.inner.zeros(shape, dtype))
    }

    fn empty(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.time("empty", || self.inner.empty(shape, dtype))
    }

    fn all_finite(&self, t: &Tensor) -> Result<bool> {
        self.time("all_finite", || self.inner.all_finite(t))
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        self.time("linear", || self.inner.linear(x, w, b))
    }

    fn linear_dropout(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, dropout: Option<&DropoutSpec>) -> Result<Tensor> {
        self.time("linear_dropout", || self.inner.linear_dropout(x, w, b, dropout))
    }

    fn linear_act(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Activation) -> Result<(Tensor, Tensor)> {
        self.time("linear_act", || self.inner.linear_act(x, w, b, act))
    }

    fn linear_act_only(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Activation) -> Result<Tensor> {
        self.time("linear_act_only", || self.inner.linear_act_only(x, w, b, act))
    }

    fn linear_backward_input_act(&self, dy: &Tensor, w: &Tensor, pre: &Tensor, act: Activation) -> Result<Tensor> {
        self.time("linear_backward_input_act", || self.inner.linear_backward_input_act(dy, w, pre, act))
    }

    fn embedding(&self, input_ids: &Tensor, token_type_ids: &Tensor, word: &Tensor, position: &Tensor, token_type: &Tensor, positions: crate::backend::Positions) -> Result<Tensor> {
        self.time("embedding", || self.inner.embedding(input_ids, token_type_ids, word, position, token_type, positions))
    }

    fn residual_layernorm(&self, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
        self.time("residual_layernorm", || self.inner.residual_layernorm(x, residual, gamma, beta, eps))
    }

    fn residual_layernorm_stats(&self, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<(Tensor, Tensor, Tensor)> {
        self.time("residual_layernorm_stats", || self.inner.residual_layernorm_stats(x, residual, gamma, beta, eps))
    }

    fn layernorm_backward_stats(&self, dy: &Tensor, z: &Tensor, stats: &Tensor, gamma: &Tensor) -> Result<Tensor> {
        self.time("layernorm_backward_stats", || self.inner.layernorm_backward_stats(dy, z, stats, gamma))
    }

    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_dropout(&self, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor, eps: f32, dropout: Option<&DropoutSpec>) -> Result<Tensor> {
        self.time("residual_layernorm_dropout", || self.inner.residual_layernorm_dropout(x, residual, gamma, beta, eps, dropout))
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask_bias: &Tensor, heads: usize, dropout: Option<&DropoutSpec>) -> Result<Tensor> {
        self.time("attention", || self.inner.attention(q, k, v, mask_bias, heads, dropout))
    }

    fn attention_packed(&self, qkv: &Tensor, mask_bias: &Tensor, heads: usize, dropout: Option<&DropoutSpec>) -> Result<(Tensor, Tensor)> {
        self.time("attention_packed", || self.inner.attention_packed(qkv, mask_bias, heads, dropout))
    }

    fn activation(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        self.time("activation", || self.inner.activation(x, act))
    }

    fn adapter_location(&self, loc: &AdapterLocation) -> Result<Tensor> {
        self.time("adapter_location", || self.inner.adapter_location(loc))
    }

    fn nice(&self, x: &Tensor, params: &NiceParams, inverse: bool) -> Result<Tensor> {
        self.time("nice", || self.inner.nice(x, params, inverse))
    }

    fn linear_backward_input_into(&self, dy: &Tensor, w: &Tensor, out: &Tensor, accumulate: bool) -> Result<()> {
        self.time("linear_backward_input_into", || self.inner.linear_backward_input_into(dy, w, out, accumulate))
    }

    fn linear_backward_input(&self, dy: &Tensor, w: &Tensor) -> Result<Tensor> {
        self.time("linear_backward_input", || self.inner.linear_backward_input(dy, w))
    }

    fn linear_backward_params_into(&self, dy: &Tensor, x: &Tensor, dw: &Tensor, db: Option<&Tensor>, accumulate: bool) -> Result<()> {
        self.time("linear_backward_params_into", || self.inner.linear_backward_params_into(dy, x, dw, db, accumulate))
    }

    fn linear_backward_params(&self, dy: &Tensor, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.time("linear_backward_params", || self.inner.linear_backward_params(dy, x))
    }

    fn activation_backward(&self, dy: &Tensor, pre: &Tensor, act: Activation) -> Result<Tensor> {
        self.time("activation_backward", || self.inner.activation_backward(dy, pre, act))
    }

    fn layernorm_backward_input(&self, dy: &Tensor, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, eps: f32) -> Result<Tensor> {
        self.time("layernorm_backward_input", || self.inner.layernorm_backward_input(dy, x, residual, gamma, eps))
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_backward(&self, dctx: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, mask_bias: &Tensor, heads: usize, dropout: Option<&DropoutSpec>) -> Result<[Tensor; 3]> {
        self.time("attention_backward", || self.inner.attention_backward(dctx, q, k, v, mask_bias, heads, dropout))
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_packed_backward(&self, dctx: &Tensor, qkv: &Tensor, lse: &Tensor, mask_bias: &Tensor, heads: usize, dropout: Option<&DropoutSpec>) -> Result<Tensor> {
        self.time("attention_packed_backward", || self.inner.attention_packed_backward(dctx, qkv, lse, mask_bias, heads, dropout))
    }

    fn adapter_location_backward_into(&self, loc: &AdapterLocation, d_out: &Tensor, grads: &[Option<GradsOut<BottleneckGrads>>], need_input_grads: bool) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.time("adapter_location_backward_into", || self.inner.adapter_location_backward_into(loc, d_out, grads, need_input_grads))
    }

    fn adapter_location_backward(&self, loc: &AdapterLocation, d_out: &Tensor, trainable: &[bool], need_input_grads: bool) -> Result<LocationGrads> {
        self.time("adapter_location_backward", || self.inner.adapter_location_backward(loc, d_out, trainable, need_input_grads))
    }

    fn nice_backward_into(&self, x: &Tensor, params: &NiceParams, dy: &Tensor, out: &GradsOut<NiceGrads>) -> Result<()> {
        self.time("nice_backward_into", || self.inner.nice_backward_into(x, params, dy, out))
    }

    fn nice_backward(&self, x: &Tensor, params: &NiceParams, dy: &Tensor) -> Result<NiceGrads> {
        self.time("nice_backward", || self.inner.nice_backward(x, params, dy))
    }

    fn dropout(&self, x: &Tensor, spec: &DropoutSpec) -> Result<Tensor> {
        self.time("dropout", || self.inner.dropout(x, spec))
    }

    fn scale_in_place(&self, t: &Tensor, factor: f32) -> Result<()> {
        self.time("scale_in_place", || self.inner.scale_in_place(t, factor))
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.time("add", || self.inner.add(a, b))
    }

    fn select_rows(&self, t: &Tensor, ranges: &[std::ops::Range<usize>]) -> Result<Tensor> {
        self.time("select_rows", || self.inner.select_rows(t, ranges))
    }

    fn first_token_backward_into(&self, d: &Tensor, out: &Tensor, accumulate: bool) -> Result<()> {
        self.time("first_token_backward_into", || self.inner.first_token_backward_into(d, out, accumulate))
    }

    fn first_token_backward(&self, d: &Tensor, seq_len: usize) -> Result<Tensor> {
        self.time("first_token_backward", || self.inner.first_token_backward(d, seq_len))
    }

    fn first_token(&self, x: &Tensor) -> Result<Tensor> {
        self.time("first_token", || self.inner.first_token(x))
    }

    fn cast(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        self.time("cast", || self.inner.cast(t, dtype))
    }

    fn fill(&self, t: &Tensor, value: f32) -> Result<()> {
        self.time("fill", || self.inner.fill(t, value))
    }

    fn add_into(&self, dst: &Tensor, src: &Tensor) -> Result<()> {
        self.time("add_into", || self.inner.add_into(dst, src))
    }

    fn write_u32(&self, dst: &Tensor, data: &[u32]) -> Result<()> {
        self.time("write_u32", || self.inner.write_u32(dst, data))
    }

    fn write_f32(&self, dst: &Tensor, data: &[f32]) -> Result<()> {
        self.time("write_f32", || self.inner.write_f32(dst, data))
    }

    fn loss(&self, op: &crate::train::loss::LossOp, dlogits: &Tensor, loss: &Tensor) -> Result<()> {
        self.time("loss", || self.inner.loss(op, dlogits, loss))
    }

    fn clip_grad_norm(&self, grads: &[Tensor], max_norm: f32, norm: &Tensor) -> Result<()> {
        self.time("clip_grad_norm", || self.inner.clip_grad_norm(grads, max_norm, norm))
    }

    fn adamw(&self, step: &crate::train::optim::AdamWLaunch) -> Result<()> {
        self.time("adamw", || self.inner.adamw(step))
    }
}
