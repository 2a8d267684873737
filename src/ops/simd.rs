//! Run-time SIMD dispatch for the hand-written CPU kernels: the crate is built for the
//! baseline x86-64 target, so loops only use AVX2/AVX-512 inside functions compiled for them.

/// 0: baseline, 1: AVX2 + FMA, 2: AVX-512F (x86-64 only; detected once).
pub fn simd_level() -> u8 {
    use std::sync::atomic::{AtomicU8, Ordering};
    static LEVEL: AtomicU8 = AtomicU8::new(u8::MAX);
    let l = LEVEL.load(Ordering::Relaxed);
    if l != u8::MAX {
        return l;
    }
    #[cfg(target_arch = "x86_64")]
    let l = if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        2
    } else if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        1
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let l = 0;
    LEVEL.store(l, Ordering::Relaxed);
    l
}

/// Compile a function three times (baseline, AVX2+FMA, AVX-512) and pick one at run time.
/// The body is the same source, so the results are bit-identical on every level (the
/// compiler does not reassociate float arithmetic). Helpers it calls must be
/// `#[inline(always)]` to be compiled for the same level.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $crate::ops::simd::multiversion!(@gen [] $(#[$m])* $vis $name($($a: $t),*) $(-> $ret)? $body);
    };
    // The same for an `unsafe fn` (one whose caller upholds a contract the types cannot say).
    ($(#[$m:meta])* $vis:vis unsafe fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $crate::ops::simd::multiversion!(@gen [unsafe] $(#[$m])* $vis $name($($a: $t),*) $(-> $ret)? $body);
    };
    (@gen [$($u:tt)?] $(#[$m:meta])* $vis:vis $name:ident($($a:ident: $t:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis $($u)? fn $name($($a: $t),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            $($u)? fn imp($($a: $t),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($a: $t),*) $(-> $ret)? { imp($($a),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($a: $t),*) $(-> $ret)? { imp($($a),*) }
                match $crate::ops::simd::simd_level() {
                    // SAFETY: the CPU supports the features (checked at run time); an
                    // `unsafe fn`'s caller upholds its own contract.
                    2 => return unsafe { v4($($a),*) },
                    1 => return unsafe { v3($($a),*) },
                    _ => {}
                }
            }
            // SAFETY (an `unsafe fn`): the caller upholds the function's contract.
            #[allow(unused_unsafe)]
            let r = unsafe { imp($($a),*) };
            r
        }
    };
}

pub(crate) use multiversion;
