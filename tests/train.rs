//! AdamW, gradient clipping and counter-based dropout (`bert_adapters::train`).

mod common;

use std::collections::BTreeMap;

use bert_adapters::io::TensorFile;
use bert_adapters::train::{clip_grad_norm, dropout_backward, dropout_forward, dropout_range, philox4x32_10, AdamW, AdamWConfig, AdamWState, DropoutParams, DropoutRng};
use bert_adapters::{Error, Tensor};

fn t(data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(data.to_vec(), shape).unwrap()
}

fn map(entries: &[(&str, Tensor)]) -> BTreeMap<String, Tensor> {
    entries.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn data(m: &BTreeMap<String, Tensor>, key: &str) -> Vec<f32> {
    m[key].cpu_data().unwrap().to_vec()
}

// ---- AdamW -----------------------------------------------------------------------------------

/// The textbook AdamW in f64, written from the formula (not from torch's operation order).
struct RefAdamW {
    lr: f64,
    b1: f64,
    b2: f64,
    eps: f64,
    wd: f64,
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl RefAdamW {
    fn step(&mut self, g: &[f64]) {
        self.t += 1;
        for (((p, m), v), &g) in self.p.iter_mut().zip(&mut self.m).zip(&mut self.v).zip(g) {
            *p *= 1.0 - self.lr * self.wd;
            *m = self.b1 * *m + (1.0 - self.b1) * g;
            *v = self.b2 * *v + (1.0 - self.b2) * g * g;
            let mhat = *m / (1.0 - self.b1.powi(self.t));
            let vhat = *v / (1.0 - self.b2.powi(self.t));
            *p -= self.lr * mhat / (vhat.sqrt() + self.eps);
        }
    }
}

#[test]
fn adamw_three_steps_match_the_formula() {
    let cfg = AdamWConfig { lr: 0.05, betas: (0.8, 0.99), eps: 1e-6, weight_decay: 0.1 };
    let p0 = [0.5f32, -1.25, 2.0, 0.0, -0.003, 7.5];
    let grads = [
        [0.1f32, -0.2, 0.3, 1.5, -0.004, 0.0],
        [-0.3f32, 0.25, 0.3, -1.0, 0.002, 0.7],
        [0.05f32, 0.0, -0.6, 2.5, -0.001, -0.7],
    ];
    let mut opt = AdamW::new(cfg).unwrap();
    let mut params = map(&[("w", t(&p0, &[2, 3]))]);
    let mut r = RefAdamW {
        lr: cfg.lr,
        b1: cfg.betas.0,
        b2: cfg.betas.1,
        eps: cfg.eps,
        wd: cfg.weight_decay,
        p: p0.iter().map(|&x| x as f64).collect(),
        m: vec![0.0; 6],
        v: vec![0.0; 6],
        t: 0,
    };
    for (k, g) in grads.iter().enumerate() {
        opt.step(&mut params, &map(&[("w", t(g, &[2, 3]))])).unwrap();
        r.step(&g.iter().map(|&x| x as f64).collect::<Vec<_>>());
        for (i, (&got, &want)) in data(&params, "w").iter().zip(&r.p).enumerate() {
            let err = (got as f64 - want).abs() / want.abs().max(1e-3);
            assert!(err < 1e-6, "step {k} element {i}: got {got}, want {want} (rel {err:.2e})");
        }
    }
    assert_eq!(opt.steps(), 3);
    assert_eq!(opt.param_state("w").unwrap().step, 3);
}

#[test]
fn adamw_defaults_are_torchs() {
    let c = AdamWConfig::default();
    assert_eq!((c.lr, c.betas, c.eps, c.weight_decay), (1e-3, (0.9, 0.999), 1e-8, 0.01));
}

#[test]
fn weight_decay_alone_on_a_zero_gradient() {
    // m = v = 0, so the Adam term is 0/(0 + eps) = 0 and only the decoupled decay acts.
    let cfg = AdamWConfig { lr: 0.1, weight_decay: 0.5, ..AdamWConfig::default() };
    let p0 = [1.0f32, -2.0, 0.25];
    let mut params = map(&[("w", t(&p0, &[3])), ("frozen", t(&p0, &[3]))]);
    let mut opt = AdamW::new(cfg).unwrap();
    let mut want = p0.to_vec();
    for _ in 0..3 {
        opt.step(&mut params, &map(&[("w", t(&[0.0; 3], &[3]))])).unwrap();
        want.iter_mut().for_each(|x| *x *= (1.0 - 0.1 * 0.5) as f32);
        assert_eq!(data(&params, "w"), want);
    }
    // A parameter without a gradient is skipped entirely (torch's `p.grad is None`): no decay.
    assert_eq!(data(&params, "frozen"), p0);
    assert!(opt.param_state("frozen").is_none());
}

#[test]
fn first_step_moves_by_lr_times_sign() {
    // At t = 1, m̂ = g and v̂ = g², so the step is lr·g/(|g| + eps) ≈ lr·sign(g) at any scale.
    let lr = 1e-2;
    let cfg = AdamWConfig { lr, weight_decay: 0.0, ..AdamWConfig::default() };
    let g = [1e-3f32, -5.0, 0.2, -3e-4, 40.0, 1e-2];
    let p0 = [0.1f32, 0.2, -0.3, 0.4, -0.5, 0.6];
    let mut params = map(&[("w", t(&p0, &[6]))]);
    AdamW::new(cfg).unwrap().step(&mut params, &map(&[("w", t(&g, &[6]))])).unwrap();
    for (i, (&p, &p_before)) in data(&params, "w").iter().zip(&p0).enumerate() {
        let moved = (p - p_before) as f64;
        let want = -lr * (g[i] as f64).signum();
        assert!((moved - want).abs() < lr * 1e-4, "element {i}: moved {moved}, want ≈ {want}");
    }
}

#[test]
fn per_parameter_step_counts_like_torch() {
    // torch keeps `step` per parameter: one that misses a step is bias-corrected for its own count.
    let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.0, ..Default::default() }).unwrap();
    let mut params = map(&[("a", t(&[1.0], &[1])), ("b", t(&[1.0], &[1]))]);
    opt.step(&mut params, &map(&[("a", t(&[0.5], &[1]))])).unwrap();
    opt.step(&mut params, &map(&[("a", t(&[0.5], &[1])), ("b", t(&[0.5], &[1]))])).unwrap();
    assert_eq!(opt.param_state("a").unwrap().step, 2);
    assert_eq!(opt.param_state("b").unwrap().step, 1);
    // b's first step is again ≈ lr·sign(g).
    assert!((data(&params, "b")[0] - (1.0 - 1e-3)).abs() < 1e-7);
}

