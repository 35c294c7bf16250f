// Optimizer family: the global gradient L2 norm and torch's clip_grad_norm_ over a list of
// gradient views, and AdamW as one launch over a flat parameter arena.
//
// Semantics (the spec is the CPU backend: Backend::clip_grad_norm = train::optim::clip_in_place,
// Backend::adamw = train::optim::adamw_arena_reference):
//   grad_sumsq_partial_f32 + grad_norm_finalize_f32 + grad_scale_f32 (three launches):
//     norm_v = (float) sqrt(sum_i (double) g_v[i]^2)       per view, accumulated in f64
//     total  = (float) sqrt(sum_v (double) norm_v^2)       views in list order, as the CPU
//     coef   = (1 / (total + 1e-6f)) * max_norm            in f32, torch's expression
//     when clipping is asked (max_norm finite) and (coef is NaN or coef < 1): g *= coef.
//   `norm` receives total; the clip decision and factor stay on the device ([2] floats), so
//   nothing is read back and a NaN/inf norm poisons the gradients exactly as torch does.
//   scale_f32: x *= factor over one buffer (loss scaling; see there).
//   adamw_f32 (one launch): torch.optim.AdamW's update of every listed segment of the arena, with
//   the segment's tensor's step count + 1 (incremented here, once per listed tensor) and the
//   learning rate [hi, lo] (two f32 summing to the f64 lr, train::optim::split_f64) read from
//   device buffers; everything is skipped (steps included) when a given [1] flag is not finite.
//
// Tables (built and validated by src/cuda/optim.rs, uploaded once, so the launches are the same
// every step and can be captured in a graph):
//   gradient views: [views][3] long long = {device address, length, first block}
//   AdamW segments: [segments][4] long long = {tensor index, start, length, first block}
// Every view/segment owns ceil(length / chunk) consecutive blocks, and a block covers `chunk`
// contiguous elements of one view only; a block finds its entry by a binary search over the
// first-block column (entries with no element own no block).
//
// Thread mapping: 1-D blocks (the launcher uses 256 threads); element loops stride blockDim.x
// inside the block's chunk, so warps read consecutive floats.
//
// Determinism, no float atomics: each block writes one f64 partial sum of squares (a fixed
// shuffle tree per warp, then the warps in order); the one-block finalize adds each view's
// partials with a warp per view (lanes stride the partials, then a fixed shuffle tree) and then
// the views in order in one thread. The only atomic is AdamW's integer ticket (below).
//
// Numerics: squares of f32 values are exact in f64, and an f64 sum of at most 2^24 of them is
// within ~1e-12 relative of the CPU's sequential f64 sum, so the per-view f32 norms equal the CPU's
// except at a rounding tie; the total and the factor are then computed exactly as the CPU does.
// AdamW: the per-segment scalars are computed in f64 by thread 0 of each block exactly as
// StepScalars::new (pow, sqrt, division, rounded to f32 where torch rounds), then each element is
// updated in f32 in torch's order with the CPU's two explicit fmas and no other contraction
// (opt_fmul_rn/opt_dmul_rn keep NVRTC from fusing `p * decay` or `lr * wd` into a following add).
// On cuda-sim (glibc pow, no contraction) the result equals the CPU's bit for bit; on a GPU,
// CUDA's f64 pow is within 2 ulp, which can move a rounded f32 scalar by 1 ulp: updates within
// 1e-6 relative.
//
// AdamW's step counts: blocks read steps[tensor] in their prologue and must all have read it
// before it is incremented. Each block takes a ticket with atomicInc(done, blocks - 1) after a
// __threadfence; the block that draws the last ticket increments the listed tensors' counts
// (atomicInc wraps the counter back to 0, ready for the next launch). The counter is 0 between
// launches; a launch that faults mid-way leaves it undefined (the context is lost on a GPU then).

// A product rounded on its own: NVRTC (fmad=true) would otherwise fuse it into a following add.
__device__ __forceinline__ float opt_fmul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;  // cuda-sim builds with -ffp-contract=off
#endif
}

__device__ __forceinline__ double opt_dmul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dmul_rn(a, b);
#else
    return a * b;
#endif
}

__device__ __forceinline__ double opt_warp_sum_f64(double v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(FULL_WARP_MASK, v, offset);
    }
    return v;
}

