#!/usr/bin/env bash
# Quickstart: installs the dependencies (QEMU, containerd 2.x, runc, CNI plugins, crictl,
# the guest kernel), builds and installs Spry, then runs a sandboxed pod through crictl on a
# private containerd (its own socket and state; a system containerd is left alone), prints
# the pod's output, which shows the guest kernel's release, and leaves that containerd
# running to try Spry with crictl. Run as root:
#
#   scripts/quickstart.sh            install, build, run a pod (first run ~15 min on 2 cores)
#   scripts/quickstart.sh --stop     stop the quickstart's containerd (its pods and VMs too)
#   scripts/quickstart.sh --clean    --stop, then remove /var/lib/spry-quickstart
#
# It builds only what the pod needs: the test images pause and busybox, the release
# binaries, the guest. Later runs reuse every build and take well under a minute.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
entry_script

QS=/var/lib/spry-quickstart
QS_RUN=/run/spry-quickstart
QUICKSTART_BIN=target/release/quickstart

build_quickstart_bin() {
    cargo build --release -p spry-shim --bins -p spry-integration --bin quickstart
}

# Stops a containerd an earlier run left (its record is in $QS_RUN): needs the quickstart
# binary, which is rebuilt only when there is something to stop and it is gone.
stop_quickstart() {
    if [ ! -e "$QS_RUN/instance.json" ]; then
        log "no quickstart containerd is running"
        return
    fi
    [ -x "$QUICKSTART_BIN" ] || build_quickstart_bin
    "$QUICKSTART_BIN" stop --home "$QS"
}

case "${1:-}" in
    "") ;;
    --stop)
        stop_quickstart
        exit 0
        ;;
    --clean)
        stop_quickstart
        rm -rf "$QS" "$QS_RUN"
        log "removed $QS (build outputs in build/ and target/ are kept)"
        exit 0
        ;;
    *) die "unknown argument '$1' (usage: scripts/quickstart.sh [--stop|--clean])" ;;
esac

install_spry() {
    # On a real node this is `spry install` with its defaults (/usr/local,
    # /etc/containerd/config.toml); here a private prefix and a containerd config fragment,
    # checked against the containerd 2.x install-deps.sh built (Debian's 1.6 is refused).
    mkdir -p "$QS"
    rm -f "$QS/containerd-handler.toml"
    target/release/spry install \
        --prefix "$QS/prefix" \
        --guest-dir build/guest/current \
        --spry-config "$QS/spry.toml" \
        --containerd-config "$QS/containerd-handler.toml" \
        --containerd-bin "${SPRY_DEPS_DIR:-/opt/spry/deps}/bin/containerd" >"$QS/runtimeclass.yaml"
}

run_pod() {
    # stdout (the pod's output and what to try next) is kept for the end of the report.
    "$QUICKSTART_BIN" run --home "$QS" \
        --handler-toml "$QS/containerd-handler.toml" --spry-config "$QS/spry.toml" >"$QS/result.txt"
}

show_result() {
    [ -f "$QS/result.txt" ] && cat "$QS/result.txt"
}

on_exit() {
    local rc=$?
    if [ "$rc" != 0 ]; then
        print_timings
        show_result
        printf '\nquickstart failed (exit %s); the step that failed is named above\n' "$rc" >&2
    fi
}
trap on_exit EXIT

rm -f "$QS/result.txt"
timed "install dependencies" scripts/install-deps.sh --no-critest
timed "build the guest (kernel, agent initramfs)" scripts/build-guest.sh --release
timed "build test images (pause, busybox)" scripts/build-test-images.sh --only pause --only busybox
timed "build Spry (release)" build_quickstart_bin
timed "spry install (private prefix)" install_spry
timed "start containerd, run a Spry pod" run_pod
trap - EXIT

print_timings
printf '\n== RuntimeClass for Kubernetes (kubectl apply -f %s):\n' "$QS/runtimeclass.yaml"
cat "$QS/runtimeclass.yaml"
printf '\n== the pod'"'"'s output\n'
show_result
