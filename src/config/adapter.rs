//! `AdapterConfig`: the bottleneck-adapter configs of AdapterHub `adapters` 1.3.0 (spec §1).
//!
//! A config is kept as the JSON object the library writes (`config` in `adapter_config.json`,
//! every `BnConfig` field) plus the typed fields that change the math, parsed from it. Named
//! configs start from the library's defaults; overrides are merged into the object and the whole
//! object is parsed again, so one parser validates every path in.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::Activation;
use crate::error::{Error, Result};

/// `reduction_factor`: a number, or a per-layer map keyed by the layer index as a string with an
/// optional `"default"`.
#[derive(Clone, Debug, PartialEq)]
pub enum ReductionFactor {
    Uniform(f64),
    PerLayer { layers: BTreeMap<usize, f64>, default: Option<f64> },
}

/// `residual_before_ln`: which tensor the adapter's residual is (spec §4, pre step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResidualBeforeLn {
    /// ρ = h, the raw sub-layer output.
    True,
    /// ρ = x, the adapter input after the pre step.
    False,
    /// ρ = h + r (only with `original_ln_before`).
    PostAdd,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scaling {
    Fixed(f64),
    /// One learned scalar, `scaling` of shape `[1]`.
    Learned,
    /// One learned value per channel, `scaling` of shape `[H]`.
    Channel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitWeights {
    /// N(0, 0.02) weights, zero biases, for down and up projections alike.
    Bert,
    /// Kaiming-uniform down projection, zero up projection: the adapter starts as the identity.
    MamAdapter,
    /// Truncated normal (std 1e-2, cut at ±2e-2) weights, zero biases.
    Houlsby,
}

/// A validated bottleneck adapter config.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    pub mh_adapter: bool,
    pub output_adapter: bool,
    pub reduction_factor: ReductionFactor,
    pub non_linearity: Activation,
    pub original_ln_before: bool,
    pub original_ln_after: bool,
    pub residual_before_ln: ResidualBeforeLn,
    pub adapter_residual_before_ln: bool,
    pub ln_before: bool,
    pub ln_after: bool,
    pub init_weights: InitWeights,
    pub init_weights_seed: Option<u64>,
    pub scaling: Scaling,
    pub use_gating: bool,
    /// Whether the adapter has a NICE invertible adapter on the embeddings.
    pub inv_adapter: bool,
    pub inv_adapter_reduction_factor: Option<f64>,
    pub leave_out: Vec<usize>,
    pub dropout: f64,
    /// The full `config` object, as the library writes it.
    json: Map<String, Value>,
}

/// Every `BnConfig` field with the base defaults of spec §1 (the `pfeiffer` column).
fn seq_bn_defaults() -> Map<String, Value> {
    let v = json!({
        "adapter_residual_before_ln": false, "cross_adapter": false, "dropout": 0.0,
        "factorized_phm_W": true, "factorized_phm_rule": false, "hypercomplex_nonlinearity": "glorot-uniform",
        "init_weights": "bert", "init_weights_seed": null, "inv_adapter": null, "inv_adapter_reduction_factor": null,
        "is_parallel": false, "learn_phm": true, "leave_out": [], "ln_after": false, "ln_before": false,
        "mh_adapter": false, "non_linearity": "relu", "original_ln_after": true, "original_ln_before": true,
        "output_adapter": true, "phm_bias": true, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001,
        "phm_layer": false, "phm_rank": 1, "reduction_factor": 16, "residual_before_ln": true, "scaling": 1.0,
        "shared_W_phm": false, "shared_phm_rule": true, "stochastic_depth": 0.0, "use_gating": false
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("a JSON object literal"),
    }
}

/// The named configs: the deprecated aliases and their current names.
pub const NAMED_CONFIGS: [&str; 8] =
    ["pfeiffer", "houlsby", "pfeiffer+inv", "houlsby+inv", "seq_bn", "double_seq_bn", "seq_bn_inv", "double_seq_bn_inv"];

fn named_json(name: &str) -> Option<Map<String, Value>> {
    let mut m = seq_bn_defaults();
    let (double, inv) = match name {
        "pfeiffer" | "seq_bn" => (false, false),
        "houlsby" | "double_seq_bn" => (true, false),
        "pfeiffer+inv" | "seq_bn_inv" => (false, true),
        "houlsby+inv" | "double_seq_bn_inv" => (true, true),
        _ => return None,
    };
    if double {
        m.insert("mh_adapter".into(), json!(true));
        m.insert("non_linearity".into(), json!("swish"));
        m.insert("original_ln_before".into(), json!(false));
    }
    if inv {
        m.insert("inv_adapter".into(), json!("nice"));
        m.insert("inv_adapter_reduction_factor".into(), json!(2));
    }
    Some(m)
}

/// The longest adapter name accepted, in bytes.
pub const MAX_ADAPTER_NAME_BYTES: usize = 256;

/// Refuse names the library cannot hold (it keys modules by name in a ModuleDict), and names
/// too long to be one.
pub fn validate_adapter_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::Input("an adapter name must not be empty".into()));
    }
    if name.contains('.') {
        return Err(Error::Input(format!("adapter name `{}` contains '.', which the adapters library refuses", crate::error::clip_text(name))));
    }
    // It becomes part of every tensor's key and of messages; no real name comes near this.
    if name.len() > MAX_ADAPTER_NAME_BYTES {
        return Err(Error::Input(format!("adapter name `{}` is {} bytes long; at most {MAX_ADAPTER_NAME_BYTES}", crate::error::clip_text(name), name.len())));
    }
    Ok(())
}

