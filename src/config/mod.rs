//! Model and adapter configuration, read from the JSON files HF and AdapterHub write.

pub mod bert;

pub use bert::{BertConfig, HiddenAct};
