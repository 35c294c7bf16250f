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

use bert_adapters::io::adapter_files::{CONFIG_FILE, HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE, WEIGHTS_FILE};
use bert_adapters::io::atomic::{replace_dir, write_atomic, Tree};
use bert_adapters::io::{write_safetensors, OutTensor, TensorFile};
use bert_adapters::train::{AdamW, AdamWConfig, AdamWState, LossScaler, LossScalerConfig, LossScalerState, ParamState};
use bert_adapters::{BertModel, Error, Result};

use crate::metrics::{EvalRecord, StepRecord};
use crate::train::{trained_at, SCORENN, TASKNN, TRAIN_INFO};

pub const DIR: &str = "checkpoint";
const STATE: &str = "state.json";
const MOMENTS: &str = "optimizer.safetensors";
/// 2: settings fingerprint the model's weights and parsed config (1 hashed config.json's bytes).
const FORMAT: u32 = 2;
/// The longest training time a checkpoint may record: 100 years (past it, negative or not
/// finite, `elapsed_s` is damage).
const MAX_ELAPSED_S: f64 = 100.0 * 365.25 * 24.0 * 3600.0;

/// Settings that decide the training trajectory: a resume must use the same.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub config: String,
    pub batch_size: usize,
    pub max_len: usize,
    pub lr: f64,
    /// `--lr-schedule`, `--warmup-steps`, `--weight-decay` (checkpoints from before these flags
    /// trained at their defaults).
    #[serde(default = "default_schedule")]
    pub lr_schedule: String,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// `--max-grad-norm` (0: off; checkpoints from before the flag clipped at 1).
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
    /// `--grad-accum` (checkpoints from before the flag ran whole batches).
    #[serde(default = "default_grad_accum")]
    pub grad_accum: usize,
    /// `--keep-best`'s metric (absent: the last step's adapters are the run's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_best: Option<String>,
    pub alternate: u64,
    pub seed: u64,
    /// The data file (its canonical path, for messages only) and a fingerprint of its bytes: the
    /// same data moved or spelled `./data.csv` resumes, other data does not.
    pub data: String,
    pub data_fingerprint: String,
    /// The model folder (canonical path, for messages only), a fingerprint of its parsed config
    /// (whitespace and key order do not matter) and one of its weights file's bytes.
    pub model: String,
    pub model_config_fingerprint: String,
    pub model_weights_fingerprint: String,
}

fn default_schedule() -> String {
    "constant".into()
}

fn default_weight_decay() -> f64 {
    AdamWConfig::default().weight_decay
}

fn default_grad_accum() -> usize {
    1
}

fn default_max_grad_norm() -> f64 {
    crate::step::DEFAULT_MAX_GRAD_NORM as f64
}

