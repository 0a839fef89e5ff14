//! `colony demo`: a local swarm of peers (separate processes on 127.0.0.1) training the
//! digits classifier together, with a live progress bar and a verdict.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
};

use crate::train::Event;

/// Options of `colony demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Number of peers (processes); the first is the bootstrap node.
    #[arg(long, default_value_t = 4, env = "COLONY_PEERS")]
    peers: usize,
    /// Samples the swarm accumulates per global step (default 256; with
    /// --local-updates H, H x --batch-size x --peers, so that H decides).
    #[arg(long, env = "COLONY_TARGET_BATCH_SIZE")]
    target_batch_size: Option<u64>,
    /// Samples per local micro-batch.
    #[arg(long, default_value_t = 32, env = "COLONY_BATCH_SIZE")]
    batch_size: u64,
    /// Stop after this many global steps.
    #[arg(long, default_value_t = 150, env = "COLONY_MAX_STEPS")]
    max_steps: u64,
    /// Held-out accuracy at which training stops (the demo passes at >= 95%).
    #[arg(long, default_value_t = 0.96, env = "COLONY_TARGET_ACCURACY")]
    target_accuracy: f64,
    /// Accuracy the demo requires to pass.
    #[arg(long, default_value_t = 0.95, env = "COLONY_PASS_ACCURACY")]
    pass_accuracy: f64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 175.0, env = "COLONY_TIMEOUT_S")]
    timeout_s: f64,
    /// How long a peer waits for others to join an averaging round (s). A
    /// round assembles as soon as all peers have joined, so this only bounds
    /// the wait for a slow or vanished peer; a peer that misses the last round
    /// would end with different parameters.
    #[arg(long, default_value_t = 4.0, env = "COLONY_MATCHMAKING_TIME")]
    matchmaking_time: f64,
    /// Emulated compute per micro-batch (ms), so peers leave CPU to the network.
    #[arg(long, default_value_t = 2.0, env = "COLONY_COMPUTE_MS")]
    compute_ms: f64,
    /// Wire compression of the averaging rounds: none, fp16, bf16 or 8bit.
    /// Peers still end with identical parameters: every peer applies the
    /// same decoded averages.
    #[arg(long, default_value = "none", env = "COLONY_COMPRESSION")]
    compression: String,
    /// Wire compression of the gradients only (default: --compression).
    #[arg(long, env = "COLONY_GRAD_COMPRESSION")]
    grad_compression: Option<String>,
    /// Wire compression of parameters and optimizer state (default:
    /// --compression).
    #[arg(long, env = "COLONY_STATE_COMPRESSION")]
    state_compression: Option<String>,
    /// Delayed parameter updates on every peer (see `colony train --help`).
    /// Pair it with --optimizer adamw (96 % in 141 steps here, against 129
    /// without the delay) or a lower --lr: the default sgd (lr 0.3,
    /// momentum 0.9) diverges under the one-step staleness.
    #[arg(long, env = "COLONY_DELAY_UPDATES")]
    delay_updates: bool,
    /// Local updates on every peer: H inner steps between two averaging
    /// rounds, DiLoCo's outer Nesterov SGD after each (see `colony train
    /// --help`).
    #[arg(long, value_name = "H", env = "COLONY_LOCAL_UPDATES")]
    local_updates: Option<u64>,
    /// The outer learning rate (with --local-updates; default 0.7).
    #[arg(long, env = "COLONY_OUTER_LR")]
    outer_lr: Option<f64>,
    /// The outer Nesterov momentum (with --local-updates; default 0.9).
    #[arg(long, env = "COLONY_OUTER_MOMENTUM")]
    outer_momentum: Option<f64>,
    /// The peers' local optimizer: sgd or adamw (default: sgd; with
    /// --local-updates adamw, DiLoCo's inner optimizer: 96 % in 25 outer
    /// steps here with H = 8, where sgd with momentum 0.9 under the outer
    /// Nesterov momentum stalls near 94 %).
    #[arg(long, env = "COLONY_OPTIMIZER")]
    optimizer: Option<String>,
    /// The peers' learning rate (default: 0.3 for sgd, 0.003 for adamw).
    #[arg(long, env = "COLONY_LR")]
    lr: Option<f64>,
    /// Folder for the peers' logs (default: a temporary folder).
    #[arg(long, env = "COLONY_LOG_DIR")]
    log_dir: Option<PathBuf>,
}

