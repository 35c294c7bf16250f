//! `bert-adapters adapter convert IN_DIR OUT_DIR [--model DIR] [--name NEW]`: read an adapter
//! folder in any supported form (`adapter.safetensors` or the library's default
//! `pytorch_adapter.bin`, with or without a head) and write it as ours: `adapter_config.json` +
//! `adapter.safetensors` (+ `head_config.json` + `model_head.safetensors`), which both this
//! crate and the Python library (`load_adapter(dir, use_safetensors=True)`) load.
//!
//! Of the BERT an adapter belongs to, loading and saving it read only the hidden size and the
//! number of layers. Without `--model` both come from the adapter itself: the hidden size from
//! `adapter_config.json` (the library writes it) or the shape of an `adapter_up` tensor, the
//! layers from the highest layer its tensors or its `leave_out` name. With `--model`, every
//! tensor is checked against that model instead.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Subcommand};

use bert_adapters::config::bert::limits;
use bert_adapters::config::HiddenAct;
use bert_adapters::io::adapter_files::{AdapterDir, AdapterLoadOptions, WeightsFile};
use bert_adapters::model::persist::{save_adapter_files, SaveOptions};
use bert_adapters::{Backend, BertConfig, CpuBackend, Error, Result};

#[derive(Args)]
pub struct AdapterArgs {
    #[command(subcommand)]
    command: AdapterCommand,
}

#[derive(Subcommand)]
enum AdapterCommand {
    /// Convert an adapter folder (safetensors or pytorch_adapter.bin) to adapter.safetensors.
    Convert(ConvertArgs),
}

#[derive(Args)]
#[command(args_override_self = true)]
struct ConvertArgs {
    /// The adapter folder to read (adapter_config.json + adapter.safetensors or pytorch_adapter.bin).
    in_dir: PathBuf,
    /// Where to write the converted folder (created if needed; our files in it are replaced).
    out_dir: PathBuf,
    /// The BERT the adapter belongs to: a model folder with config.json, or the config.json
    /// itself. Only the config is read; it gives the shapes every tensor is checked against.
    /// Without it, the adapter's own config and tensor shapes give them.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Save the adapter (and its head) under this name instead of the one in adapter_config.json.
    #[arg(long, value_name = "NEW")]
    name: Option<String>,
}

fn bert_config(model: &Path) -> Result<BertConfig> {
    if !model.exists() {
        let e = std::io::Error::new(std::io::ErrorKind::NotFound, "model folder (or its config.json) not found");
        return Err(Error::Io { path: model.to_path_buf(), source: e });
    }
    if model.is_dir() {
        BertConfig::from_file(model.join("config.json"))
    } else {
        BertConfig::from_file(model)
    }
}

/// The layer a tensor key belongs to (`….encoder.layer.<l>.…`), if any.
fn layer_of(key: &str) -> Option<&str> {
    let (_, rest) = key.split_once("encoder.layer.")?;
    rest.split('.').next()
}

/// A stand-in for the BERT `folder`'s adapter belongs to, with the hidden size and number of
/// layers its own files give (all that loading and saving an adapter read of a model's config),
/// or an error saying what is missing and to give --model.
fn bert_from_adapter(folder: &AdapterDir) -> Result<BertConfig> {
    let weights = WeightsFile::open(&folder.weights_path)?;
    let unknown = |what: &str| Error::Input(format!("{}: cannot tell {what} from the adapter's own files; give --model DIR", folder.dir.display()));
    let mut layers = folder.config.config.leave_out.iter().max().map_or(0, |&l| l.saturating_add(1));
    let mut hidden = folder.config.hidden_size;
    for t in weights.tensors() {
        if let Some(l) = layer_of(&t.name) {
            let l: usize = l.parse().ok().filter(|&l| l < limits::MAX_LAYERS).ok_or_else(|| Error::Tensor {
                path: folder.weights_path.clone(),
                name: t.name.clone(),
                msg: format!("layer `{l}` is not a layer of a BERT of at most {} layers", limits::MAX_LAYERS),
            })?;
            layers = layers.max(l + 1);
        }
        if hidden.is_none() && (t.name.ends_with("adapter_up.weight") || t.name.ends_with("adapter_up.bias")) {
            hidden = t.shape.first().copied();
        }
    }
    let hidden = hidden.ok_or_else(|| unknown("the hidden size (no hidden_size in adapter_config.json, no adapter_up tensor)"))?;
    if layers == 0 {
        return Err(unknown("the number of layers (no tensor names a layer, no leave_out)"));
    }
    if hidden == 0 || hidden > limits::MAX_HIDDEN || layers > limits::MAX_LAYERS {
        return Err(Error::Input(format!("{}: a hidden size of {hidden} and {layers} layers are not a BERT's", folder.dir.display())));
    }
    Ok(BertConfig {
        vocab_size: 1,
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: 1,
        intermediate_size: 1,
        hidden_act: HiddenAct::Gelu,
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        max_position_embeddings: 1,
        type_vocab_size: 1,
        layer_norm_eps: 1e-12,
        pad_token_id: 0,
        // The adapter's own model_type: keys lose that model's prefix and are saved for it.
        model_type: folder.config.model_type.unwrap_or_default(),
    })
}

fn convert(args: ConvertArgs) -> Result<()> {
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::fast());
    let folder = AdapterDir::open(&args.in_dir)?;
    let (bert, from) = match &args.model {
        Some(model) => (bert_config(model)?, String::new()),
        None => {
            let bert = bert_from_adapter(&folder)?;
            let from = format!(" for a BERT of hidden size {} and {} layers (from the adapter's own files)", bert.hidden_size, bert.num_hidden_layers);
            (bert, from)
        }
    };
    let opts = AdapterLoadOptions { load_as: args.name.clone(), ..AdapterLoadOptions::default() };
    let loaded = folder.load(&opts, &bert, backend.as_ref())?;
    // The adapter was trained on that base model: keep its recorded name.
    let save = SaveOptions { with_head: true, model_name: folder.config.model_name.clone() };
    save_adapter_files(&args.out_dir, &loaded.adapter, loaded.head.as_ref(), &bert, backend.as_ref(), &save)?;
    let file = folder.weights_path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    say!(
        "converted {} ({file}, {} tensors{}) to {} as adapter `{}`{from}",
        args.in_dir.display(),
        loaded.adapter.params().len(),
        if loaded.head.is_some() { ", with its head" } else { "" },
        args.out_dir.display(),
        loaded.adapter.name()
    );
    Ok(())
}

pub fn run(args: AdapterArgs) -> Result<()> {
    match args.command {
        AdapterCommand::Convert(a) => convert(a),
    }
}
