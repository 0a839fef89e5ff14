//! Node configuration.

use std::{path::PathBuf, time::Duration};

use libp2p::{Multiaddr, PeerId};

use crate::error::DhtError;

/// Where the node's libp2p identity (an ed25519 key pair) comes from.
#[derive(Debug, Clone, Default)]
pub enum IdentitySource {
    /// A fresh random key pair (the peer id changes on every start).
    #[default]
    Random,
    /// A key pair derived from this 32-byte ed25519 secret (tests, seeded swarms).
    Secret([u8; 32]),
    /// Load the key pair from this file, or generate one and save it there
    /// (libp2p protobuf encoding, file mode 0600) so a bootstrap node keeps its
    /// peer id across restarts.
    File(PathBuf),
}

/// Configuration of a [`Dht`](crate::Dht) node.
///
/// Every field has a documented default; call [`DhtConfig::validate`] (done by
/// [`Dht::new`](crate::Dht::new)) to check invariants between them.
#[derive(Debug, Clone)]
pub struct DhtConfig {
    /// Addresses to listen on. Default: `["/ip4/127.0.0.1/tcp/0"]`. Ignored in
    /// client mode unless non-empty there too (a client may still listen, but it
    /// never serves the DHT).
    pub listen_addrs: Vec<Multiaddr>,
    /// External addresses other peers should dial (a port forward, a public
    /// IP in front of a private one; hivemind's `announce_maddrs`): each is an
    /// `/ip4|ip6|dns|dns4|dns6/…/tcp/<port>` address, optionally ending in this
    /// node's `/p2p/<peer id>`. When any is given, identify advertises only
    /// these, not the listen addresses. Default: none.
    pub announce_addrs: Vec<Multiaddr>,
    /// Peers to bootstrap from, ideally with a `/p2p/<peer id>` suffix.
    /// Default: none (this node starts a new swarm).
    pub initial_peers: Vec<Multiaddr>,
    /// The node identity. Default: [`IdentitySource::Random`].
    pub identity: IdentitySource,
    /// Client mode: listen nowhere, never enter others' routing tables, store and
    /// get through server nodes. Default: `false`.
    pub client_mode: bool,
    /// Kademlia replication factor `k`: how many closest peers store each record
    /// and how many a lookup converges on. Default: 20.
    pub replication: usize,
    /// Kademlia lookup parallelism `alpha`. Default: 3.
    pub parallelism: usize,
    /// Deadline for one store or get query. Default: 10 s.
    pub query_timeout: Duration,
    /// Deadline for reaching an initial peer and the first lookup. Default: 15 s.
    pub bootstrap_timeout: Duration,
    /// Fail [`Dht::new`](crate::Dht::new) when initial peers are given but none
    /// answers. Default: `true`.
    pub ensure_bootstrap: bool,
    /// Maximum size of one value (after signing), bytes. Default: 64 KiB.
    pub max_value_size: usize,
    /// Maximum size of a key or subkey, bytes. Default: 1 KiB.
    pub max_key_size: usize,
    /// Maximum size of one stored record (all subkeys of a key), bytes; a subkey
    /// that would push a record past it is rejected. Default: 1 MiB.
    pub max_record_size: usize,
    /// Maximum number of keys a node stores for others. Default: 100 000.
    pub max_records: usize,
    /// Most subkeys one owner (the owner marker in the subkey; subkeys naming
    /// no owner count as one owner) holds under one key, on storers and in
    /// what readers merge: an owner's entry past the cap evicts its own
    /// earliest-expiring ones. Default: 8 (the stack's keys hold one subkey
    /// per peer).
    pub max_subkeys_per_owner: usize,
    /// Most subkey and value bytes one owner holds under one key, enforced
    /// like `max_subkeys_per_owner`. Default: 256 KiB (a quarter of
    /// `max_record_size`).
    pub max_owner_bytes: usize,
    /// A closed run: only these peers may connect to this node (any other
    /// connection is denied), and records signed by anyone else are
    /// refused on store and on read. `None` (default): an open run. Every
    /// member, bootstrap and relay of a closed run should use the same
    /// list.
    pub allowed_peers: Option<Vec<PeerId>>,
    /// Most connections established at once, in and out together; more
    /// are denied. Default: 512.
    pub max_connections: u32,
    /// Most inbound connections still in their handshake at once. Default: 64.
    pub max_pending_incoming: u32,
    /// Most connections to one peer (a relayed one and a direct one, each
    /// side dialing: 4 is room enough). Default: 4.
    pub max_connections_per_peer: u32,
    /// While this process's resident memory is over this cap, new
    /// connections (in and out) are denied; open ones are kept. Default:
    /// 90 % of the machine's memory. Read from `/proc` (Linux); elsewhere
    /// there is no memory-based limit.
    pub max_memory: crate::MemoryCap,
    /// Latest accepted expiration, relative to now: records that claim to live
    /// longer are rejected. Default: 24 h.
    pub max_ttl: Duration,
    /// Maximum size of one gossipsub message, bytes. Default: 64 KiB.
    pub max_gossip_size: usize,
    /// Capacity of each subscription's channel; messages to a full channel are
    /// dropped with a warning. Default: 256.
    pub subscription_capacity: usize,
    /// Capacity of the handle → node command channel. Default: 1024.
    pub command_capacity: usize,
    /// How long an idle connection is kept open. Default: 120 s.
    pub idle_connection_timeout: Duration,
    /// Limit on dialing and securing one connection. Default: 3 s (libp2p's
    /// is 10 s; a dial to a vanished host holds a lookup that long, and a
    /// TCP + noise + yamux handshake is a few round trips even across oceans).
    pub connect_timeout: Duration,
    /// How often every connection is pinged. Default: 1 s.
    pub ping_interval: Duration,
    /// A connection that has not answered a ping for this long is closed
    /// (the peer vanished: link cut, host gone, NAT mapping lost), so lookups
    /// and streams stop waiting on it. Default: 4 s (a ping queues behind
    /// other traffic of the connection, so not much shorter on slow links).
    pub liveness_timeout: Duration,
    /// Serve as a circuit relay (v2) for peers that cannot be dialed, within
    /// these limits. Default: `None` (no relay service).
    pub relay_server: Option<RelayLimits>,
    /// While in client mode with no inbound route (a client that listens
    /// nowhere, or any node after [`Dht::set_client_mode`](crate::Dht::set_client_mode)`(true)`),
    /// reserve a slot on up to this many connected relays and listen through them, so other peers can
    /// reach this node (and hole-punch a direct connection). 0 turns it off.
    /// Default: 2.
    pub max_relays: usize,
    /// How long [`Dht::open_stream`](crate::Dht::open_stream) waits for a
    /// hole punch when the only connection to the peer is relayed, before it
    /// settles for the relay. Default: 4 s.
    pub hole_punch_wait: Duration,
    /// How often this node refreshes its presence record and checks that no
    /// other node (on another host) runs with the same identity; see
    /// [`Dht::identity_conflict`](crate::Dht::identity_conflict). Zero turns
    /// the check off. Default: 30 s.
    pub identity_check_interval: Duration,
}

