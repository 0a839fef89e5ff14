//! The network lab: hosts as network namespaces on one bridge (the "internet"),
//! some of them behind their own NAT router (a namespace with nftables
//! masquerade and a stateful forward filter, so nothing from outside reaches
//! them unless they dialed first), per-host link caps (tc tbf, both
//! directions), and links that can be cut and restored.
//!
//! It needs root, `ip` and `tc` from iproute2 and, for NATed hosts, `nft`;
//! where any is missing, [`Lab::new`] prints why and returns `None` so the
//! test skips. Every namespace, link and process is removed when the `Lab`
//! drops, also when the test fails; on failure each host's log tail is
//! printed first.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    cell::RefCell,
    collections::VecDeque,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Mutex, MutexGuard, mpsc},
    time::{Duration, Instant},
};

/// The `colony` binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_colony");

/// One lab at a time per test binary: scenarios are CPU-heavy on small
/// machines and their timing assertions need the cores.
static ONE_LAB: Mutex<()> = Mutex::new(());

/// Where a host sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Host {
    /// On the bridge with its own routable IP.
    Public,
    /// Behind its own NAT router (private IP, masqueraded, no inbound route).
    Nat,
}

/// A process started on a lab host.
pub(crate) struct Proc {
    /// Lines of its stdout.
    lines: mpsc::Receiver<String>,
    /// Lines read ahead by [`Proc::latest`], not yet consumed.
    stash: RefCell<VecDeque<String>>,
    index: usize,
}

impl Proc {
    /// The next stdout line, within `timeout`.
    pub(crate) fn next_line(&self, timeout: Duration) -> Option<String> {
        if let Some(line) = self.stash.borrow_mut().pop_front() {
            return Some(line);
        }
        self.lines.recv_timeout(timeout).ok()
    }

    /// The most recent `--json` event named `event` printed so far (older
    /// ones of that name are discarded, other lines are kept for later reads).
    pub(crate) fn latest(&self, event: &str) -> Option<serde_json::Value> {
        let mut found = None;
        let mut stash = self.stash.borrow_mut();
        let mut keep = VecDeque::new();
        let pending: Vec<String> = stash.drain(..).chain(self.lines.try_iter()).collect();
        for line in pending {
            match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(v) if v["event"] == event => found = Some(v),
                _ => keep.push_back(line),
            }
        }
        *stash = keep;
        found
    }
}

/// The lab; removed on drop.
pub(crate) struct Lab {
    tag: String,
    subnet: String,
    hosts: Vec<Host>,
    children: Vec<Option<Child>>,
    logs: Vec<PathBuf>,
    log_dir: PathBuf,
    _one: MutexGuard<'static, ()>,
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args)
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

impl Lab {
    /// The hosts `hosts` describe (index = host number), or `None` with the
    /// reason printed where this machine cannot build them.
    pub(crate) fn new(name: &str, hosts: &[Host]) -> Option<Self> {
        let one = ONE_LAB.lock().unwrap_or_else(|p| p.into_inner());
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if !root {
            eprintln!("skipping lab scenario {name}: needs root (ip netns)");
            return None;
        }
        for tool in ["ip", "tc"] {
            if !have(tool) {
                eprintln!("skipping lab scenario {name}: `{tool}` (iproute2) is missing");
                return None;
            }
        }
        if !have("nft") {
            eprintln!("skipping lab scenario {name}: `nft` (nftables) is missing");
            return None;
        }
        // Unique per process (and per lab within it), so concurrent runs never
        // share a bridge or a subnet.
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{}", pid % 10_000, n % 10);
        let log_dir = std::env::temp_dir().join(format!("colony-lab-{pid}-{name}"));
        let _ = std::fs::remove_dir_all(&log_dir);
        std::fs::create_dir_all(&log_dir).ok()?;
        let lab = Self {
            tag,
            subnet: format!("10.{}.{}", 80 + n % 40, pid % 250),
            hosts: hosts.to_vec(),
            children: Vec::new(),
            logs: Vec::new(),
            log_dir,
            _one: one,
        };
        match lab.build() {
            Ok(()) => Some(lab),
            Err(e) => {
                eprintln!("skipping lab scenario {name}: {e}");
                None
            }
        }
    }

