//! The matchmaker's inputs ([`Event`]) and outputs ([`Action`]).

use super::rules::{Declared, JoinCode, JoinRequest};
use crate::{
    error::AveragingError,
    group::{AssembledGroup, GroupMember},
};

/// Identifies one inbound join stream for the shell.
pub type JoinId = u64;

/// What a leader answered to this peer's join request.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaderAnswer {
    /// Accepted; the leader acts by `leader_expiration` (if it said).
    Accepted {
        /// The leader's declared expiration.
        leader_expiration: Option<f64>,
    },
    /// Refused with `code`, maybe naming the leader it follows.
    Refused {
        /// The refusal.
        code: JoinCode,
        /// Who to ask instead.
        suggested_leader: Option<Vec<u8>>,
    },
    /// The leader could not be reached or did not answer in time (worth a
    /// retry).
    Unreachable {
        /// What failed, for the log.
        reason: String,
    },
    /// The leader answered something that is not a reply.
    Violation {
        /// What was wrong.
        reason: String,
    },
}

/// What the leader this peer follows sent after accepting it.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaderMessage {
    /// The group, as assembled.
    Begin(AssembledGroup),
    /// The leader gave up (or joined another leader, suggested here).
    Disbanded(Option<Vec<u8>>),
    /// The stream closed or stalled before either (worth a retry).
    Lost {
        /// What failed, for the log.
        reason: String,
    },
    /// The leader sent something else.
    Violation {
        /// What was wrong.
        reason: String,
    },
}

/// Inputs of the matchmaker.
#[derive(Debug, Clone)]
pub enum Event {
    /// Start looking for a group under `key` until `deadline` (DHT time),
    /// presenting `me` to the group.
    Look {
        /// The group key.
        key: String,
        /// This peer's entry in the group.
        me: GroupMember,
        /// When to give up (DHT time).
        deadline: f64,
        /// Peers this one banned for a provable fault: never led, followed
        /// or grouped with during this search.
        banned: Vec<Vec<u8>>,
    },
    /// Stop looking (the step was cancelled).
    Cancel,
    /// Time passed.
    Tick,
    /// The declarations under the group key, as read for
    /// [`Action::ReadDeclarations`].
    Declarations(Vec<Declared>),
    /// A peer asks this one to lead it. `peer` is the id its stream
    /// authenticated (the claims in `request` and `member` are checked
    /// against it).
    JoinRequest {
        /// The stream.
        join: JoinId,
        /// The authenticated peer id.
        peer: Vec<u8>,
        /// Its request.
        request: JoinRequest,
        /// Its group entry.
        member: GroupMember,
    },
    /// The `Accepted` reply to `join` was sent (`ok`) or failed.
    ReplySent {
        /// The stream.
        join: JoinId,
        /// Whether the reply went out.
        ok: bool,
    },
    /// A follower's stream closed (it gave up).
    FollowerGone {
        /// The stream.
        join: JoinId,
    },
    /// The answer to [`Action::AskLeader`] number `attempt`.
    LeaderAnswer {
        /// The attempt it answers.
        attempt: u64,
        /// The answer.
        answer: LeaderAnswer,
    },
    /// What the leader of attempt `attempt` sent after accepting this peer.
    LeaderMessage {
        /// The attempt.
        attempt: u64,
        /// The message.
        message: LeaderMessage,
    },
}

/// Outputs of the matchmaker, performed by the shell in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Store this peer's declaration under `key` until `expiration`.
    Declare {
        /// The group key.
        key: String,
        /// DHT time.
        expiration: f64,
    },
    /// Store nil under `key` with `expiration`, superseding the declaration.
    Withdraw {
        /// The group key.
        key: String,
        /// DHT time (just after the declaration's).
        expiration: f64,
    },
    /// Read the declarations under `key`; answer with [`Event::Declarations`].
    ReadDeclarations {
        /// The group key.
        key: String,
    },
    /// Send `request` (and `member`) to `leader`; answer with
    /// [`Event::LeaderAnswer`] within one request timeout.
    AskLeader {
        /// Numbers the attempt; the answer carries it.
        attempt: u64,
        /// The leader's id.
        leader: Vec<u8>,
        /// The join request.
        request: JoinRequest,
        /// This peer's entry.
        member: GroupMember,
    },
    /// Wait up to `wait` seconds on the accepted leader's stream; answer
    /// with [`Event::LeaderMessage`].
    AwaitLeader {
        /// The attempt whose stream to read.
        attempt: u64,
        /// Seconds.
        wait: f64,
    },
    /// Drop the stream of attempt `attempt` (this peer stopped following).
    DropLeader {
        /// The attempt.
        attempt: u64,
    },
    /// Answer `join`. An `Accepted` answer is followed by
    /// [`Event::ReplySent`]; any other answer closes the stream after it.
    Reply {
        /// The stream.
        join: JoinId,
        /// The answer.
        code: JoinCode,
        /// Who to ask instead.
        suggested_leader: Option<Vec<u8>>,
        /// This leader's expiration (with `Accepted`).
        leader_expiration: Option<f64>,
    },
    /// Tell these followers the group is off, suggesting a leader; their
    /// streams close after it.
    Disband {
        /// The streams.
        joins: Vec<JoinId>,
        /// Who to follow instead.
        suggested_leader: Option<Vec<u8>>,
    },
    /// Close the stream of a join that a newer one from the same peer
    /// replaced.
    Close {
        /// The stream.
        join: JoinId,
    },
    /// Send `group` to these followers; matchmaking succeeded.
    Begin {
        /// The group.
        group: AssembledGroup,
        /// The followers' streams.
        joins: Vec<JoinId>,
    },
    /// Matchmaking failed.
    Fail(Failure),
}

/// Why matchmaking ended without a group.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The deadline passed.
    NoGroupFound {
        /// How long the search ran.
        waited: std::time::Duration,
    },
    /// Fewer peers than `min_group_size` when the group had to form.
    GroupTooSmall {
        /// Peers present.
        size: usize,
        /// The minimum.
        min: usize,
    },
    /// The group would break an invariant.
    InvalidGroup {
        /// Which.
        reason: String,
    },
}

impl From<Failure> for AveragingError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::NoGroupFound { waited } => Self::NoGroupFound { waited },
            Failure::GroupTooSmall { size, min } => Self::GroupTooSmall { size, min },
            Failure::InvalidGroup { reason } => Self::InvalidGroup { reason },
        }
    }
}
