//! The device-ready core (issue 10): dtype casts bit-exact with `half`, a frozen base held in
//! bf16, shared storage, and a training step that runs on the backend with no host transfers
//! beyond its inputs and the scalars a caller reads, over flat adapter arenas.

mod common;

use std::sync::Arc;

use bert_adapters::model::heads::HeadConfig;
use bert_adapters::model::step::TrainStepConfig;
use bert_adapters::train::loss::{self, Objective};
use bert_adapters::train::{clip_grad_norm, AdamW, AdamWConfig};
use bert_adapters::{AdapterConfig, Backend, BertModel, CpuBackend, DType, InputBatch, LoadOptions, Tensor};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};

use common::{fixtures, setup, tiny};

/// Values where rounding is easy to get wrong: ties (odd and even), NaN payloads, infinities,
/// subnormals of f32 and of the narrow types, overflow, and the largest finite values.
fn awkward_f32() -> Vec<f32> {
    let mut v = vec![
        0.0, -0.0, 1.0, -1.0, f32::MAX, f32::MIN, f32::MIN_POSITIVE, -f32::MIN_POSITIVE, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN,
        f32::from_bits(0x7fc0_0001), f32::from_bits(0x7f80_0001), // a quiet and a signalling NaN with payloads
        f32::from_bits(1), f32::from_bits(0x0000_8000), f32::from_bits(0x007f_ffff), // f32 subnormals
        65504.0, 65519.99, 65520.0, 1e-7, 6.0e-8, f32::from_bits(0x3380_0000), 2.98e-8, // f16 max, overflow edge, f16 subnormals
    ];
    // Exact ties for bf16 (low 16 bits 0x8000) with even and odd kept parts, and one ulp around.
    for hi in [0x3f80u32, 0x3f81, 0x4000, 0x4001, 0x7f7f, 0x0001] {
        for lo in [0x7fffu32, 0x8000, 0x8001] {
            v.push(f32::from_bits((hi << 16) | lo));
        }
    }
    // Exact ties for f16 (13 dropped bits = 0x1000) around 1.0 and 1.0009765625.
    for base in [0x3f80_0000u32, 0x3f80_2000] {
        for lo in [0x0fffu32, 0x1000, 0x1001] {
            v.push(f32::from_bits(base | lo));
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    v.extend((0..20_000).map(|_| f32::from_bits(rng.random::<u32>())));
    v
}

#[test]
fn casts_are_bit_exact_with_half() {
    let be = CpuBackend::fast();
    let x = awkward_f32();
    let t = be.upload(x.clone(), &[x.len()]).unwrap();
    let b = be.cast(&t, DType::BF16).unwrap();
    let h = be.cast(&t, DType::F16).unwrap();
    assert_eq!((b.dtype(), h.dtype()), (DType::BF16, DType::F16));
    let (bs, hs) = (b.cpu_slice::<bf16>().unwrap(), h.cpu_slice::<f16>().unwrap());
    for (i, &v) in x.iter().enumerate() {
        assert_eq!(bs[i].to_bits(), bf16::from_f32(v).to_bits(), "bf16 of {v:e} ({:#010x})", v.to_bits());
        assert_eq!(hs[i].to_bits(), f16::from_f32(v).to_bits(), "f16 of {v:e} ({:#010x})", v.to_bits());
    }
    // Round to nearest even at an exact tie: 0x3f80_8000 (1 + 2^-8) keeps 0x3f80; 0x3f81_8000 goes up.
    assert_eq!(bf16::from_f32(f32::from_bits(0x3f80_8000)).to_bits(), 0x3f80);
    assert_eq!(bf16::from_f32(f32::from_bits(0x3f81_8000)).to_bits(), 0x3f82);
    // Widening back is exact, and NaN stays NaN.
    let back = be.to_host(&be.cast(&b, DType::F32).unwrap()).unwrap();
    for (i, &v) in back.iter().enumerate() {
        let want = bs[i].to_f32();
        assert!(v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()), "widen {i}");
    }
    assert!(be.cast(&t, DType::U32).is_err());
    // A cast to the same dtype is a view, not a copy.
    assert!(be.cast(&t, DType::F32).unwrap().shares_storage(&t));
}

#[test]
fn frozen_base_in_bf16_equals_the_f32_model_on_bf16_rounded_weights() {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::fast());
    let dir = fixtures().join("tiny_bert");
    let opts = LoadOptions { dtype: DType::BF16, ..Default::default() };
    let (mut half_model, _) = BertModel::from_dir(&dir, be.clone(), opts).unwrap();
    assert_eq!(half_model.weights().word_embeddings.dtype(), DType::BF16);
    // The reference: the f32 model whose weights were rounded to bf16 and widened back.
    let tmp = tempfile::tempdir().unwrap();
    let src = bert_adapters::io::TensorFile::open(dir.join("model.safetensors")).unwrap();
    let rounded: Vec<(String, bert_adapters::io::OutTensor)> = src
        .names()
        .into_iter()
        .map(|n| {
            let (data, shape) = src.read_f32(&n).unwrap();
            (n, bert_adapters::io::OutTensor::F32 { shape, data: data.iter().map(|&v| bf16::from_f32(v).to_f32()).collect() })
        })
        .collect();
    std::fs::copy(dir.join("config.json"), tmp.path().join("config.json")).unwrap();
    bert_adapters::io::write_safetensors(&tmp.path().join("model.safetensors"), &rounded, None).unwrap();
    let (mut f32_model, _) = BertModel::from_dir(tmp.path(), be.clone(), LoadOptions::default()).unwrap();
    let batch = InputBatch::from_file(dir.join("inputs.safetensors"), f32_model.config()).unwrap();
    for m in [&mut half_model, &mut f32_model] {
        m.add_adapter_seeded("a", AdapterConfig::named("houlsby").unwrap(), 3).unwrap();
        m.set_active_adapters(Some(setup(&["a"]))).unwrap();
    }
    let (x, y) = (half_model.forward(&batch).unwrap(), f32_model.forward(&batch).unwrap());
    // Every op widens bf16 exactly and computes in f32 as before: bit-identical outputs.
    assert_eq!(x.last_hidden_state.cpu_data().unwrap(), y.last_hidden_state.cpu_data().unwrap());
    assert!(BertModel::from_dir(&dir, be, LoadOptions { dtype: DType::U32, ..Default::default() }).is_err());
}

