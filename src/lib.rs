//! # bert-adapters
//!
//! Bottleneck adapters with the exact semantics of AdapterHub's `adapters` library, on a frozen
//! BERT, over a backend interface with a CPU reference, a fast CPU path, and CUDA kernels
//! compiled at run time by NVRTC.
//!
//! ```no_run
//! use std::sync::Arc;
//! use bert_adapters::{AdapterConfig, AdapterSetup, BertModel, BertTokenizer, CpuBackend, LoadOptions, Tensor};
//!
//! let backend = Arc::new(CpuBackend::fast());
//! let (mut model, _report) = BertModel::from_dir("models/all-MiniLM-L6-v2", backend.clone(), LoadOptions::default())?;
//! let tokenizer = BertTokenizer::from_file("models/all-MiniLM-L6-v2/tokenizer.json", model.config().max_seq_len())?;
//! let batch = tokenizer.encode_batch(&["Adapters are small.".to_string()], model.config())?;
//!
//! // The seed workflow: two adapters on one BERT, run together, trained one at a time.
//! model.add_adapter("scorenn", AdapterConfig::named("pfeiffer+inv")?)?;
//! model.add_adapter("tasknn", AdapterConfig::named("pfeiffer")?)?;
//! model.set_active_adapters(Some(AdapterSetup::Parallel(vec!["scorenn".into(), "tasknn".into()])))?;
//! model.train_adapter(&["tasknn"])?;                 // unlike the library, Parallel stays active
//!
//! let (out, tape) = model.forward_train(&batch)?;    // last_hidden_state: [2·B, T, H]
//! let d_last = Tensor::from_vec(vec![1.0; out.last_hidden_state.elem_count()], out.last_hidden_state.shape())?;
//! let grads = model.backward(&tape, &d_last, None)?; // by library key, only tasknn's tensors
//! # Ok::<(), bert_adapters::Error>(())
//! ```

pub mod backend;
pub mod backends;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod io;
pub mod model;
pub mod profile;
mod simd;
pub mod tensor;
pub mod tokenize;
pub mod train;

pub use backend::{Activation, Backend, TokenBatch};
pub use backends::backend_for;
pub use config::{AdapterConfig, BertConfig, HiddenAct, Location, ModelType, Positions};
pub use cpu::{CpuBackend, CpuMode};
pub use device::Device;
pub use dist::{Communicator, DataParallel, SingleProcess};
pub use error::{Error, Result};
pub use io::adapter_files::{AdapterLoadOptions, AdapterLoadReport};
pub use io::{BertWeights, InputBatch, LoadOptions, LoadReport};
pub use model::persist::SaveOptions;
pub use model::{Adapter, AdapterSetup, BertModel, BertOutput};
pub use tensor::{DType, Tensor};
pub use tokenize::BertTokenizer;
