//! The command as a hostile user drives it: each reproduction of issue 9's defects, run against
//! the real binary. Every case must end in exit 0 with correct output, or exit 1 with one line
//! naming the file, flag or field at fault — never a panic, an abort, a deleted user file or a
//! silent wrong answer. The largest inputs also run under an address-space limit
//! (`setrlimit(RLIMIT_AS)` in the child), so an unbounded allocation fails the test, not the machine.

mod common;
// The binary's helpers; outside common/mod.rs, which examples/seed_workflow.rs also includes.
#[path = "common/cli.rs"]
mod cli;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bert_adapters::io::TensorFile;
use cli::{bin, fails, limited, ok, text};
use common::{assert_close, fixtures, member, read_f32, read_raw_safetensors, trainable_tiny_model, unzip, write_raw_safetensors, zip_members};
use safetensors::Dtype;

fn data() -> PathBuf {
    fixtures().join("train/reviews.csv")
}

/// A quick `train`: 2 steps of 4 texts, no validation before the end.
fn train_cmd(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = bin();
    c.arg("train").arg("--model").arg(model).arg("--data").arg(data).arg("--out").arg(out);
    c.args(["--steps", "2", "--batch-size", "4", "--max-len", "16", "--eval-every", "1000", "--eval-size", "4", "--device", "cpu", "--quiet"]);
    c.args(extra);
    c
}

/// `run` on the tiny fixture BERT and its inputs, writing `dest`.
fn run_tiny(dest: &Path) -> Command {
    let mut c = bin();
    c.arg("run").arg("--model").arg(fixtures().join("tiny_bert")).arg("--inputs").arg(fixtures().join("tiny_bert/inputs.safetensors")).arg("--out").arg(dest);
    c
}

fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn state_json(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&bytes(&out.join("checkpoint/state.json"))).unwrap()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// A pid no process has: a child that has exited and been reaped.
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

/// The address-space limit of the memory-bound cases: the binary, its thread stacks and malloc
/// arenas, the tiny model and what a bounded command needs fit easily; the inputs here would
/// need several times this if anything grew with their size.
const LIMIT: u64 = 1 << 30;

// ---- 1, 12: --out is never destroyed --------------------------------------------------------

#[test]
fn a_fresh_run_refuses_a_previous_one_and_overwrite_never_removes_foreign_files() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trainable_tiny_model(tmp.path());
    let out = tmp.path().join("out");
    ok(train_cmd(&model, &data(), &out, &["--seed", "1"]).output().unwrap());
    let run_a = bytes(&out.join("checkpoint/state.json"));
    std::fs::write(out.join("MY_NOTES.txt"), "mine").unwrap();

    // A fresh run over it is refused, naming the folder and what is there.
    fails(train_cmd(&model, &data(), &out, &["--seed", "2"]).output().unwrap(), &[out.to_str().unwrap(), "holds a previous run", "checkpoint/", "metrics.csv", "--overwrite"]);
    assert_eq!(bytes(&out.join("checkpoint/state.json")), run_a);

    // A file we did not write inside one of our folders: refused by --overwrite and --resume alike, and kept.
    std::fs::write(out.join("checkpoint/NOTES.txt"), "keep me").unwrap();
    for flag in ["--overwrite", "--resume"] {
        fails(train_cmd(&model, &data(), &out, &[flag, "--seed", "1"]).output().unwrap(), &["NOTES.txt", "did not write"]);
        assert_eq!(bytes(&out.join("checkpoint/NOTES.txt")), b"keep me");
        assert_eq!(bytes(&out.join("checkpoint/state.json")), run_a);
    }
    std::fs::remove_file(out.join("checkpoint/NOTES.txt")).unwrap();

    // --overwrite replaces the previous run as a whole: nothing of run A is left beside run B.
    let stdout = ok(train_cmd(&model, &data(), &out, &["--overwrite", "--seed", "2"]).output().unwrap());
    assert!(stdout.contains("removed the previous run"), "{stdout}");
    assert_eq!(state_json(&out)["settings"]["seed"], 2);
    assert_eq!(bytes(&out.join("MY_NOTES.txt")), b"mine");
    assert_eq!(listing(&out), ["MY_NOTES.txt", "checkpoint", "metrics.csv", "scorenn", "tasknn", "test_predictions.csv", "training.svg"]);
    // A file at one of our names that we did not write (no CSV header of ours) is not ours either.
    std::fs::write(out.join("metrics.csv"), "my,own,table\n").unwrap();
    fails(train_cmd(&model, &data(), &out, &["--overwrite"]).output().unwrap(), &["metrics.csv", "was not written by bert-adapters"]);
    assert_eq!(bytes(&out.join("metrics.csv")), b"my,own,table\n");
    // --overwrite and --resume contradict each other.
    let o = train_cmd(&model, &data(), &out, &["--overwrite", "--resume"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
}

#[test]
fn leftovers_of_a_killed_run_are_cleaned_and_its_checkpoint_put_back() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trainable_tiny_model(tmp.path());
    let out = tmp.path().join("out");
    ok(train_cmd(&model, &data(), &out, &[]).output().unwrap());
    // A kill -9 between the two renames of a checkpoint swap, with a staged copy and a temporary
    // file half written; a live process's temporary and a user's look-alike folder beside them.
    let (dead, live) = (dead_pid(), std::process::id());
    let name = |base: &str, kind: &str, pid: u32| out.join(format!(".{base}.{kind}-{pid}-00000000deadbeef"));
    std::fs::rename(out.join("checkpoint"), name("checkpoint", "old", dead)).unwrap();
    std::fs::create_dir(name("checkpoint", "partial", dead)).unwrap();
    std::fs::write(name("checkpoint", "partial", dead).join("state.json"), "{").unwrap();
    std::fs::write(name("metrics.csv", "tmp", dead), "half").unwrap();
    std::fs::write(name("metrics.csv", "tmp", live), "a live writer's").unwrap();
    std::fs::create_dir(out.join(".checkpoint.old-my-backup")).unwrap();

    let stdout = ok(train_cmd(&model, &data(), &out, &["--resume", "--steps", "3"]).output().unwrap());
    assert!(stdout.contains("restored") && stdout.contains("resuming from") && stdout.contains("at step 2"), "{stdout}");
    assert_eq!(state_json(&out)["step"], 3);
    let left = listing(&out);
    assert!(left.contains(&format!(".metrics.csv.tmp-{live}-00000000deadbeef")), "{left:?}");
    assert!(left.contains(&".checkpoint.old-my-backup".to_string()), "{left:?}");
    assert!(!left.iter().any(|n| n.contains(&format!("-{dead}-"))), "{left:?}");
}

