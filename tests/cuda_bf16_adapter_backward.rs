//! The bf16-activation adapter-location backward: the split path's `_bf16io` kernels
//! (`adapter_split_bwd_{pre,post,input}_bf16io`, `adapter_location_backward_gate_bf16io`, through
//! `cuda::adapter::adapter_location_backward_split` with bf16 views): h, r, d_out, dh, dr and the
//! BERT LayerNorm γ, β in bf16; every adapter weight, weight gradient and the workspace f32.
//!
//! Three checks per case, on inputs already rounded to bf16 (h, r, d_out, γ, β):
//! - exactness: the bf16io kernels are the f32 kernels' templated bodies with the activations
//!   widened exactly on load and dh, dr rounded once on store, and every product is the same f32
//!   GEMM on the same f32 workspace, so dh and dr are the f32 split backward's (on the widened
//!   inputs) rounded once, and every weight gradient is the f32 split backward's: bit for bit on
//!   the executor, within one bf16 ulp / 2^-20 relative on a GPU (tests/support/bf16.rs);
//! - the bf16 rule (docs/STYLE.md) for dh and dr: error against the CPU reference backend's
//!   backward on the same rounded inputs at most twice a plain bf16 backward's plus a floor. The
//!   plain twin is the reference's (f64) result rounded once to bf16: more accurate than PyTorch's
//!   bf16 backward, which rounds every intermediate gradient, so this bound is the stricter one
//!   (the convention of tests/support/plain_bf16.rs for fused ops);
//! - the weight gradients (f32) against the same CPU reference within the fp32 rule
//!   `1e-4·(1 + max|ref|)`.
//!
//! Outputs start as NaN (bf16 NaN for dh, dr), so an unwritten element fails. Cases: H not a
//! multiple of 32 and H = 384, bottlenecks 1..64+, T 1..33, 1–3 branches, replicate on and off,
//! pfeiffer / houlsby / residual_before_ln False / post_add, gates, the adapter's dropout at p = 0.1
//! and 0.5, frozen branches, accumulation, without input gradients; the fused path refuses bf16.
//!
//! With the tensor-core forward (`SplitForward::TensorCores`) the backward recomputes pre, a and
//! up with the forward's tensor-core kernels (`adapter_split_bwd_pre_down_*`,
//! `adapter_split_bwd_up_*`): checked bit for bit against the GEMM path on cases whose roundings
//! are exact, and falling back with the forward (see the tests' own docs for why no per-location
//! rule holds for it).
//!
//! f16 (the `_f16io` kernels, f16 γ, β) runs the same bodies, generic over the 16-bit type `H`
//! ([`Io`]): every "bf16" above reads "H" (its rounding, ulps, plain twin and the rule's floor);
//! each test runs as `<name>::bf16` and `<name>::f16`, on the bf16 cases' draws: h, r ∈ ±2,
//! d_out ∈ ±1 and the gradients they give (O(10) at most) are far inside f16's range.

use bert_adapters::backend::{BottleneckGrads, BottleneckParams, GradsOut, LocationSteps};
use bert_adapters::config::ResidualBeforeLn;
use bert_adapters::cuda::adapter::{
    adapter_location_backward, adapter_location_backward_on, adapter_location_backward_split, BranchGrads, BranchWeights, LocationBackwardOutputs,
    LocationBackwardWorkspace, LocationDescriptors, LocationInputs, LocationPath, LocationShape, SplitForward,
};
use bert_adapters::cuda::gpu::{ActivationScalar, BaseScalar, DeviceBuffer, Gpu};
use bert_adapters::cuda::probe::report_line;
use bert_adapters::{Activation, Backend, CpuBackend, Error, Tensor};
use half::bf16;
use rand::rngs::StdRng;
use rand::SeedableRng;

const TOL: f32 = 1e-4;

#[path = "support/adapter_location.rs"]
#[allow(dead_code)] // each test file uses part of the shared cases
mod cases;
use cases::*;

#[path = "support/bf16.rs"]
mod bf16_rule;
use bf16_rule::{assert_rounded_f32_kernel_in, assert_same_f32, assert_within_twice_plain_in, round_all_in, to_half, widen_from, test_both, Half, Io};


/// One backward with its inputs rounded to `H`.
struct Case {
    batch: usize,
    seq_len: usize,
    hidden: usize,
    replicate: bool,
    steps: LocationSteps,
    h: Vec<f32>,
    r: Vec<f32>,
    d_out: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    branches: Vec<HostBranch>,
    trainable: Vec<bool>,
    accumulate: bool,
    need_input: bool,
}

