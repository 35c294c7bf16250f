//! One training step on the model's device: forward, the trained branch's head and objective,
//! backward, gradient-norm clipping and AdamW over the adapter's flat arena. With a dropout seed
//! (`set_dropout`) the encoder and every head run in training mode (`head_logits_train`).
//!
//! Nothing comes back to the host unless asked: the loss and gradient norm stay in device
//! buffers (`TrainStepOutput::read` fetches them, three floats), the per-layer finiteness scans
//! of `forward` are replaced by the gradient norm (a non-finite norm makes AdamW update nothing,
//! and `read` reports it), and the only uploads are the batch's inputs.

use crate::backend::Backend;
use crate::dist::DataParallel;
use crate::error::{Error, Result};
use crate::io::InputBatch;
use crate::model::arena::{ArenaSink, TrainArena};
use crate::model::bert::{BertModel, RunOptions};
use crate::tensor::{DType, Tensor};
use crate::train::loss::{LossOp, Objective};
use crate::train::optim::AdamW;

/// What one step optimises.
#[derive(Clone, Debug)]
pub struct TrainStepConfig {
    /// The objective on the trained branch's logits (two-branch objectives read the other
    /// branch of a two-adapter Parallel as a constant).
    pub objective: Objective,
    /// The adapter (and its head) that AdamW updates; it must be trainable and active.
    pub trained: String,
    /// `clip_grad_norm_` threshold; `None` measures the norm without clipping.
    pub max_grad_norm: Option<f32>,
}

/// A step's results, on the device.
#[derive(Debug)]
pub struct TrainStepOutput {
    /// `[2]`: the objective and its cross-entropy part.
    pub loss: Tensor,
    /// `[1]`: the gradient norm before clipping.
    pub grad_norm: Tensor,
    /// Per branch, in setup order: the head logits `[B, C]`.
    pub logits: Vec<Tensor>,
}

/// The scalars a user prints.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepValues {
    pub loss: f32,
    pub ce: f32,
    pub grad_norm: f32,
}

impl TrainStepOutput {
    /// Fetch the loss and the gradient norm (two small reads). A NaN or infinite value is an
    /// `Error::NonFinite`; the step that produced it updated nothing.
    pub fn read(&self, backend: &dyn Backend) -> Result<StepValues> {
        self.read_unchecked(backend)?.checked()
    }

    /// The values as they are, NaN or not (data-parallel training combines the ranks' losses
    /// before it checks them).
    pub fn read_unchecked(&self, backend: &dyn Backend) -> Result<StepValues> {
        let loss = backend.to_host(&self.loss)?;
        let norm = backend.to_host(&self.grad_norm)?;
        Ok(StepValues { loss: loss[0], ce: loss[1], grad_norm: norm[0] })
    }
}

impl StepValues {
    /// `self`, or `Error::NonFinite` naming the loss or the gradient norm when it is NaN or
    /// infinite (the step that produced it updated nothing).
    pub fn checked(self) -> Result<StepValues> {
        let v = self;
        if !v.loss.is_finite() {
            return Err(Error::NonFinite { at: "the loss (no update was applied)".into() });
        }
        if !v.grad_norm.is_finite() {
            return Err(Error::NonFinite { at: "the gradient norm (no update was applied)".into() });
        }
        Ok(v)
    }
}

impl BertModel {
    /// One training step of adapter `cfg.trained` (and its head) on `batch` with `labels`
    /// (`[B]`, the same for every branch). See the module docs for what stays on the device.
    pub fn train_step(&mut self, batch: &InputBatch, labels: &[usize], cfg: &TrainStepConfig, optimizer: &mut AdamW) -> Result<TrainStepOutput> {
        self.train_step_with(batch, labels, cfg, optimizer, None)
    }

