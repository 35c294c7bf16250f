//! Counter-based dropout: the mask is a pure function of `(seed, stream, element index)`.
//!
//! Nothing is stored between the forward and the backward: the backward recomputes the mask from
//! the same `(seed, stream)`. The generator is Philox4x32-10 (Salmon, Moraes, Dror, Shaw,
//! "Parallel random numbers: as easy as 1, 2, 3", SC'11 — the Random123 library), written out
//! here so that a CUDA kernel can reproduce every bit of it with 32-bit integer multiplies.
//!
//! Mapping of an element to the generator (also what `curand_init(seed, subsequence, offset)`
//! does with its Philox state, which keeps a CUDA port obvious):
//! - key     = `[seed_lo, seed_hi]`;
//! - counter = `[block_lo, block_hi, stream_lo, stream_hi]` with `block = i / 4`;
//! - element `i` uses output word `i % 4` of that block.
//!
//! An element is dropped iff its 32-bit word is `< threshold(p)`, with
//! `threshold(p) = round(p·2³²)` computed once on the host: an integer compare, so the CPU and
//! any GPU agree exactly (no float rounding in the keep decision). Kept values are multiplied by
//! `scale(p) = f32(1/(1−p))`, as torch's dropout does.

use rayon::prelude::*;

use crate::error::{Error, Result};

// Philox4x32 round constants (Random123 `philox.h`: PHILOX_M4x32_0/1 multipliers,
// PHILOX_W32_0/1 Weyl key increments — the golden ratio and √3−1, as 32-bit fractions).
const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;
/// Philox4x32-10: ten rounds, the variant Random123 recommends and curand implements.
const PHILOX_ROUNDS: usize = 10;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

#[inline(always)]
fn philox_round(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (hi0, lo0) = mulhilo(PHILOX_M0, ctr[0]);
    let (hi1, lo1) = mulhilo(PHILOX_M1, ctr[2]);
    [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0]
}

/// One Philox4x32-10 block: 4 independent 32-bit words for `(counter, key)`.
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut ctr, mut key) = (counter, key);
    ctr = philox_round(ctr, key);
    for _ in 1..PHILOX_ROUNDS {
        // The key is bumped between rounds, never before the first.
        key = [key[0].wrapping_add(PHILOX_W0), key[1].wrapping_add(PHILOX_W1)];
        ctr = philox_round(ctr, key);
    }
    ctr
}

/// The dropout generator: only a seed. Streams separate the dropout sites and steps that share it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutRng {
    pub seed: u64,
}

/// The integer drop threshold and the keep scale for a probability `p` (validated).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutParams {
    /// A word `< threshold` drops its element. 0 for p = 0.
    pub threshold: u32,
    /// `f32(1/(1−p))`.
    pub scale: f32,
}

impl DropoutParams {
    /// `p` must be in `[0, 1)`; p = 1 would drop everything and divide by zero, like torch's
    /// refusal of a meaningless rescale.
    pub fn new(p: f32) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::Input(format!("dropout probability {p} is not in [0, 1)")));
        }
        // p < 1 in f32 is at most 1 − 2⁻²⁴, so p·2³² ≤ 2³² − 2⁸ and the threshold fits in u32.
        let threshold = (p as f64 * 4_294_967_296.0).round() as u32;
        Ok(DropoutParams { threshold, scale: (1.0 / (1.0 - p as f64)) as f32 })
    }
}

/// Elements per parallel chunk; a multiple of 4 so a Philox block never straddles two chunks.
const CHUNK: usize = 1 << 14;

impl DropoutRng {
    pub fn new(seed: u64) -> Self {
        DropoutRng { seed }
    }

    fn key(&self) -> [u32; 2] {
        [self.seed as u32, (self.seed >> 32) as u32]
    }

    /// The 4 words of Philox block `block` of `stream`.
    pub fn block(&self, stream: u64, block: u64) -> [u32; 4] {
        philox4x32_10([block as u32, (block >> 32) as u32, stream as u32, (stream >> 32) as u32], self.key())
    }

