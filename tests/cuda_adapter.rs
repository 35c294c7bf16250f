//! The CUDA adapter location (kernels/adapter.cu through `cuda::adapter`) against the CPU
//! reference backend's `adapter_location`, the specification of the fused kernel.
//!
//! One body per test, run by `test_device!` on every device: `*::cuda_sim` on the CPU executor
//! (feature `cuda-sim`) in the forward, reverse and random schedules; `*::cuda` on a GPU, which
//! prints `SKIPPED: ...` without one and fails under `REQUIRE_GPU=1`.
//!
//! Both execution paths ([`LocationPath`]): the fused kernel and the split path (pre kernel, the
//! two bottleneck products on `Gpu::gemm`, post kernel); every body runs each, against the same
//! CPU reference and tolerance.
//!
//! Tolerance: max|out - ref| <= 1e-5 · (1 + max|ref|) over the whole output, as for every fp32
//! kernel of the crate. The adapter weights are blown up (pre-activations and the adapter's output
//! several times larger than h + r), so the adapter dominates every output and a bug in it moves
//! the output by O(1), far past the tolerance. Outputs start as NaN, so an element the kernel
//! never writes fails.

use bert_adapters::backend::{BottleneckParams, LocationSteps};
use bert_adapters::config::ResidualBeforeLn;
use bert_adapters::cuda::adapter::{
    adapter_location_forward_on, adapter_location_forward_split_with_plan, adapter_location_forward_with_plan, BranchDropout,
    BranchWeights, DeviceLayerNorm, DeviceScaling, DropoutSeed, LocationDescriptors, LocationInputs, LocationOutputs, LocationPath, LocationPlan, LocationShape,
    RowStaging, MAX_BOTTLENECK,
};
use bert_adapters::cuda::gpu::Gpu;
use bert_adapters::cuda::probe::report_line;
use bert_adapters::{test_device, Activation, Backend, CpuBackend, Error, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

const TOL: f32 = 1e-5;

// ---- cases ---------------------------------------------------------------------------------------

#[path = "support/adapter_location.rs"]
#[allow(dead_code)] // each test file uses part of the shared cases
mod cases;
use cases::*;

/// One location: inputs, BERT LayerNorm, steps, branches.
#[derive(Clone)]
struct Case {
    batch: usize,
    seq_len: usize,
    hidden: usize,
    replicate: bool,
    steps: LocationSteps,
    h: Tensor,
    r: Tensor,
    gamma: Tensor,
    beta: Tensor,
    branches: Vec<HostBranch>,
}

impl Case {
    fn random(rng: &mut StdRng, batch: usize, seq_len: usize, hidden: usize, replicate: bool, steps: LocationSteps, specs: &[BranchSpec]) -> Case {
        let rows = if replicate { batch } else { batch * specs.len() };
        let n = rows * seq_len * hidden;
        Case {
            batch,
            seq_len,
            hidden,
            replicate,
            steps,
            h: tensor(uniform(rng, n, -2.0, 2.0), &[rows, seq_len, hidden]),
            r: tensor(uniform(rng, n, -2.0, 2.0), &[rows, seq_len, hidden]),
            gamma: tensor(uniform(rng, hidden, 0.5, 1.5), &[hidden]),
            beta: tensor(uniform(rng, hidden, -0.5, 0.5), &[hidden]),
            branches: specs.iter().map(|s| HostBranch::random(rng, hidden, *s)).collect(),
        }
    }

    fn shape(&self) -> LocationShape {
        LocationShape { batch: self.batch, seq_len: self.seq_len, hidden: self.hidden, branches: self.branches.len(), replicate: self.replicate }
    }

    fn label(&self) -> String {
        let specs: Vec<String> = self.branches.iter().map(|b| b.spec.label()).collect();
        location_label(self.shape(), "", self.steps, &specs)
    }

    /// The CPU reference backend's output.
    fn reference(&self) -> Vec<f32> {
        let params: Vec<BottleneckParams> = self.branches.iter().map(HostBranch::params).collect();
        let loc = host_location(&self.h, &self.r, &self.gamma, &self.beta, self.steps, &params, self.shape());
        CpuBackend::reference().adapter_location(&loc).unwrap_or_else(|e| panic!("{}: CPU reference: {e}", self.label())).into_cpu_vec().unwrap()
    }

    /// `LN(h + r)` for every branch's rows: the location without adapters.
    fn plain_location(&self) -> Vec<f32> {
        let (h, r) = (data(&self.h), data(&self.r));
        let rows: Vec<f32> = bert_adapters::cpu::reference::residual_layernorm(&h, Some(&r), &data(&self.gamma), &data(&self.beta), self.hidden, BERT_EPS).y;
        if self.replicate {
            rows.iter().copied().cycle().take(rows.len() * self.branches.len()).collect()
        } else {
            rows
        }
    }

    /// The gate means `[N·B]` in f64 (1 for branches without a gate): the mean over an example's
    /// rows of σ(x·w_g + b_g), x the pre step's output (spec §3.4).
    fn reference_gates(&self) -> Vec<f32> {
        let (hd, t, b) = (self.hidden, self.seq_len, self.batch);
        let (h, r, g, be) = (data(&self.h), data(&self.r), data(&self.gamma), data(&self.beta));
        let mut out = Vec::new();
        for (i, br) in self.branches.iter().enumerate() {
            for e in 0..b {
                let Some((w, bias)) = &br.gate else {
                    out.push(1.0);
                    continue;
                };
                let (w, bias) = (data(w), data(bias)[0] as f64);
                let mut sum = 0f64;
                for row in 0..t {
                    let src = ((if self.replicate { e } else { i * b + e }) * t + row) * hd;
                    let x: Vec<f64> = if self.steps.original_ln_before {
                        let v: Vec<f64> = (0..hd).map(|c| (h[src + c] + r[src + c]) as f64).collect();
                        let mean = v.iter().sum::<f64>() / hd as f64;
                        let var = v.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / hd as f64;
                        let rstd = 1.0 / (var + BERT_EPS as f64).sqrt();
                        (0..hd).map(|c| ((v[c] - mean) * rstd * g[c] as f64 + be[c] as f64) as f32 as f64).collect()
                    } else {
                        (0..hd).map(|c| h[src + c] as f64).collect()
                    };
                    let logit: f64 = bias + (0..hd).map(|c| x[c] * w[c] as f64).sum::<f64>();
                    sum += 1.0 / (1.0 + (-logit).exp());
                }
                out.push((sum / t as f64) as f32);
            }
        }
        out
    }
}

struct Outputs {
    out: Vec<f32>,
    gate: Option<Vec<f32>>,
}

/// Both execution paths, in the order the tests run them.
const PATHS: [LocationPath; 2] = [LocationPath::Fused, LocationPath::Split];

/// The launcher of `path` with `plan` (None: the automatic one) and, on the split path, `staging`
/// (the public entry point when both are automatic).
#[allow(clippy::too_many_arguments)] // the launcher's operands plus the two choices
fn forward(
    gpu: &Gpu,
    inputs: &LocationInputs,
    d: &LocationDescriptors,
    outputs: &mut LocationOutputs,
    shape: LocationShape,
    path: LocationPath,
    plan: Option<LocationPlan>,
    staging: RowStaging,
) -> Result<(), Error> {
    match (path, plan) {
        (LocationPath::Fused, Some(p)) => adapter_location_forward_with_plan(gpu, inputs, d, outputs, shape, p),
        (LocationPath::Split, None) if staging != RowStaging::Auto => {
            adapter_location_forward_split_with_plan(gpu, inputs, d, outputs, shape, LocationPlan::auto(shape.hidden, 0), staging)
        }
        (_, None) => adapter_location_forward_on(gpu, inputs, d, outputs, shape, path),
        (LocationPath::Split, Some(p)) => adapter_location_forward_split_with_plan(gpu, inputs, d, outputs, shape, p, staging),
    }
}

/// Uploads `case`, builds its descriptors, runs the launcher of `path` with NaN-poisoned outputs
/// (auto plan when `plan` is None) and downloads them. The gate output is given when a branch
/// gates.
fn run(gpu: &Gpu, case: &Case, path: LocationPath, plan: Option<LocationPlan>) -> Result<Outputs, Error> {
    run_staged(gpu, case, path, plan, RowStaging::Auto)
}

/// As [`run`], with the split path's row staging forced.
fn run_staged(gpu: &Gpu, case: &Case, path: LocationPath, plan: Option<LocationPlan>, staging: RowStaging) -> Result<Outputs, Error> {
    let branches: Vec<DeviceBranch> = case.branches.iter().map(|b| DeviceBranch::upload(gpu, b)).collect();
    let weights: Vec<BranchWeights> = branches.iter().map(DeviceBranch::weights).collect();
    let descriptors = LocationDescriptors::new(gpu, case.hidden, case.steps, &weights)?;
    let (h, r) = (gpu.upload(&data(&case.h))?, gpu.upload(&data(&case.r))?);
    let (gamma, beta) = (gpu.upload(&data(&case.gamma))?, gpu.upload(&data(&case.beta))?);
    let shape = case.shape();
    let n_out = shape.branches * shape.batch * shape.seq_len * shape.hidden;
    let mut out = gpu.upload(&vec![f32::NAN; n_out])?;
    let mut gate = descriptors.has_gate().then(|| gpu.upload(&vec![f32::NAN; shape.branches * shape.batch])).transpose()?;
    {
        let inputs = LocationInputs { h: h.view(), r: r.view(), ln_gamma: gamma.view(), ln_beta: beta.view(), ln_eps: BERT_EPS, dropout_seed: dropout_seed(&case.branches) };
        let mut outputs = LocationOutputs { out: out.view_mut(), gate: gate.as_mut().map(|g| g.view_mut()) };
        forward(gpu, &inputs, &descriptors, &mut outputs, shape, path, plan, staging)?;
    }
    Ok(Outputs { out: gpu.download(&out.view())?, gate: gate.map(|g| gpu.download(&g.view())).transpose()? })
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
            panic!("{label}: {what}[{i}] = {g}, reference {w}, |err| {err:e} > tol {tol:e}");
        }
        worst = worst.max(err / tol);
    }
    worst
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Runs `case` and checks it against the CPU; returns the outputs and the tolerance used.
fn check(gpu: &Gpu, case: &Case, path: LocationPath, plan: Option<LocationPlan>) -> (Outputs, f32) {
    let label = format!("{} {path:?} {}{}", gpu.describe(), case.label(), plan.map(|p| format!(" {p:?}")).unwrap_or_default());
    let got = run(gpu, case, path, plan).unwrap_or_else(|e| panic!("{label}: {e}"));
    let want = case.reference();
    // The adapter really dominates: the output is O(1) away from the plain BERT location.
    let plain = case.plain_location();
    let moved = want.iter().zip(&plain).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(moved > 0.5, "{label}: the adapters move the output by only {moved}");
    let mut used = assert_close("out", &label, &got.out, &want);
    if let Some(g) = &got.gate {
        used = used.max(assert_close("gate", &label, g, &case.reference_gates()));
    }
    (got, used)
}

