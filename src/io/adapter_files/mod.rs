//! Adapter folders as AdapterHub's `save_adapter` writes them (spec §8): `adapter_config.json`
//! plus the weights as `adapter.safetensors` (`use_safetensors=True`) or `pytorch_adapter.bin`
//! (the default, a `torch.save` archive read by [`crate::io::pickle`] without executing it), and
//! optionally a prediction head (`head_config.json` + `model_head.safetensors` or
//! `pytorch_model_head.bin`).
//!
//! Loading is strict by default: every tensor the config implies must be present with its shape,
//! nothing else may be, and the config must fit the model. The library itself only logs missing
//! and unexpected keys; [`AdapterLoadOptions::strict`]` = false` mirrors that and returns what it
//! found in an [`AdapterLoadReport`] instead.
//!
//! This layer reads and writes plain data only: configs, and named f32 tensors checked against the
//! keys and shapes the caller expects. `crate::model::persist` maps them onto adapters and heads.

mod config;
mod load;
mod save;
mod weights;

pub use config::{
    adapter_config_json, head_config_json, parse_adapter_config, python_float_repr, read_adapter_config, to_python_json, AdapterConfigFile,
};
pub use load::{check_fit, read_adapter_tensors, read_head, read_head_tensors, AdapterDir, AdapterLoadOptions, AdapterLoadReport, StoredHead};
pub use save::{safetensors_bytes, with_ln_before_aliases, NamedTensor};
pub use weights::{StoredTensor, WeightsFile};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter.safetensors";
pub const TORCH_WEIGHTS_FILE: &str = "pytorch_adapter.bin";
pub const HEAD_CONFIG_FILE: &str = "head_config.json";
pub const HEAD_WEIGHTS_FILE: &str = "model_head.safetensors";
pub const TORCH_HEAD_WEIGHTS_FILE: &str = "pytorch_model_head.bin";
/// What `version` the files we write claim: the library release whose format they follow.
pub const LIBRARY_VERSION: &str = "adapters.1.3.0";
/// Largest `adapter_config.json` / `head_config.json` read (real ones are about 1 KiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// A bottleneck (or NICE hidden layer) wider than this many times the hidden size is refused:
/// such a config is a mistake, and honouring it could allocate without bound.
pub const MAX_WIDTH_FACTOR: usize = 64;
