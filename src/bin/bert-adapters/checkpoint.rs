//! The training checkpoint: both adapters with their heads, both optimizer states, the step, the
//! seed (every random draw is a pure function of seed and step, so that is the whole RNG state),
//! the label map, the settings a resume must share, and the history for metrics.csv and the plot.
//!
//! Layout of `<out>/checkpoint/`: `state.json`, `optimizer.safetensors` (the AdamW moments,
//! `<adapter>.exp_avg.<key>` / `<adapter>.exp_avg_sq.<key>`), and `scorenn/`, `tasknn/` as
//! `save_adapter` writes them. It is written beside and then renamed into place, so a crash
//! leaves the previous checkpoint or the new one, never a mix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use bert_adapters::io::tensor_file::write_atomic;
use bert_adapters::io::{write_safetensors, OutTensor, TensorFile};
use bert_adapters::train::{AdamW, AdamWConfig, AdamWState, ParamState};
use bert_adapters::{BertModel, Error, Result};

use crate::metrics::{EvalRecord, StepRecord};

pub const DIR: &str = "checkpoint";
const STATE: &str = "state.json";
const MOMENTS: &str = "optimizer.safetensors";
const FORMAT: u32 = 1;

/// Settings that decide the training trajectory: a resume must use the same.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub config: String,
    pub batch_size: usize,
    pub max_len: usize,
    pub lr: f64,
    pub alternate: u64,
    pub seed: u64,
    /// The data file as given, and a fingerprint of its bytes.
    pub data: String,
    pub data_fingerprint: String,
    /// Fingerprint of the model's config.json.
    pub model_fingerprint: String,
}

impl Settings {
    /// The first field in which `self` (the checkpoint's) and `run` differ, as an error.
    pub fn check_same(&self, run: &Settings, path: &Path) -> Result<()> {
        let fields: [(&str, String, String); 8] = [
            ("config", self.config.clone(), run.config.clone()),
            ("batch_size", self.batch_size.to_string(), run.batch_size.to_string()),
            ("max_len", self.max_len.to_string(), run.max_len.to_string()),
            ("lr", self.lr.to_string(), run.lr.to_string()),
            ("alternate", self.alternate.to_string(), run.alternate.to_string()),
            ("seed", self.seed.to_string(), run.seed.to_string()),
            ("data_fingerprint", format!("{} ({})", self.data_fingerprint, self.data), format!("{} ({})", run.data_fingerprint, run.data)),
            ("model_fingerprint", self.model_fingerprint.clone(), run.model_fingerprint.clone()),
        ];
        for (field, saved, now) in fields {
            if saved != now {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    field: field.into(),
                    msg: format!("the checkpoint was trained with {saved}, this run has {now}; resume with the same settings, or drop --resume to start afresh"),
                });
            }
        }
        Ok(())
    }
}

/// An optimizer without its moments (those go to optimizer.safetensors).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct OptimizerMeta {
    config: AdamWConfig,
    steps: u64,
    /// Per parameter: its own step count and shape.
    params: BTreeMap<String, (u64, Vec<usize>)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct StateFile {
    format: u32,
    step: u64,
    settings: Settings,
    labels: Vec<String>,
    optimizers: BTreeMap<String, OptimizerMeta>,
    steps: Vec<StepRecord>,
    evals: Vec<EvalRecord>,
    elapsed_s: f64,
}

/// What a resume gets back (the adapters and heads go straight into the model).
pub struct Restored {
    pub step: u64,
    pub settings: Settings,
    pub labels: Vec<String>,
    pub optimizers: BTreeMap<String, AdamW>,
    pub steps: Vec<StepRecord>,
    pub evals: Vec<EvalRecord>,
    pub elapsed_s: f64,
}

/// What a save needs besides the model.
pub struct Snapshot<'a> {
    pub step: u64,
    pub settings: &'a Settings,
    pub labels: &'a [String],
    pub optimizers: &'a BTreeMap<String, AdamW>,
    pub steps: &'a [StepRecord],
    pub evals: &'a [EvalRecord],
    pub elapsed_s: f64,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Io { path: path.to_path_buf(), source: e }
}

