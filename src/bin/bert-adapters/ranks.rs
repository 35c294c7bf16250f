//! `train` on several processes (issue 18): the ranks of an `mpirun` launch, found from
//! OpenMPI's environment (`OMPI_COMM_WORLD_SIZE`), and what `train` does with them besides the
//! gradient all-reduce of the training step (`BertModel::train_step_data_parallel`):
//!
//! - every rank reads the same data, draws the same split and batch order, and takes its rows of
//!   each global batch ([`Ranks::shard`]); `--batch-size` stays the global batch;
//! - the step's loss and the Ctrl-C flag are summed over the ranks after each step (so every
//!   rank stops at the same step), weighted by each shard's rows;
//! - evaluation batches are dealt out round-robin and the predictions gathered
//!   ([`Ranks::gather`]), so every rank holds all of them and computes the same metrics;
//! - only rank 0 prints and writes (metrics, plot, adapters, checkpoints); every rank reads the
//!   checkpoint on `--resume` (so `--out` must be visible to every rank: one machine, or a shared
//!   folder);
//! - a rank that fails ends the job (`MPI_Abort`) after printing its error with its rank;
//! - GPU ranks (`--device cuda`, or `auto` finding one): each opens GPU `local rank % GPUs on
//!   its node` ([`Ranks::device`]); with the `nccl` feature the gradient all-reduce goes over
//!   NCCL on the backend's stream, with no host copy of the arena, bootstrapped over MPI
//!   ([`Ranks::attach_device`], [`Ranks::grad_comm`]); everything else (the loss and stop
//!   sums, the evaluation gather, agreement) stays on MPI; without it the
//!   gradients go over MPI through host copies, said once on rank 0's stderr.

use std::ops::Range;
use std::time::Duration;

use bert_adapters::dist::{shard, Communicator, SingleProcess};
use bert_adapters::{Device, Error, Result};

/// OpenMPI's variable for the number of ranks of a launch.
const OMPI_SIZE: &str = "OMPI_COMM_WORLD_SIZE";

enum Inner {
    Single(SingleProcess),
    #[cfg(feature = "mpi")]
    Mpi(bert_adapters::dist::mpi::MpiComm),
}

/// This process's place among the ranks of a run.
pub struct Ranks {
    inner: Inner,
    /// The gradient all-reduce of GPU ranks (see [`Ranks::attach_device`]).
    #[cfg(all(feature = "mpi", feature = "nccl"))]
    nccl: Option<bert_adapters::dist::nccl::NcclComm>,
}

impl Ranks {
    /// One process, unless started by OpenMPI's `mpirun` with more than one rank: then MPI
    /// (with the `mpi` feature; without it, an error saying how to build it). A collective that
    /// waits longer than `timeout` for the other ranks ends this rank (`mpirun` ends the rest).
    pub fn from_env(timeout: Duration) -> Result<Self> {
        let size = std::env::var(OMPI_SIZE).ok().map(|s| s.trim().parse::<usize>().map_err(|_| Error::Input(format!("{OMPI_SIZE}={s:?} is not a number of ranks"))));
        let size = size.transpose()?;
        match size {
            // `mpirun -np 1` is one process: no MPI needed.
            None | Some(1) => Ok(Ranks::with(Inner::Single(SingleProcess))),
            Some(0) => Err(Error::Input(format!("{OMPI_SIZE}=0: no ranks"))),
            Some(n) => Self::mpi(n, timeout),
        }
    }

    #[cfg(feature = "mpi")]
    fn mpi(_n: usize, timeout: Duration) -> Result<Self> {
        let comm = bert_adapters::dist::mpi::MpiComm::init()?;
        let rank = comm.rank();
        let comm = comm.with_timeout(
            timeout,
            Box::new(move |what, waited| {
                crate::console::err_always(format_args!(
                    "error (rank {rank}): {what} waited {} s for the other ranks: one of them died or hangs (--collective-timeout); ending this rank",
                    waited.as_secs()
                ));
                std::process::exit(1);
            }),
        );
        Ok(Ranks::with(Inner::Mpi(comm)))
    }

