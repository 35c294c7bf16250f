//! Adapters against AdapterHub `adapters` 1.3.0 (fixtures from tools/make_fixtures.py; adapter
//! weights blown up ×25 so a bug cannot hide under the tolerance), on both CPU paths.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bert_adapters::io::TensorFile;
use bert_adapters::{AdapterConfig, Backend, BertModel, CpuBackend, InputBatch, LoadOptions};
use common::{assert_close, check_outputs, fixtures, read_f32, setup, tiny, SINGLE_ADAPTERS, TOL};

fn adapters_dir() -> PathBuf {
    fixtures().join("adapters")
}

/// Both CPU paths, then the CUDA backend on cuda-sim (CI) and on a GPU when there is one.
fn backends() -> Vec<Arc<dyn Backend>> {
    let mut v: Vec<Arc<dyn Backend>> = vec![Arc::new(CpuBackend::fast()), Arc::new(CpuBackend::reference())];
    v.extend(common::cuda_backends());
    v
}



/// Load `dirs` into the tiny model, activate `names`, compare with `expected`.
fn tiny_case(dirs: &[&str], names: &[&str], expected: &str) {
    let expected = TensorFile::open(adapters_dir().join(expected)).unwrap();
    for backend in backends() {
        let (mut model, batch) = tiny(backend);
        for d in dirs {
            let name = model.load_adapter(adapters_dir().join(d)).unwrap();
            assert_eq!(&name, d, "the name comes from adapter_config.json");
        }
        model.set_active_adapters(Some(setup(names))).unwrap();
        check_outputs(&format!("{names:?}"), &model, &batch, &expected);
    }
}


#[test]
fn every_single_adapter_matches_the_library() {
    for name in SINGLE_ADAPTERS.iter().chain(&["pfeiffer_b"]) {
        tiny_case(&[name], &[name], &format!("expected_{name}.safetensors"));
    }
}

#[test]
fn parallel_in_both_orders_and_three_way_matches_the_library() {
    for names in [
        &["pfeiffer_inv", "pfeiffer"][..],
        &["pfeiffer", "pfeiffer_inv"],
        &["houlsby_inv", "houlsby"],
        &["houlsby", "houlsby_inv"],
        &["pfeiffer", "pfeiffer_inv", "pfeiffer_b"],
        // Mixed configs: the pre step follows the first child, the post step the last.
        &["pfeiffer", "opt_residual_before_ln_false"],
        &["opt_residual_before_ln_false", "pfeiffer"],
        &["houlsby", "opt_original_ln_after_false"],
        &["opt_original_ln_after_false", "houlsby"],
    ] {
        tiny_case(names, names, &format!("expected_parallel_{}.safetensors", names.join("__")));
    }
}

#[test]
fn parallel_branch_equals_the_adapter_alone_when_nice_is_shared() {
    // Parallel(pfeiffer_inv, pfeiffer): branch 0 is pfeiffer_inv alone, exactly.
    let (mut model, batch) = tiny(Arc::new(CpuBackend::fast()));
    for d in ["pfeiffer_inv", "pfeiffer"] {
        model.load_adapter(adapters_dir().join(d)).unwrap();
    }
    model.set_active_adapters(Some(setup(&["pfeiffer_inv"]))).unwrap();
    let alone = model.forward(&batch).unwrap().last_hidden_state.into_cpu_vec().unwrap();
    model.set_active_adapters(Some(setup(&["pfeiffer_inv", "pfeiffer"]))).unwrap();
    let out = model.forward(&batch).unwrap();
    assert_eq!(out.last_hidden_state.shape(), &[8, 11, 48]);
    assert_eq!(out.hidden_states[0].shape(), &[4, 11, 48], "replication is lazy");
    assert_eq!(&out.last_hidden_state.cpu_data().unwrap()[..alone.len()], alone.as_slice());
}

#[test]
fn nice_forward_and_inverse_match_the_library() {
    for name in ["pfeiffer_inv", "houlsby_inv"] {
        let file = TensorFile::open(adapters_dir().join(format!("nice_{name}.safetensors"))).unwrap();
        let (input, shape) = read_f32(&file, "input");
        for backend in backends() {
            let be = backend.clone();
            let (mut model, _) = tiny(backend);
            model.load_adapter(adapters_dir().join(name)).unwrap();
            // The input lives where the model does.
            let x = be.upload(input.clone(), &shape).unwrap();
            for (inverse, key) in [(false, "forward"), (true, "inverse")] {
                let y = model.invertible_adapter(name, &x, inverse).unwrap();
                assert_close(&format!("{} {name} {key}", be.name()), &be.to_host(&y).unwrap(), &read_f32(&file, key).0, TOL);
            }
            // The inverse as an LM head applies it: the first active adapter's.
            model.set_active_adapters(Some(setup(&[name]))).unwrap();
            let fwd = model.invertible_adapter(name, &x, false).unwrap();
            let back = model.invertible_adapter_inverse(&fwd).unwrap();
            assert_close(&format!("{} {name} inverse∘forward", be.name()), &be.to_host(&back).unwrap(), &input, TOL);
        }
    }
}

