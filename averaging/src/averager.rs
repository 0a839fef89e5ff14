//! `DecentralizedAverager`: matchmaking through the DHT, then a butterfly
//! all-reduce over the data plane, and state sharing for late joiners.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use colony_dht::{Dht, DhtValue, PeerId, Stream, StreamProtocol, dht_time};
use rand::{RngCore, seq::SliceRandom};
use tokio::sync::{Mutex, MutexGuard, Notify};
use tokio_util::compat::FuturesAsyncReadCompatExt;

use crate::{
    allreduce::{RoundOutcome, run_allreduce},
    control::{self, ControlMsg},
    crypto::RoundKeyPair,
    dataplane::DataPlane,
    error::{AveragingError, PeerFault, Result},
    group::{AllreduceConfig, AssembledGroup, AveragingMode, GroupMember},
    group_keys::{group_key, is_group_bits, next_group_bits},
    matchmaking::{
        Declared, JoinCode, JoinRequest, LeaderView, assemble_decision, decide_join,
        leader_candidates,
    },
    partition::TensorLayout,
    state::{SharedState, download_from_donors, serve_state},
};

/// Configuration of a [`DecentralizedAverager`] (reference defaults noted).
#[derive(Debug, Clone)]
pub struct AveragerConfig {
    /// Key prefix and protocol namespace; no `.` allowed. Required.
    pub prefix: String,
    /// Largest group (`None` = unbounded). Default `None`.
    pub target_group_size: Option<usize>,
    /// Smallest group that runs when time is up. Default 2.
    pub min_group_size: usize,
    /// Moshpit group bits. Default `""` (one bucket).
    pub initial_group_bits: String,
    /// How long a peer waits for others before its declared expiration. Default 5 s.
    pub min_matchmaking_time: Duration,
    /// Leader response timeout. Default 3 s.
    pub request_timeout: Duration,
    /// All-reduce knobs (part size, compression, per-part and round timeouts).
    pub allreduce: AllreduceConfig,
    /// Load-balancing bandwidth hint. Default `None`.
    pub bandwidth: Option<f64>,
    /// Node, client or auxiliary. Default node.
    pub mode: AveragingMode,
    /// Whether others may download this peer's state. Default: node mode only.
    pub allow_state_sharing: Option<bool>,
    /// Data-plane listen address. Default `127.0.0.1:0`.
    pub data_listen_addr: SocketAddr,
}

impl AveragerConfig {
    /// A config with reference defaults under `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            target_group_size: None,
            min_group_size: 2,
            initial_group_bits: String::new(),
            min_matchmaking_time: Duration::from_secs(5),
            request_timeout: Duration::from_secs(3),
            allreduce: AllreduceConfig::default(),
            bandwidth: None,
            mode: AveragingMode::Node,
            allow_state_sharing: None,
            data_listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }

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
        if self.prefix.is_empty() || self.prefix.contains('.') {
            return bad("prefix", "must be non-empty and contain no '.'");
        }
        if !is_group_bits(&self.initial_group_bits) {
            return bad("initial_group_bits", "must be a string of 0 and 1");
        }
        if self.min_group_size < 1 {
            return bad("min_group_size", "must be at least 1");
        }
        if self
            .target_group_size
            .is_some_and(|t| t < self.min_group_size)
        {
            return bad("target_group_size", "must be at least min_group_size");
        }
        if self.request_timeout.is_zero() || self.min_matchmaking_time.is_zero() {
            return bad("request_timeout", "timeouts must be positive");
        }
        self.allreduce.validate()
    }
}

/// What a successful [`DecentralizedAverager::step`] reports.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    /// The group that averaged.
    pub group: AssembledGroup,
    /// Per-round details (spans, failed reducers, banned senders).
    pub round: RoundOutcome,
    /// Group bits for the next round.
    pub next_group_bits: String,
}

#[derive(Debug)]
struct MatchState {
    looking: bool,
    group_key: String,
    declared_expiration: Option<f64>,
    following: Option<Vec<u8>>,
    followers: Vec<(GroupMember, Stream)>,
}