    #[cfg(not(feature = "mpi"))]
    fn mpi(n: usize, _timeout: Duration) -> Result<Self> {
        Err(Error::Unsupported(format!(
            "started by mpirun with {n} ranks, but this bert-adapters was built without MPI: build it with `cargo build --release --features mpi` (OpenMPI: apt-get install openmpi-bin libopenmpi-dev libclang-dev)"
        )))
    }

    fn with(inner: Inner) -> Self {
        Ranks {
            inner,
            #[cfg(all(feature = "mpi", feature = "nccl"))]
            nccl: None,
        }
    }

    /// The `--device` this rank opens: among several ranks `cuda` (and `auto`, when this node
    /// has a GPU) becomes `cuda:N` with N = the node-local rank modulo the node's GPUs
    /// (`OMPI_COMM_WORLD_LOCAL_RANK`); any other choice, or one process, is kept as given.
    pub fn device(&self, choice: &str) -> Result<String> {
        if !self.is_parallel() || !matches!(choice, "cuda" | "auto") {
            return Ok(choice.to_string());
        }
        let count = match bert_adapters::cuda::probe::device_count() {
            Ok(n) if n > 0 => n,
            // `auto` without a GPU is the CPU, as in one process.
            _ if choice == "auto" => return Ok(choice.to_string()),
            Ok(_) => return Err(Error::Cuda(format!("--device cuda on rank {}: the CUDA driver sees no GPU on this node", self.rank()))),
            Err(why) => return Err(Error::Cuda(format!("--device cuda on rank {}: {why}", self.rank()))),
        };
        let local = std::env::var(bert_adapters::dist::OMPI_LOCAL_RANK).ok();
        Ok(format!("cuda:{}", bert_adapters::dist::local_gpu(local.as_deref(), self.rank(), count)?))
    }

    /// Once the backend is open: a GPU rank among several all-reduces its gradients over NCCL on
    /// the backend's GPU and stream (feature `nccl`; a missing libnccl is an error naming it), or,
    /// in a build without NCCL, over MPI through host copies, which rank 0 says once on stderr.
    pub fn attach_device(&mut self, backend: &dyn bert_adapters::Backend) -> Result<()> {
        let Device::Cuda(ordinal) = backend.device() else {
            return Ok(());
        };
        if !self.is_parallel() {
            return Ok(());
        }
        #[cfg(all(feature = "mpi", feature = "nccl"))]
        {
            let gpu = backend.gpu().ok_or_else(|| Error::Internal(format!("the backend on cuda:{ordinal} has no GPU runtime")))?;
            let nccl = bert_adapters::dist::nccl::NcclComm::on_gpu(gpu, self.comm()).map_err(|e| {
                Error::Cuda(format!("rank {}: NCCL for the gradient all-reduce on cuda:{ordinal}: {e} (a build without the nccl feature all-reduces over MPI instead)", self.rank()))
            })?;
            self.nccl = Some(nccl);
        }
        #[cfg(not(all(feature = "mpi", feature = "nccl")))]
        if self.writes() {
            let _ = ordinal;
            crate::console::err_always(format_args!(
                "note: the GPU ranks all-reduce their gradients over MPI through host copies: this bert-adapters was built without NCCL (build with --features \"mpi nccl\" for NCCL)"
            ));
        }
        Ok(())
    }

    /// What carries the gradient all-reduce: NCCL on GPU ranks that have it, else [`Ranks::comm`].
    pub fn grad_comm(&self) -> &dyn Communicator {
        #[cfg(all(feature = "mpi", feature = "nccl"))]
        if let Some(n) = &self.nccl {
            return n;
        }
        self.comm()
    }

    pub fn comm(&self) -> &dyn Communicator {
        match &self.inner {
            Inner::Single(c) => c,
            #[cfg(feature = "mpi")]
            Inner::Mpi(c) => c,
        }
    }

    pub fn rank(&self) -> usize {
        self.comm().rank()
    }

