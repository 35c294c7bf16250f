//! BERT encoder in eval mode with HF `BertModel` semantics.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use crate::backend::{Activation, AdapterLocation, Backend, BottleneckParams, DropoutSpec, LayerNormParams, LocationSteps};
use crate::config::{AdapterConfig, BertConfig, Location};
use crate::error::{Error, Result};
use crate::io::{BertWeights, InputBatch, LoadOptions, LoadReport};
use crate::model::adapters::{Adapter, AdapterSetup};
use crate::model::backward::{position, DropoutSite, FrozenRows, LayerTape, LocationTape, Tape};
use crate::model::heads::ClassificationHead;
use crate::tensor::Tensor;

/// The pre step follows the FIRST child of the setup, the post step the LAST (spec §6.4).
pub(crate) fn location_steps(children: &[&Adapter]) -> LocationSteps {
    let (first, last) = (children[0].config(), children[children.len() - 1].config());
    LocationSteps {
        residual_before_ln: first.residual_before_ln,
        original_ln_before: first.original_ln_before,
        original_ln_after: last.original_ln_after,
    }
}

pub struct BertModel {
    pub(crate) config: BertConfig,
    pub(crate) weights: BertWeights,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) adapters: BTreeMap<String, Adapter>,
    pub(crate) active: Option<AdapterSetup>,
    /// Classification heads, named like the adapter that owns them.
    pub(crate) heads: BTreeMap<String, ClassificationHead>,
    /// Adapters whose parameters get gradients (`train_adapter`).
    pub(crate) trainable: BTreeSet<String>,
    /// Seed of the next `add_adapter`; advanced per adapter so each gets its own draws.
    pub(crate) next_adapter_seed: u64,
    /// Training-mode dropout for `forward_train`: the seed its masks derive from.
    pub(crate) dropout_seed: Option<u64>,
    /// The global row of this process's first batch row, for the dropout masks of a
    /// data-parallel shard (`set_dropout_row`); 0 otherwise.
    pub(crate) dropout_row: u64,
    /// That seed in a U32 `[2]` device buffer, which every dropout kernel reads (so the launches
    /// are the same from step to step); written by `set_dropout`.
    pub(crate) seed_buffer: Option<(u64, Tensor)>,
    /// Bumped by every change to adapters, heads, the setup or the trainable set, so `backward`
    /// can refuse a tape recorded before it.
    pub(crate) version: u64,
    /// The fixed device buffers of the last batch's inputs (see `input_buffers`).
    pub(crate) inputs: std::sync::Mutex<Option<InputBuffers>>,
    /// `train_step`'s fixed U32 label buffer.
    pub(crate) labels: Option<Tensor>,
    /// Flat arenas of the adapters `train_step` has trained, by adapter name.
    pub(crate) arenas: BTreeMap<String, crate::model::arena::TrainArena>,
    /// While `capture_train_step` records: the inputs and labels are already in their fixed
    /// buffers, and nothing may be written from the host.
    pub(crate) capturing: bool,
    /// Loss scaling of `train_step` (`set_loss_scale`): 1 unless an f16 run scales.
    pub(crate) loss_scale: f32,
    /// What a recording forward keeps of frozen Parallel branches' rows (`set_frozen_rows`).
    pub(crate) frozen_rows: FrozenRows,
}

/// A batch's inputs on the device: U32 ids and token types `[B, T]`, and the f32 mask bias `[B, T]`.
#[derive(Clone)]
pub(crate) struct InputBuffers {
    pub(crate) ids: Tensor,
    pub(crate) types: Tensor,
    pub(crate) mask: Tensor,
}

/// The additive attention-mask bias of a batch: 0 where attended, `f32::MIN` at padding.
pub(crate) fn mask_bias(batch: &InputBatch) -> Vec<f32> {
    batch.attention_mask.iter().map(|&m| if m == 0 { f32::MIN } else { 0.0 }).collect()
}

