#!/usr/bin/env bash
# Installs everything Spry's build and end-to-end tests need on a fresh Debian bookworm machine.
# Idempotent and non-interactive; run as root:   scripts/install-deps.sh [--no-critest]
#
#   --no-critest   skip cri-tools' conformance suite critest: the quickstart needs only crictl,
#                  and critest (a `go test -c` binary) is the slowest build here
#
#   - apt packages: QEMU 10 from bookworm-backports (7.2 lacks `migrate file:`), the rest from bookworm;
#   - Go-built upstream tools, pinned, under /opt/spry/deps/bin (never on the system PATH, so they can't
#     shadow Debian's containerd 1.6): containerd 2.x (+ ctr, containerd-shim-runc-v2), crictl, critest.
#
# Environment overrides:
#   SPRY_DEPS_DIR      install prefix for Go-built tools (default /opt/spry/deps)
#   SPRY_SKIP_APT=1    skip the apt part (for machines where packages are managed otherwise)
#   SPRY_GO            Go binary to use (default: newest of PATH, /usr/local/go, /usr/lib/go-1.2x)

source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib/go.sh"
enable_error_trap

CONTAINERD_VERSION=v2.2.9 # latest 2.2 patch on the Go proxy at pin time
CRI_TOOLS_VERSION=v1.34.0 # CRI v1; matches containerd 2.2 / Kubernetes 1.34

CONTAINERD_TAGS="urfave_cli_no_docs no_btrfs" # no btrfs headers needed; we never use the btrfs snapshotter
SHIM_TAGS="urfave_cli_no_docs no_btrfs no_grpc"

APT_BACKPORTS_PACKAGES=(qemu-system-x86 qemu-utils)
APT_PACKAGES=(
    busybox-static protobuf-compiler libseccomp-dev libcap-ng-dev erofs-utils e2fsprogs cpio lz4 kmod zstd
    runc containernetworking-plugins docker-registry skopeo socat jq iproute2 debootstrap
    containerd             # optional 1.6 compatibility target only; its service is kept stopped/disabled
    gcc libc6-dev          # cgo for containerd
    ca-certificates curl file util-linux procps
    openssl                # the kubelet tests' cluster certificates
    iptables               # CNI portmap (hostPort), also a dependency of the CNI plugins
)

export DEBIAN_FRONTEND=noninteractive

