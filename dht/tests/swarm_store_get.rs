//! Acceptance: 64 server + 8 client nodes in one process; every node reads
//! every key; 32 signed subkeys under one key merge for every reader.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use colony_dht::DhtValue;
use common::{expires_in, msgpack, swarm};
use futures::{StreamExt, stream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_64_servers_8_clients_every_node_gets_every_key() {
    common::init_tracing();
    let test = async {
        let start = Instant::now();
        let (servers, clients) = swarm(64, 64, 8).await;
        let nodes: Vec<_> = servers.iter().chain(clients.iter()).cloned().collect();
        eprintln!("started {} nodes in {:?}", nodes.len(), start.elapsed());

        // Clients never enter a server's routing table.
        let client_ids: Vec<_> = clients.iter().map(|c| c.peer_id()).collect();
        for s in servers.iter().take(8) {
            let table = s.routing_table().await.unwrap();
            assert!(!table.is_empty());
            assert!(
                table.iter().all(|p| !client_ids.contains(p)),
                "a client is in a routing table"
            );
        }

        // Each node stores one key.
        let expiration = expires_in(300.0);
        let stores = stream::iter(nodes.iter().enumerate().map(|(i, n)| async move {
            let key = format!("key-{i}");
            n.store(key.as_bytes(), None, msgpack(&(i as u64)), expiration)
                .await
        }))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
        for outcome in stores {
            let outcome = outcome.expect("store");
            assert!(outcome.is_stored(), "{outcome:?}");
        }
        eprintln!("stored {} keys at {:?}", nodes.len(), start.elapsed());

        // Every node gets every key.
        let pairs: Vec<(usize, usize)> = (0..nodes.len())
            .flat_map(|r| (0..nodes.len()).map(move |k| (r, k)))
            .collect();
        let results = stream::iter(pairs.into_iter().map(|(r, k)| {
            let node = nodes[r].clone();
            async move {
                let key = format!("key-{k}");
                (r, k, node.get(key.as_bytes(), false).await)
            }
        }))
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
        let mut found = 0;
        for (r, k, result) in &results {
            match result {
                Ok(Some(DhtValue::Regular {
                    value,
                    expiration: e,
                })) => {
                    assert_eq!(value, &msgpack(&(*k as u64)), "reader {r} key {k}");
                    assert_eq!(*e, expiration);
                    found += 1;
                }
                other => panic!("reader {r} key {k}: {other:?}"),
            }
        }
        assert_eq!(found, nodes.len() * nodes.len());
        eprintln!("{found} gets ok at {:?}", start.elapsed());

        // 32 peers (servers and clients) each write their own signed subkey.
        let writers: Vec<_> = servers
            .iter()
            .skip(1)
            .take(28)
            .chain(clients.iter().take(4))
            .cloned()
            .collect();
        assert_eq!(writers.len(), 32);
        let key = b"run_averaging.0b01";
        let stores = stream::iter(writers.iter().enumerate().map(|(i, w)| async move {
            w.store(
                key,
                Some(&w.owner_subkey()),
                msgpack(&(i as u32)),
                expires_in(120.0),
            )
            .await
        }))
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
        for s in stores {
            assert!(s.expect("subkey store").is_stored());
        }
        for reader in [&servers[0], &servers[40], &servers[63], &clients[7]] {
            let got = reader.get(key, true).await.expect("get").expect("found");
            let dict = got.as_dictionary().expect("dictionary");
            assert_eq!(dict.len(), 32, "reader {}", reader.peer_id());
            for (i, w) in writers.iter().enumerate() {
                assert_eq!(dict[&w.owner_subkey()].value, msgpack(&(i as u32)));
            }
        }
        eprintln!("32 subkeys merged at {:?}", start.elapsed());
        for n in &nodes {
            n.shutdown().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(170), test)
        .await
        .expect("test timed out");
}
