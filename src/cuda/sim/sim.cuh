// cuda-sim: the header every kernel translation unit includes first when kernels/*.cu run on the
// CPU (cargo feature `cuda-sim`; see src/cuda/sim.rs and docs/KERNELS_ON_CPU.md in shared/docs).
//
// The kernel text is compiled by g++ unmodified, except shared-memory declarations, which build.rs
// rewrites on the same line: `extern __shared__ T name[];` into SIM_EXTERN_SHARED(T, name); (the
// per-launch buffer) and `__shared__ T name[N];` into SIM_SHARED(name, T name[N]); (per-worker
// storage, poisoned once per block; SIM_SHARED_GLOBAL at file scope).
// One fiber runs each CUDA thread; fibers switch only at __syncthreads, warp collectives and
// exit, and the runtime (sim_runtime.cpp) checks strict Volta+ rules at each of those points.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>
#include <utility>

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};

namespace sim {

// One kernel compiled into the executor; `launch` unpacks a cuLaunchKernel-style argument array.
struct KernelEntry {
    const char* name;
    const char* family;
    unsigned nparams;
    void (*launch)(void** args);
};

extern thread_local const uint3* tl_thread_idx;
extern thread_local uint3 tl_block_idx;
extern thread_local dim3 tl_block_dim;
extern thread_local dim3 tl_grid_dim;
extern thread_local unsigned char* tl_dynamic_shared;
// Changes with every block a worker runs; a static __shared__ array whose generation differs was
// last written by an earlier block (or never) and is poisoned before its first use in this one.
extern thread_local uint64_t tl_block_generation;

// Fills `bytes` with the shared-memory poison (a NaN as f32).
void poison(void* p, size_t bytes);

// Counts a static __shared__ array's bytes against the block's shared memory (static + dynamic):
// without a cuFuncSetAttribute opt-in the driver refuses a launch whose total passes 48 KB.
void static_shared_reached(size_t bytes);

inline void shared_first_use(void* p, size_t bytes, uint64_t* generation) {
    if (*generation != tl_block_generation) {
        *generation = tl_block_generation;
        poison(p, bytes);
        static_shared_reached(bytes);
    }
}

// A file-scope __shared__ variable: `poison_here` poisons the calling worker's copy; the runtime
// calls every registered one at the start of each block.
struct SharedAtFileScope {
    explicit SharedAtFileScope(void (*poison_here)());
};

// Every warp collective; sim_runtime.cpp names and completes each (op_info, complete_collective).
enum WarpOp : int {
    SHFL_UP = 0, SHFL_DOWN = 1, SHFL_BFLY = 2, SHFL_IDX = 3, SYNCWARP = 4,
    VOTE_BALLOT, VOTE_ANY, VOTE_ALL,
    REDUCE_ADD, REDUCE_MIN_U, REDUCE_MAX_U, REDUCE_MIN_S, REDUCE_MAX_S, REDUCE_AND, REDUCE_OR, REDUCE_XOR,
    MATCH_ANY, MATCH_ALL,
    MMA_BF16, MMA_F16,
    WARP_OP_COUNT
};

// One lane's operands of a warp-wide mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.f32
// (common.cuh's mma_m16n8k16_*): A (16x16) in a[4], B (16x8) in b[2], two 16-bit elements a
// register, the lower index in the low half; C and D (16x8 f32) in c[4] and d[4]. The fragment
// layouts are PTX ISA's "Matrix Fragments for mma.m16n8k16 with floating point type".
struct MmaFragments {
    uint32_t a[4];
    uint32_t b[2];
    float c[4];
    float d[4];
};

void syncthreads_at(const char* file, int line);
void syncwarp_at(const char* file, int line, unsigned mask);
uint64_t warp_op_at(const char* file, int line, int op, unsigned mask, uint64_t bits, unsigned size, int b, int width);

template <class T>
inline T shfl(const char* file, int line, int op, unsigned mask, T v, int b, int width) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move 4- or 8-byte values");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    bits = warp_op_at(file, line, op, mask, bits, sizeof(T), b, width);
    T r;
    memcpy(&r, &bits, sizeof(T));
    return r;
}

// Optional trailing arguments of the CUDA intrinsics (width = 32, mask = all lanes).
constexpr int width_or_32() { return 32; }
constexpr int width_or_32(int w) { return w; }
constexpr unsigned mask_or_full() { return 0xffffffffu; }
constexpr unsigned mask_or_full(unsigned m) { return m; }

template <class... A, size_t... I>
inline void call_with(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}
template <class... A>
inline void call(void (*f)(A...), void** args) {
    call_with(f, args, std::index_sequence_for<A...>{});
}
template <class... A>
constexpr unsigned param_count(void (*)(A...)) {
    return sizeof...(A);
}

}  // namespace sim

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// build.rs rewrites every __shared__ declaration; one left over (in a macro, say) is a compile error.
#define __shared__ __shared__cannot_be_used_here_by_cuda_sim
#define SIM_EXTERN_SHARED(T, name) T* const name = reinterpret_cast<T*>(::sim::tl_dynamic_shared)
// The declaration runs before any thread of the block can touch the array (its name is not in scope
// earlier), so the first thread of each block to reach it poisons it.
#define SIM_SHARED(name, ...)                          \
    static thread_local __VA_ARGS__;                   \
    static thread_local uint64_t name##_sim_generation; \
    ::sim::shared_first_use(&name, sizeof(name), &name##_sim_generation)
#define SIM_SHARED_GLOBAL(name, ...) \
    static thread_local __VA_ARGS__; \
    static const ::sim::SharedAtFileScope name##_sim_poisoner([] { ::sim::poison(&name, sizeof(name)); })

#define threadIdx (*::sim::tl_thread_idx)
#define blockIdx (static_cast<const uint3&>(::sim::tl_block_idx))
#define blockDim (static_cast<const dim3&>(::sim::tl_block_dim))
#define gridDim (static_cast<const dim3&>(::sim::tl_grid_dim))
#define warpSize 32

#define __syncthreads() ::sim::syncthreads_at(__FILE__, __LINE__)
#define __syncwarp(...) ::sim::syncwarp_at(__FILE__, __LINE__, ::sim::mask_or_full(__VA_ARGS__))
#define __shfl_xor_sync(mask, v, b, ...) ::sim::shfl(__FILE__, __LINE__, ::sim::SHFL_BFLY, mask, v, b, ::sim::width_or_32(__VA_ARGS__))
#define __shfl_down_sync(mask, v, b, ...) ::sim::shfl(__FILE__, __LINE__, ::sim::SHFL_DOWN, mask, v, b, ::sim::width_or_32(__VA_ARGS__))
#define __shfl_up_sync(mask, v, b, ...) ::sim::shfl(__FILE__, __LINE__, ::sim::SHFL_UP, mask, v, b, ::sim::width_or_32(__VA_ARGS__))
#define __shfl_sync(mask, v, b, ...) ::sim::shfl(__FILE__, __LINE__, ::sim::SHFL_IDX, mask, v, b, ::sim::width_or_32(__VA_ARGS__))

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }

#include "sim_intrinsics.cuh"
