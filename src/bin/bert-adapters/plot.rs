//! The training plot as a self-contained SVG: the loss of each adapter over its steps (top), and
//! tasknn's validation accuracy and macro-F1 (bottom), with the test result marked at the end.

use std::fmt::Write;
use std::path::Path;

use bert_adapters::io::tensor_file::write_atomic;

/// A comment every plot carries near its start, so a run can tell its own plot from a user's.
pub const MARK: &str = "<!-- training plot written by bert-adapters -->";
use bert_adapters::Result;

use crate::metrics::{EvalRecord, StepRecord};

const W: f64 = 760.0;
const PANEL_H: f64 = 250.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 36.0;
const GAP: f64 = 76.0;

/// "Nice" tick values (1, 2, 5 × 10ᵏ) covering `[lo, hi]`.
fn ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= target as f64).unwrap_or(10.0 * mag);
    let start = (lo / step).ceil() * step;
    (0..=target * 2 + 2).map(|i| start + i as f64 * step).take_while(|v| *v <= hi + step * 1e-9).collect()
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{v:.1e}")
    } else if v.abs() >= 1000.0 || v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// One panel: axes, grid, labels; returns the mapping of data to pixels.
struct Panel {
    top: f64,
    x: (f64, f64),
    y: (f64, f64),
}

impl Panel {
    fn px(&self, x: f64) -> f64 {
        LEFT + (x - self.x.0) / (self.x.1 - self.x.0).max(1e-12) * (W - LEFT - RIGHT)
    }
    fn py(&self, y: f64) -> f64 {
        self.top + PANEL_H - (y - self.y.0) / (self.y.1 - self.y.0).max(1e-12) * PANEL_H
    }
    /// The pixels of the points inside the panel's ranges (a value out of them, NaN or one so far
    /// out that its pixel would not be finite, is left off).
    fn pixels(&self, points: &[(f64, f64)]) -> Vec<(f64, f64)> {
        let inside = |(x, y): &(f64, f64)| (self.x.0..=self.x.1).contains(x) && (self.y.0..=self.y.1).contains(y);
        points.iter().filter(|p| inside(p)).map(|&(x, y)| (self.px(x), self.py(y))).filter(|(x, y)| x.is_finite() && y.is_finite()).collect()
    }