/// Parses activation names as transformers' ACT2FN does (lower-cased).
pub fn parse_activation(s: &str) -> Option<Activation> {
    match s.to_ascii_lowercase().as_str() {
        "relu" => Some(Activation::Relu),
        "swish" | "silu" => Some(Activation::Swish),
        "gelu" => Some(Activation::Gelu),
        "gelu_new" => Some(Activation::GeluNew),
        "tanh" => Some(Activation::Tanh),
        "sigmoid" => Some(Activation::Sigmoid),
        _ => None,
    }
}

impl AdapterConfig {
    /// A named config (`pfeiffer`, `houlsby`, `pfeiffer+inv`, `houlsby+inv` or their current
    /// names `seq_bn`, `double_seq_bn`, `seq_bn_inv`, `double_seq_bn_inv`).
    pub fn named(name: &str) -> Result<Self> {
        let json = named_json(name).ok_or_else(|| {
            Error::Input(format!("unknown adapter config `{name}` (expected one of {})", NAMED_CONFIGS.join(", ")))
        })?;
        Self::from_json(&Value::Object(json), Path::new(name))
    }

    /// The same config with some fields replaced, e.g. `json!({"reduction_factor": 8})`.
    pub fn with_overrides(&self, overrides: &Value) -> Result<Self> {
        let Value::Object(o) = overrides else {
            return Err(Error::Input(format!("adapter config overrides must be a JSON object, got {overrides}")));
        };
        let mut json = self.json.clone();
        for (k, v) in o {
            json.insert(k.clone(), v.clone());
        }
        Self::from_json(&Value::Object(json), Path::new("overrides"))
    }

