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

#endif  // BERT_ADAPTERS_COMMON_CUH
