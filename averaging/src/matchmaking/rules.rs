//! Matchmaking rules as pure functions (no I/O, no clock): which declared
//! averagers to ask to lead, and how a leader answers a join request.

use serde::{Deserialize, Serialize};

/// A declared averager: `(expiration, peer id)` orders leadership.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Declared {
    /// Peer id bytes.
    pub peer_id: Vec<u8>,
    /// Declared expiration (absolute DHT time).
    pub expiration: f64,
    /// Client-mode peers never lead; they may ask any leader.
    #[serde(default)]
    pub client_mode: bool,
}

/// Peers this peer may ask to lead it: non-client peers with a smaller
/// `(expiration, peer id)` than its own, best first; `already_tried`
/// `(peer, expiration)` pairs are skipped. A client never leads, so it may ask
/// any non-client peer without risking a cycle.
pub fn leader_candidates(
    me: &Declared,
    declared: &[Declared],
    already_tried: &[(Vec<u8>, f64)],
) -> Vec<Declared> {
    let key = |d: &Declared| (d.expiration, d.peer_id.clone());
    let mine = key(me);
    let mut out: Vec<Declared> = declared
        .iter()
        .filter(|d| d.peer_id != me.peer_id && !d.client_mode)
        .filter(|d| {
            let k = key(d);
            me.client_mode || k.0 < mine.0 || (k.0 == mine.0 && k.1 < mine.1)
        })
        .filter(|d| {
            !already_tried
                .iter()
                .any(|(p, e)| *p == d.peer_id && *e == d.expiration)
        })
        .cloned()
        .collect();
    out.sort_by(|a, b| {
        a.expiration
            .total_cmp(&b.expiration)
            .then_with(|| a.peer_id.cmp(&b.peer_id))
    });
    out
}

/// Codes a leader answers a join request with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinCode {
    /// Accepted; wait for `BeginAllreduce`.
    Accepted,
    /// Not searching, or the group is already assembled.
    NotLookingForGroup,
    /// Malformed request, or this leader is a client.
    ProtocolViolation,
    /// Tensor schema differs.
    BadSchemaHash,
    /// Group key differs.
    BadGroupKey,
    /// The leader has not declared itself yet.
    NotDeclared,
    /// The leader's expiration is later than the follower's.
    BadExpirationTime,
    /// This peer follows someone else (see the suggested leader).
    NotALeader,
    /// The peer is already in the group.
    DuplicatePeerId,
    /// The group is full.
    GroupIsFull,
    /// This leader banned the joiner for a provable fault in a recent
    /// round (not in the reference).
    Banned,
}

/// What a leader knows when a join request arrives.
#[derive(Debug, Clone)]
pub struct LeaderView<'a> {
    /// Whether this peer is looking for a group and not yet assembled.
    pub looking: bool,
    /// Whether this peer is in client mode.
    pub client_mode: bool,
    /// This peer's tensor schema hash.
    pub schema_hash: &'a [u8],
    /// This peer's current group key.
    pub group_key: &'a str,
    /// This peer's declared expiration, if declared.
    pub declared_expiration: Option<f64>,
    /// The leader this peer follows, if any.
    pub following: Option<&'a [u8]>,
    /// Current followers.
    pub followers: &'a [Vec<u8>],
    /// Maximum group size (`None` = unbounded).
    pub target_group_size: Option<usize>,
}

/// A join request as the leader sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// Requesting peer.
    pub peer_id: Vec<u8>,
    /// Its schema hash.
    pub schema_hash: Vec<u8>,
    /// Its declared expiration.
    pub expiration: f64,
    /// Its group key.
    pub group_key: String,
    /// Whether it is a client.
    pub client_mode: bool,
}

/// The leader's answer, checked in the reference's order.
pub fn decide_join(view: &LeaderView<'_>, req: &JoinRequest) -> JoinCode {
    if !view.looking {
        return JoinCode::NotLookingForGroup;
    }
    if view.client_mode || !req.expiration.is_finite() || req.peer_id.is_empty() {
        return JoinCode::ProtocolViolation;
    }
    if req.schema_hash != view.schema_hash {
        return JoinCode::BadSchemaHash;
    }
    if req.group_key != view.group_key {
        return JoinCode::BadGroupKey;
    }
    let Some(my_exp) = view.declared_expiration else {
        return JoinCode::NotDeclared;
    };
    // A client never leads, so it cannot form a cycle: it may join a leader
    // whose deadline is later than its own (it waits for that deadline).
    if my_exp > req.expiration && !req.client_mode {
        return JoinCode::BadExpirationTime;
    }
    if view.following.is_some() {
        return JoinCode::NotALeader;
    }
    if view.followers.contains(&req.peer_id) {
        return JoinCode::DuplicatePeerId;
    }
    if let Some(target) = view.target_group_size
        && view.followers.len() + 1 >= target
    {
        return JoinCode::GroupIsFull;
    }
    JoinCode::Accepted
}

