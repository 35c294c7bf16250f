//! AdamW and gradient-norm clipping with PyTorch's exact semantics, on host tensors.
//!
//! `AdamW` mirrors `torch.optim.AdamW` (PyTorch 2.x, `amsgrad=False`, `maximize=False`, the
//! single-tensor path torch takes for CPU tensors), including where torch rounds: scalars
//! (`lr`, betas, bias corrections) are Python floats, i.e. f64, and are rounded to f32 once,
//! where torch's kernels convert them; the per-element arithmetic is f32 in torch's order.
//! `clip_grad_norm` mirrors `torch.nn.utils.clip_grad_norm_` (L2 norm).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// `torch.optim.AdamW` hyper-parameters, with torch's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 1e-3, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 1e-2 }
    }
}

impl AdamWConfig {
    /// torch's constructor checks (`0 ≤ lr`, `0 ≤ eps`, `0 ≤ β < 1`, `0 ≤ weight_decay`), plus
    /// finiteness, which torch leaves to chance.
    pub fn validate(&self) -> Result<()> {
        let (b1, b2) = self.betas;
        let checks = [
            ("lr", self.lr, self.lr >= 0.0),
            ("eps", self.eps, self.eps >= 0.0),
            ("betas.0", b1, (0.0..1.0).contains(&b1)),
            ("betas.1", b2, (0.0..1.0).contains(&b2)),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0.0),
        ];
        for (name, v, ok) in checks {
            if !ok || !v.is_finite() {
                return Err(Error::Input(format!("AdamW {name} = {v} is out of range")));
            }
        }
        Ok(())
    }
}

/// Optimizer state of one parameter: torch's `state[p]` = `{step, exp_avg, exp_avg_sq}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamState {
    /// Steps this parameter has taken (torch counts per parameter: one without a gradient at
    /// some `step()` call falls behind the others).
    pub step: u64,
    pub shape: Vec<usize>,
    /// First moment `m`, row-major like the parameter.
    pub exp_avg: Vec<f32>,
    /// Second moment `v`.
    pub exp_avg_sq: Vec<f32>,
}

/// Everything needed to resume an `AdamW`: plain vectors, for checkpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWState {
    pub config: AdamWConfig,
    /// `step()` calls that updated at least one parameter.
    pub steps: u64,
    pub params: BTreeMap<String, ParamState>,
}

/// `torch.optim.AdamW`, over named host tensors (`step`, the reference) or over a flat arena on
/// the model's device (`step_arena`, what training runs). State is created for a key the first
/// time it gets a gradient, so an optimizer only ever holds the parameters it has updated.
#[derive(Clone)]
pub struct AdamW {
    config: AdamWConfig,
    steps: u64,
    /// Host state (the reference path, and the arena path's state when it is not bound).
    state: BTreeMap<String, ParamState>,
    /// The moments on the device, once `step_arena` has run; then the source of truth.
    device: Option<DeviceMoments>,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW").field("config", &self.config).field("steps", &self.steps).field("on_device", &self.device.is_some()).finish()
    }
}

/// One entry of an arena's table: a parameter's key, where it starts and its shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArenaEntry {
    pub key: String,
    pub offset: usize,
    pub shape: Vec<usize>,
}

impl ArenaEntry {
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.shape.iter().product::<usize>()
    }
}

/// AdamW moments laid out like a parameter arena, on the arena's device.
#[derive(Clone)]
struct DeviceMoments {
    backend: Arc<dyn Backend>,
    table: Vec<ArenaEntry>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// U32 `[tensors]`: per-tensor step counts (torch counts per parameter).
    steps: Tensor,
    /// Whether each tensor has state yet (it has taken a step).
    started: Vec<bool>,
    /// F32 `[2]`: the learning rate as an f64 split in two f32s (`split_f64`).
    lr: Tensor,
    lr_on_device: f64,
}

/// `v` as `[hi, lo]` f32s with `hi + lo` (summed in f64) equal to `v` to about 48 bits: how a
/// device buffer of f32s carries torch's f64 learning rate without rounding it to f32.
pub fn split_f64(v: f64) -> [f32; 2] {
    let hi = v as f32;
    [hi, (v - hi as f64) as f32]
}

/// The inverse of `split_f64`.
pub fn join_f64(hi_lo: &[f32]) -> f64 {
    hi_lo.iter().map(|&x| x as f64).sum()
}