// ---- 3: sizes are checked before anything proportional to them is allocated ----------------

#[test]
fn absurd_sizes_are_one_line_errors_within_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trainable_tiny_model(tmp.path());
    let out = tmp.path().join("out");
    let huge = tmp.path().join("huge");
    std::fs::create_dir(&huge).unwrap();
    let config = std::fs::read_to_string(model.join("config.json")).unwrap().replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1000000000");
    std::fs::write(huge.join("config.json"), config).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(model.join(f), huge.join(f)).unwrap();
    }
    let inputs = fixtures().join("tiny_bert/inputs.safetensors");
    let mut run = bin();
    run.arg("run").arg("--model").arg(&huge).arg("--inputs").arg(&inputs).arg("--out").arg(tmp.path().join("o.safetensors"));
    fails(limited(&mut run, LIMIT), &["num_hidden_layers"]);
    fails(limited(&mut train_cmd(&huge, &data(), &out, &[]), LIMIT), &["num_hidden_layers"]);

    for (flag, value, says) in [
        ("--batch-size", "1000000000000", "--batch-size 1000000000000"),
        ("--batch-size", "18446744073709551615", "--batch-size 18446744073709551615"),
        ("--max-len", "18446744073709551615", "--max-len 18446744073709551615"),
        ("--eval-size", "18446744073709551615", ""),
    ] {
        let o = limited(&mut train_cmd(&model, &data(), &out, &[flag, value]), LIMIT);
        if flag == "--eval-size" {
            // Only ever a count to take from the validation split: no reason to refuse it.
            ok(o);
            std::fs::remove_dir_all(&out).unwrap(); // the test's own folder
        } else {
            fails(o, &[says]);
        }
    }
}

// ---- 4: a closed stdout ----------------------------------------------------------------------

#[test]
fn a_closed_stdout_neither_panics_nor_stops_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trainable_tiny_model(tmp.path());
    let out = tmp.path().join("out");
    // `train … | head -1`: the reader takes one line and goes away.
    let mut child = train_cmd(&model, &data(), &out, &["--steps", "12", "--eval-every", "5"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap(); // dropped here
    let o = child.wait_with_output().unwrap();
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(state_json(&out)["step"], 12, "training stopped with its output");
    assert!(out.join("tasknn/adapter.safetensors").is_file());

    // `run` and `predict` with stdout closed before they print: their work is done, exit 0.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let dest = tmp.path().join("o.safetensors");
    let o = run_tiny(&dest).stdout(writer).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    assert!(TensorFile::open(&dest).is_ok());
    let lines = tmp.path().join("lines.txt");
    std::fs::write(&lines, "good\nbad\n".repeat(50)).unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = bin().arg("predict").arg("--model").arg(&model).arg("--adapter").arg(out.join("tasknn")).arg("--text").arg(&lines).stdout(writer).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
}

// ---- 5: resume checks what decides the trajectory, and only that ----------------------------

#[test]
fn resume_fingerprints_the_weights_and_accepts_the_same_inputs_spelled_otherwise() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trainable_tiny_model(tmp.path());
    let out = tmp.path().join("out");
    let data_dir = tmp.path().join("data");
    std::fs::create_dir(&data_dir).unwrap();
    std::fs::copy(data(), data_dir.join("reviews.csv")).unwrap();
    ok(train_cmd(&model, &data_dir.join("reviews.csv"), &out, &[]).output().unwrap());

    // The same data as `./reviews.csv`, the same config.json reformatted: a resume.
    let config: serde_json::Value = serde_json::from_slice(&bytes(&model.join("config.json"))).unwrap();
    std::fs::write(model.join("config.json"), serde_json::to_string(&config).unwrap()).unwrap();
    let mut c = train_cmd(&model, Path::new("./reviews.csv"), &out, &["--resume", "--steps", "3"]);
    ok(c.current_dir(&data_dir).output().unwrap());

    // Other base weights (one value changed, same header): refused.
    let weights = model.join("model.safetensors");
    let mut w = bytes(&weights);
    let n = w.len();
    w[n - 1] ^= 0x01;
    std::fs::write(&weights, &w).unwrap();
    fails(train_cmd(&model, &data_dir.join("reviews.csv"), &out, &["--resume", "--steps", "4"]).output().unwrap(), &["state.json", "model_weights_fingerprint"]);
    w[n - 1] ^= 0x01;
    std::fs::write(&weights, &w).unwrap();

    // A head whose label map disagrees with state.json's labels: a damaged checkpoint.
    let head = out.join("checkpoint/tasknn/head_config.json");
    let original = bytes(&head);
    let mut config: serde_json::Value = serde_json::from_slice(&original).unwrap();
    let map = &mut config["config"]["label2id"];
    assert_eq!(map["negative"], 0, "{map}");
    (map["negative"], map["positive"]) = (2.into(), 0.into());
    let swapped = serde_json::to_string_pretty(&config).unwrap();
    std::fs::write(&head, swapped).unwrap();
    fails(train_cmd(&model, &data_dir.join("reviews.csv"), &out, &["--resume", "--steps", "4"]).output().unwrap(), &["head_config.json", "label2id"]);
    std::fs::write(&head, &original).unwrap();

    // Optimizer moments overwritten with NaN: a damaged checkpoint, not a divergence.
    let moments = out.join("checkpoint/optimizer.safetensors");
    let mut m = bytes(&moments);
    let len = m.len();
    m[len - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&moments, &m).unwrap();
    let err = fails(train_cmd(&model, &data_dir.join("reviews.csv"), &out, &["--resume", "--steps", "4"]).output().unwrap(), &["optimizer.safetensors", "NaN", "damaged"]);
    assert!(!err.contains("--lr"), "{err}");
}

