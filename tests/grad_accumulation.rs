//! Gradient accumulation (`BertModel::train_step_accumulated`): one optimizer step over a batch
//! given as micro-batches, each a row range of the padded batch, run one after another. Eight
//! alternating Parallel(scorenn, tasknn) steps with dropout over 2 + 2 and 2 + 1 + 1 micro-batches
//! equal the same steps on the whole batch within 1e-5 (losses and both adapters' arenas), on the
//! CPU and on the CUDA backends (cuda-sim in CI; a GPU when there is one); one micro-batch is
//! the plain step bit for bit; the logits come back in row order; two data-parallel ranks (as
//! threads) each accumulating its share in two micro-batches equal the whole batch too; bad
//! micro-batches are refused.

use std::sync::Arc;

use bert_adapters::train::{AdamW, AdamWConfig};
use bert_adapters::{Backend, CpuBackend, Error, InputBatch};

mod common;
#[path = "support/alternating.rs"]
mod alternating;
#[path = "support/thread_comm.rs"]
mod thread_comm;

use alternating::{assert_rel, model, run_alternating, step_cfg, STEPS};
use bert_adapters::dist::{shard, Communicator, DataParallel};
use thread_comm::ThreadComm;

/// `STEPS` alternating steps with dropout, each over the micro-batches of `sizes` rows (the whole
/// batch when empty); both adapters' arenas, each step's loss and the last step's logits.
fn train(be: Arc<dyn Backend>, sizes: &[usize]) -> (Vec<Vec<f32>>, Vec<f32>, Vec<Vec<f32>>) {
    let (model, batch, labels) = model(be.clone());
    let mut micro = Vec::new();
    let mut row = 0;
    for &n in sizes {
        micro.push((batch.rows(row..row + n).unwrap(), labels[row..row + n].to_vec()));
        row += n;
    }
    assert!(sizes.is_empty() || row == batch.batch);
    let mut logits = Vec::new();
    let (params, losses) = run_alternating(model, |model, cfg, opt| {
        let out = if sizes.is_empty() {
            model.train_step(&batch, &labels, cfg, opt).unwrap()
        } else {
            let parts: Vec<(&InputBatch, &[usize])> = micro.iter().map(|(b, l)| (b, l.as_slice())).collect();
            model.train_step_accumulated(&parts, cfg, opt, None).unwrap()
        };
        logits = out.logits.iter().map(|t| be.to_host(t).unwrap()).collect();
        out.read(be.as_ref()).unwrap().loss
    });
    (params, losses, logits)
}

fn backends() -> Vec<Arc<dyn Backend>> {
    let mut v: Vec<Arc<dyn Backend>> = vec![Arc::new(CpuBackend::fast())];
    v.extend(common::cuda_backends());
    v
}

