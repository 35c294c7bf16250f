//! Backward of the adapter location and of NICE on the CPU (spec §7.3), composed from the same
//! primitives as the forward. The forward of a location is recomputed from `h` and `r` (two small
//! products per branch), which is what the fused kernel will do as well.

use crate::backend::{
    Activation, AdapterLocation, BottleneckGrads, BottleneckParams, LocationGrads, NiceGrads, NiceParams, ScalingParam,
};
use crate::config::ResidualBeforeLn;
use crate::cpu::adapter::{columns, validate_location, Prims, PreStep};
use crate::cpu::apply_dropout;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

fn add_into(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
}

fn t(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(data, shape)
}

/// What the core forward keeps for its backward.
pub(crate) struct CoreTape {
    z0: Vec<f32>,
    pre: Vec<f32>,
    act: Vec<f32>,
    /// `A·Wuᵀ + b_u`, before scaling.
    up: Vec<f32>,
    /// Scaled and dropped-out (not yet gated) output, needed for the gate's gradient.
    scaled: Vec<f32>,
    /// Per-row gate sigmoid and per-example gate value.
    gate: Option<(Vec<f32>, Vec<f32>)>,
    /// Input of LN_after (when the adapter has one).
    ln_after_in: Option<Vec<f32>>,
}

/// The adapter core of spec §3.4 on a block of rows: returns `y` and what the backward needs.
pub(crate) fn core_forward(prims: Prims<'_>, p: &BottleneckParams, x: &[f32], rho: &[f32], hidden: usize, seq_len: usize) -> Result<(Vec<f32>, CoreTape)> {
    let z0 = match &p.ln_before {
        Some(ln) => prims.layernorm(x, None, ln.gamma, ln.beta, ln.eps)?,
        None => x.to_vec(),
    };
    let pre = prims.linear(&z0, p.down_w, p.down_b, hidden)?;
    let act = prims.activation(&pre, p.activation);
    let up = prims.linear(&act, p.up_w, p.up_b, p.down_w.shape()[0])?;
    let mut u = up.clone();
    match p.scaling {
        ScalingParam::Fixed(s) => u.iter_mut().for_each(|v| *v *= s),
        ScalingParam::Learned(s) => {
            let s = s.f32_data()?[0];
            u.iter_mut().for_each(|v| *v *= s);
        }
        ScalingParam::Channel(s) => {
            let s = &*s.f32_data()?;
            u.chunks_mut(hidden).for_each(|row| row.iter_mut().zip(s).for_each(|(v, s)| *v *= s));
        }
    }
    if let Some(d) = &p.dropout {
        apply_dropout(&mut u, d)?;
    }
    let scaled = u.clone();
    let gate = match p.gate {
        Some((gw, gb)) => {
            let sig = prims.activation(&prims.linear(x, gw, gb, hidden)?, Activation::Sigmoid);
            let means: Vec<f32> =
                sig.chunks(seq_len).map(|g| (g.iter().map(|&v| v as f64).sum::<f64>() / seq_len as f64) as f32).collect();
            for (e, &g) in means.iter().enumerate() {
                u[e * seq_len * hidden..][..seq_len * hidden].iter_mut().for_each(|v| *v *= g);
            }
            Some((sig, means))
        }
        None => None,
    };
    let (y, ln_after_in) = if p.adapter_residual_before_ln {
        add_into(&mut u, rho);
        match &p.ln_after {
            Some(ln) => (prims.layernorm(&u, None, ln.gamma, ln.beta, ln.eps)?, Some(u)),
            None => (u, None),
        }
    } else {
        let (mut y, saved) = match &p.ln_after {
            Some(ln) => (prims.layernorm(&u, None, ln.gamma, ln.beta, ln.eps)?, Some(u)),
            None => (u, None),
        };
        add_into(&mut y, rho);
        (y, saved)
    };
    Ok((y, CoreTape { z0, pre, act, up, scaled, gate, ln_after_in }))
}

