//! The bf16-activation adapter location (`adapter_location_forward_bf16io` and
//! `adapter_location_gate_bf16io` in kernels/adapter.cu, through `cuda::adapter` with bf16 views):
//! h, r, out and the BERT LayerNorm γ, β in bf16, every adapter weight and the gate means in f32.
//!
//! The bf16 rule (tests/support/bf16.rs): the kernel's output against the CPU reference backend's
//! `adapter_location` (f32 / f64) on the same bf16-rounded h, r, γ, β, with an error at most twice
//! that of a plain bf16 location written here (`Case::plain`), which rounds to bf16 where
//! PyTorch's bf16 ops would: v = h + r, each LayerNorm's output, the down projection
//! (f32 accumulation, bias in the epilogue, one rounding), the activation, the up projection, the
//! scaling, the gate's linear, its sigmoid and its mean, the gated product, each residual add. The
//! adapter weights stay f32 in the plain twin too (f32 master weights, as the kernel reads them),
//! so the plain error counts the activations' roundings only. The gate means, f32 in the kernel,
//! get the same rule against an f64 reference and a plain twin that rounds the gate's steps.
//!
//! Exactness: the bf16io kernel is the f32 kernel's templated body with h and r widened exactly on
//! load and out rounded once on store, so its output equals the `_bf16` kernel's (f32 h, r, out;
//! bf16 γ, β) on the widened inputs, rounded to bf16. On the executor (the same C++ for both,
//! `-ffp-contract=off`) that is asserted bit for bit, out and gate means; on a GPU to within one
//! bf16 ulp (out) and 2 f32 ulps (gate), in case NVRTC contracts the two instantiations apart.
//!
//! Both execution paths ([`LocationPath`]): the fused kernels and the split path (its pre and
//! post kernels are the same templated bodies, the products f32 GEMMs on the widened z), each
//! under the same rule and exactness check.
//!
//! Outputs start as bf16 NaN (uploaded, so on every device), so an unwritten element fails.
//!
//! Coverage (a subset of the cross product, to keep cuda-sim cheap): H ∈ {40, 48, 384} × bottleneck
//! ∈ {1, 3, 48} in a Latin square with T ∈ {1, 7, 33} and N ∈ {1, 2, 3} (9 cases, B = 2, every
//! H meets every bottleneck, T and N once), pfeiffer and houlsby steps and replicate alternating,
//! branch configs cycling plain / LN after + learned or channel or fixed scaling / everything
//! (LN before and after, gate, residual first or not), so N >= 2 mixes configs and bottlenecks in
//! one launch; plus the other location kinds (residual_before_ln False and post_add, which
//! recompute the pre step's x from bf16 h and r; original_ln_after False; a mixed Parallel whose
//! last child has no original LayerNorm after) at H = 48, T = 7; plus a block-per-row plan (block
//! barriers) at H = 384. `sweep_covers_what_it_claims` checks the sweep's coverage.
//!
//! f16 (the `_f16io` kernels against the `_f16` ones, f16 γ, β) runs the same bodies, generic over
//! the 16-bit type `H` ([`Io`]): every "bf16" above reads "H" (its rounding, ulps, plain twin and
//! the rule's floor); each test runs as `<name>::bf16` and `<name>::f16`. The cases are the bf16
//! ones unchanged: h, r ∈ ±2, γ, β and every intermediate of these locations are O(1)..O(10),
//! far inside f16's range (65504) and above its subnormals where it matters (the rule's floor).

use bert_adapters::backend::{BottleneckParams, LocationSteps};
use bert_adapters::config::ResidualBeforeLn;
use bert_adapters::cpu::reference::{activation, linear, residual_layernorm};
use bert_adapters::cuda::adapter::{
    adapter_location_forward_on, adapter_location_forward_split_with_plan, adapter_location_forward_with_plan, BranchWeights, RowStaging,
    LocationDescriptors, LocationInputs, LocationOutputs, LocationPath, LocationPlan, LocationShape, SplitForward,
};
use bert_adapters::cuda::gpu::{ActivationScalar, BaseScalar, Gpu};
use bert_adapters::cuda::probe::report_line;
use bert_adapters::train::dropout::{dropout_range, DropoutRng};
use bert_adapters::{Activation, Backend, CpuBackend, Error};
use half::bf16;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// The adapter's own LayerNorms (support/adapter_location.rs builds them with this eps).
const ADAPTER_EPS: f32 = 1e-5;

#[path = "support/adapter_location.rs"]
#[allow(dead_code)] // each test file uses part of the shared cases
mod cases;
use cases::*;

#[path = "support/bf16.rs"]
mod bf16_rule;
use bf16_rule::{assert_within_twice_plain_in, round_all_in, round_in, to_half, widen_from, test_both, Half, Io};


// ---- cases ---------------------------------------------------------------------------------------

/// One location with its inputs already rounded to `H` (h, r, γ, β); adapter weights f32.
#[derive(Clone)]
struct Case {
    batch: usize,
    seq_len: usize,
    hidden: usize,
    replicate: bool,
    steps: LocationSteps,
    h: Vec<f32>,
    r: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    branches: Vec<HostBranch>,
}