#[test]
fn adamw_state_round_trips_through_json() {
    let cfg = AdamWConfig { lr: 0.02, ..Default::default() };
    let g = |s: f32| map(&[("w", t(&[0.3 * s, -0.1, 0.7], &[3])), ("b", t(&[s], &[1]))]);
    let init = map(&[("w", t(&[0.1, 0.2, 0.3], &[3])), ("b", t(&[-1.0], &[1]))]);

    // Deep copies: `clone` shares storage, and AdamW updates in place.
    let mut straight: BTreeMap<String, Tensor> = init.iter().map(|(k, v)| (k.clone(), v.copy().unwrap())).collect();
    let mut opt = AdamW::new(cfg).unwrap();
    for s in [1.0, -2.0, 0.5, 3.0] {
        opt.step(&mut straight, &g(s)).unwrap();
    }

    let mut resumed = init;
    let mut opt1 = AdamW::new(cfg).unwrap();
    opt1.step(&mut resumed, &g(1.0)).unwrap();
    opt1.step(&mut resumed, &g(-2.0)).unwrap();
    let json = serde_json::to_string(&opt1.state()).unwrap();
    let mut opt2 = AdamW::from_state(serde_json::from_str::<AdamWState>(&json).unwrap()).unwrap();
    assert_eq!(opt2.steps(), 2);
    opt2.step(&mut resumed, &g(0.5)).unwrap();
    opt2.step(&mut resumed, &g(3.0)).unwrap();
    for k in ["w", "b"] {
        assert_eq!(data(&straight, k), data(&resumed, k), "{k}");
    }
}

