//! A flood of 1 MiB puts whose every entry carries a bad signature, sent to
//! one node while it answers gets: the gets stay fast, nothing is stored.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use colony_dht::{SIGNATURE_PREFIX, WireEntry, dht_time, encode_wire, owner_key_from_secret};
use common::{attacker::Attacker, swarm};
use serde_bytes::ByteBuf;

const PUTS: usize = 200;
const ENTRIES: usize = 16;

/// One 1 MiB record: 16 entries of 60 KiB under subkeys of an owner whose
/// signature none of them carries.
fn forged_record() -> Vec<u8> {
    let marker = owner_key_from_secret([9; 32]).marker();
    let entries: Vec<WireEntry> = (0..ENTRIES)
        .map(|i| {
            let mut subkey = marker.clone();
            subkey.extend_from_slice(&(i as u32).to_le_bytes());
            let mut value =
                colony_schema::to_msgpack(&serde_bytes::Bytes::new(&[7u8; 60 << 10])).unwrap();
            value.extend_from_slice(SIGNATURE_PREFIX);
            value.extend_from_slice(&[0x5a; 64]);
            value.push(b']');
            WireEntry {
                subkey: Some(ByteBuf::from(subkey)),
                value: ByteBuf::from(value),
                expiration: dht_time() + 600.0,
            }
        })
        .collect();
    encode_wire(&entries)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gets_stay_fast_under_a_flood_of_forged_megabyte_puts() {
    common::init_tracing();
    tokio::time::timeout(Duration::from_secs(240), async {
        let (nodes, _) = swarm(21, 3, 0).await;
        let victim = nodes[0].clone();
        nodes[1]
            .store(b"honest", None, vec![0x2a], dht_time() + 600.0)
            .await
            .unwrap();
        // The same gets without a flood, for comparison.
        let mut quiet = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            victim.get(b"honest", true).await.unwrap();
            quiet.push(t.elapsed());
        }
        quiet.sort();
        let record = forged_record();
        assert!(record.len() > 960 << 10, "{} bytes", record.len());

        let mut attacker = Attacker::new().await;
        attacker
            .connect(victim.listen_addrs()[0].clone(), victim.peer_id())
            .await;
        let target = victim.peer_id();
        let flood = tokio::spawn(async move {
            let started = Instant::now();
            let acked = attacker.flood_to(target, b"flooded", record, PUTS).await;
            (acked, started.elapsed())
        });
        // Gets on the victim while the flood is in flight (each one goes
        // through the victim's swarm task, where the puts are checked).
        let mut latencies = Vec::new();
        while !flood.is_finished() && latencies.len() < 2000 {
            let t = Instant::now();
            let got = victim.get(b"honest", true).await.unwrap();
            latencies.push(t.elapsed());
            assert_eq!(got.unwrap().as_regular(), Some(&[0x2a][..]));
        }
        let (acked, flood_time) = flood.await.unwrap();
        latencies.sort();
        let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
        let stats = victim.stats().await.unwrap();
        eprintln!(
            "put flood: {PUTS} forged 1 MiB puts ({acked} acked) in {:.1} s; {} gets during it: \
             p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (without a flood: p50 {:.1} ms, max {:.1} ms); \
             {} entries rejected",
            flood_time.as_secs_f64(),
            latencies.len(),
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            latencies.last().unwrap().as_secs_f64() * 1e3,
            quiet[quiet.len() / 2].as_secs_f64() * 1e3,
            quiet.last().unwrap().as_secs_f64() * 1e3,
            stats.rejected_inbound,
        );
        assert!(
            latencies.len() >= 10,
            "only {} gets during the flood",
            latencies.len()
        );
        assert!(pct(0.99) < Duration::from_secs(1), "p99 {:?}", pct(0.99));
        assert!(stats.rejected_inbound >= (PUTS * ENTRIES / 2) as u64);
        assert!(victim.get(b"flooded", false).await.unwrap().is_none());
    })
    .await
    .expect("test timed out");
}

/// One peer putting far faster than a node takes from one peer: past the
/// burst, its puts are dropped before they are decoded; another peer's
/// store still lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_past_a_peers_rate_are_dropped_unread() {
    common::init_tracing();
    tokio::time::timeout(Duration::from_secs(120), async {
        let (nodes, _) = swarm(22, 2, 0).await;
        let victim = nodes[0].clone();
        let mut attacker = Attacker::new().await;
        attacker
            .connect(victim.listen_addrs()[0].clone(), victim.peer_id())
            .await;
        let tiny = encode_wire(&[WireEntry {
            subkey: None,
            value: ByteBuf::from(vec![0xc0]),
            expiration: dht_time() + 600.0,
        }]);
        let started = Instant::now();
        attacker
            .flood_to(victim.peer_id(), b"spam", tiny, 2000)
            .await;
        let elapsed = started.elapsed().as_secs_f64();
        let stats = victim.stats().await.unwrap();
        eprintln!(
            "put rate limit: 2000 puts from one peer in {elapsed:.2} s, {} dropped unread",
            stats.rate_limited_puts
        );
        // At most the burst (200) plus 50/s of the flood's duration got in.
        let admitted = 2000 - stats.rate_limited_puts;
        assert!(
            (admitted as f64) <= 200.0 + 50.0 * elapsed + 1.0,
            "{admitted} admitted in {elapsed:.2} s"
        );
        let out = nodes[1]
            .store(b"honest", None, vec![0x2a], dht_time() + 60.0)
            .await
            .unwrap();
        assert!(out.is_stored());
    })
    .await
    .expect("test timed out");
}
