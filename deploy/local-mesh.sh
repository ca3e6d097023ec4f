#!/usr/bin/env bash
# The local mesh on this machine, on embedded defaults: the in-repo control plane serving
# deploy/local-mesh.yaml, and one ztunnel per simulated node (node-a, node-b) syncing from it
# over delta ADS. It shows both nodes syncing, a live config change reaching them, and their
# readiness, config dump and xDS metrics; then it stops everything (pass --keep to leave it
# running until Ctrl-C).
#
# What this does not show yet: pods, eBPF capture and HBONE traffic; those arrive with the
# ztunnel data-plane work and will be added here.
set -euo pipefail
cd "$(dirname "$0")/.."

keep=false
[ "${1:-}" = "--keep" ] && keep=true

command -v curl >/dev/null || { echo "local-mesh: curl is needed (apt-get install curl)" >&2; exit 1; }

echo "==> building (first run takes a few minutes)"
cargo build --quiet --bin xds-server --bin ztunnel

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

cp deploy/local-mesh.yaml "$work/mesh.yaml"
XDS=127.0.0.1:15010
echo "==> control plane on $XDS serving $work/mesh.yaml"
target/debug/xds-server --listen "$XDS" --config "$work/mesh.yaml" 2>"$work/xds-server.log" &
pids+=($!)

# node-a uses Istio's default ports; node-b shifts them by 1000 (both share this host).
start_ztunnel() { # name admin metrics readiness
  target/debug/ztunnel --xds-address "http://$XDS" --node-name "$1" --pod-name "ztunnel-$1" \
    --admin-addr "127.0.0.1:$2" --metrics-addr "127.0.0.1:$3" --readiness-addr "127.0.0.1:$4" \
    2>"$work/ztunnel-$1.log" &
  pids+=($!)
}
start_ztunnel node-a 15000 15020 15021
start_ztunnel node-b 16000 16020 16021

wait_ready() { # name readiness-port
  for _ in $(seq 1 200); do
    if curl -fsS "http://127.0.0.1:$2/healthz/ready" >/dev/null 2>&1; then
      echo "    $1: $(curl -sS "http://127.0.0.1:$2/healthz/ready")"
      return 0
    fi
    sleep 0.1
  done
  echo "$1 never became ready; its log:" >&2
  cat "$work/ztunnel-$1.log" >&2
  return 1
}
echo "==> waiting for both ztunnels to sync"
wait_ready node-a 15021
wait_ready node-b 16021

held() { # admin-port: resource names held, one line each
  curl -sS "http://127.0.0.1:$1/config_dump" | python3 -c '
import json, sys
d = json.load(sys.stdin)
for url, names in d["resources"].items():
    for n in names:
        print("      %-40s %s" % (url.rsplit("/", 1)[1], n))'
}
echo "==> node-a holds:"
held 15000

echo "==> live change: echo-2 leaves the mesh and a DENY policy arrives"
python3 - "$work/mesh.yaml" <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
start = text.index("  - name: echo-2")
end = text.index("  - name: intruder")
text = text[:start] + text[end:]
text += """  - name: deny-intruder
    namespace: demo
    scope: NAMESPACE
    action: DENY
    rules: [{clauses: [{matches: [{principals: [{exact: cluster.local/ns/other/sa/intruder}]}]}]}]
"""
open(path, "w").write(text)
PY
for _ in $(seq 1 100); do
  a=$(held 15000); b=$(held 16000)
  if ! grep -q echo-2 <<<"$a$b" && grep -q deny-intruder <<<"$a" && grep -q deny-intruder <<<"$b"; then break; fi
  sleep 0.1
done
echo "==> node-b now holds:"
held 16000

echo "==> node-a xDS metrics (http://127.0.0.1:15020/metrics):"
curl -sS http://127.0.0.1:15020/metrics | grep -E '^istio_(xds|build)' | sed 's/^/      /'

if $keep; then
  echo "==> running; Ctrl-C stops. Logs in $work"
  wait
fi
echo "==> done"
