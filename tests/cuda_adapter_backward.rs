//! The CUDA adapter-location backward (kernels/adapter.cu `adapter_location_backward_f32` through
//! `cuda::adapter::adapter_location_backward`) against the CPU reference backend's
//! `adapter_location_backward_into`, the specification.
//!
//! One body per test, run by `test_device!` on every device: `*::cuda_sim` on the CPU executor
//! (feature `cuda-sim`) in the forward, reverse and random schedules; `*::cuda` on a GPU, which
//! prints `SKIPPED: ...` without one and fails under `REQUIRE_GPU=1`.
//!
//! Tolerance: per gradient tensor, max|got - ref| <= 1e-4 · (1 + max|ref|). The adapter weights
//! are blown up (pre-activations and the adapter's output several times larger than h + r), so a
//! wrong term moves a gradient by O(1). Every output starts as NaN (dh, dr, the destinations
//! that are overwritten, the workspace), so an element the launch never writes fails;
//! destinations that accumulate start with random values, on both sides.

use bert_adapters::backend::{BottleneckGrads, BottleneckParams, GradsOut, LocationSteps};
use bert_adapters::config::ResidualBeforeLn;
use bert_adapters::cuda::adapter::{
    adapter_location_backward, adapter_location_backward_split, adapter_location_backward_split_with_plan, adapter_location_backward_with_plan,
    backward_plan_auto, backward_workspace_len, split_backward_plan_auto, BranchGrads, BranchWeights, LocationBackwardOutputs, LocationBackwardWorkspace,
    LocationDescriptors, LocationInputs, LocationPlan, LocationShape, RowStaging, MAX_BACKWARD_BRANCHES,
};
use bert_adapters::cuda::gpu::{DeviceBuffer, Gpu};
use bert_adapters::cuda::probe::report_line;
use bert_adapters::{test_device, Activation, Backend, CpuBackend, Error, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

const TOL: f32 = 1e-4;

// ---- cases ---------------------------------------------------------------------------------------

#[path = "support/adapter_location.rs"]
#[allow(dead_code)] // each test file uses part of the shared cases
mod cases;
use cases::*;

/// A branch's gradients, named and flattened in one order, on the host.
type NamedGrads = Vec<(&'static str, Vec<f32>)>;
/// Per branch: its gradients, None when frozen.
type BranchesGrads = Vec<Option<NamedGrads>>;
/// `(dh, dr)` on the host.
type InputGrads = (Vec<f32>, Vec<f32>);

/// Destinations shaped like `b`'s parameters, filled with `fill(len)`.
fn host_grads(b: &HostBranch, mut fill: impl FnMut(usize) -> Vec<f32>) -> BottleneckGrads {
    let mut like = |t: &Tensor| tensor(fill(t.elem_count()), t.shape());
    let mut pair = |p: &Option<(Tensor, Tensor)>| p.as_ref().map(|(a, c)| (like(a), like(c)));
    let ln_before = pair(&b.ln_before);
    let ln_after = pair(&b.ln_after);
    let gate = pair(&b.gate);
    let mut like = |t: &Tensor| tensor(fill(t.elem_count()), t.shape());
    BottleneckGrads {
        down_w: like(&b.down_w),
        down_b: like(&b.down_b),
        up_w: like(&b.up_w),
        up_b: like(&b.up_b),
        ln_before,
        ln_after,
        scaling: b.scaling.as_ref().map(&mut like),
        gate,
    }
}

fn named(g: &BottleneckGrads) -> NamedGrads {
    let mut v = vec![("down weight", data(&g.down_w)), ("down bias", data(&g.down_b)), ("up weight", data(&g.up_w)), ("up bias", data(&g.up_b))];
    if let Some((a, b)) = &g.ln_before {
        v.extend([("LN-before gamma", data(a)), ("LN-before beta", data(b))]);
    }
    if let Some((a, b)) = &g.ln_after {
        v.extend([("LN-after gamma", data(a)), ("LN-after beta", data(b))]);
    }
    if let Some(s) = &g.scaling {
        v.push(("scaling", data(s)));
    }
    if let Some((a, b)) = &g.gate {
        v.extend([("gate weight", data(a)), ("gate bias", data(b))]);
    }
    v
}

/// One backward: inputs, BERT LayerNorm, steps, branches, which of them train, how.
#[derive(Clone)]
struct Case {
    batch: usize,
    seq_len: usize,
    hidden: usize,
    replicate: bool,
    steps: LocationSteps,
    h: Tensor,
    r: Tensor,
    d_out: Tensor,
    gamma: Tensor,
    beta: Tensor,
    branches: Vec<HostBranch>,
    trainable: Vec<bool>,
    accumulate: bool,
    need_input: bool,
    /// Branch i names branch `shared[i]`'s destinations (the same adapter twice), accumulating.
    shared: Vec<usize>,
}

impl Case {
    #[allow(clippy::too_many_arguments)]
    fn random(rng: &mut StdRng, batch: usize, seq_len: usize, hidden: usize, replicate: bool, steps: LocationSteps, specs: &[BranchSpec]) -> Case {
        let n = specs.len();
        let rows = if replicate { batch } else { batch * n };
        let count = rows * seq_len * hidden;
        Case {
            batch,
            seq_len,
            hidden,
            replicate,
            steps,
            h: tensor(uniform(rng, count, -2.0, 2.0), &[rows, seq_len, hidden]),
            r: tensor(uniform(rng, count, -2.0, 2.0), &[rows, seq_len, hidden]),
            d_out: tensor(uniform(rng, n * batch * seq_len * hidden, -1.0, 1.0), &[n * batch, seq_len, hidden]),
            gamma: tensor(uniform(rng, hidden, 0.5, 1.5), &[hidden]),
            beta: tensor(uniform(rng, hidden, -0.5, 0.5), &[hidden]),
            branches: specs.iter().map(|s| HostBranch::random_scaled(rng, hidden, *s, 3.0)).collect(),
            trainable: vec![true; n],
            accumulate: false,
            need_input: true,
            shared: (0..n).collect(),
        }
    }

    fn with(mut self, trainable: &[bool], accumulate: bool, need_input: bool) -> Case {
        self.trainable = trainable.to_vec();
        self.accumulate = accumulate;
        self.need_input = need_input;
        self
    }

    fn shape(&self) -> LocationShape {
        LocationShape { batch: self.batch, seq_len: self.seq_len, hidden: self.hidden, branches: self.branches.len(), replicate: self.replicate }
    }

    fn label(&self) -> String {
        let specs: Vec<String> = self
            .branches
            .iter()
            .zip(&self.trainable)
            .map(|(b, t)| format!("{}{}", b.spec.label(), if *t { "" } else { " FROZEN" }))
            .collect();
        location_label(self.shape(), &format!(" accumulate={} need_input={}", self.accumulate, self.need_input), self.steps, &specs)
    }

    /// The initial contents of branch i's destinations when accumulating (a fixed function of i,
    /// so host and device start alike).
    fn initial(&self, i: usize) -> impl FnMut(usize) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(0x1a17 + i as u64);
        move |n| uniform(&mut rng, n, -1.0, 1.0)
    }

    /// The CPU reference: `(dh, dr)` when asked for, and per trainable branch its gradients
    /// (after every branch ran, so shared destinations hold the sum).
    fn reference(&self) -> (Option<InputGrads>, BranchesGrads) {
        let params: Vec<BottleneckParams> = self.branches.iter().map(HostBranch::params).collect();
        let loc = host_location(&self.h, &self.r, &self.gamma, &self.beta, self.steps, &params, self.shape());
        let mut dests: Vec<Option<BottleneckGrads>> = Vec::new();
        for (i, b) in self.branches.iter().enumerate() {
            let g = if !self.trainable[i] {
                None
            } else if self.shared[i] != i {
                dests[self.shared[i]].clone()
            } else if self.accumulate {
                Some(host_grads(b, self.initial(i)))
            } else {
                Some(host_grads(b, |n| vec![0.0; n]))
            };
            dests.push(g);
        }
        let grads: Vec<Option<GradsOut<BottleneckGrads>>> =
            dests.iter().enumerate().map(|(i, g)| g.clone().map(|grads| GradsOut { grads, accumulate: self.accumulate || self.shared[i] != i })).collect();
        let (dh, dr) = CpuBackend::reference()
            .adapter_location_backward_into(&loc, &self.d_out, &grads, self.need_input)
            .unwrap_or_else(|e| panic!("{}: CPU reference: {e}", self.label()));
        let inputs = match (dh, dr) {
            (Some(dh), Some(dr)) => Some((data(&dh), data(&dr))),
            _ => None,
        };
        (inputs, dests.iter().map(|g| g.as_ref().map(named)).collect())
    }
}

/// What the device wrote.
struct Got {
    inputs: Option<InputGrads>,
    grads: BranchesGrads,
}

/// Device destinations of one trainable branch.
struct DeviceGrads {
    down_w: DeviceBuffer<f32>,
    down_b: DeviceBuffer<f32>,
    up_w: DeviceBuffer<f32>,
    up_b: DeviceBuffer<f32>,
    ln_before: Option<(DeviceBuffer<f32>, DeviceBuffer<f32>)>,
    ln_after: Option<(DeviceBuffer<f32>, DeviceBuffer<f32>)>,
    scaling: Option<DeviceBuffer<f32>>,
    gate: Option<(DeviceBuffer<f32>, DeviceBuffer<f32>)>,
}

impl DeviceGrads {
    fn new(gpu: &Gpu, host: &BottleneckGrads) -> Self {
        let up = |t: &Tensor| gpu.upload(&data(t)).unwrap();
        let pair = |p: &Option<(Tensor, Tensor)>| p.as_ref().map(|(a, b)| (up(a), up(b)));
        DeviceGrads {
            down_w: up(&host.down_w),
            down_b: up(&host.down_b),
            up_w: up(&host.up_w),
            up_b: up(&host.up_b),
            ln_before: pair(&host.ln_before),
            ln_after: pair(&host.ln_after),
            scaling: host.scaling.as_ref().map(up),
            gate: pair(&host.gate),
        }
    }

    /// Views of the destinations. `&self`: two branches may name the same buffers.
    fn views(&self, accumulate: bool) -> BranchGrads<'_> {
        // SAFETY: the launcher writes the destinations only in its GEMMs, one at a time, and the
        // test reads them only after it returns.
        fn w(b: &DeviceBuffer<f32>) -> bert_adapters::cuda::gpu::DeviceViewMut<'_, f32> {
            unsafe { b.view().assume_writable() }
        }
        type Pair = Option<(DeviceBuffer<f32>, DeviceBuffer<f32>)>;
        fn pair(p: &Pair) -> Option<(bert_adapters::cuda::gpu::DeviceViewMut<'_, f32>, bert_adapters::cuda::gpu::DeviceViewMut<'_, f32>)> {
            p.as_ref().map(|(a, b)| (w(a), w(b)))
        }
        BranchGrads {
            down_w: w(&self.down_w),
            down_b: w(&self.down_b),
            up_w: w(&self.up_w),
            up_b: w(&self.up_b),
            ln_before: pair(&self.ln_before),
            ln_after: pair(&self.ln_after),
            scaling: self.scaling.as_ref().map(w),
            gate: pair(&self.gate),
            accumulate,
        }
    }

    fn download(&self, gpu: &Gpu) -> NamedGrads {
        let d = |b: &DeviceBuffer<f32>| gpu.download(&b.view()).unwrap();
        let mut v = vec![("down weight", d(&self.down_w)), ("down bias", d(&self.down_b)), ("up weight", d(&self.up_w)), ("up bias", d(&self.up_b))];
        if let Some((a, b)) = &self.ln_before {
            v.extend([("LN-before gamma", d(a)), ("LN-before beta", d(b))]);
        }
        if let Some((a, b)) = &self.ln_after {
            v.extend([("LN-after gamma", d(a)), ("LN-after beta", d(b))]);
        }
        if let Some(s) = &self.scaling {
            v.push(("scaling", d(s)));
        }
        if let Some((a, b)) = &self.gate {
            v.extend([("gate weight", d(a)), ("gate bias", d(b))]);
        }
        v
    }
}

