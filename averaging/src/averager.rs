//! `DecentralizedAverager`: matchmaking through the DHT, then a butterfly
//! all-reduce over the data plane, and state sharing for late joiners.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use colony_dht::{Dht, DhtValue, PeerId, Stream, StreamProtocol, dht_time};
use futures::FutureExt;
use rand::{RngCore, seq::SliceRandom};
use tokio::sync::{Mutex, MutexGuard, Notify, watch};
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
    /// Data-plane address announced to group members, when it differs from the
    /// bound one (port forwarding, NAT: bind `0.0.0.0:7000`, announce
    /// `203.0.113.5:7000`). Must name a concrete IP and a non-zero port; not
    /// allowed in client mode (clients accept no connections). Default `None`:
    /// announce the bound address, or, when bound to an unspecified IP
    /// (`0.0.0.0` / `::`), the bound port on an IP this peer's DHT node
    /// advertises (non-loopback first); construction fails if there is none.
    pub data_announce_addr: Option<SocketAddr>,
    /// How often a state donor re-declares itself (see
    /// [`DecentralizedAverager::declare_state`]). Default 30 s (reference
    /// `declare_state_period`).
    pub declare_state_period: Duration,
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
            data_announce_addr: None,
            declare_state_period: Duration::from_secs(30),
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
        if self.declare_state_period.is_zero() {
            return bad("declare_state_period", "must be positive");
        }
        if let Some(a) = self.data_announce_addr {
            if self.mode == AveragingMode::Client {
                return bad(
                    "data_announce_addr",
                    "client-mode peers accept no data-plane connections",
                );
            }
            if a.ip().is_unspecified() || a.ip().is_multicast() || a.port() == 0 {
                return bad(
                    "data_announce_addr",
                    "must be a concrete unicast IP with a non-zero port",
                );
            }
            if let IpAddr::V4(v4) = a.ip()
                && v4.is_broadcast()
            {
                return bad("data_announce_addr", "must not be a broadcast address");
            }
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
    /// Joiners accepted whose `Accepted` reply is still on its way: their slots
    /// are reserved so that concurrent joins never overfill the group.
    pending: Vec<Vec<u8>>,
}

/// What the state-donor task keeps in the DHT.
#[derive(Debug, Clone, Copy, PartialEq)]
enum DonorCommand {
    /// Nothing declared.
    Idle,
    /// Keep `priority` declared; each declaration lives `ttl` seconds.
    Keep { priority: f64, ttl: f64 },
    /// Withdraw the declaration and stop.
    Stop,
}

/// Where this peer's donor record lives, shared with the re-declaring task.
#[derive(Debug, Clone)]
struct DonorRecord {
    dht: Dht,
    key: Vec<u8>,
    subkey: Vec<u8>,
    peer_id: Vec<u8>,
    /// Latest expiration stored, so a withdrawal always supersedes it.
    last_expiration: Arc<StdMutex<f64>>,
    /// Serializes stores, so a re-declaration never lands after a withdrawal.
    stores: Arc<Mutex<()>>,
}

impl DonorRecord {
    /// Store the declaration if `wanted()` still holds once it is this
    /// store's turn.
    async fn declare(
        &self,
        priority: f64,
        expiration: f64,
        wanted: impl Fn() -> bool,
    ) -> Result<()> {
        let _turn = self.stores.lock().await;
        if !wanted() {
            return Ok(());
        }
        let value = rmp_serde::to_vec(&(serde_bytes::Bytes::new(&self.peer_id), priority))
            .map_err(|_| AveragingError::Decode {
                reason: "cannot encode donor record",
            })?;
        if let Ok(mut last) = self.last_expiration.lock() {
            *last = last.max(expiration);
        }
        self.dht
            .store(&self.key, Some(&self.subkey), value, expiration)
            .await
            .map_err(dht_err("declaring state"))?;
        Ok(())
    }

