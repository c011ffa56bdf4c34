#!/usr/bin/env bash
# Pod start through crictl, runc vs Spry cold vs Spry from a VM template, in the same run: p50/p95 of N serial and N
# parallel pods (runp → create → start → first log line) and idle-pod PSS.
# Writes target/bench/podstart.{json,md}.
#   scripts/bench-podstart.sh [--pods N] [--only runc,spry,spry_template] [--image python:1]   (as root)
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
entry_script
scripts/install-deps.sh
scripts/build-guest.sh
case " $* " in
    *" --image "*) scripts/build-test-images.sh ;;  # e.g. --image python:1
    *) scripts/build-test-images.sh --only pause --only busybox ;;
esac
cargo build --release -p spry-shim --bins -p spry-integration --bin bench-podstart
target/release/bench-podstart "$@"
