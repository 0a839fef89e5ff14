//! `colony dht serve|store|get`: run a DHT node, or poke at a swarm.

use std::{collections::BTreeMap, io::Write, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use colony_dht::{Dht, DhtConfig, DhtValue, IdentitySource, Multiaddr, dht_time};

/// DHT commands.
#[derive(Debug, Subcommand)]
pub(crate) enum DhtCommand {
    /// Run a DHT node (a bootstrap node, or a relay for client-mode peers)
    /// until Ctrl-C / SIGTERM. Prints `listening on <multiaddr>` per address.
    Serve(ServeArgs),
    /// Store a value (debugging): VALUE is parsed as JSON (`42`, `"text"`,
    /// `{"a": 1}`); anything that is not JSON is stored as a string.
    Store(StoreArgs),
    /// Get a value (debugging); exits non-zero if the key is not found.
    Get(GetArgs),
}

/// Options of `colony dht serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// An external address other peers should dial, e.g. the public IP of a
    /// port forward: /ip4/203.0.113.5/tcp/31337 (repeatable). It replaces the
    /// listen addresses in what this node advertises; the data plane is
    /// announced at its IP too. Default: the listen addresses.
    #[arg(long = "announce", env = "COLONY_ANNOUNCE", value_delimiter = ',')]
    announce: Vec<Multiaddr>,
    /// Address to listen on (repeatable). Default: /ip4/127.0.0.1/tcp/0.
    #[arg(long = "listen", env = "COLONY_LISTEN", value_delimiter = ',')]
    listen: Vec<Multiaddr>,
    /// Peer to bootstrap from, with /p2p/<peer id> (repeatable).
    #[arg(
        long = "initial-peers",
        env = "COLONY_INITIAL_PEERS",
        value_delimiter = ','
    )]
    initial_peers: Vec<Multiaddr>,
    /// Identity file: loaded if it exists, created otherwise (keeps the peer id).
    #[arg(long, env = "COLONY_IDENTITY")]
    identity: Option<PathBuf>,
    /// A closed run's bootstrap or relay: a file of the peer ids allowed to
    /// connect, one per line (`#` starts a comment). Default: open.
    #[arg(long, env = "COLONY_ALLOW_PEERS")]
    allow_peers: Option<PathBuf>,
    /// Client mode: listen nowhere, never serve the DHT.
    #[arg(long, env = "COLONY_CLIENT")]
    client: bool,
    /// Do not act as a circuit relay for peers behind NAT (a serving node
    /// relays by default: it is what lets NATed peers reach each other).
    #[arg(long, env = "COLONY_NO_RELAY", conflicts_with = "client")]
    no_relay: bool,
    /// Bytes one relayed circuit may carry, in MiB (averaging traffic of
    /// peers whose hole punch failed goes through it).
    #[arg(long, default_value_t = 4096, env = "COLONY_RELAY_CIRCUIT_MIB")]
    relay_circuit_mib: u64,
    /// Lifetime of one relayed circuit, seconds.
    #[arg(long, default_value_t = 3600, env = "COLONY_RELAY_CIRCUIT_SECS")]
    relay_circuit_secs: u64,
    /// Relayed circuits open at once.
    #[arg(long, default_value_t = 64, env = "COLONY_RELAY_MAX_CIRCUITS")]
    relay_max_circuits: usize,
}

/// Options of `colony dht store`.
#[derive(Debug, Args)]
pub(crate) struct StoreArgs {
    /// Peer to bootstrap from, with /p2p/<peer id> (repeatable).
    #[arg(
        long = "initial-peers",
        required = true,
        env = "COLONY_INITIAL_PEERS",
        value_delimiter = ','
    )]
    initial_peers: Vec<Multiaddr>,
    /// Identity file of this short-lived node (loaded, or created with mode 0600).
    #[arg(long, env = "COLONY_IDENTITY")]
    identity: Option<PathBuf>,
    /// The key (UTF-8).
    key: String,
    /// The value (JSON, or a plain string).
    value: String,
    /// Store under this subkey of a dictionary (UTF-8).
    #[arg(long, env = "COLONY_SUBKEY")]
    subkey: Option<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 600.0, env = "COLONY_TTL")]
    ttl: f64,
}

