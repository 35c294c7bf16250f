//! The CUDA model backend (`cuda::backend::CudaBackend`) against the CPU backend, op by op, from
//! one test body per device (`test_device!`: the `cuda-sim` executor in CI, a GPU when present).
//! Tolerance `max|out − ref| <= 1e-5·(1 + max|ref|)`; data movement ops must be bit-exact.

mod common;
#[path = "support/bf16.rs"]
mod rule;

use bert_adapters::backend::{Backend, LayerNormParams};
use bert_adapters::cpu::CpuBackend;
use bert_adapters::cuda::adapter::LocationPath;
use bert_adapters::cuda::backend::CudaBackend;
use bert_adapters::cuda::gpu::Gpu;
use bert_adapters::{test_device, Activation, DType, Error, Tensor};
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn assert_close(label: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    let tol = 1e-5 * (1.0 + want.iter().fold(0f32, |m, v| m.max(v.abs())));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{label}: [{i}] = {g}, CPU {w}, tol {tol:e}");
    }
}

fn backend(gpu: &Gpu) -> CudaBackend {
    // The backend owns its Gpu: a handle with the same settings (the schedule on cuda-sim).
    CudaBackend::on(gpu.reopen().unwrap())
}

fn memory_ops_round_trip(gpu: &Gpu) {
    let be = backend(gpu);
    let data: Vec<f32> = (0..24).map(|i| i as f32 - 3.5).collect();
    let t = be.upload(data.clone(), &[2, 3, 4]).unwrap();
    assert_eq!(t.device(), be.device());
    assert_eq!(be.to_host(&t).unwrap(), data);
    let ids = be.upload_u32(vec![7, 0, u32::MAX], &[3]).unwrap();
    assert_eq!(be.to_host_u32(&ids).unwrap(), vec![7, 0, u32::MAX]);
    let z = be.zeros(&[5], DType::BF16).unwrap();
    assert_eq!(be.to_host(&z).unwrap(), vec![0.0; 5]);
    // A view of rows, written through the backend.
    be.write_f32(&t.view(4, &[4]).unwrap(), &[9.0; 4]).unwrap();
    be.fill(&t.view(20, &[4]).unwrap(), 0.0).unwrap();
    let got = be.to_host(&t).unwrap();
    assert_eq!(&got[4..8], &[9.0; 4]);
    assert_eq!(&got[20..], &[0.0; 4]);
    assert_eq!(&got[..4], &data[..4]);
    // Gathers are bit-exact copies.
    let first = be.to_host(&be.first_token(&t).unwrap()).unwrap();
    assert_eq!(first, [&got[0..4], &got[12..16]].concat());
    let rows = be.upload(data.clone(), &[6, 4]).unwrap();
    let picked = be.to_host(&be.select_rows(&rows, &[4..6, 0..1]).unwrap()).unwrap();
    assert_eq!(picked, [&data[16..24], &data[0..4]].concat());
    assert!(be.all_finite(&t).unwrap());
    assert!(!be.all_finite(&be.upload(vec![1.0, f32::NAN], &[2]).unwrap()).unwrap());
}
test_device!(memory_ops, memory_ops_round_trip);

fn bad_inputs_are_errors(gpu: &Gpu) {
    let be = backend(gpu);
    assert!(matches!(be.upload(vec![1.0; 5], &[2, 3]), Err(Error::Shape { .. })));
    let cpu = Tensor::from_vec(vec![1.0; 6], &[2, 3]).unwrap();
    let e = be.to_host(&cpu).unwrap_err().to_string();
    assert!(e.contains("on cpu") && e.contains(&be.device().to_string()), "{e}");
    let t = be.upload(vec![1.0; 6], &[2, 3]).unwrap();
    assert!(be.select_rows(&t, &[0..1, 1..3]).is_err());
    let w = be.upload(vec![1.0; 8], &[2, 4]).unwrap();
    assert!(matches!(be.linear(&t, &w, None), Err(Error::Shape { .. })), "in-features 3 vs 4");
    // An op the device does not have yet (unpacked attention) is refused by name, never
    // answered wrongly.
    let q = be.upload(vec![0.5; 12], &[1, 2, 6]).unwrap();
    let mask = be.upload(vec![0.0; 2], &[1, 2]).unwrap();
    let e = be.attention(&q, &q, &q, &mask, 2, None).unwrap_err().to_string();
    assert!(e.contains("attention is not implemented on the CUDA backend"), "{e}");
}
test_device!(bad_inputs, bad_inputs_are_errors);

