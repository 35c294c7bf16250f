//! Dynamic loss scaling for f16 training, with torch's `GradScaler` policy: the loss gradient is
//! multiplied by a scale before the backward (`BertModel::set_loss_scale`), so the activation
//! gradients stored in f16 stay above its subnormals, and the parameter gradients are divided by
//! it before clipping and AdamW. A step whose gradients overflowed (a non-finite gradient norm)
//! updates nothing; the scale is then halved and training goes on. After `growth_interval`
//! finite steps in a row the scale doubles. Every factor is a power of two, so scaling changes no
//! f32 gradient that did not overflow.
//!
//! One rule is ours: a scale that would fall below `min_scale` (1 by default) is an error, not
//! another skipped step. At a scale of 1 the gradients overflow f16 unscaled, which no scale
//! fixes: the run has diverged or its gradients exceed f16's range (bf16 has f32's range).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The policy (torch's defaults, plus the floor).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScalerConfig {
    /// The first scale (torch: 2^16).
    pub init_scale: f32,
    /// The scale's factor after `growth_interval` finite steps in a row (torch: 2).
    pub growth_factor: f32,
    /// The scale's factor after an overflow (torch: 0.5).
    pub backoff_factor: f32,
    /// Finite steps in a row before the scale grows (torch: 2000).
    pub growth_interval: u32,
    /// The least scale training may continue at; below it an overflow is an error.
    pub min_scale: f32,
}

impl Default for LossScalerConfig {
    fn default() -> Self {
        LossScalerConfig { init_scale: 65536.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 2000, min_scale: 1.0 }
    }
}

/// The scaler's state, saved with a checkpoint so a resumed run scales as the uninterrupted one.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScalerState {
    pub scale: f32,
    /// Finite steps since the last change of scale.
    pub good_steps: u32,
    /// Steps skipped for an overflow so far.
    pub skipped: u64,
}

/// What a step's gradient norm meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaledStep {
    /// Finite: the update was applied.
    Applied,
    /// Overflowed: nothing was updated, and the scale was lowered.
    Skipped,
}

/// [`LossScalerConfig`]'s policy over a run (see the module docs).
#[derive(Clone, Debug)]
pub struct LossScaler {
    config: LossScalerConfig,
    state: LossScalerState,
}

impl LossScaler {
    /// A scaler at `config.init_scale`; a factor, interval or scale out of range is refused.
    pub fn new(config: LossScalerConfig) -> Result<Self> {
        let c = config;
        let ok = |v: f32| v.is_finite() && v > 0.0;
        if !(ok(c.init_scale) && ok(c.min_scale) && c.init_scale >= c.min_scale) {
            return Err(Error::Input(format!("loss scaler: init_scale {} and min_scale {} must be positive and finite, init_scale >= min_scale", c.init_scale, c.min_scale)));
        }
        if !(c.growth_factor.is_finite() && c.growth_factor > 1.0 && ok(c.backoff_factor) && c.backoff_factor < 1.0 && c.growth_interval > 0) {
            return Err(Error::Input(format!(
                "loss scaler: growth_factor {} must be > 1, backoff_factor {} in (0, 1), growth_interval {} > 0",
                c.growth_factor, c.backoff_factor, c.growth_interval
            )));
        }
        Ok(LossScaler { config, state: LossScalerState { scale: c.init_scale, good_steps: 0, skipped: 0 } })
    }

    /// A scaler continuing from a checkpoint's `state`, which must be a state this policy can reach.
    pub fn resume(config: LossScalerConfig, state: LossScalerState) -> Result<Self> {
        let mut s = Self::new(config)?;
        if !(state.scale.is_finite() && state.scale >= config.min_scale && state.good_steps < config.growth_interval) {
            return Err(Error::Input(format!(
                "loss scaler: the saved scale {} (min {}) or good-step count {} (interval {}) is out of range",
                state.scale, config.min_scale, state.good_steps, config.growth_interval
            )));
        }
        s.state = state;
        Ok(s)
    }

    /// The scale the next step applies.
    pub fn scale(&self) -> f32 {
        self.state.scale
    }

    pub fn state(&self) -> LossScalerState {
        self.state
    }

    pub fn config(&self) -> LossScalerConfig {
        self.config
    }

