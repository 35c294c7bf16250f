//! The backward ops that write or accumulate into given outputs (`*_into`): write mode is the
//! returned-tensor op; accumulate mode adds the op's result to what the destination held (in the
//! product on the fast path: gemm reads the destination as its first k-block's starting value,
//! so the sum is rounded in another order); a destination of the wrong shape is a shape error
//! naming the op and the tensor; a destination sharing storage with an input is an
//! `Error::Internal`, and nothing is written.

mod common;

use bert_adapters::backend::{AdapterLocation, BottleneckGrads, BottleneckParams, GradsOut, LayerNormParams, LocationSteps, NiceGrads, NiceParams};
use bert_adapters::config::ResidualBeforeLn;
use bert_adapters::{Activation, Backend, CpuBackend, Error, Tensor};
use common::{assert_close, random_vec, FullBranch};
use rand::{rngs::StdRng, SeedableRng};

/// Accumulating in the product changes only the rounding: the old value joins the sum at the
/// first k-block instead of after the last, a few f32 ulps of the partial sums, whose magnitude
/// is bounded by max|result| here (inputs of one sign-mixed scale). 1e-6·(1 + max|ref|) is ~8
/// ulps at the largest element; a missing or doubled term is orders of magnitude above it.
const ACC_TOL: f64 = 1e-6;

fn t(rng: &mut StdRng, shape: &[usize], scale: f32) -> Tensor {
    Tensor::from_vec(random_vec(rng, shape.iter().product(), scale), shape).unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.cpu_data().unwrap().to_vec()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.cpu_data().unwrap().iter().map(|v| v.to_bits()).collect()
}

fn plus(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(a, b)| a + b).collect()
}

fn backends() -> [CpuBackend; 2] {
    [CpuBackend::fast(), CpuBackend::reference()]
}

/// Accumulate-mode results: the reference computes and then adds, so it is `old + op` bit for
/// bit; the fast path accumulates in the product, within `ACC_TOL`.
fn check_accumulated(be: &CpuBackend, name: &str, got: &Tensor, old: &[f32], op: &Tensor) {
    let want = plus(old, &host(op));
    if be.mode() == bert_adapters::CpuMode::Reference {
        assert_eq!(host(got), want, "{name} [{}]: old + op bit for bit", be.name());
    } else {
        assert_close(&format!("{name} [{}]", be.name()), &host(got), &want, ACC_TOL);
    }
}

#[track_caller]
fn assert_shape_error(r: bert_adapters::Result<()>, op: &str, tensor: &str) {
    match r {
        Err(e @ Error::Shape { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(op) && msg.contains(tensor), "the error must name {op} and {tensor}: {msg}");
        }
        other => panic!("expected a shape error naming {op} and {tensor}, got {other:?}"),
    }
}

#[track_caller]
fn assert_alias_error(r: bert_adapters::Result<()>, op: &str) {
    match r {
        Err(e @ Error::Internal(_)) => assert!(e.to_string().contains(op), "{e}"),
        other => panic!("expected Error::Internal from {op}, got {other:?}"),
    }
}

#[test]
fn linear_input_gradient_into() {
    let mut rng = StdRng::seed_from_u64(1);
    // k = d_out = 600 spans several of gemm's k-blocks, so accumulation really happens mid-product.
    for (rows, d_in, d_out) in [(13, 24, 17), (9, 40, 600), (0, 5, 3)] {
        let (dy, w) = (t(&mut rng, &[rows, d_out], 1.0), t(&mut rng, &[d_out, d_in], 0.5));
        let want = CpuBackend::reference().linear_backward_input(&dy, &w).unwrap();
        for be in backends() {
            let op = be.linear_backward_input(&dy, &w).unwrap();
            assert_close(&format!("dx [{}] vs the reference", be.name()), &host(&op), &host(&want), 1e-5);
            // Write mode over garbage equals the returned op bit for bit.
            let out = Tensor::from_vec(vec![f32::NAN; rows * d_in], &[rows, d_in]).unwrap();
            be.linear_backward_input_into(&dy, &w, &out, false).unwrap();
            assert_eq!(bits(&out), bits(&op), "write mode [{}]", be.name());
            let old = random_vec(&mut rng, rows * d_in, 3.0);
            let acc = Tensor::from_vec(old.clone(), &[rows, d_in]).unwrap();
            be.linear_backward_input_into(&dy, &w, &acc, true).unwrap();
            check_accumulated(&be, "dx += dy·W", &acc, &old, &op);
        }
    }
}

