//! Data-parallel training in one process (issue 18): ranks as threads, joined by an in-memory
//! communicator that sums in rank order as the MPI one does, so the library's part (shards,
//! dropout masks keyed by global row, the gradient all-reduce weighted by rows) is tested on
//! every machine; tests/mpi_train.rs runs the real `mpirun`.

use std::sync::Arc;

use bert_adapters::dist::{shard, Communicator, DataParallel};
use bert_adapters::train::{AdamW, AdamWConfig};
use bert_adapters::{BertModel, CpuBackend, InputBatch};

mod common;
#[path = "support/alternating.rs"]
mod alternating;
#[path = "support/thread_comm.rs"]
mod thread_comm;

use alternating::{assert_rel, run_alternating, step_cfg, STEPS};
use thread_comm::ThreadComm;

/// The alternating setup on the CPU.
fn model() -> (BertModel, InputBatch, Vec<usize>) {
    alternating::model(Arc::new(CpuBackend::fast()))
}

/// `STEPS` alternating steps with dropout on `rows` of the batch (all of it alone); returns
/// both adapters' arena parameters and each step's loss as this rank saw it (the global loss
/// once weighted and summed).
fn train(comm: Option<&dyn Communicator>) -> (Vec<Vec<f32>>, Vec<f32>) {
    let (mut model, batch, labels) = model();
    let rows = comm.map_or(0..batch.batch, |c| shard(batch.batch, c.rank(), c.size()));
    let mine = batch.rows(rows.clone()).unwrap();
    model.set_dropout_row(rows.start as u64);
    run_alternating(model, |model, cfg, opt| match comm {
        Some(c) => {
            let dp = DataParallel { comm: c, rows: rows.clone(), global_rows: batch.batch };
            let out = model.train_step_data_parallel(&mine, &labels[rows.clone()], cfg, opt, &dp).unwrap();
            let mut loss = [out.read_unchecked(model.backend().as_ref()).unwrap().loss * dp.weight()];
            c.all_reduce_sum(&mut loss).unwrap();
            loss[0]
        }
        None => model.train_step(&batch, &labels, cfg, opt).unwrap().read(model.backend().as_ref()).unwrap().loss,
    })
}

fn run_ranks(size: usize) -> Vec<(Vec<Vec<f32>>, Vec<f32>)> {
    let handles: Vec<_> = ThreadComm::group(size).into_iter().map(|c| std::thread::spawn(move || train(Some(&c)))).collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn ranks_train_what_one_process_trains_on_the_whole_batch() {
    let (single, single_losses) = train(None);
    // 2 ranks: 2 + 2 rows; 3 ranks: 2 + 1 + 1 (unequal shards, weighted by rows, not 1/N).
    for size in [2, 3] {
        let ranks = run_ranks(size);
        for (r, (params, losses)) in ranks.iter().enumerate() {
            // Every rank applied the same update to the same bits.
            assert!(params == &ranks[0].0, "{size} ranks: rank {r}'s adapters differ from rank 0's");
            assert_rel(&format!("{size} ranks: losses"), losses, &single_losses, 1e-5);
        }
        for (i, name) in ["scorenn", "tasknn"].iter().enumerate() {
            assert_rel(&format!("{size} ranks: {name}'s arena after {STEPS} steps"), &ranks[0].0[i], &single[i], 1e-5);
        }
    }
    // The adapters did move (the arena holds the adapter's tensors first, in key order), so the
    // comparison above is not between untouched copies.
    let (mut fresh, _, _) = model();
    let start: Vec<f32> = fresh.adapter_params_mut("tasknn").unwrap().values().flat_map(|t| t.cpu_data().unwrap().to_vec()).collect();
    let moved = start.iter().zip(&single[1]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(moved > 1e-3, "tasknn barely moved in {STEPS} steps ({moved})");
}

#[test]
fn a_shard_draws_the_dropout_masks_its_rows_draw_in_the_whole_batch() {
    let (mut model, batch, _) = model();
    model.train_adapter(&["tasknn"]).unwrap();
    model.set_dropout(Some(77));
    let be = model.backend().clone();
    let (b, rows) = (batch.batch, 1..3);
    let full = be.to_host(&model.forward_train(&batch).unwrap().0.last_hidden_state).unwrap();
    let per_row = full.len() / (2 * b);
    let shard = batch.rows(rows.clone()).unwrap();
    let run_shard = |model: &mut BertModel, row: u64| {
        model.set_dropout_row(row);
        be.to_host(&model.forward_train(&shard).unwrap().0.last_hidden_state).unwrap()
    };
    let keyed = run_shard(&mut model, rows.start as u64);
    let unkeyed = run_shard(&mut model, 0);
    // Parallel replicates the batch: branch k's rows are k·B + row in the whole, k·b + row in the shard.
    let (mut want, mut got_keyed, mut got_unkeyed) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..2 {
        want.extend_from_slice(&full[(k * b + rows.start) * per_row..(k * b + rows.end) * per_row]);
        got_keyed.extend_from_slice(&keyed[k * rows.len() * per_row..(k + 1) * rows.len() * per_row]);
        got_unkeyed.extend_from_slice(&unkeyed[k * rows.len() * per_row..(k + 1) * rows.len() * per_row]);
    }
    assert_rel("the shard keyed by its global rows", &got_keyed, &want, 1e-5);
    // Keyed from row 0 instead, the shard drops other elements: far from the whole batch's rows.
    let diff = got_unkeyed.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff > 1e-2, "without the row offset the shard drew the same masks (max diff {diff})");
}

#[test]
fn a_shard_outside_the_batch_or_with_other_dropout_rows_is_refused() {
    let (mut model, batch, labels) = model();
    model.train_adapter(&["tasknn"]).unwrap();
    let comm = bert_adapters::SingleProcess;
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    let cfg = step_cfg(0);
    let shard = batch.rows(2..4).unwrap();
    let dp = DataParallel { comm: &comm, rows: 2..4, global_rows: 4 };
    let e = model.train_step_data_parallel(&shard, &labels[2..4], &cfg, &mut opt, &dp).unwrap_err().to_string();
    assert!(e.contains("global row 0") && e.contains("starts at row 2"), "{e}");
    let dp = DataParallel { comm: &comm, rows: 2..5, global_rows: 4 };
    let e = model.train_step_data_parallel(&shard, &labels[2..4], &cfg, &mut opt, &dp).unwrap_err().to_string();
    assert!(e.contains("rows 2..5 of a global batch of 4 for a batch of 2"), "{e}");
    assert!(batch.rows(3..5).unwrap_err().to_string().contains("rows 3..5 of a batch of 4"));
}
