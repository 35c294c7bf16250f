//! Dense products (`bert_adapters::cuda::gemm`): the CPU executor `gemm_host` against a naive f64
//! reference for every transpose pair, scaling, padding, odd size, k = 0, strided batches with a
//! broadcast operand, and each epilogue; then cuBLASLt (`LtGemm`) against `gemm_host` when a GPU
//! is present (otherwise that test prints `SKIPPED: ...`; `REQUIRE_GPU=1` makes it fail instead).
//!
//! Tolerance (CPU vs reference): max|out - ref| <= 1e-5 · (1 + max|ref|) over the written elements.
//! Why it is meaningful: every input is a multiple of 1/8 in [-1, 1], `alpha` a multiple of 1/4
//! and `beta` of 1/2, so each product a·b is a multiple of 2^-6, every partial sum of up to 128 of
//! them is a multiple of 2^-6 below 2^7, and alpha·sum + beta·c + bias is a multiple of 2^-8 below
//! 2^9: all of it fits a 24-bit significand, so the f32 result is *exact* whatever the summation
//! order, blocking or FMA use. The tolerance therefore only absorbs the tanh of the GELU epilogue
//! (a few ulp), while any indexing, transpose, stride, scaling or epilogue bug moves an element by
//! at least 2^-8 ≈ 4e-3, far above 1e-5 · (1 + max|ref|) ≈ 1e-4 for these sizes. Elements the
//! product must not write (padding rows, gaps between batches) must keep their exact bits, and C
//! is NaN-filled whenever beta = 0, so a read of C or a skipped element cannot pass.

use bert_adapters::cuda::gemm::{cublaslt_available, gemm_host, Epilogue, Gemm, LtGemm, Transpose};
use bert_adapters::cuda::probe;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const PAIRS: [(Transpose, Transpose); 4] =
    [(Transpose::No, Transpose::No), (Transpose::No, Transpose::Yes), (Transpose::Yes, Transpose::No), (Transpose::Yes, Transpose::Yes)];
const EPILOGUES: [Epilogue; 4] = [Epilogue::None, Epilogue::Bias, Epilogue::ReluBias, Epilogue::GeluBias];

fn gelu_tanh_f64(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

/// The naive reference, in f64: the expected contents of C's whole buffer after `g`, and which
/// elements the product writes (the others must be untouched).
fn gemm_reference(g: &Gemm, a: &[f32], b: &[f32], c: &[f32], bias: Option<&[f32]>) -> (Vec<f64>, Vec<bool>) {
    let mut out: Vec<f64> = c.iter().map(|&x| x as f64).collect();
    let mut written = vec![false; c.len()];
    if g.m == 0 || g.n == 0 {
        return (out, written);
    }
    for batch in 0..g.batch {
        let (a0, b0, c0) = (batch * g.stride_a, batch * g.stride_b, batch * g.stride_c);
        for j in 0..g.n {
            for i in 0..g.m {
                let mut acc = 0.0f64;
                for l in 0..g.k {
                    let av = match g.transa {
                        Transpose::No => a[a0 + i + l * g.lda],
                        Transpose::Yes => a[a0 + l + i * g.lda],
                    };
                    let bv = match g.transb {
                        Transpose::No => b[b0 + l + j * g.ldb],
                        Transpose::Yes => b[b0 + j + l * g.ldb],
                    };
                    acc += av as f64 * bv as f64;
                }
                let idx = c0 + i + j * g.ldc;
                let mut x = g.alpha as f64 * acc;
                if g.beta != 0.0 {
                    x += g.beta as f64 * c[idx] as f64;
                }
                if let Some(bias) = bias {
                    x += bias[i] as f64;
                }
                out[idx] = match g.epilogue {
                    Epilogue::None | Epilogue::Bias => x,
                    Epilogue::ReluBias => x.max(0.0),
                    Epilogue::GeluBias => gelu_tanh_f64(x),
                };
                written[idx] = true;
            }
        }
    }
    (out, written)
}

/// Buffers for one product: exact-arithmetic values (multiples of 1/8 in [-1, 1]), each buffer a
/// few elements longer than needed; C is NaN when beta = 0.
struct Case {
    g: Gemm,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    bias: Option<Vec<f32>>,
}

fn eighths(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-8i32..=8) as f32 / 8.0).collect()
}

impl Case {
    fn new(g: Gemm, seed: u64) -> Case {
        let mut rng = StdRng::seed_from_u64(seed);
        let need = g.required_lengths().expect("a valid test case");
        let a = eighths(&mut rng, need.a + 3);
        let b = eighths(&mut rng, need.b + 3);
        let c = if g.beta == 0.0 { vec![f32::NAN; need.c + 3] } else { eighths(&mut rng, need.c + 3) };
        let bias = g.epilogue.needs_bias().then(|| eighths(&mut rng, g.m));
        Case { g, a, b, c, bias }
    }

