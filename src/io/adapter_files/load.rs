//! Reading an adapter folder as plain data: matching the weights file against the tensors the
//! caller expects (keys and shapes), validating, and reporting what a lenient load let pass.
//! Building adapters and heads from what is read is `crate::model::persist`'s job.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::config::{read_adapter_config, AdapterConfigFile};
use crate::io::read_capped;
use super::weights::{StoredTensor, WeightsFile};
use crate::error::short_number;
use super::{CONFIG_FILE, HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE, MAX_CONFIG_BYTES, MAX_WIDTH_FACTOR, TORCH_HEAD_WEIGHTS_FILE, TORCH_WEIGHTS_FILE, WEIGHTS_FILE};
use crate::config::{AdapterConfig, BertConfig, HeadConfigFile, Location, ReductionFactor};
use crate::error::{Error, Result};

/// How to load an adapter folder.
#[derive(Clone, Debug)]
pub struct AdapterLoadOptions {
    /// Load under this name instead of the saved one (the library's `load_as`).
    pub load_as: Option<String>,
    /// Refuse unexpected tensors and a config that names layers the model lacks (default). When
    /// false, such tensors are skipped and missing ones initialised as `add_adapter` would (seed
    /// 0), all listed in the report. Mis-shaped tensors are an error either way, as in the library.
    pub strict: bool,
    /// Restore a prediction head from `head_config.json` when the folder has one.
    pub with_head: bool,
}

impl Default for AdapterLoadOptions {
    fn default() -> Self {
        AdapterLoadOptions { load_as: None, strict: true, with_head: true }
    }
}

/// What a load found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdapterLoadReport {
    /// The name the adapter was loaded under.
    pub name: String,
    /// The name in `adapter_config.json`.
    pub saved_name: String,
    pub weights_file: PathBuf,
    /// Tensors the config implies that the file lacks (lenient loads only; they were initialised).
    pub missing: Vec<String>,
    /// Tensors in the file that the adapter does not have (lenient loads only; skipped), as
    /// named in the file.
    pub unexpected: Vec<String>,
    /// Whether a head was loaded.
    pub head: bool,
    /// Anything else a lenient load let pass.
    pub notes: Vec<String>,
}

/// An adapter folder whose config has been read and whose weights file has been found
/// (`AdapterDir::load`, in `crate::model::persist`, builds the adapter and its head from it).
#[derive(Clone, Debug)]
pub struct AdapterDir {
    pub dir: PathBuf,
    pub config: AdapterConfigFile,
    /// `adapter.safetensors` if present, else `pytorch_adapter.bin`.
    pub weights_path: PathBuf,
}

impl AdapterDir {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            let why = if dir.exists() { "is not a folder (an adapter folder holds adapter_config.json and the weights)" } else { "adapter folder not found" };
            return Err(Error::io(dir, std::io::Error::new(std::io::ErrorKind::NotFound, why)));
        }
        let config = read_adapter_config(&dir.join(CONFIG_FILE))?;
        // Like the library's `use_safetensors=True`: safetensors first, the .bin as fallback.
        let weights_path = [WEIGHTS_FILE, TORCH_WEIGHTS_FILE].iter().map(|f| dir.join(f)).find(|p| p.is_file()).ok_or_else(|| {
            Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, format!("no adapter weights: neither {WEIGHTS_FILE} nor {TORCH_WEIGHTS_FILE}")),
            )
        })?;
        Ok(AdapterDir { dir: dir.to_path_buf(), config, weights_path })
    }

    /// The name a load with `opts` gives the adapter.
    pub fn target_name<'a>(&'a self, opts: &'a AdapterLoadOptions) -> &'a str {
        opts.load_as.as_deref().unwrap_or(&self.config.name)
    }
}

/// The library's renames of adapter-transformers (v1–v3) module names.
const LEGACY_NAMES: [(&str, &str); 5] = [
    ("attention_text_task_adapters", "adapters"),
    ("attention_text_lang_adapters", "adapters"),
    ("layer_text_task_adapters", "adapters"),
    ("layer_text_lang_adapters", "adapters"),
    ("invertible_lang_adapters", "invertible_adapters"),
];

