//! The tape keeps what the backward of its plan reads, no more, and `backward` refuses a tape
//! recorded under another setup, trainable set or parameter version.

mod common;

use std::path::Path;
use std::sync::Arc;

use bert_adapters::model::FrozenRows;
use bert_adapters::{AdapterConfig, Backend, BertModel, CpuBackend, Error, InputBatch, LoadOptions, Tensor};

use common::{setup, tiny};

fn ones_like(t: &Tensor) -> Tensor {
    Tensor::from_vec(vec![1.0; t.elem_count()], t.shape()).unwrap()
}

/// The figure: MiniLM, Parallel(scorenn, tasknn) pfeiffer, tasknn trained.
///
/// pfeiffer has one module per layer, at the FFN output; the batch is replicated there in layer
/// 0. The backward stops at layer 0's FFN output location (tasknn's lowest parameter), where it
/// needs only that location's inputs `h2` and `x_attn`, both still B rows (before replication).
/// Every higher layer keeps, for tasknn's B rows only: the FFN output location's inputs `h2` and
/// `x_attn` (2·H floats per token), the plain attention output LayerNorm's input `z = h1 + x` and
/// its `[mean, rstd]` (H + 2), the packed Q, K, V (3·H), the FFN pre-activation (I) and the
/// attention's row log-sum-exp (one float per head; no `[B, heads, T, T]` probabilities). Add
/// the `[B, T]` mask once
/// (one storage shared by every layer) and the pooler's pre-activation `[2B, H]`.
#[test]
fn minilm_parallel_tape_keeps_what_the_backward_reads() {
    let Some(dir) = common::minilm() else { return };
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::fast());
    let (mut model, _) = BertModel::from_dir(&dir, be, LoadOptions::default()).unwrap();
    let (b, t) = (4usize, 16usize);
    let ids: Vec<i64> = (0..b * t).map(|i| 1000 + (i as i64 * 37) % 20000).collect();
    let batch = InputBatch::new(Path::new("ids"), &[b, t], &ids, None, None, model.config()).unwrap();
    for name in ["scorenn", "tasknn"] {
        model.add_adapter(name, AdapterConfig::named("pfeiffer").unwrap()).unwrap();
    }
    model.set_active_adapters(Some(setup(&["scorenn", "tasknn"]))).unwrap();
    model.train_adapter(&["tasknn"]).unwrap();
    let (out, tape) = model.forward_train(&batch).unwrap();
    let cfg = model.config();
    let (h, i, heads, layers) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers);
    let tokens = b * t;
    let per_token_per_layer = (6 * h + 2 + i + heads) * 4; // 15,416 bytes for MiniLM
    let want = tokens * 2 * h * 4 + (layers - 1) * tokens * per_token_per_layer + tokens * 4 + 2 * b * h * 4;
    assert_eq!(tape.bytes(), want, "tape bytes");
    assert_eq!(per_token_per_layer, 15_416);
    assert_eq!(tape.layers_kept(), layers);
    // Before this change every layer kept all 9 activations for both branches after layer 0:
    // (7H + I)·4 bytes per token at layer 0, twice that above it, and a mask per layer.
    let before = tokens * (7 * h + i) * 4 * (1 + 2 * (layers - 1));
    assert!(tape.bytes() * 2 < before, "{} vs {before}", tape.bytes());
    // And it still serves the backward.
    let grads = model.backward(&tape, &ones_like(&out.last_hidden_state), None).unwrap();
    assert_eq!(grads.len(), 4 * layers);
    // FrozenRows::Share keeps views of tasknn's rows instead of copies, so each saved tensor of
    // the replicated layers keeps both branches' rows alive: those layers' bytes double, the
    // rest (layer 0, before the replication; the mask; the pooler's [2B, H]) stays.
    drop(tape);
    model.set_frozen_rows(FrozenRows::Share);
    let (_, tape) = model.forward_train(&batch).unwrap();
    let want_share = tokens * 2 * h * 4 + 2 * (layers - 1) * tokens * per_token_per_layer + tokens * 4 + 2 * b * h * 4;
    assert_eq!(tape.bytes(), want_share, "tape bytes with shared rows");
}

