//! Elementwise activations in f32, 4096 elements per rayon task (erf GELU through `libm::erff`).
//! The backward is `reference::activation_backward` (see `Prims`).

use rayon::prelude::*;

use crate::backend::Activation;

pub fn activation(x: &[f32], act: Activation) -> Vec<f32> {
    let mut y = crate::cpu::pool::buffer(x.len());
    y.copy_from_slice(x);
    y.par_chunks_mut(4096).for_each(|chunk| {
        for v in chunk {
            *v = activation_f32(*v, act);
        }
    });
    y
}

#[inline]
fn activation_f32(x: f32, act: Activation) -> f32 {
    match act {
        Activation::Relu => x.max(0.0),
        Activation::Gelu => 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2)),
        Activation::GeluNew => {
            const C: f32 = 0.797_884_6; // √(2/π)
            0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
        }
        Activation::Swish => x / (1.0 + (-x).exp()),
        Activation::Tanh => x.tanh(),
        Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
    }
}
