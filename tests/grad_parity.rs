//! Gradients of the probe loss Σ last_hidden_state ⊙ W against PyTorch autograd through the
//! `adapters` library (tests/fixtures/training, eval mode), for every config alone and for
//! Parallel in both orders training each child. Bound: 1e-4·(1 + max|ref|) per tensor.

mod common;

use std::sync::Arc;

use bert_adapters::io::TensorFile;
use bert_adapters::{Backend, BertModel, CpuBackend, InputBatch, LoadOptions};
use common::{assert_close, check_probe_gradients, fixtures, read_f32, setup, SINGLE_ADAPTERS, TOL};


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
        let label = format!("{file} [{}]", backend.name());
        let (last, _) = check_probe_gradients(&label, &model, &batch, &fx);
        assert_close(&format!("{label} last_hidden_state"), &last, &read_f32(&fx, "last_hidden_state").0, TOL);
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
