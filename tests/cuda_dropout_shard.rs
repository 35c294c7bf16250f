//! Dropout of a data-parallel shard on the CUDA kernels (issue 18): a tensor holding rows `r0..`
//! of a larger batch, with `DropoutSpec::offset = r0 ·` elements per row, draws the masks those
//! rows draw in the whole batch. For the elementwise dropout (f32, `_bf16io` and `_f16io`) and the attention
//! probability dropout (forward and backward, f32 and bf16io, generic d, d = 32, d = 64): the
//! shard's result equals rows `r0..` of the whole batch's result bit for bit, and the CPU
//! backend's (which is the spec: `cpu::apply_dropout_at`, `cpu::prob_dropout`), bit for bit for
//! plain dropout and within the attention tests' tolerances for attention. Offsets that are not
//! a multiple of 4 (a row starting inside a Philox block), Parallel blocks (rows `r0..` of each
//! block), and a shard keyed from row 0 instead, which must draw other masks. The adapter
//! location's dropout is in tests/cuda_adapter_dropout.rs; the model level (two shards summed
//! equal one process, and f16 ranks overflowing at the scale one process overflows at) at the
//! end of this file.

use std::ops::Range;
use std::sync::Arc;

use bert_adapters::backend::{Backend, DropoutSpec, SeedBuffer};
use bert_adapters::cpu::CpuBackend;
use bert_adapters::cuda::attention::{attention_packed_backward_dropout_as, attention_packed_forward_dropout};
use bert_adapters::cuda::attention_gemm::AttentionPath;
use bert_adapters::cuda::backend::CudaBackend;
use bert_adapters::cuda::elementwise::{dropout, dropout_in_place, DeviceDropout};
use bert_adapters::cuda::gpu::{ActivationScalar, DeviceBuffer, DeviceScalar, Gpu};
use bert_adapters::test_device;
use half::bf16;
#[path = "support/bf16.rs"]
mod rule;
use rule::Half;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn backend(gpu: &Gpu) -> CudaBackend {
    CudaBackend::on(gpu.reopen().unwrap())
}

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn spec(p: f32, seed: u64, stream: u64, blocks: Vec<u64>, offset: u64) -> DropoutSpec {
    DropoutSpec { p, seed, stream, blocks, seed_buffer: None, offset }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Rows `rows` of each of the `blocks` blocks of `b` rows of `per_row` elements in `v`.
fn rows_of<T: Copy>(v: &[T], per_row: usize, blocks: usize, b: usize, rows: &Range<usize>) -> Vec<T> {
    assert_eq!(v.len(), blocks * b * per_row);
    (0..blocks).flat_map(|k| v[(k * b + rows.start) * per_row..(k * b + rows.end) * per_row].iter().copied()).collect()
}

/// The shards a test cuts from `b` rows: the whole, a tail, one row inside, the last rows.
fn shards(b: usize) -> Vec<Range<usize>> {
    let mut v = vec![0..b, 1..b, 1..2, b - 2..b];
    v.dedup();
    v
}

fn close(label: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    let tol = rel * (1.0 + want.iter().fold(0f32, |m, v| m.max(v.abs())));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{label}: [{i}] = {g}, want {w}, tol {tol:e}");
    }
}

/// Some element differs by more than `by`: the shard keyed from row 0 drew other masks.
fn differs(label: &str, got: &[f32], want: &[f32], by: f32) {
    let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff > by, "{label}: keyed from row 0 the shard drew the whole batch's masks anyway (max diff {diff})");
}