/// `(dx if asked for, dρ, parameter gradients if trainable)` of one core.
type CoreGrads = (Option<Vec<f32>>, Vec<f32>, Option<BottleneckGrads>);

/// `(dx, dρ, parameter gradients)` of the core for output gradient `dy`.
#[allow(clippy::too_many_arguments)]
fn core_backward(
    prims: Prims<'_>,
    p: &BottleneckParams,
    tape: &CoreTape,
    x: &[f32],
    dy: &[f32],
    hidden: usize,
    seq_len: usize,
    trainable: bool,
    need_dx: bool,
) -> Result<CoreGrads> {
    let rows = x.len() / hidden;
    let m = p.down_w.shape()[0];
    // Through LN_after and the adapter residual.
    let mut ln_after_grads = None;
    let (mut du, drho) = match (&p.ln_after, &tape.ln_after_in) {
        (Some(ln), Some(input)) => {
            let (dz, dg, db) = prims.layernorm_backward(dy, input, ln.gamma, ln.eps)?;
            ln_after_grads = Some((t(dg, &[hidden])?, t(db, &[hidden])?));
            if p.adapter_residual_before_ln {
                (dz.clone(), dz)
            } else {
                (dz, dy.to_vec())
            }
        }
        _ => (dy.to_vec(), dy.to_vec()),
    };
    // Gate: u_final = u·g_e with g_e = mean_t σ(x·w_g + b_g).
    let mut gate_grads = None;
    let mut dx_gate = None;
    if let (Some((gw, _)), Some((sig, means))) = (p.gate, &tape.gate) {
        let mut dlogit = vec![0f32; rows];
        for (e, &g) in means.iter().enumerate() {
            let block = e * seq_len * hidden..(e + 1) * seq_len * hidden;
            let dg: f64 = du[block.clone()].iter().zip(&tape.scaled[block.clone()]).map(|(a, b)| *a as f64 * *b as f64).sum();
            du[block].iter_mut().for_each(|v| *v *= g);
            for r in e * seq_len..(e + 1) * seq_len {
                let s = sig[r] as f64;
                dlogit[r] = (dg / seq_len as f64 * s * (1.0 - s)) as f32;
            }
        }
        if trainable {
            let (dw, db) = prims.linear_dw(&dlogit, x, hidden, 1);
            gate_grads = Some((t(dw, &[1, hidden])?, t(db, &[1])?));
        }
        if need_dx {
            dx_gate = Some(prims.linear_dx(&dlogit, gw)?);
        }
    }
    // The adapter's dropout sits between the scaling and the gate: pass its mask back.
    if let Some(d) = &p.dropout {
        apply_dropout(&mut du, d)?;
    }
    // Scaling.
    let mut dup = du.clone();
    let scaling_grad = match p.scaling {
        ScalingParam::Fixed(s) => {
            dup.iter_mut().for_each(|v| *v *= s);
            None
        }
        ScalingParam::Learned(s) => {
            let s = s.f32_data()?[0];
            dup.iter_mut().for_each(|v| *v *= s);
            let ds: f64 = du.iter().zip(&tape.up).map(|(a, b)| *a as f64 * *b as f64).sum();
            Some(t(vec![ds as f32], &[1])?)
        }
        ScalingParam::Channel(s) => {
            let s = &*s.f32_data()?;
            let mut ds = vec![0f64; hidden];
            for (row, (drow, urow)) in dup.chunks_mut(hidden).zip(du.chunks(hidden).zip(tape.up.chunks(hidden))) {
                for c in 0..hidden {
                    ds[c] += drow[c] as f64 * urow[c] as f64;
                    row[c] = drow[c] * s[c];
                }
            }
            Some(t(ds.into_iter().map(|v| v as f32).collect(), &[hidden])?)
        }
    };
    // Up projection, activation, down projection.
    let up_grads = trainable.then(|| prims.linear_dw(&dup, &tape.act, m, hidden));
    let dact = prims.linear_dx(&dup, p.up_w)?;
    let dpre = prims.activation_backward(&dact, &tape.pre, p.activation);
    let down_grads = trainable.then(|| prims.linear_dw(&dpre, &tape.z0, hidden, m));
    let mut ln_before_grads = None;
    let dx = if need_dx || (trainable && p.ln_before.is_some()) {
        let dz0 = prims.linear_dx(&dpre, p.down_w)?;
        let mut dx = match &p.ln_before {
            Some(ln) => {
                let (dx, dg, db) = prims.layernorm_backward(&dz0, x, ln.gamma, ln.eps)?;
                ln_before_grads = Some((t(dg, &[hidden])?, t(db, &[hidden])?));
                dx
            }
            None => dz0,
        };
        if let Some(g) = &dx_gate {
            add_into(&mut dx, g);
        }
        need_dx.then_some(dx)
    } else {
        None
    };
    let grads = match (up_grads, down_grads) {
        (Some((duw, dub)), Some((ddw, ddb))) => Some(BottleneckGrads {
            down_w: t(ddw, &[m, hidden])?,
            down_b: t(ddb, &[m])?,
            up_w: t(duw, &[hidden, m])?,
            up_b: t(dub, &[hidden])?,
            ln_before: ln_before_grads,
            ln_after: ln_after_grads,
            scaling: scaling_grad,
            gate: gate_grads,
        }),
        _ => None,
    };
    Ok((dx, drho, grads))
}

