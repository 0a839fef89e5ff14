//! Per-round keys and sealed frames for the data plane.
//!
//! Each group member makes a fresh X25519 key pair per round and publishes the
//! public half through the noise-authenticated control channel (the join
//! protocol). Each (sender, reducer) pair derives two AES-128-GCM keys, one per
//! direction, with HKDF-SHA256 over the shared secret, salted with the group id.
//! A key is used for exactly one direction of one connection, and the nonce is
//! that direction's frame counter, so a nonce is never reused under a key.

use ring::{
    aead::{AES_128_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    hkdf::{HKDF_SHA256, KeyType, Salt},
    rand::{SecureRandom, SystemRandom},
};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::error::{AveragingError, Result};

/// AES-GCM tag length in bytes.
pub const TAG_LEN: usize = 16;

/// One peer's key pair for one round. The secret is zeroized on drop.
pub struct RoundKeyPair {
    secret: StaticSecret,
    public: [u8; 32],
}

impl std::fmt::Debug for RoundKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoundKeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl RoundKeyPair {
    /// A fresh random key pair.
    ///
    /// # Errors
    /// [`AveragingError::Crypto`] if the system RNG fails.
    pub fn generate() -> Result<Self> {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| AveragingError::Crypto {
                context: "generating an X25519 key",
            })?;
        let secret = StaticSecret::from(bytes);
        bytes.fill(0);
        let public = PublicKey::from(&secret).to_bytes();
        Ok(Self { secret, public })
    }

    /// The public half, to publish to the group.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// Keys for the connection where `sender` streams parts to `reducer`
    /// (`self` being one of the two, `peer_public` the other's key).
    ///
    /// # Errors
    /// [`AveragingError::Crypto`] for a peer key of small order (the shared
    /// secret would not depend on our key).
    pub fn connection_keys(
        &self,
        peer_public: &[u8; 32],
        group_id: &[u8],
        sender: u32,
        reducer: u32,
    ) -> Result<ConnectionKeys> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer_public));
        if !shared.was_contributory() {
            return Err(AveragingError::Crypto {
                context: "X25519 agreement with a small-order key",
            });
        }
        let salt = Salt::new(HKDF_SHA256, group_id);
        let prk = salt.extract(shared.as_bytes());
        let derive = |dir: &[u8]| -> Result<[u8; 16]> {
            let s = sender.to_le_bytes();
            let r = reducer.to_le_bytes();
            let info: [&[u8]; 4] = [b"colony-averaging-dataplane-v1", &s, &r, dir];
            let mut key = [0u8; 16];
            prk.expand(&info, Len16)
                .and_then(|okm| okm.fill(&mut key))
                .map_err(|_| AveragingError::Crypto {
                    context: "HKDF expand",
                })?;
            Ok(key)
        };
        Ok(ConnectionKeys {
            up: derive(b"up")?,
            down: derive(b"down")?,
        })
    }
}

struct Len16;
impl KeyType for Len16 {
    fn len(&self) -> usize {
        16
    }
}

/// Raw keys of one connection: `up` seals sender → reducer, `down` the reverse.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionKeys {
    /// Sender → reducer key.
    pub up: [u8; 16],
    /// Reducer → sender key.
    pub down: [u8; 16],
}

impl std::fmt::Debug for ConnectionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionKeys(..)")
    }
}

/// One direction of a connection: a key and its frame counter.
pub struct FrameCipher {
    key: LessSafeKey,
    counter: u64,
}

