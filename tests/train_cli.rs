//! `bert-adapters train` and `predict` end to end on the tiny BERT fixture, with a tiny WordPiece
//! tokenizer and a small labelled CSV (tests/fixtures/train): the loss falls, the files are
//! written, `--resume` continues to the same result as an uninterrupted run, Ctrl-C saves a
//! checkpoint, `predict` reproduces the trained model's predictions, bad inputs are one line.
//!
//! `tokenizer.json` is a BERT WordPiece tokenizer (lower-casing, [CLS] … [SEP]) over a 76-token
//! vocabulary that fits the tiny model's vocab_size 120; `reviews.csv` holds 150 short reviews
//! labelled negative / neutral / positive, each carrying one of two cue words per label.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

mod common;

use common::{fixtures, trainable_tiny_model as tiny_model};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bert-adapters"))
}


fn data() -> PathBuf {
    fixtures().join("train/reviews.csv")
}

/// A short run: 150 examples (120 train / 15 / 15), batches of 16, tasknn and scorenn 4 steps each.
fn train_cmd(model: &Path, data: &Path, out: &Path) -> Command {
    let mut c = bin();
    c.arg("train").arg("--model").arg(model).arg("--data").arg(data).arg("--out").arg(out);
    c.args(["--batch-size", "16", "--max-len", "24", "--lr", "0.02", "--alternate", "4", "--eval-every", "12", "--device", "cpu"]);
    c
}

/// `train_cmd` with `--quiet` and `extra`.
fn train(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    train_cmd(model, data, out).arg("--quiet").args(extra).output().unwrap()
}

fn ok(out: &Output) -> String {
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status.code());
    stdout.into_owned()
}

/// The single error line of a failed run.
fn fails(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "stdout: {}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(stderr.trim_end().lines().count(), 1, "one error line expected:\n{stderr}");
    stderr
}

fn read_csv(path: &Path) -> Vec<Vec<String>> {
    let mut r = csv::Reader::from_path(path).unwrap();
    r.records().map(|r| r.unwrap().iter().map(str::to_string).collect()).collect()
}

/// metrics.csv without its timing columns (tokens_per_s, elapsed_s), which differ run to run.
fn metrics_without_timing(out: &Path) -> Vec<Vec<String>> {
    read_csv(&out.join("metrics.csv")).into_iter().map(|r| r[..8].to_vec()).collect()
}

fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn train_writes_everything_resumes_exactly_and_predict_agrees() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let full = tmp.path().join("full");
    let stdout = ok(&train(&model, &data(), &full, &["--steps", "48"]));
    assert!(stdout.contains("step 12/48: validation accuracy"), "{stdout}");
    assert!(stdout.contains("test: accuracy"), "{stdout}");

    for f in ["metrics.csv", "training.svg", "test_predictions.csv", "checkpoint/state.json", "checkpoint/optimizer.safetensors"] {
        assert!(full.join(f).is_file(), "{f} missing");
    }
    for name in ["scorenn", "tasknn"] {
        for f in ["adapter_config.json", "adapter.safetensors", "head_config.json"] {
            assert!(full.join(name).join(f).is_file(), "{name}/{f} missing");
            assert!(full.join("checkpoint").join(name).join(f).is_file(), "checkpoint/{name}/{f} missing");
        }
    }
    let svg = std::fs::read_to_string(full.join("training.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<polyline"));

    // Validation at 12, 24, 36, 48, then the test row.
    let rows = read_csv(&full.join("metrics.csv"));
    let steps: Vec<(&str, &str)> = rows.iter().map(|r| (r[0].as_str(), r[1].as_str())).collect();
    assert_eq!(steps, [("12", "validation"), ("24", "validation"), ("36", "validation"), ("48", "validation"), ("48", "test")]);
    // tasknn's cross-entropy (column 6) falls from the first window to the last. Over seeds the
    // last/first ratio of these 48 steps is 0.81 ± 0.13 (the dropout draw decides), so a fixed
    // factor like 0.8 would only test the draw; it falls in 37 of 40 seeds. The run is deterministic.
    let ce = |r: &Vec<String>| r[6].parse::<f64>().unwrap();
    assert!(ce(&rows[3]) < ce(&rows[0]), "tasknn CE did not fall: {rows:?}");

    // The same 48 steps in two sessions: 24, then --resume to 48.
    let split = tmp.path().join("split");
    ok(&train(&model, &data(), &split, &["--steps", "24"]));
    let resumed = ok(&train(&model, &data(), &split, &["--steps", "48", "--resume"]));
    assert!(resumed.contains("at step 24"), "{resumed}");
    for f in ["scorenn/adapter.safetensors", "tasknn/adapter.safetensors", "checkpoint/optimizer.safetensors", "test_predictions.csv"] {
        assert!(bytes(&full.join(f)) == bytes(&split.join(f)), "{f} differs between the resumed and the uninterrupted run");
    }
    for name in ["scorenn", "tasknn"] {
        let heads = |d: &Path| -> Vec<Vec<u8>> {
            let mut files: Vec<PathBuf> = std::fs::read_dir(d.join(name)).unwrap().map(|e| e.unwrap().path()).collect();
            files.sort();
            files.iter().map(|f| bytes(f)).collect()
        };
        assert!(heads(&full) == heads(&split), "{name}/ differs between the resumed and the uninterrupted run");
    }
    assert_eq!(metrics_without_timing(&full), metrics_without_timing(&split));

    // predict reproduces the test predictions train wrote.
    let preds = read_csv(&full.join("test_predictions.csv"));
    let texts = tmp.path().join("texts.txt");
    std::fs::write(&texts, preds.iter().map(|r| format!("{}\n", r[0])).collect::<String>()).unwrap();
    let out = bin().arg("predict").arg("--model").arg(&model).arg("--adapter").arg(full.join("tasknn")).arg("--text").arg(&texts).args(["--device", "cpu"]).output().unwrap();
    let predicted: Vec<String> = ok(&out).lines().map(str::to_string).collect();
    let expected: Vec<String> = preds.iter().map(|r| r[2].clone()).collect();
    assert_eq!(predicted, expected);
}

#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_checkpoint_that_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("out");
    let mut child = bin()
        .arg("train")
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(data())
        .arg("--out")
        .arg(&out)
        .args(["--steps", "100000", "--eval-every", "5", "--batch-size", "4", "--max-len", "16", "--device", "cpu", "--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Interrupt once training is under way (step lines come every step here).
    for line in lines.by_ref() {
        if line.unwrap().starts_with("step 3/") {
            break;
        }
    }
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    lines.for_each(drop);
    let result = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("checkpoint saved"), "{stderr}");

    let state: serde_json::Value = serde_json::from_slice(&bytes(&out.join("checkpoint/state.json"))).unwrap();
    let step = state["step"].as_u64().unwrap();
    assert!(step >= 3, "checkpoint at step {step}");
    let until = (step + 2).to_string();
    let resumed = ok(&bin()
        .arg("train")
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(data())
        .arg("--out")
        .arg(&out)
        .args(["--steps", &until, "--eval-every", "5", "--batch-size", "4", "--max-len", "16", "--device", "cpu", "--quiet", "--resume"])
        .output()
        .unwrap());
    assert!(resumed.contains(&format!("at step {step}")), "{resumed}");
    let state: serde_json::Value = serde_json::from_slice(&bytes(&out.join("checkpoint/state.json"))).unwrap();
    assert_eq!(state["step"].as_u64(), Some(step + 2));
}

