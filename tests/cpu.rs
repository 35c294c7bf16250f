//! The fast CPU path against the plain reference, op by op, on random inputs at awkward shapes.

mod common;

use bert_adapters::{Activation, Backend, CpuBackend, Tensor};
use common::{assert_close, random_vec};
use rand::{rngs::StdRng, SeedableRng};

fn both() -> (CpuBackend, CpuBackend) {
    (CpuBackend::fast(), CpuBackend::reference())
}

fn t(rng: &mut StdRng, shape: &[usize], scale: f32) -> Tensor {
    Tensor::from_vec(random_vec(rng, shape.iter().product(), scale), shape).unwrap()
}

fn compare(name: &str, fast: &Tensor, reference: &Tensor) {
    assert_eq!(fast.shape(), reference.shape(), "{name}");
    assert_close(name, &fast.cpu_data().unwrap(), &reference.cpu_data().unwrap(), 1e-5);
}

#[test]
fn linear_matches_reference() {
    let mut rng = StdRng::seed_from_u64(1);
    let (fast, reference) = both();
    for &(rows, d_in, d_out) in &[(1, 1, 1), (7, 48, 100), (130, 100, 48), (3, 384, 1536), (700, 33, 65)] {
        let x = t(&mut rng, &[rows, d_in], 1.0);
        let w = t(&mut rng, &[d_out, d_in], 0.5);
        let b = t(&mut rng, &[d_out], 0.5);
        for bias in [None, Some(&b)] {
            let name = format!("linear {rows}x{d_in}->{d_out} bias={}", bias.is_some());
            compare(&name, &fast.linear(&x, &w, bias).unwrap(), &reference.linear(&x, &w, bias).unwrap());
        }
    }
}

#[test]
fn linear_reference_is_the_definition() {
    // A hand-computed case: [1, 2] · [[1, 0], [2, 3], [-1, 1]]ᵀ + [0.5, 0, 1] = [1.5, 8, 2].
    let x = Tensor::from_vec(vec![1.0, 2.0], &[1, 2]).unwrap();
    let w = Tensor::from_vec(vec![1.0, 0.0, 2.0, 3.0, -1.0, 1.0], &[3, 2]).unwrap();
    let b = Tensor::from_vec(vec![0.5, 0.0, 1.0], &[3]).unwrap();
    for be in [CpuBackend::fast(), CpuBackend::reference()] {
        assert_eq!(be.linear(&x, &w, Some(&b)).unwrap().cpu_data().unwrap(), &[1.5, 8.0, 2.0]);
    }
}

#[test]
fn layernorm_matches_reference() {
    let mut rng = StdRng::seed_from_u64(2);
    let (fast, reference) = both();
    for &(rows, cols) in &[(1, 1), (5, 31), (130, 48), (9, 768), (3, 4099)] {
        let x = t(&mut rng, &[rows, cols], 3.0);
        let r = t(&mut rng, &[rows, cols], 3.0);
        let g = t(&mut rng, &[cols], 1.0);
        let b = t(&mut rng, &[cols], 1.0);
        for res in [None, Some(&r)] {
            for eps in [1e-12, 1e-5] {
                let name = format!("layernorm {rows}x{cols} residual={} eps={eps}", res.is_some());
                compare(&name, &fast.residual_layernorm(&x, res, &g, &b, eps).unwrap(), &reference.residual_layernorm(&x, res, &g, &b, eps).unwrap());
            }
        }
    }
}

#[test]
fn layernorm_reference_normalises() {
    // γ=1, β=0: every row must come out with mean 0 and biased variance 1 (up to eps).
    let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, -10.0, 0.0, 10.0, 20.0], &[2, 4]).unwrap();
    let g = Tensor::from_vec(vec![1.0; 4], &[4]).unwrap();
    let b = Tensor::zeros(&[4]);
    let y = CpuBackend::reference().residual_layernorm(&x, None, &g, &b, 1e-12).unwrap();
    for row in y.cpu_data().unwrap().chunks(4) {
        let mean: f32 = row.iter().sum::<f32>() / 4.0;
        let var: f32 = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5, "mean {mean} var {var}");
    }
    // [1,2,3,4]: mean 2.5, var 1.25 -> first element (1-2.5)/sqrt(1.25).
    assert!((y.cpu_data().unwrap()[0] - (-1.5 / 1.25f32.sqrt())).abs() < 1e-6);
}

