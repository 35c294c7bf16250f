//! The training objectives on the device (`kernels/loss.cu` through `CudaBackend::loss`) against
//! their host specification `train::loss::reference`, from one test body per device.
//! Tolerance `1e-5·(1 + max|ref|)` for the gradient and the loss: both are computed in f64 per
//! row and rounded to f32 once, so they sit within a few f32 ulps of the reference.

use bert_adapters::backend::Backend;
use bert_adapters::cuda::backend::CudaBackend;
use bert_adapters::cuda::gpu::Gpu;
use bert_adapters::train::loss::{reference, LossOp, Objective};
use bert_adapters::{test_device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const OBJECTIVES: [Objective; 4] = [
    Objective::CrossEntropy,
    Objective::TaskEnergy { lambda: 0.7 },
    Objective::ScoreMargin { margin: 1.0, ce_weight: 0.3 },
    // A margin so large the hinge is always active, and one so small it never is.
    Objective::ScoreMargin { margin: -100.0, ce_weight: 0.5 },
];

fn close(label: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{label}");
    let tol = 1e-5 * (1.0 + want.iter().fold(0f32, |m, v| m.max(v.abs())));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{label}: [{i}] {g} vs reference {w} (tol {tol:e})");
    }
}

/// Runs `objective` on the backend; returns (dlogits, [total, ce]).
fn run(be: &dyn Backend, objective: Objective, trained: &[f32], other: &[f32], labels: &[u32], classes: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = labels.len();
    let t = be.upload(trained.to_vec(), &[rows, classes]).unwrap();
    let o = be.upload(other.to_vec(), &[rows, classes]).unwrap();
    let y = be.upload_u32(labels.to_vec(), &[rows]).unwrap();
    let two = !matches!(objective, Objective::CrossEntropy);
    let op = LossOp { objective, trained: &t, other: two.then_some(&o), labels: &y };
    let (d, l) = op.run(be).unwrap();
    (be.to_host(&d).unwrap(), be.to_host(&l).unwrap())
}

fn objectives_match_the_reference(gpu: &Gpu) {
    let be = CudaBackend::on(gpu.reopen().unwrap());
    let mut rng = StdRng::seed_from_u64(0x1055);
    for (rows, classes) in [(1, 2), (5, 3), (13, 7), (70, 2)] {
        let trained: Vec<f32> = (0..rows * classes).map(|_| rng.random_range(-4.0..4.0)).collect();
        let other: Vec<f32> = (0..rows * classes).map(|_| rng.random_range(-4.0..4.0)).collect();
        let labels: Vec<u32> = (0..rows).map(|_| rng.random_range(0..classes as u32)).collect();
        for objective in OBJECTIVES {
            let two = !matches!(objective, Objective::CrossEntropy);
            let want = reference(objective, &trained, two.then_some(&other[..]), &labels, classes).unwrap();
            let (d, l) = run(&be, objective, &trained, &other, &labels, classes);
            let label = format!("{} {objective:?} rows={rows} classes={classes}", gpu.describe());
            close(&format!("{label} dlogits"), &d, &want.dlogits);
            close(&format!("{label} loss"), &l, &[want.total as f32, want.ce as f32]);
            assert!(d.iter().any(|&v| v != 0.0), "{label}: an all-zero gradient tests nothing");
        }
    }
}
test_device!(objectives, objectives_match_the_reference);

/// A NaN logit anywhere makes the total and every gradient NaN, as in the reference; the CE part
/// is what the reference reports.
fn non_finite_logits_give_nan(gpu: &Gpu) {
    let be = CudaBackend::on(gpu.reopen().unwrap());
    let (rows, classes) = (4, 3);
    let mut trained: Vec<f32> = (0..rows * classes).map(|i| i as f32 / 5.0 - 1.0).collect();
    let mut other = trained.iter().rev().copied().collect::<Vec<_>>();
    let labels = [0u32, 2, 1, 1];
    trained[7] = f32::NAN;
    for objective in OBJECTIVES {
        let (d, l) = run(&be, objective, &trained, &other, &labels, classes);
        assert!(l[0].is_nan() && d.iter().all(|v| v.is_nan()), "{objective:?}: {l:?} {d:?}");
    }
    // Only the constant branch is non-finite: still a NaN total (a diverged partner).
    trained[7] = 0.5;
    other[2] = f32::INFINITY;
    let objective = Objective::TaskEnergy { lambda: 0.2 };
    let want = reference(objective, &trained, Some(&other), &labels, classes).unwrap();
    let (d, l) = run(&be, objective, &trained, &other, &labels, classes);
    assert!(l[0].is_nan() && want.total.is_nan() && d.iter().all(|v| v.is_nan()));
    close("finite CE part", &l[1..], &[want.ce as f32]);
}
test_device!(non_finite, non_finite_logits_give_nan);

fn bad_shapes_are_refused(gpu: &Gpu) {
    let be = CudaBackend::on(gpu.reopen().unwrap());
    let t = be.upload(vec![0.0; 6], &[2, 3]).unwrap();
    let y = be.upload_u32(vec![0, 1], &[2]).unwrap();
    // The two-branch objective without its other logits.
    let op = LossOp { objective: Objective::TaskEnergy { lambda: 1.0 }, trained: &t, other: None, labels: &y };
    assert!(op.run(&be).is_err());
    let short = be.upload_u32(vec![0], &[1]).unwrap();
    let op = LossOp { objective: Objective::CrossEntropy, trained: &t, other: None, labels: &short };
    assert!(op.run(&be).is_err());
    // A host tensor is refused with the device named.
    let host = Tensor::from_vec(vec![0.0; 6], &[2, 3]).unwrap();
    let op = LossOp { objective: Objective::CrossEntropy, trained: &host, other: None, labels: &y };
    assert!(op.run(&be).unwrap_err().to_string().contains("on cpu"));
}
test_device!(bad_shapes, bad_shapes_are_refused);