/// Parallel(scorenn, tasknn) on the tiny BERT, heads on both, tasknn trainable.
fn parallel_model(be: Arc<dyn Backend>, tasknn_config: &str) -> (BertModel, InputBatch, Vec<usize>) {
    parallel_model_of(be, "pfeiffer", tasknn_config)
}

/// `parallel_model` with scorenn of `scorenn_config` (Parallel children share their locations).
fn parallel_model_of(be: Arc<dyn Backend>, scorenn_config: &str, tasknn_config: &str) -> (BertModel, InputBatch, Vec<usize>) {
    let (mut model, batch) = tiny(be);
    model.add_adapter_seeded("scorenn", AdapterConfig::named(scorenn_config).unwrap(), 1).unwrap();
    model.add_adapter_seeded("tasknn", AdapterConfig::named(tasknn_config).unwrap(), 2).unwrap();
    for n in ["scorenn", "tasknn"] {
        model.add_classification_head(n, HeadConfig::classification(3)).unwrap();
    }
    // Blow the adapters up so a wrong gradient cannot hide in the tolerance.
    for n in ["scorenn", "tasknn"] {
        for t in model.adapter_params_mut(n).unwrap().values_mut() {
            let v: Vec<f32> = t.cpu_data().unwrap().iter().enumerate().map(|(i, x)| x * 40.0 + (i % 7) as f32 * 0.01).collect();
            *t = Tensor::from_vec(v, t.shape()).unwrap();
        }
    }
    model.set_active_adapters(Some(setup(&["scorenn", "tasknn"]))).unwrap();
    model.train_adapter(&["tasknn"]).unwrap();
    let labels: Vec<usize> = (0..batch.batch).map(|i| i % 3).collect();
    (model, batch, labels)
}

fn cfg(objective: Objective) -> TrainStepConfig {
    TrainStepConfig { objective, trained: "tasknn".into(), max_grad_norm: Some(1.0) }
}

