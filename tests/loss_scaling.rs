//! Loss scaling of the training step (`BertModel::set_loss_scale`, the f16 pipeline's
//! GradScaler), on the CPU and on every CUDA backend (cuda-sim in CI), in f32:
//! - a power-of-two scale changes nothing: every op of the backward is linear in the loss
//!   gradient, and scaling by 2^k commutes with f32 rounding, so three alternating steps at scale
//!   2^12, and at 2^127 (the tiny model's f32 gradients scaled that far still fit in f32), equal
//!   three unscaled steps bit for bit (loss, gradient norm, every parameter).

mod common;

use std::sync::Arc;

use bert_adapters::model::step::TrainStepConfig;
use bert_adapters::train::loss::Objective;
use bert_adapters::train::{AdamW, AdamWConfig};
use bert_adapters::{Backend, BertModel, CpuBackend};
use common::parallel_pair;

fn backends() -> Vec<Arc<dyn Backend>> {
    let mut all: Vec<Arc<dyn Backend>> = vec![Arc::new(CpuBackend::fast())];
    all.extend(common::cuda_backends());
    all
}

fn config(step: usize) -> TrainStepConfig {
    let (trained, objective) = match step % 2 {
        0 => ("tasknn", Objective::TaskEnergy { lambda: 0.1 }),
        _ => ("scorenn", Objective::ScoreMargin { margin: 1.0, ce_weight: 0.1 }),
    };
    TrainStepConfig { objective, trained: trained.into(), max_grad_norm: Some(1.0) }
}

/// Every adapter and head parameter of the model, as bits, in a fixed order.
fn param_bits(model: &BertModel) -> Vec<(String, Vec<u32>)> {
    let be = model.backend().clone();
    let mut out = Vec::new();
    for n in ["scorenn", "tasknn"] {
        for (key, t) in model.adapter(n).unwrap().params() {
            out.push((format!("{n}.{key}"), be.to_host(t).unwrap().iter().map(|v| v.to_bits()).collect()));
        }
        for (key, t) in model.head(n).unwrap().params() {
            out.push((format!("head {n}.{key}"), be.to_host(t).unwrap().iter().map(|v| v.to_bits()).collect()));
        }
    }
    out
}

fn adamw() -> Vec<AdamW> {
    (0..2).map(|_| AdamW::new(AdamWConfig { lr: 1e-3, ..AdamWConfig::default() }).unwrap()).collect()
}

#[test]
fn a_power_of_two_scale_changes_no_f32_step() {
    for (be, scale) in backends().into_iter().flat_map(|be| [(be.clone(), 4096.0), (be, 2f32.powi(127))]) {
        let label = format!("{} at scale {scale:e}", be.name());
        let (mut plain, batch, labels) = parallel_pair(be.clone(), [0.0, 0.0]);
        let (mut scaled, _, _) = parallel_pair(be.clone(), [0.0, 0.0]);
        scaled.set_loss_scale(scale).unwrap();
        let (mut opt_plain, mut opt_scaled) = (adamw(), adamw());
        for step in 0..3 {
            let c = config(step);
            let i = step % 2;
            for (m, seed) in [(&mut plain, 7), (&mut scaled, 7)] {
                m.train_adapter(&[c.trained.as_str()]).unwrap();
                m.set_dropout(Some(seed + step as u64));
            }
            let want = plain.train_step(&batch, &labels, &c, &mut opt_plain[i]).unwrap().read(be.as_ref()).unwrap();
            let got = scaled.train_step(&batch, &labels, &c, &mut opt_scaled[i]).unwrap().read(be.as_ref()).unwrap();
            assert_eq!((got.loss.to_bits(), got.grad_norm.to_bits()), (want.loss.to_bits(), want.grad_norm.to_bits()), "{label} step {step}: {got:?} vs unscaled {want:?}");
            assert!(want.grad_norm > 0.0, "{label}: the step computed a gradient");
        }
        assert_eq!(param_bits(&scaled), param_bits(&plain), "{label}: parameters after 3 scaled steps");
    }
}

#[test]
fn a_scale_that_is_not_positive_and_finite_is_refused() {
    let (mut model, _, _) = parallel_pair(Arc::new(CpuBackend::reference()), [0.0, 0.0]);
    for bad in [0.0, -2.0, f32::NAN, f32::INFINITY] {
        let e = model.set_loss_scale(bad).unwrap_err();
        assert!(e.to_string().contains("set_loss_scale"), "{e}");
    }
    assert_eq!(model.loss_scale(), 1.0, "a refused scale changes nothing");
}
