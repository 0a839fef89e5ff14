//! The combined libp2p behaviour and swarm construction.

use std::num::NonZeroUsize;

use libp2p::{
    StreamProtocol, Swarm, allow_block_list, autonat, connection_limits, dcutr, gossipsub,
    identify,
    identity::Keypair,
    kad::{self, Caching, Mode, StoreInserts},
    noise, ping, relay,
    swarm::{NetworkBehaviour, behaviour::toggle::Toggle},
    tcp, yamux,
};

use crate::{
    config::DhtConfig,
    error::DhtError,
    storage::{ColonyStore, LocalStorage},
    streams::{InboundRegistry, InboundStreams},
};

/// The Kademlia protocol name of Colony swarms.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/colony/kad/1.0.0");
/// The identify protocol version string of Colony nodes.
pub const IDENTIFY_PROTOCOL: &str = "/colony/1.0.0";

/// The agent version identify reports: this crate and its version.
pub const AGENT_VERSION: &str = concat!("colony/", env!("CARGO_PKG_VERSION"));

/// Room for closer-peer lists and framing in one kad message, on top of a record.
const KAD_PACKET_OVERHEAD: usize = 64 * 1024;

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    /// Connection caps (in all, pending inbound, per peer): first, so a
    /// connection past them is denied before any other behaviour sees it.
    pub(crate) limits: connection_limits::Behaviour,
    /// New connections denied while resident memory is over its cap.
    pub(crate) memory: crate::memory::MemoryLimits,
    /// A closed run's admission: connections with peers off
    /// [`DhtConfig::allowed_peers`] are denied (off: an open run).
    pub(crate) allow: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    pub(crate) kad: kad::Behaviour<ColonyStore>,
    pub(crate) gossipsub: gossipsub::Behaviour,
    pub(crate) identify: identify::Behaviour,
    /// Liveness: a connection whose ping goes unanswered is closed, so
    /// queries and streams stop waiting on a peer that has vanished.
    pub(crate) ping: ping::Behaviour,
    /// Outbound application streams (`Dht::open_stream`); no protocol is
    /// ever registered with it for accepting.
    pub(crate) stream: libp2p_stream::Behaviour,
    /// Inbound application streams (`Dht::accept_streams`).
    pub(crate) inbound: InboundStreams,
    /// Circuit relay v2, client side: reservations on relays (a node
    /// behind NAT listens through them) and dials through them.
    pub(crate) relay_client: relay::client::Behaviour,
    /// Circuit relay v2, server side, when [`DhtConfig::relay_server`] is set.
    pub(crate) relay: Toggle<relay::Behaviour>,
    /// Hole punching (DCUtR) over relayed connections.
    pub(crate) dcutr: dcutr::Behaviour,
    /// AutoNAT v2, client side: confirms observed addresses as reachable
    /// by asking peers to dial them back on a fresh port.
    pub(crate) autonat: autonat::v2::client::Behaviour,
    /// AutoNAT v2, server side, on nodes that listen.
    pub(crate) autonat_server: Toggle<autonat::v2::server::Behaviour>,
}

fn nonzero(field: &'static str, n: usize) -> Result<NonZeroUsize, DhtError> {
    NonZeroUsize::new(n).ok_or(DhtError::Config {
        field,
        reason: "must be at least 1".into(),
    })
}

