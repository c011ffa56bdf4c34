#!/usr/bin/env bash
# Quickstart: installs the dependencies, builds Spry and its guest, then runs a container
# in a microVM and prints the guest kernel's release (not the host's).
#   sudo scripts/quickstart.sh
# (The containerd/crictl quickstart arrives with the shim; this drives the VM directly.)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "quickstart.sh: run as root (it installs packages and boots a VM)" >&2; exit 1; }

scripts/install-deps.sh
scripts/build-guest.sh
cargo build --release -p spry-shim --bin spry

work=$(mktemp -d /tmp/spry-quickstart.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/rootfs/bin" "$work/rootfs/proc" "$work/rootfs/sys" "$work/rootfs/dev" "$work/rootfs/tmp"
cp /bin/busybox "$work/rootfs/bin/busybox"
# Relative links: `busybox --install` would point them at this host path.
for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$work/rootfs/bin/$applet"
done
cat >"$work/config.toml" <<TOML
state_dir = "/run/spry"
[vm]
kernel = "$PWD/build/guest/current/vmlinux"
initramfs = "$PWD/build/guest/current/initramfs.img"
TOML

echo
echo "== running a container in a Spry microVM"
target/release/spry --config "$work/config.toml" vm run --rootfs "$work/rootfs" -- \
    sh -c 'echo "hello from a Spry microVM"; echo "guest kernel: $(uname -r)"; echo "host kernel is different: '"$(uname -r)"'"'
