// Adapter-location family: one AdapterHub bottleneck location (spec ADAPTERS.md §3.4, §4, §6) for
// all N Parallel branches in one launch. The spec is bert_adapters::cpu's `adapter_location`.
//
// Semantics, per output row (branch i = row / (B·T); its source row is row % (B·T) when the
// launch replicates a shared [B, T, H] input, else the row itself):
//     pre step  (first child's config)  v = h + r;  x = LN(v) if original_ln_before else h
//                                       ρ = h | x | v   (residual_before_ln True | False | post_add)
//     core      (branch i)              z = LN_before(x)                       (optional, eps own)
//                                       d = act(z·W_dᵀ + b_d)                  [m]
//                                       u = s ⊙ (d·W_uᵀ + b_u) · g             [H]
//                                       y = LN_after(u + ρ)  if adapter_residual_before_ln
//                                           LN_after(u) + ρ  otherwise         (LN_after optional)
//     post step (last child's config)   out = LN(y + r) if original_ln_after else y
// LN is the BERT LayerNorm of the location (γ, β, eps are launch arguments); the adapter's own
// LayerNorms carry their eps in the descriptor. s is the fixed value, the learned [1] or the
// channel [H] scaling, read at run time so a training step needs no new descriptors. g is the
// per-example gate mean(σ(x·w_gᵀ + b_g)) over the T rows of the example, computed by the
// separate `adapter_location_gate_f32` launch first (a cross-row reduction; only when a branch
// has a gate) and read from `gate[i·B + example]`.
// The pre/post-step flags are the location's (first child / last child, spec §6.4), stamped into
// every branch's descriptor by the launcher so a block needs only its own descriptor.
//
// Descriptors: one 128-byte `AdapterBranchDesc` per branch (device addresses of the weights,
// bottleneck size, activation and flag codes), built and validated once per setup by
// src/cuda/adapter.rs (`LocationDescriptors`), which mirrors this struct field for field. The
// kernel takes them as `const unsigned long long*` (the launch runtime packs only scalar pointer
// types) and reinterprets them.
//
// Thread mapping: a "row team" of blockDim.x threads (a multiple of 32) owns one output row; a
// block holds blockDim.y teams. The launcher picks one warp per row, up to 8 rows per block, when
// H <= 1024 (all reductions are shuffles, no block barrier anywhere), else one block per row of
// 128..1024 threads (then team_sum and team_sync use __syncthreads). Teams of one block may
// belong to different branches: nothing is shared between teams. A team whose row is past the
// end leaves at once; that is safe because block barriers only occur with one team per block,
// whose row always exists.
//   * element-wise steps and LayerNorms: thread t owns columns t, t + blockDim.x, ... (coalesced);
//   * down projection: warp w of the team takes outputs in chunks of 32 (chunks w, w + warps,
//     ...); lane l accumulates columns l, l + 32, ... of all 32 outputs at once (coalesced rows
//     of W_d), and a transposing butterfly (31 shuffles for 32 sums instead of 5 per sum) leaves
//     output j0 + l in lane l. A chunk of at most DOWN_TRANSPOSE_MIN outputs (small bottlenecks)
//     uses one plain warp_sum per output instead;
//   * up projection: thread t computes its own columns c, each a dot of the bottleneck vector
//     (shared memory, broadcast) with row c of W_u.
//
// Storage: h, r, out, the gate and every adapter weight are f32. The location's BERT LayerNorm γ, β
// are f32 (the _f32 kernels) or bf16 (adapter_location_forward_bf16 / adapter_location_gate_bf16:
// a frozen base loaded in bf16), widened exactly on load; both variants are extern "C" wrappers
// over the same templated bodies, so they compute the same f32 arithmetic on the same values.
//
// Numerics: f32 accumulation with fmaf. LayerNorms are exact two-pass (mean, then
// the sum of squared deviations), 1/sqrtf of var + eps, as in kernels/layernorm.cu. Dot products
// sum H/32 (down) or m (up) terms per thread before a fixed tree, so their rounding error is a
// few 1e-7 of the sum of |terms|; every reduction has a fixed order, so the output is bitwise
// reproducible run to run and across the executor's schedules. erff/tanhf/expf are CUDA's
// (<= 2 ulp); the CPU reference evaluates in f64 and rounds once, hence tolerances, not bits.
//
// Memory: dynamic shared memory holds, per team, the row (H floats: x, then z, then u, then y,
// each overwritten in place by the thread that owns the column) and the bottleneck vector
// (`bottleneck_stride` floats, the largest bottleneck of the launch). h and r are read twice
// (pre step; ρ and the post step read them again instead of keeping copies: an L1/L2 hit, and
// half the shared memory). Weights are read from global memory / L2 by every team (no staging:
// the teams of one block may need different branches' weights). Loads and stores of h, r, out and
// the BERT LayerNorm go through load_f32/store_f32, templated on their storage types (T for h, r,
// out; P for γ, β), so a storage type is added by instantiating the templates, as bf16 γ, β are.

