//! Saving adapters in AdapterHub's folder format and loading them with their heads: the mapping
//! between the model's adapters and heads and the plain data (configs, named host tensors) that
//! `crate::io::adapter_files` reads and writes.
//!
//! A save writes `adapter_config.json` and `adapter.safetensors` (what the library writes with
//! `save_adapter(dir, name, use_safetensors=True)`), plus `head_config.json` and
//! `model_head.safetensors` when the adapter has a head. Every file is first written in full to a
//! temporary file in the same folder and fsynced; only when all of them are on disk are they
//! renamed over the old ones (config last), so a failure while writing (a full disk, a size
//! limit, a permission) leaves an earlier save untouched. Only a rename failing within the folder,
//! after every byte is on disk, could leave new weights beside the old config.
//!
//! A `pytorch_adapter.bin` already in the folder is left alone: our loader and the
//! library's `use_safetensors=True` prefer `adapter.safetensors`, but the library's default load
//! reads only the .bin, so delete it if the folder is meant for that.

use std::collections::BTreeMap;
use std::path::Path;

use crate::backend::Backend;
use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::io::atomic::{clean_leftovers, commit_all, StagedFile};
use crate::io::adapter_files::{
    adapter_config_json, check_fit, head_config_json, read_adapter_tensors, read_head, read_head_tensors, safetensors_bytes, with_ln_before_aliases,
    AdapterConfigFile, AdapterDir, AdapterLoadOptions, AdapterLoadReport, NamedTensor, WeightsFile, CONFIG_FILE, HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE,
    WEIGHTS_FILE,
};
use crate::model::adapters::{param_specs, validate_adapter_name, Adapter};
use crate::model::bert::BertModel;
use crate::model::heads::ClassificationHead;
use crate::tensor::Tensor;

/// How to save an adapter.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// Also write the adapter's head, if it has one (the library's `with_head`, default true).
    /// When no head is written, head files of an earlier save in the folder are removed, so a
    /// load does not attach a stale head.
    pub with_head: bool,
    /// `model_name` in the config files: the base model's name or path ("" when unknown, as the
    /// library writes for a model built from a config).
    pub model_name: String,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions { with_head: true, model_name: String::new() }
    }
}

/// Write `files` into `dir` all or nothing: stage every one in full, then rename them in order.
fn commit(dir: &Path, files: Vec<(&str, Vec<u8>)>) -> Result<()> {
    let staged = files.into_iter().map(|(name, bytes)| StagedFile::with_bytes(&dir.join(name), &bytes)).collect::<Result<Vec<_>>>()?;
    commit_all(staged)
}

/// Save `adapter` (and `head`) for a BERT of `bert` into `dir`, creating it if needed.
pub fn save_adapter_files(
    dir: &Path,
    adapter: &Adapter,
    head: Option<&ClassificationHead>,
    bert: &BertConfig,
    backend: &dyn Backend,
    opts: &SaveOptions,
) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::io(dir, std::io::Error::new(std::io::ErrorKind::AlreadyExists, "exists and is not a folder")));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // Temporaries a killed save left here (only ours, only of processes no longer running).
    // Best effort: a leftover that cannot be removed does not stop the save.
    let _ = clean_leftovers(dir, &[WEIGHTS_FILE, CONFIG_FILE, HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE], &[]);
    let weights = safetensors_bytes(&adapter_tensors(adapter, bert, backend)?, &dir.join(WEIGHTS_FILE))?;
    let config = adapter_config_json(adapter.name(), adapter.config(), bert.hidden_size, &opts.model_name, bert.model_type);
    let mut files: Vec<(&str, Vec<u8>)> = vec![(WEIGHTS_FILE, weights)];
    if let Some(head) = head {
        if head.name() != adapter.name() {
            return Err(Error::Input(format!("head `{}` cannot be saved with adapter `{}`: heads are named like their adapter", head.name(), adapter.name())));
        }
        let tensors = head_tensors(head, backend)?;
        if let Some((k, _, d)) = tensors.iter().find(|(_, _, d)| d.iter().any(|v| !v.is_finite())) {
            return Err(Error::Input(format!("head `{}`: tensor `{k}` holds non-finite values ({} of them); refusing to save it", head.name(), d.iter().filter(|v| !v.is_finite()).count())));
        }
        files.push((HEAD_WEIGHTS_FILE, safetensors_bytes(&tensors, &dir.join(HEAD_WEIGHTS_FILE))?));
        files.push((HEAD_CONFIG_FILE, head_config_json(head.name(), head.config(), head.hidden_size(), &opts.model_name, bert.model_type)?.into_bytes()));
    }
    files.push((CONFIG_FILE, config.into_bytes()));
    commit(dir, files)?;
    if head.is_none() {
        // A head left from an earlier save would be restored with this adapter on load.
        for f in [HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE] {
            let p = dir.join(f);
            if p.is_file() {
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
    }
    Ok(())
}

/// The tensors of `adapter` as the library saves them, in its state-dict order, without the
/// `bert.` prefix (a `BertModel` has none), `ln_before`'s LayerNorm under both of its names (see
/// [`with_ln_before_aliases`]).
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
        out.push((spec.key, t.shape().to_vec(), data));
    }
    Ok(with_ln_before_aliases(out))
}

