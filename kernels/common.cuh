// Shared device helpers, textually prepended to every kernels/*.cu by build.rs (so NVRTC needs
// no include path). Header-free on purpose: NVRTC ships no cuda_fp16.h/cuda_bf16.h, and the
// builtins used here (__shfl_xor_sync, sqrtf, fmaf) need no #include.
// No __global__ functions here: build.rs refuses them (they would be duplicated in every module).

#ifndef BERT_ADAPTERS_COMMON_CUH
#define BERT_ADAPTERS_COMMON_CUH

#define FULL_WARP_MASK 0xffffffffu

// Sum over the 32 lanes of a warp; every lane gets the total. The butterfly order is fixed, so
// the result is bitwise reproducible run to run.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(FULL_WARP_MASK, v, offset);
    }
    return v;
}

// Four consecutive elements as one aligned unit (16 bytes of f32, 8 of a 16-bit type): what the
// vectorised paths load and store in one instruction (a struct of our own: float4, uint4 and
// uint2 are not defined on every route).
template <typename T>
struct alignas(4 * sizeof(T)) Unit4 {
    T v[4];
};

// Whether `p` is aligned for a Unit4 of elements of `elem_bytes` bytes (null counts as aligned).
__device__ __forceinline__ bool unit4_aligned(const void* p, int elem_bytes) {
    return ((unsigned long long)p & (4ull * (unsigned long long)elem_bytes - 1ull)) == 0;
}

// A strided loop over i = first, first + stride, ... < end, BATCH indices a thread at a time:
// load(i) for every index of a batch, each load issued before any use, then use(i, loaded) in
// index order, so a running sum adds in a plain loop's order (the same bits). A plain loop with a
// load and its use compiles to one load in flight a thread, which leaves the memory latency-bound.
template <int BATCH, typename I, typename Load, typename Use>
__device__ __forceinline__ void strided_batched(I first, I end, I stride, Load load, Use use) {
    using Loaded = decltype(load(first));
    for (I i0 = first; i0 < end; i0 += BATCH * stride) {
        Loaded v[BATCH];
#pragma unroll
        for (int k = 0; k < BATCH; ++k) {
            const I i = i0 + k * stride;
            if (i < end) {
                v[k] = load(i);
            }
        }
#pragma unroll
        for (int k = 0; k < BATCH; ++k) {
            const I i = i0 + k * stride;
            if (i < end) {
                use(i, v[k]);
            }
        }
    }
}

// A row team's pass over its columns c = threadIdx.x + k·blockDim.x (c < cols), BATCH columns a
// thread at a time (strided_batched). BATCH other than TEAM_COL_BATCH: adapter.cu's row staging
// copies 8 units a thread at a time.
#define TEAM_COL_BATCH 4

template <int BATCH = TEAM_COL_BATCH, typename Load, typename Use>
__device__ __forceinline__ void team_cols_batched(int cols, Load load, Use use) {
    strided_batched<BATCH, int>((int)threadIdx.x, cols, (int)blockDim.x, load, use);
}

// Sum over the `blockDim.x` threads that share a `threadIdx.y` (a "row team"); every thread of
// the team gets the total.
// Contract (the launchers enforce it): blockDim.x is a multiple of 32, and if blockDim.x > 32 then
// blockDim.y == 1 and `scratch` holds at least 32 floats of shared memory. Every thread of the
// block must call this (it may hit __syncthreads), including threads with no work.
__device__ __forceinline__ float team_sum(float v, float* scratch) {
    v = warp_sum(v);
    if (blockDim.x == 32) {
        return v;  // warp per row: the shuffle already reached every lane, no barrier needed
    }
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warp = threadIdx.x >> 5;
    const unsigned n_warps = blockDim.x >> 5;
    __syncthreads();  // a previous team_sum may still be reading scratch
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0.0f;
    // Each warp reduces the partials itself: same order in every warp, so every thread holds the
    // same bits, and no third barrier is needed to broadcast.
    return warp_sum(v);
}

// ---- appended by the elementwise family (embedding.cu, elementwise.cu, nice.cu) -------------
// Other families may append below; keep each block self-contained.

// Storage loads and stores. Kernels compute in f32 and touch stored values only through these, so a
// storage type joins as a load_f32/store_f32 overload pair without changing kernel bodies.
__device__ __forceinline__ float load_f32(const float* p) { return *p; }
__device__ __forceinline__ void store_f32(float* p, float v) { *p = v; }