/// `FrozenRows::Share` (views of the live branch's rows, no copies) against the default `Copy`:
/// the same gradients, bit for bit, on every backend (the CUDA ones read the views at an offset),
/// for houlsby (both locations, replicated at layer 0's attention location) with dropout on and
/// either branch trained; the shared tape holds more bytes, and `Copy` again gives the first tape.
#[test]
fn shared_frozen_rows_give_the_copied_rows_gradients() {
    let mut backends: Vec<Arc<dyn Backend>> = vec![Arc::new(CpuBackend::fast()), Arc::new(CpuBackend::reference())];
    backends.extend(common::cuda_backends());
    for be in backends {
        let name = be.name();
        let (mut model, batch) = tiny(be.clone());
        for n in ["scorenn", "tasknn"] {
            model.add_adapter(n, AdapterConfig::named("houlsby").unwrap()).unwrap();
        }
        model.set_active_adapters(Some(setup(&["scorenn", "tasknn"]))).unwrap();
        model.set_dropout(Some(11));
        for trained in ["scorenn", "tasknn"] {
            model.train_adapter(&[trained]).unwrap();
            let mut run = |rows: FrozenRows| {
                model.set_frozen_rows(rows);
                assert_eq!(model.frozen_rows(), rows);
                let (out, tape) = model.forward_train(&batch).unwrap();
                let n = out.last_hidden_state.elem_count();
                let w: Vec<f32> = (0..n).map(|i| ((i * 7919) % 23) as f32 / 11.0 - 1.0).collect();
                let d = be.upload(w, out.last_hidden_state.shape()).unwrap();
                let grads = model.backward(&tape, &d, None).unwrap();
                let grads: Vec<(String, Vec<f32>)> = grads.into_iter().map(|(k, g)| (k, be.to_host(&g).unwrap())).collect();
                (tape.bytes(), grads)
            };
            let (copy_bytes, copied) = run(FrozenRows::Copy);
            let (share_bytes, shared) = run(FrozenRows::Share);
            let (again_bytes, _) = run(FrozenRows::Copy);
            assert!(!copied.is_empty() && copied.iter().all(|(k, _)| k.contains(&format!(".adapters.{trained}."))), "{name} {trained}: {:?}", copied.iter().map(|(k, _)| k).collect::<Vec<_>>());
            assert_eq!(copied.len(), shared.len(), "{name} {trained}");
            for ((k, a), (k2, b)) in copied.iter().zip(&shared) {
                assert_eq!(k, k2, "{name} {trained}");
                let same = a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{name} {trained}: `{k}` differs between copied and shared frozen rows");
            }
            assert!(share_bytes > copy_bytes, "{name} {trained}: shared {share_bytes} bytes, copied {copy_bytes}");
            assert_eq!(again_bytes, copy_bytes, "{name} {trained}");
        }
    }
}

#[test]
fn layers_below_the_lowest_trainable_adapter_record_nothing() {
    let (mut model, batch) = tiny(Arc::new(CpuBackend::fast()));
    let leave_out_0 = AdapterConfig::named("houlsby").unwrap().with_overrides(&serde_json::json!({ "leave_out": [0] })).unwrap();
    model.add_adapter("a", leave_out_0).unwrap();
    model.add_adapter("frozen", AdapterConfig::named("houlsby").unwrap()).unwrap();
    model.set_active_adapters(Some(setup(&["a"]))).unwrap();
    model.train_adapter(&["a"]).unwrap();
    let (out, tape) = model.forward_train(&batch).unwrap();
    assert_eq!(tape.layers_kept(), model.config().num_hidden_layers - 1, "layer 0 holds no trainable parameter");
    let grads = model.backward(&tape, &ones_like(&out.last_hidden_state), None).unwrap();
    assert!(!grads.is_empty() && grads.keys().all(|k| k.contains(".adapters.a.")));
    // Nothing trainable active: the tape keeps nothing at all, and the backward gives nothing.
    model.train_adapter(&["frozen"]).unwrap();
    let (out, tape) = model.forward_train(&batch).unwrap();
    assert_eq!((tape.layers_kept(), tape.bytes()), (0, 0));
    assert!(model.backward(&tape, &ones_like(&out.last_hidden_state), None).unwrap().is_empty());
}

#[test]
fn backward_refuses_a_tape_of_another_setup_trainable_set_or_parameter_version() {
    let (mut model, batch) = tiny(Arc::new(CpuBackend::fast()));
    for n in ["a", "b"] {
        model.add_adapter(n, AdapterConfig::named("pfeiffer").unwrap()).unwrap();
    }
    model.set_active_adapters(Some(setup(&["a", "b"]))).unwrap();
    model.train_adapter(&["a"]).unwrap();
    let refused = |model: &BertModel, tape: &bert_adapters::model::Tape, d: &Tensor, want: &str| {
        let e = model.backward(tape, d, None).unwrap_err();
        assert!(matches!(&e, Error::Input(m) if m.contains(want) && m.contains("forward_train again")), "{e}");
    };
    let (out, tape) = model.forward_train(&batch).unwrap();
    let d = ones_like(&out.last_hidden_state);
    model.train_adapter(&["b"]).unwrap();
    refused(&model, &tape, &d, "trainable adapters were [a] and are [b]");
    model.train_adapter(&["a"]).unwrap();
    refused(&model, &tape, &d, "parameters changed"); // train_adapter itself bumps the version
    let (_, tape) = model.forward_train(&batch).unwrap();
    model.set_active_adapters(Some(setup(&["b", "a"]))).unwrap();
    refused(&model, &tape, &d, "active setup was [a, b] and is [b, a]");
    model.set_active_adapters(Some(setup(&["a", "b"]))).unwrap();
    let (_, tape) = model.forward_train(&batch).unwrap();
    model.adapter_params_mut("a").unwrap();
    refused(&model, &tape, &d, "parameters changed");
    // A fresh tape works.
    let (_, tape) = model.forward_train(&batch).unwrap();
    assert!(model.backward(&tape, &d, None).is_ok());
}
