//! Run-time dispatch to AVX2+FMA for the CPU's hot loops, with no dependency and no `unsafe` at
//! the call sites: one binary, built for the baseline x86-64, runs its kernels with 256-bit
//! vectors wherever the CPU has them (every x86-64 CPU since 2013–2015).

/// Defines a function whose body is compiled twice: for AVX2+FMA, picked at run time when the
/// CPU has them, and for the build's baseline. Loops in the body must be plain `for` loops or
/// inlined calls: a generic helper such as `Iterator::for_each` is instantiated outside the
/// AVX2 clone and would run at the baseline (measured: 4× slower). Each clone defines a constant
/// `FMA` (true in the AVX2+FMA clone) for the body to pass to `math::*_with::<FMA>`: fused
/// multiply-adds there, plain ones in the baseline (where `mul_add` would be a library call).
macro_rules! simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $crate::simd::simd_fn! { $(#[$meta])* $vis fn $name($($arg: $ty),*) -> () $body }
    };
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$meta])*
        // Kernels index by position on purpose: counted loops over fixed lanes vectorise.
        #[allow(clippy::needless_range_loop)]
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::needless_range_loop)]
                fn avx2_fma($($arg: $ty),*) -> $ret {
                    #[allow(dead_code)]
                    const FMA: bool = true;
                    $body
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the features this clone is compiled for were detected on this CPU.
                    return unsafe { avx2_fma($($arg),*) };
                }
            }
            #[allow(dead_code)]
            const FMA: bool = false;
            $body
        }
    };
}
pub(crate) use simd_fn;
