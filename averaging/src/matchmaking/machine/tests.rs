//! The matchmaker driven deterministically: fixed times, a seeded RNG, and
//! events fed by hand, as the shell would feed them.

use std::net::SocketAddr;

use rand::{SeedableRng, rngs::StdRng};

use super::*;
use crate::group::AveragingMode;

const KEY: &str = "run.0b";

fn member(id: u8) -> GroupMember {
    GroupMember {
        peer_id: vec![id],
        data_addr: Some(SocketAddr::from(([127, 0, 0, 1], 1000 + u16::from(id)))),
        mode: AveragingMode::Node,
        bandwidth: None,
        round_public_key: [id; 32],
        signed: None,
    }
}

fn config(id: u8, target: Option<usize>, min: usize) -> MatchmakerConfig {
    MatchmakerConfig {
        peer_id: vec![id],
        schema_hash: [9; 32],
        client_mode: false,
        target_group_size: target,
        min_group_size: min,
        min_matchmaking_time: 5.0,
        request_timeout: 1.0,
    }
}

/// A matchmaker for peer `id` and a seeded RNG.
struct Harness {
    m: Matchmaker,
    rng: StdRng,
    banned: Vec<Vec<u8>>,
}

impl Harness {
    fn new(cfg: MatchmakerConfig) -> Self {
        Self {
            m: Matchmaker::new(cfg),
            rng: StdRng::seed_from_u64(7),
            banned: Vec::new(),
        }
    }

    fn on(&mut self, event: Event, now: f64) -> Vec<Action> {
        self.m.on(event, now, &mut self.rng)
    }

    fn look(&mut self, id: u8, now: f64, timeout: f64) -> Vec<Action> {
        self.on(
            Event::Look {
                key: KEY.into(),
                me: member(id),
                deadline: now + timeout,
                banned: self.banned.clone(),
            },
            now,
        )
    }

    /// A join from `peer` on stream `join`, then its reply confirmed sent.
    fn join(&mut self, join: JoinId, peer: u8, expiration: f64, now: f64) -> Vec<Action> {
        let mut out = self.on(join_request(join, peer, expiration), now);
        out.extend(self.on(Event::ReplySent { join, ok: true }, now));
        out
    }
}

fn join_request(join: JoinId, peer: u8, expiration: f64) -> Event {
    Event::JoinRequest {
        join,
        peer: vec![peer],
        request: JoinRequest {
            peer_id: vec![peer],
            schema_hash: vec![9; 32],
            expiration,
            group_key: KEY.into(),
            client_mode: false,
        },
        member: member(peer),
    }
}

fn declared(id: u8, expiration: f64) -> Declared {
    Declared {
        peer_id: vec![id],
        expiration,
        client_mode: false,
    }
}

fn begun(actions: &[Action]) -> Option<(&AssembledGroup, &[JoinId])> {
    actions.iter().find_map(|a| match a {
        Action::Begin { group, joins } => Some((group, joins.as_slice())),
        _ => None,
    })
}

fn reply_code(actions: &[Action], join: JoinId) -> Option<JoinCode> {
    actions.iter().find_map(|a| match a {
        Action::Reply { join: j, code, .. } if *j == join => Some(*code),
        _ => None,
    })
}

fn ids(group: &AssembledGroup) -> Vec<u8> {
    let mut ids: Vec<u8> = group.members.iter().map(|m| m.peer_id[0]).collect();
    ids.sort_unstable();
    ids
}

#[test]
fn a_leader_declares_reads_and_assembles_when_full() {
    let mut h = Harness::new(config(1, Some(3), 2));
    let out = h.look(1, 100.0, 30.0);
    assert_eq!(
        out,
        vec![
            Action::Declare {
                key: KEY.into(),
                expiration: 105.0
            },
            Action::ReadDeclarations { key: KEY.into() },
        ]
    );
    // Nothing better declared: it waits as a leader.
    assert!(
        h.on(Event::Declarations(vec![declared(1, 105.0)]), 100.1)
            .is_empty()
    );
    let out = h.on(join_request(10, 2, 106.0), 100.2);
    assert_eq!(reply_code(&out, 10), Some(JoinCode::Accepted));
    assert!(
        h.on(Event::ReplySent { join: 10, ok: true }, 100.2)
            .is_empty()
    );
    assert_eq!(h.m.followers(), 1);
    let out = h.join(11, 3, 107.0, 100.3);
    let (group, joins) = begun(&out).expect("a full group assembles at once");
    assert_eq!(ids(group), vec![1, 2, 3]);
    assert_eq!(joins, &[10, 11]);
    // It leaves matchmaking and withdraws its declaration.
    assert!(out.contains(&Action::Withdraw {
        key: KEY.into(),
        expiration: 105.0 + 1e-3
    }));
    assert!(!h.m.is_looking());
}

