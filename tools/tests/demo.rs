//! `colony demo`, the README's first command, end to end: 4 peer processes on 127.0.0.1
//! must reach >= 95% held-out accuracy with identical parameters, and exit 0.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_colony");

#[test]
fn demo_converges_with_identical_parameters() {
    let out = Command::new(BIN)
        .args(["demo", "--peers", "4", "--timeout-s", "170"])
        .output()
        .expect("run colony demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed ({}):\n{stdout}\n{}",
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