/// The elementwise dropout (`Backend::dropout`, the kernel `dropout_f32`): rows r0.. of each
/// Parallel block with the offset r0·cols equal rows r0.. of the whole, bit for bit, and the CPU
/// backend's shard; with the seed in a device buffer too. cols 7 and 13 put r0·cols off a multiple
/// of 4; offsets near 2^34 reach the Philox counter's high word.
fn elementwise_shards(gpu: &Gpu) {
    let be = backend(gpu);
    let cpu = CpuBackend::fast();
    let mut rng = StdRng::seed_from_u64(0x18_01);
    for (b, cols, blocks, base) in [(5usize, 7usize, vec![0u64], 0u64), (4, 13, vec![2, 0, 5], 0), (3, 12, vec![1, 3], 0), (4, 7, vec![0], (1 << 34) + 1)] {
        let n = blocks.len();
        let x = random(&mut rng, n * b * cols, 3.0);
        let s = spec(0.3, 0x5eed_0000 + cols as u64, (2 << 4) | 3, blocks.clone(), base);
        let run = |be: &dyn Backend, v: &[f32], s: &DropoutSpec| be.to_host(&be.dropout(&be.upload(v.to_vec(), &[v.len() / cols, cols]).unwrap(), s).unwrap()).unwrap();
        let whole = run(&be, &x, &s);
        assert_eq!(bits(&whole), bits(&run(&cpu, &x, &s)), "b {b} cols {cols} blocks {blocks:?} offset {base}: the whole batch against the CPU");
        for rows in shards(b) {
            let label = format!("b {b} cols {cols} blocks {blocks:?} rows {rows:?} base {base}");
            let xs = rows_of(&x, cols, n, b, &rows);
            let ss = spec(s.p, s.seed, s.stream, blocks.clone(), base + (rows.start * cols) as u64);
            let got = run(&be, &xs, &ss);
            assert_eq!(bits(&got), bits(&rows_of(&whole, cols, n, b, &rows)), "{label}: the shard against the whole batch's rows");
            assert_eq!(bits(&got), bits(&run(&cpu, &xs, &ss)), "{label}: the shard against the CPU's shard");
            let buffered = DropoutSpec { seed: ss.seed ^ 0x77, seed_buffer: Some(SeedBuffer(be.upload_u32(vec![ss.seed as u32, (ss.seed >> 32) as u32], &[2]).unwrap())), ..ss.clone() };
            assert_eq!(bits(&run(&be, &xs, &buffered)), bits(&got), "{label}: from the seed buffer");
            if rows.start > 0 {
                differs(&label, &run(&be, &xs, &DropoutSpec { offset: base, ..ss.clone() }), &got, 1e-3);
            }
        }
    }
}
test_device!(elementwise, elementwise_shards);

/// The fused sites that apply the mask in place after a product or a LayerNorm
/// (`linear_dropout`, `residual_layernorm_dropout`): the shard drops what the CPU's shard drops
/// and keeps the rest within 1e-5·(1 + max|ref|), and equals the whole batch's rows likewise.
fn fused_site_shards(gpu: &Gpu) {
    let be = backend(gpu);
    let cpu = CpuBackend::fast();
    let mut rng = StdRng::seed_from_u64(0x18_02);
    let (b, d_in, d_out, blocks) = (5usize, 12usize, 11usize, vec![0u64, 1]);
    let x = random(&mut rng, 2 * b * d_in, 1.0);
    let w = random(&mut rng, d_out * d_in, 0.5);
    let bias = random(&mut rng, d_out, 0.5);
    let up = |be: &dyn Backend, v: &[f32], shape: &[usize]| be.upload(v.to_vec(), shape).unwrap();
    let lin = |be: &dyn Backend, v: &[f32], s: &DropoutSpec| -> Vec<f32> {
        let y = be.linear_dropout(&up(be, v, &[v.len() / d_in, d_in]), &up(be, &w, &[d_out, d_in]), Some(&up(be, &bias, &[d_out])), Some(s)).unwrap();
        be.to_host(&y).unwrap()
    };
    let gamma = random(&mut rng, d_in, 1.0);
    let beta = random(&mut rng, d_in, 0.2);
    let ln = |be: &dyn Backend, v: &[f32], s: &DropoutSpec| -> Vec<f32> {
        let y = be.residual_layernorm_dropout(&up(be, v, &[v.len() / d_in, d_in]), None, &up(be, &gamma, &[d_in]), &up(be, &beta, &[d_in]), 1e-12, Some(s)).unwrap();
        be.to_host(&y).unwrap()
    };
    let s = spec(0.25, 4321, (1 << 4) | 1, blocks.clone(), 0);
    let (whole_lin, whole_ln) = (lin(&be, &x, &s), ln(&be, &x, &s));
    for rows in shards(b) {
        let xs = rows_of(&x, d_in, 2, b, &rows);
        let label = format!("rows {rows:?}");
        let sl = spec(s.p, s.seed, s.stream, blocks.clone(), (rows.start * d_out) as u64);
        let got = lin(&be, &xs, &sl);
        same_mask_close(&format!("linear_dropout {label}: against the CPU's shard"), &got, &lin(&cpu, &xs, &sl));
        same_mask_close(&format!("linear_dropout {label}: against the whole batch's rows"), &got, &rows_of(&whole_lin, d_out, 2, b, &rows));
        let sn = spec(s.p, s.seed, s.stream, blocks.clone(), (rows.start * d_in) as u64);
        let got = ln(&be, &xs, &sn);
        same_mask_close(&format!("residual_layernorm_dropout {label}: against the CPU's shard"), &got, &ln(&cpu, &xs, &sn));
        same_mask_close(&format!("residual_layernorm_dropout {label}: against the whole batch's rows"), &got, &rows_of(&whole_ln, d_in, 2, b, &rows));
    }
}
test_device!(fused_sites, fused_site_shards);

