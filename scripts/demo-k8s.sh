#!/usr/bin/env bash
# A one-node Kubernetes cluster with Spry to try by hand: builds what it needs (like the quickstart, plus the Kubernetes
# binaries of scripts/build-k8s.sh), then runs the cluster in the foreground and prints the kubectl commands to try.
# Ctrl-C (or `scripts/demo-k8s.sh --stop` from another shell) tears it down and removes everything it made.
#   scripts/demo-k8s.sh [--stop]   (as root)
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
entry_script

PID_FILE=/run/spry-k8s-demo.pid

if [ "${1:-}" = --stop ]; then
    [ -f "$PID_FILE" ] || die "no demo cluster is running ($PID_FILE is absent)"
    pid=$(cat "$PID_FILE")
    kill -TERM "$pid" 2>/dev/null || die "the demo (pid $pid) is not running; remove $PID_FILE"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.5; done
    log "demo cluster stopped"
    exit 0
fi
[ $# -eq 0 ] || die "unknown argument '$1' (usage: scripts/demo-k8s.sh [--stop])"

timed "install dependencies" scripts/install-deps.sh --no-critest
timed "build the Kubernetes node" scripts/build-k8s.sh
timed "build the guest" scripts/build-guest.sh
timed "build test images (pause, busybox)" scripts/build-test-images.sh --only pause --only busybox
timed "build Spry (release)" cargo build --release -p spry-shim --bins -p spry-integration --bin k8s-demo
print_timings
SPRY_BIN_DIR="$PWD/target/release" exec target/release/k8s-demo