// ---- 7, 13: labels and columns ------------------------------------------------------------

#[test]
fn labels_and_columns_are_checked_and_a_pipe_is_read_once() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trainable_tiny_model(tmp.path());
    let out = tmp.path().join("out");
    let file = |name: &str, content: String| {
        let p = tmp.path().join(name);
        std::fs::write(&p, content).unwrap();
        p
    };
    // 160,000 rows with distinct labels: refused at once (a quadratic map took 99 s), in bounded memory.
    let rows: String = (0..160_000).map(|i| format!("text {i},label{i}\n")).collect();
    let many = file("many.csv", format!("text,label\n{rows}"));
    fails(limited(&mut train_cmd(&model, &many, &out, &[]), LIMIT), &["many.csv", "more than 10000 distinct labels"]);
    let numeric = file("numeric.csv", "text,label\ngood,1\nbad,0\nfine,01\n".repeat(10));
    fails(train_cmd(&model, &numeric, &out, &[]).output().unwrap(), &["numeric.csv", "line 4", "label `01` is the same number as `1`"]);
    let dup = file("dup.csv", "text,label,text\ngood,1,bad\n".into());
    fails(train_cmd(&model, &dup, &out, &[]).output().unwrap(), &["dup.csv", "column `text` appears twice"]);
    assert!(!out.exists(), "a refused run wrote into --out");

    // `--data <(cat FILE)`: a pipe, read once.
    let script = String::from("exec \"$0\" train --model \"$1\" --data <(cat \"$2\") --out \"$3\" --steps 2 --batch-size 4 --max-len 16 --eval-every 1000 --eval-size 4 --device cpu --quiet");
    let o = Command::new("bash").arg("-c").arg(script).arg(env!("CARGO_BIN_EXE_bert-adapters")).arg(&model).arg(data()).arg(&out).output().unwrap();
    ok(o);
}

// ---- 8, 9: long lines and many lines in bounded memory, rows in order ----------------------

#[test]
fn a_40_mb_line_costs_no_more_than_a_short_one() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trainable_tiny_model(tmp.path());
    let out = tmp.path().join("out");
    ok(train_cmd(&model, &data(), &out, &[]).output().unwrap());
    let long = tmp.path().join("long.txt");
    let mut line = "good ".repeat(8 << 20); // 40 MiB of words
    line.push('\n');
    std::fs::write(&long, format!("bad\n{line}good\n")).unwrap();
    let mut predict = bin();
    predict.arg("predict").arg("--model").arg(&model).arg("--adapter").arg(out.join("tasknn")).arg("--text").arg(&long).args(["--max-len", "8"]);
    let labels = ok(limited(&mut predict, LIMIT));
    assert_eq!(labels.lines().count(), 3, "{labels}");
    // The long line predicts what its first words alone predict (it is cut at max-len tokens).
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "bad\ngood good good good good good good good\ngood\n").unwrap();
    let mut again = bin();
    again.arg("predict").arg("--model").arg(&model).arg("--adapter").arg(out.join("tasknn")).arg("--text").arg(&short).args(["--max-len", "8"]);
    assert_eq!(labels, ok(again.output().unwrap()));

    let dest = tmp.path().join("o.safetensors");
    let mut run = bin();
    run.arg("run").arg("--model").arg(&model).arg("--text").arg(&long).arg("--out").arg(&dest);
    ok(limited(&mut run, LIMIT));
    assert_eq!(TensorFile::open(&dest).unwrap().info("last_hidden_state").unwrap().shape, vec![3, 40, 48]);
}

