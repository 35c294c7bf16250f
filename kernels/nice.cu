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

// half: [rows, width]; x: [rows, hidden]; reads columns [col0, col0 + width).
extern "C" __global__ void nice_split_f32(
    float* __restrict__ half,
    const float* __restrict__ x,
    int rows,
    int hidden,
    int col0,
    int width)
{
    for (int r = blockIdx.x * blockDim.y + threadIdx.y; r < rows; r += gridDim.x * blockDim.y) {
        const float* src = x + (size_t)r * (size_t)hidden + col0;
        float* dst = half + (size_t)r * (size_t)width;
        for (int c = threadIdx.x; c < width; c += blockDim.x) {
            store_f32(dst + c, load_f32(src + c));
        }
    }
}

// out, x: [rows, hidden]; delta, half_out: [rows, width]; half_out may be null.
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
    for (int r = blockIdx.x * blockDim.y + threadIdx.y; r < rows; r += gridDim.x * blockDim.y) {
        const size_t full = (size_t)r * (size_t)hidden + (size_t)col0;
        const size_t part = (size_t)r * (size_t)width;
        for (int c = threadIdx.x; c < width; c += blockDim.x) {
            const float v = load_f32(x + full + c) + sign * load_f32(delta + part + c);
            store_f32(out + full + c, v);
            if (half_out != nullptr) {
                store_f32(half_out + part + c, v);
            }
        }
    }
}
