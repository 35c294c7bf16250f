// Attention family: fused masked scaled dot-product attention forward over packed Q, K, V, and
// its backward (dQ, dK, dV from the saved log-sum-exp; the "backward" section after the forward
// kernels has its own header). Later sections, each with its own header: the GEMM path's row and
// layout kernels, and for 16-bit storage and T <= 128 the tensor-core forward and the tensor-core
// backward scores (mma.sync).
//
// Semantics (the spec is bert_adapters::cpu::reference::attention / attention_lse, HF BERT's eager
// `BertSelfAttention` in eval mode). For batch row b, head h, query i, key j, d = hidden / heads:
//     s_ij = f32(q_i·k_j · scale) + mask[b % mask_rows][j]   (scale = 1/sqrt(d), passed in; the
//                                                            scaled score is rounded to f32 before
//                                                            the mask is added, as in PyTorch)
//     ctx_i = Σ_j softmax(s_i)_j · v_j                        ([B, T, H], head h in columns h·d..)
//     lse_i = max_j s_ij + log Σ_j exp(s_ij − max_j s_ij)    ([B, heads, T], natural log)
// Q, K, V are the column blocks [0, H), [H, 2H), [2H, 3H) of one [B, T, 3H] tensor (the fused QKV
// projection), read in place. The mask is [mask_rows, T] and additive; mask_rows divides B, and
// row b reads mask row b % mask_rows, so Parallel branches that replicate the batch share it.
// A row whose every score is -inf (mask -inf on every key) has a NaN softmax in PyTorch and in the
// reference (0/0); this kernel writes NaN for its ctx and lse too. A finite large negative mask
// (-10000, or finfo.min as newer HF uses) is not special: with finfo.min every s_ij rounds to the
// same value and the row turns uniform, exactly as in PyTorch.
//
// Algorithm: one pass over the keys in tiles of KEY_TILE = 32 held in shared memory, with an
// online (streaming) softmax, so no [B, heads, T, T] tensor exists anywhere. Per query row the
// kernel keeps a running max m, a running sum l of exp(s - m) and an unnormalised context
// acc = Σ exp(s_j - m)·v_j; a tile with a larger max rescales l and acc by exp(m_old - m_new).
// At the end ctx = acc / l and lse = m + log(l).
//
// Thread mapping: grid.x = B · heads · ceil(T / rows_per_block), the query tiles of one (b, h)
// adjacent (they re-read the same K/V, which stays in L2). Block (32, W): W warps, each owning
// ROWS_PER_WARP = 4 consecutive query rows (rows_per_block = 4W; the launcher picks W in 1..=8).
//   * Q: the block's 4W rows are copied to shared memory once.
//   * Per key tile: the block copies 32 rows of K and V to shared memory (warp per row, lane per
//     column: coalesced); then in each warp lane j scores key j against its 4 query rows (float4
//     reads: K row stride 4·odd floats, so the 8 lanes of each 128-bit phase hit distinct banks; Q
//     reads are broadcasts). The 4 rows' tile maxima come from one interleaved butterfly (9
//     shuffles, not 4 x 5). Lane j writes its 4 probabilities to shared memory; then lane c
//     accumulates columns c, c+32, ... of Σ_j p_j·v_j (V reads are consecutive: conflict-free).
//   * The running sum l stays per lane (each lane sums its own keys, rescaled with the
//     warp-uniform max) and is reduced once at the end: no per-tile sum reduction.
//   Rows past T compute on zero-filled Q and are not stored; a warp whose rows all lie past T
//   skips the arithmetic but still meets every __syncthreads.
//
// Head dim: attention_forward_f32 takes any d in 1..=128 (d read at run time, loops over
// ceil(d/4) float4 groups and up to 4 output columns per lane, guarded); _d32 and _d64 are the
// same body with d a compile-time constant (MiniLM, BERT-base): the score loop fully unrolled,
// no column guards, constant shared-memory strides. Same operations in the same order as the
// generic kernel, so the results are bitwise equal (the tests check it on the executor).
//
// Numerics (f32 everywhere, bounds relative to the scale of the data):
//   * score: a sequential fma chain of d products per lane, then a correctly rounded multiply by
//     scale (__fmul_rn, so NVRTC cannot contract it with the mask add) and the f32 mask add. The
//     error is about γ_d·Σ|q_c·k_c|·scale (d ≤ 128 terms; in practice √d·2^-24 of that sum:
//     ~1e-6 absolute for scores of magnitude ~10), which moves each probability by that
//     relative amount.
//   * softmax: expf/logf (≤ 2 ulp / 1 ulp on a GPU; glibc on the executor), never the
//     approximate __expf. Every exp argument is ≤ 0, so nothing overflows; l ≥ 1 whenever a key
//     is finite (the max term contributes exp(0) = 1), so 1/l and log(l) are well conditioned.
//     Each lane sums ≤ T/32 = 16 terms of l, each rescaled at most T/32 times, before one fixed
//     5-level butterfly: relative error ≲ 40·2^-24 ≈ 2.4e-6 for T = 512.
//   * context: each lane accumulates ≤ T products p_j·v_j (p_j ≤ 1, Σ p_j = l) by fma, rescaled
//     ≤ T/32 times: error ≲ (T + 16)·2^-24·l·max|v| in acc, i.e. ≲ 3e-5·max|v| as a worst-case
//     bound at T = 512 and about √T·2^-24 ≈ 1.4e-6·max|v| in practice (rounding errors of a long
//     sum of bounded terms are random-walk, not aligned).
//   Together: ctx and lse land within ~1e-5·(1 + max|ref|) of the f64 reference; the tests
//   assert exactly that. Reduction order is fixed (no atomics, fixed butterflies, fixed loops),
//   so the output is bitwise reproducible run to run and on every executor schedule.
//
// Memory (dynamic shared, floats; ldq = round_up(d, 4), ldk = ldq or ldq + 4 so ldk/4 is odd):
//   K tile 32·ldk, V tile 32·ldq, Q 4W·ldq, probabilities 4W·32. d = 64, W = 4: 22.5 KiB;
//   d = 128, W = 4: 42.5 KiB. The launcher keeps every plan within the 48 KiB a kernel gets
//   without an opt-in (d = 128 with W = 8 would need 52.5 KiB and is refused).
//   Global traffic per (b, h): Q, ctx once; K and V once per query tile of 4W rows.
//
// Storage type: a template parameter T of the body; attn_load/attn_store convert to and from
// f32, so a storage type is one overload pair plus one wrapper per kernel, accumulation in f32.
//   * _f32: Q, K, V and ctx in f32.
//   * _bf16io (attention_forward_bf16io[_d32|_d64], attention_forward_dropout_bf16io[_d32|_d64]):
//     the packed Q, K, V and ctx in bf16 (`unsigned short*`, kernels/common.cuh bf16_raw), the
//     same body with T = bf16_raw. The mask and the lse stay f32. A bf16 load widens exactly, so
//     every score, p, l, lse and acc·(1/l) comes from the same f32 operations in the same order
//     as in the _f32 kernel on the same (bf16-representable) inputs; the only new rounding is
//     ctx's single store (RNE): ctx_bf16io = bf16(ctx_f32) and lse_bf16io = lse_f32 (bit for
//     bit on the executor, tests/cuda_bf16_attention.rs; within one bf16 ulp asserted on a GPU).
//     Shared memory stays f32 (the tiles hold the widened values), so plans and sizes are the
//     _f32 kernels'. The backward has _bf16io twins too (its section's "Storage").
//   * _f16io (attention_forward_f16io[_d32|_d64], attention_forward_dropout_f16io[_d32|_d64]):
//     the same with IEEE f16 storage (T = f16_raw): the same argument, ctx_f16io = f16(ctx_f32)
//     and lse_f16io = lse_f32. f16 has 3 more mantissa bits (2^-11 relative) but a range of
//     ±65504 (normal down to 6.1e-5): Q, K, V and ctx beyond it are the caller's to avoid (a ctx
//     that overflows stores ±inf, as PyTorch's f16 does). Every _bf16io kernel of this file has
//     an _f16io twin, except the GEMM path's layout kernels (bit copies, one for both).
//     On a GPU the f16 loads and stores are single cvt instructions (kernels/common.cuh), so the
//     _f16io kernels compile to the bf16io twins' registers and launch bounds (ptxas, NVRTC 13.0,
//     sm_90: forward 96, d32 72, d64 70; dK/dV 138; no spills). The integer conversions that
//     cuda-sim runs, inlined on a GPU, had cost 30-60 registers more and spills.
// Dropout on the probabilities (training) is the `Dropout` policy: it maps each unnormalised p_ij
// to the value that multiplies v_j (0 or p/(1-rate) from a Philox stream keyed by (b, h, i, j)),
// while the sum l and the lse keep the undropped p, as PyTorch's dropout(softmax(s))·V does:
// AttnNoDropout (eval forward) and AttnPhiloxDropout (the _dropout kernels, training).

#define ATTN_KEY_TILE 32
#define ATTN_ROWS_PER_WARP 4
#define ATTN_MAX_HEAD_DIM 128
#define ATTN_MAX_WARPS 8

// 16-byte shared-memory vector (a struct of our own: float4 is not defined on every route).
struct alignas(16) AttnVec4 {
    float x, y, z, w;
};

// ---- storage-type conversions: f32, bf16 (the _bf16io kernels), f16 (the _f16io kernels) ------

__device__ __forceinline__ float attn_load(const float* p) { return *p; }
__device__ __forceinline__ void attn_store(float* p, float v) { *p = v; }
// bf16: widening is exact (a shift); the store rounds to nearest even (kernels/common.cuh).
__device__ __forceinline__ float attn_load(const bf16_raw* p) { return load_f32(p); }
__device__ __forceinline__ void attn_store(bf16_raw* p, float v) { store_f32(p, v); }
// f16: widening is exact too; the store rounds to nearest even, overflowing to ±inf past 65504.
__device__ __forceinline__ float attn_load(const f16_raw* p) { return load_f32(p); }
__device__ __forceinline__ void attn_store(f16_raw* p, float v) { store_f32(p, v); }

// ---- numerics helpers -------------------------------------------------------------------------

__device__ __forceinline__ float attn_neg_inf() { return __int_as_float((int)0xff800000u); }
__device__ __forceinline__ float attn_nan() { return __int_as_float(0x7fc00000); }

// a·b rounded to f32 on its own: the reference rounds the scaled score before adding the mask,
// and NVRTC (fmad=true by default) would otherwise fuse the two into one fma.
__device__ __forceinline__ float attn_mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;  // cuda-sim builds with -ffp-contract=off
#endif
}

struct AttnMax {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct AttnSum {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// All-reduce of four values per lane over the warp, in 9 shuffles instead of 4 x 5: two stages
// that halve the rows each lane carries (lanes 16 apart, then 8 apart, exchange the rows they do
// not keep), three plain butterfly stages over the 8 lanes that carry the same row, then two
// stages that gather the four results back. Every lane ends with the same bits for each row
// (op is commutative, the order is fixed). Every lane of the warp must call it.
template <class Op>
__device__ __forceinline__ void attn_warp_allreduce4(float (&v)[4], Op op) {
    const bool hi16 = (threadIdx.x & 16u) != 0;
    const bool hi8 = (threadIdx.x & 8u) != 0;
    // Keep rows {0, 1} (lower half) or {2, 3} (upper half).
    const float keep0 = hi16 ? v[2] : v[0], keep1 = hi16 ? v[3] : v[1];
    const float send0 = hi16 ? v[0] : v[2], send1 = hi16 ? v[1] : v[3];
    const float a = op(keep0, __shfl_xor_sync(FULL_WARP_MASK, send0, 16));
    const float b = op(keep1, __shfl_xor_sync(FULL_WARP_MASK, send1, 16));
    // Keep row 2·hi16 + hi8.
    float c = op(hi8 ? b : a, __shfl_xor_sync(FULL_WARP_MASK, hi8 ? a : b, 8));
#pragma unroll
    for (int offset = 4; offset > 0; offset >>= 1) {
        c = op(c, __shfl_xor_sync(FULL_WARP_MASK, c, offset));
    }
    // Gather: the other row of this half from 8 lanes away, then the other half from 16 away.
    const float other = __shfl_xor_sync(FULL_WARP_MASK, c, 8);
    const float lo = hi8 ? other : c, hi = hi8 ? c : other;  // rows 2·hi16, 2·hi16 + 1
    const float far_lo = __shfl_xor_sync(FULL_WARP_MASK, lo, 16);
    const float far_hi = __shfl_xor_sync(FULL_WARP_MASK, hi, 16);
    v[0] = hi16 ? far_lo : lo;
    v[1] = hi16 ? far_hi : hi;
    v[2] = hi16 ? lo : far_lo;
    v[3] = hi16 ? hi : far_hi;
}

// Eval forward: the probabilities reach V unchanged. A training policy returns p·keep/(1-rate)
// for query row i, key j of (b, h) from a Philox counter (the hook is the only change needed).
struct AttnNoDropout {
    __device__ __forceinline__ float operator()(float p, int /*b*/, int /*h*/, int /*i*/, int /*j*/) const { return p; }
    // The factors of keys j0..j0+3 (the GEMM path's row kernels): 1 (p·1 is p, bit for bit).
    __device__ __forceinline__ void factor4(int /*b*/, int /*h*/, int /*i*/, int /*j0*/, float (&f)[4]) const {
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            f[t] = 1.0f;
        }
    }
};

// Training: the probability (b, h, i, j) is element ((b_local·heads + h)·T + i)·T + j + offset of
// its dropout block's stream (cpu::prob_dropout's mapping), block = b / batch_per_block, whose id
// is byte `block` of block_ids (the host packs at most 8 ids < 256); offset is DropoutSpec::offset
// (a data-parallel shard's first row times heads·T·T; any value, so a row may start mid Philox
// block: philox_keep_factor picks the word of each index on its own). Factor scale or 0.
struct AttnPhilox {
    PhiloxKey key;
    unsigned long long stream_base;  // stream << 8
    unsigned long long block_ids;
    unsigned long long offset;
    int batch_per_block;
    int heads;
    int seq;
    unsigned threshold;
    float scale;

    __device__ __forceinline__ float factor(int b, int h, int i, int j) const {
        if (i >= seq || j >= seq) {
            return 0.0f;  // past T: p is 0 there and nothing stores the row
        }
        const int blk = b / batch_per_block;
        const unsigned long long stream = stream_base | ((block_ids >> (8 * blk)) & 0xffull);
        const unsigned long long row = ((unsigned long long)(b - blk * batch_per_block) * (unsigned long long)heads + (unsigned long long)h) * (unsigned long long)seq + (unsigned long long)i;
        return philox_keep_factor(key, stream, row * (unsigned long long)seq + (unsigned long long)j + offset, threshold, scale);
    }

    // factor(b, h, i, j0 + t) for t < 4 (j0 a multiple of 4), from one Philox block when the four
    // elements' indices start on a block boundary (T and the offset multiples of 4), else from the
    // two blocks they span: a quarter or half of the Philox work of four factor() calls, the
    // same bits.
    __device__ __forceinline__ void factor4(int b, int h, int i, int j0, float (&f)[4]) const {
        const int blk = b / batch_per_block;
        const unsigned long long stream = stream_base | ((block_ids >> (8 * blk)) & 0xffull);
        const unsigned long long row = ((unsigned long long)(b - blk * batch_per_block) * (unsigned long long)heads + (unsigned long long)h) * (unsigned long long)seq + (unsigned long long)i;
        const unsigned long long first = row * (unsigned long long)seq + (unsigned long long)j0 + offset;
        const unsigned shift = (unsigned)(first & 3ull);  // the same for every j0 of a row
        const PhiloxWords w0 = philox_block(key, stream, first >> 2);
        PhiloxWords w1 = w0;
        if (shift != 0) {
            w1 = philox_block(key, stream, (first >> 2) + 1);
        }
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            // Word shift + t of the pair of blocks; selects, not an index (which would put the
            // words in local memory).
            const unsigned at = shift + (unsigned)t;
            const unsigned word = at == 0 ? w0.w[0] : at == 1 ? w0.w[1] : at == 2 ? w0.w[2] : at == 3 ? w0.w[3] : at == 4 ? w1.w[0] : at == 5 ? w1.w[1] : w1.w[2];
            f[t] = i < seq && j0 + t < seq && word >= threshold ? scale : 0.0f;
        }
    }
};

__device__ __forceinline__ AttnPhilox attn_philox(const unsigned* seed_buf, unsigned seed_lo, unsigned seed_hi, unsigned long long stream_base, unsigned long long block_ids, int batch_per_block, int heads, int seq, unsigned threshold, float drop_scale, unsigned long long drop_offset) {
    AttnPhilox d;
    d.offset = drop_offset;
    d.key = philox_key(seed_buf, seed_lo, seed_hi);
    d.stream_base = stream_base;
    d.block_ids = block_ids;
    d.batch_per_block = batch_per_block;
    d.heads = heads;
    d.seq = seq;
    d.threshold = threshold;
    d.scale = drop_scale;
    return d;
}

// The forward's policy: what multiplies v_j is p·factor; l and lse keep the undropped p.
struct AttnPhiloxDropout {
    AttnPhilox d;
    __device__ __forceinline__ float operator()(float p, int b, int h, int i, int j) const { return p * d.factor(b, h, i, j); }
    __device__ __forceinline__ void factor4(int b, int h, int i, int j0, float (&f)[4]) const { d.factor4(b, h, i, j0, f); }
};

// Shared-memory strides in floats: Q/V rows are d rounded up to a float4; K rows are that or 4
// more so that (stride / 4) is odd (conflict-free 128-bit reads of 32 different rows).
__device__ __forceinline__ int attn_ldq(int d) { return (d + 3) & ~3; }
__device__ __forceinline__ int attn_ldk(int d) {
    const int ld = attn_ldq(d);
    return ((ld >> 2) & 1) ? ld : ld + 4;
}