/// Per branch: its gradients by name (None when frozen).
type Grads = Vec<Option<Vec<(&'static str, Vec<f32>)>>>;
/// `(dh, dr)` on the host.
type InputGrads<T> = (Vec<T>, Vec<T>);

impl Case {
    #[allow(clippy::too_many_arguments)]
    fn random<H: Half>(rng: &mut StdRng, batch: usize, seq_len: usize, hidden: usize, replicate: bool, steps: LocationSteps, specs: &[BranchSpec], trainable: &[bool], need_input: bool) -> Case {
        let n = specs.len();
        let rows = if replicate { batch } else { batch * n };
        let count = rows * seq_len * hidden;
        Case {
            batch,
            seq_len,
            hidden,
            replicate,
            steps,
            h: round_all_in::<H>(&uniform(rng, count, -2.0, 2.0)),
            r: round_all_in::<H>(&uniform(rng, count, -2.0, 2.0)),
            d_out: round_all_in::<H>(&uniform(rng, n * batch * seq_len * hidden, -1.0, 1.0)),
            gamma: round_all_in::<H>(&uniform(rng, hidden, 0.5, 1.5)),
            beta: round_all_in::<H>(&uniform(rng, hidden, -0.5, 0.5)),
            branches: specs.iter().map(|s| HostBranch::random_scaled(rng, hidden, *s, 3.0)).collect(),
            trainable: trainable.to_vec(),
            accumulate: false,
            need_input,
        }
    }

    /// Branch i drops out with probability `ps[i]` (the i-th child of a Parallel at `stream`).
    fn with_dropout(mut self, ps: &[Option<f32>], seed: u64, stream: u64) -> Case {
        for (i, b) in self.branches.iter_mut().enumerate() {
            b.dropout = ps[i].map(|p| adapter_dropout(p, seed, stream, i as u64));
        }
        self
    }

    fn shape(&self) -> LocationShape {
        LocationShape { batch: self.batch, seq_len: self.seq_len, hidden: self.hidden, branches: self.branches.len(), replicate: self.replicate }
    }

    fn label(&self) -> String {
        let specs: Vec<String> = self.branches.iter().zip(&self.trainable).map(|(b, t)| format!("{}{}{}", b.spec.label(), if *t { "" } else { " FROZEN" }, if b.dropout.is_some() { " dropout" } else { "" })).collect();
        location_label(self.shape(), &format!(" accumulate={} need_input={}", self.accumulate, self.need_input), self.steps, &specs)
    }

    /// Accumulated destinations start from these values (both sides).
    fn initial(&self, len: usize, salt: usize) -> Vec<f32> {
        if self.accumulate {
            uniform(&mut StdRng::seed_from_u64(0x5eed + salt as u64), len, -1.0, 1.0)
        } else {
            vec![0.0; len]
        }
    }

    /// The CPU reference on the rounded inputs: `(dh, dr)` when asked for, and the gradients.
    fn reference(&self) -> (Option<InputGrads<f32>>, Grads) {
        let (h, r) = (host_rows(&self.h, self.seq_len, self.hidden), host_rows(&self.r, self.seq_len, self.hidden));
        let d_out = tensor(self.d_out.clone(), &[self.branches.len() * self.batch, self.seq_len, self.hidden]);
        let (gamma, beta) = (tensor(self.gamma.clone(), &[self.hidden]), tensor(self.beta.clone(), &[self.hidden]));
        let params: Vec<BottleneckParams> = self.branches.iter().map(HostBranch::params).collect();
        let loc = host_location(&h, &r, &gamma, &beta, self.steps, &params, self.shape());
        let dests: Vec<Option<BottleneckGrads>> = self
            .branches
            .iter()
            .enumerate()
            .map(|(i, b)| {
                self.trainable[i].then(|| {
                    let mut k = 0;
                    let mut like = |t: &Tensor| {
                        k += 1;
                        tensor(self.initial(t.elem_count(), 16 * i + k), t.shape())
                    };
                    let down_w = like(&b.down_w);
                    let down_b = like(&b.down_b);
                    let up_w = like(&b.up_w);
                    let up_b = like(&b.up_b);
                    let ln_before = b.ln_before.as_ref().map(|(g, bt)| (like(g), like(bt)));
                    let ln_after = b.ln_after.as_ref().map(|(g, bt)| (like(g), like(bt)));
                    let gate = b.gate.as_ref().map(|(w, bt)| (like(w), like(bt)));
                    let scaling = b.scaling.as_ref().map(&mut like);
                    BottleneckGrads { down_w, down_b, up_w, up_b, ln_before, ln_after, scaling, gate }
                })
            })
            .collect();
        let grads: Vec<Option<GradsOut<BottleneckGrads>>> = dests.iter().map(|g| g.clone().map(|grads| GradsOut { grads, accumulate: self.accumulate })).collect();
        let (dh, dr) = CpuBackend::reference().adapter_location_backward_into(&loc, &d_out, &grads, self.need_input).unwrap_or_else(|e| panic!("{}: CPU reference: {e}", self.label()));
        let inputs = match (dh, dr) {
            (Some(dh), Some(dr)) => Some((data(&dh), data(&dr))),
            _ => None,
        };
        let named = |g: &BottleneckGrads| {
            let mut v = vec![("down weight", data(&g.down_w)), ("down bias", data(&g.down_b)), ("up weight", data(&g.up_w)), ("up bias", data(&g.up_b))];
            for (name, p) in [("LN-before", &g.ln_before), ("LN-after", &g.ln_after), ("gate", &g.gate)] {
                if let Some((a, b)) = p {
                    v.push((name, data(a)));
                    v.push((name, data(b)));
                }
            }
            if let Some(s) = &g.scaling {
                v.push(("scaling", data(s)));
            }
            v
        };
        (inputs, dests.iter().map(|g| g.as_ref().map(named)).collect())
    }
}

/// The device destinations of one branch, in the reference's order.
struct Dests(Vec<(&'static str, DeviceBuffer<f32>)>);

impl Dests {
    fn new(gpu: &Gpu, case: &Case, i: usize) -> Dests {
        let b = &case.branches[i];
        let mut k = 0;
        let mut up = |t: &Tensor| {
            k += 1;
            let init = if case.accumulate { case.initial(t.elem_count(), 16 * i + k) } else { vec![f32::NAN; t.elem_count()] };
            gpu.upload(&init).unwrap()
        };
        let mut v = vec![("down weight", up(&b.down_w)), ("down bias", up(&b.down_b)), ("up weight", up(&b.up_w)), ("up bias", up(&b.up_b))];
        for (name, p) in [("LN-before", &b.ln_before), ("LN-after", &b.ln_after)] {
            if let Some((g, bt)) = p {
                v.push((name, up(g)));
                v.push((name, up(bt)));
            }
        }
        // The reference lists the gate before the scaling; upload in that order (salts match).
        if let Some((w, bt)) = &b.gate {
            v.push(("gate", up(w)));
            v.push(("gate", up(bt)));
        }
        if let Some(s) = &b.scaling {
            v.push(("scaling", up(s)));
        }
        Dests(v)
    }

    fn views(&self, b: &HostBranch, accumulate: bool) -> BranchGrads<'_> {
        // SAFETY: written only by the launcher's products and column sums, read after it returns.
        let w = |k: usize| unsafe { self.0[k].1.view().assume_writable() };
        let mut k = 4;
        let mut pair = |on: bool| {
            on.then(|| {
                k += 2;
                (w(k - 2), w(k - 1))
            })
        };
        let ln_before = pair(b.ln_before.is_some());
        let ln_after = pair(b.ln_after.is_some());
        let gate = pair(b.gate.is_some());
        let scaling = b.scaling.is_some().then(|| w(k));
        BranchGrads { down_w: w(0), down_b: w(1), up_w: w(2), up_b: w(3), ln_before, ln_after, scaling, gate, accumulate }
    }

    /// Downloaded in the reference's order (LN before, LN after, gate, scaling).
    fn download(&self, gpu: &Gpu) -> Vec<(&'static str, Vec<f32>)> {
        self.0.iter().map(|(n, b)| (*n, gpu.download(&b.view()).unwrap())).collect()
    }
}

/// What one backward wrote: dh, dr (widened to f32 when stored in bf16), and the gradients.
struct Got {
    inputs: Option<InputGrads<f32>>,
    grads: Grads,
}

/// Runs the backward with activations of `A` (f32 or bf16) and the BERT LayerNorm of the same
/// type, on `path` (the split path's recompute as `forward` says).
fn run<A: ActivationScalar + BaseScalar>(gpu: &Gpu, case: &Case, path: LocationPath, forward: SplitForward, conv: impl Fn(&[f32]) -> Vec<A>, back: impl Fn(&[A]) -> Vec<f32>, nan: A) -> Result<Got, Error> {
    let devs: Vec<DeviceBranch> = case.branches.iter().map(|b| DeviceBranch::upload(gpu, b)).collect();
    let weights: Vec<BranchWeights> = devs.iter().map(DeviceBranch::weights).collect();
    let descriptors = LocationDescriptors::new(gpu, case.hidden, case.steps, &weights)?.with_split_forward(forward);
    let (h, r, d_out) = (gpu.upload(&conv(&case.h))?, gpu.upload(&conv(&case.r))?, gpu.upload(&conv(&case.d_out))?);
    let (gamma, beta) = (gpu.upload(&conv(&case.gamma))?, gpu.upload(&conv(&case.beta))?);
    let (mut dh, mut dr) = (gpu.upload(&vec![nan; case.h.len()])?, gpu.upload(&vec![nan; case.h.len()])?);
    let dests: Vec<Option<Dests>> = (0..case.branches.len()).map(|i| case.trainable[i].then(|| Dests::new(gpu, case, i))).collect();
    {
        let mut grads: Vec<Option<BranchGrads>> = dests.iter().enumerate().map(|(i, d)| d.as_ref().map(|d| d.views(&case.branches[i], case.accumulate))).collect();
        let inputs = LocationInputs::<A, A> { h: h.view(), r: r.view(), ln_gamma: gamma.view(), ln_beta: beta.view(), ln_eps: BERT_EPS, dropout_seed: dropout_seed(&case.branches) };
        let mut outputs = LocationBackwardOutputs { input_grads: case.need_input.then(|| (dh.view_mut(), dr.view_mut())), grads: &mut grads };
        adapter_location_backward_on(gpu, &inputs, &d_out.view(), &descriptors, &mut outputs, case.shape(), path)?;
    }
    let inputs = case.need_input.then(|| (back(&gpu.download(&dh.view()).unwrap()), back(&gpu.download(&dr.view()).unwrap())));
    if !case.need_input {
        assert!(back(&gpu.download(&dh.view())?).iter().all(|v| v.is_nan()), "{}: dh written without need_input", case.label());
    }
    Ok(Got { inputs, grads: dests.iter().map(|d| d.as_ref().map(|d| d.download(gpu))).collect() })
}

fn run_f32(gpu: &Gpu, case: &Case, forward: SplitForward) -> Got {
    run::<f32>(gpu, case, LocationPath::Split, forward, |v| v.to_vec(), |v| v.to_vec(), f32::NAN).unwrap_or_else(|e| panic!("f32 {}: {e}", case.label()))
}

fn run_half<H: Io>(gpu: &Gpu, case: &Case, forward: SplitForward) -> (Got, Option<InputGrads<H>>) {
    // The raw H dh, dr too, for the rounding check.
    let raw = std::cell::RefCell::new(Vec::new());
    let got = run::<H>(
        gpu,
        case,
        LocationPath::Split,
        forward,
        to_half::<H>,
        |v| {
            raw.borrow_mut().push(v.to_vec());
            widen_from::<H>(v)
        },
        H::from_f32(f32::NAN),
    )
    .unwrap_or_else(|e| panic!("{}io {}: {e}", H::NAME, case.label()));
    let raw = raw.into_inner();
    let bits = case.need_input.then(|| (raw[0].clone(), raw[1].clone()));
    (got, bits)
}

fn assert_close(label: &str, got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "{label}: length");
    let tol = TOL * (1.0 + want.iter().fold(0f32, |m, v| m.max(v.abs())));
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(g.is_finite() && err <= tol, "{label}: [{i}] = {g}, reference {w}, |err| {err:e} > tol {tol:e}");
        worst = worst.max(err / tol);
    }
    worst
}

