//! Data-plane wire format.
//!
//! A connection starts with a plaintext preamble, `MAGIC ‖ group id (32) ‖
//! sender u32 ‖ reducer u32`, which lets the reducer pick the round and the key.
//! Everything after it is frames: `len u32 (LE) ‖ header (8) ‖ AEAD(payload)
//! ‖ tag (16)`, the length and the header authenticated as associated data
//! (see [`crate::crypto`]). The header is `kind u8 ‖ 0 0 0 ‖ index u32`, so the
//! payload stays 4-byte aligned.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{
    crypto::{FrameCipher, TAG_LEN},
    error::PeerFault,
};

/// Connection magic and protocol version.
pub(crate) const MAGIC: &[u8; 8] = b"COLNYAR3";
/// Preamble length.
pub(crate) const PREAMBLE_LEN: usize = 8 + 32 + 4 + 4;
/// Frame body header length.
pub(crate) const HEADER_LEN: usize = crate::crypto::FRAME_HEADER_LEN;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Sender → reducer, first frame: schema hash, compression, weight, part count.
    Hello = 1,
    /// Sender → reducer: a tensor part.
    Part = 2,
    /// Reducer → sender: the average of a part.
    Averaged = 3,
    /// Reducer → sender: no weight reached this part; keep local values.
    Empty = 4,
    /// Sender → reducer, instead of `Hello`: this sender contributes nothing
    /// to the round (its local tensors are not finite) and wants no results,
    /// so the reducer stops waiting for it at once. Authenticated like every
    /// frame, so only the sender itself can withdraw.
    Withdraw = 5,
}

impl Kind {
    /// The kind with this tag byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Hello),
            2 => Some(Self::Part),
            3 => Some(Self::Averaged),
            4 => Some(Self::Empty),
            5 => Some(Self::Withdraw),
            _ => None,
        }
    }
}

/// The preamble fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Preamble {
    pub(crate) group_id: [u8; 32],
    pub(crate) sender: u32,
    pub(crate) reducer: u32,
}

impl Preamble {
    pub(crate) fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let mut out = [0u8; PREAMBLE_LEN];
        out[..8].copy_from_slice(MAGIC);
        out[8..40].copy_from_slice(&self.group_id);
        out[40..44].copy_from_slice(&self.sender.to_le_bytes());
        out[44..48].copy_from_slice(&self.reducer.to_le_bytes());
        out
    }

    pub(crate) fn decode(b: &[u8; PREAMBLE_LEN]) -> Result<Self, PeerFault> {
        if &b[..8] != MAGIC {
            return Err(PeerFault::Garbage {
                reason: "bad magic",
            });
        }
        let mut group_id = [0u8; 32];
        group_id.copy_from_slice(&b[8..40]);
        Ok(Self {
            group_id,
            sender: u32::from_le_bytes([b[40], b[41], b[42], b[43]]),
            reducer: u32::from_le_bytes([b[44], b[45], b[46], b[47]]),
        })
    }
}

/// Magic of a reachability probe (in place of [`MAGIC`]): `PROBE_MAGIC ‖
/// nonce (32) ‖ 8 zero bytes`, as long as a preamble. The data plane answers
/// `PROBE_ACK ‖ nonce ‖ id length u8 ‖ its libp2p peer id` and closes, so a
/// leader can tell a Colony data plane of the announcing peer from a port
/// held by another service or by another peer.
pub(crate) const PROBE_MAGIC: &[u8; 8] = b"COLNYPRB";
/// Magic of a probe's answer.
pub(crate) const PROBE_ACK: &[u8; 8] = b"COLNYPOK";
/// Longest peer id a probe answer carries.
pub(crate) const PROBE_MAX_ID: usize = 64;

/// What a connection opens with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Opening {
    /// A sender joining a round.
    Round(Preamble),
    /// A reachability probe with its nonce.
    Probe([u8; 32]),
}

impl Opening {
    pub(crate) fn decode(b: &[u8; PREAMBLE_LEN]) -> Result<Self, PeerFault> {
        if &b[..8] == PROBE_MAGIC {
            let mut nonce = [0u8; 32];
            nonce.copy_from_slice(&b[8..40]);
            return Ok(Self::Probe(nonce));
        }
        Preamble::decode(b).map(Self::Round)
    }
}

/// A probe's first bytes.
pub(crate) fn probe_request(nonce: &[u8; 32]) -> [u8; PREAMBLE_LEN] {
    let mut out = [0u8; PREAMBLE_LEN];
    out[..8].copy_from_slice(PROBE_MAGIC);
    out[8..40].copy_from_slice(nonce);
    out
}

/// The data plane's answer to a probe (an id longer than
/// [`PROBE_MAX_ID`] is sent empty).
pub(crate) fn probe_reply(nonce: &[u8; 32], peer_id: &[u8]) -> Vec<u8> {
    let id = if peer_id.len() <= PROBE_MAX_ID {
        peer_id
    } else {
        &[]
    };
    let mut out = Vec::with_capacity(8 + 32 + 1 + id.len());
    out.extend_from_slice(PROBE_ACK);
    out.extend_from_slice(nonce);
    out.push(id.len() as u8);
    out.extend_from_slice(id);
    out
}

