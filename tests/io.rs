//! Loading HF BERT weights: accepted variants, the load report, and broken or hostile files.

mod common;

use std::path::Path;
use std::sync::Arc;

use bert_adapters::{Backend, BertConfig, BertModel, BertWeights, CpuBackend, Error, InputBatch, LoadOptions};
use common::{copy_model, fixtures, read_raw_safetensors, write_raw_safetensors};
use safetensors::Dtype;

type Raw = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn tiny_config() -> BertConfig {
    BertConfig::from_file(fixtures().join("tiny_bert/config.json")).unwrap()
}

fn tiny_raw() -> Raw {
    read_raw_safetensors(&fixtures().join("tiny_bert/model.safetensors"))
}

fn load(path: &Path, opts: LoadOptions) -> bert_adapters::Result<(BertWeights, bert_adapters::LoadReport)> {
    BertWeights::load(path, &tiny_config(), &CpuBackend::fast(), opts)
}

fn load_err(path: &Path) -> String {
    match load(path, LoadOptions::default()) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e.to_string(),
    }
}

fn forward_of(dir: &Path) -> Vec<f32> {
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::fast());
    let (model, _) = BertModel::from_dir(dir, backend, LoadOptions::default()).unwrap();
    let batch = InputBatch::from_file(fixtures().join("tiny_bert/inputs.safetensors"), model.config()).unwrap();
    model.forward(&batch).unwrap().last_hidden_state.into_cpu_vec().unwrap()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[test]
fn bert_prefix_legacy_names_and_ignored_keys_load_identically() {
    let dir = copy_model("tiny_bert");
    let mut raw: Raw = tiny_raw()
        .into_iter()
        .map(|(n, d, s, b)| {
            let n = n.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta");
            (format!("bert.{n}"), d, s, b)
        })
        .collect();
    raw.push(("bert.embeddings.position_ids".into(), Dtype::I64, vec![1, 40], (0..40i64).flat_map(|v| v.to_le_bytes()).collect()));
    raw.push(("cls.predictions.bias".into(), Dtype::F32, vec![120], vec![0; 480]));
    write_raw_safetensors(&dir.path().join("model.safetensors"), &raw);
    let (_, report) = load(&dir.path().join("model.safetensors"), LoadOptions::default()).unwrap();
    assert_eq!(report.ignored, vec!["bert.embeddings.position_ids".to_string(), "cls.predictions.bias".to_string()]);
    assert!(report.has_pooler && report.missing.is_empty() && report.unexpected.is_empty());
    assert_eq!(report.loaded.len(), 5 + 16 * 2 + 2);
    assert_eq!(forward_of(dir.path()), forward_of(&fixtures().join("tiny_bert")));
}

#[test]
fn half_precision_files_widen_exactly() {
    for dtype in [Dtype::BF16, Dtype::F16] {
        let dir = copy_model("tiny_bert");
        let raw: Raw = tiny_raw()
            .into_iter()
            .map(|(n, _, s, b)| {
                let bytes = f32s(&b)
                    .iter()
                    .flat_map(|&v| match dtype {
                        Dtype::BF16 => half::bf16::from_f32(v).to_le_bytes(),
                        _ => half::f16::from_f32(v).to_le_bytes(),
                    })
                    .collect();
                (n, dtype, s, bytes)
            })
            .collect();
        let path = dir.path().join("model.safetensors");
        write_raw_safetensors(&path, &raw);
        let (w, _) = load(&path, LoadOptions::default()).unwrap();
        let want: Vec<f32> = f32s(&tiny_raw().iter().find(|r| r.0 == "embeddings.word_embeddings.weight").unwrap().3)
            .iter()
            .map(|&v| match dtype {
                Dtype::BF16 => half::bf16::from_f32(v).to_f32(),
                _ => half::f16::from_f32(v).to_f32(),
            })
            .collect();
        assert_eq!(&*w.word_embeddings.cpu_data().unwrap(), want.as_slice(), "{dtype:?}");
    }
}

fn rewrite(edit: impl FnOnce(&mut Raw)) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = copy_model("tiny_bert");
    let mut raw = tiny_raw();
    edit(&mut raw);
    let path = dir.path().join("model.safetensors");
    write_raw_safetensors(&path, &raw);
    (dir, path)
}

#[test]
fn missing_tensor_is_named() {
    let (_d, path) = rewrite(|raw| raw.retain(|r| r.0 != "encoder.layer.1.intermediate.dense.bias"));
    let err = load_err(&path);
    assert!(err.contains("model.safetensors: tensor `encoder.layer.1.intermediate.dense.bias`: missing"), "{err}");
}