// The kernel body. HEAD_DIM > 0: d is that constant (and equals hidden / heads, the launcher
// checks); HEAD_DIM == 0: d = hidden / heads at run time, 1..=128.
template <typename T, int HEAD_DIM, typename Dropout>
__device__ __forceinline__ void attention_forward_body(
    float* __restrict__ smem,
    T* __restrict__ ctx,
    float* __restrict__ lse,
    const T* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    Dropout dropout)
{
    constexpr int R = ATTN_ROWS_PER_WARP;
    constexpr int KT = ATTN_KEY_TILE;
    // Output columns per lane: lane owns c = lane + 32·n for n < NC (guarded by c < d).
    constexpr int NC = HEAD_DIM > 0 ? (HEAD_DIM + 31) / 32 : ATTN_MAX_HEAD_DIM / 32;
    const int d = HEAD_DIM > 0 ? HEAD_DIM : hidden / heads;
    const int d4 = (d + 3) >> 2;
    const int ldq = attn_ldq(d);
    const int ldk = attn_ldk(d);

    const int lane = threadIdx.x;
    const int warp = threadIdx.y;
    const int n_warps = blockDim.y;
    const int rows_per_block = n_warps * R;
    const int q_tiles = (seq + rows_per_block - 1) / rows_per_block;
    const int bh = blockIdx.x / q_tiles;
    const int q0 = (blockIdx.x - bh * q_tiles) * rows_per_block;
    const int b = bh / heads;
    const int h = bh - b * heads;

    float* ks = smem;                    // [KT][ldk]
    float* vs = ks + KT * ldk;           // [KT][ldq]
    float* qs = vs + KT * ldq;           // [rows_per_block][ldq]
    float* ps = qs + rows_per_block * ldq;  // [rows_per_block][KT]

    // 64-bit offsets: B·T·3H may exceed 2^31 elements.
    const size_t ld_in = 3 * (size_t)hidden;
    const T* q_base = qkv + (size_t)b * (size_t)seq * ld_in + (size_t)h * (size_t)d;
    const T* k_base = q_base + hidden;
    const T* v_base = q_base + 2 * (size_t)hidden;
    const float* mask_row = mask_bias + (size_t)(b % mask_rows) * (size_t)seq;

    // Q rows of the block, zero past T and in the float4 padding columns.
    for (int r = warp; r < rows_per_block; r += n_warps) {
        const int t = q0 + r;
        for (int c = lane; c < ldq; c += 32) {
            qs[r * ldq + c] = (t < seq && c < d) ? attn_load(q_base + (size_t)t * ld_in + c) : 0.0f;
        }
    }

    const int row0 = q0 + warp * R;      // this warp's first query row
    const bool warp_live = row0 < seq;  // warp-uniform
    float m[R], l[R], acc[R][NC];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        m[r] = attn_neg_inf();
        l[r] = 0.0f;
#pragma unroll
        for (int n = 0; n < NC; ++n) {
            acc[r][n] = 0.0f;
        }
    }
    const AttnVec4* q4 = reinterpret_cast<const AttnVec4*>(qs + warp * R * ldq);
    const AttnVec4* k4 = reinterpret_cast<const AttnVec4*>(ks + lane * ldk);
    const int ldq4 = ldq >> 2;

    for (int j0 = 0; j0 < seq; j0 += KT) {
        // The previous tile's K, V and probabilities are consumed (and Q is written, first time).
        __syncthreads();
        for (int jj = warp; jj < KT; jj += n_warps) {
            const int j = j0 + jj;
            const bool in = j < seq;
            const T* kr = k_base + (size_t)(in ? j : 0) * ld_in;
            const T* vr = v_base + (size_t)(in ? j : 0) * ld_in;
            for (int c = lane; c < ldq; c += 32) {
                const bool ok = in && c < d;
                ks[jj * ldk + c] = ok ? attn_load(kr + c) : 0.0f;
                vs[jj * ldq + c] = ok ? attn_load(vr + c) : 0.0f;
            }
        }
        __syncthreads();
        if (!warp_live) {
            continue;
        }

        // Scores: lane = key j0 + lane, against the warp's R query rows.
        float s[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            s[r] = 0.0f;
        }
#pragma unroll (HEAD_DIM > 0 ? (HEAD_DIM + 3) / 4 : 4)
        for (int c4 = 0; c4 < d4; ++c4) {
            const AttnVec4 kv = k4[c4];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const AttnVec4 qv = q4[r * ldq4 + c4];
                s[r] = fmaf(qv.x, kv.x, s[r]);
                s[r] = fmaf(qv.y, kv.y, s[r]);
                s[r] = fmaf(qv.z, kv.z, s[r]);
                s[r] = fmaf(qv.w, kv.w, s[r]);
            }
        }
        const int j = j0 + lane;
        const bool key_in = j < seq;
        const float bias = key_in ? mask_row[j] : 0.0f;
        float tile_max[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            s[r] = key_in ? attn_mul_rn(s[r], scale) + bias : attn_neg_inf();
            tile_max[r] = s[r];
        }
        attn_warp_allreduce4(tile_max, AttnMax());

        // Online softmax update; m is warp-uniform, l per lane.
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float m_new = fmaxf(m[r], tile_max[r]);
            // While every score so far is -inf, subtract 0 instead: exp(-inf - 0) = 0, not NaN.
            const float m_ref = m_new == attn_neg_inf() ? 0.0f : m_new;
            const float alpha = expf(m[r] - m_ref);
            const float p = expf(s[r] - m_ref);
            l[r] = fmaf(l[r], alpha, p);
#pragma unroll
            for (int n = 0; n < NC; ++n) {
                acc[r][n] *= alpha;
            }
            m[r] = m_new;
            ps[(warp * R + r) * KT + lane] = dropout(p, b, h, row0 + r, j);
        }
        __syncwarp();

        // acc += P·V over this tile's keys (p = 0 and V rows = 0 past T, so rounding the key
        // count up to a multiple of 4 adds exact zeros).
        const int n_keys4 = ((seq - j0 < KT ? seq - j0 : KT) + 3) >> 2;
        const AttnVec4* p4 = reinterpret_cast<const AttnVec4*>(ps + warp * R * KT);
#pragma unroll 2
        for (int g = 0; g < n_keys4; ++g) {
            AttnVec4 pv[R];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                pv[r] = p4[r * (KT / 4) + g];
            }
            const float* v0 = vs + (4 * g) * ldq + lane;
#pragma unroll
            for (int n = 0; n < NC; ++n) {
                if (HEAD_DIM > 0 || lane + 32 * n < d) {
                    const float a0 = v0[32 * n], a1 = v0[ldq + 32 * n], a2 = v0[2 * ldq + 32 * n], a3 = v0[3 * ldq + 32 * n];
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        float x = acc[r][n];
                        x = fmaf(pv[r].x, a0, x);
                        x = fmaf(pv[r].y, a1, x);
                        x = fmaf(pv[r].z, a2, x);
                        x = fmaf(pv[r].w, a3, x);
                        acc[r][n] = x;
                    }
                }
            }
        }
    }

    if (!warp_live) {
        return;  // no barrier follows
    }
    attn_warp_allreduce4(l, AttnSum());
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int row = row0 + r;
        if (row >= seq) {
            continue;
        }
        // Every key -inf: the reference's softmax is 0/0 (NaN); so is ours, explicitly.
        const bool dead = m[r] == attn_neg_inf();
        const float inv = 1.0f / l[r];
        T* out = ctx + ((size_t)b * (size_t)seq + (size_t)row) * (size_t)hidden + (size_t)h * (size_t)d;
#pragma unroll
        for (int n = 0; n < NC; ++n) {
            const int c = lane + 32 * n;
            if (HEAD_DIM > 0 || c < d) {
                attn_store(out + c, dead ? attn_nan() : acc[r][n] * inv);
            }
        }
        if (lane == 0) {
            lse[((size_t)b * (size_t)heads + (size_t)h) * (size_t)seq + (size_t)row] = dead ? attn_nan() : m[r] + logf(l[r]);
        }
    }
}

// ---- forward kernels ------------------------------------------------------------------------
// ctx: [B, T, H]; lse: [B, heads, T]; qkv: [B, T, 3H]; mask_bias: [mask_rows, T];
// scale = 1/sqrt(H / heads). Launch: grid.x = B · heads · ceil(T / (4·blockDim.y)),
// block (32, 1..=8), dynamic shared memory as in the header (src/cuda/attention.rs sizes it).

// Any head dim 1..=128.
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_forward_f32(
    float* __restrict__ ctx,
    float* __restrict__ lse,
    const float* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_forward_body<float, 0>(reinterpret_cast<float*>(attn_smem), ctx, lse, qkv, mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}

// Head dim 32 (MiniLM): hidden == 32 · heads.
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_forward_f32_d32(
    float* __restrict__ ctx,
    float* __restrict__ lse,
    const float* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_forward_body<float, 32>(reinterpret_cast<float*>(attn_smem), ctx, lse, qkv, mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}

// Head dim 64 (BERT-base): hidden == 64 · heads.
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_forward_f32_d64(
    float* __restrict__ ctx,
    float* __restrict__ lse,
    const float* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_forward_body<float, 64>(reinterpret_cast<float*>(attn_smem), ctx, lse, qkv, mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}

// bf16 storage (_bf16io): qkv and ctx in bf16 as raw bits, mask_bias and lse f32; the kernels
// above with T = bf16_raw (same parameters, same launch).
// Any head dim 1..=128.
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_forward_bf16io(
    unsigned short* __restrict__ ctx,
    float* __restrict__ lse,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_forward_body<bf16_raw, 0>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<bf16_raw*>(ctx), lse, reinterpret_cast<const bf16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}

// Head dim 32.
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_forward_bf16io_d32(
    unsigned short* __restrict__ ctx,
    float* __restrict__ lse,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_forward_body<bf16_raw, 32>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<bf16_raw*>(ctx), lse, reinterpret_cast<const bf16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}

// Head dim 64.
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_forward_bf16io_d64(
    unsigned short* __restrict__ ctx,
    float* __restrict__ lse,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_forward_body<bf16_raw, 64>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<bf16_raw*>(ctx), lse, reinterpret_cast<const bf16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}

// f16 twin of attention_forward_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_forward_f16io(
    unsigned short* __restrict__ ctx,
    float* __restrict__ lse,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_forward_body<f16_raw, 0>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<f16_raw*>(ctx), lse, reinterpret_cast<const f16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}

// f16 twin of attention_forward_bf16io_d32 (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_forward_f16io_d32(
    unsigned short* __restrict__ ctx,
    float* __restrict__ lse,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_forward_body<f16_raw, 32>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<f16_raw*>(ctx), lse, reinterpret_cast<const f16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}

// f16 twin of attention_forward_bf16io_d64 (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_forward_f16io_d64(
    unsigned short* __restrict__ ctx,
    float* __restrict__ lse,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_forward_body<f16_raw, 64>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<f16_raw*>(ctx), lse, reinterpret_cast<const f16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}

// =================================================================================================
// ---- backward ---------------------------------------------------------------------------------
// =================================================================================================
//
// Semantics (the spec is bert_adapters::cpu::reference::attention_backward, Backend::
// attention_packed_backward): given dO = dctx [B, T, H], the packed Q, K, V of the forward, its
// ctx O [B, T, H] and row log-sum-exp lse [B, heads, T], write dqkv [B, T, 3H] (dQ, dK, dV as
// the column blocks [0, H), [H, 2H), [2H, 3H), ready for the QKV projection's backward). For
// batch row b, head h, query i, key j (s_ij exactly as the forward computes it):
//     p_ij  = exp(s_ij − lse_i) · c_i                  (c_i = 1 but on degenerate rows, below)
//     dV_j  = Σ_i p_ij · dO_i
//     dP_ij = dO_i · v_j
//     D_i   = dO_i · O_i        (= Σ_j p_ij dP_ij: the softmax Jacobian's row term)
//     dS_ij = p_ij · (dP_ij − D_i)
//     dQ_i  = scale · Σ_j dS_ij k_j,   dK_j = scale · Σ_i dS_ij q_i
// Every element of dqkv is written (the whole output, padding tokens included).
//
// Three launches, no float atomics, every sum in a fixed order (bitwise reproducible run to run
// and on every executor schedule):
//   1. attention_backward_prep_f32 — warp per (b, h, i) row: D_i = dO_i·O_i from the forward's
//      ctx, and c_i, into rowstat [B, heads, T, 2]. Why D from O instead of recomputing
//      Σ_j p_ij dP_ij: O is saved anyway (it is the input of the attention output projection, whose
//      weight gradient needs it), and reading it is one pass over 2·T·d floats per (b, h), where the
//      recomputation is a full pass over all keys (two of the seven T²·d products below) before
//      any dK/dV work could start. O was normalised by the forward's own row sum, so D is
//      consistent with the normalised p.
//      c_i: the lse is an f32, so it carries an absolute rounding error of up to ulp(lse)/2, which
//      moves every p_ij of the row by that relative amount: ≤ 1.9e-6 while |lse| < 64 (any row
//      with an unmasked key and scores of sane size), but 4.9e-4 for a row whose every key is
//      padded with -10000 (lse ≈ -10000), and for a row padded with finfo.min everywhere the lse
//      rounds to finfo.min itself, so exp(s − lse) = 1 for every key instead of 1/T. The forward
//      treats such rows exactly (uniform weights), the CPU reference too; so for rows with
//      |lse| ≥ 64 the prep kernel sums l'_i = Σ_j exp(s_ij − lse_i) over all keys (the warp
//      computes each s_ij as the main kernels do, bit for bit) and stores c_i = 1/l'_i. That
//      pass is T·d work for a rare row; every other row gets c_i = 1 (exactly, so the product
//      p·c is the plain p). A NaN lse (every key masked with -inf: the forward's ctx and lse are
//      NaN, and so is the reference's whole (b, h) gradient) keeps c = 1 and the NaN flows
//      into dQ of its rows and dK, dV of every key, exactly where the reference is NaN.
//   2. attention_backward_dkv_f32 — block per (b, h, key tile of 32 keys), looping over query
//      tiles of 4W rows: dK and dV of its keys accumulate in registers over every query row
//      (flash-attention-2's outer loop over keys).
//   3. attention_backward_dq_f32 — block per (b, h, query tile of 4W rows), looping over key
//      tiles of 32: dQ of its rows accumulates in registers (the forward's shape).
// Passes 2 and 3 each recompute S and dP (7 T²·d products in all instead of 5 for a single
// pass): the price of determinism without a [T/32, B, T, H] partial-dQ buffer.
//
// Thread mapping, both main kernels (block (32, W)):
//   * phase 1, per pair of tiles: lane j scores key j of the tile against the warp's 4 query
//     rows and takes dP = dO·v_j the same way (float4 reads: K and V rows stride ldk, odd in
//     float4s, conflict-free; Q and dO reads are broadcasts), then p and dS to shared memory.
//   * dkv phase 2: warp w owns keys 32/W·w .. +32/W of the tile (W = 4 or 8: 8 or 4 keys), lane c
//     columns c, c+32, ...: dV[j][c] += p_ij·dO_i[c], dK[j][c] += dS_ij·q_i[c] over the tile's
//     rows (p and dS reads are float4 broadcasts, dO and Q reads consecutive). 2·8·⌈d/32⌉
//     accumulators per thread at most (64 for the generic kernel).
//   * dq phase 2: as the forward's P·V with dS for P and K for V; the warp reads only its own
//     rows of dS, so a __syncwarp separates the phases.
//   Rows past T and keys past T compute on zero-filled tiles with p = dS = 0 forced, and are not
//   stored; a warp whose rows all lie past T skips phase 1 but meets every __syncthreads.
//
// Head dim: _f32, _bf16io and _f16io take any d in 1..=128; _d32 and _d64 are the same body with d a constant
// (same operations in the same order, so bitwise equal to the generic kernel; tests check it).
//
// Storage: the bodies are templated on T, the type of dctx, qkv, ctx and dqkv (attn_load /
// attn_store as in the forward):
//   * _f32 (attention_backward_prep_f32, attention_backward_{dkv,dq}[_dropout]_f32[_d32|_d64]):
//     all f32.
//   * _bf16io (attention_backward_prep_bf16io, attention_backward_{dkv,dq}[_dropout]_bf16io
//     [_d32|_d64]): T = bf16_raw, by the forward's conventions per buffer:
//       - dctx (dO), qkv and ctx (O) are activations: bf16, read as raw bits and widened exactly
//         (dO is the bf16 gradient of the next op; qkv and ctx are what the _bf16io forward
//         saved);
//       - dqkv is an activation gradient: bf16, each element rounded once (RNE) from the same f32
//         accumulator (dK·scale, dV, dQ·scale) the _f32 kernel stores;
//       - lse (the forward's f32 output), the mask and rowstat (D, c) stay f32: they are
//         statistics, and D must not be rounded before it is subtracted from dP.
//     Shared-memory tiles stay f32 (the widened values), so the plans, sizes and launches are the
//     _f32 kernels'. Every score, p, dP, D, c, dS and accumulator comes from the same f32
//     operations in the same order as in the _f32 kernel fed the widened values, so dqkv_bf16io
//     = bf16(dqkv_f32 on the widened inputs): bit for bit on the executor, within one bf16 ulp
//     on a GPU (NVRTC compiles the instantiations separately); tests/cuda_bf16_attention.rs.
//     Error against the f32/f64 gradient on the same bf16 inputs: the one rounding of dqkv
//     (2^-9 relative), plus D taken from the bf16 ctx: |δD| ≤ 2^-9·Σ_c|dO_c·O_c|, which moves
//     dS_ij by p_ij·δD (Σ_j p_ij = 1) and dQ, dK by scale·Σ p·δD·|k| — the size of one bf16
//     rounding of a dP-sized term, where a plain bf16 backward (PyTorch eager: P, dP, dS and the
//     gradient each rounded to bf16) carries four. The tests hold it to twice the plain error.
//     ptxas (NVRTC 13.0, tests/nvrtc_compile.rs), registers sm_80 / sm_90, no spills: prep 40 / 40
//     (f32: 32); dkv generic 140 / 138, d32 80 / 78, d64 94 / 96; dq generic 76 / 79, d32 64 / 80,
//     d64 80 / 64; dropout dkv 140 / 142, 80 / 80, 98 / 96; dropout dq 98 / 80, 64 / 80, 80 / 80
//     (the _f32 twins' counts within ±4, except dkv_dropout_d64 on sm_80: 128 for f32).
//   * _f16io (attention_backward_prep_f16io, attention_backward_{dkv,dq}[_dropout]_f16io
//     [_d32|_d64]): the same with T = f16_raw: dqkv_f16io = f16(dqkv_f32 on the widened
//     inputs), the bound above with f16's 2^-11 in place of 2^-9 (within f16's range);
//     __launch_bounds__(·, 1) as the forward's _f16io kernels, for the same reason. Registers
//     sm_80 / sm_90, no spills: prep 32 / 31; dkv generic 180 / 185, d32 120 / 120, d64 130 / 130;
//     dq 127 / 130, 114 / 116, 112 / 112; dropout dkv 199 / 204, 144 / 142, 160 / 156; dropout dq
//     144 / 152, 122 / 124, 128 / 128.
//
// Memory (dynamic shared, floats; ldq, ldk as the forward's): K and V tiles 2·32·ldk, Q and dO
// tiles 2·4W·ldq, p and dS 2·4W·32 (dq: dS only), row stats 4·4W. d = 64, W = 4: 30 KiB (dkv),
// 28 KiB (dq); d = 128 needs 53 KiB with W = 4 and 73.5 KiB with W = 8: above 48 KiB the
// launcher opts in (Gpu::allow_dynamic_shared; every sm_80+ GPU allows 99 KiB or more).
//
// Numerics (f32): s is bitwise the forward's score (same fma chain, same rounding of the scaled
// score before the mask add), so p = exp(s − lse) is the forward's softmax weight up to the lse's
// rounding (≤ 1.9e-6 relative with |lse| < 64; exact normalisation above, see c_i). dP and D are
// d-term fma chains; dS = p·(dP − D) inherits their absolute error ≈ √d·2^-24·|dO|·|v| times
// p ≤ 1. dV, dK are sums over ≤ 512 query rows, dQ over ≤ 512 keys, of bounded terms: relative
// error about √T·2^-24 ≈ 1.4e-6 of the sum of magnitudes in practice. The tests hold every
// gradient to 1e-4·(1 + max|ref|) against the f64 reference and report the margin.
//
// Dropout: the policy's factor f_ij (0 or 1/(1−rate), the same Philox draw as the forward's)
// multiplies p for dV and dP for dS (dS = p·(f·dP − D); D = dO·O already includes it):
// AttnBwdNoDropout, and AttnBwdPhiloxDropout in the _dropout kernels (f32, bf16io and f16io).

#define ATTN_BWD_PREP_WARPS 8
// Rows with |lse| at or above this get their normaliser recomputed (see c_i above).
#define ATTN_BWD_EXACT_LSE 64.0f

// The factor the kept probability p_ij is multiplied with (1 without dropout).
struct AttnBwdNoDropout {
    __device__ __forceinline__ float operator()(int /*b*/, int /*h*/, int /*i*/, int /*j*/) const { return 1.0f; }
    // The factor of a kept key (every key is).
    __device__ __forceinline__ float kept() const { return 1.0f; }
    __device__ __forceinline__ void factor4(int b, int h, int i, int j0, float (&f)[4]) const { AttnNoDropout().factor4(b, h, i, j0, f); }
};

// The forward's Philox factor, drawn again.
struct AttnBwdPhiloxDropout {
    AttnPhilox d;
    __device__ __forceinline__ float operator()(int b, int h, int i, int j) const { return d.factor(b, h, i, j); }
    // The factor of a kept key: 1/(1 - rate).
    __device__ __forceinline__ float kept() const { return d.scale; }
    __device__ __forceinline__ void factor4(int b, int h, int i, int j0, float (&f)[4]) const { d.factor4(b, h, i, j0, f); }
};

// Phase 1's dot products for this lane's key: s[r] = q_r·k and g[r] = dO_r·v for the warp's 4
// query rows. q4/o4: the warp's first Q/dO row in shared memory (rows ldq4 float4s apart);
// k4/v4: this lane's K/V row. The fma order is the forward's score loop, so s is bitwise its s.
template <int HEAD_DIM>
__device__ __forceinline__ void attn_bwd_dots(
    float (&s)[ATTN_ROWS_PER_WARP],
    float (&g)[ATTN_ROWS_PER_WARP],
    const AttnVec4* q4,
    const AttnVec4* o4,
    int ldq4,
    const AttnVec4* k4,
    const AttnVec4* v4,
    int d4)
{
    constexpr int R = ATTN_ROWS_PER_WARP;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        s[r] = 0.0f;
        g[r] = 0.0f;
    }
