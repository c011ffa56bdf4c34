#!/usr/bin/env bash
# Soak: pod lifecycles through crictl on one containerd (template and cold Spry pods in
# turn, a long-lived pod alongside), with a census of leaks every 50 cycles.
#
#   scripts/soak.sh [--cycles N] [--parallel P]     (root; default 500 cycles, 1 at a time)
#
# Writes target/bench/soak.{json,md}.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
entry_script

scripts/install-deps.sh
scripts/build-guest.sh
scripts/build-test-images.sh --only pause --only busybox
cargo build --release -p spry-shim --bins -p spry-integration --bin soak
target/release/soak "$@"
