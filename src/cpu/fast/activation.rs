//! Elementwise activations and their backward in f32, vectorised (`math`), 16 K elements per
//! rayon task. The in-place forms are what the product epilogues call on a row block that is
//! still in cache. Numerics: GELU, Swish and Sigmoid through `math` (within a few ulp, see there);
//! ReLU exact; Tanh and tanh-GELU through std's `tanh` (not hot on any model we serve).

use rayon::prelude::*;

use crate::backend::Activation;
use crate::cpu::fast::math::{self, simd_fn};

const CHUNK: usize = 1 << 14;

pub fn activation(x: &[f32], act: Activation) -> Vec<f32> {
    let mut y = crate::cpu::pool::buffer(x.len());
    y.copy_from_slice(x);
    y.par_chunks_mut(CHUNK).for_each(|chunk| activation_in_place(chunk, act));
    y
}

simd_fn! {
    /// `x ← act(x)` on one block, on the calling thread.
    pub fn activation_in_place(x: &mut [f32], act: Activation) {
        match act {
            Activation::Gelu => {
                for v in x.iter_mut() {
                    *v = math::gelu_with::<FMA>(*v);
                }
            }
            Activation::Relu => {
                for v in x.iter_mut() {
                    *v = v.max(0.0);
                }
            }
            Activation::Swish => {
                for v in x.iter_mut() {
                    *v *= math::sigmoid_with::<FMA>(*v);
                }
            }
            Activation::Sigmoid => {
                for v in x.iter_mut() {
                    *v = math::sigmoid_with::<FMA>(*v);
                }
            }
            Activation::Tanh => {
                for v in x.iter_mut() {
                    *v = v.tanh();
                }
            }
            Activation::GeluNew => {
                const C: f32 = 0.797_884_6; // √(2/π)
                for v in x.iter_mut() {
                    *v = 0.5 * *v * (1.0 + (C * (*v + 0.044715 * *v * *v * *v)).tanh());
                }
            }
        }
    }
}

/// `dx = dy ⊙ act'(pre)`.
pub fn activation_backward(dy: &[f32], pre: &[f32], act: Activation) -> Vec<f32> {
    let mut dx = crate::cpu::pool::buffer(dy.len());
    dx.copy_from_slice(dy);
    dx.par_chunks_mut(CHUNK).zip(pre.par_chunks(CHUNK)).for_each(|(d, p)| activation_backward_in_place(d, p, act));
    dx
}

simd_fn! {
    /// `d ← d ⊙ act'(pre)` on one block, on the calling thread.
    pub fn activation_backward_in_place(d: &mut [f32], pre: &[f32], act: Activation) {
        let n = d.len().min(pre.len());
        let (d, pre) = (&mut d[..n], &pre[..n]);
        match act {
            Activation::Gelu => {
                for i in 0..n {
                    d[i] *= math::gelu_grad_with::<FMA>(pre[i]);
                }
            }
            Activation::Relu => {
                for i in 0..n {
                    d[i] *= if pre[i] > 0.0 { 1.0 } else { 0.0 }; // NaN·0 stays NaN, as in the reference
                }
            }
            Activation::Swish => {
                for i in 0..n {
                    let s = math::sigmoid_with::<FMA>(pre[i]);
                    d[i] *= s * (1.0 + pre[i] * (1.0 - s));
                }
            }
            Activation::Sigmoid => {
                for i in 0..n {
                    let s = math::sigmoid_with::<FMA>(pre[i]);
                    d[i] *= s * (1.0 - s);
                }
            }
            Activation::Tanh => {
                for i in 0..n {
                    let t = pre[i].tanh();
                    d[i] *= 1.0 - t * t;
                }
            }
            Activation::GeluNew => {
                const C: f32 = 0.797_884_6;
                for i in 0..n {
                    let x = pre[i];
                    let t = (C * (x + 0.044715 * x * x * x)).tanh();
                    d[i] *= 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044715 * x * x);
                }
            }
        }
    }
}
