//! A plain bf16 model for the whole-model bf16 rule (tests/support/bf16.rs, docs/STYLE.md): a
//! [`Backend`] decorator over the CPU reference backend that rounds the output of every forward op
//! the model runs to bf16, so a `BertModel` on it computes as PyTorch's bf16 ops would, each op in
//! f32 (the reference accumulates in f64) on bf16 inputs, its output rounded once.
//!
//! Where the seam fuses what PyTorch runs as separate bf16 ops and the parts are seam ops, the
//! decorator runs them separately and rounds each: `residual_layernorm(x, r)` is `add` then
//! `LayerNorm` (BERT's `LayerNorm(h + r)`), `linear_act` / `linear_act_only` are `linear` then
//! the activation, `embedding_layernorm` is `embedding` then `LayerNorm` (the trait's provided
//! composition). The fused ops that remain (attention, an adapter location, NICE) round once, at
//! their output, which PyTorch's bf16 would do at every step inside: that makes this plain model
//! more accurate than PyTorch's, so the rule against it is the stricter one.
//!
//! Only what is not an activation stays exact: attention's log-sum-exp (f32 statistics), the
//! finiteness scan, uploads (inputs and the mask bias).
//!
//! The backward is bf16 training as autocast runs it with f32 master weights: every gradient of
//! an activation an op returns or writes (`dx`, `dqkv`, an adapter location's `dh`/`dr`, the
//! dropout of a gradient, an accumulation into one) is rounded to bf16; the parameter gradients
//! (`linear_backward_params_into`, the adapter and NICE weight gradients) stay f32, and so does
//! the training tail (loss, clipping, AdamW). Fused backward ops round once, at their outputs.
//! Included with `#[path]`, not a crate.
#![allow(dead_code)]

use bert_adapters::backend::{AdapterLocation, Backend, BottleneckGrads, DropoutSpec, GradsOut, NiceGrads, NiceParams};
use bert_adapters::{Activation, CpuBackend, DType, Device, Result, Tensor};

/// The CPU reference backend with every forward op's output rounded to bf16 (or, built with
/// [`PlainBf16::f16`], to f16: the same model for the f16 pipeline).
pub struct PlainBf16(pub CpuBackend, pub DType);

impl PlainBf16 {
    pub fn new() -> Self {
        PlainBf16(CpuBackend::reference(), DType::BF16)
    }

    /// The plain f16 model: every rounding above is to f16 instead.
    pub fn f16() -> Self {
        PlainBf16(CpuBackend::reference(), DType::F16)
    }

    /// `t` rounded to the 16-bit type (nearest, ties to even), kept as f32.
    fn round(&self, t: Tensor) -> Result<Tensor> {
        self.0.cast(&self.0.cast(&t, self.1)?, DType::F32)
    }

    /// `t`'s contents rounded to bf16 in place (an op's written destination).
    fn round_in_place(&self, t: &Tensor) -> Result<()> {
        let rounded = self.round(t.clone())?;
        self.0.fill(t, 0.0)?;
        self.0.add_into(t, &rounded)
    }
}

impl Backend for PlainBf16 {
    fn device(&self) -> Device {
        self.0.device()
    }
    fn name(&self) -> String {
        format!("plain {} over {}", self.1, self.0.name())
    }
    fn supports_training(&self) -> bool {
        true
    }