/// Whether a leader with `followers` should assemble now (`deadline_passed`:
/// its declared expiration has passed). `Some(true)` = assemble, `Some(false)` =
/// disband, `None` = keep waiting.
pub fn assemble_decision(
    followers: usize,
    target_group_size: Option<usize>,
    min_group_size: usize,
    deadline_passed: bool,
) -> Option<bool> {
    let size = followers + 1;
    if target_group_size.is_some_and(|t| size >= t) {
        return Some(true);
    }
    if deadline_passed {
        return Some(size >= min_group_size);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(id: u8, e: f64) -> Declared {
        Declared {
            peer_id: vec![id],
            expiration: e,
            client_mode: false,
        }
    }

    #[test]
    fn earlier_expiration_then_smaller_id_leads() {
        let me = d(5, 10.0);
        let all = [d(1, 11.0), d(2, 10.0), d(9, 10.0), d(3, 9.0), d(5, 10.0)];
        let c = leader_candidates(&me, &all, &[]);
        assert_eq!(c, vec![d(3, 9.0), d(2, 10.0)]);
        let c = leader_candidates(&me, &all, &[(vec![3], 9.0)]);
        assert_eq!(c, vec![d(2, 10.0)]);
        // Two peers never ask each other: the order is total.
        assert!(leader_candidates(&d(2, 10.0), &[d(5, 10.0)], &[]).is_empty());
        // Clients are never asked, and ask anyone.
        let client = Declared {
            client_mode: true,
            ..d(0, 1.0)
        };
        assert!(leader_candidates(&d(5, 10.0), std::slice::from_ref(&client), &[]).is_empty());
        assert_eq!(leader_candidates(&client, &all, &[]).len(), all.len());
    }

    #[test]
    fn join_codes_in_reference_order() {
        let followers = vec![vec![7u8]];
        let view = LeaderView {
            looking: true,
            client_mode: false,
            schema_hash: b"s",
            group_key: "p.0b",
            declared_expiration: Some(10.0),
            following: None,
            followers: &followers,
            target_group_size: Some(4),
        };
        let req = JoinRequest {
            peer_id: vec![8],
            schema_hash: b"s".to_vec(),
            expiration: 11.0,
            group_key: "p.0b".into(),
            client_mode: false,
        };
        assert_eq!(decide_join(&view, &req), JoinCode::Accepted);
        let with = |f: &dyn Fn(&mut JoinRequest)| {
            let mut r = req.clone();
            f(&mut r);
            decide_join(&view, &r)
        };
        assert_eq!(
            with(&|r| r.schema_hash = b"x".to_vec()),
            JoinCode::BadSchemaHash
        );
        assert_eq!(
            with(&|r| r.group_key = "p.0b1".into()),
            JoinCode::BadGroupKey
        );
        assert_eq!(with(&|r| r.expiration = 9.0), JoinCode::BadExpirationTime);
        assert_eq!(with(&|r| r.peer_id = vec![7]), JoinCode::DuplicatePeerId);
        let full = LeaderView {
            target_group_size: Some(2),
            ..view.clone()
        };
        assert_eq!(decide_join(&full, &req), JoinCode::GroupIsFull);
        let client = LeaderView {
            client_mode: true,
            ..view.clone()
        };
        assert_eq!(decide_join(&client, &req), JoinCode::ProtocolViolation);
        let follower = LeaderView {
            following: Some(&[1]),
            ..view.clone()
        };
        assert_eq!(decide_join(&follower, &req), JoinCode::NotALeader);
        let idle = LeaderView {
            looking: false,
            ..view
        };
        assert_eq!(decide_join(&idle, &req), JoinCode::NotLookingForGroup);
    }

    #[test]
    fn assembly_rules() {
        assert_eq!(assemble_decision(3, Some(4), 2, false), Some(true));
        assert_eq!(assemble_decision(1, Some(4), 2, false), None);
        assert_eq!(assemble_decision(1, Some(4), 2, true), Some(true));
        assert_eq!(assemble_decision(0, Some(4), 2, true), Some(false));
    }
}
