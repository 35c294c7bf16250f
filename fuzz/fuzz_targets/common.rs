//! What every target shares: the tiny BERT of the test fixtures and a few adapter configs.

use std::path::Path;

use bert_adapters::io::adapter_files::{parse_adapter_config, AdapterConfigFile, AdapterLoadOptions, WeightsFile};
use bert_adapters::model::persist::build_adapter;
use bert_adapters::{BertConfig, CpuBackend};

pub fn tiny_bert() -> BertConfig {
    BertConfig::from_json_str(include_str!("../../tests/fixtures/tiny_bert/config.json"), Path::new("config.json"))
        .expect("the fixture config parses")
}

#[allow(dead_code)] // the pickle and config targets do not use it
/// Configs whose tensors cover every key pattern: both locations, ln_before aliases, NICE.
pub fn configs() -> Vec<AdapterConfigFile> {
    [
        &include_bytes!("../../tests/fixtures/adapters/houlsby_inv/adapter_config.json")[..],
        &include_bytes!("../../tests/fixtures/adapters/opt_ln_before_after/adapter_config.json")[..],
        &include_bytes!("../../tests/fixtures/adapters/opt_scaling_channel/adapter_config.json")[..],
    ]
    .iter()
    .map(|b| parse_adapter_config(b, Path::new("adapter_config.json")).expect("fixture config parses"))
    .collect()
}

#[allow(dead_code)] // the pickle and config targets do not use it
/// Any bytes as an adapter weights file (safetensors, or a torch.save zip when they start with a
/// zip signature): opening, reading every tensor, and building adapters from it strictly and
/// leniently must return Ok or Err, never panic or allocate beyond the input's size. The
/// safetensors and torch_zip targets share this body and differ only in their seed corpora.
pub fn weights_file(data: &[u8]) {
    let Ok(weights) = WeightsFile::from_bytes(data.to_vec(), Path::new("fuzz")) else { return };
    for t in weights.tensors() {
        let _ = weights.read_f32(&t.name);
    }
    let bert = tiny_bert();
    let backend = CpuBackend::reference();
    for cfg in configs() {
        for strict in [true, false] {
            let opts = AdapterLoadOptions { strict, ..AdapterLoadOptions::default() };
            let _ = build_adapter(&cfg, Path::new("adapter_config.json"), &weights, &opts, &bert, &backend);
        }
    }
}