#pragma unroll (HEAD_DIM > 0 ? (HEAD_DIM + 3) / 4 : 2)
    for (int c4 = 0; c4 < d4; ++c4) {
        const AttnVec4 kv = k4[c4];
        const AttnVec4 vv = v4[c4];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const AttnVec4 qv = q4[r * ldq4 + c4];
            s[r] = fmaf(qv.x, kv.x, s[r]);
            s[r] = fmaf(qv.y, kv.y, s[r]);
            s[r] = fmaf(qv.z, kv.z, s[r]);
            s[r] = fmaf(qv.w, kv.w, s[r]);
            const AttnVec4 ov = o4[r * ldq4 + c4];
            g[r] = fmaf(ov.x, vv.x, g[r]);
            g[r] = fmaf(ov.y, vv.y, g[r]);
            g[r] = fmaf(ov.z, vv.z, g[r]);
            g[r] = fmaf(ov.w, vv.w, g[r]);
        }
    }
}

// Copies rows [t0, t0 + rows) of Q and dO of (b, h) into shared memory (zero past T and in the
// float4 padding), and each row's (lse, D, c) into rs; warp per row, lane per column.
template <typename T>
__device__ __forceinline__ void attn_bwd_load_rows(
    float* __restrict__ qs,
    float* __restrict__ os,
    AttnVec4* __restrict__ rs,
    const T* __restrict__ q_base,
    const T* __restrict__ o_base,
    const float* __restrict__ lse_row,
    const float* __restrict__ stat_row,
    int t0,
    int rows,
    int seq,
    int d,
    int ldq,
    size_t ld_in,
    size_t ld_o)
{
    const int lane = threadIdx.x;
    for (int r = threadIdx.y; r < rows; r += blockDim.y) {
        const int t = t0 + r;
        const bool in = t < seq;
        for (int c = lane; c < ldq; c += 32) {
            const bool ok = in && c < d;
            qs[r * ldq + c] = ok ? attn_load(q_base + (size_t)t * ld_in + c) : 0.0f;
            os[r * ldq + c] = ok ? attn_load(o_base + (size_t)t * ld_o + c) : 0.0f;
        }
        if (lane == 0) {
            AttnVec4 st;
            st.x = in ? lse_row[t] : 0.0f;
            st.y = in ? stat_row[2 * t] : 0.0f;
            st.z = in ? stat_row[2 * t + 1] : 0.0f;
            st.w = 0.0f;
            rs[r] = st;
        }
    }
}

// Copies keys [j0, j0 + 32) of K and V of (b, h) into shared memory (rows ldk apart), zero past
// T and in the padding; warp per row, lane per column.
template <typename T>
__device__ __forceinline__ void attn_bwd_load_keys(
    float* __restrict__ ks,
    float* __restrict__ vs,
    const T* __restrict__ k_base,
    const T* __restrict__ v_base,
    int j0,
    int seq,
    int d,
    int ldk,
    size_t ld_in)
{
    for (int jj = threadIdx.y; jj < ATTN_KEY_TILE; jj += blockDim.y) {
        const int j = j0 + jj;
        const bool in = j < seq;
        const T* kr = k_base + (size_t)(in ? j : 0) * ld_in;
        const T* vr = v_base + (size_t)(in ? j : 0) * ld_in;
        for (int c = threadIdx.x; c < ldk; c += 32) {
            const bool ok = in && c < d;
            ks[jj * ldk + c] = ok ? attn_load(kr + c) : 0.0f;
            vs[jj * ldk + c] = ok ? attn_load(vr + c) : 0.0f;
        }
    }
}

// Phase 1 for this lane's key j against the warp's 4 rows row0.. (rs: their (lse, D, c)):
// p (times the dropout factor: what multiplies dO_i in dV) and dS, both 0 for a row or key past T.
template <typename Dropout>
__device__ __forceinline__ void attn_bwd_probs(
    float (&pd)[ATTN_ROWS_PER_WARP],
    float (&ds)[ATTN_ROWS_PER_WARP],
    const float (&s)[ATTN_ROWS_PER_WARP],
    const float (&g)[ATTN_ROWS_PER_WARP],
    const AttnVec4* rs,
    int row0,
    int j,
    bool key_in,
    float bias,
    int seq,
    float scale,
    int b,
    int h,
    Dropout dropout)
{
#pragma unroll
    for (int r = 0; r < ATTN_ROWS_PER_WARP; ++r) {
        const int i = row0 + r;
        const bool live = key_in && i < seq;
        const AttnVec4 st = rs[r];
        const float sc = attn_mul_rn(s[r], scale) + bias;
        const float p = live ? expf(sc - st.x) * st.z : 0.0f;
        const float f = dropout(b, h, i, j);
        pd[r] = p * f;
        ds[r] = live ? p * (g[r] * f - st.y) : 0.0f;
    }
}

// The dK/dV kernel body; see the section header. HEAD_DIM as the forward's.
template <typename T, int HEAD_DIM, typename Dropout>
__device__ __forceinline__ void attention_backward_dkv_body(
    float* __restrict__ smem,
    T* __restrict__ dqkv,
    const T* __restrict__ dctx,
    const T* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    Dropout dropout)
{
    constexpr int R = ATTN_ROWS_PER_WARP;
    constexpr int KT = ATTN_KEY_TILE;
    constexpr int NC = HEAD_DIM > 0 ? (HEAD_DIM + 31) / 32 : ATTN_MAX_HEAD_DIM / 32;
    constexpr int KPW = KT / 4;  // keys per warp in phase 2 with the fewest warps (4)
    const int d = HEAD_DIM > 0 ? HEAD_DIM : hidden / heads;
    const int d4 = (d + 3) >> 2;
    const int ldq = attn_ldq(d);
    const int ldk = attn_ldk(d);

    const int lane = threadIdx.x;
    const int warp = threadIdx.y;
    const int n_warps = blockDim.y;  // 4 or 8
    const int kpw = KT / n_warps;    // 8 or 4
    const int rows_per_tile = n_warps * R;
    const int k_tiles = (seq + KT - 1) / KT;
    const int bh = blockIdx.x / k_tiles;
    const int j0 = (blockIdx.x - bh * k_tiles) * KT;
    const int b = bh / heads;
    const int h = bh - b * heads;

    float* ks = smem;                          // [KT][ldk]
    float* vs = ks + KT * ldk;                 // [KT][ldk]
    float* qs = vs + KT * ldk;                 // [rows_per_tile][ldq]
    float* os = qs + rows_per_tile * ldq;      // [rows_per_tile][ldq]  (dO)
    float* ps = os + rows_per_tile * ldq;      // [rows_per_tile][KT]   (p·f)
    float* dss = ps + rows_per_tile * KT;      // [rows_per_tile][KT]   (dS)
    AttnVec4* rs = reinterpret_cast<AttnVec4*>(dss + rows_per_tile * KT);  // [rows_per_tile]

    const size_t ld_in = 3 * (size_t)hidden;
    const size_t head_off = (size_t)h * (size_t)d;
    const T* q_base = qkv + (size_t)b * (size_t)seq * ld_in + head_off;
    const T* k_base = q_base + hidden;
    const T* v_base = q_base + 2 * (size_t)hidden;
    const T* o_base = dctx + (size_t)b * (size_t)seq * (size_t)hidden + head_off;
    const float* mask_row = mask_bias + (size_t)(b % mask_rows) * (size_t)seq;
    const float* lse_row = lse + (size_t)bh * (size_t)seq;
    const float* stat_row = rowstat + 2 * (size_t)bh * (size_t)seq;

    attn_bwd_load_keys(ks, vs, k_base, v_base, j0, seq, d, ldk, ld_in);

    float dv[KPW][NC], dk[KPW][NC];
#pragma unroll
    for (int kk = 0; kk < KPW; ++kk) {
#pragma unroll
        for (int n = 0; n < NC; ++n) {
            dv[kk][n] = 0.0f;
            dk[kk][n] = 0.0f;
        }
    }
    const int j = j0 + lane;
    const bool key_in = j < seq;
    const float bias = key_in ? mask_row[j] : 0.0f;
    const AttnVec4* k4 = reinterpret_cast<const AttnVec4*>(ks + lane * ldk);
    const AttnVec4* v4 = reinterpret_cast<const AttnVec4*>(vs + lane * ldk);
    const int ldq4 = ldq >> 2;

    for (int i0 = 0; i0 < seq; i0 += rows_per_tile) {
        // The previous query tile is consumed (and K, V are written, first time).
        __syncthreads();
        attn_bwd_load_rows(qs, os, rs, q_base, o_base, lse_row, stat_row, i0, rows_per_tile, seq, d, ldq, ld_in, (size_t)hidden);
        __syncthreads();

        const int row0 = i0 + warp * R;
        if (row0 < seq) {  // warp-uniform
            float s[R], g[R], pd[R], ds[R];
            attn_bwd_dots<HEAD_DIM>(s, g, reinterpret_cast<const AttnVec4*>(qs + warp * R * ldq), reinterpret_cast<const AttnVec4*>(os + warp * R * ldq), ldq4, k4, v4, d4);
            attn_bwd_probs(pd, ds, s, g, rs + warp * R, row0, j, key_in, bias, seq, scale, b, h, dropout);
#pragma unroll
            for (int r = 0; r < R; ++r) {
                ps[(warp * R + r) * KT + lane] = pd[r];
                dss[(warp * R + r) * KT + lane] = ds[r];
            }
        }
        __syncthreads();

        // Phase 2: this warp's keys kpw·warp .. +kpw, lane's columns; over the tile's live rows.
        const int n_rows = seq - i0 < rows_per_tile ? seq - i0 : rows_per_tile;
        const AttnVec4* p4 = reinterpret_cast<const AttnVec4*>(ps + warp * kpw);
        const AttnVec4* s4 = reinterpret_cast<const AttnVec4*>(dss + warp * kpw);
        for (int ii = 0; ii < n_rows; ++ii) {
            float pv[KPW], sv[KPW];
#pragma unroll
            for (int q = 0; q < KPW / 4; ++q) {
                AttnVec4 a, c;
                a.x = a.y = a.z = a.w = 0.0f;
                c = a;
                if (4 * q < kpw) {
                    a = p4[ii * (KT / 4) + q];
                    c = s4[ii * (KT / 4) + q];
                }
                pv[4 * q] = a.x;
                pv[4 * q + 1] = a.y;
                pv[4 * q + 2] = a.z;
                pv[4 * q + 3] = a.w;
                sv[4 * q] = c.x;
                sv[4 * q + 1] = c.y;
                sv[4 * q + 2] = c.z;
                sv[4 * q + 3] = c.w;
            }
#pragma unroll
            for (int n = 0; n < NC; ++n) {
                const int col = lane + 32 * n;
                if (HEAD_DIM > 0 || col < d) {
                    const float o = os[ii * ldq + col];
                    const float qv = qs[ii * ldq + col];
#pragma unroll
                    for (int kk = 0; kk < KPW; ++kk) {
                        if (kk < kpw) {
                            dv[kk][n] = fmaf(pv[kk], o, dv[kk][n]);
                            dk[kk][n] = fmaf(sv[kk], qv, dk[kk][n]);
                        }
                    }
                }
            }
        }
    }

#pragma unroll
    for (int kk = 0; kk < KPW; ++kk) {
        const int jk = j0 + warp * kpw + kk;
        if (kk >= kpw || jk >= seq) {
            continue;
        }
        T* out_k = dqkv + ((size_t)b * (size_t)seq + (size_t)jk) * ld_in + hidden + head_off;
        T* out_v = out_k + hidden;
#pragma unroll
        for (int n = 0; n < NC; ++n) {
            const int col = lane + 32 * n;
            if (HEAD_DIM > 0 || col < d) {
                attn_store(out_k + col, dk[kk][n] * scale);
                attn_store(out_v + col, dv[kk][n]);
            }
        }
    }
}

// The dQ kernel body; see the section header.
template <typename T, int HEAD_DIM, typename Dropout>
__device__ __forceinline__ void attention_backward_dq_body(
    float* __restrict__ smem,
    T* __restrict__ dqkv,
    const T* __restrict__ dctx,
    const T* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    Dropout dropout)
{
    constexpr int R = ATTN_ROWS_PER_WARP;
    constexpr int KT = ATTN_KEY_TILE;
    constexpr int NC = HEAD_DIM > 0 ? (HEAD_DIM + 31) / 32 : ATTN_MAX_HEAD_DIM / 32;
    const int d = HEAD_DIM > 0 ? HEAD_DIM : hidden / heads;
    const int d4 = (d + 3) >> 2;
    const int ldq = attn_ldq(d);
    const int ldk = attn_ldk(d);

    const int lane = threadIdx.x;
    const int warp = threadIdx.y;
    const int n_warps = blockDim.y;
    const int rows_per_block = n_warps * R;
    const int q_tiles = (seq + rows_per_block - 1) / rows_per_block;
    const int bh = blockIdx.x / q_tiles;
    const int q0 = (blockIdx.x - bh * q_tiles) * rows_per_block;
    const int b = bh / heads;
    const int h = bh - b * heads;

    float* ks = smem;                          // [KT][ldk]
    float* vs = ks + KT * ldk;                 // [KT][ldk]
    float* qs = vs + KT * ldk;                 // [rows_per_block][ldq]
    float* os = qs + rows_per_block * ldq;     // [rows_per_block][ldq]  (dO)
    float* dss = os + rows_per_block * ldq;    // [rows_per_block][KT]   (dS)
    AttnVec4* rs = reinterpret_cast<AttnVec4*>(dss + rows_per_block * KT);  // [rows_per_block]

    const size_t ld_in = 3 * (size_t)hidden;
    const size_t head_off = (size_t)h * (size_t)d;
    const T* q_base = qkv + (size_t)b * (size_t)seq * ld_in + head_off;
    const T* k_base = q_base + hidden;
    const T* v_base = q_base + 2 * (size_t)hidden;
    const T* o_base = dctx + (size_t)b * (size_t)seq * (size_t)hidden + head_off;
    const float* mask_row = mask_bias + (size_t)(b % mask_rows) * (size_t)seq;
    const float* lse_row = lse + (size_t)bh * (size_t)seq;
    const float* stat_row = rowstat + 2 * (size_t)bh * (size_t)seq;

    attn_bwd_load_rows(qs, os, rs, q_base, o_base, lse_row, stat_row, q0, rows_per_block, seq, d, ldq, ld_in, (size_t)hidden);

    const int row0 = q0 + warp * R;
    const bool warp_live = row0 < seq;  // warp-uniform
    float acc[R][NC];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int n = 0; n < NC; ++n) {
            acc[r][n] = 0.0f;
        }
    }
    const AttnVec4* q4 = reinterpret_cast<const AttnVec4*>(qs + warp * R * ldq);
    const AttnVec4* o4 = reinterpret_cast<const AttnVec4*>(os + warp * R * ldq);
    const AttnVec4* k4 = reinterpret_cast<const AttnVec4*>(ks + lane * ldk);
    const AttnVec4* v4 = reinterpret_cast<const AttnVec4*>(vs + lane * ldk);
    const int ldq4 = ldq >> 2;

    for (int j0 = 0; j0 < seq; j0 += KT) {
        // The previous key tile and dS are consumed (and Q, dO, rs are written, first time).
        __syncthreads();
        attn_bwd_load_keys(ks, vs, k_base, v_base, j0, seq, d, ldk, ld_in);
        __syncthreads();
        if (!warp_live) {
            continue;
        }
        const int j = j0 + lane;
        const bool key_in = j < seq;
        const float bias = key_in ? mask_row[j] : 0.0f;
        float s[R], g[R], pd[R], ds[R];
        attn_bwd_dots<HEAD_DIM>(s, g, q4, o4, ldq4, k4, v4, d4);
        attn_bwd_probs(pd, ds, s, g, rs + warp * R, row0, j, key_in, bias, seq, scale, b, h, dropout);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            dss[(warp * R + r) * KT + lane] = ds[r];
        }
        __syncwarp();

        // acc += dS·K over this tile's keys (dS = 0 and K rows = 0 past T).
        const int n_keys4 = ((seq - j0 < KT ? seq - j0 : KT) + 3) >> 2;
        const AttnVec4* d4s = reinterpret_cast<const AttnVec4*>(dss + warp * R * KT);
#pragma unroll 2
        for (int gq = 0; gq < n_keys4; ++gq) {
            AttnVec4 dv[R];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                dv[r] = d4s[r * (KT / 4) + gq];
            }
            const float* k0 = ks + (4 * gq) * ldk + lane;
#pragma unroll
            for (int n = 0; n < NC; ++n) {
                if (HEAD_DIM > 0 || lane + 32 * n < d) {
                    const float a0 = k0[32 * n], a1 = k0[ldk + 32 * n], a2 = k0[2 * ldk + 32 * n], a3 = k0[3 * ldk + 32 * n];
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        float x = acc[r][n];
                        x = fmaf(dv[r].x, a0, x);
                        x = fmaf(dv[r].y, a1, x);
                        x = fmaf(dv[r].z, a2, x);
                        x = fmaf(dv[r].w, a3, x);
                        acc[r][n] = x;
                    }
                }
            }
        }
    }

    if (!warp_live) {
        return;  // no barrier follows
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int row = row0 + r;
        if (row >= seq) {
            continue;
        }
        T* out = dqkv + ((size_t)b * (size_t)seq + (size_t)row) * ld_in + head_off;
#pragma unroll
        for (int n = 0; n < NC; ++n) {
            const int col = lane + 32 * n;
            if (HEAD_DIM > 0 || col < d) {
                attn_store(out + col, acc[r][n] * scale);
            }
        }
    }
}

// ---- backward kernels -----------------------------------------------------------------------
// rowstat: [B, heads, T, 2] (D, c), written by the prep kernel and read by the other two;
// dqkv: [B, T, 3H]; dctx, ctx: [B, T, H]; qkv: [B, T, 3H]; lse: [B, heads, T];
// mask_bias: [mask_rows, T]; scale = 1/sqrt(H / heads); rows = B · heads · T.

// The prep kernel's body (T: the storage type of dctx, ctx and qkv; rowstat, lse and the mask
// stay f32).
template <typename T>
__device__ __forceinline__ void attention_backward_prep_body(
    float* __restrict__ rowstat,
    const T* __restrict__ dctx,
    const T* __restrict__ ctx,
    const T* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ mask_bias,
    int rows,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    const int lane = threadIdx.x;
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) {
        return;  // warp-uniform; no barrier in this kernel
    }
    const int d = hidden / heads;
    const int bh = row / seq;
    const int i = row - bh * seq;
    const int b = bh / heads;
    const int h = bh - b * heads;
    const size_t head_off = (size_t)h * (size_t)d;
    const size_t o_off = ((size_t)b * (size_t)seq + (size_t)i) * (size_t)hidden + head_off;

    float dot = 0.0f;
    for (int c = lane; c < d; c += 32) {
        dot = fmaf(attn_load(dctx + o_off + c), attn_load(ctx + o_off + c), dot);
    }
    const float D = warp_sum(dot);

    const float L = lse[row];
    float c_row = 1.0f;
    if (fabsf(L) >= ATTN_BWD_EXACT_LSE) {  // warp-uniform; false for NaN
        const size_t ld_in = 3 * (size_t)hidden;
        const T* q = qkv + ((size_t)b * (size_t)seq + (size_t)i) * ld_in + head_off;
        const T* k_base = qkv + (size_t)b * (size_t)seq * ld_in + hidden + head_off;
        const float* mask_row = mask_bias + (size_t)(b % mask_rows) * (size_t)seq;
        const int dpad = attn_ldq(d);
        float l = 0.0f;
        for (int j = lane; j < seq; j += 32) {
            const T* k = k_base + (size_t)j * ld_in;
            // The main kernels' fma chain: columns 0..dpad in order, zeros past d.
            float s = 0.0f;
            for (int c = 0; c < dpad; ++c) {
                const bool ok = c < d;
                s = fmaf(ok ? attn_load(q + c) : 0.0f, ok ? attn_load(k + c) : 0.0f, s);
            }
            l += expf(attn_mul_rn(s, scale) + mask_row[j] - L);
        }
        c_row = 1.0f / warp_sum(l);
    }
    if (lane == 0) {
        rowstat[2 * (size_t)row] = D;
        rowstat[2 * (size_t)row + 1] = c_row;
    }
}

// Launch: grid.x = ceil(rows / 8), block (32, 8), no dynamic shared memory.
extern "C" __global__ __launch_bounds__(32 * ATTN_BWD_PREP_WARPS) void attention_backward_prep_f32(
    float* __restrict__ rowstat,
    const float* __restrict__ dctx,
    const float* __restrict__ ctx,
    const float* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ mask_bias,
    int rows,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    attention_backward_prep_body<float>(rowstat, dctx, ctx, qkv, lse, mask_bias, rows, seq, hidden, heads, mask_rows, scale);
}