#[test]
fn a_training_step_transfers_only_its_inputs_and_the_scalars_asked_for() {
    let cpu = Arc::new(CpuBackend::fast());
    let (mut model, batch, labels) = parallel_model(cpu.clone(), "pfeiffer");
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    let c = cfg(Objective::TaskEnergy { lambda: 0.1 });
    model.train_step(&batch, &labels, &c, &mut opt).unwrap(); // step 1 binds the optimizer
    for _ in 0..3 {
        let before = cpu.transfer_counts();
        let out = model.train_step(&batch, &labels, &c, &mut opt).unwrap();
        let during = cpu.transfer_counts() - before;
        assert_eq!(during.readbacks, 0, "a step reads nothing back: {during:?}");
        // The batch's inputs only (ids, token types, mask, labels), written into the same fixed
        // buffers as the step before: no upload creates a buffer.
        let (bt, b) = (batch.batch * batch.seq_len, batch.batch);
        assert_eq!((during.uploads, during.upload_bytes, during.new_buffers), (4, (3 * bt + b) * 4, 0), "{during:?}");
        let before = cpu.transfer_counts();
        let v = out.read(cpu.as_ref()).unwrap();
        let read = cpu.transfer_counts() - before;
        assert_eq!((read.readbacks, read.readback_bytes), (2, 12), "loss [2] and norm [1]");
        assert!(v.loss.is_finite() && v.grad_norm > 0.0);
    }
}

/// The step on the device equals the host composition it replaced (objective on the host,
/// clipping and AdamW on maps), step after step, alternating the two adapters with dropout on
/// (in the encoder and in the heads), as `train` runs them.
#[test]
fn the_device_step_equals_the_host_path_it_replaced() {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::fast());
    let (mut dev, batch, labels) = parallel_model(be.clone(), "pfeiffer");
    let (mut host, _, _) = parallel_model(be.clone(), "pfeiffer");
    let mut opts: Vec<AdamW> = (0..4).map(|_| AdamW::new(AdamWConfig::default()).unwrap()).collect();
    let y: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    for step in 0..6 {
        let (trained, i, objective) = match step % 3 {
            0 => ("tasknn", 1, Objective::TaskEnergy { lambda: 0.1 }),
            1 => ("scorenn", 0, Objective::ScoreMargin { margin: 1.0, ce_weight: 0.1 }),
            _ => ("tasknn", 1, Objective::CrossEntropy),
        };
        for m in [&mut dev, &mut host] {
            m.train_adapter(&[trained]).unwrap();
            m.set_dropout(Some(100 + step as u64));
        }
        let label = format!("step {step} ({trained}, {objective:?})");
        let c = TrainStepConfig { objective, trained: trained.into(), max_grad_norm: Some(1.0) };
        let (o_dev, rest) = opts.split_at_mut(2);
        let v = dev.train_step(&batch, &labels, &c, &mut o_dev[i]).unwrap().read(be.as_ref()).unwrap();
        // The host path.
        let (out, tape) = host.forward_train(&batch).unwrap();
        let branches = host.head_logits_train(&out, &tape).unwrap();
        let logits: Vec<Vec<f32>> = branches.iter().map(|b| be.to_host(&b.logits).unwrap()).collect();
        // The heads drop out too: their eval logits on the same encoder output differ.
        assert_ne!(be.to_host(&host.head_logits(&out).unwrap()[i].logits).unwrap(), logits[i], "{step}: head dropout is off");
        let want = match objective {
            Objective::CrossEntropy => loss::reference(objective, &logits[i], None, &y, 3).unwrap(),
            _ => loss::reference(objective, &logits[i], Some(&logits[1 - i]), &y, 3).unwrap(),
        };
        let mut d = vec![be.upload(vec![0.0; batch.batch * 3], &[batch.batch, 3]).unwrap(); 2];
        d[i] = be.upload(want.dlogits.clone(), &[batch.batch, 3]).unwrap();
        let (hg, d_last, d_pool) = host.heads_backward(&branches, &d, &tape).unwrap();
        let mut grads = host.backward(&tape, &d_last, d_pool.as_ref()).unwrap();
        grads.extend(hg);
        drop((out, tape, branches));
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        host.adamw_step(trained, &mut rest[i], &grads).unwrap();
        assert!(((v.loss as f64 - want.total) / want.total).abs() < 1e-6, "{label}: loss {} vs {}", v.loss, want.total);
        assert!((v.grad_norm - norm).abs() <= 1e-6 * norm, "{label}: gradient norm {} vs {norm}", v.grad_norm);
        for name in ["scorenn", "tasknn"] {
            let (a, b) = (dev.adapter(name).unwrap(), host.adapter(name).unwrap());
            for (k, t) in a.params() {
                common::assert_close(&format!("{label} {k}"), &t.cpu_data().unwrap(), &b.params()[k].cpu_data().unwrap(), 1e-6);
            }
            for (k, t) in dev.head(name).unwrap().params() {
                common::assert_close(&format!("{label} {k}"), &t.cpu_data().unwrap(), &host.head(name).unwrap().params()[k].cpu_data().unwrap(), 1e-6);
            }
        }
    }
}

