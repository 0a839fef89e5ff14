//! A group as the all-reduce sees it, and the round configuration.

use std::{net::SocketAddr, ops::Range, time::Duration};

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
    /// The member's own signature over this entry (see
    /// [`GroupMember::signed_message`]). Matchmaking among averagers always
    /// signs; groups built by hand for [`crate::round::run_allreduce`] may
    /// leave it out.
    #[serde(default)]
    pub signed: Option<Box<EntrySignature>>,
}

/// A member's signature over its group entry, made with its libp2p
/// identity key: a leader relaying the entry cannot change its round key,
/// address, mode or bandwidth, or move it to another run or group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntrySignature {
    /// The data address as the member declared it. The leader may drop
    /// [`GroupMember::data_addr`] (unusable from where it stands: the
    /// member is then reached over libp2p), never change it.
    pub declared_addr: Option<SocketAddr>,
    /// DHT time after which the entry is void (the member's own deadline).
    pub expires: f64,
    /// The ed25519 signature, 64 bytes.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// What a member's entry signature covers besides the entry itself.
#[derive(Debug, Clone, Copy)]
pub struct EntryContext<'a> {
    /// The averager's run prefix.
    pub prefix: &'a str,
    /// The group key the member looked under.
    pub group_key: &'a str,
    /// The member's tensor schema hash.
    pub schema_hash: &'a [u8; 32],
}

impl GroupMember {
    /// The bytes a member signs for its entry: a domain tag, the context,
    /// and every field of the entry (with the declared data address), each
    /// length-prefixed.
    pub fn signed_message(
        &self,
        ctx: &EntryContext<'_>,
        declared_addr: Option<SocketAddr>,
        expires: f64,
    ) -> Vec<u8> {
        let mut m = Vec::with_capacity(256);
        let mut put = |b: &[u8]| {
            m.extend_from_slice(&(b.len() as u64).to_le_bytes());
            m.extend_from_slice(b);
        };
        put(b"colony-averaging-group-entry-v1");
        put(ctx.prefix.as_bytes());
        put(ctx.group_key.as_bytes());
        put(ctx.schema_hash);
        put(&self.peer_id);
        put(declared_addr
            .map(|a| a.to_string())
            .unwrap_or_default()
            .as_bytes());
        put(&[match self.mode {
            AveragingMode::Node => 0u8,
            AveragingMode::Client => 1,
            AveragingMode::Aux => 2,
        }]);
        match self.bandwidth {
            None => put(&[]),
            Some(b) => put(&b.to_bits().to_le_bytes()),
        }
        put(&self.round_public_key);
        put(&expires.to_bits().to_le_bytes());
        m
    }
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

    /// Bandwidths for the balancer, as every member computes them from the
    /// same group (clients forced to 0). Hints are self-declared, so they are
    /// sanitized first: a negative or non-finite one counts as unknown, and a
    /// known one is clamped to [`MAX_BANDWIDTH_RATIO`] times the median of the
    /// declared positive hints (and to [`MAX_BANDWIDTH`]). A member declaring
    /// `1e308` thus takes at most that ratio of a median peer's share instead
    /// of the whole vector.
    pub fn bandwidths(&self) -> Vec<Option<f64>> {
        let declared: Vec<Option<f64>> = self
            .members
            .iter()
            .map(|m| match m.mode {
                AveragingMode::Client => Some(0.0),
                _ => m.bandwidth.filter(|b| b.is_finite() && *b >= 0.0),
            })
            .collect();
        let mut positive: Vec<f64> = declared
            .iter()
            .flatten()
            .copied()
            .filter(|b| *b > 0.0)
            .collect();
        positive.sort_by(f64::total_cmp);
        let cap = match positive.len() {
            0 => MAX_BANDWIDTH,
            n => {
                let median = if n % 2 == 1 {
                    positive[n / 2]
                } else {
                    0.5 * (positive[n / 2 - 1] + positive[n / 2])
                };
                (median * MAX_BANDWIDTH_RATIO).min(MAX_BANDWIDTH)
            }
        };
        declared
            .into_iter()
            .map(|b| b.map(|b| b.min(cap)))
            .collect()
    }

