#!/usr/bin/env bash
# The test command from README.md, as root: installs what a fresh Debian/Ubuntu machine lacks
# (deploy/setup.sh), then runs every test of the workspace. Arguments go to `cargo test` (say, a
# test-name filter). Once set-up has run, plain `cargo test --workspace` is the same thing.
# CI (.ci/run) runs this.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/setup.sh
# The CNI test runs the plugin binary as a container runtime would; `cargo test` builds only the
# binaries of packages with integration tests, so build it first.
cargo build --locked --quiet -p ambient-cni --bin ambient-cni
exec cargo test --workspace --locked "$@"
