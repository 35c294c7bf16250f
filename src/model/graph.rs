//! The training step as one captured graph (issue 14): [`BertModel::capture_train_step`] records
//! a whole `train_step` (forward, heads, objective, backward, clipping, AdamW) on a CUDA backend
//! without running it, and [`BertModel::replay_train_step`] runs it again with a new batch,
//! labels, dropout seed and learning rate written into the fixed buffers it reads. On a GPU that
//! is one `cuGraphLaunch` per step; on cuda-sim the recorded launch list, so CI proves that the
//! captured step equals the launched one bit for bit.
//!
//! Why it can be captured: a step reads nothing back (the loss and norm stay on the device), its
//! descriptor tables are cached on the device by content (`Gpu::upload_table`), its buffers
//! come from the memory pool (`Gpu::alloc`), and what changes per step is read by the kernels
//! from device memory (the dropout seed, AdamW's step counts and learning rate). So the capture
//! must follow one uncaptured `train_step` at the same shape, with that step's output dropped.

use crate::error::{Error, Result};
use crate::io::InputBatch;
use crate::model::bert::{mask_bias, BertModel, InputBuffers};
use crate::model::step::{TrainStepConfig, TrainStepOutput};
use crate::tensor::Tensor;
use crate::train::optim::AdamW;
use crate::cuda::graph::LaunchGraph;

/// A captured training step (see the module docs). It keeps every buffer its launches use
/// alive, so a replay never writes freed memory; a replay refuses a model or optimizer whose
/// training state was rebuilt since the capture (capture again then).
pub struct TrainStepGraph {
    graph: LaunchGraph,
    output: TrainStepOutput,
    batch: usize,
    seq_len: usize,
    classes: usize,
    trained: String,
    setup: Vec<String>,
    dropout: bool,
    /// The loss scale the launches were recorded with (an argument baked into them).
    loss_scale: f32,
    updates: bool,
    inputs: InputBuffers,
    labels: Tensor,
    /// The trained arena's parameters and gradients, the optimizer's device state, the seed
    /// buffer: compared at replay, and kept alive with every adapter and head tensor the
    /// launches read.
    arena: [Tensor; 2],
    optimizer: Vec<Tensor>,
    seed: Option<Tensor>,
    /// Every adapter and head tensor of the setup the launches read, in [`BertModel::setup_params`]
    /// order: compared at replay (an adapter whose arena was built after the capture has moved).
    kept: Vec<Tensor>,
}

impl std::fmt::Debug for TrainStepGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainStepGraph").field("trained", &self.trained).field("batch", &self.batch).field("seq_len", &self.seq_len).field("graph", &self.graph).finish()
    }
}

impl TrainStepGraph {
    /// The captured device work (its recorded operations on cuda-sim).
    pub fn launch_graph(&self) -> &LaunchGraph {
        &self.graph
    }
    /// The step's outputs, rewritten by every replay.
    pub fn output(&self) -> &TrainStepOutput {
        &self.output
    }
}

fn same(a: &[Tensor], b: &[Tensor]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.shares_storage(y))
}

