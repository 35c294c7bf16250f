//! The fast CPU path the model runs on: `gemm` for every matrix product, rayon across rows and
//! heads, f32 accumulation. Tested against `reference` at awkward shapes in `tests/cpu.rs`.
//! One file per op family with its forward and backward side by side, as in `reference`. This file keeps the finiteness scan, which belongs to no family.

mod activation;
mod attention;
mod embedding;
mod layernorm;
mod linear;
pub mod math;
mod matmul;

use rayon::prelude::*;

pub use activation::{activation, activation_backward, activation_backward_in_place, activation_in_place};
pub use attention::{attention, attention_backward, attention_backward_packed, attention_strided};
pub use embedding::embedding;
pub use layernorm::{layernorm_backward, layernorm_backward_from_stats, layernorm_with_stats, residual_layernorm};
pub use linear::{bias_backward_into, linear, linear_backward_input, linear_backward_input_epilogue, linear_backward_input_into, linear_backward_params, linear_backward_weight_into, linear_epilogue, Epilogue};

/// Elements per block of the finiteness scan: large enough to amortise a rayon task, small
/// enough that a non-finite value early on stops the scan soon.
const FINITE_BLOCK: usize = 1 << 16;

/// Whether no element is NaN or ±inf: blocks in parallel; inside a block the test has no early
/// exit (an OR over the exponent bits), so it vectorises.
pub fn all_finite(x: &[f32]) -> bool {
    const EXP: u32 = 0x7f80_0000; // all exponent bits set: inf or NaN
    let block_ok = |b: &[f32]| !b.iter().fold(false, |bad, v| bad | (v.to_bits() & EXP == EXP));
    if x.len() <= FINITE_BLOCK {
        block_ok(x)
    } else {
        x.par_chunks(FINITE_BLOCK).all(block_ok)
    }
}
