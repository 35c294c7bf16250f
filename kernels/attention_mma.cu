// Tensor-core attention family (mma.sync, 16-bit storage, T <= 512, d 16, 32 or 64): the GEMM
// attention path's forward in one kernel, and its backward in two (the scores, then the gradient
// products). src/cuda/attention_gemm.rs launches them for AttentionPath::TensorCores and takes the
// GEMM path (kernels/attention.cu) wherever they do not apply. Same semantics, roundings and
// dropout masks as that path; each section below has its own header (algorithm, thread mapping,
// numerics, registers). Its own file so that the default path's module does not compile these
// 18 kernels (NVRTC: ~40 s of ptxas a GPU arch on a 2-core host, paid only where
// AttentionPath::TensorCores runs). Eval runs the dropout kernels at rate 0 (every factor 1: the
// same bits), so there are no eval twins to compile. Each kernel takes T <= 128 (one key tile: a
// warp holds its rows' scores against every key in registers) and, in a second branch of the same
// body, longer T in tiles of ATTN_MMA_KEY_TILE = 128 keys (or query rows), recomputing what a
// tile needs in each pass rather than keeping it. The helpers it shares with attention.cu
// (dropout policies, mask row, numerics) are in kernels/common.cuh.

// =================================================================================================
// ---- the tensor-core forward: the GEMM path's forward in one launch (T <= 512, 16-bit) --------
// =================================================================================================
//
// attention_mma_forward_dropout_{bf16io,f16io}_d{16,32,64}: the GEMM path's forward (ctx and
// lse; the same semantics, dropout masks and roundings) as one kernel for T <= 512 (the GEMM
// path's limit) and d = 16, 32 or 64 (the tests' tiny BERT, MiniLM, BERT-base): S = Q·Kᵀ and O = P·V on the tensor
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
// Past one key tile (T > 128) the block stages one tile of 128 keys at a time (K, and Vᵀ as
// [d][128 + 8]) between two barriers, and walks the tiles twice: pass 1 computes each tile's S and
// keeps only the row's running max m and sum l (per lane, l·exp(m − m') when the max grows; all
// warps take part in every barrier, a warp past T computes nothing); pass 2 computes S again (the
// same products in the same order: the same bits), P from the final m and l exactly as in one
// tile, and accumulates P·V across tiles.
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
// NaN for ctx (its P is NaN) and lse, as the GEMM path. Past one tile l carries one more rounding
// a tile where the max grows (the factor exp(m − m') and the product); where it never grows after
// the first tile (the factor is exp(0) = 1) l is the one-tile sum in another order.
//
// Shared memory (bytes): 2·(64·(d + 8) + kt·(d + 8) + d·(kt + 8)) + 4·Tp, kt = min(Tp, 128); at
// T = 128: 44.5 KiB (d = 64), 24 KiB (d = 32), 13.75 KiB (d = 16); at T = 512, d = 64: 46 KiB.
// Within the 48 KiB a kernel gets without an opt-in, so the launcher sets no attribute
// (attention_mma_smem_bytes in src/cuda/attention_gemm.rs is the same formula).
//
// ptxas (NVRTC 13.0, tests/nvrtc_compile.rs), registers sm_80 / sm_90, no spills: d64 105-107 /
// 146, d32 103-106 / 141, d16 103-106 / 128. P is packed into its 32 fragment registers before the
// first P·V product, so S's 64 floats die first (packing inside the P·V loop held both: 152 on
// sm_90). On sm_90 that is 3 blocks (12 warps) an SM at d = 64; a cap of 128 spills 4 B, so there
// is none. The SASS of the d64 kernel has 128 HMMA (64 for S, 64 for P·V) and no local memory.
// The long kernel (T > 128, d = 64): 168 / 168 under __launch_bounds__(128, 3), 3 blocks an SM
// (183 without the bound: 2); o stays live across tiles beside S and P's fragments.

#define ATTN_MMA_WARPS 4
#define ATTN_MMA_ROWS (16 * ATTN_MMA_WARPS)  // query rows a block
#define ATTN_MMA_KEY_TILE 128                 // keys a warp's S holds at a time
#define ATTN_MMA_NTILES (ATTN_MMA_KEY_TILE / 8)  // n-tiles of 8 keys in a key tile

// The block's shared-memory regions (16-bit elements; the mask row as f32) for T = seq: the Q
// rows, one key tile of K rows and of Vᵀ, and the whole mask row.
struct AttnMmaSmem {
    int kp;   // keys padded to whole 16-key k slices
    int kt;   // rows of a key tile: min(kp, ATTN_MMA_KEY_TILE)
    int ldk;  // Q and K row stride: d + 8
    int ldv;  // Vᵀ row stride: kt + 8
    unsigned short* q;
    unsigned short* k;
    unsigned short* vt;
    float* mask;
};

template <int D>
__device__ __forceinline__ AttnMmaSmem attn_mma_smem(void* base, int seq) {
    AttnMmaSmem s;
    s.kp = (seq + 15) & ~15;
    s.kt = s.kp < ATTN_MMA_KEY_TILE ? s.kp : ATTN_MMA_KEY_TILE;
    s.ldk = D + 8;
    s.ldv = s.kt + 8;
    s.q = static_cast<unsigned short*>(base);
    s.k = s.q + ATTN_MMA_ROWS * s.ldk;
    s.vt = s.k + s.kt * s.ldk;
    s.mask = reinterpret_cast<float*>(s.vt + D * s.ldv);  // an even element offset: 4-byte aligned
    return s;
}

__device__ __forceinline__ int attn_mma_min(int a, int b) { return a < b ? a : b; }

// One 32-bit mma register (two 16-bit elements, the lower index low) from shared memory.
__device__ __forceinline__ unsigned attn_mma_ld32(const unsigned short* p) { return *reinterpret_cast<const unsigned*>(p); }

// Copies the block's Q rows q0.. (zero past T) and the mask row into shared memory; no barrier.
template <typename T, int D>
__device__ __forceinline__ void attn_mma_stage_queries(const AttnMmaSmem& sm, const T* __restrict__ head, const float* __restrict__ mask_row, int q0, int seq, int hidden) {
    constexpr int UNITS = D / 8;  // 16-byte units of a head's row
    const size_t row_stride = 3 * (size_t)hidden;
    const AttnBits16 zero = {{0u, 0u, 0u, 0u}};
    for (int u = threadIdx.x; u < ATTN_MMA_ROWS * UNITS; u += blockDim.x) {
        const int r = u / UNITS, c = (u % UNITS) * 8;
        const int i = q0 + r;
        const AttnBits16 v = i < seq ? *reinterpret_cast<const AttnBits16*>(head + (size_t)i * row_stride + c) : zero;
        *reinterpret_cast<AttnBits16*>(sm.q + r * sm.ldk + c) = v;
    }
    for (int j = threadIdx.x; j < sm.kp; j += blockDim.x) {
        sm.mask[j] = j < seq ? mask_row[j] : 0.0f;  // past T the score is -inf, not read from here
    }
}