impl BertModel {
    /// Records one `train_step` of `cfg.trained` at `batch`'s shape as a graph, without running
    /// it (the batch and labels only fix the shape; pass them again to
    /// [`BertModel::replay_train_step`] to train on them). Needs a CUDA backend, and one
    /// uncaptured `train_step` at this shape and setup first, whose output is dropped: the
    /// capture reuses the memory and device tables that step left.
    pub fn capture_train_step(&mut self, batch: &InputBatch, labels: &[usize], cfg: &TrainStepConfig, optimizer: &mut AdamW) -> Result<TrainStepGraph> {
        let be = self.backend.clone();
        let gpu = be.gpu().ok_or_else(|| Error::Unsupported(format!("capture_train_step: graph capture needs a CUDA backend (cuda or cuda-sim), not {}", be.name())))?;
        if !self.arenas.contains_key(&cfg.trained) || optimizer.device_buffers().is_empty() {
            return Err(Error::Input(format!(
                "capture_train_step: run one train_step of `{}` at this shape with this optimizer first (the capture reuses what it allocated)",
                cfg.trained
            )));
        }
        if self.dropout_seed.is_some() && self.seed_buffer.is_none() {
            return Err(Error::Unsupported("capture_train_step: the dropout seed is not in a device buffer (set_dropout could not write it), so a replay could not change it".into()));
        }
        // Stage what the captured step reads from fixed buffers: the inputs, the labels, the
        // learning rate. (The dropout seed is in the model's seed buffer already.)
        let inputs = self.input_buffers(batch)?;
        self.stage_labels(labels)?;
        optimizer.stage_lr()?;
        let steps_before = optimizer.steps();
        gpu.begin_capture()?;
        self.capturing = true;
        let recorded = self.train_step(batch, labels, cfg, optimizer);
        self.capturing = false;
        let graph = gpu.end_capture();
        // The capture ran the step's host code but no kernel: nothing was updated.
        optimizer.set_step_count(steps_before);
        let (output, graph) = (recorded?, graph?);
        let arena = self.arenas.get(&cfg.trained).ok_or_else(|| Error::Internal("arena vanished".into()))?;
        let setup: Vec<String> = self.active.as_ref().map(|s| s.names().to_vec()).unwrap_or_default();
        let kept = self.setup_params(&setup);
        let i = setup.iter().position(|n| *n == cfg.trained).unwrap_or(0);
        let classes = output.logits.get(i).map_or(0, |l| l.shape()[1]);
        Ok(TrainStepGraph {
            graph,
            classes,
            batch: batch.batch,
            seq_len: batch.seq_len,
            trained: cfg.trained.clone(),
            dropout: self.dropout_seed.is_some(),
            loss_scale: self.loss_scale,
            updates: arena.with_grad.iter().any(|&g| g),
            setup,
            inputs,
            labels: self.labels.clone().ok_or_else(|| Error::Internal("labels vanished".into()))?,
            arena: [arena.params.clone(), arena.grads.clone()],
            optimizer: optimizer.device_buffers(),
            seed: self.seed_buffer.as_ref().map(|(_, t)| t.clone()),
            output,
            kept,
        })
    }

