#!/usr/bin/env bash
# VM benchmark: medians of >= 5 runs of VM start → agent ready, container start, and
# host RSS/PSS of a VM with an idle container. Writes target/bench/vm.{json,md}.
#   scripts/bench-vm.sh [--runs N]   (as root)
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
entry_script
[ -e build/guest/current/vmlinux ] || scripts/build-guest.sh
cargo build --release -p spry-integration --bin bench-vm
SPRY_GUEST_DIR="$PWD/build/guest/current" target/release/bench-vm "$@"
