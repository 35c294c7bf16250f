// LayerNorm family: fused residual-add + LayerNorm over the last dimension.
// Training kernels follow the forward, each with its own header: the forward that also writes z
// and the [rows, 2] {mean, rstd} (residual_layernorm_forward_train_f32), the input gradient
// (layernorm_backward_f32) and, for trainable LayerNorms only, the dgamma/dbeta column partials
// (layernorm_param_grad_partial_f32, finished by elementwise.cu's column_sums_finalize_f32).
//
// Semantics (the spec is bert_adapters::cpu::reference::residual_layernorm; HF BERT's
// `BertSelfOutput`/`BertOutput` compute `LayerNorm(hidden + input_tensor)`):
//     z    = x + residual              (rounded to f32, as PyTorch materialises the sum)
//     mean = sum(z) / cols
//     var  = sum((z - mean)^2) / cols  (biased, like torch.nn.LayerNorm)
//     rstd = 1 / sqrt(var + eps)       (eps inside the square root)
//     y    = (z - mean) * rstd * gamma + beta
// `mean` and `rstd` are written per row because the backward needs them.
//
// Storage: x, residual, y, mean and rstd are f32. gamma and beta are f32
// (residual_layernorm_forward_f32) or bf16 (residual_layernorm_forward_bf16: a frozen base loaded
// in bf16), read through common.cuh's load_f32, which widens bf16 exactly; everything is computed
// in f32 either way, so the bf16 kernel equals the f32 kernel run on the widened parameters. Both
// are thin extern "C" wrappers over one templated body (extern "C" kernels cannot be templates).
// The _bf16io variants (residual_layernorm_forward_bf16io, residual_layernorm_forward_train_bf16io,
// layernorm_backward_bf16io, layernorm_param_grad_partial_bf16io) store every activation in bf16
// (x, residual, y, z, dy, dz) with gamma and beta in bf16 too (a frozen base), while mean, rstd,
// the [rows, 2] stats and the dgamma/dbeta partials stay f32: the same templated bodies
// instantiated with bf16_raw, all arithmetic in f32 (z = x + residual included: it is never
// rounded to bf16 before the statistics), each stored value rounded once to nearest even. So a
// bf16io output is the f32 kernel's output on the widened inputs, rounded once, and its f32
// outputs are the f32 kernel's bit for bit.
// f16: every _bf16 and _bf16io kernel here has an _f16 / _f16io twin (an f16 base; f16 activations
// over an f16 base), the same bodies instantiated with f16_raw, with the same semantics in IEEE f16
// (11 significant bits, finite up to 65504: a stored value past it is ±inf).
//
// Thread mapping: a "row team" of blockDim.x threads (a multiple of 32) owns one row; a block
// holds blockDim.y teams. Thread t of a team handles columns t, t + blockDim.x, ... so each warp's
// loads are coalesced. The launcher (src/cuda/layernorm.rs) picks
//   * cols <= 1024: one warp per row, 8 rows per block (reductions are pure shuffles);
//   * cols >  1024: one block per row, 128..1024 threads (about 16 columns per thread),
//                   shuffles + one shared-memory exchange.
// Rows past `rows` in the last block do no loads or stores but still take part in the
// reductions, because team_sum may contain __syncthreads.
//
// Numerics: exact two-pass in f32 registers, not one-pass E[z^2]-E[z]^2 (which cancels
// catastrophically when |mean| >> std). Pass 1 sums z; pass 2 sums (z - mean)^2; pass 3 writes y.
// Each thread accumulates at most a few dozen terms before a fixed-order tree reduction, so the
// rounding error of a sum is about (cols/blockDim.x + log2(blockDim.x)) * 2^-24 relative to
// sum|z|: ~1e-6 of the row's scale for cols = 4099, far inside the tests' 1e-5 * (1 + max|ref|)
// bound against the f64 reference. rstd uses IEEE sqrtf and division (<= 1 ulp each), not the
// ~2 ulp rsqrtf: it is once per row, so accuracy costs nothing here. The reduction order is
// fixed, so results are bitwise reproducible.
//
// Memory: when `cache_row` is non-zero each thread keeps its own z values in dynamic shared
// memory (blockDim.y * cols floats) so x and residual are read from global memory once. A thread
// only ever reads back the entries it wrote itself, so no barrier guards that cache. When the row
// does not fit (the launcher decides) z is recomputed from global memory in each pass (L1/L2 hits
// for a just-read row). Loads are scalar (4-wide vector loads would need cols % 4 == 0 and 16-byte
// aligned views, which the launcher does not require) but batched: every pass loads
// TEAM_COL_BATCH columns a thread before using any (common.cuh team_cols_batched), in the plain
// loop's column order, so the sums and results are a plain loop's bit for bit. A plain loop keeps
// one load in flight a thread, which held the bf16 kernels (2-byte loads) to half the f32 ones'
// bandwidth on an H100.