/// A head's tensors by state-dict key (`heads.<name>.<i>.weight/bias`).
pub fn head_tensors(head: &ClassificationHead, backend: &dyn Backend) -> Result<Vec<NamedTensor>> {
    head.params().iter().map(|(k, t)| Ok((k.clone(), t.shape().to_vec(), backend.to_host(t)?))).collect()
}

/// An adapter and its head, read from a folder but not yet part of a model.
pub struct LoadedAdapter {
    pub adapter: Adapter,
    pub head: Option<ClassificationHead>,
    pub report: AdapterLoadReport,
}

impl AdapterDir {
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
    let mut host = read_adapter_tensors(cfg, weights, &expected, name, bert, opts.strict, &mut report)?;

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
    let Some(head) = read_head(dir, saved_adapter, name, opts.strict, bert.hidden_size, report)? else {
        return Ok(None);
    };
    let expected: BTreeMap<String, Vec<usize>> = ClassificationHead::expected_shapes(name, &head.file.config, bert.hidden_size).into_iter().collect();
    let mut params = BTreeMap::new();
    for (key, data) in read_head_tensors(&head, name, &expected, opts.strict, report)? {
        let t = backend.upload(data, &expected[&key])?;
        params.insert(key, t);
    }
    ClassificationHead::from_params(name, head.file.config, params).map(Some)
}

impl BertModel {
    /// Save adapter `name` (and its head, if it has one) into `dir` as the library does with
    /// `save_adapter(dir, name, use_safetensors=True)`.
    pub fn save_adapter(&self, dir: impl AsRef<Path>, name: &str) -> Result<()> {
        self.save_adapter_with(dir, name, SaveOptions::default())
    }

    /// `save_adapter` with options (whether to write the head, the `model_name` to record).
    pub fn save_adapter_with(&self, dir: impl AsRef<Path>, name: &str, opts: SaveOptions) -> Result<()> {
        let adapter = self.adapter(name).ok_or_else(|| {
            let known = self.adapter_names().join(", ");
            Error::Input(format!("no adapter named `{name}` to save (adapters: {})", if known.is_empty() { "none" } else { &known }))
        })?;
        let head = if opts.with_head { self.head(name) } else { None };
        save_adapter_files(dir.as_ref(), adapter, head, &self.config, self.backend.as_ref(), &opts)
    }

    /// Load an adapter folder (safetensors or `pytorch_adapter.bin`) with options, and its head
    /// when the folder has one. Nothing is added to the model unless everything loads.
    pub fn load_adapter_with(&mut self, dir: impl AsRef<Path>, opts: &AdapterLoadOptions) -> Result<AdapterLoadReport> {
        let folder = AdapterDir::open(dir)?;
        let name = folder.target_name(opts);
        // Checked before reading weights; the library would silently keep the old config.
        if self.adapter(name).is_some() {
            return Err(Error::Input(format!(
                "{}: an adapter named `{name}` already exists in the model (load it under another name or delete it first)",
                folder.dir.display()
            )));
        }
        let loaded = folder.load(opts, &self.config, self.backend.as_ref())?;
        let name = loaded.adapter.name().to_string();
        self.insert_adapter(loaded.adapter)?;
        if let Some(head) = loaded.head {
            if let Err(e) = self.insert_head(head) {
                let _ = self.delete_adapter(&name);
                // The head came from the folder's head files: say so.
                return Err(match e {
                    Error::Input(msg) => Error::Input(format!("{}: {msg}", folder.dir.join(crate::io::adapter_files::HEAD_CONFIG_FILE).display())),
                    other => other,
                });
            }
        }
        Ok(loaded.report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_cannot_be_staged_stops_the_whole_commit() {
        let d = tempfile::tempdir().unwrap();
        commit(d.path(), vec![("weights", b"old w".to_vec()), ("config", b"old c".to_vec())]).unwrap();
        // The second file's folder does not exist, so staging it fails after the first is staged.
        let err = commit(d.path(), vec![("weights", b"new w".to_vec()), ("missing/config", b"new c".to_vec())]).unwrap_err();
        assert!(err.to_string().contains("missing/config"), "{err}");
        assert_eq!(std::fs::read(d.path().join("weights")).unwrap(), b"old w");
        let mut left: Vec<String> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["config", "weights"], "a temporary was left behind");
    }
}