fn same_mask_close(label: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(*g == 0.0, *w == 0.0, "{label}: [{i}] = {g}, want {w} (a different mask)");
    }
    close(label, got, want, 1e-5);
}

fn up<T: DeviceScalar>(gpu: &Gpu, v: &[T]) -> DeviceBuffer<T> {
    gpu.upload(v).unwrap()
}

fn down<T: DeviceScalar>(gpu: &Gpu, b: &DeviceBuffer<T>) -> Vec<T> {
    gpu.download(&b.view()).unwrap()
}

/// The launcher's dropout of `x` (a copy, then in place as well, which must agree) as `A`.
fn launch<A: ActivationScalar + PartialEq>(gpu: &Gpu, x: &[A], d: &DeviceDropout<'_>) -> Vec<A> {
    let xb = up(gpu, x);
    let mut y = gpu.alloc::<A>(x.len()).unwrap();
    dropout::<A>(gpu, &xb.view(), &mut y.view_mut(), d).unwrap();
    let mut z = up(gpu, x);
    dropout_in_place::<A>(gpu, &mut z.view_mut(), d).unwrap();
    let (got, in_place) = (down(gpu, &y), down(gpu, &z));
    // Finite inputs only: == is bit equality up to ±0, which a product by scale keeps apart.
    assert!(got == in_place, "{d:?}: in place differs from the copy");
    got
}

/// `dropout_bf16io` / `dropout_f16io` (`H`): `H` in and out, the f32 kernel's product on the
/// widened values rounded once, so exactly `H(dropout_f32(widen(x)))`, at offsets 0..=7 and past
/// 2^32 blocks, one and three blocks; the mask is the f32 kernel's (an input of 1 keeps
/// `H(scale)` or 0). And an `H` shard equals rows r0.. of the whole `H` batch. (|x| < 4 and a
/// scale of at most 2: far inside f16's range.)
fn io16_elementwise<H: Half + ActivationScalar + PartialEq + std::fmt::Debug>(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x18_03);
    for (len, streams) in [(37usize, vec![(4u64 << 8) | 1]), (3 * 26, vec![7 << 8, (7 << 8) | 2, (7 << 8) | 1])] {
        let x16: Vec<H> = random(&mut rng, len, 4.0).into_iter().map(H::from_f32).collect();
        let x32: Vec<f32> = x16.iter().map(|v| v.to_f32()).collect();
        for offset in (0..8u64).chain([(1 << 34) + 3]) {
            for p in [0.0f32, 0.2, 0.5] {
                let d = DeviceDropout { seed_buffer: None, seed: 0xbf16 + offset, p, streams: streams.clone(), offset };
                let got = launch::<H>(gpu, &x16, &d);
                let want: Vec<u16> = launch::<f32>(gpu, &x32, &d).into_iter().map(|v| H::from_f32(v).to_bits()).collect();
                let got_bits: Vec<u16> = got.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got_bits, want, "{} len {len} blocks {} offset {offset} p {p}: {}io against the f32 kernel rounded once", H::NAME, streams.len(), H::NAME);
                let ones = launch::<H>(gpu, &vec![H::from_f32(1.0); len], &d);
                let ones32 = launch::<f32>(gpu, &vec![1.0; len], &d);
                assert!(ones.iter().zip(&ones32).all(|(a, b)| (a.to_f32() == 0.0) == (*b == 0.0)), "offset {offset} p {p}: another mask");
            }
        }
    }
    // A shard of rows 1..3 of 2 blocks of 4 rows of 9: offset 9 (inside a Philox block).
    let (b, cols, streams) = (4usize, 9usize, vec![3 << 8, (3 << 8) | 1]);
    let x: Vec<H> = random(&mut rng, 2 * b * cols, 4.0).into_iter().map(H::from_f32).collect();
    let d = DeviceDropout { seed_buffer: None, seed: 99, p: 0.3, streams: streams.clone(), offset: 0 };
    let whole = launch::<H>(gpu, &x, &d);
    let rows = 1..3;
    let shard = launch::<H>(gpu, &rows_of(&x, cols, 2, b, &rows), &DeviceDropout { offset: (rows.start * cols) as u64, ..d.clone() });
    assert_eq!(shard, rows_of(&whole, cols, 2, b, &rows), "{}: a shard against the whole batch's rows", H::NAME);
}
fn bf16io_elementwise(gpu: &Gpu) {
    io16_elementwise::<bf16>(gpu)
}
fn f16io_elementwise(gpu: &Gpu) {
    io16_elementwise::<half::f16>(gpu)
}
test_device!(bf16io, bf16io_elementwise);
test_device!(f16io, f16io_elementwise);

