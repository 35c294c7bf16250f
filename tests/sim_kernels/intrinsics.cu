// Kernels for tests/cuda_sim_intrinsics.rs: atomics, warp vote / reduce / match, bit intrinsics
// and bf16/f16 conversions on the cuda-sim executor, plus planted misuse that must be reported.
// Compiled only into the executor (build.rs), never by NVRTC. Lines the tests find by their
// `@mark:` comment must keep the call on the same line.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Float atomicAdd from every block into per-column sums (global atomics race across OS threads).
extern "C" __global__ void intr_column_sums(const float* x, int rows, int cols, float* sums)
{
    const int total = rows * cols;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        atomicAdd(&sums[i % cols], x[i]);
    }
}

// Integer histogram: per-block counts in dynamic shared memory, a block total in static shared
// memory, both merged into global memory with atomics.
extern "C" __global__ void intr_histogram(const unsigned* v, int n, unsigned* bins, int nbins, unsigned* total)
{
    extern __shared__ unsigned local[];
    __shared__ unsigned block_total;
    for (int b = threadIdx.x; b < nbins; b += blockDim.x) {
        local[b] = 0;
    }
    if (threadIdx.x == 0) {
        block_total = 0;
    }
    __syncthreads();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        atomicAdd(&local[v[i] % nbins], 1u);
        atomicAdd(&block_total, 1u);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < nbins; b += blockDim.x) {
        if (local[b] != 0) {
            atomicAdd(&bins[b], local[b]);
        }
    }
    if (threadIdx.x == 0) {
        atomicAdd(total, block_total);
    }
}

// The classic atomicCAS loop for a float maximum.
extern "C" __global__ void intr_cas_max(const float* x, int n, float* out)
{
    int* addr = reinterpret_cast<int*>(out);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float v = x[i];
        int old = *addr;
        while (v > __int_as_float(old)) {
            const int assumed = old;
            old = atomicCAS(addr, assumed, __float_as_int(v));
            if (old == assumed) {
                break;
            }
        }
    }
}

// Counts the positive values with a full-warp ballot and __popc (every lane runs the same trips).
extern "C" __global__ void intr_ballot_count(const int* x, int n, unsigned* count)
{
    for (int base = blockIdx.x * blockDim.x; base < n; base += gridDim.x * blockDim.x) {
        const int i = base + threadIdx.x;
        const unsigned b = __ballot_sync(0xffffffffu, i < n && x[i] > 0);
        if (threadIdx.x % 32 == 0) {
            atomicAdd(count, (unsigned)__popc(b));
        }
    }
}

// atomicInc/atomicDec on five counters (the test sets their start values); olds[c * n + i].
extern "C" __global__ void intr_inc_dec(unsigned* counters, unsigned limit, unsigned* olds, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) {
        return;
    }
    olds[0 * n + i] = atomicInc(&counters[0], limit);
    olds[1 * n + i] = atomicInc(&counters[1], limit);
    olds[2 * n + i] = atomicDec(&counters[2], limit);
    olds[3 * n + i] = atomicDec(&counters[3], limit);
    olds[4 * n + i] = atomicDec(&counters[4], limit);
}

// Block partial sums, then the last block to take a ticket (atomicInc wraps the counter back to
// 0 for the next launch) adds them up after a __threadfence.
extern "C" __global__ void intr_last_block_sum(const float* x, int n, float* partial, unsigned* ticket, float* result)
{
    __shared__ float acc[256];
    __shared__ bool last;
    float s = 0.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        s += x[i];
    }
    acc[threadIdx.x] = s;
    __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) {
            acc[threadIdx.x] += acc[threadIdx.x + stride];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = acc[0];
        __threadfence();
        last = atomicInc(ticket, gridDim.x - 1) == gridDim.x - 1;
        __threadfence_block();
    }
    __syncthreads();
    if (last && threadIdx.x == 0) {
        float total = 0.0f;
        for (unsigned b = 0; b < gridDim.x; ++b) {
            total += partial[b];
        }
        result[0] = total;
    }
}

