//! Multi-process butterfly all-reduce benchmark on 127.0.0.1.
//!
//! `cargo run --release -p colony-benches --bin allreduce -- --peers 4 --floats 100000000 --rounds 5 [--compression fp16] [--json]`
//!
//! The parent spawns `--peers` worker processes and coordinates them over a small
//! JSON-lines control channel (standing in for the libp2p control plane: it hands
//! out per-round group ids and X25519 public keys). In the same run it measures
//! this machine's limit for the round's traffic: every worker streams the same
//! number of bytes to every other worker at once, over TCP with the same
//! AEAD framing, and the aggregate rate A gives the lower bound
//! `bytes all peers send in a round / A`.
//!
//! With `--compare-paths` every worker also runs a DHT node, and each timed
//! round runs twice, alternating: once over the direct TCP data plane (the
//! baseline) and once with no data addresses, so every connection is a
//! libp2p data stream on the DHT connections; both throughputs print side
//! by side.

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use colony_averaging::{
    AllreduceConfig, AssembledGroup, AveragingMode, Compression, DataPath, GroupMember,
    TensorLayout,
    round::{
        DataPlane, FrameBuf, FrameCipher, Kind, RoundKeyPair, balance_spans, read_frame,
        read_frame_unopened, run_allreduce,
    },
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream, tcp::OwnedWriteHalf},
};

#[derive(Parser, Debug, Clone)]
#[command(about = "Multi-process butterfly all-reduce benchmark")]
struct Args {
    /// Number of peer processes.
    #[arg(long, default_value_t = 4)]
    peers: usize,
    /// Floats per peer.
    #[arg(long, default_value_t = 100_000_000)]
    floats: usize,
    /// Timed rounds.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Wire compression: none, fp16, bf16, 8bit.
    #[arg(long, default_value = "none")]
    compression: String,
    /// Part size in bytes on the wire.
    #[arg(long, default_value_t = 4 << 20)]
    part_size: usize,
    /// Print one JSON object instead of lines.
    #[arg(long)]
    json: bool,
    /// Bandwidths (bytes/s) the peers declare to the load balancer, one per
    /// peer, comma-separated; without it every peer reduces an equal span.
    #[arg(long, value_delimiter = ',')]
    bandwidths: Vec<f64>,
    /// The peers' real link rates (bytes/s, each direction), one per peer,
    /// to print the round's link bound for the balancer's split (the
    /// uniform-traffic bound does not apply to unequal links).
    #[arg(long, value_delimiter = ',')]
    link_rates: Vec<f64>,
    /// Network namespaces to run the peers in, one per peer (spawned with
    /// `ip netns exec`); see `scripts/netns-allreduce.sh`.
    #[arg(long, value_delimiter = ',')]
    netns: Vec<String>,
    /// Addresses the peers listen on, one per peer (default 127.0.0.1).
    #[arg(long, value_delimiter = ',')]
    ips: Vec<std::net::IpAddr>,
    /// Address the coordinator listens on (must be reachable from the peers).
    #[arg(long, default_value = "127.0.0.1")]
    coord_ip: std::net::IpAddr,
    /// Internal: the address this worker listens on.
    #[arg(long, hide = true, default_value = "127.0.0.1")]
    bind_ip: std::net::IpAddr,
    /// Also run every round over libp2p data streams (each worker runs a
    /// DHT node) and print both paths' throughput.
    #[arg(long)]
    compare_paths: bool,
    /// Internal: DHT addresses to bootstrap from (with `--compare-paths`).
    #[arg(long, hide = true, value_delimiter = ',')]
    bootstrap: Vec<String>,
    /// Internal: run as worker with this index.
    #[arg(long, hide = true)]
    worker: Option<usize>,
    /// Internal: coordinator address.
    #[arg(long, hide = true)]
    coord: Option<SocketAddr>,
}