/// The elementwise launchers refuse what they cannot draw: an offset whose block would pass 2^64
/// (`Error::Shape`), and overlapping x and y (not the same buffer: that is `dropout_in_place`).
fn elementwise_refusals(gpu: &Gpu) {
    let x = up(gpu, &[1.0f32; 16]);
    let mut y = gpu.alloc::<f32>(16).unwrap();
    let d = DeviceDropout { seed_buffer: None, seed: 1, p: 0.5, streams: vec![0], offset: u64::MAX - 8 };
    let e = dropout::<f32>(gpu, &x.view(), &mut y.view_mut(), &d).unwrap_err();
    assert!(matches!(e, bert_adapters::Error::Shape { .. }) && e.to_string().contains("offset"), "{e}");
    let d = DeviceDropout { offset: u64::MAX - 16, ..d };
    dropout::<f32>(gpu, &x.view(), &mut y.view_mut(), &d).unwrap();
    let both = up(gpu, &[1.0f32; 24]);
    // SAFETY (of the test): the launcher refuses before anything is written.
    let mut hi = unsafe { both.slice(8..24).unwrap().assume_writable() };
    let e = dropout::<f32>(gpu, &both.slice(0..16).unwrap(), &mut hi, &DeviceDropout { offset: 0, ..d }).unwrap_err();
    assert!(e.to_string().contains("overlap"), "{e}");
}
test_device!(refusals, elementwise_refusals);