/// The gradients of one step of `trained` (branch `i`) on the host path: `heads_backward_some`
/// and `backward` returning maps, the objective's logit gradient on branch `i` only.
fn host_gradients(model: &BertModel, batch: &InputBatch, labels: &[usize], i: usize, objective: Objective) -> bert_adapters::model::Gradients {
    let be = model.backend().clone();
    let (out, tape) = model.forward_train(batch).unwrap();
    let branches = model.head_logits_train(&out, &tape).unwrap();
    let logits: Vec<Vec<f32>> = branches.iter().map(|b| be.to_host(&b.logits).unwrap()).collect();
    let y: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    let want = match objective {
        Objective::CrossEntropy => loss::reference(objective, &logits[i], None, &y, 3).unwrap(),
        _ => loss::reference(objective, &logits[i], Some(&logits[1 - i]), &y, 3).unwrap(),
    };
    let dlogits = be.upload(want.dlogits, &[batch.batch, 3]).unwrap();
    let mut d: Vec<Option<&Tensor>> = vec![None; branches.len()];
    d[i] = Some(&dlogits);
    let (head_grads, d_last, d_pool) = model.heads_backward_some(&branches, &d, &tape).unwrap();
    let mut grads = model.backward(&tape, &d_last, d_pool.as_ref()).unwrap();
    grads.extend(head_grads);
    grads
}

/// `train_step` has the backward write straight into the arena's gradient views (the first
/// contribution to a tensor overwrites, later ones add; nothing is zeroed first). Those views
/// equal the gradients the returned-tensor path gives for the same batch and masks, key for key:
/// with the same adapter and head in both Parallel branches (accumulation), and with an `+inv`
/// adapter that is not the first child (its NICE is never reached: marked without gradient, so
/// its stale values, poisoned with NaN here, feed neither the norm nor AdamW).
#[test]
fn arena_gradients_equal_the_returned_gradients() {
    let cases = [
        (["scorenn", "tasknn"], "pfeiffer", "pfeiffer", Objective::TaskEnergy { lambda: 0.1 }, 0),
        (["tasknn", "tasknn"], "houlsby", "houlsby", Objective::CrossEntropy, 0),
        (["scorenn", "tasknn"], "pfeiffer", "pfeiffer+inv", Objective::CrossEntropy, 8),
        (["tasknn", "scorenn"], "houlsby", "houlsby+inv", Objective::ScoreMargin { margin: 1.0, ce_weight: 0.1 }, 0),
    ];
    for be in [Arc::new(CpuBackend::fast()) as Arc<dyn Backend>, Arc::new(CpuBackend::reference())] {
        for (active, scorenn, config, objective, unreached) in cases {
            let label = format!("{active:?}, tasknn {config} [{}]", be.name());
            let (mut model, batch, labels) = parallel_model_of(be.clone(), scorenn, config);
            model.set_active_adapters(Some(setup(&active))).unwrap();
            model.train_adapter(&["tasknn"]).unwrap();
            let i = active.iter().position(|n| *n == "tasknn").unwrap();
            let c = TrainStepConfig { objective, trained: "tasknn".into(), max_grad_norm: None };
            let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.5, ..AdamWConfig::default() }).unwrap();
            model.set_dropout(Some(7));
            model.train_step(&batch, &labels, &c, &mut opt).unwrap(); // packs the arena
            // Every reached entry must be overwritten, not added to; the others keep the poison.
            be.fill(&model.arena("tasknn").unwrap().grads, f32::NAN).unwrap();
            model.set_dropout(Some(8));
            let want = host_gradients(&model, &batch, &labels, i, objective);
            let params_before: Vec<Vec<f32>> = model.arena("tasknn").unwrap().table.iter().map(|e| model.adapter("tasknn").unwrap().params().get(&e.key).or_else(|| model.head("tasknn").unwrap().params().get(&e.key)).unwrap().cpu_data().unwrap().to_vec()).collect();
            // A NaN that reached the norm would make `read` an error.
            let v = model.train_step(&batch, &labels, &c, &mut opt).unwrap().read(be.as_ref()).unwrap();
            let arena = model.arena("tasknn").unwrap();
            let mut sq = 0f64;
            let mut missing = 0;
            for (k, e) in arena.table.iter().enumerate() {
                assert_eq!(arena.with_grad[k], want.contains_key(&e.key), "{label}: is `{}` reached?", e.key);
                let got = arena.grad(k).unwrap().cpu_data().unwrap().to_vec();
                match want.get(&e.key) {
                    Some(g) => {
                        common::assert_close(&format!("{label} arena gradient of {}", e.key), &got, &g.cpu_data().unwrap(), 1e-6);
                        sq += got.iter().map(|&x| x as f64 * x as f64).sum::<f64>();
                    }
                    None => {
                        missing += 1;
                        assert!(got.iter().all(|x| x.is_nan()), "{label}: `{}` got no gradient, its buffer was not written", e.key);
                        let now = model.adapter("tasknn").unwrap().params()[&e.key].cpu_data().unwrap().to_vec();
                        assert_eq!(now, params_before[k], "{label}: `{}` got no gradient and is neither updated nor decayed", e.key);
                        assert!(opt.param_state(&e.key).is_none(), "{label}: `{}` has no optimizer state", e.key);
                    }
                }
            }
            assert_eq!(missing, unreached, "{label}: tensors without gradient");
            assert!(arena.table.iter().any(|e| e.key.starts_with("heads.")) && want.keys().any(|k| k.starts_with("heads.tasknn")), "{label}: the head's gradients are compared");
            let norm = sq.sqrt();
            assert!((v.grad_norm as f64 - norm).abs() <= 1e-5 * norm, "{label}: gradient norm {} vs {norm}", v.grad_norm);
        }
    }
}

