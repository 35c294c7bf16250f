// cuda-sim stub of <cuda_bf16.h> (on the include path of the cuda-sim build only; NVRTC uses the
// real header). `__nv_bfloat16` is 16-bit storage with the conversions below and no arithmetic:
// a kernel that needs more fails to compile here instead of computing in another precision.
//
// Conversions are integer code, so they ignore the host's FP environment. f32 -> bf16 rounds to
// nearest even; NaN -> 0x7fff, the canonical NaN of CUDA's own software path
// (__internal_float2bfloat16) and CUDART_NAN_BF16. bf16 -> f32 moves the bits (`mov.b32 {0,h}`).
// This header may be included inside a kernel family's namespace: it includes nothing.
#pragma once

struct alignas(2) __nv_bfloat16 {
    unsigned short __x;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

inline unsigned short __sim_f32_to_bf16_bits(float f) {
    unsigned u = __builtin_bit_cast(unsigned, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    u += 0x7fffu + ((u >> 16) & 1u);  // ties go to the even result; overflow carries into inf
    return (unsigned short)(u >> 16);
}

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) { return __nv_bfloat16{x}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{__sim_f32_to_bf16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return __builtin_bit_cast(float, (unsigned)h.__x << 16); }

// .x is the low half (from a), .y the high half (from b).
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{__bfloat162float(h.x), __bfloat162float(h.y)}; }
