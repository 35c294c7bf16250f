//! Training state and the manual backward.
//!
//! The backward is planned, not discovered: from the trainable adapters and the active setup the
//! model decides which Parallel branches carry gradient ("live") and the lowest position that
//! holds a trainable parameter; it then walks down from the output to that position and stops.
//! Frozen weights never get a weight-gradient product; rows of a branch whose path reaches no
//! trainable parameter are dropped before the first product.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use crate::backend::{Activation, AdapterLocation, Backend, BottleneckGrads, BottleneckParams, DropoutSpec, GradsOut, LayerNormParams, NiceGrads};
use crate::config::Location;
use crate::error::{Error, Result};
use crate::model::adapters::{location_prefix, nice_prefix, Adapter};
use crate::model::bert::{location_steps, BertModel};
use crate::tensor::{DType, Tensor};

/// What the backward of one LayerNorm location reads.
pub(crate) enum LocationTape {
    /// No adapter here: `LN(h + r)` needs only its input `z = h + r` and `[mean, rstd]`.
    Plain { z: Tensor, stats: Tensor },
    /// An adapter location: its inputs `h` (the sub-layer output) and `r` (the residual).
    Adapter { h: Tensor, r: Tensor },
}

impl LocationTape {
    fn tensors(&self) -> [&Tensor; 2] {
        match self {
            LocationTape::Plain { z, stats } => [z, stats],
            LocationTape::Adapter { h, r } => [h, r],
        }
    }
}

/// What one layer's forward keeps for the backward: the FFN output location always, the rest
/// only when the backward goes below that location (see `Plan::lowest`).
pub struct LayerTape {
    pub(crate) ffn: LocationTape,
    /// The FFN's pre-activation and the attention output location: when the backward reaches
    /// the attention output location.
    pub(crate) inter_pre: Option<Tensor>,
    pub(crate) attn: Option<LocationTape>,
    /// The packed Q, K, V `[rows, T, 3H]` and the `[B, T]` mask: when the backward goes through
    /// the attention.
    pub(crate) qkv: Option<Tensor>,
    /// The attention's row log-sum-exp `[rows, heads, T]`, from which the backward recomputes
    /// the probabilities.
    pub(crate) lse: Option<Tensor>,
    pub(crate) mask: Option<Tensor>,
}

/// What `forward_train` keeps of the rows of a Parallel setup's frozen branches (those no
/// trainable parameter lies on: `train_adapter(tasknn)` under `Parallel(scorenn, tasknn)` leaves
/// scorenn's rows with no backward to run). [`BertModel::set_frozen_rows`] chooses.
///
/// [`BertModel::set_frozen_rows`]: crate::model::BertModel::set_frozen_rows
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FrozenRows {
    /// Copy the live branches' rows out of every saved tensor, so that the frozen branches' rows
    /// are freed with the forward: the smallest tape, at one device copy per saved tensor (about
    /// 6 a layer; an H100 spent ~0.75 ms of a 19 ms BERT-base 32×128 step on them, 2026-11-27).
    #[default]
    Copy,
    /// Keep a view of the live rows where they are one block (one live branch, the usual
    /// alternation), with no copy: each saved tensor's storage, frozen rows included, then stays
    /// alive until the tape is dropped, which is what PyTorch + `adapters` keeps for both
    /// branches. Several live blocks are still copied.
    Share,
}

/// What `forward_train` keeps: the plan it was made for, and per layer only what the backward of
/// that plan reads (layers below the lowest trainable position keep nothing; after the Parallel
/// replication only the rows of live branches are kept).
pub struct Tape {
    pub(crate) batch: usize,
    pub(crate) seq_len: usize,
    pub(crate) branches: usize,
    pub(crate) replicated: bool,
    /// The dtype of the activations (f32, or bf16 with a bf16 activation backend): the
    /// backward's gradients flow in it.
    pub(crate) activations: DType,
    /// The embedding output (NICE's input), when the NICE block is trainable.
    pub(crate) embeddings: Option<Tensor>,
    pub(crate) layers: Vec<Option<LayerTape>>,
    /// Whether the Parallel replication happened at [attention location, FFN location], per layer.
    pub(crate) replicated_at: Vec<[bool; 2]>,
    pub(crate) pooler_pre: Option<Tensor>,
    /// The dropout seed of the forward, if it dropped out.
    pub(crate) dropout_seed: Option<u64>,
    /// The backward plan (None: nothing trainable is reached) and what it was made under.
    pub(crate) plan: Option<Plan>,
    pub(crate) setup: Vec<String>,
    pub(crate) trainable: BTreeSet<String>,
    pub(crate) version: u64,
}

