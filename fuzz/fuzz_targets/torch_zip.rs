//! Adapter weights files, seeded with torch.save zips (seed corpus: pytorch_adapter.bin files); the body is `common::weights_file`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| common::weights_file(data));
