// Tensor-core attention family (mma.sync, 16-bit storage, T <= 128, d 16, 32 or 64): the GEMM
// attention path's forward in one kernel, and its backward in two (the scores, then the gradient
// products). src/cuda/attention_gemm.rs launches them for AttentionPath::TensorCores and takes the
// GEMM path (kernels/attention.cu) wherever they do not apply. Same semantics, roundings and
// dropout masks as that path; each section below has its own header (algorithm, thread mapping,
// numerics, registers). Its own file so that the default path's module does not compile these
// 18 kernels (NVRTC: ~40 s of ptxas a GPU arch on a 2-core host, paid only where
// AttentionPath::TensorCores runs). Eval runs the dropout kernels at rate 0 (every factor 1: the
// same bits), so there are no eval twins to compile. The helpers it shares with attention.cu (dropout policies, mask row, numerics) are in
// kernels/common.cuh.

// =================================================================================================
// ---- the tensor-core forward: the GEMM path's forward in one launch (T <= 128, 16-bit) --------
// =================================================================================================
//
// attention_mma_forward_dropout_{bf16io,f16io}_d{16,32,64}: the GEMM path's forward (ctx and
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
// ptxas (NVRTC 13.0, tests/nvrtc_compile.rs), registers sm_80 / sm_90, no spills: d64 105-107 /
// 146, d32 103-106 / 141, d16 103-106 / 128. P is packed into its 32 fragment registers before the
// first P·V product, so S's 64 floats die first (packing inside the P·V loop held both: 152 on
// sm_90). On sm_90 that is 3 blocks (12 warps) an SM at d = 64; a cap of 128 spills 4 B, so there
// is none. The SASS of the d64 kernel has 128 HMMA (64 for S, 64 for P·V) and no local memory.

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
// attention_mma_backward_scores_dropout_{bf16io,f16io}_d{16,32,64}: what the GEMM backward's
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
// ptxas (NVRTC 13.0), registers sm_80 / sm_90, no spills: 122-140 / 162-166 (3 blocks an SM on
// sm_90). Keeping g = dP·f in registers beside p cost 234 with
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

// Tensor-core backward scores: pd, ds, qkv, dctx, lse, mask_bias; seq (<= 128), hidden, heads,
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
