//! The CPU backend: a plain reference (`reference`, the spec) and a fast path (`fast`, what the
//! model uses), behind one `Backend` implementation that checks shapes once for both.

// One file (or folder) per op family, forward and backward side by side, as the CUDA kernels have
// them. The files depend one way, adapter, nice -> prims -> fast -> reference, besides the shared
// types and dropout here.
mod adapter;
pub mod fast;
mod nice;
mod prims;
pub mod reference;
mod train_ops;
pub(crate) mod pool;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::backend::{Activation, AdapterLocation, Backend, BottleneckGrads, DropoutSpec, GradsOut, NiceGrads, NiceParams, TokenBatch};
use crate::train::dropout::{dropout_range, DropoutRng};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Which CPU implementation runs the ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    /// Plain loops with f64 accumulation: slow, obvious, the oracle for everything else.
    Reference,
    /// gemm + rayon: what the model runs on by default.
    Fast,
}

/// Kinds of matrix product, for the counters that prove the backward skips frozen work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmKind {
    Forward = 0,
    /// `dy·W`: an input gradient.
    InputGrad = 1,
    /// `dyᵀ·x`: a weight gradient.
    WeightGrad = 2,
}

/// How many matrix products of each kind a backend has run, and their multiply-adds.
#[derive(Debug, Default)]
pub struct GemmStats {
    calls: [AtomicUsize; 3],
    macs: [AtomicUsize; 3],
}

/// A snapshot of `GemmStats`: `[forward, input gradient, weight gradient]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GemmCounts {
    pub calls: [usize; 3],
    pub macs: [usize; 3],
}

impl GemmCounts {
    pub fn input_grad(&self) -> (usize, usize) {
        (self.calls[1], self.macs[1])
    }
    pub fn weight_grad(&self) -> (usize, usize) {
        (self.calls[2], self.macs[2])
    }
}

impl GemmStats {
    /// One product of `macs` multiply-adds.
    pub(crate) fn count(&self, kind: GemmKind, macs: usize) {
        let i = kind as usize;
        self.calls[i].fetch_add(1, Ordering::Relaxed);
        self.macs[i].fetch_add(macs, Ordering::Relaxed);
    }
    pub fn snapshot(&self) -> GemmCounts {
        GemmCounts {
            calls: std::array::from_fn(|i| self.calls[i].load(Ordering::Relaxed)),
            macs: std::array::from_fn(|i| self.macs[i].load(Ordering::Relaxed)),
        }
    }
}

impl std::ops::Sub for GemmCounts {
    type Output = GemmCounts;
    fn sub(self, o: GemmCounts) -> GemmCounts {
        GemmCounts {
            calls: std::array::from_fn(|i| self.calls[i] - o.calls[i]),
            macs: std::array::from_fn(|i| self.macs[i] - o.macs[i]),
        }
    }
}

/// Host↔device traffic of a backend (on the CPU backend, the calls that would be transfers on a
/// device): the counter behind "only what a user asks for comes back".
#[derive(Debug, Default)]
pub struct TransferStats {
    new_buffers: AtomicUsize,
    uploads: AtomicUsize,
    upload_bytes: AtomicUsize,
    readbacks: AtomicUsize,
    readback_bytes: AtomicUsize,
}

/// A snapshot of `TransferStats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransferCounts {
    /// Uploads that created a buffer (rather than writing into an existing one).
    pub new_buffers: usize,
    /// Host → device copies (uploads and writes into device buffers) and their bytes.
    pub uploads: usize,
    pub upload_bytes: usize,
    /// Device → host copies and their bytes.
    pub readbacks: usize,
    pub readback_bytes: usize,
}

impl std::ops::Sub for TransferCounts {
    type Output = TransferCounts;
    fn sub(self, o: TransferCounts) -> TransferCounts {
        TransferCounts { new_buffers: self.new_buffers - o.new_buffers, uploads: self.uploads - o.uploads, upload_bytes: self.upload_bytes - o.upload_bytes, readbacks: self.readbacks - o.readbacks, readback_bytes: self.readback_bytes - o.readback_bytes }
    }
}

