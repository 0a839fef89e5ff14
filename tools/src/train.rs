//! `colony train`: one peer of a collaborative run on the built-in digits classifier.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use colony_dht::{Dht, DhtConfig, Multiaddr};
use colony_optim::{
    AveragerConfig, AveragingMode, CollaborativeOptimizer, Compression, LocalOptimizer,
    LocalOptimizerKind, LocalUpdates, LrSchedule, OptimConfig, OptimError, Sgd, StepOutcome,
};
use serde::Serialize;

use crate::model::{Digits, Mlp, Rng, params_hash};

/// Options of `colony train` (also used by `colony demo` for its peers).
#[derive(Debug, Clone, Args)]
pub(crate) struct TrainArgs {
    /// A peer of the run to join, with /p2p/<peer id> (repeatable). None: start a run.
    #[arg(
        long = "initial-peers",
        env = "COLONY_INITIAL_PEERS",
        value_delimiter = ','
    )]
    pub(crate) initial_peers: Vec<Multiaddr>,
    /// The run's name: peers with the same run id train together.
    #[arg(long, default_value = "colony-digits", env = "COLONY_RUN_ID")]
    pub(crate) run_id: String,
    /// Identity file: loaded if it exists, created (mode 0600) otherwise, so the
    /// peer id survives restarts. Default: a fresh identity per start.
    #[arg(long, env = "COLONY_IDENTITY")]
    pub(crate) identity: Option<std::path::PathBuf>,
    /// A closed run: a file of the peer ids allowed in it, one per line (`#`
    /// starts a comment). Connections with any other peer are denied and
    /// records signed by anyone else are refused. Every member, bootstrap
    /// and relay should be given the same file. Default: an open run.
    #[arg(long, env = "COLONY_ALLOW_PEERS")]
    pub(crate) allow_peers: Option<std::path::PathBuf>,
    /// Seconds between checks that no other host runs with this identity
    /// (a copied identity file): the node that started later stops with an
    /// error. 0 turns the check off.
    #[arg(long, default_value_t = 30.0, env = "COLONY_IDENTITY_CHECK_SECS")]
    pub(crate) identity_check_secs: f64,
    /// An external address other peers should dial, e.g. the public IP of a
    /// port forward: /ip4/203.0.113.5/tcp/31337 (repeatable). It replaces the
    /// listen addresses in what this node advertises; the data plane is
    /// announced at its IP too. Default: the listen addresses.
    #[arg(long = "announce", env = "COLONY_ANNOUNCE", value_delimiter = ',')]
    pub(crate) announce: Vec<Multiaddr>,
    /// Address to listen on (repeatable). Default: /ip4/127.0.0.1/tcp/0.
    #[arg(long = "listen", env = "COLONY_LISTEN", value_delimiter = ',')]
    pub(crate) listen: Vec<Multiaddr>,
    /// Where the averaging data plane listens (TCP, `IP:PORT`). Default: the IP
    /// of the first `--listen` address on any free port, so the data plane is
    /// reachable wherever the DHT is (`0.0.0.0` there: every interface, with a
    /// non-loopback IP of this host announced).
    #[arg(long, env = "COLONY_DATA_LISTEN")]
    pub(crate) data_listen: Option<std::net::SocketAddr>,
    /// The data-plane address group members are told to connect to, when it
    /// differs from the bound one (port forwarding: bind `0.0.0.0:7000`,
    /// announce `203.0.113.5:7000`). Default: derived from the bound address.
    #[arg(long, env = "COLONY_DATA_ANNOUNCE")]
    pub(crate) data_announce: Option<std::net::SocketAddr>,
    /// Open no data-plane port: averaging data travels over the libp2p
    /// connection of the DHT port (same framing and encryption, slower), for
    /// hosts that can open only one port.
    #[arg(long, env = "COLONY_ONE_PORT")]
    pub(crate) one_port: bool,
    /// Samples the whole swarm accumulates per global step.
    #[arg(long, default_value_t = 256, env = "COLONY_TARGET_BATCH_SIZE")]
    pub(crate) target_batch_size: u64,
    /// Samples per local micro-batch.
    #[arg(long, default_value_t = 32, env = "COLONY_BATCH_SIZE")]
    pub(crate) batch_size: u64,
    /// Hidden units of the MLP.
    #[arg(long, default_value_t = 64, env = "COLONY_HIDDEN")]
    pub(crate) hidden: usize,
    /// Learning rate (constant).
    #[arg(long, default_value_t = 0.3, env = "COLONY_LR")]
    pub(crate) lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9, env = "COLONY_MOMENTUM")]
    pub(crate) momentum: f32,
    /// The local optimizer: sgd (with --momentum) or adamw (--lr is its
    /// learning rate; 0.003 suits the digits model).
    #[arg(long, default_value = "sgd", env = "COLONY_OPTIMIZER")]
    pub(crate) optimizer: String,
    /// Delayed parameter updates: each global step's averaging and update
    /// run in the background while the next micro-batches compute on the
    /// previous parameters (staleness 1).
    #[arg(long, env = "COLONY_DELAY_UPDATES")]
    pub(crate) delay_updates: bool,
    /// Local updates, DiLoCo-style: the local optimizer applies every
    /// micro-batch's gradient at once (an inner step); after H inner steps,
    /// or when the swarm reaches --target-batch-size first (set it to at
    /// least H x --batch-size x peers for H to decide), the peers average
    /// their parameter deltas and apply an outer SGD with Nesterov momentum.
    /// Traffic falls H-fold. Every peer of a run must use the same H,
    /// --outer-lr and --outer-momentum (a peer with others is refused at
    /// join). Works with --delay-updates.
    #[arg(long, value_name = "H", env = "COLONY_LOCAL_UPDATES")]
    pub(crate) local_updates: Option<u64>,
    /// The outer optimizer's learning rate (with --local-updates).
    #[arg(long, default_value_t = 0.7, env = "COLONY_OUTER_LR")]
    pub(crate) outer_lr: f64,
    /// The outer optimizer's Nesterov momentum (with --local-updates).
    #[arg(long, default_value_t = 0.9, env = "COLONY_OUTER_MOMENTUM")]
    pub(crate) outer_momentum: f64,
    /// Stop after this many global steps.
    #[arg(long, default_value_t = 150, env = "COLONY_MAX_STEPS")]
    pub(crate) max_steps: u64,
    /// Stop once held-out accuracy reaches this (checked after every global step).
    #[arg(long, default_value_t = 0.96, env = "COLONY_TARGET_ACCURACY")]
    pub(crate) target_accuracy: f64,
    /// This peer's data shard, `INDEX/COUNT`.
    #[arg(long, default_value = "0/1", env = "COLONY_SHARD")]
    pub(crate) shard: String,
    /// Seed of the initial parameters (must match across the run) and of sampling.
    #[arg(long, default_value_t = 42, env = "COLONY_SEED")]
    pub(crate) seed: u64,
    /// Client mode: no inbound connections; contributes samples, not the global step.
    /// Default: chosen at start-up by asking the initial peers to dial this
    /// node's DHT port back (unreachable from all of them: client mode).
    #[arg(long, env = "COLONY_CLIENT")]
    pub(crate) client: bool,
    /// Skip the start-up dial-back check and run as a full peer.
    #[arg(long, env = "COLONY_ASSUME_REACHABLE", conflicts_with = "client")]
    pub(crate) assume_reachable: bool,
    /// When the dial-back finds this node unreachable, do not listen through
    /// a relay: run as a client (sends its parts, reduces nothing). By
    /// default such a node reserves a slot on a relay (a `colony dht serve`
    /// node), so peers reach it through the relay or a hole punch and it
    /// reduces a span like any peer.
    #[arg(long, env = "COLONY_NO_RELAY")]
    pub(crate) no_relay: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600.0, env = "COLONY_MAX_SECONDS")]
    pub(crate) max_seconds: f64,
    /// How long a peer waits for others to join an averaging round (s).
    #[arg(long, default_value_t = 2.0, env = "COLONY_MATCHMAKING_TIME")]
    pub(crate) matchmaking_time: f64,
    /// Assemble an averaging group as soon as it has this many peers, without
    /// waiting out the matchmaking window (default: wait out the window).
    #[arg(long, env = "COLONY_TARGET_GROUP_SIZE")]
    pub(crate) target_group_size: Option<usize>,
    /// Emulated compute time per micro-batch (ms), to pace the demo on small machines.
    #[arg(long, default_value_t = 0.0, env = "COLONY_COMPUTE_MS")]
    pub(crate) compute_ms: f64,
    /// Wire compression of the averaging rounds: none, fp16, bf16 or 8bit
    /// (every peer of a run must use the same).
    #[arg(long, default_value = "none", env = "COLONY_COMPRESSION")]
    pub(crate) compression: String,
    /// Wire compression of the gradients only (default: --compression).
    #[arg(long, env = "COLONY_GRAD_COMPRESSION")]
    pub(crate) grad_compression: Option<String>,
    /// Wire compression of the parameters and optimizer state (default:
    /// --compression). Keep none or bf16 with adamw: fp16 and 8bit flush
    /// Adam's small second moments to zero.
    #[arg(long, env = "COLONY_STATE_COMPRESSION")]
    pub(crate) state_compression: Option<String>,
    /// This host's link bandwidth in Mbit/s, a hint for the load balancer: a
    /// peer on a slow link is given a smaller share to reduce (default: unknown,
    /// treated like the others).
    #[arg(long, env = "COLONY_BANDWIDTH")]
    pub(crate) bandwidth: Option<f64>,
    /// Bytes per part on the wire, in KiB (every peer of a run must use the
    /// same). Smaller parts pipeline better on slow links.
    #[arg(long, default_value_t = 4096, env = "COLONY_PART_SIZE_KIB")]
    pub(crate) part_size_kib: usize,
    /// Print machine-readable JSON lines on stdout (used by `colony demo`).
    #[arg(long, env = "COLONY_JSON")]
    pub(crate) json: bool,
}

