//! The eval forward in bf16 end to end on the CUDA backend (`CudaBackend::with_activations(
//! DType::BF16)` over a base loaded in bf16): the whole model under the bf16 rule
//! (tests/support/bf16.rs). Reference: the CPU reference backend's f32 forward on the same
//! bf16-rounded base, adapter weights in f32. Plain bf16: the same model on
//! tests/support/plain_bf16.rs, the CPU reference with every forward op's output rounded to bf16.
//! The CUDA bf16 forward's error must be at most twice the plain one (plus the rule's floor), for
//! `last_hidden_state` and `pooler_output`, on the tiny BERT (and its gelu_new twin, whose FFN
//! takes the GEMM's GELU epilogue) without adapters, with every single-adapter fixture and every
//! Parallel fixture (both orders, a `+inv` first child, mixed configs, three-way), and on MiniLM
//! when scripts/fetch-model.sh has fetched it. Each case also asserts that the mode is on: every
//! output tensor is bf16, and its values differ from the f32 reference by far more than the fp32
//! tolerance. `assert_within_twice_plain` asserts every element finite.
//!
//! A classification head on the bf16 output runs in f32 on its widened input (src/model/heads.rs):
//! its logits are f32 and meet the same rule against the plain model's head. Training in bf16 is
//! tests/cuda_bf16_training.rs; mismatched dtypes are refused by name (`bf16_operands_are_checked`).
//!
//! The CUDA backends are the `cuda-sim` executor (feature `cuda-sim`) and GPU 0 when there is one.

mod common;

#[path = "support/bf16.rs"]
mod bf16_rule;
#[path = "support/plain_bf16.rs"]
mod plain_bf16;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bert_adapters::config::HeadConfig;
use bert_adapters::cuda::backend::CudaBackend;
use bert_adapters::io::TensorFile;
use bert_adapters::{Backend, BertModel, CpuBackend, DType, Device, Error, InputBatch, LoadOptions};
use bf16_rule::{assert_within_twice_plain, max_abs_diff, round};
use common::{fixtures, setup, SINGLE_ADAPTERS};
use plain_bf16::PlainBf16;

fn bf16_base() -> LoadOptions {
    LoadOptions { dtype: DType::BF16, ..LoadOptions::default() }
}

/// The CUDA backends in bf16 activation mode: cuda-sim, and GPU 0 when there is one.
fn bf16_backends() -> Vec<Arc<dyn Backend>> {
    let mut v: Vec<CudaBackend> = Vec::new();
    #[cfg(feature = "cuda-sim")]
    v.push(CudaBackend::open(Device::CudaSim).expect("the cuda-sim executor opens"));
    match bert_adapters::cuda::probe::probe_gpu(0) {
        Ok(_) => v.push(CudaBackend::open(Device::Cuda(0)).unwrap_or_else(|e| panic!("a GPU was probed but its backend fails: {e}"))),
        Err(reason) if bert_adapters::cuda::probe::env_flag("REQUIRE_GPU") => panic!("REQUIRE_GPU is set but there is no GPU: {reason}"),
        Err(_) => {}
    }
    if v.is_empty() {
        bert_adapters::cuda::probe::report_skip("cuda_bf16_model", "no GPU", "no CUDA backend (build with --features cuda-sim, or run on a GPU)");
    }
    v.into_iter().map(|be| Arc::new(be.with_activations(DType::BF16).unwrap()) as Arc<dyn Backend>).collect()
}

/// A base model folder and where its batch comes from.
#[derive(Clone)]
struct Base {
    dir: PathBuf,
    /// The fixture's `inputs.safetensors` (the tiny BERTs), else MiniLM's expected-output file.
    minilm: bool,
}

impl Base {
    fn tiny(name: &str) -> Base {
        Base { dir: fixtures().join(name), minilm: false }
    }

    /// The model on `backend` with its base in bf16, and the batch.
    fn load(&self, backend: Arc<dyn Backend>) -> (BertModel, InputBatch) {
        let (model, _) = BertModel::from_dir(&self.dir, backend, bf16_base()).unwrap();
        let batch = if self.minilm {
            let inputs = TensorFile::open(fixtures().join("minilm/expected.safetensors")).unwrap();
            let (ids, shape) = inputs.read_i64("input_ids").unwrap();
            let (mask, _) = inputs.read_i64("attention_mask").unwrap();
            let (types, _) = inputs.read_i64("token_type_ids").unwrap();
            InputBatch::new(Path::new("minilm"), &shape, &ids, Some((&mask, &shape)), Some((&types, &shape)), model.config()).unwrap()
        } else {
            InputBatch::from_file(self.dir.join("inputs.safetensors"), model.config()).unwrap()
        };
        (model, batch)
    }
}

