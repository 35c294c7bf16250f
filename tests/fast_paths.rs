//! The fast CPU path's restructurings (issue 11) change no result: the adapter location run in
//! chunks of examples equals the whole-tensor composition (to rounding), and the products'
//! per-row-block epilogues (dropout, activation, activation gradient) equal the separate ops bit
//! for bit, at shapes that leave ragged blocks.

mod common;

use bert_adapters::backend::{AdapterLocation, DropoutSpec, LayerNormParams, LocationSteps};
use bert_adapters::config::ResidualBeforeLn;
use bert_adapters::{Activation, Backend, CpuBackend, Tensor};
use common::{random_vec, FullBranch};
use rand::{rngs::StdRng, SeedableRng};

fn t(rng: &mut StdRng, shape: &[usize], scale: f32) -> Tensor {
    Tensor::from_vec(random_vec(rng, shape.iter().product(), scale), shape).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.cpu_data().unwrap().iter().map(|v| v.to_bits()).collect()
}

fn drop_spec(p: f32, blocks: usize) -> DropoutSpec {
    DropoutSpec { p, seed: 1234, stream: 3, blocks: (0..blocks as u64).collect(), seed_buffer: None, offset: 0 }
}

/// A branch dropout of p = 0 is the identity but sends the location down the whole-tensor path:
/// the chunked path must agree to rounding. Not bit for bit: gemm may round a row's small
/// products differently with the number of rows it is handed (measured: 1 ulp); a chunk read
/// from the wrong rows would be off by O(1).
#[test]
fn chunked_adapter_location_equals_the_whole_tensor_path() {
    let be = CpuBackend::fast();
    let mut rng = StdRng::seed_from_u64(11);
    // T = 5: 12 examples per chunk; 30 examples leave a ragged last chunk.
    for (examples, seq, hidden, m) in [(30usize, 5usize, 24usize, 6usize), (3, 64, 40, 8), (5, 70, 16, 4)] {
        let (b0, b1) = (FullBranch::new(&mut rng, hidden, m, 0.7), FullBranch::new(&mut rng, hidden, m, 0.7));
        let (g, beta) = (t(&mut rng, &[hidden], 1.0), t(&mut rng, &[hidden], 0.5));
        for replicate in [true, false] {
            let rows = if replicate { examples } else { 2 * examples };
            let (hs, rs) = (t(&mut rng, &[rows, seq, hidden], 1.5), t(&mut rng, &[rows, seq, hidden], 1.5));
            for (residual, before, after) in [(ResidualBeforeLn::True, true, true), (ResidualBeforeLn::PostAdd, true, false), (ResidualBeforeLn::False, false, true)] {
                let steps = LocationSteps { residual_before_ln: residual, original_ln_before: before, original_ln_after: after };
                let run = |dropout: Option<DropoutSpec>| {
                    let branches = [b0.params_with(dropout.clone(), true), b1.params_with(dropout, false)];
                    let loc = AdapterLocation { h: &hs, r: &rs, layer_norm: LayerNormParams { gamma: &g, beta: &beta, eps: 1e-12 }, steps, branches: &branches, replicate, seq_len: seq };
                    be.adapter_location(&loc).unwrap()
                };
                let (chunked, whole) = (run(None), run(Some(drop_spec(0.0, 1))));
                assert_eq!(chunked.shape(), whole.shape());
                let (c, w) = (chunked.cpu_data().unwrap().to_vec(), whole.cpu_data().unwrap().to_vec());
                let diff = c.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(diff <= 1e-6 * (1.0 + scale), "chunked location differs by {diff:e}: {examples}x{seq}x{hidden}, replicate {replicate}, {residual:?}");
            }
        }
    }
}

#[test]
fn product_epilogues_equal_the_separate_ops() {
    let be = CpuBackend::fast();
    let mut rng = StdRng::seed_from_u64(12);
    // 1000 rows: row blocks of 512 and 488 on two threads; 7 rows: one block.
    for (rows, d_in, d_out) in [(1000usize, 96usize, 130usize), (7, 33, 20), (300, 384, 1536)] {
        let (x, w, b) = (t(&mut rng, &[rows, d_in], 1.0), t(&mut rng, &[d_out, d_in], 0.2), t(&mut rng, &[d_out], 0.5));
        let plain = be.linear(&x, &w, Some(&b)).unwrap();
        for blocks in [1usize, 2] {
            if rows % blocks != 0 {
                continue;
            }
            let spec = drop_spec(0.3, blocks);
            let fused = be.linear_dropout(&x, &w, Some(&b), Some(&spec)).unwrap();
            assert_eq!(bits(&fused), bits(&be.dropout(&plain, &spec).unwrap()), "linear_dropout {rows}x{d_in}x{d_out}, {blocks} blocks");
        }
        for act in [Activation::Gelu, Activation::Relu, Activation::Tanh] {
            let (y, pre) = be.linear_act(&x, &w, Some(&b), act).unwrap();
            assert_eq!(bits(&pre), bits(&plain), "linear_act's pre-activation");
            let separate = be.activation(&plain, act).unwrap();
            assert_eq!(bits(&y), bits(&separate), "linear_act {act:?}");
            assert_eq!(bits(&be.linear_act_only(&x, &w, Some(&b), act).unwrap()), bits(&separate), "linear_act_only {act:?}");

            let dy = t(&mut rng, &[rows, d_out], 1.0);
            let pre_in = t(&mut rng, &[rows, d_in], 2.0);
            let fused_ok = be.linear_backward_input_act(&dy, &w, &pre_in, act).unwrap();
            let separate = be.activation_backward(&be.linear_backward_input(&dy, &w).unwrap(), &pre_in, act).unwrap();
            assert_eq!(bits(&fused_ok), bits(&separate), "linear_backward_input_act {act:?}");
        }
    }
}

/// The fast LayerNorm backward (f32 lane sums, row blocks in parallel, `dγ`/`dβ` summed per block)
/// against the f64 reference, at widths that leave lane remainders and a ragged last block.
#[test]
fn fast_layernorm_backward_matches_the_reference() {
    use bert_adapters::cpu::{fast, reference};
    let mut rng = StdRng::seed_from_u64(13);
    for (rows, cols) in [(130usize, 37usize), (200, 384), (3, 5)] {
        let z = random_vec(&mut rng, rows * cols, 3.0);
        let dy = random_vec(&mut rng, rows * cols, 1.0);
        let gamma = random_vec(&mut rng, cols, 1.5);
        let (want_dz, want_dg, want_db) = reference::layernorm_backward(&dy, &z, &gamma, cols, 1e-5);
        let (dz, dg, db) = fast::layernorm_backward(&dy, &z, &gamma, cols, 1e-5);
        for (name, got, want) in [("dz", &dz, &want_dz), ("dgamma", &dg, &want_dg), ("dbeta", &db, &want_db)] {
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = got.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= 1e-5 * (1.0 + scale), "{name} {rows}x{cols}: {err:e} (scale {scale})");
        }
        // From the forward's statistics: the same dz.
        let (_, stats) = fast::layernorm_with_stats(&z, &gamma, &vec![0.0; cols], cols, 1e-5);
        let (mean, rstd): (Vec<f32>, Vec<f32>) = stats.chunks(2).map(|s| (s[0], s[1])).unzip();
        let from_stats = fast::layernorm_backward_from_stats(&dy, &z, &mean, &rstd, &gamma, cols);
        assert_eq!(from_stats, dz, "from stats {rows}x{cols}");
    }
}
