//! Heads owned by adapters, the classification objective, and optimizer steps.
//!
//! A head is named like its adapter and trains with it (the library never freezes heads; ours
//! follow their adapter so that alternating training updates one network at a time). Under
//! Parallel, head i reads branch i's rows and the loss is the sum of the head losses, as in the
//! library's multi-head output. In training (`head_logits_train` after a `forward_train` that
//! dropped out) each head applies its Dropout modules, with masks of its own per branch.


use crate::error::{Error, Result};
use crate::io::InputBatch;
use crate::model::backward::{GradSink, Gradients, Tape};
use crate::model::bert::{BertModel, BertOutput};
use crate::model::heads::{cross_entropy, ClassificationHead, HeadConfig, HeadDropout, HeadTape};
use crate::tensor::Tensor;
use crate::train::optim::AdamW;

/// Logits of one branch's head, with what its backward needs.
pub struct BranchLogits {
    pub adapter: String,
    /// `[B, C]`.
    pub logits: Tensor,
    pub(crate) tape: HeadTape,
}

/// One classification step's results.
pub struct ClassificationStep {
    /// The summed cross-entropy over the branches (each a batch mean).
    pub loss: f32,
    /// Per branch, in setup order.
    pub logits: Vec<Tensor>,
    /// Gradients of every trainable tensor: adapters and their heads.
    pub grads: Gradients,
}

impl BertModel {
    /// Add a classification head for adapter `name` (N(0, 0.02) init from the model's seeded RNG).
    pub fn add_classification_head(&mut self, name: &str, config: HeadConfig) -> Result<()> {
        let seed = self.next_adapter_seed;
        self.next_adapter_seed += 1;
        let head = ClassificationHead::new(self.backend.as_ref(), name, config, self.config.hidden_size, seed)?;
        self.insert_head(head)
    }

    /// Attach a head built elsewhere; its name must be an existing adapter's.
    pub fn insert_head(&mut self, head: ClassificationHead) -> Result<()> {
        self.version += 1;
        if !self.adapters.contains_key(head.name()) {
            return Err(Error::Input(format!("head `{}` has no adapter of the same name", head.name())));
        }
        if head.hidden_size() != self.config.hidden_size {
            return Err(Error::Input(format!("head `{}` has hidden size {}, the model {}", head.name(), head.hidden_size(), self.config.hidden_size)));
        }
        if self.heads.contains_key(head.name()) {
            return Err(Error::Input(format!("adapter `{}` already has a head", head.name())));
        }
        if head.config().use_pooler && !self.has_pooler() {
            return Err(Error::Input(format!(
                "head `{}` reads the pooler output (use_pooler in its config), but this model has no pooler (its weights hold no pooler.dense)",
                head.name()
            )));
        }
        let head = self.head_on_backend(head)?;
        self.heads.insert(head.name().to_string(), head);
        Ok(())
    }

    /// `head` with its parameters where the model runs: host tensors are uploaded to the model's
    /// device (a head built on the CPU joins a CUDA model); a tensor on a third device is refused.
    fn head_on_backend(&self, head: ClassificationHead) -> Result<ClassificationHead> {
        let device = self.backend.device();
        if head.params().values().all(|t| t.device() == device) {
            return Ok(head);
        }
        let mut params = std::collections::BTreeMap::new();
        for (key, t) in head.params() {
            let moved = match t.device() {
                d if d == device => t.clone(),
                crate::device::Device::Cpu => self.backend.upload(t.f32_data()?.to_vec(), t.shape())?,
                other => return Err(Error::Input(format!("head `{}`: parameter `{key}` is on {other}, the model on {device}", head.name()))),
            };
            params.insert(key.clone(), moved);
        }
        ClassificationHead::from_params(head.name(), head.config().clone(), params)
    }

    pub fn head(&self, name: &str) -> Option<&ClassificationHead> {
        self.heads.get(name)
    }

    pub fn delete_head(&mut self, name: &str) -> Option<ClassificationHead> {
        self.version += 1;
        self.heads.remove(name)
    }

    /// Eval-mode logits of every active branch's head on a forward's output (no dropout, even
    /// on a `forward_train` output: `head_logits_train` is the training mode).
    pub fn head_logits(&self, out: &BertOutput) -> Result<Vec<BranchLogits>> {
        self.branch_logits(out, None)
    }