/// One AdamW launch over a flat arena (`Backend::adamw`): everything that changes from step to
/// step is in device buffers, so the launch itself is the same every step.
pub struct AdamWLaunch<'a> {
    /// Betas, eps and weight decay; `lr` here is ignored (it is read from `lr`).
    pub config: AdamWConfig,
    /// `[N]` f32 each: the parameter arena, its gradients, and the two moments.
    pub params: &'a Tensor,
    pub grads: &'a Tensor,
    pub exp_avg: &'a Tensor,
    pub exp_avg_sq: &'a Tensor,
    /// `(tensor index, element range)` of the tensors that received a gradient; others are
    /// skipped, as torch skips `grad is None`.
    pub segments: &'a [(usize, Range<usize>)],
    /// U32 `[tensors]`: per-tensor step counts, incremented here for each updated tensor.
    pub steps: &'a Tensor,
    /// F32 `[2]`: the learning rate (`split_f64`).
    pub lr: &'a Tensor,
    /// F32 `[1]`: when it is not finite (a NaN or infinite gradient norm), nothing is updated.
    pub skip_unless_finite: Option<&'a Tensor>,
}

/// The host reference of `Backend::adamw`, on plain slices (what the CPU backend runs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn adamw_arena_reference(config: &AdamWConfig, lr: f64, params: &mut [f32], grads: &[f32], exp_avg: &mut [f32], exp_avg_sq: &mut [f32], segments: &[(usize, Range<usize>)], steps: &mut [u32]) -> Result<()> {
    let config = AdamWConfig { lr, ..*config };
    for (i, r) in segments {
        let step = steps.get_mut(*i).ok_or_else(|| Error::shape("adamw", format!("tensor {i} of {}", params.len())))?;
        if r.end > params.len() || r.end > grads.len() || r.end > exp_avg.len() || r.end > exp_avg_sq.len() {
            return Err(Error::shape("adamw", format!("segment {r:?} is outside an arena of {}", params.len())));
        }
        *step += 1;
        let sc = StepScalars::new(&config, *step as u64);
        for j in r.clone() {
            sc.update(&mut params[j], grads[j], &mut exp_avg[j], &mut exp_avg_sq[j]);
        }
    }
    Ok(())
}

fn expect_cpu(what: &str, key: &str, t: &Tensor) -> Result<()> {
    match t.device() {
        Device::Cpu => Ok(()),
        d => Err(Error::Unsupported(format!("AdamW runs on host tensors; {what} `{key}` is on {d}"))),
    }
}

impl DeviceMoments {
    fn bind(backend: &Arc<dyn Backend>, table: &[ArenaEntry], host: &BTreeMap<String, ParamState>) -> Result<Self> {
        let n = table.last().map_or(0, |e| e.range().end);
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let mut steps = vec![0u32; table.len()];
        let mut started = vec![false; table.len()];
        for (i, e) in table.iter().enumerate() {
            if let Some(s) = host.get(&e.key) {
                if s.shape != e.shape {
                    return Err(Error::shape("AdamW", format!("`{}`: optimizer state {:?}, parameter {:?}", e.key, s.shape, e.shape)));
                }
                m[e.range()].copy_from_slice(&s.exp_avg);
                v[e.range()].copy_from_slice(&s.exp_avg_sq);
                steps[i] = u32::try_from(s.step).map_err(|_| Error::Input(format!("AdamW: `{}` has taken {} steps, more than 2^32", e.key, s.step)))?;
                started[i] = true;
            }
        }
        let upload = |data: Vec<f32>| backend.upload(data, &[n]);
        let steps_t = backend.upload_u32(steps, &[table.len()])?;
        Ok(DeviceMoments {
            backend: backend.clone(),
            table: table.to_vec(),
            exp_avg: upload(m)?,
            exp_avg_sq: upload(v)?,
            steps: steps_t,
            started,
            lr: backend.upload(vec![f32::NAN; 2], &[2])?,
            lr_on_device: f64::NAN,
        })
    }

    /// The per-key host state of the tensors that have taken a step.
    fn to_host(&self) -> Result<BTreeMap<String, ParamState>> {
        let be = &self.backend;
        let (m, v) = (be.to_host(&self.exp_avg)?, be.to_host(&self.exp_avg_sq)?);
        let steps = be.to_host_u32(&self.steps)?;
        let mut out = BTreeMap::new();
        for (i, e) in self.table.iter().enumerate().filter(|(i, _)| self.started[*i]) {
            out.insert(e.key.clone(), ParamState { step: steps[i] as u64, shape: e.shape.clone(), exp_avg: m[e.range()].to_vec(), exp_avg_sq: v[e.range()].to_vec() });
        }
        Ok(out)
    }
}