/// The swarm's samples per global step: as given, or 256, or with local
/// updates what the peers process in H inner steps.
fn target_batch_size(args: &DemoArgs) -> u64 {
    args.target_batch_size.unwrap_or(match args.local_updates {
        Some(h) => h
            .saturating_mul(args.batch_size)
            .saturating_mul(args.peers as u64),
        None => 256,
    })
}

/// The peers' local optimizer: as given, or sgd, or adamw with local updates.
fn optimizer(args: &DemoArgs) -> &str {
    match (&args.optimizer, args.local_updates) {
        (Some(o), _) => o,
        (None, Some(_)) => "adamw",
        (None, None) => "sgd",
    }
}

struct Peer {
    child: Child,
    done: Option<(u64, f64, String, f64, u64)>,
}

/// Runs the demo; returns whether it converged with identical parameters on all peers.
pub(crate) fn run(args: DemoArgs) -> anyhow::Result<bool> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(demo(args))
}

fn spawn_peer(
    args: &DemoArgs,
    index: usize,
    run_id: &str,
    bootstrap: Option<&str>,
    log_dir: &std::path::Path,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("locating the colony binary")?;
    let log = std::fs::File::create(log_dir.join(format!("peer-{index}.log")))?;
    let mut cmd = Command::new(exe);
    // The demo's peers take their settings from the demo, not from COLONY_*
    // variables meant for a real peer of this host.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("COLONY_") {
            cmd.env_remove(key);
        }
    }
    cmd.arg("train")
        .args(["--json", "--run-id", run_id])
        .args(["--shard", &format!("{index}/{}", args.peers)])
        .args(["--target-batch-size", &target_batch_size(args).to_string()])
        .args(["--batch-size", &args.batch_size.to_string()])
        .args(["--max-steps", &args.max_steps.to_string()])
        .args(["--target-accuracy", &args.target_accuracy.to_string()])
        .args(["--max-seconds", &args.timeout_s.to_string()])
        .args(["--compute-ms", &args.compute_ms.to_string()])
        .args(["--compression", &args.compression])
        .args(["--optimizer", optimizer(args)])
        .args(["--matchmaking-time", &args.matchmaking_time.to_string()])
        .args(["--target-group-size", &args.peers.to_string()]);
    if let Some(addr) = bootstrap {
        cmd.args(["--initial-peers", addr]);
    }
    if let Some(c) = &args.grad_compression {
        cmd.args(["--grad-compression", c]);
    }
    if args.delay_updates {
        cmd.arg("--delay-updates");
    }
    if let Some(h) = args.local_updates {
        cmd.args(["--local-updates", &h.to_string()]);
    }
    if let Some(lr) = args.outer_lr {
        cmd.args(["--outer-lr", &lr.to_string()]);
    }
    if let Some(m) = args.outer_momentum {
        cmd.args(["--outer-momentum", &m.to_string()]);
    }
    if let Some(c) = &args.state_compression {
        cmd.args(["--state-compression", c]);
    }
    let lr = args.lr.unwrap_or(if optimizer(args) == "adamw" {
        0.003
    } else {
        0.3
    });
    cmd.args(["--lr", &lr.to_string()]);
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    Ok(cmd.spawn()?)
}

fn forward_lines(
    index: usize,
    child: &mut Child,
    tx: mpsc::Sender<(usize, Event)>,
) -> anyhow::Result<()> {
    let stdout = child.stdout.take().context("peer stdout")?;
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(event) = serde_json::from_str::<Event>(&line)
                && tx.send((index, event)).await.is_err()
            {
                break;
            }
        }
    });
    Ok(())
}

