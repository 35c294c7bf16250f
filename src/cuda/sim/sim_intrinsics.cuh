// cuda-sim intrinsics (included at the end of sim.cuh): atomics, fences, warp vote / reduce /
// match, bit manipulation, type punning, float2. bf16/f16 live in include/cuda_bf16.h and
// include/cuda_fp16.h, which a kernel includes as it would with CUDA.
//
// Atomics are std::atomic_ref operations, relaxed as CUDA's are: blocks run on several OS threads,
// so global atomics really race; a block's fibers share one OS thread. A misaligned address is an
// error naming the thread and line (std::source_location, which follows the #line markers).
// Warp collectives go through warp_op_at like the shuffles, so every rule checked there (calling
// lane in the mask, every named lane arrives at the same operation, exited lanes, deadlocks)
// holds for them too.
#pragma once

#include <atomic>
#include <bit>
#include <source_location>
#include <type_traits>

struct alignas(8) float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

namespace sim {

// sim_runtime.cpp: reports the violation on the calling fiber (never returns).
[[noreturn]] void atomic_misaligned(const char* op, const char* file, int line, const void* p, unsigned size);
// Whether `p` lies in the running block's shared memory (dynamic or static `__shared__`).
bool is_shared_address(const void* p);

template <class T, class... U>
concept OneOf = (std::is_same_v<T, U> || ...);

using Loc = std::source_location;

template <class T>
inline std::atomic_ref<T> atomic_at(const char* op, const Loc& loc, T* p) {
    static_assert(std::atomic_ref<T>::required_alignment == sizeof(T), "CUDA atomics need natural alignment");
    if (reinterpret_cast<uintptr_t>(p) % sizeof(T) != 0) atomic_misaligned(op, loc.file_name(), (int)loc.line(), p, sizeof(T));
    return std::atomic_ref<T>(*p);
}

// Read-modify-write through a compare-exchange loop, for operations std::atomic_ref lacks.
template <class T, class F>
inline T atomic_update(std::atomic_ref<T> a, F next) {
    T old = a.load(std::memory_order_relaxed);
    while (!a.compare_exchange_weak(old, next(old), std::memory_order_relaxed, std::memory_order_relaxed)) {
    }
    return old;
}

inline float flush_subnormal(float x) {
    const uint32_t u = std::bit_cast<uint32_t>(x);
    return (u & 0x7f800000u) == 0 ? std::bit_cast<float>(u & 0x80000000u) : x;
}

// The f32 atomic add of the CUDA Programming Guide ("Floating-Point Standard"): on global memory
// FADD.F32.FTZ.RN (subnormal inputs and result flushed to sign-preserving zero), on shared memory
// FADD.F32.RN; a NaN result is the canonical 0x7fffffff of every f32 operation on the GPU.
inline float atomic_fadd(float old, float v, bool ftz) {
    float r = ftz ? flush_subnormal(flush_subnormal(old) + flush_subnormal(v)) : old + v;
    return r != r ? std::bit_cast<float>(0x7fffffffu) : r;
}

// A warp collective without shuffle operands; the value travels zero-extended in 64 bits.
template <class T>
inline uint64_t collective(const char* file, int line, int op, unsigned mask, T v) {
    static_assert(std::is_arithmetic_v<T> && (sizeof(T) == 4 || sizeof(T) == 8), "a warp vote, reduce or match takes a 4- or 8-byte value");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    return warp_op_at(file, line, op, mask, bits, sizeof(T), 0, 32);
}

inline unsigned ballot_sync(const char* file, int line, unsigned mask, int pred) {
    return (unsigned)collective(file, line, VOTE_BALLOT, mask, (unsigned)(pred != 0));
}
inline int vote_sync(const char* file, int line, int op, unsigned mask, int pred) { return (int)collective(file, line, op, mask, (unsigned)(pred != 0)); }

// add/min/max come in unsigned and int (CUDA's two overloads); min/max differ in the comparison.
inline unsigned reduce_sync(const char* file, int line, int op, unsigned mask, unsigned v) { return (unsigned)collective(file, line, op, mask, v); }
inline int reduce_sync(const char* file, int line, int op, unsigned mask, int v) {
    const int sop = op == REDUCE_MIN_U ? REDUCE_MIN_S : op == REDUCE_MAX_U ? REDUCE_MAX_S : op;
    return (int)(unsigned)collective(file, line, sop, mask, v);
}
// and/or/xor: unsigned only, as in CUDA (an int argument converts).
inline unsigned reduce_bits_sync(const char* file, int line, int op, unsigned mask, unsigned v) { return (unsigned)collective(file, line, op, mask, v); }

template <class T>
inline unsigned match_any_sync(const char* file, int line, unsigned mask, T v) {
    return (unsigned)collective(file, line, MATCH_ANY, mask, v);
}
// The runtime returns the mask in the low word and the predicate in the high word.
template <class T>
inline unsigned match_all_sync(const char* file, int line, unsigned mask, T v, int* pred) {
    const uint64_t r = collective(file, line, MATCH_ALL, mask, v);
    *pred = (int)(r >> 32);
    return (unsigned)r;
}

}  // namespace sim

