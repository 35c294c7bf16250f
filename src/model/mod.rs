//! The model, written once against `Backend`; nothing here names a device.

pub mod adapters;
pub mod arena;
pub mod backward;
pub mod bert;
pub mod graph;
pub mod task;
pub mod heads;
pub mod persist;
pub mod step;

pub use adapters::{Adapter, AdapterSetup};
pub use backward::{FrozenRows, Gradients, Tape};
pub use bert::{BertModel, BertOutput};
