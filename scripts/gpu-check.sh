#!/usr/bin/env bash
# GPU check for colony-kernels, in two halves:
#
#   scripts/gpu-check.sh build [DIR]   (here: needs Rust, no GPU)
#       Builds the colony-kernels test binaries, colony-averaging's
#       device-buffer test and the kernels bench binary with --features cuda,
#       and puts them, NVRTC (from the nvidia-cuda-nvrtc wheel, installed by
#       scripts/nvrtc-check.sh) and this script into DIR
#       (default: $CARGO_TARGET_DIR/gpu-check), plus DIR.tar.gz.
#
#   ./gpu-check.sh run [DIR]           (there: a GPU machine with a CUDA 13
#       driver and no Rust toolchain; DIR defaults to this script's folder)
#       Runs every test binary (the CUDA-vs-CPU twin tests among them) and then
#       the benches on GPU 0. Env: KERNELS_BENCH_SIZES_MB (default 1,64,512),
#       KERNELS_BENCH_CPU=1 to bench the CPU too, GPU_CHECK_SKIP_BENCH=1.
#       Exits non-zero if any test fails.
set -euo pipefail

mode="${1:-}"
case "$mode" in
build)
  cd "$(dirname "$0")/.."
  target="${CARGO_TARGET_DIR:-target}"
  out="${2:-$target/gpu-check}"
  rm -rf "$out"
  mkdir -p "$out/tests" "$out/benches" "$out/nvrtc"
  # NVRTC for machines that have only the driver: reuse the wheel nvrtc-check installs.
  NVRTC_CHECK_ONLY_INSTALL=1 scripts/nvrtc-check.sh >/dev/null
  find "$target/nvrtc-wheel" \( -name 'libnvrtc.so.*' -o -name 'libnvrtc-builtins.so.*' \) -exec cp {} "$out/nvrtc/" \;
  # $1: the target kinds to keep, as JSON (["bench"]); unit tests are ["lib"].
  list_executables() {
    KINDS="$1" python3 -c '
import json, os, sys
keep = json.loads(os.environ["KINDS"])
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] in keep:
        print(m["executable"])
'
  }
  cargo test -p colony-kernels --features cuda --release --no-run --message-format=json |
    list_executables '[["lib"], ["test"]]' | while read -r exe; do cp "$exe" "$out/tests/"; done
  # colony-averaging's device-buffer test (CUDA buffers averaged between two
  # in-process peers on 127.0.0.1).
  cargo test -p colony-averaging --features cuda --release --test device_buffers --no-run --message-format=json |
    list_executables '[["test"]]' | while read -r exe; do cp "$exe" "$out/tests/"; done
  cargo bench -p colony-kernels --features cuda --no-run --message-format=json |
    list_executables '[["bench"]]' | while read -r exe; do cp "$exe" "$out/benches/"; done
  cp "$0" "$out/gpu-check.sh"
  tar -C "$(dirname "$out")" -czf "$out.tar.gz" "$(basename "$out")"
  echo "built: $out ($(ls "$out/tests" | wc -l) test binaries, $(ls "$out/benches" | wc -l) bench binaries)"
  echo "copy $out.tar.gz to the GPU machine, unpack, run: ./gpu-check/gpu-check.sh run"
  ;;
run)
  dir="${2:-$(cd "$(dirname "$0")" && pwd)}"
  export LD_LIBRARY_PATH="$dir/nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  failed=0
  for t in "$dir"/tests/*; do
    echo "== test $(basename "$t")"
    "$t" --nocapture --test-threads=1 || failed=1
  done
  if [ "$failed" != 0 ]; then
    echo "gpu-check: TESTS FAILED" >&2
    exit 1
  fi
  if [ "${GPU_CHECK_SKIP_BENCH:-0}" != 1 ]; then
    export KERNELS_BENCH_CPU="${KERNELS_BENCH_CPU:-0}"
    for b in "$dir"/benches/*; do
      echo "== bench $(basename "$b")"
      "$b" --bench --noplot | grep -E 'RESULT|time:|thrpt:|skipped|no usable GPU|threads'
    done
  fi
  echo "gpu-check: all tests passed"
  ;;
*)
  echo "usage: $0 build [DIR] | run [DIR]" >&2
  exit 2
  ;;
esac
