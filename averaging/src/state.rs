//! State sharing: a donor streams `(metadata, tensors)` in chunks; the receiver
//! verifies sizes, finiteness and a SHA-256 checksum before handing it over, and
//! falls back to the next donor on any failure.
//!
//! The codec runs over any byte stream; the averager runs it over libp2p streams,
//! which are already authenticated and encrypted by noise.

use std::{future::Future, time::Duration};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{
    compression::all_finite,
    error::{AveragingError, PeerFault, Result},
};

/// Largest metadata header accepted (bytes).
pub const MAX_HEADER_BYTES: usize = 1 << 20;
/// Chunk size used by donors (bytes).
pub const STATE_CHUNK_BYTES: usize = 1 << 20;

/// A snapshot of averager state.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedState {
    /// Opaque metadata (the optimizer's step, group bits, ...), MessagePack.
    pub metadata: Vec<u8>,
    /// The tensors.
    pub tensors: Vec<Vec<f32>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    #[serde(with = "serde_bytes")]
    metadata: Vec<u8>,
    lengths: Vec<u64>,
    sha256: [u8; 32],
}

fn checksum(tensors: &[Vec<f32>]) -> [u8; 32] {
    let mut h = Sha256::new();
    for t in tensors {
        h.update((t.len() as u64).to_le_bytes());
        h.update(bytemuck::cast_slice::<f32, u8>(t));
    }
    h.finalize().into()
}

/// Serve `state` on `stream` (donor side).
///
/// # Errors
/// [`AveragingError::Io`] on a write failure or timeout per chunk.
pub async fn serve_state<W: AsyncWrite + Unpin>(
    stream: &mut W,
    state: &SharedState,
    chunk_timeout: Duration,
) -> Result<()> {
    let header = Header {
        metadata: state.metadata.clone(),
        lengths: state.tensors.iter().map(|t| t.len() as u64).collect(),
        sha256: checksum(&state.tensors),
    };
    let header = rmp_serde::to_vec(&header).map_err(|_| AveragingError::Decode {
        reason: "cannot encode state header",
    })?;
    let mut first = (header.len() as u32).to_le_bytes().to_vec();
    first.extend_from_slice(&header);
    write_timeout(stream, &first, chunk_timeout).await?;
    for t in &state.tensors {
        for chunk in bytemuck::cast_slice::<f32, u8>(t).chunks(STATE_CHUNK_BYTES) {
            write_timeout(stream, chunk, chunk_timeout).await?;
        }
    }
    match tokio::time::timeout(chunk_timeout, stream.flush()).await {
        Ok(r) => r.map_err(state_io),
        Err(_) => Err(state_io(std::io::ErrorKind::TimedOut.into())),
    }
}

fn state_io(source: std::io::Error) -> AveragingError {
    AveragingError::Io {
        context: "serving state",
        source,
    }
}

async fn write_timeout<W: AsyncWrite + Unpin>(
    stream: &mut W,
    bytes: &[u8],
    timeout: Duration,
) -> Result<()> {
    match tokio::time::timeout(timeout, stream.write_all(bytes)).await {
        Ok(r) => r.map_err(state_io),
        Err(_) => Err(state_io(std::io::ErrorKind::TimedOut.into())),
    }
}

async fn read_timeout<R: AsyncRead + Unpin>(
    stream: &mut R,
    n: usize,
    timeout: Duration,
) -> std::result::Result<Vec<u8>, PeerFault> {
    // `n` comes from the donor's header: grow the buffer a chunk at a time
    // as bytes arrive, so a donor that declares more than it sends makes the
    // receiver hold at most one chunk beyond what it sent.
    let mut out = Vec::new();
    let mut got = 0;
    while got < n {
        let end = (got + STATE_CHUNK_BYTES).min(n);
        out.resize(end, 0);
        match tokio::time::timeout(timeout, stream.read_exact(&mut out[got..end])).await {
            Err(_) => return Err(PeerFault::Stalled { timeout }),
            Ok(Err(e)) => {
                return Err(PeerFault::Disconnected {
                    reason: e.to_string(),
                });
            }
            Ok(Ok(_)) => got = end,
        }
    }
    Ok(out)
}

/// Download and verify state from one donor stream. `expected_lengths`, if
/// given, must match the donor's tensor lengths.
///
/// # Errors
/// [`AveragingError::Peer`] (with `peer` = `donor`) for a donor that stalls,
/// disconnects, or sends state that fails verification.
pub async fn download_state<R: AsyncRead + Unpin>(
    stream: &mut R,
    donor: usize,
    expected_lengths: Option<&[usize]>,
    chunk_timeout: Duration,
) -> Result<SharedState> {
    let fault = |fault| AveragingError::Peer { peer: donor, fault };
    let len = read_timeout(stream, 4, chunk_timeout)
        .await
        .map_err(fault)?;
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > MAX_HEADER_BYTES {
        return Err(fault(PeerFault::ProtocolViolation {
            reason: "state header too large",
        }));
    }
    let header = read_timeout(stream, len, chunk_timeout)
        .await
        .map_err(fault)?;
    let header: Header = rmp_serde::from_slice(&header).map_err(|_| {
        fault(PeerFault::Garbage {
            reason: "undecodable state header",
        })
    })?;
    if let Some(expected) = expected_lengths
        && (header.lengths.len() != expected.len()
            || header
                .lengths
                .iter()
                .zip(expected)
                .any(|(a, b)| *a != *b as u64))
    {
        return Err(fault(PeerFault::BadSchemaHash));
    }
    let mut tensors = Vec::with_capacity(header.lengths.len());
    for &n in &header.lengths {
        let n = usize::try_from(n).map_err(|_| {
            fault(PeerFault::ProtocolViolation {
                reason: "tensor too large",
            })
        })?;
        let bytes = read_timeout(
            stream,
            n.checked_mul(4).ok_or_else(|| {
                fault(PeerFault::ProtocolViolation {
                    reason: "tensor too large",
                })
            })?,
            chunk_timeout,
        )
        .await
        .map_err(fault)?;
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if !all_finite(&values) {
            return Err(fault(PeerFault::NonFinite {
                part: tensors.len(),
            }));
        }
        tensors.push(values);
    }
    if checksum(&tensors) != header.sha256 {
        return Err(fault(PeerFault::Garbage {
            reason: "state checksum mismatch",
        }));
    }
    Ok(SharedState {
        metadata: header.metadata,
        tensors,
    })
}

