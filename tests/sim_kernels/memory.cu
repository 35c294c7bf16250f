// Kernels for tests/cuda_sim_memory.rs: device memory, guard pages, shared-memory poisoning and
// limits under cuda-sim. The planted bugs must be reported with kernel, block, thread and line,
// and the process must go on. Compiled only into the cuda-sim executor (build.rs), never by NVRTC.
// The tests name line numbers in this file: keep the planted lines where they are.

// out[i] = in[i + shift] for every thread of the grid; with shift 1 the last thread reads one
// element past `in`.
extern "C" __global__ void mem_shifted_copy(float* out, const float* in, int shift)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    out[i] = in[i + shift];
}

// out[i + shift] = i for every thread; with shift 1 the last thread writes one element past `out`.
extern "C" __global__ void mem_shifted_store(float* out, int shift)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    out[i + shift] = (float)i;
}

// Thread `who` of block 0 reads in[index] after a barrier (in may be null).
extern "C" __global__ void mem_read_one(float* out, const float* in, int who, int index)
{
    __syncthreads();
    if (blockIdx.x == 0 && (int)threadIdx.x == who) {
        out[0] = in[index];
    }
}

__shared__ float file_scope_tile[8];

// A static __shared__ array read before this block writes it: out[b * n + t] gets what thread t
// of block b saw first (poison), then the block fills the array with b + 1 for the next block to
// (not) see. The scalar, the 2-D and the file-scope array check the other declaration forms.
extern "C" __global__ void mem_static_shared(float* out, unsigned* scalars)
{
    __shared__ float tile[64];
    __shared__ unsigned counter;
    __shared__ float grid2[4][33];
    const unsigned t = threadIdx.x, b = blockIdx.x;
    out[b * blockDim.x + t] = tile[t];
    if (t == 0) {
        scalars[3 * b] = counter;
        float g = grid2[3][32];
        memcpy(&scalars[3 * b + 1], &g, 4);
        g = file_scope_tile[7];
        memcpy(&scalars[3 * b + 2], &g, 4);
    }
    __syncthreads();
    tile[t] = (float)(b + 1);
    if (t == 0) {
        counter = b + 1;
        grid2[3][32] = (float)(b + 1);
        file_scope_tile[7] = (float)(b + 1);
    }
}

// Fills `n` floats of dynamic shared memory (all of it), then out[t] = slots[n - 1 - t].
extern "C" __global__ void mem_dynamic_shared(float* out, int n)
{
    extern __shared__ float slots[];
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        slots[j] = (float)j;
    }
    __syncthreads();
    out[threadIdx.x] = slots[n - 1 - threadIdx.x];
}

// As mem_dynamic_shared, beside a static array of 32 floats (128 bytes): without an opt-in the
// driver allows 48 KB of static and dynamic shared memory together.
extern "C" __global__ void mem_dynamic_and_static_shared(float* out, int n)
{
    extern __shared__ float slots[];
    __shared__ float partial[32];
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        slots[j] = (float)j;
    }
    if (threadIdx.x < 32) partial[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = slots[n - 1 - threadIdx.x] + partial[threadIdx.x % 32];
}

// Recursion `levels` deep, each level keeping 1 KiB of locals live; returns the sum over the
// levels d of d + (d - 1) (the caller's local[0]), 0 for the first.
__device__ __noinline__ float sim_deep(volatile float* p, int depth, int levels)
{
    volatile float local[256];
    local[0] = (float)depth;
    const float below = depth < levels ? sim_deep(local, depth + 1, levels) : 0.0f;
    return below + local[0] + p[0];
}

extern "C" __global__ void mem_stack_overflow(float* out, int levels)
{
    volatile float seed[1] = {0.0f};
    if (threadIdx.x == 3) {
        out[0] = sim_deep(seed, 0, levels);
    }
}

// Every thread passes `rounds` barriers: 2 context switches per thread per round; out[t] = rounds.
extern "C" __global__ void mem_barrier_rounds(int* out, int rounds)
{
    int r = 0;
    for (; r < rounds; ++r) {
        __syncthreads();
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = r;
}
