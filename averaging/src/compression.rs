//! Wire codecs for tensor parts: raw fp32, fp16, and blockwise 8-bit.
//!
//! Encoders append to a byte buffer (the frame being built, so encoding is fused
//! with the copy that sends it); decoders write into an `f32` slice.

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

    /// Append the encoding of `values` to `out` (the frame being built, so
    /// encoding is fused with the copy that sends it). The codecs are
    /// `colony-kernels`' CPU wire codecs; this only frames them.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + self.encoded_len(values.len()), 0);
        let dst = &mut out[start..];
        // The destination is sized by `encoded_len` and the block size is a
        // non-zero constant, the only two things the kernels check.
        let encoded = match self {
            Self::None => {
                dst.copy_from_slice(bytemuck::cast_slice(values));
                Ok(())
            }
            Self::Float16 => kernels::f16::encode(values, dst),
            Self::Blockwise8Bit => kernels::q8::encode(values, BLOCK_8BIT, dst),
        };
        debug_assert!(
            encoded.is_ok(),
            "encode into an exactly sized buffer: {encoded:?}"
        );
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
                for (d, s) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                }
                Ok(())
            }
            Self::Float16 => kernels::f16::decode(bytes, out),
            Self::Blockwise8Bit => kernels::q8::decode(bytes, BLOCK_8BIT, out),
        };
        decoded.map_err(|_| AveragingError::Decode {
            reason: "codec refused the part",
        })
    }

    /// [`Self::decode_into`] followed by a finiteness check while the values
    /// are hot in cache. Returns `Ok(false)` on NaN/inf (an 8-bit block with a
    /// non-finite value decodes to all NaN, so poison stays visible).
    ///
    /// # Errors
    /// As [`Self::decode_into`].
    pub fn decode_into_checked(self, bytes: &[u8], out: &mut [f32]) -> Result<bool> {
        self.decode_into(bytes, out)?;
        Ok(all_finite(out))
    }
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
