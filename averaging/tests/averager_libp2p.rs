//! `DecentralizedAverager` rounds where one member's data address cannot be
//! used (a closed port, no TCP data plane, a port held by another service,
//! another peer's data plane): the leader drops the address, the member is
//! reached over its libp2p connection, and every peer ends with the exact
//! weighted average. Real `colony-dht` swarms in one process.

#![allow(clippy::unwrap_used)]

use std::{net::SocketAddr, time::Duration};

use colony_averaging::{AveragerConfig, DataPath, DecentralizedAverager, StepOutcome};
use colony_dht::{Dht, DhtConfig};
use tokio::{io::AsyncWriteExt, net::TcpListener};

const T: Duration = Duration::from_secs(90);
const BAD: usize = 3;

async fn swarm(n: usize) -> Vec<Dht> {
    let cfg = || DhtConfig {
        query_timeout: Duration::from_secs(3),
        ..DhtConfig::default()
    };
    let first = Dht::new(cfg()).await.expect("first dht node");
    let initial = first.listen_addrs();
    let mut nodes = vec![first];
    for _ in 1..n {
        let c = DhtConfig {
            initial_peers: initial.clone(),
            ..cfg()
        };
        nodes.push(Dht::new(c).await.expect("dht node"));
    }
    nodes
}

fn config(prefix: &str) -> AveragerConfig {
    let mut c = AveragerConfig::new(prefix);
    c.target_group_size = Some(4);
    // The group begins once all four have joined; the long window only
    // matters on a loaded 2-core box.
    c.min_matchmaking_time = Duration::from_secs(8);
    c.request_timeout = Duration::from_secs(3);
    c.allreduce.part_size_bytes = 4096;
    c.allreduce.sender_timeout = Duration::from_secs(2);
    c.allreduce.reducer_timeout = Duration::from_secs(4);
    c.allreduce.allreduce_timeout = Duration::from_secs(20);
    c
}

fn values(i: usize) -> Vec<Vec<f32>> {
    vec![
        (0..3000).map(|j| (i * 31 + j % 97) as f32 * 0.01).collect(),
        vec![i as f32; 5],
    ]
}

const WEIGHTS: [f32; 4] = [1.0, 2.0, 3.0, 4.0];

/// Four averagers on one swarm, peer [`BAD`] configured by `bad_config`
/// (which may read the honest peers' data addresses); one step each.
async fn step_four(
    prefix: &str,
    bad_config: impl FnOnce(&mut AveragerConfig, &[DecentralizedAverager]),
) -> (Vec<DecentralizedAverager>, Vec<StepOutcome>) {
    let nodes = swarm(4).await;
    let mut avgs: Vec<DecentralizedAverager> = Vec::new();
    for (i, n) in nodes.iter().enumerate().take(BAD) {
        let a = DecentralizedAverager::new(n.clone(), values(i), config(prefix)).await;
        avgs.push(a.unwrap());
    }
    let mut c = config(prefix);
    // The bad peer declares a later expiration, so an honest peer leads and
    // vets its address. (A leader does not probe its own address, so a
    // lying leader's members dial its bad address and lose its span for
    // that round; they fall back to libp2p from then on.)
    c.min_matchmaking_time += Duration::from_secs(1);
    bad_config(&mut c, &avgs);
    let bad = DecentralizedAverager::new(nodes[BAD].clone(), values(BAD), c).await;
    avgs.push(bad.unwrap());
    let outs = futures::future::join_all(
        avgs.iter()
            .zip(WEIGHTS)
            .map(|(a, w)| a.step(Some(w), Duration::from_secs(30))),
    )
    .await;
    let outs = outs
        .into_iter()
        .enumerate()
        .map(|(i, o)| o.unwrap_or_else(|e| panic!("peer {i}: {e}")))
        .collect();
    (avgs, outs)
}

