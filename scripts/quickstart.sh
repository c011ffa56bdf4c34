#!/usr/bin/env bash
# Quickstart: installs the dependencies (QEMU, containerd 2.x, runc, CNI plugins, crictl,
# the guest kernel), builds and installs Spry, then runs a sandboxed pod through crictl on a
# private containerd (its own socket and state; a system containerd is left alone) and
# prints the pod's output, which shows the guest kernel's release.
#   sudo scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "quickstart.sh: run as root (it installs packages and boots a VM)" >&2; exit 1; }

scripts/install-deps.sh
scripts/build-guest.sh
scripts/build-test-images.sh --only pause --only busybox
cargo build --release -p spry-shim --bins -p spry-integration --bin quickstart

# Install Spry into a private prefix and patch a private containerd config fragment; on a
# real node this is `spry install` with its defaults (/usr/local, /etc/containerd/config.toml).
qs=/var/lib/spry-quickstart
mkdir -p "$qs"
rm -f "$qs/containerd-handler.toml"
target/release/spry install \
    --prefix "$qs/prefix" \
    --guest-dir build/guest/current \
    --spry-config "$qs/spry.toml" \
    --containerd-config "$qs/containerd-handler.toml" >"$qs/runtimeclass.yaml"
echo "== RuntimeClass for Kubernetes (kubectl apply -f $qs/runtimeclass.yaml):"
cat "$qs/runtimeclass.yaml"

echo
echo "== running a sandboxed pod"
target/release/quickstart --handler-toml "$qs/containerd-handler.toml" --spry-config "$qs/spry.toml"