#[test]
fn linear_parameter_gradients_into() {
    let mut rng = StdRng::seed_from_u64(2);
    for (rows, d_in, d_out) in [(13, 24, 17), (700, 9, 5), (0, 4, 3)] {
        let (dy, x) = (t(&mut rng, &[rows, d_out], 1.0), t(&mut rng, &[rows, d_in], 1.0));
        let (want_w, want_b) = CpuBackend::reference().linear_backward_params(&dy, &x).unwrap();
        for be in backends() {
            let (dw, db) = be.linear_backward_params(&dy, &x).unwrap();
            assert_close(&format!("dw [{}] vs the reference", be.name()), &host(&dw), &host(&want_w), 1e-5);
            assert_eq!(bits(&db), bits(&want_b), "db: f64 row sums in both modes");
            // dw and db as disjoint views of one arena, as train_step gives them.
            let arena = Tensor::from_vec(vec![f32::NAN; d_out * d_in + d_out + 1], &[d_out * d_in + d_out + 1]).unwrap();
            let (aw, ab) = (arena.view(0, &[d_out, d_in]).unwrap(), arena.view(d_out * d_in, &[d_out]).unwrap());
            be.linear_backward_params_into(&dy, &x, &aw, Some(&ab), false).unwrap();
            assert_eq!((bits(&aw), bits(&ab)), (bits(&dw), bits(&db)), "write mode [{}]", be.name());
            assert!(host(&arena)[d_out * d_in + d_out].is_nan(), "nothing written past the destinations");
            let (old_w, old_b) = (random_vec(&mut rng, d_out * d_in, 2.0), random_vec(&mut rng, d_out, 2.0));
            be.write_f32(&aw, &old_w).unwrap();
            be.write_f32(&ab, &old_b).unwrap();
            be.linear_backward_params_into(&dy, &x, &aw, Some(&ab), true).unwrap();
            check_accumulated(&be, "dw += dyᵀ·x", &aw, &old_w, &dw);
            // The bias sum is rounded once and then added, in both modes.
            assert_eq!(host(&ab), plus(&old_b, &host(&db)), "db += Σ dy [{}]", be.name());
            // No bias: only dw.
            let lone = Tensor::from_vec(old_w.clone(), &[d_out, d_in]).unwrap();
            be.linear_backward_params_into(&dy, &x, &lone, None, true).unwrap();
            check_accumulated(&be, "dw += dyᵀ·x (no bias)", &lone, &old_w, &dw);
        }
    }
}

#[test]
fn first_token_gradient_into() {
    let mut rng = StdRng::seed_from_u64(3);
    let (b, seq, h) = (3, 5, 4);
    let d = t(&mut rng, &[b, h], 1.0);
    for be in backends() {
        let op = be.first_token_backward(&d, seq).unwrap();
        let out = Tensor::from_vec(vec![f32::NAN; b * seq * h], &[b, seq, h]).unwrap();
        be.first_token_backward_into(&d, &out, false).unwrap();
        assert_eq!(bits(&out), bits(&op), "write mode zeroes the other positions");
        let old = random_vec(&mut rng, b * seq * h, 1.0);
        let acc = Tensor::from_vec(old.clone(), &[b, seq, h]).unwrap();
        be.first_token_backward_into(&d, &acc, true).unwrap();
        assert_eq!(host(&acc), plus(&old, &host(&op)), "accumulate adds at position 0 and leaves the rest");
    }
}

