//! The row primitives that the composite ops (adapter location, NICE) are built from, in the
//! backend's CPU mode: `Prims` sends each to `reference` or `fast` and counts every matrix product
//! by kind in the backend's `GemmStats` (how the tests prove that frozen work is skipped). Also the
//! slice helpers both composites share. Layout: activations are row-major `[rows, cols]` slices,
//! weights and LayerNorm parameters tensors (`w: [d_out, d_in]`). Numerics: the mode's.

use crate::backend::Activation;
use crate::cpu::{fast, reference, CpuMode, GemmKind, GemmStats};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The primitive row ops of one CPU mode, counting matrix products as they go.
#[derive(Clone, Copy)]
pub(crate) struct Prims<'a> {
    pub mode: CpuMode,
    pub stats: &'a GemmStats,
    /// The backend's output pool, in pooled mode: a composite op's outputs are copied onto pool
    /// buffers (its kernels run on their own scratch).
    pub pool: Option<&'a std::sync::Arc<crate::tensor::HostPool>>,
}

impl Prims<'_> {
    /// An output tensor of a composite op (in pooled mode, `data` copied onto a pool buffer).
    pub fn tensor(self, data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        match self.pool {
            Some(pool) => {
                let mut out = pool.take(data.len());
                out.copy_from_slice(&data);
                Tensor::from_pool(pool, out, shape)
            }
            None => Tensor::from_vec(data, shape),
        }
    }

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
    /// `dx = dy·W` for `w: [d_out, d_in]` (scratch, or an op's output inside its pool scope).
    pub fn linear_dx(self, dy: &[f32], w: &Tensor) -> Result<Vec<f32>> {
        let (d_out, d_in) = (w.shape()[0], w.shape()[1]);
        let mut dx = crate::cpu::pool::buffer(dy.len() / d_out.max(1) * d_in);
        self.linear_dx_into(dy, w, &mut dx, false)?;
        Ok(dx)
    }
    /// `dx = dy·W`, or `dx += dy·W` when `accumulate`: in the product on the fast path, computed
    /// and then added in the reference.
    pub fn linear_dx_into(self, dy: &[f32], w: &Tensor, dx: &mut [f32], accumulate: bool) -> Result<()> {
        let (d_out, d_in) = (w.shape()[0], w.shape()[1]);
        let rows = dy.len() / d_out.max(1);
        self.stats.count(GemmKind::InputGrad, rows * d_in * d_out);
        let w = &*w.f32_data()?;
        match self.mode {
            CpuMode::Reference => store(dx, &reference::linear_backward_input(dy, w, rows, d_in, d_out), accumulate),
            CpuMode::Fast => fast::linear_backward_input_into(dy, w, dx, accumulate, rows, d_in, d_out, None)?,
        }
        Ok(())
    }
    /// `dW = dyᵀ·x` written into `dw`, or added to it when `accumulate` (in the product on the
    /// fast path). The bias gradient is `bias_grad_into`: a destination each, as the two may be
    /// views of one arena, which one write lock at a time covers.
    pub fn linear_dw_into(self, dy: &[f32], x: &[f32], d_in: usize, d_out: usize, dw: &mut [f32], accumulate: bool) {
        let rows = dy.len() / d_out.max(1);
        self.stats.count(GemmKind::WeightGrad, rows * d_in * d_out);
        match self.mode {
            CpuMode::Reference => store(dw, &reference::linear_backward_params(dy, x, rows, d_in, d_out).0, accumulate),
            CpuMode::Fast => fast::linear_backward_weight_into(dy, x, dw, accumulate, rows, d_in, d_out),
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
        let g = &*gamma.f32_data()?;
        Ok(match self.mode {
            CpuMode::Reference => reference::layernorm_backward(dy, z, g, gamma.elem_count(), eps),
            CpuMode::Fast => fast::layernorm_backward(dy, z, g, gamma.elem_count(), eps),
        })
    }
    pub fn activation(self, x: &[f32], act: Activation) -> Vec<f32> {
        match self.mode {
            CpuMode::Reference => reference::activation(x, act),
            CpuMode::Fast => fast::activation(x, act),
        }
    }
    pub fn activation_backward(self, dy: &[f32], pre: &[f32], act: Activation) -> Vec<f32> {
        match self.mode {
            CpuMode::Reference => reference::activation_backward(dy, pre, act),
            CpuMode::Fast => fast::activation_backward(dy, pre, act),
        }
    }
}

/// `t` has exactly `shape`, else a shape error of `op`.
pub(crate) fn check(op: &'static str, what: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.shape() != shape {
        return Err(Error::shape(op, format!("{what} has shape {:?}, expected {shape:?}", t.shape())));
    }
    Ok(())
}

/// Columns `[start, start+width)` of a row-major `[rows, cols]` matrix.
pub(crate) fn columns(x: &[f32], cols: usize, start: usize, width: usize) -> Vec<f32> {
    x.chunks(cols).flat_map(|row| row[start..start + width].iter().copied()).collect()
}

/// `db = Σ_rows dy` (`[rows, db.len()]`), or `db += Σ_rows dy`: f64 sums in row order, rounded
/// once, in both modes (the reference's arithmetic).
pub(crate) fn bias_grad_into(dy: &[f32], db: &mut [f32], accumulate: bool) {
    fast::bias_backward_into(dy, db, accumulate, db.len());
}

/// `dst = src`, or `dst += src` when `accumulate`.
pub(crate) fn store(dst: &mut [f32], src: &[f32], accumulate: bool) {
    if accumulate {
        add_into(dst, src);
    } else {
        dst.copy_from_slice(src);
    }
}

/// Write `src` into the destination tensor `dst` (or add it, when `accumulate`); its shape was
/// checked by the op. One write lock, released on return.
pub(crate) fn store_tensor(dst: &Tensor, src: &[f32], accumulate: bool) -> Result<()> {
    store(&mut dst.cpu_data_mut()?, src, accumulate);
    Ok(())
}

/// The destinations of one op must not share storage with its inputs (a kernel would read what
/// it is writing), nor overlap each other: an `Error::Internal` naming the op and the tensors.
pub(crate) fn check_destinations(op: &str, outs: &[(&str, &Tensor)], inputs: &[(&str, &Tensor)]) -> Result<()> {
    for (i, (name, out)) in outs.iter().enumerate() {
        if let Some((input, _)) = inputs.iter().find(|(_, t)| out.shares_storage(t)) {
            return Err(Error::Internal(format!("{op}: the destination `{name}` shares storage with the input `{input}`")));
        }
        if let Some((other, _)) = outs[..i].iter().find(|(_, t)| out.overlaps(t)) {
            return Err(Error::Internal(format!("{op}: the destinations `{other}` and `{name}` overlap")));
        }
    }
    Ok(())
}

/// `a += b`, element by element.
pub(crate) fn add_into(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
}
