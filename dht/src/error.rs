//! The crate's error types.

use libp2p::{Multiaddr, PeerId, gossipsub, kad};

/// Why a record failed validation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// The key or subkey holds a malformed owner marker, or names several owners.
    #[error("bad owner marker: {0}")]
    Owner(#[from] colony_schema::OwnerKeyError),
    /// The record names an owner but carries no signature.
    #[error("record names an owner but is not signed")]
    MissingSignature,
    /// The signature does not verify against the owner's key.
    #[error("signature does not verify for owner {owner}")]
    BadSignature {
        /// Hex of the owner public key named by the record.
        owner: String,
    },
    /// The owner named by the record is not a valid ed25519 public key.
    #[error("owner key is not a valid ed25519 point")]
    BadOwnerKey,
    /// A schema validator rejected the value.
    #[error("schema: {0}")]
    Schema(#[from] colony_schema::SchemaError),
    /// The expiration is not a finite time in the accepted window.
    #[error("expiration {expiration} outside the accepted window [{now}, {max}]")]
    Expiration {
        /// The record's expiration (DHT time, seconds).
        expiration: f64,
        /// The validating node's DHT time.
        now: f64,
        /// The latest accepted expiration.
        max: f64,
    },
    /// The value is larger than the configured limit.
    #[error("value of {size} bytes exceeds the limit of {limit} bytes")]
    ValueTooLarge {
        /// Value size in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The key is empty or larger than the configured limit.
    #[error("key of {size} bytes is empty or exceeds the limit of {limit} bytes")]
    BadKey {
        /// Key size in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The record bytes are not a valid wire record.
    #[error("malformed record: {reason}")]
    Malformed {
        /// What was wrong.
        reason: String,
    },
    /// A custom validator rejected the record.
    #[error("{validator}: {reason}")]
    Custom {
        /// The validator's name.
        validator: &'static str,
        /// Why it rejected the record.
        reason: String,
    },
}

/// Errors returned by [`Dht`](crate::Dht) operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DhtError {
    /// The configuration is inconsistent.
    #[error("invalid DHT config: field `{field}`: {reason}")]
    Config {
        /// The offending field.
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// A dial-back request to `peer` failed or its answer was malformed.
    #[error("dial-back via {peer}: {reason}")]
    DialBack {
        /// The peer asked.
        peer: libp2p::PeerId,
        /// What went wrong.
        reason: String,
    },
    /// The identity file could not be read, parsed or written.
    #[error("identity file {path}: {reason}")]
    Identity {
        /// The file path.
        path: std::path::PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The transport could not be built or could not listen.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// What went wrong.
        reason: String,
    },
    /// The swarm could not be built.
    #[error("cannot build the libp2p swarm: {reason}")]
    Transport {
        /// What went wrong.
        reason: String,
    },
    /// No initial peer could be reached.
    #[error("bootstrap failed: none of {tried} initial peers answered within {timeout_s} s")]
    Bootstrap {
        /// How many initial peers were tried.
        tried: usize,
        /// The bootstrap timeout in seconds.
        timeout_s: f64,
    },
    /// The record was rejected by this node's own validators before it was sent.
    #[error("record rejected: {0}")]
    Rejected(#[from] ValidationError),
    /// A remote operation did not finish in time.
    #[error("{operation} timed out after {timeout_s} s")]
    Timeout {
        /// The operation name.
        operation: &'static str,
        /// The timeout in seconds.
        timeout_s: f64,
    },
    /// Gossipsub refused to publish or subscribe.
    #[error("pubsub on topic `{topic}` failed")]
    PubSub {
        /// The topic.
        topic: String,
        /// Why it failed.
        #[source]
        source: PubSubError,
    },
    /// A stream to a peer could not be opened.
    #[error("cannot open stream to {peer}")]
    Stream {
        /// The remote peer.
        peer: PeerId,
        /// Why it failed.
        #[source]
        source: libp2p_stream::OpenStreamError,
    },
    /// A stream to a peer could not be opened: no connection, and a DHT lookup did
    /// not find the peer either.
    #[error("cannot open stream to {peer}: not connected, and the DHT does not know it")]
    PeerNotFound {
        /// The remote peer.
        peer: PeerId,
        /// Why the first attempt (before the lookup) failed.
        #[source]
        source: libp2p_stream::OpenStreamError,
    },
    /// Dialing a peer at the addresses found for it failed.
    #[error("cannot connect to {peer}: {reason}")]
    Dial {
        /// The remote peer.
        peer: PeerId,
        /// Why every address failed.
        reason: String,
    },
    /// This node's own record store refused a record it was about to publish.
    #[error("the local record store refused the record")]
    LocalStore(#[source] kad::store::Error),
    /// The stream protocol is already registered for accepting.
    #[error("protocol {protocol} already has an acceptor")]
    AlreadyRegistered {
        /// The protocol name.
        protocol: String,
    },
    /// The background task has stopped (after [`Dht::shutdown`](crate::Dht::shutdown) or a panic).
    #[error("the DHT node has shut down")]
    Shutdown,
}

/// Why gossipsub refused an operation ([`DhtError::PubSub`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PubSubError {
    /// The message is larger than `max_gossip_size`.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Message size in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// Gossipsub refused to publish (e.g. no connected peer subscribes to the topic).
    #[error("gossipsub refused to publish")]
    Publish(#[source] gossipsub::PublishError),
    /// Gossipsub refused the subscription.
    #[error("gossipsub refused to subscribe")]
    Subscribe(#[source] gossipsub::SubscriptionError),
}