/// Fill `dest` by `fill(staging folder)`, then swap it into place: the old folder is renamed
/// away first and removed last, so `dest` is always either complete or (briefly) absent with
/// the complete old one beside it.
pub fn replace_dir(dest: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "dir".into());
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let stage = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    for p in [&stage, &old] {
        if p.exists() {
            std::fs::remove_dir_all(p).map_err(io_err(p))?;
        }
    }
    std::fs::create_dir_all(&stage).map_err(io_err(&stage))?;
    if let Err(e) = fill(&stage) {
        let _ = std::fs::remove_dir_all(&stage);
        return Err(e);
    }
    if dest.exists() {
        std::fs::rename(dest, &old).map_err(io_err(dest))?;
    }
    std::fs::rename(&stage, dest).map_err(io_err(dest))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    Ok(())
}

/// Save the checkpoint into `<out>/checkpoint`.
pub fn save(out: &Path, model: &BertModel, snap: &Snapshot) -> Result<()> {
    replace_dir(&out.join(DIR), |dir| {
        let mut moments = Vec::new();
        let mut optimizers = BTreeMap::new();
        for (name, opt) in snap.optimizers {
            model.save_adapter(dir.join(name), name)?;
            let state = opt.state();
            let mut params = BTreeMap::new();
            for (key, p) in state.params {
                moments.push((format!("{name}.exp_avg.{key}"), OutTensor::F32 { shape: p.shape.clone(), data: p.exp_avg }));
                moments.push((format!("{name}.exp_avg_sq.{key}"), OutTensor::F32 { shape: p.shape.clone(), data: p.exp_avg_sq }));
                params.insert(key, (p.step, p.shape));
            }
            optimizers.insert(name.clone(), OptimizerMeta { config: state.config, steps: state.steps, params });
        }
        write_safetensors(&dir.join(MOMENTS), &moments, None)?;
        let state = StateFile {
            format: FORMAT,
            step: snap.step,
            settings: snap.settings.clone(),
            labels: snap.labels.to_vec(),
            optimizers,
            steps: snap.steps.to_vec(),
            evals: snap.evals.to_vec(),
            elapsed_s: snap.elapsed_s,
        };
        let path = dir.join(STATE);
        let json = serde_json::to_string_pretty(&state).map_err(|e| Error::Malformed { path: path.clone(), msg: e.to_string() })?;
        write_atomic(&path, json.as_bytes())
    })
}

/// The checkpoint folder under `out`, if there is one (also the one a crash between the two
/// renames of `replace_dir` left beside it).
pub fn find(out: &Path) -> Option<PathBuf> {
    let dir = out.join(DIR);
    if dir.join(STATE).is_file() {
        return Some(dir);
    }
    let prefix = format!(".{DIR}.old-");
    std::fs::read_dir(out).ok()?.flatten().map(|e| e.path()).find(|p| {
        p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)) && p.join(STATE).is_file()
    })
}

/// Read the checkpoint in `dir` without touching the model (to check settings and labels first).
pub fn read(dir: &Path) -> Result<Restored> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let state: StateFile = serde_json::from_str(&text).map_err(|e| Error::Malformed { path: path.clone(), msg: format!("not a checkpoint state: {e}") })?;
    if state.format != FORMAT {
        return Err(Error::Config { path, field: "format".into(), msg: format!("{} is not the supported {FORMAT}", state.format) });
    }
    let moments = TensorFile::open(dir.join(MOMENTS))?;
    let mut optimizers = BTreeMap::new();
    for (name, meta) in state.optimizers {
        let mut params = BTreeMap::new();
        for (key, (step, shape)) in meta.params {
            let read = |what: &str| -> Result<Vec<f32>> {
                let tensor = format!("{name}.{what}.{key}");
                let (data, got) = moments.read_f32(&tensor)?;
                if got != shape {
                    return Err(Error::Tensor { path: dir.join(MOMENTS), name: tensor, msg: format!("shape {got:?}, state.json says {shape:?}") });
                }
                Ok(data)
            };
            let (exp_avg, exp_avg_sq) = (read("exp_avg")?, read("exp_avg_sq")?);
            params.insert(key, ParamState { step, shape, exp_avg, exp_avg_sq });
        }
        optimizers.insert(name, AdamW::from_state(AdamWState { config: meta.config, steps: meta.steps, params })?);
    }
    Ok(Restored {
        step: state.step,
        settings: state.settings,
        labels: state.labels,
        optimizers,
        steps: state.steps,
        evals: state.evals,
        elapsed_s: state.elapsed_s,
    })
}