    /// Host `i`'s namespace.
    pub(crate) fn ns(&self, i: usize) -> String {
        format!("clab{}-{i}", self.tag)
    }

    fn router_ns(&self, i: usize) -> String {
        format!("clab{}-r{i}", self.tag)
    }

    fn bridge(&self) -> String {
        format!("clb{}", self.tag)
    }

    /// Root-side end of the bridge port of host `i` (or of its router).
    fn port(&self, i: usize) -> String {
        format!("clp{}{i}", self.tag)
    }

    /// Host `i`'s own IP (private for a NATed host).
    pub(crate) fn addr(&self, i: usize) -> String {
        match self.hosts[i] {
            Host::Public => format!("{}.{}", self.subnet, i + 1),
            Host::Nat => format!("192.168.{}.2", i + 1),
        }
    }

    /// The IP others see host `i` at (its router's for a NATed host).
    pub(crate) fn public_addr(&self, i: usize) -> String {
        match self.hosts[i] {
            Host::Public => self.addr(i),
            Host::Nat => format!("{}.{}", self.subnet, 200 + i),
        }
    }

    fn gateway(&self, i: usize) -> String {
        format!("192.168.{}.1", i + 1)
    }

    fn build(&self) -> Result<(), String> {
        let br = self.bridge();
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["link", "set", &br, "up"])?;
        for (i, kind) in self.hosts.iter().enumerate() {
            let ns = self.ns(i);
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            // The namespace that sits on the bridge: the host itself, or its router.
            let (wan_ns, wan_if, wan_ip) = match kind {
                Host::Public => (ns.clone(), "eth0", self.addr(i)),
                Host::Nat => {
                    let r = self.router_ns(i);
                    ip(&["netns", "add", &r])?;
                    ip(&["-n", &r, "link", "set", "lo", "up"])?;
                    (r, "wan", self.public_addr(i))
                }
            };
            let port = self.port(i);
            ip(&[
                "link", "add", &port, "type", "veth", "peer", "name", wan_if, "netns", &wan_ns,
            ])?;
            ip(&["link", "set", &port, "master", &br, "up"])?;
            let cidr = format!("{wan_ip}/24");
            ip(&["-n", &wan_ns, "addr", "add", &cidr, "dev", wan_if])?;
            ip(&["-n", &wan_ns, "link", "set", wan_if, "up"])?;
            if *kind == Host::Nat {
                let r = self.router_ns(i);
                ip(&[
                    "-n", &r, "link", "add", "lan", "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ])?;
                let gw = format!("{}/24", self.gateway(i));
                ip(&["-n", &r, "addr", "add", &gw, "dev", "lan"])?;
                ip(&["-n", &r, "link", "set", "lan", "up"])?;
                let own = format!("{}/24", self.addr(i));
                ip(&["-n", &ns, "addr", "add", &own, "dev", "eth0"])?;
                ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
                ip(&[
                    "-n",
                    &ns,
                    "route",
                    "add",
                    "default",
                    "via",
                    &self.gateway(i),
                ])?;
                run(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &r,
                        "sysctl",
                        "-qw",
                        "net.ipv4.ip_forward=1",
                    ],
                )?;
                self.nft(&r)?;
            }
        }
        Ok(())
    }

