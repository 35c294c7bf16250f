//! RoBERTa and XLM-R (issue 17) against PyTorch + `adapters` 1.3.0: the fixtures of
//! tools/make_roberta_fixtures.py (tests/fixtures/tiny_roberta: a random RobertaModel with real
//! padding, pad id 1, and a pad id inside one sequence; adapter weights blown up ×25).
//!
//! Every parity test runs both CPU paths, then the CUDA backend on cuda-sim (CI) and on a GPU
//! when there is one (`common::cuda_backends`). Bounds: outputs max|out − ref| ≤ 1e-5·(1 +
//! max|ref|), gradients 1e-4·(1 + max|ref|), as in tests/parity.rs and tests/grad_parity.rs.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bert_adapters::io::adapter_files::AdapterLoadOptions;
use bert_adapters::io::{write_safetensors, OutTensor, TensorFile};
use bert_adapters::{Backend, BertConfig, BertModel, BertTokenizer, CpuBackend, Error, InputBatch, LoadOptions, ModelType, Positions, SaveOptions};
use common::{assert_close, check_outputs, check_probe_gradients, read_f32, setup, TOL};

fn dir() -> PathBuf {
    common::committed_fixture("tiny_roberta")
}

fn backends() -> Vec<Arc<dyn Backend>> {
    let mut v: Vec<Arc<dyn Backend>> = vec![Arc::new(CpuBackend::fast()), Arc::new(CpuBackend::reference())];
    v.extend(common::cuda_backends());
    v
}

fn tiny(backend: Arc<dyn Backend>) -> (BertModel, InputBatch) {
    let (model, report) = BertModel::from_dir(dir(), backend, LoadOptions::default()).unwrap();
    assert!(report.missing.is_empty() && report.unexpected.is_empty() && report.has_pooler, "{report:?}");
    let batch = InputBatch::from_file(dir().join("inputs.safetensors"), model.config()).unwrap();
    (model, batch)
}

fn expected(file: &str) -> TensorFile {
    TensorFile::open(common::committed_fixture(&format!("tiny_roberta/{file}"))).unwrap()
}

/// A copy of the fixture model folder (config, weights, tokenizer) with `edit` applied to its
/// config.json.
fn copy_with_config(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "tokenizer.json", "inputs.safetensors"] {
        std::fs::copy(dir().join(f), tmp.path().join(f)).unwrap();
    }
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir().join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    tmp
}

#[test]
fn the_config_is_read_as_roberta() {
    let cfg = BertConfig::from_file(dir().join("config.json")).unwrap();
    assert_eq!((cfg.model_type, cfg.pad_token_id, cfg.type_vocab_size, cfg.max_position_embeddings), (ModelType::Roberta, 1, 1, 34));
    assert_eq!(cfg.positions(), Positions::FromIds { padding_idx: 1 });
    // 34 rows, positions from padding_idx + 1 = 2: 32 tokens fit.
    assert_eq!(cfg.max_seq_len(), 32);
}

#[test]
fn tiny_roberta_matches_pytorch() {
    for backend in backends() {
        let (model, batch) = tiny(backend.clone());
        // The fixture pads with id 1 (mask 0) and has a pad id inside sequence 2 (mask 1).
        assert_eq!(batch.input_ids[2 * batch.seq_len + 4], 1);
        assert_eq!(batch.attention_mask[2 * batch.seq_len + 4], 1);
        check_outputs(&format!("tiny_roberta [{}]", backend.name()), &model, &batch, &expected("expected.safetensors"));
        // input_ids alone: the mask defaults to ones and the token types to zeros, as in HF.
        let inputs = TensorFile::open(dir().join("inputs.safetensors")).unwrap();
        let (ids, shape) = inputs.read_i64("input_ids").unwrap();
        let ids_only = InputBatch::new(&dir(), &shape, &ids, None, None, model.config()).unwrap();
        check_outputs(&format!("tiny_roberta defaults [{}]", backend.name()), &model, &ids_only, &expected("expected_defaults.safetensors"));
    }
}