/// The three checks of the module docs for one case; returns (worst dh/dr error ratio to the
/// plain error, worst weight-gradient max|err|/tol).
fn check<H: Io>(gpu: &Gpu, case: &Case) -> (f64, f32) {
    let label = format!("{} {} {}", H::NAME, gpu.describe(), case.label());
    let f32_run = run_f32(gpu, case, SplitForward::Gemm);
    let (bf, bits) = run_half::<H>(gpu, case, SplitForward::Gemm);
    let (want_inputs, want_grads) = case.reference();
    let mut ratio = 0f64;
    if let (Some((dh, dr)), Some((wdh, wdr)), Some((fdh, fdr))) = (&bits, &want_inputs, &f32_run.inputs) {
        assert_rounded_f32_kernel_in::<H>(gpu, &format!("{label}: dh vs the f32 split kernel"), dh, fdh);
        assert_rounded_f32_kernel_in::<H>(gpu, &format!("{label}: dr vs the f32 split kernel"), dr, fdr);
        for (what, got, want) in [("dh", widen_from::<H>(dh), wdh), ("dr", widen_from::<H>(dr), wdr)] {
            let plain = round_all_in::<H>(want);
            let (err, plain_err) = assert_within_twice_plain_in::<H>(&format!("{label}: {what}"), &got, want, &plain);
            if plain_err > 0.0 {
                ratio = ratio.max(err / plain_err);
            }
        }
    } else {
        assert!(bits.is_none() && want_inputs.is_none() && f32_run.inputs.is_none() && bf.inputs.is_none(), "{label}: input gradients on one side only");
    }
    let mut used = 0f32;
    for (i, ((g, f), w)) in bf.grads.iter().zip(&f32_run.grads).zip(&want_grads).enumerate() {
        match (g, f, w) {
            (Some(g), Some(f), Some(w)) => {
                for (((name, gv), (_, fv)), (_, wv)) in g.iter().zip(f).zip(w) {
                    assert_same_f32(gpu, &format!("{label}: branch {i} {name} vs the f32 split kernel"), gv, fv);
                    used = used.max(assert_close(&format!("{label}: branch {i} {name}"), gv, wv));
                }
            }
            (None, None, None) => {}
            _ => panic!("{label}: branch {i} trainable on one side only"),
        }
    }
    (ratio, used)
}

