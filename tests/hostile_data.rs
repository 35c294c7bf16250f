//! `train --data` as a hostile user feeds it: the data-file findings of the hostile-user audit,
//! run against the real binary on the tiny trainable model. Each case ends in exit 0 with the
//! right output, or exit 1 with one line naming the file, line and problem; the large input runs
//! under an address-space limit (`setrlimit(RLIMIT_AS)` in the child), so memory that grows with
//! the file fails the test rather than the machine.

mod common;
// The binary's helpers; outside common/mod.rs, which examples/seed_workflow.rs also includes.
#[path = "common/cli.rs"]
mod cli;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use cli::{bin, fails, limited, ok};
use common::trainable_tiny_model;

/// One step of 2 texts at `--max-len 8` (texts cut to 8 × 64 = 512 characters).
fn train_cmd(model: &Path, data: &Path, out: &Path) -> Command {
    train_at(model, data, out, "8")
}

fn train_at(model: &Path, data: &Path, out: &Path, max_len: &str) -> Command {
    let mut c = bin();
    c.arg("train").arg("--model").arg(model).arg("--data").arg(data).arg("--out").arg(out);
    c.args(["--steps", "1", "--batch-size", "2", "--max-len", max_len, "--eval-every", "1000", "--eval-size", "2", "--device", "cpu", "--quiet"]);
    c
}

fn predictions(out: &Path) -> Vec<Vec<String>> {
    let mut r = csv::Reader::from_path(out.join("test_predictions.csv")).unwrap();
    r.records().map(|r| r.unwrap().iter().map(str::to_string).collect()).collect()
}

/// The audit's 100 MB CSV of 25 million 1-character rows took ~30× its size and aborted; a
/// 24 MB one (6 million rows) took more than 1 GiB. Held as cut texts plus 8 bytes a row, it
/// trains under a 1 GiB address space.
#[test]
fn a_large_csv_of_short_rows_trains_in_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trainable_tiny_model(tmp.path());
    let data = tmp.path().join("big.csv");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&data).unwrap());
    f.write_all(b"text,label\n").unwrap();
    for _ in 0..3_000_000 {
        f.write_all(b"a,x\nb,y\n").unwrap();
    }
    f.into_inner().unwrap().sync_all().unwrap();
    let out = tmp.path().join("out");
    ok(limited(&mut train_at(&model, &data, &out, "2"), 1 << 30));
    let rows = predictions(&out);
    assert_eq!(rows.len(), 600_000, "10% of 6,000,000 examples tested");
    assert!(rows.iter().all(|r| (r[0] == "a" && r[1] == "x") || (r[0] == "b" && r[1] == "y")), "texts keep their labels");
}

/// Texts are cut to 64 characters per `--max-len` token as they are read: test_predictions.csv
/// holds the cut text, not a 200 KB one.
#[test]
fn texts_are_cut_as_they_are_read() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trainable_tiny_model(tmp.path());
    let data = tmp.path().join("long.csv");
    let long = |i: usize| format!("{} {i} {}", ["good", "bad"][i % 2], "é and more words ".repeat(12_000));
    let body: String = (0..30).map(|i| format!("{},{}\n", long(i), ["pos", "neg"][i % 2])).collect();
    std::fs::write(&data, format!("text,label\n{body}")).unwrap();
    let out = tmp.path().join("out");
    ok(train_cmd(&model, &data, &out).output().unwrap());
    let rows = predictions(&out);
    assert_eq!(rows.len(), 3);
    for r in rows {
        assert_eq!(r[0].chars().count(), 8 * 64, "cut to --max-len × 64 characters");
        let i: usize = r[0].split(' ').nth(1).unwrap().parse().unwrap();
        assert!(long(i).starts_with(&r[0]) && r[1] == ["pos", "neg"][i % 2], "{i}");
    }
}

/// A label with a tab or line break would break `predict`'s one label per line and
/// `--with-text`'s `label<TAB>text`; a 300-byte one, every prediction line and head config.
#[test]
fn labels_that_would_break_the_outputs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trainable_tiny_model(tmp.path());
    let out = tmp.path().join("out");
    let cases: [(&str, String, &[&str]); 4] = [
        ("tab.csv", "text,label\ngood,pos\nbad,\"n\teg\"\n".into(), &["tab.csv: line 3: `label` holds the control character U+0009"]),
        ("nl.csv", "text,label\ngood,pos\n\"bad\",\"n\neg\"\n".into(), &["nl.csv: line 3: `label` holds the control character U+000A"]),
        ("nl.jsonl", "{\"text\":\"good\",\"label\":\"pos\"}\n{\"text\":\"bad\",\"label\":\"n\\u0000eg\"}\n".into(), &["nl.jsonl: line 2: `label` holds the control character U+0000"]),
        ("long.csv", format!("text,label\ngood,pos\nbad,{}\n", "n".repeat(300)), &["long.csv: line 3: `label` is 300 bytes long; a label may have at most 256"]),
    ];
    for (name, content, says) in cases {
        let data = tmp.path().join(name);
        std::fs::write(&data, content).unwrap();
        fails(train_cmd(&model, &data, &out).output().unwrap(), says);
    }
}

/// JSON Lines by content where the name does not decide: from a pipe and from a `.json` file;
/// and an error says which format was assumed and why.
#[test]
fn json_lines_are_recognised_by_content() {
    let tmp = tempfile::tempdir().unwrap();
    let model = trainable_tiny_model(tmp.path());
    let rows: String = (0..40).map(|i| format!("{{\"text\": \"{} film\", \"label\": \"{}\"}}\n", ["good", "bad"][i % 2], ["pos", "neg"][i % 2])).collect();
    let json = tmp.path().join("rows.json");
    std::fs::write(&json, &rows).unwrap();
    let out = tmp.path().join("out");
    ok(train_cmd(&model, &json, &out).output().unwrap());
    assert_eq!(predictions(&out).len(), 4);

    let piped = tmp.path().join("piped");
    let mut child = train_cmd(&model, Path::new("/dev/stdin"), &piped).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(rows.as_bytes()).unwrap();
    ok(child.wait_with_output().unwrap());
    assert_eq!(predictions(&piped), predictions(&out), "the same rows, the same run");

    let csv_named = tmp.path().join("rows.csv");
    std::fs::write(&csv_named, &rows).unwrap();
    fails(train_cmd(&model, &csv_named, &tmp.path().join("out3")).output().unwrap(), &["rows.csv: line 1: the header has no `text` column", "read as CSV because the name ends in `.csv`"]);
}
