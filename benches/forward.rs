//! Whole-model forward on the CPU: the fast path against the plain reference (tiny fixture BERT),
//! and the fast path on all-MiniLM-L6-v2 (when scripts/fetch-model.sh has run).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bert_adapters::{Backend, BertModel, BertTokenizer, CpuBackend, InputBatch, LoadOptions};
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

criterion_group!(benches, tiny_forward, minilm_forward);
criterion_main!(benches);