fn cases<H: Half>(rng: &mut StdRng) -> Vec<Case> {
    let steps = |r: ResidualBeforeLn, before: bool, after: bool| LocationSteps { residual_before_ln: r, original_ln_before: before, original_ln_after: after };
    let (full, plain) = (BranchSpec::full, BranchSpec::plain);
    let mut v = vec![
        Case::random::<H>(rng, 2, 7, 40, true, PFEIFFER, &[plain(3, Activation::Relu)], &[true], true),
        Case::random::<H>(rng, 2, 5, 48, false, HOULSBY, &[full(1, Activation::Swish, Scale::Learned, false)], &[true], true),
        Case::random::<H>(rng, 1, 33, 384, true, PFEIFFER, &[full(48, Activation::Gelu, Scale::Channel, true), plain(70, Activation::Relu)], &[true, false], true),
        Case::random::<H>(rng, 2, 3, 42, false, steps(ResidualBeforeLn::False, true, true), &[full(5, Activation::Tanh, Scale::Channel, false), plain(64, Activation::GeluNew), full(2, Activation::Sigmoid, Scale::Fixed(2.5), true)], &[true, true, false], true),
        Case::random::<H>(rng, 2, 4, 40, true, steps(ResidualBeforeLn::PostAdd, true, true), &[full(6, Activation::Swish, Scale::Learned, true)], &[true], true),
        Case::random::<H>(rng, 2, 1, 40, false, steps(ResidualBeforeLn::True, false, false), &[full(4, Activation::Gelu, Scale::Channel, false), plain(3, Activation::Relu)], &[false, true], false),
        Case::random::<H>(rng, 2, 3, 48, true, PFEIFFER, &[full(7, Activation::Gelu, Scale::Channel, false), plain(33, Activation::Swish)], &[true, false], false)
            .with_dropout(&[Some(0.5), Some(0.1)], 17, 0x31),
        Case::random::<H>(rng, 1, 7, 42, false, HOULSBY, &[plain(5, Activation::Relu), full(9, Activation::Tanh, Scale::Learned, true)], &[true, true], true).with_dropout(&[Some(0.1), Some(0.5)], 23, 0x42),
    ];
    v[1].accumulate = true;
    v[3].accumulate = true;
    v
}