    /// [`train_step`](Self::train_step) as one rank of data-parallel training: `batch` and
    /// `labels` are this rank's rows `dp.rows` of the global batch, and between the backward and
    /// the clipping the gradient arena becomes the global batch's gradient (one all-reduce, see
    /// [`reduce_gradients`]), so clipping and AdamW do on every rank what one process would do.
    /// The loss returned is this rank's mean; weight it by `dp.weight()` and all-reduce it for
    /// the global one. Call `set_dropout_row(dp.rows.start)` first, so the dropout masks are
    /// these rows' masks in the global batch.
    pub fn train_step_data_parallel(&mut self, batch: &InputBatch, labels: &[usize], cfg: &TrainStepConfig, optimizer: &mut AdamW, dp: &DataParallel) -> Result<TrainStepOutput> {
        if dp.rows.len() != batch.batch || dp.rows.end > dp.global_rows {
            return Err(Error::Input(format!("data-parallel step: rows {:?} of a global batch of {} for a batch of {}", dp.rows, dp.global_rows, batch.batch)));
        }
        if self.dropout_row != dp.rows.start as u64 {
            return Err(Error::Input(format!("data-parallel step: the dropout masks are set for global row {} (set_dropout_row), the shard starts at row {}", self.dropout_row, dp.rows.start)));
        }
        self.train_step_with(batch, labels, cfg, optimizer, Some(dp))
    }

    /// One optimizer step over one batch given as `micro` batches, run one after another
    /// (gradient accumulation: the peak memory is one micro-batch's): each micro-batch's
    /// forward, objective and backward add its share of the gradient of the whole batch's mean
    /// loss into the arena (its backward is seeded with `rows / all rows`), then clipping and
    /// AdamW run once. Each micro-batch's dropout masks are its rows' masks in the whole batch,
    /// so when the micro-batches are consecutive row ranges of one padded batch
    /// ([`InputBatch::rows`], keeping its padding) the step is the whole batch's step, within
    /// float rounding (tests/grad_accumulation.rs). The loss returned is the whole batch's mean;
    /// the logits are the micro-batches' in order. Among data-parallel ranks (`dp`), the
    /// micro-batches are this rank's rows `dp.rows` and the gradient is all-reduced once, after
    /// the last one.
    pub fn train_step_accumulated(&mut self, micro: &[(&InputBatch, &[usize])], cfg: &TrainStepConfig, optimizer: &mut AdamW, dp: Option<&DataParallel>) -> Result<TrainStepOutput> {
        if micro.is_empty() {
            return Err(Error::Input("train_step_accumulated: no micro-batches".into()));
        }
        if let Some(dp) = dp {
            let rows: usize = micro.iter().map(|(b, _)| b.batch).sum();
            if dp.rows.len() != rows || dp.rows.end > dp.global_rows {
                return Err(Error::Input(format!("data-parallel step: rows {:?} of a global batch of {} for micro-batches of {rows} rows", dp.rows, dp.global_rows)));
            }
            if self.dropout_row != dp.rows.start as u64 {
                return Err(Error::Input(format!("data-parallel step: the dropout masks are set for global row {} (set_dropout_row), the shard starts at row {}", self.dropout_row, dp.rows.start)));
            }
        }
        // Each micro-batch draws its rows' masks; the model's row is back as it was afterwards,
        // on an error too.
        let base_row = self.dropout_row;
        let result = self.train_step_over(micro, cfg, optimizer, dp);
        self.dropout_row = base_row;
        result
    }

    fn train_step_with(&mut self, batch: &InputBatch, labels: &[usize], cfg: &TrainStepConfig, optimizer: &mut AdamW, dp: Option<&DataParallel>) -> Result<TrainStepOutput> {
        self.train_step_over(&[(batch, labels)], cfg, optimizer, dp)
    }