/// What one forward produced, on the host, and the dtypes of its tensors.
struct Outputs {
    last: Vec<f32>,
    pooler: Option<Vec<f32>>,
    /// last_hidden_state, pooler_output, then every hidden state.
    dtypes: Vec<DType>,
}

fn forward(backend: Arc<dyn Backend>, base: &Base, dirs: &[PathBuf], names: &[&str]) -> Outputs {
    let be = backend.clone();
    let (mut model, batch) = base.load(backend);
    for d in dirs {
        model.load_adapter(d).unwrap();
    }
    if !names.is_empty() {
        model.set_active_adapters(Some(setup(names))).unwrap();
    }
    let out = model.forward(&batch).unwrap_or_else(|e| panic!("{} forward: {e}", be.name()));
    let mut dtypes = vec![out.last_hidden_state.dtype()];
    dtypes.extend(out.pooler_output.as_ref().map(|p| p.dtype()));
    dtypes.extend(out.hidden_states.iter().map(|h| h.dtype()));
    Outputs { last: be.to_host(&out.last_hidden_state).unwrap(), pooler: out.pooler_output.as_ref().map(|p| be.to_host(p).unwrap()), dtypes }
}

/// The bf16 output against the f32 reference: not the f32 answer (the mode is on), and every
/// value a bf16 (the storage is).
#[track_caller]
fn assert_really_bf16(label: &str, got: &[f32], reference: &[f32]) {
    let max_ref = reference.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
    let (diff, _) = max_abs_diff(got, reference);
    let fp32_bound = 1e-5 * (1.0 + max_ref);
    assert!(diff > 10.0 * fp32_bound, "{label}: the bf16 output is within {diff:.3e} of the f32 one (fp32 bound {fp32_bound:.3e}): is the bf16 mode on?");
    if let Some(i) = got.iter().position(|&v| round(v) != v) {
        panic!("{label}: element {i} = {} is not a bf16 value", got[i]);
    }
}

/// One case: the f32 reference, the plain bf16 model and each CUDA bf16 backend. Returns
/// `(label, kernel error, plain error)` for every output checked.
fn case(base: &Base, dirs: &[&str], names: &[&str]) -> Vec<(String, f64, f64)> {
    let dirs: Vec<PathBuf> = dirs.iter().map(|d| fixtures().join("adapters").join(d)).collect();
    let model_name = base.dir.file_name().unwrap().to_string_lossy().to_string();
    let reference = forward(Arc::new(CpuBackend::reference()), base, &dirs, names);
    let plain = forward(Arc::new(PlainBf16::new()), base, &dirs, names);
    let mut measured = Vec::new();
    for be in bf16_backends() {
        let got = forward(be.clone(), base, &dirs, names);
        let label = format!("{model_name} {names:?} on {}", be.name());
        assert!(got.dtypes.iter().all(|&d| d == DType::BF16), "{label}: output dtypes {:?}, expected bf16 throughout", got.dtypes);
        let (e, p) = assert_within_twice_plain(&format!("{label} last_hidden_state"), &got.last, &reference.last, &plain.last);
        assert_really_bf16(&format!("{label} last_hidden_state"), &got.last, &reference.last);
        measured.push((format!("{label} last_hidden_state"), e, p));
        match (&got.pooler, &reference.pooler, &plain.pooler) {
            (Some(g), Some(r), Some(pl)) => {
                let (e, p) = assert_within_twice_plain(&format!("{label} pooler_output"), g, r, pl);
                assert_really_bf16(&format!("{label} pooler_output"), g, r);
                measured.push((format!("{label} pooler_output"), e, p));
            }
            (None, None, None) => {}
            _ => panic!("{label}: the pooler output is present in some runs only"),
        }
    }
    measured
}

