//! Training through the model: heads owned by adapters, the summed cross-entropy under Parallel,
//! alternating AdamW steps — against PyTorch + `adapters` (tests/fixtures/training) — and the
//! gradient-flow check (trainable tensors move, frozen ones stay bit-identical).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use bert_adapters::io::TensorFile;
use bert_adapters::model::heads::{ClassificationHead, HeadConfig, HeadConfigFile, HeadDropout};
use bert_adapters::train::optim::{AdamW, AdamWConfig};
use bert_adapters::{AdapterSetup, Backend, BertModel, CpuBackend, Tensor};
use common::{assert_close, fixtures, read_f32, tiny, TOL};

const GRAD_TOL: f64 = 1e-4;

fn training(file: &str) -> TensorFile {
    TensorFile::open(fixtures().join("training").join(file)).unwrap()
}


/// Head `name` from the library's files (`head_<from>.safetensors`, `head_<from>_config.json`),
/// or from `prefix<key>` tensors of `file` renamed from `from` to `name`.
fn head(name: &str, from: &str, tensors: Option<(&TensorFile, &str)>) -> ClassificationHead {
    let cfg_path = fixtures().join(format!("training/head_{from}_config.json"));
    let cfg = HeadConfigFile::from_json(&cfg_path, &std::fs::read_to_string(&cfg_path).unwrap()).unwrap().config;
    let mut params = BTreeMap::new();
    for suffix in ["1.weight", "1.bias", "4.weight", "4.bias"] {
        let (data, shape) = match tensors {
            None => read_f32(&training(&format!("head_{from}.safetensors")), &format!("heads.{from}.{suffix}")),
            Some((file, prefix)) => read_f32(file, &format!("{prefix}heads.{name}.{suffix}")),
        };
        params.insert(format!("heads.{name}.{suffix}"), Tensor::from_vec(data, &shape).unwrap());
    }
    ClassificationHead::from_params(name, cfg, params).unwrap()
}

fn labels(fx: &TensorFile) -> Vec<usize> {
    fx.read_i64("labels").unwrap().0.into_iter().map(|v| v as usize).collect()
}

#[test]
fn head_cross_entropy_matches_the_library() {
    for backend in [Arc::new(CpuBackend::fast()) as Arc<dyn Backend>, Arc::new(CpuBackend::reference())] {
        // One adapter with its head.
        let fx = training("ce_pfeiffer.safetensors");
        let (mut model, batch) = tiny(backend.clone());
        model.load_adapter(fixtures().join("adapters/pfeiffer")).unwrap();
        model.insert_head(head("pfeiffer", "pfeiffer", None)).unwrap();
        model.set_active_adapters(Some(AdapterSetup::Single("pfeiffer".into()))).unwrap();
        model.train_adapter(&["pfeiffer"]).unwrap();
        let step = model.classification_step(&batch, &labels(&fx)).unwrap();
        assert_close("ce loss", &[step.loss], &read_f32(&fx, "loss").0, TOL);
        assert_close("ce logits", &step.logits[0].cpu_data().unwrap(), &read_f32(&fx, "logits").0, TOL);
        let want: Vec<String> = fx.names().into_iter().filter_map(|n| n.strip_prefix("grad.").map(String::from)).collect();
        assert_eq!(step.grads.len(), 12);
        for key in &want {
            assert_close(&format!("ce grad.{key}"), &step.grads[key].cpu_data().unwrap(), &read_f32(&fx, &format!("grad.{key}")).0, GRAD_TOL);
        }

        // Parallel: head i reads branch i, the loss is the sum. The library never freezes heads, so
        // its fixture also has the frozen adapter's head gradient; ours trains a head with its
        // adapter only, and every gradient we do produce must equal the library's.
        let fx = training("ce_parallel_pfeiffer_inv__pfeiffer__train_pfeiffer_inv.safetensors");
        let (mut model, batch) = tiny(backend.clone());
        for d in ["pfeiffer_inv", "pfeiffer"] {
            model.load_adapter(fixtures().join("adapters").join(d)).unwrap();
            model.insert_head(head(d, d, None)).unwrap();
        }
        model.set_active_adapters(Some(AdapterSetup::Parallel(vec!["pfeiffer_inv".into(), "pfeiffer".into()]))).unwrap();
        model.train_adapter(&["pfeiffer_inv"]).unwrap();
        let step = model.classification_step(&batch, &labels(&fx)).unwrap();
        assert_close("parallel ce loss", &[step.loss], &read_f32(&fx, "loss").0, TOL);
        for i in 0..2 {
            assert_close(&format!("logits.{i}"), &step.logits[i].cpu_data().unwrap(), &read_f32(&fx, &format!("logits.{i}")).0, TOL);
        }
        assert_eq!(step.grads.len(), 8 + 8 + 4, "pfeiffer_inv's adapter, NICE and head");
        assert!(step.grads.keys().all(|k| !k.starts_with("heads.pfeiffer.")));
        for (key, g) in &step.grads {
            assert_close(&format!("parallel ce grad.{key}"), &g.cpu_data().unwrap(), &read_f32(&fx, &format!("grad.{key}")).0, GRAD_TOL);
        }
    }
}

