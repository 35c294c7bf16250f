// Attention family: fused masked scaled dot-product attention forward over packed Q, K, V, and
// its backward (dQ, dK, dV from the saved log-sum-exp; the "backward" section after the forward
// kernels has its own header), then the GEMM path's row and layout kernels (their own header).
// The tensor-core kernels of the GEMM path (16-bit storage, T <= 128) are kernels/attention_mma.cu;
// the helpers both files use (dropout policies, mask row, numerics) are in kernels/common.cuh.
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
