//! Any bytes as `data.pkl`: the interpreter must accept or refuse them without panicking,
//! looping, or allocating more than a small multiple of the input.
#![no_main]

use bert_adapters::io::pickle::parse_state_dict;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(tensors) = parse_state_dict(data) {
        for t in &tensors {
            // Accepted views lie inside their storage.
            assert!(t.numel() == 0 || t.offset + t.numel() <= t.storage.numel, "{t:?}");
        }
    }
});
