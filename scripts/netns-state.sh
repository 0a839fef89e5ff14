#!/usr/bin/env bash
# A late joiner downloading a vouched state from 1 donor and from all of
# them, over capped links: one network namespace per host on a bridge, each
# donor's link capped in both directions with tc tbf (the joiner's is not),
# the `state_download` bench's donors and joiner in them. Prints the
# joiner's JSON line (medians, speedup, link bounds).
#
#   scripts/netns-state.sh          (root: needs ip netns, veth, bridge, tc)
#
# Env: DONORS (default 3), DONOR_MBIT (default 100), FLOATS (default
# 8388608, 32 MiB), ROUNDS (default 3), STATE_BIN (default
# $CARGO_TARGET_DIR/release/state_download; build it with
# `cargo build --release -p colony-benches --bin state_download`).
# Traffic stays inside the namespaces and the bridge (10.78.0.0/24);
# everything is removed on exit, also on failure.
set -euo pipefail

donors=${DONORS:-3}
mbit=${DONOR_MBIT:-100}
floats=${FLOATS:-8388608}
rounds=${ROUNDS:-3}
bin=${STATE_BIN:-${CARGO_TARGET_DIR:-target}/release/state_download}
br=colonysbr0
prefix=10.78.0
[ -x "$bin" ] || { echo "no state_download binary at $bin" >&2; exit 2; }

work=""
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for i in $(seq 0 "$donors"); do
    ip netns del "colonys$i" 2>/dev/null || true
    ip link del "csh$i" 2>/dev/null || true
  done
  ip link del "$br" 2>/dev/null || true
  [ -z "$work" ] || rm -rf "$work"
}
trap cleanup EXIT
cleanup
work=$(mktemp -d)

ip link add "$br" type bridge
ip addr add "$prefix.254/24" dev "$br"
ip link set "$br" up
# Host 0 is the joiner (uncapped); hosts 1..donors are the donors.
for i in $(seq 0 "$donors"); do
  ns="colonys$i"
  ip netns add "$ns"
  ip link add "csh$i" type veth peer name "csn$i"
  ip link set "csn$i" netns "$ns"
  ip link set "csh$i" master "$br" up
  ip netns exec "$ns" ip addr add "$prefix.$((i + 1))/24" dev "csn$i"
  ip netns exec "$ns" ip link set "csn$i" up
  ip netns exec "$ns" ip link set lo up
  if [ "$i" -gt 0 ]; then
    ip netns exec "$ns" tc qdisc add dev "csn$i" root tbf rate "${mbit}mbit" burst 256kb latency 100ms
    tc qdisc add dev "csh$i" root tbf rate "${mbit}mbit" burst 256kb latency 100ms
  fi
done

addrs=()
for i in $(seq 1 "$donors"); do
  join() { local IFS=,; echo "$*"; }
  earlier=()
  [ ${#addrs[@]} -gt 0 ] && earlier=(--initial-peers "$(join "${addrs[@]}")")
  mkfifo "$work/in$i"
  ip netns exec "colonys$i" "$bin" --role donor --ip "$prefix.$((i + 1))" --floats "$floats" \
    "${earlier[@]}" <"$work/in$i" >"$work/out$i" 2>"$work/err$i" &
  pids+=($!)
  exec {fd}>"$work/in$i" # holds the donor's stdin open until exit
  for _ in $(seq 1 600); do
    grep -q '^READY ' "$work/out$i" 2>/dev/null && break
    sleep 0.1
  done
  addr=$(sed -n 's/^READY //p' "$work/out$i")
  [ -n "$addr" ] || { echo "donor $i did not start:" >&2; cat "$work/err$i" >&2; exit 1; }
  addrs+=("$addr")
done
join() { local IFS=,; echo "$*"; }
echo "donors: ${addrs[*]} (links ${mbit} Mbit/s each way); joiner uncapped"
ip netns exec colonys0 "$bin" --role joiner --ip "$prefix.1" --floats "$floats" --rounds "$rounds" \
  --donor-mbit "$mbit" --initial-peers "$(join "${addrs[@]}")"