#[test]
fn adamw_errors_leave_everything_untouched() {
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    let mut params = map(&[("w", t(&[1.0, 2.0], &[2])), ("u", t(&[3.0], &[1]))]);
    let before: BTreeMap<String, Tensor> = params.iter().map(|(k, v)| (k.clone(), v.copy().unwrap())).collect();

    // A gradient without a parameter (checked before anything moves, even in a later key).
    let e = opt.step(&mut params, &map(&[("u", t(&[1.0], &[1])), ("zz", t(&[1.0], &[1]))])).unwrap_err();
    assert!(matches!(&e, Error::Input(m) if m.contains("zz")), "{e}");
    // A shape mismatch between gradient and parameter.
    let e = opt.step(&mut params, &map(&[("u", t(&[1.0], &[1])), ("w", t(&[1.0, 2.0], &[1, 2]))])).unwrap_err();
    assert!(matches!(&e, Error::Shape { msg, .. } if msg.contains("`w`")), "{e}");
    for k in ["w", "u"] {
        assert_eq!(data(&params, k), data(&before, k));
    }
    assert_eq!(opt.steps(), 0);
    assert!(opt.param_state("u").is_none());

    // A parameter whose shape changed under its optimizer state.
    opt.step(&mut params, &map(&[("w", t(&[1.0, 2.0], &[2]))])).unwrap();
    let mut reshaped = map(&[("w", t(&[1.0, 2.0], &[1, 2]))]);
    let e = opt.step(&mut reshaped, &map(&[("w", t(&[1.0, 2.0], &[1, 2]))])).unwrap_err();
    assert!(matches!(&e, Error::Shape { msg, .. } if msg.contains("optimizer state")), "{e}");
}

#[test]
fn adamw_config_is_validated() {
    for bad in [
        AdamWConfig { lr: -1.0, ..Default::default() },
        AdamWConfig { betas: (1.0, 0.999), ..Default::default() },
        AdamWConfig { betas: (0.9, -0.1), ..Default::default() },
        AdamWConfig { eps: f64::NAN, ..Default::default() },
        AdamWConfig { weight_decay: -0.1, ..Default::default() },
    ] {
        assert!(matches!(AdamW::new(bad), Err(Error::Input(_))), "{bad:?}");
    }
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    assert!(opt.set_lr(f64::INFINITY).is_err());
    opt.set_lr(5e-4).unwrap();
    assert_eq!(opt.config().lr, 5e-4);

    let mut state = opt.state();
    state.params.insert(
        "w".into(),
        bert_adapters::train::ParamState { step: 1, shape: vec![2, 2], exp_avg: vec![0.0; 4], exp_avg_sq: vec![0.0; 3] },
    );
    assert!(matches!(AdamW::from_state(state), Err(Error::Shape { .. })));
}

// ---- clip_grad_norm --------------------------------------------------------------------------

#[test]
fn clip_scales_only_above_max_norm() {
    // Norm over all tensors together: √(3² + 4² + 12²) = 13.
    let mut g = map(&[("a", t(&[3.0, 4.0], &[2])), ("b", t(&[12.0], &[1, 1]))]);
    let n = clip_grad_norm(&mut g, 1.0).unwrap();
    assert_eq!(n, 13.0);
    let coef = (1.0f32 / (13.0f32 + 1e-6)) * 1.0;
    assert_eq!(data(&g, "a"), vec![3.0 * coef, 4.0 * coef]);
    assert_eq!(data(&g, "b"), vec![12.0 * coef]);
    let after = clip_grad_norm(&mut g, 1.0).unwrap();
    assert!((after - 1.0).abs() < 1e-6, "{after}");

    // Below the limit: returned norm, gradients bit-for-bit unchanged.
    let mut g = map(&[("a", t(&[0.3, -0.4], &[2]))]);
    let n = clip_grad_norm(&mut g, 1.0).unwrap();
    assert!((n - 0.5).abs() < 1e-7);
    assert_eq!(data(&g, "a"), vec![0.3, -0.4]);

    // Nothing to clip, and a refused limit.
    assert_eq!(clip_grad_norm(&mut BTreeMap::new(), 1.0).unwrap(), 0.0);
    assert!(matches!(clip_grad_norm(&mut g, -1.0), Err(Error::Input(_))));
    assert!(matches!(clip_grad_norm(&mut g, f32::NAN), Err(Error::Input(_))));
}