/// Hello body (after the header).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Hello {
    pub(crate) schema_hash: [u8; 32],
    pub(crate) compression: u8,
    pub(crate) weight: f32,
    pub(crate) num_parts: u32,
}

pub(crate) const HELLO_LEN: usize = 32 + 1 + 4 + 4;

impl Hello {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.schema_hash);
        out.push(self.compression);
        out.extend_from_slice(&self.weight.to_le_bytes());
        out.extend_from_slice(&self.num_parts.to_le_bytes());
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Self, PeerFault> {
        if b.len() != HELLO_LEN {
            return Err(PeerFault::ProtocolViolation {
                reason: "hello has the wrong length",
            });
        }
        let mut schema_hash = [0u8; 32];
        schema_hash.copy_from_slice(&b[..32]);
        Ok(Self {
            schema_hash,
            compression: b[32],
            weight: f32::from_le_bytes([b[33], b[34], b[35], b[36]]),
            num_parts: u32::from_le_bytes([b[37], b[38], b[39], b[40]]),
        })
    }
}

/// Start a frame in `buf`: length placeholder plus header.
pub(crate) fn begin_frame(buf: &mut Vec<u8>, kind: Kind, index: u32) {
    buf.clear();
    buf.extend_from_slice(&[0, 0, 0, 0, kind as u8, 0, 0, 0]);
    buf.extend_from_slice(&index.to_le_bytes());
}

/// A reusable outgoing frame, `len (4) ‖ header (8) ‖ payload ‖ tag (16)`. The
/// buffer only grows (zero-filled once, when a larger frame than any before is
/// built), so building a frame never clears or reallocates memory: the payload
/// is encoded straight into it, sealed in place and written out.
#[derive(Debug)]
pub struct FrameBuf<B> {
    buf: B,
    body: usize,
}

impl<B: std::ops::DerefMut<Target = Vec<u8>>> FrameBuf<B> {
    /// Build frames in `buf` (for example a pooled buffer; its contents do not
    /// matter).
    pub fn new(buf: B) -> Self {
        Self { buf, body: 0 }
    }

    /// Start a frame of `kind` with a payload of `payload_len` bytes and return
    /// the payload, which the caller must fill completely.
    pub fn start(&mut self, kind: Kind, index: u32, payload_len: usize) -> &mut [u8] {
        let total = 4 + HEADER_LEN + payload_len + TAG_LEN;
        if self.buf.len() < total {
            self.buf.resize(total, 0);
        }
        let i = index.to_le_bytes();
        self.buf[4..4 + HEADER_LEN].copy_from_slice(&[kind as u8, 0, 0, 0, i[0], i[1], i[2], i[3]]);
        self.body = HEADER_LEN + payload_len;
        &mut self.buf[4 + HEADER_LEN..4 + self.body]
    }

    /// Build and seal a frame of `kind` whose payload is the concatenation of
    /// `sources` (`payload_len` bytes), encrypted straight from them into the
    /// frame (no plaintext copy), and return its bytes, ready to write.
    pub(crate) fn seal_from<'s>(
        &mut self,
        kind: Kind,
        index: u32,
        payload_len: usize,
        sources: impl IntoIterator<Item = &'s [u8]>,
        cipher: &mut FrameCipher,
    ) -> Result<&[u8], PeerFault> {
        // Header and size as `start` lays them out; the payload is written
        // by the cipher.
        self.start(kind, index, payload_len);
        let n = cipher
            .seal_from(&mut self.buf, payload_len, sources)
            .map_err(|_| PeerFault::ProtocolViolation {
                reason: "seal failed",
            })?;
        Ok(&self.buf[..n])
    }

    /// The first `len` bytes of the buffer: a frame sealed earlier, `len`
    /// being the length its sealing returned.
    pub(crate) fn sealed(&self, len: usize) -> &[u8] {
        &self.buf[..len.min(self.buf.len())]
    }

    /// The frame started last with its length set and a zero tag, not
    /// encrypted: the same bytes on the wire as [`Self::seal`] minus the
    /// AEAD. Only for benchmarks that measure what the cipher costs.
    pub fn unsealed(&mut self) -> &[u8] {
        let n = 4 + self.body + TAG_LEN;
        let len = (self.body + TAG_LEN) as u32;
        self.buf[..4].copy_from_slice(&len.to_le_bytes());
        self.buf[4 + self.body..n].fill(0);
        &self.buf[..n]
    }

    /// Seal the frame started last and return its bytes, ready to write.
    ///
    /// # Errors
    /// [`PeerFault::ProtocolViolation`] if the cipher refuses (nonce space
    /// exhausted).
    pub fn seal(&mut self, cipher: &mut FrameCipher) -> Result<&[u8], PeerFault> {
        let n = cipher
            .seal_in_buffer(&mut self.buf, self.body)
            .map_err(|_| PeerFault::ProtocolViolation {
                reason: "seal failed",
            })?;
        Ok(&self.buf[..n])
    }
}

