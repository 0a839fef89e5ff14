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
        let mut local = Vec::new();
        while !flood.is_finished() && latencies.len() < 2000 {
            let t = Instant::now();
            let got = victim.get(b"honest", true).await.unwrap();
            latencies.push(t.elapsed());
            assert_eq!(got.unwrap().as_regular(), Some(&[0x2a][..]));
            let t = Instant::now();
            victim.stats().await.unwrap();
            local.push(t.elapsed());
        }
        local.sort();
        eprintln!("node task answers during the flood: p50 {:?} p99 {:?}", local[local.len()/2], local[(local.len()-1)*99/100]);
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

/// Holds the check of every entry under one key until opened.
struct Gate {
    key: &'static [u8],
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl colony_dht::RecordValidator for Gate {
    fn validate(&self, record: &colony_dht::DhtRecord) -> Result<(), colony_dht::ValidationError> {
        // Only the signature checker waits: a check of the key anywhere else
        // (the node task re-checking after a validator change) must not
        // stall the node.
        let on_checker = std::thread::current().name() == Some("colony-dht-verify");
        if record.key == self.key && on_checker {
            let open = self.open.lock().unwrap();
            let (_open, waited) = self
                .opened
                .wait_timeout_while(open, Duration::from_secs(30), |o| !*o)
                .unwrap();
            assert!(!waited.timed_out(), "gate never opened");
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Inbound puts are checked on a worker thread, after kad has acknowledged
/// them: a get on the storing node while its put is still being checked
/// waits for the check and sees the value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_while_its_put_is_checked_sees_the_value() {
    common::init_tracing();
    tokio::time::timeout(Duration::from_secs(120), async {
        let (nodes, _) = swarm(23, 2, 0).await;
        let victim = nodes[0].clone();
        let gate = std::sync::Arc::new(Gate {
            key: b"gated",
            open: std::sync::Mutex::new(false),
            opened: std::sync::Condvar::new(),
        });
        victim.add_validator(gate.clone());
        let mut attacker = Attacker::new().await;
        attacker
            .connect(victim.listen_addrs()[0].clone(), victim.peer_id())
            .await;
        let value = colony_schema::to_msgpack(&42u8).unwrap();
        let wire = encode_wire(&[WireEntry {
            subkey: None,
            value: ByteBuf::from(value.clone()),
            expiration: dht_time() + 600.0,
        }]);
        // Acked at once; its check now waits at the gate.
        attacker.put_to(victim.peer_id(), b"gated", wire).await;
        let get = tokio::spawn({
            let victim = victim.clone();
            async move { victim.get(b"gated", false).await }
        });
        // Commands are taken in order: once this answers, the get has been
        // taken too (and, only the victim holding the value, a get that did
        // not wait would miss it).
        victim.stats().await.unwrap();
        assert!(!get.is_finished(), "the get did not wait for the check");
        *gate.open.lock().unwrap() = true;
        gate.opened.notify_all();
        let got = get.await.unwrap().unwrap().expect("value not seen");
        assert_eq!(got.as_regular(), Some(&value[..]));
    })
    .await
    .expect("test timed out");
}

/// Entries one owner signed, carried by three peers at once (each within
/// its own put rate): past the owner's burst they are dropped, whoever
/// carries them; another owner's entries still land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_owners_entries_are_rate_limited_across_peers() {
    common::init_tracing();
    tokio::time::timeout(Duration::from_secs(120), async {
        let (nodes, _) = swarm(24, 2, 0).await;
        let victim = nodes[0].clone();
        let signer = colony_dht::Ed25519SignatureValidator::new(&[5; 32]);
        let signed = |key: &[u8], i: u32, signer: &colony_dht::Ed25519SignatureValidator| {
            use colony_dht::RecordValidator;
            let mut subkey = signer.owner_marker();
            subkey.extend_from_slice(&i.to_le_bytes());
            let mut record = colony_dht::DhtRecord {
                key: key.to_vec(),
                subkey: Some(subkey),
                value: colony_schema::to_msgpack(&i).unwrap(),
                expiration: dht_time() + 600.0,
            };
            record.value = signer.sign_value(&record).unwrap();
            WireEntry {
                subkey: record.subkey.map(ByteBuf::from),
                value: ByteBuf::from(record.value),
                expiration: record.expiration,
            }
        };
        const CARRIERS: usize = 3;
        const PUTS: usize = 150;
        const PER_PUT: u32 = 4;
        let started = Instant::now();
        let mut carriers = Vec::new();
        for c in 0..CARRIERS {
            let mut attacker = Attacker::new().await;
            attacker
                .connect(victim.listen_addrs()[0].clone(), victim.peer_id())
                .await;
            let puts: Vec<(Vec<u8>, Vec<u8>)> = (0..PUTS)
                .map(|p| {
                    let key = format!("owned-{c}-{p}").into_bytes();
                    let entries: Vec<WireEntry> =
                        (0..PER_PUT).map(|i| signed(&key, i, &signer)).collect();
                    (key, encode_wire(&entries))
                })
                .collect();
            let target = victim.peer_id();
            carriers.push(tokio::spawn(async move {
                for (key, wire) in puts {
                    attacker.flood_to(target, &key, wire, 1).await;
                }
            }));
        }
        for c in carriers {
            c.await.unwrap();
        }
        // Entries are stored after the ack, in arrival order: once a marker
        // put sent after all of them is readable, every one was checked. (A
        // marker that found the queue full is dropped: send another.)
        let mut sync = Attacker::new().await;
        sync.connect(victim.listen_addrs()[0].clone(), victim.peer_id())
            .await;
        let mut synced = false;
        for i in 0..50u32 {
            let key = format!("sync-{i}");
            let marker = encode_wire(&[WireEntry {
                subkey: None,
                value: ByteBuf::from(vec![0xc0]),
                expiration: dht_time() + 60.0,
            }]);
            sync.put_to(victim.peer_id(), key.as_bytes(), marker).await;
            if victim.get(key.as_bytes(), false).await.unwrap().is_some() {
                synced = true;
                break;
            }
        }
        assert!(synced, "no marker put got through the checker");
        let elapsed = started.elapsed().as_secs_f64();
        let stats = victim.stats().await.unwrap();
        let sent = (CARRIERS * PUTS) as u64 * u64::from(PER_PUT);
        // Puts that found the signature checker's queue full were dropped
        // unread, with all their entries.
        let unread = stats.unverified_puts_dropped * u64::from(PER_PUT);
        let stored = sent - stats.owner_rate_limited_entries - unread;
        eprintln!(
            "owner rate limit: {sent} entries of one owner from {CARRIERS} peers in {elapsed:.2} s, \
             {stored} stored, {} dropped by the owner limit, {unread} unread (checker busy); \
             puts dropped by the per-peer limit: {}",
            stats.owner_rate_limited_entries, stats.rate_limited_puts
        );
        assert_eq!(stats.rate_limited_puts, 0, "each carrier stayed within its own rate");
        assert_eq!(stats.rejected_inbound, 0, "every entry was genuinely signed");
        assert!(
            (stored as f64) <= 200.0 + 50.0 * elapsed + 1.0,
            "{stored} stored in {elapsed:.2} s"
        );
        // Another owner is not held back by the first one's limit.
        let other = colony_dht::Ed25519SignatureValidator::new(&[6; 32]);
        let mut attacker = Attacker::new().await;
        attacker
            .connect(victim.listen_addrs()[0].clone(), victim.peer_id())
            .await;
        attacker
            .put_to(victim.peer_id(), b"other", encode_wire(&[signed(b"other", 0, &other)]))
            .await;
        assert!(victim.get(b"other", false).await.unwrap().is_some());
    })
    .await
    .expect("test timed out");
}
