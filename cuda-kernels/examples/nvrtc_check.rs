//! Compiles every kernel file with NVRTC (no GPU needed) and checks that the
//! crate's kernel list covers every `.cu` file in `kernels/`.
//!
//! Run by `scripts/nvrtc-check.sh`, which installs NVRTC from PyPI and sets
//! `LD_LIBRARY_PATH`. Usage: `nvrtc_check [ARCH...]` (default: compute_75 compute_90).

use std::{collections::BTreeSet, path::Path, process::ExitCode};

use colony_kernels::cuda::{KERNEL_SOURCES, compile_ptx};

fn main() -> ExitCode {
    let mut archs: Vec<String> = std::env::args().skip(1).collect();
    if archs.is_empty() {
        archs = vec!["compute_75".into(), "compute_90".into()];
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let on_disk: BTreeSet<String> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cu"))
            .collect(),
        Err(e) => {
            eprintln!("cannot read {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
    };
    let listed: BTreeSet<String> = KERNEL_SOURCES.iter().map(|s| s.file.to_owned()).collect();
    let mut failed = false;
    for missing in on_disk.difference(&listed) {
        eprintln!("FAIL {missing}: not listed in KERNEL_SOURCES (src/cuda/sources.rs)");
        failed = true;
    }
    for source in KERNEL_SOURCES {
        for arch in &archs {
            match compile_ptx(source, arch) {
                Ok(ptx) => println!(
                    "ok   {:<16} {arch}: {} kernels, {} bytes of PTX",
                    source.file,
                    source.functions.len(),
                    ptx.len()
                ),
                Err(e) => {
                    eprintln!("FAIL {} {arch}: {e}", source.file);
                    failed = true;
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
