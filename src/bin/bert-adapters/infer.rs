//! What `train` (evaluation), `predict` and `run` share: the device choice, reading one text per
//! line with bounded memory, and batched prediction with one adapter and its head, so train and
//! predict see exactly the same computation.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bert_adapters::cuda::backend::CudaBackend;
use bert_adapters::{backend_for, AdapterSetup, Backend, BertModel, BertTokenizer, DType, Device, Error, LoadOptions, Result};

use crate::limits;

/// `--precision` of `run`, `train` and `predict` (`run` offers f32, bf16 and f16).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    Auto,
    F32,
    Bf16,
    F16,
}

impl Precision {
    /// The 16-bit activation dtype this asks for explicitly, if any.
    fn half(self) -> Option<DType> {
        match self {
            Precision::Bf16 => Some(DType::BF16),
            Precision::F16 => Some(DType::F16),
            Precision::Auto | Precision::F32 => None,
        }
    }
}

/// The backend for `--device` (`auto`: CUDA when it can be used, else the CPU; `cpu`, `cuda`,
/// `cuda:N` or `cuda-sim`) in `precision`, opened once, and how the base is loaded for it. See
/// [`open_on`].
pub fn open(choice: &str, precision: Precision) -> Result<(Arc<dyn Backend>, LoadOptions)> {
    match choice {
        "auto" => open_on(None, precision),
        other => open_on(Some(parse_device(other)?), precision),
    }
}

/// The backend on `device` (None: GPU 0 when it opens, else the CPU) in `precision`: f32 as it
/// opens; bf16 (f16) the CUDA backend's bf16 (f16) activation mode over a base loaded in bf16
/// (f16), refused on the CPU, which computes in f32; auto bf16 on a GPU and f32 elsewhere (cuda-sim, the simulator,
/// keeps f32 by default: it exists to test kernels, and f32 is the precision the CPU's results can
/// be compared with). `train` and `predict` share the rule, so `predict` on the device `train` ran
/// on computes what its evaluation computed. A CUDA device is opened once, in the mode it keeps.
pub fn open_on(device: Option<Device>, precision: Precision) -> Result<(Arc<dyn Backend>, LoadOptions)> {
    let cuda = match device {
        Some(Device::Cpu) => None,
        Some(d) => Some(CudaBackend::open(d)?),
        // A machine with a CUDA driver whose GPU cannot be used (NVRTC or cuBLASLt missing, the
        // device busy or broken) is worth a line: the run then goes on the CPU, far slower than
        // the user may expect. Without a driver, nothing to say.
        None => match CudaBackend::open(Device::Cuda(0)) {
            Ok(backend) => Some(backend),
            Err(e) if bert_adapters::cuda::probe::driver_available() => {
                warn!("warning: --device auto: GPU 0 cannot be used ({e}); running on the CPU");
                None
            }
            Err(_) => None,
        },
    };
    let Some(cuda) = cuda else {
        if let Some(half) = precision.half() {
            return Err(Error::Input(format!("--precision {half} needs a CUDA device (--device cuda or cuda-sim): the CPU backend computes in f32 (use --precision f32)")));
        }
        return Ok((backend_for(Device::Cpu)?, LoadOptions::default()));
    };
    let half = match precision {
        Precision::Auto if matches!(cuda.device(), Device::Cuda(_)) => Some(DType::BF16),
        other => other.half(),
    };
    let Some(half) = half else {
        return Ok((Arc::new(cuda), LoadOptions::default()));
    };
    Ok((Arc::new(cuda.with_activations(half)?), LoadOptions { dtype: half, ..LoadOptions::default() }))
}

fn parse_device(s: &str) -> Result<Device> {
    s.parse::<Device>().map_err(|_| Error::Input(format!("--device `{s}`: expected auto, cpu, cuda (or gpu), cuda:N or cuda-sim")))
}

/// The lines of a text file, one text each, read a window at a time so that memory stays that
/// of one window whatever the file's size: blank lines keep their row, a trailing newline does
/// not make an empty last text, `\r\n` is one line end. Each line is cut to `max_chars`
/// characters while it is read, so a 40 MB line costs no more memory than a short one; the
/// tokenizer would cut it anyway (see `BertTokenizer::max_chars`). Invalid UTF-8 is an error
/// naming the line.
pub struct TextLines {
    path: PathBuf,
    reader: std::io::BufReader<std::fs::File>,
    max_chars: usize,
    /// Lines returned so far (for the line numbers of messages).
    read: u64,
    done: bool,
}