#[test]
fn a_retried_join_from_the_same_peer_replaces_its_old_entry() {
    let mut h = Harness::new(config(1, Some(3), 2));
    h.look(1, 100.0, 30.0);
    h.join(10, 2, 106.0, 100.1);
    assert_eq!(h.m.followers(), 1);
    // Peer 2 retries on a new stream (its first attempt timed out on its side).
    let out = h.on(join_request(11, 2, 106.0), 100.5);
    assert!(out.contains(&Action::Close { join: 10 }), "{out:?}");
    assert_eq!(reply_code(&out, 11), Some(JoinCode::Accepted));
    h.on(Event::ReplySent { join: 11, ok: true }, 100.5);
    assert_eq!(h.m.followers(), 1, "the dead entry must not count");
    // A retry while the first reply is still in flight replaces it too.
    h.on(join_request(12, 3, 107.0), 100.6);
    let out = h.on(join_request(13, 3, 107.0), 100.7);
    assert!(out.contains(&Action::Close { join: 12 }));
    assert_eq!(reply_code(&out, 13), Some(JoinCode::Accepted));
    let out = h.on(Event::ReplySent { join: 13, ok: true }, 100.7);
    let (group, joins) = begun(&out).expect("full with three distinct peers");
    assert_eq!(ids(group), vec![1, 2, 3]);
    assert_eq!(joins, &[11, 13]);
}

#[test]
fn joins_that_lie_about_their_identity_are_refused() {
    let mut h = Harness::new(config(1, Some(4), 2));
    h.look(1, 100.0, 30.0);
    let mut forged = join_request(10, 2, 106.0);
    if let Event::JoinRequest { peer, .. } = &mut forged {
        *peer = vec![7];
    }
    assert_eq!(
        reply_code(&h.on(forged, 100.1), 10),
        Some(JoinCode::ProtocolViolation)
    );
    let mut wrong_mode = join_request(11, 2, 106.0);
    if let Event::JoinRequest { member, .. } = &mut wrong_mode {
        member.mode = AveragingMode::Client;
    }
    assert_eq!(
        reply_code(&h.on(wrong_mode, 100.1), 11),
        Some(JoinCode::ProtocolViolation)
    );
    assert_eq!(h.m.followers(), 0);
    // Idle peers refuse joins.
    let mut idle = Harness::new(config(1, Some(4), 2));
    assert_eq!(
        reply_code(&idle.on(join_request(12, 2, 106.0), 100.0), 12),
        Some(JoinCode::NotLookingForGroup)
    );
}

#[test]
fn a_follower_joins_the_best_leader_and_takes_its_group() {
    let mut h = Harness::new(config(5, Some(4), 2));
    h.look(5, 100.0, 30.0);
    let out = h.on(
        Event::Declarations(vec![
            declared(5, 105.0),
            declared(3, 104.0),
            declared(9, 103.0),
        ]),
        100.1,
    );
    let Some(Action::AskLeader {
        attempt,
        leader,
        request,
        ..
    }) = out.first().cloned()
    else {
        panic!("expected a join request, got {out:?}");
    };
    assert_eq!(leader, vec![9], "the earliest expiration leads");
    assert_eq!(request.expiration, 105.0);
    let out = h.on(
        Event::LeaderAnswer {
            attempt,
            answer: LeaderAnswer::Accepted {
                leader_expiration: Some(103.0),
            },
        },
        100.2,
    );
    // Waits until the later of both expirations, plus two requests.
    assert!(
        matches!(out.as_slice(), [Action::AwaitLeader { attempt: a, wait }] if *a == attempt && (wait - 6.8).abs() < 1e-9),
        "{out:?}"
    );
    // While following it refuses joins and names its leader.
    let out = h.on(join_request(20, 7, 106.0), 100.3);
    assert!(out.contains(&Action::Reply {
        join: 20,
        code: JoinCode::NotALeader,
        suggested_leader: Some(vec![9]),
        leader_expiration: None,
    }));
    let group = AssembledGroup {
        group_id: [1; 32],
        members: vec![member(9), member(5)],
    };
    let out = h.on(
        Event::LeaderMessage {
            attempt,
            message: LeaderMessage::Begin(group.clone()),
        },
        103.0,
    );
    assert_eq!(begun(&out), Some((&group, &[][..])));
    assert!(!h.m.is_looking());
}