    /// One training step by replaying `graph` on `batch` and `labels` (same shape as captured),
    /// with the model's current dropout seed and `optimizer`'s current learning rate. Returns
    /// the step's outputs (the graph's buffers: read them before the next replay).
    pub fn replay_train_step<'g>(&mut self, graph: &'g TrainStepGraph, batch: &InputBatch, labels: &[usize], optimizer: &mut AdamW) -> Result<&'g TrainStepOutput> {
        let be = self.backend.clone();
        let gpu = be.gpu().ok_or_else(|| Error::Unsupported("replay_train_step: the model's backend is not a CUDA backend".into()))?;
        if (batch.batch, batch.seq_len) != (graph.batch, graph.seq_len) {
            return Err(Error::Input(format!(
                "replay_train_step: the graph was captured for batches of [{}, {}], this batch is [{}, {}]",
                graph.batch, graph.seq_len, batch.batch, batch.seq_len
            )));
        }
        if labels.len() != batch.batch {
            return Err(Error::Input(format!("{} labels for a batch of {}", labels.len(), batch.batch)));
        }
        if let Some(&y) = labels.iter().find(|&&y| y >= graph.classes) {
            return Err(Error::Input(format!("label {y} is out of range for {} classes", graph.classes)));
        }
        // The embedding kernel's id check cannot be read back inside a graph: check here.
        let cfg = &self.config;
        let n = batch.batch * batch.seq_len;
        if batch.input_ids.len() != n || batch.token_type_ids.len() != n || batch.attention_mask.len() != n {
            return Err(Error::Input(format!("replay_train_step: the batch's ids, token types and mask must have {n} entries each")));
        }
        if let Some(i) = batch.input_ids.iter().position(|&v| v as usize >= cfg.vocab_size) {
            return Err(Error::Input(format!("input_ids: value {} at [{}, {}] is out of range (must be < vocab_size {})", batch.input_ids[i], i / batch.seq_len, i % batch.seq_len, cfg.vocab_size)));
        }
        if let Some(i) = batch.token_type_ids.iter().position(|&v| v as usize >= cfg.type_vocab_size) {
            return Err(Error::Input(format!(
                "token_type_ids: value {} at [{}, {}] is out of range (must be < type_vocab_size {})",
                batch.token_type_ids[i],
                i / batch.seq_len,
                i % batch.seq_len,
                cfg.type_vocab_size
            )));
        }
        // The training state the graph was captured on must be the model's and optimizer's now.
        let setup: Vec<String> = self.active.as_ref().map(|s| s.names().to_vec()).unwrap_or_default();
        let arena_same = self.arenas.get(&graph.trained).is_some_and(|a| same(&[a.params.clone(), a.grads.clone()], &graph.arena));
        let seed_same = graph.dropout == self.dropout_seed.is_some()
            && match (&graph.seed, &self.seed_buffer) {
                _ if !graph.dropout => true,
                (Some(t), Some((_, now))) => t.shares_storage(now),
                _ => false,
            };
        if setup != graph.setup
            || !self.trainable.contains(&graph.trained)
            || !arena_same
            || !seed_same
            || graph.loss_scale != self.loss_scale
            || !same(&optimizer.device_buffers(), &graph.optimizer)
            || !same(&self.setup_params(&setup), &graph.kept)
        {
            return Err(Error::Input(format!(
                "replay_train_step: the setup, the trainable adapter `{}`, its arena, an adapter's or head's parameters (moved into an arena built since), the dropout mode, the loss scale or the optimizer changed since the capture; capture the step again",
                graph.trained
            )));
        }
        be.write_u32(&graph.inputs.ids, &batch.input_ids)?;
        be.write_u32(&graph.inputs.types, &batch.token_type_ids)?;
        be.write_f32(&graph.inputs.mask, &mask_bias(batch))?;
        be.write_u32(&graph.labels, &labels.iter().map(|&y| y as u32).collect::<Vec<_>>())?;
        optimizer.stage_lr()?;
        // SAFETY: the graph keeps every buffer its launches use alive (its own scratch, the
        // inputs, labels, arena, optimizer state, seed, adapter and head tensors, outputs); the
        // frozen base weights belong to this model, which cannot drop them.
        unsafe { gpu.replay(&graph.graph) }?;
        optimizer.count_replayed_step(graph.updates);
        self.version += 1; // the parameters changed: earlier tapes are stale
        Ok(&graph.output)
    }

    /// The parameter tensors of every adapter and head in `setup`, in a fixed order.
    fn setup_params(&self, setup: &[String]) -> Vec<Tensor> {
        let mut params: Vec<Tensor> = Vec::new();
        for name in setup {
            if let Some(a) = self.adapters.get(name) {
                params.extend(a.params().values().cloned());
            }
            if let Some(h) = self.heads.get(name) {
                params.extend(h.params().values().cloned());
            }
        }
        params
    }

    /// Writes `labels` into the model's fixed label buffer (allocating it at a new batch size).
    pub(crate) fn stage_labels(&mut self, labels: &[usize]) -> Result<()> {
        let be = self.backend.clone();
        let y: Vec<u32> = labels.iter().map(|&y| y as u32).collect();
        let t = match self.labels.take() {
            Some(t) if t.shape() == [y.len()] => {
                be.write_u32(&t, &y)?;
                t
            }
            _ => be.upload_u32(y, &[labels.len()])?,
        };
        self.labels = Some(t);
        Ok(())
    }
}