/// A way through the backward: the fused kernel, or the split path (row kernels and GEMMs) with
/// its row staging forced on or off.
#[derive(Clone, Copy, Debug)]
enum Route {
    Fused,
    Split(RowStaging),
}

/// Every route: the fused kernel and the split path with and without row staging (the fallback
/// when a device's shared memory cannot hold the staged rows).
const PATHS: [Route; 3] = [Route::Fused, Route::Split(RowStaging::On), Route::Split(RowStaging::Off)];

/// Uploads `case`, runs the launcher on each path (auto plan when `plan` is None) with
/// NaN-poisoned outputs and workspace, and downloads what each wrote (in [`PATHS`] order).
fn run(gpu: &Gpu, case: &Case, plan: Option<LocationPlan>) -> Result<Vec<Got>, Error> {
    let branches: Vec<DeviceBranch> = case.branches.iter().map(|b| DeviceBranch::upload(gpu, b)).collect();
    let weights: Vec<BranchWeights> = branches.iter().map(DeviceBranch::weights).collect();
    let descriptors = LocationDescriptors::new(gpu, case.hidden, case.steps, &weights)?;
    PATHS.iter().map(|&path| run_with(gpu, case, &descriptors, plan, path)).collect()
}

fn run_with(gpu: &Gpu, case: &Case, descriptors: &LocationDescriptors, plan: Option<LocationPlan>, path: Route) -> Result<Got, Error> {
    let (h, r, d_out) = (gpu.upload(&data(&case.h))?, gpu.upload(&data(&case.r))?, gpu.upload(&data(&case.d_out))?);
    let (gamma, beta) = (gpu.upload(&data(&case.gamma))?, gpu.upload(&data(&case.beta))?);
    let shape = case.shape();
    let n_in = case.h.elem_count();
    let (mut dh, mut dr) = (gpu.upload(&vec![f32::NAN; n_in])?, gpu.upload(&vec![f32::NAN; n_in])?);
    let dests: Vec<Option<DeviceGrads>> = case
        .branches
        .iter()
        .enumerate()
        .map(|(i, b)| {
            (case.trainable[i] && case.shared[i] == i).then(|| {
                let host = if case.accumulate { host_grads(b, case.initial(i)) } else { host_grads(b, |n| vec![f32::NAN; n]) };
                DeviceGrads::new(gpu, &host)
            })
        })
        .collect();
    let len = backward_workspace_len(descriptors, shape, &case.trainable)?;
    // Fresh memory: NaN-poisoned on cuda-sim, uninitialised on a GPU.
    let mut workspace = LocationBackwardWorkspace::new(gpu, len)?;
    {
        let mut grads: Vec<Option<BranchGrads>> = (0..case.branches.len())
            .map(|i| case.trainable[i].then(|| dests[case.shared[i]].as_ref().expect("a shared destination is trainable").views(case.accumulate || case.shared[i] != i)))
            .collect();
        let inputs = LocationInputs { h: h.view(), r: r.view(), ln_gamma: gamma.view(), ln_beta: beta.view(), ln_eps: BERT_EPS, dropout_seed: dropout_seed(&case.branches) };
        let mut outputs = LocationBackwardOutputs { input_grads: case.need_input.then(|| (dh.view_mut(), dr.view_mut())), grads: &mut grads };
        match (path, plan) {
            (Route::Fused, None) => adapter_location_backward(gpu, &inputs, &d_out.view(), descriptors, &mut outputs, &mut workspace, shape)?,
            (Route::Fused, Some(p)) => adapter_location_backward_with_plan(gpu, &inputs, &d_out.view(), descriptors, &mut outputs, &mut workspace, shape, p)?,
            (Route::Split(staging), p) => {
                let p = p.unwrap_or_else(|| split_backward_plan_auto(case.hidden));
                adapter_location_backward_split_with_plan(gpu, &inputs, &d_out.view(), descriptors, &mut outputs, shape, p, staging)?
            }
        }
    }
    let inputs = if case.need_input { Some((gpu.download(&dh.view())?, gpu.download(&dr.view())?)) } else { None };
    if !case.need_input {
        assert!(gpu.download(&dh.view())?.iter().all(|v| v.is_nan()), "{}: dh written without need_input", case.label());
    }
    let grads = (0..case.branches.len()).map(|i| case.trainable[i].then(|| dests[case.shared[i]].as_ref().unwrap().download(gpu))).collect();
    Ok(Got { inputs, grads })
}