/// `predict`: --model defaults as in `train` (run here from a folder whose
/// models/all-MiniLM-L6-v2 is the tiny model), --with-text prints `label<TAB>text` with empty
/// lines in their place, and an adapter taken from `checkpoint/` truncates at the run's
/// --max-len (24, from its state.json) rather than the model's limit (40).
#[test]
fn predict_defaults_its_model_prints_text_and_takes_the_max_len_of_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("out");
    ok(&train(&model, &data(), &out, &["--steps", "48"]));
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir_all(cwd.join("models")).unwrap();
    std::fs::rename(&model, cwd.join("models/all-MiniLM-L6-v2")).unwrap();
    // Long texts: 20 tokens of one kind of review, then 16 of another, so that cut at 24 tokens
    // ([CLS], 22, [SEP]) or at 40 they read differently.
    let (fillers, tails) = (["the film was okay", "the meal was good", "the song was bad"], ["awful", "great", "fine"]);
    let mut texts = vec!["a good film, really".to_string(), String::new(), "bad book".to_string()];
    for f in fillers {
        for t in tails {
            texts.push(format!("{} {}", [f; 5].join(" "), [t; 16].join(" ")));
        }
    }
    let file = tmp.path().join("texts.txt");
    std::fs::write(&file, texts.iter().map(|t| format!("{t}\n")).collect::<String>()).unwrap();
    let predict = |adapter: &str, extra: &[&str]| -> Vec<String> {
        let o = bin().current_dir(&cwd).arg("predict").arg("--adapter").arg(out.join(adapter)).arg("--text").arg(&file).args(["--device", "cpu"]).args(extra).output().unwrap();
        ok(&o).lines().map(str::to_string).collect()
    };
    let labels = predict("tasknn", &[]);
    assert_eq!(labels.len(), texts.len());
    let at_24 = predict("tasknn", &["--max-len", "24"]);
    let at_40 = predict("tasknn", &["--max-len", "40"]);
    assert_eq!(labels, at_24, "train_info.json says 24");
    assert_ne!(at_24, at_40, "the long texts must predict otherwise when cut at 40 tokens, or this test shows nothing");
    assert_eq!(predict("checkpoint/tasknn", &[]), at_24, "an adapter from checkpoint/ must take the run's --max-len");

    let with_text = predict("tasknn", &["--with-text"]);
    let expected: Vec<String> = labels.iter().zip(&texts).map(|(l, t)| format!("{l}\t{t}")).collect();
    assert_eq!(with_text, expected);
    assert!(with_text[1].ends_with('\t'), "the empty line keeps its place: {with_text:?}");

    // Without the default model, the error names it and the script that fetches it.
    let o = bin().current_dir(tmp.path()).arg("predict").arg("--adapter").arg(out.join("tasknn")).arg("--text").arg(&file).output().unwrap();
    let err = fails(&o);
    assert!(err.contains("models/all-MiniLM-L6-v2: model folder not found (run `bash scripts/fetch-model.sh` first)"), "{err}");
}

/// Without --quiet and with stdout and stderr not a terminal (here, pipes), the run prints a
/// plain line every eval-every/5 steps (step, adapter, mean losses, tokens/s, ETA) rather than
/// nothing between validations. A --resume of the finished run with the same or fewer --steps
/// has nothing to do: exit 0, no validation, no test, no file rewritten.
#[test]
fn plain_progress_lines_and_a_finished_run_resumed_has_nothing_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("out");
    let stdout = ok(&train_cmd(&model, &data(), &out).args(["--steps", "12"]).output().unwrap());
    let lines: Vec<&str> = stdout.lines().collect();
    // Every 12/5 = 2 steps; tasknn trains steps 1-4 and 9-12, scorenn 5-8 (--alternate 4).
    let progress: Vec<&str> = lines.iter().copied().filter(|l| l.contains(" tokens/s, ETA ")).collect();
    assert_eq!(progress.len(), 6, "{stdout}");
    for (line, (step, adapter, losses)) in progress.iter().zip([
        (2, "tasknn", "tasknn loss"),
        (4, "tasknn", "tasknn loss"),
        (6, "scorenn", "scorenn loss"),
        (8, "scorenn", "scorenn loss"),
        (10, "tasknn", "tasknn loss"),
        (12, "tasknn", "tasknn loss"),
    ]) {
        assert!(line.starts_with(&format!("step {step}/12 ({adapter}): {losses} ")), "{line}");
    }
    assert!(progress[5].ends_with("ETA 0.0 s"), "no step is left after step 12: {}", progress[5]);
    assert!(lines.contains(&"step 12/12: testing on 15 examples"), "{stdout}");

    let files = ["metrics.csv", "training.svg", "test_predictions.csv", "checkpoint/state.json", "tasknn/adapter.safetensors"];
    let before: Vec<Vec<u8>> = files.iter().map(|f| bytes(&out.join(f))).collect();
    for steps in ["12", "8"] {
        let stdout = ok(&train(&model, &data(), &out, &["--steps", steps, "--resume"]));
        assert_eq!(stdout.lines().count(), 1, "{stdout}");
        assert!(stdout.starts_with(&format!("nothing to do: {} holds a run finished at step 12 (test accuracy ", out.display())), "{stdout}");
        assert!(stdout.trim_end().ends_with("give --steps above 12 to continue it"), "{stdout}");
        for (f, b) in files.iter().zip(&before) {
            assert!(&bytes(&out.join(f)) == b, "--steps {steps} --resume rewrote {f}");
        }
    }
}

