//! Blockwise 8-bit codec: each block of `block_size` values stores one `f32`
//! scale (`absmax / 127`) and one signed byte per value,
//! `q = round_half_away(x * 127 / absmax)` in `[-127, 127]`.
//!
//! # Error bound
//! For a block with maximum magnitude `absmax`, every decoded value satisfies
//! `|x - decode(x)| <= absmax / 254 + 4 * f32::EPSILON * |x|` (half a
//! quantization step plus rounding of the scale). Blocks with
//! `absmax < 2^-120` are stored as all zeros (error `< 2^-120`), because
//! `127 / absmax` would overflow `f32`.
//!
//! # Non-finite input
//! A block that contains NaN or ±inf gets a NaN scale and decodes to all NaN,
//! so a poisoned contribution stays visible to [`all_finite`](super::all_finite)
//! instead of being quantized into plausible numbers.
//!
//! # Wire format
//! `encode` writes `[scale_0 .. scale_{B-1}: f32 little-endian][codes: n × i8]`
//! with `B = ceil(n / block_size)`; [`encoded_len`] gives the size. The block
//! size is not stored: both sides must agree on it ([`DEFAULT_BLOCK_SIZE`]
//! matches the reference's bitsandbytes blockwise quantization).

use std::ops::Range;

use rayon::prelude::*;

use super::{CHUNK, PAR_MIN};
use crate::{
    KernelError, Result,
    error::{check_finite, check_len},
};

/// Default values per block (the reference's `BlockwiseQuantization` uses 4096).
pub const DEFAULT_BLOCK_SIZE: usize = 4096;

/// Blocks whose `absmax` is below this are encoded as zeros.
pub const MIN_ABSMAX: f32 = 7.523_164e-37; // 2^-120

/// Number of blocks (scales) for `n` values.
pub fn num_blocks(n: usize, block_size: usize) -> usize {
    n.div_ceil(block_size.max(1))
}

/// Bytes needed to encode `n` values with `block_size`.
pub fn encoded_len(n: usize, block_size: usize) -> usize {
    4 * num_blocks(n, block_size) + n
}

pub(crate) fn check_block(block_size: usize) -> Result<()> {
    if block_size == 0 {
        Err(KernelError::InvalidBlockSize { block_size })
    } else {
        Ok(())
    }
}

/// Encodes `src` into `dst` ([`encoded_len`] bytes).
///
/// # Errors
/// [`KernelError::InvalidBlockSize`] for a zero block size,
/// [`KernelError::LengthMismatch`] if `dst` has the wrong length.
pub fn encode(src: &[f32], block_size: usize, dst: &mut [u8]) -> Result<()> {
    check_block(block_size)?;
    check_len(
        "q8::encode",
        "dst bytes",
        encoded_len(src.len(), block_size),
        dst.len(),
    )?;
    let (scales, codes) = dst.split_at_mut(4 * num_blocks(src.len(), block_size));
    encode_into::<u8>(src, block_size, scales, bytes_as_codes_mut(codes));
    Ok(())
}

/// Encodes `src` into a new byte vector.
///
/// # Errors
/// [`KernelError::InvalidBlockSize`] for a zero block size.
pub fn encode_to_vec(src: &[f32], block_size: usize) -> Result<Vec<u8>> {
    check_block(block_size)?;
    let mut out = vec![0u8; encoded_len(src.len(), block_size)];
    encode(src, block_size, &mut out)?;
    Ok(out)
}

/// Decodes `src` (as written by [`encode`]) into `dst`.
///
/// # Errors
/// [`KernelError::InvalidBlockSize`], or [`KernelError::LengthMismatch`] if
/// `src` is not `encoded_len(dst.len(), block_size)` bytes.
pub fn decode(src: &[u8], block_size: usize, dst: &mut [f32]) -> Result<()> {
    check_block(block_size)?;
    check_len(
        "q8::decode",
        "src bytes",
        encoded_len(dst.len(), block_size),
        src.len(),
    )?;
    let (scales, codes) = src.split_at(4 * num_blocks(dst.len(), block_size));
    decode_into::<u8>(scales, bytes_as_codes(codes), block_size, dst, None);
    Ok(())
}

