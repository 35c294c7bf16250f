//! The classification head and its cross-entropy (`bert_adapters::model::heads`).
//!
//! Gradient checks compare the backend's f32 backward with central finite differences of an
//! independent **f64** re-implementation of the head and the loss, written here from the formula.
//! Differencing in f64 (h = 1e-5) is accurate to ~1e-10, so the tolerance only has to cover the
//! f32 rounding of the analytic gradient; differencing the f32 forward with h = 1e-3 would need
//! a 1e-3 tolerance and hide real bugs. The f64 forward is itself tied to the crate's forward by
//! comparing logits.

mod common;

use std::collections::BTreeMap;

use bert_adapters::io::TensorFile;
use bert_adapters::model::heads::{cross_entropy, ClassificationHead, HeadConfig, HeadConfigFile, HeadDropout};
use bert_adapters::train::{AdamW, AdamWConfig, DropoutParams, DropoutRng};
use bert_adapters::{Activation, Backend, CpuBackend, Error, Tensor};
use rand::{Rng, SeedableRng};

fn backends() -> [(&'static str, CpuBackend); 2] {
    [("reference", CpuBackend::reference()), ("fast", CpuBackend::fast())]
}

fn t(data: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(data, shape).unwrap()
}

fn host(t: &Tensor) -> Vec<f64> {
    t.cpu_data().unwrap().iter().map(|&v| v as f64).collect()
}

// ---- the f64 oracle ----------------------------------------------------------------------------

/// The head in f64: `x [B, H]` → logits `[B, C]`, with the library's module layout.
struct Head64 {
    layers: usize,
    act: Activation,
    /// (weight [out, in], bias [out]) per Linear, in order.
    linears: Vec<(Vec<f64>, Vec<f64>, usize, usize)>,
    /// Training mode: the factor (0 or 1/(1−p)) of each element of each Linear's input.
    masks: [Option<Vec<f64>>; 2],
}

fn linear64(x: &[f64], rows: usize, w: &[f64], b: &[f64], d_out: usize, d_in: usize) -> Vec<f64> {
    let mut y = vec![0.0; rows * d_out];
    for r in 0..rows {
        for o in 0..d_out {
            y[r * d_out + o] = b[o] + (0..d_in).map(|i| x[r * d_in + i] * w[o * d_in + i]).sum::<f64>();
        }
    }
    y
}

impl Head64 {
    fn from(head: &ClassificationHead) -> Self {
        let name = head.name();
        let idx: &[usize] = if head.config().layers == 2 { &[1, 4] } else { &[1] };
        let linears = idx
            .iter()
            .map(|i| {
                let w = &head.params()[&format!("heads.{name}.{i}.weight")];
                let b = host(&head.params()[&format!("heads.{name}.{i}.bias")]);
                (host(w), b, w.shape()[0], w.shape()[1])
            })
            .collect();
        Head64 { layers: head.config().layers, act: head.config().activation().unwrap_or(Activation::Tanh), linears, masks: [None, None] }
    }

    fn logits(&self, x: &[f64], rows: usize) -> Vec<f64> {
        let mut h = x.to_vec();
        for (j, (w, b, o, i)) in self.linears.iter().enumerate() {
            if let Some(m) = &self.masks[j] {
                h = h.iter().zip(m).map(|(v, f)| v * f).collect();
            }
            h = linear64(&h, rows, w, b, *o, *i);
            if self.layers == 2 && j == 0 {
                h = h.into_iter().map(|v| self.act.apply_f64(v)).collect();
            }
        }
        h
    }
}

/// Mean softmax cross-entropy in f64, by the textbook formula.
fn ce64(logits: &[f64], c: usize, labels: &[usize]) -> f64 {
    let b = labels.len();
    (0..b)
        .map(|r| {
            let row = &logits[r * c..(r + 1) * c];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln() - row[labels[r]]
        })
        .sum::<f64>()
        / b as f64
}

/// Central difference of `f` at `v[i]`.
fn fd(v: &mut [f64], i: usize, f: &dyn Fn(&[f64]) -> f64) -> f64 {
    const H: f64 = 1e-5;
    let x0 = v[i];
    v[i] = x0 + H;
    let up = f(v);
    v[i] = x0 - H;
    let down = f(v);
    v[i] = x0;
    (up - down) / (2.0 * H)
}

fn assert_grad(label: &str, analytic: &[f32], numeric: &[f64]) {
    let a: Vec<f32> = analytic.to_vec();
    let n: Vec<f32> = numeric.iter().map(|&v| v as f32).collect();
    common::assert_close(label, &a, &n, 2e-5);
}

// ---- cross-entropy -----------------------------------------------------------------------------

#[test]
fn cross_entropy_gradient_matches_finite_differences() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let (b, c) = (5, 4);
    let logits: Vec<f32> = common::random_vec(&mut rng, b * c, 3.0);
    let labels = [0usize, 3, 1, 1, 2];
    for (name, be) in backends() {
        let (loss, d) = cross_entropy(&be, &t(logits.clone(), &[b, c]), &labels).unwrap();
        let mut l64: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
        let want = ce64(&l64, c, &labels);
        assert!((loss as f64 - want).abs() <= 1e-6 * want.abs(), "{name}: loss {loss} vs {want}");
        let numeric: Vec<f64> = (0..b * c).map(|i| fd(&mut l64, i, &|v| ce64(v, c, &labels))).collect();
        assert_grad(&format!("{name}: dlogits"), &d.cpu_data().unwrap(), &numeric);
        // (softmax − onehot)/B: every row sums to 0.
        for r in d.cpu_data().unwrap().chunks(c) {
            assert!(r.iter().sum::<f32>().abs() < 1e-7);
        }
    }
}

