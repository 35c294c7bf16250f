//! Adapter location and NICE coupling on the CPU, composed from the primitive ops of the chosen
//! mode (reference or fast), so the reference path is the specification of the fused kernels.

use crate::backend::{
    Activation, AdapterLocation, BottleneckParams, NiceParams, ScalingParam,
};
use crate::config::ResidualBeforeLn;
use crate::cpu::adapter_backward::core_forward;
use crate::cpu::{fast, reference, CpuMode, GemmKind, GemmStats};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The primitive row ops of one CPU mode, counting matrix products as they go.
#[derive(Clone, Copy)]
pub(crate) struct Prims<'a> {
    pub mode: CpuMode,
    pub stats: &'a GemmStats,
}

impl Prims<'_> {
    pub fn linear(self, x: &[f32], w: &Tensor, b: &Tensor, d_in: usize) -> Result<Vec<f32>> {
        let d_out = w.shape()[0];
        let rows = x.len() / d_in.max(1);
        let (w, b) = (&*w.f32_data()?, Some(&*b.f32_data()?));
        self.stats.count(GemmKind::Forward, rows * d_in * d_out);
        Ok(match self.mode {
            CpuMode::Reference => reference::linear(x, w, b, rows, d_in, d_out),
            CpuMode::Fast => fast::linear(x, w, b, rows, d_in, d_out),
        })
    }
    /// `dx = dy·W` for `w: [d_out, d_in]`.
    pub fn linear_dx(self, dy: &[f32], w: &Tensor) -> Result<Vec<f32>> {
        let (d_out, d_in) = (w.shape()[0], w.shape()[1]);
        let rows = dy.len() / d_out.max(1);
        self.stats.count(GemmKind::InputGrad, rows * d_in * d_out);
        let w = &*w.f32_data()?;
        Ok(match self.mode {
            CpuMode::Reference => reference::linear_backward_input(dy, w, rows, d_in, d_out),
            CpuMode::Fast => fast::linear_backward_input(dy, w, rows, d_in, d_out),
        })
    }
    /// `(dW, db)` for a Linear with input `x` (`[rows, d_in]`) and output gradient `dy`.
    pub fn linear_dw(self, dy: &[f32], x: &[f32], d_in: usize, d_out: usize) -> (Vec<f32>, Vec<f32>) {
        let rows = dy.len() / d_out.max(1);
        self.stats.count(GemmKind::WeightGrad, rows * d_in * d_out);
        match self.mode {
            CpuMode::Reference => reference::linear_backward_params(dy, x, rows, d_in, d_out),
            CpuMode::Fast => fast::linear_backward_params(dy, x, rows, d_in, d_out),
        }
    }
    pub fn layernorm(self, x: &[f32], residual: Option<&[f32]>, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Vec<f32>> {
        let cols = gamma.elem_count();
        let (g, b) = (&*gamma.f32_data()?, &*beta.f32_data()?);
        Ok(match self.mode {
            CpuMode::Reference => reference::residual_layernorm(x, residual, g, b, cols, eps).y,
            CpuMode::Fast => fast::residual_layernorm(x, residual, g, b, cols, eps),
        })
    }
    /// `(dz, dγ, dβ)` of `LN(z)`.
    pub fn layernorm_backward(self, dy: &[f32], z: &[f32], gamma: &Tensor, eps: f32) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        Ok(reference::layernorm_backward(dy, z, &*gamma.f32_data()?, gamma.elem_count(), eps))
    }
    pub fn activation(self, x: &[f32], act: Activation) -> Vec<f32> {
        match self.mode {
            CpuMode::Reference => reference::activation(x, act),
            CpuMode::Fast => fast::activation(x, act),
        }
    }
    pub fn activation_backward(self, dy: &[f32], pre: &[f32], act: Activation) -> Vec<f32> {
        reference::activation_backward(dy, pre, act)
    }
}

fn check(op: &'static str, what: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.shape() != shape {
        return Err(Error::shape(op, format!("{what} has shape {:?}, expected {shape:?}", t.shape())));
    }
    Ok(())
}

