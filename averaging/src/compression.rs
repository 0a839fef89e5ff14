//! Wire codecs for tensor parts: raw fp32, fp16, bf16 and blockwise 8-bit.
//!
//! Encoders append to a byte buffer (the frame being built, so encoding is fused
//! with the copy that sends it); decoders write into an `f32` slice.

use std::ops::Range;

use colony_kernels::cpu as kernels;

use crate::error::{AveragingError, Result};

/// Elements per block of the blockwise 8-bit codec (one `f32` scale per block).
pub const BLOCK_8BIT: usize = colony_kernels::cpu::q8::DEFAULT_BLOCK_SIZE;

/// Compression applied to tensor parts on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Compression {
    /// Raw little-endian `f32`.
    #[default]
    None,
    /// IEEE half precision, values clamped to ±65504 first.
    Float16,
    /// bfloat16: `f32`'s range with 8 significant bits (round to nearest
    /// even; NaN/inf kept so poisoned parts stay visible).
    BFloat16,
    /// Blockwise absmax 8-bit (`colony_kernels::cpu::q8`): per block of
    /// [`BLOCK_8BIT`] values an `f32` scale, then one signed byte per value.
    Blockwise8Bit,
}

impl Compression {
    /// Wire code of this codec.
    pub fn code(self) -> u8 {
        match self {
            Self::None => 0,
            Self::Float16 => 1,
            Self::Blockwise8Bit => 2,
            Self::BFloat16 => 3,
        }
    }

