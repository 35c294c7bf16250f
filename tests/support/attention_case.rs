//! The attention tests' random inputs (tests/cuda_attention.rs, cuda_attention_backward.rs,
//! cuda_bf16_attention.rs): a packed `[B, T, 3H]` Q/K/V and its additive mask rows.
//! Included with `#[path]`, not a crate.
#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::Rng;

/// HF's extended attention mask value for padding (`(1 - mask) * -10000`).
pub const PAD: f32 = -10000.0;

#[derive(Clone, Copy, Debug)]
pub enum MaskKind {
    /// No padding: all zeros.
    Zeros,
    /// One mask row per batch row; the first keeps every key (the longest sequence sets T in a
    /// padded batch), the others a random prefix of length >= 1 and pad the rest (no row is
    /// fully padded).
    Padded,
    /// `rows` padded mask rows shared by a batch that replicates them (Parallel branches: batch
    /// row b reads mask row b % rows).
    Shared(usize),
}

/// Q, K and V packed per token as `[q | k | v]`, `[B, T, 3H]`, and the mask rows `[rows, T]`.
#[derive(Clone, Debug)]
pub struct AttentionInputs {
    pub qkv: Vec<f32>,
    pub mask: Vec<f32>,
    pub batch: usize,
    pub seq: usize,
    pub hidden: usize,
    pub heads: usize,
}

impl AttentionInputs {
    /// Q and K uniform in ±√6 (scaled scores with standard deviation 2, up to about ±10, like a
    /// trained BERT's), V uniform in ±2; `d` is the head dimension.
    pub fn random(rng: &mut StdRng, batch: usize, seq: usize, d: usize, heads: usize, mask: MaskKind) -> AttentionInputs {
        let hidden = d * heads;
        let a = 6f32.sqrt();
        let mut qkv = Vec::with_capacity(batch * seq * 3 * hidden);
        for _ in 0..batch * seq {
            qkv.extend((0..2 * hidden).map(|_| rng.random_range(-a..a)));
            qkv.extend((0..hidden).map(|_| rng.random_range(-2.0f32..2.0)));
        }
        let mask_rows = match mask {
            MaskKind::Zeros | MaskKind::Padded => batch,
            MaskKind::Shared(rows) => rows,
        };
        let mut m = vec![0f32; mask_rows * seq];
        if !matches!(mask, MaskKind::Zeros) {
            for row in m.chunks_mut(seq).skip(1) {
                let keep = rng.random_range(1..=seq);
                row[keep..].iter_mut().for_each(|x| *x = PAD);
            }
        }
        AttentionInputs { qkv, mask: m, batch, seq, hidden, heads }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    pub fn mask_rows(&self) -> usize {
        self.mask.len() / self.seq.max(1)
    }

    /// Q, K and V unpacked, each `[B, T, H]`.
    pub fn split(&self) -> [Vec<f32>; 3] {
        let h = self.hidden;
        let part = |i: usize| self.qkv.chunks(3 * h).flat_map(|row| row[i * h..(i + 1) * h].iter().copied()).collect();
        [part(0), part(1), part(2)]
    }

    pub fn label(&self) -> String {
        format!("B={} T={} d={} heads={} mask_rows={}", self.batch, self.seq, self.head_dim(), self.heads, self.mask_rows())
    }
}
