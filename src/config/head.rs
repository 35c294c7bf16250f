//! `head_config.json`: the config of a classification head (the flexible heads of AdapterHub's
//! `BertAdapterModel`) and the file the library writes next to a saved head. Plain data, so the
//! file layer can read and write it; `crate::model::heads` builds heads from it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

use super::Activation;
use crate::error::{clip_text, Error, Result};

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
        // Each id names one output: one out of range would be a label never predicted, two
        // labels on one id a prediction that reads as either.
        if let Some(map) = &self.label2id {
            let mut seen = vec![None::<&str>; self.num_labels];
            for (label, &id) in map {
                match seen.get_mut(id) {
                    None => return Err(Error::Input(format!("label2id gives `{}` the id {id}, but the head has {} labels (ids 0..{})", clip_text(label), self.num_labels, self.num_labels - 1))),
                    Some(Some(other)) => return Err(Error::Input(format!("label2id gives both `{}` and `{}` the id {id}", clip_text(other), clip_text(label)))),
                    Some(slot) => *slot = Some(label),
                }
            }
        }
        Ok(())
    }

    /// Module indices of the hidden Linear (if any) and of the output Linear.
    pub(crate) fn linear_indices(&self) -> (Option<usize>, usize) {
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
