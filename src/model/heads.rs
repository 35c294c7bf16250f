//! Prediction heads (the flexible heads of AdapterHub's `BertAdapterModel`): the classification
//! head and its softmax cross-entropy loss, forward and backward, written against `Backend` only.
//!
//! `add_classification_head(name, num_labels, layers, activation_function, use_pooler)` builds
//! `heads.<name>` as an `nn.Sequential` where every layer starts with a Dropout (identity in eval
//! mode), so the module indices, and therefore the state-dict keys, are:
//! - `layers = 2`: `0` Dropout, `1` Linear(H, H), `2` activation, `3` Dropout, `4` Linear(H, C);
//! - `layers = 1`: `0` Dropout, `1` Linear(H, C).
//!
//! The input is the first token of `last_hidden_state`, or the pooler output when `use_pooler`.
//! Heads live outside the base model: their keys carry no `bert.` prefix.

use std::collections::BTreeMap;
use std::path::Path;

use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Deserializer, Serialize};

use crate::backend::{Activation, Backend};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The `config` object of the library's `head_config.json` for a classification head. Field names
/// and defaults are the library's (`add_classification_head`); fields are declared in sorted
/// order because the library writes the file with `sort_keys=True`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadConfig {
    /// `tanh`, `relu` or `gelu` (case-insensitive, like the library). Used by `layers = 2` only.
    #[serde(rename = "activation_function", default = "default_activation", deserialize_with = "null_as_empty")]
    pub activation: String,
    /// Bias of the output Linear (the hidden Linear always has one).
    #[serde(default = "default_true")]
    pub bias: bool,
    /// Dropout of the head in training mode; `None` means the model's `hidden_dropout_prob`.
    #[serde(default)]
    pub dropout_prob: Option<f64>,
    #[serde(default = "default_head_type")]
    pub head_type: String,
    #[serde(default)]
    pub label2id: Option<BTreeMap<String, usize>>,
    #[serde(default = "default_layers")]
    pub layers: usize,
    #[serde(default = "default_num_labels")]
    pub num_labels: usize,
    #[serde(default)]
    pub use_pooler: bool,
}

fn default_activation() -> String {
    "tanh".into()
}
fn default_true() -> bool {
    true
}
fn default_head_type() -> String {
    "classification".into()
}
fn default_layers() -> usize {
    2
}
fn default_num_labels() -> usize {
    2
}

/// The library writes `"activation_function": null` for "no activation"; keep it representable
/// so `validate` can refuse it by name instead of serde failing with a type error.
fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

impl Default for HeadConfig {
    fn default() -> Self {
        HeadConfig::classification(default_num_labels())
    }
}

impl HeadConfig {
    /// The library's defaults: 2 layers, tanh, first token (no pooler), output bias.
    pub fn classification(num_labels: usize) -> Self {
        HeadConfig {
            activation: default_activation(),
            bias: true,
            dropout_prob: None,
            head_type: default_head_type(),
            label2id: None,
            layers: default_layers(),
            num_labels,
            use_pooler: false,
        }
    }

    /// The activation of the hidden layer as a backend op.
    pub fn activation(&self) -> Result<Activation> {
        match self.activation.to_ascii_lowercase().as_str() {
            "tanh" => Ok(Activation::Tanh),
            "relu" => Ok(Activation::Relu),
            "gelu" => Ok(Activation::Gelu),
            "" => Err(Error::Unsupported("classification head without an activation_function (null)".into())),
            other => Err(Error::Unsupported(format!("classification head activation_function `{other}` (supported: tanh, relu, gelu)"))),
        }
    }

    /// Refuse what we do not implement rather than compute something else.
    pub fn validate(&self) -> Result<()> {
        if self.head_type != "classification" {
            return Err(Error::Unsupported(format!("head_type `{}` (only `classification` is implemented)", self.head_type)));
        }
        match self.num_labels {
            0 => return Err(Error::Input("classification head with num_labels = 0".into())),
            // The library switches to an MSE regression loss for one label.
            1 => return Err(Error::Unsupported("classification head with num_labels = 1 (regression with MSELoss)".into())),
            _ => {}
        }
        match self.layers {
            1 => {}
            2 => {
                self.activation()?;
            }
            n => return Err(Error::Unsupported(format!("classification head with layers = {n} (supported: 1, 2)"))),
        }
        if let Some(p) = self.dropout_prob {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::Input(format!("classification head dropout_prob {p} is not in [0, 1)")));
            }
        }
        Ok(())
    }

    /// Module indices of the hidden Linear (if any) and of the output Linear.
    fn linear_indices(&self) -> (Option<usize>, usize) {
        if self.layers == 2 {
            (Some(1), 4)
        } else {
            (None, 1)
        }
    }
}