/// Ctrl-C while the test split is evaluated stops at the next batch: exit 130, with the
/// checkpoint whole; --resume then evaluates the test split and finishes.
#[cfg(unix)]
#[test]
fn ctrl_c_during_the_test_evaluation_stops_it_and_keeps_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    // 100,000 texts of 12 reviews each (cut at 40 tokens): a test split of 10,000 that takes
    // seconds to evaluate (3.7 s on the 2-core VM), so the signal lands while it runs.
    let reviews = read_csv(&data());
    let big = tmp.path().join("big.csv");
    let mut w = csv::Writer::from_path(&big).unwrap();
    w.write_record(["text", "label"]).unwrap();
    for i in 0..100_000usize {
        let text: Vec<&str> = (0..12).map(|j| reviews[(i * 7 + j * 13) % reviews.len()][0].as_str()).collect();
        w.write_record([text.join(" ").as_str(), reviews[i % reviews.len()][1].as_str()]).unwrap();
    }
    w.flush().unwrap();
    let out = tmp.path().join("out");
    let flags = ["--steps", "2", "--eval-every", "1000", "--eval-size", "1", "--batch-size", "4", "--max-len", "40", "--device", "cpu", "--quiet"];
    let mut child = bin().arg("train").arg("--model").arg(&model).arg("--data").arg(&big).arg("--out").arg(&out).args(flags).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap() == "step 2/2: testing on 10000 examples" {
            break;
        }
    }
    let signalled = std::time::Instant::now();
    // SAFETY: a plain kill(2) of our own child, which has not been waited for.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let result = child.wait_with_output().unwrap();
    let waited = signalled.elapsed();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(130), "{stderr}\n{rest:?}");
    assert!(stderr.contains("stopped at step 2 during the test evaluation: checkpoint saved"), "{stderr}");
    assert!(waited.as_secs_f64() < 20.0, "took {waited:?} to stop");
    assert!(!out.join("test_predictions.csv").exists(), "the interrupted test wrote its predictions");
    let state: serde_json::Value = serde_json::from_slice(&bytes(&out.join("checkpoint/state.json"))).unwrap();
    assert_eq!(state["step"].as_u64(), Some(2));
    let splits: Vec<&str> = state["evals"].as_array().unwrap().iter().map(|e| e["split"].as_str().unwrap()).collect();
    assert_eq!(splits, ["validation"]);

    // The checkpoint loads, and the resume only evaluates the test split.
    let resumed = ok(&bin().arg("train").arg("--model").arg(&model).arg("--data").arg(&big).arg("--out").arg(&out).args(flags).arg("--resume").output().unwrap());
    assert!(resumed.contains("resuming from") && resumed.contains("at step 2"), "{resumed}");
    assert!(!resumed.contains("validation accuracy") && resumed.contains("test: accuracy"), "{resumed}");
    let rows = read_csv(&out.join("metrics.csv"));
    let steps: Vec<(&str, &str)> = rows.iter().map(|r| (r[0].as_str(), r[1].as_str())).collect();
    assert_eq!(steps, [("2", "validation"), ("2", "test")]);

    // With --keep-best the test runs on the best validation's adapters; Ctrl-C there must still
    // leave the last step's adapters in the checkpoint (the trajectory's state), and the resumed
    // run must end with the files of an uninterrupted one.
    let best_flags = ["--steps", "6", "--eval-every", "2", "--eval-size", "40", "--lr", "0.3", "--batch-size", "4", "--max-len", "40", "--device", "cpu", "--quiet", "--keep-best", "accuracy"];
    let whole = tmp.path().join("best_whole");
    let said = ok(&bin().arg("train").arg("--model").arg(&model).arg("--data").arg(&big).arg("--out").arg(&whole).args(best_flags).output().unwrap());
    assert!(said.contains("with the adapters of step 2") || said.contains("with the adapters of step 4"), "the best validation is the last one here, so no swap is tested: {said}");
    let cut = tmp.path().join("best_cut");
    let mut child = bin().arg("train").arg("--model").arg(&model).arg("--data").arg(&big).arg("--out").arg(&cut).args(best_flags).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().starts_with("step 6/6: testing on 10000 examples") {
            break;
        }
    }
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
    let result = child.wait_with_output().unwrap();
    assert_eq!(result.status.code(), Some(130), "{}", String::from_utf8_lossy(&result.stderr));
    for f in ["checkpoint/tasknn/adapter.safetensors", "checkpoint/scorenn/adapter.safetensors", "checkpoint/optimizer.safetensors"] {
        assert!(bytes(&cut.join(f)) == bytes(&whole.join(f)), "{f}: the interrupted test left another state than the finished run");
    }
    ok(&bin().arg("train").arg("--model").arg(&model).arg("--data").arg(&big).arg("--out").arg(&cut).args(best_flags).arg("--resume").output().unwrap());
    for f in ["tasknn/adapter.safetensors", "best/tasknn/adapter.safetensors", "checkpoint/tasknn/adapter.safetensors", "test_predictions.csv"] {
        assert!(bytes(&cut.join(f)) == bytes(&whole.join(f)), "{f} differs between the resumed and the uninterrupted run");
    }
}

#[test]
fn bad_inputs_fail_with_one_line_naming_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("out");
    let file = |name: &str, content: &[u8]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, content).unwrap();
        p
    };
    let cases: [(PathBuf, &str); 5] = [
        (file("empty.csv", b""), "empty.csv: the file is empty"),
        (file("cols.csv", b"sentence,label\nhi,a\n"), "cols.csv: line 1: the header has no `text` column"),
        (file("label.csv", b"sentiment,confidence,text\npositive,1,good\nhappy,1,fine\n"), "label.csv: line 3: unknown label `happy`"),
        (file("utf8.csv", b"text,label\ngood,a\n\xc3\x28 bad,b\n"), "utf8.csv: line 3: invalid UTF-8"),
        (file("rows.jsonl", b"{\"text\": \"good\", \"label\": \"a\"}\n{\"label\": \"b\"}\n"), "rows.jsonl: line 2: no `text` field"),
    ];
    for (path, expected) in &cases {
        let err = fails(&train(&model, path, &out, &["--steps", "1"]));
        assert!(err.contains(expected), "expected `{expected}` in: {err}");
    }

    let err = fails(&train(&model, &data(), &out, &["--steps", "1", "--resume"]));
    assert!(err.contains("no checkpoint to resume from"), "{err}");
    let err = fails(&train(&model, &data(), &out, &["--steps", "1", "--max-len", "64"]));
    assert!(err.contains("--max-len 64 exceeds the model's max_position_embeddings 40"), "{err}");
    let err = fails(&train(&model, &data(), &out, &["--steps", "1", "--config", "pfeiffer+inv"]));
    assert!(err.contains("invertible adapters"), "{err}");

    // A resume must keep the settings that decide the trajectory.
    ok(&train(&model, &data(), &out, &["--steps", "2"]));
    let err = fails(&train(&model, &data(), &out, &["--steps", "4", "--resume", "--lr", "0.5"]));
    assert!(err.contains("state.json: field `lr`: the checkpoint was trained with 0.02, this run has 0.5"), "{err}");

    // Until the CUDA backend exists, --device cuda is refused with the library's reason.
    let run = train(&model, &data(), &out, &["--steps", "1", "--device", "cuda"]);
    if !run.status.success() {
        let err = fails(&run);
        assert!(err.to_lowercase().contains("cuda"), "{err}");
    }

    let err = fails(&bin().arg("predict").arg("--model").arg(&model).arg("--adapter").arg(tmp.path().join("nope")).arg("--text").arg(data()).output().unwrap());
    assert!(err.contains("nope"), "{err}");
}

