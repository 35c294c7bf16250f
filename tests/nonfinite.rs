//! Non-finite values are an error, not a result: the forward names the first layer and op where
//! NaN or ±inf appeared, the backward the first gradient that holds them. Every case is built so
//! that the place is known without running the model.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bert_adapters::{Backend, BertModel, CpuBackend, Error, InputBatch, LoadOptions, Tensor};
use common::{copy_model, fixtures, read_raw_safetensors, setup, write_raw_safetensors};
use safetensors::Dtype;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Set every element of the named tensors of a safetensors file to `value`.
fn set_tensors(path: &Path, names: &[&str], value: f32) {
    let mut tensors = read_raw_safetensors(path);
    for name in names {
        let t = tensors.iter_mut().find(|t| t.0 == *name).unwrap_or_else(|| panic!("no tensor `{name}` in {}", path.display()));
        assert_eq!(t.1, Dtype::F32);
        let n: usize = t.2.iter().product();
        t.3 = f32_bytes(&vec![value; n]);
    }
    write_raw_safetensors(path, &tensors);
}

fn load(dir: &Path, backend: Arc<dyn Backend>) -> (BertModel, InputBatch) {
    let (model, _) = BertModel::from_dir(dir, backend, LoadOptions::default()).unwrap();
    let batch = InputBatch::from_file(fixtures().join("tiny_bert/inputs.safetensors"), model.config()).unwrap();
    (model, batch)
}

fn backends() -> [Arc<dyn Backend>; 2] {
    [Arc::new(CpuBackend::fast()), Arc::new(CpuBackend::reference())]
}

/// The `at` of a `NonFinite` error, or a panic naming what came instead.
fn non_finite_at<T>(label: &str, r: bert_adapters::Result<T>) -> String {
    match r {
        Err(Error::NonFinite { at }) => at,
        Err(other) => panic!("{label}: expected Error::NonFinite, got {other}"),
        Ok(_) => panic!("{label}: succeeded on non-finite values"),
    }
}

/// A LayerNorm with γ = β = 3e38 overflows for certain: its normalised input has mean 0 and mean
/// square 1 over H = 48 features, so some x̂ ≥ 1/√47 ≈ 0.146, and 3e38·(1 + 0.146) > f32::MAX.
const HUGE: f32 = 3e38;

#[test]
fn huge_layer_norm_in_layer_1_is_named() {
    let dir = copy_model("tiny_bert");
    let st = dir.path().join("model.safetensors");
    set_tensors(&st, &["encoder.layer.1.attention.output.LayerNorm.weight", "encoder.layer.1.attention.output.LayerNorm.bias"], HUGE);
    for be in backends() {
        let (model, batch) = load(dir.path(), be.clone());
        let at = non_finite_at("forward", model.forward(&batch));
        assert_eq!(at, "layer 1's attention output location", "[{}]", be.name());
        let at = non_finite_at("forward_train", model.forward_train(&batch));
        assert_eq!(at, "layer 1's attention output location", "[{}]", be.name());
        let msg = Error::NonFinite { at }.to_string();
        assert_eq!(msg, "non-finite values (NaN or ±inf) first appear in layer 1's attention output location");
    }
}

#[test]
fn huge_embedding_layer_norm_is_named() {
    let dir = copy_model("tiny_bert");
    set_tensors(&dir.path().join("model.safetensors"), &["embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"], HUGE);
    for be in backends() {
        let (model, batch) = load(dir.path(), be.clone());
        assert_eq!(non_finite_at("forward", model.forward(&batch)), "the embeddings", "[{}]", be.name());
    }
}

/// A copy of fixture adapter folder `name` in `to`, with `edit` applied to its config's `config`.
fn adapter_copy(name: &str, to: &Path, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let from = fixtures().join("adapters").join(name);
    let dst = to.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["adapter_config.json", "adapter.safetensors"] {
        std::fs::copy(from.join(f), dst.join(f)).unwrap();
    }
    let path = dst.join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v["config"]);
    std::fs::write(&path, v.to_string()).unwrap();
    dst
}