#[test]
fn cross_entropy_is_stable_for_huge_logits() {
    let be = CpuBackend::reference();
    let logits = t(vec![1e4, -1e4, 0.0, -1e4, -1e4, 1e4], &[2, 3]);
    let (loss, d) = cross_entropy(&be, &logits, &[0, 1]).unwrap();
    // Row 0 is certain and right (loss 0); row 1 is certain and wrong by 2e4.
    assert_eq!(loss, 1e4);
    assert_eq!(d.cpu_data().unwrap(), &[0.0, 0.0, 0.0, 0.0, -0.5, 0.5]);
}

#[test]
fn cross_entropy_errors() {
    let be = CpuBackend::fast();
    let logits = t(vec![0.0; 6], &[2, 3]);
    let e = cross_entropy(&be, &logits, &[0, 3]).unwrap_err();
    assert!(matches!(&e, Error::Input(m) if m.contains("label 3") && m.contains("3 classes")), "{e}");
    assert!(matches!(cross_entropy(&be, &logits, &[0]), Err(Error::Shape { .. })));
    assert!(matches!(cross_entropy(&be, &t(vec![0.0; 6], &[1, 2, 3]), &[0]), Err(Error::Shape { .. })));
    assert!(matches!(cross_entropy(&be, &t(vec![], &[0, 3]), &[]), Err(Error::Input(_))));
    let e = cross_entropy(&be, &t(vec![0.0, f32::NAN, 1.0], &[1, 3]), &[0]).unwrap_err();
    assert!(matches!(&e, Error::Input(m) if m.contains("[0, 1]")), "{e}");
}

// ---- the head ----------------------------------------------------------------------------------

/// A head with weights large enough that the activation is far from linear.
fn random_head(name: &str, config: HeadConfig, h: usize, seed: u64) -> ClassificationHead {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let params = ClassificationHead::expected_shapes(name, &config, h)
        .into_iter()
        .map(|(k, s)| {
            let n = s.iter().product();
            (k, t(common::random_vec(&mut rng, n, 0.6), &s))
        })
        .collect();
    ClassificationHead::from_params(name, config, params).unwrap()
}