fn linear_and_layernorm_match_the_cpu(gpu: &Gpu) {
    let be = backend(gpu);
    let cpu = CpuBackend::reference();
    let mut rng = StdRng::seed_from_u64(0x11ea);
    for (rows, d_in, d_out) in [(1, 40, 48), (7, 48, 40), (33, 384, 48)] {
        let (x, w, b) = (random(&mut rng, rows * d_in, 1.0), random(&mut rng, d_out * d_in, 0.5), random(&mut rng, d_out, 0.5));
        let on = |be: &dyn Backend| -> (Vec<f32>, Vec<f32>) {
            let (x, w, b) = (be.upload(x.clone(), &[rows, d_in]).unwrap(), be.upload(w.clone(), &[d_out, d_in]).unwrap(), be.upload(b.clone(), &[d_out]).unwrap());
            let y = be.linear(&x, &w, Some(&b)).unwrap();
            let gamma = be.upload((0..d_out).map(|i| 1.0 + i as f32 / 100.0).collect(), &[d_out]).unwrap();
            let beta = be.upload((0..d_out).map(|i| i as f32 / 50.0 - 0.3).collect(), &[d_out]).unwrap();
            let res = be.upload(vec![0.25; rows * d_out], &[rows, d_out]).unwrap();
            let ln = be.residual_layernorm(&y, Some(&res), &gamma, &beta, 1e-12).unwrap();
            (be.to_host(&y).unwrap(), be.to_host(&ln).unwrap())
        };
        let (gy, gln) = on(&be);
        let (wy, wln) = on(&cpu);
        let label = format!("{} rows={rows} in={d_in} out={d_out}", gpu.describe());
        assert_close(&format!("{label} linear"), &gy, &wy);
        assert_close(&format!("{label} layernorm"), &gln, &wln);
    }
}
test_device!(linear_and_layernorm, linear_and_layernorm_match_the_cpu);

// ---- a frozen base stored in bf16 (issue 13) ------------------------------------------------
// The CUDA backend against the CPU backend on the same bf16 tensors (each backend rounds the same
// f32 values with round-to-nearest-even, so both hold identical bits); every op widens bf16
// exactly and computes in f32, so the fp32 tolerance applies.