// bf16 storage: dctx, ctx and qkv in bf16 (raw bits, widened exactly on load); same launch.
extern "C" __global__ __launch_bounds__(32 * ATTN_BWD_PREP_WARPS) void attention_backward_prep_bf16io(
    float* __restrict__ rowstat,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ ctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ mask_bias,
    int rows,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    attention_backward_prep_body<bf16_raw>(rowstat, reinterpret_cast<const bf16_raw*>(dctx), reinterpret_cast<const bf16_raw*>(ctx), reinterpret_cast<const bf16_raw*>(qkv), lse, mask_bias, rows, seq, hidden, heads, mask_rows, scale);
}

// f16 twin of attention_backward_prep_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_BWD_PREP_WARPS) void attention_backward_prep_f16io(
    float* __restrict__ rowstat,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ ctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ mask_bias,
    int rows,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    attention_backward_prep_body<f16_raw>(rowstat, reinterpret_cast<const f16_raw*>(dctx), reinterpret_cast<const f16_raw*>(ctx), reinterpret_cast<const f16_raw*>(qkv), lse, mask_bias, rows, seq, hidden, heads, mask_rows, scale);
}

// Launch: grid.x = B · heads · ceil(T / 32), block (32, 4 or 8), dynamic shared memory
// (2·32·ldk + 2·4W·ldq + 2·4W·32 + 4·4W) floats (src/cuda/attention.rs sizes it).
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dkv_f32(
    float* __restrict__ dqkv,
    const float* __restrict__ dctx,
    const float* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dkv_body<float, 0>(reinterpret_cast<float*>(attn_smem), dqkv, dctx, qkv, lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdNoDropout());
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dkv_f32_d32(
    float* __restrict__ dqkv,
    const float* __restrict__ dctx,
    const float* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dkv_body<float, 32>(reinterpret_cast<float*>(attn_smem), dqkv, dctx, qkv, lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdNoDropout());
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dkv_f32_d64(
    float* __restrict__ dqkv,
    const float* __restrict__ dctx,
    const float* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dkv_body<float, 64>(reinterpret_cast<float*>(attn_smem), dqkv, dctx, qkv, lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdNoDropout());
}

// Launch: grid.x = B · heads · ceil(T / 4W), block (32, W = 1..=8), dynamic shared memory
// (2·32·ldk + 2·4W·ldq + 4W·32 + 4·4W) floats.
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dq_f32(
    float* __restrict__ dqkv,
    const float* __restrict__ dctx,
    const float* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dq_body<float, 0>(reinterpret_cast<float*>(attn_smem), dqkv, dctx, qkv, lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdNoDropout());
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dq_f32_d32(
    float* __restrict__ dqkv,
    const float* __restrict__ dctx,
    const float* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dq_body<float, 32>(reinterpret_cast<float*>(attn_smem), dqkv, dctx, qkv, lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdNoDropout());
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dq_f32_d64(
    float* __restrict__ dqkv,
    const float* __restrict__ dctx,
    const float* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dq_body<float, 64>(reinterpret_cast<float*>(attn_smem), dqkv, dctx, qkv, lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdNoDropout());
}

// ---- training (probability dropout) kernels --------------------------------------------------
// The kernels above with the Philox policy (AttnPhiloxDropout / AttnBwdPhiloxDropout): the same
// parameters, then the seed ([2] buffer, or seed_lo/hi when it is null), stream << 8, the packed
// block ids, batch rows per dropout block, the integer threshold, the keep scale and the stream
// offset of each block's first probability (DropoutSpec::offset).

// ", 1": the generic head dimension with the Philox policy needs ~150 registers; without it ptxas
// squeezes to 128 for a second resident block and spills (sm_80).
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS, 1) void attention_forward_dropout_f32(
    float* __restrict__ ctx,
    float* __restrict__ lse,
    const float* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_forward_body<float, 0>(reinterpret_cast<float*>(attn_smem), ctx, lse, qkv, mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_forward_dropout_f32_d32(
    float* __restrict__ ctx,
    float* __restrict__ lse,
    const float* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_forward_body<float, 32>(reinterpret_cast<float*>(attn_smem), ctx, lse, qkv, mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_forward_dropout_f32_d64(
    float* __restrict__ ctx,
    float* __restrict__ lse,
    const float* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_forward_body<float, 64>(reinterpret_cast<float*>(attn_smem), ctx, lse, qkv, mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// The three forward dropout kernels above with bf16 qkv and ctx (_bf16io, T = bf16_raw); ", 1"
// as for attention_forward_dropout_f32.
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS, 1) void attention_forward_dropout_bf16io(
    unsigned short* __restrict__ ctx,
    float* __restrict__ lse,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_forward_body<bf16_raw, 0>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<bf16_raw*>(ctx), lse, reinterpret_cast<const bf16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_forward_dropout_bf16io_d32(
    unsigned short* __restrict__ ctx,
    float* __restrict__ lse,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_forward_body<bf16_raw, 32>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<bf16_raw*>(ctx), lse, reinterpret_cast<const bf16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_forward_dropout_bf16io_d64(
    unsigned short* __restrict__ ctx,
    float* __restrict__ lse,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_forward_body<bf16_raw, 64>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<bf16_raw*>(ctx), lse, reinterpret_cast<const bf16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// f16 twin of attention_forward_dropout_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS, 1) void attention_forward_dropout_f16io(
    unsigned short* __restrict__ ctx,
    float* __restrict__ lse,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_forward_body<f16_raw, 0>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<f16_raw*>(ctx), lse, reinterpret_cast<const f16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// f16 twin of attention_forward_dropout_bf16io_d32 (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_forward_dropout_f16io_d32(
    unsigned short* __restrict__ ctx,
    float* __restrict__ lse,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_forward_body<f16_raw, 32>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<f16_raw*>(ctx), lse, reinterpret_cast<const f16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// f16 twin of attention_forward_dropout_bf16io_d64 (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_forward_dropout_f16io_d64(
    unsigned short* __restrict__ ctx,
    float* __restrict__ lse,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_forward_body<f16_raw, 64>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<f16_raw*>(ctx), lse, reinterpret_cast<const f16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dkv_dropout_f32(
    float* __restrict__ dqkv,
    const float* __restrict__ dctx,
    const float* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dkv_body<float, 0>(reinterpret_cast<float*>(attn_smem), dqkv, dctx, qkv, lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dkv_dropout_f32_d32(
    float* __restrict__ dqkv,
    const float* __restrict__ dctx,
    const float* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dkv_body<float, 32>(reinterpret_cast<float*>(attn_smem), dqkv, dctx, qkv, lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dkv_dropout_f32_d64(
    float* __restrict__ dqkv,
    const float* __restrict__ dctx,
    const float* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dkv_body<float, 64>(reinterpret_cast<float*>(attn_smem), dqkv, dctx, qkv, lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dq_dropout_f32(
    float* __restrict__ dqkv,
    const float* __restrict__ dctx,
    const float* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dq_body<float, 0>(reinterpret_cast<float*>(attn_smem), dqkv, dctx, qkv, lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dq_dropout_f32_d32(
    float* __restrict__ dqkv,
    const float* __restrict__ dctx,
    const float* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dq_body<float, 32>(reinterpret_cast<float*>(attn_smem), dqkv, dctx, qkv, lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dq_dropout_f32_d64(
    float* __restrict__ dqkv,
    const float* __restrict__ dctx,
    const float* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dq_body<float, 64>(reinterpret_cast<float*>(attn_smem), dqkv, dctx, qkv, lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// ---- bf16 storage backward kernels (_bf16io) -------------------------------------------------
// The six backward kernels above and their six dropout twins with T = bf16_raw: dqkv written in
// bf16 (each element rounded once, RNE, from the same f32 accumulator the _f32 kernel stores),
// dctx and qkv read as bf16 (widened exactly into the same f32 shared-memory tiles), lse, rowstat
// and the mask f32. Same parameters otherwise, same launch, same shared memory.

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dkv_bf16io(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dkv_body<bf16_raw, 0>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<bf16_raw*>(dqkv), reinterpret_cast<const bf16_raw*>(dctx), reinterpret_cast<const bf16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdNoDropout());
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dkv_bf16io_d32(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dkv_body<bf16_raw, 32>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<bf16_raw*>(dqkv), reinterpret_cast<const bf16_raw*>(dctx), reinterpret_cast<const bf16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdNoDropout());
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dkv_bf16io_d64(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dkv_body<bf16_raw, 64>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<bf16_raw*>(dqkv), reinterpret_cast<const bf16_raw*>(dctx), reinterpret_cast<const bf16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdNoDropout());
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dq_bf16io(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dq_body<bf16_raw, 0>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<bf16_raw*>(dqkv), reinterpret_cast<const bf16_raw*>(dctx), reinterpret_cast<const bf16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdNoDropout());
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dq_bf16io_d32(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dq_body<bf16_raw, 32>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<bf16_raw*>(dqkv), reinterpret_cast<const bf16_raw*>(dctx), reinterpret_cast<const bf16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdNoDropout());
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dq_bf16io_d64(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dq_body<bf16_raw, 64>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<bf16_raw*>(dqkv), reinterpret_cast<const bf16_raw*>(dctx), reinterpret_cast<const bf16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdNoDropout());
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dkv_dropout_bf16io(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dkv_body<bf16_raw, 0>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<bf16_raw*>(dqkv), reinterpret_cast<const bf16_raw*>(dctx), reinterpret_cast<const bf16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dkv_dropout_bf16io_d32(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dkv_body<bf16_raw, 32>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<bf16_raw*>(dqkv), reinterpret_cast<const bf16_raw*>(dctx), reinterpret_cast<const bf16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dkv_dropout_bf16io_d64(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dkv_body<bf16_raw, 64>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<bf16_raw*>(dqkv), reinterpret_cast<const bf16_raw*>(dctx), reinterpret_cast<const bf16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dq_dropout_bf16io(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dq_body<bf16_raw, 0>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<bf16_raw*>(dqkv), reinterpret_cast<const bf16_raw*>(dctx), reinterpret_cast<const bf16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dq_dropout_bf16io_d32(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dq_body<bf16_raw, 32>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<bf16_raw*>(dqkv), reinterpret_cast<const bf16_raw*>(dctx), reinterpret_cast<const bf16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dq_dropout_bf16io_d64(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dq_body<bf16_raw, 64>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<bf16_raw*>(dqkv), reinterpret_cast<const bf16_raw*>(dctx), reinterpret_cast<const bf16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// f16 twin of attention_backward_dkv_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dkv_f16io(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dkv_body<f16_raw, 0>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<f16_raw*>(dqkv), reinterpret_cast<const f16_raw*>(dctx), reinterpret_cast<const f16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdNoDropout());
}

// f16 twin of attention_backward_dkv_bf16io_d32 (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dkv_f16io_d32(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dkv_body<f16_raw, 32>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<f16_raw*>(dqkv), reinterpret_cast<const f16_raw*>(dctx), reinterpret_cast<const f16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdNoDropout());
}

// f16 twin of attention_backward_dkv_bf16io_d64 (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dkv_f16io_d64(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dkv_body<f16_raw, 64>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<f16_raw*>(dqkv), reinterpret_cast<const f16_raw*>(dctx), reinterpret_cast<const f16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdNoDropout());
}

// f16 twin of attention_backward_dq_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dq_f16io(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dq_body<f16_raw, 0>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<f16_raw*>(dqkv), reinterpret_cast<const f16_raw*>(dctx), reinterpret_cast<const f16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdNoDropout());
}

// f16 twin of attention_backward_dq_bf16io_d32 (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dq_f16io_d32(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dq_body<f16_raw, 32>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<f16_raw*>(dqkv), reinterpret_cast<const f16_raw*>(dctx), reinterpret_cast<const f16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdNoDropout());
}

// f16 twin of attention_backward_dq_bf16io_d64 (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dq_f16io_d64(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dq_body<f16_raw, 64>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<f16_raw*>(dqkv), reinterpret_cast<const f16_raw*>(dctx), reinterpret_cast<const f16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdNoDropout());
}

// f16 twin of attention_backward_dkv_dropout_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dkv_dropout_f16io(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dkv_body<f16_raw, 0>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<f16_raw*>(dqkv), reinterpret_cast<const f16_raw*>(dctx), reinterpret_cast<const f16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// f16 twin of attention_backward_dkv_dropout_bf16io_d32 (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dkv_dropout_f16io_d32(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dkv_body<f16_raw, 32>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<f16_raw*>(dqkv), reinterpret_cast<const f16_raw*>(dctx), reinterpret_cast<const f16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// f16 twin of attention_backward_dkv_dropout_bf16io_d64 (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dkv_dropout_f16io_d64(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dkv_body<f16_raw, 64>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<f16_raw*>(dqkv), reinterpret_cast<const f16_raw*>(dctx), reinterpret_cast<const f16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// f16 twin of attention_backward_dq_dropout_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dq_dropout_f16io(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dq_body<f16_raw, 0>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<f16_raw*>(dqkv), reinterpret_cast<const f16_raw*>(dctx), reinterpret_cast<const f16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// f16 twin of attention_backward_dq_dropout_bf16io_d32 (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dq_dropout_f16io_d32(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dq_body<f16_raw, 32>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<f16_raw*>(dqkv), reinterpret_cast<const f16_raw*>(dctx), reinterpret_cast<const f16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// f16 twin of attention_backward_dq_dropout_bf16io_d64 (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MAX_WARPS) void attention_backward_dq_dropout_f16io_d64(
    unsigned short* __restrict__ dqkv,
    const unsigned short* __restrict__ dctx,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ lse,
    const float* __restrict__ rowstat,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    extern __shared__ AttnVec4 attn_smem[];
    attention_backward_dq_body<f16_raw, 64>(reinterpret_cast<float*>(attn_smem), reinterpret_cast<f16_raw*>(dqkv), reinterpret_cast<const f16_raw*>(dctx), reinterpret_cast<const f16_raw*>(qkv), lse, rowstat, mask_bias, seq, hidden, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// =================================================================================================
// ---- the GEMM path: attention as batched tensor-core GEMMs plus row kernels ---------------------
// =================================================================================================
//
// The same semantics as the fused kernels above (forward: ctx and lse; backward: dqkv), for short
// sequences (T <= 512), where the [B·heads, T, T] scores are small (BERT-base 32 x 128: 12.6 MB in
// bf16) and dense products on tensor cores (cuBLASLt, Gpu::gemm; the CPU GEMM on cuda-sim) beat
// the SIMT dot products of the fused kernels several times over. src/cuda/attention_gemm.rs
// chains the launches (AttentionPath::Gemm); these kernels are the glue between the GEMMs.
//
// Forward (7 launches): attention_gemm_to_heads (QKV [B, T, 3H] -> Q, K, V [B·heads, T, d]);
// S = Q·Kᵀ (batched over B·heads, f32 out); attention_gemm_softmax[_dropout] (below: P and lse);
// O = P·V (batched); attention_gemm_from_heads (O -> ctx [B, T, H]).
// Backward (9 launches, no stored P, no ctx): to_heads of QKV and of dO; S = Q·Kᵀ and
// dP = dO·Vᵀ (f32 out); attention_gemm_softmax_backward[_dropout] (below: P∘M and dS);
// dV = (P∘M)ᵀ·dO, dQ = scale·dS·K, dK = scale·dSᵀ·Q (batched, into [3][B·heads, T, d]);
// attention_gemm_from_heads (-> dqkv [B, T, 3H]).
//
// Row kernels, thread mapping: warp per row (b, h, i) of the [B·heads·T, T] score matrix, block
// (32, ATTN_GEMM_ROW_WARPS), grid (⌈T / 8⌉, heads, B): a warp reads b, h and i off its block
// indices (no divisions of a flat row index); lane owns the groups of 4 consecutive keys
// j = 4·(lane + 32g) + t, g < G, t < 4 (G = 4: T <= 512 = 16·32; the _t128 kernels G = 1:
// T <= 128; the values stay in registers: one read of each score, one write of each output);
// reductions are fixed 5-level butterflies (bitwise reproducible). A warp whose row lies past the last one returns at once (no block barrier in
// these kernels). A group is one 16-byte load of each f32 row (S, dP, the mask) and one 8-byte
// (16-bit) or 16-byte (f32) store of each output when T % 4 == 0 and the bases are aligned
// (attn_rows_whole), else guarded scalar accesses; either way a warp's accesses to a row are
// consecutive (coalesced). Dropout draws a group's four factors from one Philox block when the
// row's element indices start on a block boundary (T and the offset multiples of 4; else the two
// blocks they span: AttnPhilox::factor4), not one block per key: the masks are unchanged and the
// Philox rounds drop fourfold (with one block per key they were most of the dropout kernels'
// instructions, 3.3k SASS against 0.8k without dropout; the dropout forward took 147 µs on an H100
// at BERT-base 32×128 against ~13 µs of traffic).
//   * forward: s_j = f32(S_ij·scale) + mask[b % mask_rows][j] (the scaled score rounded before the
//     mask add, as the fused kernels and PyTorch), m = max_j s_j, l = Σ_j exp(s_j − m),
//     lse = m + log(l), P_ij = exp(s_j − m)·(1/l)·f_ij, where f_ij is the dropout factor (1, or 0 /
//     1/(1−rate) from the fused kernels' Philox mapping: AttnPhilox::factor(b, h, i, j), the same
//     element index ((b_local·heads + h)·T + i)·T + j + offset of the same stream, so the masks are
//     bit-identical to the fused path's and the CPU backend's). lse keeps the undropped p. A row
//     with every score -inf writes NaN for P (so NaN for ctx) and lse, as the fused kernel.
//   * backward: p_j = exp(s_j − lse)·c with s_j the forward's score (same rounding), c = 1 unless
//     |lse| >= ATTN_BWD_EXACT_LSE, where the row's own sum is taken and c = 1/Σ_j exp(s_j − lse)
//     (the fused prep kernel's rule, same reason: an f32 lse of -10000 or finfo.min is too coarse
//     for exp(s − lse) to be normalised); g_j = dP_ij·f_ij; D = Σ_j p_j·g_j (= rowsum(P∘dP∘M) =
//     dO·O, with no need for ctx); stores P∘M (p_j·f_ij, what multiplies dO in dV) and
//     dS_ij = p_j·(g_j − D). A NaN lse (every key -inf) gives NaN everywhere downstream, where the
//     reference is NaN.
// Layout kernels: block per token row (b, t) of the packed side, 256 threads striding its
// parts·H columns; element (b, t, part·H + h·d + c) <-> part·B·T·H + ((b·heads + h)·T + t)·d + c.
// Reads and writes run in consecutive chunks of d elements (coalesced for d >= 16).
//
// Numerics (f32 math everywhere; the GEMMs accumulate in f32):
//   * S and dP come from cuBLASLt (f32 inputs: CUBLAS_COMPUTE_32F, never TF32) or the CPU GEMM;
//     a d-term dot product like the fused kernels' fma chain (different summation order: the
//     results differ by a few ulps, not bitwise). P·V, dS·K etc. are T-term sums of bounded
//     terms, ≈ √T·2^-24 relative in practice. The row kernels: expf/logf (never __expf), every
//     exp argument ≤ 0 in the forward; sums of ≤ 16 terms per lane then a 5-level butterfly.
//     Outputs land within ~1e-6·(1 + max|ref|) of the f64 reference; the tests hold ctx/lse to
//     1e-5 and the gradients to 1e-4 of that scale, against the fused path and the CPU backend.
//   * _bf16io: Q, K, V, dO and the GEMM operands P∘M and dS are bf16 (what the tensor cores
//     read), the scores S, dP, lse and every row statistic f32. Roundings: P (forward) and P∘M,
//     dS (backward) once each from their f32 values, ctx and dqkv once each by the GEMM's f32 ->
//     bf16 store (the layout kernels copy bits). Against the f32 math on the same bf16 inputs
//     that is one bf16 rounding of P (forward) and of P∘M and dS (backward) on top of the output's
//     own: what PyTorch's bf16 SDPA (math backend) or eager attention rounds too. The tests hold
//     it to twice the error of a plain bf16 implementation (STYLE.md).
//   * _f16io: the same with f16 operands and outputs (attention_gemm_softmax[_backward][_dropout]
//     _f16io; the layout kernels copy 16-bit patterns, so the _bf16io ones serve f16 too).
//
// ptxas (NVRTC 13.0, tests/nvrtc_compile.rs), registers sm_80 / sm_90, no spills: to_heads 24 / 32,
// from_heads 26 / 30 (f32 and 16-bit alike), to_heads_x16 30 / 32, from_heads_x16 24 / 30 (one
// ld.global.nc.v4.u32 and one st.global.v4.u32 per unit in the PTX). Row kernels on sm_90 (four
// groups of keys a lane / the _t128 kernels' one): softmax 32 / 26, softmax_dropout 62 / 41,
// softmax_backward 56 / 26-28, softmax_backward_dropout 80 / 48 (its dropout factors kept as one
// bit a key: 92-100 with a float each). At 256 threads a block that is 3 blocks an SM for the
// dropout backward with four groups and 5 with one, 4 and 6 for the dropout forward: why T <= 128
// (BERT's usual) takes the _t128 kernels.

#define ATTN_GEMM_ROW_WARPS 8
#define ATTN_GEMM_KEYS_PER_LANE 16  // T <= 16·32 = 512
#define ATTN_GEMM_GROUPS (ATTN_GEMM_KEYS_PER_LANE / 4)  // groups of 4 keys a lane, T <= 512
#define ATTN_GEMM_LAYOUT_THREADS 256

__device__ __forceinline__ float attn_warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(FULL_WARP_MASK, v, offset));
    }
    return v;
}

// Packed [B, T, parts·H] -> parts x [B·heads, T, d] (to_heads = true) or back. Block per token.
template <typename T, bool TO_HEADS>
__device__ __forceinline__ void attn_gemm_layout_body(T* __restrict__ out, const T* __restrict__ in, int batch, int seq, int hidden, int heads, int parts) {
    const int token = blockIdx.x;  // b·T + t
    const int b = token / seq;
    const int t = token - b * seq;
    const int d = hidden / heads;
    const int width = parts * hidden;
    const size_t part_len = (size_t)batch * (size_t)seq * (size_t)hidden;
    const size_t packed_row = (size_t)token * (size_t)width;
    for (int col = threadIdx.x; col < width; col += blockDim.x) {
        const int part = col / hidden;
        const int hc = col - part * hidden;
        const int h = hc / d;
        const int c = hc - h * d;
        const size_t split = (size_t)part * part_len + (((size_t)b * (size_t)heads + (size_t)h) * (size_t)seq + (size_t)t) * (size_t)d + (size_t)c;
        if (TO_HEADS) {
            out[split] = in[packed_row + col];
        } else {
            out[packed_row + col] = in[split];
        }
    }
}

// Four consecutive keys j0..j0+3 of an f32 row (j0 < seq, a multiple of 4): one 16-byte load
// when `whole` (every row is whole groups of 4, 16-byte aligned: the launcher's rows, checked in
// the kernel), else guarded scalar loads; keys past T read as `fill`.
__device__ __forceinline__ void attn_load4(const float* row, int j0, int seq, bool whole, float fill, float (&out)[4]) {
    if (whole) {
        const AttnVec4 v = *reinterpret_cast<const AttnVec4*>(row + j0);
        out[0] = v.x;
        out[1] = v.y;
        out[2] = v.z;
        out[3] = v.w;
    } else {
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            out[t] = j0 + t < seq ? row[j0 + t] : fill;
        }
    }
}

// Stores keys j0..j0+3 (j0 < seq) of a row of T, each rounded once (attn_store): one 8- or 16-byte
// store when `whole` (as attn_load4), else the keys below T one at a time.
template <typename T>
__device__ __forceinline__ void attn_store4(T* row, int j0, int seq, bool whole, const float (&x)[4]) {
    if (whole) {
        Unit4<T> u;
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            attn_store(&u.v[t], x[t]);
        }
        *reinterpret_cast<Unit4<T>*>(row + j0) = u;
    } else {
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            if (j0 + t < seq) {
                attn_store(row + j0 + t, x[t]);
            }
        }
    }
}

// Whether rows of `seq` elements of 4-byte (f32) and `bytes`-byte (T) arrays are whole, aligned
// groups of 4 at these base addresses (every row then starts aligned too).
__device__ __forceinline__ bool attn_rows_whole(int seq, const void* f32_a, const void* f32_b, const void* t_a, const void* t_b, int bytes) {
    return seq % 4 == 0 && unit4_aligned(f32_a, 4) && unit4_aligned(f32_b, 4) && unit4_aligned(t_a, bytes) && unit4_aligned(t_b, bytes);
}

// The warp's score row: query i of batch row b (blockIdx.z) and head h (blockIdx.y), i from
// blockIdx.x and the warp; row = (b·heads + h)·T + i. False past T (or past `rows`).
__device__ __forceinline__ bool attn_gemm_row(int rows, int seq, int heads, int& b, int& h, int& i, int& row) {
    b = blockIdx.z;
    h = blockIdx.y;
    i = blockIdx.x * blockDim.y + threadIdx.y;
    row = (b * heads + h) * seq + i;
    return i < seq && row < rows;
}

// The mask row of batch row b: b % mask_rows, without the division in the usual cases (one mask
// row for all, or b within the first block of a replicated batch).
__device__ __forceinline__ int attn_mask_row(int b, int mask_rows) {
    return mask_rows == 1 ? 0 : b < mask_rows ? b : b % mask_rows;
}

// The forward row kernel (see the section header). p: [B·heads, T, T] (what P·V reads), lse:
// [B, heads, T], s: the unscaled scores Q·Kᵀ [B·heads, T, T] in f32.
template <int G, typename T, typename Dropout>
__device__ __forceinline__ void attn_gemm_softmax_body(T* __restrict__ p, float* __restrict__ lse, const float* __restrict__ s, const float* __restrict__ mask_bias, int rows, int seq, int heads, int mask_rows, float scale, Dropout dropout) {
    static_assert(G >= 1 && G <= ATTN_GEMM_GROUPS, "1 to ATTN_GEMM_GROUPS groups of 4 keys a lane (T <= 128·G)");
    int b, h, i, row;
    if (!attn_gemm_row(rows, seq, heads, b, h, i, row)) {
        return;  // warp-uniform; no barrier follows
    }
    const int lane = threadIdx.x;
    const float* srow = s + (size_t)row * (size_t)seq;
    const float* mrow = mask_bias + (size_t)attn_mask_row(b, mask_rows) * (size_t)seq;
    T* prow = p + (size_t)row * (size_t)seq;
    const bool whole = attn_rows_whole(seq, s, mask_bias, p, p, (int)sizeof(T));
    float v[G][4];
    float m = attn_neg_inf();
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const int j0 = 4 * (lane + 32 * g);
        if (j0 < seq) {
            float sv[4], mv[4];
            attn_load4(srow, j0, seq, whole, 0.0f, sv);
            attn_load4(mrow, j0, seq, whole, 0.0f, mv);
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                v[g][t] = j0 + t < seq ? attn_mul_rn(sv[t], scale) + mv[t] : attn_neg_inf();
                m = fmaxf(m, v[g][t]);
            }
        } else {
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                v[g][t] = attn_neg_inf();
            }
        }
    }
    m = attn_warp_max(m);
    // Every score -inf: subtract 0 instead (exp(-inf) = 0, not NaN), and write NaN below.
    const float m_ref = m == attn_neg_inf() ? 0.0f : m;
    float l = 0.0f;
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            v[g][t] = expf(v[g][t] - m_ref);
            l += v[g][t];
        }
    }
    l = warp_sum(l);
    const bool dead = m == attn_neg_inf();
    const float inv = 1.0f / l;
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const int j0 = 4 * (lane + 32 * g);
        if (j0 < seq) {
            float f[4], out[4];
            dropout.factor4(b, h, i, j0, f);
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                out[t] = dead ? attn_nan() : v[g][t] * inv * f[t];
            }
            attn_store4(prow, j0, seq, whole, out);
        }
    }
    if (lane == 0) {
        lse[row] = dead ? attn_nan() : m + logf(l);
    }
}

// The backward row kernel (see the section header). pd, ds: [B·heads, T, T] (P∘M and dS, the
// operands of the dV and dQ/dK products); s, dp: Q·Kᵀ (unscaled) and dO·Vᵀ in f32.
template <int G, typename T, typename Dropout>
__device__ __forceinline__ void attn_gemm_softmax_backward_body(T* __restrict__ pd, T* __restrict__ ds, const float* __restrict__ s, const float* __restrict__ dp, const float* __restrict__ lse, const float* __restrict__ mask_bias, int rows, int seq, int heads, int mask_rows, float scale, Dropout dropout) {
    static_assert(G >= 1 && G <= ATTN_GEMM_GROUPS, "1 to ATTN_GEMM_GROUPS groups of 4 keys a lane (T <= 128·G)");
    int b, h, i, row;
    if (!attn_gemm_row(rows, seq, heads, b, h, i, row)) {
        return;  // warp-uniform; no barrier follows
    }
    const int lane = threadIdx.x;
    const size_t base = (size_t)row * (size_t)seq;
    const float* mrow = mask_bias + (size_t)attn_mask_row(b, mask_rows) * (size_t)seq;
    const float L = lse[row];  // warp-uniform
    const bool whole = attn_rows_whole(seq, s, dp, pd, ds, (int)sizeof(T)) && unit4_aligned(mask_bias, 4);
    // The dropout factors are 0 or the policy's kept value (its scale, 1 without dropout), so a
    // lane keeps them as one bit a key: f = bit ? kept : 0, the same float as the policy's, in a
    // register instead of 4·G.
    float p[G][4], g[G][4];
    unsigned kept_bits = 0;
    const float kept = dropout.kept();
    float sum = 0.0f;
#pragma unroll
    for (int q = 0; q < G; ++q) {
        const int j0 = 4 * (lane + 32 * q);
        if (j0 < seq) {
            float sv[4], mv[4], dv[4], f[4];
            attn_load4(s + base, j0, seq, whole, 0.0f, sv);
            attn_load4(mrow, j0, seq, whole, 0.0f, mv);
            attn_load4(dp + base, j0, seq, whole, 0.0f, dv);
            dropout.factor4(b, h, i, j0, f);
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const bool in = j0 + t < seq;
                p[q][t] = in ? expf(attn_mul_rn(sv[t], scale) + mv[t] - L) : 0.0f;
                g[q][t] = in ? dv[t] * f[t] : 0.0f;
                sum += p[q][t];
                kept_bits |= (f[t] != 0.0f ? 1u : 0u) << (4 * q + t);
            }
        } else {
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                p[q][t] = 0.0f;
                g[q][t] = 0.0f;
            }
        }
    }
    // The fused prep kernel's normaliser c: exact only where the f32 lse is too coarse.
    if (fabsf(L) >= ATTN_BWD_EXACT_LSE) {
        const float c = 1.0f / warp_sum(sum);
#pragma unroll
        for (int q = 0; q < G; ++q) {
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                p[q][t] *= c;
            }
        }
    }
    float dsum = 0.0f;
#pragma unroll
    for (int q = 0; q < G; ++q) {
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            dsum = fmaf(p[q][t], g[q][t], dsum);
        }
    }
    const float D = warp_sum(dsum);
#pragma unroll
    for (int q = 0; q < G; ++q) {
        const int j0 = 4 * (lane + 32 * q);
        if (j0 < seq) {
            float pm[4], dsv[4];
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                pm[t] = p[q][t] * ((kept_bits >> (4 * q + t)) & 1u ? kept : 0.0f);
                dsv[t] = p[q][t] * (g[q][t] - D);
            }
            attn_store4(pd + base, j0, seq, whole, pm);
            attn_store4(ds + base, j0, seq, whole, dsv);
        }
    }
}

// ---- GEMM-path kernels ------------------------------------------------------------------------
// Layout: out, in; batch, seq, hidden, heads, parts. Launch: grid B·T, block 256.
extern "C" __global__ __launch_bounds__(ATTN_GEMM_LAYOUT_THREADS) void attention_gemm_to_heads_f32(float* __restrict__ out, const float* __restrict__ in, int batch, int seq, int hidden, int heads, int parts) {
    attn_gemm_layout_body<float, true>(out, in, batch, seq, hidden, heads, parts);
}
extern "C" __global__ __launch_bounds__(ATTN_GEMM_LAYOUT_THREADS) void attention_gemm_from_heads_f32(float* __restrict__ out, const float* __restrict__ in, int batch, int seq, int hidden, int heads, int parts) {
    attn_gemm_layout_body<float, false>(out, in, batch, seq, hidden, heads, parts);
}
// 16-bit storage, bf16 and f16 alike: the bits are copied (no conversion).
extern "C" __global__ __launch_bounds__(ATTN_GEMM_LAYOUT_THREADS) void attention_gemm_to_heads_bf16io(unsigned short* __restrict__ out, const unsigned short* __restrict__ in, int batch, int seq, int hidden, int heads, int parts) {
    attn_gemm_layout_body<unsigned short, true>(out, in, batch, seq, hidden, heads, parts);
}
extern "C" __global__ __launch_bounds__(ATTN_GEMM_LAYOUT_THREADS) void attention_gemm_from_heads_bf16io(unsigned short* __restrict__ out, const unsigned short* __restrict__ in, int batch, int seq, int hidden, int heads, int parts) {
    attn_gemm_layout_body<unsigned short, false>(out, in, batch, seq, hidden, heads, parts);
}

// 16-byte units, any storage type (f32, bf16, f16): the permutation above counted in units of
// 16 bytes (hidden_units = hidden·sizeof(T)/16, and d·sizeof(T) a whole number of units, so that
// each head's d-long segment is whole units), every address 16-byte aligned; the launcher checks
// both and otherwise takes the scalar kernels. One 128-bit load and store per unit instead of 4
// (f32) or 8 (16-bit) scalar ones, and as many times fewer index divisions, which bound the
// scalar kernels (three integer divisions per element).
struct alignas(16) AttnBits16 {
    unsigned int w[4];
};
extern "C" __global__ __launch_bounds__(ATTN_GEMM_LAYOUT_THREADS) void attention_gemm_to_heads_x16(unsigned int* __restrict__ out, const unsigned int* __restrict__ in, int batch, int seq, int hidden_units, int heads, int parts) {
    attn_gemm_layout_body<AttnBits16, true>(reinterpret_cast<AttnBits16*>(out), reinterpret_cast<const AttnBits16*>(in), batch, seq, hidden_units, heads, parts);
}
extern "C" __global__ __launch_bounds__(ATTN_GEMM_LAYOUT_THREADS) void attention_gemm_from_heads_x16(unsigned int* __restrict__ out, const unsigned int* __restrict__ in, int batch, int seq, int hidden_units, int heads, int parts) {
    attn_gemm_layout_body<AttnBits16, false>(reinterpret_cast<AttnBits16*>(out), reinterpret_cast<const AttnBits16*>(in), batch, seq, hidden_units, heads, parts);
}

// Forward rows: p, lse, s, mask_bias; rows = B·heads·T, seq, heads, mask_rows, scale (then the
// dropout policy's arguments, as the fused _dropout kernels). Launch: grid (⌈T / 8⌉, heads, B),
// block (32, 8).
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_f32(float* __restrict__ p, float* __restrict__ lse, const float* __restrict__ s, const float* __restrict__ mask_bias, int rows, int seq, int heads, int mask_rows, float scale) {
    attn_gemm_softmax_body<ATTN_GEMM_GROUPS, float>(p, lse, s, mask_bias, rows, seq, heads, mask_rows, scale, AttnNoDropout());
}
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_bf16io(unsigned short* __restrict__ p, float* __restrict__ lse, const float* __restrict__ s, const float* __restrict__ mask_bias, int rows, int seq, int heads, int mask_rows, float scale) {
    attn_gemm_softmax_body<ATTN_GEMM_GROUPS, bf16_raw>(reinterpret_cast<bf16_raw*>(p), lse, s, mask_bias, rows, seq, heads, mask_rows, scale, AttnNoDropout());
}

// f16 twin of attention_gemm_softmax_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_f16io(unsigned short* __restrict__ p, float* __restrict__ lse, const float* __restrict__ s, const float* __restrict__ mask_bias, int rows, int seq, int heads, int mask_rows, float scale) {
    attn_gemm_softmax_body<ATTN_GEMM_GROUPS, f16_raw>(reinterpret_cast<f16_raw*>(p), lse, s, mask_bias, rows, seq, heads, mask_rows, scale, AttnNoDropout());
}
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_dropout_f32(
    float* __restrict__ p,
    float* __restrict__ lse,
    const float* __restrict__ s,
    const float* __restrict__ mask_bias,
    int rows,
    int seq,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_gemm_softmax_body<ATTN_GEMM_GROUPS, float>(p, lse, s, mask_bias, rows, seq, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_dropout_bf16io(
    unsigned short* __restrict__ p,
    float* __restrict__ lse,
    const float* __restrict__ s,
    const float* __restrict__ mask_bias,
    int rows,
    int seq,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_gemm_softmax_body<ATTN_GEMM_GROUPS, bf16_raw>(reinterpret_cast<bf16_raw*>(p), lse, s, mask_bias, rows, seq, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// f16 twin of attention_gemm_softmax_dropout_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_dropout_f16io(
    unsigned short* __restrict__ p,
    float* __restrict__ lse,
    const float* __restrict__ s,
    const float* __restrict__ mask_bias,
    int rows,
    int seq,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_gemm_softmax_body<ATTN_GEMM_GROUPS, f16_raw>(reinterpret_cast<f16_raw*>(p), lse, s, mask_bias, rows, seq, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// Backward rows: pd, ds, s, dp, lse, mask_bias; rows, seq, heads, mask_rows, scale (then the
// dropout policy's arguments). Launch as the forward rows.
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_backward_f32(float* __restrict__ pd, float* __restrict__ ds, const float* __restrict__ s, const float* __restrict__ dp, const float* __restrict__ lse, const float* __restrict__ mask_bias, int rows, int seq, int heads, int mask_rows, float scale) {
    attn_gemm_softmax_backward_body<ATTN_GEMM_GROUPS, float>(pd, ds, s, dp, lse, mask_bias, rows, seq, heads, mask_rows, scale, AttnBwdNoDropout());
}
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_backward_bf16io(unsigned short* __restrict__ pd, unsigned short* __restrict__ ds, const float* __restrict__ s, const float* __restrict__ dp, const float* __restrict__ lse, const float* __restrict__ mask_bias, int rows, int seq, int heads, int mask_rows, float scale) {
    attn_gemm_softmax_backward_body<ATTN_GEMM_GROUPS, bf16_raw>(reinterpret_cast<bf16_raw*>(pd), reinterpret_cast<bf16_raw*>(ds), s, dp, lse, mask_bias, rows, seq, heads, mask_rows, scale, AttnBwdNoDropout());
}

// f16 twin of attention_gemm_softmax_backward_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_backward_f16io(unsigned short* __restrict__ pd, unsigned short* __restrict__ ds, const float* __restrict__ s, const float* __restrict__ dp, const float* __restrict__ lse, const float* __restrict__ mask_bias, int rows, int seq, int heads, int mask_rows, float scale) {
    attn_gemm_softmax_backward_body<ATTN_GEMM_GROUPS, f16_raw>(reinterpret_cast<f16_raw*>(pd), reinterpret_cast<f16_raw*>(ds), s, dp, lse, mask_bias, rows, seq, heads, mask_rows, scale, AttnBwdNoDropout());
}
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_backward_dropout_f32(
    float* __restrict__ pd,
    float* __restrict__ ds,
    const float* __restrict__ s,
    const float* __restrict__ dp,
    const float* __restrict__ lse,
    const float* __restrict__ mask_bias,
    int rows,
    int seq,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_gemm_softmax_backward_body<ATTN_GEMM_GROUPS, float>(pd, ds, s, dp, lse, mask_bias, rows, seq, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_backward_dropout_bf16io(
    unsigned short* __restrict__ pd,
    unsigned short* __restrict__ ds,
    const float* __restrict__ s,
    const float* __restrict__ dp,
    const float* __restrict__ lse,
    const float* __restrict__ mask_bias,
    int rows,
    int seq,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_gemm_softmax_backward_body<ATTN_GEMM_GROUPS, bf16_raw>(reinterpret_cast<bf16_raw*>(pd), reinterpret_cast<bf16_raw*>(ds), s, dp, lse, mask_bias, rows, seq, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// f16 twin of attention_gemm_softmax_backward_dropout_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_backward_dropout_f16io(
    unsigned short* __restrict__ pd,
    unsigned short* __restrict__ ds,
    const float* __restrict__ s,
    const float* __restrict__ dp,
    const float* __restrict__ lse,
    const float* __restrict__ mask_bias,
    int rows,
    int seq,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_gemm_softmax_backward_body<ATTN_GEMM_GROUPS, f16_raw>(reinterpret_cast<f16_raw*>(pd), reinterpret_cast<f16_raw*>(ds), s, dp, lse, mask_bias, rows, seq, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// The same twelve row kernels for T <= 128 (one group of 4 keys a lane; the launcher picks them
// there): the registers of one group instead of four, so more warps an SM. Forward rows: p, lse, s,
// mask_bias; rows = B·heads·T, seq, heads, mask_rows, scale (then the
// dropout policy's arguments, as the fused _dropout kernels). Launch: grid (⌈T / 8⌉, heads, B),
// block (32, 8).
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_f32_t128(float* __restrict__ p, float* __restrict__ lse, const float* __restrict__ s, const float* __restrict__ mask_bias, int rows, int seq, int heads, int mask_rows, float scale) {
    attn_gemm_softmax_body<1, float>(p, lse, s, mask_bias, rows, seq, heads, mask_rows, scale, AttnNoDropout());
}
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_bf16io_t128(unsigned short* __restrict__ p, float* __restrict__ lse, const float* __restrict__ s, const float* __restrict__ mask_bias, int rows, int seq, int heads, int mask_rows, float scale) {
    attn_gemm_softmax_body<1, bf16_raw>(reinterpret_cast<bf16_raw*>(p), lse, s, mask_bias, rows, seq, heads, mask_rows, scale, AttnNoDropout());
}

// f16 twin of attention_gemm_softmax_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_f16io_t128(unsigned short* __restrict__ p, float* __restrict__ lse, const float* __restrict__ s, const float* __restrict__ mask_bias, int rows, int seq, int heads, int mask_rows, float scale) {
    attn_gemm_softmax_body<1, f16_raw>(reinterpret_cast<f16_raw*>(p), lse, s, mask_bias, rows, seq, heads, mask_rows, scale, AttnNoDropout());
}
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_dropout_f32_t128(
    float* __restrict__ p,
    float* __restrict__ lse,
    const float* __restrict__ s,
    const float* __restrict__ mask_bias,
    int rows,
    int seq,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_gemm_softmax_body<1, float>(p, lse, s, mask_bias, rows, seq, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_dropout_bf16io_t128(
    unsigned short* __restrict__ p,
    float* __restrict__ lse,
    const float* __restrict__ s,
    const float* __restrict__ mask_bias,
    int rows,
    int seq,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_gemm_softmax_body<1, bf16_raw>(reinterpret_cast<bf16_raw*>(p), lse, s, mask_bias, rows, seq, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// f16 twin of attention_gemm_softmax_dropout_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_dropout_f16io_t128(
    unsigned short* __restrict__ p,
    float* __restrict__ lse,
    const float* __restrict__ s,
    const float* __restrict__ mask_bias,
    int rows,
    int seq,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_gemm_softmax_body<1, f16_raw>(reinterpret_cast<f16_raw*>(p), lse, s, mask_bias, rows, seq, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// Backward rows: pd, ds, s, dp, lse, mask_bias; rows, seq, heads, mask_rows, scale (then the
// dropout policy's arguments). Launch as the forward rows.
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_backward_f32_t128(float* __restrict__ pd, float* __restrict__ ds, const float* __restrict__ s, const float* __restrict__ dp, const float* __restrict__ lse, const float* __restrict__ mask_bias, int rows, int seq, int heads, int mask_rows, float scale) {
    attn_gemm_softmax_backward_body<1, float>(pd, ds, s, dp, lse, mask_bias, rows, seq, heads, mask_rows, scale, AttnBwdNoDropout());
}
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_backward_bf16io_t128(unsigned short* __restrict__ pd, unsigned short* __restrict__ ds, const float* __restrict__ s, const float* __restrict__ dp, const float* __restrict__ lse, const float* __restrict__ mask_bias, int rows, int seq, int heads, int mask_rows, float scale) {
    attn_gemm_softmax_backward_body<1, bf16_raw>(reinterpret_cast<bf16_raw*>(pd), reinterpret_cast<bf16_raw*>(ds), s, dp, lse, mask_bias, rows, seq, heads, mask_rows, scale, AttnBwdNoDropout());
}

// f16 twin of attention_gemm_softmax_backward_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_backward_f16io_t128(unsigned short* __restrict__ pd, unsigned short* __restrict__ ds, const float* __restrict__ s, const float* __restrict__ dp, const float* __restrict__ lse, const float* __restrict__ mask_bias, int rows, int seq, int heads, int mask_rows, float scale) {
    attn_gemm_softmax_backward_body<1, f16_raw>(reinterpret_cast<f16_raw*>(pd), reinterpret_cast<f16_raw*>(ds), s, dp, lse, mask_bias, rows, seq, heads, mask_rows, scale, AttnBwdNoDropout());
}
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_backward_dropout_f32_t128(
    float* __restrict__ pd,
    float* __restrict__ ds,
    const float* __restrict__ s,
    const float* __restrict__ dp,
    const float* __restrict__ lse,
    const float* __restrict__ mask_bias,
    int rows,
    int seq,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_gemm_softmax_backward_body<1, float>(pd, ds, s, dp, lse, mask_bias, rows, seq, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_backward_dropout_bf16io_t128(
    unsigned short* __restrict__ pd,
    unsigned short* __restrict__ ds,
    const float* __restrict__ s,
    const float* __restrict__ dp,
    const float* __restrict__ lse,
    const float* __restrict__ mask_bias,
    int rows,
    int seq,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_gemm_softmax_backward_body<1, bf16_raw>(reinterpret_cast<bf16_raw*>(pd), reinterpret_cast<bf16_raw*>(ds), s, dp, lse, mask_bias, rows, seq, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// f16 twin of attention_gemm_softmax_backward_dropout_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_GEMM_ROW_WARPS) void attention_gemm_softmax_backward_dropout_f16io_t128(
    unsigned short* __restrict__ pd,
    unsigned short* __restrict__ ds,
    const float* __restrict__ s,
    const float* __restrict__ dp,
    const float* __restrict__ lse,
    const float* __restrict__ mask_bias,
    int rows,
    int seq,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_gemm_softmax_backward_body<1, f16_raw>(reinterpret_cast<f16_raw*>(pd), reinterpret_cast<f16_raw*>(ds), s, dp, lse, mask_bias, rows, seq, heads, mask_rows, scale, AttnBwdPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// =================================================================================================
// ---- the tensor-core forward: the GEMM path's forward in one launch (T <= 128, 16-bit) --------
// =================================================================================================
//
// attention_mma_forward[_dropout]_{bf16io,f16io}_d{16,32,64}: the GEMM path's forward (ctx and
// lse; the same semantics, dropout masks and roundings, section above) as one kernel for T <=
// ATTN_MMA_MAX_SEQ = 128 and d = 16, 32 or 64 (the tests' tiny BERT, MiniLM, BERT-base): S = Q·Kᵀ and O = P·V on the tensor
// cores (mma.sync m16n8k16, f32 accumulators: kernels/common.cuh), the softmax in registers. It
// replaces that forward's five launches (to_heads, S = Q·Kᵀ, the softmax row kernel, P·V,
// from_heads) and their traffic: the head-layout copies of Q, K, V and O, the f32 scores and P.
// What it reads and writes is qkv, the mask, ctx and lse; the GEMM backward runs after it
// unchanged (it needs only the lse). src/cuda/attention_gemm.rs (AttentionPath::TensorCores)
// launches it where it applies and takes the GEMM forward elsewhere.
//
// Thread mapping: blocks of ATTN_MMA_WARPS = 4 warps, grid (⌈T / 64⌉, heads, B): block x of (b, h)
// owns query rows 64x .. 64x + 63, warp w rows 64x + 16w .. + 15 (one mma row tile). The block
// stages in shared memory, 16-bit, with 16-byte global loads (rows past T zero): its 64 Q rows
// and the Tp = ⌈T / 16⌉·16 K rows as [row][d + 8], V transposed as [d][Tp + 8] (the B operand of
// P·V pairs consecutive keys), and the mask row (f32). Row strides of 4 mod 8 words make every
// fragment read conflict-free (lanes g = 0..7 hit 8 distinct groups of 4 banks); Q and K are
// staged unit-major (coalesced rows), V key-major (32 consecutive keys a warp: conflict-free
// 2-byte transposing stores).
// Per warp: S (16 x Tp, f32) accumulates in registers, 16 n-tiles of 8 keys x 4 floats a lane
// (lane g = l / 4, t = l % 4 holds rows g and g + 8, keys 8n + 2t and 8n + 2t + 1); each row's max
// and sum are over its 4 lanes (two xor shuffles). The probabilities, rounded to the storage
// type, are packed straight from the accumulators into A fragments of P·V (the C layout of two
// adjacent n-tiles is the A layout of one 16-key k slice), so P never leaves registers. ctx is
// stored as 32-bit pairs, the lse by lane t = 0. A warp whose rows all lie past T returns after
// the staging barrier (no barrier follows).
// Dropout: lanes t and t ^ 1 share a group of 4 keys; one draws the group's factors for row g,
// the other for row g + 8 (AttnPhilox::factor4: one Philox block), and they swap the pairs the
// other needs: one factor4 per 4 keys and row, as in the row kernels, the same element mapping.
//
// Numerics: the GEMM path's, step for step: s = f32(S·scale) + mask (attn_mul_rn; -inf past T),
// m = max_j s_j, l = Σ_j exp(s_j − m) (expf), lse = m + log(l), P = exp(s − m)·(1/l)·f rounded once
// to the storage type, O = P·V accumulated in f32 and rounded once on the store. Only summation
// orders differ (S over d in the tensor cores' order; l per lane, then across the 4 lanes of a row,
// where the row kernel sums per lane then across 32), so S and l agree with the GEMM path to a few
// f32 ulps, P to one 16-bit ulp where a rounding boundary lies between, and the tests hold ctx to
// the same 2x-plain rule and the lse to the f32 tolerance. A row whose every score is -inf writes
// NaN for ctx (its P is NaN) and lse, as the GEMM path.
//
// Shared memory (bytes): 2·(64·(d + 8) + Tp·(d + 8) + d·(Tp + 8)) + 4·Tp; at T = 128: 44.5 KiB
// (d = 64), 24 KiB (d = 32), 13.75 KiB (d = 16). Within the 48 KiB a kernel gets without an
// opt-in, so the launcher sets no attribute (attention_mma_smem_bytes in
// src/cuda/attention_gemm.rs is the same formula).
//
// ptxas (NVRTC 13.0, tests/nvrtc_compile.rs), registers sm_80 / sm_90, no spills: d64 95 / 120,
// dropout d64 105-107 / 146, d32 80 / 115-116, dropout d32 103-106 / 141, d16 80 / 94-96, dropout
// d16 103-106 / 128. P is packed into its 32 fragment registers before the first P·V product, so
// S's 64 floats die first (packing inside the P·V loop held both: 148 / 152 on sm_90). On sm_90
// that is 4 blocks (16 warps) an SM in eval at d = 64 and 3 in training; a cap of 128 spills 4 B
// in the dropout kernel, so there is none. The SASS of the d64 kernels has 128 HMMA (64 for S,
// 64 for P·V) and no local memory.

#define ATTN_MMA_WARPS 4
#define ATTN_MMA_ROWS (16 * ATTN_MMA_WARPS)  // query rows a block
#define ATTN_MMA_MAX_SEQ 128
#define ATTN_MMA_NTILES (ATTN_MMA_MAX_SEQ / 8)  // n-tiles of 8 keys a warp's S holds

// The block's shared-memory regions (16-bit elements; the mask row as f32) for T = seq.
struct AttnMmaSmem {
    int kp;   // keys padded to whole 16-key k slices
    int ldk;  // Q and K row stride: d + 8
    int ldv;  // Vᵀ row stride: kp + 8
    unsigned short* q;
    unsigned short* k;
    unsigned short* vt;
    float* mask;
};

template <int D>
__device__ __forceinline__ AttnMmaSmem attn_mma_smem(void* base, int seq) {
    AttnMmaSmem s;
    s.kp = (seq + 15) & ~15;
    s.ldk = D + 8;
    s.ldv = s.kp + 8;
    s.q = static_cast<unsigned short*>(base);
    s.k = s.q + ATTN_MMA_ROWS * s.ldk;
    s.vt = s.k + s.kp * s.ldk;
    s.mask = reinterpret_cast<float*>(s.vt + D * s.ldv);  // an even element offset: 4-byte aligned
    return s;
}

// One 32-bit mma register (two 16-bit elements, the lower index low) from shared memory.
__device__ __forceinline__ unsigned attn_mma_ld32(const unsigned short* p) { return *reinterpret_cast<const unsigned*>(p); }

// Copies the block's Q rows q0.., every K row below kp and Vᵀ into shared memory (zero past T),
// and the mask row; ends with the block barrier.
template <typename T, int D>
__device__ __forceinline__ void attn_mma_stage(const AttnMmaSmem& sm, const T* __restrict__ qkv, const float* __restrict__ mask_row, int b, int h, int q0, int seq, int hidden) {
    constexpr int UNITS = D / 8;  // 16-byte units of a head's row
    const size_t row_stride = 3 * (size_t)hidden;
    const T* head = qkv + (size_t)b * (size_t)seq * row_stride + (size_t)(h * D);
    const AttnBits16 zero = {{0u, 0u, 0u, 0u}};
    for (int u = threadIdx.x; u < ATTN_MMA_ROWS * UNITS; u += blockDim.x) {
        const int r = u / UNITS, c = (u % UNITS) * 8;
        const int i = q0 + r;
        const AttnBits16 v = i < seq ? *reinterpret_cast<const AttnBits16*>(head + (size_t)i * row_stride + c) : zero;
        *reinterpret_cast<AttnBits16*>(sm.q + r * sm.ldk + c) = v;
    }
    for (int u = threadIdx.x; u < sm.kp * UNITS; u += blockDim.x) {
        const int j = u / UNITS, c = (u % UNITS) * 8;
        const AttnBits16 v = j < seq ? *reinterpret_cast<const AttnBits16*>(head + (size_t)j * row_stride + hidden + c) : zero;
        *reinterpret_cast<AttnBits16*>(sm.k + j * sm.ldk + c) = v;
    }
    for (int u = threadIdx.x; u < sm.kp * UNITS; u += blockDim.x) {
        const int j = u % sm.kp, c = (u / sm.kp) * 8;
        const AttnBits16 v = j < seq ? *reinterpret_cast<const AttnBits16*>(head + (size_t)j * row_stride + 2 * (size_t)hidden + c) : zero;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            sm.vt[(c + e) * sm.ldv + j] = (unsigned short)(v.w[e >> 1] >> (16 * (e & 1)));
        }
    }
    for (int j = threadIdx.x; j < sm.kp; j += blockDim.x) {
        sm.mask[j] = j < seq ? mask_row[j] : 0.0f;  // past T the score is -inf, not read from here
    }
    __syncthreads();
}

// The dropout factors of this lane's keys 8n + 2t, +1 (n0 = 8n) for rows i_lo (g) and i_hi (g + 8):
// 1 in eval.
__device__ __forceinline__ void attn_mma_factors(const AttnNoDropout&, int, int, int, int, int, int, float (&lo)[2], float (&hi)[2]) {
    lo[0] = lo[1] = hi[0] = hi[1] = 1.0f;
}
// Training: the lanes t and t ^ 1 share the group of 4 keys j0; the even one draws row i_lo's
// factors, the odd one row i_hi's, and each hands the other the pair it needs.
__device__ __forceinline__ void attn_mma_factors(const AttnPhiloxDropout& d, int b, int h, int i_lo, int i_hi, int n0, int t, float (&lo)[2], float (&hi)[2]) {
    const bool odd = (t & 1) != 0;
    float f[4];
    d.factor4(b, h, odd ? i_hi : i_lo, n0 + 4 * (t >> 1), f);
    // This lane's keys are j0 + 2·odd and the next; the partner's the other pair of the group.
    const float own0 = odd ? f[2] : f[0], own1 = odd ? f[3] : f[1];
    const float give0 = odd ? f[0] : f[2], give1 = odd ? f[1] : f[3];
    const float got0 = __shfl_xor_sync(FULL_WARP_MASK, give0, 1), got1 = __shfl_xor_sync(FULL_WARP_MASK, give1, 1);
    lo[0] = odd ? got0 : own0;
    lo[1] = odd ? got1 : own1;
    hi[0] = odd ? own0 : got0;
    hi[1] = odd ? own1 : got1;
}

// The factor of a kept key: 1 in eval, 1/(1 − rate) in training (what attn_mma_factors returns
// for a key it keeps).
__device__ __forceinline__ float attn_mma_kept(const AttnNoDropout&) { return 1.0f; }
__device__ __forceinline__ float attn_mma_kept(const AttnPhiloxDropout& d) { return d.d.scale; }

// The max (OP = fmaxf) or sum of a row's value over its 4 lanes (t = 0..3 of one g).
__device__ __forceinline__ float attn_mma_row_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(FULL_WARP_MASK, v, 1));
    return fmaxf(v, __shfl_xor_sync(FULL_WARP_MASK, v, 2));
}
__device__ __forceinline__ float attn_mma_row_sum(float v) {
    v += __shfl_xor_sync(FULL_WARP_MASK, v, 1);
    return v + __shfl_xor_sync(FULL_WARP_MASK, v, 2);
}

template <typename T, int D, typename Dropout>
__device__ __forceinline__ void attn_mma_forward_body(T* __restrict__ ctx, float* __restrict__ lse, const T* __restrict__ qkv, const float* __restrict__ mask_bias, int seq, int hidden, int heads, int mask_rows, float scale, Dropout dropout) {
    static_assert(D % 16 == 0 && D <= 64, "d a multiple of 16 up to 64");
    extern __shared__ AttnVec4 attn_smem[];
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * ATTN_MMA_ROWS;
    const AttnMmaSmem sm = attn_mma_smem<D>(attn_smem, seq);
    attn_mma_stage<T, D>(sm, qkv, mask_bias + (size_t)attn_mask_row(b, mask_rows) * (size_t)seq, b, h, q0, seq, hidden);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int r0 = 16 * warp;  // the warp's first row of the block's Q tile
    if (q0 + r0 >= seq) {
        return;  // warp-uniform; no barrier follows
    }
    const int i_lo = q0 + r0 + g, i_hi = i_lo + 8;
    const T* tag = nullptr;  // picks the bf16 or f16 mma and packing

    // S = Q·Kᵀ: n-tile n holds keys 8n..8n+7; tiles at or past kp stay unused.
    float s[ATTN_MMA_NTILES][4];
#pragma unroll
    for (int n = 0; n < ATTN_MMA_NTILES; ++n) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            s[n][q] = 0.0f;
        }
    }
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        const unsigned short* qa = sm.q + (r0 + g) * sm.ldk + 16 * ks + 2 * t;
        const unsigned a[4] = {attn_mma_ld32(qa), attn_mma_ld32(qa + 8 * sm.ldk), attn_mma_ld32(qa + 8), attn_mma_ld32(qa + 8 * sm.ldk + 8)};
#pragma unroll
        for (int n = 0; n < ATTN_MMA_NTILES; ++n) {
            if (8 * n < sm.kp) {
                const unsigned short* kb = sm.k + (8 * n + g) * sm.ldk + 16 * ks + 2 * t;
                const unsigned bk[2] = {attn_mma_ld32(kb), attn_mma_ld32(kb + 8)};
                const float c[4] = {s[n][0], s[n][1], s[n][2], s[n][3]};
                mma_m16n8k16(tag, s[n], a, bk, c);
            }
        }
    }

    // Scores, row maxima (rows g: elements 0, 1; g + 8: elements 2, 3).
    float m_lo = attn_neg_inf(), m_hi = attn_neg_inf();
#pragma unroll
    for (int n = 0; n < ATTN_MMA_NTILES; ++n) {
        if (8 * n < sm.kp) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int j = 8 * n + 2 * t + e;
                const bool in = j < seq;
                const float bias = in ? sm.mask[j] : 0.0f;
                s[n][e] = in ? attn_mul_rn(s[n][e], scale) + bias : attn_neg_inf();
                s[n][2 + e] = in ? attn_mul_rn(s[n][2 + e], scale) + bias : attn_neg_inf();
                m_lo = fmaxf(m_lo, s[n][e]);
                m_hi = fmaxf(m_hi, s[n][2 + e]);
            }
        }
    }
    m_lo = attn_mma_row_max(m_lo);
    m_hi = attn_mma_row_max(m_hi);
    // Every score -inf: subtract 0 instead (exp(-inf) = 0, not NaN), and write NaN below.
    const bool dead_lo = m_lo == attn_neg_inf(), dead_hi = m_hi == attn_neg_inf();
    const float ref_lo = dead_lo ? 0.0f : m_lo, ref_hi = dead_hi ? 0.0f : m_hi;
    float l_lo = 0.0f, l_hi = 0.0f;
#pragma unroll
    for (int n = 0; n < ATTN_MMA_NTILES; ++n) {
        if (8 * n < sm.kp) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                s[n][e] = expf(s[n][e] - ref_lo);
                s[n][2 + e] = expf(s[n][2 + e] - ref_hi);
                l_lo += s[n][e];
                l_hi += s[n][2 + e];
            }
        }
    }
    l_lo = attn_mma_row_sum(l_lo);
    l_hi = attn_mma_row_sum(l_hi);
    const float inv_lo = 1.0f / l_lo, inv_hi = 1.0f / l_hi;

    // P, rounded to T and packed into the A fragments of P·V (k slice ks: n-tiles 2ks, 2ks + 1),
    // before any product: 32 registers in place of S's 64 floats, which die here.
    unsigned pa[ATTN_MMA_NTILES / 2][4];
#pragma unroll
    for (int ks = 0; ks < ATTN_MMA_NTILES / 2; ++ks) {
        if (16 * ks < sm.kp) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int n = 2 * ks + half;
                float f_lo[2], f_hi[2];
                attn_mma_factors(dropout, b, h, i_lo, i_hi, 8 * n, t, f_lo, f_hi);
                const float p0 = dead_lo ? attn_nan() : s[n][0] * inv_lo * f_lo[0];
                const float p1 = dead_lo ? attn_nan() : s[n][1] * inv_lo * f_lo[1];
                const float p2 = dead_hi ? attn_nan() : s[n][2] * inv_hi * f_hi[0];
                const float p3 = dead_hi ? attn_nan() : s[n][3] * inv_hi * f_hi[1];
                pa[ks][2 * half] = pack2(tag, p0, p1);
                pa[ks][2 * half + 1] = pack2(tag, p2, p3);
            }
        }
    }

    // O = P·V, one 16-key k slice at a time.
    float o[D / 8][4];
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            o[dn][q] = 0.0f;
        }
    }
#pragma unroll
    for (int ks = 0; ks < ATTN_MMA_NTILES / 2; ++ks) {
        if (16 * ks < sm.kp) {
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                const unsigned short* vb = sm.vt + (8 * dn + g) * sm.ldv + 16 * ks + 2 * t;
                const unsigned bv[2] = {attn_mma_ld32(vb), attn_mma_ld32(vb + 8)};
                const float c[4] = {o[dn][0], o[dn][1], o[dn][2], o[dn][3]};
                mma_m16n8k16(tag, o[dn], pa[ks], bv, c);
            }
        }
    }

    // ctx pairs (rounded once) and the lse.
    const size_t col = (size_t)(h * D + 2 * t);
    if (i_lo < seq) {
        T* row = ctx + ((size_t)b * (size_t)seq + (size_t)i_lo) * (size_t)hidden + col;
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
            *reinterpret_cast<unsigned*>(row + 8 * dn) = pack2(tag, o[dn][0], o[dn][1]);
        }
    }
    if (i_hi < seq) {
        T* row = ctx + ((size_t)b * (size_t)seq + (size_t)i_hi) * (size_t)hidden + col;
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
            *reinterpret_cast<unsigned*>(row + 8 * dn) = pack2(tag, o[dn][2], o[dn][3]);
        }
    }
    if (t == 0) {
        float* lse_bh = lse + ((size_t)b * (size_t)heads + (size_t)h) * (size_t)seq;
        if (i_lo < seq) {
            lse_bh[i_lo] = dead_lo ? attn_nan() : m_lo + logf(l_lo);
        }
        if (i_hi < seq) {
            lse_bh[i_hi] = dead_hi ? attn_nan() : m_hi + logf(l_hi);
        }
    }
}

// ---- the tensor-core backward scores: S, dP and the row step of the GEMM backward in one launch --
//
// attention_mma_backward_scores[_dropout]_{bf16io,f16io}_d{16,32,64}: what the GEMM backward's
// S = Q·Kᵀ and dP = dO·Vᵀ products (f32 out) and its row kernel (attention_gemm_softmax_backward,
// above) compute, in one kernel for T <= 128: P∘M and dS ([B·heads, T, T], the storage type),
// the operands of its dV, dQ and dK products, from the packed qkv and dctx, the lse and the mask.
// The [B·heads, T, T] f32 scores and dP never go to memory. attention_mma_backward_grads (next
// section) then makes dqkv from them in one more launch.
//
// Thread mapping: the forward's (blocks of 4 warps, grid (⌈T / 64⌉, heads, B), warp w of block x
// owns query rows 64x + 16w .. + 15). Shared memory holds the Tp = ⌈T / 16⌉·16 rows of K and of V
// as [row][d + 8] (16-byte loads; zero past T; both are B operands "col": a key's d elements
// contiguous) and the mask row. The A fragments of Q and dO come straight from global memory: a
// fragment's k slice is 16 elements, one 32-byte sector of each of its 16 rows, so these loads
// use every byte they fetch. Per warp: S (16 x Tp) in registers becomes p in place; then per
// n-tile dP, g = dP·f and the row's D = Σ_j p_j·g_j (per lane, then over the row's 4 lanes); then
// P∘M = p·f and dS = p·(g − D), rounded once each, stored as pairs of keys (scalars when T is odd
// or a row does not start 4-byte aligned).
//
// Numerics: the row kernel's, step for step: p = exp(f32(S·scale) + mask − lse), times c =
// 1 / Σ_j p_j where |lse| >= ATTN_BWD_EXACT_LSE (then the row's sum over its 4 lanes), g = dP·f,
// D by fma per lane, P∘M = p·f (f is 0 or the kept factor: the row kernel's kept-bit product,
// bit for bit), dS = p·(g − D). S, dP and D differ from the GEMM path only in summation order, so
// P∘M and dS agree with it to one 16-bit ulp where a rounding boundary lies between; the tests hold
// dQ, dK and dV to the 2x-plain rule, and bit for bit where every rounding is exact. A NaN lse
// (a row masked on every key) gives NaN downstream, as in the GEMM path.
//
// Shared memory (bytes): 4·Tp·(d + 8) + 4·Tp: 36.5 KiB at d = 64, T = 128 (no opt-in).
//
// ptxas (NVRTC 13.0), registers sm_80 / sm_90, no spills: eval 118-126 / 128-134, dropout 122-140 /
// 162-166 (3 blocks an SM on sm_90). Keeping g = dP·f in registers beside p cost 234 with
// dropout; the second pass recomputing dP (tensor-core work, cheap here) and the factors kept as
// one bit a key brought it to 166.

template <typename T, int D, typename Dropout>
__device__ __forceinline__ void attn_mma_backward_scores_body(T* __restrict__ pd, T* __restrict__ ds, const T* __restrict__ qkv, const T* __restrict__ dctx, const float* __restrict__ lse, const float* __restrict__ mask_bias, int seq, int hidden, int heads, int mask_rows, float scale, Dropout dropout) {
    static_assert(D % 16 == 0 && D <= 64, "d a multiple of 16 up to 64");
    constexpr int UNITS = D / 8;  // 16-byte units of a head's row
    extern __shared__ AttnVec4 attn_smem[];
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * ATTN_MMA_ROWS;
    const int kp = (seq + 15) & ~15, ld = D + 8;
    unsigned short* k_s = reinterpret_cast<unsigned short*>(attn_smem);
    unsigned short* v_s = k_s + kp * ld;
    float* mask_s = reinterpret_cast<float*>(v_s + kp * ld);  // an even element offset: 4-byte aligned
    const size_t qkv_stride = 3 * (size_t)hidden;
    const T* head = qkv + (size_t)b * (size_t)seq * qkv_stride + (size_t)(h * D);
    const AttnBits16 zero = {{0u, 0u, 0u, 0u}};
    for (int u = threadIdx.x; u < 2 * kp * UNITS; u += blockDim.x) {
        const int part = u / (kp * UNITS);  // 0: K, 1: V
        const int rest = u - part * kp * UNITS;
        const int j = rest / UNITS, c = (rest % UNITS) * 8;
        const AttnBits16 v = j < seq ? *reinterpret_cast<const AttnBits16*>(head + (size_t)j * qkv_stride + (size_t)(1 + part) * (size_t)hidden + c) : zero;
        *reinterpret_cast<AttnBits16*>((part == 0 ? k_s : v_s) + j * ld + c) = v;
    }
    const float* mask_row = mask_bias + (size_t)attn_mask_row(b, mask_rows) * (size_t)seq;
    for (int j = threadIdx.x; j < kp; j += blockDim.x) {
        mask_s[j] = j < seq ? mask_row[j] : 0.0f;  // past T p is 0, not read from here
    }
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    if (q0 + 16 * warp >= seq) {
        return;  // warp-uniform; no barrier follows
    }
    const int i_lo = q0 + 16 * warp + g, i_hi = i_lo + 8;
    const bool in_lo = i_lo < seq, in_hi = i_hi < seq;
    const T* tag = nullptr;  // picks the bf16 or f16 mma and packing
    // The A fragment of rows i_lo, i_hi at columns k0 + 2t (+ 8) of a [B·T, stride] array (zero past T).
    auto a_fragment = [&](const T* base, size_t stride, int k0, unsigned (&a)[4]) {
        const size_t col = (size_t)(h * D + k0 + 2 * t);
        a[0] = a[1] = a[2] = a[3] = 0u;
        if (in_lo) {
            const T* lo = base + ((size_t)b * (size_t)seq + (size_t)i_lo) * stride + col;
            a[0] = *reinterpret_cast<const unsigned*>(lo);
            a[2] = *reinterpret_cast<const unsigned*>(lo + 8);
        }
        if (in_hi) {
            const T* hi = base + ((size_t)b * (size_t)seq + (size_t)i_hi) * stride + col;
            a[1] = *reinterpret_cast<const unsigned*>(hi);
            a[3] = *reinterpret_cast<const unsigned*>(hi + 8);
        }
    };

    // S = Q·Kᵀ, then p in place.
    float p[ATTN_MMA_NTILES][4];
#pragma unroll
    for (int n = 0; n < ATTN_MMA_NTILES; ++n) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            p[n][q] = 0.0f;
        }
    }
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        unsigned a[4];
        a_fragment(qkv, qkv_stride, 16 * ks, a);
#pragma unroll
        for (int n = 0; n < ATTN_MMA_NTILES; ++n) {
            if (8 * n < kp) {
                const unsigned short* kb = k_s + (8 * n + g) * ld + 16 * ks + 2 * t;
                const unsigned bk[2] = {attn_mma_ld32(kb), attn_mma_ld32(kb + 8)};
                const float c[4] = {p[n][0], p[n][1], p[n][2], p[n][3]};
                mma_m16n8k16(tag, p[n], a, bk, c);
            }
        }
    }
    const float* lse_bh = lse + ((size_t)b * (size_t)heads + (size_t)h) * (size_t)seq;
    const float l_lo = in_lo ? lse_bh[i_lo] : 0.0f, l_hi = in_hi ? lse_bh[i_hi] : 0.0f;
    float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
    for (int n = 0; n < ATTN_MMA_NTILES; ++n) {
        if (8 * n < kp) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int j = 8 * n + 2 * t + e;
                const bool in = j < seq;
                const float bias = in ? mask_s[j] : 0.0f;
                p[n][e] = in ? expf(attn_mul_rn(p[n][e], scale) + bias - l_lo) : 0.0f;
                p[n][2 + e] = in ? expf(attn_mul_rn(p[n][2 + e], scale) + bias - l_hi) : 0.0f;
                sum_lo += p[n][e];
                sum_hi += p[n][2 + e];
            }
        }
    }
    // The row kernel's normaliser: exact only where the f32 lse is too coarse (per row; the
    // shuffles run in every lane).
    sum_lo = attn_mma_row_sum(sum_lo);
    sum_hi = attn_mma_row_sum(sum_hi);
    const bool exact_lo = fabsf(l_lo) >= ATTN_BWD_EXACT_LSE, exact_hi = fabsf(l_hi) >= ATTN_BWD_EXACT_LSE;
    const float c_lo = 1.0f / sum_lo, c_hi = 1.0f / sum_hi;
#pragma unroll
    for (int n = 0; n < ATTN_MMA_NTILES; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            p[n][e] = exact_lo ? p[n][e] * c_lo : p[n][e];
            p[n][2 + e] = exact_hi ? p[n][2 + e] * c_hi : p[n][2 + e];
        }
    }

    // dP = dO·Vᵀ per n-tile (kept in no array: the second pass recomputes each tile, the same
    // products in the same order, so the same bits), g = dP·f, D per row. The dropout factors are
    // 0 or the policy's kept value: one bit a key.
    unsigned a_do[D / 16][4];
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        a_fragment(dctx, (size_t)hidden, 16 * ks, a_do[ks]);
    }
    auto dp_tile = [&](int n, float (&acc)[4]) {
        acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
            const unsigned short* vb = v_s + (8 * n + g) * ld + 16 * ks + 2 * t;
            const unsigned bv[2] = {attn_mma_ld32(vb), attn_mma_ld32(vb + 8)};
            const float c[4] = {acc[0], acc[1], acc[2], acc[3]};
            mma_m16n8k16(tag, acc, a_do[ks], bv, c);
        }
    };
    const float kept = attn_mma_kept(dropout);
    unsigned keep_lo = 0u, keep_hi = 0u;  // bit 2n + e: key 8n + 2t + e is kept
    float d_lo = 0.0f, d_hi = 0.0f;