impl Case {
    fn random<H: Half>(rng: &mut StdRng, batch: usize, seq_len: usize, hidden: usize, replicate: bool, steps: LocationSteps, specs: &[BranchSpec]) -> Case {
        let rows = if replicate { batch } else { batch * specs.len() };
        let n = rows * seq_len * hidden;
        Case {
            batch,
            seq_len,
            hidden,
            replicate,
            steps,
            h: round_all_in::<H>(&uniform(rng, n, -2.0, 2.0)),
            r: round_all_in::<H>(&uniform(rng, n, -2.0, 2.0)),
            gamma: round_all_in::<H>(&uniform(rng, hidden, 0.5, 1.5)),
            beta: round_all_in::<H>(&uniform(rng, hidden, -0.5, 0.5)),
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

    /// Rows of one branch, and the row offset of branch `i` in h / r.
    fn block(&self) -> usize {
        self.batch * self.seq_len * self.hidden
    }
    fn at(&self, i: usize) -> usize {
        if self.replicate {
            0
        } else {
            i * self.block()
        }
    }

    /// The f32 reference: the CPU reference backend on the bf16-rounded inputs.
    fn reference(&self) -> Vec<f32> {
        let (h, r) = (host_rows(&self.h, self.seq_len, self.hidden), host_rows(&self.r, self.seq_len, self.hidden));
        let (gamma, beta) = (tensor(self.gamma.clone(), &[self.hidden]), tensor(self.beta.clone(), &[self.hidden]));
        let params: Vec<BottleneckParams> = self.branches.iter().map(HostBranch::params).collect();
        let loc = host_location(&h, &r, &gamma, &beta, self.steps, &params, self.shape());
        CpuBackend::reference().adapter_location(&loc).unwrap_or_else(|e| panic!("{}: CPU reference: {e}", self.label())).into_cpu_vec().unwrap()
    }

    /// `LN(h + r)` for every branch's rows: the location without adapters (f32).
    fn without_adapters(&self) -> Vec<f32> {
        let rows = residual_layernorm(&self.h, Some(&self.r), &self.gamma, &self.beta, self.hidden, BERT_EPS).y;
        if self.replicate {
            rows.iter().copied().cycle().take(rows.len() * self.branches.len()).collect()
        } else {
            rows
        }
    }

    /// The pre step's adapter input x for every row of h (f32 LayerNorm, or h itself).
    fn pre_x<H: Half>(&self, plain: bool) -> Vec<f32> {
        if !self.steps.original_ln_before {
            return self.h.clone();
        }
        let v: Vec<f32> = self.h.iter().zip(&self.r).map(|(a, b)| if plain { round_in::<H>(a + b) } else { a + b }).collect();
        let x = residual_layernorm(&v, None, &self.gamma, &self.beta, self.hidden, BERT_EPS).y;
        if plain {
            round_all_in::<H>(&x)
        } else {
            x
        }
    }

    /// The gate means `[N·B]` (1 for branches without a gate): the mean over an example's rows of
    /// σ(x·w_g + b_g). `plain`: as a plain bf16 model (x, the logit, the sigmoid and the mean each
    /// rounded to bf16); else in f64 from the f32 x, the reference.
    fn gates<H: Half>(&self, plain: bool) -> Vec<f32> {
        let (hd, t, b) = (self.hidden, self.seq_len, self.batch);
        let x = self.pre_x::<H>(plain);
        let mut out = Vec::new();
        for (i, br) in self.branches.iter().enumerate() {
            for e in 0..b {
                let Some((w, bias)) = &br.gate else {
                    out.push(1.0);
                    continue;
                };
                let (w, bias) = (data(w), data(bias)[0]);
                let mut sum = 0f64;
                for row in 0..t {
                    let src = ((if self.replicate { e } else { i * b + e }) * t + row) * hd;
                    let xr = &x[src..src + hd];
                    if plain {
                        let logit = round_in::<H>(linear(xr, &w, Some(&[bias]), 1, hd, 1)[0]);
                        sum += round_in::<H>(activation(&[logit], Activation::Sigmoid)[0]) as f64;
                    } else {
                        let logit: f64 = bias as f64 + (0..hd).map(|c| xr[c] as f64 * w[c] as f64).sum::<f64>();
                        sum += 1.0 / (1.0 + (-logit).exp());
                    }
                }
                let mean = (sum / t as f64) as f32;
                out.push(if plain { round_in::<H>(mean) } else { mean });
            }
        }
        out
    }

    /// The plain bf16 location: the CPU reference's composition (src/cpu/adapter.rs), each op's
    /// output rounded to bf16 as PyTorch's bf16 ops would; products and LayerNorm statistics
    /// accumulate in f64 (the reference's `linear` / `residual_layernorm`) and round once.
    /// `round_weights`: W_d and W_u rounded to `H` too, as PyTorch's autocast rounds a Linear's
    /// weight (what the tensor-core products, [`SplitForward::TensorCores`], multiply).
    fn plain<H: Half>(&self, round_weights: bool) -> Vec<f32> {
        let hd = self.hidden;
        let ln = |x: &[f32], g: &[f32], b: &[f32], eps: f32| round_all_in::<H>(&residual_layernorm(x, None, g, b, hd, eps).y);
        let add = |a: &[f32], b: &[f32]| -> Vec<f32> { a.iter().zip(b).map(|(x, y)| round_in::<H>(x + y)).collect() };
        let v: Vec<f32> = add(&self.h, &self.r);
        let x = self.pre_x::<H>(true);
        let rho: &[f32] = match self.steps.residual_before_ln {
            ResidualBeforeLn::True => &self.h,
            ResidualBeforeLn::False => &x,
            ResidualBeforeLn::PostAdd => &v,
        };
        let gates = self.gates::<H>(true);
        let block = self.block();
        let rows = block / hd;
        let mut out = Vec::with_capacity(self.branches.len() * block);
        for (i, br) in self.branches.iter().enumerate() {
            let at = self.at(i);
            let (xi, rhoi, ri) = (&x[at..at + block], &rho[at..at + block], &self.r[at..at + block]);
            let m = br.spec.m;
            let z0 = match &br.ln_before {
                Some((g, b)) => ln(xi, &data(g), &data(b), ADAPTER_EPS),
                None => xi.to_vec(),
            };
            let weight = |w: &_| if round_weights { round_all_in::<H>(&data(w)) } else { data(w) };
            let pre = round_all_in::<H>(&linear(&z0, &weight(&br.down_w), Some(&data(&br.down_b)), rows, hd, m));
            let act = round_all_in::<H>(&activation(&pre, br.spec.act));
            let up = round_all_in::<H>(&linear(&act, &weight(&br.up_w), Some(&data(&br.up_b)), rows, m, hd));
            let s: Vec<f32> = match (br.spec.scale, &br.scaling) {
                (Scale::Fixed(s), _) => vec![s; hd],
                (Scale::Learned, Some(t)) => vec![data(t)[0]; hd],
                (Scale::Channel, Some(t)) => data(t),
                _ => unreachable!("HostBranch::random makes a scaling tensor for learned and channel"),
            };
            let mut u: Vec<f32> = up.iter().enumerate().map(|(k, &v)| round_in::<H>(v * s[k % hd])).collect();
            if let Some(spec) = &br.dropout {
                // The branch's own dropout over its [B, T, H] block, the CPU's masks, rounded as
                // autocast's dropout output is.
                dropout_range(&mut u, spec.p, &DropoutRng::new(spec.seed), spec.block_stream(0), spec.offset as usize).unwrap();
                u.iter_mut().for_each(|v| *v = round_in::<H>(*v));
            }
            if br.gate.is_some() {
                for (k, v) in u.iter_mut().enumerate() {
                    *v = round_in::<H>(*v * gates[i * self.batch + k / (self.seq_len * hd)]);
                }
            }
            let y = match (&br.ln_after, br.spec.residual_first) {
                (Some((g, b)), true) => ln(&add(&u, rhoi), &data(g), &data(b), ADAPTER_EPS),
                (Some((g, b)), false) => add(&ln(&u, &data(g), &data(b), ADAPTER_EPS), rhoi),
                (None, _) => add(&u, rhoi),
            };
            if self.steps.original_ln_after {
                out.extend(ln(&add(&y, ri), &self.gamma, &self.beta, BERT_EPS));
            } else {
                out.extend(y);
            }
        }
        out
    }
}

// ---- running -------------------------------------------------------------------------------------

struct Outputs {
    out: Vec<f32>,
    gate: Option<Vec<f32>>,
}

const PATHS: [LocationPath; 2] = [LocationPath::Fused, LocationPath::Split];

/// The launcher of `path` with `plan` (None: the automatic one), for either activation type. The
/// automatic plan stages the split kernels' rows in shared memory (they fit); an explicit plan runs
/// them unstaged (`RowStaging::Off`), so both ways meet the same rules.
fn forward<P: BaseScalar, A: ActivationScalar>(gpu: &Gpu, inputs: &LocationInputs<P, A>, d: &LocationDescriptors, outputs: &mut LocationOutputs<A>, shape: LocationShape, path: LocationPath, plan: Option<LocationPlan>) -> Result<(), Error> {
    match (path, plan) {
        (_, None) => adapter_location_forward_on(gpu, inputs, d, outputs, shape, path),
        (LocationPath::Fused, Some(p)) => adapter_location_forward_with_plan(gpu, inputs, d, outputs, shape, p),
        (LocationPath::Split, Some(p)) => adapter_location_forward_split_with_plan(gpu, inputs, d, outputs, shape, p, RowStaging::Off),
    }
}

/// Runs `case` through the launcher with `H` γ, β: with `H` h, r, out (`io`, the `_bf16io` /
/// `_f16io` kernels) or with f32 ones (the `_bf16` / `_f16` kernels, for the exactness check).
/// Outputs start as NaN.
fn run<H: Io>(gpu: &Gpu, case: &Case, io: bool, path: LocationPath, plan: Option<LocationPlan>) -> Result<Outputs, Error> {
    run_with::<H>(gpu, case, io, path, plan, SplitForward::Gemm)
}

/// As [`run`], with the split forward's down projection as `down` says.
fn run_with<H: Io>(gpu: &Gpu, case: &Case, io: bool, path: LocationPath, plan: Option<LocationPlan>, down: SplitForward) -> Result<Outputs, Error> {
    let branches: Vec<DeviceBranch> = case.branches.iter().map(|b| DeviceBranch::upload(gpu, b)).collect();
    let weights: Vec<BranchWeights> = branches.iter().map(DeviceBranch::weights).collect();
    let descriptors = LocationDescriptors::new(gpu, case.hidden, case.steps, &weights)?.with_split_forward(down);
    let (gamma, beta) = (gpu.upload(&to_half::<H>(&case.gamma))?, gpu.upload(&to_half::<H>(&case.beta))?);
    let shape = case.shape();
    let n_out = shape.branches * case.block();
    let mut gate = descriptors.has_gate().then(|| gpu.upload(&vec![f32::NAN; shape.branches * shape.batch])).transpose()?;
    let out = if io {
        let (h, r) = (gpu.upload(&to_half::<H>(&case.h))?, gpu.upload(&to_half::<H>(&case.r))?);
        let mut out = gpu.upload(&vec![H::from_f32(f32::NAN); n_out])?;
        let inputs = LocationInputs { h: h.view(), r: r.view(), ln_gamma: gamma.view(), ln_beta: beta.view(), ln_eps: BERT_EPS, dropout_seed: dropout_seed(&case.branches) };
        let mut outputs = LocationOutputs { out: out.view_mut(), gate: gate.as_mut().map(|g| g.view_mut()) };
        forward(gpu, &inputs, &descriptors, &mut outputs, shape, path, plan)?;
        widen_from::<H>(&gpu.download(&out.view())?)
    } else {
        let (h, r) = (gpu.upload(&case.h)?, gpu.upload(&case.r)?);
        let mut out = gpu.upload(&vec![f32::NAN; n_out])?;
        let inputs = LocationInputs { h: h.view(), r: r.view(), ln_gamma: gamma.view(), ln_beta: beta.view(), ln_eps: BERT_EPS, dropout_seed: dropout_seed(&case.branches) };
        let mut outputs = LocationOutputs { out: out.view_mut(), gate: gate.as_mut().map(|g| g.view_mut()) };
        forward(gpu, &inputs, &descriptors, &mut outputs, shape, path, plan)?;
        gpu.download(&out.view())?
    };
    Ok(Outputs { out, gate: gate.map(|g| gpu.download(&g.view())).transpose()? })
}

/// The distance in `H` ulps between two `H` values (as f32), through their ordered bit patterns.
fn half_ulps<H: Half>(a: f32, b: f32) -> u32 {
    let key = |v: f32| {
        let bits = H::from_f32(v).to_bits() as i32;
        if bits & 0x8000 != 0 {
            0x8000 - bits
        } else {
            bits
        }
    };
    key(a).abs_diff(key(b))
}

/// What one case measured: (out kernel error, out plain error, gate kernel error, gate plain error).
type Errors = (f64, f64, f64, f64);

/// Runs `case` both ways and asserts the `H` rule on out and the gate, and the exactness of the
/// `_*io` output against the f32-activation kernel's output rounded.
fn check<H: Io>(gpu: &Gpu, case: &Case, path: LocationPath, plan: Option<LocationPlan>) -> Errors {
    let label = format!("{} {} {path:?} {}{}", H::NAME, gpu.describe(), case.label(), plan.map(|p| format!(" {p:?}")).unwrap_or_default());
    let got = run::<H>(gpu, case, true, path, plan).unwrap_or_else(|e| panic!("{label}: io: {e}"));
    let wide = run::<H>(gpu, case, false, path, plan).unwrap_or_else(|e| panic!("{label}: f32 activations: {e}"));
    let want = case.reference();
    // The adapters dominate: the output is O(1) away from the location without them, so a wrong
    // adapter step fails the rule by far.
    let moved = want.iter().zip(&case.without_adapters()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(moved > 0.5, "{label}: the adapters move the output by only {moved}");
    let (err, plain_err) = assert_within_twice_plain_in::<H>(&format!("{label}: out"), &got.out, &want, &case.plain::<H>(false));
    // io == round(f32-activation kernel): the same body on the same values, one rounding.
    let exact = gpu.cuda_runtime().is_none(); // the executor
    let (ulps, gate_ulps) = if exact { (0, 0.0) } else { (1, 2.0) };
    assert!(wide.out.iter().all(|v| v.is_finite()), "{label}: the f32-activation kernel left a non-finite element");
    for (i, (&a, &b)) in got.out.iter().zip(&wide.out).enumerate() {
        assert!(half_ulps::<H>(a, b) <= ulps, "{label}: out[{i}] = {a}, but the f32-activation kernel's {b} rounds to {}", round_in::<H>(b));
    }
    let (mut gerr, mut gplain) = (0.0, 0.0);
    match (&got.gate, &wide.gate) {
        (Some(g), Some(w)) => {
            (gerr, gplain) = assert_within_twice_plain_in::<H>(&format!("{label}: gate"), g, &case.gates::<H>(false), &case.gates::<H>(true));
            for (i, (&a, &b)) in g.iter().zip(w).enumerate() {
                assert!((a - b).abs() <= gate_ulps * f32::EPSILON * a.abs().max(b.abs()), "{label}: gate[{i}] = {a}, the f32-activation kernel's {b}");
            }
        }
        (None, None) => assert!(case.branches.iter().all(|b| b.gate.is_none()), "{label}: no gate output for a gated branch"),
        _ => unreachable!("both runs size the gate from the same descriptors"),
    }
    (err, plain_err, gerr, gplain)
}

// ---- the sweep -----------------------------------------------------------------------------------

const ACTS: [Activation; 6] = [Activation::Relu, Activation::Gelu, Activation::GeluNew, Activation::Swish, Activation::Tanh, Activation::Sigmoid];

/// H x bottleneck in a Latin square with T and N (as tests/cuda_adapter.rs's sweep, B = 2).
fn sweep_cases<H: Half>(rng: &mut StdRng) -> Vec<Case> {
    let (hs, ms, ts, ns) = ([40, 48, 384], [1, 3, 48], [1, 7, 33], [1, 2, 3]);
    let scales = [Scale::Fixed(2.5), Scale::Learned, Scale::Channel];
    let mut cases = Vec::new();
    let mut k = 0;
    for (a, &h) in hs.iter().enumerate() {
        for (b, &m) in ms.iter().enumerate() {
            let (t, n) = (ts[(a + b) % 3], ns[(2 * a + b) % 3]);
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
            let steps = if (a + b / 2) % 2 == 0 { PFEIFFER } else { HOULSBY };
            cases.push(Case::random::<H>(rng, 2, t, h, (a + b) % 2 == 0, steps, &specs));
        }
    }
    cases
}

/// One line per body and device: the case where the kernel's error is the largest share of the
/// plain bf16 error (the rule allows 2).
fn report<H: Half>(gpu: &Gpu, what: &str, rows: &[(String, Errors)]) {
    let ratio = |(e, p, _, _): &Errors| e / p.max(1e-30);
    let Some((label, worst)) = rows.iter().max_by(|a, b| ratio(&a.1).total_cmp(&ratio(&b.1))) else {
        return;
    };
    let (e, p, ge, gp) = worst;
    report_line(&format!(
        "{}io adapter {what} on {}: {} cases pass; worst out err {e:.3e} = {:.2} x plain {} {p:.3e} (gate {ge:.3e}, plain {gp:.3e}) at {label}",
        H::NAME,
        gpu.describe(),
        rows.len(),
        ratio(worst),
        H::NAME
    ));
}

fn sweep<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xbf16_ada9);
    let rows: Vec<(String, Errors)> = sweep_cases::<H>(&mut rng).iter().flat_map(|c| PATHS.map(|path| (format!("{path:?} {}", c.label()), check::<H>(gpu, c, path, None)))).collect();
    report::<H>(gpu, "sweep", &rows);
}
test_both!(io_sweep_within_twice_plain, sweep);

/// The other location kinds (the pre step's x recomputed from bf16 h, r for ρ; no post step; a
/// mixed Parallel) at H = 48, T = 7, a block-per-row plan (block barriers) at H = 384, and the
/// automatic plan at H = 768.
fn location_kinds<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x0b16_ca7e);
    let steps = |r: ResidualBeforeLn, before: bool, after: bool| LocationSteps { residual_before_ln: r, original_ln_before: before, original_ln_after: after };
    let full = BranchSpec::full;
    let kinds: Vec<(LocationSteps, Vec<BranchSpec>, bool)> = vec![
        (steps(ResidualBeforeLn::False, true, true), vec![full(4, Activation::Gelu, Scale::Channel, false)], true),
        (steps(ResidualBeforeLn::PostAdd, true, true), vec![full(6, Activation::Swish, Scale::Fixed(0.5), true)], false),
        (steps(ResidualBeforeLn::True, false, false), vec![BranchSpec::plain(48, Activation::Relu)], true),
        (
            steps(ResidualBeforeLn::True, false, false),
            vec![BranchSpec::plain(8, Activation::Swish), full(40, Activation::Sigmoid, Scale::Learned, false), BranchSpec::plain(1, Activation::Relu)],
            false,
        ),
    ];
    let mut rows = Vec::new();
    for (steps, specs, replicate) in kinds {
        let case = Case::random::<H>(&mut rng, 2, 7, 48, replicate, steps, &specs);
        for path in PATHS {
            rows.push((format!("{path:?} {}", case.label()), check::<H>(gpu, &case, path, None)));
        }
    }
    let specs = [full(48, Activation::GeluNew, Scale::Channel, true), BranchSpec::plain(3, Activation::Tanh)];
    let case = Case::random::<H>(&mut rng, 1, 3, 384, false, PFEIFFER, &specs);
    let plan = LocationPlan { threads_per_row: 64, rows_per_block: 1 };
    for path in PATHS {
        rows.push((format!("{path:?} {} {plan:?}", case.label()), check::<H>(gpu, &case, path, Some(plan))));
    }
    // BERT-base's H = 768 with the automatic plan: the split kernels stage 8 rows a block, 48 KB
    // of dynamic shared memory beside their static scratch, which needs an opt-in (on an H100 the
    // driver refused the launch without one; cuda-sim now checks static plus dynamic bytes too).
    let case = Case::random::<H>(&mut rng, 1, 8, 768, false, PFEIFFER, &[full(48, Activation::Relu, Scale::Channel, false)]);
    for path in PATHS {
        rows.push((format!("{path:?} {}", case.label()), check::<H>(gpu, &case, path, None)));
    }
    report::<H>(gpu, "kinds", &rows);
}
test_both!(io_location_kinds_within_twice_plain, location_kinds);

