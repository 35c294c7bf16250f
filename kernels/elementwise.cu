// Elementwise and layout family: bias + activation where no GEMM epilogue does it, add, fill,
// f32 <-> bf16 and f32 <-> f16 casts, and the first-token gather; at the end, with their own header, the backward
// kernels (activation', deterministic column sums for bias gradients, the first-token scatter).
//
// Semantics (the spec is the CPU backend: cpu::reference::activation, Backend::{add, fill, cast,
// first_token}):
//   bias_act_forward_f32   pre = x + bias (bias optional), y = act(pre); `pre` is stored when
//                          non-null (the backward reads it); y may be x itself (in place), so
//                          x and y carry no __restrict__.
//   add_f32                y = a + b
//   fill_f32 / fill_u32 / fill_bf16 / fill_f16   y[i] = value (bf16 or f16 given as its 16 bits
//                          in an unsigned, rounded on the host; one 16-bit body for both)
//   cast_f32_to_bf16 / cast_bf16_to_f32   round to nearest even / exact widening, bf16 as raw
//                          bits (common.cuh f32_to_bf16_bits: NaN -> 0x7fff)
//   cast_f32_to_f16 / cast_f16_to_f32   the same for IEEE f16 (common.cuh f32_to_f16_bits:
//                          |x| >= 65520 -> inf, subnormals below 2^-14, NaN -> 0x7fff); both
//                          pairs are one templated body each, over bf16_raw / f16_raw
//   cast_f32_to_bf16_strided / cast_f32_to_f16_strided   the same rounding over the elements of
//                          a strided batch of column-major matrices (element (r, c, b) at
//                          b*stride + c*ld + r, the cuBLASLt layout) only: the gaps between
//                          columns and batches keep their bits (the 16-bit GEMMs' f32 staging,
//                          Gpu::gemm)
//   first_token_f32        y[b, :] = x[b, 0, :] for x [batch, seq_len, cols]
//   count_nonfinite_f32    *count += number of NaN/inf elements of x (Backend::all_finite reads
//                          4 bytes back instead of the tensor)
// bf16 activations: bias_act_forward_bf16io (x, y, pre and the frozen base's bias in bf16),
// add_bf16io and first_token_bf16io store every operand as bf16 raw bits; they are the f32
// kernels' templated bodies instantiated with bf16_raw, computing in f32 from exactly widened
// loads and rounding each stored value once to nearest even (pre is the f32 x + bias rounded
// once, y is act of the unrounded f32 sum rounded once). So a bf16io output is the f32 kernel's
// output on the widened inputs rounded once, and the copies (first_token) are exact but for NaN
// payloads.
// f16 activations: every _bf16io kernel of this file has an _f16io twin, the same body
// instantiated with f16_raw (IEEE binary16: 11 significant bits, finite up to 65504; a rounded
// result past it is ±inf, as any f16 store), with the same semantics: f32 arithmetic on exactly
// widened loads, each stored value rounded once to nearest even.
//
// Thread mapping:
//   * row kernels (bias_act, first_token): one warp per row, 8 rows per 256-thread block, rows
//     grid-strided (the launcher caps the grid); lanes stride the columns, so loads coalesce and no
//     thread divides an index by `cols`. Narrow rows leave lanes idle in their last column step
//     (40 columns: 62% busy), acceptable for memory-bound work.
//   * flat kernels (add, fill, cast): a grid-stride loop over n elements, 64-bit indices.
// No row or flat kernel here has a barrier or shuffle (count_nonfinite's ballot runs every lane
// the same number of steps), so rows past the end simply do nothing.
//
// Numerics: one f32 add for the bias (exactly the CPU's rounding), then common.cuh
// apply_activation in f32 with the accurate library functions (erfcf, tanhf, expf: a few ulp),
// tested within 1e-5 * (1 + max|ref|) of the f64 reference. Everything else is exact.

// ---- bias + activation ------------------------------------------------------------------------

// y, x, pre: [rows, cols]; bias: [cols] or null; pre may be null; y may equal x. All of
// activation storage type A (float or bf16_raw).
template <typename A>
__device__ __forceinline__ void bias_act_forward_body(A* y, A* __restrict__ pre, const A* x, const A* __restrict__ bias, int rows, int cols, int act) {
    const int lane = threadIdx.x;
    for (int row = blockIdx.x * blockDim.y + threadIdx.y; row < rows; row += gridDim.x * blockDim.y) {
        const size_t off = (size_t)row * (size_t)cols;
        for (int c = lane; c < cols; c += blockDim.x) {
            float v = load_f32(x + off + c);
            if (bias != nullptr) {
                v += load_f32(bias + c);
            }
            if (pre != nullptr) {
                store_f32(pre + off + c, v);
            }
            store_f32(y + off + c, apply_activation(act, v));
        }
    }
}

extern "C" __global__ void bias_act_forward_f32(
    float* y,
    float* __restrict__ pre,
    const float* x,
    const float* __restrict__ bias,
    int rows,
    int cols,
    int act)
{
    bias_act_forward_body<float>(y, pre, x, bias, rows, cols, act);
}

