#!/usr/bin/env bash
# Fuzzes every decoder that sees peer bytes (the cargo-fuzz targets in
# fuzz/): builds them once, then runs each for a fixed number of
# executions on a scratch copy of its committed seed corpus
# (fuzz/corpus/<target>/, which CI never grows), and fails on any crash,
# timeout or allocation over the caps (see fuzz/src/lib.rs).
#
#   scripts/fuzz.sh              build and run every target
#   scripts/fuzz.sh dht_wire ... only these targets
#   scripts/fuzz.sh --seeds      regenerate the committed seed corpus
#
# FUZZ_RUNS (default 100000) executions per target, FUZZ_MAX_LEN (4096)
# longest input, FUZZ_TIMEOUT (10) seconds per input, FUZZ_RSS_MB (2048).
#
# Built with -s none (no sanitizer): the targets are safe Rust over
# decoders whose unsafe code is in dependencies, and AddressSanitizer
# roughly doubles the build of this dependency tree (libp2p) on 2 cores and
# slows every execution 2-3x. Debug assertions and overflow checks are on
# (-a). Without ASan, libFuzzer's -malloc_limit_mb is not enforced; the
# targets' allocator enforces the caps instead.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1 # cargo-fuzz passes -Z flags; stable accepts them so

runs=${FUZZ_RUNS:-100000}
max_len=${FUZZ_MAX_LEN:-4096}
timeout=${FUZZ_TIMEOUT:-10}
rss_mb=${FUZZ_RSS_MB:-2048}

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

if ! cargo fuzz --version >/dev/null 2>&1; then
  t0=$(now)
  cargo install cargo-fuzz --locked
  echo "fuzz: installed cargo-fuzz in $(since "$t0") s"
fi

seeds=0
targets=()
for arg in "$@"; do
  case "$arg" in
    --seeds) seeds=1 ;;
    *) targets+=("$arg") ;;
  esac
done
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi

t0=$(now)
# One build for every target (it builds them all when none is named), in
# its own target directory whatever CARGO_TARGET_DIR says: the coverage
# RUSTFLAGS would otherwise evict the workspace's artifacts.
target_dir="$PWD/fuzz/target"
cargo fuzz build -O -a -s none --fuzz-dir fuzz --target-dir "$target_dir"
echo "fuzz: built ${#targets[@]} targets in $(since "$t0") s"
bin_dir="$target_dir/$(rustc -vV | sed -n 's/^host: //p')/release"

if [ "$seeds" = 1 ]; then
  for t in "${targets[@]}"; do
    rm -rf "fuzz/corpus/$t"
    COLONY_FUZZ_WRITE_SEEDS="fuzz/corpus/$t" "$bin_dir/$t"
  done
  exit 0
fi

failed=()
summary=()
for t in "${targets[@]}"; do
  work=$(mktemp -d)
  cp -R "fuzz/corpus/$t/." "$work/"
  mkdir -p "fuzz/artifacts/$t"
  log="$work.log"
  t1=$(now)
  status=ok
  if ! "$bin_dir/$t" "$work" -runs="$runs" -max_len="$max_len" -timeout="$timeout" \
    -rss_limit_mb="$rss_mb" -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" \
    >"$log" 2>&1; then
    status=FAILED
    failed+=("$t")
    tail -n 40 "$log" >&2
  fi
  secs=$(since "$t1")
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  line=$(printf '%-20s %8s execs %7s s  %s' "$t" "${execs:-?}" "$secs" "$status")
  echo "fuzz: $line"
  summary+=("$line")
  rm -rf "$work" "$log"
done

echo "fuzz: summary ($runs runs per target, max_len $max_len)"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
  exit 1
fi
