//! CPU kernels on plain slices: multi-threaded with rayon, inner loops written
//! so the compiler vectorises them (fp16 conversion uses F16C when the CPU has it).
//!
//! These are the functions the averaging crate calls on parts received from the
//! network: they validate lengths and scalars and return typed errors, never panic.

mod elementwise;
pub(crate) mod elementwise_checks {
    pub(crate) use super::elementwise::{check_weights, normalize};
}
pub mod bf16;
pub mod f16;
mod optim;
pub mod q8;

pub use elementwise::{
    AccumulateCheck, accumulate, accumulate_checked, all_finite, copy, scale, weighted_average,
    weighted_delta, weighted_sum,
};
pub use optim::{adamw_step, lamb_step, sgd_step};

/// Elements per rayon task: 128 KiB of `f32`, small enough to balance, large
/// enough that scheduling costs nothing next to the memory traffic.
pub(crate) const CHUNK: usize = 1 << 15;

/// Below this many elements an op runs on the calling thread.
pub(crate) const PAR_MIN: usize = 1 << 16;

/// Runs a 16-bit wire encoder (`chunk(src, dst)`, 2 bytes per value) over
/// `src`, in parallel chunks above [`PAR_MIN`]. Lengths are checked by the caller.
pub(crate) fn par_encode16(src: &[f32], dst: &mut [u8], chunk: impl Fn(&[f32], &mut [u8]) + Sync) {
    use rayon::prelude::*;
    if src.len() < PAR_MIN {
        chunk(src, dst);
    } else {
        dst.par_chunks_mut(2 * CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| chunk(s, d));
    }
}

/// Runs a 16-bit wire decoder (`chunk(src, dst, weight)`: overwrite `dst`, or
/// `dst += weight * decoded` with a weight) over `dst`, in parallel chunks above
/// [`PAR_MIN`]. Lengths are checked by the caller.
pub(crate) fn par_decode16(
    src: &[u8],
    dst: &mut [f32],
    weight: Option<f32>,
    chunk: impl Fn(&[u8], &mut [f32], Option<f32>) + Sync,
) {
    use rayon::prelude::*;
    if dst.len() < PAR_MIN {
        chunk(src, dst, weight);
    } else {
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(2 * CHUNK))
            .for_each(|(d, s)| chunk(s, d, weight));
    }
}

/// True when the CPU has AVX2: the scalar kernels marked with
/// `#[target_feature(enable = "avx2")]` twins then run with 8-wide vectors.
/// Only integer/compare/convert width changes; no FMA is enabled, so results
/// are bit-identical to the baseline build.
#[inline]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `$name` running `$body_fn` compiled with AVX2 when available.
macro_rules! avx2_twin {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $imp:ident;) => {
        $(#[$doc])*
        #[inline]
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) -> $ret {
                    $imp($($arg),*)
                }
                if $crate::cpu::has_avx2() {
                    // SAFETY: AVX2 support was detected at run time just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $imp($($arg),*)
        }
    };
}
pub(crate) use avx2_twin;