#[test]
fn run_text_streams_many_lines_in_order_and_keeps_blank_ones() {
    use bert_adapters::{BertModel, BertTokenizer, CpuBackend, LoadOptions};
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = trainable_tiny_model(tmp.path());
    // 20,000 lines (a few hundred chunks), blank ones among them, of varying length.
    let words = ["good", "bad", "fine", "awful", "film", "service", "really", "a"];
    let lines: Vec<String> = (0..20_000).map(|i| if i % 97 == 5 { String::new() } else { (0..1 + i % 7).map(|j| words[(i * 3 + j) % words.len()]).collect::<Vec<_>>().join(" ") }).collect();
    let input = tmp.path().join("lines.txt");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let dest = tmp.path().join("o.safetensors");
    let mut run = bin();
    run.arg("run").arg("--model").arg(&model_dir).arg("--text").arg(&input).arg("--out").arg(&dest);
    ok(limited(&mut run, LIMIT));

    // The same rows through the library in one batch, an independent path: equal, row by row.
    let got = TensorFile::open(&dest).unwrap();
    let (model, _) = BertModel::from_dir(&model_dir, std::sync::Arc::new(CpuBackend::fast()), LoadOptions::default()).unwrap();
    let tok = BertTokenizer::from_file(model_dir.join("tokenizer.json"), 40).unwrap();
    let picks = [0usize, 5, 6, 102, 9_999, 19_999];
    let sample: Vec<&str> = picks.iter().map(|&i| lines[i].as_str()).collect();
    let (ids, shape) = got.read_i64("input_ids").unwrap();
    assert_eq!(shape[0], 20_000);
    let t = shape[1];
    let batch = tok.encode_batch_to(&sample, model.config(), t).unwrap();
    let want = model.backend().to_host(&model.forward(&batch).unwrap().last_hidden_state).unwrap();
    let (all, _) = got.read_f32("last_hidden_state").unwrap();
    let row = t * 48;
    for (k, &i) in picks.iter().enumerate() {
        let want_ids: Vec<i64> = batch.input_ids[k * t..(k + 1) * t].iter().map(|&v| v as i64).collect();
        assert_eq!(&ids[i * t..(i + 1) * t], want_ids.as_slice(), "input_ids of line {}", i + 1);
        assert_close(&format!("line {}", i + 1), &all[i * row..(i + 1) * row], &want[k * row..(k + 1) * row], 1e-5);
    }
    // A blank line keeps its row: [CLS] [SEP].
    assert_eq!(ids[5 * t..5 * t + 3].iter().filter(|&&v| v != 0).count(), 2);
}

// ---- 11: temporaries are never a predictable name -------------------------------------------

#[test]
fn links_planted_at_predictable_temporary_names_are_never_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, "keep").unwrap();
    // Links at `.o.safetensors.tmp-PID` for the next few hundred pids (the old naming).
    let next: u32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(std::process::id());
    for pid in next + 1..next + 400 {
        std::os::unix::fs::symlink(&victim, tmp.path().join(format!(".o.safetensors.tmp-{pid}"))).unwrap();
    }
    // And what a killed run left at a name of our current form goes.
    let stale = tmp.path().join(format!(".o.safetensors.tmp-{}-0123456789abcdef", dead_pid()));
    std::fs::write(&stale, "half").unwrap();
    let dest = tmp.path().join("o.safetensors");
    ok(run_tiny(&dest).output().unwrap());
    assert_eq!(bytes(&victim), b"keep");
    assert!(TensorFile::open(&dest).is_ok());
    assert!(!stale.exists(), "a dead run's temporary was left");
}

// ---- 2: one adapter twice in Parallel -------------------------------------------------------

fn tiny() -> PathBuf {
    fixtures().join("tiny_bert")
}

fn adapter_dir(name: &str) -> PathBuf {
    fixtures().join("adapters").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `bert-adapters run ARGS`: (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let o = bin().arg("run").args(args).output().unwrap();
    let (stdout, stderr) = text(&o);
    (o.status.success(), stdout, stderr)
}

fn expect_failure(args: &[&str], says: &[&str]) {
    fails(bin().arg("run").args(args).output().unwrap(), says);
}

/// `--parallel A,A --train A`: the loss sums both branches, so every gradient of A is the sum of
/// A alone under the top half of the probe and A alone under the bottom half.
#[test]
fn an_adapter_twice_in_parallel_gets_the_sum_of_both_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let inputs = tiny().join("inputs.safetensors");
    let model = tiny();
    let n = 4 * 11 * 48;
    let w: Vec<f32> = (0..2 * n).map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0).collect();
    let probe = |name: &str, v: &[f32], rows: usize| -> PathBuf {
        let p = d.join(name);
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        write_raw_safetensors(&p, &[("W".to_string(), Dtype::F32, vec![rows, 11, 48], bytes)]);
        p
    };
    for name in ["houlsby", "pfeiffer_inv"] {
        let a = adapter_dir(name);
        let grads = |setup: &[&str], w: &Path, out: &str| -> TensorFile {
            let out = d.join(out);
            let mut args = vec!["--model", s(&model), "--inputs", s(&inputs), "--out", s(&out), "--adapter", s(&a)];
            args.extend_from_slice(setup);
            args.extend_from_slice(&["--train", name, "--grad-probe", s(w)]);
            let (ok, _, stderr) = run(&args);
            assert!(ok, "{setup:?}: {stderr}");
            TensorFile::open(&out).unwrap()
        };
        let pair = format!("{name},{name}");
        let par = grads(&["--parallel", &pair], &probe("w_all.safetensors", &w, 8), "par.safetensors");
        let top = grads(&["--active", name], &probe("w_top.safetensors", &w[..n], 4), "top.safetensors");
        let bottom = grads(&["--active", name], &probe("w_bottom.safetensors", &w[n..], 4), "bottom.safetensors");
        let keys: Vec<String> = par.names().into_iter().filter(|k| k.starts_with("grad.")).collect();
        assert!(keys.len() >= 8, "{name}: {keys:?}");
        for key in &keys {
            let want: Vec<f32> = read_f32(&top, key).0.iter().zip(read_f32(&bottom, key).0).map(|(a, b)| a + b).collect();
            assert_close(&format!("--parallel {pair} {key}"), &read_f32(&par, key).0, &want, 1e-4);
        }
        let loss = |f: &TensorFile| read_f32(f, "loss").0[0] as f64;
        assert!((loss(&par) - loss(&top) - loss(&bottom)).abs() < 1e-3 * (1.0 + loss(&par).abs()), "{name}: losses");
    }
}