// ---- the sweep ---------------------------------------------------------------------------------------

const ACTS: [Activation; 6] = [Activation::Relu, Activation::Gelu, Activation::GeluNew, Activation::Swish, Activation::Tanh, Activation::Sigmoid];

/// H x bottleneck in a Latin square with T and N, so every H meets every bottleneck, every T and
/// every N once, and every bottleneck every T and N; replicate alternates; every activation and
/// scaling kind appears, and N >= 2 mixes configs (and bottlenecks) in one launch.
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
                    // Branch 0 has the case's bottleneck; later ones another size.
                    let mj = if j == 0 { m } else { [5, 33, 2][(k + j) % 3] };
                    match (k + j) % 3 {
                        0 => BranchSpec::plain(mj, act),
                        1 => BranchSpec { scale: scales[k % 3], ln_after: true, ..BranchSpec::plain(mj, act) },
                        _ => BranchSpec::full(mj, act, scales[k % 3], k % 2 == 0),
                    }
                })
                .collect();
            // Both location kinds meet both replicate settings.
            let steps = if (a + b / 2) % 2 == 0 { PFEIFFER } else { HOULSBY };
            cases.push(Case::random(rng, 2, t, h, (a + b) % 2 == 0, steps, &specs));
        }
    }
    cases
}

