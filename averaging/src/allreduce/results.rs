//! What a round brings back: the averages per span, and applying them.

use std::{ops::Range, sync::Arc};

use crate::{
    compression::{Compression, all_finite},
    conn::{DataPath, DataReadHalf},
    crypto::{FrameCipher, TAG_LEN},
    dataplane::{BufferPool, RejectedConnection},
    error::{PeerFault, Result},
    partition::TensorLayout,
    wire::{self, Kind},
};

use super::Ctx;

/// Results of one span as received by this peer.
#[derive(Debug, Clone)]
pub struct SpanResult {
    /// Reducer position in the group.
    pub reducer: usize,
    /// The span in the flat vector.
    pub span: Range<usize>,
    pub(super) parts: Vec<Range<usize>>,
    /// The averages: `f32` values, or with `wire` set, the opened wire
    /// payloads of that codec, part after part (in an `f32` buffer for
    /// alignment and pooling), decoded straight into the tensors by `apply`.
    pub(super) values: Vec<f32>,
    pub(super) wire: Option<crate::group::Codecs>,
    /// With `wire`: byte offset of each part's payload, one more than parts.
    pub(super) wire_offsets: Vec<usize>,
    pub(super) averaged: Vec<bool>,
}

impl SpanResult {
    /// The wire payload of part `p` (wire form only).
    pub(super) fn wire_part(&self, p: usize) -> &[u8] {
        let bytes = bytemuck::cast_slice::<f32, u8>(&self.values);
        &bytes[self.wire_offsets[p]..self.wire_offsets[p + 1]]
    }

    /// [`Self::wire_part`], writable.
    pub(super) fn wire_part_mut(&mut self, p: usize) -> &mut [u8] {
        let (start, end) = (self.wire_offsets[p], self.wire_offsets[p + 1]);
        &mut bytemuck::cast_slice_mut::<f32, u8>(&mut self.values)[start..end]
    }

    /// Number of elements of this span that were averaged.
    pub fn averaged_elements(&self) -> usize {
        self.parts
            .iter()
            .zip(&self.averaged)
            .filter(|(_, a)| **a)
            .map(|(p, _)| p.len())
            .sum()
    }
}

/// What a round produced; apply it with [`RoundOutcome::apply`]. Its buffers
/// go back to the data plane's pool when it is dropped.
#[derive(Debug, Clone)]
pub struct RoundOutcome {
    pub(super) pool: Option<Arc<BufferPool>>,
    /// This peer's position in the group.
    pub my_index: usize,
    /// Elements each member reduced.
    pub span_sizes: Vec<usize>,
    /// Per reducer span, what came back (empty for auxiliary peers).
    pub spans: Vec<SpanResult>,
    /// Reducers this peer gave up on, with the reason.
    pub failed_reducers: Vec<(usize, PeerFault)>,
    /// Senders this peer (as reducer) banned, with the reason.
    pub banned_senders: Vec<(usize, PeerFault)>,
    /// Bytes this peer wrote to the data plane.
    pub bytes_sent: u64,
    /// Per remote reducer this peer connected to (as a sender), the path
    /// the connection took.
    pub sent_paths: Vec<(usize, DataPath)>,
    /// Per remote sender that connected to this peer (as a reducer), the
    /// path it came by.
    pub served_paths: Vec<(usize, DataPath)>,
    /// Connections for this round refused before they reached the reducer
    /// (a libp2p stream claiming another member's sender slot).
    pub rejected: Vec<RejectedConnection>,
    /// Senders whose declared weight this peer (as a reducer) clipped:
    /// `(sender, declared, used)`.
    pub clipped_weights: Vec<(usize, f32, f32)>,
    /// Connections to this peer's span that claimed a sender's slot but
    /// whose first frame did not authenticate under that sender's key:
    /// dropped without banning anyone.
    pub impostors: Vec<RejectedConnection>,
}

impl Drop for RoundOutcome {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            for s in self.spans.drain(..) {
                pool.give(s.values);
            }
        }
    }
}

impl RoundOutcome {
    /// Connections of this round (both directions) that went direct over TCP.
    pub fn direct_connections(&self) -> usize {
        self.connections_by(DataPath::Direct)
    }

    /// Connections of this round (both directions) over libp2p streams.
    pub fn libp2p_connections(&self) -> usize {
        self.connections_by(DataPath::Libp2p)
    }

    /// The path of this peer's connection with member `peer`: the one it
    /// opened to `peer` as a reducer, else the one `peer` opened to it.
    pub fn path_with(&self, peer: usize) -> Option<DataPath> {
        self.sent_paths
            .iter()
            .chain(&self.served_paths)
            .find(|(p, _)| *p == peer)
            .map(|(_, path)| *path)
    }

    fn connections_by(&self, path: DataPath) -> usize {
        self.sent_paths
            .iter()
            .chain(&self.served_paths)
            .filter(|(_, p)| *p == path)
            .count()
    }

    /// Elements that were averaged (the rest keep local values).
    pub fn averaged_elements(&self) -> usize {
        self.spans.iter().map(SpanResult::averaged_elements).sum()
    }