// bf16 y, pre, x and bias, as raw bits.
extern "C" __global__ void bias_act_forward_bf16io(
    unsigned short* y,
    unsigned short* __restrict__ pre,
    const unsigned short* x,
    const unsigned short* __restrict__ bias,
    int rows,
    int cols,
    int act)
{
    bias_act_forward_body<bf16_raw>(reinterpret_cast<bf16_raw*>(y), reinterpret_cast<bf16_raw*>(pre), reinterpret_cast<const bf16_raw*>(x),
                                    reinterpret_cast<const bf16_raw*>(bias), rows, cols, act);
}

// f16 twin of bias_act_forward_bf16io: the same body with f16_raw storage.
extern "C" __global__ void bias_act_forward_f16io(
    unsigned short* y,
    unsigned short* __restrict__ pre,
    const unsigned short* x,
    const unsigned short* __restrict__ bias,
    int rows,
    int cols,
    int act)
{
    bias_act_forward_body<f16_raw>(reinterpret_cast<f16_raw*>(y), reinterpret_cast<f16_raw*>(pre), reinterpret_cast<const f16_raw*>(x),
                                   reinterpret_cast<const f16_raw*>(bias), rows, cols, act);
}

// ---- add, fill, cast ---------------------------------------------------------------------------

// y, a, b: [n] of activation storage type A. y may equal a or b.
template <typename A>
__device__ __forceinline__ void add_body(A* y, const A* a, const A* b, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        store_f32(y + i, load_f32(a + i) + load_f32(b + i));
    }
}

extern "C" __global__ void add_f32(float* y, const float* a, const float* b, long long n) {
    add_body<float>(y, a, b, n);
}

// bf16 y, a, b as raw bits: the f32 sum of the widened operands, rounded once.
extern "C" __global__ void add_bf16io(unsigned short* y, const unsigned short* a, const unsigned short* b, long long n) {
    add_body<bf16_raw>(reinterpret_cast<bf16_raw*>(y), reinterpret_cast<const bf16_raw*>(a), reinterpret_cast<const bf16_raw*>(b), n);
}

// f16 twin of add_bf16io: the same body with f16_raw storage.
extern "C" __global__ void add_f16io(unsigned short* y, const unsigned short* a, const unsigned short* b, long long n) {
    add_body<f16_raw>(reinterpret_cast<f16_raw*>(y), reinterpret_cast<const f16_raw*>(a), reinterpret_cast<const f16_raw*>(b), n);
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

// A 16-bit pattern stored n times: the bf16 and f16 fills (the value rounded on the host), which
// need no arithmetic, so one body serves both.
__device__ __forceinline__ void fill_16bit_body(unsigned short* __restrict__ y, unsigned bits, long long n) {
    const unsigned short v = (unsigned short)bits;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = v;
    }
}

// bits: the bf16 value in the low 16 bits (rounded on the host).
extern "C" __global__ void fill_bf16(unsigned short* __restrict__ y, unsigned bits, long long n) {
    fill_16bit_body(y, bits, n);
}

// bits: the f16 value in the low 16 bits (rounded on the host).
extern "C" __global__ void fill_f16(unsigned short* __restrict__ y, unsigned bits, long long n) {
    fill_16bit_body(y, bits, n);
}

// y = H(x), rounded to nearest even by H's store_f32 (common.cuh: NaN -> 0x7fff).
template <typename H>
__device__ __forceinline__ void cast_from_f32_body(H* __restrict__ y, const float* __restrict__ x, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        store_f32(y + i, x[i]);
    }
}

extern "C" __global__ void cast_f32_to_bf16(unsigned short* __restrict__ y, const float* __restrict__ x, long long n) {
    cast_from_f32_body<bf16_raw>(reinterpret_cast<bf16_raw*>(y), x, n);
}

extern "C" __global__ void cast_f32_to_f16(unsigned short* __restrict__ y, const float* __restrict__ x, long long n) {
    cast_from_f32_body<f16_raw>(reinterpret_cast<f16_raw*>(y), x, n);
}

// rows, cols, batch > 0 and rows <= ld (the launcher checks); index math in 64 bits, two
// divisions per element, which a memory-bound pass hides.
template <typename H>
__device__ __forceinline__ void cast_from_f32_strided_body(H* __restrict__ y, const float* __restrict__ x, long long rows, long long cols, long long ld, long long batch,
                                                           long long batch_stride) {
    const long long n = rows * cols * batch;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const long long column = i / rows;  // over every batch's columns
        const long long r = i - column * rows;
        const long long b = column / cols;
        const long long c = column - b * cols;
        const long long at = b * batch_stride + c * ld + r;
        store_f32(y + at, x[at]);
    }
}

extern "C" __global__ void cast_f32_to_bf16_strided(unsigned short* __restrict__ y, const float* __restrict__ x, long long rows, long long cols, long long ld,
                                                    long long batch, long long batch_stride) {
    cast_from_f32_strided_body<bf16_raw>(reinterpret_cast<bf16_raw*>(y), x, rows, cols, ld, batch, batch_stride);
}

extern "C" __global__ void cast_f32_to_f16_strided(unsigned short* __restrict__ y, const float* __restrict__ x, long long rows, long long cols, long long ld,
                                                   long long batch, long long batch_stride) {
    cast_from_f32_strided_body<f16_raw>(reinterpret_cast<f16_raw*>(y), x, rows, cols, ld, batch, batch_stride);
}

// y = f32(x), exact.
template <typename H>
__device__ __forceinline__ void cast_to_f32_body(float* __restrict__ y, const H* __restrict__ x, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = load_f32(x + i);
    }
}

