//! Matchmaking: who averages with whom.
//!
//! * [`rules`]: the reference's decisions as pure functions (leader order,
//!   join codes, when to assemble);
//! * [`Matchmaker`]: the synchronous state machine that owns every
//!   matchmaking decision (events and the time in, actions out);
//! * the async shell (crate-private) that performs its actions over the DHT
//!   and libp2p streams.

mod events;
mod machine;
pub mod rules;
pub(crate) mod shell;

pub use events::{Action, Event, Failure, JoinId, LeaderAnswer, LeaderMessage};
pub use machine::{
    MAX_REDIRECTS, MAX_TRANSIENT_FAILURES, Matchmaker, MatchmakerConfig, WITHDRAW_MARGIN_S,
};
pub use rules::{
    Declared, JoinCode, JoinRequest, LeaderView, assemble_decision, decide_join, leader_candidates,
};