// ---- forward -------------------------------------------------------------------------------

// One body for the forward and the training forward (its section below). y, x, residual and z_out
// are [rows, cols] of activation storage type A (float or bf16_raw); gamma, beta: [cols] of
// parameter storage type P; mean_out[row * stats_stride] and rstd_out[row * stats_stride] are f32
// (stride 1: two [rows] arrays; stride 2: the interleaved [rows, 2] stats). residual and z_out may
// be null. z is formed and kept in f32 (registers or the row cache); z_out gets it rounded to A.
template <typename A, typename P>
__device__ __forceinline__ void residual_layernorm_forward_body(
    A* __restrict__ y,
    A* __restrict__ z_out,
    float* __restrict__ mean_out,
    float* __restrict__ rstd_out,
    int stats_stride,
    const A* __restrict__ x,
    const A* __restrict__ residual,
    const P* __restrict__ gamma,
    const P* __restrict__ beta,
    int rows,
    int cols,
    float eps,
    int cache_row)
{
    extern __shared__ float z_cache[];  // [blockDim.y][cols] when cache_row != 0
    __shared__ float scratch[32];       // team_sum partials (block-per-row mapping only)

    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < rows;
    // size_t: rows * cols may exceed 2^31 elements.
    const size_t offset = (size_t)(active ? row : 0) * (size_t)cols;
    const A* xr = x + offset;
    const A* rr = residual != nullptr ? residual + offset : nullptr;
    A* zo = z_out != nullptr ? z_out + offset : nullptr;
    float* zr = z_cache + (size_t)threadIdx.y * (size_t)cols;
    const bool cached = cache_row != 0;

    // Every pass loads TEAM_COL_BATCH columns a thread before using them (team_cols_batched).
    // x and residual of column c, from global memory (passes 2 and 3 without the cache).
    struct Operands {
        float x, r;
    };
    auto operands = [&](int c) {
        Operands v;
        v.x = load_f32(xr + c);
        v.r = rr != nullptr ? load_f32(rr + c) : 0.0f;
        return v;
    };
    auto z_of = [&](const Operands& v) { return rr != nullptr ? v.x + v.r : v.x; };

    // Pass 1: z = x + residual (cached if asked, stored if asked), and its sum.
    float sum = 0.0f;
    if (active) {
        team_cols_batched(cols, operands, [&](int c, const Operands& v) {
            const float z = z_of(v);
            if (zo != nullptr) {
                store_f32(zo + c, z);
            }
            if (cached) {
                zr[c] = z;
            }
            sum += z;
        });
    }
    const float mean = team_sum(sum, scratch) / (float)cols;

    // Pass 2: sum of squared deviations from the exact f32 mean. Without the cache z is formed
    // again from x and residual (never read back from z_out, which may hold it rounded).
    auto z_again = [&](int c) { return cached ? zr[c] : z_of(operands(c)); };
    float sq = 0.0f;
    if (active) {
        team_cols_batched(cols, z_again, [&](int, float z) {
            const float d = z - mean;
            sq = fmaf(d, d, sq);
        });
    }
    const float var = team_sum(sq, scratch) / (float)cols;
    const float rstd = 1.0f / sqrtf(var + eps);

    // Pass 3: normalise, scale, shift.
    if (active) {
        A* yr = y + offset;
        struct Affine {
            float z, g, b;
        };
        team_cols_batched(
            cols, [&](int c) { return Affine{z_again(c), load_f32(gamma + c), load_f32(beta + c)}; },
            [&](int c, const Affine& v) { store_f32(yr + c, fmaf((v.z - mean) * rstd, v.g, v.b)); });
        if (threadIdx.x == 0) {
            mean_out[(size_t)row * (size_t)stats_stride] = mean;
            rstd_out[(size_t)row * (size_t)stats_stride] = rstd;
        }
    }
}