// ---- 6: non-finite results are errors ------------------------------------------------------

/// A copy of the model folder `src` (config, tokenizer if any) at `dest` whose LayerNorm tensors
/// picked by `pick` have γ = β = 3e38: some normalised value is ≥ 1/√47, so the output overflows.
fn overflowing_copy(src: &Path, dest: &Path, pick: impl Fn(&str) -> bool) -> PathBuf {
    std::fs::create_dir_all(dest).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        if src.join(f).is_file() {
            std::fs::copy(src.join(f), dest.join(f)).unwrap();
        }
    }
    let mut tensors = read_raw_safetensors(&src.join("model.safetensors"));
    for t in tensors.iter_mut().filter(|t| pick(&t.0)) {
        t.3 = 3e38f32.to_le_bytes().repeat(48);
    }
    write_raw_safetensors(&dest.join("model.safetensors"), &tensors);
    dest.to_path_buf()
}

/// Values that overflow float32 stop `run` with one line naming where they appeared; no output.
#[test]
fn run_refuses_non_finite_results() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out.safetensors");
    let inputs = tiny().join("inputs.safetensors");
    // The tiny model with its embedding LayerNorm overflowing.
    let model = overflowing_copy(&tiny(), &d.join("model"), |name| name.starts_with("embeddings.LayerNorm."));
    expect_failure(&["--model", s(&model), "--inputs", s(&inputs), "--out", s(&out)], &["non-finite values", "the embeddings"]);
    assert!(!out.exists(), "no output may be written");
}

/// Base weights that overflow: `train` says so at step 1 and does not blame the learning rate;
/// a head whose logits overflow: `predict` prints no label at all.
#[test]
fn train_and_predict_refuse_non_finite_values_and_name_the_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trainable_tiny_model(tmp.path());
    let out = tmp.path().join("out");
    ok(train_cmd(&model, &data(), &out, &[]).output().unwrap());

    let broken = overflowing_copy(&model, &tmp.path().join("broken"), |name| name.starts_with("encoder.layer.1.output.LayerNorm."));
    let err = fails(train_cmd(&broken, &data(), &tmp.path().join("out2"), &[]).output().unwrap(), &["non-finite values", "layer 1's FFN output location", "before any update"]);
    assert!(!err.contains("--lr"), "{err}");

    // tasknn's head made to overflow with finite weights: its first layer gives tanh(100) = 1
    // everywhere, its output layer sums 48 of those times 3e38.
    let head = tmp.path().join("tasknn");
    std::fs::create_dir(&head).unwrap();
    for f in std::fs::read_dir(out.join("tasknn")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, head.join(f.file_name().unwrap())).unwrap();
    }
    let path = head.join("model_head.safetensors");
    let mut tensors = read_raw_safetensors(&path);
    for t in tensors.iter_mut() {
        let value: f32 = match t.0.rsplit_once("tasknn.").map(|(_, k)| k) {
            Some("1.weight") | Some("4.bias") => 0.0,
            Some("1.bias") => 100.0,
            Some("4.weight") => 3e38,
            other => panic!("unexpected head tensor {other:?}"),
        };
        t.3 = value.to_le_bytes().repeat(t.3.len() / 4);
    }
    write_raw_safetensors(&path, &tensors);
    let lines = tmp.path().join("lines.txt");
    std::fs::write(&lines, "good film\nawful service\n").unwrap();
    let o = bin().arg("predict").arg("--model").arg(&model).arg("--adapter").arg(&head).arg("--text").arg(&lines).output().unwrap();
    assert!(o.stdout.is_empty(), "labels printed: {}", text(&o).0);
    fails(o, &["non-finite values", "head `tasknn`"]);
}

// ---- 10: a .bin whose tensors share one huge deflated storage ----------------------------------

#[test]
fn a_bin_adapter_with_an_oversized_shared_storage_is_refused_unread() {
    let tmp = tempfile::tempdir().unwrap();
    let src = adapter_dir("opt_ln_before_after");
    let dir = tmp.path().join("adapter");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(src.join("adapter_config.json"), dir.join("adapter_config.json")).unwrap();
    // Storage `3` (a 3-float bias) declared and stored as 64 MiB of zeros, deflated to ~64 KB.
    let mut members = unzip(&bytes(&src.join("pytorch_adapter.bin")));
    let pkl = member(&mut members, "data.pkl");
    let at = pkl.windows(7).position(|w| w == b"X\x01\x00\x00\x003q").expect("storage key `3` in the pickle");
    assert_eq!(&pkl[at + 8..at + 13], b"h\x06K\x03t");
    let numel: u32 = 16 << 20;
    pkl.splice(at + 10..at + 12, [b'J'].into_iter().chain(numel.to_le_bytes()));
    *member(&mut members, "data/3") = vec![0; 64 << 20];
    let archive = zip_members(&members, zip::CompressionMethod::Deflated);
    assert!(archive.len() < 1 << 20, "{} bytes", archive.len());
    std::fs::write(dir.join("pytorch_adapter.bin"), archive).unwrap();
    let out = tmp.path().join("o.safetensors");
    fails(limited(run_tiny(&out).arg("--adapter").arg(&dir), LIMIT), &["pytorch_adapter.bin", "storage `pytorch_adapter/data/3` holds 67108864 bytes, but its tensors use only 12"]);
    assert!(!out.exists());
}