    fn frame(&self, svg: &mut String, title: &str, y_label: &str) {
        let (x0, x1, y0, y1) = (LEFT, W - RIGHT, self.top, self.top + PANEL_H);
        let _ = writeln!(svg, r##"<text x="{x0}" y="{:.1}" font-size="14" font-weight="bold">{title}</text>"##, y0 - 10.0);
        for t in ticks(self.y.0, self.y.1, 5) {
            let y = self.py(t);
            let _ = writeln!(svg, r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#e4e4e4"/>"##);
            let _ = writeln!(svg, r##"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##, x0 - 6.0, y + 4.0, fmt_tick(t));
        }
        for t in ticks(self.x.0, self.x.1, 8) {
            let x = self.px(t);
            let _ = writeln!(svg, r##"<line x1="{x:.1}" y1="{y1}" x2="{x:.1}" y2="{:.1}" stroke="#888"/>"##, y1 + 4.0);
            let _ = writeln!(svg, r##"<text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"##, y1 + 17.0, fmt_tick(t));
        }
        let _ = writeln!(svg, r##"<rect x="{x0}" y="{y0}" width="{:.1}" height="{PANEL_H}" fill="none" stroke="#888"/>"##, x1 - x0);
        let _ = writeln!(
            svg,
            r##"<text transform="translate({:.1},{:.1}) rotate(-90)" font-size="12" text-anchor="middle">{y_label}</text>"##,
            x0 - 46.0,
            y0 + PANEL_H / 2.0
        );
        let _ = writeln!(svg, r##"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">step</text>"##, (x0 + x1) / 2.0, y1 + 34.0);
    }

    fn line(&self, svg: &mut String, points: &[(f64, f64)], color: &str, dots: bool) {
        let pixels = self.pixels(points);
        if pixels.is_empty() {
            return;
        }
        let path: Vec<String> = pixels.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(svg, r##"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.6"/>"##, path.join(" "));
        if dots || pixels.len() == 1 {
            for (x, y) in pixels {
                let _ = writeln!(svg, r##"<circle cx="{x:.1}" cy="{y:.1}" r="2.8" fill="{color}"/>"##);
            }
        }
    }

    /// Raw points, faint, under a trend line.
    fn dots(&self, svg: &mut String, points: &[(f64, f64)], color: &str) {
        for (x, y) in self.pixels(points) {
            let _ = writeln!(svg, r##"<circle cx="{x:.1}" cy="{y:.1}" r="1.6" fill="{color}" fill-opacity="0.3"/>"##);
        }
    }

    fn legend(&self, svg: &mut String, row: usize, color: &str, label: &str) {
        let x = W - RIGHT + 14.0;
        let y = self.top + 12.0 + 20.0 * row as f64;
        let _ = writeln!(svg, r##"<line x1="{x}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="2.5"/>"##, x + 18.0);
        let _ = writeln!(svg, r##"<text x="{:.1}" y="{:.1}" font-size="12">{label}</text>"##, x + 24.0, y + 4.0);
    }
}

/// A trailing mean over the last `k` points, so a noisy per-batch loss reads as a trend.
fn smooth(points: &[(f64, f64)], k: usize) -> Vec<(f64, f64)> {
    (0..points.len())
        .map(|i| {
            let lo = (i + 1).saturating_sub(k);
            let w = &points[lo..=i];
            // Each term divided first: the mean of values near f64's largest does not overflow.
            (points[i].0, w.iter().map(|p| p.1 / w.len() as f64).sum::<f64>())
        })
        .collect()
}

/// The plot's SVG text.
pub fn render(steps: &[StepRecord], evals: &[EvalRecord], total_steps: u64) -> String {
    let x_max = (total_steps.max(steps.last().map_or(1, |s| s.step))) as f64;
    let series = |name: &str| -> Vec<(f64, f64)> { steps.iter().filter(|s| s.adapter == name && s.loss.is_finite()).map(|s| (s.step as f64, s.loss)).collect() };
    let (task, score) = (series("tasknn"), series("scorenn"));
    let k = (steps.len() / 40).clamp(1, 25);
    let (task_s, score_s) = (smooth(&task, k), smooth(&score, k));
    // The axis follows the trend lines; a raw step far above them is left off rather than
    // squashing them flat.
    let trend = task_s.iter().chain(&score_s).map(|p| p.1);
    let (lo, hi) = trend.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo.is_finite() { (lo.min(0.0), hi.max(lo + 0.1) * 1.3) } else { (0.0, 1.0) };
    // A span past f64's largest (losses near ±f64::MAX) maps every point to NaN: a range that
    // holds, the points beyond it left off as any raw point off the axis is.
    let (lo, hi) = if (hi - lo).is_finite() && hi.is_finite() { (lo, hi) } else { (lo.max(-f64::MAX / 4.0), hi.min(f64::MAX / 4.0)) };
    let loss = Panel { top: TOP, x: (0.0, x_max), y: (lo, hi) };
    let acc = Panel { top: TOP + PANEL_H + GAP, x: (0.0, x_max), y: (0.0, 1.0) };

    let h = TOP + 2.0 * PANEL_H + GAP + 48.0;
    let mut svg = String::new();
    let _ = writeln!(svg, r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif">"##);
    // Marks the file as ours: `train --overwrite` replaces only a plot that carries it.
    let _ = writeln!(svg, "{MARK}");
    let _ = writeln!(svg, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let smoothing = if k > 1 { format!(" (dots: each step; lines: mean of its last {k})") } else { String::new() };
    loss.frame(&mut svg, &format!("training loss{smoothing}"), "loss");
    loss.dots(&mut svg, &task, "#1f77b4");
    loss.dots(&mut svg, &score, "#ff7f0e");
    loss.line(&mut svg, &task_s, "#1f77b4", false);
    loss.line(&mut svg, &score_s, "#ff7f0e", false);
    loss.legend(&mut svg, 0, "#1f77b4", "tasknn");
    loss.legend(&mut svg, 1, "#ff7f0e", "scorenn");

    acc.frame(&mut svg, "tasknn on validation (test at the end)", "score");
    let val: Vec<&EvalRecord> = evals.iter().filter(|e| e.split == "validation").collect();
    acc.line(&mut svg, &val.iter().map(|e| (e.step as f64, e.accuracy)).collect::<Vec<_>>(), "#2ca02c", true);
    acc.line(&mut svg, &val.iter().map(|e| (e.step as f64, e.macro_f1)).collect::<Vec<_>>(), "#9467bd", true);
    acc.legend(&mut svg, 0, "#2ca02c", "accuracy");
    acc.legend(&mut svg, 1, "#9467bd", "macro-F1");
    if let Some(t) = evals.iter().rev().find(|e| e.split == "test") {
        if let Some(&(x, y)) = acc.pixels(&[(t.step as f64, t.accuracy)]).first() {
            let _ = writeln!(svg, r##"<rect x="{:.1}" y="{:.1}" width="8" height="8" fill="#d62728"/>"##, x - 4.0, y - 4.0);
        }
        acc.legend(&mut svg, 2, "#d62728", &format!("test acc {:.3}", t.accuracy));
    }
    svg.push_str("</svg>\n");
    svg
}

/// Write the plot atomically.
pub fn write(path: &Path, steps: &[StepRecord], evals: &[EvalRecord], total_steps: u64) -> Result<()> {
    write_atomic(path, render(steps, evals, total_steps).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let t = ticks(0.0, 1.0, 5);
        assert_eq!(t.len(), 6);
        assert!(t.iter().zip([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]).all(|(a, b)| (a - b).abs() < 1e-9), "{t:?}");
        assert_eq!(ticks(0.0, 400.0, 8), vec![0.0, 50.0, 100.0, 150.0, 200.0, 250.0, 300.0, 350.0, 400.0]);
    }

    #[test]
    fn renders_an_svg_with_both_panels() {
        let steps: Vec<StepRecord> = (1..=6)
            .map(|i| StepRecord { step: i, adapter: if i <= 3 { "tasknn" } else { "scorenn" }.into(), loss: 1.0 / i as f64, ce: 0.5, tokens: 10 })
            .collect();
        let eval = |step, split: &str| EvalRecord {
            step,
            split: split.into(),
            examples: 4,
            accuracy: 0.5,
            macro_f1: 0.4,
            tasknn_loss: None,
            tasknn_ce: None,
            scorenn_loss: None,
            tokens_per_s: 0.0,
            elapsed_s: 0.0,
        };
        let svg = render(&steps, &[eval(3, "validation"), eval(6, "validation"), eval(6, "test")], 6);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert!(svg.contains("test acc 0.500"));
        assert!(!svg.contains("NaN"));
    }

    /// Every coordinate of a plot drawn from extreme values (losses near ±f64's largest, a NaN,
    /// fractions far outside 0..1) is a finite number on the canvas.
    #[test]
    fn extreme_values_draw_no_nan_or_infinite_coordinates() {
        let losses = [f64::MAX, -f64::MAX, f64::from(f32::MAX), 1e300, f64::NAN, 0.5];
        let steps: Vec<StepRecord> = (1..=12).map(|i| StepRecord { step: i, adapter: if i % 2 == 0 { "tasknn" } else { "scorenn" }.into(), loss: losses[i as usize % 6], ce: 0.0, tokens: 4 }).collect();
        let eval = |step, split: &str, accuracy: f64, macro_f1: f64| EvalRecord {
            step,
            split: split.into(),
            examples: 4,
            accuracy,
            macro_f1,
            tasknn_loss: None,
            tasknn_ce: None,
            scorenn_loss: None,
            tokens_per_s: 0.0,
            elapsed_s: 0.0,
        };
        let evals = [eval(4, "validation", 1e308, -1.7e308), eval(8, "validation", 1e300, f64::NAN), eval(12, "validation", 0.5, 0.5), eval(12, "test", 1e308, 0.5)];
        let svg = render(&steps, &evals, 12);
        for attr in [" x=", " y=", " x1=", " y1=", " x2=", " y2=", " cx=", " cy=", " width=", " points="] {
            for value in svg.split(attr).skip(1).map(|rest| rest[1..].split('"').next().unwrap()) {
                for n in value.split([' ', ',']).filter(|n| !n.is_empty() && !n.ends_with('%')) {
                    let v: f64 = n.parse().unwrap_or_else(|_| panic!("{attr}\"{value}\" is not numeric"));
                    assert!(v.is_finite() && v.abs() < 1e4, "{attr}\"{value}\"");
                }
            }
        }
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    }
}