/// Write a whole buffer within `timeout`.
pub(crate) async fn write_all_timeout<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
    timeout: Duration,
) -> Result<(), PeerFault> {
    match tokio::time::timeout(timeout, w.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(PeerFault::Disconnected {
            reason: e.to_string(),
        }),
        Err(_) => Err(PeerFault::Stalled { timeout }),
    }
}

/// A frame's length prefix and header, parsed (not yet authenticated: the
/// header is associated data of the frame's AEAD, so a forged one fails when
/// the frame is opened).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    /// The length prefix as sent (associated data).
    pub len_bytes: [u8; 4],
    /// Body length: `header ‖ payload ‖ tag`.
    pub body_len: usize,
    /// The raw header (associated data).
    pub header: [u8; HEADER_LEN],
    /// The frame kind.
    pub kind: Kind,
    /// The part index (or 0).
    pub index: u32,
}

impl FrameHead {
    /// Parse the 12 bytes `len ‖ header` of a frame whose body may be at
    /// most `max_body` bytes before its tag.
    ///
    /// # Errors
    /// [`PeerFault::Garbage`] for a length out of range or an unknown kind.
    pub fn parse(head: &[u8; 4 + HEADER_LEN], max_body: usize) -> Result<Self, PeerFault> {
        let len_bytes = [head[0], head[1], head[2], head[3]];
        let body_len = u32::from_le_bytes(len_bytes) as usize;
        if !(HEADER_LEN + TAG_LEN..=max_body + TAG_LEN).contains(&body_len) {
            return Err(PeerFault::Garbage {
                reason: "frame length out of range",
            });
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&head[4..]);
        let kind = Kind::from_u8(header[0]).ok_or(PeerFault::Garbage {
            reason: "unknown frame kind",
        })?;
        Ok(Self {
            len_bytes,
            body_len,
            header,
            kind,
            index: u32::from_le_bytes([header[4], header[5], header[6], header[7]]),
        })
    }

    /// Payload bytes (body without header and tag).
    pub fn payload_len(&self) -> usize {
        self.body_len - HEADER_LEN - TAG_LEN
    }
}

/// Read a frame's length prefix and header by `deadline`. Nothing is
/// authenticated yet: the caller reads the rest and opens it.
pub(crate) async fn read_head<R: AsyncRead + Unpin>(
    r: &mut R,
    max_body: usize,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<FrameHead, PeerFault> {
    let mut head = [0u8; 4 + HEADER_LEN];
    read_exact_by(r, &mut head, deadline, timeout).await?;
    FrameHead::parse(&head, max_body)
}

/// Fill `buf` from `r` by `deadline` (`timeout` is what the deadline came
/// from, for the error).
pub(crate) async fn read_exact_by<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<(), PeerFault> {
    match tokio::time::timeout_at(deadline, r.read_exact(buf)).await {
        Err(_) => Err(PeerFault::Stalled { timeout }),
        Ok(Err(e)) => Err(PeerFault::Disconnected {
            reason: e.to_string(),
        }),
        Ok(Ok(_)) => Ok(()),
    }
}

/// Read and open one frame into the front of `buf` (grown as needed, never
/// shrunk); returns `(kind, index, payload range)`.
///
/// # Errors
/// A [`PeerFault`] for a stall, a closed stream, a bad length or kind, or a
/// frame that fails authentication.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    cipher: &mut FrameCipher,
    buf: &mut Vec<u8>,
    max_body: usize,
    timeout: Duration,
) -> Result<(Kind, u32, std::ops::Range<usize>), PeerFault> {
    let head = read_body(r, buf, max_body, timeout).await?;
    let plain_len = cipher
        .open_frame(head.len_bytes, &mut buf[..head.body_len])
        .map_err(|_| PeerFault::Garbage {
            reason: "frame failed authentication",
        })?
        .len();
    Ok((head.kind, head.index, HEADER_LEN..plain_len))
}

/// Read one frame's body into the front of `buf` without opening it: the
/// same framing and copies as [`read_frame`] minus the AEAD. Only for
/// benchmarks that measure what the cipher costs; nothing read this way is
/// authenticated.
///
/// # Errors
/// As [`read_frame`], without the authentication failure.
pub async fn read_frame_unopened<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max_body: usize,
    timeout: Duration,
) -> Result<FrameHead, PeerFault> {
    read_body(r, buf, max_body, timeout).await
}

async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max_body: usize,
    timeout: Duration,
) -> Result<FrameHead, PeerFault> {
    let deadline = tokio::time::Instant::now() + timeout;
    let head = read_head(r, max_body, deadline, timeout).await?;
    // Grow only: a shorter frame reuses the front of the buffer, so a
    // connection zero-fills its receive buffer once.
    if buf.len() < head.body_len {
        buf.resize(head.body_len, 0);
    }
    buf[..HEADER_LEN].copy_from_slice(&head.header);
    read_exact_by(r, &mut buf[HEADER_LEN..head.body_len], deadline, timeout).await?;
    Ok(head)
}
