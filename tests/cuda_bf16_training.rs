//! bf16 training on the CUDA backend (`CudaBackend::with_activations(DType::BF16)` over a base
//! loaded in bf16; adapter and head weights, their gradients and AdamW state f32) under the bf16
//! rule of docs/STYLE.md (tests/support/bf16.rs): against the CPU reference's f32 training on the
//! same bf16-rounded base, the CUDA bf16 error is at most twice that of a plain bf16 model
//! (tests/support/plain_bf16.rs: the CPU reference with every forward op's output and every
//! activation gradient rounded to bf16, parameter gradients f32, as autocast with f32 master
//! weights computes), plus the rule's floor.
//!
//! - `gradients_meet_the_bf16_rule`: one `classification_step` (forward with the tape, both
//!   heads' cross-entropy, heads' and encoder's backward) under Parallel(scorenn, tasknn) with
//!   scorenn `houlsby+inv` (its NICE block trains when scorenn does) and tasknn `houlsby`, each
//!   trained in turn, with dropout off and on (the encoder's, the heads' and the adapters' own):
//!   the loss and the gradients meet the rule, and the gradients are not the f32 ones (the mode
//!   is on). The rule is taken over all gradient elements at once (`assert_pooled_rule`: a
//!   3-element bias gradient's max error is one rounding's luck).
//! - `training_steps_meet_the_bf16_rule`: 8 alternating `train_step`s of Parallel(scorenn:
//!   `pfeiffer+inv`, tasknn: `pfeiffer`), adapter dropout 0.1, with dropout, AdamW and
//!   clipping: the loss curve and, after the steps, the adapter and head parameters meet the
//!   rule (pooled likewise).
//!
//! The same two tests run in f16 (`with_activations(DType::F16)` over an f16 base, against the
//! plain f16 model), loss-scaled by 2^10 as `train --precision f16` runs (the gradients with scorenn
//! a plain `houlsby`: see `gradients_meet_the_f16_rule` for why); and
//! `an_overflowing_f16_step_updates_nothing_and_leaves_no_trace`: at a scale of 2^127 the f16
//! activation gradients overflow, the step reports a finite loss and a non-finite gradient norm,
//! updates nothing (every parameter bit-identical), and once the optimizer's host count takes the
//! step back (`uncount_skipped_step`) the next step equals a fresh model's first step bit for bit:
//! the skipped step left no trace in AdamW's state.
//!
//! Adapter weights are blown up (×40) so that a wrong gradient cannot hide in the bound. The
//! CUDA backends are cuda-sim (feature `cuda-sim`) on both adapter-location paths, and GPU 0
//! when there is one.

mod common;

#[path = "support/bf16.rs"]
mod bf16_rule;
#[path = "support/plain_bf16.rs"]
mod plain_bf16;

use std::collections::BTreeMap;
use std::sync::Arc;

use bert_adapters::cuda::adapter::SplitForward;
use bert_adapters::cuda::attention_gemm::AttentionPath;
use bert_adapters::cuda::backend::{CudaBackend, LinearEpilogue};
use bert_adapters::model::heads::HeadConfig;
use bert_adapters::model::step::TrainStepConfig;
use bert_adapters::train::loss::Objective;
use bert_adapters::train::{AdamW, AdamWConfig};
use bert_adapters::{AdapterConfig, Backend, BertModel, CpuBackend, DType, Device, InputBatch, LoadOptions};
use bf16_rule::max_abs_diff;
use common::{fixtures, setup};
use plain_bf16::PlainBf16;

