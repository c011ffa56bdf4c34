#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need, builds the guest
# assets and every crate, then runs unit and end-to-end tests. Needs root: the
# end-to-end tests boot real VMs and drive a real containerd.
#   scripts/test.sh   (as root)
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
entry_script

lint() {
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
}

run_tests() {
    # Test binaries find the guest assets and our binaries through these.
    SPRY_GUEST_DIR="$PWD/build/guest/current" SPRY_BIN_DIR="$PWD/target/debug" \
        cargo test --workspace -- --test-threads=2
}

timed "install dependencies" scripts/install-deps.sh
timed "build the Kubernetes node (kubelet, apiserver, etcd...)" scripts/build-k8s.sh
timed "build guest assets (kernel, agent initramfs)" scripts/build-guest.sh
timed "build test images (pause, busybox, python)" scripts/build-test-images.sh
timed "build critest's images (critest_full runs the whole suite)" scripts/build-test-images.sh --only critest
timed "build" cargo build --workspace --bins
timed "format and lint" lint
# The set-up's timings now: cargo test's summary stays the last thing printed.
print_timings
log "==> tests"
run_tests
