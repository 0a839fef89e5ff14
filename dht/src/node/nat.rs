//! Reaching peers behind NAT: relay reservations while this node has no
//! inbound route, hole punching (DCUtR) over relayed connections, the path
//! each peer is reached by, and AutoNAT confirmations of this node's own
//! addresses.

use std::time::Instant;

use libp2p::{
    autonat, dcutr, relay,
    swarm::{
        DialError,
        dial_opts::{DialOpts, PeerCondition},
    },
};

use super::{
    ConnectionId, HashMap, HashSet, Multiaddr, Node, PeerId, Protocol, Reply, lock_write, mpsc,
    strip_p2p,
};
use crate::error::DhtError;

/// How this node reaches a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerPath {
    /// Only through a relay's circuit (hole punching failed or is pending).
    Relayed,
    /// A direct connection that hole punching opened through both NATs.
    HolePunched,
    /// A direct connection, dialed or accepted.
    Direct,
}

impl PeerPath {
    /// A short name for logs and reports: `direct`, `hole-punched`, `relayed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::HolePunched => "hole-punched",
            Self::Relayed => "relayed",
        }
    }
}

impl std::fmt::Display for PeerPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A relay that refused or dropped this node's reservation is left alone this long.
const RELAY_RETRY: std::time::Duration = std::time::Duration::from_secs(30);
/// A relay left for failing circuits or for limits too small for data is
/// left alone this long.
const RELAY_BAN: std::time::Duration = std::time::Duration::from_secs(600);
/// Circuit failures through one relay are counted over this window.
const RELAY_FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);
/// A relay through which this many circuits failed within the window is
/// left (a peer that vanishes kills its circuits too, so one is no proof).
const RELAY_FAILURE_LIMIT: usize = 3;
/// Circuits smaller than this carry signalling (hole punching), not
/// averaging data: a relay offering less is kept only while no better one
/// is at hand.
pub(crate) const MIN_RELAY_CIRCUIT_BYTES: u64 = 64 << 20;
/// Likewise for circuit lifetimes.
pub(crate) const MIN_RELAY_CIRCUIT_DURATION: std::time::Duration =
    std::time::Duration::from_secs(600);

/// Circuit failures per relay within [`RELAY_FAILURE_WINDOW`].
#[derive(Default)]
pub(crate) struct RelayFailures(HashMap<PeerId, Vec<Instant>>);

impl RelayFailures {
    /// Records a failure through `relay` at `now`; returns how many fell
    /// within the window.
    pub(crate) fn record(&mut self, relay: PeerId, now: Instant) -> usize {
        let list = self.0.entry(relay).or_default();
        list.retain(|t| now.duration_since(*t) < RELAY_FAILURE_WINDOW);
        list.push(now);
        list.len()
    }

    /// Relays with a failure within the window.
    pub(crate) fn suspects(&self, now: Instant) -> HashSet<PeerId> {
        self.0
            .iter()
            .filter(|(_, l)| {
                l.iter()
                    .any(|t| now.duration_since(*t) < RELAY_FAILURE_WINDOW)
            })
            .map(|(p, _)| *p)
            .collect()
    }
}

/// The relay a circuit address goes through: `…/p2p/<relay>/p2p-circuit…`.
pub(crate) fn relay_of(addr: &Multiaddr) -> Option<PeerId> {
    let mut last = None;
    for p in addr.iter() {
        match p {
            Protocol::P2p(id) => last = Some(id),
            Protocol::P2pCircuit => return last,
            _ => {}
        }
    }
    None
}

/// Whether a relay's circuit limits (bytes, lifetime; `None`: unlimited)
/// fit averaging data.
fn limit_fits_data(bytes: Option<u64>, duration: Option<std::time::Duration>) -> bool {
    bytes.is_none_or(|b| b >= MIN_RELAY_CIRCUIT_BYTES)
        && duration.is_none_or(|d| d >= MIN_RELAY_CIRCUIT_DURATION)
}

