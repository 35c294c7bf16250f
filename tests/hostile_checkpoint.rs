//! `train --resume` on a checkpoint a hostile user edited: every field of state.json, the saved
//! adapter and head configs and the saved weights are input. A tampered value is refused with one
//! line naming the file and the field (as damage, or as a config the run's settings do not make),
//! never a panic, never a silently different run, and never the advice to lower --lr when no
//! update of the session has run.

mod common;
// The binary's helpers; outside common/mod.rs, which examples/seed_workflow.rs also includes.
#[path = "common/cli.rs"]
mod cli;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cli::{bin, ok, text};
use common::{fixtures, read_raw_safetensors, trainable_tiny_model, write_raw_safetensors};
use serde_json::{json, Value};

/// A quick `train`: 2 steps of 4 texts, validated and tested at the end only.
fn train_cmd(model: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = bin();
    c.arg("train").arg("--model").arg(model).arg("--data").arg(fixtures().join("train/reviews.csv")).arg("--out").arg(out);
    c.args(["--steps", "2", "--batch-size", "4", "--max-len", "16", "--eval-every", "1000", "--eval-size", "4", "--device", "cpu", "--quiet"]);
    c.args(extra);
    c
}

/// The contract's one-line failure (`cli::fails`), with no advice about --lr.
#[track_caller]
fn fails(o: Output, says: &[&str]) -> String {
    let stderr = cli::fails(o, says);
    assert!(!stderr.contains("--lr"), "{stderr}");
    stderr
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The tiny model and a finished 2-step run of it (`<root>/base`).
fn finished_run(root: &Path) -> (PathBuf, PathBuf) {
    let model = trainable_tiny_model(root);
    let base = root.join("base");
    ok(train_cmd(&model, &base, &[]).output().unwrap());
    (model, base)
}

/// A fresh copy of the finished run, its `file` (under the run folder) edited by `edit`.
fn tampered(root: &Path, base: &Path, file: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let out = root.join("out");
    if out.exists() {
        std::fs::remove_dir_all(&out).unwrap();
    }
    copy_dir(base, &out);
    let path = out.join(file);
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    out
}

/// `v` at a `/`-separated path (`~1` for a `/` in a key, as JSON Pointer spells it).
fn at<'a>(v: &'a mut Value, pointer: &str) -> &'a mut Value {
    v.pointer_mut(pointer).unwrap_or_else(|| panic!("no {pointer}"))
}

/// Each `(pointer, value, field)`: a copy of a finished run with state.json's `pointer` set to
/// `value` is refused by `--resume` at load, as damage, in one line naming state.json and
/// `field`, with metrics.csv untouched; the untampered copy resumes.
fn refuses_tampered_state(cases: &[(&str, Value, &str)]) {
    let tmp = tempfile::tempdir().unwrap();
    let (model, base) = finished_run(tmp.path());
    let state: Value = serde_json::from_slice(&std::fs::read(base.join("checkpoint/state.json")).unwrap()).unwrap();
    // What the cases rely on: 2 tasknn steps, a validation and a test at step 2.
    assert_eq!(state["step"], 2, "{state}");
    assert_eq!(state["evals"].as_array().unwrap().len(), 2, "{state}");
    assert!(state["optimizers"]["tasknn"]["params"]["heads.tasknn.4.bias"].is_array(), "{state}");
    for (pointer, value, field) in cases {
        let out = tampered(tmp.path(), &base, "checkpoint/state.json", |s| {
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            let parent = if parent.is_empty() { s } else { at(s, parent) };
            match parent {
                Value::Object(m) => {
                    m.insert(key.into(), value.clone());
                }
                Value::Array(a) => a[key.parse::<usize>().unwrap()] = value.clone(),
                other => panic!("{pointer}: {other}"),
            }
        });
        let o = train_cmd(&model, &out, &["--resume", "--steps", "3"]).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{pointer} = {value}: accepted, or a crash\n{}", text(&o).1);
        fails(o, &["state.json", field, "damaged"]);
        assert!(std::fs::read(out.join("metrics.csv")).unwrap() == std::fs::read(base.join("metrics.csv")).unwrap(), "{pointer}: metrics.csv rewritten");
    }
    let out = tampered(tmp.path(), &base, "checkpoint/state.json", |_| {});
    let stdout = ok(train_cmd(&model, &out, &["--resume", "--steps", "3"]).output().unwrap());
    assert!(stdout.contains("done: 3 steps"), "{stdout}");
}

