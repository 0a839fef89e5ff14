//! Two nodes with one identity (an identity file copied to a second host):
//! both learn of it through the presence record, and the later one is told
//! it is the newer. A restart after a crash, whose predecessor's record is
//! still alive, is not taken for a second node; nor is a clean restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use colony_dht::{Dht, DhtConfig, DhtValue, presence_key};
use common::{init_tracing, server_config};

fn config(seed: u64, i: usize, initial: Vec<colony_dht::Multiaddr>, every_ms: u64) -> DhtConfig {
    DhtConfig {
        identity_check_interval: Duration::from_millis(every_ms),
        ..server_config(seed, i, initial)
    }
}

/// The instance ids under `dht`'s presence key (records are msgpack arrays
/// `[instance, started, addrs]`; withdrawn entries are nil and skipped).
async fn instances(reader: &Dht, peer: colony_dht::PeerId) -> Vec<u64> {
    let Some(DhtValue::Dictionary(entries)) = reader.get(&presence_key(&peer), true).await.unwrap()
    else {
        return Vec::new();
    };
    entries
        .values()
        .filter_map(|e| rmp_serde::from_slice::<(u64, f64, Vec<String>)>(&e.value).ok())
        .map(|p| p.0)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_with_one_identity_both_learn_of_it() {
    init_tracing();
    let seed = 0x1d01;
    let boot = Dht::new(config(seed, 0, vec![], 300)).await.unwrap();
    let initial = boot.listen_addrs();
    let first = Dht::new(config(seed, 1, initial.clone(), 300))
        .await
        .unwrap();
    // Different clocks on different hosts: the second starts strictly later.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = Dht::new(config(seed, 1, initial, 300)).await.unwrap();
    assert_eq!(first.peer_id(), second.peer_id());
    let (a, b) = tokio::time::timeout(
        Duration::from_secs(15),
        futures::future::join(
            first.identity_conflict_seen(),
            second.identity_conflict_seen(),
        ),
    )
    .await
    .expect("both duplicates see the conflict within 15 s (50 checks)");
    assert!(!a.this_is_newer, "{a:?}");
    assert!(b.this_is_newer, "{b:?}");
    // Each names the other's addresses.
    assert!(
        a.other_addrs.iter().any(|x| second
            .listen_addrs()
            .iter()
            .any(|l| x.to_string().starts_with(&l.to_string()))),
        "{a:?} vs {:?}",
        second.listen_addrs()
    );
    assert!(a.to_string().contains("--identity"), "{a}");
    assert_eq!(boot.identity_conflict(), None);
    for d in [second, first, boot] {
        d.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_is_not_a_second_node() {
    init_tracing();
    let seed = 0x1d02;
    let boot = Dht::new(config(seed, 0, vec![], 300)).await.unwrap();
    let initial = boot.listen_addrs();
    // A crash: the node is dropped without shutdown, its presence record
    // (alive three check intervals) stays behind.
    let crashed = Dht::new(config(seed, 1, initial.clone(), 400))
        .await
        .unwrap();
    let peer = crashed.peer_id();
    let before = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let found = instances(&boot, peer).await;
            if !found.is_empty() {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("presence published within 10 s");
    drop(crashed);
    // Restarted at once: its first check finds the predecessor's record
    // still alive, started earlier and never refreshed again.
    let restarted = Dht::new(config(seed, 1, initial.clone(), 400))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = instances(&boot, peer).await;
    assert_eq!(after.len(), 1);
    assert_ne!(
        after, before,
        "the restarted node's record replaced the old one"
    );
    assert_eq!(restarted.identity_conflict(), None);
    // A clean restart: the same.
    restarted.shutdown().await;
    let again = Dht::new(config(seed, 1, initial, 400)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(again.identity_conflict(), None);
    for d in [again, boot] {
        d.shutdown().await;
    }
}
