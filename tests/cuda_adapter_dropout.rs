//! The adapter's own dropout through the CUDA backend (`CudaBackend::adapter_location` and
//! `adapter_location_backward_into`, which turn the branches' `DropoutSpec`s into the location
//! kernels' descriptors and seed with `cuda::adapter::location_dropout`) against the CPU reference
//! backend, and what that glue still refuses. The kernels themselves are swept in
//! tests/cuda_adapter.rs and tests/cuda_adapter_backward.rs; here the specs are what the model
//! builds: one per branch, the branch's Parallel id as its one block, the step's seed in a device
//! seed buffer. The device specs' `seed` field is set to another value, so a kernel that took the
//! seed from its arguments instead of the buffer would draw other masks and fail.
//!
//! Tolerance: outputs max|got − ref| <= 1e-5·(1 + max|ref|), gradients 1e-4·(1 + max|ref|).

use bert_adapters::backend::{AdapterLocation, BottleneckGrads, BottleneckParams, DropoutSpec, GradsOut, LayerNormParams, LocationSteps, SeedBuffer};
use bert_adapters::config::ResidualBeforeLn;
use bert_adapters::cuda::adapter::{location_dropout, refuse_unsupported, BranchDropout, LocationPath};
use bert_adapters::cuda::backend::CudaBackend;
use bert_adapters::cuda::gpu::Gpu;
use bert_adapters::cuda::probe::report_line;
use bert_adapters::{test_device, Activation, Backend, CpuBackend, Error, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

#[path = "support/adapter_location.rs"]
#[allow(dead_code)] // each test file uses part of the shared cases
mod cases;
use cases::*;


fn backend(gpu: &Gpu) -> CudaBackend {
    // The backend owns its Gpu: a handle with the same settings (the schedule on cuda-sim).
    CudaBackend::on(gpu.reopen().unwrap())
}

/// `b`'s weights uploaded through `be`, with its dropout spec reading `seed_buffer` (and a wrong
/// `seed` field, which only says what the buffer holds).
fn to_device(be: &CudaBackend, b: &HostBranch, seed_buffer: &Tensor) -> HostBranch {
    let up = |t: &Tensor| be.upload(data(t), t.shape()).unwrap();
    let pair = |p: &Option<(Tensor, Tensor)>| p.as_ref().map(|(a, c)| (up(a), up(c)));
    HostBranch {
        spec: b.spec,
        down_w: up(&b.down_w),
        down_b: up(&b.down_b),
        up_w: up(&b.up_w),
        up_b: up(&b.up_b),
        ln_before: pair(&b.ln_before),
        ln_after: pair(&b.ln_after),
        scaling: b.scaling.as_ref().map(up),
        gate: pair(&b.gate),
        dropout: b.dropout.clone().map(|d| DropoutSpec { seed: d.seed ^ 0x5a5a_5a5a, seed_buffer: Some(SeedBuffer(seed_buffer.clone())), ..d }),
    }
}

/// One location with dropout: inputs, the output gradient, branches (with their specs), and which
/// branches train.
struct Case {
    seq_len: usize,
    replicate: bool,
    steps: LocationSteps,
    h: Tensor,
    r: Tensor,
    d_out: Tensor,
    gamma: Tensor,
    beta: Tensor,
    branches: Vec<HostBranch>,
    trainable: Vec<bool>,
    seed: u64,
}

impl Case {
    /// Branch i is `specs[i]` dropping out with probability `ps[i]` (None: no dropout) as the
    /// `ids[i]`-th child of a Parallel location at stream `stream`, under `seed`.
    #[allow(clippy::too_many_arguments)]
    fn random(rng: &mut StdRng, batch: usize, seq_len: usize, hidden: usize, replicate: bool, steps: LocationSteps, specs: &[BranchSpec], ps: &[Option<f32>], ids: &[u64], seed: u64) -> Case {
        let n = specs.len();
        let rows = if replicate { batch } else { batch * n };
        let count = rows * seq_len * hidden;
        let stream = (3 << 4) | 5; // layer 3, the multi-head location's adapter site
        Case {
            seq_len,
            replicate,
            steps,
            h: tensor(uniform(rng, count, -2.0, 2.0), &[rows, seq_len, hidden]),
            r: tensor(uniform(rng, count, -2.0, 2.0), &[rows, seq_len, hidden]),
            d_out: tensor(uniform(rng, n * batch * seq_len * hidden, -1.0, 1.0), &[n * batch, seq_len, hidden]),
            gamma: tensor(uniform(rng, hidden, 0.5, 1.5), &[hidden]),
            beta: tensor(uniform(rng, hidden, -0.5, 0.5), &[hidden]),
            branches: specs.iter().zip(ps).zip(ids).map(|((s, p), &id)| HostBranch::random_scaled(rng, hidden, *s, 3.0).with_dropout(p.map(|p| adapter_dropout(p, seed, stream, id)))).collect(),
            trainable: vec![true; n],
            seed,
        }
    }

    fn label(&self) -> String {
        let b: Vec<String> = self.branches.iter().map(|b| format!("m{} {:?} p={:?}", b.spec.m, b.spec.act, b.dropout.as_ref().map(|d| (d.p, d.blocks[0])))).collect();
        format!("{:?} replicate={} [{}]", self.h.shape(), self.replicate, b.join("; "))
    }

    fn location<'a>(&'a self, h: &'a Tensor, r: &'a Tensor, gamma: &'a Tensor, beta: &'a Tensor, branches: &'a [BottleneckParams<'a>]) -> AdapterLocation<'a> {
        AdapterLocation { h, r, layer_norm: LayerNormParams { gamma, beta, eps: BERT_EPS }, steps: self.steps, branches, replicate: self.replicate, seq_len: self.seq_len }
    }
}

