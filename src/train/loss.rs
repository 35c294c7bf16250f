//! The training objectives on head logits, as one backend op (`Backend::loss`), with their host
//! reference (`reference`), which is the specification every backend's kernel is tested against.
//!
//! With `s` scorenn's logits and `t` tasknn's (both `[B, C]`), `p = softmax(t)`, and the energy of
//! a label distribution `E(x, p) = −⟨p, s⟩`:
//! - `CrossEntropy`: `CE(z, y)`, the batch mean of `logsumexp(z) − z_y` (torch `CrossEntropyLoss`);
//! - `TaskEnergy` (tasknn): `CE(t, y) + λ·E(x, p)`; `s` is a constant, so the energy's gradient
//!   reaches tasknn only through `p`;
//! - `ScoreMargin` (scorenn): `max(0, Δ − s_y + ⟨p̂, s⟩) + α·CE(s, y)` with `p̂ = softmax(t)` a
//!   constant: a margin that ranks the gold label above tasknn's prediction, plus a small
//!   cross-entropy that keeps scorenn's logits anchored to the labels.
//!
//! Numerics: per row in f64 with the max subtracted (stable for any finite logits); the gradient
//! is rounded to f32 once. A non-finite logit makes the loss NaN (the caller reports it when it
//! reads the loss); it is never silently turned into a number.

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// Which objective a `LossOp` computes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Objective {
    CrossEntropy,
    /// tasknn's objective; `trained` is tasknn's logits, `other` scorenn's.
    TaskEnergy { lambda: f64 },
    /// scorenn's objective; `trained` is scorenn's logits, `other` tasknn's.
    ScoreMargin { margin: f64, ce_weight: f64 },
}

impl Objective {
    /// tasknn's objective as `bert-adapters train` runs it: cross-entropy plus λ = 0.1 times the
    /// energy of its own distribution under scorenn's scores.
    pub const TASKNN: Objective = Objective::TaskEnergy { lambda: 0.1 };
    /// scorenn's objective as `bert-adapters train` runs it: a margin Δ = 1 between the gold
    /// label's score and tasknn's expected score, plus α = 0.1 times its own cross-entropy.
    pub const SCORENN: Objective = Objective::ScoreMargin { margin: 1.0, ce_weight: 0.1 };
}

/// One loss evaluation on the device.
pub struct LossOp<'a> {
    pub objective: Objective,
    /// `[B, C]`: the logits whose gradient is written.
    pub trained: &'a Tensor,
    /// `[B, C]`: the other branch's logits, a constant (the two-branch objectives only).
    pub other: Option<&'a Tensor>,
    /// `[B]` U32 class indices, each `< C` (checked when they were written).
    pub labels: &'a Tensor,
}

impl LossOp<'_> {
    /// Shapes and dtypes; returns `(B, C)`.
    pub fn validate(&self, dlogits: &Tensor, loss: &Tensor) -> Result<(usize, usize)> {
        const OP: &str = "loss";
        let s = self.trained.shape();
        if s.len() != 2 || s[0] == 0 || s[1] == 0 {
            return Err(Error::shape(OP, format!("logits have shape {s:?}, expected [B > 0, C > 0]")));
        }
        let (b, c) = (s[0], s[1]);
        let needs_other = !matches!(self.objective, Objective::CrossEntropy);
        match (self.other, needs_other) {
            (Some(o), true) if o.shape() == s => {}
            (None, false) => {}
            (o, _) => return Err(Error::shape(OP, format!("{:?} needs the other branch's logits of shape {s:?}, got {:?}", self.objective, o.map(|o| o.shape().to_vec())))),
        }
        if self.labels.shape() != [b] || self.labels.dtype() != DType::U32 {
            return Err(Error::shape(OP, format!("labels are {} {:?}, expected u32 [{b}]", self.labels.dtype(), self.labels.shape())));
        }
        if dlogits.shape() != s || loss.shape() != [2] {
            return Err(Error::shape(OP, format!("outputs have shapes {:?} and {:?}, expected {s:?} and [2]", dlogits.shape(), loss.shape())));
        }
        Ok((b, c))
    }
}

