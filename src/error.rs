//! The library's one error type. Every message names the file, tensor or field at fault so a
//! user can act on it without a backtrace.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OS refused to open, read or write a file.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    /// A file exists but its content is malformed (not JSON, truncated safetensors, ...).
    #[error("{}: {msg}", path.display())]
    Malformed { path: PathBuf, msg: String },

    /// A config field is missing, of the wrong type, or has a value we do not support.
    #[error("{}: field `{field}`: {msg}", path.display())]
    Config { path: PathBuf, field: String, msg: String },

    /// A named tensor in a file is missing, of the wrong dtype or shape, or holds bad values.
    #[error("{}: tensor `{name}`: {msg}", path.display())]
    Tensor { path: PathBuf, name: String, msg: String },

    /// Two tensors handed to an operation do not fit together. A bug in the caller, not a file.
    #[error("shape mismatch in {op}: {msg}")]
    Shape { op: &'static str, msg: String },

    /// A user-supplied value (token id, mask, sequence length, option) is out of range.
    #[error("invalid input: {0}")]
    Input(String),

    /// A feature that exists in the Python library but that we refuse rather than ignore.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// The tokenizer could not be loaded or failed on a text.
    #[error("{}: tokenizer: {msg}", path.display())]
    Tokenizer { path: PathBuf, msg: String },

    /// The CUDA driver, NVRTC or cuBLAS failed, or no GPU is present.
    #[error("CUDA: {0}")]
    Cuda(String),

    /// A forward or backward produced NaN or ±inf (weights, scalings or inputs so large that float32
    /// overflows). `at` names the first place they appeared, e.g. "layer 3's FFN output location
    /// (adapter `tasknn`)", "the embeddings" or "the gradient of `<key>`".
    #[error("non-finite values (NaN or ±inf) first appear in {at}")]
    NonFinite { at: String },

    /// An invariant of the library itself broke (a tape not recorded, a gradient not returned):
    /// no input can cause it, so it is a bug to report, never something to fix in the input.
    #[error("internal error (a bug in bert-adapters, please report it): {0}")]
    Internal(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub(crate) fn malformed(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Malformed { path: path.into(), msg: msg.into() }
    }
    pub(crate) fn config(path: impl Into<PathBuf>, field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { path: path.into(), field: field.into(), msg: msg.into() }
    }
    pub(crate) fn tensor(path: impl Into<PathBuf>, name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor { path: path.into(), name: name.into(), msg: msg.into() }
    }
    pub(crate) fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape { op, msg: msg.into() }
    }
    pub(crate) fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }
}

/// A number for a message, written short: plainly between 1e-3 and 1e6, else in scientific
/// notation with 4 significant digits (a factor of 1e-300 is `1.000e-300`, not 300 digits).
pub fn short_number(value: f64) -> String {
    if value == 0.0 || (1e-3..1e6).contains(&value.abs()) || !value.is_finite() {
        format!("{value}")
    } else {
        format!("{value:.3e}")
    }
}

/// User text for a message, at most 80 characters of it: a 100,000-character name in a file
/// must not make a 100 kB "one line" error.
pub fn clip_text(text: &str) -> String {
    const KEEP: usize = 80;
    match text.char_indices().nth(KEEP) {
        None => text.to_string(),
        Some((cut, _)) => format!("{}… ({} more characters)", &text[..cut], text[cut..].chars().count()),
    }
}

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn internal_errors_say_they_are_a_bug() {
        let e = Error::internal("no tape recorded");
        assert!(matches!(e, Error::Internal(_)));
        assert_eq!(e.to_string(), "internal error (a bug in bert-adapters, please report it): no tape recorded");
    }
}
