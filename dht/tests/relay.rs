//! Peers with no inbound route: they reserve a slot on a relay, publish the
//! circuit in the DHT, and others reach them through it (with DCUtR
//! upgrading to a direct connection where one can be made). A record that
//! claims circuits for another peer is ignored. Relays that drop traffic: one
//! whose circuits are too small for data is swapped for a larger one, and
//! one whose circuits keep failing is left.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use colony_dht::{
    Dht, DhtConfig, DhtError, PeerId, PeerPath, RelayLimits, StreamProtocol, relay_addrs_key,
};
use common::{client_config, expires_in, init_tracing, msgpack, secret, server_config};
use futures::{AsyncReadExt, AsyncWriteExt};

const PROTOCOL: StreamProtocol = StreamProtocol::new("/colony-test/relay-echo/1");
const PAYLOAD: usize = 1 << 20;

/// Waits (bounded) until `dht` listens through a relay and has published
/// the circuit.
async fn relayed(dht: &Dht) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while dht.relay_addrs().is_empty()
            || dht
                .get(&relay_addrs_key(&dht.peer_id()), true)
                .await
                .unwrap()
                .is_none()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("no relay reservation published within 20 s");
}

/// Serves one echo stream on `dht`: reads PAYLOAD bytes, writes them back.
fn echo(dht: &Dht) -> tokio::task::JoinHandle<PeerId> {
    let mut incoming = dht.accept_streams(PROTOCOL, 4).unwrap();
    tokio::spawn(async move {
        let (peer, mut stream) = incoming.recv().await.expect("a stream");
        let mut buf = vec![0u8; PAYLOAD];
        stream.read_exact(&mut buf).await.unwrap();
        stream.write_all(&buf).await.unwrap();
        stream.close().await.unwrap();
        peer
    })
}

/// Sends PAYLOAD bytes to `to` and checks the echo.
async fn round_trip(from: &Dht, to: PeerId) {
    let mut stream = from.open_stream(to, PROTOCOL).await.expect("open_stream");
    let data: Vec<u8> = (0..PAYLOAD).map(|i| (i % 251) as u8).collect();
    stream.write_all(&data).await.unwrap();
    let mut back = vec![0u8; PAYLOAD];
    stream.read_exact(&mut back).await.unwrap();
    assert!(back == data, "echo differs");
}

/// A client that listens nowhere (only a relay brings peers to it), with a
/// short hole-punch wait: there is nothing to punch to.
fn hidden_config(seed: u64, i: usize, initial: Vec<colony_dht::Multiaddr>) -> DhtConfig {
    DhtConfig {
        hole_punch_wait: Duration::from_millis(500),
        ..client_config(seed, i, initial)
    }
}