/// A file key as the model names it: no base-model prefix (`bert.`, or `roberta.` for RoBERTa
/// and XLM-R, as the library's `base_model_prefix`), current module names, the new name.
fn canonical_key(file_key: &str, saved: &str, name: &str, prefix: &str) -> String {
    let mut k = file_key.strip_prefix(prefix).unwrap_or(file_key).to_string();
    for (old, new) in LEGACY_NAMES {
        if k.contains(old) {
            k = k.replace(old, new);
        }
    }
    if saved != name {
        k = k.replace(&format!("adapters.{saved}."), &format!("adapters.{name}."));
    }
    k
}

/// Refuse a config that does not fit the model. In lenient mode the harmless mismatches (layers
/// the model does not have) become notes.
pub fn check_fit(cfg: &AdapterConfigFile, path: &Path, bert: &BertConfig, strict: bool, notes: &mut Vec<String>) -> Result<()> {
    let h = bert.hidden_size;
    let layers = bert.num_hidden_layers;
    if let Some(saved) = cfg.hidden_size {
        if saved != h {
            return Err(Error::config(path, "hidden_size", format!("{saved} does not match the model's hidden size {h}")));
        }
    }
    let c = &cfg.config;
    let mut soft = |field: &str, msg: String| -> Result<()> {
        if strict {
            Err(Error::config(path, field, msg))
        } else {
            notes.push(format!("config.{field}: {msg}"));
            Ok(())
        }
    };
    if let Some(&l) = c.leave_out.iter().find(|&&l| l >= layers) {
        soft("config.leave_out", format!("layer {l} does not exist: the model has {layers} layers"))?;
    }
    if let ReductionFactor::PerLayer { layers: map, .. } = &c.reduction_factor {
        if let Some(&l) = map.keys().find(|&&l| l >= layers) {
            soft("config.reduction_factor", format!("has an entry for layer {l}, but the model has {layers} layers"))?;
        }
    }
    let max = MAX_WIDTH_FACTOR.saturating_mul(h);
    for layer in 0..layers {
        if Location::BOTH.iter().any(|&loc| c.has_location(layer, loc)) {
            let m = c.bottleneck_size(layer, h).map_err(|e| Error::config(path, "config.reduction_factor", e.to_string()))?;
            if m > max {
                return Err(Error::config(
                    path,
                    "config.reduction_factor",
                    // The width saturates for a tiny factor: say so rather than print usize::MAX.
                    format!(
                        "gives a bottleneck of {} at layer {layer}, more than {MAX_WIDTH_FACTOR}× the hidden size {h}",
                        if m == usize::MAX { "2^64 or more".to_string() } else { m.to_string() }
                    ),
                ));
            }
        }
    }
    if let (true, Some(rf)) = (c.inv_adapter, c.inv_adapter_reduction_factor) {
        let k = (h as f64 / 2.0 / rf).floor();
        if k > max as f64 {
            return Err(Error::config(path, "config.inv_adapter_reduction_factor", format!("{} gives a NICE layer of {} units for hidden size {h}, more than {max}", short_number(rf), short_number(k))));
        }
        if k < 1.0 {
            return Err(Error::config(path, "config.inv_adapter_reduction_factor", format!("{} leaves the NICE layer no units for hidden size {h}", short_number(rf))));
        }
    }
    Ok(())
}

/// Why `key` (canonical) is not a tensor of adapter `name`, for the error message.
fn explain_unexpected(key: &str, saved: &str, name: &str, bert: &BertConfig, config: &AdapterConfig) -> String {
    let layers = bert.num_hidden_layers;
    if let Some(rest) = key.strip_prefix("encoder.layer.") {
        if let Some(l) = rest.split('.').next().and_then(|s| s.parse::<usize>().ok()) {
            if l >= layers {
                return format!("layer {l} does not exist: the model has {layers} layers (saved from a deeper BERT?)");
            }
            if config.leave_out.contains(&l) {
                return format!("layer {l} is in the config's leave_out");
            }
        }
    }
    if key.starts_with("heads.") {
        return format!("a prediction head tensor; heads belong in {HEAD_CONFIG_FILE} + {HEAD_WEIGHTS_FILE}");
    }
    let owner = ["invertible_adapters.", "adapters."].iter().find_map(|p| {
        let i = key.find(p)?;
        key[i + p.len()..].split('.').next()
    });
    match owner {
        Some(o) if o != name => format!("belongs to adapter `{o}`, not to `{saved}` (the name in {CONFIG_FILE})"),
        Some(_) => format!("not a tensor of adapter `{saved}` with its config (a location, LayerNorm, scaling or gate the config does not enable?)"),
        None => "not an adapter tensor".into(),
    }
}

