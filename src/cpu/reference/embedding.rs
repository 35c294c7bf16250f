//! BERT embeddings: `word[id] + token_type[tt] + position[t]` for every token (the LayerNorm after
//! them is `layernorm`). Layout: tables `[rows, H]`, ids `[B·T]`, output `[B·T, H]`, row-major.
//! Numerics: f32 adds in HF's association order, so they round as PyTorch's do. No backward: the
//! embeddings are frozen.

use crate::backend::TokenBatch;

/// `word[id] + position[t] + token_type[tt]` for every token, `[B·T, H]`.
pub fn embedding(tokens: &TokenBatch, word: &[f32], position: &[f32], token_type: &[f32], hidden: usize) -> Vec<f32> {
    let mut y = vec![0f32; tokens.batch * tokens.seq_len * hidden];
    for b in 0..tokens.batch {
        for t in 0..tokens.seq_len {
            let row = b * tokens.seq_len + t;
            let id = tokens.input_ids[row] as usize;
            let tt = tokens.token_type_ids[row] as usize;
            for h in 0..hidden {
                // Same association order as HF: (word + type) + position.
                let v = (word[id * hidden + h] + token_type[tt * hidden + h]) + position[t * hidden + h];
                y[row * hidden + h] = v;
            }
        }
    }
    y
}
