//! [`DecentralizedAverager`]: the handle. Matchmaking through the DHT (the
//! [`Matchmaker`](crate::matchmaking::Matchmaker) task), then a butterfly
//! all-reduce over the data plane, and state sharing for late joiners.
//!
//! One file per role: `config` (the knobs and the announced address),
//! `join_server` (inbound join requests), `donor` (this peer's state-donor
//! declaration), `state_server` (serving and downloading state), `device`
//! (buffers on any device).

mod bans;
mod config;
mod device;
mod donor;
mod join_server;
mod reachability;
mod state_server;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use colony_dht::{Dht, PeerId, StreamProtocol, dht_time};
use tokio::sync::{Mutex, MutexGuard, mpsc, watch};

pub use self::bans::Ban;
pub use self::config::AveragerConfig;
use self::donor::{DonorCommand, DonorRecord};
pub(crate) use self::reachability::Reachability;
pub use self::state_server::{DownloadedState, MAX_STATE_REQUESTS};
use crate::{
    allreduce::{RoundOutcome, run_allreduce_capped},
    crypto::RoundKeyPair,
    dataplane::DataPlane,
    error::{AveragingError, Result},
    group::{AssembledGroup, AveragingMode, EntryContext, GroupMember, WeightCaps},
    group_keys::{group_key, next_group_bits},
    matchmaking::{
        Matchmaker, MatchmakerConfig,
        shell::{self, Command, ShellIo},
    },
    partition::TensorLayout,
    state::ServedStates,
};

/// What a successful [`DecentralizedAverager::step`] reports.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    /// The group that averaged.
    pub group: AssembledGroup,
    /// Per-round details (spans, failed reducers, banned senders).
    pub round: RoundOutcome,
    /// Group bits for the next round.
    pub next_group_bits: String,
    /// Wall time of the all-reduce itself (after matchmaking, before applying).
    pub allreduce_time: std::time::Duration,
    /// Members this round caught in a provable fault, now kept out of this
    /// peer's groups (see [`DecentralizedAverager::bans`]).
    pub new_bans: Vec<Ban>,
}

/// Commands queued for the matchmaker task (join requests and searches).
const MATCHMAKER_QUEUE: usize = 64;

struct Inner {
    dht: Dht,
    cfg: AveragerConfig,
    layout: TensorLayout,
    /// [`crate::schema_hash`] of `layout`.
    schema: [u8; 32],
    tensors: Mutex<Vec<Vec<f32>>>,
    /// The state this peer declared last, as it serves it (one copy, shared
    /// by every request), and earlier ones while requests still read them.
    served: StdMutex<ServedStates>,
    plane: DataPlane,
    /// The data-plane address announced to group members (`None`: client).
    data_addr: Option<SocketAddr>,
    peer_id: Vec<u8>,
    group_bits: StdMutex<String>,
    /// The matchmaker task.
    matchmaker: mpsc::Sender<Command>,
    /// Whether this peer serves state (it runs the state acceptor).
    sharing: bool,
    donor: DonorRecord,
    donor_cmd: watch::Sender<DonorCommand>,
    step_lock: Mutex<()>,
    weight_caps: StdMutex<WeightCaps>,
    bans: StdMutex<bans::BanList>,
}

/// Averages a set of flat `f32` buffers with peers found through the DHT.
///
/// Cloning is cheap; every clone drives the same averager. Background tasks
/// (matchmaker, join and state servers) stop when
/// [`shutdown`](Self::shutdown) is called or the DHT shuts down.
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

fn protocol(prefix: &str, what: &str) -> Result<StreamProtocol> {
    StreamProtocol::try_from_owned(format!("/colony/averaging/{prefix}/{what}/1")).map_err(|_| {
        AveragingError::InvalidConfig {
            field: "prefix",
            reason: "not usable in a protocol name".into(),
        }
    })
}

fn join_protocol(prefix: &str) -> Result<StreamProtocol> {
    protocol(prefix, "join")
}

fn state_protocol(prefix: &str) -> Result<StreamProtocol> {
    protocol(prefix, "state")
}

/// The data protocol: all-reduce connections carried on the libp2p
/// connection, `/colony/averaging/{prefix}/data/1`.
fn data_protocol(prefix: &str) -> Result<StreamProtocol> {
    protocol(prefix, "data")
}

