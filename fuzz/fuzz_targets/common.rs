//! What every target shares: the tiny BERT of the test fixtures and a few adapter configs.

use std::path::Path;

use bert_adapters::io::adapter_files::{parse_adapter_config, AdapterConfigFile};
use bert_adapters::BertConfig;

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
