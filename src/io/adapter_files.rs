//! Adapter folders as AdapterHub's `save_adapter` writes them (spec §8): `adapter_config.json`
//! plus the weights as `adapter.safetensors` (`use_safetensors=True`) or `pytorch_adapter.bin`
//! (the default, a `torch.save` archive read by [`crate::io::pickle`] without executing it), and
//! optionally a prediction head (`head_config.json` + `model_head.safetensors` or
//! `pytorch_model_head.bin`).
//!
//! Loading is strict by default: every tensor the config implies must be present with its shape,
//! nothing else may be, and the config must fit the model. The library itself only logs missing
//! and unexpected keys; [`AdapterLoadOptions::strict`]` = false` mirrors that and returns what it
//! found in an [`AdapterLoadReport`] instead.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde_json::Value;

use crate::backend::Backend;
use crate::config::{AdapterConfig, BertConfig, Location, ReductionFactor};
use crate::error::{Error, Result};
use crate::io::pickle::{looks_like_torch, StorageDtype, TorchArchive};
use crate::model::adapters::{param_specs, validate_adapter_name, Adapter};
use crate::model::heads::{ClassificationHead, HeadConfigFile};
use crate::tensor::Tensor;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter.safetensors";
pub const TORCH_WEIGHTS_FILE: &str = "pytorch_adapter.bin";
pub const HEAD_CONFIG_FILE: &str = "head_config.json";
pub const HEAD_WEIGHTS_FILE: &str = "model_head.safetensors";
pub const TORCH_HEAD_WEIGHTS_FILE: &str = "pytorch_model_head.bin";
/// What `version` the files we write claim: the library release whose format they follow.
pub const LIBRARY_VERSION: &str = "adapters.1.3.0";
/// Largest `adapter_config.json` / `head_config.json` read (real ones are about 1 KiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// A bottleneck (or NICE hidden layer) wider than this many times the hidden size is refused:
/// such a config is a mistake, and honouring it could allocate without bound.
pub const MAX_WIDTH_FACTOR: usize = 64;

// ---- adapter_config.json --------------------------------------------------------------------

/// What `adapter_config.json` says about the adapter.
#[derive(Clone, Debug)]
pub struct AdapterConfigFile {
    pub name: String,
    pub config: AdapterConfig,
    pub hidden_size: Option<usize>,
    /// The base model's `name_or_path` when it was saved ("" when unknown).
    pub model_name: String,
}

/// Read and validate `adapter_config.json`.
pub fn read_adapter_config(path: &Path) -> Result<AdapterConfigFile> {
    parse_adapter_config(&read_capped(path, MAX_CONFIG_BYTES)?, path)
}

/// Parse the bytes of an `adapter_config.json`; `path` names it in errors.
pub fn parse_adapter_config(bytes: &[u8], path: &Path) -> Result<AdapterConfigFile> {
    if bytes.is_empty() {
        return Err(Error::malformed(path, "empty file (expected the adapter's JSON config)"));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| Error::malformed(path, format!("not UTF-8 (invalid byte at offset {})", e.valid_up_to())))?;
    let json: Value = serde_json::from_str(text).map_err(|e| Error::malformed(path, format!("not valid JSON: {e}")))?;
    let Value::Object(top) = json else {
        return Err(Error::malformed(path, "expected a JSON object"));
    };
    let name = match top.get("name") {
        Some(Value::String(n)) => n.clone(),
        Some(other) => return Err(Error::config(path, "name", format!("expected a string, got {other}"))),
        None => return Err(Error::config(path, "name", "missing (the adapter's name is read from it)")),
    };
    validate_adapter_name(&name).map_err(|e| Error::config(path, "name", e.to_string()))?;
    match top.get("model_type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t == "bert" => {}
        Some(Value::String(t)) => return Err(Error::config(path, "model_type", format!("`{t}` is not supported (only bert)"))),
        Some(other) => return Err(Error::config(path, "model_type", format!("expected a string, got {other}"))),
    }
    let hidden_size = match top.get("hidden_size") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64().and_then(|h| usize::try_from(h).ok()) {
            Some(h) if h > 0 => Some(h),
            _ => return Err(Error::config(path, "hidden_size", format!("expected a positive integer, got {v}"))),
        },
    };
    let model_name = match top.get("model_name") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(Error::config(path, "model_name", format!("expected a string, got {other}"))),
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
    Ok(AdapterConfigFile { name, config, hidden_size, model_name })
}

