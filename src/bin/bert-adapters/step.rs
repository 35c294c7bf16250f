//! One training step of `train`: the objective of the adapter being trained, launched, replayed
//! from a captured graph on a CUDA device ([`StepGraphs`]), or all-reduced among ranks; and what a
//! failed step means.

use std::collections::{HashMap, HashSet};

use bert_adapters::dist::DataParallel;
use bert_adapters::model::graph::TrainStepGraph;
use bert_adapters::model::step::{StepValues, TrainStepConfig};
use bert_adapters::train::{AdamW, LossScaler, Objective, ScaledStep};
use bert_adapters::{BertModel, Error, InputBatch, Result};

use crate::ranks::Ranks;
use crate::train::{SCORENN, TASKNN};

/// `train`'s default gradient-norm clipping (torch `clip_grad_norm_`; `--max-grad-norm`).
pub const DEFAULT_MAX_GRAD_NORM: f32 = 1.0;

/// Which adapter a step trains, its clipping (`None`: off) and in how many micro-batches it
/// runs (`--grad-accum`; 1: the whole batch at once).
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub adapter: &'a str,
    pub max_grad_norm: Option<f32>,
    pub micro_batches: usize,
}

/// One training step: a Parallel forward, the objective of the adapter being trained, its
/// gradients through its head and branch only, clipping, and its AdamW update, all on the
/// model's device; the loss and gradient norm are read back because the run logs every step.
/// A non-finite loss or gradient norm (no update was applied) is located by a checked forward
/// of the same batch when it can be.
///
/// Among several ranks, `batch` and `labels` are this rank's `rows` of a global batch of
/// `global` rows: the gradients are all-reduced inside the step, and the loss and the stop
/// request (`stop`, this rank's Ctrl-C) after it; returns the global values and whether any
/// rank asked to stop.
///
/// With a `scaler` (f16 training) the step is loss-scaled at its current scale, and a finite
/// loss with a non-finite gradient norm is an overflow the scaler handles: the step updated
/// nothing, the scale is lowered, and the values come back with that norm (every rank sees the
/// same all-reduced norm, so all skip together).
#[allow(clippy::too_many_arguments)]
pub fn step(model: &mut BertModel, graphs: &mut StepGraphs, batch: &InputBatch, labels: &[usize], target: Target<'_>, optimizer: &mut AdamW, ranks: &Ranks, rows: &std::ops::Range<usize>, global: usize, stop: bool, scaler: Option<&mut LossScaler>) -> Result<(StepValues, bool)> {
    let adapter = target.adapter;
    let names: Vec<String> = model.active_adapters().map(|s| s.names().to_vec()).unwrap_or_default();
    if names != [SCORENN, TASKNN] {
        return Err(Error::Internal(format!("expected Parallel(scorenn, tasknn), got {names:?}")));
    }
    let objective = if adapter == TASKNN {
        Objective::TASKNN
    } else {
        Objective::SCORENN
    };
    let cfg = TrainStepConfig { objective, trained: adapter.to_string(), max_grad_norm: target.max_grad_norm };
    // The gradients over NCCL on GPU ranks built with it; the loss and flags below over MPI.
    let dp = DataParallel { comm: ranks.grad_comm(), rows: rows.clone(), global_rows: global };
    if let Some(scaler) = &scaler {
        model.set_loss_scale(scaler.scale())?;
    }
    let mine = if target.micro_batches > 1 {
        // Gradient accumulation: consecutive row ranges of this (padded) batch, launched one
        // after another (not captured), one update.
        let parts = (0..target.micro_batches)
            .map(|j| {
                let r = bert_adapters::dist::shard(batch.batch, j, target.micro_batches);
                Ok((batch.rows(r.clone())?, labels[r].to_vec()))
            })
            .collect::<Result<Vec<_>>>()?;
        let parts: Vec<(&InputBatch, &[usize])> = parts.iter().map(|(b, l)| (b, l.as_slice())).collect();
        model.train_step_accumulated(&parts, &cfg, optimizer, ranks.is_parallel().then_some(&dp))?.read_unchecked(model.backend().as_ref())?
    } else if ranks.is_parallel() {
        model.train_step_data_parallel(batch, labels, &cfg, optimizer, &dp)?.read_unchecked(model.backend().as_ref())?
    } else {
        graphs.train_step(model, batch, labels, &cfg, optimizer)?
    };
    let (loss, ce, stop) = ranks.reduce_step(mine.loss, mine.ce, dp.weight(), stop)?;
    if let Some(scaler) = scaler.filter(|_| loss.is_finite() && ce.is_finite()) {
        if scaler.update(mine.grad_norm)? == ScaledStep::Skipped {
            optimizer.uncount_skipped_step();
            return Ok((StepValues { loss, ce, grad_norm: mine.grad_norm }, stop));
        }
    }
    match (StepValues { loss, ce, grad_norm: mine.grad_norm }).checked() {
        Ok(v) => Ok((v, stop)),
        Err(Error::NonFinite { at }) => match model.forward_train(batch) {
            Err(located @ Error::NonFinite { .. }) => Err(located),
            _ => Err(Error::NonFinite { at }),
        },
        Err(e) => Err(e),
    }
}