fn split_backward_matches<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xbf16_bac4);
    let (mut ratio, mut used) = ((0f64, String::new()), (0f32, String::new()));
    for case in cases::<H>(&mut rng) {
        let (r, u) = check::<H>(gpu, &case);
        if r > ratio.0 {
            ratio = (r, case.label());
        }
        if u > used.0 {
            used = (u, case.label());
        }
    }
    report_line(&format!(
        "{}io split adapter backward on {}: dh/dr error at most {:.3} x the plain {} error (bound 2) at {}; weight gradients worst max|err|/tol {:.3} at {}",
        H::NAME,
        gpu.describe(),
        ratio.0,
        H::NAME,
        ratio.1,
        used.0,
        used.1
    ));
}
test_both!(io_split_backward_follows_the_rule, split_backward_matches);

/// The backward's recompute on the tensor cores ([`SplitForward::TensorCores`]:
/// `adapter_split_bwd_pre_down_*` and `adapter_split_bwd_up_*`) where its roundings are exact: then
/// it must be the f32 recompute's backward bit for bit, which checks every index of the two
/// kernels (branch offsets under a mask of processed branches, z0's rows, up's rows, part tiles,
/// replication, bottlenecks from 2 to 130: 8, 2 and 1 k slices of the down product and a warp
/// with two W_d tiles). Exact means: z = x = h (no LayerNorm before the down product: Houlsby's pre step,
/// no adapter LN before), W_d and W_u with one power-of-two entry a row (at columns that catch a
/// transposed read) and zero biases, and ReLU, so that pre, a and up are an h element times a power
/// of two, representable in `H` and formed exactly by either path (the f32 GEMMs add zeros).
/// After up the two paths run the same kernels and products on the same values, so gates,
/// scalings, the adapter's LN after, dropout and accumulation may all be on.
///
/// The recompute's rounding where it is not exact is the forward's code (the tensor-core forward
/// test in tests/cuda_bf16_adapter.rs holds it to the rule), and tests/cuda_bf16_training.rs
/// holds whole-model gradients on this recompute to the rule. A per-location rule against the
/// reference rounded once does not hold: the recompute carries the 16-bit products' error into a
/// and up (as autocast's saved bf16 activations do), which a small location's weight gradients
/// sum with little averaging (measured 2.5-2.8x the once-rounded twin at m = 3 and 7), and a ReLU
/// whose recomputed pre crosses 0 flips a whole row of dz0 (14 % of max|dh| at H = 384).
fn tensor_core_backward_where_exact<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x7c_bac4);
    let houlsby_false = LocationSteps { residual_before_ln: ResidualBeforeLn::False, original_ln_before: false, original_ln_after: true };
    let relu = |m: usize| BranchSpec::plain(m, Activation::Relu);
    // Every option after up, without the LN before the down product.
    let after = |m: usize, scale: Scale| BranchSpec { ln_before: false, ..BranchSpec::full(m, Activation::Relu, scale, false) };
    let mut cases = vec![
        Case::random::<H>(&mut rng, 2, 7, 40, true, HOULSBY, &[relu(3)], &[true], true),
        Case::random::<H>(&mut rng, 1, 33, 48, false, houlsby_false, &[after(70, Scale::Channel), relu(130)], &[true, false], true),
        // Only branch 1 is processed (no input gradients): its a and pre are the first in the
        // workspace although it is not the first branch.
        Case::random::<H>(&mut rng, 2, 3, 42, false, HOULSBY, &[relu(5), after(64, Scale::Learned), relu(2)], &[false, true, false], false),
        Case::random::<H>(&mut rng, 2, 20, 48, true, HOULSBY, &[after(6, Scale::Fixed(0.5)), relu(33)], &[true, true], true).with_dropout(&[Some(0.5), Some(0.1)], 41, 0x53),
    ];
    cases[3].accumulate = true;
    for case in &mut cases {
        let hd = case.hidden;
        for (i, b) in case.branches.iter_mut().enumerate() {
            let m = b.spec.m;
            // Row j of W_d [m, H] takes column (5j + 3 + i) mod H, row c of W_u [H, m] column
            // (3c + 1 + i) mod m; weights ±2^k.
            let pow2 = |k: usize| if k.is_multiple_of(2) { 0.5 } else { -2.0 } * if k.is_multiple_of(3) { 2.0 } else { 1.0 };
            let mut wd = vec![0f32; m * hd];
            for j in 0..m {
                wd[j * hd + (5 * j + 3 + i) % hd] = pow2(j);
            }
            let mut wu = vec![0f32; hd * m];
            for c in 0..hd {
                wu[c * m + (3 * c + 1 + i) % m] = pow2(c + 1);
            }
            (b.down_w, b.up_w) = (tensor(wd, &[m, hd]), tensor(wu, &[hd, m]));
            (b.down_b, b.up_b) = (tensor(vec![0.0; m], &[m]), tensor(vec![0.0; hd], &[hd]));
        }
    }
    for case in &cases {
        let label = format!("{} {} {}", H::NAME, gpu.describe(), case.label());
        let before = gpu.launch_counts();
        let (tc, tc_bits) = run_half::<H>(gpu, case, SplitForward::TensorCores);
        let ran = gpu.launch_counts().since(&before);
        let before = gpu.launch_counts();
        let (gemm, gemm_bits) = run_half::<H>(gpu, case, SplitForward::Gemm);
        let gemm_ran = gpu.launch_counts().since(&before);
        // Two launches in place of the pre kernel and, per processed branch, the two forward
        // products and the activation.
        let processed = if case.need_input { case.branches.len() } else { case.trainable.iter().filter(|t| **t).count() };
        let of = |c: &bert_adapters::cuda::gpu::LaunchCounts, k: &str| c.of(&format!("adapter_split_{k}_{}io", H::NAME));
        assert_eq!([of(&ran, "bwd_pre_down"), of(&ran, "bwd_up"), of(&ran, "bwd_pre")], [1, 1, 0], "{label}: {ran:?}");
        assert_eq!([of(&gemm_ran, "bwd_pre_down"), of(&gemm_ran, "bwd_up"), of(&gemm_ran, "bwd_pre")], [0, 0, 1], "{label}: {gemm_ran:?}");
        assert_eq!(gemm_ran.gemm_calls - ran.gemm_calls, 2 * processed as u64, "{label}: forward products");
        assert_eq!(ran.of("adapter_split_act_f32"), 0, "{label}: {ran:?}");
        match (&tc_bits, &gemm_bits) {
            (Some((dh, dr)), Some((gdh, gdr))) => {
                for (what, a, b) in [("dh", dh, gdh), ("dr", dr, gdr)] {
                    assert!(a.iter().all(|v| v.to_f32().is_finite()), "{label}: {what} unwritten or non-finite");
                    let at = a.iter().zip(b.iter()).position(|(x, y)| x.to_f32().to_bits() != y.to_f32().to_bits());
                    assert!(at.is_none(), "{label}: {what}[{}] = {} on the tensor cores, {} on the GEMM path", at.unwrap_or(0), a[at.unwrap_or(0)], b[at.unwrap_or(0)]);
                }
            }
            (None, None) => assert!(tc.inputs.is_none() && gemm.inputs.is_none()),
            _ => panic!("{label}: input gradients on one path only"),
        }
        let mut moved = false;
        for (i, (t, g)) in tc.grads.iter().zip(&gemm.grads).enumerate() {
            let (Some(t), Some(g)) = (t, g) else {
                assert!(t.is_none() && g.is_none(), "{label}: branch {i} trainable on one path only");
                continue;
            };
            for ((name, tv), (_, gv)) in t.iter().zip(g) {
                assert!(tv.iter().all(|v| v.is_finite()), "{label}: branch {i} {name}: unwritten or non-finite");
                let at = tv.iter().zip(gv).position(|(x, y)| x.to_bits() != y.to_bits());
                assert!(at.is_none(), "{label}: branch {i} {name}[{}] = {} on the tensor cores, {} on the GEMM path", at.unwrap_or(0), tv[at.unwrap_or(0)], gv[at.unwrap_or(0)]);
                moved |= *name == "down weight" && tv.iter().any(|v| *v != 0.0 && v.is_finite());
            }
        }
        assert!(moved, "{label}: every down-weight gradient is zero: the case checks nothing");
    }
    report_line(&format!("{}io split adapter backward: the tensor-core recompute is the GEMM path's bit for bit where its roundings are exact ({} cases) on {}", H::NAME, cases.len(), gpu.describe()));
}
test_both!(io_tensor_core_backward_is_exact_where_its_roundings_are, tensor_core_backward_where_exact);