fn sweep_matches_cpu(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xada9_7e55);
    let mut worst = (0f32, String::new());
    let cases = sweep_cases(&mut rng);
    for case in &cases {
        for path in PATHS {
            let (_, used) = check(gpu, case, path, None);
            if used > worst.0 {
                worst = (used, format!("{path:?} {}", case.label()));
            }
        }
    }
    report_line(&format!("adapter location sweep (fused and split) on {}: {} cases pass; worst max|err|/tol = {:.3} at {}", gpu.describe(), cases.len(), worst.0, worst.1));
}
test_device!(sweep_matches_cpu_reference, sweep_matches_cpu);

/// Every kind of location (spec §4's closed forms) and the first-child / last-child rule of a
/// mixed Parallel: each at H = 48, T = 7, replicated and not.
fn location_kinds_match_cpu(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x0010_ca7e);
    let steps = |r: ResidualBeforeLn, before: bool, after: bool| LocationSteps { residual_before_ln: r, original_ln_before: before, original_ln_after: after };
    let full = |m, act, scale, first| BranchSpec::full(m, act, scale, first);
    let kinds: Vec<(&str, LocationSteps, Vec<BranchSpec>)> = vec![
        ("pfeiffer", PFEIFFER, vec![BranchSpec::plain(3, Activation::Relu)]),
        ("houlsby", HOULSBY, vec![BranchSpec::plain(3, Activation::Swish)]),
        ("residual_before_ln False", steps(ResidualBeforeLn::False, true, true), vec![full(4, Activation::Gelu, Scale::Channel, false)]),
        ("residual_before_ln False, no LN first", steps(ResidualBeforeLn::False, false, true), vec![full(4, Activation::Tanh, Scale::Learned, true)]),
        ("post_add", steps(ResidualBeforeLn::PostAdd, true, true), vec![full(6, Activation::Swish, Scale::Fixed(0.5), true)]),
        ("original_ln_after False", steps(ResidualBeforeLn::True, false, false), vec![BranchSpec::plain(48, Activation::Relu)]),
        ("par_bn-like scaling 4", HOULSBY, vec![BranchSpec { scale: Scale::Fixed(4.0), ..BranchSpec::plain(24, Activation::Relu) }]),
        // Parallel(pfeiffer, houlsby, full): pre step from the first child, post from the last.
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
            for path in PATHS {
                let (a, _) = check(gpu, &case, path, None);
                // Fixed reduction order: the same launch gives the same bits.
                let b = run(gpu, &case, path, None).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(bits(&a.out), bits(&b.out), "{name} {path:?}: not deterministic");
            }
        }
    }
}
test_device!(location_kinds_match_cpu_reference, location_kinds_match_cpu);

/// Every plan the launcher accepts: several rows per warp-per-row block (a partial last block),
/// and block-per-row teams of 2, 3 and 32 warps (block barriers, the down projection's chunks
/// spread over warps), including H > 1024, where the automatic plan is block-per-row.
fn every_plan_matches_cpu(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x91a7);
    let plans = [
        LocationPlan { threads_per_row: 32, rows_per_block: 1 },
        LocationPlan { threads_per_row: 32, rows_per_block: 3 },
        LocationPlan { threads_per_row: 64, rows_per_block: 1 },
        LocationPlan { threads_per_row: 96, rows_per_block: 1 },
        // The most the forward takes (its __launch_bounds__): 1024 threads of ~100 registers do not fit.
        LocationPlan { threads_per_row: 512, rows_per_block: 1 },
    ];
    let specs = [BranchSpec::full(48, Activation::Gelu, Scale::Channel, false), BranchSpec::full(3, Activation::Swish, Scale::Learned, true), BranchSpec::plain(70, Activation::Relu)];
    for plan in plans {
        for h in [40, 384] {
            // A 512-thread team costs the executor 512 fibers a row: one row per branch there.
            let t = if plan.threads_per_row > 128 { 1 } else { 3 };
            let case = Case::random(&mut rng, 1, t, h, true, PFEIFFER, &specs);
            for path in PATHS {
                check(gpu, &case, path, Some(plan));
            }
        }
    }
    // Wider than 1024: one block per row, 128 threads.
    let case = Case::random(&mut rng, 1, 2, 1100, false, HOULSBY, &specs[..2]);
    assert_eq!(LocationPlan::auto(1100, 48), LocationPlan { threads_per_row: 128, rows_per_block: 1 });
    assert_eq!(LocationPlan::auto(1100, 0), LocationPlan { threads_per_row: 128, rows_per_block: 1 });
    for path in PATHS {
        check(gpu, &case, path, None);
    }
}
test_device!(every_plan_matches_cpu_reference, every_plan_matches_cpu);