/// Options of `colony dht get`.
#[derive(Debug, Args)]
pub(crate) struct GetArgs {
    /// Peer to bootstrap from, with /p2p/<peer id> (repeatable).
    #[arg(
        long = "initial-peers",
        required = true,
        env = "COLONY_INITIAL_PEERS",
        value_delimiter = ','
    )]
    initial_peers: Vec<Multiaddr>,
    /// Identity file of this short-lived node (loaded, or created with mode 0600).
    #[arg(long, env = "COLONY_IDENTITY")]
    identity: Option<PathBuf>,
    /// The key (UTF-8).
    key: String,
    /// Ask every replica and merge (instead of the first answer).
    #[arg(long, env = "COLONY_LATEST")]
    latest: bool,
    /// Print the value(s) and expirations as JSON.
    #[arg(long, env = "COLONY_JSON")]
    json: bool,
}

/// Runs a `colony dht` command on a fresh tokio runtime.
pub(crate) fn run(command: DhtCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        match command {
            DhtCommand::Serve(args) => serve(args).await,
            DhtCommand::Store(args) => store(args).await,
            DhtCommand::Get(args) => get(args).await,
        }
    })
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = if args.client {
        DhtConfig::client(args.initial_peers)
    } else {
        DhtConfig {
            initial_peers: args.initial_peers,
            ..DhtConfig::default()
        }
    };
    if !args.listen.is_empty() {
        config.listen_addrs = args.listen;
    }
    if let Some(path) = args.identity {
        config.identity = IdentitySource::File(path);
    }
    if let Some(path) = &args.allow_peers {
        config.allowed_peers = Some(crate::identity_cmd::read_allow_list(path)?);
    }
    config.announce_addrs = args.announce;
    if !args.client && !args.no_relay {
        anyhow::ensure!(
            args.relay_circuit_mib > 0
                && args.relay_circuit_secs > 0
                && args.relay_max_circuits > 0,
            "--relay-circuit-mib, --relay-circuit-secs and --relay-max-circuits must be positive"
        );
        config.relay_server = Some(colony_dht::RelayLimits {
            max_circuits: args.relay_max_circuits,
            max_circuit_duration: Duration::from_secs(args.relay_circuit_secs),
            max_circuit_bytes: args.relay_circuit_mib.saturating_mul(1 << 20),
            ..colony_dht::RelayLimits::default()
        });
    }
    let relaying = config.relay_server.is_some();
    let dht = Dht::new(config).await.context("starting the DHT node")?;
    {
        let mut out = std::io::stdout().lock();
        for addr in dht.listen_addrs() {
            writeln!(out, "listening on {addr}")?;
        }
        for addr in dht.announce_addrs() {
            writeln!(out, "announced as {addr} (peers should dial this)")?;
        }
        if dht.is_client() {
            writeln!(out, "client mode: peer id {}", dht.peer_id())?;
        }
        if relaying {
            writeln!(out, "relaying for peers behind NAT (--no-relay to stop)")?;
        }
        out.flush()?;
    }
    let result = tokio::select! {
        r = wait_for_signal() => r,
        c = duplicate_identity(&dht) => Err(anyhow::anyhow!("{c}; this node started later, so it stops")),
    };
    tracing::info!("shutting down");
    dht.shutdown().await;
    result
}

/// Resolves once another node with this node's identity is seen and this
/// one started later (the earlier one keeps running; the DHT logs it).
pub(crate) async fn duplicate_identity(dht: &Dht) -> colony_dht::IdentityConflict {
    let conflict = dht.identity_conflict_seen().await;
    if conflict.this_is_newer {
        return conflict;
    }
    std::future::pending().await
}

/// Ctrl-C or SIGTERM.
#[cfg(unix)]
pub(crate) async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

#[cfg(not(unix))]
pub(crate) async fn wait_for_signal() -> anyhow::Result<()> {
    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")
}

async fn client(initial_peers: Vec<Multiaddr>, identity: Option<PathBuf>) -> anyhow::Result<Dht> {
    let mut config = DhtConfig {
        query_timeout: Duration::from_secs(10),
        ..DhtConfig::client(initial_peers)
    };
    if let Some(path) = identity {
        config.identity = IdentitySource::File(path);
    }
    Dht::new(config).await.context("joining the swarm")
}

