//! Ranks as threads of one process, for the data-parallel tests (tests/data_parallel.rs on the
//! CPU, tests/cuda_dropout_shard.rs on a CUDA backend): an in-memory [`Communicator`] that sums
//! in rank order, as the MPI one does, so N threads compute exactly what N `mpirun` ranks would.
//! Included with `#[path]`, not a crate.
#![allow(dead_code)]

use std::sync::{Arc, Barrier, Mutex};

use bert_adapters::dist::{sum_in_rank_order, Communicator};
use bert_adapters::Result;

/// `size` ranks in threads of one process: every rank puts its buffer in its slot, all wait,
/// each sums the slots in rank order, all wait again before the slots are reused.
pub struct ThreadComm {
    rank: usize,
    size: usize,
    slots: Arc<Mutex<Vec<Vec<f32>>>>,
    barrier: Arc<Barrier>,
}

impl ThreadComm {
    /// The `size` communicators of one group, rank 0 first.
    pub fn group(size: usize) -> Vec<ThreadComm> {
        let slots = Arc::new(Mutex::new(vec![Vec::new(); size]));
        let barrier = Arc::new(Barrier::new(size));
        (0..size).map(|rank| ThreadComm { rank, size, slots: slots.clone(), barrier: barrier.clone() }).collect()
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn name(&self) -> String {
        format!("{} threads", self.size)
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.slots.lock().unwrap()[self.rank] = buf.to_vec();
        self.barrier.wait();
        let parts: Vec<f32> = self.slots.lock().unwrap().concat();
        buf.copy_from_slice(&sum_in_rank_order(&parts, buf.len()));
        self.barrier.wait();
        Ok(())
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        if self.rank == root {
            self.slots.lock().unwrap()[root] = buf.to_vec();
        }
        self.barrier.wait();
        buf.copy_from_slice(&self.slots.lock().unwrap()[root]);
        self.barrier.wait();
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.barrier.wait();
        Ok(())
    }
}
