//! BERT embeddings: `word[id] + token_type[tt] + position[p]` for every token (the LayerNorm after
//! them is `layernorm`), `p` the token's position row: `t` for BERT, counted from the ids for
//! RoBERTa ([`Positions`]). Layout: tables `[rows, H]`, ids `[B·T]`, output `[B·T, H]`, row-major.
//! Numerics: f32 adds in HF's association order, so they round as PyTorch's do. No backward: the
//! embeddings are frozen.

use crate::backend::{Positions, TokenBatch};

/// `word[id] + position[p] + token_type[tt]` for every token, `[B·T, H]`.
pub fn embedding(tokens: &TokenBatch, word: &[f32], position: &[f32], token_type: &[f32], hidden: usize, positions: Positions) -> Vec<f32> {
    let mut y = vec![0f32; tokens.batch * tokens.seq_len * hidden];
    let pos = positions.position_ids(tokens.input_ids, tokens.seq_len);
    for b in 0..tokens.batch {
        for t in 0..tokens.seq_len {
            let row = b * tokens.seq_len + t;
            let id = tokens.input_ids[row] as usize;
            let tt = tokens.token_type_ids[row] as usize;
            let p = pos[row] as usize;
            for h in 0..hidden {
                // Same association order as HF: (word + type) + position.
                let v = (word[id * hidden + h] + token_type[tt * hidden + h]) + position[p * hidden + h];
                y[row * hidden + h] = v;
            }
        }
    }
    y
}