/// `adapter_config.json` as the library writes it for adapter `name` on a `BertModel`.
pub fn adapter_config_json(name: &str, config: &AdapterConfig, hidden_size: usize, model_name: &str) -> String {
    let v = serde_json::json!({
        "config": config.to_json(),
        "hidden_size": hidden_size,
        "model_class": "BertModel",
        "model_name": model_name,
        "model_type": "bert",
        "name": name,
        "version": LIBRARY_VERSION,
    });
    to_python_json(&v)
}

/// `head_config.json` as the library writes it for a classification head of a
/// `BertAdapterModel` (the only model class with flexible heads).
pub fn head_config_json(head: &ClassificationHead, model_name: &str) -> Result<String> {
    let file = HeadConfigFile {
        config: head.config().clone(),
        hidden_size: head.hidden_size(),
        model_class: "BertAdapterModel".into(),
        model_name: model_name.into(),
        model_type: "bert".into(),
        name: head.name().into(),
        version: LIBRARY_VERSION.into(),
    };
    let v = serde_json::to_value(&file).map_err(|e| Error::Input(format!("head `{}`: {e}", head.name())))?;
    Ok(to_python_json(&v))
}

/// JSON exactly as Python's `json.dump(v, indent=2, sort_keys=True)` writes it: two-space
/// indents, `": "` and `","` separators, keys sorted by code point, non-ASCII escaped as
/// `\uXXXX`, floats in `repr` form (`1.0`, `0.0001`, `1e-05`), no trailing newline.
pub fn to_python_json(v: &Value) -> String {
    let mut out = String::new();
    write_python_json(v, 0, &mut out);
    out
}

fn write_python_json(v: &Value, depth: usize, out: &mut String) {
    let indent = |out: &mut String, d: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n(' ', 2 * d));
    };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) if !n.is_f64() => out.push_str(&i.to_string()),
            (_, Some(u), _) if !n.is_f64() => out.push_str(&u.to_string()),
            (_, _, Some(f)) => out.push_str(&python_float_repr(f)),
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => python_string(s, out),
        Value::Array(a) if a.is_empty() => out.push_str("[]"),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, depth + 1);
                write_python_json(x, depth + 1, out);
            }
            indent(out, depth);
            out.push(']');
        }
        Value::Object(m) if m.is_empty() => out.push_str("{}"),
        Value::Object(m) => {
            // Sorted here whatever order the map keeps (serde_json may preserve insertion order).
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, depth + 1);
                python_string(k, out);
                out.push_str(": ");
                write_python_json(&m[k], depth + 1, out);
            }
            indent(out, depth);
            out.push('}');
        }
    }
}

/// `json.dumps` string escaping with `ensure_ascii=True`.
fn python_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest round-tripping digits, positional for exponents in
/// [-4, 16), scientific (`1e-05`, `1.5e+16`) otherwise.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // Rust's `{:e}` prints the shortest round-tripping digits, e.g. "-1.2345e-7".
    let s = format!("{x:e}");
    let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            let (int, frac) = if digits.len() > int_len {
                (digits[..int_len].to_string(), digits[int_len..].to_string())
            } else {
                (format!("{digits:0<int_len$}"), "0".to_string())
            };
            format!("{sign}{int}.{frac}")
        } else {
            format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
        }
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::new();
    file.take(cap + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > cap {
        return Err(Error::malformed(path, format!("larger than {cap} bytes; not a config file")));
    }
    Ok(bytes)
}

// ---- weights files --------------------------------------------------------------------------

