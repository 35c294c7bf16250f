//! The device memory pool under [`super::Gpu::alloc`]: a freed buffer's block goes back to a
//! free list keyed by its size class instead of to the driver, and the next allocation of that
//! class takes it. A training loop at a repeated shape therefore allocates device memory only in
//! its first step; [`MemoryStats::device_allocations`] counts the real allocations, so a test can
//! prove it.
//!
//! - **Size classes.** On a GPU, requests round up to 512 bytes (cudaMalloc's own granularity is
//!   coarser still). On cuda-sim a class is the exact byte count, so that the executor's guard
//!   pages still fault on the first byte past what was asked for.
//! - **Bounded.** Cached (free) bytes stay under a cap. A freed block that would pass it pushes
//!   the least recently freed cached blocks (of any class) back to the driver first, so the
//!   cache follows the current shapes: after a larger model's buffers filled it, the next
//!   model's warm-up step still leaves the blocks its graph capture needs (seen on an H100: a
//!   MiniLM capture after BERT-base benchmarks found none). Only a block larger than the whole
//!   cap goes straight back. [`super::Gpu::release_cached`] empties the cache (torch's `empty_cache`).
//! - **Poison.** On cuda-sim a reused block is poisoned again (the executor's NaN words), so a
//!   read before a write still shows, as in a fresh allocation.
//! - **Stream order.** One stream does everything, so a block freed while a kernel still reads
//!   it is only reused by work enqueued after that kernel: safe without events.
//! - **Graph capture** ([`super::graph`]): while a capture runs, freed blocks go to the
//!   capture's private list (allocations look there first), and the finished graph keeps them,
//!   so nothing outside can be handed memory that a replay writes. An allocation the pool cannot
//!   serve during a capture is an error: a capture follows an uncaptured warm-up at its shape.

use std::collections::HashMap;
use std::sync::Mutex;

use cudarc::driver::CudaSlice;

/// Where the pool's memory is and how much of it moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Allocations that reached the driver (or the executor's allocator): what a step after the
    /// first at a shape must not add to.
    pub device_allocations: u64,
    /// Allocations served from the pool's free lists.
    pub reused: u64,
    /// Blocks handed back to the driver (over the cap, or [`super::Gpu::release_cached`]).
    pub released: u64,
    /// Bytes of blocks in use (by size class).
    pub live_bytes: usize,
    /// Bytes of free blocks kept for reuse.
    pub cached_bytes: usize,
    /// The most `live_bytes + cached_bytes` has been.
    pub peak_bytes: usize,
    /// The most `live_bytes` has been (torch's `max_memory_allocated`, in size classes): since
    /// the pool was made or [`super::Gpu::reset_peak_memory`].
    pub peak_live_bytes: usize,
}

/// The memory of one block, held so that dropping it frees it.
#[allow(dead_code)] // held, never read
pub(crate) enum RawBlock {
    Cuda(CudaSlice<u8>),
    #[cfg(feature = "cuda-sim")]
    Sim(super::sim::SimAllocation),
}

/// One device allocation of `bytes` (its size class) at `ptr`.
pub(crate) struct Block {
    #[cfg_attr(not(feature = "cuda-sim"), allow(dead_code))] // read only to re-poison on the executor
    pub raw: RawBlock,
    pub ptr: u64,
    pub bytes: usize,
}

struct PoolState {
    /// Free blocks by size class, each with the sequence number of its release (oldest first).
    free: HashMap<usize, Vec<(u64, Block)>>,
    /// The next release's sequence number.
    released_seq: u64,
    stats: MemoryStats,
    /// While a graph capture runs: the blocks freed during it, reserved for the graph.
    capture: Option<Vec<Block>>,
}

pub(crate) struct Pool {
    state: Mutex<PoolState>,
    /// The most free bytes kept.
    cap: usize,
    /// Round requests up to a multiple of this (1: exact classes).
    granularity: usize,
}

