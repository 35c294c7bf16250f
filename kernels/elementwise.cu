// Elementwise and layout family: bias + activation where no GEMM epilogue does it, add, fill,
// f32 <-> bf16 casts, and the first-token gather.
//
// Semantics (the spec is the CPU backend: cpu::reference::activation, Backend::{add, fill, cast,
// first_token}):
//   bias_act_forward_f32   pre = x + bias (bias optional), y = act(pre); `pre` is stored when
//                          non-null (the backward reads it); y may be x itself (in place), so
//                          x and y carry no __restrict__.
//   add_f32                y = a + b
//   fill_f32 / fill_u32 / fill_bf16   y[i] = value (bf16 given as its 16 bits in an unsigned)
//   cast_f32_to_bf16 / cast_bf16_to_f32   round to nearest even / exact widening, bf16 as raw
//                          bits (common.cuh f32_to_bf16_bits: NaN -> 0x7fff)
//   first_token_f32        y[b, :] = x[b, 0, :] for x [batch, seq_len, cols]
//   count_nonfinite_f32    *count += number of NaN/inf elements of x (Backend::all_finite reads
//                          4 bytes back instead of the tensor)
//
// Thread mapping:
//   * row kernels (bias_act, first_token): one warp per row, 8 rows per 256-thread block, rows
//     grid-strided (the launcher caps the grid); lanes stride the columns, so loads coalesce and no
//     thread divides an index by `cols`. Narrow rows leave lanes idle in their last column step
//     (40 columns: 62% busy), acceptable for memory-bound work.
//   * flat kernels (add, fill, cast): a grid-stride loop over n elements, 64-bit indices.
// No kernel here has a barrier or shuffle, so rows past the end simply do nothing.
//
// Numerics: one f32 add for the bias (exactly the CPU's rounding), then common.cuh
// apply_activation in f32 with the accurate library functions (erfcf, tanhf, expf: a few ulp),
// tested within 1e-5 * (1 + max|ref|) of the f64 reference. Everything else is exact.

// ---- bias + activation ------------------------------------------------------------------------

// y, x, pre: [rows, cols]; bias: [cols] or null; pre may be null; y may equal x.
extern "C" __global__ void bias_act_forward_f32(
    float* y,
    float* __restrict__ pre,
    const float* x,
    const float* __restrict__ bias,
    int rows,
    int cols,
    int act)
{
    const int lane = threadIdx.x;
    for (int row = blockIdx.x * blockDim.y + threadIdx.y; row < rows; row += gridDim.x * blockDim.y) {
        const size_t off = (size_t)row * (size_t)cols;
        for (int c = lane; c < cols; c += blockDim.x) {
            float v = load_f32(x + off + c);
            if (bias != nullptr) {
                v += bias[c];
            }
            if (pre != nullptr) {
                store_f32(pre + off + c, v);
            }
            store_f32(y + off + c, apply_activation(act, v));
        }
    }
}

// ---- add, fill, cast ---------------------------------------------------------------------------

// y, a, b: [n]. y may equal a or b.
extern "C" __global__ void add_f32(float* y, const float* a, const float* b, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        store_f32(y + i, load_f32(a + i) + load_f32(b + i));
    }
}

extern "C" __global__ void fill_f32(float* __restrict__ y, float value, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = value;
    }
}

extern "C" __global__ void fill_u32(unsigned* __restrict__ y, unsigned value, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = value;
    }
}

// bits: the bf16 value in the low 16 bits (rounded on the host).
extern "C" __global__ void fill_bf16(unsigned short* __restrict__ y, unsigned bits, long long n) {
    const unsigned short v = (unsigned short)bits;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = v;
    }
}

extern "C" __global__ void cast_f32_to_bf16(unsigned short* __restrict__ y, const float* __restrict__ x, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = f32_to_bf16_bits(x[i]);
    }
}

extern "C" __global__ void cast_bf16_to_f32(float* __restrict__ y, const unsigned short* __restrict__ x, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = bf16_bits_to_f32(x[i]);
    }
}

// ---- first-token gather ------------------------------------------------------------------------

// y: [batch, cols]; x: [batch, seq_len, cols]. Same mapping as bias_act: a warp per output row.
extern "C" __global__ void first_token_f32(
    float* __restrict__ y,
    const float* __restrict__ x,
    int batch,
    int seq_len,
    int cols)
{
    for (int b = blockIdx.x * blockDim.y + threadIdx.y; b < batch; b += gridDim.x * blockDim.y) {
        const float* src = x + (size_t)b * (size_t)seq_len * (size_t)cols;
        float* dst = y + (size_t)b * (size_t)cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            store_f32(dst + c, load_f32(src + c));
        }
    }
}

// ---- finiteness ------------------------------------------------------------------------------

// count: one unsigned, zeroed by the launcher. A warp ballot counts the non-finite elements of
// each 32-element step, and one atomicAdd per warp that saw any publishes them: the common case
// (all finite) costs one read of x and no atomics.
extern "C" __global__ void count_nonfinite_f32(unsigned* __restrict__ count, const float* __restrict__ x, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    // Every lane runs the same number of steps, so the ballot's full mask always arrives.
    const long long first = (long long)blockIdx.x * blockDim.x;
    for (long long base = first; base < n; base += stride) {
        const long long i = base + threadIdx.x;
        const bool bad = i < n && !isfinite(load_f32(x + i));
        const unsigned votes = __ballot_sync(FULL_WARP_MASK, bad);
        if ((threadIdx.x & 31u) == 0 && votes != 0u) {
            atomicAdd(count, (unsigned)__popc(votes));
        }
    }
}
