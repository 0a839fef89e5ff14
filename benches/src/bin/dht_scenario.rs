//! The reference project's DHT benchmark (`benchmarks/benchmark_dht.py`) on
//! colony-dht: N in-process peers on 127.0.0.1; in each round some peers store
//! random keys, then other peers read every key back; a fraction of the peers
//! is killed midway. Prints success rates and latencies.
//!
//! `cargo run --release -p colony-benches --bin dht_scenario -- --peers 64 --failure-rate 0.1`

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use colony_benches::{Summary, ms};
use colony_dht::{Dht, DhtConfig, DhtValue, IdentitySource, dht_time};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};

/// Benchmark options (defaults follow the reference where it has them).
#[derive(Debug, Parser)]
struct Args {
    /// Number of peers.
    #[arg(long, default_value_t = 64)]
    peers: usize,
    /// Each new peer bootstraps from this many random earlier peers.
    #[arg(long, default_value_t = 4)]
    initial_peers: usize,
    /// Rounds of store-then-get.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Peers that store one random key each per round.
    #[arg(long, default_value_t = 16)]
    store_peers: usize,
    /// Peers that read every key of the round.
    #[arg(long, default_value_t = 16)]
    get_peers: usize,
    /// Value lifetime in seconds.
    #[arg(long, default_value_t = 300.0)]
    expiration: f64,
    /// Read with `latest = true` (visit every replica) instead of the first answer.
    #[arg(long)]
    latest: bool,
    /// Fraction of peers killed midway (after the stores of the middle round).
    #[arg(long, default_value_t = 0.1)]
    failure_rate: f64,
    /// Kademlia replication factor `k`.
    #[arg(long, default_value_t = DhtConfig::default().replication)]
    replication: usize,
    /// Kademlia lookup parallelism `alpha`.
    #[arg(long, default_value_t = DhtConfig::default().parallelism)]
    parallelism: usize,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Default)]
struct Tally {
    attempts: usize,
    ok: usize,
    latencies: Vec<Duration>,
}

impl Tally {
    fn report(&self, name: &str) {
        let s = Summary::new(self.latencies.iter().copied());
        println!(
            "{name}: success {:.2}% ({}/{}), mean {:.3} ms, median {:.3} ms, p99 {:.3} ms",
            100.0 * self.ok as f64 / self.attempts.max(1) as f64,
            self.ok,
            self.attempts,
            ms(s.mean()),
            ms(s.median()),
            ms(s.percentile(99.0)),
        );
    }
}

fn secret(rng: &mut StdRng) -> [u8; 32] {
    rng.r#gen()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rng = StdRng::seed_from_u64(args.seed);
    let started = Instant::now();
    let mut peers: Vec<Dht> = Vec::with_capacity(args.peers);
    for i in 0..args.peers {
        let initial: Vec<_> = peers
            .choose_multiple(&mut rng, args.initial_peers.min(i))
            .flat_map(|p: &Dht| p.listen_addrs())
            .collect();
        let config = DhtConfig {
            initial_peers: initial,
            identity: IdentitySource::Secret(secret(&mut rng)),
            replication: args.replication,
            parallelism: args.parallelism,
            ..DhtConfig::default()
        };
        peers.push(
            Dht::new(config)
                .await
                .with_context(|| format!("starting peer {i}"))?,
        );
    }
    println!(
        "started {} peers in {:.2} s",
        args.peers,
        started.elapsed().as_secs_f64()
    );

    let kill_round = args.rounds / 2;
    let to_kill = (args.failure_rate * args.peers as f64).round() as usize;
    let mut stores = Tally::default();
    let mut gets = Tally::default();
    let mut gets_after_kill = Tally::default();
    for round in 0..args.rounds {
        let store_peers: Vec<Dht> = peers
            .choose_multiple(&mut rng, args.store_peers)
            .cloned()
            .collect();
        let keys: Vec<(Vec<u8>, Vec<u8>)> = store_peers
            .iter()
            .map(|_| {
                let key: [u8; 16] = rng.r#gen();
                let value: [u8; 16] = rng.r#gen();
                (hex_bytes(&key), rmp_bin(&value))
            })
            .collect();
        let expiration = dht_time() + args.expiration;
        let results = futures::future::join_all(store_peers.iter().zip(&keys).map(
            |(p, (k, v))| async move {
                let t = Instant::now();
                let r = p.store(k, None, v.clone(), expiration).await;
                (r, t.elapsed())
            },
        ))
        .await;
        for (r, dt) in results {
            stores.attempts += 1;
            if r.as_ref().is_ok_and(|o| o.is_stored()) {
                stores.ok += 1;
            }
            stores.latencies.push(dt);
        }
        if round == kill_round && to_kill > 0 {
            peers.shuffle(&mut rng);
            for p in peers.drain(..to_kill) {
                p.shutdown().await;
            }
            println!(
                "round {round}: killed {to_kill} peers, {} remain",
                peers.len()
            );
        }
        let get_peers: Vec<Dht> = peers
            .choose_multiple(&mut rng, args.get_peers)
            .cloned()
            .collect();
        let latest = args.latest;
        let results = futures::future::join_all(get_peers.iter().flat_map(|p| {
            keys.iter().map(move |(k, v)| async move {
                let t = Instant::now();
                let r = p.get(k, latest).await;
                let ok = matches!(r, Ok(Some(DhtValue::Regular { ref value, .. })) if value == v);
                (ok, t.elapsed())
            })
        }))
        .await;
        let tally = if round >= kill_round && to_kill > 0 {
            &mut gets_after_kill
        } else {
            &mut gets
        };
        for (ok, dt) in results {
            tally.attempts += 1;
            tally.ok += usize::from(ok);
            tally.latencies.push(dt);
        }
    }
    println!(
        "peers {}, rounds {}, store peers {}, get peers {}, latest {}, failure rate {}, k {}, alpha {}",
        args.peers,
        args.rounds,
        args.store_peers,
        args.get_peers,
        args.latest,
        args.failure_rate,
        args.replication,
        args.parallelism
    );
    stores.report("store");
    gets.report("get (no peers killed)");
    if to_kill > 0 {
        gets_after_kill.report(&format!("get (after killing {to_kill} peers)"));
    }
    for p in &peers {
        p.shutdown().await;
    }
    Ok(())
}

fn hex_bytes(bytes: &[u8]) -> Vec<u8> {
    bytes
        .iter()
        .flat_map(|b| format!("{b:02x}").into_bytes())
        .collect()
}

/// MessagePack bin8 of up to 255 bytes.
fn rmp_bin(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![0xc4, bytes.len() as u8];
    out.extend_from_slice(bytes);
    out
}