/// Every gradient of a backward, named, on the host.
type Named = Vec<(String, Vec<f32>)>;

fn named(be: &dyn Backend, i: usize, g: &BottleneckGrads) -> Named {
    let mut v = vec![("down weight", &g.down_w), ("down bias", &g.down_b), ("up weight", &g.up_w), ("up bias", &g.up_b)];
    if let Some((a, b)) = &g.ln_before {
        v.extend([("LN-before gamma", a), ("LN-before beta", b)]);
    }
    if let Some((a, b)) = &g.ln_after {
        v.extend([("LN-after gamma", a), ("LN-after beta", b)]);
    }
    if let Some(s) = &g.scaling {
        v.push(("scaling", s));
    }
    if let Some((a, b)) = &g.gate {
        v.extend([("gate weight", a), ("gate bias", b)]);
    }
    v.into_iter().map(|(n, t)| (format!("branch {i} {n}"), be.to_host(t).unwrap())).collect()
}

/// The forward output, then `dh`, `dr` and every trainable branch's gradients, on `be`.
#[allow(clippy::too_many_arguments)]
fn run(be: &dyn Backend, case: &Case, h: &Tensor, r: &Tensor, gamma: &Tensor, beta: &Tensor, d_out: &Tensor, branches: &[HostBranch]) -> (Vec<f32>, Named) {
    let params: Vec<BottleneckParams> = branches.iter().map(HostBranch::params).collect();
    let loc = case.location(h, r, gamma, beta, &params);
    let out = be.adapter_location(&loc).unwrap_or_else(|e| panic!("{} on {}: forward: {e}", case.label(), be.name()));
    let grads: Vec<Option<GradsOut<BottleneckGrads>>> = params
        .iter()
        .zip(&case.trainable)
        .map(|(p, &t)| t.then(|| GradsOut { grads: BottleneckGrads::shaped_like(p, |s| be.upload(vec![f32::NAN; s.iter().product()], s)).unwrap(), accumulate: false }))
        .collect();
    let (dh, dr) = be.adapter_location_backward_into(&loc, d_out, &grads, true).unwrap_or_else(|e| panic!("{} on {}: backward: {e}", case.label(), be.name()));
    let mut g: Named = vec![("dh".into(), be.to_host(&dh.unwrap()).unwrap()), ("dr".into(), be.to_host(&dr.unwrap()).unwrap())];
    for (i, d) in grads.iter().enumerate() {
        if let Some(d) = d {
            g.extend(named(be, i, &d.grads));
        }
    }
    (be.to_host(&out).unwrap(), g)
}

