//! `bert-adapters run`: one forward pass, outputs dumped to safetensors. Its flags are a
//! contract that outside checks call exactly so.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{ArgGroup, Args, ValueEnum};

use bert_adapters::io::atomic::clean_leftovers;
use bert_adapters::io::{OutDtype, SafetensorsWriter};
use bert_adapters::{AdapterSetup, BertConfig, BertModel, BertTokenizer, Error, InputBatch, Result};

use crate::{infer, limits};

#[derive(Args)]
#[command(args_override_self = true)]
#[command(group(ArgGroup::new("source").required(true).args(["inputs", "text"])))]
#[command(group(ArgGroup::new("setup").args(["active", "parallel"])))]
pub struct RunArgs {
    /// Hugging Face model folder: config.json + model.safetensors (+ tokenizer.json for --text).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// safetensors with `input_ids` [B,T] (I64 or I32), optional `attention_mask` and `token_type_ids`.
    #[arg(long, value_name = "FILE")]
    inputs: Option<PathBuf>,
    /// UTF-8 text, one input per line, tokenized with the model's tokenizer.json.
    #[arg(long, value_name = "FILE")]
    text: Option<PathBuf>,
    /// Where to write the outputs (safetensors, F32).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// An adapter folder (adapter_config.json + adapter.safetensors or pytorch_adapter.bin); repeatable.
    #[arg(long, value_name = "DIR")]
    adapter: Vec<PathBuf>,
    /// Activate one adapter by name.
    #[arg(long, value_name = "NAME")]
    active: Option<String>,
    /// Activate adapters in Parallel, e.g. scorenn,tasknn.
    #[arg(long, value_name = "NAME,NAME[,...]", value_delimiter = ',')]
    parallel: Vec<String>,
    /// Make these adapters trainable and write gradients of the probe loss.
    #[arg(long, value_name = "NAME[,NAME...]", value_delimiter = ',', requires = "grad_probe")]
    train: Vec<String>,
    /// safetensors with `W` shaped like last_hidden_state; loss = Σ last_hidden_state ⊙ W.
    #[arg(long, value_name = "FILE", requires = "train")]
    grad_probe: Option<PathBuf>,
    /// cpu, cuda, cuda:N, cuda-sim, or auto (CUDA when it can be used, else the CPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The forward's precision: f32, or bf16 on a CUDA device (the base loaded in bf16, every
    /// activation stored in bf16 with f32 accumulation; the outputs are written widened to F32).
    /// With --train the backward runs in bf16 too (activation gradients bf16, the adapters'
    /// gradients f32). f16 is the same in f16, and its backward is loss-scaled (the probe's
    /// gradient times 2^16, halved until no gradient overflows, the gradients divided back).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
}

/// `run --precision`: f32 (the default), bf16 or f16, no `auto` (`run` is the parity tool: its
/// precision is always the one asked for).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Precision {
    F32,
    Bf16,
    F16,
}

impl From<Precision> for crate::infer::Precision {
    fn from(p: Precision) -> Self {
        match p {
            Precision::F32 => crate::infer::Precision::F32,
            Precision::Bf16 => crate::infer::Precision::Bf16,
            Precision::F16 => crate::infer::Precision::F16,
        }
    }
}

/// Load every `--adapter` folder and activate `--active` or `--parallel` (nothing otherwise, as
/// `load_adapter` in the library activates nothing).
fn apply_adapters(model: &mut BertModel, args: &RunArgs) -> Result<()> {
    for dir in &args.adapter {
        model.load_adapter(dir)?;
    }
    let setup = match (&args.active, args.parallel.as_slice()) {
        (Some(name), _) => Some(AdapterSetup::Single(name.clone())),
        (None, []) => None,
        (None, names) => Some(AdapterSetup::Parallel(names.to_vec())),
    };
    model.set_active_adapters(setup)
}

/// The probe weights `W`, shaped like last_hidden_state.
fn read_probe(path: &Path, shape: &[usize]) -> Result<Vec<f32>> {
    let file = bert_adapters::io::TensorFile::open(path)?;
    let (w, got) = file.read_f32("W")?;
    if got != shape {
        return Err(Error::Tensor {
            path: path.to_path_buf(),
            name: "W".into(),
            msg: format!("shape {got:?} differs from last_hidden_state {shape:?}"),
        });
    }
    Ok(w)
}

/// Where the rows come from: a validated batch from `--inputs`, or lines of `--text`.
enum Source {
    Ids(InputBatch),
    Text(TextSource),
}