/// The scalars of one update at per-parameter step `t`, rounded where torch rounds them.
struct StepScalars {
    /// `1 − lr·wd` (torch `param.mul_`), None when wd = 0 (torch skips the multiply).
    decay: Option<f32>,
    /// lerp weight `1 − β1` and whether torch takes its small-weight branch.
    w1: f32,
    w1_small: bool,
    beta2: f32,
    one_minus_beta2: f32,
    /// `√(1 − β2ᵗ)`.
    bc2_sqrt: f32,
    eps: f32,
    /// `−lr/(1 − β1ᵗ)`.
    neg_step_size: f32,
}

impl StepScalars {
    fn new(c: &AdamWConfig, t: u64) -> Self {
        let (b1, b2) = c.betas;
        // torch: `beta ** step` with step a Python float: C pow, not repeated multiplication.
        let t = t as f64;
        let bias_correction1 = 1.0 - b1.powf(t);
        let bias_correction2 = 1.0 - b2.powf(t);
        let w1 = 1.0 - b1;
        StepScalars {
            decay: (c.weight_decay != 0.0).then_some((1.0 - c.lr * c.weight_decay) as f32),
            w1: w1 as f32,
            w1_small: w1.abs() < 0.5,
            beta2: b2 as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            bc2_sqrt: bias_correction2.sqrt() as f32,
            eps: c.eps as f32,
            neg_step_size: (-(c.lr / bias_correction1)) as f32,
        }
    }

