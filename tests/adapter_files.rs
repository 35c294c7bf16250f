//! Adapter folders in both directions (issue 5): the library's `.bin` and safetensors load and
//! give PyTorch's outputs, what we save equals what the library saves for the same weights,
//! saves are atomic, and broken or hostile files fail with an error that names the problem.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use bert_adapters::io::adapter_files::{
    AdapterDir, AdapterLoadOptions, WeightsFile, CONFIG_FILE, HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE, TORCH_WEIGHTS_FILE, WEIGHTS_FILE,
};
use bert_adapters::io::TensorFile;
use bert_adapters::model::heads::HeadConfig;
use bert_adapters::model::persist::{save_adapter_files, SaveOptions};
use bert_adapters::{Adapter, AdapterConfig, AdapterSetup, Backend, BertConfig, BertModel, CpuBackend, InputBatch, LoadOptions, Tensor};
use common::{member, unzip, zip_members, assert_close, check_outputs, fixtures, read_f32, read_raw_safetensors, write_raw_safetensors, TOL};
use safetensors::Dtype;
use serde_json::Value;
use zip::CompressionMethod;

fn adapters_dir() -> PathBuf {
    fixtures().join("adapters")
}
fn interop() -> PathBuf {
    fixtures().join("interop")
}

fn tiny() -> (BertModel, InputBatch) {
    let (model, _) = BertModel::from_dir(fixtures().join("tiny_bert"), Arc::new(CpuBackend::fast()), LoadOptions::default()).unwrap();
    let batch = InputBatch::from_file(fixtures().join("tiny_bert/inputs.safetensors"), model.config()).unwrap();
    (model, batch)
}

fn tiny_config() -> BertConfig {
    BertConfig::from_file(fixtures().join("tiny_bert/config.json")).unwrap()
}

/// all-MiniLM-L6-v2's shapes, for its adapter fixtures (the model itself is not in the repo).
fn minilm_config() -> BertConfig {
    let json = r#"{"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
        "intermediate_size": 1536, "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2,
        "hidden_act": "gelu", "layer_norm_eps": 1e-12}"#;
    BertConfig::from_json_str(json, Path::new("minilm.json")).unwrap()
}

/// A temp folder holding `files` copied from `src`.
fn copy_dir(src: &Path, files: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in files {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap_or_else(|e| panic!("{}: {e}", src.join(f).display()));
    }
    dir
}

/// The library's `.bin` of `opt_ln_before_after` alone (no safetensors beside it).
fn ln_bin_dir() -> tempfile::TempDir {
    copy_dir(&adapters_dir().join("opt_ln_before_after"), &[CONFIG_FILE, TORCH_WEIGHTS_FILE])
}

fn strict() -> AdapterLoadOptions {
    AdapterLoadOptions::default()
}
fn lenient() -> AdapterLoadOptions {
    AdapterLoadOptions { strict: false, ..AdapterLoadOptions::default() }
}

fn load_err(dir: &Path) -> String {
    let (mut model, _) = tiny();
    match model.load_adapter_with(dir, &strict()) {
        Ok(r) => panic!("{}: loaded as `{}`", dir.display(), r.name),
        Err(e) => e.to_string(),
    }
}

fn host_params(model: &BertModel, name: &str) -> BTreeMap<String, Vec<f32>> {
    let be = model.backend();
    model.adapter(name).unwrap().params().iter().map(|(k, t)| (k.clone(), be.to_host(t).unwrap())).collect()
}

/// The `.bin` fixture with `edit` applied to its members, in a folder with its config.
fn edited_bin(edit: impl FnOnce(&mut Vec<(String, Vec<u8>)>)) -> tempfile::TempDir {
    let dir = ln_bin_dir();
    let path = dir.path().join(TORCH_WEIGHTS_FILE);
    let mut members = unzip(&std::fs::read(&path).unwrap());
    edit(&mut members);
    std::fs::write(&path, zip_members(&members, CompressionMethod::Stored)).unwrap();
    dir
}


/// The houlsby fixture with its safetensors rewritten by `edit` (name, dtype, shape, bytes).
fn edited_safetensors(edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) -> tempfile::TempDir {
    let dir = copy_dir(&adapters_dir().join("houlsby"), &[CONFIG_FILE, WEIGHTS_FILE]);
    let path = dir.path().join(WEIGHTS_FILE);
    let mut tensors = read_raw_safetensors(&path);
    edit(&mut tensors);
    write_raw_safetensors(&path, &tensors);
    dir
}