/// Without a CUDA driver, `train --device cuda` is refused before any work, with the reason
/// (`auto` falls back to the CPU instead).
#[cfg(not(feature = "cuda-sim"))]
#[test]
fn train_on_a_device_that_cannot_train_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let result = bin().args(["train", "--device", "cuda", "--out"]).arg(&out).output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    if result.status.success() {
        return; // a machine with a GPU trains on it
    }
    assert!(stderr.contains("libcuda"), "{stderr}");
    assert!(!out.exists(), "a refused run must not create its output folder");
}

/// `train --device cuda-sim` trains, dropout on (as every run): the device's masks are the CPU's,
/// so its validation and test rows follow the CPU run's. `--max-len 4` makes both pad every batch
/// to 4 (the device pads to multiples of 16, the CPU to the longest text, capped): masks are
/// drawn per padded element, so another padding would be another, equally valid, draw.
#[cfg(feature = "cuda-sim")]
#[test]
fn train_on_cuda_sim_follows_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let run = |device: &str| {
        let (out, data) = (tmp.path().join(device), data());
        let args = ["--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
        let flags = ["--batch-size", "16", "--max-len", "4", "--lr", "0.02", "--alternate", "2", "--eval-every", "4", "--steps", "8", "--quiet", "--device", device];
        ok(&bin().arg("train").args(args).args(flags).output().unwrap());
        metrics_without_timing(&out)
    };
    let (cpu, sim) = (run("cpu"), run("cuda-sim"));
    assert_eq!(cpu.len(), sim.len(), "{cpu:?}\n{sim:?}");
    for (c, g) in cpu.iter().zip(&sim) {
        assert_eq!(c[..2], g[..2], "{cpu:?}\n{sim:?}");
        for (a, b) in c[2..].iter().zip(&g[2..]) {
            let (Ok(a), Ok(b)) = (a.parse::<f64>(), b.parse::<f64>()) else {
                assert_eq!(a, b, "{cpu:?}\n{sim:?}"); // the test row leaves the losses empty
                continue;
            };
            assert!((a - b).abs() <= 1e-3 * (1.0 + a.abs()), "{cpu:?}\n{sim:?}");
        }
    }
}

/// A 16-bit run's metrics rows against the f32 run's: the same rows, the same validation
/// accuracy within one text, every loss within 2%, the same test row, and some loss different
/// (so the 16-bit mode was really on).
#[cfg(feature = "cuda-sim")]
#[track_caller]
fn assert_follows_f32(precision: &str, f32_rows: &[Vec<String>], rows: &[Vec<String>]) {
    assert_eq!(f32_rows.len(), rows.len(), "{f32_rows:?}\n{rows:?}");
    // Columns after step and split: examples, accuracy, macro_f1, tasknn_loss, tasknn_ce,
    // scorenn_loss (the test row leaves the losses empty).
    let mut losses_differ = false;
    for (f, b) in f32_rows.iter().zip(rows) {
        assert_eq!(f[..3], b[..3], "{f32_rows:?}\n{rows:?}");
        let examples: f64 = f[2].parse().unwrap();
        for (col, (x, y)) in f[3..].iter().zip(&b[3..]).enumerate() {
            let (Ok(x), Ok(y)) = (x.parse::<f64>(), y.parse::<f64>()) else {
                assert_eq!(x, y, "{f32_rows:?}\n{rows:?}");
                continue;
            };
            match (f[1].as_str(), col) {
                ("test", _) => assert_eq!(x, y, "test column {}: f32 {x}, {precision} {y}\n{f32_rows:?}\n{rows:?}", col + 3),
                // Validation accuracy: at most one text apart.
                (_, 0) => assert!((x - y).abs() <= 1.0 / examples + 1e-9, "validation accuracy at step {}: f32 {x}, {precision} {y}", f[0]),
                (_, 1) => {}
                _ => {
                    assert!((x - y).abs() <= 0.02 * x.abs().max(1e-3), "loss column {} at step {}: f32 {x}, {precision} {y}", col + 3, f[0]);
                    losses_differ |= x != y;
                }
            }
        }
    }
    assert!(losses_differ, "the {precision} losses equal the f32 ones: is {precision} on?\n{rows:?}");
}