/// Asserts every element finite and within tolerance; returns max|err| / tol.
fn assert_close(what: &str, label: &str, got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "{label}: {what} length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let tol = TOL * (1.0 + scale);
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        if !g.is_finite() || err.is_nan() || err > tol {
            panic!("{label}: {what}[{i}] = {g}, reference {w}, |err| {err:e} > tol {tol:e} (max|ref| {scale})");
        }
        worst = worst.max(err / tol);
    }
    worst
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The bits of every path's outputs, concatenated.
fn got_bits(gots: &[Got]) -> Vec<u32> {
    let mut out = Vec::new();
    for g in gots {
        if let Some((dh, dr)) = &g.inputs {
            out.extend(bits(dh));
            out.extend(bits(dr));
        }
        for (_, v) in g.grads.iter().flatten().flatten() {
            out.extend(bits(v));
        }
    }
    out
}

/// Runs `case` on every route and checks each against the CPU; returns what the device wrote (per
/// route) and the worst max|err|/tol. Row staging changes where the split kernels read their rows
/// from, not their arithmetic: the staged and unstaged outputs must match bit for bit.
fn check(gpu: &Gpu, case: &Case, plan: Option<LocationPlan>) -> (Vec<Got>, f32) {
    let gots = run(gpu, case, plan).unwrap_or_else(|e| panic!("{} {}: {e}", gpu.describe(), case.label()));
    let (want_inputs, want_grads) = case.reference();
    let mut used = 0f32;
    for (path, got) in PATHS.iter().zip(&gots) {
        let label = format!("{} {path:?} {}{}", gpu.describe(), case.label(), plan.map(|p| format!(" {p:?}")).unwrap_or_default());
        used = used.max(check_one(&label, got, &want_inputs, &want_grads));
    }
    assert!(got_bits(&gots[1..2]) == got_bits(&gots[2..3]), "{} {}: the staged and unstaged split paths differ", gpu.describe(), case.label());
    (gots, used)
}

/// One path's outputs against the CPU reference; returns the worst max|err|/tol.
fn check_one(label: &str, got: &Got, want_inputs: &Option<InputGrads>, want_grads: &BranchesGrads) -> f32 {
    let mut used = 0f32;
    match (&got.inputs, want_inputs) {
        (Some((dh, dr)), Some((wdh, wdr))) => {
            used = used.max(assert_close("dh", label, dh, wdh));
            used = used.max(assert_close("dr", label, dr, wdr));
        }
        (None, None) => {}
        _ => panic!("{label}: input gradients given on one side only"),
    }
    for (i, (g, w)) in got.grads.iter().zip(want_grads).enumerate() {
        match (g, w) {
            (Some(g), Some(w)) => {
                assert_eq!(g.len(), w.len(), "{label}: branch {i} gradient count");
                for ((name, gv), (_, wv)) in g.iter().zip(w) {
                    used = used.max(assert_close(&format!("branch {i} {name}"), label, gv, wv));
                }
            }
            (None, None) => {}
            _ => panic!("{label}: branch {i} trainable on one side only"),
        }
    }
    used
}

// ---- the sweep ---------------------------------------------------------------------------------------

const ACTS: [Activation; 6] = [Activation::Relu, Activation::Gelu, Activation::GeluNew, Activation::Swish, Activation::Tanh, Activation::Sigmoid];

/// H x bottleneck in a Latin square with T and N (every H meets every bottleneck, T and N once);
/// replicate alternates; every activation and scaling kind appears; N >= 2 mixes configs; branches
/// are frozen in a rotating pattern; accumulate alternates; some cases need no input gradient.
fn sweep_cases(rng: &mut StdRng) -> Vec<Case> {
    let (hs, ms, ts, ns) = ([40, 48, 384], [1, 3, 48], [1, 7, 33], [1, 2, 3]);
    let mut cases = Vec::new();
    let mut k = 0;
    for (a, &h) in hs.iter().enumerate() {
        for (b, &m) in ms.iter().enumerate() {
            let (t, n) = (ts[(a + b) % 3], ns[(2 * a + b) % 3]);
            let scales = [Scale::Fixed(2.5), Scale::Learned, Scale::Channel];
            let specs: Vec<BranchSpec> = (0..n)
                .map(|j| {
                    k += 1;
                    let act = ACTS[k % ACTS.len()];
                    let mj = if j == 0 { m } else { [5, 33, 2][(k + j) % 3] };
                    match (k + j) % 3 {
                        0 => BranchSpec::plain(mj, act),
                        1 => BranchSpec { scale: scales[k % 3], ln_after: true, ..BranchSpec::plain(mj, act) },
                        _ => BranchSpec::full(mj, act, scales[k % 3], k % 2 == 0),
                    }
                })
                .collect();
            let steps = if (a + b / 2) % 2 == 0 { PFEIFFER } else { HOULSBY };
            let c = cases.len();
            // Freeze one branch in three (never all: some case must train when no input
            // gradient is needed).
            let trainable: Vec<bool> = (0..n).map(|j| n == 1 || (c + j) % 3 != 2).collect();
            let case = Case::random(rng, 2, t, h, (a + b) % 2 == 0, steps, &specs).with(&trainable, c % 2 == 1, c % 4 != 3);
            cases.push(case);
        }
    }
    cases
}