    /// One element, f32 throughout, in torch's operation order.
    #[inline]
    fn update(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        if let Some(d) = self.decay {
            *p *= d;
        }
        // `exp_avg.lerp_(grad, w)`: torch's vectorised CPU kernel (and its CUDA kernel) compute
        // `fma(w, g − m, m)` for |w| < 0.5, else `fma(w − 1, g − m, g)`: one rounding.
        *m = if self.w1_small { self.w1.mul_add(g - *m, *m) } else { (self.w1 - 1.0).mul_add(g - *m, g) };
        // `exp_avg_sq.mul_(β2).addcmul_(g, g, value=1−β2)`: `v·β2`, then `v + (s·g)·g` with the
        // last multiply-add fused, as torch's FMA-built CPU kernel evaluates it (of the fused and
        // unfused readings, this one reproduces the torch fixtures bit for bit most often).
        *v *= self.beta2;
        *v = (self.one_minus_beta2 * g).mul_add(g, *v);
        // `denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)`; `param.addcdiv_(m, denom, value=−step_size)`.
        let denom = v.sqrt() / self.bc2_sqrt + self.eps;
        *p += self.neg_step_size * *m / denom;
    }
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        Ok(AdamW { config, steps: 0, state: BTreeMap::new(), device: None })
    }

    /// Resume from a saved state (lengths, step counts and config checked).
    pub fn from_state(state: AdamWState) -> Result<Self> {
        state.config.validate()?;
        for (key, s) in &state.params {
            // The device keeps step counts in u32: refused here, not at the first step.
            if u32::try_from(s.step).is_err() {
                return Err(Error::Input(format!("AdamW: `{key}` has taken {} steps, more than 2^32", s.step)));
            }
            let n: usize = s.shape.iter().product();
            if s.exp_avg.len() != n || s.exp_avg_sq.len() != n {
                return Err(Error::shape(
                    "AdamW::from_state",
                    format!("`{key}`: shape {:?} needs {n} elements, got exp_avg {} and exp_avg_sq {}", s.shape, s.exp_avg.len(), s.exp_avg_sq.len()),
                ));
            }
        }
        Ok(AdamW { config: state.config, steps: state.steps, state: state.params, device: None })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Change the learning rate (for a schedule); like editing torch's `param_groups[0]["lr"]`.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        let config = AdamWConfig { lr, ..self.config };
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// `step()` calls that updated at least one parameter.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The state of one parameter, if it has been updated (read back from the device when the
    /// optimizer runs there).
    pub fn param_state(&self, key: &str) -> Option<ParamState> {
        self.state().params.remove(key)
    }

    /// A copy of the whole state, for a checkpoint (read back from the device when the optimizer
    /// runs there: a requested transfer). A device read that fails leaves the host copy.
    pub fn state(&self) -> AdamWState {
        let params = match &self.device {
            Some(d) => d.to_host().unwrap_or_else(|_| self.state.clone()),
            None => self.state.clone(),
        };
        AdamWState { config: self.config, steps: self.steps, params }
    }

    /// One update over a flat arena on `backend`'s device: `params` and `grads` are `[N]` arenas
    /// laid out by `table`, and `with_grad[i]` says whether tensor `i` received a gradient this
    /// step (those without are skipped, with no decay). Binds the optimizer to the arena on first
    /// use (moving any host state there); after that nothing is transferred unless the learning
    /// rate changes. `skip_unless_finite` is the gradient norm: a non-finite one updates nothing.
    pub fn step_arena(&mut self, backend: &Arc<dyn Backend>, table: &[ArenaEntry], params: &Tensor, grads: &Tensor, with_grad: &[bool], skip_unless_finite: Option<&Tensor>) -> Result<()> {
        if with_grad.len() != table.len() {
            return Err(Error::Internal(format!("AdamW: {} gradient flags for {} tensors", with_grad.len(), table.len())));
        }
        let n = table.last().map_or(0, |e| e.range().end);
        if params.elem_count() != n || grads.elem_count() != n {
            return Err(Error::shape("AdamW::step_arena", format!("arena of {n} elements, parameters {:?}, gradients {:?}", params.shape(), grads.shape())));
        }
        self.bind_arena(backend, table)?;
        let d = self.device.as_mut().expect("bound above");
        if d.lr_on_device != self.config.lr {
            backend.write_f32(&d.lr, &split_f64(self.config.lr))?;
            d.lr_on_device = self.config.lr;
        }
        let segments: Vec<(usize, Range<usize>)> = table.iter().enumerate().filter(|(i, _)| with_grad[*i]).map(|(i, e)| (i, e.range())).collect();
        backend.adamw(&AdamWLaunch {
            config: self.config,
            params,
            grads,
            exp_avg: &d.exp_avg,
            exp_avg_sq: &d.exp_avg_sq,
            segments: &segments,
            steps: &d.steps,
            lr: &d.lr,
            skip_unless_finite,
        })?;
        for (i, _) in &segments {
            d.started[*i] = true;
        }
        if !segments.is_empty() {
            self.steps += 1;
        }
        Ok(())
    }

    /// Binds the optimizer to an arena laid out by `table` on `backend`'s device (moving any host
    /// state there), unless it already is. `step_arena` does it on first use; a training step
    /// does it before its own work, so the persistent buffers are allocated before the step's
    /// scratch and a second step at the same shape finds all of that scratch in the pool.
    pub fn bind_arena(&mut self, backend: &Arc<dyn Backend>, table: &[ArenaEntry]) -> Result<()> {
        if self.device.as_ref().is_none_or(|d| d.table != table) {
            // First use, or a new layout (an adapter re-packed): carry the state over by key.
            let mut host = self.state();
            self.device = None;
            self.state = std::mem::take(&mut host.params);
            self.device = Some(DeviceMoments::bind(backend, table, &self.state)?);
        }
        Ok(())
    }

    /// Writes a changed learning rate into the bound device buffer now, so that a step captured
    /// in a graph (which may not copy from the host) finds it there; a no-op when unchanged or
    /// before `step_arena` has bound the optimizer.
    pub(crate) fn stage_lr(&mut self) -> Result<()> {
        if let Some(d) = self.device.as_mut() {
            if d.lr_on_device != self.config.lr {
                d.backend.write_f32(&d.lr, &split_f64(self.config.lr))?;
                d.lr_on_device = self.config.lr;
            }
        }
        Ok(())
    }

    /// The device buffers a bound optimizer updates (moments, step counts, learning rate), for a
    /// captured step to keep alive and to recognise; empty before `step_arena` binds it.
    pub(crate) fn device_buffers(&self) -> Vec<Tensor> {
        self.device.as_ref().map_or_else(Vec::new, |d| vec![d.exp_avg.clone(), d.exp_avg_sq.clone(), d.steps.clone(), d.lr.clone()])
    }

    /// Host bookkeeping of a step a graph replay performed (the device counts were updated by
    /// the replayed kernels): `steps` as `step_arena` counts it.
    pub(crate) fn count_replayed_step(&mut self, updated: bool) {
        if updated {
            self.steps += 1;
        }
    }

    /// Host bookkeeping of a step whose gradient norm turned out non-finite (a loss-scaled f16
    /// step that overflowed, `LossScaler`): the device skipped the update, its step counts
    /// included, so the host count takes back the one `step_arena` added.
    pub fn uncount_skipped_step(&mut self) {
        self.steps = self.steps.saturating_sub(1);
    }

    /// Resets the host step count (a capture ran `step_arena`'s host code without a step).
    pub(crate) fn set_step_count(&mut self, steps: u64) {
        self.steps = steps;
    }

    /// One update of every parameter in `params` that has a gradient in `grads` (the host
    /// reference; an optimizer bound to a device arena by `step_arena` refuses it); parameters
    /// without a gradient are skipped (torch's `p.grad is None`). A gradient without a parameter,
    /// or any shape mismatch, is an error, and nothing is changed then.
    pub fn step(&mut self, params: &mut BTreeMap<String, Tensor>, grads: &BTreeMap<String, Tensor>) -> Result<()> {
        if self.device.is_some() {
            return Err(Error::Unsupported("AdamW::step on host tensors after step_arena bound this optimizer to a device arena".into()));
        }
        // Validate everything first, so that an error leaves params and state untouched.
        for (key, g) in grads {
            let p = params
                .get(key)
                .ok_or_else(|| Error::Input(format!("AdamW: gradient `{key}` has no parameter of that name")))?;
            if p.shape() != g.shape() {
                return Err(Error::shape("AdamW::step", format!("`{key}`: parameter {:?}, gradient {:?}", p.shape(), g.shape())));
            }
            if let Some(s) = self.state.get(key) {
                if s.shape != p.shape() {
                    return Err(Error::shape("AdamW::step", format!("`{key}`: parameter {:?}, optimizer state {:?}", p.shape(), s.shape)));
                }
            }
            expect_cpu("parameter", key, p)?;
            expect_cpu("gradient", key, g)?;
        }
        for (key, g) in grads {
            let p = params.get_mut(key).expect("checked above");
            let s = self.state.entry(key.clone()).or_insert_with(|| ParamState {
                step: 0,
                shape: p.shape().to_vec(),
                exp_avg: vec![0.0; g.elem_count()],
                exp_avg_sq: vec![0.0; g.elem_count()],
            });
            s.step += 1;
            let sc = StepScalars::new(&self.config, s.step);
            let (mut pd, gd) = (p.cpu_data_mut()?, g.cpu_data()?);
            for (((p, &g), m), v) in pd.iter_mut().zip(gd.iter()).zip(s.exp_avg.iter_mut()).zip(s.exp_avg_sq.iter_mut()) {
                sc.update(p, g, m, v);
            }
        }
        if !grads.is_empty() {
            self.steps += 1;
        }
        Ok(())
    }
}

