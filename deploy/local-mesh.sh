#!/usr/bin/env bash
# The local mesh on this machine, on embedded defaults (needs root: network namespaces, eBPF).
#
# Two simulated nodes (network namespaces joined by a veth link) and four pods wired to them:
#
#   node-a (10.0.0.1)                      node-b (10.0.0.2)
#     client    10.42.1.2  demo/client       echo-2    10.43.1.2  demo/echo
#     echo-1    10.42.2.2  demo/echo         intruder  10.43.2.2  other/intruder
#                                            waypoint  10.43.5.2  demo/waypoint
#
# The in-repo control plane (in node-a) serves deploy/local-mesh.yaml over delta ADS; one ztunnel
# per node captures its pods' traffic with eBPF and carries it over HBONE (mTLS, certificates from
# a local CA both nodes share). The script shows mTLS between nodes, the service VIP balanced over
# both nodes, a connection denied by policy, a policy change arriving live, HTTP through the
# namespace's waypoint with a header route, and the metrics; then drains the proxies and removes
# everything (pass --keep to leave it running until Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."

keep=false
[ "${1:-}" = "--keep" ] && keep=true

if [ "$(id -u)" != 0 ]; then
  echo "local-mesh: needs root (network namespaces and eBPF); run it as root or with sudo" >&2
  exit 1
fi
# Installs what is missing (iproute2, curl, clang and libbpf-dev for the eBPF build, ...).
deploy/setup.sh

echo "==> building (the first run takes a few minutes)"
cargo build --quiet --bin xds-server --bin ztunnel --bin waypoint --bin mesh-demo
bin=$PWD/target/debug

work=$(mktemp -d)
tag=lm$$
pids=()
namespaces=()
ztunnel_nodes=()
# ztunnel pins its capture on a BPF filesystem. `ip netns exec` hides /sys/fs/bpf, so the demo
# mounts one under /run, in this mount namespace, where the nodes' processes see it.
pins=/run/ambient-mesh-demo/bpf
mkdir -p "$pins"
mountpoint -q "$pins" || mount -t bpf bpf "$pins"
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  # ztunnel drains for up to 5 s on SIGTERM; anything still alive after 8 s is killed.
  for _ in $(seq 1 80); do
    alive=false
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=true; done
    $alive || break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # Capture is pinned and outlives ztunnel (pods fail closed); taking the mesh off a node is
  # an explicit uninstall.
  for node in "${ztunnel_nodes[@]}"; do
    ip netns exec "$tag-$node" "$bin/ztunnel" uninstall --bpf-pin-dir "$pins/$tag-$node" 2>&1 | grep -o 'removed=.*' | sed "s/^/    $node: capture uninstalled, /" || true
  done
  for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "/etc/netns/$tag-client"
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

netns() { # name -> creates the namespace with loopback up
  ip netns add "$tag-$1"
  namespaces+=("$tag-$1")
  ip -n "$tag-$1" link set lo up
}
in_ns() { local ns=$1; shift; ip netns exec "$tag-$ns" "$@"; }
# Runs a program in a namespace in the background; its pid (not a subshell's) goes to $pids.
spawn_in() { # ns log program args...
  local ns=$1 log=$2; shift 2
  (exec ip netns exec "$tag-$ns" "$@" 2>"$log") &
  pids+=($!)
}
pod() { # node pod host-if subnet: veth pair, pod = <subnet>.2, node side = <subnet>.1
  netns "$2"
  ip link add "$3" netns "$tag-$1" type veth peer name eth0 netns "$tag-$2"
  ip -n "$tag-$1" addr add "$4.1/24" dev "$3"
  ip -n "$tag-$1" link set "$3" up
  ip -n "$tag-$2" addr add "$4.2/24" dev eth0
  ip -n "$tag-$2" link set eth0 up
  ip -n "$tag-$2" route add default via "$4.1"
}