#[derive(Debug, Serialize, Deserialize)]
enum Msg {
    Hello {
        index: usize,
        data_addr: SocketAddr,
        stream_addr: SocketAddr,
        /// The DHT node's peer id and listen addresses (`--compare-paths`).
        #[serde(default)]
        peer_id: Vec<u8>,
        #[serde(default)]
        dht_addrs: Vec<String>,
    },
    StreamTest {
        peers: Vec<SocketAddr>,
        bytes_per_target: u64,
        sealed: bool,
    },
    StreamDone {
        seconds: f64,
        cpu: f64,
    },
    NewRound,
    RoundKey {
        key: [u8; 32],
    },
    Group {
        group: AssembledGroup,
    },
    RoundDone {
        seconds: f64,
        cpu: f64,
        minor_faults: u64,
        bytes_sent: u64,
        failed: usize,
        /// Connections of the round over libp2p data streams.
        #[serde(default)]
        libp2p: usize,
    },
    Verify,
    Verified {
        max_abs_err: f64,
        peak_rss_bytes: u64,
    },
}

struct Line {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: OwnedWriteHalf,
    buf: String,
}

impl Line {
    fn new(s: TcpStream) -> Self {
        let (r, w) = s.into_split();
        Self {
            reader: BufReader::new(r),
            writer: w,
            buf: String::new(),
        }
    }
    async fn send(&mut self, m: &Msg) -> Result<()> {
        let mut s = serde_json::to_string(m)?;
        s.push('\n');
        self.writer.write_all(s.as_bytes()).await?;
        Ok(())
    }
    async fn recv(&mut self) -> Result<Msg> {
        self.buf.clear();
        let n = tokio::time::timeout(
            Duration::from_secs(600),
            self.reader.read_line(&mut self.buf),
        )
        .await
        .context("control channel timed out")??;
        if n == 0 {
            bail!("control channel closed");
        }
        Ok(serde_json::from_str(&self.buf)?)
    }
}

fn value(peer: usize, j: usize) -> f32 {
    ((j % 1021) as f32) * 0.001 * (peer as f32 + 1.0) + peer as f32
}

fn weight(peer: usize) -> f32 {
    peer as f32 + 1.0
}

fn fill(buf: &mut [f32], peer: usize) {
    for (j, v) in buf.iter_mut().enumerate() {
        *v = value(peer, j);
    }
}

/// CPU seconds (user + system) this process has used.
/// Fields of `/proc/self/stat` after the command name.
fn proc_stat() -> Vec<String> {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| Some(s.rsplit_once(')')?.1.to_string()))
        .map(|rest| rest.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

fn cpu_seconds() -> f64 {
    let f = proc_stat();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    match (field(11), field(12)) {
        (Some(ut), Some(st)) => (ut + st) / 100.0,
        _ => 0.0,
    }
}

/// Minor page faults of this process so far (fresh pages touched).
fn minor_faults() -> u64 {
    proc_stat().get(7).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb * 1024)
}