// The entry whose blocks include `block`: the last entry with first_block <= block (the column
// is non-decreasing; entries that own no block share their successor's first block).
__device__ __forceinline__ int opt_find_entry(const long long* table, int width, int first_col, int entries, long long block) {
    int lo = 0;
    int hi = entries - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (table[(size_t)mid * width + first_col] <= block) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

// ---- gradient norm and clipping ----------------------------------------------------------------

// partials: [gridDim.x] f64 bit patterns; table: [views][3]. Every block owns a chunk of one view.
extern "C" __global__ void grad_sumsq_partial_f32(
    unsigned long long* __restrict__ partials,
    const long long* __restrict__ table,
    int views,
    long long chunk)
{
    __shared__ double sumsq_warps[32];

    const long long block = blockIdx.x;
    const int v = opt_find_entry(table, 3, 2, views, block);
    const float* g = reinterpret_cast<const float*>(table[3 * (size_t)v]);
    const long long len = table[3 * (size_t)v + 1];
    const long long start = (block - table[3 * (size_t)v + 2]) * chunk;
    const long long end = len - start < chunk ? len : start + chunk;

    double acc = 0.0;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const double x = (double)g[i];
        acc += x * x;  // exact: a square of an f32 fits in an f64
    }
    acc = opt_warp_sum_f64(acc);
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warp = threadIdx.x >> 5;
    if (lane == 0) {
        sumsq_warps[warp] = acc;
    }
    __syncthreads();
    if (warp == 0) {
        double s = lane < (blockDim.x >> 5) ? sumsq_warps[lane] : 0.0;
        s = opt_warp_sum_f64(s);
        if (lane == 0) {
            partials[block] = (unsigned long long)__double_as_longlong(s);
        }
    }
}

// One block. norm_out: [1]; clip_out: [2] = {coef, 1 if the gradients are to be scaled else 0};
// view_norms: [views] (workspace); partials as written above.
extern "C" __global__ void grad_norm_finalize_f32(
    float* __restrict__ norm_out,
    float* __restrict__ clip_out,
    float* __restrict__ view_norms,
    const unsigned long long* __restrict__ partials,
    const long long* __restrict__ table,
    int views,
    long long chunk,
    float max_norm,
    int clip)
{
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warp = threadIdx.x >> 5;
    const unsigned n_warps = blockDim.x >> 5;
    // A warp per view (v is the same in every lane, so the shuffles see the whole warp).
    for (int v = warp; v < views; v += n_warps) {
        const long long len = table[3 * (size_t)v + 1];
        const long long first = table[3 * (size_t)v + 2];
        const long long blocks = (len + chunk - 1) / chunk;
        double s = 0.0;
        for (long long j = lane; j < blocks; j += 32) {
            s += __longlong_as_double((long long)partials[first + j]);
        }
        s = opt_warp_sum_f64(s);
        if (lane == 0) {
            view_norms[v] = (float)sqrt(s);
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double sum_sq = 0.0;
        for (int v = 0; v < views; ++v) {
            const double n = (double)view_norms[v];
            sum_sq += n * n;
        }
        const float total = (float)sqrt(sum_sq);
        const float coef = (1.0f / (total + 1e-6f)) * max_norm;
        const bool scale = clip != 0 && (coef != coef || coef < 1.0f);
        norm_out[0] = total;
        clip_out[0] = coef;
        clip_out[1] = scale ? 1.0f : 0.0f;
    }
}

// g *= clip[0] over every view when clip[1] != 0 (the decision grad_norm_finalize_f32 wrote).
extern "C" __global__ void grad_scale_f32(
    const long long* __restrict__ table,
    int views,
    long long chunk,
    const float* __restrict__ clip)
{
    if (clip[1] == 0.0f) {
        return;
    }
    const float coef = clip[0];
    const long long block = blockIdx.x;
    const int v = opt_find_entry(table, 3, 2, views, block);
    float* g = reinterpret_cast<float*>(table[3 * (size_t)v]);
    const long long len = table[3 * (size_t)v + 1];
    const long long start = (block - table[3 * (size_t)v + 2]) * chunk;
    const long long end = len - start < chunk ? len : start + chunk;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        g[i] *= coef;
    }
}

// x[i] *= factor over one flat f32 buffer: loss scaling (the f16 pipeline scales the loss
// gradient up before the backward and the gradient arena back down after it). The factors are
// powers of two, so the product is exact unless it overflows or leaves the normal range.
// Grid-stride over n (any grid).
extern "C" __global__ void scale_f32(float* x, long long n, float factor)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        x[i] *= factor;
    }
}

// ---- AdamW over a flat arena -----------------------------------------------------------------------

