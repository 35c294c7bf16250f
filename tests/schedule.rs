//! Learning-rate schedules (`bert_adapters::train::schedule`) against transformers 4.57.6's
//! `get_constant_schedule_with_warmup` / `get_linear_schedule_with_warmup` driving torch's AdamW
//! (tests/fixtures/schedules.json, from tools/make_schedule_fixtures.py).

mod common;

use std::collections::BTreeMap;

use bert_adapters::train::{AdamW, AdamWConfig, LrSchedule, ScheduleKind};
use bert_adapters::Tensor;

#[derive(serde::Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    schedule: String,
    warmup_steps: u64,
    steps: u64,
    lr: f64,
    weight_decay: f64,
    lrs: Vec<f64>,
    param_after: Vec<f64>,
}

fn fixture() -> Fixture {
    let path = common::committed_fixture("schedules.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Each step's learning rate equals the one torch's optimizer ran at, warmup and decay, past the
/// end and with a warmup as long as the run or longer.
#[test]
fn every_step_runs_at_transformers_learning_rate() {
    let cases = fixture().cases;
    assert!(cases.len() >= 8);
    for c in &cases {
        let s = LrSchedule { kind: c.schedule.parse().unwrap(), warmup_steps: c.warmup_steps, steps: c.steps };
        for (step, &want) in c.lrs.iter().enumerate() {
            let got = s.lr_at(c.lr, step as u64);
            assert!((got - want).abs() <= 1e-15 * (1.0 + want.abs()), "{} warmup {} of {} steps, step {step}: {got} vs transformers' {want}", c.schedule, c.warmup_steps, c.steps);
        }
    }
    // The cases the fixture holds cover both kinds, a zero and a long warmup.
    assert!(cases.iter().any(|c| c.schedule == "constant" && c.warmup_steps > 0));
    assert!(cases.iter().any(|c| c.schedule == "linear" && c.warmup_steps > c.steps));
}

/// AdamW stepped with the scheduled rates (`set_lr` before each step, weight decay on) ends where
/// torch's does: decoupled decay scales with the scheduled rate, and a step at rate 0 still counts
/// for the bias correction.
#[test]
fn adamw_under_a_schedule_ends_where_torch_does() {
    for c in fixture().cases {
        let s = LrSchedule { kind: c.schedule.parse().unwrap(), warmup_steps: c.warmup_steps, steps: c.steps };
        let mut opt = AdamW::new(AdamWConfig { lr: c.lr, weight_decay: c.weight_decay, ..AdamWConfig::default() }).unwrap();
        let mut params: BTreeMap<String, Tensor> = [("w".to_string(), Tensor::from_vec(vec![1.0, -2.0], &[2]).unwrap())].into();
        let grads: BTreeMap<String, Tensor> = [("w".to_string(), Tensor::from_vec(vec![0.5, 0.25], &[2]).unwrap())].into();
        for step in 0..c.lrs.len() as u64 {
            opt.set_lr(s.lr_at(c.lr, step)).unwrap();
            opt.step(&mut params, &grads).unwrap();
        }
        let got = params["w"].cpu_data().unwrap().to_vec();
        common::assert_close(&format!("{} warmup {} of {}", c.schedule, c.warmup_steps, c.steps), &got, &c.param_after.iter().map(|&x| x as f32).collect::<Vec<_>>(), common::TOL);
    }
}

#[test]
fn the_constant_schedule_without_warmup_is_the_base_rate() {
    let s = LrSchedule::constant();
    assert_eq!(s.kind, ScheduleKind::Constant);
    assert!((0..1000).all(|step| s.lr_at(1e-3, step) == 1e-3));
}