// ---- the second audit (2026-11-28): files, flags and folders --------------------------------

/// The tiny model with its tokenizer.json passed through `edit`.
fn with_tokenizer(tmp: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let model = trainable_tiny_model(tmp);
    let path = model.join("tokenizer.json");
    let mut tok: serde_json::Value = serde_json::from_slice(&bytes(&path)).unwrap();
    edit(&mut tok);
    std::fs::write(&path, serde_json::to_vec(&tok).unwrap()).unwrap();
    model
}

fn predict_cmd(model: &Path, adapter: &Path, text: &Path) -> Command {
    let mut c = bin();
    c.arg("predict").arg("--model").arg(model).arg("--adapter").arg(adapter).arg("--text").arg(text).args(["--device", "cpu"]);
    c
}

#[test]
fn a_tokenizer_file_cannot_make_truncation_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = trainable_tiny_model(&tmp.path().join("plain"));
    let out = tmp.path().join("out");
    ok(train_cmd(&plain, &data(), &out, &[]).output().unwrap());
    let long = tmp.path().join("long.txt");
    std::fs::write(&long, format!("{}\nbad\n", "good film ".repeat(20))).unwrap();
    let want = ok(predict_cmd(&plain, &out.join("tasknn"), &long).args(["--max-len", "16"]).output().unwrap());

    // A stride as long as the room the specials leave (16 - 2) panicked inside tokenizers; the
    // overflowing pieces it shapes are never read, so it changes nothing.
    let strided = with_tokenizer(&tmp.path().join("strided"), |t| {
        t["truncation"] = serde_json::json!({"direction": "Right", "max_length": 512, "strategy": "LongestFirst", "stride": 14});
    });
    assert_eq!(ok(predict_cmd(&strided, &out.join("tasknn"), &long).args(["--max-len", "16"]).output().unwrap()), want);

    // More specials than the max length leaves no room for a token: refused, naming the file.
    let crowded = with_tokenizer(&tmp.path().join("crowded"), |t| {
        let cls = serde_json::json!({"SpecialToken": {"id": "[CLS]", "type_id": 0}});
        let mut single = vec![cls; 20];
        single.push(serde_json::json!({"Sequence": {"id": "A", "type_id": 0}}));
        t["post_processor"]["single"] = serde_json::Value::Array(single);
    });
    fails(predict_cmd(&crowded, &out.join("tasknn"), &long).args(["--max-len", "16"]).output().unwrap(), &["tokenizer.json", "adds 20 special tokens", "more than a max length of 16 holds"]);
}

#[test]
fn run_never_replaces_a_fifo_a_device_or_a_link_named_as_its_output() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    fails(run_tiny(&fifo).output().unwrap(), &["fifo", "not a regular file", "not replaced"]);
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&std::fs::symlink_metadata(&fifo).unwrap().file_type()));

    let target = tmp.path().join("target.txt");
    std::fs::write(&target, "mine").unwrap();
    let link = tmp.path().join("link.safetensors");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    fails(run_tiny(&link).output().unwrap(), &["link.safetensors", "a symbolic link", "not replaced"]);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(bytes(&target), b"mine");
    // A regular file is replaced, as before.
    let plain = tmp.path().join("plain.safetensors");
    std::fs::write(&plain, "old").unwrap();
    ok(run_tiny(&plain).output().unwrap());
    assert!(TensorFile::open(&plain).is_ok());
}

#[test]
fn a_second_run_into_a_busy_folder_is_refused_and_a_failed_fresh_run_leaves_no_folder() {
    use std::os::fd::AsRawFd;
    let tmp = tempfile::tempdir().unwrap();
    let model = trainable_tiny_model(tmp.path());
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    // Another run holds the folder (its lock, taken here as that run would).
    let held = std::fs::File::open(&out).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    fails(train_cmd(&model, &data(), &out, &[]).output().unwrap(), &["out", "another bert-adapters train is writing into this folder"]);
    assert_eq!(listing(&out), ["notes.txt"]);
    drop(held);
    ok(train_cmd(&model, &data(), &out, &[]).output().unwrap());
    assert!(out.join("metrics.csv").is_file() && out.join("notes.txt").is_file());

    // A fresh run that fails after taking its --out (here: at the model) removes the folder it
    // made, and only that: an existing one stays.
    let broken = tmp.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(broken.join("config.json"), "{").unwrap();
    let fresh = tmp.path().join("fresh/deeper");
    fails(train_cmd(&broken, &data(), &fresh, &[]).output().unwrap(), &["config.json"]);
    assert!(!fresh.exists());
    let existing = tmp.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    fails(train_cmd(&broken, &data(), &existing, &[]).output().unwrap(), &["config.json"]);
    assert!(existing.is_dir());
}

