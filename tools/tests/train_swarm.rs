//! Multi-process tests of `colony train` and `colony monitor` on 127.0.0.1: a peer
//! killed mid-run, a client-mode peer that contributes samples, a monitor that sees them.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_colony");

struct Peer {
    child: Child,
    events: mpsc::Receiver<Value>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn train(run: &str, extra: &[&str]) -> Peer {
    train_until(run, "100000", "0.5", extra)
}

/// Starts `colony train`; `matchmaking` is the averaging window in seconds.
fn train_until(run: &str, max_steps: &str, matchmaking: &str, extra: &[&str]) -> Peer {
    let mut child = Command::new(BIN)
        .args(["train", "--json", "--run-id", run, "--max-steps", max_steps])
        .args([
            "--target-accuracy",
            "2",
            "--target-batch-size",
            "128",
            "--compute-ms",
            "5",
        ])
        .args(["--max-seconds", "150", "--matchmaking-time", matchmaking])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn colony train");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, events) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && tx.send(v).is_err()
            {
                break;
            }
        }
    });
    Peer { child, events }
}

impl Peer {
    /// Waits (bounded) for an event matching `pred`.
    fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) if pred(&v) => return v,
                Ok(_) => {}
                Err(_) => panic!("timed out waiting for {what}"),
            }
        }
    }

    fn addr(&self) -> String {
        let v = self.wait_for("listening", Duration::from_secs(60), |v| {
            v["event"] == "listening"
        });
        v["addrs"][0].as_str().expect("addr").to_owned()
    }

    fn step_at_least(&self, step: u64, timeout: Duration) -> u64 {
        let v = self.wait_for(&format!("step {step}"), timeout, |v| {
            v["event"] == "progress" && v["step"].as_u64().is_some_and(|s| s >= step)
        });
        v["step"].as_u64().unwrap_or(0)
    }
}

fn monitor(addr: &str, run: &str) -> String {
    let out = Command::new(BIN)
        .args([
            "monitor",
            "--initial-peers",
            addr,
            "--run-id",
            run,
            "--target-batch-size",
            "128",
        ])
        .args(["--count", "1"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run colony monitor");
    assert!(
        out.status.success(),
        "monitor failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_killed_peer_does_not_stop_the_others() {
    let run = "killtest";
    let a = train(run, &["--shard", "0/3"]);
    let addr = a.addr();
    let b = train(run, &["--shard", "1/3", "--initial-peers", &addr]);
    let mut c = train(run, &["--shard", "2/3", "--initial-peers", &addr]);
    let reached = c.step_at_least(3, Duration::from_secs(90));
    assert!(reached >= 3);
    c.child.kill().expect("kill peer c");
    let _ = c.child.wait();
    // The survivors keep taking global steps after the kill.
    let a_now = a.step_at_least(0, Duration::from_secs(30));
    let b_now = b.step_at_least(0, Duration::from_secs(30));
    a.step_at_least(a_now + 3, Duration::from_secs(90));
    b.step_at_least(b_now + 3, Duration::from_secs(90));
    let view = monitor(&addr, run);
    assert!(view.contains("global step"), "{view}");
}

#[test]
fn a_client_peer_contributes_samples_and_the_monitor_sees_it() {
    let run = "clienttest";
    let a = train(run, &["--shard", "0/2"]);
    let addr = a.addr();
    let client = train(
        run,
        &["--shard", "1/2", "--client", "--initial-peers", &addr],
    );
    client.step_at_least(2, Duration::from_secs(90));
    // Poll the monitor (bounded) until it shows the client with its samples counted.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view = monitor(&addr, run);
        let client_line = view.lines().find(|l| l.ends_with("| client"));
        if view.contains("(1 clients)") && client_line.is_some() {
            assert!(view.contains("2 peers"), "{view}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "monitor never showed the client:\n{view}"
        );
    }
    a.step_at_least(2, Duration::from_secs(60));
}

#[test]
fn a_late_joiner_loads_the_state_and_then_steps_in_sync() {
    let run = "latetest";
    // Identical final parameters need every peer in the last averaging round:
    // with a target group size of 3 a round of all three assembles at once,
    // and the window only bounds the wait for a peer slowed by a loaded box.
    let window = "3";
    let a = train_until(
        run,
        "14",
        window,
        &["--shard", "0/3", "--target-group-size", "3"],
    );
    let addr = a.addr();
    let b = train_until(
        run,
        "14",
        window,
        &[
            "--shard",
            "1/3",
            "--initial-peers",
            &addr,
            "--target-group-size",
            "3",
        ],
    );
    a.step_at_least(5, Duration::from_secs(120));
    let late = train_until(
        run,
        "14",
        window,
        &[
            "--shard",
            "2/3",
            "--initial-peers",
            &addr,
            "--target-group-size",
            "3",
        ],
    );
    // Its first global step is the download of the swarm's state (step >= 5).
    let first = late.wait_for("first step", Duration::from_secs(60), |v| {
        v["event"] == "progress" && v["step"].as_u64().is_some_and(|s| s > 0)
    });
    assert!(first["step"].as_u64().unwrap_or(0) >= 5, "{first}");
    let done = |p: &Peer| p.wait_for("done", Duration::from_secs(120), |v| v["event"] == "done");
    let (da, db, dl) = (done(&a), done(&b), done(&late));
    for d in [&da, &db, &dl] {
        assert_eq!(d["step"], 14, "{d}");
    }
    assert_eq!(
        da["hash"], dl["hash"],
        "the late joiner holds the swarm's parameters"
    );
    assert_eq!(da["hash"], db["hash"]);
}

/// Three processes on 127.0.0.1, one with `--one-port` (no data-plane port:
/// its parts and its span travel over libp2p streams) and one announcing a
/// data address where nothing listens: every round is a full group and all
/// end with the same parameters; the start-up dial-back found every peer
/// reachable.
#[test]
fn a_one_port_peer_and_a_wrong_data_address_still_average_in_full_groups() {
    let run = "oneporttest";
    let group = ["--target-group-size", "3"];
    let a = train_until(run, "12", "3", &[&["--shard", "0/3"][..], &group].concat());
    let addr = a.addr();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let b = train_until(
        run,
        "12",
        "3",
        &[
            &["--shard", "1/3", "--one-port", "--initial-peers", &addr][..],
            &group,
        ]
        .concat(),
    );
    let c = train_until(
        run,
        "12",
        "3",
        &[
            &[
                "--shard",
                "2/3",
                "--data-announce",
                &closed,
                "--initial-peers",
                &addr,
            ][..],
            &group,
        ]
        .concat(),
    );
    for p in [&b, &c] {
        let r = p.wait_for("reachability", Duration::from_secs(60), |v| {
            v["event"] == "reachability"
        });
        assert_eq!(r["reachable"], true, "{r}");
        assert_eq!(r["client"], false, "{r}");
    }
    let done = |p: &Peer| p.wait_for("done", Duration::from_secs(150), |v| v["event"] == "done");
    let (da, db, dc) = (done(&a), done(&b), done(&c));
    for d in [&da, &db, &dc] {
        assert_eq!(d["step"], 12, "{d}");
        assert!(d["full_group_steps"].as_u64().unwrap_or(0) >= 11, "{d}");
    }
    for d in [&db, &dc] {
        assert!(d["libp2p_connections"].as_u64().unwrap_or(0) > 0, "{d}");
    }
    assert_eq!(da["hash"], db["hash"]);
    assert_eq!(da["hash"], dc["hash"]);
}