extern "C" __global__ void cast_bf16_to_f32(float* __restrict__ y, const unsigned short* __restrict__ x, long long n) {
    cast_to_f32_body<bf16_raw>(y, reinterpret_cast<const bf16_raw*>(x), n);
}

extern "C" __global__ void cast_f16_to_f32(float* __restrict__ y, const unsigned short* __restrict__ x, long long n) {
    cast_to_f32_body<f16_raw>(y, reinterpret_cast<const f16_raw*>(x), n);
}

// ---- first-token gather ------------------------------------------------------------------------

// y: [batch, cols]; x: [batch, seq_len, cols], both of activation storage type A. Same mapping as
// bias_act: a warp per output row.
template <typename A>
__device__ __forceinline__ void first_token_body(A* __restrict__ y, const A* __restrict__ x, int batch, int seq_len, int cols) {
    for (int b = blockIdx.x * blockDim.y + threadIdx.y; b < batch; b += gridDim.x * blockDim.y) {
        const A* src = x + (size_t)b * (size_t)seq_len * (size_t)cols;
        A* dst = y + (size_t)b * (size_t)cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            store_f32(dst + c, load_f32(src + c));
        }
    }
}

extern "C" __global__ void first_token_f32(
    float* __restrict__ y,
    const float* __restrict__ x,
    int batch,
    int seq_len,
    int cols)
{
    first_token_body<float>(y, x, batch, seq_len, cols);
}

// bf16 y and x as raw bits: widening then rounding a bf16 gives it back, so the copy is exact
// (a NaN comes out as the canonical 0x7fff).
extern "C" __global__ void first_token_bf16io(
    unsigned short* __restrict__ y,
    const unsigned short* __restrict__ x,
    int batch,
    int seq_len,
    int cols)
{
    first_token_body<bf16_raw>(reinterpret_cast<bf16_raw*>(y), reinterpret_cast<const bf16_raw*>(x), batch, seq_len, cols);
}