struct Inner {
    dht: Dht,
    cfg: AveragerConfig,
    layout: TensorLayout,
    tensors: Mutex<Vec<Vec<f32>>>,
    plane: DataPlane,
    peer_id: Vec<u8>,
    schema: [u8; 32],
    group_bits: StdMutex<String>,
    matching: StdMutex<MatchState>,
    changed: Notify,
    state_metadata: StdMutex<Vec<u8>>,
    step_lock: Mutex<()>,
}

/// Averages a set of flat `f32` buffers with peers found through the DHT.
///
/// Cloning is cheap; every clone drives the same averager. Background tasks
/// (join and state acceptors) stop when [`shutdown`](Self::shutdown) is called
/// or the DHT shuts down.
#[derive(Clone)]
pub struct DecentralizedAverager {
    inner: Arc<Inner>,
    tasks: Arc<StdMutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl std::fmt::Debug for DecentralizedAverager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecentralizedAverager")
            .field("prefix", &self.inner.cfg.prefix)
            .field("mode", &self.inner.cfg.mode)
            .finish_non_exhaustive()
    }
}

fn join_protocol(prefix: &str) -> Result<StreamProtocol> {
    StreamProtocol::try_from_owned(format!("/colony/averaging/{prefix}/join/1")).map_err(|_| {
        AveragingError::InvalidConfig {
            field: "prefix",
            reason: "not usable in a protocol name".into(),
        }
    })
}

fn state_protocol(prefix: &str) -> Result<StreamProtocol> {
    StreamProtocol::try_from_owned(format!("/colony/averaging/{prefix}/state/1")).map_err(|_| {
        AveragingError::InvalidConfig {
            field: "prefix",
            reason: "not usable in a protocol name".into(),
        }
    })
}

fn dht_err(context: &'static str) -> impl Fn(colony_dht::DhtError) -> AveragingError {
    move |e| AveragingError::Io {
        context,
        source: std::io::Error::other(e.to_string()),
    }
}

impl DecentralizedAverager {
    /// Start an averager over `tensors` on `dht`.
    ///
    /// # Errors
    /// [`AveragingError::InvalidConfig`], or [`AveragingError::Io`] if the data
    /// plane cannot listen or the protocols are already registered.
    pub async fn new(dht: Dht, tensors: Vec<Vec<f32>>, cfg: AveragerConfig) -> Result<Self> {
        cfg.validate()?;
        if cfg.mode == AveragingMode::Aux && dht.is_client() {
            return Err(AveragingError::InvalidConfig {
                field: "mode",
                reason: "auxiliary peers must not be DHT clients".into(),
            });
        }
        let layout = TensorLayout::new(&tensors.iter().map(Vec::len).collect::<Vec<_>>());
        let plane = if cfg.mode == AveragingMode::Client {
            DataPlane::client()
        } else {
            DataPlane::bind(cfg.data_listen_addr, cfg.request_timeout).await?
        };
        let bits = cfg.initial_group_bits.clone();
        let inner = Arc::new(Inner {
            peer_id: dht.peer_id().to_bytes(),
            schema: crate::group::schema_hash(&layout),
            layout,
            tensors: Mutex::new(tensors),
            plane,
            group_bits: StdMutex::new(bits.clone()),
            matching: StdMutex::new(MatchState {
                looking: false,
                group_key: group_key(&cfg.prefix, &bits),
                declared_expiration: None,
                following: None,
                followers: Vec::new(),
            }),
            changed: Notify::new(),
            state_metadata: StdMutex::new(Vec::new()),
            step_lock: Mutex::new(()),
            cfg,
            dht,
        });
        let mut tasks = Vec::new();
        if inner.cfg.mode != AveragingMode::Client && !inner.dht.is_client() {
            let joins = inner
                .dht
                .accept_streams(join_protocol(&inner.cfg.prefix)?, 64)
                .map_err(dht_err("registering the join protocol"))?;
            tasks.push(tokio::spawn(accept_joins(Arc::downgrade(&inner), joins)));
            let sharing = inner
                .cfg
                .allow_state_sharing
                .unwrap_or(inner.cfg.mode == AveragingMode::Node);
            if sharing {
                let states = inner
                    .dht
                    .accept_streams(state_protocol(&inner.cfg.prefix)?, 8)
                    .map_err(dht_err("registering the state protocol"))?;
                tasks.push(tokio::spawn(accept_state_requests(
                    Arc::downgrade(&inner),
                    states,
                )));
            }
        }
        Ok(Self {
            inner,
            tasks: Arc::new(StdMutex::new(tasks)),
        })
    }

