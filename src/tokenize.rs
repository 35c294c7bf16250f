//! Tokenization with HF `tokenizers` from a `tokenizer.json` (BERT's WordPiece, RoBERTa's
//! byte-level BPE, XLM-R's Unigram: whatever the file describes): special tokens, padding to the
//! longest text of the batch, truncation to the model's `max_seq_len()` (`max_position_embeddings`,
//! less RoBERTa's position offset).

use std::path::{Path, PathBuf};

use tokenizers::{PaddingParams, PaddingStrategy, PostProcessor, Tokenizer, TruncationParams};

use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::io::InputBatch;

pub struct BertTokenizer {
    path: PathBuf,
    inner: Tokenizer,
    /// Characters of a text handed to the tokenizer (see `MAX_CHARS_PER_TOKEN`).
    max_chars: usize,
    /// What padding writes: the pad token's id and type id.
    pad: (u32, u32),
}

/// A text is cut to `MAX_CHARS_PER_TOKEN · max_len` characters before tokenizing, so a huge
/// line costs memory in proportion to `max_len`, not to its length (the tokenizer keeps offsets
/// and strings per character). WordPiece tokens average ~4 characters in English and a word
/// longer than 100 characters is one `[UNK]`, so 64 leaves a wide margin: only a text whose
/// first `max_len` tokens span more than 64 characters each on average (long runs of spaces or
/// symbols) can tokenize differently than uncut.
pub const MAX_CHARS_PER_TOKEN: usize = 64;

/// Training batches on a backend that reuses per-shape work are padded to a multiple of this
/// many tokens (see [`bucket_len`] and `Backend::length_bucket`).
pub const LENGTH_BUCKET: usize = 16;

/// The padded length of a batch whose longest text has `longest` tokens: the smallest multiple of
/// `bucket` (e.g. [`LENGTH_BUCKET`]; 1 pads to the longest text) that covers it, capped at
/// `max_len` (and never below `longest`). Random
/// training batches then take a few lengths (4 at `--max-len 64`) instead of one per batch, so a
/// backend that plans, compiles or allocates per shape reuses that work. Padding is masked out of
/// every attention and every loss, so without dropout results change only by float
/// reassociation; with dropout the masks are drawn per element of the padded batch, so another
/// length draws other (equally distributed) masks for the same tokens.
pub fn bucket_len(longest: usize, max_len: usize, bucket: usize) -> usize {
    let bucket = bucket.max(1);
    longest.div_ceil(bucket).saturating_mul(bucket).min(max_len).max(longest)
}