/// Attention's probability dropout through the backend (forward ctx and lse, backward dqkv): rows
/// r0.. of each block with offset r0·heads·T² against rows r0.. of the whole batch, and against
/// the CPU's shard (ctx, lse 1e-5, dqkv 1e-4 relative to 1 + max, the attention dropout tests'
/// bounds). heads·T² odd (25, 49) or 2 mod 4 (98), generic d (8, T = 37 past one key tile) and
/// the d = 32 and d = 64 kernels. The mask rows are the shard's too.
///
/// Both attention paths. The fused kernels compute each row alone, so the shard equals the whole
/// batch's rows bit for bit. The GEMM path's batched products are cuBLAS's, which picks its
/// algorithm by the batch count: on an H100 a shard's ctx differed from the whole batch's rows
/// in the last bits (1 to 8 ulp), so there the shard is held to the same bounds as against the
/// CPU. A shard drawing another mask would be off by far more (the `differs` check below).
fn attention_shards(gpu: &Gpu) {
    for path in [AttentionPath::Fused, AttentionPath::Gemm] {
        attention_shards_on(gpu, path);
    }
}
fn attention_shards_on(gpu: &Gpu, path: AttentionPath) {
    let be = backend(gpu).with_attention_path(path);
    let cpu = CpuBackend::fast();
    let mut rng = StdRng::seed_from_u64(0x18_04);
    let up_t = |be: &dyn Backend, v: &[f32], shape: &[usize]| be.upload(v.to_vec(), shape).unwrap();
    for (heads, d, seq, b, blocks) in [(1usize, 8usize, 5usize, 3usize, vec![0u64]), (1, 32, 7, 3, vec![1, 0]), (2, 32, 7, 2, vec![2]), (1, 64, 5, 3, vec![0, 1]), (2, 8, 37, 3, vec![1])] {
        let n = blocks.len();
        let hidden = heads * d;
        let qkv = random(&mut rng, n * b * seq * 3 * hidden, 1.0);
        let dctx = random(&mut rng, n * b * seq * hidden, 1.0);
        // Row k pads its last k % 3 keys.
        let mask: Vec<f32> = (0..b * seq).map(|e| if e % seq >= seq - (e / seq) % 3 { -10000.0 } else { 0.0 }).collect();
        let s = spec(0.2, 0xa77 + d as u64, (1 << 4) | 2, blocks.clone(), 0);
        let run = |be: &dyn Backend, rows: usize, qkv: &[f32], mask: &[f32], dctx: &[f32], s: &DropoutSpec| -> [Vec<f32>; 3] {
            let (q, m) = (up_t(be, qkv, &[n * rows, seq, 3 * hidden]), up_t(be, mask, &[rows, seq]));
            let (ctx, lse) = be.attention_packed(&q, &m, heads, Some(s)).unwrap();
            let dq = be.attention_packed_backward(&up_t(be, dctx, &[n * rows, seq, hidden]), &q, &lse, &m, heads, Some(s)).unwrap();
            [be.to_host(&ctx).unwrap(), be.to_host(&lse).unwrap(), be.to_host(&dq).unwrap()]
        };
        let whole = run(&be, b, &qkv, &mask, &dctx, &s);
        let per_row = [seq * hidden, heads * seq, seq * 3 * hidden];
        for rows in shards(b) {
            let label = format!("{path:?} path, heads {heads} d {d} seq {seq} blocks {blocks:?} rows {rows:?}");
            let (qs, ms, ds) = (rows_of(&qkv, seq * 3 * hidden, n, b, &rows), rows_of(&mask, seq, 1, b, &rows), rows_of(&dctx, seq * hidden, n, b, &rows));
            let ss = spec(s.p, s.seed, s.stream, blocks.clone(), (rows.start * heads * seq * seq) as u64);
            let got = run(&be, rows.len(), &qs, &ms, &ds, &ss);
            let want_cpu = run(&cpu, rows.len(), &qs, &ms, &ds, &ss);
            for (k, what) in ["ctx", "lse", "dqkv"].iter().enumerate() {
                let whole_rows = rows_of(&whole[k], per_row[k], n, b, &rows);
                let bound = if k == 2 { 1e-4 } else { 1e-5 };
                match path {
                    AttentionPath::Fused => assert_eq!(bits(&got[k]), bits(&whole_rows), "{label}: {what} of the shard against the whole batch's rows"),
                    AttentionPath::Gemm | AttentionPath::TensorCores => close(&format!("{label}: {what} of the shard against the whole batch's rows"), &got[k], &whole_rows, bound),
                }
                close(&format!("{label}: {what} against the CPU's shard"), &got[k], &want_cpu[k], bound);
            }
            if rows.start > 0 {
                let unkeyed = run(&be, rows.len(), &qs, &ms, &ds, &DropoutSpec { offset: 0, ..ss.clone() });
                differs(&label, &unkeyed[0], &got[0], 1e-3);
            }
        }
    }
}
test_device!(attention, attention_shards);