// ---- descriptor -----------------------------------------------------------------------------

#define ADAPTER_ACT_RELU 0
#define ADAPTER_ACT_GELU 1
#define ADAPTER_ACT_GELU_NEW 2
#define ADAPTER_ACT_SWISH 3
#define ADAPTER_ACT_TANH 4
#define ADAPTER_ACT_SIGMOID 5

#define ADAPTER_SCALING_FIXED 0
#define ADAPTER_SCALING_LEARNED 1
#define ADAPTER_SCALING_CHANNEL 2

#define ADAPTER_RESIDUAL_H 0  // residual_before_ln = True
#define ADAPTER_RESIDUAL_X 1  // residual_before_ln = False
#define ADAPTER_RESIDUAL_V 2  // residual_before_ln = "post_add"

// A chunk of more outputs than this uses the transposing butterfly (31 shuffles) rather than
// one 5-shuffle warp_sum per output.
#define DOWN_TRANSPOSE_MIN 6

// Mirrors `BranchDescriptor` in src/cuda/adapter.rs. Addresses are of f32 arrays; 0 = absent.
struct AdapterBranchDesc {
    unsigned long long down_w;           // [m, H]
    unsigned long long down_b;           // [m]
    unsigned long long up_w;             // [H, m]
    unsigned long long up_b;             // [H]
    unsigned long long ln_before_gamma;  // [H]
    unsigned long long ln_before_beta;   // [H]
    unsigned long long ln_after_gamma;   // [H]
    unsigned long long ln_after_beta;    // [H]
    unsigned long long scaling;          // [1] learned, [H] channel, 0 fixed
    unsigned long long gate_w;           // [H] (the [1, H] gate weight)
    unsigned long long gate_b;           // [1]
    int bottleneck;                      // m
    int activation;                      // ADAPTER_ACT_*
    int scaling_kind;                    // ADAPTER_SCALING_*
    float scaling_value;                 // the fixed scaling
    float ln_before_eps;
    float ln_after_eps;
    int residual_before_ln;              // ADAPTER_RESIDUAL_* (the location's pre step)
    int original_ln_before;              // the location's pre step
    int original_ln_after;               // the location's post step
    int adapter_residual_before_ln;
};
static_assert(sizeof(AdapterBranchDesc) == 128, "AdapterBranchDesc must match BranchDescriptor");

__device__ __forceinline__ const float* desc_ptr(unsigned long long address) {
    return reinterpret_cast<const float*>(address);
}

// ---- storage types --------------------------------------------------------------------------

