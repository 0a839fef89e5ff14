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

super::avx2_twin! {
    /// Quantizes one block; returns its scale.
    fn encode_block(x: &[f32], q: &mut [i8]) -> f32 = encode_block_impl;
}

#[inline(always)]
fn encode_block_impl(x: &[f32], q: &mut [i8]) -> f32 {
    let max_bits = x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
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
    for (q, &x) in q.iter_mut().zip(x) {
        let y = (x * inv).clamp(-127.0, 127.0);
        // Round half away from zero, then truncate.
        // SAFETY: x and inv are finite (non-finite blocks and tiny absmax
        // returned above), so y is finite and clamped to [-127, 127], and
        // y ± 0.5 lies in [-127.5, 127.5]: representable as i32. (The checked
        // `as` cast would block vectorisation.)
        let r = unsafe { (y + 0.5f32.copysign(y)).to_int_unchecked::<i32>() };
        *q = r as i8;
    }
    absmax / 127.0
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