#pragma unroll
    for (int n = 0; n < ATTN_MMA_NTILES; ++n) {
        if (8 * n < kp) {
            float acc[4];
            dp_tile(n, acc);
            float f_lo[2], f_hi[2];
            attn_mma_factors(dropout, b, h, i_lo, i_hi, 8 * n, t, f_lo, f_hi);
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const bool in = 8 * n + 2 * t + e < seq;
                keep_lo |= (f_lo[e] != 0.0f ? 1u : 0u) << (2 * n + e);
                keep_hi |= (f_hi[e] != 0.0f ? 1u : 0u) << (2 * n + e);
                d_lo = fmaf(p[n][e], in ? acc[e] * f_lo[e] : 0.0f, d_lo);
                d_hi = fmaf(p[n][2 + e], in ? acc[2 + e] * f_hi[e] : 0.0f, d_hi);
            }
        }
    }
    d_lo = attn_mma_row_sum(d_lo);
    d_hi = attn_mma_row_sum(d_hi);

    // P∘M and dS, rounded once each; pairs of keys where T is even and the rows start aligned.
    const size_t row_lo = ((size_t)b * (size_t)heads + (size_t)h) * (size_t)seq + (size_t)i_lo;
    const bool pairs = seq % 2 == 0 && ((unsigned long long)pd & 3ull) == 0 && ((unsigned long long)ds & 3ull) == 0;