pub(crate) fn adapter_location_backward(
    prims: Prims<'_>,
    loc: &AdapterLocation,
    d_out: &Tensor,
    trainable: &[bool],
    need_input_grads: bool,
) -> Result<LocationGrads> {
    const OP: &str = "adapter_location_backward";
    let (n, examples, hidden) = validate_location(loc)?;
    if trainable.len() != n {
        return Err(Error::shape(OP, format!("{} trainable flags for {n} branches", trainable.len())));
    }
    let block = examples * loc.seq_len * hidden;
    if d_out.elem_count() != n * block {
        return Err(Error::shape(OP, format!("output gradient {:?} for {n} branches of {block} values", d_out.shape())));
    }
    let (h, r, d_out) = (&*loc.h.f32_data()?, &*loc.r.f32_data()?, &*d_out.f32_data()?);
    let ln = &loc.layer_norm;

    // Forward again: pre step, cores (with tapes), post step input.
    let pre = PreStep::run(prims, loc, h, r)?;
    let (x, v, rho) = (&pre.x, &pre.v, pre.rho(loc, h)?);
    let at = |i: usize| if loc.replicate { 0 } else { i * block };
    let mut y = Vec::with_capacity(n * block);
    let mut tapes = Vec::with_capacity(n);
    for (i, branch) in loc.branches.iter().enumerate() {
        let (yi, tape) = core_forward(prims, branch, &x[at(i)..at(i) + block], &rho[at(i)..at(i) + block], hidden, loc.seq_len)?;
        y.extend(yi);
        tapes.push(tape);
    }

    // Post step backward.
    let r_full: Vec<f32> = if loc.replicate { r.iter().copied().cycle().take(n * block).collect() } else { r.to_vec() };
    let (dy, dr_post) = if loc.steps.original_ln_after {
        let mut z = y;
        add_into(&mut z, &r_full);
        let (dz, _, _) = prims.layernorm_backward(d_out, &z, ln.gamma, ln.eps)?;
        (dz.clone(), Some(dz))
    } else {
        (d_out.to_vec(), None)
    };

    // Cores backward; with replication the branches' input gradients sum onto the shared rows.
    let rows_in = if loc.replicate { block } else { n * block };
    let mut dx = vec![0f32; rows_in];
    let mut drho = vec![0f32; rows_in];
    let mut grads = Vec::with_capacity(n);
    for (i, branch) in loc.branches.iter().enumerate() {
        let xi = &x[at(i)..at(i) + block];
        let (dxi, drhoi, g) =
            core_backward(prims, branch, &tapes[i], xi, &dy[i * block..(i + 1) * block], hidden, loc.seq_len, trainable[i], need_input_grads)?;
        if need_input_grads {
            add_into(&mut dx[at(i)..at(i) + block], &dxi.unwrap_or_default());
            add_into(&mut drho[at(i)..at(i) + block], &drhoi);
        }
        grads.push(g);
    }
    if !need_input_grads {
        return Ok(LocationGrads { dh: None, dr: None, branches: grads });
    }

    // Pre step backward.
    let mut dh = vec![0f32; rows_in];
    let mut dv = vec![0f32; if v.is_some() { rows_in } else { 0 }];
    match loc.steps.residual_before_ln {
        ResidualBeforeLn::True => add_into(&mut dh, &drho),
        ResidualBeforeLn::False => add_into(&mut dx, &drho),
        ResidualBeforeLn::PostAdd => add_into(&mut dv, &drho),
    }
    let mut dr = vec![0f32; rows_in];
    match &v {
        Some(v) => {
            let (dxv, _, _) = prims.layernorm_backward(&dx, v, ln.gamma, ln.eps)?;
            add_into(&mut dv, &dxv);
            add_into(&mut dh, &dv);
            add_into(&mut dr, &dv);
        }
        None => add_into(&mut dh, &dx),
    }
    if let Some(dp) = dr_post {
        for (i, chunk) in dp.chunks(block).enumerate() {
            add_into(&mut dr[at(i)..at(i) + block], chunk);
        }
    }
    let shape = [rows_in / (loc.seq_len * hidden), loc.seq_len, hidden];
    Ok(LocationGrads { dh: Some(t(dh, &shape)?), dr: Some(t(dr, &shape)?), branches: grads })
}

