#!/usr/bin/env bash
# In-place image swap through crictl, runc vs Spry cold vs Spry from a VM template, in the same run:
# kubelet's sequence (image not on the node, and pulled beforehand), recreating the pod, `spry upgrade`
# and its rollback, downtime measured by a client polling the pod's port every 10 ms.
# Writes target/bench/upgrade.{json,md}; with --snapshotter spry (containerd unpacking through
# spry-snapshotter with vm_images, which builds each pulled layer's erofs image for VMs),
# target/bench/upgrade-spry-snapshotter.{json,md}.
#   scripts/bench-upgrade.sh [--snapshotter overlayfs|spry]   (as root)
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
entry_script
scripts/install-deps.sh
scripts/build-guest.sh
scripts/build-test-images.sh
scripts/build-test-images.sh --only webapp
cargo build --release -p spry-shim --bins -p spry-snapshotter -p spry-integration --bin bench-upgrade
SPRY_SNAPSHOTTER_BIN="$SPRY_ROOT/target/release/spry-snapshotter" target/release/bench-upgrade "$@"