/// Limits of the relay service ([`DhtConfig::relay_server`]).
///
/// libp2p's defaults (128 KiB and 2 minutes per circuit) suit signalling only;
/// Colony relays carry averaging traffic for peers whose hole punch failed,
/// so the defaults here are sized for data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayLimits {
    /// Peers holding a reservation at once. Default: 128.
    pub max_reservations: usize,
    /// Circuits open at once. Default: 64.
    pub max_circuits: usize,
    /// Circuits open at once per source peer. Default: 8.
    pub max_circuits_per_peer: usize,
    /// Lifetime of one circuit. Default: 1 h.
    pub max_circuit_duration: Duration,
    /// Bytes one circuit may carry (both directions). Default: 4 GiB.
    pub max_circuit_bytes: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_reservations: 128,
            max_circuits: 64,
            max_circuits_per_peer: 8,
            max_circuit_duration: Duration::from_secs(3600),
            max_circuit_bytes: 4 << 30,
        }
    }
}

impl Default for DhtConfig {
    fn default() -> Self {
        Self {
            listen_addrs: vec![default_listen_addr()],
            announce_addrs: Vec::new(),
            initial_peers: Vec::new(),
            identity: IdentitySource::Random,
            client_mode: false,
            replication: 20,
            parallelism: 3,
            query_timeout: Duration::from_secs(10),
            bootstrap_timeout: Duration::from_secs(15),
            ensure_bootstrap: true,
            max_value_size: 64 * 1024,
            max_key_size: 1024,
            max_record_size: 1024 * 1024,
            max_records: 100_000,
            allowed_peers: None,
            max_connections: 512,
            max_pending_incoming: 64,
            max_connections_per_peer: 4,
            max_memory: crate::MemoryCap::FractionOfSystem(0.9),
            max_subkeys_per_owner: 8,
            max_owner_bytes: 256 * 1024,
            max_ttl: Duration::from_secs(24 * 3600),
            max_gossip_size: 64 * 1024,
            subscription_capacity: 256,
            command_capacity: 1024,
            idle_connection_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(3),
            ping_interval: Duration::from_secs(1),
            liveness_timeout: Duration::from_secs(4),
            relay_server: None,
            max_relays: 2,
            hole_punch_wait: Duration::from_secs(4),
            identity_check_interval: Duration::from_secs(30),
        }
    }
}

