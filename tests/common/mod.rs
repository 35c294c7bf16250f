//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use bert_adapters::io::TensorFile;
use std::sync::Arc;

use bert_adapters::{AdapterSetup, Backend, BertModel, InputBatch, LoadOptions};

/// The fp32 output bound: max|out − ref| ≤ TOL·(1 + max|ref|).
pub const TOL: f64 = 1e-5;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A committed fixture under tests/fixtures: missing is a failure naming the file, never a skip
/// (a silent skip would let a lost fixture turn a parity test into a no-op).
#[track_caller]
pub fn committed_fixture(rel: &str) -> PathBuf {
    let path = fixtures().join(rel);
    assert!(path.exists(), "committed fixture {} is missing (restore it from git, or regenerate it as its folder's README says)", path.display());
    path
}

/// `max|out − ref|` and the project's bound `rel·(1 + max|ref|)`.
pub fn assert_close(name: &str, out: &[f32], reference: &[f32], rel: f64) {
    assert_eq!(out.len(), reference.len(), "{name}: length {} vs reference {}", out.len(), reference.len());
    let max_ref = reference.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
    let (mut worst, mut at) = (0f64, 0usize);
    for (i, (&a, &b)) in out.iter().zip(reference).enumerate() {
        let d = (a as f64 - b as f64).abs();
        if d > worst || d.is_nan() {
            worst = d;
            at = i;
        }
    }
    let bound = rel * (1.0 + max_ref);
    assert!(
        worst <= bound,
        "{name}: max|out-ref| = {worst:.3e} at {at} (out {}, ref {}) exceeds {bound:.3e} (max|ref| {max_ref:.3})",
        out[at],
        reference[at]
    );
}

pub fn read_f32(file: &TensorFile, name: &str) -> (Vec<f32>, Vec<usize>) {
    file.read_f32(name).unwrap_or_else(|e| panic!("fixture {}: {e}", file.path().display()))
}

pub fn random_vec(rng: &mut impl rand::Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect()
}

/// Write a safetensors file with arbitrary dtypes: `(name, dtype, shape, little-endian bytes)`.
pub fn write_raw_safetensors(path: &Path, tensors: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Every tensor of a safetensors file as `(name, dtype, shape, bytes)`, in file order.
pub fn read_raw_safetensors(path: &Path) -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A copy of a fixture model folder in a temp dir, for tests that rewrite its files.
pub fn copy_model(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "inputs.safetensors"] {
        std::fs::copy(fixtures().join(name).join(f), dir.path().join(f)).unwrap();
    }
    dir
}

/// Run `model` on `batch` and compare every tensor `expected` holds.
pub fn check_outputs(label: &str, model: &BertModel, batch: &InputBatch, expected: &TensorFile) {
    let out = model.forward(batch).unwrap();
    let be = model.backend();
    let mut checked = 0;
    for name in expected.names() {
        let got = if name == "last_hidden_state" {
            &out.last_hidden_state
        } else if name == "pooler_output" {
            out.pooler_output.as_ref().unwrap_or_else(|| panic!("{label}: fixture has a pooler output, model has no pooler"))
        } else if let Some(i) = name.strip_prefix("hidden_states.") {
            &out.hidden_states[i.parse::<usize>().unwrap()]
        } else {
            continue;
        };
        let (want, shape) = read_f32(expected, &name);
        assert_eq!(got.shape(), shape.as_slice(), "{label} {name}");
        let got = be.to_host(got).unwrap();
        let label = format!("{label} [{}] {name}", be.name());
        // last_hidden_state is the last hidden state; its float64 padding rows are stored once.
        let as_hidden = match name.as_str() {
            "last_hidden_state" => format!("hidden_states.{}", model.config().num_hidden_layers),
            other => other.to_string(),
        };
        let f64_key = format!("padding_rows_f64.{as_hidden}");
        match expected.info(&f64_key) {
            None => assert_close(&label, &got, &want, TOL),
            Some(_) => check_with_padding(&label, &got, &want, expected, &f64_key, &batch.attention_mask),
        }
        checked += 1;
    }
    assert!(checked >= 2, "{label}: only {checked} tensors compared");
    assert_eq!(out.hidden_states.len(), model.config().num_hidden_layers + 1);
}

