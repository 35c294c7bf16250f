//! # bert-adapters
//!
//! Bottleneck adapters with the exact semantics of AdapterHub's `adapters` library, on a frozen
//! BERT, over a backend interface with a CPU reference, a fast CPU path, and CUDA kernels
//! compiled at run time by NVRTC.
//!
//! ```no_run
//! use std::sync::Arc;
//! use bert_adapters::{BertModel, BertTokenizer, CpuBackend, LoadOptions};
//!
//! let backend = Arc::new(CpuBackend::fast());
//! let (model, _report) = BertModel::from_dir("models/all-MiniLM-L6-v2", backend.clone(), LoadOptions::default())?;
//! let tok = BertTokenizer::from_file("models/all-MiniLM-L6-v2/tokenizer.json", model.config().max_position_embeddings)?;
//! let batch = tok.encode_batch(&["Adapters are small.".to_string()], model.config())?;
//! let out = model.forward(&batch)?;
//! println!("{:?}", out.last_hidden_state.shape());
//! # Ok::<(), bert_adapters::Error>(())
//! ```

pub mod backend;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod device;
pub mod error;
pub mod io;
pub mod model;
pub mod tensor;
pub mod tokenize;

pub use backend::{Activation, Backend, TokenBatch};
pub use config::{AdapterConfig, BertConfig, HiddenAct, Location};
pub use cpu::{CpuBackend, CpuMode};
pub use device::Device;
pub use error::{Error, Result};
pub use io::{BertWeights, InputBatch, LoadOptions, LoadReport};
pub use model::{Adapter, AdapterSetup, BertModel, BertOutput};
pub use tensor::{DType, Tensor};
pub use tokenize::BertTokenizer;