/// Parallel(scorenn, tasknn) with heads, six alternating AdamW steps (scorenn, tasknn, ...), one
/// optimizer per adapter: every parameter after the six steps equals PyTorch's.
#[test]
fn six_alternating_adamw_steps_match_pytorch() {
    let fx = training("adamw_parallel.safetensors");
    let (mut model, batch) = tiny(Arc::new(CpuBackend::fast()));
    model.load_adapter_as(fixtures().join("adapters/pfeiffer_inv"), Some("scorenn")).unwrap();
    model.load_adapter_as(fixtures().join("adapters/pfeiffer"), Some("tasknn")).unwrap();
    model.insert_head(head("scorenn", "pfeiffer_inv", Some((&fx, "initial.")))).unwrap();
    model.insert_head(head("tasknn", "pfeiffer", Some((&fx, "initial.")))).unwrap();
    model.set_active_adapters(Some(AdapterSetup::Parallel(vec!["scorenn".into(), "tasknn".into()]))).unwrap();
    let cfg = AdamWConfig { lr: 1e-2, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01 };
    let mut optimizers = [AdamW::new(cfg).unwrap(), AdamW::new(cfg).unwrap()];
    let labels = labels(&fx);
    for k in 0..6 {
        let (name, opt) = if k % 2 == 0 { ("scorenn", &mut optimizers[0]) } else { ("tasknn", &mut optimizers[1]) };
        model.train_adapter(&[name]).unwrap();
        let step = model.classification_step(&batch, &labels).unwrap();
        assert_close(&format!("loss.{k}"), &[step.loss], &read_f32(&fx, &format!("loss.{k}")).0, TOL);
        model.adamw_step(name, opt, &step.grads).unwrap();
    }
    let mut compared = 0;
    for name in fx.names().into_iter().filter(|n| n.starts_with("param.")) {
        let key = &name["param.".len()..];
        let adapter = if key.contains("scorenn") { "scorenn" } else { "tasknn" };
        let got = match model.adapter(adapter).unwrap().params().get(key) {
            Some(t) => t.cpu_data().unwrap().to_vec(),
            None => model.head(adapter).unwrap().params()[key].cpu_data().unwrap().to_vec(),
        };
        assert_close(&name, &got, &read_f32(&fx, &name).0, TOL);
        compared += 1;
    }
    assert_eq!(compared, 32);
}