    /// The raw 32-bit word of element `index` of `stream`.
    pub fn word(&self, stream: u64, index: u64) -> u32 {
        self.block(stream, index / 4)[(index % 4) as usize]
    }

    /// Calls `f(i, keep)` for the elements `offset..offset + len` of `stream`, in order.
    fn for_each_keep(&self, stream: u64, offset: usize, len: usize, threshold: u32, mut f: impl FnMut(usize, bool)) {
        let end = offset + len;
        let mut i = offset;
        while i < end {
            let words = self.block(stream, (i / 4) as u64);
            let lane_end = ((i / 4) * 4 + 4).min(end);
            for j in i..lane_end {
                f(j - offset, words[j % 4] >= threshold);
            }
            i = lane_end;
        }
    }

    /// The keep mask of the first `n` elements of `stream` (true = kept). p = 0 keeps all.
    pub fn keep_mask(&self, stream: u64, n: usize, p: f32) -> Result<Vec<bool>> {
        let params = DropoutParams::new(p)?;
        let mut mask = vec![true; n];
        if params.threshold == 0 {
            return Ok(mask);
        }
        mask.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
            let len = chunk.len();
            self.for_each_keep(stream, c * CHUNK, len, params.threshold, |j, keep| chunk[j] = keep);
        });
        Ok(mask)
    }

    /// Zero the dropped elements of `x` and scale the kept ones by `1/(1−p)`, in place.
    fn apply(&self, x: &mut [f32], p: f32, stream: u64) -> Result<()> {
        DropoutParams::new(p)?;
        if p == 0.0 {
            // An exact identity: no scale, no draws.
            return Ok(());
        }
        x.par_chunks_mut(CHUNK).enumerate().try_for_each(|(c, chunk)| dropout_range(chunk, p, self, stream, c * CHUNK))
    }
}

/// Dropout of a slice that holds elements `offset..offset + x.len()` of `stream` (for a block of a
/// larger tensor, e.g. one head's attention probabilities), in place. The elements of whole
/// groups of `PHILOX_LANES` blocks go through `dropout_lanes` (vectorised); the rest one block
/// at a time. Both draw the same words.
pub fn dropout_range(x: &mut [f32], p: f32, rng: &DropoutRng, stream: u64, offset: usize) -> Result<()> {
    let DropoutParams { threshold, scale } = DropoutParams::new(p)?;
    if threshold == 0 {
        return Ok(());
    }
    let keep_or_drop = |x: &mut [f32], at: usize| rng.for_each_keep(stream, at, x.len(), threshold, |j, keep| x[j] = if keep { x[j] * scale } else { 0.0 });
    // Up to the first element of a block, then whole groups of blocks, then the tail.
    let head = ((4 - offset % 4) % 4).min(x.len());
    let body = (x.len() - head) / (4 * PHILOX_LANES) * (4 * PHILOX_LANES);
    let (first, rest) = x.split_at_mut(head);
    let (middle, last) = rest.split_at_mut(body);
    keep_or_drop(first, offset);
    dropout_lanes(middle, rng.key(), stream, ((offset + head) / 4) as u64, threshold, scale);
    keep_or_drop(last, offset + head + body);
    Ok(())
}

/// Philox blocks computed side by side in `dropout_lanes` (one 256-bit vector of counters).
const PHILOX_LANES: usize = 8;

/// Dropout of `x` (a whole number of `PHILOX_LANES`-block groups) whose element 0 is element 0
/// of block `first_block`: with AVX2, eight Philox counters per vector; otherwise block by block.
/// Both give the words `philox4x32_10` gives.
fn dropout_lanes(x: &mut [f32], key: [u32; 2], stream: u64, first_block: u64, threshold: u32, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was detected on this CPU just now.
            return unsafe { dropout_lanes_avx2(x, key, stream, first_block, threshold, scale) };
        }
    }
    let counter = |b: u64| [b as u32, (b >> 32) as u32, stream as u32, (stream >> 32) as u32];
    for (i, quad) in x.chunks_exact_mut(4).enumerate() {
        let words = philox4x32_10(counter(first_block + i as u64), key);
        for (v, w) in quad.iter_mut().zip(words) {
            *v = if w >= threshold { *v * scale } else { 0.0 };
        }
    }
}

