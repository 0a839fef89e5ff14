//! The background task that owns the swarm.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::StreamExt;
use libp2p::{
    Multiaddr, PeerId, Swarm,
    core::ConnectedPoint,
    gossipsub::{self, IdentTopic, TopicHash},
    identify,
    kad::{self, GetRecordOk, PutRecordError, QueryId, QueryResult, Quorum, Record, RecordKey},
    multiaddr::Protocol,
    swarm::{ConnectionId, SwarmEvent},
};
use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, oneshot};

use crate::{
    behaviour::{Behaviour, BehaviourEvent, KAD_PROTOCOL},
    error::{DhtError, PubSubError},
    gossip::{ForwardLimiter, GossipValidator},
    record::{DhtRecord, WireEntry, encode_wire},
    storage::merge_values,
    time::dht_time,
    validation::{CompositeValidator, RecordLimits},
    value::{DhtValue, StoreOutcome, ValueWithExpiration},
    verify::{Refused, Verified, Verifier, log_rejection},
};

mod nat;
pub use nat::PeerPath;
pub(crate) use nat::relay_of;

/// How often expired records are swept from local storage.
const PRUNE_INTERVAL: Duration = Duration::from_secs(30);

/// Gossip messages per second each propagating peer may have validated and
/// forwarded by this node (burst [`GOSSIP_BURST_PER_PEER`]); beyond that they
/// are ignored (not forwarded, no score penalty: a busy honest relay is not a
/// liar). Progress pushes come a few per minute per peer.
const GOSSIP_RATE_PER_PEER: f64 = 50.0;
const GOSSIP_BURST_PER_PEER: f64 = 200.0;
/// Propagating peers whose rate is tracked at once.
const GOSSIP_TRACKED_PEERS: usize = 4096;
/// Records a peer may put to this node per second (burst
/// [`PUT_BURST_PER_PEER`]); puts beyond that are dropped before they are
/// decoded or their signatures checked.
const PUT_RATE_PER_PEER: f64 = 50.0;
const PUT_BURST_PER_PEER: f64 = 200.0;
/// Entries one owner's signature may have stored on this node per second
/// (burst [`OWNER_BURST`]), whichever peers carried them: identities are
/// free, connections cheaper still, so the per-peer limit alone lets one
/// owner use many connections. The same as one peer's put rate, so an
/// honest peer that reports progress 20 times a second and declares itself
/// for matchmaking meets neither.
const OWNER_RATE: f64 = PUT_RATE_PER_PEER;
const OWNER_BURST: f64 = PUT_BURST_PER_PEER;

/// One subscriber of a topic.
struct Subscriber {
    sender: mpsc::Sender<GossipMessage>,
    validator: Option<GossipValidator>,
}

/// A message received on a subscribed gossipsub topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipMessage {
    /// The topic it was published on.
    pub topic: String,
    /// The peer that published (signed) it.
    pub source: Option<PeerId>,
    /// The payload.
    pub data: Vec<u8>,
}

/// What this node knows about how to reach a peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerAddresses {
    /// Remote addresses of the currently open connections (for a peer that
    /// dialed us: the address and port it dialed from, i.e. its observed IP).
    pub connected: Vec<Multiaddr>,
    /// Addresses the peer says it listens on (identify: its announced
    /// addresses instead when it announces any).
    pub listen: Vec<Multiaddr>,
    /// The software it says it runs (identify's agent version, e.g.
    /// `colony/0.1.0`); `None` before identify answered.
    pub agent_version: Option<String>,
}

type Reply<T> = oneshot::Sender<Result<T, DhtError>>;