// f16 twin of first_token_bf16io: the same body with f16_raw storage.
extern "C" __global__ void first_token_f16io(
    unsigned short* __restrict__ y,
    const unsigned short* __restrict__ x,
    int batch,
    int seq_len,
    int cols)
{
    first_token_body<f16_raw>(reinterpret_cast<f16_raw*>(y), reinterpret_cast<const f16_raw*>(x), batch, seq_len, cols);
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

// ---- backward: activation, bias gradient, first-token scatter ------------------------------------
// Semantics (the spec is the CPU backend: cpu::reference::activation_backward and
// activation_derivative, Backend::{linear_backward_params_into's db, first_token_backward_into}):
//   activation_backward_f32   dx = dy * act'(pre) for every ACT_* code (identity: dx = dy); dx may
//                             be dy itself (in place after the input-gradient GEMM), so dx and dy
//                             carry no __restrict__. A flat grid-stride loop, over groups of 4
//                             (Unit4 loads and stores, flat_groups) when n is whole groups and
//                             the buffers aligned, else over elements.
//   column_sums_partial_f32   partial[chunk][c] = sum of x[r][c] over the chunk's rows: stage one
//   column_sums_finalize_f32  of a deterministic column sum (a bias gradient sum_rows dy; also
//                             LayerNorm's dgamma/dbeta partials from kernels/layernorm.cu): stage
//                             two adds the chunks in index order and writes (`=`) or adds (`+=`).
//                             No atomics, so the bits depend only on rows, cols and the inputs.
//   first_token_backward_f32  the adjoint of first_token_f32: out[b, 0, :] = d[b, :] and zeros
//                             at t > 0, or, accumulating, out[b, 0, :] += d[b, :] and nothing else
//                             touched.
// Thread mapping: column_sums_partial_f32 runs blocks of (32, 8), grid (ceil(cols/32), chunks):
// lane (tx, ty) sums rows chunk·rows_per_chunk + ty, +8, ... of column 32·blockIdx.x + tx (each
// warp reads 32 consecutive floats of a row), then the 8 row lanes are added in order 0..7
// through shared memory (one barrier, reached by every thread). The finalize is one thread per
// column, chunks summed in order (coalesced across columns). first_token_backward_f32 is a row
// kernel (a warp per row of out, rows grid-strided): every row of out when writing, only the
// batch rows at t = 0 when accumulating.
// Numerics: f32. act' is evaluated in f32 with the accurate library functions (erfcf, expf,
// tanhf) from closed forms equal to the reference's f64 ones; a few ulp of act' times dy, tested
// within 1e-4 · (1 + max|ref|) as every gradient. A column sum rounds each of its
// rows_per_chunk/8 + 8 + chunks additions once: ~1e-6 of sum|x| for the launcher's chunking.
// bf16 storage (_bf16io, the same templated bodies with bf16_raw; loads widen exactly, f32
// arithmetic, each stored value rounded once to nearest even), deciding per buffer what bf16
// training needs:
//   activation_backward_bf16io   dx, dy and pre in bf16: all three are activations (or their
//                                gradients) of the frozen base's and the adapters' bf16 dataflow;
//                                dx = bf16(dy·act'(pre) in f32), the f32 kernel's value on the
//                                widened operands rounded once. In place (dx == dy) as for f32.
//   column_sums_partial_bf16io   x (dy) in bf16, the partials f32, finished by
//                                column_sums_finalize_f32 into an f32 sum: bias gradients are
//                                wanted only for trainable biases (adapters, heads), whose master
//                                copies and AdamW state are f32; BERT's frozen biases get none, so
//                                no bf16 output exists. The sum is the f32 kernel's on the widened
//                                dy, bit for bit (no rounding beyond the f32 ones).
//   first_token_backward_bf16io  out and d in bf16 (the encoder's activation gradient; d is the
//                                head's input gradient): the copy and the zeros are exact; with
//                                accumulate, out = bf16(out + d in f32), rounded once.
// The _f16io twins (activation_backward, column_sums_partial, first_token_backward) decide the
// same per buffer with f16 in place of bf16.
// ptxas (NVRTC 13.0), registers sm_80 / sm_90, no spills: see tests/nvrtc_compile.rs's report
// (activation_backward grew with its 4-group vector path).

// act'(v) in f32: closed forms of cpu::reference::activation_derivative. ReLU' is 0 at v <= 0 and
// for NaN (v > 0 is false), as the reference's. Swish' and sigmoid' at v < -88 overflow expf to
// inf and give 0 (s = 0), the f64 reference's value rounded to f32.
__device__ __forceinline__ float activation_derivative(int act, float v) {
    switch (act) {
        case ACT_RELU:
            return v > 0.0f ? 1.0f : 0.0f;
        case ACT_GELU: {
            const float cdf = 0.5f * erfcf(v * -0.70710678118654752f);
            const float pdf = expf(-0.5f * v * v) * 0.39894228040143268f;  // 1/sqrt(2 pi)
            return cdf + v * pdf;
        }
        case ACT_GELU_TANH: {
            const float c = 0.79788456080286536f;  // sqrt(2/pi)
            const float t = tanhf(c * (v + 0.044715f * v * v * v));
            return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * c * (1.0f + 3.0f * 0.044715f * v * v);
        }
        case ACT_SWISH: {
            const float s = 1.0f / (1.0f + expf(-v));
            return s * (1.0f + v * (1.0f - s));
        }
        case ACT_TANH: {
            const float t = tanhf(v);
            return 1.0f - t * t;
        }
        case ACT_SIGMOID: {
            const float s = 1.0f / (1.0f + expf(-v));
            return s * (1.0f - s);
        }
        default:
            return 1.0f;
    }
}

// A grid-stride loop over `groups` groups of 4 elements (Unit4s), FLAT_GROUPS_IN_FLIGHT groups a
// thread at a time (strided_batched): load(g) for each, every load issued before any use, then
// store(g, loaded). The flat kernels' vector path: a scalar grid-stride loop waits on each 2- or
// 4-byte load, which keeps too few bytes in flight to reach the copy bandwidth. Each group is
// loaded, then stored, by one thread, so an operand may be the output (in place).
#define FLAT_GROUPS_IN_FLIGHT 4

template <typename Load, typename Store>
__device__ __forceinline__ void flat_groups(long long groups, Load load, Store store) {
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    strided_batched<FLAT_GROUPS_IN_FLIGHT, long long>(first, groups, (long long)gridDim.x * blockDim.x, load, store);
}

// dx, dy, pre: [n] of activation storage type A; dx may equal dy.
template <typename A>
__device__ __forceinline__ void activation_backward_body(A* dx, const A* dy, const A* __restrict__ pre, long long n, int act) {
    const int ab = (int)sizeof(A);
    if (n % 4 == 0 && unit4_aligned(dx, ab) && unit4_aligned(dy, ab) && unit4_aligned(pre, ab)) {
        struct Operands {
            Unit4<A> dy, pre;
        };
        const Unit4<A>* dy4 = reinterpret_cast<const Unit4<A>*>(dy);
        const Unit4<A>* pre4 = reinterpret_cast<const Unit4<A>*>(pre);
        Unit4<A>* dx4 = reinterpret_cast<Unit4<A>*>(dx);
        flat_groups(
            n / 4, [&](long long g) { return Operands{dy4[g], pre4[g]}; },
            [&](long long g, const Operands& o) {
                Unit4<A> out;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    store_f32(&out.v[j], load_f32(&o.dy.v[j]) * activation_derivative(act, load_f32(&o.pre.v[j])));
                }
                dx4[g] = out;
            });
        return;
    }
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        store_f32(dx + i, load_f32(dy + i) * activation_derivative(act, load_f32(pre + i)));
    }
}

extern "C" __global__ void activation_backward_f32(float* dx, const float* dy, const float* __restrict__ pre, long long n, int act) {
    activation_backward_body<float>(dx, dy, pre, n, act);
}

// bf16 dx, dy and pre as raw bits: dy·act'(pre) in f32 from the widened operands, rounded once.
extern "C" __global__ void activation_backward_bf16io(unsigned short* dx, const unsigned short* dy, const unsigned short* __restrict__ pre, long long n, int act) {
    activation_backward_body<bf16_raw>(reinterpret_cast<bf16_raw*>(dx), reinterpret_cast<const bf16_raw*>(dy), reinterpret_cast<const bf16_raw*>(pre), n, act);
}

// f16 twin of activation_backward_bf16io: the same body with f16_raw storage.
extern "C" __global__ void activation_backward_f16io(unsigned short* dx, const unsigned short* dy, const unsigned short* __restrict__ pre, long long n, int act) {
    activation_backward_body<f16_raw>(reinterpret_cast<f16_raw*>(dx), reinterpret_cast<const f16_raw*>(dy), reinterpret_cast<const f16_raw*>(pre), n, act);
}