/// The script checks that XLMRobertaModel gives PyTorch's bits on these weights; a folder that
/// says `xlm-roberta` must give us the same outputs.
#[test]
fn xlm_roberta_is_the_same_model() {
    let tmp = copy_with_config(|c| c["model_type"] = "xlm-roberta".into());
    for backend in [Arc::new(CpuBackend::fast()) as Arc<dyn Backend>].into_iter().chain(common::cuda_backends()) {
        let (model, _) = BertModel::from_dir(tmp.path(), backend.clone(), LoadOptions::default()).unwrap();
        assert_eq!(model.config().model_type, ModelType::XlmRoberta);
        let batch = InputBatch::from_file(tmp.path().join("inputs.safetensors"), model.config()).unwrap();
        check_outputs(&format!("xlm-roberta [{}]", backend.name()), &model, &batch, &expected("expected.safetensors"));
    }
}

/// A task checkpoint names the base model's tensors under `roberta.` and adds its head
/// (`lm_head.*` of RobertaForMaskedLM): the same load report (ignoring the head) and the same output.
#[test]
fn a_roberta_prefixed_checkpoint_loads_like_the_bare_model() {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::fast());
    let (bare, bare_report) = BertModel::from_dir(dir(), be.clone(), LoadOptions::default()).unwrap();
    let tmp = copy_with_config(|_| {});
    let file = TensorFile::open(dir().join("model.safetensors")).unwrap();
    let mut tensors: Vec<(String, OutTensor)> = file
        .names()
        .into_iter()
        .map(|n| {
            let (data, shape) = file.read_f32(&n).unwrap();
            (format!("roberta.{n}"), OutTensor::F32 { shape, data })
        })
        .collect();
    tensors.push(("lm_head.dense.weight".into(), OutTensor::F32 { shape: vec![36, 36], data: vec![0.5; 36 * 36] }));
    tensors.push(("lm_head.bias".into(), OutTensor::F32 { shape: vec![283], data: vec![0.0; 283] }));
    write_safetensors(&tmp.path().join("model.safetensors"), &tensors, None).unwrap();
    let (prefixed, report) = BertModel::from_dir(tmp.path(), be.clone(), LoadOptions::default()).unwrap();
    assert_eq!((&report.loaded, &report.missing, &report.unexpected, &report.mismatched, report.has_pooler), (&bare_report.loaded, &bare_report.missing, &bare_report.unexpected, &bare_report.mismatched, bare_report.has_pooler));
    let mut ignored = report.ignored.clone();
    ignored.sort();
    assert_eq!(ignored, ["lm_head.bias", "lm_head.dense.weight"]);
    assert_eq!(report.loaded.len(), 5 + 2 * 16 + 2);
    let batch = InputBatch::from_file(dir().join("inputs.safetensors"), bare.config()).unwrap();
    let (a, b) = (bare.forward(&batch).unwrap(), prefixed.forward(&batch).unwrap());
    assert_eq!(a.last_hidden_state.into_cpu_vec().unwrap(), b.last_hidden_state.into_cpu_vec().unwrap());

    // A `bert.` prefix is not RoBERTa's: strictly, its keys are unexpected, named with the class.
    let tensors: Vec<(String, OutTensor)> = file
        .names()
        .into_iter()
        .map(|n| {
            let (data, shape) = file.read_f32(&n).unwrap();
            (if n.starts_with("pooler.") { format!("bert.{n}") } else { n }, OutTensor::F32 { shape, data })
        })
        .collect();
    write_safetensors(&tmp.path().join("model.safetensors"), &tensors, None).unwrap();
    let err = BertModel::from_dir(tmp.path(), be, LoadOptions::default()).err().unwrap().to_string();
    assert!(err.contains("bert.pooler.dense") && err.contains("unexpected for a RobertaModel"), "{err}");
}