/// Real tokens meet the 1e-5 bound against PyTorch's float32 output. Padding rows are masked out
/// of every attention and ill-conditioned (PyTorch's own float32 differs from its float64 there by
/// ~1.5e-4), so there we must be no further from PyTorch's float64 result than 2× PyTorch's own
/// float32 error, the convention flash-attention's tests use for low precision.
pub fn check_with_padding(label: &str, got: &[f32], want: &[f32], expected: &TensorFile, f64_key: &str, mask: &[u32]) {
    let hidden = got.len() / mask.len();
    let rows = |v: &[f32], keep: u32| -> Vec<f32> {
        v.chunks(hidden).zip(mask).filter(|(_, &m)| m == keep).flat_map(|(r, _)| r.iter().copied()).collect()
    };
    assert_close(&format!("{label} (real tokens)"), &rows(got, 1), &rows(want, 1), TOL);
    let (want64, _) = read_f32(expected, f64_key);
    let max_err = |v: &[f32]| v.iter().zip(&want64).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let (ours, torch32) = (max_err(&rows(got, 0)), max_err(&rows(want, 0)));
    let max_ref = want64.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let bound = (2.0 * torch32 as f64).max(TOL * (1.0 + max_ref));
    assert!(ours as f64 <= bound, "{label} (padding rows): {ours:.3e} from float64, PyTorch float32 is {torch32:.3e}, bound {bound:.3e}");
}


/// The downloaded all-MiniLM-L6-v2 folder, or None (printing why the caller skips) when
/// scripts/fetch-model.sh has not run; with REQUIRE_MODEL set a missing model fails the test.
pub fn minilm() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    if dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file() {
        return Some(dir);
    }
    assert!(std::env::var_os("REQUIRE_MODEL").is_none(), "REQUIRE_MODEL set but {} missing (run scripts/fetch-model.sh)", dir.display());
    bert_adapters::cuda::probe::report_skip("all-MiniLM-L6-v2", "no model", &format!("{} not found; run scripts/fetch-model.sh", dir.display()));
    None
}

/// The tiny fixture BERT on `backend`, with its input batch.
pub fn tiny(backend: Arc<dyn Backend>) -> (BertModel, InputBatch) {
    let dir = fixtures().join("tiny_bert");
    let (model, _) = BertModel::from_dir(&dir, backend, LoadOptions::default()).unwrap();
    let batch = InputBatch::from_file(dir.join("inputs.safetensors"), model.config()).unwrap();
    (model, batch)
}

/// One name is that adapter alone; several are Parallel.
pub fn setup(names: &[&str]) -> AdapterSetup {
    match names {
        [one] => AdapterSetup::Single(one.to_string()),
        many => AdapterSetup::Parallel(many.iter().map(|s| s.to_string()).collect()),
    }
}

/// Every single-adapter fixture in tests/fixtures/adapters (the four configs and the options).
pub const SINGLE_ADAPTERS: [&str; 14] = [
    "pfeiffer",
    "houlsby",
    "pfeiffer_inv",
    "houlsby_inv",
    "opt_residual_before_ln_false",
    "opt_ln_before_after",
    "opt_scaling_learned",
    "opt_scaling_channel",
    "opt_gating",
    "opt_leave_out",
    "opt_gelu",
    "opt_rf_map",
    "opt_original_ln_after_false",
    "opt_post_add",
];

/// The tiny BERT with the tiny tokenizer, in one folder as `train` reads it. Its attention value
/// and output projections are scaled ×10: at the fixture's random N(0, 0.02) weights attention
/// adds ~2% to the residual, so [CLS] barely sees the text (its output moves by < 1% from one
/// sentence to another) and nothing is learnable in a few steps; scaled, [CLS] carries a mean of
/// the words, as in a trained BERT.
pub fn trainable_tiny_model(root: &Path) -> PathBuf {
    use bert_adapters::io::{write_safetensors, OutTensor, TensorFile};
    let dir = root.join("model");
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join("tiny_bert");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    std::fs::copy(fixtures().join("train/tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let weights = TensorFile::open(src.join("model.safetensors")).unwrap();
    let tensors: Vec<(String, OutTensor)> = weights
        .names()
        .into_iter()
        .map(|name| {
            let (mut data, shape) = weights.read_f32(&name).unwrap();
            if name.ends_with("attention.self.value.weight") || name.ends_with("attention.output.dense.weight") {
                data.iter_mut().for_each(|v| *v *= 10.0);
            }
            (name, OutTensor::F32 { shape, data })
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors, None).unwrap();
    dir
}

/// Every member of a zip archive, in order.
pub fn unzip(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut data).unwrap();
            (f.name().unwrap().to_string(), data)
        })
        .collect()
}