    fn train_step_over(&mut self, micro: &[(&InputBatch, &[usize])], cfg: &TrainStepConfig, optimizer: &mut AdamW, dp: Option<&DataParallel>) -> Result<TrainStepOutput> {
        let be = self.backend.clone();
        let names: Vec<String> = self.active.as_ref().map(|s| s.names().to_vec()).unwrap_or_default();
        let i = names.iter().position(|n| *n == cfg.trained).ok_or_else(|| Error::Input(format!("train_step: `{}` is not in the active setup ({})", cfg.trained, names.join(", "))))?;
        if !self.trainable.contains(&cfg.trained) {
            return Err(Error::Input(format!("train_step: `{}` is not trainable (call train_adapter first)", cfg.trained)));
        }
        let other = match cfg.objective {
            Objective::CrossEntropy => None,
            _ if names.len() == 2 => Some(1 - i),
            _ => return Err(Error::Input(format!("{:?} needs a Parallel of exactly two adapters, the setup has {}", cfg.objective, names.len()))),
        };
        for (batch, labels) in micro {
            if labels.len() != batch.batch {
                return Err(Error::Input(format!("{} labels for a batch of {}", labels.len(), batch.batch)));
            }
        }
        self.ensure_arena(&cfg.trained)?;
        if let Some(arena) = self.arenas.get(&cfg.trained) {
            optimizer.bind_arena(&self.backend, &arena.table)?;
        }
        let pooler = names.iter().filter_map(|n| self.heads.get(n)).any(|h| h.config().use_pooler);
        let rows: usize = micro.iter().map(|(b, _)| b.batch).sum();
        let base_row = self.dropout_row;
        let mut with_grad: Option<Vec<bool>> = None;
        let mut parts = Vec::with_capacity(micro.len());
        let mut row = 0usize;
        for &(batch, labels) in micro {
            self.dropout_row = base_row + row as u64;
            let (out, tape) = self.forward_train_with(batch, RunOptions { record: true, check_finite: false, pooler })?;
            let branches = self.head_logits_train(&out, &tape)?;
            let c = branches[i].logits.shape()[1];
            if let Some(&y) = labels.iter().find(|&&y| y >= c) {
                return Err(Error::Input(format!("label {y} is out of range for {c} classes")));
            }
            // The labels go into a fixed buffer, written in place while the batch size repeats (a
            // captured step finds them staged there).
            if !self.capturing {
                self.stage_labels(labels)?;
            }
            let labels_t = self.labels.clone().filter(|t| t.shape() == [labels.len()]).ok_or_else(|| Error::Internal("train_step: the labels were not staged".into()))?;
            let op = LossOp { objective: cfg.objective, trained: &branches[i].logits, other: other.map(|j| &branches[j].logits), labels: &labels_t };
            let (dlogits, loss) = op.run(be.as_ref())?;
            // The backward's seed: the loss scale, and this micro-batch's (and among ranks this
            // shard's) weight in the global batch-mean, so that every row's activation gradients
            // are the ones one process computes on the whole batch (an f16 overflow then happens
            // where it happens in one process).
            let weight = match (micro.len(), dp) {
                (1, dp) => dp.map_or(1.0, DataParallel::weight),
                (_, dp) => (batch.batch as f64 / dp.map_or(rows, |d| d.global_rows).max(1) as f64) as f32,
            };
            let seed_scale = self.loss_scale * weight;
            if seed_scale != 1.0 {
                be.scale_in_place(&dlogits, seed_scale)?;
            }
            let mut d: Vec<Option<&Tensor>> = vec![None; branches.len()];
            d[i] = Some(&dlogits);
            // Gradients straight into the arena's views: the first contribution to a tensor
            // writes it, later ones (this micro-batch's or an earlier one's) add; tensors no
            // micro-batch reached keep no gradient.
            let arena = self.arenas.get(&cfg.trained).ok_or_else(|| Error::Internal("arena vanished".into()))?;
            let mut sink = match with_grad.take() {
                None => ArenaSink::new(arena),
                Some(reached) => ArenaSink::continuing(arena, reached),
            };
            let (d_last, d_pool) = self.heads_backward_into(&branches, &d, &tape, &mut sink)?;
            self.backward_into(&tape, d_last, d_pool.as_ref(), &mut sink)?;
            with_grad = Some(sink.with_grad);
            parts.push((loss, batch.batch, branches.into_iter().map(|b| b.logits).collect::<Vec<_>>()));
            drop((out, tape));
            row += batch.batch;
        }
        self.dropout_row = base_row;
        let mut with_grad = with_grad.ok_or_else(|| Error::Internal("train_step: no micro-batch ran".into()))?;
        let arena = self.arenas.get(&cfg.trained).ok_or_else(|| Error::Internal("arena vanished".into()))?;
        if let Some(dp) = dp {
            reduce_gradients(be.as_ref(), arena, &mut with_grad, dp)?;
        }
        if self.loss_scale != 1.0 {
            // Back to the loss's gradient before the norm: clipping and AdamW see what an
            // unscaled step computes (an overflow stays non-finite and skips the update).
            be.scale_in_place(&arena.grads, 1.0 / self.loss_scale)?;
        }

        let views = (0..arena.table.len()).filter(|&k| with_grad[k]).map(|k| arena.grad(k)).collect::<Result<Vec<_>>>()?;
        let grad_norm = be.zeros(&[1], DType::F32)?;
        be.clip_grad_norm(&views, cfg.max_grad_norm.unwrap_or(f32::INFINITY), &grad_norm)?;
        optimizer.step_arena(&self.backend, &arena.table, &arena.params, &arena.grads, &with_grad, Some(&grad_norm))?;
        if let Some(arena) = self.arenas.get_mut(&cfg.trained) {
            arena.with_grad = with_grad;
        }
        self.version += 1; // the parameters changed: earlier tapes are stale
        let (loss, logits) = combine_micro(be.as_ref(), parts, rows)?;
        Ok(TrainStepOutput { loss, grad_norm, logits })
    }

