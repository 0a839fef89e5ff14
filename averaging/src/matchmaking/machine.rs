//! The matchmaker as a synchronous state machine (sans I/O).
//!
//! [`Matchmaker::on`] takes one [`Event`] (a declaration list read from the
//! DHT, a join request, a leader's answer, a timer tick, ...) together with
//! the current DHT time and a random number generator, and returns the
//! [`Action`]s the shell must perform (declare, read the DHT, ask a leader,
//! answer a joiner, disband, begin). It never blocks, sleeps or reads a clock,
//! so every decision is tested deterministically (see `tests.rs`); the async
//! shell in `shell.rs` only performs the actions and feeds results back.
//!
//! The rules follow the reference's `matchmaking.py`: a peer declares itself
//! under the group key with an expiration, asks any better-placed declared
//! peer (earlier `(expiration, peer id)`) to lead it, and, as a leader,
//! assembles when its group is full or at its expiration with at least
//! `min_group_size` members. Beyond the reference:
//! * a leader that is itself accepted by a better leader redirects its
//!   followers there, so groups never split because someone read the DHT
//!   early;
//! * a join retried by the same authenticated peer replaces its old entry
//!   (the old one is dead: it never counts toward a full group);
//! * at its expiration a leader waits up to one `request_timeout` for joins
//!   still being answered and for peers it saw declared below it that have not
//!   reached it yet, so a peer that found its leader late is not left out.

use rand::{RngCore, seq::SliceRandom};

use super::{
    events::{Action, Event, Failure, JoinId, LeaderAnswer, LeaderMessage},
    rules::{
        Declared, JoinCode, JoinRequest, LeaderView, assemble_decision, decide_join,
        leader_candidates,
    },
};
use crate::{
    error::AveragingError,
    group::{AssembledGroup, GroupMember},
};

/// Redirects a follower accepts in one attempt ("not a leader, ask X", or
/// "disbanded, follow X").
pub const MAX_REDIRECTS: usize = 4;

/// Times a leader that could not be reached is retried per declaration.
pub const MAX_TRANSIENT_FAILURES: usize = 3;

/// Seconds of remaining lifetime below which a declaration is not withdrawn
/// but left to expire (the withdrawal would reach storers too late).
pub const WITHDRAW_MARGIN_S: f64 = 1.0;

/// The parts of the averager's configuration that matchmaking decides with.
#[derive(Debug, Clone)]
pub struct MatchmakerConfig {
    /// This peer's id bytes.
    pub peer_id: Vec<u8>,
    /// This peer's tensor schema hash.
    pub schema_hash: [u8; 32],
    /// Whether this peer is a client (never leads).
    pub client_mode: bool,
    /// Largest group (`None` = unbounded).
    pub target_group_size: Option<usize>,
    /// Smallest group that runs when time is up.
    pub min_group_size: usize,
    /// How long a declaration lives (s).
    pub min_matchmaking_time: f64,
    /// How long a leader has to answer, and the grace a leader grants (s).
    pub request_timeout: f64,
}

impl MatchmakerConfig {
    /// How often declarations are re-read while looking (s).
    pub fn poll_interval(&self) -> f64 {
        (self.request_timeout / 6.0).clamp(0.02, 0.3)
    }
}

/// The attempt to join a leader in flight.
#[derive(Debug, Clone)]
struct Attempt {
    id: u64,
    /// The candidate first asked, and its declared expiration: what
    /// `tried` remembers.
    candidate: (Vec<u8>, f64),
    leader: Vec<u8>,
    redirects: usize,
    /// Accepted: waiting for `Begin`.
    accepted: bool,
}

#[derive(Debug, Clone)]
struct Pending {
    join: JoinId,
    peer: Vec<u8>,
    member: GroupMember,
    /// The declaration it was accepted under.
    expiration: f64,
}

