//! BERT encoder in eval mode with HF `BertModel` semantics.

use std::path::Path;
use std::sync::Arc;

use crate::backend::{Activation, Backend};
use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::io::{BertWeights, InputBatch, LoadOptions, LoadReport};
use crate::tensor::Tensor;

pub struct BertModel {
    config: BertConfig,
    weights: BertWeights,
    backend: Arc<dyn Backend>,
}

/// What a forward pass returns, on the backend's device.
pub struct BertOutput {
    /// `[B, T, H]`.
    pub last_hidden_state: Tensor,
    /// `[B, H]`, when the weights have a pooler.
    pub pooler_output: Option<Tensor>,
    /// `L + 1` tensors of `[B, T, H]`: the embedding output, then each layer's output.
    pub hidden_states: Vec<Tensor>,
}

impl BertModel {
    pub fn new(config: BertConfig, weights: BertWeights, backend: Arc<dyn Backend>) -> Self {
        BertModel { config, weights, backend }
    }

    /// Load `config.json` and `model.safetensors` from a Hugging Face model folder.
    pub fn from_dir(dir: impl AsRef<Path>, backend: Arc<dyn Backend>, opts: LoadOptions) -> Result<(Self, LoadReport)> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::io(dir, std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found")));
        }
        let config = BertConfig::from_file(dir.join("config.json"))?;
        let (weights, report) = BertWeights::load(dir.join("model.safetensors"), &config, backend.as_ref(), opts)?;
        Ok((BertModel::new(config, weights, backend), report))
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
    pub fn has_pooler(&self) -> bool {
        self.weights.pooler.is_some()
    }

    /// The additive attention bias of HF: `(1 - mask)·f32::MIN`, `[B, T]`.
    fn mask_bias(&self, batch: &InputBatch) -> Result<Tensor> {
        let bias = batch.attention_mask.iter().map(|&m| if m == 0 { f32::MIN } else { 0.0 }).collect();
        self.backend.upload(bias, &[batch.batch, batch.seq_len])
    }

    /// Eval-mode forward (no dropout). The batch must have been validated against this model's
    /// config (`InputBatch::new` does that); ids are re-checked by the embedding op regardless.
    pub fn forward(&self, batch: &InputBatch) -> Result<BertOutput> {
        let be = self.backend.as_ref();
        let cfg = &self.config;
        let w = &self.weights;
        if batch.seq_len > cfg.max_position_embeddings {
            return Err(Error::Input(format!(
                "sequence length {} exceeds max_position_embeddings {}",
                batch.seq_len, cfg.max_position_embeddings
            )));
        }
        let emb = be.embedding(&batch.tokens(), &w.word_embeddings, &w.position_embeddings, &w.token_type_embeddings)?;
        let mut x = be.residual_layernorm(&emb, None, &w.embeddings_ln_gamma, &w.embeddings_ln_beta, cfg.layer_norm_eps)?;
        let mask = self.mask_bias(batch)?;
        let act = Activation::from(cfg.hidden_act);
        let mut hidden_states = Vec::with_capacity(cfg.num_hidden_layers + 1);
        for layer in &w.layers {
            hidden_states.push(x.clone());
            let q = be.linear(&x, &layer.query_w, Some(&layer.query_b))?;
            let k = be.linear(&x, &layer.key_w, Some(&layer.key_b))?;
            let v = be.linear(&x, &layer.value_w, Some(&layer.value_b))?;
            let context = be.attention(&q, &k, &v, &mask, cfg.num_attention_heads)?;
            let h1 = be.linear(&context, &layer.attn_out_w, Some(&layer.attn_out_b))?;
            let x_attn = be.residual_layernorm(&h1, Some(&x), &layer.attn_ln_gamma, &layer.attn_ln_beta, cfg.layer_norm_eps)?;
            let inter = be.activation(&be.linear(&x_attn, &layer.intermediate_w, Some(&layer.intermediate_b))?, act)?;
            let h2 = be.linear(&inter, &layer.output_w, Some(&layer.output_b))?;
            x = be.residual_layernorm(&h2, Some(&x_attn), &layer.output_ln_gamma, &layer.output_ln_beta, cfg.layer_norm_eps)?;
        }
        hidden_states.push(x.clone());
        let pooler_output = match &w.pooler {
            Some((pw, pb)) => Some(be.activation(&be.linear(&be.first_token(&x)?, pw, Some(pb))?, Activation::Tanh)?),
            None => None,
        };
        Ok(BertOutput { last_hidden_state: x, pooler_output, hidden_states })
    }
}