impl DecentralizedAverager {
    /// Start an averager over `tensors` on `dht`.
    ///
    /// # Errors
    /// [`AveragingError::InvalidConfig`], [`AveragingError::Io`] if the data
    /// plane cannot listen, or [`AveragingError::Dht`] if the protocols are
    /// already registered.
    pub async fn new(dht: Dht, tensors: Vec<Vec<f32>>, cfg: AveragerConfig) -> Result<Self> {
        cfg.validate()?;
        if cfg.mode == AveragingMode::Aux && dht.is_client() {
            return Err(AveragingError::InvalidConfig {
                field: "mode",
                reason: "auxiliary peers must not be DHT clients".into(),
            });
        }
        let layout = TensorLayout::new(&tensors.iter().map(Vec::len).collect::<Vec<_>>());
        // A codec list that does not fit the tensors fails here, before
        // anything is bound or registered, not mid-round.
        crate::group::Codecs::new(&layout, &cfg.allreduce)?;
        let plane = if cfg.mode == AveragingMode::Client {
            DataPlane::client()
        } else if cfg.direct_data_plane {
            DataPlane::bind(cfg.data_listen_addr, cfg.request_timeout).await?
        } else {
            DataPlane::libp2p_only(cfg.request_timeout)
        };
        let plane = plane.with_libp2p(&dht, data_protocol(&cfg.prefix)?)?;
        let data_addr = config::announced_data_addr(&cfg, &plane, &dht)?;
        let bits = cfg.initial_group_bits.clone();
        let sharing = cfg.mode != AveragingMode::Client
            && !dht.is_client()
            && cfg
                .allow_state_sharing
                .unwrap_or(cfg.mode == AveragingMode::Node);
        // What this node stores for others and reads under the averager's
        // keys: one owner-signed entry per peer, naming that peer.
        dht.add_validator(Arc::new(crate::records::AveragingRecordValidator::new(
            &cfg.prefix,
        )));
        let peer_id = dht.peer_id().to_bytes();
        let donor = DonorRecord {
            dht: dht.clone(),
            key: format!("{}.all_averagers", cfg.prefix).into_bytes(),
            subkey: dht.owner_subkey(),
            peer_id: peer_id.clone(),
            last_expiration: Arc::new(StdMutex::new(0.0)),
            stores: Arc::new(Mutex::new(())),
            store_budget: cfg.request_timeout,
        };
        let (donor_cmd, donor_rx) = watch::channel(DonorCommand::Idle);
        let schema = crate::group::schema_hash_with(&layout, &cfg.allreduce);
        let client_mode = cfg.mode == AveragingMode::Client;
        let machine = Matchmaker::new(MatchmakerConfig {
            peer_id: peer_id.clone(),
            schema_hash: schema,
            client_mode,
            target_group_size: cfg.target_group_size,
            min_group_size: cfg.min_group_size,
            min_matchmaking_time: cfg.min_matchmaking_time.as_secs_f64(),
            request_timeout: cfg.request_timeout.as_secs_f64(),
        });
        // Probes get a quarter of the request timeout, so a leader's group
        // waits for them at most about that long past its window.
        let reach = (!client_mode)
            .then(|| reachability::Reachability::new(dht.clone(), cfg.request_timeout / 4));
        let io = ShellIo {
            prefix: cfg.prefix.clone(),
            schema,
            dht: dht.clone(),
            protocol: join_protocol(&cfg.prefix)?,
            client_mode,
            request_timeout: cfg.request_timeout,
            reach: reach.clone(),
        };
        let (matchmaker, commands) = mpsc::channel(MATCHMAKER_QUEUE);
        let mut tasks = vec![tokio::spawn(shell::run(machine, io, commands))];
        // A DHT client behind NAT that listens through a relay can still be
        // dialed (through the relay, or directly once a hole punch worked),
        // so it leads groups and reduces like any peer; one that cannot be
        // dialed at all only joins.
        let joins_only = client_mode || !dht.is_dialable();
        if !joins_only {
            let joins = dht
                .accept_streams(join_protocol(&cfg.prefix)?, 64)
                .map_err(AveragingError::dht("registering the join protocol"))?;
            tasks.push(tokio::spawn(join_server::accept_joins(
                matchmaker.downgrade(),
                joins,
                cfg.request_timeout,
                reach,
            )));
        }
        let inner = Arc::new(Inner {
            peer_id,
            schema,
            layout,
            tensors: Mutex::new(tensors),
            served: StdMutex::new(ServedStates::default()),
            plane,
            data_addr,
            group_bits: StdMutex::new(bits),
            matchmaker,
            sharing,
            donor: donor.clone(),
            donor_cmd,
            step_lock: Mutex::new(()),
            weight_caps: StdMutex::new(WeightCaps::default()),
            bans: StdMutex::new(bans::BanList::default()),
            cfg,
            dht,
        });
        if sharing {
            let states = inner
                .dht
                .accept_streams(state_protocol(&inner.cfg.prefix)?, 8)
                .map_err(AveragingError::dht("registering the state protocol"))?;
            tasks.push(tokio::spawn(state_server::accept_state_requests(
                Arc::downgrade(&inner),
                states,
            )));
            // Not in `tasks`: shutdown asks it to withdraw instead of aborting it.
            tokio::spawn(donor::keep_state_declared(
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
    /// `None` in client mode and without a TCP data plane, when members
    /// reach this peer over its libp2p connection).
    pub fn data_addr(&self) -> Option<SocketAddr> {
        self.inner.data_addr
    }

    /// The address the data-plane listener is bound to (`None` in client
    /// mode and without a TCP data plane).
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
    /// whether it is looking for a group.
    #[cfg(test)]
    pub(crate) async fn leader_state(&self) -> (usize, Option<f64>, bool) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self
            .inner
            .matchmaker
            .send(Command::Inspect(tx))
            .await
            .is_err()
        {
            return (0, None, false);
        }
        rx.await.unwrap_or((0, None, false))
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
        self.stop(DonorCommand::Stop);
    }

    /// Stop background tasks like [`shutdown`](Self::shutdown), but leave the
    /// state-donor declaration in the DHT: for a node that must leave
    /// because another node runs with its identity, whose declaration lives
    /// under the same owner subkey and is not this node's to withdraw.
    pub fn abandon(&self) {
        self.stop(DonorCommand::Abandon);
    }

    fn stop(&self, command: DonorCommand) {
        self.inner.donor_cmd.send_replace(command);
        if let Ok(mut t) = self.tasks.lock() {
            for h in t.drain(..) {
                h.abort();
            }
        }
    }

    /// Limit the weight each peer's parts may carry when this peer reduces
    /// (from the next step on); see [`WeightCaps`]. This peer's own weight
    /// obeys its cap too.
    pub fn set_weight_caps(&self, caps: WeightCaps) {
        if let Ok(mut c) = self.inner.weight_caps.lock() {
            *c = caps;
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
        let mut tensors = inner.tensors.lock().await;
        self.round(&mut tensors, weight, timeout).await
    }

    /// [`step`](Self::step) over the caller's buffers instead of the
    /// averager's own ([`tensors`](Self::tensors)): the round reads and
    /// writes `tensors` in place, with no copy in or out. They must have
    /// the averager's layout (the lengths it was created with). The
    /// averager's own tensors are left alone. Results are finite: every
    /// reducer's result is checked before it is applied.
    ///
    /// # Errors
    /// As [`step`](Self::step) (tensors unchanged), and
    /// [`AveragingError::LayoutMismatch`] for buffers of another layout.
    ///
    /// # Cancel safety
    /// As [`step`](Self::step).
    pub async fn step_with<T>(
        &self,
        tensors: &mut [T],
        weight: Option<f32>,
        timeout: Duration,
    ) -> Result<StepOutcome>
    where
        T: AsRef<[f32]> + AsMut<[f32]> + Sync + Send,
    {
        self.inner.layout.check(tensors)?;
        let _one_step = self.inner.step_lock.lock().await;
        self.round(tensors, weight, timeout).await
    }

    /// One round over `tensors` (the caller holds the step lock).
    async fn round<T>(
        &self,
        tensors: &mut [T],
        weight: Option<f32>,
        timeout: Duration,
    ) -> Result<StepOutcome>
    where
        T: AsRef<[f32]> + AsMut<[f32]> + Sync + Send,
    {
        let inner = &self.inner;
        let weight = match inner.cfg.mode {
            AveragingMode::Aux => 0.0,
            _ => weight.unwrap_or(1.0),
        };
        let keys = RoundKeyPair::generate()?;
        let key = group_key(&inner.cfg.prefix, &self.group_bits());
        let banned = inner
            .bans
            .lock()
            .map(|mut b| b.banned(tokio::time::Instant::now()))
            .unwrap_or_default();
        let span = tracing::debug_span!("matchmaking", peer = %short_id(&inner.peer_id));
        let deadline = dht_time() + timeout.as_secs_f64();
        let me = my_member(inner, &keys, &key, deadline);
        let group = tracing::Instrument::instrument(
            shell::look(&inner.matchmaker, key, me, deadline, banned),
            span,
        )
        .await?;
        let me = group
            .position(&inner.peer_id)
            .ok_or(AveragingError::Internal {
                what: "this peer is not in the group it joined",
            })?;
        let caps = inner
            .weight_caps
            .lock()
            .map(|c| c.for_group(&group))
            .unwrap_or_default();
        let started = std::time::Instant::now();
        let round = run_allreduce_capped(
            &inner.plane,
            &group,
            me,
            &keys,
            &inner.layout,
            tensors,
            weight,
            &inner.cfg.allreduce,
            &caps,
        )
        .await?;
        let allreduce_time = started.elapsed();
        let new_bans = record_bans(inner, &group, &round);
        if inner.cfg.mode != AveragingMode::Aux {
            round.apply(&inner.layout, tensors, inner.cfg.allreduce.averaging_alpha)?;
        }
        let next = {
            let mut bits = inner
                .group_bits
                .lock()
                .map_err(|_| AveragingError::Internal {
                    what: "group bits lock poisoned",
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
            allreduce_time,
            new_bans,
        })
    }

    /// The peers this averager keeps out of its groups for a provable
    /// fault, with the reason and when the ban ends.
    pub fn bans(&self) -> Vec<Ban> {
        self.inner
            .bans
            .lock()
            .map(|b| b.active(tokio::time::Instant::now()))
            .unwrap_or_default()
    }
}

/// Ban the members `round` caught in a provable fault (as a reducer of
/// their parts, or as a sender of their averages).
fn record_bans(inner: &Inner, group: &AssembledGroup, round: &RoundOutcome) -> Vec<Ban> {
    let now = tokio::time::Instant::now();
    let faults = round
        .banned_senders
        .iter()
        .chain(&round.failed_reducers)
        .filter(|(_, f)| bans::provable(f));
    let Ok(mut list) = inner.bans.lock() else {
        return Vec::new();
    };
    let mut out: Vec<Ban> = Vec::new();
    for (i, fault) in faults {
        let Some(m) = group.members.get(*i) else {
            continue;
        };
        if out.iter().any(|b| b.peer == m.peer_id) {
            continue;
        }
        let ban = list.ban(&m.peer_id, fault.clone(), now);
        tracing::warn!(
            peer = %peer_label(&m.peer_id),
            %fault,
            strikes = ban.strikes,
            for_secs = ban.duration.as_secs(),
            "averaging: banning a peer from this averager's groups"
        );
        out.push(ban);
    }
    out
}

/// A member's peer id for logs: the libp2p form, or hex for other ids.
pub(crate) fn peer_label(peer_id: &[u8]) -> String {
    PeerId::from_bytes(peer_id).map_or_else(
        |_| peer_id.iter().map(|b| format!("{b:02x}")).collect(),
        |p| p.to_string(),
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

/// This peer's entry for a search under `key` until `deadline` (DHT
/// time), signed with its identity key.
fn my_member(inner: &Inner, keys: &RoundKeyPair, key: &str, deadline: f64) -> GroupMember {
    let mut me = GroupMember {
        peer_id: inner.peer_id.clone(),
        data_addr: inner.data_addr,
        mode: inner.cfg.mode,
        bandwidth: match inner.cfg.mode {
            AveragingMode::Client => Some(0.0),
            _ => inner.cfg.bandwidth,
        },
        round_public_key: keys.public(),
        signed: None,
    };
    let ctx = EntryContext {
        prefix: &inner.cfg.prefix,
        group_key: key,
        schema_hash: &inner.schema,
    };
    crate::entries::sign_member(&inner.dht.signer(), &mut me, &ctx, deadline);
    me
}