// One slot per atomic operation and type; tests/cuda_sim_intrinsics.rs mirrors it (repr(C)).
struct AtomicSlots {
    long long llmin, llmax;
    unsigned long long ullmin, ullmax, ulland, ullor, ullxor, ulladd, ullexch, ullcas;
    double dadd;
    int imin, imax, iand, ior, ixor, isub, iadd, iexch, icas;
    unsigned umin, umax, uand, uor, uxor, usub, uadd, uexch, ucas;
    float fexch;
    unsigned short uscas[4];
};
static_assert(sizeof(AtomicSlots) == 176, "the Rust mirror assumes this layout");

// Every thread i < n applies each operation with values derived from vals[i] (the test derives
// the same); olds[k * n + i] records what exchange and compare-and-swap returned.
extern "C" __global__ void intr_atomic_ops(const int* vals, int n, AtomicSlots* s, unsigned long long* olds)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) {
        return;
    }
    const int v = vals[i];
    const unsigned u = (unsigned)v * 2654435761u;
    const long long ll = (long long)v * 1000003LL;
    const unsigned long long ull = ((unsigned long long)(unsigned)v << 32) | (unsigned)(i * 7919);
    atomicMin(&s->imin, v);
    atomicMax(&s->imax, v);
    atomicMin(&s->umin, u);
    atomicMax(&s->umax, u);
    atomicMin(&s->llmin, ll);
    atomicMax(&s->llmax, ll);
    atomicMin(&s->ullmin, ull);
    atomicMax(&s->ullmax, ull);
    atomicAnd(&s->iand, v | 0x10000);
    atomicOr(&s->ior, v & 0x0f0f0f0f);
    atomicXor(&s->ixor, v);
    atomicAnd(&s->uand, u | 0x80000001u);
    atomicOr(&s->uor, u & 0x00ff00ffu);
    atomicXor(&s->uxor, u);
    atomicAnd(&s->ulland, ull | 0x8000000000000001ull);
    atomicOr(&s->ullor, ull & 0x00ff00ff00ff00ffull);
    atomicXor(&s->ullxor, ull);
    atomicSub(&s->isub, v);
    atomicSub(&s->usub, u);
    atomicAdd(&s->iadd, v);
    atomicAdd(&s->uadd, u);
    atomicAdd(&s->ulladd, ull);
    atomicAdd(&s->dadd, (double)v);
    olds[0 * n + i] = (unsigned)atomicExch(&s->iexch, i);
    olds[1 * n + i] = atomicExch(&s->uexch, u);
    olds[2 * n + i] = atomicExch(&s->ullexch, ull);
    olds[3 * n + i] = __float_as_uint(atomicExch(&s->fexch, (float)v));
    olds[4 * n + i] = (unsigned)atomicCAS(&s->icas, -1, i);
    olds[5 * n + i] = atomicCAS(&s->ucas, 0xffffffffu, u);
    olds[6 * n + i] = atomicCAS(&s->ullcas, ~0ull, ull);
    olds[7 * n + i] = atomicCAS(&s->uscas[1], (unsigned short)0xffff, (unsigned short)i);
}

// atomicAdd on f32 in global, static shared and dynamic shared memory, from one thread: olds and
// new values (out[k * 8 + i]; k = 0 global old, 1/2 static old/new, 3/4 dynamic old/new).
extern "C" __global__ void intr_atomic_fadd_modes(const float* start, const float* operand, float* global, float* out)
{
    __shared__ float stat[8];
    extern __shared__ float dyn[];
    if (threadIdx.x != 0) {
        return;
    }
    for (int i = 0; i < 8; ++i) {
        stat[i] = start[i];
        dyn[i] = start[i];
        out[0 * 8 + i] = atomicAdd(&global[i], operand[i]);
        out[1 * 8 + i] = atomicAdd(&stat[i], operand[i]);
        out[2 * 8 + i] = stat[i];
        out[3 * 8 + i] = atomicAdd(&dyn[i], operand[i]);
        out[4 * 8 + i] = dyn[i];
    }
}