fn grads_list(g: &BottleneckGrads) -> Vec<Tensor> {
    let mut v = vec![g.down_w.clone(), g.down_b.clone(), g.up_w.clone(), g.up_b.clone()];
    for (a, b) in [&g.ln_before, &g.ln_after, &g.gate].into_iter().flatten() {
        v.extend([a.clone(), b.clone()]);
    }
    v.extend(g.scaling.clone());
    v
}

#[test]
fn adapter_location_gradients_into() {
    let mut rng = StdRng::seed_from_u64(4);
    let (b, seq, h, m) = (2, 3, 8, 4);
    let (hs, rs) = (t(&mut rng, &[b, seq, h], 1.0), t(&mut rng, &[b, seq, h], 1.0));
    let (g, beta) = (t(&mut rng, &[h], 1.0), t(&mut rng, &[h], 0.5));
    let d_out = t(&mut rng, &[2 * b, seq, h], 1.0);
    let (b0, b1) = (FullBranch::new(&mut rng, h, m, 0.5), FullBranch::new(&mut rng, h, m, 0.5));
    let branches = [b0.params(), b1.params()];
    let steps = LocationSteps { residual_before_ln: ResidualBeforeLn::True, original_ln_before: true, original_ln_after: true };
    let loc = AdapterLocation { h: &hs, r: &rs, layer_norm: LayerNormParams { gamma: &g, beta: &beta, eps: 1e-12 }, steps, branches: &branches, replicate: true, seq_len: seq };
    let want = CpuBackend::reference().adapter_location_backward(&loc, &d_out, &[true, true], true).unwrap();
    for be in backends() {
        let ret = be.adapter_location_backward(&loc, &d_out, &[true, false], true).unwrap();
        assert!(ret.branches[1].is_none(), "a frozen branch gets no gradients");
        let ret_g = grads_list(ret.branches[0].as_ref().unwrap());
        for (got, want) in ret_g.iter().zip(grads_list(want.branches[0].as_ref().unwrap())) {
            assert_close(&format!("adapter gradient [{}] vs the reference", be.name()), &host(got), &host(&want), 1e-5);
        }
        // Write mode over garbage: the returned op's gradients, and the same input gradients.
        let alloc = |shape: &[usize]| Ok(Tensor::from_vec(vec![f32::NAN; shape.iter().product()], shape).unwrap());
        let dest = BottleneckGrads::shaped_like(&branches[0], alloc).unwrap();
        let (dh, dr) = be.adapter_location_backward_into(&loc, &d_out, &[Some(GradsOut { grads: dest.clone(), accumulate: false }), None], true).unwrap();
        assert_eq!((bits(&dh.unwrap()), bits(&dr.unwrap())), (bits(ret.dh.as_ref().unwrap()), bits(ret.dr.as_ref().unwrap())));
        for (got, op) in grads_list(&dest).iter().zip(&ret_g) {
            assert_eq!(bits(got), bits(op), "write mode [{}]", be.name());
        }
        // Accumulate onto old values.
        let olds: Vec<Vec<f32>> = ret_g.iter().map(|t| random_vec(&mut rng, t.elem_count(), 1.0)).collect();
        for (d, old) in grads_list(&dest).iter().zip(&olds) {
            be.write_f32(d, old).unwrap();
        }
        be.adapter_location_backward_into(&loc, &d_out, &[Some(GradsOut { grads: dest.clone(), accumulate: true }), None], false).unwrap();
        for ((got, old), op) in grads_list(&dest).iter().zip(&olds).zip(&ret_g) {
            check_accumulated(&be, "adapter gradient", got, old, op);
        }
        // The same adapter in two branches, sharing destinations: the second accumulates.
        let same = [b0.params(), b0.params()];
        let loc2 = AdapterLocation { branches: &same, ..loc };
        let sep = be.adapter_location_backward(&loc2, &d_out, &[true, true], false).unwrap();
        let shared = BottleneckGrads::shaped_like(&same[0], alloc).unwrap();
        let outs = [Some(GradsOut { grads: shared.clone(), accumulate: false }), Some(GradsOut { grads: shared.clone(), accumulate: true })];
        be.adapter_location_backward_into(&loc2, &d_out, &outs, false).unwrap();
        let (s0, s1) = (grads_list(sep.branches[0].as_ref().unwrap()), grads_list(sep.branches[1].as_ref().unwrap()));
        for ((got, a), c) in grads_list(&shared).iter().zip(&s0).zip(&s1) {
            check_accumulated(&be, "Parallel(a, a) gradient", got, &host(a), c);
        }
    }
}

