//! `bert-adapters adapter convert IN_DIR OUT_DIR --model DIR [--name NEW]`: read an adapter
//! folder in any supported form (`adapter.safetensors` or the library's default
//! `pytorch_adapter.bin`, with or without a head) and write it as ours: `adapter_config.json` +
//! `adapter.safetensors` (+ `head_config.json` + `model_head.safetensors`), which both this
//! crate and the Python library (`load_adapter(dir, use_safetensors=True)`) load.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Subcommand};

use bert_adapters::io::adapter_files::{AdapterDir, AdapterLoadOptions};
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
struct ConvertArgs {
    /// The adapter folder to read (adapter_config.json + adapter.safetensors or pytorch_adapter.bin).
    in_dir: PathBuf,
    /// Where to write the converted folder (created if needed; our files in it are replaced).
    out_dir: PathBuf,
    /// The BERT the adapter belongs to: a model folder with config.json, or the config.json
    /// itself. Only the config is read; it gives the shapes every tensor is checked against.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
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

fn convert(args: ConvertArgs) -> Result<()> {
    let bert = bert_config(&args.model)?;
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::fast());
    let folder = AdapterDir::open(&args.in_dir)?;
    let opts = AdapterLoadOptions { load_as: args.name.clone(), ..AdapterLoadOptions::default() };
    let loaded = folder.load(&opts, &bert, backend.as_ref())?;
    // The adapter was trained on that base model: keep its recorded name.
    let save = SaveOptions { with_head: true, model_name: folder.config.model_name.clone() };
    save_adapter_files(&args.out_dir, &loaded.adapter, loaded.head.as_ref(), &bert, backend.as_ref(), &save)?;
    let from = folder.weights_path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    say!(
        "converted {} ({from}, {} tensors{}) to {} as adapter `{}`",
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