#[test]
fn adapter_parameters_live_in_one_arena_and_untouched_tensors_are_not_decayed() {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::fast());
    // tasknn is the second child: its invertible adapter never runs, so it gets no gradient.
    let (mut model, batch, labels) = parallel_model(be.clone(), "pfeiffer+inv");
    let nice_before: Vec<(String, Vec<f32>)> =
        model.adapter("tasknn").unwrap().params().iter().filter(|(k, _)| k.contains("invertible")).map(|(k, t)| (k.clone(), t.cpu_data().unwrap().to_vec())).collect();
    assert!(!nice_before.is_empty());
    let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.5, ..AdamWConfig::default() }).unwrap();
    model.train_step(&batch, &labels, &cfg(Objective::CrossEntropy), &mut opt).unwrap();
    let arena = model.arena("tasknn").unwrap();
    let adapter = model.adapter("tasknn").unwrap();
    let head = model.head("tasknn").unwrap();
    // Every parameter is a view of the one arena, at the table's offset.
    assert_eq!(arena.table.len(), adapter.params().len() + head.params().len());
    for e in &arena.table {
        let t = adapter.params().get(&e.key).or_else(|| head.params().get(&e.key)).unwrap();
        assert!(t.shares_storage(&arena.params) && t.offset() == e.offset, "{} is not a view of the arena", e.key);
    }
    for (k, before) in &nice_before {
        assert_eq!(&*adapter.params()[k].cpu_data().unwrap(), before.as_slice(), "{k} has no gradient and must not be decayed");
        assert!(opt.param_state(k).is_none(), "{k} has no optimizer state");
    }
    let down = adapter.params().keys().find(|k| k.contains("adapter_down")).unwrap();
    assert_eq!(opt.param_state(down).unwrap().step, 1);
}

#[test]
fn frozen_heads_and_adapters_get_no_weight_gradient_products() {
    let cpu = Arc::new(CpuBackend::fast());
    let (mut model, batch, labels) = parallel_model(cpu.clone(), "pfeiffer");
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    let before = cpu.gemm_counts();
    model.train_step(&batch, &labels, &cfg(Objective::TaskEnergy { lambda: 0.1 }), &mut opt).unwrap();
    let (calls, _) = (cpu.gemm_counts() - before).weight_grad();
    // pfeiffer has one module per layer (FFN output), two Linears each; tasknn's head has two
    // Linears. scorenn's adapter and head are frozen: nothing.
    let layers = model.config().num_hidden_layers;
    assert_eq!(calls, 2 * layers + 2);
}

