//! The [`Dht`] handle.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use colony_schema::OwnerKey;
use futures::StreamExt;
use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol, multiaddr::Protocol};
use tokio::sync::{mpsc, oneshot};

use crate::{
    behaviour::build_swarm,
    config::DhtConfig,
    error::{DhtError, PubSubError},
    gossip::GossipValidator,
    identity::{LoadedIdentity, load_identity},
    node::{Command, GossipMessage, Node, NodeStats, PeerAddresses, strip_p2p},
    record::DhtRecord,
    signature::Ed25519SignatureValidator,
    streams::{InboundRegistry, InboundStreamQueue},
    time::dht_time,
    validation::{CompositeValidator, RecordLimits, RecordValidator},
    value::{DhtValue, StoreOutcome, ValueWithExpiration},
};

mod presence;
mod reach;
pub use presence::{IdentityConflict, presence_key};
pub use reach::relay_addrs_key;

/// Extra time a handle waits beyond the kad query timeout for the node's answer.
const REPLY_MARGIN: Duration = Duration::from_secs(2);
/// Deadline for local-only requests to the node task.
const LOCAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `shutdown` spends withdrawing this node's relay circuits before
/// it stops the node.
const SHUTDOWN_WITHDRAW: Duration = Duration::from_secs(1);

struct Inner {
    commands: mpsc::Sender<Command>,
    peer_id: PeerId,
    public_key: [u8; 32],
    client_mode: std::sync::atomic::AtomicBool,
    listen_addrs: Arc<RwLock<Vec<Multiaddr>>>,
    /// Circuits through relays this node listens on (client mode).
    relay_addrs: Arc<RwLock<Vec<Multiaddr>>>,
    /// Own addresses AutoNAT confirmed.
    confirmed_addrs: Arc<RwLock<Vec<Multiaddr>>>,
    /// Relays whose circuits failed lately (dials avoid them if they can).
    suspect_relays: Arc<RwLock<std::collections::HashSet<PeerId>>>,
    /// Changes whenever `relay_addrs` does.
    relay_addrs_changed: tokio::sync::watch::Receiver<u64>,
    /// The configured external addresses, each with `/p2p/<peer id>`.
    announce_addrs: Vec<Multiaddr>,
    validators: Arc<RwLock<CompositeValidator>>,
    limits: RecordLimits,
    control: libp2p_stream::Control,
    inbound: InboundRegistry,
    query_timeout: Duration,
    max_gossip_size: usize,
    subscription_capacity: usize,
    /// This process's presence record (instance id, start time).
    own: presence::Own,
    /// A second node seen with this identity.
    identity_conflict: tokio::sync::watch::Sender<Option<IdentityConflict>>,
    /// Signs with the identity key, for protocols above the DHT.
    peer_signer: crate::owner::PeerSigner,
}

/// A cloneable handle to one DHT node: a background task owning a libp2p swarm
/// (Kademlia with signed, expiring records and subkeys; gossipsub; identify;
/// streams for other protocols).
///
/// Dropping the last handle, or calling [`shutdown`](Self::shutdown), stops the
/// node. All methods are cancel safe: dropping a returned future abandons the
/// wait, and a store already handed to the node still completes.
#[derive(Clone)]
pub struct Dht {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Dht {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dht")
            .field("peer_id", &self.inner.peer_id)
            .field("client_mode", &self.is_client())
            .finish_non_exhaustive()
    }
}

fn read<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

