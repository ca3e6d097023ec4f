#!/usr/bin/env bash
# Installs what this project needs on a Debian or Ubuntu machine that already has Rust: Debian
# packages (apt-get, as root) and Python packages (pip). The one list of both: the demo
# (deploy/local-mesh.sh), the test entry point (tests/run.sh) and CI (.ci/run) all call this, so
# they cannot drift. Idempotent; quick when everything is present.
#
#   deploy/setup.sh           install what is missing (as root); one line per thing it installs,
#                             or "setup: nothing to install"
#   deploy/setup.sh --check   install nothing; list what is missing and exit 1 if anything is
set -euo pipefail

# Debian packages: clang, llvm and libbpf-dev compile the eBPF programs (ebpf/build.rs); iproute2
# builds the network namespaces and the routing rule the redirector installs; procps (sysctl) turns
# on forwarding in them; bpftool inspects pinned eBPF objects; curl is for the demo and the
# waypoint test; iperf3, wrk, h2load (nghttp2-client), nginx (nginx-light), valgrind (callgrind's
# instruction counts) and taskset (util-linux) are for the benchmark runner. The proto crate
# uses protox (pure Rust), so no system protoc is needed. containernetworking-plugins (bridge,
# ptp, host-local) drive the CNI plugin test; buildah, skopeo and umoci build and check the OCI
# images without a container daemon (deploy/images/build.sh). dig (bind9-dnsutils) queries the DNS
# proxy in its test, and dnsmasq (dnsmasq-base: the program without a system service) plays the
# upstream resolver there. systemd (systemd-analyze) checks the VM's unit file; nsenter and setpriv
# (util-linux) run the host-mode test's VM processes in a cgroup with the unit's capabilities.
packages=(curl clang llvm libbpf-dev iproute2 iperf3 util-linux bpftool procps
  containernetworking-plugins buildah skopeo umoci wrk nghttp2-client nginx-light valgrind
  bind9-dnsutils dnsmasq-base systemd)
# The same needs as commands or files, for a machine without dpkg.
needs=(curl clang llvm-objdump /usr/include/bpf/bpf_helpers.h ip iperf3 taskset bpftool sysctl
  /usr/lib/cni/host-local buildah skopeo umoci wrk h2load nginx valgrind dig dnsmasq
  systemd-analyze nsenter setpriv)

# Python packages, as "import-name:pip-name": the waypoint test checks a gRPC client from an
# independent implementation, Python's grpcio.
# kubernetes-validate checks the rendered Kubernetes manifests against the API's schemas.
python_packages=(grpc:grpcio kubernetes_validate:kubernetes-validate)

check_only=false
case "${1:-}" in
  "") ;;
  --check) check_only=true ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

say() { echo "setup: $*"; }
fail() { echo "setup: $*" >&2; exit 1; }

command -v cargo >/dev/null \
  || fail "cargo is missing: install Rust (https://rustup.rs) and make sure cargo is on PATH (also under sudo)"

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
# Prints the pip names of the Python packages python3 cannot import.
missing_python() {
  local entry
  for entry in "${python_packages[@]}"; do
    python3 -c "import ${entry%%:*}" 2>/dev/null || echo "${entry#*:}"
  done
}