    /// `head_logits` in training mode on the output of `forward_train` that recorded `tape`:
    /// when that forward dropped out (`set_dropout` gave a seed), each head applies its Dropout
    /// modules with p = its `dropout_prob`, or the model's `hidden_dropout_prob` when None. Branch
    /// i's masks are keyed by the seed and i alone; `heads_backward` applies the same masks.
    pub fn head_logits_train(&self, out: &BertOutput, tape: &Tape) -> Result<Vec<BranchLogits>> {
        let rows = if tape.replicated { tape.branches * tape.batch } else { tape.batch };
        if out.last_hidden_state.shape()[0] != rows {
            return Err(Error::Input(format!("head_logits_train: the output has {} rows, its tape {rows}", out.last_hidden_state.shape()[0])));
        }
        self.branch_logits(out, tape.dropout_seed)
    }

    fn branch_logits(&self, out: &BertOutput, dropout_seed: Option<u64>) -> Result<Vec<BranchLogits>> {
        let be = self.backend.as_ref();
        let children = self.active_children()?;
        if children.is_empty() {
            return Err(Error::Input("no active adapter, so no head to apply".into()));
        }
        let rows = out.last_hidden_state.shape()[0];
        let n = out.branches;
        let block = rows / n.max(1);
        let mut result = Vec::with_capacity(children.len());
        for (i, child) in children.iter().enumerate() {
            let head = self.heads.get(child.name()).ok_or_else(|| Error::Input(format!("adapter `{}` has no head", child.name())))?;
            // Before any replication (no adapter location at all) every branch reads the same rows.
            let (start, len) = if n == 1 { (0, rows) } else { (i * block, block) };
            let last = out.last_hidden_state.narrow_rows(start, len)?;
            let pooled = out.pooler_output.as_ref().map(|p| p.narrow_rows(start, len)).transpose()?;
            // The block id is the branch index, even where all branches read the same rows.
            let dropout = dropout_seed.map(|seed| HeadDropout {
                seed,
                seed_buffer: self.seed_buffer_for(seed),
                p: head.dropout_prob(self.config.hidden_dropout_prob),
                branch: i as u64,
                offset: self.dropout_row * self.config.hidden_size as u64,
            });
            let (logits, tape) = head.forward_with(be, &last, pooled.as_ref(), dropout.as_ref())?;
            result.push(BranchLogits { adapter: child.name().to_string(), logits, tape });
        }
        Ok(result)
    }

    /// Backward of the heads for `dlogits` (one per branch), through the dropout masks their
    /// forward applied (if any): the heads' parameter gradients (only for heads of trainable
    /// adapters) and `∂L/∂last_hidden_state` (and `∂L/∂pooler_output`) for `backward`.
    pub fn heads_backward(&self, branches: &[BranchLogits], dlogits: &[Tensor], tape: &Tape) -> Result<(Gradients, Tensor, Option<Tensor>)> {
        let d: Vec<Option<&Tensor>> = dlogits.iter().map(Some).collect();
        self.heads_backward_some(branches, &d, tape)
    }

    /// `heads_backward` where a branch may have no logit gradient (`None`: the loss does not
    /// depend on it), which then costs nothing. A frozen head (its adapter is not trainable)
    /// runs input-gradient products only. The branches' input gradients are written into row
    /// blocks of one buffer on the device (no host round trip).
    pub fn heads_backward_some(&self, branches: &[BranchLogits], dlogits: &[Option<&Tensor>], tape: &Tape) -> Result<(Gradients, Tensor, Option<Tensor>)> {
        let mut grads = Gradients::new();
        let (d_last, d_pool) = self.heads_backward_into(branches, dlogits, tape, &mut grads)?;
        Ok((grads, d_last, d_pool))
    }

