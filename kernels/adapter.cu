// Adapter-location family: one AdapterHub bottleneck location (spec ADAPTERS.md §3.4, §4, §6) for
// all N Parallel branches in one launch. The spec is bert_adapters::cpu's `adapter_location`.
//
// Semantics, per output row (branch i = row / (B·T); its source row is row % (B·T) when the
// launch replicates a shared [B, T, H] input, else the row itself):
//     pre step  (first child's config)  v = h + r;  x = LN(v) if original_ln_before else h
//                                       ρ = h | x | v   (residual_before_ln True | False | post_add)
//     core      (branch i)              z = LN_before(x)                       (optional, eps own)
//                                       d = act(z·W_dᵀ + b_d)                  [m]
//                                       u = dropout(s ⊙ (d·W_uᵀ + b_u)) · g    [H]
//                                       y = LN_after(u + ρ)  if adapter_residual_before_ln
//                                           LN_after(u) + ρ  otherwise         (LN_after optional)
//     post step (last child's config)   out = LN(y + r) if original_ln_after else y
// LN is the BERT LayerNorm of the location (γ, β, eps are launch arguments); the adapter's own
// LayerNorms carry their eps in the descriptor. s is the fixed value, the learned [1] or the
// channel [H] scaling, read at run time so a training step needs no new descriptors. g is the
// per-example gate mean(σ(x·w_gᵀ + b_g)) over the T rows of the example, computed by the
// separate `adapter_location_gate_f32` launch first (a cross-row reduction; only when a branch
// has a gate) and read from `gate[i·B + example]`. dropout is the branch's own (training with
// `dropout > 0`; spec §3.4, after the scaling, before the gate and the residual): the CPU's
// `apply_dropout` of the branch's [B, T, H] block, element (local row)·H + c drawing word
// (index % 4) of Philox block index / 4 of the branch's stream (descriptor: stream, threshold,
// scale; the seed from the model's device buffer when given, as every dropout kernel does, else
// the launch arguments), so the mask is the CPU's bit for bit. Kept: u·scale; dropped: 0.
// The pre/post-step flags are the location's (first child / last child, spec §6.4), stamped into
// every branch's descriptor by the launcher so a block needs only its own descriptor.
//
// Descriptors: one 152-byte `AdapterBranchDesc` per branch (device addresses of the weights,
// bottleneck size, activation and flag codes, the dropout's stream, threshold, scale and offset), built
// and validated once per setup by src/cuda/adapter.rs (`LocationDescriptors`), which mirrors
// this struct field for field. The kernel takes them as `const unsigned long long*` (the launch
// runtime packs only scalar pointer types) and reinterprets them.
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
// The _bf16io variants (adapter_location_forward_bf16io / adapter_location_gate_bf16io) store the
// activations h, r and out in bf16 as well, with the BERT LayerNorm γ, β in bf16; every adapter
// weight (projections, biases, the adapter's LayerNorms, scalings, gate) stays f32 (adapters train
// with f32 master weights), and so do the gate means. Again the same templated bodies (T = P =
// bf16_raw): h and r widen exactly on load, all arithmetic and the row buffer in shared memory
// stay f32, and out is rounded once on store (to nearest even), so the output is the f32 kernel's
// output on the same (bf16) values, rounded to bf16. The backward stays f32 (f32 h, r, d_out).
// IEEE f16 storage has the same variants under the same rule, T and/or P = f16_raw: every _bf16 /
// _bf16io kernel of this file has an _f16 / _f16io twin (the split backward's too), so f16 runs
// the same f32 arithmetic on the same values and rounds out once to f16 (±65504 range: values
// beyond it are the caller's to avoid; an overflowing out stores ±inf).
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
// out; P for γ, β), so a storage type is added by instantiating the templates, as bf16 γ, β and
// the _bf16io variants' bf16 h, r, out are.
//
// Backward (appended at the end of the file, `adapter_location_backward_f32`): the same row-team
// mapping, one launch for every branch of a location, recomputing the forward per row (nothing
// is saved by the forward) and walking it back; it writes dh/dr and, for trainable branches, a
// per-row pack from which the launcher reduces the parameter gradients with GEMMs;
// `adapter_location_backward_gate_f32` is the gate launch restricted to the branches it needs.
// See the comment above that kernel.
//
// Split forward (`adapter_split_pre_*`, `adapter_split_post_*`, `adapter_split_bias_act_f32`;
// section "split forward" below): the same location in a pre kernel, the two bottleneck products
// per branch on GEMMs (cuBLASLt), and a post kernel, reusing this file's pre-step, up-epilogue and
// post-step device functions; the launcher picks the path (cuda::adapter::LocationPath). In the
// 16-bit pipelines the split forward can instead run as two tensor-core kernels
// (`adapter_split_pre_down_*`, `adapter_split_up_post_*`; cuda::adapter::SplitForward), whose
// bottleneck products are mma.sync over tiles of 32 rows kept in shared memory.

// Threads per block of the forward and gate kernels: they need about 100 registers a thread
// (ptxas, sm_80), so 1024 threads would not fit the 64K-register file; the launcher's plans stay
// within this (cuda::adapter::MAX_FORWARD_THREADS). The "1" (one block per SM at least) keeps
// ptxas from halving the registers to fit two such blocks, which spilled on sm_90.
#define ADAPTER_FWD_MAX_THREADS 512

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
    unsigned long long dropout_stream;   // the Philox stream of the branch's own dropout
    unsigned dropout_threshold;          // round(p·2³²): a word below it drops; 0 = no dropout
    float dropout_scale;                 // f32(1/(1 − p))
    unsigned long long dropout_offset;   // stream index of the block's element 0 (DropoutSpec::offset)
};
static_assert(sizeof(AdapterBranchDesc) == 152, "AdapterBranchDesc must match BranchDescriptor");

__device__ __forceinline__ const float* desc_ptr(unsigned long long address) {
    return reinterpret_cast<const float*>(address);
}

// ---- storage types --------------------------------------------------------------------------

// Activations and BERT LayerNorm parameters go through these (accumulation stays f32): f32, and
// bf16 / f16 for the LayerNorm of a frozen base loaded in bf16 / f16 and for the _bf16io / _f16io
// variants' h, r and out (loads widen exactly, stores round to nearest even; common.cuh).
__device__ __forceinline__ float load_f32(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ void store_f32(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ float load_f32(const bf16_raw* p, size_t i) { return load_f32(p + i); }
__device__ __forceinline__ void store_f32(bf16_raw* p, size_t i, float v) { store_f32(p + i, v); }
__device__ __forceinline__ float load_f32(const f16_raw* p, size_t i) { return load_f32(p + i); }
__device__ __forceinline__ void store_f32(f16_raw* p, size_t i, float v) { store_f32(p + i, v); }

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

// Whether element `index` of the branch's [B, T, H] block is kept (d.dropout_threshold != 0): it
// draws element index + d.dropout_offset of the branch's stream (a data-parallel shard's block
// holds rows r0.. of the global batch; the offset, r0·T·H, may start mid Philox block, which
// philox_keep_factor handles per index). The forward's masks go through here; the fused backward
// keeps the stream in AdapterBwdRow and adds the same offset to its drop_row.
__device__ __forceinline__ bool adapter_dropout_keep(const AdapterBranchDesc& d, PhiloxKey key, unsigned long long index) {
    return philox_keep_factor(key, d.dropout_stream, index + d.dropout_offset, d.dropout_threshold, 1.0f) != 0.0f;
}

// The branch's own dropout of element `index` of its [B, T, H] block (d.dropout_threshold != 0):
// v·scale when kept, 0 when dropped. A select, not a product with a 0/scale factor, so a dropped
// inf or NaN gives 0, as on the CPU (src/train/dropout.rs).
__device__ __forceinline__ float adapter_dropout(float v, const AdapterBranchDesc& d, PhiloxKey key, unsigned long long index) {
    return adapter_dropout_keep(d, key, index) ? v * d.dropout_scale : 0.0f;
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

// ---- row staging (the split path's row kernels) ----
//
// A row team that loops over its columns one load at a time waits one memory latency per column
// it owns (24 round trips for H = 768 and a warp: ptxas issues the loads of such a loop one at a
// time, unrolled or not, since each is followed by its use), in every pass over the row. The
// split kernels instead copy each global row they read into shared memory first, with wide loads
// issued STAGE_LOADS_IN_FLIGHT at a time before any store, then run their passes over shared
// memory: one trip to memory a row instead of one a column.

// Loads a thread issues before their stores when staging. The forward's pre and post kernels and
// the backward pre kernel (through split_team_rows) take SPLIT_TEAM_LOADS_IN_FLIGHT: with 8 they
// need 70-80 registers, three 8-warp blocks an SM, and with 4 48-56, four (their 48 KB of staged
// rows a block allow four either way), still 64 KB an SM in flight. The backward post and input
// kernels, held to fewer blocks by their shared memory, keep 8. An H100 ran the pre kernels slower
// staged at 8 (38.8 µs a bf16 launch) than unstaged before (32.5).
#define STAGE_LOADS_IN_FLIGHT 8
#define SPLIT_TEAM_LOADS_IN_FLIGHT 4

// Bytes of a staged region of `count` elements of `size` bytes: rounded up to 16, so the regions
// of a team laid end to end all start 16-byte aligned (the launcher's split_*_team_bytes).
__device__ __forceinline__ int stage_region_bytes(int count, int size) {
    return (count * size + 15) / 16 * 16;
}

// dst[i] = src[i] for i < n, the team's threads striding over i, IN_FLIGHT loads a thread issued
// before their stores (team_cols_batched).
template <int IN_FLIGHT, typename U>
__device__ __forceinline__ void team_copy(U* dst, const U* src, int n) {
    team_cols_batched<IN_FLIGHT>(n, [&](int i) { return src[i]; }, [&](int i, const U& v) { dst[i] = v; });
}

// Copies a global row of `count` elements into the team's shared buffer `dst` (a
// stage_region_bytes region): 16 bytes a load when both addresses and the length allow it, else one
// element a load. The caller's team_sync() must come before any thread reads the copy (a column
// is not staged by the thread that owns it).
template <int IN_FLIGHT = STAGE_LOADS_IN_FLIGHT, typename T>
__device__ __forceinline__ void team_stage_row(T* dst, const T* src, int count) {
    const unsigned long long bytes = (unsigned long long)count * sizeof(T);
    if ((((unsigned long long)(const void*)src | (unsigned long long)(void*)dst | bytes) & 15ull) == 0) {
        team_copy<IN_FLIGHT>(reinterpret_cast<Unit4<unsigned>*>(dst), reinterpret_cast<const Unit4<unsigned>*>(src), (int)(bytes / 16));
    } else {
        team_copy<IN_FLIGHT>(dst, src, count);
    }
}

// Stages the team's h and r rows into the two T regions that start at `at` (each
// stage_region_bytes(cols, sizeof(T)), 16-byte aligned) and points hr and rr at the copies, for
// every split kernel that stages them; returns the first byte past the two regions. The caller's
// team_sync() must come before any thread reads the copies.
template <int IN_FLIGHT = STAGE_LOADS_IN_FLIGHT, typename T>
__device__ __forceinline__ char* team_stage_h_r(char* at, int cols, const T*& hr, const T*& rr) {
    const int t_bytes = stage_region_bytes(cols, sizeof(T));
    T* h_s = reinterpret_cast<T*>(at);
    T* r_s = reinterpret_cast<T*>(at + t_bytes);
    team_stage_row<IN_FLIGHT>(h_s, hr, cols);
    team_stage_row<IN_FLIGHT>(r_s, rr, cols);
    hr = h_s;
    rr = r_s;
    return at + 2 * t_bytes;
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

// The row x as a column function, for team_row_stats and team_ln_backward_terms.
__device__ __forceinline__ auto row_at(const float* x) {
    return [x](int c) -> float { return x[c]; };
}

// mean and rstd of a team's row whose column c is x(c) (each thread evaluates only the columns
// it owns): two passes, the sum and then the squared deviations, as every LayerNorm of this file
// (forward and backward) computes them. Every thread of the team must call it.
template <typename F>
__device__ __forceinline__ void team_row_stats(F x, int cols, float eps, float* scratch, float& mean_out, float& rstd_out) {
    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        sum += x(c);
    }
    const float mean = team_sum(sum, scratch) / (float)cols;
    float sq = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = x(c) - mean;
        sq = fmaf(d, d, sq);
    }
    mean_out = mean;
    rstd_out = 1.0f / sqrtf(team_sum(sq, scratch) / (float)cols + eps);
}

// The row terms of a LayerNorm's backward dx = rstd·(gy − s1 − x̂·s2) (ln_backward_dx), with
// gy = γ ⊙ dy: s1 = mean_c gy(c) and s2 = mean_c gy(c)·x̂(c) over the team's row (each thread
// evaluates its own columns). Every thread of the team must call it.
template <typename G, typename X>
__device__ __forceinline__ void team_ln_backward_terms(G gy, X xhat, int cols, float* scratch, float& s1, float& s2) {
    float a = 0.0f, b = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float g = gy(c);
        a += g;
        b = fmaf(g, xhat(c), b);
    }
    s1 = team_sum(a, scratch) / (float)cols;
    s2 = team_sum(b, scratch) / (float)cols;
}

__device__ __forceinline__ float ln_backward_dx(float rstd, float gy, float xhat, float s1, float s2) {
    return rstd * (gy - s1 - xhat * s2);
}

// y[c] = (x[c] - mean)·rstd·γ[c] + β[c] over the thread's own columns of a team's row, with the
// statistics from the whole row. x is the row in shared memory (each thread reads only what it
// wrote); y may be x. Every thread of the team must call it. Returns nothing; `mean_out` and
// `rstd_out` get the statistics (the pre step keeps them to recompute x later).
template <typename T>
__device__ __forceinline__ void team_layernorm(const float* x, float* y, const T* gamma, const T* beta, int cols, float eps,
                                               float* scratch, float& mean_out, float& rstd_out) {
    float mean, rstd;
    team_row_stats(row_at(x), cols, eps, scratch, mean, rstd);
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

// The pre step over a team's row: x = LN(h + r) when the original LayerNorm comes first, else h,
// into the row buffer xs; `pre_mean` and `pre_rstd` get that LayerNorm's statistics (0 without
// it). Every thread of the team must call it.
template <typename T, typename P>
__device__ __forceinline__ void pre_step_row(float* xs, const T* hr, const T* rr, const P* ln_gamma, const P* ln_beta, bool ln_first,
                                             int cols, float ln_eps, float* scratch, float& pre_mean, float& pre_rstd) {
    pre_mean = 0.0f;
    pre_rstd = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        xs[c] = ln_first ? load_f32(hr, c) + load_f32(rr, c) : load_f32(hr, c);
    }
    if (ln_first) {
        team_layernorm(xs, xs, ln_gamma, ln_beta, cols, ln_eps, scratch, pre_mean, pre_rstd);
    }
}

// ---- forward ---------------------------------------------------------------------------------

// The pre step and the adapter's LayerNorm before the down projection, for one row team: z (x,
// or LN_before(x)) into the row buffer xs; `pre_mean` and `pre_rstd` get the pre step's
// LayerNorm statistics (0 without it), from which pre_step_x recomputes x for ρ. Shared by the
// fused forward and the split path's pre kernel. Every thread of the team must call it.
template <typename T, typename P>
__device__ __forceinline__ void location_pre_row(float* xs, const T* hr, const T* rr, const P* ln_gamma, const P* ln_beta,
                                                 const AdapterBranchDesc& d, int cols, float ln_eps, float* scratch, float& pre_mean,
                                                 float& pre_rstd) {
    float unused_mean, unused_rstd;
    pre_step_row(xs, hr, rr, ln_gamma, ln_beta, d.original_ln_before != 0, cols, ln_eps, scratch, pre_mean, pre_rstd);
    // The adapter's LayerNorm before the down projection, in place: x is recomputed for ρ.
    if (d.ln_before_gamma != 0) {
        team_layernorm(xs, xs, desc_ptr(d.ln_before_gamma), desc_ptr(d.ln_before_beta), cols, d.ln_before_eps, scratch, unused_mean,
                       unused_rstd);
    }
}

// What the up projection's epilogue applies to column c of one row, given up = (d·W_uᵀ)[c] +
// b_u[c]: the scaling, the branch's own dropout (element drop_row + c of its block) and the gate
// g (1 when the branch has none). Shared by the fused forward and the split path's post kernel.
__device__ __forceinline__ float adapter_up_epilogue(float up, const AdapterBranchDesc& d, int c, float s_uniform, PhiloxKey key,
                                                     unsigned long long drop_row, float g) {
    const float s = d.scaling_kind == ADAPTER_SCALING_CHANNEL ? desc_ptr(d.scaling)[c] : s_uniform;
    float u = up * s;
    if (d.dropout_threshold != 0) {
        u = adapter_dropout(u, d, key, drop_row + (unsigned long long)c);
    }
    if (d.gate_w != 0) {
        u *= g;
    }
    return u;
}

// The uniform scaling of a branch (fixed or learned; a channel scaling is read per column).
__device__ __forceinline__ float adapter_uniform_scaling(const AdapterBranchDesc& d) {
    return d.scaling_kind == ADAPTER_SCALING_LEARNED ? desc_ptr(d.scaling)[0] : d.scaling_value;
}

// From u (the adapter's output, in the row buffer xs, each column written by the thread that owns
// it) to the stored output row o: the adapter's LayerNorm after and residual ρ, then the post
// step. Shared by the fused forward and the split path's post kernel. Every thread of the team
// must call it.
template <typename T, typename P>
__device__ __forceinline__ void location_post_row(float* xs, T* o, const T* hr, const T* rr, const P* ln_gamma, const P* ln_beta,
                                                  const AdapterBranchDesc& d, int cols, float ln_eps, float* scratch, float pre_mean,
                                                  float pre_rstd) {
    const bool ln_first = d.original_ln_before != 0;
    float unused_mean, unused_rstd;
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

// T: the storage of h, r and out; P: of the BERT LayerNorm's gamma and beta.
template <typename T, typename P>
__device__ __forceinline__ void location_forward_row(T* __restrict__ out, const float* __restrict__ gate, const T* __restrict__ h,
                                                     const T* __restrict__ r, const P* __restrict__ ln_gamma,
                                                     const P* __restrict__ ln_beta, const AdapterBranchDesc* __restrict__ descs,
                                                     int batch, int seq_len, int cols, int branches, int replicate, float ln_eps,
                                                     int bottleneck_stride, const unsigned* __restrict__ seed_buf, unsigned seed_lo,
                                                     unsigned seed_hi) {
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

    // Pre step: z into the row buffer.
    float pre_mean, pre_rstd;
    location_pre_row(xs, hr, rr, ln_gamma, ln_beta, d, cols, ln_eps, scratch, pre_mean, pre_rstd);
    team_sync();  // the down projection reads every column of the row

    down_projection(xs, ds, d, cols);
    team_sync();  // ds complete; and no warp still reads xs before it is overwritten with u

    // Up projection, scaling, the adapter's dropout and the gate: u into the row buffer.
    {
        const int m = d.bottleneck;
        const float* wu = desc_ptr(d.up_w);
        const float* bu = desc_ptr(d.up_b);
        const float s_uniform = adapter_uniform_scaling(d);
        const float g = d.gate_w != 0 ? gate[branch * batch + local / seq_len] : 1.0f;
        const PhiloxKey key = philox_key(seed_buf, seed_lo, seed_hi);
        const unsigned long long drop_row = (unsigned long long)local * (unsigned long long)cols;  // in the branch's block
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float* w = wu + (size_t)c * (size_t)m;
            float acc = 0.0f;
            for (int j = 0; j < m; ++j) {
                acc = fmaf(ds[j], w[j], acc);
            }
            xs[c] = adapter_up_epilogue(acc + bu[c], d, c, s_uniform, key, drop_row, g);
        }
    }

    location_post_row(xs, out + dst, hr, rr, ln_gamma, ln_beta, d, cols, ln_eps, scratch, pre_mean, pre_rstd);
}

// out: [N·B·T, H]; h, r: [B·T, H] when replicate, else [N·B·T, H]; ln_gamma, ln_beta: [H];
// descs: N descriptors; gate: [N·B] from adapter_location_gate_f32, or null when no branch gates;
// seed_buf: the dropout seed's [2] words (low first), or null for (seed_lo, seed_hi), read by the
// branches with dropout.
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_location_forward_f32(
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
    int bottleneck_stride,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi)
{
    location_forward_row<float, float>(out, gate, h, r, ln_gamma, ln_beta, reinterpret_cast<const AdapterBranchDesc*>(descs), batch,
                                       seq_len, hidden, branches, replicate, ln_eps, bottleneck_stride, seed_buf, seed_lo, seed_hi);
}

// As adapter_location_forward_f32 with the BERT LayerNorm's gamma and beta in bf16 (raw bits: a
// frozen base loaded in bf16); h, r, out and every adapter weight stay f32.
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_location_forward_bf16(
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
    int bottleneck_stride,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi)
{
    location_forward_row<float, bf16_raw>(out, gate, h, r, reinterpret_cast<const bf16_raw*>(ln_gamma),
                                          reinterpret_cast<const bf16_raw*>(ln_beta), reinterpret_cast<const AdapterBranchDesc*>(descs),
                                          batch, seq_len, hidden, branches, replicate, ln_eps, bottleneck_stride, seed_buf, seed_lo,
                                          seed_hi);
}

// As adapter_location_forward_bf16 with h, r and out in bf16 too (raw bits): the _bf16io variant.
// Every adapter weight and the gate means stay f32; out is rounded once on store.
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_location_forward_bf16io(
    unsigned short* __restrict__ out,
    const float* __restrict__ gate,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int branches,
    int replicate,
    float ln_eps,
    int bottleneck_stride,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi)
{
    location_forward_row<bf16_raw, bf16_raw>(reinterpret_cast<bf16_raw*>(out), gate, reinterpret_cast<const bf16_raw*>(h),
                                             reinterpret_cast<const bf16_raw*>(r), reinterpret_cast<const bf16_raw*>(ln_gamma),
                                             reinterpret_cast<const bf16_raw*>(ln_beta), reinterpret_cast<const AdapterBranchDesc*>(descs),
                                             batch, seq_len, hidden, branches, replicate, ln_eps, bottleneck_stride, seed_buf, seed_lo,
                                             seed_hi);
}

// f16 twin of adapter_location_forward_bf16 (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_location_forward_f16(
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
    int bottleneck_stride,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi)
{
    location_forward_row<float, f16_raw>(out, gate, h, r, reinterpret_cast<const f16_raw*>(ln_gamma),
                                         reinterpret_cast<const f16_raw*>(ln_beta), reinterpret_cast<const AdapterBranchDesc*>(descs),
                                         batch, seq_len, hidden, branches, replicate, ln_eps, bottleneck_stride, seed_buf, seed_lo,
                                         seed_hi);
}