fn check_branch(p: &BottleneckParams, hidden: usize) -> Result<()> {
    const OP: &str = "adapter_location";
    let m = p.down_w.shape().first().copied().unwrap_or(0);
    check(OP, "down weight", p.down_w, &[m, hidden])?;
    check(OP, "down bias", p.down_b, &[m])?;
    check(OP, "up weight", p.up_w, &[hidden, m])?;
    check(OP, "up bias", p.up_b, &[hidden])?;
    for ln in p.ln_before.iter().chain(p.ln_after.iter()) {
        check(OP, "adapter LayerNorm gamma", ln.gamma, &[hidden])?;
        check(OP, "adapter LayerNorm beta", ln.beta, &[hidden])?;
    }
    match p.scaling {
        ScalingParam::Fixed(_) => {}
        ScalingParam::Learned(s) => check(OP, "learned scaling", s, &[1])?,
        ScalingParam::Channel(s) => check(OP, "channel scaling", s, &[hidden])?,
    }
    if let Some((w, b)) = p.gate {
        check(OP, "gate weight", w, &[1, hidden])?;
        check(OP, "gate bias", b, &[1])?;
    }
    Ok(())
}

/// Check a location's shapes; returns `(branches, examples per branch, hidden)`.
pub(crate) fn validate_location(loc: &AdapterLocation) -> Result<(usize, usize, usize)> {
    const OP: &str = "adapter_location";
    let shape = loc.h.shape();
    check(OP, "r", loc.r, shape)?;
    if shape.len() != 3 || shape[1] != loc.seq_len {
        return Err(Error::shape(OP, format!("h has shape {shape:?}, expected [rows, {}, H]", loc.seq_len)));
    }
    let n = loc.branches.len();
    if n == 0 {
        return Err(Error::shape(OP, "no branches".to_string()));
    }
    let hidden = shape[2];
    if !loc.replicate && !shape[0].is_multiple_of(n) {
        return Err(Error::shape(OP, format!("{} rows do not split into {n} branches", shape[0])));
    }
    let examples = if loc.replicate { shape[0] } else { shape[0] / n };
    check(OP, "LayerNorm gamma", loc.layer_norm.gamma, &[hidden])?;
    check(OP, "LayerNorm beta", loc.layer_norm.beta, &[hidden])?;
    for b in loc.branches {
        check_branch(b, hidden)?;
    }
    Ok((n, examples, hidden))
}

/// The pre step of a location (spec §4): `v = h + r` when the original LayerNorm comes first,
/// the adapter input `x`, and (through `rho`) the adapter residual.
pub(crate) struct PreStep {
    pub v: Option<Vec<f32>>,
    pub x: Vec<f32>,
}

impl PreStep {
    pub fn run(prims: Prims<'_>, loc: &AdapterLocation, h: &[f32], r: &[f32]) -> Result<Self> {
        let ln = &loc.layer_norm;
        let v: Option<Vec<f32>> = loc.steps.original_ln_before.then(|| h.iter().zip(r).map(|(a, b)| a + b).collect());
        let x = match &v {
            Some(v) => prims.layernorm(v, None, ln.gamma, ln.beta, ln.eps)?,
            None => h.to_vec(),
        };
        Ok(PreStep { v, x })
    }

    /// ρ: `h`, `x`, or `v` by `residual_before_ln`.
    pub fn rho<'a>(&'a self, loc: &AdapterLocation, h: &'a [f32]) -> Result<&'a [f32]> {
        Ok(match loc.steps.residual_before_ln {
            ResidualBeforeLn::True => h,
            ResidualBeforeLn::False => &self.x,
            ResidualBeforeLn::PostAdd => {
                self.v.as_deref().ok_or_else(|| Error::shape("adapter_location", "post_add needs original_ln_before".to_string()))?
            }
        })
    }
}