// Every vote, reduce and match by the lanes of `mask` in each warp; the other lanes return at
// once. out[k * n + t], k as listed.
extern "C" __global__ void intr_warp_ops(const int* x, const long long* key, unsigned mask, unsigned* out)
{
    const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned n = gridDim.x * blockDim.x;
    if (!((mask >> (threadIdx.x % 32)) & 1u)) {
        return;
    }
    const int v = x[t];
    const long long k = key[t];
    unsigned* o = out + t;
    o[0 * n] = __ballot_sync(mask, v > 0);
    o[1 * n] = (unsigned)__any_sync(mask, v % 5 == 0);
    o[2 * n] = (unsigned)__all_sync(mask, v % 5 != 0);
    o[3 * n] = __reduce_add_sync(mask, (unsigned)v);
    o[4 * n] = (unsigned)__reduce_add_sync(mask, v);
    o[5 * n] = __reduce_min_sync(mask, (unsigned)v);
    o[6 * n] = (unsigned)__reduce_min_sync(mask, v);
    o[7 * n] = __reduce_max_sync(mask, (unsigned)v);
    o[8 * n] = (unsigned)__reduce_max_sync(mask, v);
    o[9 * n] = __reduce_and_sync(mask, (unsigned)v | 0x80000001u);
    o[10 * n] = __reduce_or_sync(mask, (unsigned)v & 0x00ff00ffu);
    o[11 * n] = __reduce_xor_sync(mask, (unsigned)v);
    o[12 * n] = __match_any_sync(mask, (int)k);
    o[13 * n] = __match_any_sync(mask, k);
    int pred32 = -1, pred64 = -1;
    o[14 * n] = __match_all_sync(mask, (unsigned)k, &pred32);
    o[15 * n] = (unsigned)pred32;
    o[16 * n] = __match_all_sync(mask, k, &pred64);
    o[17 * n] = (unsigned)pred64;
    o[18 * n] = __match_any_sync(mask, (k & 1) ? -0.0f : 0.0f);
    o[19 * n] = __match_any_sync(mask, (double)(k >> 32));
}

// Bit intrinsics on a = x[i], b = x[i+1], c = x[i+7] (indices mod n); out[k * n + i].
extern "C" __global__ void intr_bits(const unsigned* x, int n, unsigned* out)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const unsigned a = x[i], b = x[(i + 1) % n], c = x[(i + 7) % n];
        const unsigned long long ab = ((unsigned long long)b << 32) | a;
        out[0 * n + i] = (unsigned)__popc(a);
        out[1 * n + i] = (unsigned)__popcll(ab);
        out[2 * n + i] = (unsigned)__clz((int)a);
        out[3 * n + i] = (unsigned)__clzll((long long)ab);
        out[4 * n + i] = (unsigned)__ffs((int)a);
        out[5 * n + i] = (unsigned)__ffsll((long long)ab);
        out[6 * n + i] = __brev(a);
        out[7 * n + i] = (unsigned)__brevll(ab);
        out[8 * n + i] = (unsigned)(__brevll(ab) >> 32);
        out[9 * n + i] = __byte_perm(a, b, c);
        out[10 * n + i] = __funnelshift_l(a, b, c);
        out[11 * n + i] = __funnelshift_r(a, b, c);
        out[12 * n + i] = __funnelshift_lc(a, b, c & 63);
        out[13 * n + i] = __funnelshift_rc(a, b, c & 63);
    }
}

// f32 -> bf16 and f16 (round to nearest even) for every input.
extern "C" __global__ void intr_f32_to_16(const float* x, int n, unsigned short* bf, unsigned short* hf)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        bf[i] = __bfloat16_as_ushort(__float2bfloat16(x[i]));
        hf[i] = __half_as_ushort(__float2half(x[i]));
    }
}

