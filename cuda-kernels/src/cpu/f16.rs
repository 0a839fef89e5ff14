//! fp16 wire codec: `f32` slices to little-endian IEEE half-precision bytes and back.
//!
//! Encoding rounds to nearest-even. Finite values beyond the fp16 range
//! (|x| > 65504) saturate to ±65504, as the reference's `Float16Compression`
//! clamps before casting; NaN stays NaN and ±inf stays ±inf, so a receiver can
//! still spot a poisoned part with [`all_finite`](super::all_finite) after
//! decoding. Relative error of a normal value is at most 2^-11; values below
//! 2^-14 lose precision gradually (subnormals) and below 2^-25 become 0.
//!
//! The byte functions accept unaligned slices, as they arrive from the network.

use half::f16;

use crate::{
    Result,
    error::{check_finite, check_len},
};

/// Largest finite fp16 value.
pub const F16_MAX: f32 = 65504.0;

/// Bytes needed to encode `n` values.
pub fn encoded_len(n: usize) -> usize {
    n * 2
}

/// Encodes `src` into `dst` (`2 * src.len()` bytes, little-endian fp16).
///
/// # Errors
/// [`KernelError::LengthMismatch`](crate::KernelError::LengthMismatch) if `dst` has the wrong length.
pub fn encode(src: &[f32], dst: &mut [u8]) -> Result<()> {
    check_len(
        "f16::encode",
        "dst bytes",
        encoded_len(src.len()),
        dst.len(),
    )?;
    encode_chunk_par(src, dst);
    Ok(())
}

/// Encodes `src` into a new byte vector.
pub fn encode_to_vec(src: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; encoded_len(src.len())];
    encode_chunk_par(src, &mut out);
    out
}

fn encode_chunk_par(src: &[f32], dst: &mut [u8]) {
    super::par_encode16(src, dst, encode_chunk);
}

/// Decodes little-endian fp16 bytes into `dst` (`src.len() == 2 * dst.len()`).
///
/// # Errors
/// [`KernelError::LengthMismatch`](crate::KernelError::LengthMismatch) if the lengths disagree.
pub fn decode(src: &[u8], dst: &mut [f32]) -> Result<()> {
    check_len(
        "f16::decode",
        "src bytes",
        encoded_len(dst.len()),
        src.len(),
    )?;
    run_decode(src, dst, None);
    Ok(())
}

/// `acc += weight * decode(src)`, fused: the decoded values never touch memory.
///
/// # Errors
/// [`KernelError::LengthMismatch`](crate::KernelError::LengthMismatch) if the lengths disagree,
/// [`KernelError::NonFiniteScalar`](crate::KernelError::NonFiniteScalar) if `weight` is NaN or infinite.
pub fn decode_accumulate(src: &[u8], acc: &mut [f32], weight: f32) -> Result<()> {
    const OP: &str = "f16::decode_accumulate";
    check_len(OP, "src bytes", encoded_len(acc.len()), src.len())?;
    check_finite(OP, "weight", weight)?;
    run_decode(src, acc, Some(weight));
    Ok(())
}

fn run_decode(src: &[u8], dst: &mut [f32], weight: Option<f32>) {
    super::par_decode16(src, dst, weight, decode_chunk);
}

/// Saturates finite out-of-range values; NaN and ±inf pass through.
#[inline]
fn saturate(x: f32) -> f32 {
    if x.is_finite() {
        x.clamp(-F16_MAX, F16_MAX)
    } else {
        x
    }
}

/// Scalar encode of one value (the reference the SIMD path must match).
#[inline]
pub(crate) fn encode_one(x: f32) -> u16 {
    f16::from_f32(saturate(x)).to_bits()
}