#[test]
fn attention_matches_reference() {
    let mut rng = StdRng::seed_from_u64(3);
    let (fast, reference) = both();
    for &(batch, seq, hidden, heads) in &[(1, 1, 4, 1), (2, 7, 48, 3), (3, 13, 40, 5), (2, 33, 384, 12)] {
        let q = t(&mut rng, &[batch, seq, hidden], 2.0);
        let k = t(&mut rng, &[batch, seq, hidden], 2.0);
        let v = t(&mut rng, &[batch, seq, hidden], 2.0);
        // Right padding of a different length per example; the first token is always real.
        let mask: Vec<f32> = (0..batch * seq).map(|i| if i % seq < seq - (i / seq) % seq { 0.0 } else { f32::MIN }).collect();
        let mask = Tensor::from_vec(mask, &[batch, seq]).unwrap();
        let name = format!("attention B{batch} T{seq} H{hidden} heads{heads}");
        compare(&name, &fast.attention(&q, &k, &v, &mask, heads, None).unwrap(), &reference.attention(&q, &k, &v, &mask, heads, None).unwrap());
    }
}

/// An example whose every key is masked (its mask row all `f32::MIN`, or all −10000 as in HF's
/// extended mask): its softmax is uniform, and the packed backward, which recomputes the
/// probabilities from the saved f32 log-sum-exp, must give the reference's gradients there too
/// (the rounding of an lse near f32::MIN once turned each p into 1 instead of 1/T).
#[test]
fn packed_backward_on_fully_masked_rows_matches_reference() {
    let mut rng = StdRng::seed_from_u64(5);
    let (fast, reference) = both();
    let (batch, seq, hidden, heads) = (3, 7, 24, 2);
    for masked in [f32::MIN, -10000.0] {
        let qkv = t(&mut rng, &[batch, seq, 3 * hidden], 1.5);
        // Example 1 is all padding; the others are partly padded.
        let mask: Vec<f32> = (0..batch * seq).map(|i| if i / seq == 1 || i % seq >= seq - i / seq { masked } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, &[batch, seq]).unwrap();
        let dctx = t(&mut rng, &[batch, seq, hidden], 1.0);
        let (_, lse) = fast.attention_packed(&qkv, &mask, heads, None).unwrap();
        let got = fast.attention_packed_backward(&dctx, &qkv, &lse, &mask, heads, None).unwrap();
        let (_, lse_ref) = reference.attention_packed(&qkv, &mask, heads, None).unwrap();
        let want = reference.attention_packed_backward(&dctx, &qkv, &lse_ref, &mask, heads, None).unwrap();
        compare(&format!("packed attention backward, mask {masked}"), &got, &want);
    }
}

#[test]
fn attention_ignores_masked_keys() {
    // With key 1 masked, changing its value vector must not change any output.
    let mut rng = StdRng::seed_from_u64(4);
    let (b, s, h) = (1, 3, 8);
    let q = t(&mut rng, &[b, s, h], 1.0);
    let k = t(&mut rng, &[b, s, h], 1.0);
    let v1 = t(&mut rng, &[b, s, h], 1.0);
    // A copy, not a clone: a clone shares v1's storage, so the write below would change both.
    let v2 = Tensor::from_vec(v1.cpu_data().unwrap().to_vec(), v1.shape()).unwrap();
    v2.cpu_data_mut().unwrap()[h..2 * h].iter_mut().for_each(|x| *x += 100.0);
    let mask = Tensor::from_vec(vec![0.0, f32::MIN, 0.0], &[b, s]).unwrap();
    for be in [CpuBackend::fast(), CpuBackend::reference()] {
        let a = be.attention(&q, &k, &v1, &mask, 2, None).unwrap();
        let c = be.attention(&q, &k, &v2, &mask, 2, None).unwrap();
        assert_eq!(a.cpu_data().unwrap(), c.cpu_data().unwrap(), "{}", be.name());
    }
}

