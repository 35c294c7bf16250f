// Deliberately broken kernels for tests/cuda_sim.rs: each must make cuda-sim report a named
// error (kernel, block, thread, source line), never crash. Compiled only into the `cuda-sim`
// executor (build.rs), never by NVRTC, and kept out of kernels/ on purpose.

// Thread 0 returns before the barrier the others wait at.
extern "C" __global__ void planted_early_return(float* out)
{
    if (threadIdx.x == 0) {
        return;
    }
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// Writes one float past `blockDim.x` floats of dynamic shared memory (launch with exactly that).
extern "C" __global__ void planted_shared_overflow(float* out)
{
    extern __shared__ float buf[];
    buf[threadIdx.x + 1] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = buf[threadIdx.x];
}

// A full-mask shuffle that only half of the warp executes.
extern "C" __global__ void planted_divergent_shuffle(float* out)
{
    float v = (float)threadIdx.x;
    if (threadIdx.x < 16) {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
    }
    out[threadIdx.x] = v;
}

// Two halves of the block reach different __syncthreads.
extern "C" __global__ void planted_split_barrier(float* out)
{
    if (threadIdx.x < 32) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}

// Shuffles in all modes and widths, checked against the PTX shfl.sync rules by the test.
extern "C" __global__ void sim_shuffle_modes(int* out, int width)
{
    const int t = threadIdx.x;
    const unsigned n = blockDim.x;
    out[0 * n + t] = __shfl_xor_sync(0xffffffffu, t, 5, width);
    out[1 * n + t] = __shfl_down_sync(0xffffffffu, t, 3, width);
    out[2 * n + t] = __shfl_up_sync(0xffffffffu, t, 3, width);
    out[3 * n + t] = __shfl_sync(0xffffffffu, t, 7 + t, width);
}

// Reads a neighbour's shared-memory slot without the barrier that orders it after the write.
// cuda-sim runs each thread to its next sync point in turn, so the read sees the NaN poison in
// at least one schedule (forward: thread t reads slot t+1 before thread t+1 runs).
extern "C" __global__ void planted_missing_barrier(float* out)
{
    extern __shared__ float slots[];
    slots[threadIdx.x] = (float)threadIdx.x;
    out[threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];
}
