//! `colony doctor`: can the swarm reach this host, and if not, what to change.
//!
//! It starts a node where `colony train` would listen (the DHT port, and a
//! plain TCP listener on the data-plane port), joins through the initial
//! peers, asks up to three of them to dial both ports back (see
//! `colony_dht::DialBack`), and reports what they saw: the IP this host has
//! from outside, whether that is one of its own (no NAT in between), which
//! ports answered, and the concrete fix.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Context;
use clap::Args;
use colony_dht::{Dht, DhtConfig, IdentitySource, Multiaddr, Protocol};
use serde::Serialize;

/// Options of `colony doctor`.
#[derive(Debug, Args)]
pub(crate) struct DoctorArgs {
    /// Peers of the swarm to ask, with /p2p/<peer id> (repeatable).
    #[arg(
        long = "initial-peers",
        required = true,
        env = "COLONY_INITIAL_PEERS",
        value_delimiter = ','
    )]
    initial_peers: Vec<Multiaddr>,
    /// Where `colony train` will listen (repeatable). Default: every
    /// interface on a free port.
    #[arg(long = "listen", env = "COLONY_LISTEN", value_delimiter = ',')]
    listen: Vec<Multiaddr>,
    /// The external address `colony train` will announce, if any (checked
    /// against what peers see).
    #[arg(long = "announce", env = "COLONY_ANNOUNCE", value_delimiter = ',')]
    announce: Vec<Multiaddr>,
    /// Where the data plane will listen (`IP:PORT`). Default: the first
    /// listen address's IP, a free port.
    #[arg(long, env = "COLONY_DATA_LISTEN")]
    data_listen: Option<SocketAddr>,
    /// Identity file (as for `colony train`).
    #[arg(long, env = "COLONY_IDENTITY")]
    identity: Option<std::path::PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long, env = "COLONY_JSON")]
    json: bool,
}

/// What `colony doctor` found.
#[derive(Debug, Serialize)]
struct Report {
    /// This node's listen addresses.
    listen: Vec<String>,
    /// The IPs the answering peers saw this host at.
    observed_ips: Vec<String>,
    /// Whether an address translation sits in between (the observed IP is
    /// none of this host's listen IPs).
    behind_nat: bool,
    /// The DHT (libp2p) port and whether a peer could dial it.
    dht_port: u16,
    dht_reachable: bool,
    /// The data-plane port and whether a peer could dial it.
    data_port: u16,
    data_reachable: bool,
    /// Peers that answered / asked.
    answered: usize,
    asked: usize,
    /// The relay circuit this node would be reachable through (only asked
    /// for when the DHT port is unreachable).
    relay: Option<String>,
    /// What to do.
    advice: Vec<String>,
}

/// Runs `colony doctor`; fails when no peer answered.
pub(crate) fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(doctor(args))
}

fn ip_port(addr: &Multiaddr) -> (Option<IpAddr>, Option<u16>) {
    let mut ip = None;
    let mut port = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(v4) => ip = Some(IpAddr::V4(v4)),
            Protocol::Ip6(v6) => ip = Some(IpAddr::V6(v6)),
            Protocol::Tcp(t) => port = Some(t),
            _ => {}
        }
    }
    (ip, port)
}

