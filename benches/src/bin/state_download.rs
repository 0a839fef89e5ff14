//! A late joiner downloading a vouched state from 1 donor and from several,
//! alternately, over real DHT nodes and libp2p streams.
//!
//! Roles: `donor` (one process per donor host: holds the state, declares
//! it, serves until stdin closes), `joiner` (downloads it `--rounds` times
//! with one donor and with all, alternating, and prints the figures beside
//! the link bound), or `local` (everything in one process on 127.0.0.1,
//! links uncapped). `scripts/netns-state.sh` runs donors and the joiner in
//! network namespaces with each donor's link capped.
//!
//! `cargo run --release -p colony-benches --bin state_download -- --role local`

use std::{
    io::BufRead,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use colony_averaging::{AveragerConfig, DecentralizedAverager};
use colony_dht::{Dht, DhtConfig, Multiaddr, dht_time};

#[derive(Debug, Parser)]
struct Args {
    /// `donor`, `joiner` or `local`.
    #[arg(long, default_value = "local")]
    role: String,
    /// Floats in the state.
    #[arg(long, default_value_t = 8 << 20)]
    floats: usize,
    /// Donor count (`local` only: the joiner takes it from `--initial-peers`).
    #[arg(long, default_value_t = 3)]
    donors: usize,
    /// Downloads per donor count.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// IP to listen on (donor, joiner).
    #[arg(long, default_value = "127.0.0.1")]
    ip: String,
    /// The donors' multiaddrs, comma-separated (joiner; for a donor, the
    /// donors started before it).
    #[arg(long, value_delimiter = ',')]
    initial_peers: Vec<Multiaddr>,
    /// Each donor's upload rate, Mbit/s, for the link bound (0: not capped).
    #[arg(long, default_value_t = 0.0)]
    donor_mbit: f64,
}

const PREFIX: &str = "statebench";

/// The state every donor holds (identical, so every donor vouches for it).
fn state(floats: usize) -> Vec<Vec<f32>> {
    vec![
        (0..floats)
            .map(|i| (i % 4093) as f32 * 0.25 - 7.0)
            .collect(),
    ]
}

fn config(max_donors: usize) -> AveragerConfig {
    let mut c = AveragerConfig::new(PREFIX);
    c.state_max_donors = max_donors;
    c.state_min_rate = 64.0 * 1024.0;
    c.request_timeout = Duration::from_secs(5);
    c.min_matchmaking_time = Duration::from_secs(10);
    c.allreduce.sender_timeout = Duration::from_secs(30);
    c.allreduce.reducer_timeout = Duration::from_secs(60);
    c.allreduce.allreduce_timeout = Duration::from_secs(120);
    c
}

async fn node(ip: &str, initial: Vec<Multiaddr>) -> anyhow::Result<Dht> {
    Dht::new(DhtConfig {
        listen_addrs: vec![format!("/ip4/{ip}/tcp/0").parse()?],
        initial_peers: initial,
        ..DhtConfig::default()
    })
    .await
    .context("starting a DHT node")
}

async fn donor(dht: Dht, floats: usize) -> anyhow::Result<DecentralizedAverager> {
    let mut c = config(1);
    c.data_listen_addr = std::net::SocketAddr::new(dht_ip(&dht), 0);
    let avg = DecentralizedAverager::new(dht, state(floats), c).await?;
    avg.declare_state(1.0, b"step 1".to_vec(), dht_time() + 3000.0)
        .await?;
    Ok(avg)
}

fn dht_ip(dht: &Dht) -> std::net::IpAddr {
    dht.listen_addrs()
        .iter()
        .find_map(|a| {
            a.iter().find_map(|p| match p {
                colony_dht::Protocol::Ip4(ip) => Some(std::net::IpAddr::V4(ip)),
                _ => None,
            })
        })
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]))
}