// f32 parameters.
extern "C" __global__ void residual_layernorm_forward_f32(
    float* __restrict__ y,
    float* __restrict__ mean_out,
    float* __restrict__ rstd_out,
    const float* __restrict__ x,
    const float* __restrict__ residual,
    const float* __restrict__ gamma,
    const float* __restrict__ beta,
    int rows,
    int cols,
    float eps,
    int cache_row)
{
    residual_layernorm_forward_body<float, float>(y, nullptr, mean_out, rstd_out, 1, x, residual, gamma, beta, rows, cols, eps, cache_row);
}

// bf16 gamma and beta (a frozen base stored in bf16), as raw bits; x, residual and y stay f32.
extern "C" __global__ void residual_layernorm_forward_bf16(
    float* __restrict__ y,
    float* __restrict__ mean_out,
    float* __restrict__ rstd_out,
    const float* __restrict__ x,
    const float* __restrict__ residual,
    const unsigned short* __restrict__ gamma,
    const unsigned short* __restrict__ beta,
    int rows,
    int cols,
    float eps,
    int cache_row)
{
    residual_layernorm_forward_body<float, bf16_raw>(y, nullptr, mean_out, rstd_out, 1, x, residual, reinterpret_cast<const bf16_raw*>(gamma),
                                                     reinterpret_cast<const bf16_raw*>(beta), rows, cols, eps, cache_row);
}

// f16 twin of residual_layernorm_forward_bf16: the same body with f16_raw storage.
extern "C" __global__ void residual_layernorm_forward_f16(
    float* __restrict__ y,
    float* __restrict__ mean_out,
    float* __restrict__ rstd_out,
    const float* __restrict__ x,
    const float* __restrict__ residual,
    const unsigned short* __restrict__ gamma,
    const unsigned short* __restrict__ beta,
    int rows,
    int cols,
    float eps,
    int cache_row)
{
    residual_layernorm_forward_body<float, f16_raw>(y, nullptr, mean_out, rstd_out, 1, x, residual, reinterpret_cast<const f16_raw*>(gamma),
                                                    reinterpret_cast<const f16_raw*>(beta), rows, cols, eps, cache_row);
}

// bf16 activations (x, residual, y) and bf16 gamma and beta, as raw bits; mean and rstd stay f32.
extern "C" __global__ void residual_layernorm_forward_bf16io(
    unsigned short* __restrict__ y,
    float* __restrict__ mean_out,
    float* __restrict__ rstd_out,
    const unsigned short* __restrict__ x,
    const unsigned short* __restrict__ residual,
    const unsigned short* __restrict__ gamma,
    const unsigned short* __restrict__ beta,
    int rows,
    int cols,
    float eps,
    int cache_row)
{
    residual_layernorm_forward_body<bf16_raw, bf16_raw>(reinterpret_cast<bf16_raw*>(y), nullptr, mean_out, rstd_out, 1, reinterpret_cast<const bf16_raw*>(x),
                                                        reinterpret_cast<const bf16_raw*>(residual), reinterpret_cast<const bf16_raw*>(gamma),
                                                        reinterpret_cast<const bf16_raw*>(beta), rows, cols, eps, cache_row);
}

