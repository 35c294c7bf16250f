//! Launchers for `kernels/optim.cu`: the global gradient L2 norm with torch's `clip_grad_norm_`
//! over a list of gradient views, and AdamW as one launch over a flat parameter arena. The spec is
//! the CPU backend (`Backend::clip_grad_norm` → `train::optim::clip_in_place`, `Backend::adamw` →
//! `train::optim::adamw_arena_reference`); the kernel header gives the arithmetic and why it
//! matches.
//!
//! Both work from a table built and uploaded once ([`GradViews`], [`AdamWSegments`]), which
//! also owns the small device workspace, so a step allocates and uploads nothing and reads
//! nothing back: the norm, the clip factor, the step counts and the learning rate stay on the
//! device, and every launch is the same from step to step (graph-capturable).
//!
//! - [`clip_grad_norm`] / [`grad_norm`]: three launches (per-block f64 partial sums of squares;
//!   one block adding them per view and the views in order, writing the norm and the clip
//!   decision; the scaling, which returns at once when nothing is to be clipped). Deterministic:
//!   no float atomics.
//! - [`adamw`]: one launch; each block updates [`ADAMW_CHUNK`] elements of one segment with that
//!   segment's step scalars, and the last block to finish advances the step counts.
//!
//! Every size, index and overlap is checked before anything is enqueued ([`Error::Shape`] or
//! [`Error::Input`] naming the operand and the numbers).

use std::marker::PhantomData;
use std::ops::Range;

use cudarc::driver::LaunchConfig;

use super::gpu::{DeviceBuffer, DeviceTable, DeviceView, DeviceViewMut, Gpu, KernelArg};
use super::registry::optim::{ADAMW_F32, GRAD_NORM_FINALIZE_F32, GRAD_SCALE_F32, GRAD_SUMSQ_PARTIAL_F32, SCALE_F32};
use crate::error::{Error, Result};
use crate::train::optim::AdamWConfig;

/// Elements of one view per block of the norm and scale kernels.
pub const GRAD_CHUNK: usize = 4096;
/// Elements of one segment per block of the AdamW kernel.
pub const ADAMW_CHUNK: usize = 2048;
/// Threads per block of every kernel here (the finalize is one such block).
pub const THREADS: u32 = 256;

const OP_VIEWS: &str = "cuda::GradViews";
const OP_CLIP: &str = "cuda::clip_grad_norm";
const OP_SEGMENTS: &str = "cuda::AdamWSegments";
const OP_ADAMW: &str = "cuda::adamw";

fn blocks_launch(blocks: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// `Err(Shape)` unless the grid of `blocks` blocks fits a launch (`gridDim.x <= 2^31 - 1`).
fn check_blocks(op: &'static str, blocks: usize) -> Result<()> {
    if blocks > i32::MAX as usize {
        return Err(Error::shape(op, format!("{blocks} blocks exceed a grid's 2^31 - 1")));
    }
    Ok(())
}

// ---- gradient norm and clipping ------------------------------------------------------------------

/// The kernels' table of gradient views: `{address, length, first block}` per view, in list
/// order, each view owning `ceil(length / chunk)` blocks. Returns the table and the block count.
/// Pure (unit-tested); refuses views that overlap (a clip would scale their common elements twice).
pub fn plan_grad_views(views: &[(u64, usize)], chunk: usize) -> Result<(Vec<i64>, usize)> {
    if chunk == 0 {
        return Err(Error::shape(OP_VIEWS, "chunk must be at least 1".to_string()));
    }
    if views.len() > i32::MAX as usize {
        return Err(Error::shape(OP_VIEWS, format!("{} views do not fit the kernels' int count", views.len())));
    }
    let mut spans: Vec<(u64, u64, usize)> = Vec::new();
    let mut table = Vec::with_capacity(3 * views.len());
    let mut blocks = 0usize;
    for (i, &(ptr, len)) in views.iter().enumerate() {
        let bytes = (len as u64).checked_mul(4).filter(|b| ptr.checked_add(*b).is_some());
        let (Some(bytes), Ok(len_i)) = (bytes, i64::try_from(len)) else {
            return Err(Error::shape(OP_VIEWS, format!("view {i} of {len} elements at {ptr:#x} overflows the address space")));
        };
        if len > 0 {
            spans.push((ptr, ptr + bytes, i));
        }
        table.extend_from_slice(&[ptr as i64, len_i, blocks as i64]);
        blocks = blocks.checked_add(len.div_ceil(chunk)).ok_or_else(|| Error::shape(OP_VIEWS, "the block count overflows usize".to_string()))?;
    }
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            let (a, b) = (w[0].2.min(w[1].2), w[0].2.max(w[1].2));
            return Err(Error::Input(format!("{OP_VIEWS}: gradient views {a} and {b} overlap")));
        }
    }
    check_blocks(OP_VIEWS, blocks)?;
    Ok((table, blocks))
}

