//! The crate's error type.

use std::time::Duration;

/// Why a remote peer was excluded from a round (a sender banned by a reducer, or a
/// reducer whose results were abandoned by a sender).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PeerFault {
    /// The peer named a group this averager is not running.
    #[error("unknown group id")]
    BadGroupId,
    /// The peer's tensor schema hash differs from ours.
    #[error("tensor schema hash differs")]
    BadSchemaHash,
    /// A part decoded to the wrong number of values.
    #[error("part {part} has {got} values, expected {expected}")]
    WrongPartSize {
        /// Part index within the reducer's span.
        part: usize,
        /// Number of values expected.
        expected: usize,
        /// Number of values received.
        got: usize,
    },
    /// The peer sent a part index past the end of the span or out of order.
    #[error("unexpected part index {got} (expected {expected} of {count})")]
    UnexpectedPart {
        /// Index the protocol expected next.
        expected: usize,
        /// Index received.
        got: usize,
        /// Number of parts in the span.
        count: usize,
    },
    /// The peer sent NaN or infinite values.
    #[error("part {part} holds non-finite values")]
    NonFinite {
        /// Part index within the reducer's span.
        part: usize,
    },
    /// A frame failed authentication or could not be parsed.
    #[error("garbage frame: {reason}")]
    Garbage {
        /// What was wrong.
        reason: &'static str,
    },
    /// The peer sent nothing within the timeout.
    #[error("stalled for {timeout:?}")]
    Stalled {
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The connection failed or closed early.
    #[error("disconnected: {reason}")]
    Disconnected {
        /// The I/O error or reason.
        reason: String,
    },
    /// A libp2p data stream claimed the sender slot of a group member whose
    /// peer id is not the stream's (noise-authenticated) peer.
    #[error("stream's libp2p peer is not group member {sender}")]
    ImpersonatedSender {
        /// The sender index the preamble claimed.
        sender: usize,
    },
    /// The sender declared a weight that is NaN, infinite or negative.
    #[error("declared weight {weight} is not a finite non-negative number")]
    BadWeight {
        /// The weight it declared.
        weight: f32,
    },
    /// The sender did not deliver its parts within its share of the round
    /// deadline (each part came within `sender_timeout`, but too slowly for
    /// the round to finish).
    #[error("delivered {delivered} of {parts} parts within its budget of {budget:?}")]
    TooSlow {
        /// Parts delivered in time.
        delivered: usize,
        /// Parts of the span.
        parts: usize,
        /// The sender's budget from the round's start.
        budget: Duration,
    },
    /// The peer broke the protocol in some other way.
    #[error("protocol violation: {reason}")]
    ProtocolViolation {
        /// What was wrong.
        reason: &'static str,
    },
}

/// Errors returned by this crate.
#[derive(Debug, thiserror::Error)]
pub enum AveragingError {
    /// A configuration value is out of range.
    #[error("invalid averaging config: {field}: {reason}")]
    InvalidConfig {
        /// Field name.
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// A group description is inconsistent (no such member, no reducers, ...).
    #[error("invalid group: {reason}")]
    InvalidGroup {
        /// What is wrong.
        reason: String,
    },
    /// Matchmaking ended without a group.
    #[error("could not find a group within {waited:?}")]
    NoGroupFound {
        /// How long matchmaking ran.
        waited: Duration,
    },
    /// Fewer peers than the minimum group size.
    #[error("group of {size} peers is below the minimum {min}")]
    GroupTooSmall {
        /// Peers found.
        size: usize,
        /// Minimum required.
        min: usize,
    },
    /// The caller's buffers do not match the averager's tensor layout.
    #[error("tensor layout mismatch: expected {expected} elements, got {got}")]
    LayoutMismatch {
        /// Elements expected.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// Local tensors hold NaN or infinity. The round still ran: this peer
    /// withdrew from every reducer from the poisoned part on (its earlier,
    /// finite parts stay in their averages) and reduced its own span for the
    /// others, but applies nothing.
    #[error("local tensors hold non-finite values")]
    NonFiniteLocal,
    /// The whole all-reduce exceeded its deadline; nothing was applied.
    #[error("all-reduce timed out after {timeout:?}; local tensors unchanged")]
    AllreduceTimeout {
        /// The deadline that expired.
        timeout: Duration,
    },
    /// Every remote reducer failed, so nothing was averaged.
    #[error("all {failed} remote reducers failed; local tensors unchanged")]
    AllReducersFailed {
        /// Number of failed reducers.
        failed: usize,
    },
    /// A compressed buffer could not be decoded.
    #[error("decode error: {reason}")]
    Decode {
        /// What was wrong.
        reason: &'static str,
    },
    /// A cryptographic operation failed.
    #[error("crypto error: {context}")]
    Crypto {
        /// Which operation.
        context: &'static str,
    },
    /// Moving tensors to or from a device buffer failed.
    #[error("device error while {context}")]
    Device {
        /// What was being done.
        context: &'static str,
        /// The kernels' error.
        #[source]
        source: colony_kernels::KernelError,
    },
    /// Socket-level failure on this peer.
    #[error("i/o error while {context}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A peer misbehaved in a way that makes the operation impossible.
    #[error("peer {peer}: {fault}")]
    Peer {
        /// Index of the peer in the group, or donor index.
        peer: usize,
        /// What it did.
        fault: PeerFault,
    },
    /// The DHT failed (a store, a get, a stream, a protocol registration).
    #[error("dht error while {context}")]
    Dht {
        /// What was being done.
        context: &'static str,
        /// The DHT's error (boxed: it carries peer ids, and every result of
        /// this crate would pay for its size).
        #[source]
        source: Box<colony_dht::DhtError>,
    },
    /// An invariant of this crate broke (a poisoned lock, a task gone); a bug,
    /// not a peer's fault.
    #[error("internal error: {what}")]
    Internal {
        /// What broke.
        what: &'static str,
    },
    /// State download found no usable donor.
    #[error("no donor could provide state ({tried} tried)")]
    NoStateDonor {
        /// How many donors were tried.
        tried: usize,
    },
    /// No state is vouched for by enough distinct donors.
    #[error(
        "no state is vouched for by {needed} donors ({donors} live donors, at most {best_vouchers} agree)"
    )]
    NoVouchedState {
        /// Distinct donors declared.
        donors: usize,
        /// The most donors vouching for one root (at any priority).
        best_vouchers: usize,
        /// How many had to.
        needed: usize,
    },
}

impl AveragingError {
    /// Wraps a DHT error with what was being done (for `map_err`).
    pub(crate) fn dht(context: &'static str) -> impl Fn(colony_dht::DhtError) -> Self {
        move |source| Self::Dht {
            context,
            source: Box::new(source),
        }
    }
}

/// Shorthand result type.
pub type Result<T, E = AveragingError> = std::result::Result<T, E>;