/// The CUDA backends in `half` (bf16 or f16) activation mode: cuda-sim on both adapter-location
/// paths (its own choice is the fused kernel, whose backward widens to f32; the split path's
/// backward has 16-bit row kernels, a GPU's default; that backend also runs the GEMM attention
/// path, a GPU's default), and GPU 0 when there is one.
fn half_backends(half: DType) -> Vec<Arc<dyn Backend>> {
    let mut v: Vec<CudaBackend> = Vec::new();
    #[cfg(feature = "cuda-sim")]
    {
        v.push(CudaBackend::open(Device::CudaSim).expect("the cuda-sim executor opens"));
        // A GPU's automatic paths: split locations and GEMM attention (bf16 GEMM inputs).
        let split = CudaBackend::open(Device::CudaSim).expect("the cuda-sim executor opens").with_location_path(bert_adapters::cuda::adapter::LocationPath::Split);
        v.push(split.with_attention_path(AttentionPath::Gemm));
        // And with PyTorch's arithmetic where we offer it: cuBLASLt adding the Linears' biases
        // (the sim's executor rounds once, so this checks the wiring: the activations and
        // dropouts as passes of their own), the adapters' forward products on tensor cores
        // (z, a and the weights rounded, SplitForward::TensorCores), and the attention forward
        // and backward on tensor cores (AttentionPath::TensorCores; the tiny BERT's d = 16 takes
        // them).
        let lt = CudaBackend::open(Device::CudaSim).expect("the cuda-sim executor opens").with_location_path(bert_adapters::cuda::adapter::LocationPath::Split);
        v.push(lt.with_attention_path(AttentionPath::TensorCores).with_linear_epilogue(LinearEpilogue::Cublaslt).with_split_forward(SplitForward::TensorCores));
    }
    match bert_adapters::cuda::probe::probe_gpu(0) {
        Ok(_) => {
            v.push(CudaBackend::open(Device::Cuda(0)).unwrap_or_else(|e| panic!("a GPU was probed but its backend fails: {e}")));
            // cuBLASLt's own 16-bit epilogues, which round before the bias on sm_90, and every
            // tensor-core kernel (the adapters' split forward and recompute, the attention forward
            // and backward).
            let gpu = CudaBackend::open(Device::Cuda(0)).unwrap_or_else(|e| panic!("a GPU was probed but its backend fails: {e}"));
            v.push(gpu.with_linear_epilogue(LinearEpilogue::Cublaslt).with_split_forward(SplitForward::TensorCores).with_attention_path(AttentionPath::TensorCores));
        }
        Err(reason) if bert_adapters::cuda::probe::env_flag("REQUIRE_GPU") => panic!("REQUIRE_GPU is set but there is no GPU: {reason}"),
        Err(_) => {}
    }
    if v.is_empty() {
        bert_adapters::cuda::probe::report_skip("cuda_bf16_training", "no GPU", "no CUDA backend (build with --features cuda-sim, or run on a GPU)");
    }
    v.into_iter().map(|be| Arc::new(be.with_activations(half).unwrap()) as Arc<dyn Backend>).collect()
}

/// The tiny BERT with its base in `half`, Parallel(scorenn, tasknn) of these configs, a 3-class
/// head each, adapter weights blown up; the batch and its labels.
fn model(be: Arc<dyn Backend>, half: DType, [score_config, task_config]: [&str; 2], adapter_dropout: f64) -> (BertModel, InputBatch, Vec<usize>) {
    let dir = fixtures().join("tiny_bert");
    let (mut model, _) = BertModel::from_dir(&dir, be.clone(), LoadOptions { dtype: half, ..LoadOptions::default() }).unwrap();
    let batch = InputBatch::from_file(dir.join("inputs.safetensors"), model.config()).unwrap();
    let config = |name: &str| AdapterConfig::named(name).unwrap().with_overrides(&serde_json::json!({ "dropout": adapter_dropout })).unwrap();
    model.add_adapter_seeded("scorenn", config(score_config), 1).unwrap();
    model.add_adapter_seeded("tasknn", config(task_config), 2).unwrap();
    for n in ["scorenn", "tasknn"] {
        model.add_classification_head(n, HeadConfig::classification(3)).unwrap();
    }
    common::blow_up_adapters(&mut model, be.as_ref(), &["scorenn", "tasknn"]);
    model.set_active_adapters(Some(setup(&["scorenn", "tasknn"]))).unwrap();
    let labels: Vec<usize> = (0..batch.batch).map(|i| (i * 2 + 1) % 3).collect();
    (model, batch, labels)
}