impl Tape {
    /// Bytes of memory this tape keeps alive: each storage it holds a view of, whole, counted
    /// once (the mask shared by all layers once; under [`FrozenRows::Share`] the frozen rows a
    /// view keeps alive too).
    pub fn bytes(&self) -> usize {
        let mut seen: Vec<usize> = Vec::new();
        let mut total = 0;
        let mut add = |t: &Tensor| {
            let id = t.storage().id();
            if !seen.contains(&id) {
                seen.push(id);
                total += t.storage().bytes();
            }
        };
        for lt in self.layers.iter().flatten() {
            let locations = lt.ffn.tensors().into_iter().chain(lt.attn.iter().flat_map(LocationTape::tensors));
            for t in locations.chain([lt.inter_pre.as_ref(), lt.qkv.as_ref(), lt.lse.as_ref(), lt.mask.as_ref()].into_iter().flatten()) {
                add(t);
            }
        }
        for t in self.embeddings.iter().chain(&self.pooler_pre) {
            add(t);
        }
        total
    }

    /// Layers that keep anything.
    pub fn layers_kept(&self) -> usize {
        self.layers.iter().filter(|l| l.is_some()).count()
    }
}

/// A tensor the plan said the tape would keep.
fn kept<'a>(t: &'a Option<Tensor>, what: &str, layer: usize) -> Result<&'a Tensor> {
    t.as_ref().ok_or_else(|| Error::internal(format!("the tape of layer {layer} lacks {what}, which its plan needs")))
}

/// The dropout at `site` of `layer`, if training with a seed and `p > 0`.
pub(crate) fn dropout_spec(seed: Option<u64>, p: f32, layer: usize, site: DropoutSite, blocks: Vec<u64>) -> Option<DropoutSpec> {
    let seed = seed?;
    (p > 0.0).then_some(DropoutSpec { p, seed, stream: ((layer as u64) << 4) | site as u64, blocks, seed_buffer: None, offset: 0 })
}

impl BertModel {
    /// `dropout_spec`, reading the seed from the model's device buffer when `seed` is the one
    /// `set_dropout` wrote there (always, for a tape the version check accepts), for a batch of
    /// `seq_len` tokens whose first row is row `set_dropout_row` of the global batch.
    pub(crate) fn dropout_site(&self, seed: Option<u64>, p: f32, layer: usize, site: DropoutSite, blocks: Vec<u64>, seq_len: usize) -> Option<DropoutSpec> {
        let mut spec = dropout_spec(seed, p, layer, site, blocks)?;
        spec.seed_buffer = self.seed_buffer_for(spec.seed);
        let (h, t) = (self.config.hidden_size as u64, seq_len as u64);
        let per_row = match site {
            DropoutSite::AttentionProbs => self.config.num_attention_heads as u64 * t * t,
            DropoutSite::HeadInput | DropoutSite::HeadHidden => h,
            _ => t * h,
        };
        spec.offset = self.dropout_row * per_row;
        Some(spec)
    }

    /// The model's seed buffer, when it holds `seed`.
    pub(crate) fn seed_buffer_for(&self, seed: u64) -> Option<crate::backend::SeedBuffer> {
        match &self.seed_buffer {
            Some((value, buf)) if *value == seed => Some(crate::backend::SeedBuffer(buf.clone())),
            _ => None,
        }
    }
}

/// The places that drop out, numbering their mask streams (with the layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DropoutSite {
    Embeddings = 1,
    AttentionProbs = 2,
    AttentionOutput = 3,
    FfnOutput = 4,
    AdapterAttention = 5,
    AdapterOutput = 6,
    /// A classification head's Dropout modules (layer 0; the block is the branch index):
    /// module 0, before the first Linear, and module 3, before the output Linear of two layers.
    HeadInput = 7,
    HeadHidden = 8,
}