/// Asserts max|got − want| <= tol·(1 + max|want|), every element finite; returns max|err|/bound.
fn assert_close(label: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{label}: length");
    let bound = tol * (1.0 + want.iter().fold(0f32, |m, v| m.max(v.abs())));
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(g.is_finite() && err <= bound, "{label}[{i}] = {g}, CPU {w}, |err| {err:e} > {bound:e}");
        worst = worst.max(err / bound);
    }
    worst
}

/// Forward and backward of Parallel locations whose branches each have their own p (0.1, 0.5,
/// none) and id, through the backend glue, against the CPU reference.
fn backend_matches_cpu(gpu: &Gpu) {
    let be = backend(gpu);
    let mut rng = StdRng::seed_from_u64(0xb0d);
    let (full, plain) = (BranchSpec::full, BranchSpec::plain);
    let houlsby_false = LocationSteps { residual_before_ln: ResidualBeforeLn::False, original_ln_before: false, original_ln_after: true };
    let mut cases = vec![
        Case::random(
            &mut rng,
            2,
            4,
            40,
            true,
            PFEIFFER,
            &[full(6, Activation::Gelu, Scale::Channel, false), plain(8, Activation::Swish), full(5, Activation::Tanh, Scale::Learned, true)],
            &[Some(0.1), None, Some(0.5)],
            &[2, 0, 1],
            0x0123_4567_89ab_cdef,
        ),
        Case::random(&mut rng, 2, 3, 42, false, houlsby_false, &[BranchSpec { ln_after: true, ..plain(4, Activation::Relu) }, full(3, Activation::Swish, Scale::Channel, true)], &[Some(0.5), Some(0.1)], &[0, 1], 77),
        Case::random(&mut rng, 2, 5, 48, false, HOULSBY, &[BranchSpec { scale: Scale::Learned, ..plain(7, Activation::GeluNew) }], &[Some(0.5)], &[0], 5),
    ];
    cases[0].trainable = vec![true, false, true];
    let mut worst = (0f32, String::new());
    for case in &cases {
        let cpu = CpuBackend::reference();
        let (want_out, want_grads) = run(&cpu, case, &case.h, &case.r, &case.gamma, &case.beta, &case.d_out, &case.branches);
        let up = |t: &Tensor| be.upload(data(t), t.shape()).unwrap();
        let seed_buffer = be.upload_u32(vec![case.seed as u32, (case.seed >> 32) as u32], &[2]).unwrap();
        let dev: Vec<HostBranch> = case.branches.iter().map(|b| to_device(&be, b, &seed_buffer)).collect();
        let (out, grads) = run(&be, case, &up(&case.h), &up(&case.r), &up(&case.gamma), &up(&case.beta), &up(&case.d_out), &dev);
        let label = format!("{} {}", gpu.describe(), case.label());
        let mut used = assert_close(&format!("{label}: out"), &out, &want_out, 1e-5);
        assert_eq!(grads.len(), want_grads.len());
        for ((name, g), (_, w)) in grads.iter().zip(&want_grads) {
            used = used.max(assert_close(&format!("{label}: {name}"), g, w, 1e-4));
        }
        if used > worst.0 {
            worst = (used, case.label());
        }
    }
    report_line(&format!("adapter dropout through the CUDA backend on {}: worst max|err|/bound = {:.3} at {}", gpu.describe(), worst.0, worst.1));
}
test_device!(backend_dropout_matches_cpu, backend_matches_cpu);

