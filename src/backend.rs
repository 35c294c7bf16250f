//! THE seam between the model and the hardware.
//!
//! One trait, one method per op family. The model (`crate::model`) is written once against it and
//! never names a device; `crate::cpu` and `crate::cuda` implement it. Every method takes and
//! returns tensors that live on the backend's own device.
//!
//! Layout conventions, shared by every backend and every kernel:
//! - activations are row-major `[rows, features]` (a `[B, T, H]` tensor is `B·T` rows of `H`);
//! - a Linear weight is `[out, in]` and computes `y = x·Wᵀ + b` (PyTorch layout, so saved
//!   tensors load without transposes).

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

// Defined below the seam (configs name activations too); re-exported so backend paths keep working.
pub use crate::config::Activation;
pub use crate::config::Positions;

/// Token ids of one batch, on the host: the backend uploads what it needs.
#[derive(Clone, Debug)]
pub struct TokenBatch<'a> {
    pub batch: usize,
    pub seq_len: usize,
    /// `[batch·seq_len]`, each `< vocab_size` (checked before it gets here).
    pub input_ids: &'a [u32],
    /// `[batch·seq_len]`, each `< type_vocab_size`.
    pub token_type_ids: &'a [u32],
}

/// Training-mode dropout at one site. The mask is a pure function of `(seed, stream, block,
/// element)`, so the backward recomputes it. A tensor's rows split evenly into `blocks.len()`
/// blocks (Parallel branches); block j draws from stream `(stream << 8) | blocks[j]` with element
/// indices counted from the block's start, so a subset of branches (the backward keeps only the
/// live ones) sees the same masks as the whole.
///
/// The seed changes every step. When `seed_buffer` is given (the model's, written once per step by
/// `set_dropout`), kernels read the seed from that device buffer rather than from `seed`, so a
/// captured launch replays with the next step's masks; `seed` then only says what it holds.
///
/// `offset` shifts every block's element indices: a tensor that holds rows `r0..` of a larger
/// batch (one rank's shard in data-parallel training) gets `offset = r0 · elements per row`, so
/// it draws the masks those rows draw in the whole batch. 0 outside data-parallel training.
#[derive(Clone, Debug, PartialEq)]
pub struct DropoutSpec {
    pub p: f32,
    pub seed: u64,
    pub stream: u64,
    pub blocks: Vec<u64>,
    pub seed_buffer: Option<SeedBuffer>,
    pub offset: u64,
}

/// A U32 `[2]` device buffer holding a dropout seed (low word first).
#[derive(Clone, Debug)]
pub struct SeedBuffer(pub Tensor);

impl PartialEq for SeedBuffer {
    /// The same buffer, not the same contents: its contents change every step.
    fn eq(&self, other: &Self) -> bool {
        self.0.shares_storage(&other.0) && self.0.offset() == other.0.offset()
    }
}

impl DropoutSpec {
    /// The stream of block `j`.
    pub fn block_stream(&self, j: usize) -> u64 {
        (self.stream << 8) | self.blocks.get(j).copied().unwrap_or(0)
    }
}

/// A LayerNorm's parameters and epsilon.
#[derive(Clone, Copy)]
pub struct LayerNormParams<'a> {
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub eps: f32,
}

/// How an adapter's up-projection output is scaled.
#[derive(Clone, Copy)]
pub enum ScalingParam<'a> {
    Fixed(f32),
    /// A learned scalar, shape `[1]`.
    Learned(&'a Tensor),
    /// A learned per-channel vector, shape `[H]`.
    Channel(&'a Tensor),
}

/// One bottleneck adapter's weights and core options at one location (spec §3.4).
#[derive(Clone)]
pub struct BottleneckParams<'a> {
    /// `[m, H]`, `[m]`.
    pub down_w: &'a Tensor,
    pub down_b: &'a Tensor,
    /// `[H, m]`, `[H]`.
    pub up_w: &'a Tensor,
    pub up_b: &'a Tensor,
    pub activation: Activation,
    /// Adapter-internal LayerNorms (eps 1e-5).
    pub ln_before: Option<LayerNormParams<'a>>,
    pub ln_after: Option<LayerNormParams<'a>>,
    pub scaling: ScalingParam<'a>,
    /// Gate `Linear(H, 1)`: weight `[1, H]`, bias `[1]`.
    pub gate: Option<(&'a Tensor, &'a Tensor)>,
    pub adapter_residual_before_ln: bool,
    /// The adapter's own dropout on the scaled up-projection (train mode, p > 0); one block.
    pub dropout: Option<DropoutSpec>,
}