fn edited_config(src: &str, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> tempfile::TempDir {
    let dir = copy_dir(&adapters_dir().join(src), &[CONFIG_FILE, WEIGHTS_FILE]);
    let path = dir.path().join(CONFIG_FILE);
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    dir
}

fn assert_has(err: &str, says: &[&str]) {
    for s in says {
        assert!(err.contains(s), "`{s}` not in: {err}");
    }
}

// ---- the library's files load and give PyTorch's outputs ----------------------------------------

#[test]
fn library_bin_gives_pytorch_outputs_and_equals_its_safetensors() {
    let dir = ln_bin_dir();
    for backend in [Arc::new(CpuBackend::fast()) as Arc<dyn Backend>, Arc::new(CpuBackend::reference())] {
        let (mut model, _) = BertModel::from_dir(fixtures().join("tiny_bert"), backend, LoadOptions::default()).unwrap();
        let batch = InputBatch::from_file(fixtures().join("tiny_bert/inputs.safetensors"), model.config()).unwrap();
        let report = model.load_adapter_with(dir.path(), &strict()).unwrap();
        assert_eq!((report.name.as_str(), report.weights_file.file_name().unwrap().to_str().unwrap()), ("opt_ln_before_after", TORCH_WEIGHTS_FILE));
        assert!(report.missing.is_empty() && report.unexpected.is_empty() && !report.head);
        model.set_active_adapters(Some(AdapterSetup::Single("opt_ln_before_after".into()))).unwrap();
        let expected = TensorFile::open(adapters_dir().join("expected_opt_ln_before_after.safetensors")).unwrap();
        check_outputs("opt_ln_before_after (.bin)", &model, &batch, &expected);
    }
    // The same weights through the library's safetensors copy: bit-identical parameters.
    let (mut a, _) = tiny();
    let (mut b, _) = tiny();
    a.load_adapter(dir.path()).unwrap();
    b.load_adapter(adapters_dir().join("opt_ln_before_after")).unwrap();
    assert_eq!(host_params(&a, "opt_ln_before_after"), host_params(&b, "opt_ln_before_after"));
}

#[test]
fn interop_bin_fixtures_give_pytorch_outputs() {
    for (dir, name, expected) in [
        ("f16_bin", "fp16", interop().join("expected_f16.safetensors")),
        ("bf16_bin", "brain", interop().join("expected_bf16.safetensors")),
        ("legacy_bin", "pfeiffer", adapters_dir().join("expected_pfeiffer.safetensors")),
    ] {
        let (mut model, batch) = tiny();
        assert_eq!(model.load_adapter(interop().join(dir)).unwrap(), name);
        model.set_active_adapters(Some(AdapterSetup::Single(name.into()))).unwrap();
        check_outputs(dir, &model, &batch, &TensorFile::open(&expected).unwrap());
    }
    let f16 = WeightsFile::open(interop().join("f16_bin").join(TORCH_WEIGHTS_FILE)).unwrap();
    assert!(f16.tensors().iter().all(|t| t.dtype == "F16"), "{:?}", f16.tensors());
    let bf16 = WeightsFile::open(interop().join("bf16_bin").join(TORCH_WEIGHTS_FILE)).unwrap();
    assert!(bf16.tensors().iter().all(|t| t.dtype == "BF16"));
}

#[test]
fn flex_model_bin_with_bert_prefix_and_head_gives_pytorch_outputs_and_logits() {
    let (mut model, batch) = tiny();
    let report = model.load_adapter_with(interop().join("flex_bin"), &strict()).unwrap();
    assert!(report.head, "{report:?}");
    let keys = WeightsFile::open(interop().join("flex_bin").join(TORCH_WEIGHTS_FILE)).unwrap();
    assert!(keys.tensors().iter().all(|t| t.name.starts_with("bert.")), "the fixture should carry `bert.` keys");
    model.set_active_adapters(Some(AdapterSetup::Single("flex".into()))).unwrap();
    let expected = TensorFile::open(interop().join("expected_flex.safetensors")).unwrap();
    check_outputs("flex_bin", &model, &batch, &expected);
    let out = model.forward(&batch).unwrap();
    let be = model.backend().clone();
    let head = model.head("flex").expect("head restored");
    let (logits, _) = head.forward(be.as_ref(), &out.last_hidden_state, out.pooler_output.as_ref()).unwrap();
    assert_close("flex logits", &be.to_host(&logits).unwrap(), &read_f32(&expected, "logits").0, TOL);
    // Without the head option the adapter alone loads.
    let (mut bare, _) = tiny();
    let r = bare.load_adapter_with(interop().join("flex_bin"), &AdapterLoadOptions { with_head: false, ..strict() }).unwrap();
    assert!(!r.head && bare.head("flex").is_none());
    // Under another name the head follows the adapter.
    let r = bare.load_adapter_with(interop().join("flex_bin"), &AdapterLoadOptions { load_as: Some("other".into()), ..strict() }).unwrap();
    assert!(r.head && bare.head("other").is_some());
}

#[test]
fn views_into_one_storage_are_read_at_their_offsets_and_strided_tensors_refused() {
    let views = WeightsFile::open(interop().join("views.bin")).unwrap();
    let want = TensorFile::open(interop().join("views_expected.safetensors")).unwrap();
    for name in ["a", "b", "c"] {
        let t = views.tensors().iter().find(|t| t.name == name).unwrap();
        let (data, shape) = read_f32(&want, name);
        assert_eq!((views.read_f32(name).unwrap(), &t.shape), (data, &shape), "{name}");
    }
    let err = WeightsFile::open(interop().join("transposed.bin")).err().unwrap().to_string();
    assert_has(&err, &["transposed.bin", "only contiguous tensors are accepted"]);
}

// ---- our files equal the library's ---------------------------------------------------------------

/// Load every fixture folder the library wrote, save it with ours, and compare: the config file
/// byte for byte (so also equal after parsing), the tensors by name, dtype, shape and data.
#[test]
fn saved_files_equal_the_library_files_for_the_same_weights() {
    let backend = CpuBackend::fast();
    let mut checked = 0;
    for entry in std::fs::read_dir(adapters_dir()).unwrap() {
        let src = entry.unwrap().path();
        if !src.join(WEIGHTS_FILE).is_file() {
            continue;
        }
        let bert = if src.file_name().unwrap().to_str().unwrap().starts_with("minilm_") { minilm_config() } else { tiny_config() };
        let folder = AdapterDir::open(&src).unwrap();
        let loaded = folder.load(&strict(), &bert, &backend).unwrap();
        let out = tempfile::tempdir().unwrap();
        let opts = SaveOptions { with_head: true, model_name: folder.config.model_name.clone() };
        save_adapter_files(out.path(), &loaded.adapter, None, &bert, &backend, &opts).unwrap();

        let ours = std::fs::read_to_string(out.path().join(CONFIG_FILE)).unwrap();
        let theirs = std::fs::read_to_string(src.join(CONFIG_FILE)).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&ours).unwrap(), serde_json::from_str::<Value>(&theirs).unwrap(), "{}", src.display());
        assert_eq!(ours, theirs, "{}: not byte-identical", src.display());
        let (a, b) = (read_raw_safetensors(&out.path().join(WEIGHTS_FILE)), read_raw_safetensors(&src.join(WEIGHTS_FILE)));
        assert_eq!(a.len(), b.len(), "{}", src.display());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!((&x.0, x.1, &x.2), (&y.0, y.1, &y.2), "{}", src.display());
            assert!(x.3 == y.3, "{}: data of `{}` differs", src.display(), x.0);
        }
        let meta = safetensors::SafeTensors::read_metadata(&std::fs::read(out.path().join(WEIGHTS_FILE)).unwrap()).unwrap().1;
        assert_eq!(meta.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));
        checked += 1;
    }
    assert!(checked >= 18, "only {checked} fixture folders compared");
}

#[test]
fn head_files_equal_the_library_head_files() {
    let (mut model, _) = tiny();
    model.load_adapter_with(interop().join("flex_bin"), &strict()).unwrap();
    let out = tempfile::tempdir().unwrap();
    model.save_adapter_with(out.path(), "flex", SaveOptions { with_head: true, model_name: "tests/fixtures/tiny_bert".into() }).unwrap();
    let ours = std::fs::read_to_string(out.path().join(HEAD_CONFIG_FILE)).unwrap();
    assert_eq!(ours, std::fs::read_to_string(interop().join("flex_bin").join(HEAD_CONFIG_FILE)).unwrap());
    let theirs = WeightsFile::open(interop().join("flex_bin/pytorch_model_head.bin")).unwrap();
    let saved = read_raw_safetensors(&out.path().join(HEAD_WEIGHTS_FILE));
    assert_eq!(saved.len(), theirs.tensors().len());
    for (name, dtype, shape, bytes) in saved {
        let t = theirs.tensors().iter().find(|t| t.name == name).unwrap_or_else(|| panic!("{name} not in the library's head"));
        let data: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!((dtype, &shape, data), (Dtype::F32, &t.shape, theirs.read_f32(&name).unwrap()), "{name}");
    }
    // The adapter keys lose the flex model's `bert.` prefix, as a BertModel saves them.
    let keys = read_raw_safetensors(&out.path().join(WEIGHTS_FILE));
    assert!(keys.iter().all(|k| k.0.starts_with("encoder.") || k.0.starts_with("invertible_adapters.")));
    // Saving without the head removes the stale head files, so a reload gets no head.
    model.save_adapter_with(out.path(), "flex", SaveOptions { with_head: false, ..SaveOptions::default() }).unwrap();
    assert!(!out.path().join(HEAD_CONFIG_FILE).exists() && !out.path().join(HEAD_WEIGHTS_FILE).exists());
}

