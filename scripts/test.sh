#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need, builds the guest
# assets and every crate, then runs unit and end-to-end tests. Needs root: the
# end-to-end tests boot real VMs and drive a real containerd.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh: the end-to-end tests need root (VMs, mounts, containerd); run it as root" >&2
  exit 1
fi

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

step "install dependencies"
scripts/install-deps.sh

step "build guest assets (kernel, agent initramfs)"
scripts/build-guest.sh

step "build test images (busybox, python) into the local registry store"
scripts/build-test-images.sh

step "build"
cargo build --workspace --bins

step "format and lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

step "tests"
# Test binaries find the guest assets and our binaries through these.
export SPRY_GUEST_DIR="$PWD/build/guest/current"
export SPRY_BIN_DIR="$PWD/target/debug"
cargo test --workspace -- --test-threads=2