#[test]
fn nice_gradients_into() {
    let mut rng = StdRng::seed_from_u64(5);
    let (h, k) = (7, 5); // s1 = 3, s2 = 4
    let ts: Vec<Tensor> = [[k, 4], [k, 1], [3, k], [3, 1], [k, 3], [k, 1], [4, k], [4, 1]]
        .iter()
        .map(|[a, b]| if *b == 1 { t(&mut rng, &[*a], 0.5) } else { t(&mut rng, &[*a, *b], 0.5) })
        .collect();
    let p = NiceParams { f0: (&ts[0], &ts[1]), f2: (&ts[2], &ts[3]), g0: (&ts[4], &ts[5]), g2: (&ts[6], &ts[7]), activation: Activation::Relu };
    let (x, dy) = (t(&mut rng, &[2, 3, h], 1.0), t(&mut rng, &[2, 3, h], 1.0));
    let list = |g: &NiceGrads| vec![g.f0.0.clone(), g.f0.1.clone(), g.f2.0.clone(), g.f2.1.clone(), g.g0.0.clone(), g.g0.1.clone(), g.g2.0.clone(), g.g2.1.clone()];
    let want = list(&CpuBackend::reference().nice_backward(&x, &p, &dy).unwrap());
    for be in backends() {
        let op = list(&be.nice_backward(&x, &p, &dy).unwrap());
        for (got, want) in op.iter().zip(&want) {
            assert_close(&format!("NICE gradient [{}] vs the reference", be.name()), &host(got), &host(want), 1e-5);
        }
        let dest = NiceGrads::shaped_like(&p, |s| Ok(Tensor::from_vec(vec![f32::NAN; s.iter().product()], s).unwrap())).unwrap();
        be.nice_backward_into(&x, &p, &dy, &GradsOut { grads: dest.clone(), accumulate: false }).unwrap();
        for (got, op) in list(&dest).iter().zip(&op) {
            assert_eq!(bits(got), bits(op), "write mode [{}]", be.name());
        }
        be.nice_backward_into(&x, &p, &dy, &GradsOut { grads: dest.clone(), accumulate: true }).unwrap();
        for (got, op) in list(&dest).iter().zip(&op) {
            check_accumulated(&be, "NICE gradient, twice", got, &host(op), op);
        }
        // A destination of the wrong shape, and one that is a parameter.
        let mut bad = dest.clone();
        bad.g2.1 = Tensor::zeros(&[5]);
        assert_shape_error(be.nice_backward_into(&x, &p, &dy, &GradsOut { grads: bad, accumulate: false }), "nice_backward_into", "G.2.bias");
        let mut alias = dest.clone();
        alias.f0.1 = ts[1].clone();
        let before = host(&ts[1]);
        assert_alias_error(be.nice_backward_into(&x, &p, &dy, &GradsOut { grads: alias, accumulate: true }), "nice_backward_into");
        assert_eq!(host(&ts[1]), before, "nothing written");
    }
}