#[test]
fn micro_batches_train_what_the_whole_batch_trains() {
    for be in backends() {
        let label = be.name();
        let (whole, whole_losses, whole_logits) = train(be.clone(), &[]);
        // One micro-batch is the plain step, bit for bit.
        let (one, one_losses, one_logits) = train(be.clone(), &[4]);
        assert!(one == whole && one_losses == whole_losses && one_logits == whole_logits, "{label}: one micro-batch differs from train_step");
        for sizes in [&[2, 2][..], &[2, 1, 1][..]] {
            let (params, losses, logits) = train(be.clone(), sizes);
            assert_rel(&format!("{label} {sizes:?}: losses"), &losses, &whole_losses, 1e-5);
            for (i, name) in ["scorenn", "tasknn"].iter().enumerate() {
                assert_rel(&format!("{label} {sizes:?}: {name}'s arena after {STEPS} steps"), &params[i], &whole[i], 1e-5);
            }
            for (b, (got, want)) in logits.iter().zip(&whole_logits).enumerate() {
                assert_rel(&format!("{label} {sizes:?}: branch {b}'s logits, in row order"), got, want, 1e-5);
            }
        }
        // The steps moved the adapters, so the comparison is not between untouched copies.
        let (mut fresh, _, _) = model(be.clone());
        let start: Vec<f32> = fresh.adapter_params_mut("tasknn").unwrap().values().flat_map(|t| be.to_host(t).unwrap()).collect();
        let moved = start.iter().zip(&whole[1]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(moved > 1e-3, "{label}: tasknn barely moved in {STEPS} steps ({moved})");
    }
}

/// Without the dropout rows the micro-batches would draw the whole batch's first rows' masks:
/// with dropout on, a micro-batch's masks must be its rows' (checked by the equality above), and
/// the model's dropout row is back where it was after the step, on an error too.
#[test]
fn bad_micro_batches_are_refused_and_leave_the_dropout_row() {
    let (mut m, batch, labels) = model(Arc::new(CpuBackend::fast()));
    m.train_adapter(&["tasknn"]).unwrap();
    m.set_dropout(Some(5));
    let cfg = step_cfg(0);
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    let err = m.train_step_accumulated(&[], &cfg, &mut opt, None).unwrap_err();
    assert!(matches!(err, Error::Input(_)) && err.to_string().contains("no micro-batches"), "{err}");
    let (a, b) = (batch.rows(0..2).unwrap(), batch.rows(2..4).unwrap());
    let err = m.train_step_accumulated(&[(&a, &labels[..2]), (&b, &labels[..1])], &cfg, &mut opt, None).unwrap_err();
    assert!(err.to_string().contains("1 labels for a batch of 2"), "{err}");
    let bad = [0, 7];
    let err = m.train_step_accumulated(&[(&a, &labels[..2]), (&b, &bad)], &cfg, &mut opt, None).unwrap_err();
    assert!(err.to_string().contains("label 7 is out of range for 3 classes"), "{err}");
    // After the failed second micro-batch, a whole-batch step is the untouched model's.
    let (mut fresh, _, _) = model(Arc::new(CpuBackend::fast()));
    fresh.train_adapter(&["tasknn"]).unwrap();
    fresh.set_dropout(Some(5));
    let mut opt2 = AdamW::new(AdamWConfig::default()).unwrap();
    let want = fresh.train_step(&batch, &labels, &cfg, &mut opt2).unwrap().read(fresh.backend().as_ref()).unwrap();
    let got = m.train_step(&batch, &labels, &cfg, &mut opt).unwrap().read(m.backend().as_ref()).unwrap();
    assert_eq!(got, want, "a refused accumulated step left a trace (dropout row, gradients or optimizer state)");
}

/// Two ranks (threads joined by the in-memory communicator), each splitting its two rows into two
/// micro-batches of one: the gradient is all-reduced once, after both, and the run equals one
/// process on the whole batch.
#[test]
fn ranks_accumulating_their_shares_train_what_one_process_trains() {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::fast());
    let (whole, whole_losses, _) = train(be, &[]);
    let run = |c: ThreadComm| {
        let (mut model, batch, labels) = model(Arc::new(CpuBackend::fast()));
        let rows = shard(batch.batch, c.rank(), c.size());
        model.set_dropout_row(rows.start as u64);
        let micro: Vec<(InputBatch, Vec<usize>)> = rows.clone().map(|r| (batch.rows(r..r + 1).unwrap(), labels[r..r + 1].to_vec())).collect();
        run_alternating(model, |model, cfg, opt| {
            let dp = DataParallel { comm: &c, rows: rows.clone(), global_rows: batch.batch };
            let parts: Vec<(&InputBatch, &[usize])> = micro.iter().map(|(b, l)| (b, l.as_slice())).collect();
            let out = model.train_step_accumulated(&parts, cfg, opt, Some(&dp)).unwrap();
            let mut loss = [out.read_unchecked(model.backend().as_ref()).unwrap().loss * dp.weight()];
            c.all_reduce_sum(&mut loss).unwrap();
            loss[0]
        })
    };
    let handles: Vec<_> = ThreadComm::group(2).into_iter().map(|c| std::thread::spawn(move || run(c))).collect();
    for h in handles {
        let (params, losses) = h.join().unwrap();
        assert_rel("2 ranks × 2 micro-batches: losses", &losses, &whole_losses, 1e-5);
        for (i, name) in ["scorenn", "tasknn"].iter().enumerate() {
            assert_rel(&format!("2 ranks × 2 micro-batches: {name}'s arena"), &params[i], &whole[i], 1e-5);
        }
    }
}