    /// SHA-256 of the whole group as this member sees it: the id, the
    /// order and every member's entry (peer id, data address, mode,
    /// bandwidth hint, round public key). Every connection key of the round
    /// is salted with it, so members given different views of the group by
    /// their leader cannot talk to each other.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"colony-group-v1");
        h.update(self.group_id);
        h.update((self.members.len() as u64).to_le_bytes());
        for m in &self.members {
            h.update((m.peer_id.len() as u64).to_le_bytes());
            h.update(&m.peer_id);
            let addr = m.data_addr.map(|a| a.to_string()).unwrap_or_default();
            h.update((addr.len() as u64).to_le_bytes());
            h.update(addr.as_bytes());
            h.update([match m.mode {
                AveragingMode::Node => 0u8,
                AveragingMode::Client => 1,
                AveragingMode::Aux => 2,
            }]);
            match m.bandwidth {
                None => h.update([0u8]),
                Some(b) => {
                    h.update([1u8]);
                    h.update(b.to_bits().to_le_bytes());
                }
            }
            h.update(m.round_public_key);
            match &m.signed {
                None => h.update([0u8]),
                Some(s) => {
                    h.update([1u8]);
                    h.update(s.expires.to_bits().to_le_bytes());
                    h.update((s.signature.len() as u64).to_le_bytes());
                    h.update(&s.signature);
                }
            }
        }
        h.finalize().into()
    }
}

/// Largest bandwidth hint the balancer uses (bytes per second or any unit:
/// hints are relative; this only keeps the arithmetic finite).
pub const MAX_BANDWIDTH: f64 = 1e12;
/// A member's bandwidth hint counts for at most this multiple of the
/// group's median hint.
pub const MAX_BANDWIDTH_RATIO: f64 = 4.0;

/// Per-peer limits on the weight a reducer lets each sender carry, for
/// callers that know more than the round does (`colony-optim` caps each
/// peer at the samples it published for this step and at a multiple of
/// `target_batch_size / peers`). Every weight is also capped at
/// [`AllreduceConfig::max_weight`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WeightCaps {
    /// The cap of a peer not in `per_peer` (`None`: only `max_weight`).
    pub default: Option<f32>,
    /// Caps by peer id.
    pub per_peer: std::collections::HashMap<Vec<u8>, f32>,
}

impl WeightCaps {
    /// The cap of each member of `group`, in group order.
    pub fn for_group(&self, group: &AssembledGroup) -> Vec<f32> {
        group
            .members
            .iter()
            .map(|m| {
                self.per_peer
                    .get(&m.peer_id)
                    .copied()
                    .or(self.default)
                    .unwrap_or(f32::INFINITY)
            })
            .collect()
    }
}

/// 2^24: the default [`AllreduceConfig::max_weight`].
pub const MAX_EXACT_WEIGHT: f32 = 16_777_216.0;