/// The tensors of adapter `name` (saved as `cfg.name`) in `weights`, as f32 on the host by the
/// key the model gives them, checked against `expected` (key → shape: every tensor the config
/// implies). Legacy and `bert.`-prefixed names are mapped, and `ln_before`'s second LayerNorm
/// name must hold the same values. Strictly, unexpected tensors are an error; leniently they are
/// skipped and listed in `report`. Missing tensors are simply absent from the result.
pub fn read_adapter_tensors(
    cfg: &AdapterConfigFile,
    weights: &WeightsFile,
    expected: &BTreeMap<&str, &[usize]>,
    name: &str,
    bert: &BertConfig,
    strict: bool,
    report: &mut AdapterLoadReport,
) -> Result<BTreeMap<String, Vec<f32>>> {
    let wpath = weights.path();
    let saved = cfg.name.as_str();

    // Match every file tensor to a parameter before reading any data.
    let mut found: BTreeMap<String, &StoredTensor> = BTreeMap::new();
    let mut aliases: Vec<(String, &StoredTensor)> = Vec::new();
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for t in weights.tensors() {
        let key = canonical_key(&t.name, saved, name, bert.model_type.weight_prefix());
        if let Some(first) = seen.insert(key.clone(), &t.name) {
            return Err(Error::tensor(wpath, &t.name, format!("names the same parameter as `{first}` (with and without `{}`, or a legacy name)", bert.model_type.weight_prefix())));
        }
        // With ln_before the library registers its LayerNorm twice: `adapter_norm_before.*` and
        // `adapter_down.0.*` are the same tensors. We keep one and check the other equals it.
        if cfg.config.ln_before {
            if let Some(stem) = key.strip_suffix("adapter_down.0.weight").or_else(|| key.strip_suffix("adapter_down.0.bias")) {
                let canon = format!("{stem}adapter_norm_before.{}", if key.ends_with("weight") { "weight" } else { "bias" });
                if expected.contains_key(canon.as_str()) {
                    aliases.push((canon, t));
                    continue;
                }
            }
        }
        if expected.contains_key(key.as_str()) {
            found.insert(key, t);
        } else if strict {
            return Err(Error::tensor(wpath, &t.name, format!("unexpected: {}", explain_unexpected(&key, saved, name, bert, &cfg.config))));
        } else {
            report.unexpected.push(t.name.clone());
        }
    }
    let check = |t: &StoredTensor, shape: &[usize]| -> Result<()> {
        if t.float.is_none() {
            return Err(Error::tensor(wpath, &t.name, format!("dtype {} is not supported (expected F32, F16 or BF16)", t.dtype)));
        }
        if t.shape != shape {
            return Err(Error::tensor(wpath, &t.name, format!("shape {:?} in the file, but the config needs {shape:?}", t.shape)));
        }
        Ok(())
    };
    for (key, t) in &found {
        check(t, expected[key.as_str()])?;
    }
    for (canon, t) in &aliases {
        check(t, expected[canon.as_str()])?;
    }

    let read = |t: &StoredTensor| -> Result<Vec<f32>> {
        let data = weights.read_f32(&t.name)?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::tensor(wpath, &t.name, format!("non-finite value {} at element {i}", data[i])));
        }
        Ok(data)
    };
    let mut host: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for (key, t) in &found {
        host.insert(key.clone(), read(t)?);
    }
    for (canon, t) in &aliases {
        let data = read(t)?;
        match host.get(canon) {
            Some(d) if *d == data => {}
            Some(_) => return Err(Error::tensor(wpath, &t.name, format!("differs from `{canon}`, which it aliases (ln_before stores one LayerNorm twice)"))),
            None => {
                host.insert(canon.clone(), data);
            }
        }
    }
    Ok(host)
}

/// A head saved beside an adapter: its `head_config.json` and its opened weights file.
pub struct StoredHead {
    pub config_path: PathBuf,
    pub file: HeadConfigFile,
    pub weights: WeightsFile,
}

