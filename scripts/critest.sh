#!/usr/bin/env bash
# CRI conformance: cri-tools' whole critest suite, offline (its images built here), with runc and with
# Spry in the same run; prints both pass/fail counts and the failing specs, and writes
# target/bench/critest.json. The test command runs the same comparison as a test (critest_full).
#   scripts/critest.sh   (as root)
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
entry_script
scripts/install-deps.sh
scripts/build-guest.sh
scripts/build-test-images.sh
scripts/build-test-images.sh --only critest
cargo build --release -p spry-shim --bins -p spry-integration --bin critest-compare
target/release/critest-compare
