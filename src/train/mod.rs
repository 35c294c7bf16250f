//! Training building blocks: the optimizer, gradient clipping and counter-based dropout.
//!
//! Everything here follows PyTorch's semantics (`torch.optim.AdamW`,
//! `torch.nn.utils.clip_grad_norm_`, `nn.Dropout` scaling) so that a training run can be checked
//! step by step against the library it re-implements.

pub mod dropout;
pub mod loss;
pub mod optim;
pub mod scaler;
pub mod schedule;

pub use dropout::{dropout_backward, dropout_forward, dropout_range, philox4x32_10, DropoutParams, DropoutRng};
pub use loss::{LossOp, LossValue, Objective};
pub use optim::{clip_grad_norm, AdamW, AdamWConfig, AdamWLaunch, AdamWState, ArenaEntry, ParamState};
pub use scaler::{LossScaler, LossScalerConfig, LossScalerState, ScaledStep};
pub use schedule::{LrSchedule, ScheduleKind};