// f16 twin of adapter_location_forward_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_location_forward_f16io(
    unsigned short* __restrict__ out,
    const float* __restrict__ gate,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int branches,
    int replicate,
    float ln_eps,
    int bottleneck_stride,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi)
{
    location_forward_row<f16_raw, f16_raw>(reinterpret_cast<f16_raw*>(out), gate, reinterpret_cast<const f16_raw*>(h),
                                           reinterpret_cast<const f16_raw*>(r), reinterpret_cast<const f16_raw*>(ln_gamma),
                                           reinterpret_cast<const f16_raw*>(ln_beta), reinterpret_cast<const AdapterBranchDesc*>(descs),
                                           batch, seq_len, hidden, branches, replicate, ln_eps, bottleneck_stride, seed_buf, seed_lo,
                                           seed_hi);
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
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_location_gate_f32(
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
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_location_gate_bf16(
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

// The gate of adapter_location_forward_bf16io: h, r, γ and β in bf16; the gate means stay f32.
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_location_gate_bf16io(
    float* __restrict__ gate,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int replicate,
    float ln_eps)
{
    location_gate_block<bf16_raw, bf16_raw>(gate, reinterpret_cast<const bf16_raw*>(h), reinterpret_cast<const bf16_raw*>(r),
                                            reinterpret_cast<const bf16_raw*>(ln_gamma), reinterpret_cast<const bf16_raw*>(ln_beta),
                                            reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden, replicate, ln_eps);
}

// f16 twin of adapter_location_gate_bf16 (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_location_gate_f16(
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
    location_gate_block<float, f16_raw>(gate, h, r, reinterpret_cast<const f16_raw*>(ln_gamma), reinterpret_cast<const f16_raw*>(ln_beta),
                                        reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden, replicate, ln_eps);
}

// f16 twin of adapter_location_gate_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_location_gate_f16io(
    float* __restrict__ gate,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int replicate,
    float ln_eps)
{
    location_gate_block<f16_raw, f16_raw>(gate, reinterpret_cast<const f16_raw*>(h), reinterpret_cast<const f16_raw*>(r),
                                          reinterpret_cast<const f16_raw*>(ln_gamma), reinterpret_cast<const f16_raw*>(ln_beta),
                                          reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden, replicate, ln_eps);
}

// ---- split forward ---------------------------------------------------------------------------------
//
// The split path of one location (cuda::adapter::adapter_location_forward_split): the same
// semantics as adapter_location_forward_*, in few launches with the bottleneck products on GEMMs
// (cuBLASLt on a GPU) instead of CUDA cores in every row team:
//     gate    adapter_location_gate_*      (as the fused path, when a branch gates)
//     pre     adapter_split_pre_*          z[row] = LN_before(x) (f32), x the pre step's output;
//                                          stats[row] = the pre step's (mean, rstd) when given
//     down    GEMM per branch              a = act(z·W_dᵀ + b_d): cuBLASLt's ReLU epilogue for
//                                          relu (exactly max(x, 0)), else a plain product and
//                                          adapter_split_bias_act_f32 (gelu_new too: cuBLASLt's
//                                          GELU epilogue has an unspecified tanh)
//     up      GEMM per branch              up = a·W_uᵀ + b_u (bias epilogue), over z's buffer
//     post    adapter_split_post_*         scaling, the branch's dropout, gate, LN_after /
//                                          residual ρ, post step; out[row]
// Rows, branches and replication are indexed exactly as in adapter_location_forward_* (row =
// branch·B·T + local; the source row of h and r is local when replicate), and z, stats and up are
// laid out by output row, so branch i's GEMMs read and write rows [i·B·T, (i+1)·B·T).
//
// Thread mapping: the fused forward's row teams (cuda::adapter::LocationPlan, one warp per row up
// to 8 rows per block for H <= 1024, else a block per row); dynamic shared memory per team is the
// row buffer (H floats, no bottleneck vector) and, with `stage` (cuda::adapter::RowStaging), the
// team's h and r rows, copied in once with wide loads ("row staging"), the post kernel's up row
// copied into the row buffer itself. The pre and post steps are the fused
// kernel's device functions (location_pre_row, adapter_up_epilogue, location_post_row), so the
// arithmetic per element is the same; only the two products differ in summation order (the
// GEMM's), within the tolerances of the fused kernel's tests. The dropout mask is the same Philox
// draw (element local·H + c of the branch's stream), so it is the fused kernel's bit for bit.
//
// Storage: z, stats and up are f32 workspace; h, r, out, γ and β as the fused variants (_f32,
// _bf16: bf16 γ/β, _bf16io: bf16 h, r, out and γ/β; _f16, _f16io likewise in f16), from the same
// templates.

// The team's shared memory in the split forward's pre and post kernels (split_forward_team_bytes
// in the launcher): the row buffer xs (H f32) and, with `stage`, copies of the team's h and r rows,
// to which hr and rr are then pointed; with `up` (the post kernel), the up row is staged into xs
// itself. Returns whether it staged (then after a team_sync, since a thread reads columns others
// copied). Every thread of the team must call it.
template <typename T>
__device__ __forceinline__ bool split_team_rows(int cols, int stage, float*& xs, const T*& hr, const T*& rr, const float* up = nullptr) {
    extern __shared__ float adapter_split_smem[];  // per team: xs (f32), then h, r (T) when staging
    const int f32_bytes = stage_region_bytes(cols, sizeof(float));
    const int t_bytes = stage_region_bytes(cols, sizeof(T));
    char* team_smem = reinterpret_cast<char*>(adapter_split_smem) + (size_t)threadIdx.y * (size_t)(stage ? f32_bytes + 2 * t_bytes : f32_bytes);
    xs = reinterpret_cast<float*>(team_smem);
    if (!stage) {
        return false;
    }
    if (up != nullptr) {
        team_stage_row<SPLIT_TEAM_LOADS_IN_FLIGHT>(xs, up, cols);
    }
    team_stage_h_r<SPLIT_TEAM_LOADS_IN_FLIGHT>(team_smem + f32_bytes, cols, hr, rr);
    team_sync();
    return true;
}

// z: [N·B·T, H] f32; stats: [N·B·T, 2] or null; the other operands as adapter_location_forward_f32.
template <typename T, typename P>
__device__ __forceinline__ void location_split_pre_row(float* __restrict__ z, float* __restrict__ stats, const T* __restrict__ h,
                                                       const T* __restrict__ r, const P* __restrict__ ln_gamma,
                                                       const P* __restrict__ ln_beta, const AdapterBranchDesc* __restrict__ descs,
                                                       int batch, int seq_len, int cols, int branches, int replicate, float ln_eps,
                                                       int stage) {
    __shared__ float scratch[32];  // team_sum partials (block-per-row mapping only)

    const int per_branch = batch * seq_len;
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= per_branch * branches) {
        return;  // the whole team; no block barrier exists with more than one team per block
    }
    const int branch = row / per_branch;
    const int local = row - branch * per_branch;
    const size_t src = (size_t)(replicate ? local : row) * (size_t)cols;
    const size_t dst = (size_t)row * (size_t)cols;
    float* xs;
    const T* hr = h + src;
    const T* rr = r + src;
    split_team_rows(cols, stage, xs, hr, rr);
    float pre_mean, pre_rstd;
    location_pre_row(xs, hr, rr, ln_gamma, ln_beta, descs[branch], cols, ln_eps, scratch, pre_mean, pre_rstd);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        z[dst + (size_t)c] = xs[c];  // each thread stores the columns it wrote
    }
    if (stats != nullptr && threadIdx.x == 0) {
        stats[2 * (size_t)row] = pre_mean;
        stats[2 * (size_t)row + 1] = pre_rstd;
    }
}

// up: [N·B·T, H] f32 (a·W_uᵀ + b_u); stats: as written by the pre kernel, or null when ρ does
// not need x's statistics; the other operands as adapter_location_forward_f32.
template <typename T, typename P>
__device__ __forceinline__ void location_split_post_row(T* __restrict__ out, const float* __restrict__ up, const float* __restrict__ stats,
                                                        const float* __restrict__ gate, const T* __restrict__ h, const T* __restrict__ r,
                                                        const P* __restrict__ ln_gamma, const P* __restrict__ ln_beta,
                                                        const AdapterBranchDesc* __restrict__ descs, int batch, int seq_len, int cols,
                                                        int branches, int replicate, float ln_eps, const unsigned* __restrict__ seed_buf,
                                                        unsigned seed_lo, unsigned seed_hi, int stage) {
    __shared__ float scratch[32];

    const int per_branch = batch * seq_len;
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= per_branch * branches) {
        return;  // the whole team; no block barrier exists with more than one team per block
    }
    const int branch = row / per_branch;
    const int local = row - branch * per_branch;
    const size_t src = (size_t)(replicate ? local : row) * (size_t)cols;
    const size_t dst = (size_t)row * (size_t)cols;
    const AdapterBranchDesc& d = descs[branch];
    const float* ur = up + dst;
    float* xs;
    const T* hr = h + src;
    const T* rr = r + src;
    if (split_team_rows(cols, stage, xs, hr, rr, ur)) {
        ur = xs;  // up was staged into the row buffer, which the epilogue below overwrites in place
    }
    const float pre_mean = stats != nullptr ? stats[2 * (size_t)row] : 0.0f;
    const float pre_rstd = stats != nullptr ? stats[2 * (size_t)row + 1] : 0.0f;
    const float s_uniform = adapter_uniform_scaling(d);
    const float g = d.gate_w != 0 ? gate[branch * batch + local / seq_len] : 1.0f;
    const PhiloxKey key = philox_key(seed_buf, seed_lo, seed_hi);
    const unsigned long long drop_row = (unsigned long long)local * (unsigned long long)cols;  // in the branch's block
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        xs[c] = adapter_up_epilogue(ur[c], d, c, s_uniform, key, drop_row, g);
    }
    location_post_row(xs, out + dst, hr, rr, ln_gamma, ln_beta, d, cols, ln_eps, scratch, pre_mean, pre_rstd);
}

// Grid and block as the fused forward's plan with no bottleneck vector; shared memory per team as
// split_team_rows lays it out for `stage` (the launcher's split_forward_team_bytes).
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_split_pre_f32(
    float* __restrict__ z,
    float* __restrict__ stats,
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
    int stage)
{
    location_split_pre_row<float, float>(z, stats, h, r, ln_gamma, ln_beta, reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len,
                                         hidden, branches, replicate, ln_eps, stage);
}

// As adapter_split_pre_f32 with the BERT LayerNorm's gamma and beta in bf16.
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_split_pre_bf16(
    float* __restrict__ z,
    float* __restrict__ stats,
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
    int stage)
{
    location_split_pre_row<float, bf16_raw>(z, stats, h, r, reinterpret_cast<const bf16_raw*>(ln_gamma), reinterpret_cast<const bf16_raw*>(ln_beta),
                                            reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden, branches, replicate,
                                            ln_eps, stage);
}

// As adapter_split_pre_bf16 with h and r in bf16 too (z stays f32).
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_split_pre_bf16io(
    float* __restrict__ z,
    float* __restrict__ stats,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int branches,
    int replicate,
    float ln_eps,
    int stage)
{
    location_split_pre_row<bf16_raw, bf16_raw>(z, stats, reinterpret_cast<const bf16_raw*>(h), reinterpret_cast<const bf16_raw*>(r),
                                               reinterpret_cast<const bf16_raw*>(ln_gamma), reinterpret_cast<const bf16_raw*>(ln_beta),
                                               reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden, branches, replicate,
                                               ln_eps, stage);
}

// f16 twin of adapter_split_pre_bf16 (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_split_pre_f16(
    float* __restrict__ z,
    float* __restrict__ stats,
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
    int stage)
{
    location_split_pre_row<float, f16_raw>(z, stats, h, r, reinterpret_cast<const f16_raw*>(ln_gamma), reinterpret_cast<const f16_raw*>(ln_beta),
                                           reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden, branches, replicate,
                                           ln_eps, stage);
}

// f16 twin of adapter_split_pre_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_split_pre_f16io(
    float* __restrict__ z,
    float* __restrict__ stats,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int branches,
    int replicate,
    float ln_eps,
    int stage)
{
    location_split_pre_row<f16_raw, f16_raw>(z, stats, reinterpret_cast<const f16_raw*>(h), reinterpret_cast<const f16_raw*>(r),
                                             reinterpret_cast<const f16_raw*>(ln_gamma), reinterpret_cast<const f16_raw*>(ln_beta),
                                             reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden, branches, replicate,
                                             ln_eps, stage);
}

extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_split_post_f32(
    float* __restrict__ out,
    const float* __restrict__ up,
    const float* __restrict__ stats,
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
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    int stage)
{
    location_split_post_row<float, float>(out, up, stats, gate, h, r, ln_gamma, ln_beta, reinterpret_cast<const AdapterBranchDesc*>(descs), batch,
                                          seq_len, hidden, branches, replicate, ln_eps, seed_buf, seed_lo, seed_hi, stage);
}