/// Gradients of the trainable tensors, by library key (no `bert.` prefix).
pub type Gradients = BTreeMap<String, Tensor>;

/// Where a backward puts parameter gradients, by key. The first contribution to a key overwrites
/// its destination; later ones (the same adapter in two Parallel branches, a head applied to two
/// branches) add to it, so nothing needs zeroing first.
pub(crate) trait GradSink {
    /// The destination of `key`'s gradient (of `shape`), and whether it already holds a
    /// contribution of this backward (then the op accumulates). The key counts as reached.
    fn dest(&mut self, be: &dyn Backend, key: &str, shape: &[usize]) -> Result<(Tensor, bool)>;
}

/// Returned gradients: a new tensor per key, made on first use (`Backend::empty`: the first
/// contribution overwrites it).
impl GradSink for Gradients {
    fn dest(&mut self, be: &dyn Backend, key: &str, shape: &[usize]) -> Result<(Tensor, bool)> {
        if let Some(t) = self.get(key) {
            if t.shape() != shape {
                return Err(Error::internal(format!("the gradient of `{key}` was made {:?} and is now {shape:?}", t.shape())));
            }
            return Ok((t.clone(), true));
        }
        let t = be.empty(shape, crate::tensor::DType::F32)?;
        self.insert(key.to_string(), t.clone());
        Ok((t, false))
    }
}

/// The destinations of tensors one op writes together (one module's weight and bias, one
/// adapter's modules at a location): all first contributions or all later ones.
pub(crate) fn dests<const N: usize>(sink: &mut dyn GradSink, be: &dyn Backend, keys: [(String, &[usize]); N]) -> Result<([Tensor; N], bool)> {
    let mut out = Vec::with_capacity(N);
    let mut seen = None;
    for (key, shape) in &keys {
        let (t, again) = sink.dest(be, key, shape)?;
        if seen.is_some_and(|s| s != again) {
            return Err(Error::internal(format!("`{key}` was reached {} the other tensors of its module", if again { "before" } else { "after" })));
        }
        seen = Some(again);
        out.push(t);
    }
    let out: [Tensor; N] = out.try_into().map_err(|_| Error::internal("gradient destinations"))?;
    Ok((out, seen.unwrap_or(false)))
}

/// `t` itself when no other handle shares its storage, else a copy: a buffer about to be
/// accumulated into must not change what another holder reads (a plain location returns one
/// gradient for both `h` and `r`; a caller keeps the gradient it passed in).
pub(crate) fn owned(be: &dyn Backend, t: Tensor) -> Result<Tensor> {
    if t.is_unique() {
        return Ok(t);
    }
    let copy = be.zeros(t.shape(), t.dtype())?;
    be.add_into(&copy, &t)?;
    Ok(copy)
}

/// Position of a location in forward order: 0 is the embedding output (NICE).
pub(crate) fn position(layer: usize, location: Location) -> usize {
    match location {
        Location::MultiHead => 1 + 2 * layer,
        Location::Output => 2 + 2 * layer,
    }
}

/// The backward plan for one (setup, trainable set), made by `forward_train`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Plan {
    /// Per branch: does any trainable parameter lie on its path?
    pub(crate) live: Vec<bool>,
    /// Per branch: is its adapter trainable?
    pub(crate) trainable: Vec<bool>,
    pub(crate) nice_trainable: bool,
    /// The lowest position holding a trainable parameter on a live path.
    pub(crate) lowest: usize,
}

impl BertModel {
    /// Make exactly these adapters trainable (their bottleneck parameters at every location and
    /// their invertible adapter); everything else is frozen. Unlike the library's
    /// `train_adapter`, this does not change the active setup: Parallel(scorenn, tasknn) keeps
    /// running both while one trains.
    pub fn train_adapter(&mut self, names: &[&str]) -> Result<()> {
        self.version += 1;
        for n in names {
            if !self.adapters.contains_key(*n) {
                return Err(Error::Input(format!("train_adapter: no adapter named `{n}` (adapters: {})", self.adapter_names().join(", "))));
            }
        }
        self.trainable = names.iter().map(|n| n.to_string()).collect();
        Ok(())
    }