// bf16 as its raw 16 bits, header-free. f32 -> bf16 rounds to nearest, ties to even, by adding
// 0x7fff plus the lowest kept bit before truncating: exact for every finite input, subnormals
// included, and a carry out of the mantissa lands on the next exponent (FLT_MAX rounds to inf,
// as IEEE RNE does). NaN gives 0x7fff, CUDA's canonical bf16 NaN, because the addition could
// otherwise carry a NaN payload into infinity. bf16 -> f32 is exact (a shift).
__device__ __forceinline__ unsigned short f32_to_bf16_bits(float v) {
    const unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)0x7fffu;
    }
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ float bf16_bits_to_f32(unsigned short b) {
    return __uint_as_float((unsigned)b << 16);
}

// bf16 storage as a type of its own (the layout of cuda_bf16.h's __nv_bfloat16: 16 raw bits), so
// templated kernel bodies can be instantiated for it and overloads tell it from other 16-bit data.
// Kernels take bf16 as `unsigned short*` (the spelling build.rs packs, no header needed) and their
// extern "C" wrappers reinterpret_cast it to `const bf16_raw*`. Loads widen exactly; stores round
// to nearest even.
struct bf16_raw {
    unsigned short bits;
};
__device__ __forceinline__ float load_f32(const bf16_raw* p) { return bf16_bits_to_f32(p->bits); }
__device__ __forceinline__ void store_f32(bf16_raw* p, float v) { p->bits = f32_to_bf16_bits(v); }

// f16 (IEEE binary16) as its raw 16 bits, header-free, for the f16 activation pipeline. f32 -> f16
// rounds to nearest, ties to even, in integers (no dependence on the FPU's subnormal mode):
// |v| >= 65520 (the midpoint above the largest finite f16, 65504, a tie that rounds to the even
// infinity) gives inf; the normal range rebiases the exponent and rounds away 13 mantissa bits,
// a carry landing on the next exponent; below 2^-14 the value is k·2^-24 with k rounded from the
// explicit-one mantissa (k = 1024 is the smallest normal, encoded the same way). |v| <= 2^-25 is a
// tie or less and gives ±0. NaN gives 0x7fff, CUDA's canonical f16 NaN.
// On a GPU the same rounding is one instruction, cvt.rn.f16.f32 (what cuda_fp16.h's
// __float2half_rn issues): the integer form inlined at every store cost the fused f16 attention
// kernels 30-60 registers more than their bf16 twins (ptxas, sm_90). cuda-sim runs the integer
// form, checked equal to IEEE round-to-nearest-even on all 2^32 inputs.
__device__ __forceinline__ unsigned short f32_to_f16_bits(float v) {
#ifdef __CUDA_ARCH__
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
#else
    const unsigned u = __float_as_uint(v);
    const unsigned sign = (u >> 16) & 0x8000u;
    const unsigned a = u & 0x7fffffffu;
    if (a > 0x7f800000u) {
        return (unsigned short)0x7fffu;
    }
    if (a >= 0x477ff000u) {
        return (unsigned short)(sign | 0x7c00u);
    }
    if (a >= 0x38800000u) {
        const unsigned m = a - 0x38000000u;
        return (unsigned short)(sign | ((m + 0xfffu + ((m >> 13) & 1u)) >> 13));
    }
    if (a <= 0x33000000u) {
        return (unsigned short)sign;
    }
    const unsigned shift = 126u - (a >> 23);
    const unsigned mantissa = (a & 0x7fffffu) | 0x800000u;
    unsigned k = mantissa >> shift;
    const unsigned rest = mantissa & ((1u << shift) - 1u);
    const unsigned half_ulp = 1u << (shift - 1u);
    k += (rest > half_ulp || (rest == half_ulp && (k & 1u))) ? 1u : 0u;
    return (unsigned short)(sign | k);
#endif
}
// f16 -> f32 is exact; a NaN gives 0x7fffffff, CUDA's canonical f32 NaN, as cvt.f32.f16 does (the
// GPU's one instruction: the integer form at every load cost registers too).
__device__ __forceinline__ float f16_bits_to_f32(unsigned short h) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    const unsigned sign = ((unsigned)h & 0x8000u) << 16;
    const unsigned e = ((unsigned)h >> 10) & 0x1fu;
    const unsigned m = (unsigned)h & 0x3ffu;
    if (e == 0x1fu) {
        return __uint_as_float(m == 0u ? (sign | 0x7f800000u) : 0x7fffffffu);
    }
    if (e == 0u) {
        // m·2^-24, exact in f32 (2^-24 written out: its decimal expansion is exact).
        return __uint_as_float(sign | __float_as_uint((float)m * 5.9604644775390625e-08f));
    }
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
#endif
}