// Activations and BERT LayerNorm parameters go through these (accumulation stays f32): f32, and
// bf16 for the LayerNorm of a frozen base loaded in bf16 (widened exactly, common.cuh).
__device__ __forceinline__ float load_f32(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ void store_f32(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ float load_f32(const bf16_raw* p, size_t i) { return load_f32(p + i); }

// ---- helpers ------------------------------------------------------------------------------------

__device__ __forceinline__ float adapter_activation(int act, float x) {
    switch (act) {
    case ADAPTER_ACT_RELU:
        return fmaxf(x, 0.0f);
    case ADAPTER_ACT_GELU:
        return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case ADAPTER_ACT_GELU_NEW:
        return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
    case ADAPTER_ACT_SWISH:
        return x / (1.0f + expf(-x));
    case ADAPTER_ACT_TANH:
        return tanhf(x);
    default:  // ADAPTER_ACT_SIGMOID (the launcher validates the code)
        return 1.0f / (1.0f + expf(-x));
    }
}

// A barrier for the row team: a warp-level one when the team is one warp (teams of a block are
// independent), a block barrier when the team is the block.
__device__ __forceinline__ void team_sync() {
    if (blockDim.x == 32) {
        __syncwarp(FULL_WARP_MASK);
    } else {
        __syncthreads();
    }
}

// One butterfly stage of warp_transpose_sum: lanes with bit W set keep the upper half of their
// live entries and send the lower half to lane ^ W, which does the opposite.
template <int W>
__device__ __forceinline__ void transpose_stage(float (&v)[32], unsigned lane) {
    const bool upper = (lane & W) != 0;
#pragma unroll
    for (int i = 0; i < W; ++i) {
        const float send = upper ? v[i] : v[i + W];
        const float keep = upper ? v[i + W] : v[i];
        v[i] = keep + __shfl_xor_sync(FULL_WARP_MASK, send, W);
    }
}

// Lane l returns the sum over the warp's 32 lanes of v[l]: 32 reductions in 31 shuffles.
__device__ __forceinline__ float warp_transpose_sum(float (&v)[32]) {
    const unsigned lane = threadIdx.x & 31u;
    transpose_stage<16>(v, lane);
    transpose_stage<8>(v, lane);
    transpose_stage<4>(v, lane);
    transpose_stage<2>(v, lane);
    transpose_stage<1>(v, lane);
    return v[0];
}

// y[c] = (x[c] - mean)·rstd·γ[c] + β[c] over the thread's own columns of a team's row, with the
// statistics from the whole row. x is the row in shared memory (each thread reads only what it
// wrote); y may be x. Every thread of the team must call it. Returns nothing; `mean_out` and
// `rstd_out` get the statistics (the pre step keeps them to recompute x later).
template <typename T>
__device__ __forceinline__ void team_layernorm(const float* x, float* y, const T* gamma, const T* beta, int cols, float eps,
                                               float* scratch, float& mean_out, float& rstd_out) {
    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        sum += x[c];
    }
    const float mean = team_sum(sum, scratch) / (float)cols;
    float sq = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = x[c] - mean;
        sq = fmaf(d, d, sq);
    }
    const float rstd = 1.0f / sqrtf(team_sum(sq, scratch) / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        y[c] = fmaf((x[c] - mean) * rstd, load_f32(gamma, c), load_f32(beta, c));
    }
    mean_out = mean;
    rstd_out = rstd;
}

// d[j] = act(z·W_d[j]ᵀ + b_d[j]) for j < m, into ds; see the header for the mapping.
__device__ __forceinline__ void down_projection(const float* z, float* ds, const AdapterBranchDesc& d, int cols) {
    const float* wd = desc_ptr(d.down_w);
    const float* bd = desc_ptr(d.down_b);
    const int m = d.bottleneck;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    for (int j0 = warp * 32; j0 < m; j0 += warps * 32) {
        const int n = m - j0 < 32 ? m - j0 : 32;  // warp-uniform
        const float* w = wd + (size_t)j0 * (size_t)cols;
        if (n > DOWN_TRANSPOSE_MIN) {
            float p[32];
#pragma unroll
            for (int i = 0; i < 32; ++i) {
                p[i] = 0.0f;
            }
            for (int k = lane; k < cols; k += 32) {
                const float zk = z[k];
#pragma unroll
                for (int i = 0; i < 32; ++i) {
                    if (i < n) {
                        p[i] = fmaf(zk, w[(size_t)i * (size_t)cols + k], p[i]);
                    }
                }
            }
            const float total = warp_transpose_sum(p);
            if (lane < n) {
                ds[j0 + lane] = adapter_activation(d.activation, total + bd[j0 + lane]);
            }
        } else {
            for (int i = 0; i < n; ++i) {
                const float* wi = w + (size_t)i * (size_t)cols;
                float acc = 0.0f;
                for (int k = lane; k < cols; k += 32) {
                    acc = fmaf(z[k], wi[k], acc);
                }
                acc = warp_sum(acc);
                if (lane == 0) {
                    ds[j0 + i] = adapter_activation(d.activation, acc + bd[j0 + i]);
                }
            }
        }
    }
}

