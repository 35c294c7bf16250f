//! `Activation`: the elementwise activations configs name and every backend implements.

use super::HiddenAct;

/// Elementwise activations used by BERT and by adapters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    Relu,
    /// Exact GELU, `0.5·x·(1+erf(x/√2))`.
    Gelu,
    /// Tanh-approximated GELU, `0.5·x·(1+tanh(√(2/π)·(x+0.044715x³)))`.
    GeluNew,
    /// `x·σ(x)` (torch SiLU; "swish" in the adapters library).
    Swish,
    Tanh,
    Sigmoid,
}

impl Activation {
    /// Scalar definition, in f64: the spec every backend's kernel is tested against.
    pub fn apply_f64(self, x: f64) -> f64 {
        match self {
            Activation::Relu => x.max(0.0),
            Activation::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
            Activation::GeluNew => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }
            Activation::Swish => x / (1.0 + (-x).exp()),
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        }
    }
}

impl From<HiddenAct> for Activation {
    fn from(a: HiddenAct) -> Self {
        match a {
            HiddenAct::Gelu => Activation::Gelu,
            HiddenAct::GeluNew => Activation::GeluNew,
            HiddenAct::Relu => Activation::Relu,
        }
    }
}