/// One line of `--json` output.
#[derive(Debug, Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(crate) enum Event {
    /// The peer is up.
    Listening {
        /// Its multiaddrs.
        addrs: Vec<String>,
    },
    /// What the start-up dial-back found.
    Reachability {
        /// Whether some initial peer could dial this node's DHT port (`None`:
        /// nobody answered).
        reachable: Option<bool>,
        /// This node's IP as the answering peers see it.
        observed_ips: Vec<String>,
        /// Whether this peer now runs in client mode.
        client: bool,
        /// The relay circuits this peer is reachable through (behind NAT:
        /// it then averages as a full peer over libp2p).
        #[serde(default)]
        relay_addrs: Vec<String>,
    },
    /// Progress after a `step()` that changed something (or periodically).
    Progress {
        /// Local step.
        step: u64,
        /// Global step.
        global_step: u64,
        /// Samples accumulated swarm-wide toward the next step.
        samples: u64,
        /// Target batch size.
        target: u64,
        /// Live peers.
        peers: usize,
        /// Last micro-batch loss.
        loss: f32,
    },
    /// Training finished.
    Done {
        /// Final step.
        step: u64,
        /// Held-out accuracy.
        accuracy: f64,
        /// SHA-256 of the parameters.
        hash: String,
        /// Seconds of training.
        wall_s: f64,
        /// Global steps this peer took after averaging with at least one peer.
        averaged_steps: u64,
        /// Of those, steps averaged in a group of at least `--target-group-size`
        /// (0 when it is not set).
        #[serde(default)]
        full_group_steps: u64,
        /// Times this peer fell behind and downloaded the swarm's state from a peer.
        #[serde(default)]
        state_loads: u64,
        /// Samples this peer contributed to the swarm's steps.
        #[serde(default)]
        samples: u64,
        /// Data-plane connections of its rounds that went direct (TCP).
        #[serde(default)]
        direct_connections: u64,
        /// Data-plane connections of its rounds that went over libp2p.
        #[serde(default)]
        libp2p_connections: u64,
        /// Median wall time of its rounds' all-reduce (s).
        #[serde(default)]
        allreduce_s_median: f64,
        /// Mean share of the elements it reduced per round.
        #[serde(default)]
        span_fraction: f64,
        /// Elements averaged per round (parameters, gradients, optimizer state).
        #[serde(default)]
        averaged_elements: u64,
        /// Every peer this one was connected to, and the best path it had:
        /// `direct`, `hole-punched` or `relayed`.
        #[serde(default)]
        peer_paths: std::collections::BTreeMap<String, String>,
        /// Hole punches that opened a direct connection.
        #[serde(default)]
        hole_punches: u64,
        /// Hole punches that failed (traffic to that peer went through a relay).
        #[serde(default)]
        hole_punch_failures: u64,
    },
}

