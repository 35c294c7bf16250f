//! `bert-adapters run`: one forward pass, outputs dumped to safetensors. Its flags are a
//! contract that outside checks call exactly so.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{ArgGroup, Args};

use bert_adapters::io::{write_safetensors, OutTensor};
use bert_adapters::{device, AdapterSetup, BertModel, BertTokenizer, Device, Error, InputBatch, LoadOptions, Result};

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

fn read_lines(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    let text = String::from_utf8(bytes).map_err(|e| Error::Malformed {
        path: path.to_path_buf(),
        msg: format!("not UTF-8 (invalid byte at offset {})", e.utf8_error().valid_up_to()),
    })?;
    let lines: Vec<String> = text.lines().map(|l| l.trim_end_matches('\r').to_string()).filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return Err(Error::Malformed { path: path.to_path_buf(), msg: "no non-empty lines to encode".into() });
    }
    Ok(lines)
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

pub fn run(args: RunArgs) -> Result<()> {
    let device: Device = args.device.parse()?;
    let backend = device::backend_for(device)?;
    let start = Instant::now();
    let (mut model, _report) = BertModel::from_dir(&args.model, backend.clone(), LoadOptions::default())?;
    apply_adapters(&mut model, &args)?;
    let cfg = model.config();
    let batch = match (&args.inputs, &args.text) {
        (Some(inputs), _) => InputBatch::from_file(inputs, cfg)?,
        (None, Some(text)) => {
            let tokenizer = BertTokenizer::from_file(args.model.join("tokenizer.json"), cfg.max_position_embeddings)?;
            tokenizer.encode_batch(&read_lines(text)?, cfg)?
        }
        (None, None) => return Err(Error::Input("one of --inputs or --text is required".into())),
    };
    let (out, probe) = if args.train.is_empty() {
        (model.forward(&batch)?, None)
    } else {
        let names: Vec<&str> = args.train.iter().map(String::as_str).collect();
        model.train_adapter(&names)?;
        let (out, tape) = model.forward_train(&batch)?;
        let probe_path = args.grad_probe.as_ref().ok_or_else(|| Error::Input("--train needs --grad-probe FILE".into()))?;
        let w = read_probe(probe_path, out.last_hidden_state.shape())?;
        let last = backend.to_host(&out.last_hidden_state)?;
        let loss: f64 = last.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum();
        let grads = model.backward(&tape, &backend.upload(w, out.last_hidden_state.shape())?, None)?;
        (out, Some((loss as f32, grads)))
    };

    let be = backend.as_ref();
    let mut tensors = vec![("last_hidden_state".to_string(), f32_out(be, &out.last_hidden_state)?)];
    if let Some(p) = &out.pooler_output {
        tensors.push(("pooler_output".into(), f32_out(be, p)?));
    }
    for (i, h) in out.hidden_states.iter().enumerate() {
        tensors.push((format!("hidden_states.{i}"), f32_out(be, h)?));
    }
    if args.text.is_some() {
        tensors.push(("input_ids".into(), i64_out(&batch, &batch.input_ids)));
        tensors.push(("attention_mask".into(), i64_out(&batch, &batch.attention_mask)));
    }
    if let Some((loss, grads)) = &probe {
        tensors.push(("loss".into(), OutTensor::F32 { shape: vec![1], data: vec![*loss] }));
        for (key, g) in grads {
            tensors.push((format!("grad.{key}"), f32_out(be, g)?));
        }
    }
    write_safetensors(&args.out, &tensors, Some(&[("format", "pt")]))?;
    println!(
        "wrote {}: last_hidden_state {:?}{}, {} hidden states ({} tokens on {}, {:.2} s)",
        args.out.display(),
        out.last_hidden_state.shape(),
        out.pooler_output.as_ref().map_or(String::new(), |p| format!(", pooler_output {:?}", p.shape())),
        out.hidden_states.len(),
        batch.batch * batch.seq_len,
        backend.name(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