#[test]
fn a_group_that_lost_this_peers_entry_is_refused() {
    let mut h = Harness::new(config(5, Some(4), 2));
    h.look(5, 100.0, 30.0);
    h.on(Event::Declarations(vec![declared(9, 103.0)]), 100.1);
    h.on(
        Event::LeaderAnswer {
            attempt: 0,
            answer: LeaderAnswer::Accepted {
                leader_expiration: Some(103.0),
            },
        },
        100.2,
    );
    // The leader swapped this peer's round key.
    let mut swapped = member(5);
    swapped.round_public_key = [0xee; 32];
    let group = AssembledGroup {
        group_id: [1; 32],
        members: vec![member(9), swapped],
    };
    let out = h.on(
        Event::LeaderMessage {
            attempt: 0,
            message: LeaderMessage::Begin(group),
        },
        103.0,
    );
    assert!(begun(&out).is_none());
    assert!(h.m.is_looking(), "it keeps looking after a bad group");
    // That leader is not asked again for this declaration.
    let out = h.on(Event::Declarations(vec![declared(9, 103.0)]), 103.5);
    assert!(!out.iter().any(|a| matches!(a, Action::AskLeader { .. })));
}

/// A follower accepted by leader 9, waiting for its group.
fn accepted_follower() -> Harness {
    let mut h = Harness::new(config(5, Some(4), 2));
    h.look(5, 100.0, 30.0);
    h.on(Event::Declarations(vec![declared(9, 103.0)]), 100.1);
    h.on(
        Event::LeaderAnswer {
            attempt: 0,
            answer: LeaderAnswer::Accepted {
                leader_expiration: Some(103.0),
            },
        },
        100.2,
    );
    h
}

#[test]
fn a_group_may_drop_this_peers_data_address_but_not_change_it() {
    let begin = |h: &mut Harness, mine: GroupMember| {
        let group = AssembledGroup {
            group_id: [1; 32],
            members: vec![member(9), mine],
        };
        let out = h.on(
            Event::LeaderMessage {
                attempt: 0,
                message: LeaderMessage::Begin(group.clone()),
            },
            103.0,
        );
        begun(&out).map(|(g, _)| g.clone())
    };
    // The leader found this peer's address unusable: reached over libp2p.
    let mut dropped = member(5);
    dropped.data_addr = None;
    let mut h = accepted_follower();
    assert_eq!(
        begin(&mut h, dropped.clone()).map(|g| g.members[1].clone()),
        Some(dropped)
    );
    // Pointing it elsewhere is tampering.
    let mut moved = member(5);
    moved.data_addr = Some(SocketAddr::from(([10, 0, 0, 1], 9)));
    let mut h = accepted_follower();
    assert_eq!(begin(&mut h, moved), None);
    assert!(h.m.is_looking());
}

#[test]
fn a_leader_accepted_elsewhere_hands_its_followers_over() {
    let mut h = Harness::new(config(5, Some(4), 2));
    h.look(5, 100.0, 30.0);
    h.join(10, 6, 106.0, 100.1);
    let out = h.on(Event::Declarations(vec![declared(2, 104.0)]), 100.2);
    assert!(matches!(out.first(), Some(Action::AskLeader { leader, .. }) if *leader == vec![2]));
    let out = h.on(
        Event::LeaderAnswer {
            attempt: 0,
            answer: LeaderAnswer::Accepted {
                leader_expiration: Some(104.0),
            },
        },
        100.3,
    );
    assert!(out.contains(&Action::Disband {
        joins: vec![10],
        suggested_leader: Some(vec![2]),
    }));
    assert_eq!(h.m.followers(), 0);
}