pub(crate) fn emit(json: bool, event: &Event) {
    if json {
        if let Ok(line) = serde_json::to_string(event) {
            println!("{line}");
        }
    } else {
        match event {
            Event::Listening { addrs } => {
                for a in addrs {
                    println!("listening on {a}");
                }
            }
            Event::Reachability {
                reachable,
                observed_ips,
                client,
                relay_addrs,
            } => println!(
                "reachable from outside: {}; seen as {}; {}{}",
                match reachable {
                    Some(true) => "yes",
                    Some(false) => "no",
                    None => "unknown (no initial peer answered)",
                },
                observed_ips.join(", "),
                if *client { "client mode" } else { "full peer" },
                if relay_addrs.is_empty() {
                    String::new()
                } else {
                    format!(", reachable through relay at {}", relay_addrs.join(", "))
                }
            ),
            Event::Progress {
                step,
                global_step,
                samples,
                target,
                peers,
                loss,
            } => {
                println!(
                    "step {step} (global {global_step}) {samples}/{target} samples, {peers} peers, loss {loss:.4}"
                )
            }
            Event::Done {
                step,
                accuracy,
                hash,
                wall_s,
                averaged_steps,
                full_group_steps,
                state_loads,
                samples,
                direct_connections,
                libp2p_connections,
                allreduce_s_median,
                span_fraction,
                ..
            } => println!(
                "done: step {step}, held-out accuracy {:.2}%, {wall_s:.1} s, {averaged_steps} averaged steps ({full_group_steps} in full groups), {samples} samples contributed, {state_loads} state downloads, data connections {direct_connections} direct / {libp2p_connections} over libp2p, all-reduce median {allreduce_s_median:.3} s reducing {:.1}% of the elements, params sha256 {hash}",
                accuracy * 100.0,
                span_fraction * 100.0
            ),
        }
    }
}