// Copies the key tile k0 .. k0 + kt − 1 of K (and, with `with_v`, of Vᵀ) into shared memory (zero
// past T); no barrier. `head` is the (b, h) head's Q columns of row 0 of qkv.
template <typename T, int D>
__device__ __forceinline__ void attn_mma_stage_keys(const AttnMmaSmem& sm, const T* __restrict__ head, int k0, int seq, int hidden, bool with_v) {
    constexpr int UNITS = D / 8;
    const size_t row_stride = 3 * (size_t)hidden;
    const AttnBits16 zero = {{0u, 0u, 0u, 0u}};
    for (int u = threadIdx.x; u < sm.kt * UNITS; u += blockDim.x) {
        const int j = u / UNITS, c = (u % UNITS) * 8;
        const AttnBits16 v = k0 + j < seq ? *reinterpret_cast<const AttnBits16*>(head + (size_t)(k0 + j) * row_stride + hidden + c) : zero;
        *reinterpret_cast<AttnBits16*>(sm.k + j * sm.ldk + c) = v;
    }
    if (!with_v) {
        return;
    }
    for (int u = threadIdx.x; u < sm.kt * UNITS; u += blockDim.x) {
        const int j = u % sm.kt, c = (u / sm.kt) * 8;
        const AttnBits16 v = k0 + j < seq ? *reinterpret_cast<const AttnBits16*>(head + (size_t)(k0 + j) * row_stride + 2 * (size_t)hidden + c) : zero;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            sm.vt[(c + e) * sm.ldv + j] = (unsigned short)(v.w[e >> 1] >> (16 * (e & 1)));
        }
    }
}

// The dropout factors of this lane's keys 8n + 2t, +1 (n0 = 8n) for rows i_lo (g) and i_hi (g + 8):
// the lanes t and t ^ 1 share the group of 4 keys j0; the even one draws row i_lo's factors, the
// odd one row i_hi's, and each hands the other the pair it needs. (Eval runs the same kernels at
// rate 0: every factor is 1, so P is exp(s − m)·(1/l)·1, the eval value bit for bit.)
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

// The factor of a kept key, 1/(1 − rate) (1 at rate 0): what attn_mma_factors returns for a key
// it keeps.
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

// The warp's scores against the staged key tile (keys k0 + 8n + 2t, +1; n-tiles below kn):
// s = f32(Q·Kᵀ·scale) + mask, −inf past T; returns this lane's maxima of rows g and g + 8. The
// same operands in the same order every call, so a recomputed tile has the same bits.
template <typename T, int D>
__device__ __forceinline__ void attn_mma_tile_scores(float (&s)[ATTN_MMA_NTILES][4], const AttnMmaSmem& sm, int r0, int k0, int kn, int seq, float scale, float& m_lo, float& m_hi) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const T* tag = nullptr;  // picks the bf16 or f16 mma
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
            if (8 * n < kn) {
                const unsigned short* kb = sm.k + (8 * n + g) * sm.ldk + 16 * ks + 2 * t;
                const unsigned bk[2] = {attn_mma_ld32(kb), attn_mma_ld32(kb + 8)};
                const float c[4] = {s[n][0], s[n][1], s[n][2], s[n][3]};
                mma_m16n8k16(tag, s[n], a, bk, c);
            }
        }
    }
    m_lo = attn_neg_inf();
    m_hi = attn_neg_inf();
#pragma unroll
    for (int n = 0; n < ATTN_MMA_NTILES; ++n) {
        if (8 * n < kn) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int j = k0 + 8 * n + 2 * t + e;
                const bool in = j < seq;
                const float bias = in ? sm.mask[j] : 0.0f;
                s[n][e] = in ? attn_mul_rn(s[n][e], scale) + bias : attn_neg_inf();
                s[n][2 + e] = in ? attn_mul_rn(s[n][2 + e], scale) + bias : attn_neg_inf();
                m_lo = fmaxf(m_lo, s[n][e]);
                m_hi = fmaxf(m_hi, s[n][2 + e]);
            }
        }
    }
}

// exp(s − ref) in place (rows g: elements 0, 1; g + 8: 2, 3); adds them to this lane's sums.
__device__ __forceinline__ void attn_mma_tile_exps(float (&s)[ATTN_MMA_NTILES][4], int kn, float ref_lo, float ref_hi, float& l_lo, float& l_hi) {
#pragma unroll
    for (int n = 0; n < ATTN_MMA_NTILES; ++n) {
        if (8 * n < kn) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                s[n][e] = expf(s[n][e] - ref_lo);
                s[n][2 + e] = expf(s[n][2 + e] - ref_hi);
                l_lo += s[n][e];
                l_hi += s[n][2 + e];
            }
        }
    }
}

// O += P·V over the staged key tile: P = e·(1/l)·f (e the tile's exps in place of s; NaN for a
// dead row), rounded to T and packed into the A fragments of P·V (k slice ks: n-tiles 2ks,
// 2ks + 1) before any product, 32 registers in place of the 64 floats of e, which die here.
template <typename T, int D>
__device__ __forceinline__ void attn_mma_tile_pv(float (&o)[D / 8][4], const float (&e)[ATTN_MMA_NTILES][4], const AttnMmaSmem& sm, int kn, float inv_lo, float inv_hi, bool dead_lo, bool dead_hi, const AttnPhiloxDropout& dropout, int b, int h, int i_lo, int i_hi, int k0) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const T* tag = nullptr;
    unsigned pa[ATTN_MMA_NTILES / 2][4];
#pragma unroll
    for (int ks = 0; ks < ATTN_MMA_NTILES / 2; ++ks) {
        if (16 * ks < kn) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int n = 2 * ks + half;
                float f_lo[2], f_hi[2];
                attn_mma_factors(dropout, b, h, i_lo, i_hi, k0 + 8 * n, t, f_lo, f_hi);
                const float p0 = dead_lo ? attn_nan() : e[n][0] * inv_lo * f_lo[0];
                const float p1 = dead_lo ? attn_nan() : e[n][1] * inv_lo * f_lo[1];
                const float p2 = dead_hi ? attn_nan() : e[n][2] * inv_hi * f_hi[0];
                const float p3 = dead_hi ? attn_nan() : e[n][3] * inv_hi * f_hi[1];
                pa[ks][2 * half] = pack2(tag, p0, p1);
                pa[ks][2 * half + 1] = pack2(tag, p2, p3);
            }
        }
    }
#pragma unroll
    for (int ks = 0; ks < ATTN_MMA_NTILES / 2; ++ks) {
        if (16 * ks < kn) {
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                const unsigned short* vb = sm.vt + (8 * dn + g) * sm.ldv + 16 * ks + 2 * t;
                const unsigned bv[2] = {attn_mma_ld32(vb), attn_mma_ld32(vb + 8)};
                const float c[4] = {o[dn][0], o[dn][1], o[dn][2], o[dn][3]};
                mma_m16n8k16(tag, o[dn], pa[ks], bv, c);
            }
        }
    }
}

// ctx pairs of rows i_lo, i_hi (rounded once) and their lse (lane t = 0).
template <typename T, int D>
__device__ __forceinline__ void attn_mma_store_forward(T* __restrict__ ctx, float* __restrict__ lse, const float (&o)[D / 8][4], int b, int h, int i_lo, int i_hi, int seq, int hidden, int heads, float m_lo, float m_hi, float l_lo, float l_hi, bool dead_lo, bool dead_hi) {
    const int t = threadIdx.x & 3;
    const T* tag = nullptr;  // picks the bf16 or f16 packing
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

template <int D>
__device__ __forceinline__ void attn_mma_zero_acc(float (&acc)[D / 8][4]) {
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
        acc[dn][0] = acc[dn][1] = acc[dn][2] = acc[dn][3] = 0.0f;
    }
}