/// File bytes: a read-only map of the file or an owned buffer.
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A tensor as a weights file declares it, before any data is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredTensor {
    pub name: String,
    /// The dtype as the file spells it (`F32`, `I64`, ...).
    pub dtype: String,
    /// Set when the dtype is one we read (F32, F16, BF16).
    pub float: Option<StorageDtype>,
    pub shape: Vec<usize>,
}

enum Format {
    Safetensors { bytes: Bytes, data_start: usize, metadata: Metadata },
    Torch(TorchArchive),
}

/// An adapter or head weights file in either format, validated when opened; tensor data is
/// decoded on request, so a caller can check names, dtypes and shapes first.
pub struct WeightsFile {
    path: PathBuf,
    format: Format,
    tensors: Vec<StoredTensor>,
}

impl WeightsFile {
    /// Open a safetensors file or a `torch.save` archive (told apart by their first bytes).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Err(Error::malformed(path, "empty file (expected safetensors or a torch.save archive)"));
        }
        // SAFETY: read-only map; bytes changing underneath can only yield other numbers or
        // errors, every access is bounds-checked.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        if looks_like_torch(&mmap) {
            drop(mmap);
            return Self::from_torch(TorchArchive::open(path)?);
        }
        Self::from_safetensors(Bytes::Mapped(mmap), path)
    }

    /// The same from bytes in memory; `origin` names them in errors.
    pub fn from_bytes(bytes: Vec<u8>, origin: &Path) -> Result<Self> {
        if looks_like_torch(&bytes) {
            return Self::from_torch(TorchArchive::from_bytes(bytes, origin)?);
        }
        Self::from_safetensors(Bytes::Owned(bytes), origin)
    }

    fn from_torch(archive: TorchArchive) -> Result<Self> {
        let tensors = archive
            .tensors()
            .iter()
            .map(|t| StoredTensor {
                name: t.name.clone(),
                dtype: t.storage.dtype.name().into(),
                float: Some(t.storage.dtype),
                shape: t.shape.clone(),
            })
            .collect();
        Ok(WeightsFile { path: archive.path().to_path_buf(), format: Format::Torch(archive), tensors })
    }

    fn from_safetensors(bytes: Bytes, path: &Path) -> Result<Self> {
        let (header_len, metadata) = read_safetensors_header(&bytes, path)?;
        let mut tensors = Vec::new();
        for name in metadata.offset_keys() {
            let Some(info) = metadata.info(&name) else { continue };
            let float = match info.dtype {
                Dtype::F32 => Some(StorageDtype::F32),
                Dtype::F16 => Some(StorageDtype::F16),
                Dtype::BF16 => Some(StorageDtype::BF16),
                _ => None,
            };
            tensors.push(StoredTensor { name, dtype: format!("{:?}", info.dtype), float, shape: info.shape.clone() });
        }
        Ok(WeightsFile { path: path.to_path_buf(), format: Format::Safetensors { bytes, data_start: 8 + header_len, metadata }, tensors })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor, in file order.
    pub fn tensors(&self) -> &[StoredTensor] {
        &self.tensors
    }

    /// A float tensor's elements as f32 (F16/BF16 widen exactly).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensors.iter().find(|t| t.name == name).ok_or_else(|| Error::tensor(&self.path, name, "not in the file"))?;
        let Some(dtype) = t.float else {
            return Err(Error::tensor(&self.path, name, format!("dtype {} is not a float type (expected F32, F16 or BF16)", t.dtype)));
        };
        match &self.format {
            Format::Torch(archive) => archive.read_f32(name),
            Format::Safetensors { bytes, data_start, metadata } => {
                let info = metadata.info(name).ok_or_else(|| Error::tensor(&self.path, name, "not in the file"))?;
                let (a, b) = info.data_offsets;
                // Validated against the file length when the header was read.
                let data = bytes.get(data_start + a..data_start + b).ok_or_else(|| Error::tensor(&self.path, name, "data out of range"))?;
                Ok(dtype.decode(data))
            }
        }
    }
}