/// The fused ops the seam expresses (dropout in its producer, bias + activation in the product,
/// the activation gradient in the input-gradient product, packed Q, K, V) equal the unfused
/// sequences bit for bit on both CPU paths.
#[test]
fn fused_ops_equal_their_unfused_sequences() {
    use bert_adapters::backend::DropoutSpec;
    use bert_adapters::Activation;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut t = |shape: &[usize]| Tensor::from_vec(common::random_vec(&mut rng, shape.iter().product(), 1.0), shape).unwrap();
    let (x, w, b, dy) = (t(&[2, 5, 8]), t(&[6, 8]), t(&[6]), t(&[2, 5, 6]));
    let (g, beta) = (t(&[8]), t(&[8]));
    let qkv = t(&[2, 5, 12]);
    let mask = Tensor::from_vec(vec![0.0, 0.0, 0.0, f32::MIN, f32::MIN, 0.0, 0.0, 0.0, 0.0, 0.0], &[2, 5]).unwrap();
    let dctx = t(&[2, 5, 4]);
    let spec = DropoutSpec { p: 0.3, seed: 5, stream: 9, blocks: vec![0], seed_buffer: None, offset: 0 };
    for be in [CpuBackend::fast(), CpuBackend::reference()] {
        let bits = |t: &Tensor| t.cpu_data().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let unfused = be.dropout(&be.linear(&x, &w, Some(&b)).unwrap(), &spec).unwrap();
        assert_eq!(bits(&be.linear_dropout(&x, &w, Some(&b), Some(&spec)).unwrap()), bits(&unfused), "{}", be.name());
        for act in [Activation::Gelu, Activation::GeluNew, Activation::Tanh, Activation::Relu] {
            let pre = be.linear(&x, &w, Some(&b)).unwrap();
            let (y, kept) = be.linear_act(&x, &w, Some(&b), act).unwrap();
            assert_eq!((bits(&y), bits(&kept)), (bits(&be.activation(&pre, act).unwrap()), bits(&pre)), "{act:?}");
            let unfused = be.activation_backward(&be.linear_backward_input(&dy, &w).unwrap(), &x, act).unwrap();
            assert_eq!(bits(&be.linear_backward_input_act(&dy, &w, &x, act).unwrap()), bits(&unfused), "{act:?}");
        }
        let unfused = be.dropout(&be.residual_layernorm(&x, Some(&x), &g, &beta, 1e-5).unwrap(), &spec).unwrap();
        assert_eq!(bits(&be.residual_layernorm_dropout(&x, Some(&x), &g, &beta, 1e-5, Some(&spec)).unwrap()), bits(&unfused));
        // Packed Q, K, V: the context equals the three-tensor op's; the log-sum-exp equals the
        // f64 reference; the packed gradient (probabilities recomputed from the log-sum-exp on
        // the fast path, one f32 rounding away from the softmax) matches the three-tensor op's.
        let cols = |i: usize| {
            let d: Vec<f32> = qkv.cpu_data().unwrap().chunks(12).flat_map(|r| r[i * 4..(i + 1) * 4].to_vec()).collect();
            Tensor::from_vec(d, &[2, 5, 4]).unwrap()
        };
        let (q, k, v) = (cols(0), cols(1), cols(2));
        let ctx = be.attention(&q, &k, &v, &mask, 2, Some(&spec)).unwrap();
        let (packed_ctx, lse) = be.attention_packed(&qkv, &mask, 2, Some(&spec)).unwrap();
        assert_eq!(bits(&packed_ctx), bits(&ctx));
        let want_lse = bert_adapters::cpu::reference::attention_lse(&q.cpu_data().unwrap(), &k.cpu_data().unwrap(), &mask.cpu_data().unwrap(), 2, 5, 4, 2);
        assert_eq!(lse.shape(), &[2, 2, 5]);
        common::assert_close("log-sum-exp", &lse.cpu_data().unwrap(), &want_lse, 1e-6);
        let [dq, dk, dv] = be.attention_backward(&dctx, &q, &k, &v, &mask, 2, Some(&spec)).unwrap();
        let packed = be.attention_packed_backward(&dctx, &qkv, &lse, &mask, 2, Some(&spec)).unwrap();
        let want: Vec<f32> = (0..10).flat_map(|r| [&dq, &dk, &dv].into_iter().flat_map(move |t| t.cpu_data().unwrap()[r * 4..(r + 1) * 4].to_vec())).collect();
        common::assert_close(&format!("packed attention gradient [{}]", be.name()), &packed.cpu_data().unwrap(), &want, 1e-5);
    }
}

