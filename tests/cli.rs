//! The `run` command as outside checks call it: outputs, and one clear line for every bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use bert_adapters::io::TensorFile;
use common::{assert_close, fixtures, read_f32, read_raw_safetensors, write_raw_safetensors};
use safetensors::Dtype;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bert-adapters"))
}

fn tiny() -> PathBuf {
    fixtures().join("tiny_bert")
}

/// Run `bert-adapters run ...`; returns (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = bin().arg("run").args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// The command must fail with exactly one line that contains every one of `says`, and no panic.
fn expect_failure(args: &[&str], says: &[&str]) {
    let (ok, _, err) = run(args);
    assert!(!ok, "{args:?} succeeded");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{args:?} panicked: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: expected one line, got: {err}");
    for s in says {
        assert!(err.contains(s), "{args:?}: `{s}` not in: {err}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn run_inputs_writes_pytorch_equal_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let inputs = tiny().join("inputs.safetensors");
    let (ok, stdout, stderr) = run(&["--model", s(&tiny()), "--inputs", s(&inputs), "--out", s(&out)]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("last_hidden_state [4, 11, 48]"), "{stdout}");
    let got = TensorFile::open(&out).unwrap();
    let want = TensorFile::open(tiny().join("expected.safetensors")).unwrap();
    let mut names = got.names();
    names.sort();
    assert_eq!(names, ["hidden_states.0", "hidden_states.1", "hidden_states.2", "last_hidden_state", "pooler_output"]);
    for name in names {
        assert_eq!(got.info(&name).unwrap().dtype, Dtype::F32);
        assert_close(&name, &read_f32(&got, &name).0, &read_f32(&want, &name).0, 1e-5);
    }
}

#[test]
fn run_text_writes_the_ids_it_used() {
    let Some(model) = common::minilm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let text = fixtures().join("minilm/sentences.txt");
    let (ok, _, stderr) = run(&["--model", s(&model), "--text", s(&text), "--out", s(&out)]);
    assert!(ok, "{stderr}");
    let got = TensorFile::open(&out).unwrap();
    let want = TensorFile::open(fixtures().join("minilm/expected.safetensors")).unwrap();
    for name in ["input_ids", "attention_mask"] {
        assert_eq!(got.info(name).unwrap().dtype, Dtype::I64);
        assert_eq!(got.read_i64(name).unwrap(), want.read_i64(name).unwrap(), "{name}");
    }
    assert_eq!(got.info("last_hidden_state").unwrap().shape, vec![5, 12, 384]);
    assert!(got.contains("pooler_output") && got.contains("hidden_states.6"));

    let bad = dir.path().join("latin1.txt");
    std::fs::write(&bad, b"caf\xe9\n").unwrap();
    expect_failure(&["--model", s(&model), "--text", s(&bad), "--out", s(&out)], &["latin1.txt", "line 1: invalid UTF-8"]);
}

/// Rewrite the tiny inputs with one tensor replaced (or removed, when `tensor` is None).
fn inputs_with(dir: &Path, name: &str, tensor: Option<(Dtype, Vec<usize>, Vec<u8>)>) -> PathBuf {
    let mut raw = read_raw_safetensors(&tiny().join("inputs.safetensors"));
    raw.retain(|r| r.0 != name);
    if let Some((d, shape, bytes)) = tensor {
        raw.push((name.to_string(), d, shape, bytes));
    }
    let path = dir.join(format!("inputs_{name}.safetensors"));
    write_raw_safetensors(&path, &raw);
    path
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn bad_inputs_exit_nonzero_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out.safetensors");
    let model = tiny();
    let go = |inputs: &Path, says: &[&str]| expect_failure(&["--model", s(&model), "--inputs", s(inputs), "--out", s(&out)], says);

    go(&d.join("nope.safetensors"), &["nope.safetensors", "No such file"]);
    std::fs::write(d.join("garbage.safetensors"), b"this is not a safetensors file at all").unwrap();
    go(&d.join("garbage.safetensors"), &["garbage.safetensors", "not a valid safetensors file"]);
    let good = std::fs::read(tiny().join("inputs.safetensors")).unwrap();
    std::fs::write(d.join("truncated.safetensors"), &good[..good.len() - 10]).unwrap();
    go(&d.join("truncated.safetensors"), &["truncated.safetensors", "not a valid safetensors file"]);

    let mut ids: Vec<i64> = vec![5; 4 * 11];
    let p = inputs_with(d, "input_ids", Some((Dtype::F32, vec![4, 11], vec![0; 4 * 44])));
    go(&p, &["tensor `input_ids`", "dtype F32 is not an integer type"]);
    let p = inputs_with(d, "input_ids", Some((Dtype::I64, vec![4, 11, 1], i64_bytes(&ids))));
    go(&p, &["tensor `input_ids`", "shape [4, 11, 1] is not [batch, seq_len]"]);
    ids[13] = 120;
    let p = inputs_with(d, "input_ids", Some((Dtype::I64, vec![4, 11], i64_bytes(&ids))));
    go(&p, &["tensor `input_ids`", "value 120 at [1, 2] is out of range (must be < vocab_size 120)"]);
    ids[13] = -1;
    let p = inputs_with(d, "input_ids", Some((Dtype::I64, vec![4, 11], i64_bytes(&ids))));
    go(&p, &["tensor `input_ids`", "value -1 at [1, 2]"]);
    let p = inputs_with(d, "input_ids", None);
    go(&p, &["tensor `input_ids`: missing"]);

    // Too long: 41 > max_position_embeddings 40 (mask and types dropped so only ids speak).
    let long = i64_bytes(&vec![5; 41]);
    let mut raw = vec![("input_ids".to_string(), Dtype::I64, vec![1, 41], long)];
    let p = d.join("long.safetensors");
    write_raw_safetensors(&p, &raw);
    go(&p, &["tensor `input_ids`", "sequence length 41 exceeds max_position_embeddings 40"]);
    raw[0] = ("input_ids".to_string(), Dtype::I32, vec![1, 3], [1i32, 2, 3].iter().flat_map(|x| x.to_le_bytes()).collect());
    raw.push(("attention_mask".to_string(), Dtype::I64, vec![1, 4], i64_bytes(&[1, 1, 1, 0])));
    write_raw_safetensors(&p, &raw);
    go(&p, &["tensor `attention_mask`", "shape [1, 4] differs from input_ids [1, 3]"]);

    let mut mask = vec![1i64; 44];
    mask[3] = 2;
    let p = inputs_with(d, "attention_mask", Some((Dtype::I64, vec![4, 11], i64_bytes(&mask))));
    go(&p, &["tensor `attention_mask`", "value 2 at [0, 3] is out of range (must be 0 or 1)"]);
    let mut types = vec![0i64; 44];
    types[40] = 2;
    let p = inputs_with(d, "token_type_ids", Some((Dtype::I64, vec![4, 11], i64_bytes(&types))));
    go(&p, &["tensor `token_type_ids`", "value 2 at [3, 7]", "type_vocab_size 2"]);

    // Ids are I64 or I32 only (small valid values, so only the dtype can be at fault); a mask may
    // also be BOOL, U8 or I8, and that is tested in tests/io.rs.
    for (name, dtype, says) in [
        ("input_ids", Dtype::U8, "dtype U8 is not accepted (expected I64 or I32)"),
        ("input_ids", Dtype::BOOL, "dtype BOOL is not accepted (expected I64 or I32)"),
        ("input_ids", Dtype::I8, "dtype I8 is not accepted (expected I64 or I32)"),
        ("token_type_ids", Dtype::U8, "dtype U8 is not accepted (expected I64 or I32)"),
        ("token_type_ids", Dtype::BOOL, "dtype BOOL is not accepted (expected I64 or I32)"),
    ] {
        let p = inputs_with(d, name, Some((dtype, vec![4, 11], vec![1; 44])));
        go(&p, &[&format!("inputs_{name}.safetensors: tensor `{name}`"), says]);
    }
}

#[test]
fn bad_model_text_and_out_paths_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let inputs = tiny().join("inputs.safetensors");
    let out = d.join("out.safetensors");
    expect_failure(&["--model", "/no/such/model", "--inputs", s(&inputs), "--out", s(&out)], &["/no/such/model"]);
    // --text needs tokenizer.json, which the tiny model does not have.
    std::fs::write(d.join("t.txt"), "hello\n").unwrap();
    expect_failure(&["--model", s(&tiny()), "--text", s(&d.join("t.txt")), "--out", s(&out)], &["tokenizer.json", "not found"]);
    let minilm_like = d.join("m");
    std::fs::create_dir(&minilm_like).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny().join(f), minilm_like.join(f)).unwrap();
    }
    std::fs::write(minilm_like.join("tokenizer.json"), "{ not a tokenizer").unwrap();
    expect_failure(&["--model", s(&minilm_like), "--text", s(&d.join("t.txt")), "--out", s(&out)], &["tokenizer.json", "tokenizer: cannot load"]);
    expect_failure(&["--model", s(&tiny()), "--inputs", s(&inputs), "--out", "/no/such/dir/out.safetensors"], &["/no/such/dir/out.safetensors"]);
    let corrupt = d.join("c");
    std::fs::create_dir(&corrupt).unwrap();
    std::fs::copy(tiny().join("config.json"), corrupt.join("config.json")).unwrap();
    std::fs::write(corrupt.join("model.safetensors"), b"\x10\0\0\0\0\0\0\0{}").unwrap();
    expect_failure(&["--model", s(&corrupt), "--inputs", s(&inputs), "--out", s(&out)], &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn unimplemented_options_are_refused_not_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let model = tiny();
    let base = ["--model", s(&model), "--inputs", "x.safetensors", "--out", s(&out)];
    let with = |extra: &[&str]| -> Vec<String> { base.iter().chain(extra).map(|s| s.to_string()).collect() };
    let mut cases = vec![(&["--device", "tpu"][..], "--device `tpu`: expected auto, cpu")];
    // `--device cuda` without a GPU says why in one line (with one, the binary runs on it).
    if bert_adapters::cuda::probe::probe_gpu(0).is_err() {
        cases.push((&["--device", "cuda"][..], "libcuda"));
    }
    if !cfg!(feature = "cuda-sim") {
        cases.push((&["--device", "cuda-sim"][..], "built without the `cuda-sim` feature"));
    }
    for (extra, says) in cases {
        let args = with(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_failure(&args, &[says]);
    }
    assert!(!out.exists(), "a refused run must not write its output");
}

fn adapter_dir(name: &str) -> PathBuf {
    fixtures().join("adapters").join(name)
}

#[test]
fn run_with_adapters_matches_the_library() {
    run_with_adapters_on(&[]);
}

/// `run --device cuda-sim`: the CUDA backend's kernels on the CPU executor give the library's
/// outputs too (a binary built without the feature refuses the device, tested above).
#[cfg(feature = "cuda-sim")]
#[test]
fn run_on_cuda_sim_matches_the_library() {
    run_with_adapters_on(&["--device", "cuda-sim"]);
}

fn run_with_adapters_on(device: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let inputs = tiny().join("inputs.safetensors");
    let (a, b) = (adapter_dir("pfeiffer_inv"), adapter_dir("pfeiffer"));
    let model = tiny();
    let base: Vec<&str> = ["--model", s(&model), "--inputs", s(&inputs), "--out", s(&out), "--adapter", s(&a), "--adapter", s(&b)].into_iter().chain(device.iter().copied()).collect();
    for (extra, expected) in [
        (["--active", "pfeiffer_inv"], "expected_pfeiffer_inv.safetensors"),
        (["--parallel", "pfeiffer,pfeiffer_inv"], "expected_parallel_pfeiffer__pfeiffer_inv.safetensors"),
    ] {
        let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        let (ok, _, stderr) = run(&args);
        assert!(ok, "{stderr}");
        let got = TensorFile::open(&out).unwrap();
        let want = TensorFile::open(fixtures().join("adapters").join(expected)).unwrap();
        for name in want.names() {
            let (g, gs) = read_f32(&got, &name);
            let (w, ws) = read_f32(&want, &name);
            assert_eq!(gs, ws, "{expected} {name}");
            assert_close(&format!("{expected} {name}"), &g, &w, 1e-5);
        }
    }
    // Loaded but not activated: plain BERT, as load_adapter in the library.
    let (ok, _, stderr) = run(&base);
    assert!(ok, "{stderr}");
    let got = TensorFile::open(&out).unwrap();
    let plain = TensorFile::open(tiny().join("expected.safetensors")).unwrap();
    assert_close("inactive", &read_f32(&got, "last_hidden_state").0, &read_f32(&plain, "last_hidden_state").0, 1e-5);
}

#[test]
fn bad_adapter_options_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out.safetensors");
    let inputs = tiny().join("inputs.safetensors");
    let model = tiny();
    let go = |extra: &[&str], says: &[&str]| {
        let args: Vec<&str> = ["--model", s(&model), "--inputs", s(&inputs), "--out", s(&out)].iter().chain(extra).copied().collect();
        expect_failure(&args, says);
    };
    let (p, h) = (adapter_dir("pfeiffer"), adapter_dir("houlsby"));
    go(&["--adapter", s(&p), "--active", "nope"], &["no adapter named `nope` (adapters: pfeiffer)"]);
    go(&["--adapter", s(&p), "--adapter", s(&h), "--parallel", "pfeiffer,houlsby"], &["Parallel(pfeiffer, houlsby)", "every Parallel child"]);
    go(&["--adapter", s(&p), "--adapter", s(&p)], &["`pfeiffer` already exists"]);
    go(&["--adapter", s(&d.join("missing"))], &["missing", "adapter folder not found"]);
    // A usage error is clap's: exit code 2 with the usage lines.
    let (ok, _, err) = run(&["--model", s(&model), "--inputs", s(&inputs), "--out", s(&out), "--active", "a", "--parallel", "a,b"]);
    assert!(!ok && err.contains("'--active <NAME>' cannot be used with '--parallel"), "{err}");

    // Broken adapter folders: config errors name the file and field, weight errors the tensor.
    let copy = |name: &str| -> PathBuf {
        let to = d.join(name);
        std::fs::create_dir_all(&to).unwrap();
        for f in ["adapter_config.json", "adapter.safetensors"] {
            std::fs::copy(adapter_dir("pfeiffer").join(f), to.join(f)).unwrap();
        }
        to
    };
    let edit_config = |dir: &Path, edit: &dyn Fn(&mut serde_json::Value)| {
        let path = dir.join("adapter_config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(&path, v.to_string()).unwrap();
    };
    let c = copy("scaling_int");
    edit_config(&c, &|v| v["config"]["scaling"] = serde_json::json!(1));
    go(&["--adapter", s(&c)], &["adapter_config.json", "config.scaling", "unknown scaling type 1"]);
    let c = copy("glow");
    edit_config(&c, &|v| {
        v["config"]["inv_adapter"] = serde_json::json!("glow");
        v["config"]["inv_adapter_reduction_factor"] = serde_json::json!(2);
    });
    go(&["--adapter", s(&c)], &["unsupported", "glow"]);
    let c = copy("phm");
    edit_config(&c, &|v| v["config"]["phm_layer"] = serde_json::json!(true));
    go(&["--adapter", s(&c)], &["config.phm_layer", "not supported"]);
    let c = copy("hidden");
    edit_config(&c, &|v| v["hidden_size"] = serde_json::json!(64));
    go(&["--adapter", s(&c)], &["field `hidden_size`: 64 does not match the model's hidden size 48"]);
    let c = copy("dotted");
    edit_config(&c, &|v| v["name"] = serde_json::json!("a.b"));
    go(&["--adapter", s(&c)], &["field `name`", "contains '.'"]);
    let c = copy("rf");
    edit_config(&c, &|v| v["config"]["reduction_factor"] = serde_json::json!(8));
    go(&["--adapter", s(&c)], &["adapter.safetensors", "adapter_down.0.bias", "shape [3] in the file, but the config needs [6]"]);
    let c = copy("houlsby_cfg");
    edit_config(&c, &|v| v["config"]["mh_adapter"] = serde_json::json!(true));
    go(&["--adapter", s(&c)], &["adapter.safetensors", "encoder.layer.0.attention.output.adapters.pfeiffer.adapter_down.0.weight", "missing"]);
    let c = copy("garbled");
    std::fs::write(c.join("adapter_config.json"), "{").unwrap();
    go(&["--adapter", s(&c)], &["adapter_config.json", "not valid JSON"]);
}

#[test]
fn run_train_grad_probe_writes_autograd_equal_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let inputs = tiny().join("inputs.safetensors");
    let model = tiny();
    // The fixture holds `W` (the probe), the loss and PyTorch's gradients.
    let probe = fixtures().join("training/grad_parallel_pfeiffer_inv__pfeiffer__train_pfeiffer_inv.safetensors");
    let (a, b) = (adapter_dir("pfeiffer_inv"), adapter_dir("pfeiffer"));
    let args = [
        "--model", s(&model), "--inputs", s(&inputs), "--out", s(&out), "--adapter", s(&a), "--adapter", s(&b),
        "--parallel", "pfeiffer_inv,pfeiffer", "--train", "pfeiffer_inv", "--grad-probe", s(&probe),
    ];
    let (ok, _, stderr) = run(&args);
    assert!(ok, "{stderr}");
    let got = TensorFile::open(&out).unwrap();
    let want = TensorFile::open(&probe).unwrap();
    let grads: Vec<String> = want.names().into_iter().filter(|n| n.starts_with("grad.")).collect();
    assert_eq!(grads.len(), 16);
    for name in &grads {
        assert_close(name, &read_f32(&got, name).0, &read_f32(&want, name).0, 1e-4);
    }
    assert_eq!(got.names().iter().filter(|n| n.starts_with("grad.")).count(), 16, "only trainable tensors get grad.*");
    assert_eq!(got.info("loss").unwrap().shape, vec![1]);
    assert!((read_f32(&got, "loss").0[0] - read_f32(&want, "loss").0[0]).abs() < 1e-2);

    // A probe of the wrong shape, an unknown trained name, and --train without a probe.
    let wrong = fixtures().join("training/grad_pfeiffer.safetensors");
    let mut bad = args.to_vec();
    let last = bad.len() - 1;
    bad[last] = s(&wrong);
    expect_failure(&bad, &["grad_pfeiffer.safetensors", "tensor `W`", "shape [4, 11, 48] differs from last_hidden_state [8, 11, 48]"]);
    let mut bad = args.to_vec();
    let train_at = bad.len() - 3;
    bad[train_at] = "nope";
    expect_failure(&bad, &["train_adapter: no adapter named `nope`"]);
    let (ok, _, err) = run(&args[..args.len() - 2]);
    assert!(!ok && err.contains("--grad-probe"), "{err}");
    // Training an adapter that no setup activates would write zeros: refused with the reason.
    let single = ["--model", s(&model), "--inputs", s(&inputs), "--out", s(&out), "--adapter", s(&b), "--train", "pfeiffer", "--grad-probe", s(&wrong)];
    expect_failure(&single, &["--train pfeiffer", "not in the active setup (none is active)", "--active pfeiffer"]);
}

