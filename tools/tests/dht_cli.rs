//! Multi-process test of `colony dht serve|store|get` on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

const BIN: &str = env!("CARGO_BIN_EXE_colony");

struct Node {
    child: Child,
    addrs: Vec<String>,
}

/// Starts `colony dht serve` and waits (bounded) for its `listening on` line.
fn serve(extra: &[&str]) -> Node {
    let mut child = Command::new(BIN)
        .args(["dht", "serve", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn colony");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("no `listening on` line");
    let addr = line
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_owned();
    assert!(addr.contains("/p2p/12D3KooW"), "{addr}");
    Node {
        child,
        addrs: vec![addr],
    }
}

fn terminate(mut node: Node) {
    let pid = node.child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    for _ in 0..200 {
        if let Some(status) = node.child.try_wait().expect("wait") {
            assert!(status.success(), "serve exited with {status} after SIGTERM");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    node.child.kill().ok();
    panic!("serve did not exit within 10 s of SIGTERM");
}

fn colony(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run colony")
}

#[test]
fn serve_store_get_across_processes() {
    let dir = std::env::temp_dir().join(format!("colony-dht-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let identity = dir.join("bootstrap.key");
    let identity = identity.to_str().unwrap();

    let boot = serve(&["--identity", identity]);
    let boot_addr = boot.addrs[0].clone();
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(serve(&["--initial-peers", &boot_addr]));
    }
    let other_addr = others[2].addrs[0].clone();

    let out = colony(&[
        "dht",
        "store",
        "--initial-peers",
        &boot_addr,
        "greeting",
        r#"{"hello": [1, 2.5, "x"]}"#,
        "--ttl",
        "60",
    ]);
    assert!(
        out.status.success(),
        "store: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = colony(&[
        "dht",
        "store",
        "--initial-peers",
        &other_addr,
        "group",
        "true",
        "--subkey",
        "peer-a",
    ]);
    assert!(
        out.status.success(),
        "store subkey: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = colony(&[
        "dht",
        "store",
        "--initial-peers",
        &boot_addr,
        "group",
        "plain text",
        "--subkey",
        "peer-b",
    ]);
    assert!(out.status.success());

    let out = colony(&[
        "dht",
        "get",
        "--initial-peers",
        &other_addr,
        "greeting",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "get: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["type"], "regular");
    assert_eq!(json["value"], serde_json::json!({"hello": [1, 2.5, "x"]}));
    assert!(json["expiration"].as_f64().unwrap() > 0.0);

    let out = colony(&[
        "dht",
        "get",
        "--initial-peers",
        &boot_addr,
        "group",
        "--latest",
        "--json",
    ]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["type"], "dictionary");
    assert_eq!(json["entries"]["peer-a"]["value"], true);
    assert_eq!(json["entries"]["peer-b"]["value"], "plain text");

    let out = colony(&["dht", "get", "--initial-peers", &boot_addr, "no-such-key"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));

    // The bootstrap node restarts with the same peer id from its identity file.
    let boot_peer = boot_addr.rsplit('/').next().unwrap().to_owned();
    terminate(boot);
    let again = serve(&["--identity", identity, "--initial-peers", &other_addr]);
    assert!(again.addrs[0].ends_with(&boot_peer));
    let out = colony(&[
        "dht",
        "get",
        "--initial-peers",
        &again.addrs[0],
        "greeting",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "get after restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    terminate(again);
    for n in others {
        terminate(n);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `colony identity new|show` print the peer id a node will have before it
/// starts; a node reads its flags from `COLONY_*` variables; a second node
/// with the same identity file is refused with a message saying why.
#[test]
fn identity_commands_env_flags_and_one_node_per_identity() {
    let dir = std::env::temp_dir().join(format!("colony-identity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("node.key");
    let key_s = key.to_str().unwrap();

    let out = colony(&["identity", "new", key_s]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peer = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(peer.starts_with("12D3KooW"), "{peer}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let out = colony(&["identity", "show", key_s]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), peer);
    let out = colony(&["identity", "new", key_s]);
    assert!(!out.status.success(), "an identity file was overwritten");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    // Flags from the environment only: the node listens where COLONY_LISTEN says,
    // under the identity COLONY_IDENTITY names.
    let mut child = Command::new(BIN)
        .args(["dht", "serve"])
        .env("RUST_LOG", "warn")
        .env("COLONY_IDENTITY", key_s)
        .env("COLONY_LISTEN", "/ip4/127.0.0.1/tcp/0")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn colony");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().expect("a line").expect("utf-8");
    assert!(
        line.starts_with("listening on /ip4/127.0.0.1/tcp/") && line.ends_with(&peer),
        "{line}"
    );
    let node = Node {
        child,
        addrs: vec![line["listening on ".len()..].to_owned()],
    };

    // The same identity file on the same host: refused, nothing joins the swarm.
    let out = Command::new(BIN)
        .args([
            "dht",
            "serve",
            "--identity",
            key_s,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run colony");
    assert!(
        !out.status.success(),
        "a second node ran with a locked identity"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another node"), "{stderr}");
    terminate(node);
    std::fs::remove_dir_all(&dir).ok();
}