pub(crate) enum Command {
    Store {
        record: DhtRecord,
        reply: Reply<StoreOutcome>,
    },
    Get {
        key: Vec<u8>,
        latest: bool,
        /// Answer with what was gathered once this much time has passed.
        budget: Duration,
        reply: Reply<Option<DhtValue>>,
    },
    Publish {
        topic: String,
        data: Vec<u8>,
        reply: Reply<()>,
    },
    Subscribe {
        topic: String,
        sender: mpsc::Sender<GossipMessage>,
        validator: Option<GossipValidator>,
        reply: Reply<()>,
    },
    PeerAddresses {
        peer: PeerId,
        reply: Reply<Option<PeerAddresses>>,
    },
    GossipScore {
        peer: PeerId,
        reply: Reply<Option<f64>>,
    },
    /// A validator was added: drop stored entries it refuses.
    Revalidate,
    Stats {
        reply: Reply<NodeStats>,
    },
    RoutingTable {
        reply: Reply<Vec<PeerId>>,
    },
    SetClientMode {
        client: bool,
        reply: Reply<()>,
    },
    FindPeer {
        peer: PeerId,
        reply: Reply<bool>,
    },
    /// Connect to `peer` at these addresses (a circuit through a relay).
    Dial {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        reply: Reply<()>,
    },
    /// The path to `peer` once a pending hole punch settled (`None`: not connected).
    PreparePath {
        peer: PeerId,
        reply: Reply<Option<PeerPath>>,
    },
    /// The best path each peer was ever reached by.
    Paths {
        reply: Reply<Vec<(PeerId, PeerPath)>>,
    },
    /// How many connected peers serve relay v2 and may be asked now.
    RelayCandidates {
        reply: Reply<usize>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Counters for diagnostics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Peers in the Kademlia routing table.
    pub routing_table_peers: usize,
    /// Peers with an open connection.
    pub connected_peers: usize,
    /// Keys held in local storage.
    pub stored_keys: usize,
    /// Inbound record entries rejected by validation since start.
    pub rejected_inbound: u64,
    /// Record entries received by gets and rejected by validation since start.
    pub rejected_on_read: u64,
    /// Relays currently holding a reservation for this node.
    pub relay_reservations: usize,
    /// Open connections that go through a relay.
    pub relayed_connections: usize,
    /// Hole punches (DCUtR) that opened a direct connection, since start.
    pub hole_punches_succeeded: u64,
    /// Hole punches that failed, since start.
    pub hole_punches_failed: u64,
    /// Circuits this node relayed for others, since start.
    pub circuits_served: u64,
    /// AutoNAT probes of this node's addresses that no peer could dial back.
    pub autonat_failures: u64,
    /// Inbound puts dropped because their sender put faster than this node
    /// takes from one peer.
    pub rate_limited_puts: u64,
    /// Inbound puts dropped because the signature checker's queue was full.
    pub unverified_puts_dropped: u64,
    /// Inbound entries dropped because their owner's records arrived faster
    /// than this node stores for one owner (from any number of peers).
    pub owner_rate_limited_entries: u64,
    /// Connections denied because resident memory was over
    /// [`DhtConfig::max_memory`](crate::DhtConfig::max_memory), since start.
    pub memory_denied_connections: u64,
}

/// A get of a key that inbound puts still being checked will write to: it
/// starts once the put numbered `after` is stored, so a node reads what it
/// was sent before the get (the worker takes puts in order).
struct DeferredGet {
    after: u64,
    key: Vec<u8>,
    latest: bool,
    budget: Duration,
    reply: Reply<Option<DhtValue>>,
}

struct PendingGet {
    latest: bool,
    acc: Option<DhtValue>,
    reply: Reply<Option<DhtValue>>,
}

pub(crate) struct Node {
    pub(crate) swarm: Swarm<Behaviour>,
    validators: Arc<RwLock<CompositeValidator>>,
    limits: RecordLimits,
    listen_addrs: Arc<RwLock<Vec<Multiaddr>>>,
    pending_puts: HashMap<QueryId, (bool, Reply<StoreOutcome>)>,
    pending_gets: HashMap<QueryId, PendingGet>,
    pending_finds: HashMap<QueryId, (PeerId, Reply<bool>)>,
    /// Per topic: each subscriber's channel and its validator (none: accepts all).
    subscriptions: HashMap<TopicHash, Vec<Subscriber>>,
    /// Messages each propagating peer may have validated and forwarded here.
    gossip_limiter: ForwardLimiter<PeerId>,
    put_limiter: ForwardLimiter<PeerId>,
    owner_limiter: ForwardLimiter<colony_schema::OwnerKey>,
    /// Decodes inbound puts and checks their signatures off this task.
    verifier: Verifier,
    verified_rx: Option<mpsc::Receiver<Verified>>,
    /// Inbound puts queued so far (the next one's number).
    puts_queued: u64,
    /// Per key, the number of the last put queued for it and not yet stored.
    unverified_keys: HashMap<Vec<u8>, u64>,
    deferred_gets: Vec<DeferredGet>,
    /// Bumped whenever a validator is added: puts checked before it are
    /// checked again before they are stored.
    validator_generation: u64,
    peers: HashMap<PeerId, PeerAddresses>,
    replication: usize,
    stats: NodeStats,
    /// Listeners that have not reported an address yet (startup only).
    pub(crate) unready_listeners: HashSet<libp2p::core::transport::ListenerId>,
    /// Peers reached during bootstrap (startup only).
    pub(crate) bootstrap_connected: usize,
    /// Dials of initial peers that failed during bootstrap (startup only).
    pub(crate) bootstrap_failed: usize,
    /// The bootstrap's own dials (startup only): only their failures count
    /// toward `bootstrap_failed`, not those of dials other behaviours make
    /// meanwhile.
    pub(crate) bootstrap_dials: HashSet<libp2p::swarm::ConnectionId>,
    /// The bootstrap lookup, while it runs.
    pub(crate) bootstrap_query: Option<QueryId>,
    /// Gets whose budget ran out (sent by their timers).
    budget_tx: mpsc::UnboundedSender<QueryId>,
    budget_rx: Option<mpsc::UnboundedReceiver<QueryId>>,
    /// Open connections and when each last answered a ping.
    liveness: HashMap<ConnectionId, (PeerId, std::time::Instant)>,
    liveness_timeout: Duration,
    /// The configured initial peers, dialed again whenever this node has no
    /// connection left (its link was cut and came back, its network changed).
    pub(crate) initial_peers: Vec<Multiaddr>,
    /// When to dial the initial peers again while disconnected, and the
    /// current backoff between such attempts.
    redial: Option<(std::time::Instant, Duration)>,
    /// Whether this node lost every connection and a routing-table refresh is
    /// due once it reconnects.
    rejoining: bool,
    /// The identity file's lock, held while the node runs.
    pub(crate) identity_lock: Option<crate::identity::IdentityLock>,
    /// Relays, hole punching, paths and AutoNAT.
    pub(crate) nat: nat::NatState,
    nat_wait_rx: Option<mpsc::UnboundedReceiver<PeerId>>,
}

/// First and largest pause between redials of the initial peers while disconnected.
const REDIAL_FIRST: Duration = Duration::from_secs(1);
const REDIAL_MAX: Duration = Duration::from_secs(30);

fn lock_read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn lock_write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The address without a trailing `/p2p/<peer id>`.
pub(crate) fn strip_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect()
}