#[test]
fn head_gradients_match_finite_differences() {
    let (b, seq, h, c) = (3, 4, 6, 3);
    let labels = [2usize, 0, 1];
    let mut cases = Vec::new();
    for layers in [1, 2] {
        for act in ["tanh", "relu", "gelu"] {
            for use_pooler in [false, true] {
                if layers == 1 && act != "tanh" {
                    continue; // the activation is unused with one layer
                }
                cases.push(HeadConfig { layers, activation: act.into(), use_pooler, ..HeadConfig::classification(c) });
            }
        }
    }
    for (ci, config) in cases.into_iter().enumerate() {
        let head = random_head("task", config.clone(), h, 10 + ci as u64);
        let oracle = Head64::from(&head);
        let mut rng = rand::rngs::StdRng::seed_from_u64(100 + ci as u64);
        let hidden = t(common::random_vec(&mut rng, b * seq * h, 1.5), &[b, seq, h]);
        let pooled = t(common::random_vec(&mut rng, b * h, 1.0), &[b, h]);
        // The head's input, in f64.
        let x64: Vec<f64> = if config.use_pooler {
            host(&pooled)
        } else {
            host(&hidden).chunks(seq * h).flat_map(|s| s[..h].to_vec()).collect()
        };
        for (bname, be) in backends() {
            let label = format!("{bname}, layers {}, {}, pooler {}", config.layers, config.activation, config.use_pooler);
            let (logits, tape) = head.forward(&be, &hidden, Some(&pooled)).unwrap();
            assert_eq!(logits.shape(), &[b, c]);
            let want: Vec<f32> = oracle.logits(&x64, b).iter().map(|&v| v as f32).collect();
            common::assert_close(&format!("{label}: logits"), &logits.cpu_data().unwrap(), &want, 1e-6);

            let (_, dlogits) = cross_entropy(&be, &logits, &labels).unwrap();
            let (grads, d_input) = head.backward(&be, &tape, &dlogits).unwrap();
            assert_eq!(grads.keys().collect::<Vec<_>>(), head.params().keys().collect::<Vec<_>>(), "{label}");

            // Parameter gradients: perturb one parameter of the f64 oracle at a time.
            for (key, g) in &grads {
                assert_eq!(g.shape(), head.params()[key].shape(), "{label}: {key}");
                // Linear 0 is module 1 (both layouts), linear 1 is module 4.
                let (lin, is_bias) = (usize::from(key.contains(".4.")), key.ends_with(".bias"));
                let numeric: Vec<f64> = (0..g.elem_count())
                    .map(|e| {
                        let mut o = Head64::from(&head);
                        let mut loss_at = |delta: f64| {
                            let l = &mut o.linears[lin];
                            let v = if is_bias { &mut l.1 } else { &mut l.0 };
                            v[e] += delta;
                            let loss = ce64(&o.logits(&x64, b), c, &labels);
                            let l = &mut o.linears[lin];
                            let v = if is_bias { &mut l.1 } else { &mut l.0 };
                            v[e] -= delta;
                            loss
                        };
                        (loss_at(1e-5) - loss_at(-1e-5)) / 2e-5
                    })
                    .collect();
                assert_grad(&format!("{label}: {key}"), &g.cpu_data().unwrap(), &numeric);
            }

            // Input gradient: [B, T, H] zero except token 0, or [B, H] for the pooler.
            let mut xv = x64.clone();
            let numeric: Vec<f64> = (0..b * h).map(|i| fd(&mut xv, i, &|v| ce64(&oracle.logits(v, b), c, &labels))).collect();
            let d = d_input.cpu_data().unwrap();
            if config.use_pooler {
                assert_eq!(d_input.shape(), &[b, h]);
                assert_grad(&format!("{label}: d pooler"), &d, &numeric);
            } else {
                assert_eq!(d_input.shape(), &[b, seq, h]);
                let first: Vec<f32> = d.chunks(seq * h).flat_map(|s| s[..h].to_vec()).collect();
                assert_grad(&format!("{label}: d last_hidden_state[:, 0]"), &first, &numeric);
                assert!(d.chunks(seq * h).all(|s| s[h..].iter().all(|&v| v == 0.0)), "{label}: positions > 0 must get no gradient");
            }
        }
    }
}

/// The factors of Dropout module `module` of `d` over `n` elements, from the crate's generator
/// (`DropoutRng`) by the spec's stream: 0 where dropped, `f32(1/(1−p))` where kept.
fn dropout_factors(d: &HeadDropout, module: usize, n: usize) -> Vec<f64> {
    let spec = d.spec(module).unwrap();
    let scale = DropoutParams::new(spec.p).unwrap().scale as f64;
    DropoutRng::new(spec.seed).keep_mask(spec.block_stream(0), n, spec.p).unwrap().into_iter().map(|k| if k { scale } else { 0.0 }).collect()
}