#[inline]
pub(crate) fn decode_one(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

fn encode_chunk(src: &[f32], dst: &mut [u8]) {
    debug_assert_eq!(dst.len(), 2 * src.len());
    let done = simd::encode(src, dst);
    for (x, d) in src[done..].iter().zip(dst[2 * done..].chunks_exact_mut(2)) {
        d.copy_from_slice(&encode_one(*x).to_le_bytes());
    }
}

fn decode_chunk(src: &[u8], dst: &mut [f32], weight: Option<f32>) {
    debug_assert_eq!(src.len(), 2 * dst.len());
    let done = simd::decode(src, dst, weight);
    let rest = src[2 * done..]
        .chunks_exact(2)
        .map(|b| decode_one(u16::from_le_bytes([b[0], b[1]])));
    match weight {
        None => dst[done..].iter_mut().zip(rest).for_each(|(d, x)| *d = x),
        Some(w) => dst[done..]
            .iter_mut()
            .zip(rest)
            .for_each(|(d, x)| *d += w * x),
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::F16_MAX;

    fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx") && std::arch::is_x86_feature_detected!("f16c")
    }

    /// Encodes the longest prefix that is a multiple of 8; returns its length.
    pub(super) fn encode(src: &[f32], dst: &mut [u8]) -> usize {
        if !available() || dst.len() < 2 * src.len() {
            return 0;
        }
        // SAFETY: AVX and F16C were detected above, and dst holds 2 bytes per
        // element of src (checked above), which is all `encode_avx` touches.
        unsafe { encode_avx(src, dst) }
    }

    /// Decodes (or decodes and accumulates) the longest multiple-of-8 prefix.
    pub(super) fn decode(src: &[u8], dst: &mut [f32], weight: Option<f32>) -> usize {
        if !available() || src.len() < 2 * dst.len() {
            return 0;
        }
        // SAFETY: AVX and F16C were detected above, and src holds 2 bytes per
        // element of dst (checked above), which is all `decode_avx` reads.
        unsafe { decode_avx(src, dst, weight) }
    }

    #[target_feature(enable = "avx,f16c")]
    fn encode_avx(src: &[f32], dst: &mut [u8]) -> usize {
        let n = src.len() / 8 * 8;
        let max = _mm256_set1_ps(F16_MAX);
        let inf = _mm256_set1_ps(f32::INFINITY);
        let sign = _mm256_set1_ps(-0.0);
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 <= n <= src.len() and 2 * (i + 8) <= dst.len(); the
            // unaligned load/store intrinsics have no alignment requirement.
            unsafe {
                let x = _mm256_loadu_ps(src.as_ptr().add(i));
                let abs = _mm256_andnot_ps(sign, x);
                // Finite and too large (ordered compares are false for NaN).
                let big = _mm256_and_ps(
                    _mm256_cmp_ps::<_CMP_GT_OQ>(abs, max),
                    _mm256_cmp_ps::<_CMP_LT_OQ>(abs, inf),
                );
                let sat = _mm256_or_ps(_mm256_and_ps(sign, x), max);
                let y = _mm256_blendv_ps(x, sat, big);
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y);
                _mm_storeu_si128(dst.as_mut_ptr().add(2 * i).cast::<__m128i>(), h);
            }
        }
        n
    }

    #[target_feature(enable = "avx,f16c")]
    fn decode_avx(src: &[u8], dst: &mut [f32], weight: Option<f32>) -> usize {
        let n = dst.len() / 8 * 8;
        match weight {
            None => {
                for i in (0..n).step_by(8) {
                    // SAFETY: i + 8 <= n <= dst.len() and 2 * (i + 8) <= src.len();
                    // unaligned loads/stores.
                    unsafe {
                        let h = _mm_loadu_si128(src.as_ptr().add(2 * i).cast::<__m128i>());
                        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
                    }
                }
            }
            Some(w) => {
                let w = _mm256_set1_ps(w);
                for i in (0..n).step_by(8) {
                    // SAFETY: as above.
                    unsafe {
                        let h = _mm_loadu_si128(src.as_ptr().add(2 * i).cast::<__m128i>());
                        let p = dst.as_mut_ptr().add(i);
                        let acc =
                            _mm256_add_ps(_mm256_loadu_ps(p), _mm256_mul_ps(w, _mm256_cvtph_ps(h)));
                        _mm256_storeu_ps(p, acc);
                    }
                }
            }
        }
        n
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    // Portable path: the scalar loops in the parent do everything; `half`
    // uses the hardware conversion instructions where the target has them.
    pub(super) fn encode(_: &[f32], _: &mut [u8]) -> usize {
        0
    }
    pub(super) fn decode(_: &[u8], _: &mut [f32], _: Option<f32>) -> usize {
        0
    }
}

#[cfg(target_endian = "big")]
compile_error!("the fp16 and 8-bit wire codecs assume a little-endian host");
