//! What a global step of the collaborative optimizer costs a peer beyond the
//! all-reduce itself, in time and memory: two peer processes on 127.0.0.1,
//! each with its own DHT node and the real averager, train a model of
//! `--params` parameters with a constant gradient for `--steps` global steps.
//!
//! `cargo run --release -p colony-benches --bin optim_memory -- --params 10000000 --steps 8 [--optimizer adamw] [--json]`
//!
//! Per peer it reports:
//! * `outside_ms`: the median, over global steps, of the wall time of the
//!   `step()` call that took the global step minus the averager's whole
//!   `average` call (matchmaking and all-reduce, `RoundStats::round_s`): the
//!   progress refresh, the copies around the round, the optimizer update and
//!   the state snapshot. Printed beside it, measured
//!   in the same process: `pass_ms`, one copy of the whole averaged buffer
//!   (params + grads + optimizer state), so `outside_ms / pass_ms` reads as
//!   full-model passes per step.
//! * `peak_rss_mib` (VmHWM) beside the limit
//!   `limit_mib` = 1.25 x (params + grads + optimizer state), wire buffers
//!   not included, and the model's own size `model_mib`.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use colony_dht::{Dht, DhtConfig, Multiaddr};
use colony_optim::{
    AdamW, AveragerConfig, CollaborativeOptimizer, Layout, LocalOptimizer, LocalOptimizerKind,
    OptimConfig, Sgd, StepOutcome,
};
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug, Clone)]
#[command(about = "Per-step cost of the collaborative optimizer beyond the all-reduce")]
struct Args {
    /// Parameters of the model.
    #[arg(long, default_value_t = 10_000_000)]
    params: usize,
    /// Timed global steps (one more runs first, untimed).
    #[arg(long, default_value_t = 8)]
    steps: u64,
    /// The local optimizer: sgd (state = 1 x params) or adamw (2 x params).
    #[arg(long, default_value = "sgd")]
    optimizer: String,
    /// Print one JSON object per peer instead of lines.
    #[arg(long)]
    json: bool,
    /// Internal: run as peer INDEX.
    #[arg(long, hide = true)]
    worker: Option<usize>,
    /// Internal: the first peer's address.
    #[arg(long, hide = true)]
    bootstrap: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Report {
    peer: usize,
    params: usize,
    optimizer: String,
    steps: u64,
    outside_ms: f64,
    allreduce_ms: f64,
    matchmaking_ms: f64,
    pass_ms: f64,
    passes: f64,
    peak_rss_mib: f64,
    limit_mib: f64,
    model_mib: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.worker {
        Some(index) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(worker(&args, index)),
        None => parent(&args),
    }
}

fn parent(args: &Args) -> Result<()> {
    let exe = std::env::current_exe()?;
    let common = [
        "--params".to_owned(),
        args.params.to_string(),
        "--steps".to_owned(),
        args.steps.to_string(),
        "--optimizer".to_owned(),
        args.optimizer.clone(),
    ];
    let mut first = Command::new(&exe)
        .args(&common)
        .args(["--worker", "0"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(first.stdout.take().context("stdout")?).lines();
    let addr = lines.next().context("peer 0 said nothing")??;
    let second = Command::new(&exe)
        .args(&common)
        .args(["--worker", "1", "--bootstrap", &addr])
        .stdout(Stdio::piped())
        .spawn()?;
    let out = second.wait_with_output()?;
    let mut reports: Vec<Report> = Vec::new();
    for line in lines.chain(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| Ok(l.to_owned())),
    ) {
        let line = line?;
        if let Ok(r) = serde_json::from_str::<Report>(&line) {
            reports.push(r);
        }
    }
    let status = first.wait()?;
    if !status.success() || !out.status.success() || reports.len() != 2 {
        bail!("a peer failed ({status}, {}): {reports:?}", out.status);
    }
    reports.sort_by_key(|r| r.peer);
    for r in &reports {
        if args.json {
            println!("{}", serde_json::to_string(r)?);
        } else {
            println!(
                "peer {}: {} params, {}: {:.1} ms per global step outside the all-reduce \
                 ({:.1} full-buffer passes of {:.1} ms; all-reduce {:.1} ms, matchmaking {:.1} ms); \
                 peak RSS {:.0} MiB (limit 1.25 x model = {:.0} MiB; model {:.0} MiB)",
                r.peer,
                r.params,
                r.optimizer,
                r.outside_ms,
                r.passes,
                r.pass_ms,
                r.allreduce_ms,
                r.matchmaking_ms,
                r.peak_rss_mib,
                r.limit_mib,
                r.model_mib
            );
        }
    }
    Ok(())
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

async fn worker(args: &Args, index: usize) -> Result<()> {
    let n = args.params;
    let mut dht_cfg = DhtConfig::default();
    if let Some(b) = &args.bootstrap {
        dht_cfg.initial_peers = vec![b.parse::<Multiaddr>()?];
    }
    let dht = Dht::new(dht_cfg).await?;
    if index == 0 {
        let addr = dht
            .listen_addrs()
            .into_iter()
            .next()
            .context("no address")?;
        println!("{addr}/p2p/{}", dht.peer_id());
    }
    let layout = Layout::packed([("w", vec![n])], 1)?;
    let kind = match args.optimizer.as_str() {
        "sgd" => LocalOptimizerKind::Sgd(Sgd::default()),
        "adamw" => LocalOptimizerKind::AdamW(AdamW::default()),
        other => bail!("--optimizer {other:?}: expected sgd or adamw"),
    };
    let local = LocalOptimizer::new(kind, layout)?;
    let state_len = local.state().len();
    const BATCH: u64 = 32;
    let config = OptimConfig {
        batch_size_per_step: Some(BATCH),
        min_refresh_period: 0.05,
        max_refresh_period: 1.0,
        default_refresh_period: 0.2,
        averaging_timeout: 60.0,
        ..OptimConfig::new("optim-memory", 2 * BATCH)
    };
    let mut averaging = AveragerConfig::new(config.averaging_prefix());
    averaging.target_group_size = Some(2);
    averaging.min_matchmaking_time = Duration::from_secs(2);
    averaging.request_timeout = Duration::from_secs(1);
    let mut opt =
        CollaborativeOptimizer::join(dht.clone(), config, averaging, vec![0.0; n], local).await?;
    let mut outside = Vec::new();
    let mut allreduce = Vec::new();
    let mut matchmaking = Vec::new();
    let mut global = 0;
    for _ in 0..100_000 {
        if global > args.steps {
            break;
        }
        opt.grads_mut().fill(1e-4);
        let started = Instant::now();
        let outcome = opt.step(Some(BATCH)).await?;
        let took = started.elapsed().as_secs_f64();
        match outcome {
            StepOutcome::Stepped { group_size, .. } => {
                // The first global step warms up (allocations, connections,
                // the peers finding each other) and may go alone.
                if global > 0 && group_size != 2 {
                    bail!("peer {index}: a global step in a group of {group_size}");
                }
                let (ar, round) = opt
                    .averager_mut()
                    .map(|a| {
                        let r = a.round_stats();
                        (
                            r.allreduce_s.last().copied().unwrap_or(0.0),
                            r.round_s.last().copied().unwrap_or(0.0),
                        )
                    })
                    .unwrap_or_default();
                if global > 0 {
                    outside.push(1e3 * (took - round));
                    matchmaking.push(1e3 * (round - ar));
                    allreduce.push(1e3 * ar);
                }
                global += 1;
            }
            StepOutcome::Accumulated => {
                opt.state_changed(Duration::from_millis(20)).await;
            }
            other => bail!("peer {index}: {other:?}"),
        }
    }
    if global <= args.steps {
        bail!("peer {index}: only {global} global steps");
    }
    let peak = peak_rss_mib();
    // The floor, the same way in the same process: one copy of a buffer of
    // the averaged size.
    let total = 2 * n + state_len;
    let src = vec![1.0f32; total];
    let mut dst = vec![0.0f32; total];
    let mut passes = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        passes.push(1e3 * t.elapsed().as_secs_f64());
    }
    drop((src, dst));
    let pass_ms = median(&mut passes);
    let outside_ms = median(&mut outside);
    let model_mib = (4 * total) as f64 / (1 << 20) as f64;
    let report = Report {
        peer: index,
        params: n,
        optimizer: args.optimizer.clone(),
        steps: args.steps,
        outside_ms,
        allreduce_ms: median(&mut allreduce),
        matchmaking_ms: median(&mut matchmaking),
        pass_ms,
        passes: outside_ms / pass_ms.max(1e-9),
        peak_rss_mib: peak,
        limit_mib: 1.25 * model_mib,
        model_mib,
    };
    println!("{}", serde_json::to_string(&report)?);
    // Let the other peer finish its last round before leaving.
    tokio::time::sleep(Duration::from_secs(2)).await;
    opt.shutdown().await?;
    dht.shutdown().await;
    Ok(())
}