/// `acc += weight * decode(src)`, fused.
///
/// # Errors
/// As [`decode`], plus [`KernelError::NonFiniteScalar`] for a NaN/inf weight.
pub fn decode_accumulate(
    src: &[u8],
    block_size: usize,
    acc: &mut [f32],
    weight: f32,
) -> Result<()> {
    const OP: &str = "q8::decode_accumulate";
    check_block(block_size)?;
    check_len(
        OP,
        "src bytes",
        encoded_len(acc.len(), block_size),
        src.len(),
    )?;
    check_finite(OP, "weight", weight)?;
    let (scales, codes) = src.split_at(4 * num_blocks(acc.len(), block_size));
    decode_into::<u8>(scales, bytes_as_codes(codes), block_size, acc, Some(weight));
    Ok(())
}

/// Decodes values `range` of an encoding of `n` values (as written by
/// [`encode`]) into `dst`, which holds `range.len()` values: a slice of a
/// part straight into the tensor it belongs to, even where the range starts or
/// ends inside a block.
///
/// # Errors
/// [`KernelError::InvalidBlockSize`]; [`KernelError::LengthMismatch`] if `src`
/// is not `encoded_len(n, block_size)` bytes or `dst` not `range.len()`
/// values; [`KernelError::RangeOutOfBounds`] if `range` is not inside `0..n`.
pub fn decode_range(
    src: &[u8],
    block_size: usize,
    n: usize,
    range: Range<usize>,
    dst: &mut [f32],
) -> Result<()> {
    decode_range_impl("q8::decode_range", src, block_size, n, range, dst, None)
}

/// `acc += weight * decode(src)[range]`, fused; see [`decode_range`].
///
/// # Errors
/// As [`decode_range`], plus [`KernelError::NonFiniteScalar`] for a NaN/inf
/// weight.
pub fn decode_range_accumulate(
    src: &[u8],
    block_size: usize,
    n: usize,
    range: Range<usize>,
    acc: &mut [f32],
    weight: f32,
) -> Result<()> {
    const OP: &str = "q8::decode_range_accumulate";
    check_finite(OP, "weight", weight)?;
    decode_range_impl(OP, src, block_size, n, range, acc, Some(weight))
}

fn decode_range_impl(
    op: &'static str,
    src: &[u8],
    block_size: usize,
    n: usize,
    range: Range<usize>,
    dst: &mut [f32],
    weight: Option<f32>,
) -> Result<()> {
    check_block(block_size)?;
    check_len(op, "src bytes", encoded_len(n, block_size), src.len())?;
    if range.start > range.end || range.end > n {
        return Err(KernelError::RangeOutOfBounds {
            op,
            start: range.start,
            end: range.end,
            len: n,
        });
    }
    check_len(op, "dst", range.len(), dst.len())?;
    let (scales, codes) = src.split_at(4 * num_blocks(n, block_size));
    let codes = bytes_as_codes(codes);
    let scale = |at: usize| <u8 as ScaleSlot>::load(&scales[4 * (at / block_size)..]);
    let (mut at, end) = (range.start, range.end);
    let mut dst = dst;
    // The partial block the range starts in.
    let head_end = end.min(at.next_multiple_of(block_size));
    if head_end > at {
        let (d, rest) = dst.split_at_mut(head_end - at);
        decode_block(&codes[at..head_end], scale(at), d, weight);
        (dst, at) = (rest, head_end);
    }
    // Whole blocks (the encoding's last block is whole even when short).
    let whole_end = if end == n {
        end
    } else {
        end / block_size * block_size
    };
    if whole_end > at {
        let (d, rest) = dst.split_at_mut(whole_end - at);
        let blocks = at / block_size..whole_end.div_ceil(block_size);
        decode_into::<u8>(
            &scales[4 * blocks.start..4 * blocks.end],
            &codes[at..whole_end],
            block_size,
            d,
            weight,
        );
        (dst, at) = (rest, whole_end);
    }
    // The partial block it ends in.
    if end > at {
        decode_block(&codes[at..end], scale(at), dst, weight);
    }
    Ok(())
}