/// The safetensors header, with one clear message per way it can be broken.
fn read_safetensors_header(bytes: &[u8], path: &Path) -> Result<(usize, Metadata)> {
    let bad = |msg: String| Error::malformed(path, msg);
    if bytes.is_empty() {
        return Err(bad("empty file (expected safetensors)".into()));
    }
    if bytes.len() < 8 {
        return Err(bad(format!("{} bytes: too short for a safetensors file (the 8-byte header length is cut off)", bytes.len())));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(len8);
    let room = bytes.len() as u64 - 8;
    if n > room {
        return Err(bad(format!("header length {n} runs past the end of the file ({room} bytes follow it): truncated or not safetensors")));
    }
    SafeTensors::read_metadata(bytes).map_err(|e| {
        bad(match e {
            SafeTensorError::InvalidHeader(_) | SafeTensorError::InvalidHeaderDeserialization(_) => {
                format!("safetensors header is not valid JSON of tensor entries: {e}")
            }
            SafeTensorError::HeaderTooLarge => format!("safetensors header of {n} bytes is larger than the format allows"),
            SafeTensorError::InvalidOffset(name) => {
                format!("tensor `{name}`: data offsets out of order, overlapping, or leaving a gap (they must tile the data section)")
            }
            SafeTensorError::MetadataIncompleteBuffer => {
                "the header's data offsets do not end at the end of the file (truncated or padded data section)".into()
            }
            SafeTensorError::TensorInvalidInfo => "a tensor's data offsets do not match its dtype and shape".into(),
            SafeTensorError::ValidationOverflow => "a tensor's shape overflows when multiplied out".into(),
            other => format!("not a valid safetensors file: {other}"),
        })
    })
}

// ---- loading ---------------------------------------------------------------------------------

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

/// An adapter and its head, read from a folder but not yet part of a model.
pub struct LoadedAdapter {
    pub adapter: Adapter,
    pub head: Option<ClassificationHead>,
    pub report: AdapterLoadReport,
}

/// An adapter folder whose config has been read and whose weights file has been found.
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
            return Err(Error::io(dir, std::io::Error::new(std::io::ErrorKind::NotFound, "adapter folder not found")));
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

    /// Read the weights (and head) for a BERT of `bert`.
    pub fn load(&self, opts: &AdapterLoadOptions, bert: &BertConfig, backend: &dyn Backend) -> Result<LoadedAdapter> {
        let weights = WeightsFile::open(&self.weights_path)?;
        let (adapter, mut report) = build_adapter(&self.config, &self.dir.join(CONFIG_FILE), &weights, opts, bert, backend)?;
        let head = if opts.with_head { load_head(&self.dir, &self.config.name, adapter.name(), opts, bert, backend, &mut report)? } else { None };
        report.head = head.is_some();
        Ok(LoadedAdapter { adapter, head, report })
    }
}

/// Load an adapter folder for a BERT of `bert`, under its saved name or `load_as`, strictly and
/// without its head.
pub fn load_adapter_dir(dir: &Path, load_as: Option<&str>, bert: &BertConfig, backend: &dyn Backend) -> Result<Adapter> {
    let opts = AdapterLoadOptions { load_as: load_as.map(str::to_string), strict: true, with_head: false };
    Ok(AdapterDir::open(dir)?.load(&opts, bert, backend)?.adapter)
}

/// The library's renames of adapter-transformers (v1–v3) module names.
const LEGACY_NAMES: [(&str, &str); 5] = [
    ("attention_text_task_adapters", "adapters"),
    ("attention_text_lang_adapters", "adapters"),
    ("layer_text_task_adapters", "adapters"),
    ("layer_text_lang_adapters", "adapters"),
    ("invertible_lang_adapters", "invertible_adapters"),
];