// Each 16-bit pattern as bf16 and as f16 to f32, and that f32 back (the _rn forms).
extern "C" __global__ void intr_16_roundtrip(const unsigned short* h, int n, float* bf_f32, float* hf_f32, unsigned short* bf_back, unsigned short* hf_back)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        bf_f32[i] = __bfloat162float(__ushort_as_bfloat16(h[i]));
        hf_f32[i] = __half2float(__ushort_as_half(h[i]));
        bf_back[i] = __bfloat16_as_ushort(__float2bfloat16_rn(bf_f32[i]));
        hf_back[i] = __half_as_ushort(__float2half_rn(hf_f32[i]));
    }
}

// The pair forms on (x[2j], x[2j+1]): packed bits (low half from the first) and back to float2.
extern "C" __global__ void intr_pairs(const float* x, int pairs, unsigned* bf2, unsigned* hf2, float* bf_back, float* hf_back)
{
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < pairs; j += gridDim.x * blockDim.x) {
        const __nv_bfloat162 b = __floats2bfloat162_rn(x[2 * j], x[2 * j + 1]);
        const __half2 h = __floats2half2_rn(x[2 * j], x[2 * j + 1]);
        bf2[j] = __bfloat16_as_ushort(b.x) | ((unsigned)__bfloat16_as_ushort(b.y) << 16);
        hf2[j] = __half_as_ushort(h.x) | ((unsigned)__half_as_ushort(h.y) << 16);
        const float2 fb = __bfloat1622float2(b);
        const float2 fh = __half22float2(h);
        bf_back[2 * j] = fb.x;
        bf_back[2 * j + 1] = fb.y;
        hf_back[2 * j] = fh.x;
        hf_back[2 * j + 1] = fh.y;
    }
}

// ---- Planted misuse: each must be reported with its line. ----

// Lane 5 votes with a mask that names only lane 4.
extern "C" __global__ void intr_ballot_mask_misses_lane(float* out)
{
    if (threadIdx.x == 5) {
        out[0] = (float)__ballot_sync(1u << 4, 1); // @mark:ballot-misses-lane
    }
}

// The upper half-warp exits; the lower half votes with a full mask.
extern "C" __global__ void intr_vote_after_exit(float* out)
{
    if (threadIdx.x >= 16) {
        return;
    }
    out[threadIdx.x] = (float)__any_sync(0xffffffffu, 1); // @mark:any-after-exit
}

// Two halves of a warp reach two different collectives under one full mask.
extern "C" __global__ void intr_mixed_collectives(float* out)
{
    unsigned r;
    if (threadIdx.x < 16) {
        r = __ballot_sync(0xffffffffu, 1); // @mark:mixed-ballot
    } else {
        r = __reduce_add_sync(0xffffffffu, 1u); // @mark:mixed-reduce
    }
    out[threadIdx.x] = (float)r;
}

// The same match under one mask, with a 4-byte value in one half and an 8-byte one in the other.
extern "C" __global__ void intr_match_size_mismatch(float* out)
{
    unsigned r;
    if (threadIdx.x < 16) {
        r = __match_any_sync(0xffffffffu, (int)threadIdx.x); // @mark:match-int
    } else {
        r = __match_any_sync(0xffffffffu, (long long)threadIdx.x); // @mark:match-longlong
    }
    out[threadIdx.x] = (float)r;
}

// A 64-bit atomic 4 bytes into an 8-byte-aligned buffer.
extern "C" __global__ void intr_misaligned_atomic(unsigned long long* p)
{
    if (threadIdx.x == 3) {
        atomicAdd(reinterpret_cast<unsigned long long*>(reinterpret_cast<char*>(p) + 4), 1ull); // @mark:misaligned
    }
}

// An mma that half the warp has left.
extern "C" __global__ void intr_mma_after_exit(float* out)
{
    if (threadIdx.x >= 16) {
        return;
    }
    const unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    const float c[4] = {0, 0, 0, 0};
    float d[4];
    mma_m16n8k16_bf16(d, a, b, c);
    out[threadIdx.x] = d[0];
}