    /// Freeze every adapter.
    pub fn freeze_all(&mut self) {
        self.version += 1;
        self.trainable.clear();
    }

    pub fn trainable_adapters(&self) -> &BTreeSet<String> {
        &self.trainable
    }

    /// Trainable parameters the active setup never reaches, one sentence per adapter (empty when
    /// all are reached); check after `train_adapter` and `set_active_adapters`. As in the library,
    /// only the first child's invertible adapter (NICE) runs, so a trainable adapter with
    /// `inv_adapter` that is not the first child gets no gradient for its NICE block: it learns
    /// nothing there, and AdamW skips it (no decay), as torch does for `grad is None`. A
    /// trainable adapter outside the active setup gets no gradients at all. Not an error: the
    /// bottleneck modules of an active adapter still train.
    pub fn training_warnings(&self) -> Vec<String> {
        let active: &[String] = self.active.as_ref().map_or(&[], |s| s.names());
        let mut warnings = Vec::new();
        for name in &self.trainable {
            let Some(adapter) = self.adapters.get(name) else { continue };
            if !active.contains(name) {
                warnings.push(format!("adapter `{name}` is trainable but not in the active setup: it gets no gradients, so it will not be trained (nor decayed)"));
            } else if adapter.config().inv_adapter && active.first() != Some(name) {
                warnings.push(format!(
                    "adapter `{name}` has an invertible adapter, but the active setup runs only its first adapter's (`{}`): `{name}`'s is not run, gets no gradients, and will not be trained (nor decayed)",
                    active[0]
                ));
            }
        }
        warnings
    }

    /// Every trainable tensor with its library key, in key order: the trainable adapters'
    /// parameters and NICE blocks, and their heads.
    pub fn trainable_tensors(&self) -> Vec<(&str, &Tensor)> {
        let adapters = self.trainable.iter().filter_map(|n| self.adapters.get(n)).flat_map(|a| a.params().iter());
        let heads = self.trainable.iter().filter_map(|n| self.heads.get(n)).flat_map(|h| h.params().iter());
        let mut all: Vec<(&str, &Tensor)> = adapters.chain(heads).map(|(k, t)| (k.as_str(), t)).collect();
        all.sort_by_key(|(k, _)| *k);
        all
    }

    /// Mutable access for an optimizer: the parameters of one adapter by key.
    pub fn adapter_params_mut(&mut self, name: &str) -> Result<&mut BTreeMap<String, Tensor>> {
        self.version += 1;
        let known = self.adapter_names().join(", ");
        self.adapters
            .get_mut(name)
            .map(Adapter::params_mut)
            .ok_or_else(|| Error::Input(format!("no adapter named `{name}` (adapters: {known})")))
    }