impl Dht {
    /// Starts a node: builds the swarm, listens, dials the initial peers and
    /// runs a lookup of its own id, then spawns the node task.
    ///
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`DhtError::Config`], [`DhtError::Identity`], [`DhtError::Listen`],
    /// [`DhtError::Transport`], or [`DhtError::Bootstrap`] when initial peers
    /// are given, none answers within `bootstrap_timeout`, and
    /// `ensure_bootstrap` is set.
    pub async fn new(config: DhtConfig) -> Result<Self, DhtError> {
        config.validate()?;
        let LoadedIdentity {
            keypair,
            secret,
            lock: identity_lock,
        } = load_identity(&config.identity)?;
        let peer_signer = crate::owner::PeerSigner::from_secret(secret);
        let signer = Ed25519SignatureValidator::new(&secret);
        let public_key = *signer.owner().as_bytes();
        let mut composite = CompositeValidator::new();
        composite.extend(Arc::new(signer));
        if let Some(peers) = &config.allowed_peers {
            composite.extend(Arc::new(crate::admission::AllowedOwners::new(
                peers.iter().copied(),
            )));
        }
        let validators = Arc::new(RwLock::new(composite));
        let limits = RecordLimits::from_config(&config);
        let inbound = InboundRegistry::default();
        let swarm = build_swarm(&config, keypair, inbound.clone())?;
        let peer_id = *swarm.local_peer_id();
        let control = swarm.behaviour().stream.new_control();
        let listen_addrs = Arc::new(RwLock::new(Vec::new()));
        let mut node = Node::new(
            swarm,
            validators.clone(),
            limits,
            listen_addrs.clone(),
            config.replication,
            config.liveness_timeout,
        )?;
        // The node task holds the identity file's lock: it is released when
        // the node stops (shutdown, or the last handle dropped).
        node.identity_lock = identity_lock;
        node.nat.max_relays = config.max_relays;
        node.nat.hole_punch_wait = config.hole_punch_wait;
        // A client that listens nowhere has no other way in than a relay; one
        // that listens may only be waiting to learn whether it is reachable,
        // and asks relays once `set_client_mode(true)` says it is not.
        node.nat.client = config.client_mode && config.listen_addrs.is_empty();
        node.nat.listen_is_external =
            config.relay_server.is_some() && config.announce_addrs.is_empty();
        if let Some(relay) = node.swarm.behaviour_mut().relay.as_mut() {
            // Serve even before any address is confirmed: the operator asked.
            relay.set_status(Some(libp2p::relay::Status::Enable));
        }
        let relay_addrs = node.nat.relay_addrs.clone();
        let confirmed_addrs = node.nat.confirmed_addrs.clone();
        let suspect_relays = node.nat.suspect_relays.clone();
        let relay_addrs_changed = node.nat.relay_addrs_changed.subscribe();
        for a in &config.announce_addrs {
            if let Some(other) = a.iter().find_map(|p| match p {
                Protocol::P2p(id) if id != peer_id => Some(id),
                _ => None,
            }) {
                return Err(DhtError::Config {
                    field: "announce_addrs",
                    reason: format!("{a}: names peer {other}, but this node is {peer_id}"),
                });
            }
        }
        let announce_addrs: Vec<Multiaddr> = config
            .announce_addrs
            .iter()
            .map(|a| {
                let bare = strip_p2p(a);
                node.swarm.add_external_address(bare.clone());
                bare.with_p2p(peer_id).unwrap_or_else(|a| a)
            })
            .collect();
        start(&mut node, &config).await?;
        let (commands, receiver) = mpsc::channel(config.command_capacity);
        tokio::spawn(node.run(receiver));
        if let Some(streams) = inbound.accept(crate::dialback::DIALBACK_PROTOCOL, 16, 2) {
            crate::dialback::serve(streams, commands.downgrade());
        }
        let dht = Self {
            inner: Arc::new(Inner {
                commands,
                peer_id,
                public_key,
                client_mode: std::sync::atomic::AtomicBool::new(config.client_mode),
                listen_addrs,
                relay_addrs,
                confirmed_addrs,
                suspect_relays,
                relay_addrs_changed: relay_addrs_changed.clone(),
                announce_addrs,
                validators,
                limits,
                control,
                inbound,
                query_timeout: config.query_timeout,
                max_gossip_size: config.max_gossip_size,
                subscription_capacity: config.subscription_capacity,
                own: presence::Own::new(),
                identity_conflict: tokio::sync::watch::Sender::new(None),
                peer_signer,
            }),
        };
        if config.max_relays > 0 {
            reach::publish_relay_addrs(Arc::downgrade(&dht.inner), relay_addrs_changed);
        }
        if !config.identity_check_interval.is_zero() {
            let seed = dht.inner.own.instance;
            presence::watch_presence(
                Arc::downgrade(&dht.inner),
                config.identity_check_interval,
                seed,
            );
        }
        Ok(dht)
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// A signer with this node's identity key (see
    /// [`PeerSigner`](crate::PeerSigner)), for protocols that need their
    /// messages bound to this peer id.
    pub fn signer(&self) -> crate::owner::PeerSigner {
        self.inner.peer_signer.clone()
    }

    /// This node's ed25519 public key (the libp2p identity key).
    pub fn public_key(&self) -> [u8; 32] {
        self.inner.public_key
    }

    /// This node's owner marker `[owner:ed25519:<hex>]`: use it as (part of) a
    /// subkey or key, and the node signs the record so that nobody else can
    /// overwrite it.
    pub fn owner_subkey(&self) -> Vec<u8> {
        OwnerKey::from_bytes(self.inner.public_key).marker()
    }

    /// Whether this node runs in client mode.
    pub fn is_client(&self) -> bool {
        self.inner
            .client_mode
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The addresses this node listens on, each with a `/p2p/<peer id>` suffix
    /// (empty for a client that listens nowhere).
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        read(&self.inner.listen_addrs)
    }

    /// The external addresses this node was told to announce
    /// ([`DhtConfig::announce_addrs`]), each with `/p2p/<peer id>`.
    pub fn announce_addrs(&self) -> Vec<Multiaddr> {
        self.inner.announce_addrs.clone()
    }

    /// The addresses other peers should dial: the announced ones if any,
    /// else the listen addresses.
    pub fn advertised_addrs(&self) -> Vec<Multiaddr> {
        if self.inner.announce_addrs.is_empty() {
            self.listen_addrs()
        } else {
            self.inner.announce_addrs.clone()
        }
    }

    /// Adds a validator to this node's pipeline (merged into an existing one of
    /// its kind when [`RecordValidator::merge_with`] says so). It applies to
    /// records stored, received and read from now on, and to those this node
    /// already stores (the ones it refuses are dropped).
    pub fn add_validator(&self, validator: Arc<dyn RecordValidator>) {
        self.inner
            .validators
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(validator);
        // Entries stored before must pass it too (see Node::revalidate_local).
        if self.inner.commands.try_send(Command::Revalidate).is_err() {
            tracing::warn!(
                "command queue full: entries stored before the new validator are checked when read"
            );
        }
    }

    async fn request<T>(
        &self,
        operation: &'static str,
        timeout: Duration,
        make: impl FnOnce(oneshot::Sender<Result<T, DhtError>>) -> Command,
    ) -> Result<T, DhtError> {
        let (tx, rx) = oneshot::channel();
        let wait = async {
            self.inner
                .commands
                .send(make(tx))
                .await
                .map_err(|_| DhtError::Shutdown)?;
            rx.await.map_err(|_| DhtError::Shutdown)?
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| DhtError::Timeout {
                operation,
                timeout_s: timeout.as_secs_f64(),
            })?
    }

    /// Stores `value` (MessagePack bytes) under `key`, or under `key`/`subkey`
    /// in a dictionary, until `expiration` (absolute [`dht_time`]).
    ///
    /// The value is signed when the key or subkey names this node as owner
    /// (see [`owner_subkey`](Self::owner_subkey)), checked by this node's own
    /// validators, merged into local storage, and put to the `replication`
    /// closest nodes. Storing nil (`[0xc0]`) with a later expiration withdraws a
    /// subkey.
    ///
    /// # Errors
    ///
    /// [`DhtError::Rejected`] when the record fails this node's checks (bad
    /// expiration, oversized value, foreign owner, schema), [`DhtError::Timeout`],
    /// [`DhtError::Shutdown`].
    pub async fn store(
        &self,
        key: &[u8],
        subkey: Option<&[u8]>,
        value: Vec<u8>,
        expiration: f64,
    ) -> Result<StoreOutcome, DhtError> {
        let mut record = DhtRecord {
            key: key.to_vec(),
            subkey: subkey.map(<[u8]>::to_vec),
            value,
            expiration,
        };
        {
            let validators = read(&self.inner.validators);
            record.value = validators.sign_value(&record)?;
            self.inner.limits.check(&validators, &record, dht_time())?;
        }
        let timeout = self.inner.query_timeout + REPLY_MARGIN;
        self.request("store", timeout, |reply| Command::Store { record, reply })
            .await
    }

    /// Finds the value under `key`.
    ///
    /// With `latest = false` the first valid value found (locally or on the
    /// first replica that answers) is returned; with `latest = true` the
    /// lookup visits the `replication` closest nodes and merges what they all
    /// hold (later expiration wins; dictionaries merge per subkey). Every
    /// received entry is validated; invalid ones are dropped with a warning.
    /// Values are returned stripped of signatures; expired ones never.
    ///
    /// # Errors
    ///
    /// [`DhtError::Timeout`], [`DhtError::Shutdown`]. A key nobody holds is `Ok(None)`.
    pub async fn get(&self, key: &[u8], latest: bool) -> Result<Option<DhtValue>, DhtError> {
        self.get_within(key, latest, self.inner.query_timeout).await
    }

    /// As [`get`](Self::get), but answers within `budget` with what has been
    /// gathered by then (the local copy merged with every replica that
    /// answered), instead of waiting for replicas that do not answer. A
    /// replica that has vanished from the network (its link cut, its host
    /// gone) holds a `latest` lookup until the query timeout otherwise.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get).
    pub async fn get_within(
        &self,
        key: &[u8],
        latest: bool,
        budget: Duration,
    ) -> Result<Option<DhtValue>, DhtError> {
        let budget = budget.min(self.inner.query_timeout);
        let timeout = budget + REPLY_MARGIN;
        let key_vec = key.to_vec();
        let found = self
            .request("get", timeout, |reply| Command::Get {
                key: key_vec,
                latest,
                budget,
                reply,
            })
            .await?;
        let validators = read(&self.inner.validators);
        let now = dht_time();
        let strip = |subkey: Option<&[u8]>, value: Vec<u8>, expiration: f64| {
            validators.strip_value(&DhtRecord {
                key: key.to_vec(),
                subkey: subkey.map(<[u8]>::to_vec),
                value,
                expiration,
            })
        };
        Ok(match found {
            Some(DhtValue::Regular { value, expiration }) if expiration > now => {
                Some(DhtValue::Regular {
                    value: strip(None, value, expiration),
                    expiration,
                })
            }
            Some(DhtValue::Dictionary(d)) => {
                let live: std::collections::BTreeMap<_, _> = d
                    .into_iter()
                    .filter(|(_, v)| v.expiration > now)
                    .map(|(k, v)| {
                        let value = strip(Some(&k), v.value, v.expiration);
                        (
                            k,
                            ValueWithExpiration {
                                value,
                                expiration: v.expiration,
                            },
                        )
                    })
                    .collect();
                (!live.is_empty()).then_some(DhtValue::Dictionary(live))
            }
            _ => None,
        })
    }

    /// Publishes `data` on a gossipsub topic (signed by this node).
    ///
    /// # Errors
    ///
    /// [`DhtError::PubSub`] when the message is over `max_gossip_size` or no
    /// connected peer is subscribed to the topic; [`DhtError::Shutdown`].
    pub async fn publish(&self, topic: &str, data: Vec<u8>) -> Result<(), DhtError> {
        if data.len() > self.inner.max_gossip_size {
            return Err(DhtError::PubSub {
                topic: topic.to_owned(),
                source: PubSubError::TooLarge {
                    size: data.len(),
                    limit: self.inner.max_gossip_size,
                },
            });
        }
        let topic = topic.to_owned();
        self.request("publish", LOCAL_TIMEOUT, |reply| Command::Publish {
            topic,
            data,
            reply,
        })
        .await
    }

    /// Subscribes to a gossipsub topic. Messages arrive on the returned bounded
    /// receiver (capacity `subscription_capacity`; when it is full new messages
    /// are dropped with a warning). Drop the receiver to unsubscribe.
    ///
    /// # Errors
    ///
    /// [`DhtError::PubSub`], [`DhtError::Shutdown`].
    pub async fn subscribe(&self, topic: &str) -> Result<mpsc::Receiver<GossipMessage>, DhtError> {
        self.subscribe_inner(topic, None).await
    }

    /// Like [`subscribe`](Self::subscribe), with an application validator run
    /// on this node before a message is delivered or forwarded: a message it
    /// rejects is neither delivered nor forwarded, and the peer that propagated
    /// it loses gossipsub score (a peer that keeps pushing junk is pruned from
    /// the mesh). The validator runs on the node's task: keep it cheap (decode
    /// and compare, no I/O).
    ///
    /// # Errors
    ///
    /// [`DhtError::PubSub`], [`DhtError::Shutdown`].
    pub async fn subscribe_validated(
        &self,
        topic: &str,
        validator: GossipValidator,
    ) -> Result<mpsc::Receiver<GossipMessage>, DhtError> {
        self.subscribe_inner(topic, Some(validator)).await
    }

    async fn subscribe_inner(
        &self,
        topic: &str,
        validator: Option<GossipValidator>,
    ) -> Result<mpsc::Receiver<GossipMessage>, DhtError> {
        let (sender, receiver) = mpsc::channel(self.inner.subscription_capacity);
        let topic = topic.to_owned();
        self.request("subscribe", LOCAL_TIMEOUT, |reply| Command::Subscribe {
            topic,
            sender,
            validator,
            reply,
        })
        .await?;
        Ok(receiver)
    }

    /// Switches this node between server mode (it serves the DHT to others)
    /// and client mode (it stores and reads through servers, never enters
    /// routing tables), e.g. once a dial-back shows nobody can reach it.
    ///
    /// # Errors
    ///
    /// [`DhtError::Shutdown`] if the node stopped.
    pub async fn set_client_mode(&self, client: bool) -> Result<(), DhtError> {
        self.request("set_client_mode", LOCAL_TIMEOUT, |reply| {
            Command::SetClientMode { client, reply }
        })
        .await?;
        self.inner
            .client_mode
            .store(client, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Asks `peer` to dial this node back on TCP `ports` (at most
    /// [`MAX_PORTS`](crate::MAX_PORTS)) at the IP this node's connection
    /// comes from as `peer` sees it, and says which answered: whether others
    /// can reach this node's DHT and data-plane ports, and its address as the
    /// outside sees it (a NAT's public IP for a peer behind one). The peer
    /// can lie; ask several.
    ///
    /// # Errors
    ///
    /// [`DhtError::DialBack`] for a failed or malformed exchange, the errors
    /// of [`open_stream`](Self::open_stream), [`DhtError::Timeout`].
    pub async fn dial_back(
        &self,
        peer: PeerId,
        ports: &[u16],
    ) -> Result<crate::dialback::DialBack, DhtError> {
        let stream = self
            .open_stream(peer, crate::dialback::DIALBACK_PROTOCOL)
            .await?;
        let limit = crate::dialback::DIAL_TIMEOUT * 3;
        tokio::time::timeout(limit, crate::dialback::ask(peer, stream, ports))
            .await
            .map_err(|_| DhtError::Timeout {
                operation: "dial_back",
                timeout_s: limit.as_secs_f64(),
            })?
    }

    /// Opens a stream to `peer` for `protocol`, dialing it first if needed
    /// with the addresses the routing table knows; if there are none, the
    /// peer is looked up in the DHT (Kademlia FIND_NODE) and dialed.
    ///
    /// # Errors
    ///
    /// [`DhtError::Stream`] if the peer cannot be reached or does not speak
    /// `protocol`, [`DhtError::PeerNotFound`] if it is not connected and a DHT
    /// lookup does not find it; [`DhtError::Timeout`] after twice the query timeout.
    pub async fn open_stream(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<Stream, DhtError> {
        let timeout = self.inner.query_timeout;
        let attempt = async {
            let mut control = self.inner.control.clone();
            let open = |mut control: libp2p_stream::Control, protocol| async move {
                control
                    .open_stream(peer, protocol)
                    .await
                    .map_err(|source| DhtError::Stream { peer, source })
            };
            // Connected: a peer reached only through a relay first gets its
            // hole punch a moment, so the stream takes the direct path.
            if self.path_to(peer).await?.is_some() {
                return open(control, protocol).await;
            }
            match control.open_stream(peer, protocol.clone()).await {
                Ok(stream) => Ok(stream),
                // Not connected, and no known address answered. A peer
                // behind NAT publishes the relay circuits it listens on:
                // its own addresses are private, so those come first; else
                // look the peer up in the DHT (FIND_NODE).
                Err(libp2p_stream::OpenStreamError::Io(first)) => {
                    if self.connect_through_relays(peer).await? {
                        return open(control, protocol).await;
                    }
                    let found = self
                        .request("find_peer", timeout, |reply| Command::FindPeer {
                            peer,
                            reply,
                        })
                        .await?;
                    if !found {
                        return Err(DhtError::PeerNotFound {
                            peer,
                            source: libp2p_stream::OpenStreamError::Io(first),
                        });
                    }
                    open(control, protocol).await
                }
                Err(source) => Err(DhtError::Stream { peer, source }),
            }
        };
        tokio::time::timeout(timeout * 2, attempt)
            .await
            .map_err(|_| DhtError::Timeout {
                operation: "open_stream",
                timeout_s: (timeout * 2).as_secs_f64(),
            })?
    }

    /// Accepts inbound streams for `protocol`: they arrive on the returned
    /// receiver, which holds up to `capacity` (at least 1) streams not yet
    /// received. The connection tasks deliver into it directly, so a burst of
    /// up to `capacity` streams from any number of peers is kept even while
    /// the receiving task is starved of CPU; a stream arriving while it is
    /// full is dropped (reset, which the opener sees as an error on its first
    /// write or an early end of stream) with a warning. Drop the receiver to
    /// stop accepting; the protocol can then be accepted again.
    ///
    /// # Errors
    ///
    /// [`DhtError::AlreadyRegistered`] if the protocol already has an acceptor.
    pub fn accept_streams(
        &self,
        protocol: StreamProtocol,
        capacity: usize,
    ) -> Result<InboundStreamQueue, DhtError> {
        self.accept_streams_per_peer(protocol, capacity, capacity.div_ceil(4))
    }

    /// [`accept_streams`](Self::accept_streams) with the share of the queue
    /// one peer may hold chosen by the caller: a stream from a peer that
    /// already has `per_peer` streams waiting is dropped (reset) as one past
    /// the capacity is. `accept_streams` allows a quarter of the capacity.
    ///
    /// # Errors
    ///
    /// [`DhtError::AlreadyRegistered`] if the protocol already has an acceptor.
    pub fn accept_streams_per_peer(
        &self,
        protocol: StreamProtocol,
        capacity: usize,
        per_peer: usize,
    ) -> Result<InboundStreamQueue, DhtError> {
        self.inner
            .inbound
            .accept(protocol.clone(), capacity, per_peer)
            .ok_or_else(|| DhtError::AlreadyRegistered {
                protocol: protocol.to_string(),
            })
    }

    /// How to reach a peer this node is (or was recently) connected to: the
    /// remote addresses of open connections and the peer's announced listen
    /// addresses. `None` if the node has no connection to it.
    ///
    /// # Errors
    ///
    /// [`DhtError::Shutdown`], [`DhtError::Timeout`].
    pub async fn peer_addresses(&self, peer: PeerId) -> Result<Option<PeerAddresses>, DhtError> {
        self.request("peer_addresses", LOCAL_TIMEOUT, |reply| {
            Command::PeerAddresses { peer, reply }
        })
        .await
    }

    /// This node's gossipsub score of `peer` (`None` if it has none: not
    /// connected over gossipsub). Peers that propagate messages the topic's
    /// validator rejects go negative and are ignored below the thresholds.
    ///
    /// # Errors
    ///
    /// [`DhtError::Shutdown`], [`DhtError::Timeout`].
    pub async fn gossip_score(&self, peer: PeerId) -> Result<Option<f64>, DhtError> {
        self.request("gossip_score", LOCAL_TIMEOUT, |reply| {
            Command::GossipScore { peer, reply }
        })
        .await
    }

    /// Counters: routing table size, connections, stored keys, rejections.
    ///
    /// # Errors
    ///
    /// [`DhtError::Shutdown`], [`DhtError::Timeout`].
    pub async fn stats(&self) -> Result<NodeStats, DhtError> {
        self.request("stats", LOCAL_TIMEOUT, |reply| Command::Stats { reply })
            .await
    }

    /// The peers in this node's Kademlia routing table.
    ///
    /// # Errors
    ///
    /// [`DhtError::Shutdown`], [`DhtError::Timeout`].
    pub async fn routing_table(&self) -> Result<Vec<PeerId>, DhtError> {
        self.request("routing_table", LOCAL_TIMEOUT, |reply| {
            Command::RoutingTable { reply }
        })
        .await
    }

    /// Stops the node: pending operations fail with [`DhtError::Shutdown`],
    /// connections close. Later calls on any clone return `Shutdown`.
    /// Calling it twice is harmless.
    pub async fn shutdown(&self) {
        if !self.inner.commands.is_closed() {
            self.withdraw_relay_addrs(SHUTDOWN_WITHDRAW).await;
        }
        let (tx, rx) = oneshot::channel();
        if self
            .inner
            .commands
            .send(Command::Shutdown { reply: tx })
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(LOCAL_TIMEOUT, rx).await;
        }
    }
}

/// Listens, dials the initial peers and runs the first lookup, driving the
/// swarm in place before the node task exists.
async fn start(node: &mut Node, config: &DhtConfig) -> Result<(), DhtError> {
    let started = tokio::time::Instant::now();
    let deadline = started + config.bootstrap_timeout;
    for addr in &config.listen_addrs {
        let id = node
            .swarm
            .listen_on(addr.clone())
            .map_err(|e| DhtError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        node.unready_listeners.insert(id);
    }
    while !node.unready_listeners.is_empty() {
        let event = next_event(node, deadline)
            .await
            .ok_or_else(|| DhtError::Listen {
                addr: config
                    .listen_addrs
                    .first()
                    .cloned()
                    .unwrap_or_else(Multiaddr::empty),
                reason: "no address reported before the bootstrap timeout".into(),
            })?;
        if let libp2p::swarm::SwarmEvent::ListenerClosed {
            listener_id,
            reason: Err(e),
            ..
        } = &event
            && node.unready_listeners.contains(listener_id)
        {
            return Err(DhtError::Listen {
                addr: config
                    .listen_addrs
                    .first()
                    .cloned()
                    .unwrap_or_else(Multiaddr::empty),
                reason: e.to_string(),
            });
        }
        node.on_swarm_event(event);
    }
    let own = node.swarm.local_peer_id().to_owned();
    node.initial_peers = config
        .initial_peers
        .iter()
        .filter(|a| {
            !a.iter()
                .any(|p| matches!(p, Protocol::P2p(peer) if peer == own))
        })
        .cloned()
        .collect();
    if config.initial_peers.is_empty() {
        return Ok(());
    }
    // `fresh_port`: a redial takes a new source port. A first dial reuses
    // the listen port (so the initial peer observes the address others can
    // dial back), but a redial from it can hit that port's previous
    // connection to the same peer still in TIME_WAIT and fail again at once.
    let dial_all = |node: &mut Node, fresh_port: bool| {
        let mut tried = 0;
        for addr in &config.initial_peers {
            let peer = addr.iter().find_map(|p| match p {
                Protocol::P2p(peer) => Some(peer),
                _ => None,
            });
            if peer == Some(own) {
                continue;
            }
            tried += 1;
            if let Some(peer) = peer {
                node.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer, strip_p2p(addr));
            }
            let opts = libp2p::swarm::dial_opts::DialOpts::unknown_peer_id().address(addr.clone());
            let opts = if fresh_port {
                opts.allocate_new_port().build()
            } else {
                opts.build()
            };
            let id = opts.connection_id();
            node.bootstrap_dials.insert(id);
            if let Err(error) = node.swarm.dial(opts) {
                tracing::warn!(%addr, %error, "cannot dial initial peer");
                node.bootstrap_dials.remove(&id);
                node.bootstrap_failed += 1;
            }
        }
        tried
    };
    let mut tried = dial_all(node, false);
    let mut round = 1u32;
    let routable = |node: &mut Node| {
        node.swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .any(|b| b.num_entries() > 0)
    };
    while node.bootstrap_connected == 0 || !routable(node) {
        if node.bootstrap_failed >= tried && node.bootstrap_connected == 0 {
            // Every dial failed. An initial peer that is restarting, or a
            // connection that failed in its handshake, deserves another try
            // while the bootstrap timeout lasts: a few rounds, backing off.
            let backoff = BOOTSTRAP_RETRY * round;
            if round >= BOOTSTRAP_ROUNDS || tokio::time::Instant::now() + backoff >= deadline {
                break;
            }
            let wake = tokio::time::Instant::now() + backoff;
            while let Some(event) = next_event(node, wake).await {
                node.on_swarm_event(event);
            }
            if node.bootstrap_connected > 0 {
                continue;
            }
            tracing::info!(round, "no initial peer answered yet; dialing them again");
            round += 1;
            tried += dial_all(node, true);
            continue;
        }
        match next_event(node, deadline).await {
            Some(event) => node.on_swarm_event(event),
            None => break,
        }
    }
    if node.bootstrap_connected == 0 || !routable(node) {
        if config.ensure_bootstrap && tried > 0 {
            return Err(DhtError::Bootstrap {
                tried,
                timeout_s: config.bootstrap_timeout.as_secs_f64(),
            });
        }
        tracing::warn!(tried, "no initial peer answered; starting alone");
        return Ok(());
    }
    tracing::debug!(
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
        "connected to an initial peer"
    );
    node.bootstrap_query = Some(node.swarm.behaviour_mut().kad.get_closest_peers(own));
    while node.bootstrap_query.is_some() {
        match next_event(node, deadline).await {
            Some(event) => node.on_swarm_event(event),
            None => {
                tracing::warn!("bootstrap lookup did not finish before the timeout");
                break;
            }
        }
    }
    tracing::debug!(
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
        "bootstrap lookup done"
    );
    Ok(())
}

/// Rounds of dials to the initial peers at start-up, and the backoff
/// between them (times the round).
const BOOTSTRAP_ROUNDS: u32 = 3;
const BOOTSTRAP_RETRY: Duration = Duration::from_millis(250);

async fn next_event(
    node: &mut Node,
    deadline: tokio::time::Instant,
) -> Option<libp2p::swarm::SwarmEvent<crate::behaviour::BehaviourEvent>> {
    tokio::time::timeout_at(deadline, node.swarm.select_next_some())
        .await
        .ok()
}