fn report(what: &str, measured: &[(String, f64, f64)]) {
    for (label, e, p) in measured {
        eprintln!("{label}: bf16 kernels {e:.3e}, plain bf16 {p:.3e} ({:.2} x plain)", e / p);
    }
    if let Some((label, e, p)) = measured.iter().max_by(|a, b| (a.1 / a.2).total_cmp(&(b.1 / b.2))) {
        eprintln!("{what}: {} outputs within 2 x plain bf16; worst {:.2} x ({e:.3e} vs {p:.3e}) at {label}", measured.len(), e / p);
    }
}

#[test]
fn base_models_within_twice_plain_bf16() {
    let mut measured = case(&Base::tiny("tiny_bert"), &[], &[]);
    measured.extend(case(&Base::tiny("tiny_bert_gelu_new"), &[], &[]));
    report("base models", &measured);
}

#[test]
fn every_single_adapter_within_twice_plain_bf16() {
    let mut measured = Vec::new();
    for name in SINGLE_ADAPTERS.iter().chain(&["pfeiffer_b"]) {
        measured.extend(case(&Base::tiny("tiny_bert"), &[name], &[name]));
    }
    report("single adapters", &measured);
}

#[test]
fn parallel_in_both_orders_within_twice_plain_bf16() {
    let mut measured = Vec::new();
    for names in [
        &["pfeiffer_inv", "pfeiffer"][..],
        &["pfeiffer", "pfeiffer_inv"],
        &["houlsby_inv", "houlsby"],
        &["houlsby", "houlsby_inv"],
        &["pfeiffer", "pfeiffer_inv", "pfeiffer_b"],
        &["pfeiffer", "opt_residual_before_ln_false"],
        &["opt_residual_before_ln_false", "pfeiffer"],
        &["houlsby", "opt_original_ln_after_false"],
        &["opt_original_ln_after_false", "houlsby"],
    ] {
        measured.extend(case(&Base::tiny("tiny_bert"), names, names));
    }
    report("Parallel", &measured);
}

#[test]
fn minilm_within_twice_plain_bf16() {
    let Some(dir) = common::minilm() else { return };
    let base = Base { dir, minilm: true };
    let mut measured = case(&base, &[], &[]);
    for (dirs, names) in [(&["minilm_houlsby"][..], &["houlsby"][..]), (&["minilm_scorenn", "minilm_tasknn"], &["scorenn", "tasknn"])] {
        measured.extend(case(&base, dirs, names));
    }
    report("MiniLM", &measured);
}

/// Heads on the bf16 output run in f32 on the widened first token or pooler output: f32 logits,
/// within the rule against the plain model's (bf16) head.
#[test]
fn heads_on_bf16_outputs_run_in_f32() {
    let base = Base::tiny("tiny_bert");
    let dir = fixtures().join("adapters/pfeiffer");
    let logits = |backend: Arc<dyn Backend>, use_pooler: bool| -> (Vec<f32>, DType) {
        let be = backend.clone();
        let (mut model, batch) = base.load(backend);
        let name = model.load_adapter(&dir).unwrap();
        model.add_classification_head(&name, HeadConfig { use_pooler, ..HeadConfig::classification(3) }).unwrap();
        model.set_active_adapters(Some(setup(&[&name]))).unwrap();
        let out = model.forward(&batch).unwrap();
        let branches = model.head_logits(&out).unwrap();
        let l = &branches[0].logits;
        (be.to_host(l).unwrap(), l.dtype())
    };
    for use_pooler in [false, true] {
        let (reference, _) = logits(Arc::new(CpuBackend::reference()), use_pooler);
        let (plain, _) = logits(Arc::new(PlainBf16::new()), use_pooler);
        for be in bf16_backends() {
            let label = format!("head (use_pooler {use_pooler}) on {}", be.name());
            let (got, dtype) = logits(be, use_pooler);
            assert_eq!(dtype, DType::F32, "{label}: the head's logits");
            let (e, p) = assert_within_twice_plain(&format!("{label} logits"), &got, &reference, &plain);
            eprintln!("{label}: logits {e:.3e}, plain bf16 {p:.3e}");
        }
    }
}

