//! Saving adapters in AdapterHub's folder format and loading them with their heads.
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

use std::path::Path;

use crate::backend::Backend;
use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::io::atomic::{clean_leftovers, commit_all, StagedFile};
use crate::io::adapter_files::{
    adapter_config_json, adapter_tensors, head_config_json, head_tensors, safetensors_bytes, AdapterDir, AdapterLoadOptions,
    AdapterLoadReport, CONFIG_FILE, HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE, WEIGHTS_FILE,
};
use crate::model::adapters::Adapter;
use crate::model::bert::BertModel;
use crate::model::heads::ClassificationHead;

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
    let config = adapter_config_json(adapter.name(), adapter.config(), bert.hidden_size, &opts.model_name);
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
        files.push((HEAD_CONFIG_FILE, head_config_json(head, &opts.model_name)?.into_bytes()));
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
                return Err(e);
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
