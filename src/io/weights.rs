//! BERT weights from a Hugging Face `model.safetensors`, with a load report.
//!
//! Accepted: keys with or without the model type's prefix (`bert.` for BertModel vs. BertFor*
//! checkpoints; `roberta.` for RobertaModel / XLMRobertaModel vs. their task models), the legacy
//! `LayerNorm.gamma/beta` names, F32/F16/BF16 data. Ignored: the buffers
//! `embeddings.position_ids` and `embeddings.token_type_ids` (not weights), and the pre-training
//! heads (`cls.*` of BERT, `lm_head.*` of RoBERTa). Strict by default: a missing or mis-shaped
//! tensor is an error naming the key and both shapes, and so is an unexpected key.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::backend::Backend;
use crate::config::{BertConfig, ModelType};
use crate::error::{Error, Result};
use crate::io::tensor_file::TensorFile;
use crate::tensor::{DType, Tensor};

#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Refuse unexpected keys too (missing and mis-shaped tensors are always refused, since
    /// the model cannot run without them).
    pub strict: bool,
    /// Storage of the frozen base: F32, or BF16/F16 (half the memory; every op widens to f32 and
    /// accumulates in f32). Adapters always keep f32 master weights.
    pub dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { strict: true, dtype: DType::F32 }
    }
}

/// What loading found, by canonical key (no `bert.` / `roberta.` prefix, `LayerNorm.weight/bias`):
/// the same for a bare model's file and a task checkpoint of it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    /// `(key, expected shape, shape in the file)`.
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Keys that are known not to be weights of a BertModel and were skipped on purpose.
    pub ignored: Vec<String>,
    pub has_pooler: bool,
}

pub struct LayerWeights {
    /// Query, key and value packed at load into one product: `[3H, H]` (rows Q, then K, then V)
    /// and `[3H]`, so the forward runs one GEMM and the backward one input-gradient product.
    pub qkv_w: Tensor,
    pub qkv_b: Tensor,
    pub attn_out_w: Tensor,
    pub attn_out_b: Tensor,
    pub attn_ln_gamma: Tensor,
    pub attn_ln_beta: Tensor,
    pub intermediate_w: Tensor,
    pub intermediate_b: Tensor,
    pub output_w: Tensor,
    pub output_b: Tensor,
    pub output_ln_gamma: Tensor,
    pub output_ln_beta: Tensor,
}

pub struct BertWeights {
    pub word_embeddings: Tensor,
    pub position_embeddings: Tensor,
    pub token_type_embeddings: Tensor,
    pub embeddings_ln_gamma: Tensor,
    pub embeddings_ln_beta: Tensor,
    pub layers: Vec<LayerWeights>,
    /// `(dense weight, dense bias)` when the checkpoint has a pooler.
    pub pooler: Option<(Tensor, Tensor)>,
}

const POOLER_KEYS: [&str; 2] = ["pooler.dense.weight", "pooler.dense.bias"];

/// The canonical key of a file key of a `model_type` checkpoint: no `bert.` (BERT) or `roberta.`
/// (RoBERTa, XLM-R) prefix, legacy LayerNorm names renamed.
pub fn canonical_key(key: &str, model_type: ModelType) -> String {
    let k = key.strip_prefix(model_type.weight_prefix()).unwrap_or(key);
    if let Some(base) = k.strip_suffix("LayerNorm.gamma") {
        format!("{base}LayerNorm.weight")
    } else if let Some(base) = k.strip_suffix("LayerNorm.beta") {
        format!("{base}LayerNorm.bias")
    } else {
        k.to_string()
    }
}

fn is_ignored(canonical: &str, model_type: ModelType) -> bool {
    let head = match model_type {
        ModelType::Bert => "cls.",
        ModelType::Roberta | ModelType::XlmRoberta => "lm_head.",
    };
    canonical == "embeddings.position_ids" || canonical == "embeddings.token_type_ids" || canonical.starts_with(head)
}

/// How many encoder layers a file's canonical keys reach: one more than the largest `N` of an
/// `encoder.layer.N.` key (0 when there is none). Keys whose `N` is not a number are left to the
/// unexpected-key check.
fn layers_held<'a>(canonical_keys: impl Iterator<Item = &'a String>) -> usize {
    canonical_keys
        .filter_map(|k| k.strip_prefix("encoder.layer.")?.split_once('.')?.0.parse::<usize>().ok())
        .map(|n| n.saturating_add(1))
        .max()
        .unwrap_or(0)
}

