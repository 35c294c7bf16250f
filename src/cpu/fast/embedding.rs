//! BERT embeddings, one token row per rayon task, in the same f32 association order as
//! `reference::embedding`, so the two agree bit for bit. Layout as there. No backward (frozen).

use rayon::prelude::*;

use crate::backend::{Positions, TokenBatch};

pub fn embedding(tokens: &TokenBatch, word: &[f32], position: &[f32], token_type: &[f32], hidden: usize, positions: Positions) -> Vec<f32> {
    let mut y = crate::cpu::pool::buffer(tokens.batch * tokens.seq_len * hidden);
    let pos = match positions {
        Positions::Sequential => None,
        Positions::FromIds { .. } => Some(positions.position_ids(tokens.input_ids, tokens.seq_len)),
    };
    y.par_chunks_mut(hidden).enumerate().for_each(|(row, out)| {
        let t = pos.as_ref().map_or(row % tokens.seq_len, |p| p[row] as usize);
        let w = &word[tokens.input_ids[row] as usize * hidden..][..hidden];
        let ty = &token_type[tokens.token_type_ids[row] as usize * hidden..][..hidden];
        let p = &position[t * hidden..][..hidden];
        for h in 0..hidden {
            out[h] = (w[h] + ty[h]) + p[h];
        }
    });
    y
}
