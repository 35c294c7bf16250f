//! The whole training step on the CUDA backend (`BertModel::train_step`: forward with the tape,
//! heads, objective, backward, clipping, AdamW over the flat arena) against the same steps on the
//! CPU backend: 20 alternating steps of scorenn and tasknn under Parallel, three objectives,
//! with dropout off, and on (a new seed each step, as `train` sets it: the encoder's hidden and
//! attention-probability dropout and the heads'); and 10 steps with the adapters' own dropout on
//! as well (each adapter its own p). Runs on cuda-sim in CI and on a GPU when one is present.
//!
//! Bound: each step's loss within 1e-4 relative of the CPU's (the loss-curve criterion),
//! and after the steps every adapter and head parameter within 1e-4·(1 + max|cpu|).

mod common;

use std::sync::Arc;

use bert_adapters::model::heads::HeadConfig;
use bert_adapters::model::step::TrainStepConfig;
use bert_adapters::train::loss::Objective;
use bert_adapters::train::{AdamW, AdamWConfig};
use bert_adapters::{Backend, BertModel, CpuBackend, InputBatch};
use common::{assert_close, parallel_pair};

fn parallel_model(be: Arc<dyn Backend>) -> (BertModel, InputBatch, Vec<usize>) {
    parallel_pair(be, [0.0, 0.0])
}

#[test]
fn twenty_steps_follow_the_cpu() {
    follow_the_cpu(false, [0.0, 0.0], 20);
}

/// The same 20 steps in training mode: the device's Philox masks are the CPU's, so the loss
/// curves agree to the same tolerance.
#[test]
fn twenty_steps_with_dropout_follow_the_cpu() {
    follow_the_cpu(true, [0.0, 0.0], 20);
}

/// 10 steps in training mode with the adapters' own dropout on too (scorenn p = 0.1, tasknn
/// p = 0.5, both branches of every Parallel location): the location kernels draw the CPU's masks
/// in the forward and the backward, so the loss curves agree to the same tolerance.
#[test]
fn ten_steps_with_adapter_dropout_follow_the_cpu() {
    follow_the_cpu(true, [0.1, 0.5], 10);
}

