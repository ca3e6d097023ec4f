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
# The one list of packages (iperf3, taskset, iproute2, ...) lives in the set-up script.
deploy/setup.sh

bins=(--bin ztunnel --bin waypoint --bin xds-server --bin mesh-bench --bin state-bench)
if [ "${1:-}" = "--smoke" ]; then
  cargo build --quiet "${bins[@]}"
  out=$(mktemp -d)
  target/debug/mesh-bench run --smoke --bin-dir target/debug --out "$out"
  cat "$out"/*.md
  rm -rf "$out"
else
  echo "== building release binaries"
  AMBIENT_PACK_RELOCS=1 cargo build --release --quiet "${bins[@]}"
  target/release/mesh-bench run --bin-dir target/release --out benches/results
fi
