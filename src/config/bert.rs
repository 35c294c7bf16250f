//! `BertConfig`, read from a Hugging Face `config.json` and validated: BERT, and RoBERTa / XLM-R
//! (`model_type` `roberta` / `xlm-roberta`: the same encoder, positions counted from the ids).

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

/// The architectures a `config.json` may name in `model_type`. RoBERTa and XLM-R are BERT's
/// encoder with other embeddings positions (see [`Positions`]), other defaults and a `roberta.`
/// weight prefix; XLM-R differs from RoBERTa only in its tokenizer (transformers 4.57.6
/// `XLMRobertaModel` is `RobertaModel`'s code).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ModelType {
    #[default]
    Bert,
    Roberta,
    XlmRoberta,
}

impl ModelType {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "bert" => Some(ModelType::Bert),
            "roberta" => Some(ModelType::Roberta),
            "xlm-roberta" => Some(ModelType::XlmRoberta),
            _ => None,
        }
    }

    /// The `model_type` string HF and the adapters library write.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Bert => "bert",
            ModelType::Roberta => "roberta",
            ModelType::XlmRoberta => "xlm-roberta",
        }
    }

    /// HF's `base_model_prefix`: the prefix of the base model's keys in a task checkpoint
    /// (`BertFor*`, `RobertaFor*`) or an adapter saved from a model with heads.
    pub fn weight_prefix(self) -> &'static str {
        match self {
            ModelType::Bert => "bert.",
            ModelType::Roberta | ModelType::XlmRoberta => "roberta.",
        }
    }

    /// The Python class of the bare model (`model_class` of a saved `adapter_config.json`).
    pub fn model_class(self) -> &'static str {
        match self {
            ModelType::Bert => "BertModel",
            ModelType::Roberta => "RobertaModel",
            ModelType::XlmRoberta => "XLMRobertaModel",
        }
    }

    /// The Python class with flexible heads (`model_class` of a saved `head_config.json`).
    pub fn adapter_model_class(self) -> &'static str {
        match self {
            ModelType::Bert => "BertAdapterModel",
            ModelType::Roberta => "RobertaAdapterModel",
            ModelType::XlmRoberta => "XLMRobertaAdapterModel",
        }
    }

    fn is_roberta(self) -> bool {
        matches!(self, ModelType::Roberta | ModelType::XlmRoberta)
    }
}

impl std::fmt::Display for ModelType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which row of the position-embedding table each token reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Positions {
    /// BERT: token `t` of a sequence reads row `t`.
    #[default]
    Sequential,
    /// RoBERTa and XLM-R (HF `create_position_ids_from_input_ids`): a token whose id is
    /// `padding_idx` reads row `padding_idx`; any other token reads `padding_idx + k`, where `k`
    /// counts the sequence's non-pad tokens up to and including it. So the ids decide, not the
    /// attention mask: a pad id inside a sequence moves the positions after it.
    FromIds { padding_idx: u32 },
}

impl Positions {
    /// How many position rows a sequence of `seq_len` tokens may read (the largest row is one less).
    pub fn rows_needed(self, seq_len: usize) -> usize {
        match self {
            Positions::Sequential => seq_len,
            Positions::FromIds { padding_idx } => (padding_idx as usize).saturating_add(1).saturating_add(seq_len),
        }
    }