impl Settings {
    /// The first field in which `self` (the checkpoint's) and `run` differ, as an error.
    pub fn check_same(&self, run: &Settings, path: &Path) -> Result<()> {
        // (field, checkpoint's value, this run's value, and how each is shown): fingerprints are
        // compared alone, shown with the path they came from.
        let plain = |field: &'static str, saved: String, now: String| (field, saved.clone(), now.clone(), saved, now);
        let located = |field: &'static str, saved: &str, saved_path: &str, now: &str, now_path: &str| {
            (field, saved.to_string(), now.to_string(), format!("{saved} ({saved_path})"), format!("{now} ({now_path})"))
        };
        let fields = [
            plain("config", self.config.clone(), run.config.clone()),
            plain("batch_size", self.batch_size.to_string(), run.batch_size.to_string()),
            plain("max_len", self.max_len.to_string(), run.max_len.to_string()),
            plain("lr", self.lr.to_string(), run.lr.to_string()),
            plain("lr_schedule", self.lr_schedule.clone(), run.lr_schedule.clone()),
            plain("warmup_steps", self.warmup_steps.to_string(), run.warmup_steps.to_string()),
            plain("weight_decay", self.weight_decay.to_string(), run.weight_decay.to_string()),
            plain("max_grad_norm", self.max_grad_norm.to_string(), run.max_grad_norm.to_string()),
            plain("grad_accum", self.grad_accum.to_string(), run.grad_accum.to_string()),
            plain("keep_best", self.keep_best.clone().unwrap_or_else(|| "none".into()), run.keep_best.clone().unwrap_or_else(|| "none".into())),
            plain("alternate", self.alternate.to_string(), run.alternate.to_string()),
            plain("seed", self.seed.to_string(), run.seed.to_string()),
            located("data_fingerprint", &self.data_fingerprint, &self.data, &run.data_fingerprint, &run.data),
            located("model_config_fingerprint", &self.model_config_fingerprint, &self.model, &run.model_config_fingerprint, &run.model),
            located("model_weights_fingerprint", &self.model_weights_fingerprint, &self.model, &run.model_weights_fingerprint, &run.model),
        ];
        for (field, saved, now, saved_shown, now_shown) in fields {
            if saved != now {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    field: field.into(),
                    msg: format!("the checkpoint was trained with {saved_shown}, this run has {now_shown}; resume with the same settings, or drop --resume to start afresh"),
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
    /// An f16 run's loss scaler (absent in f32/bf16 runs and in checkpoints from before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    loss_scaler: Option<LossScalerState>,
    /// The run length the learning-rate schedule was following (absent in checkpoints from before
    /// schedules, which were constant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    schedule_steps: Option<u64>,
    /// With `--keep-best`: the best validation so far (its adapters are in `<out>/best/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    best: Option<BestRecord>,
}

/// The step and value of the best validation so far (`--keep-best`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BestRecord {
    pub step: u64,
    pub value: f64,
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
    /// An f16 run's loss scaler, as saved (its state checked against the default policy).
    pub loss_scaler: Option<LossScaler>,
    /// The run length the learning-rate schedule followed when this was saved.
    pub schedule_steps: Option<u64>,
    pub best: Option<BestRecord>,
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
    pub loss_scaler: Option<LossScalerState>,
    pub schedule_steps: u64,
    pub best: Option<BestRecord>,
}

/// What `save_adapter` writes into an adapter folder, and `train` beside it.
pub static ADAPTER_TREE: Tree = Tree { files: &[CONFIG_FILE, WEIGHTS_FILE, HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE, TRAIN_INFO], dirs: &[] };
/// What `--keep-best`'s `<out>/best/` holds: the best validation's adapters.
pub static BEST_TREE: Tree = Tree { files: &[], dirs: &[(SCORENN, &ADAPTER_TREE), (TASKNN, &ADAPTER_TREE)] };
/// What a checkpoint folder holds.
pub static CHECKPOINT_TREE: Tree = Tree { files: &[STATE, MOMENTS], dirs: &[(SCORENN, &ADAPTER_TREE), (TASKNN, &ADAPTER_TREE)] };

fn damaged(path: PathBuf, msg: String) -> Error {
    Error::Malformed { path, msg: format!("{msg}: the checkpoint is damaged (restore it, or start afresh without --resume)") }
}

/// `damaged`, naming the field of `path` at fault.
fn damaged_field(path: &Path, field: impl Into<String>, msg: String) -> Error {
    Error::Config { path: path.to_path_buf(), field: field.into(), msg: format!("{msg}: the checkpoint is damaged (restore it, or start afresh without --resume)") }
}

/// `damaged` for an error that may already name `path`.
fn damaged_by(path: PathBuf, e: Error) -> Error {
    let text = e.to_string();
    let msg = text.strip_prefix(&format!("{}: ", path.display())).unwrap_or(&text).to_string();
    damaged(path, msg)
}

/// Save the checkpoint into `<out>/checkpoint`.
pub fn save(out: &Path, model: &BertModel, snap: &Snapshot) -> Result<()> {
    replace_dir(&out.join(DIR), &CHECKPOINT_TREE, |dir| {
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
            loss_scaler: snap.loss_scaler,
            schedule_steps: Some(snap.schedule_steps),
            best: snap.best,
        };
        let path = dir.join(STATE);
        let json = serde_json::to_string_pretty(&state).map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
        write_atomic(&path, json.as_bytes())
    })
}