    /// Codec for a wire code.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::None),
            1 => Some(Self::Float16),
            2 => Some(Self::Blockwise8Bit),
            3 => Some(Self::BFloat16),
            _ => None,
        }
    }

    /// Parse `none`, `fp16`, `bf16`, `8bit`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "none" | "fp32" => Some(Self::None),
            "fp16" | "float16" => Some(Self::Float16),
            "bf16" | "bfloat16" => Some(Self::BFloat16),
            "8bit" | "blockwise8bit" => Some(Self::Blockwise8Bit),
            _ => None,
        }
    }

    /// Short name (`none`, `fp16`, `bf16`, `8bit`).
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Float16 => "fp16",
            Self::BFloat16 => "bf16",
            Self::Blockwise8Bit => "8bit",
        }
    }

    /// Bytes needed to encode `n` values.
    pub fn encoded_len(self, n: usize) -> usize {
        match self {
            Self::None => 4 * n,
            Self::Float16 | Self::BFloat16 => 2 * n,
            Self::Blockwise8Bit => 4 * n.div_ceil(BLOCK_8BIT) + n,
        }
    }

    /// Approximate bytes per element, used to size parts.
    pub fn bytes_per_element(self) -> f64 {
        match self {
            Self::None => 4.0,
            Self::Float16 | Self::BFloat16 => 2.0,
            Self::Blockwise8Bit => 1.0 + 4.0 / BLOCK_8BIT as f64,
        }
    }

    /// Append the encoding of `values` to `out`. The codecs are
    /// `colony-kernels`' CPU wire codecs; this only frames them.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + self.encoded_len(values.len()), 0);
        let encoded = self.encode_into(values, &mut out[start..]);
        debug_assert!(
            encoded.is_ok(),
            "encode into an exactly sized buffer: {encoded:?}"
        );
    }

    /// Encode `values` into `dst`, which must be exactly
    /// [`Self::encoded_len`] bytes (a frame's payload, so encoding is fused
    /// with the copy that sends it).
    ///
    /// # Errors
    /// [`AveragingError::Decode`] when `dst` has the wrong length.
    pub fn encode_into(self, values: &[f32], dst: &mut [u8]) -> Result<()> {
        if dst.len() != self.encoded_len(values.len()) {
            return Err(AveragingError::Decode {
                reason: "encode buffer does not match the part size",
            });
        }
        let encoded = match self {
            Self::None => {
                dst.copy_from_slice(bytemuck::cast_slice(values));
                Ok(())
            }
            Self::Float16 => kernels::f16::encode(values, dst),
            Self::BFloat16 => kernels::bf16::encode(values, dst),
            Self::Blockwise8Bit => kernels::q8::encode(values, BLOCK_8BIT, dst),
        };
        encoded.map_err(|_| AveragingError::Decode {
            reason: "codec refused the part",
        })
    }

    /// Decode `bytes` into `out`, which must hold exactly the encoded count.
    ///
    /// # Errors
    /// [`AveragingError::Decode`] when the byte length does not match `out`.
    pub fn decode_into(self, bytes: &[u8], out: &mut [f32]) -> Result<()> {
        if bytes.len() != self.encoded_len(out.len()) {
            return Err(AveragingError::Decode {
                reason: "encoded length does not match the part size",
            });
        }
        let decoded = match self {
            Self::None => {
                match bytemuck::try_cast_slice::<u8, f32>(bytes) {
                    Ok(values) => out.copy_from_slice(values),
                    Err(_) => {
                        for (d, s) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                            *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                        }
                    }
                }
                Ok(())
            }
            Self::Float16 => kernels::f16::decode(bytes, out),
            Self::BFloat16 => kernels::bf16::decode(bytes, out),
            Self::Blockwise8Bit => kernels::q8::decode(bytes, BLOCK_8BIT, out),
        };
        decoded.map_err(|_| AveragingError::Decode {
            reason: "codec refused the part",
        })
    }

    /// [`Self::decode_into`] with a finiteness check. Returns `Ok(false)` on
    /// NaN/inf (an 8-bit block with a non-finite value decodes to all NaN, so
    /// poison stays visible). fp16 is checked on the wire form (half the bytes)
    /// and raw `f32` chunk by chunk while each chunk is still in cache.
    ///
    /// # Errors
    /// As [`Self::decode_into`].
    pub fn decode_into_checked(self, bytes: &[u8], out: &mut [f32]) -> Result<bool> {
        match self {
            Self::None => {
                if bytes.len() != self.encoded_len(out.len()) {
                    return Err(AveragingError::Decode {
                        reason: "encoded length does not match the part size",
                    });
                }
                let mut finite = true;
                for (o, b) in out
                    .chunks_mut(CHECK_CHUNK)
                    .zip(bytes.chunks(4 * CHECK_CHUNK))
                {
                    self.decode_into(b, o)?;
                    finite &= all_finite(o);
                }
                Ok(finite)
            }
            Self::Float16 | Self::BFloat16 => {
                let finite = self.wire_all_finite(bytes, out.len());
                self.decode_into(bytes, out)?;
                Ok(finite)
            }
            Self::Blockwise8Bit => {
                self.decode_into(bytes, out)?;
                Ok(self.wire_all_finite(bytes, out.len()))
            }
        }
    }

    /// `acc += weight · decode(bytes)` for a part whose wire values are all
    /// finite, without materialising the decoded values where the codec allows
    /// (fp16 is checked on the wire form, then decoded and accumulated in one
    /// pass). `scratch` is grown when a codec has to decode first (8-bit, or
    /// raw bytes that are not 4-aligned). Returns `Ok(false)` and leaves `acc`
    /// untouched when a value is NaN/inf.
    ///
    /// # Errors
    /// [`AveragingError::Decode`] for a length mismatch or a non-finite weight.
    pub fn accumulate_checked(
        self,
        bytes: &[u8],
        acc: &mut [f32],
        weight: f32,
        scratch: &mut Vec<f32>,
    ) -> Result<bool> {
        if bytes.len() != self.encoded_len(acc.len()) {
            return Err(AveragingError::Decode {
                reason: "encoded length does not match the part size",
            });
        }
        let refused = |_| AveragingError::Decode {
            reason: "codec refused the part",
        };
        match self {
            Self::Float16 | Self::BFloat16 => {
                if !self.wire_all_finite(bytes, acc.len()) {
                    return Ok(false);
                }
                if self == Self::Float16 {
                    kernels::f16::decode_accumulate(bytes, acc, weight).map_err(refused)?;
                } else {
                    kernels::bf16::decode_accumulate(bytes, acc, weight).map_err(refused)?;
                }
                Ok(true)
            }
            Self::Blockwise8Bit => {
                // Finite scales decode to finite values: check the scales,
                // then decode and accumulate in one pass.
                if !self.wire_all_finite(bytes, acc.len()) {
                    return Ok(false);
                }
                kernels::q8::decode_accumulate(bytes, BLOCK_8BIT, acc, weight).map_err(refused)?;
                Ok(true)
            }
            Self::None => {
                let values: &[f32] = match (self, bytemuck::try_cast_slice::<u8, f32>(bytes)) {
                    (Self::None, Ok(values)) => values,
                    _ => {
                        if scratch.len() < acc.len() {
                            scratch.resize(acc.len(), 0.0);
                        }
                        let tmp = &mut scratch[..acc.len()];
                        self.decode_into(bytes, tmp)?;
                        tmp
                    }
                };
                if !all_finite(values) {
                    return Ok(false);
                }
                kernels::accumulate(acc, values, weight).map_err(refused)?;
                Ok(true)
            }
        }
    }
}

