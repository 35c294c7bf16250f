//! The whole training step on the CUDA backend (`BertModel::train_step`: forward with the tape,
//! heads, objective, backward, clipping, AdamW over the flat arena) against the same steps on the
//! CPU backend: 20 alternating steps of scorenn and tasknn under Parallel, three objectives,
//! with dropout off, and on (a new seed each step, as `train` sets it: the encoder's hidden and
//! attention-probability dropout and the heads'). Runs on cuda-sim in CI and on a GPU when one
//! is present.
//!
//! Bound: each step's loss within 1e-4 relative of the CPU's (the loss-curve criterion),
//! and after the 20 steps every adapter and head parameter within 1e-4·(1 + max|cpu|).

mod common;

use std::sync::Arc;

use bert_adapters::model::heads::HeadConfig;
use bert_adapters::model::step::TrainStepConfig;
use bert_adapters::train::loss::Objective;
use bert_adapters::train::{AdamW, AdamWConfig};
use bert_adapters::{AdapterConfig, Backend, BertModel, CpuBackend, InputBatch};
use common::{assert_close, setup, tiny};

fn parallel_model(be: Arc<dyn Backend>) -> (BertModel, InputBatch, Vec<usize>) {
    let (mut model, batch) = tiny(be.clone());
    model.add_adapter_seeded("scorenn", AdapterConfig::named("pfeiffer").unwrap(), 1).unwrap();
    model.add_adapter_seeded("tasknn", AdapterConfig::named("pfeiffer+inv").unwrap(), 2).unwrap();
    for n in ["scorenn", "tasknn"] {
        model.add_classification_head(n, HeadConfig::classification(3)).unwrap();
    }
    // Blow the adapters up so a wrong gradient cannot hide in the tolerance.
    for n in ["scorenn", "tasknn"] {
        for t in model.adapter_params_mut(n).unwrap().values_mut() {
            let v: Vec<f32> = be.to_host(t).unwrap().iter().enumerate().map(|(i, x)| x * 40.0 + (i % 7) as f32 * 0.01).collect();
            *t = be.upload(v, t.shape()).unwrap();
        }
    }
    model.set_active_adapters(Some(setup(&["scorenn", "tasknn"]))).unwrap();
    let labels: Vec<usize> = (0..batch.batch).map(|i| i % 3).collect();
    (model, batch, labels)
}

#[test]
fn twenty_steps_follow_the_cpu() {
    follow_the_cpu(false);
}

/// The same 20 steps in training mode: the device's Philox masks are the CPU's, so the loss
/// curves agree to the same tolerance.
#[test]
fn twenty_steps_with_dropout_follow_the_cpu() {
    follow_the_cpu(true);
}

fn follow_the_cpu(dropout: bool) {
    let cuda = common::cuda_backends();
    if cuda.is_empty() {
        bert_adapters::cuda::probe::report_line("SKIPPED: cuda_training: no CUDA backend (build with --features cuda-sim, or run on a GPU)");
        return;
    }
    let cpu: Arc<dyn Backend> = Arc::new(CpuBackend::fast());
    for dev in cuda {
        let label = dev.name();
        let (mut on_cpu, batch, labels) = parallel_model(cpu.clone());
        let (mut on_dev, _, _) = parallel_model(dev.clone());
        let mut opts: Vec<AdamW> = (0..4).map(|_| AdamW::new(AdamWConfig { lr: 1e-3, ..AdamWConfig::default() }).unwrap()).collect();
        for step in 0..20 {
            let (trained, i, objective) = match step % 3 {
                0 => ("tasknn", 1, Objective::TaskEnergy { lambda: 0.1 }),
                1 => ("scorenn", 0, Objective::ScoreMargin { margin: 1.0, ce_weight: 0.1 }),
                _ => ("tasknn", 1, Objective::CrossEntropy),
            };
            let c = TrainStepConfig { objective, trained: trained.into(), max_grad_norm: Some(1.0) };
            on_cpu.train_adapter(&[trained]).unwrap();
            on_dev.train_adapter(&[trained]).unwrap();
            if dropout {
                on_cpu.set_dropout(Some(1000 + step as u64));
                on_dev.set_dropout(Some(1000 + step as u64));
            }
            let want = on_cpu.train_step(&batch, &labels, &c, &mut opts[i]).unwrap().read(cpu.as_ref()).unwrap();
            let got = on_dev.train_step(&batch, &labels, &c, &mut opts[2 + i]).unwrap_or_else(|e| panic!("{label} step {step}: {e}")).read(dev.as_ref()).unwrap();
            let rel = ((got.loss as f64 - want.loss as f64) / (want.loss as f64).abs().max(1e-12)).abs();
            assert!(rel <= 1e-4, "{label} step {step} ({trained}, {objective:?}): loss {} vs CPU {} (relative {rel:e})", got.loss, want.loss);
            let rel = ((got.grad_norm as f64 - want.grad_norm as f64) / (want.grad_norm as f64).abs().max(1e-12)).abs();
            assert!(rel <= 1e-4, "{label} step {step}: gradient norm {} vs CPU {}", got.grad_norm, want.grad_norm);
        }
        for n in ["scorenn", "tasknn"] {
            let (a, b) = (on_cpu.adapter(n).unwrap().params(), on_dev.adapter(n).unwrap().params());
            assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
            for (key, t) in a {
                assert_close(&format!("{label} {key}"), &dev.to_host(&b[key]).unwrap(), &cpu.to_host(t).unwrap(), 1e-4);
            }
            for (key, t) in on_cpu.head(n).unwrap().params() {
                assert_close(&format!("{label} head {n} {key}"), &dev.to_host(&on_dev.head(n).unwrap().params()[key]).unwrap(), &cpu.to_host(t).unwrap(), 1e-4);
            }
        }
    }
}

/// A head built on the CPU and inserted into a model on the device has its parameters moved there
/// (`insert_head`), and gives the same logits as on the CPU.
#[test]
fn a_host_head_joins_a_device_model() {
    let Some(dev) = common::cuda_backends().into_iter().next() else {
        bert_adapters::cuda::probe::report_line("SKIPPED: cuda_training: no CUDA backend");
        return;
    };
    let cpu: Arc<dyn Backend> = Arc::new(CpuBackend::fast());
    let (mut on_cpu, batch, _) = parallel_model(cpu.clone());
    let (mut on_dev, _, _) = parallel_model(dev.clone());
    let hidden = on_cpu.config().hidden_size;
    for model in [&mut on_cpu, &mut on_dev] {
        model.delete_head("tasknn").unwrap();
        let head = bert_adapters::model::heads::ClassificationHead::new(cpu.as_ref(), "tasknn", HeadConfig::classification(3), hidden, 5).unwrap();
        model.insert_head(head).unwrap();
    }
    assert!(on_dev.head("tasknn").unwrap().params().values().all(|t| t.device() == dev.device()));
    let logits = |m: &BertModel, be: &Arc<dyn Backend>| be.to_host(&m.head_logits(&m.forward(&batch).unwrap()).unwrap()[1].logits).unwrap();
    assert_close("tasknn logits", &logits(&on_dev, &dev), &logits(&on_cpu, &cpu), 1e-5);
}