/// Every committed PyTorch gradient fixture through `run --device cuda-sim --train … --grad-probe`:
/// the CUDA backward (on the executor) writes autograd's gradients for every trainable tensor,
/// single adapters of every config and Parallel in both orders with each child (and both) trained.
#[cfg(feature = "cuda-sim")]
#[test]
fn run_train_on_cuda_sim_matches_every_gradient_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let inputs = tiny().join("inputs.safetensors");
    let model = tiny();
    let mut checked = 0;
    let mut names: Vec<String> = std::fs::read_dir(fixtures().join("training")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("grad_")).collect();
    names.sort();
    for file in &names {
        let case = file.trim_start_matches("grad_").trim_end_matches(".safetensors");
        // `parallel_<a>__<b>__train_<t>` (t = both: a and b) or a single adapter `<a>`.
        let (adapters, train): (Vec<&str>, Vec<&str>) = match case.strip_prefix("parallel_") {
            Some(rest) => {
                let parts: Vec<&str> = rest.split("__").collect();
                let (a, b, t) = (parts[0], parts[1], parts[2].trim_start_matches("train_"));
                (vec![a, b], if t == "both" { vec![a, b] } else { vec![t] })
            }
            None => (vec![case], vec![case]),
        };
        let probe = fixtures().join("training").join(file);
        let dirs: Vec<PathBuf> = adapters.iter().map(|a| adapter_dir(a)).collect();
        let mut args: Vec<String> = ["--device", "cuda-sim", "--model", s(&model), "--inputs", s(&inputs), "--out", s(&out)].iter().map(|a| a.to_string()).collect();
        for d in &dirs {
            args.extend(["--adapter".to_string(), s(d).to_string()]);
        }
        if adapters.len() > 1 {
            args.extend(["--parallel".to_string(), adapters.join(",")]);
        } else {
            args.extend(["--active".to_string(), adapters[0].to_string()]);
        }
        args.extend(["--train".to_string(), train.join(","), "--grad-probe".to_string(), s(&probe).to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, stderr) = run(&args);
        assert!(ok, "{file}: {stderr}");
        let (got, want) = (TensorFile::open(&out).unwrap(), TensorFile::open(&probe).unwrap());
        let grads: Vec<String> = want.names().into_iter().filter(|n| n.starts_with("grad.")).collect();
        assert!(!grads.is_empty(), "{file}: no gradients in the fixture");
        for name in &grads {
            assert!(got.contains(name), "{file}: the run wrote no `{name}`");
            assert_close(&format!("{file} {name}"), &read_f32(&got, name).0, &read_f32(&want, name).0, 1e-4);
        }
        checked += 1;
    }
    assert_eq!(checked, names.len());
    assert!(checked >= 23, "only {checked} gradient fixtures found (23 are committed)");
}