/// Rows `rows` of each of the `blocks` blocks of `b` rows of `per_row` elements in `v`.
fn rows_of(v: &[f32], per_row: usize, blocks: usize, b: usize, rows: &std::ops::Range<usize>) -> Vec<f32> {
    assert_eq!(v.len(), blocks * b * per_row);
    (0..blocks).flat_map(|k| v[(k * b + rows.start) * per_row..(k * b + rows.end) * per_row].iter().copied()).collect()
}

impl Case {
    /// Rows `rows` of every branch's examples (a data-parallel shard), each branch's dropout
    /// keyed from `offset_rows` (its rows' start in the whole batch, or 0 for a wrong key).
    fn shard(&self, rows: &std::ops::Range<usize>, offset_rows: usize) -> Case {
        let [_, t, h] = self.h.shape().try_into().unwrap();
        let n = self.branches.len();
        let in_blocks = if self.replicate { 1 } else { n };
        let b = self.d_out.shape()[0] / n;
        let cut = |x: &Tensor, blocks: usize| tensor(rows_of(&data(x), t * h, blocks, b, rows), &[blocks * rows.len(), t, h]);
        let offset = (offset_rows * t * h) as u64;
        Case {
            seq_len: self.seq_len,
            replicate: self.replicate,
            steps: self.steps,
            h: cut(&self.h, in_blocks),
            r: cut(&self.r, in_blocks),
            d_out: cut(&self.d_out, n),
            gamma: self.gamma.clone(),
            beta: self.beta.clone(),
            branches: self.branches.iter().map(|br| br.clone().with_dropout(br.dropout.clone().map(|d| DropoutSpec { offset, ..d }))).collect(),
            trainable: self.trainable.clone(),
            seed: self.seed,
        }
    }
}

