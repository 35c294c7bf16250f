//! Where the CPU step's time goes, per op family: `cargo bench --locked --bench op_profile`.
//!
//! The MiniLM Parallel(scorenn, tasknn) setup of `benches/forward.rs`
//! (`cpu_train_step_minilm_parallel_16x64`) on a `ProfiledBackend` over the fast CPU backend:
//! two warm-up runs, then `STEPS` timed runs of the eval forward and of the full training step
//! (`train_step`: forward with dropout, heads, tasknn's objective, backward, clip, AdamW). Prints
//! one Markdown table per phase (docs/PERFORMANCE.md quotes them). Not a criterion bench: the
//! op totals are what it reports; wall times per step are criterion's job.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bert_adapters::model::heads::HeadConfig;
use bert_adapters::model::step::TrainStepConfig;
use bert_adapters::profile::ProfiledBackend;
use bert_adapters::train::{AdamW, AdamWConfig, Objective};
use bert_adapters::{AdapterConfig, AdapterSetup, Backend, BertModel, BertTokenizer, CpuBackend, LoadOptions};

const STEPS: usize = 5;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    if !dir.join("model.safetensors").is_file() {
        println!("SKIPPED: op_profile needs models/all-MiniLM-L6-v2 (run scripts/fetch-model.sh)");
        return;
    }
    let profiled = Arc::new(ProfiledBackend::new(Arc::new(CpuBackend::fast())));
    let (mut m, _) = BertModel::from_dir(&dir, profiled.clone() as Arc<dyn Backend>, LoadOptions::default()).expect("model loads");
    for name in ["scorenn", "tasknn"] {
        m.add_adapter(name, AdapterConfig::named("pfeiffer").expect("named config")).expect("adapter");
        m.add_classification_head(name, HeadConfig::classification(3)).expect("head");
    }
    m.set_active_adapters(Some(AdapterSetup::Parallel(vec!["scorenn".into(), "tasknn".into()]))).expect("setup");
    m.train_adapter(&["tasknn"]).expect("train");
    let tok = BertTokenizer::from_file(dir.join("tokenizer.json"), 64).expect("tokenizer loads");
    let text = "adapters train a few parameters on a frozen encoder ".repeat(8);
    let batch = tok.encode_batch(&vec![text; 16], m.config()).expect("tokenizes");

    let phase = |title: &str, run: &mut dyn FnMut()| {
        for _ in 0..2 {
            run();
        }
        profiled.reset();
        let start = Instant::now();
        for _ in 0..STEPS {
            run();
        }
        let wall = start.elapsed().as_secs_f64() * 1e3 / STEPS as f64;
        println!("## {title}: {wall:.1} ms per step (wall, mean of {STEPS}); op totals over {STEPS} steps\n");
        println!("{}", profiled.report());
    };
    phase("forward_only (eval)", &mut || {
        m.forward(&batch).expect("forward");
    });
    m.set_dropout(Some(7));
    let labels: Vec<usize> = (0..batch.batch).map(|i| i % 3).collect();
    let cfg = TrainStepConfig { objective: Objective::TaskEnergy { lambda: 0.1 }, trained: "tasknn".into(), max_grad_norm: Some(1.0) };
    let mut opt = AdamW::new(AdamWConfig { lr: 1e-5, ..AdamWConfig::default() }).expect("optimizer");
    let be = m.backend().clone();
    phase("train_step", &mut || {
        m.train_step(&batch, &labels, &cfg, &mut opt).expect("step").read(be.as_ref()).expect("finite");
    });
}