    pub(crate) fn plan(&self, children: &[&Adapter]) -> Option<Plan> {
        let trainable: Vec<bool> = children.iter().map(|a| self.trainable.contains(a.name())).collect();
        let nice_trainable = trainable.first().copied().unwrap_or(false) && children[0].config().inv_adapter;
        let live: Vec<bool> = trainable.iter().map(|&t| t || nice_trainable).collect();
        let mut lowest = None;
        if nice_trainable {
            lowest = Some(0);
        } else {
            'search: for layer in 0..self.config.num_hidden_layers {
                for location in Location::BOTH {
                    if children.iter().zip(&trainable).any(|(a, &t)| t && a.config().has_location(layer, location)) {
                        lowest = Some(position(layer, location));
                        break 'search;
                    }
                }
            }
        }
        lowest.map(|lowest| Plan { live, trainable, nice_trainable, lowest })
    }

    /// Gradients of the trainable tensors for `d_last = ∂L/∂last_hidden_state` (and optionally
    /// `∂L/∂pooler_output`), from a `forward_train` tape of the same setup. A trainable tensor
    /// that the setup never reaches (an inactive adapter, the NICE of a Parallel child that is
    /// not the first) has no entry, like torch's `grad is None`, so AdamW skips it rather than
    /// decaying it. A parameter reached by several branches (the same adapter twice in Parallel)
    /// gets the sum of their gradients. A gradient holding NaN or ±inf is an `Error::NonFinite`
    /// naming its key (the first in key order).
    pub fn backward(&self, tape: &Tape, d_last: &Tensor, d_pooler: Option<&Tensor>) -> Result<Gradients> {
        let mut grads = Gradients::new();
        self.backward_into(tape, d_last.clone(), d_pooler, &mut grads)?;
        // One pass over each gradient computed (adapter-sized, small next to the backward).
        let be = self.backend.as_ref();
        for (key, g) in &grads {
            if !be.all_finite(g)? {
                return Err(Error::NonFinite { at: format!("the gradient of `{key}`") });
            }
        }
        Ok(grads)
    }

    /// `backward` with the parameter gradients written into `sink`'s destinations (a training
    /// step's are views of the gradient arena) and no finiteness scan (a training step checks the
    /// gradient norm instead). `d_last` is taken by value: when the caller keeps no other handle,
    /// the pooler's gradient accumulates into it rather than into a copy.
    pub(crate) fn backward_into(&self, tape: &Tape, d_last: Tensor, d_pooler: Option<&Tensor>, sink: &mut dyn GradSink) -> Result<()> {
        let be = self.backend.as_ref();
        let cfg = &self.config;
        let children = self.active_children()?;
        // Contributions accumulate: a parameter used by several branches (`Parallel(a, a)`) gets
        // the sum of their gradients (the sink says which contribution is the first).
        let rows_out = if tape.replicated { tape.branches * tape.batch } else { tape.batch };
        let want = [rows_out, tape.seq_len, cfg.hidden_size];
        if d_last.shape() != want {
            return Err(Error::Input(format!("gradient of last_hidden_state has shape {:?}, expected {want:?}", d_last.shape())));
        }
        // The tape holds what its plan needs: a tape made under another setup, trainable set or
        // parameter version cannot serve this backward.
        let setup: Vec<String> = children.iter().map(|a| a.name().to_string()).collect();
        if tape.setup != setup || tape.trainable != self.trainable || tape.version != self.version {
            let why = if tape.setup != setup {
                format!("the active setup was [{}] and is [{}]", tape.setup.join(", "), setup.join(", "))
            } else if tape.trainable != self.trainable {
                let names = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(", ");
                format!("the trainable adapters were [{}] and are [{}]", names(&tape.trainable), names(&self.trainable))
            } else {
                "adapters, heads or their parameters changed since".to_string()
            };
            return Err(Error::Input(format!("backward: this tape was recorded by forward_train under another setup ({why}); run forward_train again")));
        }
        let Some(plan) = tape.plan.clone() else {
            return Ok(()); // nothing trainable is reached by this setup
        };

        // Branch row blocks that carry gradient (all rows before replication).
        let n = tape.branches;
        let block = tape.batch;
        let live_ranges: Vec<Range<usize>> =
            (0..n).filter(|&i| plan.live.get(i).copied().unwrap_or(true)).map(|i| i * block..(i + 1) * block).collect();
        let all_live = live_ranges.len() == n;
        let live_rows = |t: &Tensor| -> Result<Tensor> {
            if all_live || t.shape()[0] != n * block || n == 1 {
                Ok(t.clone())
            } else if let [one] = &live_ranges[..] {
                // One live branch is one contiguous block of rows: a view, no copy.
                t.narrow_rows(one.start, one.len())
            } else {
                be.select_rows(t, &live_ranges)
            }
        };

        // A gradient given in another dtype than the activations (an f32 d_last for a bf16
        // forward) is converted first: every backward op takes its operands in one dtype.
        let mut d = if d_last.dtype() == tape.activations { d_last } else { be.cast(&d_last, tape.activations)? };
        if let (Some(dp), Some(pre), Some((pw, _))) = (d_pooler, &tape.pooler_pre, &self.weights.pooler) {
            let dp_cast;
            let dp = if dp.dtype() == pre.dtype() {
                dp
            } else {
                dp_cast = be.cast(dp, pre.dtype())?;
                &dp_cast
            };
            let dpre = be.activation_backward(dp, pre, Activation::Tanh)?;
            let dfirst = be.linear_backward_input(&dpre, pw)?;
            d = owned(be, d)?;
            be.first_token_backward_into(&dfirst, &d, true)?;
        }
        d = live_rows(&d)?;
        let live_children: Vec<&Adapter> = children.iter().zip(&plan.live).filter(|(_, &l)| l).map(|(a, _)| *a).collect();
        let live_trainable: Vec<bool> = plan.trainable.iter().zip(&plan.live).filter(|(_, &l)| l).map(|(&t, _)| t).collect();

        let act = Activation::from(cfg.hidden_act);
        // Where the batch was replicated, so dropout masks can be matched to their row blocks.
        let replicated_at = tape.replicated_at.iter().enumerate().find_map(|(l, rep)| {
            rep.iter().position(|&r| r).map(|i| position(l, if i == 0 { Location::MultiHead } else { Location::Output }))
        });
        let live_ids: Vec<u64> = (0..n).filter(|&i| plan.live.get(i).copied().unwrap_or(true)).map(|i| i as u64).collect();
        let blocks = |pos: usize| -> Vec<u64> {
            match replicated_at {
                Some(r) if r < pos && n > 1 => live_ids.clone(),
                _ => vec![0],
            }
        };
        let (p_hidden, p_attn) = (cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob);
        let seed = tape.dropout_seed;
        for (l, (lt, w)) in tape.layers.iter().zip(&self.weights.layers).enumerate().rev() {
            let lt = lt.as_ref().ok_or_else(|| Error::internal(format!("the tape keeps nothing of layer {l}, which its plan reaches")))?;
            let rep = tape.replicated_at[l];
            // FFN output location.
            let ln2 = LayerNormParams { gamma: &w.output_ln_gamma, beta: &w.output_ln_beta, eps: cfg.layer_norm_eps };
            let below = plan.lowest < position(l, Location::Output);
            let (dh2, dx_attn) = self.location_backward(
                &live_children, &live_ids, seed, &live_trainable, &children, l, Location::Output, &lt.ffn, ln2, rep[1],
                tape.seq_len, &d, below, &live_rows, sink,
            )?;
            if !below {
                break;
            }
            let (mut dh2, dx_attn) = both(dh2, dx_attn)?;
            // h2 is the FFN output after dropout; rows are replicated if that happened at or before
            // this layer's attention location.
            if let Some(spec) = self.dropout_site(seed, p_hidden, l, DropoutSite::FfnOutput, blocks(position(l, Location::MultiHead) + 1), tape.seq_len) {
                dh2 = be.dropout(&dh2, &spec)?;
            }
            let dpre = be.linear_backward_input_act(&dh2, &w.output_w, &live_rows(kept(&lt.inter_pre, "the FFN pre-activation", l)?)?, act)?;
            // The residual stream's gradient gets the FFN's in the product (dx_attn += dpre·W).
            // dh2 is read no more: dropped, a plain location's dx_attn (its clone) is unique.
            drop(dh2);
            let dx_attn = owned(be, dx_attn)?;
            be.linear_backward_input_into(&dpre, &w.intermediate_w, &dx_attn, true)?;

            // Attention output location.
            let ln1 = LayerNormParams { gamma: &w.attn_ln_gamma, beta: &w.attn_ln_beta, eps: cfg.layer_norm_eps };
            let below = plan.lowest < position(l, Location::MultiHead);
            let (dh1, dx_in) = self.location_backward(
                &live_children, &live_ids, seed, &live_trainable, &children, l, Location::MultiHead,
                lt.attn.as_ref().ok_or_else(|| Error::internal(format!("the tape of layer {l} lacks the attention output location")))?, ln1, rep[0],
                tape.seq_len, &dx_attn, below, &live_rows, sink,
            )?;
            if !below {
                break;
            }
            let (mut dh1, dx_in) = both(dh1, dx_in)?;
            let attn_blocks = blocks(position(l, Location::MultiHead));
            if let Some(spec) = self.dropout_site(seed, p_hidden, l, DropoutSite::AttentionOutput, attn_blocks.clone(), tape.seq_len) {
                dh1 = be.dropout(&dh1, &spec)?;
            }
            let dctx = be.linear_backward_input(&dh1, &w.attn_out_w)?;
            drop(dh1); // read no more (see dh2)
            let prob_dropout = self.dropout_site(seed, p_attn, l, DropoutSite::AttentionProbs, attn_blocks, tape.seq_len);
            let qkv = live_rows(kept(&lt.qkv, "Q, K, V", l)?)?;
            let lse = live_rows(kept(&lt.lse, "the attention log-sum-exp", l)?)?;
            let dqkv = be.attention_packed_backward(&dctx, &qkv, &lse, kept(&lt.mask, "the mask", l)?, cfg.num_attention_heads, prob_dropout.as_ref())?;
            // One input-gradient product through the packed [3H, H] weight, into the residual's.
            let dx_in = owned(be, dx_in)?;
            be.linear_backward_input_into(&dqkv, &w.qkv_w, &dx_in, true)?;
            d = dx_in;
        }
        if plan.nice_trainable {
            let first = children[0];
            let nice = first.nice()?.ok_or_else(|| Error::internal(format!("adapter `{}` lost its NICE block", first.name())))?;
            let embeddings = tape.embeddings.as_ref().ok_or_else(|| Error::internal("the tape lacks the embeddings its plan needs"))?;
            let p = nice_prefix(first.name());
            let key = |sub: &str, what: &str| format!("{p}{sub}.{what}");
            let shape = |(w, b): (&Tensor, &Tensor)| (w.shape().to_vec(), b.shape().to_vec());
            let [(f0w, f0b), (f2w, f2b), (g0w, g0b), (g2w, g2b)] = [shape(nice.f0), shape(nice.f2), shape(nice.g0), shape(nice.g2)];
            let ([f0w, f0b, f2w, f2b, g0w, g0b, g2w, g2b], accumulate) = dests(
                sink,
                be,
                [
                    (key("F.0", "weight"), &f0w),
                    (key("F.0", "bias"), &f0b),
                    (key("F.2", "weight"), &f2w),
                    (key("F.2", "bias"), &f2b),
                    (key("G.0", "weight"), &g0w),
                    (key("G.0", "bias"), &g0b),
                    (key("G.2", "weight"), &g2w),
                    (key("G.2", "bias"), &g2b),
                ],
            )?;
            let out = GradsOut { grads: NiceGrads { f0: (f0w, f0b), f2: (f2w, f2b), g0: (g0w, g0b), g2: (g2w, g2b) }, accumulate };
            be.nice_backward_into(embeddings, &nice, &d, &out)?;
        }
        Ok(())
    }

    /// Backward of one location for the live branches: writes parameter gradients into `grads`
    /// and returns `(dh, dr)` when `need_input` (plain locations always return them).
    #[allow(clippy::too_many_arguments)]
    fn location_backward(
        &self,
        live_children: &[&Adapter],
        live_ids: &[u64],
        dropout_seed: Option<u64>,
        live_trainable: &[bool],
        children: &[&Adapter],
        layer: usize,
        location: Location,
        saved: &LocationTape,
        ln: LayerNormParams,
        replicated_here: bool,
        seq_len: usize,
        d_out: &Tensor,
        need_input: bool,
        live_rows: &dyn Fn(&Tensor) -> Result<Tensor>,
        sink: &mut dyn GradSink,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let be = self.backend.as_ref();
        let branches = self.location_branches(live_children, live_ids.to_vec(), layer, location, dropout_seed, seq_len)?;
        let (h, r) = match (saved, branches.is_empty()) {
            (LocationTape::Plain { z, stats }, true) => {
                // Plain LN(h + r) from its saved input and statistics: the same gradient flows
                // to h and to r.
                let dz = be.layernorm_backward_stats(d_out, &live_rows(z)?, &live_rows(stats)?, ln.gamma)?;
                return Ok((Some(dz.clone()), Some(dz)));
            }
            (LocationTape::Adapter { h, r }, false) => (h, r),
            _ => return Err(Error::internal(format!("layer {layer}: the tape's location kind disagrees with the adapters there"))),
        };
        let steps = location_steps(children);
        // Before replication h and r have B rows shared by every branch; after, live rows only.
        let (h, r) = if replicated_here { (h.clone(), r.clone()) } else { (live_rows(h)?, live_rows(r)?) };
        let loc = AdapterLocation { h: &h, r: &r, layer_norm: ln, steps, branches: &branches, replicate: replicated_here, seq_len };
        // Destinations in branch order: a second branch of the same adapter accumulates.
        let mut grads = Vec::with_capacity(branches.len());
        for ((adapter, p), &trainable) in live_children.iter().zip(&branches).zip(live_trainable) {
            grads.push(if trainable { Some(bottleneck_dests(sink, be, adapter, layer, location, p)?) } else { None });
        }
        be.adapter_location_backward_into(&loc, d_out, &grads, need_input)
    }
}