#[test]
fn redirects_are_followed_but_never_to_itself_and_not_forever() {
    let mut h = Harness::new(config(5, Some(4), 2));
    h.look(5, 100.0, 30.0);
    h.on(Event::Declarations(vec![declared(2, 104.0)]), 100.1);
    let not_a_leader = |next: u8| LeaderAnswer::Refused {
        code: JoinCode::NotALeader,
        suggested_leader: Some(vec![next]),
    };
    let out = h.on(
        Event::LeaderAnswer {
            attempt: 0,
            answer: not_a_leader(3),
        },
        100.2,
    );
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::AskLeader { leader, .. } if *leader == vec![3]))
    );
    // A redirect to itself ends the attempt.
    let out = h.on(
        Event::LeaderAnswer {
            attempt: 0,
            answer: not_a_leader(5),
        },
        100.3,
    );
    assert!(!out.iter().any(|a| matches!(a, Action::AskLeader { .. })));
    // And candidate 2 is not asked again under this declaration.
    let out = h.on(Event::Declarations(vec![declared(2, 104.0)]), 100.5);
    assert!(!out.iter().any(|a| matches!(a, Action::AskLeader { .. })));
    // A chain of redirects stops after MAX_REDIRECTS.
    let mut h = Harness::new(config(5, Some(4), 2));
    h.look(5, 100.0, 30.0);
    h.on(Event::Declarations(vec![declared(2, 104.0)]), 100.1);
    let mut asks = 0;
    for next in 10..20 {
        let out = h.on(
            Event::LeaderAnswer {
                attempt: 0,
                answer: not_a_leader(next),
            },
            100.2,
        );
        asks += out
            .iter()
            .filter(|a| matches!(a, Action::AskLeader { .. }))
            .count();
    }
    assert_eq!(asks, MAX_REDIRECTS);
}

#[test]
fn an_unreachable_leader_is_retried_a_few_times_then_skipped() {
    let mut h = Harness::new(config(5, Some(4), 2));
    h.look(5, 100.0, 30.0);
    let mut asked = 0;
    let mut now = 100.1;
    for attempt in 0..10 {
        let out = h.on(Event::Declarations(vec![declared(2, 104.0)]), now);
        if !out.iter().any(|a| matches!(a, Action::AskLeader { .. })) {
            break;
        }
        asked += 1;
        h.on(
            Event::LeaderAnswer {
                attempt,
                answer: LeaderAnswer::Unreachable {
                    reason: "closed".into(),
                },
            },
            now,
        );
        now += 0.3;
    }
    assert_eq!(asked, MAX_TRANSIENT_FAILURES + 1);
}

#[test]
fn at_expiration_too_few_disband_and_the_peer_re_declares_until_the_deadline() {
    let mut h = Harness::new(config(1, Some(4), 3));
    h.look(1, 100.0, 8.0);
    h.on(Event::Declarations(vec![]), 100.1);
    h.join(10, 2, 106.0, 100.2);
    // Past the expiration and its grace, with one follower of the three needed.
    let out = h.on(Event::Tick, 106.1);
    assert!(out.contains(&Action::Disband {
        joins: vec![10],
        suggested_leader: None
    }));
    assert!(out.contains(&Action::Declare {
        key: KEY.into(),
        expiration: 108.0
    }));
    let out = h.on(Event::Tick, 108.0);
    assert_eq!(
        out.first(),
        Some(&Action::Fail(Failure::NoGroupFound {
            waited: std::time::Duration::from_secs(8)
        }))
    );
    assert!(!h.m.is_looking());
}

#[test]
fn at_expiration_a_leader_waits_for_joins_in_flight_and_declared_peers() {
    let mut h = Harness::new(config(1, Some(4), 2));
    h.look(1, 100.0, 30.0);
    // Peers 2 and 3 declared after this one: they rank below it.
    h.on(
        Event::Declarations(vec![
            declared(1, 105.0),
            declared(2, 105.5),
            declared(3, 106.0),
        ]),
        100.1,
    );
    h.join(10, 2, 105.5, 100.2);
    // Expired, peer 3 is declared and has not come yet: wait (the grace).
    assert!(begun(&h.on(Event::Tick, 105.0)).is_none());
    assert_eq!(h.m.next_wake(105.0), Some(105.0 + 0.3_f64.min(1.0 / 6.0)));
    // Peer 3's join arrives in the grace; its reply is in flight.
    let out = h.on(join_request(11, 3, 106.0), 105.4);
    assert_eq!(reply_code(&out, 11), Some(JoinCode::Accepted));
    assert!(
        begun(&h.on(Event::Tick, 105.5)).is_none(),
        "a pending join holds the group"
    );
    let out = h.on(Event::ReplySent { join: 11, ok: true }, 105.6);
    let (group, _) = begun(&out).expect("assembled with the late peer");
    assert_eq!(ids(group), vec![1, 2, 3]);

    // Without that peer arriving, the grace ends after one request timeout.
    let mut h = Harness::new(config(1, Some(4), 2));
    h.look(1, 100.0, 30.0);
    h.on(
        Event::Declarations(vec![declared(2, 105.5), declared(3, 106.0)]),
        100.1,
    );
    h.join(10, 2, 105.5, 100.2);
    assert!(begun(&h.on(Event::Tick, 105.5)).is_none());
    let out = h.on(Event::Tick, 106.0);
    let (group, _) = begun(&out).expect("assembled when the grace ended");
    assert_eq!(ids(group), vec![1, 2]);
}