#[test]
fn after_a_step_trainable_tensors_moved_and_frozen_ones_are_bit_identical() {
    let (mut model, batch) = tiny(Arc::new(CpuBackend::fast()));
    for d in ["pfeiffer_inv", "pfeiffer"] {
        model.load_adapter(fixtures().join("adapters").join(d)).unwrap();
        model.insert_head(head(d, d, None)).unwrap();
    }
    model.set_active_adapters(Some(AdapterSetup::Parallel(vec!["pfeiffer_inv".into(), "pfeiffer".into()]))).unwrap();
    let snapshot = |m: &BertModel| -> BTreeMap<String, Vec<f32>> {
        let mut all = BTreeMap::new();
        for name in ["pfeiffer_inv", "pfeiffer"] {
            for (k, t) in m.adapter(name).unwrap().params().iter().chain(m.head(name).unwrap().params()) {
                all.insert(k.clone(), t.cpu_data().unwrap().to_vec());
            }
        }
        all
    };
    let plain_before = {
        let (plain, _) = tiny(Arc::new(CpuBackend::fast()));
        plain.forward(&batch).unwrap().last_hidden_state.into_cpu_vec().unwrap()
    };
    let before = snapshot(&model);
    model.train_adapter(&["pfeiffer_inv"]).unwrap();
    let step = model.classification_step(&batch, &[2, 0, 1, 2]).unwrap();
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    model.adamw_step("pfeiffer_inv", &mut opt, &step.grads).unwrap();
    let after = snapshot(&model);
    for (key, old) in &before {
        let new = &after[key];
        if key.contains("pfeiffer_inv") {
            assert!(old.iter().zip(new).all(|(a, b)| a != b), "trainable `{key}`: some element did not move");
        } else {
            assert_eq!(old, new, "frozen `{key}` changed");
        }
    }
    // The base model is untouched: with no adapter active it still gives the plain BERT output.
    model.set_active_adapters(None).unwrap();
    assert_eq!(model.forward(&batch).unwrap().last_hidden_state.into_cpu_vec().unwrap(), plain_before);
}

/// `Parallel(A, A)` with A's head: both branches are identical without dropout, so the loss is
/// twice A's alone and so is every gradient, of the adapter and of the head (applied twice).
#[test]
fn parallel_of_one_adapter_twice_with_its_head_doubles_every_gradient() {
    for backend in [Arc::new(CpuBackend::fast()) as Arc<dyn Backend>, Arc::new(CpuBackend::reference())] {
        let fx = training("ce_pfeiffer.safetensors");
        let (mut model, batch) = tiny(backend.clone());
        model.load_adapter(fixtures().join("adapters/pfeiffer")).unwrap();
        model.insert_head(head("pfeiffer", "pfeiffer", None)).unwrap();
        model.train_adapter(&["pfeiffer"]).unwrap();
        model.set_active_adapters(Some(AdapterSetup::Single("pfeiffer".into()))).unwrap();
        let single = model.classification_step(&batch, &labels(&fx)).unwrap();
        model.set_active_adapters(Some(AdapterSetup::Parallel(vec!["pfeiffer".into(), "pfeiffer".into()]))).unwrap();
        let double = model.classification_step(&batch, &labels(&fx)).unwrap();
        assert_close("Parallel(A, A) loss", &[double.loss], &[2.0 * single.loss], TOL);
        assert_eq!(double.grads.keys().collect::<Vec<_>>(), single.grads.keys().collect::<Vec<_>>());
        assert!(double.grads.keys().any(|k| k.starts_with("heads.pfeiffer.")));
        for (key, g) in &double.grads {
            let want: Vec<f32> = single.grads[key].cpu_data().unwrap().iter().map(|v| 2.0 * v).collect();
            assert_close(&format!("Parallel(A, A) grad {key}"), &g.cpu_data().unwrap(), &want, GRAD_TOL);
        }
    }
}

/// `h` with another `dropout_prob`.
fn with_dropout_prob(h: &ClassificationHead, p: Option<f64>) -> ClassificationHead {
    ClassificationHead::from_params(h.name(), HeadConfig { dropout_prob: p, ..h.config().clone() }, h.params().clone()).unwrap()
}

fn host_all(ts: &[Tensor]) -> Vec<Vec<f32>> {
    ts.iter().map(|t| t.cpu_data().unwrap().to_vec()).collect()
}