/// `train --precision bf16` on cuda-sim (the base and every activation in bf16, adapters and
/// AdamW in f32) follows the f32 run on the same seed: the same rows, each loss within 2% (bf16
/// keeps 8 bits; the bf16 rule itself is tests/cuda_bf16_training.rs) and the same test accuracy
/// (the criterion is within 1 point; 15 test texts make one text 6.7 points, so equal).
/// `--precision auto` is f32 on cuda-sim, `predict --precision bf16` reproduces the bf16 run's
/// test predictions, a run started in f32 resumes in bf16, and `--precision bf16` on the CPU is
/// refused. The same holds on a GPU's path (split adapter locations with TF32 products).
#[cfg(feature = "cuda-sim")]
#[test]
fn train_in_bf16_on_cuda_sim_follows_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let run_with = |name: &str, precision: &str, env: &[(&str, &str)]| {
        let (out, data) = (tmp.path().join(name), data());
        let args = ["--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
        let flags = ["--batch-size", "16", "--max-len", "4", "--lr", "0.02", "--alternate", "2", "--eval-every", "4", "--steps", "8", "--quiet", "--device", "cuda-sim", "--precision", precision];
        let said = ok(&bin().arg("train").args(args).args(flags).envs(env.iter().copied()).output().unwrap());
        (metrics_without_timing(&out), said)
    };
    let run = |name: &str, precision: &str| run_with(name, precision, &[]);
    let (f32_rows, said_f32) = run("f32", "f32");
    let (bf16_rows, said_bf16) = run("bf16", "bf16");
    let (auto_rows, said_auto) = run("auto", "auto");
    assert!(said_bf16.contains("bf16 activations"), "{said_bf16}");
    assert!(!said_f32.contains("bf16") && !said_auto.contains("bf16"), "{said_f32}\n{said_auto}");
    assert_eq!(auto_rows, f32_rows, "--precision auto is f32 on cuda-sim");
    assert_follows_f32("bf16", &f32_rows, &bf16_rows);
    // A GPU's path: split adapter locations, whose products run on TF32 in bf16 (the executor
    // rounds their operands as the tensor cores do): the same criterion.
    let (split_rows, _) = run_with("bf16_split", "bf16", &[("BERT_ADAPTERS_LOCATION_PATH", "split"), ("BERT_ADAPTERS_ADAPTER_PRODUCTS", "tf32")]);
    assert_follows_f32("bf16 on the split path with TF32 products", &f32_rows, &split_rows);
    assert_ne!(split_rows, bf16_rows, "the split path with TF32 products computed exactly what the fused kernels did");
    // predict on the same device and precision reproduces the bf16 run's test predictions.
    let preds = read_csv(&tmp.path().join("bf16").join("test_predictions.csv"));
    let texts = tmp.path().join("texts.txt");
    std::fs::write(&texts, preds.iter().map(|r| format!("{}\n", r[0])).collect::<String>()).unwrap();
    let predict = bin().arg("predict").arg("--model").arg(&model).arg("--adapter").arg(tmp.path().join("bf16").join("tasknn")).arg("--text").arg(&texts).args(["--device", "cuda-sim", "--precision", "bf16"]).output().unwrap();
    let predicted: Vec<String> = ok(&predict).lines().map(str::to_string).collect();
    assert_eq!(predicted, preds.iter().map(|r| r[2].clone()).collect::<Vec<_>>(), "predict --precision bf16 against the bf16 run's test predictions");
    // A run started in f32 resumes in bf16 (the checkpoint is f32 either way) and carries on.
    let (resumed, data_file) = (tmp.path().join("resumed"), data());
    let args = ["--model", model.to_str().unwrap(), "--data", data_file.to_str().unwrap(), "--out", resumed.to_str().unwrap()];
    let flags = ["--batch-size", "16", "--max-len", "4", "--lr", "0.02", "--alternate", "2", "--eval-every", "4", "--quiet", "--device", "cuda-sim"];
    ok(&bin().arg("train").args(args).args(flags).args(["--steps", "4", "--precision", "f32"]).output().unwrap());
    let said = ok(&bin().arg("train").args(args).args(flags).args(["--steps", "8", "--precision", "bf16", "--resume"]).output().unwrap());
    assert!(said.contains("resuming from") && said.contains("bf16 activations"), "{said}");
    let rows = metrics_without_timing(&resumed);
    assert!(rows.iter().any(|r| r[0] == "8" && r[1] == "test"), "{rows:?}");
    let (out, data) = (tmp.path().join("cpu"), data());
    let refused = bin().arg("train").args(["--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(), "--device", "cpu", "--precision", "bf16"]).output().unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("--precision bf16") && err.contains("CUDA device") && !err.contains("panicked"), "{err}");
    assert!(!out.exists(), "a refused run must not create its output folder");
}

/// `train --precision f16` on cuda-sim follows the f32 run as the bf16 run does (same rows, losses
/// within 2%, the same test accuracy; `predict --precision f16` reproduces its test predictions),
/// with dynamic loss scaling on: the run says how many steps
/// it skipped, the checkpoint keeps the scaler's state (the initial 2^16 and 8 good steps: the
/// tiny model's gradients never overflow), a resumed f16 run carries the count on (and a damaged
/// saved scale is refused as a damaged checkpoint), an f32 run's checkpoint has no scaler, and
/// `--precision f16` on the CPU is refused. `--loss-scale` sets a fresh run's first scale (saved
/// in its checkpoint), is ignored with a warning on a resume, and is refused out of [1, f32's
/// largest] or for a run that is not f16, naming the flag.
#[cfg(feature = "cuda-sim")]
#[test]
fn train_in_f16_on_cuda_sim_follows_f32_with_loss_scaling() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let data_file = data();
    let run = |name: &str, precision: &str, steps: &str, resume: bool| {
        let out = tmp.path().join(name);
        let args = ["--model", model.to_str().unwrap(), "--data", data_file.to_str().unwrap(), "--out", out.to_str().unwrap()];
        let flags = ["--batch-size", "16", "--max-len", "4", "--lr", "0.02", "--alternate", "2", "--eval-every", "4", "--quiet", "--device", "cuda-sim", "--precision", precision, "--steps", steps];
        let said = ok(&bin().arg("train").args(args).args(flags).args(if resume { &["--resume"][..] } else { &[][..] }).output().unwrap());
        let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint").join("state.json")).unwrap()).unwrap();
        (metrics_without_timing(&out), said, state)
    };
    let (f32_rows, _, f32_state) = run("f32", "f32", "8", false);
    let (f16_rows, said, state) = run("f16", "f16", "8", false);
    assert!(said.contains("f16 activations") && said.contains("f16 loss scaling: 0 steps skipped"), "{said}");
    assert_follows_f32("f16", &f32_rows, &f16_rows);
    assert_eq!((state["loss_scaler"]["scale"].as_f64(), state["loss_scaler"]["good_steps"].as_u64()), (Some(65536.0), Some(8)), "{state}");
    assert!(f32_state.get("loss_scaler").is_none(), "an f32 run saves no scaler: {f32_state}");
    // predict on the same device and precision reproduces the f16 run's test predictions.
    let preds = read_csv(&tmp.path().join("f16").join("test_predictions.csv"));
    let texts = tmp.path().join("texts.txt");
    std::fs::write(&texts, preds.iter().map(|r| format!("{}\n", r[0])).collect::<String>()).unwrap();
    let predict = bin().arg("predict").arg("--model").arg(&model).arg("--adapter").arg(tmp.path().join("f16").join("tasknn")).arg("--text").arg(&texts).args(["--device", "cuda-sim", "--precision", "f16"]).output().unwrap();
    let predicted: Vec<String> = ok(&predict).lines().map(str::to_string).collect();
    assert_eq!(predicted, preds.iter().map(|r| r[2].clone()).collect::<Vec<_>>(), "predict --precision f16 against the f16 run's test predictions");
    let (_, said, state) = run("f16", "f16", "12", true);
    assert!(said.contains("resuming from"), "{said}");
    assert_eq!(state["loss_scaler"]["good_steps"].as_u64(), Some(12), "the resumed run carries the count on: {state}");
    // --loss-scale sets a fresh run's first scale; a resumed run keeps its saved one and says so.
    let out = tmp.path().join("f16");
    let common = ["--batch-size", "16", "--max-len", "4", "--lr", "0.02", "--alternate", "2", "--eval-every", "4", "--quiet", "--device", "cuda-sim"];
    let resumed = bin().arg("train").args(["--model", model.to_str().unwrap(), "--data", data_file.to_str().unwrap(), "--out", out.to_str().unwrap()]).args(common).args(["--precision", "f16", "--steps", "14", "--resume", "--loss-scale", "1024"]).output().unwrap();
    ok(&resumed);
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("--loss-scale 1024 is for a fresh run; this resumed run continues its saved scale 65536"), "{}", String::from_utf8_lossy(&resumed.stderr));
    let fresh = tmp.path().join("f16_scaled");
    ok(&bin().arg("train").args(["--model", model.to_str().unwrap(), "--data", data_file.to_str().unwrap(), "--out", fresh.to_str().unwrap()]).args(common).args(["--precision", "f16", "--steps", "2", "--loss-scale", "1024"]).output().unwrap());
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fresh.join("checkpoint").join("state.json")).unwrap()).unwrap();
    assert_eq!(saved["loss_scaler"]["scale"].as_f64(), Some(1024.0), "{saved}");
    // Out-of-range scales, and a scale for a run that is not f16, are refused naming the flag.
    for (scale, why) in [("0.5", "between 1 and"), ("nan", "finite"), ("1e39", "between 1 and"), ("-4", "> 0")] {
        let refused = bin().arg("train").args(["--model", model.to_str().unwrap(), "--data", data_file.to_str().unwrap(), "--out", tmp.path().join("never").to_str().unwrap()]).args(["--device", "cuda-sim", "--precision", "f16", "--loss-scale", scale]).output().unwrap();
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success() && err.contains("--loss-scale") && err.contains(why) && !err.contains("panicked"), "--loss-scale {scale}: {err}");
    }
    let refused = bin().arg("train").args(["--model", model.to_str().unwrap(), "--data", data_file.to_str().unwrap(), "--out", tmp.path().join("never").to_str().unwrap()]).args(["--device", "cuda-sim", "--precision", "f32", "--loss-scale", "1024"]).output().unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("--loss-scale 1024: loss scaling is for --precision f16; this run trains in f32") && !err.contains("panicked"), "{err}");
    assert!(!tmp.path().join("never").exists(), "a refused run wrote its --out");
    // A damaged scaler state is refused as a damaged checkpoint, naming its file.
    let state_file = tmp.path().join("f16").join("checkpoint").join("state.json");
    let mut damaged = state.clone();
    damaged["loss_scaler"]["scale"] = serde_json::json!(-1.0);
    std::fs::write(&state_file, serde_json::to_string(&damaged).unwrap()).unwrap();
    let out = tmp.path().join("f16");
    let refused = bin().arg("train").args(["--model", model.to_str().unwrap(), "--data", data_file.to_str().unwrap(), "--out", out.to_str().unwrap()]).args(["--batch-size", "16", "--max-len", "4", "--lr", "0.02", "--alternate", "2", "--eval-every", "4", "--quiet", "--device", "cuda-sim", "--precision", "f16", "--steps", "16", "--resume"]).output().unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("state.json") && err.contains("damaged") && err.contains("scale -1") && !err.contains("panicked"), "{err}");
    let out = tmp.path().join("cpu");
    let refused = bin().arg("train").args(["--model", model.to_str().unwrap(), "--data", data_file.to_str().unwrap(), "--out", out.to_str().unwrap(), "--device", "cpu", "--precision", "f16"]).output().unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("--precision f16") && err.contains("CUDA device") && !err.contains("panicked"), "{err}");
}

