//! Whole-model forward on the CPU: the fast path against the plain reference (tiny fixture BERT),
//! and the fast path on all-MiniLM-L6-v2 (when scripts/fetch-model.sh has run).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bert_adapters::{AdapterConfig, AdapterSetup, Backend, BertModel, BertTokenizer, CpuBackend, InputBatch, LoadOptions, Tensor};
use bert_adapters::model::heads::HeadConfig;
use bert_adapters::model::step::TrainStepConfig;
use bert_adapters::train::{AdamW, AdamWConfig, Objective};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn model(dir: &Path, backend: Arc<dyn Backend>) -> BertModel {
    BertModel::from_dir(dir, backend, LoadOptions::default()).expect("model loads").0
}

fn tiny_forward(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_bert");
    let mut group = c.benchmark_group("cpu_forward_tiny_bert");
    for backend in [Arc::new(CpuBackend::fast()) as Arc<dyn Backend>, Arc::new(CpuBackend::reference())] {
        let m = model(&dir, backend.clone());
        let batch = InputBatch::from_file(dir.join("inputs.safetensors"), m.config()).expect("inputs load");
        group.throughput(Throughput::Elements((batch.batch * batch.seq_len) as u64));
        group.bench_function(backend.name(), |b| b.iter(|| m.forward(&batch).expect("forward")));
    }
    group.finish();
}

fn minilm_forward(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    if !dir.join("model.safetensors").is_file() {
        eprintln!("skipping cpu_forward_minilm: run scripts/fetch-model.sh first");
        return;
    }
    let m = model(&dir, Arc::new(CpuBackend::fast()));
    let tok = BertTokenizer::from_file(dir.join("tokenizer.json"), 128).expect("tokenizer loads");
    // 32 sequences of 128 tokens: the shape the performance targets are quoted at.
    let text = "adapters train a few parameters on a frozen encoder ".repeat(20);
    let batch = tok.encode_batch(&vec![text; 32], m.config()).expect("tokenizes");
    let mut group = c.benchmark_group("cpu_forward_minilm_32x128");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements((batch.batch * batch.seq_len) as u64));
    group.bench_function("fast", |b| b.iter(|| m.forward(&batch).expect("forward")));
    group.finish();
}

/// One probe-loss training step on MiniLM under Parallel(scorenn, tasknn), training tasknn:
/// forward with the tape plus the planned backward (scorenn's branch is skipped).
fn minilm_train_step(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    if !dir.join("model.safetensors").is_file() {
        eprintln!("skipping cpu_train_step_minilm: run scripts/fetch-model.sh first");
        return;
    }
    let mut m = model(&dir, Arc::new(CpuBackend::fast()));
    for name in ["scorenn", "tasknn"] {
        m.add_adapter(name, AdapterConfig::named("pfeiffer").expect("named config")).expect("adapter");
    }
    m.set_active_adapters(Some(AdapterSetup::Parallel(vec!["scorenn".into(), "tasknn".into()]))).expect("setup");
    m.train_adapter(&["tasknn"]).expect("train");
    let tok = BertTokenizer::from_file(dir.join("tokenizer.json"), 64).expect("tokenizer loads");
    let text = "adapters train a few parameters on a frozen encoder ".repeat(8);
    let batch = tok.encode_batch(&vec![text; 16], m.config()).expect("tokenizes");
    let mut group = c.benchmark_group("cpu_train_step_minilm_parallel_16x64");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements((batch.batch * batch.seq_len) as u64));
    group.bench_function("forward_only", |b| b.iter(|| m.forward(&batch).expect("forward")));
    group.bench_function("forward_train_and_backward", |b| {
        b.iter(|| {
            let (out, tape) = m.forward_train(&batch).expect("forward");
            let d = Tensor::from_vec(vec![1.0; out.last_hidden_state.elem_count()], out.last_hidden_state.shape()).expect("shape");
            m.backward(&tape, &d, None).expect("backward")
        })
    });
    // The whole step `train` runs: forward, heads, tasknn's objective, backward, clipping and
    // AdamW over tasknn's arena, with the loss read back as `train` does every step.
    for name in ["scorenn", "tasknn"] {
        m.add_classification_head(name, HeadConfig::classification(3)).expect("head");
    }
    m.set_dropout(Some(7));
    let labels: Vec<usize> = (0..batch.batch).map(|i| i % 3).collect();
    let cfg = TrainStepConfig { objective: Objective::TaskEnergy { lambda: 0.1 }, trained: "tasknn".into(), max_grad_norm: Some(1.0) };
    let mut opt = AdamW::new(AdamWConfig { lr: 1e-5, ..AdamWConfig::default() }).expect("optimizer");
    let be = m.backend().clone();
    group.bench_function("full_step", |b| {
        b.iter(|| m.train_step(&batch, &labels, &cfg, &mut opt).expect("step").read(be.as_ref()).expect("finite"))
    });
    // The same step on the pooled CPU backend (no buffer created after the first steps).
    let mut p = model(&dir, Arc::new(CpuBackend::pooled(bert_adapters::CpuMode::Fast)));
    for name in ["scorenn", "tasknn"] {
        p.add_adapter(name, AdapterConfig::named("pfeiffer").expect("named config")).expect("adapter");
        p.add_classification_head(name, HeadConfig::classification(3)).expect("head");
    }
    p.set_active_adapters(Some(AdapterSetup::Parallel(vec!["scorenn".into(), "tasknn".into()]))).expect("setup");
    p.train_adapter(&["tasknn"]).expect("train");
    p.set_dropout(Some(7));
    let mut opt = AdamW::new(AdamWConfig { lr: 1e-5, ..AdamWConfig::default() }).expect("optimizer");
    let pbe = p.backend().clone();
    group.bench_function("full_step_pooled", |b| {
        b.iter(|| p.train_step(&batch, &labels, &cfg, &mut opt).expect("step").read(pbe.as_ref()).expect("finite"))
    });
    group.finish();
}

criterion_group!(benches, tiny_forward, minilm_forward, minilm_train_step);
criterion_main!(benches);