/// Training mode: with a fixed seed the masks are fixed, so the dropped-out loss is a smooth
/// function of the parameters and the input, and the backward (through the same masks) must be
/// its derivative. The oracle applies the masks drawn from `DropoutRng` at the documented stream.
#[test]
fn head_gradients_with_dropout_match_finite_differences_of_the_dropped_out_loss() {
    let (b, seq, h, c) = (3, 4, 6, 3);
    let labels = [2usize, 0, 1];
    let dropout = HeadDropout { seed: 42, seed_buffer: None, p: 0.3, branch: 1, offset: 0 };
    for (ci, (layers, act, use_pooler)) in [(2, "tanh", false), (2, "gelu", true), (1, "tanh", false), (1, "tanh", true)].into_iter().enumerate() {
        let config = HeadConfig { layers, activation: act.into(), use_pooler, ..HeadConfig::classification(c) };
        let head = random_head("task", config, h, 30 + ci as u64);
        let with_masks = |head: &ClassificationHead| {
            let mut o = Head64::from(head);
            o.masks = [Some(dropout_factors(&dropout, 0, b * h)), (layers == 2).then(|| dropout_factors(&dropout, 3, b * h))];
            o
        };
        let oracle = with_masks(&head);
        for m in oracle.masks.iter().flatten() {
            assert!(m.contains(&0.0) && m.iter().any(|&f| f > 1.0), "p = 0.3 over {} elements drops some and keeps some", m.len());
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(200 + ci as u64);
        let hidden = t(common::random_vec(&mut rng, b * seq * h, 1.5), &[b, seq, h]);
        let pooled = t(common::random_vec(&mut rng, b * h, 1.0), &[b, h]);
        let x64: Vec<f64> = if use_pooler { host(&pooled) } else { host(&hidden).chunks(seq * h).flat_map(|s| s[..h].to_vec()).collect() };
        for (bname, be) in backends() {
            let label = format!("{bname}, layers {layers}, {act}, pooler {use_pooler}, dropout");
            let (logits, tape) = head.forward_with(&be, &hidden, Some(&pooled), Some(&dropout)).unwrap();
            let want: Vec<f32> = oracle.logits(&x64, b).iter().map(|&v| v as f32).collect();
            common::assert_close(&format!("{label}: logits"), &logits.cpu_data().unwrap(), &want, 1e-6);
            let (eval, _) = head.forward(&be, &hidden, Some(&pooled)).unwrap();
            assert_ne!(&*eval.cpu_data().unwrap(), &*logits.cpu_data().unwrap(), "{label}: dropout changed nothing");

            let (_, dlogits) = cross_entropy(&be, &logits, &labels).unwrap();
            let (grads, d_input) = head.backward(&be, &tape, &dlogits).unwrap();
            assert_eq!(grads.len(), head.params().len(), "{label}");
            for (key, g) in &grads {
                let (lin, is_bias) = (usize::from(key.contains(".4.")), key.ends_with(".bias"));
                let numeric: Vec<f64> = (0..g.elem_count())
                    .map(|e| {
                        let loss_at = |delta: f64| {
                            let mut o = with_masks(&head);
                            let l = &mut o.linears[lin];
                            (if is_bias { &mut l.1 } else { &mut l.0 })[e] += delta;
                            ce64(&o.logits(&x64, b), c, &labels)
                        };
                        (loss_at(1e-5) - loss_at(-1e-5)) / 2e-5
                    })
                    .collect();
                assert_grad(&format!("{label}: {key}"), &g.cpu_data().unwrap(), &numeric);
            }
            let mut xv = x64.clone();
            let numeric: Vec<f64> = (0..b * h).map(|i| fd(&mut xv, i, &|v| ce64(&oracle.logits(v, b), c, &labels))).collect();
            let d = d_input.cpu_data().unwrap();
            let first: Vec<f32> = if use_pooler { d.to_vec() } else { d.chunks(seq * h).flat_map(|s| s[..h].to_vec()).collect() };
            assert_grad(&format!("{label}: input gradient"), &first, &numeric);
            // A dropped input element gets no gradient at all.
            for (i, f) in oracle.masks[0].as_ref().unwrap().iter().enumerate() {
                assert!(*f != 0.0 || first[i] == 0.0, "{label}: dropped input {i} has gradient {}", first[i]);
            }
        }
    }
}

/// p = 0 is an exact identity (no draws, no scale): training mode equals eval mode bit for bit,
/// forward and backward. The masks are a function of (seed, module, branch) only.
#[test]
fn head_dropout_with_p_zero_is_eval_and_masks_depend_on_seed_and_branch_only() {
    let be = CpuBackend::fast();
    let head = random_head("x", HeadConfig::classification(4), 8, 5);
    let hidden = t(common::random_vec(&mut rand::rngs::StdRng::seed_from_u64(6), 2 * 3 * 8, 1.0), &[2, 3, 8]);
    let run = |d: Option<&HeadDropout>| {
        let (logits, tape) = head.forward_with(&be, &hidden, None, d).unwrap();
        let (_, dl) = cross_entropy(&be, &logits, &[1, 3]).unwrap();
        let (g, dx) = head.backward(&be, &tape, &dl).unwrap();
        let mut all = vec![logits.cpu_data().unwrap().to_vec(), dx.cpu_data().unwrap().to_vec()];
        all.extend(g.values().map(|t| t.cpu_data().unwrap().to_vec()));
        all
    };
    let eval = run(None);
    assert_eq!(run(Some(&HeadDropout { seed: 9, seed_buffer: None, p: 0.0, branch: 0, offset: 0 })), eval);
    let d = HeadDropout { seed: 9, seed_buffer: None, p: 0.5, branch: 0, offset: 0 };
    assert_eq!(run(Some(&d)), run(Some(&d)), "the same seed and branch draw the same masks");
    assert_ne!(run(Some(&d)), eval);
    assert_ne!(run(Some(&HeadDropout { branch: 1, ..d.clone() })), run(Some(&d)), "another branch draws other masks");
    assert_ne!(run(Some(&HeadDropout { seed: 10, ..d.clone() })), run(Some(&d)), "another seed draws other masks");
    assert!(d.spec(0).unwrap().stream != d.spec(3).unwrap().stream && d.spec(1).is_none() && HeadDropout { p: 0.0, ..d.clone() }.spec(0).is_none());
}

#[test]
fn head_backward_runs_exactly_the_needed_products() {
    let be = CpuBackend::fast();
    let head = random_head("x", HeadConfig::classification(4), 8, 3);
    let hidden = t(vec![0.1; 2 * 3 * 8], &[2, 3, 8]);
    let before = be.gemm_counts();
    let (logits, tape) = head.forward(&be, &hidden, None).unwrap();
    let (_, d) = cross_entropy(&be, &logits, &[1, 3]).unwrap();
    head.backward(&be, &tape, &d).unwrap();
    let n = be.gemm_counts() - before;
    // [forward, input-gradient, weight-gradient] products.
    assert_eq!(n.calls, [2, 2, 2]);
}

#[test]
fn matches_the_library_head_and_loss() {
    let dir = common::committed_fixture("training");
    let read = |f: &TensorFile, n: &str| {
        let (d, s) = common::read_f32(f, n);
        t(d, &s)
    };
    let head_of = |name: &str| {
        let f = TensorFile::open(common::committed_fixture(&format!("training/head_{name}.safetensors"))).unwrap();
        let params: BTreeMap<String, Tensor> = f.names().into_iter().map(|n| (n.clone(), read(&f, &n))).collect();
        let text = std::fs::read_to_string(common::committed_fixture(&format!("training/head_{name}_config.json"))).unwrap();
        let cfg = HeadConfigFile::from_json(&dir.join(format!("head_{name}_config.json")), &text).unwrap();
        ClassificationHead::from_params(name, cfg.config, params).unwrap()
    };
    // (file, [(head, rows of cls_output, logits tensor)])
    type Branch = (&'static str, std::ops::Range<usize>, &'static str);
    let cases: [(&str, Vec<Branch>); 2] = [
        ("ce_pfeiffer.safetensors", vec![("pfeiffer", 0..4, "logits")]),
        (
            "ce_parallel_pfeiffer_inv__pfeiffer__train_pfeiffer_inv.safetensors",
            vec![("pfeiffer_inv", 0..4, "logits.0"), ("pfeiffer", 4..8, "logits.1")],
        ),
    ];
    for (fname, heads) in cases {
        let f = TensorFile::open(common::committed_fixture(&format!("training/{fname}"))).unwrap();
        let labels: Vec<usize> = f.read_i64("labels").unwrap().0.into_iter().map(|l| l as usize).collect();
        let cls = read(&f, "cls_output");
        for (bname, be) in backends() {
            let mut loss = 0f32;
            for (name, rows, logits_name) in &heads {
                let head = head_of(name);
                // cls_output is already the first token; present it as sequences of length 1.
                let x = be.select_rows(&cls, std::slice::from_ref(rows)).unwrap();
                let x = x.reshape(&[rows.len(), 1, 48]).unwrap();
                let (logits, tape) = head.forward(&be, &x, None).unwrap();
                let label = format!("{fname} {bname} head {name}");
                common::assert_close(&format!("{label}: logits"), &logits.cpu_data().unwrap(), &read(&f, logits_name).cpu_data().unwrap(), 1e-5);
                let (l, d) = cross_entropy(&be, &logits, &labels).unwrap();
                loss += l;
                let (grads, _) = head.backward(&be, &tape, &d).unwrap();
                for (k, g) in &grads {
                    common::assert_close(&format!("{label}: {k}"), &g.cpu_data().unwrap(), &read(&f, &format!("grad.{k}")).cpu_data().unwrap(), 1e-5);
                }
            }
            // Under Parallel the library's loss is the sum of the heads' mean losses.
            let want = read(&f, "loss").cpu_data().unwrap()[0];
            assert!((loss - want).abs() <= 1e-5 * (1.0 + want.abs()), "{fname} {bname}: loss {loss} vs {want}");
        }
    }
}

#[test]
fn head_config_json_round_trips_like_the_library() {
    let path = common::committed_fixture("training/head_pfeiffer_config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let f = HeadConfigFile::from_json(&path, &text).unwrap();
    let c = &f.config;
    assert_eq!((c.head_type.as_str(), c.num_labels, c.layers, c.activation.as_str(), c.use_pooler, c.bias), ("classification", 3, 2, "tanh", false, true));
    assert_eq!(c.dropout_prob, None);
    assert_eq!(c.label2id.as_ref().unwrap()["LABEL_2"], 2);
    assert_eq!((f.hidden_size, f.name.as_str(), f.model_class.as_str()), (48, "pfeiffer", "BertAdapterModel"));
    // `json.dump(indent=2, sort_keys=True)` and serde's pretty printer agree byte for byte.
    assert_eq!(f.to_json().unwrap(), text);

    // Missing optional fields take the library's defaults.
    let c: HeadConfig = serde_json::from_str(r#"{"num_labels": 5}"#).unwrap();
    assert_eq!(c, HeadConfig::classification(5));
    let v = serde_json::to_value(HeadConfig::classification(2)).unwrap();
    assert_eq!(v["activation_function"], "tanh");
    assert_eq!(v["head_type"], "classification");
    assert!(v["label2id"].is_null() && v["dropout_prob"].is_null());

    // Malformed JSON names the file.
    let e = HeadConfigFile::from_json(&path, "{").unwrap_err();
    assert!(matches!(&e, Error::Malformed { path: p, .. } if p == &path), "{e}");
}

#[test]
fn head_config_validation() {
    let ok = HeadConfig::classification(3);
    ok.validate().unwrap();
    let bad = [
        (HeadConfig { layers: 3, ..ok.clone() }, "layers = 3"),
        (HeadConfig { layers: 0, ..ok.clone() }, "layers = 0"),
        (HeadConfig { activation: "swish".into(), ..ok.clone() }, "swish"),
        (HeadConfig { activation: String::new(), ..ok.clone() }, "null"),
        (HeadConfig { num_labels: 1, ..ok.clone() }, "regression"),
        (HeadConfig { num_labels: 0, ..ok.clone() }, "num_labels = 0"),
        (HeadConfig { head_type: "tagging".into(), ..ok.clone() }, "tagging"),
        (HeadConfig { dropout_prob: Some(1.0), ..ok.clone() }, "dropout_prob"),
    ];
    for (cfg, needle) in bad {
        let e = cfg.validate().unwrap_err();
        assert!(e.to_string().contains(needle), "expected `{needle}` in: {e}");
        assert!(ClassificationHead::new(&CpuBackend::fast(), "x", cfg, 8, 0).is_err());
    }
    // Case-insensitive like the library; the activation is irrelevant with one layer.
    HeadConfig { activation: "GELU".into(), ..ok.clone() }.validate().unwrap();
    HeadConfig { layers: 1, activation: "swish".into(), ..ok.clone() }.validate().unwrap();
    let c: HeadConfig = serde_json::from_str(r#"{"num_labels": 2, "activation_function": null}"#).unwrap();
    assert!(c.validate().unwrap_err().to_string().contains("null"));
}

#[test]
fn new_head_keys_shapes_and_init() {
    let be = CpuBackend::fast();
    let (h, c) = (64, 5);
    let head = ClassificationHead::new(&be, "sst2", HeadConfig::classification(c), h, 7).unwrap();
    let shapes: Vec<(String, Vec<usize>)> = head.params().iter().map(|(k, v)| (k.clone(), v.shape().to_vec())).collect();
    assert_eq!(
        shapes,
        vec![
            ("heads.sst2.1.bias".to_string(), vec![h]),
            ("heads.sst2.1.weight".to_string(), vec![h, h]),
            ("heads.sst2.4.bias".to_string(), vec![c]),
            ("heads.sst2.4.weight".to_string(), vec![c, h]),
        ]
    );
    let w = host(&head.params()["heads.sst2.1.weight"]);
    let mean = w.iter().sum::<f64>() / w.len() as f64;
    let std = (w.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
    assert!(mean.abs() < 0.002 && (std - 0.02).abs() < 0.001, "N(0, 0.02) expected, got mean {mean}, std {std}");
    assert!(host(&head.params()["heads.sst2.4.bias"]).iter().all(|&v| v == 0.0));
    let again = ClassificationHead::new(&be, "sst2", HeadConfig::classification(c), h, 7).unwrap();
    assert_eq!(host(&again.params()["heads.sst2.4.weight"]), host(&head.params()["heads.sst2.4.weight"]));
    let other = ClassificationHead::new(&be, "sst2", HeadConfig::classification(c), h, 8).unwrap();
    assert_ne!(host(&other.params()["heads.sst2.4.weight"]), host(&head.params()["heads.sst2.4.weight"]));

    let one = ClassificationHead::new(&be, "t", HeadConfig { layers: 1, ..HeadConfig::classification(c) }, h, 0).unwrap();
    assert_eq!(one.params().keys().collect::<Vec<_>>(), vec!["heads.t.1.bias", "heads.t.1.weight"]);
    assert_eq!(one.params()["heads.t.1.weight"].shape(), &[c, h]);
    let nobias = ClassificationHead::new(&be, "t", HeadConfig { bias: false, ..HeadConfig::classification(c) }, h, 0).unwrap();
    assert!(!nobias.params().contains_key("heads.t.4.bias"));
    let (logits, tape) = nobias.forward(&be, &t(vec![0.5; 2 * h], &[2, 1, h]), None).unwrap();
    let (grads, _) = nobias.backward(&be, &tape, &logits).unwrap();
    assert!(!grads.contains_key("heads.t.4.bias") && grads.len() == 3);

    for bad in ["", "a.b"] {
        assert!(matches!(ClassificationHead::new(&be, bad, HeadConfig::classification(2), h, 0), Err(Error::Input(_))), "name `{bad}`");
    }
    assert!(matches!(ClassificationHead::new(&be, "x", HeadConfig::classification(2), 0, 0), Err(Error::Input(_))));
}

#[test]
fn from_params_validates() {
    let be = CpuBackend::fast();
    let cfg = HeadConfig::classification(3);
    let good = ClassificationHead::new(&be, "h", cfg.clone(), 8, 0).unwrap().params().clone();
    ClassificationHead::from_params("h", cfg.clone(), good.clone()).unwrap();

    let mut missing = good.clone();
    missing.remove("heads.h.1.bias");
    let e = ClassificationHead::from_params("h", cfg.clone(), missing).unwrap_err();
    assert!(e.to_string().contains("heads.h.1.bias"), "{e}");

    let mut wrong = good.clone();
    wrong.insert("heads.h.1.weight".into(), Tensor::zeros(&[8, 7]));
    let e = ClassificationHead::from_params("h", cfg.clone(), wrong).unwrap_err();
    assert!(matches!(&e, Error::Shape { msg, .. } if msg.contains("heads.h.1.weight")), "{e}");

    let mut extra = good.clone();
    extra.insert("heads.h.2.weight".into(), Tensor::zeros(&[1]));
    let e = ClassificationHead::from_params("h", cfg.clone(), extra).unwrap_err();
    assert!(e.to_string().contains("heads.h.2.weight"), "{e}");

    // Tensors of another head name are not this head's.
    let e = ClassificationHead::from_params("g", cfg, good).unwrap_err();
    assert!(e.to_string().contains("heads.g.4.weight"), "{e}");
}

#[test]
fn forward_and_backward_shape_errors() {
    let be = CpuBackend::reference();
    let head = ClassificationHead::new(&be, "h", HeadConfig::classification(3), 8, 0).unwrap();
    for shape in [vec![2, 8], vec![2, 3, 7], vec![2, 0, 8]] {
        let x = Tensor::zeros(&shape);
        assert!(matches!(head.forward(&be, &x, None), Err(Error::Shape { .. })), "{shape:?}");
    }
    let (logits, tape) = head.forward(&be, &Tensor::zeros(&[2, 3, 8]), None).unwrap();
    assert!(matches!(head.backward(&be, &tape, &Tensor::zeros(&[3, 3])), Err(Error::Shape { .. })));
    assert!(matches!(head.backward(&be, &tape, &Tensor::zeros(&[2, 4])), Err(Error::Shape { .. })));
    // A tape from a head of another layout is refused rather than misread.
    let one = ClassificationHead::new(&be, "h", HeadConfig { layers: 1, ..HeadConfig::classification(3) }, 8, 0).unwrap();
    assert!(one.backward(&be, &tape, &logits).is_err());

    let pooled = ClassificationHead::new(&be, "p", HeadConfig { use_pooler: true, ..HeadConfig::classification(3) }, 8, 0).unwrap();
    let e = pooled.forward(&be, &Tensor::zeros(&[2, 3, 8]), None).unwrap_err();
    assert!(matches!(&e, Error::Input(m) if m.contains("use_pooler")), "{e}");
    assert!(matches!(pooled.forward(&be, &Tensor::zeros(&[2, 3, 8]), Some(&Tensor::zeros(&[2, 7]))), Err(Error::Shape { .. })));
    let (l, _) = pooled.forward(&be, &Tensor::zeros(&[2, 3, 8]), Some(&Tensor::zeros(&[2, 8]))).unwrap();
    assert_eq!(l.shape(), &[2, 3]);

    // A parameter removed through params_mut is an error, not a panic.
    let mut broken = head.clone();
    broken.params_mut().remove("heads.h.4.weight");
    assert!(matches!(broken.forward(&be, &Tensor::zeros(&[2, 3, 8]), None), Err(Error::Input(_))));
}

#[test]
fn adamw_trains_the_head() {
    // The head and the optimizer fit together: a few steps on a fixed batch lower the loss.
    let be = CpuBackend::fast();
    let mut head = ClassificationHead::new(&be, "h", HeadConfig::classification(3), 16, 0).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let x = t((0..4 * 2 * 16).map(|_| rng.random_range(-1.0f32..1.0)).collect(), &[4, 2, 16]);
    let labels = [0usize, 1, 2, 1];
    let mut opt = AdamW::new(AdamWConfig { lr: 1e-2, ..Default::default() }).unwrap();
    let mut losses = Vec::new();
    for _ in 0..20 {
        let (logits, tape) = head.forward(&be, &x, None).unwrap();
        let (loss, d) = cross_entropy(&be, &logits, &labels).unwrap();
        losses.push(loss);
        let (grads, _) = head.backward(&be, &tape, &d).unwrap();
        opt.step(head.params_mut(), &grads).unwrap();
    }
    assert!(losses[19] < 0.5 * losses[0], "loss {} -> {}", losses[0], losses[19]);
}
