#!/usr/bin/env bash
# The benchmark suite, as root: builds release binaries, builds two nodes and pods in network
# namespaces, measures every scenario directly and through the mesh in the same run, and writes
# benches/results/<date>-<commit>.{md,json}. Takes about 10 minutes on a 2-core machine.
#
#   benches/run.sh           the full run (the report is committed)
#   benches/run.sh --smoke   a few seconds of everything with debug binaries (CI), report in a temp dir
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "benches/run.sh: needs root (network namespaces, eBPF)" >&2
  exit 1
fi
missing=()
for p in iperf3 curl util-linux iproute2; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

bins=(--bin ztunnel --bin waypoint --bin xds-server --bin mesh-bench)
if [ "${1:-}" = "--smoke" ]; then
  cargo build --quiet "${bins[@]}"
  out=$(mktemp -d)
  target/debug/mesh-bench run --smoke --bin-dir target/debug --out "$out"
  cat "$out"/*.md
  rm -rf "$out"
else
  echo "== building release binaries"
  cargo build --release --quiet "${bins[@]}"
  target/release/mesh-bench run --bin-dir target/release --out benches/results
fi