pub(crate) fn adapter_location(prims: Prims<'_>, loc: &AdapterLocation) -> Result<Tensor> {
    let (n, examples, hidden) = validate_location(loc)?;
    let (h, r) = (&*loc.h.f32_data()?, &*loc.r.f32_data()?);
    let ln = &loc.layer_norm;

    // Pre step, once for all rows (the first child's config).
    let pre = PreStep::run(prims, loc, h, r)?;
    let (x, rho) = (&pre.x, pre.rho(loc, h)?);

    // Cores: branch i reads rows [i·B, (i+1)·B) of x and ρ, or all of them when replicating.
    let block = examples * loc.seq_len * hidden;
    let mut y = Vec::with_capacity(n * block);
    for (i, branch) in loc.branches.iter().enumerate() {
        let at = if loc.replicate { 0 } else { i * block };
        y.extend(core_forward(prims, branch, &x[at..at + block], &rho[at..at + block], hidden, loc.seq_len)?.0);
    }

    // Post step (the last child's config), against r tiled like the branches.
    let out = if loc.steps.original_ln_after {
        let r_full: Vec<f32> = if loc.replicate { r.iter().copied().cycle().take(n * block).collect() } else { r.to_vec() };
        prims.layernorm(&y, Some(&r_full), ln.gamma, ln.beta, ln.eps)?
    } else {
        y
    };
    Tensor::from_vec(out, &[n * examples, loc.seq_len, hidden])
}

/// Columns `[start, start+width)` of a row-major `[rows, cols]` matrix.
pub(crate) fn columns(x: &[f32], cols: usize, start: usize, width: usize) -> Vec<f32> {
    x.chunks(cols).flat_map(|row| row[start..start + width].iter().copied()).collect()
}

pub(crate) fn nice(prims: Prims<'_>, x: &Tensor, p: &NiceParams, inverse: bool) -> Result<Tensor> {
    const OP: &str = "nice";
    let hidden = x.last_dim();
    if hidden < 2 || x.rank() == 0 {
        return Err(Error::shape(OP, format!("input {:?} has fewer than 2 features to split", x.shape())));
    }
    let (s1, s2) = (hidden / 2, hidden - hidden / 2);
    let (kf, kg) = (p.f0.0.shape().first().copied().unwrap_or(0), p.g0.0.shape().first().copied().unwrap_or(0));
    check(OP, "F.0.weight", p.f0.0, &[kf, s2])?;
    check(OP, "F.0.bias", p.f0.1, &[kf])?;
    check(OP, "F.2.weight", p.f2.0, &[s1, kf])?;
    check(OP, "F.2.bias", p.f2.1, &[s1])?;
    check(OP, "G.0.weight", p.g0.0, &[kg, s1])?;
    check(OP, "G.0.bias", p.g0.1, &[kg])?;
    check(OP, "G.2.weight", p.g2.0, &[s2, kg])?;
    check(OP, "G.2.bias", p.g2.1, &[s2])?;
    let subnet = |z: &[f32], l0: (&Tensor, &Tensor), l2: (&Tensor, &Tensor), d_in: usize| -> Result<Vec<f32>> {
        let a = prims.activation(&prims.linear(z, l0.0, l0.1, d_in)?, p.activation);
        prims.linear(&a, l2.0, l2.1, l0.0.shape()[0])
    };
    let data = &*x.f32_data()?;
    let (a, b) = (columns(data, hidden, 0, s1), columns(data, hidden, s1, s2));
    let (first, second) = if !inverse {
        // y1 = x1 + F(x2); y2 = x2 + G(y1)
        let y1: Vec<f32> = a.iter().zip(subnet(&b, p.f0, p.f2, s2)?).map(|(x, f)| x + f).collect();
        let y2: Vec<f32> = b.iter().zip(subnet(&y1, p.g0, p.g2, s1)?).map(|(x, g)| x + g).collect();
        (y1, y2)
    } else {
        // x2 = y2 - G(y1); x1 = y1 - F(x2)
        let x2: Vec<f32> = b.iter().zip(subnet(&a, p.g0, p.g2, s1)?).map(|(y, g)| y - g).collect();
        let x1: Vec<f32> = a.iter().zip(subnet(&x2, p.f0, p.f2, s2)?).map(|(y, f)| y - f).collect();
        (x1, x2)
    };
    let out: Vec<f32> = first.chunks(s1).zip(second.chunks(s2)).flat_map(|(l, r)| l.iter().chain(r).copied()).collect();
    Tensor::from_vec(out, x.shape())
}