/// NAT traversal state of a node.
pub(crate) struct NatState {
    /// At most this many relay reservations at once (0: none).
    pub(crate) max_relays: usize,
    /// How long a caller waits for a hole punch before settling for a relay.
    pub(crate) hole_punch_wait: std::time::Duration,
    /// Whether this node is in client mode (no inbound route): only then
    /// does it listen through relays.
    pub(crate) client: bool,
    /// A relay without announced addresses: its listen addresses count as
    /// external (what it tells the peers it holds reservations for).
    pub(crate) listen_is_external: bool,
    /// Connected peers that serve circuit relay v2.
    relay_capable: HashSet<PeerId>,
    /// Relays this node listens through, and whether the relay accepted.
    relays: HashMap<PeerId, (libp2p::core::transport::ListenerId, bool)>,
    /// When a relay that refused or dropped a reservation may be asked again.
    relay_retry: HashMap<PeerId, Instant>,
    /// Open connections through a relay.
    relayed: HashMap<ConnectionId, PeerId>,
    /// Circuits that died with an error, per relay.
    relay_failures: RelayFailures,
    /// Relays whose circuits fail, shared with handles (dials avoid them
    /// while another circuit is published).
    pub(crate) suspect_relays: std::sync::Arc<std::sync::RwLock<HashSet<PeerId>>>,
    /// Relays whose reservation offers circuits too small for data.
    small_relays: HashSet<PeerId>,
    /// Relayed connections being closed because a direct one is up; callers
    /// asking for a path to their peer wait until they are gone, so no new
    /// stream lands on a circuit about to be reset.
    closing: HashSet<ConnectionId>,
    /// Open direct connections.
    direct: HashMap<ConnectionId, PeerId>,
    /// Direct connections that a hole punch opened.
    punched: HashSet<ConnectionId>,
    /// Peers reached only through a relay whose hole punch has not reported yet.
    punch_pending: HashSet<PeerId>,
    /// Callers waiting for a relayed peer's hole punch to settle.
    path_waiters: HashMap<PeerId, Vec<Reply<Option<PeerPath>>>>,
    /// Callers waiting for a dial to a peer.
    dial_waiters: HashMap<PeerId, Vec<Reply<()>>>,
    /// The best path each peer was ever reached by (reports).
    history: HashMap<PeerId, PeerPath>,
    /// The address each connected peer was dialed at (outbound, direct).
    dialed: HashMap<PeerId, Multiaddr>,
    /// Sends a peer whose hole-punch wait ran out.
    pub(crate) wait_tx: mpsc::UnboundedSender<PeerId>,
    /// Circuit addresses this node can be reached at (shared with handles).
    pub(crate) relay_addrs: std::sync::Arc<std::sync::RwLock<Vec<Multiaddr>>>,
    /// Own addresses AutoNAT confirmed (shared with handles).
    pub(crate) confirmed_addrs: std::sync::Arc<std::sync::RwLock<Vec<Multiaddr>>>,
    /// Bumped whenever `relay_addrs` changes (the publisher and waiters watch it).
    pub(crate) relay_addrs_changed: tokio::sync::watch::Sender<u64>,
    pub(crate) hole_punches_succeeded: u64,
    pub(crate) hole_punches_failed: u64,
    pub(crate) circuits_served: u64,
    pub(crate) autonat_failures: u64,
}

impl NatState {
    pub(crate) fn new(wait_tx: mpsc::UnboundedSender<PeerId>) -> Self {
        Self {
            max_relays: 0,
            hole_punch_wait: std::time::Duration::from_secs(4),
            client: false,
            listen_is_external: false,
            relay_capable: HashSet::new(),
            relays: HashMap::new(),
            relay_retry: HashMap::new(),
            relayed: HashMap::new(),
            relay_failures: RelayFailures::default(),
            suspect_relays: Default::default(),
            small_relays: HashSet::new(),
            closing: HashSet::new(),
            direct: HashMap::new(),
            punched: HashSet::new(),
            punch_pending: HashSet::new(),
            path_waiters: HashMap::new(),
            dial_waiters: HashMap::new(),
            history: HashMap::new(),
            dialed: HashMap::new(),
            wait_tx,
            relay_addrs: Default::default(),
            confirmed_addrs: Default::default(),
            relay_addrs_changed: tokio::sync::watch::Sender::new(0),
            hole_punches_succeeded: 0,
            hole_punches_failed: 0,
            circuits_served: 0,
            autonat_failures: 0,
        }
    }