/// The pre and post steps of an adapter location (spec §4): the pre step follows the FIRST
/// child's config, the post step the LAST child's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocationSteps {
    pub residual_before_ln: crate::config::ResidualBeforeLn,
    pub original_ln_before: bool,
    pub original_ln_after: bool,
}

/// One adapter location for all N branches at once: the Parallel path is one call, not a loop.
pub struct AdapterLocation<'a> {
    /// The sub-layer output `h` and its input `r`: `[B, T, H]` when `replicate`, else `[N·B, T, H]`.
    pub h: &'a Tensor,
    pub r: &'a Tensor,
    /// The BERT LayerNorm of this location (used by the pre and post steps).
    pub layer_norm: LayerNormParams<'a>,
    pub steps: LocationSteps,
    /// Branch i owns rows `[i·B, (i+1)·B)` of the output.
    pub branches: &'a [BottleneckParams<'a>],
    /// Tile `h` and `r` N times first (the lazy replication of Parallel, fused into this op).
    pub replicate: bool,
    /// Sequence length T (the gate averages over it).
    pub seq_len: usize,
}

/// NICE coupling weights (spec §5.1): `F: s2 → s1` and `G: s1 → s2`, two Linears each.
#[derive(Clone, Copy)]
pub struct NiceParams<'a> {
    pub f0: (&'a Tensor, &'a Tensor),
    pub f2: (&'a Tensor, &'a Tensor),
    pub g0: (&'a Tensor, &'a Tensor),
    pub g2: (&'a Tensor, &'a Tensor),
    pub activation: Activation,
}

/// Gradients of one bottleneck adapter at one location, shaped like its parameters (or, given to
/// `adapter_location_backward_into`, where to put them).
#[derive(Clone, Debug)]
pub struct BottleneckGrads {
    pub down_w: Tensor,
    pub down_b: Tensor,
    pub up_w: Tensor,
    pub up_b: Tensor,
    pub ln_before: Option<(Tensor, Tensor)>,
    pub ln_after: Option<(Tensor, Tensor)>,
    /// Learned (`[1]`) or channel (`[H]`) scaling.
    pub scaling: Option<Tensor>,
    pub gate: Option<(Tensor, Tensor)>,
}

impl BottleneckGrads {
    /// Destinations shaped like `p`'s parameters, from `alloc(shape)`.
    pub fn shaped_like(p: &BottleneckParams, mut alloc: impl FnMut(&[usize]) -> Result<Tensor>) -> Result<Self> {
        let mut pair = |a: &Tensor, b: &Tensor| -> Result<(Tensor, Tensor)> { Ok((alloc(a.shape())?, alloc(b.shape())?)) };
        let (down_w, down_b) = pair(p.down_w, p.down_b)?;
        let (up_w, up_b) = pair(p.up_w, p.up_b)?;
        let ln_before = p.ln_before.map(|ln| pair(ln.gamma, ln.beta)).transpose()?;
        let ln_after = p.ln_after.map(|ln| pair(ln.gamma, ln.beta)).transpose()?;
        let gate = p.gate.map(|(w, b)| pair(w, b)).transpose()?;
        let scaling = match p.scaling {
            ScalingParam::Fixed(_) => None,
            ScalingParam::Learned(s) | ScalingParam::Channel(s) => Some(alloc(s.shape())?),
        };
        Ok(BottleneckGrads { down_w, down_b, up_w, up_b, ln_before, ln_after, scaling, gate })
    }
}

/// What the backward of an adapter location returns.
pub struct LocationGrads {
    /// `∂L/∂h` and `∂L/∂r` (B rows when the location replicated), when asked for.
    pub dh: Option<Tensor>,
    pub dr: Option<Tensor>,
    /// Per branch, in the order given: parameter gradients of the trainable ones.
    pub branches: Vec<Option<BottleneckGrads>>,
}