// ---- --precision ---------------------------------------------------------------------------------

#[path = "support/bf16.rs"]
mod bf16_rule;
#[path = "support/plain_bf16.rs"]
mod plain_bf16;

/// `run --precision bf16 --device cuda-sim` (the base loaded in bf16, bf16 activations) writes F32
/// files whose outputs meet the bf16 rule (tests/support/bf16.rs) against the f32 forward on the
/// same bf16-rounded base, with the plain bf16 model (tests/support/plain_bf16.rs) as the yardstick:
/// every hidden state, last_hidden_state and pooler_output, single and Parallel with a `+inv` first
/// child; and are not the f32 run's values. `--precision f32` is the default's (the library's).
#[cfg(feature = "cuda-sim")]
#[test]
fn run_precision_bf16_on_cuda_sim_is_within_the_bf16_rule() {
    use bert_adapters::{AdapterSetup, Backend, BertModel, CpuBackend, DType, InputBatch, LoadOptions};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let (out, out32) = (dir.path().join("bf16.safetensors"), dir.path().join("f32.safetensors"));
    let inputs = tiny().join("inputs.safetensors");
    let (a, b) = (adapter_dir("pfeiffer_inv"), adapter_dir("pfeiffer"));
    let model = tiny();
    // In process: the f32 reference and the plain bf16 model, both on the bf16 base.
    let forward = |backend: Arc<dyn Backend>, names: &[&str]| -> Vec<(String, Vec<f32>)> {
        let be = backend.clone();
        let (mut m, _) = BertModel::from_dir(&model, backend, LoadOptions { dtype: DType::BF16, ..LoadOptions::default() }).unwrap();
        let batch = InputBatch::from_file(&inputs, m.config()).unwrap();
        for d in [&a, &b] {
            m.load_adapter(d).unwrap();
        }
        let setup = if names.len() == 1 { AdapterSetup::Single(names[0].into()) } else { AdapterSetup::Parallel(names.iter().map(|n| n.to_string()).collect()) };
        m.set_active_adapters(Some(setup)).unwrap();
        let o = m.forward(&batch).unwrap();
        let mut v = vec![("last_hidden_state".to_string(), be.to_host(&o.last_hidden_state).unwrap()), ("pooler_output".to_string(), be.to_host(o.pooler_output.as_ref().unwrap()).unwrap())];
        v.extend(o.hidden_states.iter().enumerate().map(|(i, h)| (format!("hidden_states.{i}"), be.to_host(h).unwrap())));
        v
    };
    let base = ["--device", "cuda-sim", "--model", s(&model), "--inputs", s(&inputs), "--adapter", s(&a), "--adapter", s(&b)];
    for (setup, names) in [(["--active", "pfeiffer_inv"], &["pfeiffer_inv"][..]), (["--parallel", "pfeiffer_inv,pfeiffer"], &["pfeiffer_inv", "pfeiffer"])] {
        let args: Vec<&str> = base.iter().chain(&setup).chain(&["--precision", "bf16", "--out", s(&out)]).copied().collect();
        let (ok, stdout, stderr) = run(&args);
        assert!(ok, "{stderr}");
        assert!(stdout.contains("bf16 activations"), "{stdout}");
        let args: Vec<&str> = base.iter().chain(&setup).chain(&["--precision", "f32", "--out", s(&out32)]).copied().collect();
        let (ok, _, stderr) = run(&args);
        assert!(ok, "{stderr}");
        let (got, got32) = (TensorFile::open(&out).unwrap(), TensorFile::open(&out32).unwrap());
        let expected = match names {
            [one] => format!("expected_{one}.safetensors"),
            many => format!("expected_parallel_{}.safetensors", many.join("__")),
        };
        let want = TensorFile::open(fixtures().join("adapters").join(expected)).unwrap();
        let (reference, plain) = (forward(Arc::new(CpuBackend::reference()), names), forward(Arc::new(plain_bf16::PlainBf16::new()), names));
        for ((name, r), (_, p)) in reference.iter().zip(&plain) {
            assert_eq!(got.info(name).unwrap().dtype, Dtype::F32, "{name}");
            let g = read_f32(&got, name).0;
            let (e, pe) = bf16_rule::assert_within_twice_plain(&format!("run --precision bf16 {names:?} {name}"), &g, r, p);
            eprintln!("run --precision bf16 {names:?} {name}: {e:.3e}, plain bf16 {pe:.3e}");
            let f32_run = read_f32(&got32, name).0;
            assert_close(&format!("run --precision f32 {names:?} {name}"), &f32_run, &read_f32(&want, name).0, 1e-5);
            let (diff, _) = bf16_rule::max_abs_diff(&g, &f32_run);
            assert!(diff > 1e-4, "{names:?} {name}: the bf16 run is within {diff:e} of the f32 run");
        }
    }
}