/// Every tensor a BertModel with this config has, with its shape, in a stable order.
pub fn expected_shapes(cfg: &BertConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let mut v: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.word_embeddings.weight".into(), vec![cfg.vocab_size, h]),
        ("embeddings.position_embeddings.weight".into(), vec![cfg.max_position_embeddings, h]),
        ("embeddings.token_type_embeddings.weight".into(), vec![cfg.type_vocab_size, h]),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
    ];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layer.{l}.");
        for (name, shape) in [
            ("attention.self.query.weight", vec![h, h]),
            ("attention.self.query.bias", vec![h]),
            ("attention.self.key.weight", vec![h, h]),
            ("attention.self.key.bias", vec![h]),
            ("attention.self.value.weight", vec![h, h]),
            ("attention.self.value.bias", vec![h]),
            ("attention.output.dense.weight", vec![h, h]),
            ("attention.output.dense.bias", vec![h]),
            ("attention.output.LayerNorm.weight", vec![h]),
            ("attention.output.LayerNorm.bias", vec![h]),
            ("intermediate.dense.weight", vec![i, h]),
            ("intermediate.dense.bias", vec![i]),
            ("output.dense.weight", vec![h, i]),
            ("output.dense.bias", vec![h]),
            ("output.LayerNorm.weight", vec![h]),
            ("output.LayerNorm.bias", vec![h]),
        ] {
            v.push((format!("{p}{name}"), shape));
        }
    }
    v.push((POOLER_KEYS[0].into(), vec![h, h]));
    v.push((POOLER_KEYS[1].into(), vec![h]));
    v
}