/// Downloads with one donor and with all, alternating; returns the times.
async fn joiner(
    ip: &str,
    initial: Vec<Multiaddr>,
    floats: usize,
    donors: usize,
    rounds: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let want = state(floats);
    let mut averagers = Vec::new();
    for max in [1, donors] {
        let dht = node(ip, initial.clone()).await?;
        let mut c = config(max);
        c.mode = colony_averaging::AveragingMode::Client;
        averagers.push(DecentralizedAverager::new(dht, vec![vec![0.0; floats]], c).await?);
    }
    let (mut one, mut all) = (Vec::new(), Vec::new());
    for round in 0..2 * rounds {
        let which = round % 2;
        let started = Instant::now();
        let got = averagers[which]
            .download_state_from_peers(Duration::from_secs(600), f64::INFINITY)
            .await
            .with_context(|| format!("download {round}"))?;
        let secs = started.elapsed().as_secs_f64();
        if got.tensors != want {
            bail!("download {round} does not match the donors' state");
        }
        let used = got.donors.iter().filter(|(_, n)| *n > 0).count();
        eprintln!(
            "download {round}: {secs:.3} s from {used} donor(s) (max {}), chunks {:?}",
            [1, donors][which],
            got.donors.iter().map(|(_, n)| n).collect::<Vec<_>>()
        );
        [&mut one, &mut all][which].push(secs);
    }
    Ok((one, all))
}

/// `addr` ending in `/p2p/<this node's id>`.
fn with_peer_id(addr: &Multiaddr, dht: &Dht) -> String {
    if addr
        .iter()
        .any(|p| matches!(p, colony_dht::Protocol::P2p(_)))
    {
        addr.to_string()
    } else {
        format!("{addr}/p2p/{}", dht.peer_id())
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(args: &Args, donors: usize, one: &[f64], all: &[f64]) {
    let bytes = (args.floats * 4) as f64;
    let (m1, mn) = (median(one), median(all));
    let bound = |n: f64| (args.donor_mbit > 0.0).then(|| bytes / (n * args.donor_mbit * 1e6 / 8.0));
    println!(
        "{}",
        serde_json::json!({
            "bench": "state_download",
            "floats": args.floats,
            "bytes": bytes,
            "donors": donors,
            "donor_mbit": args.donor_mbit,
            "one_donor_s": one,
            "all_donors_s": all,
            "one_donor_median_s": m1,
            "all_donors_median_s": mn,
            "speedup": m1 / mn,
            "one_donor_link_bound_s": bound(1.0),
            "all_donors_link_bound_s": bound(donors as f64),
        })
    );
    eprintln!(
        "state download, {:.1} MB: 1 donor {m1:.3} s, {donors} donors {mn:.3} s: {:.2}x faster{}",
        bytes / 1e6,
        m1 / mn,
        match (bound(1.0), bound(donors as f64)) {
            (Some(b1), Some(bn)) => format!(
                " (link bounds {b1:.3} s and {bn:.3} s: {:.2}x and {:.2}x of them; target 2x: {})",
                m1 / b1,
                mn / bn,
                if m1 / mn >= 2.0 { "met" } else { "missed" }
            ),
            _ => String::new(),
        }
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.role.as_str() {
        "donor" => {
            let dht = node(&args.ip, args.initial_peers.clone()).await?;
            let addr = dht
                .listen_addrs()
                .into_iter()
                .next()
                .context("no listen address")?;
            let _avg = donor(dht.clone(), args.floats).await?;
            println!("READY {}", with_peer_id(&addr, &dht));
            // Serve until the harness closes stdin.
            let _ = tokio::task::spawn_blocking(|| {
                std::io::stdin().lock().lines().for_each(drop);
            })
            .await;
        }
        "joiner" => {
            let donors = args.initial_peers.len();
            if donors == 0 {
                bail!("--initial-peers: the donors' addresses");
            }
            let (one, all) = joiner(
                &args.ip,
                args.initial_peers.clone(),
                args.floats,
                donors,
                args.rounds,
            )
            .await?;
            report(&args, donors, &one, &all);
        }
        "local" => {
            let mut addrs = Vec::new();
            let mut held = Vec::new();
            for _ in 0..args.donors {
                let dht = node("127.0.0.1", addrs.clone()).await?;
                let addr = dht.listen_addrs()[0].clone();
                addrs.push(with_peer_id(&addr, &dht).parse()?);
                held.push(donor(dht, args.floats).await?);
            }
            let (one, all) =
                joiner("127.0.0.1", addrs, args.floats, args.donors, args.rounds).await?;
            report(&args, args.donors, &one, &all);
        }
        other => bail!("unknown role {other}"),
    }
    Ok(())
}
