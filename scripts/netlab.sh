#!/usr/bin/env bash
# Runs the network lab's scenarios (tools/tests/netlab.rs) on the real
# `colony` binary: hosts as network namespaces on a bridge, NAT routers with
# nftables, tc tbf link caps. Needs root, iproute2 and nftables; everything
# it creates is removed when each scenario ends, also on failure.
#
#   scripts/netlab.sh            # every scenario
#   scripts/netlab.sh d_         # the scenarios whose name contains d_
#
# COLONY_LAB_LOG sets RUST_LOG of the lab's processes (default
# info,libp2p=warn); a failing scenario prints every host's log tail.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "the network lab needs root (ip netns)" >&2
  exit 1
fi
exec cargo test -p colony-tools --test netlab -- --nocapture "$@"