// ---- parity with torch (tests/fixtures/training, see its README §3) ----------------------------

fn fixture(name: &str) -> TensorFile {
    TensorFile::open(common::committed_fixture(&format!("training/{name}"))).unwrap()
}

fn load_all(file: &TensorFile, prefix: &str, rename: impl Fn(&str) -> String) -> BTreeMap<String, Tensor> {
    file.names()
        .into_iter()
        .filter_map(|n| n.strip_prefix(prefix).map(|k| (n.clone(), rename(k))))
        .map(|(n, k)| {
            let (d, s) = common::read_f32(file, &n);
            (k, Tensor::from_vec(d, &s).unwrap())
        })
        .collect()
}

/// Compares every tensor (bound `2e-7·(1 + max|ref|)`, a few f32 ulp); returns how many
/// elements are bit-identical to torch's, out of how many.
fn check_params(label: &str, got: &BTreeMap<String, Tensor>, want: &BTreeMap<String, Tensor>) -> (usize, usize) {
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{label}: keys");
    let (mut same, mut total) = (0, 0);
    for (k, w) in want {
        let (g, w) = (&got[k].cpu_data().unwrap(), &w.cpu_data().unwrap());
        // torch's kernels round a few elements differently (vector body vs scalar tail, FMA
        // contraction), so allow a few ulp; a formula error is orders of magnitude larger.
        common::assert_close(&format!("{label} {k}"), g, w, 2e-7);
        same += g.iter().zip(w).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
        total += w.len();
    }
    (same, total)
}

#[test]
fn adamw_with_clipping_matches_torch_single() {
    let file = fixture("adamw_single.safetensors");
    let init = TensorFile::open(common::fixtures().join("adapters/pfeiffer/adapter.safetensors")).unwrap();
    let mut params = load_all(&init, "", str::to_string);
    assert_eq!(params.len(), 8);
    let cfg = AdamWConfig { lr: 1e-2, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01 };
    let mut opt = AdamW::new(cfg).unwrap();
    for k in 0..3 {
        let mut grads = load_all(&file, &format!("grad.{k}."), str::to_string);
        assert_eq!(grads.len(), 8);
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        let (want_norm, _) = common::read_f32(&file, &format!("grad_norm.{k}"));
        assert!((norm as f64 - want_norm[0] as f64).abs() <= 2.0 * f32::EPSILON as f64 * want_norm[0] as f64, "step {k}: norm {norm} vs torch {}", want_norm[0]);
        assert!(norm > 1.0, "the fixture is meant to exercise clipping (norm {norm})");
        opt.step(&mut params, &grads).unwrap();
        let (same, total) = check_params(&format!("step {k}"), &params, &load_all(&file, &format!("step{k}."), str::to_string));
        eprintln!("adamw_single step {k}: {same} of {total} elements bit-identical to torch");
    }
}

