//! Gradients of the probe loss Σ last_hidden_state ⊙ W against PyTorch autograd through the
//! `adapters` library (tests/fixtures/training, eval mode), for every config alone and for
//! Parallel in both orders training each child. Bound: 1e-4·(1 + max|ref|) per tensor.

mod common;

use std::sync::Arc;

use bert_adapters::io::TensorFile;
use bert_adapters::{Backend, BertModel, CpuBackend, InputBatch, LoadOptions};
use common::{assert_close, fixtures, read_f32, setup, SINGLE_ADAPTERS, TOL};

const GRAD_TOL: f64 = 1e-4;

fn case(file: &str, active: &[&str], train: &[&str]) {
    let fx = TensorFile::open(fixtures().join("training").join(format!("grad_{file}.safetensors"))).unwrap();
    // Both CPU paths, then the CUDA backend on cuda-sim (CI) and on a GPU when there is one.
    let mut backends: Vec<Arc<dyn Backend>> = vec![Arc::new(CpuBackend::fast()), Arc::new(CpuBackend::reference())];
    backends.extend(common::cuda_backends());
    for backend in backends {
        let dir = fixtures().join("tiny_bert");
        let (mut model, _) = BertModel::from_dir(&dir, backend.clone(), LoadOptions::default()).unwrap();
        let batch = InputBatch::from_file(dir.join("inputs.safetensors"), model.config()).unwrap();
        for name in active {
            if model.adapter(name).is_none() {
                model.load_adapter(fixtures().join("adapters").join(name)).unwrap();
            }
        }
        model.set_active_adapters(Some(setup(active))).unwrap();
        model.train_adapter(train).unwrap();
        let (out, tape) = model.forward_train(&batch).unwrap();
        let label = format!("{file} [{}]", backend.name());
        let last = backend.to_host(&out.last_hidden_state).unwrap();
        assert_close(&format!("{label} last_hidden_state"), &last, &read_f32(&fx, "last_hidden_state").0, TOL);
        let (w, shape) = read_f32(&fx, "W");
        let terms: Vec<f64> = last.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).collect();
        let (loss, magnitude) = (terms.iter().sum::<f64>(), terms.iter().map(|t| t.abs()).sum::<f64>());
        // A sum with cancellation: its rounding error scales with Σ|terms|, not with |Σ terms|.
        let ref_loss = read_f32(&fx, "loss").0[0] as f64;
        assert!((loss - ref_loss).abs() <= TOL * (1.0 + magnitude), "{label} loss {loss} vs {ref_loss} (Σ|terms| {magnitude})");
        let grads = model.backward(&tape, &backend.upload(w, &shape).unwrap(), None).unwrap();
        let mut want: Vec<String> = fx.names().into_iter().filter_map(|n| n.strip_prefix("grad.").map(String::from)).collect();
        want.sort();
        // torch leaves `.grad` None for a parameter the setup never reaches (the script stores
        // zeros for it); we return no gradient there, so AdamW skips it as torch does.
        for key in want.iter().filter(|k| !grads.contains_key(*k)) {
            let (zeros, _) = read_f32(&fx, &format!("grad.{key}"));
            assert!(key.starts_with("invertible_adapters.") && zeros.iter().all(|&v| v == 0.0), "{label}: no gradient for {key}");
        }
        let want: Vec<String> = want.into_iter().filter(|k| grads.contains_key(k)).collect();
        assert_eq!(grads.keys().cloned().collect::<Vec<_>>(), want, "{label}: gradient keys");
        for key in want {
            let got = backend.to_host(&grads[&key]).unwrap();
            assert_close(&format!("{label} grad.{key}"), &got, &read_f32(&fx, &format!("grad.{key}")).0, GRAD_TOL);
        }
    }
}

#[test]
fn single_adapters_match_autograd() {
    for name in SINGLE_ADAPTERS {
        case(name, &[name], &[name]);
    }
}

#[test]
fn parallel_in_both_orders_matches_autograd() {
    for (a, b) in [("pfeiffer_inv", "pfeiffer"), ("pfeiffer", "pfeiffer_inv"), ("houlsby_inv", "houlsby"), ("houlsby", "houlsby_inv")] {
        for train in [a, b] {
            case(&format!("parallel_{a}__{b}__train_{train}"), &[a, b], &[train]);
        }
    }
    case("parallel_pfeiffer_inv__pfeiffer__train_both", &["pfeiffer_inv", "pfeiffer"], &["pfeiffer_inv", "pfeiffer"]);
}