/// Where the forward's tensor-core kernels do not fit a block (H = 3000), the backward asked for
/// the tensor-core recompute takes the GEMM path as the forward does (the same rule), bit for bit;
/// and f32 activations, which have no tensor-core kernels, ignore the choice.
fn tensor_core_backward_falls_back<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xfa11_bac5);
    let wide = Case::random::<H>(&mut rng, 1, 2, 3000, false, PFEIFFER, &[BranchSpec::plain(16, Activation::Relu)], &[true], true);
    let small = Case::random::<H>(&mut rng, 2, 3, 48, false, HOULSBY, &[BranchSpec::plain(8, Activation::Gelu)], &[true], true);
    let tc_kernels = |c: &bert_adapters::cuda::gpu::LaunchCounts| c.kernels.keys().filter(|k| k.starts_with("adapter_split_bwd_pre_down") || k.starts_with("adapter_split_bwd_up")).count();
    let bits = |g: &Got| -> Vec<u32> { g.inputs.iter().flat_map(|(a, b)| a.iter().chain(b)).chain(g.grads.iter().flatten().flat_map(|v| v.iter().flat_map(|(_, x)| x.iter()))).map(|v| v.to_bits()).collect() };
    let label = format!("{} {} {}", H::NAME, gpu.describe(), wide.label());
    let (gemm, _) = run_half::<H>(gpu, &wide, SplitForward::Gemm);
    let before = gpu.launch_counts();
    let (asked, _) = run_half::<H>(gpu, &wide, SplitForward::TensorCores);
    let ran = gpu.launch_counts().since(&before);
    assert_eq!((tc_kernels(&ran), ran.of(&format!("adapter_split_bwd_pre_{}io", H::NAME))), (0, 1), "{label}: {ran:?}");
    assert!(bits(&gemm).iter().all(|b| f32::from_bits(*b).is_finite()), "{label}: a non-finite gradient");
    assert_eq!(bits(&asked), bits(&gemm), "{label}");
    let gemm = run_f32(gpu, &small, SplitForward::Gemm);
    let before = gpu.launch_counts();
    let asked = run_f32(gpu, &small, SplitForward::TensorCores);
    assert_eq!(tc_kernels(&gpu.launch_counts().since(&before)), 0, "f32 {}", small.label());
    assert_eq!(bits(&asked), bits(&gemm), "f32 {}", small.label());
}
test_both!(tensor_core_backward_falls_back_with_the_forward, tensor_core_backward_falls_back);