// partial: [chunks, cols] f32 with chunks = gridDim.y; x: [rows, cols] of storage type A.
// Block (32, 8).
template <typename A>
__device__ __forceinline__ void column_sums_partial_body(float* __restrict__ partial, const A* __restrict__ x, int rows, int cols, int rows_per_chunk) {
    __shared__ float colsum_lanes[8][33];

    const int c = blockIdx.x * 32 + threadIdx.x;
    const int r0 = blockIdx.y * rows_per_chunk;
    const int r1 = rows - r0 < rows_per_chunk ? rows : r0 + rows_per_chunk;
    float acc = 0.0f;
    if (c < cols) {
        for (int r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
            acc += load_f32(x + (size_t)r * (size_t)cols + c);
        }
    }
    colsum_lanes[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float s = 0.0f;
        for (int k = 0; k < (int)blockDim.y; ++k) {
            s += colsum_lanes[k][threadIdx.x];
        }
        partial[(size_t)blockIdx.y * (size_t)cols + c] = s;
    }
}

extern "C" __global__ void column_sums_partial_f32(
    float* __restrict__ partial,
    const float* __restrict__ x,
    int rows,
    int cols,
    int rows_per_chunk)
{
    column_sums_partial_body<float>(partial, x, rows, cols, rows_per_chunk);
}

// bf16 x (an activation gradient) as raw bits; the partials stay f32 (finished by
// column_sums_finalize_f32 into an f32 gradient).
extern "C" __global__ void column_sums_partial_bf16io(
    float* __restrict__ partial,
    const unsigned short* __restrict__ x,
    int rows,
    int cols,
    int rows_per_chunk)
{
    column_sums_partial_body<bf16_raw>(partial, reinterpret_cast<const bf16_raw*>(x), rows, cols, rows_per_chunk);
}

// f16 twin of column_sums_partial_bf16io: the same body with f16_raw storage.
extern "C" __global__ void column_sums_partial_f16io(
    float* __restrict__ partial,
    const unsigned short* __restrict__ x,
    int rows,
    int cols,
    int rows_per_chunk)
{
    column_sums_partial_body<f16_raw>(partial, reinterpret_cast<const f16_raw*>(x), rows, cols, rows_per_chunk);
}

// out_a = sum over chunks of partial_a (`+=` when accumulate != 0), and likewise out_b; the b pair
// may be null. out_*: [cols]; partial_*: [chunks, cols].
extern "C" __global__ void column_sums_finalize_f32(
    float* __restrict__ out_a,
    float* __restrict__ out_b,
    const float* __restrict__ partial_a,
    const float* __restrict__ partial_b,
    int chunks,
    int cols,
    int accumulate)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) {
        return;
    }
    float a = 0.0f;
    float b = 0.0f;
    for (int k = 0; k < chunks; ++k) {
        const size_t i = (size_t)k * (size_t)cols + c;
        a += partial_a[i];
        if (out_b != nullptr) {
            b += partial_b[i];
        }
    }
    if (accumulate != 0) {
        a += out_a[c];
    }
    out_a[c] = a;
    if (out_b != nullptr) {
        if (accumulate != 0) {
            b += out_b[c];
        }
        out_b[c] = b;
    }
}

// out: [batch, seq_len, cols]; d: [batch, cols]; both of activation storage type A.
template <typename A>
__device__ __forceinline__ void first_token_backward_body(A* __restrict__ out, const A* __restrict__ d, int batch, int seq_len, int cols, int accumulate) {
    const long long out_rows = accumulate != 0 ? (long long)batch : (long long)batch * seq_len;
    for (long long row = blockIdx.x * blockDim.y + threadIdx.y; row < out_rows; row += (long long)gridDim.x * blockDim.y) {
        const long long b = accumulate != 0 ? row : row / seq_len;
        const bool first = accumulate != 0 || row % seq_len == 0;
        A* dst = out + (size_t)(b * seq_len + (accumulate != 0 ? 0 : row % seq_len)) * (size_t)cols;
        const A* src = d + (size_t)b * (size_t)cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float v = first ? load_f32(src + c) : 0.0f;
            if (accumulate != 0) {
                v += load_f32(dst + c);
            }
            store_f32(dst + c, v);
        }
    }
}

extern "C" __global__ void first_token_backward_f32(
    float* __restrict__ out,
    const float* __restrict__ d,
    int batch,
    int seq_len,
    int cols,
    int accumulate)
{
    first_token_backward_body<float>(out, d, batch, seq_len, cols, accumulate);
}

// bf16 out and d as raw bits: the copy (and the zeros) exact, `+=` the f32 sum of the widened
// values rounded once.
extern "C" __global__ void first_token_backward_bf16io(
    unsigned short* __restrict__ out,
    const unsigned short* __restrict__ d,
    int batch,
    int seq_len,
    int cols,
    int accumulate)
{
    first_token_backward_body<bf16_raw>(reinterpret_cast<bf16_raw*>(out), reinterpret_cast<const bf16_raw*>(d), batch, seq_len, cols, accumulate);
}

// f16 twin of first_token_backward_bf16io: the same body with f16_raw storage.
extern "C" __global__ void first_token_backward_f16io(
    unsigned short* __restrict__ out,
    const unsigned short* __restrict__ d,
    int batch,
    int seq_len,
    int cols,
    int accumulate)
{
    first_token_backward_body<f16_raw>(reinterpret_cast<f16_raw*>(out), reinterpret_cast<const f16_raw*>(d), batch, seq_len, cols, accumulate);
}