fn follow_the_cpu(dropout: bool, adapter_dropout: [f64; 2], steps: usize) {
    let cuda = common::cuda_backends();
    if cuda.is_empty() {
        bert_adapters::cuda::probe::report_skip("cuda_training", "no GPU", "no CUDA backend (build with --features cuda-sim, or run on a GPU)");
        return;
    }
    let cpu: Arc<dyn Backend> = Arc::new(CpuBackend::fast());
    for dev in cuda {
        let label = dev.name();
        let (mut on_cpu, batch, labels) = parallel_pair(cpu.clone(), adapter_dropout);
        let (mut on_dev, _, _) = parallel_pair(dev.clone(), adapter_dropout);
        let mut opts: Vec<AdamW> = (0..4).map(|_| AdamW::new(AdamWConfig { lr: 1e-3, ..AdamWConfig::default() }).unwrap()).collect();
        let mut worst = 0f64;
        for step in 0..steps {
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
            worst = worst.max(rel);
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
        bert_adapters::cuda::probe::report_line(&format!("cuda_training on {label}: {steps} steps (dropout {dropout}, adapter dropout {adapter_dropout:?}) follow the CPU; worst loss relative error {worst:.2e}"));
    }
}

/// A head built on the CPU and inserted into a model on the device has its parameters moved there
/// (`insert_head`), and gives the same logits as on the CPU.
#[test]
fn a_host_head_joins_a_device_model() {
    let Some(dev) = common::cuda_backends().into_iter().next() else {
        bert_adapters::cuda::probe::report_skip("cuda_training", "no GPU", "no CUDA backend (build with --features cuda-sim, or run on a GPU)");
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

// ---- no allocation after the first step, and the step as one captured graph (issue 14) -------

/// `batch` with its ids and token types moved around the vocabulary by `step`, its labels too,
/// so that every step trains on different data of the same shape.
fn vary(batch: &InputBatch, labels: &[usize], step: usize, vocab: usize) -> (InputBatch, Vec<usize>) {
    let mut b = batch.clone();
    for (i, id) in b.input_ids.iter_mut().enumerate() {
        *id = ((*id as usize + step * 7 + i % 5) % vocab) as u32;
    }
    let labels = labels.iter().map(|&y| (y + step) % 3).collect();
    (b, labels)
}

/// Alternating scorenn/tasknn steps with dropout: after the first round (each adapter's first
/// step packs its arena and binds its optimizer, whose buffers may take blocks the other
/// adapter's step had freed, so the second step can still allocate), no step allocates device
/// memory or uploads a table.
#[test]
fn steps_after_the_first_allocate_nothing() {
    for dev in common::cuda_backends() {
        let gpu = dev.gpu().expect("a CUDA backend has a Gpu");
        let (mut model, batch, labels) = parallel_model(dev.clone());
        let vocab = model.config().vocab_size;
        let mut opts: Vec<AdamW> = (0..2).map(|_| AdamW::new(AdamWConfig { lr: 1e-3, ..AdamWConfig::default() }).unwrap()).collect();
        let mut after_warmup = None;
        for step in 0..8 {
            let (trained, i) = if step % 2 == 0 { ("tasknn", 1) } else { ("scorenn", 0) };
            model.train_adapter(&[trained]).unwrap();
            model.set_dropout(Some(77 + step as u64));
            let (b, y) = vary(&batch, &labels, step, vocab);
            let c = TrainStepConfig { objective: Objective::CrossEntropy, trained: trained.into(), max_grad_norm: Some(1.0) };
            let v = model.train_step(&b, &y, &c, &mut opts[i]).unwrap().read(dev.as_ref()).unwrap();
            assert!(v.loss.is_finite());
            let now = (gpu.memory_stats().device_allocations, gpu.table_uploads());
            match after_warmup {
                None if step == 3 => after_warmup = Some(now),
                Some(w) => assert_eq!(now, w, "{}: step {step} allocated device memory or uploaded a table (allocations, table uploads)", dev.name()),
                None => {}
            }
        }
        let s = gpu.memory_stats();
        assert!(s.reused > 0 && s.live_bytes > 0, "{s:?}");
    }
}

/// The whole training step captured once and replayed with new batches, labels, dropout seeds
/// and a changed learning rate gives the same bits as the same steps launched one by one: the
/// losses, the gradient norms, and every trained parameter afterwards. The replays allocate
/// nothing and upload no table.
#[test]
fn a_captured_step_replays_bit_identically() {
    captured_steps_replay([0.0, 0.0]);
}

/// The same with the adapters' own dropout on: the location kernels read the step's seed from the
/// model's device buffer, so a replay draws the next step's masks, as a launched step does.
#[test]
fn a_captured_step_with_adapter_dropout_replays_bit_identically() {
    captured_steps_replay([0.1, 0.5]);
}

fn captured_steps_replay(adapter_dropout: [f64; 2]) {
    for dev in common::cuda_backends() {
        let label = dev.name();
        let gpu = dev.gpu().expect("a CUDA backend has a Gpu");
        let (mut launched, batch, labels) = parallel_pair(dev.clone(), adapter_dropout);
        let (mut replayed, _, _) = parallel_pair(dev.clone(), adapter_dropout);
        let vocab = launched.config().vocab_size;
        let c = TrainStepConfig { objective: Objective::TaskEnergy { lambda: 0.1 }, trained: "tasknn".into(), max_grad_norm: Some(1.0) };
        let mut opt_l = AdamW::new(AdamWConfig { lr: 1e-3, ..AdamWConfig::default() }).unwrap();
        let mut opt_r = AdamW::new(AdamWConfig { lr: 1e-3, ..AdamWConfig::default() }).unwrap();
        for m in [&mut launched, &mut replayed] {
            m.train_adapter(&["tasknn"]).unwrap();
            m.set_dropout(Some(5));
        }
        // Capturing before any step at this shape is refused with the reason.
        let err = replayed.capture_train_step(&batch, &labels, &c, &mut opt_r).unwrap_err();
        assert!(err.to_string().contains("run one train_step"), "{err}");
        // Step 0 launched on both (the warm-up), then the capture.
        let a = launched.train_step(&batch, &labels, &c, &mut opt_l).unwrap().read(dev.as_ref()).unwrap();
        let b = replayed.train_step(&batch, &labels, &c, &mut opt_r).unwrap().read(dev.as_ref()).unwrap();
        assert_eq!(a, b);
        let graph = replayed.capture_train_step(&batch, &labels, &c, &mut opt_r).unwrap();
        assert_eq!(opt_r.steps(), 1, "the capture counted a step it did not run");
        if let Some(ops) = graph.launch_graph().recorded_ops() {
            assert!(ops > 50, "{label}: only {ops} operations recorded for a whole step");
        }
        // Both models share the device (and its pool): count only what the replays allocate.
        let counts = || (gpu.memory_stats().device_allocations, gpu.table_uploads());
        for step in 1..5 {
            let (b, y) = vary(&batch, &labels, step, vocab);
            if step == 3 {
                opt_l.set_lr(3e-4).unwrap();
                opt_r.set_lr(3e-4).unwrap();
            }
            launched.set_dropout(Some(5 + step as u64));
            replayed.set_dropout(Some(5 + step as u64));
            let want = launched.train_step(&b, &y, &c, &mut opt_l).unwrap().read(dev.as_ref()).unwrap();
            let before = counts();
            let got = replayed.replay_train_step(&graph, &b, &y, &mut opt_r).unwrap_or_else(|e| panic!("{label} replay {step}: {e}")).read(dev.as_ref()).unwrap();
            assert_eq!(counts(), before, "{label}: replay {step} allocated device memory or uploaded a table");
            assert_eq!((got.loss.to_bits(), got.ce.to_bits(), got.grad_norm.to_bits()), (want.loss.to_bits(), want.ce.to_bits(), want.grad_norm.to_bits()), "{label} step {step}: replayed {got:?}, launched {want:?}");
        }
        assert_eq!(opt_r.steps(), opt_l.steps());
        for (key, t) in launched.adapter("tasknn").unwrap().params() {
            let r = &replayed.adapter("tasknn").unwrap().params()[key];
            assert_eq!(dev.to_host(r).unwrap(), dev.to_host(t).unwrap(), "{label}: {key} differs after the replayed steps");
        }
        for (key, t) in launched.head("tasknn").unwrap().params() {
            assert_eq!(dev.to_host(&replayed.head("tasknn").unwrap().params()[key]).unwrap(), dev.to_host(t).unwrap(), "{label}: head {key}");
        }
        // A replay refuses a batch of another shape, an out-of-range id, and a changed setup.
        let mut short = batch.clone();
        short.seq_len -= 1;
        short.input_ids.truncate(short.batch * short.seq_len);
        assert!(replayed.replay_train_step(&graph, &short, &labels, &mut opt_r).unwrap_err().to_string().contains("captured for batches"));
        let mut bad = batch.clone();
        bad.input_ids[1] = vocab as u32;
        assert!(replayed.replay_train_step(&graph, &bad, &labels, &mut opt_r).unwrap_err().to_string().contains("vocab_size"));
        replayed.train_adapter(&["scorenn"]).unwrap();
        assert!(replayed.replay_train_step(&graph, &batch, &labels, &mut opt_r).unwrap_err().to_string().contains("capture the step again"));
    }
}

/// A graph records where every adapter's parameters are. Training the other adapter for the
/// first time moves its parameters into its new arena, so a graph captured before reads stale
/// weights: its replay is refused (found by `train`, which alternates the adapters), and a
/// recapture replays bit-identically to a launched step again.
#[test]
fn a_capture_from_before_the_other_adapter_trained_is_refused() {
    for dev in common::cuda_backends() {
        let label = dev.name();
        let (mut launched, batch, labels) = parallel_model(dev.clone());
        let (mut replayed, _, _) = parallel_model(dev.clone());
        let vocab = launched.config().vocab_size;
        let cfg = |trained: &str| TrainStepConfig { objective: Objective::TaskEnergy { lambda: 0.1 }, trained: trained.into(), max_grad_norm: Some(1.0) };
        let new_opt = || AdamW::new(AdamWConfig { lr: 1e-3, ..AdamWConfig::default() }).unwrap();
        let (mut task_l, mut task_r, mut score_l, mut score_r) = (new_opt(), new_opt(), new_opt(), new_opt());
        for m in [&mut launched, &mut replayed] {
            m.train_adapter(&["tasknn"]).unwrap();
            m.set_dropout(Some(5));
        }
        launched.train_step(&batch, &labels, &cfg("tasknn"), &mut task_l).unwrap();
        replayed.train_step(&batch, &labels, &cfg("tasknn"), &mut task_r).unwrap();
        let stale = replayed.capture_train_step(&batch, &labels, &cfg("tasknn"), &mut task_r).unwrap();
        // scorenn's first steps (its arena is built now), launched on both.
        for m in [&mut launched, &mut replayed] {
            m.train_adapter(&["scorenn"]).unwrap();
        }
        let (b, y) = vary(&batch, &labels, 1, vocab);
        launched.train_step(&b, &y, &cfg("scorenn"), &mut score_l).unwrap();
        replayed.train_step(&b, &y, &cfg("scorenn"), &mut score_r).unwrap();
        for m in [&mut launched, &mut replayed] {
            m.train_adapter(&["tasknn"]).unwrap();
        }
        let (b, y) = vary(&batch, &labels, 2, vocab);
        let err = replayed.replay_train_step(&stale, &b, &y, &mut task_r).unwrap_err();
        assert!(matches!(err, bert_adapters::Error::Input(_)) && err.to_string().contains("capture the step again"), "{label}: {err}");
        drop(stale);
        let graph = replayed.capture_train_step(&batch, &labels, &cfg("tasknn"), &mut task_r).unwrap();
        for step in 2..4 {
            let (b, y) = vary(&batch, &labels, step, vocab);
            launched.set_dropout(Some(5 + step as u64));
            replayed.set_dropout(Some(5 + step as u64));
            let want = launched.train_step(&b, &y, &cfg("tasknn"), &mut task_l).unwrap().read(dev.as_ref()).unwrap();
            let got = replayed.replay_train_step(&graph, &b, &y, &mut task_r).unwrap_or_else(|e| panic!("{label} replay {step}: {e}")).read(dev.as_ref()).unwrap();
            assert_eq!((got.loss.to_bits(), got.grad_norm.to_bits()), (want.loss.to_bits(), want.grad_norm.to_bits()), "{label} step {step}: replayed {got:?}, launched {want:?}");
        }
    }
}

/// The CPU backend has no graphs: capture is refused with the reason.
#[test]
fn capture_needs_a_cuda_backend() {
    let (mut model, batch, labels) = parallel_model(Arc::new(CpuBackend::fast()));
    model.train_adapter(&["tasknn"]).unwrap();
    let c = TrainStepConfig { objective: Objective::CrossEntropy, trained: "tasknn".into(), max_grad_norm: None };
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    let err = model.capture_train_step(&batch, &labels, &c, &mut opt).unwrap_err();
    assert!(matches!(err, bert_adapters::Error::Unsupported(_)) && err.to_string().contains("CUDA backend"), "{err}");
}