// One key tile (T <= 128): S stays in registers from the max to P.
template <typename T, int D, typename Dropout>
__device__ __forceinline__ void attn_mma_forward_body(T* __restrict__ ctx, float* __restrict__ lse, const T* __restrict__ qkv, const float* __restrict__ mask_bias, int seq, int hidden, int heads, int mask_rows, float scale, Dropout dropout) {
    static_assert(D % 16 == 0 && D <= 64, "d a multiple of 16 up to 64");
    extern __shared__ AttnVec4 attn_smem[];
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * ATTN_MMA_ROWS;
    const AttnMmaSmem sm = attn_mma_smem<D>(attn_smem, seq);
    const T* head = qkv + (size_t)b * (size_t)seq * 3 * (size_t)hidden + (size_t)(h * D);
    attn_mma_stage_queries<T, D>(sm, head, mask_bias + (size_t)attn_mask_row(b, mask_rows) * (size_t)seq, q0, seq, hidden);
    attn_mma_stage_keys<T, D>(sm, head, 0, seq, hidden, true);
    __syncthreads();
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2;
    const int r0 = 16 * warp;  // the warp's first row of the block's Q tile
    if (q0 + r0 >= seq) {
        return;  // warp-uniform; no barrier follows
    }
    const int i_lo = q0 + r0 + g, i_hi = i_lo + 8;
    float s[ATTN_MMA_NTILES][4];
    float m_lo, m_hi, l_lo = 0.0f, l_hi = 0.0f;
    attn_mma_tile_scores<T, D>(s, sm, r0, 0, sm.kp, seq, scale, m_lo, m_hi);
    m_lo = attn_mma_row_max(m_lo);
    m_hi = attn_mma_row_max(m_hi);
    // Every score -inf: subtract 0 instead (exp(-inf) = 0, not NaN), and write NaN below.
    const bool dead_lo = m_lo == attn_neg_inf(), dead_hi = m_hi == attn_neg_inf();
    attn_mma_tile_exps(s, sm.kp, dead_lo ? 0.0f : m_lo, dead_hi ? 0.0f : m_hi, l_lo, l_hi);
    l_lo = attn_mma_row_sum(l_lo);
    l_hi = attn_mma_row_sum(l_hi);
    float o[D / 8][4];
    attn_mma_zero_acc<D>(o);
    attn_mma_tile_pv<T, D>(o, s, sm, sm.kp, 1.0f / l_lo, 1.0f / l_hi, dead_lo, dead_hi, dropout, b, h, i_lo, i_hi, 0);
    attn_mma_store_forward<T, D>(ctx, lse, o, b, h, i_lo, i_hi, seq, hidden, heads, m_lo, m_hi, l_lo, l_hi, dead_lo, dead_hi);
}

// Key tiles (T > 128), walked twice in one loop (one copy of the tile's code): pass 1 keeps the
// row's running max and sum (l·exp(m − m') per lane when the max grows: a row's 4 lanes share
// m); pass 2 computes the same S again (the same bits), P from the final m and l exactly as in
// one tile, and accumulates P·V. Every warp takes part in every barrier.
template <typename T, int D, typename Dropout>
__device__ __forceinline__ void attn_mma_forward_long_body(T* __restrict__ ctx, float* __restrict__ lse, const T* __restrict__ qkv, const float* __restrict__ mask_bias, int seq, int hidden, int heads, int mask_rows, float scale, Dropout dropout) {
    static_assert(D % 16 == 0 && D <= 64, "d a multiple of 16 up to 64");
    extern __shared__ AttnVec4 attn_smem[];
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * ATTN_MMA_ROWS;
    const AttnMmaSmem sm = attn_mma_smem<D>(attn_smem, seq);
    const T* head = qkv + (size_t)b * (size_t)seq * 3 * (size_t)hidden + (size_t)(h * D);
    attn_mma_stage_queries<T, D>(sm, head, mask_bias + (size_t)attn_mask_row(b, mask_rows) * (size_t)seq, q0, seq, hidden);
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2;
    const int r0 = 16 * warp;
    const bool active = q0 + r0 < seq;  // warp-uniform
    const int i_lo = q0 + r0 + g, i_hi = i_lo + 8;
    const int tiles = (sm.kp + ATTN_MMA_KEY_TILE - 1) / ATTN_MMA_KEY_TILE;
    float o[D / 8][4];
    attn_mma_zero_acc<D>(o);
    float m_lo = attn_neg_inf(), m_hi = attn_neg_inf(), l_lo = 0.0f, l_hi = 0.0f;
    float ref_lo = 0.0f, ref_hi = 0.0f, inv_lo = 0.0f, inv_hi = 0.0f;
    for (int it = 0; it < 2 * tiles; ++it) {
        const bool second = it >= tiles;
        const int k0 = (second ? it - tiles : it) * ATTN_MMA_KEY_TILE;
        const int kn = attn_mma_min(sm.kt, sm.kp - k0);
        __syncthreads();  // the previous tile's reads are done
        attn_mma_stage_keys<T, D>(sm, head, k0, seq, hidden, second);
        __syncthreads();
        if (!active) {
            continue;
        }
        if (it == tiles) {
            // The final row max and sum.
            l_lo = attn_mma_row_sum(l_lo);
            l_hi = attn_mma_row_sum(l_hi);
            ref_lo = m_lo == attn_neg_inf() ? 0.0f : m_lo;
            ref_hi = m_hi == attn_neg_inf() ? 0.0f : m_hi;
            inv_lo = 1.0f / l_lo;
            inv_hi = 1.0f / l_hi;
        }
        float s[ATTN_MMA_NTILES][4];
        float tm_lo, tm_hi;
        attn_mma_tile_scores<T, D>(s, sm, r0, k0, kn, seq, scale, tm_lo, tm_hi);
        if (!second) {
            const float new_lo = fmaxf(m_lo, attn_mma_row_max(tm_lo)), new_hi = fmaxf(m_hi, attn_mma_row_max(tm_hi));
            // l is 0 while m is -inf (no factor: exp(-inf − -inf) is NaN).
            l_lo = m_lo == attn_neg_inf() ? 0.0f : l_lo * expf(m_lo - new_lo);
            l_hi = m_hi == attn_neg_inf() ? 0.0f : l_hi * expf(m_hi - new_hi);
            m_lo = new_lo;
            m_hi = new_hi;
            attn_mma_tile_exps(s, kn, m_lo == attn_neg_inf() ? 0.0f : m_lo, m_hi == attn_neg_inf() ? 0.0f : m_hi, l_lo, l_hi);
        } else {
            float unused_lo = 0.0f, unused_hi = 0.0f;
            attn_mma_tile_exps(s, kn, ref_lo, ref_hi, unused_lo, unused_hi);
            attn_mma_tile_pv<T, D>(o, s, sm, kn, inv_lo, inv_hi, m_lo == attn_neg_inf(), m_hi == attn_neg_inf(), dropout, b, h, i_lo, i_hi, k0);
        }
    }
    if (active) {
        attn_mma_store_forward<T, D>(ctx, lse, o, b, h, i_lo, i_hi, seq, hidden, heads, m_lo, m_hi, l_lo, l_hi, m_lo == attn_neg_inf(), m_hi == attn_neg_inf());
    }
}

