//! A training step of a repeated shape creates no buffer (issue 10): after the first steps, every
//! tensor the backend makes draws its buffer from the backend's pool, the same buffers in the same
//! order each time, so the step could be captured and replayed; and it asks the pool for no
//! buffer per parameter gradient (they are written into the arena). Alone in its binary: the count of storages made outside
//! a pool is process-wide.

mod common;

use std::sync::Arc;

use bert_adapters::model::heads::HeadConfig;
use bert_adapters::model::step::TrainStepConfig;
use bert_adapters::tensor::unpooled_storages;
use bert_adapters::train::{AdamW, AdamWConfig, Objective};
use bert_adapters::{AdapterConfig, CpuBackend, CpuMode};

#[test]
fn steps_two_to_five_create_no_buffer() {
    let cpu = Arc::new(CpuBackend::pooled(CpuMode::Fast));
    let (mut model, batch) = common::tiny(cpu.clone());
    model.add_adapter_seeded("scorenn", AdapterConfig::named("houlsby").unwrap(), 1).unwrap();
    model.add_adapter_seeded("tasknn", AdapterConfig::named("houlsby").unwrap(), 2).unwrap();
    for n in ["scorenn", "tasknn"] {
        model.add_classification_head(n, HeadConfig::classification(3)).unwrap();
    }
    model.set_active_adapters(Some(common::setup(&["scorenn", "tasknn"]))).unwrap();
    let labels: Vec<usize> = (0..batch.batch).map(|i| i % 3).collect();
    let mut opts = [AdamW::new(AdamWConfig::default()).unwrap(), AdamW::new(AdamWConfig::default()).unwrap()];
    // The loop `train` runs: alternate the adapters, a new dropout seed every step.
    let mut step = |s: u64| {
        let (name, i, objective) = if s.is_multiple_of(2) { ("tasknn", 1, Objective::TaskEnergy { lambda: 0.1 }) } else { ("scorenn", 0, Objective::ScoreMargin { margin: 1.0, ce_weight: 0.1 }) };
        model.train_adapter(&[name]).unwrap();
        model.set_dropout(Some(100 + s));
        let cfg = TrainStepConfig { objective, trained: name.into(), max_grad_norm: Some(1.0) };
        let out = model.train_step(&batch, &labels, &cfg, &mut opts[i]).unwrap();
        out.read(cpu.as_ref()).unwrap()
    };
    // Two steps bind both optimizers and pack both arenas; the pool fills.
    let (pool0, unpooled0) = (cpu.pool_counts(), unpooled_storages());
    step(0);
    step(1);
    let (pool, unpooled) = (cpu.pool_counts(), unpooled_storages());
    // The counters see the first steps' allocations (so they can see a later one).
    let first = pool - pool0;
    assert!(first.created > 30 && first.wrapped == first.created + first.reused, "{first:?}");
    eprintln!("steps 0-1: {first:?}, unpooled storages {}", unpooled - unpooled0);
    // Steps 2 and 4 train tasknn, 3 and 5 scorenn: each pair must use the same buffers in the
    // same order (what a captured graph needs).
    let mut traces = Vec::new();
    for s in 2..6 {
        cpu.pool().unwrap().start_trace();
        step(s);
        traces.push(cpu.pool().unwrap().take_trace());
    }
    assert!(!traces[0].is_empty());
    // The backward writes parameter gradients into the arena's views and accumulates the
    // residual-stream gradients into the product's destination: 65 buffers per step. When each
    // backward op returned a new tensor, residual gradients were summed by `add` and every
    // gradient was copied into the arena afterwards, a step asked for 92.
    let requests: Vec<usize> = traces.iter().map(Vec::len).collect();
    assert!(requests.iter().all(|&n| n <= 65), "pool requests per step {requests:?}, 65 expected (92 with the copy path)");
    assert_eq!(traces[0], traces[2], "tasknn steps 2 and 4 use the same buffers in the same order");
    assert_eq!(traces[1], traces[3], "scorenn steps 3 and 5 use the same buffers in the same order");
    let (pool, unpooled) = (cpu.pool_counts() - pool, unpooled_storages() - unpooled);
    eprintln!("steps 2-5: {pool:?}, unpooled storages {unpooled}");
    assert_eq!(pool.created, 0, "buffers allocated in steps 2–5: {pool:?}");
    assert_eq!(unpooled, 0, "tensors made outside the pool in steps 2–5");
    assert!(pool.reused > 0 && pool.wrapped == pool.reused, "every tensor on a pool buffer, every buffer taken wrapped: {pool:?}");
}
