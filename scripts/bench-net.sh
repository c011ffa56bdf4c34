#!/usr/bin/env bash
# Pod networking through crictl and the CNI reference plugins, runc vs Spry cold vs Spry from a VM template, in
# the same run: TCP round trips and TCP throughput pod to pod, pod start with networking on, and the probed
# checks (host/pod/runc → Spry pod, template pods distinct, crictl port-forward, hostPort, IPv6, leaks).
# Writes target/bench/net.{json,md}.
#   scripts/bench-net.sh [--pods N] [--round-trips N] [--stream-mib N]   (as root)
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
entry_script
scripts/install-deps.sh
scripts/build-guest.sh
scripts/build-test-images.sh --only pause --only netprobe
cargo build --release -p spry-shim --bins -p spry-integration --bin bench-net
target/release/bench-net "$@"