    /// Parse a `config` object as `adapter_config.json` holds it. Fields missing from the object
    /// take the `BnConfig` defaults except the four the library requires. `origin` names the file
    /// in messages.
    pub fn from_json(value: &Value, origin: &Path) -> Result<Self> {
        let err = |field: &str, msg: String| Error::config(origin, format!("config.{field}"), msg);
        let Value::Object(given) = value else {
            return Err(Error::config(origin, "config", format!("expected a JSON object, got {value}")));
        };
        let defaults = seq_bn_defaults();
        for required in ["mh_adapter", "output_adapter", "reduction_factor", "non_linearity"] {
            if !given.contains_key(required) {
                return Err(err(required, "missing (required by BnConfig)".into()));
            }
        }
        if let Some(unknown) = given.keys().find(|k| !defaults.contains_key(k.as_str())) {
            let msg = match unknown.as_str() {
                "architecture" | "r" | "prefix_length" | "selfattn_lora" => "this is not a bottleneck adapter config".to_string(),
                _ => "unknown field (not a BnConfig field of adapters 1.3.0)".to_string(),
            };
            return Err(err(unknown, msg));
        }
        let mut json = defaults;
        for (k, v) in given {
            json.insert(k.clone(), v.clone());
        }

        let boolean = |field: &str| -> Result<bool> {
            match &json[field] {
                Value::Bool(b) => Ok(*b),
                other => Err(err(field, format!("expected true or false, got {other}"))),
            }
        };
        let positive = |field: &str, v: &Value| -> Result<f64> {
            match v.as_f64() {
                Some(x) if x > 0.0 && x.is_finite() => Ok(x),
                _ => Err(err(field, format!("expected a positive number, got {v}"))),
            }
        };

        let reduction_factor = match &json["reduction_factor"] {
            Value::Object(map) => {
                let mut layers = BTreeMap::new();
                let mut default = None;
                for (k, v) in map {
                    let x = positive("reduction_factor", v)?;
                    if k == "default" {
                        default = Some(x);
                    } else {
                        let layer = k.parse::<usize>().map_err(|_| {
                            err("reduction_factor", format!("key `{k}` is neither a layer index nor \"default\""))
                        })?;
                        layers.insert(layer, x);
                    }
                }
                ReductionFactor::PerLayer { layers, default }
            }
            v => ReductionFactor::Uniform(positive("reduction_factor", v)?),
        };
        let non_linearity = match &json["non_linearity"] {
            Value::String(s) => parse_activation(s).ok_or_else(|| {
                err("non_linearity", format!("`{s}` is not supported (relu, swish, silu, gelu, gelu_new, tanh, sigmoid)"))
            })?,
            other => return Err(err("non_linearity", format!("expected a string, got {other}"))),
        };
        let residual_before_ln = match &json["residual_before_ln"] {
            Value::Bool(true) => ResidualBeforeLn::True,
            Value::Bool(false) => ResidualBeforeLn::False,
            Value::String(s) if s == "post_add" => ResidualBeforeLn::PostAdd,
            other => return Err(err("residual_before_ln", format!("expected true, false or \"post_add\", got {other}"))),
        };
        let original_ln_before = boolean("original_ln_before")?;
        if residual_before_ln == ResidualBeforeLn::PostAdd && !original_ln_before {
            // The library leaves the residual unbound here and crashes on the first forward.
            return Err(err("residual_before_ln", "\"post_add\" needs original_ln_before = true".into()));
        }
        let scaling = match &json["scaling"] {
            // The library accepts only a Python float: JSON `1` is an int and raises there.
            Value::Number(n) if n.is_f64() => {
                let x = n.as_f64().unwrap_or(1.0);
                // Adapters scale float32 activations, so a scaling beyond float32's range is ±inf
                // there (in the library too): every output would be inf or NaN. Smaller values,
                // however large, are the forward's business (it stops at the first non-finite layer).
                if x.abs() > f32::MAX as f64 {
                    return Err(err("scaling", format!("{x:e} is beyond the float32 range (±{:e}): the adapter's output would be ±inf", f32::MAX)));
                }
                Scaling::Fixed(x)
            }
            Value::String(s) if s == "learned" => Scaling::Learned,
            Value::String(s) if s == "channel" => Scaling::Channel,
            other => return Err(err("scaling", format!("unknown scaling type {other} (expected a float such as 1.0, \"learned\" or \"channel\")"))),
        };
        let init_weights = match &json["init_weights"] {
            Value::String(s) if s == "bert" => InitWeights::Bert,
            Value::String(s) if s == "mam_adapter" => InitWeights::MamAdapter,
            Value::String(s) if s == "houlsby" => InitWeights::Houlsby,
            other => return Err(err("init_weights", format!("expected \"bert\", \"mam_adapter\" or \"houlsby\", got {other}"))),
        };
        let init_weights_seed = match &json["init_weights_seed"] {
            Value::Null => None,
            v => Some(v.as_u64().ok_or_else(|| err("init_weights_seed", format!("expected null or a non-negative integer, got {v}")))?),
        };
        let inv_adapter = match &json["inv_adapter"] {
            Value::Null => false,
            Value::String(s) if s == "nice" => true,
            Value::String(s) if s == "glow" => {
                return Err(Error::Unsupported(format!(
                    "{}: config.inv_adapter \"glow\" (its forward crashes in the adapters library itself; use \"nice\")",
                    origin.display()
                )))
            }
            other => return Err(err("inv_adapter", format!("expected null or \"nice\", got {other}"))),
        };
        let inv_adapter_reduction_factor = match &json["inv_adapter_reduction_factor"] {
            Value::Null if inv_adapter => return Err(err("inv_adapter_reduction_factor", "required with inv_adapter".into())),
            Value::Null => None,
            v => Some(positive("inv_adapter_reduction_factor", v)?),
        };
        let leave_out = match &json["leave_out"] {
            Value::Array(a) => a
                .iter()
                .map(|v| v.as_u64().map(|u| u as usize).ok_or_else(|| err("leave_out", format!("expected layer indices, got {v}"))))
                .collect::<Result<Vec<_>>>()?,
            other => return Err(err("leave_out", format!("expected a list of layer indices, got {other}"))),
        };
        let dropout = match json["dropout"].as_f64() {
            Some(p) if (0.0..1.0).contains(&p) => p,
            _ => return Err(err("dropout", format!("expected a probability in [0, 1), got {}", json["dropout"]))),
        };
        let unsupported = |field: &str, what: &str| Error::Unsupported(format!("{}: config.{field}: {what}", origin.display()));
        if boolean("phm_layer")? {
            return Err(unsupported("phm_layer", "PHM (Compacter) layers are not supported"));
        }
        if json["stochastic_depth"].as_f64() != Some(0.0) {
            return Err(unsupported("stochastic_depth", "stochastic depth > 0 is not supported"));
        }
        if boolean("is_parallel")? {
            return Err(unsupported("is_parallel", "parallel adapters (par_bn) are not supported"));
        }
        if boolean("cross_adapter")? {
            return Err(unsupported("cross_adapter", "cross adapters are not supported"));
        }
        let mh_adapter = boolean("mh_adapter")?;
        let output_adapter = boolean("output_adapter")?;
        Ok(AdapterConfig {
            mh_adapter,
            output_adapter,
            reduction_factor,
            non_linearity,
            original_ln_before,
            original_ln_after: boolean("original_ln_after")?,
            residual_before_ln,
            adapter_residual_before_ln: boolean("adapter_residual_before_ln")?,
            ln_before: boolean("ln_before")?,
            ln_after: boolean("ln_after")?,
            init_weights,
            init_weights_seed,
            scaling,
            use_gating: boolean("use_gating")?,
            inv_adapter,
            inv_adapter_reduction_factor,
            leave_out,
            dropout,
            json,
        })
    }