/// Row staging changes where the split kernels read their rows from, not their arithmetic: with
/// it forced on and off the outputs match bit for bit (and the reference: `check` runs the
/// default, staged where it fits), over the sweep, a width whose rows are not a multiple of 16
/// bytes (element-wise copies), and a block-per-row width.
fn staging_changes_no_bits(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x57a9_e0ff);
    let mut cases = sweep_cases(&mut rng);
    let specs = [BranchSpec::full(5, Activation::Gelu, Scale::Channel, true), BranchSpec::plain(3, Activation::Relu)];
    cases.push(Case::random(&mut rng, 2, 3, 42, true, PFEIFFER, &specs));
    cases.push(Case::random(&mut rng, 1, 2, 1100, false, HOULSBY, &specs));
    for case in &cases {
        let label = format!("{} {}", gpu.describe(), case.label());
        let (on, _) = check(gpu, case, LocationPath::Split, None);
        let off = run_staged(gpu, case, LocationPath::Split, None, RowStaging::Off).unwrap_or_else(|e| panic!("{label}: {e}"));
        let forced = run_staged(gpu, case, LocationPath::Split, None, RowStaging::On).unwrap_or_else(|e| panic!("{label}: {e}"));
        for other in [&off, &forced] {
            assert!(bits(&on.out) == bits(&other.out), "{label}: out differs between staged and unstaged");
            assert_eq!(on.gate.as_deref().map(bits), other.gate.as_deref().map(bits), "{label}: gate");
        }
    }
}
test_device!(row_staging_changes_no_bits, staging_changes_no_bits);

/// The executor's schedules reorder the threads between sync points; a race-free kernel with
/// fixed-order reductions gives the same bits in each (gate and both mappings included).
#[cfg(feature = "cuda-sim")]
#[test]
fn schedules_agree_bit_for_bit() {
    use bert_adapters::cuda::gpu::SimConfig;
    use bert_adapters::cuda::sim::Schedule;
    let mut rng = StdRng::seed_from_u64(0x5c4e);
    let specs = [BranchSpec::full(48, Activation::Gelu, Scale::Channel, false), BranchSpec::plain(3, Activation::Relu)];
    let case = Case::random(&mut rng, 2, 5, 40, true, PFEIFFER, &specs);
    for path in PATHS {
        for plan in [None, Some(LocationPlan { threads_per_row: 64, rows_per_block: 1 })] {
            // All three, even when CUDA_SIM_SCHEDULE narrows the other tests to one.
            let sims = [Schedule::Forward, Schedule::Reverse, Schedule::Random(0x5eed)].map(|schedule| Gpu::sim(SimConfig { schedule, ..SimConfig::default() }));
            let runs: Vec<Outputs> = sims.iter().map(|gpu| check(gpu, &case, path, plan).0).collect();
            for r in &runs[1..] {
                assert_eq!(bits(&runs[0].out), bits(&r.out), "{path:?} {plan:?}: out differs between schedules");
                assert_eq!(bits(runs[0].gate.as_ref().unwrap()), bits(r.gate.as_ref().unwrap()), "{path:?} {plan:?}: gate differs between schedules");
            }
        }
    }
}

/// The descriptors hold addresses, so a weight updated in place (an optimizer step) is what the
/// next launch reads, without new descriptors.
fn weights_update_in_place(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xd7a);
    let mut case = Case::random(&mut rng, 2, 3, 48, true, HOULSBY, &[BranchSpec { scale: Scale::Learned, ..BranchSpec::plain(3, Activation::Gelu) }]);
    let mut dev = DeviceBranch::upload(gpu, &case.branches[0]);
    // SAFETY: `dev` outlives `descriptors` (declared before it, dropped after) and its buffers
    // are written in place only between launches.
    let descriptors = unsafe { LocationDescriptors::new(gpu, 48, HOULSBY, &[dev.weights()]).unwrap().detach() };
    let (h, r) = (gpu.upload(&data(&case.h)).unwrap(), gpu.upload(&data(&case.r)).unwrap());
    let (gamma, beta) = (gpu.upload(&data(&case.gamma)).unwrap(), gpu.upload(&data(&case.beta)).unwrap());
    let mut out = gpu.upload(&vec![f32::NAN; 2 * 3 * 48]).unwrap();
    for (step, scale, path) in [(0, None, LocationPath::Fused), (1, Some(-3.25f32), LocationPath::Fused), (2, Some(0.75), LocationPath::Split), (3, Some(-1.5), LocationPath::Split)] {
        if let Some(s) = scale {
            gpu.copy_htod(&[s], &mut dev.scaling.as_mut().unwrap().view_mut()).unwrap();
            case.branches[0].scaling = Some(tensor(vec![s], &[1]));
        }
        let inputs = LocationInputs { h: h.view(), r: r.view(), ln_gamma: gamma.view(), ln_beta: beta.view(), ln_eps: BERT_EPS, dropout_seed: None };
        let mut outputs = LocationOutputs { out: out.view_mut(), gate: None };
        adapter_location_forward_on(gpu, &inputs, &descriptors, &mut outputs, case.shape(), path).unwrap();
        assert_close("out", &format!("{} {path:?} step {step}", gpu.describe()), &gpu.download(&out.view()).unwrap(), &case.reference());
    }
}
test_device!(updated_weights_are_read, weights_update_in_place);