/// On a CUDA backend `train` replays captured steps (a graph per adapter and batch shape, from
/// its second sighting on): the run is bit-identical to launching every step (`--no-graphs`):
/// the same metrics and the same saved adapters, byte for byte, and it says how many it replayed.
#[cfg(feature = "cuda-sim")]
#[test]
fn train_replaying_captured_steps_equals_launching_them() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let run = |name: &str, extra: &[&str]| {
        let (out, data) = (tmp.path().join(name), data());
        let args = ["--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
        let flags = ["--batch-size", "16", "--max-len", "4", "--lr", "0.02", "--alternate", "2", "--eval-every", "4", "--steps", "8", "--quiet", "--device", "cuda-sim"];
        let result = bin().arg("train").args(args).args(flags).args(extra).output().unwrap();
        ok(&result);
        (out, String::from_utf8_lossy(&result.stdout).into_owned())
    };
    // Also under a warmup and a linear decay: every replay runs at its own step's rate.
    for (tag, schedule) in [("", &[][..]), ("_linear", &["--lr-schedule", "linear", "--warmup-steps", "3"][..])] {
        let (graphs, said) = run(&format!("graphs{tag}"), schedule);
        let (launched, said_launched) = run(&format!("launched{tag}"), &[schedule, &["--no-graphs"]].concat());
        // tasknn steps 1-2, 5-6, scorenn 3-4, 7-8, one shape. Each adapter launches its first step
        // and captures at its second. tasknn's graph (step 2) predates scorenn's arena (built at step
        // 3), so its replay at step 5 is refused and launched, and step 6 captures again: 5 replays.
        assert!(said.contains("5 of its 8 steps replayed from captured graphs"), "{said}");
        assert!(!said_launched.contains("replayed"), "{said_launched}");
        assert_eq!(metrics_without_timing(&graphs), metrics_without_timing(&launched));
        for adapter in ["scorenn", "tasknn"] {
            for file in ["adapter.safetensors", "model_head.safetensors"] {
                let (a, b) = (graphs.join(adapter).join(file), launched.join(adapter).join(file));
                assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "{tag}: {adapter}/{file} differs");
            }
        }
    }
    // The schedule changed the run (it is not ignored by either path).
    let weights = |name: &str| std::fs::read(tmp.path().join(name).join("tasknn/adapter.safetensors")).unwrap();
    assert_ne!(weights("graphs"), weights("graphs_linear"));
    // Tapes that keep views of the trained network's rows (--frozen-rows share), captured and
    // replayed: the same run, bit for bit.
    let (shared, said) = run("graphs_share", &["--frozen-rows", "share"]);
    assert!(said.contains("5 of its 8 steps replayed from captured graphs"), "{said}");
    assert_eq!(metrics_without_timing(&shared), metrics_without_timing(&tmp.path().join("graphs")));
    for adapter in ["scorenn", "tasknn"] {
        let file = |run: &str| std::fs::read(tmp.path().join(run).join(adapter).join("adapter.safetensors")).unwrap();
        assert_eq!(file("graphs_share"), file("graphs"), "--frozen-rows share: {adapter}'s adapter differs");
    }
}

