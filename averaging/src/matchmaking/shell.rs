//! The async shell around the [`Matchmaker`]: one task per averager that
//! owns the state machine and every matchmaking stream, feeds it events
//! (commands from the averager, answers of the I/O it started, timer ticks)
//! and performs the actions it returns. The machine decides; this file only
//! moves bytes.

use std::{collections::HashMap, time::Duration};

use colony_dht::{Dht, DhtValue, PeerId, Stream, StreamProtocol, dht_time};
use futures::{FutureExt, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use rand::{SeedableRng, rngs::StdRng};
use tokio::sync::{mpsc, oneshot};

use super::{
    events::{Action, Event, JoinId, LeaderAnswer, LeaderMessage},
    machine::Matchmaker,
    rules::{Declared, JoinCode, JoinRequest},
};
use crate::{
    control::{self, ControlMsg},
    error::{AveragingError, PeerFault, Result},
    group::{AssembledGroup, EntryContext, GroupMember},
};

/// What the averager asks of its matchmaker task.
#[derive(Debug)]
pub(crate) enum Command {
    /// Find a group under `key` by `deadline` (DHT time), never with the
    /// `banned` peers.
    Look {
        key: String,
        me: GroupMember,
        deadline: f64,
        banned: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<AssembledGroup>>,
    },
    /// A peer asks to join (its first message, read by the join server).
    Join(Box<InboundJoin>),
    /// Report `(followers, declared expiration, looking)`.
    #[cfg(test)]
    Inspect(oneshot::Sender<(usize, Option<f64>, bool)>),
}

/// A join request read from an inbound stream.
#[derive(Debug)]
pub(crate) struct InboundJoin {
    pub(crate) peer: PeerId,
    pub(crate) stream: Stream,
    pub(crate) request: JoinRequest,
    pub(crate) member: GroupMember,
}

/// What the shell needs to perform actions.
#[derive(Debug, Clone)]
pub(crate) struct ShellIo {
    /// The run prefix and schema hash every entry is signed for.
    pub(crate) prefix: String,
    pub(crate) schema: [u8; 32],
    pub(crate) dht: Dht,
    pub(crate) protocol: StreamProtocol,
    pub(crate) client_mode: bool,
    pub(crate) request_timeout: Duration,
    /// The leader's data-address checks (`None`: the group goes out as
    /// assembled).
    pub(crate) reach: Option<std::sync::Arc<crate::averager::Reachability>>,
}

/// Results of I/O started for the machine.
enum Done {
    Event(Event),
    Answer {
        attempt: u64,
        answer: LeaderAnswer,
        stream: Option<Stream>,
    },
    ReplySent {
        join: JoinId,
        stream: Option<Stream>,
    },
}

/// Runs the matchmaker until every command sender is gone.
pub(crate) async fn run(mut machine: Matchmaker, io: ShellIo, mut rx: mpsc::Receiver<Command>) {
    let mut rng = StdRng::from_entropy();
    let mut ops: FuturesUnordered<BoxFuture<'static, Done>> = FuturesUnordered::new();
    let mut joins: HashMap<JoinId, Stream> = HashMap::new();
    let mut leaders: HashMap<u64, Stream> = HashMap::new();
    let mut reply: Option<oneshot::Sender<Result<AssembledGroup>>> = None;
    let mut next_join: JoinId = 0;
    // The group key of the current search: every entry of a group this
    // peer joins must be signed for it.
    let mut looking_key: Option<String> = None;
    loop {
        let now = dht_time();
        let wake = machine
            .next_wake(now)
            .map(|w| Duration::try_from_secs_f64(w - now).unwrap_or(Duration::ZERO));
        let event = tokio::select! {
            biased;
            () = closed(&mut reply) => {
                reply = None;
                Event::Cancel
            }
            command = rx.recv() => match command {
                None => break,
                Some(Command::Look { key, me, deadline, banned, reply: r }) => {
                    reply = Some(r);
                    looking_key = Some(key.clone());
                    Event::Look { key, me, deadline, banned }
                }
                Some(Command::Join(join)) => {
                    let InboundJoin { peer, mut stream, request, member } = *join;
                    let ctx = EntryContext {
                        prefix: &io.prefix,
                        group_key: &request.group_key,
                        schema_hash: &io.schema,
                    };
                    if let Err(why) = crate::entries::verify_member(&member, &ctx, dht_time()) {
                        tracing::warn!(%peer, reason = why, "averaging: refusing a join whose entry does not verify");
                        let msg = ControlMsg::Reply {
                            code: JoinCode::ProtocolViolation,
                            suggested_leader: None,
                            leader_expiration: None,
                        };
                        let t = io.request_timeout;
                        tokio::spawn(async move {
                            let _ = control::send(&mut stream, &msg, t).await;
                        });
                        continue;
                    }
                    let join = next_join;
                    next_join += 1;
                    joins.insert(join, stream);
                    Event::JoinRequest { join, peer: peer.to_bytes(), request, member }
                }
                #[cfg(test)]
                Some(Command::Inspect(r)) => {
                    let _ = r.send((
                        machine.followers(),
                        machine.declared_expiration(),
                        machine.is_looking(),
                    ));
                    continue;
                }
            },
            Some(done) = ops.next(), if !ops.is_empty() => match done {
                Done::Event(e) => e,
                Done::Answer { attempt, answer, stream } => {
                    if let Some(s) = stream {
                        leaders.insert(attempt, s);
                    }
                    Event::LeaderAnswer { attempt, answer }
                }
                Done::ReplySent { join, stream } => {
                    let ok = stream.is_some();
                    if let Some(s) = stream {
                        joins.insert(join, s);
                    }
                    Event::ReplySent { join, ok }
                }
            },
            () = sleep(wake) => Event::Tick,
        };
        // Followers that gave up must not count toward a group.
        for join in machine.follower_joins() {
            if joins.get_mut(&join).is_none_or(|s| !follower_alive(s)) {
                joins.remove(&join);
                let gone = machine.on(Event::FollowerGone { join }, dht_time(), &mut rng);
                debug_assert!(gone.is_empty());
            }
        }
        for action in machine.on(event, dht_time(), &mut rng) {
            let key = looking_key.as_deref().unwrap_or_default();
            perform(
                action,
                &io,
                key,
                &mut ops,
                &mut joins,
                &mut leaders,
                &mut reply,
            );
        }
    }
}

async fn closed<T>(reply: &mut Option<oneshot::Sender<T>>) {
    match reply {
        Some(r) => r.closed().await,
        None => std::future::pending().await,
    }
}

async fn sleep(wake: Option<Duration>) {
    match wake {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Whether a follower's join stream is still open. Followers send nothing
/// after their join, so anything readable (end of stream, an error, a stray
/// byte) means the follower gave up or broke the protocol.
fn follower_alive(s: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    futures::AsyncReadExt::read(s, &mut byte)
        .now_or_never()
        .is_none()
}

fn perform(
    action: Action,
    io: &ShellIo,
    key: &str,
    ops: &mut FuturesUnordered<BoxFuture<'static, Done>>,
    joins: &mut HashMap<JoinId, Stream>,
    leaders: &mut HashMap<u64, Stream>,
    reply: &mut Option<oneshot::Sender<Result<AssembledGroup>>>,
) {
    let t = io.request_timeout;
    match action {
        Action::Declare { key, expiration } => spawn_store(io, key, expiration, true),
        Action::Withdraw { key, expiration } => spawn_store(io, key, expiration, false),
        Action::ReadDeclarations { key } => {
            let dht = io.dht.clone();
            ops.push(
                async move { Done::Event(Event::Declarations(declared(&dht, &key, t).await)) }
                    .boxed(),
            );
        }
        Action::AskLeader {
            attempt,
            leader,
            request,
            member,
        } => {
            let io = io.clone();
            ops.push(
                async move {
                    let (answer, stream) = ask_leader(&io, leader, request, member).await;
                    Done::Answer {
                        attempt,
                        answer,
                        stream,
                    }
                }
                .boxed(),
            );
        }
        Action::AwaitLeader { attempt, wait } => {
            let Some(mut s) = leaders.remove(&attempt) else {
                let lost = LeaderMessage::Lost {
                    reason: "no stream".into(),
                };
                ops.push(std::future::ready(leader_message(attempt, lost)).boxed());
                return;
            };
            let wait = Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX / 4);
            let (prefix, schema, key) = (io.prefix.clone(), io.schema, key.to_string());
            ops.push(
                async move {
                    let message = match control::recv(&mut s, wait).await {
                        Ok(ControlMsg::Begin { group }) => {
                            let ctx = EntryContext {
                                prefix: &prefix,
                                group_key: &key,
                                schema_hash: &schema,
                            };
                            match crate::entries::verify_group(&group, &ctx, dht_time()) {
                                Ok(()) => LeaderMessage::Begin(group),
                                Err((i, why)) => {
                                    let member = group.members.get(i).map(|m| {
                                        crate::averager::peer_label(&m.peer_id)
                                    });
                                    tracing::warn!(
                                        member = member.as_deref().unwrap_or("?"),
                                        reason = why,
                                        "averaging: the leader's group holds an entry its member did not sign; refusing it"
                                    );
                                    LeaderMessage::Violation {
                                        reason: format!("member {i}: {why}"),
                                    }
                                }
                            }
                        }
                        Ok(ControlMsg::Disbanded { suggested_leader }) => {
                            LeaderMessage::Disbanded(suggested_leader)
                        }
                        Ok(_) => LeaderMessage::Violation {
                            reason: "expected begin or disbanded".into(),
                        },
                        Err(f @ (PeerFault::Stalled { .. } | PeerFault::Disconnected { .. })) => {
                            LeaderMessage::Lost {
                                reason: f.to_string(),
                            }
                        }
                        Err(f) => LeaderMessage::Violation {
                            reason: f.to_string(),
                        },
                    };
                    leader_message(attempt, message)
                }
                .boxed(),
            );
        }
        Action::DropLeader { attempt } => {
            leaders.remove(&attempt);
        }
        Action::Reply {
            join,
            code,
            suggested_leader,
            leader_expiration,
        } => {
            let Some(mut s) = joins.remove(&join) else {
                return;
            };
            let msg = ControlMsg::Reply {
                code,
                suggested_leader,
                leader_expiration,
            };
            if code == JoinCode::Accepted {
                ops.push(
                    async move {
                        let sent = control::send(&mut s, &msg, t).await;
                        Done::ReplySent {
                            join,
                            stream: sent.is_ok().then_some(s),
                        }
                    }
                    .boxed(),
                );
            } else {
                tokio::spawn(async move {
                    let _ = control::send(&mut s, &msg, t).await;
                });
            }
        }
        Action::Disband {
            joins: which,
            suggested_leader,
        } => {
            for join in which {
                let Some(mut s) = joins.remove(&join) else {
                    continue;
                };
                let msg = ControlMsg::Disbanded {
                    suggested_leader: suggested_leader.clone(),
                };
                tokio::spawn(async move {
                    let _ = control::send(&mut s, &msg, t).await;
                });
            }
        }
        Action::Close { join } => {
            joins.remove(&join);
        }
        Action::Begin {
            group,
            joins: which,
        } => {
            let streams: Vec<Stream> = which.iter().filter_map(|j| joins.remove(j)).collect();
            let reply = reply.take();
            let reach = io.reach.clone();
            // Only a leader (it has followers' streams) vets addresses: a
            // follower takes the group exactly as its leader sent it, since
            // every member must hold the same view (the round's keys are
            // salted with its digest).
            let leads = !streams.is_empty();
            tokio::spawn(async move {
                // Probes began as joins arrived; the wait here is what is
                // left of them, at most half a request timeout.
                let group = match reach {
                    Some(r) if leads => r.vet(group, t / 2).await,
                    _ => group,
                };
                let msg = ControlMsg::Begin {
                    group: group.clone(),
                };
                let sends = streams.into_iter().map(|mut s| {
                    let msg = msg.clone();
                    async move {
                        if let Err(f) = control::send(&mut s, &msg, t).await {
                            tracing::warn!(fault = %f, "could not send the group to a follower");
                        }
                    }
                });
                futures::future::join_all(sends).await;
                if let Some(r) = reply {
                    let _ = r.send(Ok(group));
                }
            });
        }
        Action::Fail(e) => {
            if let Some(r) = reply.take() {
                let _ = r.send(Err(e.into()));
            }
        }
    }
}

fn leader_message(attempt: u64, message: LeaderMessage) -> Done {
    Done::Event(Event::LeaderMessage { attempt, message })
}

/// Ask `leader` to take this peer: one request timeout for the whole request
/// (stream, join, reply), so a leader that is itself asking someone waits
/// this much at most before it acts on its own deadline.
async fn ask_leader(
    io: &ShellIo,
    leader: Vec<u8>,
    request: JoinRequest,
    member: GroupMember,
) -> (LeaderAnswer, Option<Stream>) {
    let t = io.request_timeout;
    let Ok(peer) = PeerId::from_bytes(&leader) else {
        let answer = LeaderAnswer::Violation {
            reason: "bad leader id".into(),
        };
        return (answer, None);
    };
    let join = ControlMsg::Join { request, member };
    let attempt = async {
        let mut s = io
            .dht
            .open_stream(peer, io.protocol.clone())
            .await
            .map_err(|e| PeerFault::Disconnected {
                reason: e.to_string(),
            })?;
        control::send(&mut s, &join, t).await?;
        let reply = control::recv(&mut s, t).await?;
        Ok::<_, PeerFault>((s, reply))
    };
    let fault = |f: PeerFault| match f {
        PeerFault::Stalled { .. } | PeerFault::Disconnected { .. } => LeaderAnswer::Unreachable {
            reason: f.to_string(),
        },
        f => LeaderAnswer::Violation {
            reason: f.to_string(),
        },
    };
    match tokio::time::timeout(t, attempt).await {
        Err(_) => (fault(PeerFault::Stalled { timeout: t }), None),
        Ok(Err(f)) => (fault(f), None),
        Ok(Ok((
            s,
            ControlMsg::Reply {
                code: JoinCode::Accepted,
                leader_expiration,
                ..
            },
        ))) => (LeaderAnswer::Accepted { leader_expiration }, Some(s)),
        Ok(Ok((
            _,
            ControlMsg::Reply {
                code,
                suggested_leader,
                ..
            },
        ))) => (
            LeaderAnswer::Refused {
                code,
                suggested_leader,
            },
            None,
        ),
        Ok(Ok(_)) => (
            LeaderAnswer::Violation {
                reason: "expected a reply".into(),
            },
            None,
        ),
    }
}

/// Store (`active`) or withdraw this peer's declaration under `key`, in the
/// background. The store puts the record in local storage at once (peers that
/// query this node see it immediately); waiting for the replicas must not hold
/// up matchmaking, and a failed store is not fatal: the record is readable
/// here, and the next period re-declares.
fn spawn_store(io: &ShellIo, key: String, expiration: f64, active: bool) {
    let value = if active {
        let peer_id = io.dht.peer_id().to_bytes();
        match rmp_serde::to_vec(&(serde_bytes::Bytes::new(&peer_id), io.client_mode)) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode the matchmaking declaration");
                return;
            }
        }
    } else {
        vec![0xc0]
    };
    let dht = io.dht.clone();
    tokio::spawn(async move {
        let subkey = dht.owner_subkey();
        if let Err(e) = dht
            .store(key.as_bytes(), Some(&subkey), value, expiration)
            .await
        {
            tracing::debug!(error = %e, active, "matchmaking declaration store failed");
        }
    });
}

