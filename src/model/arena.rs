//! Flat parameter arenas: every trainable tensor of one adapter (its bottleneck modules at every
//! location, its invertible adapter, and its head) in one contiguous device buffer, with a
//! key → (offset, shape) table.
//!
//! The adapter and head keep their `key → Tensor` maps, but each entry becomes a view of the
//! arena, so forward, save/load, `--grad-probe` and `trainable_tensors` see the library's
//! state-dict keys unchanged, while the optimizer, the gradient norm and the gradient buffer
//! work on one buffer per adapter (one launch, one all-reduce later). A map entry replaced by a
//! tensor that is not a view of the arena (a user assigning a new tensor) is noticed and the
//! arena is rebuilt from the map.

use std::collections::BTreeMap;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::backward::{GradSink, Gradients};
use crate::tensor::{DType, Tensor};
use crate::train::optim::ArenaEntry;

/// One adapter's trainable tensors, packed, with a gradient buffer of the same layout.
pub struct TrainArena {
    /// In key order: the adapter's keys, then its head's.
    pub table: Vec<ArenaEntry>,
    /// `[N]` f32: the parameters; the adapter's and head's maps hold views of it.
    pub params: Tensor,
    /// `[N]` f32: the gradients of one step. The backward writes them in place (its first
    /// contribution to a tensor overwrites, later ones add), so an entry that got no gradient
    /// this step holds stale values: `with_grad` says which did.
    pub grads: Tensor,
    /// Per table entry: whether the last training step gave it a gradient (clipping and AdamW
    /// read only those).
    pub with_grad: Vec<bool>,
}

impl TrainArena {
    /// Pack `maps` (the adapter's parameters, then its head's) into one arena and replace every
    /// entry by a view of it. Values are copied on the device.
    pub fn pack(backend: &dyn Backend, maps: &mut [&mut BTreeMap<String, Tensor>]) -> Result<Self> {
        let mut table = Vec::new();
        let mut n = 0usize;
        for map in maps.iter() {
            for (key, t) in map.iter() {
                if t.dtype() != DType::F32 {
                    return Err(Error::Unsupported(format!("trainable tensor `{key}` is {}; adapters keep f32 master weights", t.dtype())));
                }
                table.push(ArenaEntry { key: key.clone(), offset: n, shape: t.shape().to_vec() });
                n += t.elem_count();
            }
        }
        let params = backend.zeros(&[n], DType::F32)?;
        let grads = backend.zeros(&[n], DType::F32)?;
        let mut i = 0;
        for map in maps.iter_mut() {
            for (_, t) in map.iter_mut() {
                let e = &table[i];
                let view = params.view(e.offset, &e.shape)?;
                backend.add_into(&view, t)?; // the arena starts at zero, so this copies (−0 becomes +0)
                *t = view;
                i += 1;
            }
        }
        let with_grad = vec![false; table.len()];
        Ok(TrainArena { table, params, grads, with_grad })
    }

    /// Whether `maps` still hold exactly this arena's views, key for key.
    pub fn is_current(&self, maps: &[&BTreeMap<String, Tensor>]) -> bool {
        let mut entries = self.table.iter();
        for map in maps {
            for (key, t) in map.iter() {
                match entries.next() {
                    Some(e) if e.key == *key && e.shape == t.shape() && t.shares_storage(&self.params) && t.offset() == self.params.offset() + e.offset => {}
                    _ => return false,
                }
            }
        }
        entries.next().is_none()
    }

    /// The gradient buffer's view for entry `i`.
    pub fn grad(&self, i: usize) -> Result<Tensor> {
        let e = self.table.get(i).ok_or_else(|| Error::Internal(format!("arena entry {i} of {}", self.table.len())))?;
        self.grads.view(e.offset, &e.shape)
    }

    /// Bytes of parameters (the gradient buffer is the same again).
    pub fn bytes(&self) -> usize {
        self.params.size_in_bytes()
    }
}

/// A training step's gradient destinations: the arena's gradient views, marked as they are
/// reached. A key outside the arena (an adapter that is trainable but not the one this step
/// updates) gets a new tensor, which the step drops.
pub(crate) struct ArenaSink<'a> {
    arena: &'a TrainArena,
    index: std::collections::HashMap<&'a str, usize>,
    pub with_grad: Vec<bool>,
    others: Gradients,
}

impl<'a> ArenaSink<'a> {
    /// No entry reached yet: nothing needs zeroing, as every first contribution overwrites.
    pub fn new(arena: &'a TrainArena) -> Self {
        let index = arena.table.iter().enumerate().map(|(i, e)| (e.key.as_str(), i)).collect();
        ArenaSink { arena, index, with_grad: vec![false; arena.table.len()], others: Gradients::new() }
    }

    /// Going on from an earlier backward into the same arena (gradient accumulation): the
    /// entries it reached (`with_grad`) are added to, the others written on first contribution.
    pub fn continuing(arena: &'a TrainArena, with_grad: Vec<bool>) -> Self {
        let mut sink = ArenaSink::new(arena);
        if with_grad.len() == sink.with_grad.len() {
            sink.with_grad = with_grad;
        }
        sink
    }
}

impl GradSink for ArenaSink<'_> {
    fn dest(&mut self, be: &dyn Backend, key: &str, shape: &[usize]) -> Result<(Tensor, bool)> {
        let Some(&i) = self.index.get(key) else {
            return self.others.dest(be, key, shape);
        };
        let view = self.arena.grad(i)?;
        if view.shape() != shape {
            return Err(Error::Internal(format!("the arena holds `{key}` as {:?}, its gradient is {shape:?}", view.shape())));
        }
        let again = std::mem::replace(&mut self.with_grad[i], true);
        Ok((view, again))
    }
}
