//! Adapter folders as AdapterHub's `save_adapter(..., use_safetensors=True)` writes them:
//! `adapter_config.json` + `adapter.safetensors` (spec §8).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::backend::Backend;
use crate::config::{AdapterConfig, BertConfig};
use crate::error::{Error, Result};
use crate::io::tensor_file::TensorFile;
use crate::model::adapters::{param_specs, validate_adapter_name, Adapter};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter.safetensors";
pub const TORCH_WEIGHTS_FILE: &str = "pytorch_adapter.bin";

/// What `adapter_config.json` says about the adapter.
pub struct AdapterConfigFile {
    pub name: String,
    pub config: AdapterConfig,
    pub hidden_size: Option<usize>,
}

/// Read and validate `adapter_config.json`.
pub fn read_adapter_config(path: &Path) -> Result<AdapterConfigFile> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| Error::malformed(path, format!("not valid JSON: {e}")))?;
    let Value::Object(top) = json else {
        return Err(Error::malformed(path, "expected a JSON object"));
    };
    let name = match top.get("name") {
        Some(Value::String(n)) => n.clone(),
        Some(other) => return Err(Error::config(path, "name", format!("expected a string, got {other}"))),
        None => return Err(Error::config(path, "name", "missing (the adapter's name is read from it)")),
    };
    validate_adapter_name(&name).map_err(|e| Error::config(path, "name", e.to_string()))?;
    if let Some(t) = top.get("model_type").and_then(Value::as_str) {
        if t != "bert" {
            return Err(Error::config(path, "model_type", format!("`{t}` is not supported (only bert)")));
        }
    }
    let hidden_size = match top.get("hidden_size") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| Error::config(path, "hidden_size", format!("expected an integer, got {v}")))? as usize),
    };
    let mut config = top.get("config").cloned().ok_or_else(|| Error::config(path, "config", "missing"))?;
    if !top.contains_key("version") {
        // Written by the older adapter-transformers: activation names were renamed since.
        if let Some(Value::String(act)) = config.get_mut("non_linearity") {
            match act.as_str() {
                "gelu" => *act = "gelu_new".into(),
                "gelu_orig" => *act = "gelu".into(),
                _ => {}
            }
        }
    }
    let config = AdapterConfig::from_json(&config, path)?;
    Ok(AdapterConfigFile { name, config, hidden_size })
}

/// Load an adapter folder for a BERT of `bert`, under its saved name or `load_as`. Strict: every
/// tensor the config implies must be present with its shape, and nothing else may be.
pub fn load_adapter_dir(dir: &Path, load_as: Option<&str>, bert: &BertConfig, backend: &dyn Backend) -> Result<Adapter> {
    if !dir.is_dir() {
        return Err(Error::io(dir, std::io::Error::new(std::io::ErrorKind::NotFound, "adapter folder not found")));
    }
    let config_path = dir.join(CONFIG_FILE);
    let cfg = read_adapter_config(&config_path)?;
    if let Some(h) = cfg.hidden_size {
        if h != bert.hidden_size {
            return Err(Error::config(&config_path, "hidden_size", format!("{h} does not match the model's hidden size {}", bert.hidden_size)));
        }
    }
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.is_file() && dir.join(TORCH_WEIGHTS_FILE).is_file() {
        return Err(Error::Unsupported(format!(
            "{}: reading {TORCH_WEIGHTS_FILE} is not implemented yet; save with use_safetensors=True",
            dir.join(TORCH_WEIGHTS_FILE).display()
        )));
    }
    let file = TensorFile::open(&weights_path)?;
    let saved = cfg.name.as_str();
    let name = load_as.unwrap_or(saved);
    validate_adapter_name(name)?;

    let specs = param_specs(name, &cfg.config, bert)?;
    let expected: BTreeMap<&str, &[usize]> = specs.iter().map(|s| (s.key.as_str(), s.shape.as_slice())).collect();
    let mut params = BTreeMap::new();
    let mut aliases: Vec<(String, String)> = Vec::new();
    for file_key in file.names() {
        let stripped = file_key.strip_prefix("bert.").unwrap_or(&file_key);
        // Keys carry the saved name; a `load_as` renames them (the library's substring rule).
        let mut key = stripped.replace(&format!("adapters.{saved}."), &format!("adapters.{name}."));
        if !key.contains(&format!("adapters.{name}.")) {
            return Err(Error::tensor(&weights_path, &file_key, format!("does not belong to adapter `{saved}`")));
        }
        // With ln_before the library registers its LayerNorm twice: `adapter_norm_before.*` and
        // `adapter_down.0.*` are the same tensors. Keep one, check the other equals it.
        if cfg.config.ln_before && (key.ends_with("adapter_down.0.weight") || key.ends_with("adapter_down.0.bias")) {
            let canon = key.replace("adapter_down.0.", "adapter_norm_before.");
            aliases.push((file_key.clone(), canon));
            continue;
        }
        let Some(&shape) = expected.get(key.as_str()) else {
            return Err(Error::tensor(&weights_path, &file_key, format!("unexpected for adapter `{saved}` with its config")));
        };
        let (data, got) = file.read_f32(&file_key)?;
        if got != shape {
            return Err(Error::tensor(&weights_path, &file_key, format!("shape {got:?} in the file, but the config needs {shape:?}")));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::tensor(&weights_path, &file_key, format!("non-finite value {} at element {i}", data[i])));
        }
        key.shrink_to_fit();
        params.insert(key, backend.upload(data, &got)?);
    }
    for (file_key, canon) in aliases {
        let (data, _) = file.read_f32(&file_key)?;
        match params.get(&canon) {
            Some(t) if backend.to_host(t)? == data => {}
            Some(_) => return Err(Error::tensor(&weights_path, &file_key, format!("differs from `{canon}`, which it aliases"))),
            None => {
                let shape = expected.get(canon.as_str()).map(|s| s.to_vec()).unwrap_or_default();
                params.insert(canon, backend.upload(data, &shape)?);
            }
        }
    }
    if let Some(missing) = specs.iter().find(|s| !params.contains_key(&s.key)) {
        return Err(Error::tensor(&weights_path, &missing.key, format!("missing (adapter `{saved}` with its config needs it)")));
    }
    Adapter::from_params(name, cfg.config, bert, params)
}