impl TransferStats {
    fn up(&self, bytes: usize) {
        self.uploads.fetch_add(1, Ordering::Relaxed);
        self.upload_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    fn down(&self, bytes: usize) {
        self.readbacks.fetch_add(1, Ordering::Relaxed);
        self.readback_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    pub fn snapshot(&self) -> TransferCounts {
        TransferCounts {
            new_buffers: self.new_buffers.load(Ordering::Relaxed),
            uploads: self.uploads.load(Ordering::Relaxed),
            upload_bytes: self.upload_bytes.load(Ordering::Relaxed),
            readbacks: self.readbacks.load(Ordering::Relaxed),
            readback_bytes: self.readback_bytes.load(Ordering::Relaxed),
        }
    }
}

#[derive(Clone, Debug)]
pub struct CpuBackend {
    mode: CpuMode,
    stats: Arc<GemmStats>,
    transfers: Arc<TransferStats>,
    /// Where op outputs come from and go back to, in pooled mode (see `cpu::pool`).
    pool: Option<Arc<crate::tensor::HostPool>>,
}

impl CpuBackend {
    pub fn new(mode: CpuMode) -> Self {
        CpuBackend { mode, stats: Arc::new(GemmStats::default()), transfers: Arc::new(TransferStats::default()), pool: None }
    }
    /// A backend whose op outputs come from a caching pool and go back to it (see `cpu::pool`):
    /// after the first steps of a repeated shape, a training step creates no buffer and reuses the
    /// same ones in the same order, as a device backend's caching allocator lets a step be
    /// captured. Not the default on the CPU: it holds every buffer size it has seen (up to
    /// `tensor::MAX_IDLE_BYTES`), and its speed against plain allocation could not be separated
    /// from this machine's run-to-run noise (±15%).
    pub fn pooled(mode: CpuMode) -> Self {
        CpuBackend { pool: Some(Arc::default()), ..Self::new(mode) }
    }
    /// The output pool's counters (buffers created, reused, wrapped); zeros when not pooled.
    pub fn pool_counts(&self) -> crate::tensor::PoolCounts {
        self.pool.as_ref().map(|p| p.counts()).unwrap_or_default()
    }
    /// The output pool, in pooled mode (to trace the buffers a step uses).
    pub fn pool(&self) -> Option<&Arc<crate::tensor::HostPool>> {
        self.pool.as_ref()
    }
    /// An op output (in pooled mode the kernel took it from `pool::zeros` inside the op's scope).
    fn wrap(&self, v: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        match &self.pool {
            Some(pool) => Tensor::from_pool(pool, v, shape),
            None => Tensor::from_vec(v, shape),
        }
    }
    /// The op's output scope: kernels draw their outputs from the pool while it lives.
    fn scope(&self) -> Option<pool::Scope> {
        self.pool.as_ref().map(pool::Scope::enter)
    }
    /// Host↔device copies so far (uploads, writes, readbacks).
    pub fn transfer_counts(&self) -> TransferCounts {
        self.transfers.snapshot()
    }
    /// Matrix products run so far, by kind (attention's batched products count once per call).
    pub fn gemm_counts(&self) -> GemmCounts {
        self.stats.snapshot()
    }
    fn prims(&self) -> prims::Prims<'_> {
        prims::Prims { mode: self.mode, stats: &self.stats, pool: self.pool.as_ref() }
    }
    pub fn fast() -> Self {
        Self::new(CpuMode::Fast)
    }
    pub fn reference() -> Self {
        Self::new(CpuMode::Reference)
    }
    pub fn mode(&self) -> CpuMode {
        self.mode
    }
}

/// The seed of `spec`: read from its device buffer when it has one (as a kernel does).
fn spec_seed(spec: &DropoutSpec) -> Result<u64> {
    match &spec.seed_buffer {
        Some(buf) => {
            let words = buf.0.cpu_slice::<u32>()?;
            match &words[..] {
                [lo, hi] => Ok(*lo as u64 | (*hi as u64) << 32),
                other => Err(Error::shape("dropout", format!("seed buffer of {} words, expected 2", other.len()))),
            }
        }
        None => Ok(spec.seed),
    }
}

/// Apply `spec` to a row-major buffer whose rows split evenly into the spec's blocks.
pub(crate) fn apply_dropout(data: &mut [f32], spec: &DropoutSpec) -> Result<()> {
    let total = data.len();
    apply_dropout_at(data, spec, total, 0)
}

/// `apply_dropout` on elements `start..start + data.len()` of a tensor of `total` elements (one
/// row block of a product's output, in its epilogue): each element draws what it would draw in
/// the whole tensor.
pub(crate) fn apply_dropout_at(data: &mut [f32], spec: &DropoutSpec, total: usize, start: usize) -> Result<()> {
    let n = spec.blocks.len().max(1);
    if !total.is_multiple_of(n) || start + data.len() > total {
        return Err(Error::shape("dropout", format!("{total} elements do not split into {n} blocks")));
    }
    let rng = DropoutRng::new(spec_seed(spec)?);
    let block = (total / n).max(1);
    let (mut at, mut rest) = (start, data);
    while !rest.is_empty() {
        let (j, offset) = (at / block, at % block);
        let (head, tail) = rest.split_at_mut((block - offset).min(rest.len()));
        dropout_range(head, spec.p, &rng, spec.block_stream(j), offset + spec.offset as usize)?;
        at += head.len();
        rest = tail;
    }
    Ok(())
}

/// The attention-probability dropout of `spec` as per-row multipliers: probability `(b, h, i, j)`
/// is element `((b_local·heads + h)·T + i)·T + j` of its block's stream (plus `spec.offset`).
fn prob_dropout(spec: &DropoutSpec, batch: usize, seq: usize, heads: usize) -> Result<Box<reference::ProbDropout>> {
    let n = spec.blocks.len().max(1);
    if !batch.is_multiple_of(n) {
        return Err(Error::shape("attention", format!("batch {batch} does not split into {n} dropout blocks")));
    }
    crate::train::dropout::DropoutParams::new(spec.p)?;
    let per_block = batch / n;
    let rng = DropoutRng::new(spec_seed(spec)?);
    let spec = spec.clone();
    Ok(Box::new(move |b: usize, h: usize, i: usize, factors: &mut [f32]| {
        factors.iter_mut().for_each(|f| *f = 1.0);
        let (j, b_local) = (b / per_block, b % per_block);
        let offset = ((b_local * heads + h) * seq + i) * seq + spec.offset as usize;
        // p was validated above, so this cannot fail.
        let _ = dropout_range(factors, spec.p, &rng, spec.block_stream(j), offset);
    }))
}

fn expect_shape(op: &'static str, what: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.shape() != shape {
        return Err(Error::shape(op, format!("{what} has shape {:?}, expected {shape:?}", t.shape())));
    }
    Ok(())
}