impl BertWeights {
    /// Load `path` for `cfg` onto `backend`'s device. Returns the weights and the report; errors
    /// (strict mode) name the file, the key and both shapes.
    pub fn load(path: impl AsRef<Path>, cfg: &BertConfig, backend: &dyn Backend, opts: LoadOptions) -> Result<(Self, LoadReport)> {
        if !opts.dtype.is_float() {
            return Err(Error::Input(format!("the base model's weights cannot be stored as {}", opts.dtype)));
        }
        let file = TensorFile::open(path.as_ref())?;
        let path = file.path().to_path_buf();

        // canonical key -> file key; two file keys for one canonical key is ambiguous.
        let mut by_canonical: BTreeMap<String, String> = BTreeMap::new();
        let mut report = LoadReport::default();
        for key in file.names() {
            let canon = canonical_key(&key, cfg.model_type);
            if is_ignored(&canon, cfg.model_type) {
                report.ignored.push(key);
                continue;
            }
            if let Some(prev) = by_canonical.insert(canon.clone(), key.clone()) {
                return Err(Error::tensor(&path, &key, format!("duplicates `{prev}` (both name `{canon}`)")));
            }
        }
        // Compare the layer count with the file before building anything per layer: a config may
        // declare up to 1000 layers, the file's header says how many it can hold.
        let held = layers_held(by_canonical.keys());
        if cfg.num_hidden_layers > held {
            let range = if held == 0 { "none".to_string() } else { format!("encoder.layer.0 to encoder.layer.{}", held - 1) };
            return Err(Error::malformed(
                &path,
                format!("the config says num_hidden_layers {}, but the file holds {held} encoder layers ({range})", cfg.num_hidden_layers),
            ));
        }
        let expected = expected_shapes(cfg);
        let expected_names: BTreeSet<&str> = expected.iter().map(|(k, _)| k.as_str()).collect();
        report.has_pooler = POOLER_KEYS.iter().any(|k| by_canonical.contains_key(*k));
        for (key, shape) in &expected {
            let optional_pooler = !report.has_pooler && POOLER_KEYS.contains(&key.as_str());
            match by_canonical.get(key) {
                None if optional_pooler => {}
                None => report.missing.push(key.clone()),
                Some(file_key) => {
                    let got = &file.info(file_key).expect("listed by the file").shape;
                    if got != shape {
                        report.mismatched.push((key.clone(), shape.clone(), got.clone()));
                    } else {
                        report.loaded.push(key.clone());
                    }
                }
            }
        }
        report.unexpected = by_canonical.keys().filter(|k| !expected_names.contains(k.as_str())).cloned().collect();

        if let Some((key, want, got)) = report.mismatched.first() {
            return Err(Error::tensor(&path, key, format!("shape {got:?} in the file, but the config needs {want:?}")));
        }
        if !report.missing.is_empty() {
            let n = report.missing.len();
            let more = if n > 1 { format!(" (and {} more missing)", n - 1) } else { String::new() };
            return Err(Error::tensor(&path, &report.missing[0], format!("missing from the file{more}")));
        }
        if opts.strict && !report.unexpected.is_empty() {
            let n = report.unexpected.len();
            let more = if n > 1 { format!(" (and {} more)", n - 1) } else { String::new() };
            return Err(Error::tensor(&path, &report.unexpected[0], format!("unexpected for a {} with this config{more}", cfg.model_type.model_class())));
        }

        let read = |key: &str| -> Result<(Vec<f32>, Vec<usize>)> {
            let file_key = &by_canonical[key];
            let (data, shape) = file.read_f32(file_key)?;
            if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                return Err(Error::tensor(&path, file_key, format!("non-finite value {} at element {i}", data[i])));
            }
            Ok((data, shape))
        };
        let upload = |data: Vec<f32>, shape: &[usize]| -> Result<Tensor> { backend.cast(&backend.upload(data, shape)?, opts.dtype) };
        let get = |key: &str| -> Result<Tensor> {
            let (data, shape) = read(key)?;
            upload(data, &shape)
        };
        // Q, K, V stacked along the output dimension (shapes were checked above).
        let packed = |l: usize, what: &str| -> Result<Tensor> {
            let mut data = Vec::new();
            let mut rows = 0;
            let mut tail = Vec::new();
            for proj in ["query", "key", "value"] {
                let (d, shape) = read(&format!("encoder.layer.{l}.attention.self.{proj}.{what}"))?;
                rows += shape[0];
                tail = shape[1..].to_vec();
                data.extend(d);
            }
            upload(data, &[&[rows][..], &tail].concat())
        };
        let layer = |l: usize| -> Result<LayerWeights> {
            let k = |name: &str| get(&format!("encoder.layer.{l}.{name}"));
            Ok(LayerWeights {
                qkv_w: packed(l, "weight")?,
                qkv_b: packed(l, "bias")?,
                attn_out_w: k("attention.output.dense.weight")?,
                attn_out_b: k("attention.output.dense.bias")?,
                attn_ln_gamma: k("attention.output.LayerNorm.weight")?,
                attn_ln_beta: k("attention.output.LayerNorm.bias")?,
                intermediate_w: k("intermediate.dense.weight")?,
                intermediate_b: k("intermediate.dense.bias")?,
                output_w: k("output.dense.weight")?,
                output_b: k("output.dense.bias")?,
                output_ln_gamma: k("output.LayerNorm.weight")?,
                output_ln_beta: k("output.LayerNorm.bias")?,
            })
        };
        let weights = BertWeights {
            word_embeddings: get("embeddings.word_embeddings.weight")?,
            position_embeddings: get("embeddings.position_embeddings.weight")?,
            token_type_embeddings: get("embeddings.token_type_embeddings.weight")?,
            embeddings_ln_gamma: get("embeddings.LayerNorm.weight")?,
            embeddings_ln_beta: get("embeddings.LayerNorm.bias")?,
            layers: (0..cfg.num_hidden_layers).map(layer).collect::<Result<_>>()?,
            pooler: if report.has_pooler { Some((get(POOLER_KEYS[0])?, get(POOLER_KEYS[1])?)) } else { None },
        };
        Ok((weights, report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_keys() {
        let bert = ModelType::Bert;
        assert_eq!(canonical_key("bert.encoder.layer.0.output.LayerNorm.gamma", bert), "encoder.layer.0.output.LayerNorm.weight");
        assert_eq!(canonical_key("embeddings.LayerNorm.beta", bert), "embeddings.LayerNorm.bias");
        assert_eq!(canonical_key("pooler.dense.weight", bert), "pooler.dense.weight");
        assert!(is_ignored(&canonical_key("bert.embeddings.position_ids", bert), bert));
        assert!(is_ignored("cls.predictions.bias", bert));
        // RoBERTa and XLM-R: the `roberta.` prefix, the `lm_head.` pre-training head; each model
        // type strips only its own prefix (a `roberta.` key in a BERT file stays unexpected).
        for t in [ModelType::Roberta, ModelType::XlmRoberta] {
            assert_eq!(canonical_key("roberta.encoder.layer.1.attention.self.query.bias", t), "encoder.layer.1.attention.self.query.bias");
            assert_eq!(canonical_key("bert.pooler.dense.weight", t), "bert.pooler.dense.weight");
            assert!(is_ignored(&canonical_key("roberta.embeddings.position_ids", t), t));
            assert!(is_ignored("lm_head.dense.weight", t) && !is_ignored("cls.predictions.bias", t));
        }
        assert_eq!(canonical_key("roberta.pooler.dense.weight", bert), "roberta.pooler.dense.weight");
        assert!(!is_ignored("lm_head.bias", bert));
    }

    #[test]
    fn layers_held_is_one_past_the_largest_layer_index() {
        let keys = |ks: &[&str]| -> Vec<String> { ks.iter().map(|k| k.to_string()).collect() };
        assert_eq!(layers_held(keys(&["embeddings.LayerNorm.weight", "pooler.dense.bias"]).iter()), 0);
        assert_eq!(layers_held(keys(&["encoder.layer.0.output.dense.bias", "encoder.layer.11.output.dense.bias"]).iter()), 12);
        // Not numbers, or too large for a usize: left to the unexpected-key check.
        let odd = keys(&["encoder.layer.x.output.dense.bias", "encoder.layer.99999999999999999999999.a", "encoder.layer.3"]);
        assert_eq!(layers_held(odd.iter()), 0);
        assert_eq!(layers_held([format!("encoder.layer.{}.a", usize::MAX)].iter()), usize::MAX);
    }
}