/// `--text`'s path: our tokenizer on the fixture's byte-level BPE `tokenizer.json` (padding
/// null, as HF writes it for RoBERTa) gives HF's fast tokenizer's ids, pads with `<pad>` = 1,
/// and the model's outputs on them match PyTorch's.
#[test]
fn text_ids_match_the_hf_fast_tokenizer() {
    let want = expected("expected_text.safetensors");
    let sentences: Vec<String> = std::fs::read_to_string(dir().join("sentences.txt")).unwrap().lines().map(String::from).collect();
    for backend in backends() {
        let (model, _) = tiny(backend.clone());
        let tok = BertTokenizer::from_file(dir().join("tokenizer.json"), model.config().max_seq_len()).unwrap();
        let batch = tok.encode_batch(&sentences, model.config()).unwrap();
        for (name, ours) in [("input_ids", &batch.input_ids), ("attention_mask", &batch.attention_mask), ("token_type_ids", &batch.token_type_ids)] {
            let (hf, shape) = want.read_i64(name).unwrap();
            assert_eq!(shape, vec![batch.batch, batch.seq_len], "{name}");
            assert_eq!(ours.iter().map(|&v| v as i64).collect::<Vec<_>>(), hf, "{name} differ from HF's RobertaTokenizerFast");
        }
        assert!(batch.attention_mask.contains(&0), "the sentences are padded");
        check_outputs(&format!("tiny_roberta text [{}]", backend.name()), &model, &batch, &want);
        // Bucketed padding (what train feeds its steps) pads with <pad> too.
        let padded = tok.encode_batch_bucketed(&sentences, model.config(), 16).unwrap();
        assert_eq!(padded.seq_len, 32);
        assert!(padded.input_ids.chunks(32).all(|row| row[31] == 1));
    }
}

fn adapters_dir() -> PathBuf {
    dir().join("adapters")
}

fn adapter_case(names: &[&str], file: &str) {
    let want = expected(file);
    for backend in backends() {
        let (mut model, batch) = tiny(backend.clone());
        for n in names {
            assert_eq!(&model.load_adapter(adapters_dir().join(n)).unwrap(), n);
        }
        model.set_active_adapters(Some(setup(names))).unwrap();
        check_outputs(&format!("tiny_roberta {names:?} [{}]", backend.name()), &model, &batch, &want);
    }
}

#[test]
fn every_config_matches_the_library() {
    for name in ["pfeiffer", "houlsby", "pfeiffer_inv", "houlsby_inv"] {
        adapter_case(&[name], &format!("expected_{name}.safetensors"));
    }
}

#[test]
fn parallel_in_both_orders_matches_the_library() {
    for names in [["pfeiffer_inv", "pfeiffer"], ["pfeiffer", "pfeiffer_inv"], ["houlsby_inv", "houlsby"], ["houlsby", "houlsby_inv"]] {
        adapter_case(&names, &format!("expected_parallel_{}.safetensors", names.join("__")));
    }
}

/// An adapter saved from RobertaAdapterModel (keys under `roberta.`, a classification head):
/// it loads with its head, and the head's logits match the library's.
#[test]
fn a_flex_model_adapter_with_its_head_matches_the_library() {
    let want = expected("expected_flex_head.safetensors");
    for backend in backends() {
        let (mut model, batch) = tiny(backend.clone());
        let report = model.load_adapter_with(adapters_dir().join("flex_pfeiffer_inv"), &AdapterLoadOptions::default()).unwrap();
        assert!(report.head && report.name == "pfeiffer_inv", "{report:?}");
        model.set_active_adapters(Some(setup(&["pfeiffer_inv"]))).unwrap();
        let out = model.forward(&batch).unwrap();
        let logits = model.head_logits(&out).unwrap();
        let label = format!("flex head [{}]", backend.name());
        assert_close(&format!("{label} logits"), &backend.to_host(&logits[0].logits).unwrap(), &read_f32(&want, "logits").0, TOL);
    }
}

