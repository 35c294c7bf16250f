//! Accuracy, macro-F1, and the training history that metrics.csv and the plot are drawn from.

use std::path::Path;

use serde::{Deserialize, Serialize};

use bert_adapters::io::tensor_file::write_atomic;
use bert_adapters::{Error, Result};

/// One optimizer step: which adapter it trained and its objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// 1-based: the number of steps done after this one.
    pub step: u64,
    pub adapter: String,
    pub loss: f64,
    /// The cross-entropy part of the loss.
    pub ce: f64,
    /// Non-padding tokens in the batch.
    pub tokens: u64,
}

/// One evaluation of tasknn (a row of metrics.csv).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: u64,
    /// `validation` or `test`.
    pub split: String,
    pub examples: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    /// Mean tasknn objective / cross-entropy / scorenn objective over the steps since the
    /// previous validation (None when no step of that adapter ran in between).
    pub tasknn_loss: Option<f64>,
    pub tasknn_ce: Option<f64>,
    pub scorenn_loss: Option<f64>,
    /// Training throughput over the same window (non-padding tokens per second; 0 after a
    /// resume that has not run a step yet).
    pub tokens_per_s: f64,
    /// Training wall time so far, summed over resumed runs.
    pub elapsed_s: f64,
}

/// Accuracy and macro-F1 (the unweighted mean of per-class F1 over the classes that occur in
/// the gold labels or the predictions, as scikit-learn's `f1_score(average="macro")`).
pub fn accuracy_f1(gold: &[usize], pred: &[usize], classes: usize) -> (f64, f64) {
    if gold.is_empty() {
        return (0.0, 0.0);
    }
    let correct = gold.iter().zip(pred).filter(|(g, p)| g == p).count();
    let (mut tp, mut fp, mut fn_) = (vec![0usize; classes], vec![0usize; classes], vec![0usize; classes]);
    for (&g, &p) in gold.iter().zip(pred) {
        if g == p {
            tp[g] += 1;
        } else {
            fp[p] += 1;
            fn_[g] += 1;
        }
    }
    let mut sum = 0.0;
    let mut n = 0;
    for c in 0..classes {
        if tp[c] + fp[c] + fn_[c] == 0 {
            continue;
        }
        n += 1;
        sum += 2.0 * tp[c] as f64 / (2 * tp[c] + fp[c] + fn_[c]) as f64;
    }
    (correct as f64 / gold.len() as f64, if n == 0 { 0.0 } else { sum / n as f64 })
}

/// Mean of `f` over the steps of `adapter` in `steps`.
pub fn mean_of(steps: &[StepRecord], adapter: &str, f: impl Fn(&StepRecord) -> f64) -> Option<f64> {
    let v: Vec<f64> = steps.iter().filter(|s| s.adapter == adapter).map(f).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// metrics.csv: a header and one row per evaluation, written atomically.
/// The first line of `metrics.csv`.
pub const HEADER: &str = "step,split,examples,accuracy,macro_f1,tasknn_loss,tasknn_ce,scorenn_loss,tokens_per_s,elapsed_s";

pub fn write_csv(path: &Path, evals: &[EvalRecord]) -> Result<()> {
    let to_err = |e: csv::Error| Error::Malformed { path: path.to_path_buf(), msg: format!("cannot write CSV: {e}") };
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(HEADER.split(','))
        .map_err(to_err)?;
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
    for e in evals {
        w.write_record([
            e.step.to_string(),
            e.split.clone(),
            e.examples.to_string(),
            format!("{:.6}", e.accuracy),
            format!("{:.6}", e.macro_f1),
            opt(e.tasknn_loss),
            opt(e.tasknn_ce),
            opt(e.scorenn_loss),
            format!("{:.1}", e.tokens_per_s),
            format!("{:.1}", e.elapsed_s),
        ])
        .map_err(to_err)?;
    }
    let bytes = w.into_inner().map_err(|e| Error::Malformed { path: path.to_path_buf(), msg: format!("cannot write CSV: {e}") })?;
    write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_and_macro_f1() {
        // Class 0: tp 2, fp 1, fn 0 → F1 0.8; class 1: tp 1, fp 0, fn 1 → 2/3; class 2 absent.
        let (acc, f1) = accuracy_f1(&[0, 0, 1, 1], &[0, 0, 1, 0], 3);
        assert_eq!(acc, 0.75);
        assert!((f1 - (0.8 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert_eq!(accuracy_f1(&[], &[], 2), (0.0, 0.0));
    }
}
