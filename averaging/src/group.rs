//! A group as the all-reduce sees it, and the round configuration.

use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    compression::Compression,
    error::{AveragingError, Result},
    partition::TensorLayout,
};

/// How a peer takes part in averaging (reference `AveragingMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum AveragingMode {
    /// Sends its tensors and reduces a slice.
    #[default]
    Node,
    /// Accepts no inbound connections: sends its tensors and receives results,
    /// reduces nothing.
    Client,
    /// Weight 0: reduces a slice, sends nothing, receives nothing.
    Aux,
}

impl AveragingMode {
    /// Whether this peer contributes tensors.
    pub fn is_sender(self) -> bool {
        self != Self::Aux
    }
}

/// One member of an assembled group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupMember {
    /// Peer id bytes (libp2p peer id, or any unique id in tests).
    pub peer_id: Vec<u8>,
    /// Direct (TCP) data-plane address. `None` for client-mode peers, and
    /// for node and auxiliary peers reachable only through their libp2p
    /// connection (no TCP data plane, or an address the leader found
    /// unusable): senders then open a data stream to `peer_id`.
    pub data_addr: Option<SocketAddr>,
    /// Averaging mode.
    pub mode: AveragingMode,
    /// Load-balancing bandwidth hint (`None` = unknown).
    pub bandwidth: Option<f64>,
    /// This round's X25519 public key.
    pub round_public_key: [u8; 32],
}

/// The group agreed on by matchmaking, identical on every member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssembledGroup {
    /// Random id of this round.
    pub group_id: [u8; 32],
    /// Members in the agreed order (this order decides the spans).
    pub members: Vec<GroupMember>,
}

impl AssembledGroup {
    /// Position of `peer_id` in the group.
    pub fn position(&self, peer_id: &[u8]) -> Option<usize> {
        self.members.iter().position(|m| m.peer_id == peer_id)
    }

    /// Check the invariants every member relies on.
    ///
    /// # Errors
    /// [`AveragingError::InvalidGroup`] describing the first problem.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(AveragingError::InvalidGroup { reason });
        if self.members.is_empty() {
            return bad("no members".into());
        }
        if u32::try_from(self.members.len()).is_err() {
            return bad("too many members".into());
        }
        for (i, m) in self.members.iter().enumerate() {
            if self.members[..i].iter().any(|o| o.peer_id == m.peer_id) {
                return bad(format!("duplicate peer id at {i}"));
            }
        }
        if !self.members.iter().any(|m| m.mode != AveragingMode::Client) {
            return bad("cannot run all-reduce without reducers".into());
        }
        Ok(())
    }

    /// Bandwidths for the balancer (clients forced to 0).
    pub fn bandwidths(&self) -> Vec<Option<f64>> {
        self.members
            .iter()
            .map(|m| match m.mode {
                AveragingMode::Client => Some(0.0),
                _ => m.bandwidth,
            })
            .collect()
    }
}

/// Knobs of one all-reduce round. Every group member must use the same
/// `part_size_bytes`, `compression` and `min_vector_size`.
#[derive(Debug, Clone, PartialEq)]
pub struct AllreduceConfig {
    /// Bytes per part on the wire, after compression. Default 4 MiB: large frames
    /// amortise syscalls and AEAD setup (the reference uses 512 KiB over gRPC).
    pub part_size_bytes: usize,
    /// Wire compression. Default none.
    pub compression: Compression,
    /// Peers assigned fewer elements reduce nothing. Default 0.
    pub min_vector_size: usize,
    /// `local += alpha · (average − local)`. Default 1.
    pub averaging_alpha: f32,
    /// Limit on connecting to a reducer and on the first message of a connection.
    /// Default 3 s.
    pub request_timeout: Duration,
    /// A reducer bans a sender silent for this long (per frame). Default 5 s.
    pub sender_timeout: Duration,
    /// A sender gives up on a reducer silent for this long (per frame); must
    /// exceed `sender_timeout`. Default 10 s.
    pub reducer_timeout: Duration,
    /// Limit on the whole round. Default 120 s.
    pub allreduce_timeout: Duration,
}

impl Default for AllreduceConfig {
    fn default() -> Self {
        Self {
            part_size_bytes: 4 << 20,
            compression: Compression::None,
            min_vector_size: 0,
            averaging_alpha: 1.0,
            request_timeout: Duration::from_secs(3),
            sender_timeout: Duration::from_secs(5),
            reducer_timeout: Duration::from_secs(10),
            allreduce_timeout: Duration::from_secs(120),
        }
    }
}

impl AllreduceConfig {
    /// Check ranges and relations between fields.
    ///
    /// # Errors
    /// [`AveragingError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: &str| {
            Err(AveragingError::InvalidConfig {
                field,
                reason: reason.into(),
            })
        };
        if self.part_size_bytes < 64 || self.part_size_bytes > (256 << 20) {
            return bad("part_size_bytes", "must be within 64 B ..= 256 MiB");
        }
        if !self.averaging_alpha.is_finite() || self.averaging_alpha <= 0.0 {
            return bad("averaging_alpha", "must be finite and positive");
        }
        if self.reducer_timeout <= self.sender_timeout {
            return bad("reducer_timeout", "must exceed sender_timeout");
        }
        if self.request_timeout.is_zero() || self.allreduce_timeout.is_zero() {
            return bad("allreduce_timeout", "timeouts must be positive");
        }
        Ok(())
    }

    /// Elements per part for this compression.
    pub fn part_len(&self) -> usize {
        ((self.part_size_bytes as f64 / self.compression.bytes_per_element()) as usize).max(1)
    }

    /// Largest sealed frame body a peer may send.
    pub fn max_frame_len(&self) -> usize {
        self.compression.encoded_len(self.part_len()) + 64
    }
}

/// Hash of the tensor layout; peers with different schemas never average.
pub fn schema_hash(layout: &TensorLayout) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"colony-schema-v1:f32");
    for len in layout.lengths() {
        h.update((*len as u64).to_le_bytes());
    }
    h.finalize().into()
}