/// fp16 exponent bits.
const EXP_F16: u16 = 0x7C00;
/// bf16 exponent bits.
const EXP_BF16: u16 = 0x7F80;

impl Compression {
    /// Whether the wire encoding `bytes` of `n` values decodes to finite
    /// values only, checked without decoding: 16-bit values on their exponent
    /// bits, 8-bit blocks on their scales. `false` for raw `f32`, which must
    /// be checked as values.
    pub(crate) fn wire_all_finite(self, bytes: &[u8], n: usize) -> bool {
        match self {
            Self::Float16 | Self::BFloat16 => {
                bytes.len() == 2 * n && half_wire_all_finite(bytes, self.exponent_mask())
            }
            Self::Blockwise8Bit => {
                bytes.len() == self.encoded_len(n) && q8_wire_all_finite(bytes, n)
            }
            // Raw f32 beside compressed tensors ([`crate::Codecs`]): the
            // bytes need not be 4-aligned there.
            Self::None => {
                bytes.len() == 4 * n
                    && bytes
                        .chunks_exact(4)
                        .all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite())
            }
        }
    }

    /// Apply values `range` of a part's wire encoding `part` (of `n` values)
    /// to `dst` (`range.len()` values): `dst = decode` when `alpha == 1`, else
    /// `dst += alpha · (decode − dst)`. Decodes straight into `dst`, also
    /// where `range` starts or ends inside an 8-bit block.
    ///
    /// # Errors
    /// [`AveragingError::Decode`] for a length or range mismatch, or for raw
    /// `f32` (which is staged as values, not wire bytes).
    pub(crate) fn apply_wire(
        self,
        part: &[u8],
        n: usize,
        range: Range<usize>,
        dst: &mut [f32],
        alpha: f32,
    ) -> Result<()> {
        let refused = |_| AveragingError::Decode {
            reason: "codec refused the part",
        };
        if part.len() != self.encoded_len(n)
            || range.start > range.end
            || range.end > n
            || range.len() != dst.len()
        {
            return Err(AveragingError::Decode {
                reason: "encoded length does not match the part size",
            });
        }
        // Blend: (1 − alpha)·local first, then + alpha·average.
        let blend = |dst: &mut [f32]| kernels::scale(dst, 1.0 - alpha).map_err(refused);
        // 16-bit values of the range (lengths checked above).
        let half = || &part[2 * range.start..2 * range.end];
        match self {
            Self::None => {
                let raw = part[4 * range.start..4 * range.end].chunks_exact(4);
                for (d, b) in dst.iter_mut().zip(raw) {
                    let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    *d = if alpha == 1.0 {
                        v
                    } else {
                        *d + alpha * (v - *d)
                    };
                }
                Ok(())
            }
            Self::Float16 | Self::BFloat16 if alpha == 1.0 => self.decode_into(half(), dst),
            Self::Float16 => {
                blend(dst)?;
                kernels::f16::decode_accumulate(half(), dst, alpha).map_err(refused)
            }
            Self::BFloat16 => {
                blend(dst)?;
                kernels::bf16::decode_accumulate(half(), dst, alpha).map_err(refused)
            }
            Self::Blockwise8Bit if alpha == 1.0 => {
                kernels::q8::decode_range(part, BLOCK_8BIT, n, range.clone(), dst).map_err(refused)
            }
            Self::Blockwise8Bit => {
                blend(dst)?;
                kernels::q8::decode_range_accumulate(part, BLOCK_8BIT, n, range.clone(), dst, alpha)
                    .map_err(refused)
            }
        }
    }

    /// Exponent bits of a 16-bit wire format (0 for the others).
    fn exponent_mask(self) -> u16 {
        match self {
            Self::Float16 => EXP_F16,
            Self::BFloat16 => EXP_BF16,
            Self::None | Self::Blockwise8Bit => 0,
        }
    }
}