/// `--precision bf16` (and f16) is refused on the CPU (naming the flag), runs `--train` on cuda-sim
/// (the bf16 backward; f16's loss-scaled); a precision that does not exist is refused by the parser.
#[test]
fn precision_bf16_is_refused_where_it_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let model = tiny();
    let inputs = tiny().join("inputs.safetensors");
    let base = ["--model", s(&model), "--inputs", s(&inputs), "--out", s(&out)];
    let with = |extra: &[&str]| -> Vec<String> { base.iter().chain(extra).map(|s| s.to_string()).collect() };
    let args = with(&["--precision", "bf16"]);
    expect_failure(&args.iter().map(String::as_str).collect::<Vec<_>>(), &["--precision bf16", "--device cuda or cuda-sim", "--precision f32"]);
    let args = with(&["--precision", "bf16", "--device", "cpu"]);
    expect_failure(&args.iter().map(String::as_str).collect::<Vec<_>>(), &["--precision bf16", "CPU"]);
    let args = with(&["--precision", "f16", "--device", "cpu"]);
    expect_failure(&args.iter().map(String::as_str).collect::<Vec<_>>(), &["--precision f16", "CPU"]);
    if cfg!(feature = "cuda-sim") {
        // bf16 trains: the probe's gradients are written, near autograd's f32 ones. A wiring
        // check (relative L2 error under 5%: bf16 keeps 8 bits, so a right step is within about
        // 2% here, a wrong gradient is off by O(1)); the bf16 rule itself is tests/cuda_bf16_training.rs.
        // f16 the same way, its backward loss-scaled (`run`'s probe times 2^16, the gradients
        // divided back).
        for precision in ["bf16", "f16"] {
            let p = adapter_dir("pfeiffer");
            let probe = fixtures().join("training/grad_pfeiffer.safetensors");
            let args = with(&["--precision", precision, "--device", "cuda-sim", "--adapter", s(&p), "--active", "pfeiffer", "--train", "pfeiffer", "--grad-probe", s(&probe)]);
            let (ok, _, err) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(ok, "run --precision {precision} --train: {err}");
            let (got, want) = (TensorFile::open(&out).unwrap(), TensorFile::open(&probe).unwrap());
            let grads: Vec<String> = want.names().into_iter().filter(|n| n.starts_with("grad.")).collect();
            assert!(!grads.is_empty());
            for name in &grads {
                let (g, w) = (read_f32(&got, name).0, read_f32(&want, name).0);
                assert!(g.iter().all(|v| v.is_finite()), "{name}: not finite");
                let norm = |v: &[f32]| v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
                let diff: Vec<f32> = g.iter().zip(&w).map(|(a, b)| a - b).collect();
                let rel = norm(&diff) / norm(&w).max(f64::MIN_POSITIVE);
                assert!(rel < 0.05, "{precision} {name}: relative L2 error {rel:.3e} against autograd's f32 gradient");
                assert!(rel > 1e-6, "{precision} {name}: equal to the f32 gradient ({rel:.1e}): is the {precision} mode on?");
            }
            std::fs::remove_file(&out).unwrap();
        }
    }
    let args = with(&["--precision", "fp8", "--device", "cuda-sim"]);
    let (ok, _, err) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok, "--precision fp8 succeeded");
    assert!(err.contains("invalid value 'fp8'") && err.contains("--precision") && err.contains("f32") && err.contains("bf16") && !err.contains("panicked"), "{err}");
    assert!(!out.exists(), "a refused run must not write its output");
}