    /// This peer's id bytes.
    pub fn peer_id(&self) -> &[u8] {
        &self.inner.peer_id
    }

    /// The tensor layout.
    pub fn layout(&self) -> &TensorLayout {
        &self.inner.layout
    }

    /// Current group bits.
    pub fn group_bits(&self) -> String {
        self.inner
            .group_bits
            .lock()
            .map(|b| b.clone())
            .unwrap_or_default()
    }

    /// Lock the averaged tensors for reading or writing. A round holds this lock
    /// while it runs, so the tensors are never seen half-averaged.
    pub async fn tensors(&self) -> MutexGuard<'_, Vec<Vec<f32>>> {
        self.inner.tensors.lock().await
    }

    /// Stop background tasks.
    pub fn shutdown(&self) {
        if let Ok(mut t) = self.tasks.lock() {
            for h in t.drain(..) {
                h.abort();
            }
        }
    }

    /// Find a group and average with it, weighting this peer's tensors by
    /// `weight` (default 1, or 0 for auxiliary peers). Results are applied in
    /// place only if the round succeeds.
    ///
    /// # Errors
    /// [`AveragingError::NoGroupFound`] when no group forms within `timeout`;
    /// the round's errors otherwise (tensors unchanged).
    ///
    /// # Cancel safety
    /// Cancelling leaves the tensors unchanged; a withdrawn declaration may
    /// linger in the DHT until it expires.
    pub async fn step(&self, weight: Option<f32>, timeout: Duration) -> Result<StepOutcome> {
        let inner = &self.inner;
        let _one_step = inner.step_lock.lock().await;
        let weight = match inner.cfg.mode {
            AveragingMode::Aux => 0.0,
            _ => weight.unwrap_or(1.0),
        };
        let started = tokio::time::Instant::now();
        let deadline = started + timeout;
        let keys = RoundKeyPair::generate()?;
        let group = matchmake(inner, &keys, deadline).await;
        set_idle(inner);
        let group = group?;
        let me = group
            .position(&inner.peer_id)
            .ok_or(AveragingError::InvalidGroup {
                reason: "this peer is not in the group it joined".into(),
            })?;
        let mut tensors = inner.tensors.lock().await;
        let round = run_allreduce(
            &inner.plane,
            &group,
            me,
            &keys,
            &inner.layout,
            &tensors,
            weight,
            &inner.cfg.allreduce,
        )
        .await?;
        if inner.cfg.mode != AveragingMode::Aux {
            round.apply(
                &inner.layout,
                &mut tensors,
                inner.cfg.allreduce.averaging_alpha,
            )?;
        }
        drop(tensors);
        let next = {
            let mut bits = inner
                .group_bits
                .lock()
                .map_err(|_| AveragingError::InvalidGroup {
                    reason: "group bits lock poisoned".into(),
                })?;
            *bits = next_group_bits(
                &bits,
                &group.group_id,
                group.members.len(),
                me,
                inner.cfg.target_group_size,
            );
            bits.clone()
        };
        Ok(StepOutcome {
            group,
            round,
            next_group_bits: next,
        })
    }

    /// Advertise this peer as a state donor under `{prefix}.all_averagers` with
    /// `priority` (higher is preferred, e.g. the step) and `metadata` served
    /// with the tensors, until `expiration` (DHT time).
    ///
    /// # Errors
    /// DHT failures as [`AveragingError::Io`].
    pub async fn declare_state(
        &self,
        priority: f64,
        metadata: Vec<u8>,
        expiration: f64,
    ) -> Result<()> {
        if let Ok(mut m) = self.inner.state_metadata.lock() {
            *m = metadata;
        }
        let key = format!("{}.all_averagers", self.inner.cfg.prefix);
        let value = rmp_serde::to_vec(&(serde_bytes::Bytes::new(&self.inner.peer_id), priority))
            .map_err(|_| AveragingError::Decode {
                reason: "cannot encode donor record",
            })?;
        self.inner
            .dht
            .store(
                key.as_bytes(),
                Some(&self.inner.dht.owner_subkey()),
                value,
                expiration,
            )
            .await
            .map_err(dht_err("declaring state"))?;
        Ok(())
    }

    /// Download state from the best donor (highest priority first, falling back
    /// to the next on any failure), verify it (layout, finiteness, SHA-256) and
    /// install the tensors. Returns the donor's metadata.
    ///
    /// # Errors
    /// [`AveragingError::NoStateDonor`] when no donor delivered valid state.
    pub async fn load_state_from_peers(&self, timeout: Duration) -> Result<Vec<u8>> {
        let inner = &self.inner;
        let key = format!("{}.all_averagers", inner.cfg.prefix);
        let found = tokio::time::timeout(timeout, inner.dht.get(key.as_bytes(), true))
            .await
            .map_err(|_| AveragingError::NoStateDonor { tried: 0 })?
            .map_err(dht_err("finding state donors"))?;
        let mut donors: Vec<(PeerId, f64)> = Vec::new();
        if let Some(DhtValue::Dictionary(d)) = found {
            for v in d.values() {
                let Ok((peer, priority)) =
                    rmp_serde::from_slice::<(serde_bytes::ByteBuf, f64)>(&v.value)
                else {
                    continue;
                };
                let Ok(peer) = PeerId::from_bytes(&peer) else {
                    continue;
                };
                if peer.to_bytes() != inner.peer_id && priority.is_finite() {
                    donors.push((peer, priority));
                }
            }
        }
        donors.shuffle(&mut rand::thread_rng());
        donors.sort_by(|a, b| b.1.total_cmp(&a.1));
        let protocol = state_protocol(&inner.cfg.prefix)?;
        let chunk_timeout = inner.cfg.allreduce.sender_timeout;
        let lengths = inner.layout.lengths().to_vec();
        let dht = inner.dht.clone();
        let donors_ref = &donors;
        let (_, state) = tokio::time::timeout(
            timeout,
            download_from_donors(
                donors.len(),
                |i| {
                    let dht = dht.clone();
                    let protocol = protocol.clone();
                    async move {
                        let s = dht
                            .open_stream(donors_ref[i].0, protocol)
                            .await
                            .map_err(dht_err("opening a state stream"))?;
                        Ok(s.compat())
                    }
                },
                Some(&lengths),
                chunk_timeout,
            ),
        )
        .await
        .map_err(|_| AveragingError::NoStateDonor {
            tried: donors.len(),
        })??;
        *inner.tensors.lock().await = state.tensors;
        Ok(state.metadata)
    }
}

