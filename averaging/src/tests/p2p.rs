//! Rounds whose connections travel over libp2p data streams: reducers with
//! no or an unreachable data address, a lying address, and streams that
//! lie about who they are. Real DHT nodes on 127.0.0.1.

use std::{net::SocketAddr, time::Duration};

use colony_dht::{Dht, PeerId, StreamProtocol};
use futures::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{
    matchmaking::swarm,
    support::{LENGTHS, Peer, max_err, run_some, tensors_for, test_config, weighted_mean},
};
use crate::{
    AssembledGroup, AveragingMode, Compression, DataPath, GroupMember, PeerFault, RoundOutcome,
    TensorLayout,
    round::{DataPlane, RoundKeyPair},
    wire::Preamble,
};

const T: Duration = Duration::from_secs(60);

fn proto() -> StreamProtocol {
    StreamProtocol::new("/colony/averaging/p2ptest/data/1")
}

/// Four node-mode peers on a DHT swarm; peers listed in `no_tcp` have no
/// TCP data plane. Returns the peers, their DHT nodes and their peer ids.
async fn p2p_peers(no_tcp: &[usize]) -> (Vec<Peer>, Vec<Dht>) {
    let nodes = swarm(4).await;
    let mut peers = Vec::new();
    for (i, dht) in nodes.iter().enumerate() {
        let timeout = Duration::from_secs(2);
        let plane = if no_tcp.contains(&i) {
            DataPlane::libp2p_only(timeout)
        } else {
            DataPlane::bind("127.0.0.1:0".parse().unwrap(), timeout)
                .await
                .unwrap()
        };
        peers.push(Peer {
            plane: plane.with_libp2p(dht, proto()).unwrap(),
            keys: RoundKeyPair::generate().unwrap(),
            tensors: tensors_for(i, &LENGTHS),
            weight: (i + 1) as f32,
            mode: AveragingMode::Node,
        });
    }
    (peers, nodes)
}

fn group(peers: &[Peer], nodes: &[Dht], group_id: [u8; 32]) -> AssembledGroup {
    AssembledGroup {
        group_id,
        members: peers
            .iter()
            .zip(nodes)
            .map(|(p, n)| GroupMember {
                peer_id: n.peer_id().to_bytes(),
                data_addr: p.plane.local_addr(),
                mode: p.mode,
                bandwidth: None,
                round_public_key: p.keys.public(),
                signed: None,
            })
            .collect(),
    }
}

fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Every outcome succeeded, averaged everything, and applied to each peer's
/// tensors gives the exact weighted mean of all four.
fn assert_exact(peers: &[Peer], outs: &[crate::Result<RoundOutcome>]) {
    let layout = TensorLayout::new(&LENGTHS);
    let mean = weighted_mean(peers, &[0, 1, 2, 3]);
    for (i, out) in outs.iter().enumerate() {
        let out = out.as_ref().unwrap_or_else(|e| panic!("peer {i}: {e}"));
        assert!(out.failed_reducers.is_empty(), "peer {i}: {out:?}");
        assert!(out.banned_senders.is_empty(), "peer {i}: {out:?}");
        assert_eq!(out.averaged_elements(), layout.total(), "peer {i}");
        let mut mine = peers[i].tensors.clone();
        out.apply(&layout, &mut mine, 1.0).unwrap();
        let err = max_err(&mine, &mean);
        assert!(err < 1e-5, "peer {i}: max error {err}");
    }
}