    /// Store nil just after the latest declaration (nothing to do once it expired).
    async fn withdraw(&self) -> Result<()> {
        let _turn = self.stores.lock().await;
        let last = self.last_expiration.lock().map(|l| *l).unwrap_or(0.0);
        if last <= dht_time() {
            return Ok(());
        }
        if let Ok(mut l) = self.last_expiration.lock() {
            *l = last + 1e-3;
        }
        self.dht
            .store(&self.key, Some(&self.subkey), vec![0xc0], last + 1e-3)
            .await
            .map_err(dht_err("withdrawing state"))?;
        Ok(())
    }
}

struct Inner {
    dht: Dht,
    cfg: AveragerConfig,
    layout: TensorLayout,
    tensors: Mutex<Vec<Vec<f32>>>,
    plane: DataPlane,
    /// The data-plane address announced to group members (`None`: client).
    data_addr: Option<SocketAddr>,
    peer_id: Vec<u8>,
    schema: [u8; 32],
    group_bits: StdMutex<String>,
    matching: StdMutex<MatchState>,
    /// Followers or pending joins changed (one waiter: the matchmaking loop).
    changed: Notify,
    state_metadata: StdMutex<Vec<u8>>,
    /// Whether this peer serves state (it runs the state acceptor).
    sharing: bool,
    donor: DonorRecord,
    donor_cmd: watch::Sender<DonorCommand>,
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
        let data_addr = announced_data_addr(&cfg, &plane, &dht)?;
        let bits = cfg.initial_group_bits.clone();
        let sharing = cfg.mode != AveragingMode::Client
            && !dht.is_client()
            && cfg
                .allow_state_sharing
                .unwrap_or(cfg.mode == AveragingMode::Node);
        let peer_id = dht.peer_id().to_bytes();
        let donor = DonorRecord {
            dht: dht.clone(),
            key: format!("{}.all_averagers", cfg.prefix).into_bytes(),
            subkey: dht.owner_subkey(),
            peer_id: peer_id.clone(),
            last_expiration: Arc::new(StdMutex::new(0.0)),
            stores: Arc::new(Mutex::new(())),
        };
        let (donor_cmd, donor_rx) = watch::channel(DonorCommand::Idle);
        let inner = Arc::new(Inner {
            peer_id,
            schema: crate::group::schema_hash(&layout),
            layout,
            tensors: Mutex::new(tensors),
            plane,
            data_addr,
            group_bits: StdMutex::new(bits.clone()),
            matching: StdMutex::new(MatchState {
                looking: false,
                group_key: group_key(&cfg.prefix, &bits),
                declared_expiration: None,
                following: None,
                followers: Vec::new(),
                pending: Vec::new(),
            }),
            changed: Notify::new(),
            state_metadata: StdMutex::new(Vec::new()),
            sharing,
            donor: donor.clone(),
            donor_cmd,
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
        if sharing {
            // Not in `tasks`: shutdown asks it to withdraw instead of aborting it.
            tokio::spawn(keep_state_declared(
                donor,
                donor_rx,
                inner.cfg.declare_state_period,
            ));
        }
        Ok(Self {
            inner,
            tasks: Arc::new(StdMutex::new(tasks)),
        })
    }

    /// The data-plane address group members connect to (the announced one;
    /// `None` in client mode).
    pub fn data_addr(&self) -> Option<SocketAddr> {
        self.inner.data_addr
    }

    /// The address the data-plane listener is bound to (`None` in client mode).
    pub fn data_listen_addr(&self) -> Option<SocketAddr> {
        self.inner.plane.local_addr()
    }

    /// This peer's id bytes.
    pub fn peer_id(&self) -> &[u8] {
        &self.inner.peer_id
    }

    /// The tensor layout.
    pub fn layout(&self) -> &TensorLayout {
        &self.inner.layout
    }

    /// Followers this peer leads right now, its declared expiration, and
    /// whether it accepts joins.
    #[cfg(test)]
    pub(crate) fn leader_state(&self) -> (usize, Option<f64>, bool) {
        let m = lock_match(&self.inner);
        (m.followers.len(), m.declared_expiration, m.looking)
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

    /// Stop background tasks, and withdraw this peer's state-donor declaration
    /// (in the background; [`withdraw_state`](Self::withdraw_state) waits for it).
    pub fn shutdown(&self) {
        self.inner.donor_cmd.send_replace(DonorCommand::Stop);
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
    /// Cancelling leaves the tensors unchanged; matchmaking stops (joins are
    /// refused, followers released, the declaration withdrawn in the background).
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
        let span = tracing::debug_span!("matchmaking", peer = %short_id(&inner.peer_id));
        // Stop accepting joins when matchmaking ends, even if this step is
        // cancelled in the middle of it.
        let idle = IdleOnDrop(inner);
        let group = tracing::Instrument::instrument(matchmake(inner, &keys, deadline), span).await;
        drop(idle);
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
    /// The declaration is kept alive: a background task re-declares it every
    /// [`declare_state_period`](AveragerConfig::declare_state_period), or
    /// halfway through its lifetime if that is sooner, each time with the same
    /// lifetime (`expiration` − now), until [`withdraw_state`](Self::withdraw_state),
    /// [`shutdown`](Self::shutdown) or the averager is dropped; each of those
    /// withdraws it. A later call replaces priority, metadata and lifetime.
    /// Does nothing (successfully) on a peer that does not share state
    /// (client mode, or `allow_state_sharing` off).
    ///
    /// # Errors
    /// [`AveragingError::InvalidConfig`] for an expiration that is not in the
    /// future or a non-finite priority; DHT failures as [`AveragingError::Io`]
    /// (the re-declaring task still runs and retries).
    pub async fn declare_state(
        &self,
        priority: f64,
        metadata: Vec<u8>,
        expiration: f64,
    ) -> Result<()> {
        let inner = &self.inner;
        if !inner.sharing {
            tracing::debug!("not declaring state: this peer does not share state");
            return Ok(());
        }
        if *inner.donor_cmd.borrow() == DonorCommand::Stop {
            tracing::debug!("not declaring state: the averager is shut down");
            return Ok(());
        }
        let ttl = expiration - dht_time();
        if !ttl.is_finite() || ttl <= 0.0 || !priority.is_finite() {
            return Err(AveragingError::InvalidConfig {
                field: "declare_state",
                reason: "priority must be finite and expiration in the future".into(),
            });
        }
        if let Ok(mut m) = inner.state_metadata.lock() {
            *m = metadata;
        }
        // The task refreshes from now on; this first store reports errors.
        let keep = DonorCommand::Keep { priority, ttl };
        inner.donor_cmd.send_replace(keep);
        let cmd = inner.donor_cmd.subscribe();
        inner
            .donor
            .declare(priority, expiration, || *cmd.borrow() == keep)
            .await
    }

    /// Stop advertising this peer as a state donor and withdraw its declaration.
    ///
    /// # Errors
    /// DHT failures as [`AveragingError::Io`].
    pub async fn withdraw_state(&self) -> Result<()> {
        let inner = &self.inner;
        inner.donor_cmd.send_if_modified(|c| {
            let was = *c;
            if was != DonorCommand::Stop {
                *c = DonorCommand::Idle;
            }
            was != *c
        });
        inner.donor.withdraw().await
    }

    /// Download state from the best donor (highest priority first, falling back
    /// to the next on any failure), verify it (layout, finiteness, SHA-256) and
    /// install the tensors. Returns the donor's metadata.
    ///
    /// # Errors
    /// [`AveragingError::NoStateDonor`] when no donor delivered valid state.
    pub async fn load_state_from_peers(&self, timeout: Duration) -> Result<Vec<u8>> {
        let inner = &self.inner;
        let found = tokio::time::timeout(timeout, inner.dht.get(&inner.donor.key, true))
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

/// Redirects a follower accepts in one search attempt ("not a leader, ask X",
/// or "disbanded, follow X").
const MAX_REDIRECTS: usize = 4;

/// Times a leader that could not be reached is retried per declaration.
const MAX_TRANSIENT_FAILURES: usize = 3;

/// Whether a failed join attempt is worth repeating: the leader never
/// answered (the stream could not be opened, closed, or stalled).
fn is_transient(e: &AveragingError) -> bool {
    matches!(
        e,
        AveragingError::Io { .. }
            | AveragingError::Peer {
                fault: PeerFault::Stalled { .. } | PeerFault::Disconnected { .. },
                ..
            }
    )
}

/// The last characters of a peer id, for logs.
fn short_id(peer_id: &[u8]) -> String {
    PeerId::from_bytes(peer_id)
        .map(|p| {
            let s = p.to_string();
            s[s.len().saturating_sub(6)..].to_string()
        })
        .unwrap_or_default()
}

fn lock_match(inner: &Inner) -> std::sync::MutexGuard<'_, MatchState> {
    inner
        .matching
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The data-plane address to announce: the configured one, the bound one, or,
/// for an unspecified bind IP, the bound port on an IP the DHT node advertises.
fn announced_data_addr(
    cfg: &AveragerConfig,
    plane: &DataPlane,
    dht: &Dht,
) -> Result<Option<SocketAddr>> {
    if cfg.mode == AveragingMode::Client {
        return Ok(None);
    }
    if let Some(a) = cfg.data_announce_addr {
        return Ok(Some(a));
    }
    let Some(bound) = plane.local_addr() else {
        return Ok(None);
    };
    if !bound.ip().is_unspecified() {
        return Ok(Some(bound));
    }
    let ips: Vec<IpAddr> = dht
        .listen_addrs()
        .iter()
        .filter_map(|a| multiaddr_ip(&a.to_string()))
        .filter(|ip| !ip.is_unspecified() && !ip.is_multicast() && ip.is_ipv4() == bound.is_ipv4())
        .collect();
    let ip = ips
        .iter()
        .find(|ip| !ip.is_loopback())
        .or_else(|| ips.first())
        .ok_or_else(|| AveragingError::InvalidConfig {
            field: "data_announce_addr",
            reason: format!(
                "the data plane is bound to {bound} and the DHT node advertises no usable \
                 {} address: set data_announce_addr",
                if bound.is_ipv4() { "IPv4" } else { "IPv6" }
            ),
        })?;
    Ok(Some(SocketAddr::new(*ip, bound.port())))
}

/// The IP of a multiaddr's leading `/ip4/..` or `/ip6/..` component.
fn multiaddr_ip(addr: &str) -> Option<IpAddr> {
    let mut parts = addr.split('/').skip_while(|p| p.is_empty());
    match (parts.next()?, parts.next()?) {
        ("ip4" | "ip6", ip) => ip.parse().ok(),
        _ => None,
    }
}

/// Re-declares this peer as a state donor until told to stop (or the averager
/// is dropped), then withdraws the declaration.
async fn keep_state_declared(
    donor: DonorRecord,
    mut rx: watch::Receiver<DonorCommand>,
    period: Duration,
) {
    loop {
        let command = *rx.borrow_and_update();
        match command {
            DonorCommand::Idle => {
                if rx.changed().await.is_err() {
                    break;
                }
            }
            DonorCommand::Stop => break,
            DonorCommand::Keep { priority, ttl } => {
                // `declare_state` has just stored it: refresh before it lapses.
                let half = Duration::try_from_secs_f64(ttl / 2.0).unwrap_or(period);
                let interval = period.min(half).max(Duration::from_millis(50));
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { break },
                    () = tokio::time::sleep(interval) => {
                        let still = || *rx.borrow() == command;
                        if let Err(e) = donor.declare(priority, dht_time() + ttl, still).await {
                            tracing::warn!(error = %e, "could not re-declare state");
                        }
                    }
                }
            }
        }
    }
    if let Err(e) = donor.withdraw().await {
        tracing::debug!(error = %e, "could not withdraw the state declaration");
    }
}

/// Calls [`set_idle`] when dropped.
struct IdleOnDrop<'a>(&'a Inner);

impl Drop for IdleOnDrop<'_> {
    fn drop(&mut self) {
        set_idle(self.0);
    }
}

/// Seconds of remaining lifetime below which a matchmaking declaration is not
/// withdrawn but left to expire.
const WITHDRAW_MARGIN_S: f64 = 1.0;

/// Leave matchmaking: refuse joins from now on, withdraw the declaration (nil
/// with a later expiration wins; once it has expired there is nothing to
/// withdraw, and storers would refuse a record that expires in the past), and
/// tell followers left over (the round started without them) to move on.
fn set_idle(inner: &Inner) {
    let (followers, declared, key) = {
        let mut m = lock_match(inner);
        m.looking = false;
        m.following = None;
        m.pending.clear();
        (
            std::mem::take(&mut m.followers),
            m.declared_expiration.take(),
            m.group_key.clone(),
        )
    };
    // A declaration about to expire is left to expire: the withdrawal would
    // reach storers after its own expiration and be refused.
    if let Some(expiration) = declared.filter(|e| *e > dht_time() + WITHDRAW_MARGIN_S) {
        spawn_declare(inner, &key, expiration + 1e-3, false);
    }
    send_disbanded(inner, followers, None);
}

/// Tell `followers` that this peer no longer leads them (in the background),
/// suggesting `next` as their leader.
fn send_disbanded(inner: &Inner, followers: Vec<(GroupMember, Stream)>, next: Option<Vec<u8>>) {
    let t = inner.cfg.request_timeout;
    // Outside a runtime (an averager dropped late) the streams just close.
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    for (_, mut s) in followers {
        let msg = ControlMsg::Disbanded {
            suggested_leader: next.clone(),
        };
        runtime.spawn(async move {
            let _ = control::send(&mut s, &msg, t).await;
        });
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

fn my_member(inner: &Inner, keys: &RoundKeyPair) -> GroupMember {
    GroupMember {
        peer_id: inner.peer_id.clone(),
        data_addr: inner.data_addr,
        mode: inner.cfg.mode,
        bandwidth: match inner.cfg.mode {
            AveragingMode::Client => Some(0.0),
            _ => inner.cfg.bandwidth,
        },
        round_public_key: keys.public(),
    }
}

/// Store (`active`) or withdraw this peer's declaration under `key`, in the
/// background. The store puts the record in local storage at once (peers that
/// query this node see it immediately); waiting for the replicas must not hold
/// up matchmaking, and a failed store is not fatal: the record is readable
/// here, and the next period re-declares.
fn spawn_declare(inner: &Inner, key: &str, expiration: f64, active: bool) {
    let value = if active {
        let client = inner.cfg.mode == AveragingMode::Client;
        match rmp_serde::to_vec(&(serde_bytes::Bytes::new(&inner.peer_id), client)) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode the matchmaking declaration");
                return;
            }
        }
    } else {
        vec![0xc0]
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let dht = inner.dht.clone();
    let key = key.to_string();
    runtime.spawn(async move {
        let subkey = dht.owner_subkey();
        if let Err(e) = dht
            .store(key.as_bytes(), Some(&subkey), value, expiration)
            .await
        {
            tracing::debug!(error = %e, active, "matchmaking declaration store failed");
        }
    });
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

/// Whether this leader's group is full (it assembles at once).
fn group_full(inner: &Inner) -> bool {
    let m = lock_match(inner);
    inner
        .cfg
        .target_group_size
        .is_some_and(|t| m.followers.len() + 1 >= t)
}

/// Resolves when this peer, as a leader, must act: its group is full or its
/// declared expiration has come.
async fn leader_event(inner: &Inner, expiration_at: tokio::time::Instant) {
    let full = async {
        loop {
            // `notify_one` stores a permit, so a change between the check and
            // the wait is not lost.
            let changed = inner.changed.notified();
            if group_full(inner) {
                return;
            }
            changed.await;
        }
    };
    tokio::select! {
        () = tokio::time::sleep_until(expiration_at) => {}
        () = full => {}
    }
}

/// What the leader side of the matchmaking loop does now.
enum LeaderStep {
    Assemble,
    Disband,
    /// The deadline passed while a join is being accepted: wait for it.
    AwaitPending,
    Nothing,
}

fn leader_step(inner: &Inner, expired: bool, grace_over: bool) -> LeaderStep {
    let cfg = &inner.cfg;
    let mut m = lock_match(inner);
    // Drop followers that gave up: a group must not hold a member that will
    // never hear `Begin`.
    m.followers.retain_mut(|(_, s)| follower_alive(s));
    if expired && !m.pending.is_empty() && !grace_over {
        return LeaderStep::AwaitPending;
    }
    if m.followers.is_empty() {
        return LeaderStep::Nothing;
    }
    match assemble_decision(
        m.followers.len(),
        cfg.target_group_size,
        cfg.min_group_size,
        expired,
    ) {
        Some(true) => LeaderStep::Assemble,
        Some(false) => LeaderStep::Disband,
        None => LeaderStep::Nothing,
    }
}

/// Matchmaking (the reference's `look_for_group`): declare under the group
/// key, then, until a group forms or the deadline passes,
/// * as a leader: assemble as soon as the group is full, or at the declared
///   expiration if it has at least `min_group_size` peers (else disband and
///   re-declare for another period);
/// * keep looking for a better leader (earlier `(expiration, peer id)`) even
///   while leading: once one accepts, this peer's followers are redirected to
///   it, so groups never split because some peer read the DHT too early.
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
    let client = cfg.mode == AveragingMode::Client;
    let poll =
        (cfg.request_timeout / 6).clamp(Duration::from_millis(20), Duration::from_millis(300));
    let mut tried: Vec<(Vec<u8>, f64)> = Vec::new();
    let mut transient: Vec<((Vec<u8>, f64), usize)> = Vec::new();
    let mut expiration_at = (tokio::time::Instant::now() + cfg.min_matchmaking_time).min(deadline);
    let mut expiration = to_dht(expiration_at);
    {
        let mut m = lock_match(inner);
        m.looking = true;
        m.group_key = key.clone();
        m.following = None;
        m.followers.clear();
        m.pending.clear();
        // Before the store: peers may read the record (and ask this peer to
        // lead) before the store returns; they must not hear "not declared".
        m.declared_expiration = Some(expiration);
    }
    spawn_declare(inner, &key, expiration, true);
    tracing::debug!(%key, expiration, "looking for a group");
    let mut next_search = tokio::time::Instant::now();
    let result = loop {
        let now = tokio::time::Instant::now();
        let expired = now >= expiration_at;
        match leader_step(inner, expired, now >= expiration_at + cfg.request_timeout) {
            LeaderStep::Assemble => break assemble(inner, &me).await,
            LeaderStep::Disband => {
                let followers = std::mem::take(&mut lock_match(inner).followers);
                tracing::debug!(
                    followers = followers.len(),
                    "disbanding: too few peers by the deadline"
                );
                send_disbanded(inner, followers, None);
            }
            LeaderStep::AwaitPending => {
                // A join reply is in flight (bounded by request_timeout).
                let _ = tokio::time::timeout(poll, inner.changed.notified()).await;
                continue;
            }
            LeaderStep::Nothing => {}
        }
        if now >= deadline {
            break Err(AveragingError::NoGroupFound {
                waited: now - started,
            });
        }
        if expired {
            if cfg.min_group_size <= 1 {
                break assemble(inner, &me).await;
            }
            tracing::debug!("declared expiration passed without a group; re-declaring");
            // Re-declare for another period, as the reference does.
            expiration_at = (now + cfg.min_matchmaking_time).min(deadline);
            expiration = to_dht(expiration_at);
            tried.clear();
            transient.clear();
            lock_match(inner).declared_expiration = Some(expiration);
            spawn_declare(inner, &key, expiration, true);
            next_search = now;
            continue;
        }
        if now >= next_search {
            // Reading the DHT may take a while under load: a full group or the
            // deadline interrupts it.
            let all = tokio::select! {
                all = declared_averagers(inner, &key) => Some(all),
                () = leader_event(inner, expiration_at) => None,
            };
            let Some(all) = all else { continue };
            next_search = tokio::time::Instant::now() + poll;
            let mine = Declared {
                peer_id: inner.peer_id.clone(),
                expiration,
                client_mode: client,
            };
            if let Some(leader) = leader_candidates(&mine, &all, &tried).into_iter().next() {
                tracing::debug!(
                    declared = all.len(),
                    leader = %short_id(&leader.peer_id),
                    leader_expiration = leader.expiration,
                    "asking a better leader"
                );
                let attempt = (leader.peer_id.clone(), leader.expiration);
                match follow(inner, &me, &key, expiration, leader.peer_id).await {
                    Ok(group) => break Ok(group),
                    Err(e) => {
                        // A leader that answered (rejected us, or disbanded)
                        // is not asked again for this declaration. One we
                        // could not reach (a stream that closed or stalled)
                        // is retried a few times: skipping it for good
                        // after one transport hiccup left peers out.
                        let failures = transient
                            .iter_mut()
                            .find(|(a, _)| *a == attempt)
                            .map(|(_, n)| n);
                        let retry = is_transient(&e)
                            && match failures {
                                Some(n) if *n >= MAX_TRANSIENT_FAILURES => false,
                                Some(n) => {
                                    *n += 1;
                                    true
                                }
                                None => {
                                    transient.push((attempt.clone(), 1));
                                    true
                                }
                            };
                        tracing::debug!(error = %e, retry, "join attempt failed");
                        if !retry {
                            tried.push(attempt);
                        }
                        continue;
                    }
                }
            }
        }
        let wake = next_search.min(expiration_at).min(deadline);
        let _ = tokio::time::timeout_at(wake, leader_event(inner, expiration_at)).await;
    };
    // `set_idle` (run when matchmaking ends, however it ends) withdraws the
    // declaration.
    result
}

/// Ask `leader` to take this peer, then wait for the group, following
/// redirects. Once accepted, this peer's own followers are sent to `leader`.
async fn follow(
    inner: &Inner,
    me: &GroupMember,
    key: &str,
    expiration: f64,
    mut leader: Vec<u8>,
) -> Result<AssembledGroup> {
    let cfg = &inner.cfg;
    let t = cfg.request_timeout;
    let protocol = join_protocol(&cfg.prefix)?;
    let fault = |fault| AveragingError::Peer { peer: 0, fault };
    let request = JoinRequest {
        peer_id: inner.peer_id.clone(),
        schema_hash: inner.schema.to_vec(),
        expiration,
        group_key: key.to_string(),
        client_mode: cfg.mode == AveragingMode::Client,
    };
    let join = ControlMsg::Join {
        request,
        member: me.clone(),
    };
    let mut redirects = 0;
    loop {
        if leader == inner.peer_id {
            return Err(AveragingError::InvalidGroup {
                reason: "redirected to itself".into(),
            });
        }
        let peer = PeerId::from_bytes(&leader).map_err(|_| AveragingError::InvalidGroup {
            reason: "bad leader id".into(),
        })?;
        // One request_timeout for the whole request (stream, join, reply): a
        // leader that is itself asking someone waits for this much at most
        // before it acts on its own deadline.
        let attempt = async {
            let mut s = inner
                .dht
                .open_stream(peer, protocol.clone())
                .await
                .map_err(dht_err("opening a join stream"))?;
            control::send(&mut s, &join, t).await.map_err(fault)?;
            let reply = control::recv(&mut s, t).await.map_err(fault)?;
            Ok::<_, AveragingError>((s, reply))
        };
        let (mut s, reply) = tokio::time::timeout(t, attempt)
            .await
            .map_err(|_| fault(PeerFault::Stalled { timeout: t }))??;
        let leader_expiration = match reply {
            ControlMsg::Reply {
                code: JoinCode::Accepted,
                leader_expiration,
                ..
            } => leader_expiration
                .filter(|e| e.is_finite())
                .unwrap_or(expiration),
            ControlMsg::Reply {
                code: JoinCode::NotALeader,
                suggested_leader: Some(next),
                ..
            } if redirects < MAX_REDIRECTS => {
                tracing::debug!(%peer, "not a leader; following its suggestion");
                redirects += 1;
                leader = next;
                continue;
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
        };
        // Accepted: stop leading; hand any followers over to the new leader.
        let orphans = {
            let mut m = lock_match(inner);
            m.following = Some(leader.clone());
            std::mem::take(&mut m.followers)
        };
        if !orphans.is_empty() {
            tracing::debug!(
                followers = orphans.len(),
                %peer,
                "joined a better leader; redirecting followers"
            );
        }
        send_disbanded(inner, orphans, Some(leader.clone()));
        // The leader acts by its expiration (not later than ours unless we are
        // a client), at most one join request (request_timeout) late.
        let wait_until = expiration.max(leader_expiration);
        let wait = Duration::from_secs_f64((wait_until - dht_time()).clamp(0.0, 1e6)) + 2 * t;
        let msg = control::recv(&mut s, wait).await;
        lock_match(inner).following = None;
        match msg.map_err(fault)? {
            ControlMsg::Begin { group } => {
                group.validate()?;
                return match group.position(&inner.peer_id) {
                    Some(i) if group.members[i] == *me => Ok(group),
                    _ => Err(AveragingError::InvalidGroup {
                        reason: "leader's group does not hold this peer's entry".into(),
                    }),
                };
            }
            ControlMsg::Disbanded {
                suggested_leader: Some(next),
            } if redirects < MAX_REDIRECTS => {
                tracing::debug!(%peer, "leader disbanded; following its new leader");
                redirects += 1;
                leader = next;
            }
            _ => {
                return Err(AveragingError::InvalidGroup {
                    reason: "group disbanded".into(),
                });
            }
        }
    }
}

/// Form the group from this leader and its followers and tell them.
async fn assemble(inner: &Inner, me: &GroupMember) -> Result<AssembledGroup> {
    let followers = {
        let mut m = lock_match(inner);
        m.looking = false;
        m.followers.retain_mut(|(_, s)| follower_alive(s));
        std::mem::take(&mut m.followers)
    };
    if followers.len() + 1 < inner.cfg.min_group_size {
        let size = followers.len() + 1;
        send_disbanded(inner, followers, None);
        return Err(AveragingError::GroupTooSmall {
            size,
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
    tracing::debug!(size = group.members.len(), "assembled a group");
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
        let span = tracing::debug_span!("join", leader = %short_id(&inner.peer_id));
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                if let Err(f) = handle_join(&inner, peer, stream).await {
                    tracing::debug!(%peer, fault = %f, "join request failed");
                }
            },
            span,
        ));
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
    let (code, suggested, declared) = {
        let mut m = lock_match(inner);
        // Pending joins hold their slots (and their ids).
        let taken: Vec<Vec<u8>> = m
            .followers
            .iter()
            .map(|(f, _)| f.peer_id.clone())
            .chain(m.pending.iter().cloned())
            .collect();
        let view = LeaderView {
            looking: m.looking,
            client_mode: inner.cfg.mode == AveragingMode::Client,
            schema_hash: &inner.schema,
            group_key: &m.group_key,
            declared_expiration: m.declared_expiration,
            following: m.following.as_deref(),
            followers: &taken,
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
        if code == JoinCode::Accepted {
            m.pending.push(request.peer_id.clone());
        }
        (code, m.following.clone(), m.declared_expiration)
    };
    tracing::debug!(joiner = %short_id(&request.peer_id), ?code, "join request");
    if code != JoinCode::Accepted {
        return control::send(
            &mut s,
            &ControlMsg::Reply {
                code,
                suggested_leader: suggested,
                leader_expiration: None,
            },
            t,
        )
        .await;
    }
    let sent = control::send(
        &mut s,
        &ControlMsg::Reply {
            code,
            suggested_leader: None,
            leader_expiration: declared,
        },
        t,
    )
    .await;
    // Re-check: the state may have changed while replying.
    let rejected = {
        let mut m = lock_match(inner);
        if let Some(i) = m.pending.iter().position(|p| *p == request.peer_id) {
            m.pending.swap_remove(i);
        }
        match sent {
            Err(f) => Err(f),
            Ok(())
                if m.looking
                    && m.following.is_none()
                    && m.declared_expiration == declared
                    && m.group_key == request.group_key =>
            {
                m.followers.push((member, s));
                Ok(None)
            }
            // Started following someone else meanwhile: send the joiner there.
            Ok(()) => Ok(Some((s, m.following.clone()))),
        }
    };
    inner.changed.notify_one();
    match rejected? {
        None => Ok(()),
        Some((mut s, next)) => {
            control::send(
                &mut s,
                &ControlMsg::Disbanded {
                    suggested_leader: next,
                },
                t,
            )
            .await
        }
    }
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
