//! `BertConfig`, read from a Hugging Face `config.json` and validated.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The activation of BERT's feed-forward layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HiddenAct {
    /// Exact GELU, `0.5·x·(1+erf(x/√2))` (HF "gelu").
    Gelu,
    /// Tanh-approximated GELU (HF "gelu_new").
    GeluNew,
    Relu,
}

impl HiddenAct {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "gelu" => Some(HiddenAct::Gelu),
            "gelu_new" => Some(HiddenAct::GeluNew),
            "relu" => Some(HiddenAct::Relu),
            _ => None,
        }
    }
}

/// The subset of HF's `BertConfig` that changes the math, after validation.
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: HiddenAct,
    pub hidden_dropout_prob: f32,
    pub attention_probs_dropout_prob: f32,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
    pub pad_token_id: usize,
}

/// `config.json` as written; every field optional so a missing one gets a precise message.
#[derive(Deserialize)]
struct RawBertConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    intermediate_size: Option<usize>,
    hidden_act: Option<serde_json::Value>,
    hidden_dropout_prob: Option<f32>,
    attention_probs_dropout_prob: Option<f32>,
    max_position_embeddings: Option<usize>,
    type_vocab_size: Option<usize>,
    layer_norm_eps: Option<f32>,
    pad_token_id: Option<usize>,
    position_embedding_type: Option<String>,
    is_decoder: Option<bool>,
    add_cross_attention: Option<bool>,
}

impl BertConfig {
    /// Read and validate `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parse and validate config JSON; `path` is only used in messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let raw: RawBertConfig =
            serde_json::from_str(text).map_err(|e| Error::malformed(path, format!("not a valid config.json: {e}")))?;
        let need = |v: Option<usize>, field: &str| -> Result<usize> {
            match v {
                Some(0) => Err(Error::config(path, field, "must be positive")),
                Some(v) => Ok(v),
                None => Err(Error::config(path, field, "missing")),
            }
        };
        if let Some(t) = &raw.model_type {
            if t != "bert" {
                return Err(Error::config(path, "model_type", format!("`{t}` is not supported (only `bert`)")));
            }
        }
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        if hidden_size % num_attention_heads != 0 {
            return Err(Error::config(
                path,
                "hidden_size",
                format!("{hidden_size} is not divisible by num_attention_heads {num_attention_heads}"),
            ));
        }
        let hidden_act = match &raw.hidden_act {
            None => HiddenAct::Gelu,
            Some(serde_json::Value::String(s)) => HiddenAct::parse(s).ok_or_else(|| {
                Error::config(path, "hidden_act", format!("`{s}` is not supported (expected gelu, gelu_new or relu)"))
            })?,
            Some(other) => return Err(Error::config(path, "hidden_act", format!("expected a string, got {other}"))),
        };
        if let Some(p) = &raw.position_embedding_type {
            if p != "absolute" {
                return Err(Error::config(
                    path,
                    "position_embedding_type",
                    format!("`{p}` is not supported (only absolute position embeddings)"),
                ));
            }
        }
        if raw.is_decoder == Some(true) {
            return Err(Error::config(path, "is_decoder", "decoder BERT is not supported"));
        }
        if raw.add_cross_attention == Some(true) {
            return Err(Error::config(path, "add_cross_attention", "cross-attention is not supported"));
        }
        let prob = |v: Option<f32>, field: &str| -> Result<f32> {
            let p = v.unwrap_or(0.1);
            if !(0.0..1.0).contains(&p) {
                return Err(Error::config(path, field, format!("{p} is not a probability in [0, 1)")));
            }
            Ok(p)
        };
        let layer_norm_eps = raw.layer_norm_eps.unwrap_or(1e-12);
        if !(layer_norm_eps >= 0.0 && layer_norm_eps.is_finite()) {
            return Err(Error::config(path, "layer_norm_eps", format!("{layer_norm_eps} must be a finite number >= 0")));
        }
        let vocab_size = need(raw.vocab_size, "vocab_size")?;
        let pad_token_id = raw.pad_token_id.unwrap_or(0);
        if pad_token_id >= vocab_size {
            return Err(Error::config(path, "pad_token_id", format!("{pad_token_id} >= vocab_size {vocab_size}")));
        }
        Ok(BertConfig {
            vocab_size,
            hidden_size,
            num_hidden_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            hidden_act,
            hidden_dropout_prob: prob(raw.hidden_dropout_prob, "hidden_dropout_prob")?,
            attention_probs_dropout_prob: prob(raw.attention_probs_dropout_prob, "attention_probs_dropout_prob")?,
            max_position_embeddings: need(raw.max_position_embeddings, "max_position_embeddings")?,
            type_vocab_size: need(raw.type_vocab_size.or(Some(2)), "type_vocab_size")?,
            layer_norm_eps,
            pad_token_id,
        })
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<BertConfig> {
        BertConfig::from_json_str(json, Path::new("config.json"))
    }
    const BASE: &str = r#"{"model_type":"bert","vocab_size":120,"hidden_size":48,"num_hidden_layers":2,
        "num_attention_heads":3,"intermediate_size":100,"max_position_embeddings":40}"#;

    #[test]
    fn defaults_follow_hf() {
        let c = parse(BASE).unwrap();
        assert_eq!(c.hidden_act, HiddenAct::Gelu);
        assert_eq!(c.type_vocab_size, 2);
        assert_eq!(c.layer_norm_eps, 1e-12);
        assert_eq!(c.head_dim(), 16);
    }

    fn with(field: &str, value: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(BASE).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        v.to_string()
    }

    #[test]
    fn rejects_with_field_names() {
        let cases = [
            ("num_attention_heads", "5", "hidden_size", "not divisible"),
            ("hidden_act", "\"swish\"", "hidden_act", "`swish` is not supported"),
            ("position_embedding_type", "\"relative_key\"", "position_embedding_type", "absolute"),
            ("model_type", "\"roberta\"", "model_type", "roberta"),
            ("hidden_dropout_prob", "1.5", "hidden_dropout_prob", "probability"),
            ("vocab_size", "0", "vocab_size", "positive"),
        ];
        for (field, value, named, says) in cases {
            let err = parse(&with(field, value)).unwrap_err().to_string();
            assert!(err.contains(named) && err.contains(says), "{field}={value}: {err}");
        }
        let err = parse(r#"{"hidden_size": 48}"#).unwrap_err().to_string();
        assert!(err.contains("`num_attention_heads`: missing"), "{err}");
        let err = parse("{not json").unwrap_err().to_string();
        assert!(err.contains("config.json: not a valid config.json"), "{err}");
    }
}
