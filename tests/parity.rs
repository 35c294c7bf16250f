//! BERT forward against PyTorch (`tools/make_fixtures.py`, transformers 4.57.6, eager attention,
//! eval mode). Bound: max|out − ref| ≤ 1e-5·(1 + max|ref|), on the fast path and the reference.

mod common;

use std::path::Path;
use std::sync::Arc;

use bert_adapters::io::TensorFile;
use bert_adapters::{Backend, BertModel, BertTokenizer, CpuBackend, InputBatch, LoadOptions};
use common::{check_outputs, fixtures};

/// Both CPU paths, then the CUDA backend on cuda-sim (CI) and on a GPU when there is one.
fn backends() -> Vec<Arc<dyn Backend>> {
    let mut v: Vec<Arc<dyn Backend>> = vec![Arc::new(CpuBackend::fast()), Arc::new(CpuBackend::reference())];
    v.extend(common::cuda_backends());
    v
}

fn tiny_case(dir: &str, expected_file: &str, use_inputs: bool) {
    let dir = fixtures().join(dir);
    let expected = TensorFile::open(dir.join(expected_file)).unwrap();
    for backend in backends() {
        let (model, report) = BertModel::from_dir(&dir, backend, LoadOptions::default()).unwrap();
        assert!(report.missing.is_empty() && report.unexpected.is_empty(), "{report:?}");
        let batch = if use_inputs {
            InputBatch::from_file(dir.join("inputs.safetensors"), model.config()).unwrap()
        } else {
            // Only input_ids: the mask defaults to ones and the token types to zeros.
            let inputs = TensorFile::open(dir.join("inputs.safetensors")).unwrap();
            let (ids, shape) = inputs.read_i64("input_ids").unwrap();
            InputBatch::new(&dir, &shape, &ids, None, None, model.config()).unwrap()
        };
        check_outputs(&format!("{}/{expected_file}", dir.display()), &model, &batch, &expected);
    }
}

#[test]
fn tiny_bert_matches_pytorch() {
    tiny_case("tiny_bert", "expected.safetensors", true);
}

#[test]
fn tiny_bert_default_mask_and_types_match_pytorch() {
    tiny_case("tiny_bert", "expected_defaults.safetensors", false);
}

#[test]
fn tiny_bert_gelu_new_without_pooler_matches_pytorch() {
    tiny_case("tiny_bert_gelu_new", "expected.safetensors", true);
    let (model, report) = BertModel::from_dir(fixtures().join("tiny_bert_gelu_new"), Arc::new(CpuBackend::fast()), LoadOptions::default()).unwrap();
    assert!(!model.has_pooler() && !report.has_pooler);
}

/// all-MiniLM-L6-v2 from `scripts/fetch-model.sh`: our tokenizer's ids must equal the HF
/// tokenizer's, and every hidden state must match PyTorch.
#[test]
fn minilm_matches_pytorch_and_hf_tokenizer() {
    let model_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    if !model_dir.join("model.safetensors").is_file() {
        if std::env::var_os("REQUIRE_MODEL").is_some() {
            panic!("REQUIRE_MODEL is set but {} is missing (run scripts/fetch-model.sh)", model_dir.display());
        }
        bert_adapters::cuda::probe::report_skip("all-MiniLM-L6-v2", "no model", &format!("{} not found; run scripts/fetch-model.sh", model_dir.display()));
        return;
    }
    let fx = fixtures().join("minilm");
    let expected = TensorFile::open(fx.join("expected.safetensors")).unwrap();
    let sentences: Vec<String> = std::fs::read_to_string(fx.join("sentences.txt")).unwrap().lines().map(String::from).collect();
    for backend in backends() {
        let (model, _) = BertModel::from_dir(&model_dir, backend, LoadOptions::default()).unwrap();
        let tok = BertTokenizer::from_file(model_dir.join("tokenizer.json"), model.config().max_position_embeddings).unwrap();
        let batch = tok.encode_batch(&sentences, model.config()).unwrap();
        for (name, ours) in [("input_ids", &batch.input_ids), ("attention_mask", &batch.attention_mask), ("token_type_ids", &batch.token_type_ids)] {
            let (want, shape) = expected.read_i64(name).unwrap();
            assert_eq!(shape, vec![batch.batch, batch.seq_len], "{name}");
            let ours: Vec<i64> = ours.iter().map(|&v| v as i64).collect();
            assert_eq!(ours, want, "{name} differ from the HF tokenizer");
        }
        check_outputs("minilm", &model, &batch, &expected);
    }
}