/// The bf16 mode trains (tests/cuda_bf16_training.rs holds it to the bf16 rule); it refuses an
/// f32 base, an f32 weight or LayerNorm on bf16 activations (forward and backward), a gradient
/// of another dtype than its activations, and u32 activations, each named.
#[test]
fn bf16_operands_are_checked() {
    let unsupported = |what: &str, r: Result<(), Error>, says: &[&str]| match r {
        Err(Error::Unsupported(msg)) => {
            for s in says {
                assert!(msg.contains(s), "{what}: `{s}` not in: {msg}");
            }
        }
        other => panic!("{what}: expected Error::Unsupported, got {other:?}"),
    };
    let input = |what: &str, r: Result<(), Error>, says: &[&str]| match r {
        Err(Error::Input(msg)) => {
            for s in says {
                assert!(msg.contains(s), "{what}: `{s}` not in: {msg}");
            }
        }
        other => panic!("{what}: expected Error::Input, got {other:?}"),
    };
    #[cfg(feature = "cuda-sim")]
    {
        // f16 is a mode of its own (tests/cuda_backend.rs f16_mode); u32 activations are not.
        assert_eq!(CudaBackend::open(Device::CudaSim).unwrap().with_activations(DType::F16).unwrap().activations(), DType::F16);
        unsupported("with_activations(U32)", CudaBackend::open(Device::CudaSim).unwrap().with_activations(DType::U32).map(|_| ()), &["f32, bf16 or f16"]);
    }
    let base = Base::tiny("tiny_bert");
    for be in bf16_backends() {
        assert!(be.supports_training(), "{}: bf16 mode without training", be.name());
        let (mut model, batch) = base.load(be.clone());
        let name = model.load_adapter(fixtures().join("adapters/pfeiffer")).unwrap();
        model.set_active_adapters(Some(setup(&[&name]))).unwrap();
        model.train_adapter(&[&name]).unwrap();
        model.set_dropout(Some(7));
        let (out, _tape) = model.forward_train(&batch).unwrap();
        assert_eq!(out.last_hidden_state.dtype(), DType::BF16);

        let x = be.cast(&be.upload(vec![0.5; 6 * 8], &[6, 8]).unwrap(), DType::BF16).unwrap();
        let dy = be.cast(&be.upload(vec![1.0; 6 * 4], &[6, 4]).unwrap(), DType::BF16).unwrap();
        let w32 = be.upload(vec![0.25; 4 * 8], &[4, 8]).unwrap();
        let f32_gamma = be.upload(vec![1.0; 8], &[8]).unwrap();
        // The backward ops name what is not bf16.
        unsupported("linear_backward_input with an f32 weight", be.linear_backward_input(&dy, &w32).map(|_| ()), &["linear_backward_input", "weight", "f32"]);
        unsupported("residual_layernorm_stats with an f32 LayerNorm", be.residual_layernorm_stats(&x, None, &f32_gamma, &f32_gamma, 1e-12).map(|_| ()), &["residual_layernorm_stats", "LayerNorm gamma", "f32"]);
        let x32 = be.upload(vec![0.5; 6 * 8], &[6, 8]).unwrap();
        input("activation_backward of a bf16 gradient over an f32 pre-activation", be.activation_backward(&x, &x32, bert_adapters::Activation::Gelu).map(|_| ()), &["activation_backward", "pre-activation", "f32"]);
        let out32 = be.zeros(&[6, 8], DType::F32).unwrap();
        let w16 = be.cast(&w32, DType::BF16).unwrap();
        input("linear_backward_input into an f32 destination", be.linear_backward_input_into(&dy, &w16, &out32, false), &["linear_backward_input", "destination", "f32"]);

        // Mismatched precisions are refused, named.
        let w32 = be.upload(vec![0.25; 4 * 8], &[4, 8]).unwrap();
        unsupported("an f32 weight on bf16 activations", be.linear(&x, &w32, None).map(|_| ()), &["linear", "the weight W", "f32"]);
        unsupported("an f32 LayerNorm on bf16 activations", be.residual_layernorm(&x, None, &f32_gamma, &f32_gamma, 1e-12).map(|_| ()), &["residual_layernorm", "LayerNorm gamma", "f32"]);
        let e = BertModel::from_dir(&base.dir, be.clone(), LoadOptions::default()).and_then(|(m, _)| {
            let batch = InputBatch::from_file(base.dir.join("inputs.safetensors"), m.config())?;
            m.forward(&batch).map(|_| ())
        });
        unsupported("an f32 base in the bf16 mode", e, &["embedding_layernorm", "LoadOptions", "bf16"]);
    }
}