fn sweep_matches_cpu(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xbac4_7a2d);
    let mut worst = (0f32, String::new());
    let cases = sweep_cases(&mut rng);
    for case in &cases {
        let (_, used) = check(gpu, case, None);
        if used > worst.0 {
            worst = (used, case.label());
        }
    }
    report_line(&format!("adapter location backward sweep on {}: {} cases pass; worst max|err|/tol = {:.3} at {}", gpu.describe(), cases.len(), worst.0, worst.1));
}
test_device!(sweep_matches_cpu_reference, sweep_matches_cpu);

#[test]
fn the_sweep_covers_what_it_claims() {
    let cases = sweep_cases(&mut StdRng::seed_from_u64(0xbac4_7a2d));
    let mut pairs = std::collections::BTreeSet::new();
    let (mut acts, mut scales) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
    let (mut frozen, mut acc, mut no_input, mut reps, mut gated) = (0, 0, 0, [0, 0], 0);
    for c in &cases {
        pairs.insert((c.hidden, c.branches[0].spec.m));
        reps[c.replicate as usize] += 1;
        frozen += c.trainable.iter().any(|t| !t) as usize;
        acc += c.accumulate as usize;
        no_input += !c.need_input as usize;
        gated += c.branches.iter().any(|b| b.spec.gate) as usize;
        for b in &c.branches {
            acts.insert(format!("{:?}", b.spec.act));
            scales.insert(format!("{:?}", b.spec.scale).chars().take(4).collect::<String>());
        }
        assert!(c.need_input || c.trainable.iter().any(|&t| t), "{}: nothing to compute", c.label());
    }
    assert_eq!(pairs.len(), 9);
    assert_eq!((acts.len(), scales.len()), (6, 3), "{acts:?} {scales:?}");
    assert!(frozen >= 2 && acc >= 3 && no_input >= 2 && reps[0] >= 3 && reps[1] >= 3 && gated >= 3, "{frozen} {acc} {no_input} {reps:?} {gated}");
    assert!(cases.iter().all(|c| c.batch * c.seq_len * c.branches.len() <= 200));
}

/// Every kind of location (spec §4's closed forms), a gated mixed Parallel and the same adapter
/// in two branches (shared destinations, the later branch accumulating): H = 48, T = 7,
/// replicated and not. The same launch twice gives the same bits.
fn location_kinds_match_cpu(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x0b0c_41d5);
    let steps = |r: ResidualBeforeLn, before: bool, after: bool| LocationSteps { residual_before_ln: r, original_ln_before: before, original_ln_after: after };
    let full = |m, act, scale, first| BranchSpec::full(m, act, scale, first);
    let kinds: Vec<(&str, LocationSteps, Vec<BranchSpec>)> = vec![
        ("pfeiffer", PFEIFFER, vec![BranchSpec::plain(3, Activation::Relu)]),
        ("houlsby", HOULSBY, vec![BranchSpec::plain(3, Activation::Swish)]),
        ("residual_before_ln False", steps(ResidualBeforeLn::False, true, true), vec![full(4, Activation::Gelu, Scale::Channel, false)]),
        ("residual_before_ln False, no LN first", steps(ResidualBeforeLn::False, false, true), vec![full(4, Activation::Tanh, Scale::Learned, true)]),
        ("post_add", steps(ResidualBeforeLn::PostAdd, true, true), vec![full(6, Activation::Swish, Scale::Fixed(0.5), true)]),
        ("original_ln_after False", steps(ResidualBeforeLn::True, false, false), vec![BranchSpec::plain(48, Activation::Relu)]),
        ("gate without LN before", HOULSBY, vec![BranchSpec { gate: true, scale: Scale::Learned, ..BranchSpec::plain(7, Activation::GeluNew) }]),
        (
            "Parallel(pfeiffer, houlsby, full)",
            PFEIFFER,
            vec![BranchSpec::plain(3, Activation::Relu), BranchSpec::plain(48, Activation::Swish), full(7, Activation::Gelu, Scale::Channel, true)],
        ),
        (
            "Parallel(houlsby, gated, pfeiffer), last child without original_ln_after",
            steps(ResidualBeforeLn::True, false, false),
            vec![BranchSpec::plain(8, Activation::Swish), full(40, Activation::Sigmoid, Scale::Learned, false), BranchSpec::plain(1, Activation::Relu)],
        ),
    ];
    for (name, steps, specs) in kinds {
        for replicate in [true, false] {
            let case = Case::random(&mut rng, 2, 7, 48, replicate, steps, &specs);
            let (a, _) = check(gpu, &case, None);
            let b = run(gpu, &case, None).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got_bits(&a), got_bits(&b), "{name}: not deterministic");
        }
    }
    // The same adapter as both branches of a Parallel: branch 1 accumulates into branch 0's
    // destinations, replicated and not, with and without the input gradients.
    for (replicate, need_input) in [(true, true), (false, false)] {
        let mut case = Case::random(&mut rng, 2, 5, 40, replicate, PFEIFFER, &[full(5, Activation::Gelu, Scale::Channel, false); 2]);
        case.branches[1] = case.branches[0].clone();
        case.shared = vec![0, 0];
        check(gpu, &case.with(&[true, true], false, need_input), None);
    }
}
test_device!(location_kinds_match_cpu_reference, location_kinds_match_cpu);

/// Every plan the launcher accepts: several rows per warp-per-row block, block-per-row teams of
/// 2, 3 and 8 warps (block barriers, the projections' chunks spread over warps), and H > 1024.
fn every_plan_matches_cpu(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x91a8);
    let plans = [
        LocationPlan { threads_per_row: 32, rows_per_block: 1 },
        LocationPlan { threads_per_row: 32, rows_per_block: 3 },
        LocationPlan { threads_per_row: 64, rows_per_block: 1 },
        LocationPlan { threads_per_row: 96, rows_per_block: 1 },
        LocationPlan { threads_per_row: 256, rows_per_block: 1 },
        LocationPlan { threads_per_row: 32, rows_per_block: 8 },
    ];
    let specs = [BranchSpec::full(48, Activation::Gelu, Scale::Channel, false), BranchSpec::full(3, Activation::Swish, Scale::Learned, true), BranchSpec::plain(70, Activation::Relu)];
    for (p, plan) in plans.into_iter().enumerate() {
        for (q, h) in [40, 384].into_iter().enumerate() {
            // A 256-thread team costs the executor 256 fibers a row: few rows there.
            let t = if plan.threads_per_row > 128 { 1 } else { 3 };
            let trainable = [true, (p + q) % 2 == 0, true];
            let case = Case::random(&mut rng, 1, t, h, (p + q) % 2 == 1, PFEIFFER, &specs).with(&trainable, p % 2 == 1, true);
            check(gpu, &case, Some(plan));
        }
    }
    let case = Case::random(&mut rng, 1, 2, 1100, false, HOULSBY, &specs[..2]);
    assert_eq!(backward_plan_auto(1100, 48), LocationPlan { threads_per_row: 128, rows_per_block: 1 });
    check(gpu, &case, None);
}
test_device!(every_plan_matches_cpu_reference, every_plan_matches_cpu);