impl DhtConfig {
    /// What one owner may hold under one key.
    pub(crate) fn owner_caps(&self) -> crate::storage::OwnerCaps {
        crate::storage::OwnerCaps {
            subkeys: self.max_subkeys_per_owner,
            bytes: self.max_owner_bytes,
        }
    }
}

fn default_listen_addr() -> Multiaddr {
    Multiaddr::empty()
        .with(libp2p::multiaddr::Protocol::Ip4(
            std::net::Ipv4Addr::LOCALHOST,
        ))
        .with(libp2p::multiaddr::Protocol::Tcp(0))
}

impl DhtConfig {
    /// A default config (same as [`Default::default`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// A client-mode config bootstrapping from `initial_peers`, listening nowhere.
    pub fn client(initial_peers: Vec<Multiaddr>) -> Self {
        Self {
            listen_addrs: Vec::new(),
            initial_peers,
            client_mode: true,
            ..Self::default()
        }
    }

    /// Checks the invariants between fields.
    ///
    /// # Errors
    ///
    /// [`DhtError::Config`] naming the first offending field.
    pub fn validate(&self) -> Result<(), DhtError> {
        let bad = |field: &'static str, reason: &str| {
            Err(DhtError::Config {
                field,
                reason: reason.to_owned(),
            })
        };
        if !self.client_mode && self.listen_addrs.is_empty() {
            return bad("listen_addrs", "a server node needs at least one address");
        }
        if self.client_mode && self.initial_peers.is_empty() {
            return bad("initial_peers", "a client-mode node needs initial peers");
        }
        for addr in &self.announce_addrs {
            check_announce(addr).map_err(|reason| DhtError::Config {
                field: "announce_addrs",
                reason: format!("{addr}: {reason}"),
            })?;
        }
        if self.replication == 0 {
            return bad("replication", "must be at least 1");
        }
        if self.parallelism == 0 {
            return bad("parallelism", "must be at least 1");
        }
        if self.query_timeout.is_zero() {
            return bad("query_timeout", "must be positive");
        }
        if self.bootstrap_timeout.is_zero() {
            return bad("bootstrap_timeout", "must be positive");
        }
        if self.max_key_size == 0 {
            return bad("max_key_size", "must be positive");
        }
        if self.max_value_size == 0 || self.max_value_size > self.max_record_size {
            return bad(
                "max_value_size",
                "must be positive and at most max_record_size",
            );
        }
        if self.max_records == 0 {
            return bad("max_records", "must be positive");
        }
        if self.max_connections == 0 || self.max_pending_incoming == 0 {
            return bad("max_connections", "connection limits must be positive");
        }
        if self.max_connections_per_peer < 2 {
            return bad(
                "max_connections_per_peer",
                "must be at least 2 (a relayed and a direct connection)",
            );
        }
        match self.max_memory {
            crate::MemoryCap::Bytes(0) => return bad("max_memory", "must be positive"),
            crate::MemoryCap::FractionOfSystem(f) if !(f > 0.0 && f <= 1.0) => {
                return bad("max_memory", "the fraction must be in (0, 1]");
            }
            _ => {}
        }
        if self.max_subkeys_per_owner == 0 {
            return bad("max_subkeys_per_owner", "must be positive");
        }
        if self.max_owner_bytes == 0 {
            return bad("max_owner_bytes", "must be positive");
        }
        if self.max_ttl.is_zero() {
            return bad("max_ttl", "must be positive");
        }
        if self.max_gossip_size == 0 {
            return bad("max_gossip_size", "must be positive");
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout", "must be positive");
        }
        if self.ping_interval.is_zero() {
            return bad("ping_interval", "must be positive");
        }
        if self.liveness_timeout <= self.ping_interval {
            return bad("liveness_timeout", "must exceed ping_interval");
        }
        if let Some(relay) = &self.relay_server {
            if self.client_mode {
                return bad("relay_server", "a client-mode node cannot relay");
            }
            if relay.max_reservations == 0
                || relay.max_circuits == 0
                || relay.max_circuits_per_peer == 0
                || relay.max_circuit_duration.is_zero()
                || relay.max_circuit_bytes == 0
            {
                return bad("relay_server", "every relay limit must be positive");
            }
        }
        if self.subscription_capacity == 0 || self.command_capacity == 0 {
            return bad(
                "subscription_capacity",
                "channel capacities must be positive",
            );
        }
        Ok(())
    }
}