    /// How this node reaches `peer` now, if it is connected.
    pub(crate) fn path(&self, peer: &PeerId) -> Option<PeerPath> {
        let mut best = None;
        for (c, p) in &self.direct {
            if p == peer {
                let path = if self.punched.contains(c) {
                    PeerPath::HolePunched
                } else {
                    PeerPath::Direct
                };
                best = best.max(Some(path));
            }
        }
        if best.is_none() && self.relayed.values().any(|p| p == peer) {
            best = Some(PeerPath::Relayed);
        }
        best
    }

    pub(crate) fn relay_reservations(&self) -> usize {
        self.relays.values().filter(|(_, ok)| *ok).count()
    }

    /// Connected relays this node holds or may ask for a reservation.
    pub(crate) fn relay_candidates(&self) -> usize {
        let now = Instant::now();
        self.relay_capable
            .iter()
            .filter(|p| {
                self.relays.contains_key(p) || self.relay_retry.get(p).is_none_or(|t| *t <= now)
            })
            .count()
    }

    pub(crate) fn relayed_connections(&self) -> usize {
        self.relayed.len()
    }

    pub(crate) fn history(&self) -> Vec<(PeerId, PeerPath)> {
        let mut v: Vec<_> = self.history.iter().map(|(p, k)| (*p, *k)).collect();
        v.sort();
        v
    }

    fn remember(&mut self, peer: PeerId, path: PeerPath) {
        let entry = self.history.entry(peer).or_insert(path);
        *entry = (*entry).max(path);
    }

    /// Whether circuits to `peer` are still being closed.
    fn closing_to(&self, peer: &PeerId) -> bool {
        self.closing
            .iter()
            .any(|c| self.relayed.get(c) == Some(peer))
    }

    /// Whether a caller asking for the path to `peer` should wait: its hole
    /// punch has not reported, or its circuits are closing.
    fn path_unsettled(&self, peer: &PeerId) -> bool {
        (self.punch_pending.contains(peer) && self.relayed.values().any(|p| p == peer))
            || self.closing_to(peer)
    }

    /// Answers the callers waiting for the path to `peer`, unless it is
    /// still unsettled (they are answered when it settles or their wait
    /// runs out).
    fn answer_path_waiters(&mut self, peer: &PeerId) {
        if self.path_unsettled(peer) {
            return;
        }
        self.flush_path_waiters(peer);
    }

    fn flush_path_waiters(&mut self, peer: &PeerId) {
        let path = self.path(peer);
        for reply in self.path_waiters.remove(peer).unwrap_or_default() {
            let _ = reply.send(Ok(path));
        }
    }
}

fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

impl Node {
    /// A connection opened: record its path; a relayed one to a peer with no
    /// direct connection waits for DCUtR's hole punch.
    pub(super) fn nat_connection_established(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        endpoint: &libp2p::core::ConnectedPoint,
    ) {
        if !endpoint.is_relayed() && !self.nat.punch_pending.contains(&peer) {
            // Relays carry only what they must: with a direct connection up,
            // the circuits to this peer are closed so that new streams take
            // the direct one. Path waiters are answered once they are gone.
            // While a hole punch runs, its circuit carries DCUtR's own
            // messages (the other side may not have dialed yet): closed once
            // DCUtR reports.
            self.close_circuits_to(peer);
        }
        let nat = &mut self.nat;
        if endpoint.is_relayed() {
            nat.relayed.insert(connection, peer);
            if nat.path(&peer) == Some(PeerPath::Relayed) {
                nat.punch_pending.insert(peer);
            }
        } else {
            // A direct connection to a peer reached until now only through a
            // relay is the hole punch's (DCUtR reports the id of its own
            // dial, which may not be the connection that won when both
            // sides' SYNs crossed).
            if nat.path(&peer) == Some(PeerPath::Relayed) || nat.punch_pending.contains(&peer) {
                nat.punched.insert(connection);
            }
            nat.direct.insert(connection, peer);
            if let libp2p::core::ConnectedPoint::Dialer { address, .. } = endpoint {
                nat.dialed.insert(peer, strip_p2p(address));
            }
        }
        if let Some(path) = nat.path(&peer) {
            nat.remember(peer, path);
        }
        nat.answer_path_waiters(&peer);
        for reply in nat.dial_waiters.remove(&peer).unwrap_or_default() {
            let _ = reply.send(Ok(()));
        }
    }

