// cuda-sim stub of <cuda_fp16.h> (on the include path of the cuda-sim build only; NVRTC uses the
// real header). `__half` is 16-bit storage with the conversions below and no arithmetic: a kernel
// that needs more fails to compile here instead of computing in another precision.
//
// Conversions are integer code, so they ignore the host's FP environment. f32 -> f16 rounds to
// nearest even (subnormals, overflow to inf); NaN -> 0x7fff, and f16 NaN -> f32 0x7fffffff, the
// canonical NaNs of CUDA's own software paths (__internal_float2half, __internal_half2float).
// This header may be included inside a kernel family's namespace: it includes nothing.
#pragma once

struct alignas(2) __half {
    unsigned short __x;
};
struct alignas(4) __half2 {
    __half x, y;
};
typedef __half half;
typedef __half2 half2;

inline unsigned short __sim_f32_to_f16_bits(float f) {
    const unsigned u = __builtin_bit_cast(unsigned, f);
    const unsigned sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7fff;
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520 (the tie above 65504) and inf
    if (a >= 0x38800000u) {                                           // normal: rebias 127 -> 15, round 13 bits
        unsigned r = a - 0x38000000u;
        r += 0xfffu + ((r >> 13) & 1u);
        return (unsigned short)(sign | (r >> 13));
    }
    if (a <= 0x33000000u) return (unsigned short)sign;  // <= 2^-25, half the smallest subnormal: the tie goes to 0
    // Subnormal: the value is m * 2^(e - 150); in units of 2^-24 that is m >> (126 - e), rounded.
    const unsigned e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, shift = 126 - e;
    unsigned q = m >> shift;
    const unsigned rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;  // may carry into the smallest normal: still right
    return (unsigned short)(sign | q);
}

inline float __sim_f16_bits_to_f32(unsigned short h) {
    const unsigned sign = (unsigned)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    unsigned u;
    if (e == 0x1f) {
        u = m ? 0x7fffffffu : sign | 0x7f800000u;
    } else if (e != 0) {
        u = sign | ((e + 112) << 23) | (m << 13);
    } else if (m == 0) {
        u = sign;
    } else {  // subnormal m * 2^-24 with its top bit at p: 2^(p-24) * 1.f
        const unsigned p = 31 - __builtin_clz(m);
        u = sign | ((p + 103) << 23) | ((m << (23 - p)) & 0x7fffffu);
    }
    return __builtin_bit_cast(float, u);
}

inline __half __ushort_as_half(unsigned short x) { return __half{x}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __float2half_rn(float f) { return __half{__sim_f32_to_f16_bits(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return __sim_f16_bits_to_f32(h.__x); }

// .x is the low half (from a), .y the high half (from b).
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