#[test]
fn the_cases_cover_what_the_docs_claim() {
    let cs = cases::<bf16>(&mut StdRng::seed_from_u64(0xbf16_bac4));
    let hs: std::collections::BTreeSet<usize> = cs.iter().map(|c| c.hidden).collect();
    assert!(hs.iter().any(|h| h % 32 != 0) && hs.contains(&384));
    let ms: Vec<usize> = cs.iter().flat_map(|c| c.branches.iter().map(|b| b.spec.m)).collect();
    assert!(ms.contains(&1) && ms.iter().any(|&m| m > 64));
    assert!(cs.iter().any(|c| c.replicate) && cs.iter().any(|c| !c.replicate));
    assert!(cs.iter().any(|c| c.branches.len() == 3) && cs.iter().any(|c| c.seq_len == 1));
    assert!(cs.iter().any(|c| !c.need_input) && cs.iter().any(|c| c.accumulate) && cs.iter().any(|c| c.trainable.iter().any(|t| !t)));
    let ps: Vec<f32> = cs.iter().flat_map(|c| c.branches.iter().filter_map(|b| b.dropout.as_ref().map(|d| d.p))).collect();
    assert!(ps.contains(&0.1) && ps.contains(&0.5));
    assert!(cs.iter().any(|c| c.branches.iter().any(|b| b.spec.gate)));
}

/// bf16 activations: the fused backward refuses them (Unsupported, before anything is written),
/// and the split backward refuses bf16 activations with an f32 LayerNorm and f32 ones with a bf16
/// LayerNorm (no kernel), as the forward does.
fn half_refusals<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(3);
    let case = Case::random::<H>(&mut rng, 1, 2, 16, true, PFEIFFER, &[BranchSpec::plain(2, Activation::Relu)], &[true], true);
    let dev = DeviceBranch::upload(gpu, &case.branches[0]);
    let desc = LocationDescriptors::new(gpu, 16, PFEIFFER, &[dev.weights()]).unwrap();
    let (h, d_out) = (gpu.upload(&to_half::<H>(&case.h)).unwrap(), gpu.upload(&to_half::<H>(&case.d_out)).unwrap());
    let (hf, d_outf) = (gpu.upload(&case.h).unwrap(), gpu.upload(&case.d_out).unwrap());
    let (g16, g32) = (gpu.upload(&to_half::<H>(&case.gamma)).unwrap(), gpu.upload(&case.gamma).unwrap());
    let mut dh = gpu.upload(&[H::from_f32(f32::NAN); 32]).unwrap();
    let mut dr = gpu.upload(&[H::from_f32(f32::NAN); 32]).unwrap();
    let mut dhf = gpu.upload(&[f32::NAN; 32]).unwrap();
    let mut drf = gpu.upload(&[f32::NAN; 32]).unwrap();
    let unsupported = |e: Error, want: &str| assert!(matches!(&e, Error::Unsupported(m) if m.contains(want)), "{e}");
    {
        let inputs = LocationInputs::<H, H> { h: h.view(), r: h.view(), ln_gamma: g16.view(), ln_beta: g16.view(), ln_eps: BERT_EPS, dropout_seed: None };
        let mut grads = vec![None];
        let mut outputs = LocationBackwardOutputs { input_grads: Some((dh.view_mut(), dr.view_mut())), grads: &mut grads };
        let mut ws = LocationBackwardWorkspace::new(gpu, 1024).unwrap();
        unsupported(adapter_location_backward(gpu, &inputs, &d_out.view(), &desc, &mut outputs, &mut ws, case.shape()).unwrap_err(), "the fused backward takes f32 activations");
        unsupported(adapter_location_backward_on(gpu, &inputs, &d_out.view(), &desc, &mut outputs, case.shape(), LocationPath::Fused).unwrap_err(), "split path");
        let inputs = LocationInputs::<f32, H> { h: h.view(), r: h.view(), ln_gamma: g32.view(), ln_beta: g32.view(), ln_eps: BERT_EPS, dropout_seed: None };
        unsupported(adapter_location_backward_split(gpu, &inputs, &d_out.view(), &desc, &mut outputs, case.shape()).unwrap_err(), "no backward kernel");
    }
    {
        let inputs = LocationInputs::<H, f32> { h: hf.view(), r: hf.view(), ln_gamma: g16.view(), ln_beta: g16.view(), ln_eps: BERT_EPS, dropout_seed: None };
        let mut grads = vec![None];
        let mut outputs = LocationBackwardOutputs { input_grads: Some((dhf.view_mut(), drf.view_mut())), grads: &mut grads };
        unsupported(adapter_location_backward_split(gpu, &inputs, &d_outf.view(), &desc, &mut outputs, case.shape()).unwrap_err(), "no backward kernel");
    }
    assert!(widen_from::<H>(&gpu.download(&dh.view()).unwrap()).iter().all(|v| v.is_nan()), "a refused launch wrote dh");
    assert!(gpu.download(&dhf.view()).unwrap().iter().all(|v| v.is_nan()), "a refused launch wrote dh");
}
test_both!(half_backward_refusals, half_refusals);