    // ---- memory: exact ---------------------------------------------------------------------------
    fn upload(&self, data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        self.0.upload(data, shape)
    }
    fn to_host(&self, t: &Tensor) -> Result<Vec<f32>> {
        self.0.to_host(t)
    }
    fn upload_u32(&self, data: Vec<u32>, shape: &[usize]) -> Result<Tensor> {
        self.0.upload_u32(data, shape)
    }
    fn to_host_u32(&self, t: &Tensor) -> Result<Vec<u32>> {
        self.0.to_host_u32(t)
    }
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.0.zeros(shape, dtype)
    }
    fn all_finite(&self, t: &Tensor) -> Result<bool> {
        self.0.all_finite(t)
    }

    // ---- forward ops: each output rounded ------------------------------------------------------
    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        self.round(self.0.linear(x, w, b)?)
    }
    fn linear_dropout(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, dropout: Option<&DropoutSpec>) -> Result<Tensor> {
        self.round(self.0.linear_dropout(x, w, b, dropout)?)
    }
    fn linear_act(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Activation) -> Result<(Tensor, Tensor)> {
        let pre = self.linear(x, w, b)?;
        Ok((self.activation(&pre, act)?, pre))
    }
    fn linear_act_only(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Activation) -> Result<Tensor> {
        Ok(self.linear_act(x, w, b, act)?.0)
    }
    fn embedding(&self, input_ids: &Tensor, token_type_ids: &Tensor, word: &Tensor, position: &Tensor, token_type: &Tensor, positions: bert_adapters::Positions) -> Result<Tensor> {
        self.round(self.0.embedding(input_ids, token_type_ids, word, position, token_type, positions)?)
    }
    fn residual_layernorm(&self, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
        let z = match residual {
            Some(r) => self.add(x, r)?,
            None => x.clone(),
        };
        self.round(self.0.residual_layernorm(&z, None, gamma, beta, eps)?)
    }
    fn residual_layernorm_dropout(&self, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor, eps: f32, dropout: Option<&DropoutSpec>) -> Result<Tensor> {
        let y = self.residual_layernorm(x, residual, gamma, beta, eps)?;
        match dropout {
            Some(spec) => self.0.dropout(&y, spec),
            None => Ok(y),
        }
    }
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask_bias: &Tensor, heads: usize, dropout: Option<&DropoutSpec>) -> Result<Tensor> {
        self.round(self.0.attention(q, k, v, mask_bias, heads, dropout)?)
    }
    fn attention_packed(&self, qkv: &Tensor, mask_bias: &Tensor, heads: usize, dropout: Option<&DropoutSpec>) -> Result<(Tensor, Tensor)> {
        let (ctx, lse) = self.0.attention_packed(qkv, mask_bias, heads, dropout)?;
        Ok((self.round(ctx)?, lse))
    }
    fn activation(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        self.round(self.0.activation(x, act)?)
    }
    fn adapter_location(&self, loc: &AdapterLocation) -> Result<Tensor> {
        self.round(self.0.adapter_location(loc)?)
    }
    fn nice(&self, x: &Tensor, params: &NiceParams, inverse: bool) -> Result<Tensor> {
        self.round(self.0.nice(x, params, inverse)?)
    }
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.round(self.0.add(a, b)?)
    }
    fn select_rows(&self, t: &Tensor, ranges: &[std::ops::Range<usize>]) -> Result<Tensor> {
        self.0.select_rows(t, ranges)
    }
    fn first_token(&self, x: &Tensor) -> Result<Tensor> {
        self.0.first_token(x)
    }
    fn cast(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        self.0.cast(t, dtype)
    }

    // ---- backward: activation gradients rounded, parameter gradients f32 -------------------------
    fn linear_backward_input_act(&self, dy: &Tensor, w: &Tensor, pre: &Tensor, act: Activation) -> Result<Tensor> {
        self.round(self.0.linear_backward_input_act(dy, w, pre, act)?)
    }
    fn residual_layernorm_stats(&self, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<(Tensor, Tensor, Tensor)> {
        let (y, z, stats) = self.0.residual_layernorm_stats(x, residual, gamma, beta, eps)?;
        Ok((self.round(y)?, self.round(z)?, stats))
    }
    fn layernorm_backward_stats(&self, dy: &Tensor, z: &Tensor, stats: &Tensor, gamma: &Tensor) -> Result<Tensor> {
        self.round(self.0.layernorm_backward_stats(dy, z, stats, gamma)?)
    }
    fn linear_backward_input_into(&self, dy: &Tensor, w: &Tensor, out: &Tensor, accumulate: bool) -> Result<()> {
        self.0.linear_backward_input_into(dy, w, out, accumulate)?;
        self.round_in_place(out)
    }
    fn linear_backward_params_into(&self, dy: &Tensor, x: &Tensor, dw: &Tensor, db: Option<&Tensor>, accumulate: bool) -> Result<()> {
        self.0.linear_backward_params_into(dy, x, dw, db, accumulate)
    }
    fn activation_backward(&self, dy: &Tensor, pre: &Tensor, act: Activation) -> Result<Tensor> {
        self.round(self.0.activation_backward(dy, pre, act)?)
    }
    fn layernorm_backward_input(&self, dy: &Tensor, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, eps: f32) -> Result<Tensor> {
        self.round(self.0.layernorm_backward_input(dy, x, residual, gamma, eps)?)
    }
    fn attention_backward(&self, dctx: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, mask_bias: &Tensor, heads: usize, dropout: Option<&DropoutSpec>) -> Result<[Tensor; 3]> {
        let [dq, dk, dv] = self.0.attention_backward(dctx, q, k, v, mask_bias, heads, dropout)?;
        Ok([self.round(dq)?, self.round(dk)?, self.round(dv)?])
    }
    fn attention_packed_backward(&self, dctx: &Tensor, qkv: &Tensor, lse: &Tensor, mask_bias: &Tensor, heads: usize, dropout: Option<&DropoutSpec>) -> Result<Tensor> {
        self.round(self.0.attention_packed_backward(dctx, qkv, lse, mask_bias, heads, dropout)?)
    }
    fn adapter_location_backward_into(&self, loc: &AdapterLocation, d_out: &Tensor, grads: &[Option<GradsOut<BottleneckGrads>>], need_input_grads: bool) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dh, dr) = self.0.adapter_location_backward_into(loc, d_out, grads, need_input_grads)?;
        Ok((dh.map(|t| self.round(t)).transpose()?, dr.map(|t| self.round(t)).transpose()?))
    }
    fn nice_backward_into(&self, x: &Tensor, params: &NiceParams, dy: &Tensor, out: &GradsOut<NiceGrads>) -> Result<()> {
        self.0.nice_backward_into(x, params, dy, out)
    }
    fn dropout(&self, x: &Tensor, spec: &DropoutSpec) -> Result<Tensor> {
        self.round(self.0.dropout(x, spec)?)
    }
    fn first_token_backward_into(&self, d: &Tensor, out: &Tensor, accumulate: bool) -> Result<()> {
        self.0.first_token_backward_into(d, out, accumulate)?;
        self.round_in_place(out)
    }
    fn fill(&self, t: &Tensor, value: f32) -> Result<()> {
        self.0.fill(t, value)
    }
    fn add_into(&self, dst: &Tensor, src: &Tensor) -> Result<()> {
        self.0.add_into(dst, src)?;
        self.round_in_place(dst)
    }
    fn write_u32(&self, dst: &Tensor, data: &[u32]) -> Result<()> {
        self.0.write_u32(dst, data)
    }
    fn write_f32(&self, dst: &Tensor, data: &[f32]) -> Result<()> {
        self.0.write_f32(dst, data)
    }
    fn loss(&self, op: &bert_adapters::train::loss::LossOp, dlogits: &Tensor, loss: &Tensor) -> Result<()> {
        self.0.loss(op, dlogits, loss)
    }
    fn clip_grad_norm(&self, grads: &[Tensor], max_norm: f32, norm: &Tensor) -> Result<()> {
        self.0.clip_grad_norm(grads, max_norm, norm)
    }
    fn adamw(&self, step: &bert_adapters::train::optim::AdamWLaunch) -> Result<()> {
        self.0.adamw(step)
    }
}