echo "==> network: two nodes, five pods"
netns node-a
netns node-b
ip link add link-a netns "$tag-node-a" type veth peer name link-b netns "$tag-node-b"
ip -n "$tag-node-a" addr add 10.0.0.1/24 dev link-a
ip -n "$tag-node-b" addr add 10.0.0.2/24 dev link-b
ip -n "$tag-node-a" link set link-a up
ip -n "$tag-node-b" link set link-b up
pod node-a client v-client 10.42.1
pod node-a echo-1 v-echo1 10.42.2
pod node-b echo-2 v-echo2 10.43.1
pod node-b intruder v-intr 10.43.2
pod node-b waypoint v-wp 10.43.5
ip -n "$tag-node-a" route add 10.43.0.0/16 via 10.0.0.2
ip -n "$tag-node-b" route add 10.42.0.0/16 via 10.0.0.1
in_ns node-a sysctl -q -w net.ipv4.ip_forward=1
in_ns node-b sysctl -q -w net.ipv4.ip_forward=1
for p in echo-1 echo-2 intruder; do
  spawn_in "$p" "$work/$p.log" "$bin/mesh-demo" serve --name "$p"
done
for p in echo-1 echo-2; do
  spawn_in "$p" "$work/$p-http.log" "$bin/mesh-demo" http-serve --name "$p"
done

cp deploy/local-mesh.yaml "$work/mesh.yaml"
echo "==> control plane on 10.0.0.1:15010 (in node-a) serving $work/mesh.yaml"
spawn_in node-a "$work/xds-server.log" "$bin/xds-server" --listen 10.0.0.1:15010 --config "$work/mesh.yaml"

