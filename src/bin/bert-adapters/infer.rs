//! What `train` (evaluation) and `predict` share: the device choice and batched prediction with
//! one adapter and its head, so both see exactly the same computation.

use std::sync::Arc;

use bert_adapters::{device, AdapterSetup, Backend, BertModel, BertTokenizer, Device, Error, Result};

/// `auto` (CUDA when it can be used, else the CPU), `cpu`, `cuda` or `cuda:N`.
pub fn backend(choice: &str) -> Result<Arc<dyn Backend>> {
    match choice {
        "auto" => device::backend_for(Device::Cuda(0)).or_else(|_| device::backend_for(Device::Cpu)),
        other => device::backend_for(other.parse::<Device>().map_err(|_| Error::Input(format!("--device `{other}`: expected auto, cpu, cuda or cuda:N")))?),
    }
}

/// Texts per forward when predicting.
pub const BATCH: usize = 64;

/// The arg-max label of `adapter`'s head for every text, run with `adapter` alone active (as its
/// saved folder runs anywhere else). Texts are batched by length, so that little is padding;
/// the active setup is restored afterwards.
pub fn predict(model: &mut BertModel, tokenizer: &BertTokenizer, adapter: &str, texts: &[&str]) -> Result<Vec<usize>> {
    let previous = model.active_adapters().cloned();
    model.set_active_adapters(Some(AdapterSetup::Single(adapter.to_string())))?;
    let result = predict_active(model, tokenizer, texts);
    model.set_active_adapters(previous)?;
    result
}

fn predict_active(model: &BertModel, tokenizer: &BertTokenizer, texts: &[&str]) -> Result<Vec<usize>> {
    let be = model.backend().clone();
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| (texts[i].len(), i));
    let mut out = vec![0usize; texts.len()];
    for chunk in order.chunks(BATCH) {
        let batch_texts: Vec<String> = chunk.iter().map(|&i| texts[i].to_string()).collect();
        let batch = tokenizer.encode_batch(&batch_texts, model.config())?;
        let output = model.forward(&batch)?;
        let branches = model.head_logits(&output)?;
        let logits = branches.first().ok_or_else(|| Error::Input("no head output".into()))?;
        let c = logits.logits.shape()[1];
        let host = be.to_host(&logits.logits)?;
        for (&i, row) in chunk.iter().zip(host.chunks(c)) {
            out[i] = argmax(row);
        }
    }
    Ok(out)
}

/// Index of the largest value; the first of ties; NaN never wins.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (j, &v) in row.iter().enumerate() {
        if v > row[best] || row[best].is_nan() {
            best = j;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 0.7, 0.7]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0]), 1);
    }

    #[test]
    fn unknown_device_is_an_error() {
        assert!(backend("tpu").err().unwrap().to_string().contains("--device `tpu`"));
        assert!(backend("cpu").is_ok());
    }
}