/// A list of gradient views on one [`Gpu`], its table uploaded once, with the workspace the norm
/// needs (per-block partial sums, per-view norms, the clip factor): build it once per gradient
/// layout and pass it to [`clip_grad_norm`] every step.
///
/// It holds the views' device addresses, so it borrows them mutably for `'a` (the clip writes
/// them); [`GradViews::detach`] ends the borrow for an owner that keeps the buffers alive.
pub struct GradViews<'a> {
    table: DeviceTable<i64>,
    lens: Vec<usize>,
    blocks: usize,
    partials: DeviceBuffer<u64>,
    view_norms: DeviceBuffer<f32>,
    clip: DeviceBuffer<f32>,
    _grads: PhantomData<&'a mut f32>,
}

impl std::fmt::Debug for GradViews<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradViews").field("views", &self.lens.len()).field("elements", &self.lens.iter().sum::<usize>()).field("blocks", &self.blocks).finish()
    }
}

impl<'a> GradViews<'a> {
    /// Validates `grads` (no two may overlap; empty views are allowed and have norm 0) and
    /// uploads their table to `gpu`, the device that holds them.
    pub fn new(gpu: &Gpu, grads: &[DeviceViewMut<'a, f32>]) -> Result<Self> {
        let views: Vec<(u64, usize)> = grads.iter().map(|g| (g.device_ptr(), g.len())).collect();
        let (host, blocks) = plan_grad_views(&views, GRAD_CHUNK)?;
        let table = if host.is_empty() { gpu.upload_table(&[0i64; 3])? } else { gpu.upload_table(&host)? };
        Ok(GradViews {
            table,
            lens: views.iter().map(|v| v.1).collect(),
            blocks,
            partials: gpu.alloc_zeros::<u64>(blocks.max(1))?,
            view_norms: gpu.alloc_zeros::<f32>(views.len().max(1))?,
            clip: gpu.alloc_zeros::<f32>(2)?,
            _grads: PhantomData,
        })
    }

    /// The number of views.
    pub fn len(&self) -> usize {
        self.lens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }
    /// Blocks of the partial-sum and scale launches (`Σ ceil(len / GRAD_CHUNK)`).
    pub fn blocks(&self) -> usize {
        self.blocks
    }
    /// `[coef, scaled]` of the last [`clip_grad_norm`]: torch's `max_norm / (norm + 1e-6)` and
    /// 1.0 if the gradients were multiplied by it, else 0.0.
    pub fn clip_factor(&self) -> DeviceView<'_, f32> {
        self.clip.view()
    }

    /// Ends the borrow of the gradient buffers.
    ///
    /// # Safety
    /// Every buffer the views were taken from must stay allocated, at the same address and
    /// length, for as long as the returned value is used in a launch, and nothing else may use
    /// those elements while a launch runs.
    pub unsafe fn detach(self) -> GradViews<'static> {
        GradViews { table: self.table, lens: self.lens, blocks: self.blocks, partials: self.partials, view_norms: self.view_norms, clip: self.clip, _grads: PhantomData }
    }
}

/// The total L2 norm of the views into `norm` (`[1]`), nothing scaled: `clip_grad_norm` with
/// `max_norm = +inf`.
pub fn grad_norm(gpu: &Gpu, grads: &mut GradViews<'_>, norm: &mut DeviceViewMut<'_, f32>) -> Result<()> {
    clip_grad_norm(gpu, grads, f32::INFINITY, norm)
}

