//! `bert-adapters run`: one forward pass, outputs dumped to safetensors. Its flags are a
//! contract that outside checks call exactly so.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{ArgGroup, Args};

use bert_adapters::io::atomic::clean_leftovers;
use bert_adapters::io::{write_safetensors, OutDtype, OutTensor, SafetensorsWriter};
use bert_adapters::{device, AdapterSetup, BertConfig, BertModel, BertTokenizer, Device, Error, InputBatch, LoadOptions, Result};

use crate::{infer, limits};

#[derive(Args)]
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
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
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

fn f32_out(backend: &dyn bert_adapters::Backend, t: &bert_adapters::Tensor) -> Result<OutTensor> {
    Ok(OutTensor::F32 { shape: t.shape().to_vec(), data: backend.to_host(t)? })
}

fn i64_out(batch: &InputBatch, values: &[u32]) -> OutTensor {
    OutTensor::I64 { shape: vec![batch.batch, batch.seq_len], data: values.iter().map(|&v| v as i64).collect() }
}

/// Where the rows come from: a validated batch from `--inputs`, or lines of `--text`.
enum Source {
    Ids(InputBatch),
    Text { tokenizer: Box<BertTokenizer>, lines: Vec<String> },
}

impl Source {
    fn read(args: &RunArgs, cfg: &BertConfig) -> Result<Source> {
        match (&args.inputs, &args.text) {
            (Some(inputs), _) => Ok(Source::Ids(InputBatch::from_file(inputs, cfg)?)),
            (None, Some(text)) => {
                let tokenizer = BertTokenizer::from_file(args.model.join("tokenizer.json"), cfg.max_position_embeddings)?;
                let lines = infer::read_text_lines(text, tokenizer.max_chars())?;
                Ok(Source::Text { tokenizer: Box::new(tokenizer), lines })
            }
            (None, None) => Err(Error::Input("one of --inputs or --text is required".into())),
        }
    }

    fn rows(&self) -> usize {
        match self {
            Source::Ids(b) => b.batch,
            Source::Text { lines, .. } => lines.len(),
        }
    }

    /// The padded length of every row: the input's, or the longest tokenized line.
    fn seq_len(&self, cfg: &BertConfig) -> Result<usize> {
        match self {
            Source::Ids(b) => Ok(b.seq_len),
            Source::Text { tokenizer, lines } => {
                let mut longest = 0;
                for chunk in lines.chunks(limits::rows_per_chunk(cfg.max_position_embeddings)) {
                    longest = longest.max(tokenizer.encode_batch(chunk, cfg)?.seq_len);
                }
                Ok(longest)
            }
        }
    }

    /// Rows `range`, padded to `seq_len`.
    fn batch(&self, range: std::ops::Range<usize>, seq_len: usize, cfg: &BertConfig) -> Result<InputBatch> {
        match self {
            Source::Ids(b) => {
                let cut = |v: &[u32]| v[range.start * b.seq_len..range.end * b.seq_len].to_vec();
                Ok(InputBatch { batch: range.len(), seq_len, input_ids: cut(&b.input_ids), attention_mask: cut(&b.attention_mask), token_type_ids: cut(&b.token_type_ids) })
            }
            Source::Text { tokenizer, lines } => tokenizer.encode_batch_to(&lines[range], cfg, seq_len),
        }
    }
}

/// One output tensor of a streamed run: its name, and per batch its data with how many row
/// blocks (Parallel branches) it holds.
struct Piece {
    name: String,
    shape: Vec<usize>,
    data: Vec<u8>,
    blocks: usize,
}