fn set_idle(inner: &Inner) {
    let followers = match inner.matching.lock() {
        Ok(mut m) => {
            m.looking = false;
            m.declared_expiration = None;
            m.following = None;
            std::mem::take(&mut m.followers)
        }
        Err(_) => Vec::new(),
    };
    // Followers left over (the round started without them) are told to move on.
    for (_, mut s) in followers {
        let t = inner.cfg.request_timeout;
        tokio::spawn(async move {
            let _ = control::send(
                &mut s,
                &ControlMsg::Disbanded {
                    suggested_leader: None,
                },
                t,
            )
            .await;
        });
    }
}

fn my_member(inner: &Inner, keys: &RoundKeyPair) -> GroupMember {
    GroupMember {
        peer_id: inner.peer_id.clone(),
        data_addr: inner.plane.local_addr(),
        mode: inner.cfg.mode,
        bandwidth: match inner.cfg.mode {
            AveragingMode::Client => Some(0.0),
            _ => inner.cfg.bandwidth,
        },
        round_public_key: keys.public(),
    }
}

async fn declare(inner: &Inner, key: &str, expiration: f64, active: bool) -> Result<()> {
    let value = if active {
        let client = inner.cfg.mode == AveragingMode::Client;
        rmp_serde::to_vec(&(serde_bytes::Bytes::new(&inner.peer_id), client)).map_err(|_| {
            AveragingError::Decode {
                reason: "cannot encode declaration",
            }
        })?
    } else {
        vec![0xc0]
    };
    inner
        .dht
        .store(
            key.as_bytes(),
            Some(&inner.dht.owner_subkey()),
            value,
            expiration,
        )
        .await
        .map_err(dht_err("declaring for matchmaking"))?;
    Ok(())
}