/// The split forward on tensor cores ([`SplitForward::TensorCores`]: `adapter_split_pre_down_*`
/// and `adapter_split_up_post_*`): z, a, W_d and W_u rounded to `H` for the tensor cores, f32
/// accumulation, up + b_u rounded once. The rule against a plain twin that rounds W_d and W_u too
/// (autocast's arithmetic), over the sweep's cases (H = 40 pads the k steps and the last column
/// tile; bottlenecks 1..48 take 8, 4 and 2 k slices of the down product and pad its k steps for
/// the up one; T = 33 makes partial 32-row tiles; N = 3 mixes bottlenecks; gates, scalings, the
/// adapter's LayerNorms), the location kinds above (the pre step's statistics), BERT-base's
/// H = 768, an odd H (45), a bottleneck of 130 (9 tiles of W_d: a warp takes two), and the
/// adapters' dropout (the plain twin applies the CPU's masks). The gate, unchanged by the path, as in `check`.
fn tensor_core_forward<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x3a3a_ada9);
    let (full, plain) = (BranchSpec::full, BranchSpec::plain);
    let mut cases = sweep_cases::<H>(&mut rng);
    let steps = |r: ResidualBeforeLn| LocationSteps { residual_before_ln: r, original_ln_before: true, original_ln_after: true };
    cases.push(Case::random::<H>(&mut rng, 2, 7, 48, true, steps(ResidualBeforeLn::False), &[full(4, Activation::Gelu, Scale::Channel, false)]));
    cases.push(Case::random::<H>(&mut rng, 2, 7, 48, false, steps(ResidualBeforeLn::PostAdd), &[full(6, Activation::Swish, Scale::Fixed(0.5), true), plain(130, Activation::Relu)]));
    cases.push(Case::random::<H>(&mut rng, 1, 40, 768, false, PFEIFFER, &[full(48, Activation::Relu, Scale::Channel, false), plain(48, Activation::Relu)]));
    // An odd H: no 8-byte weight pairs, no 16-byte staging, a part column tile.
    cases.push(Case::random::<H>(&mut rng, 2, 5, 45, false, HOULSBY, &[plain(7, Activation::Gelu), full(20, Activation::Tanh, Scale::Channel, true)]));
    // The adapters' own dropout (the up + post kernel's epilogue: each branch's stream, element
    // local·H + c of its block), a mixed Parallel over two 32-row tiles.
    let mut dropped = Case::random::<H>(&mut rng, 2, 20, 48, true, HOULSBY, &[full(6, Activation::Gelu, Scale::Learned, true), plain(16, Activation::Relu), plain(3, Activation::Swish)]);
    for (i, (b, p)) in dropped.branches.iter_mut().zip([Some(0.5), None, Some(0.1)]).enumerate() {
        b.dropout = p.map(|p| adapter_dropout(p, 0xd7, 0x11, i as u64));
    }
    cases.push(dropped);
    let mut rows = Vec::new();
    for case in &cases {
        let label = format!("{} {} tensor-core forward {}", H::NAME, gpu.describe(), case.label());
        let before = gpu.launch_counts();
        let got = run_with::<H>(gpu, case, true, LocationPath::Split, None, SplitForward::TensorCores).unwrap_or_else(|e| panic!("{label}: {e}"));
        // One pre + down and one up + post launch in place of the pre and post kernels, no GEMM.
        let ran = gpu.launch_counts().since(&before);
        for kernel in [format!("adapter_split_pre_down_{}io", H::NAME), format!("adapter_split_up_post_{}io", H::NAME)] {
            assert_eq!(ran.kernels.get(kernel.as_str()).copied(), Some(1), "{label}: launches {:?}", ran.kernels);
        }
        let gated = case.branches.iter().any(|b| b.gate.is_some());
        assert_eq!(ran.kernels.values().sum::<u64>(), 2 + u64::from(gated), "{label}: launches {:?} (the gate's own when a branch gates)", ran.kernels);
        assert_eq!(ran.gemm_calls, 0, "{label}: GEMM calls");
        let want = case.reference();
        let moved = want.iter().zip(&case.without_adapters()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(moved > 0.5, "{label}: the adapters move the output by only {moved}");
        let (err, plain_err) = assert_within_twice_plain_in::<H>(&format!("{label}: out"), &got.out, &want, &case.plain::<H>(true));
        let (mut gerr, mut gplain) = (0.0, 0.0);
        if let Some(g) = &got.gate {
            (gerr, gplain) = assert_within_twice_plain_in::<H>(&format!("{label}: gate"), g, &case.gates::<H>(false), &case.gates::<H>(true));
        }
        rows.push((case.label(), (err, plain_err, gerr, gplain)));
    }
    report::<H>(gpu, "tensor-core forward", &rows);
}
test_both!(io_tensor_core_forward_within_twice_plain, tensor_core_forward);

