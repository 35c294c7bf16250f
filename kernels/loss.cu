// Loss family: the training objectives on head logits, with their gradient, in two launches.
//
// Semantics (the spec is bert_adapters::train::loss::reference): with s scorenn's logits and t
// tasknn's ([B, C] each), p = softmax(t), labels y [B]:
//   objective 0  CrossEntropy        CE(z, y) = logsumexp(z) - z_y, batch mean
//   objective 1  TaskEnergy(lambda)  CE(t, y) - lambda * <p, s>              (z = t, o = s)
//   objective 2  ScoreMargin(m, a)   max(0, m - s_y + <p^, s>) + a * CE(s, y) (z = s, o = t, p^ = softmax(t))
// dlogits = d(total / B) / dz, written as f32; loss = [total / B, CE part / B]. Non-finite rows
// are computed like the others (NaN propagates, so the CE part is what the reference reports).
// A non-finite logit anywhere in the batch (or a label >= C) makes the total and every gradient
// NaN, as the reference does: a diverged step must never look like a number.
//
// Thread mapping: loss_rows_f32 gives each row one thread (C is the number of labels, a handful;
// B is a batch): it computes the row's terms and gradient in f64, as the reference does, writes
// the gradient, and leaves (total, CE) and a bad flag per row. loss_finish_f32 is one block: thread
// 0 adds the rows' terms in row order (so the sum is the same in every run), then, when any row was
// bad, every thread writes NaN over the gradient.
//
// Numerics: per row in f64 with the max subtracted (stable for any finite logits), the gradient
// rounded to f32 once: within a few f64 ulps of the reference, far inside the tests' 1e-5.

#define LOSS_CROSS_ENTROPY 0
#define LOSS_TASK_ENERGY 1
#define LOSS_SCORE_MARGIN 2

// logsumexp(row) in f64; softmax(row)_j is then exp(row_j - lse), computed where it is used
// (no per-row array, so any number of classes).
__device__ double loss_logsumexp(const float* row, int c) {
    double mx = __longlong_as_double(0xfff0000000000000ull);  // -inf (INFINITY is host-only under NVRTC)
    for (int j = 0; j < c; ++j) {
        mx = fmax(mx, (double)row[j]);
    }
    double sum = 0.0;
    for (int j = 0; j < c; ++j) {
        sum += exp((double)row[j] - mx);
    }
    return mx + log(sum);
}

// dlogits, trained, other: [rows, c]; labels [rows]; partial [rows, 2] (total, CE); bad [rows].
extern "C" __global__ void loss_rows_f32(
    float* __restrict__ dlogits,
    double* __restrict__ partial,
    int* __restrict__ bad,
    const float* __restrict__ trained,
    const float* __restrict__ other,
    const unsigned* __restrict__ labels,
    int rows,
    int c,
    int objective,
    double param0,
    double param1)
{
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) {
        return;
    }
    const float* z = trained + (size_t)r * (size_t)c;
    const float* o = other != nullptr ? other + (size_t)r * (size_t)c : z;
    const unsigned y = labels[r];
    int row_bad = y >= (unsigned)c;
    for (int j = 0; j < c; ++j) {
        row_bad |= !isfinite(z[j]) || !isfinite(o[j]);
    }
    bad[r] = row_bad;
    const double inv_b = 1.0 / (double)rows;
    float* d = dlogits + (size_t)r * (size_t)c;
    if (y >= (unsigned)c) {
        // Nothing to index with; the batch's loss and gradient become NaN in loss_finish_f32.
        partial[2 * r] = __longlong_as_double(0x7ff8000000000000ull);
        partial[2 * r + 1] = __longlong_as_double(0x7ff8000000000000ull);
        return;
    }
    double total = 0.0, ce = 0.0;
    if (objective == LOSS_CROSS_ENTROPY || objective == LOSS_TASK_ENERGY) {
        const double lse = loss_logsumexp(z, c);
        ce = lse - (double)z[y];
        double ps = 0.0;  // <p, s>
        if (objective == LOSS_TASK_ENERGY) {
            for (int j = 0; j < c; ++j) {
                ps += exp((double)z[j] - lse) * (double)o[j];
            }
        }
        const double lambda = objective == LOSS_TASK_ENERGY ? param0 : 0.0;
        total = ce - lambda * ps;
        for (int j = 0; j < c; ++j) {
            const double p = exp((double)z[j] - lse);
            // d(-<p, s>)/dt_j = -p_j (s_j - <p, s>): the softmax Jacobian applied to -s.
            const double g = (p - (j == (int)y ? 1.0 : 0.0)) + lambda * (-p * ((double)o[j] - ps));
            d[j] = (float)(g * inv_b);
        }
    } else {
        // ScoreMargin: z = s (trained), o = t; p^ = softmax(t) is a constant.
        const double lse_t = loss_logsumexp(o, c);
        const double lse_s = loss_logsumexp(z, c);
        double ps = 0.0;
        for (int j = 0; j < c; ++j) {
            ps += exp((double)o[j] - lse_t) * (double)z[j];
        }
        const double hinge = param0 - (double)z[y] + ps;
        const bool active = hinge > 0.0;
        ce = lse_s - (double)z[y];
        total = fmax(hinge, 0.0) + param1 * ce;
        for (int j = 0; j < c; ++j) {
            const double onehot = j == (int)y ? 1.0 : 0.0;
            const double p_hat = exp((double)o[j] - lse_t);
            const double q = exp((double)z[j] - lse_s);
            const double g = (active ? p_hat - onehot : 0.0) + param1 * (q - onehot);
            d[j] = (float)(g * inv_b);
        }
    }
    partial[2 * r] = total;
    partial[2 * r + 1] = ce;
}

// loss [2]; one block. Sums the rows' terms in row order; a bad row poisons the total and the
// whole gradient.
extern "C" __global__ void loss_finish_f32(
    float* __restrict__ loss,
    float* __restrict__ dlogits,
    const double* __restrict__ partial,
    const int* __restrict__ bad,
    int rows,
    int c)
{
    __shared__ int any_bad;
    if (threadIdx.x == 0) {
        double total = 0.0, ce = 0.0;
        int flagged = 0;
        for (int r = 0; r < rows; ++r) {
            total += partial[2 * r];
            ce += partial[2 * r + 1];
            flagged |= bad[r];
        }
        any_bad = flagged;
        loss[0] = flagged ? __int_as_float(0x7fffffff) : (float)(total / (double)rows);
        loss[1] = (float)(ce / (double)rows);
    }
    __syncthreads();
    if (any_bad) {
        const long long n = (long long)rows * c;
        for (long long i = threadIdx.x; i < n; i += blockDim.x) {
            dlogits[i] = __int_as_float(0x7fffffff);
        }
    }
}
