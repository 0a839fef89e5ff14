//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod attacker;

use std::time::Duration;

use colony_dht::{Dht, DhtConfig, IdentitySource, Multiaddr};

/// Installs a test tracing subscriber (once); `RUST_LOG` controls it.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A deterministic secret for node `i` of a test (seeded swarms).
pub fn secret(seed: u64, i: usize) -> [u8; 32] {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&(i as u64).to_le_bytes());
    s[31] = 1;
    s
}

pub fn server_config(seed: u64, i: usize, initial: Vec<Multiaddr>) -> DhtConfig {
    DhtConfig {
        initial_peers: initial,
        identity: IdentitySource::Secret(secret(seed, i)),
        query_timeout: Duration::from_secs(10),
        ..DhtConfig::default()
    }
}

pub fn client_config(seed: u64, i: usize, initial: Vec<Multiaddr>) -> DhtConfig {
    DhtConfig {
        identity: IdentitySource::Secret(secret(seed, i)),
        ..DhtConfig::client(initial)
    }
}

/// Starts `servers` server nodes and `clients` client nodes, all bootstrapping
/// from the first server.
pub async fn swarm(seed: u64, servers: usize, clients: usize) -> (Vec<Dht>, Vec<Dht>) {
    let first = Dht::new(server_config(seed, 0, vec![]))
        .await
        .expect("first node");
    let initial = first.listen_addrs();
    let mut server_nodes = vec![first];
    for i in 1..servers {
        server_nodes.push(
            Dht::new(server_config(seed, i, initial.clone()))
                .await
                .expect("server"),
        );
    }
    let mut client_nodes = Vec::new();
    for i in 0..clients {
        client_nodes.push(
            Dht::new(client_config(seed, servers + i, initial.clone()))
                .await
                .expect("client"),
        );
    }
    (server_nodes, client_nodes)
}

/// A MessagePack value.
pub fn msgpack<T: serde::Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec(v).expect("msgpack")
}

/// `dht_time() + ttl_s`.
pub fn expires_in(ttl_s: f64) -> f64 {
    colony_dht::dht_time() + ttl_s
}
