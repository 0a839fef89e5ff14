//! `colony-dht`: the peer's network node — a signed-record Kademlia DHT on libp2p.
//!
//! This crate is being built under the DHT issue; it exports nothing yet.