if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
  # Not Debian: check what we can, and say what is needed rather than guess a package manager.
  absent=()
  for need in "${needs[@]}"; do
    if [[ $need == /* ]]; then [ -e "$need" ] || absent+=("$need"); else command -v "$need" >/dev/null || absent+=("$need"); fi
  done
  if command -v python3 >/dev/null; then
    mapfile -t py < <(missing_python)
    for p in "${py[@]}"; do absent+=("python:$p"); done
  else
    absent+=(python3)
  fi
  if [ ${#absent[@]} -eq 0 ]; then
    say "nothing to install"
    exit 0
  fi
  fail "no apt-get here, so this script cannot install anything. Missing: ${absent[*]}.
setup: needed: clang and llvm (eBPF compiler), libbpf headers (/usr/include/bpf), iproute2 (ip),
setup: curl, iperf3, wrk, h2load, nginx, valgrind, taskset (util-linux), bpftool, sysctl (procps), the CNI reference plugins
setup: (/usr/lib/cni), buildah, skopeo, umoci, python3 with pip package(s):
setup: ${python_packages[*]#*:}. Install them with your package manager, then run this again."
fi

missing=()
for p in "${packages[@]}"; do installed "$p" || missing+=("$p"); done
# Python itself may be absent on a minimal Debian, and Debian ships pip separately: both are
# needed only when a Python package is.
py_missing=()
if ! command -v python3 >/dev/null; then
  missing+=(python3 python3-pip)
  py_missing=("${python_packages[@]#*:}")
else
  mapfile -t py_missing < <(missing_python)
  [ ${#py_missing[@]} -eq 0 ] || python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
fi

if [ ${#missing[@]} -eq 0 ] && [ ${#py_missing[@]} -eq 0 ]; then
  say "nothing to install"
  exit 0
fi

describe() {
  [ ${#missing[@]} -eq 0 ] || echo "setup: missing Debian packages: ${missing[*]}"
  [ ${#py_missing[@]} -eq 0 ] || echo "setup: missing Python packages (pip): ${py_missing[*]}"
}
if $check_only; then
  describe >&2
  fail "run ./deploy/setup.sh as root to install them"
fi
if [ "$(id -u)" != 0 ]; then
  describe >&2
  fail "installing them needs root: run 'sudo ./deploy/setup.sh' (or this script as root)"
fi

log=$(mktemp)
# Packages must not start daemons (nginx-light would start one): without a policy-rc.d of the
# machine's own, one that forbids starting services is in place during `apt-get install` only.
# Ours carries a marker, so one a killed run left behind is recognised and removed.
policy=/usr/sbin/policy-rc.d
marker="# ambient-mesh setup.sh: temporary"
own_policy=
drop_policy() { if [ -n "$own_policy" ]; then rm -f "$policy"; own_policy=; fi; }
trap 'rm -f "$log"; drop_policy' EXIT
if [ -e "$policy" ] && grep -qF "$marker" "$policy"; then rm -f "$policy"; fi
# Shows the captured output of a failed step, then stops.
step_failed() { cat "$log" >&2; fail "$1 failed (its output is above)"; }

if [ ${#missing[@]} -gt 0 ]; then
  for p in "${missing[@]}"; do say "installing $p (Debian package)"; done
  apt-get update -qq >"$log" 2>&1 || step_failed "apt-get update"
  if [ ! -e "$policy" ]; then
    own_policy=1
    printf '#!/bin/sh\n%s\nexit 101\n' "$marker" >"$policy" && chmod 755 "$policy"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=120 "${missing[@]}" \
    >"$log" 2>&1 || step_failed "apt-get install ${missing[*]}"
  drop_policy
  mapfile -t py_missing < <(missing_python)
fi

if [ ${#py_missing[@]} -gt 0 ]; then
  for p in "${py_missing[@]}"; do say "installing $p (pip)"; done
  if ! python3 -m pip install --quiet "${py_missing[@]}" >"$log" 2>&1; then
    # A Debian python3 is "externally managed" (PEP 668): pip refuses unless told otherwise.
    grep -q externally-managed-environment "$log" || step_failed "pip install ${py_missing[*]}"
    python3 -m pip install --quiet --break-system-packages "${py_missing[@]}" >"$log" 2>&1 \
      || step_failed "pip install --break-system-packages ${py_missing[*]}"
  fi
fi

# Installed is not the same as usable (say, pip installed into another python3): check again.
still=()
for p in "${packages[@]}"; do installed "$p" || still+=("$p"); done
mapfile -t -O ${#still[@]} still < <(missing_python)
[ ${#still[@]} -eq 0 ] || fail "still missing after installing: ${still[*]}"
say "done"