/// The tensors of one forward, in file order.
fn pieces(be: &dyn bert_adapters::Backend, out: &bert_adapters::BertOutput, batch: &InputBatch, with_ids: bool) -> Result<Vec<Piece>> {
    let rows = batch.batch;
    let mut v = Vec::new();
    let mut push = |name: String, t: &bert_adapters::Tensor| -> Result<()> {
        let data = be.to_host(t)?;
        let blocks = t.shape()[0] / rows;
        v.push(Piece { name, shape: t.shape().to_vec(), data: bytemuck::cast_slice(&data).to_vec(), blocks });
        Ok(())
    };
    push("last_hidden_state".into(), &out.last_hidden_state)?;
    if let Some(p) = &out.pooler_output {
        push("pooler_output".into(), p)?;
    }
    for (i, h) in out.hidden_states.iter().enumerate() {
        push(format!("hidden_states.{i}"), h)?;
    }
    if with_ids {
        for (name, values) in [("input_ids", &batch.input_ids), ("attention_mask", &batch.attention_mask)] {
            let data: Vec<u8> = values.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect();
            v.push(Piece { name: name.into(), shape: vec![rows, batch.seq_len], data, blocks: 1 });
        }
    }
    Ok(v)
}

/// Eval forward over all rows, a bounded chunk at a time, streamed into `--out` in row order:
/// memory stays that of one chunk whatever the number of rows. Returns (last_hidden_state's
/// shape, pooler_output's shape, number of hidden states).
fn forward_streamed(model: &BertModel, source: &Source, out_path: &Path) -> Result<(Vec<usize>, Option<Vec<usize>>, usize)> {
    let cfg = model.config();
    let be = model.backend().as_ref();
    let (n, seq_len) = (source.rows(), source.seq_len(cfg)?);
    let chunk = limits::rows_per_chunk(seq_len);
    let with_ids = matches!(source, Source::Text { .. });
    let mut writer: Option<(SafetensorsWriter, Vec<Vec<usize>>)> = None;
    for start in (0..n).step_by(chunk) {
        let range = start..(start + chunk).min(n);
        let batch = source.batch(range.clone(), seq_len, cfg)?;
        let out = model.forward(&batch)?;
        let pieces = pieces(be, &out, &batch, with_ids)?;
        if writer.is_none() {
            // The first chunk fixes the layout: each tensor holds `blocks` row blocks of n rows.
            let specs: Vec<(String, OutDtype, Vec<usize>)> = pieces
                .iter()
                .map(|p| {
                    let mut shape = p.shape.clone();
                    shape[0] = p.blocks * n;
                    let dtype = if p.name == "input_ids" || p.name == "attention_mask" { OutDtype::I64 } else { OutDtype::F32 };
                    (p.name.clone(), dtype, shape)
                })
                .collect();
            let shapes = specs.iter().map(|s| s.2.clone()).collect();
            writer = Some((SafetensorsWriter::create(out_path, &specs, Some(&[("format", "pt")]))?, shapes));
        }
        let (w, _) = writer.as_mut().ok_or_else(|| Error::Input("internal: no writer".into()))?;
        for (t, p) in pieces.iter().enumerate() {
            // Block i of this chunk is rows [i·n + start, i·n + end) of the output.
            let block_bytes = p.data.len() / p.blocks;
            let row_bytes = block_bytes / range.len();
            for (i, block) in p.data.chunks(block_bytes).enumerate() {
                w.write_at(t, ((i * n + start) * row_bytes) as u64, block)?;
            }
        }
    }
    let (w, shapes) = writer.ok_or_else(|| Error::Input("no rows to run".into()))?;
    w.commit()?;
    let pooler = model.has_pooler().then(|| shapes[1].clone());
    Ok((shapes[0].clone(), pooler, cfg.num_hidden_layers + 1))
}