/// A plan whose teams fit the device's shared memory unstaged but not staged (H = 1024 in f32:
/// 16 KiB a team for the input kernel, 24 KiB staged): `RowStaging::On` is refused with a shape
/// error that says so, and `Auto` runs unstaged and matches the reference.
fn staging_that_does_not_fit(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x57a9);
    let max_shared = gpu.limits().max_shared_bytes_opt_in.saturating_sub(256);
    let h = 1024;
    let rows = (max_shared / (16 * h)).min(16) as u32;
    let plan = LocationPlan { threads_per_row: 32, rows_per_block: rows };
    assert!(rows as usize * 24 * h > max_shared, "{}: {rows} rows a block fit staged; the test needs a plan that does not", gpu.describe());
    let case = Case::random(&mut rng, 1, 2, h, false, PFEIFFER, &[BranchSpec::full(8, Activation::Gelu, Scale::Channel, false)]);
    let branches: Vec<DeviceBranch> = case.branches.iter().map(|b| DeviceBranch::upload(gpu, b)).collect();
    let weights: Vec<BranchWeights> = branches.iter().map(DeviceBranch::weights).collect();
    let descriptors = LocationDescriptors::new(gpu, case.hidden, case.steps, &weights).unwrap();
    match run_with(gpu, &case, &descriptors, Some(plan), Route::Split(RowStaging::On)) {
        Err(Error::Shape { msg, .. }) => assert!(msg.contains("row staging") && msg.contains("bytes of shared memory"), "{msg}"),
        other => panic!("{}: RowStaging::On with {plan:?} at H = {h}: expected a shape error, got {:?}", gpu.describe(), other.map(|_| "outputs")),
    }
    let got = run_with(gpu, &case, &descriptors, Some(plan), Route::Split(RowStaging::Auto)).unwrap_or_else(|e| panic!("{}: Auto: {e}", gpu.describe()));
    let (want_inputs, want_grads) = case.reference();
    check_one(&format!("{} Auto {plan:?} {}", gpu.describe(), case.label()), &got, &want_inputs, &want_grads);
}
test_device!(staging_falls_back_when_it_does_not_fit, staging_that_does_not_fit);

/// The executor's schedules reorder the threads between sync points; a race-free kernel with
/// fixed-order reductions (and deterministic GEMMs) gives the same bits in each.
#[cfg(feature = "cuda-sim")]
#[test]
fn schedules_agree_bit_for_bit() {
    use bert_adapters::cuda::gpu::SimConfig;
    use bert_adapters::cuda::sim::Schedule;
    let mut rng = StdRng::seed_from_u64(0x5c4f);
    let specs = [BranchSpec::full(48, Activation::Gelu, Scale::Channel, false), BranchSpec::plain(3, Activation::Relu), BranchSpec::full(5, Activation::Swish, Scale::Learned, true)];
    for (replicate, plan) in [(true, None), (false, Some(LocationPlan { threads_per_row: 64, rows_per_block: 1 }))] {
        let case = Case::random(&mut rng, 2, 5, 40, replicate, PFEIFFER, &specs).with(&[true, false, true], true, true);
        let sims = [Schedule::Forward, Schedule::Reverse, Schedule::Random(0x5eed)].map(|schedule| Gpu::sim(SimConfig { schedule, ..SimConfig::default() }));
        let runs: Vec<Vec<u32>> = sims.iter().map(|gpu| got_bits(&check(gpu, &case, plan).0)).collect();
        for r in &runs[1..] {
            assert_eq!(&runs[0], r, "replicate {replicate}: the schedules differ");
        }
    }
}

/// Rows of frozen branches are skipped when no input gradient is needed: their weights are
/// freed before the launch, past the pool (cuda-sim keeps freed memory unmapped, so a read would
/// fault), yet the
/// trainable branch's gradients match the CPU.
#[cfg(feature = "cuda-sim")]
#[test]
fn frozen_branches_are_never_read_without_input_gradients() {
    let mut rng = StdRng::seed_from_u64(0xf202);
    let specs = [BranchSpec::full(6, Activation::Gelu, Scale::Channel, false), BranchSpec::full(48, Activation::Swish, Scale::Learned, true), BranchSpec::plain(3, Activation::Relu)];
    for gpu in bert_adapters::cuda::gpu::sims_for_test() {
        for (replicate, trainable) in [(true, [false, true, false]), (false, [false, true, false]), (false, [true, false, false])] {
            let case = Case::random(&mut rng, 2, 7, 48, replicate, PFEIFFER, &specs).with(&trainable, false, false);
            let mut devs: Vec<Option<DeviceBranch>> = case.branches.iter().map(|b| Some(DeviceBranch::upload(&gpu, b))).collect();
            let weights: Vec<BranchWeights> = devs.iter().map(|d| d.as_ref().unwrap().weights()).collect();
            // SAFETY: the frozen branches' buffers are freed below on purpose: the launch must
            // not read them (cuda-sim turns such a read into an error, not undefined behaviour);
            // the trainable branch's buffers outlive the descriptors.
            let descriptors = unsafe { LocationDescriptors::new(&gpu, case.hidden, case.steps, &weights).unwrap().detach() };
            drop(weights);
            for (i, d) in devs.iter_mut().enumerate() {
                if !trainable[i] {
                    *d = None;
                }
            }
            // Past the memory pool, back to the executor, which unmaps it (the pool would hand
            // the blocks to this launch's outputs instead).
            gpu.release_cached();
            for path in PATHS {
                let got = run_with(&gpu, &case, &descriptors, None, path).unwrap_or_else(|e| panic!("{path:?} {}: {e}", case.label()));
                let (_, want) = case.reference();
                for (name, g) in got.grads[trainable.iter().position(|&t| t).unwrap()].as_ref().unwrap() {
                    let w = &want[trainable.iter().position(|&t| t).unwrap()].as_ref().unwrap().iter().find(|(n, _)| n == name).unwrap().1;
                    assert_close(name, &format!("{path:?} {}", case.label()), g, w);
                }
            }
        }
    }
}