#[test]
fn cancelling_withdraws_and_releases_followers_and_ignores_late_answers() {
    let mut h = Harness::new(config(1, Some(4), 2));
    h.look(1, 100.0, 30.0);
    h.join(10, 2, 106.0, 100.1);
    h.on(Event::Declarations(vec![declared(0, 104.0)]), 100.2);
    let out = h.on(Event::Cancel, 100.3);
    assert!(out.contains(&Action::Withdraw {
        key: KEY.into(),
        expiration: 105.0 + 1e-3
    }));
    assert!(out.contains(&Action::DropLeader { attempt: 0 }));
    assert!(out.contains(&Action::Disband {
        joins: vec![10],
        suggested_leader: None
    }));
    assert_eq!(
        (h.m.followers(), h.m.declared_expiration(), h.m.is_looking()),
        (0, None, false)
    );
    // The leader accepts after all: the answer is stale and its stream dropped.
    let out = h.on(
        Event::LeaderAnswer {
            attempt: 0,
            answer: LeaderAnswer::Accepted {
                leader_expiration: Some(104.0),
            },
        },
        100.4,
    );
    assert_eq!(out, vec![Action::DropLeader { attempt: 0 }]);
    // A reply that was in flight ends in a disband.
    h.on(join_request(11, 3, 106.0), 100.2);
    let out = h.on(Event::ReplySent { join: 11, ok: true }, 100.5);
    assert_eq!(
        out,
        vec![Action::Disband {
            joins: vec![11],
            suggested_leader: None
        }]
    );
    // A declaration about to expire is left to expire.
    let mut h = Harness::new(config(1, Some(4), 2));
    h.look(1, 100.0, 30.0);
    let out = h.on(Event::Cancel, 104.5);
    assert!(!out.iter().any(|a| matches!(a, Action::Withdraw { .. })));
}

#[test]
fn followers_that_leave_do_not_count() {
    let mut h = Harness::new(config(1, Some(3), 2));
    h.look(1, 100.0, 30.0);
    h.join(10, 2, 106.0, 100.1);
    h.on(Event::FollowerGone { join: 10 }, 100.2);
    assert_eq!(h.m.followers(), 0);
    let out = h.join(11, 3, 106.0, 100.3);
    assert!(begun(&out).is_none(), "two of three after one left");
}

#[test]
fn groups_are_shuffled_by_the_given_rng_only() {
    let run = || {
        let mut h = Harness::new(config(1, Some(4), 2));
        h.look(1, 100.0, 30.0);
        h.join(10, 2, 106.0, 100.1);
        h.join(11, 3, 106.0, 100.1);
        let out = h.join(12, 4, 106.0, 100.1);
        begun(&out).map(|(g, _)| g.clone()).expect("full")
    };
    assert_eq!(run(), run(), "same seed, same group");
}

#[test]
fn a_client_never_leads_and_asks_any_node() {
    let mut cfg = config(5, Some(4), 2);
    cfg.client_mode = true;
    let mut h = Harness::new(cfg);
    h.look(5, 100.0, 30.0);
    // A leader declared later than this client is still asked.
    let out = h.on(Event::Declarations(vec![declared(7, 109.0)]), 100.1);
    assert!(matches!(out.first(), Some(Action::AskLeader { leader, .. }) if *leader == vec![7]));
    assert_eq!(
        reply_code(&h.on(join_request(10, 2, 106.0), 100.2), 10),
        Some(JoinCode::ProtocolViolation)
    );
}

