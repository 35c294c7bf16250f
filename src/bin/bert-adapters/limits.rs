//! Bounds on what one command may ask of the machine, checked before anything is allocated, so
//! a flag like `--batch-size 1000000000000` is a clear error rather than an abort.

use bert_adapters::{BertConfig, Error, Result};

/// Texts per training step. Far above what adapter training uses (8–64); the memory estimate
/// below is the real limit on a given machine.
pub const MAX_BATCH_SIZE: usize = 4096;

/// Rows per forward when a command runs many texts without gradients (`run`, `predict`,
/// evaluation): few enough that a batch of 512-token texts stays small, many enough to keep the
/// GEMMs efficient.
pub fn rows_per_chunk(seq_len: usize) -> usize {
    (8192 / seq_len.max(1)).clamp(1, 64)
}

/// Bytes a training step keeps alive at its peak, roughly and on the high side: per token row
/// and layer, the tape (input, q, k, v, attention output, location outputs: ~8 × hidden, the
/// FFN's pre-activation: intermediate) and an attention row per head, for every Parallel
/// branch, doubled for the backward's temporaries.
pub fn training_step_bytes(cfg: &BertConfig, rows: usize, seq_len: usize) -> u128 {
    let per_token = cfg.num_hidden_layers as u128 * (8 * cfg.hidden_size as u128 + cfg.intermediate_size as u128 + (cfg.num_attention_heads * seq_len) as u128);
    2 * 4 * rows as u128 * seq_len as u128 * per_token
}

/// Memory the OS says is available (Linux `MemAvailable`), if it can tell.
fn available_bytes() -> Option<u128> {
    bert_adapters::data::available_memory().map(u128::from)
}

fn gib(bytes: u128) -> f64 {
    bytes as f64 / (1u128 << 30) as f64
}

/// Refuse `what` when it needs more memory than the machine has available.
pub fn check_fits(what: &str, bytes: u128, advice: &str) -> Result<()> {
    match available_bytes() {
        Some(avail) if bytes > avail => Err(Error::Input(format!("{what} needs about {:.1} GiB, but {:.1} GiB is available; {advice}", gib(bytes), gib(avail)))),
        _ => Ok(()),
    }
}