// f16 storage, as bf16_raw (cuda_fp16.h's __half layout): kernels take it as `unsigned short*`
// and their `_f16io` / `_f16` wrappers reinterpret_cast to `f16_raw*`.
struct f16_raw {
    unsigned short bits;
};
__device__ __forceinline__ float load_f32(const f16_raw* p) { return f16_bits_to_f32(p->bits); }
__device__ __forceinline__ void store_f32(f16_raw* p, float v) { p->bits = f32_to_f16_bits(v); }

// Activation codes shared by every kernel that takes an `int act` (src/cuda/elementwise.rs maps
// bert_adapters::Activation onto them; keep both in step).
#define ACT_IDENTITY 0
#define ACT_RELU 1
#define ACT_GELU 2       // exact erf GELU (BERT's "gelu")
#define ACT_GELU_TANH 3  // tanh approximation ("gelu_new")
#define ACT_SWISH 4      // x * sigmoid(x) (torch SiLU)
#define ACT_TANH 5
#define ACT_SIGMOID 6

// act(v) in f32 with the accurate library functions (no __expf: fast-math intrinsics are up to
// 2 ulp + range-dependent error, and these run once per element of memory-bound kernels).
// GELU is x * Phi(x) with Phi(x) = erfc(-x/sqrt 2)/2: erfc keeps the left tail's relative
// accuracy where 1 + erf(x/sqrt 2) would cancel. ReLU's fmaxf maps NaN to 0 like the CPU's
// f64::max. Swish and sigmoid overflow expf to inf for v < -88 and correctly give -0 and 0.
__device__ __forceinline__ float apply_activation(int act, float v) {
    switch (act) {
        case ACT_RELU:
            return fmaxf(v, 0.0f);
        case ACT_GELU:
            return 0.5f * v * erfcf(v * -0.70710678118654752f);
        case ACT_GELU_TANH: {
            const float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
            return 0.5f * v * (1.0f + tanhf(inner));
        }
        case ACT_SWISH:
            return v / (1.0f + expf(-v));
        case ACT_TANH:
            return tanhf(v);
        case ACT_SIGMOID:
            return 1.0f / (1.0f + expf(-v));
        default:
            return v;
    }
}

// ---- Philox4x32-10 dropout (src/train/dropout.rs is the spec; every bit must match it) ------
// Element i of stream s under seed k: key = [k_lo, k_hi], counter = [i/4 lo, i/4 hi, s_lo, s_hi],
// word i%4 of the block. Dropped iff word < threshold (round(p*2^32), from the host): an integer
// compare, so no float rounding can make the device and the CPU disagree. Kept: x * scale.
struct PhiloxKey {
    unsigned k0, k1;
};
struct PhiloxWords {
    unsigned w[4];
};

// 32x32 -> 64-bit product split in halves (mul.hi.u32 / mul.lo.u32 in PTX; plain C for cuda-sim).
__device__ __forceinline__ unsigned philox_mulhi(unsigned a, unsigned b) {
    return (unsigned)(((unsigned long long)a * (unsigned long long)b) >> 32);
}

