//! Files in and out: safetensors tensors, HF BERT weights, input batches, output dumps.

pub mod adapter_files;
pub mod atomic;
pub mod batch;
pub mod pickle;
pub mod tensor_file;
pub mod weights;

pub use batch::InputBatch;
pub use tensor_file::{write_safetensors, OutDtype, OutTensor, SafetensorsWriter, TensorFile};
pub use weights::{BertWeights, LayerWeights, LoadOptions, LoadReport};
