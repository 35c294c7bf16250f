//! Data-parallel training across processes (issue 18): N ranks each run the training step on
//! their shard of every global batch, one all-reduce over each adapter's flat gradient arena
//! (`model::arena`) averages the gradients, and every rank applies the same AdamW, so the run
//! equals one process on the whole batch up to the order of the sums.
//!
//! The training code sees only [`Communicator`]: rank, size, an all-reduce of an f32 buffer,
//! broadcast and barrier. Three implementations:
//! - [`SingleProcess`] (the default, no dependency): every collective is the identity;
//! - `mpi::MpiComm` (cargo feature `mpi`, the `mpi` crate over the system's MPI, OpenMPI from
//!   Debian here), for CPU ranks started by `mpirun`;
//! - `nccl::NcclComm` (cargo feature `nccl`, cudarc's NCCL bindings), for GPU ranks; it needs
//!   another communicator (MPI) once, to hand rank 0's NCCL id to the others.
//!
//! Every implementation returns the same bits on every rank (the MPI one sums in rank order on
//! rank 0 and broadcasts the sum), so the ranks' parameters never drift apart, and a run repeats
//! bit for bit on the same number of ranks.

use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;

/// OpenMPI's rank of this process among those on its node.
pub const OMPI_LOCAL_RANK: &str = "OMPI_COMM_WORLD_LOCAL_RANK";

/// The GPU a rank trains on: its node-local rank (`OMPI_COMM_WORLD_LOCAL_RANK`'s value, or the
/// global `rank` when the launcher does not set it) modulo the node's `count` GPUs, so the ranks
/// of one node spread over its GPUs. No GPU, or a local rank that is not a number, is an error.
pub fn local_gpu(local_rank: Option<&str>, rank: usize, count: usize) -> Result<usize> {
    if count == 0 {
        return Err(Error::Cuda(format!("rank {rank}: no CUDA device on this node")));
    }
    let local = match local_rank {
        Some(s) => s.trim().parse::<usize>().map_err(|_| Error::Input(format!("{OMPI_LOCAL_RANK}={s:?} is not a rank")))?,
        None => rank,
    };
    Ok(local % count)
}

