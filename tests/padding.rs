//! `train` pads each batch to a length bucket (`tokenize::bucket_len`): the smallest multiple of
//! 16 covering its longest text, capped at the max length. Padding is masked, so without dropout
//! the loss, logits and every gradient equal those of the batch padded to its longest text.

mod common;

use std::sync::Arc;

use bert_adapters::model::heads::{ClassificationHead, HeadConfig};
use bert_adapters::{AdapterSetup, Backend, BertTokenizer, CpuBackend};
use common::{assert_close, fixtures, tiny, TOL};

const TEXTS: [&str; 4] = ["awful!", "a okay film, really", "a good service, really", "bad"];

#[test]
fn bucketed_batches_pad_to_a_multiple_of_16_within_max_len() {
    let (model, _) = tiny(Arc::new(CpuBackend::fast()));
    let cfg = model.config();
    let tokenizer_json = common::committed_fixture("train/tokenizer.json");
    for (max_len, want) in [(40, 16), (12, 12)] {
        let tok = BertTokenizer::from_file(&tokenizer_json, max_len).unwrap();
        let plain = tok.encode_batch(&TEXTS, cfg).unwrap();
        let b = tok.encode_batch_bucketed(&TEXTS, cfg, bert_adapters::tokenize::LENGTH_BUCKET).unwrap();
        assert!(plain.seq_len < want, "the texts must be shorter than the bucket ({})", plain.seq_len);
        assert_eq!((b.batch, b.seq_len), (TEXTS.len(), want), "max_len {max_len}");
        for (r, row) in b.input_ids.chunks(b.seq_len).enumerate() {
            let mask = &b.attention_mask[r * b.seq_len..(r + 1) * b.seq_len];
            // The same tokens, then masked padding.
            assert_eq!(&row[..plain.seq_len], &plain.input_ids[r * plain.seq_len..(r + 1) * plain.seq_len]);
            assert_eq!(&mask[..plain.seq_len], &plain.attention_mask[r * plain.seq_len..(r + 1) * plain.seq_len]);
            assert!(mask[plain.seq_len..].iter().all(|&m| m == 0));
        }
        assert_eq!(tok.encode_batch_to(&TEXTS, cfg, want).unwrap(), b);
    }
}

#[test]
fn padding_to_a_bucket_changes_no_result_without_dropout() {
    for backend in [Arc::new(CpuBackend::fast()) as Arc<dyn Backend>, Arc::new(CpuBackend::reference())] {
        let (mut model, _) = tiny(backend.clone());
        for (i, d) in ["pfeiffer_inv", "pfeiffer"].into_iter().enumerate() {
            model.load_adapter(fixtures().join("adapters").join(d)).unwrap();
            model.insert_head(ClassificationHead::new(backend.as_ref(), d, HeadConfig::classification(3), 48, i as u64).unwrap()).unwrap();
        }
        model.set_active_adapters(Some(AdapterSetup::Parallel(vec!["pfeiffer_inv".into(), "pfeiffer".into()]))).unwrap();
        model.train_adapter(&["pfeiffer_inv"]).unwrap();
        let tok = BertTokenizer::from_file(common::committed_fixture("train/tokenizer.json"), 40).unwrap();
        let (plain, bucketed) = (tok.encode_batch(&TEXTS, model.config()).unwrap(), tok.encode_batch_bucketed(&TEXTS, model.config(), bert_adapters::tokenize::LENGTH_BUCKET).unwrap());
        assert_ne!(plain.seq_len, bucketed.seq_len);
        let labels = [0, 1, 2, 0];
        let (a, b) = (model.classification_step(&plain, &labels).unwrap(), model.classification_step(&bucketed, &labels).unwrap());
        let label = backend.name();
        assert_close(&format!("{label} loss"), &[b.loss], &[a.loss], TOL);
        for (i, (x, y)) in a.logits.iter().zip(&b.logits).enumerate() {
            assert_close(&format!("{label} logits.{i}"), &y.cpu_data().unwrap(), &x.cpu_data().unwrap(), TOL);
        }
        assert_eq!(a.grads.keys().collect::<Vec<_>>(), b.grads.keys().collect::<Vec<_>>());
        assert!(a.grads.keys().any(|k| k.starts_with("invertible_adapters.")), "the NICE block reads every position");
        for (k, g) in &a.grads {
            assert_close(&format!("{label} grad {k}"), &b.grads[k].cpu_data().unwrap(), &g.cpu_data().unwrap(), TOL);
        }
    }
}