// ---- the tensor-core backward scores: S, dP and the row step of the GEMM backward in one launch --
//
// attention_mma_backward_scores_dropout_{bf16io,f16io}_d{16,32,64}: what the GEMM backward's
// S = Q·Kᵀ and dP = dO·Vᵀ products (f32 out) and its row kernel (attention_gemm_softmax_backward,
// above) compute, in one kernel for T <= 512: P∘M and dS ([B·heads, T, T], the storage type),
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
// Past one key tile (T > 128) the block stages one tile of 128 keys of K and V at a time between
// two barriers and walks the tiles in passes, each recomputing the tile's S (and dP) from the
// same operands in the same order (the same bits): pass 0 only where a row of the block needs the
// exact normaliser below (a block-wide vote), summing p; pass 1 D; pass 2 the outputs (the
// dropout factors drawn again for the tile's kept bits). All warps take part in every barrier.
//
// Numerics: the row kernel's, step for step: p = exp(f32(S·scale) + mask − lse), times c =
// 1 / Σ_j p_j where |lse| >= ATTN_BWD_EXACT_LSE (then the row's sum over its 4 lanes), g = dP·f,
// D by fma per lane, P∘M = p·f (f is 0 or the kept factor: the row kernel's kept-bit product,
// bit for bit), dS = p·(g − D). S, dP and D differ from the GEMM path only in summation order, so
// P∘M and dS agree with it to one 16-bit ulp where a rounding boundary lies between; the tests hold
// dQ, dK and dV to the 2x-plain rule, and bit for bit where every rounding is exact. A NaN lse
// (a row masked on every key) gives NaN downstream, as in the GEMM path.
//
// Shared memory (bytes): 4·kt·(d + 8) + 4·Tp, kt = min(Tp, 128): 36.5 KiB at d = 64, T = 128,
// 38 KiB at T = 512 (no opt-in).
//
// ptxas (NVRTC 13.0), registers sm_80 / sm_90, no spills: 124-140 / 164-166 (3 blocks an SM on
// sm_90). Keeping g = dP·f in registers beside p cost 234 with
// dropout; the second pass recomputing dP (tensor-core work, cheap here) and the factors kept as
// one bit a key brought it to 166. The long kernel: 152-153 / 156-157 (Q's A fragments are loaded per
// k slice in each pass rather than held beside dO's: holding both spilled 4-40 B).

// The backward scores' shared memory: one key tile of K and V rows ([kt][d + 8], 16-bit) and the
// whole mask row (f32).
struct AttnMmaBwdSmem {
    int kp, kt, ld;
    unsigned short* k;
    unsigned short* v;
    float* mask;
};

// Copies the key tile k0 .. k0 + kt − 1 of K and V (zero past T) into shared memory; no barrier.
template <typename T, int D>
__device__ __forceinline__ void attn_mma_bwd_stage_keys(const AttnMmaBwdSmem& sm, const T* __restrict__ head, int k0, int seq, int hidden) {
    constexpr int UNITS = D / 8;  // 16-byte units of a head's row
    const size_t qkv_stride = 3 * (size_t)hidden;
    const AttnBits16 zero = {{0u, 0u, 0u, 0u}};
    for (int u = threadIdx.x; u < 2 * sm.kt * UNITS; u += blockDim.x) {
        const int part = u / (sm.kt * UNITS);  // 0: K, 1: V
        const int rest = u - part * sm.kt * UNITS;
        const int j = rest / UNITS, c = (rest % UNITS) * 8;
        const AttnBits16 v = k0 + j < seq ? *reinterpret_cast<const AttnBits16*>(head + (size_t)(k0 + j) * qkv_stride + (size_t)(1 + part) * (size_t)hidden + c) : zero;
        *reinterpret_cast<AttnBits16*>((part == 0 ? sm.k : sm.v) + j * sm.ld + c) = v;
    }
}

// The warp's rows i_lo (g) and i_hi (g + 8) of the backward: the A fragments of Q and dO (from
// global memory) and what a key tile's steps need.
template <typename T, int D>
struct AttnMmaBwdRows {
    int b, h, i_lo, i_hi, seq;
    bool in_lo, in_hi;
    float lse_lo, lse_hi;
    // The A fragment of rows i_lo, i_hi at columns k0 + 2t (+ 8) of a [B·T, stride] array (zero past T).
    __device__ __forceinline__ void fragment(const T* base, size_t stride, int k0, unsigned (&a)[4]) const {
        const int t = threadIdx.x & 3;
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
    }
};

// p = exp(f32(S·scale) + mask − lse) against the staged key tile (0 past T), S = Q·Kᵀ with Q's A
// fragments loaded from global memory one k slice at a time (no registers held for them between
// tiles); adds p to this lane's row sums.
template <typename T, int D>
__device__ __forceinline__ void attn_mma_bwd_tile_p(float (&p)[ATTN_MMA_NTILES][4], const AttnMmaBwdSmem& sm, const AttnMmaBwdRows<T, D>& rows, const T* __restrict__ qkv, int hidden, int k0, int kn, float scale, float& sum_lo, float& sum_hi) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const T* tag = nullptr;
#pragma unroll
    for (int n = 0; n < ATTN_MMA_NTILES; ++n) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            p[n][q] = 0.0f;
        }
    }
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        unsigned a_q[4];
        rows.fragment(qkv, 3 * (size_t)hidden, 16 * ks, a_q);
#pragma unroll
        for (int n = 0; n < ATTN_MMA_NTILES; ++n) {
            if (8 * n < kn) {
                const unsigned short* kb = sm.k + (8 * n + g) * sm.ld + 16 * ks + 2 * t;
                const unsigned bk[2] = {attn_mma_ld32(kb), attn_mma_ld32(kb + 8)};
                const float c[4] = {p[n][0], p[n][1], p[n][2], p[n][3]};
                mma_m16n8k16(tag, p[n], a_q, bk, c);
            }
        }
    }
#pragma unroll
    for (int n = 0; n < ATTN_MMA_NTILES; ++n) {
        if (8 * n < kn) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int j = k0 + 8 * n + 2 * t + e;
                const bool in = j < rows.seq;
                const float bias = in ? sm.mask[j] : 0.0f;
                p[n][e] = in ? expf(attn_mul_rn(p[n][e], scale) + bias - rows.lse_lo) : 0.0f;
                p[n][2 + e] = in ? expf(attn_mul_rn(p[n][2 + e], scale) + bias - rows.lse_hi) : 0.0f;
                sum_lo += p[n][e];
                sum_hi += p[n][2 + e];
            }
        }
    }
}

// p·c in the rows whose normaliser is exact (|lse| >= ATTN_BWD_EXACT_LSE), p elsewhere.
__device__ __forceinline__ void attn_mma_bwd_normalise(float (&p)[ATTN_MMA_NTILES][4], bool exact_lo, bool exact_hi, float c_lo, float c_hi) {
#pragma unroll
    for (int n = 0; n < ATTN_MMA_NTILES; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            p[n][e] = exact_lo ? p[n][e] * c_lo : p[n][e];
            p[n][2 + e] = exact_hi ? p[n][2 + e] * c_hi : p[n][2 + e];
        }
    }
}

// dP = dO·Vᵀ for n-tile n of the staged key tile (the same products in the same order every call,
// so a recomputed tile has the same bits).
template <typename T, int D>
__device__ __forceinline__ void attn_mma_bwd_dp(float (&acc)[4], const AttnMmaBwdSmem& sm, const unsigned (&a_do)[D / 16][4], int n) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const T* tag = nullptr;
    acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        const unsigned short* vb = sm.v + (8 * n + g) * sm.ld + 16 * ks + 2 * t;
        const unsigned bv[2] = {attn_mma_ld32(vb), attn_mma_ld32(vb + 8)};
        const float c[4] = {acc[0], acc[1], acc[2], acc[3]};
        mma_m16n8k16(tag, acc, a_do[ks], bv, c);
    }
}