// f16 twin of residual_layernorm_forward_bf16io: the same body with f16_raw storage.
extern "C" __global__ void residual_layernorm_forward_f16io(
    unsigned short* __restrict__ y,
    float* __restrict__ mean_out,
    float* __restrict__ rstd_out,
    const unsigned short* __restrict__ x,
    const unsigned short* __restrict__ residual,
    const unsigned short* __restrict__ gamma,
    const unsigned short* __restrict__ beta,
    int rows,
    int cols,
    float eps,
    int cache_row)
{
    residual_layernorm_forward_body<f16_raw, f16_raw>(reinterpret_cast<f16_raw*>(y), nullptr, mean_out, rstd_out, 1, reinterpret_cast<const f16_raw*>(x),
                                                      reinterpret_cast<const f16_raw*>(residual), reinterpret_cast<const f16_raw*>(gamma),
                                                      reinterpret_cast<const f16_raw*>(beta), rows, cols, eps, cache_row);
}

// ---- training forward: z and interleaved [mean, rstd] --------------------------------------
// Backend::residual_layernorm_stats: the forward's body (same three passes, thread mapping and
// bits for y, mean and rstd), which additionally stores z = x + residual (the residual stream the
// backward reads) and writes stats[row] = {mean, rstd} ([rows, 2], interleaved, the CPU backend's
// layout). Passes 2 and 3 read z back from the row cache or form it again from x and residual, as
// the forward does; never from z_out, so the statistics are those of the f32 sum in every plan
// even where z_out holds it rounded to bf16 (the bf16io variant: the backward then reads the
// rounded z with these statistics, an error of at most 2^-9 |z| rstd in x^, the size of the
// rounding PyTorch's bf16 sum makes before its statistics).

// y, z_out, x, residual: [rows, cols]; gamma, beta: [cols]; stats: [rows, 2]. residual may be null.
extern "C" __global__ void residual_layernorm_forward_train_f32(
    float* __restrict__ y,
    float* __restrict__ z_out,
    float* __restrict__ stats,
    const float* __restrict__ x,
    const float* __restrict__ residual,
    const float* __restrict__ gamma,
    const float* __restrict__ beta,
    int rows,
    int cols,
    float eps,
    int cache_row)
{
    residual_layernorm_forward_body<float, float>(y, z_out, stats, stats + 1, 2, x, residual, gamma, beta, rows, cols, eps, cache_row);
}

// bf16 activations (x, residual, y, z) and bf16 gamma and beta, as raw bits; stats stay f32.
extern "C" __global__ void residual_layernorm_forward_train_bf16io(
    unsigned short* __restrict__ y,
    unsigned short* __restrict__ z_out,
    float* __restrict__ stats,
    const unsigned short* __restrict__ x,
    const unsigned short* __restrict__ residual,
    const unsigned short* __restrict__ gamma,
    const unsigned short* __restrict__ beta,
    int rows,
    int cols,
    float eps,
    int cache_row)
{
    residual_layernorm_forward_body<bf16_raw, bf16_raw>(reinterpret_cast<bf16_raw*>(y), reinterpret_cast<bf16_raw*>(z_out), stats, stats + 1, 2,
                                                        reinterpret_cast<const bf16_raw*>(x), reinterpret_cast<const bf16_raw*>(residual),
                                                        reinterpret_cast<const bf16_raw*>(gamma), reinterpret_cast<const bf16_raw*>(beta), rows, cols, eps,
                                                        cache_row);
}