// The pre step's adapter input x at column c, recomputed from global h and r (with the pre
// step's statistics when the original LayerNorm comes first).
template <typename T, typename P>
__device__ __forceinline__ float pre_step_x(const T* hr, const T* rr, const P* ln_gamma, const P* ln_beta, int c, bool ln_first,
                                            float mean, float rstd) {
    if (!ln_first) {
        return load_f32(hr, c);
    }
    const float v = load_f32(hr, c) + load_f32(rr, c);
    return fmaf((v - mean) * rstd, load_f32(ln_gamma, c), load_f32(ln_beta, c));
}

// ---- forward ---------------------------------------------------------------------------------

// T: the storage of h, r and out; P: of the BERT LayerNorm's gamma and beta.
template <typename T, typename P>
__device__ __forceinline__ void location_forward_row(T* __restrict__ out, const float* __restrict__ gate, const T* __restrict__ h,
                                                     const T* __restrict__ r, const P* __restrict__ ln_gamma,
                                                     const P* __restrict__ ln_beta, const AdapterBranchDesc* __restrict__ descs,
                                                     int batch, int seq_len, int cols, int branches, int replicate, float ln_eps,
                                                     int bottleneck_stride) {
    extern __shared__ float adapter_smem[];  // [blockDim.y][cols] rows, then [blockDim.y][stride]
    __shared__ float scratch[32];            // team_sum partials (block-per-row mapping only)

    const int per_branch = batch * seq_len;  // rows of one branch (fits: the launcher checks N·B·T)
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= per_branch * branches) {
        return;  // the whole team; no block barrier exists with more than one team per block
    }
    const int branch = row / per_branch;
    const int local = row - branch * per_branch;
    const size_t src = (size_t)(replicate ? local : row) * (size_t)cols;
    const size_t dst = (size_t)row * (size_t)cols;
    const AdapterBranchDesc& d = descs[branch];
    const T* hr = h + src;
    const T* rr = r + src;
    float* xs = adapter_smem + (size_t)threadIdx.y * (size_t)cols;
    float* ds = adapter_smem + (size_t)blockDim.y * (size_t)cols + (size_t)threadIdx.y * (size_t)bottleneck_stride;
    const bool ln_first = d.original_ln_before != 0;

    // Pre step: x into the row buffer.
    float pre_mean = 0.0f, pre_rstd = 0.0f, unused_mean, unused_rstd;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        xs[c] = ln_first ? load_f32(hr, c) + load_f32(rr, c) : load_f32(hr, c);
    }
    if (ln_first) {
        team_layernorm(xs, xs, ln_gamma, ln_beta, cols, ln_eps, scratch, pre_mean, pre_rstd);
    }
    // The adapter's LayerNorm before the down projection, in place: x is recomputed for ρ.
    if (d.ln_before_gamma != 0) {
        team_layernorm(xs, xs, desc_ptr(d.ln_before_gamma), desc_ptr(d.ln_before_beta), cols, d.ln_before_eps, scratch, unused_mean,
                       unused_rstd);
    }
    team_sync();  // the down projection reads every column of the row

    down_projection(xs, ds, d, cols);
    team_sync();  // ds complete; and no warp still reads xs before it is overwritten with u

    // Up projection, scaling and gate: u into the row buffer.
    {
        const int m = d.bottleneck;
        const float* wu = desc_ptr(d.up_w);
        const float* bu = desc_ptr(d.up_b);
        const float* sp = desc_ptr(d.scaling);
        const float s_uniform = d.scaling_kind == ADAPTER_SCALING_LEARNED ? sp[0] : d.scaling_value;
        const float g = d.gate_w != 0 ? gate[branch * batch + local / seq_len] : 1.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float* w = wu + (size_t)c * (size_t)m;
            float acc = 0.0f;
            for (int j = 0; j < m; ++j) {
                acc = fmaf(ds[j], w[j], acc);
            }
            const float s = d.scaling_kind == ADAPTER_SCALING_CHANNEL ? sp[c] : s_uniform;
            float u = (acc + bu[c]) * s;
            if (d.gate_w != 0) {
                u *= g;
            }
            xs[c] = u;
        }
    }

    // Adapter residual and LayerNorm after: y into the row buffer.
    const bool ln_after = d.ln_after_gamma != 0;
    const bool residual_first = d.adapter_residual_before_ln != 0;
    if (ln_after && !residual_first) {
        team_layernorm(xs, xs, desc_ptr(d.ln_after_gamma), desc_ptr(d.ln_after_beta), cols, d.ln_after_eps, scratch, unused_mean,
                       unused_rstd);
    }
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float rho;
        if (d.residual_before_ln == ADAPTER_RESIDUAL_H) {
            rho = load_f32(hr, c);
        } else if (d.residual_before_ln == ADAPTER_RESIDUAL_X) {
            rho = pre_step_x(hr, rr, ln_gamma, ln_beta, c, ln_first, pre_mean, pre_rstd);
        } else {
            rho = load_f32(hr, c) + load_f32(rr, c);
        }
        xs[c] += rho;
    }
    if (ln_after && residual_first) {
        team_layernorm(xs, xs, desc_ptr(d.ln_after_gamma), desc_ptr(d.ln_after_beta), cols, d.ln_after_eps, scratch, unused_mean,
                       unused_rstd);
    }

    // Post step: out = LN(y + r) or y.
    T* o = out + dst;
    if (d.original_ln_after != 0) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            xs[c] += load_f32(rr, c);
        }
        float mean, rstd;
        team_layernorm(xs, xs, ln_gamma, ln_beta, cols, ln_eps, scratch, mean, rstd);
    }
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        store_f32(o, c, xs[c]);
    }
}

