//! Tokenization with HF `tokenizers` from a `tokenizer.json`: special tokens, padding to the
//! longest text of the batch, truncation to the model's `max_position_embeddings`.

use std::path::{Path, PathBuf};

use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::io::InputBatch;

pub struct BertTokenizer {
    path: PathBuf,
    inner: Tokenizer,
}

impl BertTokenizer {
    /// Load `tokenizer.json` and set padding (longest, the file's pad token or `[PAD]`) and
    /// truncation (`max_len` tokens including specials).
    pub fn from_file(path: impl AsRef<Path>, max_len: usize) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if !path.is_file() {
            return Err(Error::io(&path, std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found")));
        }
        let tok_err = |msg: String| Error::Tokenizer { path: path.clone(), msg };
        let mut inner = Tokenizer::from_file(&path).map_err(|e| tok_err(format!("cannot load: {e}")))?;
        let mut padding = inner.get_padding().cloned().unwrap_or_else(|| {
            let (pad_id, pad_token) = match inner.token_to_id("[PAD]") {
                Some(id) => (id, "[PAD]".to_string()),
                None => (0, "[PAD]".to_string()),
            };
            PaddingParams { pad_id, pad_token, ..Default::default() }
        });
        padding.strategy = PaddingStrategy::BatchLongest;
        padding.pad_to_multiple_of = None;
        inner.with_padding(Some(padding));
        let truncation = TruncationParams { max_length: max_len, ..inner.get_truncation().cloned().unwrap_or_default() };
        inner.with_truncation(Some(truncation)).map_err(|e| tok_err(format!("cannot set truncation: {e}")))?;
        Ok(BertTokenizer { path, inner })
    }

    /// Tokenize `texts` as one batch and validate the ids against `cfg`.
    pub fn encode_batch(&self, texts: &[String], cfg: &BertConfig) -> Result<InputBatch> {
        if texts.is_empty() {
            return Err(Error::Input("no texts to tokenize".into()));
        }
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), true)
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