pub fn zip_members(members: &[(String, Vec<u8>)], method: zip::CompressionMethod) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data) in members {
        w.start_file(name.as_str(), zip::write::SimpleFileOptions::default().compression_method(method)).unwrap();
        std::io::Write::write_all(&mut w, data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

pub fn member<'a>(members: &'a mut [(String, Vec<u8>)], suffix: &str) -> &'a mut Vec<u8> {
    &mut members.iter_mut().find(|(n, _)| n.ends_with(suffix)).unwrap_or_else(|| panic!("no member {suffix}")).1
}

/// One bottleneck adapter's tensors with every option that has parameters: LayerNorms before and
/// after, a gate, a channel scaling (random, `scale` wide).
pub struct FullBranch(pub Vec<bert_adapters::Tensor>);

impl FullBranch {
    pub fn new(rng: &mut impl rand::Rng, h: usize, m: usize, scale: f32) -> Self {
        let shapes: [&[usize]; 11] = [&[m, h], &[m], &[h, m], &[h], &[h], &[h], &[h], &[h], &[1, h], &[1], &[h]];
        FullBranch(shapes.iter().map(|s| bert_adapters::Tensor::from_vec(random_vec(rng, s.iter().product(), scale), s).unwrap()).collect())
    }

    /// Its parameters, no dropout, the residual added after `ln_after`.
    pub fn params(&self) -> bert_adapters::backend::BottleneckParams<'_> {
        self.params_with(None, false)
    }

    pub fn params_with(&self, dropout: Option<bert_adapters::backend::DropoutSpec>, adapter_residual_before_ln: bool) -> bert_adapters::backend::BottleneckParams<'_> {
        use bert_adapters::backend::{BottleneckParams, LayerNormParams, ScalingParam};
        let t = &self.0;
        BottleneckParams {
            down_w: &t[0],
            down_b: &t[1],
            up_w: &t[2],
            up_b: &t[3],
            activation: bert_adapters::Activation::Gelu,
            ln_before: Some(LayerNormParams { gamma: &t[4], beta: &t[5], eps: 1e-5 }),
            ln_after: Some(LayerNormParams { gamma: &t[6], beta: &t[7], eps: 1e-5 }),
            scaling: ScalingParam::Channel(&t[10]),
            gate: Some((&t[8], &t[9])),
            adapter_residual_before_ln,
            dropout,
        }
    }
}

/// The CUDA backends a parity test also runs: `cuda-sim` (feature `cuda-sim`, as in CI) and
/// device 0 when there is a GPU (a missing GPU fails under `REQUIRE_GPU=1`).
#[allow(dead_code)] // not every test file that includes this module uses it
pub fn cuda_backends() -> Vec<Arc<dyn Backend>> {
    use bert_adapters::cuda::backend::CudaBackend;
    use bert_adapters::Device;
    let mut v: Vec<Arc<dyn Backend>> = Vec::new();
    #[cfg(feature = "cuda-sim")]
    {
        v.push(Arc::new(CudaBackend::open(Device::CudaSim).expect("the cuda-sim executor opens")));
        // A GPU's automatic paths too (cuda-sim's are the fused kernels): split adapter locations
        // and GEMM attention, in one backend so the parity and training tests cost one more run.
        let split = CudaBackend::open(Device::CudaSim).expect("the cuda-sim executor opens");
        let split = split.with_location_path(bert_adapters::cuda::adapter::LocationPath::Split);
        v.push(Arc::new(split.with_attention_path(bert_adapters::cuda::attention_gemm::AttentionPath::Gemm)));
    }
    match bert_adapters::cuda::probe::probe_gpu(0) {
        Ok(_) => v.push(Arc::new(CudaBackend::open(Device::Cuda(0)).unwrap_or_else(|e| panic!("a GPU was probed but its backend fails: {e}")))),
        Err(reason) if bert_adapters::cuda::probe::env_flag("REQUIRE_GPU") => panic!("REQUIRE_GPU is set but there is no GPU: {reason}"),
        Err(_) => {}
    }
    v
}

