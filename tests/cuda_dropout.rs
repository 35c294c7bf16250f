//! Dropout on the CUDA backend (issue 14: "dropout masks equal to the CPU's for the same seed"):
//! the device's Philox4x32-10 masks against `DropoutRng`'s, bit for bit, and every op that
//! applies a `DropoutSpec` against the CPU backend on the same spec. Runs on cuda-sim in CI (every
//! schedule) and on a GPU when one is present.
//!
//! Masks and plain dropout are bit-exact (one f32 multiply by the same scale); ops with a product
//! or a LayerNorm before the mask drop the same elements and keep the rest within
//! `1e-5·(1 + max|ref|)`.

use bert_adapters::backend::{Backend, DropoutSpec, LayerNormParams, SeedBuffer};
use bert_adapters::cpu::CpuBackend;
use bert_adapters::cuda::backend::CudaBackend;
use bert_adapters::cuda::gpu::Gpu;
use bert_adapters::train::dropout::{DropoutParams, DropoutRng};
use bert_adapters::{test_device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn backend(gpu: &Gpu) -> CudaBackend {
    CudaBackend::on(gpu.reopen().unwrap())
}

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn spec(p: f32, seed: u64, stream: u64, blocks: Vec<u64>) -> DropoutSpec {
    DropoutSpec { p, seed, stream, blocks, seed_buffer: None, offset: 0 }
}

/// `spec` reading its seed from a `[2]` buffer on `be` (and holding a wrong `seed`, so a kernel
/// that ignored the buffer would fail).
fn with_buffer(be: &dyn Backend, mut s: DropoutSpec, seed: u64) -> DropoutSpec {
    s.seed = seed ^ 0x5555;
    s.seed_buffer = Some(SeedBuffer(be.upload_u32(vec![seed as u32, (seed >> 32) as u32], &[2]).unwrap()));
    s
}

/// Same zeros, kept values within the tolerance.
fn assert_same_mask_close(label: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    let tol = 1e-5 * (1.0 + want.iter().fold(0f32, |m, v| m.max(v.abs())));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(*g == 0.0, *w == 0.0, "{label}: [{i}] = {g}, CPU {w} (a different mask)");
        assert!((g - w).abs() <= tol, "{label}: [{i}] = {g}, CPU {w}, tol {tol:e}");
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn masks_match_the_cpu_bit_for_bit(gpu: &Gpu) {
    let be = backend(gpu);
    // 1037: not a multiple of 4, so the last Philox block is partial.
    let n = 1037;
    let ones = be.upload(vec![1.0; n], &[n]).unwrap();
    let seeds = [0u64, 1, 0xdead_beef_1234_5678, u64::MAX];
    let streams = [0u64, 7, (3 << 4) | 2, u64::MAX >> 8];
    let ps = [0.0f32, 0.1, 0.5, 0.999_999];
    for (k, &seed) in seeds.iter().enumerate() {
        // Every p with every seed; streams rotate so each is seen with several seeds and p.
        for (q, &p) in ps.iter().enumerate() {
            let stream = streams[(k + q) % streams.len()];
            let s = spec(p, seed, stream, vec![0]);
            let got = be.to_host(&be.dropout(&ones, &s).unwrap()).unwrap();
            let keep = DropoutRng::new(seed).keep_mask(s.block_stream(0), n, p).unwrap();
            let scale = if p == 0.0 { 1.0 } else { DropoutParams::new(p).unwrap().scale };
            for (i, (g, kept)) in got.iter().zip(&keep).enumerate() {
                let want = if *kept { scale } else { 0.0 };
                assert_eq!(g.to_bits(), want.to_bits(), "seed {seed:#x} stream {stream} p {p}: element {i}");
            }
            let dropped = keep.iter().filter(|k| !**k).count();
            match p {
                0.0 => assert_eq!(dropped, 0),
                p if p > 0.99 => assert!(dropped > n - 5, "p {p} dropped only {dropped}"),
                _ => assert!(dropped > 0 && dropped < n),
            }
        }
    }
}
test_device!(masks, masks_match_the_cpu_bit_for_bit);

fn dropout_op_matches_the_cpu(gpu: &Gpu) {
    let be = backend(gpu);
    let cpu = CpuBackend::fast();
    let mut rng = StdRng::seed_from_u64(14);
    // 3 Parallel blocks of 2·5 rows of 12 (each block 120 elements), with and without a buffer.
    let x = random(&mut rng, 3 * 10 * 12, 3.0);
    let (xd, xc) = (be.upload(x.clone(), &[30, 12]).unwrap(), cpu.upload(x.clone(), &[30, 12]).unwrap());
    for (seed, blocks) in [(9u64, vec![0, 1, 2]), (0xfeed_f00d_0000_0001, vec![2, 0, 5]), (3, vec![0])] {
        let s = spec(0.3, seed, (1 << 4) | 3, blocks);
        let want = cpu.to_host(&cpu.dropout(&xc, &s).unwrap()).unwrap();
        let got = be.to_host(&be.dropout(&xd, &s).unwrap()).unwrap();
        assert_eq!(bits(&got), bits(&want), "dropout, seed {seed:#x}, blocks {:?}", s.blocks);
        let (sd, sc) = (with_buffer(&be, s.clone(), seed), with_buffer(&cpu, s.clone(), seed));
        let got = be.to_host(&be.dropout(&xd, &sd).unwrap()).unwrap();
        let want_buf = cpu.to_host(&cpu.dropout(&xc, &sc).unwrap()).unwrap();
        assert_eq!(bits(&want_buf), bits(&want), "the CPU reads the seed buffer");
        assert_eq!(bits(&got), bits(&want), "dropout from the seed buffer, seed {seed:#x}");
    }
    // p = 0 is an exact copy (NaN payloads included), no scale.
    let odd = vec![f32::from_bits(0x7fc0_1234), -0.0, 1.5];
    let got = be.to_host(&be.dropout(&be.upload(odd.clone(), &[3]).unwrap(), &spec(0.0, 1, 1, vec![0])).unwrap()).unwrap();
    assert_eq!(bits(&got), bits(&odd));
}
test_device!(dropout_op, dropout_op_matches_the_cpu);

fn fused_ops_match_the_cpu(gpu: &Gpu) {
    let be = backend(gpu);
    let cpu = CpuBackend::fast();
    let mut rng = StdRng::seed_from_u64(15);
    let (rows, d_in, d_out) = (2 * 2 * 7, 24, 20);
    let x = random(&mut rng, rows * d_in, 1.0);
    let w = random(&mut rng, d_out * d_in, 0.5);
    let b = random(&mut rng, d_out, 0.5);
    let up = |be: &dyn Backend, v: &[f32], shape: &[usize]| be.upload(v.to_vec(), shape).unwrap();
    for (seed, blocks) in [(5u64, vec![0, 1]), (77, vec![0])] {
        let s = spec(0.1, seed, (2 << 4) | 1, blocks);
        let run = |be: &dyn Backend, s: &DropoutSpec| -> Vec<f32> {
            let y = be.linear_dropout(&up(be, &x, &[rows, d_in]), &up(be, &w, &[d_out, d_in]), Some(&up(be, &b, &[d_out])), Some(s)).unwrap();
            be.to_host(&y).unwrap()
        };
        assert_same_mask_close(&format!("linear_dropout seed {seed}"), &run(&be, &s), &run(&cpu, &s));
        let sd = with_buffer(&be, s.clone(), seed);
        assert_same_mask_close(&format!("linear_dropout seed {seed}, buffer"), &run(&be, &sd), &run(&cpu, &s));
    }

    // LayerNorm then the mask, with and without a residual.
    let (rows, h) = (2 * 9, 32);
    let xs = random(&mut rng, rows * h, 2.0);
    let rs = random(&mut rng, rows * h, 2.0);
    let g = random(&mut rng, h, 1.0);
    let bb = random(&mut rng, h, 0.2);
    for residual in [false, true] {
        let s = spec(0.25, 1234, 1 << 4, vec![0, 1]);
        let run = |be: &dyn Backend, s: &DropoutSpec| -> Vec<f32> {
            let r = up(be, &rs, &[rows, h]);
            let y = be.residual_layernorm_dropout(&up(be, &xs, &[rows, h]), residual.then_some(&r), &up(be, &g, &[h]), &up(be, &bb, &[h]), 1e-12, Some(s)).unwrap();
            be.to_host(&y).unwrap()
        };
        assert_same_mask_close(&format!("residual_layernorm_dropout residual {residual}"), &run(&be, &s), &run(&cpu, &s));
        let sd = with_buffer(&be, s.clone(), 1234);
        assert_same_mask_close("residual_layernorm_dropout, buffer", &run(&be, &sd), &run(&cpu, &s));
    }

    // The embeddings: gather, LayerNorm, mask (the model's site: one block).
    let (batch, seq, vocab, hid) = (2, 5, 11, 16);
    let ids: Vec<u32> = (0..batch * seq).map(|i| (i * 7 % vocab) as u32).collect();
    let types: Vec<u32> = (0..batch * seq).map(|i| (i % 2) as u32).collect();
    let word = random(&mut rng, vocab * hid, 1.0);
    let pos = random(&mut rng, seq * hid, 1.0);
    let tt = random(&mut rng, 2 * hid, 1.0);
    let g = random(&mut rng, hid, 1.0);
    let bb = random(&mut rng, hid, 0.2);
    let s = spec(0.1, 99, 0, vec![0]);
    let run = |be: &dyn Backend, s: &DropoutSpec| -> Vec<f32> {
        let (gamma, beta) = (up(be, &g, &[hid]), up(be, &bb, &[hid]));
        let ln = LayerNormParams { gamma: &gamma, beta: &beta, eps: 1e-12 };
        let i = be.upload_u32(ids.clone(), &[batch, seq]).unwrap();
        let t = be.upload_u32(types.clone(), &[batch, seq]).unwrap();
        let y = be.embedding_layernorm(&i, &t, &up(be, &word, &[vocab, hid]), &up(be, &pos, &[seq, hid]), &up(be, &tt, &[2, hid]), bert_adapters::Positions::Sequential, ln, Some(s)).unwrap();
        be.to_host(&y).unwrap()
    };
    assert_same_mask_close("embedding_layernorm", &run(&be, &s), &run(&cpu, &s));
    let sd = with_buffer(&be, s.clone(), 99);
    assert_same_mask_close("embedding_layernorm, buffer", &run(&be, &sd), &run(&cpu, &s));
}
test_device!(fused_ops, fused_ops_match_the_cpu);

fn bad_specs_are_errors(gpu: &Gpu) {
    let be = backend(gpu);
    let x: Tensor = be.upload(vec![1.0; 12], &[3, 4]).unwrap();
    for p in [1.0, -0.1, f32::NAN] {
        assert!(be.dropout(&x, &spec(p, 1, 1, vec![0])).is_err(), "p {p}");
    }
    // 12 elements do not split into 5 blocks.
    assert!(be.dropout(&x, &spec(0.5, 1, 1, vec![0, 1, 2, 3, 4])).is_err());
    // A seed buffer of 3 words, and one on the host.
    let mut s = spec(0.5, 1, 1, vec![0]);
    s.seed_buffer = Some(SeedBuffer(be.upload_u32(vec![1, 2, 3], &[3]).unwrap()));
    assert!(be.dropout(&x, &s).is_err());
    s.seed_buffer = Some(SeedBuffer(CpuBackend::fast().upload_u32(vec![1, 2], &[2]).unwrap()));
    assert!(be.dropout(&x, &s).is_err());
    s.seed_buffer = Some(SeedBuffer(be.upload(vec![1.0, 2.0], &[2]).unwrap()));
    assert!(be.dropout(&x, &s).is_err(), "an f32 seed buffer");
}
test_device!(bad_specs, bad_specs_are_errors);

/// Attention with probability dropout, forward (ctx, lse) and backward (dqkv), against the CPU
/// backend on the same spec: a generic head dim and the specialised d = 32, a sequence longer
/// than one key tile and not a multiple of 4, Parallel blocks (all, and a live subset).
fn attention_dropout_matches_the_cpu(gpu: &Gpu) {
    let be = backend(gpu);
    let cpu = CpuBackend::fast();
    let mut rng = StdRng::seed_from_u64(16);
    let up = |be: &dyn Backend, v: &[f32], shape: &[usize]| be.upload(v.to_vec(), shape).unwrap();
    for (heads, d, seq, mask_rows, blocks) in [(2usize, 8usize, 37usize, 2usize, vec![0u64, 1]), (1, 32, 7, 1, vec![2, 0, 1]), (3, 4, 5, 2, vec![1])] {
        let batch = mask_rows * blocks.len().max(1);
        let hidden = heads * d;
        let qkv = random(&mut rng, batch * seq * 3 * hidden, 1.0);
        let dctx = random(&mut rng, batch * seq * hidden, 1.0);
        // Padding: the last keys of mask row 0 are masked.
        let mask: Vec<f32> = (0..mask_rows * seq).map(|k| if k < seq && k % seq >= seq - 2 { -10000.0 } else { 0.0 }).collect();
        let s = spec(0.2, 0xabc + d as u64, (1 << 4) | 2, blocks.clone());
        let label = format!("heads {heads} d {d} seq {seq} blocks {blocks:?}");
        let run = |be: &dyn Backend, s: &DropoutSpec| -> [Vec<f32>; 3] {
            let (q, m) = (up(be, &qkv, &[batch, seq, 3 * hidden]), up(be, &mask, &[mask_rows, seq]));
            let (ctx, lse) = be.attention_packed(&q, &m, heads, Some(s)).unwrap();
            let dq = be.attention_packed_backward(&up(be, &dctx, &[batch, seq, hidden]), &q, &lse, &m, heads, Some(s)).unwrap();
            [be.to_host(&ctx).unwrap(), be.to_host(&lse).unwrap(), be.to_host(&dq).unwrap()]
        };
        let [ctx_c, lse_c, dq_c] = run(&cpu, &s);
        for (what, sd) in [("seed", s.clone()), ("seed buffer", with_buffer(&be, s.clone(), s.seed))] {
            let [ctx_g, lse_g, dq_g] = run(&be, &sd);
            common_close(&format!("{label} ({what}): ctx"), &ctx_g, &ctx_c, 1e-5);
            common_close(&format!("{label} ({what}): lse"), &lse_g, &lse_c, 1e-5);
            common_close(&format!("{label} ({what}): dqkv"), &dq_g, &dq_c, 1e-4);
        }
        // The mask did something: without it the context differs.
        let plain = {
            let (ctx, _) = cpu.attention_packed(&up(&cpu, &qkv, &[batch, seq, 3 * hidden]), &up(&cpu, &mask, &[mask_rows, seq]), heads, None).unwrap();
            cpu.to_host(&ctx).unwrap()
        };
        assert!(plain.iter().zip(&ctx_c).any(|(a, b)| (a - b).abs() > 1e-3), "{label}: dropout changed nothing");
    }
    // More blocks than the kernels take is refused, not wrong.
    let q = up(&be, &vec![0.5; 9 * 2 * 3 * 4], &[9, 2, 12]);
    let m = up(&be, &[0.0; 2], &[1, 2]);
    let many = spec(0.1, 1, 1, (0..9).collect());
    assert!(matches!(be.attention_packed(&q, &m, 1, Some(&many)), Err(bert_adapters::Error::Unsupported(_))));
}
test_device!(attention, attention_dropout_matches_the_cpu);

fn common_close(label: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    let tol = rel * (1.0 + want.iter().fold(0f32, |m, v| m.max(v.abs())));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{label}: [{i}] = {g}, CPU {w}, tol {tol:e}");
    }
}
