//! A peer that vanishes without closing anything (its link cut: packets
//! dropped, no FIN, no RST) must not stall the nodes that knew it: their
//! connection to it is closed within the liveness timeout, a `latest` get
//! answers within its budget meanwhile, and when the link returns the node
//! that lost every connection redials its initial peer by itself.
//!
//! The cut is a TCP relay between the two nodes that stops forwarding bytes
//! while keeping both sockets open, as a dead link looks to TCP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use colony_dht::{Dht, DhtConfig, Multiaddr};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Notify,
};

/// A relay to `target` that can be cut (stops forwarding, keeps sockets).
struct Link {
    cut: AtomicBool,
    restored: Notify,
}

impl Link {
    async fn pump(
        self: Arc<Self>,
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
    ) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            while self.cut.load(Ordering::SeqCst) {
                let restored = self.restored.notified();
                if !self.cut.load(Ordering::SeqCst) {
                    break;
                }
                restored.await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    async fn serve(self: Arc<Self>, listener: TcpListener, target: std::net::SocketAddr) {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = TcpStream::connect(target).await else {
                continue;
            };
            let (ir, iw) = inbound.into_split();
            let (or, ow) = outbound.into_split();
            tokio::spawn(self.clone().pump(ir, ow));
            tokio::spawn(self.clone().pump(or, iw));
        }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
        if !cut {
            self.restored.notify_waiters();
        }
    }
}

fn tcp_port(addr: &Multiaddr) -> u16 {
    addr.to_string().split('/').nth(4).unwrap().parse().unwrap()
}

async fn connected(dht: &Dht) -> usize {
    dht.stats().await.unwrap().connected_peers
}

/// Polls `cond` every 50 ms until it holds; panics after `limit`.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_peer_is_dropped_gets_answer_within_budget_and_the_node_redials() {
    common::init_tracing();
    let server = Dht::new(DhtConfig::default()).await.unwrap();
    let listen = server.listen_addrs()[0].clone();
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], tcp_port(&listen)));
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let via: Multiaddr = format!(
        "/ip4/127.0.0.1/tcp/{}/p2p/{}",
        relay.local_addr().unwrap().port(),
        server.peer_id()
    )
    .parse()
    .unwrap();
    let link = Arc::new(Link {
        cut: AtomicBool::new(false),
        restored: Notify::new(),
    });
    tokio::spawn(link.clone().serve(relay, target));
    // A client reaches the server only through the link (it listens nowhere,
    // so the server cannot dial it around the link).
    let client = Dht::new(DhtConfig::client(vec![via])).await.unwrap();
    let expiration = colony_dht::dht_time() + 600.0;
    assert!(
        client
            .store(b"key", None, vec![0x2a], expiration)
            .await
            .unwrap()
            .is_stored()
    );
    assert_eq!(connected(&client).await, 1);

    link.set_cut(true);
    let started = Instant::now();
    // A latest-get asks the vanished replica; the budget answers for it.
    let found = client
        .get_within(b"key", true, Duration::from_millis(500))
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(found.is_some(), "the local copy is part of the answer");
    assert!(took < Duration::from_secs(2), "get took {took:?}");
    // The dead connection is closed within the liveness timeout (4 s) plus
    // one check period.
    let dropped = eventually(
        "the client drops the dead connection",
        Duration::from_secs(10),
        || async { connected(&client).await == 0 },
    )
    .await;
    eprintln!("get answered in {took:?}; dead connection dropped after {dropped:?}");

    // The link returns: the client, with no connection left, redials its
    // initial peer by itself.
    link.set_cut(false);
    let back = eventually("the client reconnects", Duration::from_secs(20), || async {
        connected(&client).await == 1
    })
    .await;
    eprintln!("reconnected {back:?} after the link returned");
    let found = client.get(b"key", true).await.unwrap();
    assert!(found.is_some());
    client.shutdown().await;
    server.shutdown().await;
}
