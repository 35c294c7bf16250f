//! Model and adapter configuration, read from the JSON files HF and AdapterHub write.

pub mod activation;
pub mod adapter;
pub mod bert;
pub mod head;

pub use activation::Activation;
pub use adapter::{validate_adapter_name, AdapterConfig, InitWeights, Location, ReductionFactor, ResidualBeforeLn, Scaling};
pub use bert::{BertConfig, HiddenAct, ModelType, Positions};
pub use head::{HeadConfig, HeadConfigFile};