// params, grads, exp_avg, exp_avg_sq: the [N] arena; steps: [tensors]; done: [1], 0 between
// launches; segments: [n_segments][4]; lr: [2] = {hi, lo}; finite_flag: [1] or null. The f64
// hyper-parameters arrive as their bit patterns (the launch ABI has no double parameter).
extern "C" __global__ void adamw_f32(
    float* __restrict__ params,
    const float* __restrict__ grads,
    float* __restrict__ exp_avg,
    float* __restrict__ exp_avg_sq,
    unsigned* __restrict__ steps,
    unsigned* __restrict__ done,
    const long long* __restrict__ segments,
    int n_segments,
    long long chunk,
    const float* __restrict__ lr,
    const float* __restrict__ finite_flag,
    unsigned long long beta1_bits,
    unsigned long long beta2_bits,
    unsigned long long eps_bits,
    unsigned long long weight_decay_bits)
{
    // {decay?, decay, w1, w1 small?, beta2, 1 - beta2, sqrt(bias correction 2), eps, -step size}
    __shared__ float adamw_scalars[9];

    // The same value for every block: either all of them return here or none does.
    if (finite_flag != nullptr && !isfinite(finite_flag[0])) {
        return;
    }
    const long long block = blockIdx.x;
    const int s = opt_find_entry(segments, 4, 3, n_segments, block);
    const long long tensor = segments[4 * (size_t)s];
    if (threadIdx.x == 0) {
        const double lr_d = (double)lr[0] + (double)lr[1];
        const double b1 = __longlong_as_double((long long)beta1_bits);
        const double b2 = __longlong_as_double((long long)beta2_bits);
        const double eps = __longlong_as_double((long long)eps_bits);
        const double wd = __longlong_as_double((long long)weight_decay_bits);
        const double t = (double)(steps[tensor] + 1u);
        const double bias_correction1 = 1.0 - pow(b1, t);
        const double bias_correction2 = 1.0 - pow(b2, t);
        const double w1 = 1.0 - b1;
        adamw_scalars[0] = wd != 0.0 ? 1.0f : 0.0f;
        adamw_scalars[1] = (float)(1.0 - opt_dmul_rn(lr_d, wd));
        adamw_scalars[2] = (float)w1;
        adamw_scalars[3] = fabs(w1) < 0.5 ? 1.0f : 0.0f;
        adamw_scalars[4] = (float)b2;
        adamw_scalars[5] = (float)(1.0 - b2);
        adamw_scalars[6] = (float)sqrt(bias_correction2);
        adamw_scalars[7] = (float)eps;
        adamw_scalars[8] = (float)(-(lr_d / bias_correction1));
    }
    __syncthreads();
    const bool decay_on = adamw_scalars[0] != 0.0f;
    const float decay = adamw_scalars[1];
    const float w1 = adamw_scalars[2];
    const bool w1_small = adamw_scalars[3] != 0.0f;
    const float beta2 = adamw_scalars[4];
    const float one_minus_beta2 = adamw_scalars[5];
    const float bc2_sqrt = adamw_scalars[6];
    const float eps = adamw_scalars[7];
    const float neg_step_size = adamw_scalars[8];

    const long long seg_start = segments[4 * (size_t)s + 1];
    const long long len = segments[4 * (size_t)s + 2];
    const long long start = (block - segments[4 * (size_t)s + 3]) * chunk;
    const long long end = len - start < chunk ? len : start + chunk;
    for (long long j = start + threadIdx.x; j < end; j += blockDim.x) {
        const size_t i = (size_t)(seg_start + j);
        float p = params[i];
        const float g = grads[i];
        float m = exp_avg[i];
        float v = exp_avg_sq[i];
        if (decay_on) {
            p = opt_fmul_rn(p, decay);  // torch: param.mul_(1 - lr * wd)
        }
        // exp_avg.lerp_(grad, 1 - beta1), as torch's kernels evaluate it.
        m = w1_small ? fmaf(w1, g - m, m) : fmaf(w1 - 1.0f, g - m, g);
        // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2).
        v = opt_fmul_rn(v, beta2);
        v = fmaf(one_minus_beta2 * g, g, v);
        // denom = exp_avg_sq.sqrt() / sqrt(bias_correction2) + eps; param.addcdiv_(m, denom, -step_size).
        const float denom = sqrtf(v) / bc2_sqrt + eps;
        p += neg_step_size * m / denom;
        params[i] = p;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
    }

    if (threadIdx.x == 0) {
        // This block has read steps[tensor] (above, before the barrier); publish that, then draw a
        // ticket. The last ticket's block runs after every block's read: it advances the counts.
        __threadfence();
        const unsigned last = (unsigned)gridDim.x - 1u;
        if (atomicInc(done, last) == last) {
            for (int k = 0; k < n_segments; ++k) {
                steps[segments[4 * (size_t)k]] += 1u;
            }
        }
    }
}
