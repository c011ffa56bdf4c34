#!/usr/bin/env bash
# CRI conformance (cri-tools' critest, the specs that can run offline) with runc and with
# Spry in the same run; prints both pass/fail counts and the failing specs, and writes
# target/bench/critest.json. Too slow for CI under TCG (every Spry spec boots a VM).
#   sudo scripts/critest.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "critest.sh: run as root" >&2; exit 1; }
scripts/install-deps.sh
scripts/build-guest.sh
scripts/build-test-images.sh
cargo build --release -p spry-shim --bins -p spry-integration --bin critest-compare
target/release/critest-compare