/// The bf16 rule over a set of tensors (every gradient of a step, every parameter after the
/// steps) rather than per tensor: a parameter gradient of 3 elements (a head's bias) has a max
/// error that is one rounding's luck, so the rule is taken over all elements at once, each error
/// relative to its own tensor's scale (`max|ref|` of that tensor, as the fp32 parity rule
/// scales): `max relative error ≤ 2·(plain's) + 2⁻¹⁸`. Returns both maxima.
#[track_caller]
fn assert_pooled_rule(label: &str, got: &BTreeMap<String, Vec<f32>>, reference: &BTreeMap<String, Vec<f32>>, plain: &BTreeMap<String, Vec<f32>>) -> (f64, f64) {
    let relative = |set: &BTreeMap<String, Vec<f32>>, key: &str, want: &[f32]| {
        let v = &set[key];
        assert_eq!(v.len(), want.len(), "{label}: {key} has {} elements, the reference {}", v.len(), want.len());
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            panic!("{label}: {key}[{i}] = {}", v[i]);
        }
        let scale = want.iter().fold(0f64, |m, &x| m.max((x as f64).abs())).max(f64::MIN_POSITIVE);
        max_abs_diff(v, want).0 / scale
    };
    let (mut worst, mut worst_key, mut plain_worst) = (0f64, String::new(), 0f64);
    for (key, want) in reference {
        let e = relative(got, key, want);
        if e > worst {
            (worst, worst_key) = (e, key.clone());
        }
        plain_worst = plain_worst.max(relative(plain, key, want));
    }
    let bound = 2.0 * plain_worst + 2f64.powi(-18);
    assert!(worst <= bound, "{label}: relative error {worst:.3e} (in {worst_key}) exceeds 2 x the plain 16-bit model's {plain_worst:.3e} (+ 2^-18)");
    (worst, plain_worst)
}

/// One classification step at `loss_scale`: the loss and every gradient on the host.
fn step(be: &Arc<dyn Backend>, half: DType, loss_scale: f32, score_config: &str, trained: &str, dropout: Option<u64>, adapter_dropout: f64) -> (f32, BTreeMap<String, Vec<f32>>) {
    let (mut m, batch, labels) = model(be.clone(), half, [score_config, "houlsby"], adapter_dropout);
    m.set_loss_scale(loss_scale).unwrap();
    m.train_adapter(&[trained]).unwrap();
    m.set_dropout(dropout);
    let s = m.classification_step(&batch, &labels).unwrap_or_else(|e| panic!("{}: classification_step training {trained}: {e}", be.name()));
    (s.loss, s.grads.iter().map(|(k, g)| (k.clone(), be.to_host(g).unwrap())).collect())
}

#[test]
fn gradients_meet_the_bf16_rule() {
    gradients_meet_the_rule(DType::BF16, 1.0, "houlsby+inv");
}

/// f16 as bf16, loss-scaled by 2^10 (every model alike, the f32 reference unchanged by it), with
/// scorenn a plain `houlsby`: the plain model's NICE is one fused op that rounds only its output,
/// so its G reads the unrounded y1, where ours, like PyTorch, reads the stored (rounded) y1
/// (kernels/nice.cu). In bf16 that costs nothing visible in the pooled rule; in f16, whose other
/// errors are 8x smaller, the gradients that depend on NICE's forward (NICE's own and layer 0's
/// attention-output adapter) came out at 2.5-6x the plain model's per tensor (measured
/// 2026-11-27), so the yardstick, not the pipeline, would decide. Without NICE every f16 case
/// meets the rule at ≤ 0.96x; NICE in f16 is held to the rule by the 8 training steps below
/// (pfeiffer+inv), pooled over the parameters, and its backward op by tests/cuda_bf16_elementwise.rs.
/// (Tried 2026-11-27: a plain model whose G reads the stored y1 equals our NICE forward bit for
/// bit and brings the scorenn case to 1.72x, but tasknn trained below scorenn's NICE then comes
/// out at 3.2x in its layer-0 attention-output adapter, and the 8 steps' plain f16 error drops
/// from 2.83e-2 to 6.6e-3 while ours stays at 2.82e-2: which of two 16-bit trajectories strays
/// further over 8 steps at these blown-up weights is luck, so the yardstick stays as it is.)
#[test]
fn gradients_meet_the_f16_rule() {
    gradients_meet_the_rule(DType::F16, 1024.0, "houlsby");
}