/// The `_dropout_bf16io` attention kernels (forward, and both backward kernels through
/// `attention_packed_backward_dropout_as`) on a shard with its offset: rows r0.. of the whole
/// bf16 batch, bit for bit, for generic d, d = 32 and d = 64, offsets odd and 2 mod 4.
fn bf16io_attention_shards(gpu: &Gpu) {
    let mut rng = StdRng::seed_from_u64(0x18_05);
    for (heads, d, seq, b, streams) in [(1usize, 8usize, 5usize, 3usize, vec![2u64 << 8]), (1, 32, 7, 3, vec![(2 << 8) | 1, 2 << 8]), (1, 64, 5, 2, vec![(6 << 8) | 3])] {
        let n = streams.len();
        let hidden = heads * d;
        let to16 = |v: Vec<f32>| -> Vec<bf16> { v.into_iter().map(bf16::from_f32).collect() };
        let qkv = to16(random(&mut rng, n * b * seq * 3 * hidden, 1.0));
        let dctx = to16(random(&mut rng, n * b * seq * hidden, 1.0));
        let mask: Vec<f32> = (0..b * seq).map(|e| if e % seq == seq - 1 && e / seq == 1 { -10000.0 } else { 0.0 }).collect();
        let drop = DeviceDropout { seed_buffer: None, seed: 0xbf_a77 + d as u64, p: 0.25, streams: streams.clone(), offset: 0 };
        let run = |rows: usize, qkv: &[bf16], mask: &[f32], dctx: &[bf16], drop: &DeviceDropout<'_>| -> (Vec<bf16>, Vec<f32>, Vec<bf16>) {
            let batch = n * rows;
            let (q, m, dc) = (up(gpu, qkv), up(gpu, mask), up(gpu, dctx));
            let mut ctx = gpu.alloc::<bf16>(batch * seq * hidden).unwrap();
            let mut lse = gpu.alloc::<f32>(batch * heads * seq).unwrap();
            attention_packed_forward_dropout::<bf16>(gpu, &q.view(), &m.view(), &mut ctx.view_mut(), &mut lse.view_mut(), batch, seq, hidden, heads, drop).unwrap();
            let mut dq = gpu.alloc::<bf16>(qkv.len()).unwrap();
            attention_packed_backward_dropout_as::<bf16>(gpu, &dc.view(), &q.view(), &ctx.view(), &lse.view(), &m.view(), &mut dq.view_mut(), batch, seq, hidden, heads, Some(drop)).unwrap();
            (down(gpu, &ctx), down(gpu, &lse), down(gpu, &dq))
        };
        let whole = run(b, &qkv, &mask, &dctx, &drop);
        for rows in shards(b) {
            let label = format!("bf16io heads {heads} d {d} seq {seq} blocks {n} rows {rows:?}");
            let shard_drop = DeviceDropout { offset: (rows.start * heads * seq * seq) as u64, ..drop.clone() };
            let (qs, ms, ds) = (rows_of(&qkv, seq * 3 * hidden, n, b, &rows), rows_of(&mask, seq, 1, b, &rows), rows_of(&dctx, seq * hidden, n, b, &rows));
            let got = run(rows.len(), &qs, &ms, &ds, &shard_drop);
            assert_eq!(got.0, rows_of(&whole.0, seq * hidden, n, b, &rows), "{label}: ctx");
            assert_eq!(bits(&got.1), bits(&rows_of(&whole.1, heads * seq, n, b, &rows)), "{label}: lse");
            assert_eq!(got.2, rows_of(&whole.2, seq * 3 * hidden, n, b, &rows), "{label}: dqkv");
            if rows.start > 0 {
                let unkeyed = run(rows.len(), &qs, &ms, &ds, &drop);
                assert_ne!(unkeyed.0, got.0, "{label}: keyed from row 0 the shard drew the same masks");
            }
        }
    }
}
test_device!(bf16io_attention, bf16io_attention_shards);

// ---- the model: two shards summed equal one process ------------------------------------------

mod common;
#[path = "support/thread_comm.rs"]
mod thread_comm;

use bert_adapters::dist::{shard, Communicator, DataParallel};
use thread_comm::ThreadComm;
use bert_adapters::model::heads::HeadConfig;
use bert_adapters::model::step::TrainStepConfig;
use bert_adapters::train::{AdamW, AdamWConfig, Objective};
use bert_adapters::{AdapterConfig, BertModel, InputBatch};