// ---- Atomics: each returns the old value. ----

template <class T>
    requires sim::OneOf<T, int, unsigned, unsigned long long, float, double>
inline T atomicAdd(T* p, std::type_identity_t<T> v, sim::Loc loc = sim::Loc::current()) {
    auto a = sim::atomic_at("atomicAdd", loc, p);
    if constexpr (std::is_same_v<T, float>) {
        const bool ftz = !sim::is_shared_address(p);
        return sim::atomic_update(a, [&](float old) { return sim::atomic_fadd(old, v, ftz); });
    } else {
        return a.fetch_add(v, std::memory_order_relaxed);
    }
}

template <class T>
    requires sim::OneOf<T, int, unsigned>
inline T atomicSub(T* p, std::type_identity_t<T> v, sim::Loc loc = sim::Loc::current()) {
    return sim::atomic_at("atomicSub", loc, p).fetch_sub(v, std::memory_order_relaxed);
}

template <class T>
    requires sim::OneOf<T, int, unsigned, unsigned long long, float>
inline T atomicExch(T* p, std::type_identity_t<T> v, sim::Loc loc = sim::Loc::current()) {
    return sim::atomic_at("atomicExch", loc, p).exchange(v, std::memory_order_relaxed);
}

template <class T>
    requires sim::OneOf<T, int, unsigned, long long, unsigned long long>
inline T atomicMin(T* p, std::type_identity_t<T> v, sim::Loc loc = sim::Loc::current()) {
    return sim::atomic_update(sim::atomic_at("atomicMin", loc, p), [&](T old) { return v < old ? v : old; });
}

template <class T>
    requires sim::OneOf<T, int, unsigned, long long, unsigned long long>
inline T atomicMax(T* p, std::type_identity_t<T> v, sim::Loc loc = sim::Loc::current()) {
    return sim::atomic_update(sim::atomic_at("atomicMax", loc, p), [&](T old) { return v > old ? v : old; });
}

template <class T>
    requires sim::OneOf<T, int, unsigned, unsigned long long, unsigned short>
inline T atomicCAS(T* p, std::type_identity_t<T> compare, std::type_identity_t<T> val, sim::Loc loc = sim::Loc::current()) {
    sim::atomic_at("atomicCAS", loc, p).compare_exchange_strong(compare, val, std::memory_order_relaxed, std::memory_order_relaxed);
    return compare;  // the old value whether or not it matched
}

template <class T>
    requires sim::OneOf<T, int, unsigned, unsigned long long>
inline T atomicAnd(T* p, std::type_identity_t<T> v, sim::Loc loc = sim::Loc::current()) {
    return sim::atomic_at("atomicAnd", loc, p).fetch_and(v, std::memory_order_relaxed);
}

template <class T>
    requires sim::OneOf<T, int, unsigned, unsigned long long>
inline T atomicOr(T* p, std::type_identity_t<T> v, sim::Loc loc = sim::Loc::current()) {
    return sim::atomic_at("atomicOr", loc, p).fetch_or(v, std::memory_order_relaxed);
}

template <class T>
    requires sim::OneOf<T, int, unsigned, unsigned long long>
inline T atomicXor(T* p, std::type_identity_t<T> v, sim::Loc loc = sim::Loc::current()) {
    return sim::atomic_at("atomicXor", loc, p).fetch_xor(v, std::memory_order_relaxed);
}

// ((old >= val) ? 0 : (old + 1)), CUDA's wrap-around counter.
inline unsigned atomicInc(unsigned* p, unsigned val, sim::Loc loc = sim::Loc::current()) {
    return sim::atomic_update(sim::atomic_at("atomicInc", loc, p), [&](unsigned old) { return old >= val ? 0u : old + 1; });
}

// (((old == 0) || (old > val)) ? val : (old - 1)).
inline unsigned atomicDec(unsigned* p, unsigned val, sim::Loc loc = sim::Loc::current()) {
    return sim::atomic_update(sim::atomic_at("atomicDec", loc, p), [&](unsigned old) { return (old == 0 || old > val) ? val : old - 1; });
}

// A block's fibers share one OS thread, but a full fence keeps the three trivially correct.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---- Warp vote, reduce, match. ----