// ---- the adapter's own dropout --------------------------------------------------------------------

/// `case` with branch i dropping out with probability `ps[i]` (None: no dropout, as the model
/// passes p = 0) under `seed`, as the `ids[i]`-th child of a Parallel location of `stream`.
fn with_dropout(mut case: Case, ps: &[Option<f32>], seed: u64, stream: u64, ids: &[u64]) -> Case {
    for (i, b) in case.branches.iter_mut().enumerate() {
        b.dropout = ps[i].map(|p| adapter_dropout(p, seed, stream, ids[i]));
    }
    case
}

/// The dropout cases: one branch at p = 0.1 and at p = 0.5, and Parallel locations of mixed
/// branches each with its own p (0 as none and as a spec of p = 0 included), replicated and not,
/// at H = 42 (a Philox block of 4 straddles rows) and H = 40, 48. Shared with the backward.
fn dropout_cases(rng: &mut StdRng) -> Vec<Case> {
    let steps = |r: ResidualBeforeLn, before: bool, after: bool| LocationSteps { residual_before_ln: r, original_ln_before: before, original_ln_after: after };
    let (full, plain) = (BranchSpec::full, BranchSpec::plain);
    vec![
        with_dropout(Case::random(rng, 2, 7, 48, false, PFEIFFER, &[full(6, Activation::Gelu, Scale::Channel, false)]), &[Some(0.1)], 11, 0x15, &[0]),
        with_dropout(
            Case::random(rng, 2, 5, 42, true, HOULSBY, &[BranchSpec { scale: Scale::Learned, ..plain(5, Activation::Relu) }]),
            &[Some(0.5)],
            0xdead_beef_0123,
            0x26,
            &[0],
        ),
        with_dropout(
            Case::random(rng, 2, 3, 40, true, PFEIFFER, &[full(6, Activation::Gelu, Scale::Channel, false), plain(48, Activation::Swish), full(7, Activation::Tanh, Scale::Learned, true)]),
            &[Some(0.1), None, Some(0.5)],
            7,
            0x35,
            &[0, 1, 2],
        ),
        with_dropout(
            Case::random(rng, 2, 3, 42, false, steps(ResidualBeforeLn::False, true, true), &[plain(3, Activation::Relu), BranchSpec { scale: Scale::Fixed(2.5), ln_after: true, ..plain(9, Activation::GeluNew) }]),
            &[Some(0.5), Some(0.0)],
            u64::MAX - 5,
            0xb6,
            &[2, 0],
        ),
    ]
}

/// Forward with the adapter's dropout against the CPU backend (the same Philox masks, so the
/// fp32 bound holds), in the automatic plan and two others (several rows per block, a block per
/// row); the same launch gives the same bits.
fn dropout_matches_cpu(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xd709);
    let mut worst = (0f32, String::new());
    let plans = [None, Some(LocationPlan { threads_per_row: 32, rows_per_block: 3 }), Some(LocationPlan { threads_per_row: 64, rows_per_block: 1 })];
    for case in dropout_cases(&mut rng) {
        for path in PATHS {
            for plan in plans {
                let (a, used) = check(gpu, &case, path, plan);
                let b = run(gpu, &case, path, plan).unwrap();
                assert_eq!(bits(&a.out), bits(&b.out), "{} {path:?}: not deterministic", case.label());
                if used > worst.0 {
                    worst = (used, format!("{path:?} {} {plan:?}", case.label()));
                }
            }
        }
    }
    report_line(&format!("adapter dropout forward (fused and split) on {}: worst max|err|/tol = {:.3} at {}", gpu.describe(), worst.0, worst.1));
}
test_device!(dropout_matches_cpu_reference, dropout_matches_cpu);

/// The mask really drops: with no LayerNorm anywhere, out = dropout(u) + h, so a dropped element
/// is h itself and a kept one h + u/(1 − p), u the output without dropout. The dropped share is
/// p within 0.05 (1024 elements a branch), every kept element is the scaled one, and a branch's
/// mask changes with the seed and with its branch id (its stream).
fn dropout_really_drops(gpu: &Gpu) {
    for path in PATHS {
        dropout_really_drops_on(gpu, path);
    }
}