/// The attention mask is `[B, T]` and is read at row `b % B`, so the N·B rows of replicated
/// Parallel branches share one mask (never tiled).
fn expect_mask(op: &'static str, mask: &Tensor, batch: usize, seq: usize) -> Result<()> {
    let rows = mask.shape().first().copied().unwrap_or(0);
    if mask.rank() != 2 || mask.shape()[1] != seq || rows == 0 || !batch.is_multiple_of(rows) {
        return Err(Error::shape(op, format!("mask has shape {:?}, expected [B, {seq}] with B dividing {batch}", mask.shape())));
    }
    Ok(())
}

/// `(B, T, H)` of a packed `[B, T, 3H]` Q, K, V, checked with its mask and head count.
fn packed_dims(op: &'static str, qkv: &Tensor, mask: &Tensor, heads: usize) -> Result<(usize, usize, usize)> {
    let s = qkv.shape();
    if s.len() != 3 || !s[2].is_multiple_of(3) {
        return Err(Error::shape(op, format!("packed Q, K, V has shape {s:?}, expected [B, T, 3H]")));
    }
    let (batch, seq, h) = (s[0], s[1], s[2] / 3);
    if heads == 0 || !h.is_multiple_of(heads) {
        return Err(Error::shape(op, format!("hidden {h} is not divisible by {heads} heads")));
    }
    expect_mask(op, mask, batch, seq)?;
    Ok((batch, seq, h))
}

/// Q, K and V of a packed `[B, T, 3H]` tensor as three `[B, T, H]` tensors.
fn split_qkv(qkv: &Tensor) -> Result<[Tensor; 3]> {
    let s = qkv.shape();
    if s.len() != 3 || !s[2].is_multiple_of(3) {
        return Err(Error::shape("attention_packed", format!("packed Q, K, V has shape {s:?}, expected [B, T, 3H]")));
    }
    let h = s[2] / 3;
    let data = qkv.f32_data()?;
    let part = |i: usize| -> Result<Tensor> { Tensor::from_vec(data.chunks(3 * h).flat_map(|row| row[i * h..(i + 1) * h].iter().copied()).collect(), &[s[0], s[1], h]) };
    Ok([part(0)?, part(1)?, part(2)?])
}

/// The shapes of `LN(x + residual)`; returns the normalised width.
fn check_layernorm(op: &'static str, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor) -> Result<usize> {
    let cols = x.last_dim();
    if let Some(r) = residual {
        expect_shape(op, "residual", r, x.shape())?;
    }
    expect_shape(op, "gamma", gamma, &[cols])?;
    expect_shape(op, "beta", beta, &[cols])?;
    Ok(cols)
}

fn expect_rank(op: &'static str, what: &str, t: &Tensor, rank: usize) -> Result<()> {
    if t.rank() != rank {
        return Err(Error::shape(op, format!("{what} has shape {:?}, expected rank {rank}", t.shape())));
    }
    Ok(())
}

/// `(d_out, d_in)` of an input-gradient product `dy·W`, after checking `dy` ends in `d_out`.
fn linear_backward_dims(op: &'static str, dy: &Tensor, w: &Tensor) -> Result<(usize, usize)> {
    expect_rank(op, "weight", w, 2)?;
    let (d_out, d_in) = (w.shape()[0], w.shape()[1]);
    if dy.rank() == 0 || dy.last_dim() != d_out {
        return Err(Error::shape(op, format!("gradient {:?} does not end in {d_out} (weight {:?})", dy.shape(), w.shape())));
    }
    Ok((d_out, d_in))
}