fn relay_config(seed: u64) -> DhtConfig {
    DhtConfig {
        relay_server: Some(RelayLimits::default()),
        ..server_config(seed, 0, vec![])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_listens_nowhere_is_reached_through_a_relay() {
    init_tracing();
    let seed = 0x7e1a;
    let relay = Dht::new(relay_config(seed)).await.unwrap();
    let initial = relay.listen_addrs();
    // A client that listens nowhere: only the relay can bring peers to it,
    // and there is nothing to hole-punch to.
    let hidden = Dht::new(hidden_config(seed, 1, initial.clone()))
        .await
        .unwrap();
    relayed(&hidden).await;
    assert!(hidden.is_dialable());
    let server = echo(&hidden);
    let opener = Dht::new(server_config(seed, 2, initial)).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        round_trip(&opener, hidden.peer_id()),
    )
    .await
    .expect("1 MiB round trip through the relay within 30 s");
    assert_eq!(server.await.unwrap(), opener.peer_id());
    let paths = opener.paths().await.unwrap();
    assert!(
        paths.contains(&(hidden.peer_id(), PeerPath::Relayed)),
        "{paths:?}"
    );
    let stats = relay.stats().await.unwrap();
    assert!(stats.circuits_served >= 1, "{stats:?}");
    assert!(hidden.stats().await.unwrap().relay_reservations >= 1);
    for d in [opener, hidden, relay] {
        d.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_connection_is_upgraded_by_hole_punching() {
    init_tracing();
    let seed = 0x7e1b;
    let relay = Dht::new(relay_config(seed)).await.unwrap();
    let initial = relay.listen_addrs();
    // Client mode (in no routing table, so only its circuit leads to it), but
    // listening: on loopback the hole punch can always connect.
    let hidden = Dht::new(DhtConfig {
        client_mode: true,
        listen_addrs: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        ..server_config(seed, 1, initial.clone())
    })
    .await
    .unwrap();
    // Listening, it asks relays only once told it is unreachable.
    assert!(hidden.relay_addrs().is_empty());
    hidden.set_client_mode(true).await.unwrap();
    relayed(&hidden).await;
    let server = echo(&hidden);
    let opener = Dht::new(server_config(seed, 2, initial)).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        round_trip(&opener, hidden.peer_id()),
    )
    .await
    .expect("round trip within 30 s");
    server.await.unwrap();
    let path = opener.path_to(hidden.peer_id()).await.unwrap();
    let stats = (opener.stats().await.unwrap(), hidden.stats().await.unwrap());
    assert_eq!(path, Some(PeerPath::HolePunched), "{stats:?}");
    assert!(stats.0.hole_punches_succeeded + stats.1.hole_punches_succeeded >= 1);
    // The circuit was closed once the direct connection came up.
    assert_eq!(stats.0.relayed_connections, 0, "{stats:?}");
    for d in [opener, hidden, relay] {
        d.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuits_published_for_another_peer_are_ignored() {
    init_tracing();
    let seed = 0x7e1c;
    let relay = Dht::new(relay_config(seed)).await.unwrap();
    let initial = relay.listen_addrs();
    let liar = Dht::new(server_config(seed, 1, initial.clone()))
        .await
        .unwrap();
    let opener = Dht::new(server_config(seed, 2, initial)).await.unwrap();
    // A peer id nobody runs: the liar publishes a circuit "to" it under its
    // own owner marker (the only subkey it can sign), pointing at itself.
    let victim = PeerId::random();
    let fake = format!("{}/p2p-circuit/p2p/{victim}", liar.listen_addrs()[0]);
    liar.store(
        &relay_addrs_key(&victim),
        Some(&liar.owner_subkey()),
        msgpack(&vec![fake]),
        expires_in(60.0),
    )
    .await
    .unwrap();
    let err = opener
        .open_stream(victim, PROTOCOL)
        .await
        .expect_err("no circuit to an unknown peer");
    assert!(matches!(err, DhtError::PeerNotFound { .. }), "{err:?}");
    for d in [opener, liar, relay] {
        d.shutdown().await;
    }
}

/// The peer id node `i` of a seeded test will have.
fn peer_of(seed: u64, i: usize) -> PeerId {
    colony_dht::peer_id_of_owner(&colony_dht::owner_key_from_secret(secret(seed, i))).unwrap()
}

/// A relay whose circuits end after 128 KiB: enough to coordinate a hole
/// punch, not to carry averaging data.
fn small_relay_config(seed: u64, i: usize, initial: Vec<colony_dht::Multiaddr>) -> DhtConfig {
    DhtConfig {
        relay_server: Some(RelayLimits {
            max_circuit_bytes: 128 << 10,
            ..RelayLimits::default()
        }),
        ..server_config(seed, i, initial)
    }
}

/// Waits (bounded) until `reader` finds `peer`'s published circuits and
/// every one goes through `relay`.
async fn published_only_through(reader: &Dht, peer: PeerId, relay: PeerId) {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(colony_dht::DhtValue::Dictionary(d)) =
                reader.get(&relay_addrs_key(&peer), true).await.unwrap()
            {
                let addrs: Vec<String> = d
                    .values()
                    .filter_map(|e| rmp_serde::from_slice::<Vec<String>>(&e.value).ok())
                    .flatten()
                    .collect();
                if !addrs.is_empty()
                    && addrs
                        .iter()
                        .all(|a| a.contains(&format!("/p2p/{relay}/p2p-circuit")))
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("circuits through the expected relay published within 20 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_with_circuits_too_small_for_data_is_swapped_for_a_larger_one() {
    init_tracing();
    let seed = 0x7e1d;
    // The hidden node asks relays in id order: the small one must come first.
    let (small_i, big_i) = if peer_of(seed, 0) < peer_of(seed, 1) {
        (0, 1)
    } else {
        (1, 0)
    };
    let small = Dht::new(small_relay_config(seed, small_i, vec![]))
        .await
        .unwrap();
    let big = Dht::new(DhtConfig {
        relay_server: Some(RelayLimits::default()),
        ..server_config(seed, big_i, small.listen_addrs())
    })
    .await
    .unwrap();
    let hidden = Dht::new(DhtConfig {
        max_relays: 1,
        ..hidden_config(seed, 2, small.listen_addrs())
    })
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let addrs = hidden.relay_addrs();
            if addrs.len() == 1
                && addrs[0]
                    .to_string()
                    .contains(&format!("/p2p/{}/p2p-circuit", big.peer_id()))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the hidden node moved to the relay with larger circuits within 20 s");
    let opener = Dht::new(server_config(seed, 3, big.listen_addrs()))
        .await
        .unwrap();
    published_only_through(&opener, hidden.peer_id(), big.peer_id()).await;
    let server = echo(&hidden);
    // 1 MiB: eight times what the small relay would carry.
    tokio::time::timeout(
        Duration::from_secs(30),
        round_trip(&opener, hidden.peer_id()),
    )
    .await
    .expect("1 MiB round trip through the larger relay within 30 s");
    assert_eq!(server.await.unwrap(), opener.peer_id());
    assert_eq!(small.stats().await.unwrap().circuits_served, 0);
    for d in [opener, hidden, big, small] {
        d.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_cuts_circuits_is_left_after_three() {
    init_tracing();
    let seed = 0x7e1e;
    let relay = Dht::new(small_relay_config(seed, 0, vec![])).await.unwrap();
    let initial = relay.listen_addrs();
    let hidden = Dht::new(hidden_config(seed, 1, initial.clone()))
        .await
        .unwrap();
    // The only relay at hand: kept for now, though its circuits are small.
    relayed(&hidden).await;
    let opener = Dht::new(server_config(seed, 2, initial)).await.unwrap();
    let mut incoming = hidden.accept_streams(PROTOCOL, 4).unwrap();
    let sink = tokio::spawn(async move {
        // Reads whatever arrives; every stream is cut by the relay.
        while let Some((_, mut stream)) = incoming.recv().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    let data = vec![7u8; PAYLOAD];
    let mut cut = 0;
    for _ in 0..3 {
        let sent = tokio::time::timeout(Duration::from_secs(20), async {
            let mut s = opener.open_stream(hidden.peer_id(), PROTOCOL).await?;
            s.write_all(&data).await?;
            s.flush().await?;
            let mut back = [0u8; 1];
            // The echo never comes: the relay cuts the circuit first.
            s.read_exact(&mut back).await?;
            anyhow::Ok(())
        })
        .await
        .expect("each attempt ends within 20 s");
        assert!(
            sent.is_err(),
            "1 MiB went through a relay that carries 128 KiB"
        );
        cut += 1;
        // The next attempt dials a fresh circuit.
        tokio::time::timeout(Duration::from_secs(10), async {
            while opener.path_to(hidden.peer_id()).await.unwrap().is_some() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the cut circuit closes within 10 s");
    }
    assert_eq!(cut, 3);
    // Three failed circuits: the hidden node leaves the relay (and publishes
    // no circuit through it), the opener holds it suspect.
    tokio::time::timeout(Duration::from_secs(10), async {
        while !hidden.relay_addrs().is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the hidden node leaves the cutting relay within 10 s");
    assert_eq!(hidden.stats().await.unwrap().relay_reservations, 0);
    sink.abort();
    for d in [opener, hidden, relay] {
        d.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_relay_ends_at_once_when_no_peer_relays() {
    init_tracing();
    let seed = 0x7e1f;
    let plain = Dht::new(server_config(seed, 0, vec![])).await.unwrap();
    let hidden = Dht::new(client_config(seed, 1, plain.listen_addrs()))
        .await
        .unwrap();
    assert!(hidden.stats().await.unwrap().connected_peers >= 1);
    let started = std::time::Instant::now();
    assert!(
        hidden
            .wait_for_relay(Duration::from_secs(5))
            .await
            .is_empty()
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "waited {:?} with no relay at hand",
        started.elapsed()
    );
    for d in [hidden, plain] {
        d.shutdown().await;
    }
}
