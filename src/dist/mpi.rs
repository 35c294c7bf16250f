//! The MPI communicator (cargo feature `mpi`): CPU ranks started by `mpirun`, through the `mpi`
//! crate over the system's MPI (OpenMPI from Debian's packages in CI).
//!
//! The all-reduce is a gather to rank 0, a sum in rank order there ([`super::sum_in_rank_order`])
//! and a broadcast: every rank gets the same bits, and the result depends only on the number of
//! ranks, never on which algorithm the MPI library picks for `MPI_Allreduce` (which may differ
//! between ranks in its rounding for more than two ranks). For the adapter arenas this moves
//! (N − 1)·bytes into rank 0 and the same out again per step: ~0.3 MB per rank for MiniLM's two
//! pfeiffer adapters, small against a step's compute.
//!
//! Faults: MPI's default error handler (`MPI_ERRORS_ARE_FATAL`) ends the job on a failed
//! collective, and `mpirun` ends every rank when one exits early or is killed. A rank that is
//! alive but never reaches the collective (it hangs) is caught by the optional [`Watchdog`].

use std::time::Duration;

use mpi::collective::CommunicatorCollectives;
use mpi::collective::Root;
use mpi::environment::Universe;
use mpi::topology::{Communicator as _, SimpleCommunicator};

use super::{check_root, sum_in_rank_order, Communicator, OnTimeout, Watchdog};
use crate::error::{Error, Result};

/// `MPI_COMM_WORLD` of a process started by `mpirun`.
pub struct MpiComm {
    world: SimpleCommunicator,
    watchdog: Option<Watchdog>,
    // Dropped last: MPI_Finalize.
    _universe: Universe,
}

impl MpiComm {
    /// Initialise MPI (once per process) and take `MPI_COMM_WORLD`.
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize().ok_or_else(|| Error::Unsupported("MPI was already initialised in this process".into()))?;
        let world = universe.world();
        Ok(MpiComm { world, watchdog: None, _universe: universe })
    }

    /// Bound every collective by `timeout`: one still waiting then calls `on_timeout` (from
    /// another thread, so it must not call MPI: report and end the process; `mpirun` then ends
    /// the other ranks).
    pub fn with_timeout(mut self, timeout: Duration, on_timeout: OnTimeout) -> Self {
        self.watchdog = Some(Watchdog::new(timeout, on_timeout));
        self
    }

    /// End every rank of the job with `code` (`MPI_Abort`), after a rank's fatal error.
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    fn count(len: usize, what: &str) -> Result<()> {
        if i32::try_from(len).is_err() {
            return Err(Error::Input(format!("{what} of {len} values is more than one MPI message holds")));
        }
        Ok(())
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn name(&self) -> String {
        format!("MPI, {} ranks", self.size())
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let n = self.size();
        if n == 1 {
            return Ok(());
        }
        Self::count(buf.len() * n, "an all-reduce")?;
        let _guard = self.watchdog.as_ref().map(|w| w.arm(&format!("an all-reduce of {} values", buf.len())));
        let root = self.world.process_at_rank(0);
        if self.rank() == 0 {
            let mut parts = vec![0f32; buf.len() * n];
            root.gather_into_root(&*buf, &mut parts[..]);
            buf.copy_from_slice(&sum_in_rank_order(&parts, buf.len()));
        } else {
            root.gather_into(&*buf);
        }
        root.broadcast_into(buf);
        Ok(())
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        check_root(root, self.size())?;
        Self::count(buf.len(), "a broadcast")?;
        let _guard = self.watchdog.as_ref().map(|w| w.arm(&format!("a broadcast of {} values from rank {root}", buf.len())));
        self.world.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let _guard = self.watchdog.as_ref().map(|w| w.arm("a barrier"));
        self.world.barrier();
        Ok(())
    }
}