/// A file key as the model names it: no `bert.` prefix, current module names, the new name.
fn canonical_key(file_key: &str, saved: &str, name: &str) -> String {
    let mut k = file_key.strip_prefix("bert.").unwrap_or(file_key).to_string();
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
fn check_fit(cfg: &AdapterConfigFile, path: &Path, bert: &BertConfig, strict: bool, notes: &mut Vec<String>) -> Result<()> {
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
                    format!("gives a bottleneck of {m} at layer {layer}, more than {MAX_WIDTH_FACTOR}× the hidden size {h}"),
                ));
            }
        }
    }
    if let (true, Some(rf)) = (c.inv_adapter, c.inv_adapter_reduction_factor) {
        let k = (h as f64 / 2.0 / rf).floor();
        if k > max as f64 {
            return Err(Error::config(path, "config.inv_adapter_reduction_factor", format!("{rf} gives a NICE layer of {k} units for hidden size {h}")));
        }
        if k < 1.0 {
            return Err(Error::config(path, "config.inv_adapter_reduction_factor", format!("{rf} leaves the NICE layer no units for hidden size {h}")));
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

/// Build adapter `name` from a parsed config and an opened weights file, checking the file
/// against what the config implies. Used by folder loads and by the fuzz targets.
pub fn build_adapter(
    cfg: &AdapterConfigFile,
    cfg_path: &Path,
    weights: &WeightsFile,
    opts: &AdapterLoadOptions,
    bert: &BertConfig,
    backend: &dyn Backend,
) -> Result<(Adapter, AdapterLoadReport)> {
    let wpath = weights.path();
    let saved = cfg.name.as_str();
    let name = opts.load_as.as_deref().unwrap_or(saved);
    validate_adapter_name(name)?;
    let mut report = AdapterLoadReport { name: name.into(), saved_name: saved.into(), weights_file: wpath.to_path_buf(), ..Default::default() };
    check_fit(cfg, cfg_path, bert, opts.strict, &mut report.notes)?;
    let specs = param_specs(name, &cfg.config, bert).map_err(|e| Error::config(cfg_path, "config", e.to_string()))?;
    let expected: BTreeMap<&str, &[usize]> = specs.iter().map(|s| (s.key.as_str(), s.shape.as_slice())).collect();

    // Match every file tensor to a parameter before reading any data.
    let mut found: BTreeMap<String, &StoredTensor> = BTreeMap::new();
    let mut aliases: Vec<(String, &StoredTensor)> = Vec::new();
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for t in weights.tensors() {
        let key = canonical_key(&t.name, saved, name);
        if let Some(first) = seen.insert(key.clone(), &t.name) {
            return Err(Error::tensor(wpath, &t.name, format!("names the same parameter as `{first}` (with and without `bert.`, or a legacy name)")));
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
        } else if opts.strict {
            return Err(Error::tensor(wpath, &t.name, format!("unexpected: {}", explain_unexpected(&key, saved, name, bert, &cfg.config))));
        } else {
            report.unexpected.push(t.name.clone());
        }
    }
    let check = |t: &StoredTensor, shape: &[usize]| -> Result<()> {
        if t.float.is_none() {
            return Err(Error::tensor(wpath, &t.name, format!("dtype {} is not a float type (expected F32, F16 or BF16)", t.dtype)));
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

    let mut fresh: Option<Adapter> = None;
    let mut params: BTreeMap<String, Tensor> = BTreeMap::new();
    for spec in &specs {
        let tensor = match host.remove(&spec.key) {
            Some(data) => backend.upload(data, &spec.shape)?,
            None if opts.strict => {
                return Err(Error::tensor(wpath, &spec.key, format!("missing: adapter `{saved}` with its config needs it (shape {:?})", spec.shape)))
            }
            None => {
                report.missing.push(spec.key.clone());
                if fresh.is_none() {
                    fresh = Some(Adapter::init(name, cfg.config.clone(), bert, 0, backend)?);
                }
                fresh.as_ref().and_then(|a| a.params().get(&spec.key).cloned()).ok_or_else(|| Error::tensor(wpath, &spec.key, "missing"))?
            }
        };
        params.insert(spec.key.clone(), tensor);
    }
    let adapter = Adapter::from_params(name, cfg.config.clone(), bert, params)?;
    Ok((adapter, report))
}

/// The head saved beside an adapter, if any, loaded under the adapter's name.
fn load_head(
    dir: &Path,
    saved_adapter: &str,
    name: &str,
    opts: &AdapterLoadOptions,
    bert: &BertConfig,
    backend: &dyn Backend,
    report: &mut AdapterLoadReport,
) -> Result<Option<ClassificationHead>> {
    let cfg_path = dir.join(HEAD_CONFIG_FILE);
    if !cfg_path.is_file() {
        return Ok(None);
    }
    // In a lenient load a head we cannot use is skipped with a note rather than failing.
    let soft = |e: Error, report: &mut AdapterLoadReport| -> Result<Option<ClassificationHead>> {
        if opts.strict {
            Err(e)
        } else {
            report.notes.push(format!("head not loaded: {e}"));
            Ok(None)
        }
    };
    let bytes = read_capped(&cfg_path, MAX_CONFIG_BYTES)?;
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
    if file.hidden_size != bert.hidden_size {
        return Err(Error::config(&cfg_path, "hidden_size", format!("{} does not match the model's hidden size {}", file.hidden_size, bert.hidden_size)));
    }
    let Some(wpath) = [HEAD_WEIGHTS_FILE, TORCH_HEAD_WEIGHTS_FILE].iter().map(|f| dir.join(f)).find(|p| p.is_file()) else {
        let e = Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("{HEAD_CONFIG_FILE} but neither {HEAD_WEIGHTS_FILE} nor {TORCH_HEAD_WEIGHTS_FILE}")),
        );
        return soft(e, report);
    };
    let weights = WeightsFile::open(&wpath)?;
    let expected: BTreeMap<String, Vec<usize>> = ClassificationHead::expected_shapes(name, &file.config, bert.hidden_size).into_iter().collect();
    let (old, new) = (format!("heads.{}.", file.name), format!("heads.{name}."));
    let mut params = BTreeMap::new();
    for t in weights.tensors() {
        let key = t.name.replacen(&old, &new, 1);
        let Some(shape) = expected.get(&key) else {
            if opts.strict {
                return Err(Error::tensor(&wpath, &t.name, format!("unexpected for head `{}` ({} layers, {} labels)", file.name, file.config.layers, file.config.num_labels)));
            }
            report.unexpected.push(format!("{}: {}", wpath.display(), t.name));
            continue;
        };
        if t.float.is_none() {
            return Err(Error::tensor(&wpath, &t.name, format!("dtype {} is not a float type (expected F32, F16 or BF16)", t.dtype)));
        }
        if &t.shape != shape {
            return Err(Error::tensor(&wpath, &t.name, format!("shape {:?} in the file, but the head config needs {shape:?}", t.shape)));
        }
        let data = weights.read_f32(&t.name)?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::tensor(&wpath, &t.name, format!("non-finite value {} at element {i}", data[i])));
        }
        if params.insert(key.clone(), backend.upload(data, shape)?).is_some() {
            return Err(Error::tensor(&wpath, &t.name, "appears twice"));
        }
    }
    if let Some(missing) = expected.keys().find(|k| !params.contains_key(*k)) {
        // A head with random layers predicts nothing useful: missing head tensors are an error
        // in lenient loads too.
        return Err(Error::tensor(&wpath, missing, format!("missing from head `{}`", file.name)));
    }
    ClassificationHead::from_params(name, file.config, params).map(Some)
}