// ---- dropout ------------------------------------------------------------------------------------
// Semantics: src/train/dropout.rs (common.cuh philox_*). Elements begin..begin+n of x/y are one
// mask block: element begin+i draws element offset+i of `stream` (the host launches once per block
// of a Parallel split; offset is DropoutSpec::offset, the shard's first row times the elements per
// row in data-parallel training, 0 otherwise). y may equal x (in place).
// Thread mapping: one thread per Philox block of 4 stream elements (every word used, one generator
// call per 4 loads), grid-strided; 64-bit indices. Where the range starts on a Philox block and
// the 4 elements are aligned (the usual case: offset, begin and cols multiples of 4), a quad is
// one 8-byte (16-bit) or 16-byte (f32) load and store. Thread q takes Philox block offset/4 + q, so an
// offset that is not a multiple of 4 starts mid-block: the first `lead` = offset % 4 words of that
// block belong to elements before this range and are skipped, never drawn by another thread.
// Numerics: x·scale in f32 (one multiply) or 0; the _bf16io and _f16io variants widen x exactly,
// compute the same f32 product and round it once on store (to nearest even). The mask is the f32
// kernel's.
// The body is also the 16-bit Linear's dropout epilogue (linear_epilogue_dropout_*, below): x is
// then the f32 product (TX = float) and `bias` ([cols], the base's 16-bit dtype) is added to each
// element in f32 before the mask; without a bias (the dropout kernels) cols is unused.
template <typename TY, typename TX, typename TB>
__device__ __forceinline__ void dropout_bias_body(TY* y, const TX* x, const TB* __restrict__ bias, long long cols, long long begin, long long n,
                                                  const unsigned* __restrict__ seed_buf, unsigned seed_lo, unsigned seed_hi, unsigned long long stream,
                                                  unsigned long long offset, unsigned threshold, float scale) {
    const PhiloxKey key = philox_key(seed_buf, seed_lo, seed_hi);
    const unsigned long long first = offset >> 2;
    const long long lead = (long long)(offset & 3ull);
    const long long quads = (lead + n + 3) / 4;
    const long long stride = (long long)gridDim.x * blockDim.x;
    // Whole quads: the range starts on a Philox block (lead 0) and a 4-element boundary of x, y
    // and (when biased, with whole 4-column groups) the bias, so a quad's 4 elements are one
    // aligned Unit4 of each: one wide load and store a quad instead of 4 guarded scalar ones, and
    // a 32-bit bias column when every index fits. The same words, arithmetic and roundings as
    // the scalar loop below, so the same bits.
    const bool whole = lead == 0 && (begin & 3) == 0 && unit4_aligned(x + begin, (int)sizeof(TX)) && unit4_aligned(y + begin, (int)sizeof(TY)) &&
                       (bias == nullptr || (cols % 4 == 0 && unit4_aligned(bias, (int)sizeof(TB))));
    const bool small = begin + 4 * quads <= 0x7fffffffll && cols <= 0x7fffffffll;
    for (long long q = (long long)blockIdx.x * blockDim.x + threadIdx.x; q < quads; q += stride) {
        if (whole && 4 * q + 4 <= n) {
            const long long e0 = begin + 4 * q;
            const Unit4<TX> xv = *reinterpret_cast<const Unit4<TX>*>(x + e0);
            Unit4<TB> bv;
            if (bias != nullptr) {
                const long long col = small ? (long long)((unsigned)e0 % (unsigned)cols) : e0 % cols;
                bv = *reinterpret_cast<const Unit4<TB>*>(bias + col);
            }
            const PhiloxWords w = philox_block(key, stream, first + (unsigned long long)q);
            Unit4<TY> out;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                float v = load_f32(&xv.v[k]);
                if (bias != nullptr) {
                    v += load_f32(&bv.v[k]);
                }
                store_f32(&out.v[k], w.w[k] >= threshold ? v * scale : 0.0f);
            }
            *reinterpret_cast<Unit4<TY>*>(y + e0) = out;
            continue;
        }
        const PhiloxWords w = philox_block(key, stream, first + (unsigned long long)q);
        // The bias column of the quad's first element, then stepped (one 64-bit remainder a quad,
        // not one an element: a 64-bit % is a long software sequence on the GPU).
        long long col = bias != nullptr ? (begin + 4 * q - lead) % cols : 0;
        if (col < 0) {
            col += cols;  // the quad starts before element 0 (lead > 0); those elements are skipped
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const long long i = 4 * q + k - lead;
            if (i >= 0 && i < n) {
                const long long e = begin + i;
                float v = load_f32(x + e);
                if (bias != nullptr) {
                    v += load_f32(bias + col);
                }
                store_f32(y + e, w.w[k] >= threshold ? v * scale : 0.0f);
            }
            if (++col == cols) {
                col = 0;
            }
        }
    }
}

template <typename T>
__device__ __forceinline__ void dropout_body(T* y, const T* x, long long begin, long long n, const unsigned* __restrict__ seed_buf, unsigned seed_lo,
                                             unsigned seed_hi, unsigned long long stream, unsigned long long offset, unsigned threshold, float scale) {
    dropout_bias_body<T, T, T>(y, x, nullptr, 1, begin, n, seed_buf, seed_lo, seed_hi, stream, offset, threshold, scale);
}