/// Knobs of one all-reduce round. Every group member must use the same
/// `part_size_bytes`, `compression` and `min_vector_size`.
#[derive(Debug, Clone, PartialEq)]
pub struct AllreduceConfig {
    /// Bytes per part on the wire, after compression. Default 4 MiB: large frames
    /// amortise syscalls and AEAD setup (the reference uses 512 KiB over gRPC).
    pub part_size_bytes: usize,
    /// Wire compression. Default none.
    pub compression: Compression,
    /// A codec per tensor of the averaged layout, overriding `compression`
    /// (empty, the default: every tensor travels in `compression`). Lets
    /// gradients go in fp16 while parameters and optimizer state stay
    /// exact: fp16 flushes values below 6e-8 to zero, which turns Adam's
    /// second moments into zeros and its update m/(√v + ε) into a blow-up.
    /// Parts never straddle two tensors whose codecs differ. Every member of
    /// a group must use the same codecs: they are part of the schema hash.
    pub tensor_compression: Vec<Compression>,
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
    /// Largest weight a sender may carry: a reducer clips a larger declared
    /// weight to it (and to the round's per-member caps, see
    /// [`crate::DecentralizedAverager::set_weight_caps`]), so one member
    /// declaring `1e30` counts as this much, not as everything. Weights are
    /// sample counts in `colony-optim`; the default, 2^24, is the largest
    /// count an `f32` holds exactly.
    pub max_weight: f32,
    /// How a reducer combines its senders' parts. Default
    /// [`Aggregation::WeightedMean`] (streamed, no robustness: one sender
    /// can move an average anywhere its weight allows). The robust rules
    /// bound what a minority of senders can do (see
    /// [`crate::round::Aggregation`] for the bounds) at a cost in reducer
    /// CPU and one copy of the span per sender in memory.
    pub aggregation: crate::robust::Aggregation,
    /// What the tensors mean to the caller, when the layout alone does not
    /// say (empty, the default): `colony-optim` puts its update scheme here,
    /// so that peers applying local updates never average with peers
    /// averaging gradients, even where both layouts have the same lengths.
    /// Part of the schema hash; at most 256 bytes.
    pub schema_tag: String,
}

impl Default for AllreduceConfig {
    fn default() -> Self {
        Self {
            part_size_bytes: 4 << 20,
            compression: Compression::None,
            tensor_compression: Vec::new(),
            min_vector_size: 0,
            averaging_alpha: 1.0,
            request_timeout: Duration::from_secs(3),
            sender_timeout: Duration::from_secs(5),
            reducer_timeout: Duration::from_secs(10),
            allreduce_timeout: Duration::from_secs(120),
            max_weight: MAX_EXACT_WEIGHT,
            aggregation: crate::robust::Aggregation::WeightedMean,
            schema_tag: String::new(),
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
        if !self.max_weight.is_finite() || self.max_weight <= 0.0 {
            return bad("max_weight", "must be finite and positive");
        }
        if let Err(e) = self.aggregation.validate() {
            return Err(AveragingError::InvalidConfig {
                field: "aggregation",
                reason: e.to_string(),
            });
        }
        if self.schema_tag.len() > 256 {
            return bad("schema_tag", "must be at most 256 bytes");
        }
        Ok(())
    }

    /// How long after a round starts a sender must have delivered every
    /// part to a reducer: 60 % of `allreduce_timeout`. A sender still
    /// sending then is banned ([`crate::PeerFault::TooSlow`]) and the span
    /// finishes without the rest of its parts, so one slow or drip-feeding
    /// sender cannot spend the whole round deadline.
    pub fn sender_budget(&self) -> Duration {
        self.allreduce_timeout.mul_f64(0.6)
    }

    /// How long after a round starts a sender waits for a reducer's
    /// results: 90 % of `allreduce_timeout`. After that it keeps its local
    /// values for the parts still missing and the round ends in time.
    pub fn reducer_budget(&self) -> Duration {
        self.allreduce_timeout.mul_f64(0.9)
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
    schema_hash_of(layout, &[], "")
}

/// Hash of the tensor layout and, when tensors have codecs of their own
/// ([`AllreduceConfig::tensor_compression`]), of those codecs: peers that
/// would encode a tensor differently never average together.
pub(crate) fn schema_hash_with(layout: &TensorLayout, cfg: &AllreduceConfig) -> [u8; 32] {
    schema_hash_of(layout, &cfg.tensor_compression, &cfg.schema_tag)
}

fn schema_hash_of(
    layout: &TensorLayout,
    tensor_compression: &[Compression],
    tag: &str,
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"colony-schema-v1:f32");
    for len in layout.lengths() {
        h.update((*len as u64).to_le_bytes());
    }
    if !tensor_compression.is_empty() {
        h.update(b"codecs:");
        for c in tensor_compression {
            h.update([c.code()]);
        }
    }
    if !tag.is_empty() {
        h.update(b"tag:");
        h.update((tag.len() as u64).to_le_bytes());
        h.update(tag.as_bytes());
    }
    h.finalize().into()
}

/// Which codec each element of the flat vector travels in, and the parts a
/// span is cut into so that no part mixes two codecs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Codecs {
    /// Per run of tensors with one codec: where it ends in the flat vector.
    ends: Vec<usize>,
    codecs: Vec<Compression>,
    part_size_bytes: usize,
}

