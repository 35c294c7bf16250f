//! Any bytes as an adapter weights file (safetensors, or a torch.save zip when they start with
//! a zip signature): opening, reading every tensor, and building adapters from it strictly and
//! leniently must return Ok or Err, never panic or allocate beyond the input's size.
#![no_main]

use std::path::Path;

use bert_adapters::io::adapter_files::{build_adapter, AdapterLoadOptions, WeightsFile};
use bert_adapters::CpuBackend;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Ok(weights) = WeightsFile::from_bytes(data.to_vec(), Path::new("fuzz")) else { return };
    for t in weights.tensors() {
        let _ = weights.read_f32(&t.name);
    }
    let bert = common::tiny_bert();
    let backend = CpuBackend::reference();
    for cfg in common::configs() {
        for strict in [true, false] {
            let opts = AdapterLoadOptions { strict, ..AdapterLoadOptions::default() };
            let _ = build_adapter(&cfg, Path::new("adapter_config.json"), &weights, &opts, &bert, &backend);
        }
    }
});