/// `torch.nn.utils.clip_grad_norm_` on the device: the total L2 norm (norm of the per-view norms)
/// into `norm` (`[1]`), and every view multiplied by `max_norm / (norm + 1e-6)` when that is below
/// 1 or NaN (a NaN or infinite gradient poisons them, as in torch). `max_norm = +inf` only
/// measures (the scale launch is skipped); NaN or negative is refused.
pub fn clip_grad_norm(gpu: &Gpu, grads: &mut GradViews<'_>, max_norm: f32, norm: &mut DeviceViewMut<'_, f32>) -> Result<()> {
    if max_norm.is_nan() || max_norm < 0.0 {
        return Err(Error::Input(format!("{OP_CLIP}: max_norm {max_norm} must be >= 0")));
    }
    if norm.len() != 1 {
        return Err(Error::shape(OP_CLIP, format!("norm has {} elements, expected 1", norm.len())));
    }
    let n_views = KernelArg::I32(grads.lens.len() as i32);
    let chunk = KernelArg::I64(GRAD_CHUNK as i64);
    if grads.blocks > 0 {
        let args = [grads.partials.view_mut().arg(), grads.table.view().arg(), n_views, chunk];
        // SAFETY: the table lists live views (borrowed for 'a, or detached under that contract),
        // each block reads inside one view's length, and partials holds one slot per block.
        unsafe { gpu.launch(GRAD_SUMSQ_PARTIAL_F32, blocks_launch(grads.blocks), &args) }?;
    }
    let args = [
        norm.arg(),
        grads.clip.view_mut().arg(),
        grads.view_norms.view_mut().arg(),
        grads.partials.view().arg(),
        grads.table.view().arg(),
        n_views,
        chunk,
        KernelArg::F32(max_norm),
        KernelArg::I32(max_norm.is_finite() as i32),
    ];
    // SAFETY: norm holds 1 float, clip 2, view_norms one per view, partials one per block.
    unsafe { gpu.launch(GRAD_NORM_FINALIZE_F32, blocks_launch(1), &args) }?;
    if grads.blocks > 0 && max_norm.is_finite() {
        let args = [grads.table.view().arg(), n_views, chunk, grads.clip.view().arg()];
        // SAFETY: as for the partial sums; each element is scaled by one thread.
        unsafe { gpu.launch(GRAD_SCALE_F32, blocks_launch(grads.blocks), &args) }?;
    }
    Ok(())
}

/// `x *= factor` in place (loss scaling, `Backend::scale_in_place`): one grid-stride launch of at
/// most 1024 blocks; nothing for an empty `x`.
pub fn scale_in_place(gpu: &Gpu, x: &mut DeviceViewMut<'_, f32>, factor: f32) -> Result<()> {
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let blocks = n.div_ceil(THREADS as usize).min(1024);
    let args = [x.arg(), KernelArg::I64(n as i64), KernelArg::F32(factor)];
    // SAFETY: the kernel touches x[..n] only, each element from one thread.
    unsafe { gpu.launch(SCALE_F32, blocks_launch(blocks), &args) }
}

// ---- AdamW ----------------------------------------------------------------------------------------

/// The kernel's table of AdamW segments: `{tensor, start, length, first block}` per segment, each
/// owning `ceil(length / chunk)` blocks (at least one block in all). Returns the table and the
/// block count. Pure (unit-tested); refuses a tensor index outside `0..tensors`, a range outside
/// the arena, a tensor listed twice and overlapping ranges (both would update elements twice, and
/// race).
pub fn plan_adamw_segments(segments: &[(usize, Range<usize>)], arena_len: usize, tensors: usize, chunk: usize) -> Result<(Vec<i64>, usize)> {
    if chunk == 0 {
        return Err(Error::shape(OP_SEGMENTS, "chunk must be at least 1".to_string()));
    }
    if segments.len() > i32::MAX as usize || arena_len > i64::MAX as usize {
        return Err(Error::shape(OP_SEGMENTS, format!("{} segments over an arena of {arena_len} do not fit the kernel's sizes", segments.len())));
    }
    let mut seen = vec![false; tensors];
    let mut table = Vec::with_capacity(4 * segments.len());
    let mut blocks = 0usize;
    for (k, (tensor, r)) in segments.iter().enumerate() {
        if *tensor >= tensors {
            return Err(Error::shape(OP_SEGMENTS, format!("segment {k} names tensor {tensor}, but there are {tensors} step counts")));
        }
        if r.start > r.end || r.end > arena_len {
            return Err(Error::shape(OP_SEGMENTS, format!("segment {k} (tensor {tensor}) covers {r:?}, outside an arena of {arena_len}")));
        }
        if std::mem::replace(&mut seen[*tensor], true) {
            return Err(Error::Input(format!("{OP_SEGMENTS}: tensor {tensor} is listed twice (segment {k})")));
        }
        table.extend_from_slice(&[*tensor as i64, r.start as i64, r.len() as i64, blocks as i64]);
        blocks += r.len().div_ceil(chunk);
    }
    let mut spans: Vec<(usize, usize, usize)> = segments.iter().enumerate().filter(|(_, (_, r))| !r.is_empty()).map(|(k, (_, r))| (r.start, r.end, k)).collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            let (a, b) = (w[0].2.min(w[1].2), w[0].2.max(w[1].2));
            return Err(Error::Input(format!("{OP_SEGMENTS}: segments {a} and {b} overlap")));
        }
    }
    let blocks = if segments.is_empty() { 0 } else { blocks.max(1) };
    check_blocks(OP_SEGMENTS, blocks)?;
    Ok((table, blocks))
}