    /// Account for a step whose gradient norm was `grad_norm`: finite counts toward growth (the
    /// scale grows after `growth_interval` in a row, unless that would overflow f32); non-finite
    /// lowers the scale and reports the step skipped, or is `Error::NonFinite` when the scale
    /// would fall below `min_scale`.
    pub fn update(&mut self, grad_norm: f32) -> Result<ScaledStep> {
        let c = self.config;
        let s = &mut self.state;
        if grad_norm.is_finite() {
            s.good_steps += 1;
            if s.good_steps == c.growth_interval {
                let grown = s.scale * c.growth_factor;
                if grown.is_finite() {
                    s.scale = grown;
                }
                s.good_steps = 0;
            }
            return Ok(ScaledStep::Applied);
        }
        let lowered = s.scale * c.backoff_factor;
        if lowered < c.min_scale {
            return Err(Error::NonFinite {
                at: format!(
                    "the gradients (no update was applied) at loss scale {}: they overflow f16 even unscaled, so training has diverged or needs f32's range (try --precision bf16 or a lower --lr)",
                    s.scale
                ),
            });
        }
        s.scale = lowered;
        s.good_steps = 0;
        s.skipped += 1;
        Ok(ScaledStep::Skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> LossScalerConfig {
        LossScalerConfig { init_scale: 8.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 3, min_scale: 1.0 }
    }

    #[test]
    fn grows_after_the_interval_and_backs_off_on_overflow() {
        let mut s = LossScaler::new(small()).unwrap();
        assert_eq!(s.update(1.0).unwrap(), ScaledStep::Applied);
        assert_eq!(s.update(2.0).unwrap(), ScaledStep::Applied);
        assert_eq!(s.scale(), 8.0);
        assert_eq!(s.update(3.0).unwrap(), ScaledStep::Applied);
        assert_eq!(s.scale(), 16.0, "third finite step in a row: x2");
        assert_eq!(s.update(1.0).unwrap(), ScaledStep::Applied);
        assert_eq!(s.update(f32::INFINITY).unwrap(), ScaledStep::Skipped);
        assert_eq!(s.state(), LossScalerState { scale: 8.0, good_steps: 0, skipped: 1 }, "the overflow resets the run of good steps");
        assert_eq!(s.update(f32::NAN).unwrap(), ScaledStep::Skipped);
        assert_eq!(s.scale(), 4.0);
    }

    #[test]
    fn falling_below_the_floor_is_an_error_not_a_skip() {
        let mut s = LossScaler::new(LossScalerConfig { init_scale: 2.0, ..small() }).unwrap();
        assert_eq!(s.update(f32::INFINITY).unwrap(), ScaledStep::Skipped);
        assert_eq!(s.scale(), 1.0);
        let e = s.update(f32::INFINITY).unwrap_err();
        assert!(matches!(&e, Error::NonFinite { at } if at.contains("loss scale 1") && at.contains("bf16")), "{e}");
        assert_eq!(s.scale(), 1.0, "an error changes nothing");
    }

    #[test]
    fn growth_stops_short_of_f32_overflow() {
        let mut s = LossScaler::new(LossScalerConfig { init_scale: 2f32.powi(127), growth_interval: 1, ..small() }).unwrap();
        s.update(0.5).unwrap();
        assert_eq!(s.scale(), 2f32.powi(127));
    }

    #[test]
    fn bad_policies_and_states_are_refused() {
        for c in [
            LossScalerConfig { init_scale: 0.0, ..small() },
            LossScalerConfig { init_scale: f32::INFINITY, ..small() },
            LossScalerConfig { init_scale: 0.5, ..small() },
            LossScalerConfig { growth_factor: 1.0, ..small() },
            LossScalerConfig { backoff_factor: 1.0, ..small() },
            LossScalerConfig { backoff_factor: 0.0, ..small() },
            LossScalerConfig { growth_interval: 0, ..small() },
        ] {
            assert!(LossScaler::new(c).is_err(), "{c:?}");
        }
        assert!(LossScaler::resume(small(), LossScalerState { scale: 0.5, good_steps: 0, skipped: 0 }).is_err());
        assert!(LossScaler::resume(small(), LossScalerState { scale: 4.0, good_steps: 3, skipped: 0 }).is_err());
        let r = LossScaler::resume(small(), LossScalerState { scale: 4.0, good_steps: 2, skipped: 5 }).unwrap();
        assert_eq!((r.scale(), r.state().skipped), (4.0, 5));
    }
}