/// `--lr-schedule`, `--warmup-steps`, `--weight-decay` and `--max-grad-norm` reach each step: runs whose
/// steps run at the same rates end bit for bit alike, whatever base rate and schedule spelled
/// those rates (the rates themselves are checked against transformers in tests/schedule.rs); a
/// step at rate 0 (the first warmup step) changes nothing, weight decay included; the settings
/// go into the checkpoint, a resume with other ones is refused, and a linear schedule stretched
/// by a resume says how its rate changes.
#[test]
fn lr_schedule_warmup_weight_decay_and_clipping_reach_each_step() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let stdout = ok(&train(&model, &data(), &out, &[&["--alternate", "8", "--eval-every", "100"], extra].concat()));
        (out, stdout)
    };
    let weights = |out: &Path| bytes(&out.join("tasknn/adapter.safetensors"));

    // Steps at rates [0, 0.01]: constant with 2 warmup steps to 0.02, or with 1 to 0.01.
    let (a, stdout) = run("warm2", &["--steps", "2", "--lr", "0.02", "--warmup-steps", "2"]);
    assert!(stdout.contains("AdamW: lr 2e-2, constant schedule, 2 warmup steps, weight decay 0.01"), "{stdout}");
    let (b, _) = run("warm1", &["--steps", "2", "--lr", "0.01", "--warmup-steps", "1"]);
    assert!(weights(&a) == weights(&b), "the same rates per step gave different adapters");
    // Without the warmup the rates are [0.01, 0.01]: a different run.
    let (c, _) = run("nowarm", &["--steps", "2", "--lr", "0.01"]);
    assert!(weights(&c) != weights(&b));

    // [0, 1/3, 2/3]·lr both ways: linear with a warmup as long as the run never decays.
    let (d, _) = run("linear3", &["--steps", "3", "--lr-schedule", "linear", "--warmup-steps", "3"]);
    let (e, _) = run("constant3", &["--steps", "3", "--warmup-steps", "3"]);
    assert!(weights(&d) == weights(&e));

    // One step at rate 0: no update, and no weight decay (decoupled decay scales with the rate).
    let (f, _) = run("zero_wd0", &["--steps", "1", "--warmup-steps", "1", "--weight-decay", "0"]);
    let (g, _) = run("zero_wd", &["--steps", "1", "--warmup-steps", "1", "--weight-decay", "0.5"]);
    assert!(weights(&f) == weights(&g));
    let (h, _) = run("step_wd0", &["--steps", "1", "--weight-decay", "0"]);
    let (i, _) = run("step_wd", &["--steps", "1", "--weight-decay", "0.5"]);
    assert!(weights(&h) != weights(&i), "--weight-decay did not reach the optimizer");
    assert!(weights(&h) != weights(&f));

    // The checkpoint keeps the settings; a resume must repeat them.
    let state: serde_json::Value = serde_json::from_slice(&bytes(&g.join("checkpoint/state.json"))).unwrap();
    assert_eq!(state["settings"]["weight_decay"], 0.5);
    assert_eq!(state["settings"]["warmup_steps"], 1);
    assert_eq!(state["settings"]["lr_schedule"], "constant");
    assert_eq!(state["schedule_steps"], 1);
    let err = fails(&train(&model, &data(), &g, &["--steps", "2", "--resume", "--warmup-steps", "1"]));
    assert!(err.contains("field `weight_decay`: the checkpoint was trained with 0.5, this run has 0.01"), "{err}");
    let err = fails(&train(&model, &data(), &d, &["--steps", "4", "--resume", "--warmup-steps", "3"]));
    assert!(err.contains("field `lr_schedule`: the checkpoint was trained with linear, this run has constant"), "{err}");

    // A linear run of 4 steps resumed to 8: the decay now ends at 8, and the warning says so.
    let (j, _) = run("linear4", &["--steps", "4", "--lr-schedule", "linear"]);
    let out = train(&model, &data(), &j, &["--alternate", "8", "--eval-every", "100", "--steps", "8", "--resume", "--lr-schedule", "linear"]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--lr-schedule linear now decays to 0 at step 8, not at step 4 as when this run was saved: step 5 runs at lr 1e-2 (it would have run at 0e0)"), "{stderr}");

    // Clipping at a norm no gradient reaches scales by 1 (exactly): the same run as clipping
    // off. Clipping far below the gradients' norm changes the run (AdamW divides most of the
    // scale out, but not ε's share, so the change is small but there).
    let (k, _) = run("clip_off", &["--steps", "2", "--max-grad-norm", "0"]);
    let (l, stdout) = run("clip_huge", &["--steps", "2", "--max-grad-norm", "1e30"]);
    assert!(stdout.contains("gradients clipped to norm 1e30"), "{stdout}");
    assert!(weights(&k) == weights(&l));
    let (m, stdout) = run("clip_tiny", &["--steps", "2", "--max-grad-norm", "1e-7"]);
    assert!(stdout.contains("gradients clipped to norm 1e-7"), "{stdout}");
    assert!(weights(&m) != weights(&k), "--max-grad-norm did not reach the clipping");
    let state: serde_json::Value = serde_json::from_slice(&bytes(&k.join("checkpoint/state.json"))).unwrap();
    assert_eq!(state["settings"]["max_grad_norm"], 0.0);
    let err = fails(&train(&model, &data(), &k, &["--alternate", "8", "--eval-every", "100", "--steps", "3", "--resume"]));
    assert!(err.contains("field `max_grad_norm`: the checkpoint was trained with 0, this run has 1"), "{err}");

    // Out-of-range values are one line naming the flag.
    let bad = tmp.path().join("bad");
    let err = fails(&train(&model, &data(), &bad, &["--steps", "1", "--max-grad-norm", "-1"]));
    assert!(err.contains("--max-grad-norm must be >= 0 (got -1)"), "{err}");
    let err = fails(&train(&model, &data(), &bad, &["--steps", "1", "--max-grad-norm", "1e39"]));
    assert!(err.contains("--max-grad-norm 1.000e39 is outside f32's normal range"), "{err}");
    let err = fails(&train(&model, &data(), &bad, &["--steps", "1", "--warmup-steps", "-1"]));
    assert!(err.contains("--warmup-steps must be at least 0 (got -1)"), "{err}");
    let err = fails(&train(&model, &data(), &bad, &["--steps", "1", "--weight-decay", "-0.1"]));
    assert!(err.contains("--weight-decay must be >= 0 (got -0.1)"), "{err}");
    let out = train(&model, &data(), &bad, &["--steps", "1", "--lr-schedule", "cosine"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("[possible values: constant, linear]"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `--keep-best macro-f1`: the training is the same run (validation rows equal a run without
/// it), `best/` holds the adapters of the validation with the highest macro-F1 (the first on a
/// tie), those are what the test evaluates and what scorenn/ and tasknn/ hold at the end, while
/// the checkpoint keeps the last step's (so `--resume` continues the trajectory); a run resumed
/// halfway ends with the same files; the setting is part of what a resume must repeat.
#[test]
fn keep_best_tests_and_writes_the_best_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let flags = ["--eval-every", "6", "--lr", "0.2"];
    let plain = tmp.path().join("plain");
    ok(&train(&model, &data(), &plain, &[&flags[..], &["--steps", "36"]].concat()));
    let best_run = tmp.path().join("best_run");
    let stdout = ok(&train(&model, &data(), &best_run, &[&flags[..], &["--steps", "36", "--keep-best", "macro-f1"]].concat()));

    // The same trajectory: every validation row equal.
    let validations = |out: &Path| metrics_without_timing(out).into_iter().filter(|r| r[1] == "validation").collect::<Vec<_>>();
    let rows = validations(&best_run);
    assert_eq!(rows, validations(&plain));
    // The first validation with the highest macro-F1 (column 4).
    let f1 = |r: &Vec<String>| r[4].parse::<f64>().unwrap();
    let top = rows.iter().map(f1).fold(f64::NEG_INFINITY, f64::max);
    let best = rows.iter().find(|r| f1(r) == top).unwrap();
    let best_step: u64 = best[0].parse().unwrap();
    assert!(best_step < 36, "the best validation is the last one here ({rows:?}); pick flags where it is not, so the swap is tested");
    assert!(stdout.contains(&format!("with the adapters of step {best_step} (the best validation macro-f1 {top:.4})")), "{stdout}");
    let info: serde_json::Value = serde_json::from_slice(&bytes(&best_run.join("tasknn/train_info.json"))).unwrap();
    assert_eq!(info["steps"], best_step);
    assert_eq!(info["selected_by"]["validation"], "macro-f1");
    for name in ["scorenn", "tasknn"] {
        for f in ["adapter.safetensors", "model_head.safetensors"] {
            let at = |dir: &Path| bytes(&dir.join(name).join(f));
            assert!(at(&best_run) == at(&best_run.join("best")), "{name}/{f}: the output is not the best validation's");
            // The checkpoint holds the last step's, as the run without --keep-best ends.
            assert!(at(&best_run.join("checkpoint")) == at(&plain), "{name}/{f}: the checkpoint is not the last step's");
            assert!(at(&best_run) != at(&plain), "{name}/{f}: the best adapters equal the last ones");
        }
    }
    // The test predictions are the best adapters': predict with them reproduces them.
    let preds = read_csv(&best_run.join("test_predictions.csv"));
    let texts = tmp.path().join("texts.txt");
    std::fs::write(&texts, preds.iter().map(|r| format!("{}\n", r[0])).collect::<String>()).unwrap();
    let out = bin().arg("predict").arg("--model").arg(&model).arg("--adapter").arg(best_run.join("best/tasknn")).arg("--text").arg(&texts).args(["--device", "cpu"]).output().unwrap();
    let predicted: Vec<String> = ok(&out).lines().map(str::to_string).collect();
    assert_eq!(predicted, preds.iter().map(|r| r[2].clone()).collect::<Vec<_>>());

    // Stopped at 18 and resumed to 36: the same files.
    let split = tmp.path().join("split");
    ok(&train(&model, &data(), &split, &[&flags[..], &["--steps", "18", "--keep-best", "macro-f1"]].concat()));
    ok(&train(&model, &data(), &split, &[&flags[..], &["--steps", "36", "--keep-best", "macro-f1", "--resume"]].concat()));
    for f in ["tasknn/adapter.safetensors", "best/tasknn/adapter.safetensors", "checkpoint/tasknn/adapter.safetensors", "test_predictions.csv", "tasknn/train_info.json"] {
        assert!(bytes(&best_run.join(f)) == bytes(&split.join(f)), "{f} differs between the resumed and the uninterrupted run");
    }
    // A resume must keep the setting.
    let err = fails(&train(&model, &data(), &plain, &[&flags[..], &["--steps", "40", "--keep-best", "accuracy", "--resume"]].concat()));
    assert!(err.contains("field `keep_best`: the checkpoint was trained with none, this run has accuracy"), "{err}");

    // On the CUDA backend (cuda-sim) too, where the trained adapters live in device arenas and
    // captured graphs when the best ones are swapped in and the last ones back.
    let sim_flags = [&flags[..], &["--steps", "36", "--device", "cuda-sim"]].concat();
    let sim_plain = tmp.path().join("sim_plain");
    ok(&train(&model, &data(), &sim_plain, &sim_flags));
    let sim_best = tmp.path().join("sim_best");
    let stdout = ok(&train(&model, &data(), &sim_best, &[&sim_flags[..], &["--keep-best", "macro-f1"]].concat()));
    assert!(stdout.contains("with the adapters of step") && !stdout.contains("with the adapters of step 36"), "{stdout}");
    for f in ["tasknn/adapter.safetensors", "scorenn/model_head.safetensors"] {
        assert!(bytes(&sim_best.join(f)) == bytes(&sim_best.join("best").join(f)), "cuda-sim {f}: not the best validation's");
        assert!(bytes(&sim_best.join("checkpoint").join(f)) == bytes(&sim_plain.join(f)), "cuda-sim {f}: the checkpoint is not the last step's");
    }
}

/// `--grad-accum K` runs each batch as K micro-batches and updates once: the same training within
/// float rounding (the adapters after 16 steps within 1e-5 of the whole-batch run's, on the CPU
/// and on cuda-sim, whose steps are then launched, not replayed); K above the batch is refused,
/// and a resume must repeat K.
#[test]
fn grad_accum_trains_what_whole_batches_train() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let tensors = |dir: &Path| -> Vec<f32> {
        let f = bert_adapters::io::TensorFile::open(dir.join("tasknn/adapter.safetensors")).unwrap();
        let mut names = f.names();
        names.sort();
        names.iter().flat_map(|n| f.read_f32(n).unwrap().0).collect()
    };
    for device in ["cpu", "cuda-sim"] {
        let run = |name: &str, extra: &[&str]| {
            let out = tmp.path().join(format!("{device}_{name}"));
            let stdout = ok(&train(&model, &data(), &out, &[&["--steps", "16", "--eval-every", "8", "--device", device][..], extra].concat()));
            (out, stdout)
        };
        let (whole, _) = run("whole", &[]);
        let (accum, stdout) = run("accum", &["--grad-accum", "3"]);
        assert!(stdout.contains("each batch of 16 runs as 3 micro-batches"), "{stdout}");
        assert!(!stdout.contains("replayed"), "{device}: accumulated steps are launched: {stdout}");
        let (w, a) = (tensors(&whole), tensors(&accum));
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = w.iter().zip(&a).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-5 * scale, "{device}: tasknn after 16 steps differs by {diff:e} (scale {scale})");
        assert!(w != a, "{device}: bit-identical: were the micro-batches run at all?");
    }
    let bad = tmp.path().join("bad");
    let err = fails(&train(&model, &data(), &bad, &["--steps", "1", "--grad-accum", "17"]));
    assert!(err.contains("--grad-accum 17 splits a batch of 16 texts into more micro-batches than texts"), "{err}");
    let err = fails(&train(&model, &data(), &bad, &["--steps", "1", "--grad-accum", "0"]));
    assert!(err.contains("--grad-accum must be at least 1 (got 0)"), "{err}");
    let err = fails(&train(&model, &data(), &tmp.path().join("cpu_accum"), &["--steps", "20", "--eval-every", "8", "--resume"]));
    assert!(err.contains("field `grad_accum`: the checkpoint was trained with 3, this run has 1"), "{err}");
}