// As adapter_split_post_f32 with the BERT LayerNorm's gamma and beta in bf16.
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_split_post_bf16(
    float* __restrict__ out,
    const float* __restrict__ up,
    const float* __restrict__ stats,
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
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    int stage)
{
    location_split_post_row<float, bf16_raw>(out, up, stats, gate, h, r, reinterpret_cast<const bf16_raw*>(ln_gamma),
                                             reinterpret_cast<const bf16_raw*>(ln_beta), reinterpret_cast<const AdapterBranchDesc*>(descs),
                                             batch, seq_len, hidden, branches, replicate, ln_eps, seed_buf, seed_lo, seed_hi, stage);
}

// As adapter_split_post_bf16 with h, r and out in bf16 too (out rounded once on store).
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_split_post_bf16io(
    unsigned short* __restrict__ out,
    const float* __restrict__ up,
    const float* __restrict__ stats,
    const float* __restrict__ gate,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int branches,
    int replicate,
    float ln_eps,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    int stage)
{
    location_split_post_row<bf16_raw, bf16_raw>(reinterpret_cast<bf16_raw*>(out), up, stats, gate, reinterpret_cast<const bf16_raw*>(h),
                                                reinterpret_cast<const bf16_raw*>(r), reinterpret_cast<const bf16_raw*>(ln_gamma),
                                                reinterpret_cast<const bf16_raw*>(ln_beta), reinterpret_cast<const AdapterBranchDesc*>(descs),
                                                batch, seq_len, hidden, branches, replicate, ln_eps, seed_buf, seed_lo, seed_hi, stage);
}

// f16 twin of adapter_split_post_bf16 (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_split_post_f16(
    float* __restrict__ out,
    const float* __restrict__ up,
    const float* __restrict__ stats,
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
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    int stage)
{
    location_split_post_row<float, f16_raw>(out, up, stats, gate, h, r, reinterpret_cast<const f16_raw*>(ln_gamma),
                                            reinterpret_cast<const f16_raw*>(ln_beta), reinterpret_cast<const AdapterBranchDesc*>(descs),
                                            batch, seq_len, hidden, branches, replicate, ln_eps, seed_buf, seed_lo, seed_hi, stage);
}

// f16 twin of adapter_split_post_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_split_post_f16io(
    unsigned short* __restrict__ out,
    const float* __restrict__ up,
    const float* __restrict__ stats,
    const float* __restrict__ gate,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int branches,
    int replicate,
    float ln_eps,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    int stage)
{
    location_split_post_row<f16_raw, f16_raw>(reinterpret_cast<f16_raw*>(out), up, stats, gate, reinterpret_cast<const f16_raw*>(h),
                                              reinterpret_cast<const f16_raw*>(r), reinterpret_cast<const f16_raw*>(ln_gamma),
                                              reinterpret_cast<const f16_raw*>(ln_beta), reinterpret_cast<const AdapterBranchDesc*>(descs),
                                              batch, seq_len, hidden, branches, replicate, ln_eps, seed_buf, seed_lo, seed_hi, stage);
}

// a[i] = act(a[i] + bias[i % m]) in place over a branch's [rows, m] down product, with the
// activation of adapter_activation (the fused kernel's): the activations cuBLASLt has no exact
// epilogue for. A grid-stride loop over n = rows·m elements.
extern "C" __global__ void adapter_split_bias_act_f32(
    float* a,
    const float* __restrict__ bias,
    long long n,
    int m,
    int act)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        a[i] = adapter_activation(act, a[i] + bias[i % m]);
    }
}

// ---- split forward: the pre step and the down projection on tensor cores ---------------------
//
// adapter_split_pre_down_bf16io / _f16io (cuda::adapter::SplitForward::TensorCores): the split
// path's pre kernel and its down products in one launch, for the 16-bit pipelines. z never goes
// to memory: a block computes z for a tile of ROWS rows, keeps it in shared memory rounded to the
// pipeline's 16-bit type, and multiplies it by W_d on the tensor cores (mma.sync m16n8k16,
// common.cuh) with f32 accumulators; the epilogue writes a = act(z·W_dᵀ + b_d) in f32, where the
// up product (adapter_split_up_post_*) reads it. This is PyTorch autocast's arithmetic for the
// down Linear (its input and weight in bf16 / f16, f32 accumulation); the pre step and the
// activation are the f32 device functions of the split pre kernel and adapter_split_bias_act_f32.
//
// Mapping: grid (⌈B·T / TC_ROWS⌉, branches), a block of TC_WARPS = 8 warps holds ROWS = TC_ROWS = 32
// rows of one branch.
//   row phase   warp w computes rows w, w + 8, w + 16, w + 24 of the tile as a row team (each
//               row's h and r staged in its shared memory with 16-byte loads, then
//               location_pre_row into its own f32 row buffer), writes the pre step's statistics
//               and stores z rounded into the tile Z [ROWS][KP + 8] (KP = H rounded up to 16, the
//               columns past H and the rows past B·T zero; the 8 columns of padding put the 8
//               rows a fragment load touches in different banks);
//   mma phase   D = W_d·Zᵀ ([m][ROWS]): A = W_d (row-major [m, H], read from global f32 and
//               rounded into fragments), B = Z (each row of Z is one column of B, contiguous in
//               k). A unit is one 16-row tile of m (MT = ⌈m/16⌉ of them) over one of S slices of
//               the k steps, S = 8 / MT (1 when MT >= 8; then warp w takes tiles w, w + 8, ...),
//               with all ROWS / 8 column tiles, so a unit reads its W_d slice once;
//   reduction   for S > 1 the units of slices 1.. store their accumulators in shared memory (the
//               row buffers' region, free by then) and slice 0 adds them in slice order: fixed,
//               so the result is reproducible bit for bit;
//   epilogue    a[row][j] = act(D[j][row] + b_d[j]) for the rows and j < m that exist; branch i's
//               a starts Σ_{k<i} B·T·m_k floats into `acts` (the launcher's workspace layout).
// Shared memory (split_pre_down_smem_bytes in the launcher): the tile, ROWS · (KP + 8) 16-bit
// values, then max(8 warps' row buffers — H f32, then H each of staged h and r, each region
// rounded up to 16 bytes —, (S − 1)·MT·16·ROWS f32 partial sums).
// Both tensor-core kernels (this one and adapter_split_up_post_*) take tiles of TC_ROWS rows of one
// branch in blocks of TC_WARPS warps (cuda::adapter::TENSOR_CORE_ROWS / _WARPS).
#define TC_ROWS 32
#define TC_WARPS 8
#define PRE_DOWN_NTILES (TC_ROWS / 8)
// A register budget rather than an occupancy target: BERT-base's 99 KB of shared memory a block
// fits two on sm_90 either way. With no minimum ptxas capped the bf16 kernel at 64 registers and
// spilled 24 bytes (NVRTC 13.0, sm_90); a minimum of three (80 registers) held until the branch
// mask of the backward's twin (adapter_split_bwd_pre_down_*) spilled 8-16 bytes on sm_80 and
// sm_90; with two the kernels take 106-110 registers, no spills (two blocks an SM by registers,
// as by BERT-base's shared memory; smaller H loses the third block the shared memory would fit).
#define PRE_DOWN_MIN_BLOCKS 2

// n rounded up to a multiple of 16 (the k step of m16n8k16).
__device__ __forceinline__ int round_up_16(int n) { return (n + 15) / 16 * 16; }

// Where branch `branch`'s down products start in the tensor-core kernels' `acts`: the [B·T, m_i]
// of the branches in `mask` follow each other in branch order (the launchers' workspace layouts:
// every branch in the forward, the processed ones in the backward).
__device__ __forceinline__ size_t branch_acts_offset(const AdapterBranchDesc* descs, int branch, int per_branch, unsigned mask) {
    size_t offset = 0;
    for (int i = 0; i < branch; ++i) {
        if ((mask >> i) & 1u) {
            offset += (size_t)per_branch * (size_t)descs[i].bottleneck;
        }
    }
    return offset;
}

// The index of the k-th set bit of `mask` (k counted from 0), or -1: the branch of the k-th
// processed one (branch masks have a bit a branch, ADAPTER_BWD_MAX_BRANCHES = 32 of them).
__device__ __forceinline__ int adapter_nth_branch(unsigned mask, int k) {
    for (int i = 0; i < 32; ++i) {
        if ((mask >> i) & 1u) {
            if (k == 0) {
                return i;
            }
            --k;
        }
    }
    return -1;
}

// The tensor-core kernels' grid: blockIdx.y counts the branches of `mask` (all of a forward's:
// tc_all_branches); its branch (the launchers size grid.y to the set bits).
__device__ __forceinline__ unsigned tc_all_branches() { return gridDim.y >= 32 ? ~0u : (1u << gridDim.y) - 1u; }
__device__ __forceinline__ int tc_branch(unsigned mask) { return adapter_nth_branch(mask, blockIdx.y); }

// A tensor-core block's per-warp row region (after its tiles, from `rows_region`): the f32 row
// buffer, then the staged h and r (split_forward_team_bytes, staged, in the launcher).
template <typename T>
__device__ __forceinline__ char* tc_warp_rows(char* rows_region, int cols) {
    return rows_region + (size_t)threadIdx.y * (size_t)(stage_region_bytes(cols, sizeof(float)) + 2 * stage_region_bytes(cols, sizeof(T)));
}

// Stages one row's h and r into the warp's row region (team_stage_h_r) and points hr, rr at the
// copies; the barriers keep the previous row's readers and this row's copy apart.
template <typename T>
__device__ __forceinline__ void tc_stage_row(char* warp_rows, int cols, const T*& hr, const T*& rr) {
    __syncwarp(FULL_WARP_MASK);  // the previous row's staged h and r are read
    team_stage_h_r<SPLIT_TEAM_LOADS_IN_FLIGHT>(warp_rows + stage_region_bytes(cols, sizeof(float)), cols, hr, rr);
    __syncwarp(FULL_WARP_MASK);
}

// The down product's units: MT tiles of 16 outputs, S slices of the k steps.
__device__ __forceinline__ int pre_down_slices(int mt) { return mt >= TC_WARPS ? 1 : TC_WARPS / mt; }

// Two adjacent f32 weights as one 8-byte unit (float2 is not defined on every route).
struct alignas(8) WeightPair {
    float lo, hi;
};

// One 16-bit pair of row j of a row-major f32 weight [rows, len] (columns k, k + 1), rounded
// into an mma register; zero past its rows or its row length. `whole`: the whole fragment's rows
// and k step exist and the pair is 8-byte aligned (even length, aligned weight; warp-uniform),
// so the pair is one 8-byte load with no bounds tests.
template <typename T>
__device__ __forceinline__ unsigned weight_pair(const float* __restrict__ w, int rows, int len, int j, int k, bool whole) {
    const float* p = w + (size_t)j * (size_t)len + k;
    if (whole) {
        const WeightPair v = *reinterpret_cast<const WeightPair*>(p);
        return pack2((const T*)nullptr, v.lo, v.hi);
    }
    const float lo = j < rows && k < len ? p[0] : 0.0f;
    const float hi = j < rows && k + 1 < len ? p[1] : 0.0f;
    return pack2((const T*)nullptr, lo, hi);
}

// One unit's accumulators: W_d's rows [16·tile_m, 16·tile_m + 16) times the tile's ROWS rows of Z
// over k steps [ksteps·slice/slices, ksteps·(slice + 1)/slices).
template <typename T>
__device__ __forceinline__ void pre_down_unit(float (&acc)[PRE_DOWN_NTILES][4], const unsigned short* tile, int stride, const float* __restrict__ wd,
                                              int m, int cols, int tile_m, int slice, int slices) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    const int ksteps = round_up_16(cols) / 16;
    const int j0 = tile_m * 16;
#pragma unroll
    for (int nt = 0; nt < PRE_DOWN_NTILES; ++nt) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            acc[nt][q] = 0.0f;
        }
    }
    const bool aligned = cols % 2 == 0 && ((unsigned long long)wd & 7ull) == 0 && j0 + 16 <= m;
#pragma unroll 4
    for (int ks = ksteps * slice / slices; ks < ksteps * (slice + 1) / slices; ++ks) {
        const int k = ks * 16 + 2 * t;
        const bool whole = aligned && ks * 16 + 16 <= cols;
        const unsigned a[4] = {weight_pair<T>(wd, m, cols, j0 + g, k, whole), weight_pair<T>(wd, m, cols, j0 + g + 8, k, whole),
                               weight_pair<T>(wd, m, cols, j0 + g, k + 8, whole), weight_pair<T>(wd, m, cols, j0 + g + 8, k + 8, whole)};
#pragma unroll
        for (int nt = 0; nt < PRE_DOWN_NTILES; ++nt) {
            const unsigned short* zr = tile + (nt * 8 + g) * stride + k;
            const unsigned b[2] = {*reinterpret_cast<const unsigned*>(zr), *reinterpret_cast<const unsigned*>(zr + 8)};
            const float c[4] = {acc[nt][0], acc[nt][1], acc[nt][2], acc[nt][3]};
            mma_m16n8k16((const T*)nullptr, acc[nt], a, b, c);
        }
    }
}

// The epilogue of W_d tile `tile_m`: a[local][j] = act(D[j][row] + b_d[j]) for the tile's rows
// below B·T and j < m (accumulator q of column tile nt is D[16·tile_m + g + 8·(q/2)][8·nt + 2t + q%2]),
// and pre[local][j] = D[j][row] + b_d[j] too when `pre` is not null (the backward's recompute).
__device__ __forceinline__ void pre_down_store(const float (&acc)[PRE_DOWN_NTILES][4], float* __restrict__ a, float* __restrict__ pre,
                                               const AdapterBranchDesc& d, int tile_m, int tile0, int per_branch) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    const float* bd = desc_ptr(d.down_b);
    const int m = d.bottleneck;
#pragma unroll
    for (int nt = 0; nt < PRE_DOWN_NTILES; ++nt) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int j = tile_m * 16 + g + 8 * (q >> 1);
            const int local = tile0 + nt * 8 + 2 * t + (q & 1);
            if (j < m && local < per_branch) {
                const float v = acc[nt][q] + bd[j];
                a[(size_t)local * (size_t)m + j] = adapter_activation(d.activation, v);
                if (pre != nullptr) {
                    pre[(size_t)local * (size_t)m + j] = v;
                }
            }
        }
    }
}

// acts: the down products of the branches in `mask` (branch i's [B·T, m_i] at Σ_{k<i, k in mask}
// B·T·m_k); stats: [N·B·T, 2] or null; the other operands as adapter_split_pre_*. For the
// backward's recompute (adapter_split_bwd_pre_down_*), also pres (laid out as acts) the
// pre-activations and z0 [N·B·T, H] the rounded z widened to f32; both null in the forward.
template <typename T, typename P>
__device__ __forceinline__ void location_split_pre_down(float* __restrict__ acts, float* __restrict__ pres, float* __restrict__ z0,
                                                        float* __restrict__ stats, const T* __restrict__ h, const T* __restrict__ r,
                                                        const P* __restrict__ ln_gamma, const P* __restrict__ ln_beta,
                                                        const AdapterBranchDesc* __restrict__ descs, int batch, int seq_len, int cols,
                                                        int replicate, float ln_eps, unsigned mask) {
    extern __shared__ float adapter_pre_down_smem[];
    __shared__ float scratch[32];  // team_sum's (not touched: a team is one warp)

    const int per_branch = batch * seq_len;
    const int branch = tc_branch(mask);
    const int tile0 = blockIdx.x * TC_ROWS;
    const AdapterBranchDesc& d = descs[branch];
    const int kp = round_up_16(cols);
    const int stride = kp + 8;  // 16-bit elements a tile row
    unsigned short* tile = reinterpret_cast<unsigned short*>(adapter_pre_down_smem);
    float* after_tile = reinterpret_cast<float*>(reinterpret_cast<char*>(adapter_pre_down_smem) + stage_region_bytes(TC_ROWS * stride, 2));
    const int warp = threadIdx.y;
    const int lane = threadIdx.x;

    // Row phase: z of the tile's rows, rounded into the tile. A warp stages each of its rows' h
    // and r into its own shared memory with 16-byte loads (team_stage_h_r: one trip to memory a
    // row, not one a column) and runs the pre step there.
    char* team = tc_warp_rows<T>(reinterpret_cast<char*>(after_tile), cols);
    float* xs = reinterpret_cast<float*>(team);
    for (int tr = warp; tr < TC_ROWS; tr += TC_WARPS) {
        unsigned short* zt = tile + tr * stride;
        const int local = tile0 + tr;
        if (local < per_branch) {
            const int row = branch * per_branch + local;
            const size_t src = (size_t)(replicate ? local : row) * (size_t)cols;
            const T* hr = h + src;
            const T* rr = r + src;
            tc_stage_row(team, cols, hr, rr);
            float pre_mean, pre_rstd;
            location_pre_row(xs, hr, rr, ln_gamma, ln_beta, d, cols, ln_eps, scratch, pre_mean, pre_rstd);
            if (stats != nullptr && lane == 0) {
                stats[2 * (size_t)row] = pre_mean;
                stats[2 * (size_t)row + 1] = pre_rstd;
            }
            float* zr = z0 != nullptr ? z0 + (size_t)row * (size_t)cols : nullptr;
            for (int c = lane; c < kp; c += 32) {
                T v;
                store_f32(&v, c < cols ? xs[c] : 0.0f);  // each lane reads the columns it wrote
                zt[c] = v.bits;
                if (zr != nullptr && c < cols) {
                    zr[c] = load_f32(&v);  // the product's operand, as autocast saves it
                }
            }
        } else {
            for (int c = lane; c < kp; c += 32) {
                zt[c] = 0;
            }
        }
    }
    __syncthreads();  // the tile is complete; the row buffers are free

    // Mma phase, reduction and epilogue.
    const int m = d.bottleneck;
    const int mt = (m + 15) / 16;
    const int slices = pre_down_slices(mt);
    const float* wd = desc_ptr(d.down_w);
    const size_t offset = branch_acts_offset(descs, branch, per_branch, mask);
    float* a = acts + offset;
    float* pre = pres != nullptr ? pres + offset : nullptr;
    float acc[PRE_DOWN_NTILES][4];
    if (slices == 1) {
        for (int tile_m = warp; tile_m < mt; tile_m += TC_WARPS) {
            pre_down_unit<T>(acc, tile, stride, wd, m, cols, tile_m, 0, 1);
            pre_down_store(acc, a, pre, d, tile_m, tile0, per_branch);
        }
        return;
    }
    // S > 1: MT·S <= 8 units, at most one a warp; slices 1.. hand their sums to slice 0.
    const bool active = warp < mt * slices;
    const int tile_m = warp / slices;
    const int slice = warp % slices;
    if (active) {
        pre_down_unit<T>(acc, tile, stride, wd, m, cols, tile_m, slice, slices);
    }
    float* partial = after_tile;  // [(S − 1)·MT][NTILES·4][32]
    const int unit_floats = PRE_DOWN_NTILES * 4 * 32;
    if (active && slice > 0) {
#pragma unroll
        for (int nt = 0; nt < PRE_DOWN_NTILES; ++nt) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                partial[((slice - 1) * mt + tile_m) * unit_floats + (nt * 4 + q) * 32 + lane] = acc[nt][q];
            }
        }
    }
    __syncthreads();
    if (active && slice == 0) {
        for (int s = 1; s < slices; ++s) {
#pragma unroll
            for (int nt = 0; nt < PRE_DOWN_NTILES; ++nt) {
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    acc[nt][q] += partial[((s - 1) * mt + tile_m) * unit_floats + (nt * 4 + q) * 32 + lane];
                }
            }
        }
        pre_down_store(acc, a, pre, d, tile_m, tile0, per_branch);
    }
}

