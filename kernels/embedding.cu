// Embedding family: BERT's (and RoBERTa's) embedding gather + sum + LayerNorm in one kernel.
//
// Semantics (the spec is bert_adapters::cpu::reference::{embedding, residual_layernorm}; HF
// `BertEmbeddings.forward` / `RobertaEmbeddings.forward` before their dropout):
//     z[row] = (word[id] + token_type[tt]) + position[p]   row = b*seq_len + t, HF's add order,
//                                                          each add rounded to f32
//     y[row] = LayerNorm(z[row]) * gamma + beta             as kernels/layernorm.cu: two-pass
//                                                          mean, biased variance, eps inside sqrt
// mean and rstd are written per row when the pointers are non-null.
//
// Positions (config::Positions): with padding_idx < 0 (BERT) p = t. With padding_idx >= 0
// (RoBERTa, HF `create_position_ids_from_input_ids`) p = padding_idx when id == padding_idx, else
// padding_idx + (the number of ids != padding_idx among ids[b, 0..=t]): the team counts them, each
// thread a strided share of the prefix, summed with team_sum (exact: counts < 2^24 in f32). The
// launcher checks that padding_idx + 1 + seq_len rows fit the table, so p is always in range.
//
// Storage: mean and rstd are f32. The three tables, gamma and beta are all f32
// (embedding_layernorm_forward_f32) or all bf16 (embedding_layernorm_forward_bf16: a frozen base
// loaded in bf16), read through common.cuh's load_f32, which widens bf16 exactly; the sums and
// statistics are f32 either way, so the bf16 kernel equals the f32 kernel on the widened tables.
// y is f32 in both; embedding_layernorm_forward_bf16io stores it in bf16 (bf16 tables, gamma and
// beta): the same f32 arithmetic (z is never rounded to bf16), y rounded once to nearest even, so
// its y is the f32 kernel's y on the widened tables rounded once and its mean and rstd are the f32
// kernel's bit for bit; a bad token's row is bf16 NaN (0x7fff).
// embedding_layernorm_forward_f16 and _f16io are the same for an f16 base (f16 tables, gamma and
// beta; y f32 or f16, a bad row's f16 NaN also 0x7fff).
// All five are thin extern "C" wrappers over one templated body.
//
// Out-of-range ids: ids live on the device, so the launcher cannot check them. A thread that reads
// an id >= its table's size does not touch the table (it gathers row 0 instead, keeping every
// load in bounds), its row's outputs become NaN, and the team's lane 0 records the token in
// `error_flag` (one unsigned long long, zero before the launch) with atomicMax on the key
//     (0xffff - b) << 48 | (0x7fff - t) << 33 | is_word_id << 32 | id
// so the flag ends up naming the first bad token in (b, t) order, its word id before its type id:
// the same answer whatever order blocks run in. The launcher bounds b < 65535 and t < 32768 so
// the fields fit; src/cuda/embedding.rs `check_flag` decodes the key.
//
// Thread mapping: exactly kernels/layernorm.cu's (the launcher reuses its LayerNormPlan): a team
// of blockDim.x threads (a multiple of 32) per row, blockDim.y rows per block; thread i of a team
// handles columns i, i + blockDim.x, ... (coalesced). Rows past the end still join the team
// reductions, which may contain __syncthreads.
//
// Numerics: z is formed in f32 exactly like the reference; then the statistics as in
// kernels/layernorm.cu (per-thread partial sums, fixed-order tree, IEEE sqrtf and division), so
// results are bitwise reproducible. With `cache_row` each thread keeps its z values in dynamic
// shared memory (blockDim.y * cols floats, read back only by the thread that wrote them); without
// it the three gathers are repeated in each pass (L1/L2 hits).

// The three-table gather for column c of one token, widened to f32 by load_f32.
template <typename T>
__device__ __forceinline__ float embedding_sum(const T* w, const T* p, const T* t, int c) {
    return (load_f32(w + c) + load_f32(t + c)) + load_f32(p + c);
}

