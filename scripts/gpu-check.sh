#!/usr/bin/env bash
# GPU check for colony-kernels, in two halves:
#
#   scripts/gpu-check.sh build [DIR]   (here: needs Rust, no GPU)
#       Builds the colony-kernels test binaries, colony-averaging's
#       device-buffer test and the kernels bench binary with --features cuda,
#       strips their debug info, and puts them and this script into DIR
#       (default: .gpu-check in the repository root, which git ignores, so the
#       device tool can carry it: carry [".gpu-check"]; about 20 MB).
#       GPU_CHECK_BUNDLE_NVRTC=1 also copies NVRTC (from the nvidia-cuda-nvrtc
#       wheel that scripts/nvrtc-check.sh installs; +110 MB) for GPU machines
#       without it; the lent H100/H200 image has that wheel installed.
#
#   DIR/gpu-check.sh run [DIR]         (there: a GPU machine with a CUDA 13
#       driver and no Rust toolchain; DIR defaults to this script's folder)
#       Finds NVRTC (DIR/nvrtc, else an installed nvidia-cuda-nvrtc wheel),
#       runs every test binary (the CUDA-vs-CPU twin tests among them) and then
#       the benches on GPU 0. Env: KERNELS_BENCH_SIZES_MB (default 1,64,512),
#       KERNELS_BENCH_CPU=1 to bench the CPU too, GPU_CHECK_SKIP_BENCH=1.
#       Exits non-zero if any test fails, or if a twin test skipped because no
#       GPU or NVRTC was usable (a check that checked nothing is a failure).
#
#   With the device tool, from the repository root:
#       scripts/gpu-check.sh build
#       run(command=".gpu-check/gpu-check.sh run", carry=[".gpu-check"], timeout_s=540)
set -euo pipefail

mode="${1:-}"
case "$mode" in
build)
  cd "$(dirname "$0")/.."
  target="${CARGO_TARGET_DIR:-target}"
  out="${2:-.gpu-check}"
  rm -rf "$out"
  mkdir -p "$out/tests" "$out/benches"
  if [ "${GPU_CHECK_BUNDLE_NVRTC:-0}" = 1 ]; then
    # NVRTC for machines that have only the driver: reuse the wheel nvrtc-check installs.
    mkdir -p "$out/nvrtc"
    NVRTC_CHECK_ONLY_INSTALL=1 scripts/nvrtc-check.sh >/dev/null
    find "$target/nvrtc-wheel" \( -name 'libnvrtc.so.*' -o -name 'libnvrtc-builtins.so.*' \) -exec cp {} "$out/nvrtc/" \;
  fi
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
  # Debug info is most of each binary's size; symbols stay for backtraces.
  for exe in "$out"/tests/* "$out"/benches/*; do
    strip --strip-debug "$exe"
  done
  cp "$0" "$out/gpu-check.sh"
  echo "built: $out ($(ls "$out/tests" | wc -l) test binaries, $(ls "$out/benches" | wc -l) bench binaries, $(du -sh "$out" | cut -f1))"
  echo "on the GPU machine: $out/gpu-check.sh run"
  ;;
run)
  dir="${2:-$(cd "$(dirname "$0")" && pwd)}"
  nvrtc_dir="$dir/nvrtc"
  if ! ls "$nvrtc_dir"/libnvrtc.so.* >/dev/null 2>&1; then
    # An installed nvidia-cuda-nvrtc wheel (the lent machines' image has one).
    nvrtc_dir="$(python3 - <<'PY' 2>/dev/null || true
import glob, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
for root in roots:
    hits = sorted(glob.glob(f"{root}/nvidia/**/libnvrtc.so.1*", recursive=True))
    if hits:
        print(hits[-1].rsplit("/", 1)[0])
        break
PY
)"
  fi
  echo "NVRTC from: ${nvrtc_dir:-the loader path}"
  export LD_LIBRARY_PATH="${nvrtc_dir:+$nvrtc_dir:}${LD_LIBRARY_PATH:-}"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  failed=0
  log="$(mktemp)"
  for t in "$dir"/tests/*; do
    echo "== test $(basename "$t")"
    "$t" --nocapture --test-threads=1 2>&1 | tee -a "$log" || failed=1
  done
  if [ "$failed" != 0 ]; then
    echo "gpu-check: TESTS FAILED" >&2
    exit 1
  fi
  if grep -qiE "skipped: CUDA unavailable|skipping Cuda" "$log"; then
    echo "gpu-check: the CUDA tests skipped (no usable GPU or NVRTC): nothing was checked" >&2
    exit 3
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
