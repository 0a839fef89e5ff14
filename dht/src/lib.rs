//! `colony-dht`: the peer's network node — a signed-record Kademlia DHT on libp2p.
//!
//! One [`Dht`] owns one libp2p swarm (TCP + noise + yamux) that carries
//! Kademlia (records with expirations and per-subkey dictionaries), gossipsub,
//! identify, and streams other crates open through [`Dht::open_stream`] /
//! [`Dht::accept_streams`].
//!
//! - Values expire at an absolute [`dht_time`]; a store with an expiration not
//!   later than the stored one loses; expired values are never returned.
//! - A key or subkey containing an owner marker ([`colony_schema::OwnerKey`],
//!   see [`Dht::owner_subkey`]) must be signed by that owner
//!   ([`Ed25519SignatureValidator`]); this node signs its own records.
//! - Validators ([`RecordValidator`], e.g. [`SchemaRecordValidator`]) run on
//!   every storing node (`StoreInserts::FilterBoth`) and on every reader.
//! - A node's owner key is its libp2p identity key: [`peer_id_of_owner`] maps
//!   one to the other, [`GossipMessage::is_from_owner`] checks that a gossip
//!   message speaks for an owner, and [`LatestPerOwner`] keeps pushed records
//!   with the DHT's merge rule (later expiration wins).
//!
//! # Wire format (version 1)
//!
//! The value of every libp2p-kad record this crate puts or serves is a
//! MessagePack array `[1, [[subkey: bin | nil, value: bin, expiration: float64], ...]]`
//! ([`encode_wire`] / [`decode_wire`]). The kad record key is the raw DHT key.
//! A regular value is one entry with a nil subkey; a dictionary is one or more
//! entries with distinct binary subkeys. A put carries only the entries being
//! written; a get answer carries every unexpired entry the node holds. `value`
//! is the signed value: MessagePack payload followed by validator trailers
//! (ed25519: `[signature:` + 64 bytes + `]` over
//! `"colony-dht/record/v1" || msgpack([key, subkey, value, expiration])`).
//! The kad record's `publisher` and `expires` fields are ignored.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), colony_dht::DhtError> {
//! use colony_dht::{Dht, DhtConfig, dht_time};
//!
//! let first = Dht::new(DhtConfig::default()).await?;
//! let second = Dht::new(DhtConfig {
//!     initial_peers: first.listen_addrs(),
//!     ..DhtConfig::default()
//! })
//! .await?;
//! // A signed subkey only `second` can overwrite; the value is MessagePack.
//! second
//!     .store(b"run_progress", Some(&second.owner_subkey()), vec![0x2a], dht_time() + 60.0)
//!     .await?;
//! let found = first.get(b"run_progress", true).await?;
//! assert!(found.is_some());
//! # Ok(())
//! # }
//! ```

mod admission;
mod behaviour;
mod config;
mod dht;
mod dialback;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod gossip;
mod identity;
mod memory;
mod node;
mod owner;
mod record;
mod schema;
mod signature;
mod storage;
mod streams;
mod time;
mod validation;
mod value;
mod verify;

pub use behaviour::{AGENT_VERSION, IDENTIFY_PROTOCOL, KAD_PROTOCOL};
pub use config::{DhtConfig, IdentitySource, RelayLimits};
pub use dht::{Dht, IdentityConflict, presence_key, relay_addrs_key};
pub use dialback::{DIAL_TIMEOUT, DIALBACK_PROTOCOL, DialBack, MAX_PORTS, PortCheck};
pub use error::{DhtError, PubSubError, ValidationError};
pub use gossip::{GossipValidator, LatestPerOwner};
pub use identity::{create_identity_file, read_identity_file};
pub use memory::{MemoryCap, MemoryCapExceeded};
pub use node::{GossipMessage, NodeStats, PeerAddresses, PeerPath};
pub use owner::{PeerSigner, owner_key_from_secret, peer_id_of_owner, verify_peer_signature};
pub use record::{DhtRecord, WIRE_VERSION, WireEntry, decode_wire, encode_wire};
pub use schema::SchemaRecordValidator;
pub use signature::{
    Ed25519SignatureValidator, SIGNATURE_PREFIX, SIGNATURE_PRIORITY, SIGNATURE_TRAILER_LEN,
};
pub use streams::InboundStreamQueue;
pub use time::dht_time;
pub use validation::{CompositeValidator, RecordValidator};
pub use value::{DhtValue, StoreOutcome, ValueWithExpiration};

/// The owner key type of owner markers (re-exported from `colony-schema`).
pub use colony_schema::OwnerKey;

/// Re-exports of the libp2p types in this crate's API.
pub use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol, multiaddr::Protocol};