// f16 twin of residual_layernorm_forward_train_bf16io: the same body with f16_raw storage.
extern "C" __global__ void residual_layernorm_forward_train_f16io(
    unsigned short* __restrict__ y,
    unsigned short* __restrict__ z_out,
    float* __restrict__ stats,
    const unsigned short* __restrict__ x,
    const unsigned short* __restrict__ residual,
    const unsigned short* __restrict__ gamma,
    const unsigned short* __restrict__ beta,
    int rows,
    int cols,
    float eps,
    int cache_row)
{
    residual_layernorm_forward_body<f16_raw, f16_raw>(reinterpret_cast<f16_raw*>(y), reinterpret_cast<f16_raw*>(z_out), stats, stats + 1, 2,
                                                      reinterpret_cast<const f16_raw*>(x), reinterpret_cast<const f16_raw*>(residual),
                                                      reinterpret_cast<const f16_raw*>(gamma), reinterpret_cast<const f16_raw*>(beta), rows, cols, eps,
                                                      cache_row);
}

// ---- backward: input gradient ------------------------------------------------------------------
// Backend::layernorm_backward_stats (spec: cpu::reference::layernorm_backward_from_stats), from
// the forward's z and [mean, rstd], never recomputing the statistics:
//     x^ = (z - mean) * rstd,  gy = dy * gamma
//     dz = rstd * (gy - mean(gy) - x^ * mean(gy * x^))
// written (`=`), or added (`+=`, accumulate != 0) for a residual stream reached along two paths.
// Thread mapping: the forward's row teams (launcher: a warp per row, 4 rows per block, up to
// 1024 columns; a block per row above). Pass 1 forms gy and x^ per column and sums gy and
// gy * x^ (two fixed-order team reductions); pass 2 writes dz. With cache_row each thread keeps
// its gy and x^ in dynamic shared memory ([blockDim.y][2 * cols]; only the writer reads them
// back), else pass 2 recomputes them from dy and z (just read: cache hits).
// Numerics: f32 with fma, per-thread partial sums of a few dozen terms then a fixed tree, as in
// the forward; the two means carry a few 1e-7 relative to sum|gy|, so dz is within ~1e-6 of the
// f64 reference's scale (rstd * max|gy|). Bitwise reproducible.

// dz, dy, z: [rows, cols] of activation storage type A; stats: [rows, 2] = {mean, rstd} (f32);
// gamma: [cols] of parameter storage type P.
template <typename A, typename P>
__device__ __forceinline__ void layernorm_backward_body(
    A* __restrict__ dz,
    const A* __restrict__ dy,
    const A* __restrict__ z,
    const float* __restrict__ stats,
    const P* __restrict__ gamma,
    int rows,
    int cols,
    int accumulate,
    int cache_row)
{
    extern __shared__ float lnb_cache[];  // [blockDim.y][2 * cols] when cache_row != 0
    __shared__ float lnb_scratch[32];

    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < rows;
    const size_t offset = (size_t)(active ? row : 0) * (size_t)cols;
    const A* dyr = dy + offset;
    const A* zr = z + offset;
    float* gy_c = lnb_cache + (size_t)threadIdx.y * 2 * (size_t)cols;
    float* xh_c = gy_c + cols;
    const bool cached = cache_row != 0;
    const float mean = active ? stats[2 * (size_t)row] : 0.0f;
    const float rstd = active ? stats[2 * (size_t)row + 1] : 0.0f;

    // Both passes load TEAM_COL_BATCH columns a thread before using them (team_cols_batched).
    // (x̂, γ·dy) of column c from global memory.
    struct Terms {
        float xh, gy;
    };
    auto terms = [&](int c) { return Terms{(load_f32(zr + c) - mean) * rstd, load_f32(dyr + c) * load_f32(gamma + c)}; };
    float s_gy = 0.0f;
    float s_gyx = 0.0f;
    if (active) {
        team_cols_batched(cols, terms, [&](int c, const Terms& t) {
            if (cached) {
                gy_c[c] = t.gy;
                xh_c[c] = t.xh;
            }
            s_gy += t.gy;
            s_gyx = fmaf(t.gy, t.xh, s_gyx);
        });
    }
    const float mean_gy = team_sum(s_gy, lnb_scratch) / (float)cols;
    const float mean_gyx = team_sum(s_gyx, lnb_scratch) / (float)cols;

    if (active) {
        A* dzr = dz + offset;
        struct Final {
            Terms t;
            float prior;  // dz's value when accumulating
        };
        team_cols_batched(
            cols,
            [&](int c) {
                Final v;
                v.t = cached ? Terms{xh_c[c], gy_c[c]} : terms(c);
                v.prior = accumulate != 0 ? load_f32(dzr + c) : 0.0f;
                return v;
            },
            [&](int c, const Final& v) {
                float g = rstd * (v.t.gy - mean_gy - v.t.xh * mean_gyx);
                if (accumulate != 0) {
                    g += v.prior;
                }
                store_f32(dzr + c, g);
            });
    }
}