/// The head saved in `dir` beside adapter `saved_adapter` (loaded as `name`), if the folder has
/// one, for a model of hidden size `hidden_size`. In a lenient load a head we cannot use is
/// skipped with a note rather than failing.
pub fn read_head(dir: &Path, saved_adapter: &str, name: &str, strict: bool, hidden_size: usize, report: &mut AdapterLoadReport) -> Result<Option<StoredHead>> {
    let cfg_path = dir.join(HEAD_CONFIG_FILE);
    if !cfg_path.is_file() {
        return Ok(None);
    }
    let soft = |e: Error, report: &mut AdapterLoadReport| -> Result<Option<StoredHead>> {
        if strict {
            Err(e)
        } else {
            report.notes.push(format!("head not loaded: {e}"));
            Ok(None)
        }
    };
    let bytes = read_capped(&cfg_path, MAX_CONFIG_BYTES, "a config file")?;
    let text = match std::str::from_utf8(&bytes) {
        Ok(t) => t,
        Err(e) => return soft(Error::malformed(&cfg_path, format!("not UTF-8 (invalid byte at offset {})", e.valid_up_to())), report),
    };
    let file = match HeadConfigFile::from_json(&cfg_path, text) {
        Ok(f) => f,
        Err(e) => return soft(e, report),
    };
    if file.name != saved_adapter {
        report.notes.push(format!("{}: head `{}` saved beside adapter `{saved_adapter}`; loaded as `{name}`'s head", cfg_path.display(), file.name));
    }
    if file.hidden_size != hidden_size {
        return Err(Error::config(&cfg_path, "hidden_size", format!("{} does not match the model's hidden size {hidden_size}", file.hidden_size)));
    }
    let Some(wpath) = [HEAD_WEIGHTS_FILE, TORCH_HEAD_WEIGHTS_FILE].iter().map(|f| dir.join(f)).find(|p| p.is_file()) else {
        let e = Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("{HEAD_CONFIG_FILE} but neither {HEAD_WEIGHTS_FILE} nor {TORCH_HEAD_WEIGHTS_FILE}")),
        );
        return soft(e, report);
    };
    let weights = WeightsFile::open(&wpath)?;
    Ok(Some(StoredHead { config_path: cfg_path, file, weights }))
}

/// The tensors of `head`, renamed from `heads.<saved>.` to `heads.<name>.`, as f32 on the host,
/// checked against `expected` (key → shape). Every expected tensor must be there: a head with
/// random layers predicts nothing useful, so missing head tensors are an error in lenient loads
/// too. Unexpected ones are an error strictly, skipped and listed in `report` leniently.
pub fn read_head_tensors(
    head: &StoredHead,
    name: &str,
    expected: &BTreeMap<String, Vec<usize>>,
    strict: bool,
    report: &mut AdapterLoadReport,
) -> Result<BTreeMap<String, Vec<f32>>> {
    let (file, weights) = (&head.file, &head.weights);
    let wpath = weights.path();
    let (old, new) = (format!("heads.{}.", file.name), format!("heads.{name}."));
    let mut host = BTreeMap::new();
    for t in weights.tensors() {
        let key = t.name.replacen(&old, &new, 1);
        let Some(shape) = expected.get(&key) else {
            if strict {
                return Err(Error::tensor(wpath, &t.name, format!("unexpected for head `{}` ({} layers, {} labels)", file.name, file.config.layers, file.config.num_labels)));
            }
            report.unexpected.push(format!("{}: {}", wpath.display(), t.name));
            continue;
        };
        if t.float.is_none() {
            return Err(Error::tensor(wpath, &t.name, format!("dtype {} is not supported (expected F32, F16 or BF16)", t.dtype)));
        }
        if &t.shape != shape {
            return Err(Error::tensor(wpath, &t.name, format!("shape {:?} in the file, but the head config needs {shape:?}", t.shape)));
        }
        let data = weights.read_f32(&t.name)?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::tensor(wpath, &t.name, format!("non-finite value {} at element {i}", data[i])));
        }
        if host.insert(key.clone(), data).is_some() {
            return Err(Error::tensor(wpath, &t.name, "appears twice"));
        }
    }
    if let Some(missing) = expected.keys().find(|k| !host.contains_key(*k)) {
        return Err(Error::tensor(wpath, missing, format!("missing from head `{}`", file.name)));
    }
    Ok(host)
}