/// `--train --grad-probe`: one forward and backward over the whole batch (the probe's loss
/// couples every row), refused up front if it cannot fit in memory.
fn probe_gradients(model: &mut BertModel, args: &RunArgs, source: &Source) -> Result<Vec<(String, OutTensor)>> {
    let cfg = model.config().clone();
    let seq_len = source.seq_len(&cfg)?;
    let branches = args.parallel.len().max(1);
    limits::check_fits(
        &format!("--train on {} rows × {seq_len} tokens in one pass", source.rows()),
        limits::training_step_bytes(&cfg, branches * source.rows(), seq_len),
        "give fewer rows",
    )?;
    let batch = source.batch(0..source.rows(), seq_len, &cfg)?;
    let names: Vec<&str> = args.train.iter().map(String::as_str).collect();
    model.train_adapter(&names)?;
    let backend = model.backend().clone();
    let (out, tape) = model.forward_train(&batch)?;
    let probe_path = args.grad_probe.as_ref().ok_or_else(|| Error::Input("--train needs --grad-probe FILE".into()))?;
    let w = read_probe(probe_path, out.last_hidden_state.shape())?;
    let last = backend.to_host(&out.last_hidden_state)?;
    let loss: f64 = last.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum();
    if !loss.is_finite() {
        return Err(Error::Input(format!("{}: the probe loss Σ last_hidden_state ⊙ W is {loss}", probe_path.display())));
    }
    let grads = model.backward(&tape, &backend.upload(w, out.last_hidden_state.shape())?, None)?;

    let be = backend.as_ref();
    let mut tensors = vec![("last_hidden_state".to_string(), f32_out(be, &out.last_hidden_state)?)];
    if let Some(p) = &out.pooler_output {
        tensors.push(("pooler_output".into(), f32_out(be, p)?));
    }
    for (i, h) in out.hidden_states.iter().enumerate() {
        tensors.push((format!("hidden_states.{i}"), f32_out(be, h)?));
    }
    if matches!(source, Source::Text { .. }) {
        tensors.push(("input_ids".into(), i64_out(&batch, &batch.input_ids)));
        tensors.push(("attention_mask".into(), i64_out(&batch, &batch.attention_mask)));
    }
    tensors.push(("loss".into(), OutTensor::F32 { shape: vec![1], data: vec![loss as f32] }));
    for (key, g) in &grads {
        tensors.push((format!("grad.{key}"), f32_out(be, g)?));
    }
    Ok(tensors)
}

pub fn run(args: RunArgs) -> Result<()> {
    let device: Device = args.device.parse()?;
    let backend = device::backend_for(device)?;
    let start = Instant::now();
    let (mut model, _report) = BertModel::from_dir(&args.model, backend.clone(), LoadOptions::default())?;
    apply_adapters(&mut model, &args)?;
    let cfg = model.config().clone();
    let source = Source::read(&args, &cfg)?;
    // A temporary of `--out` that an interrupted run left (only ours, of processes no longer running).
    if let (Some(dir), Some(name)) = (args.out.parent(), args.out.file_name().and_then(|n| n.to_str())) {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        let _ = clean_leftovers(dir, &[name], &[]); // best effort: it never blocks the run
    }
    let (last_shape, pooler_shape, hidden) = if args.train.is_empty() {
        forward_streamed(&model, &source, &args.out)?
    } else {
        let tensors = probe_gradients(&mut model, &args, &source)?;
        let shape = |name: &str| {
            tensors.iter().find(|(n, _)| n == name).map(|(_, t)| match t {
                OutTensor::F32 { shape, .. } | OutTensor::I64 { shape, .. } => shape.clone(),
            })
        };
        let shapes = (shape("last_hidden_state").unwrap_or_default(), shape("pooler_output"), cfg.num_hidden_layers + 1);
        write_safetensors(&args.out, &tensors, Some(&[("format", "pt")]))?;
        shapes
    };
    // The file is written; a reader that went away (`| head`) changes nothing.
    say!(
        "wrote {}: last_hidden_state {last_shape:?}{}, {hidden} hidden states ({} tokens on {}, {:.2} s)",
        args.out.display(),
        pooler_shape.map_or(String::new(), |p| format!(", pooler_output {p:?}")),
        source.rows() * last_shape.get(1).copied().unwrap_or(0),
        backend.name(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
