//! Wire codecs for tensor parts: raw fp32, fp16, and blockwise 8-bit.
//!
//! Encoders append to a byte buffer (the frame being built, so encoding is fused
//! with the copy that sends it); decoders write into an `f32` slice.

use half::{f16, slice::HalfFloatSliceExt};

use crate::error::{AveragingError, Result};

/// Elements per block of the blockwise 8-bit codec (one `f32` scale per block).
pub const BLOCK_8BIT: usize = 4096;

/// Compression applied to tensor parts on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Compression {
    /// Raw little-endian `f32`.
    #[default]
    None,
    /// IEEE half precision, values clamped to ±65504 first.
    Float16,
    /// Blockwise absmax 8-bit: per block of [`BLOCK_8BIT`] values an `f32` scale
    /// followed by one signed byte per value (`round(x / scale · 127)`).
    Blockwise8Bit,
}

impl Compression {
    /// Wire code of this codec.
    pub fn code(self) -> u8 {
        match self {
            Self::None => 0,
            Self::Float16 => 1,
            Self::Blockwise8Bit => 2,
        }
    }

    /// Codec for a wire code.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::None),
            1 => Some(Self::Float16),
            2 => Some(Self::Blockwise8Bit),
            _ => None,
        }
    }

    /// Parse `none`, `fp16`, `8bit`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "none" | "fp32" => Some(Self::None),
            "fp16" | "float16" => Some(Self::Float16),
            "8bit" | "blockwise8bit" => Some(Self::Blockwise8Bit),
            _ => None,
        }
    }

    /// Short name (`none`, `fp16`, `8bit`).
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Float16 => "fp16",
            Self::Blockwise8Bit => "8bit",
        }
    }

    /// Bytes needed to encode `n` values.
    pub fn encoded_len(self, n: usize) -> usize {
        match self {
            Self::None => 4 * n,
            Self::Float16 => 2 * n,
            Self::Blockwise8Bit => 4 * n.div_ceil(BLOCK_8BIT) + n,
        }
    }

    /// Approximate bytes per element, used to size parts.
    pub fn bytes_per_element(self) -> f64 {
        match self {
            Self::None => 4.0,
            Self::Float16 => 2.0,
            Self::Blockwise8Bit => 1.0 + 4.0 / BLOCK_8BIT as f64,
        }
    }

    /// Append the encoding of `values` to `out`.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            Self::None => out.extend_from_slice(bytemuck::cast_slice(values)),
            Self::Float16 => {
                out.reserve(2 * values.len());
                let mut clamped = [0.0f32; 1024];
                let mut halves = [f16::ZERO; 1024];
                for chunk in values.chunks(1024) {
                    let c = &mut clamped[..chunk.len()];
                    for (d, s) in c.iter_mut().zip(chunk) {
                        *d = s.clamp(-65504.0, 65504.0);
                    }
                    let h = &mut halves[..chunk.len()];
                    h.convert_from_f32_slice(c);
                    out.extend_from_slice(bytemuck::cast_slice(h));
                }
            }
            Self::Blockwise8Bit => {
                let nblocks = values.len().div_ceil(BLOCK_8BIT);
                let start = out.len();
                out.resize(start + 4 * nblocks + values.len(), 0);
                let (scales, codes) = out[start..].split_at_mut(4 * nblocks);
                for (b, block) in values.chunks(BLOCK_8BIT).enumerate() {
                    let absmax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    scales[4 * b..4 * b + 4].copy_from_slice(&absmax.to_le_bytes());
                    let inv = if absmax > 0.0 { 127.0 / absmax } else { 0.0 };
                    for (d, v) in codes[b * BLOCK_8BIT..b * BLOCK_8BIT + block.len()]
                        .iter_mut()
                        .zip(block)
                    {
                        *d = ((v * inv).round().clamp(-127.0, 127.0) as i8) as u8;
                    }
                }
            }
        }
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
        match self {
            Self::None => {
                for (d, s) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                }
            }
            Self::Float16 => {
                if let Ok(halves) = bytemuck::try_cast_slice::<u8, f16>(bytes) {
                    halves.convert_to_f32_slice(out);
                } else {
                    let mut halves = [f16::ZERO; 1024];
                    for (o, src) in out.chunks_mut(1024).zip(bytes.chunks(2048)) {
                        let h = &mut halves[..o.len()];
                        for (d, s) in h.iter_mut().zip(src.chunks_exact(2)) {
                            *d = f16::from_bits(u16::from_le_bytes([s[0], s[1]]));
                        }
                        h.convert_to_f32_slice(o);
                    }
                }
            }
            Self::Blockwise8Bit => {
                let nblocks = out.len().div_ceil(BLOCK_8BIT);
                let (scales, codes) = bytes.split_at(4 * nblocks);
                for (b, block) in out.chunks_mut(BLOCK_8BIT).enumerate() {
                    let s = &scales[4 * b..4 * b + 4];
                    let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]) / 127.0;
                    for (d, c) in block.iter_mut().zip(&codes[b * BLOCK_8BIT..]) {
                        *d = (*c as i8) as f32 * scale;
                    }
                }
            }
        }
        Ok(())
    }
}

impl Compression {
    /// [`Self::decode_into`] that also checks finiteness chunk by chunk while
    /// the values are hot in cache. Returns `Ok(false)` on NaN/inf.
    ///
    /// # Errors
    /// As [`Self::decode_into`].
    pub fn decode_into_checked(self, bytes: &[u8], out: &mut [f32]) -> Result<bool> {
        if bytes.len() != self.encoded_len(out.len()) {
            return Err(AveragingError::Decode {
                reason: "encoded length does not match the part size",
            });
        }
        if self == Self::Float16
            && let Ok(halves) = bytemuck::try_cast_slice::<u8, f16>(bytes)
        {
            let mut ok = true;
            for (o, h) in out.chunks_mut(4096).zip(halves.chunks(4096)) {
                h.convert_to_f32_slice(o);
                ok &= all_finite(o);
            }
            return Ok(ok);
        }
        if self == Self::None {
            let mut ok = true;
            for (o, b) in out.chunks_mut(4096).zip(bytes.chunks(4 * 4096)) {
                for (d, s) in o.iter_mut().zip(b.chunks_exact(4)) {
                    *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                }
                ok &= all_finite(o);
            }
            return Ok(ok);
        }
        self.decode_into(bytes, out)?;
        Ok(all_finite(out))
    }
}

/// True when every value is finite.
pub fn all_finite(values: &[f32]) -> bool {
    // Chunked so the compiler vectorises the reduction.
    values
        .chunks(64)
        .all(|c| c.iter().fold(true, |ok, v| ok & v.is_finite()))
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
    fn wrong_length_is_rejected() {
        let mut out = [0.0; 4];
        assert!(Compression::None.decode_into(&[0; 15], &mut out).is_err());
        assert!(all_finite(&[1.0, 2.0]));
        assert!(!all_finite(&[1.0, f32::NAN]));
        assert!(!all_finite(&[f32::INFINITY]));
    }
}