/// The collectives data-parallel training needs. Every rank calls the same collectives in the
/// same order with buffers of the same length; a rank that does not (it died, or it hangs)
/// leaves the others waiting, which the implementations bound (see [`Watchdog`]).
pub trait Communicator {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// What carries the collectives, for messages ("MPI, 2 ranks").
    fn name(&self) -> String;
    /// `buf` ← the element-wise sum of every rank's `buf`, the same bits on every rank.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// `buf` ← the element-wise mean over the ranks (the sum, divided by `size()`).
    fn all_reduce_mean(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_sum(buf)?;
        let n = self.size() as f32;
        buf.iter_mut().for_each(|v| *v /= n);
        Ok(())
    }
    /// `t` (an f32 tensor of `be`) and `extra` (a few host values that travel with it) ← their
    /// element-wise sums over the ranks, the same bits on every rank. The default copies `t` to
    /// the host, sums it and `extra` in one [`all_reduce_sum`](Self::all_reduce_sum) and writes
    /// it back; a communicator that can reduce device memory where it lies (NCCL, a CUDA tensor)
    /// overrides it and skips the two copies.
    fn all_reduce_sum_tensor(&self, be: &dyn Backend, t: &Tensor, extra: &mut [f32]) -> Result<()> {
        all_reduce_sum_tensor_via_host(self, be, t, extra)
    }
    /// `buf` ← rank `root`'s `buf` on every rank.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// One process: rank 0 of 1, every collective the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn name(&self) -> String {
        "a single process".into()
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _buf: &mut [f32], root: usize) -> Result<()> {
        check_root(root, 1)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// [`Communicator::all_reduce_sum_tensor`] through the host: `t` downloaded, summed with `extra`
/// in one `all_reduce_sum`, and written back.
pub fn all_reduce_sum_tensor_via_host<C: Communicator + ?Sized>(comm: &C, be: &dyn Backend, t: &Tensor, extra: &mut [f32]) -> Result<()> {
    if t.dtype() != DType::F32 {
        return Err(Error::Internal(format!("all-reduce of a {} tensor {:?}: gradients are f32", t.dtype(), t.shape())));
    }
    let mut buf = be.to_host(t)?;
    let n = buf.len();
    buf.extend_from_slice(extra);
    comm.all_reduce_sum(&mut buf)?;
    extra.copy_from_slice(&buf[n..]);
    buf.truncate(n);
    be.write_f32(t, &buf)
}

pub(crate) fn check_root(root: usize, size: usize) -> Result<()> {
    if root >= size {
        return Err(Error::Input(format!("broadcast from rank {root}, but there are {size} ranks")));
    }
    Ok(())
}

/// The rows of a global batch of `n` that `rank` of `size` takes: contiguous and disjoint, in
/// rank order, the first `n % size` ranks one row more. A rank's shard may be empty when
/// `n < size`.
pub fn shard(n: usize, rank: usize, size: usize) -> Range<usize> {
    let size = size.max(1);
    let (base, extra) = (n / size, n % size);
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    start.min(n)..(start + len).min(n)
}

/// `len`-long buffers of the ranks, one after the other in `parts`, summed in rank order
/// (`((b₀ + b₁) + b₂) + …`): the reduction `MpiComm` computes on rank 0, so its result depends
/// only on the number of ranks, not on the MPI library's choice of algorithm.
pub fn sum_in_rank_order(parts: &[f32], len: usize) -> Vec<f32> {
    let mut sum = parts[..len.min(parts.len())].to_vec();
    for part in parts.chunks_exact(len.max(1)).skip(1) {
        sum.iter_mut().zip(part).for_each(|(s, v)| *s += v);
    }
    sum
}

/// What a [`Watchdog`] does when a collective has waited past its timeout: told what was
/// waiting and for how long. The library never exits; a program gives a callback that reports
/// and ends the process (an MPI rank blocked in a collective cannot return an error).
pub type OnTimeout = Box<dyn Fn(&str, Duration) + Send + Sync>;

struct WatchState {
    /// The collective now waiting and its deadline.
    armed: Option<(String, Instant, u64)>,
    next_id: u64,
    shutdown: bool,
}

/// A deadline on blocking collectives: [`Watchdog::arm`] before one, drop the guard after; a
/// collective still waiting `timeout` after it was armed calls `on_timeout` from the watchdog's
/// own thread, once.
pub struct Watchdog {
    state: Arc<(Mutex<WatchState>, Condvar)>,
    timeout: Duration,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Disarms its [`Watchdog`] when dropped.
pub struct WatchGuard<'a> {
    dog: &'a Watchdog,
    id: u64,
}

impl Watchdog {
    pub fn new(timeout: Duration, on_timeout: OnTimeout) -> Self {
        let state = Arc::new((Mutex::new(WatchState { armed: None, next_id: 0, shutdown: false }), Condvar::new()));
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("collective-watchdog".into())
            .spawn(move || {
                let (lock, cvar) = &*shared;
                let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
                while !st.shutdown {
                    match st.armed.clone() {
                        None => st = cvar.wait(st).unwrap_or_else(|p| p.into_inner()),
                        Some((what, deadline, id)) => {
                            let now = Instant::now();
                            if now < deadline {
                                st = cvar.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
                                continue;
                            }
                            // Fired once per arming: disarm, then report without the lock held.
                            if st.armed.as_ref().is_some_and(|a| a.2 == id) {
                                st.armed = None;
                            }
                            drop(st);
                            on_timeout(&what, timeout);
                            st = lock.lock().unwrap_or_else(|p| p.into_inner());
                        }
                    }
                }
            })
            .ok();
        Watchdog { state, timeout, thread }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Start the clock for the collective `what`.
    pub fn arm(&self, what: &str) -> WatchGuard<'_> {
        let (lock, cvar) = &*self.state;
        let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
        let id = st.next_id;
        st.next_id += 1;
        st.armed = Some((what.to_string(), Instant::now() + self.timeout, id));
        cvar.notify_all();
        WatchGuard { dog: self, id }
    }
}

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.dog.state;
        let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
        if st.armed.as_ref().is_some_and(|a| a.2 == self.id) {
            st.armed = None;
        }
        cvar.notify_all();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        {
            let (lock, cvar) = &*self.state;
            let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
            st.shutdown = true;
            cvar.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One rank's part of a data-parallel training step: its rows of the global batch (the step's
/// `batch` holds exactly these rows) and the communicator that averages the gradients.
pub struct DataParallel<'a> {
    pub comm: &'a dyn Communicator,
    /// This rank's rows of the global batch.
    pub rows: Range<usize>,
    /// The global batch size (`--batch-size`).
    pub global_rows: usize,
}

impl DataParallel<'_> {
    /// The weight of this rank's batch-mean in the global batch-mean: rows / global rows (not
    /// 1/N: shards may differ in size).
    pub fn weight(&self) -> f32 {
        (self.rows.len() as f64 / self.global_rows.max(1) as f64) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn ranks_spread_over_the_nodes_gpus() {
        // 4 ranks per node on 2 GPUs: local ranks 0..4 take GPUs 0, 1, 0, 1, whatever the global rank.
        let got: Vec<usize> = (0..4).map(|l| local_gpu(Some(&l.to_string()), 10 + l, 2).unwrap()).collect();
        assert_eq!(got, [0, 1, 0, 1]);
        assert_eq!(local_gpu(Some(" 3\n"), 0, 8).unwrap(), 3);
        // Without the variable, the global rank.
        assert_eq!(local_gpu(None, 5, 4).unwrap(), 1);
        assert!(matches!(local_gpu(Some("x"), 0, 2), Err(Error::Input(m)) if m.contains("OMPI_COMM_WORLD_LOCAL_RANK")));
        assert!(matches!(local_gpu(Some("0"), 3, 0), Err(Error::Cuda(m)) if m.contains("rank 3: no CUDA device")));
    }

    #[test]
    fn shards_cover_the_batch_once_in_order() {
        for n in [0, 1, 5, 16, 17] {
            for size in 1..6 {
                let parts: Vec<Range<usize>> = (0..size).map(|r| shard(n, r, size)).collect();
                let rows: Vec<usize> = parts.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(rows, (0..n).collect::<Vec<_>>(), "n {n}, size {size}");
                let lens: Vec<usize> = parts.iter().map(|r| r.len()).collect();
                assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1, "{lens:?}");
            }
        }
        assert_eq!(shard(17, 0, 2), 0..9);
        assert_eq!(shard(17, 1, 2), 9..17);
        assert_eq!(shard(1, 1, 2), 1..1);
    }

    #[test]
    fn rank_order_sum() {
        // 1e8 + 1 − 1e8 in f32 is 0 in this order and 1 in another: the order is fixed.
        let parts = [1e8f32, 2.0, 1.0, 3.0, -1e8, 4.0];
        assert_eq!(sum_in_rank_order(&parts, 2), vec![0.0, 9.0]);
        assert_eq!(sum_in_rank_order(&parts[..2], 2), vec![1e8, 2.0]);
    }

    #[test]
    fn single_process_collectives_are_the_identity() {
        let c = SingleProcess;
        let mut b = vec![1.5f32, -2.0];
        c.all_reduce_sum(&mut b).unwrap();
        c.all_reduce_mean(&mut b).unwrap();
        c.broadcast(&mut b, 0).unwrap();
        c.barrier().unwrap();
        assert_eq!(b, [1.5, -2.0]);
        assert_eq!((c.rank(), c.size()), (0, 1));
        assert!(c.broadcast(&mut b, 1).unwrap_err().to_string().contains("rank 1"));
    }

    #[test]
    fn watchdog_fires_once_for_a_late_collective_and_not_for_a_prompt_one() {
        let fired = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(String::new()));
        let (f, s) = (fired.clone(), seen.clone());
        let dog = Watchdog::new(Duration::from_millis(150), Box::new(move |what, _| {
            f.fetch_add(1, Ordering::SeqCst);
            *s.lock().unwrap() = what.to_string();
        }));
        {
            let _g = dog.arm("prompt");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(fired.load(Ordering::SeqCst), 0, "a disarmed collective fired");
        {
            let _g = dog.arm("late all-reduce");
            std::thread::sleep(Duration::from_millis(600));
        }
        assert_eq!(fired.load(Ordering::SeqCst), 1);
        assert_eq!(*seen.lock().unwrap(), "late all-reduce");
    }
}