// y: [rows, cols]; mean_out, rstd_out: [rows] or null; input_ids, token_type_ids: [rows];
// word: [vocab, cols]; position: [>= seq_len, cols]; token_type: [type_vocab, cols];
// gamma, beta: [cols]; error_flag: one value (see the header). y is of activation storage type A,
// tables, gamma and beta of storage type T (float or bf16_raw each).
template <typename A, typename T>
__device__ __forceinline__ void embedding_layernorm_forward_body(
    A* __restrict__ y,
    float* __restrict__ mean_out,
    float* __restrict__ rstd_out,
    unsigned long long* __restrict__ error_flag,
    const unsigned* __restrict__ input_ids,
    const unsigned* __restrict__ token_type_ids,
    const T* __restrict__ word,
    const T* __restrict__ position,
    const T* __restrict__ token_type,
    const T* __restrict__ gamma,
    const T* __restrict__ beta,
    int rows,
    int seq_len,
    int cols,
    unsigned vocab,
    unsigned type_vocab,
    int padding_idx,
    float eps,
    int cache_row)
{
    extern __shared__ float z_cache[];  // [blockDim.y][cols] when cache_row != 0
    __shared__ float scratch[32];       // team_sum partials (block-per-row mapping only)

    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < rows;
    const int r = active ? row : 0;
    const unsigned id = active ? input_ids[r] : 0u;
    const unsigned tt = active ? token_type_ids[r] : 0u;
    const int t = r % seq_len;
    const bool bad_word = id >= vocab;
    const bool bad_type = tt >= type_vocab;
    const bool bad = active && (bad_word || bad_type);
    if (bad && threadIdx.x == 0) {
        const unsigned long long b_key = 0xffffull - (unsigned long long)(r / seq_len);
        const unsigned long long t_key = 0x7fffull - (unsigned long long)t;
        const unsigned long long which = bad_word ? (1ull << 32) | id : tt;
        atomicMax(error_flag, (b_key << 48) | (t_key << 33) | which);
    }
    // size_t offsets: a table or the output may exceed 2^31 elements.
    const T* wr = word + (size_t)(bad_word ? 0u : id) * (size_t)cols;
    const T* tr = token_type + (size_t)(bad_type ? 0u : tt) * (size_t)cols;
    // The position row: t, or (RoBERTa) counted from the row's ids; every thread joins the count.
    int p = t;
    if (padding_idx >= 0) {
        const unsigned* row_ids = input_ids + (size_t)(r - t);
        float count = 0.0f;
        for (int k = threadIdx.x; k <= t; k += blockDim.x) {
            count += row_ids[k] != (unsigned)padding_idx ? 1.0f : 0.0f;
        }
        const int non_pad = (int)team_sum(count, scratch);
        p = id == (unsigned)padding_idx ? padding_idx : padding_idx + non_pad;
    }
    const T* pr = position + (size_t)p * (size_t)cols;
    float* zr = z_cache + (size_t)threadIdx.y * (size_t)cols;
    const bool cached = cache_row != 0;

    // Pass 1: z (cached if asked) and its sum.
    float sum = 0.0f;
    if (active) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float z = embedding_sum(wr, pr, tr, c);
            if (cached) {
                zr[c] = z;
            }
            sum += z;
        }
    }
    const float mean = team_sum(sum, scratch) / (float)cols;

    // Pass 2: squared deviations from the f32 mean.
    float sq = 0.0f;
    if (active) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float d = (cached ? zr[c] : embedding_sum(wr, pr, tr, c)) - mean;
            sq = fmaf(d, d, sq);
        }
    }
    const float var = team_sum(sq, scratch) / (float)cols;
    const float rstd = 1.0f / sqrtf(var + eps);

    // Pass 3: normalise, scale, shift; a bad token's row is NaN so it cannot pass for data.
    if (active) {
        const float nan = __int_as_float(0x7fffffff);
        A* yr = y + (size_t)row * (size_t)cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float z = cached ? zr[c] : embedding_sum(wr, pr, tr, c);
            store_f32(yr + c, bad ? nan : fmaf((z - mean) * rstd, load_f32(gamma + c), load_f32(beta + c)));
        }
        if (threadIdx.x == 0) {
            if (mean_out != nullptr) {
                mean_out[row] = bad ? nan : mean;
            }
            if (rstd_out != nullptr) {
                rstd_out[row] = bad ? nan : rstd;
            }
        }
    }
}

// f32 tables and LayerNorm.
extern "C" __global__ void embedding_layernorm_forward_f32(
    float* __restrict__ y,
    float* __restrict__ mean_out,
    float* __restrict__ rstd_out,
    unsigned long long* __restrict__ error_flag,
    const unsigned* __restrict__ input_ids,
    const unsigned* __restrict__ token_type_ids,
    const float* __restrict__ word,
    const float* __restrict__ position,
    const float* __restrict__ token_type,
    const float* __restrict__ gamma,
    const float* __restrict__ beta,
    int rows,
    int seq_len,
    int cols,
    unsigned vocab,
    unsigned type_vocab,
    int padding_idx,
    float eps,
    int cache_row)
{
    embedding_layernorm_forward_body<float, float>(y, mean_out, rstd_out, error_flag, input_ids, token_type_ids, word, position, token_type,
                                                   gamma, beta, rows, seq_len, cols, vocab, type_vocab, padding_idx, eps, cache_row);
}