/// The lines of `--text`. A regular file is read twice, a window at a time: once for the row
/// count and the longest tokenized line (every row is padded to it), then chunk by chunk as the
/// forward goes, so memory stays that of one window whatever the file's size. A pipe cannot
/// be read twice: its lines are held.
struct TextSource {
    tokenizer: Box<BertTokenizer>,
    path: PathBuf,
    rows: usize,
    longest: usize,
    held: Option<Vec<String>>,
    /// The open second pass and the index of the next line it returns.
    cursor: RefCell<Option<(infer::TextLines, usize)>>,
}

impl TextSource {
    fn read(path: &Path, tokenizer: BertTokenizer, cfg: &BertConfig) -> Result<TextSource> {
        let regular = std::fs::metadata(path).is_ok_and(|m| m.is_file());
        let mut lines = infer::TextLines::open(path, tokenizer.max_chars())?;
        let (mut rows, mut longest, mut held) = (0, 0, Vec::new());
        while let Some(window) = lines.next_window(infer::WINDOW_LINES, infer::WINDOW_BYTES)? {
            for chunk in window.chunks(limits::rows_per_chunk(cfg.max_seq_len())) {
                longest = longest.max(tokenizer.encode_batch(chunk, cfg)?.seq_len);
            }
            rows += window.len();
            if !regular {
                held.extend(window);
            }
        }
        if rows == 0 {
            return Err(infer::empty_text_file(path));
        }
        Ok(TextSource { tokenizer: Box::new(tokenizer), path: path.to_path_buf(), rows, longest, held: (!regular).then_some(held), cursor: RefCell::new(None) })
    }

    /// Lines `range` of a file (not held): read on from where the last call stopped (from the
    /// start of the file again when `range` starts elsewhere).
    fn read_lines(&self, range: std::ops::Range<usize>) -> Result<Vec<String>> {
        let mut cursor = self.cursor.borrow_mut();
        if cursor.as_ref().is_none_or(|(_, next)| *next != range.start) {
            let mut reader = infer::TextLines::open(&self.path, self.tokenizer.max_chars())?;
            let mut skipped = 0;
            while skipped < range.start {
                let window = reader.next_window((range.start - skipped).min(infer::WINDOW_LINES), infer::WINDOW_BYTES)?;
                skipped += window.map_or(usize::MAX, |w| w.len());
            }
            *cursor = Some((reader, range.start));
        }
        let (reader, next) = cursor.as_mut().expect("opened above");
        let lines = reader.next_window(range.len(), usize::MAX)?.unwrap_or_default();
        if lines.len() != range.len() {
            return Err(Error::Malformed { path: self.path.clone(), msg: format!("changed while it was read: {} lines, then fewer", self.rows) });
        }
        *next = range.end;
        Ok(lines)
    }
}

impl Source {
    fn read(args: &RunArgs, cfg: &BertConfig) -> Result<Source> {
        match (&args.inputs, &args.text) {
            (Some(inputs), _) => Ok(Source::Ids(InputBatch::from_file(inputs, cfg)?)),
            (None, Some(text)) => {
                let tokenizer = BertTokenizer::from_file(args.model.join("tokenizer.json"), cfg.max_seq_len())?;
                Ok(Source::Text(TextSource::read(text, tokenizer, cfg)?))
            }
            (None, None) => Err(Error::Input("one of --inputs or --text is required".into())),
        }
    }

    fn rows(&self) -> usize {
        match self {
            Source::Ids(b) => b.batch,
            Source::Text(t) => t.rows,
        }
    }

    /// The padded length of every row: the input's, or the longest tokenized line.
    fn seq_len(&self) -> usize {
        match self {
            Source::Ids(b) => b.seq_len,
            Source::Text(t) => t.longest,
        }
    }

    /// Rows `range`, padded to `seq_len`.
    fn batch(&self, range: std::ops::Range<usize>, seq_len: usize, cfg: &BertConfig) -> Result<InputBatch> {
        match self {
            Source::Ids(b) => {
                let cut = |v: &[u32]| v[range.start * b.seq_len..range.end * b.seq_len].to_vec();
                Ok(InputBatch { batch: range.len(), seq_len, input_ids: cut(&b.input_ids), attention_mask: cut(&b.attention_mask), token_type_ids: cut(&b.token_type_ids) })
            }
            Source::Text(t) => match &t.held {
                Some(held) => t.tokenizer.encode_batch_to(&held[range], cfg, seq_len),
                None => t.tokenizer.encode_batch_to(&t.read_lines(range)?, cfg, seq_len),
            },
        }
    }
}

/// One output tensor, or the part of it one chunk of rows produced: its data and how many row
/// blocks (Parallel branches) it holds.
struct Piece {
    name: String,
    dtype: OutDtype,
    shape: Vec<usize>,
    data: Vec<u8>,
    blocks: usize,
}