/// A window of [`TextLines`]: at most this many lines…
pub const WINDOW_LINES: usize = 1 << 16;
/// …or about this many bytes of text, whichever comes first.
pub const WINDOW_BYTES: usize = 64 << 20;

impl TextLines {
    pub fn open(path: &Path, max_chars: usize) -> Result<TextLines> {
        let file = std::fs::File::open(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
        Ok(TextLines { path: path.to_path_buf(), reader: std::io::BufReader::with_capacity(1 << 16, file), max_chars, read: 0, done: false })
    }

    /// The next lines, at most `max_lines` of them and no more once `max_bytes` of text are
    /// held; `None` at the end of the file.
    pub fn next_window(&mut self, max_lines: usize, max_bytes: usize) -> Result<Option<Vec<String>>> {
        let path = self.path.clone();
        let io = |e| Error::Io { path: path.clone(), source: e };
        let max_line_bytes = self.max_chars.saturating_mul(4); // a char is at most 4 bytes
        let (mut lines, mut held, mut line, mut cut) = (Vec::new(), 0usize, Vec::new(), false);
        while !self.done && lines.len() < max_lines.max(1) && held < max_bytes {
            let buf = self.reader.fill_buf().map_err(io)?;
            if buf.is_empty() {
                self.done = true;
                if !line.is_empty() || cut {
                    self.finish_line(&mut lines, &mut line, cut)?;
                }
                break;
            }
            let (chunk, newline) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..i], Some(i + 1)),
                None => (buf, None),
            };
            let room = max_line_bytes.saturating_sub(line.len());
            line.extend_from_slice(&chunk[..chunk.len().min(room)]);
            cut |= chunk.len() > room;
            let used = newline.unwrap_or(buf.len());
            self.reader.consume(used);
            if newline.is_some() {
                held += self.finish_line(&mut lines, &mut line, cut)?;
                cut = false;
            }
        }
        Ok(if lines.is_empty() { None } else { Some(lines) })
    }

    /// Decode one line (cut to `max_chars` if `cut`), append it, and return its size.
    fn finish_line(&mut self, lines: &mut Vec<String>, line: &mut Vec<u8>, cut: bool) -> Result<usize> {
        if line.last() == Some(&b'\r') && !cut {
            line.pop();
        }
        self.read += 1;
        let text = match std::str::from_utf8(line) {
            Ok(t) => t,
            // A multi-byte character split by the cut: keep what precedes it.
            Err(e) if cut && e.error_len().is_none() => std::str::from_utf8(&line[..e.valid_up_to()]).unwrap_or_default(),
            Err(e) => {
                let msg = format!("line {}: invalid UTF-8 (byte offset {} in the line)", self.read, e.valid_up_to());
                return Err(Error::Malformed { path: self.path.clone(), msg });
            }
        };
        let text = bert_adapters::tokenize::truncate_chars(text, self.max_chars).to_string();
        let size = text.len() + std::mem::size_of::<String>();
        lines.push(text);
        line.clear();
        Ok(size)
    }
}

/// The error for a text file with no line at all.
pub fn empty_text_file(path: &Path) -> Error {
    Error::Malformed { path: path.to_path_buf(), msg: "the file is empty (one text per line expected)".into() }
}

/// Every line of `path` at once (see [`TextLines`]); a file without a line is an error.
#[cfg(test)]
pub fn read_text_lines(path: &Path, max_chars: usize) -> Result<Vec<String>> {
    let lines = TextLines::open(path, max_chars)?.next_window(usize::MAX, usize::MAX)?;
    lines.ok_or_else(|| empty_text_file(path))
}

/// The arg-max label of `adapter`'s head for every text, run with `adapter` alone active (as its
/// saved folder runs anywhere else). Texts are batched by length, so that little is padding;
/// the active setup is restored afterwards.
pub fn predict(model: &mut BertModel, tokenizer: &BertTokenizer, adapter: &str, texts: &[&str]) -> Result<Vec<usize>> {
    let never = AtomicBool::new(false);
    predict_until(model, tokenizer, adapter, texts, &never).map(Option::unwrap_or_default)
}