// The kept keys of the staged key tile as bits (bit 2n + e: key k0 + 8n + 2t + e is kept), as
// attn_mma_bwd_tile_d records them, without dP.
__device__ __forceinline__ void attn_mma_bwd_tile_keep(const AttnPhiloxDropout& dropout, int b, int h, int i_lo, int i_hi, int k0, int kn, unsigned& keep_lo, unsigned& keep_hi) {
    const int t = threadIdx.x & 3;
    keep_lo = keep_hi = 0u;
#pragma unroll
    for (int n = 0; n < ATTN_MMA_NTILES; ++n) {
        if (8 * n < kn) {
            float f_lo[2], f_hi[2];
            attn_mma_factors(dropout, b, h, i_lo, i_hi, k0 + 8 * n, t, f_lo, f_hi);
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                keep_lo |= (f_lo[e] != 0.0f ? 1u : 0u) << (2 * n + e);
                keep_hi |= (f_hi[e] != 0.0f ? 1u : 0u) << (2 * n + e);
            }
        }
    }
}

// D += Σ p·g per lane over the staged key tile, g = dP·f; records the kept keys as bits
// (bit 2n + e: key k0 + 8n + 2t + e is kept) for a caller that stores P∘M and dS from one tile.
template <typename T, int D>
__device__ __forceinline__ void attn_mma_bwd_tile_d(const float (&p)[ATTN_MMA_NTILES][4], const AttnMmaBwdSmem& sm, const AttnMmaBwdRows<T, D>& rows, const unsigned (&a_do)[D / 16][4], const AttnPhiloxDropout& dropout, int k0, int kn, float& d_lo, float& d_hi, unsigned& keep_lo, unsigned& keep_hi) {
    const int t = threadIdx.x & 3;
    keep_lo = keep_hi = 0u;
#pragma unroll
    for (int n = 0; n < ATTN_MMA_NTILES; ++n) {
        if (8 * n < kn) {
            float acc[4];
            attn_mma_bwd_dp<T, D>(acc, sm, a_do, n);
            float f_lo[2], f_hi[2];
            attn_mma_factors(dropout, rows.b, rows.h, rows.i_lo, rows.i_hi, k0 + 8 * n, t, f_lo, f_hi);
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const bool in = k0 + 8 * n + 2 * t + e < rows.seq;
                keep_lo |= (f_lo[e] != 0.0f ? 1u : 0u) << (2 * n + e);
                keep_hi |= (f_hi[e] != 0.0f ? 1u : 0u) << (2 * n + e);
                d_lo = fmaf(p[n][e], in ? acc[e] * f_lo[e] : 0.0f, d_lo);
                d_hi = fmaf(p[n][2 + e], in ? acc[2 + e] * f_hi[e] : 0.0f, d_hi);
            }
        }
    }
}