// Grid (⌈B·T / TC_ROWS⌉, branches), block (32, TC_WARPS), shared memory as the header
// above says (split_pre_down_smem_bytes). acts: [Σ_i B·T·m_i] f32; stats: [N·B·T, 2] or null;
// h, r, γ, β in bf16 as adapter_split_pre_bf16io.
extern "C" __global__ __launch_bounds__(TC_WARPS * 32, PRE_DOWN_MIN_BLOCKS) void adapter_split_pre_down_bf16io(
    float* __restrict__ acts,
    float* __restrict__ stats,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int replicate,
    float ln_eps)
{
    location_split_pre_down<bf16_raw, bf16_raw>(acts, nullptr, nullptr, stats, reinterpret_cast<const bf16_raw*>(h), reinterpret_cast<const bf16_raw*>(r),
                                                reinterpret_cast<const bf16_raw*>(ln_gamma), reinterpret_cast<const bf16_raw*>(ln_beta),
                                                reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden, replicate, ln_eps,
                                                tc_all_branches());
}

// f16 twin of adapter_split_pre_down_bf16io (f16_raw for bf16_raw: z and W_d rounded to f16).
extern "C" __global__ __launch_bounds__(TC_WARPS * 32, PRE_DOWN_MIN_BLOCKS) void adapter_split_pre_down_f16io(
    float* __restrict__ acts,
    float* __restrict__ stats,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int replicate,
    float ln_eps)
{
    location_split_pre_down<f16_raw, f16_raw>(acts, nullptr, nullptr, stats, reinterpret_cast<const f16_raw*>(h), reinterpret_cast<const f16_raw*>(r),
                                              reinterpret_cast<const f16_raw*>(ln_gamma), reinterpret_cast<const f16_raw*>(ln_beta),
                                              reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden, replicate, ln_eps,
                                              tc_all_branches());
}

// The backward's recompute on the tensor-core path (cuda::adapter::adapter_location_backward_split
// with SplitForward::TensorCores): adapter_split_bwd_pre_down_* is the forward's pre + down kernel
// run over the rows of the branches in `branch_mask` (grid (⌈B·T / TC_ROWS⌉, popc(mask))), so
// pre and a are the forward's bit for bit; it also writes pre (for act') and z0, the rounded z
// widened to f32 (the down product's operand, which autocast saves for dW_down: the weight
// gradient of the product the forward computed), where the split pre kernel wrote the f32 z.
// acts, pres: [Σ_{i in mask} B·T·m_i] f32, in branch order; z0: [N·B·T, H] f32; stats: [N·B·T, 2]
// or null; the other operands as adapter_split_pre_down_bf16io.
extern "C" __global__ __launch_bounds__(TC_WARPS * 32, PRE_DOWN_MIN_BLOCKS) void adapter_split_bwd_pre_down_bf16io(
    float* __restrict__ acts,
    float* __restrict__ pres,
    float* __restrict__ z0,
    float* __restrict__ stats,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int replicate,
    float ln_eps,
    unsigned branch_mask)
{
    location_split_pre_down<bf16_raw, bf16_raw>(acts, pres, z0, stats, reinterpret_cast<const bf16_raw*>(h), reinterpret_cast<const bf16_raw*>(r),
                                                reinterpret_cast<const bf16_raw*>(ln_gamma), reinterpret_cast<const bf16_raw*>(ln_beta),
                                                reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden, replicate, ln_eps,
                                                branch_mask);
}

// f16 twin of adapter_split_bwd_pre_down_bf16io.
extern "C" __global__ __launch_bounds__(TC_WARPS * 32, PRE_DOWN_MIN_BLOCKS) void adapter_split_bwd_pre_down_f16io(
    float* __restrict__ acts,
    float* __restrict__ pres,
    float* __restrict__ z0,
    float* __restrict__ stats,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int replicate,
    float ln_eps,
    unsigned branch_mask)
{
    location_split_pre_down<f16_raw, f16_raw>(acts, pres, z0, stats, reinterpret_cast<const f16_raw*>(h), reinterpret_cast<const f16_raw*>(r),
                                              reinterpret_cast<const f16_raw*>(ln_gamma), reinterpret_cast<const f16_raw*>(ln_beta),
                                              reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden, replicate, ln_eps,
                                              branch_mask);
}

// ---- split forward: the up projection and the post step on tensor cores ---------------------
//
// adapter_split_up_post_bf16io / _f16io (cuda::adapter::SplitForward::TensorCores, after
// adapter_split_pre_down_*): the up products and the split path's post kernel in one launch. A
// block of TC_WARPS = 8 warps takes ROWS = TC_ROWS = 32 rows of one branch:
//   a tile      A = a rounded to the 16-bit type, [ROWS][MP + 8] (MP = m rounded up to 16, zero
//               past m and past B·T);
//   mma phase   up = A·W_uᵀ ([ROWS][H]): B = W_uᵀ (W_u is row-major [H, m], so column c of B is
//               row c of W_u, contiguous in k), read from global f32 and rounded into fragments;
//               warp w takes column tiles of 8 in chunks of UP_POST_NCHUNK (chunks w, w + 8, ...)
//               for both 16-row halves of the tile over all MP/16 k steps, and stores
//               up + b_u rounded to the 16-bit type (one rounding, as autocast's Linear) into the
//               up tile [ROWS][H8 + 8] (H8 = H rounded up to 8; the padding spreads the banks);
//   row phase   warp w finishes rows w, w + 8, ... as adapter_split_post_* does (h and r staged,
//               adapter_up_epilogue, location_post_row), reading up from the tile.
// So up never goes to memory. Shared memory (split_up_post_smem_bytes in the launcher): the a
// tile, the up tile, then the 8 warps' row regions (the f32 row buffer and staged h, r).
#define UP_POST_NCHUNK 4
// As PRE_DOWN_MIN_BLOCKS: BERT-base's ~104 KB a block fit two on sm_90 (116 registers, no spills).
#define UP_POST_MIN_BLOCKS 2

__device__ __forceinline__ int up_post_up_stride(int cols) { return (cols + 7) / 8 * 8 + 8; }
// The a tile's row stride (16-bit elements) for bottleneck m: MP + 8, MP = m rounded up to 16.
__device__ __forceinline__ int up_a_stride(int m) { return round_up_16(m) + 8; }

// The a tile of the up kernels: rows [tile0, tile0 + TC_ROWS) of a branch's a ([B·T, m] f32)
// rounded to T into a_tile [TC_ROWS][MP + 8], zero past m and past B·T. Ends with a barrier.
template <typename T>
__device__ __forceinline__ void up_fill_a_tile(unsigned short* a_tile, int a_stride, const float* __restrict__ a, int m, int tile0, int per_branch) {
    const int mp = round_up_16(m);
    for (int tr = threadIdx.y; tr < TC_ROWS; tr += TC_WARPS) {
        const int local = tile0 + tr;
        for (int j = threadIdx.x; j < mp; j += 32) {
            T v;
            store_f32(&v, j < m && local < per_branch ? a[(size_t)local * (size_t)m + j] : 0.0f);
            a_tile[tr * a_stride + j] = v.bits;
        }
    }
    __syncthreads();
}

// The mma phase of the up kernels: up = A·W_uᵀ + b_u for the tile's TC_ROWS rows and every column
// (the header above), handing each element, rounded once to T, to store(tile_row, column, bits)
// (every tile row, also those past B·T: the store filters).
template <typename T, typename Store>
__device__ __forceinline__ void up_tile_products(const unsigned short* a_tile, int a_stride, const float* __restrict__ wu, const float* __restrict__ bu,
                                                 int m, int cols, Store store) {
    const int warp = threadIdx.y;
    const int lane = threadIdx.x;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int mp = round_up_16(m);
    const int ntiles = (cols + 7) / 8;
    const bool aligned = m % 16 == 0 && ((unsigned long long)wu & 7ull) == 0;
    for (int n0 = warp * UP_POST_NCHUNK; n0 < ntiles; n0 += TC_WARPS * UP_POST_NCHUNK) {
        const bool whole = aligned && (n0 + UP_POST_NCHUNK) * 8 <= cols;
        float acc[2][UP_POST_NCHUNK][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
            for (int nc = 0; nc < UP_POST_NCHUNK; ++nc) {
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    acc[mt][nc][q] = 0.0f;
                }
            }
        }
        for (int ks = 0; ks < mp / 16; ++ks) {
            const int k = ks * 16 + 2 * t;
            unsigned fa[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                const unsigned short* ar = a_tile + (mt * 16 + g) * a_stride + k;
                fa[mt][0] = *reinterpret_cast<const unsigned*>(ar);
                fa[mt][1] = *reinterpret_cast<const unsigned*>(ar + 8 * a_stride);
                fa[mt][2] = *reinterpret_cast<const unsigned*>(ar + 8);
                fa[mt][3] = *reinterpret_cast<const unsigned*>(ar + 8 * a_stride + 8);
            }
#pragma unroll
            for (int nc = 0; nc < UP_POST_NCHUNK; ++nc) {
                const int n = (n0 + nc) * 8 + g;  // the output column: row n of W_u
                const unsigned b[2] = {weight_pair<T>(wu, cols, m, n, k, whole), weight_pair<T>(wu, cols, m, n, k + 8, whole)};
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    const float c[4] = {acc[mt][nc][0], acc[mt][nc][1], acc[mt][nc][2], acc[mt][nc][3]};
                    mma_m16n8k16((const T*)nullptr, acc[mt][nc], fa[mt], b, c);
                }
            }
        }
        // up + b_u, rounded once (accumulator q: row 16·mt + g + 8·(q/2), column
        // 8·(n0 + nc) + 2t + q%2).
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
            for (int nc = 0; nc < UP_POST_NCHUNK; ++nc) {
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const int c = (n0 + nc) * 8 + 2 * t + (q & 1);
                    if (c < cols) {
                        T v;
                        store_f32(&v, acc[mt][nc][q] + bu[c]);
                        store(mt * 16 + g + 8 * (q >> 1), c, v);
                    }
                }
            }
        }
    }
}

template <typename T, typename P>
__device__ __forceinline__ void location_split_up_post(T* __restrict__ out, const float* __restrict__ acts, const float* __restrict__ stats,
                                                       const float* __restrict__ gate, const T* __restrict__ h, const T* __restrict__ r,
                                                       const P* __restrict__ ln_gamma, const P* __restrict__ ln_beta,
                                                       const AdapterBranchDesc* __restrict__ descs, int batch, int seq_len, int cols,
                                                       int replicate, float ln_eps, const unsigned* __restrict__ seed_buf, unsigned seed_lo,
                                                       unsigned seed_hi) {
    extern __shared__ float adapter_up_post_smem[];
    __shared__ float scratch[32];  // team_sum's (not touched: a team is one warp)

    const int per_branch = batch * seq_len;
    const int branch = blockIdx.y;
    const int tile0 = blockIdx.x * TC_ROWS;
    const AdapterBranchDesc& d = descs[branch];
    const int m = d.bottleneck;
    const int a_stride = up_a_stride(m);
    const int u_stride = up_post_up_stride(cols);
    unsigned short* a_tile = reinterpret_cast<unsigned short*>(adapter_up_post_smem);
    unsigned short* u_tile = reinterpret_cast<unsigned short*>(reinterpret_cast<char*>(adapter_up_post_smem) + stage_region_bytes(TC_ROWS * a_stride, 2));
    char* rows_region = reinterpret_cast<char*>(u_tile) + stage_region_bytes(TC_ROWS * u_stride, 2);
    const int warp = threadIdx.y;
    const int lane = threadIdx.x;

    up_fill_a_tile<T>(a_tile, a_stride, acts + branch_acts_offset(descs, branch, per_branch, tc_all_branches()), m, tile0, per_branch);
    // Mma phase: the up tile.
    up_tile_products<T>(a_tile, a_stride, desc_ptr(d.up_w), desc_ptr(d.up_b), m, cols,
                        [&](int tr, int c, const T& v) { u_tile[tr * u_stride + c] = v.bits; });
    __syncthreads();

    // Row phase: the post kernel's epilogue and post step over the up tile.
    char* team = tc_warp_rows<T>(rows_region, cols);
    float* xs = reinterpret_cast<float*>(team);
    const float s_uniform = adapter_uniform_scaling(d);
    const PhiloxKey key = philox_key(seed_buf, seed_lo, seed_hi);
    for (int tr = warp; tr < TC_ROWS; tr += TC_WARPS) {
        const int local = tile0 + tr;
        if (local >= per_branch) {
            break;  // warp-uniform: the later rows of this warp are past the end too
        }
        const int row = branch * per_branch + local;
        const size_t src = (size_t)(replicate ? local : row) * (size_t)cols;
        const T* hr = h + src;
        const T* rr = r + src;
        tc_stage_row(team, cols, hr, rr);
        const float pre_mean = stats != nullptr ? stats[2 * (size_t)row] : 0.0f;
        const float pre_rstd = stats != nullptr ? stats[2 * (size_t)row + 1] : 0.0f;
        const float gv = d.gate_w != 0 ? gate[branch * batch + local / seq_len] : 1.0f;
        const unsigned long long drop_row = (unsigned long long)local * (unsigned long long)cols;  // in the branch's block
        const unsigned short* ur = u_tile + tr * u_stride;
        for (int c = lane; c < cols; c += 32) {
            T v;
            v.bits = ur[c];
            xs[c] = adapter_up_epilogue(load_f32(&v), d, c, s_uniform, key, drop_row, gv);
        }
        location_post_row(xs, out + (size_t)row * (size_t)cols, hr, rr, ln_gamma, ln_beta, d, cols, ln_eps, scratch, pre_mean, pre_rstd);
    }
}

// Grid (⌈B·T / TC_ROWS⌉, branches), block (32, TC_WARPS), shared memory as the header
// above says (split_up_post_smem_bytes). acts: the down products as adapter_split_pre_down_*
// wrote them; the other operands as adapter_split_post_bf16io.
extern "C" __global__ __launch_bounds__(TC_WARPS * 32, UP_POST_MIN_BLOCKS) void adapter_split_up_post_bf16io(
    unsigned short* __restrict__ out,
    const float* __restrict__ acts,
    const float* __restrict__ stats,
    const float* __restrict__ gate,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int replicate,
    float ln_eps,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi)
{
    location_split_up_post<bf16_raw, bf16_raw>(reinterpret_cast<bf16_raw*>(out), acts, stats, gate, reinterpret_cast<const bf16_raw*>(h),
                                               reinterpret_cast<const bf16_raw*>(r), reinterpret_cast<const bf16_raw*>(ln_gamma),
                                               reinterpret_cast<const bf16_raw*>(ln_beta), reinterpret_cast<const AdapterBranchDesc*>(descs),
                                               batch, seq_len, hidden, replicate, ln_eps, seed_buf, seed_lo, seed_hi);
}

// f16 twin of adapter_split_up_post_bf16io (f16_raw for bf16_raw: a, W_u and up rounded to f16).
extern "C" __global__ __launch_bounds__(TC_WARPS * 32, UP_POST_MIN_BLOCKS) void adapter_split_up_post_f16io(
    unsigned short* __restrict__ out,
    const float* __restrict__ acts,
    const float* __restrict__ stats,
    const float* __restrict__ gate,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int replicate,
    float ln_eps,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi)
{
    location_split_up_post<f16_raw, f16_raw>(reinterpret_cast<f16_raw*>(out), acts, stats, gate, reinterpret_cast<const f16_raw*>(h),
                                             reinterpret_cast<const f16_raw*>(r), reinterpret_cast<const f16_raw*>(ln_gamma),
                                             reinterpret_cast<const f16_raw*>(ln_beta), reinterpret_cast<const AdapterBranchDesc*>(descs),
                                             batch, seq_len, hidden, replicate, ln_eps, seed_buf, seed_lo, seed_hi);
}