async fn declared_averagers(inner: &Inner, key: &str) -> Vec<Declared> {
    let Ok(Some(DhtValue::Dictionary(d))) = inner.dht.get(key.as_bytes(), true).await else {
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

/// Matchmaking: declare, then either gather followers or join a leader.
async fn matchmake(
    inner: &Inner,
    keys: &RoundKeyPair,
    deadline: tokio::time::Instant,
) -> Result<AssembledGroup> {
    let cfg = &inner.cfg;
    let started = tokio::time::Instant::now();
    let me = my_member(inner, keys);
    let key = group_key(
        &cfg.prefix,
        &inner
            .group_bits
            .lock()
            .map(|b| b.clone())
            .unwrap_or_default(),
    );
    let to_dht = |at: tokio::time::Instant| {
        dht_time()
            + at.saturating_duration_since(tokio::time::Instant::now())
                .as_secs_f64()
    };
    let mut tried: Vec<(Vec<u8>, f64)> = Vec::new();
    let mut expiration_at = (tokio::time::Instant::now() + cfg.min_matchmaking_time).min(deadline);
    let mut expiration = to_dht(expiration_at);
    if let Ok(mut m) = inner.matching.lock() {
        m.looking = true;
        m.group_key = key.clone();
        m.following = None;
        m.followers.clear();
    }
    declare(inner, &key, expiration, true).await?;
    if let Ok(mut m) = inner.matching.lock() {
        m.declared_expiration = Some(expiration);
    }
    inner.changed.notify_waiters();
    let result = loop {
        let now = tokio::time::Instant::now();
        // Leader side: assemble or disband.
        let decision = {
            let m = inner
                .matching
                .lock()
                .map_err(|_| AveragingError::InvalidGroup {
                    reason: "matchmaking lock poisoned".into(),
                })?;
            if m.followers.is_empty() {
                None
            } else {
                assemble_decision(
                    m.followers.len(),
                    cfg.target_group_size,
                    cfg.min_group_size,
                    now >= expiration_at,
                )
            }
        };
        match decision {
            Some(true) => break assemble(inner, &me).await,
            Some(false) => {
                let followers = inner
                    .matching
                    .lock()
                    .map(|mut m| std::mem::take(&mut m.followers))
                    .unwrap_or_default();
                for (_, mut s) in followers {
                    let _ = control::send(
                        &mut s,
                        &ControlMsg::Disbanded {
                            suggested_leader: None,
                        },
                        cfg.request_timeout,
                    )
                    .await;
                }
            }
            None => {}
        }
        if now >= deadline {
            break Err(AveragingError::NoGroupFound {
                waited: now - started,
            });
        }
        if now >= expiration_at {
            if cfg.min_group_size <= 1 {
                break assemble(inner, &me).await;
            }
            // Re-declare for another period, as the reference does.
            expiration_at = (now + cfg.min_matchmaking_time).min(deadline);
            expiration = to_dht(expiration_at);
            tried.clear();
            declare(inner, &key, expiration, true).await?;
            if let Ok(mut m) = inner.matching.lock() {
                m.declared_expiration = Some(expiration);
            }
            continue;
        }
        let has_followers = inner
            .matching
            .lock()
            .map(|m| !m.followers.is_empty())
            .unwrap_or(false);
        if !has_followers {
            let mine = Declared {
                peer_id: inner.peer_id.clone(),
                expiration,
                client_mode: cfg.mode == AveragingMode::Client,
            };
            let all = declared_averagers(inner, &key).await;
            if let Some(leader) = leader_candidates(&mine, &all, &tried).into_iter().next() {
                tried.push((leader.peer_id.clone(), leader.expiration));
                let wait_until = expiration.max(leader.expiration);
                match follow(inner, &me, &key, expiration, wait_until, &leader.peer_id, 2).await {
                    Ok(group) => break Ok(group),
                    Err(e) => {
                        tracing::debug!(error = %e, "join attempt failed");
                        continue;
                    }
                }
            }
        }
        // Wait for a follower, the expiration, or a short poll of the DHT.
        let poll = (cfg.request_timeout / 6).min(Duration::from_millis(300));
        let wake = (tokio::time::Instant::now() + poll)
            .min(expiration_at)
            .min(deadline);
        let _ = tokio::time::timeout_at(wake, inner.changed.notified()).await;
    };
    // Withdraw the declaration (nil with a later expiration wins). Once it has
    // expired there is nothing to withdraw, and storers would refuse a record
    // that expires in the past.
    if expiration > dht_time() {
        let _ = declare(inner, &key, expiration + 1e-3, false).await;
    }
    result
}

/// Ask `leader` to take this peer, then wait for the group.
async fn follow(
    inner: &Inner,
    me: &GroupMember,
    key: &str,
    expiration: f64,
    wait_until: f64,
    leader: &[u8],
    redirects_left: usize,
) -> Result<AssembledGroup> {
    let cfg = &inner.cfg;
    let peer = PeerId::from_bytes(leader).map_err(|_| AveragingError::InvalidGroup {
        reason: "bad leader id".into(),
    })?;
    let fault = |fault| AveragingError::Peer { peer: 0, fault };
    let mut s = tokio::time::timeout(
        cfg.request_timeout,
        inner.dht.open_stream(peer, join_protocol(&cfg.prefix)?),
    )
    .await
    .map_err(|_| {
        fault(PeerFault::Stalled {
            timeout: cfg.request_timeout,
        })
    })?
    .map_err(dht_err("opening a join stream"))?;
    let request = JoinRequest {
        peer_id: inner.peer_id.clone(),
        schema_hash: inner.schema.to_vec(),
        expiration,
        group_key: key.to_string(),
        client_mode: cfg.mode == AveragingMode::Client,
    };
    control::send(
        &mut s,
        &ControlMsg::Join {
            request,
            member: me.clone(),
        },
        cfg.request_timeout,
    )
    .await
    .map_err(fault)?;
    match control::recv(&mut s, cfg.request_timeout)
        .await
        .map_err(fault)?
    {
        ControlMsg::Reply {
            code: JoinCode::Accepted,
            ..
        } => {}
        ControlMsg::Reply {
            code: JoinCode::NotALeader,
            suggested_leader: Some(next),
        } if redirects_left > 0 => {
            return Box::pin(follow(
                inner,
                me,
                key,
                expiration,
                wait_until,
                &next,
                redirects_left - 1,
            ))
            .await;
        }
        ControlMsg::Reply { code, .. } => {
            return Err(AveragingError::InvalidGroup {
                reason: format!("leader rejected the join: {code:?}"),
            });
        }
        _ => {
            return Err(fault(PeerFault::ProtocolViolation {
                reason: "expected a reply",
            }));
        }
    }
    // Accepted: stop leading; hand any followers over to the new leader.
    let orphans = match inner.matching.lock() {
        Ok(mut m) => {
            m.following = Some(leader.to_vec());
            std::mem::take(&mut m.followers)
        }
        Err(_) => Vec::new(),
    };
    for (_, mut o) in orphans {
        let _ = control::send(
            &mut o,
            &ControlMsg::Disbanded {
                suggested_leader: Some(leader.to_vec()),
            },
            cfg.request_timeout,
        )
        .await;
    }
    let wait = Duration::from_secs_f64((wait_until - dht_time()).max(0.0)) + cfg.request_timeout;
    let msg = control::recv(&mut s, wait).await;
    if let Ok(mut m) = inner.matching.lock() {
        m.following = None;
    }
    match msg.map_err(fault)? {
        ControlMsg::Begin { group } => {
            group.validate()?;
            match group.position(&inner.peer_id) {
                Some(i) if group.members[i] == *me => Ok(group),
                _ => Err(AveragingError::InvalidGroup {
                    reason: "leader's group does not hold this peer's entry".into(),
                }),
            }
        }
        ControlMsg::Disbanded {
            suggested_leader: Some(next),
        } if redirects_left > 0 => {
            Box::pin(follow(
                inner,
                me,
                key,
                expiration,
                wait_until,
                &next,
                redirects_left - 1,
            ))
            .await
        }
        _ => Err(AveragingError::InvalidGroup {
            reason: "group disbanded".into(),
        }),
    }
}

/// Form the group from this leader and its followers and tell them.
async fn assemble(inner: &Inner, me: &GroupMember) -> Result<AssembledGroup> {
    let followers = inner
        .matching
        .lock()
        .map(|mut m| {
            m.looking = false;
            std::mem::take(&mut m.followers)
        })
        .unwrap_or_default();
    if followers.len() + 1 < inner.cfg.min_group_size {
        return Err(AveragingError::GroupTooSmall {
            size: followers.len() + 1,
            min: inner.cfg.min_group_size,
        });
    }
    let mut members: Vec<GroupMember> = followers.iter().map(|(m, _)| m.clone()).collect();
    members.push(me.clone());
    members.shuffle(&mut rand::thread_rng());
    let mut group_id = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut group_id);
    let group = AssembledGroup { group_id, members };
    group.validate()?;
    let msg = ControlMsg::Begin {
        group: group.clone(),
    };
    let t = inner.cfg.request_timeout;
    let sends = followers.into_iter().map(|(_, mut s)| {
        let msg = msg.clone();
        async move {
            if let Err(f) = control::send(&mut s, &msg, t).await {
                tracing::warn!(fault = %f, "could not send the group to a follower");
            }
        }
    });
    futures::future::join_all(sends).await;
    Ok(group)
}

async fn accept_joins(
    inner: std::sync::Weak<Inner>,
    mut rx: tokio::sync::mpsc::Receiver<(PeerId, Stream)>,
) {
    while let Some((peer, stream)) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        tokio::spawn(async move {
            if let Err(f) = handle_join(&inner, peer, stream).await {
                tracing::debug!(%peer, fault = %f, "join request failed");
            }
        });
    }
}