fn gradients_meet_the_rule(half: DType, loss_scale: f32, score_config: &str) {
    let devices = half_backends(half);
    if devices.is_empty() {
        return;
    }
    let reference: Arc<dyn Backend> = Arc::new(CpuBackend::reference());
    let plain: Arc<dyn Backend> = Arc::new(PlainBf16(CpuBackend::reference(), half));
    // Per device: the cases' losses, the f32 reference's and the plain model's (a scalar's error
    // is one rounding's luck, so the rule is taken over all four cases at once).
    let mut losses: BTreeMap<String, [Vec<f32>; 3]> = BTreeMap::new();
    for (dropout, adapter_dropout) in [(None, 0.0), (Some(31), 0.2)] {
        for trained in ["scorenn", "tasknn"] {
            let (ref_loss, ref_grads) = step(&reference, half, loss_scale, score_config, trained, dropout, adapter_dropout);
            let (plain_loss, plain_grads) = step(&plain, half, loss_scale, score_config, trained, dropout, adapter_dropout);
            // The trained adapter's bottleneck modules, its head, and scorenn's NICE block.
            let want_nice = trained == "scorenn" && score_config.ends_with("+inv");
            assert!(ref_grads.keys().any(|k| k.contains("invertible_adapters")) == want_nice, "{trained}: NICE gradients {:?}", ref_grads.keys());
            for be in &devices {
                let label = format!("{} training {trained} (dropout {dropout:?}, adapter dropout {adapter_dropout})", be.name());
                let before = be.gpu().map(|g| g.launch_counts());
                let (loss, grads) = step(be, half, loss_scale, score_config, trained, dropout, adapter_dropout);
                if let (Some(gpu), Some(before)) = (be.gpu(), before) {
                    // The backend that asks for the tensor-core attention runs its forward and its
                    // backward's two kernels (with the probability dropout in training): two
                    // layers' forwards and at least one layer's backward.
                    let (counts, kind) = (gpu.launch_counts().since(&before), if dropout.is_some() { "_dropout" } else { "" });
                    let (fwd, bwd) = (counts.with_prefix(&format!("attention_mma_forward{kind}")), counts.with_prefix(&format!("attention_mma_backward_scores{kind}")));
                    let grads = counts.with_prefix("attention_mma_backward_grads");
                    let asked = be.name().contains("(tensor-core attention)");
                    assert_eq!((fwd >= 2, bwd >= 1, grads == bwd), (asked, asked, true), "{label}: {fwd} tensor-core attention forwards, {bwd} backward scores, {grads} backward products");
                }
                losses.entry(be.name()).or_insert_with(|| [Vec::new(), Vec::new(), Vec::new()]).iter_mut().zip([loss, ref_loss, plain_loss]).for_each(|(v, l)| v.push(l));
                assert_eq!(grads.keys().collect::<Vec<_>>(), ref_grads.keys().collect::<Vec<_>>(), "{label}: gradient keys");
                let (worst, plain_worst) = assert_pooled_rule(&format!("{label}: gradients"), &grads, &ref_grads, &plain_grads);
                // The mode is on: some gradient is further from f32 than the fp32 rule allows.
                // (f16 keeps 3 more bits than bf16: its threshold is 8x lower, rounded down.)
                let on = if half == DType::BF16 { 1e-4 } else { 1e-5 };
                assert!(worst > on, "{label}: every gradient within {worst:.2e} (relative) of f32: is the {half} mode on?");
                bert_adapters::cuda::probe::report_line(&format!("cuda_bf16_training {label}: {} gradients meet the {half} rule; worst relative error {worst:.2e} (plain {half} {plain_worst:.2e})", grads.len()));
            }
        }
    }
    for (name, [got, want, plain]) in losses {
        let one = |v: Vec<f32>| BTreeMap::from([("losses".to_string(), v)]);
        assert_pooled_rule(&format!("{name}: the losses of the four steps"), &one(got), &one(want), &one(plain));
    }
}

#[test]
fn training_steps_meet_the_bf16_rule() {
    training_steps_meet_the_rule(DType::BF16, 1.0);
}

/// f16 trains loss-scaled, as `train --precision f16` does: every model (the f32 reference, whose
/// steps a power of two leaves bit-identical, tests/loss_scaling.rs; the plain f16 model; the
/// device) at the same scale, 2^10.
#[test]
fn training_steps_meet_the_f16_rule() {
    training_steps_meet_the_rule(DType::F16, 1024.0);
}