/// An announce address must be something another host can dial over TCP.
fn check_announce(addr: &Multiaddr) -> Result<(), String> {
    use libp2p::multiaddr::Protocol;
    let mut parts = addr.iter();
    match parts.next() {
        Some(Protocol::Ip4(ip))
            if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() =>
        {
            return Err("not a unicast IP another host can dial".into());
        }
        Some(Protocol::Ip6(ip)) if ip.is_unspecified() || ip.is_multicast() => {
            return Err("not a unicast IP another host can dial".into());
        }
        Some(
            Protocol::Ip4(_)
            | Protocol::Ip6(_)
            | Protocol::Dns(_)
            | Protocol::Dns4(_)
            | Protocol::Dns6(_),
        ) => {}
        _ => return Err("must start with /ip4, /ip6, /dns, /dns4 or /dns6".into()),
    }
    match parts.next() {
        Some(Protocol::Tcp(0)) => return Err("the port must not be 0".into()),
        Some(Protocol::Tcp(_)) => {}
        _ => return Err("the second component must be /tcp/<port>".into()),
    }
    match (parts.next(), parts.next()) {
        (None, _) | (Some(Protocol::P2p(_)), None) => Ok(()),
        _ => Err("only a trailing /p2p/<peer id> may follow /tcp/<port>".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announce_addresses_must_be_dialable() {
        let with = |a: &str| DhtConfig {
            announce_addrs: vec![a.parse().unwrap()],
            ..DhtConfig::default()
        };
        for ok in [
            "/ip4/203.0.113.5/tcp/31337",
            "/dns4/peer.example.org/tcp/4001",
            "/ip6/2001:db8::1/tcp/1/p2p/12D3KooWA2urmz9ukwWEixQAoN6cCgVEBQaFgmXUmU4uJhvXfM92",
        ] {
            with(ok).validate().unwrap();
        }
        for bad in [
            "/ip4/0.0.0.0/tcp/31337",
            "/ip4/203.0.113.5/tcp/0",
            "/ip4/203.0.113.5/udp/4001",
            "/tcp/4001",
            "/ip4/203.0.113.5/tcp/1/ws",
        ] {
            let err = with(bad).validate().unwrap_err();
            assert!(
                matches!(&err, DhtError::Config { field: "announce_addrs", reason } if reason.contains(bad)),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn default_is_valid_and_client_needs_peers() {
        DhtConfig::default().validate().unwrap();
        assert!(matches!(
            DhtConfig::client(vec![]).validate(),
            Err(DhtError::Config {
                field: "initial_peers",
                ..
            })
        ));
        let c = DhtConfig {
            max_value_size: 2 << 20,
            ..DhtConfig::default()
        };
        assert!(matches!(
            c.validate(),
            Err(DhtError::Config {
                field: "max_value_size",
                ..
            })
        ));
    }
}