#[derive(Debug)]
struct Looking {
    key: String,
    me: GroupMember,
    started: f64,
    deadline: f64,
    expiration: f64,
    attempt: Option<Attempt>,
    followers: Vec<(JoinId, GroupMember)>,
    pending: Vec<Pending>,
    tried: Vec<(Vec<u8>, f64)>,
    transient: Vec<((Vec<u8>, f64), usize)>,
    next_search: f64,
    reading: bool,
    /// Declarations seen in the latest read.
    seen: Vec<Declared>,
    /// Peers banned for provable faults (see [`Event::Look`]).
    banned: Vec<Vec<u8>>,
}

/// The matchmaking state machine of one averager (see the module docs).
#[derive(Debug)]
pub struct Matchmaker {
    cfg: MatchmakerConfig,
    looking: Option<Looking>,
    /// Declarations not yet superseded: `(key, expiration)`.
    declared: Option<(String, f64)>,
    next_attempt: u64,
}

impl Matchmaker {
    /// An idle matchmaker.
    pub fn new(cfg: MatchmakerConfig) -> Self {
        Self {
            cfg,
            looking: None,
            declared: None,
            next_attempt: 0,
        }
    }

    /// Whether a search is running.
    pub fn is_looking(&self) -> bool {
        self.looking.is_some()
    }

    /// Followers this peer leads now.
    pub fn followers(&self) -> usize {
        self.looking.as_ref().map_or(0, |l| l.followers.len())
    }

    /// This peer's current declared expiration, while looking.
    pub fn declared_expiration(&self) -> Option<f64> {
        self.looking.as_ref().map(|l| l.expiration)
    }

    /// The streams of current followers (the shell checks they are alive).
    pub fn follower_joins(&self) -> Vec<JoinId> {
        self.looking
            .as_ref()
            .map(|l| l.followers.iter().map(|(j, _)| *j).collect())
            .unwrap_or_default()
    }

    /// When the machine next needs an [`Event::Tick`] (DHT time), given that
    /// it is `now`. `None` while idle, and while a leader is being asked or
    /// followed: the answer is an event, bounded by the shell's timeouts.
    pub fn next_wake(&self, now: f64) -> Option<f64> {
        let l = self.looking.as_ref()?;
        if l.attempt.is_some() {
            return None;
        }
        let mut wake = if now < l.expiration {
            l.deadline.min(l.expiration)
        } else {
            // In the grace after the expiration: re-check every poll (the
            // grace may run up to one request timeout past the deadline).
            (l.expiration + self.cfg.request_timeout).min(now + self.cfg.poll_interval())
        };
        if !l.reading {
            wake = wake.min(l.next_search);
        }
        Some(wake)
    }