#[test]
fn activations_match_reference_and_known_values() {
    let mut rng = StdRng::seed_from_u64(5);
    let (fast, reference) = both();
    let x = t(&mut rng, &[1000, 7], 6.0);
    for act in [Activation::Relu, Activation::Gelu, Activation::GeluNew, Activation::Swish, Activation::Tanh, Activation::Sigmoid] {
        compare(&format!("{act:?}"), &fast.activation(&x, act).unwrap(), &reference.activation(&x, act).unwrap());
    }
    // Known values: gelu(1) = 0.8413447460685429, gelu_new(1) = 0.8411919906082768, swish(1) = 0.7310585786300049.
    assert!((Activation::Gelu.apply_f64(1.0) - 0.841_344_746_068_542_9).abs() < 1e-15);
    assert!((Activation::GeluNew.apply_f64(1.0) - 0.841_191_990_608_276_8).abs() < 1e-15);
    assert!((Activation::Swish.apply_f64(1.0) - 0.731_058_578_630_004_9).abs() < 1e-15);
    assert_eq!(Activation::Relu.apply_f64(-0.5), 0.0);
}

#[test]
fn embedding_matches_reference_and_rejects_bad_ids() {
    let mut rng = StdRng::seed_from_u64(6);
    let (fast, reference) = both();
    let (vocab, types, positions, hidden) = (50, 3, 16, 24);
    let word = t(&mut rng, &[vocab, hidden], 1.0);
    let pos = t(&mut rng, &[positions, hidden], 1.0);
    let ty = t(&mut rng, &[types, hidden], 1.0);
    let ids: Vec<u32> = (0..2 * 9).map(|i| (i * 7 % vocab) as u32).collect();
    let tts: Vec<u32> = (0..2 * 9).map(|i| (i % types) as u32).collect();
    let (id_t, tt_t) = (Tensor::from_elems(ids.clone(), &[2, 9]).unwrap(), Tensor::from_elems(tts.clone(), &[2, 9]).unwrap());
    let seq = bert_adapters::Positions::Sequential;
    let a = fast.embedding(&id_t, &tt_t, &word, &pos, &ty, seq).unwrap();
    compare("embedding", &a, &reference.embedding(&id_t, &tt_t, &word, &pos, &ty, seq).unwrap());
    // Row 1 (b=0, t=1) is word[7] + type[1] + pos[1].
    let (w, p, tt) = (&word.cpu_data().unwrap(), &pos.cpu_data().unwrap(), &ty.cpu_data().unwrap());
    assert_eq!(a.cpu_data().unwrap()[hidden], (w[7 * hidden] + tt[hidden]) + p[hidden]);

    let bad: Vec<u32> = ids.iter().map(|&i| if i == 7 { vocab as u32 } else { i }).collect();
    let err = fast.embedding(&Tensor::from_elems(bad, &[2, 9]).unwrap(), &tt_t, &word, &pos, &ty, seq).unwrap_err().to_string();
    assert!(err.contains("token id 50 >= vocabulary size 50"), "{err}");

    // RoBERTa's positions (padding_idx 1), by hand for sequence 0 = [3, 1, 5, 1, 1, 6, 7, 1, 8]:
    // pads read row 1, the others 2, 3, 4, ... counting only non-pad ids.
    let roberta = bert_adapters::Positions::FromIds { padding_idx: 1 };
    let ids: Vec<u32> = [3, 1, 5, 1, 1, 6, 7, 1, 8].iter().chain(&[9, 10, 11, 12, 13, 14, 1, 1, 1]).copied().collect();
    let want_pos: [u32; 18] = [2, 1, 3, 1, 1, 4, 5, 1, 6, 2, 3, 4, 5, 6, 7, 1, 1, 1];
    assert_eq!(roberta.position_ids(&ids, 9), want_pos);
    let id_t = Tensor::from_elems(ids.clone(), &[2, 9]).unwrap();
    let a = fast.embedding(&id_t, &tt_t, &word, &pos, &ty, roberta).unwrap();
    compare("embedding (roberta positions)", &a, &reference.embedding(&id_t, &tt_t, &word, &pos, &ty, roberta).unwrap());
    let a = a.cpu_data().unwrap();
    for (row, &at) in want_pos.iter().enumerate() {
        let (id, ty_id) = (ids[row] as usize, tts[row] as usize);
        let want: Vec<f32> = (0..hidden).map(|h| (w[id * hidden + h] + tt[ty_id * hidden + h]) + p[at as usize * hidden + h]).collect();
        assert_eq!(&a[row * hidden..(row + 1) * hidden], want.as_slice(), "row {row} reads position {at}");
    }
    // 9 tokens need 1 + 1 + 9 = 11 rows: a 10-row table is a shape error, not a panic.
    let short = t(&mut rng, &[10, hidden], 1.0);
    let err = fast.embedding(&id_t, &tt_t, &word, &short, &ty, roberta).unwrap_err().to_string();
    assert!(err.contains("needs 11 position rows") && err.contains("the table has 10"), "{err}");
}

