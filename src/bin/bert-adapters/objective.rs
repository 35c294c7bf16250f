//! The two training objectives, structured-energy style, on the logits of one Parallel forward.
//!
//! With `s(x)` scorenn's head logits and `t(x)` tasknn's (both `[B, C]`), `p = softmax(t)`, and
//! the energy of a label distribution `E(x, p) = −⟨p, s(x)⟩`:
//! - tasknn: `CE(t, y) + λ·E(x, p)`, batch means. `s` is a constant here: the energy's gradient
//!   reaches tasknn only through `p`.
//! - scorenn: `max(0, Δ − s_y + ⟨p̂, s⟩) + α·CE(s, y)`, batch means, with `p̂ = softmax(t)` a
//!   constant: a margin that ranks the gold label above tasknn's prediction, plus a small
//!   cross-entropy that keeps scorenn's logits anchored to the labels.
//!
//! Everything is computed on the host in f64; the gradients come back per branch as f32.

use bert_adapters::{Error, Result};

/// Weight of the energy term in tasknn's loss.
pub const LAMBDA: f64 = 0.1;
/// Margin of scorenn's hinge.
pub const MARGIN: f64 = 1.0;
/// Weight of scorenn's own cross-entropy.
pub const SCORE_CE: f64 = 0.1;

/// What one objective gives for a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Loss {
    /// The objective (what the optimizer lowers).
    pub total: f64,
    /// The cross-entropy part (tasknn's CE, or scorenn's own CE), for the logs.
    pub ce: f64,
    /// ∂total/∂logits of the trained branch, `[B·C]` row-major.
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

fn rows(logits: &[f32], c: usize) -> impl Iterator<Item = Vec<f64>> + '_ {
    logits.chunks(c).map(|r| r.iter().map(|&v| v as f64).collect())
}

/// Check the shapes and values the objectives rely on; `Err` says what is wrong.
fn check(s: &[f32], t: &[f32], labels: &[usize], c: usize) -> Result<()> {
    let b = labels.len();
    if b == 0 || c < 2 || s.len() != b * c || t.len() != b * c {
        return Err(Error::Input(format!("logits of {} and {} values for {b} labels of {c} classes", s.len(), t.len())));
    }
    if let Some(&y) = labels.iter().find(|&&y| y >= c) {
        return Err(Error::Input(format!("label {y} is out of range for {c} classes")));
    }
    if let Some(v) = s.iter().chain(t).find(|v| !v.is_finite()) {
        return Err(Error::NonFinite { at: format!("the head logits of Parallel(scorenn, tasknn) (a logit is {v})") });
    }
    Ok(())
}

/// tasknn's objective and its gradient with respect to tasknn's logits `t`.
pub fn tasknn(s: &[f32], t: &[f32], labels: &[usize], c: usize, lambda: f64) -> Result<Loss> {
    check(s, t, labels, c)?;
    let b = labels.len() as f64;
    let (mut ce_sum, mut energy_sum) = (0.0, 0.0);
    let mut d = Vec::with_capacity(t.len());
    for ((t_row, s_row), &y) in rows(t, c).zip(rows(s, c)).zip(labels) {
        let (ce, p) = ce_row(&t_row, y);
        let ps: f64 = p.iter().zip(&s_row).map(|(p, s)| p * s).sum();
        ce_sum += ce;
        energy_sum -= ps;
        for j in 0..c {
            let d_ce = p[j] - if j == y { 1.0 } else { 0.0 };
            // ∂(−⟨p, s⟩)/∂t_j = −p_j (s_j − ⟨p, s⟩): the softmax Jacobian applied to −s.
            let d_energy = -p[j] * (s_row[j] - ps);
            d.push(((d_ce + lambda * d_energy) / b) as f32);
        }
    }
    let ce = ce_sum / b;
    Ok(Loss { total: ce + lambda * energy_sum / b, ce, dlogits: d })
}

/// scorenn's objective and its gradient with respect to scorenn's logits `s`.
pub fn scorenn(s: &[f32], t: &[f32], labels: &[usize], c: usize, margin: f64, ce_weight: f64) -> Result<Loss> {
    check(s, t, labels, c)?;
    let b = labels.len() as f64;
    let (mut hinge_sum, mut ce_sum) = (0.0, 0.0);
    let mut d = Vec::with_capacity(s.len());
    for ((s_row, t_row), &y) in rows(s, c).zip(rows(t, c)).zip(labels) {
        let p_hat = softmax(&t_row);
        let ps: f64 = p_hat.iter().zip(&s_row).map(|(p, s)| p * s).sum();
        let hinge = margin - s_row[y] + ps;
        let active = hinge > 0.0;
        hinge_sum += hinge.max(0.0);
        let (ce, q) = ce_row(&s_row, y);
        ce_sum += ce;
        for j in 0..c {
            let onehot = if j == y { 1.0 } else { 0.0 };
            let d_hinge = if active { p_hat[j] - onehot } else { 0.0 };
            d.push(((d_hinge + ce_weight * (q[j] - onehot)) / b) as f32);
        }
    }
    let ce = ce_sum / b;
    Ok(Loss { total: hinge_sum / b + ce_weight * ce, ce, dlogits: d })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: [f32; 6] = [0.3, -1.2, 0.8, 2.0, 0.1, -0.4];
    const T: [f32; 6] = [1.1, 0.2, -0.7, -0.3, 0.9, 0.4];
    const Y: [usize; 2] = [2, 0];

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
    fn tasknn_gradient_matches_finite_differences() {
        let l = tasknn(&S, &T, &Y, 3, 0.7).unwrap();
        close(&l.dlogits, &numeric(&T, |t| tasknn(&S, t, &Y, 3, 0.7).unwrap().total));
        // λ = 0 is plain cross-entropy.
        let ce = tasknn(&S, &T, &Y, 3, 0.0).unwrap();
        assert_eq!(ce.total, ce.ce);
    }

    #[test]
    fn scorenn_gradient_matches_finite_differences() {
        let l = scorenn(&S, &T, &Y, 3, 1.0, 0.3).unwrap();
        close(&l.dlogits, &numeric(&S, |s| scorenn(s, &T, &Y, 3, 1.0, 0.3).unwrap().total));
    }

    #[test]
    fn hinge_is_zero_when_gold_wins_by_the_margin() {
        // Gold label scored 5 above everything tasknn could predict: no hinge, only the CE part.
        let s = [5.0, 0.0, 0.0];
        let l = scorenn(&s, &[0.0, 3.0, 0.0], &[0], 3, 1.0, 0.0).unwrap();
        assert_eq!(l.total, 0.0);
        assert!(l.dlogits.iter().all(|&d| d == 0.0));
    }

    #[test]
    fn energy_pulls_tasknn_towards_what_scorenn_scores_high() {
        // Same CE either way; the energy term must favour the label scorenn ranks first.
        let l = tasknn(&[0.0, 4.0], &[0.0, 0.0], &[0], 2, 1.0).unwrap();
        let plain = tasknn(&[0.0, 4.0], &[0.0, 0.0], &[0], 2, 0.0).unwrap();
        assert!(l.dlogits[1] < plain.dlogits[1], "energy should raise label 1's logit");
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(tasknn(&S, &T[..5], &Y, 3, 0.1).unwrap_err().to_string().contains("logits"));
        assert!(scorenn(&S, &T, &[3, 0], 3, 1.0, 0.1).unwrap_err().to_string().contains("out of range"));
        let mut nan = S;
        nan[1] = f32::NAN;
        assert!(matches!(tasknn(&nan, &T, &Y, 3, 0.1).unwrap_err(), Error::NonFinite { .. }));
    }
}