/// No rows: overwritten destinations become zero, accumulated ones keep their values.
fn zero_rows(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x0);
    for accumulate in [false, true] {
        let mut case = Case::random(&mut rng, 1, 3, 16, true, PFEIFFER, &[BranchSpec::full(4, Activation::Relu, Scale::Channel, true)]).with(&[true], accumulate, true);
        case.batch = 0;
        case.h = tensor(vec![], &[0, 3, 16]);
        case.r = tensor(vec![], &[0, 3, 16]);
        case.d_out = tensor(vec![], &[0, 3, 16]);
        // (Not against the CPU reference: its backward panics on zero rows, `chunks(0)`.)
        let want = named(&if accumulate { host_grads(&case.branches[0], case.initial(0)) } else { host_grads(&case.branches[0], |n| vec![0.0; n]) });
        for (path, got) in PATHS.iter().zip(run(gpu, &case, None).unwrap()) {
            for ((name, g), (_, w)) in got.grads[0].as_ref().unwrap().iter().zip(&want) {
                assert_eq!(bits(g), bits(w), "{path:?} accumulate {accumulate}: {name}");
            }
        }
    }
}
test_device!(zero_rows_give_empty_sums, zero_rows);

// ---- the adapter's own dropout --------------------------------------------------------------------

/// `case` with branch i dropping out with probability `ps[i]` (None: no dropout, as the model
/// passes p = 0) under `seed`, as the `ids[i]`-th child of a Parallel location of `stream`.
fn with_dropout(mut case: Case, ps: &[Option<f32>], seed: u64, stream: u64, ids: &[u64]) -> Case {
    for (i, b) in case.branches.iter_mut().enumerate() {
        b.dropout = ps[i].map(|p| adapter_dropout(p, seed, stream, ids[i]));
    }
    case
}

/// The backward with the adapter's dropout against the CPU backend: the forward's masks on the
/// gradient through the dropout, and on the gate's and the scaling's terms, which read the
/// dropped values. One branch at p = 0.1 and at p = 0.5; Parallel locations of mixed branches
/// each with its own p (0 as none and as a spec of p = 0), replicated and not, at H = 42 (a Philox
/// block straddles rows) and 40, 48; frozen branches whose rows are never launched (the live
/// ones' masks still count rows from their own block); in the automatic plan, several rows per
/// block and a block per row; and a 32-thread team at H = 1100, whose threads own 35 columns, past
/// the 32 keep bits a thread caches.
fn dropout_backward_matches_cpu(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xbd70);
    let steps = |r: ResidualBeforeLn, before: bool, after: bool| LocationSteps { residual_before_ln: r, original_ln_before: before, original_ln_after: after };
    let (full, plain) = (BranchSpec::full, BranchSpec::plain);
    let cases = vec![
        with_dropout(Case::random(&mut rng, 2, 7, 48, false, PFEIFFER, &[full(6, Activation::Gelu, Scale::Channel, false)]), &[Some(0.1)], 11, 0x15, &[0]),
        with_dropout(
            Case::random(&mut rng, 2, 5, 42, true, HOULSBY, &[BranchSpec { scale: Scale::Learned, ..plain(5, Activation::Relu) }]),
            &[Some(0.5)],
            0xdead_beef_0123,
            0x26,
            &[0],
        ),
        with_dropout(
            Case::random(&mut rng, 2, 3, 40, true, PFEIFFER, &[full(6, Activation::Gelu, Scale::Channel, false), plain(48, Activation::Swish), full(7, Activation::Tanh, Scale::Learned, true)]),
            &[Some(0.1), None, Some(0.5)],
            7,
            0x35,
            &[0, 1, 2],
        ),
        with_dropout(
            Case::random(&mut rng, 2, 3, 42, false, steps(ResidualBeforeLn::False, true, true), &[plain(3, Activation::Relu), BranchSpec { scale: Scale::Fixed(2.5), ln_after: true, ..plain(9, Activation::GeluNew) }]),
            &[Some(0.5), Some(0.0)],
            u64::MAX - 5,
            0xb6,
            &[2, 0],
        ),
        with_dropout(
            Case::random(&mut rng, 2, 3, 40, false, PFEIFFER, &[full(5, Activation::Swish, Scale::Learned, false), plain(4, Activation::Relu), full(3, Activation::Gelu, Scale::Channel, true)]),
            &[Some(0.5), Some(0.1), Some(0.1)],
            21,
            0x45,
            &[0, 1, 2],
        )
        .with(&[false, true, true], true, false),
        with_dropout(
            Case::random(&mut rng, 2, 3, 40, true, HOULSBY, &[full(5, Activation::Swish, Scale::Learned, false), plain(4, Activation::Relu)]),
            &[Some(0.5), Some(0.1)],
            22,
            0x56,
            &[1, 0],
        )
        .with(&[true, false], false, true),
    ];
    let plans = [None, Some(LocationPlan { threads_per_row: 32, rows_per_block: 3 }), Some(LocationPlan { threads_per_row: 64, rows_per_block: 1 })];
    let mut worst = (0f32, String::new());
    for case in &cases {
        for plan in plans {
            let (a, used) = check(gpu, case, plan);
            let b = run(gpu, case, plan).unwrap();
            assert_eq!(got_bits(&a), got_bits(&b), "{}: not deterministic", case.label());
            if used > worst.0 {
                worst = (used, format!("{} {plan:?}", case.label()));
            }
        }
    }
    let wide = with_dropout(
        Case::random(&mut rng, 1, 2, 1100, false, HOULSBY, &[full(4, Activation::Gelu, Scale::Channel, false), plain(3, Activation::Relu)]),
        &[Some(0.5), Some(0.1)],
        5,
        0x66,
        &[0, 1],
    );
    for plan in [None, Some(LocationPlan { threads_per_row: 32, rows_per_block: 1 })] {
        let (_, used) = check(gpu, &wide, plan);
        if used > worst.0 {
            worst = (used, format!("{} {plan:?}", wide.label()));
        }
    }
    report_line(&format!("adapter dropout backward on {}: worst max|err|/tol = {:.3} at {}", gpu.describe(), worst.0, worst.1));
}
test_device!(dropout_backward_matches_cpu_reference, dropout_backward_matches_cpu);

/// Without a seed a branch with dropout is refused (`Error::Input`), before anything is written.
fn dropout_needs_a_seed(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(8);
    let case = with_dropout(Case::random(&mut rng, 1, 2, 16, true, PFEIFFER, &[BranchSpec::plain(2, Activation::Relu)]), &[Some(0.25)], 9, 0x15, &[0]);
    let dev = DeviceBranch::upload(gpu, &case.branches[0]);
    let desc = LocationDescriptors::new(gpu, 16, PFEIFFER, &[dev.weights()]).unwrap();
    let (h, r, d_out) = (gpu.upload(&data(&case.h)).unwrap(), gpu.upload(&data(&case.r)).unwrap(), gpu.upload(&data(&case.d_out)).unwrap());
    let (gamma, beta) = (gpu.upload(&data(&case.gamma)).unwrap(), gpu.upload(&data(&case.beta)).unwrap());
    let (mut dh, mut dr) = (gpu.upload(&[f32::NAN; 32]).unwrap(), gpu.upload(&[f32::NAN; 32]).unwrap());
    let mut ws = LocationBackwardWorkspace::new(gpu, backward_workspace_len(&desc, case.shape(), &[false]).unwrap()).unwrap();
    {
        let inputs = LocationInputs { h: h.view(), r: r.view(), ln_gamma: gamma.view(), ln_beta: beta.view(), ln_eps: BERT_EPS, dropout_seed: None };
        let mut grads = vec![None];
        let mut outputs = LocationBackwardOutputs { input_grads: Some((dh.view_mut(), dr.view_mut())), grads: &mut grads };
        let err = adapter_location_backward(gpu, &inputs, &d_out.view(), &desc, &mut outputs, &mut ws, case.shape()).unwrap_err();
        assert!(matches!(err, Error::Input(_)) && err.to_string().contains("branch 0 has adapter dropout, but no dropout seed was given"), "{err}");
    }
    assert!(gpu.download(&dh.view()).unwrap().iter().all(|v| v.is_nan()), "a refused launch wrote dh");
}
test_device!(dropout_backward_needs_a_seed, dropout_needs_a_seed);