/// A data-parallel shard of a location (rows r0.. of each branch's examples, every branch's
/// dropout keyed with offset r0·T·H; T·H odd, or 2 mod 4, so rows start inside Philox blocks):
/// on the fused kernels (forward and backward) the output and dh, dr equal rows r0.. of the
/// whole batch's bit for bit; everything is within the bounds above of the CPU backend on the
/// same shard (out 1e-5, gradients 1e-4); the parameter gradients of two complementary shards
/// summed are the whole batch's within 1e-4·(1 + max). The split path's forward likewise within
/// 1e-5. Keyed from row 0 instead, the shard's output differs.
fn shard_matches_whole(gpu: &Gpu) {
    let fused = backend(gpu).with_location_path(LocationPath::Fused);
    let split = backend(gpu).with_location_path(LocationPath::Split);
    let cpu = CpuBackend::reference();
    let mut rng = StdRng::seed_from_u64(0x5_4a2d);
    let (full, plain) = (BranchSpec::full, BranchSpec::plain);
    let cases = [
        Case::random(&mut rng, 3, 3, 41, true, PFEIFFER, &[full(6, Activation::Gelu, Scale::Channel, false), plain(5, Activation::Relu)], &[Some(0.3), Some(0.5)], &[1, 0], 0xfeed),
        Case::random(&mut rng, 4, 3, 42, false, HOULSBY, &[full(4, Activation::Swish, Scale::Learned, true)], &[Some(0.4)], &[2], 0x5eed),
    ];
    let mut worst = 0f32;
    for case in &cases {
        let b = case.d_out.shape()[0] / case.branches.len();
        let n = case.branches.len();
        let per_row = case.seq_len * case.h.shape()[2];
        let in_blocks = if case.replicate { 1 } else { n };
        let on = |be: &CudaBackend, c: &Case| {
            let up = |t: &Tensor| be.upload(data(t), t.shape()).unwrap();
            let seed_buffer = be.upload_u32(vec![c.seed as u32, (c.seed >> 32) as u32], &[2]).unwrap();
            let dev: Vec<HostBranch> = c.branches.iter().map(|br| to_device(be, br, &seed_buffer)).collect();
            run(be, c, &up(&c.h), &up(&c.r), &up(&c.gamma), &up(&c.beta), &up(&c.d_out), &dev)
        };
        let (whole_out, whole_grads) = on(&fused, case);
        let (split_whole, _) = on(&split, case);
        let mut summed: Option<Named> = None;
        for rows in [0..1, 1..b, 1..2, b - 1..b] {
            let label = format!("{} {} rows {rows:?}", gpu.describe(), case.label());
            let sh = case.shard(&rows, rows.start);
            let (out, grads) = on(&fused, &sh);
            assert_eq!(out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), rows_of(&whole_out, per_row, n, b, &rows).iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{label}: out against the whole batch's rows");
            for (k, blocks) in [(0, in_blocks), (1, in_blocks)] {
                let (name, g) = &grads[k];
                assert_eq!(g, &rows_of(&whole_grads[k].1, per_row, blocks, b, &rows), "{label}: {name} against the whole batch's rows");
            }
            let cpu_h = |t: &Tensor| cpu.upload(data(t), t.shape()).unwrap();
            let (want_out, want_grads) = run(&cpu, &sh, &cpu_h(&sh.h), &cpu_h(&sh.r), &cpu_h(&sh.gamma), &cpu_h(&sh.beta), &cpu_h(&sh.d_out), &sh.branches);
            worst = worst.max(assert_close(&format!("{label}: out against the CPU's shard"), &out, &want_out, 1e-5));
            for ((name, g), (_, w)) in grads.iter().zip(&want_grads) {
                worst = worst.max(assert_close(&format!("{label}: {name} against the CPU's shard"), g, w, 1e-4));
            }
            let (split_out, _) = on(&split, &sh);
            assert_close(&format!("{label}: split path against its whole batch's rows"), &split_out, &rows_of(&split_whole, per_row, n, b, &rows), 1e-5);
            if rows.start > 0 {
                let (unkeyed, _) = on(&fused, &case.shard(&rows, 0));
                let diff = unkeyed.iter().zip(&out).map(|(a, c)| (a - c).abs()).fold(0f32, f32::max);
                assert!(diff > 1e-3, "{label}: keyed from row 0 the shard drew the same masks (max diff {diff})");
            }
            // Shards 0..1 and 1..b cover the batch: their parameter gradients add up to the whole's.
            if rows == (0..1) {
                summed = Some(grads);
            } else if rows == (1..b) {
                let first = summed.take().unwrap();
                for (((name, a), (_, c)), (_, w)) in first.iter().zip(&grads).zip(&whole_grads).skip(2) {
                    let sum: Vec<f32> = a.iter().zip(c).map(|(x, y)| x + y).collect();
                    assert_close(&format!("{label}: {name} of rows 0..1 plus rows 1..{b}"), &sum, w, 1e-4);
                }
            }
        }
    }
    report_line(&format!("adapter dropout shards on {}: worst max|err|/bound against the CPU = {worst:.3}", gpu.describe()));
}
test_device!(shard_matches_the_whole_batch, shard_matches_whole);