    fn reference(&self) -> (Vec<f64>, Vec<bool>) {
        gemm_reference(&self.g, &self.a, &self.b, &self.c, self.bias.as_deref())
    }

    fn run_host(&self) -> Vec<f32> {
        let mut c = self.c.clone();
        gemm_host(&self.g, &self.a, &self.b, &mut c, self.bias.as_deref()).unwrap_or_else(|e| panic!("{:?}: {e}", self.g));
        c
    }
}

/// `Err(description)` unless the written elements are finite and within `rel · (1 + max|ref|)`
/// of the reference and every other element kept its bits.
fn compare(label: &str, out: &[f32], reference: &[f64], written: &[bool], original: &[f32], rel: f64) -> Result<(), String> {
    let scale = reference.iter().zip(written).filter(|(_, &w)| w).map(|(r, _)| r.abs()).fold(0.0f64, f64::max);
    let tol = rel * (1.0 + scale);
    let mut worst = (0.0f64, 0usize);
    for (idx, ((&o, &r), &w)) in out.iter().zip(reference).zip(written).enumerate() {
        if !w {
            if o.to_bits() != original[idx].to_bits() {
                return Err(format!("{label}: element {idx} is outside the product but changed from {} to {o}", original[idx]));
            }
            continue;
        }
        if !o.is_finite() {
            return Err(format!("{label}: element {idx} is {o}, reference {r}"));
        }
        let err = (o as f64 - r).abs();
        if err > worst.0 {
            worst = (err, idx);
        }
    }
    if worst.0 > tol {
        let idx = worst.1;
        return Err(format!("{label}: max error {:.3e} > tol {tol:.3e} at element {idx} (out {}, ref {})", worst.0, out[idx], reference[idx]));
    }
    Ok(())
}

