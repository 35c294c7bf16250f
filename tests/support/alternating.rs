//! The alternating Parallel(scorenn, tasknn) training that tests/data_parallel.rs and
//! tests/grad_accumulation.rs compare against one process on the whole batch: the tiny BERT with
//! two pfeiffer adapters (blown up, so that a wrong gradient cannot hide in the tolerance) and
//! 3-class heads, each adapter trained two steps at a time with its own objective.
#![allow(dead_code)]

use std::sync::Arc;

use bert_adapters::model::heads::HeadConfig;
use bert_adapters::model::step::TrainStepConfig;
use bert_adapters::train::{AdamW, AdamWConfig, Objective};
use bert_adapters::{AdapterConfig, Backend, BertModel, InputBatch};

use crate::common::{blow_up_adapters, setup, tiny};

/// Steps each comparison runs.
pub const STEPS: u64 = 8;

/// The model on `be`, its batch and labels `(2i + 1) mod 3`.
pub fn model(be: Arc<dyn Backend>) -> (BertModel, InputBatch, Vec<usize>) {
    let (mut model, batch) = tiny(be.clone());
    model.add_adapter_seeded("scorenn", AdapterConfig::named("pfeiffer").unwrap(), 1).unwrap();
    model.add_adapter_seeded("tasknn", AdapterConfig::named("pfeiffer").unwrap(), 2).unwrap();
    for n in ["scorenn", "tasknn"] {
        model.add_classification_head(n, HeadConfig::classification(3)).unwrap();
    }
    blow_up_adapters(&mut model, be.as_ref(), &["scorenn", "tasknn"]);
    model.set_active_adapters(Some(setup(&["scorenn", "tasknn"]))).unwrap();
    let labels: Vec<usize> = (0..batch.batch).map(|i| (i * 2 + 1) % 3).collect();
    (model, batch, labels)
}

/// Step `s`: tasknn for two steps, then scorenn for two, each with its objective.
pub fn step_cfg(s: u64) -> TrainStepConfig {
    if (s / 2).is_multiple_of(2) {
        TrainStepConfig { objective: Objective::TaskEnergy { lambda: 0.1 }, trained: "tasknn".into(), max_grad_norm: Some(1.0) }
    } else {
        TrainStepConfig { objective: Objective::ScoreMargin { margin: 1.0, ce_weight: 0.1 }, trained: "scorenn".into(), max_grad_norm: Some(1.0) }
    }
}

/// [`STEPS`] alternating steps of `model` with dropout (seed 1000 + s), each adapter with its own
/// AdamW (lr 0.01); `step` runs step `s`'s update with its config and optimizer and returns the
/// loss it reports. Returns both adapters' arena parameters and the losses.
pub fn run_alternating(mut model: BertModel, mut step: impl FnMut(&mut BertModel, &TrainStepConfig, &mut AdamW) -> f32) -> (Vec<Vec<f32>>, Vec<f32>) {
    let opt = AdamW::new(AdamWConfig { lr: 0.01, ..AdamWConfig::default() }).unwrap();
    let mut opts = [opt.clone(), opt];
    let mut losses = Vec::new();
    for s in 0..STEPS {
        let cfg = step_cfg(s);
        model.train_adapter(&[cfg.trained.as_str()]).unwrap();
        model.set_dropout(Some(1000 + s));
        losses.push(step(&mut model, &cfg, &mut opts[usize::from(cfg.trained == "tasknn")]));
    }
    let be = model.backend().clone();
    let params = ["scorenn", "tasknn"].iter().map(|n| be.to_host(&model.arena(n).unwrap().params).unwrap()).collect();
    (params, losses)
}

/// `max|got − want| ≤ rel · max|want|`, naming the worst element.
pub fn assert_rel(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (i, diff) = got.iter().zip(want).map(|(a, b)| (a - b).abs()).enumerate().fold((0, 0f32), |m, (i, d)| if d > m.1 { (i, d) } else { m });
    assert!(diff <= rel * scale, "{what}: max |diff| {diff:e} at {i} ({} vs {}) > {rel:e} · {scale}", got[i], want[i]);
}