/// Parameter gradients of a NICE block: `(weight, bias)` of F.0, F.2, G.0, G.2 (or, given to
/// `nice_backward_into`, where to put them).
#[derive(Clone, Debug)]
pub struct NiceGrads {
    pub f0: (Tensor, Tensor),
    pub f2: (Tensor, Tensor),
    pub g0: (Tensor, Tensor),
    pub g2: (Tensor, Tensor),
}

impl NiceGrads {
    /// Destinations shaped like `p`'s parameters, from `alloc(shape)`.
    pub fn shaped_like(p: &NiceParams, mut alloc: impl FnMut(&[usize]) -> Result<Tensor>) -> Result<Self> {
        let mut pair = |(w, b): (&Tensor, &Tensor)| -> Result<(Tensor, Tensor)> { Ok((alloc(w.shape())?, alloc(b.shape())?)) };
        Ok(NiceGrads { f0: pair(p.f0)?, f2: pair(p.f2)?, g0: pair(p.g0)?, g2: pair(p.g2)? })
    }
}

/// Where an `_into` backward puts parameter gradients: `grads` are destinations shaped like the
/// parameters (views of a gradient arena, say), overwritten when `accumulate` is false (the first
/// contribution to them) and added to when it is true (a parameter reached again: the same
/// adapter in another Parallel branch).
#[derive(Clone, Debug)]
pub struct GradsOut<G> {
    pub grads: G,
    pub accumulate: bool,
}

/// The op families. Forward methods allocate their outputs. Backward methods compute only what
/// they are asked for (frozen weights never get a weight-gradient product) and write into given
/// outputs (see the backward section).
pub trait Backend: Send + Sync {
    fn device(&self) -> Device;
    /// A short human name, e.g. "cpu (fast)".
    fn name(&self) -> String;
    /// Whether the backend has every op of a training step (backward, loss, clipping, AdamW);
    /// `train` on `auto` falls back to the CPU when not, and refuses such a device when asked.
    fn supports_training(&self) -> bool {
        true
    }
    /// The sequence-length granularity at which this backend profits from repeated shapes
    /// (plans, graphs or buffers reused per shape): `train` pads its batches to multiples of it.
    /// 1 means padding to the longest text is best (no per-shape work to reuse).
    fn length_bucket(&self) -> usize {
        crate::tokenize::LENGTH_BUCKET
    }
    /// The device runtime underneath, for a CUDA backend (cuda or cuda-sim): graph capture and
    /// memory statistics go through it. `None` elsewhere.
    fn gpu(&self) -> Option<&crate::cuda::Gpu> {
        None
    }

    // ---- memory ------------------------------------------------------------------------------
    /// Move host data onto this backend's device.
    fn upload(&self, data: Vec<f32>, shape: &[usize]) -> Result<Tensor>;
    /// Copy a tensor back to the host (any float dtype, widened to f32).
    fn to_host(&self, t: &Tensor) -> Result<Vec<f32>>;
    /// Move host u32 data (token ids, labels, counters) onto this backend's device.
    fn upload_u32(&self, data: Vec<u32>, shape: &[usize]) -> Result<Tensor>;
    /// Copy a u32 tensor back to the host.
    fn to_host_u32(&self, t: &Tensor) -> Result<Vec<u32>>;
    /// A tensor of zeros on this backend's device.
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor>;
    /// A tensor whose contents are unspecified, for an op to overwrite entirely (the destinations
    /// that the allocating forms of the `_into` ops make). `zeros` unless a backend can skip the fill.
    fn empty(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.zeros(shape, dtype)
    }
    /// Whether every element is finite (no NaN, no ±inf): one read of the tensor where it lives,
    /// answering one bool (the model checks each layer's output with it).
    fn all_finite(&self, t: &Tensor) -> Result<bool>;