impl TrainArgs {
    /// The peer's role, from `--client` (the one place the CLI decides it).
    pub(crate) fn role(&self) -> AveragingMode {
        if self.client {
            AveragingMode::Client
        } else {
            AveragingMode::Node
        }
    }
}

/// The data plane's default bind address: the IP of the first DHT listen
/// address (any port), so peers that reach this node's DHT can reach its data
/// plane too; loopback when the DHT listens on loopback or nowhere given.
fn data_listen_following(listen: &[Multiaddr]) -> std::net::SocketAddr {
    use colony_dht::Protocol;
    let ip = listen.first().and_then(|a| {
        a.iter().find_map(|p| match p {
            Protocol::Ip4(ip) => Some(std::net::IpAddr::V4(ip)),
            Protocol::Ip6(ip) => Some(std::net::IpAddr::V6(ip)),
            _ => None,
        })
    });
    std::net::SocketAddr::new(
        ip.unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        0,
    )
}

/// Whether `colony train` asks its initial peers to dial it back at start-up.
fn checks_reachability(args: &TrainArgs) -> bool {
    !args.client && !args.assume_reachable && !args.initial_peers.is_empty()
}

/// How long an unreachable peer waits for a relay to accept its reservation
/// before it settles for client mode (no wait when no connected peer relays).
const RELAY_WAIT: Duration = Duration::from_secs(5);

/// The peers a dial-back asks: up to three initial peers named by id, not
/// this node itself.
pub(crate) fn dial_back_peers(dht: &Dht, initial_peers: &[Multiaddr]) -> Vec<colony_dht::PeerId> {
    initial_peers
        .iter()
        .filter_map(|a| {
            a.iter().find_map(|p| match p {
                colony_dht::Protocol::P2p(peer) => Some(peer),
                _ => None,
            })
        })
        .filter(|p| *p != dht.peer_id())
        .take(3)
        .collect()
}

