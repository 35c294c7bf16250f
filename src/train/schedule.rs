//! Learning-rate schedules with warmup, as transformers' `get_constant_schedule_with_warmup` and
//! `get_linear_schedule_with_warmup` (4.57.6) drive torch's AdamW: the optimizer step with 0-based
//! index `step` runs at `lr · factor(step)`, with the Trainer's order (`optimizer.step()`, then
//! `scheduler.step()`), so with warmup the first step runs at lr 0.
//!
//! - constant: `step / max(1, warmup)` while `step < warmup`, then 1;
//! - linear: the same warmup, then `max(0, (steps − step) / max(1, steps − warmup))`, reaching 0
//!   at `steps` and staying there (a warmup as long as the run, or longer, never decays; one past
//!   it drops to 0 as transformers' does).
//!
//! Checked against transformers by tests/schedule.rs (fixture: tools/make_schedule_fixtures.py).

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Which curve follows the warmup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScheduleKind {
    /// The base learning rate after the warmup.
    #[default]
    Constant,
    /// Linear decay from the base rate at the end of the warmup to 0 at the run's last step.
    Linear,
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Linear => "linear",
        })
    }
}

impl FromStr for ScheduleKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<ScheduleKind> {
        match s {
            "constant" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            other => Err(Error::Input(format!("learning-rate schedule `{other}`: expected constant or linear"))),
        }
    }
}

/// A schedule over a run of `steps` optimizer steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
    /// The run's length (`num_training_steps`): where the linear schedule reaches 0.
    pub steps: u64,
}

impl LrSchedule {
    /// The constant schedule without warmup: every step at the base rate.
    pub fn constant() -> LrSchedule {
        LrSchedule { kind: ScheduleKind::Constant, warmup_steps: 0, steps: 0 }
    }

    /// The multiplier of the base rate at optimizer step `step` (0-based), in [0, 1].
    pub fn factor(&self, step: u64) -> f64 {
        // Python's ints: the differences may be negative (a warmup past the run's end).
        let (step, warmup, steps) = (step as i128, self.warmup_steps as i128, self.steps as i128);
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((steps - step) as f64 / (steps - warmup).max(1) as f64).max(0.0),
        }
    }

    /// The learning rate of step `step` for the base rate `lr`.
    pub fn lr_at(&self, lr: f64, step: u64) -> f64 {
        lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for k in [ScheduleKind::Constant, ScheduleKind::Linear] {
            assert_eq!(k.to_string().parse::<ScheduleKind>().unwrap(), k);
        }
        assert!("cosine".parse::<ScheduleKind>().unwrap_err().to_string().contains("`cosine`"));
    }
}
