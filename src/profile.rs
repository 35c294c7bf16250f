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
//! On the CPU every op is synchronous, so the time is the op's. On an asynchronous device it is
//! the time to enqueue, unless that backend synchronises; profile devices with their own events.
//! `cargo bench --bench op_profile` prints the table for the MiniLM Parallel step.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::{Activation, AdapterLocation, Backend, BottleneckGrads, DropoutSpec, GradsOut, LocationGrads, NiceGrads, NiceParams};
use crate::device::Device;
use crate::error::Result;
use crate::tensor::{DType, Tensor};

/// Calls and total time of one op.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OpTime {
    pub calls: u64,
    pub total: Duration,
}

/// A backend that times every op of the backend it wraps.
pub struct ProfiledBackend {
    inner: Arc<dyn Backend>,
    times: Mutex<BTreeMap<&'static str, OpTime>>,
}

impl ProfiledBackend {
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        ProfiledBackend { inner, times: Mutex::new(BTreeMap::new()) }
    }

    /// The backend being timed.
    pub fn inner(&self) -> &Arc<dyn Backend> {
        &self.inner
    }

    fn time<T>(&self, op: &'static str, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        let spent = start.elapsed();
        // A poisoned lock only means another thread panicked mid-update: the counts stay usable.
        let mut times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        let e = times.entry(op).or_default();
        e.calls += 1;
        e.total += spent;
        out
    }

    /// Every op timed so far, most expensive first.
    pub fn times(&self) -> Vec<(&'static str, OpTime)> {
        let times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = times.iter().map(|(k, t)| (*k, *t)).collect();
        v.sort_by(|a, b| b.1.total.cmp(&a.1.total).then(a.0.cmp(b.0)));
        v
    }

    /// Forget what was timed (e.g. after warm-up steps).
    pub fn reset(&self) {
        self.times.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// A Markdown table: op, calls, total ms, share of the timed total, µs per call.
    pub fn report(&self) -> String {
        let times = self.times();
        let total: Duration = times.iter().map(|(_, t)| t.total).sum();
        let mut s = String::from("| op | calls | total (ms) | share | per call (µs) |\n|---|---:|---:|---:|---:|\n");
        for (op, t) in &times {
            let share = if total.is_zero() { 0.0 } else { t.total.as_secs_f64() / total.as_secs_f64() * 100.0 };
            let per = t.total.as_secs_f64() * 1e6 / t.calls.max(1) as f64;
            s += &format!("| {op} | {} | {:.1} | {share:.1} % | {per:.0} |\n", t.calls, t.total.as_secs_f64() * 1e3);
        }
        s += &format!("| **all ops** | | **{:.1}** | 100 % | |\n", total.as_secs_f64() * 1e3);
        s
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