fn read_text(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Saved from a RoBERTa, `adapter_config.json` says RobertaModel / roberta and
/// `head_config.json` RobertaAdapterModel / roberta, byte for byte as the library writes them;
/// keys carry no prefix and reload to the same outputs.
#[test]
fn saving_writes_the_library_files_for_roberta() {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::fast());
    let (mut model, batch) = tiny(be.clone());
    let model_name = "tests/fixtures/tiny_roberta".to_string();
    let tmp = tempfile::tempdir().unwrap();
    for name in ["pfeiffer", "houlsby_inv"] {
        model.load_adapter(adapters_dir().join(name)).unwrap();
        let out = tmp.path().join(name);
        model.save_adapter_with(&out, name, SaveOptions { with_head: false, model_name: model_name.clone() }).unwrap();
        assert_eq!(read_text(&out.join("adapter_config.json")), read_text(&adapters_dir().join(name).join("adapter_config.json")), "{name}");
        let keys = TensorFile::open(out.join("adapter.safetensors")).unwrap().names();
        assert!(!keys.is_empty() && keys.iter().all(|k| !k.starts_with("roberta.")), "{keys:?}");
    }
    model.load_adapter_with(adapters_dir().join("flex_pfeiffer_inv"), &AdapterLoadOptions { load_as: Some("flex".into()), ..Default::default() }).unwrap();
    let out = tmp.path().join("flex");
    model.save_adapter_with(&out, "flex", SaveOptions { with_head: true, model_name }).unwrap();
    let library = read_text(&adapters_dir().join("flex_pfeiffer_inv/head_config.json")).replace("\"name\": \"pfeiffer_inv\"", "\"name\": \"flex\"");
    assert_eq!(read_text(&out.join("head_config.json")), library);

    // The saved (unprefixed) copy gives the library's outputs again.
    let (mut fresh, _) = tiny(be);
    fresh.load_adapter(tmp.path().join("houlsby_inv")).unwrap();
    fresh.set_active_adapters(Some(setup(&["houlsby_inv"]))).unwrap();
    check_outputs("tiny_roberta houlsby_inv saved and reloaded", &fresh, &batch, &expected("expected_houlsby_inv.safetensors"));
}

fn grad_case(file: &str, active: &[&str], train: &[&str]) {
    let fx = expected(&format!("grad_{file}.safetensors"));
    for backend in backends() {
        let (mut model, batch) = tiny(backend.clone());
        for name in active {
            model.load_adapter(adapters_dir().join(name)).unwrap();
        }
        model.set_active_adapters(Some(setup(active))).unwrap();
        model.train_adapter(train).unwrap();
        let label = format!("roberta {file} [{}]", backend.name());
        let (_, worst) = check_probe_gradients(&label, &model, &batch, &fx);
        println!("{label}: worst gradient error / bound = {worst:.3}");
    }
}

#[test]
fn gradients_of_every_config_match_autograd() {
    for name in ["pfeiffer", "houlsby", "pfeiffer_inv", "houlsby_inv"] {
        grad_case(name, &[name], &[name]);
    }
}

#[test]
fn gradients_of_a_trained_parallel_child_match_autograd() {
    grad_case("parallel_pfeiffer_inv__pfeiffer__train_pfeiffer_inv", &["pfeiffer_inv", "pfeiffer"], &["pfeiffer_inv"]);
    grad_case("parallel_pfeiffer_inv__pfeiffer__train_pfeiffer", &["pfeiffer_inv", "pfeiffer"], &["pfeiffer"]);
    grad_case("parallel_houlsby_inv__houlsby__train_houlsby_inv", &["houlsby_inv", "houlsby"], &["houlsby_inv"]);
}

// ---- bad input ----------------------------------------------------------------------------------

fn parse(json: &str) -> bert_adapters::Result<BertConfig> {
    BertConfig::from_json_str(json, Path::new("config.json"))
}

const ROBERTA: &str = r#"{"model_type":"roberta","vocab_size":50,"hidden_size":8,"num_hidden_layers":1,
    "num_attention_heads":2,"intermediate_size":16,"max_position_embeddings":10,"type_vocab_size":1,"pad_token_id":1}"#;