async fn demo(args: DemoArgs) -> anyhow::Result<bool> {
    anyhow::ensure!(args.peers >= 1, "--peers must be at least 1");
    crate::train::parse_codec("--compression", &args.compression)?;
    for (flag, value) in [
        ("--grad-compression", &args.grad_compression),
        ("--state-compression", &args.state_compression),
    ] {
        if let Some(value) = value {
            crate::train::parse_codec(flag, value)?;
        }
    }
    anyhow::ensure!(
        matches!(optimizer(&args), "sgd" | "adamw"),
        "--optimizer {:?}: expected sgd or adamw",
        optimizer(&args)
    );
    let started = Instant::now();
    let run_id = format!("demo{}", std::process::id());
    let log_dir = match &args.log_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("colony-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&log_dir)?;
    eprintln!(
        "colony demo: {} peers on 127.0.0.1 train a 64-{}-10 MLP on the 8x8 digits, target batch {} (logs in {})",
        args.peers,
        64,
        target_batch_size(&args),
        log_dir.display()
    );
    let (tx, mut rx) = mpsc::channel::<(usize, Event)>(1024);
    let deadline = Duration::from_secs_f64(args.timeout_s);

    let mut first = spawn_peer(&args, 0, &run_id, None, &log_dir)?;
    forward_lines(0, &mut first, tx.clone())?;
    let bootstrap = loop {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some((0, Event::Listening { addrs }))) => {
                break addrs
                    .into_iter()
                    .next()
                    .context("bootstrap peer listens nowhere")?;
            }
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => bail!(
                "the bootstrap peer did not start (see {})",
                log_dir.display()
            ),
        }
    };
    let mut peers = vec![Peer {
        child: first,
        done: None,
    }];
    for i in 1..args.peers {
        let mut child = spawn_peer(&args, i, &run_id, Some(&bootstrap), &log_dir)?;
        forward_lines(i, &mut child, tx.clone())?;
        peers.push(Peer { child, done: None });
    }
    drop(tx);

    let bar = ProgressBar::new(target_batch_size(&args));
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} step {prefix:>3} [{bar:30}] {pos}/{len} samples {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut remaining = args.peers;
    while remaining > 0 {
        let left = deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((
                i,
                Event::Progress {
                    step,
                    global_step,
                    samples,
                    target,
                    peers: n,
                    loss,
                },
            ))) => {
                bar.set_prefix(global_step.to_string());
                bar.set_length(target);
                bar.set_position(samples.min(target));
                bar.set_message(format!(
                    "| {n} peers | loss {loss:.3} | peer {i} at step {step}"
                ));
                bar.tick();
            }
            Ok(Some((
                i,
                Event::Done {
                    step,
                    accuracy,
                    hash,
                    wall_s,
                    averaged_steps,
                    ..
                },
            ))) => {
                bar.println(format!(
                    "peer {i} done at step {step}: accuracy {:.2}%, {averaged_steps} averaged steps",
                    accuracy * 100.0
                ));
                peers[i].done = Some((step, accuracy, hash, wall_s, averaged_steps));
                remaining -= 1;
            }
            Ok(Some((_, Event::Listening { .. } | Event::Reachability { .. }))) => {}
            Ok(None) => break,
            Err(_) => {
                bar.println("timed out");
                break;
            }
        }
    }
    bar.finish_and_clear();
    let mut failures = Vec::new();
    for (i, p) in peers.iter_mut().enumerate() {
        let left = deadline
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(5));
        match tokio::time::timeout(left, p.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => failures.push(format!("peer {i} exited with {status}")),
            Ok(Err(e)) => failures.push(format!("peer {i}: {e}")),
            Err(_) => {
                let _ = p.child.start_kill();
                failures.push(format!("peer {i} did not exit in time"));
            }
        }
    }
    let wall = started.elapsed().as_secs_f64();
    println!("\n peer | step | held-out accuracy | averaged steps | parameters sha256");
    for (i, p) in peers.iter().enumerate() {
        match &p.done {
            Some((step, acc, hash, _, avg)) => {
                println!(
                    " {i:>4} | {step:>4} | {:>16.2}% | {avg:>14} | {hash}",
                    acc * 100.0
                )
            }
            None => println!(" {i:>4} |    - |                 - |              - | (no result)"),
        }
    }
    let done: Vec<_> = peers.iter().filter_map(|p| p.done.as_ref()).collect();
    if done.len() < peers.len() {
        failures.push(format!("{} of {} peers finished", done.len(), peers.len()));
    }
    if let Some(first) = done.first() {
        if done.iter().any(|d| d.2 != first.2) {
            failures.push("peers hold different parameters".to_owned());
        }
        if let Some(d) = done.iter().find(|d| d.1 < args.pass_accuracy) {
            failures.push(format!(
                "accuracy {:.2}% is below {:.0}%",
                d.1 * 100.0,
                args.pass_accuracy * 100.0
            ));
        }
        println!(
            "\n{} global steps, {:.1} s wall time, {} peers",
            first.0,
            wall,
            peers.len()
        );
    }
    if failures.is_empty() {
        println!("converged: all peers hold identical parameters");
        Ok(true)
    } else {
        for f in &failures {
            println!("FAILED: {f}");
        }
        println!("peer logs: {}", log_dir.display());
        Ok(false)
    }
}
