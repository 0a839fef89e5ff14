//! bf16 wire codec: `f32` slices to little-endian bfloat16 bytes and back.
//!
//! bfloat16 keeps `f32`'s sign and 8-bit exponent and the top 7 mantissa bits,
//! so it has `f32`'s range with a relative error of at most 2^-9 for normal
//! values (subnormals keep 7 bits below the top of the `f32` subnormal range,
//! so their absolute error is at most 2^-134).
//!
//! * Encoding rounds to nearest, ties to even.
//! * Finite values whose rounding would overflow (|x| >= 0x1.FF p127, within
//!   half a bf16 step of `f32::MAX`) saturate to ±[`BF16_MAX`], as the fp16
//!   codec saturates: a finite input never becomes infinite on the wire.
//! * NaN stays NaN (quieted: the top mantissa bit is set, the sign and the
//!   upper payload bits are kept); ±inf stay ±inf, so a receiver can still spot
//!   a poisoned part with [`all_finite`](super::all_finite) after decoding.
//! * Decoding is exact (`f32` bits = bf16 bits << 16).
//!
//! The byte functions accept unaligned slices, as they arrive from the network.

use crate::{
    Result,
    error::{check_finite, check_len},
};

/// Largest finite bf16 value, `(2 - 2^-7) * 2^127` (bits `0x7F7F`).
pub const BF16_MAX: f32 = f32::from_bits(0x7f7f_0000);

/// Bytes needed to encode `n` values.
pub fn encoded_len(n: usize) -> usize {
    n * 2
}