/// The checkpoint folder under `out`, if there is one (a copy a crash left between the two
/// renames of a swap is put back by `outdir::prepare` before this is asked).
pub fn find(out: &Path) -> Option<PathBuf> {
    let dir = out.join(DIR);
    dir.join(STATE).is_file().then_some(dir)
}

/// The max length of the run whose checkpoint holds the adapter folder `adapter`
/// (`<out>/checkpoint/tasknn`): `settings.max_len` of the `state.json` beside it, or `None` when
/// there is none (the folder is not in a checkpoint).
pub fn max_len_of(adapter: &Path) -> Result<Option<usize>> {
    let Some(path) = adapter.parent().map(|dir| dir.join(STATE)).filter(|p| p.is_file()) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Io { path: path.clone(), source: e })?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Malformed { path: path.clone(), msg: format!("not valid JSON: {e}") })?;
    match value.get("settings").and_then(|s| s.get("max_len")) {
        None => Ok(None),
        Some(m) => m.as_u64().map(|m| Some(m as usize)).ok_or_else(|| Error::Config { path, field: "settings.max_len".into(), msg: format!("expected an integer, got {m}") }),
    }
}

/// Read the checkpoint in `dir` without touching the model (to check settings and labels first).
pub fn read(dir: &Path) -> Result<Restored> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Io { path: path.clone(), source: e })?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| damaged(path.clone(), format!("not JSON ({e})")))?;
    // The format first: an older checkpoint is not a damaged one.
    match value.get("format").and_then(serde_json::Value::as_u64) {
        Some(f) if f == u64::from(FORMAT) => {}
        Some(f) => {
            return Err(Error::Config { path, field: "format".into(), msg: format!("{f} is not the supported {FORMAT} (written by another version of bert-adapters); start afresh without --resume") })
        }
        None => return Err(damaged(path, "no `format` field".into())),
    }
    let state: StateFile = serde_json::from_value(value).map_err(|e| damaged(path.clone(), format!("not a checkpoint state ({e})")))?;
    if state.labels.len() < 2 || state.optimizers.keys().map(String::as_str).ne([SCORENN, TASKNN]) {
        return Err(damaged(path, format!("{} labels and optimizers {:?}; expected at least 2 labels and optimizers of scorenn and tasknn", state.labels.len(), state.optimizers.keys().collect::<Vec<_>>())));
    }
    check_consistent(&state, &path)?;
    let moments = TensorFile::open(dir.join(MOMENTS)).map_err(|e| damaged_by(dir.join(MOMENTS), e))?;
    let mut optimizers = BTreeMap::new();
    for (name, meta) in state.optimizers {
        let mut params = BTreeMap::new();
        for (key, (step, shape)) in meta.params {
            let read = |what: &str| -> Result<Vec<f32>> {
                let tensor = format!("{name}.{what}.{key}");
                let (data, got) = moments.read_f32(&tensor).map_err(|e| damaged_by(dir.join(MOMENTS), e))?;
                if got != shape {
                    return Err(damaged(dir.join(MOMENTS), format!("tensor `{tensor}` has shape {got:?}, state.json says {shape:?}")));
                }
                // Second moments are squares: negative or non-finite ones only come from damage.
                let bad = data.iter().position(|v| !v.is_finite() || (what == "exp_avg_sq" && *v < 0.0));
                if let Some(i) = bad {
                    return Err(damaged(dir.join(MOMENTS), format!("tensor `{tensor}` holds {} at element {i}", data[i])));
                }
                Ok(data)
            };
            let (exp_avg, exp_avg_sq) = (read("exp_avg")?, read("exp_avg_sq")?);
            params.insert(key, ParamState { step, shape, exp_avg, exp_avg_sq });
        }
        let optimizer = AdamW::from_state(AdamWState { config: meta.config, steps: meta.steps, params }).map_err(|e| damaged(path.clone(), format!("optimizer `{name}`: {e}")))?;
        optimizers.insert(name, optimizer);
    }
    let loss_scaler = match state.loss_scaler {
        Some(saved) => Some(LossScaler::resume(LossScalerConfig::default(), saved).map_err(|e| damaged(path.clone(), e.to_string()))?),
        None => None,
    };
    Ok(Restored {
        step: state.step,
        settings: state.settings,
        labels: state.labels,
        optimizers,
        steps: state.steps,
        evals: state.evals,
        elapsed_s: state.elapsed_s,
        loss_scaler,
        schedule_steps: state.schedule_steps,
        best: state.best,
    })
}