/// The whole `head_config.json` the library writes next to a saved head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadConfigFile {
    pub config: HeadConfig,
    pub hidden_size: usize,
    pub model_class: String,
    pub model_name: String,
    pub model_type: String,
    pub name: String,
    pub version: String,
}

impl HeadConfigFile {
    /// Parse `text`, the content of the file at `path` (named in errors), and validate the config.
    pub fn from_json(path: &Path, text: &str) -> Result<Self> {
        let f: HeadConfigFile = serde_json::from_str(text).map_err(|e| Error::malformed(path, e.to_string()))?;
        f.config.validate().map_err(|e| Error::config(path, "config", e.to_string()))?;
        Ok(f)
    }

    /// The file as the library writes it (`json.dump(indent=2, sort_keys=True)`).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::internal(format!("head config: {e}")))
    }
}

/// What `ClassificationHead::forward` keeps for the backward.
#[derive(Clone, Debug)]
pub struct HeadTape {
    /// The head input `x`, `[B, H]`.
    input: Tensor,
    /// `W1·x + b1` and its activation, for `layers = 2`.
    hidden: Option<(Tensor, Tensor)>,
    /// T of `last_hidden_state`, or None when the input was the pooler output.
    seq_len: Option<usize>,
}

impl HeadTape {
    /// The head input `[B, H]` (first token or pooler output).
    pub fn input(&self) -> &Tensor {
        &self.input
    }
}

/// A classification head `heads.<name>`, eval-mode semantics (its dropouts are the identity).
#[derive(Clone, Debug)]
pub struct ClassificationHead {
    name: String,
    config: HeadConfig,
    activation: Activation,
    hidden_size: usize,
    params: BTreeMap<String, Tensor>,
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('.') {
        return Err(Error::Input(format!("head name `{name}` must be non-empty and contain no `.` (it is a state-dict key segment)")));
    }
    Ok(())
}

impl ClassificationHead {
    /// The parameter keys and shapes of head `name`, in module order.
    pub fn expected_shapes(name: &str, config: &HeadConfig, hidden_size: usize) -> Vec<(String, Vec<usize>)> {
        let (hid, out) = config.linear_indices();
        let mut v = Vec::new();
        if let Some(i) = hid {
            v.push((format!("heads.{name}.{i}.weight"), vec![hidden_size, hidden_size]));
            v.push((format!("heads.{name}.{i}.bias"), vec![hidden_size]));
        }
        v.push((format!("heads.{name}.{out}.weight"), vec![config.num_labels, hidden_size]));
        if config.bias {
            v.push((format!("heads.{name}.{out}.bias"), vec![config.num_labels]));
        }
        v
    }