fn config(args: &Args, compression: Compression) -> AllreduceConfig {
    AllreduceConfig {
        part_size_bytes: args.part_size,
        compression,
        sender_timeout: Duration::from_secs(20),
        reducer_timeout: Duration::from_secs(40),
        allreduce_timeout: Duration::from_secs(300),
        ..AllreduceConfig::default()
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match args.worker {
        Some(i) => rt.block_on(worker(args.clone(), i)),
        None => rt.block_on(parent(args)),
    }
}

async fn worker(args: Args, index: usize) -> Result<()> {
    let compression = Compression::parse(&args.compression).context("unknown compression")?;
    let coord = args.coord.context("--coord missing")?;
    let mut ctl = Line::new(TcpStream::connect(coord).await?);
    let plane = DataPlane::bind(SocketAddr::new(args.bind_ip, 0), Duration::from_secs(10)).await?;
    let data_addr = plane.local_addr().context("no data address")?;
    let (plane, dht) = if args.compare_paths {
        let dht = colony_dht::Dht::new(colony_dht::DhtConfig {
            listen_addrs: vec![format!("/ip4/{}/tcp/0", args.bind_ip).parse()?],
            initial_peers: args
                .bootstrap
                .iter()
                .map(|a| a.parse())
                .collect::<Result<_, _>>()?,
            ..colony_dht::DhtConfig::default()
        })
        .await?;
        let protocol = colony_dht::StreamProtocol::new("/colony/averaging/bench/data/1");
        (plane.with_libp2p(&dht, protocol)?, Some(dht))
    } else {
        (plane, None)
    };
    let stream_listener = TcpListener::bind(SocketAddr::new(args.bind_ip, 0)).await?;
    let stream_addr = stream_listener.local_addr()?;
    ctl.send(&Msg::Hello {
        index,
        data_addr,
        stream_addr,
        peer_id: dht
            .as_ref()
            .map(|d| d.peer_id().to_bytes())
            .unwrap_or_default(),
        dht_addrs: dht
            .as_ref()
            .map(|d| d.listen_addrs().iter().map(|a| a.to_string()).collect())
            .unwrap_or_default(),
    })
    .await?;
    let cfg = config(&args, compression);
    let layout = TensorLayout::new(&[args.floats]);
    let mut tensors = vec![vec![0.0f32; args.floats]];
    loop {
        match ctl.recv().await? {
            Msg::StreamTest {
                peers,
                bytes_per_target,
                sealed,
            } => {
                let c0 = cpu_seconds();
                let t = stream_test(
                    index,
                    &stream_listener,
                    &peers,
                    bytes_per_target,
                    &cfg,
                    compression,
                    sealed,
                )
                .await?;
                ctl.send(&Msg::StreamDone {
                    seconds: t,
                    cpu: cpu_seconds() - c0,
                })
                .await?;
            }
            Msg::NewRound => {
                fill(&mut tensors[0], index);
                let keys = RoundKeyPair::generate()?;
                ctl.send(&Msg::RoundKey { key: keys.public() }).await?;
                let Msg::Group { group } = ctl.recv().await? else {
                    bail!("expected group")
                };
                let start = Instant::now();
                let c0 = cpu_seconds();
                let f0 = minor_faults();
                let out = run_allreduce(
                    &plane,
                    &group,
                    index,
                    &keys,
                    &layout,
                    &tensors,
                    weight(index),
                    &cfg,
                )
                .await?;
                out.apply(&layout, &mut tensors, 1.0)?;
                let seconds = start.elapsed().as_secs_f64();
                let cpu = cpu_seconds() - c0;
                ctl.send(&Msg::RoundDone {
                    seconds,
                    cpu,
                    minor_faults: minor_faults() - f0,
                    bytes_sent: out.bytes_sent,
                    failed: out.failed_reducers.len() + out.banned_senders.len(),
                    libp2p: out.libp2p_connections(),
                })
                .await?;
            }
            Msg::Verify => {
                let n = args.peers;
                let wsum: f64 = (0..n).map(|p| f64::from(weight(p))).sum();
                let mut err = 0.0f64;
                for (j, v) in tensors[0].iter().enumerate() {
                    let exp: f64 = (0..n)
                        .map(|p| f64::from(weight(p)) * f64::from(value(p, j)))
                        .sum::<f64>()
                        / wsum;
                    err = err.max((f64::from(*v) - exp).abs());
                }
                ctl.send(&Msg::Verified {
                    max_abs_err: err,
                    peak_rss_bytes: peak_rss(),
                })
                .await?;
                return Ok(());
            }
            other => bail!("unexpected message {other:?}"),
        }
    }
}

/// Every worker streams `bytes_per_target` to every other worker at once, in
/// frames of the all-reduce's size (sealed with the data plane's AEAD, or, with `sealed`
/// false, the same framing and copies without the AEAD); returns seconds until
/// this worker has sent and received everything.
async fn stream_test(
    index: usize,
    listener: &TcpListener,
    peers: &[SocketAddr],
    bytes_per_target: u64,
    cfg: &AllreduceConfig,
    compression: Compression,
    sealed: bool,
) -> Result<f64> {
    let frame_payload = compression.encoded_len(cfg.part_len());
    let others: Vec<usize> = (0..peers.len()).filter(|&p| p != index).collect();
    let start = Instant::now();
    let key = [7u8; 16];
    let send = futures::future::try_join_all(others.iter().map(|&p| {
        let addr = peers[p];
        async move {
            let mut s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            let mut cipher = FrameCipher::new(&key)?;
            let src = vec![1u8; frame_payload];
            // The data plane's own frame builder: the same header, length
            // and tag on the wire as a round's parts.
            let mut frame = FrameBuf::new(Box::new(Vec::with_capacity(frame_payload + 64)));
            let mut left = bytes_per_target;
            let mut index = 0u32;
            while left > 0 {
                let n = (left as usize).min(frame_payload);
                frame.start(Kind::Part, index, n).copy_from_slice(&src[..n]);
                let bytes = if sealed {
                    frame.seal(&mut cipher)?
                } else {
                    frame.unsealed()
                };
                s.write_all(bytes).await?;
                left -= n as u64;
                index = index.wrapping_add(1);
            }
            anyhow::Ok(())
        }
    }));
    let max_body = cfg.max_frame_len();
    let idle = Duration::from_secs(60);
    let recv = futures::future::try_join_all(others.iter().map(|_| async {
        let (mut s, _) = listener.accept().await?;
        let mut cipher = FrameCipher::new(&key)?;
        let mut buf = Vec::new();
        let mut got = 0u64;
        while got < bytes_per_target {
            // The data plane's own frame reader (opening with the AEAD, or
            // the same framing and copies without it).
            got += if sealed {
                let (_, _, payload) =
                    read_frame(&mut s, &mut cipher, &mut buf, max_body, idle).await?;
                payload.len() as u64
            } else {
                read_frame_unopened(&mut s, &mut buf, max_body, idle)
                    .await?
                    .payload_len() as u64
            };
        }
        anyhow::Ok(())
    }));
    tokio::try_join!(send, recv)?;
    Ok(start.elapsed().as_secs_f64())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

async fn parent(args: Args) -> Result<()> {
    let compression = Compression::parse(&args.compression).context("unknown compression")?;
    let n = args.peers;
    if n < 2 {
        bail!("need at least 2 peers");
    }
    for (what, len) in [
        ("--bandwidths", args.bandwidths.len()),
        ("--link-rates", args.link_rates.len()),
        ("--netns", args.netns.len()),
        ("--ips", args.ips.len()),
    ] {
        if len != 0 && len != n {
            bail!("{what} needs one value per peer ({n}), got {len}");
        }
    }
    if args
        .bandwidths
        .iter()
        .chain(&args.link_rates)
        .any(|b| !b.is_finite() || *b <= 0.0)
    {
        bail!("--bandwidths and --link-rates must be positive");
    }
    let listener = TcpListener::bind(SocketAddr::new(args.coord_ip, 0)).await?;
    let coord = listener.local_addr()?;
    let exe = std::env::current_exe()?;
    let spawn = |i: usize, bootstrap: &[String]| {
        let mut cmd = match args.netns.get(i) {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&exe);
                c
            }
            None => tokio::process::Command::new(&exe),
        };
        let bind_ip = args
            .ips
            .get(i)
            .copied()
            .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
        cmd.args(["--worker", &i.to_string(), "--coord", &coord.to_string()])
            .args(["--bind-ip", &bind_ip.to_string()])
            .args([
                "--peers",
                &n.to_string(),
                "--floats",
                &args.floats.to_string(),
            ])
            .args([
                "--compression",
                &args.compression,
                "--part-size",
                &args.part_size.to_string(),
            ]);
        if args.compare_paths {
            cmd.arg("--compare-paths");
        }
        if !bootstrap.is_empty() {
            cmd.args(["--bootstrap", &bootstrap.join(",")]);
        }
        cmd.stdin(Stdio::null()).kill_on_drop(true).spawn()
    };
    let hello = |l: Line| async move {
        let mut l = l;
        let Msg::Hello {
            index,
            data_addr,
            stream_addr,
            peer_id,
            dht_addrs,
        } = l.recv().await?
        else {
            bail!("expected hello")
        };
        Ok((index, (l, data_addr, stream_addr, peer_id), dht_addrs))
    };
    let accept = || async {
        let (s, _) = tokio::time::timeout(Duration::from_secs(60), listener.accept()).await??;
        hello(Line::new(s)).await
    };
    let mut ctls: Vec<Option<Ctl>> = (0..n).map(|_| None).collect();
    let mut children = Vec::new();
    // With a DHT per worker, worker 0 starts first and the others bootstrap
    // from it.
    let mut bootstrap = Vec::new();
    let mut started = 0;
    if args.compare_paths {
        children.push(spawn(0, &[])?);
        let (index, ctl, addrs) = accept().await?;
        ctls[index] = Some(ctl);
        bootstrap = addrs;
        started = 1;
    }
    for i in started..n {
        children.push(spawn(i, &bootstrap)?);
    }
    for _ in started..n {
        let (index, ctl, _) = accept().await?;
        ctls[index] = Some(ctl);
    }
    let mut ctls: Vec<(Line, SocketAddr, SocketAddr, Vec<u8>)> = ctls
        .into_iter()
        .map(|c| c.context("worker missing"))
        .collect::<Result<_>>()?;

    // Bytes one peer sends per round: its parts to the other reducers plus the
    // averages of its own span back to the other senders: 2 (N-1)/N of the buffer.
    let per_peer_payload = compression.encoded_len(args.floats) as u64;
    let bytes_per_target = per_peer_payload * 2 / n as u64;

    // Physical limit: all-to-all sealed streaming, same bytes as a round. The
    // same traffic unsealed (plain TCP) is measured too, for reference: it is
    // what an unencrypted transport could reach on this machine.
    let stream_addrs: Vec<SocketAddr> = ctls.iter().map(|c| c.2).collect();
    let total_stream_bytes = bytes_per_target * (n as u64) * (n as u64 - 1);
    let mut limits = [(0.0f64, 0.0f64); 2];
    for (sealed, limit) in [true, false].into_iter().zip(limits.iter_mut()) {
        let mut best_seconds = f64::INFINITY;
        let mut best_cpu = f64::INFINITY;
        for _ in 0..2 {
            let start = Instant::now();
            for c in ctls.iter_mut() {
                c.0.send(&Msg::StreamTest {
                    peers: stream_addrs.clone(),
                    bytes_per_target,
                    sealed,
                })
                .await?;
            }
            let mut cpu_sum = 0.0;
            for c in ctls.iter_mut() {
                let Msg::StreamDone { cpu, .. } = c.0.recv().await? else {
                    bail!("expected stream done")
                };
                cpu_sum += cpu;
            }
            best_cpu = best_cpu.min(cpu_sum);
            best_seconds = best_seconds.min(start.elapsed().as_secs_f64());
        }
        *limit = (total_stream_bytes as f64 / best_seconds, best_cpu);
    }
    let [(aggregate, stream_cpu), (aggregate_plain, plain_cpu)] = limits;

    let mut round_secs = Vec::new();
    let mut round_cpu = Vec::new();
    let mut round_faults = Vec::new();
    let mut libp2p_secs = Vec::new();
    let mut bytes_sent = 0u64;
    let mut failures = 0usize;
    // With --compare-paths each round runs on both paths, the order
    // alternating so neither always runs on a warmer machine.
    let paths: &[DataPath] = if args.compare_paths {
        &[DataPath::Direct, DataPath::Libp2p]
    } else {
        &[DataPath::Direct]
    };
    for r in 0..args.rounds {
        for k in 0..paths.len() {
            let path = paths[(k + r) % paths.len()];
            let (worst, cpu_sum, faults_sum, b, failed) = round(&mut ctls, &args, path).await?;
            failures += failed;
            match path {
                DataPath::Direct => {
                    round_secs.push(worst);
                    round_cpu.push(cpu_sum);
                    round_faults.push(faults_sum);
                    bytes_sent = bytes_sent.max(b);
                }
                DataPath::Libp2p => libp2p_secs.push(worst),
            }
        }
    }
    // The balancer's split, as every peer computes it from the declared bandwidths.
    let declared: Vec<Option<f64>> = (0..n).map(|i| args.bandwidths.get(i).copied()).collect();
    let span_sizes = balance_spans(
        args.floats,
        &declared,
        config(&args, compression).min_vector_size,
    )?;
    // With real link rates: the slowest peer's time to move its bytes through
    // its own link. Each peer sends its parts of the other spans and the
    // averages of its own span to every other peer, and receives as much (all
    // peers here are senders), so one figure serves both directions.
    let link_bound = (!args.link_rates.is_empty()).then(|| {
        let per_elem = compression.encoded_len(args.floats) as f64 / args.floats as f64;
        let total = args.floats as f64;
        span_sizes
            .iter()
            .zip(&args.link_rates)
            .map(|(&own, rate)| {
                let own = own as f64;
                per_elem * ((total - own) + own * (n as f64 - 1.0)) / rate
            })
            .fold(0.0, f64::max)
    });
    let cpu_per_round = median(&mut round_cpu.clone());
    let mut max_err = 0.0f64;
    let mut peak = 0u64;
    for c in ctls.iter_mut() {
        c.0.send(&Msg::Verify).await?;
        let Msg::Verified {
            max_abs_err,
            peak_rss_bytes,
        } = c.0.recv().await?
        else {
            bail!("expected verified")
        };
        max_err = max_err.max(max_abs_err);
        peak = peak.max(peak_rss_bytes);
    }
    for mut c in children {
        let _ = tokio::time::timeout(Duration::from_secs(30), c.wait()).await;
    }
    let all_rounds = round_secs.clone();
    let spr = median(&mut round_secs);
    let size_bytes = 4.0 * args.floats as f64;
    let bus = size_bytes / spr * 2.0 * (n as f64 - 1.0) / n as f64;
    let all_libp2p = libp2p_secs.clone();
    let libp2p_spr = (!libp2p_secs.is_empty()).then(|| median(&mut libp2p_secs));
    let libp2p_bus = libp2p_spr.map(|t| size_bytes / t * 2.0 * (n as f64 - 1.0) / n as f64);
    // Bytes all peers send in a round (payload plus framing, as measured).
    let round_bytes = (bytes_sent * n as u64) as f64;
    let lower_bound = round_bytes / aggregate;
    let lower_bound_plain = round_bytes / aggregate_plain;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "peers": n,
                "floats": args.floats,
                "compression": compression.name(),
                "max_abs_err": max_err,
                "seconds_per_round": spr,
                "round_seconds": all_rounds,
                "bytes_sent_per_peer": bytes_sent,
                "bus_bandwidth_bytes_per_s": bus,
                "aggregate_stream_bytes_per_s": aggregate,
                "lower_bound_seconds": lower_bound,
                "ratio_to_lower_bound": spr / lower_bound,
                "peak_rss_bytes": peak,
                "buffer_bytes": size_bytes,
                "excluded_peers": failures,
                "cpu_seconds_per_round_all_peers": cpu_per_round,
                "minor_faults_per_round_all_peers": round_faults,
                "declared_bandwidths_bytes_per_s": args.bandwidths,
                "span_sizes": span_sizes,
                "link_rates_bytes_per_s": args.link_rates,
                "link_bound_seconds": link_bound,
                "cpu_seconds_stream_test_all_peers": stream_cpu,
                "aggregate_plain_tcp_bytes_per_s": aggregate_plain,
                "lower_bound_plain_tcp_seconds": lower_bound_plain,
                "cpu_seconds_plain_tcp_test_all_peers": plain_cpu,
                "machine_cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
                "libp2p_seconds_per_round": libp2p_spr,
                "libp2p_round_seconds": all_libp2p,
                "libp2p_bus_bandwidth_bytes_per_s": libp2p_bus,
            })
        );
    } else {
        println!("peers                         {n}");
        println!("floats per peer               {}", args.floats);
        println!("compression                   {}", compression.name());
        println!("max_abs_err                   {max_err:.3e}");
        println!("seconds_per_round (median)    {spr:.3}  (all: {all_rounds:.3?})");
        println!("bytes_sent_per_peer           {bytes_sent}");
        println!("bus_bandwidth                 {:.3} GB/s", bus / 1e9);
        if let (Some(t), Some(b)) = (libp2p_spr, libp2p_bus) {
            println!(
                "paths (median s, bus GB/s)    direct TCP {spr:.3} s {:.3} GB/s | libp2p streams {t:.3} s {:.3} GB/s ({:.2}x the direct time; all: {all_libp2p:.3?})",
                bus / 1e9,
                b / 1e9,
                t / spr
            );
        }
        println!("aggregate_stream (limit A)    {:.3} GB/s", aggregate / 1e9);
        println!("lower_bound_seconds           {lower_bound:.3}");
        println!("ratio to lower bound          {:.2}", spr / lower_bound);
        println!(
            "plain TCP, no AEAD (reference) {:.3} GB/s, bound {lower_bound_plain:.3} s, {plain_cpu:.3} cpu-s",
            aggregate_plain / 1e9
        );
        println!(
            "peak_rss (largest peer)       {:.1} MB ({:.2}x buffer)",
            peak as f64 / 1e6,
            peak as f64 / size_bytes
        );
        println!("excluded peers                {failures}");
        if !args.bandwidths.is_empty() {
            println!("declared bandwidths (B/s)     {:?}", args.bandwidths);
        }
        println!("span sizes (elements)         {span_sizes:?}");
        if let Some(b) = link_bound {
            println!(
                "link bound (slowest link)     {b:.3} s (ratio {:.2})",
                spr / b
            );
        }
        println!(
            "cpu-s per round (all peers)   {cpu_per_round:.3}  (stream test: {stream_cpu:.3})"
        );
        println!("minor page faults per round   {round_faults:?} (all peers; 4 KiB each)");
    }
    if failures > 0 {
        bail!("{failures} peers were excluded during the benchmark");
    }
    if compression == Compression::None && max_err > 1e-5 {
        bail!("max_abs_err {max_err} exceeds 1e-5");
    }
    Ok(())
}