/// Input gradients a location returned when asked for them.
fn both(dh: Option<Tensor>, dr: Option<Tensor>) -> Result<(Tensor, Tensor)> {
    match (dh, dr) {
        (Some(dh), Some(dr)) => Ok((dh, dr)),
        _ => Err(Error::internal("adapter_location_backward: input gradients were asked for but not returned")),
    }
}

/// The destinations of one adapter's parameter gradients at one location, by state-dict key.
fn bottleneck_dests(sink: &mut dyn GradSink, be: &dyn Backend, adapter: &Adapter, layer: usize, location: Location, params: &BottleneckParams) -> Result<GradsOut<BottleneckGrads>> {
    let p = location_prefix(adapter.name(), layer, location);
    let down = if adapter.config().ln_before { "adapter_down.1" } else { "adapter_down.0" };
    let mut first = None;
    // Named in the order the shapes are asked for by `shaped_like`.
    let mut names = vec![format!("{p}{down}.weight"), format!("{p}{down}.bias"), format!("{p}adapter_up.weight"), format!("{p}adapter_up.bias")];
    if params.ln_before.is_some() {
        names.extend([format!("{p}adapter_norm_before.weight"), format!("{p}adapter_norm_before.bias")]);
    }
    if params.ln_after.is_some() {
        names.extend([format!("{p}adapter_norm_after.weight"), format!("{p}adapter_norm_after.bias")]);
    }
    if params.gate.is_some() {
        names.extend([format!("{p}gate.weight"), format!("{p}gate.bias")]);
    }
    if !matches!(params.scaling, crate::backend::ScalingParam::Fixed(_)) {
        names.push(format!("{p}scaling"));
    }
    let mut names = names.into_iter();
    let grads = BottleneckGrads::shaped_like(params, |shape| {
        let key = names.next().ok_or_else(|| Error::internal("more bottleneck gradients than keys"))?;
        let (t, again) = sink.dest(be, &key, shape)?;
        if first.get_or_insert(again) != &again {
            return Err(Error::internal(format!("`{key}` was reached {} the other tensors of its adapter", if again { "before" } else { "after" })));
        }
        Ok(t)
    })?;
    Ok(GradsOut { grads, accumulate: first.unwrap_or(false) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;

    /// A buffer shared with another handle (a plain location's `dz.clone()` for both `h` and
    /// `r`) is copied before anything accumulates into it; a unique one is used as it is.
    #[test]
    fn only_a_unique_buffer_is_accumulated_into_in_place() {
        let be = CpuBackend::fast();
        let dz = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
        let dh = dz.clone();
        let dr = owned(&be, dz).unwrap();
        assert!(!dr.shares_storage(&dh), "a shared gradient must be copied");
        let w = Tensor::from_vec(vec![1.0, 0.0, 0.0, 1.0], &[2, 2]).unwrap();
        be.linear_backward_input_into(&w, &w, &dr, true).unwrap();
        assert_eq!(&*dh.cpu_data().unwrap(), &[1.0, 2.0, 3.0, 4.0], "the other handle still reads the old gradient");
        assert_eq!(&*dr.cpu_data().unwrap(), &[2.0, 2.0, 3.0, 5.0]);
        let storage = dr.storage().id();
        assert_eq!(owned(&be, dr).unwrap().storage().id(), storage, "a unique gradient is not copied");
    }
}