    /// A fresh head as the library initialises it (`_init_weights` of BERT): weights
    /// N(0, 0.02), biases 0, drawn in module order from a generator seeded with `seed`.
    pub fn new(backend: &dyn Backend, name: &str, config: HeadConfig, hidden_size: usize, seed: u64) -> Result<Self> {
        check_name(name)?;
        config.validate()?;
        if hidden_size == 0 {
            return Err(Error::Input(format!("head `{name}`: hidden_size must be > 0")));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 0.02).map_err(|e| Error::internal(format!("initializer: {e}")))?;
        let mut params = BTreeMap::new();
        for (key, shape) in Self::expected_shapes(name, &config, hidden_size) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if key.ends_with(".weight") { (0..n).map(|_| normal.sample(&mut rng)).collect() } else { vec![0.0; n] };
            params.insert(key, backend.upload(data, &shape)?);
        }
        let activation = config.activation().unwrap_or(Activation::Tanh);
        Ok(ClassificationHead { name: name.to_string(), config, activation, hidden_size, params })
    }

    /// A head from existing tensors keyed `heads.<name>.<i>.weight/bias` (e.g. loaded from the
    /// library's head file). Every expected key must be present with its shape, and no other.
    pub fn from_params(name: &str, config: HeadConfig, mut params: BTreeMap<String, Tensor>) -> Result<Self> {
        check_name(name)?;
        config.validate()?;
        let (_, out) = config.linear_indices();
        let out_w = format!("heads.{name}.{out}.weight");
        let hidden_size = match params.get(&out_w) {
            Some(w) if w.rank() == 2 => w.shape()[1],
            Some(w) => return Err(Error::shape("ClassificationHead::from_params", format!("`{out_w}` has shape {:?}, expected [{}, H]", w.shape(), config.num_labels))),
            None => return Err(Error::Input(format!("head `{name}`: tensor `{out_w}` is missing"))),
        };
        let mut kept = BTreeMap::new();
        for (key, shape) in Self::expected_shapes(name, &config, hidden_size) {
            let t = params.remove(&key).ok_or_else(|| Error::Input(format!("head `{name}`: tensor `{key}` is missing")))?;
            if t.shape() != shape.as_slice() {
                return Err(Error::shape("ClassificationHead::from_params", format!("`{key}` has shape {:?}, expected {shape:?}", t.shape())));
            }
            kept.insert(key, t);
        }
        if !params.is_empty() {
            let extra: Vec<&str> = params.keys().map(String::as_str).collect();
            return Err(Error::Input(format!("head `{name}`: unexpected tensors {extra:?}")));
        }
        let activation = config.activation().unwrap_or(Activation::Tanh);
        Ok(ClassificationHead { name: name.to_string(), config, activation, hidden_size, params: kept })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn config(&self) -> &HeadConfig {
        &self.config
    }
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }
    pub fn num_labels(&self) -> usize {
        self.config.num_labels
    }

    /// The parameters by state-dict key.
    pub fn params(&self) -> &BTreeMap<String, Tensor> {
        &self.params
    }

    /// The parameters by key, for the optimizer. Replacing a tensor with one of another shape
    /// makes the next forward fail with a shape error.
    pub fn params_mut(&mut self) -> &mut BTreeMap<String, Tensor> {
        &mut self.params
    }

    fn param(&self, idx: usize, what: &str) -> Result<&Tensor> {
        let key = format!("heads.{}.{idx}.{what}", self.name);
        self.params.get(&key).ok_or_else(|| Error::Input(format!("head `{}`: parameter `{key}` was removed", self.name)))
    }

    fn out_bias(&self, out: usize) -> Result<Option<&Tensor>> {
        if self.config.bias {
            self.param(out, "bias").map(Some)
        } else {
            Ok(None)
        }
    }

    /// Logits `[B, C]` and the tape for `backward`. `pooler_output` (`[B, H]`) is required when
    /// the head was configured with `use_pooler`, and ignored otherwise.
    pub fn forward(&self, backend: &dyn Backend, last_hidden_state: &Tensor, pooler_output: Option<&Tensor>) -> Result<(Tensor, HeadTape)> {
        const OP: &str = "ClassificationHead::forward";
        let h = self.hidden_size;
        let (input, seq_len) = if self.config.use_pooler {
            let p = pooler_output.ok_or_else(|| Error::Input(format!("head `{}` reads the pooler output (use_pooler) but none was given", self.name)))?;
            if p.rank() != 2 || p.shape()[1] != h {
                return Err(Error::shape(OP, format!("pooler output has shape {:?}, expected [B, {h}]", p.shape())));
            }
            (p.clone(), None)
        } else {
            let s = last_hidden_state.shape();
            if s.len() != 3 || s[2] != h || s[1] == 0 {
                return Err(Error::shape(OP, format!("last_hidden_state has shape {s:?}, expected [B, T >= 1, {h}]")));
            }
            (backend.first_token(last_hidden_state)?, Some(s[1]))
        };
        let (hid, out) = self.config.linear_indices();
        let hidden = match hid {
            Some(i) => {
                let pre = backend.linear(&input, self.param(i, "weight")?, Some(self.param(i, "bias")?))?;
                let act = backend.activation(&pre, self.activation)?;
                Some((pre, act))
            }
            None => None,
        };
        let x_out = hidden.as_ref().map_or(&input, |(_, a)| a);
        let logits = backend.linear(x_out, self.param(out, "weight")?, self.out_bias(out)?)?;
        Ok((logits, HeadTape { input, hidden, seq_len }))
    }

    /// Parameter gradients (keyed like `params()`) and the gradient of the head's input:
    /// `∂L/∂last_hidden_state` `[B, T, H]`, zero except at position 0, or `∂L/∂pooler_output`
    /// `[B, H]` when `use_pooler`.
    pub fn backward(&self, backend: &dyn Backend, tape: &HeadTape, dlogits: &Tensor) -> Result<(BTreeMap<String, Tensor>, Tensor)> {
        let batch = tape.input.shape()[0];
        let c = self.config.num_labels;
        if dlogits.shape() != [batch, c] {
            return Err(Error::shape("ClassificationHead::backward", format!("dlogits has shape {:?}, expected [{batch}, {c}]", dlogits.shape())));
        }
        let (hid, out) = self.config.linear_indices();
        if hid.is_some() != tape.hidden.is_some() || tape.input.last_dim() != self.hidden_size || tape.seq_len.is_none() != self.config.use_pooler {
            return Err(Error::Input(format!("head `{}`: the tape comes from a head of another configuration", self.name)));
        }
        let name = &self.name;
        let mut grads = BTreeMap::new();
        let x_out = tape.hidden.as_ref().map_or(&tape.input, |(_, a)| a);
        let (dw, db) = backend.linear_backward_params(dlogits, x_out)?;
        grads.insert(format!("heads.{name}.{out}.weight"), dw);
        if self.config.bias {
            grads.insert(format!("heads.{name}.{out}.bias"), db);
        }
        let mut dx = backend.linear_backward_input(dlogits, self.param(out, "weight")?)?;
        if let (Some(i), Some((pre, _))) = (hid, tape.hidden.as_ref()) {
            let dpre = backend.activation_backward(&dx, pre, self.activation)?;
            let (dw, db) = backend.linear_backward_params(&dpre, &tape.input)?;
            grads.insert(format!("heads.{name}.{i}.weight"), dw);
            grads.insert(format!("heads.{name}.{i}.bias"), db);
            dx = backend.linear_backward_input(&dpre, self.param(i, "weight")?)?;
        }
        let d_input = match tape.seq_len {
            Some(t) => backend.first_token_backward(&dx, t)?,
            None => dx,
        };
        Ok((grads, d_input))
    }
}

