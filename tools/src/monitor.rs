//! `colony monitor`: the live state of a run (peers, throughput, global step, ETA), read
//! from the DHT by a client-mode node that does not train.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use colony_dht::{Dht, DhtConfig, Multiaddr};
use colony_optim::{
    DhtProgressBoard, LocalProgress, OptimConfig, ProgressBoard, tracker::ClaimLedger,
};

/// Options of `colony monitor`.
#[derive(Debug, Args)]
pub(crate) struct MonitorArgs {
    /// A peer of the run, with /p2p/<peer id> (repeatable).
    #[arg(
        long = "initial-peers",
        required = true,
        env = "COLONY_INITIAL_PEERS",
        value_delimiter = ','
    )]
    initial_peers: Vec<Multiaddr>,
    /// Identity file of this observer node (loaded, or created with mode 0600).
    #[arg(long, env = "COLONY_IDENTITY")]
    identity: Option<std::path::PathBuf>,
    /// The run to watch.
    #[arg(long, default_value = "colony-digits", env = "COLONY_RUN_ID")]
    run_id: String,
    /// The run's target batch size (for the ETA).
    #[arg(long, default_value_t = 256, env = "COLONY_TARGET_BATCH_SIZE")]
    target_batch_size: u64,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0, env = "COLONY_INTERVAL")]
    interval: f64,
    /// Print this many snapshots, then exit (0: run until Ctrl-C).
    #[arg(long, default_value_t = 0, env = "COLONY_COUNT")]
    count: u64,
}

/// Runs `colony monitor`.
pub(crate) fn run(args: MonitorArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(monitor(args))
}

async fn monitor(args: MonitorArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.interval.is_finite() && args.interval > 0.0,
        "--interval must be > 0"
    );
    let mut config = DhtConfig::client(args.initial_peers.clone());
    if let Some(path) = &args.identity {
        config.identity = colony_dht::IdentitySource::File(path.clone());
    }
    let dht = Dht::new(config).await.context("joining the swarm")?;
    let board = DhtProgressBoard::new(dht.clone(), &args.run_id, None).await?;
    let config = OptimConfig::new(args.run_id.clone(), args.target_batch_size);
    config.validate()?;
    let mut printed = 0;
    let mut ledger = ClaimLedger::default();
    loop {
        let records = board.fetch().await?;
        let now = board.now();
        // An observer: a client at step 0 with no samples, removed from the counts.
        let observer = LocalProgress {
            step: 0,
            samples_accumulated: 0,
            samples_per_second: 0.0,
            client_mode: true,
        };
        let state = ledger.estimate(&config, &observer, &board.self_key(), &records, now);
        let live: Vec<_> = records
            .iter()
            .filter(|r| r.expiration > now)
            .filter_map(|r| r.progress.as_ref())
            .collect();
        let eta = state.eta_next_step - now;
        println!(
            "global step {} | {}/{} samples | {} peers ({} clients) | {:.1} samples/s | ETA {}",
            state.optimizer_step,
            state.samples_accumulated,
            state.target_batch_size,
            state.num_peers.saturating_sub(1),
            state.num_clients.saturating_sub(1),
            state.samples_per_second,
            if eta.is_finite() {
                format!("{eta:.1} s")
            } else {
                "unknown".to_owned()
            },
        );
        for p in &live {
            println!(
                "  {:<54} step {:>5} | {:>6} samples | {:>9.1} samples/s | {:>5.1} s ago{}",
                p.peer_id,
                p.step,
                p.samples_accumulated,
                p.samples_per_second,
                (now - p.time).max(0.0),
                if p.client_mode { " | client" } else { "" }
            );
        }
        printed += 1;
        if args.count > 0 && printed >= args.count {
            break;
        }
        tokio::time::sleep(Duration::from_secs_f64(args.interval)).await;
    }
    dht.shutdown().await;
    Ok(())
}