/// Head dropout (`dropout_prob`) in training: after a `forward_train` that dropped out, every
/// head drops out too (p = its `dropout_prob`, else the model's `hidden_dropout_prob`), the same
/// for the same seed, with branch i's masks keyed by (seed, i) alone; `classification_step` is
/// that training mode. Eval (`forward` + `head_logits`) stays dropout-free with a seed set, and
/// p = 0 or no seed is eval bit for bit, forward and backward.
#[test]
fn heads_drop_out_in_training_only() {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::fast());
    let (mut model, batch) = tiny(be.clone());
    for d in ["pfeiffer_inv", "pfeiffer"] {
        model.load_adapter(fixtures().join("adapters").join(d)).unwrap();
    }
    // Branch 0's head has its own probability, branch 1's inherits hidden_dropout_prob.
    model.insert_head(with_dropout_prob(&head("pfeiffer_inv", "pfeiffer_inv", None), Some(0.3))).unwrap();
    model.insert_head(with_dropout_prob(&head("pfeiffer", "pfeiffer", None), None)).unwrap();
    model.set_active_adapters(Some(AdapterSetup::Parallel(vec!["pfeiffer_inv".into(), "pfeiffer".into()]))).unwrap();
    model.train_adapter(&["pfeiffer"]).unwrap();
    let p_hidden = model.config().hidden_dropout_prob;
    assert!(p_hidden > 0.0);
    let eval = |m: &BertModel| host_all(&m.head_logits(&m.forward(&batch).unwrap()).unwrap().into_iter().map(|b| b.logits).collect::<Vec<_>>());
    let eval_plain = eval(&model);
    let labels = [2, 0, 1, 2];

    model.set_dropout(Some(7));
    assert_eq!(eval(&model), eval_plain, "forward + head_logits is eval mode even with a dropout seed");
    let train = |m: &BertModel| {
        let (out, tape) = m.forward_train(&batch).unwrap();
        let logits: Vec<Tensor> = m.head_logits_train(&out, &tape).unwrap().into_iter().map(|b| b.logits).collect();
        (out, host_all(&logits))
    };
    let (out, logits) = train(&model);
    assert_eq!(train(&model).1, logits, "the same seed draws the same masks");
    let on_train_output = host_all(&model.head_logits(&out).unwrap().into_iter().map(|b| b.logits).collect::<Vec<_>>());
    let b = batch.batch;
    for (i, (name, p)) in [("pfeiffer_inv", 0.3f32), ("pfeiffer", p_hidden)].into_iter().enumerate() {
        assert_ne!(logits[i], on_train_output[i], "branch {i}: the head dropped nothing");
        // Branch i's masks: (seed, i) and the head's probability, whatever the other branches.
        let d = HeadDropout { seed: 7, seed_buffer: None, p, branch: i as u64, offset: 0 };
        let rows = out.last_hidden_state.narrow_rows(i * b, b).unwrap();
        let (alone, _) = model.head(name).unwrap().forward_with(be.as_ref(), &rows, None, Some(&d)).unwrap();
        assert_eq!(alone.cpu_data().unwrap().to_vec(), logits[i], "branch {i}");
    }
    model.set_dropout(Some(8));
    assert_ne!(train(&model).1, logits, "another seed draws other masks");
    model.set_dropout(Some(7));
    assert_eq!(host_all(&model.classification_step(&batch, &labels).unwrap().logits), logits, "classification_step is training mode");

    // p = 0: training-mode heads are eval heads, forward and backward, on a dropped-out encoder.
    for name in ["pfeiffer_inv", "pfeiffer"] {
        let h = model.delete_head(name).unwrap();
        model.insert_head(with_dropout_prob(&h, Some(0.0))).unwrap();
    }
    let (out, tape) = model.forward_train(&batch).unwrap();
    let (trained, evald) = (model.head_logits_train(&out, &tape).unwrap(), model.head_logits(&out).unwrap());
    let logits = |bs: &[bert_adapters::model::task::BranchLogits]| host_all(&bs.iter().map(|b| b.logits.clone()).collect::<Vec<_>>());
    assert_eq!(logits(&trained), logits(&evald));
    let d: Vec<Tensor> = (0..2).map(|_| Tensor::from_vec((0..b * 3).map(|v| v as f32 * 0.1 - 0.5).collect(), &[b, 3]).unwrap()).collect();
    let (g1, dl1, _) = model.heads_backward(&trained, &d, &tape).unwrap();
    let (g2, dl2, _) = model.heads_backward(&evald, &d, &tape).unwrap();
    assert_eq!(dl1.cpu_data().unwrap().to_vec(), dl2.cpu_data().unwrap().to_vec());
    assert_eq!(g1.keys().collect::<Vec<_>>(), g2.keys().collect::<Vec<_>>());
    for (k, g) in &g1 {
        assert_eq!(g.cpu_data().unwrap().to_vec(), g2[k].cpu_data().unwrap().to_vec(), "{k}");
    }

    // No seed: the training step's logits are the eval logits, whatever the heads' probability.
    for name in ["pfeiffer_inv", "pfeiffer"] {
        let h = model.delete_head(name).unwrap();
        model.insert_head(with_dropout_prob(&h, Some(0.5))).unwrap();
    }
    model.set_dropout(None);
    assert_eq!(host_all(&model.classification_step(&batch, &labels).unwrap().logits), eval_plain);
}

