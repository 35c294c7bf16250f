//! Elementwise activations and their backward in f32, vectorised (`math`), 16 K elements per
//! rayon task. The in-place forms are what the product epilogues call on a row block that is
//! still in cache. Numerics: GELU, Swish and Sigmoid through `math` (within a few ulp, see there);
//! ReLU exact; Tanh and tanh-GELU through std's `tanh` (not hot on any model we serve).

use rayon::prelude::*;

use crate::backend::Activation;
use crate::cpu::fast::math;

const CHUNK: usize = 1 << 14;

pub fn activation(x: &[f32], act: Activation) -> Vec<f32> {
    let mut y = crate::cpu::pool::buffer(x.len());
    y.copy_from_slice(x);
    y.par_chunks_mut(CHUNK).for_each(|chunk| activation_in_place(chunk, act));
    y
}

/// `x ← act(x)` on one block, on the calling thread.
pub fn activation_in_place(x: &mut [f32], act: Activation) {
    math::simd(
        #[inline(always)]
        || match act {
            Activation::Gelu => x.iter_mut().for_each(|v| *v = math::gelu(*v)),
            Activation::Relu => x.iter_mut().for_each(|v| *v = v.max(0.0)),
            Activation::Swish => x.iter_mut().for_each(|v| *v *= math::sigmoid(*v)),
            Activation::Sigmoid => x.iter_mut().for_each(|v| *v = math::sigmoid(*v)),
            Activation::Tanh => x.iter_mut().for_each(|v| *v = v.tanh()),
            Activation::GeluNew => x.iter_mut().for_each(|v| {
                const C: f32 = 0.797_884_6; // √(2/π)
                *v = 0.5 * *v * (1.0 + (C * (*v + 0.044715 * *v * *v * *v)).tanh());
            }),
        },
    )
}

/// `dx = dy ⊙ act'(pre)`.
pub fn activation_backward(dy: &[f32], pre: &[f32], act: Activation) -> Vec<f32> {
    let mut dx = crate::cpu::pool::buffer(dy.len());
    dx.copy_from_slice(dy);
    dx.par_chunks_mut(CHUNK).zip(pre.par_chunks(CHUNK)).for_each(|(d, p)| activation_backward_in_place(d, p, act));
    dx
}

/// `d ← d ⊙ act'(pre)` on one block, on the calling thread.
pub fn activation_backward_in_place(d: &mut [f32], pre: &[f32], act: Activation) {
    math::simd(
        #[inline(always)]
        || {
            let it = d.iter_mut().zip(pre);
            match act {
                Activation::Gelu => it.for_each(|(g, &x)| *g *= math::gelu_grad(x)),
                Activation::Relu => it.for_each(|(g, &x)| *g *= if x > 0.0 { 1.0 } else { 0.0 }), // NaN·0 stays NaN, as in the reference
                Activation::Swish => it.for_each(|(g, &x)| {
                    let s = math::sigmoid(x);
                    *g *= s * (1.0 + x * (1.0 - s));
                }),
                Activation::Sigmoid => it.for_each(|(g, &x)| {
                    let s = math::sigmoid(x);
                    *g *= s * (1.0 - s);
                }),
                Activation::Tanh => it.for_each(|(g, &x)| {
                    let t = x.tanh();
                    *g *= 1.0 - t * t;
                }),
                Activation::GeluNew => it.for_each(|(g, &x)| {
                    const C: f32 = 0.797_884_6;
                    let t = (C * (x + 0.044715 * x * x * x)).tanh();
                    *g *= 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044715 * x * x);
                }),
            }
        },
    )
}