#[test]
fn a_file_size_limit_is_an_error_naming_the_file_not_a_silent_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trainable_tiny_model(tmp.path());
    let out = tmp.path().join("out");
    ok(train_cmd(&model, &data(), &out, &[]).output().unwrap());
    let before = bytes(&out.join("training.svg"));
    // 5 blocks of 512 bytes: the plot is larger. Without SIG_IGN the kernel's SIGXFSZ killed the
    // process with status 153 and no message.
    let train = train_cmd(&model, &data(), &out, &["--resume", "--steps", "4"]);
    let args: Vec<String> = std::iter::once(train.get_program()).chain(train.get_args()).map(|a| format!("'{}'", a.to_string_lossy())).collect();
    let o = Command::new("sh").arg("-c").arg(format!("ulimit -f 5; exec {}", args.join(" "))).output().unwrap();
    fails(o, &["training.svg", "File too large"]);
    // The write that failed left the previous plot whole, and no temporary beside it.
    assert_eq!(bytes(&out.join("training.svg")), before);
    assert!(listing(&out).iter().all(|name| !name.contains(".tmp-")), "{:?}", listing(&out));
}

#[test]
fn numeric_flags_the_kernels_cannot_hold_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trainable_tiny_model(tmp.path());
    let out = tmp.path().join("out");
    let go = |extra: &[&str]| train_cmd(&model, &data(), &out, extra).output().unwrap();
    // Was "0e0": a positive norm f32 rounds to 0, saved as "no clipping".
    fails(go(&["--max-grad-norm", "1e-50"]), &["--max-grad-norm", "outside f32's normal range"]);
    fails(go(&["--lr", "1e308"]), &["--lr", "outside f32's normal range"]);
    fails(go(&["--lr", "1", "--weight-decay", "2"]), &["--weight-decay 2 with --lr 1", "must be below 1"]);
    // A value starting with '-' reaches the flag's own check instead of reading as a flag.
    let o = go(&["--steps", "-inf"]);
    assert!(text(&o).1.contains("invalid value '-inf' for '--steps <N>'"), "{}", text(&o).1);
    assert!(!out.exists());
}

#[test]
fn a_flag_given_twice_takes_its_last_value_in_every_command() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trainable_tiny_model(tmp.path());
    let out = tmp.path().join("out");
    ok(train_cmd(&model, &data(), &out, &[]).output().unwrap());
    let texts = tmp.path().join("t.txt");
    std::fs::write(&texts, "good\nbad\n").unwrap();
    let once = ok(predict_cmd(&model, &out.join("tasknn"), &texts).args(["--max-len", "8"]).output().unwrap());
    assert_eq!(ok(predict_cmd(&model, &out.join("tasknn"), &texts).args(["--max-len", "40", "--max-len", "8"]).output().unwrap()), once);
    fails(predict_cmd(&model, &out.join("tasknn"), &texts).args(["--max-len", "8", "--max-len", "41"]).output().unwrap(), &["--max-len: 41 must be in 2..=40"]);
}

#[test]
fn predict_and_run_read_text_a_window_at_a_time_and_keep_every_line_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trainable_tiny_model(tmp.path());
    let out = tmp.path().join("out");
    ok(train_cmd(&model, &data(), &out, &[]).output().unwrap());
    // More lines than one window holds (65,536): the second window must follow the first.
    let n = 70_000;
    let line = |i: usize| match i % 3 {
        0 => format!("good film {i}"),
        1 => "bad".to_string(),
        _ => String::new(),
    };
    let texts = tmp.path().join("many.txt");
    std::fs::write(&texts, (0..n).map(|i| line(i) + "\n").collect::<String>()).unwrap();
    let labels = ok(predict_cmd(&model, &out.join("tasknn"), &texts).args(["--max-len", "8", "--with-text"]).output().unwrap());
    let rows: Vec<&str> = labels.lines().collect();
    assert_eq!(rows.len(), n);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.split_once('\t').map(|(_, t)| t.to_string()), Some(line(i)), "line {}", i + 1);
    }
    let dest = tmp.path().join("o.safetensors");
    let mut run = bin();
    run.arg("run").arg("--model").arg(&model).arg("--text").arg(&texts).arg("--out").arg(&dest);
    ok(run.output().unwrap());
    let file = TensorFile::open(&dest).unwrap();
    let (ids, shape) = file.read_i64("input_ids").unwrap();
    assert_eq!(shape[0], n);
    // Every third row is blank ([CLS] [SEP]); rows 69,999 and 70,000 sit in the second window.
    let row = |i: usize| &ids[i * shape[1]..(i + 1) * shape[1]];
    for i in [0, 1, 2, 65_535, 65_536, 65_537, n - 1] {
        let tokens = row(i).iter().filter(|&&id| id != 0).count();
        assert_eq!(tokens == 2, line(i).is_empty(), "row {}: {:?}", i + 1, row(i));
    }
}