#[test]
fn save_then_load_round_trips_exactly_under_a_new_name() {
    for name in ["houlsby_inv", "opt_ln_before_after", "opt_scaling_channel", "opt_rf_map", "opt_gating", "opt_leave_out"] {
        let (mut model, batch) = tiny();
        model.load_adapter(adapters_dir().join(name)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        model.save_adapter(dir.path(), name).unwrap();
        let (mut again, _) = tiny();
        let report = again.load_adapter_with(dir.path(), &AdapterLoadOptions { load_as: Some("renamed".into()), ..strict() }).unwrap();
        assert_eq!((report.name.as_str(), report.saved_name.as_str()), ("renamed", name));
        let rename = |m: BTreeMap<String, Vec<f32>>| -> BTreeMap<String, Vec<f32>> {
            m.into_iter().map(|(k, v)| (k.replace(&format!("adapters.{name}."), "adapters.renamed."), v)).collect()
        };
        assert_eq!(rename(host_params(&model, name)), host_params(&again, "renamed"), "{name}");
        model.set_active_adapters(Some(AdapterSetup::Single(name.into()))).unwrap();
        again.set_active_adapters(Some(AdapterSetup::Single("renamed".into()))).unwrap();
        let (x, y) = (model.forward(&batch).unwrap(), again.forward(&batch).unwrap());
        assert_eq!(x.last_hidden_state.cpu_data().unwrap(), y.last_hidden_state.cpu_data().unwrap(), "{name}");
    }
}

#[test]
fn a_trained_head_is_saved_and_restored_with_its_adapter() {
    let (mut model, batch) = tiny();
    model.add_adapter("task", AdapterConfig::named("pfeiffer").unwrap()).unwrap();
    model.add_classification_head("task", HeadConfig::classification(4)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save_adapter(dir.path(), "task").unwrap();
    let text = std::fs::read_to_string(dir.path().join(HEAD_CONFIG_FILE)).unwrap();
    assert!(text.contains("\"model_class\": \"BertAdapterModel\"") && text.contains("\"num_labels\": 4"), "{text}");
    let (mut again, _) = tiny();
    assert!(again.load_adapter_with(dir.path(), &strict()).unwrap().head);
    let be = model.backend().clone();
    model.set_active_adapters(Some(AdapterSetup::Single("task".into()))).unwrap();
    again.set_active_adapters(Some(AdapterSetup::Single("task".into()))).unwrap();
    let logits = |m: &BertModel| {
        let out = m.forward(&batch).unwrap();
        be.to_host(&m.head("task").unwrap().forward(be.as_ref(), &out.last_hidden_state, None).unwrap().0).unwrap()
    };
    assert_eq!(logits(&model), logits(&again));
}

// ---- atomic saves -------------------------------------------------------------------------------

fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn a_save_that_fails_half_way_leaves_the_earlier_save_intact() {
    let dir = tempfile::tempdir().unwrap();
    let (mut first, _) = tiny();
    first.load_adapter_as(adapters_dir().join("pfeiffer"), Some("a")).unwrap();
    first.save_adapter(dir.path(), "a").unwrap();
    let before = snapshot(dir.path());
    assert_eq!(before.keys().collect::<Vec<_>>(), [WEIGHTS_FILE, CONFIG_FILE]);

    // Other weights and another config under the same name.
    let (mut second, _) = tiny();
    second.load_adapter_as(adapters_dir().join("houlsby"), Some("a")).unwrap();

    // 1. A link planted at the temporary name earlier versions used (`.NAME.tmp-PID`) is never
    //    written through: temporaries are created with create_new under an unpredictable name.
    let tmp = dir.path().join(format!(".{WEIGHTS_FILE}.tmp-{}", std::process::id()));
    let target = dir.path().join("victim");
    std::fs::write(&target, b"keep").unwrap();
    std::os::unix::fs::symlink(&target, &tmp).unwrap();
    first.save_adapter(dir.path(), "a").unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    std::fs::remove_file(&target).unwrap();
    std::fs::remove_file(&tmp).unwrap();
    assert_eq!(snapshot(dir.path()), before);

    // The new save replaces both files.
    second.save_adapter(dir.path(), "a").unwrap();
    let (mut check, _) = tiny();
    check.load_adapter(dir.path()).unwrap();
    assert_eq!(host_params(&check, "a"), host_params(&second, "a"));
    assert_eq!(snapshot(dir.path()).len(), 2);
}

/// A real mid-write failure: the save runs in a child process whose file-size limit (with
/// SIGXFSZ ignored, so writes fail with EFBIG) cuts the weights file off after a few KB.
#[test]
fn a_save_cut_off_mid_write_leaves_the_earlier_save_intact() {
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("a");
    let tiny_dir = fixtures().join("tiny_bert");
    let convert = |src: &Path, limit: Option<u32>| {
        let cmd = format!(
            "trap '' XFSZ; {} exec \"$0\" adapter convert \"$1\" \"$2\" --model \"$3\" --name a",
            limit.map_or(String::new(), |kb| format!("ulimit -f {kb};"))
        );
        Command::new("sh").arg("-c").arg(cmd).arg(env!("CARGO_BIN_EXE_bert-adapters")).arg(src).arg(&dest).arg(&tiny_dir).output().unwrap()
    };
    assert!(convert(&adapters_dir().join("pfeiffer"), None).status.success());
    let before = snapshot(&dest);
    let houlsby = adapters_dir().join("houlsby");
    assert!(std::fs::metadata(houlsby.join(WEIGHTS_FILE)).unwrap().len() > 4 * 1024);
    let o = convert(&houlsby, Some(4));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the size limit did not stop the save");
    assert!(err.contains(WEIGHTS_FILE) && err.contains("too large"), "{err}");
    assert_eq!(snapshot(&dest), before, "the earlier save changed");
    assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 2, "a temporary file was left behind");
    assert!(convert(&houlsby, None).status.success());
    assert_ne!(snapshot(&dest), before);
}

#[test]
fn saving_refuses_unknown_names_and_non_finite_weights() {
    let (mut model, _) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let err = model.save_adapter(dir.path(), "nope").unwrap_err().to_string();
    assert_has(&err, &["no adapter named `nope`"]);
    let mut adapter = Adapter::init("a", AdapterConfig::named("pfeiffer").unwrap(), model.config(), 3, model.backend().as_ref()).unwrap();
    let key = "encoder.layer.1.output.adapters.a.adapter_up.bias";
    let mut bad = vec![0.0f32; 48];
    bad[7] = f32::NAN;
    adapter.params_mut().insert(key.into(), Tensor::from_vec(bad, &[48]).unwrap());
    model.insert_adapter(adapter).unwrap();
    let err = model.save_adapter(dir.path(), "a").unwrap_err().to_string();
    assert_has(&err, &[key, "NaN"]);
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "nothing may be written");
}

