#!/usr/bin/env bash
# The test command from README.md, as root: installs what a fresh Debian/Ubuntu machine lacks
# (deploy/setup.sh), then runs every test of the workspace. Arguments go to `cargo test` (say, a
# test-name filter). Once set-up has run, plain `cargo test --workspace` is the same thing.
# CI (.ci/run) runs this.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/setup.sh
exec cargo test --workspace --locked "$@"
