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

#endif  // BERT_ADAPTERS_COMMON_CUH