    /// Masquerade out of `wan`; forward only what the inside started; drop
    /// (do not reset) unsolicited connections to the router itself, as home
    /// routers do: a reset would kill a hole punch whose first SYN arrives
    /// before the inside host's own SYN opened the mapping.
    fn nft(&self, router: &str) -> Result<(), String> {
        let rules = "table ip colony_nat {\n\
             chain postrouting { type nat hook postrouting priority srcnat; oifname \"wan\" masquerade; }\n\
             chain input { type filter hook input priority filter; policy accept;\n\
               iifname \"wan\" ct state new drop; }\n\
             chain forward { type filter hook forward priority filter; policy drop;\n\
               ct state established,related accept; ct status dnat accept;\n\
               iifname \"lan\" oifname \"wan\" accept; }\n\
             }\n";
        self.nft_in(router, rules)
    }

    /// Loads nftables `rules` in namespace `ns`.
    fn nft_in(&self, ns: &str, rules: &str) -> Result<(), String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("nft: {e}"))?;
        use std::io::Write;
        child
            .stdin
            .take()
            .ok_or("nft stdin")?
            .write_all(rules.as_bytes())
            .map_err(|e| format!("nft: {e}"))?;
        let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "nft: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Port forwards on NATed host `i`'s router: TCP `ports` of its public
    /// address go to the host (a home router's port forwarding).
    pub(crate) fn forward(&self, i: usize, ports: &[u16]) {
        assert_eq!(self.hosts[i], Host::Nat, "forward is for NATed hosts");
        let list = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let rules = format!(
            "table ip colony_fwd {{\n\
             chain prerouting {{ type nat hook prerouting priority dstnat; iifname \"wan\" tcp dport {{ {list} }} dnat to {}; }}\n\
             }}\n",
            self.addr(i)
        );
        self.nft_in(&self.router_ns(i), &rules)
            .expect("nft port forward");
    }

    /// A firewall on public host `i` that accepts new inbound TCP connections
    /// on `port` only (a host that can open one port).
    pub(crate) fn open_only(&self, i: usize, port: u16) {
        assert_eq!(self.hosts[i], Host::Public, "open_only is for public hosts");
        let rules = format!(
            "table inet colony_fw {{\n\
             chain input {{ type filter hook input priority filter; policy accept;\n\
               ct state established,related accept; iif lo accept;\n\
               tcp dport {port} accept; tcp flags syn drop; }}\n\
             }}\n"
        );
        self.nft_in(&self.ns(i), &rules).expect("nft firewall");
    }

    /// Caps host `i`'s link at `mbit` Mbit/s in both directions (tc tbf on
    /// each end of the link that carries its traffic).
    pub(crate) fn cap(&self, i: usize, mbit: u32) {
        let rate = format!("{mbit}mbit");
        // Burst: a 10 ms slice of the rate, at least 64 KiB; a 50 ms queue
        // (a deeper one delays the ACKs of the other direction's traffic:
        // 200 ms made scenario e's rounds 20 % slower).
        let burst = format!("{}kb", (mbit as usize * 10 / 8).max(64));
        let (near_ns, near_if, far_ns, far_if) = match self.hosts[i] {
            Host::Public => (self.ns(i), "eth0", None, self.port(i)),
            Host::Nat => (
                self.ns(i),
                "eth0",
                Some(self.router_ns(i)),
                "lan".to_owned(),
            ),
        };
        let tbf = |ns: Option<&str>, dev: &str| {
            let mut args: Vec<&str> = Vec::new();
            if let Some(ns) = ns {
                args.extend(["-n", ns]);
            }
            args.extend([
                "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst,
                "latency", "50ms",
            ]);
            run("tc", &args).expect("tc tbf");
        };
        tbf(Some(&near_ns), near_if);
        tbf(far_ns.as_deref(), &far_if);
    }

    /// Cuts host `i` off the network (its interface goes down).
    pub(crate) fn link_down(&self, i: usize) {
        ip(&["-n", &self.ns(i), "link", "set", "eth0", "down"]).expect("link down");
    }

    /// Restores host `i`'s link (and its default route behind NAT).
    pub(crate) fn link_up(&self, i: usize) {
        ip(&["-n", &self.ns(i), "link", "set", "eth0", "up"]).expect("link up");
        if self.hosts[i] == Host::Nat {
            ip(&[
                "-n",
                &self.ns(i),
                "route",
                "replace",
                "default",
                "via",
                &self.gateway(i),
            ])
            .expect("default route");
        }
    }

    /// Runs `colony args…` on host `i` (stdout as lines, stderr to the host's log).
    pub(crate) fn spawn(&mut self, i: usize, args: &[&str]) -> Proc {
        self.spawn_env(i, args, &[])
    }

    /// As [`spawn`](Self::spawn) with extra environment variables.
    pub(crate) fn spawn_env(&mut self, i: usize, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let index = self.children.len();
        let log = self.log_dir.join(format!("host{i}-proc{index}.log"));
        let stderr = std::fs::File::create(&log).expect("log file");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(i), BIN])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("COLONY_LAB_LOG").unwrap_or_else(|_| "info,libp2p=warn".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
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
        self.children.push(Some(child));
        self.logs.push(log);
        Proc {
            lines: rx,
            stash: RefCell::default(),
            index,
        }
    }

    /// Kills a process started with [`spawn`](Self::spawn).
    pub(crate) fn kill(&mut self, proc: &Proc) {
        if let Some(mut c) = self.children[proc.index].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits (bounded) for `proc` to exit; its status, or `None` if it
    /// still runs after `timeout`.
    pub(crate) fn wait_exit(&mut self, proc: &Proc, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.children[proc.index].as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A directory for this lab's files (removed with the lab).
    pub(crate) fn dir(&self) -> &std::path::Path {
        &self.log_dir
    }

    /// The stderr log of `proc`.
    pub(crate) fn log(&self, proc: &Proc) -> String {
        std::fs::read_to_string(&self.logs[proc.index]).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            for log in &self.logs {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!("---- {} (last {} lines)", log.display(), tail.len());
                for l in tail {
                    eprintln!("{l}");
                }
            }
        } else {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        }
        for (i, kind) in self.hosts.iter().enumerate() {
            let _ = ip(&["netns", "del", &self.ns(i)]);
            if *kind == Host::Nat {
                let _ = ip(&["netns", "del", &self.router_ns(i)]);
            }
            let _ = ip(&["link", "del", &self.port(i)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

/// The first line of `proc` that `pick` accepts, within `timeout`.
pub(crate) fn wait_line<T>(
    proc: &Proc,
    what: &str,
    timeout: Duration,
    mut pick: impl FnMut(&str) -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match proc.next_line(left) {
            Some(line) => {
                if let Some(v) = pick(&line) {
                    return v;
                }
            }
            None => panic!("timed out waiting for {what}"),
        }
    }
}

/// The next `--json` event of `proc` named `event`, within `timeout`.
pub(crate) fn wait_event(
    proc: &Proc,
    event: &str,
    what: &str,
    timeout: Duration,
) -> serde_json::Value {
    wait_line(proc, what, timeout, |l| {
        serde_json::from_str::<serde_json::Value>(l)
            .ok()
            .filter(|v| v["event"] == event)
    })
}

/// Starts `colony dht serve` on host `i` listening on `port` of its IP and
/// returns the process and its `/p2p/` address.
pub(crate) fn bootstrap(lab: &mut Lab, i: usize, port: u16, extra: &[&str]) -> (Proc, String) {
    let listen = format!("/ip4/{}/tcp/{port}", lab.addr(i));
    let mut args = vec!["dht", "serve", "--listen", &listen];
    args.extend_from_slice(extra);
    let proc = lab.spawn(i, &args);
    let addr = wait_line(
        &proc,
        "the bootstrap's address",
        Duration::from_secs(30),
        |l| {
            l.strip_prefix("listening on ")
                .filter(|a| a.contains("/p2p/"))
                .map(str::to_owned)
        },
    );
    (proc, addr)
}