// out: [N·B·T, H]; h, r: [B·T, H] when replicate, else [N·B·T, H]; ln_gamma, ln_beta: [H];
// descs: N descriptors; gate: [N·B] from adapter_location_gate_f32, or null when no branch gates.
extern "C" __global__ void adapter_location_forward_f32(
    float* __restrict__ out,
    const float* __restrict__ gate,
    const float* __restrict__ h,
    const float* __restrict__ r,
    const float* __restrict__ ln_gamma,
    const float* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int branches,
    int replicate,
    float ln_eps,
    int bottleneck_stride)
{
    location_forward_row<float, float>(out, gate, h, r, ln_gamma, ln_beta, reinterpret_cast<const AdapterBranchDesc*>(descs), batch,
                                       seq_len, hidden, branches, replicate, ln_eps, bottleneck_stride);
}

// As adapter_location_forward_f32 with the BERT LayerNorm's gamma and beta in bf16 (raw bits: a
// frozen base loaded in bf16); h, r, out and every adapter weight stay f32.
extern "C" __global__ void adapter_location_forward_bf16(
    float* __restrict__ out,
    const float* __restrict__ gate,
    const float* __restrict__ h,
    const float* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int branches,
    int replicate,
    float ln_eps,
    int bottleneck_stride)
{
    location_forward_row<float, bf16_raw>(out, gate, h, r, reinterpret_cast<const bf16_raw*>(ln_gamma),
                                          reinterpret_cast<const bf16_raw*>(ln_beta), reinterpret_cast<const AdapterBranchDesc*>(descs),
                                          batch, seq_len, hidden, branches, replicate, ln_eps, bottleneck_stride);
}

// ---- gate ----------------------------------------------------------------------------------------