/// The tiny BERT on `be` with Parallel(scorenn, tasknn) pfeiffer adapters (dropout 0.1 inside
/// them, the model's hidden and attention dropout on), 3-class heads.
fn model(be: Arc<dyn Backend>) -> (BertModel, InputBatch, Vec<usize>) {
    let (mut model, batch) = common::tiny(be);
    for (i, n) in ["scorenn", "tasknn"].iter().enumerate() {
        let mut cfg = AdapterConfig::named("pfeiffer").unwrap();
        cfg.dropout = 0.1;
        model.add_adapter_seeded(n, cfg, i as u64 + 1).unwrap();
        model.add_classification_head(n, HeadConfig::classification(3)).unwrap();
    }
    model.set_active_adapters(Some(common::setup(&["scorenn", "tasknn"]))).unwrap();
    let labels: Vec<usize> = (0..batch.batch).map(|i| (i * 2 + 1) % 3).collect();
    (model, batch, labels)
}

const STEPS: u64 = 4;

/// `STEPS` steps alternating the trained adapter, every rank on its own cuda-sim (or GPU)
/// backend; returns both arenas' parameters.
fn train(be: Arc<dyn Backend>, comm: Option<&dyn Communicator>) -> Vec<Vec<f32>> {
    let (mut model, batch, labels) = model(be);
    let opt = AdamW::new(AdamWConfig { lr: 0.01, ..AdamWConfig::default() }).unwrap();
    let mut opts = [opt.clone(), opt];
    let rows = comm.map_or(0..batch.batch, |c| shard(batch.batch, c.rank(), c.size()));
    let mine = batch.rows(rows.clone()).unwrap();
    model.set_dropout_row(rows.start as u64);
    for s in 0..STEPS {
        let trained = if s % 2 == 0 { "tasknn" } else { "scorenn" };
        let cfg = TrainStepConfig { objective: Objective::CrossEntropy, trained: trained.into(), max_grad_norm: Some(1.0) };
        model.train_adapter(&[trained]).unwrap();
        model.set_dropout(Some(500 + s));
        let opt = &mut opts[usize::from(trained == "tasknn")];
        match comm {
            Some(c) => {
                let dp = DataParallel { comm: c, rows: rows.clone(), global_rows: batch.batch };
                model.train_step_data_parallel(&mine, &labels[rows.clone()], &cfg, opt, &dp).unwrap();
            }
            None => {
                model.train_step(&batch, &labels, &cfg, opt).unwrap();
            }
        }
    }
    let be = model.backend().clone();
    ["scorenn", "tasknn"].iter().map(|n| be.to_host(&model.arena(n).unwrap().params).unwrap()).collect()
}

fn open(gpu: &Gpu) -> Arc<dyn Backend> {
    Arc::new(backend(gpu))
}

/// Two ranks (threads, each with its own backend on this device) training on rows 0..2 and 2..4
/// of the tiny batch, with every dropout on (hidden, attention, the adapters'), end where one
/// process on the whole batch ends: both arenas within 1e-5 of their largest value after
/// `STEPS` steps, the two ranks identical. (tests/data_parallel.rs does this on the CPU.)
fn model_shards(gpu: &Gpu) {
    let single = train(open(gpu), None);
    let handles: Vec<_> = ThreadComm::group(2)
        .into_iter()
        .map(|comm| {
            let g = gpu.reopen().unwrap();
            std::thread::spawn(move || train(Arc::new(CudaBackend::on(g)), Some(&comm)))
        })
        .collect();
    let ranks: Vec<Vec<Vec<f32>>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(ranks[0] == ranks[1], "rank 1's adapters differ from rank 0's");
    for (i, name) in ["scorenn", "tasknn"].iter().enumerate() {
        let (got, want) = (&ranks[0][i], &single[i]);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-5 * scale, "{name}: two shards on {} against one process: max |diff| {diff:e} > 1e-5 · {scale}", gpu.describe());
    }
}
test_device!(model_two_shards, model_shards);

// ---- f16 ranks overflow where one process does -------------------------------------------------