fn training_steps_meet_the_rule(half: DType, loss_scale: f32) {
    let devices = half_backends(half);
    if devices.is_empty() {
        return;
    }
    const STEPS: usize = 8;
    let run = |be: &Arc<dyn Backend>| -> (Vec<f32>, BTreeMap<String, Vec<f32>>) {
        let (mut m, batch, labels) = model(be.clone(), half, ["pfeiffer+inv", "pfeiffer"], 0.1);
        m.set_loss_scale(loss_scale).unwrap();
        let mut opts: Vec<AdamW> = (0..2).map(|_| AdamW::new(AdamWConfig { lr: 1e-3, ..AdamWConfig::default() }).unwrap()).collect();
        let mut losses = Vec::new();
        for step in 0..STEPS {
            let (trained, i, objective) = match step % 2 {
                0 => ("tasknn", 1, Objective::CrossEntropy),
                _ => ("scorenn", 0, Objective::ScoreMargin { margin: 1.0, ce_weight: 0.1 }),
            };
            m.train_adapter(&[trained]).unwrap();
            m.set_dropout(Some(500 + step as u64));
            let c = TrainStepConfig { objective, trained: trained.into(), max_grad_norm: Some(1.0) };
            let out = m.train_step(&batch, &labels, &c, &mut opts[i]).unwrap_or_else(|e| panic!("{} step {step}: {e}", be.name()));
            losses.push(out.read(be.as_ref()).unwrap().loss);
        }
        let mut params = BTreeMap::new();
        for n in ["scorenn", "tasknn"] {
            for (k, t) in m.adapter(n).unwrap().params().iter().chain(m.head(n).unwrap().params()) {
                params.insert(k.clone(), be.to_host(t).unwrap());
            }
        }
        (losses, params)
    };
    let reference: Arc<dyn Backend> = Arc::new(CpuBackend::reference());
    let plain: Arc<dyn Backend> = Arc::new(PlainBf16(CpuBackend::reference(), half));
    let (ref_losses, ref_params) = run(&reference);
    let (plain_losses, plain_params) = run(&plain);
    for be in &devices {
        let (losses, params) = run(be);
        let curve = |l: &[f32]| BTreeMap::from([("loss".to_string(), l.to_vec())]);
        assert_pooled_rule(&format!("{}: the {STEPS} losses", be.name()), &curve(&losses), &curve(&ref_losses), &curve(&plain_losses));
        let (worst, plain_worst) = assert_pooled_rule(&format!("{} after {STEPS} steps: the parameters", be.name()), &params, &ref_params, &plain_params);
        assert!(worst > 1e-6, "{}: every parameter within {worst:.2e} (relative) of f32 after {STEPS} steps: is the {half} mode on?", be.name());
        bert_adapters::cuda::probe::report_line(&format!("cuda_bf16_training on {}: {STEPS} steps meet the {half} rule (parameters: relative error {worst:.2e}, plain {half} {plain_worst:.2e}; losses {losses:?}, f32 {ref_losses:?})", be.name()));
    }
}

/// Every adapter and head parameter of the model, as bits, in a fixed order.
fn param_bits(model: &BertModel) -> Vec<(String, Vec<u32>)> {
    let be = model.backend().clone();
    let mut out = Vec::new();
    for n in ["scorenn", "tasknn"] {
        for (key, t) in model.adapter(n).unwrap().params().iter().chain(model.head(n).unwrap().params()) {
            out.push((format!("{n}.{key}"), be.to_host(t).unwrap().iter().map(|v| v.to_bits()).collect()));
        }
    }
    out
}