/// `v` for a message: plain when short, in exponent form when huge or tiny (a tampered 1e300
/// is not shown as 301 digits).
fn num(v: f64) -> String {
    if v == 0.0 || (1e-4..1e6).contains(&v.abs()) {
        format!("{v}")
    } else {
        format!("{v:e}")
    }
}

/// A value a run records from an f32 (a step's loss, a mean of those): finite, within f32's range.
fn f32_range(v: f64) -> bool {
    v.is_finite() && v.abs() <= f64::from(f32::MAX)
}

/// What state.json records must agree with itself and be values a run writes: one step record
/// per step done, of the adapter the alternation trains at that step; optimizers with the
/// hyper-parameters `train` gives them and no more updates than their adapter's steps; a history
/// of finite values in range. Anything else is damage, reported with the field at fault.
fn check_consistent(state: &StateFile, path: &Path) -> Result<()> {
    let bad = |field: String, msg: String| Err(damaged_field(path, field, msg));
    let s = &state.settings;
    if s.alternate == 0 {
        return bad("settings.alternate".into(), "0 steps per adapter".into());
    }
    if !(0.0..=MAX_ELAPSED_S).contains(&state.elapsed_s) {
        return bad("elapsed_s".into(), format!("{} seconds is not a training time (0 to {MAX_ELAPSED_S:e})", num(state.elapsed_s)));
    }
    if state.steps.len() as u64 != state.step {
        return bad("step".into(), format!("{} steps done, but `steps` records {}", state.step, state.steps.len()));
    }
    let max_tokens = (s.batch_size as u64).saturating_mul(s.max_len as u64);
    for (i, r) in state.steps.iter().enumerate() {
        let field = |name: &str| format!("steps[{i}].{name}");
        let want = trained_at(i as u64, s.alternate);
        if r.step != i as u64 + 1 {
            return bad(field("step"), format!("{}, expected {} (one record per step, in order)", r.step, i + 1));
        }
        if r.adapter != want {
            return bad(field("adapter"), format!("`{}`, but step {} trains {want} (alternating every {})", r.adapter, i + 1, s.alternate));
        }
        for (name, v) in [("loss", r.loss), ("ce", r.ce)] {
            if !f32_range(v) {
                return bad(field(name), format!("{} is not a loss a step records (finite, within float32's range)", num(v)));
            }
        }
        if r.tokens > max_tokens {
            return bad(field("tokens"), format!("{} tokens, more than a batch of {} texts × {} holds", r.tokens, s.batch_size, s.max_len));
        }
    }
    // `train` gives both optimizers AdamW's default betas and eps and --weight-decay; the learning
    // rate is set by the schedule before each step, so a saved one only has to be one.
    let defaults = AdamWConfig::default();
    let skipped = state.loss_scaler.map_or(0, |l| l.skipped);
    let mut updates = skipped;
    for (name, meta) in &state.optimizers {
        let c = &meta.config;
        let field = |f: &str| format!("optimizers.{name}.config.{f}");
        if c.betas != defaults.betas {
            return bad(field("betas"), format!("[{}, {}], but training uses [{}, {}]", num(c.betas.0), num(c.betas.1), defaults.betas.0, defaults.betas.1));
        }
        if c.eps != defaults.eps {
            return bad(field("eps"), format!("{}, but training uses {:e}", num(c.eps), defaults.eps));
        }
        if c.weight_decay != s.weight_decay {
            return bad(field("weight_decay"), format!("{}, but settings.weight_decay is {}", num(c.weight_decay), num(s.weight_decay)));
        }
        if !(c.lr.is_finite() && c.lr >= 0.0) {
            return bad(field("lr"), format!("{} is not a learning rate", num(c.lr)));
        }
        let scheduled = state.steps.iter().filter(|r| r.adapter == *name).count() as u64;
        if meta.steps > scheduled {
            return bad(format!("optimizers.{name}.steps"), format!("{} updates, but `steps` records {scheduled} steps of {name}", meta.steps));
        }
        updates = updates.saturating_add(meta.steps);
        if let Some((key, (step, _))) = meta.params.iter().find(|(_, (step, _))| *step > meta.steps) {
            return bad(format!("optimizers.{name}.params.{key}"), format!("step {step}, more than the optimizer's {} updates", meta.steps));
        }
    }
    if updates > state.step {
        return bad("loss_scaler.skipped".into(), format!("{skipped} skipped steps and {} updates, more than the {} steps done", updates - skipped, state.step));
    }
    if let Some(t) = state.schedule_steps.filter(|&t| t < state.step) {
        return bad("schedule_steps".into(), format!("{t}, fewer than the {} steps done", state.step));
    }
    for (i, e) in state.evals.iter().enumerate() {
        let field = |name: &str| format!("evals[{i}].{name}");
        if e.split != "validation" && e.split != "test" {
            return bad(field("split"), format!("`{}`, expected validation or test", e.split));
        }
        if e.step == 0 || e.step > state.step || (e.split == "test" && e.step != state.step) {
            return bad(field("step"), format!("a {} at step {}, but the run stands at step {}", e.split, e.step, state.step));
        }
        if e.examples == 0 {
            return bad(field("examples"), "0 examples evaluated".into());
        }
        for (name, v) in [("accuracy", e.accuracy), ("macro_f1", e.macro_f1)] {
            if !(0.0..=1.0).contains(&v) {
                return bad(field(name), format!("{} is not a fraction (0 to 1)", num(v)));
            }
        }
        for (name, v) in [("tasknn_loss", e.tasknn_loss), ("tasknn_ce", e.tasknn_ce), ("scorenn_loss", e.scorenn_loss)] {
            if let Some(v) = v.filter(|v| !f32_range(*v)) {
                return bad(field(name), format!("{} is not a mean of step losses (finite, within float32's range)", num(v)));
            }
        }
        if !(e.tokens_per_s.is_finite() && e.tokens_per_s >= 0.0) {
            return bad(field("tokens_per_s"), format!("{} is not a speed", num(e.tokens_per_s)));
        }
        if !(0.0..=MAX_ELAPSED_S).contains(&e.elapsed_s) {
            return bad(field("elapsed_s"), format!("{} seconds is not a training time (0 to {MAX_ELAPSED_S:e})", num(e.elapsed_s)));
        }
    }
    if let Some(b) = state.best {
        if b.step == 0 || b.step > state.step {
            return bad("best.step".into(), format!("{}, but the run stands at step {}", b.step, state.step));
        }
        if !(0.0..=1.0).contains(&b.value) {
            return bad("best.value".into(), format!("{} is not a fraction (0 to 1)", num(b.value)));
        }
    }
    Ok(())
}