/// Where the tensor-core kernels do not apply, [`SplitForward::TensorCores`] is the GEMM path bit
/// for bit, with its launches: f32 activations (the `_bf16` / `_f16` kernels have no tensor-core
/// twin), and a hidden size whose 32-row tiles do not fit a block's shared memory (H = 3000: the
/// pre + down block would need ~385 KB).
fn tensor_cores_fall_back<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xfa11_bac4);
    let small = Case::random::<H>(&mut rng, 2, 3, 48, false, PFEIFFER, &[BranchSpec::plain(8, Activation::Relu)]);
    let wide = Case::random::<H>(&mut rng, 1, 2, 3000, false, PFEIFFER, &[BranchSpec::plain(16, Activation::Relu)]);
    for (case, io) in [(&small, false), (&wide, true)] {
        let label = format!("{} {} {} io {io}", H::NAME, gpu.describe(), case.label());
        let gemm = run_with::<H>(gpu, case, io, LocationPath::Split, None, SplitForward::Gemm).unwrap_or_else(|e| panic!("{label}: {e}"));
        let before = gpu.launch_counts();
        let asked = run_with::<H>(gpu, case, io, LocationPath::Split, None, SplitForward::TensorCores).unwrap_or_else(|e| panic!("{label}: {e}"));
        let ran = gpu.launch_counts().since(&before);
        assert!(!ran.kernels.keys().any(|k| k.starts_with("adapter_split_pre_down") || k.starts_with("adapter_split_up_post")), "{label}: launches {:?}", ran.kernels);
        assert_eq!(ran.gemm_calls, 2 * case.branches.len() as u64, "{label}: GEMM calls");
        assert!(gemm.out.iter().all(|v| v.is_finite()), "{label}: a non-finite output");
        assert_eq!(asked.out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), gemm.out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{label}");
    }
}
test_both!(tensor_cores_fall_back_to_the_gemm_path, tensor_cores_fall_back);

