//! The two training objectives of `train`, structured-energy style: their weights. The
//! objectives themselves are library ops (`bert_adapters::train::loss`, run on the model's
//! device by `Backend::loss`), where they are specified and tested.

/// Weight of the energy term in tasknn's loss.
pub const LAMBDA: f64 = 0.1;
/// Margin of scorenn's hinge.
pub const MARGIN: f64 = 1.0;
/// Weight of scorenn's own cross-entropy.
pub const SCORE_CE: f64 = 0.1;
