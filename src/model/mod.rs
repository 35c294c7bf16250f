//! The model, written once against `Backend`; nothing here names a device.

pub mod bert;

pub use bert::{BertModel, BertOutput};