/// Backward of one NICE subnet `o = act(z·W0ᵀ + b0)·W2ᵀ + b2`: parameter gradients and,
/// if asked, `dz`.
#[allow(clippy::type_complexity)]
fn subnet_backward(
    prims: Prims<'_>,
    z: &[f32],
    l0: (&Tensor, &Tensor),
    l2: (&Tensor, &Tensor),
    act: Activation,
    dout: &[f32],
    need_dz: bool,
) -> Result<((Tensor, Tensor), (Tensor, Tensor), Option<Vec<f32>>)> {
    let (k, d_in) = (l0.0.shape()[0], l0.0.shape()[1]);
    let d_out = l2.0.shape()[0];
    let pre = prims.linear(z, l0.0, l0.1, d_in)?;
    let a = prims.activation(&pre, act);
    let (dw2, db2) = prims.linear_dw(dout, &a, k, d_out);
    let da = prims.linear_dx(dout, l2.0)?;
    let dpre = prims.activation_backward(&da, &pre, act);
    let (dw0, db0) = prims.linear_dw(&dpre, z, d_in, k);
    let dz = if need_dz { Some(prims.linear_dx(&dpre, l0.0)?) } else { None };
    Ok(((t(dw0, &[k, d_in])?, t(db0, &[k])?), (t(dw2, &[d_out, k])?, t(db2, &[d_out])?), dz))
}

pub(crate) fn nice_backward(prims: Prims<'_>, x: &Tensor, p: &NiceParams, dy: &Tensor) -> Result<NiceGrads> {
    if dy.shape() != x.shape() {
        return Err(Error::shape("nice_backward", format!("gradient {:?} for input {:?}", dy.shape(), x.shape())));
    }
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
    let (g0, g2w, dy1) = subnet_backward(prims, &y1, p.g0, p.g2, p.activation, &g2, true)?;
    add_into(&mut g1, &dy1.unwrap_or_default());
    let (f0, f2, _) = subnet_backward(prims, &x2, p.f0, p.f2, p.activation, &g1, false)?;
    Ok(NiceGrads { f0, f2, g0, g2: g2w })
}