impl Piece {
    fn f32(be: &dyn bert_adapters::Backend, name: String, t: &bert_adapters::Tensor, rows: usize) -> Result<Piece> {
        let data = be.to_host(t)?;
        Ok(Piece { name, dtype: OutDtype::F32, shape: t.shape().to_vec(), data: bytemuck::cast_slice(&data).to_vec(), blocks: t.shape().first().map_or(1, |&r| r / rows) })
    }
}

/// The tensors of one forward, in file order.
fn pieces(be: &dyn bert_adapters::Backend, out: &bert_adapters::BertOutput, batch: &InputBatch, with_ids: bool) -> Result<Vec<Piece>> {
    let rows = batch.batch;
    let mut v = vec![Piece::f32(be, "last_hidden_state".into(), &out.last_hidden_state, rows)?];
    if let Some(p) = &out.pooler_output {
        v.push(Piece::f32(be, "pooler_output".into(), p, rows)?);
    }
    for (i, h) in out.hidden_states.iter().enumerate() {
        v.push(Piece::f32(be, format!("hidden_states.{i}"), h, rows)?);
    }
    if with_ids {
        for (name, values) in [("input_ids", &batch.input_ids), ("attention_mask", &batch.attention_mask)] {
            let data: Vec<u8> = values.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect();
            v.push(Piece { name: name.into(), dtype: OutDtype::I64, shape: vec![rows, batch.seq_len], data, blocks: 1 });
        }
    }
    Ok(v)
}

/// A file's tensors: name, dtype, shape.
type Layout = Vec<(String, OutDtype, Vec<usize>)>;

/// Eval forward over all rows, a bounded chunk at a time, streamed into `--out` in row order:
/// memory stays that of one chunk whatever the number of rows.
fn forward_streamed(model: &BertModel, source: &Source, out_path: &Path) -> Result<Layout> {
    let cfg = model.config();
    let be = model.backend().as_ref();
    let (n, seq_len) = (source.rows(), source.seq_len());
    let chunk = limits::rows_per_chunk(seq_len);
    let with_ids = matches!(source, Source::Text(_));
    let mut writer: Option<SafetensorsWriter> = None;
    let mut layout = Layout::new();
    for start in (0..n).step_by(chunk) {
        let range = start..(start + chunk).min(n);
        let batch = source.batch(range.clone(), seq_len, cfg)?;
        let pieces = pieces(be, &model.forward(&batch)?, &batch, with_ids)?;
        let w = match writer.as_mut() {
            Some(w) => w,
            None => {
                // The first chunk fixes the layout: each tensor holds `blocks` row blocks of n rows.
                layout = pieces.iter().map(|p| (p.name.clone(), p.dtype, [&[p.blocks * n], &p.shape[1..]].concat())).collect();
                writer.insert(SafetensorsWriter::create(out_path, &layout, Some(&[("format", "pt")]))?)
            }
        };
        for (t, p) in pieces.iter().enumerate() {
            // Block i of this chunk is rows [i·n + start, i·n + end) of the output.
            let block_bytes = p.data.len() / p.blocks;
            let row_bytes = block_bytes / range.len();
            for (i, block) in p.data.chunks(block_bytes).enumerate() {
                w.write_at(t, ((i * n + start) * row_bytes) as u64, block)?;
            }
        }
    }
    writer.ok_or_else(|| Error::Input("no rows to run".into()))?.commit()?;
    Ok(layout)
}