// P∘M = p·f and dS = p·(g − D) over the staged key tile, rounded once each; pairs of keys where
// `pairs` (T even, rows 4-byte aligned), scalars otherwise. The kept keys come from the bits of
// attn_mma_bwd_tile_d.
template <typename T, int D>
__device__ __forceinline__ void attn_mma_bwd_tile_out(T* __restrict__ pd, T* __restrict__ ds, const float (&p)[ATTN_MMA_NTILES][4], const AttnMmaBwdSmem& sm, const AttnMmaBwdRows<T, D>& rows, const unsigned (&a_do)[D / 16][4], int heads, float kept, int k0, int kn, float d_lo, float d_hi, unsigned keep_lo, unsigned keep_hi, bool pairs) {
    const int t = threadIdx.x & 3;
    const T* tag = nullptr;
    const int seq = rows.seq;
    const size_t row_lo = ((size_t)rows.b * (size_t)heads + (size_t)rows.h) * (size_t)seq + (size_t)rows.i_lo;
#pragma unroll
    for (int n = 0; n < ATTN_MMA_NTILES; ++n) {
        const int j = k0 + 8 * n + 2 * t;
        if (8 * n < kn) {
            float acc[4];
            attn_mma_bwd_dp<T, D>(acc, sm, a_do, n);  // warp-wide (mma): before any lane-dependent branch
            if (j < seq) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    if (r == 0 ? !rows.in_lo : !rows.in_hi) {
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

// The backward scores' block and warp setup: the shared-memory layout, the mask row staged (no
// barrier), the warp's rows with their lse; returns whether the warp has a row below T.
template <typename T, int D>
__device__ __forceinline__ bool attn_mma_bwd_setup(AttnMmaBwdSmem& sm, AttnMmaBwdRows<T, D>& rows, const float* __restrict__ lse, const float* __restrict__ mask_bias, int seq, int heads, int mask_rows) {
    extern __shared__ AttnVec4 attn_smem[];
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * ATTN_MMA_ROWS;
    sm.kp = (seq + 15) & ~15;
    sm.kt = sm.kp < ATTN_MMA_KEY_TILE ? sm.kp : ATTN_MMA_KEY_TILE;
    sm.ld = D + 8;
    sm.k = reinterpret_cast<unsigned short*>(attn_smem);
    sm.v = sm.k + sm.kt * sm.ld;
    sm.mask = reinterpret_cast<float*>(sm.v + sm.kt * sm.ld);  // an even element offset: 4-byte aligned
    const float* mask_row = mask_bias + (size_t)attn_mask_row(b, mask_rows) * (size_t)seq;
    for (int j = threadIdx.x; j < sm.kp; j += blockDim.x) {
        sm.mask[j] = j < seq ? mask_row[j] : 0.0f;  // past T p is 0, not read from here
    }
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2;
    rows.b = b;
    rows.h = h;
    rows.seq = seq;
    rows.i_lo = q0 + 16 * warp + g;
    rows.i_hi = rows.i_lo + 8;
    rows.in_lo = rows.i_lo < seq;
    rows.in_hi = rows.i_hi < seq;
    const float* lse_bh = lse + ((size_t)b * (size_t)heads + (size_t)h) * (size_t)seq;
    rows.lse_lo = rows.in_lo ? lse_bh[rows.i_lo] : 0.0f;
    rows.lse_hi = rows.in_hi ? lse_bh[rows.i_hi] : 0.0f;
    return q0 + 16 * warp < seq;  // warp-uniform
}

// Whether P∘M and dS can be stored as pairs of keys: T even and both arrays 4-byte aligned.
template <typename T>
__device__ __forceinline__ bool attn_mma_bwd_pairs(const T* pd, const T* ds, int seq) {
    return seq % 2 == 0 && ((unsigned long long)pd & 3ull) == 0 && ((unsigned long long)ds & 3ull) == 0;
}

// One key tile (T <= 128): p stays in registers; dP is computed twice (for D, then for the
// outputs) rather than kept beside it, and the dropout factors are one bit a key.
template <typename T, int D, typename Dropout>
__device__ __forceinline__ void attn_mma_backward_scores_body(T* __restrict__ pd, T* __restrict__ ds, const T* __restrict__ qkv, const T* __restrict__ dctx, const float* __restrict__ lse, const float* __restrict__ mask_bias, int seq, int hidden, int heads, int mask_rows, float scale, Dropout dropout) {
    static_assert(D % 16 == 0 && D <= 64, "d a multiple of 16 up to 64");
    AttnMmaBwdSmem sm;
    AttnMmaBwdRows<T, D> rows;
    unsigned a_do[D / 16][4];
    const bool active = attn_mma_bwd_setup<T, D>(sm, rows, lse, mask_bias, seq, heads, mask_rows);
    const T* head = qkv + (size_t)rows.b * (size_t)seq * 3 * (size_t)hidden + (size_t)(rows.h * D);
    attn_mma_bwd_stage_keys<T, D>(sm, head, 0, seq, hidden);
    __syncthreads();
    if (!active) {
        return;  // no barrier follows
    }
    float p[ATTN_MMA_NTILES][4];
    float sum_lo = 0.0f, sum_hi = 0.0f, d_lo = 0.0f, d_hi = 0.0f;
    attn_mma_bwd_tile_p<T, D>(p, sm, rows, qkv, hidden, 0, sm.kp, scale, sum_lo, sum_hi);
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        rows.fragment(dctx, (size_t)hidden, 16 * ks, a_do[ks]);  // after S: fewer registers live
    }
    // The row kernel's normaliser: exact only where the f32 lse is too coarse (the shuffles run
    // in every lane).
    sum_lo = attn_mma_row_sum(sum_lo);
    sum_hi = attn_mma_row_sum(sum_hi);
    attn_mma_bwd_normalise(p, fabsf(rows.lse_lo) >= ATTN_BWD_EXACT_LSE, fabsf(rows.lse_hi) >= ATTN_BWD_EXACT_LSE, 1.0f / sum_lo, 1.0f / sum_hi);
    unsigned keep_lo, keep_hi;
    attn_mma_bwd_tile_d<T, D>(p, sm, rows, a_do, dropout, 0, sm.kp, d_lo, d_hi, keep_lo, keep_hi);
    d_lo = attn_mma_row_sum(d_lo);
    d_hi = attn_mma_row_sum(d_hi);
    attn_mma_bwd_tile_out<T, D>(pd, ds, p, sm, rows, a_do, heads, attn_mma_kept(dropout), 0, sm.kp, d_lo, d_hi, keep_lo, keep_hi, attn_mma_bwd_pairs(pd, ds, seq));
}

// Key tiles (T > 128), p (and dP) recomputed per tile in each pass (the same bits), the passes
// one loop (one copy of the tile's code): pass 0, only where a row of the block needs the exact
// normaliser (a block-wide vote), sums p; pass 1 accumulates D; pass 2 stores P∘M and dS, the
// tile's kept bits drawn again. Every warp takes part in every barrier.
template <typename T, int D, typename Dropout>
__device__ __forceinline__ void attn_mma_backward_scores_long_body(T* __restrict__ pd, T* __restrict__ ds, const T* __restrict__ qkv, const T* __restrict__ dctx, const float* __restrict__ lse, const float* __restrict__ mask_bias, int seq, int hidden, int heads, int mask_rows, float scale, Dropout dropout) {
    static_assert(D % 16 == 0 && D <= 64, "d a multiple of 16 up to 64");
    AttnMmaBwdSmem sm;
    AttnMmaBwdRows<T, D> rows;
    unsigned a_do[D / 16][4];
    const bool active = attn_mma_bwd_setup<T, D>(sm, rows, lse, mask_bias, seq, heads, mask_rows);
    const T* head = qkv + (size_t)rows.b * (size_t)seq * 3 * (size_t)hidden + (size_t)(rows.h * D);
    if (active) {
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
            rows.fragment(dctx, (size_t)hidden, 16 * ks, a_do[ks]);
        }
    }
    const bool exact_lo = fabsf(rows.lse_lo) >= ATTN_BWD_EXACT_LSE, exact_hi = fabsf(rows.lse_hi) >= ATTN_BWD_EXACT_LSE;
    const bool pairs = attn_mma_bwd_pairs(pd, ds, seq);
    const float kept = attn_mma_kept(dropout);
    const int tiles = (sm.kp + ATTN_MMA_KEY_TILE - 1) / ATTN_MMA_KEY_TILE;
    // A block-wide vote: does a row of the block need the exact normaliser (rows past T have lse 0
    // here, so no flag)? An OR over the warp's lanes, then one flag a warp in shared memory.
    __shared__ int attn_mma_needs_sum[ATTN_MMA_WARPS];
    int vote = active && (exact_lo || exact_hi) ? 1 : 0;
#pragma unroll
    for (int lanes = 1; lanes < 32; lanes *= 2) {
        vote |= __shfl_xor_sync(FULL_WARP_MASK, vote, lanes);
    }
    if ((threadIdx.x & 31) == 0) {
        attn_mma_needs_sum[threadIdx.x >> 5] = vote;
    }
    __syncthreads();
    bool need_sum = false;
#pragma unroll
    for (int w = 0; w < ATTN_MMA_WARPS; ++w) {
        need_sum = need_sum || attn_mma_needs_sum[w] != 0;
    }
    float sum_lo = 0.0f, sum_hi = 0.0f, c_lo = 1.0f, c_hi = 1.0f, d_lo = 0.0f, d_hi = 0.0f;
    for (int it = need_sum ? 0 : tiles; it < 3 * tiles; ++it) {
        const int pass = it / tiles;
        const int k0 = (it - pass * tiles) * ATTN_MMA_KEY_TILE;
        const int kn = attn_mma_min(sm.kt, sm.kp - k0);
        __syncthreads();  // the previous tile's reads are done
        attn_mma_bwd_stage_keys<T, D>(sm, head, k0, seq, hidden);
        __syncthreads();
        if (!active) {
            continue;
        }
        if (it == tiles && need_sum) {
            c_lo = 1.0f / attn_mma_row_sum(sum_lo);
            c_hi = 1.0f / attn_mma_row_sum(sum_hi);
        }
        if (it == 2 * tiles) {
            d_lo = attn_mma_row_sum(d_lo);
            d_hi = attn_mma_row_sum(d_hi);
        }
        float p[ATTN_MMA_NTILES][4];
        attn_mma_bwd_tile_p<T, D>(p, sm, rows, qkv, hidden, k0, kn, scale, sum_lo, sum_hi);
        if (pass == 0) {
            continue;
        }
        attn_mma_bwd_normalise(p, exact_lo, exact_hi, c_lo, c_hi);  // an exact row voted, so c is its sum's
        unsigned keep_lo, keep_hi;
        if (pass == 1) {
            attn_mma_bwd_tile_d<T, D>(p, sm, rows, a_do, dropout, k0, kn, d_lo, d_hi, keep_lo, keep_hi);
        } else {
            attn_mma_bwd_tile_keep(dropout, rows.b, rows.h, rows.i_lo, rows.i_hi, k0, kn, keep_lo, keep_hi);
            attn_mma_bwd_tile_out<T, D>(pd, ds, p, sm, rows, a_do, heads, kept, k0, kn, d_lo, d_hi, keep_lo, keep_hi, pairs);
        }
    }
}


// ---- the tensor-core backward products: dQ, dK and dV in one launch, straight into dqkv --------
//
// attention_mma_backward_grads_{bf16io,f16io}_d{16,32,64}: the GEMM backward's three products and
// its layout copies (to_heads of qkv and of dO, dV = (P∘M)ᵀ·dO, dQ = scale·dS·K,
// dK = scale·dSᵀ·Q, from_heads) in one kernel for T <= 512, from the backward scores kernel's P∘M
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
// Past one tile (T > 128) the outputs are made one after the other, each over tiles of 128 keys
// (dQ) or query rows (dK, dV): between two barriers the block stages the one transposed operand
// that output needs for the tile, in a single [d][128 + 8] slot, and the warps add the tile's
// product to their accumulators.
//
// Numerics: the GEMM products' (f32 accumulation of exact 16-bit products, alpha = scale applied
// to the f32 sum, one rounding); only the summation order differs.
//
// Shared memory (bytes): 6·d·(Tp + 8) in one tile: 51 KiB at d = 64, T = 128 (the launcher opts
// in), 25.5 KiB at d = 32; past it 2·d·(128 + 8): 17 KiB at d = 64.
//
// ptxas (NVRTC 13.0), registers sm_80 / sm_90, no spills: d64 72 / 64, d32 46 / 52, d16 40 / 44;
// the long kernel 72 / 72.

// Element `idx` of `base` as the low 16 bits of an mma register half (0 where `ok` is false: the
// element is not read).
template <typename T>
__device__ __forceinline__ unsigned attn_mma_el(const T* base, size_t idx, bool ok) {
    return ok ? (unsigned)base[idx].bits : 0u;
}

// The A fragment (columns k0, k0 + 1 and k0 + 8, k0 + 9 of rows r_lo, r_hi) of a (b, h) block of
// scores m ([T, T], row = query), either orientation: rows r of m (A = m, for dQ), or with
// `columns` columns r (A = mᵀ, for dK and dV). Elements past T read as 0.
template <typename T>
struct AttnMmaScores {
    const T* m;
    int seq, r_lo, r_hi;
    bool in_lo, in_hi, columns;
    __device__ __forceinline__ unsigned el(int r, bool in, int k) const {
        const size_t idx = columns ? (size_t)k * (size_t)seq + (size_t)r : (size_t)r * (size_t)seq + (size_t)k;
        return attn_mma_el(m, idx, in && k < seq);
    }
    __device__ __forceinline__ void operator()(int k0, unsigned (&a)[4]) const {
        a[0] = el(r_lo, in_lo, k0) | el(r_lo, in_lo, k0 + 1) << 16;
        a[1] = el(r_hi, in_hi, k0) | el(r_hi, in_hi, k0 + 1) << 16;
        a[2] = el(r_lo, in_lo, k0 + 8) | el(r_lo, in_lo, k0 + 9) << 16;
        a[3] = el(r_hi, in_hi, k0 + 8) | el(r_hi, in_hi, k0 + 9) << 16;
    }
};

// Copies rows k0 .. k0 + kt − 1 of one (b, h) operand (which 0: K, 1: Q, 2: dO) transposed into
// dst ([d][ld], zero past T); no barrier.
template <typename T, int D>
__device__ __forceinline__ void attn_mma_grads_stage(unsigned short* dst, int ld, int which, const T* __restrict__ qkv, const T* __restrict__ dctx, int b, int h, int k0, int kt, int seq, int hidden) {
    constexpr int UNITS = D / 8;
    const size_t qkv_stride = 3 * (size_t)hidden;
    const AttnBits16 zero = {{0u, 0u, 0u, 0u}};
    for (int u = threadIdx.x; u < kt * UNITS; u += blockDim.x) {
        const int j = u % kt, c = (u / kt) * 8;
        const int row = k0 + j;
        const T* src = which == 2 ? dctx + ((size_t)b * (size_t)seq + (size_t)row) * (size_t)hidden
                                  : qkv + ((size_t)b * (size_t)seq + (size_t)row) * qkv_stride + (which == 0 ? (size_t)hidden : 0);
        const AttnBits16 v = row < seq ? *reinterpret_cast<const AttnBits16*>(src + (size_t)(h * D + c)) : zero;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            dst[(c + e) * ld + j] = (unsigned short)(v.w[e >> 1] >> (16 * (e & 1)));
        }
    }
}

// acc += A·B over the keys (or queries) k0 .. k0 + kn − 1: A's fragment for k columns
// k0 + 16ks + 2t (and + 8) from a_of(k, a), B from the staged transposed rows bt ([d][ld], tile
// column 16ks + 2t).
template <typename T, int D, typename AOf>
__device__ __forceinline__ void attn_mma_grads_product(float (&acc)[D / 8][4], const unsigned short* bt, int ld, int k0, int kn, AOf a_of) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const T* tag = nullptr;
#pragma unroll
    for (int ks = 0; ks < ATTN_MMA_NTILES / 2; ++ks) {
        if (16 * ks < kn) {
            unsigned a[4];
            a_of(k0 + 16 * ks + 2 * t, a);
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

// Rows r_lo, r_hi of one output (part 0: dQ, 1: dK, 2: dV) into the packed dqkv, times `alpha`,
// rounded once, as pairs.
template <typename T, int D>
__device__ __forceinline__ void attn_mma_grads_store(T* __restrict__ dqkv, int part, float alpha, const float (&acc)[D / 8][4], int b, int h, int r_lo, int r_hi, bool in_lo, bool in_hi, int seq, int hidden) {
    const T* tag = nullptr;
    const size_t qkv_stride = 3 * (size_t)hidden;
    const size_t col = (size_t)part * (size_t)hidden + (size_t)(h * D + 2 * (threadIdx.x & 3));
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
}

template <typename T, int D>
__device__ __forceinline__ void attn_mma_backward_grads_body(T* __restrict__ dqkv, const T* __restrict__ pd, const T* __restrict__ ds, const T* __restrict__ qkv, const T* __restrict__ dctx, int seq, int hidden, int heads, float scale) {
    static_assert(D % 16 == 0 && D <= 64, "d a multiple of 16 up to 64");
    extern __shared__ AttnVec4 attn_smem[];
    const int b = blockIdx.z, h = blockIdx.y, r0 = blockIdx.x * ATTN_MMA_ROWS;
    const int kp = (seq + 15) & ~15, ld = kp + 8;
    // Kᵀ, Qᵀ and dOᵀ, [d][Tp + 8] each, one after the other: the B operands of dQ, dK and dV.
    unsigned short* bt = reinterpret_cast<unsigned short*>(attn_smem);
    for (int which = 0; which < 3; ++which) {
        attn_mma_grads_stage<T, D>(bt + which * D * ld, ld, which, qkv, dctx, b, h, 0, kp, seq, hidden);
    }
    __syncthreads();
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2;
    if (r0 + 16 * warp >= seq) {
        return;  // warp-uniform; no barrier follows
    }
    const int r_lo = r0 + 16 * warp + g, r_hi = r_lo + 8;
    const bool in_lo = r_lo < seq, in_hi = r_hi < seq;
    const size_t bh_rows = ((size_t)b * (size_t)heads + (size_t)h) * (size_t)seq;  // the (b, h) block's first score row
    const T* ds_bh = ds + bh_rows * (size_t)seq;
    const T* pd_bh = pd + bh_rows * (size_t)seq;
    float acc[D / 8][4];
    // dQ = scale·dS·K: A = dS rows r. dK = scale·dSᵀ·Q and dV = (P∘M)ᵀ·dO: A = columns r of dS
    // and of P∘M.
#pragma unroll
    for (int which = 0; which < 3; ++which) {
        attn_mma_zero_acc<D>(acc);
        attn_mma_grads_product<T, D>(acc, bt + which * D * ld, ld, 0, kp, AttnMmaScores<T>{which == 2 ? pd_bh : ds_bh, seq, r_lo, r_hi, in_lo, in_hi, which != 0});
        attn_mma_grads_store<T, D>(dqkv, which, which == 2 ? 1.0f : scale, acc, b, h, r_lo, r_hi, in_lo, in_hi, seq, hidden);
    }
}

// Past one tile (T > 128): the outputs one after the other, each over tiles of 128 keys (dQ) or
// query rows (dK, dV); a tile stages the one transposed operand its output needs in one slot.
// Every warp takes part in every barrier.
template <typename T, int D>
__device__ __forceinline__ void attn_mma_backward_grads_long_body(T* __restrict__ dqkv, const T* __restrict__ pd, const T* __restrict__ ds, const T* __restrict__ qkv, const T* __restrict__ dctx, int seq, int hidden, int heads, float scale) {
    static_assert(D % 16 == 0 && D <= 64, "d a multiple of 16 up to 64");
    extern __shared__ AttnVec4 attn_smem[];
    const int b = blockIdx.z, h = blockIdx.y, r0 = blockIdx.x * ATTN_MMA_ROWS;
    const int kp = (seq + 15) & ~15, ld = ATTN_MMA_KEY_TILE + 8;
    unsigned short* bt = reinterpret_cast<unsigned short*>(attn_smem);  // [d][128 + 8]
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2;
    const bool active = r0 + 16 * warp < seq;  // warp-uniform
    const int r_lo = r0 + 16 * warp + g, r_hi = r_lo + 8;
    const bool in_lo = r_lo < seq, in_hi = r_hi < seq;
    const size_t bh_rows = ((size_t)b * (size_t)heads + (size_t)h) * (size_t)seq;
    const T* ds_bh = ds + bh_rows * (size_t)seq;
    const T* pd_bh = pd + bh_rows * (size_t)seq;
    const int tiles = (kp + ATTN_MMA_KEY_TILE - 1) / ATTN_MMA_KEY_TILE;
    float acc[D / 8][4];
    for (int it = 0; it < 3 * tiles; ++it) {
        const int which = it / tiles;  // 0: dQ (A = dS rows), 1: dK (dS columns), 2: dV (P∘M columns)
        const int k0 = (it - which * tiles) * ATTN_MMA_KEY_TILE;
        const int kn = attn_mma_min(ATTN_MMA_KEY_TILE, kp - k0);
        __syncthreads();  // the previous tile's reads are done
        attn_mma_grads_stage<T, D>(bt, ld, which, qkv, dctx, b, h, k0, kn, seq, hidden);
        __syncthreads();
        if (!active) {
            continue;
        }
        if (k0 == 0) {
            attn_mma_zero_acc<D>(acc);
        }
        attn_mma_grads_product<T, D>(acc, bt, ld, k0, kn, AttnMmaScores<T>{which == 2 ? pd_bh : ds_bh, seq, r_lo, r_hi, in_lo, in_hi, which != 0});
        if (k0 + kn == kp) {
            attn_mma_grads_store<T, D>(dqkv, which, which == 2 ? 1.0f : scale, acc, b, h, r_lo, r_hi, in_lo, in_hi, seq, hidden);
        }
    }
}

// Tensor-core forward: ctx, lse, qkv, mask_bias; seq (<= 512), hidden (heads·d), heads, mask_rows,
// scale, then the dropout policy's arguments, as the row kernels (eval passes rate 0: threshold 0,
// scale 1). Launch: grid (⌈T / 64⌉, heads, B), block 128, dynamic shared memory as the section
// header says. One kernel per storage type and d, training and eval alike: an eval twin would
// double what NVRTC compiles for a path whose hot use is training.
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

// Tensor-core backward scores: pd, ds, qkv, dctx, lse, mask_bias; seq (<= 512), hidden, heads,
// mask_rows, scale, then the dropout policy's arguments (rate 0 without dropout, as the forward).
// Launch: grid (⌈T / 64⌉, heads, B), block 128, dynamic shared memory as its section says.
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

// Tensor-core backward products: dqkv, pd, ds, qkv, dctx; seq (<= 512), hidden, heads, scale.
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

// ---- T > 128 (key tiles): the same kernels' long bodies, d = 64 only --------------------------
//
// Separate kernels so that the one-tile kernels above keep their registers (one body with both
// branches took the forward from 146 to 255 on sm_90) and compile time stays bounded: d = 64 only
// (BERT-base and -large, RoBERTa: the models trained at T up to 512); d 16 and 32 past T = 128 take
// the GEMM path. The same parameters as their one-tile kernels; launch: grid (⌈T / 64⌉, heads, B),
// block 128, the shared memory of attention_mma_smem_bytes / attention_mma_backward_smem_bytes /
// attention_mma_backward_grads_smem_bytes (src/cuda/attention_gemm.rs).
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS, 3) void attention_mma_forward_long_dropout_bf16io_d64(
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
    attn_mma_forward_long_body<bf16_raw, 64>(reinterpret_cast<bf16_raw*>(ctx), lse, reinterpret_cast<const bf16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS, 3) void attention_mma_forward_long_dropout_f16io_d64(
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
    attn_mma_forward_long_body<f16_raw, 64>(reinterpret_cast<f16_raw*>(ctx), lse, reinterpret_cast<const f16_raw*>(qkv), mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_scores_long_dropout_bf16io_d64(
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
    attn_mma_backward_scores_long_body<bf16_raw, 64>(reinterpret_cast<bf16_raw*>(pd), reinterpret_cast<bf16_raw*>(ds), reinterpret_cast<const bf16_raw*>(qkv), reinterpret_cast<const bf16_raw*>(dctx), lse, mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_scores_long_dropout_f16io_d64(
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
    attn_mma_backward_scores_long_body<f16_raw, 64>(reinterpret_cast<f16_raw*>(pd), reinterpret_cast<f16_raw*>(ds), reinterpret_cast<const f16_raw*>(qkv), reinterpret_cast<const f16_raw*>(dctx), lse, mask_bias, seq, hidden, heads, mask_rows, scale, AttnPhiloxDropout{attn_philox(seed_buf, seed_lo, seed_hi, stream_base, block_ids, batch_per_block, heads, seq, threshold, drop_scale, drop_offset)});
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_grads_long_bf16io_d64(unsigned short* __restrict__ dqkv, const unsigned short* __restrict__ pd, const unsigned short* __restrict__ ds, const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ dctx, int seq, int hidden, int heads, float scale) {
    attn_mma_backward_grads_long_body<bf16_raw, 64>(reinterpret_cast<bf16_raw*>(dqkv), reinterpret_cast<const bf16_raw*>(pd), reinterpret_cast<const bf16_raw*>(ds), reinterpret_cast<const bf16_raw*>(qkv), reinterpret_cast<const bf16_raw*>(dctx), seq, hidden, heads, scale);
}
extern "C" __global__ __launch_bounds__(32 * ATTN_MMA_WARPS) void attention_mma_backward_grads_long_f16io_d64(unsigned short* __restrict__ dqkv, const unsigned short* __restrict__ pd, const unsigned short* __restrict__ ds, const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ dctx, int seq, int hidden, int heads, float scale) {
    attn_mma_backward_grads_long_body<f16_raw, 64>(reinterpret_cast<f16_raw*>(dqkv), reinterpret_cast<const f16_raw*>(pd), reinterpret_cast<const f16_raw*>(ds), reinterpret_cast<const f16_raw*>(qkv), reinterpret_cast<const f16_raw*>(dctx), seq, hidden, heads, scale);
}