/// Try donors in order (best first) until one provides verified state.
/// `connect(i)` opens a stream to donor `i`.
///
/// # Errors
/// [`AveragingError::NoStateDonor`] when every donor failed.
pub async fn download_from_donors<S, F, Fut>(
    donors: usize,
    mut connect: F,
    expected_lengths: Option<&[usize]>,
    chunk_timeout: Duration,
) -> Result<(usize, SharedState)>
where
    S: AsyncRead + Unpin,
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<S>>,
{
    for i in 0..donors {
        let res = match tokio::time::timeout(chunk_timeout, connect(i)).await {
            Ok(Ok(mut s)) => download_state(&mut s, i, expected_lengths, chunk_timeout).await,
            Ok(Err(e)) => Err(e),
            Err(_) => Err(AveragingError::Peer {
                peer: i,
                fault: PeerFault::Stalled {
                    timeout: chunk_timeout,
                },
            }),
        };
        match res {
            Ok(state) => return Ok((i, state)),
            Err(e) => {
                tracing::warn!(donor = i, error = %e, "state download failed, trying the next donor")
            }
        }
    }
    Err(AveragingError::NoStateDonor { tried: donors })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> SharedState {
        SharedState {
            metadata: rmp_serde::to_vec(&(42u64, "01")).unwrap(),
            tensors: vec![
                (0..3_000_000).map(|i| i as f32 * 0.5).collect(),
                vec![1.0, -2.0],
            ],
        }
    }

    #[tokio::test]
    async fn late_joiner_gets_state_bit_for_bit_and_skips_bad_donors() {
        let good = state();
        let mut corrupt = good.clone();
        corrupt.tensors[1][0] = f32::NAN;
        let t = Duration::from_secs(2);
        // Donor 0 is down, donor 1 serves NaNs, donor 2 lies about the checksum
        // (truncated stream), donor 3 is good.
        let (got_from, got) = download_from_donors(
            4,
            |i| {
                let good = good.clone();
                let corrupt = corrupt.clone();
                async move {
                    if i == 0 {
                        return Err(AveragingError::Io {
                            context: "connect",
                            source: std::io::ErrorKind::ConnectionRefused.into(),
                        });
                    }
                    let (mut a, b) = tokio::io::duplex(1 << 16);
                    tokio::spawn(async move {
                        match i {
                            1 => {
                                let _ = serve_state(&mut a, &corrupt, t).await;
                            }
                            2 => {
                                let mut bytes = Vec::new();
                                serve_state(&mut bytes, &good, t).await.unwrap();
                                let n = bytes.len();
                                bytes[n - 1] ^= 0x40;
                                let _ = a.write_all(&bytes).await;
                            }
                            _ => {
                                let _ = serve_state(&mut a, &good, t).await;
                            }
                        }
                    });
                    Ok(b)
                }
            },
            Some(&[3_000_000, 2]),
            t,
        )
        .await
        .unwrap();
        assert_eq!(got_from, 3);
        assert_eq!(got.metadata, good.metadata);
        assert_eq!(got.tensors.len(), 2);
        for (a, b) in got.tensors.iter().zip(&good.tensors) {
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }

    #[tokio::test]
    async fn a_header_declaring_more_than_is_sent_allocates_only_what_arrives() {
        // 2^40 values (4 TiB) declared, none sent: allocating the declared
        // size up front aborts the process; reading chunk by chunk ends at
        // the stream's end.
        let header = Header {
            metadata: Vec::new(),
            lengths: vec![1 << 40],
            sha256: [0; 32],
        };
        let header = rmp_serde::to_vec(&header).unwrap();
        let mut bytes = (header.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&[0; 100]);
        let res = download_state(&mut &bytes[..], 0, None, Duration::from_secs(1)).await;
        assert!(matches!(
            res,
            Err(AveragingError::Peer {
                fault: PeerFault::Disconnected { .. },
                ..
            })
        ));
    }

    #[tokio::test]
    async fn wrong_layout_stall_and_no_donor_are_typed_errors() {
        let t = Duration::from_millis(200);
        let mut bytes = Vec::new();
        serve_state(&mut bytes, &state(), t).await.unwrap();
        let res = download_state(&mut &bytes[..], 0, Some(&[5]), t).await;
        assert!(matches!(
            res,
            Err(AveragingError::Peer {
                fault: PeerFault::BadSchemaHash,
                ..
            })
        ));
        // A donor that sends half its state then stalls.
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        a.write_all(&bytes[..100_000]).await.unwrap();
        let res = download_state(&mut b, 0, None, t).await;
        assert!(matches!(
            res,
            Err(AveragingError::Peer {
                fault: PeerFault::Stalled { .. },
                ..
            })
        ));
        drop(a);
        let res = download_from_donors(0, |_| async { Ok(&b""[..]) }, None, t).await;
        assert!(matches!(
            res,
            Err(AveragingError::NoStateDonor { tried: 0 })
        ));
    }
}