fn check_host(case: &Case, label: &str) {
    let out = case.run_host();
    let (reference, written) = case.reference();
    compare(&format!("{label} {:?}", case.g), &out, &reference, &written, &case.c, 1e-5).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn every_transpose_pair_size_and_scaling() {
    let sizes = [(1, 1, 1), (7, 33, 65), (65, 7, 33), (33, 65, 7), (1, 65, 7), (65, 1, 33)];
    let scalars = [(1.0, 0.0), (0.75, -1.5), (-2.0, 0.5), (0.0, 1.0)];
    let mut seed = 0;
    for (ta, tb) in PAIRS {
        for (m, n, k) in sizes {
            for (alpha, beta) in scalars {
                seed += 1;
                let g = Gemm::new(ta, tb, m, n, k).with_scalars(alpha, beta);
                check_host(&Case::new(g, seed), "packed");
            }
        }
    }
}

#[test]
fn each_epilogue() {
    let mut seed = 100;
    for epilogue in EPILOGUES {
        for (ta, tb) in PAIRS {
            for (m, n, k, alpha, beta) in [(33, 7, 65, 1.0, 0.0), (7, 65, 33, 0.5, 1.0)] {
                seed += 1;
                let g = Gemm::new(ta, tb, m, n, k).with_scalars(alpha, beta).with_epilogue(epilogue);
                check_host(&Case::new(g, seed), "epilogue");
            }
        }
    }
}

#[test]
fn beta_zero_never_reads_c() {
    // Case::new fills C with NaN when beta = 0; compare() rejects any non-finite written element.
    let mut seed = 200;
    for epilogue in EPILOGUES {
        for (m, n, k) in [(7, 33, 65), (65, 1, 7), (7, 7, 0)] {
            seed += 1;
            let g = Gemm::new(Transpose::Yes, Transpose::No, m, n, k).with_scalars(-2.0, 0.0).with_epilogue(epilogue);
            check_host(&Case::new(g, seed), "beta 0");
            let g = g.with_batch(3, g.stride_a, 0, g.stride_c + 2);
            check_host(&Case::new(g, seed), "beta 0 batched");
        }
    }
}

#[test]
fn padded_leading_dimensions() {
    let mut seed = 300;
    for (ta, tb) in PAIRS {
        for (m, n, k) in [(7, 33, 65), (65, 7, 1), (1, 1, 33)] {
            seed += 1;
            let g = Gemm::new(ta, tb, m, n, k);
            let g = g.with_ld(g.lda + 3, g.ldb + 5, g.ldc + 2).with_scalars(0.75, -1.5).with_epilogue(Epilogue::Bias);
            let g = g.with_batch(1, 0, 0, 0);
            check_host(&Case::new(g, seed), "padded");
        }
    }
}

#[test]
fn k_zero_is_beta_c_plus_bias() {
    let mut seed = 400;
    for epilogue in EPILOGUES {
        for beta in [0.0, 0.5, 1.0] {
            seed += 1;
            let g = Gemm::new(Transpose::No, Transpose::Yes, 33, 7, 0).with_scalars(0.75, beta).with_epilogue(epilogue);
            let case = Case::new(g, seed);
            // A and B are not read: empty slices are enough.
            let mut c = case.c.clone();
            gemm_host(&g, &[], &[], &mut c, case.bias.as_deref()).expect("k = 0");
            let (reference, written) = case.reference();
            compare(&format!("k = 0 {g:?}"), &c, &reference, &written, &case.c, 1e-5).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[test]
fn empty_m_n_or_batch_is_a_no_op() {
    let bias = [1.0f32; 7];
    for g in [
        Gemm::new(Transpose::No, Transpose::No, 0, 7, 5),
        Gemm::new(Transpose::No, Transpose::No, 7, 0, 5).with_epilogue(Epilogue::GeluBias),
        Gemm::new(Transpose::No, Transpose::No, 7, 7, 5).with_batch(0, 0, 0, 0).with_scalars(1.0, 1.0),
    ] {
        let mut c = vec![f32::NAN, 3.0];
        let bias = g.epilogue.needs_bias().then_some(&bias[..g.m]);
        gemm_host(&g, &[], &[], &mut c, bias).unwrap_or_else(|e| panic!("{g:?}: {e}"));
        assert!(c[0].is_nan() && c[1] == 3.0, "{g:?} wrote {c:?}");
    }
}

#[test]
fn strided_batches_with_a_broadcast_operand() {
    let mut seed = 500;
    for (ta, tb) in PAIRS {
        for epilogue in [Epilogue::None, Epilogue::ReluBias, Epilogue::GeluBias] {
            let g = Gemm::new(ta, tb, 7, 33, 65).with_scalars(0.5, 1.0).with_epilogue(epilogue);
            let g = g.with_ld(g.lda + 1, g.ldb, g.ldc + 3);
            let (sa, sb, sc) = (g.lda * g.a_stored().1 + 4, g.ldb * g.b_stored().1 + 2, g.ldc * g.n + 5);
            for (label, strides) in [("A broadcast", (0, sb, sc)), ("B broadcast", (sa, 0, sc)), ("no broadcast", (sa, sb, sc))] {
                seed += 1;
                let g = g.with_batch(5, strides.0, strides.1, strides.2);
                check_host(&Case::new(g, seed), label);
            }
            // The tightest C stride: each batch starts right after the previous one's last column.
            seed += 1;
            let tight = g.with_batch(3, sa, sb, (g.n - 1) * g.ldc + g.m);
            check_host(&Case::new(tight, seed), "tight C stride");
        }
    }
}

#[test]
fn parallel_paths() {
    // One product big enough for gemm's own threads and a parallel epilogue pass.
    let g = Gemm::new(Transpose::Yes, Transpose::No, 256, 256, 8).with_scalars(1.0, 0.5).with_epilogue(Epilogue::GeluBias);
    check_host(&Case::new(g, 600), "big single");
    // Batches each worth parallelising, fewer than the pool's threads: sequential batches with
    // parallel products. Then many small batches: one batch per task.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().expect("a rayon pool");
    pool.install(|| {
        let g = Gemm::new(Transpose::No, Transpose::Yes, 96, 96, 64).with_scalars(0.75, 0.0).with_epilogue(Epilogue::ReluBias);
        check_host(&Case::new(g.with_batch(2, g.stride_a, 0, g.stride_c + 1), 601), "2 big batches");
        let g = Gemm::new(Transpose::No, Transpose::No, 9, 5, 3).with_epilogue(Epilogue::Bias);
        check_host(&Case::new(g.with_batch(40, 0, g.stride_b, g.stride_c), 602), "40 small batches");
    });
}

// ---- cuBLASLt ----------------------------------------------------------------------------------

#[test]
fn probing_for_cublaslt_never_panics() {
    // Here, on a machine without CUDA, this is false; either way it must answer, not panic.
    let first = cublaslt_available();
    assert_eq!(first, cublaslt_available());
}

/// The GPU cases: every transpose pair and epilogue, padding, beta = 0 over NaN, k = 0, strided
/// batches with a broadcast operand and a bias (the per-batch fallback path if cuBLASLt has no
/// batched epilogue kernel), pointers only 4-byte aligned, and one larger product.
fn gpu_cases() -> Vec<(String, Gemm, usize)> {
    let mut cases = Vec::new();
    for (ta, tb) in PAIRS {
        for epilogue in EPILOGUES {
            let g = Gemm::new(ta, tb, 33, 65, 7).with_scalars(0.75, -1.5).with_epilogue(epilogue);
            cases.push((format!("{ta:?}{tb:?} {epilogue:?}"), g, 0));
            let g = g.with_ld(g.lda + 3, g.ldb + 1, g.ldc + 2).with_scalars(1.0, 0.0);
            cases.push((format!("{ta:?}{tb:?} {epilogue:?} padded, beta 0"), g, 0));
        }
    }
    for epilogue in EPILOGUES {
        for beta in [0.0, 0.5] {
            cases.push((format!("k = 0, {epilogue:?}, beta {beta}"), Gemm::new(Transpose::No, Transpose::No, 33, 7, 0).with_scalars(1.0, beta).with_epilogue(epilogue), 0));
        }
        let g = Gemm::new(Transpose::Yes, Transpose::No, 7, 33, 65).with_scalars(0.5, 1.0).with_epilogue(epilogue);
        cases.push((format!("batched, A broadcast, {epilogue:?}"), g.with_batch(4, 0, g.stride_b + 2, g.stride_c + 5), 0));
        cases.push((format!("batched, B broadcast, {epilogue:?}"), g.with_batch(4, g.stride_a, 0, g.stride_c), 0));
        cases.push((format!("4-byte aligned pointers, {epilogue:?}"), g, 1));
    }
    let g = Gemm::new(Transpose::Yes, Transpose::No, 256, 192, 128).with_scalars(1.0, 0.5).with_epilogue(Epilogue::GeluBias);
    cases.push(("256×192×128 linear + GELU".into(), g, 0));
    cases
}

#[test]
fn cublaslt_matches_the_host_executor() {
    use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
    use std::sync::Arc;

    let Some(ctx) = probe::gpu_for_test("cuda::gemm: cuBLASLt vs gemm_host") else { return };
    let stream = ctx.new_stream().expect("a stream");
    let lt = LtGemm::new(stream.clone()).expect("LtGemm::new");
    // `offset` zeros in front (to misalign the operand) and one behind (never an empty allocation).
    let upload = |stream: &Arc<CudaStream>, data: &[f32], offset: usize| -> CudaSlice<f32> {
        let mut padded = vec![0.0f32; offset];
        padded.extend_from_slice(data);
        padded.push(0.0);
        stream.clone_htod(&padded).expect("upload")
    };
    let mut failures = Vec::new();
    for (seed, (label, g, offset)) in gpu_cases().into_iter().enumerate() {
        let case = Case::new(g, 1000 + seed as u64);
        let host = case.run_host();
        let (da, db) = (upload(&stream, &case.a, offset), upload(&stream, &case.b, offset));
        let mut dc = upload(&stream, &case.c, offset);
        let dbias = case.bias.as_ref().map(|bias| upload(&stream, bias, offset));
        let shift = (offset * std::mem::size_of::<f32>()) as u64;
        {
            let (pa, _ra) = da.device_ptr(&stream);
            let (pb, _rb) = db.device_ptr(&stream);
            let bias_ptr = dbias.as_ref().map(|d| d.device_ptr(&stream));
            let (pc, _rc) = dc.device_ptr_mut(&stream);
            // SAFETY: each buffer holds the case's data (at least `required_lengths`) after
            // `offset` elements, C is its own allocation, and everything outlives the
            // synchronisation below.
            let run = unsafe { lt.run(&g, pa + shift, pb + shift, pc + shift, bias_ptr.as_ref().map(|(p, _)| p + shift)) };
            if let Err(e) = run {
                failures.push(format!("{label}: {e}"));
                continue;
            }
        }
        let out = stream.clone_dtoh(&dc).expect("download");
        let out = &out[offset..offset + case.c.len()];
        // The host result is exact for every epilogue but GELU (see the header). For GELU allow
        // 1e-3 · (1 + max|ref|): cuBLASLt's tanh is unspecified, and PTX's tanh.approx.f32 (a
        // likely choice) has a relative error near 2^-11, i.e. up to about 2.5e-4·|x| in GELU(x).
        let rel = if g.epilogue == Epilogue::GeluBias { 1e-3 } else { 1e-5 };
        let reference: Vec<f64> = host.iter().map(|&x| x as f64).collect();
        let (_, written) = case.reference();
        if let Err(e) = compare(&format!("cuBLASLt {label}"), out, &reference, &written, &case.c, rel) {
            failures.push(e);
        }
    }
    stream.synchronize().expect("synchronize");
    probe::report_line(&format!("cuda::gemm: {lt:?} ran {} cuBLASLt cases", gpu_cases().len()));
    assert!(failures.is_empty(), "{} cuBLASLt cases failed:\n{}", failures.len(), failures.join("\n"));
}
