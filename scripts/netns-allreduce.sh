#!/usr/bin/env bash
# The multi-process all-reduce over links of different speeds: one network
# namespace per peer, joined by veth pairs to a bridge, each peer's link capped
# in both directions with tc tbf. Runs the allreduce bench twice on the same
# network: every peer reducing an equal span, then with the peers' link rates
# declared to the load balancer; prints both JSON lines.
#
#   scripts/netns-allreduce.sh            (root: needs ip netns, veth, bridge, tc)
#
# Env: RATES_MBIT (default "800 800 800 200", one per peer), FLOATS (default
# 10000000), ROUNDS (default 3), COMPRESSION (default none), PART_SIZE (bytes,
# default 4194304), ALLREDUCE_BIN
# (default $CARGO_TARGET_DIR/release/allreduce; build it with
# `cargo build --release -p colony-benches --bin allreduce`).
# Traffic stays inside the namespaces and the bridge (10.77.0.0/24); everything
# is removed on exit.
set -euo pipefail

read -r -a rates <<<"${RATES_MBIT:-800 800 800 200}"
n=${#rates[@]}
floats=${FLOATS:-10000000}
rounds=${ROUNDS:-3}
compression=${COMPRESSION:-none}
part_size=${PART_SIZE:-4194304}
bin=${ALLREDUCE_BIN:-${CARGO_TARGET_DIR:-target}/release/allreduce}
br=colonybr0
prefix=10.77.0
[ -x "$bin" ] || { echo "no allreduce binary at $bin" >&2; exit 2; }

cleanup() {
  for i in $(seq 0 $((n - 1))); do
    ip netns del "colony$i" 2>/dev/null || true
    ip link del "cvh$i" 2>/dev/null || true
  done
  ip link del "$br" 2>/dev/null || true
}
trap cleanup EXIT
cleanup

ip link add "$br" type bridge
ip link set "$br" mtu 9000
ip addr add "$prefix.254/24" dev "$br"
ip link set "$br" up
ips=()
namespaces=()
bandwidths=()
for i in $(seq 0 $((n - 1))); do
  ns="colony$i"
  rate="${rates[$i]}"
  ip netns add "$ns"
  ip link add "cvh$i" mtu 9000 type veth peer name "cvn$i" mtu 9000
  ip link set "cvn$i" netns "$ns"
  ip link set "cvh$i" master "$br" up
  ip netns exec "$ns" ip addr add "$prefix.$((i + 1))/24" dev "cvn$i"
  ip netns exec "$ns" ip link set "cvn$i" up
  ip netns exec "$ns" ip link set lo up
  # Upload: the namespace side's egress; download: the bridge side's egress.
  ip netns exec "$ns" tc qdisc add dev "cvn$i" root tbf rate "${rate}mbit" burst 1mb latency 100ms
  tc qdisc add dev "cvh$i" root tbf rate "${rate}mbit" burst 1mb latency 100ms
  ips+=("$prefix.$((i + 1))")
  namespaces+=("$ns")
  bandwidths+=("$((rate * 1000000 / 8))")
done
join() { local IFS=,; echo "$*"; }

common=(--peers "$n" --floats "$floats" --rounds "$rounds" --compression "$compression" --part-size "$part_size"
  --netns "$(join "${namespaces[@]}")" --ips "$(join "${ips[@]}")" --coord-ip "$prefix.254"
  --link-rates "$(join "${bandwidths[@]}")" --json)
echo "links (Mbit/s, each direction): ${rates[*]}"
echo "equal spans:"
"$bin" "${common[@]}"
echo "spans from the declared link rates:"
"$bin" "${common[@]}" --bandwidths "$(join "${bandwidths[@]}")"