fn bytes_as_codes(b: &[u8]) -> &[i8] {
    bytemuck::cast_slice(b)
}

fn bytes_as_codes_mut(b: &mut [u8]) -> &mut [i8] {
    bytemuck::cast_slice_mut(b)
}

/// Storage of one block's scale: an `f32`, or 4 little-endian bytes on the wire.
pub(crate) trait ScaleSlot: Copy + Send + Sync + 'static {
    const WIDTH: usize;
    fn store(slot: &mut [Self], v: f32);
    fn load(slot: &[Self]) -> f32;
}

impl ScaleSlot for f32 {
    const WIDTH: usize = 1;
    fn store(slot: &mut [Self], v: f32) {
        slot[0] = v;
    }
    fn load(slot: &[Self]) -> f32 {
        slot[0]
    }
}

impl ScaleSlot for u8 {
    const WIDTH: usize = 4;
    fn store(slot: &mut [Self], v: f32) {
        slot.copy_from_slice(&v.to_le_bytes());
    }
    fn load(slot: &[Self]) -> f32 {
        f32::from_le_bytes([slot[0], slot[1], slot[2], slot[3]])
    }
}

/// Blocks per rayon task, so a task covers about [`CHUNK`] values.
fn group(block_size: usize) -> usize {
    (CHUNK / block_size).max(1)
}

/// Encodes with scales and codes in separate slices (lengths already checked).
pub(crate) fn encode_into<S: ScaleSlot>(
    src: &[f32],
    block_size: usize,
    scales: &mut [S],
    codes: &mut [i8],
) {
    let g = group(block_size);
    let task = |(s, (c, x)): (&mut [S], (&mut [i8], &[f32]))| {
        for (s, (c, x)) in s
            .chunks_mut(S::WIDTH)
            .zip(c.chunks_mut(block_size).zip(x.chunks(block_size)))
        {
            S::store(s, encode_block(x, c));
        }
    };
    if src.len() < PAR_MIN {
        task((scales, (codes, src)));
    } else {
        scales
            .par_chunks_mut(g * S::WIDTH)
            .zip(
                codes
                    .par_chunks_mut(g * block_size)
                    .zip(src.par_chunks(g * block_size)),
            )
            .for_each(task);
    }
}

/// Decodes (or decodes and accumulates) from separate scales and codes.
pub(crate) fn decode_into<S: ScaleSlot>(
    scales: &[S],
    codes: &[i8],
    block_size: usize,
    dst: &mut [f32],
    weight: Option<f32>,
) {
    let g = group(block_size);
    let task = |(s, (c, d)): (&[S], (&[i8], &mut [f32]))| {
        for (s, (c, d)) in s
            .chunks(S::WIDTH)
            .zip(c.chunks(block_size).zip(d.chunks_mut(block_size)))
        {
            decode_block(c, S::load(s), d, weight);
        }
    };
    if dst.len() < PAR_MIN {
        task((scales, (codes, dst)));
    } else {
        scales
            .par_chunks(g * S::WIDTH)
            .zip(
                codes
                    .par_chunks(g * block_size)
                    .zip(dst.par_chunks_mut(g * block_size)),
            )
            .for_each(task);
    }
}