impl LossOp<'_> {
    /// Run the op on `backend` into fresh outputs: `(dlogits [B, C], loss [2])`, on the device.
    pub fn run(&self, backend: &dyn crate::backend::Backend) -> Result<(Tensor, Tensor)> {
        let s = self.trained.shape();
        if s.len() != 2 {
            return Err(Error::shape("loss", format!("logits have shape {s:?}, expected [B, C]")));
        }
        let dlogits = backend.zeros(s, DType::F32)?;
        let loss = backend.zeros(&[2], DType::F32)?;
        backend.loss(self, &dlogits, &loss)?;
        Ok((dlogits, loss))
    }
}

/// What the reference computes for one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct LossValue {
    /// The objective (what the optimizer lowers).
    pub total: f64,
    /// The cross-entropy part (tasknn's CE, scorenn's own CE, or all of it), for the logs.
    pub ce: f64,
    /// ∂total/∂(trained logits), `[B·C]` row-major.
    pub dlogits: Vec<f32>,
}

fn softmax(row: &[f64]) -> Vec<f64> {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
    let e: Vec<f64> = row.iter().map(|&v| (v - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

/// `(log Σ exp(row)) − row[y]` and `softmax(row)`.
fn ce_row(row: &[f64], y: usize) -> (f64, Vec<f64>) {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
    let lse = max + row.iter().map(|&v| (v - max).exp()).sum::<f64>().ln();
    (lse - row[y], softmax(row))
}

/// The objective on host logits: `trained` and `other` are `[B·C]`, `labels` `[B]` (each `< c`).
/// Shapes and label ranges are errors; non-finite logits give a NaN loss and NaN gradients.
pub fn reference(objective: Objective, trained: &[f32], other: Option<&[f32]>, labels: &[u32], c: usize) -> Result<LossValue> {
    let b = labels.len();
    if b == 0 || c == 0 || trained.len() != b * c || other.is_some_and(|o| o.len() != b * c) {
        return Err(Error::Input(format!("logits of {} values for {b} labels of {c} classes", trained.len())));
    }
    if let Some(&y) = labels.iter().find(|&&y| y as usize >= c) {
        return Err(Error::Input(format!("label {y} is out of range for {c} classes")));
    }
    let needs_other = !matches!(objective, Objective::CrossEntropy);
    let other = match (other, needs_other) {
        (Some(o), true) => o,
        (None, false) => trained, // unused
        _ => return Err(Error::Input(format!("{objective:?} needs the other branch's logits exactly when it is a two-branch objective"))),
    };
    let bf = b as f64;
    let (mut total, mut ce_sum) = (0.0, 0.0);
    let mut d = Vec::with_capacity(b * c);
    let rows = |x: &[f32]| x.chunks(c).map(|r| r.iter().map(|&v| v as f64).collect::<Vec<f64>>()).collect::<Vec<_>>();
    let non_finite = trained.iter().chain(other).any(|v| !v.is_finite());
    for ((z, o), &y) in rows(trained).into_iter().zip(rows(other)).zip(labels) {
        let y = y as usize;
        let onehot = |j: usize| if j == y { 1.0 } else { 0.0 };
        match objective {
            Objective::CrossEntropy => {
                let (ce, p) = ce_row(&z, y);
                ce_sum += ce;
                total += ce;
                d.extend((0..c).map(|j| ((p[j] - onehot(j)) / bf) as f32));
            }
            Objective::TaskEnergy { lambda } => {
                // z = t (trained), o = s.
                let (ce, p) = ce_row(&z, y);
                let ps: f64 = p.iter().zip(&o).map(|(p, s)| p * s).sum();
                ce_sum += ce;
                total += ce - lambda * ps;
                // ∂(−⟨p, s⟩)/∂t_j = −p_j (s_j − ⟨p, s⟩): the softmax Jacobian applied to −s.
                d.extend((0..c).map(|j| (((p[j] - onehot(j)) + lambda * (-p[j] * (o[j] - ps))) / bf) as f32));
            }
            Objective::ScoreMargin { margin, ce_weight } => {
                // z = s (trained), o = t.
                let p_hat = softmax(&o);
                let ps: f64 = p_hat.iter().zip(&z).map(|(p, s)| p * s).sum();
                let hinge = margin - z[y] + ps;
                let active = hinge > 0.0;
                let (ce, q) = ce_row(&z, y);
                ce_sum += ce;
                total += hinge.max(0.0) + ce_weight * ce;
                d.extend((0..c).map(|j| (((if active { p_hat[j] - onehot(j) } else { 0.0 }) + ce_weight * (q[j] - onehot(j))) / bf) as f32));
            }
        }
    }
    if non_finite {
        // f64::max ignores NaN, so say it explicitly: a diverged step must not look like a number.
        total = f64::NAN;
        d.iter_mut().for_each(|v| *v = f32::NAN);
    }
    Ok(LossValue { total: total / bf, ce: ce_sum / bf, dlogits: d })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: [f32; 6] = [0.3, -1.2, 0.8, 2.0, 0.1, -0.4];
    const T: [f32; 6] = [1.1, 0.2, -0.7, -0.3, 0.9, 0.4];
    const Y: [u32; 2] = [2, 0];

    /// Central differences of `f` around `x`, in f64 on f32 inputs.
    fn numeric(x: &[f32], f: impl Fn(&[f32]) -> f64) -> Vec<f64> {
        let h = 1e-3f32;
        (0..x.len())
            .map(|i| {
                let (mut a, mut b) = (x.to_vec(), x.to_vec());
                a[i] += h;
                b[i] -= h;
                (f(&a) - f(&b)) / (2.0 * h as f64)
            })
            .collect()
    }

    fn close(analytic: &[f32], numeric: &[f64]) {
        for (a, n) in analytic.iter().zip(numeric) {
            assert!((*a as f64 - n).abs() < 1e-4, "analytic {analytic:?} vs numeric {numeric:?}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let task = Objective::TaskEnergy { lambda: 0.7 };
        let l = reference(task, &T, Some(&S), &Y, 3).unwrap();
        close(&l.dlogits, &numeric(&T, |t| reference(task, t, Some(&S), &Y, 3).unwrap().total));
        let score = Objective::ScoreMargin { margin: 1.0, ce_weight: 0.3 };
        let l = reference(score, &S, Some(&T), &Y, 3).unwrap();
        close(&l.dlogits, &numeric(&S, |s| reference(score, s, Some(&T), &Y, 3).unwrap().total));
        let l = reference(Objective::CrossEntropy, &S, None, &Y, 3).unwrap();
        close(&l.dlogits, &numeric(&S, |s| reference(Objective::CrossEntropy, s, None, &Y, 3).unwrap().total));
        // λ = 0 is plain cross-entropy.
        let ce = reference(Objective::TaskEnergy { lambda: 0.0 }, &T, Some(&S), &Y, 3).unwrap();
        assert_eq!(ce.total, ce.ce);
        assert_eq!(ce.total, reference(Objective::CrossEntropy, &T, None, &Y, 3).unwrap().total);
    }

    #[test]
    fn hinge_is_zero_when_gold_wins_by_the_margin() {
        let l = reference(Objective::ScoreMargin { margin: 1.0, ce_weight: 0.0 }, &[5.0, 0.0, 0.0], Some(&[0.0, 3.0, 0.0]), &[0], 3).unwrap();
        assert_eq!(l.total, 0.0);
        assert!(l.dlogits.iter().all(|&d| d == 0.0));
    }

    #[test]
    fn energy_pulls_tasknn_towards_what_scorenn_scores_high() {
        let l = reference(Objective::TaskEnergy { lambda: 1.0 }, &[0.0, 0.0], Some(&[0.0, 4.0]), &[0], 2).unwrap();
        let plain = reference(Objective::CrossEntropy, &[0.0, 0.0], None, &[0], 2).unwrap();
        assert!(l.dlogits[1] < plain.dlogits[1], "energy should raise label 1's logit");
    }

    #[test]
    fn bad_inputs_are_errors_and_non_finite_logits_give_nan() {
        assert!(reference(Objective::CrossEntropy, &S[..5], None, &Y, 3).is_err());
        assert!(reference(Objective::CrossEntropy, &S, None, &[3, 0], 3).unwrap_err().to_string().contains("out of range"));
        assert!(reference(Objective::TaskEnergy { lambda: 0.1 }, &T, None, &Y, 3).is_err());
        let mut nan = S;
        nan[1] = f32::NAN;
        let l = reference(Objective::ScoreMargin { margin: 1.0, ce_weight: 0.1 }, &nan, Some(&T), &Y, 3).unwrap();
        assert!(l.total.is_nan() && l.dlogits.iter().all(|v| v.is_nan()));
    }
}