impl std::fmt::Debug for FrameCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameCipher")
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl FrameCipher {
    /// A cipher for one direction.
    ///
    /// # Errors
    /// [`AveragingError::Crypto`] if the key is rejected.
    pub fn new(key: &[u8; 16]) -> Result<Self> {
        let unbound = UnboundKey::new(&AES_128_GCM, key).map_err(|_| AveragingError::Crypto {
            context: "AES key setup",
        })?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
            counter: 0,
        })
    }

    fn next_nonce(&mut self) -> Result<Nonce> {
        let c = self.counter;
        self.counter = c.checked_add(1).ok_or(AveragingError::Crypto {
            context: "nonce counter exhausted",
        })?;
        let mut n = [0u8; NONCE_LEN];
        n[4..].copy_from_slice(&c.to_be_bytes());
        Ok(Nonce::assume_unique_for_key(n))
    }

    /// Seal `frame[4..]` in place and append the tag; `frame[..4]` must be
    /// reserved for the length prefix, which this fills and authenticates.
    ///
    /// # Errors
    /// [`AveragingError::Crypto`] on failure.
    pub fn seal_frame(&mut self, frame: &mut Vec<u8>) -> Result<()> {
        let body_len = frame.len().saturating_sub(4);
        frame.resize(4 + body_len + TAG_LEN, 0);
        self.seal_in_buffer(frame, body_len).map(|_| ())
    }

    /// Seal a frame laid out in a reusable buffer, `len (4) ‖ body (body_len) ‖
    /// room for the tag (16)`, without growing or clearing it: fills the length
    /// prefix (authenticated as associated data), encrypts the body in place,
    /// writes the tag after it and returns the frame's total length.
    ///
    /// # Errors
    /// [`AveragingError::Crypto`] if `buf` is too short or the frame too large.
    pub fn seal_in_buffer(&mut self, buf: &mut [u8], body_len: usize) -> Result<usize> {
        let total = 4 + body_len + TAG_LEN;
        if buf.len() < total {
            return Err(AveragingError::Crypto {
                context: "frame buffer too short",
            });
        }
        let len = u32::try_from(body_len + TAG_LEN).map_err(|_| AveragingError::Crypto {
            context: "frame too large",
        })?;
        let len_bytes = len.to_le_bytes();
        buf[..4].copy_from_slice(&len_bytes);
        let nonce = self.next_nonce()?;
        let (body, rest) = buf[4..].split_at_mut(body_len);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(len_bytes), body)
            .map_err(|_| AveragingError::Crypto { context: "seal" })?;
        rest[..TAG_LEN].copy_from_slice(tag.as_ref());
        Ok(total)
    }

    /// Open a frame body (`len_bytes` is its length prefix); returns the plaintext.
    ///
    /// # Errors
    /// [`AveragingError::Crypto`] when authentication fails (garbage, replay,
    /// wrong key).
    pub fn open_frame<'a>(
        &mut self,
        len_bytes: [u8; 4],
        body: &'a mut [u8],
    ) -> Result<&'a mut [u8]> {
        let nonce = self.next_nonce()?;
        self.key
            .open_in_place(nonce, Aad::from(len_bytes), body)
            .map(|p| &mut *p)
            .map_err(|_| AveragingError::Crypto {
                context: "frame failed authentication",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_derive_the_same_directional_keys() {
        let a = RoundKeyPair::generate().unwrap();
        let b = RoundKeyPair::generate().unwrap();
        let ka = a.connection_keys(&b.public(), b"gid", 0, 1).unwrap();
        let kb = b.connection_keys(&a.public(), b"gid", 0, 1).unwrap();
        assert_eq!(ka, kb);
        assert_ne!(ka.up, ka.down);
        let other = a.connection_keys(&b.public(), b"gid", 1, 0).unwrap();
        assert_ne!(ka, other);
    }

    #[test]
    fn small_order_peer_keys_are_refused() {
        let a = RoundKeyPair::generate().unwrap();
        // u = 0 and u = 1 have small order (2 and 4): the shared secret is all zero.
        let mut order2 = [0u8; 32];
        order2[0] = 1;
        for bad in [[0u8; 32], order2] {
            assert!(matches!(
                a.connection_keys(&bad, b"gid", 0, 1),
                Err(AveragingError::Crypto { .. })
            ));
        }
    }

    #[test]
    fn frames_roundtrip_and_tampering_fails() {
        let key = [3u8; 16];
        let mut tx = FrameCipher::new(&key).unwrap();
        let mut rx = FrameCipher::new(&key).unwrap();
        for msg in [&b"hello"[..], b"world"] {
            let mut frame = vec![0u8; 4];
            frame.extend_from_slice(msg);
            tx.seal_frame(&mut frame).unwrap();
            let len = [frame[0], frame[1], frame[2], frame[3]];
            assert_eq!(u32::from_le_bytes(len) as usize, frame.len() - 4);
            let plain = rx.open_frame(len, &mut frame[4..]).unwrap();
            assert_eq!(&plain[..msg.len()], msg);
        }
        let mut frame = vec![0u8; 4];
        frame.extend_from_slice(b"x");
        tx.seal_frame(&mut frame).unwrap();
        frame[4] ^= 1;
        let len = [frame[0], frame[1], frame[2], frame[3]];
        assert!(rx.open_frame(len, &mut frame[4..]).is_err());
    }
}