extern "C" __global__ void dropout_f32(
    float* y,
    const float* x,
    long long begin,
    long long n,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream,
    unsigned long long offset,
    unsigned threshold,
    float scale)
{
    dropout_body<float>(y, x, begin, n, seed_buf, seed_lo, seed_hi, stream, offset, threshold, scale);
}

// bf16 x and y as raw bits (y may equal x).
extern "C" __global__ void dropout_bf16io(
    unsigned short* y,
    const unsigned short* x,
    long long begin,
    long long n,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream,
    unsigned long long offset,
    unsigned threshold,
    float scale)
{
    dropout_body<bf16_raw>(reinterpret_cast<bf16_raw*>(y), reinterpret_cast<const bf16_raw*>(x), begin, n, seed_buf, seed_lo, seed_hi, stream, offset, threshold, scale);
}

// f16 twin of dropout_bf16io: the same body with f16_raw storage.
extern "C" __global__ void dropout_f16io(
    unsigned short* y,
    const unsigned short* x,
    long long begin,
    long long n,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream,
    unsigned long long offset,
    unsigned threshold,
    float scale)
{
    dropout_body<f16_raw>(reinterpret_cast<f16_raw*>(y), reinterpret_cast<const f16_raw*>(x), begin, n, seed_buf, seed_lo, seed_hi, stream, offset, threshold, scale);
}

// ---- 16-bit Linear epilogues over an f32 product -------------------------------------------------
// A Linear on bf16 (f16) activations runs its product with an f32 D and no cuBLASLt epilogue
// (cuBLASLt's 16-bit-output epilogues add the bias after rounding: docs/gpu-log.md 2026-11-27), then
// one of these rounds it once, fused with what follows the Linear in the model, so no f32 staging
// pass of its own and no separate activation or dropout pass runs (CudaBackend's 16-bit linear,
// linear_act, linear_act_only, linear_dropout, linear_backward_input_into). H is bf16_raw or f16_raw.
//   linear_epilogue_{bf16io,f16io}(y, pre, acc, bias, rows, cols, act): v = acc + bias (one f32 add;
//       bias [cols] in H, optional); pre = H(v) (stored when pre != null) and y = H(act(widen(H(v)))):
//       the activation at the rounded product, as a bf16 model's Linear output feeds its activation
//       and as the backward differentiates it, bit for bit the unfused product rounded and then
//       bias_act_forward over it. act 0 is the identity (a plain Linear: y = H(v)).
//   linear_epilogue_dropout_{bf16io,f16io}: dropout_bias_body above with x the f32 product:
//       y = keep ? H(v·scale) : 0 with v = acc + bias, the mask dropout_f32 draws (same stream,
//       offset and block), one rounding (the unfused path rounds v, then v·scale again).
//   accumulate_f32_{bf16io,f16io}(y, x, n): y = H(widen(y) + x), a 16-bit destination plus an f32
//       product (a Linear's input gradient accumulated, beta = 1 without cuBLASLt's beta·C).
// Thread mapping: linear_epilogue is bias_act's (one warp per row, lanes over the columns; when
// the row is whole 4-column groups, aligned, lanes over the groups with 16-byte loads of the
// product, EPILOGUE_GROUPS_IN_FLIGHT groups a thread loaded before any is stored);
// the dropout epilogue dropout's (one thread per Philox block of 4); accumulate a flat grid-stride
// loop, 64-bit indices, over groups of 4 as activation_backward's when whole and aligned. No
// barriers or shuffles.
// Numerics: f32 arithmetic on exactly widened loads, each stored value rounded once to nearest even.
// One element of linear_epilogue: v = a + b in f32 (a alone without a bias); `pre_out` = H(v);
// returns H(act(widen(H(v)))). The bias comes as a value (a pointer into a thread's array would put
// the array in local memory).
template <typename H>
__device__ __forceinline__ H linear_epilogue_element(float a, bool has_bias, float b, int act, H& pre_out) {
    const float v = has_bias ? a + b : a;
    store_f32(&pre_out, v);
    H out;
    store_f32(&out, act == 0 ? v : apply_activation(act, load_f32(&pre_out)));
    return out;
}

// 4-column groups a thread loads before storing any (the scalar loop waits on each load: one warp
// per row then keeps too few bytes in flight to reach the copy bandwidth).
#define EPILOGUE_GROUPS_IN_FLIGHT 4

