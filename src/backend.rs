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
use crate::error::Result;
use crate::tensor::Tensor;

/// Elementwise activations used by BERT and by adapters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    Relu,
    /// Exact GELU, `0.5·x·(1+erf(x/√2))`.
    Gelu,
    /// Tanh-approximated GELU, `0.5·x·(1+tanh(√(2/π)·(x+0.044715x³)))`.
    GeluNew,
    /// `x·σ(x)` (torch SiLU; "swish" in the adapters library).
    Swish,
    Tanh,
    Sigmoid,
}

impl Activation {
    /// Scalar definition, in f64: the spec every backend's kernel is tested against.
    pub fn apply_f64(self, x: f64) -> f64 {
        match self {
            Activation::Relu => x.max(0.0),
            Activation::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
            Activation::GeluNew => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }
            Activation::Swish => x / (1.0 + (-x).exp()),
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        }
    }
}

impl From<crate::config::HiddenAct> for Activation {
    fn from(a: crate::config::HiddenAct) -> Self {
        match a {
            crate::config::HiddenAct::Gelu => Activation::Gelu,
            crate::config::HiddenAct::GeluNew => Activation::GeluNew,
            crate::config::HiddenAct::Relu => Activation::Relu,
        }
    }
}

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

/// The op families. Forward methods allocate their outputs.
pub trait Backend: Send + Sync {
    fn device(&self) -> Device;
    /// A short human name, e.g. "cpu (fast)".
    fn name(&self) -> String;

    // ---- memory ------------------------------------------------------------------------------
    /// Move host data onto this backend's device.
    fn upload(&self, data: Vec<f32>, shape: &[usize]) -> Result<Tensor>;
    /// Copy a tensor back to the host.
    fn to_host(&self, t: &Tensor) -> Result<Vec<f32>>;

    // ---- GEMM family ---------------------------------------------------------------------------
    /// `y[rows, out] = x[rows, in]·Wᵀ + b`, with `w: [out, in]` and `b: [out]`.
    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor>;

    // ---- embedding family ----------------------------------------------------------------------
    /// `word[ids] + pos[t] + type[tt]`, giving `[batch, seq_len, H]`. Positions are `0..seq_len`.
    fn embedding(&self, tokens: &TokenBatch, word: &Tensor, position: &Tensor, token_type: &Tensor) -> Result<Tensor>;

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

    // ---- attention family ----------------------------------------------------------------------
    /// Multi-head scaled dot-product attention, HF eager semantics. `q, k, v: [B, T, H]` with the
    /// heads side by side in H; `mask_bias: [B, T]` is added to every query's scores for key t
    /// (0 for a real token, `f32::MIN` for padding). Returns the context `[B, T, H]`.
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask_bias: &Tensor, heads: usize) -> Result<Tensor>;

    // ---- activation family ---------------------------------------------------------------------
    fn activation(&self, x: &Tensor, act: Activation) -> Result<Tensor>;

    // ---- gather ----------------------------------------------------------------------------------
    /// The first token of every sequence: `[B, T, H] -> [B, H]` (the pooler's input).
    fn first_token(&self, x: &Tensor) -> Result<Tensor>;
}
