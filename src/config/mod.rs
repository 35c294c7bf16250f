//! Model and adapter configuration, read from the JSON files HF and AdapterHub write.

pub mod adapter;
pub mod bert;

pub use adapter::{AdapterConfig, InitWeights, Location, ReductionFactor, ResidualBeforeLn, Scaling};
pub use bert::{BertConfig, HiddenAct};