/// Captured training steps on a CUDA backend (`BertModel::capture_train_step`): the second
/// time an (adapter, batch, length) comes up it is captured, and every later step at that key
/// replays the graph (one `cuGraphLaunch` on a GPU) with its new batch, labels, dropout seed and
/// learning rate, bit-identical to launching the step (tests/cuda_graph.rs, train_cli.rs). The
/// first sighting launches, because a capture reuses the memory an uncaptured step at the shape
/// left in the pool. At most [`MAX_STEP_GRAPHS`] are kept (each holds its step's scratch memory);
/// other keys launch. A key whose capture fails launches from then on; a replay refused because
/// the training state was rebuilt drops the graph and launches.
pub struct StepGraphs {
    enabled: bool,
    seen: HashSet<(String, usize, usize)>,
    graphs: HashMap<(String, usize, usize), TrainStepGraph>,
    failed: HashSet<(String, usize, usize)>,
    /// Steps of this session that replayed a graph.
    pub replayed: u64,
}

/// The main job has 4 length buckets (16..64) × 2 adapters.
const MAX_STEP_GRAPHS: usize = 8;

impl StepGraphs {
    pub fn new(enabled: bool) -> Self {
        StepGraphs { enabled, seen: HashSet::new(), graphs: HashMap::new(), failed: HashSet::new(), replayed: 0 }
    }

    /// One training step, replayed where a graph exists or can be captured, else launched;
    /// returns its loss and gradient norm (read back, unchecked).
    fn train_step(&mut self, model: &mut BertModel, batch: &InputBatch, labels: &[usize], cfg: &TrainStepConfig, optimizer: &mut AdamW) -> Result<StepValues> {
        let key = (cfg.trained.clone(), batch.batch, batch.seq_len);
        let be = model.backend().clone();
        if !self.enabled || be.gpu().is_none() || self.failed.contains(&key) {
            return model.train_step(batch, labels, cfg, optimizer)?.read_unchecked(be.as_ref());
        }
        if !self.graphs.contains_key(&key) {
            if !self.seen.contains(&key) || self.graphs.len() >= MAX_STEP_GRAPHS {
                self.seen.insert(key);
                return model.train_step(batch, labels, cfg, optimizer)?.read_unchecked(be.as_ref());
            }
            match model.capture_train_step(batch, labels, cfg, optimizer) {
                Ok(graph) => {
                    self.graphs.insert(key.clone(), graph);
                }
                Err(_) => {
                    // The capture ran nothing; this key launches from now on.
                    self.failed.insert(key);
                    return model.train_step(batch, labels, cfg, optimizer)?.read_unchecked(be.as_ref());
                }
            }
        }
        let Some(graph) = self.graphs.get(&key) else { return Err(Error::Internal("a captured training step vanished".into())) };
        match model.replay_train_step(graph, batch, labels, optimizer) {
            Ok(out) => {
                self.replayed += 1;
                out.read_unchecked(be.as_ref())
            }
            Err(Error::Input(_)) => {
                // The training state was rebuilt since the capture (checked before any work).
                self.graphs.remove(&key);
                model.train_step(batch, labels, cfg, optimizer)?.read_unchecked(be.as_ref())
            }
            Err(e) => Err(e),
        }
    }
}

/// What a resumed session's weights overflowing before its first update means.
pub const RESUMED_OVERFLOW: &str = "the weights this run resumed from (the checkpoint's adapters and heads, or the base model's) overflow float32 on this data";

/// What failed step `step` of a session that started at step `start` means: non-finite values
/// before any update of the session come from the model, the checkpoint or the data (no learning
/// rate is to blame); after updates, training has diverged.
pub fn step_failed(e: Error, step: u64, start: u64) -> Error {
    match e {
        Error::NonFinite { at } if step == 0 => Error::NonFinite { at: format!("{at}, at step 1 before any update: the base model's weights overflow float32 on this data") },
        Error::NonFinite { at } if step == start => Error::NonFinite { at: format!("{at}, at step {}, before any update of this session: {RESUMED_OVERFLOW}", step + 1) },
        Error::NonFinite { at } => Error::NonFinite { at: format!("{at} at step {}: training has diverged (try a lower --lr)", step + 1) },
        // A bug stays a bug: reported as internal, not as bad input.
        Error::Internal(msg) => Error::Internal(format!("step {}: {msg}", step + 1)),
        // Said once: "invalid input: step N: …", not "…: step N: invalid input: …".
        Error::Input(msg) => Error::Input(format!("step {}: {msg}", step + 1)),
        other => Error::Input(format!("step {}: {other}", step + 1)),
    }
}