#pragma unroll
    for (int n = 0; n < ATTN_MMA_NTILES; ++n) {
        const int j = 8 * n + 2 * t;
        if (8 * n < kp) {
            float acc[4];
            dp_tile(n, acc);  // warp-wide (mma): before any lane-dependent branch
            if (j < seq) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    if (r == 0 ? !in_lo : !in_hi) {
                        continue;
                    }
                    const unsigned keep = r == 0 ? keep_lo : keep_hi;
                    const float dd = r == 0 ? d_lo : d_hi;
                    const float f0 = (keep >> (2 * n)) & 1u ? kept : 0.0f, f1 = (keep >> (2 * n + 1)) & 1u ? kept : 0.0f;
                    const float g0 = acc[2 * r] * f0, g1 = j + 1 < seq ? acc[2 * r + 1] * f1 : 0.0f;
                    const float p0 = p[n][2 * r], p1 = p[n][2 * r + 1];
                    const float pm0 = p0 * f0, pm1 = p1 * f1;
                    const float ds0 = p0 * (g0 - dd), ds1 = p1 * (g1 - dd);
                    const size_t at = (row_lo + (size_t)(8 * r)) * (size_t)seq + (size_t)j;
                    if (pairs) {
                        *reinterpret_cast<unsigned*>(pd + at) = pack2(tag, pm0, pm1);
                        *reinterpret_cast<unsigned*>(ds + at) = pack2(tag, ds0, ds1);
                    } else {
                        store_f32(pd + at, pm0);
                        store_f32(ds + at, ds0);
                        if (j + 1 < seq) {
                            store_f32(pd + at + 1, pm1);
                            store_f32(ds + at + 1, ds1);
                        }
                    }
                }
            }
        }
    }
}