fn dropout_really_drops_on(gpu: &Gpu, path: LocationPath) {
    let mut rng = StdRng::seed_from_u64(0xd2);
    let bare = LocationSteps { residual_before_ln: ResidualBeforeLn::True, original_ln_before: false, original_ln_after: false };
    let specs = [BranchSpec::plain(8, Activation::Relu), BranchSpec::plain(8, Activation::Relu)];
    let mut base = Case::random(&mut rng, 2, 8, 64, true, bare, &specs);
    base.branches[1] = base.branches[0].clone(); // one adapter twice: only the streams differ
    let h = data(&base.h);
    let n = h.len();
    let out0 = check(gpu, &base, path, None).0.out;
    for p in [0.1f32, 0.5] {
        let scale = (1.0 / (1.0 - p as f64)) as f32;
        let masks = |seed: u64| -> Vec<Vec<bool>> {
            let case = with_dropout(base.clone(), &[Some(p), Some(p)], seed, 0x16, &[0, 1]);
            let out = check(gpu, &case, path, None).0.out;
            let moved = out.iter().zip(&out0).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(moved > 0.5, "p {p}: dropout moves the output by only {moved}");
            (0..2)
                .map(|i| {
                    let (o, o0) = (&out[i * n..(i + 1) * n], &out0[i * n..(i + 1) * n]);
                    let dropped: Vec<bool> = (0..n).map(|j| o[j] == h[j] && o0[j] != h[j]).collect();
                    let share = dropped.iter().filter(|&&d| d).count() as f32 / n as f32;
                    assert!((share - p).abs() <= 0.05, "p {p} seed {seed} branch {i}: {share} of the elements dropped");
                    let u_max = o0.iter().zip(&h).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    for j in (0..n).filter(|&j| !dropped[j]) {
                        let (got, want) = (o[j] - h[j], scale * (o0[j] - h[j]));
                        assert!((got - want).abs() <= 1e-5 * (1.0 + scale * u_max), "p {p} branch {i} [{j}]: kept u = {got}, expected {want}");
                    }
                    dropped
                })
                .collect()
        };
        let (a, b) = (masks(3), masks(4));
        assert_ne!(a[0], a[1], "p {p}: two branches share a mask");
        assert_ne!(a[0], b[0], "p {p}: the mask does not change with the seed");
    }
}
test_device!(dropout_really_drops_and_scales, dropout_really_drops);

// ---- refusals ------------------------------------------------------------------------------------

fn shape_err(r: Result<impl std::fmt::Debug, Error>, want: &str) {
    match r {
        Err(e @ Error::Shape { .. }) => assert!(e.to_string().contains(want), "`{e}` should contain `{want}`"),
        other => panic!("expected a shape error containing `{want}`, got {other:?}"),
    }
}

/// Every descriptor error, before anything is uploaded.
fn descriptor_errors(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(3);
    let (h, m) = (16, 4);
    let host = HostBranch::random(&mut rng, h, BranchSpec::full(m, Activation::Relu, Scale::Channel, false));
    let dev = DeviceBranch::upload(gpu, &host);
    let ok = dev.weights();
    LocationDescriptors::new(gpu, h, PFEIFFER, &[ok]).unwrap();
    let short = gpu.upload(&[0f32; 3]).unwrap();
    let s = short.view();
    let ln = |g| Some(DeviceLayerNorm { gamma: g, beta: ok.ln_after.unwrap().beta, eps: 1e-5 });
    let cases: Vec<(BranchWeights, &str)> = vec![
        (BranchWeights { down_w: s, ..ok }, "branch 0: down weight has 3 elements, expected 64 (bottleneck·H) for H = 16, bottleneck = 4"),
        (BranchWeights { down_b: s, ..ok }, "down bias has 3 elements, expected 4"),
        (BranchWeights { up_w: s, ..ok }, "up weight has 3 elements, expected 64 (H·bottleneck)"),
        (BranchWeights { up_b: s, ..ok }, "up bias has 3 elements, expected 16 (H)"),
        (BranchWeights { ln_before: ln(s), ..ok }, "LayerNorm-before gamma has 3"),
        (BranchWeights { ln_after: ln(s), ..ok }, "LayerNorm-after gamma has 3"),
        (BranchWeights { ln_after: Some(DeviceLayerNorm { beta: s, ..ok.ln_after.unwrap() }), ..ok }, "LayerNorm-after beta has 3"),
        (BranchWeights { ln_before: Some(DeviceLayerNorm { eps: f32::NAN, ..ok.ln_before.unwrap() }), ..ok }, "LayerNorm-before eps must be finite"),
        (BranchWeights { scaling: DeviceScaling::Learned(s), ..ok }, "learned scaling has 3 elements, expected 1"),
        (BranchWeights { scaling: DeviceScaling::Channel(s), ..ok }, "channel scaling has 3 elements, expected 16"),
        (BranchWeights { scaling: DeviceScaling::Fixed(f32::INFINITY), ..ok }, "fixed scaling must be finite"),
        (BranchWeights { gate: Some((s, ok.gate.unwrap().1)), ..ok }, "gate weight has 3 elements, expected 16 ([1, H])"),
        (BranchWeights { gate: Some((ok.gate.unwrap().0, s)), ..ok }, "gate bias has 3 elements, expected 1"),
        (BranchWeights { bottleneck: 0, ..ok }, "bottleneck 0 must be in 1..=4096"),
        (BranchWeights { bottleneck: MAX_BOTTLENECK + 1, ..ok }, "bottleneck 4097"),
    ];
    for (w, want) in cases {
        // As the second branch, so the message names branch 1.
        let want = want.replace("branch 0", "branch 1");
        shape_err(LocationDescriptors::new(gpu, h, PFEIFFER, &[ok, w]), &want);
    }
    shape_err(LocationDescriptors::new(gpu, h, PFEIFFER, &[]), "no branches");
    shape_err(LocationDescriptors::new(gpu, 0, PFEIFFER, &[ok]), "hidden size 0");
    shape_err(LocationDescriptors::new(gpu, h + 1, PFEIFFER, &[ok]), "down weight has 64 elements, expected 68");
    let post_add = LocationSteps { residual_before_ln: ResidualBeforeLn::PostAdd, ..HOULSBY };
    shape_err(LocationDescriptors::new(gpu, h, post_add, &[ok]), "post_add needs original_ln_before");
}
test_device!(descriptor_errors_name_the_operand, descriptor_errors);