// adapter_split_bwd_up_bf16io / _f16io: the backward's recompute of up on the tensor-core path,
// after adapter_split_bwd_pre_down_*: the up kernel's a tile and mma phase (the forward's
// arithmetic, so up is the forward's bit for bit), each element, rounded once to the 16-bit type,
// widened into the f32 rows the split backward's post kernel reads. Grid (⌈B·T / TC_ROWS⌉,
// popc(branch_mask)), block (32, TC_WARPS); shared memory the a tile, TC_ROWS · (MP + 8) 16-bit
// values (split_bwd_up_smem_bytes). up: [N·B·T, H] f32 (row branch·B·T + local); acts: the down
// products of the branches in the mask as adapter_split_bwd_pre_down_* wrote them.
template <typename T>
__device__ __forceinline__ void location_split_bwd_up(float* __restrict__ up, const float* __restrict__ acts, const AdapterBranchDesc* __restrict__ descs,
                                                      int batch, int seq_len, int cols, unsigned mask) {
    extern __shared__ float adapter_bwd_up_smem[];
    const int per_branch = batch * seq_len;
    const int branch = tc_branch(mask);
    const int tile0 = blockIdx.x * TC_ROWS;
    const AdapterBranchDesc& d = descs[branch];
    const int m = d.bottleneck;
    const int a_stride = up_a_stride(m);
    unsigned short* a_tile = reinterpret_cast<unsigned short*>(adapter_bwd_up_smem);
    up_fill_a_tile<T>(a_tile, a_stride, acts + branch_acts_offset(descs, branch, per_branch, mask), m, tile0, per_branch);
    float* rows = up + ((size_t)branch * (size_t)per_branch + (size_t)tile0) * (size_t)cols;
    const int valid = per_branch - tile0;  // rows of the tile below B·T
    up_tile_products<T>(a_tile, a_stride, desc_ptr(d.up_w), desc_ptr(d.up_b), m, cols, [&](int tr, int c, const T& v) {
        if (tr < valid) {
            rows[(size_t)tr * (size_t)cols + c] = load_f32(&v);
        }
    });
}

extern "C" __global__ __launch_bounds__(TC_WARPS * 32) void adapter_split_bwd_up_bf16io(
    float* __restrict__ up,
    const float* __restrict__ acts,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    unsigned branch_mask)
{
    location_split_bwd_up<bf16_raw>(up, acts, reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden, branch_mask);
}

// f16 twin of adapter_split_bwd_up_bf16io.
extern "C" __global__ __launch_bounds__(TC_WARPS * 32) void adapter_split_bwd_up_f16io(
    float* __restrict__ up,
    const float* __restrict__ acts,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    unsigned branch_mask)
{
    location_split_bwd_up<f16_raw>(up, acts, reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden, branch_mask);
}

// ---- backward ---------------------------------------------------------------------------------------
//
// adapter_location_backward_f32: the gradient of adapter_location_forward_f32 for every branch of
// a location in one launch (spec §7.3; the spec is bert_adapters::cpu's
// `adapter_location_backward`). Per row it recomputes the forward from h and r (pre step, LN
// before, down projection, activation, up projection, scaling, gate, LN after / residual, post
// step; the forward keeps no tape) and walks it back:
//     post step      dz2 = LNback(d_out)                 (or d_out)    dr += dz2
//     LN after       dt  = LN_afterback(dy)   dρ = dt | dy (adapter_residual_before_ln or not)
//     gate           du_d = g·du_g;  dg_e = Σ_{rows of e} du_g·u_d;  dlogit = dg_e/T·σ(1-σ)
//     dropout        du_s = dropout(du_d)   (the forward's mask and scale; u_d = dropout(u_s))
//     scaling        dup = s ⊙ du_s              ds = Σ du_s ⊙ up (channel) / Σ_c (learned)
//     up, act        dpre = (dup·W_u) ⊙ act'(pre)
//     down           dz0 = dpre·W_d;   dx = LN_beforeback(dz0) (or dz0) + dlogit·w_g
//     pre step       ρ: dh += dρ (h), dx += dρ (x), dv += dρ (v);  dv += LNback(dx) when the
//                    original LayerNorm comes first, dh += dv, dr += dv; else dh += dx
//
// Teams. Without replication a team owns one output row of one branch; the grid covers only the
// branches in `branch_mask` (rows of a branch that needs no parameter gradient and whose input
// gradient is not needed are never launched). With replication a team owns one shared input row
// and walks the branches of `branch_mask` in order, summing their input gradients in shared
// memory: dh and dr of a row are written by one team, in a fixed order, with no atomics.
//
// Parameter gradients are not reduced here. For each branch in `train_mask` the team writes a
// per-row pack of the vectors whose sums over rows are the gradients (adapter_pack_layout):
// dup and act (dW_up = dupᵀ·act, db_up = Σ dup), dpre and z0 (dW_down = dpreᵀ·z0, db_down),
// dy⊙x̂ and dy of each adapter LayerNorm, du_s⊙up (scaling), dlogit and x (gate). The launcher
// reduces them with GEMMs over the rows (cuBLASLt; the CPU gemm on cuda-sim), which are
// deterministic, so the whole backward is bitwise reproducible. z0 is not packed when it is h
// itself (no LayerNorm before the down projection, no original LayerNorm first) and h holds the
// branch's rows as they are (replicated): the GEMM reads h.
//
// The gate needs a reduction over an example's rows before any row can finish, so a gated
// location takes two launches of this kernel: phase 0 (the gated branches only) stops at
// q_row = Σ_c du_g·u_s and writes it to `gate_q`; phase 1 sums the T values of its example (in
// order, the same in every row of the example) and goes on. The gate means themselves come from
// adapter_location_gate_f32, launched before.
//
// Shared memory per team (floats): x [H], w [H] (z0, then up), g [H] (z2, dy, dup, dz0, dx),
// dx [H] (the sum over branches), then pre, act and dpre [bottleneck_stride] each.
//
// The adapter's dropout is read at up to seven places per column (LN_after's statistics and
// backward, y, the gate's row term, du_s), so a thread draws the keep bits of its first 32
// columns once per (row, branch) into a register (bit k: column threadIdx.x + k·blockDim.x; that
// is every column while H <= 32·blockDim.x); a column past those is drawn again where it is
// read. Either way the words are the forward's.

#define ADAPTER_BWD_MAX_BRANCHES 32
// Threads per block of the backward (warp per row: 8 rows; block per row: up to 8 warps). The
// kernel needs about 150 registers a thread (ptxas, sm_80/sm_90), so a 1024-thread block would
// not fit the 64K-register file; __launch_bounds__(this, 1) makes ptxas guarantee this many
// without squeezing registers for a second block (which spilled).
#define ADAPTER_BWD_MAX_THREADS 256

// act'(x), in f32 with the accurate library functions; the same activations as
// adapter_activation.
__device__ __forceinline__ float adapter_activation_grad(int act, float x) {
    switch (act) {
    case ADAPTER_ACT_RELU:
        return x > 0.0f ? 1.0f : 0.0f;
    case ADAPTER_ACT_GELU: {
        const float cdf = 0.5f * erfcf(x * -0.70710678118654752f);
        const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
        return fmaf(x, pdf, cdf);
    }
    case ADAPTER_ACT_GELU_NEW: {
        const float c = 0.79788456080286536f;
        const float t = tanhf(c * (x + 0.044715f * x * x * x));
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * c * (1.0f + 3.0f * 0.044715f * x * x);
    }
    case ADAPTER_ACT_SWISH: {
        const float s = 1.0f / (1.0f + expf(-x));
        return s * (1.0f + x * (1.0f - s));
    }
    case ADAPTER_ACT_TANH: {
        const float t = tanhf(x);
        return 1.0f - t * t;
    }
    default: {  // ADAPTER_ACT_SIGMOID
        const float s = 1.0f / (1.0f + expf(-x));
        return s * (1.0f - s);
    }
    }
}

// Column offsets of one row of a trainable branch's pack; -1 = absent. Mirrors `PackLayout` in
// src/cuda/adapter.rs (the launcher sizes the workspace and runs the GEMMs from it).
struct AdapterPackLayout {
    int dup;              // [H] dup = s ⊙ du_s
    int z0;               // [H] the down projection's input, unless it is h's own rows (replicated)
    int ln_after_gamma;   // [H] dy ⊙ x̂ of LN_after
    int ln_after_beta;    // [H] dy of LN_after
    int ln_before_gamma;  // [H]
    int ln_before_beta;   // [H]
    int scaling;          // [H] du_s ⊙ up (channel) or [1] Σ_c du_s ⊙ up (learned)
    int x;                // [H] the gate's input x, when it is neither z0 nor h
    int act;              // [m]
    int dpre;             // [m]
    int dlogit;           // [1]
    int width;            // floats per row, a multiple of 4
};

__device__ __forceinline__ AdapterPackLayout adapter_pack_layout(const AdapterBranchDesc& d, int cols, int replicate) {
    AdapterPackLayout p;
    const bool ln_before = d.ln_before_gamma != 0;
    int k = 0;
    p.dup = k;
    k += cols;
    p.z0 = -1;
    if (ln_before || d.original_ln_before != 0 || !replicate) {
        p.z0 = k;
        k += cols;
    }
    p.ln_after_gamma = p.ln_after_beta = -1;
    if (d.ln_after_gamma != 0) {
        p.ln_after_gamma = k;
        p.ln_after_beta = k + cols;
        k += 2 * cols;
    }
    p.ln_before_gamma = p.ln_before_beta = -1;
    if (ln_before) {
        p.ln_before_gamma = k;
        p.ln_before_beta = k + cols;
        k += 2 * cols;
    }
    p.scaling = -1;
    if (d.scaling_kind == ADAPTER_SCALING_CHANNEL) {
        p.scaling = k;
        k += cols;
    }
    p.x = -1;
    if (d.gate_w != 0 && ln_before) {
        p.x = k;
        k += cols;
    }
    p.act = k;
    k += d.bottleneck;
    p.dpre = k;
    k += d.bottleneck;
    if (d.scaling_kind == ADAPTER_SCALING_LEARNED) {
        p.scaling = k;
        k += 1;
    }
    p.dlogit = -1;
    if (d.gate_w != 0) {
        p.dlogit = k;
        k += 1;
    }
    p.width = (k + 3) & ~3;
    return p;
}

// pre[j] = z·W_d[j]ᵀ + b_d[j] and act[j] = act(pre[j]) for j < m: down_projection's mapping, both
// values kept (the backward needs the pre-activation).
__device__ __forceinline__ void bwd_down_projection(const float* z, float* pre, float* act, const AdapterBranchDesc& d, int cols) {
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
                const float v = total + bd[j0 + lane];
                pre[j0 + lane] = v;
                act[j0 + lane] = adapter_activation(d.activation, v);
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
                    const float v = acc + bd[j0 + i];
                    pre[j0 + i] = v;
                    act[j0 + i] = adapter_activation(d.activation, v);
                }
            }
        }
    }
}

// dpre[j] = (Σ_c dup[c]·W_u[c, j]) · act'(pre[j]) for j < m: the transposed product with W_u
// ([H, m]), mapped like the down projection (lane l sums columns l, l + 32, ... of 32 outputs).
__device__ __forceinline__ void bwd_up_transposed(const float* dup, const float* pre, float* dpre, const AdapterBranchDesc& d, int cols) {
    const float* wu = desc_ptr(d.up_w);
    const int m = d.bottleneck;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    for (int j0 = warp * 32; j0 < m; j0 += warps * 32) {
        const int n = m - j0 < 32 ? m - j0 : 32;  // warp-uniform
        if (n > DOWN_TRANSPOSE_MIN) {
            float p[32];
#pragma unroll
            for (int i = 0; i < 32; ++i) {
                p[i] = 0.0f;
            }
            for (int c = lane; c < cols; c += 32) {
                const float g = dup[c];
                const float* w = wu + (size_t)c * (size_t)m + j0;
#pragma unroll
                for (int i = 0; i < 32; ++i) {
                    if (i < n) {
                        p[i] = fmaf(g, w[i], p[i]);
                    }
                }
            }
            const float total = warp_transpose_sum(p);
            if (lane < n) {
                dpre[j0 + lane] = total * adapter_activation_grad(d.activation, pre[j0 + lane]);
            }
        } else {
            for (int i = 0; i < n; ++i) {
                float acc = 0.0f;
                for (int c = lane; c < cols; c += 32) {
                    acc = fmaf(dup[c], wu[(size_t)c * (size_t)m + j0 + i], acc);
                }
                acc = warp_sum(acc);
                if (lane == 0) {
                    dpre[j0 + i] = acc * adapter_activation_grad(d.activation, pre[j0 + i]);
                }
            }
        }
    }
}

// What a team needs to recompute the core's column values from its shared-memory row buffers.
template <typename T>
struct AdapterBwdRow {
    const T* hr;      // h, r of the source row
    const T* rr;
    const float* xs;  // x
    const float* ws;  // up = act·W_uᵀ + b_u (unscaled)
    const float* sp;  // the scaling parameter, or null
    float s_uniform;  // the fixed or learned scaling
    int scaling_kind;
    float g;          // the example's gate value (1 without a gate)
    bool gated;
    int residual;     // ADAPTER_RESIDUAL_*
    bool residual_first;
    // The branch's dropout: threshold 0 = none. Element (row in the branch)·H + c + offset of `stream`.
    PhiloxKey key;
    unsigned long long drop_stream;
    unsigned long long drop_row;  // the row's first element in the branch's block, plus d.dropout_offset
    unsigned drop_threshold;
    float drop_scale;
    unsigned keep_bits;  // bit k: column threadIdx.x + k·blockDim.x is kept (k < 32)
};

// The keep bits of the thread's first 32 columns of the row (bwd_dropout's cache).
template <typename T>
__device__ __forceinline__ unsigned bwd_keep_bits(const AdapterBwdRow<T>& w, int cols) {
    unsigned bits = 0;
    int k = 0;
    for (int c = threadIdx.x; c < cols && k < 32; c += blockDim.x, ++k) {
        if (philox_keep_factor(w.key, w.drop_stream, w.drop_row + (unsigned long long)c, w.drop_threshold, 1.0f) != 0.0f) {
            bits |= 1u << k;
        }
    }
    return bits;
}

// The branch's dropout of v at the thread's column c: v·scale when kept, 0 when dropped (the
// forward's adapter_dropout), v itself without dropout.
template <typename T>
__device__ __forceinline__ float bwd_dropout(const AdapterBwdRow<T>& w, int c, float v) {
    if (w.drop_threshold == 0) {
        return v;
    }
    const unsigned k = blockDim.x == 32 ? (unsigned)c >> 5 : (unsigned)c / blockDim.x;  // c = threadIdx.x + k·blockDim.x
    const bool keep = k < 32u ? ((w.keep_bits >> k) & 1u) != 0
                              : philox_keep_factor(w.key, w.drop_stream, w.drop_row + (unsigned long long)c, w.drop_threshold, 1.0f) != 0.0f;
    return keep ? v * w.drop_scale : 0.0f;
}

template <typename T>
__device__ __forceinline__ float bwd_scale(const AdapterBwdRow<T>& w, int c) {
    return w.scaling_kind == ADAPTER_SCALING_CHANNEL ? w.sp[c] : w.s_uniform;
}

// u_d = dropout(s ⊙ up), as the forward rounds it.
template <typename T>
__device__ __forceinline__ float bwd_scaled(const AdapterBwdRow<T>& w, int c) {
    return bwd_dropout(w, c, w.ws[c] * bwd_scale(w, c));
}

// u_g = g · u_d.
template <typename T>
__device__ __forceinline__ float bwd_gated(const AdapterBwdRow<T>& w, int c) {
    const float u = bwd_scaled(w, c);
    return w.gated ? u * w.g : u;
}

template <typename T>
__device__ __forceinline__ float bwd_rho(const AdapterBwdRow<T>& w, int c) {
    if (w.residual == ADAPTER_RESIDUAL_H) {
        return load_f32(w.hr, c);
    }
    if (w.residual == ADAPTER_RESIDUAL_X) {
        return w.xs[c];
    }
    return load_f32(w.hr, c) + load_f32(w.rr, c);
}

// The input of LN_after: u_g (+ ρ when the adapter residual comes first).
template <typename T>
__device__ __forceinline__ float bwd_ln_after_input(const AdapterBwdRow<T>& w, int c) {
    const float u = bwd_gated(w, c);
    return w.residual_first ? u + bwd_rho(w, c) : u;
}

// ---- per-row steps of the backward, shared by the fused and the split kernels ----
// Each works on the team's row; every column is read and written by the thread that owns it, and
// every thread of the team must call it (team_sum). The column values that the two paths hold
// differently (u_d cached or recomputed, x in shared memory or recomputed from h and r) come in
// as functions of the column c.

// y = LN_after(u_g (+ ρ when the adapter residual comes first)) (+ ρ otherwise), or u_g + ρ
// without LN_after; then the post step's input z2 = y + r (or y) into gs. ln_in(c): LN_after's
// input (bwd_ln_after_input); a_mean, a_rstd: its statistics.
template <typename T, typename U, typename A, typename R>
__device__ __forceinline__ void bwd_post_input_row(float* gs, U u_g, A ln_in, R rho, const T* rr, const float* ga, const float* ba,
                                                   bool ln_after, bool residual_first, bool post, float a_mean, float a_rstd, int cols) {
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float y;
        if (ln_after) {
            y = fmaf((ln_in(c) - a_mean) * a_rstd, ga[c], ba[c]);
            if (!residual_first) {
                y += rho(c);
            }
        } else {
            y = u_g(c) + rho(c);
        }
        gs[c] = post ? y + load_f32(rr, c) : y;
    }
}

// The post step's backward: gs holds z2 on entry and dz2 = LNback(d_out) on return (each column
// also handed to dr_term(c, dz2), r's share), or d_out itself without the post step.
template <typename T, typename P, typename E>
__device__ __forceinline__ void bwd_post_step_row(float* gs, const T* dor, const P* ln_gamma, bool post, int cols, float ln_eps,
                                                  float* scratch, E dr_term) {
    if (!post) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            gs[c] = load_f32(dor, c);
        }
        return;
    }
    float mean, rstd, s1, s2;
    team_row_stats(row_at(gs), cols, ln_eps, scratch, mean, rstd);
    auto gy = [&](int c) -> float { return load_f32(dor, c) * load_f32(ln_gamma, c); };
    auto xhat = [&](int c) -> float { return (gs[c] - mean) * rstd; };
    team_ln_backward_terms(gy, xhat, cols, scratch, s1, s2);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float dz = ln_backward_dx(rstd, gy(c), xhat(c), s1, s2);
        gs[c] = dz;
        dr_term(c, dz);
    }
}