/// `torch.nn.CrossEntropyLoss()` (mean over the batch) of `logits` `[B, C]` for class indices
/// `labels`, and its gradient `dlogits = (softmax − onehot)/B`, computed on the host in f64 with
/// the max subtracted (stable for any finite logits). Non-finite logits are an error: they mean
/// training has diverged, and torch would return NaN.
pub fn cross_entropy(backend: &dyn Backend, logits: &Tensor, labels: &[usize]) -> Result<(f32, Tensor)> {
    const OP: &str = "cross_entropy";
    if logits.rank() != 2 {
        return Err(Error::shape(OP, format!("logits have shape {:?}, expected [B, C]", logits.shape())));
    }
    let (b, c) = (logits.shape()[0], logits.shape()[1]);
    if labels.len() != b {
        return Err(Error::shape(OP, format!("{} labels for {b} rows of logits", labels.len())));
    }
    if b == 0 || c == 0 {
        return Err(Error::Input(format!("cross_entropy of an empty batch (logits {:?})", logits.shape())));
    }
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l >= c) {
        return Err(Error::Input(format!("label {l} (batch row {i}) is out of range for {c} classes")));
    }
    let host = backend.to_host(logits)?;
    let mut total = 0f64;
    let mut d = vec![0f32; b * c];
    for (i, (row, &label)) in host.chunks(c).zip(labels).enumerate() {
        if let Some(j) = row.iter().position(|v| !v.is_finite()) {
            return Err(Error::Input(format!("cross_entropy: logit [{i}, {j}] is {}", row[j])));
        }
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let exps: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        total += max + sum.ln() - row[label] as f64;
        for (j, e) in exps.iter().enumerate() {
            let onehot = if j == label { 1.0 } else { 0.0 };
            d[i * c + j] = ((e / sum - onehot) / b as f64) as f32;
        }
    }
    Ok(((total / b as f64) as f32, backend.upload(d, &[b, c])?))
}