    pub(super) fn nat_connection_closed(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        endpoint: &libp2p::core::ConnectedPoint,
        cause: Option<&libp2p::swarm::ConnectionError>,
    ) {
        let was_relayed = self.nat.relayed.contains_key(&connection);
        let closed_here = self.nat.closing.contains(&connection);
        if let (true, false, Some(cause)) = (was_relayed, closed_here, cause) {
            self.nat_circuit_failed(peer, endpoint, cause);
        }
        let nat = &mut self.nat;
        nat.relayed.remove(&connection);
        nat.closing.remove(&connection);
        nat.direct.remove(&connection);
        nat.punched.remove(&connection);
        if nat.path(&peer).is_none() {
            nat.dialed.remove(&peer);
            nat.relay_capable.remove(&peer);
            nat.punch_pending.remove(&peer);
        }
        nat.answer_path_waiters(&peer);
    }

    /// A circuit to `peer` died with an error (the relay cut it, or the
    /// peer vanished): counted against the relay, which is left once
    /// [`RELAY_FAILURE_LIMIT`] circuits failed through it within the window.
    fn nat_circuit_failed(
        &mut self,
        peer: PeerId,
        endpoint: &libp2p::core::ConnectedPoint,
        cause: &libp2p::swarm::ConnectionError,
    ) {
        let addr = match endpoint {
            libp2p::core::ConnectedPoint::Dialer { address, .. } => address,
            libp2p::core::ConnectedPoint::Listener { local_addr, .. } => local_addr,
        };
        let Some(relay) = relay_of(addr) else {
            return;
        };
        let now = Instant::now();
        let failures = self.nat.relay_failures.record(relay, now);
        *lock_write(&self.nat.suspect_relays) = self.nat.relay_failures.suspects(now);
        tracing::warn!(%relay, %peer, %cause, failures, "a circuit through this relay failed");
        if failures >= RELAY_FAILURE_LIMIT && self.nat.relays.contains_key(&relay) {
            self.leave_relay(relay, "its circuits keep failing");
            self.maintain_relays();
        }
    }

    /// Drops this node's reservation on `relay` and leaves it alone for
    /// [`RELAY_BAN`].
    fn leave_relay(&mut self, relay: PeerId, reason: &str) {
        if let Some((listener, _)) = self.nat.relays.remove(&relay) {
            self.swarm.remove_listener(listener);
        }
        self.nat
            .relay_retry
            .insert(relay, Instant::now() + RELAY_BAN);
        tracing::warn!(%relay, reason, "leaving this relay for another");
    }

    /// Starts closing the relayed connections to `peer` (it has a direct one).
    fn close_circuits_to(&mut self, peer: PeerId) {
        let circuits: Vec<ConnectionId> = self
            .nat
            .relayed
            .iter()
            .filter(|(c, p)| **p == peer && !self.nat.closing.contains(c))
            .map(|(c, _)| *c)
            .collect();
        for c in circuits {
            if self.swarm.close_connection(c) {
                tracing::debug!(%peer, "closing a relayed circuit: a direct connection is up");
                self.nat.closing.insert(c);
            }
        }
    }

    pub(super) fn nat_dial_failed(&mut self, peer: PeerId, error: &DialError) {
        if self.swarm.is_connected(&peer) {
            return;
        }
        for reply in self.nat.dial_waiters.remove(&peer).unwrap_or_default() {
            let _ = reply.send(Err(DhtError::Dial {
                peer,
                reason: error.to_string(),
            }));
        }
    }

    /// Identify says whether `peer` serves relay v2.
    pub(super) fn nat_identified(&mut self, peer: PeerId, protocols: &[libp2p::StreamProtocol]) {
        if protocols.contains(&relay::HOP_PROTOCOL_NAME) {
            self.nat.relay_capable.insert(peer);
        } else {
            self.nat.relay_capable.remove(&peer);
        }
        self.maintain_relays();
    }

