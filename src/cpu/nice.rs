//! NICE additive coupling (the invertible adapter) on the CPU: forward, inverse and backward side
//! by side, composed from `Prims`. The features split into `x = [x1 | x2]` (`s1 = ⌊H/2⌋`,
//! `s2 = H − s1` columns); forward `y1 = x1 + F(x2)`, `y2 = x2 + G(y1)`; inverse `x2 = y2 − G(y1)`,
//! `x1 = y1 − F(x2)`; each subnet is `act(z·W0ᵀ + b0)·W2ᵀ + b2`. The backward gives the parameter
//! gradients only (the `Backend` contract), recomputing `y1` and each subnet's hidden layer.
//! Layout: `x` `[.., H]` row-major; the halves are copied out as `[rows, s1]` and `[rows, s2]`.
//! Numerics: the mode's (see `Prims`).

use crate::backend::{Activation, GradsOut, NiceGrads, NiceParams};
use crate::cpu::prims::{add_into, bias_grad_into, check, check_destinations, columns, Prims};
use crate::error::{Error, Result};
use crate::tensor::Tensor;


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
    prims.tensor(out, x.shape())
}

/// Backward of one NICE subnet `o = act(z·W0ᵀ + b0)·W2ᵀ + b2`: parameter gradients written into
/// (or added to) `d0` and `d2`, and, if asked, `dz`.
#[allow(clippy::too_many_arguments)]
fn subnet_backward(
    prims: Prims<'_>,
    z: &[f32],
    l0: (&Tensor, &Tensor),
    l2: (&Tensor, &Tensor),
    act: Activation,
    dout: &[f32],
    (d0, d2): (&(Tensor, Tensor), &(Tensor, Tensor)),
    accumulate: bool,
    need_dz: bool,
) -> Result<Option<Vec<f32>>> {
    let (k, d_in) = (l0.0.shape()[0], l0.0.shape()[1]);
    let d_out = l2.0.shape()[0];
    let pre = prims.linear(z, l0.0, l0.1, d_in)?;
    let a = prims.activation(&pre, act);
    prims.linear_dw_into(dout, &a, k, d_out, &mut d2.0.cpu_data_mut()?, accumulate);
    bias_grad_into(dout, &mut d2.1.cpu_data_mut()?, accumulate);
    let da = prims.linear_dx(dout, l2.0)?;
    let dpre = prims.activation_backward(&da, &pre, act);
    prims.linear_dw_into(&dpre, z, d_in, k, &mut d0.0.cpu_data_mut()?, accumulate);
    bias_grad_into(&dpre, &mut d0.1.cpu_data_mut()?, accumulate);
    if need_dz {
        Ok(Some(prims.linear_dx(&dpre, l0.0)?))
    } else {
        Ok(None)
    }
}

pub(crate) fn nice_backward(prims: Prims<'_>, x: &Tensor, p: &NiceParams, dy: &Tensor, out: &GradsOut<NiceGrads>) -> Result<()> {
    const OP: &str = "nice_backward_into";
    if dy.shape() != x.shape() {
        return Err(Error::shape(OP, format!("gradient {:?} for input {:?}", dy.shape(), x.shape())));
    }
    let g = &out.grads;
    let pairs = [
        ("F.0.weight", &g.f0.0, p.f0.0),
        ("F.0.bias", &g.f0.1, p.f0.1),
        ("F.2.weight", &g.f2.0, p.f2.0),
        ("F.2.bias", &g.f2.1, p.f2.1),
        ("G.0.weight", &g.g0.0, p.g0.0),
        ("G.0.bias", &g.g0.1, p.g0.1),
        ("G.2.weight", &g.g2.0, p.g2.0),
        ("G.2.bias", &g.g2.1, p.g2.1),
    ];
    for (what, dest, param) in &pairs {
        if dest.shape() != param.shape() {
            return Err(Error::shape(OP, format!("the {what} gradient destination has shape {:?}, expected {:?}", dest.shape(), param.shape())));
        }
    }
    let outs: Vec<(&str, &Tensor)> = pairs.iter().map(|(what, dest, _)| (*what, *dest)).collect();
    let mut inputs: Vec<(&str, &Tensor)> = vec![("x", x), ("dy", dy)];
    inputs.extend(pairs.iter().map(|(what, _, param)| (*what, *param)));
    check_destinations(OP, &outs, &inputs)?;
    let hidden = x.last_dim();
    let (s1, s2) = (hidden / 2, hidden - hidden / 2);
    let data = &*x.f32_data()?;
    let (x1, x2) = (columns(data, hidden, 0, s1), columns(data, hidden, s1, s2));
    // Forward again for y1 = x1 + F(x2), the input of G.
    let f = {
        let a = prims.activation(&prims.linear(&x2, p.f0.0, p.f0.1, s2)?, p.activation);
        prims.linear(&a, p.f2.0, p.f2.1, p.f0.0.shape()[0])?
    };
    let y1: Vec<f32> = x1.iter().zip(&f).map(|(a, b)| a + b).collect();
    let d = &*dy.f32_data()?;
    let (mut g1, g2) = (columns(d, hidden, 0, s1), columns(d, hidden, s1, s2));
    let dy1 = subnet_backward(prims, &y1, p.g0, p.g2, p.activation, &g2, (&g.g0, &g.g2), out.accumulate, true)?;
    add_into(&mut g1, &dy1.unwrap_or_default());
    subnet_backward(prims, &x2, p.f0, p.f2, p.activation, &g1, (&g.f0, &g.f2), out.accumulate, false)?;
    Ok(())
}
