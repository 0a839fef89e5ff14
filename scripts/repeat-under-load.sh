#!/usr/bin/env bash
# Runs chosen tests N times each while the whole workspace's tests run
# alongside as load (the contention CI's 2 cores see), and prints how many
# runs passed. Flaky multi-peer tests show up here, not in a quiet run.
#
#   scripts/repeat-under-load.sh 20 \
#     colony-averaging:averager_dht:four_averagers_find_each_other_and_average \
#     colony-optim:driver_dht:four_peers_with_real_averaging_match_union_batch_sgd_after_10_steps
#
# Each test is PACKAGE:TEST_TARGET:TEST_NAME (an integration test target).
# Logs of failed runs go to $LOGS (default: a temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:?usage: $0 RUNS PACKAGE:TARGET:TEST ...}
shift
logs=${LOGS:-$(mktemp -d)}
cargo test --workspace --no-run >/dev/null 2>&1

declare -A bin
for spec in "$@"; do
  IFS=: read -r pkg target _ <<<"$spec"
  path=$(cargo test -p "$pkg" --test "$target" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]==sys.argv[1]:
        print(m["executable"])' "$target" | tail -n1)
  [ -n "$path" ] || { echo "no test binary for $spec" >&2; exit 2; }
  bin[$spec]=$path
done

load_pid=""
start_load() {
  cargo test --workspace >"$logs/load.log" 2>&1 &
  load_pid=$!
}
stop_load() {
  [ -n "$load_pid" ] && kill -- "$load_pid" 2>/dev/null || true
  pkill -P "$load_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop_load EXIT
start_load

declare -A passed
for spec in "$@"; do passed[$spec]=0; done
for i in $(seq 1 "$runs"); do
  for spec in "$@"; do
    kill -0 "$load_pid" 2>/dev/null || start_load
    name=${spec##*:}
    if timeout 300 "${bin[$spec]}" --exact "$name" >"$logs/run-$i-${name}.log" 2>&1; then
      passed[$spec]=$((passed[$spec] + 1))
      rm -f "$logs/run-$i-${name}.log"
    else
      echo "run $i of $name FAILED (log: $logs/run-$i-${name}.log)"
    fi
  done
  echo "after run $i: $(for s in "$@"; do printf '%s=%s ' "${s##*:}" "${passed[$s]}"; done)"
done
for spec in "$@"; do
  echo "${spec##*:}: ${passed[$spec]}/$runs passed under load"
done
for spec in "$@"; do [ "${passed[$spec]}" = "$runs" ] || exit 1; done
