//! The embedding + LayerNorm test case shared by tests/cuda_elementwise.rs (f32) and
//! tests/cuda_bf16_elementwise.rs (every table value drawn as a bf16): ids, token types, tables
//! and LayerNorm parameters, and the CPU reference. Included with `#[path]`, not a crate.
#![allow(dead_code)]

use bert_adapters::cpu::reference;
use bert_adapters::{Positions, TokenBatch};
use rand::rngs::StdRng;
use rand::Rng;

pub const VOCAB: usize = 13;
pub const TYPE_VOCAB: usize = 2;
pub const MAX_POSITIONS: usize = 16;
/// BERT's `layer_norm_eps`.
pub const BERT_EPS: f32 = 1e-12;

#[derive(Clone)]
pub struct EmbeddingCase {
    pub batch: usize,
    pub seq_len: usize,
    pub hidden: usize,
    pub ids: Vec<u32>,
    pub types: Vec<u32>,
    pub word: Vec<f32>,
    pub position: Vec<f32>,
    pub token_type: Vec<f32>,
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    /// Which position row each token reads (BERT's `t` unless a test sets RoBERTa's).
    pub positions: Positions,
}

impl EmbeddingCase {
    /// Random ids and tables; `values` draws `n` values in `[lo, hi)` (plain, or rounded to bf16).
    pub fn random(rng: &mut StdRng, batch: usize, seq_len: usize, hidden: usize, values: fn(&mut StdRng, usize, f32, f32) -> Vec<f32>) -> Self {
        let n = batch * seq_len;
        // The last id of each table appears, so an off-by-one in the bound check fails.
        let ids = (0..n).map(|i| if i == n - 1 { VOCAB as u32 - 1 } else { rng.random_range(0..VOCAB as u32) }).collect();
        let types = (0..n).map(|i| if i == 0 { TYPE_VOCAB as u32 - 1 } else { rng.random_range(0..TYPE_VOCAB as u32) }).collect();
        EmbeddingCase {
            batch,
            seq_len,
            hidden,
            ids,
            types,
            // A common offset (|mean| > std): the two-pass statistics matter, and the plain bf16
            // sums lose the most.
            word: values(rng, VOCAB * hidden, 0.5, 1.5),
            position: values(rng, MAX_POSITIONS * hidden, -0.2, 0.2),
            token_type: values(rng, TYPE_VOCAB * hidden, -0.2, 0.2),
            gamma: values(rng, hidden, 0.5, 1.5),
            beta: values(rng, hidden, -0.5, 0.5),
            positions: Positions::Sequential,
        }
    }

    /// This case with RoBERTa's positions (padding_idx 1): the last `pad_tail[b]` tokens of
    /// sequence b become pad ids, and so does token 2 of every sequence longer than 3 (a pad id
    /// inside a sequence, which moves the positions after it).
    pub fn with_roberta_positions(mut self, pad_tail: &[usize]) -> Self {
        const PAD: u32 = 1;
        self.positions = Positions::FromIds { padding_idx: PAD };
        for (b, &tail) in pad_tail.iter().enumerate().take(self.batch) {
            let row = &mut self.ids[b * self.seq_len..(b + 1) * self.seq_len];
            for id in row.iter_mut() {
                if *id == PAD {
                    *id = PAD + 1; // only the pads placed below
                }
            }
            let n = row.len();
            for id in row[n - tail.min(n)..].iter_mut() {
                *id = PAD;
            }
            if n > 3 {
                row[2] = PAD;
            }
        }
        self
    }

    /// The f32 computation (the CPU reference: f32 sums in HF's order, LayerNorm in f64 inside).
    pub fn reference(&self) -> reference::LayerNormOut {
        let tokens = TokenBatch { batch: self.batch, seq_len: self.seq_len, input_ids: &self.ids, token_type_ids: &self.types };
        let z = reference::embedding(&tokens, &self.word, &self.position, &self.token_type, self.hidden, self.positions);
        reference::residual_layernorm(&z, None, &self.gamma, &self.beta, self.hidden, BERT_EPS)
    }
}