/// The adapter's own dropout in the bf16io kernels (the shared templated body): its output is the
/// `_bf16` kernel's (f32 h, r, out) on the widened inputs, rounded once (bit for bit on the
/// executor, one bf16 ulp on a GPU), and that kernel's output is the CPU reference's with the same
/// masks within the fp32 bound 1e-5·(1 + max|ref|). One branch at p = 0.5 and a mixed Parallel
/// (p = 0.1, none, 0.5), at H = 42 and 48; and the output is not the one without dropout.
fn dropout<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xbf16_d709);
    let (full, plain) = (BranchSpec::full, BranchSpec::plain);
    let cases = [
        (Case::random::<H>(&mut rng, 2, 5, 42, true, HOULSBY, &[BranchSpec { scale: Scale::Learned, ..plain(5, Activation::Relu) }]), vec![Some(0.5)]),
        (
            Case::random::<H>(&mut rng, 2, 3, 48, false, PFEIFFER, &[full(6, Activation::Gelu, Scale::Channel, false), plain(8, Activation::Swish), full(4, Activation::Tanh, Scale::Learned, true)]),
            vec![Some(0.1), None, Some(0.5)],
        ),
    ];
    for ((mut case, ps), path) in cases.into_iter().flat_map(|c| PATHS.map(|p| (c.clone(), p))) {
        let undropped = run::<H>(gpu, &case, true, path, None).unwrap();
        for (i, (b, p)) in case.branches.iter_mut().zip(&ps).enumerate() {
            b.dropout = p.map(|p| adapter_dropout(p, 0xbf, 0x35, i as u64));
        }
        let label = format!("{} {} {path:?} {}", H::NAME, gpu.describe(), case.label());
        let got = run::<H>(gpu, &case, true, path, None).unwrap_or_else(|e| panic!("{label}: io: {e}"));
        let wide = run::<H>(gpu, &case, false, path, None).unwrap_or_else(|e| panic!("{label}: f32 activations: {e}"));
        let ulps = if gpu.cuda_runtime().is_none() { 0 } else { 1 };
        for (i, (&a, &b)) in got.out.iter().zip(&wide.out).enumerate() {
            assert!(half_ulps::<H>(a, b) <= ulps, "{label}: out[{i}] = {a}, but the f32-activation kernel's {b} rounds to {}", round_in::<H>(b));
        }
        let want = case.reference();
        let tol = 1e-5 * (1.0 + want.iter().fold(0f32, |m, v| m.max(v.abs())));
        for (i, (&a, &b)) in wide.out.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= tol, "{label}: f32-activation out[{i}] = {a}, CPU {b}, tol {tol:e}");
        }
        let moved = got.out.iter().zip(&undropped.out).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(moved > 0.5, "{label}: dropout moves the output by only {moved}");
    }
}
test_both!(io_dropout_is_the_f32_kernels_rounded, dropout);