    // ---- GEMM family ---------------------------------------------------------------------------
    /// `y[rows, out] = x[rows, in]·Wᵀ + b`, with `w: [out, in]` and `b: [out]`.
    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor>;
    /// `dropout(x·Wᵀ + b)`: the dropout applied by the op that produces its input (a GEMM
    /// epilogue on a device), not as a separate pass. `None` is `linear`.
    fn linear_dropout(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, dropout: Option<&DropoutSpec>) -> Result<Tensor>;
    /// Bias + activation fused into the product: returns `(act(x·Wᵀ + b), x·Wᵀ + b)`, the
    /// pre-activation being what the backward reads (a GELU-aux epilogue on a device).
    fn linear_act(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Activation) -> Result<(Tensor, Tensor)>;
    /// `act(x·Wᵀ + b)` when nothing will read the pre-activation (an inference forward): one
    /// output instead of two.
    fn linear_act_only(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Activation) -> Result<Tensor> {
        Ok(self.linear_act(x, w, b, act)?.0)
    }
    /// The backward of `linear_act`'s consumer through it: `(dy·W) ⊙ act'(pre)`, the activation
    /// gradient computed in the same pass as the input-gradient product (a dGELU epilogue).
    fn linear_backward_input_act(&self, dy: &Tensor, w: &Tensor, pre: &Tensor, act: Activation) -> Result<Tensor>;

    // ---- embedding family ----------------------------------------------------------------------
    /// `word[ids] + pos[p] + type[tt]`, giving `[batch, seq_len, H]`. `positions` says which row
    /// `p` each token reads: `t` (BERT), or counted from the ids (RoBERTa, see [`Positions`]); the
    /// position table must hold `positions.rows_needed(seq_len)` rows.
    /// `input_ids` and `token_type_ids` are U32 `[batch, seq_len]` tensors on this device (the
    /// model's fixed input buffers), each id in range (checked on the host before they were written).
    #[allow(clippy::too_many_arguments)] // the ids, the three tables and how positions are read
    fn embedding(&self, input_ids: &Tensor, token_type_ids: &Tensor, word: &Tensor, position: &Tensor, token_type: &Tensor, positions: Positions) -> Result<Tensor>;
    /// The embeddings block: `dropout(LN(word[id] + token_type[tt] + position[p]))`. Provided as
    /// `embedding` then `residual_layernorm_dropout`; a device backend fuses them in one kernel.
    #[allow(clippy::too_many_arguments)] // `embedding`'s arguments plus the LayerNorm and dropout
    fn embedding_layernorm(&self, input_ids: &Tensor, token_type_ids: &Tensor, word: &Tensor, position: &Tensor, token_type: &Tensor, positions: Positions, ln: LayerNormParams<'_>, dropout: Option<&DropoutSpec>) -> Result<Tensor> {
        let emb = self.embedding(input_ids, token_type_ids, word, position, token_type, positions)?;
        self.residual_layernorm_dropout(&emb, None, ln.gamma, ln.beta, ln.eps, dropout)
    }

