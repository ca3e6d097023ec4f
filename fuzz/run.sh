#!/usr/bin/env bash
# Runs every fuzz target for a while (default 20 s each) and fails on any crash, printing the
# input that caused it. Usage: fuzz/run.sh [seconds-per-target] [target...]
#
# Needs the nightly toolchain (the product builds on stable; libFuzzer's instrumentation needs
# nightly) and cargo-fuzz; both are installed here when missing. Each target first replays the
# inputs under fuzz/regressions/<target>/ (crashes found before), then fuzzes starting from the
# committed seeds (fuzz/seeds/<target>/) plus whatever earlier runs left in fuzz/corpus/<target>/.
# A crash leaves its input under fuzz/artifacts/<target>/; once fixed, commit that file under
# fuzz/regressions/<target>/ so that every later run replays it.
set -euo pipefail
cd "$(dirname "$0")"
fuzz_dir=$(pwd)

secs=${1:-20}
[[ $secs =~ ^[0-9]+$ ]] || { echo "usage: $0 [seconds-per-target] [target...]" >&2; exit 2; }
shift || true
all_targets=(xds_address xds_authorization xds_state connect_authority forwarded local_yaml translate path_normalize jwt cni dns)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all_targets[@]}"); fi

if ! rustup toolchain list | grep '^nightly' >/dev/null; then
  echo "fuzz: installing the nightly toolchain (rustup toolchain install nightly --profile minimal)"
  rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null; then
  echo "fuzz: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
  cargo install cargo-fuzz --locked
fi

echo "== fuzz: building ${#all_targets[@]} targets (cargo +nightly fuzz build)"
cargo +nightly fuzz build

# Prints the panic (or libFuzzer's summary) of a failed run from its log.
why() {
  { grep -m 1 -A 1 "panicked at" "$1" && grep -E "^SUMMARY" "$1"; } || tail -n 40 "$1"
}

logs=$fuzz_dir/target/fuzz-logs
mkdir -p "$logs"
failed=()
start=$SECONDS
for t in "${targets[@]}"; do
  log=$logs/$t.log
  regressions=("$fuzz_dir"/regressions/"$t"/*)
  if [ -e "${regressions[0]}" ]; then
    if ! cargo +nightly fuzz run "$t" "${regressions[@]}" >"$log" 2>&1; then
      echo "fuzz: $t: a regression input crashes again (log: $log)" >&2
      why "$log" >&2
      failed+=("$t")
      continue
    fi
    echo "fuzz: $t: ${#regressions[@]} regression input(s) pass"
  fi

  corpus=$fuzz_dir/corpus/$t
  mkdir -p "$corpus"
  cp -n "$fuzz_dir"/seeds/"$t"/* "$corpus"/ 2>/dev/null || true
  if cargo +nightly fuzz run "$t" "$corpus" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)
    execs=$(sed -nE 's/^#([0-9]+)[[:space:]]+DONE.*/\1/p' <<<"$done_line")
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$done_line")
    echo "fuzz: $t: ok, ${execs:-?} executions in ${secs}s, coverage ${cov:-?} edges, corpus $(ls "$corpus" | wc -l) inputs"
  else
    artifact=$(sed -nE 's/.*Test unit written to (.*)$/\1/p' "$log" | tail -n 1)
    echo "fuzz: $t: CRASH (log: $log)" >&2
    why "$log" >&2
    if [ -n "$artifact" ]; then
      case $artifact in /*) ;; *) artifact=$fuzz_dir/${artifact#./} ;; esac
      echo "fuzz: $t: input written to $artifact (replay in fuzz/: cargo +nightly fuzz run $t $artifact)" >&2
    fi
    failed+=("$t")
  fi
done

echo "fuzz: ${#targets[@]} target(s) in $((SECONDS - start))s of fuzzing"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}" >&2
  exit 1
fi