/// Values per chunk when decoding and checking raw `f32` (64 KiB: the chunk is
/// checked while it is still in L1/L2).
const CHECK_CHUNK: usize = 16 * 1024;

/// Whether every little-endian 16-bit float in `bytes` is finite: its
/// exponent bits (`exp`: `0x7C00` for fp16, `0x7F80` for bf16) are not all
/// ones. A trailing odd byte is ignored (length checks reject it).
fn half_wire_all_finite(bytes: &[u8], exp: u16) -> bool {
    const _: () = assert!(EXP_F16 == 0x7C00 && EXP_BF16 == 0x7F80);
    let bad = |h: u16| h & exp == exp;
    match bytemuck::try_cast_slice::<u8, u16>(&bytes[..bytes.len() & !1]) {
        // Branch-free per block so the loop vectorises; little-endian wire =
        // native order on every target we build for, checked below.
        Ok(halves) if cfg!(target_endian = "little") => halves
            .chunks(1024)
            .all(|c| !c.iter().fold(false, |any, &h| any | bad(h))),
        _ => bytes
            .chunks_exact(2)
            .all(|c| !bad(u16::from_le_bytes([c[0], c[1]]))),
    }
}

/// Whether the 8-bit wire form of `n` values decodes to finite values only:
/// every block scale is finite and small enough that any code (`|q| <= 128`
/// on a hostile wire) times it stays finite. The codec gives a block holding
/// NaN/inf a NaN scale, so poisoned input fails here without decoding.
fn q8_wire_all_finite(bytes: &[u8], n: usize) -> bool {
    let scales = 4 * n.div_ceil(BLOCK_8BIT);
    bytes.len() >= scales
        && bytes[..scales].chunks_exact(4).all(|s| {
            let s = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            s.is_finite() && s.abs() <= f32::MAX / 128.0
        })
}