extern "C" __global__ __launch_bounds__(1024) void layernorm_backward_f32(
    float* __restrict__ dz,
    const float* __restrict__ dy,
    const float* __restrict__ z,
    const float* __restrict__ stats,
    const float* __restrict__ gamma,
    int rows,
    int cols,
    int accumulate,
    int cache_row)
{
    layernorm_backward_body<float, float>(dz, dy, z, stats, gamma, rows, cols, accumulate, cache_row);
}

// bf16 dz, dy and z and bf16 gamma (a frozen base), as raw bits; stats stay f32. With accumulate
// the old dz is widened, added in f32, and the sum rounded once.
extern "C" __global__ __launch_bounds__(1024) void layernorm_backward_bf16io(
    unsigned short* __restrict__ dz,
    const unsigned short* __restrict__ dy,
    const unsigned short* __restrict__ z,
    const float* __restrict__ stats,
    const unsigned short* __restrict__ gamma,
    int rows,
    int cols,
    int accumulate,
    int cache_row)
{
    layernorm_backward_body<bf16_raw, bf16_raw>(reinterpret_cast<bf16_raw*>(dz), reinterpret_cast<const bf16_raw*>(dy), reinterpret_cast<const bf16_raw*>(z), stats,
                                                reinterpret_cast<const bf16_raw*>(gamma), rows, cols, accumulate, cache_row);
}

// f16 twin of layernorm_backward_bf16io: the same body with f16_raw storage.
extern "C" __global__ __launch_bounds__(1024) void layernorm_backward_f16io(
    unsigned short* __restrict__ dz,
    const unsigned short* __restrict__ dy,
    const unsigned short* __restrict__ z,
    const float* __restrict__ stats,
    const unsigned short* __restrict__ gamma,
    int rows,
    int cols,
    int accumulate,
    int cache_row)
{
    layernorm_backward_body<f16_raw, f16_raw>(reinterpret_cast<f16_raw*>(dz), reinterpret_cast<const f16_raw*>(dy), reinterpret_cast<const f16_raw*>(z), stats,
                                              reinterpret_cast<const f16_raw*>(gamma), rows, cols, accumulate, cache_row);
}

// ---- backward: dgamma / dbeta (trainable LayerNorms only) ------------------------------------------
// dgamma[c] = sum_rows dy * x^,  dbeta[c] = sum_rows dy, reduced deterministically in two stages,
// no atomics: this kernel writes per-chunk column partials, partial[chunk][c], and
// column_sums_finalize_f32 (kernels/elementwise.cu) adds the chunks in index order into
// dgamma / dbeta (`=` or `+=`). Never launched for BERT's frozen LayerNorms.
// Thread mapping: block (32, 8) = 32 columns x 8 row lanes, grid (ceil(cols/32), chunks). Lane
// (tx, ty) sums rows chunk*rows_per_chunk + ty, +8, ... of column blockIdx.x*32 + tx (a warp
// reads 32 consecutive floats of a row: coalesced); the 8 row lanes are then added in order
// 0..7 through shared memory. Either partial pointer may be null (that sum is skipped).