impl BertTokenizer {
    /// Load `tokenizer.json` and set padding (longest; the file's pad token, else the vocabulary's
    /// `[PAD]` (BERT) or `<pad>` (RoBERTa, XLM-R: HF's tokenizer files leave `padding` null and
    /// `RobertaTokenizerFast` pads with `<pad>`), else id 0) and truncation (`max_len` tokens
    /// including specials).
    pub fn from_file(path: impl AsRef<Path>, max_len: usize) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if !path.is_file() {
            return Err(Error::io(&path, std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found")));
        }
        let tok_err = |msg: String| Error::Tokenizer { path: path.clone(), msg };
        // The largest tokenizer.json files (XLM-R's) are ~17 MB; the cap keeps a wrong file from
        // being read whole.
        let bytes = crate::io::read_capped(&path, 256 << 20, "a tokenizer.json")?;
        let mut inner = Tokenizer::from_bytes(&bytes).map_err(|e| tok_err(format!("cannot load: {e}")))?;
        let mut padding = inner.get_padding().cloned().unwrap_or_else(|| {
            let (pad_id, pad_token) = ["[PAD]", "<pad>"]
                .iter()
                .find_map(|t| inner.token_to_id(t).map(|id| (id, t.to_string())))
                .unwrap_or((0, "[PAD]".to_string()));
            PaddingParams { pad_id, pad_token, ..Default::default() }
        });
        padding.strategy = PaddingStrategy::BatchLongest;
        let pad = (padding.pad_id, padding.pad_type_id);
        padding.pad_to_multiple_of = None;
        inner.with_padding(Some(padding));
        // The file's stride only shapes the overflowing pieces, which nothing here reads; kept,
        // a stride as large as the room left by the specials panics inside tokenizers.
        let truncation = TruncationParams { max_length: max_len, stride: 0, ..inner.get_truncation().cloned().unwrap_or_default() };
        // Specials the post-processor adds to one text (BERT's [CLS] and [SEP]): more than
        // max_len, tokenizers' room for the text would wrap around and truncation stop.
        let specials = inner.get_post_processor().map_or(0, |p| p.added_tokens(false));
        if specials > max_len {
            return Err(tok_err(format!("its post-processor adds {specials} special tokens to every text, more than a max length of {max_len} holds")));
        }
        inner.with_truncation(Some(truncation)).map_err(|e| tok_err(format!("cannot set truncation: {e}")))?;
        Ok(BertTokenizer { path, inner, max_chars: max_len.clamp(1, usize::MAX / MAX_CHARS_PER_TOKEN) * MAX_CHARS_PER_TOKEN, pad })
    }

    /// Characters kept of each text (the rest is cut before tokenizing).
    pub fn max_chars(&self) -> usize {
        self.max_chars
    }

    /// Tokens per text at most, `[CLS]` and `[SEP]` included.
    pub fn max_len(&self) -> usize {
        self.max_chars / MAX_CHARS_PER_TOKEN
    }

    /// Tokenize `texts` as one batch padded to `seq_len` tokens (at least the longest text's),
    /// so that batches of one stream of texts share one length.
    pub fn encode_batch_to(&self, texts: &[impl AsRef<str>], cfg: &BertConfig, seq_len: usize) -> Result<InputBatch> {
        self.pad_to(self.encode_batch(texts, cfg)?, cfg, seq_len)
    }

    /// Tokenize `texts` as one batch padded to [`bucket_len`] of its longest text (multiples of
    /// `bucket`), capped at `max_len()` and the model's positions: what `train` feeds its steps.
    pub fn encode_batch_bucketed(&self, texts: &[impl AsRef<str>], cfg: &BertConfig, bucket: usize) -> Result<InputBatch> {
        let b = self.encode_batch(texts, cfg)?;
        let seq_len = bucket_len(b.seq_len, self.max_len().min(cfg.max_seq_len()), bucket);
        self.pad_to(b, cfg, seq_len)
    }

    /// `b` with pad tokens (mask 0) appended to every row up to `seq_len` (unchanged if not shorter).
    fn pad_to(&self, b: InputBatch, cfg: &BertConfig, seq_len: usize) -> Result<InputBatch> {
        if b.seq_len >= seq_len {
            return Ok(b);
        }
        let pad = |v: &[u32], with: u32| -> Vec<i64> {
            v.chunks(b.seq_len).flat_map(|row| row.iter().map(|&x| x as i64).chain(std::iter::repeat_n(with as i64, seq_len - b.seq_len))).collect()
        };
        let shape = [b.batch, seq_len];
        let (ids, mask, types) = (pad(&b.input_ids, self.pad.0), pad(&b.attention_mask, 0), pad(&b.token_type_ids, self.pad.1));
        InputBatch::new(&self.path, &shape, &ids, Some((&mask, &shape)), Some((&types, &shape)), cfg)
    }

    /// Tokenize `texts` as one batch and validate the ids against `cfg`.
    pub fn encode_batch(&self, texts: &[impl AsRef<str>], cfg: &BertConfig) -> Result<InputBatch> {
        if texts.is_empty() {
            return Err(Error::Input("no texts to tokenize".into()));
        }
        let cut: Vec<&str> = texts.iter().map(|t| truncate_chars(t.as_ref(), self.max_chars)).collect();
        let encodings = self
            .inner
            .encode_batch(cut, true)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), msg: e.to_string() })?;
        let seq_len = encodings.iter().map(|e| e.len()).max().unwrap_or(0);
        let (mut ids, mut mask, mut types) = (Vec::new(), Vec::new(), Vec::new());
        for e in &encodings {
            ids.extend(e.get_ids().iter().map(|&v| v as i64));
            mask.extend(e.get_attention_mask().iter().map(|&v| v as i64));
            types.extend(e.get_type_ids().iter().map(|&v| v as i64));
        }
        let shape = [texts.len(), seq_len];
        InputBatch::new(&self.path, &shape, &ids, Some((&mask, &shape)), Some((&types, &shape)), cfg)
    }
}

/// The first `max` characters of `text` (all of it when shorter).
pub fn truncate_chars(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_multiples_of_16_capped_at_max_len() {
        assert_eq!(LENGTH_BUCKET, 16);
        for (longest, max_len, want) in [(1, 64, 16), (2, 64, 16), (16, 64, 16), (17, 64, 32), (33, 64, 48), (49, 64, 64), (64, 64, 64), (40, 40, 40), (33, 40, 40), (7, 10, 10), (3, 2, 3)] {
            assert_eq!(bucket_len(longest, max_len, LENGTH_BUCKET), want, "longest {longest}, max_len {max_len}");
        }
        // The smallest covering multiple, never more than max_len, never less than the longest text.
        for max_len in 2..=130 {
            for longest in 1..=max_len {
                let b = bucket_len(longest, max_len, LENGTH_BUCKET);
                assert_eq!(bucket_len(longest, max_len, 1), longest, "bucket 1 pads to the longest text");
                assert!(b >= longest && b <= max_len && (b.is_multiple_of(16) || b == max_len) && (b < 16 || b - 16 < longest || b == max_len), "{longest} {max_len} -> {b}");
            }
        }
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate_chars("héllo", 2), "hé");
        assert_eq!(truncate_chars("hé", 5), "hé");
        assert_eq!(truncate_chars("", 0), "");
    }
}