    pub fn size(&self) -> usize {
        self.comm().size()
    }

    /// Whether this rank prints and writes files (rank 0).
    pub fn writes(&self) -> bool {
        self.rank() == 0
    }

    pub fn is_parallel(&self) -> bool {
        self.size() > 1
    }

    /// This rank's rows of a global batch of `n`.
    pub fn shard(&self, n: usize) -> Range<usize> {
        shard(n, self.rank(), self.size())
    }

    /// A fatal error on this rank: alone, it is returned (the command prints it and exits 1);
    /// among several ranks it is printed with the rank, and the whole job ends (`MPI_Abort`), so
    /// that no rank waits for this one in a collective.
    pub fn fail(&self, e: Error) -> Error {
        match &self.inner {
            Inner::Single(_) => e,
            #[cfg(feature = "mpi")]
            Inner::Mpi(c) => {
                if c.size() == 1 {
                    return e;
                }
                crate::console::err_always(format_args!("error (rank {} of {}): {e}", c.rank(), c.size()));
                c.abort(1)
            }
        }
    }

    /// Every rank must hold the same `value` of `what` (a fingerprint of the settings): rank 0's
    /// is sent to all, and every rank learns whether any differed, so all fail together.
    pub fn agree(&self, what: &str, value: u64) -> Result<()> {
        if !self.is_parallel() {
            return Ok(());
        }
        // 16 bits per f32: exact.
        let words = |v: u64| -> Vec<f32> { (0..4).map(|i| ((v >> (16 * i)) & 0xffff) as f32).collect() };
        let mut buf = words(value);
        self.comm().broadcast(&mut buf, 0)?;
        let mut differs = [if buf == words(value) { 0.0 } else { 1.0 }];
        self.comm().all_reduce_sum(&mut differs)?;
        if differs[0] > 0.0 {
            return Err(Error::Input(format!(
                "{} of {} ranks differ from rank 0 in {what}: every rank must run the same command on the same data, model and checkpoint",
                differs[0],
                self.size()
            )));
        }
        Ok(())
    }

    /// After a step: the global batch's loss and cross-entropy from this rank's (means over its
    /// rows, weighted by `weight` = rows / global rows), and whether any rank was asked to stop.
    pub fn reduce_step(&self, loss: f32, ce: f32, weight: f32, stop: bool) -> Result<(f32, f32, bool)> {
        if !self.is_parallel() {
            return Ok((loss, ce, stop));
        }
        let mut buf = [loss * weight, ce * weight, f32::from(u8::from(stop))];
        self.comm().all_reduce_sum(&mut buf)?;
        Ok((buf[0], buf[1], buf[2] > 0.0))
    }

    /// Gather the predictions of an evaluation whose batches the ranks shared: this rank's are
    /// `Some` at its texts; `None` overall when this rank stopped (Ctrl-C). Every rank gets all
    /// `n` predictions, or `None` when any rank stopped.
    pub fn gather(&self, mine: Option<Vec<Option<usize>>>, n: usize) -> Result<Option<Vec<usize>>> {
        if !self.is_parallel() {
            return Ok(mine.map(|p| p.into_iter().map(|v| v.unwrap_or(0)).collect()));
        }
        // Label + 1 in each text's slot (exact in f32 below 2^24 labels; at most 10,000), 0
        // elsewhere, and the stop flag last.
        let mut buf = vec![0f32; n + 1];
        match &mine {
            Some(p) => p.iter().zip(&mut buf).for_each(|(v, b)| *b = v.map_or(0.0, |l| l as f32 + 1.0)),
            None => buf[n] = 1.0,
        }
        self.comm().all_reduce_sum(&mut buf)?;
        if buf[n] > 0.0 {
            return Ok(None);
        }
        buf[..n]
            .iter()
            .enumerate()
            .map(|(i, &v)| if v >= 1.0 && v.fract() == 0.0 { Ok(v as usize - 1) } else { Err(Error::Internal(format!("evaluation: text {} got the prediction slot {v} from the ranks", i + 1))) })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}