/// The split path's adapter products run on TF32 in the 16-bit pipelines (the gradient tests above
/// hold them to the bf16 / f16 rule that way) and strict fp32 with f32 activations, unless
/// `BERT_ADAPTERS_ADAPTER_PRODUCTS` says otherwise; and the choice reaches the products: with TF32
/// turned off the same bf16 step's adapter gradients change (on cuda-sim the executor rounds
/// the products' operands to TF32, on a GPU cuBLASLt's TF32 kernels do).
#[test]
#[cfg(feature = "cuda-sim")]
fn adapter_products_are_tf32_in_16_bit_pipelines() {
    use bert_adapters::cuda::adapter::{LocationPath, ADAPTER_PRODUCTS_VAR};
    let open = || CudaBackend::open(Device::CudaSim).expect("the cuda-sim executor opens").with_location_path(LocationPath::Split);
    if std::env::var_os(ADAPTER_PRODUCTS_VAR).is_none() {
        assert!(!open().tf32_adapter_products().unwrap(), "f32 activations: strict fp32 products");
        for half in [DType::BF16, DType::F16] {
            assert!(open().with_activations(half).unwrap().tf32_adapter_products().unwrap(), "{half} activations: TF32 products");
        }
    } else {
        bert_adapters::cuda::probe::report_line(&format!("{ADAPTER_PRODUCTS_VAR} is set: the defaults are not checked"));
    }
    assert!(!open().with_activations(DType::BF16).unwrap().with_tf32_adapter_products(false).tf32_adapter_products().unwrap());
    assert!(open().with_tf32_adapter_products(true).tf32_adapter_products().unwrap());
    // The backend's name says so where the split path runs.
    let named = |tf32: bool| open().with_activations(DType::BF16).unwrap().with_tf32_adapter_products(tf32).name();
    assert!(named(true).contains("(TF32 adapter products)") && !named(false).contains("TF32"), "{} / {}", named(true), named(false));
    let run = |tf32: bool| {
        let be: Arc<dyn Backend> = Arc::new(open().with_activations(DType::BF16).unwrap().with_tf32_adapter_products(tf32));
        step(&be, DType::BF16, 1.0, "houlsby", "tasknn", None, 0.0).1
    };
    let (tf32, strict) = (run(true), run(false));
    let changed: Vec<&String> = strict.keys().filter(|k| k.contains("adapters.tasknn") && tf32[*k] != strict[*k]).collect();
    assert!(!changed.is_empty(), "no tasknn adapter gradient changed with TF32 products: {:?}", strict.keys().collect::<Vec<_>>());
    bert_adapters::cuda::probe::report_line(&format!("TF32 adapter products changed {} of the tasknn gradients", changed.len()));
}

#[test]
fn an_overflowing_f16_step_updates_nothing_and_leaves_no_trace() {
    for be in half_backends(DType::F16) {
        let label = be.name();
        let (mut m, batch, labels) = model(be.clone(), DType::F16, ["pfeiffer+inv", "pfeiffer"], 0.0);
        let (mut fresh, _, _) = model(be.clone(), DType::F16, ["pfeiffer+inv", "pfeiffer"], 0.0);
        let c = TrainStepConfig { objective: Objective::CrossEntropy, trained: "tasknn".into(), max_grad_norm: Some(1.0) };
        let new_opt = || AdamW::new(AdamWConfig { lr: 1e-3, ..AdamWConfig::default() }).unwrap();
        let (mut opt, mut opt_fresh) = (new_opt(), new_opt());
        m.train_adapter(&["tasknn"]).unwrap();
        fresh.train_adapter(&["tasknn"]).unwrap();
        let before = param_bits(&m);

        m.set_loss_scale(2f32.powi(127)).unwrap();
        let out = m.train_step(&batch, &labels, &c, &mut opt).unwrap();
        let v = out.read_unchecked(be.as_ref()).unwrap();
        assert!(v.loss.is_finite() && !v.grad_norm.is_finite(), "{label}: an f16 overflow shows in the gradient norm only: {v:?}");
        assert!(matches!(out.read(be.as_ref()), Err(bert_adapters::Error::NonFinite { .. })), "{label}: a caller without a scaler still gets the error");
        assert_eq!(param_bits(&m), before, "{label}: the overflowing step changed a parameter");
        assert_eq!(opt.steps(), 1);
        opt.uncount_skipped_step();

        m.set_loss_scale(1024.0).unwrap();
        fresh.set_loss_scale(1024.0).unwrap();
        let got = m.train_step(&batch, &labels, &c, &mut opt).unwrap().read(be.as_ref()).unwrap();
        let want = fresh.train_step(&batch, &labels, &c, &mut opt_fresh).unwrap().read(be.as_ref()).unwrap();
        assert_eq!((got.loss.to_bits(), got.grad_norm.to_bits()), (want.loss.to_bits(), want.grad_norm.to_bits()), "{label}: {got:?} vs a first step {want:?}");
        assert_eq!(param_bits(&m), param_bits(&fresh), "{label}: the step after the skipped one is a first step");
        assert_eq!(opt.steps(), opt_fresh.steps());
    }
}
