#!/usr/bin/env bash
# Builds the one-node Kubernetes cluster the kubelet tests run (pinned, from the Go module proxy, cached
# under $SPRY_DEPS_DIR like install-deps.sh's tools, so a rerun with nothing changed does nothing):
# kubelet, kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy and kubectl from the
# k8s.io/kubernetes module, and etcd. Needs the Go toolchain install-deps.sh set up. Run as root:
#   scripts/build-k8s.sh
#
# The k8s.io/kubernetes module zip has no staging/ tree, so its go.mod's `replace k8s.io/X =>
# ./staging/...` lines point nowhere: the build works on a copy whose go.mod requires the published
# staging modules (v0.MINOR.PATCH) instead. etcd's server module cannot be `go install`ed (its go.mod
# has replace lines); a two-line main module calling etcdmain.Main builds the same binary.

source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib/go.sh"
entry_script

K8S_VERSION=v1.34.4 # cgroup v1 hosts still work by default (1.35 refuses them)
ETCD_VERSION=v3.6.4 # what Kubernetes v1.34.4 pins
K8S_BINS=(kubelet kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl)
SRC_DIR="$SPRY_DEPS_DIR/src"

build_kubernetes() {
    if stamp_ok kubernetes "$K8S_VERSION" "${K8S_BINS[@]}"; then
        log "kubernetes $K8S_VERSION already built"
        return
    fi
    local src work staging_version minor patch pkg=k8s.io/component-base/version module
    src=$(module_dir k8s.io/kubernetes "$K8S_VERSION")
    work="$SRC_DIR/kubernetes-$K8S_VERSION"
    rm -rf "$work"
    mkdir -p "$work"
    cp -a "$src/." "$work/"
    chmod -R u+w "$work"
    rm -f "$work/go.work" "$work/go.work.sum"
    minor=$(cut -d. -f2 <<<"$K8S_VERSION")
    patch=$(cut -d. -f3 <<<"$K8S_VERSION")
    staging_version="v0.$minor.$patch"
    local edits=()
    for module in $(cd "$work" && "$GO" mod edit -json | jq -r '.Replace[] | select(.New.Path | startswith("./staging/")) | .Old.Path'); do
        edits+=("-dropreplace=$module" "-require=$module@$staging_version")
    done
    [ "${#edits[@]}" -gt 0 ] || die "no staging replace lines in k8s.io/kubernetes@$K8S_VERSION's go.mod: the recipe needs updating"
    log "requiring $((${#edits[@]} / 2)) staging modules at $staging_version"
    (cd "$work" && "$GO" mod edit "${edits[@]}")
    local ldflags="-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
    mkdir -p "$DEPS_BIN"
    local cmds=()
    for module in "${K8S_BINS[@]}"; do cmds+=("./cmd/$module"); done
    (cd "$work" && GOWORK=off CGO_ENABLED=0 nice -n 10 "$GO" build -mod=mod -trimpath -ldflags "$ldflags" \
        -o "$DEPS_BIN/" "${cmds[@]}")
    rm -rf "$work"
    write_stamp kubernetes "$K8S_VERSION"
}

build_etcd() {
    if stamp_ok etcd "$ETCD_VERSION" etcd; then
        log "etcd $ETCD_VERSION already built"
        return
    fi
    local work="$SRC_DIR/etcd-$ETCD_VERSION"
    rm -rf "$work"
    mkdir -p "$work"
    cat >"$work/main.go" <<'GO'
// etcd's own main, as a module of ours: etcd's server module cannot be `go install`ed.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
    (
        cd "$work"
        "$GO" mod init spry.local/etcd >/dev/null 2>&1
        "$GO" get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
        "$GO" mod tidy
        CGO_ENABLED=0 nice -n 10 "$GO" build -trimpath -ldflags "-s -w" -o "$DEPS_BIN/etcd" .
    )
    rm -rf "$work"
    write_stamp etcd "$ETCD_VERSION"
}

main() {
    require_root
    require_cmd jq
    go_env
    timed "kubernetes $K8S_VERSION (${K8S_BINS[*]})" build_kubernetes
    timed "etcd $ETCD_VERSION" build_etcd
    "$DEPS_BIN/kubelet" --version
    "$DEPS_BIN/kubectl" version --client 2>/dev/null | sed -n 1p
    "$DEPS_BIN/etcd" --version | sed -n 1p
    print_timings
}

main "$@"