// LN_after's and the adapter residual's backward: gs holds dy on entry and du_g on return; each
// column's (dy, x̂ of LN_after (0 without it), du_g, dρ) goes to sink(c, ...), which packs and
// routes them.
template <typename A, typename S>
__device__ __forceinline__ void bwd_ln_after_row(float* gs, A ln_in, const float* ga, bool ln_after, bool residual_first, float a_mean,
                                                 float a_rstd, int cols, float* scratch, S sink) {
    float s1 = 0.0f, s2 = 0.0f;
    auto xhat = [&](int c) -> float { return (ln_in(c) - a_mean) * a_rstd; };
    if (ln_after) {
        team_ln_backward_terms([&](int c) -> float { return gs[c] * ga[c]; }, xhat, cols, scratch, s1, s2);
    }
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float dy = gs[c];
        float du = dy, drho = dy, xh = 0.0f;
        if (ln_after) {
            xh = xhat(c);
            du = ln_backward_dx(a_rstd, dy * ga[c], xh, s1, s2);
            if (residual_first) {
                drho = du;
            }
        }
        gs[c] = du;
        sink(c, dy, xh, du, drho);
    }
}

// The gate's dlogit for a row of an example: (Σ_t q over the example's T rows, qe, in order) / T ·
// σ'(x·w_g + b_g), x the pre step's output in xs. The same in every thread of the team.
__device__ __forceinline__ float bwd_gate_dlogit(const float* qe, const float* xs, const AdapterBranchDesc& d, int cols, int seq_len,
                                                 float* scratch) {
    float part = 0.0f;
    for (int t = threadIdx.x; t < seq_len; t += blockDim.x) {
        part += qe[t];
    }
    const float dg = team_sum(part, scratch);
    const float* wg = desc_ptr(d.gate_w);
    float dot = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        dot = fmaf(xs[c], wg[c], dot);
    }
    const float logit = team_sum(dot, scratch) + desc_ptr(d.gate_b)[0];
    const float sig = 1.0f / (1.0f + expf(-logit));
    return dg / (float)seq_len * (sig * (1.0f - sig));
}

// The pre step's backward from dx (the gradient of its output x, in shared memory): dv =
// LNback(dx) with v = h + r when the original LayerNorm comes first, handed to emit(c, dv) (h's
// and r's share), else dx itself (h's alone).
template <typename T, typename P, typename E>
__device__ __forceinline__ void bwd_pre_step_row(const float* dxs, const T* hr, const T* rr, const P* ln_gamma, bool ln_first,
                                                 float pre_mean, float pre_rstd, int cols, float* scratch, E emit) {
    if (!ln_first) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            emit(c, dxs[c]);
        }
        return;
    }
    auto gy = [&](int c) -> float { return dxs[c] * load_f32(ln_gamma, c); };
    auto xhat = [&](int c) -> float { return (load_f32(hr, c) + load_f32(rr, c) - pre_mean) * pre_rstd; };
    float s1, s2;
    team_ln_backward_terms(gy, xhat, cols, scratch, s1, s2);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        emit(c, ln_backward_dx(pre_rstd, gy(c), xhat(c), s1, s2));
    }
}

template <typename T>
__device__ __forceinline__ void location_backward_team(
    float* __restrict__ dh, float* __restrict__ dr, float* __restrict__ pack, float* __restrict__ gate_q, const float* __restrict__ gate,
    const T* __restrict__ d_out, const T* __restrict__ h, const T* __restrict__ r, const T* __restrict__ ln_gamma,
    const T* __restrict__ ln_beta, const AdapterBranchDesc* __restrict__ descs, int batch, int seq_len, int cols, int branches,
    int replicate, float ln_eps, int bottleneck_stride, unsigned branch_mask, unsigned train_mask, int need_input, int phase,
    const unsigned* __restrict__ seed_buf, unsigned seed_lo, unsigned seed_hi) {
    extern __shared__ float adapter_bwd_smem[];  // per team: x, w, g, dx [cols] each, pre, act, dpre [stride] each
    __shared__ float bwd_scratch[32];            // team_sum partials (block-per-row mapping only)

    const int per_branch = batch * seq_len;  // > 0: the launcher launches nothing for zero rows
    const int team = blockIdx.x * blockDim.y + threadIdx.y;
    int local, first, last;  // the team's row within a branch, and its branches [first, last)
    if (replicate) {
        if (team >= per_branch) {
            return;  // the whole team; block barriers only occur with one team per block
        }
        local = team;
        first = 0;
        last = branches;
    } else {
        const int k = team / per_branch;
        if (k >= __popc(branch_mask)) {
            return;
        }
        first = adapter_nth_branch(branch_mask, k);
        last = first + 1;
        local = team - k * per_branch;
    }
    const size_t src = (size_t)(replicate ? local : first * per_branch + local);
    const T* hr = h + src * (size_t)cols;
    const T* rr = r + src * (size_t)cols;
    const size_t team_floats = 4 * (size_t)cols + 3 * (size_t)bottleneck_stride;
    float* xs = adapter_bwd_smem + (size_t)threadIdx.y * team_floats;
    float* ws = xs + cols;
    float* gs = ws + cols;
    float* dxs = gs + cols;
    float* pre = dxs + cols;
    float* act = pre + bottleneck_stride;
    float* dpre = act + bottleneck_stride;
    const bool ln_first = descs[0].original_ln_before != 0;  // the location's, in every descriptor
    const bool post = descs[0].original_ln_after != 0;
    const int residual = descs[0].residual_before_ln;
    const bool inputs = need_input != 0 && phase == 1;
    float* dhr = inputs ? dh + src * (size_t)cols : nullptr;
    float* drr = inputs ? dr + src * (size_t)cols : nullptr;
    const PhiloxKey drop_key = philox_key(seed_buf, seed_lo, seed_hi);

    // Pre step: x into xs. The input-gradient accumulators start at zero.
    float pre_mean, pre_rstd;
    pre_step_row(xs, hr, rr, ln_gamma, ln_beta, ln_first, cols, ln_eps, bwd_scratch, pre_mean, pre_rstd);
    if (inputs) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            dxs[c] = 0.0f;
            dhr[c] = 0.0f;
            drr[c] = 0.0f;
        }
    }

    for (int i = first; i < last; ++i) {
        if (((branch_mask >> i) & 1u) == 0) {
            continue;  // team-uniform
        }
        const AdapterBranchDesc& d = descs[i];
        const bool gated = d.gate_w != 0;
        if (phase == 0 && !gated) {
            continue;
        }
        const bool train = phase == 1 && ((train_mask >> i) & 1u) != 0;
        const int m = d.bottleneck;
        const size_t out_row = (size_t)i * (size_t)per_branch + (size_t)local;
        const int example = local / seq_len;
        const AdapterPackLayout lay = adapter_pack_layout(d, cols, replicate);
        float* pk = nullptr;
        if (train) {
            size_t base = 0;  // the packs of the trainable branches before i
            for (int k = 0; k < i; ++k) {
                if ((train_mask >> k) & 1u) {
                    base += (size_t)per_branch * (size_t)adapter_pack_layout(descs[k], cols, replicate).width;
                }
            }
            pk = pack + base + (size_t)local * (size_t)lay.width;
        }
        const T* dor = d_out + out_row * (size_t)cols;

        // ---- forward again ----
        const bool ln_before = d.ln_before_gamma != 0;
        float b_mean = 0.0f, b_rstd = 0.0f;
        const float* zs = xs;
        if (ln_before) {
            team_layernorm(xs, ws, desc_ptr(d.ln_before_gamma), desc_ptr(d.ln_before_beta), cols, d.ln_before_eps, bwd_scratch, b_mean,
                           b_rstd);
            zs = ws;
        }
        if (train) {
            for (int c = threadIdx.x; c < cols; c += blockDim.x) {
                if (lay.z0 >= 0) {
                    pk[lay.z0 + c] = zs[c];
                }
                if (lay.x >= 0) {
                    pk[lay.x + c] = xs[c];
                }
            }
        }
        team_sync();  // the down projection reads every column of z0
        bwd_down_projection(zs, pre, act, d, cols);
        team_sync();  // pre/act complete; nobody reads z0 any more

        AdapterBwdRow<T> w;
        w.hr = hr;
        w.rr = rr;
        w.xs = xs;
        w.ws = ws;
        w.sp = desc_ptr(d.scaling);
        w.scaling_kind = d.scaling_kind;
        w.s_uniform = d.scaling_kind == ADAPTER_SCALING_LEARNED ? w.sp[0] : d.scaling_value;
        w.gated = gated;
        w.g = gated ? gate[i * batch + example] : 1.0f;
        w.residual = residual;
        w.residual_first = d.adapter_residual_before_ln != 0;
        w.key = drop_key;
        w.drop_stream = d.dropout_stream;
        w.drop_row = (unsigned long long)local * (unsigned long long)cols + d.dropout_offset;  // adapter_dropout_keep's index
        w.drop_threshold = d.dropout_threshold;
        w.drop_scale = d.dropout_scale;
        w.keep_bits = w.drop_threshold != 0 ? bwd_keep_bits(w, cols) : 0u;
        {
            const float* wu = desc_ptr(d.up_w);
            const float* bu = desc_ptr(d.up_b);
            for (int c = threadIdx.x; c < cols; c += blockDim.x) {
                const float* wc = wu + (size_t)c * (size_t)m;
                float acc = 0.0f;
                for (int j = 0; j < m; ++j) {
                    acc = fmaf(act[j], wc[j], acc);
                }
                ws[c] = acc + bu[c];
            }
        }
        // LN_after statistics (two-pass, as team_layernorm).
        const bool ln_after = d.ln_after_gamma != 0;
        const float* ga = desc_ptr(d.ln_after_gamma);
        const float* ba = desc_ptr(d.ln_after_beta);
        auto ln_in = [&](int c) -> float { return bwd_ln_after_input(w, c); };
        auto rho = [&](int c) -> float { return bwd_rho(w, c); };
        float a_mean = 0.0f, a_rstd = 0.0f;
        if (ln_after) {
            team_row_stats(ln_in, cols, d.ln_after_eps, bwd_scratch, a_mean, a_rstd);
        }
        bwd_post_input_row(gs, [&](int c) -> float { return bwd_gated(w, c); }, ln_in, rho, rr, ga, ba, ln_after, w.residual_first, post,
                           a_mean, a_rstd, cols);

        // ---- backward ----
        // Post step: dy = LNback(d_out) into gs (dr gets it too), or d_out.
        bwd_post_step_row(gs, dor, ln_gamma, post, cols, ln_eps, bwd_scratch, [&](int c, float dz) {
            if (inputs) {
                drr[c] += dz;
            }
        });
        // LN_after and the adapter residual: du_g into gs; dρ to the input-gradient sums.
        float q = 0.0f;  // Σ_c du_g·u_d, the gate's row term
        bwd_ln_after_row(gs, ln_in, ga, ln_after, w.residual_first, a_mean, a_rstd, cols, bwd_scratch,
                         [&](int c, float dy, float xh, float du, float drho) {
            if (train && ln_after) {
                pk[lay.ln_after_gamma + c] = dy * xh;
                pk[lay.ln_after_beta + c] = dy;
            }
            if (gated) {
                q = fmaf(du, bwd_scaled(w, c), q);
            }
            if (inputs) {
                if (residual == ADAPTER_RESIDUAL_X) {
                    dxs[c] += drho;
                } else {
                    dhr[c] += drho;
                    if (residual == ADAPTER_RESIDUAL_V) {
                        drr[c] += drho;
                    }
                }
            }
        });
        // Gate: phase 0 stops at the row term; phase 1 turns its example's sum into dlogit.
        float dlogit = 0.0f;
        if (gated) {
            q = team_sum(q, bwd_scratch);
            if (phase == 0) {
                if (threadIdx.x == 0) {
                    gate_q[out_row] = q;
                }
                continue;  // team-uniform; the next branch starts with thread-local writes only
            }
            const float* qe = gate_q + (size_t)i * (size_t)per_branch + (size_t)example * (size_t)seq_len;
            dlogit = bwd_gate_dlogit(qe, xs, d, cols, seq_len, bwd_scratch);
            if (train && threadIdx.x == 0) {
                pk[lay.dlogit] = dlogit;
            }
        }
        // Gate, dropout and scaling: dup = s ⊙ dropout(g·du_g) into gs.
        float ds = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float du_s = bwd_dropout(w, c, gated ? gs[c] * w.g : gs[c]);
            const float dup = du_s * bwd_scale(w, c);
            gs[c] = dup;
            if (train) {
                pk[lay.dup + c] = dup;
                if (d.scaling_kind == ADAPTER_SCALING_CHANNEL) {
                    pk[lay.scaling + c] = du_s * ws[c];
                } else if (d.scaling_kind == ADAPTER_SCALING_LEARNED) {
                    ds = fmaf(du_s, ws[c], ds);
                }
            }
        }
        if (train && d.scaling_kind == ADAPTER_SCALING_LEARNED) {
            ds = team_sum(ds, bwd_scratch);
            if (threadIdx.x == 0) {
                pk[lay.scaling] = ds;
            }
        }
        team_sync();  // dup complete
        bwd_up_transposed(gs, pre, dpre, d, cols);
        team_sync();  // dpre complete; nobody reads dup any more
        if (train) {
            for (int j = threadIdx.x; j < m; j += blockDim.x) {
                pk[lay.act + j] = act[j];
                pk[lay.dpre + j] = dpre[j];
            }
        }
        // Down projection and LN_before: dx, only when someone reads it.
        if (inputs || (train && ln_before)) {
            const float* wd = desc_ptr(d.down_w);
            for (int c = threadIdx.x; c < cols; c += blockDim.x) {
                float acc = 0.0f;
                for (int j = 0; j < m; ++j) {
                    acc = fmaf(dpre[j], wd[(size_t)j * (size_t)cols + c], acc);
                }
                gs[c] = acc;
            }
            if (ln_before) {
                const float* gb = desc_ptr(d.ln_before_gamma);
                auto xhat = [&](int c) -> float { return (xs[c] - b_mean) * b_rstd; };
                float s1, s2;
                team_ln_backward_terms([&](int c) -> float { return gs[c] * gb[c]; }, xhat, cols, bwd_scratch, s1, s2);
                for (int c = threadIdx.x; c < cols; c += blockDim.x) {
                    const float dz = gs[c];
                    const float xh = xhat(c);
                    if (train) {
                        pk[lay.ln_before_gamma + c] = dz * xh;
                        pk[lay.ln_before_beta + c] = dz;
                    }
                    gs[c] = ln_backward_dx(b_rstd, dz * gb[c], xh, s1, s2);
                }
            }
            if (inputs) {
                const float* wg = desc_ptr(d.gate_w);
                for (int c = threadIdx.x; c < cols; c += blockDim.x) {
                    dxs[c] += gated ? fmaf(dlogit, wg[c], gs[c]) : gs[c];
                }
            }
        }
        // The next branch first writes shared memory thread-locally, then syncs before any
        // cross-column write (pre/act), so no barrier is needed here.
    }

    // Pre step backward: dv = LNback(dx) when the original LayerNorm comes first.
    if (!inputs) {
        return;
    }
    bwd_pre_step_row(dxs, hr, rr, ln_gamma, ln_first, pre_mean, pre_rstd, cols, bwd_scratch, [&](int c, float dv) {
        dhr[c] += dv;
        if (ln_first) {
            drr[c] += dv;
        }
    });
}

// dh, dr: [B·T, H] when replicate, else [N·B·T, H] (rows of branches outside branch_mask are not
// written); written only when need_input (else null). pack: the trainable branches' packs, in
// branch order, [B·T, width] each; null when train_mask is 0. gate_q: [N·B·T] (written in phase
// 0, read in phase 1; null without a gated branch). gate: [N·B] from adapter_location_gate_f32.
// d_out: [N·B·T, H]; h, r, ln_gamma, ln_beta, descs as for the forward. branch_mask: the branches
// to process (phase 0: the gated ones among them); train_mask ⊆ branch_mask. seed_buf, seed_lo,
// seed_hi: the dropout seed, as for the forward. Grid: one team per row (replicate: B·T teams;
// else popc(branch_mask)·B·T), the forward's plans up to ADAPTER_BWD_MAX_THREADS threads per block.
extern "C" __global__ __launch_bounds__(ADAPTER_BWD_MAX_THREADS, 1) void adapter_location_backward_f32(
    float* __restrict__ dh,
    float* __restrict__ dr,
    float* __restrict__ pack,
    float* __restrict__ gate_q,
    const float* __restrict__ gate,
    const float* __restrict__ d_out,
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
    int bottleneck_stride,
    unsigned branch_mask,
    unsigned train_mask,
    int need_input,
    int phase,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi)
{
    location_backward_team<float>(dh, dr, pack, gate_q, gate, d_out, h, r, ln_gamma, ln_beta, reinterpret_cast<const AdapterBranchDesc*>(descs),
                                  batch, seq_len, hidden, branches, replicate, ln_eps, bottleneck_stride, branch_mask, train_mask, need_input,
                                  phase, seed_buf, seed_lo, seed_hi);
}

// The gate means for the backward: adapter_location_gate_f32 for the (branch, example) slots of
// the branches in branch_mask only (a frozen branch's rows are not read when nothing needs them);
// the other slots are left as they are. Grid N·B, block (32, <=32).
extern "C" __global__ void adapter_location_backward_gate_f32(
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
    float ln_eps,
    unsigned branch_mask)
{
    if (((branch_mask >> (blockIdx.x / batch)) & 1u) == 0) {
        return;  // the whole block, before any barrier
    }
    location_gate_block<float>(gate, h, r, ln_gamma, ln_beta, reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden,
                               replicate, ln_eps);
}

// The gate means of adapter_location_backward_gate_f32 with h, r, γ and β in bf16 (the split
// backward's _bf16io path); the gate means stay f32.
extern "C" __global__ void adapter_location_backward_gate_bf16io(
    float* __restrict__ gate,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int replicate,
    float ln_eps,
    unsigned branch_mask)
{
    if (((branch_mask >> (blockIdx.x / batch)) & 1u) == 0) {
        return;  // the whole block, before any barrier
    }
    location_gate_block<bf16_raw, bf16_raw>(gate, reinterpret_cast<const bf16_raw*>(h), reinterpret_cast<const bf16_raw*>(r),
                                            reinterpret_cast<const bf16_raw*>(ln_gamma), reinterpret_cast<const bf16_raw*>(ln_beta),
                                            reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden, replicate, ln_eps);
}