/// Quantizes one block; returns its scale.
#[inline]
fn encode_block(x: &[f32], q: &mut [i8]) -> f32 {
    debug_assert_eq!(x.len(), q.len());
    let max_bits = simd::max_abs_bits(x).unwrap_or_else(|| max_abs_bits_scalar(x));
    if max_bits >= f32::INFINITY.to_bits() {
        q.fill(0);
        return f32::NAN;
    }
    let absmax = f32::from_bits(max_bits);
    if absmax < MIN_ABSMAX {
        q.fill(0);
        return 0.0;
    }
    let inv = 127.0 / absmax;
    let done = simd::quantize(x, inv, q);
    quantize_scalar(&x[done..], inv, &mut q[done..]);
    absmax / 127.0
}

/// Largest `|x|` bit pattern (for |x| the IEEE bits order like the value, and
/// NaN/inf are >= the bits of +inf).
#[inline]
fn max_abs_bits_scalar(x: &[f32]) -> u32 {
    x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff))
}

/// `q = round_half_away(clamp(x * inv, -127, 127))`: the codec's formula, one
/// value at a time (the SIMD path is bit-identical to it).
#[inline]
fn quantize_scalar(x: &[f32], inv: f32, q: &mut [i8]) {
    for (q, &x) in q.iter_mut().zip(x) {
        let y = (x * inv).clamp(-127.0, 127.0);
        // Round half away from zero, then truncate.
        // SAFETY: x and inv are finite (non-finite blocks and tiny absmax
        // return before any call), so y is finite and clamped to [-127, 127],
        // and y ± 0.5 lies in [-127.5, 127.5]: representable as i32.
        let r = unsafe { (y + 0.5f32.copysign(y)).to_int_unchecked::<i32>() };
        *q = r as i8;
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// Largest `|x|` bit pattern of the block, with AVX2 (None without it).
    pub(super) fn max_abs_bits(x: &[f32]) -> Option<u32> {
        if !crate::cpu::has_avx2() {
            return None;
        }
        // SAFETY: AVX2 was detected just above; `max_abs_bits_avx2` reads
        // only inside `x`.
        Some(unsafe { max_abs_bits_avx2(x) })
    }

    /// Quantizes the longest multiple-of-32 prefix of `x` into `q` with AVX2;
    /// returns its length (0 without AVX2). `x` must be finite, `inv` finite.
    pub(super) fn quantize(x: &[f32], inv: f32, q: &mut [i8]) -> usize {
        if !crate::cpu::has_avx2() || q.len() < x.len() {
            return 0;
        }
        // SAFETY: AVX2 was detected just above, and `q` is at least as long
        // as `x` (checked above), which bounds every store.
        unsafe { quantize_avx2(x, inv, q) }
    }

    #[target_feature(enable = "avx2")]
    fn max_abs_bits_avx2(x: &[f32]) -> u32 {
        let mask = _mm256_set1_epi32(0x7fff_ffff);
        let mut acc = [_mm256_setzero_si256(); 4];
        let n = x.len() / 32 * 32;
        let p = x.as_ptr();
        for i in (0..n).step_by(32) {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: i + 8k + 8 <= n <= x.len(); unaligned load.
                let v = unsafe { _mm256_loadu_si256(p.add(i + 8 * k).cast::<__m256i>()) };
                *a = _mm256_max_epu32(*a, _mm256_and_si256(v, mask));
            }
        }
        let m = _mm256_max_epu32(
            _mm256_max_epu32(acc[0], acc[1]),
            _mm256_max_epu32(acc[2], acc[3]),
        );
        let mut lanes = [0u32; 8];
        // SAFETY: `lanes` is 32 bytes; unaligned store.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast::<__m256i>(), m) };
        let tail = super::max_abs_bits_scalar(&x[n..]);
        lanes.iter().fold(tail, |a, &b| a.max(b))
    }

    #[target_feature(enable = "avx2")]
    fn quantize_avx2(x: &[f32], inv: f32, q: &mut [i8]) -> usize {
        let n = x.len() / 32 * 32;
        let inv = _mm256_set1_ps(inv);
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        let half = _mm256_set1_ps(0.5);
        let sign = _mm256_set1_ps(-0.0);
        // After the two packs, dword k of each 128-bit lane holds 4 codes of
        // input vector k: this gathers them back into input order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let (src, dst) = (x.as_ptr(), q.as_mut_ptr());
        // The next block follows this one in memory: while this block is
        // quantized from L1, fetch the next one so that the memory reads of
        // the absmax pass and the arithmetic here overlap.
        // Its codes follow this block's codes: request those lines for
        // writing too, so the stores below do not wait for each line.
        let ahead = src.wrapping_add(x.len()).cast::<i8>();
        let ahead_codes = dst.wrapping_add(q.len()).cast_const();
        for i in (0..n).step_by(32) {
            // A prefetch is a hint: it never faults, whatever the address.
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(4 * i));
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(4 * i + 64));
            if i % 64 == 0 {
                _mm_prefetch::<_MM_HINT_ET0>(ahead_codes.wrapping_add(i));
            }
            let conv = |k: usize| {
                // SAFETY: i + 8k + 8 <= n <= x.len(); unaligned load.
                let v = unsafe { _mm256_loadu_ps(src.add(i + 8 * k)) };
                let y = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v, inv), lo), hi);
                // y + copysign(0.5, y), truncated: round half away from zero.
                let r = _mm256_add_ps(y, _mm256_or_ps(_mm256_and_ps(y, sign), half));
                _mm256_cvttps_epi32(r)
            };
            let (a, b, c, d) = (conv(0), conv(1), conv(2), conv(3));
            // Values are in [-127, 127]: the saturating packs are exact.
            let bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
            let out = _mm256_permutevar8x32_epi32(bytes, order);
            // SAFETY: i + 32 <= n <= x.len() <= q.len(); unaligned store.
            unsafe { _mm256_storeu_si256(dst.add(i).cast::<__m256i>(), out) };
        }
        n
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    // Portable path: the scalar loops do everything.
    pub(super) fn max_abs_bits(_: &[f32]) -> Option<u32> {
        None
    }
    pub(super) fn quantize(_: &[f32], _: f32, _: &mut [i8]) -> usize {
        0
    }
}