wait_ready() { # ns what log
  for _ in $(seq 1 300); do
    if in_ns "$1" curl -fsS http://127.0.0.1:15021/healthz/ready >/dev/null 2>&1; then
      echo "    $2 ready"
      return 0
    fi
    sleep 0.1
  done
  echo "$2 never became ready; its log:" >&2
  cat "$3" >&2
  return 1
}
start_ztunnel() { # node
  ztunnel_nodes+=("$1")
  spawn_in "$1" "$work/ztunnel-$1.log" "$bin/ztunnel" --xds-address http://10.0.0.1:15010 \
    --node-name "$1" --local-ca "$work/ca" --redirect --uplink '*' --bpf-pin-dir "$pins/$tag-$1"
  wait_ready "$1" "ztunnel on $1 (xDS synced, workload certificates issued)" "$work/ztunnel-$1.log"
}
echo "==> one ztunnel per node, eBPF capture on, local CA in $work/ca"
start_ztunnel node-a
start_ztunnel node-b
enrolled() { in_ns "$1" curl -fsS http://127.0.0.1:15000/config_dump 2>/dev/null | grep -q "\"$2\": *\"$3\""; }
for _ in $(seq 1 100); do
  if enrolled node-a 10.42.1.2 v-client && enrolled node-b 10.43.2.2 v-intr; then break; fi
  sleep 0.1
done

talk() { local from=$1; shift; in_ns "$from" "$bin/mesh-demo" talk "$@"; }
# The first line of the files matching a pattern, waited for up to 2 s: the proxies' log lines
# reach their files from a writer thread within 50 ms.
log_line() {
  local pattern=$1 _
  shift
  for _ in $(seq 1 20); do
    if grep -h -m1 "$pattern" "$@" 2>/dev/null | head -1 | grep .; then return 0; fi
    sleep 0.1
  done
  return 0
}

echo "==> client (node-a) -> echo-2 (node-b) at 10.43.1.2:8080, through both ztunnels over HBONE"
talk client 10.43.1.2:8080 --line "hello over mTLS"
echo "    node-b's access log: the server side knows the client's identity"
log_line 'direction="inbound"' "$work/ztunnel-node-b.log" | grep -o 'src.identity=[^ ]*' | head -1 | sed 's/^/      /' || true

echo "==> client -> service echo (VIP 10.96.0.80:80), balanced over echo-1 (node-a) and echo-2 (node-b)"
talk client 10.96.0.80:80 --count 20

echo "==> intruder (namespace other) -> echo: policy demo-only admits namespace demo only"
talk intruder 10.96.0.80:80
log_line 'connection denied by policy' "$work"/ztunnel-node-*.log | sed 's/^.*WARN/     /'

echo "==> live change over xDS: an ALLOW policy for the intruder's principal"
cat >>"$work/mesh.yaml" <<'YAML'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-intruder, namespace: demo}
spec:
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/other/sa/intruder]}}]}]
YAML
for _ in $(seq 1 100); do
  a=$(in_ns node-a curl -fsS http://127.0.0.1:15000/config_dump || true)
  b=$(in_ns node-b curl -fsS http://127.0.0.1:15000/config_dump || true)
  if grep -q '"demo/allow-intruder"' <<<"$a" && grep -q '"demo/allow-intruder"' <<<"$b"; then break; fi
  sleep 0.1
done
talk intruder 10.96.0.80:80 --line "let me in"

echo "==> the waypoint of namespace demo (in its own pod on node-b), same control plane and CA"
spawn_in waypoint "$work/waypoint.log" "$bin/waypoint" --xds-address http://10.0.0.1:15010 \
  --local-ca "$work/ca" --name waypoint --namespace demo --address 10.43.5.2 \
  --log-format json --access-log "$work/waypoint-access.log"
wait_ready waypoint "waypoint demo/waypoint (routes synced, certificate issued)" "$work/waypoint.log"
echo "==> HTTP: client -> web (10.96.0.90) -> ztunnel -> waypoint -> ztunnel -> echo pods"
for _ in $(seq 1 10); do in_ns client curl -sS --max-time 5 http://10.96.0.90/hello; done |
  awk '{print $1}' | sort | uniq -c | sed 's/^ */      /; s/$/ (HTTPRoute web, rule 2: both pods)/'
echo "    with x-canary: yes (HTTPRoute web, rule 1: service web-canary, echo-2 only, response header x-route: canary)"
for _ in $(seq 1 5); do in_ns client curl -sS --max-time 5 -H 'x-canary: yes' http://10.96.0.90/hello; done |
  awk '{print $1}' | sort | uniq -c | sed 's/^ */      /'
in_ns client curl -sS --max-time 5 -o /dev/null -D - -H 'x-canary: yes' http://10.96.0.90/hello |
  { grep -i '^x-route' || true; } | sed 's/^/      /'
echo "    one line of the waypoint's JSON access log:"
head -1 "$work/waypoint-access.log" | cut -c1-400 | sed 's/^/      /'
echo "    waypoint metrics: requests by route destination"
in_ns waypoint curl -fsS http://127.0.0.1:15020/metrics |
  { grep -E '^istio_requests_total' || true; } | while read -r line; do
    labels=$(grep -oE '(destination_service|response_code|source_principal)="[^"]*"' <<<"$line" | paste -sd' ')
    echo "      ${line##* } x $labels"
  done

echo "==> DNS: the client's resolv.conf names 10.96.0.10, which nobody serves; its captured queries"
echo "    are answered by node-a's ztunnel, from that address, with the mesh's names"
mkdir -p "/etc/netns/$tag-client"
printf 'search demo.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5 timeout:2 attempts:1\n' \
  >"/etc/netns/$tag-client/resolv.conf"
in_ns client getent hosts web | sed 's/^/      getent hosts web: /'
in_ns client curl -sS --max-time 5 http://web/hello | sed 's/^/      curl http:\/\/web\/hello: /'
in_ns node-a curl -fsS http://127.0.0.1:15020/metrics | { grep -E '^istio_dns_requests_total' || true; } |
  sed 's/^/      node-a: /'

echo "==> node-b metrics (http://127.0.0.1:15020/metrics in node-b), connections it served:"
in_ns node-b curl -fsS http://127.0.0.1:15020/metrics |
  { grep -E '^istio_tcp_connections_opened_total\{reporter="destination"' || true; } | while read -r line; do
    labels=$(grep -oE '(source_principal|destination_workload|connection_security_policy)="[^"]*"' <<<"$line" | paste -sd' ')
    echo "      ${line##* } x $labels"
  done
echo "==> authorization decisions on node-a and node-b:"
for n in node-a node-b; do
  in_ns "$n" curl -fsS http://127.0.0.1:15020/metrics | { grep -E '^istio_authorization_decisions_total' || true; } |
    sed "s/^/      $n: /"
done

if $keep; then
  echo "==> running; Ctrl-C stops. Logs in $work; e.g. ip netns exec $tag-client $bin/mesh-demo talk 10.96.0.80:80"
  wait
fi
echo "==> draining the proxies and removing the namespaces"
