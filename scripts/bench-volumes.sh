#!/usr/bin/env bash
# Pod volumes through crictl, runc vs Spry cold vs Spry from a VM template, in the same run:
# sequential write/read and small-file throughput on a hostPath dir and an emptyDir, and how
# soon an atomic configMap swap on the host is seen in the container; plus probed checks
# (host↔guest writes, read-only enforced, no torn configMap read, leaks).
# Writes target/bench/volumes.{json,md}.
#   scripts/bench-volumes.sh [--file-mib N] [--files N] [--updates N]   (as root)
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
entry_script
scripts/install-deps.sh
scripts/build-guest.sh
scripts/build-test-images.sh --only pause --only busybox
cargo build --release -p spry-shim --bins -p spry-integration --bin bench-volumes
target/release/bench-volumes "$@"