/// H2: an elapsed time no Duration holds panicked converting it after the whole run.
#[test]
fn an_impossible_elapsed_time_is_damage() {
    refuses_tampered_state(&[
        ("/elapsed_s", json!(-5.0), "field `elapsed_s`"),
        ("/elapsed_s", json!(1e20), "field `elapsed_s`"),
        ("/elapsed_s", json!(-1e300), "field `elapsed_s`"),
        ("/evals/0/elapsed_s", json!(-1.0), "field `evals[0].elapsed_s`"),
    ]);
}

/// M4: a step the checkpoint's own records contradict (its step records, its optimizers' update
/// counts, the f16 scaler's skipped steps, the schedule's length).
#[test]
fn a_step_the_records_contradict_is_damage() {
    refuses_tampered_state(&[
        ("/step", json!(u64::MAX), "field `step`"),
        ("/step", json!(5), "field `step`"),
        ("/steps/1/step", json!(7), "field `steps[1].step`"),
        ("/steps/0/adapter", json!("scorenn"), "field `steps[0].adapter`"),
        ("/optimizers/tasknn/steps", json!(5), "field `optimizers.tasknn.steps`"),
        ("/optimizers/scorenn/steps", json!(1), "field `optimizers.scorenn.steps`"),
        ("/loss_scaler", json!({"scale": 65536.0, "good_steps": 0, "skipped": 1}), "field `loss_scaler.skipped`"),
        ("/schedule_steps", json!(1), "field `schedule_steps`"),
        ("/evals/1/step", json!(1), "field `evals[1].step`"),
        ("/best", json!({"step": 9, "value": 0.5}), "field `best.step`"),
    ]);
}

/// M2, L2: the optimizer's hyper-parameters are the ones the settings give, and a parameter's
/// step count is within the optimizer's (and 2^32), checked at load.
#[test]
fn optimizer_state_the_settings_do_not_give_is_damage() {
    let bias = "field `optimizers.tasknn.params.heads.tasknn.4.bias`";
    refuses_tampered_state(&[
        ("/optimizers/tasknn/config/betas", json!([0.0, 0.0]), "field `optimizers.tasknn.config.betas`"),
        ("/optimizers/tasknn/config/eps", json!(0.0), "field `optimizers.tasknn.config.eps`"),
        ("/optimizers/tasknn/config/weight_decay", json!(0.5), "field `optimizers.tasknn.config.weight_decay`"),
        ("/optimizers/scorenn/config/weight_decay", json!(1e300), "field `optimizers.scorenn.config.weight_decay`"),
        ("/optimizers/tasknn/config/lr", json!(-1.0), "field `optimizers.tasknn.config.lr`"),
        ("/optimizers/tasknn/params/heads.tasknn.4.bias/0", json!(1u64 << 40), bias),
        ("/optimizers/tasknn/params/heads.tasknn.4.bias/0", json!(3), bias),
    ]);
}

/// N7: a history of values no run records (losses past float32, fractions outside 0..1).
#[test]
fn history_values_no_run_records_are_damage() {
    refuses_tampered_state(&[
        ("/steps/0/loss", json!(1.7e308), "field `steps[0].loss`"),
        ("/steps/1/ce", json!(-1.7e308), "field `steps[1].ce`"),
        ("/steps/0/tokens", json!(1_000_000), "field `steps[0].tokens`"),
        ("/evals/0/accuracy", json!(1e308), "field `evals[0].accuracy`"),
        ("/evals/0/macro_f1", json!(-0.5), "field `evals[0].macro_f1`"),
        ("/evals/0/tasknn_loss", json!(1.7e308), "field `evals[0].tasknn_loss`"),
        ("/evals/0/tokens_per_s", json!(-1.0), "field `evals[0].tokens_per_s`"),
        ("/evals/0/split", json!("train"), "field `evals[0].split`"),
        ("/best", json!({"step": 2, "value": 7.0}), "field `best.value`"),
    ]);
}

