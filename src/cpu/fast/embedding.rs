//! BERT embeddings, one token row per rayon task, in the same f32 association order as
//! `reference::embedding`, so the two agree bit for bit. Layout as there. No backward (frozen).

use rayon::prelude::*;

use crate::backend::TokenBatch;

pub fn embedding(tokens: &TokenBatch, word: &[f32], position: &[f32], token_type: &[f32], hidden: usize) -> Vec<f32> {
    let mut y = crate::cpu::pool::buffer(tokens.batch * tokens.seq_len * hidden);
    y.par_chunks_mut(hidden).enumerate().for_each(|(row, out)| {
        let t = row % tokens.seq_len;
        let w = &word[tokens.input_ids[row] as usize * hidden..][..hidden];
        let ty = &token_type[tokens.token_type_ids[row] as usize * hidden..][..hidden];
        let p = &position[t * hidden..][..hidden];
        for h in 0..hidden {
            out[h] = (w[h] + ty[h]) + p[h];
        }
    });
    y
}