// ---- the tensor-core backward products: dQ, dK and dV in one launch, straight into dqkv --------
//
// attention_mma_backward_grads_{bf16io,f16io}_d{16,32,64}: the GEMM backward's three products and
// its layout copies (to_heads of qkv and of dO, dV = (P∘M)ᵀ·dO, dQ = scale·dS·K,
// dK = scale·dSᵀ·Q, from_heads) in one kernel for T <= 128, from the backward scores kernel's P∘M
// and dS ([B·heads, T, T], the storage type) and the packed qkv and dctx, into the packed dqkv.
// After attention_mma_backward_scores the backward is two launches.
//
// Thread mapping: the forward's grid and blocks (4 warps, grid (⌈T / 64⌉, heads, B)); warp w of
// block x owns rows r = 64x + 16w .. + 15 of each output: query rows of dQ, key rows of dK and dV
// (one after the other: 16 x d accumulators at a time). Shared memory holds Kᵀ, Qᵀ and dOᵀ as
// [d][Tp + 8] (16-byte global loads, key-major transposing stores as the forward's Vᵀ; zero past
// T): the B operands ("col": a column's Tp elements contiguous). The A operands come from global
// memory, where one (b, h)'s P∘M and dS (2·T² elements) stay in L2: dS rows for dQ (pairs of
// keys), dS and P∘M columns for dK and dV (the transposed operand: 16-bit loads, 8 rows of one
// column pair a load). Results are scaled (dQ, dK), rounded once and stored as pairs.
//
// Numerics: the GEMM products' (f32 accumulation of exact 16-bit products, alpha = scale applied
// to the f32 sum, one rounding); only the summation order differs.
//
// Shared memory (bytes): 6·d·(Tp + 8): 51 KiB at d = 64, T = 128 (the launcher opts in), 25.5 KiB
// at d = 32.

// Element `idx` of `base` as the low 16 bits of an mma register half (0 where `ok` is false: the
// element is not read).
template <typename T>
__device__ __forceinline__ unsigned attn_mma_el(const T* base, size_t idx, bool ok) {
    return ok ? (unsigned)base[idx].bits : 0u;
}

// The A fragment (columns k0, k0 + 1 and k0 + 8, k0 + 9 of rows r_lo, r_hi) of a (b, h) block of
// scores m ([T, T], row = query): `AttnMmaScoreRows` reads rows r of m (A = m), for dQ;
// `AttnMmaScoreColumns` reads columns r (A = mᵀ), for dK and dV. Elements past T read as 0.
template <typename T>
struct AttnMmaScoreRows {
    const T* m;
    int seq, r_lo, r_hi;
    bool in_lo, in_hi;
    __device__ __forceinline__ unsigned el(int r, bool in, int k) const { return attn_mma_el(m, (size_t)r * (size_t)seq + (size_t)k, in && k < seq); }
    __device__ __forceinline__ void operator()(int k0, unsigned (&a)[4]) const {
        a[0] = el(r_lo, in_lo, k0) | el(r_lo, in_lo, k0 + 1) << 16;
        a[1] = el(r_hi, in_hi, k0) | el(r_hi, in_hi, k0 + 1) << 16;
        a[2] = el(r_lo, in_lo, k0 + 8) | el(r_lo, in_lo, k0 + 9) << 16;
        a[3] = el(r_hi, in_hi, k0 + 8) | el(r_hi, in_hi, k0 + 9) << 16;
    }
};
template <typename T>
struct AttnMmaScoreColumns {
    const T* m;
    int seq, r_lo, r_hi;
    bool in_lo, in_hi;
    __device__ __forceinline__ unsigned el(int i, int r, bool in) const { return attn_mma_el(m, (size_t)i * (size_t)seq + (size_t)r, in && i < seq); }
    __device__ __forceinline__ void operator()(int k0, unsigned (&a)[4]) const {
        a[0] = el(k0, r_lo, in_lo) | el(k0 + 1, r_lo, in_lo) << 16;
        a[1] = el(k0, r_hi, in_hi) | el(k0 + 1, r_hi, in_hi) << 16;
        a[2] = el(k0 + 8, r_lo, in_lo) | el(k0 + 9, r_lo, in_lo) << 16;
        a[3] = el(k0 + 8, r_hi, in_hi) | el(k0 + 9, r_hi, in_hi) << 16;
    }
};