#[test]
fn minilm_adapters_match_the_library() {
    let Some(model_dir) = common::minilm() else { return };
    let inputs = TensorFile::open(fixtures().join("minilm/expected.safetensors")).unwrap();
    for (dirs, names, expected) in [
        (&["minilm_scorenn"][..], &["scorenn"][..], "expected_minilm_scorenn.safetensors"),
        (&["minilm_houlsby"], &["houlsby"], "expected_minilm_houlsby.safetensors"),
        (&["minilm_scorenn", "minilm_tasknn"], &["scorenn", "tasknn"], "expected_minilm_parallel_scorenn__tasknn.safetensors"),
    ] {
        let (mut model, _) = BertModel::from_dir(&model_dir, Arc::new(CpuBackend::fast()), LoadOptions::default()).unwrap();
        let (ids, shape) = inputs.read_i64("input_ids").unwrap();
        let (mask, _) = inputs.read_i64("attention_mask").unwrap();
        let (types, _) = inputs.read_i64("token_type_ids").unwrap();
        let batch = InputBatch::new(Path::new("minilm"), &shape, &ids, Some((&mask, &shape)), Some((&types, &shape)), model.config()).unwrap();
        for d in dirs {
            model.load_adapter(adapters_dir().join(d)).unwrap();
        }
        model.set_active_adapters(Some(setup(names))).unwrap();
        check_outputs(expected, &model, &batch, &TensorFile::open(adapters_dir().join(expected)).unwrap());
    }
}

#[test]
fn added_adapters_are_initialised_as_bert_init_and_change_the_output() {
    let (mut model, batch) = tiny(Arc::new(CpuBackend::fast()));
    let plain = model.forward(&batch).unwrap().last_hidden_state.into_cpu_vec().unwrap();
    model.add_adapter("a", AdapterConfig::named("houlsby").unwrap()).unwrap();
    // Added but inactive: nothing changes.
    assert_eq!(model.forward(&batch).unwrap().last_hidden_state.into_cpu_vec().unwrap(), plain);
    let a = model.adapter("a").unwrap();
    let down = a.params()["encoder.layer.0.output.adapters.a.adapter_down.0.weight"].cpu_data().unwrap().to_vec();
    let up = a.params()["encoder.layer.1.attention.output.adapters.a.adapter_up.weight"].cpu_data().unwrap().to_vec();
    assert_eq!(down.len(), 3 * 48, "m = 48 // 16 = 3");
    for w in [&down, &up] {
        let std = (w.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        assert!((0.012..0.028).contains(&std), "bert init std {std}");
    }
    assert!(a.params()["encoder.layer.0.output.adapters.a.adapter_up.bias"].cpu_data().unwrap().iter().all(|&b| b == 0.0));
    assert_eq!(a.params().len(), 2 * 2 * 4);
    model.set_active_adapters(Some(setup(&["a"]))).unwrap();
    let with = model.forward(&batch).unwrap().last_hidden_state.into_cpu_vec().unwrap();
    let diff = with.iter().zip(&plain).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff > 1e-5 && diff < 0.1, "a fresh houlsby adapter changes the output a little, not {diff}");
    // Same seed, same weights; deleting the active adapter deactivates it.
    let mut again = tiny(Arc::new(CpuBackend::fast())).0;
    again.add_adapter("a", AdapterConfig::named("houlsby").unwrap()).unwrap();
    assert_eq!(&*again.adapter("a").unwrap().params()["encoder.layer.0.output.adapters.a.adapter_down.0.weight"].cpu_data().unwrap(), down.as_slice());
    model.delete_adapter("a").unwrap();
    assert!(model.active_adapters().is_none());
}

#[test]
fn invalid_setups_and_names_are_refused() {
    let (mut model, _) = tiny(Arc::new(CpuBackend::fast()));
    model.add_adapter("p", AdapterConfig::named("pfeiffer").unwrap()).unwrap();
    model.add_adapter("h", AdapterConfig::named("houlsby").unwrap()).unwrap();
    let leave = AdapterConfig::named("pfeiffer").unwrap().with_overrides(&serde_json::json!({"leave_out": [1]})).unwrap();
    model.add_adapter("p_leave", leave).unwrap();
    let err = |r: bert_adapters::Result<()>| r.unwrap_err().to_string();
    let e = err(model.set_active_adapters(Some(setup(&["p", "h"]))));
    assert!(e.contains("Parallel(p, h): adapter `p` has no module at layer 0 attention output"), "{e}");
    let e = err(model.set_active_adapters(Some(setup(&["h", "p"]))));
    assert!(e.contains("adapter `p` has no module at layer 0 attention output (mh_adapter) where `h` has one"), "{e}");
    let e = err(model.set_active_adapters(Some(setup(&["p", "p_leave"]))));
    assert!(e.contains("`p_leave` has no module at layer 1 FFN output"), "{e}");
    let e = err(model.set_active_adapters(Some(setup(&["nope"]))));
    assert!(e.contains("no adapter named `nope` (adapters: h, p, p_leave)"), "{e}");
    let e = err(model.add_adapter("a.b", AdapterConfig::named("pfeiffer").unwrap()));
    assert!(e.contains("contains '.'"), "{e}");
    let e = err(model.add_adapter("p", AdapterConfig::named("pfeiffer").unwrap()));
    assert!(e.contains("`p` already exists"), "{e}");
    let huge = AdapterConfig::named("pfeiffer").unwrap().with_overrides(&serde_json::json!({"reduction_factor": 1e-9})).unwrap();
    let e = err(model.add_adapter("huge", huge));
    assert!(e.contains("more than 64× the hidden size 48"), "{e}");
    let thin = AdapterConfig::named("pfeiffer+inv").unwrap().with_overrides(&serde_json::json!({"inv_adapter_reduction_factor": 100})).unwrap();
    let e = err(model.add_adapter("thin", thin));
    assert!(e.contains("NICE sub-networks of 0 and 0 units"), "{e}");
    // Parallel of a child with itself is legal and gives identical halves.
    model.set_active_adapters(Some(setup(&["p", "p"]))).unwrap();
}