/// `--train --grad-probe`: one forward and backward over the whole batch (the probe's loss
/// couples every row), refused up front if it cannot fit in memory.
fn probe_gradients(model: &mut BertModel, args: &RunArgs, source: &Source) -> Result<Layout> {
    let cfg = model.config().clone();
    let seq_len = source.seq_len();
    let branches = args.parallel.len().max(1);
    limits::check_fits(
        &format!("--train on {} rows × {seq_len} tokens in one pass", source.rows()),
        limits::training_step_bytes(&cfg, branches * source.rows(), seq_len),
        "give fewer rows",
    )?;
    let batch = source.batch(0..source.rows(), seq_len, &cfg)?;
    let names: Vec<&str> = args.train.iter().map(String::as_str).collect();
    model.train_adapter(&names)?;
    // An adapter outside the active setup would only get zero gradients: surely a missing
    // --active / --parallel, so say so instead of writing zeros.
    let active: Vec<String> = model.active_adapters().map_or_else(Vec::new, |s| s.names().to_vec());
    if let Some(n) = names.iter().find(|n| !active.iter().any(|a| a == *n)) {
        return Err(Error::Input(format!(
            "--train {n}: adapter `{n}` is not in the active setup ({}), so every gradient would be zero; activate it with --active {n} or --parallel",
            if active.is_empty() { "none is active".to_string() } else { active.join(", ") }
        )));
    }
    for warning in model.training_warnings() {
        warn!("warning: {warning}");
    }
    let backend = model.backend().clone();
    let be = backend.as_ref();
    let (out, tape) = model.forward_train(&batch)?;
    let probe_path = args.grad_probe.as_ref().ok_or_else(|| Error::Input("--train needs --grad-probe FILE".into()))?;
    let w = read_probe(probe_path, out.last_hidden_state.shape())?;
    let last = be.to_host(&out.last_hidden_state)?;
    let loss: f64 = last.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum();
    if !loss.is_finite() {
        return Err(Error::Input(format!("{}: the probe loss Σ last_hidden_state ⊙ W is {loss}", probe_path.display())));
    }
    let mut grads = if out.last_hidden_state.dtype() == bert_adapters::DType::F16 {
        scaled_backward(model, &tape, &w, out.last_hidden_state.shape())?
    } else {
        model.backward(&tape, &be.upload(w, out.last_hidden_state.shape())?, None)?
    };
    // The probe's contract (and the Python script's): every trainable tensor, zeros where the
    // setup sends no gradient (the library leaves `.grad` None there).
    for (key, t) in model.trainable_tensors() {
        if !grads.contains_key(key) {
            grads.insert(key.to_string(), be.zeros(t.shape(), bert_adapters::DType::F32)?);
        }
    }

    let mut all = pieces(be, &out, &batch, matches!(source, Source::Text(_)))?;
    all.push(Piece { name: "loss".into(), dtype: OutDtype::F32, shape: vec![1], data: (loss as f32).to_le_bytes().to_vec(), blocks: 1 });
    for (key, g) in &grads {
        all.push(Piece::f32(be, format!("grad.{key}"), g, 1)?);
    }
    let layout: Layout = all.iter().map(|p| (p.name.clone(), p.dtype, p.shape.clone())).collect();
    let mut writer = SafetensorsWriter::create(&args.out, &layout, Some(&[("format", "pt")]))?;
    for (t, p) in all.iter().enumerate() {
        writer.write_at(t, 0, &p.data)?;
    }
    writer.commit()?;
    Ok(layout)
}

/// The f16 pipeline's backward of the probe, loss-scaled as `train` scales it
/// (`bert_adapters::train::LossScaler`): the probe's gradient times the scale, the parameter
/// gradients divided by it; a non-finite gradient halves the scale and runs the backward again,
/// down to a scale of 1, below which the overflow is an error.
fn scaled_backward(model: &BertModel, tape: &bert_adapters::model::Tape, w: &[f32], shape: &[usize]) -> Result<bert_adapters::model::Gradients> {
    let be = model.backend().clone();
    let mut scaler = bert_adapters::train::LossScaler::new(bert_adapters::train::LossScalerConfig::default())?;
    loop {
        let s = scaler.scale();
        let scaled: Vec<f32> = w.iter().map(|v| v * s).collect();
        // The backward checks its gradients: an overflow comes back as NonFinite.
        match model.backward(tape, &be.upload(scaled, shape)?, None) {
            Ok(grads) => {
                let mut finite = true;
                for g in grads.values() {
                    be.scale_in_place(g, 1.0 / s)?;
                    finite &= be.all_finite(g)?;
                }
                if finite {
                    return Ok(grads);
                }
            }
            Err(Error::NonFinite { .. }) => {}
            Err(e) => return Err(e),
        }
        scaler.update(f32::INFINITY)?;
    }
}

pub fn run(args: RunArgs) -> Result<()> {
    let (backend, load) = crate::infer::open(&args.device, args.precision.into())?;
    let start = Instant::now();
    let (mut model, _report) = BertModel::from_dir(&args.model, backend.clone(), load)?;
    apply_adapters(&mut model, &args)?;
    let source = Source::read(&args, model.config())?;
    // A temporary of `--out` that an interrupted run left (only ours, of processes no longer running).
    if let (Some(dir), Some(name)) = (args.out.parent(), args.out.file_name().and_then(|n| n.to_str())) {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        let _ = clean_leftovers(dir, &[name], &[]); // best effort: it never blocks the run
    }
    let layout = if args.train.is_empty() { forward_streamed(&model, &source, &args.out)? } else { probe_gradients(&mut model, &args, &source)? };
    let shape = |name: &str| layout.iter().find(|(n, _, _)| n == name).map(|(_, _, s)| s.clone());
    let last_shape = shape("last_hidden_state").unwrap_or_default();
    // The file is written; a reader that went away (`| head`) changes nothing.
    say!(
        "wrote {}: last_hidden_state {last_shape:?}{}, {} hidden states ({} tokens on {}, {:.2} s)",
        args.out.display(),
        shape("pooler_output").map_or(String::new(), |p| format!(", pooler_output {p:?}")),
        layout.iter().filter(|(n, _, _)| n.starts_with("hidden_states.")).count(),
        source.rows() * last_shape.get(1).copied().unwrap_or(0),
        backend.name(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
