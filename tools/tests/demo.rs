//! `colony demo`, the README's first command, end to end: 4 peer processes on 127.0.0.1
//! must reach >= 95% held-out accuracy with identical parameters, and exit 0.

use std::{process::Command, sync::Mutex};

const BIN: &str = env!("CARGO_BIN_EXE_colony");

/// One demo swarm at a time: two at once on a 2-core machine could make a
/// peer miss a round's matchmaking window.
static ONE_SWARM: Mutex<()> = Mutex::new(());

#[test]
fn demo_converges_with_identical_parameters() {
    run_demo(&[]);
}

/// With fp16 on the wire every peer still applies the same decoded averages
/// (a reducer applies to its own span the bytes it sent the others), so the
/// parameters stay bit-identical across processes.
#[test]
fn demo_with_fp16_averaging_converges_with_identical_parameters() {
    run_demo(&["--compression", "fp16"]);
}

/// Local updates (H = 8 inner AdamW steps per outer step) with delayed
/// outer rounds: the global parameters stay bit-identical across processes.
#[test]
fn demo_with_local_and_delayed_updates_converges_with_identical_parameters() {
    run_demo(&["--local-updates", "8", "--delay-updates"]);
}

#[test]
fn demo_refuses_an_unknown_compression() {
    let out = Command::new(BIN)
        .args(["demo", "--compression", "fp12"])
        .output()
        .expect("run colony demo");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--compression"));
}

fn run_demo(extra: &[&str]) {
    let _one = ONE_SWARM
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = Command::new(BIN)
        .args(["demo", "--peers", "4", "--timeout-s", "170"])
        .args(extra)
        .output()
        .expect("run colony demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo {extra:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("converged: all peers hold identical parameters"),
        "{stdout}"
    );
    let hashes: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains('|') && !l.contains("sha256"))
        .filter_map(|l| l.rsplit('|').next().map(str::trim))
        .collect();
    assert_eq!(hashes.len(), 4, "{stdout}");
    assert!(
        hashes.iter().all(|h| h.len() == 64 && *h == hashes[0]),
        "{stdout}"
    );
}