/// The segments of an arena that one AdamW launch updates (the tensors that received a gradient),
/// uploaded once, with the launch's ticket counter. Build one per set of segments; it holds no
/// device addresses, so it borrows nothing.
pub struct AdamWSegments {
    table: DeviceTable<i64>,
    segments: Vec<(usize, Range<usize>)>,
    arena_len: usize,
    tensors: usize,
    blocks: usize,
    done: DeviceBuffer<u32>,
}

impl std::fmt::Debug for AdamWSegments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamWSegments").field("segments", &self.segments.len()).field("arena_len", &self.arena_len).field("tensors", &self.tensors).field("blocks", &self.blocks).finish()
    }
}

impl AdamWSegments {
    /// `segments` are `(tensor index, element range)` of an arena of `arena_len` elements with
    /// `tensors` step counts (`AdamWLaunch::segments`' meaning); validated, then uploaded.
    pub fn new(gpu: &Gpu, segments: &[(usize, Range<usize>)], arena_len: usize, tensors: usize) -> Result<Self> {
        let (host, blocks) = plan_adamw_segments(segments, arena_len, tensors, ADAMW_CHUNK)?;
        let table = if host.is_empty() { gpu.upload_table(&[0i64; 4])? } else { gpu.upload_table(&host)? };
        Ok(AdamWSegments { table, segments: segments.to_vec(), arena_len, tensors, blocks, done: gpu.alloc_zeros::<u32>(1)? })
    }
    pub fn segments(&self) -> &[(usize, Range<usize>)] {
        self.segments.as_slice()
    }
    /// Blocks of the launch (0 when there is no segment: nothing is launched).
    pub fn blocks(&self) -> usize {
        self.blocks
    }
}

/// The device buffers of one AdamW launch (`AdamWLaunch`'s): the `[N]` arena of parameters, its
/// gradients and the two moments, the `[tensors]` step counts, the `[2]` learning rate
/// (`train::optim::split_f64`) and the optional `[1]` finiteness flag (the gradient norm).
pub struct AdamWBuffers<'a> {
    pub params: DeviceViewMut<'a, f32>,
    pub grads: DeviceView<'a, f32>,
    pub exp_avg: DeviceViewMut<'a, f32>,
    pub exp_avg_sq: DeviceViewMut<'a, f32>,
    pub steps: DeviceViewMut<'a, u32>,
    pub lr: DeviceView<'a, f32>,
    pub skip_unless_finite: Option<DeviceView<'a, f32>>,
}

