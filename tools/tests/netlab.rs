//! The real `colony` binary on several hosts: each host is a network
//! namespace with its own IP on one bridge, nothing shared but the wire (the
//! network lab; it needs root, `ip` from iproute2, and skips with a printed
//! reason without them). Every namespace, link and process is removed when a
//! test ends, also when it fails.
//!
//! Scenario a of the lab: one `colony dht serve` host and four `colony train`
//! hosts. Before the data plane followed the DHT's address, every round here
//! failed (each peer announced 127.0.0.1 and trained alone).

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_colony");

/// Hosts on one bridge; removed on drop.
struct Lab {
    tag: String,
    subnet: String,
    hosts: usize,
    children: Vec<Child>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Lab {
    /// `hosts` namespaces on a fresh bridge, or `None` (with the reason
    /// printed) where this machine cannot build them.
    fn new(hosts: usize) -> Option<Self> {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if !root {
            eprintln!("skipping the network lab: needs root (ip netns)");
            return None;
        }
        // Unique per process, so concurrent runs never share a bridge.
        let pid = std::process::id();
        let lab = Self {
            tag: format!("{}", pid % 100_000),
            subnet: format!("10.79.{}", pid % 250),
            hosts,
            children: Vec::new(),
        };
        match lab.build() {
            Ok(()) => Some(lab),
            Err(e) => {
                eprintln!("skipping the network lab: {e}");
                None
            }
        }
    }

    fn ns(&self, i: usize) -> String {
        format!("clab{}-{i}", self.tag)
    }

    fn bridge(&self) -> String {
        format!("clb{}", self.tag)
    }

    fn veth(&self, i: usize) -> (String, String) {
        (format!("clh{}{i}", self.tag), format!("cln{}{i}", self.tag))
    }

    /// Host `i`'s IP.
    fn addr(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 1)
    }

    fn build(&self) -> Result<(), String> {
        let br = self.bridge();
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["link", "set", &br, "up"])?;
        for i in 0..self.hosts {
            let ns = self.ns(i);
            let (host, inner) = self.veth(i);
            ip(&["netns", "add", &ns])?;
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &host, "master", &br, "up"])?;
            let cidr = format!("{}/24", self.addr(i));
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", &inner])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Runs `colony args…` on host `i`, its stdout lines parsed as JSON.
    fn spawn(&mut self, i: usize, args: &[&str]) -> mpsc::Receiver<String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(i), BIN])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn colony in the namespace");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        self.children.push(child);
        rx
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for i in 0..self.hosts {
            let _ = ip(&["netns", "del", &self.ns(i)]);
            let _ = ip(&["link", "del", &self.veth(i).0]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

/// The first line from `rx` that `pick` accepts, within `timeout`.
fn wait_line<T>(
    rx: &mpsc::Receiver<String>,
    what: &str,
    timeout: Duration,
    pick: impl Fn(&str) -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(v) = pick(&line) {
                    return v;
                }
            }
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

#[test]
fn four_hosts_and_a_bootstrap_train_to_one_hash_in_full_groups() {
    const PEERS: usize = 4;
    let Some(mut lab) = Lab::new(PEERS + 1) else {
        return;
    };
    let boot_listen = format!("/ip4/{}/tcp/31337", lab.addr(0));
    let boot = lab.spawn(0, &["dht", "serve", "--listen", &boot_listen]);
    let bootstrap = wait_line(
        &boot,
        "the bootstrap's address",
        Duration::from_secs(30),
        |l| {
            l.strip_prefix("listening on ")
                .filter(|a| a.contains("/p2p/"))
                .map(str::to_owned)
        },
    );
    let shards: Vec<String> = (0..PEERS).map(|i| format!("{i}/{PEERS}")).collect();
    let listens: Vec<String> = (0..PEERS)
        .map(|i| format!("/ip4/{}/tcp/0", lab.addr(i + 1)))
        .collect();
    let peers: Vec<_> = (0..PEERS)
        .map(|i| {
            lab.spawn(
                i + 1,
                &[
                    "train",
                    "--json",
                    "--run-id",
                    "lab-a",
                    "--listen",
                    &listens[i],
                    "--initial-peers",
                    &bootstrap,
                    "--shard",
                    &shards[i],
                    "--target-group-size",
                    "4",
                    "--target-batch-size",
                    "256",
                    "--compute-ms",
                    "5",
                    "--max-steps",
                    "30",
                    "--target-accuracy",
                    "2",
                    "--max-seconds",
                    "150",
                ],
            )
        })
        .collect();
    let done: Vec<Value> = peers
        .iter()
        .enumerate()
        .map(|(i, rx)| {
            wait_line(
                rx,
                &format!("peer {i} done"),
                Duration::from_secs(170),
                |l| {
                    serde_json::from_str::<Value>(l)
                        .ok()
                        .filter(|v| v["event"] == "done")
                },
            )
        })
        .collect();
    for d in &done {
        eprintln!("lab scenario a: {d}");
    }
    let hash = &done[0]["hash"];
    assert!(
        done.iter().all(|d| d["hash"] == *hash),
        "parameters differ across hosts: {done:?}"
    );
    for d in &done {
        let steps = d["step"].as_u64().unwrap_or(0);
        let full = d["full_group_steps"].as_u64().unwrap_or(0);
        assert!(steps >= 30, "{d}");
        // Every step after the first few averaged across all four hosts.
        assert!(
            full as f64 >= 0.9 * steps as f64,
            "only {full} of {steps} steps averaged in full groups: {d}"
        );
    }
}