impl CpuBackend {
    /// `linear`'s checks and product with an epilogue: in fast mode applied per row block right
    /// after the block's product (see `fast::linear_epilogue`), in reference mode once over the
    /// whole output. With `aux`, a second output of the product's shape is handed to it.
    fn linear_with(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, aux: bool, epilogue: Option<fast::Epilogue>) -> Result<(Tensor, Option<Tensor>)> {
        let _pool = self.scope();
        const OP: &str = "linear";
        expect_rank(OP, "weight", w, 2)?;
        let (d_out, d_in) = (w.shape()[0], w.shape()[1]);
        if x.rank() == 0 || x.last_dim() != d_in {
            return Err(Error::shape(OP, format!("input {:?} does not end in {d_in} (weight {:?})", x.shape(), w.shape())));
        }
        if let Some(b) = b {
            expect_shape(OP, "bias", b, &[d_out])?;
        }
        let rows = x.rows();
        self.stats.count(GemmKind::Forward, rows * d_in * d_out);
        let (xs, ws, bs) = (&*x.f32_data()?, &*w.f32_data()?, b.map(|b| b.f32_data()).transpose()?);
        let bs = bs.as_deref();
        let mut aux_out = aux.then(|| pool::buffer(rows * d_out));
        let y = match self.mode {
            CpuMode::Reference => {
                let mut y = reference::linear(xs, ws, bs, rows, d_in, d_out);
                if let Some(f) = epilogue {
                    f(0, &mut y, aux_out.as_deref_mut())?;
                }
                y
            }
            CpuMode::Fast => fast::linear_epilogue(xs, ws, bs, rows, d_in, d_out, aux_out.as_deref_mut(), epilogue)?,
        };
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("rank checked above") = d_out;
        let aux_out = aux_out.map(|a| self.wrap(a, &shape)).transpose()?;
        Ok((self.wrap(y, &shape)?, aux_out))
    }
}

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn name(&self) -> String {
        match self.mode {
            CpuMode::Reference => "cpu (reference)".into(),
            CpuMode::Fast => format!("cpu (fast, {} threads)", rayon::current_num_threads()),
        }
    }

    /// The CPU reuses nothing per shape, so extra padding is pure cost (a third slower at
    /// buckets of 16 on the default `train` data).
    fn length_bucket(&self) -> usize {
        1
    }

    fn upload(&self, data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        self.transfers.up(data.len() * 4);
        self.transfers.new_buffers.fetch_add(1, Ordering::Relaxed);
        Tensor::from_vec(data, shape)
    }

    fn to_host(&self, t: &Tensor) -> Result<Vec<f32>> {
        self.transfers.down(t.size_in_bytes());
        Ok(t.f32_data()?.to_vec())
    }

    fn upload_u32(&self, data: Vec<u32>, shape: &[usize]) -> Result<Tensor> {
        self.transfers.up(data.len() * 4);
        self.transfers.new_buffers.fetch_add(1, Ordering::Relaxed);
        Tensor::from_elems(data, shape)
    }

    fn to_host_u32(&self, t: &Tensor) -> Result<Vec<u32>> {
        self.transfers.down(t.size_in_bytes());
        Ok(t.cpu_slice::<u32>()?.to_vec())
    }

    fn zeros(&self, shape: &[usize], dtype: crate::tensor::DType) -> Result<Tensor> {
        if let (Some(pool), crate::tensor::DType::F32) = (&self.pool, dtype) {
            return self.wrap(pool.take_zeroed(shape.iter().product()), shape);
        }
        Ok(Tensor::zeros_of(dtype, shape))
    }

    // Pooled: an idle buffer as it is (the op overwrites it), no fill.
    fn empty(&self, shape: &[usize], dtype: crate::tensor::DType) -> Result<Tensor> {
        if let (Some(pool), crate::tensor::DType::F32) = (&self.pool, dtype) {
            return self.wrap(pool.take(shape.iter().product()), shape);
        }
        Ok(Tensor::zeros_of(dtype, shape))
    }

    fn all_finite(&self, t: &Tensor) -> Result<bool> {
        // One bool back to the host: a device sync and a transfer on a GPU.
        self.transfers.down(1);
        let x = &*t.f32_data()?;
        Ok(match self.mode {
            CpuMode::Reference => reference::all_finite(x),
            CpuMode::Fast => fast::all_finite(x),
        })
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.linear_with(x, w, b, false, None)?.0)
    }

    fn embedding(&self, input_ids: &Tensor, token_type_ids: &Tensor, word: &Tensor, position: &Tensor, token_type: &Tensor, positions: crate::backend::Positions) -> Result<Tensor> {
        let _pool = self.scope();
        const OP: &str = "embedding";
        expect_rank(OP, "input ids", input_ids, 2)?;
        expect_shape(OP, "token type ids", token_type_ids, input_ids.shape())?;
        let (ids, tts) = (input_ids.cpu_slice::<u32>()?, token_type_ids.cpu_slice::<u32>()?);
        let tokens = &TokenBatch { batch: input_ids.shape()[0], seq_len: input_ids.shape()[1], input_ids: &ids, token_type_ids: &tts };
        expect_rank(OP, "word embeddings", word, 2)?;
        let hidden = word.shape()[1];
        let n = tokens.batch * tokens.seq_len;
        if tokens.input_ids.len() != n || tokens.token_type_ids.len() != n {
            return Err(Error::shape(OP, format!("{n} tokens expected, got ids {} and types {}", tokens.input_ids.len(), tokens.token_type_ids.len())));
        }
        expect_rank(OP, "position embeddings", position, 2)?;
        expect_rank(OP, "token type embeddings", token_type, 2)?;
        if position.shape()[1] != hidden || token_type.shape()[1] != hidden {
            return Err(Error::shape(OP, "embedding tables of different widths".to_string()));
        }
        if positions.rows_needed(tokens.seq_len) > position.shape()[0] {
            return Err(Error::shape(
                OP,
                format!("sequence length {} needs {} position rows ({positions:?}), the table has {}", tokens.seq_len, positions.rows_needed(tokens.seq_len), position.shape()[0]),
            ));
        }
        let (vocab, types) = (word.shape()[0], token_type.shape()[0]);
        if let Some(id) = tokens.input_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::Input(format!("token id {id} >= vocabulary size {vocab}")));
        }
        if let Some(t) = tokens.token_type_ids.iter().find(|&&t| t as usize >= types) {
            return Err(Error::Input(format!("token type id {t} >= type vocabulary size {types}")));
        }
        let (w, p, t) = (&*word.f32_data()?, &*position.f32_data()?, &*token_type.f32_data()?);
        let y = match self.mode {
            CpuMode::Reference => reference::embedding(tokens, w, p, t, hidden, positions),
            CpuMode::Fast => fast::embedding(tokens, w, p, t, hidden, positions),
        };
        self.wrap(y, &[tokens.batch, tokens.seq_len, hidden])
    }

    // The CPU fuses by applying the epilogue to the product's own output buffer, in place: no
    // second tensor, no second pass over memory that left the cache.
    fn linear_dropout(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, dropout: Option<&DropoutSpec>) -> Result<Tensor> {
        let Some(spec) = dropout else { return self.linear(x, w, b) };
        let width = w.shape().first().copied().unwrap_or(0);
        let total = x.rows() * width;
        let epilogue = |r0: usize, y: &mut [f32], _: Option<&mut [f32]>| apply_dropout_at(y, spec, total, r0 * width);
        Ok(self.linear_with(x, w, b, false, Some(&epilogue))?.0)
    }

    fn linear_act(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Activation) -> Result<(Tensor, Tensor)> {
        let _pool = self.scope();
        if self.mode == CpuMode::Reference {
            let pre = self.linear(x, w, b)?;
            let y = self.activation(&pre, act)?;
            return Ok((y, pre));
        }
        // The product is the pre-activation; each block's activation goes to the second output.
        let epilogue = |_: usize, pre: &mut [f32], y: Option<&mut [f32]>| {
            let y = y.ok_or_else(|| Error::internal("linear_act: no activation output block"))?;
            y.copy_from_slice(pre);
            fast::activation_in_place(y, act);
            Ok(())
        };
        let (pre, y) = self.linear_with(x, w, b, true, Some(&epilogue))?;
        let y = y.ok_or_else(|| Error::internal("linear_act: no activation output"))?;
        Ok((y, pre))
    }

    fn linear_act_only(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Activation) -> Result<Tensor> {
        if self.mode == CpuMode::Reference {
            return Ok(self.linear_act(x, w, b, act)?.0);
        }
        let epilogue = |_: usize, y: &mut [f32], _: Option<&mut [f32]>| {
            fast::activation_in_place(y, act);
            Ok(())
        };
        Ok(self.linear_with(x, w, b, false, Some(&epilogue))?.0)
    }

    fn linear_backward_input_act(&self, dy: &Tensor, w: &Tensor, pre: &Tensor, act: Activation) -> Result<Tensor> {
        let _pool = self.scope();
        if self.mode == CpuMode::Reference {
            let d = self.linear_backward_input(dy, w)?;
            expect_shape("linear_backward_input_act", "pre-activation", pre, d.shape())?;
            {
                let pre = pre.f32_data()?;
                let mut dm = d.cpu_data_mut()?;
                for (g, &x) in dm.iter_mut().zip(pre.iter()) {
                    *g = (*g as f64 * reference::activation_derivative(act, x as f64)) as f32;
                }
            }
            return Ok(d);
        }
        const OP: &str = "linear_backward_input_act";
        let (d_out, d_in) = linear_backward_dims(OP, dy, w)?;
        let mut shape = dy.shape().to_vec();
        *shape.last_mut().expect("rank checked") = d_in;
        expect_shape(OP, "pre-activation", pre, &shape)?;
        let rows = dy.rows();
        self.stats.count(GemmKind::InputGrad, rows * d_in * d_out);
        let pre = pre.f32_data()?;
        // The activation gradient of each block of rows right after its product.
        let epilogue = |r0: usize, d: &mut [f32], _: Option<&mut [f32]>| {
            fast::activation_backward_in_place(d, &pre[r0 * d_in..r0 * d_in + d.len()], act);
            Ok(())
        };
        let dx = fast::linear_backward_input_epilogue(&dy.f32_data()?, &w.f32_data()?, rows, d_in, d_out, Some(&epilogue))?;
        self.wrap(dx, &shape)
    }

    fn residual_layernorm_stats(&self, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<(Tensor, Tensor, Tensor)> {
        let _pool = self.scope();
        const OP: &str = "residual_layernorm_stats";
        let cols = check_layernorm(OP, x, residual, gamma, beta)?;
        // z rounded to f32 first, as PyTorch materialises `x + residual`.
        let mut z = pool::buffer(x.elem_count());
        match residual {
            Some(r) => z.iter_mut().zip(x.f32_data()?.iter().zip(r.f32_data()?.iter())).for_each(|(o, (a, b))| *o = a + b),
            None => z.copy_from_slice(&x.f32_data()?),
        }
        let (g, b) = (gamma.f32_data()?, beta.f32_data()?);
        let (y, stats) = match self.mode {
            CpuMode::Reference => {
                let o = reference::residual_layernorm(&z, None, &g, &b, cols, eps);
                (o.y, o.mean.iter().zip(&o.rstd).flat_map(|(&m, &r)| [m, r]).collect())
            }
            CpuMode::Fast => fast::layernorm_with_stats(&z, &g, &b, cols, eps),
        };
        let mut stats_shape = x.shape().to_vec();
        *stats_shape.last_mut().ok_or_else(|| Error::shape(OP, "a scalar input".to_string()))? = 2;
        Ok((self.wrap(y, x.shape())?, self.wrap(z, x.shape())?, self.wrap(stats, &stats_shape)?))
    }

    fn layernorm_backward_stats(&self, dy: &Tensor, z: &Tensor, stats: &Tensor, gamma: &Tensor) -> Result<Tensor> {
        let _pool = self.scope();
        const OP: &str = "layernorm_backward_stats";
        expect_shape(OP, "input", z, dy.shape())?;
        let cols = dy.last_dim();
        expect_shape(OP, "gamma", gamma, &[cols])?;
        if stats.elem_count() != 2 * dy.rows() {
            return Err(Error::shape(OP, format!("statistics {:?} for {} rows", stats.shape(), dy.rows())));
        }
        let st = stats.f32_data()?;
        let (mean, rstd): (Vec<f32>, Vec<f32>) = st.chunks(2).map(|p| (p[0], p[1])).unzip();
        let (dys, zs, gs) = (&*dy.f32_data()?, &*z.f32_data()?, &*gamma.f32_data()?);
        let dz = match self.mode {
            CpuMode::Reference => reference::layernorm_backward_from_stats(dys, zs, &mean, &rstd, gs, cols),
            CpuMode::Fast => fast::layernorm_backward_from_stats(dys, zs, &mean, &rstd, gs, cols),
        };
        self.wrap(dz, dy.shape())
    }

    fn residual_layernorm_dropout(&self, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor, eps: f32, dropout: Option<&DropoutSpec>) -> Result<Tensor> {
        let _pool = self.scope();
        let y = self.residual_layernorm(x, residual, gamma, beta, eps)?;
        if let Some(spec) = dropout {
            apply_dropout(&mut y.cpu_data_mut()?, spec)?;
        }
        Ok(y)
    }

    fn residual_layernorm(&self, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
        let _pool = self.scope();
        let cols = check_layernorm("residual_layernorm", x, residual, gamma, beta)?;
        let (xs, rs) = (&*x.f32_data()?, residual.map(|r| r.f32_data()).transpose()?);
        let rs = rs.as_deref();
        let (g, b) = (&*gamma.f32_data()?, &*beta.f32_data()?);
        let y = match self.mode {
            CpuMode::Reference => reference::residual_layernorm(xs, rs, g, b, cols, eps).y,
            CpuMode::Fast => fast::residual_layernorm(xs, rs, g, b, cols, eps),
        };
        self.wrap(y, x.shape())
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask_bias: &Tensor, heads: usize, dropout: Option<&DropoutSpec>) -> Result<Tensor> {
        const OP: &str = "attention";
        expect_rank(OP, "query", q, 3)?;
        expect_shape(OP, "key", k, q.shape())?;
        expect_shape(OP, "value", v, q.shape())?;
        let (batch, seq, hidden) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        expect_mask(OP, mask_bias, batch, seq)?;
        if heads == 0 || hidden % heads != 0 {
            return Err(Error::shape(OP, format!("hidden {hidden} is not divisible by {heads} heads")));
        }
        let (qs, ks, vs, ms) = (&*q.f32_data()?, &*k.f32_data()?, &*v.f32_data()?, &*mask_bias.f32_data()?);
        let factors = dropout.map(|d| prob_dropout(d, batch, seq, heads)).transpose()?;
        let drop = factors.as_deref();
        let y = match self.mode {
            CpuMode::Reference => reference::attention(qs, ks, vs, ms, batch, seq, hidden, heads, drop),
            CpuMode::Fast => fast::attention(qs, ks, vs, ms, batch, seq, hidden, heads, drop),
        };
        Tensor::from_vec(y, q.shape())
    }

    // The fast kernels read Q, K, V in place from the packed product (rows 3H apart), save the
    // row log-sum-exp, and recompute probabilities from it in the backward; the reference takes
    // Q, K, V apart and recomputes everything (it is the plain spec, not a path).
    fn attention_packed(&self, qkv: &Tensor, mask_bias: &Tensor, heads: usize, dropout: Option<&DropoutSpec>) -> Result<(Tensor, Tensor)> {
        let _pool = self.scope();
        let (batch, seq, h) = packed_dims("attention_packed", qkv, mask_bias, heads)?;
        if self.mode == CpuMode::Reference || batch * seq == 0 {
            let [q, k, v] = split_qkv(qkv)?;
            let ctx = self.attention(&q, &k, &v, mask_bias, heads, dropout)?;
            let lse = reference::attention_lse(&q.cpu_data()?, &k.cpu_data()?, &mask_bias.f32_data()?, batch, seq, h, heads);
            return Ok((ctx, self.wrap(lse, &[batch, heads, seq])?));
        }
        let factors = dropout.map(|d| prob_dropout(d, batch, seq, heads)).transpose()?;
        let (x, ms) = (qkv.f32_data()?, mask_bias.f32_data()?);
        let (y, lse) = fast::attention_strided(&x, &x[h..], &x[2 * h..], 3 * h, &ms, batch, seq, h, heads, factors.as_deref());
        Ok((self.wrap(y, &[batch, seq, h])?, self.wrap(lse, &[batch, heads, seq])?))
    }

    fn attention_packed_backward(&self, dctx: &Tensor, qkv: &Tensor, lse: &Tensor, mask_bias: &Tensor, heads: usize, dropout: Option<&DropoutSpec>) -> Result<Tensor> {
        let _pool = self.scope();
        const OP: &str = "attention_packed_backward";
        let (batch, seq, h) = packed_dims(OP, qkv, mask_bias, heads)?;
        expect_shape(OP, "gradient", dctx, &[batch, seq, h])?;
        expect_shape(OP, "log-sum-exp", lse, &[batch, heads, seq])?;
        if self.mode == CpuMode::Reference || batch * seq == 0 {
            let [q, k, v] = split_qkv(qkv)?;
            let [dq, dk, dv] = self.attention_backward(dctx, &q, &k, &v, mask_bias, heads, dropout)?;
            let (dq, dk, dv) = (dq.cpu_data()?, dk.cpu_data()?, dv.cpu_data()?);
            let mut out = Vec::with_capacity(3 * dq.len());
            for ((a, b), c) in dq.chunks(h.max(1)).zip(dk.chunks(h.max(1))).zip(dv.chunks(h.max(1))) {
                out.extend_from_slice(a);
                out.extend_from_slice(b);
                out.extend_from_slice(c);
            }
            return self.wrap(out, qkv.shape());
        }
        self.stats.count(GemmKind::InputGrad, 5 * batch * seq * seq * h);
        let factors = dropout.map(|d| prob_dropout(d, batch, seq, heads)).transpose()?;
        let (d, x, l, ms) = (dctx.f32_data()?, qkv.f32_data()?, lse.f32_data()?, mask_bias.f32_data()?);
        self.wrap(fast::attention_backward_packed(&d, &x, &l, &ms, batch, seq, h, heads, factors.as_deref()), qkv.shape())
    }

    fn activation(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let _pool = self.scope();
        let xs = &*x.f32_data()?;
        let y = match self.mode {
            CpuMode::Reference => reference::activation(xs, act),
            CpuMode::Fast => fast::activation(xs, act),
        };
        self.wrap(y, x.shape())
    }

    fn adapter_location(&self, loc: &AdapterLocation) -> Result<Tensor> {
        adapter::adapter_location(self.prims(), loc)
    }

    fn nice(&self, x: &Tensor, params: &NiceParams, inverse: bool) -> Result<Tensor> {
        nice::nice(self.prims(), x, params, inverse)
    }

    fn linear_backward_input_into(&self, dy: &Tensor, w: &Tensor, out: &Tensor, accumulate: bool) -> Result<()> {
        const OP: &str = "linear_backward_input_into";
        let (_, d_in) = linear_backward_dims(OP, dy, w)?;
        let mut shape = dy.shape().to_vec();
        *shape.last_mut().expect("rank checked") = d_in;
        expect_shape(OP, "destination `out`", out, &shape)?;
        prims::check_destinations(OP, &[("out", out)], &[("dy", dy), ("w", w)])?;
        let dy = dy.f32_data()?;
        self.prims().linear_dx_into(&dy, w, &mut out.cpu_data_mut()?, accumulate)
    }

    fn linear_backward_params_into(&self, dy: &Tensor, x: &Tensor, dw: &Tensor, db: Option<&Tensor>, accumulate: bool) -> Result<()> {
        const OP: &str = "linear_backward_params_into";
        if dy.rows() != x.rows() || dy.rank() == 0 || x.rank() == 0 {
            return Err(Error::shape(OP, format!("gradient {:?} and input {:?} have different rows", dy.shape(), x.shape())));
        }
        let (d_in, d_out) = (x.last_dim(), dy.last_dim());
        expect_shape(OP, "destination `dw`", dw, &[d_out, d_in])?;
        let mut outs = vec![("dw", dw)];
        if let Some(db) = db {
            expect_shape(OP, "destination `db`", db, &[d_out])?;
            outs.push(("db", db));
        }
        prims::check_destinations(OP, &outs, &[("dy", dy), ("x", x)])?;
        let (dys, xs) = (dy.f32_data()?, x.f32_data()?);
        // One destination locked at a time: dw and db may be views of one gradient arena.
        self.prims().linear_dw_into(&dys, &xs, d_in, d_out, &mut dw.cpu_data_mut()?, accumulate);
        if let Some(db) = db {
            prims::bias_grad_into(&dys, &mut db.cpu_data_mut()?, accumulate);
        }
        Ok(())
    }

    fn activation_backward(&self, dy: &Tensor, pre: &Tensor, act: Activation) -> Result<Tensor> {
        let _pool = self.scope();
        expect_shape("activation_backward", "input", pre, dy.shape())?;
        self.wrap(self.prims().activation_backward(&dy.f32_data()?, &pre.f32_data()?, act), dy.shape())
    }

    fn layernorm_backward_input(&self, dy: &Tensor, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, eps: f32) -> Result<Tensor> {
        const OP: &str = "layernorm_backward_input";
        expect_shape(OP, "input", x, dy.shape())?;
        if let Some(r) = residual {
            expect_shape(OP, "residual", r, dy.shape())?;
        }
        expect_shape(OP, "gamma", gamma, &[dy.last_dim()])?;
        let z: Vec<f32> = match residual {
            Some(r) => x.f32_data()?.iter().zip(&*r.f32_data()?).map(|(a, b)| a + b).collect(),
            None => x.f32_data()?.to_vec(),
        };
        let (dz, _, _) = self.prims().layernorm_backward(&dy.f32_data()?, &z, gamma, eps)?;
        Tensor::from_vec(dz, dy.shape())
    }

    fn attention_backward(
        &self,
        dctx: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask_bias: &Tensor,
        heads: usize,
        dropout: Option<&DropoutSpec>,
    ) -> Result<[Tensor; 3]> {
        const OP: &str = "attention_backward";
        expect_rank(OP, "query", q, 3)?;
        for (what, t) in [("key", k), ("value", v), ("gradient", dctx)] {
            expect_shape(OP, what, t, q.shape())?;
        }
        let (batch, seq, hidden) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        expect_mask(OP, mask_bias, batch, seq)?;
        if heads == 0 || hidden % heads != 0 {
            return Err(Error::shape(OP, format!("hidden {hidden} is not divisible by {heads} heads")));
        }
        // Five T×T×d products per head: scores again, dV, dP, dQ, dK.
        self.stats.count(GemmKind::InputGrad, 5 * batch * seq * seq * hidden);
        let (d, qs, ks, vs, ms) = (&*dctx.f32_data()?, &*q.f32_data()?, &*k.f32_data()?, &*v.f32_data()?, &*mask_bias.f32_data()?);
        let factors = dropout.map(|d| prob_dropout(d, batch, seq, heads)).transpose()?;
        let drop = factors.as_deref();
        let (dq, dk, dv) = match self.mode {
            CpuMode::Reference => reference::attention_backward(d, qs, ks, vs, ms, batch, seq, hidden, heads, drop),
            CpuMode::Fast => fast::attention_backward(d, qs, ks, vs, ms, batch, seq, hidden, heads, drop),
        };
        Ok([Tensor::from_vec(dq, q.shape())?, Tensor::from_vec(dk, q.shape())?, Tensor::from_vec(dv, q.shape())?])
    }

    fn adapter_location_backward_into(&self, loc: &AdapterLocation, d_out: &Tensor, grads: &[Option<GradsOut<BottleneckGrads>>], need_input_grads: bool) -> Result<(Option<Tensor>, Option<Tensor>)> {
        adapter::adapter_location_backward(self.prims(), loc, d_out, grads, need_input_grads)
    }

    fn nice_backward_into(&self, x: &Tensor, params: &NiceParams, dy: &Tensor, out: &GradsOut<NiceGrads>) -> Result<()> {
        nice::nice_backward(self.prims(), x, params, dy, out)
    }

    fn dropout(&self, x: &Tensor, spec: &DropoutSpec) -> Result<Tensor> {
        let _pool = self.scope();
        let mut out = pool::buffer(x.elem_count());
        out.copy_from_slice(&x.f32_data()?);
        apply_dropout(&mut out, spec)?;
        self.wrap(out, x.shape())
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let _pool = self.scope();
        expect_shape("add", "right operand", b, a.shape())?;
        let mut out = pool::buffer(a.elem_count());
        for ((o, x), y) in out.iter_mut().zip(a.f32_data()?.iter()).zip(b.f32_data()?.iter()) {
            *o = x + y;
        }
        self.wrap(out, a.shape())
    }

    fn select_rows(&self, t: &Tensor, ranges: &[std::ops::Range<usize>]) -> Result<Tensor> {
        let _pool = self.scope();
        let rows = t.shape().first().copied().unwrap_or(0);
        let per_row: usize = t.shape()[1..].iter().product();
        if let Some(r) = ranges.iter().find(|r| r.start > r.end || r.end > rows) {
            return Err(Error::shape("select_rows", format!("rows {r:?} of a tensor of {rows}")));
        }
        let n: usize = ranges.iter().map(|r| r.end - r.start).sum();
        let mut out = pool::buffer(n * per_row);
        let data = t.cpu_data()?;
        let mut at = 0;
        for r in ranges {
            let len = (r.end - r.start) * per_row;
            out[at..at + len].copy_from_slice(&data[r.start * per_row..r.end * per_row]);
            at += len;
        }
        let mut shape = t.shape().to_vec();
        shape[0] = n;
        self.wrap(out, &shape)
    }

    fn first_token_backward_into(&self, d: &Tensor, out: &Tensor, accumulate: bool) -> Result<()> {
        const OP: &str = "first_token_backward_into";
        expect_rank(OP, "gradient", d, 2)?;
        expect_rank(OP, "destination `out`", out, 3)?;
        let (b, h, seq_len) = (d.shape()[0], d.shape()[1], out.shape()[1]);
        expect_shape(OP, "destination `out`", out, &[b, seq_len, h])?;
        if seq_len == 0 && b > 0 {
            return Err(Error::shape(OP, "sequence length 0".to_string()));
        }
        prims::check_destinations(OP, &[("out", out)], &[("d", d)])?;
        let src = d.f32_data()?;
        let mut o = out.cpu_data_mut()?;
        if !accumulate {
            o.fill(0.0);
        }
        for (i, row) in src.chunks(h.max(1)).enumerate() {
            prims::store(&mut o[i * seq_len * h..][..h], row, accumulate);
        }
        Ok(())
    }

    fn first_token(&self, x: &Tensor) -> Result<Tensor> {
        let _pool = self.scope();
        expect_rank("first_token", "input", x, 3)?;
        let (b, t, h) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        if t == 0 {
            return Err(Error::shape("first_token", "empty sequence".to_string()));
        }
        let mut out = pool::buffer(b * h);
        let data = x.f32_data()?;
        for (i, row) in out.chunks_mut(h.max(1)).enumerate() {
            row.copy_from_slice(&data[i * t * h..][..h]);
        }
        self.wrap(out, &[b, h])
    }

    fn cast(&self, t: &Tensor, dtype: crate::tensor::DType) -> Result<Tensor> {
        train_ops::cast(t, dtype)
    }

    fn fill(&self, t: &Tensor, value: f32) -> Result<()> {
        train_ops::fill(t, value)
    }

    fn add_into(&self, dst: &Tensor, src: &Tensor) -> Result<()> {
        train_ops::add_into(dst, src)
    }

    fn write_u32(&self, dst: &Tensor, data: &[u32]) -> Result<()> {
        if dst.elem_count() != data.len() {
            return Err(Error::shape("write_u32", format!("{} values into a buffer of shape {:?}", data.len(), dst.shape())));
        }
        self.transfers.up(data.len() * 4);
        dst.cpu_slice_mut::<u32>()?.copy_from_slice(data);
        Ok(())
    }

    fn write_f32(&self, dst: &Tensor, data: &[f32]) -> Result<()> {
        if dst.elem_count() != data.len() {
            return Err(Error::shape("write_f32", format!("{} values into a buffer of shape {:?}", data.len(), dst.shape())));
        }
        self.transfers.up(data.len() * 4);
        dst.cpu_data_mut()?.copy_from_slice(data);
        Ok(())
    }

    fn loss(&self, op: &crate::train::loss::LossOp, dlogits: &Tensor, loss: &Tensor) -> Result<()> {
        train_ops::loss(op, dlogits, loss)
    }

    fn clip_grad_norm(&self, grads: &[Tensor], max_norm: f32, norm: &Tensor) -> Result<()> {
        train_ops::clip_grad_norm(grads, max_norm, norm)
    }

    fn adamw(&self, step: &crate::train::optim::AdamWLaunch) -> Result<()> {
        train_ops::adamw(step)
    }
}