/// The averagers declared under `key` (unreadable entries skipped), as far
/// as the replicas that answered within `budget` know them: a replica that
/// vanished mid-run must not hold matchmaking for the DHT's query timeout.
async fn declared(dht: &Dht, key: &str, budget: Duration) -> Vec<Declared> {
    let Ok(Some(DhtValue::Dictionary(d))) = dht.get_within(key.as_bytes(), true, budget).await
    else {
        return Vec::new();
    };
    d.values()
        .filter_map(|v| {
            let (peer, client_mode) =
                rmp_serde::from_slice::<(serde_bytes::ByteBuf, bool)>(&v.value).ok()?;
            Some(Declared {
                peer_id: peer.into_vec(),
                expiration: v.expiration,
                client_mode,
            })
        })
        .collect()
}

/// Ask the matchmaker task for a group.
///
/// # Errors
/// The matchmaker's error, or [`AveragingError::Internal`] if its task is
/// gone.
///
/// # Cancel safety
/// Dropping the future cancels the search: the task sees the reply channel
/// close and leaves matchmaking.
pub(crate) async fn look(
    tx: &mpsc::Sender<Command>,
    key: String,
    me: GroupMember,
    deadline: f64,
    banned: Vec<Vec<u8>>,
) -> Result<AssembledGroup> {
    let gone = || AveragingError::Internal {
        what: "the matchmaker task stopped",
    };
    let (reply, answer) = oneshot::channel();
    tx.send(Command::Look {
        key,
        me,
        deadline,
        banned,
        reply,
    })
    .await
    .map_err(|_| gone())?;
    answer.await.map_err(|_| gone())?
}