fn with(field: &str, value: serde_json::Value) -> String {
    let mut v: serde_json::Value = serde_json::from_str(ROBERTA).unwrap();
    v[field] = value;
    v.to_string()
}

#[test]
fn roberta_configs_take_hf_defaults_and_refuse_a_table_without_room() {
    let c = parse(ROBERTA).unwrap();
    assert_eq!((c.max_seq_len(), c.max_seq_len_source()), (8, "max_position_embeddings 10 less roberta's position offset 2 (8 tokens)".to_string()));
    // type_vocab_size 2 is accepted, as HF does (RobertaConfig's own default is 2).
    assert_eq!(parse(&with("type_vocab_size", 2.into())).unwrap().type_vocab_size, 2);
    // Without pad_token_id, RobertaConfig's default 1 (BertConfig's is 0).
    let mut v: serde_json::Value = serde_json::from_str(ROBERTA).unwrap();
    v.as_object_mut().unwrap().remove("pad_token_id");
    assert_eq!(parse(&v.to_string()).unwrap().pad_token_id, 1);
    v["model_type"] = "xlm-roberta".into();
    assert_eq!(parse(&v.to_string()).unwrap().model_type, ModelType::XlmRoberta);
    v["model_type"] = "bert".into();
    assert_eq!((parse(&v.to_string()).unwrap().pad_token_id, parse(&v.to_string()).unwrap().max_seq_len()), (0, 10));
    // No room for a single token once positions start at pad_token_id + 1.
    for (max_pos, pad) in [(2, 1), (5, 4)] {
        let mut v: serde_json::Value = serde_json::from_str(ROBERTA).unwrap();
        v["max_position_embeddings"] = max_pos.into();
        v["pad_token_id"] = pad.into();
        let err = parse(&v.to_string()).unwrap_err();
        assert!(matches!(&err, Error::Config { field, .. } if field == "max_position_embeddings"), "{err}");
        assert!(err.to_string().contains(&format!("roberta positions start at pad_token_id + 1 = {}", pad + 1)), "{err}");
    }
    let err = parse(&with("model_type", "deberta".into())).unwrap_err().to_string();
    assert!(err.contains("`model_type`") && err.contains("`deberta` is not supported"), "{err}");
}

/// A sequence that fits max_position_embeddings but not once the padding_idx offset is added is
/// refused with a message naming the field, from the batch and from the model (not an index
/// error in a kernel).
#[test]
fn a_sequence_past_the_offset_positions_is_a_clear_error() {
    let cfg = BertConfig::from_file(dir().join("config.json")).unwrap();
    let ids = vec![5i64; 33];
    let err = InputBatch::new(Path::new("ids.safetensors"), &[1, 33], &ids, None, None, &cfg).unwrap_err().to_string();
    assert!(
        err.contains("input_ids") && err.contains("sequence length 33 does not fit max_position_embeddings 34") && err.contains("at most 32 tokens"),
        "{err}"
    );
    assert!(InputBatch::new(Path::new("ids.safetensors"), &[1, 32], &ids[..32], None, None, &cfg).is_ok());
    // A batch built for a larger table, run on this model.
    let roomy = BertConfig { max_position_embeddings: 64, ..cfg.clone() };
    let batch = InputBatch::new(Path::new("ids.safetensors"), &[1, 33], &ids, None, None, &roomy).unwrap();
    for backend in backends() {
        let (model, _) = tiny(backend);
        let err = model.forward(&batch).err().unwrap().to_string();
        assert!(err.contains("does not fit max_position_embeddings 34"), "{err}");
    }
    // A token type past type_vocab_size 1 is refused by name.
    let err = InputBatch::new(Path::new("ids.safetensors"), &[1, 2], &[5, 6], None, Some((&[0, 1], &[1, 2])), &cfg).unwrap_err().to_string();
    assert!(err.contains("token_type_ids") && err.contains("type_vocab_size 1"), "{err}");
}