__device__ __forceinline__ PhiloxWords philox4x32_10(unsigned c0, unsigned c1, unsigned c2, unsigned c3, PhiloxKey key) {
    unsigned k0 = key.k0, k1 = key.k1;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {  // the key is bumped between rounds, never before the first
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const unsigned hi0 = philox_mulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const unsigned hi1 = philox_mulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        const unsigned n0 = hi1 ^ c1 ^ k0;
        const unsigned n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
    PhiloxWords out;
    out.w[0] = c0;
    out.w[1] = c1;
    out.w[2] = c2;
    out.w[3] = c3;
    return out;
}

// The seed: from the model's [2] device buffer when given (a captured launch then replays with
// the next step's seed), else from the launch arguments.
__device__ __forceinline__ PhiloxKey philox_key(const unsigned* seed_buf, unsigned seed_lo, unsigned seed_hi) {
    PhiloxKey key;
    key.k0 = seed_buf != nullptr ? seed_buf[0] : seed_lo;
    key.k1 = seed_buf != nullptr ? seed_buf[1] : seed_hi;
    return key;
}

// The Philox block of element `block` (= element index / 4) of a 64-bit stream.
__device__ __forceinline__ PhiloxWords philox_block(PhiloxKey key, unsigned long long stream, unsigned long long block) {
    return philox4x32_10((unsigned)block, (unsigned)(block >> 32), (unsigned)stream, (unsigned)(stream >> 32), key);
}

// The keep factor of element `index` of `stream`: scale, or 0 when dropped.
__device__ __forceinline__ float philox_keep_factor(PhiloxKey key, unsigned long long stream, unsigned long long index, unsigned threshold, float scale) {
    const PhiloxWords w = philox_block(key, stream, index >> 2);
    // Selects, not w.w[index & 3]: a dynamic index would put the words in local memory.
    const unsigned lane = (unsigned)(index & 3ull);
    const unsigned word = lane == 0 ? w.w[0] : lane == 1 ? w.w[1] : lane == 2 ? w.w[2] : w.w[3];
    return word >= threshold ? scale : 0.0f;
}

// ---- tensor cores: one warp's mma.sync.aligned.m16n8k16 (sm_80 and later) -------------------
// D (16x8) = A (16x16) · B (16x8) + C, f32 accumulators, A and B in bf16 or f16. Every lane of a
// full warp calls it with its fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
// floating point type"), with g = lane / 4 and t = lane % 4, two 16-bit elements a register, the
// lower index in the low half:
//     a[0] = A[g][2t, 2t+1]    a[1] = A[g+8][2t, 2t+1]    a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
//     b[0] = B[2t, 2t+1][g]    b[1] = B[2t+8, 2t+9][g]
//     c[0], c[1] = C[g][2t, 2t+1]    c[2], c[3] = C[g+8][2t, 2t+1]    (d likewise)
// cuda-sim runs it as a warp collective with the same layout (src/cuda/sim: exact products, f32
// sums in k order; the tensor cores' order is unspecified, so compare with tolerances).
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4]) {
#ifdef __CUDA_ARCH__
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#else
    __sim_mma_m16n8k16_bf16(d, a, b, c);
#endif
}
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4]) {
#ifdef __CUDA_ARCH__
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#else
    __sim_mma_m16n8k16_f16(d, a, b, c);
#endif
}

// The mma for a 16-bit storage type: bf16_raw and f16_raw pick their instruction.
__device__ __forceinline__ void mma_m16n8k16(const bf16_raw*, float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4]) {
    mma_m16n8k16_bf16(d, a, b, c);
}
__device__ __forceinline__ void mma_m16n8k16(const f16_raw*, float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4]) {
    mma_m16n8k16_f16(d, a, b, c);
}

// Two f32 values rounded to a 16-bit type (nearest even) and packed as an mma register: `lo` in
// bits 0-15, `hi` in 16-31.
__device__ __forceinline__ unsigned pack2(const bf16_raw*, float lo, float hi) {
    return (unsigned)f32_to_bf16_bits(lo) | ((unsigned)f32_to_bf16_bits(hi) << 16);
}
__device__ __forceinline__ unsigned pack2(const f16_raw*, float lo, float hi) {
    return (unsigned)f32_to_f16_bits(lo) | ((unsigned)f32_to_f16_bits(hi) << 16);
}

// ---- attention's shared pieces (kernels/attention.cu and kernels/attention_mma.cu) -------------
// The numerics helpers, the dropout policies with their Philox element mapping, the mask row and
// the 16-byte units both attention families use; attention.cu's header documents them.

// 16-byte shared-memory vector (a struct of our own: float4 is not defined on every route).
struct alignas(16) AttnVec4 {
    float x, y, z, w;
};

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

// Rows with |lse| at or above this get their normaliser recomputed (see c_i above).
#define ATTN_BWD_EXACT_LSE 64.0f

// The mask row of batch row b: b % mask_rows, without the division in the usual cases (one mask
// row for all, or b within the first block of a replicated batch).
__device__ __forceinline__ int attn_mask_row(int b, int mask_rows) {
    return mask_rows == 1 ? 0 : b < mask_rows ? b : b % mask_rows;
}

// 16 bytes of any storage type, copied as they are (the layout kernels' units, the tensor-core
// kernels' staging loads).
struct alignas(16) AttnBits16 {
    unsigned int w[4];
};

#endif  // BERT_ADAPTERS_COMMON_CUH