#[test]
fn misshaped_tensor_names_key_and_both_shapes() {
    let (_d, path) = rewrite(|raw| {
        let r = raw.iter_mut().find(|r| r.0 == "encoder.layer.0.attention.self.key.weight").unwrap();
        r.2 = vec![24, 96]; // same element count, wrong shape
    });
    let err = load_err(&path);
    assert!(err.contains("`encoder.layer.0.attention.self.key.weight`: shape [24, 96] in the file, but the config needs [48, 48]"), "{err}");
}

#[test]
fn unexpected_key_is_an_error_when_strict_and_reported_when_lenient() {
    let (_d, path) = rewrite(|raw| raw.push(("encoder.layer.7.output.dense.bias".into(), Dtype::F32, vec![48], vec![0; 192])));
    let err = load_err(&path);
    assert!(err.contains("`encoder.layer.7.output.dense.bias`: unexpected"), "{err}");
    let (_, report) = load(&path, LoadOptions { strict: false, ..Default::default() }).unwrap();
    assert_eq!(report.unexpected, vec!["encoder.layer.7.output.dense.bias".to_string()]);
}

#[test]
fn duplicate_names_after_prefix_stripping_are_refused() {
    let (_d, path) = rewrite(|raw| {
        let r = raw.iter().find(|r| r.0 == "pooler.dense.bias").unwrap().clone();
        raw.push(("bert.pooler.dense.bias".into(), r.1, r.2, r.3));
    });
    let err = load_err(&path);
    assert!(err.contains("duplicates") && err.contains("pooler.dense.bias"), "{err}");
}