    /// The `config` object as `adapter_config.json` stores it (every `BnConfig` field).
    pub fn to_json(&self) -> Value {
        Value::Object(self.json.clone())
    }

    /// Bottleneck width at `layer`: `int(hidden // reduction_factor)`, at least 1. Errors when a
    /// per-layer map has neither the layer nor a default (the library raises KeyError there).
    pub fn bottleneck_size(&self, layer: usize, hidden: usize) -> Result<usize> {
        let rf = match &self.reduction_factor {
            ReductionFactor::Uniform(rf) => *rf,
            ReductionFactor::PerLayer { layers, default } => match layers.get(&layer).or(default.as_ref()) {
                Some(rf) => *rf,
                None => {
                    return Err(Error::Input(format!(
                        "reduction_factor has no entry for layer {layer} and no \"default\""
                    )))
                }
            },
        };
        Ok(((hidden as f64 / rf).floor() as usize).max(1))
    }

    /// Whether the adapter has a module at `layer` for this location.
    pub fn has_location(&self, layer: usize, location: Location) -> bool {
        let wanted = match location {
            Location::MultiHead => self.mh_adapter,
            Location::Output => self.output_adapter,
        };
        wanted && !self.leave_out.contains(&layer)
    }
}

/// The two places in a BERT layer where a bottleneck adapter sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Location {
    /// After the attention output dense (`mh_adapter`, `attention.output.`).
    MultiHead,
    /// After the FFN output dense (`output_adapter`, `output.`).
    Output,
}

impl Location {
    pub const BOTH: [Location; 2] = [Location::MultiHead, Location::Output];