/// M1: the saved adapter and head configs must be what the run's settings make (compared by
/// meaning: a spelling of the same value resumes).
#[test]
fn edited_adapter_and_head_configs_are_refused_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, base) = finished_run(tmp.path());
    let adapter = "checkpoint/tasknn/adapter_config.json";
    let head = "checkpoint/tasknn/head_config.json";
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        (adapter, "non_linearity", json!("tanh"), "field `config.non_linearity`"),
        (adapter, "scaling", json!(5.0), "field `config.scaling`"),
        (adapter, "dropout", json!(0.9), "field `config.dropout`"),
        (adapter, "original_ln_after", json!(false), "field `config.original_ln_after`"),
        (head, "activation_function", json!("relu"), "field `config.activation_function`"),
        (head, "dropout_prob", json!(0.9), "field `config.dropout_prob`"),
        (head, "use_pooler", json!(true), "field `config.use_pooler`"),
    ];
    for (file, key, value, field) in cases {
        let out = tampered(tmp.path(), &base, file, |c| {
            at(c, "/config").as_object_mut().unwrap().insert(key.into(), value.clone());
        });
        let err = fails(train_cmd(&model, &out, &["--resume", "--steps", "3"]).output().unwrap(), &[file.rsplit('/').next().unwrap(), "tasknn", field]);
        assert!(err.contains("changed or is damaged"), "{err}");
    }

    // The same values spelled otherwise: resumed, and bit for bit the run resumed untouched.
    let plain = tampered(tmp.path(), &base, "checkpoint/state.json", |_| {});
    let plain_copy = tmp.path().join("plain");
    std::fs::rename(&plain, &plain_copy).unwrap();
    ok(train_cmd(&model, &plain_copy, &["--resume", "--steps", "3"]).output().unwrap());
    let out = tampered(tmp.path(), &base, adapter, |c| {
        at(c, "/config").as_object_mut().unwrap().insert("reduction_factor".into(), json!(16.0));
        at(c, "/config").as_object_mut().unwrap().insert("non_linearity".into(), json!("ReLU"));
    });
    let head_path = out.join(head);
    let mut h: Value = serde_json::from_slice(&std::fs::read(&head_path).unwrap()).unwrap();
    at(&mut h, "/config").as_object_mut().unwrap().insert("activation_function".into(), json!("Tanh"));
    std::fs::write(&head_path, serde_json::to_string(&h).unwrap()).unwrap();
    ok(train_cmd(&model, &out, &["--resume", "--steps", "3"]).output().unwrap());
    for f in ["tasknn/adapter.safetensors", "scorenn/adapter.safetensors", "checkpoint/optimizer.safetensors"] {
        assert!(std::fs::read(out.join(f)).unwrap() == std::fs::read(plain_copy.join(f)).unwrap(), "{f} differs from the untampered resume");
    }
}

/// M3: checkpoint weights that overflow before any update of the resumed session are the
/// checkpoint's fault (or the base model's), not a divergence to fix with a lower --lr.
#[test]
fn a_checkpoint_that_overflows_before_any_update_is_not_blamed_on_the_lr() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, base) = finished_run(tmp.path());
    let out = tampered(tmp.path(), &base, "checkpoint/state.json", |_| {});
    let path = out.join("checkpoint/tasknn/adapter.safetensors");
    let mut tensors = read_raw_safetensors(&path);
    let up = tensors.iter_mut().find(|t| t.0.ends_with("layer.0.output.adapters.tasknn.adapter_up.weight")).expect("tasknn's first up-projection");
    up.3 = 3e38f32.to_le_bytes().repeat(up.3.len() / 4);
    write_raw_safetensors(&path, &tensors);
    // The first step of the session (step 3) meets the overflow.
    fails(train_cmd(&model, &out, &["--resume", "--steps", "3"]).output().unwrap(), &["non-finite values", "at step 3, before any update of this session", "resumed from"]);

    // The validation a resumed session starts with (the checkpoint has none at its step) meets it.
    let state = out.join("checkpoint/state.json");
    let mut s: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    s["evals"] = json!([]);
    std::fs::write(&state, serde_json::to_string(&s).unwrap()).unwrap();
    fails(train_cmd(&model, &out, &["--resume", "--steps", "4", "--eval-every", "2"]).output().unwrap(), &["non-finite values", "after step 2, before any update of this session", "resumed from"]);
}

/// L2, in the library: a saved per-parameter step count past the u32 the device keeps is
/// refused when the state is loaded, not at the first step.
#[test]
fn adamw_from_state_refuses_a_step_count_past_2_pow_32() {
    use bert_adapters::train::{AdamW, AdamWConfig, AdamWState, ParamState};
    let state = |step: u64| AdamWState {
        config: AdamWConfig::default(),
        steps: step,
        params: [("w".to_string(), ParamState { step, shape: vec![2], exp_avg: vec![0.0; 2], exp_avg_sq: vec![0.0; 2] })].into(),
    };
    assert!(AdamW::from_state(state(u64::from(u32::MAX))).is_ok());
    let Err(err) = AdamW::from_state(state(1 << 40)) else { panic!("a step count past 2^32 is accepted") };
    let err = err.to_string();
    assert!(err.contains("`w`") && err.contains("1099511627776") && err.contains("2^32"), "{err}");
}