/// The LayerNorm a training forward runs where no adapter sits returns the residual stream and
/// each row's `[mean, rstd]`; its backward from them equals the backward that recomputes them.
#[test]
fn layernorm_statistics_serve_the_backward() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut t = |shape: &[usize], scale: f32| Tensor::from_vec(common::random_vec(&mut rng, shape.iter().product(), scale), shape).unwrap();
    let (x, r, g, b, dy) = (t(&[3, 4, 16], 2.0), t(&[3, 4, 16], 1.0), t(&[16], 1.5), t(&[16], 0.5), t(&[3, 4, 16], 1.0));
    for be in [CpuBackend::fast(), CpuBackend::reference()] {
        let (y, z, stats) = be.residual_layernorm_stats(&x, Some(&r), &g, &b, 1e-12).unwrap();
        assert_eq!(y.cpu_data().unwrap(), be.residual_layernorm(&x, Some(&r), &g, &b, 1e-12).unwrap().cpu_data().unwrap(), "{}", be.name());
        let sum: Vec<f32> = x.cpu_data().unwrap().iter().zip(r.cpu_data().unwrap().iter()).map(|(a, b)| a + b).collect();
        assert_eq!(&*z.cpu_data().unwrap(), sum.as_slice());
        assert_eq!(stats.shape(), &[3, 4, 2]);
        let want = be.layernorm_backward_input(&dy, &x, Some(&r), &g, 1e-12).unwrap();
        let got = be.layernorm_backward_stats(&dy, &z, &stats, &g).unwrap();
        common::assert_close(&format!("LayerNorm backward from statistics [{}]", be.name()), &got.cpu_data().unwrap(), &want.cpu_data().unwrap(), 1e-5);
    }
}

/// The dropout seed lives in a device buffer that the kernels read, so the launches are the same
/// every step: a spec's buffer wins over its `seed` argument, `set_dropout` writes 8 bytes, and a
/// tape recorded under the previous seed is refused.
#[test]
fn the_dropout_seed_is_read_from_a_device_buffer() {
    use bert_adapters::backend::{DropoutSpec, SeedBuffer};
    let cpu = Arc::new(CpuBackend::fast());
    let ones = Tensor::from_vec(vec![1.0; 64], &[8, 8]).unwrap();
    let seed7 = DropoutSpec { p: 0.5, seed: 7, stream: 3, blocks: vec![0], seed_buffer: None, offset: 0 };
    let buffer = cpu.upload_u32(vec![7, 0], &[2]).unwrap();
    let via_buffer = DropoutSpec { seed: 1, seed_buffer: Some(SeedBuffer(buffer)), ..seed7.clone() };
    let (a, b) = (cpu.dropout(&ones, &seed7).unwrap(), cpu.dropout(&ones, &via_buffer).unwrap());
    assert_eq!(a.cpu_data().unwrap(), b.cpu_data().unwrap());
    assert_ne!(a.cpu_data().unwrap(), cpu.dropout(&ones, &DropoutSpec { seed: 1, ..seed7 }).unwrap().cpu_data().unwrap());

    let (mut model, batch, labels) = parallel_model(cpu.clone(), "pfeiffer");
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    model.set_dropout(Some(1));
    model.train_step(&batch, &labels, &cfg(Objective::CrossEntropy), &mut opt).unwrap();
    for step in 2..5u64 {
        let before = cpu.transfer_counts();
        model.set_dropout(Some(step));
        model.train_step(&batch, &labels, &cfg(Objective::CrossEntropy), &mut opt).unwrap();
        let d = cpu.transfer_counts() - before;
        assert_eq!((d.uploads, d.upload_bytes, d.readbacks, d.new_buffers), (5, 8 + (3 * batch.batch * batch.seq_len + batch.batch) * 4, 0, 0), "seed, ids, types, mask, labels");
    }
    let (out, tape) = model.forward_train(&batch).unwrap();
    model.set_dropout(Some(99));
    let d = Tensor::from_vec(vec![1.0; out.last_hidden_state.elem_count()], out.last_hidden_state.shape()).unwrap();
    assert!(model.backward(&tape, &d, None).is_err(), "a tape of the previous seed");
}
