//! A batch of token ids with its attention mask and token types, validated against the config.

use std::path::Path;

use crate::backend::TokenBatch;
use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::io::tensor_file::TensorFile;

#[derive(Clone, Debug, PartialEq)]
pub struct InputBatch {
    pub batch: usize,
    pub seq_len: usize,
    /// `[batch·seq_len]`, row-major.
    pub input_ids: Vec<u32>,
    /// `[batch·seq_len]`, 1 for a real token, 0 for padding.
    pub attention_mask: Vec<u32>,
    pub token_type_ids: Vec<u32>,
}

impl InputBatch {
    /// Validate raw ids against `cfg`. `origin` names where they came from (a file path) and every
    /// message names it and the tensor at fault. A missing mask means all ones; missing token
    /// types mean all zeros, as in HF.
    pub fn new(
        origin: &Path,
        shape: &[usize],
        input_ids: &[i64],
        attention_mask: Option<(&[i64], &[usize])>,
        token_type_ids: Option<(&[i64], &[usize])>,
        cfg: &BertConfig,
    ) -> Result<Self> {
        let err = |name: &str, msg: String| Error::tensor(origin, name, msg);
        let &[batch, seq_len] = shape else {
            return Err(err("input_ids", format!("shape {shape:?} is not [batch, seq_len]")));
        };
        if input_ids.len() != batch * seq_len {
            return Err(err("input_ids", format!("{} values for shape {shape:?}", input_ids.len())));
        }
        if batch == 0 || seq_len == 0 {
            return Err(err("input_ids", format!("shape {shape:?} is empty")));
        }
        if seq_len > cfg.max_seq_len() {
            return Err(err("input_ids", too_long(seq_len, cfg)));
        }
        let at = |i: usize| format!("[{}, {}]", i / seq_len, i % seq_len);
        // `rule` completes "must be ...", e.g. "< vocab_size 120".
        let check = |name: &str, values: &[i64], limit: usize, rule: &str| -> Result<Vec<u32>> {
            values
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    if v < 0 || v as u64 >= limit as u64 {
                        Err(err(name, format!("value {v} at {} is out of range (must be {rule})", at(i))))
                    } else {
                        Ok(v as u32)
                    }
                })
                .collect()
        };
        let ids = check("input_ids", input_ids, cfg.vocab_size, &format!("< vocab_size {}", cfg.vocab_size))?;
        let other = |name: &str, given: Option<(&[i64], &[usize])>, limit: usize, rule: &str, default: u32| -> Result<Vec<u32>> {
            match given {
                None => Ok(vec![default; batch * seq_len]),
                Some((v, s)) if s != shape || v.len() != batch * seq_len => {
                    Err(err(name, format!("shape {s:?} differs from input_ids {shape:?}")))
                }
                Some((v, _)) => check(name, v, limit, rule),
            }
        };
        let mask = other("attention_mask", attention_mask, 2, "0 or 1", 1)?;
        let type_rule = format!("< type_vocab_size {}", cfg.type_vocab_size);
        let types = other("token_type_ids", token_type_ids, cfg.type_vocab_size, &type_rule, 0)?;
        Ok(InputBatch { batch, seq_len, input_ids: ids, attention_mask: mask, token_type_ids: types })
    }

    /// Read `input_ids` `[B,T]` and the optional `token_type_ids` (I64 or I32) and `attention_mask`
    /// (I64, I32, BOOL, U8 or I8).
    pub fn from_file(path: impl AsRef<Path>, cfg: &BertConfig) -> Result<Self> {
        let file = TensorFile::open(path.as_ref())?;
        let (ids, shape) = file.read_i64("input_ids")?;
        let mask = if file.contains("attention_mask") { Some(file.read_mask("attention_mask")?) } else { None };
        let types = if file.contains("token_type_ids") { Some(file.read_i64("token_type_ids")?) } else { None };
        Self::new(file.path(), &shape, &ids, as_view(&mask), as_view(&types), cfg)
    }

    /// Rows `rows` of the batch (a data-parallel shard), padded as the whole batch is: the same
    /// sequence length, so every row computes (and draws its dropout masks) as in the whole.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Result<InputBatch> {
        if rows.start >= rows.end || rows.end > self.batch {
            return Err(Error::Input(format!("rows {rows:?} of a batch of {}", self.batch)));
        }
        let cut = |v: &[u32]| v[rows.start * self.seq_len..rows.end * self.seq_len].to_vec();
        Ok(InputBatch {
            batch: rows.len(),
            seq_len: self.seq_len,
            input_ids: cut(&self.input_ids),
            attention_mask: cut(&self.attention_mask),
            token_type_ids: cut(&self.token_type_ids),
        })
    }

    pub fn tokens(&self) -> TokenBatch<'_> {
        TokenBatch { batch: self.batch, seq_len: self.seq_len, input_ids: &self.input_ids, token_type_ids: &self.token_type_ids }
    }
}

/// Why a sequence of `seq_len` tokens does not fit `cfg`'s position table, naming
/// `max_position_embeddings` (and for RoBERTa the padding_idx offset its positions start after).
pub(crate) fn too_long(seq_len: usize, cfg: &BertConfig) -> String {
    match cfg.positions() {
        crate::config::Positions::Sequential => format!("sequence length {seq_len} exceeds max_position_embeddings {}", cfg.max_position_embeddings),
        crate::config::Positions::FromIds { padding_idx } => format!(
            "sequence length {seq_len} does not fit max_position_embeddings {}: {} positions start at padding_idx {padding_idx} + 1, so at most {} tokens fit",
            cfg.max_position_embeddings,
            cfg.model_type,
            cfg.max_seq_len()
        ),
    }
}

fn as_view(o: &Option<(Vec<i64>, Vec<usize>)>) -> Option<(&[i64], &[usize])> {
    o.as_ref().map(|(v, s)| (v.as_slice(), s.as_slice()))
}