/// Every launch-size error, an invalid plan and aliasing outputs; nothing is written.
fn launch_errors(gpu: &Gpu) {
    for path in PATHS {
        launch_errors_on(gpu, path);
    }
}

fn launch_errors_on(gpu: &Gpu, path: LocationPath) {
    let mut rng = StdRng::seed_from_u64(4);
    let (b, t, h, n) = (2, 3, 16, 2);
    let hosts: Vec<HostBranch> = (0..n).map(|i| HostBranch::random(&mut rng, h, BranchSpec { gate: i == 1, ..BranchSpec::plain(4, Activation::Relu) })).collect();
    let devs: Vec<DeviceBranch> = hosts.iter().map(|x| DeviceBranch::upload(gpu, x)).collect();
    let weights: Vec<BranchWeights> = devs.iter().map(DeviceBranch::weights).collect();
    let desc = LocationDescriptors::new(gpu, h, PFEIFFER, &weights).unwrap();
    let one = LocationDescriptors::new(gpu, h, PFEIFFER, &weights[..1]).unwrap();
    let x = gpu.upload(&vec![0.5f32; n * b * t * h]).unwrap();
    let params = gpu.upload(&vec![1f32; h + 1]).unwrap();
    let mut out = gpu.upload(&vec![f32::NAN; n * b * t * h + 1]).unwrap();
    let mut gate = gpu.upload(&vec![f32::NAN; n * b + 1]).unwrap();
    let shape = LocationShape { batch: b, seq_len: t, hidden: h, branches: n, replicate: true };
    let rows_in = b * t * h;
    let inputs = LocationInputs {
        h: x.slice(0..rows_in).unwrap(),
        r: x.slice(rows_in..2 * rows_in).unwrap(),
        ln_gamma: params.slice(0..h).unwrap(),
        ln_beta: params.slice(0..h).unwrap(),
        ln_eps: BERT_EPS,
        dropout_seed: None,
    };
    let n_out = n * b * t * h;
    {
        let mut go = |inputs: &LocationInputs, d: &LocationDescriptors, out_len: usize, gate_len: Option<usize>, shape: LocationShape, plan: Option<LocationPlan>| {
            let mut outputs = LocationOutputs { out: out.slice_mut(0..out_len).unwrap(), gate: gate_len.map(|l| gate.slice_mut(0..l).unwrap()) };
            forward(gpu, inputs, d, &mut outputs, shape, path, plan, RowStaging::Auto)
        };
        let g = Some(n * b);
        shape_err(go(&LocationInputs { h: x.slice(0..rows_in - 1).unwrap(), ..inputs }, &desc, n_out, g, shape, None), "h has 95 elements, expected 96 (B·T·H)");
        shape_err(go(&LocationInputs { r: x.view(), ..inputs }, &desc, n_out, g, shape, None), "r has 192 elements, expected 96");
        shape_err(go(&inputs, &desc, n_out, g, LocationShape { replicate: false, ..shape }, None), "h has 96 elements, expected 192 (N·B·T·H)");
        shape_err(go(&LocationInputs { ln_gamma: params.view(), ..inputs }, &desc, n_out, g, shape, None), "LayerNorm gamma has 17");
        shape_err(go(&LocationInputs { ln_beta: params.slice(0..1).unwrap(), ..inputs }, &desc, n_out, g, shape, None), "LayerNorm beta has 1");
        shape_err(go(&inputs, &desc, n_out + 1, g, shape, None), "out has 193 elements, expected 192 (N·B·T·H)");
        shape_err(go(&inputs, &desc, n_out, None, shape, None), "a branch has a gate, so the [N·B] = [4] gate output is required");
        shape_err(go(&inputs, &desc, n_out, Some(n * b + 1), shape, None), "gate has 5 elements, expected 4 (N·B)");
        shape_err(go(&inputs, &one, n_out, g, shape, None), "2 branches, but there are 1 descriptors");
        shape_err(go(&inputs, &desc, n_out, g, LocationShape { hidden: 8, ..shape }, None), "hidden 8, but the descriptors were built for H = 16");
        shape_err(go(&inputs, &desc, n_out, g, shape, Some(LocationPlan { threads_per_row: 48, rows_per_block: 1 })), "multiple of 32");
        shape_err(go(&inputs, &desc, n_out, g, shape, Some(LocationPlan { threads_per_row: 64, rows_per_block: 2 })), "rows_per_block must be 1");
        let eps = go(&LocationInputs { ln_eps: f32::NAN, ..inputs }, &desc, n_out, g, shape, None);
        assert!(matches!(eps, Err(Error::Input(_))), "{eps:?}");
        // Zero rows: nothing to do, nothing written.
        go(&LocationInputs { h: x.slice(0..0).unwrap(), r: x.slice(0..0).unwrap(), ..inputs }, &desc, 0, None, LocationShape { batch: 0, ..shape }, None).unwrap();
    }
    assert!(gpu.download(&out.view()).unwrap().iter().all(|v| v.is_nan()), "a refused launch wrote out");
    assert!(gpu.download(&gate.view()).unwrap().iter().all(|v| v.is_nan()), "a refused launch wrote the gate");

    // Outputs aliasing inputs or weights (the kernel's pointers are __restrict__).
    // (An input view and an output view of one buffer cannot coexist in safe code, so the outputs
    // alias a weight, through detached descriptors.)
    let mut buf = gpu.upload(&vec![0.25f32; n_out]).unwrap();
    {
        let alias_w = BranchWeights { up_b: buf.slice(0..h).unwrap(), ..weights[0] };
        let aliased = LocationDescriptors::new(gpu, h, PFEIFFER, &[alias_w, weights[1]]).unwrap();
        // SAFETY: `buf` outlives `aliased`, which is only used for the refused launch below.
        let aliased = unsafe { aliased.detach() };
        let mut outputs = LocationOutputs { out: buf.slice_mut(0..n_out).unwrap(), gate: Some(gate.slice_mut(0..n * b).unwrap()) };
        let err = adapter_location_forward_on(gpu, &inputs, &aliased, &mut outputs, shape, path).unwrap_err().to_string();
        assert!(err.contains("out overlaps branch 0 up bias"), "{path:?}: {err}");
        let mut outputs = LocationOutputs { out: out.slice_mut(0..n_out).unwrap(), gate: Some(buf.slice_mut(0..n * b).unwrap()) };
        let err = adapter_location_forward_on(gpu, &inputs, &aliased, &mut outputs, shape, path).unwrap_err().to_string();
        assert!(err.contains("gate output overlaps branch 0 up bias"), "{path:?}: {err}");
    }
    assert!(gpu.download(&out.view()).unwrap().iter().all(|v| v.is_nan()), "a refused launch wrote out");
}
test_device!(launch_errors_name_the_operand, launch_errors);

