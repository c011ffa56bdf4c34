#!/usr/bin/env bash
# Pods under a real kubelet (a one-node cluster, scripts/build-k8s.sh), runc vs Spry cold vs Spry from a VM template,
# in the same run: bare pod → Ready (p50/p95 of N one after another), a Deployment of R replicas → Available,
# `kubectl set image` → new container Ready, and checks from real probes (same pod UID and VM after the image swap,
# imageID changed, liveness restart in the same VM, no leaks). Writes target/bench/k8s.{json,md}.
#   scripts/bench-k8s.sh [--pods N] [--replicas R]   (as root)
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
entry_script
scripts/install-deps.sh --no-critest
scripts/build-k8s.sh
scripts/build-guest.sh
scripts/build-test-images.sh
cargo build --release -p spry-shim --bins -p spry-integration --bin bench-k8s
SPRY_BIN_DIR="$PWD/target/release" target/release/bench-k8s "$@"