async fn store(args: StoreArgs) -> anyhow::Result<()> {
    if !(args.ttl.is_finite() && args.ttl > 0.0) {
        bail!("--ttl must be a positive number of seconds");
    }
    let json: serde_json::Value =
        serde_json::from_str(&args.value).unwrap_or(serde_json::Value::String(args.value.clone()));
    let value = rmp_serde::to_vec_named(&json).context("encoding the value as MessagePack")?;
    let dht = client(args.initial_peers, args.identity).await?;
    let expiration = dht_time() + args.ttl;
    let outcome = dht
        .store(
            args.key.as_bytes(),
            args.subkey.as_deref().map(str::as_bytes),
            value,
            expiration,
        )
        .await;
    dht.shutdown().await;
    let outcome = outcome.context("store failed")?;
    if !outcome.is_stored() {
        bail!(
            "key {:?} not stored (accepted: {}, replicas: {})",
            args.key,
            outcome.accepted,
            outcome.replicas
        );
    }
    println!(
        "stored {:?} on {} replicas, expires at {expiration:.3}",
        args.key, outcome.replicas
    );
    Ok(())
}

/// MessagePack bytes as JSON: binary becomes a hex string, undecodable bytes
/// become `{"raw_hex": ...}`.
fn to_json(bytes: &[u8]) -> serde_json::Value {
    match rmpv::decode::read_value(&mut &bytes[..]) {
        Ok(v) => rmpv_to_json(&v),
        Err(_) => serde_json::json!({ "raw_hex": hex::encode(bytes) }),
    }
}

fn rmpv_to_json(v: &rmpv::Value) -> serde_json::Value {
    use rmpv::Value as M;
    use serde_json::Value as J;
    match v {
        M::Nil => J::Null,
        M::Boolean(b) => J::Bool(*b),
        M::Integer(i) => i
            .as_i64()
            .map(J::from)
            .or_else(|| i.as_u64().map(J::from))
            .unwrap_or(J::Null),
        M::F32(f) => serde_json::Number::from_f64(f64::from(*f)).map_or(J::Null, J::Number),
        M::F64(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        M::String(s) => J::String(
            s.as_str()
                .map_or_else(|| hex::encode(s.as_bytes()), str::to_owned),
        ),
        M::Binary(b) => J::String(hex::encode(b)),
        M::Array(a) => J::Array(a.iter().map(rmpv_to_json).collect()),
        M::Map(m) => J::Object(
            m.iter()
                .map(|(k, v)| {
                    let key = match k {
                        M::String(s) => s
                            .as_str()
                            .map_or_else(|| hex::encode(s.as_bytes()), str::to_owned),
                        other => other.to_string(),
                    };
                    (key, rmpv_to_json(v))
                })
                .collect(),
        ),
        M::Ext(tag, data) => serde_json::json!({ "ext": tag, "hex": hex::encode(data) }),
    }
}

async fn get(args: GetArgs) -> anyhow::Result<()> {
    let dht = client(args.initial_peers, args.identity).await?;
    let found = dht.get(args.key.as_bytes(), args.latest).await;
    dht.shutdown().await;
    let Some(found) = found.context("get failed")? else {
        bail!("key {:?} not found", args.key);
    };
    let now = dht_time();
    if args.json {
        let out = match &found {
            DhtValue::Regular { value, expiration } => serde_json::json!({
                "key": args.key,
                "type": "regular",
                "value": to_json(value),
                "expiration": expiration,
            }),
            DhtValue::Dictionary(entries) => {
                let map: BTreeMap<String, serde_json::Value> = entries
                    .iter()
                    .map(|(k, v)| {
                        (
                            String::from_utf8_lossy(k).into_owned(),
                            serde_json::json!({ "value": to_json(&v.value), "expiration": v.expiration }),
                        )
                    })
                    .collect();
                serde_json::json!({ "key": args.key, "type": "dictionary", "entries": map })
            }
        };
        println!("{out}");
    } else {
        match &found {
            DhtValue::Regular { value, expiration } => {
                println!("{} (expires in {:.1} s)", to_json(value), expiration - now);
            }
            DhtValue::Dictionary(entries) => {
                for (k, v) in entries {
                    println!(
                        "{}: {} (expires in {:.1} s)",
                        String::from_utf8_lossy(k),
                        to_json(&v.value),
                        v.expiration - now
                    );
                }
            }
        }
    }
    Ok(())
}