/// As [`predict`], but `None` as soon as `stop` is set (checked before each batch), so that
/// Ctrl-C during a long evaluation takes effect within one batch.
pub fn predict_until(model: &mut BertModel, tokenizer: &BertTokenizer, adapter: &str, texts: &[&str], stop: &AtomicBool) -> Result<Option<Vec<usize>>> {
    let preds = predict_part(model, tokenizer, adapter, texts, stop, 0, 1)?;
    Ok(preds.map(|p| p.into_iter().map(|v| v.unwrap_or(0)).collect()))
}

/// As [`predict_until`], for one of `parts` ranks that share the work: the batches (the same
/// ones as alone, so each text is computed exactly as alone) are dealt out round-robin and
/// this one, `part`, predicts only its own; the other texts are `None`.
pub fn predict_part(model: &mut BertModel, tokenizer: &BertTokenizer, adapter: &str, texts: &[&str], stop: &AtomicBool, part: usize, parts: usize) -> Result<Option<Vec<Option<usize>>>> {
    let previous = model.active_adapters().cloned();
    model.set_active_adapters(Some(AdapterSetup::Single(adapter.to_string())))?;
    let result = predict_active(model, tokenizer, adapter, texts, stop, part, parts.max(1));
    model.set_active_adapters(previous)?;
    result
}

fn predict_active(model: &BertModel, tokenizer: &BertTokenizer, adapter: &str, texts: &[&str], stop: &AtomicBool, part: usize, parts: usize) -> Result<Option<Vec<Option<usize>>>> {
    let be = model.backend().clone();
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| (texts[i].len(), i));
    let mut out = vec![None; texts.len()];
    for (k, chunk) in order.chunks(limits::rows_per_chunk(tokenizer.max_len())).enumerate() {
        if k % parts != part {
            continue;
        }
        if stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let batch_texts: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
        let batch = tokenizer.encode_batch(&batch_texts, model.config())?;
        let output = model.forward(&batch)?;
        let branches = model.head_logits(&output)?;
        let logits = branches.first().ok_or_else(|| Error::Internal("no head output".into()))?;
        let c = logits.logits.shape()[1];
        let host = be.to_host(&logits.logits)?;
        // A label from NaN logits would be an answer made up: refuse it.
        if let Some(at) = host.iter().position(|v| !v.is_finite()) {
            let i = chunk[at / c];
            return Err(Error::NonFinite { at: format!("the logits of head `{adapter}` ({}) for text {}", host[at], i + 1) });
        }
        for (&i, row) in chunk.iter().zip(host.chunks(c)) {
            out[i] = Some(argmax(row));
        }
    }
    Ok(Some(out))
}

/// Index of the largest value; the first of ties. Rows are checked finite before.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (j, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = j;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 0.7, 0.7]), 1);
        assert_eq!(argmax(&[-3.0, -1.0]), 1);
    }

    #[test]
    fn unknown_device_is_an_error() {
        assert!(open("tpu", Precision::Auto).err().unwrap().to_string().contains("--device `tpu`"));
        assert!(open("cpu", Precision::Auto).is_ok());
    }

    fn lines_of(content: &[u8], max_chars: usize) -> Result<Vec<String>> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.txt");
        std::fs::write(&p, content).unwrap();
        read_text_lines(&p, max_chars)
    }

    #[test]
    fn lines_keep_blank_rows_and_are_cut_while_read() {
        assert_eq!(lines_of(b"a\n\nb\r\nc", 10).unwrap(), ["a", "", "b", "c"]);
        assert_eq!(lines_of(b"a\n\n", 10).unwrap(), ["a", ""]);
        assert_eq!(lines_of(b"abcdef\nxy\n", 3).unwrap(), ["abc", "xy"]);
        // A cut inside a multi-byte character keeps the characters before it.
        assert_eq!(lines_of("ééé\n".as_bytes(), 2).unwrap(), ["éé"]);
        let long = vec![b'w'; 3 << 20];
        assert_eq!(lines_of(&long, 8).unwrap(), ["wwwwwwww"]);
        let e = lines_of(b"ok\nbad \xff here\n", 100).unwrap_err().to_string();
        assert!(e.contains("line 2: invalid UTF-8"), "{e}");
        assert!(lines_of(b"", 10).unwrap_err().to_string().contains("the file is empty"));
    }
}