/// What a forward computes beyond the encoder, and what it checks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RunOptions {
    /// Keep the tape for `backward`.
    pub record: bool,
    /// Scan each layer's output for NaN/inf (one host read per layer: a training step on a
    /// device skips it and checks its loss and gradient norm instead).
    pub check_finite: bool,
    /// Compute the pooler (only when something reads it).
    pub pooler: bool,
}

/// What a forward pass returns, on the backend's device.
pub struct BertOutput {
    /// `[B, T, H]`.
    pub last_hidden_state: Tensor,
    /// `[B, H]`, when the weights have a pooler.
    pub pooler_output: Option<Tensor>,
    /// `L + 1` tensors of `[B, T, H]`: the embedding output, then each layer's output.
    pub hidden_states: Vec<Tensor>,
    /// How many row blocks the outputs hold: N under a replicated Parallel, else 1.
    pub branches: usize,
}

impl BertModel {
    pub fn new(config: BertConfig, weights: BertWeights, backend: Arc<dyn Backend>) -> Self {
        BertModel { config, weights, backend, adapters: BTreeMap::new(), heads: BTreeMap::new(), active: None, trainable: BTreeSet::new(), next_adapter_seed: 0, dropout_seed: None, dropout_row: 0, seed_buffer: None, version: 0, inputs: std::sync::Mutex::new(None), labels: None, arenas: BTreeMap::new(), capturing: false, loss_scale: 1.0, frozen_rows: FrozenRows::Copy }
    }