#[test]
fn shape_errors_are_errors_not_panics() {
    let be = CpuBackend::fast();
    let x = Tensor::zeros(&[2, 3]);
    let w = Tensor::zeros(&[4, 5]);
    let err = be.linear(&x, &w, None).unwrap_err().to_string();
    assert!(err.contains("linear") && err.contains("[2, 3]"), "{err}");
    let g = Tensor::zeros(&[4]);
    let err = be.residual_layernorm(&x, None, &g, &g, 1e-5).unwrap_err().to_string();
    assert!(err.contains("gamma has shape [4], expected [3]"), "{err}");
    let q = Tensor::zeros(&[1, 2, 6]);
    let m = Tensor::zeros(&[1, 2]);
    let err = be.attention(&q, &q, &q, &m, 4, None).unwrap_err().to_string();
    assert!(err.contains("not divisible by 4 heads"), "{err}");
}

// ---- backward ops --------------------------------------------------------------------------------

/// ⟨f(x + εu) − f(x − εu), w⟩ / 2ε against ⟨∇, u⟩ for a scalar probe `⟨f(x), w⟩`.
fn directional(f: &dyn Fn(&[f32]) -> Vec<f32>, x: &[f32], w: &[f32], grad: &[f32], u: &[f32]) -> (f64, f64) {
    let eps = 1e-3f32;
    let shift = |s: f32| -> f64 {
        let xs: Vec<f32> = x.iter().zip(u).map(|(a, b)| a + s * b).collect();
        f(&xs).iter().zip(w).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    let numeric = (shift(eps) - shift(-eps)) / (2.0 * eps as f64);
    let analytic: f64 = grad.iter().zip(u).map(|(g, u)| *g as f64 * *u as f64).sum();
    (numeric, analytic)
}

fn assert_directional(name: &str, (numeric, analytic): (f64, f64)) {
    assert!((numeric - analytic).abs() <= 1e-3 * (1.0 + analytic.abs()), "{name}: finite differences {numeric} vs backward {analytic}");
}

#[test]
fn backward_ops_match_finite_differences_and_fast_matches_reference() {
    let mut rng = StdRng::seed_from_u64(11);
    let (fast, reference) = both();
    let (rows, d_in, d_out) = (13, 24, 17);
    let x = t(&mut rng, &[rows, d_in], 1.0);
    let w = t(&mut rng, &[d_out, d_in], 0.5);
    let dy = t(&mut rng, &[rows, d_out], 1.0);
    let u = random_vec(&mut rng, rows * d_in, 1.0);
    // Linear: input gradient and parameter gradients.
    let dx = reference.linear_backward_input(&dy, &w).unwrap();
    compare("linear dx", &fast.linear_backward_input(&dy, &w).unwrap(), &dx);
    let f = |xs: &[f32]| reference.linear(&Tensor::from_vec(xs.to_vec(), &[rows, d_in]).unwrap(), &w, None).unwrap().into_cpu_vec().unwrap();
    assert_directional("linear dx", directional(&f, &x.cpu_data().unwrap(), &dy.cpu_data().unwrap(), &dx.cpu_data().unwrap(), &u));
    let (dw, db) = reference.linear_backward_params(&dy, &x).unwrap();
    let (fdw, fdb) = fast.linear_backward_params(&dy, &x).unwrap();
    compare("linear dw", &fdw, &dw);
    compare("linear db", &fdb, &db);
    let uw = random_vec(&mut rng, d_out * d_in, 1.0);
    let fw = |ws: &[f32]| reference.linear(&x, &Tensor::from_vec(ws.to_vec(), &[d_out, d_in]).unwrap(), None).unwrap().into_cpu_vec().unwrap();
    assert_directional("linear dw", directional(&fw, &w.cpu_data().unwrap(), &dy.cpu_data().unwrap(), &dw.cpu_data().unwrap(), &uw));

    // LayerNorm input gradient (frozen γ, β), through x + residual.
    let (cols, eps) = (31, 1e-5);
    let z = t(&mut rng, &[rows, cols], 2.0);
    let r = t(&mut rng, &[rows, cols], 2.0);
    let g = t(&mut rng, &[cols], 1.0);
    let b = t(&mut rng, &[cols], 1.0);
    let dyl = t(&mut rng, &[rows, cols], 1.0);
    let dz = reference.layernorm_backward_input(&dyl, &z, Some(&r), &g, eps).unwrap();
    compare("layernorm dz", &fast.layernorm_backward_input(&dyl, &z, Some(&r), &g, eps).unwrap(), &dz);
    let fl = |zs: &[f32]| {
        reference.residual_layernorm(&Tensor::from_vec(zs.to_vec(), &[rows, cols]).unwrap(), Some(&r), &g, &b, eps).unwrap().into_cpu_vec().unwrap()
    };
    let uz = random_vec(&mut rng, rows * cols, 1.0);
    assert_directional("layernorm dz", directional(&fl, &z.cpu_data().unwrap(), &dyl.cpu_data().unwrap(), &dz.cpu_data().unwrap(), &uz));

    // Activations.
    // Kept away from relu's kink at 0, where a finite difference straddles two slopes.
    let pre: Vec<f32> = random_vec(&mut rng, rows * cols, 3.0).into_iter().map(|v| if v.abs() < 0.05 { v.signum() * 0.05 + v } else { v }).collect();
    let pre = Tensor::from_vec(pre, &[rows, cols]).unwrap();
    for act in [Activation::Relu, Activation::Gelu, Activation::GeluNew, Activation::Swish, Activation::Tanh, Activation::Sigmoid] {
        let da = reference.activation_backward(&dyl, &pre, act).unwrap();
        compare(&format!("{act:?} backward"), &fast.activation_backward(&dyl, &pre, act).unwrap(), &da);
        let fa = |ps: &[f32]| reference.activation(&Tensor::from_vec(ps.to_vec(), &[rows, cols]).unwrap(), act).unwrap().into_cpu_vec().unwrap();
        assert_directional(&format!("{act:?}"), directional(&fa, &pre.cpu_data().unwrap(), &dyl.cpu_data().unwrap(), &da.cpu_data().unwrap(), &uz));
    }

    // Attention, with and without probability dropout, q, k and v each.
    let (batch, seq, hidden, heads) = (2, 7, 12, 3);
    let q = t(&mut rng, &[batch, seq, hidden], 1.0);
    let k = t(&mut rng, &[batch, seq, hidden], 1.0);
    let v = t(&mut rng, &[batch, seq, hidden], 1.0);
    let mask = Tensor::from_vec((0..batch * seq).map(|i| if i == 6 { f32::MIN } else { 0.0 }).collect(), &[batch, seq]).unwrap();
    let dctx = t(&mut rng, &[batch, seq, hidden], 1.0);
    let ua = random_vec(&mut rng, batch * seq * hidden, 1.0);
    let spec = bert_adapters::backend::DropoutSpec { p: 0.2, seed: 5, stream: 9, blocks: vec![0, 1], seed_buffer: None, offset: 0 };
    for dropout in [None, Some(&spec)] {
        let [dq, dk, dv] = reference.attention_backward(&dctx, &q, &k, &v, &mask, heads, dropout).unwrap();
        let [fq, fk, fv] = fast.attention_backward(&dctx, &q, &k, &v, &mask, heads, dropout).unwrap();
        compare("attention dq", &fq, &dq);
        compare("attention dk", &fk, &dk);
        compare("attention dv", &fv, &dv);
        compare("attention forward", &fast.attention(&q, &k, &v, &mask, heads, dropout).unwrap(), &reference.attention(&q, &k, &v, &mask, heads, dropout).unwrap());
        let sh = q.shape().to_vec();
        let run = |qq: &Tensor, kk: &Tensor, vv: &Tensor| reference.attention(qq, kk, vv, &mask, heads, dropout).unwrap().into_cpu_vec().unwrap();
        let mk = |xs: &[f32]| Tensor::from_vec(xs.to_vec(), &sh).unwrap();
        let d = dctx.cpu_data().unwrap();
        assert_directional("attention dq", directional(&|xs| run(&mk(xs), &k, &v), &q.cpu_data().unwrap(), &d, &dq.cpu_data().unwrap(), &ua));
        assert_directional("attention dk", directional(&|xs| run(&q, &mk(xs), &v), &k.cpu_data().unwrap(), &d, &dk.cpu_data().unwrap(), &ua));
        assert_directional("attention dv", directional(&|xs| run(&q, &k, &mk(xs)), &v.cpu_data().unwrap(), &d, &dv.cpu_data().unwrap(), &ua));
    }
}

// ---- f64 finite differences against independent f64 forwards ------------------------------------

/// Central differences of `⟨f(x), w⟩` in f64, element by element.
fn fd64(f: &dyn Fn(&[f64]) -> Vec<f64>, x: &[f64], w: &[f64]) -> Vec<f64> {
    let h = 1e-6;
    let probe = |xs: &[f64]| -> f64 { f(xs).iter().zip(w).map(|(a, b)| a * b).sum() };
    (0..x.len())
        .map(|i| {
            let mut xp = x.to_vec();
            xp[i] += h;
            let mut xm = x.to_vec();
            xm[i] -= h;
            (probe(&xp) - probe(&xm)) / (2.0 * h)
        })
        .collect()
}

fn to64(t: &Tensor) -> Vec<f64> {
    t.cpu_data().unwrap().iter().map(|&v| v as f64).collect()
}

/// Our f32 gradient against the f64 finite differences: the bound covers f32 rounding only.
fn assert_grad(name: &str, ours: &Tensor, fd: &[f64]) {
    let max = fd.iter().fold(0f64, |m, v| m.max(v.abs()));
    let worst = ours.cpu_data().unwrap().iter().zip(fd).map(|(a, b)| (*a as f64 - b).abs()).fold(0f64, f64::max);
    assert!(worst <= 1e-4 * (1.0 + max), "{name}: max |backward − f64 finite differences| = {worst:.3e} (max |grad| {max:.3})");
}

#[test]
fn backward_ops_match_f64_finite_differences() {
    let mut rng = StdRng::seed_from_u64(21);
    for be in [CpuBackend::fast(), CpuBackend::reference()] {
        // LayerNorm: y = (z − μ)·rstd·γ + β over rows of 9.
        let (rows, cols, eps) = (3, 9, 1e-5f32);
        let (z, g, b, dy) = (t(&mut rng, &[rows, cols], 2.0), t(&mut rng, &[cols], 1.0), t(&mut rng, &[cols], 1.0), t(&mut rng, &[rows, cols], 1.0));
        let (g64, b64) = (to64(&g), to64(&b));
        let ln64 = |zs: &[f64]| -> Vec<f64> {
            zs.chunks(cols)
                .flat_map(|r| {
                    let mean = r.iter().sum::<f64>() / cols as f64;
                    let var = r.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / cols as f64;
                    let rstd = 1.0 / (var + eps as f64).sqrt();
                    r.iter().enumerate().map(|(c, v)| (v - mean) * rstd * g64[c] + b64[c]).collect::<Vec<_>>()
                })
                .collect()
        };
        let dz = be.layernorm_backward_input(&dy, &z, None, &g, eps).unwrap();
        assert_grad(&format!("{} layernorm", be.name()), &dz, &fd64(&ln64, &to64(&z), &to64(&dy)));

        // Activations, away from relu's kink.
        let pre: Vec<f32> = random_vec(&mut rng, 40, 3.0).into_iter().map(|v| if v.abs() < 0.05 { v + 0.1 } else { v }).collect();
        let pre = Tensor::from_vec(pre, &[4, 10]).unwrap();
        let dya = t(&mut rng, &[4, 10], 1.0);
        for act in [Activation::Relu, Activation::Gelu, Activation::GeluNew, Activation::Swish, Activation::Tanh, Activation::Sigmoid] {
            let f = |xs: &[f64]| xs.iter().map(|&x| act.apply_f64(x)).collect::<Vec<_>>();
            let da = be.activation_backward(&dya, &pre, act).unwrap();
            assert_grad(&format!("{} {act:?}", be.name()), &da, &fd64(&f, &to64(&pre), &to64(&dya)));
        }

        // Linear: dx and dW.
        let (n, d_in, d_out) = (4, 5, 3);
        let (x, w, dyl) = (t(&mut rng, &[n, d_in], 1.0), t(&mut rng, &[d_out, d_in], 1.0), t(&mut rng, &[n, d_out], 1.0));
        let (x64, w64) = (to64(&x), to64(&w));
        let lin = |xs: &[f64], ws: &[f64]| -> Vec<f64> {
            (0..n).flat_map(|r| (0..d_out).map(move |o| (0..d_in).map(|i| xs[r * d_in + i] * ws[o * d_in + i]).sum::<f64>())).collect()
        };
        assert_grad("linear dx", &be.linear_backward_input(&dyl, &w).unwrap(), &fd64(&|xs| lin(xs, &w64), &x64, &to64(&dyl)));
        let (dw, _) = be.linear_backward_params(&dyl, &x).unwrap();
        assert_grad("linear dW", &dw, &fd64(&|ws| lin(&x64, ws), &w64, &to64(&dyl)));

        // Attention (2 heads, a padded key), dq, dk and dv.
        let (bt, seq, hidden, heads) = (1, 4, 6, 2);
        let dh = hidden / heads;
        let (q, k, v, dc) = (
            t(&mut rng, &[bt, seq, hidden], 1.0),
            t(&mut rng, &[bt, seq, hidden], 1.0),
            t(&mut rng, &[bt, seq, hidden], 1.0),
            t(&mut rng, &[bt, seq, hidden], 1.0),
        );
        let mask = Tensor::from_vec(vec![0.0, 0.0, 0.0, f32::MIN], &[bt, seq]).unwrap();
        let attn64 = |q: &[f64], k: &[f64], v: &[f64]| -> Vec<f64> {
            let mut out = vec![0.0; seq * hidden];
            for h in 0..heads {
                for i in 0..seq {
                    // Key 3 is padding: it gets no weight.
                    let s: Vec<f64> = (0..seq - 1).map(|j| (0..dh).map(|c| q[i * hidden + h * dh + c] * k[j * hidden + h * dh + c]).sum::<f64>() / (dh as f64).sqrt()).collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..dh {
                        out[i * hidden + h * dh + c] = (0..seq - 1).map(|j| e[j] / sum * v[j * hidden + h * dh + c]).sum();
                    }
                }
            }
            out
        };
        let [dq, dk, dv] = be.attention_backward(&dc, &q, &k, &v, &mask, heads, None).unwrap();
        let (q64, k64, v64, d64) = (to64(&q), to64(&k), to64(&v), to64(&dc));
        assert_grad("attention dq", &dq, &fd64(&|x| attn64(x, &k64, &v64), &q64, &d64));
        assert_grad("attention dk", &dk, &fd64(&|x| attn64(&q64, x, &v64), &k64, &d64));
        assert_grad("attention dv", &dv, &fd64(&|x| attn64(&q64, &k64, x), &v64, &d64));
    }
}