// acc = A·B over the Tp keys (or queries): A's fragment for k columns k0 = 16ks + 2t (and k0 + 8)
// from a_of(k0, a), B from the transposed rows bt ([d][ld], shared memory).
template <typename T, int D, typename AOf>
__device__ __forceinline__ void attn_mma_grads_product(float (&acc)[D / 8][4], const unsigned short* bt, int ld, int kp, AOf a_of) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const T* tag = nullptr;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
        acc[dn][0] = acc[dn][1] = acc[dn][2] = acc[dn][3] = 0.0f;
    }
#pragma unroll
    for (int ks = 0; ks < ATTN_MMA_NTILES / 2; ++ks) {
        if (16 * ks < kp) {
            unsigned a[4];
            a_of(16 * ks + 2 * t, a);
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                const unsigned short* bp = bt + (8 * dn + g) * ld + 16 * ks + 2 * t;
                const unsigned bb[2] = {attn_mma_ld32(bp), attn_mma_ld32(bp + 8)};
                const float c[4] = {acc[dn][0], acc[dn][1], acc[dn][2], acc[dn][3]};
                mma_m16n8k16(tag, acc[dn], a, bb, c);
            }
        }
    }
}

template <typename T, int D>
__device__ __forceinline__ void attn_mma_backward_grads_body(T* __restrict__ dqkv, const T* __restrict__ pd, const T* __restrict__ ds, const T* __restrict__ qkv, const T* __restrict__ dctx, int seq, int hidden, int heads, float scale) {
    static_assert(D % 16 == 0 && D <= 64, "d a multiple of 16 up to 64");
    constexpr int UNITS = D / 8;
    extern __shared__ AttnVec4 attn_smem[];
    const int b = blockIdx.z, h = blockIdx.y, r0 = blockIdx.x * ATTN_MMA_ROWS;
    const int kp = (seq + 15) & ~15, ld = kp + 8;
    unsigned short* kt = reinterpret_cast<unsigned short*>(attn_smem);  // Kᵀ, then Qᵀ, then dOᵀ
    unsigned short* qt = kt + D * ld;
    unsigned short* dot = qt + D * ld;
    const size_t qkv_stride = 3 * (size_t)hidden;
    const AttnBits16 zero = {{0u, 0u, 0u, 0u}};
    for (int u = threadIdx.x; u < 3 * kp * UNITS; u += blockDim.x) {
        const int which = u / (kp * UNITS);  // 0: K, 1: Q, 2: dO
        const int rest = u - which * kp * UNITS;
        const int j = rest % kp, c = (rest / kp) * 8;
        const T* src = which == 2 ? dctx + ((size_t)b * (size_t)seq + (size_t)j) * (size_t)hidden
                                  : qkv + ((size_t)b * (size_t)seq + (size_t)j) * qkv_stride + (which == 0 ? (size_t)hidden : 0);
        const AttnBits16 v = j < seq ? *reinterpret_cast<const AttnBits16*>(src + (size_t)(h * D + c)) : zero;
        unsigned short* dst = which == 0 ? kt : which == 1 ? qt : dot;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            dst[(c + e) * ld + j] = (unsigned short)(v.w[e >> 1] >> (16 * (e & 1)));
        }
    }
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    if (r0 + 16 * warp >= seq) {
        return;  // warp-uniform; no barrier follows
    }
    const int r_lo = r0 + 16 * warp + g, r_hi = r_lo + 8;
    const bool in_lo = r_lo < seq, in_hi = r_hi < seq;
    const T* tag = nullptr;
    const size_t bh_rows = ((size_t)b * (size_t)heads + (size_t)h) * (size_t)seq;  // the (b, h) block's first score row
    const T* ds_bh = ds + bh_rows * (size_t)seq;
    const T* pd_bh = pd + bh_rows * (size_t)seq;

    // Stores rows r_lo, r_hi of one output (part 0: dQ, 1: dK, 2: dV), times `alpha`, rounded once.
    auto store = [&](int part, float alpha, const float (&acc)[D / 8][4]) {
        const size_t col = (size_t)part * (size_t)hidden + (size_t)(h * D + 2 * t);
        if (in_lo) {
            T* row = dqkv + ((size_t)b * (size_t)seq + (size_t)r_lo) * qkv_stride + col;
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                *reinterpret_cast<unsigned*>(row + 8 * dn) = pack2(tag, alpha * acc[dn][0], alpha * acc[dn][1]);
            }
        }
        if (in_hi) {
            T* row = dqkv + ((size_t)b * (size_t)seq + (size_t)r_hi) * qkv_stride + col;
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                *reinterpret_cast<unsigned*>(row + 8 * dn) = pack2(tag, alpha * acc[dn][2], alpha * acc[dn][3]);
            }
        }
    };
    float acc[D / 8][4];
    // dQ = scale·dS·K: A = dS rows r. dK = scale·dSᵀ·Q and dV = (P∘M)ᵀ·dO: A = columns r of dS
    // and of P∘M.
    attn_mma_grads_product<T, D>(acc, kt, ld, kp, AttnMmaScoreRows<T>{ds_bh, seq, r_lo, r_hi, in_lo, in_hi});
    store(0, scale, acc);
    attn_mma_grads_product<T, D>(acc, qt, ld, kp, AttnMmaScoreColumns<T>{ds_bh, seq, r_lo, r_hi, in_lo, in_hi});
    store(1, scale, acc);
    attn_mma_grads_product<T, D>(acc, dot, ld, kp, AttnMmaScoreColumns<T>{pd_bh, seq, r_lo, r_hi, in_lo, in_hi});
    store(2, 1.0f, acc);
}

// Tensor-core forward: ctx, lse, qkv, mask_bias; seq (<= 128), hidden (heads·d), heads, mask_rows,
// scale (then the dropout policy's arguments, as the row kernels). Launch: grid (⌈T / 64⌉, heads,
// B), block 128, dynamic shared memory as the section header says.
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_forward_bf16io_d16(unsigned short* __restrict__ ctx, float* __restrict__ lse, const unsigned short* __restrict__ qkv, const float* __restrict__ mask_bias, int seq, int hidden, int heads, int mask_rows, float scale) {
    attn_mma_forward_body<bf16_raw, 16>(reinterpret_cast<bf16_raw*>(ctx), lse, reinterpret_cast<const bf16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_forward_bf16io_d32(unsigned short* __restrict__ ctx, float* __restrict__ lse, const unsigned short* __restrict__ qkv, const float* __restrict__ mask_bias, int seq, int hidden, int heads, int mask_rows, float scale) {
    attn_mma_forward_body<bf16_raw, 32>(reinterpret_cast<bf16_raw*>(ctx), lse, reinterpret_cast<const bf16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_forward_dropout_bf16io_d16(
    unsigned short* __restrict__ ctx,
    float* __restrict__ lse,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_mma_forward_body<bf16_raw, 16>(reinterpret_cast<bf16_raw*>(ctx), lse, reinterpret_cast<const bf16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_forward_dropout_bf16io_d32(
    unsigned short* __restrict__ ctx,
    float* __restrict__ lse,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_mma_forward_body<bf16_raw, 32>(reinterpret_cast<bf16_raw*>(ctx), lse, reinterpret_cast<const bf16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_forward_bf16io_d64(unsigned short* __restrict__ ctx, float* __restrict__ lse, const unsigned short* __restrict__ qkv, const float* __restrict__ mask_bias, int seq, int hidden, int heads, int mask_rows, float scale) {
    attn_mma_forward_body<bf16_raw, 64>(reinterpret_cast<bf16_raw*>(ctx), lse, reinterpret_cast<const bf16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_forward_dropout_bf16io_d64(
    unsigned short* __restrict__ ctx,
    float* __restrict__ lse,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_mma_forward_body<bf16_raw, 64>(reinterpret_cast<bf16_raw*>(ctx), lse, reinterpret_cast<const bf16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}
// f16 twins of the bf16io kernels above (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_forward_f16io_d16(unsigned short* __restrict__ ctx, float* __restrict__ lse, const unsigned short* __restrict__ qkv, const float* __restrict__ mask_bias, int seq, int hidden, int heads, int mask_rows, float scale) {
    attn_mma_forward_body<f16_raw, 16>(reinterpret_cast<f16_raw*>(ctx), lse, reinterpret_cast<const f16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_forward_f16io_d32(unsigned short* __restrict__ ctx, float* __restrict__ lse, const unsigned short* __restrict__ qkv, const float* __restrict__ mask_bias, int seq, int hidden, int heads, int mask_rows, float scale) {
    attn_mma_forward_body<f16_raw, 32>(reinterpret_cast<f16_raw*>(ctx), lse, reinterpret_cast<const f16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_forward_dropout_f16io_d16(
    unsigned short* __restrict__ ctx,
    float* __restrict__ lse,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_mma_forward_body<f16_raw, 16>(reinterpret_cast<f16_raw*>(ctx), lse, reinterpret_cast<const f16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_forward_dropout_f16io_d32(
    unsigned short* __restrict__ ctx,
    float* __restrict__ lse,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_mma_forward_body<f16_raw, 32>(reinterpret_cast<f16_raw*>(ctx), lse, reinterpret_cast<const f16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_forward_f16io_d64(unsigned short* __restrict__ ctx, float* __restrict__ lse, const unsigned short* __restrict__ qkv, const float* __restrict__ mask_bias, int seq, int hidden, int heads, int mask_rows, float scale) {
    attn_mma_forward_body<f16_raw, 64>(reinterpret_cast<f16_raw*>(ctx), lse, reinterpret_cast<const f16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_forward_dropout_f16io_d64(
    unsigned short* __restrict__ ctx,
    float* __restrict__ lse,
    const unsigned short* __restrict__ qkv,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_mma_forward_body<f16_raw, 64>(reinterpret_cast<f16_raw*>(ctx), lse, reinterpret_cast<const f16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// Tensor-core backward scores: pd, ds, qkv, dctx, lse, mask_bias; seq (<= 128), hidden, heads,
// mask_rows, scale (then the dropout policy's arguments). Launch: grid (⌈T / 64⌉, heads, B), block
// 128, dynamic shared memory as its section says.
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_scores_bf16io_d16(unsigned short* __restrict__ pd, unsigned short* __restrict__ ds, const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ dctx, const float* __restrict__ lse, const float* __restrict__ mask_bias, int seq, int hidden, int heads, int mask_rows, float scale) {
    attn_mma_backward_scores_body<bf16_raw, 16>(reinterpret_cast<bf16_raw*>(pd), reinterpret_cast<bf16_raw*>(ds), reinterpret_cast<const bf16_raw*>(qkv), reinterpret_cast<const bf16_raw*>(dctx), lse, mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_scores_dropout_bf16io_d16(
    unsigned short* __restrict__ pd,
    unsigned short* __restrict__ ds,
    const unsigned short* __restrict__ qkv,
    const unsigned short* __restrict__ dctx,
    const float* __restrict__ lse,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_mma_backward_scores_body<bf16_raw, 16>(reinterpret_cast<bf16_raw*>(pd), reinterpret_cast<bf16_raw*>(ds), reinterpret_cast<const bf16_raw*>(qkv), reinterpret_cast<const bf16_raw*>(dctx), lse, mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_scores_bf16io_d32(unsigned short* __restrict__ pd, unsigned short* __restrict__ ds, const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ dctx, const float* __restrict__ lse, const float* __restrict__ mask_bias, int seq, int hidden, int heads, int mask_rows, float scale) {
    attn_mma_backward_scores_body<bf16_raw, 32>(reinterpret_cast<bf16_raw*>(pd), reinterpret_cast<bf16_raw*>(ds), reinterpret_cast<const bf16_raw*>(qkv), reinterpret_cast<const bf16_raw*>(dctx), lse, mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_scores_dropout_bf16io_d32(
    unsigned short* __restrict__ pd,
    unsigned short* __restrict__ ds,
    const unsigned short* __restrict__ qkv,
    const unsigned short* __restrict__ dctx,
    const float* __restrict__ lse,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_mma_backward_scores_body<bf16_raw, 32>(reinterpret_cast<bf16_raw*>(pd), reinterpret_cast<bf16_raw*>(ds), reinterpret_cast<const bf16_raw*>(qkv), reinterpret_cast<const bf16_raw*>(dctx), lse, mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_scores_bf16io_d64(unsigned short* __restrict__ pd, unsigned short* __restrict__ ds, const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ dctx, const float* __restrict__ lse, const float* __restrict__ mask_bias, int seq, int hidden, int heads, int mask_rows, float scale) {
    attn_mma_backward_scores_body<bf16_raw, 64>(reinterpret_cast<bf16_raw*>(pd), reinterpret_cast<bf16_raw*>(ds), reinterpret_cast<const bf16_raw*>(qkv), reinterpret_cast<const bf16_raw*>(dctx), lse, mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_scores_dropout_bf16io_d64(
    unsigned short* __restrict__ pd,
    unsigned short* __restrict__ ds,
    const unsigned short* __restrict__ qkv,
    const unsigned short* __restrict__ dctx,
    const float* __restrict__ lse,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_mma_backward_scores_body<bf16_raw, 64>(reinterpret_cast<bf16_raw*>(pd), reinterpret_cast<bf16_raw*>(ds), reinterpret_cast<const bf16_raw*>(qkv), reinterpret_cast<const bf16_raw*>(dctx), lse, mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}
// f16 twins of the bf16io kernels above (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_scores_f16io_d16(unsigned short* __restrict__ pd, unsigned short* __restrict__ ds, const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ dctx, const float* __restrict__ lse, const float* __restrict__ mask_bias, int seq, int hidden, int heads, int mask_rows, float scale) {
    attn_mma_backward_scores_body<f16_raw, 16>(reinterpret_cast<f16_raw*>(pd), reinterpret_cast<f16_raw*>(ds), reinterpret_cast<const f16_raw*>(qkv), reinterpret_cast<const f16_raw*>(dctx), lse, mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_scores_dropout_f16io_d16(
    unsigned short* __restrict__ pd,
    unsigned short* __restrict__ ds,
    const unsigned short* __restrict__ qkv,
    const unsigned short* __restrict__ dctx,
    const float* __restrict__ lse,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_mma_backward_scores_body<f16_raw, 16>(reinterpret_cast<f16_raw*>(pd), reinterpret_cast<f16_raw*>(ds), reinterpret_cast<const f16_raw*>(qkv), reinterpret_cast<const f16_raw*>(dctx), lse, mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_scores_f16io_d32(unsigned short* __restrict__ pd, unsigned short* __restrict__ ds, const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ dctx, const float* __restrict__ lse, const float* __restrict__ mask_bias, int seq, int hidden, int heads, int mask_rows, float scale) {
    attn_mma_backward_scores_body<f16_raw, 32>(reinterpret_cast<f16_raw*>(pd), reinterpret_cast<f16_raw*>(ds), reinterpret_cast<const f16_raw*>(qkv), reinterpret_cast<const f16_raw*>(dctx), lse, mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_scores_dropout_f16io_d32(
    unsigned short* __restrict__ pd,
    unsigned short* __restrict__ ds,
    const unsigned short* __restrict__ qkv,
    const unsigned short* __restrict__ dctx,
    const float* __restrict__ lse,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_mma_backward_scores_body<f16_raw, 32>(reinterpret_cast<f16_raw*>(pd), reinterpret_cast<f16_raw*>(ds), reinterpret_cast<const f16_raw*>(qkv), reinterpret_cast<const f16_raw*>(dctx), lse, mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_scores_f16io_d64(unsigned short* __restrict__ pd, unsigned short* __restrict__ ds, const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ dctx, const float* __restrict__ lse, const float* __restrict__ mask_bias, int seq, int hidden, int heads, int mask_rows, float scale) {
    attn_mma_backward_scores_body<f16_raw, 64>(reinterpret_cast<f16_raw*>(pd), reinterpret_cast<f16_raw*>(ds), reinterpret_cast<const f16_raw*>(qkv), reinterpret_cast<const f16_raw*>(dctx), lse, mask_bias, seq, hidden, heads, mask_rows, scale, AttnNoDropout());
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_scores_dropout_f16io_d64(
    unsigned short* __restrict__ pd,
    unsigned short* __restrict__ ds,
    const unsigned short* __restrict__ qkv,
    const unsigned short* __restrict__ dctx,
    const float* __restrict__ lse,
    const float* __restrict__ mask_bias,
    int seq,
    int hidden,
    int heads,
    int mask_rows,
    float scale,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream_base,
    unsigned long long block_ids,
    int batch_per_block,
    unsigned threshold,
    float drop_scale,
    unsigned long long drop_offset)
{
    attn_mma_backward_scores_body<f16_raw, 64>(reinterpret_cast<f16_raw*>(pd), reinterpret_cast<f16_raw*>(ds), reinterpret_cast<const f16_raw*>(qkv), reinterpret_cast<const f16_raw*>(dctx), lse, mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}

// Tensor-core backward products: dqkv, pd, ds, qkv, dctx; seq (<= 128), hidden, heads, scale.
// Launch: grid (⌈T / 64⌉, heads, B), block 128, dynamic shared memory as its section says.
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_grads_bf16io_d16(unsigned short* __restrict__ dqkv, const unsigned short* __restrict__ pd, const unsigned short* __restrict__ ds, const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ dctx, int seq, int hidden, int heads, float scale) {
    attn_mma_backward_grads_body<bf16_raw, 16>(reinterpret_cast<bf16_raw*>(dqkv), reinterpret_cast<const bf16_raw*>(pd), reinterpret_cast<const bf16_raw*>(ds), reinterpret_cast<const bf16_raw*>(qkv), reinterpret_cast<const bf16_raw*>(dctx), seq, hidden, heads, scale);
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_grads_bf16io_d32(unsigned short* __restrict__ dqkv, const unsigned short* __restrict__ pd, const unsigned short* __restrict__ ds, const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ dctx, int seq, int hidden, int heads, float scale) {
    attn_mma_backward_grads_body<bf16_raw, 32>(reinterpret_cast<bf16_raw*>(dqkv), reinterpret_cast<const bf16_raw*>(pd), reinterpret_cast<const bf16_raw*>(ds), reinterpret_cast<const bf16_raw*>(qkv), reinterpret_cast<const bf16_raw*>(dctx), seq, hidden, heads, scale);
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_grads_bf16io_d64(unsigned short* __restrict__ dqkv, const unsigned short* __restrict__ pd, const unsigned short* __restrict__ ds, const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ dctx, int seq, int hidden, int heads, float scale) {
    attn_mma_backward_grads_body<bf16_raw, 64>(reinterpret_cast<bf16_raw*>(dqkv), reinterpret_cast<const bf16_raw*>(pd), reinterpret_cast<const bf16_raw*>(ds), reinterpret_cast<const bf16_raw*>(qkv), reinterpret_cast<const bf16_raw*>(dctx), seq, hidden, heads, scale);
}
// f16 twins of the bf16io kernels above (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_grads_f16io_d16(unsigned short* __restrict__ dqkv, const unsigned short* __restrict__ pd, const unsigned short* __restrict__ ds, const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ dctx, int seq, int hidden, int heads, float scale) {
    attn_mma_backward_grads_body<f16_raw, 16>(reinterpret_cast<f16_raw*>(dqkv), reinterpret_cast<const f16_raw*>(pd), reinterpret_cast<const f16_raw*>(ds), reinterpret_cast<const f16_raw*>(qkv), reinterpret_cast<const f16_raw*>(dctx), seq, hidden, heads, scale);
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_grads_f16io_d32(unsigned short* __restrict__ dqkv, const unsigned short* __restrict__ pd, const unsigned short* __restrict__ ds, const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ dctx, int seq, int hidden, int heads, float scale) {
    attn_mma_backward_grads_body<f16_raw, 32>(reinterpret_cast<f16_raw*>(dqkv), reinterpret_cast<const f16_raw*>(pd), reinterpret_cast<const f16_raw*>(ds), reinterpret_cast<const f16_raw*>(qkv), reinterpret_cast<const f16_raw*>(dctx), seq, hidden, heads, scale);
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_grads_f16io_d64(unsigned short* __restrict__ dqkv, const unsigned short* __restrict__ pd, const unsigned short* __restrict__ ds, const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ dctx, int seq, int hidden, int heads, float scale) {
    attn_mma_backward_grads_body<f16_raw, 64>(reinterpret_cast<f16_raw*>(dqkv), reinterpret_cast<const f16_raw*>(pd), reinterpret_cast<const f16_raw*>(ds), reinterpret_cast<const f16_raw*>(qkv), reinterpret_cast<const f16_raw*>(dctx), seq, hidden, heads, scale);
}