// ---- saving ----------------------------------------------------------------------------------

/// A tensor to write: state-dict key, shape, data.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// The tensors of `adapter` as the library saves them, in its state-dict order, without the
/// `bert.` prefix (a `BertModel` has none). With `ln_before` the LayerNorm is written under both
/// of its library names, `adapter_norm_before.*` and `adapter_down.0.*`, as two separate tensors:
/// the library shares one storage between them and so cannot write safetensors at all
/// ("Some tensors share memory"); both names keep the file loadable by it with
/// `use_safetensors=True`, where each key fills its own parameter.
pub fn adapter_tensors(adapter: &Adapter, bert: &BertConfig, backend: &dyn Backend) -> Result<Vec<NamedTensor>> {
    let name = adapter.name();
    let specs = param_specs(name, adapter.config(), bert)?;
    let mut out: Vec<NamedTensor> = Vec::with_capacity(specs.len());
    for spec in specs {
        let t = adapter.params().get(&spec.key).ok_or_else(|| Error::Input(format!("adapter `{name}` has no tensor `{}`", spec.key)))?;
        let data = backend.to_host(t)?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::Input(format!("adapter `{name}`: tensor `{}` holds {} at element {i}; refusing to save it", spec.key, data[i])));
        }
        let then_aliases = spec.key.ends_with(".adapter_norm_before.bias");
        out.push((spec.key, t.shape().to_vec(), data));
        // The library's order: adapter_norm_before.{weight,bias}, then adapter_down.0.{weight,bias}.
        if then_aliases {
            let pair: Vec<_> = out[out.len() - 2..]
                .iter()
                .map(|(k, s, d)| (k.replace(".adapter_norm_before.", ".adapter_down.0."), s.clone(), d.clone()))
                .collect();
            out.extend(pair);
        }
    }
    Ok(out)
}