// gate[i·B + e] = mean over the T rows of example e of σ(x·w_g + b_g), with x the pre step's
// adapter input (spec §3.4: the gate reads x, not LN_before(x); padding rows count). One block
// per (branch, example); a warp per row, blockDim.y rows at a time; the per-warp partial sums are
// added in warp order, so the mean is reproducible. Branches without a gate get 1.
template <typename T, typename P>
__device__ __forceinline__ void location_gate_block(float* __restrict__ gate, const T* __restrict__ h, const T* __restrict__ r,
                                                    const P* __restrict__ ln_gamma, const P* __restrict__ ln_beta,
                                                    const AdapterBranchDesc* __restrict__ descs, int batch, int seq_len, int cols,
                                                    int replicate, float ln_eps) {
    __shared__ float partial[32];
    const int slot = blockIdx.x;  // i·B + e
    const int branch = slot / batch;
    const int example = slot - branch * batch;
    const AdapterBranchDesc& d = descs[branch];
    if (d.gate_w == 0) {
        if (threadIdx.x == 0 && threadIdx.y == 0) {
            gate[slot] = 1.0f;
        }
        return;  // the whole block: no barrier is reached
    }
    const bool ln_first = d.original_ln_before != 0;
    const float* wg = desc_ptr(d.gate_w);
    const float bg = desc_ptr(d.gate_b)[0];
    float acc = 0.0f;  // this warp's sum of sigmoids, the same in every lane
    for (int t = threadIdx.y; t < seq_len; t += blockDim.y) {
        const size_t src = ((size_t)(replicate ? example : slot) * (size_t)seq_len + (size_t)t) * (size_t)cols;
        const T* hr = h + src;
        const T* rr = r + src;
        float mean = 0.0f, rstd = 0.0f;
        if (ln_first) {
            float sum = 0.0f;
            for (int c = threadIdx.x; c < cols; c += 32) {
                sum += load_f32(hr, c) + load_f32(rr, c);
            }
            mean = warp_sum(sum) / (float)cols;
            float sq = 0.0f;
            for (int c = threadIdx.x; c < cols; c += 32) {
                const float dv = (load_f32(hr, c) + load_f32(rr, c)) - mean;
                sq = fmaf(dv, dv, sq);
            }
            rstd = 1.0f / sqrtf(warp_sum(sq) / (float)cols + ln_eps);
        }
        float dot = 0.0f;
        for (int c = threadIdx.x; c < cols; c += 32) {
            dot = fmaf(pre_step_x(hr, rr, ln_gamma, ln_beta, c, ln_first, mean, rstd), wg[c], dot);
        }
        const float logit = warp_sum(dot) + bg;
        acc += 1.0f / (1.0f + expf(-logit));
    }
    if (threadIdx.x == 0) {
        partial[threadIdx.y] = acc;
    }
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        float total = 0.0f;
        for (int y = 0; y < (int)blockDim.y; ++y) {
            total += partial[y];
        }
        gate[slot] = total / (float)seq_len;
    }
}

// gate: [N·B]; the other operands as for adapter_location_forward_f32. Grid N·B, block (32, <=32).
extern "C" __global__ void adapter_location_gate_f32(
    float* __restrict__ gate,
    const float* __restrict__ h,
    const float* __restrict__ r,
    const float* __restrict__ ln_gamma,
    const float* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int replicate,
    float ln_eps)
{
    location_gate_block<float, float>(gate, h, r, ln_gamma, ln_beta, reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len,
                                      hidden, replicate, ln_eps);
}

// The gate with the BERT LayerNorm's gamma and beta in bf16, as adapter_location_forward_bf16.
extern "C" __global__ void adapter_location_gate_bf16(
    float* __restrict__ gate,
    const float* __restrict__ h,
    const float* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int replicate,
    float ln_eps)
{
    location_gate_block<float, bf16_raw>(gate, h, r, reinterpret_cast<const bf16_raw*>(ln_gamma), reinterpret_cast<const bf16_raw*>(ln_beta),
                                         reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden, replicate, ln_eps);
}