/// A branch with dropout needs a seed (`Error::Input`, nothing written), a seed buffer holds two
/// words, and p must be in [0, 1) (refused when the descriptors are built).
fn dropout_errors(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(6);
    let case = with_dropout(Case::random(&mut rng, 1, 2, 16, true, PFEIFFER, &[BranchSpec::plain(2, Activation::Relu)]), &[Some(0.25)], 9, 0x15, &[0]);
    let dev = DeviceBranch::upload(gpu, &case.branches[0]);
    let desc = LocationDescriptors::new(gpu, 16, PFEIFFER, &[dev.weights()]).unwrap();
    for p in [1.0, -0.1, f32::NAN] {
        let w = BranchWeights { dropout: Some(BranchDropout { p, stream: 0, offset: 0 }), ..dev.weights() };
        let err = LocationDescriptors::new(gpu, 16, PFEIFFER, &[dev.weights(), w]).unwrap_err();
        assert!(matches!(err, Error::Input(_)) && err.to_string().contains("branch 1: adapter dropout"), "p {p}: {err}");
    }
    let (h, r) = (gpu.upload(&data(&case.h)).unwrap(), gpu.upload(&data(&case.r)).unwrap());
    let (gamma, beta) = (gpu.upload(&data(&case.gamma)).unwrap(), gpu.upload(&data(&case.beta)).unwrap());
    let seed3 = gpu.upload(&[1u32, 2, 3]).unwrap();
    let mut out = gpu.upload(&[f32::NAN; 2 * 16]).unwrap();
    {
        let inputs = LocationInputs { h: h.view(), r: r.view(), ln_gamma: gamma.view(), ln_beta: beta.view(), ln_eps: BERT_EPS, dropout_seed: None };
        let mut outputs = LocationOutputs { out: out.view_mut(), gate: None };
        for path in PATHS {
            let err = adapter_location_forward_on(gpu, &inputs, &desc, &mut outputs, case.shape(), path).unwrap_err();
            assert!(matches!(err, Error::Input(_)) && err.to_string().contains("branch 0 has adapter dropout, but no dropout seed was given"), "{path:?}: {err}");
            let inputs = LocationInputs { dropout_seed: Some(DropoutSeed { buffer: Some(seed3.view()), seed: 0 }), ..inputs };
            shape_err(adapter_location_forward_on(gpu, &inputs, &desc, &mut outputs, case.shape(), path), "the dropout seed buffer has 3 elements, expected 2");
        }
    }
    assert!(gpu.download(&out.view()).unwrap().iter().all(|v| v.is_nan()), "a refused launch wrote out");
}
test_device!(dropout_errors_are_named, dropout_errors);

#[test]
fn the_sweep_covers_what_it_claims() {
    let cases = sweep_cases(&mut StdRng::seed_from_u64(0xada9_7e55));
    let mut seen = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new(), std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
    let (mut acts, mut scales, mut mixed, mut reps) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new(), 0, [0, 0]);
    for c in &cases {
        seen.0.insert((c.hidden, c.branches[0].spec.m));
        seen.1.insert((c.hidden, c.seq_len));
        seen.2.insert((c.hidden, c.branches.len()));
        seen.3.insert((c.branches[0].spec.m, c.seq_len));
        reps[c.replicate as usize] += 1;
        for b in &c.branches {
            acts.insert(format!("{:?}", b.spec.act));
            scales.insert(format!("{:?}", b.spec.scale).chars().take(4).collect::<String>());
        }
        let ln_after: std::collections::BTreeSet<bool> = c.branches.iter().map(|b| b.spec.ln_after).collect();
        mixed += (ln_after.len() > 1) as usize;
    }
    assert_eq!((seen.0.len(), seen.1.len(), seen.2.len(), seen.3.len()), (9, 9, 9, 9));
    assert_eq!(acts.len(), 6, "{acts:?}");
    assert_eq!(scales.len(), 3, "{scales:?}");
    assert!(mixed >= 3 && reps[0] >= 3 && reps[1] >= 3, "mixed {mixed}, replicate {reps:?}");
    assert!(cases.iter().any(|c| c.branches.iter().any(|b| b.spec.gate)));
    // The executor runs every case; keep that cheap (a thread per CUDA thread).
    assert!(cases.iter().all(|c| c.batch * c.seq_len * c.branches.len() <= 200));
}