#[test]
fn wrong_destination_shapes_are_errors_naming_the_op_and_the_tensor() {
    let mut rng = StdRng::seed_from_u64(6);
    let (dy, w, x) = (t(&mut rng, &[4, 3], 1.0), t(&mut rng, &[3, 5], 1.0), t(&mut rng, &[4, 5], 1.0));
    for be in backends() {
        assert_shape_error(be.linear_backward_input_into(&dy, &w, &Tensor::zeros(&[4, 3]), false), "linear_backward_input_into", "out");
        assert_shape_error(be.linear_backward_params_into(&dy, &x, &Tensor::zeros(&[5, 3]), None, true), "linear_backward_params_into", "dw");
        assert_shape_error(be.linear_backward_params_into(&dy, &x, &Tensor::zeros(&[3, 5]), Some(&Tensor::zeros(&[5])), false), "linear_backward_params_into", "db");
        assert_shape_error(be.first_token_backward_into(&x, &Tensor::zeros(&[4, 2, 3]), false), "first_token_backward_into", "out");
        assert_shape_error(be.first_token_backward_into(&x, &Tensor::zeros(&[4, 5]), true), "first_token_backward_into", "out");
    }
    // An adapter destination: wrong shape, and a gate gradient for an adapter without a gate.
    let (b, seq, h, m) = (1, 2, 8, 4);
    let (hs, rs, g, beta, d_out) = (t(&mut rng, &[b, seq, h], 1.0), t(&mut rng, &[b, seq, h], 1.0), t(&mut rng, &[h], 1.0), t(&mut rng, &[h], 1.0), t(&mut rng, &[b, seq, h], 1.0));
    let branch = FullBranch::new(&mut rng, h, m, 0.5);
    let p = BottleneckParams { gate: None, ..branch.params() };
    let branches = [p];
    let steps = LocationSteps { residual_before_ln: ResidualBeforeLn::False, original_ln_before: false, original_ln_after: true };
    let loc = AdapterLocation { h: &hs, r: &rs, layer_norm: LayerNormParams { gamma: &g, beta: &beta, eps: 1e-12 }, steps, branches: &branches, replicate: false, seq_len: seq };
    for be in backends() {
        let good = BottleneckGrads::shaped_like(&branches[0], |s| Ok(Tensor::zeros(s))).unwrap();
        let mut bad = good.clone();
        bad.up_w = Tensor::zeros(&[m, h]);
        assert_shape_error(be.adapter_location_backward_into(&loc, &d_out, &[Some(GradsOut { grads: bad, accumulate: false })], true).map(|_| ()), "adapter_location_backward_into", "up weight");
        let gated = BottleneckGrads { gate: Some((Tensor::zeros(&[1, h]), Tensor::zeros(&[1]))), ..good.clone() };
        assert_shape_error(be.adapter_location_backward_into(&loc, &d_out, &[Some(GradsOut { grads: gated, accumulate: false })], true).map(|_| ()), "adapter_location_backward_into", "gate");
        // A destination that is the location's input, and two destinations that overlap.
        let alias = BottleneckGrads { up_b: hs.view(0, &[h]).unwrap(), ..good.clone() };
        assert_alias_error(be.adapter_location_backward_into(&loc, &d_out, &[Some(GradsOut { grads: alias, accumulate: false })], true).map(|_| ()), "adapter_location_backward_into");
        let overlap = BottleneckGrads { down_b: good.up_b.view(0, &[m]).unwrap(), ..good.clone() };
        assert_alias_error(be.adapter_location_backward_into(&loc, &d_out, &[Some(GradsOut { grads: overlap, accumulate: false })], true).map(|_| ()), "adapter_location_backward_into");
        be.adapter_location_backward_into(&loc, &d_out, &[Some(GradsOut { grads: good, accumulate: false })], true).unwrap();
    }
}

