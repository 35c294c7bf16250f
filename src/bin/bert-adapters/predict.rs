//! `bert-adapters predict`: one label per input line, from an adapter folder with its head (as
//! `train` writes `<out>/tasknn`), computed exactly as `train` evaluates.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use bert_adapters::io::adapter_files::{AdapterLoadOptions, HEAD_CONFIG_FILE};
use bert_adapters::{BertModel, BertTokenizer, Error, Result};

use crate::train::{self, TRAIN_INFO};
use crate::{checkpoint, flags, infer};

#[derive(Args)]
#[command(args_override_self = true)]
pub struct PredictArgs {
    /// Hugging Face model folder: config.json, model.safetensors, tokenizer.json (as in `train`).
    #[arg(long, value_name = "DIR", default_value = train::DEFAULT_MODEL)]
    model: PathBuf,
    /// Adapter folder with its head (adapter_config.json, adapter.safetensors, head files).
    #[arg(long, value_name = "DIR")]
    adapter: PathBuf,
    /// UTF-8 text, one input per line.
    #[arg(long, value_name = "FILE")]
    text: PathBuf,
    /// Tokens per text; default: what the adapter was trained with (its train_info.json, or the
    /// state.json of the checkpoint it is in), else the model's max_position_embeddings (less
    /// the position offset of RoBERTa / XLM-R).
    #[arg(long, value_name = "T", allow_hyphen_values = true, value_parser = flags::whole)]
    max_len: Option<i128>,
    /// auto (CUDA when available, else cpu), cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// The activations' precision, as in `train`: bf16 (the base and activations in bf16, f32
    /// accumulation), f16 (the same in f16), f32, or auto: bf16 on a GPU, f32 on the CPU and on cuda-sim. The same
    /// device and precision as `train` give its test predictions exactly.
    #[arg(long, value_enum, default_value_t = infer::Precision::Auto)]
    precision: infer::Precision,
    /// Print `label<TAB>text` per line (the text as read: cut at 64 characters per token of the
    /// max length) instead of the label alone.
    #[arg(long)]
    with_text: bool,
}

/// The max length recorded by `train` beside the adapter (`<out>/tasknn`), or in the state of
/// the checkpoint the adapter is in (`<out>/checkpoint/tasknn`), if any, with where it was read
/// (for messages).
fn trained_max_len(args: &PredictArgs) -> Result<Option<(usize, String)>> {
    let path = args.adapter.join(TRAIN_INFO);
    if !path.is_file() {
        let from = || format!("settings.max_len of {}", args.adapter.parent().unwrap_or(&args.adapter).join("state.json").display());
        return Ok(checkpoint::max_len_of(&args.adapter)?.map(|m| (m, from())));
    }
    let bytes = bert_adapters::io::read_capped(&path, 1 << 20, "a train_info.json")?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| Error::Malformed { path: path.clone(), msg: format!("not valid JSON: {e}") })?;
    match v.get("max_len") {
        None => Ok(None),
        Some(m) => match m.as_u64() {
            Some(m) => Ok(Some((usize::try_from(m).unwrap_or(usize::MAX), format!("max_len of {}", path.display())))),
            None => Err(Error::Config { path, field: "max_len".into(), msg: format!("expected an integer, got {}", bert_adapters::error::clip_text(&m.to_string())) }),
        },
    }
}

pub fn run(args: PredictArgs) -> Result<()> {
    let asked = args.max_len.map(|m| flags::at_least::<usize>("--max-len", m, 2)).transpose()?;
    train::check_exists(&args.model, train::DEFAULT_MODEL, "model folder", "fetch-model.sh")?;
    let (backend, load_options) = infer::open(&args.device, args.precision)?;
    let (mut model, _report) = BertModel::from_dir(&args.model, backend, load_options)?;
    let max_pos = model.config().max_seq_len();
    let (max_len, from) = match asked {
        Some(m) => (m, "--max-len".to_string()),
        None => trained_max_len(&args)?.unwrap_or((max_pos, "the model's max length".to_string())),
    };
    if max_len < 2 || max_len > max_pos {
        return Err(Error::Input(format!("{from}: {max_len} must be in 2..={max_pos} (the model's {})", model.config().max_seq_len_source())));
    }
    let name = model.load_adapter_with(&args.adapter, &AdapterLoadOptions::default())?.name;
    let head = model.head(&name).ok_or_else(|| Error::Io {
        path: args.adapter.join(HEAD_CONFIG_FILE),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("adapter `{name}` has no head to predict with")),
    })?;
    // Label names from the head's label2id; `LABEL_i` (the HF convention) where it has none.
    let mut names: Vec<String> = (0..head.num_labels()).map(|i| format!("LABEL_{i}")).collect();
    for (label, &id) in head.config().label2id.iter().flatten() {
        if let Some(slot) = names.get_mut(id) {
            *slot = label.clone();
        }
    }
    let tokenizer = BertTokenizer::from_file(args.model.join("tokenizer.json"), max_len)?;
    // A window of lines at a time, each predicted in batches sorted by length (as evaluation
    // batches) and written before the next is read: memory is one window's, whatever the file.
    let mut lines_in = infer::TextLines::open(&args.text, tokenizer.max_chars())?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut any = false;
    while let Some(lines) = lines_in.next_window(infer::WINDOW_LINES, infer::WINDOW_BYTES)? {
        any = true;
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let pred = infer::predict(&mut model, &tokenizer, &name, &refs)?;
        let written = pred
            .iter()
            .zip(&lines)
            .try_for_each(|(&p, text)| if args.with_text { writeln!(out, "{}\t{text}", names[p]) } else { writeln!(out, "{}", names[p]) })
            .and_then(|_| out.flush());
        match written {
            // A closed pipe (`| head`) is the reader's choice, not an error.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(Error::Io { path: PathBuf::from("<stdout>"), source: e }),
            Ok(()) => {}
        }
    }
    if !any {
        return Err(infer::empty_text_file(&args.text));
    }
    Ok(())
}