// ---- strict loading -----------------------------------------------------------------------------

#[test]
fn strict_loads_name_what_does_not_fit() {
    let up = "encoder.layer.0.output.adapters.houlsby.adapter_up.weight";
    let cases: Vec<(tempfile::TempDir, Vec<&str>)> = vec![
        (edited_safetensors(|t| t.retain(|x| x.0 != up)), vec![up, "missing", "[48, 3]"]),
        (
            edited_safetensors(|t| t.push(("encoder.layer.0.output.adapters.houlsby.extra".into(), Dtype::F32, vec![1], vec![0; 4]))),
            vec!["adapters.houlsby.extra", "unexpected"],
        ),
        (
            edited_safetensors(|t| t.push(("encoder.layer.0.output.adapters.other.adapter_up.bias".into(), Dtype::F32, vec![1], vec![0; 4]))),
            vec!["belongs to adapter `other`, not to `houlsby`"],
        ),
        (
            edited_safetensors(|t| t.push(("encoder.layer.5.output.adapters.houlsby.adapter_up.bias".into(), Dtype::F32, vec![1], vec![0; 4]))),
            vec!["layer 5 does not exist: the model has 2 layers"],
        ),
        (
            edited_safetensors(|t| {
                let x = t.iter_mut().find(|x| x.0 == up).unwrap();
                x.2 = vec![3, 48];
            }),
            vec![up, "shape [3, 48] in the file, but the config needs [48, 3]"],
        ),
        (
            edited_safetensors(|t| {
                let x = t.iter_mut().find(|x| x.0 == up).unwrap();
                x.1 = Dtype::I32;
            }),
            vec![up, "dtype I32 is not supported"],
        ),
        (
            edited_safetensors(|t| {
                let x = t.iter_mut().find(|x| x.0 == up).unwrap();
                x.3[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
            }),
            vec![up, "non-finite value NaN at element 2"],
        ),
        (
            edited_safetensors(|t| {
                let x = t.iter_mut().find(|x| x.0 == up).unwrap();
                x.3[0..4].copy_from_slice(&f32::NEG_INFINITY.to_le_bytes());
            }),
            vec![up, "non-finite value -inf at element 0"],
        ),
        (
            edited_safetensors(|t| {
                let x = t[0].clone();
                t.push((format!("bert.{}", x.0), x.1, x.2, x.3));
            }),
            vec!["names the same parameter as"],
        ),
        (edited_config("houlsby", |c| c["hidden_size"] = 64.into()), vec![CONFIG_FILE, "hidden_size", "64 does not match the model's hidden size 48"]),
        (edited_config("houlsby", |c| c["config"]["leave_out"] = serde_json::json!([7])), vec!["config.leave_out", "layer 7 does not exist"]),
        (
            edited_config("houlsby", |c| c["config"]["reduction_factor"] = serde_json::json!({"3": 4, "default": 16})),
            vec!["config.reduction_factor", "layer 3"],
        ),
        (edited_config("houlsby", |c| c["config"]["reduction_factor"] = 0.001.into()), vec!["bottleneck of 48000", "more than 64×"]),
        (edited_config("houlsby", |c| c["config"]["mh_adapter"] = false.into()), vec!["attention.output.adapters.houlsby", "unexpected"]),
        (edited_config("houlsby", |c| c["model_type"] = "t5".into()), vec!["model_type", "`t5` is not supported"]),
        (edited_config("houlsby", |c| c["name"] = "a.b".into()), vec![CONFIG_FILE, "field `name`", "contains '.'"]),
        (edited_config("houlsby", |c| drop(c.remove("config"))), vec!["field `config`: missing"]),
        (edited_config("houlsby", |c| c["config"]["scaling"] = 1.into()), vec!["config.scaling", "unknown scaling type 1"]),
    ];
    for (dir, says) in cases {
        let err = load_err(dir.path());
        assert_has(&err, &says);
    }
    // An adapter of that name already exists: refused before anything is read.
    let (mut model, _) = tiny();
    model.load_adapter(adapters_dir().join("houlsby")).unwrap();
    let err = model.load_adapter(adapters_dir().join("houlsby")).unwrap_err().to_string();
    assert_has(&err, &["an adapter named `houlsby` already exists"]);
    // ln_before's two names for one LayerNorm must hold the same values.
    let dir = copy_dir(&adapters_dir().join("opt_ln_before_after"), &[CONFIG_FILE, WEIGHTS_FILE]);
    let path = dir.path().join(WEIGHTS_FILE);
    let mut t = read_raw_safetensors(&path);
    let alias = t.iter_mut().find(|x| x.0.ends_with("output.adapters.opt_ln_before_after.adapter_down.0.bias")).unwrap();
    alias.3[0] ^= 1;
    write_raw_safetensors(&path, &t);
    assert_has(&load_err(dir.path()), &["adapter_down.0.bias", "differs from", "adapter_norm_before.bias"]);
    // Folder and file problems.
    assert_has(&load_err(Path::new("/nonexistent/adapter")), &["/nonexistent/adapter", "adapter folder not found"]);
    let only_config = copy_dir(&adapters_dir().join("houlsby"), &[CONFIG_FILE]);
    assert_has(&load_err(only_config.path()), &["no adapter weights", WEIGHTS_FILE, TORCH_WEIGHTS_FILE]);
}

#[test]
fn lenient_loads_report_instead_of_failing() {
    let up = "encoder.layer.0.output.adapters.houlsby.adapter_up.weight";
    let dir = edited_safetensors(|t| {
        t.retain(|x| x.0 != up);
        t.push(("encoder.layer.0.output.adapters.houlsby.extra".into(), Dtype::F32, vec![1], vec![0; 4]));
    });
    let (mut model, _) = tiny();
    let report = model.load_adapter_with(dir.path(), &lenient()).unwrap();
    assert_eq!(report.missing, [up]);
    assert_eq!(report.unexpected, ["encoder.layer.0.output.adapters.houlsby.extra"]);
    let p = host_params(&model, "houlsby");
    assert_eq!(p[up].len(), 48 * 3);
    // Mis-shaped tensors stay an error, as in the library.
    let dir = edited_safetensors(|t| t.iter_mut().find(|x| x.0 == up).unwrap().2 = vec![3, 48]);
    let (mut model, _) = tiny();
    assert_has(&model.load_adapter_with(dir.path(), &lenient()).unwrap_err().to_string(), &["shape [3, 48]"]);
    // A config naming layers the model lacks becomes a note.
    let dir = edited_config("houlsby", |c| c["config"]["leave_out"] = serde_json::json!([9]));
    let (mut model, _) = tiny();
    let report = model.load_adapter_with(dir.path(), &lenient()).unwrap();
    assert!(report.notes.iter().any(|n| n.contains("layer 9 does not exist")), "{report:?}");
}

#[test]
fn bert_prefixed_and_renamed_keys_load_identically() {
    let dir = edited_safetensors(|t| t.iter_mut().for_each(|x| x.0 = format!("bert.{}", x.0)));
    let (mut a, _) = tiny();
    let (mut b, _) = tiny();
    a.load_adapter(dir.path()).unwrap();
    b.load_adapter(adapters_dir().join("houlsby")).unwrap();
    assert_eq!(host_params(&a, "houlsby"), host_params(&b, "houlsby"));
    assert_eq!(b.load_adapter_as(adapters_dir().join("houlsby"), Some("copy")).unwrap(), "copy");
    let renamed: BTreeMap<_, _> = host_params(&b, "copy").into_iter().map(|(k, v)| (k.replace(".copy.", ".houlsby."), v)).collect();
    assert_eq!(renamed, host_params(&b, "houlsby"));
}

// ---- hostile safetensors ------------------------------------------------------------------------

#[test]
fn broken_safetensors_files_give_clear_errors_without_big_allocations() {
    let good = std::fs::read(adapters_dir().join("houlsby").join(WEIGHTS_FILE)).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let with_header = |json: &str, data: usize| {
        let mut b = (json.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(json.as_bytes());
        b.extend(std::iter::repeat_n(0u8, data));
        b
    };
    let mut huge_len = good.clone();
    huge_len[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        ("empty", vec![], vec!["empty file"]),
        ("5 bytes", good[..5].to_vec(), vec!["5 bytes: too short"]),
        ("cut in the header", good[..header_len / 2].to_vec(), vec!["header length", "runs past the end of the file"]),
        ("cut in the data", good[..good.len() - 10].to_vec(), vec!["do not end at the end of the file"]),
        ("header length u64::MAX", huge_len, vec!["header length 18446744073709551615 runs past the end"]),
        ("header not JSON", with_header("{not json at all", 0), vec!["header is not valid JSON"]),
        ("header a list", with_header("[1, 2, 3]", 0), vec!["header is not valid JSON"]),
        (
            "offsets past the data",
            with_header(r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 4),
            vec!["do not end at the end of the file"],
        ),
        (
            "overlapping offsets",
            with_header(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                12,
            ),
            vec!["data offsets out of order, overlapping, or leaving a gap"],
        ),
        (
            "offsets not matching the shape",
            with_header(r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8),
            vec!["do not match its dtype and shape"],
        ),
        (
            "a terabyte tensor in a small file",
            with_header(r#"{"w":{"dtype":"F32","shape":[274877906944],"data_offsets":[0,1099511627776]}}"#, 16),
            vec!["do not end at the end of the file"],
        ),
        (
            "shape overflowing usize",
            with_header(r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}}"#, 16),
            vec!["overflows"],
        ),
    ];
    for (what, bytes, says) in cases {
        let dir = copy_dir(&adapters_dir().join("houlsby"), &[CONFIG_FILE]);
        std::fs::write(dir.path().join(WEIGHTS_FILE), &bytes).unwrap();
        let err = load_err(dir.path());
        assert!(err.contains(WEIGHTS_FILE), "{what}: the file is not named: {err}");
        for s in says {
            assert!(err.contains(s), "{what}: `{s}` not in: {err}");
        }
    }
    // Every truncation of a valid file is refused, none panics.
    for cut in (0..good.len()).step_by(97) {
        assert!(WeightsFile::from_bytes(good[..cut].to_vec(), Path::new("cut")).is_err(), "cut at {cut}");
    }
}

#[test]
fn broken_config_files_give_clear_errors() {
    for (text, says) in [
        ("", "empty file"),
        ("{\"name\": ", "not valid JSON"),
        ("[]", "expected a JSON object"),
        ("{\"config\": {}}", "field `name`: missing"),
        ("{\"name\": 3}", "field `name`: expected a string"),
        ("{\"name\": \"x\", \"hidden_size\": -1, \"config\": {}}", "field `hidden_size`: expected a positive integer"),
        ("{\"name\": \"x\", \"config\": {\"mh_adapter\": true}}", "config.output_adapter"),
    ] {
        let dir = copy_dir(&adapters_dir().join("houlsby"), &[WEIGHTS_FILE]);
        std::fs::write(dir.path().join(CONFIG_FILE), text).unwrap();
        let err = load_err(dir.path());
        assert_has(&err, &[CONFIG_FILE, says]);
    }
    let dir = copy_dir(&adapters_dir().join("houlsby"), &[WEIGHTS_FILE]);
    std::fs::write(dir.path().join(CONFIG_FILE), [0xff, 0xfe, b'{']).unwrap();
    assert_has(&load_err(dir.path()), &["not UTF-8"]);
}

// ---- hostile torch archives ---------------------------------------------------------------------

/// A protocol-2 pickle that, if a real unpickler ran it, would run `touch <marker>`.
fn evil_pickle(marker: &Path) -> Vec<u8> {
    let cmd = format!("touch {}", marker.display());
    let mut p = b"\x80\x02cposix\nsystem\nq\x00X".to_vec();
    p.extend_from_slice(&(cmd.len() as u32).to_le_bytes());
    p.extend_from_slice(cmd.as_bytes());
    p.extend_from_slice(b"\x85R.");
    p
}

#[test]
fn hostile_torch_archives_are_refused_and_nothing_is_executed() {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("pwned");
    let evil = edited_bin(|m| *member(m, "data.pkl") = evil_pickle(&marker));
    let err = load_err(evil.path());
    assert_has(&err, &[TORCH_WEIGHTS_FILE, "refusing to import `posix.system`", "nothing was executed"]);
    assert!(!marker.exists());
    // A pickle that builds objects (INST) is refused by opcode name.
    let inst = edited_bin(|m| *member(m, "data.pkl") = b"\x80\x02(X\x01\x00\x00\x00aios\nsystem\n.".to_vec());
    assert_has(&load_err(inst.path()), &["opcode INST (0x69) is not allowed"]);
    // A dict of something other than tensors.
    let ints = edited_bin(|m| *member(m, "data.pkl") = b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x01s.".to_vec());
    assert_has(&load_err(ints.path()), &["maps a str to an int, expected str to tensor"]);

    let cases: Vec<(&str, tempfile::TempDir, Vec<&str>)> = vec![
        ("no data.pkl", edited_bin(|m| m.retain(|(n, _)| !n.ends_with("data.pkl"))), vec!["no `<archive>/data.pkl` member"]),
        ("storage missing", edited_bin(|m| m.retain(|(n, _)| !n.ends_with("data/3"))), vec!["its storage `pytorch_adapter/data/3` is not in the archive"]),
        ("storage too short", edited_bin(|m| member(m, "data/3").truncate(8)), vec!["holds 8 bytes, but the pickle declares 3 F32 elements"]),
        ("big-endian", edited_bin(|m| *member(m, "byteorder") = b"big".to_vec()), vec!["byte order `big`: only little-endian"]),
        ("NaN", edited_bin(|m| member(m, "data/3")[4..8].copy_from_slice(&f32::NAN.to_le_bytes())), vec!["non-finite value NaN at element 1"]),
        ("truncated pickle", edited_bin(|m| member(m, "data.pkl").truncate(3000)), vec!["data.pkl", "truncated"]),
    ];
    for (what, dir, says) in cases {
        let err = load_err(dir.path());
        assert!(err.contains(TORCH_WEIGHTS_FILE), "{what}: {err}");
        for s in says {
            assert!(err.contains(s), "{what}: `{s}` not in: {err}");
        }
    }
    // Not a zip, a legacy (pre-1.6) torch file, an empty file, every truncation.
    let good = std::fs::read(adapters_dir().join("opt_ln_before_after").join(TORCH_WEIGHTS_FILE)).unwrap();
    for (bytes, says) in [
        (b"PK\x03\x04 this is not really a zip".to_vec(), "not a readable zip archive"),
        (b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.".to_vec(), "legacy (pre-zip"),
    ] {
        let err = WeightsFile::from_bytes(bytes, Path::new("w.bin")).err().unwrap().to_string();
        assert_has(&err, &["w.bin", says]);
    }
    let empty = ln_bin_dir();
    std::fs::write(empty.path().join(TORCH_WEIGHTS_FILE), b"").unwrap();
    std::fs::remove_file(empty.path().join(CONFIG_FILE)).unwrap();
    std::fs::copy(adapters_dir().join("opt_ln_before_after").join(CONFIG_FILE), empty.path().join(CONFIG_FILE)).unwrap();
    assert_has(&load_err(empty.path()), &[TORCH_WEIGHTS_FILE, "empty file"]);
    for cut in (4..good.len()).step_by(101) {
        assert!(WeightsFile::from_bytes(good[..cut].to_vec(), Path::new("cut.bin")).is_err(), "cut at {cut}");
    }
}

/// Overwrite the uncompressed size a member's central directory entry declares.
fn patch_declared_size(zip: &mut [u8], name: &str, size: u32) {
    let at = (0..zip.len() - 46)
        .find(|&i| zip[i..i + 4] == *b"PK\x01\x02" && zip[i + 46..].starts_with(name.as_bytes()))
        .unwrap_or_else(|| panic!("no central entry for {name}"));
    zip[at + 24..at + 28].copy_from_slice(&size.to_le_bytes());
}

#[test]
fn zip_bombs_are_refused_before_decompressing() {
    let src = std::fs::read(adapters_dir().join("opt_ln_before_after").join(TORCH_WEIGHTS_FILE)).unwrap();
    let mut members = unzip(&src);
    // 1. A real bomb: data.pkl padded to 64 MiB, deflated to a few KB (past the 4 MiB cap).
    let pkl = members.iter().position(|(n, _)| n.ends_with("data.pkl")).unwrap();
    let mut bomb = members.clone();
    bomb[pkl].1.resize(64 << 20, 0);
    let bytes = zip_members(&bomb, CompressionMethod::Deflated);
    assert!(bytes.len() < 1 << 20);
    let err = WeightsFile::from_bytes(bytes, Path::new("bomb.bin")).err().unwrap().to_string();
    assert_has(&err, &["bomb.bin", "data.pkl", "declares 67108864 bytes, more than the 4194304 accepted"]);

    // 2. A member whose declared size exceeds what deflate could produce from its bytes.
    let mut lying = zip_members(&members, CompressionMethod::Deflated);
    patch_declared_size(&mut lying, "pytorch_adapter/data/3", 4_000_000_000);
    let err = WeightsFile::from_bytes(lying, Path::new("lying.bin")).err().unwrap().to_string();
    assert_has(&err, &["pytorch_adapter/data/3", "more than deflate can expand (a zip bomb)"]);

    // 3. A storage that decompresses to far more than its tensor needs is refused unread.
    let s3 = members.iter().position(|(n, _)| n.ends_with("data/3")).unwrap();
    members[s3].1 = vec![0; 32 << 20];
    let big = zip_members(&members, CompressionMethod::Deflated);
    let err = WeightsFile::from_bytes(big, Path::new("big.bin")).err().unwrap().to_string();
    assert_has(&err, &["holds 33554432 bytes, but the pickle declares 3 F32 elements"]);

    // 4. A deflated archive with honest sizes reads like the stored one.
    let honest = zip_members(&unzip(&src), CompressionMethod::Deflated);
    let (a, b) = (WeightsFile::from_bytes(honest, Path::new("d.bin")).unwrap(), WeightsFile::from_bytes(src, Path::new("s.bin")).unwrap());
    for t in a.tensors() {
        assert_eq!(a.read_f32(&t.name).unwrap(), b.read_f32(&t.name).unwrap(), "{}", t.name);
    }
}

#[test]
fn a_storage_far_larger_than_its_tensor_is_refused_unread() {
    // Storage `3` (adapter_down.1.bias, 3 floats) declared and stored as 4,000,000 floats (16 MB
    // of zeros, deflated to ~16 KB): sizes agree, so only the tensors' needs can refuse it.
    let src = std::fs::read(adapters_dir().join("opt_ln_before_after").join(TORCH_WEIGHTS_FILE)).unwrap();
    let mut members = unzip(&src);
    let pkl = member(&mut members, "data.pkl");
    // BINUNICODE '3', BINPUT, BINGET 'cpu', BININT1 3 (the numel), TUPLE: the numel becomes BININT 4e6.
    let at = pkl.windows(7).position(|w| w == b"X\x01\x00\x00\x003q").expect("storage key `3` in the pickle");
    assert_eq!(&pkl[at + 8..at + 13], b"h\x06K\x03t");
    pkl.splice(at + 10..at + 12, [b'J'].into_iter().chain(4_000_000u32.to_le_bytes()));
    *member(&mut members, "data/3") = vec![0; 16_000_000];
    let bytes = zip_members(&members, CompressionMethod::Deflated);
    assert!(bytes.len() < 1 << 20);
    let dir = ln_bin_dir();
    std::fs::write(dir.path().join(TORCH_WEIGHTS_FILE), &bytes).unwrap();
    assert_has(
        &load_err(dir.path()),
        &[TORCH_WEIGHTS_FILE, "storage `pytorch_adapter/data/3` holds 16000000 bytes, but its tensors use only 12 of them", "at most 64 unused bytes"],
    );
}

// ---- the command --------------------------------------------------------------------------------

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bert-adapters"))
}

#[test]
fn convert_command_turns_a_bin_folder_into_ours() {
    let src = ln_bin_dir();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("converted");
    let tiny_dir = fixtures().join("tiny_bert");
    let o = bin().args(["adapter", "convert"]).arg(src.path()).arg(&dest).arg("--model").arg(&tiny_dir).args(["--name", "ln"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("pytorch_adapter.bin, 32 tensors") && stdout.contains("as adapter `ln`"), "{stdout}");
    let (mut model, batch) = tiny();
    assert_eq!(model.load_adapter(&dest).unwrap(), "ln");
    model.set_active_adapters(Some(AdapterSetup::Single("ln".into()))).unwrap();
    check_outputs("converted", &model, &batch, &TensorFile::open(adapters_dir().join("expected_opt_ln_before_after.safetensors")).unwrap());
    let config = std::fs::read_to_string(dest.join(CONFIG_FILE)).unwrap();
    assert!(config.contains("\"model_name\": \"tests/fixtures/tiny_bert\"") && config.contains("\"name\": \"ln\""), "{config}");

    // A head travels along (flex_bin's .bin head becomes model_head.safetensors).
    let flex = out.path().join("flex");
    let o = bin().args(["adapter", "convert"]).arg(interop().join("flex_bin")).arg(&flex).arg("--model").arg(tiny_dir.join("config.json")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(flex.join(HEAD_WEIGHTS_FILE).is_file() && flex.join(HEAD_CONFIG_FILE).is_file());

    // Failures are one line naming the problem.
    for (args, says) in [
        (vec!["adapter", "convert", "/nonexistent", "/tmp/x", "--model", tiny_dir.to_str().unwrap()], "adapter folder not found"),
        (vec!["adapter", "convert", src.path().to_str().unwrap(), "/tmp/x", "--model", "/nonexistent"], "/nonexistent: model folder (or its config.json) not found"),
    ] {
        let o = bin().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says) && err.trim_end().lines().count() == 1, "{args:?}: {err}");
    }
}

/// The files of a folder by name, for comparing two conversions.
fn folder_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap()).map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())).collect()
}