type Ctl = (Line, SocketAddr, SocketAddr, Vec<u8>);

/// One round on every worker over `path`; returns the slowest worker's
/// seconds, the CPU seconds and minor faults of all, the most bytes one
/// worker sent, and the peers excluded (or connections on the wrong path).
async fn round(
    ctls: &mut [Ctl],
    args: &Args,
    path: DataPath,
) -> Result<(f64, f64, u64, u64, usize)> {
    let n = ctls.len();
    let mut members = Vec::new();
    for (i, c) in ctls.iter_mut().enumerate() {
        c.0.send(&Msg::NewRound).await?;
        let Msg::RoundKey { key } = c.0.recv().await? else {
            bail!("expected key")
        };
        members.push(GroupMember {
            peer_id: if c.3.is_empty() {
                vec![i as u8]
            } else {
                c.3.clone()
            },
            // No data address: senders open libp2p data streams.
            data_addr: (path == DataPath::Direct).then_some(c.1),
            mode: AveragingMode::Node,
            bandwidth: args.bandwidths.get(i).copied(),
            round_public_key: key,
            signed: None,
        });
    }
    let group = AssembledGroup {
        group_id: rand_group_id(),
        members,
    };
    for c in ctls.iter_mut() {
        c.0.send(&Msg::Group {
            group: group.clone(),
        })
        .await?;
    }
    let (mut worst, mut cpu_sum, mut faults_sum, mut bytes, mut failures) = (0.0f64, 0.0, 0, 0, 0);
    for c in ctls.iter_mut() {
        let Msg::RoundDone {
            seconds,
            cpu,
            minor_faults,
            bytes_sent,
            failed,
            libp2p,
        } = c.0.recv().await?
        else {
            bail!("expected round done")
        };
        worst = worst.max(seconds);
        cpu_sum += cpu;
        faults_sum += minor_faults;
        bytes = bytes.max(bytes_sent);
        let want = if path == DataPath::Libp2p {
            2 * (n - 1)
        } else {
            0
        };
        failures += failed + usize::from(libp2p != want);
    }
    Ok((worst, cpu_sum, faults_sum, bytes, failures))
}

fn rand_group_id() -> [u8; 32] {
    let mut id = [0u8; 32];
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    id[..16].copy_from_slice(&t.to_le_bytes());
    id[16..24].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
    id
}