#[test]
fn a_leaders_group_that_is_too_large_repeats_a_member_or_leaves_someone_out_is_refused() {
    let begin = |h: &mut Harness, members: Vec<GroupMember>| {
        let group = AssembledGroup {
            group_id: [1; 32],
            members,
        };
        let out = h.on(
            Event::LeaderMessage {
                attempt: 0,
                message: LeaderMessage::Begin(group),
            },
            103.0,
        );
        begun(&out).is_some()
    };
    // Target 4: five members is more than this peer agreed to.
    let mut h = accepted_follower();
    let five = vec![member(9), member(5), member(1), member(2), member(3)];
    assert!(!begin(&mut h, five));
    assert!(h.m.is_looking());
    // A member listed twice (the same id with another key: two spans).
    let mut h = accepted_follower();
    let mut twin = member(1);
    twin.round_public_key = [0x77; 32];
    assert!(!begin(&mut h, vec![member(9), member(5), member(1), twin]));
    // Without this peer.
    let mut h = accepted_follower();
    assert!(!begin(&mut h, vec![member(9), member(1), member(2)]));
    // Without the leader it joined.
    let mut h = accepted_follower();
    assert!(!begin(&mut h, vec![member(5), member(1), member(2)]));
    // The honest group is taken.
    let mut h = accepted_follower();
    assert!(begin(&mut h, vec![member(9), member(5), member(1)]));
}

#[test]
fn the_wait_for_begin_ends_at_this_peers_deadline_whatever_the_leader_declared() {
    let mut h = Harness::new(config(5, Some(4), 2));
    // Deadline at 130.
    h.look(5, 100.0, 30.0);
    h.on(Event::Declarations(vec![declared(9, 103.0)]), 100.1);
    let out = h.on(
        Event::LeaderAnswer {
            attempt: 0,
            answer: LeaderAnswer::Accepted {
                // A million seconds away.
                leader_expiration: Some(1e6),
            },
        },
        100.2,
    );
    let wait = out
        .iter()
        .find_map(|a| match a {
            Action::AwaitLeader { wait, .. } => Some(*wait),
            _ => None,
        })
        .expect("waits for the leader");
    assert!(
        (wait - 29.8).abs() < 1e-9,
        "waits {wait} s, not past the deadline"
    );
    // And a stalled leader then ends the search at the deadline.
    let mut out = h.on(
        Event::LeaderMessage {
            attempt: 0,
            message: LeaderMessage::Lost {
                reason: "stalled".into(),
            },
        },
        130.0,
    );
    out.extend(h.on(Event::Tick, 130.0));
    assert!(
        out.iter().any(|a| matches!(a, Action::Fail(_))),
        "gives up at its deadline: {out:?}"
    );
}

#[test]
fn banned_peers_are_not_followed_not_accepted_and_not_grouped_with() {
    // A banned declared leader is not asked.
    let mut h = Harness::new(config(5, Some(4), 2));
    h.banned = vec![vec![9]];
    h.look(5, 100.0, 30.0);
    let out = h.on(Event::Declarations(vec![declared(9, 103.0)]), 100.1);
    assert!(!out.iter().any(|a| matches!(a, Action::AskLeader { .. })));
    // A banned joiner is refused with its own code.
    let out = h.on(join_request(1, 9, 106.0), 100.2);
    assert_eq!(reply_code(&out, 1), Some(JoinCode::Banned));
    // A leader's group naming a banned member is refused.
    let mut h = accepted_follower();
    h.m = Matchmaker::new(config(5, Some(4), 2));
    h.banned = vec![vec![3]];
    h.look(5, 100.0, 30.0);
    h.on(Event::Declarations(vec![declared(9, 103.0)]), 100.1);
    h.on(
        Event::LeaderAnswer {
            attempt: 0,
            answer: LeaderAnswer::Accepted {
                leader_expiration: Some(103.0),
            },
        },
        100.2,
    );
    let group = AssembledGroup {
        group_id: [1; 32],
        members: vec![member(9), member(5), member(3)],
    };
    let out = h.on(
        Event::LeaderMessage {
            attempt: 0,
            message: LeaderMessage::Begin(group),
        },
        103.0,
    );
    assert!(begun(&out).is_none());
    assert!(h.m.is_looking());
}