/// One `torch.optim.AdamW` update of `segments` of the arena (`Backend::adamw`): betas, eps and
/// weight decay from `config` (its `lr` is ignored: the rate is read from `bufs.lr`), each
/// segment's step count read and incremented on the device, everything skipped when
/// `skip_unless_finite` holds a NaN or an infinity. One launch.
pub fn adamw(gpu: &Gpu, config: &AdamWConfig, segments: &mut AdamWSegments, bufs: &mut AdamWBuffers<'_>) -> Result<()> {
    AdamWConfig { lr: 0.0, ..*config }.validate()?;
    let n = segments.arena_len;
    let arena = format!("the arena of {n} elements the segments were built for");
    for (name, len) in [("params", bufs.params.len()), ("grads", bufs.grads.len()), ("exp_avg", bufs.exp_avg.len()), ("exp_avg_sq", bufs.exp_avg_sq.len())] {
        if len != n {
            return Err(Error::shape(OP_ADAMW, format!("{name} has {len} elements, expected {n} ({arena})")));
        }
    }
    if bufs.steps.len() != segments.tensors {
        return Err(Error::shape(OP_ADAMW, format!("steps has {} elements, expected {} (the tensor count the segments were built for)", bufs.steps.len(), segments.tensors)));
    }
    if bufs.lr.len() != 2 {
        return Err(Error::shape(OP_ADAMW, format!("lr has {} elements, expected 2 ([hi, lo] of the f64 rate)", bufs.lr.len())));
    }
    if let Some(f) = &bufs.skip_unless_finite {
        if f.len() != 1 {
            return Err(Error::shape(OP_ADAMW, format!("skip_unless_finite has {} elements, expected 1", f.len())));
        }
    }
    let f32s = |name, ptr, len| (name, ptr, len);
    let outputs = [
        f32s("params", bufs.params.device_ptr(), n),
        f32s("exp_avg", bufs.exp_avg.device_ptr(), n),
        f32s("exp_avg_sq", bufs.exp_avg_sq.device_ptr(), n),
        f32s("steps", bufs.steps.device_ptr(), bufs.steps.len()),
    ];
    let mut inputs = vec![f32s("grads", bufs.grads.device_ptr(), n), f32s("lr", bufs.lr.device_ptr(), 2)];
    if let Some(f) = &bufs.skip_unless_finite {
        inputs.push(f32s("skip_unless_finite", f.device_ptr(), 1));
    }
    super::elementwise::check_disjoint(OP_ADAMW, &outputs, &inputs)?;
    if segments.blocks == 0 {
        return Ok(());
    }
    let (b1, b2) = config.betas;
    let args = [
        bufs.params.arg(),
        bufs.grads.arg(),
        bufs.exp_avg.arg(),
        bufs.exp_avg_sq.arg(),
        bufs.steps.arg(),
        segments.done.view_mut().arg(),
        segments.table.view().arg(),
        KernelArg::I32(segments.segments.len() as i32),
        KernelArg::I64(ADAMW_CHUNK as i64),
        bufs.lr.arg(),
        bufs.skip_unless_finite.as_ref().map_or(KernelArg::Null, |f| f.arg()),
        KernelArg::U64(b1.to_bits()),
        KernelArg::U64(b2.to_bits()),
        KernelArg::U64(config.eps.to_bits()),
        KernelArg::U64(config.weight_decay.to_bits()),
    ];
    // SAFETY: the arena buffers hold the arena_len elements every segment lies in, steps the
    // tensor count every segment's index is below, lr 2 and the flag 1 (all checked above); the
    // outputs overlap no other operand; the ticket counter is 0 between launches.
    unsafe { gpu.launch(ADAMW_F32, blocks_launch(segments.blocks), &args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_tables_give_each_view_its_blocks() {
        let (t, blocks) = plan_grad_views(&[(0x1000, 10), (0x2000, 0), (0x3000, 9000)], 4096).unwrap();
        assert_eq!(blocks, 1 + 3);
        assert_eq!(t, vec![0x1000, 10, 0, 0x2000, 0, 1, 0x3000, 9000, 1]);
        assert_eq!(plan_grad_views(&[], 4096).unwrap(), (vec![], 0));
    }

    #[test]
    fn overlapping_views_are_refused() {
        let e = plan_grad_views(&[(0x1000, 10), (0x2000, 4), (0x1000 + 36, 2)], 4096).unwrap_err().to_string();
        assert!(e.contains("gradient views 0 and 2 overlap"), "{e}");
        // Adjacent views and empty views at the same address are fine.
        plan_grad_views(&[(0x1000, 10), (0x1000 + 40, 2), (0x1000, 0)], 4096).unwrap();
        assert!(matches!(plan_grad_views(&[(u64::MAX - 4, 2)], 4096), Err(Error::Shape { .. })));
    }

    #[test]
    fn segment_tables_are_validated() {
        let (t, blocks) = plan_adamw_segments(&[(2, 0..5000), (0, 6000..6001)], 7000, 3, 2048).unwrap();
        assert_eq!(blocks, 3 + 1);
        assert_eq!(t, vec![2, 0, 5000, 0, 0, 6000, 1, 3]);
        assert_eq!(plan_adamw_segments(&[(1, 4..4)], 7000, 3, 2048).unwrap().1, 1, "one block even when every segment is empty");
        assert_eq!(plan_adamw_segments(&[], 7000, 3, 2048).unwrap().1, 0);
        type Segments<'a> = &'a [(usize, Range<usize>)];
        let cases: [(Segments<'_>, &str); 4] = [
            (&[(3, 0..1)], "tensor 3, but there are 3 step counts"),
            (&[(0, 6990..7001)], "outside an arena of 7000"),
            (&[(0, 0..1), (0, 2..3)], "tensor 0 is listed twice"),
            (&[(0, 0..10), (1, 9..12)], "segments 0 and 1 overlap"),
        ];
        for (segs, want) in cases {
            let e = plan_adamw_segments(segs, 7000, 3, 2048).unwrap_err().to_string();
            assert!(e.contains(want), "{segs:?}: {e}");
        }
    }
}