template <typename H>
__device__ __forceinline__ void linear_epilogue_body(H* __restrict__ y, H* __restrict__ pre, const float* __restrict__ acc, const H* __restrict__ bias, int rows,
                                                     int cols, int act) {
    const int lane = threadIdx.x;
    // Whole 4-column groups with 16-byte aligned f32 rows and 8-byte aligned 16-bit ones: 16-byte
    // loads; else one column at a time. The same arithmetic per element either way.
    const int hb = (int)sizeof(H);
    const bool vec = cols % 4 == 0 && unit4_aligned(acc, 4) && unit4_aligned(y, hb) && unit4_aligned(pre, hb) && unit4_aligned(bias, hb);
    for (int row = blockIdx.x * blockDim.y + threadIdx.y; row < rows; row += gridDim.x * blockDim.y) {
        const size_t off = (size_t)row * (size_t)cols;
        if (vec) {
            const int groups = cols / 4;
            const Unit4<float>* a4 = reinterpret_cast<const Unit4<float>*>(acc + off);
            const Unit4<H>* b4 = reinterpret_cast<const Unit4<H>*>(bias);
            Unit4<H>* y4 = reinterpret_cast<Unit4<H>*>(y + off);
            Unit4<H>* p4 = reinterpret_cast<Unit4<H>*>(pre + off);
            struct Operands {
                Unit4<float> a;
                Unit4<H> b;
            };
            strided_batched<EPILOGUE_GROUPS_IN_FLIGHT, int>(
                lane, groups, (int)blockDim.x,
                [&](int g) {
                    Operands v;
                    v.a = a4[g];
                    if (bias != nullptr) {
                        v.b = b4[g];
                    }
                    return v;
                },
                [&](int g, const Operands& v) {
                    Unit4<H> p, o;
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        o.v[j] = linear_epilogue_element(v.a.v[j], bias != nullptr, bias != nullptr ? load_f32(&v.b.v[j]) : 0.0f, act, p.v[j]);
                    }
                    if (pre != nullptr) {
                        p4[g] = p;
                    }
                    y4[g] = o;
                });
        } else {
            for (int c = lane; c < cols; c += blockDim.x) {
                H p;
                const H o = linear_epilogue_element(acc[off + c], bias != nullptr, bias != nullptr ? load_f32(bias + c) : 0.0f, act, p);
                if (pre != nullptr) {
                    pre[off + c] = p;
                }
                y[off + c] = o;
            }
        }
    }
}

extern "C" __global__ void linear_epilogue_bf16io(unsigned short* __restrict__ y, unsigned short* __restrict__ pre, const float* __restrict__ acc,
                                                  const unsigned short* __restrict__ bias, int rows, int cols, int act) {
    linear_epilogue_body<bf16_raw>(reinterpret_cast<bf16_raw*>(y), reinterpret_cast<bf16_raw*>(pre), acc, reinterpret_cast<const bf16_raw*>(bias), rows, cols, act);
}

// f16 twin of linear_epilogue_bf16io: the same body with f16_raw storage.
extern "C" __global__ void linear_epilogue_f16io(unsigned short* __restrict__ y, unsigned short* __restrict__ pre, const float* __restrict__ acc,
                                                 const unsigned short* __restrict__ bias, int rows, int cols, int act) {
    linear_epilogue_body<f16_raw>(reinterpret_cast<f16_raw*>(y), reinterpret_cast<f16_raw*>(pre), acc, reinterpret_cast<const f16_raw*>(bias), rows, cols, act);
}

extern "C" __global__ void linear_epilogue_dropout_bf16io(
    unsigned short* __restrict__ y,
    const float* __restrict__ acc,
    const unsigned short* __restrict__ bias,
    long long cols,
    long long begin,
    long long n,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream,
    unsigned long long offset,
    unsigned threshold,
    float scale)
{
    dropout_bias_body<bf16_raw, float, bf16_raw>(reinterpret_cast<bf16_raw*>(y), acc, reinterpret_cast<const bf16_raw*>(bias), cols, begin, n, seed_buf, seed_lo,
                                                 seed_hi, stream, offset, threshold, scale);
}

// f16 twin of linear_epilogue_dropout_bf16io: the same body with f16_raw storage.
extern "C" __global__ void linear_epilogue_dropout_f16io(
    unsigned short* __restrict__ y,
    const float* __restrict__ acc,
    const unsigned short* __restrict__ bias,
    long long cols,
    long long begin,
    long long n,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    unsigned long long stream,
    unsigned long long offset,
    unsigned threshold,
    float scale)
{
    dropout_bias_body<f16_raw, float, f16_raw>(reinterpret_cast<f16_raw*>(y), acc, reinterpret_cast<const f16_raw*>(bias), cols, begin, n, seed_buf, seed_lo,
                                               seed_hi, stream, offset, threshold, scale);
}

template <typename H>
__device__ __forceinline__ void accumulate_f32_body(H* __restrict__ y, const float* __restrict__ x, long long n) {
    if (n % 4 == 0 && unit4_aligned(y, (int)sizeof(H)) && unit4_aligned(x, 4)) {
        struct Operands {
            Unit4<H> y;
            Unit4<float> x;
        };
        Unit4<H>* y4 = reinterpret_cast<Unit4<H>*>(y);
        const Unit4<float>* x4 = reinterpret_cast<const Unit4<float>*>(x);
        flat_groups(
            n / 4, [&](long long g) { return Operands{y4[g], x4[g]}; },
            [&](long long g, const Operands& o) {
                Unit4<H> out;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    store_f32(&out.v[j], load_f32(&o.y.v[j]) + o.x.v[j]);
                }
                y4[g] = out;
            });
        return;
    }
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        store_f32(y + i, load_f32(y + i) + x[i]);
    }
}

extern "C" __global__ void accumulate_f32_bf16io(unsigned short* __restrict__ y, const float* __restrict__ x, long long n) {
    accumulate_f32_body<bf16_raw>(reinterpret_cast<bf16_raw*>(y), x, n);
}

// f16 twin of accumulate_f32_bf16io: the same body with f16_raw storage.
extern "C" __global__ void accumulate_f32_f16io(unsigned short* __restrict__ y, const float* __restrict__ x, long long n) {
    accumulate_f32_body<f16_raw>(reinterpret_cast<f16_raw*>(y), x, n);
}