/// Every peer holds the exact weighted mean; the bad peer is in the group
/// with no data address, reduced a span, and was reached over libp2p by
/// every other peer (who reached each other directly).
async fn assert_reached_over_libp2p(avgs: &[DecentralizedAverager], outs: &[StepOutcome]) {
    let wsum: f64 = WEIGHTS.iter().map(|w| f64::from(*w)).sum();
    let init: Vec<_> = (0..4).map(values).collect();
    let bad_id = avgs[BAD].peer_id().to_vec();
    for (i, (a, o)) in avgs.iter().zip(outs).enumerate() {
        assert_eq!(o.group.members.len(), 4, "peer {i}");
        let r = &o.round;
        assert!(
            r.failed_reducers.is_empty() && r.banned_senders.is_empty(),
            "peer {i}: {r:?}"
        );
        let total: usize = r.span_sizes.iter().sum();
        assert_eq!(r.averaged_elements(), total, "peer {i}");
        let bad = o.group.position(&bad_id).expect("bad peer in the group");
        // Every member holds the leader's view (followers do not vet it
        // again), so all agree on the round's keys.
        assert_eq!(o.group, outs[0].group, "peer {i} holds another view");
        assert!(r.span_sizes[bad] > 0, "the bad peer must reduce a span");
        // Connections into the bad peer are libp2p; all others (its own
        // included) go direct.
        let into = |to: usize| {
            if to == bad {
                DataPath::Libp2p
            } else {
                DataPath::Direct
            }
        };
        for j in (0..4).filter(|&j| j != r.my_index) {
            let sent = r.sent_paths.iter().find(|(p, _)| *p == j).map(|p| p.1);
            assert_eq!(sent, Some(into(j)), "peer {i} → {j}");
            let served = r.served_paths.iter().find(|(p, _)| *p == j).map(|p| p.1);
            assert_eq!(served, Some(into(r.my_index)), "{j} → peer {i}");
        }
        let mine = a.tensors().await.clone();
        for (t, tensor) in mine.iter().enumerate() {
            for (k, v) in tensor.iter().enumerate() {
                let mean: f64 = init
                    .iter()
                    .zip(WEIGHTS)
                    .map(|(x, w)| f64::from(w) * f64::from(x[t][k]))
                    .sum::<f64>()
                    / wsum;
                assert!((f64::from(*v) - mean).abs() < 1e-5, "peer {i} [{t}][{k}]");
            }
        }
    }
    let honest = &outs[0].round;
    let bad = outs[0].group.position(&bad_id).unwrap();
    assert_eq!(honest.path_with(bad), Some(DataPath::Libp2p));
    assert_eq!(honest.libp2p_connections(), 1);
    assert_eq!(honest.direct_connections(), 5);
}

/// A TCP listener that is no data plane: it accepts, writes `greeting`
/// (nothing when empty) and holds the connection.
async fn impostor(greeting: &'static [u8]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = l.accept().await {
            if !greeting.is_empty() {
                let _ = s.write_all(greeting).await;
            }
            held.push(s);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_announcing_a_closed_port_is_reached_over_libp2p() {
    tokio::time::timeout(T, async {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (avgs, outs) = step_four("closed", |c, _| c.data_announce_addr = Some(closed)).await;
        assert_eq!(avgs[BAD].data_addr(), Some(closed));
        assert_reached_over_libp2p(&avgs, &outs).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_a_tcp_data_plane_is_reached_over_libp2p() {
    tokio::time::timeout(T, async {
        let (avgs, outs) = step_four("notcp", |c, _| c.direct_data_plane = false).await;
        assert_eq!(avgs[BAD].data_addr(), None);
        assert_eq!(avgs[BAD].data_listen_addr(), None);
        assert_reached_over_libp2p(&avgs, &outs).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_held_by_a_silent_service_fails_the_leaders_probe() {
    tokio::time::timeout(T, async {
        let silent = impostor(b"").await;
        let (avgs, outs) = step_four("silent", |c, _| c.data_announce_addr = Some(silent)).await;
        assert_reached_over_libp2p(&avgs, &outs).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_held_by_a_chatty_service_fails_the_leaders_probe() {
    tokio::time::timeout(T, async {
        let chatty = impostor(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        let (avgs, outs) = step_four("chatty", |c, _| c.data_announce_addr = Some(chatty)).await;
        assert_reached_over_libp2p(&avgs, &outs).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_announcing_another_peers_data_plane_is_caught() {
    tokio::time::timeout(T, async {
        let (avgs, outs) = step_four("liar", |c, honest| {
            c.data_announce_addr = honest[0].data_addr();
        })
        .await;
        // The liar is named in every member's group: its address is gone.
        assert_eq!(avgs[BAD].data_addr(), avgs[0].data_addr());
        assert_reached_over_libp2p(&avgs, &outs).await;
    })
    .await
    .expect("test timed out");
}
