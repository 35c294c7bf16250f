//! One adapter location on the CPU (spec §4, §3.4, §7.3), forward and backward side by side,
//! composed from `Prims` so that the reference mode is the specification of the fused kernel.
//! Pre step: `v = h + r` and `x = LN(v)` when the original LayerNorm comes first (else `x = h`),
//! adapter residual ρ = `h`, `x` or `v`. Per branch, the bottleneck core:
//! `u = g·dropout(s ⊙ (act(LN_before(x)·Wdᵀ + bd)·Wuᵀ + bu))` with the gate `g` the per-example mean
//! of `σ(x·wgᵀ + bg)`, then `y = LN_after(u + ρ)` or `LN_after(u) + ρ`. Post step: `out = LN(y + r)`
//! or `y`. The backward recomputes the forward from `h` and `r` (two small products per branch, as
//! the fused kernel will) and walks it back, skipping frozen branches' parameter gradients and, when
//! not asked for, the input gradients.
//! Layout: `h`, `r` `[rows, T, H]` row-major; branch i reads rows `[i·B, (i+1)·B)`, or all of them
//! when replicating (its input gradients then sum onto the shared rows); the output stacks the
//! branches' `[B, T, H]` blocks. Numerics: the mode's; gate means and gate and scaling gradients
//! accumulate in f64.

use crate::backend::{Activation, AdapterLocation, BottleneckGrads, BottleneckParams, GradsOut, ScalingParam};
use crate::config::ResidualBeforeLn;
use rayon::prelude::*;

use crate::cpu::{apply_dropout, CpuMode};
use crate::cpu::prims::{add_into, bias_grad_into, check, check_destinations, store_tensor, Prims};
use crate::error::{Error, Result};
use crate::tensor::Tensor;


// ---- validation --------------------------------------------------------------------------------

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

