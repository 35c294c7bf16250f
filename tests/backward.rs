//! The manual backward: directional finite differences through the whole model, and the counts
//! of matrix products that prove frozen work is skipped.

mod common;

use std::sync::Arc;

use bert_adapters::{BertModel, CpuBackend, InputBatch, Tensor};
use common::{fixtures, random_vec, setup, tiny, SINGLE_ADAPTERS};
use rand::{rngs::StdRng, SeedableRng};



/// Loss Σ out ⊙ W in f64 (through forward_train, so dropout applies when set).
fn probe_loss(model: &BertModel, batch: &InputBatch, w: &[f32]) -> f64 {
    let out = model.forward_train(batch).unwrap().0.last_hidden_state.into_cpu_vec().unwrap();
    out.iter().zip(w).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// Compare ⟨∇L, u⟩ with (L(θ+εu) − L(θ−εu)) / 2ε along a random direction u over every
/// trainable tensor. One number per check, so f32 noise averages out.
fn directional_check(label: &str, dirs: &[&str], active: &[&str], train: &[&str]) {
    directional_check_with(label, dirs, active, train, None, 0.0);
}

/// As `directional_check`, with dropout masks from `dropout_seed` (BERT's p = 0.1 in the tiny
/// config) and every adapter's own dropout set to `adapter_p`.
fn directional_check_with(label: &str, dirs: &[&str], active: &[&str], train: &[&str], dropout_seed: Option<u64>, adapter_p: f64) {
    let (mut model, batch) = tiny(Arc::new(CpuBackend::reference()));
    for d in dirs {
        let name = model.load_adapter(fixtures().join("adapters").join(d)).unwrap();
        if adapter_p > 0.0 {
            // Re-create the adapter with the same weights and a dropout.
            let adapter = model.delete_adapter(&name).unwrap();
            let cfg = adapter.config().with_overrides(&serde_json::json!({ "dropout": adapter_p })).unwrap();
            let rebuilt = bert_adapters::Adapter::from_params(&name, cfg, model.config(), adapter.params().clone()).unwrap();
            model.insert_adapter(rebuilt).unwrap();
        }
    }
    model.set_dropout(dropout_seed);
    model.set_active_adapters(Some(setup(active))).unwrap();
    model.train_adapter(train).unwrap();
    let (out, tape) = model.forward_train(&batch).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let w = random_vec(&mut rng, out.last_hidden_state.elem_count(), 1.0);
    let dlast = Tensor::from_vec(w.clone(), out.last_hidden_state.shape()).unwrap();
    let grads = model.backward(&tape, &dlast, None).unwrap();
    // One gradient per trainable tensor the setup reaches; only the invertible adapter of a
    // Parallel child that is not the first (it never runs) has none, as torch leaves it `None`.
    let keys: Vec<String> = grads.keys().cloned().collect();
    for (k, _) in model.trainable_tensors() {
        let unreached = k.starts_with("invertible_adapters.") && !k.contains(&format!(".{}.", active[0]));
        assert_eq!(grads.contains_key(k), !unreached, "{label}: gradient of {k}");
    }

    let dirs_u: Vec<(String, Vec<f32>)> = keys.iter().map(|k| (k.clone(), random_vec(&mut rng, grads[k].elem_count(), 1.0))).collect();
    let analytic: f64 = dirs_u
        .iter()
        .map(|(k, u)| grads[k].cpu_data().unwrap().iter().zip(u).map(|(g, u)| *g as f64 * *u as f64).sum::<f64>())
        .sum();
    // Relu kinks and ×25 weights make the loss curved, f32 outputs make it noisy: a single step
    // size cannot serve every case, so try a ladder and require one to agree. A wrong gradient
    // agrees at none of them.
    let mut shifted = |step: f32| {
        for name in train {
            let params = model.adapter_params_mut(name).unwrap();
            for (k, u) in &dirs_u {
                if let Some(p) = params.get_mut(k) {
                    p.cpu_data_mut().unwrap().iter_mut().zip(u).for_each(|(p, u)| *p += step * u);
                }
            }
        }
        probe_loss(&model, &batch, &w)
    };
    let mut tried = Vec::new();
    for eps in [1e-2f32, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5] {
        let plus = shifted(eps);
        let minus = shifted(-2.0 * eps);
        shifted(eps);
        let numeric = (plus - minus) / (2.0 * eps as f64);
        tried.push((eps, numeric, (numeric - analytic).abs() / analytic.abs().max(1.0)));
    }
    let best = tried.iter().map(|t| t.2).fold(f64::INFINITY, f64::min);
    assert!(best < 2e-3, "{label}: backward gives {analytic:.6}; finite differences (eps, value, rel): {tried:?}");
}

#[test]
fn every_config_agrees_with_finite_differences() {
    for name in SINGLE_ADAPTERS {
        directional_check(name, &[name], &[name], &[name]);
    }
}

#[test]
fn parallel_agrees_with_finite_differences() {
    for (active, train) in [
        (&["pfeiffer_inv", "pfeiffer"][..], &["pfeiffer_inv"][..]),
        (&["pfeiffer_inv", "pfeiffer"], &["pfeiffer"]),
        (&["pfeiffer", "pfeiffer_inv"], &["pfeiffer_inv"]),
        (&["houlsby_inv", "houlsby"], &["houlsby_inv", "houlsby"]),
        (&["houlsby", "opt_original_ln_after_false"], &["opt_original_ln_after_false"]),
    ] {
        directional_check(&format!("{active:?} train {train:?}"), active, active, train);
    }
}

/// Backward products `(input-gradient calls, weight-gradient calls, their multiply-adds)` for one
/// probe-loss backward of `active` while training `train`.
fn backward_products(model: &mut BertModel, be: &CpuBackend, batch: &InputBatch, active: &[&str], train: &[&str]) -> bert_adapters::cpu::GemmCounts {
    model.set_active_adapters(Some(setup(active))).unwrap();
    model.train_adapter(train).unwrap();
    let (out, tape) = model.forward_train(batch).unwrap();
    let d = Tensor::from_vec(vec![1.0; out.last_hidden_state.elem_count()], out.last_hidden_state.shape()).unwrap();
    let before = be.gemm_counts();
    model.backward(&tape, &d, None).unwrap();
    be.gemm_counts() - before
}

#[test]
fn backward_skips_frozen_work() {
    let be = CpuBackend::fast();
    let (mut model, batch) = tiny(Arc::new(be.clone()));
    for d in ["pfeiffer", "pfeiffer_b"] {
        model.load_adapter(fixtures().join("adapters").join(d)).unwrap();
    }
    let leave = bert_adapters::AdapterConfig::named("pfeiffer").unwrap().with_overrides(&serde_json::json!({"leave_out": [0]})).unwrap();
    model.add_adapter("top_only", leave).unwrap();
    let (rows, h, m, i) = (44, 48, 3, 100);

    // pfeiffer alone (FFN-output adapters in layers 0 and 1): the weight-gradient products are
    // exactly the adapter's down and up projections at 2 locations — none for BERT's weights.
    let single = backward_products(&mut model, &be, &batch, &["pfeiffer"], &["pfeiffer"]);
    assert_eq!(single.weight_grad(), (4, 4 * rows * h * m));
    // Input gradients: layer 1 adapter (up, down), FFN (2), attention out + attention + the
    // packed Q, K, V (3: one product through the [3H, H] weight, not three), then layer 0's
    // adapter up only: its input gradient is below the lowest parameter.
    assert_eq!(single.input_grad().0, 2 + 2 + 3 + 1);
    let attention = 5 * 4 * 11 * 11 * h;
    assert_eq!(single.input_grad().1, 3 * rows * h * m + rows * h * i * 2 + rows * h * h * 4 + attention);

    // Nothing below the lowest trainable layer: with leave_out [0] only layer 1's adapter runs.
    let top = backward_products(&mut model, &be, &batch, &["top_only"], &["top_only"]);
    assert_eq!((top.weight_grad().0, top.input_grad().0), (2, 1));

    // A frozen Parallel branch costs nothing: Parallel(pfeiffer_b, pfeiffer) training pfeiffer
    // does exactly the products of pfeiffer alone, on the same number of rows.
    let parallel = backward_products(&mut model, &be, &batch, &["pfeiffer_b", "pfeiffer"], &["pfeiffer"]);
    assert_eq!((parallel.input_grad(), parallel.weight_grad()), (single.input_grad(), single.weight_grad()));

    // Nothing trainable in the setup: no products at all.
    let none = backward_products(&mut model, &be, &batch, &["pfeiffer"], &["pfeiffer_b"]);
    assert_eq!((none.input_grad(), none.weight_grad()), ((0, 0), (0, 0)));
}

#[test]
fn dropout_backward_uses_the_forward_masks() {
    // Masks are a pure function of the seed, so the loss is a fixed smooth-almost-everywhere
    // function of the weights and finite differences apply; a backward that drew other masks
    // (or skipped one) would disagree. BERT p = 0.1 (hidden and attention), adapters p = 0.3.
    for (active, train) in [
        (&["houlsby_inv"][..], &["houlsby_inv"][..]),
        (&["opt_gating"], &["opt_gating"]),
        // Branch 1 alone is live: its row block must keep its own masks in the backward.
        (&["pfeiffer_b", "pfeiffer"], &["pfeiffer"]),
        (&["pfeiffer_inv", "pfeiffer"], &["pfeiffer_inv"]),
    ] {
        directional_check_with(&format!("dropout {active:?} train {train:?}"), active, active, train, Some(1234), 0.3);
    }
}

#[test]
fn dropout_is_seeded_and_only_in_forward_train() {
    let (mut model, batch) = tiny(Arc::new(CpuBackend::fast()));
    model.load_adapter(fixtures().join("adapters/houlsby")).unwrap();
    model.set_active_adapters(Some(setup(&["houlsby"]))).unwrap();
    let eval = model.forward(&batch).unwrap().last_hidden_state.into_cpu_vec().unwrap();
    let train = |m: &BertModel| m.forward_train(&batch).unwrap().0.last_hidden_state.into_cpu_vec().unwrap();
    assert_eq!(train(&model), eval, "no seed: eval numerics");
    model.set_dropout(Some(1));
    let (a, b) = (train(&model), train(&model));
    assert_eq!(a, b, "same seed, same masks");
    assert_ne!(a, eval);
    assert_eq!(model.forward(&batch).unwrap().last_hidden_state.into_cpu_vec().unwrap(), eval, "forward never drops out");
    model.set_dropout(Some(2));
    assert_ne!(train(&model), a, "another seed, other masks");
}

/// Gradients of the probe loss Σ last_hidden_state ⊙ W of `model`'s current setup.
fn probe_gradients(model: &BertModel, batch: &InputBatch, w: &[f32]) -> bert_adapters::model::Gradients {
    let (out, tape) = model.forward_train(batch).unwrap();
    assert_eq!(out.last_hidden_state.elem_count(), w.len(), "probe size");
    let d = Tensor::from_vec(w.to_vec(), out.last_hidden_state.shape()).unwrap();
    model.backward(&tape, &d, None).unwrap()
}

/// `Parallel(A, A)` is legal in the library (spec §6 item 9) and its loss sums both branches, so
/// every parameter of A gets the sum of both branches' gradients. Computed independently: A alone
/// with the top half of the probe plus A alone with the bottom half.
#[test]
fn parallel_of_one_adapter_twice_sums_both_branches() {
    for name in ["pfeiffer", "houlsby", "pfeiffer_inv", "houlsby_inv", "opt_scaling_learned", "opt_scaling_channel", "opt_gating", "opt_ln_before_after"] {
        let (mut model, batch) = tiny(Arc::new(CpuBackend::reference()));
        model.load_adapter(fixtures().join("adapters").join(name)).unwrap();
        model.train_adapter(&[name]).unwrap();
        let rows = batch.batch * batch.seq_len * model.config().hidden_size;
        let mut rng = StdRng::seed_from_u64(11);
        let w = random_vec(&mut rng, 2 * rows, 1.0);

        model.set_active_adapters(Some(setup(&[name, name]))).unwrap();
        let out = model.forward(&batch).unwrap();
        assert_eq!(out.last_hidden_state.shape(), [2 * batch.batch, batch.seq_len, model.config().hidden_size], "{name}");
        let halves = out.last_hidden_state.into_cpu_vec().unwrap();
        assert_eq!(halves[..rows], halves[rows..], "{name}: Parallel(A, A) gives identical halves");
        let parallel = probe_gradients(&model, &batch, &w);

        model.set_active_adapters(Some(setup(&[name]))).unwrap();
        let top = probe_gradients(&model, &batch, &w[..rows]);
        let bottom = probe_gradients(&model, &batch, &w[rows..]);
        assert_eq!(parallel.keys().collect::<Vec<_>>(), top.keys().collect::<Vec<_>>(), "{name}: gradient keys");
        for (key, g) in &parallel {
            let want: Vec<f32> = top[key].cpu_data().unwrap().iter().zip(&bottom[key].cpu_data().unwrap()).map(|(a, b)| a + b).collect();
            common::assert_close(&format!("Parallel({name}, {name}) grad {key}"), &g.cpu_data().unwrap(), &want, 1e-4);
        }
    }
}

#[test]
fn parallel_of_one_adapter_twice_agrees_with_finite_differences() {
    for name in ["pfeiffer", "houlsby_inv", "opt_gating"] {
        directional_check(&format!("Parallel({name}, {name})"), &[name], &[name, name], &[name]);
    }
    // With dropout the two branches draw different masks, so they are no longer identical.
    directional_check_with("dropout Parallel(houlsby, houlsby)", &["houlsby"], &["houlsby", "houlsby"], &["houlsby"], Some(99), 0.3);
}