impl Pool {
    pub fn new(cap: usize, granularity: usize) -> Pool {
        Pool { state: Mutex::new(PoolState { free: HashMap::new(), released_seq: 0, stats: MemoryStats::default(), capture: None }), cap, granularity: granularity.max(1) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The size class of a request of `bytes` (never 0: a zero-length buffer still has an address).
    pub fn class(&self, bytes: usize) -> usize {
        bytes.max(1).div_ceil(self.granularity).saturating_mul(self.granularity)
    }

    /// A free block of `class` bytes, from the running capture's reserve first; counted as live.
    pub fn take(&self, class: usize) -> Option<Block> {
        let mut s = self.lock();
        let from_capture = s.capture.as_mut().and_then(|c| c.iter().position(|b| b.bytes == class).map(|i| c.swap_remove(i)));
        let block = match from_capture {
            Some(b) => b,
            None => {
                let (_, b) = s.free.get_mut(&class).and_then(Vec::pop)?;
                s.stats.cached_bytes -= class;
                b
            }
        };
        s.stats.reused += 1;
        s.stats.live_bytes += class;
        s.stats.peak_live_bytes = s.stats.peak_live_bytes.max(s.stats.live_bytes);
        Some(block)
    }

    /// Whether a graph capture is running (a fresh allocation is refused then).
    pub fn capturing(&self) -> bool {
        self.lock().capture.is_some()
    }

    /// Counts a block just allocated from the driver as live.
    pub fn note_fresh(&self, class: usize) {
        let mut s = self.lock();
        s.stats.device_allocations += 1;
        s.stats.live_bytes += class;
        s.stats.peak_bytes = s.stats.peak_bytes.max(s.stats.live_bytes + s.stats.cached_bytes);
        s.stats.peak_live_bytes = s.stats.peak_live_bytes.max(s.stats.live_bytes);
    }

    /// Starts both peaks afresh from what is held now (torch's `reset_peak_memory_stats`).
    pub fn reset_peaks(&self) {
        let mut s = self.lock();
        s.stats.peak_bytes = s.stats.live_bytes + s.stats.cached_bytes;
        s.stats.peak_live_bytes = s.stats.live_bytes;
    }

    /// A block no longer in use: reserved for a running capture, cached, or (over the cap)
    /// returned to the driver.
    pub fn give_back(&self, block: Block) {
        let mut s = self.lock();
        s.stats.live_bytes -= block.bytes;
        if let Some(reserve) = s.capture.as_mut() {
            reserve.push(block);
            return;
        }
        if block.bytes > self.cap {
            s.stats.released += 1;
            drop(s);
            drop(block); // frees outside the lock
            return;
        }
        let mut evicted = Vec::new();
        while s.stats.cached_bytes + block.bytes > self.cap {
            // The least recently freed block: the front of some class's list.
            let Some(class) = s.free.iter().filter_map(|(&c, v)| v.first().map(|(seq, _)| (*seq, c))).min().map(|(_, c)| c) else { break };
            let Some(list) = s.free.get_mut(&class) else { break };
            let (_, old) = list.remove(0);
            if list.is_empty() {
                s.free.remove(&class);
            }
            s.stats.cached_bytes -= old.bytes;
            s.stats.released += 1;
            evicted.push(old);
        }
        s.stats.cached_bytes += block.bytes;
        let seq = s.released_seq;
        s.released_seq += 1;
        s.free.entry(block.bytes).or_default().push((seq, block));
        drop(s);
        drop(evicted); // frees outside the lock
    }

    /// Blocks a graph gives up when it is dropped: back to the pool, as if freed now. (They were
    /// counted as not live when the capture reserved them.)
    pub fn return_reserved(&self, blocks: Vec<Block>) {
        for b in blocks {
            self.lock().stats.live_bytes += b.bytes;
            self.give_back(b);
        }
    }

    pub fn begin_capture(&self) -> bool {
        let mut s = self.lock();
        if s.capture.is_some() {
            return false;
        }
        s.capture = Some(Vec::new());
        true
    }

    /// Ends the capture, handing over the blocks freed during it.
    pub fn end_capture(&self) -> Vec<Block> {
        self.lock().capture.take().unwrap_or_default()
    }

    /// Frees every cached block.
    pub fn release_cached(&self) {
        let blocks: Vec<Block> = {
            let mut s = self.lock();
            let blocks: Vec<Block> = s.free.drain().flat_map(|(_, v)| v).map(|(_, b)| b).collect();
            s.stats.released += blocks.len() as u64;
            s.stats.cached_bytes = 0;
            blocks
        };
        drop(blocks);
    }

    pub fn stats(&self) -> MemoryStats {
        self.lock().stats
    }
}

#[cfg(all(test, feature = "cuda-sim"))]
mod tests {
    use super::*;

    fn block(bytes: usize) -> Block {
        let a = super::super::sim::SimAllocation::new(bytes).expect("executor allocation");
        Block { ptr: a.as_ptr() as u64, raw: RawBlock::Sim(a), bytes }
    }

    fn lend(pool: &Pool, bytes: usize) -> Block {
        pool.note_fresh(bytes);
        block(bytes)
    }

    /// A freed block that would pass the cap displaces the least recently freed cached blocks,
    /// whatever their class, instead of being dropped itself.
    #[test]
    fn the_cap_evicts_the_least_recently_freed_blocks() {
        let pool = Pool::new(1000, 1);
        for bytes in [400, 300, 200] {
            let b = lend(&pool, bytes);
            pool.give_back(b);
        }
        assert_eq!(pool.stats().cached_bytes, 900);
        let b = lend(&pool, 350); // 900 + 350 > 1000: the 400 (oldest) goes, then nothing more
        pool.give_back(b);
        let s = pool.stats();
        assert_eq!((s.cached_bytes, s.released), (850, 1));
        assert!(pool.take(400).is_none(), "the oldest block was evicted");
        for class in [300, 200, 350] {
            let b = pool.take(class).unwrap_or_else(|| panic!("class {class} must still be cached"));
            pool.give_back(b);
        }
        // Freed again in the order 300, 200, 350: a 500 evicts 300, then 200, and keeps 350.
        let b = lend(&pool, 500);
        pool.give_back(b);
        let s = pool.stats();
        assert_eq!((s.cached_bytes, s.released), (850, 3));
        assert!(pool.take(300).is_none() && pool.take(200).is_none());
        assert!(pool.take(350).is_some() && pool.take(500).is_some());
        // A block larger than the whole cap goes straight back, evicting nothing.
        let b = lend(&pool, 1001);
        pool.give_back(b);
        assert_eq!(pool.stats().released, 4);
    }

    /// The live peak follows allocations whether fresh or reused, not frees or the cache, and
    /// starts again from what is held at a reset; the pool's peak counts the cache too.
    #[test]
    fn the_live_peak_counts_blocks_in_use_since_the_last_reset() {
        let pool = Pool::new(10_000, 1);
        let (a, b) = (lend(&pool, 100), lend(&pool, 200));
        assert_eq!((pool.stats().peak_live_bytes, pool.stats().peak_bytes), (300, 300));
        pool.give_back(a);
        pool.give_back(b);
        assert_eq!((pool.stats().live_bytes, pool.stats().peak_live_bytes, pool.stats().cached_bytes), (0, 300, 300));
        pool.reset_peaks();
        assert_eq!((pool.stats().peak_live_bytes, pool.stats().peak_bytes), (0, 300));
        let reused = pool.take(200).expect("the cached 200-byte block");
        let fresh = lend(&pool, 50);
        assert_eq!((pool.stats().peak_live_bytes, pool.stats().peak_bytes), (250, 350));
        pool.give_back(reused);
        pool.give_back(fresh);
        assert_eq!(pool.stats().peak_live_bytes, 250);
    }
}
