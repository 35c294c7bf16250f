//! The plain reference: clear loops, f64 accumulation. This is the specification that the fast
//! CPU path and every CUDA kernel are tested against, so it favours obviousness over speed.
//! One file per op family with its forward and backward side by side, as the kernels will have
//! them (one `.cu` per family); this file keeps the two row utilities that belong to none.
//! All functions work on row-major slices; shapes are checked by the caller (`CpuBackend`).

mod activation;
mod attention;
mod embedding;
mod layernorm;
mod linear;

pub use activation::{activation, activation_backward, activation_derivative};
pub use attention::{attention, attention_backward, attention_lse, ProbDropout};
pub use embedding::embedding;
pub use layernorm::{layernorm_backward, layernorm_backward_from_stats, residual_layernorm, LayerNormOut};
pub use linear::{linear, linear_backward_input, linear_backward_params};

/// Whether no element is NaN or ±inf.
pub fn all_finite(x: &[f32]) -> bool {
    x.iter().all(|v| v.is_finite())
}