/// True when every value is finite (`colony-kernels`' vectorised check).
pub fn all_finite(values: &[f32]) -> bool {
    kernels::all_finite(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919) % 2001) as f32 / 100.0 - 10.0)
            .collect()
    }

    #[test]
    fn roundtrips_within_codec_precision() {
        let v = sample(10_000);
        for (c, tol) in [
            (Compression::None, 0.0),
            (Compression::Float16, 1e-2),
            (Compression::BFloat16, 10.0 / 256.0),
            (Compression::Blockwise8Bit, 10.0 / 127.0),
        ] {
            let mut bytes = vec![9u8; 3];
            c.encode(&v, &mut bytes);
            assert_eq!(bytes.len(), 3 + c.encoded_len(v.len()));
            let mut out = vec![0.0; v.len()];
            c.decode_into(&bytes[3..], &mut out).unwrap();
            let err = v
                .iter()
                .zip(&out)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(err <= tol, "{c:?}: err {err}");
            assert_eq!(Compression::from_code(c.code()), Some(c));
        }
    }

    #[test]
    fn fp16_clamps_instead_of_overflowing() {
        let mut bytes = Vec::new();
        Compression::Float16.encode(&[1e9, -1e9], &mut bytes);
        let mut out = [0.0; 2];
        Compression::Float16.decode_into(&bytes, &mut out).unwrap();
        assert_eq!(out, [65504.0, -65504.0]);
    }

    #[test]
    fn checked_paths_agree_with_decode_and_catch_poison() {
        let v = sample(70_001);
        for c in [
            Compression::None,
            Compression::Float16,
            Compression::BFloat16,
            Compression::Blockwise8Bit,
        ] {
            let mut bytes = Vec::new();
            c.encode(&v, &mut bytes);
            // encode_into is the same bytes as encode.
            let mut direct = vec![0u8; c.encoded_len(v.len())];
            c.encode_into(&v, &mut direct).unwrap();
            assert_eq!(direct, bytes);
            let mut plain = vec![0.0; v.len()];
            c.decode_into(&bytes, &mut plain).unwrap();
            let mut checked = vec![0.0; v.len()];
            assert!(c.decode_into_checked(&bytes, &mut checked).unwrap());
            assert_eq!(plain, checked);
            // Fused accumulate equals decode then accumulate.
            let mut acc = vec![1.0f32; v.len()];
            let mut scratch = vec![0.0; v.len()];
            assert!(
                c.accumulate_checked(&bytes, &mut acc, 0.5, &mut scratch)
                    .unwrap()
            );
            for (a, p) in acc.iter().zip(&plain) {
                assert!(
                    (a - (1.0 + 0.5 * p)).abs() <= 1e-6 * (1.0 + p.abs()),
                    "{c:?}"
                );
            }
            // One poisoned value anywhere is caught and leaves acc untouched.
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut w = v.clone();
                w[v.len() - 3] = bad;
                let mut bytes = Vec::new();
                c.encode(&w, &mut bytes);
                assert!(
                    !c.decode_into_checked(&bytes, &mut checked).unwrap(),
                    "{c:?}"
                );
                let before = acc.clone();
                assert!(
                    !c.accumulate_checked(&bytes, &mut acc, 1.0, &mut scratch)
                        .unwrap()
                );
                assert_eq!(acc, before, "{c:?} touched acc");
            }
            // Wrong sizes are typed errors.
            assert!(c.encode_into(&v, &mut direct[1..]).is_err());
            assert!(c.decode_into_checked(&bytes[1..], &mut checked).is_err());
            assert!(
                c.accumulate_checked(&bytes, &mut acc[1..], 1.0, &mut scratch)
                    .is_err()
            );
        }
    }

    #[test]
    fn forged_8bit_scales_are_caught_without_decoding_to_inf() {
        let c = Compression::Blockwise8Bit;
        let v = sample(3 * BLOCK_8BIT + 5);
        let mut good = Vec::new();
        c.encode(&v, &mut good);
        let mut out = vec![0.0; v.len()];
        let mut scratch = Vec::new();
        // A hostile peer writes its own scales: NaN, inf, or a finite scale so
        // large that code 127 (or -128) times it overflows.
        for scale in [f32::NAN, f32::INFINITY, f32::MAX, f32::MAX / 100.0] {
            let mut bytes = good.clone();
            bytes[8..12].copy_from_slice(&scale.to_le_bytes());
            assert!(!c.decode_into_checked(&bytes, &mut out).unwrap(), "{scale}");
            let mut acc = vec![0.0; v.len()];
            assert!(
                !c.accumulate_checked(&bytes, &mut acc, 1.0, &mut scratch)
                    .unwrap(),
                "{scale}"
            );
            assert!(acc.iter().all(|a| *a == 0.0));
        }
        // The largest accepted scale still decodes to finite values.
        let mut bytes = good.clone();
        bytes[8..12].copy_from_slice(&(f32::MAX / 128.0).to_le_bytes());
        let codes = 4 * v.len().div_ceil(BLOCK_8BIT);
        bytes[codes + 2 * BLOCK_8BIT] = 0x80; // -128 in block 2
        assert!(c.decode_into_checked(&bytes, &mut out).unwrap());
        assert!(out.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn bf16_keeps_the_f32_range() {
        let mut bytes = Vec::new();
        Compression::BFloat16.encode(&[1e30, -3e-30, 65504.0 * 4.0], &mut bytes);
        let mut out = [0.0; 3];
        Compression::BFloat16.decode_into(&bytes, &mut out).unwrap();
        for (o, want) in out.iter().zip([1e30f32, -3e-30, 262_016.0]) {
            assert!((o - want).abs() <= want.abs() / 256.0, "{o} vs {want}");
        }
        assert_eq!(Compression::parse("bf16"), Some(Compression::BFloat16));
        assert_eq!(Compression::BFloat16.name(), "bf16");
    }

    #[test]
    fn wire_form_applies_like_decoding() {
        let v = sample(3 * BLOCK_8BIT + 1_001);
        let n = v.len();
        for c in [
            Compression::Float16,
            Compression::BFloat16,
            Compression::Blockwise8Bit,
        ] {
            let mut bytes = Vec::new();
            c.encode(&v, &mut bytes);
            assert!(c.wire_all_finite(&bytes, n));
            assert!(!c.wire_all_finite(&bytes, n - 1), "{c:?}: length");
            let mut avg = vec![0.0; n];
            c.decode_into(&bytes, &mut avg).unwrap();
            let local: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            // Pieces that start and end inside 8-bit blocks, and whole parts.
            let cuts = [0, 17, BLOCK_8BIT, BLOCK_8BIT + 5, 2 * BLOCK_8BIT + 99, n];
            for alpha in [1.0f32, 0.25] {
                let mut dst = local.clone();
                for w in cuts.windows(2) {
                    let r = w[0]..w[1];
                    c.apply_wire(&bytes, n, r.clone(), &mut dst[r], alpha)
                        .unwrap();
                }
                for ((d, l), a) in dst.iter().zip(&local).zip(&avg) {
                    let want = l + alpha * (a - l);
                    assert!(
                        (d - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{c:?} {alpha}"
                    );
                }
            }
            let mut dst = local.clone();
            assert!(c.apply_wire(&bytes[2..], n, 0..n, &mut dst, 0.5).is_err());
            assert!(c.apply_wire(&bytes, n, 1..n + 1, &mut dst, 0.5).is_err());
            assert!(c.apply_wire(&bytes, n, 0..n - 1, &mut dst, 1.0).is_err());
            assert_eq!(dst, local, "{c:?}: refused calls wrote");
            let mut poisoned = v.clone();
            poisoned[17] = f32::NAN;
            let mut bytes = Vec::new();
            c.encode(&poisoned, &mut bytes);
            assert!(!c.wire_all_finite(&bytes, n));
        }
        // Raw f32 beside compressed tensors has a wire form too (bytes in
        // any alignment).
        let mut raw = vec![0u8];
        raw.extend([1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()));
        assert!(Compression::None.wire_all_finite(&raw[1..], 2));
        let mut dst = [1.0; 2];
        Compression::None
            .apply_wire(&raw[1..], 2, 1..2, &mut dst[1..], 1.0)
            .unwrap();
        assert_eq!(dst, [1.0, -2.0]);
        Compression::None
            .apply_wire(&raw[1..], 2, 0..1, &mut dst[..1], 0.5)
            .unwrap();
        assert_eq!(dst, [1.25, -2.0]);
        assert!(
            Compression::None
                .apply_wire(&raw[2..], 2, 0..2, &mut dst, 1.0)
                .is_err()
        );
        let nan = [f32::NAN.to_le_bytes(), 0f32.to_le_bytes()].concat();
        assert!(!Compression::None.wire_all_finite(&nan, 2));
    }

    #[test]
    fn wrong_length_is_rejected() {
        let mut out = [0.0; 4];
        assert!(Compression::None.decode_into(&[0; 15], &mut out).is_err());
        assert!(all_finite(&[1.0, 2.0]));
        assert!(!all_finite(&[1.0, f32::NAN]));
        assert!(!all_finite(&[f32::INFINITY]));
    }
}
