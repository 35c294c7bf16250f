// Attention family: fused masked scaled dot-product attention forward over packed Q, K, V.
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
// Extension points: the storage type is a template parameter (attn_load/attn_store convert to
// and from f32; a bf16 kernel is one more overload pair and one more wrapper, accumulation stays
// f32). Dropout on the probabilities (training) is the `Dropout` policy: it maps each
// unnormalised p_ij to the value that multiplies v_j (0 or p/(1-rate) from a Philox stream keyed
// by (b, h, i, j)), while the sum l and the lse keep the undropped p, as PyTorch's
// dropout(softmax(s))·V does. Only NoDropout exists (eval forward).

#define ATTN_KEY_TILE 32
#define ATTN_ROWS_PER_WARP 4
#define ATTN_MAX_HEAD_DIM 128
#define ATTN_MAX_WARPS 8

// 16-byte shared-memory vector (a struct of our own: float4 is not defined on every route).
struct alignas(16) AttnVec4 {
    float x, y, z, w;
};

// ---- storage-type conversions (f32 now; bf16 adds an overload pair) ---------------------------

__device__ __forceinline__ float attn_load(const float* p) { return *p; }
__device__ __forceinline__ void attn_store(float* p, float v) { *p = v; }

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