// bf16 tables and LayerNorm (a frozen base loaded in bf16), as raw bits; y, mean, rstd stay f32.
extern "C" __global__ void embedding_layernorm_forward_bf16(
    float* __restrict__ y,
    float* __restrict__ mean_out,
    float* __restrict__ rstd_out,
    unsigned long long* __restrict__ error_flag,
    const unsigned* __restrict__ input_ids,
    const unsigned* __restrict__ token_type_ids,
    const unsigned short* __restrict__ word,
    const unsigned short* __restrict__ position,
    const unsigned short* __restrict__ token_type,
    const unsigned short* __restrict__ gamma,
    const unsigned short* __restrict__ beta,
    int rows,
    int seq_len,
    int cols,
    unsigned vocab,
    unsigned type_vocab,
    int padding_idx,
    float eps,
    int cache_row)
{
    typedef const bf16_raw* B;
    embedding_layernorm_forward_body<float, bf16_raw>(y, mean_out, rstd_out, error_flag, input_ids, token_type_ids, reinterpret_cast<B>(word),
                                                      reinterpret_cast<B>(position), reinterpret_cast<B>(token_type), reinterpret_cast<B>(gamma),
                                                      reinterpret_cast<B>(beta), rows, seq_len, cols, vocab, type_vocab, padding_idx, eps, cache_row);
}

// f16 twin of embedding_layernorm_forward_bf16: the same body with f16_raw storage.
extern "C" __global__ void embedding_layernorm_forward_f16(
    float* __restrict__ y,
    float* __restrict__ mean_out,
    float* __restrict__ rstd_out,
    unsigned long long* __restrict__ error_flag,
    const unsigned* __restrict__ input_ids,
    const unsigned* __restrict__ token_type_ids,
    const unsigned short* __restrict__ word,
    const unsigned short* __restrict__ position,
    const unsigned short* __restrict__ token_type,
    const unsigned short* __restrict__ gamma,
    const unsigned short* __restrict__ beta,
    int rows,
    int seq_len,
    int cols,
    unsigned vocab,
    unsigned type_vocab,
    int padding_idx,
    float eps,
    int cache_row)
{
    typedef const f16_raw* B;
    embedding_layernorm_forward_body<float, f16_raw>(y, mean_out, rstd_out, error_flag, input_ids, token_type_ids, reinterpret_cast<B>(word),
                                                     reinterpret_cast<B>(position), reinterpret_cast<B>(token_type), reinterpret_cast<B>(gamma),
                                                     reinterpret_cast<B>(beta), rows, seq_len, cols, vocab, type_vocab, padding_idx, eps, cache_row);
}

// bf16 y (an activation) with bf16 tables and LayerNorm, as raw bits; mean and rstd stay f32.
extern "C" __global__ void embedding_layernorm_forward_bf16io(
    unsigned short* __restrict__ y,
    float* __restrict__ mean_out,
    float* __restrict__ rstd_out,
    unsigned long long* __restrict__ error_flag,
    const unsigned* __restrict__ input_ids,
    const unsigned* __restrict__ token_type_ids,
    const unsigned short* __restrict__ word,
    const unsigned short* __restrict__ position,
    const unsigned short* __restrict__ token_type,
    const unsigned short* __restrict__ gamma,
    const unsigned short* __restrict__ beta,
    int rows,
    int seq_len,
    int cols,
    unsigned vocab,
    unsigned type_vocab,
    int padding_idx,
    float eps,
    int cache_row)
{
    typedef const bf16_raw* B;
    embedding_layernorm_forward_body<bf16_raw, bf16_raw>(reinterpret_cast<bf16_raw*>(y), mean_out, rstd_out, error_flag, input_ids, token_type_ids,
                                                         reinterpret_cast<B>(word), reinterpret_cast<B>(position), reinterpret_cast<B>(token_type),
                                                         reinterpret_cast<B>(gamma), reinterpret_cast<B>(beta), rows, seq_len, cols, vocab, type_vocab, padding_idx,
                                                         eps, cache_row);
}

// f16 twin of embedding_layernorm_forward_bf16io: the same body with f16_raw storage.
extern "C" __global__ void embedding_layernorm_forward_f16io(
    unsigned short* __restrict__ y,
    float* __restrict__ mean_out,
    float* __restrict__ rstd_out,
    unsigned long long* __restrict__ error_flag,
    const unsigned* __restrict__ input_ids,
    const unsigned* __restrict__ token_type_ids,
    const unsigned short* __restrict__ word,
    const unsigned short* __restrict__ position,
    const unsigned short* __restrict__ token_type,
    const unsigned short* __restrict__ gamma,
    const unsigned short* __restrict__ beta,
    int rows,
    int seq_len,
    int cols,
    unsigned vocab,
    unsigned type_vocab,
    int padding_idx,
    float eps,
    int cache_row)
{
    typedef const f16_raw* B;
    embedding_layernorm_forward_body<f16_raw, f16_raw>(reinterpret_cast<f16_raw*>(y), mean_out, rstd_out, error_flag, input_ids, token_type_ids,
                                                       reinterpret_cast<B>(word), reinterpret_cast<B>(position), reinterpret_cast<B>(token_type),
                                                       reinterpret_cast<B>(gamma), reinterpret_cast<B>(beta), rows, seq_len, cols, vocab, type_vocab, padding_idx,
                                                       eps, cache_row);
}