/// Builds the swarm: TCP (and circuits through relays) + noise + yamux
/// carrying kad, gossipsub, identify, ping, streams, relay, DCUtR and AutoNAT;
/// inbound streams are delivered to the acceptors in `inbound`.
pub(crate) fn build_swarm(
    config: &DhtConfig,
    keypair: Keypair,
    inbound: InboundRegistry,
) -> Result<Swarm<Behaviour>, DhtError> {
    let transport_err = |e: &dyn std::fmt::Display| DhtError::Transport {
        reason: e.to_string(),
    };
    let peer_id = keypair.public().to_peer_id();

    let mut kad_config = kad::Config::new(KAD_PROTOCOL);
    kad_config
        .set_query_timeout(config.query_timeout)
        .set_replication_factor(nonzero("replication", config.replication)?)
        .set_parallelism(nonzero("parallelism", config.parallelism)?)
        .set_record_ttl(None)
        .set_record_filtering(StoreInserts::FilterBoth)
        .set_replication_interval(None)
        .set_publication_interval(None)
        .set_provider_publication_interval(None)
        .set_max_packet_size(config.max_record_size + KAD_PACKET_OVERHEAD)
        .set_caching(Caching::Disabled);
    let store = ColonyStore::new(
        peer_id,
        LocalStorage::new(
            config.max_records,
            config.max_record_size,
            config.owner_caps(),
        ),
    );
    let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
    kad.set_mode(Some(if config.client_mode {
        Mode::Client
    } else {
        Mode::Server
    }));

    let gossip_config = gossipsub::ConfigBuilder::default()
        .max_transmit_size(config.max_gossip_size)
        .validation_mode(gossipsub::ValidationMode::Strict)
        // Nothing is forwarded before the subscribers' validators accept it.
        .validate_messages()
        .build()
        .map_err(|e| transport_err(&e))?;
    let mut gossipsub = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(keypair.clone()),
        gossip_config,
    )
    .map_err(|e| transport_err(&e))?;
    gossipsub
        .with_peer_score(
            peer_score_params(),
            gossipsub::PeerScoreThresholds::default(),
        )
        .map_err(|e| transport_err(&e))?;
    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL.to_owned(), keypair.public())
            .with_agent_version(AGENT_VERSION.to_owned())
            // Announced addresses replace the listen addresses (a private
            // bind behind a port forward is no use to anyone else).
            .with_hide_listen_addrs(!config.announce_addrs.is_empty()),
    );
    let ping = ping::Behaviour::new(
        ping::Config::new()
            .with_interval(config.ping_interval)
            .with_timeout(config.liveness_timeout),
    );
    let relay = config.relay_server.as_ref().map(|limits| {
        relay::Behaviour::new(
            peer_id,
            relay::Config {
                max_reservations: limits.max_reservations,
                max_reservations_per_peer: 2,
                max_circuits: limits.max_circuits,
                max_circuits_per_peer: limits.max_circuits_per_peer,
                max_circuit_duration: limits.max_circuit_duration,
                max_circuit_bytes: limits.max_circuit_bytes,
                ..relay::Config::default()
            },
        )
    });
    // Every node that listens can dial others back for AutoNAT (one that
    // starts in client mode may turn server once it knows it is reachable).
    let autonat_server =
        (!config.listen_addrs.is_empty()).then(autonat::v2::server::Behaviour::default);
    let idle = config.idle_connection_timeout;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| transport_err(&e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| transport_err(&e))?
        .with_behaviour(|_, relay_client| Behaviour {
            limits: connection_limits::Behaviour::new(
                connection_limits::ConnectionLimits::default()
                    .with_max_established(Some(config.max_connections))
                    .with_max_pending_incoming(Some(config.max_pending_incoming))
                    .with_max_established_per_peer(Some(config.max_connections_per_peer)),
            ),
            memory: crate::memory::MemoryLimits::new(config.max_memory),
            allow: Toggle::from(config.allowed_peers.as_ref().map(|peers| {
                let mut allow =
                    allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
                for peer in peers {
                    allow.allow_peer(*peer);
                }
                allow
            })),
            kad,
            gossipsub,
            identify,
            ping,
            stream: libp2p_stream::Behaviour::new(),
            inbound: InboundStreams::new(inbound),
            relay_client,
            relay: Toggle::from(relay),
            dcutr: dcutr::Behaviour::new(peer_id),
            autonat: autonat::v2::client::Behaviour::default(),
            autonat_server: Toggle::from(autonat_server),
        })
        .map_err(|e| transport_err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .with_connection_timeout(config.connect_timeout)
        .build();
    Ok(swarm)
}

/// Gossipsub peer scoring: peers lose score for invalid messages (see
/// [`topic_score_params`]) and protocol misbehaviour, and those below the
/// default thresholds get no gossip, then are ignored. IP colocation is not
/// penalised: volunteers behind one NAT, and every test swarm on loopback,
/// share an address.
fn peer_score_params() -> gossipsub::PeerScoreParams {
    gossipsub::PeerScoreParams {
        ip_colocation_factor_weight: 0.0,
        ..gossipsub::PeerScoreParams::default()
    }
}

/// Per-topic scoring: only invalid deliveries (P4) count, heavily, decaying
/// over a few minutes. Mesh delivery rates (P3) are off: progress topics are
/// quiet by design, and a quiet honest peer must not look like a bad one.
pub(crate) fn topic_score_params() -> gossipsub::TopicScoreParams {
    gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.0,
        first_message_deliveries_weight: 0.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -20.0,
        invalid_message_deliveries_decay: 0.9,
        ..gossipsub::TopicScoreParams::default()
    }
}