/// Asks the initial peers to dial this node's DHT port(s) back: `Some(true)`
/// if any could, `Some(false)` if every one that answered could not, `None`
/// if none answered; with the IPs they saw this node at.
pub(crate) async fn reachable_from_outside(
    dht: &Dht,
    initial_peers: &[Multiaddr],
) -> (Option<bool>, Vec<String>) {
    use colony_dht::Protocol;
    let mut ports: Vec<u16> = dht
        .listen_addrs()
        .iter()
        .filter_map(|a| {
            a.iter().find_map(|p| match p {
                Protocol::Tcp(port) => Some(port),
                _ => None,
            })
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports.truncate(colony_dht::MAX_PORTS);
    if ports.is_empty() {
        return (Some(false), Vec::new());
    }
    let peers = dial_back_peers(dht, initial_peers);
    let answers = futures::future::join_all(peers.iter().map(|p| dht.dial_back(*p, &ports))).await;
    let mut verdict = None;
    let mut seen = Vec::new();
    for answer in answers {
        match answer {
            Ok(a) => {
                let ok = a.ports.iter().any(|c| c.reachable);
                tracing::info!(peer = %a.peer, observed = %a.observed_ip, ?a.ports, "dial-back");
                verdict = Some(verdict.unwrap_or(false) || ok);
                let ip = a.observed_ip.to_string();
                if !seen.contains(&ip) {
                    seen.push(ip);
                }
            }
            Err(e) => tracing::warn!(error = %e, "dial-back request failed"),
        }
    }
    (verdict, seen)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn parse_shard(s: &str) -> anyhow::Result<(usize, usize)> {
    let (i, n) = s.split_once('/').context("--shard must be INDEX/COUNT")?;
    let (i, n): (usize, usize) = (i.parse()?, n.parse()?);
    anyhow::ensure!(n > 0 && i < n, "--shard index must be below the count");
    Ok((i, n))
}

pub(crate) fn optim_config(args: &TrainArgs) -> OptimConfig {
    OptimConfig {
        batch_size_per_step: Some(args.batch_size),
        min_refresh_period: 0.1,
        max_refresh_period: 2.0,
        default_refresh_period: 0.5,
        metadata_expiration: 10.0,
        averaging_timeout: 15.0,
        load_state_timeout: 30.0,
        role: args.role(),
        lr_schedule: LrSchedule::Constant { lr: args.lr },
        // Checked in `train` (parse_codec) before anything starts.
        grad_compression: args
            .grad_compression
            .as_deref()
            .and_then(Compression::parse),
        state_compression: args
            .state_compression
            .as_deref()
            .and_then(Compression::parse),
        delay_updates: args.delay_updates,
        local_updates: args.local_updates.map(|inner_steps| LocalUpdates {
            inner_steps,
            outer_lr: args.outer_lr,
            outer_momentum: args.outer_momentum,
        }),
        ..OptimConfig::new(args.run_id.clone(), args.target_batch_size)
    }
}

/// A `--*-compression` value, or an error naming the flag.
pub(crate) fn parse_codec(flag: &str, value: &str) -> anyhow::Result<Compression> {
    Compression::parse(value)
        .with_context(|| format!("{flag} {value:?}: expected none, fp16, bf16 or 8bit"))
}

/// Runs `colony train`.
pub(crate) fn run(args: TrainArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(train(args))
}

async fn train(args: TrainArgs) -> anyhow::Result<()> {
    let (shard, shards) = parse_shard(&args.shard)?;
    let mut dht_config = DhtConfig {
        initial_peers: args.initial_peers.clone(),
        // A client accepts no inbound connections on any layer. A peer that
        // will ask whether it is reachable starts as a DHT client too, so it
        // enters nobody's routing table with an address nobody can dial; it
        // turns server once a peer dialed it back.
        client_mode: args.role() == AveragingMode::Client || checks_reachability(&args),
        ..DhtConfig::default()
    };
    if !args.listen.is_empty() {
        dht_config.listen_addrs = args.listen.clone();
    }
    if let Some(path) = &args.allow_peers {
        dht_config.allowed_peers = Some(crate::identity_cmd::read_allow_list(path)?);
    }
    if let Some(path) = &args.identity {
        dht_config.identity = colony_dht::IdentitySource::File(path.clone());
    }
    anyhow::ensure!(
        args.identity_check_secs.is_finite() && args.identity_check_secs >= 0.0,
        "--identity-check-secs must be >= 0"
    );
    dht_config.identity_check_interval = Duration::from_secs_f64(args.identity_check_secs);
    dht_config.announce_addrs = args.announce.clone();
    let dht = Dht::new(dht_config)
        .await
        .context("starting the DHT node")?;
    emit(
        args.json,
        &Event::Listening {
            addrs: dht
                .advertised_addrs()
                .iter()
                .map(|a| a.to_string())
                .collect(),
        },
    );
    let mut args = args;
    if checks_reachability(&args) {
        let (reachable, observed_ips) = reachable_from_outside(&dht, &args.initial_peers).await;
        if reachable != Some(false) {
            dht.set_client_mode(false).await?;
        } else {
            tracing::warn!(
                ?observed_ips,
                "no initial peer can dial this node's DHT port (behind NAT or a firewall?): \
                 running as a client (open the port and pass --announce, or --assume-reachable)"
            );
            dht.set_client_mode(true).await?;
            args.data_announce = None;
            let relays = if args.no_relay {
                Vec::new()
            } else {
                dht.wait_for_relay(RELAY_WAIT).await
            };
            if relays.is_empty() {
                args.client = true;
            } else {
                // Reachable through the relay (and a hole punch where it
                // works): a full peer whose parts travel over libp2p.
                tracing::info!(relays = ?relays, "listening through a relay: averaging as a full peer over libp2p");
                args.one_port = true;
                args.data_listen = None;
            }
        }
        emit(
            args.json,
            &Event::Reachability {
                reachable,
                observed_ips,
                client: args.client,
                relay_addrs: dht.relay_addrs().iter().map(ToString::to_string).collect(),
            },
        );
    }
    let config = optim_config(&args);
    let result = train_with(args, dht.clone(), config, shard, shards).await;
    dht.shutdown().await;
    result
}

async fn train_with(
    args: TrainArgs,
    dht: Dht,
    config: OptimConfig,
    shard: usize,
    shards: usize,
) -> anyhow::Result<()> {
    let digits = Digits::load(0.2, 0)?;
    let mlp = Mlp::new(args.hidden);
    let kind = match args.optimizer.as_str() {
        "sgd" => LocalOptimizerKind::Sgd(Sgd {
            momentum: args.momentum,
            ..Sgd::default()
        }),
        "adamw" => LocalOptimizerKind::AdamW(colony_optim::AdamW::default()),
        other => anyhow::bail!("--optimizer {other:?}: expected sgd or adamw"),
    };
    let local = LocalOptimizer::new(kind, mlp.layout()?)?;
    anyhow::ensure!(
        args.matchmaking_time.is_finite() && args.matchmaking_time > 0.0,
        "--matchmaking-time must be > 0"
    );
    let mut averaging = AveragerConfig::new(config.averaging_prefix());
    averaging.data_listen_addr = args
        .data_listen
        .unwrap_or_else(|| data_listen_following(&args.listen));
    averaging.data_announce_addr = args.data_announce;
    if args.one_port {
        anyhow::ensure!(
            args.data_listen.is_none() && args.data_announce.is_none(),
            "--one-port opens no data-plane port: drop --data-listen / --data-announce"
        );
        averaging.direct_data_plane = false;
    }
    averaging.min_matchmaking_time = Duration::from_secs_f64(args.matchmaking_time);
    // A leader's answer must fit well inside one declaration (the averager
    // refuses request_timeout >= min_matchmaking_time).
    averaging.request_timeout = averaging
        .request_timeout
        .min(averaging.min_matchmaking_time / 2);
    averaging.allreduce.compression = parse_codec("--compression", &args.compression)?;
    for (flag, value) in [
        ("--grad-compression", &args.grad_compression),
        ("--state-compression", &args.state_compression),
    ] {
        if let Some(value) = value {
            parse_codec(flag, value)?;
        }
    }
    anyhow::ensure!(
        (1..=65_536).contains(&args.part_size_kib),
        "--part-size-kib must be between 1 and 65536"
    );
    averaging.allreduce.part_size_bytes = args.part_size_kib * 1024;
    if let Some(b) = args.bandwidth {
        anyhow::ensure!(b.is_finite() && b > 0.0, "--bandwidth must be > 0 Mbit/s");
        averaging.bandwidth = Some(b);
    }
    if let Some(size) = args.target_group_size {
        anyhow::ensure!(size >= 2, "--target-group-size must be at least 2");
        averaging.target_group_size = Some(size);
    }
    let mut opt =
        CollaborativeOptimizer::join(dht.clone(), config, averaging, mlp.init(args.seed), local)
            .await?;
    let indices = digits.shard(shard, shards);
    anyhow::ensure!(!indices.is_empty(), "shard {shard}/{shards} is empty");
    let training = async {
        let mut rng = Rng::new(args.seed.wrapping_add(1 + shard as u64));
        let start = Instant::now();
        let mut grads = vec![0.0; mlp.num_params()];
        let mut averaged_steps = 0;
        let mut full_group_steps = 0;
        let mut state_loads = 0;
        let mut samples = 0;
        let mut last_report = Instant::now();
        loop {
            anyhow::ensure!(
                start.elapsed().as_secs_f64() < args.max_seconds,
                "no convergence within {} s (step {})",
                args.max_seconds,
                opt.local_step()
            );
            let batch: Vec<usize> = (0..args.batch_size)
                .map(|_| indices[rng.below(indices.len())])
                .collect();
            let (x, y) = digits.batch(&batch);
            let last_loss = mlp.loss_and_grad(opt.params(), &x, &y, &mut grads);
            if args.compute_ms > 0.0 {
                tokio::time::sleep(Duration::from_secs_f64(args.compute_ms / 1000.0)).await;
            }
            opt.grads_mut().copy_from_slice(&grads);
            let outcome = match opt.step(Some(args.batch_size)).await {
                Ok(o) => o,
                Err(OptimError::NonFiniteGradients { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            if !matches!(outcome, StepOutcome::OutOfSync) {
                samples += args.batch_size;
            }
            let stepped = match outcome {
                // With delayed updates, `Stepped` comes when an update lands.
                StepOutcome::Stepped { group_size, .. } => {
                    if group_size > 1 {
                        averaged_steps += 1;
                    }
                    if args.target_group_size.is_some_and(|t| group_size >= t) {
                        full_group_steps += 1;
                    }
                    true
                }
                StepOutcome::LoadedState { .. } => {
                    state_loads += 1;
                    true
                }
                StepOutcome::Accumulated
                | StepOutcome::OutOfSync
                | StepOutcome::Isolated
                | StepOutcome::Scheduled { .. } => false,
            };
            if stepped || last_report.elapsed() > Duration::from_millis(250) {
                last_report = Instant::now();
                let state = opt.collaboration_state();
                emit(
                    args.json,
                    &Event::Progress {
                        step: opt.local_step(),
                        global_step: state.optimizer_step.max(opt.local_step()),
                        samples: state.samples_accumulated.max(opt.local_samples()),
                        target: state.target_batch_size,
                        peers: state.num_peers,
                        loss: last_loss,
                    },
                );
            }
            if stepped {
                // With local updates the working parameters hold this
                // peer's inner steps since the global step; the swarm's
                // model is the global step's.
                let accuracy = mlp.accuracy(opt.global_params(), &digits.test_x, &digits.test_y);
                if accuracy >= args.target_accuracy || opt.local_step() >= args.max_steps {
                    // Nothing is in flight right after an update landed (a
                    // delayed one is only scheduled by a later step).
                    opt.settle().await?;
                    let (paths, rounds) = opt
                        .averager_mut()
                        .map(|a| (a.path_counts(), a.round_stats().clone()))
                        .unwrap_or_default();
                    let nat = dht.stats().await.unwrap_or_default();
                    emit(
                        args.json,
                        &Event::Done {
                            step: opt.local_step(),
                            accuracy,
                            hash: params_hash(opt.global_params()),
                            wall_s: start.elapsed().as_secs_f64(),
                            averaged_steps,
                            full_group_steps,
                            state_loads,
                            samples,
                            direct_connections: paths.direct,
                            libp2p_connections: paths.libp2p,
                            allreduce_s_median: median(&rounds.allreduce_s),
                            span_fraction: mean(&rounds.span_fraction),
                            averaged_elements: rounds.elements as u64,
                            peer_paths: dht
                                .paths()
                                .await
                                .unwrap_or_default()
                                .into_iter()
                                .map(|(p, path)| (p.to_string(), path.as_str().to_owned()))
                                .collect(),
                            hole_punches: nat.hole_punches_succeeded,
                            hole_punch_failures: nat.hole_punches_failed,
                        },
                    );
                    break;
                }
            }
        }
        anyhow::Ok(())
    };
    // Ctrl-C / SIGTERM: stop training and say goodbye so peers stop counting this one.
    let result = tokio::select! {
        r = training => r,
        r = crate::dht_cmd::wait_for_signal() => {
            tracing::info!("interrupted; leaving the run");
            r
        }
        // Two hosts run with one identity file: peers cannot tell them
        // apart, so the later one leaves, saying nothing under the identity
        // (a goodbye would make peers drop the other node's progress).
        c = crate::dht_cmd::duplicate_identity(&dht) => {
            opt.leave_without_goodbye().await;
            return Err(anyhow::anyhow!("{c}; this node started later, so it leaves the run"));
        }
    };
    opt.shutdown().await?;
    result
}