// partial_dgamma, partial_dbeta: [chunks, cols] (f32); dy, z: [rows, cols] of activation
// storage type A; stats: [rows, 2] (f32).
template <typename A>
__device__ __forceinline__ void layernorm_param_grad_partial_body(
    float* __restrict__ partial_dgamma,
    float* __restrict__ partial_dbeta,
    const A* __restrict__ dy,
    const A* __restrict__ z,
    const float* __restrict__ stats,
    int rows,
    int cols,
    int rows_per_chunk)
{
    __shared__ float lnp_g[8][33];
    __shared__ float lnp_b[8][33];

    const int c = blockIdx.x * 32 + threadIdx.x;
    const int chunk = blockIdx.y;
    const int r0 = chunk * rows_per_chunk;
    const int r1 = rows - r0 < rows_per_chunk ? rows : r0 + rows_per_chunk;
    float acc_g = 0.0f;
    float acc_b = 0.0f;
    if (c < cols) {
        for (int r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
            const size_t i = (size_t)r * (size_t)cols + c;
            const float d = load_f32(dy + i);
            acc_b += d;
            if (partial_dgamma != nullptr) {
                const float xh = (load_f32(z + i) - stats[2 * (size_t)r]) * stats[2 * (size_t)r + 1];
                acc_g = fmaf(d, xh, acc_g);
            }
        }
    }
    lnp_g[threadIdx.y][threadIdx.x] = acc_g;
    lnp_b[threadIdx.y][threadIdx.x] = acc_b;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float g = 0.0f;
        float b = 0.0f;
        for (int k = 0; k < (int)blockDim.y; ++k) {
            g += lnp_g[k][threadIdx.x];
            b += lnp_b[k][threadIdx.x];
        }
        const size_t o = (size_t)chunk * (size_t)cols + c;
        if (partial_dgamma != nullptr) {
            partial_dgamma[o] = g;
        }
        if (partial_dbeta != nullptr) {
            partial_dbeta[o] = b;
        }
    }
}

extern "C" __global__ void layernorm_param_grad_partial_f32(
    float* __restrict__ partial_dgamma,
    float* __restrict__ partial_dbeta,
    const float* __restrict__ dy,
    const float* __restrict__ z,
    const float* __restrict__ stats,
    int rows,
    int cols,
    int rows_per_chunk)
{
    layernorm_param_grad_partial_body<float>(partial_dgamma, partial_dbeta, dy, z, stats, rows, cols, rows_per_chunk);
}

// bf16 dy and z, as raw bits; the partials (f32, finished into f32 dgamma/dbeta) and stats stay f32.
extern "C" __global__ void layernorm_param_grad_partial_bf16io(
    float* __restrict__ partial_dgamma,
    float* __restrict__ partial_dbeta,
    const unsigned short* __restrict__ dy,
    const unsigned short* __restrict__ z,
    const float* __restrict__ stats,
    int rows,
    int cols,
    int rows_per_chunk)
{
    layernorm_param_grad_partial_body<bf16_raw>(partial_dgamma, partial_dbeta, reinterpret_cast<const bf16_raw*>(dy), reinterpret_cast<const bf16_raw*>(z), stats,
                                                rows, cols, rows_per_chunk);
}

// f16 twin of layernorm_param_grad_partial_bf16io: the same body with f16_raw storage.
extern "C" __global__ void layernorm_param_grad_partial_f16io(
    float* __restrict__ partial_dgamma,
    float* __restrict__ partial_dbeta,
    const unsigned short* __restrict__ dy,
    const unsigned short* __restrict__ z,
    const float* __restrict__ stats,
    int rows,
    int cols,
    int rows_per_chunk)
{
    layernorm_param_grad_partial_body<f16_raw>(partial_dgamma, partial_dbeta, reinterpret_cast<const f16_raw*>(dy), reinterpret_cast<const f16_raw*>(z), stats,
                                               rows, cols, rows_per_chunk);
}
