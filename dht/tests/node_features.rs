//! Expiration, withdrawal, pub/sub, streams, identity files, shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use colony_dht::{
    Dht, DhtConfig, DhtError, DhtValue, IdentitySource, PubSubError, StreamProtocol, dht_time,
};
use common::{expires_in, msgpack, swarm};
use futures::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(60);

async fn sleep_until_dht_time(t: f64) {
    let wait = (t - dht_time()).max(0.0);
    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiration_ordering_and_withdrawal() {
    common::init_tracing();
    tokio::time::timeout(T, async {
        let (nodes, clients) = swarm(11, 4, 1).await;
        let (a, b, c) = (&nodes[1], &nodes[2], &clients[0]);

        // Newer expiration wins; older or equal loses, everywhere.
        let e = expires_in(60.0);
        assert!(
            a.store(b"k", None, msgpack(&1), e)
                .await
                .unwrap()
                .is_stored()
        );
        assert!(
            b.store(b"k", None, msgpack(&2), e + 1.0)
                .await
                .unwrap()
                .is_stored()
        );
        let lost = b.store(b"k", None, msgpack(&3), e + 0.5).await.unwrap();
        assert!(!lost.accepted);
        for n in nodes.iter().chain(clients.iter()) {
            let got = n.get(b"k", true).await.unwrap();
            assert_eq!(
                got,
                Some(DhtValue::Regular {
                    value: msgpack(&2),
                    expiration: e + 1.0
                })
            );
        }

        // A short-lived value disappears from every node once expired.
        let short = expires_in(1.5);
        assert!(
            c.store(b"short", None, msgpack(&"x"), short)
                .await
                .unwrap()
                .is_stored()
        );
        assert!(a.get(b"short", false).await.unwrap().is_some());
        sleep_until_dht_time(short + 0.05).await;
        for n in &nodes {
            assert_eq!(n.get(b"short", true).await.unwrap(), None);
            assert_eq!(n.get(b"short", false).await.unwrap(), None);
        }

        // Subkeys: each writer its own; nil with a later expiration withdraws.
        let key = b"group";
        let e = expires_in(60.0);
        for n in [a, b, c] {
            assert!(
                n.store(key, Some(&n.owner_subkey()), msgpack(&true), e)
                    .await
                    .unwrap()
                    .is_stored()
            );
        }
        assert!(
            a.store(key, Some(&a.owner_subkey()), vec![0xc0], e + 0.001)
                .await
                .unwrap()
                .is_stored()
        );
        let short = expires_in(1.5);
        assert!(
            b.store(key, Some(b"unowned-short"), msgpack(&1), short)
                .await
                .unwrap()
                .is_stored()
        );
        let got = nodes[3].get(key, true).await.unwrap().unwrap();
        let d = got.as_dictionary().unwrap();
        assert_eq!(d.len(), 4);
        assert_eq!(d[&a.owner_subkey()].value, vec![0xc0]);
        assert_eq!(d[&b.owner_subkey()].value, msgpack(&true));
        sleep_until_dht_time(short + 0.05).await;
        let got = nodes[0].get(key, true).await.unwrap().unwrap();
        assert_eq!(
            got.as_dictionary().unwrap().len(),
            3,
            "expired subkey dropped"
        );
        for n in nodes.iter().chain(clients.iter()) {
            n.shutdown().await;
        }
    })
    .await
    .expect("test timed out");
}

/// A subscriber's validator keeps junk from being delivered (or forwarded), and the
/// peer that pushed it loses gossip score.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_that_fails_validation_is_dropped_and_costs_score() {
    common::init_tracing();
    tokio::time::timeout(T, async {
        let (nodes, _) = swarm(13, 3, 0).await;
        let (liar, reader) = (&nodes[0], &nodes[1]);
        let validator: colony_dht::GossipValidator = std::sync::Arc::new(|m| m.data != b"junk");
        let mut sub = reader
            .subscribe_validated("topic", validator)
            .await
            .unwrap();
        // Wait until the subscription is known to the publisher.
        let mut attempts = 0;
        loop {
            attempts += 1;
            if liar.publish("topic", b"hello".to_vec()).await.is_ok()
                && let Ok(Some(m)) =
                    tokio::time::timeout(Duration::from_millis(500), sub.recv()).await
            {
                assert_eq!(m.data, b"hello");
                break;
            }
            assert!(attempts < 40, "gossip never reached the subscriber");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let before = reader.gossip_score(liar.peer_id()).await.unwrap();
        for _ in 0..10 {
            liar.publish("topic", b"junk".to_vec()).await.unwrap();
        }
        // The reader reports each junk message as it validates it (bounded wait).
        let mut after = None;
        for _ in 0..100 {
            after = reader.gossip_score(liar.peer_id()).await.unwrap();
            if after.is_some_and(|s| s < 0.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("gossip score of the junk pusher: before {before:?}, after {after:?}");
        assert!(after.is_some_and(|s| s < 0.0), "score {after:?}");
        // An honest third peer's message still arrives, and it is the first thing
        // delivered: none of the junk got through. (The liar itself ends up below
        // the graylist threshold, so the reader ignores everything it sends next.)
        let honest = &nodes[2];
        let mut attempts = 0;
        let m = loop {
            attempts += 1;
            let _ = honest
                .publish("topic", format!("after {attempts}").into_bytes())
                .await;
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), sub.recv()).await
            {
                break m;
            }
            assert!(attempts < 20, "the honest peer's gossip never arrived");
        };
        assert!(
            m.data.starts_with(b"after"),
            "junk was delivered: {:?}",
            m.data
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_and_streams() {
    common::init_tracing();
    tokio::time::timeout(T, async {
        let (nodes, clients) = swarm(12, 4, 1).await;
        let client = &clients[0];
        let mut subs = Vec::new();
        for n in nodes.iter().skip(1) {
            subs.push(n.subscribe("progress").await.unwrap());
        }
        // Publishing fails until some peer's subscription is known; then
        // gossipsub's flood publishing reaches every subscriber.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match client.publish("progress", b"hello".to_vec()).await {
                Ok(()) => {
                    let mut all = true;
                    for s in &mut subs {
                        match tokio::time::timeout(Duration::from_millis(500), s.recv()).await {
                            Ok(Some(m)) => {
                                assert_eq!(m.data, b"hello");
                                assert_eq!(m.source, Some(client.peer_id()));
                            }
                            _ => all = false,
                        }
                    }
                    if all {
                        break;
                    }
                }
                Err(DhtError::PubSub { .. }) => {}
                Err(e) => panic!("{e}"),
            }
            assert!(attempts < 40, "gossip never reached all subscribers");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let too_big = vec![0u8; DhtConfig::default().max_gossip_size + 1];
        assert!(matches!(
            client.publish("progress", too_big).await,
            Err(DhtError::PubSub {
                source: PubSubError::TooLarge { .. },
                ..
            })
        ));

        // Streams: the server accepts; the client (which dialed it) and a
        // server found through the DHT open streams by peer id.
        let protocol = StreamProtocol::new("/colony/test-echo/1");
        let server = nodes[3].clone();
        let mut incoming = server.accept_streams(protocol.clone(), 8).unwrap();
        assert!(matches!(
            server.accept_streams(protocol.clone(), 8),
            Err(DhtError::AlreadyRegistered { .. })
        ));
        let echo = tokio::spawn(async move {
            for _ in 0..2 {
                let (_, mut s) = incoming.recv().await.expect("stream");
                let mut buf = [0u8; 4];
                s.read_exact(&mut buf).await.unwrap();
                s.write_all(&buf).await.unwrap();
                s.close().await.unwrap();
            }
        });
        for opener in [client, &nodes[1]] {
            let mut s = opener
                .open_stream(server.peer_id(), protocol.clone())
                .await
                .unwrap_or_else(|e| panic!("open_stream from {}: {e:?}", opener.peer_id()));
            s.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
        }
        echo.await.unwrap();

        // The server can reach the client-mode peer over its inbound connection
        // and knows the address it dialed from.
        let addrs = server
            .peer_addresses(client.peer_id())
            .await
            .unwrap()
            .expect("connected");
        assert!(
            addrs
                .connected
                .iter()
                .any(|a| a.to_string().starts_with("/ip4/127.0.0.1/tcp/"))
        );
        assert!(addrs.listen.is_empty(), "a client listens nowhere");
        let back = StreamProtocol::new("/colony/test-back/1");
        let mut at_client = client.accept_streams(back.clone(), 1).unwrap();
        let mut s = server.open_stream(client.peer_id(), back).await.unwrap();
        s.write_all(b"x").await.unwrap();
        s.close().await.unwrap();
        let (from, _) = tokio::time::timeout(Duration::from_secs(10), at_client.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(from, server.peer_id());
        assert!(client.listen_addrs().is_empty());
        assert!(
            server.listen_addrs()[0]
                .to_string()
                .ends_with(&format!("/p2p/{}", server.peer_id()))
        );

        // Shutdown stops the node; clones see it.
        let twin = nodes[2].clone();
        nodes[2].shutdown().await;
        assert!(matches!(
            twin.get(b"x", false).await,
            Err(DhtError::Shutdown)
        ));
        nodes[2].shutdown().await;
        for n in nodes.iter().chain(clients.iter()) {
            n.shutdown().await;
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_file_keeps_peer_id_and_bootstrap_failure_is_typed() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.key");
    let config = || DhtConfig {
        identity: IdentitySource::File(path.clone()),
        ..DhtConfig::default()
    };
    let first = Dht::new(config()).await.unwrap();
    let id = first.peer_id();
    first.shutdown().await;
    let second = Dht::new(config()).await.unwrap();
    assert_eq!(second.peer_id(), id);
    second.shutdown().await;

    // Dropping the last handle stops the node: its port stops accepting.
    let node = Dht::new(DhtConfig::default()).await.unwrap();
    let addr = node.listen_addrs()[0].to_string();
    let port: u16 = addr.split('/').nth(4).unwrap().parse().unwrap();
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    );
    drop(node);
    tokio::time::timeout(Duration::from_secs(10), async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("node still listening after its last handle was dropped");

    // An initial peer that does not answer.
    let config = DhtConfig {
        initial_peers: vec![format!("/ip4/127.0.0.1/tcp/1/p2p/{id}").parse().unwrap()],
        bootstrap_timeout: Duration::from_secs(5),
        ..DhtConfig::default()
    };
    assert!(matches!(
        Dht::new(config).await,
        Err(DhtError::Bootstrap { .. })
    ));
    assert!(matches!(
        Dht::new(DhtConfig {
            replication: 0,
            ..DhtConfig::default()
        })
        .await,
        Err(DhtError::Config {
            field: "replication",
            ..
        })
    ));
}

/// A node's announced addresses replace its listen addresses in what other
/// peers learn (identify), and its agent version names Colony.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_addresses_and_agent_version_reach_other_peers() {
    common::init_tracing();
    tokio::time::timeout(T, async {
        let a = Dht::new(DhtConfig::default()).await.unwrap();
        let announced: colony_dht::Multiaddr = "/ip4/203.0.113.7/tcp/31337".parse().unwrap();
        let b = Dht::new(DhtConfig {
            initial_peers: a.listen_addrs(),
            announce_addrs: vec![announced.clone()],
            ..DhtConfig::default()
        })
        .await
        .unwrap();
        assert_eq!(
            b.advertised_addrs(),
            vec![announced.clone().with_p2p(b.peer_id()).unwrap()]
        );
        // Identify runs on connect; wait (bounded) for A to have B's answer.
        let seen = loop {
            if let Some(p) = a.peer_addresses(b.peer_id()).await.unwrap()
                && p.agent_version.is_some()
            {
                break p;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(
            seen.agent_version.as_deref(),
            Some(colony_dht::AGENT_VERSION)
        );
        assert!(colony_dht::AGENT_VERSION.starts_with("colony/"));
        assert!(seen.listen.contains(&announced), "{seen:?}");
        assert!(
            seen.listen
                .iter()
                .all(|l| !l.to_string().contains("127.0.0.1")),
            "listen addresses leaked next to the announced one: {seen:?}"
        );
        // An announce address naming another node's id is refused.
        let foreign = format!("/ip4/203.0.113.7/tcp/1/p2p/{}", a.peer_id());
        let err = Dht::new(DhtConfig {
            announce_addrs: vec![foreign.parse().unwrap()],
            ..DhtConfig::default()
        })
        .await
        .unwrap_err();
        assert!(
            matches!(&err, DhtError::Config { field: "announce_addrs", reason } if reason.contains(&a.peer_id().to_string())),
            "{err}"
        );
        b.shutdown().await;
        a.shutdown().await;
    })
    .await
    .unwrap();
}

/// A peer dials back the ports it is asked about, at the asker's IP only,
/// and says which answered; a malformed request is a typed error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_back_reports_reachable_and_closed_ports() {
    common::init_tracing();
    tokio::time::timeout(T, async {
        let a = Dht::new(DhtConfig::default()).await.unwrap();
        let b = Dht::new(DhtConfig {
            initial_peers: a.listen_addrs(),
            ..DhtConfig::default()
        })
        .await
        .unwrap();
        let port_of = |d: &Dht| -> u16 {
            d.listen_addrs()[0]
                .to_string()
                .split('/')
                .nth(4)
                .unwrap()
                .parse()
                .unwrap()
        };
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let answer = b
            .dial_back(a.peer_id(), &[port_of(&b), closed])
            .await
            .unwrap();
        assert_eq!(answer.peer, a.peer_id());
        assert_eq!(answer.observed_ip.to_string(), "127.0.0.1");
        assert!(answer.ports[0].reachable, "{answer:?}");
        assert!(!answer.ports[1].reachable, "{answer:?}");
        assert!(!answer.ports[1].detail.is_empty());
        for bad in [&[][..], &[0][..], &[1, 2, 3, 4, 5][..]] {
            assert!(
                matches!(
                    b.dial_back(a.peer_id(), bad).await,
                    Err(DhtError::DialBack { .. })
                ),
                "{bad:?}"
            );
        }
        b.set_client_mode(true).await.unwrap();
        assert!(b.is_client());
        b.shutdown().await;
        a.shutdown().await;
    })
    .await
    .unwrap();
}

/// A node capped at 3 connections keeps no fourth peer (the peers past the
/// cap complete their handshake and are closed at once, so their own start
/// succeeds through what they learned); the first ones keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_denied() {
    common::init_tracing();
    tokio::time::timeout(T, async {
        let capped = Dht::new(DhtConfig {
            max_connections: 3,
            ..common::server_config(31, 0, vec![])
        })
        .await
        .unwrap();
        let mut others = Vec::new();
        for i in 1..=6 {
            if let Ok(n) = Dht::new(DhtConfig {
                ensure_bootstrap: false,
                ..common::server_config(31, i, capped.listen_addrs())
            })
            .await
            {
                others.push(n);
            }
        }
        let connected = capped.stats().await.unwrap().connected_peers;
        eprintln!("connection cap 3: {connected} of 6 dialing peers connected");
        assert_eq!(connected, 3, "{connected} connected");
        // The admitted peers still store and read through the capped node.
        others[0]
            .store(b"k", None, vec![0x01], colony_dht::dht_time() + 60.0)
            .await
            .unwrap();
        assert!(capped.get(b"k", false).await.unwrap().is_some());
        for n in others.iter().chain(std::iter::once(&capped)) {
            n.shutdown().await;
        }
    })
    .await
    .expect("test timed out");
}

/// A node over its memory cap takes no new connection (its stats say how
/// many it denied), while one with room admits the same peer.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_over_its_memory_cap_denies_new_connections() {
    common::init_tracing();
    tokio::time::timeout(T, async {
        let full = Dht::new(DhtConfig {
            max_memory: colony_dht::MemoryCap::Bytes(1),
            ..common::server_config(36, 0, vec![])
        })
        .await
        .unwrap();
        let refused = Dht::new(DhtConfig {
            bootstrap_timeout: Duration::from_secs(5),
            ..common::server_config(36, 1, full.listen_addrs())
        })
        .await;
        assert!(
            matches!(refused, Err(colony_dht::DhtError::Bootstrap { .. })),
            "{:?}",
            refused.map(|d| d.peer_id())
        );
        let stats = full.stats().await.unwrap();
        eprintln!(
            "memory cap 1 byte: {} connections denied, {} connected",
            stats.memory_denied_connections, stats.connected_peers
        );
        assert!(stats.memory_denied_connections >= 1);
        assert_eq!(stats.connected_peers, 0);
        // The default cap (90 % of the machine) admits it.
        let roomy = Dht::new(common::server_config(36, 2, vec![]))
            .await
            .unwrap();
        let admitted = Dht::new(common::server_config(36, 1, roomy.listen_addrs()))
            .await
            .unwrap();
        assert_eq!(roomy.stats().await.unwrap().memory_denied_connections, 0);
        for n in [full, roomy, admitted] {
            n.shutdown().await;
        }
    })
    .await
    .expect("test timed out");
}

/// A closed run: members list each other; an outsider cannot connect to a
/// member, and its records, held by an open bootstrap node both sides
/// reach, are refused when a member reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_run_refuses_outsiders_and_their_records() {
    common::init_tracing();
    tokio::time::timeout(T, async {
        let peer = |i| colony_dht::PeerSigner::from_secret(common::secret(41, i)).peer_id();
        // 0: an open bootstrap node; 1, 2: members; 3: an outsider.
        let members = vec![peer(0), peer(1), peer(2)];
        let open = Dht::new(common::server_config(41, 0, vec![]))
            .await
            .unwrap();
        let member = |i| DhtConfig {
            allowed_peers: Some(members.clone()),
            ..common::server_config(41, i, open.listen_addrs())
        };
        let a = Dht::new(member(1)).await.unwrap();
        let b = Dht::new(member(2)).await.unwrap();
        let outsider = Dht::new(common::server_config(41, 3, open.listen_addrs()))
            .await
            .unwrap();
        let key = b"closed_progress";
        let expiration = colony_dht::dht_time() + 60.0;
        b.store(key, Some(&b.owner_subkey()), vec![0x01], expiration)
            .await
            .unwrap();
        let stored = outsider
            .store(key, Some(&outsider.owner_subkey()), vec![0x02], expiration)
            .await
            .unwrap();
        assert!(
            stored.is_stored(),
            "the open node takes the outsider's record"
        );
        // A direct dial from the outsider to a member is denied.
        let _ = Dht::new(DhtConfig {
            ensure_bootstrap: false,
            ..common::server_config(41, 4, a.listen_addrs())
        })
        .await;
        let got = a.get(key, true).await.unwrap().unwrap();
        let d = got.as_dictionary().unwrap();
        assert_eq!(d.len(), 1, "only the member's entry: {d:?}");
        assert!(d.contains_key(&b.owner_subkey()));
        let connected = a.stats().await.unwrap();
        eprintln!(
            "closed run: member sees {} connected peers, {} records refused on read",
            connected.connected_peers, connected.rejected_on_read
        );
        assert!(connected.connected_peers <= 2, "{connected:?}");
        assert!(connected.rejected_on_read >= 1);
        for n in [&open, &a, &b, &outsider] {
            n.shutdown().await;
        }
    })
    .await
    .expect("test timed out");
}