/// `torch.nn.utils.clip_grad_norm_(grads, max_norm)` (L2): returns the total norm before
/// clipping and, when `max_norm/(total + 1e-6) < 1`, multiplies every gradient by that factor.
///
/// torch takes the norm of each tensor, then the norm of those norms, in f32. Here each per-tensor
/// norm is accumulated in f64 and rounded to f32 (torch's f32 lane sums differ from it by a few
/// ulp at most), then the norm of norms likewise. The factor is computed in f32 as torch does
/// (`(total + 1e-6).reciprocal() * max_norm`). A non-finite norm poisons the gradients exactly as
/// in torch with `error_if_nonfinite=False`; check the returned norm.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, Tensor>, max_norm: f32) -> Result<f32> {
    if !(max_norm.is_finite() && max_norm >= 0.0) {
        return Err(Error::Input(format!("clip_grad_norm: max_norm {max_norm} must be finite and >= 0")));
    }
    for (key, g) in grads.iter() {
        if g.device() != Device::Cpu {
            return Err(Error::Unsupported(format!("clip_grad_norm runs on host tensors; gradient `{key}` is on {}", g.device())));
        }
    }
    let views: Vec<Tensor> = grads.values().cloned().collect(); // handles: the same storage
    clip_in_place(&views, max_norm)
}

/// The arithmetic of `clip_grad_norm_` on CPU tensors (the host function above and the CPU
/// backend's op both run it): the norm of the per-tensor norms, each accumulated in f64 and
/// rounded to f32, and the factor in f32 as torch computes it; `max_norm = +inf` only measures.
pub(crate) fn clip_in_place(grads: &[Tensor], max_norm: f32) -> Result<f32> {
    let mut sum_sq = 0f64;
    for g in grads {
        let n = g.cpu_data()?.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt() as f32;
        sum_sq += (n as f64) * (n as f64);
    }
    let total = sum_sq.sqrt() as f32;
    let coef = (1.0f32 / (total + 1e-6f32)) * max_norm;
    // torch multiplies by `clamp(coef, max=1)` unconditionally; ×1 is the identity, and a NaN
    // coefficient must still propagate.
    if max_norm.is_finite() && (coef.is_nan() || coef < 1.0) {
        for g in grads {
            g.cpu_data_mut()?.iter_mut().for_each(|x| *x *= coef);
        }
    }
    Ok(total)
}