    /// Pack adapter `name` and its head into a flat arena, unless they already are.
    fn ensure_arena(&mut self, name: &str) -> Result<()> {
        let adapter = self.adapters.get_mut(name).ok_or_else(|| Error::Input(format!("no adapter named `{name}`")))?;
        let head = self.heads.get_mut(name);
        let current = match (self.arenas.get(name), &head) {
            (Some(a), Some(h)) => a.is_current(&[adapter.params(), h.params()]),
            (Some(a), None) => a.is_current(&[adapter.params()]),
            (None, _) => false,
        };
        if !current {
            let be = self.backend.clone();
            let arena = match head {
                Some(h) => TrainArena::pack(be.as_ref(), &mut [adapter.params_mut(), h.params_mut()])?,
                None => TrainArena::pack(be.as_ref(), &mut [adapter.params_mut()])?,
            };
            self.arenas.insert(name.to_string(), arena);
        }
        Ok(())
    }

    /// The flat arena of adapter `name`, once a training step has packed it.
    pub fn arena(&self, name: &str) -> Option<&TrainArena> {
        self.arenas.get(name)
    }
}

/// The whole batch's loss (the micro-batches' means weighted by their rows) and each branch's
/// logits (the micro-batches' rows in order); one micro-batch's as they are.
fn combine_micro(be: &dyn Backend, mut parts: Vec<(Tensor, usize, Vec<Tensor>)>, rows: usize) -> Result<(Tensor, Vec<Tensor>)> {
    if parts.len() == 1 {
        let (loss, _, logits) = parts.pop().ok_or_else(|| Error::Internal("no micro-batch".into()))?;
        return Ok((loss, logits));
    }
    let loss = be.zeros(&[2], DType::F32)?;
    let branches = parts[0].2.len();
    let logits = (0..branches).map(|b| be.zeros(&[rows, parts[0].2[b].last_dim()], DType::F32)).collect::<Result<Vec<_>>>()?;
    let mut row = 0;
    for (part_loss, n, part_logits) in &parts {
        be.scale_in_place(part_loss, (*n as f64 / rows as f64) as f32)?;
        be.add_into(&loss, part_loss)?;
        for (all, part) in logits.iter().zip(part_logits) {
            be.add_into(&all.narrow_rows(row, *n)?, &be.cast(part, DType::F32)?)?;
        }
        row += n;
    }
    Ok((loss, logits))
}

/// The data-parallel gradient: each rank's arena holds its rows' part of the gradient of the
/// global batch's mean loss (the step seeded its backward with the shard's weight, rows / global
/// rows), so the sum over the ranks is the global gradient. One all-reduce over the whole arena,
/// where it lives ([`crate::dist::Communicator::all_reduce_sum_tensor`]: on the GPU over NCCL, through the host
/// otherwise), with one flag per tensor alongside (whether any rank's backward reached it); a
/// tensor no rank reached stays without gradient, one reached anywhere gets the sum (zeros from
/// the others).
pub fn reduce_gradients(be: &dyn Backend, arena: &crate::model::arena::TrainArena, with_grad: &mut [bool], dp: &DataParallel) -> Result<()> {
    if with_grad.len() != arena.table.len() {
        return Err(Error::Internal(format!("{} gradient flags for an arena of {} tensors", with_grad.len(), arena.table.len())));
    }
    for (k, _) in with_grad.iter().enumerate().filter(|(_, &reached)| !reached) {
        be.fill(&arena.grad(k)?, 0.0)?; // stale values from an earlier step
    }
    let mut reached: Vec<f32> = with_grad.iter().map(|&r| if r { 1.0 } else { 0.0 }).collect();
    dp.comm.all_reduce_sum_tensor(be, &arena.grads, &mut reached)?;
    for (flag, &count) in with_grad.iter_mut().zip(&reached) {
        *flag = count > 0.0;
    }
    Ok(())
}