/// Every numeric flag of every command takes a negative value to the command, which refuses it
/// with the flag and the reason in one line (exit 1), not clap's "unexpected argument '-1'".
#[test]
fn negative_numbers_are_refused_with_the_reason() {
    let cases: [(&str, &[&str], &str); 11] = [
        ("train", &["--lr", "-1"], "--lr must be > 0 (got -1)"),
        ("train", &["--lr", "-1e-3"], "--lr must be > 0 (got -0.001)"),
        ("train", &["--lr", "-inf"], "--lr must be a finite number (got -inf)"),
        ("train", &["--steps", "-1"], "--steps must be at least 1 (got -1)"),
        ("train", &["--batch-size", "-16"], "--batch-size must be at least 1 (got -16)"),
        ("train", &["--max-len", "-64"], "--max-len -64 leaves no room for [CLS] and [SEP]: it must be at least 2"),
        ("train", &["--alternate", "-10"], "--alternate must be at least 1 (got -10)"),
        ("train", &["--eval-every", "-100"], "--eval-every must be at least 1 (got -100)"),
        ("train", &["--eval-size", "-5"], "--eval-size must be at least 1 (got -5)"),
        ("train", &["--seed", "-42"], "--seed must be at least 0 (got -42)"),
        ("predict", &["--max-len", "-8"], "--max-len must be at least 2 (got -8)"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    for (command, flag, says) in cases {
        let rest: Vec<&str> = if command == "train" { vec!["--out", s(&out)] } else { vec!["--model", "m", "--adapter", "a", "--text", "t"] };
        let o = bin().arg(command).args(flag).args(&rest).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{command} {flag:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{command} {flag:?}: one line expected: {err}");
        assert!(err.contains(says), "{command} {flag:?}: `{says}` not in: {err}");
    }
    assert!(!out.exists(), "a refused run must not create its output folder");
}

/// scripts/test.sh's last line: tests that skipped (recorded in the skip log, once per test
/// however often they record it) are counted as skipped and not as passed, by cause.
#[test]
fn the_test_summary_counts_skipped_tests_as_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let (log, skips) = (dir.path().join("log"), dir.path().join("skips"));
    let summary = |log_text: &str, skip_text: &str| -> String {
        std::fs::write(&log, log_text).unwrap();
        std::fs::write(&skips, skip_text).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test-summary.sh");
        let o = Command::new("bash").arg(script).arg(&log).arg(&skips).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let cargo = "     Running tests/layernorm.rs (target/debug/deps/layernorm-0123)\n\
        test layernorm_on::cuda ... ok\ntest layernorm_on::cuda_sim ... ok\n\
        test result: ok. 12 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.50s\n\
        \n     Running tests/nvrtc_compile.rs (target/debug/deps/nvrtc_compile-4567)\n\
        test result: FAILED. 3 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 1.00s\n";
    let skipped = "layernorm-0123\tlayernorm_on::cuda\tno GPU\tlayernorm_on::run: no CUDA driver\n\
        layernorm-0123\tlayernorm_on::cuda\tno GPU\tlayernorm_on::run: no CUDA driver\n\
        layernorm-0123\tbackward_on::cuda\tno GPU\tbackward_on::run: no CUDA driver\n\
        nvrtc_compile-4567\tcompiles\tno NVRTC\tcompiles: libnvrtc cannot be loaded\n";
    assert_eq!(summary(cargo, skipped), "12 passed, 1 failed, 3 skipped (2 no GPU, 1 no NVRTC), 2 ignored\n");
    let one_cause = &skipped[..skipped.rfind("nvrtc_compile").unwrap()];
    assert_eq!(summary(cargo, one_cause), "13 passed, 1 failed, 2 skipped (no GPU), 2 ignored\n");
    assert_eq!(summary(&cargo.replace("1 failed; 2 ignored", "0 failed; 0 ignored"), ""), "15 passed, 0 failed, 0 skipped\n");
    assert!(summary("error[E0425]: cannot find value\n", "").starts_with("no test results"));
}

/// scripts/test.sh's cuda-sim line counts every passed cuda-sim test once, also when a test's
/// printing splits or interleaves libtest's reports (as CI logs showed twice).
#[test]
fn the_cuda_sim_count_survives_interleaved_reports() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let count = |text: &str| -> String {
        std::fs::write(&log, text).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/count-sim-tests.sh");
        let o = Command::new("bash").arg(script).arg(&log).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let text = "     Running tests/layernorm.rs (target/debug/deps/layernorm-0123)\n\
        test plain::cuda_sim ... ok\n\
        test plain::cuda ... ok\n\
        test split::f16::cuda_sim ... worst kernel/plain error 0.4 at cuda-sim\n\
        ok\n\
        printed without a newline test inner::bf16::cuda_sim ... ok\n\
        test failing::cuda_sim ... printed\n\
        FAILED\n\
        ok\n\
        test skipped::cuda_sim ... ignored\n\
        test not_a_sim_test ... ok\n\
        \n     Running tests/cuda_sim_memory.rs (target/debug/deps/cuda_sim_memory-4567)\n\
        test bounds_are_checked ... ok\n\
        test races_are_found ... ok\n\
        test broken ... FAILED\n";
    assert_eq!(
        count(text),
        "cuda-sim: 5 kernel tests passed on the CPU executor (3 device tests run from the same body as on a GPU, 2 executor tests in tests/cuda_sim*.rs)\n"
    );
}

// ---- RoBERTa (issue 17) ---------------------------------------------------------------------------

fn roberta() -> PathBuf {
    fixtures().join("tiny_roberta")
}

/// `run --text` on the tiny RoBERTa (its byte-level BPE tokenizer.json, padding null): the ids
/// HF's RobertaTokenizerFast gives (pad id 1), and PyTorch's outputs; with an adapter pair in
/// Parallel (a +inv first child), the library's outputs; on the CPU and on cuda-sim.
#[test]
fn run_on_roberta_matches_hf_ids_and_the_library() {
    let mut devices: Vec<&[&str]> = vec![&["--device", "cpu"]];
    if cfg!(feature = "cuda-sim") {
        devices.push(&["--device", "cuda-sim"]);
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let model = roberta();
    let text = model.join("sentences.txt");
    let want = TensorFile::open(model.join("expected_text.safetensors")).unwrap();
    for device in devices {
        let args: Vec<&str> = ["--model", s(&model), "--text", s(&text), "--out", s(&out)].iter().chain(device).copied().collect();
        let (ok, _, stderr) = run(&args);
        assert!(ok, "{device:?}: {stderr}");
        let got = TensorFile::open(&out).unwrap();
        for name in ["input_ids", "attention_mask"] {
            assert_eq!(got.read_i64(name).unwrap(), want.read_i64(name).unwrap(), "{device:?} {name}");
        }
        for name in ["last_hidden_state", "pooler_output"] {
            assert_close(&format!("{device:?} {name}"), &read_f32(&got, name).0, &read_f32(&want, name).0, 1e-5);
        }

        let inputs = model.join("inputs.safetensors");
        let (a, b) = (model.join("adapters/pfeiffer_inv"), model.join("adapters/pfeiffer"));
        let args: Vec<&str> = ["--model", s(&model), "--inputs", s(&inputs), "--out", s(&out), "--adapter", s(&a), "--adapter", s(&b), "--parallel", "pfeiffer_inv,pfeiffer"]
            .iter()
            .chain(device)
            .copied()
            .collect();
        let (ok, _, stderr) = run(&args);
        assert!(ok, "{device:?}: {stderr}");
        let got = TensorFile::open(&out).unwrap();
        let want = TensorFile::open(model.join("expected_parallel_pfeiffer_inv__pfeiffer.safetensors")).unwrap();
        for name in want.names() {
            assert_close(&format!("{device:?} parallel {name}"), &read_f32(&got, &name).0, &read_f32(&want, &name).0, 1e-5);
        }
    }
}

/// 33 tokens fit max_position_embeddings 34 but not RoBERTa's positions, which start at
/// padding_idx + 1 = 2: one line naming the field and the limit.
#[test]
fn roberta_inputs_past_the_position_offset_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<i64> = std::iter::once(0).chain(std::iter::repeat_n(7, 30)).chain([2, 1]).collect();
    let p = dir.path().join("ids.safetensors");
    write_raw_safetensors(&p, &[("input_ids".to_string(), Dtype::I64, vec![1, 33], i64_bytes(&ids))]);
    let out = dir.path().join("out.safetensors");
    expect_failure(
        &["--model", s(&roberta()), "--inputs", s(&p), "--out", s(&out)],
        &["tensor `input_ids`", "sequence length 33 does not fit max_position_embeddings 34", "at most 32 tokens"],
    );
}

/// `train` end to end on the tiny RoBERTa with its byte-level BPE (tests/fixtures/train's
/// reviews): the files of a run, saved as the library saves for a RobertaModel /
/// RobertaAdapterModel, and `predict` reads them back; a `--max-len` past the offset positions
/// is one line naming max_position_embeddings.
#[test]
fn train_and_predict_run_on_roberta() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let data = fixtures().join("train/reviews.csv");
    let train = |out: &Path, max_len: &str| {
        bin()
            .arg("train")
            .args(["--model", s(&roberta()), "--data", s(&data), "--out", s(out)])
            .args(["--batch-size", "16", "--max-len", max_len, "--lr", "0.02", "--alternate", "4", "--eval-every", "8", "--steps", "16", "--device", "cpu", "--quiet"])
            .output()
            .unwrap()
    };
    let done = train(&out, "24");
    let (stdout, stderr) = (String::from_utf8_lossy(&done.stdout), String::from_utf8_lossy(&done.stderr));
    assert!(done.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("step 16/16: validation accuracy") && stdout.contains("test: accuracy"), "{stdout}");
    for name in ["scorenn", "tasknn"] {
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join(name).join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!((config["model_class"].as_str(), config["model_type"].as_str()), (Some("RobertaModel"), Some("roberta")), "{name}");
        let head: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join(name).join("head_config.json")).unwrap()).unwrap();
        assert_eq!((head["model_class"].as_str(), head["model_type"].as_str()), (Some("RobertaAdapterModel"), Some("roberta")), "{name}");
    }
    let rows = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(rows.lines().count(), 1 + 3, "header, validation at 8 and 16, test: {rows}");
    assert!(!rows.contains("NaN") && !rows.contains("inf"), "{rows}");

    let texts = tmp.path().join("texts.txt");
    std::fs::write(&texts, "a good film, really\nawful!\nZoë's café\n").unwrap();
    let predicted = bin().arg("predict").args(["--model", s(&roberta()), "--adapter", s(&out.join("tasknn")), "--text", s(&texts), "--device", "cpu"]).output().unwrap();
    assert!(predicted.status.success(), "{}", String::from_utf8_lossy(&predicted.stderr));
    let labels: Vec<String> = String::from_utf8_lossy(&predicted.stdout).lines().map(str::to_string).collect();
    assert_eq!(labels.len(), 3);
    assert!(labels.iter().all(|l| ["negative", "neutral", "positive"].contains(&l.as_str())), "{labels:?}");

    let refused = train(&tmp.path().join("long"), "33");
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("--max-len 33 exceeds the model's max_position_embeddings 34 less roberta's position offset 2 (32 tokens)"), "{err}");
}