/// Through `Backend` (what `CudaBackend::with_activations` runs): `adapter_location` and
/// `adapter_location_backward_into` on `H` h, r, d_out and an `H` BERT LayerNorm, on both paths,
/// give the f32 ops' results on the widened operands rounded once to `H` (out, dh, dr: bit for bit
/// on the executor, one ulp on a GPU; the fused backward widens, so it is that exactly) and the
/// same f32 weight gradients; out, dh and dr come back in `H`. The dispatch is what this checks:
/// the kernels' numerics are the launcher tests' above and in cuda_bf16_adapter.rs.
fn backend_dispatches_half_locations<H: Io>(gpu: &Gpu) {
    use bert_adapters::backend::{AdapterLocation, LayerNormParams};
    use bert_adapters::cuda::backend::CudaBackend;
    use bert_adapters::DType;
    let mut rng = StdRng::seed_from_u64(0x0be1_6ada);
    let specs = [BranchSpec::full(4, Activation::Gelu, Scale::Channel, false), BranchSpec::plain(3, Activation::Relu)];
    let case = Case::random::<H>(&mut rng, 2, 3, 40, false, PFEIFFER, &specs, &[true, true], true).with_dropout(&[Some(0.5), None], 29, 0x17);
    let dtype = <H as ActivationScalar>::DTYPE;
    for path in [LocationPath::Fused, LocationPath::Split] {
        let be = CudaBackend::on(gpu.reopen().unwrap()).with_location_path(path);
        let branches: Vec<HostBranch> = case.branches.iter().map(|b| b.on(&be)).collect();
        let params: Vec<BottleneckParams> = branches.iter().map(HostBranch::params).collect();
        let in_type = |v: &[f32], shape: &[usize], d: DType| be.cast(&be.upload(v.to_vec(), shape).unwrap(), d).unwrap();
        // (out, dh, dr, weight gradients) with every activation and the LayerNorm in `d`.
        let run = |d: DType| {
            let (t, hd) = (case.seq_len, case.hidden);
            let (h, r, d_out) = (in_type(&case.h, &[case.h.len() / (t * hd), t, hd], d), in_type(&case.r, &[case.r.len() / (t * hd), t, hd], d), in_type(&case.d_out, &[case.d_out.len() / (t * hd), t, hd], d));
            let (gamma, beta) = (in_type(&case.gamma, &[hd], d), in_type(&case.beta, &[hd], d));
            let loc = AdapterLocation { h: &h, r: &r, layer_norm: LayerNormParams { gamma: &gamma, beta: &beta, eps: BERT_EPS }, steps: case.steps, branches: &params, replicate: case.replicate, seq_len: t };
            let out = be.adapter_location(&loc).unwrap();
            let zeros = |x: &Tensor| be.zeros(x.shape(), DType::F32).unwrap();
            let pair = |p: &Option<(Tensor, Tensor)>| p.as_ref().map(|(a, b)| (zeros(a), zeros(b)));
            let grads: Vec<Option<GradsOut<BottleneckGrads>>> = branches
                .iter()
                .map(|b| {
                    let grads = BottleneckGrads { down_w: zeros(&b.down_w), down_b: zeros(&b.down_b), up_w: zeros(&b.up_w), up_b: zeros(&b.up_b), ln_before: pair(&b.ln_before), ln_after: pair(&b.ln_after), scaling: b.scaling.as_ref().map(zeros), gate: pair(&b.gate) };
                    Some(GradsOut { grads, accumulate: false })
                })
                .collect();
            let (dh, dr) = be.adapter_location_backward_into(&loc, &d_out, &grads, true).unwrap();
            let (dh, dr) = (dh.unwrap(), dr.unwrap());
            for (name, t) in [("out", &out), ("dh", &dh), ("dr", &dr)] {
                assert_eq!(t.dtype(), d, "{path:?} {name}");
            }
            let host = |t: &Tensor| be.to_host(t).unwrap();
            let weight_grads: Vec<Vec<f32>> = grads.iter().flatten().flat_map(|g| {
                let b = &g.grads;
                let mut v = vec![host(&b.down_w), host(&b.down_b), host(&b.up_w), host(&b.up_b)];
                for (x, y) in [&b.ln_before, &b.ln_after, &b.gate].into_iter().flatten() {
                    v.extend([host(x), host(y)]);
                }
                v.extend(b.scaling.iter().map(host));
                v
            }).collect();
            (host(&out), host(&dh), host(&dr), weight_grads)
        };
        let (got, want) = (run(dtype), run(DType::F32));
        let label = format!("{} {} backend {path:?}", H::NAME, gpu.describe());
        for (name, g, w) in [("out", &got.0, &want.0), ("dh", &got.1, &want.1), ("dr", &got.2, &want.2)] {
            let g: Vec<H> = g.iter().map(|&x| H::from_f32(x)).collect();
            assert_rounded_f32_kernel_in::<H>(gpu, &format!("{label}: {name} vs the f32 op rounded"), &g, w);
        }
        assert_eq!(got.3.len(), want.3.len());
        for (i, (g, w)) in got.3.iter().zip(&want.3).enumerate() {
            assert_same_f32(gpu, &format!("{label}: weight gradient {i}"), g, w);
        }
    }
}
test_both!(backend_dispatches_half_locations, backend_dispatches_half_locations);
