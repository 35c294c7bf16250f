// Tensor-core family: the on-device check of the mma.sync fragment layout that every tensor-core
// kernel of this project relies on (kernels/common.cuh's mma_m16n8k16_*, written from the PTX
// ISA's "Matrix Fragments for mma.m16n8k16 with floating point type"; adapter.cu's split forward
// uses it). The spec is the matrix product: cuda::mma::check_tensor_core_layout computes it on the
// host.
//
// mma_layout_check: D = A·B + C over K = 32 with two chained m16n8k16 mma, one 16x8 tile a warp:
// warp w reads a[w] ([16][32] row-major), bt[w] (B's 8 columns of 32, each contiguous in k) and
// c[w] ([16][8] row-major), and writes d[w] ([16][8]); the 16-bit operands are raw bits, f16 when
// `f16` != 0, else bf16.
// Thread mapping: lane l of a warp holds the fragments of g = l / 4, t = l % 4 (common.cuh); it
// loads them from global memory by that layout and stores its four results by it.
// Numerics: on operands whose products and partial sums are exact in f32 (the check's small
// integers) D is the exact product in any summation order, so D is right if and only if the
// fragment layout is the GPU's.
extern "C" __global__ void mma_layout_check(const unsigned short* a, const unsigned short* bt, const float* c, float* d, int f16)
{
    const unsigned w = threadIdx.x >> 5, lane = threadIdx.x & 31u, g = lane >> 2, t = lane & 3u;
    const unsigned short* aw = a + w * 16 * 32;
    const unsigned short* bw = bt + w * 8 * 32;
    auto pair = [](const unsigned short* p) { return (unsigned)p[0] | ((unsigned)p[1] << 16); };
    float acc[4];
    for (unsigned q = 0; q < 4; ++q) {
        acc[q] = c[w * 128 + (g + 8 * (q >> 1)) * 8 + 2 * t + (q & 1u)];
    }
    for (unsigned k0 = 0; k0 < 32; k0 += 16) {
        const unsigned fa[4] = {pair(aw + g * 32 + k0 + 2 * t), pair(aw + (g + 8) * 32 + k0 + 2 * t), pair(aw + g * 32 + k0 + 2 * t + 8),
                                pair(aw + (g + 8) * 32 + k0 + 2 * t + 8)};
        const unsigned fb[2] = {pair(bw + g * 32 + k0 + 2 * t), pair(bw + g * 32 + k0 + 2 * t + 8)};
        const float in[4] = {acc[0], acc[1], acc[2], acc[3]};
        if (f16) {
            mma_m16n8k16_f16(acc, fa, fb, in);
        } else {
            mma_m16n8k16_bf16(acc, fa, fb, in);
        }
    }
    for (unsigned q = 0; q < 4; ++q) {
        d[w * 128 + (g + 8 * (q >> 1)) * 8 + 2 * t + (q & 1u)] = acc[q];
    }
}