/// `adapter convert` of the RobertaAdapterModel save (`roberta.` keys, with its head), with and
/// without `--model`: the same files, the adapter_config.json the library writes from a bare
/// RobertaModel for this adapter byte for byte, and the library's outputs when loaded back.
#[test]
fn adapter_convert_on_roberta_keeps_the_model_type() {
    let tmp = tempfile::tempdir().unwrap();
    let src = roberta().join("adapters/flex_pfeiffer_inv");
    let (with_model, alone) = (tmp.path().join("with_model"), tmp.path().join("alone"));
    for (out, extra) in [(&with_model, vec!["--model", s(&roberta())]), (&alone, vec![])] {
        let o = bin().args(["adapter", "convert"]).arg(&src).arg(out).args(&extra).output().unwrap();
        assert!(o.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    for f in ["adapter_config.json", "adapter.safetensors", "head_config.json", "model_head.safetensors"] {
        assert_eq!(std::fs::read(with_model.join(f)).unwrap(), std::fs::read(alone.join(f)).unwrap(), "{f}");
    }
    let read = |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(read(alone.join("adapter_config.json")), read(roberta().join("adapters/pfeiffer_inv/adapter_config.json")));
    assert_eq!(read(alone.join("head_config.json")), read(src.join("head_config.json")));
    let keys = TensorFile::open(alone.join("adapter.safetensors")).unwrap().names();
    assert!(!keys.is_empty() && keys.iter().all(|k| !k.starts_with("roberta.")), "{keys:?}");

    let out = tmp.path().join("out.safetensors");
    let inputs = roberta().join("inputs.safetensors");
    let (ok, _, stderr) = run(&["--model", s(&roberta()), "--inputs", s(&inputs), "--out", s(&out), "--adapter", s(&alone), "--active", "pfeiffer_inv"]);
    assert!(ok, "{stderr}");
    let (got, want) = (TensorFile::open(&out).unwrap(), TensorFile::open(roberta().join("expected_pfeiffer_inv.safetensors")).unwrap());
    for name in want.names() {
        assert_close(&format!("converted {name}"), &read_f32(&got, &name).0, &read_f32(&want, &name).0, 1e-5);
    }
}

/// `bert-adapters kernels`: fills the disk cache with exactly the entries the runtime later reads,
/// once; bad requests are one clear line.
#[test]
fn kernels_fills_the_cache_the_runtime_reads() {
    use bert_adapters::cuda::kernel_cache::{DiskCache, EntryKey};
    use bert_adapters::cuda::probe::nvrtc_for_test;
    use bert_adapters::cuda::registry::ALL_SOURCES;
    use bert_adapters::cuda::runtime::{compile_cubin, entry_key};
    let dir = std::env::temp_dir().join(format!("cli-kernels-{}", std::process::id()));
    let kernels = |args: &[&str], cache: &str| {
        let out = bin().arg("kernels").args(args).env("BERT_ADAPTERS_KERNEL_CACHE", cache).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let fails = |args: &[&str], cache: &str, says: &[&str]| {
        let (ok, _, err) = kernels(args, cache);
        assert!(!ok, "{args:?} succeeded");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: expected one line, got: {err}");
        assert!(!err.contains("panicked"), "{err}");
        for s in says {
            assert!(err.contains(s), "{args:?}: `{s}` not in: {err}");
        }
    };
    let cache_dir = s(&dir).to_string();
    fails(&["--arch", "sm_80", "--family", "nope"], &cache_dir, &["--family nope", "attention_mma"]);
    fails(&["--arch", "compute_90", "--family", "mma"], &cache_dir, &["compute_90", "sm_90"]);
    fails(&["--arch", "sm_80"], "off", &["BERT_ADAPTERS_KERNEL_CACHE"]);
    if !bert_adapters::cuda::probe::driver_available() {
        fails(&["--family", "mma"], &cache_dir, &["no GPU", "--arch"]);
    }
    assert!(!dir.exists(), "a refused request creates nothing");
    if !nvrtc_for_test("cli::kernels_fills_the_cache_the_runtime_reads") {
        return;
    }
    let (ok, out, err) = kernels(&["--arch", "sm_80", "--family", "mma", "--jobs", "2"], &cache_dir);
    assert!(ok, "{err}");
    assert!(out.contains("sm_80 mma: compiled in") && out.contains("1 compiled, 0 already cached"), "{out}");
    let (ok, out, err) = kernels(&["--arch", "sm_80", "--family", "mma"], &cache_dir);
    assert!(ok, "{err}");
    assert!(out.contains("sm_80 mma: already in the cache") && out.contains("0 compiled, 1 already cached"), "{out}");
    // The entry is the one this process's runtime would read, and it holds what NVRTC makes. The
    // key is taken after this process has compiled (which maps more of NVRTC than the command had
    // when it made the key): a key must not depend on that.
    let mma = ALL_SOURCES.iter().find(|s| s.family == "mma").unwrap();
    let expected = compile_cubin(mma.file, mma.code, "sm_80", &[]).unwrap();
    let cache = DiskCache::new(&dir);
    let key = entry_key(mma.file, mma.code, "sm_80", &[]).unwrap();
    assert_eq!(cache.load(&key), Some(expected.clone()));
    // --prune: an entry this build no longer makes (an edited kernel) goes; the current one stays.
    let stale = EntryKey::new("mma", "an older mma.cu", "sm_80", &[], "an older NVRTC");
    cache.store(&stale, &expected).unwrap();
    let (ok, out, err) = kernels(&["--arch", "sm_80", "--family", "mma", "--prune"], &cache_dir);
    assert!(ok, "{err}");
    assert!(out.contains("sm_80: removed 1 stale entry"), "{out}");
    assert!(!cache.entry_path(&stale).exists());
    assert_eq!(cache.load(&key), Some(expected));
    std::fs::remove_dir_all(&dir).unwrap();
}
