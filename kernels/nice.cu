// NICE family: the elementwise half of the invertible adapter's additive coupling (spec §5.1,
// adapters' `NICECouplingBlock` in methods/invertible.py; the CPU spec is cpu::nice::nice).
//
// The features of x [rows, H] split into x1 = x[:, :s1] and x2 = x[:, s1:], s1 = H/2, s2 = H - s1.
//     forward:  y1 = x1 + F(x2),  y2 = x2 + G(y1)
//     inverse:  x2 = y2 - G(y1),  x1 = y1 - F(x2)        (x = [y1 | y2] on input)
// with F, G = Linear -> activation -> Linear. The launcher (src/cuda/nice.rs) runs the Linears as
// Gpu::gemm products on contiguous [rows, width] halves and the activations with
// bias_act_forward_f32 (kernels/elementwise.cu); the two kernels here move the halves:
//   nice_split_f32   half[r, c] = x[r, col0 + c]                         (the subnet's input)
//   nice_couple_f32  v = x[r, col0 + c] + sign * delta[r, c]  (sign = +1 forward, -1 inverse)
//                    out[r, col0 + c] = v, and half_out[r, c] = v when non-null (the next
//                    subnet's input), so the concatenation is written in place, never copied.
//
// Thread mapping: one warp per row, 8 rows per 256-thread block, rows grid-strided; lanes stride
// the `width` columns of the half (coalesced on both sides). No barriers or shuffles.
//
// Numerics: exact copies, and one f32 add or subtract per element (x + (-1 * d) is bitwise
// x - d: the multiply by -1 only flips the sign), the same rounding as the CPU's `x + f` / `y - g`.
//
// bf16 activations: nice_split_bf16io and nice_couple_bf16io read x and write out as bf16 raw
// bits, while the halves and delta stay f32: they are the launcher's scratch, the operands of the
// subnets' f32 GEMMs with the adapter's own f32 weights. The same templated bodies: the split
// widens exactly; the couple adds in f32 and rounds `out` once to nearest even, and half_out gets
// that stored (rounded) value widened, so the next subnet reads exactly the bf16 tensor that `out`
// holds (PyTorch's bf16 dataflow: G consumes the bf16 y1), and the inverse, which reads y1 from
// the bf16 output, recomputes G on the same bits. Hence the first couple's bf16 half is the f32
// kernel's rounded once; the second is not (its subnet read the rounded half).
// f16 activations: nice_split_f16io and nice_couple_f16io, the same bodies over f16_raw, with the
// same semantics in f16 (half_out is the stored f16 value widened).

// `v` as a store to `A` leaves it, in f32: itself for float, rounded to bf16 for bf16_raw and to
// f16 for f16_raw.
__device__ __forceinline__ float nice_stored_value(const float*, float v) { return v; }
__device__ __forceinline__ float nice_stored_value(const bf16_raw*, float v) { return bf16_bits_to_f32(f32_to_bf16_bits(v)); }
__device__ __forceinline__ float nice_stored_value(const f16_raw*, float v) { return f16_bits_to_f32(f32_to_f16_bits(v)); }

// half: [rows, width] (f32); x: [rows, hidden] of activation storage type A; reads columns
// [col0, col0 + width).
template <typename A>
__device__ __forceinline__ void nice_split_body(float* __restrict__ half, const A* __restrict__ x, int rows, int hidden, int col0, int width) {
    for (int r = blockIdx.x * blockDim.y + threadIdx.y; r < rows; r += gridDim.x * blockDim.y) {
        const A* src = x + (size_t)r * (size_t)hidden + col0;
        float* dst = half + (size_t)r * (size_t)width;
        for (int c = threadIdx.x; c < width; c += blockDim.x) {
            store_f32(dst + c, load_f32(src + c));
        }
    }
}

extern "C" __global__ void nice_split_f32(
    float* __restrict__ half,
    const float* __restrict__ x,
    int rows,
    int hidden,
    int col0,
    int width)
{
    nice_split_body<float>(half, x, rows, hidden, col0, width);
}

// bf16 x as raw bits; the half is f32 (widened exactly).
extern "C" __global__ void nice_split_bf16io(
    float* __restrict__ half,
    const unsigned short* __restrict__ x,
    int rows,
    int hidden,
    int col0,
    int width)
{
    nice_split_body<bf16_raw>(half, reinterpret_cast<const bf16_raw*>(x), rows, hidden, col0, width);
}

// f16 twin of nice_split_bf16io: the same body with f16_raw storage.
extern "C" __global__ void nice_split_f16io(
    float* __restrict__ half,
    const unsigned short* __restrict__ x,
    int rows,
    int hidden,
    int col0,
    int width)
{
    nice_split_body<f16_raw>(half, reinterpret_cast<const f16_raw*>(x), rows, hidden, col0, width);
}

// out, x: [rows, hidden] of activation storage type A; delta, half_out: [rows, width] (f32);
// half_out may be null.
template <typename A>
__device__ __forceinline__ void nice_couple_body(
    A* __restrict__ out,
    float* __restrict__ half_out,
    const A* __restrict__ x,
    const float* __restrict__ delta,
    int rows,
    int hidden,
    int col0,
    int width,
    float sign)
{
    for (int r = blockIdx.x * blockDim.y + threadIdx.y; r < rows; r += gridDim.x * blockDim.y) {
        const size_t full = (size_t)r * (size_t)hidden + (size_t)col0;
        const size_t part = (size_t)r * (size_t)width;
        for (int c = threadIdx.x; c < width; c += blockDim.x) {
            const float v = load_f32(x + full + c) + sign * delta[part + c];
            store_f32(out + full + c, v);
            if (half_out != nullptr) {
                half_out[part + c] = nice_stored_value(out, v);
            }
        }
    }
}

extern "C" __global__ void nice_couple_f32(
    float* __restrict__ out,
    float* __restrict__ half_out,
    const float* __restrict__ x,
    const float* __restrict__ delta,
    int rows,
    int hidden,
    int col0,
    int width,
    float sign)
{
    nice_couple_body<float>(out, half_out, x, delta, rows, hidden, col0, width, sign);
}

// bf16 out and x as raw bits; delta and half_out f32 (half_out: out's rounded value, widened).
extern "C" __global__ void nice_couple_bf16io(
    unsigned short* __restrict__ out,
    float* __restrict__ half_out,
    const unsigned short* __restrict__ x,
    const float* __restrict__ delta,
    int rows,
    int hidden,
    int col0,
    int width,
    float sign)
{
    nice_couple_body<bf16_raw>(reinterpret_cast<bf16_raw*>(out), half_out, reinterpret_cast<const bf16_raw*>(x), delta, rows, hidden, col0, width, sign);
}

// f16 twin of nice_couple_bf16io: the same body with f16_raw storage.
extern "C" __global__ void nice_couple_f16io(
    unsigned short* __restrict__ out,
    float* __restrict__ half_out,
    const unsigned short* __restrict__ x,
    const float* __restrict__ delta,
    int rows,
    int hidden,
    int col0,
    int width,
    float sign)
{
    nice_couple_body<f16_raw>(reinterpret_cast<f16_raw*>(out), half_out, reinterpret_cast<const f16_raw*>(x), delta, rows, hidden, col0, width, sign);
}