/// Encodes `src` into `dst` (`2 * src.len()` bytes, little-endian bf16).
///
/// # Errors
/// [`KernelError::LengthMismatch`](crate::KernelError::LengthMismatch) if `dst` has the wrong length.
pub fn encode(src: &[f32], dst: &mut [u8]) -> Result<()> {
    check_len(
        "bf16::encode",
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

/// Decodes little-endian bf16 bytes into `dst` (`src.len() == 2 * dst.len()`).
///
/// # Errors
/// [`KernelError::LengthMismatch`](crate::KernelError::LengthMismatch) if the lengths disagree.
pub fn decode(src: &[u8], dst: &mut [f32]) -> Result<()> {
    check_len(
        "bf16::decode",
        "src bytes",
        encoded_len(dst.len()),
        src.len(),
    )?;
    run_decode(src, dst, None);
    Ok(())
}

/// `acc += weight * decode(src)`, fused: the decoded values never touch memory.
///
/// NaN/inf decoded values propagate into `acc` (IEEE rules).
///
/// # Errors
/// [`KernelError::LengthMismatch`](crate::KernelError::LengthMismatch) if the lengths disagree,
/// [`KernelError::NonFiniteScalar`](crate::KernelError::NonFiniteScalar) if `weight` is NaN or infinite.
pub fn decode_accumulate(src: &[u8], acc: &mut [f32], weight: f32) -> Result<()> {
    const OP: &str = "bf16::decode_accumulate";
    check_len(OP, "src bytes", encoded_len(acc.len()), src.len())?;
    check_finite(OP, "weight", weight)?;
    run_decode(src, acc, Some(weight));
    Ok(())
}

fn run_decode(src: &[u8], dst: &mut [f32], weight: Option<f32>) {
    super::par_decode16(src, dst, weight, decode_chunk);
}

/// Scalar encode of one value (the formula the SIMD path and the CUDA kernel
/// reproduce bit for bit).
#[inline]
pub(crate) fn encode_one(x: f32) -> u16 {
    let bits = x.to_bits();
    let abs = bits & 0x7fff_ffff;
    if abs > 0x7f80_0000 {
        // NaN: keep sign and upper payload, force the quiet bit so that a
        // payload living only in the low 16 bits cannot turn into inf.
        return ((bits >> 16) | 0x0040) as u16;
    }
    // Round to nearest even: add 0x7fff plus the lowest kept bit, truncate.
    // No u32 overflow: abs <= 0x7f80_0000, so bits + 0x8000 < 2^32.
    let rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;
    if abs < 0x7f80_0000 && rounded & 0x7fff == 0x7f80 {
        // A finite value rounded up to inf: saturate to ±BF16_MAX (0x7f7f).
        return (rounded - 1) as u16;
    }
    rounded as u16
}

/// Exact decode of one value.
#[inline]
pub(crate) fn decode_one(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
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

    /// Encodes the longest multiple-of-16 prefix; returns its length.
    pub(super) fn encode(src: &[f32], dst: &mut [u8]) -> usize {
        if !crate::cpu::has_avx2() || dst.len() < 2 * src.len() {
            return 0;
        }
        // SAFETY: AVX2 was detected above, and dst holds 2 bytes per element
        // of src (checked above), which is all `encode_avx2` touches.
        unsafe { encode_avx2(src, dst) }
    }

    /// Decodes (or decodes and accumulates) the longest multiple-of-8 prefix.
    pub(super) fn decode(src: &[u8], dst: &mut [f32], weight: Option<f32>) -> usize {
        if !crate::cpu::has_avx2() || src.len() < 2 * dst.len() {
            return 0;
        }
        // SAFETY: AVX2 was detected above, and src holds 2 bytes per element
        // of dst (checked above), which is all `decode_avx2` reads.
        unsafe { decode_avx2(src, dst, weight) }
    }

    /// `encode_one` on 8 lanes: bf16 bits in the low half of each 32-bit lane.
    #[target_feature(enable = "avx2")]
    fn encode8(x: __m256) -> __m256i {
        let bits = _mm256_castps_si256(x);
        let abs = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fff_ffff));
        let inf = _mm256_set1_epi32(0x7f80_0000);
        // abs and inf are non-negative as i32: signed compares are exact.
        let nan = _mm256_cmpgt_epi32(abs, inf);
        let finite = _mm256_cmpgt_epi32(inf, abs);
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
        let bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb);
        let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(bits, bias));
        // Finite values rounded up to inf: subtract 1 (mask is -1) -> ±0x7f7f.
        let to_inf = _mm256_cmpeq_epi32(
            _mm256_and_si256(rounded, _mm256_set1_epi32(0x7fff)),
            _mm256_set1_epi32(0x7f80),
        );
        let rounded = _mm256_add_epi32(rounded, _mm256_and_si256(finite, to_inf));
        let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(0x0040));
        _mm256_blendv_epi8(rounded, quiet, nan)
    }

    #[target_feature(enable = "avx2")]
    fn encode_avx2(src: &[f32], dst: &mut [u8]) -> usize {
        let n = src.len() / 16 * 16;
        for i in (0..n).step_by(16) {
            // SAFETY: i + 16 <= n <= src.len() and 2 * (i + 16) <= dst.len();
            // unaligned loads/stores.
            unsafe {
                let a = encode8(_mm256_loadu_ps(src.as_ptr().add(i)));
                let b = encode8(_mm256_loadu_ps(src.as_ptr().add(i + 8)));
                // Lanes hold 0..=0xffff: the unsigned-saturating pack is exact.
                // It interleaves 128-bit halves (a0 b0 a1 b1): restore order.
                let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(a, b));
                _mm256_storeu_si256(dst.as_mut_ptr().add(2 * i).cast::<__m256i>(), packed);
            }
        }
        n
    }

    #[target_feature(enable = "avx2")]
    fn decode_avx2(src: &[u8], dst: &mut [f32], weight: Option<f32>) -> usize {
        let n = dst.len() / 8 * 8;
        let load = |i: usize| {
            // SAFETY: 2 * (i + 8) <= 2 * n <= src.len(); unaligned load.
            let h = unsafe { _mm_loadu_si128(src.as_ptr().add(2 * i).cast::<__m128i>()) };
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        };
        match weight {
            None => {
                for i in (0..n).step_by(8) {
                    let x = load(i);
                    // SAFETY: i + 8 <= n <= dst.len(); unaligned store.
                    unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(i), x) };
                }
            }
            Some(w) => {
                let w = _mm256_set1_ps(w);
                for i in (0..n).step_by(8) {
                    let x = load(i);
                    // SAFETY: i + 8 <= n <= dst.len(); unaligned load/store.
                    unsafe {
                        let p = dst.as_mut_ptr().add(i);
                        _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), _mm256_mul_ps(w, x)));
                    }
                }
            }
        }
        n
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    // Portable path: the scalar loops in the parent do everything.
    pub(super) fn encode(_: &[f32], _: &mut [u8]) -> usize {
        0
    }
    pub(super) fn decode(_: &[u8], _: &mut [f32], _: Option<f32>) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Edge values through the SIMD path (16 at a time) and the scalar
    /// formula must give the same bits.
    #[test]
    fn simd_matches_scalar_on_edges() {
        let edges = [
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            f32::MAX,
            f32::MIN,
            BF16_MAX,
            -BF16_MAX,
            f32::from_bits(0x7f7f_7fff), // rounds down to BF16_MAX
            f32::from_bits(0x7f7f_8000), // tie to even: would overflow, saturates
            f32::from_bits(0x3f80_8000), // tie, even below: 1.0
            f32::from_bits(0x3f81_8000), // tie, odd below: rounds up
            f32::from_bits(0x0000_0001), // smallest subnormal
            f32::from_bits(0x0000_8000), // subnormal tie
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0xffc0_0001),
            f32::from_bits(0x7f80_0001), // signalling NaN, payload in low bits
            f32::from_bits(0xff80_0001),
            1.0e-40,
            3.0e38,
        ];
        let src: Vec<f32> = edges.iter().cycle().take(16 * 5 + 3).copied().collect();
        let bytes = encode_to_vec(&src);
        for (i, (x, b)) in src.iter().zip(bytes.chunks_exact(2)).enumerate() {
            let got = u16::from_le_bytes([b[0], b[1]]);
            assert_eq!(got, encode_one(*x), "element {i}: {x:e}");
        }
        assert_eq!(encode_one(f32::from_bits(0x7f7f_8000)), 0x7f7f);
        assert_eq!(encode_one(-f32::MAX), 0xff7f);
        assert_eq!(encode_one(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(encode_one(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(encode_one(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(decode_one(0x7f7f), BF16_MAX);
    }
}
