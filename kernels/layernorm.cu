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
// for a just-read row). Loads are scalar: 4-wide vector loads would need cols % 4 == 0 and 16-byte
// aligned views, which the launcher does not require yet.

// ---- forward -------------------------------------------------------------------------------

// y, x, residual: [rows, cols]; gamma, beta: [cols] of storage type P (float or bf16_raw);
// mean, rstd: [rows]. residual may be null.
template <typename P>
__device__ __forceinline__ void residual_layernorm_forward_body(
    float* __restrict__ y,
    float* __restrict__ mean_out,
    float* __restrict__ rstd_out,
    const float* __restrict__ x,
    const float* __restrict__ residual,
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
    const float* xr = x + offset;
    const float* rr = residual != nullptr ? residual + offset : nullptr;
    float* zr = z_cache + (size_t)threadIdx.y * (size_t)cols;
    const bool cached = cache_row != 0;

    // Pass 1: z = x + residual (cached if asked), and its sum.
    float sum = 0.0f;
    if (active) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float z = xr[c];
            if (rr != nullptr) {
                z += rr[c];
            }
            if (cached) {
                zr[c] = z;
            }
            sum += z;
        }
    }
    const float mean = team_sum(sum, scratch) / (float)cols;

    // Pass 2: sum of squared deviations from the exact f32 mean.
    float sq = 0.0f;
    if (active) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float z;
            if (cached) {
                z = zr[c];
            } else {
                z = xr[c];
                if (rr != nullptr) {
                    z += rr[c];
                }
            }
            const float d = z - mean;
            sq = fmaf(d, d, sq);
        }
    }
    const float var = team_sum(sq, scratch) / (float)cols;
    const float rstd = 1.0f / sqrtf(var + eps);

    // Pass 3: normalise, scale, shift.
    if (active) {
        float* yr = y + offset;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float z;
            if (cached) {
                z = zr[c];
            } else {
                z = xr[c];
                if (rr != nullptr) {
                    z += rr[c];
                }
            }
            yr[c] = fmaf((z - mean) * rstd, load_f32(gamma + c), load_f32(beta + c));
        }
        if (threadIdx.x == 0) {
            mean_out[row] = mean;
            rstd_out[row] = rstd;
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
    residual_layernorm_forward_body<float>(y, mean_out, rstd_out, x, residual, gamma, beta, rows, cols, eps, cache_row);
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
    residual_layernorm_forward_body<bf16_raw>(y, mean_out, rstd_out, x, residual, reinterpret_cast<const bf16_raw*>(gamma),
                                              reinterpret_cast<const bf16_raw*>(beta), rows, cols, eps, cache_row);
}

// ---- training forward: z and interleaved [mean, rstd] --------------------------------------
// Backend::residual_layernorm_stats: the same three passes and thread mapping as the forward
// above, and additionally z = x + residual (f32, the residual stream the backward reads) and
// stats[row] = {mean, rstd} ([rows, 2], interleaved, the CPU backend's layout). Pass 1 writes z;
// passes 2 and 3 read each thread's own z back from the row cache or from z_out (no barrier: a
// thread only reads what it wrote), so x and residual are read once whatever the plan.

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
    extern __shared__ float ztr_cache[];  // [blockDim.y][cols] when cache_row != 0
    __shared__ float ztr_scratch[32];

    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < rows;
    const size_t offset = (size_t)(active ? row : 0) * (size_t)cols;
    float* zr = ztr_cache + (size_t)threadIdx.y * (size_t)cols;
    float* zo = z_out + offset;
    const float* zsrc = cache_row != 0 ? zr : zo;

    float sum = 0.0f;
    if (active) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float z = x[offset + c];
            if (residual != nullptr) {
                z += residual[offset + c];
            }
            zo[c] = z;
            if (cache_row != 0) {
                zr[c] = z;
            }
            sum += z;
        }
    }
    const float mean = team_sum(sum, ztr_scratch) / (float)cols;

    float sq = 0.0f;
    if (active) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float d = zsrc[c] - mean;
            sq = fmaf(d, d, sq);
        }
    }
    const float var = team_sum(sq, ztr_scratch) / (float)cols;
    const float rstd = 1.0f / sqrtf(var + eps);

    if (active) {
        float* yr = y + offset;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            yr[c] = fmaf((zsrc[c] - mean) * rstd, gamma[c], beta[c]);
        }
        if (threadIdx.x == 0) {
            stats[2 * (size_t)row] = mean;
            stats[2 * (size_t)row + 1] = rstd;
        }
    }
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

// dz, dy, z: [rows, cols]; stats: [rows, 2] = {mean, rstd}; gamma: [cols].
extern "C" __global__ void layernorm_backward_f32(
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
    extern __shared__ float lnb_cache[];  // [blockDim.y][2 * cols] when cache_row != 0
    __shared__ float lnb_scratch[32];

    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < rows;
    const size_t offset = (size_t)(active ? row : 0) * (size_t)cols;
    const float* dyr = dy + offset;
    const float* zr = z + offset;
    float* gy_c = lnb_cache + (size_t)threadIdx.y * 2 * (size_t)cols;
    float* xh_c = gy_c + cols;
    const bool cached = cache_row != 0;
    const float mean = active ? stats[2 * (size_t)row] : 0.0f;
    const float rstd = active ? stats[2 * (size_t)row + 1] : 0.0f;

    float s_gy = 0.0f;
    float s_gyx = 0.0f;
    if (active) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float xh = (zr[c] - mean) * rstd;
            const float gy = dyr[c] * gamma[c];
            if (cached) {
                gy_c[c] = gy;
                xh_c[c] = xh;
            }
            s_gy += gy;
            s_gyx = fmaf(gy, xh, s_gyx);
        }
    }
    const float mean_gy = team_sum(s_gy, lnb_scratch) / (float)cols;
    const float mean_gyx = team_sum(s_gyx, lnb_scratch) / (float)cols;

    if (active) {
        float* dzr = dz + offset;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float gy;
            float xh;
            if (cached) {
                gy = gy_c[c];
                xh = xh_c[c];
            } else {
                xh = (zr[c] - mean) * rstd;
                gy = dyr[c] * gamma[c];
            }
            float g = rstd * (gy - mean_gy - xh * mean_gyx);
            if (accumulate != 0) {
                g += dzr[c];
            }
            dzr[c] = g;
        }
    }
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

// partial_dgamma, partial_dbeta: [chunks, cols]; dy, z: [rows, cols]; stats: [rows, 2].
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
            const float d = dy[i];
            acc_b += d;
            if (partial_dgamma != nullptr) {
                const float xh = (z[i] - stats[2 * (size_t)r]) * stats[2 * (size_t)r + 1];
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
