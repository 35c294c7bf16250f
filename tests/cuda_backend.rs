//! The CUDA model backend (`cuda::backend::CudaBackend`) against the CPU backend, op by op, from
//! one test body per device (`test_device!`: the `cuda-sim` executor in CI, a GPU when present).
//! Tolerance `max|out − ref| <= 1e-5·(1 + max|ref|)`; data movement ops must be bit-exact.

use bert_adapters::backend::Backend;
use bert_adapters::cpu::CpuBackend;
use bert_adapters::cuda::backend::CudaBackend;
use bert_adapters::cuda::gpu::Gpu;
use bert_adapters::{test_device, DType, Error, Tensor};
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
    // An op of the backward (issue 14) is refused by name, never answered wrongly.
    let e = be.activation_backward(&t, &t, bert_adapters::Activation::Relu).unwrap_err().to_string();
    assert!(e.contains("activation_backward is not implemented on the CUDA backend"), "{e}");
    assert!(!be.supports_training());
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