/// The tiny BERT in f16 on its own backend on this device (base and activations in f16), no
/// dropout; one cross-entropy step of tasknn loss-scaled by `scale`, as one process (`comm`
/// None) or as its rank of `comm` on its shard: the step's gradient norm, unchecked.
fn f16_step_norm(gpu: &Gpu, scale: f32, comm: Option<&dyn Communicator>) -> f32 {
    let be: Arc<dyn Backend> = Arc::new(backend(gpu).with_activations(bert_adapters::DType::F16).unwrap());
    let dir = common::fixtures().join("tiny_bert");
    let (mut model, _) = BertModel::from_dir(&dir, be.clone(), bert_adapters::LoadOptions { dtype: bert_adapters::DType::F16, ..Default::default() }).unwrap();
    let batch = InputBatch::from_file(dir.join("inputs.safetensors"), model.config()).unwrap();
    for (i, n) in ["scorenn", "tasknn"].iter().enumerate() {
        model.add_adapter_seeded(n, AdapterConfig::named("pfeiffer").unwrap(), i as u64 + 1).unwrap();
        model.add_classification_head(n, HeadConfig::classification(3)).unwrap();
    }
    model.set_active_adapters(Some(common::setup(&["scorenn", "tasknn"]))).unwrap();
    model.train_adapter(&["tasknn"]).unwrap();
    model.set_loss_scale(scale).unwrap();
    let labels: Vec<usize> = (0..batch.batch).map(|i| (i * 2 + 1) % 3).collect();
    let cfg = TrainStepConfig { objective: Objective::CrossEntropy, trained: "tasknn".into(), max_grad_norm: Some(1.0) };
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    let out = match comm {
        Some(c) => {
            let rows = shard(batch.batch, c.rank(), c.size());
            model.set_dropout_row(rows.start as u64);
            let dp = DataParallel { comm: c, rows: rows.clone(), global_rows: batch.batch };
            model.train_step_data_parallel(&batch.rows(rows.clone()).unwrap(), &labels[rows], &cfg, &mut opt, &dp).unwrap()
        }
        None => model.train_step(&batch, &labels, &cfg, &mut opt).unwrap(),
    };
    out.read_unchecked(be.as_ref()).unwrap().grad_norm
}

/// Both ranks' gradient norms of a two-rank f16 step at `scale`.
fn f16_two_rank_norms(gpu: &Gpu, scale: f32) -> Vec<f32> {
    let handles: Vec<_> = ThreadComm::group(2)
        .into_iter()
        .map(|comm| {
            let g = gpu.reopen().unwrap();
            std::thread::spawn(move || f16_step_norm(&g, scale, Some(&comm)))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// f16 data parallel: a rank seeds its backward with its shard's weight in the global batch
/// (rows / global rows) times the loss scale, so every row's f16 activation gradients are the
/// bits one process computes on the whole batch, and a scale overflows on the ranks exactly when
/// it overflows in one process. The least power of two 2^e at which one process's step
/// overflows (found by bisection; overflow only grows with the scale) overflows on both ranks,
/// and 2^(e−1) overflows on neither, whose norm then equals one process's within 1e-5. (Had the
/// weight been applied after the backward, each rank's activation gradients would be twice one
/// process's, and 2^(e−1) would overflow on the ranks alone.)
fn f16_overflow_threshold(gpu: &Gpu) {
    let overflows = |e: i32| !f16_step_norm(gpu, 2f32.powi(e), None).is_finite();
    let (mut lo, mut hi) = (0, 120); // 2^0 is finite, 2^120 overflows
    assert!(!overflows(lo) && overflows(hi), "{}: the bracket", gpu.describe());
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if overflows(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let at = f16_two_rank_norms(gpu, 2f32.powi(hi));
    assert!(at.iter().all(|n| !n.is_finite()), "{}: one process overflows at 2^{hi}, the ranks' norms are {at:?}", gpu.describe());
    let below = f16_two_rank_norms(gpu, 2f32.powi(lo));
    let want = f16_step_norm(gpu, 2f32.powi(lo), None);
    for n in below {
        assert!(n.is_finite() && (n - want).abs() <= 1e-5 * want, "{}: at 2^{lo} one process's norm is {want}, a rank's {n}", gpu.describe());
    }
}
test_device!(f16_ranks_overflow_with_one_process, f16_overflow_threshold);