/// `"scaling": 1e308` is a float, but beyond float32: every output of the adapter would be ±inf
/// or NaN (in the library too, which scales float32 tensors). Refused when the config is read.
#[test]
fn scaling_beyond_float32_is_refused_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    for s in [1e308, -1e39, 3.5e38] {
        let dir = adapter_copy("pfeiffer", tmp.path(), |c| c["scaling"] = serde_json::json!(s));
        let (mut model, _) = common::tiny(Arc::new(CpuBackend::fast()));
        let err = model.load_adapter(&dir).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "scaling {s}: {err}");
        let msg = err.to_string();
        for want in ["adapter_config.json", "config.scaling", "float32"] {
            assert!(msg.contains(want), "scaling {s}: `{want}` not in: {msg}");
        }
    }
    // The largest magnitudes float32 holds still load (the forward guards what they do).
    for s in [3e38, -3.4e38, 1e-30] {
        let dir = adapter_copy("pfeiffer", tmp.path(), |c| c["scaling"] = serde_json::json!(s));
        let (mut model, _) = common::tiny(Arc::new(CpuBackend::fast()));
        model.load_adapter(&dir).unwrap_or_else(|e| panic!("scaling {s}: {e}"));
    }
}

/// Scaling 3e38 with layer 0's up projection set to output exactly 2 (weight 0, bias 2): the
/// adapter's output is 6e38 = +inf in float32, at layer 0's FFN output, the first place pfeiffer
/// runs; the embeddings and layer 0's attention are untouched.
fn overflowing_pfeiffer(tmp: &Path) -> PathBuf {
    let dir = adapter_copy("pfeiffer", tmp, |c| c["scaling"] = serde_json::json!(3e38));
    let st = dir.join("adapter.safetensors");
    set_tensors(&st, &["encoder.layer.0.output.adapters.pfeiffer.adapter_up.weight"], 0.0);
    set_tensors(&st, &["encoder.layer.0.output.adapters.pfeiffer.adapter_up.bias"], 2.0);
    dir
}

#[test]
fn overflowing_adapter_is_named_with_its_location() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = overflowing_pfeiffer(tmp.path());
    for be in backends() {
        let (mut model, batch) = common::tiny(be.clone());
        model.load_adapter(&bad).unwrap();
        model.load_adapter(fixtures().join("adapters/pfeiffer_b")).unwrap();
        model.set_active_adapters(Some(setup(&["pfeiffer"]))).unwrap();
        let want = "layer 0's FFN output location (adapter `pfeiffer`)";
        assert_eq!(non_finite_at("single", model.forward(&batch)), want, "[{}]", be.name());
        // Under Parallel the branch that overflowed is named, in either order.
        for order in [["pfeiffer_b", "pfeiffer"], ["pfeiffer", "pfeiffer_b"]] {
            model.set_active_adapters(Some(setup(&order))).unwrap();
            assert_eq!(non_finite_at("parallel", model.forward(&batch)), want, "{order:?} [{}]", be.name());
        }
        // The healthy adapter alone still runs.
        model.set_active_adapters(Some(setup(&["pfeiffer_b"]))).unwrap();
        let out = model.forward(&batch).unwrap().last_hidden_state.into_cpu_vec().unwrap();
        assert!(out.iter().all(|v| v.is_finite()));
    }
}

/// A probe gradient holding one +inf: the LayerNorm backward of that row computes inf − inf, and
/// every parameter gradient sums over rows, so every gradient is NaN; the first in key order is
/// named.
#[test]
fn non_finite_gradient_is_named() {
    for be in backends() {
        let (mut model, batch) = common::tiny(be.clone());
        model.load_adapter(fixtures().join("adapters/pfeiffer")).unwrap();
        model.set_active_adapters(Some(setup(&["pfeiffer"]))).unwrap();
        model.train_adapter(&["pfeiffer"]).unwrap();
        let (out, tape) = model.forward_train(&batch).unwrap();
        let mut w = vec![0.5f32; out.last_hidden_state.elem_count()];
        let d = Tensor::from_vec(w.clone(), out.last_hidden_state.shape()).unwrap();
        model.backward(&tape, &d, None).unwrap();
        w[5] = f32::INFINITY;
        let d = Tensor::from_vec(w, out.last_hidden_state.shape()).unwrap();
        let at = non_finite_at("backward", model.backward(&tape, &d, None));
        assert_eq!(at, "the gradient of `encoder.layer.0.output.adapters.pfeiffer.adapter_down.0.bias`", "[{}]", be.name());
    }
}

#[test]
fn all_finite_finds_every_kind_of_non_finite_value() {
    for be in backends() {
        for n in [0usize, 1, 7, 4096, 100_003] {
            let t = be.upload(vec![1.5; n], &[n]).unwrap();
            assert!(be.all_finite(&t).unwrap(), "{n} finite values [{}]", be.name());
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for at in [0, n / 2, n.saturating_sub(1)] {
                    if n == 0 {
                        continue;
                    }
                    let mut v = vec![f32::MAX; n];
                    v[at] = bad;
                    let t = be.upload(v, &[n]).unwrap();
                    assert!(!be.all_finite(&t).unwrap(), "{bad} at {at} of {n} [{}]", be.name());
                }
            }
        }
    }
}