    // ---- residual + LayerNorm family -----------------------------------------------------------
    /// `LN(x + residual)` over the last dimension with biased variance: `(z-μ)/√(σ²+eps)·γ + β`.
    fn residual_layernorm(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<Tensor>;
    /// `LN(x + residual)` for a training forward: also returns `z = x + residual` (rounded to
    /// f32, the residual stream) and each row's `[mean, rstd]` (`[.., 2]`, the rows of `x`), which
    /// the backward reads instead of both inputs and instead of recomputing the statistics.
    fn residual_layernorm_stats(&self, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<(Tensor, Tensor, Tensor)>;
    /// Input gradient of a LayerNorm with frozen γ, from its input `z` and the forward's
    /// `[mean, rstd]`: `dz = rstd·(gy − mean(gy) − x̂·mean(gy⊙x̂))`, `gy = dy⊙γ`, `x̂ = (z − mean)·rstd`.
    fn layernorm_backward_stats(&self, dy: &Tensor, z: &Tensor, stats: &Tensor, gamma: &Tensor) -> Result<Tensor>;
    /// `dropout(LN(x + residual))`, the dropout fused into the LayerNorm (the embeddings').
    #[allow(clippy::too_many_arguments)] // `residual_layernorm` plus the dropout
    fn residual_layernorm_dropout(&self, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor, eps: f32, dropout: Option<&DropoutSpec>) -> Result<Tensor>;

    // ---- attention family ----------------------------------------------------------------------
    /// Multi-head scaled dot-product attention, HF eager semantics. `q, k, v: [B, T, H]` with the
    /// heads side by side in H; `mask_bias: [B, T]` is added to every query's scores for key t
    /// (0 for a real token, `f32::MIN` for padding). The mask may have fewer rows B' than q (B'
    /// dividing B): row b reads mask row `b % B'`, so replicated Parallel branches share one mask.
    /// Returns the context `[B, T, H]`.
    /// `dropout` applies to the attention probabilities (train mode).
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask_bias: &Tensor, heads: usize, dropout: Option<&DropoutSpec>) -> Result<Tensor>;

    /// `attention` on Q, K and V packed side by side in one `[B, T, 3H]` tensor (the output of
    /// the packed `[3H, H]` product): what the model runs. Returns the context `[B, T, H]` and the
    /// row log-sum-exp of the scaled, masked scores, `[B, heads, T]`, which the backward reads to
    /// recompute probabilities without a `[B, heads, T, T]` tensor ever being kept.
    fn attention_packed(&self, qkv: &Tensor, mask_bias: &Tensor, heads: usize, dropout: Option<&DropoutSpec>) -> Result<(Tensor, Tensor)>;

    // ---- activation family ---------------------------------------------------------------------
    fn activation(&self, x: &Tensor, act: Activation) -> Result<Tensor>;

    // ---- adapter location family -------------------------------------------------------------
    /// Pre step, N bottleneck cores, post step: returns the location's output, `[N·B, T, H]`.
    fn adapter_location(&self, loc: &AdapterLocation) -> Result<Tensor>;

    // ---- invertible coupling family ----------------------------------------------------------
    /// NICE on the last dimension: forward `y1 = x1 + F(x2), y2 = x2 + G(y1)`, or its inverse.
    fn nice(&self, x: &Tensor, params: &NiceParams, inverse: bool) -> Result<Tensor>;

    // ---- backward ----------------------------------------------------------------------------
    // The backward ops write into given destinations. `accumulate: false` overwrites them (the
    // first contribution); `true` adds to what they hold: a residual-stream gradient reached along
    // a second path, a parameter used twice (on a device, a GEMM with beta = 1). A destination
    // must have the shape the op computes (else `Error::Shape` naming the op and the tensor) and
    // must not share storage with an input (else `Error::Internal`); the destinations of one op
    // must not overlap each other, but may be disjoint views of one buffer (a gradient arena).
    // The allocating forms (`linear_backward_input`, ...) are provided: they make destinations
    // with `empty` and call the `_into` op, so each backward has one implementation.

    /// `out = dy·W`, or `out += dy·W` when `accumulate` (the input gradient of `linear`; no
    /// weight gradient). `out` has `dy`'s shape with the last dimension `in`.
    fn linear_backward_input_into(&self, dy: &Tensor, w: &Tensor, out: &Tensor, accumulate: bool) -> Result<()>;
    /// `dx = dy·W` in a new tensor.
    fn linear_backward_input(&self, dy: &Tensor, w: &Tensor) -> Result<Tensor> {
        let mut shape = dy.shape().to_vec();
        if let (Some(last), Some(&d_in)) = (shape.last_mut(), w.shape().get(1)) {
            *last = d_in;
        }
        // The gradient's dtype: f32, or bf16 (f16) in a bf16 (f16) training step.
        let out = self.empty(&shape, dy.dtype().half_or_f32())?;
        self.linear_backward_input_into(dy, w, &out, false)?;
        Ok(out)
    }
    /// `(dW, db) = (dyᵀ·x, Σ_rows dy)` for a trainable Linear, written into (or, when
    /// `accumulate`, added to) `dw` (`[out, in]`) and `db` (`[out]`; None for a Linear without
    /// bias).
    fn linear_backward_params_into(&self, dy: &Tensor, x: &Tensor, dw: &Tensor, db: Option<&Tensor>, accumulate: bool) -> Result<()>;
    /// `(dW, db)` in new tensors.
    fn linear_backward_params(&self, dy: &Tensor, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (d_out, d_in) = (dy.last_dim(), x.last_dim());
        let (dw, db) = (self.empty(&[d_out, d_in], DType::F32)?, self.empty(&[d_out], DType::F32)?);
        self.linear_backward_params_into(dy, x, &dw, Some(&db), false)?;
        Ok((dw, db))
    }
    /// `dx = dy ⊙ act'(pre)`.
    fn activation_backward(&self, dy: &Tensor, pre: &Tensor, act: Activation) -> Result<Tensor>;
    /// Input gradient of `LN(x + residual)` with frozen γ, β: returns `∂L/∂(x + residual)`, which
    /// is the gradient of both `x` and `residual`.
    fn layernorm_backward_input(&self, dy: &Tensor, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, eps: f32) -> Result<Tensor>;
    /// `(dq, dk, dv)` of `attention`, probabilities recomputed.
    #[allow(clippy::too_many_arguments)] // mirrors `attention`, plus the output gradient
    fn attention_backward(
        &self,
        dctx: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask_bias: &Tensor,
        heads: usize,
        dropout: Option<&DropoutSpec>,
    ) -> Result<[Tensor; 3]>;
    /// The gradient of `attention_packed` with respect to its packed input: `[B, T, 3H]`, ready
    /// for one input-gradient product with the packed weight.
    #[allow(clippy::too_many_arguments)] // `attention_packed`'s inputs, its log-sum-exp and the gradient
    fn attention_packed_backward(&self, dctx: &Tensor, qkv: &Tensor, lse: &Tensor, mask_bias: &Tensor, heads: usize, dropout: Option<&DropoutSpec>) -> Result<Tensor>;
    /// Backward of `adapter_location` for the branches given (the live ones; `loc.h`/`loc.r` hold
    /// their rows): branch i's parameter gradients go into `grads[i]` (None: frozen, none
    /// computed), whose tensors are shaped like its parameters (an option it lacks, such as a
    /// gate, has no destination). Branches run in order, so two branches of the same adapter may
    /// name the same destinations, the later one accumulating. Returns `(dh, dr)` when
    /// `need_input_grads`.
    fn adapter_location_backward_into(&self, loc: &AdapterLocation, d_out: &Tensor, grads: &[Option<GradsOut<BottleneckGrads>>], need_input_grads: bool) -> Result<(Option<Tensor>, Option<Tensor>)>;
    /// `adapter_location_backward_into` with new tensors for the branches where `trainable[i]`.
    fn adapter_location_backward(&self, loc: &AdapterLocation, d_out: &Tensor, trainable: &[bool], need_input_grads: bool) -> Result<LocationGrads> {
        if trainable.len() != loc.branches.len() {
            return Err(crate::error::Error::shape("adapter_location_backward", format!("{} trainable flags for {} branches", trainable.len(), loc.branches.len())));
        }
        let mut grads = Vec::with_capacity(trainable.len());
        for (p, &t) in loc.branches.iter().zip(trainable) {
            let g = t.then(|| BottleneckGrads::shaped_like(p, |s| self.empty(s, DType::F32))).transpose()?;
            grads.push(g.map(|grads| GradsOut { grads, accumulate: false }));
        }
        let (dh, dr) = self.adapter_location_backward_into(loc, d_out, &grads, need_input_grads)?;
        Ok(LocationGrads { dh, dr, branches: grads.into_iter().map(|g| g.map(|g| g.grads)).collect() })
    }
    /// Parameter gradients of the NICE forward at input `x` for upstream `dy`, into `out`
    /// (shaped like the parameters).
    fn nice_backward_into(&self, x: &Tensor, params: &NiceParams, dy: &Tensor, out: &GradsOut<NiceGrads>) -> Result<()>;
    /// `nice_backward_into` with new tensors.
    fn nice_backward(&self, x: &Tensor, params: &NiceParams, dy: &Tensor) -> Result<NiceGrads> {
        let out = GradsOut { grads: NiceGrads::shaped_like(params, |s| self.empty(s, DType::F32))?, accumulate: false };
        self.nice_backward_into(x, params, dy, &out)?;
        Ok(out.grads)
    }

    // ---- elementwise and layout ----------------------------------------------------------------
    /// Dropout with the spec's mask; also its own backward (the same mask and scale).
    fn dropout(&self, x: &Tensor, spec: &DropoutSpec) -> Result<Tensor>;
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;
    /// Rows `ranges` of dim 0, concatenated (a Parallel branch is a contiguous block of rows).
    fn select_rows(&self, t: &Tensor, ranges: &[std::ops::Range<usize>]) -> Result<Tensor>;
    /// The adjoint of `first_token` into `out` (`[B, T, H]`): position 0 of each sequence gets `d`
    /// (`[B, H]`), added to what it holds when `accumulate`; the other positions are zeroed when
    /// writing and left as they are when accumulating.
    fn first_token_backward_into(&self, d: &Tensor, out: &Tensor, accumulate: bool) -> Result<()>;
    /// The adjoint of `first_token`: `[B, H] -> [B, T, H]`, zero except at position 0.
    fn first_token_backward(&self, d: &Tensor, seq_len: usize) -> Result<Tensor> {
        let (b, h) = (d.shape().first().copied().unwrap_or(0), d.shape().get(1).copied().unwrap_or(0));
        let out = self.empty(&[b, seq_len, h], d.dtype().half_or_f32())?;
        self.first_token_backward_into(d, &out, false)?;
        Ok(out)
    }

    // ---- gather ----------------------------------------------------------------------------------
    /// The first token of every sequence: `[B, T, H] -> [B, H]` (the pooler's input).
    fn first_token(&self, x: &Tensor) -> Result<Tensor>;

    // ---- dtype, fill, in-place -------------------------------------------------------------------
    /// `t` converted to `dtype`. Narrowing to bf16/f16 rounds to nearest, ties to even, and is
    /// bit-exact with the `half` crate (NaN stays NaN, overflow goes to ±inf, subnormals are
    /// kept); widening is exact. Same dtype is a view (no copy).
    fn cast(&self, t: &Tensor, dtype: DType) -> Result<Tensor>;
    /// Set every element of `t` (any view) to `value`.
    fn fill(&self, t: &Tensor, value: f32) -> Result<()>;
    /// `dst += src`, elementwise, in place (gradients reached along several paths).
    fn add_into(&self, dst: &Tensor, src: &Tensor) -> Result<()>;
    /// Copy host values into an existing buffer of this device (a fixed input buffer).
    fn write_u32(&self, dst: &Tensor, data: &[u32]) -> Result<()>;
    /// Copy host values into an existing f32 buffer of this device.
    fn write_f32(&self, dst: &Tensor, data: &[f32]) -> Result<()>;

    /// `t *= factor` in place, for an f32 tensor: loss scaling (powers of two, so exact away from
    /// overflow). The default reads the tensor back and writes it (the CPU backend, where both are
    /// copies); a device backend launches a kernel.
    fn scale_in_place(&self, t: &Tensor, factor: f32) -> Result<()> {
        if t.dtype() != DType::F32 {
            return Err(Error::Unsupported(format!("scale_in_place: the tensor is {}, only f32 is scaled", t.dtype())));
        }
        let mut v = self.to_host(t)?;
        v.iter_mut().for_each(|x| *x *= factor);
        self.write_f32(t, &v)
    }

    // ---- training tail -----------------------------------------------------------------------------
    /// One objective on `[B, C]` logits (spec in `crate::train::loss`): writes ∂loss/∂(trained
    /// logits) into `dlogits` and `[total, cross-entropy part]` into `loss` (`[2]`, on the device:
    /// nothing is read back). Non-finite logits make the loss NaN, which the caller checks
    /// when it reads the loss.
    fn loss(&self, op: &crate::train::loss::LossOp, dlogits: &Tensor, loss: &Tensor) -> Result<()>;
    /// `torch.nn.utils.clip_grad_norm_` over `grads` (any views): the total L2 norm (norm of the
    /// per-tensor norms) goes to `norm` (`[1]`), and every gradient is multiplied by
    /// `max_norm / (norm + 1e-6)` when that is below 1 (a NaN factor propagates, as in torch);
    /// `max_norm = +inf` only measures.
    fn clip_grad_norm(&self, grads: &[Tensor], max_norm: f32, norm: &Tensor) -> Result<()>;
    /// One `torch.optim.AdamW` update of the segments of a flat arena that received a gradient,
    /// reading each segment's step count and the learning rate from device buffers (so the call
    /// is the same every step).
    fn adamw(&self, step: &crate::train::optim::AdamWLaunch) -> Result<()>;
}