/// Without --model, `adapter convert` takes the hidden size and the layers from the adapter
/// itself (adapter_config.json's hidden_size or the adapter_up shapes; the layers its tensors and
/// leave_out name): every fixture, .bin or safetensors, with or without a head, leave_out or a
/// per-layer reduction factor, converts to the very bytes it converts to checked against its model.
/// What the files do not fix is asked of --model.
#[test]
fn convert_without_a_model_reads_the_shapes_from_the_adapter() {
    let out = tempfile::tempdir().unwrap();
    let tiny_config = fixtures().join("tiny_bert/config.json");
    let minilm = out.path().join("minilm.json");
    std::fs::write(&minilm, r#"{"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
        "intermediate_size": 1536, "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2}"#).unwrap();
    let bin_dir = ln_bin_dir();
    // The library always writes hidden_size; an adapter_config.json without it still converts.
    let no_hidden = copy_dir(&adapters_dir().join("pfeiffer"), &[CONFIG_FILE, WEIGHTS_FILE]);
    let mut config: Value = serde_json::from_slice(&std::fs::read(no_hidden.path().join(CONFIG_FILE)).unwrap()).unwrap();
    assert!(config.as_object_mut().unwrap().remove("hidden_size").is_some());
    std::fs::write(no_hidden.path().join(CONFIG_FILE), serde_json::to_vec(&config).unwrap()).unwrap();
    let cases = [
        (adapters_dir().join("pfeiffer"), &tiny_config, "48 and 2 layers"),
        (adapters_dir().join("houlsby_inv"), &tiny_config, "48 and 2 layers"),
        (adapters_dir().join("opt_leave_out"), &tiny_config, "48 and 2 layers"),
        (adapters_dir().join("opt_rf_map"), &tiny_config, "48 and 2 layers"),
        (bin_dir.path().to_path_buf(), &tiny_config, "48 and 2 layers"),
        (interop().join("flex_bin"), &tiny_config, "48 and 2 layers"),
        (interop().join("legacy_bin"), &tiny_config, "48 and 2 layers"),
        (no_hidden.path().to_path_buf(), &tiny_config, "48 and 2 layers"),
        (adapters_dir().join("minilm_houlsby"), &minilm, "384 and 6 layers"),
    ];
    for (i, (src, model, shapes)) in cases.iter().enumerate() {
        let (alone, checked) = (out.path().join(format!("{i}-alone")), out.path().join(format!("{i}-checked")));
        let o = bin().args(["adapter", "convert"]).arg(src).arg(&alone).output().unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}: {}", src.display(), String::from_utf8_lossy(&o.stderr));
        assert!(stdout.contains(&format!("for a BERT of hidden size {shapes} (from the adapter's own files)")), "{stdout}");
        let o = bin().args(["adapter", "convert"]).arg(src).arg(&checked).arg("--model").arg(model).output().unwrap();
        assert!(o.status.success(), "{}: {}", src.display(), String::from_utf8_lossy(&o.stderr));
        let (a, c) = (folder_files(&alone), folder_files(&checked));
        assert_eq!(a.keys().collect::<Vec<_>>(), c.keys().collect::<Vec<_>>(), "{}", src.display());
        assert!(a == c, "{}: converting without --model wrote other bytes", src.display());
    }

    // Every layer left out and no hidden_size: nothing tells the width, so --model is asked for.
    let bare = tempfile::tempdir().unwrap();
    config["config"]["leave_out"] = serde_json::json!([0, 1]);
    std::fs::write(bare.path().join(CONFIG_FILE), serde_json::to_vec(&config).unwrap()).unwrap();
    write_raw_safetensors(&bare.path().join(WEIGHTS_FILE), &[]);
    let o = bin().args(["adapter", "convert"]).arg(bare.path()).arg(out.path().join("bare")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot tell the hidden size (no hidden_size in adapter_config.json, no adapter_up tensor) from the adapter's own files; give --model DIR"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn run_accepts_bin_adapter_folders() {
    let src = ln_bin_dir();
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("out.safetensors");
    let tiny_dir = fixtures().join("tiny_bert");
    let o = bin()
        .arg("run")
        .arg("--model")
        .arg(&tiny_dir)
        .arg("--inputs")
        .arg(tiny_dir.join("inputs.safetensors"))
        .arg("--out")
        .arg(&file)
        .arg("--adapter")
        .arg(src.path())
        .args(["--active", "opt_ln_before_after"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = TensorFile::open(&file).unwrap();
    let want = TensorFile::open(adapters_dir().join("expected_opt_ln_before_after.safetensors")).unwrap();
    assert_close("run --adapter .bin", &read_f32(&got, "pooler_output").0, &read_f32(&want, "pooler_output").0, TOL);
}

// ---- export for tools/check_interop.py ------------------------------------------------------------

/// An adapter with the config's initialisation, then made large (weights ×25, biases and
/// LayerNorms random) so that a wrong tensor in Python cannot hide under the tolerance.
fn blown_up(model: &BertModel, name: &str, config: AdapterConfig, seed: u64) -> Adapter {
    use rand::{Rng, SeedableRng};
    let mut adapter = Adapter::init(name, config, model.config(), seed, model.backend().as_ref()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 100);
    for (key, t) in adapter.params_mut().iter_mut() {
        let mut data = t.cpu_data_mut().unwrap();
        let norm = key.contains("adapter_norm_") || key.ends_with("scaling");
        for v in data.iter_mut() {
            *v = if norm {
                1.0 + rng.random_range(-0.3f32..0.3)
            } else if key.ends_with(".bias") {
                rng.random_range(-0.5f32..0.5)
            } else {
                *v * 25.0
            };
        }
    }
    adapter
}

/// (case, adapters and their configs, whether each gets a head).
type ExportCase<'a> = (&'a str, Vec<(&'a str, AdapterConfig)>, bool);

/// Saves adapters made here (our initialisation, not the library's) with their outputs, for
/// `tools/check_interop.py` to load in Python and compare. Writes to `$BERT_ADAPTERS_INTEROP_OUT`
/// when set, else to a temporary folder (then it only checks that the export works).
#[test]
fn exports_adapters_for_the_python_interop_check() {
    let keep = std::env::var_os("BERT_ADAPTERS_INTEROP_OUT").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let root = keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&root).unwrap();
    let named = |n: &str, over: Value| AdapterConfig::named(n).unwrap().with_overrides(&over).unwrap();
    let cases: Vec<ExportCase> = vec![
        ("pfeiffer", vec![("rs_pfeiffer", named("pfeiffer", serde_json::json!({})))], false),
        ("houlsby_inv", vec![("rs_houlsby_inv", named("houlsby+inv", serde_json::json!({})))], false),
        (
            "ln_before_after_gating",
            vec![("rs_ln", named("houlsby", serde_json::json!({"ln_before": true, "ln_after": true, "use_gating": true, "scaling": "learned"})))],
            false,
        ),
        (
            "channel_leave_out_rf_map",
            vec![("rs_channel", named("houlsby", serde_json::json!({"scaling": "channel", "leave_out": [1], "reduction_factor": {"0": 4, "default": 16}})))],
            false,
        ),
        ("with_head", vec![("rs_task", named("pfeiffer", serde_json::json!({"non_linearity": "gelu"})))], true),
        (
            "parallel",
            vec![("rs_par_inv", named("pfeiffer+inv", serde_json::json!({}))), ("rs_par", named("pfeiffer", serde_json::json!({"reduction_factor": 8})))],
            false,
        ),
    ];
    let mut manifest = Vec::new();
    for (i, (case, adapters, head)) in cases.into_iter().enumerate() {
        let (mut model, batch) = tiny();
        let mut dirs = Vec::new();
        for (j, (name, config)) in adapters.iter().enumerate() {
            let a = blown_up(&model, name, config.clone(), 1000 + 10 * i as u64 + j as u64);
            model.insert_adapter(a).unwrap();
            if head {
                model.add_classification_head(name, HeadConfig::classification(3)).unwrap();
            }
            let dir = root.join(name);
            model.save_adapter_with(&dir, name, SaveOptions { with_head: true, model_name: "tests/fixtures/tiny_bert".into() }).unwrap();
            dirs.push(name.to_string());
        }
        let names: Vec<String> = adapters.iter().map(|(n, _)| n.to_string()).collect();
        let setup = if names.len() == 1 { AdapterSetup::Single(names[0].clone()) } else { AdapterSetup::Parallel(names.clone()) };
        model.set_active_adapters(Some(setup)).unwrap();
        let out = model.forward(&batch).unwrap();
        let be = model.backend().clone();
        let f32_out = |t: &Tensor| bert_adapters::io::OutTensor::F32 { shape: t.shape().to_vec(), data: be.to_host(t).unwrap() };
        let mut tensors = vec![("last_hidden_state".to_string(), f32_out(&out.last_hidden_state))];
        tensors.push(("pooler_output".into(), f32_out(out.pooler_output.as_ref().unwrap())));
        if head {
            let (logits, _) = model.head(&names[0]).unwrap().forward(be.as_ref(), &out.last_hidden_state, None).unwrap();
            tensors.push(("logits".into(), f32_out(&logits)));
        }
        let outputs = format!("{case}.outputs.safetensors");
        bert_adapters::io::write_safetensors(&root.join(&outputs), &tensors, None).unwrap();
        manifest.push(serde_json::json!({"case": case, "adapters": dirs, "parallel": names.len() > 1, "head": head, "outputs": outputs}));
    }
    let manifest = serde_json::json!({"model": "tests/fixtures/tiny_bert", "inputs": "tests/fixtures/tiny_bert/inputs.safetensors", "cases": manifest});
    std::fs::write(root.join("manifest.json"), serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    // What we wrote loads back here too.
    let (mut model, _) = tiny();
    let report = model.load_adapter_with(root.join("rs_task"), &strict()).unwrap();
    assert!(report.head);
}
