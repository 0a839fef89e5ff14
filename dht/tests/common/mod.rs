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
/// from the first server. Their identity checks are off: each is a lookup
/// and a store per node per interval, which in one debug process running
/// 72 nodes on two cores slows the store/get traffic under test by about a
/// quarter (tests/presence.rs covers the check).
pub async fn swarm(seed: u64, servers: usize, clients: usize) -> (Vec<Dht>, Vec<Dht>) {
    let quiet = |c: DhtConfig| DhtConfig {
        identity_check_interval: Duration::ZERO,
        ..c
    };
    let first = Dht::new(quiet(server_config(seed, 0, vec![])))
        .await
        .expect("first node");
    let initial = first.listen_addrs();
    // Start in batches: bootstraps run concurrently, which keeps the 72-node
    // test short on 2 cores.
    let mut server_nodes = vec![first];
    for batch in (1..servers).collect::<Vec<_>>().chunks(8) {
        let started = futures::future::join_all(
            batch
                .iter()
                .map(|&i| Dht::new(quiet(server_config(seed, i, initial.clone())))),
        )
        .await;
        server_nodes.extend(started.into_iter().map(|r| r.expect("server")));
    }
    let started = futures::future::join_all(
        (0..clients).map(|i| Dht::new(quiet(client_config(seed, servers + i, initial.clone())))),
    )
    .await;
    let client_nodes: Vec<Dht> = started.into_iter().map(|r| r.expect("client")).collect();
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