/// `data` on `be`, stored as bf16.
fn bf16_on(be: &dyn Backend, data: &[f32], shape: &[usize]) -> Tensor {
    let t = be.cast(&be.upload(data.to_vec(), shape).unwrap(), DType::BF16).unwrap();
    assert_eq!(t.dtype(), DType::BF16);
    t
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn bf16_linear_matches_the_cpu(gpu: &Gpu) {
    let be = backend(gpu);
    let cpu = CpuBackend::reference();
    let mut rng = StdRng::seed_from_u64(0xbf16);
    for rows in [1, 7, 33] {
        for hidden in [40, 48, 384] {
            let (d_in, d_out) = (hidden, 3 * hidden);
            let (x, w, b) = (random(&mut rng, rows * d_in, 1.0), random(&mut rng, d_out * d_in, 0.5), random(&mut rng, d_out, 0.5));
            // linear (bf16 W and b), linear without bias, linear_act (GELU, both outputs),
            // linear_act_only (tanh, the pooler's), and a bf16 W with an f32 bias.
            let on = |be: &dyn Backend| -> Vec<Vec<f32>> {
                let xt = be.upload(x.clone(), &[rows, d_in]).unwrap();
                let (wt, bt) = (bf16_on(be, &w, &[d_out, d_in]), bf16_on(be, &b, &[d_out]));
                let b32 = be.upload(b.clone(), &[d_out]).unwrap();
                let (act, pre) = be.linear_act(&xt, &wt, Some(&bt), Activation::Gelu).unwrap();
                let outs = [
                    be.linear(&xt, &wt, Some(&bt)).unwrap(),
                    be.linear(&xt, &wt, None).unwrap(),
                    act,
                    pre,
                    be.linear_act_only(&xt, &wt, Some(&bt), Activation::Tanh).unwrap(),
                    be.linear(&xt, &wt, Some(&b32)).unwrap(),
                ];
                outs.iter().map(|t| be.to_host(t).unwrap()).collect()
            };
            let (got, want) = (on(&be), on(&cpu));
            let label = format!("{} rows={rows} H={hidden}", gpu.describe());
            for (i, what) in ["linear", "linear without bias", "linear_act", "linear_act pre", "linear_act_only", "linear with f32 bias"].iter().enumerate() {
                assert_close(&format!("{label} bf16 {what}"), &got[i], &want[i]);
            }
            // The bf16 weights are really used: f32 weights give a visibly different product.
            let f32_product = cpu.to_host(&cpu.linear(&cpu.upload(x.clone(), &[rows, d_in]).unwrap(), &cpu.upload(w.clone(), &[d_out, d_in]).unwrap(), None).unwrap()).unwrap();
            assert!(max_diff(&got[1], &f32_product) > 1e-4, "{label}: the bf16 product equals the f32 one");
        }
    }
}
test_device!(bf16_linear, bf16_linear_matches_the_cpu);

fn bf16_layernorm_matches_the_cpu(gpu: &Gpu) {
    let be = backend(gpu);
    let cpu = CpuBackend::reference();
    let mut rng = StdRng::seed_from_u64(0x1a4e);
    // Warp per row (<= 1024), block per row with the row cached (1500), and without (13000).
    for (rows, cols) in [(1, 40), (7, 48), (33, 384), (3, 1500), (2, 13000)] {
        let (x, res) = (random(&mut rng, rows * cols, 2.0), random(&mut rng, rows * cols, 1.0));
        let gamma: Vec<f32> = (0..cols).map(|_| 1.0 + rng.random_range(-0.3f32..0.3)).collect();
        let beta = random(&mut rng, cols, 0.3);
        let on = |be: &dyn Backend| -> [Vec<f32>; 2] {
            let (xt, rt) = (be.upload(x.clone(), &[rows, cols]).unwrap(), be.upload(res.clone(), &[rows, cols]).unwrap());
            let (g, b) = (bf16_on(be, &gamma, &[cols]), bf16_on(be, &beta, &[cols]));
            [be.residual_layernorm(&xt, Some(&rt), &g, &b, 1e-12).unwrap(), be.residual_layernorm(&xt, None, &g, &b, 1e-5).unwrap()].map(|t| be.to_host(&t).unwrap())
        };
        let ([got_res, got_plain], [want_res, want_plain]) = (on(&be), on(&cpu));
        let label = format!("{} rows={rows} cols={cols}", gpu.describe());
        assert_close(&format!("{label} bf16 residual_layernorm"), &got_res, &want_res);
        assert_close(&format!("{label} bf16 layernorm"), &got_plain, &want_plain);
    }
}
test_device!(bf16_layernorm, bf16_layernorm_matches_the_cpu);

fn bf16_embeddings_match_the_cpu(gpu: &Gpu) {
    let be = backend(gpu);
    let cpu = CpuBackend::reference();
    let mut rng = StdRng::seed_from_u64(0xe4b);
    for (batch, seq_len, hidden) in [(2, 7, 48), (3, 5, 384), (1, 4, 1100)] {
        let (vocab, positions, types) = (30, 16, 2);
        let ids: Vec<u32> = (0..batch * seq_len).map(|_| rng.random_range(0..vocab as u32)).collect();
        let tts: Vec<u32> = (0..batch * seq_len).map(|i| (i % 3 == 1) as u32).collect();
        let (word, pos, tt) = (random(&mut rng, vocab * hidden, 1.0), random(&mut rng, positions * hidden, 0.5), random(&mut rng, types * hidden, 0.5));
        let gamma: Vec<f32> = (0..hidden).map(|_| 1.0 + rng.random_range(-0.3f32..0.3)).collect();
        let beta = random(&mut rng, hidden, 0.3);
        let on = |be: &dyn Backend| -> Vec<f32> {
            let (it, tyt) = (be.upload_u32(ids.clone(), &[batch, seq_len]).unwrap(), be.upload_u32(tts.clone(), &[batch, seq_len]).unwrap());
            let (w, p, t) = (bf16_on(be, &word, &[vocab, hidden]), bf16_on(be, &pos, &[positions, hidden]), bf16_on(be, &tt, &[types, hidden]));
            let (g, b) = (bf16_on(be, &gamma, &[hidden]), bf16_on(be, &beta, &[hidden]));
            let ln = LayerNormParams { gamma: &g, beta: &b, eps: 1e-12 };
            be.to_host(&be.embedding_layernorm(&it, &tyt, &w, &p, &t, bert_adapters::Positions::Sequential, ln, None).unwrap()).unwrap()
        };
        assert_close(&format!("{} B={batch} T={seq_len} H={hidden} bf16 embedding_layernorm", gpu.describe()), &on(&be), &on(&cpu));
    }
}
test_device!(bf16_embeddings, bf16_embeddings_match_the_cpu);

fn bf16_adapter_location_matches_the_cpu(gpu: &Gpu) {
    for path in [LocationPath::Fused, LocationPath::Split] {
        bf16_adapter_location_on(gpu, path);
    }
}

fn bf16_adapter_location_on(gpu: &Gpu, path: LocationPath) {
    use bert_adapters::backend::{AdapterLocation, LocationSteps};
    use bert_adapters::config::ResidualBeforeLn;
    let be = backend(gpu).with_location_path(path);
    let cpu = CpuBackend::reference();
    let mut rng = StdRng::seed_from_u64(0xada);
    let (batch, seq_len, hidden, m) = (2, 5, 48, 6);
    let rows = batch * seq_len;
    // Two branches with every parameterised option (LayerNorms, gate, channel scaling).
    let branches: Vec<Vec<(Vec<f32>, Vec<usize>)>> = (0..2)
        .map(|_| common::FullBranch::new(&mut rng, hidden, m, 0.5).0.iter().map(|t| (t.cpu_data().unwrap().to_vec(), t.shape().to_vec())).collect())
        .collect();
    let (h, r) = (random(&mut rng, rows * hidden, 1.0), random(&mut rng, rows * hidden, 1.0));
    let gamma: Vec<f32> = (0..hidden).map(|_| 1.0 + rng.random_range(-0.3f32..0.3)).collect();
    let beta = random(&mut rng, hidden, 0.3);
    // Every pre/post step that reads the BERT LayerNorm: LN first with ρ = h, x (recomputed from
    // γ, β) and h + r; LN after only (Houlsby).
    let steps = [
        LocationSteps { residual_before_ln: ResidualBeforeLn::True, original_ln_before: true, original_ln_after: true },
        LocationSteps { residual_before_ln: ResidualBeforeLn::False, original_ln_before: true, original_ln_after: true },
        LocationSteps { residual_before_ln: ResidualBeforeLn::PostAdd, original_ln_before: true, original_ln_after: false },
        LocationSteps { residual_before_ln: ResidualBeforeLn::True, original_ln_before: false, original_ln_after: true },
    ];
    for s in steps {
        let on = |be: &dyn Backend| -> Vec<f32> {
            let tensors: Vec<common::FullBranch> = branches.iter().map(|b| common::FullBranch(b.iter().map(|(d, s)| be.upload(d.clone(), s).unwrap()).collect())).collect();
            let params: Vec<_> = tensors.iter().map(common::FullBranch::params).collect();
            let (ht, rt) = (be.upload(h.clone(), &[batch, seq_len, hidden]).unwrap(), be.upload(r.clone(), &[batch, seq_len, hidden]).unwrap());
            let (g, b) = (bf16_on(be, &gamma, &[hidden]), bf16_on(be, &beta, &[hidden]));
            let loc = AdapterLocation { h: &ht, r: &rt, layer_norm: LayerNormParams { gamma: &g, beta: &b, eps: 1e-12 }, steps: s, branches: &params, replicate: true, seq_len };
            be.to_host(&be.adapter_location(&loc).unwrap()).unwrap()
        };
        assert_close(&format!("{} {path:?} {s:?} bf16 BERT LayerNorm adapter_location", gpu.describe()), &on(&be), &on(&cpu));
    }
}
test_device!(bf16_adapter_location, bf16_adapter_location_matches_the_cpu);

fn bf16_refusals_name_the_op_tensor_and_dtype(gpu: &Gpu) {
    let be = backend(gpu);
    let x = be.upload(vec![0.5; 8], &[2, 4]).unwrap();
    let w16 = be.cast(&be.upload(vec![0.25; 12], &[3, 4]).unwrap(), DType::BF16).unwrap();
    // bf16 activations take a bf16 weight (the bf16 eval forward, tests/cuda_bf16_model.rs), not
    // an f32 one.
    let x16 = be.cast(&x, DType::BF16).unwrap();
    assert_eq!(be.linear(&x16, &w16, None).unwrap().dtype(), DType::BF16);
    let e = be.linear(&x16, &be.upload(vec![0.25; 12], &[3, 4]).unwrap(), None).unwrap_err().to_string();
    assert!(e.contains("linear") && e.contains("input x") && e.contains("bf16") && e.contains("weight W") && e.contains("f32"), "{e}");
    // A LayerNorm whose γ and β differ in dtype (bf16 and f32, bf16 and f16).
    let g32 = be.upload(vec![1.0; 4], &[4]).unwrap();
    let b16 = be.cast(&be.upload(vec![0.0; 4], &[4]).unwrap(), DType::BF16).unwrap();
    let e = be.residual_layernorm(&x, None, &g32, &b16, 1e-5).unwrap_err().to_string();
    assert!(e.contains("residual_layernorm") && e.contains("beta is bf16") && e.contains("gamma is f32"), "{e}");
    let g_h = be.cast(&g32, DType::F16).unwrap();
    let e = be.residual_layernorm(&x, None, &g_h, &b16, 1e-5).unwrap_err().to_string();
    assert!(e.contains("residual_layernorm") && e.contains("beta is bf16") && e.contains("gamma is f16"), "{e}");
    // An f16 base with f32 activations is read like a bf16 one: widened exactly (issue 15).
    let b_h = be.cast(&be.upload(vec![0.0; 4], &[4]).unwrap(), DType::F16).unwrap();
    let (y_h, y_32) = (be.residual_layernorm(&x, None, &g_h, &b_h, 1e-5).unwrap(), be.residual_layernorm(&x, None, &g32, &be.upload(vec![0.0; 4], &[4]).unwrap(), 1e-5).unwrap());
    assert_eq!((y_h.dtype(), be.to_host(&y_h).unwrap()), (DType::F32, be.to_host(&y_32).unwrap()), "LayerNorm over an f16 base");
    let w_h = be.cast(&be.upload(vec![0.25; 12], &[3, 4]).unwrap(), DType::F16).unwrap();
    assert_eq!(be.to_host(&be.linear(&x, &w_h, None).unwrap()).unwrap(), vec![0.5; 6], "linear over an f16 weight");
}
test_device!(bf16_refusals, bf16_refusals_name_the_op_tensor_and_dtype);

/// The tiny BERT loaded in bf16, alone and with adapters, on the CPU and on this device.
fn bf16_model_matches_the_cpu(gpu: &Gpu) {
    for path in [LocationPath::Fused, LocationPath::Split] {
        bf16_model_on(gpu, path);
    }
}

fn bf16_model_on(gpu: &Gpu, path: LocationPath) {
    use bert_adapters::{BertModel, InputBatch, LoadOptions};
    use std::sync::Arc;
    let dir = common::fixtures().join("tiny_bert");
    let adapters = common::fixtures().join("adapters");
    let opts = LoadOptions { dtype: DType::BF16, ..Default::default() };
    let cuda: Arc<dyn Backend> = Arc::new(backend(gpu).with_location_path(path));
    let cpu: Arc<dyn Backend> = Arc::new(CpuBackend::reference());
    // No adapter; Houlsby with NICE; a gate; post_add; Parallel with the pre step's ρ = x.
    let setups: [&[&str]; 5] = [&[], &["houlsby_inv"], &["opt_gating"], &["opt_post_add"], &["pfeiffer", "opt_residual_before_ln_false"]];
    for names in setups {
        let run = |be: &Arc<dyn Backend>| -> Vec<(String, Vec<f32>)> {
            let (mut model, _) = BertModel::from_dir(&dir, be.clone(), opts).unwrap();
            let w = model.weights();
            for t in [&w.word_embeddings, &w.embeddings_ln_gamma, &w.layers[0].qkv_w, &w.layers[1].output_ln_beta, &w.pooler.as_ref().unwrap().0] {
                assert_eq!(t.dtype(), DType::BF16);
            }
            for n in names {
                model.load_adapter(adapters.join(n)).unwrap();
            }
            if !names.is_empty() {
                model.set_active_adapters(Some(common::setup(names))).unwrap();
            }
            let batch = InputBatch::from_file(dir.join("inputs.safetensors"), model.config()).unwrap();
            let out = model.forward(&batch).unwrap();
            let mut v = vec![("last_hidden_state".to_string(), be.to_host(&out.last_hidden_state).unwrap()), ("pooler_output".to_string(), be.to_host(out.pooler_output.as_ref().unwrap()).unwrap())];
            v.extend(out.hidden_states.iter().enumerate().map(|(i, t)| (format!("hidden_states.{i}"), be.to_host(t).unwrap())));
            v
        };
        let (got, want) = (run(&cuda), run(&cpu));
        assert_eq!(got.len(), want.len());
        for ((name, g), (_, w)) in got.iter().zip(&want) {
            assert!(w.iter().all(|v| v.is_finite()), "{names:?} {name}: the CPU output is not finite");
            common::assert_close(&format!("{} {path:?} bf16 tiny BERT {names:?} {name}", gpu.describe()), g, w, common::TOL);
        }
    }
}
test_device!(bf16_model, bf16_model_matches_the_cpu);

/// `with_activations(DType::F16)` over an f16 base (issue 15): `embedding_layernorm` writes f16
/// (the f32 kernel's output over the same f16 tables, rounded once), and the ops after it keep f16
/// (each one the f32 op on the widened operands, rounded once: bit for bit on the executor, one
/// f16 ulp on a GPU); an f32 or bf16 base in this mode is refused at the embeddings, named; bf16
/// and f16 operands never mix in one op, the error naming the operand.
fn f16_mode_takes_an_f16_base(gpu: &Gpu) {
    let be16 = backend(gpu).with_activations(DType::F16).unwrap();
    assert_eq!(be16.activations(), DType::F16);
    assert!(be16.name().contains("(f16 activations)"), "{}", be16.name());
    let be = backend(gpu);
    let mut rng = StdRng::seed_from_u64(0xf16b);
    let (batch, seq, hidden, vocab) = (2, 5, 40, 11);
    let table = |be: &CudaBackend, n: usize, rows: usize, dtype: DType, rng: &mut StdRng| be.cast(&be.upload(random(rng, n * rows, 1.0), &[rows, n]).unwrap(), dtype).unwrap();
    let ids = be16.upload_u32((0..batch * seq).map(|i| (i * 7 % vocab) as u32).collect(), &[batch, seq]).unwrap();
    let types = be16.upload_u32(vec![0; batch * seq], &[batch, seq]).unwrap();
    let tables_in = |be: &CudaBackend, dtype: DType| {
        let mut rng = StdRng::seed_from_u64(0xf16e);
        let (w, p, t) = (table(be, hidden, vocab, dtype, &mut rng), table(be, hidden, seq, dtype, &mut rng), table(be, hidden, 2, dtype, &mut rng));
        let g = be.cast(&be.upload(vec![1.0; hidden], &[hidden]).unwrap(), dtype).unwrap();
        let b = be.cast(&be.upload(random(&mut rng, hidden, 0.5), &[hidden]).unwrap(), dtype).unwrap();
        [w, p, t, g, b]
    };
    let embed = |be: &CudaBackend, ids: &Tensor, types: &Tensor, [w, p, t, g, b]: &[Tensor; 5]| {
        be.embedding_layernorm(ids, types, w, p, t, bert_adapters::Positions::Sequential, LayerNormParams { gamma: g, beta: b, eps: 1e-12 }, None)
    };
    let h16 = tables_in(&be16, DType::F16);
    let y16 = embed(&be16, &ids, &types, &h16).unwrap();
    assert_eq!(y16.dtype(), DType::F16);
    // The f32 mode over the same f16 tables: the f32 kernel's y, which the f16 mode rounds once.
    let (ids32, types32) = (be.upload_u32(be16.to_host_u32(&ids).unwrap(), &[batch, seq]).unwrap(), be.upload_u32(vec![0; batch * seq], &[batch, seq]).unwrap());
    let y32 = embed(&be, &ids32, &types32, &tables_in(&be, DType::F16)).unwrap();
    assert_eq!(y32.dtype(), DType::F32);
    let want = be.to_host(&y32).unwrap();
    let got: Vec<f16> = be16.to_host(&y16).unwrap().into_iter().map(f16::from_f32).collect();
    rule::assert_rounded_f32_kernel_in(gpu, "f16 embedding_layernorm", &got, &want);
    // An f32 or bf16 base in the f16 mode: refused at the embeddings, naming the table and dtypes.
    for base in [DType::F32, DType::BF16] {
        let e = embed(&be16, &ids, &types, &tables_in(&be16, base)).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Unsupported(_)) && msg.contains("embedding_layernorm") && msg.contains("f16 activations") && msg.contains("the word embeddings") && msg.contains(&format!("in {base}")) && msg.contains("DType::F16"), "{msg}");
    }

    // Ops after the embeddings: f16 in, f16 out, the f32 op rounded once.
    let x = be16.cast(&be16.upload(random(&mut rng, batch * seq * hidden, 2.0), &[batch, seq, hidden]).unwrap(), DType::F16).unwrap();
    let wide = |t: &Tensor| be16.cast(t, DType::F32).unwrap();
    let check = |label: &str, t16: Tensor, t32: Tensor| {
        assert_eq!((t16.dtype(), t32.dtype()), (DType::F16, DType::F32), "{label}");
        let got: Vec<f16> = be16.to_host(&t16).unwrap().into_iter().map(f16::from_f32).collect();
        rule::assert_rounded_f32_kernel_in(gpu, label, &got, &be16.to_host(&t32).unwrap());
    };
    check("activation", be16.activation(&x, Activation::Gelu).unwrap(), be16.activation(&wide(&x), Activation::Gelu).unwrap());
    check("add", be16.add(&x, &y16).unwrap(), be16.add(&wide(&x), &wide(&y16)).unwrap());
    check("first_token", be16.first_token(&x).unwrap(), be16.first_token(&wide(&x)).unwrap());
    let drop = bert_adapters::backend::DropoutSpec { p: 0.25, seed: 0xf16d, stream: 3, blocks: vec![], seed_buffer: None, offset: 0 };
    check("dropout", be16.dropout(&x, &drop).unwrap(), be16.dropout(&wide(&x), &drop).unwrap());
    // linear_dropout rounds twice, as a plain f16 model does: the product, then the mask over it.
    let w8 = table(&be16, hidden, 8, DType::F16, &mut rng);
    let ld = be16.linear_dropout(&x, &w8, None, Some(&drop)).unwrap();
    assert_eq!((ld.dtype(), be16.to_host(&ld).unwrap()), (DType::F16, be16.to_host(&be16.dropout(&be16.linear(&x, &w8, None).unwrap(), &drop).unwrap()).unwrap()), "linear_dropout");
    let [_, _, _, g, b] = &h16;
    check("residual_layernorm", be16.residual_layernorm(&x, Some(&y16), g, b, 1e-12).unwrap(), be16.residual_layernorm(&wide(&x), Some(&wide(&y16)), g, b, 1e-12).unwrap());
    let (w, bias) = (table(&be16, hidden, 24, DType::F16, &mut rng), be16.cast(&be16.upload(random(&mut rng, 24, 0.5), &[24]).unwrap(), DType::F16).unwrap());
    check("linear", be16.linear(&x, &w, Some(&bias)).unwrap(), be16.linear(&wide(&x), &w, Some(&bias)).unwrap());
    let (y_act, pre) = be16.linear_act(&x, &w, Some(&bias), Activation::Relu).unwrap();
    assert_eq!((y_act.dtype(), pre.dtype()), (DType::F16, DType::F16));
    let (ys, z, stats) = be16.residual_layernorm_stats(&x, Some(&y16), g, b, 1e-12).unwrap();
    assert_eq!((ys.dtype(), z.dtype(), stats.dtype()), (DType::F16, DType::F16, DType::F32));
    assert_eq!(be16.to_host(&ys).unwrap(), be16.to_host(&be16.residual_layernorm(&x, Some(&y16), g, b, 1e-12).unwrap()).unwrap(), "the training forward's y is the forward's");
    let dz = be16.layernorm_backward_stats(&x, &z, &stats, g).unwrap();
    assert_eq!(dz.dtype(), DType::F16);
    assert!(be16.all_finite(&dz).unwrap());
    let dx = be16.linear_backward_input(&be16.cast(&be16.upload(random(&mut rng, batch * seq * 24, 1.0), &[batch, seq, 24]).unwrap(), DType::F16).unwrap(), &w).unwrap();
    assert_eq!((dx.dtype(), dx.shape()), (DType::F16, &[batch, seq, hidden][..]));
    let d_first = be16.first_token_backward(&be16.first_token(&x).unwrap(), seq).unwrap();
    assert_eq!(d_first.dtype(), DType::F16);
    // f16's range: a value past 65504 is stored as inf, which all_finite sees.
    let big = be16.cast(&be16.upload(vec![40000.0; 4], &[4]).unwrap(), DType::F16).unwrap();
    let sum = be16.add(&big, &big).unwrap();
    assert_eq!(be16.to_host(&sum).unwrap(), vec![f32::INFINITY; 4]);
    assert!(!be16.all_finite(&sum).unwrap());

    // bf16 and f16 never mix: the error names the operand.
    let xb = be16.cast(&wide(&x), DType::BF16).unwrap();
    let named = |label: &str, r: bert_adapters::Result<()>, words: &[&str]| {
        let msg = r.expect_err(label).to_string();
        for w in words {
            assert!(msg.contains(w), "{label}: `{w}` not in: {msg}");
        }
    };
    named("add f16 + bf16", be16.add(&x, &xb).map(|_| ()), &["add", "b [2, 5, 40] is bf16", "a is f16"]);
    named("add_into f16 += bf16", be16.add_into(&be16.zeros(&[batch, seq, hidden], DType::F16).unwrap(), &xb), &["add_into", "f16 += bf16"]);
    let wb = be16.cast(&wide(&w), DType::BF16).unwrap();
    named("linear f16 x, bf16 W", be16.linear(&x, &wb, None).map(|_| ()), &["linear", "the input x", "is f16", "the weight W", "bf16"]);
    let gb = be16.cast(&wide(g), DType::BF16).unwrap();
    named("residual_layernorm f16 x, bf16 gamma", be16.residual_layernorm(&x, None, &gb, &gb, 1e-12).map(|_| ()), &["residual_layernorm", "f16 activations", "LayerNorm gamma", "bf16"]);
    named("activation_backward f16 dy, bf16 pre", be16.activation_backward(&x, &xb, Activation::Gelu).map(|_| ()), &["activation_backward", "pre-activation", "bf16", "the gradient is f16"]);
    named("linear_backward_input f16 dy, bf16 W", be16.linear_backward_input(&be16.cast(&wide(&y_act), DType::F16).unwrap(), &wb).map(|_| ()), &["linear_backward_input", "weight", "bf16"]);
    named("first_token_backward f16 into bf16", be16.first_token_backward_into(&be16.first_token(&x).unwrap(), &xb, false), &["first_token_backward", "f16", "bf16"]);
}
test_device!(f16_mode, f16_mode_takes_an_f16_base);
