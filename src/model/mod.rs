//! The model, written once against `Backend`; nothing here names a device.

pub mod adapters;
pub mod bert;

pub use adapters::{Adapter, AdapterSetup};
pub use bert::{BertModel, BertOutput};
