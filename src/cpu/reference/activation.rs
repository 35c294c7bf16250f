//! Elementwise activations (ReLU, erf GELU, tanh GELU, Swish, Tanh, Sigmoid) and their backward,
//! `dx = dy ⊙ act'(pre)`. Layout: any shape, element by element. Numerics: evaluated in f64
//! (`Activation::apply_f64` and the closed-form derivatives here), rounded to f32 once.

use crate::backend::Activation;

pub fn activation(x: &[f32], act: Activation) -> Vec<f32> {
    x.iter().map(|&v| act.apply_f64(v as f64) as f32).collect()
}

/// Derivative of an activation at `x`, in f64.
pub fn activation_derivative(act: Activation, x: f64) -> f64 {
    let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
    match act {
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Gelu => {
            let cdf = 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            cdf + x * pdf
        }
        Activation::GeluNew => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let inner = c * (x + 0.044715 * x * x * x);
            let t = inner.tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
        }
        Activation::Swish => {
            let s = sigmoid(x);
            s * (1.0 + x * (1.0 - s))
        }
        Activation::Tanh => 1.0 - x.tanh().powi(2),
        Activation::Sigmoid => {
            let s = sigmoid(x);
            s * (1.0 - s)
        }
    }
}

/// `dx = dy ⊙ act'(pre)`.
pub fn activation_backward(dy: &[f32], pre: &[f32], act: Activation) -> Vec<f32> {
    let mut dx = crate::cpu::pool::buffer(dy.len());
    dx.iter_mut().zip(dy.iter().zip(pre)).for_each(|(o, (&g, &x))| *o = (g as f64 * activation_derivative(act, x as f64)) as f32);
    dx
}