# Debian's maintainer scripts start daemons on install (containerd, docker-registry). A policy-rc.d
# returning 101 forbids that for the duration of our apt calls; we remove it afterwards.
POLICY_RC=/usr/sbin/policy-rc.d
policy_rc_installed_by_us=0
forbid_service_starts() {
    if [ ! -e "$POLICY_RC" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC"
        chmod 0755 "$POLICY_RC"
        policy_rc_installed_by_us=1
    fi
}
allow_service_starts() {
    if [ "$policy_rc_installed_by_us" = 1 ]; then
        rm -f "$POLICY_RC"
        policy_rc_installed_by_us=0
    fi
}
trap allow_service_starts EXIT

ensure_backports_source() {
    if grep -rqsE '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return
    fi
    log "adding bookworm-backports apt source"
    echo 'deb http://deb.debian.org/debian bookworm-backports main' >/etc/apt/sources.list.d/spry-backports.list
}

apt_install() {
    . /etc/os-release
    [ "${VERSION_CODENAME:-}" = bookworm ] || die "this script targets Debian bookworm, found '${VERSION_CODENAME:-unknown}'"
    ensure_backports_source
    forbid_service_starts
    apt-get update -q
    # QEMU's pieces (qemu-system-common, -data, seabios, ...) must all come from backports together;
    # -t makes backports the target release for this transaction, so apt resolves them consistently.
    apt-get install -y -q --no-install-recommends -t bookworm-backports "${APT_BACKPORTS_PACKAGES[@]}"
    apt-get install -y -q --no-install-recommends "${APT_PACKAGES[@]}"
    allow_service_starts
    disable_debian_services
    local qemu_version
    qemu_version=$(qemu-system-x86_64 --version | head -1 | grep -oE '[0-9]+\.[0-9]+(\.[0-9]+)?' | head -1)
    [ "${qemu_version%%.*}" -ge 10 ] || die "QEMU $qemu_version installed, need >= 10 (from bookworm-backports)"
}

# We never want Debian's containerd or registry running as services: tests start their own instances.
disable_debian_services() {
    if [ -d /run/systemd/system ]; then
        local unit
        for unit in containerd.service docker-registry.service; do
            systemctl disable --now "$unit" >/dev/null 2>&1 || true
        done
    fi
}

ensure_go() {
    if ! GO=$(find_go); then
        log "no Go toolchain found; installing golang-1.23-go from bookworm-backports"
        forbid_service_starts
        apt-get install -y -q --no-install-recommends -t bookworm-backports golang-1.23-go
        allow_service_starts
        GO=/usr/lib/go-1.23/bin/go
    fi
    go_env
}

build_containerd() {
    local stamp="$CONTAINERD_VERSION tags=$CONTAINERD_TAGS shim_tags=$SHIM_TAGS"
    if stamp_ok containerd "$stamp" containerd ctr containerd-shim-runc-v2; then
        log "containerd $CONTAINERD_VERSION already installed"
        return
    fi
    local src pkg=github.com/containerd/containerd/v2 ldflags
    src=$(module_dir $pkg "$CONTAINERD_VERSION")
    ldflags="-X $pkg/version.Version=$CONTAINERD_VERSION -X $pkg/version.Revision=module-proxy -X $pkg/version.Package=$pkg -s -w"
    mkdir -p "$DEPS_BIN"
    (
        cd "$src"
        CGO_ENABLED=1 nice -n 10 "$GO" build -trimpath -tags "$CONTAINERD_TAGS" -ldflags "$ldflags" \
            -o "$DEPS_BIN/containerd" ./cmd/containerd
        CGO_ENABLED=1 nice -n 10 "$GO" build -trimpath -tags "$CONTAINERD_TAGS" -ldflags "$ldflags" \
            -o "$DEPS_BIN/ctr" ./cmd/ctr
        # Like upstream's Makefile: the shim is static and built without gRPC.
        CGO_ENABLED=0 nice -n 10 "$GO" build -trimpath -tags "$SHIM_TAGS" -ldflags "$ldflags -extldflags -static" \
            -o "$DEPS_BIN/containerd-shim-runc-v2" ./cmd/containerd-shim-runc-v2
    )
    write_stamp containerd "$stamp"
}

# build_cri_tool NAME GO-SUBCOMMAND...: one cri-tools binary, with its own stamp.
build_cri_tool() {
    local name=$1
    shift
    if stamp_ok "$name" "$CRI_TOOLS_VERSION" "$name"; then
        log "$name $CRI_TOOLS_VERSION already installed"
        return
    fi
    local src pkg=sigs.k8s.io/cri-tools ldflags
    src=$(module_dir $pkg "$CRI_TOOLS_VERSION")
    ldflags="-X $pkg/pkg/version.Version=${CRI_TOOLS_VERSION#v}"
    mkdir -p "$DEPS_BIN"
    (cd "$src" && CGO_ENABLED=0 nice -n 10 "$GO" "$@" -trimpath -ldflags "$ldflags" -o "$DEPS_BIN/$name" "./cmd/$name")
    write_stamp "$name" "$CRI_TOOLS_VERSION"
}

print_summary() {
    printf '\nInstalled versions:\n'
    printf '  %-22s %s\n' qemu "$(qemu-system-x86_64 --version | head -1)"
    printf '  %-22s %s\n' containerd "$("$DEPS_BIN/containerd" --version)"
    printf '  %-22s %s\n' ctr "$("$DEPS_BIN/ctr" --version)"
    printf '  %-22s %s\n' containerd-shim-runc-v2 "$("$DEPS_BIN/containerd-shim-runc-v2" -v | tr '\n' ' ')"
    printf '  %-22s %s\n' crictl "$("$DEPS_BIN/crictl" --version)"
    if [ -x "$DEPS_BIN/critest" ]; then
        printf '  %-22s %s\n' critest "$CRI_TOOLS_VERSION ($DEPS_BIN/critest)"
    fi
    printf '  %-22s %s\n' runc "$(runc --version | head -1)"
    printf '  %-22s %s\n' docker-registry "$(docker-registry --version 2>&1 | head -1)"
    printf '  %-22s %s\n' skopeo "$(skopeo --version)"
    printf '  %-22s %s\n' debian-containerd "$(/usr/bin/containerd --version 2>/dev/null || echo absent)"
    printf '  %-22s %s\n' go "$("$GO" version)"
}

main() {
    local with_critest=1
    case "${1:-}" in
        "") ;;
        --no-critest) with_critest=0 ;;
        *) die "unknown argument '$1' (usage: scripts/install-deps.sh [--no-critest])" ;;
    esac
    require_root
    local start=$SECONDS
    if [ "${SPRY_SKIP_APT:-0}" != 1 ]; then
        timed "apt packages" apt_install
    fi
    require_cmd jq
    timed "Go toolchain" ensure_go
    timed "containerd $CONTAINERD_VERSION" build_containerd
    timed "crictl $CRI_TOOLS_VERSION" build_cri_tool crictl build
    if [ "$with_critest" = 1 ]; then
        # critest is a Ginkgo test binary: upstream builds it with `go test -c`.
        timed "critest $CRI_TOOLS_VERSION" build_cri_tool critest test -c
    fi
    print_summary
    print_timings
    log "install-deps done in $((SECONDS - start))s; tools in $DEPS_BIN"
}

main "$@"