async fn handle_join(
    inner: &Inner,
    peer: PeerId,
    mut s: Stream,
) -> std::result::Result<(), PeerFault> {
    let t = inner.cfg.request_timeout;
    let ControlMsg::Join { request, member } = control::recv(&mut s, t).await? else {
        return Err(PeerFault::ProtocolViolation {
            reason: "expected a join",
        });
    };
    let (code, suggested) = {
        let m = inner
            .matching
            .lock()
            .map_err(|_| PeerFault::ProtocolViolation { reason: "poisoned" })?;
        let follower_ids: Vec<Vec<u8>> =
            m.followers.iter().map(|(f, _)| f.peer_id.clone()).collect();
        let view = LeaderView {
            looking: m.looking,
            client_mode: inner.cfg.mode == AveragingMode::Client,
            schema_hash: &inner.schema,
            group_key: &m.group_key,
            declared_expiration: m.declared_expiration,
            following: m.following.as_deref(),
            followers: &follower_ids,
            target_group_size: inner.cfg.target_group_size,
        };
        let authentic = request.peer_id == peer.to_bytes() && member.peer_id == request.peer_id;
        let mut code = if authentic {
            decide_join(&view, &request)
        } else {
            JoinCode::ProtocolViolation
        };
        if code == JoinCode::Accepted
            && (member.mode == AveragingMode::Client) != request.client_mode
        {
            code = JoinCode::ProtocolViolation;
        }
        (code, m.following.clone())
    };
    if code == JoinCode::Accepted {
        control::send(
            &mut s,
            &ControlMsg::Reply {
                code,
                suggested_leader: None,
            },
            t,
        )
        .await?;
        // Re-check: the state may have changed while replying.
        let rejected = match inner.matching.lock() {
            Ok(mut m) if m.looking && m.following.is_none() => {
                m.followers.push((member, s));
                None
            }
            _ => Some(s),
        };
        match rejected {
            None => inner.changed.notify_waiters(),
            Some(mut s) => {
                let _ = control::send(
                    &mut s,
                    &ControlMsg::Disbanded {
                        suggested_leader: None,
                    },
                    t,
                )
                .await;
            }
        }
        return Ok(());
    }
    control::send(
        &mut s,
        &ControlMsg::Reply {
            code,
            suggested_leader: suggested,
        },
        t,
    )
    .await
}

async fn accept_state_requests(
    inner: std::sync::Weak<Inner>,
    mut rx: tokio::sync::mpsc::Receiver<(PeerId, Stream)>,
) {
    while let Some((peer, stream)) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        tokio::spawn(async move {
            let state = SharedState {
                metadata: inner
                    .state_metadata
                    .lock()
                    .map(|m| m.clone())
                    .unwrap_or_default(),
                tensors: inner.tensors.lock().await.clone(),
            };
            let mut s = stream.compat();
            if let Err(e) = serve_state(&mut s, &state, inner.cfg.allreduce.sender_timeout).await {
                tracing::debug!(%peer, error = %e, "serving state failed");
            }
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut s).await;
        });
    }
}
