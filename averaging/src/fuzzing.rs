//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, not a
//! public API): each runs peer bytes through the functions the averager
//! runs them through, so a target fuzzes production code, not a copy of it.

use std::{ops::Range, time::Duration};

use crate::{
    compression::Compression,
    control::{self, ControlMsg, MAX_CONTROL_BYTES},
    entries,
    error::PeerFault,
    group::EntryContext,
    reducer::PartReducer,
    robust::Aggregation,
    wire::{HELLO_LEN, Hello, Opening, PREAMBLE_LEN, probe_request},
};

/// The largest control message body `control_message` accepts.
pub const CONTROL_CAP: usize = MAX_CONTROL_BYTES;
/// Length of a data-plane connection's opening bytes.
pub const OPENING_LEN: usize = PREAMBLE_LEN;

/// Runs `fut` to completion on a current-thread runtime with timers, the
/// context the control and state readers need. Inputs are slices, which
/// never pend, so no timer fires.
pub fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    thread_local! {
        static RUNTIME: Option<tokio::runtime::Runtime> = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .ok();
    }
    RUNTIME.with(|rt| match rt {
        Some(rt) => rt.block_on(fut),
        None => panic!("cannot build a tokio runtime for the fuzz target"),
    })
}

/// A control stream's bytes as a join peer reads them (length prefix, cap,
/// MessagePack body), then what the receiver checks next: a `Join` entry's
/// signature, a `Begin` group's invariants and every entry's signature.
/// Returns the message re-encoded, for round trips.
///
/// # Errors
/// The [`PeerFault`] the reader reports.
pub fn control_message(mut stream: &[u8]) -> Result<Vec<u8>, PeerFault> {
    let msg = block_on(control::recv(&mut stream, Duration::from_secs(1)))?;
    let ctx = EntryContext {
        prefix: "fuzz",
        group_key: "fuzz.0b",
        schema_hash: &[0; 32],
    };
    match &msg {
        ControlMsg::Join { member, .. } => {
            let _ = entries::verify_member(member, &ctx, 0.0);
        }
        ControlMsg::Begin { group } => {
            let _ = group.validate();
            let _ = group.bandwidths();
            let _ = entries::verify_group(group, &ctx, 0.0);
        }
        ControlMsg::Reply { .. } | ControlMsg::Disbanded { .. } => {}
    }
    rmp_serde::to_vec(&msg).map_err(|_| PeerFault::ProtocolViolation {
        reason: "unencodable control message",
    })
}

/// A data-plane connection's first bytes as the data plane reads them: a
/// round preamble or a reachability probe. Returns the opening re-encoded.
///
/// # Errors
/// The [`PeerFault`] for a bad magic.
pub fn opening(bytes: &[u8; OPENING_LEN]) -> Result<[u8; OPENING_LEN], PeerFault> {
    Ok(match Opening::decode(bytes)? {
        Opening::Round(preamble) => preamble.encode(),
        Opening::Probe(nonce) => probe_request(&nonce),
    })
}

/// A `Hello` frame's payload as a reducer reads it. Returns it re-encoded
/// and the compression it names, if any.
///
/// # Errors
/// The [`PeerFault`] for a payload of the wrong length.
pub fn hello(payload: &[u8]) -> Result<(Vec<u8>, Option<Compression>), PeerFault> {
    let hello = Hello::decode(payload)?;
    let mut out = Vec::with_capacity(HELLO_LEN);
    hello.encode(&mut out);
    Ok((out, Compression::from_code(hello.compression)))
}

/// One `Part` frame's payload as a reducer takes it: `sender` delivers part
/// `part` encoded with `compression` and `weight`, into a reducer over
/// `parts` for `senders` senders, combined with a trimmed mean (`trim`) or
/// the weighted mean. Returns how many values the reducer holds.
///
/// # Errors
/// The [`PeerFault`] the reducer reports.
#[allow(clippy::too_many_arguments)]
pub fn reducer_part(
    parts: Vec<Range<usize>>,
    senders: usize,
    trim: Option<usize>,
    sender: usize,
    part: usize,
    payload: &[u8],
    compression: Compression,
    weight: f32,
) -> Result<usize, PeerFault> {
    let agg = match trim {
        Some(trim) => Aggregation::TrimmedMean { trim },
        None => Aggregation::WeightedMean,
    };
    let mut reducer = PartReducer::with_aggregation(parts, senders, Vec::new(), agg);
    let mut scratch = Vec::new();
    reducer.accumulate_encoded(sender, part, payload, compression, weight, &mut scratch)?;
    reducer.advance();
    Ok(reducer.into_values().len())
}

/// Framed control messages of every kind, signed for the context
/// `control_message` checks, as seeds for its fuzz target.
pub fn control_seeds() -> Vec<Vec<u8>> {
    use crate::{
        group::{AssembledGroup, AveragingMode, GroupMember},
        matchmaking::{JoinCode, JoinRequest},
    };
    let ctx = EntryContext {
        prefix: "fuzz",
        group_key: "fuzz.0b",
        schema_hash: &[0; 32],
    };
    let member = |i: u8, mode| {
        let signer = colony_dht::PeerSigner::from_secret([i; 32]);
        let mut m = GroupMember {
            peer_id: signer.peer_id().to_bytes(),
            data_addr: (mode == AveragingMode::Node)
                .then(|| std::net::SocketAddr::from(([10, 0, 0, i], 4000 + u16::from(i)))),
            mode,
            bandwidth: Some(f64::from(i) * 100.0),
            round_public_key: [i; 32],
            signed: None,
        };
        entries::sign_member(&signer, &mut m, &ctx, 1.0e9);
        m
    };
    let a = member(1, AveragingMode::Node);
    let messages = [
        ControlMsg::Join {
            request: JoinRequest {
                peer_id: a.peer_id.clone(),
                schema_hash: vec![0; 32],
                expiration: 1.0e9,
                group_key: "fuzz.0b".into(),
                client_mode: false,
            },
            member: a.clone(),
        },
        ControlMsg::Reply {
            code: JoinCode::Accepted,
            suggested_leader: None,
            leader_expiration: Some(1.0e9),
        },
        ControlMsg::Reply {
            code: JoinCode::BadSchemaHash,
            suggested_leader: Some(a.peer_id.clone()),
            leader_expiration: None,
        },
        ControlMsg::Begin {
            group: AssembledGroup {
                group_id: [9; 32],
                members: vec![
                    a,
                    member(2, AveragingMode::Client),
                    member(3, AveragingMode::Aux),
                ],
            },
        },
        ControlMsg::Disbanded {
            suggested_leader: None,
        },
    ];
    messages
        .iter()
        .filter_map(|m| rmp_serde::to_vec(m).ok())
        .map(|body| {
            let mut frame = (body.len() as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(&body);
            frame
        })
        .collect()
}