#[inline]
fn decode_block(q: &[i8], scale: f32, d: &mut [f32], weight: Option<f32>) {
    match weight {
        None => d
            .iter_mut()
            .zip(q)
            .for_each(|(d, &q)| *d = f32::from(q) * scale),
        Some(w) => {
            let ws = w * scale;
            d.iter_mut()
                .zip(q)
                .for_each(|(d, &q)| *d += f32::from(q) * ws);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SIMD quantizer against the scalar formula on values that sit exactly
    /// on rounding ties (x * inv = k + 0.5), signed zeros, the clamp edge and
    /// lengths around the 32-value vector step.
    #[test]
    fn simd_block_matches_scalar_formula() {
        let mut x: Vec<f32> = (-127..127).map(|k| k as f32 + 0.5).collect();
        x.extend([127.0, -127.0, 0.0, -0.0, 126.49999, -0.5, 0.49999997, 1e-30]);
        for len in [1, 31, 32, 33, 63, 64, 65, x.len()] {
            let xs = &x[..len];
            let mut fast = vec![0i8; len];
            let scale = encode_block(xs, &mut fast);
            let absmax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let mut slow = vec![0i8; len];
            if absmax >= MIN_ABSMAX {
                quantize_scalar(xs, 127.0 / absmax, &mut slow);
                assert_eq!(scale.to_bits(), (absmax / 127.0).to_bits(), "len {len}");
            } else {
                assert_eq!(scale, 0.0);
            }
            assert_eq!(fast, slow, "len {len}");
        }
        // absmax 127 makes inv exactly 1: ties round away from zero.
        let mut q = vec![0i8; 256];
        encode_block(&x[..256], &mut q);
        assert_eq!(q[0], -127); // -126.5 -> -127
        assert_eq!(q[126], -1); // -0.5 -> -1
        assert_eq!(q[127], 1); // 0.5 -> 1
    }
}