// f16 twin of adapter_location_backward_gate_bf16io (f16_raw for bf16_raw).
extern "C" __global__ void adapter_location_backward_gate_f16io(
    float* __restrict__ gate,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int replicate,
    float ln_eps,
    unsigned branch_mask)
{
    if (((branch_mask >> (blockIdx.x / batch)) & 1u) == 0) {
        return;  // the whole block, before any barrier
    }
    location_gate_block<f16_raw, f16_raw>(gate, reinterpret_cast<const f16_raw*>(h), reinterpret_cast<const f16_raw*>(r),
                                          reinterpret_cast<const f16_raw*>(ln_gamma), reinterpret_cast<const f16_raw*>(ln_beta),
                                          reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden, replicate, ln_eps);
}

// ---- split backward ---------------------------------------------------------------------------------
//
// The split path's backward (cuda::adapter::adapter_location_backward_split): the gradient of
// adapter_location_forward_* in a few row kernels with every bottleneck product on GEMMs (cuBLASLt
// on a GPU) instead of CUDA cores in every row team. The same semantics, outputs and dropout masks
// as adapter_location_backward_f32 (whose header derives the formulas); launches, in order:
//     gate    adapter_location_backward_gate_*   the gate means of the gated branches (as fused)
//     pre     adapter_split_bwd_pre_*            z0[row] = LN_before(x) (f32); the pre step's
//                                                statistics when ρ = x needs them
//     per branch: GEMM pre = z0·W_dᵀ + b_d; adapter_split_act_f32 a = act(pre);
//                 GEMM up = a·W_uᵀ + b_u
//                 (with the tensor-core forward, SplitForward::TensorCores, the pre kernel and
//                 these are adapter_split_bwd_pre_down_* and adapter_split_bwd_up_* instead: the
//                 forward's arithmetic, so pre, a and up are its values bit for bit, and z0 holds
//                 the rounded z the down product multiplied)
//     post    adapter_split_bwd_post_*           recomputes the post step from up, h, r; walks it
//                                                back to dup = s ⊙ dropout(g·du_g) (over up, in
//                                                place), the residual's gradient dρ, the post
//                                                step's dr term, the gate's row term q, and the
//                                                per-row terms of the LN_after and scaling grads
//     per branch: GEMMs dW_up = dupᵀ·a, da = dup·W_u; adapter_split_act_bwd_f32 dpre = da ⊙
//                 act'(pre); GEMMs dW_down = dpreᵀ·z0, dz0 = dpre·W_d (over z0); column sums
//                 (column_sums_*) db_up, db_down
//     input   adapter_split_bwd_input_*          LN_before backward (its per-row terms), the
//                                                gate's dlogit (sum of q over the example), dx,
//                                                the pre step backward; dh and dr stored once
//     then the column sums of the per-row terms (LN γ/β, scaling, gate bias) and dW_gate = xᵀ·dlogit.
// Frozen branches get no parameter work; without input gradients only the trainable branches'
// rows are launched (`branch_mask`), and a frozen branch's weights are then never read.
//
// Rows: row = branch·B·T + local as in the forward; every workspace array is indexed by that row
// (f32, [N·B·T, H] or [N·B·T]), so branch i's GEMMs read and write rows [i·B·T, (i+1)·B·T). The
// teams of the pre and post kernels (and of the input kernel without replication or without input
// gradients) own one row of one branch in `branch_mask` (team k → the branch of the k / (B·T)-th
// set bit); with replication and input gradients the input kernel's team owns one shared input
// row and walks the branches in order, summing their input gradients in shared memory, so dh and
// dr are written once per element (no atomics; bitwise reproducible).
//
// Thread mapping: the forward's row teams (cuda::adapter::LocationPlan); every column is read and
// written by the thread that owns it (c = threadIdx.x + k·blockDim.x), so the only barriers are in
// team_sum and after the staging. Shared memory per team: pre H floats (z0), post 2H (u_d, then y
// / the gradient), input 4H (x, dx, dh, dr) when a team sums several branches, else 2H (x, dx: dh
// and dr are formed at the store from the branch's rows, so twice the teams fit an SM); with `stage` (cuda::adapter::RowStaging) each also
// holds copies of the global rows it reads more than once (see "row staging": pre and input h, r;
// post up, h, r, d_out), read once with wide loads. The input kernel reads its per-branch f32
// rows (dz0, dρ, the dr term) once, TEAM_COL_BATCH columns a thread per batch of loads.
//
// Numerics: f32 throughout with the forward's device functions and the fused backward's formulas
// (LayerNorm backward rstd·(γ·dy − mean(γ·dy) − x̂·mean(γ·dy·x̂))); the products sum in the GEMM's
// order, so results differ from the fused kernel's by rounding only. The dropout is the forward's
// adapter_dropout (the same Philox word for element local·H + c of the branch's block), applied to
// the gradient that flows back through it. Storage: _f32 (everything f32) and _bf16io (h, r,
// d_out, dh, dr and the BERT LayerNorm's γ, β in bf16, widened exactly on load, dh and dr rounded
// once on store; every workspace array, weight and weight gradient f32, so the GEMMs are the f32
// pipeline's on the f32 z0, as in the split forward); _f16io likewise with f16 in place of bf16.

// The team's row for a grid over the rows of the branches in `mask` (in branch order): false
// when the team is past the end (the whole team leaves; block barriers only occur with one team
// per block).
__device__ __forceinline__ bool split_bwd_team(unsigned mask, int per_branch, int& branch, int& local) {
    const int team = blockIdx.x * blockDim.y + threadIdx.y;
    const int k = team / per_branch;
    if (k >= __popc(mask)) {
        return false;
    }
    branch = adapter_nth_branch(mask, k);
    local = team - k * per_branch;
    return true;
}

// z0: [N·B·T, H] f32 (rows of branches in branch_mask written); stats: [N·B·T, 2] or null.
template <typename T, typename P>
__device__ __forceinline__ void split_bwd_pre_team(float* __restrict__ z0, float* __restrict__ stats, const T* __restrict__ h,
                                                   const T* __restrict__ r, const P* __restrict__ ln_gamma, const P* __restrict__ ln_beta,
                                                   const AdapterBranchDesc* __restrict__ descs, int batch, int seq_len, int cols,
                                                   int replicate, float ln_eps, unsigned branch_mask, int stage) {
    __shared__ float scratch[32];
    const int per_branch = batch * seq_len;
    int branch, local;
    if (!split_bwd_team(branch_mask, per_branch, branch, local)) {
        return;
    }
    const size_t row = (size_t)branch * (size_t)per_branch + (size_t)local;
    const size_t src = (replicate ? (size_t)local : row) * (size_t)cols;
    float* xs;  // the split forward pre kernel's layout (split_team_rows)
    const T* hr = h + src;
    const T* rr = r + src;
    split_team_rows(cols, stage, xs, hr, rr);
    float pre_mean, pre_rstd;
    location_pre_row(xs, hr, rr, ln_gamma, ln_beta, descs[branch], cols, ln_eps, scratch, pre_mean, pre_rstd);
    float* zr = z0 + row * (size_t)cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        zr[c] = xs[c];
    }
    if (stats != nullptr && threadIdx.x == 0) {
        stats[2 * row] = pre_mean;
        stats[2 * row + 1] = pre_rstd;
    }
}

// up_dup: [N·B·T, H] f32, up = a·W_uᵀ + b_u on entry, dup = s ⊙ dropout(g·du_g) on return (each
// element read, then overwritten, by the thread that owns it). Outputs (null when absent):
// rho_grad [N·B·T, H] dρ and r_grad [N·B·T, H] the post step's dr term (input gradients only);
// la_gamma, la_beta [N·B·T, H] dy ⊙ x̂ and dy of LN_after, scale_ch [N·B·T, H] du_s ⊙ up (channel
// scaling), scale_l [N·B·T] Σ_c du_s ⊙ up (learned), for the trainable branches (train_mask);
// gate_q [N·B·T] Σ_c du_g ⊙ u_d (gated branches). gate: [N·B] the gate means; stats: the pre
// kernel's, or null when ρ does not need them; d_out [N·B·T, H]; the rest as for the forward.
template <typename T, typename P>
__device__ __forceinline__ void split_bwd_post_team(
    float* up_dup, float* __restrict__ rho_grad, float* __restrict__ r_grad, float* __restrict__ la_gamma, float* __restrict__ la_beta,
    float* __restrict__ scale_ch, float* __restrict__ scale_l, float* __restrict__ gate_q, const float* __restrict__ stats,
    const float* __restrict__ gate, const T* __restrict__ d_out, const T* __restrict__ h, const T* __restrict__ r,
    const P* __restrict__ ln_gamma, const P* __restrict__ ln_beta, const AdapterBranchDesc* __restrict__ descs, int batch, int seq_len,
    int cols, int replicate, float ln_eps, unsigned branch_mask, unsigned train_mask, const unsigned* __restrict__ seed_buf,
    unsigned seed_lo, unsigned seed_hi, int stage) {
    extern __shared__ float adapter_split_bwd_smem[];  // per team: u_d, y / dy (f32); staged: up (f32), h, r, d_out (T)
    __shared__ float scratch[32];
    const int per_branch = batch * seq_len;
    int branch, local;
    if (!split_bwd_team(branch_mask, per_branch, branch, local)) {
        return;
    }
    const AdapterBranchDesc& d = descs[branch];
    const size_t row = (size_t)branch * (size_t)per_branch + (size_t)local;
    const size_t src = (replicate ? (size_t)local : row) * (size_t)cols;
    const size_t dst = row * (size_t)cols;
    // The team's regions (split_backward_team_bytes in the launcher): u_d and y / dy, then, when
    // staging, copies of the rows of up, h, r and d_out.
    const int f32_bytes = stage_region_bytes(cols, sizeof(float));
    const int t_bytes = stage_region_bytes(cols, sizeof(T));
    const int team_bytes = stage ? 3 * f32_bytes + 3 * t_bytes : 2 * f32_bytes;
    char* team_smem = reinterpret_cast<char*>(adapter_split_bwd_smem) + (size_t)threadIdx.y * (size_t)team_bytes;
    float* ud = reinterpret_cast<float*>(team_smem);
    float* gs = reinterpret_cast<float*>(team_smem + f32_bytes);
    const T* hr = h + src;
    const T* rr = r + src;
    const T* dor = d_out + dst;
    const float* up_in = up_dup + dst;
    float* ur = up_dup + dst;  // dup's destination (up is read first, by the thread that writes it)
    if (stage) {
        float* up_s = reinterpret_cast<float*>(team_smem + 2 * f32_bytes);
        team_stage_row(up_s, up_in, cols);
        T* d_s = reinterpret_cast<T*>(team_stage_h_r(team_smem + 3 * f32_bytes, cols, hr, rr));
        team_stage_row(d_s, dor, cols);
        team_sync();
        up_in = up_s;
        dor = d_s;
    }
    const bool train = ((train_mask >> branch) & 1u) != 0;
    const bool gated = d.gate_w != 0;
    const bool ln_first = d.original_ln_before != 0;
    const bool post = d.original_ln_after != 0;
    const bool ln_after = d.ln_after_gamma != 0;
    const bool residual_first = d.adapter_residual_before_ln != 0;
    const float pre_mean = stats != nullptr ? stats[2 * row] : 0.0f;
    const float pre_rstd = stats != nullptr ? stats[2 * row + 1] : 0.0f;
    const float s_uniform = adapter_uniform_scaling(d);
    const float g = gated ? gate[branch * batch + local / seq_len] : 1.0f;
    const PhiloxKey key = philox_key(seed_buf, seed_lo, seed_hi);
    const unsigned long long drop_row = (unsigned long long)local * (unsigned long long)cols;  // in the branch's block
    const float* ga = desc_ptr(d.ln_after_gamma);
    const float* ba = desc_ptr(d.ln_after_beta);

    // ---- forward again: u_d = dropout(s ⊙ up) into ud (the forward's epilogue without the gate)
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        ud[c] = adapter_up_epilogue(up_in[c], d, c, s_uniform, key, drop_row, 1.0f);
    }
    // ρ at column c, and the input of LN_after (u_g, plus ρ when the adapter residual comes first).
    auto rho = [&](int c) -> float {
        if (d.residual_before_ln == ADAPTER_RESIDUAL_H) {
            return load_f32(hr, c);
        }
        if (d.residual_before_ln == ADAPTER_RESIDUAL_X) {
            return pre_step_x(hr, rr, ln_gamma, ln_beta, c, ln_first, pre_mean, pre_rstd);
        }
        return load_f32(hr, c) + load_f32(rr, c);
    };
    auto u_g = [&](int c) -> float { return gated ? ud[c] * g : ud[c]; };
    auto ln_after_input = [&](int c) -> float {
        const float u = u_g(c);
        return residual_first ? u + rho(c) : u;
    };
    float a_mean = 0.0f, a_rstd = 0.0f;
    if (ln_after) {
        team_row_stats(ln_after_input, cols, d.ln_after_eps, scratch, a_mean, a_rstd);
    }
    bwd_post_input_row(gs, u_g, ln_after_input, rho, rr, ga, ba, ln_after, residual_first, post, a_mean, a_rstd, cols);

    // ---- backward ----
    // Post step: dy = LNback(d_out) into gs (the dr term), or d_out.
    float* rg = r_grad != nullptr ? r_grad + dst : nullptr;
    bwd_post_step_row(gs, dor, ln_gamma, post, cols, ln_eps, scratch, [&](int c, float dz) {
        if (rg != nullptr) {
            rg[c] = dz;
        }
    });
    // LN_after and the adapter residual: du_g into gs; dρ out.
    float* rho_r = rho_grad != nullptr ? rho_grad + dst : nullptr;
    const bool pack_la = train && ln_after;
    float q = 0.0f;  // Σ_c du_g·u_d, the gate's row term
    bwd_ln_after_row(gs, ln_after_input, ga, ln_after, residual_first, a_mean, a_rstd, cols, scratch,
                     [&](int c, float dy, float xh, float du, float drho) {
        if (pack_la) {
            la_gamma[dst + c] = dy * xh;
            la_beta[dst + c] = dy;
        }
        if (gated) {
            q = fmaf(du, ud[c], q);
        }
        if (rho_r != nullptr) {
            rho_r[c] = drho;
        }
    });
    if (gated) {
        q = team_sum(q, scratch);
        if (threadIdx.x == 0) {
            gate_q[row] = q;
        }
    }
    // Gate, dropout and scaling: dup = s ⊙ dropout(g·du_g), over up.
    const bool pack_ch = train && d.scaling_kind == ADAPTER_SCALING_CHANNEL;
    const bool pack_l = train && d.scaling_kind == ADAPTER_SCALING_LEARNED;
    float ds = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float du_g = gated ? gs[c] * g : gs[c];
        const float du_s = d.dropout_threshold != 0 ? adapter_dropout(du_g, d, key, drop_row + (unsigned long long)c) : du_g;
        const float up = up_in[c];
        const float s = d.scaling_kind == ADAPTER_SCALING_CHANNEL ? desc_ptr(d.scaling)[c] : s_uniform;
        ur[c] = du_s * s;
        if (pack_ch) {
            scale_ch[dst + c] = du_s * up;
        } else if (pack_l) {
            ds = fmaf(du_s, up, ds);
        }
    }
    if (pack_l) {
        ds = team_sum(ds, scratch);
        if (threadIdx.x == 0) {
            scale_l[row] = ds;
        }
    }
}