/// Peer `bad` reduced a span, and every connection to it went over libp2p
/// while all others (its own to the rest included) stayed direct.
fn assert_paths(outs: &[crate::Result<RoundOutcome>], bad: usize) {
    for (i, out) in outs.iter().enumerate() {
        let out = out.as_ref().unwrap();
        assert!(out.span_sizes[bad] > 0, "peer {bad} must reduce a span");
        let path = |to: usize| {
            if to == bad {
                DataPath::Libp2p
            } else {
                DataPath::Direct
            }
        };
        for j in (0..outs.len()).filter(|&j| j != i) {
            let sent = out.sent_paths.iter().find(|(r, _)| *r == j).map(|p| p.1);
            assert_eq!(sent, Some(path(j)), "peer {i} → {j}: {out:?}");
            let served = out.served_paths.iter().find(|(s, _)| *s == j).map(|p| p.1);
            assert_eq!(served, Some(path(i)), "peer {j} → {i}: {out:?}");
            assert_eq!(out.path_with(j), Some(path(j)));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reducer_behind_a_closed_port_is_reached_over_libp2p() {
    tokio::time::timeout(T, async {
        let (peers, nodes) = p2p_peers(&[]).await;
        let mut g = group(&peers, &nodes, [0x51; 32]);
        g.members[3].data_addr = Some(closed_port());
        let cfg = test_config(Compression::None);
        let outs = run_some(&peers, &g, 0..4, &cfg).await;
        assert_exact(&peers, &outs);
        assert_paths(&outs, 3);
        let first = outs[0].as_ref().unwrap();
        assert_eq!(
            (first.direct_connections(), first.libp2p_connections()),
            (5, 1)
        );
        // The failure is remembered: the next round goes straight to libp2p.
        let addr = g.members[3].data_addr.unwrap();
        let peer3 = nodes[3].peer_id().to_bytes();
        for p in &peers[..3] {
            assert!(p.plane.p2p.as_ref().unwrap().direct_failed(&peer3, addr));
        }
        g.group_id = [0x52; 32];
        let outs = run_some(&peers, &g, 0..4, &cfg).await;
        assert_exact(&peers, &outs);
        assert_paths(&outs, 3);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reducer_without_a_tcp_data_plane_is_reached_over_libp2p() {
    tokio::time::timeout(T, async {
        let (peers, nodes) = p2p_peers(&[2]).await;
        let g = group(&peers, &nodes, [0x53; 32]);
        assert_eq!(g.members[2].data_addr, None);
        g.validate().unwrap();
        let outs = run_some(&peers, &g, 0..4, &test_config(Compression::Float16)).await;
        // fp16 on the wire: every peer applies the same rounded averages.
        let layout = TensorLayout::new(&LENGTHS);
        let mean = weighted_mean(&peers, &[0, 1, 2, 3]);
        for (i, out) in outs.iter().enumerate() {
            let out = out.as_ref().unwrap();
            assert!(out.failed_reducers.is_empty() && out.banned_senders.is_empty());
            let mut mine = peers[i].tensors.clone();
            out.apply(&layout, &mut mine, 1.0).unwrap();
            assert!(max_err(&mine, &mean) < 2e-3, "peer {i}");
        }
        assert_paths(&outs, 2);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_liar_pointing_at_another_peers_plane_is_named_then_reached_over_libp2p() {
    tokio::time::timeout(T, async {
        let (peers, nodes) = p2p_peers(&[]).await;
        let mut g = group(&peers, &nodes, [0x54; 32]);
        // Peer 3 announces peer 0's data plane.
        g.members[3].data_addr = g.members[0].data_addr;
        let cfg = test_config(Compression::None);
        let outs = run_some(&peers, &g, 0..4, &cfg).await;
        // Peer 0 turns away the connections meant for peer 3; the senders
        // name peer 3 and keep their local values for its span.
        for (i, out) in outs.iter().enumerate().take(3) {
            let out = out.as_ref().unwrap_or_else(|e| panic!("peer {i}: {e}"));
            assert_eq!(
                out.failed_reducers
                    .iter()
                    .map(|(r, _)| *r)
                    .collect::<Vec<_>>(),
                vec![3],
                "peer {i}"
            );
            assert!(
                out.banned_senders.iter().all(|(s, _)| *s == 3),
                "peer {i}: {out:?}"
            );
        }
        // The next round reaches peer 3 over libp2p and averages exactly.
        let mut g = g.clone();
        g.group_id = [0x55; 32];
        let outs = run_some(&peers, &g, 0..4, &cfg).await;
        assert_exact(&peers, &outs);
        assert_paths(&outs, 3);
    })
    .await
    .expect("test timed out");
}

/// A DHT node outside the group that knows `of`.
async fn intruder(of: &Dht) -> Dht {
    Dht::new(colony_dht::DhtConfig {
        initial_peers: of.listen_addrs(),
        query_timeout: Duration::from_secs(3),
        ..colony_dht::DhtConfig::default()
    })
    .await
    .unwrap()
}

/// Open a data stream from `from` to `to` and write `opening`.
async fn stream_with(from: &Dht, to: &Dht, opening: &[u8]) -> colony_dht::Stream {
    let mut s = from.open_stream(to.peer_id(), proto()).await.unwrap();
    s.write_all(opening).await.unwrap();
    s.flush().await.unwrap();
    s
}

/// Wait for the other side to drop `s` (end of stream or reset).
async fn closed_by_peer(s: &mut colony_dht::Stream) {
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_claiming_another_members_slot_is_rejected() {
    tokio::time::timeout(T, async {
        let (peers, nodes) = p2p_peers(&[]).await;
        let intruder = intruder(&nodes[0]).await;
        let g = group(&peers, &nodes, [0x56; 32]);
        // The intruder claims peer 1's sender slot at reducer 0.
        let claim = Preamble {
            group_id: g.group_id,
            sender: 1,
            reducer: 0,
        };
        let mut s = stream_with(&intruder, &nodes[0], &claim.encode()).await;
        let cfg = test_config(Compression::None);
        // Peer 1 starts only once reducer 0 has turned the intruder away, so
        // the impostor is first in line for the slot.
        let (early, late) = tokio::join!(run_some(&peers, &g, [0, 2, 3], &cfg), async {
            closed_by_peer(&mut s).await;
            run_some(&peers, &g, [1], &cfg).await
        });
        let mut outs: Vec<_> = early.into_iter().collect();
        outs.insert(1, late.into_iter().next().unwrap());
        assert_exact(&peers, &outs);
        let rejected = &outs[0].as_ref().unwrap().rejected;
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert_eq!(rejected[0].peer, Some(intruder.peer_id()));
        assert_eq!(rejected[0].path, DataPath::Libp2p);
        assert_eq!(rejected[0].claimed_sender, Some(1));
        assert_eq!(
            rejected[0].fault,
            PeerFault::ImpersonatedSender { sender: 1 }
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_unknown_group_streams_are_dropped_and_the_round_goes_on() {
    tokio::time::timeout(T, async {
        let (peers, nodes) = p2p_peers(&[]).await;
        let intruder = intruder(&nodes[0]).await;
        let g = group(&peers, &nodes, [0x57; 32]);
        let from_intruder = |p: PeerId| move |r: &crate::RejectedConnection| r.peer == Some(p);
        let mut garbage = stream_with(&intruder, &nodes[0], &[0xAB; 48]).await;
        let r = peers[0]
            .plane
            .rejection_where(from_intruder(intruder.peer_id()))
            .await;
        assert!(matches!(r.fault, PeerFault::Garbage { .. }), "{r:?}");
        closed_by_peer(&mut garbage).await;
        // A stream naming a group nobody runs is dropped after the preamble
        // timeout, while a real round runs on the same plane.
        let unknown = Preamble {
            group_id: [0xEE; 32],
            sender: 0,
            reducer: 0,
        };
        let mut stray = stream_with(&intruder, &nodes[0], &unknown.encode()).await;
        let cfg = test_config(Compression::None);
        let (outs, r) = tokio::join!(
            run_some(&peers, &g, 0..4, &cfg),
            peers[0].plane.rejection_where(|r| {
                r.peer == Some(intruder.peer_id()) && r.fault == PeerFault::BadGroupId
            })
        );
        assert_eq!(r.claimed_sender, Some(0));
        closed_by_peer(&mut stray).await;
        assert_exact(&peers, &outs);
        assert!(outs.iter().all(|o| o.as_ref().unwrap().rejected.is_empty()));
    })
    .await
    .expect("test timed out");
}