/// bf16 activations with an f32 BERT LayerNorm have no kernel: `Error::Unsupported`, nothing
/// written (no gate launch either).
fn f32_layernorm_with_half_activations_is_unsupported<H: Io>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0xbad);
    let case = Case::random::<H>(&mut rng, 1, 2, 40, true, PFEIFFER, &[BranchSpec::full(3, Activation::Relu, Scale::Learned, false)]);
    let branch = DeviceBranch::upload(gpu, &case.branches[0]);
    let descriptors = LocationDescriptors::new(gpu, case.hidden, case.steps, &[branch.weights()]).unwrap();
    let (h, r) = (gpu.upload(&to_half::<H>(&case.h)).unwrap(), gpu.upload(&to_half::<H>(&case.r)).unwrap());
    let (gamma, beta) = (gpu.upload(&case.gamma).unwrap(), gpu.upload(&case.beta).unwrap());
    let mut out = gpu.upload(&vec![H::from_f32(f32::NAN); case.block()]).unwrap();
    let mut gate = gpu.upload(&[f32::NAN]).unwrap();
    {
        let inputs = LocationInputs { h: h.view(), r: r.view(), ln_gamma: gamma.view(), ln_beta: beta.view(), ln_eps: BERT_EPS, dropout_seed: None };
        let mut outputs = LocationOutputs { out: out.view_mut(), gate: Some(gate.view_mut()) };
        for path in PATHS {
            let err = adapter_location_forward_on(gpu, &inputs, &descriptors, &mut outputs, case.shape(), path).unwrap_err();
            assert!(matches!(err, Error::Unsupported(_)), "{path:?}: {err}");
            let msg = err.to_string();
            assert!(msg.contains(&format!("in {:?} with the BERT LayerNorm in F32", <H as ActivationScalar>::DTYPE)), "{path:?}: {msg}");
        }
    }
    assert!(gpu.download(&out.view()).unwrap().iter().all(|v| v.to_f32().is_nan()), "a refused launch wrote out");
    assert!(gpu.download(&gate.view()).unwrap()[0].is_nan(), "a refused launch wrote the gate");
}
test_both!(half_activations_need_a_layernorm_of_their_type, f32_layernorm_with_half_activations_is_unsupported);

