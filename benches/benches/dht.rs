//! Store and get latency/throughput on 16 and 64 in-process colony-dht nodes
//! over loopback TCP. Prints the loopback round-trip time measured in the same
//! run (the floor of a one-hop get) beside the results.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use colony_benches::Summary;
use colony_dht::{Dht, DhtConfig, IdentitySource, dht_time};
use criterion::{Criterion, Throughput, criterion_main};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
};

const VALUE_SIZE: usize = 256;

async fn start(n: usize) -> Vec<Dht> {
    let mut nodes: Vec<Dht> = Vec::with_capacity(n);
    for i in 0..n {
        let mut secret = [0u8; 32];
        secret[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        let initial = nodes.first().map(Dht::listen_addrs).unwrap_or_default();
        let config = DhtConfig {
            initial_peers: initial,
            identity: IdentitySource::Secret(secret),
            ..DhtConfig::default()
        };
        nodes.push(Dht::new(config).await.expect("start node"));
    }
    nodes
}

/// Median round trip of 64-byte ping-pongs over loopback TCP.
async fn loopback_rtt() -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        s.set_nodelay(true).ok();
        let mut buf = [0u8; 64];
        while s.read_exact(&mut buf).await.is_ok() {
            if s.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.set_nodelay(true).ok();
    let mut buf = [0u8; 64];
    let mut times = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let t = Instant::now();
        c.write_all(&buf).await.expect("write");
        c.read_exact(&mut buf).await.expect("read");
        times.push(t.elapsed());
    }
    Summary::new(times).median()
}

fn value(i: u64) -> Vec<u8> {
    let mut v = vec![0xc5, (VALUE_SIZE >> 8) as u8, VALUE_SIZE as u8];
    v.extend((0..VALUE_SIZE).map(|j| (i as usize + j) as u8));
    v
}

fn bench_dht(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let rtt = rt.block_on(loopback_rtt());
    println!(
        "physical limit: loopback TCP round trip (64 B ping-pong, median) = {:.1} us",
        rtt.as_secs_f64() * 1e6
    );
    for n in [16usize, 64] {
        let nodes = rt.block_on(start(n));
        let mut group = c.benchmark_group(format!("dht_{n}_nodes"));
        group.throughput(Throughput::Bytes(VALUE_SIZE as u64));
        group
            .sample_size(50)
            .measurement_time(Duration::from_secs(8));
        let mut counter = 0u64;
        group.bench_function("store", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        counter += 1;
                        let node = &nodes[(counter as usize * 7) % n];
                        let key = format!("bench-store-{n}-{counter}");
                        let outcome = node
                            .store(key.as_bytes(), None, value(counter), dht_time() + 600.0)
                            .await;
                        black_box(outcome.expect("store"));
                    }
                    t.elapsed()
                })
            })
        });
        // Prestore keys, then read them from nodes that did not write them.
        let keys = 256u64;
        rt.block_on(async {
            for k in 0..keys {
                let key = format!("bench-get-{n}-{k}");
                nodes[k as usize % n]
                    .store(key.as_bytes(), None, value(k), dht_time() + 600.0)
                    .await
                    .expect("prestore");
            }
        });
        for latest in [false, true] {
            let mut i = 0u64;
            group.bench_function(if latest { "get_latest" } else { "get" }, |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let t = Instant::now();
                        for _ in 0..iters {
                            i += 1;
                            let k = i % keys;
                            let reader = &nodes[(k as usize + 1 + (i as usize % (n - 1))) % n];
                            let key = format!("bench-get-{n}-{k}");
                            let got = reader.get(key.as_bytes(), latest).await.expect("get");
                            assert!(got.is_some(), "key {key} missing");
                        }
                        t.elapsed()
                    })
                })
            });
        }
        group.finish();
        rt.block_on(async {
            for node in &nodes {
                node.shutdown().await;
            }
        });
    }
}

#[allow(missing_docs)]
mod harness {
    criterion::criterion_group!(benches, super::bench_dht);
}
criterion_main!(harness::benches);