    /// Feed one event at DHT time `now`; returns what to do.
    pub fn on(&mut self, event: Event, now: f64, rng: &mut impl RngCore) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Look {
                key,
                me,
                deadline,
                banned,
            } => self.start(key, me, deadline, banned, now, &mut out),
            Event::Cancel => self.stop(now, &mut out),
            Event::Tick => {}
            Event::Declarations(all) => self.on_declarations(all, now, &mut out),
            Event::JoinRequest {
                join,
                peer,
                request,
                member,
            } => self.on_join(join, peer, request, member, &mut out),
            Event::ReplySent { join, ok } => self.on_reply_sent(join, ok, &mut out),
            Event::FollowerGone { join } => {
                if let Some(l) = self.looking.as_mut() {
                    l.followers.retain(|(j, _)| *j != join);
                }
            }
            Event::LeaderAnswer { attempt, answer } => {
                self.on_leader_answer(attempt, answer, now, &mut out);
            }
            Event::LeaderMessage { attempt, message } => {
                self.on_leader_message(attempt, message, now, &mut out);
            }
        }
        self.decide(now, rng, &mut out);
        out
    }

    fn start(
        &mut self,
        key: String,
        me: GroupMember,
        deadline: f64,
        banned: Vec<Vec<u8>>,
        now: f64,
        out: &mut Vec<Action>,
    ) {
        // A search that is still running is replaced (its followers are told).
        self.stop(now, out);
        let expiration = (now + self.cfg.min_matchmaking_time).min(deadline);
        out.push(Action::Declare {
            key: key.clone(),
            expiration,
        });
        self.declared = Some((key.clone(), expiration));
        self.looking = Some(Looking {
            key,
            me,
            started: now,
            deadline,
            expiration,
            attempt: None,
            followers: Vec::new(),
            pending: Vec::new(),
            tried: Vec::new(),
            transient: Vec::new(),
            next_search: now,
            reading: false,
            seen: Vec::new(),
            banned,
        });
    }

    /// Leave matchmaking: withdraw the declaration (unless it is about to
    /// expire), release followers and any leader being followed.
    fn stop(&mut self, now: f64, out: &mut Vec<Action>) {
        if let Some((key, expiration)) = self.declared.take()
            && expiration > now + WITHDRAW_MARGIN_S
        {
            out.push(Action::Withdraw {
                key,
                expiration: expiration + 1e-3,
            });
        }
        let Some(l) = self.looking.take() else { return };
        if let Some(a) = l.attempt {
            out.push(Action::DropLeader { attempt: a.id });
        }
        let joins: Vec<JoinId> = l.followers.iter().map(|(j, _)| *j).collect();
        if !joins.is_empty() {
            out.push(Action::Disband {
                joins,
                suggested_leader: None,
            });
        }
    }

    fn finish(
        &mut self,
        result: Result<(AssembledGroup, Vec<JoinId>), Failure>,
        now: f64,
        out: &mut Vec<Action>,
    ) {
        match result {
            Ok((group, joins)) => {
                if let Some(l) = self.looking.as_mut() {
                    l.followers.clear();
                }
                out.push(Action::Begin { group, joins });
            }
            Err(e) => out.push(Action::Fail(e)),
        }
        self.stop(now, out);
    }

    fn on_declarations(&mut self, all: Vec<Declared>, now: f64, out: &mut Vec<Action>) {
        let poll = self.cfg.poll_interval();
        let client = self.cfg.client_mode;
        let Some(l) = self.looking.as_mut() else {
            return;
        };
        l.reading = false;
        l.next_search = now + poll;
        let mine = Declared {
            peer_id: self.cfg.peer_id.clone(),
            expiration: l.expiration,
            client_mode: client,
        };
        // Banned peers are neither asked to lead nor waited for.
        l.seen = all
            .into_iter()
            .filter(|d| !l.banned.contains(&d.peer_id))
            .collect();
        if l.attempt.is_some() {
            return;
        }
        let Some(leader) = leader_candidates(&mine, &l.seen, &l.tried)
            .into_iter()
            .next()
        else {
            return;
        };
        tracing::debug!(
            declared = l.seen.len(),
            leader_expiration = leader.expiration,
            "asking a better leader"
        );
        let id = self.next_attempt;
        self.next_attempt += 1;
        out.push(ask(&self.cfg, l, id, leader.peer_id.clone()));
        l.attempt = Some(Attempt {
            id,
            candidate: (leader.peer_id.clone(), leader.expiration),
            leader: leader.peer_id,
            redirects: 0,
            accepted: false,
        });
    }

    /// Redirect attempt `a` to `next`, or give up on it.
    fn redirect(&mut self, mut a: Attempt, next: Vec<u8>, out: &mut Vec<Action>) {
        let banned = self
            .looking
            .as_ref()
            .is_some_and(|l| l.banned.contains(&next));
        if next == self.cfg.peer_id || a.redirects >= MAX_REDIRECTS || banned {
            tracing::debug!(
                banned,
                "redirect refused (to itself, to a banned peer, or too many)"
            );
            self.give_up_on(a, false);
            return;
        }
        a.redirects += 1;
        a.accepted = false;
        a.leader = next.clone();
        let Some(l) = self.looking.as_mut() else {
            return;
        };
        out.push(ask(&self.cfg, l, a.id, next));
        l.attempt = Some(a);
    }

    /// The attempt failed: remember the candidate as tried (a transient
    /// failure is retried a few times first).
    fn give_up_on(&mut self, a: Attempt, transient: bool) {
        let Some(l) = self.looking.as_mut() else {
            return;
        };
        l.attempt = None;
        let failures = l
            .transient
            .iter_mut()
            .find(|(c, _)| *c == a.candidate)
            .map(|(_, n)| n);
        let retry = transient
            && match failures {
                Some(n) if *n >= MAX_TRANSIENT_FAILURES => false,
                Some(n) => {
                    *n += 1;
                    true
                }
                None => {
                    l.transient.push((a.candidate.clone(), 1));
                    true
                }
            };
        tracing::debug!(retry, "join attempt failed");
        if !retry {
            l.tried.push(a.candidate);
        }
    }

    fn current_attempt(&mut self, attempt: u64) -> Option<Attempt> {
        let l = self.looking.as_mut()?;
        if l.attempt.as_ref().is_some_and(|a| a.id == attempt) {
            l.attempt.take()
        } else {
            None
        }
    }

    fn on_leader_answer(
        &mut self,
        attempt: u64,
        answer: LeaderAnswer,
        now: f64,
        out: &mut Vec<Action>,
    ) {
        let Some(mut a) = self.current_attempt(attempt) else {
            // A stale answer (matchmaking ended or moved on): let it go.
            out.push(Action::DropLeader { attempt });
            return;
        };
        match answer {
            LeaderAnswer::Accepted { leader_expiration } => {
                let t = self.cfg.request_timeout;
                let Some(l) = self.looking.as_mut() else {
                    return;
                };
                let leader_expiration = leader_expiration
                    .filter(|e| e.is_finite())
                    .unwrap_or(l.expiration);
                // Stop leading: hand followers over to the new leader.
                let orphans: Vec<JoinId> = l.followers.drain(..).map(|(j, _)| j).collect();
                if !orphans.is_empty() {
                    tracing::debug!(
                        followers = orphans.len(),
                        "joined a better leader; redirecting followers"
                    );
                    out.push(Action::Disband {
                        joins: orphans,
                        suggested_leader: Some(a.leader.clone()),
                    });
                }
                // The leader acts by its expiration (not later than ours
                // unless we are a client), at most one request late; and
                // never past this peer's own deadline, whatever the leader
                // declared (a leader answering "accepted" with an expiration
                // days away must not hold a follower that long).
                let until = l.expiration.max(leader_expiration);
                let wait = ((until + 2.0 * t).min(l.deadline) - now).max(0.0);
                a.accepted = true;
                l.attempt = Some(a);
                out.push(Action::AwaitLeader { attempt, wait });
            }
            LeaderAnswer::Refused {
                code: JoinCode::NotALeader,
                suggested_leader: Some(next),
            } => {
                tracing::debug!("not a leader; following its suggestion");
                out.push(Action::DropLeader { attempt });
                self.redirect(a, next, out);
            }
            LeaderAnswer::Refused {
                code: JoinCode::BadSchemaHash,
                ..
            } => {
                // Not a transient refusal: this peer will never average with
                // that one. Say why where an operator looks.
                tracing::warn!(
                    leader = %crate::averager::peer_label(&a.leader),
                    "a leader refused to group with this peer: their tensor layouts or wire \
                     codecs differ (every peer of a run needs the same model and the same \
                     --compression / --grad-compression / --state-compression)"
                );
                out.push(Action::DropLeader { attempt });
                self.give_up_on(a, false);
            }
            LeaderAnswer::Refused { code, .. } => {
                tracing::debug!(?code, "leader refused the join");
                out.push(Action::DropLeader { attempt });
                self.give_up_on(a, false);
            }
            LeaderAnswer::Unreachable { reason } => {
                tracing::debug!(%reason, "leader unreachable");
                out.push(Action::DropLeader { attempt });
                self.give_up_on(a, true);
            }
            LeaderAnswer::Violation { reason } => {
                tracing::debug!(%reason, "leader broke the join protocol");
                out.push(Action::DropLeader { attempt });
                self.give_up_on(a, false);
            }
        }
    }

    fn on_leader_message(
        &mut self,
        attempt: u64,
        message: LeaderMessage,
        now: f64,
        out: &mut Vec<Action>,
    ) {
        let Some(a) = self.current_attempt(attempt) else {
            out.push(Action::DropLeader { attempt });
            return;
        };
        out.push(Action::DropLeader { attempt });
        match message {
            LeaderMessage::Begin(group) => {
                let me = self.looking.as_ref().map(|l| &l.me);
                // The leader may have dropped this peer's data address
                // (unusable from where it stands): the rest must be ours.
                let fits = self
                    .cfg
                    .target_group_size
                    .is_none_or(|t| group.members.len() <= t);
                let led = group.position(&a.leader).is_some();
                let clean = self
                    .looking
                    .as_ref()
                    .is_none_or(|l| !group.members.iter().any(|m| l.banned.contains(&m.peer_id)));
                let ok = fits
                    && clean
                    && led
                    && group.validate().is_ok()
                    && group.position(&self.cfg.peer_id).is_some_and(|i| {
                        let m = &group.members[i];
                        me.is_some_and(|me| {
                            m == me
                                || (m.data_addr.is_none()
                                    && *m
                                        == GroupMember {
                                            data_addr: None,
                                            ..me.clone()
                                        })
                        })
                    });
                if ok {
                    self.finish(Ok((group, Vec::new())), now, out);
                } else {
                    tracing::warn!(
                        leader = %crate::averager::peer_label(&a.leader),
                        members = group.members.len(),
                        fits,
                        led,
                        clean,
                        "averaging: refusing the leader's group (too large, without the leader or this peer's own entry, or a member twice)"
                    );
                    self.give_up_on(a, false);
                }
            }
            LeaderMessage::Disbanded(Some(next)) => {
                tracing::debug!("leader disbanded; following its new leader");
                self.redirect(a, next, out);
            }
            LeaderMessage::Disbanded(None) => self.give_up_on(a, false),
            LeaderMessage::Lost { reason } => {
                tracing::debug!(%reason, "lost the leader");
                self.give_up_on(a, true);
            }
            LeaderMessage::Violation { reason } => {
                tracing::debug!(%reason, "leader broke the join protocol");
                self.give_up_on(a, false);
            }
        }
    }

    fn on_join(
        &mut self,
        join: JoinId,
        peer: Vec<u8>,
        request: JoinRequest,
        member: GroupMember,
        out: &mut Vec<Action>,
    ) {
        let authentic = request.peer_id == peer
            && member.peer_id == peer
            && (member.mode == crate::group::AveragingMode::Client) == request.client_mode;
        let reply = |code, suggested_leader, leader_expiration| Action::Reply {
            join,
            code,
            suggested_leader,
            leader_expiration,
        };
        let Some(l) = self.looking.as_mut() else {
            out.push(reply(JoinCode::NotLookingForGroup, None, None));
            return;
        };
        if !authentic {
            out.push(reply(JoinCode::ProtocolViolation, None, None));
            return;
        }
        if l.banned.contains(&peer) {
            tracing::info!(
                peer = %crate::averager::peer_label(&peer),
                "averaging: refusing a join from a banned peer"
            );
            out.push(reply(JoinCode::Banned, None, None));
            return;
        }
        // A retried join from the same peer replaces its old entry: the old
        // stream is dead (the peer gave up on it).
        if let Some(i) = l.followers.iter().position(|(_, m)| m.peer_id == peer) {
            let (old, _) = l.followers.remove(i);
            out.push(Action::Close { join: old });
        }
        if let Some(i) = l.pending.iter().position(|p| p.peer == peer) {
            let old = l.pending.remove(i);
            out.push(Action::Close { join: old.join });
        }
        let following = l
            .attempt
            .as_ref()
            .filter(|a| a.accepted)
            .map(|a| a.leader.clone());
        let taken: Vec<Vec<u8>> = l
            .followers
            .iter()
            .map(|(_, m)| m.peer_id.clone())
            .chain(l.pending.iter().map(|p| p.peer.clone()))
            .collect();
        let view = LeaderView {
            looking: true,
            client_mode: self.cfg.client_mode,
            schema_hash: &self.cfg.schema_hash,
            group_key: &l.key,
            declared_expiration: Some(l.expiration),
            following: following.as_deref(),
            followers: &taken,
            target_group_size: self.cfg.target_group_size,
        };
        let code = decide_join(&view, &request);
        tracing::debug!(?code, "join request");
        if code == JoinCode::Accepted {
            l.pending.push(Pending {
                join,
                peer,
                member,
                expiration: l.expiration,
            });
            out.push(reply(code, None, Some(l.expiration)));
        } else {
            out.push(reply(code, following, None));
        }
    }

    fn on_reply_sent(&mut self, join: JoinId, ok: bool, out: &mut Vec<Action>) {
        let Some(l) = self.looking.as_mut() else {
            if ok {
                out.push(Action::Disband {
                    joins: vec![join],
                    suggested_leader: None,
                });
            }
            return;
        };
        let Some(i) = l.pending.iter().position(|p| p.join == join) else {
            // From an earlier declaration, or replaced by a newer join of the
            // same peer: the joiner moves on.
            out.push(Action::Disband {
                joins: vec![join],
                suggested_leader: None,
            });
            return;
        };
        let p = l.pending.swap_remove(i);
        if !ok {
            out.push(Action::Close { join });
            return;
        }
        let following = l
            .attempt
            .as_ref()
            .filter(|a| a.accepted)
            .map(|a| a.leader.clone());
        if following.is_none() && p.expiration == l.expiration {
            l.followers.push((join, p.member));
        } else {
            // Started following someone else (or re-declared) meanwhile.
            out.push(Action::Disband {
                joins: vec![join],
                suggested_leader: following,
            });
        }
    }

    /// The leader side and the timers: run after every event.
    fn decide(&mut self, now: f64, rng: &mut impl RngCore, out: &mut Vec<Action>) {
        let cfg = self.cfg.clone();
        let Some(l) = self.looking.as_mut() else {
            return;
        };
        let following = l.attempt.as_ref().is_some_and(|a| a.accepted);
        if following {
            // The leader's answer is bounded by `AwaitLeader`'s wait.
            return;
        }
        let size = l.followers.len() + 1;
        let full = cfg.target_group_size.is_some_and(|t| size >= t);
        let asking = l.attempt.is_some();
        if full {
            return self.assemble(now, rng, out);
        }
        if asking {
            // Bounded by one request timeout; decide when it answers.
            return;
        }
        let expired = now >= l.expiration;
        let in_grace = now < l.expiration + cfg.request_timeout;
        if now >= l.next_search && !l.reading {
            l.reading = true;
            out.push(Action::ReadDeclarations { key: l.key.clone() });
        }
        if expired && in_grace {
            // Joins accepted but not yet confirmed hold the group open.
            if !l.pending.is_empty() {
                return;
            }
            // Peers seen declared below this one that have not joined yet
            // are on their way: wait for them (bounded by the grace).
            let me = (l.expiration, cfg.peer_id.as_slice());
            let waiting_for = l.seen.iter().any(|d| {
                d.peer_id != cfg.peer_id
                    && d.expiration > now
                    && (d.client_mode || (d.expiration, d.peer_id.as_slice()) > me)
                    && !l.followers.iter().any(|(_, m)| m.peer_id == d.peer_id)
            });
            if waiting_for && !l.followers.is_empty() {
                return;
            }
        }
        if expired && !in_grace && !l.pending.is_empty() {
            l.pending.clear();
        }
        if !l.followers.is_empty() {
            match assemble_decision(
                l.followers.len(),
                cfg.target_group_size,
                cfg.min_group_size,
                expired,
            ) {
                Some(true) => return self.assemble(now, rng, out),
                Some(false) => {
                    tracing::debug!(
                        followers = l.followers.len(),
                        "disbanding: too few peers by the deadline"
                    );
                    let joins = l.followers.drain(..).map(|(j, _)| j).collect();
                    out.push(Action::Disband {
                        joins,
                        suggested_leader: None,
                    });
                }
                None => {}
            }
        }
        if now >= l.deadline {
            let waited = std::time::Duration::from_secs_f64((now - l.started).max(0.0));
            return self.finish(Err(Failure::NoGroupFound { waited }), now, out);
        }
        if expired {
            if cfg.min_group_size <= 1 {
                return self.assemble(now, rng, out);
            }
            tracing::debug!("declared expiration passed without a group; re-declaring");
            l.expiration = (now + cfg.min_matchmaking_time).min(l.deadline);
            l.tried.clear();
            l.transient.clear();
            l.pending.clear();
            l.next_search = now;
            self.declared = Some((l.key.clone(), l.expiration));
            out.push(Action::Declare {
                key: l.key.clone(),
                expiration: l.expiration,
            });
            if !l.reading {
                l.reading = true;
                out.push(Action::ReadDeclarations { key: l.key.clone() });
            }
        }
    }

    /// Form the group from this leader and its followers.
    fn assemble(&mut self, now: f64, rng: &mut impl RngCore, out: &mut Vec<Action>) {
        let Some(l) = self.looking.as_mut() else {
            return;
        };
        let size = l.followers.len() + 1;
        if size < self.cfg.min_group_size {
            let joins = l.followers.drain(..).map(|(j, _)| j).collect();
            out.push(Action::Disband {
                joins,
                suggested_leader: None,
            });
            let min = self.cfg.min_group_size;
            return self.finish(Err(Failure::GroupTooSmall { size, min }), now, out);
        }
        if let Some(a) = l.attempt.take() {
            out.push(Action::DropLeader { attempt: a.id });
        }
        let joins: Vec<JoinId> = l.followers.iter().map(|(j, _)| *j).collect();
        let mut members: Vec<GroupMember> = l.followers.iter().map(|(_, m)| m.clone()).collect();
        members.push(l.me.clone());
        members.shuffle(rng);
        let mut group_id = [0u8; 32];
        rng.fill_bytes(&mut group_id);
        let group = AssembledGroup { group_id, members };
        if let Err(e) = group.validate() {
            let joins = l.followers.drain(..).map(|(j, _)| j).collect();
            out.push(Action::Disband {
                joins,
                suggested_leader: None,
            });
            let reason = match e {
                AveragingError::InvalidGroup { reason } => reason,
                other => other.to_string(),
            };
            return self.finish(Err(Failure::InvalidGroup { reason }), now, out);
        }
        tracing::debug!(size = group.members.len(), "assembled a group");
        self.finish(Ok((group, joins)), now, out);
    }
}

/// The join request for `leader` in attempt `attempt`.
fn ask(cfg: &MatchmakerConfig, l: &Looking, attempt: u64, leader: Vec<u8>) -> Action {
    Action::AskLeader {
        attempt,
        leader,
        request: JoinRequest {
            peer_id: cfg.peer_id.clone(),
            schema_hash: cfg.schema_hash.to_vec(),
            expiration: l.expiration,
            group_key: l.key.clone(),
            client_mode: cfg.client_mode,
        },
        member: l.me.clone(),
    }
}

#[cfg(test)]
mod tests;