/// A location whose branches' specs the kernels cannot take is refused by the backend with
/// `Error::Unsupported`, as by `refuse_unsupported`, before anything is launched.
fn backend_refuses(gpu: &Gpu) {
    let be = backend(gpu);
    let mut rng = StdRng::seed_from_u64(0x7e5);
    let case = Case::random(&mut rng, 1, 2, 8, true, PFEIFFER, &[BranchSpec::plain(2, Activation::Relu), BranchSpec::plain(2, Activation::Relu)], &[Some(0.1), Some(0.2)], &[0, 1], 9);
    let up = |t: &Tensor| be.upload(data(t), t.shape()).unwrap();
    let (h, r, gamma, beta) = (up(&case.h), up(&case.r), up(&case.gamma), up(&case.beta));
    let seed_buffer = be.upload_u32(vec![9, 0], &[2]).unwrap();
    let dev: Vec<HostBranch> = case.branches.iter().map(|b| to_device(&be, b, &seed_buffer)).collect();
    let params: Vec<BottleneckParams> = dev.iter().map(HostBranch::params).collect();
    be.adapter_location(&case.location(&h, &r, &gamma, &beta, &params)).unwrap();
    for (what, edit, want) in refusals() {
        let mut branches = dev.clone();
        edit(&mut branches);
        let params: Vec<BottleneckParams> = branches.iter().map(HostBranch::params).collect();
        let err = be.adapter_location(&case.location(&h, &r, &gamma, &beta, &params)).unwrap_err();
        assert!(matches!(err, Error::Unsupported(_)) && err.to_string().contains(want), "{what}: {err}");
    }
}
test_device!(backend_refuses_what_the_kernels_cannot_take, backend_refuses);

type Edit = fn(&mut [HostBranch]);

/// (what, how the last branch is changed, the message).
fn refusals() -> Vec<(&'static str, Edit, &'static str)> {
    fn last(b: &mut [HostBranch]) -> &mut DropoutSpec {
        b.last_mut().unwrap().dropout.as_mut().unwrap()
    }
    vec![
        ("two blocks in one branch", |b| last(b).blocks = vec![1, 2], "an adapter dropout over 2 blocks of one branch's rows"),
        ("another seed", |b| last(b).seed ^= 1, "adapter dropout draws from another seed than an earlier branch's"),
        ("another seed buffer", |b| last(b).seed_buffer = None, "adapter dropout draws from another seed than an earlier branch's"),
    ]
}

/// `location_dropout` on specs as the model builds them: per branch p and the stream
/// `(stream << 8) | id`, the first spec's seed for the launch; and the refusals, without a device.
#[test]
fn location_dropout_takes_the_models_specs() {
    let mut rng = StdRng::seed_from_u64(0x10c);
    let case = Case::random(&mut rng, 1, 2, 8, true, PFEIFFER, &[BranchSpec::plain(2, Activation::Relu); 3], &[None, Some(0.25), Some(0.5)], &[4, 2, 7], 99);
    let params: Vec<BottleneckParams> = case.branches.iter().map(HostBranch::params).collect();
    let loc = case.location(&case.h, &case.r, &case.gamma, &case.beta, &params);
    let (dropout, seed) = location_dropout(&loc).unwrap();
    let stream = (3 << 4) | 5;
    assert_eq!(dropout, vec![None, Some(BranchDropout { p: 0.25, stream: (stream << 8) | 2, offset: 0 }), Some(BranchDropout { p: 0.5, stream: (stream << 8) | 7, offset: 0 })]);
    assert_eq!(seed.map(|s| s.seed), Some(99));
    // Eval (no specs): nothing to draw, no seed.
    let eval: Vec<BottleneckParams> = params.iter().map(|p| BottleneckParams { dropout: None, ..p.clone() }).collect();
    let (dropout, seed) = location_dropout(&case.location(&case.h, &case.r, &case.gamma, &case.beta, &eval)).unwrap();
    assert!(dropout.iter().all(Option::is_none) && seed.is_none());
    refuse_unsupported(&loc).unwrap();
    for (what, edit, want) in refusals() {
        let mut branches = case.branches.clone();
        if what == "another seed buffer" {
            // On the host: the first spec without a buffer, the last with one.
            branches[2].dropout.as_mut().unwrap().seed_buffer = Some(SeedBuffer(tensor(vec![0.0; 2], &[2])));
        } else {
            edit(&mut branches);
        }
        let params: Vec<BottleneckParams> = branches.iter().map(HostBranch::params).collect();
        let err = refuse_unsupported(&case.location(&case.h, &case.r, &case.gamma, &case.beta, &params)).unwrap_err();
        assert!(matches!(err, Error::Unsupported(_)) && err.to_string().contains(want), "{what}: {err}");
    }
}
