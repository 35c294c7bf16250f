//! Any bytes as `adapter_config.json`: parsing, fitting to a model, initialising whatever an
//! accepted config implies (a lenient load of an empty weights file), and writing it back must
//! not panic or allocate without bound; what we write must parse back to the same config.
#![no_main]

use std::path::Path;

use bert_adapters::io::adapter_files::{adapter_config_json, parse_adapter_config, AdapterLoadOptions, WeightsFile};
use bert_adapters::model::persist::build_adapter;
use bert_adapters::CpuBackend;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("adapter_config.json");
    let Ok(cfg) = parse_adapter_config(data, path) else { return };
    let written = adapter_config_json(&cfg.name, &cfg.config, cfg.hidden_size.unwrap_or(48), &cfg.model_name, cfg.model_type.unwrap_or_default());
    let back = parse_adapter_config(written.as_bytes(), path).expect("our own config file parses");
    assert_eq!(back.config, cfg.config, "{written}");
    assert_eq!((back.name.as_str(), back.model_name.as_str()), (cfg.name.as_str(), cfg.model_name.as_str()));

    let empty = WeightsFile::from_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}".to_vec(), Path::new("empty.safetensors")).expect("empty file");
    let bert = common::tiny_bert();
    let backend = CpuBackend::reference();
    for strict in [true, false] {
        let opts = AdapterLoadOptions { strict, ..AdapterLoadOptions::default() };
        let _ = build_adapter(&cfg, path, &empty, &opts, &bert, &backend);
    }
});