    /// Apply `local += alpha · (average − local)` on every averaged element.
    ///
    /// # Errors
    /// [`AveragingError::LayoutMismatch`] if `buffers` do not match `layout`.
    pub fn apply<T: AsRef<[f32]> + AsMut<[f32]>>(
        &self,
        layout: &TensorLayout,
        buffers: &mut [T],
        alpha: f32,
    ) -> Result<()> {
        layout.check(buffers)?;
        for s in &self.spans {
            for (p, (part, averaged)) in s.parts.iter().zip(&s.averaged).enumerate() {
                if !*averaged {
                    continue;
                }
                if let Some(codecs) = &s.wire {
                    // Wire form: decode straight into the tensors.
                    let codec = codecs.at(part.start);
                    let bytes = s.wire_part(p);
                    for (i, local, global) in layout.pieces(part.clone()) {
                        let in_part = global.start - part.start..global.end - part.start;
                        let dst = &mut buffers[i].as_mut()[local];
                        codec.apply_wire(bytes, part.len(), in_part, dst, alpha)?;
                    }
                    continue;
                }
                let local = part.start - s.span.start..part.end - s.span.start;
                let values = &s.values[local];
                layout.zip_mut(buffers, part.clone(), values, |dst, avg| {
                    if alpha == 1.0 {
                        dst.copy_from_slice(avg);
                    } else {
                        for (d, a) in dst.iter_mut().zip(avg) {
                            *d += alpha * (a - *d);
                        }
                    }
                });
            }
        }
        Ok(())
    }
}

pub(super) async fn read_results<T: AsRef<[f32]> + Sync>(
    ctx: &Ctx<'_, T>,
    mut rd: DataReadHalf,
    down: &mut FrameCipher,
    result: &mut SpanResult,
) -> std::result::Result<(), PeerFault> {
    let mut buf = ctx.bytes.take();
    let timeout = ctx.cfg.reducer_timeout;
    let unauthentic = |_| PeerFault::Garbage {
        reason: "frame failed authentication",
    };
    for p in 0..result.parts.len() {
        let deadline = tokio::time::Instant::now() + timeout;
        let head = wire::read_head(&mut rd, ctx.codecs.max_frame_len(), deadline, timeout).await?;
        // Header fields pick the read path; they are authenticated when the
        // frame is opened, and a forged header fails there.
        let (kind, index, payload_len) = (head.kind, head.index as usize, head.payload_len());
        let (len_bytes, header) = (head.len_bytes, head.header);
        if index != p {
            return Err(PeerFault::UnexpectedPart {
                expected: p,
                got: index,
                count: result.parts.len(),
            });
        }
        let range = result.parts[p].clone();
        let compression = ctx.codecs.at(range.start);
        let local = range.start - result.span.start..range.end - result.span.start;
        let mut tag = [0u8; TAG_LEN];
        if kind == Kind::Averaged && result.wire.is_some() {
            // Compressed averages stay in wire form: read and open them in
            // place, and check them without decoding.
            if payload_len != compression.encoded_len(range.len()) {
                return Err(PeerFault::WrongPartSize {
                    part: p,
                    expected: range.len(),
                    got: (payload_len as f64 / compression.bytes_per_element()) as usize,
                });
            }
            let bytes = result.wire_part_mut(p);
            wire::read_exact_by(&mut rd, bytes, deadline, timeout).await?;
            wire::read_exact_by(&mut rd, &mut tag, deadline, timeout).await?;
            down.open_detached(len_bytes, &header, bytes, &tag)
                .map_err(unauthentic)?;
            if !compression.wire_all_finite(bytes, range.len()) {
                return Err(PeerFault::NonFinite { part: p });
            }
            result.averaged[p] = true;
            continue;
        }
        if kind == Kind::Averaged
            && compression == Compression::None
            && payload_len == 4 * range.len()
        {
            // Raw f32 averages: read and open the payload straight in the
            // staging buffer, with no copy.
            let out = &mut result.values[local];
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
            wire::read_exact_by(&mut rd, bytes, deadline, timeout).await?;
            wire::read_exact_by(&mut rd, &mut tag, deadline, timeout).await?;
            down.open_detached(len_bytes, &header, bytes, &tag)
                .map_err(unauthentic)?;
            if !all_finite(out) {
                return Err(PeerFault::NonFinite { part: p });
            }
            result.averaged[p] = true;
            continue;
        }
        if buf.len() < payload_len {
            buf.resize(payload_len, 0);
        }
        let payload = &mut buf[..payload_len];
        wire::read_exact_by(&mut rd, payload, deadline, timeout).await?;
        wire::read_exact_by(&mut rd, &mut tag, deadline, timeout).await?;
        down.open_detached(len_bytes, &header, payload, &tag)
            .map_err(unauthentic)?;
        match kind {
            Kind::Averaged => {
                let out = &mut result.values[local];
                let finite = compression.decode_into_checked(payload, out).map_err(|_| {
                    PeerFault::WrongPartSize {
                        part: p,
                        expected: range.len(),
                        got: (payload.len() as f64 / compression.bytes_per_element()) as usize,
                    }
                })?;
                if !finite {
                    return Err(PeerFault::NonFinite { part: p });
                }
                result.averaged[p] = true;
            }
            Kind::Empty => {}
            _ => {
                return Err(PeerFault::ProtocolViolation {
                    reason: "expected a result frame",
                });
            }
        }
    }
    Ok(())
}