#[test]
fn sweep_covers_what_it_claims() {
    let cases = sweep_cases::<bf16>(&mut StdRng::seed_from_u64(0xbf16_ada9));
    let set = |f: &dyn Fn(&Case) -> (usize, usize)| cases.iter().map(f).collect::<std::collections::BTreeSet<_>>().len();
    assert_eq!(set(&|c| (c.hidden, c.branches[0].spec.m)), 9);
    assert_eq!(set(&|c| (c.hidden, c.seq_len)), 9);
    assert_eq!(set(&|c| (c.hidden, c.branches.len())), 9);
    assert_eq!(set(&|c| (c.branches[0].spec.m, c.seq_len)), 9);
    let specs: Vec<BranchSpec> = cases.iter().flat_map(|c| c.branches.iter().map(|b| b.spec)).collect();
    let scales: std::collections::BTreeSet<String> = specs.iter().map(|s| format!("{:?}", s.scale).chars().take(4).collect()).collect();
    assert_eq!(scales.len(), 3, "{scales:?}");
    for (what, has) in [
        ("ln_before", specs.iter().any(|s| s.ln_before)),
        ("ln_after", specs.iter().any(|s| s.ln_after)),
        ("gate", specs.iter().any(|s| s.gate)),
        ("residual_first", specs.iter().any(|s| s.ln_after && s.residual_first)),
        ("residual last", specs.iter().any(|s| s.ln_after && !s.residual_first)),
        ("a plain branch", specs.iter().any(|s| !s.ln_before && !s.ln_after && !s.gate)),
    ] {
        assert!(has, "no branch with {what}");
    }
    let kind = |c: &Case| (c.steps.original_ln_before, c.replicate);
    assert_eq!(cases.iter().map(kind).collect::<std::collections::BTreeSet<_>>().len(), 4, "pfeiffer / houlsby x replicate");
    assert!(cases.iter().filter(|c| c.branches.iter().map(|b| b.spec.ln_after).collect::<std::collections::BTreeSet<_>>().len() > 1).count() >= 2, "mixed configs");
    // The executor runs every case twice (bf16io and f32 activations) in three schedules.
    assert!(cases.iter().all(|c| c.batch * c.seq_len * c.branches.len() <= 200));
}