// ---- refusals ------------------------------------------------------------------------------------

fn shape_err(r: Result<impl std::fmt::Debug, Error>, want: &str) {
    match r {
        Err(e @ Error::Shape { .. }) => assert!(e.to_string().contains(want), "`{e}` should contain `{want}`"),
        other => panic!("expected a shape error containing `{want}`, got {other:?}"),
    }
}

/// Every size error names its operand; nothing is written by a refused launch; aliasing outputs
/// and more than 32 branches are refused.
fn launch_errors(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(4);
    let (b, t, h, n) = (2, 3, 16, 2);
    let specs = [BranchSpec::full(4, Activation::Relu, Scale::Channel, false), BranchSpec::plain(4, Activation::Relu)];
    let hosts: Vec<HostBranch> = specs.iter().map(|s| HostBranch::random_scaled(&mut rng, h, *s, 3.0)).collect();
    let devs: Vec<DeviceBranch> = hosts.iter().map(|x| DeviceBranch::upload(gpu, x)).collect();
    let weights: Vec<BranchWeights> = devs.iter().map(DeviceBranch::weights).collect();
    let desc = LocationDescriptors::new(gpu, h, PFEIFFER, &weights).unwrap();
    let one = LocationDescriptors::new(gpu, h, PFEIFFER, &weights[..1]).unwrap();
    let rows_in = b * t * h;
    let n_out = n * rows_in;
    let x = gpu.upload(&vec![0.5f32; 3 * n_out]).unwrap();
    let params = gpu.upload(&vec![1f32; h + 1]).unwrap();
    let outs = gpu.upload(&vec![f32::NAN; 4 * n_out]).unwrap();
    let shape = LocationShape { batch: b, seq_len: t, hidden: h, branches: n, replicate: true };
    let full_dests = DeviceGrads::new(gpu, &host_grads(&hosts[0], |k| vec![f32::NAN; k]));
    let plain_dests = DeviceGrads::new(gpu, &host_grads(&hosts[1], |k| vec![f32::NAN; k]));
    let inputs = LocationInputs {
        h: x.slice(0..rows_in).unwrap(),
        r: x.slice(rows_in..2 * rows_in).unwrap(),
        ln_gamma: params.slice(0..h).unwrap(),
        ln_beta: params.slice(0..h).unwrap(),
        ln_eps: BERT_EPS,
        dropout_seed: None,
    };
    let d_out = x.slice(n_out..2 * n_out).unwrap();
    let len = backward_workspace_len(&desc, shape, &[true, true]).unwrap();
    let mut ws = LocationBackwardWorkspace::new(gpu, len).unwrap();
    let mut small = LocationBackwardWorkspace::new(gpu, len - 1).unwrap();
    // SAFETY: views of `outs` handed out as outputs; every launch below is refused before it
    // writes (checked at the end), and the aliasing cases are refused by design.
    let out = |range: std::ops::Range<usize>| unsafe { outs.slice(range).unwrap().assume_writable() };
    {
        #[allow(clippy::too_many_arguments)]
        let go = |inputs: &LocationInputs,
                      d_out: &bert_adapters::cuda::gpu::DeviceView<f32>,
                      d: &LocationDescriptors,
                      input_grads: Option<(usize, usize)>,
                      grads: Vec<Option<BranchGrads>>,
                      ws: &mut LocationBackwardWorkspace,
                      shape: LocationShape,
                      plan: Option<LocationPlan>| {
            let mut grads = grads;
            let mut outputs = LocationBackwardOutputs { input_grads: input_grads.map(|(a, b)| (out(0..a), out(n_out..n_out + b))), grads: &mut grads };
            match plan {
                None => {
                    let fused = adapter_location_backward(gpu, inputs, d_out, d, &mut outputs, ws, shape);
                    // The split path refuses the same way (but takes no workspace: it has its own).
                    if !matches!(&fused, Err(Error::Shape { msg, .. }) if msg.contains("workspace")) {
                        let split = adapter_location_backward_split(gpu, inputs, d_out, d, &mut outputs, shape);
                        assert_eq!(format!("{split:?}"), format!("{fused:?}"), "the split path refuses otherwise");
                    }
                    fused
                }
                Some(p) => adapter_location_backward_with_plan(gpu, inputs, d_out, d, &mut outputs, ws, shape, p),
            }
        };
        let g = || vec![Some(full_dests.views(false)), Some(plain_dests.views(false))];
        let io = Some((rows_in, rows_in));
        shape_err(go(&LocationInputs { h: x.slice(0..rows_in - 1).unwrap(), ..inputs }, &d_out, &desc, io, g(), &mut ws, shape, None), "h has 95 elements, expected 96 (B·T·H)");
        shape_err(go(&LocationInputs { r: x.slice(0..n_out).unwrap(), ..inputs }, &d_out, &desc, io, g(), &mut ws, shape, None), "r has 192 elements, expected 96");
        shape_err(go(&inputs, &d_out, &desc, io, g(), &mut ws, LocationShape { replicate: false, ..shape }, None), "h has 96 elements, expected 192 (N·B·T·H)");
        shape_err(go(&LocationInputs { ln_gamma: params.view(), ..inputs }, &d_out, &desc, io, g(), &mut ws, shape, None), "LayerNorm gamma has 17");
        shape_err(go(&LocationInputs { ln_beta: params.slice(0..1).unwrap(), ..inputs }, &d_out, &desc, io, g(), &mut ws, shape, None), "LayerNorm beta has 1");
        shape_err(go(&inputs, &x.slice(n_out..2 * n_out - 1).unwrap(), &desc, io, g(), &mut ws, shape, None), "d_out has 191 elements, expected 192 (N·B·T·H)");
        shape_err(go(&inputs, &d_out, &desc, Some((rows_in + 1, rows_in)), g(), &mut ws, shape, None), "dh has 97 elements, expected 96 (B·T·H)");
        shape_err(go(&inputs, &d_out, &desc, Some((rows_in, 1)), g(), &mut ws, shape, None), "dr has 1 elements, expected 96");
        shape_err(go(&inputs, &d_out, &desc, io, vec![None], &mut ws, shape, None), "1 gradient entries for 2 branches");
        shape_err(go(&inputs, &d_out, &one, io, g(), &mut ws, shape, None), "2 branches, but there are 1 descriptors");
        shape_err(go(&inputs, &d_out, &desc, io, g(), &mut ws, LocationShape { hidden: 8, ..shape }, None), "hidden 8, but the descriptors were built for H = 16");
        shape_err(go(&inputs, &d_out, &desc, io, g(), &mut small, shape, None), &format!("the workspace has {} floats, this backward needs {len}", len - 1));
        shape_err(go(&inputs, &d_out, &desc, io, g(), &mut ws, shape, Some(LocationPlan { threads_per_row: 48, rows_per_block: 1 })), "multiple of 32");
        shape_err(go(&inputs, &d_out, &desc, io, g(), &mut ws, shape, Some(LocationPlan { threads_per_row: 64, rows_per_block: 2 })), "rows_per_block must be 1");
        shape_err(go(&inputs, &d_out, &desc, io, g(), &mut ws, shape, Some(LocationPlan { threads_per_row: 288, rows_per_block: 1 })), "at most 256 threads per block");
        shape_err(go(&inputs, &d_out, &desc, io, g(), &mut ws, shape, Some(LocationPlan { threads_per_row: 32, rows_per_block: 9 })), "at most 256 threads per block");
        // Destinations: a wrong length, or given / missing against the adapter's options.
        let short = |v: &BranchGrads| unsafe { outs.slice(3 * n_out..3 * n_out + v.up_b.len() - 1).unwrap().assume_writable() };
        let mut bad = g();
        bad[0].as_mut().unwrap().up_b = short(bad[0].as_ref().unwrap());
        shape_err(go(&inputs, &d_out, &desc, io, bad, &mut ws, shape, None), "branch 0: the up bias gradient has 15 elements, expected 16 (H)");
        let mut bad = g();
        bad[1].as_mut().unwrap().down_w = full_dests.views(false).up_b;
        shape_err(go(&inputs, &d_out, &desc, io, bad, &mut ws, shape, None), "branch 1: the down weight gradient has 16 elements, expected 64 (bottleneck·H)");
        let mut bad = g();
        bad[0].as_mut().unwrap().gate = None;
        shape_err(go(&inputs, &d_out, &desc, io, bad, &mut ws, shape, None), "branch 0: the adapter has a gate, but none is given a gradient destination");
        let mut bad = g();
        bad[1].as_mut().unwrap().scaling = full_dests.views(false).scaling;
        shape_err(go(&inputs, &d_out, &desc, io, bad, &mut ws, shape, None), "branch 1: the adapter has none a learned or channel scaling");
        let mut bad = g();
        bad[0].as_mut().unwrap().ln_after = None;
        shape_err(go(&inputs, &d_out, &desc, io, bad, &mut ws, shape, None), "LayerNorm after");
        let eps = go(&LocationInputs { ln_eps: f32::NAN, ..inputs }, &d_out, &desc, io, g(), &mut ws, shape, None);
        assert!(matches!(eps, Err(Error::Input(_))), "{eps:?}");
        // dh and dr overlapping each other.
        let mut grads = g();
        let mut outputs = LocationBackwardOutputs { input_grads: Some((out(0..rows_in), out(rows_in - 1..2 * rows_in - 1))), grads: &mut grads };
        let err = adapter_location_backward(gpu, &inputs, &d_out, &desc, &mut outputs, &mut ws, shape).unwrap_err().to_string();
        assert!(err.contains("dr overlaps dh"), "{err}");
        // A destination overlapping dh, and two destinations of one branch overlapping.
        let mut grads = g();
        grads[1].as_mut().unwrap().up_b = out(0..h);
        let mut outputs = LocationBackwardOutputs { input_grads: Some((out(0..rows_in), out(n_out..n_out + rows_in))), grads: &mut grads };
        let err = adapter_location_backward(gpu, &inputs, &d_out, &desc, &mut outputs, &mut ws, shape).unwrap_err().to_string();
        assert!(err.contains("branch 1's up bias gradient overlaps dh"), "{err}");
        let mut grads = g();
        grads[1].as_mut().unwrap().up_b = unsafe { plain_dests.up_w.slice(0..h).unwrap().assume_writable() };
        let mut outputs = LocationBackwardOutputs { input_grads: None, grads: &mut grads };
        let err = adapter_location_backward(gpu, &inputs, &d_out, &desc, &mut outputs, &mut ws, shape).unwrap_err().to_string();
        assert!(err.contains("branch 1's up bias gradient overlaps branch 1's up weight gradient"), "{err}");
    }
    assert!(gpu.download(&outs.view()).unwrap().iter().all(|v| v.is_nan()), "a refused launch wrote an output");
    for d in [&full_dests, &plain_dests] {
        assert!(d.download(gpu).iter().all(|(_, v)| v.iter().all(|x| x.is_nan())), "a refused launch wrote a gradient");
    }

    // A destination overlapping a weight (through detached descriptors) and d_out.
    {
        let mut buf = gpu.upload(&vec![0.25f32; 4 * h]).unwrap();
        let alias_w = BranchWeights { up_b: buf.slice(0..h).unwrap(), ..weights[1] };
        // SAFETY: `buf` outlives `aliased`, which is only used for the refused launches below.
        let aliased = unsafe { LocationDescriptors::new(gpu, h, PFEIFFER, &[weights[0], alias_w]).unwrap().detach() };
        let mut grads = vec![None, Some(plain_dests.views(false))];
        grads[1].as_mut().unwrap().up_b = buf.slice_mut(0..h).unwrap();
        let mut outputs = LocationBackwardOutputs { input_grads: None, grads: &mut grads };
        let err = adapter_location_backward(gpu, &inputs, &d_out, &aliased, &mut outputs, &mut ws, shape).unwrap_err().to_string();
        assert!(err.contains("branch 1's up bias gradient overlaps branch 1 up bias"), "{err}");
        let mut grads = vec![None, Some(plain_dests.views(false))];
        grads[1].as_mut().unwrap().up_b = unsafe { x.slice(n_out..n_out + h).unwrap().assume_writable() };
        let mut outputs = LocationBackwardOutputs { input_grads: None, grads: &mut grads };
        let err = adapter_location_backward(gpu, &inputs, &d_out, &desc, &mut outputs, &mut ws, shape).unwrap_err().to_string();
        assert!(err.contains("overlaps d_out"), "{err}");
    }

    // More branches than the masks hold.
    let many: Vec<BranchWeights> = (0..MAX_BACKWARD_BRANCHES + 1).map(|_| weights[1]).collect();
    let desc33 = LocationDescriptors::new(gpu, h, PFEIFFER, &many).unwrap();
    let shape33 = LocationShape { batch: 1, seq_len: 1, hidden: h, branches: 33, replicate: true };
    let mut grads: Vec<Option<BranchGrads>> = (0..33).map(|_| None).collect();
    let mut outputs = LocationBackwardOutputs { input_grads: Some((out(0..h), out(n_out..n_out + h))), grads: &mut grads };
    let d33 = x.slice(0..33 * h).unwrap();
    let inputs33 = LocationInputs { h: x.slice(0..h).unwrap(), r: x.slice(h..2 * h).unwrap(), ..inputs };
    let err = adapter_location_backward(gpu, &inputs33, &d33, &desc33, &mut outputs, &mut ws, shape33).unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)) && err.to_string().contains("33 Parallel branches"), "{err}");
}
test_device!(launch_errors_name_the_operand, launch_errors);