    /// The module path of the location in a BertModel state dict.
    pub fn module_prefix(self, layer: usize) -> String {
        match self {
            Location::MultiHead => format!("encoder.layer.{layer}.attention.output."),
            Location::Output => format!("encoder.layer.{layer}.output."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_configs_match_the_spec_table() {
        let p = AdapterConfig::named("pfeiffer").unwrap();
        assert!(!p.mh_adapter && p.output_adapter && p.original_ln_before && p.original_ln_after);
        assert_eq!(p.non_linearity, Activation::Relu);
        assert_eq!(p.reduction_factor, ReductionFactor::Uniform(16.0));
        assert_eq!((p.scaling, p.inv_adapter), (Scaling::Fixed(1.0), false));
        let h = AdapterConfig::named("houlsby+inv").unwrap();
        assert!(h.mh_adapter && h.output_adapter && !h.original_ln_before && h.inv_adapter);
        assert_eq!(h.non_linearity, Activation::Swish);
        assert_eq!(h.inv_adapter_reduction_factor, Some(2.0));
        assert_eq!(AdapterConfig::named("seq_bn_inv").unwrap(), AdapterConfig::named("pfeiffer+inv").unwrap());
        assert_eq!(AdapterConfig::named("double_seq_bn").unwrap(), AdapterConfig::named("houlsby").unwrap());
        assert!(AdapterConfig::named("lora").unwrap_err().to_string().contains("unknown adapter config `lora`"));
    }

    #[test]
    fn bottleneck_sizes_floor_and_clamp() {
        let c = |rf: Value| AdapterConfig::named("pfeiffer").unwrap().with_overrides(&json!({ "reduction_factor": rf })).unwrap();
        assert_eq!(c(json!(16)).bottleneck_size(0, 64).unwrap(), 4);
        assert_eq!(c(json!(3)).bottleneck_size(0, 64).unwrap(), 21);
        assert_eq!(c(json!(0.5)).bottleneck_size(0, 64).unwrap(), 128);
        assert_eq!(c(json!(100)).bottleneck_size(0, 64).unwrap(), 1);
        let m = c(json!({"1": 4, "default": 16}));
        assert_eq!((m.bottleneck_size(0, 64).unwrap(), m.bottleneck_size(1, 64).unwrap()), (4, 16));
        let no_default = c(json!({"1": 4}));
        assert!(no_default.bottleneck_size(0, 64).unwrap_err().to_string().contains("no entry for layer 0"));
    }

    #[test]
    fn invalid_and_unsupported_options_are_refused() {
        let base = AdapterConfig::named("pfeiffer").unwrap();
        let cases = [
            (json!({"scaling": 1}), "unknown scaling type 1"),
            (json!({"scaling": "half"}), "unknown scaling type"),
            (json!({"scaling": 1e308}), "1e308 is beyond the float32 range"),
            (json!({"scaling": -3.5e38}), "-3.5e38 is beyond the float32 range"),
            (json!({"non_linearity": "prelu"}), "`prelu` is not supported"),
            (json!({"residual_before_ln": "yes"}), "expected true, false or \"post_add\""),
            (json!({"original_ln_before": false, "residual_before_ln": "post_add"}), "needs original_ln_before"),
            (json!({"inv_adapter": "glow", "inv_adapter_reduction_factor": 2}), "glow"),
            (json!({"phm_layer": true}), "PHM"),
            (json!({"stochastic_depth": 0.1}), "stochastic depth"),
            (json!({"is_parallel": true}), "par_bn"),
            (json!({"reduction_factor": 0}), "positive number"),
            (json!({"reduction_factor": {"x": 2}}), "neither a layer index"),
            (json!({"leave_out": ["0"]}), "layer indices"),
            (json!({"dropout": 1.0}), "probability"),
            (json!({"mh_adapter": "yes"}), "expected true or false"),
            (json!({"reduction": 16}), "unknown field"),
        ];
        for (over, says) in cases {
            let err = base.with_overrides(&over).unwrap_err().to_string();
            assert!(err.contains(says), "{over}: {err}");
        }
        let err = AdapterConfig::from_json(&json!({"mh_adapter": false, "output_adapter": true, "non_linearity": "relu"}), Path::new("a.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a.json: field `config.reduction_factor`: missing"), "{err}");
    }

    #[test]
    fn json_round_trip_keeps_every_field() {
        let c = AdapterConfig::named("houlsby+inv").unwrap().with_overrides(&json!({"scaling": "channel", "leave_out": [1]})).unwrap();
        let back = AdapterConfig::from_json(&c.to_json(), Path::new("x")).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.to_json().as_object().unwrap().len(), 33);
        assert!(!c.has_location(1, Location::Output) && c.has_location(0, Location::MultiHead));
    }
}
