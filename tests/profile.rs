//! `ProfiledBackend` passes every op through unchanged and counts each call.

mod common;

use std::sync::Arc;

use bert_adapters::profile::ProfiledBackend;
use bert_adapters::{Backend, CpuBackend};

use common::tiny;

#[test]
fn profiled_forward_is_bit_identical_and_counts_every_op() {
    let (plain, batch) = tiny(Arc::new(CpuBackend::fast()));
    let profiled = Arc::new(ProfiledBackend::new(Arc::new(CpuBackend::fast())));
    let (timed, _) = tiny(profiled.clone() as Arc<dyn Backend>);
    let layers = plain.config().num_hidden_layers;
    assert!(layers >= 2);
    profiled.reset(); // loading uploads weights through the backend
    let (want, got) = (plain.forward(&batch).unwrap(), timed.forward(&batch).unwrap());
    let (w, g) = (want.last_hidden_state.into_cpu_vec().unwrap(), got.last_hidden_state.into_cpu_vec().unwrap());
    assert_eq!(w.len(), g.len());
    assert!(w.iter().zip(&g).all(|(a, b)| a.to_bits() == b.to_bits()), "profiling changed the output");

    let times = profiled.times();
    let calls = |op: &str| times.iter().find(|(o, _)| *o == op).map(|(_, t)| t.calls).unwrap_or(0);
    // One packed QKV product and one attention per layer; one embeddings block (gather + LayerNorm).
    assert_eq!(calls("attention_packed"), layers as u64);
    assert_eq!(calls("embedding_layernorm"), 1);
    // Sorted by total time, most expensive first.
    assert!(times.windows(2).all(|p| p[0].1.total >= p[1].1.total));
    let report = profiled.report();
    assert!(report.contains("| attention_packed |"), "{report}");
    profiled.reset();
    assert!(profiled.times().is_empty());
}
