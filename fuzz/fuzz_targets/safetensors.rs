//! Adapter weights files, seeded with safetensors files (seed corpus: safetensors); the body is `common::weights_file`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| common::weights_file(data));