async fn doctor(args: DoctorArgs) -> anyhow::Result<()> {
    let mut config = DhtConfig {
        initial_peers: args.initial_peers.clone(),
        announce_addrs: args.announce.clone(),
        ..DhtConfig::default()
    };
    config.listen_addrs = if args.listen.is_empty() {
        vec!["/ip4/0.0.0.0/tcp/0".parse()?]
    } else {
        args.listen.clone()
    };
    if let Some(path) = &args.identity {
        config.identity = IdentitySource::File(path.clone());
    }
    let dht = Dht::new(config).await.context("joining the swarm")?;
    let listen = dht.listen_addrs();
    let dht_port = listen
        .iter()
        .find_map(|a| ip_port(a).1)
        .context("the node listens on no TCP port")?;
    let data_bind = args.data_listen.unwrap_or_else(|| {
        let ip = config_ip(&args.listen).unwrap_or(IpAddr::from([0, 0, 0, 0]));
        SocketAddr::new(ip, 0)
    });
    let data = tokio::net::TcpListener::bind(data_bind)
        .await
        .with_context(|| format!("binding the data-plane port {data_bind}"))?;
    let data_port = data.local_addr()?.port();
    // Accept (and drop) whatever the peers' dial-backs open.
    let accept = tokio::spawn(async move { while data.accept().await.is_ok() {} });

    let peers = crate::train::dial_back_peers(&dht, &args.initial_peers);
    let ports = [dht_port, data_port];
    let answers = futures::future::join_all(peers.iter().map(|p| dht.dial_back(*p, &ports))).await;
    accept.abort();
    let dht_ok_any = answers
        .iter()
        .any(|a| a.as_ref().is_ok_and(|a| a.ports[0].reachable));
    // Unreachable: would a relay take this node (as colony train would ask)?
    let relays = if dht_ok_any || answers.iter().all(Result::is_err) {
        Vec::new()
    } else {
        dht.set_client_mode(true).await?;
        dht.wait_for_relay(Duration::from_secs(5)).await
    };
    dht.shutdown().await;

    let local_ips: Vec<IpAddr> = listen.iter().filter_map(|a| ip_port(a).0).collect();
    let mut observed: Vec<IpAddr> = Vec::new();
    let (mut dht_ok, mut data_ok, mut answered) = (false, false, 0);
    for a in &answers {
        match a {
            Ok(a) => {
                answered += 1;
                dht_ok |= a.ports[0].reachable;
                data_ok |= a.ports[1].reachable;
                if !observed.contains(&a.observed_ip) {
                    observed.push(a.observed_ip);
                }
            }
            Err(e) => tracing::warn!(error = %e, "a peer did not answer the dial-back"),
        }
    }
    anyhow::ensure!(
        answered > 0,
        "none of the {} initial peers answered a dial-back request",
        peers.len()
    );
    let behind_nat = observed.iter().any(|ip| !local_ips.contains(ip));
    let public = observed
        .first()
        .map(ToString::to_string)
        .unwrap_or_default();
    let mut advice = Vec::new();
    match (dht_ok, data_ok) {
        (true, true) => {
            advice.push(
                "this host is reachable: colony train with these ports runs as a full peer".into(),
            );
            if behind_nat && args.announce.is_empty() {
                advice.push(format!(
                    "the ports are forwarded through a NAT: pass --announce /ip4/{public}/tcp/{dht_port} \
                     and --data-listen 0.0.0.0:{data_port} so peers dial {public}"
                ));
            }
        }
        (true, false) => advice.push(format!(
            "peers reach the DHT port {dht_port} but not the data-plane port {data_port}: open (or \
             forward) TCP {data_port} and pass --data-listen <ip>:{data_port}, or run colony train \
             with --one-port (averaging data then travels over the DHT connection, slower)"
        )),
        (false, _) if behind_nat && !relays.is_empty() => advice.push(format!(
            "this host is behind NAT (peers see it as {public}); a relay accepted it, so colony \
             train takes full part over libp2p (through the relay, or directly once a hole punch \
             works); for direct connections without a relay, forward TCP {dht_port} and \
             {data_port} on the router and pass --announce /ip4/{public}/tcp/{dht_port} \
             --data-listen 0.0.0.0:{data_port}"
        )),
        (false, _) if behind_nat => advice.push(format!(
            "this host is behind NAT (peers see it as {public}) and no initial peer relays for it: \
             colony train runs as a client (it sends its parts and receives results, reduces \
             nothing); to take full part, bootstrap from a `colony dht serve` node (it relays), \
             or forward TCP {dht_port} and {data_port} on the router and pass --announce \
             /ip4/{public}/tcp/{dht_port} --data-listen 0.0.0.0:{data_port}"
        )),
        (false, _) => advice.push(format!(
            "a firewall blocks this host: open TCP {dht_port} (DHT) and {data_port} (data plane), \
             pin them with --listen /ip4/<ip>/tcp/{dht_port} --data-listen <ip>:{data_port}; until \
             then colony train runs as a client"
        )),
    }
    let report = Report {
        listen: listen.iter().map(ToString::to_string).collect(),
        observed_ips: observed.iter().map(ToString::to_string).collect(),
        behind_nat,
        dht_port,
        dht_reachable: dht_ok,
        data_port,
        data_reachable: data_ok,
        answered,
        asked: peers.len(),
        relay: relays.first().map(ToString::to_string),
        advice,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("listening on: {}", report.listen.join(", "));
        println!(
            "seen from outside as: {} ({})",
            report.observed_ips.join(", "),
            if behind_nat { "behind NAT" } else { "no NAT" }
        );
        let yes = |b: bool| if b { "reachable" } else { "NOT reachable" };
        println!("DHT port {dht_port}: {}", yes(dht_ok));
        println!("data-plane port {data_port}: {}", yes(data_ok));
        match &report.relay {
            Some(r) => println!("relay: reachable through {r}"),
            None if dht_ok => println!("relay: not needed"),
            None => println!("relay: none accepted this node (no initial peer relays?)"),
        }
        println!("answers: {answered} of {} peers asked", report.asked);
        for a in &report.advice {
            println!("-> {a}");
        }
    }
    Ok(())
}

fn config_ip(listen: &[Multiaddr]) -> Option<IpAddr> {
    listen.first().and_then(|a| ip_port(a).0)
}