/// `dropout_lanes` with the ten rounds on eight counters at once: the 32×32→64-bit products of
/// even and odd lanes by two `vpmuludq`, their high and low halves put back in lane order by blends.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dropout_lanes_avx2(x: &mut [f32], key: [u32; 2], stream: u64, first_block: u64, threshold: u32, scale: f32) {
    use std::arch::x86_64::*;
    // (high, low) 32-bit halves of m·c for each lane.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn mulhilo8(m: __m256i, c: __m256i) -> (__m256i, __m256i) {
        let even = _mm256_mul_epu32(c, m); // lanes 0, 2, 4, 6 as 64-bit products
        let odd = _mm256_mul_epu32(_mm256_srli_epi64::<32>(c), m); // lanes 1, 3, 5, 7
        let lo = _mm256_blend_epi32::<0b1010_1010>(even, _mm256_slli_epi64::<32>(odd));
        let hi = _mm256_blend_epi32::<0b1010_1010>(_mm256_srli_epi64::<32>(even), odd);
        (hi, lo)
    }
    let (m0, m1) = (_mm256_set1_epi32(PHILOX_M0 as i32), _mm256_set1_epi32(PHILOX_M1 as i32));
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut block = first_block;
    for group in x.chunks_exact_mut(4 * PHILOX_LANES) {
        // Blocks block..block+8; the high word is the same for all unless the low one wraps.
        let lo = block as u32;
        let mut c0 = _mm256_add_epi32(_mm256_set1_epi32(lo as i32), lanes);
        let mut c1 = if lo.checked_add(PHILOX_LANES as u32 - 1).is_some() {
            _mm256_set1_epi32((block >> 32) as i32)
        } else {
            let hi: [u32; PHILOX_LANES] = std::array::from_fn(|l| ((block + l as u64) >> 32) as u32);
            _mm256_setr_epi32(hi[0] as i32, hi[1] as i32, hi[2] as i32, hi[3] as i32, hi[4] as i32, hi[5] as i32, hi[6] as i32, hi[7] as i32)
        };
        let mut c2 = _mm256_set1_epi32(stream as i32);
        let mut c3 = _mm256_set1_epi32((stream >> 32) as i32);
        let mut k = key;
        for round in 0..PHILOX_ROUNDS {
            if round > 0 {
                k = [k[0].wrapping_add(PHILOX_W0), k[1].wrapping_add(PHILOX_W1)];
            }
            let (hi0, lo0) = mulhilo8(m0, c0);
            let (hi1, lo1) = mulhilo8(m1, c2);
            let n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(k[0] as i32));
            let n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(k[1] as i32));
            (c0, c1, c2, c3) = (n0, lo1, n2, lo0);
        }
        let mut words = [[0u32; PHILOX_LANES]; 4];
        for (w, v) in words.iter_mut().zip([c0, c1, c2, c3]) {
            // SAFETY: an unaligned store of 8 u32 into an array of 8 u32.
            unsafe { _mm256_storeu_si256(w.as_mut_ptr().cast(), v) };
        }
        // Element 4·l + w takes word w of block l.
        for (e, v) in group.iter_mut().enumerate() {
            let word = words[e % 4][e / 4];
            *v = if word >= threshold { *v * scale } else { 0.0 };
        }
        block += PHILOX_LANES as u64;
    }
}

/// Training-mode dropout of `x` in place: element i of `stream` is kept with probability 1−p and
/// then scaled by `1/(1−p)`. p = 0 is the identity and draws nothing; p outside [0, 1) is an error.
pub fn dropout_forward(x: &mut [f32], p: f32, rng: &DropoutRng, stream: u64) -> Result<()> {
    rng.apply(x, p, stream)
}

/// The backward of `dropout_forward` with the same `(p, rng, stream)`: the gradient passes through
/// the same mask with the same scale (dropout is linear, and its own adjoint).
pub fn dropout_backward(dy: &mut [f32], p: f32, rng: &DropoutRng, stream: u64) -> Result<()> {
    rng.apply(dy, p, stream)
}