/// Under Parallel only the first child's invertible adapter runs: a trainable adapter with one
/// further right is named by `training_warnings`, and its NICE block indeed gets no gradient.
#[test]
fn training_warnings_name_a_trainable_nice_that_parallel_never_runs() {
    let (mut model, batch) = tiny(Arc::new(CpuBackend::fast()));
    for d in ["pfeiffer_inv", "pfeiffer", "houlsby"] {
        model.load_adapter(fixtures().join("adapters").join(d)).unwrap();
    }
    model.set_active_adapters(Some(AdapterSetup::Parallel(vec!["pfeiffer".into(), "pfeiffer_inv".into()]))).unwrap();
    model.train_adapter(&["pfeiffer"]).unwrap();
    assert!(model.training_warnings().is_empty(), "{:?}", model.training_warnings());
    model.train_adapter(&["pfeiffer_inv"]).unwrap();
    let w = model.training_warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("`pfeiffer_inv`") && w[0].contains("invertible adapter") && w[0].contains("`pfeiffer`") && w[0].contains("not be trained"), "{}", w[0]);
    // What the warning says: the NICE block gets no gradient (torch's `None`), the bottleneck
    // modules get non-zero ones.
    let (out, tape) = model.forward_train(&batch).unwrap();
    let ones = Tensor::from_vec(vec![1.0; out.last_hidden_state.elem_count()], out.last_hidden_state.shape()).unwrap();
    let grads = model.backward(&tape, &ones, None).unwrap();
    let (nice, rest): (Vec<_>, Vec<_>) = grads.iter().partition(|(k, _)| k.starts_with("invertible_adapters.pfeiffer_inv."));
    assert!(nice.is_empty(), "{:?}", nice.iter().map(|(k, _)| k).collect::<Vec<_>>());
    assert!(rest.iter().any(|(_, g)| g.cpu_data().unwrap().iter().any(|&v| v != 0.0)));

    // First child: its NICE runs, no warning.
    model.set_active_adapters(Some(AdapterSetup::Parallel(vec!["pfeiffer_inv".into(), "pfeiffer".into()]))).unwrap();
    assert!(model.training_warnings().is_empty(), "{:?}", model.training_warnings());
    model.set_active_adapters(Some(AdapterSetup::Single("pfeiffer_inv".into()))).unwrap();
    assert!(model.training_warnings().is_empty());
    // Trainable but not active at all: nothing of it trains.
    model.train_adapter(&["houlsby", "pfeiffer_inv"]).unwrap();
    let w = model.training_warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("`houlsby`") && w[0].contains("not in the active setup"), "{}", w[0]);
    model.freeze_all();
    assert!(model.training_warnings().is_empty());
}