    /// Load `config.json` and `model.safetensors` from a Hugging Face model folder.
    pub fn from_dir(dir: impl AsRef<Path>, backend: Arc<dyn Backend>, opts: LoadOptions) -> Result<(Self, LoadReport)> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            let why = if dir.exists() { "is not a folder (a model folder holds config.json and model.safetensors)" } else { "model folder not found" };
            return Err(Error::io(dir, std::io::Error::new(std::io::ErrorKind::NotFound, why)));
        }
        let config = BertConfig::from_file(dir.join("config.json"))?;
        let (weights, report) = BertWeights::load(dir.join("model.safetensors"), &config, backend.as_ref(), opts)?;
        Ok((BertModel::new(config, weights, backend), report))
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
    /// The frozen base's weights (in the dtype they were loaded as).
    pub fn weights(&self) -> &BertWeights {
        &self.weights
    }
    pub fn has_pooler(&self) -> bool {
        self.weights.pooler.is_some()
    }

    // ---- adapters ------------------------------------------------------------------------------

    /// Add adapter `name` with `config`, initialised as the config says ("bert": N(0, 0.02)
    /// weights, zero biases) from the model's seeded RNG. Does not activate it.
    pub fn add_adapter(&mut self, name: &str, config: AdapterConfig) -> Result<()> {
        let seed = self.next_adapter_seed;
        self.next_adapter_seed += 1;
        self.add_adapter_seeded(name, config, seed)
    }

    /// `add_adapter` with an explicit seed.
    pub fn add_adapter_seeded(&mut self, name: &str, config: AdapterConfig, seed: u64) -> Result<()> {
        self.version += 1;
        if self.adapters.contains_key(name) {
            return Err(Error::Input(format!("an adapter named `{name}` already exists")));
        }
        let adapter = Adapter::init(name, config, &self.config, seed, self.backend.as_ref())?;
        self.adapters.insert(name.to_string(), adapter);
        Ok(())
    }

    /// Load an adapter folder (`adapter_config.json` + `adapter.safetensors`); the name comes
    /// from the config, as in the library. Returns the name. Does not activate it.
    pub fn load_adapter(&mut self, dir: impl AsRef<Path>) -> Result<String> {
        self.load_adapter_as(dir, None)
    }

    /// `load_adapter` under another name (`load_as` in the library); `None` keeps the saved one.
    pub fn load_adapter_as(&mut self, dir: impl AsRef<Path>, load_as: Option<&str>) -> Result<String> {
        let opts = crate::io::adapter_files::AdapterLoadOptions { load_as: load_as.map(str::to_string), ..Default::default() };
        self.load_adapter_with(dir, &opts).map(|report| report.name)
    }

    /// Insert an adapter built elsewhere (e.g. loaded from files).
    pub fn insert_adapter(&mut self, adapter: Adapter) -> Result<()> {
        self.version += 1;
        if self.adapters.contains_key(adapter.name()) {
            return Err(Error::Input(format!("an adapter named `{}` already exists", adapter.name())));
        }
        self.adapters.insert(adapter.name().to_string(), adapter);
        Ok(())
    }

    /// Remove an adapter. If the active setup uses it, no adapter stays active (as the library
    /// does when the only active adapter is deleted).
    pub fn delete_adapter(&mut self, name: &str) -> Result<Adapter> {
        self.version += 1;
        let adapter = self.adapters.remove(name).ok_or_else(|| self.unknown(name))?;
        self.heads.remove(name);
        self.trainable.remove(name);
        self.arenas.remove(name);
        if self.active.as_ref().is_some_and(|s| s.names().iter().any(|n| n == name)) {
            self.active = None;
        }
        Ok(adapter)
    }

    pub fn adapter(&self, name: &str) -> Option<&Adapter> {
        self.adapters.get(name)
    }
    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.keys().map(String::as_str).collect()
    }
    pub fn active_adapters(&self) -> Option<&AdapterSetup> {
        self.active.as_ref()
    }

    fn unknown(&self, name: &str) -> Error {
        let known = if self.adapters.is_empty() { "none".to_string() } else { self.adapter_names().join(", ") };
        Error::Input(format!("no adapter named `{name}` (adapters: {known})"))
    }

    /// Choose what runs: `None`, one adapter, or Parallel. Every Parallel child must have a module
    /// wherever another child has one (the library crashes otherwise); this is checked here.
    pub fn set_active_adapters(&mut self, setup: Option<AdapterSetup>) -> Result<()> {
        self.version += 1;
        if let Some(s) = &setup {
            self.validate_setup(s)?;
        }
        self.active = setup;
        Ok(())
    }

    fn validate_setup(&self, setup: &AdapterSetup) -> Result<()> {
        let names = setup.names();
        if names.is_empty() {
            return Err(Error::Input("Parallel needs at least one adapter".into()));
        }
        let children = names.iter().map(|n| self.adapters.get(n).ok_or_else(|| self.unknown(n))).collect::<Result<Vec<_>>>()?;
        for layer in 0..self.config.num_hidden_layers {
            for location in Location::BOTH {
                let has: Vec<bool> = children.iter().map(|a| a.config().has_location(layer, location)).collect();
                if let (Some(with), Some(without)) = (has.iter().position(|&b| b), has.iter().position(|&b| !b)) {
                    let place = match location {
                        Location::MultiHead => "attention output (mh_adapter)",
                        Location::Output => "FFN output (output_adapter)",
                    };
                    return Err(Error::Input(format!(
                        "{setup}: adapter `{}` has no module at layer {layer} {place} where `{}` has one; \
                         every Parallel child must exist at the same locations",
                        names[without], names[with]
                    )));
                }
            }
        }
        Ok(())
    }

    pub(crate) fn active_children(&self) -> Result<Vec<&Adapter>> {
        match &self.active {
            None => Ok(Vec::new()),
            Some(s) => s.names().iter().map(|n| self.adapters.get(n).ok_or_else(|| self.unknown(n))).collect(),
        }
    }

    /// The inverse of the active setup's NICE block (the first adapter's, as the library's LM
    /// heads apply it). Errors when that adapter has no invertible adapter.
    pub fn invertible_adapter_inverse(&self, x: &Tensor) -> Result<Tensor> {
        let children = self.active_children()?;
        let first = children.first().ok_or_else(|| Error::Input("no active adapter".into()))?;
        let nice = first.nice()?.ok_or_else(|| Error::Input(format!("adapter `{}` has no invertible adapter", first.name())))?;
        self.backend.nice(x, &nice, true)
    }

    /// One adapter's NICE block, forward or inverse, on any `[.., H]` tensor.
    pub fn invertible_adapter(&self, name: &str, x: &Tensor, inverse: bool) -> Result<Tensor> {
        let adapter = self.adapters.get(name).ok_or_else(|| self.unknown(name))?;
        let nice = adapter.nice()?.ok_or_else(|| Error::Input(format!("adapter `{name}` has no invertible adapter")))?;
        self.backend.nice(x, &nice, inverse)
    }

    // ---- forward -------------------------------------------------------------------------------

    /// Eval-mode forward (no dropout) with the active adapter setup. The batch must have been
    /// validated against this model's config (`InputBatch::new` does that); ids are re-checked by
    /// the embedding op regardless. Under Parallel the outputs have N·B rows after the first
    /// adapter location, and `hidden_states` before it keep B rows, as in the library.
    ///
    /// Non-finite values (float32 overflow from huge weights or scalings) are an error, not an
    /// output: `Error::NonFinite` names the first place they appear (the embeddings, the NICE
    /// block, a layer's attention / attention output location / FFN / FFN output location with
    /// its adapter, or the pooler). Each layer's output is scanned once; nothing else is checked
    /// unless that scan fails.
    pub fn forward(&self, batch: &InputBatch) -> Result<BertOutput> {
        self.run(batch, RunOptions { record: false, check_finite: true, pooler: true }).map(|(out, _)| out)
    }

    /// Training-mode dropout for `forward_train` (BERT's hidden and attention-probability dropout,
    /// and each adapter's own): masks are derived from `seed`, so change it every step. `None`
    /// (the default) trains with eval numerics. `forward` never drops out.
    ///
    /// The seed goes into a small device buffer that the dropout kernels read (one 8-byte upload
    /// per call); a tape recorded under the previous seed is refused by `backward`.
    pub fn set_dropout(&mut self, seed: Option<u64>) {
        self.version += 1;
        self.dropout_seed = seed;
        let Some(seed) = seed else { return };
        let words = [seed as u32, (seed >> 32) as u32];
        let written = match &self.seed_buffer {
            Some((_, buf)) => self.backend.write_u32(buf, &words).map(|_| buf.clone()),
            None => self.backend.upload_u32(words.to_vec(), &[2]),
        };
        // Without a buffer (a device write failed) kernels fall back to the seed as an argument.
        self.seed_buffer = written.ok().map(|buf| (seed, buf));
    }

    /// What a recording forward (`forward_train`, `train_step`) keeps of the rows of frozen
    /// Parallel branches: [`FrozenRows::Copy`] (the default: the smallest tape) or
    /// [`FrozenRows::Share`] (no copies; the saved tensors' frozen rows stay alive with the tape).
    /// The gradients are the same bit for bit. A tape recorded before still serves `backward`.
    pub fn set_frozen_rows(&mut self, rows: FrozenRows) {
        self.frozen_rows = rows;
    }

    /// What [`BertModel::set_frozen_rows`] chose.
    pub fn frozen_rows(&self) -> FrozenRows {
        self.frozen_rows
    }

    /// Data-parallel training: the batches this model trains on are shards of a global batch
    /// that start at global row `row`, and their dropout masks are those rows' masks in the
    /// global batch (`DropoutSpec::offset`), so N ranks draw exactly what one process would.
    /// 0 (the default) outside data-parallel training. A tape recorded before is refused.
    pub fn set_dropout_row(&mut self, row: u64) {
        self.version += 1;
        self.dropout_row = row;
    }

    /// Loss scaling for `train_step` (torch's `GradScaler`, one scale at a time): the loss gradient
    /// is multiplied by `scale` before the backward, so activation gradients stored in f16 keep
    /// their small values out of f16's subnormals, and the gradient arena is divided by it after
    /// the backward, before clipping and AdamW. A power of two changes no f32 gradient (both
    /// products are exact); an overflow anywhere makes the gradient norm non-finite and the step
    /// updates nothing ([`crate::train::LossScaler`] decides what happens next). 1 (the default)
    /// scales nothing. Anything but a positive finite value is refused.
    pub fn set_loss_scale(&mut self, scale: f32) -> Result<()> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::Input(format!("set_loss_scale: {scale} must be positive and finite")));
        }
        self.loss_scale = scale;
        Ok(())
    }

    /// The loss scale `train_step` applies (`set_loss_scale`).
    pub fn loss_scale(&self) -> f32 {
        self.loss_scale
    }

    /// Forward that also keeps what `backward` needs; applies dropout when `set_dropout` gave a seed.
    pub fn forward_train(&self, batch: &InputBatch) -> Result<(BertOutput, Tape)> {
        self.forward_train_with(batch, RunOptions { record: true, check_finite: true, pooler: true })
    }

    pub(crate) fn forward_train_with(&self, batch: &InputBatch, opts: RunOptions) -> Result<(BertOutput, Tape)> {
        let (out, tape) = self.run(batch, RunOptions { record: true, ..opts })?;
        Ok((out, tape.ok_or_else(|| Error::Internal("forward_train recorded no tape".into()))?))
    }

    fn run(&self, batch: &InputBatch, opts: RunOptions) -> Result<(BertOutput, Option<Tape>)> {
        let RunOptions { record, check_finite, pooler: want_pooler } = opts;
        let training = record && self.dropout_seed.is_some();
        let drop = |p: f32, layer: usize, site: DropoutSite, rows: usize| -> Option<DropoutSpec> {
            if !training {
                return None;
            }
            let n = self.active.as_ref().map_or(1, |s| s.names().len());
            let blocks = if n > 1 && rows == n * batch.batch { (0..n as u64).collect() } else { vec![0] };
            self.dropout_site(self.dropout_seed, p, layer, site, blocks, batch.seq_len)
        };
        let (p_hidden, p_attn) = (self.config.hidden_dropout_prob, self.config.attention_probs_dropout_prob);
        let be = self.backend.as_ref();
        let cfg = &self.config;
        let w = &self.weights;
        if batch.seq_len > cfg.max_seq_len() {
            return Err(Error::Input(crate::io::batch::too_long(batch.seq_len, cfg)));
        }
        let children = self.active_children()?;
        if let Some(setup) = &self.active {
            self.validate_setup(setup)?;
        }
        let parallel = self.active.as_ref().is_some_and(AdapterSetup::is_parallel);

        let inputs = self.input_buffers(batch)?;
        let embed_drop = drop(p_hidden, 0, DropoutSite::Embeddings, batch.batch);
        let embed_ln = LayerNormParams { gamma: &w.embeddings_ln_gamma, beta: &w.embeddings_ln_beta, eps: cfg.layer_norm_eps };
        let mut x = be.embedding_layernorm(&inputs.ids, &inputs.types, &w.word_embeddings, &w.position_embeddings, &w.token_type_embeddings, cfg.positions(), embed_ln, embed_drop.as_ref())?;
        // A backend in a low-precision activation mode (the CUDA backend's bf16) writes its
        // activations here in that dtype; every later op, and the backward, follows it.
        let activations = x.dtype();
        if check_finite && !be.all_finite(&x)? {
            return Err(Error::NonFinite { at: "the embeddings".into() });
        }
        // The backward plan, made now from the trainable set (the tape keeps only what it reads).
        let plan = if record { self.plan(&children) } else { None };
        let n_branches = children.len().max(1);
        let live_ranges: Vec<std::ops::Range<usize>> = match &plan {
            Some(p) => (0..n_branches).filter(|&i| p.live.get(i).copied().unwrap_or(true)).map(|i| i * batch.batch..(i + 1) * batch.batch).collect(),
            None => Vec::new(),
        };
        // Rows of frozen Parallel branches are not kept: copied out, so their storage is freed,
        // or under FrozenRows::Share a view of the one live block, with no copy.
        let keep = |t: Tensor| -> Result<Tensor> {
            if live_ranges.len() < n_branches && n_branches > 1 && t.shape()[0] == n_branches * batch.batch {
                match (&live_ranges[..], self.frozen_rows) {
                    ([one], FrozenRows::Share) => t.narrow_rows(one.start, one.len()),
                    _ => be.select_rows(&t, &live_ranges),
                }
            } else {
                Ok(t)
            }
        };
        let lowest = plan.as_ref().map(|p| p.lowest);
        let embeddings = if plan.as_ref().is_some_and(|p| p.nice_trainable) { Some(x.clone()) } else { None };
        // Only the first adapter of the setup applies its NICE, before any replication.
        if let Some(nice) = children.first().map(|a| a.nice()).transpose()?.flatten() {
            x = be.nice(&x, &nice, false)?;
            if check_finite && !be.all_finite(&x)? {
                return Err(Error::NonFinite { at: format!("the invertible adapter (NICE) of `{}`", children[0].name()) });
            }
        }
        // [B, T] for every branch: the attention op reads row `b % B` (never tiled).
        let mask = inputs.mask;
        let mut replicated = false;
        let act = Activation::from(cfg.hidden_act);
        let mut hidden_states = Vec::with_capacity(cfg.num_hidden_layers + 1);
        let mut layers = Vec::new();
        let mut replicated_at = Vec::new();
        for (l, layer) in w.layers.iter().enumerate() {
            hidden_states.push(x.clone());
            let qkv = be.linear(&x, &layer.qkv_w, Some(&layer.qkv_b))?;
            let rows = x.shape()[0];
            let (context, lse) = be.attention_packed(&qkv, &mask, cfg.num_attention_heads, drop(p_attn, l, DropoutSite::AttentionProbs, rows).as_ref())?;
            let h1 = be.linear_dropout(&context, &layer.attn_out_w, Some(&layer.attn_out_b), drop(p_hidden, l, DropoutSite::AttentionOutput, rows).as_ref())?;
            let ln1 = LayerNormParams { gamma: &layer.attn_ln_gamma, beta: &layer.attn_ln_beta, eps: cfg.layer_norm_eps };
            let (x_attn, rep_mh, attn_saved) =
                self.location(&children, l, Location::MultiHead, &h1, &x, ln1, parallel, &mut replicated, batch.seq_len, training, record)?;
            // The pre-activation is kept only where the plan's backward reads it.
            let (inter, inter_pre) = if record && lowest.is_some_and(|lo| lo < position(l, Location::Output)) {
                let (y, pre) = be.linear_act(&x_attn, &layer.intermediate_w, Some(&layer.intermediate_b), act)?;
                (y, Some(pre))
            } else {
                (be.linear_act_only(&x_attn, &layer.intermediate_w, Some(&layer.intermediate_b), act)?, None)
            };
            let h2 = be.linear_dropout(&inter, &layer.output_w, Some(&layer.output_b), drop(p_hidden, l, DropoutSite::FfnOutput, x_attn.shape()[0]).as_ref())?;
            let ln2 = LayerNormParams { gamma: &layer.output_ln_gamma, beta: &layer.output_ln_beta, eps: cfg.layer_norm_eps };
            let (x_out, rep_out, ffn_saved) =
                self.location(&children, l, Location::Output, &h2, &x_attn, ln2, parallel, &mut replicated, batch.seq_len, training, record)?;
            // One pass over the layer's output; only when it fails are the intermediates scanned.
            if check_finite && !be.all_finite(&x_out)? {
                return Err(self.locate_non_finite(&children, l, [&h1, &x_attn, &h2, &x_out], batch.batch)?);
            }
            if record {
                replicated_at.push([rep_mh, rep_out]);
                // Keep what the backward of the plan reads at this layer, nothing below `lowest`.
                let kept = match lowest {
                    Some(lowest) if lowest <= position(l, Location::Output) => {
                        let below_ffn = lowest < position(l, Location::Output);
                        let through_attention = lowest < position(l, Location::MultiHead);
                        let opt = |keep_it: bool, t: Tensor| -> Result<Option<Tensor>> { if keep_it { keep(t).map(Some) } else { Ok(None) } };
                        let keep_location = |saved: Option<LocationTape>| -> Result<LocationTape> {
                            match saved {
                                Some(LocationTape::Plain { z, stats }) => Ok(LocationTape::Plain { z: keep(z)?, stats: keep(stats)? }),
                                Some(LocationTape::Adapter { h, r }) => Ok(LocationTape::Adapter { h: keep(h)?, r: keep(r)? }),
                                None => Err(Error::internal("a recording forward saved no location")),
                            }
                        };
                        Some(LayerTape {
                            ffn: keep_location(ffn_saved)?,
                            inter_pre: match inter_pre {
                                Some(pre) if below_ffn => Some(keep(pre)?),
                                _ => None,
                            },
                            attn: if below_ffn { Some(keep_location(attn_saved)?) } else { None },
                            qkv: opt(through_attention, qkv)?,
                            lse: opt(through_attention, lse)?,
                            mask: through_attention.then(|| mask.clone()),
                        })
                    }
                    _ => None,
                };
                layers.push(kept);
            }
            x = x_out;
        }
        hidden_states.push(x.clone());
        let (pooler_output, pooler_pre) = match &w.pooler {
            Some((pw, pb)) if want_pooler => {
                let (pooled, pre) = be.linear_act(&be.first_token(&x)?, pw, Some(pb), Activation::Tanh)?;
                if check_finite && !be.all_finite(&pooled)? {
                    return Err(Error::NonFinite { at: "the pooler".into() });
                }
                (Some(pooled), Some(pre))
            }
            _ => (None, None),
        };
        let tape = record.then(|| Tape {
            batch: batch.batch,
            seq_len: batch.seq_len,
            branches: children.len().max(1),
            replicated: parallel && replicated,
            activations,
            embeddings,
            layers,
            replicated_at,
            pooler_pre: pooler_pre.filter(|_| plan.is_some()),
            dropout_seed: if training { self.dropout_seed } else { None },
            plan,
            setup: children.iter().map(|a| a.name().to_string()).collect(),
            trainable: self.trainable.clone(),
            version: self.version,
        });
        let branches = if parallel && replicated { children.len() } else { 1 };
        Ok((BertOutput { last_hidden_state: x, pooler_output, hidden_states, branches }, tape))
    }

    /// The batch's ids, token types and mask bias in the model's fixed device buffers: written in
    /// place when the last batch had this shape and nothing else still holds those buffers (a
    /// tape of an earlier step keeps its own mask), allocated afresh otherwise. So a training loop
    /// of repeated shapes writes its inputs into the same three buffers every step.
    pub(crate) fn input_buffers(&self, batch: &InputBatch) -> Result<InputBuffers> {
        let be = self.backend.as_ref();
        let shape = [batch.batch, batch.seq_len];
        let mut slot = self.inputs.lock().unwrap_or_else(|e| e.into_inner());
        if self.capturing {
            // Staged by capture_train_step just before the capture began.
            return slot.as_ref().filter(|b| b.ids.shape() == shape).cloned().ok_or_else(|| Error::Internal("a captured step found no staged inputs of its shape".into()));
        }
        let mask_bias = mask_bias(batch);
        if let Some(b) = slot.as_ref() {
            if b.ids.shape() == shape && b.ids.is_unique() && b.types.is_unique() && b.mask.is_unique() {
                be.write_u32(&b.ids, &batch.input_ids)?;
                be.write_u32(&b.types, &batch.token_type_ids)?;
                be.write_f32(&b.mask, &mask_bias)?;
                return Ok(b.clone());
            }
        }
        let fresh = InputBuffers {
            ids: be.upload_u32(batch.input_ids.clone(), &shape)?,
            types: be.upload_u32(batch.token_type_ids.clone(), &shape)?,
            mask: be.upload(mask_bias, &shape)?,
        };
        *slot = Some(fresh.clone());
        Ok(fresh)
    }

    /// The error for layer `layer` whose output holds non-finite values: the first of its
    /// `[attention, attention output location, FFN, FFN output location]` outputs that holds them,
    /// and at an adapter location the adapter (under Parallel, the first branch whose rows hold
    /// them). Runs only on the error path.
    fn locate_non_finite(&self, children: &[&Adapter], layer: usize, outputs: [&Tensor; 4], batch: usize) -> Result<Error> {
        let be = self.backend.as_ref();
        const OPS: [(&str, Option<Location>); 4] =
            [("attention", None), ("attention output location", Some(Location::MultiHead)), ("FFN", None), ("FFN output location", Some(Location::Output))];
        for (t, (op, location)) in outputs.into_iter().zip(OPS) {
            if be.all_finite(t)? {
                continue;
            }
            let mut at = format!("layer {layer}'s {op}");
            let here: Vec<&Adapter> = match location {
                Some(loc) => children.iter().copied().filter(|a| a.config().has_location(layer, loc)).collect(),
                None => Vec::new(),
            };
            let n = here.len();
            if n == 1 {
                at += &format!(" (adapter `{}`)", here[0].name());
            } else if n > 1 {
                let mut culprit = None;
                if t.shape()[0] == n * batch {
                    for (i, a) in here.iter().enumerate() {
                        if !be.all_finite(&be.select_rows(t, std::slice::from_ref(&(i * batch..(i + 1) * batch)))?)? {
                            culprit = Some(a.name());
                            break;
                        }
                    }
                }
                match culprit {
                    Some(name) => at += &format!(" (adapter `{name}`)"),
                    None => at += &format!(" (adapters {})", here.iter().map(|a| format!("`{}`", a.name())).collect::<Vec<_>>().join(", ")),
                }
            }
            return Ok(Error::NonFinite { at });
        }
        Ok(Error::NonFinite { at: format!("layer {layer}'s output") })
    }

    /// The bottleneck weights of `children` (whose Parallel branch ids are `ids`) at one location,
    /// each with its adapter dropout when `dropout_seed` is given.
    pub(crate) fn location_branches<'a>(
        &self,
        children: &[&'a Adapter],
        ids: Vec<u64>,
        layer: usize,
        location: Location,
        dropout_seed: Option<u64>,
        seq_len: usize,
    ) -> Result<Vec<BottleneckParams<'a>>> {
        let site = match location {
            Location::MultiHead => DropoutSite::AdapterAttention,
            Location::Output => DropoutSite::AdapterOutput,
        };
        let mut out = Vec::new();
        for (a, id) in children.iter().zip(ids) {
            if let Some(mut p) = a.bottleneck(layer, location)? {
                p.dropout = self.dropout_site(dropout_seed, a.config().dropout as f32, layer, site, vec![id], seq_len);
                out.push(p);
            }
        }
        Ok(out)
    }

    /// One adapter location: plain `LN(h + r)` where no active adapter has a module, otherwise
    /// the backend's location op for all children at once. With `record`, also what its
    /// backward reads: `z` and `[mean, rstd]` for a plain one, `h` and `r` for an adapter one.
    #[allow(clippy::too_many_arguments)]
    fn location(
        &self,
        children: &[&Adapter],
        layer: usize,
        location: Location,
        h: &Tensor,
        r: &Tensor,
        ln: LayerNormParams,
        parallel: bool,
        replicated: &mut bool,
        seq_len: usize,
        training: bool,
        record: bool,
    ) -> Result<(Tensor, bool, Option<LocationTape>)> {
        let seed = if training { self.dropout_seed } else { None };
        let branches = self.location_branches(children, (0..children.len() as u64).collect(), layer, location, seed, seq_len)?;
        if branches.is_empty() {
            if record {
                let (y, z, stats) = self.backend.residual_layernorm_stats(h, Some(r), ln.gamma, ln.beta, ln.eps)?;
                return Ok((y, false, Some(LocationTape::Plain { z, stats })));
            }
            return Ok((self.backend.residual_layernorm(h, Some(r), ln.gamma, ln.beta, ln.eps)?, false, None));
        }
        let steps = location_steps(children);
        let replicate = parallel && !*replicated;
        *replicated |= parallel;
        let out = self.backend.adapter_location(&AdapterLocation { h, r, layer_norm: ln, steps, branches: &branches, replicate, seq_len })?;
        Ok((out, replicate, record.then(|| LocationTape::Adapter { h: h.clone(), r: r.clone() })))
    }
}