    /// `Command::Dial`: connect to `peer` at `addrs` (answered when a
    /// connection is up or every address failed).
    pub(super) fn nat_dial(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, reply: Reply<()>) {
        if self.swarm.is_connected(&peer) {
            let _ = reply.send(Ok(()));
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        match self.swarm.dial(opts) {
            Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => {
                self.nat.dial_waiters.entry(peer).or_default().push(reply);
            }
            Err(error) => {
                let _ = reply.send(Err(DhtError::Dial {
                    peer,
                    reason: error.to_string(),
                }));
            }
        }
    }

    /// `Command::PreparePath`: the path to `peer` once settled: a relayed
    /// peer whose hole punch is still running is answered when it reports,
    /// or when `hole_punch_wait` runs out.
    pub(super) fn nat_prepare_path(&mut self, peer: PeerId, reply: Reply<Option<PeerPath>>) {
        let nat = &mut self.nat;
        if !nat.path_unsettled(&peer) {
            let _ = reply.send(Ok(nat.path(&peer)));
            return;
        }
        let waiters = nat.path_waiters.entry(peer).or_default();
        waiters.push(reply);
        if waiters.len() == 1 {
            let tx = nat.wait_tx.clone();
            let wait = nat.hole_punch_wait;
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let _ = tx.send(peer);
            });
        }
    }

    /// A hole-punch wait ran out: settle for the relay.
    pub(super) fn nat_wait_spent(&mut self, peer: PeerId) {
        // DCUtR may never report (a peer without it): stop counting on it.
        self.nat.punch_pending.remove(&peer);
        if self.nat.direct.values().any(|p| *p == peer) {
            self.close_circuits_to(peer);
        }
        if self.nat.path_waiters.contains_key(&peer) {
            tracing::debug!(%peer, "no hole punch in time; using the path at hand");
            self.nat.flush_path_waiters(&peer);
        }
    }

    pub(super) fn on_dcutr_event(&mut self, event: dcutr::Event) {
        let peer = event.remote_peer_id;
        self.nat.punch_pending.remove(&peer);
        match event.result {
            Ok(connection) => {
                self.nat.hole_punches_succeeded += 1;
                self.nat.punched.insert(connection);
                self.nat.remember(peer, PeerPath::HolePunched);
                tracing::info!(%peer, "hole punch succeeded: direct connection through both NATs");
            }
            Err(error) => {
                self.nat.hole_punches_failed += 1;
                tracing::info!(%peer, %error, "hole punch failed; traffic to this peer goes through the relay");
            }
        }
        // Direct now (punched, or dialed some other way): the circuits go.
        if self.nat.direct.values().any(|p| *p == peer) {
            self.close_circuits_to(peer);
        }
        self.nat.answer_path_waiters(&peer);
    }

    pub(super) fn on_relay_client_event(&mut self, event: relay::client::Event) {
        match event {
            relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                limit,
            } => {
                if let Some(slot) = self.nat.relays.get_mut(&relay_peer_id) {
                    slot.1 = true;
                }
                let (bytes, duration) = limit
                    .as_ref()
                    .map_or((None, None), |l| (l.data_in_bytes(), l.duration()));
                if !renewal && !limit_fits_data(bytes, duration) {
                    tracing::warn!(
                        relay = %relay_peer_id,
                        circuit_bytes = ?bytes,
                        circuit_secs = ?duration.map(|d| d.as_secs()),
                        "this relay's circuits are too small for averaging data (enough for hole punching); \
                         it is kept only until a relay with larger circuits is at hand"
                    );
                    self.nat.small_relays.insert(relay_peer_id);
                    self.maintain_relays();
                } else if !renewal {
                    tracing::info!(relay = %relay_peer_id, "relay reservation accepted: peers can reach this node through it");
                }
            }
            relay::client::Event::OutboundCircuitEstablished { relay_peer_id, .. } => {
                tracing::debug!(relay = %relay_peer_id, "dialed a peer through a relay");
            }
            relay::client::Event::InboundCircuitEstablished { src_peer_id, .. } => {
                tracing::debug!(peer = %src_peer_id, "a peer reached this node through a relay");
            }
        }
    }

    pub(super) fn on_relay_server_event(&mut self, event: relay::Event) {
        match event {
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                self.nat.circuits_served += 1;
                tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, "relaying a circuit");
            }
            relay::Event::CircuitReqDenied {
                src_peer_id,
                dst_peer_id,
                status,
            } => {
                tracing::info!(src = %src_peer_id, dst = %dst_peer_id, ?status, "circuit request denied");
            }
            relay::Event::ReservationReqDenied {
                src_peer_id,
                status,
            } => {
                tracing::info!(peer = %src_peer_id, ?status, "relay reservation denied");
            }
            relay::Event::CircuitClosed {
                src_peer_id,
                dst_peer_id,
                error: Some(error),
            } => {
                tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, %error, "relayed circuit failed");
            }
            _ => {}
        }
    }

    pub(super) fn on_autonat_event(&mut self, event: autonat::v2::client::Event) {
        match event.result {
            Ok(()) => {
                let addr = strip_p2p(&event.tested_addr);
                let mut confirmed = lock_write(&self.nat.confirmed_addrs);
                if !confirmed.contains(&addr) {
                    tracing::info!(%addr, server = %event.server, "AutoNAT: reachable at this address (a peer dialed it back)");
                    confirmed.push(addr);
                }
            }
            Err(error) => {
                self.nat.autonat_failures += 1;
                tracing::debug!(addr = %event.tested_addr, server = %event.server, %error, "AutoNAT: address not reachable from outside");
            }
        }
    }

    /// A listener closed: a relay that dropped this node's reservation is
    /// left alone for a while and another is asked.
    pub(super) fn nat_listener_closed(
        &mut self,
        listener: libp2p::core::transport::ListenerId,
        error: Option<std::io::Error>,
    ) {
        let Some(relay) = self
            .nat
            .relays
            .iter()
            .find(|(_, (l, _))| *l == listener)
            .map(|(p, _)| *p)
        else {
            return;
        };
        self.nat.relays.remove(&relay);
        self.nat
            .relay_retry
            .insert(relay, Instant::now() + RELAY_RETRY);
        let reason = error.map_or_else(|| "closed".to_owned(), |e| e.to_string());
        tracing::warn!(%relay, %reason, "relay reservation lost; trying another relay");
        self.maintain_relays();
    }

    /// A circuit address came up or went away.
    pub(super) fn nat_listen_addr(&mut self, addr: &Multiaddr, up: bool) -> bool {
        if !is_relayed(addr) {
            return false;
        }
        let full = addr
            .clone()
            .with_p2p(*self.swarm.local_peer_id())
            .unwrap_or_else(|a| a);
        let mut addrs = lock_write(&self.nat.relay_addrs);
        addrs.retain(|a| a != &full);
        if up {
            tracing::info!(address = %full, "reachable through a relay");
            addrs.push(full);
        }
        self.nat.relay_addrs_changed.send_modify(|v| *v += 1);
        true
    }

    /// While in client mode, keeps up to `max_relays` reservations on
    /// connected relays; out of client mode, drops them.
    pub(super) fn maintain_relays(&mut self) {
        if !self.nat.client || self.nat.max_relays == 0 {
            for (_, (listener, _)) in self.nat.relays.drain() {
                self.swarm.remove_listener(listener);
            }
            return;
        }
        let now = Instant::now();
        self.nat.relay_retry.retain(|_, at| *at > now);
        let mut candidates: Vec<PeerId> = self
            .nat
            .relay_capable
            .iter()
            .filter(|p| !self.nat.relays.contains_key(p) && !self.nat.relay_retry.contains_key(p))
            .copied()
            .collect();
        // Relays not known to offer small circuits first, then by id.
        candidates.sort_by_key(|p| (self.nat.small_relays.contains(p), *p));
        // Full, with a small relay held while one that may fit data is at
        // hand: swap it.
        let better = candidates
            .iter()
            .any(|p| !self.nat.small_relays.contains(p));
        if better && self.nat.relays.len() >= self.nat.max_relays {
            let small = self
                .nat
                .relays
                .keys()
                .find(|p| self.nat.small_relays.contains(p))
                .copied();
            if let Some(small) = small {
                self.leave_relay(small, "a relay with larger circuits is at hand");
            }
        }
        for relay in candidates {
            if self.nat.relays.len() >= self.nat.max_relays {
                break;
            }
            let Some(addr) = self.relay_dial_addr(&relay) else {
                continue;
            };
            let circuit = addr.with(Protocol::P2p(relay)).with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(listener) => {
                    tracing::debug!(%circuit, "asking a relay for a reservation");
                    self.nat.relays.insert(relay, (listener, false));
                }
                Err(error) => {
                    tracing::debug!(%circuit, %error, "cannot listen through relay");
                    self.nat.relay_retry.insert(relay, now + RELAY_RETRY);
                }
            }
        }
    }

    /// The address to reach relay `peer` at: the one this node dialed, else
    /// an advertised one on the IP its connection came from.
    fn relay_dial_addr(&self, peer: &PeerId) -> Option<Multiaddr> {
        if let Some(addr) = self.nat.dialed.get(peer) {
            return Some(addr.clone());
        }
        let known = self.peers.get(peer)?;
        let ip = |a: &Multiaddr| {
            a.iter().find_map(|p| match p {
                Protocol::Ip4(ip) => Some(std::net::IpAddr::V4(ip)),
                Protocol::Ip6(ip) => Some(std::net::IpAddr::V6(ip)),
                _ => None,
            })
        };
        let seen: Vec<_> = known.connected.iter().filter_map(ip).collect();
        known
            .listen
            .iter()
            .find(|a| !is_relayed(a) && ip(a).is_some_and(|i| seen.contains(&i)))
            .map(strip_p2p)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn failures_count_within_the_window_only() {
        let relay = PeerId::random();
        let other = PeerId::random();
        let mut f = RelayFailures::default();
        let t0 = Instant::now();
        assert_eq!(f.record(relay, t0), 1);
        assert_eq!(f.record(relay, t0 + Duration::from_secs(1)), 2);
        assert_eq!(f.record(other, t0 + Duration::from_secs(2)), 1);
        assert_eq!(f.suspects(t0 + Duration::from_secs(3)).len(), 2);
        // Past the window the old failures no longer count.
        let later = t0 + RELAY_FAILURE_WINDOW + Duration::from_secs(5);
        assert_eq!(f.record(relay, later), 1);
        assert_eq!(f.suspects(later), HashSet::from([relay]));
    }

    #[test]
    fn the_relay_of_a_circuit_address() {
        let relay = PeerId::random();
        let peer = PeerId::random();
        let dialed: Multiaddr = format!("/ip4/10.0.0.1/tcp/1/p2p/{relay}/p2p-circuit/p2p/{peer}")
            .parse()
            .unwrap();
        assert_eq!(relay_of(&dialed), Some(relay));
        let listening: Multiaddr = format!("/ip4/10.0.0.1/tcp/1/p2p/{relay}/p2p-circuit")
            .parse()
            .unwrap();
        assert_eq!(relay_of(&listening), Some(relay));
        let direct: Multiaddr = format!("/ip4/10.0.0.1/tcp/1/p2p/{peer}").parse().unwrap();
        assert_eq!(relay_of(&direct), None);
        let no_relay: Multiaddr = "/ip4/10.0.0.1/tcp/1/p2p-circuit".parse().unwrap();
        assert_eq!(relay_of(&no_relay), None);
    }

    #[test]
    fn circuit_limits_that_fit_data() {
        let minute = Duration::from_secs(60);
        assert!(limit_fits_data(None, None));
        assert!(limit_fits_data(Some(4 << 30), Some(60 * minute)));
        // libp2p's defaults: 128 KiB, 2 minutes.
        assert!(!limit_fits_data(Some(128 << 10), Some(2 * minute)));
        assert!(!limit_fits_data(Some(4 << 30), Some(2 * minute)));
        assert!(!limit_fits_data(Some(1 << 20), None));
    }
}