#[test]
fn non_finite_and_non_float_weights_are_refused() {
    let (_d, path) = rewrite(|raw| {
        let r = raw.iter_mut().find(|r| r.0 == "encoder.layer.0.output.LayerNorm.weight").unwrap();
        r.3[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let err = load_err(&path);
    assert!(err.contains("`encoder.layer.0.output.LayerNorm.weight`: non-finite value NaN at element 2"), "{err}");

    let (_d, path) = rewrite(|raw| {
        let r = raw.iter_mut().find(|r| r.0 == "embeddings.LayerNorm.bias").unwrap();
        r.1 = Dtype::I32;
    });
    let err = load_err(&path);
    assert!(err.contains("`embeddings.LayerNorm.bias`: dtype I32 is not supported"), "{err}");
}

#[test]
fn broken_files_give_clear_errors() {
    let good = std::fs::read(fixtures().join("tiny_bert/model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut header_not_json = good.clone();
    header_not_json[8] = b'#';
    let mut offsets_past_end = good[..8 + header_len].to_vec();
    offsets_past_end.extend_from_slice(&good[8 + header_len..good.len() - 4]);
    let mut huge_header = good.clone();
    huge_header[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "header too small"),
        ("seven bytes", vec![1, 0, 0, 0, 0, 0, 0], "header too small"),
        ("truncated header", good[..8 + header_len / 2].to_vec(), "invalid header length"),
        ("header not JSON", header_not_json, "invalid JSON in header"),
        ("data truncated", offsets_past_end, "not a valid safetensors file"),
        ("header length 2^60", huge_header, "header too large"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (what, bytes, says) in cases {
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let err = load_err(&path);
        assert!(err.contains("model.safetensors: not a valid safetensors file") && err.contains(says), "{what}: {err}");
    }
    let err = load_err(&dir.path().join("absent.safetensors"));
    assert!(err.contains("absent.safetensors: No such file"), "{err}");
}

#[test]
fn model_dir_errors_name_the_file() {
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::fast());
    let err = BertModel::from_dir("/nonexistent/model", backend.clone(), LoadOptions::default()).err().unwrap();
    assert!(err.to_string().contains("/nonexistent/model: model folder not found"), "{err}");
    let dir = copy_model("tiny_bert");
    std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": 48, \"num_attention_heads\": 5}").unwrap();
    let err = BertModel::from_dir(dir.path(), backend, LoadOptions::default()).err().unwrap();
    assert!(matches!(err, Error::Config { .. }) && err.to_string().contains("config.json: field `hidden_size`: 48 is not divisible"), "{err}");
}

// ---- configs that do not fit the weights file, and absurd sizes ----------------------------------

/// A copy of tiny_bert whose `config.json` has `edits` applied (field, JSON value).
fn with_config(edits: &[(&str, serde_json::Value)]) -> tempfile::TempDir {
    let dir = copy_model("tiny_bert");
    let path = dir.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (field, value) in edits {
        v[*field] = value.clone();
    }
    std::fs::write(&path, v.to_string()).unwrap();
    dir
}

fn from_dir_err(dir: &Path) -> Error {
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::fast());
    match BertModel::from_dir(dir, backend, LoadOptions::default()) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn an_absurd_layer_count_is_refused_by_the_config_before_anything_is_allocated() {
    // Before the bound this built 16·10⁹ key strings and the process aborted on memory.
    let dir = with_config(&[("num_hidden_layers", 1_000_000_000.into())]);
    let err = from_dir_err(dir.path());
    let msg = err.to_string();
    assert!(matches!(err, Error::Config { ref field, .. } if field == "num_hidden_layers"), "{msg}");
    assert!(msg.contains("config.json: field `num_hidden_layers`: 1000000000 is more than the 1000 supported"), "{msg}");
}

#[test]
fn a_config_that_disagrees_with_the_weights_file_is_refused_naming_the_file() {
    // More layers than the file holds, up to the bound: refused from the header alone.
    for layers in [3usize, 1000] {
        let dir = with_config(&[("num_hidden_layers", layers.into())]);
        let err = from_dir_err(dir.path());
        let msg = err.to_string();
        assert!(matches!(err, Error::Malformed { .. }), "{msg}");
        let want = format!("model.safetensors: the config says num_hidden_layers {layers}, but the file holds 2 encoder layers (encoder.layer.0 to encoder.layer.1)");
        assert!(msg.contains(&want), "{msg}");
    }
    // A vocabulary 10x larger than the file's.
    let dir = with_config(&[("vocab_size", 1200.into())]);
    let msg = from_dir_err(dir.path()).to_string();
    assert!(msg.contains("model.safetensors: tensor `embeddings.word_embeddings.weight`: shape [120, 48] in the file, but the config needs [1200, 48]"), "{msg}");
    // Huge but within every bound (9·10⁶ × 4096 floats, 147 GB): refused from the header, nothing read.
    let dir = with_config(&[("vocab_size", 9_000_000.into()), ("hidden_size", 4096.into()), ("num_attention_heads", 64.into())]);
    let msg = from_dir_err(dir.path()).to_string();
    assert!(msg.contains("model.safetensors: tensor `embeddings.word_embeddings.weight`: shape [120, 48] in the file, but the config needs [9000000, 4096]"), "{msg}");
    // Fewer layers than the file holds: the extra layer's tensors are unexpected (strict) ...
    let dir = with_config(&[("num_hidden_layers", 1.into())]);
    let msg = from_dir_err(dir.path()).to_string();
    assert!(msg.contains("model.safetensors: tensor `encoder.layer.1.attention.output.LayerNorm.bias`: unexpected for a BertModel with this config (and 15 more)"), "{msg}");
    // ... and reported when lenient, so a truncated model still loads on request.
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::fast());
    let (model, report) = BertModel::from_dir(dir.path(), backend, LoadOptions { strict: false, ..Default::default() }).unwrap();
    assert_eq!((model.config().num_hidden_layers, report.unexpected.len(), report.loaded.len()), (1, 16, 5 + 16 + 2));
}

#[test]
fn masks_may_be_bool_but_ids_must_be_i64_or_i32() {
    let cfg = tiny_config();
    let src = fixtures().join("tiny_bert/inputs.safetensors");
    let want = InputBatch::from_file(&src, &cfg).unwrap();
    let raw: Raw = read_raw_safetensors(&src);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inputs.safetensors");
    let narrowed = |name: &str, dtype: Dtype| -> Raw {
        raw.iter()
            .map(|(n, d, s, b)| {
                if n != name {
                    return (n.clone(), *d, s.clone(), b.clone());
                }
                let values = b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()));
                match dtype {
                    Dtype::I32 => (n.clone(), dtype, s.clone(), values.flat_map(|v| (v as i32).to_le_bytes()).collect()),
                    _ => (n.clone(), dtype, s.clone(), values.map(|v| v as u8).collect()),
                }
            })
            .collect()
    };
    // HF masks are often bool: BOOL, U8 and I8 masks give the same batch.
    for dtype in [Dtype::BOOL, Dtype::U8, Dtype::I8, Dtype::I32] {
        write_raw_safetensors(&path, &narrowed("attention_mask", dtype));
        assert_eq!(InputBatch::from_file(&path, &cfg).unwrap(), want, "attention_mask {dtype:?}");
    }
    for name in ["input_ids", "token_type_ids"] {
        write_raw_safetensors(&path, &narrowed(name, Dtype::I32));
        assert_eq!(InputBatch::from_file(&path, &cfg).unwrap(), want, "{name} I32");
        for dtype in [Dtype::BOOL, Dtype::U8, Dtype::I8] {
            write_raw_safetensors(&path, &narrowed(name, dtype));
            let err = InputBatch::from_file(&path, &cfg).unwrap_err().to_string();
            let says = format!("inputs.safetensors: tensor `{name}`: dtype {dtype:?} is not accepted (expected I64 or I32)");
            assert!(err.contains(&says), "{err}");
        }
    }
}