    /// `heads_backward_some` with the heads' parameter gradients written into `sink`'s
    /// destinations: a head applied to several branches (`Parallel(a, a)`) writes its first and
    /// accumulates the others.
    pub(crate) fn heads_backward_into(&self, branches: &[BranchLogits], dlogits: &[Option<&Tensor>], tape: &Tape, sink: &mut dyn GradSink) -> Result<(Tensor, Option<Tensor>)> {
        let be = self.backend.as_ref();
        if branches.len() != dlogits.len() {
            return Err(Error::Input(format!("{} logit gradients for {} heads", dlogits.len(), branches.len())));
        }
        let rows_out = if tape.replicated { tape.branches * tape.batch } else { tape.batch };
        let hidden = self.config.hidden_size;
        let heads: Vec<&ClassificationHead> =
            branches.iter().map(|b| self.heads.get(&b.adapter).ok_or_else(|| Error::Input(format!("adapter `{}` has no head", b.adapter)))).collect::<Result<_>>()?;
        let pooled = heads.iter().filter(|h| h.config().use_pooler).count();
        if pooled != 0 && pooled != heads.len() {
            return Err(Error::Unsupported("heads of one setup must all read the pooler or all the first token".into()));
        }
        let use_pooler = pooled != 0;
        // Zeros: branches without a logit gradient leave their rows as they are, and every
        // head adds its input gradient in.
        // In the encoder's activation dtype (bf16 training: bf16), which its backward reads.
        let d_last = be.zeros(&[rows_out, tape.seq_len, hidden], tape.activations)?;
        let d_pool = if use_pooler { Some(be.zeros(&[rows_out, hidden], tape.activations)?) } else { None };
        for (i, ((b, d), head)) in branches.iter().zip(dlogits).zip(&heads).enumerate() {
            let Some(d) = d else { continue };
            let trainable = self.trainable.contains(&b.adapter);
            // Replicated: branch i's gradient goes to rows [i·B, (i+1)·B). Not replicated (no
            // adapter location ran): every head read the same rows, so their gradients add.
            let target = d_pool.as_ref().unwrap_or(&d_last);
            let block = if tape.replicated { target.narrow_rows(i * tape.batch, tape.batch)? } else { target.clone() };
            head.backward_into(be, &b.tape, d, if trainable { Some(&mut *sink) } else { None }, &block)?;
        }
        Ok((d_last, d_pool))
    }

    /// Forward, the summed cross-entropy of every branch's head against `labels` (`[B]`, the same
    /// labels for every branch), and gradients of every trainable tensor. Training mode: with a
    /// dropout seed the encoder and the heads drop out. Loss-scaled as `train_step` is
    /// (`set_loss_scale`): the gradients returned are the unscaled ones (a non-finite one, an f16
    /// overflow, is returned as it is).
    pub fn classification_step(&self, batch: &InputBatch, labels: &[usize]) -> Result<ClassificationStep> {
        let be = self.backend.as_ref();
        let (out, tape) = self.forward_train(batch)?;
        let branches = self.head_logits_train(&out, &tape)?;
        let mut loss = 0f32;
        let mut dlogits = Vec::new();
        for b in &branches {
            let (l, d) = cross_entropy(be, &b.logits, labels)?;
            loss += l;
            if self.loss_scale != 1.0 {
                be.scale_in_place(&d, self.loss_scale)?;
            }
            dlogits.push(d);
        }
        let (head_grads, d_last, d_pool) = self.heads_backward(&branches, &dlogits, &tape)?;
        let mut grads = self.backward(&tape, &d_last, d_pool.as_ref())?;
        grads.extend(head_grads);
        if self.loss_scale != 1.0 {
            for g in grads.values() {
                be.scale_in_place(g, 1.0 / self.loss_scale)?;
            }
        }
        Ok(ClassificationStep { loss, logits: branches.into_iter().map(|b| b.logits).collect(), grads })
    }

    /// One AdamW update of adapter `name` and its head with the gradients in `grads` that belong
    /// to them (others are ignored, so one gradient map can serve several optimizers).
    pub fn adamw_step(&mut self, name: &str, optimizer: &mut AdamW, grads: &Gradients) -> Result<()> {
        self.version += 1;
        let known = self.adapter_names().join(", ");
        let adapter = self.adapters.get_mut(name).ok_or_else(|| Error::Input(format!("no adapter named `{name}` (adapters: {known})")))?;
        // One parameter map for the step, so the optimizer counts one step; moved, not copied.
        let mut params = std::mem::take(adapter.params_mut());
        let head_params = self.heads.get_mut(name).map(|h| std::mem::take(h.params_mut()));
        let head_keys: Vec<String> = head_params.as_ref().map(|p| p.keys().cloned().collect()).unwrap_or_default();
        if let Some(hp) = head_params {
            params.extend(hp);
        }
        let mine: Gradients = grads.iter().filter(|(k, _)| params.contains_key(*k)).map(|(k, g)| (k.clone(), g.clone())).collect();
        let result = optimizer.step(&mut params, &mine);
        // Put everything back whether or not the step succeeded (it changes nothing on error).
        if let Some(head) = self.heads.get_mut(name) {
            *head.params_mut() = head_keys.iter().filter_map(|k| params.remove_entry(k)).collect();
        }
        if let Some(adapter) = self.adapters.get_mut(name) {
            *adapter.params_mut() = params;
        }
        result
    }
}