/// A head's tensors by state-dict key (`heads.<name>.<i>.weight/bias`).
pub fn head_tensors(head: &ClassificationHead, backend: &dyn Backend) -> Result<Vec<NamedTensor>> {
    head.params().iter().map(|(k, t)| Ok((k.clone(), t.shape().to_vec(), backend.to_host(t)?))).collect()
}

/// F32 tensors as safetensors bytes with `{"format": "pt"}` metadata, as `save_file` in
/// `safetensors.torch` writes them.
pub fn safetensors_bytes(tensors: &[NamedTensor], origin: &Path) -> Result<Vec<u8>> {
    let raw: Vec<Vec<u8>> = tensors.iter().map(|(_, _, d)| d.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, _), bytes) in tensors.iter().zip(&raw) {
        let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
            .map_err(|e| Error::tensor(origin, name, format!("cannot serialize: {e}")))?;
        views.push((name.clone(), view));
    }
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(meta)).map_err(|e| Error::malformed(origin, format!("cannot serialize: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_repr_matches_cpython() {
        let cases = [
            (1.0, "1.0"),
            (0.0, "0.0"),
            (0.0001, "0.0001"),
            (1e-5, "1e-05"),
            (2.5, "2.5"),
            (16.0, "16.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (123456.789, "123456.789"),
            (-0.5, "-0.5"),
            (0.1, "0.1"),
            (1.0 / 3.0, "0.3333333333333333"),
            (1e-300, "1e-300"),
            (6.02e23, "6.02e+23"),
            (0.00012345, "0.00012345"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float_repr(x), want, "{x}");
        }
    }

    #[test]
    fn config_floats_survive_a_write_and_read_bit_for_bit() {
        // Found by the adapter_config fuzz target: without correctly rounded float parsing the
        // value read back was one ulp off the value written.
        let path = Path::new("adapter_config.json");
        let text = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/adapters/pfeiffer/adapter_config.json")).unwrap();
        let text = String::from_utf8(text).unwrap().replace("\"scaling\": 1.0", "\"scaling\": 1.077777777777777777");
        let cfg = parse_adapter_config(text.as_bytes(), path).unwrap();
        let written = adapter_config_json(&cfg.name, &cfg.config, 48, &cfg.model_name);
        assert!(written.contains("\"scaling\": 1.0777777777777777,"), "{written}");
        assert_eq!(parse_adapter_config(written.as_bytes(), path).unwrap().config, cfg.config);
    }

    #[test]
    fn python_json_escapes_like_ensure_ascii() {
        let v = serde_json::json!({"b": [], "a": {"é": "tab\there \u{7f} 😀 \"q\""}, "c": [1, 2.0, null, true]});
        assert_eq!(
            to_python_json(&v),
            "{\n  \"a\": {\n    \"\\u00e9\": \"tab\\there \\u007f \\ud83d\\ude00 \\\"q\\\"\"\n  },\n  \"b\": [],\n  \"c\": [\n    1,\n    2.0,\n    null,\n    true\n  ]\n}"
        );
    }
}