#define __ballot_sync(mask, pred) ::sim::ballot_sync(__FILE__, __LINE__, mask, pred)
#define __any_sync(mask, pred) ::sim::vote_sync(__FILE__, __LINE__, ::sim::VOTE_ANY, mask, pred)
#define __all_sync(mask, pred) ::sim::vote_sync(__FILE__, __LINE__, ::sim::VOTE_ALL, mask, pred)
#define __reduce_add_sync(mask, v) ::sim::reduce_sync(__FILE__, __LINE__, ::sim::REDUCE_ADD, mask, v)
#define __reduce_min_sync(mask, v) ::sim::reduce_sync(__FILE__, __LINE__, ::sim::REDUCE_MIN_U, mask, v)
#define __reduce_max_sync(mask, v) ::sim::reduce_sync(__FILE__, __LINE__, ::sim::REDUCE_MAX_U, mask, v)
#define __reduce_and_sync(mask, v) ::sim::reduce_bits_sync(__FILE__, __LINE__, ::sim::REDUCE_AND, mask, v)
#define __reduce_or_sync(mask, v) ::sim::reduce_bits_sync(__FILE__, __LINE__, ::sim::REDUCE_OR, mask, v)
#define __reduce_xor_sync(mask, v) ::sim::reduce_bits_sync(__FILE__, __LINE__, ::sim::REDUCE_XOR, mask, v)
#define __match_any_sync(mask, v) ::sim::match_any_sync(__FILE__, __LINE__, mask, v)
#define __match_all_sync(mask, v, pred) ::sim::match_all_sync(__FILE__, __LINE__, mask, v, pred)

// ---- Tensor cores: mma.sync.aligned.m16n8k16 (common.cuh's mma_m16n8k16_bf16/_f16 call this
// where a GPU runs the instruction). A warp collective over all 32 lanes: every lane must reach
// the same mma (a lane that exited, diverged or does not exist is reported like a shuffle's).

namespace sim {

inline void mma_m16n8k16(const char* file, int line, int op, float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                         const float (&c)[4]) {
    MmaFragments f;
    memcpy(f.a, a, sizeof f.a);
    memcpy(f.b, b, sizeof f.b);
    memcpy(f.c, c, sizeof f.c);
    warp_op_at(file, line, op, 0xffffffffu, (uint64_t)(uintptr_t)&f, sizeof f, 0, 32);
    memcpy(d, f.d, sizeof f.d);
}

}  // namespace sim

#define __sim_mma_m16n8k16_bf16(d, a, b, c) ::sim::mma_m16n8k16(__FILE__, __LINE__, ::sim::MMA_BF16, d, a, b, c)
#define __sim_mma_m16n8k16_f16(d, a, b, c) ::sim::mma_m16n8k16(__FILE__, __LINE__, ::sim::MMA_F16, d, a, b, c)

// Which lanes are active at a point is a fact of the GPU's scheduler, which the executor does not
// model (each lane is a fiber that runs alone to its next sync point), so the mask would mean
// nothing; refuse it where it is used.
#define __activemask()                                                                                                    \
    ([]() -> unsigned {                                                                                                   \
        static_assert(false,                                                                                              \
                      "cuda-sim: __activemask() has no strict meaning on the CPU executor (it does not model which lanes " \
                      "the GPU happens to run together); name the lanes that must take part instead, e.g. 0xffffffff or "  \
                      "a __ballot_sync(0xffffffff, cond) taken before the branch");                                       \
        return 0u;                                                                                                        \
    }())

// ---- Bit manipulation and type punning. ----

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }

inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
    return ((unsigned long long)__brev((unsigned)x) << 32) | __brev((unsigned)(x >> 32));
}

// Byte n of the result is byte s<4n+2:4n> of the eight bytes y:x (x is bytes 0-3); the upper
// half of s and the top bit of each nibble are ignored (CUDA Math API).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const unsigned long long in = ((unsigned long long)y << 32) | x;
    unsigned r = 0;
    for (int n = 0; n < 4; ++n) r |= (unsigned)((in >> (8 * ((s >> (4 * n)) & 7))) & 0xff) << (8 * n);
    return r;
}

// hi:lo shifted by shift & 31 (the c forms clamp the shift to 32 instead).
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
    return (unsigned)(((((unsigned long long)hi << 32) | lo) << (shift & 31)) >> 32);
}
inline unsigned __funnelshift_lc(unsigned lo, unsigned hi, unsigned shift) {
    return (unsigned)(((((unsigned long long)hi << 32) | lo) << (shift < 32 ? shift : 32)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) { return (unsigned)((((unsigned long long)hi << 32) | lo) >> (shift & 31)); }
inline unsigned __funnelshift_rc(unsigned lo, unsigned hi, unsigned shift) {
    return (unsigned)((((unsigned long long)hi << 32) | lo) >> (shift < 32 ? shift : 32));
}

inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