/// A destination that aliases an input (the same storage, or another view of it) is an
/// `Error::Internal` before anything is written: never a deadlock, never a product read while
/// it is being written.
#[test]
fn destinations_aliasing_inputs_are_errors() {
    let mut rng = StdRng::seed_from_u64(7);
    let n = 6;
    let (w, x) = (t(&mut rng, &[n, n], 1.0), t(&mut rng, &[n, n], 1.0));
    let buf = t(&mut rng, &[2 * n * n], 1.0);
    let (dy, other) = (buf.view(0, &[n, n]).unwrap(), buf.view(n * n, &[n, n]).unwrap());
    for be in backends() {
        let before = host(&buf);
        assert_alias_error(be.linear_backward_input_into(&dy, &w, &dy.clone(), true), "linear_backward_input_into");
        // Disjoint, but the same storage as the input.
        assert_alias_error(be.linear_backward_input_into(&dy, &w, &other, false), "linear_backward_input_into");
        assert_alias_error(be.linear_backward_input_into(&dy, &w, &w, true), "linear_backward_input_into");
        assert_alias_error(be.linear_backward_params_into(&dy, &x, &x, None, false), "linear_backward_params_into");
        assert_alias_error(be.linear_backward_params_into(&dy, &x, &other, None, false), "linear_backward_params_into");
        // dw and db overlapping each other.
        let arena = Tensor::zeros(&[n * n + n]);
        let (dw, db) = (arena.view(0, &[n, n]).unwrap(), arena.view(n * n - 1, &[n]).unwrap());
        assert_alias_error(be.linear_backward_params_into(&dy, &x, &dw, Some(&db), false), "linear_backward_params_into");
        let d = dy.clone();
        let out = buf.view(n * n, &[n, 1, n]).unwrap();
        assert_alias_error(be.first_token_backward_into(&d, &out, true), "first_token_backward_into");
        assert_eq!(host(&buf), before, "nothing was written [{}]", be.name());
        // The same calls with distinct storages work.
        be.linear_backward_input_into(&dy, &w, &Tensor::zeros(&[n, n]), true).unwrap();
    }
}

/// `BertModel::backward` accumulates the pooler's first-token gradient into the gradient of the
/// last hidden state only when it owns that buffer: the caller's `d_last`, which it still holds,
/// is read, never written, and the result equals that of a fresh copy of it.
#[test]
fn backward_never_writes_the_callers_gradient() {
    for be in [std::sync::Arc::new(CpuBackend::fast()) as std::sync::Arc<dyn Backend>, std::sync::Arc::new(CpuBackend::reference())] {
        let (mut model, batch) = common::tiny(be.clone());
        model.add_adapter_seeded("a", bert_adapters::AdapterConfig::named("pfeiffer").unwrap(), 1).unwrap();
        model.set_active_adapters(Some(common::setup(&["a"]))).unwrap();
        model.train_adapter(&["a"]).unwrap();
        let (out, tape) = model.forward_train(&batch).unwrap();
        let pooled = out.pooler_output.as_ref().expect("the tiny BERT has a pooler");
        let mut rng = StdRng::seed_from_u64(8);
        let (d_last, d_pool) = (t(&mut rng, out.last_hidden_state.shape(), 1.0), t(&mut rng, pooled.shape(), 1.0));
        let kept = host(&d_last);
        let grads = model.backward(&tape, &d_last, Some(&d_pool)).unwrap();
        assert_eq!(host(&d_last), kept, "[{}] the caller's gradient was written", be.name());
        let fresh = model.backward(&tape, &Tensor::from_vec(kept.clone(), d_last.shape()).unwrap(), Some(&d_pool)).unwrap();
        let without = model.backward(&tape, &d_last, None).unwrap();
        for (k, g) in &grads {
            assert_eq!(bits(g), bits(&fresh[k]), "{k}");
        }
        assert!(grads.iter().any(|(k, g)| host(g) != host(&without[k])), "the pooler's gradient reaches the adapter");
    }
}