/// The probe loss Σ last_hidden_state ⊙ W of `model` on `batch` and its gradients against
/// PyTorch autograd (the fixture's `W`, `loss` and `grad.*`): the loss within TOL·(1 + Σ|terms|)
/// (a sum with cancellation: its rounding error scales with Σ|terms|, not with |Σ terms|), each
/// gradient within 1e-4·(1 + max|ref|). torch leaves `.grad` None for a parameter the setup never
/// reaches (the script stores zeros for it); we return no gradient there, so AdamW skips it as
/// torch does. `model` must be in training mode for the adapters to differentiate. Returns the
/// last hidden state and the worst gradient error as a fraction of its bound.
#[allow(dead_code)] // not every test binary checks gradients
pub fn check_probe_gradients(label: &str, model: &BertModel, batch: &InputBatch, fx: &TensorFile) -> (Vec<f32>, f64) {
    const GRAD_TOL: f64 = 1e-4;
    let backend = model.backend().clone();
    let (out, tape) = model.forward_train(batch).unwrap();
    let last = backend.to_host(&out.last_hidden_state).unwrap();
    let (w, shape) = read_f32(fx, "W");
    let terms: Vec<f64> = last.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).collect();
    let (loss, magnitude) = (terms.iter().sum::<f64>(), terms.iter().map(|t| t.abs()).sum::<f64>());
    let ref_loss = read_f32(fx, "loss").0[0] as f64;
    assert!((loss - ref_loss).abs() <= TOL * (1.0 + magnitude), "{label} loss {loss} vs {ref_loss} (Σ|terms| {magnitude})");
    let grads = model.backward(&tape, &backend.upload(w, &shape).unwrap(), None).unwrap();
    let mut want: Vec<String> = fx.names().into_iter().filter_map(|n| n.strip_prefix("grad.").map(String::from)).collect();
    want.sort();
    assert!(!want.is_empty(), "{label}: the fixture has no gradients");
    for key in want.iter().filter(|k| !grads.contains_key(*k)) {
        let (zeros, _) = read_f32(fx, &format!("grad.{key}"));
        assert!(key.starts_with("invertible_adapters.") && zeros.iter().all(|&v| v == 0.0), "{label}: no gradient for {key}");
    }
    let want: Vec<String> = want.into_iter().filter(|k| grads.contains_key(k)).collect();
    assert_eq!(grads.keys().cloned().collect::<Vec<_>>(), want, "{label}: gradient keys");
    let mut worst = 0f64;
    for key in want {
        let got = backend.to_host(&grads[&key]).unwrap();
        let reference = read_f32(fx, &format!("grad.{key}")).0;
        assert_close(&format!("{label} grad.{key}"), &got, &reference, GRAD_TOL);
        let max_ref = reference.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
        let err = got.iter().zip(&reference).map(|(a, b)| (*a as f64 - *b as f64).abs()).fold(0f64, f64::max);
        worst = worst.max(err / (GRAD_TOL * (1.0 + max_ref)));
    }
    (last, worst)
}

/// The tiny model with Parallel(scorenn: pfeiffer, tasknn: pfeiffer+inv), a 3-class head each,
/// and the adapters' weights blown up (×40) so a wrong gradient cannot hide in the tolerance;
/// `adapter_dropout` is each adapter's own p (spec §3.4). Returns the model, the tiny batch and
/// labels `i % 3`.
/// Blow up the adapter weights of `names` (×40, plus a small ramp) so that a wrong gradient
/// cannot hide in the tolerance.
pub fn blow_up_adapters(model: &mut BertModel, be: &dyn Backend, names: &[&str]) {
    for n in names {
        for t in model.adapter_params_mut(n).unwrap().values_mut() {
            let v: Vec<f32> = be.to_host(t).unwrap().iter().enumerate().map(|(i, x)| x * 40.0 + (i % 7) as f32 * 0.01).collect();
            *t = be.upload(v, t.shape()).unwrap();
        }
    }
}

pub fn parallel_pair(be: Arc<dyn Backend>, adapter_dropout: [f64; 2]) -> (BertModel, InputBatch, Vec<usize>) {
    let (mut model, batch) = tiny(be.clone());
    let config = |name: &str, p: f64| bert_adapters::AdapterConfig::named(name).unwrap().with_overrides(&serde_json::json!({ "dropout": p })).unwrap();
    model.add_adapter_seeded("scorenn", config("pfeiffer", adapter_dropout[0]), 1).unwrap();
    model.add_adapter_seeded("tasknn", config("pfeiffer+inv", adapter_dropout[1]), 2).unwrap();
    for n in ["scorenn", "tasknn"] {
        model.add_classification_head(n, bert_adapters::model::heads::HeadConfig::classification(3)).unwrap();
    }
    blow_up_adapters(&mut model, be.as_ref(), &["scorenn", "tasknn"]);
    model.set_active_adapters(Some(setup(&["scorenn", "tasknn"]))).unwrap();
    let labels: Vec<usize> = (0..batch.batch).map(|i| i % 3).collect();
    (model, batch, labels)
}