#[test]
fn alternating_optimizers_match_torch_parallel() {
    let file = fixture("adamw_parallel.safetensors");
    let adapters = common::fixtures().join("adapters");
    let rename = |from: &'static str, to: &'static str| move |k: &str| k.replace(&format!("adapters.{from}."), &format!("adapters.{to}."));
    let mut params = load_all(&TensorFile::open(adapters.join("pfeiffer_inv/adapter.safetensors")).unwrap(), "", rename("pfeiffer_inv", "scorenn"));
    params.extend(load_all(&TensorFile::open(adapters.join("pfeiffer/adapter.safetensors")).unwrap(), "", rename("pfeiffer", "tasknn")));
    params.extend(load_all(&file, "initial.", str::to_string));
    assert_eq!(params.len(), 32);
    let cfg = AdamWConfig { lr: 1e-2, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01 };
    let mut opts = [AdamW::new(cfg).unwrap(), AdamW::new(cfg).unwrap()];
    for k in 0..6 {
        // Step k trains scorenn (even) or tasknn (odd); the grads are exactly that optimizer's tensors.
        let grads = load_all(&file, &format!("grad.{k}."), str::to_string);
        assert_eq!(grads.len(), if k % 2 == 0 { 20 } else { 12 });
        opts[k % 2].step(&mut params, &grads).unwrap();
    }
    assert_eq!((opts[0].steps(), opts[1].steps()), (3, 3));
    let (same, total) = check_params("after 6 steps", &params, &load_all(&file, "param.", str::to_string));
    eprintln!("adamw_parallel: {same} of {total} elements bit-identical to torch");
}

// ---- Philox and dropout ----------------------------------------------------------------------