#[test]
fn model_and_adapter_files_of_the_wrong_kind_are_named_without_hanging() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trainable_tiny_model(tmp.path());
    let out = tmp.path().join("out");
    ok(train_cmd(&model, &data(), &out, &[]).output().unwrap());
    let texts = tmp.path().join("t.txt");
    std::fs::write(&texts, "good\n").unwrap();

    // A FIFO as model.safetensors: opening it for reading would wait for a writer forever.
    let fifo_model = tmp.path().join("fifo_model");
    std::fs::create_dir(&fifo_model).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(model.join(f), fifo_model.join(f)).unwrap();
    }
    assert!(Command::new("mkfifo").arg(fifo_model.join("model.safetensors")).status().unwrap().success());
    let mut child = predict_cmd(&fifo_model, &out.join("tasknn"), &texts).stderr(Stdio::piped()).spawn().unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed().as_secs() > 60 {
            child.kill().unwrap();
            panic!("predict hung on a FIFO as model.safetensors");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    fails(child.wait_with_output().unwrap(), &["model.safetensors", "not a regular file"]);

    // A file where a folder belongs.
    fails(predict_cmd(&model.join("config.json"), &out.join("tasknn"), &texts).output().unwrap(), &["config.json", "is not a folder"]);
    fails(predict_cmd(&model, &texts, &texts).output().unwrap(), &["t.txt", "is not a folder (an adapter folder holds"]);

    // A config.json far larger than any real one is not read whole.
    let big = tmp.path().join("big_config");
    std::fs::create_dir(&big).unwrap();
    std::fs::write(big.join("config.json"), format!("{{\"pad\": \"{}\"}}", " ".repeat(17 << 20))).unwrap();
    fails(predict_cmd(&big, &out.join("tasknn"), &texts).output().unwrap(), &["config.json", "larger than 16777216 bytes"]);

    // A .bin that is not a torch.save zip: the legacy pickle format, or anything else.
    for (bytes, says) in [(vec![0x80u8, 0x02, 0x8a, 0x0a], "legacy (pre-1.6, not zip) format"), (b"junk junk junk".to_vec(), "not a torch.save archive")] {
        let dir = tmp.path().join("bin_adapter");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(out.join("tasknn/adapter_config.json"), dir.join("adapter_config.json")).unwrap();
        std::fs::write(dir.join("pytorch_adapter.bin"), bytes).unwrap();
        fails(predict_cmd(&model, &dir, &texts).output().unwrap(), &["pytorch_adapter.bin", says]);
    }

    // train_info.json's max length out of range names the file and field, not --max-len.
    let info = out.join("tasknn/train_info.json");
    let mut v: serde_json::Value = serde_json::from_slice(&bytes(&info)).unwrap();
    v["max_len"] = serde_json::json!(1000);
    std::fs::write(&info, serde_json::to_vec(&v).unwrap()).unwrap();
    fails(predict_cmd(&model, &out.join("tasknn"), &texts).output().unwrap(), &["max_len of", "train_info.json: 1000 must be in 2..=40"]);
}

#[test]
fn head_and_model_configs_that_contradict_themselves_are_refused() {
    use bert_adapters::config::HeadConfig;
    use bert_adapters::BertConfig;
    let head = |pairs: &[(&str, usize)]| HeadConfig { label2id: Some(pairs.iter().map(|(l, i)| (l.to_string(), *i)).collect()), ..HeadConfig::classification(3) };
    assert!(head(&[("a", 0), ("b", 1), ("c", 2)]).validate().is_ok());
    let e = head(&[("a", 0), ("b", 7)]).validate().unwrap_err().to_string();
    assert!(e.contains("`b` the id 7, but the head has 3 labels"), "{e}");
    let e = head(&[("a", 1), ("b", 1)]).validate().unwrap_err().to_string();
    assert!(e.contains("both `a` and `b` the id 1"), "{e}");
    // A 100,000-character name is named in a line of bounded length.
    let long = "x".repeat(100_000);
    let e = bert_adapters::config::validate_adapter_name(&long).unwrap_err().to_string();
    assert!(e.len() < 300 && e.contains("100000 bytes long; at most 256"), "{e}");

    // RoBERTa's positions start at pad_token_id + 1: 34 rows with pad 32 leave one token,
    // too few for <s> and </s>; refused on reading, naming config.json's field.
    let roberta = |pad: u32| format!(r#"{{"model_type": "roberta", "vocab_size": 120, "hidden_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 96, "max_position_embeddings": 34, "pad_token_id": {pad}}}"#);
    let path = Path::new("config.json");
    assert!(BertConfig::from_json_str(&roberta(30), path).is_ok());
    let e = BertConfig::from_json_str(&roberta(32), path).unwrap_err().to_string();
    assert!(e.contains("max_position_embeddings") && e.contains("leaves room for 1 tokens"), "{e}");
}

#[test]
fn a_head_reading_the_pooler_on_a_model_without_one_is_refused_when_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trainable_tiny_model(tmp.path());
    let out = tmp.path().join("out");
    ok(train_cmd(&model, &data(), &out, &[]).output().unwrap());
    let cfg = out.join("tasknn/head_config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&bytes(&cfg)).unwrap();
    v["config"]["use_pooler"] = serde_json::json!(true);
    std::fs::write(&cfg, serde_json::to_vec(&v).unwrap()).unwrap();
    // The model without its pooler weights.
    let weights = model.join("model.safetensors");
    let kept: Vec<_> = read_raw_safetensors(&weights).into_iter().filter(|(name, ..)| !name.starts_with("pooler.")).collect();
    write_raw_safetensors(&weights, &kept);
    let texts = tmp.path().join("t.txt");
    std::fs::write(&texts, "good\n").unwrap();
    fails(predict_cmd(&model, &out.join("tasknn"), &texts).output().unwrap(), &["head_config.json", "use_pooler", "this model has no pooler"]);
}