/// Check branch `i`'s gradient destinations against its parameters: the same shapes, an option
/// the adapter lacks given none, no overlap among them and no storage shared with an input.
/// Returns them by name.
fn check_grads_out<'a>(loc: &AdapterLocation, d_out: &Tensor, i: usize, g: &'a BottleneckGrads) -> Result<Vec<(&'static str, &'a Tensor)>> {
    const OP: &str = "adapter_location_backward_into";
    let p = &loc.branches[i];
    let mut pairs: Vec<(&'static str, &Tensor, &Tensor)> = vec![("down weight", &g.down_w, p.down_w), ("down bias", &g.down_b, p.down_b), ("up weight", &g.up_w, p.up_w), ("up bias", &g.up_b, p.up_b)];
    let mismatch = |what: &str| Error::shape(OP, format!("branch {i}: a {what} gradient destination is given if and only if the adapter has one"));
    match (&g.ln_before, &p.ln_before) {
        (Some((dg, db)), Some(ln)) => pairs.extend([("LayerNorm-before gamma", dg, ln.gamma), ("LayerNorm-before beta", db, ln.beta)]),
        (None, None) => {}
        _ => return Err(mismatch("LayerNorm-before")),
    }
    match (&g.ln_after, &p.ln_after) {
        (Some((dg, db)), Some(ln)) => pairs.extend([("LayerNorm-after gamma", dg, ln.gamma), ("LayerNorm-after beta", db, ln.beta)]),
        (None, None) => {}
        _ => return Err(mismatch("LayerNorm-after")),
    }
    match (&g.scaling, p.scaling) {
        (Some(ds), ScalingParam::Learned(s) | ScalingParam::Channel(s)) => pairs.push(("scaling", ds, s)),
        (None, ScalingParam::Fixed(_)) => {}
        _ => return Err(mismatch("scaling")),
    }
    match (&g.gate, p.gate) {
        (Some((dw, db)), Some((w, b))) => pairs.extend([("gate weight", dw, w), ("gate bias", db, b)]),
        (None, None) => {}
        _ => return Err(mismatch("gate")),
    }
    for (what, dest, param) in &pairs {
        if dest.shape() != param.shape() {
            return Err(Error::shape(OP, format!("branch {i}: the {what} gradient destination has shape {:?}, expected {:?}", dest.shape(), param.shape())));
        }
    }
    let outs: Vec<(&'static str, &Tensor)> = pairs.iter().map(|(what, dest, _)| (*what, *dest)).collect();
    let mut inputs: Vec<(&str, &Tensor)> = vec![("h", loc.h), ("r", loc.r), ("d_out", d_out), ("LayerNorm gamma", loc.layer_norm.gamma), ("LayerNorm beta", loc.layer_norm.beta)];
    inputs.extend(pairs.iter().map(|(what, _, param)| (*what, *param)));
    check_destinations(OP, &outs, &inputs)?;
    Ok(outs)
}

/// Check a location's shapes; returns `(branches, examples per branch, hidden)`.
fn validate_location(loc: &AdapterLocation) -> Result<(usize, usize, usize)> {
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

// ---- pre step ----------------------------------------------------------------------------------

/// The pre step of a location (spec §4): `v = h + r` when the original LayerNorm comes first,
/// the adapter input `x`, and (through `rho`) the adapter residual.
struct PreStep {
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

// ---- bottleneck core: forward, backward ---------------------------------------------------------

/// What the core forward keeps for its backward.
struct CoreTape {
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
fn core_forward(prims: Prims<'_>, p: &BottleneckParams, x: &[f32], rho: &[f32], hidden: usize, seq_len: usize) -> Result<(Vec<f32>, CoreTape)> {
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

/// `(dx if asked for, dρ)` of one core; its parameter gradients go into `dest` (trainable).
type CoreGrads = (Option<Vec<f32>>, Vec<f32>);

/// `(dx, dρ)` of the core for output gradient `dy`, its parameter gradients written into (or
/// added to) `dest` when it is trainable. Each destination is locked only while it is written.
#[allow(clippy::too_many_arguments)]
fn core_backward(
    prims: Prims<'_>,
    p: &BottleneckParams,
    tape: &CoreTape,
    x: &[f32],
    dy: &[f32],
    hidden: usize,
    seq_len: usize,
    dest: Option<&GradsOut<BottleneckGrads>>,
    need_dx: bool,
) -> Result<CoreGrads> {
    let rows = x.len() / hidden;
    let m = p.down_w.shape()[0];
    let acc = dest.is_some_and(|d| d.accumulate);
    let out = dest.map(|d| &d.grads);
    // Through LN_after and the adapter residual.
    let (mut du, drho) = match (&p.ln_after, &tape.ln_after_in) {
        (Some(ln), Some(input)) => {
            let (dz, dg, db) = prims.layernorm_backward(dy, input, ln.gamma, ln.eps)?;
            if let Some((g, b)) = out.and_then(|o| o.ln_after.as_ref()) {
                store_tensor(g, &dg, acc)?;
                store_tensor(b, &db, acc)?;
            }
            if p.adapter_residual_before_ln {
                (dz.clone(), dz)
            } else {
                (dz, dy.to_vec())
            }
        }
        _ => (dy.to_vec(), dy.to_vec()),
    };
    // Gate: u_final = u·g_e with g_e = mean_t σ(x·w_g + b_g).
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
        if let Some((dw, db)) = out.and_then(|o| o.gate.as_ref()) {
            prims.linear_dw_into(&dlogit, x, hidden, 1, &mut dw.cpu_data_mut()?, acc);
            bias_grad_into(&dlogit, &mut db.cpu_data_mut()?, acc);
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
    match p.scaling {
        ScalingParam::Fixed(s) => dup.iter_mut().for_each(|v| *v *= s),
        ScalingParam::Learned(s) => {
            let s = s.f32_data()?[0];
            dup.iter_mut().for_each(|v| *v *= s);
            if let Some(dest) = out.and_then(|o| o.scaling.as_ref()) {
                let ds: f64 = du.iter().zip(&tape.up).map(|(a, b)| *a as f64 * *b as f64).sum();
                store_tensor(dest, &[ds as f32], acc)?;
            }
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
            if let Some(dest) = out.and_then(|o| o.scaling.as_ref()) {
                store_tensor(dest, &ds.into_iter().map(|v| v as f32).collect::<Vec<_>>(), acc)?;
            }
        }
    }
    // Up projection, activation, down projection: weight gradients straight into their
    // destinations (accumulated in the product on the fast path).
    if let Some(o) = out {
        prims.linear_dw_into(&dup, &tape.act, m, hidden, &mut o.up_w.cpu_data_mut()?, acc);
        bias_grad_into(&dup, &mut o.up_b.cpu_data_mut()?, acc);
    }
    let dact = prims.linear_dx(&dup, p.up_w)?;
    let dpre = prims.activation_backward(&dact, &tape.pre, p.activation);
    if let Some(o) = out {
        prims.linear_dw_into(&dpre, &tape.z0, hidden, m, &mut o.down_w.cpu_data_mut()?, acc);
        bias_grad_into(&dpre, &mut o.down_b.cpu_data_mut()?, acc);
    }
    let ln_before_dest = out.and_then(|o| o.ln_before.as_ref());
    let dx = if need_dx || ln_before_dest.is_some() {
        let dz0 = prims.linear_dx(&dpre, p.down_w)?;
        let mut dx = match &p.ln_before {
            Some(ln) => {
                let (dx, dg, db) = prims.layernorm_backward(&dz0, x, ln.gamma, ln.eps)?;
                if let Some((g, b)) = ln_before_dest {
                    store_tensor(g, &dg, acc)?;
                    store_tensor(b, &db, acc)?;
                }
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
    Ok((dx, drho))
}

// ---- the location: forward, backward ------------------------------------------------------------

/// Examples per chunk of the fast forward: about 64 rows, so a chunk's buffers stay in L2.
fn examples_per_chunk(seq_len: usize) -> usize {
    (64 / seq_len.max(1)).max(1)
}

/// `adapter_location`'s output in chunks of whole examples (the gate averages over an example),
/// in parallel: the pre step once per chunk of `h`'s rows, then per (branch, chunk) the core and
/// the post step. Every op is row-local, so this is the whole-tensor composition up to how gemm
/// rounds a row of a small product for the number of rows it is given (1 ulp measured).
#[allow(clippy::too_many_arguments)]
fn location_forward_chunked(prims: Prims<'_>, loc: &AdapterLocation, h: &[f32], r: &[f32], n: usize, examples: usize, hidden: usize) -> Result<Vec<f32>> {
    let t = loc.seq_len;
    let k = examples_per_chunk(t);
    let per_branch = examples.div_ceil(k);
    let sources = if loc.replicate { 1 } else { n }; // blocks of h's rows the branches read
    let span = |c: usize| (c * k, ((c + 1) * k).min(examples)); // examples of chunk c
    let rows_of = |src: usize, c: usize| {
        let (e0, e1) = span(c);
        (src * examples + e0) * t * hidden..(src * examples + e1) * t * hidden
    };
    // Pre step per chunk of h's rows.
    let pre: Vec<PreStep> = (0..sources * per_branch)
        .into_par_iter()
        .map(|q| {
            let rows = rows_of(q / per_branch, q % per_branch);
            PreStep::run(prims, loc, &h[rows.clone()], &r[rows])
        })
        .collect::<Result<_>>()?;
    let mut out = crate::cpu::pool::buffer(n * examples * t * hidden);
    let tasks: Vec<(usize, usize, &mut [f32])> = out
        .chunks_mut((examples * t * hidden).max(1))
        .enumerate()
        .flat_map(|(i, block)| block.chunks_mut((k * t * hidden).max(1)).enumerate().map(move |(c, chunk)| (i, c, chunk)))
        .collect();
    let ln = &loc.layer_norm;
    tasks.into_par_iter().try_for_each(|(i, c, dst)| -> Result<()> {
        let src = if loc.replicate { 0 } else { i };
        let rows = rows_of(src, c);
        let step = &pre[src * per_branch + c];
        let (hc, rc) = (&h[rows.clone()], &r[rows]);
        let (y, _) = core_forward(prims, &loc.branches[i], &step.x, step.rho(loc, hc)?, hidden, t)?;
        if loc.steps.original_ln_after {
            dst.copy_from_slice(&prims.layernorm(&y, Some(rc), ln.gamma, ln.beta, ln.eps)?);
        } else {
            dst.copy_from_slice(&y);
        }
        Ok(())
    })?;
    Ok(out)
}

pub(crate) fn adapter_location(prims: Prims<'_>, loc: &AdapterLocation) -> Result<Tensor> {
    let (n, examples, hidden) = validate_location(loc)?;
    let (h, r) = (&*loc.h.f32_data()?, &*loc.r.f32_data()?);
    let ln = &loc.layer_norm;
    // The fast path runs the location in chunks of whole examples on every thread, each chunk
    // through pre step, core and post step while it is in cache. A branch's own dropout counts
    // elements from its block's start, so those locations (training with adapter dropout) run whole.
    if prims.mode == CpuMode::Fast && loc.branches.iter().all(|b| b.dropout.is_none()) {
        let out = location_forward_chunked(prims, loc, h, r, n, examples, hidden)?;
        return prims.tensor(out, &[n * examples, loc.seq_len, hidden]);
    }

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
    prims.tensor(out, &[n * examples, loc.seq_len, hidden])
}

pub(crate) fn adapter_location_backward(
    prims: Prims<'_>,
    loc: &AdapterLocation,
    d_out: &Tensor,
    grads: &[Option<GradsOut<BottleneckGrads>>],
    need_input_grads: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    const OP: &str = "adapter_location_backward_into";
    let (n, examples, hidden) = validate_location(loc)?;
    if grads.len() != n {
        return Err(Error::shape(OP, format!("{} gradient destinations for {n} branches", grads.len())));
    }
    for (i, g) in grads.iter().enumerate() {
        if let Some(g) = g {
            check_grads_out(loc, d_out, i, &g.grads)?;
        }
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
    for (i, branch) in loc.branches.iter().enumerate() {
        let xi = &x[at(i)..at(i) + block];
        let (dxi, drhoi) =
            core_backward(prims, branch, &tapes[i], xi, &dy[i * block..(i + 1) * block], hidden, loc.seq_len, grads[i].as_ref(), need_input_grads)?;
        if need_input_grads {
            add_into(&mut dx[at(i)..at(i) + block], &dxi.unwrap_or_default());
            add_into(&mut drho[at(i)..at(i) + block], &drhoi);
        }
    }
    if !need_input_grads {
        return Ok((None, None));
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
    Ok((Some(prims.tensor(dh, &shape)?), Some(prims.tensor(dr, &shape)?)))
}