    /// The position row of every token of `ids` (`[batch·seq_len]`, row-major).
    pub fn position_ids(self, ids: &[u32], seq_len: usize) -> Vec<u32> {
        let seq_len = seq_len.max(1);
        match self {
            Positions::Sequential => (0..ids.len()).map(|i| (i % seq_len) as u32).collect(),
            Positions::FromIds { padding_idx } => ids
                .chunks(seq_len)
                .flat_map(|row| {
                    row.iter().scan(0u32, move |count, &id| {
                        if id == padding_idx {
                            Some(padding_idx)
                        } else {
                            *count += 1;
                            Some(padding_idx + *count)
                        }
                    })
                })
                .collect(),
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
    /// `bert` (also when `config.json` names none), `roberta` or `xlm-roberta`.
    pub model_type: ModelType,
}

/// Upper bounds on the sizes a `config.json` may declare. They are generous (each is far above any
/// published BERT-family model) and exist so that a tiny hostile config cannot make the loader
/// build or allocate anything absurd before the weights file is compared with it: with these
/// bounds every product of sizes (embedding rows × hidden, layers × per-layer parameters) fits in
/// 64 bits, and the weights loader then checks the config against what the file actually holds.
pub mod limits {
    /// The largest public BERT-family models have at most ~100 layers (BERT-large 24,
    /// Megatron-BERT 3.9B and DeBERTa-v2-xxlarge 48); 10x that is still a sane config.
    pub const MAX_LAYERS: usize = 1_000;
    /// BERT-large is 1024 wide, Megatron-BERT 3.9B 2560; 64 Ki is 25x the widest.
    pub const MAX_HIDDEN: usize = 65_536;
    /// 4 × MAX_HIDDEN, BERT's usual intermediate ratio.
    pub const MAX_INTERMEDIATE: usize = 262_144;
    /// Multilingual vocabularies are ~250 K tokens (XLM-R); 10 M is 40x that.
    pub const MAX_VOCAB: usize = 10_000_000;
    /// BERT uses 512 positions, long-document variants 4 Ki–16 Ki; 1 Mi is far beyond them.
    pub const MAX_POSITIONS: usize = 1 << 20;
    /// BERT uses 2 token types; 1 Ki leaves room for any segment scheme.
    pub const MAX_TYPE_VOCAB: usize = 1_024;
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

/// The largest `config.json` read: Hugging Face's are a few kB.
pub const MAX_CONFIG_JSON_BYTES: u64 = 16 << 20;

impl BertConfig {
    /// Read and validate `config.json` (at most [`MAX_CONFIG_JSON_BYTES`]).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        // Hugging Face configs are a few kB; a cap keeps a wrong file from being read whole.
        let bytes = crate::io::read_capped(path, MAX_CONFIG_JSON_BYTES, "a config.json")?;
        let text = String::from_utf8(bytes).map_err(|e| Error::malformed(path, format!("not UTF-8: {e}")))?;
        Self::from_json_str(&text, path)
    }

    /// Parse and validate config JSON; `path` is only used in messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let raw: RawBertConfig =
            serde_json::from_str(text).map_err(|e| Error::malformed(path, format!("not a valid config.json: {e}")))?;
        // Positive and at most `max`, checked before anything is built from the value.
        let need = |v: Option<usize>, field: &str, max: usize| -> Result<usize> {
            match v {
                Some(0) => Err(Error::config(path, field, "must be positive")),
                Some(v) if v > max => Err(Error::config(path, field, format!("{v} is more than the {max} supported"))),
                Some(v) => Ok(v),
                None => Err(Error::config(path, field, "missing")),
            }
        };
        let model_type = match &raw.model_type {
            None => ModelType::Bert,
            Some(t) => ModelType::parse(t)
                .ok_or_else(|| Error::config(path, "model_type", format!("`{t}` is not supported (only `bert`, `roberta` and `xlm-roberta`)")))?,
        };
        let hidden_size = need(raw.hidden_size, "hidden_size", limits::MAX_HIDDEN)?;
        let num_attention_heads = need(raw.num_attention_heads, "num_attention_heads", usize::MAX)?;
        if num_attention_heads > hidden_size {
            return Err(Error::config(
                path,
                "num_attention_heads",
                format!("{num_attention_heads} is more than hidden_size {hidden_size} (a head needs at least one dimension)"),
            ));
        }
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
        let vocab_size = need(raw.vocab_size, "vocab_size", limits::MAX_VOCAB)?;
        // HF's defaults: BertConfig pads with 0, RobertaConfig (and XLMRobertaConfig) with 1.
        let pad_token_id = raw.pad_token_id.unwrap_or(if model_type.is_roberta() { 1 } else { 0 });
        if pad_token_id >= vocab_size {
            return Err(Error::config(path, "pad_token_id", format!("{pad_token_id} >= vocab_size {vocab_size}")));
        }
        let config = BertConfig {
            vocab_size,
            hidden_size,
            num_hidden_layers: need(raw.num_hidden_layers, "num_hidden_layers", limits::MAX_LAYERS)?,
            num_attention_heads,
            intermediate_size: need(raw.intermediate_size, "intermediate_size", limits::MAX_INTERMEDIATE)?,
            hidden_act,
            hidden_dropout_prob: prob(raw.hidden_dropout_prob, "hidden_dropout_prob")?,
            attention_probs_dropout_prob: prob(raw.attention_probs_dropout_prob, "attention_probs_dropout_prob")?,
            max_position_embeddings: need(raw.max_position_embeddings, "max_position_embeddings", limits::MAX_POSITIONS)?,
            type_vocab_size: need(raw.type_vocab_size.or(Some(2)), "type_vocab_size", limits::MAX_TYPE_VOCAB)?,
            layer_norm_eps,
            pad_token_id,
            model_type,
        };
        // Every text holds two special tokens ([CLS] and [SEP], or <s> and </s>); RoBERTa's
        // positions start after padding_idx, so its table needs pad_token_id + 1 more rows.
        if config.max_seq_len() < 2 {
            let offset = if model_type.is_roberta() { format!(" ({model_type} positions start at pad_token_id + 1 = {})", pad_token_id as u64 + 1) } else { String::new() };
            return Err(Error::config(
                path,
                "max_position_embeddings",
                format!(
                    "{} leaves room for {} tokens{offset}; a text needs at least 2, its two special tokens",
                    config.max_position_embeddings,
                    config.max_seq_len()
                ),
            ));
        }
        // Within the bounds this fits in 64 bits (5.3e13 at most); a 32-bit usize can overflow.
        if config.num_parameters().is_none() {
            return Err(Error::config(
                path,
                "num_hidden_layers",
                format!(
                    "{} layers of hidden_size {hidden_size} and intermediate_size {} with vocab_size {vocab_size} are more parameters than this machine can address",
                    config.num_hidden_layers, config.intermediate_size
                ),
            ));
        }
        Ok(config)
    }

    /// Which position row each token reads: [`Positions::FromIds`] with `padding_idx =
    /// pad_token_id` for RoBERTa and XLM-R, [`Positions::Sequential`] for BERT.
    pub fn positions(&self) -> Positions {
        match self.model_type {
            ModelType::Bert => Positions::Sequential,
            // pad_token_id < vocab_size <= MAX_VOCAB, so it fits.
            ModelType::Roberta | ModelType::XlmRoberta => Positions::FromIds { padding_idx: self.pad_token_id as u32 },
        }
    }

    /// The longest sequence the position table serves, special tokens included:
    /// `max_position_embeddings` for BERT, `max_position_embeddings − pad_token_id − 1` for
    /// RoBERTa / XLM-R (514 − 2 = 512 for roberta-base), 0 when none fits.
    pub fn max_seq_len(&self) -> usize {
        let offset = self.positions().rows_needed(0);
        self.max_position_embeddings.saturating_sub(offset)
    }

    /// What bounds the sequence length, for messages: `max_position_embeddings 40` for BERT,
    /// `max_position_embeddings 34 less roberta's position offset 2 (32 tokens)` for RoBERTa.
    pub fn max_seq_len_source(&self) -> String {
        match self.positions() {
            Positions::Sequential => format!("max_position_embeddings {}", self.max_position_embeddings),
            Positions::FromIds { .. } => format!(
                "max_position_embeddings {} less {}'s position offset {} ({} tokens)",
                self.max_position_embeddings,
                self.model_type,
                self.positions().rows_needed(0),
                self.max_seq_len()
            ),
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The parameters of a BertModel with this config, pooler included, counted with checked
    /// arithmetic: `None` when the count does not fit in a `usize`.
    pub fn num_parameters(&self) -> Option<usize> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let linear = |fan_in: usize, fan_out: usize| fan_in.checked_mul(fan_out)?.checked_add(fan_out);
        let rows = self.vocab_size.checked_add(self.max_position_embeddings)?.checked_add(self.type_vocab_size)?;
        let embeddings = rows.checked_mul(h)?.checked_add(h.checked_mul(2)?)?;
        let attention = linear(h, h)?.checked_mul(4)?;
        let layer = attention.checked_add(linear(h, i)?)?.checked_add(linear(i, h)?)?.checked_add(h.checked_mul(4)?)?;
        embeddings.checked_add(layer.checked_mul(self.num_hidden_layers)?)?.checked_add(linear(h, h)?)
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
    fn bounds_every_size_and_accepts_the_bounds_themselves() {
        let over = [
            ("num_hidden_layers", "1001", "1001 is more than the 1000 supported"),
            ("hidden_size", "65538", "65538 is more than the 65536 supported"),
            ("intermediate_size", "262145", "262145 is more than the 262144 supported"),
            ("vocab_size", "10000001", "10000001 is more than the 10000000 supported"),
            ("max_position_embeddings", "1048577", "1048577 is more than the 1048576 supported"),
            ("type_vocab_size", "1025", "1025 is more than the 1024 supported"),
            ("num_attention_heads", "49", "49 is more than hidden_size 48"),
            ("num_hidden_layers", "1000000000", "1000000000 is more than the 1000 supported"),
            ("vocab_size", "18446744073709551615", "18446744073709551615 is more than the 10000000 supported"),
        ];
        for (field, value, says) in over {
            let err = parse(&with(field, value)).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(&err, Error::Config { field: f, .. } if f == field), "{field}={value}: {msg}");
            assert!(msg.starts_with(&format!("config.json: field `{field}`: {says}")), "{field}={value}: {msg}");
        }
        let mut v: serde_json::Value = serde_json::from_str(BASE).unwrap();
        for (field, value) in [
            ("num_hidden_layers", 1000),
            ("hidden_size", 65536),
            ("num_attention_heads", 65536),
            ("intermediate_size", 262144),
            ("vocab_size", 10_000_000),
            ("max_position_embeddings", 1 << 20),
            ("type_vocab_size", 1024),
        ] {
            v[field] = value.into();
        }
        let c = parse(&v.to_string()).unwrap();
        assert_eq!((c.num_hidden_layers, c.hidden_size, c.head_dim(), c.vocab_size), (1000, 65536, 1, 10_000_000));
        // 1000 layers of 65536 x 262144 still count in 64 bits (5.2e13 parameters, 209 TB of f32).
        assert_eq!(c.num_parameters(), Some(52_268_901_269_504));
    }

    #[test]
    fn parameter_count_is_exact_and_checked() {
        // tiny_bert's 48 920 parameters (embeddings 7 872, two layers of 19 348, pooler 2 352).
        let c = parse(r#"{"vocab_size":120,"hidden_size":48,"num_hidden_layers":2,"num_attention_heads":3,
            "intermediate_size":100,"max_position_embeddings":40}"#).unwrap();
        assert_eq!(c.num_parameters(), Some(48_920));
        // Sizes past the bounds (only reachable by building the struct) overflow to None, not a panic.
        let huge = BertConfig { vocab_size: usize::MAX / 2, hidden_size: 4, ..c.clone() };
        assert_eq!(huge.num_parameters(), None);
        let huge = BertConfig { num_hidden_layers: usize::MAX, ..c };
        assert_eq!(huge.num_parameters(), None);
    }

    #[test]
    fn rejects_with_field_names() {
        let cases = [
            ("num_attention_heads", "5", "hidden_size", "not divisible"),
            ("hidden_act", "\"swish\"", "hidden_act", "`swish` is not supported"),
            ("position_embedding_type", "\"relative_key\"", "position_embedding_type", "absolute"),
            ("model_type", "\"deberta\"", "model_type", "`deberta` is not supported (only `bert`, `roberta` and `xlm-roberta`)"),
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