#[test]
fn philox4x32_10_known_answers() {
    // Random123 `tests/kat_vectors`, the three `philox4x32 10` lines: counter[4] key[2] → output[4].
    let kat: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        ([0, 0, 0, 0], [0, 0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
        ([0xffffffff; 4], [0xffffffff; 2], [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
        ([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0], [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]),
    ];
    for (ctr, key, want) in kat {
        assert_eq!(philox4x32_10(ctr, key), want, "counter {ctr:08x?} key {key:08x?}");
    }
}

/// `dropout_range` runs whole groups of Philox blocks vectorised and the ragged ends one block
/// at a time: at every offset and length each element must be decided by its own word,
/// `word(stream, offset + j) >= threshold(p)`, and kept values scaled by `1/(1−p)`.
#[test]
fn dropout_range_matches_the_per_element_definition_at_any_offset() {
    let rng = DropoutRng::new(0x0123_4567_89ab_cdef);
    let (p, stream) = (0.37f32, (5u64 << 8) | 1);
    let DropoutParams { threshold, scale } = DropoutParams::new(p).unwrap();
    // The last offsets put a group of eight blocks across a carry into the high counter word.
    for offset in [0usize, 1, 2, 3, 4, 31, 32, 33, 1000, (1 << 33) + 1, (1 << 34) - 40, (1 << 34) - 13] {
        for len in [0usize, 1, 3, 4, 5, 31, 32, 33, 64, 95, 100, 257] {
            let x: Vec<f32> = (0..len).map(|j| 1.0 + j as f32).collect();
            let mut got = x.clone();
            dropout_range(&mut got, p, &rng, stream, offset).unwrap();
            for (j, (&g, &v)) in got.iter().zip(&x).enumerate() {
                let want = if rng.word(stream, (offset + j) as u64) >= threshold { v * scale } else { 0.0 };
                assert_eq!(g.to_bits(), want.to_bits(), "offset {offset}, len {len}, element {j}");
            }
        }
    }
}

#[test]
fn element_to_counter_mapping() {
    // key = seed, counter = [block_lo, block_hi, stream_lo, stream_hi], element i = word i % 4 of block i / 4.
    let rng = DropoutRng::new(0x299f31d0_a4093822);
    let stream = 0x03707344_13198a2e;
    let want = [0xd16cfe09u32, 0x94fdcceb, 0x5001e420, 0x24126ea1];
    assert_eq!(rng.block(stream, 0x85a308d3_243f6a88), want);
    for i in [0u64, 1, 2, 3, 4, 5, 1 << 40, (1 << 40) + 3] {
        assert_eq!(rng.word(stream, i), rng.block(stream, i / 4)[(i % 4) as usize], "element {i}");
    }
    assert_eq!(rng.block(stream, 1 << 40)[0], philox4x32_10([0, 1 << 8, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0])[0]);
}

#[test]
fn keep_rate_within_four_sigma() {
    let n = 1_000_000usize;
    let rng = DropoutRng::new(1234);
    for p in [0.1f32, 0.5] {
        let kept = rng.keep_mask(7, n, p).unwrap().iter().filter(|&&k| k).count() as f64;
        let q = 1.0 - p as f64;
        let sigma = (n as f64 * q * (1.0 - q)).sqrt();
        assert!((kept - n as f64 * q).abs() < 4.0 * sigma, "p = {p}: kept {kept} of {n}, expected {} ± {sigma:.0}", n as f64 * q);
    }
}

#[test]
fn dropout_scales_kept_and_zeroes_dropped() {
    let rng = DropoutRng::new(42);
    let n = 10_007; // not a multiple of 4 or of the parallel chunk
    let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() + 1.5).collect(); // never 0
    for p in [0.1f32, 0.5, 0.9] {
        let mask = rng.keep_mask(3, n, p).unwrap();
        let mut y = x.clone();
        dropout_forward(&mut y, p, &rng, 3).unwrap();
        let scale = (1.0 / (1.0 - p as f64)) as f32;
        assert_eq!(DropoutParams::new(p).unwrap().scale, scale);
        for (i, ((&keep, &x), &y)) in mask.iter().zip(&x).zip(&y).enumerate() {
            let want = if keep { x * scale } else { 0.0 };
            assert_eq!(y.to_bits(), want.to_bits(), "p = {p}, element {i}");
        }
        // The backward recomputes the same mask: same zeros, same scale.
        let mut dy = vec![1.0f32; n];
        dropout_backward(&mut dy, p, &rng, 3).unwrap();
        for (i, (&keep, &d)) in mask.iter().zip(&dy).enumerate() {
            assert_eq!(d, if keep { scale } else { 0.0 }, "backward, p = {p}, element {i}");
        }
    }
}

#[test]
fn dropout_streams_and_seeds() {
    let n = 4096;
    let a = DropoutRng::new(5);
    let m1 = a.keep_mask(0, n, 0.5).unwrap();
    assert_eq!(m1, a.keep_mask(0, n, 0.5).unwrap(), "same (seed, stream) must reproduce");
    assert_eq!(m1, DropoutRng { seed: 5 }.keep_mask(0, n, 0.5).unwrap());
    let m2 = a.keep_mask(1, n, 0.5).unwrap();
    let m3 = DropoutRng::new(6).keep_mask(0, n, 0.5).unwrap();
    for (other, what) in [(&m2, "another stream"), (&m3, "another seed")] {
        let same = m1.iter().zip(other).filter(|(x, y)| x == y).count();
        // Independent masks agree on about half the elements.
        assert!((same as f64 - n as f64 / 2.0).abs() < 4.0 * (n as f64 / 4.0).sqrt(), "{what}: {same} of {n} equal");
    }
    // A mask is a prefix-stable function of the element index: a longer draw extends a shorter one.
    assert_eq!(&a.keep_mask(0, 3 * n + 3, 0.5).unwrap()[..n], &m1[..]);
}

#[test]
fn dropout_p_zero_is_identity_and_p_is_validated() {
    let rng = DropoutRng::new(9);
    let x: Vec<f32> = (0..100).map(|i| i as f32 - 50.5).collect();
    let mut y = x.clone();
    dropout_forward(&mut y, 0.0, &rng, 0).unwrap();
    assert_eq!(y, x);
    dropout_backward(&mut y, 0.0, &rng, 0).unwrap();
    assert_eq!(y, x);
    assert!(rng.keep_mask(0, 100, 0.0).unwrap().iter().all(|&k| k));
    for p in [1.0f32, 1.5, -0.1, f32::NAN] {
        assert!(matches!(dropout_forward(&mut y, p, &rng, 0), Err(Error::Input(_))), "p = {p}");
        assert!(matches!(rng.keep_mask(0, 10, p), Err(Error::Input(_))), "p = {p}");
    }
    assert_eq!(y, x, "a refused p must leave the data alone");
}