impl Codecs {
    /// The codecs of `layout` under `cfg`.
    ///
    /// # Errors
    /// [`AveragingError::InvalidConfig`] when `cfg.tensor_compression`
    /// names a codec for a different number of tensors than `layout` has.
    pub(crate) fn new(layout: &TensorLayout, cfg: &AllreduceConfig) -> Result<Self> {
        let per_tensor = &cfg.tensor_compression;
        if per_tensor.is_empty() {
            return Ok(Self {
                ends: vec![layout.total()],
                codecs: vec![cfg.compression],
                part_size_bytes: cfg.part_size_bytes,
            });
        }
        if per_tensor.len() != layout.lengths().len() {
            return Err(AveragingError::InvalidConfig {
                field: "tensor_compression",
                reason: format!(
                    "names {} codecs for {} tensors",
                    per_tensor.len(),
                    layout.lengths().len()
                ),
            });
        }
        let (mut ends, mut codecs) = (Vec::new(), Vec::<Compression>::new());
        let mut end = 0;
        for (len, codec) in layout.lengths().iter().zip(per_tensor) {
            end += len;
            if codecs.last() == Some(codec) {
                if let Some(last) = ends.last_mut() {
                    *last = end;
                }
            } else {
                codecs.push(*codec);
                ends.push(end);
            }
        }
        Ok(Self {
            ends,
            codecs,
            part_size_bytes: cfg.part_size_bytes,
        })
    }

    /// The codec of flat element `at`.
    pub(crate) fn at(&self, at: usize) -> Compression {
        let run = self.ends.partition_point(|&end| end <= at);
        self.codecs
            .get(run)
            .or(self.codecs.last())
            .copied()
            .unwrap_or_default()
    }

    /// The one codec of every element, if there is one.
    pub(crate) fn uniform(&self) -> Option<Compression> {
        match self.codecs.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// What a hello says about the codecs: the one codec's code, or 255 for
    /// a mix (the mix itself is checked through the schema hash).
    pub(crate) fn hello_code(&self) -> u8 {
        self.uniform().map_or(u8::MAX, Compression::code)
    }

    /// Elements per part in `codec`.
    fn part_len(&self, codec: Compression) -> usize {
        ((self.part_size_bytes as f64 / codec.bytes_per_element()) as usize).max(1)
    }

    /// The parts of `span` (flat indices), in order: each within one codec's
    /// run and at most `part_size_bytes` on the wire.
    pub(crate) fn parts(&self, span: Range<usize>) -> Vec<Range<usize>> {
        let mut out = Vec::new();
        let mut start = span.start;
        while start < span.end {
            let run = self.ends.partition_point(|&end| end <= start);
            let run_end = self.ends.get(run).copied().unwrap_or(span.end);
            let codec = self.at(start);
            let end = (start + self.part_len(codec)).min(span.end).min(run_end);
            out.push(start..end);
            start = end;
        }
        out
    }

    /// Largest sealed frame body a peer may send.
    pub(crate) fn max_frame_len(&self) -> usize {
        self.codecs
            .iter()
            .map(|&c| c.encoded_len(self.part_len(c)))
            .max()
            .unwrap_or(0)
            + 64
    }
}