// The input-gradient side. dh, dr: [B·T, H] (replicate) or [N·B·T, H] of T, null without input
// gradients (need_input 0). dz0: [N·B·T, H] f32, dpre·W_d of the branches whose rows are processed
// (null when no branch reads it); rho_grad, r_grad, gate_q: the post kernel's. Outputs for the
// trainable branches (null when absent): lb_gamma, lb_beta [N·B·T, H] dz0 ⊙ x̂ and dz0 of
// LN_before; gate_x [N·B·T, H] the gate's input x and dlogit [N·B·T] (gated). branch_mask: the
// branches processed (with input gradients every branch; else the trainable ones with LN_before
// or a gate). Teams: one per input row walking the branches when replicate && need_input, else one
// per row of a branch in branch_mask.
template <typename T, typename P>
__device__ __forceinline__ void split_bwd_input_team(
    T* __restrict__ dh, T* __restrict__ dr, float* __restrict__ lb_gamma, float* __restrict__ lb_beta, float* __restrict__ gate_x,
    float* __restrict__ dlogit_out, const float* __restrict__ dz0, const float* __restrict__ rho_grad, const float* __restrict__ r_grad,
    const float* __restrict__ gate_q, const T* __restrict__ h, const T* __restrict__ r, const P* __restrict__ ln_gamma,
    const P* __restrict__ ln_beta, const AdapterBranchDesc* __restrict__ descs, int batch, int seq_len, int cols, int branches,
    int replicate, float ln_eps, unsigned branch_mask, unsigned train_mask, int need_input, int stage) {
    extern __shared__ float adapter_split_bwd_smem[];  // per team: x, dx, dh, dr (f32); staged: h, r (T)
    __shared__ float scratch[32];
    const int per_branch = batch * seq_len;
    const bool inputs = need_input != 0;
    int local, first, last;
    if (replicate && inputs) {
        local = blockIdx.x * blockDim.y + threadIdx.y;
        if (local >= per_branch) {
            return;
        }
        first = 0;
        last = branches;
    } else {
        if (!split_bwd_team(branch_mask, per_branch, first, local)) {
            return;
        }
        last = first + 1;
    }
    const size_t src = (size_t)(replicate ? local : first * per_branch + local) * (size_t)cols;
    const T* hr = h + src;
    const T* rr = r + src;
    // A team that sums several branches' input gradients (replication with input gradients)
    // accumulates dh and dr in shared memory; a team of one branch forms them at the store from
    // that branch's dρ and dr-term rows (the same sums, 0 + each term, in the same order), so its
    // shared memory is x and dx only: more teams an SM.
    const bool sums_branches = replicate && inputs;
    const int f32_rows = sums_branches ? 4 : 2;
    // The team's regions (split_backward_input_team_bytes in the launcher).
    const int f32_bytes = stage_region_bytes(cols, sizeof(float));
    const int t_bytes = stage_region_bytes(cols, sizeof(T));
    char* team_smem = reinterpret_cast<char*>(adapter_split_bwd_smem) + (size_t)threadIdx.y * (size_t)(f32_rows * f32_bytes + (stage ? 2 * t_bytes : 0));
    float* xs = reinterpret_cast<float*>(team_smem);
    float* dxs = reinterpret_cast<float*>(team_smem + f32_bytes);
    float* dhs = sums_branches ? reinterpret_cast<float*>(team_smem + 2 * f32_bytes) : nullptr;
    float* drs = sums_branches ? reinterpret_cast<float*>(team_smem + 3 * f32_bytes) : nullptr;
    if (stage) {
        team_stage_h_r(team_smem + f32_rows * f32_bytes, cols, hr, rr);
        team_sync();
    }
    const bool ln_first = descs[0].original_ln_before != 0;  // the location's, in every descriptor
    const bool post = descs[0].original_ln_after != 0;
    const int residual = descs[0].residual_before_ln;

    // Pre step: x into xs (the forward's arithmetic); the accumulators start at zero.
    float pre_mean, pre_rstd;
    pre_step_row(xs, hr, rr, ln_gamma, ln_beta, ln_first, cols, ln_eps, scratch, pre_mean, pre_rstd);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        dxs[c] = 0.0f;
        if (sums_branches) {
            dhs[c] = 0.0f;
            drs[c] = 0.0f;
        }
    }

    for (int i = first; i < last; ++i) {
        if (((branch_mask >> i) & 1u) == 0) {
            continue;  // team-uniform
        }
        const AdapterBranchDesc& d = descs[i];
        const bool train = ((train_mask >> i) & 1u) != 0;
        const bool gated = d.gate_w != 0;
        const bool ln_before = d.ln_before_gamma != 0;
        const size_t row = (size_t)i * (size_t)per_branch + (size_t)local;
        const size_t dst = row * (size_t)cols;
        const int example = local / seq_len;
        // LN_before backward: dz0 → dx_i (and the per-row terms of its γ, β).
        float b_mean = 0.0f, b_rstd = 0.0f, s1 = 0.0f, s2 = 0.0f;
        const float* gb = desc_ptr(d.ln_before_gamma);
        const float* dzr = dz0 != nullptr ? dz0 + dst : nullptr;
        auto xhat = [&](int c) -> float { return (xs[c] - b_mean) * b_rstd; };
        if (ln_before) {
            team_row_stats(row_at(xs), cols, d.ln_before_eps, scratch, b_mean, b_rstd);
            team_ln_backward_terms([&](int c) -> float { return dzr[c] * gb[c]; }, xhat, cols, scratch, s1, s2);
        }
        // The gate: dlogit = (Σ_t q of the example) / T · σ'(x·w_g + b_g).
        float dlogit = 0.0f;
        const float* wg = desc_ptr(d.gate_w);
        if (gated) {
            const float* qe = gate_q + (size_t)i * (size_t)per_branch + (size_t)example * (size_t)seq_len;
            dlogit = bwd_gate_dlogit(qe, xs, d, cols, seq_len, scratch);
            if (train && threadIdx.x == 0) {
                dlogit_out[row] = dlogit;
            }
        }
        const bool pack_lb = train && ln_before;
        const bool pack_x = train && gated;
        const float* rho_r = rho_grad != nullptr ? rho_grad + dst : nullptr;
        const float* r_r = r_grad != nullptr ? r_grad + dst : nullptr;
        const bool read_dz = ln_before || inputs;
        const bool read_r = inputs && post;
        // The branch's global f32 rows (dz0, dρ, the dr term) of column c, loaded TEAM_COL_BATCH
        // columns a thread at a time (team_cols_batched): they are read once, so not staged.
        struct BranchRows {
            float dz, drho, dr;
        };
        auto branch_rows = [&](int c) {
            return BranchRows{read_dz ? dzr[c] : 0.0f, inputs ? rho_r[c] : 0.0f, read_r ? r_r[c] : 0.0f};
        };
        team_cols_batched(cols, branch_rows, [&](int c, const BranchRows& v) {
            float dx = 0.0f;
            if (ln_before) {
                const float xh = xhat(c);
                if (pack_lb) {
                    lb_gamma[dst + c] = v.dz * xh;
                    lb_beta[dst + c] = v.dz;
                }
                dx = ln_backward_dx(b_rstd, v.dz * gb[c], xh, s1, s2);
            } else if (inputs) {
                dx = v.dz;
            }
            if (pack_x) {
                gate_x[dst + c] = xs[c];
            }
            if (inputs) {
                if (gated) {
                    dx = fmaf(dlogit, wg[c], dx);
                }
                if (residual == ADAPTER_RESIDUAL_X) {
                    dx += v.drho;
                } else if (sums_branches) {
                    dhs[c] += v.drho;
                    if (residual == ADAPTER_RESIDUAL_V) {
                        drs[c] += v.drho;
                    }
                }
                if (post && sums_branches) {
                    drs[c] += v.dr;
                }
                dxs[c] += dx;
            }
        });
    }
    if (!inputs) {
        return;
    }
    // Pre step backward: dv = LNback(dx) when the original LayerNorm comes first; dh and dr
    // stored once.
    T* dhr = dh + src;
    T* drr = dr + src;
    // The one branch's rows (single-branch teams): its dρ and dr-term, read again here.
    const size_t own = ((size_t)first * (size_t)per_branch + (size_t)local) * (size_t)cols;
    const float* rho_own = rho_grad != nullptr ? rho_grad + own : nullptr;
    const float* r_own = r_grad != nullptr ? r_grad + own : nullptr;
    bwd_pre_step_row(dxs, hr, rr, ln_gamma, ln_first, pre_mean, pre_rstd, cols, scratch, [&](int c, float dv) {
        float dh_sum, dr_sum;
        if (sums_branches) {
            dh_sum = dhs[c];
            dr_sum = drs[c];
        } else {
            // The accumulation above for one branch: 0 + dρ (for ρ ≠ x), 0 (+ dρ for ρ = v)
            // (+ the dr term after the original LayerNorm).
            const float drho = residual != ADAPTER_RESIDUAL_X ? rho_own[c] : 0.0f;
            dh_sum = residual != ADAPTER_RESIDUAL_X ? 0.0f + drho : 0.0f;
            dr_sum = residual == ADAPTER_RESIDUAL_V ? 0.0f + drho : 0.0f;
            if (post) {
                dr_sum += r_own[c];
            }
        }
        store_f32(dhr, c, dh_sum + dv);
        store_f32(drr, c, ln_first ? dr_sum + dv : dr_sum);
    });
}

// Grid: one team per row of the branches in branch_mask; block and shared memory (the row buffer
// and, with `stage`, the staged h and r rows) as the split forward's pre kernel.
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_split_bwd_pre_f32(
    float* __restrict__ z0,
    float* __restrict__ stats,
    const float* __restrict__ h,
    const float* __restrict__ r,
    const float* __restrict__ ln_gamma,
    const float* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int replicate,
    float ln_eps,
    unsigned branch_mask,
    int stage)
{
    split_bwd_pre_team<float, float>(z0, stats, h, r, ln_gamma, ln_beta, reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden,
                                     replicate, ln_eps, branch_mask, stage);
}

// As adapter_split_bwd_pre_f32 with h, r, γ and β in bf16 (z0 and the statistics stay f32).
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_split_bwd_pre_bf16io(
    float* __restrict__ z0,
    float* __restrict__ stats,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int replicate,
    float ln_eps,
    unsigned branch_mask,
    int stage)
{
    split_bwd_pre_team<bf16_raw, bf16_raw>(z0, stats, reinterpret_cast<const bf16_raw*>(h), reinterpret_cast<const bf16_raw*>(r),
                                           reinterpret_cast<const bf16_raw*>(ln_gamma), reinterpret_cast<const bf16_raw*>(ln_beta),
                                           reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden, replicate, ln_eps,
                                           branch_mask, stage);
}

// f16 twin of adapter_split_bwd_pre_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_split_bwd_pre_f16io(
    float* __restrict__ z0,
    float* __restrict__ stats,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int replicate,
    float ln_eps,
    unsigned branch_mask,
    int stage)
{
    split_bwd_pre_team<f16_raw, f16_raw>(z0, stats, reinterpret_cast<const f16_raw*>(h), reinterpret_cast<const f16_raw*>(r),
                                         reinterpret_cast<const f16_raw*>(ln_gamma), reinterpret_cast<const f16_raw*>(ln_beta),
                                         reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden, replicate, ln_eps,
                                         branch_mask, stage);
}

// Grid as the pre kernel. Shared memory per team (split_backward_team_bytes): u_d and y / dy, two
// f32 rows; with `stage` also the staged rows of up (f32), h, r and d_out (T), each region rounded
// up to 16 bytes.
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_split_bwd_post_f32(
    float* up_dup,
    float* __restrict__ rho_grad,
    float* __restrict__ r_grad,
    float* __restrict__ la_gamma,
    float* __restrict__ la_beta,
    float* __restrict__ scale_ch,
    float* __restrict__ scale_l,
    float* __restrict__ gate_q,
    const float* __restrict__ stats,
    const float* __restrict__ gate,
    const float* __restrict__ d_out,
    const float* __restrict__ h,
    const float* __restrict__ r,
    const float* __restrict__ ln_gamma,
    const float* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int replicate,
    float ln_eps,
    unsigned branch_mask,
    unsigned train_mask,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    int stage)
{
    split_bwd_post_team<float, float>(up_dup, rho_grad, r_grad, la_gamma, la_beta, scale_ch, scale_l, gate_q, stats, gate, d_out, h, r, ln_gamma,
                                      ln_beta, reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden, replicate, ln_eps,
                                      branch_mask, train_mask, seed_buf, seed_lo, seed_hi, stage);
}

// As adapter_split_bwd_post_f32 with d_out, h, r, γ and β in bf16.
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_split_bwd_post_bf16io(
    float* up_dup,
    float* __restrict__ rho_grad,
    float* __restrict__ r_grad,
    float* __restrict__ la_gamma,
    float* __restrict__ la_beta,
    float* __restrict__ scale_ch,
    float* __restrict__ scale_l,
    float* __restrict__ gate_q,
    const float* __restrict__ stats,
    const float* __restrict__ gate,
    const unsigned short* __restrict__ d_out,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int replicate,
    float ln_eps,
    unsigned branch_mask,
    unsigned train_mask,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    int stage)
{
    split_bwd_post_team<bf16_raw, bf16_raw>(up_dup, rho_grad, r_grad, la_gamma, la_beta, scale_ch, scale_l, gate_q, stats, gate,
                                            reinterpret_cast<const bf16_raw*>(d_out), reinterpret_cast<const bf16_raw*>(h),
                                            reinterpret_cast<const bf16_raw*>(r), reinterpret_cast<const bf16_raw*>(ln_gamma),
                                            reinterpret_cast<const bf16_raw*>(ln_beta), reinterpret_cast<const AdapterBranchDesc*>(descs), batch,
                                            seq_len, hidden, replicate, ln_eps, branch_mask, train_mask, seed_buf, seed_lo, seed_hi, stage);
}

// f16 twin of adapter_split_bwd_post_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_split_bwd_post_f16io(
    float* up_dup,
    float* __restrict__ rho_grad,
    float* __restrict__ r_grad,
    float* __restrict__ la_gamma,
    float* __restrict__ la_beta,
    float* __restrict__ scale_ch,
    float* __restrict__ scale_l,
    float* __restrict__ gate_q,
    const float* __restrict__ stats,
    const float* __restrict__ gate,
    const unsigned short* __restrict__ d_out,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int replicate,
    float ln_eps,
    unsigned branch_mask,
    unsigned train_mask,
    const unsigned* __restrict__ seed_buf,
    unsigned seed_lo,
    unsigned seed_hi,
    int stage)
{
    split_bwd_post_team<f16_raw, f16_raw>(up_dup, rho_grad, r_grad, la_gamma, la_beta, scale_ch, scale_l, gate_q, stats, gate,
                                          reinterpret_cast<const f16_raw*>(d_out), reinterpret_cast<const f16_raw*>(h),
                                          reinterpret_cast<const f16_raw*>(r), reinterpret_cast<const f16_raw*>(ln_gamma),
                                          reinterpret_cast<const f16_raw*>(ln_beta), reinterpret_cast<const AdapterBranchDesc*>(descs), batch,
                                          seq_len, hidden, replicate, ln_eps, branch_mask, train_mask, seed_buf, seed_lo, seed_hi, stage);
}

// Grid: B·T teams when replicate && need_input, else one per row of the branches in branch_mask.
// Shared memory per team (split_backward_team_bytes): x, dx, dh, dr (f32 rows) and, with `stage`,
// the staged h and r rows (T), each region rounded up to 16 bytes.
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_split_bwd_input_f32(
    float* __restrict__ dh,
    float* __restrict__ dr,
    float* __restrict__ lb_gamma,
    float* __restrict__ lb_beta,
    float* __restrict__ gate_x,
    float* __restrict__ dlogit,
    const float* __restrict__ dz0,
    const float* __restrict__ rho_grad,
    const float* __restrict__ r_grad,
    const float* __restrict__ gate_q,
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
    unsigned branch_mask,
    unsigned train_mask,
    int need_input,
    int stage)
{
    split_bwd_input_team<float, float>(dh, dr, lb_gamma, lb_beta, gate_x, dlogit, dz0, rho_grad, r_grad, gate_q, h, r, ln_gamma, ln_beta,
                                       reinterpret_cast<const AdapterBranchDesc*>(descs), batch, seq_len, hidden, branches, replicate, ln_eps,
                                       branch_mask, train_mask, need_input, stage);
}

// As adapter_split_bwd_input_f32 with dh, dr, h, r, γ and β in bf16 (dh, dr rounded once).
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_split_bwd_input_bf16io(
    unsigned short* __restrict__ dh,
    unsigned short* __restrict__ dr,
    float* __restrict__ lb_gamma,
    float* __restrict__ lb_beta,
    float* __restrict__ gate_x,
    float* __restrict__ dlogit,
    const float* __restrict__ dz0,
    const float* __restrict__ rho_grad,
    const float* __restrict__ r_grad,
    const float* __restrict__ gate_q,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int branches,
    int replicate,
    float ln_eps,
    unsigned branch_mask,
    unsigned train_mask,
    int need_input,
    int stage)
{
    split_bwd_input_team<bf16_raw, bf16_raw>(reinterpret_cast<bf16_raw*>(dh), reinterpret_cast<bf16_raw*>(dr), lb_gamma, lb_beta, gate_x, dlogit,
                                             dz0, rho_grad, r_grad, gate_q, reinterpret_cast<const bf16_raw*>(h),
                                             reinterpret_cast<const bf16_raw*>(r), reinterpret_cast<const bf16_raw*>(ln_gamma),
                                             reinterpret_cast<const bf16_raw*>(ln_beta), reinterpret_cast<const AdapterBranchDesc*>(descs), batch,
                                             seq_len, hidden, branches, replicate, ln_eps, branch_mask, train_mask, need_input, stage);
}

// f16 twin of adapter_split_bwd_input_bf16io (f16_raw for bf16_raw).
extern "C" __global__ __launch_bounds__(ADAPTER_FWD_MAX_THREADS, 1) void adapter_split_bwd_input_f16io(
    unsigned short* __restrict__ dh,
    unsigned short* __restrict__ dr,
    float* __restrict__ lb_gamma,
    float* __restrict__ lb_beta,
    float* __restrict__ gate_x,
    float* __restrict__ dlogit,
    const float* __restrict__ dz0,
    const float* __restrict__ rho_grad,
    const float* __restrict__ r_grad,
    const float* __restrict__ gate_q,
    const unsigned short* __restrict__ h,
    const unsigned short* __restrict__ r,
    const unsigned short* __restrict__ ln_gamma,
    const unsigned short* __restrict__ ln_beta,
    const unsigned long long* __restrict__ descs,
    int batch,
    int seq_len,
    int hidden,
    int branches,
    int replicate,
    float ln_eps,
    unsigned branch_mask,
    unsigned train_mask,
    int need_input,
    int stage)
{
    split_bwd_input_team<f16_raw, f16_raw>(reinterpret_cast<f16_raw*>(dh), reinterpret_cast<f16_raw*>(dr), lb_gamma, lb_beta, gate_x, dlogit,
                                           dz0, rho_grad, r_grad, gate_q, reinterpret_cast<const f16_raw*>(h),
                                           reinterpret_cast<const f16_raw*>(r), reinterpret_cast<const f16_raw*>(ln_gamma),
                                           reinterpret_cast<const f16_raw*>(ln_beta), reinterpret_cast<const AdapterBranchDesc*>(descs), batch,
                                           seq_len, hidden, branches, replicate, ln_eps, branch_mask, train_mask, need_input, stage);
}

// a[i] = act(pre[i]) over a branch's [rows, m] down product (pre = z0·W_dᵀ + b_d from the GEMM's
// bias epilogue; both are kept: the backward needs pre for act'). A grid-stride loop.
extern "C" __global__ void adapter_split_act_f32(
    float* __restrict__ a,
    const float* __restrict__ pre,
    long long n,
    int act)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        a[i] = adapter_activation(act, pre[i]);
    }
}

// d[i] = d[i] · act'(pre[i]) in place: dpre from da = dup·W_u, the fused kernel's act' (in
// place: each element read, then written, by one thread). A grid-stride loop.
extern "C" __global__ void adapter_split_act_bwd_f32(
    float* d,
    const float* __restrict__ pre,
    long long n,
    int act)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        d[i] = d[i] * adapter_activation_grad(act, pre[i]);
    }
}