impl Node {
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        validators: Arc<RwLock<CompositeValidator>>,
        limits: RecordLimits,
        listen_addrs: Arc<RwLock<Vec<Multiaddr>>>,
        replication: usize,
        liveness_timeout: Duration,
    ) -> Result<Self, DhtError> {
        let (budget_tx, budget_rx) = mpsc::unbounded_channel();
        let (wait_tx, wait_rx) = mpsc::unbounded_channel();
        let (verifier, verified_rx) =
            Verifier::start(validators.clone(), limits).map_err(|e| DhtError::Transport {
                reason: format!("cannot start the signature checker: {e}"),
            })?;
        Ok(Self {
            swarm,
            validators,
            limits,
            listen_addrs,
            pending_puts: HashMap::new(),
            pending_gets: HashMap::new(),
            pending_finds: HashMap::new(),
            subscriptions: HashMap::new(),
            gossip_limiter: ForwardLimiter::new(
                GOSSIP_RATE_PER_PEER,
                GOSSIP_BURST_PER_PEER,
                GOSSIP_TRACKED_PEERS,
            ),
            put_limiter: ForwardLimiter::new(
                PUT_RATE_PER_PEER,
                PUT_BURST_PER_PEER,
                GOSSIP_TRACKED_PEERS,
            ),
            owner_limiter: ForwardLimiter::new(OWNER_RATE, OWNER_BURST, GOSSIP_TRACKED_PEERS),
            verifier,
            verified_rx: Some(verified_rx),
            puts_queued: 0,
            unverified_keys: HashMap::new(),
            deferred_gets: Vec::new(),
            validator_generation: 0,
            peers: HashMap::new(),
            replication,
            stats: NodeStats::default(),
            unready_listeners: HashSet::new(),
            bootstrap_connected: 0,
            bootstrap_failed: 0,
            bootstrap_dials: HashSet::new(),
            bootstrap_query: None,
            budget_tx,
            budget_rx: Some(budget_rx),
            liveness: HashMap::new(),
            liveness_timeout,
            initial_peers: Vec::new(),
            redial: None,
            rejoining: false,
            identity_lock: None,
            nat: nat::NatState::new(wait_tx),
            nat_wait_rx: Some(wait_rx),
        })
    }

    /// Runs until every handle is dropped or `Shutdown` arrives.
    pub(crate) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut prune = tokio::time::interval(PRUNE_INTERVAL);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (Some(mut budgets), Some(mut punch_waits), Some(mut verified)) = (
            self.budget_rx.take(),
            self.nat_wait_rx.take(),
            self.verified_rx.take(),
        ) else {
            return;
        };
        let mut liveness = tokio::time::interval(self.liveness_timeout / 4);
        liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown_reply = loop {
            tokio::select! {
                _ = liveness.tick() => {
                    self.drop_silent_connections();
                    self.maintain_relays();
                }
                Some(peer) = punch_waits.recv() => self.nat_wait_spent(peer),
                Some(id) = budgets.recv() => self.on_get_budget_spent(id),
                Some(done) = verified.recv() => self.on_verified(done),
                command = commands.recv() => match command {
                    None => break None,
                    Some(Command::Shutdown { reply }) => break Some(reply),
                    Some(command) => self.on_command(command),
                },
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = prune.tick() => {
                    self.swarm.behaviour_mut().kad.store_mut().storage.prune(dht_time());
                }
            }
        };
        let peer = *self.swarm.local_peer_id();
        // Answer what is still waiting, then close every connection.
        for (_, (_, reply)) in self.pending_puts.drain() {
            let _ = reply.send(Err(DhtError::Shutdown));
        }
        for (_, pending) in self.pending_gets.drain() {
            let _ = pending.reply.send(Err(DhtError::Shutdown));
        }
        for (_, (_, reply)) in self.pending_finds.drain() {
            let _ = reply.send(Err(DhtError::Shutdown));
        }
        for deferred in self.deferred_gets.drain(..) {
            let _ = deferred.reply.send(Err(DhtError::Shutdown));
        }
        drop(self.nat);
        drop(self.swarm);
        // Release the identity file before saying the node stopped: a node
        // started right after `shutdown` returns may take it.
        drop(self.identity_lock.take());
        tracing::debug!(%peer, "DHT node stopped");
        if let Some(reply) = shutdown_reply {
            let _ = reply.send(());
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Store { record, reply } => self.start_store(record, reply),
            Command::Get {
                key,
                latest,
                budget,
                reply,
            } => self.start_get(key, latest, budget, reply),
            Command::Publish { topic, data, reply } => {
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(IdentTopic::new(topic.clone()), data)
                    .map(|_| ())
                    .map_err(|e| DhtError::PubSub {
                        topic,
                        source: PubSubError::Publish(e),
                    });
                let _ = reply.send(result);
            }
            Command::Subscribe {
                topic,
                sender,
                validator,
                reply,
            } => {
                let ident = IdentTopic::new(topic.clone());
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .subscribe(&ident)
                    .map(|_| ())
                    .map_err(|e| DhtError::PubSub {
                        topic,
                        source: PubSubError::Subscribe(e),
                    });
                if result.is_ok() {
                    // Invalid deliveries cost score on this topic; nothing else
                    // does (a quiet topic must not penalise honest peers).
                    if let Err(e) = self
                        .swarm
                        .behaviour_mut()
                        .gossipsub
                        .set_topic_params(ident.clone(), crate::behaviour::topic_score_params())
                    {
                        tracing::debug!(error = e, "gossip topic scoring not set");
                    }
                    self.subscriptions
                        .entry(ident.hash())
                        .or_default()
                        .push(Subscriber { sender, validator });
                }
                let _ = reply.send(result);
            }
            Command::PeerAddresses { peer, reply } => {
                let _ = reply.send(Ok(self.peers.get(&peer).cloned()));
            }
            Command::GossipScore { peer, reply } => {
                let _ = reply.send(Ok(self.swarm.behaviour().gossipsub.peer_score(&peer)));
            }
            Command::Revalidate => {
                self.validator_generation += 1;
                self.revalidate_local();
            }
            Command::Stats { reply } => {
                let mut stats = self.stats;
                stats.routing_table_peers = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .kbuckets()
                    .map(|b| b.num_entries())
                    .sum();
                stats.connected_peers = self.swarm.connected_peers().count();
                stats.stored_keys = self.swarm.behaviour_mut().kad.store_mut().storage.len();
                stats.relay_reservations = self.nat.relay_reservations();
                stats.relayed_connections = self.nat.relayed_connections();
                stats.hole_punches_succeeded = self.nat.hole_punches_succeeded;
                stats.hole_punches_failed = self.nat.hole_punches_failed;
                stats.circuits_served = self.nat.circuits_served;
                stats.autonat_failures = self.nat.autonat_failures;
                stats.memory_denied_connections = self
                    .swarm
                    .behaviour()
                    .memory
                    .denied
                    .load(std::sync::atomic::Ordering::Relaxed);
                let _ = reply.send(Ok(stats));
            }
            Command::FindPeer { peer, reply } => {
                let id = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
                self.pending_finds.insert(id, (peer, reply));
            }
            Command::Dial { peer, addrs, reply } => self.nat_dial(peer, addrs, reply),
            Command::PreparePath { peer, reply } => self.nat_prepare_path(peer, reply),
            Command::Paths { reply } => {
                let _ = reply.send(Ok(self.nat.history()));
            }
            Command::RelayCandidates { reply } => {
                let _ = reply.send(Ok(self.nat.relay_candidates()));
            }
            Command::RoutingTable { reply } => {
                let peers = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .kbuckets()
                    .flat_map(|b| b.iter().map(|e| *e.node.key.preimage()).collect::<Vec<_>>())
                    .collect();
                let _ = reply.send(Ok(peers));
            }
            Command::SetClientMode { client, reply } => {
                let mode = if client {
                    kad::Mode::Client
                } else {
                    kad::Mode::Server
                };
                tracing::info!(?mode, "DHT mode changed");
                self.swarm.behaviour_mut().kad.set_mode(Some(mode));
                self.nat.client = client;
                self.maintain_relays();
                let _ = reply.send(Ok(()));
            }
            Command::Shutdown { reply } => {
                // Handled by `run`; reaching here means a logic error, answer anyway.
                let _ = reply.send(());
            }
        }
    }

    fn start_store(&mut self, record: DhtRecord, reply: Reply<StoreOutcome>) {
        let now = dht_time();
        let kad = &mut self.swarm.behaviour_mut().kad;
        let accepted = kad.store_mut().storage.store(
            &record.key,
            record.subkey.as_deref(),
            &record.value,
            record.expiration,
            now,
        );
        if let Err(refusal) = accepted {
            tracing::debug!(key = %hex::encode(&record.key), ?refusal, "store lost to a newer local value");
            let _ = reply.send(Ok(StoreOutcome {
                accepted: false,
                replicas: 0,
            }));
            return;
        }
        let entry = WireEntry {
            subkey: record.subkey.map(ByteBuf::from),
            value: ByteBuf::from(record.value),
            expiration: record.expiration,
        };
        let kad_record = Record {
            key: RecordKey::new(&record.key),
            value: encode_wire(std::slice::from_ref(&entry)),
            publisher: None,
            expires: None,
        };
        match kad.put_record(kad_record, Quorum::All) {
            Ok(id) => {
                self.pending_puts.insert(id, (true, reply));
            }
            Err(e) => {
                let _ = reply.send(Err(DhtError::LocalStore(e)));
            }
        }
    }

    fn start_get(
        &mut self,
        key: Vec<u8>,
        latest: bool,
        budget: Duration,
        reply: Reply<Option<DhtValue>>,
    ) {
        if let Some(&after) = self.unverified_keys.get(&key) {
            self.deferred_gets.push(DeferredGet {
                after,
                key,
                latest,
                budget,
                reply,
            });
            return;
        }
        let local = self
            .swarm
            .behaviour_mut()
            .kad
            .store_mut()
            .storage
            .get(&key, dht_time());
        if !latest && local.is_some() {
            let _ = reply.send(Ok(local));
            return;
        }
        let id = self
            .swarm
            .behaviour_mut()
            .kad
            .get_record(RecordKey::new(&key));
        self.pending_gets.insert(
            id,
            PendingGet {
                latest,
                acc: local,
                reply,
            },
        );
        let timer = self.budget_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(budget).await;
            let _ = timer.send(id);
        });
    }

    /// Closes every connection that has not answered a ping for the liveness
    /// timeout: its peer vanished (link cut, host gone, NAT mapping lost).
    /// Requests on it fail now instead of at their own timeouts, and the
    /// peer's routes are forgotten so lookups do not dial a dead address; a
    /// peer that comes back reconnects and identify adds it again. (libp2p's
    /// ping reports only the second consecutive failure, and the second ping
    /// waits for a new substream's negotiation timeout: far too late.)
    fn drop_silent_connections(&mut self) {
        let now = std::time::Instant::now();
        let silent: Vec<(ConnectionId, PeerId)> = self
            .liveness
            .iter()
            .filter(|(_, (_, last))| now.duration_since(*last) > self.liveness_timeout)
            .map(|(c, (p, _))| (*c, *p))
            .collect();
        for (connection, peer) in silent {
            tracing::info!(%peer, timeout_s = self.liveness_timeout.as_secs_f64(), "peer stopped answering pings; dropping its connection and routes");
            self.liveness.remove(&connection);
            self.swarm.close_connection(connection);
            self.swarm.behaviour_mut().kad.remove_peer(&peer);
        }
        self.redial_if_alone(now);
    }

    /// With no connection left, dials the initial peers again (backing off
    /// from 1 s to 30 s between attempts) so a node whose link was cut finds
    /// its way back to the swarm when the link returns.
    fn redial_if_alone(&mut self, now: std::time::Instant) {
        if self.initial_peers.is_empty() || self.swarm.connected_peers().next().is_some() {
            self.redial = None;
            return;
        }
        let (at, backoff) = *self
            .redial
            .get_or_insert((now + REDIAL_FIRST, REDIAL_FIRST));
        if now < at {
            return;
        }
        if !self.rejoining {
            tracing::warn!("no connection to any peer left; dialing the initial peers again");
            self.rejoining = true;
        }
        for addr in self.initial_peers.clone() {
            if let Err(error) = self.swarm.dial(addr.clone()) {
                tracing::debug!(%addr, %error, "cannot redial initial peer");
            }
        }
        let next = (backoff * 2).min(REDIAL_MAX);
        self.redial = Some((now + backoff, next));
    }

    /// A get's budget ran out: answer with what it gathered and stop the query.
    fn on_get_budget_spent(&mut self, id: QueryId) {
        let Some(pending) = self.pending_gets.remove(&id) else {
            return;
        };
        tracing::debug!(
            ?id,
            "get answered at its budget with what replicas sent so far"
        );
        let _ = pending.reply.send(Ok(pending.acc));
        if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id) {
            query.finish();
        }
    }

    /// Decodes and validates received record bytes; returns the valid entries
    /// as a value (still signed), or `None` if nothing in it is valid.
    fn accept_entries(
        &mut self,
        source: PeerId,
        key: &[u8],
        bytes: &[u8],
        inbound: bool,
    ) -> Vec<DhtRecord> {
        let now = dht_time();
        let validators = lock_read(&self.validators).clone();
        let mut rejected = 0;
        let checked = self
            .limits
            .check_wire(&validators, key, bytes, now, |record, error| {
                rejected += 1;
                log_rejection(source, record, error, inbound);
            });
        let accepted = match checked {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%source, key = %hex::encode(key), %error, inbound, "dropping malformed record");
                self.count_rejection(inbound, 1);
                return Vec::new();
            }
        };
        self.count_rejection(inbound, rejected);
        accepted
    }

    /// Runs every stored entry through the current validators and drops
    /// those they refuse: entries stored before a validator was added
    /// (another application's key squatted before this one started) must not
    /// be served to readers, nor merged into this node's own reads.
    fn revalidate_local(&mut self) {
        let now = dht_time();
        let validators = lock_read(&self.validators).clone();
        let limits = self.limits;
        let mut dropped = 0u64;
        self.swarm
            .behaviour_mut()
            .kad
            .store_mut()
            .storage
            .retain_entries(|key, subkey, value, expiration| {
                let record = DhtRecord {
                    key: key.to_vec(),
                    subkey: subkey.map(<[u8]>::to_vec),
                    value: value.to_vec(),
                    expiration,
                };
                let ok = limits.check(&validators, &record, now).is_ok();
                dropped += u64::from(!ok);
                ok
            });
        if dropped > 0 {
            tracing::info!(
                dropped,
                "dropped stored entries that a validator added since refuses"
            );
            self.stats.rejected_inbound += dropped;
        }
    }

    fn count_rejection(&mut self, inbound: bool, n: u64) {
        if inbound {
            self.stats.rejected_inbound += n;
        } else {
            self.stats.rejected_on_read += n;
        }
    }

    fn on_inbound_put(&mut self, source: PeerId, record: Record) {
        if !self.put_limiter.allow(&source, std::time::Instant::now()) {
            self.stats.rate_limited_puts += 1;
            if self.stats.rate_limited_puts.is_power_of_two() {
                tracing::warn!(%source, dropped = self.stats.rate_limited_puts, "put rate limit: dropping puts");
            }
            return;
        }
        let key = record.key.to_vec();
        let seq = self.puts_queued;
        match self.verifier.submit(
            seq,
            source,
            key.clone(),
            record.value,
            self.validator_generation,
        ) {
            Ok(()) => {
                self.puts_queued += 1;
                self.unverified_keys.insert(key, seq);
            }
            Err(refused) => {
                self.stats.unverified_puts_dropped += 1;
                if refused == Refused::Stopped
                    || self.stats.unverified_puts_dropped.is_power_of_two()
                {
                    tracing::warn!(%source, ?refused, dropped = self.stats.unverified_puts_dropped, "signature checker busy: dropping puts unread");
                }
            }
        }
    }

    /// Stores what the worker accepted of one put, then starts the gets that
    /// waited for it.
    fn on_verified(&mut self, done: Verified) {
        self.stats.rejected_inbound += done.rejected;
        if self.unverified_keys.get(&done.key) == Some(&done.seq) {
            self.unverified_keys.remove(&done.key);
        }
        let mut accepted = done.accepted;
        if done.generation != self.validator_generation {
            // A validator was added after the put arrived.
            let validators = lock_read(&self.validators).clone();
            let now = dht_time();
            let limits = self.limits;
            let before = accepted.len();
            accepted.retain(|r| match limits.check(&validators, r, now) {
                Ok(()) => true,
                Err(error) => {
                    log_rejection(done.source, r, &error, true);
                    false
                }
            });
            self.stats.rejected_inbound += (before - accepted.len()) as u64;
        }
        // Signatures checked: the owner limit cannot be spent in another's name.
        let at = std::time::Instant::now();
        let before = accepted.len();
        accepted.retain(|r| {
            crate::signature::Ed25519SignatureValidator::record_owner(r)
                .is_none_or(|owner| self.owner_limiter.allow(&owner, at))
        });
        let limited = (before - accepted.len()) as u64;
        if limited > 0 {
            let was = self.stats.owner_rate_limited_entries;
            self.stats.owner_rate_limited_entries += limited;
            if (was + limited).ilog2() != was.checked_ilog2().unwrap_or(u32::MAX) {
                tracing::warn!(source = %done.source, dropped = was + limited, "owner rate limit: dropping entries");
            }
        }
        let now = dht_time();
        let storage = &mut self.swarm.behaviour_mut().kad.store_mut().storage;
        for r in accepted {
            if let Err(refusal) =
                storage.store(&r.key, r.subkey.as_deref(), &r.value, r.expiration, now)
            {
                tracing::debug!(source = %done.source, key = %hex::encode(&r.key), ?refusal, "inbound record not stored");
            }
        }
        if self.deferred_gets.iter().any(|d| d.after <= done.seq) {
            let (ready, waiting) = std::mem::take(&mut self.deferred_gets)
                .into_iter()
                .partition::<Vec<_>, _>(|d| d.after <= done.seq);
            self.deferred_gets = waiting;
            for d in ready {
                self.start_get(d.key, d.latest, d.budget, d.reply);
            }
        }
    }

    fn on_found_record(&mut self, id: QueryId, peer: Option<PeerId>, record: Record) {
        // The local copy was merged when the get started.
        let Some(source) = peer else { return };
        if !self.pending_gets.contains_key(&id) {
            return;
        }
        let key = record.key.to_vec();
        let accepted = self.accept_entries(source, &key, &record.value, false);
        let Some(pending) = self.pending_gets.get_mut(&id) else {
            return;
        };
        for r in accepted {
            let value = match r.subkey {
                None => DhtValue::Regular {
                    value: r.value,
                    expiration: r.expiration,
                },
                Some(subkey) => DhtValue::Dictionary(
                    [(
                        subkey,
                        ValueWithExpiration {
                            value: r.value,
                            expiration: r.expiration,
                        },
                    )]
                    .into(),
                ),
            };
            merge_values(&mut pending.acc, value, self.limits.owner_caps);
        }
        if !pending.latest && pending.acc.is_some() {
            if let Some(pending) = self.pending_gets.remove(&id) {
                let _ = pending.reply.send(Ok(pending.acc));
            }
            if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                query.finish();
            }
        }
    }

    fn finish_get(&mut self, id: QueryId) {
        if let Some(pending) = self.pending_gets.remove(&id) {
            let _ = pending.reply.send(Ok(pending.acc));
        }
    }

    pub(crate) fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                let serves_dht = info.protocols.contains(&KAD_PROTOCOL);
                let listen: Vec<Multiaddr> = info
                    .listen_addrs
                    .into_iter()
                    .filter(|a| !is_unspecified(a))
                    .collect();
                if serves_dht {
                    for addr in &listen {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, addr.clone());
                    }
                } else {
                    // It stopped serving the DHT (switched to client mode
                    // behind NAT): its addresses would only stall lookups.
                    self.swarm.behaviour_mut().kad.remove_peer(&peer_id);
                }
                let entry = self.peers.entry(peer_id).or_default();
                entry.listen = listen;
                entry.agent_version = Some(info.agent_version);
                self.nat_identified(peer_id, &info.protocols);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(event)) => self.on_dcutr_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(event)) => {
                self.on_relay_client_event(event);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Relay(event)) => {
                self.on_relay_server_event(event)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(event)) => self.on_autonat_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(libp2p::ping::Event {
                connection,
                result,
                peer,
            })) => match result {
                Ok(_) => {
                    if let Some(entry) = self.liveness.get_mut(&connection) {
                        entry.1 = std::time::Instant::now();
                    }
                }
                Err(libp2p::ping::Failure::Unsupported) => {
                    tracing::debug!(%peer, "peer does not answer pings; its liveness is not checked");
                    self.liveness.remove(&connection);
                }
                Err(error) => tracing::debug!(%peer, %error, "ping failed"),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => self.on_gossip(propagation_source, &message_id, message),
            SwarmEvent::Behaviour(_) => {}
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                self.unready_listeners.remove(&listener_id);
                if self.nat_listen_addr(&address, true) {
                    return;
                }
                let full = address
                    .clone()
                    .with_p2p(*self.swarm.local_peer_id())
                    .unwrap_or_else(|a| a);
                tracing::info!(address = %full, "listening");
                lock_write(&self.listen_addrs).push(full);
                if self.nat.listen_is_external && !is_unspecified(&address) {
                    // A relay hands its external addresses to the peers it
                    // holds reservations for; without an announced one, its
                    // listen addresses are what others dial.
                    self.swarm.add_external_address(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                if self.nat_listen_addr(&address, false) {
                    return;
                }
                let full = address
                    .with_p2p(*self.swarm.local_peer_id())
                    .unwrap_or_else(|a| a);
                lock_write(&self.listen_addrs).retain(|a| a != &full);
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                addresses,
            } => {
                // A listener removed on purpose (a relay left) reports its
                // addresses here rather than as expired ones.
                for address in &addresses {
                    self.nat_listen_addr(address, false);
                }
                self.nat_listener_closed(listener_id, reason.err());
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                connection_id,
                ..
            } => {
                self.bootstrap_connected += 1;
                self.liveness
                    .insert(connection_id, (peer_id, std::time::Instant::now()));
                if std::mem::take(&mut self.rejoining) {
                    tracing::info!(%peer_id, "reconnected to the swarm; refreshing routes");
                    let own = *self.swarm.local_peer_id();
                    self.swarm.behaviour_mut().kad.get_closest_peers(own);
                }
                self.nat_connection_established(peer_id, connection_id, &endpoint);
                let remote = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => address.clone(),
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr.clone(),
                };
                let entry = self.peers.entry(peer_id).or_default();
                let remote = strip_p2p(&remote);
                if !entry.connected.contains(&remote) {
                    entry.connected.push(remote);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                endpoint,
                num_established,
                connection_id,
                cause,
            } => {
                self.liveness.remove(&connection_id);
                self.nat_connection_closed(peer_id, connection_id, &endpoint, cause.as_ref());
                if num_established == 0 {
                    self.peers.remove(&peer_id);
                } else if let Some(entry) = self.peers.get_mut(&peer_id) {
                    let remote = strip_p2p(endpoint.get_remote_address());
                    entry.connected.retain(|a| a != &remote);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id,
                error,
                connection_id,
            } => {
                if self.bootstrap_dials.remove(&connection_id) {
                    self.bootstrap_failed += 1;
                    tracing::warn!(?peer_id, %error, "could not reach an initial peer");
                }
                tracing::debug!(?peer_id, %error, "dial failed");
                if let Some(peer) = peer_id {
                    self.nat_dial_failed(peer, &error);
                }
            }
            SwarmEvent::ListenerError { error, .. } => tracing::warn!(%error, "listener error"),
            _ => {}
        }
    }

    /// Validates a gossip message for its subscribers (the rate limit per
    /// propagating peer first, then each subscriber's validator), reports the
    /// verdict to gossipsub (only accepted messages are forwarded; rejected ones
    /// cost the propagating peer score) and delivers it to the subscribers that
    /// accepted it.
    fn on_gossip(
        &mut self,
        propagation_source: PeerId,
        message_id: &gossipsub::MessageId,
        message: gossipsub::Message,
    ) {
        let verdict = self.deliver_gossip(propagation_source, message);
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(message_id, &propagation_source, verdict);
    }

    fn deliver_gossip(
        &mut self,
        propagation_source: PeerId,
        message: gossipsub::Message,
    ) -> gossipsub::MessageAcceptance {
        use gossipsub::MessageAcceptance;
        if !self
            .gossip_limiter
            .allow(&propagation_source, std::time::Instant::now())
        {
            tracing::debug!(peer = %propagation_source, "gossip rate limit: message ignored");
            return MessageAcceptance::Ignore;
        }
        let Some(subscribers) = self.subscriptions.get_mut(&message.topic) else {
            return MessageAcceptance::Ignore;
        };
        let msg = GossipMessage {
            topic: message.topic.as_str().to_owned(),
            source: message.source,
            data: message.data,
        };
        let mut accepted = false;
        subscribers.retain(|s| {
            if s.validator.as_ref().is_some_and(|valid| !valid(&msg)) {
                return !s.sender.is_closed();
            }
            accepted = true;
            match s.sender.try_send(msg.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(topic = %msg.topic, "subscriber is full; message dropped");
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        if subscribers.is_empty() {
            let topic = message.topic;
            self.subscriptions.remove(&topic);
            self.swarm
                .behaviour_mut()
                .gossipsub
                .unsubscribe(&IdentTopic::new(topic.into_string()));
        }
        if accepted {
            MessageAcceptance::Accept
        } else {
            tracing::debug!(
                peer = %propagation_source,
                source = ?msg.source,
                topic = %msg.topic,
                "gossip message rejected by its subscribers' validation"
            );
            MessageAcceptance::Reject
        }
    }

    fn on_kad_event(&mut self, event: kad::Event) {
        match event {
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::PutRecord {
                        source,
                        record: Some(record),
                        ..
                    },
            } => self.on_inbound_put(source, record),
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => match result {
                QueryResult::GetRecord(Ok(GetRecordOk::FoundRecord(found))) => {
                    self.on_found_record(id, found.peer, found.record);
                    if step.last {
                        self.finish_get(id);
                    }
                }
                QueryResult::GetRecord(_) => self.finish_get(id),
                QueryResult::PutRecord(result) => {
                    let replicas = match &result {
                        Ok(_) => self.replication,
                        Err(PutRecordError::QuorumFailed { success, .. })
                        | Err(PutRecordError::Timeout { success, .. }) => success.len(),
                    };
                    if let Some((accepted, reply)) = self.pending_puts.remove(&id) {
                        let _ = reply.send(Ok(StoreOutcome { accepted, replicas }));
                    }
                }
                QueryResult::GetClosestPeers(result) if self.pending_finds.contains_key(&id) => {
                    let peers = match result {
                        Ok(ok) => ok.peers,
                        Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                    };
                    if let Some((wanted, reply)) = self.pending_finds.remove(&id) {
                        let found = peers.into_iter().find(|p| p.peer_id == wanted);
                        // Put the addresses where the dialer looks for them:
                        // the routing table (kad answers the swarm's address
                        // requests from it).
                        let kad = &mut self.swarm.behaviour_mut().kad;
                        let known = found.is_some_and(|info| {
                            info.addrs.into_iter().fold(false, |ok, addr| {
                                let update = kad.add_address(&wanted, addr);
                                ok || matches!(update, kad::RoutingUpdate::Success)
                            })
                        }) || self.swarm.is_connected(&wanted);
                        let _ = reply.send(Ok(known));
                    }
                }
                QueryResult::GetClosestPeers(_) | QueryResult::Bootstrap(_)
                    if self.bootstrap_query == Some(id) && step.last =>
                {
                    self.bootstrap_query = None;
                }
                _ => {}
            },
            _ => {}
        }
    }
}

fn is_unspecified(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}
