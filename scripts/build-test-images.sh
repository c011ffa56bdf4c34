#!/usr/bin/env bash
# Builds Spry's OCI test images offline and pushes them to a local registry.
#
#   scripts/build-test-images.sh [--registry HOST:PORT] [--only NAME]... [--rebuild]
#
# Images (OCI layouts under build/images/<name>, tag "1"):
#   pause    the pod sandbox image (static /pause from scripts/lib/pause.c); containerd's sandbox image.
#   busybox  busybox-static with a `busybox --install -s` style layout, plus /etc/passwd, /etc/group and
#            /spry/hello.txt ("hello from spry busybox image"); 1 layer, ~1 MiB.
#   netprobe busybox plus /bin/netprobe (integration/src/bin/netprobe.rs, static): the network benchmark's
#            probe. Not built by default: --only netprobe (scripts/bench-net.sh does).
#   webapp   busybox's layer plus a layer with /www/index.html; busybox's httpd serves it on :8080. The small
#            server bench-upgrade swaps busybox for (the python swap pays python's first start). Not built by
#            default: --only webapp (scripts/bench-upgrade.sh does).
#   critest  the images cri-tools' critest pulls, under build/images/critest/ and pushed under upstream's
#            names (scripts/lib/critest-images.sh). Not built by default: --only critest (scripts/critest.sh).
#   python   Debian bookworm `debootstrap --variant=minbase` + python3, pip, numpy in 3 layers (base system, python's
#            stdlib, /app/hello.py); a few hundred MiB. The debootstrap rootfs is cached in build/cache.
#
# Aliases: busybox is also pushed as e2e-test-images/busybox:1.29-2 (critest's default test image, served
# offline when containerd mirrors registry.k8s.io to this registry).
#
# Pushing: with --registry, pushes to that (plain-HTTP) registry as HOST:PORT/<name>:1. Without it, starts
# a private docker-registry whose storage is build/registry-data and pushes there; the integration harness
# serves that same directory, so tests never rebuild images.
#
# Sourcing scripts/lib/oci.sh gives other builders the same helpers (oci_write_image, oci_push, registry_start).

source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
source "$SPRY_ROOT/scripts/lib/oci.sh"
source "$SPRY_ROOT/scripts/lib/critest-images.sh"
enable_error_trap

BUILD_DIR=${SPRY_BUILD_DIR:-$SPRY_ROOT/build}
IMAGES_DIR="$BUILD_DIR/images"
CACHE_DIR="$BUILD_DIR/cache"
REGISTRY_DATA="$BUILD_DIR/registry-data"
DEBIAN_MIRROR=${SPRY_DEBIAN_MIRROR:-http://deb.debian.org/debian}
IMAGE_TAG=1
ALL_IMAGES=(pause busybox python)
# Built only when asked for by name.
EXTRA_IMAGES=(netprobe webapp critest)

usage() {
    sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

WORK=
cleanup() {
    registry_stop
    if [ -n "$WORK" ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

# An image is rebuilt only when its stamp (the recipe version) changes or --rebuild is given.
BUSYBOX_RECIPE="busybox v1 $(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || echo unknown)"
PYTHON_RECIPE="python v3 bookworm minbase+python3,python3-pip,python3-numpy, byte-compiled at mtime 0"

image_is_current() {
    local name=$1 recipe=$2
    [ "$REBUILD" = 0 ] && { [ -f "$IMAGES_DIR/$name/index.json" ] || [ -f "$IMAGES_DIR/$name/push.list" ]; } &&
        [ "$(cat "$IMAGES_DIR/$name.stamp" 2>/dev/null)" = "$recipe" ]
}

PAUSE_RECIPE="pause v1 $(sha256sum "$SPRY_ROOT/scripts/lib/pause.c" | cut -c1-16)"

build_pause() {
    if image_is_current pause "$PAUSE_RECIPE"; then
        log "pause image is current"
        return
    fi
    require_cmd gcc
    local rootfs="$WORK/pause-rootfs"
    mkdir -p "$rootfs"
    gcc -static -Os -s -o "$rootfs/pause" "$SPRY_ROOT/scripts/lib/pause.c"
    oci_tar_dir "$rootfs" "$WORK/pause-layer.tar"
    oci_write_image "$IMAGES_DIR/pause" "$IMAGE_TAG" '{"Entrypoint":["/pause"],"User":"65535:65535"}' \
        "$WORK/pause-layer.tar"
    echo "$PAUSE_RECIPE" >"$IMAGES_DIR/pause.stamp"
}

# A busybox userland in directory $1: the layout `busybox --install -s` makes, users and groups.
busybox_rootfs() {
    local rootfs=$1 applet
    require_cmd busybox
    mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,root,proc,sys,dev,spry}
    chmod 1777 "$rootfs/tmp"
    cp "$(command -v busybox)" "$rootfs/bin/busybox"
    # The layout `busybox --install -s` makes: one symlink per applet, at its canonical path.
    for applet in $(busybox --list-full); do
        [ "$applet" = bin/busybox ] && continue
        mkdir -p "$rootfs/$(dirname "$applet")"
        ln -sf /bin/busybox "$rootfs/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$rootfs/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
}

build_busybox() {
    if image_is_current busybox "$BUSYBOX_RECIPE"; then
        log "busybox image is current"
        return
    fi
    local rootfs="$WORK/busybox-rootfs"
    busybox_rootfs "$rootfs"
    echo 'hello from spry busybox image' >"$rootfs/spry/hello.txt"
    oci_tar_dir "$rootfs" "$WORK/busybox-layer.tar"
    oci_write_image "$IMAGES_DIR/busybox" "$IMAGE_TAG" \
        '{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"]}' \
        "$WORK/busybox-layer.tar"
    echo "$BUSYBOX_RECIPE" >"$IMAGES_DIR/busybox.stamp"
}

WEBAPP_RECIPE="webapp v1 $BUSYBOX_RECIPE"

build_webapp() {
    if image_is_current webapp "$WEBAPP_RECIPE"; then
        log "webapp image is current"
        return
    fi
    local base="$WORK/webapp-base" www="$WORK/webapp-www"
    busybox_rootfs "$base"
    mkdir -p "$www/www"
    echo 'hello from spry webapp image' >"$www/www/index.html"
    oci_tar_dir "$base" "$WORK/webapp-base.tar"
    oci_tar_dir "$www" "$WORK/webapp-www.tar"
    oci_write_image "$IMAGES_DIR/webapp" "$IMAGE_TAG" \
        '{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["httpd","-f","-p","8080","-h","/www"]}' \
        "$WORK/webapp-base.tar" "$WORK/webapp-www.tar"
    echo "$WEBAPP_RECIPE" >"$IMAGES_DIR/webapp.stamp"
}

NETPROBE_SOURCE="$SPRY_ROOT/integration/src/bin/netprobe.rs"
NETPROBE_RECIPE="netprobe v1 $(sha256sum "$NETPROBE_SOURCE" | cut -c1-16) $BUSYBOX_RECIPE"

build_netprobe() {
    if image_is_current netprobe "$NETPROBE_RECIPE"; then
        log "netprobe image is current"
        return
    fi
    local rootfs="$WORK/netprobe-rootfs"
    busybox_rootfs "$rootfs"
    # Standard library only: rustc alone builds it, static, in seconds.
    rustc --edition 2021 -C opt-level=2 -C target-feature=+crt-static \
        --target x86_64-unknown-linux-gnu -o "$rootfs/bin/netprobe" "$NETPROBE_SOURCE"
    oci_tar_dir "$rootfs" "$WORK/netprobe-layer.tar"
    oci_write_image "$IMAGES_DIR/netprobe" "$IMAGE_TAG" \
        '{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["netprobe","serve","5201"]}' \
        "$WORK/netprobe-layer.tar"
    echo "$NETPROBE_RECIPE" >"$IMAGES_DIR/netprobe.stamp"
}

# The debootstrap rootfs tarball is the expensive part (network + ~2 min); made once per machine.
debootstrap_tarball() {
    local tarball="$CACHE_DIR/debootstrap-bookworm-minbase-python3-numpy-pip.tar"
    if [ -f "$tarball" ]; then
        echo "$tarball"
        return
    fi
    require_cmd debootstrap
    local target="$WORK/debootstrap"
    log "debootstrap bookworm (minbase + python3, pip, numpy) from $DEBIAN_MIRROR"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-numpy bookworm "$target" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
        die "debootstrap failed; log: $(tail -20 "$WORK/debootstrap.log")"
    # Package caches and device nodes don't belong in an image.
    rm -rf "$target"/var/cache/apt/archives/*.deb "$target"/var/lib/apt/lists/* "$target"/dev/* \
        "$target"/var/log/*.log "$target"/var/cache/debconf/*-old
    mkdir -p "$CACHE_DIR"
    oci_tar_dir "$target" "$tarball.tmp"
    mv "$tarball.tmp" "$tarball"
    rm -rf "$target"
    echo "$tarball"
}

build_python() {
    if image_is_current python "$PYTHON_RECIPE"; then
        log "python image is current"
        return
    fi
    local tarball rootfs="$WORK/python-rootfs"
    tarball=$(debootstrap_tarball)
    mkdir -p "$rootfs"
    tar -C "$rootfs" --numeric-owner -xpf "$tarball"
    local pystdlib
    pystdlib=$(cd "$rootfs" && ls -d usr/lib/python3.* | head -1)
    [ -n "$pystdlib" ] || die "no python stdlib found in the debootstrap rootfs ($tarball)"
    # The layers store every mtime as 0 (oci_tar_dir), so the .pyc files Debian compiled at
    # install time name a source mtime the image no longer has: python would recompile every
    # module it imports at each container's first start (measured under TCG: ~1 s of a 2.5 s
    # first start) and write the results into the container's writable layer. An image
    # builder byte-compiles after the timestamps are final; so do we, with the image's python.
    find "$rootfs/usr/lib" -name '*.py' -exec touch -h -d @0 {} +
    chroot "$rootfs" python3 -m compileall -q -f "/$pystdlib" /usr/lib/python3/dist-packages >"$WORK/compileall.log" 2>&1 ||
        die "byte-compiling the python image failed; log: $(tail -20 "$WORK/compileall.log")"
    # Three layers like a real application image: base OS, a big language runtime, then the app.
    oci_tar_dir "$rootfs" "$WORK/python-1-base.tar" --exclude="./$pystdlib" .
    oci_tar_dir "$rootfs" "$WORK/python-2-stdlib.tar" "./$pystdlib"
    local app="$WORK/python-app"
    mkdir -p "$app/app"
    cat >"$app/app/hello.py" <<'EOF'
import platform, sys
print(f"hello from spry python image: python {platform.python_version()}")
sys.exit(0)
EOF
    oci_tar_dir "$app" "$WORK/python-3-app.tar"
    oci_write_image "$IMAGES_DIR/python" "$IMAGE_TAG" \
        '{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","LANG=C.UTF-8"],"Cmd":["python3","/app/hello.py"],"WorkingDir":"/app"}' \
        "$WORK/python-1-base.tar" "$WORK/python-2-stdlib.tar" "$WORK/python-3-app.tar"
    rm -rf "$rootfs" "$app"
    echo "$PYTHON_RECIPE" >"$IMAGES_DIR/python.stamp"
}

# Extra names for our images, so critest finds its default test image offline when containerd mirrors
# registry.k8s.io to our registry (the harness's `ContainerdOptions::mirror`).
ALIASES=("busybox e2e-test-images/busybox 1.29-2")

push_all() {
    local registry=$1 name alias image alias_name alias_tag
    for name in "${SELECTED[@]}"; do
        if [ "$name" = critest ]; then
            push_critest "$registry"
            continue
        fi
        oci_push "$IMAGES_DIR/$name" "$IMAGE_TAG" "$registry" "$name"
        for alias in "${ALIASES[@]}"; do
            read -r image alias_name alias_tag <<<"$alias"
            if [ "$image" = "$name" ]; then
                oci_push "$IMAGES_DIR/$name" "$IMAGE_TAG" "$registry" "$alias_name" "$alias_tag"
            fi
        done
    done
}

main() {
    REBUILD=0
    SELECTED=()
    local registry=
    while [ $# -gt 0 ]; do
        case $1 in
        --registry) registry=${2:?--registry needs HOST:PORT}; shift 2 ;;
        --only) SELECTED+=("${2:?--only needs an image name}"); shift 2 ;;
        --rebuild) REBUILD=1; shift ;;
        -h | --help) usage 0 ;;
        *) printf 'unknown argument: %s\n\n' "$1" >&2; usage 2 ;;
        esac
    done
    [ ${#SELECTED[@]} -gt 0 ] || SELECTED=("${ALL_IMAGES[@]}")
    local name
    for name in "${SELECTED[@]}"; do
        case " ${ALL_IMAGES[*]} ${EXTRA_IMAGES[*]} " in *" $name "*) ;; *) die "unknown image '$name' (known: ${ALL_IMAGES[*]} ${EXTRA_IMAGES[*]})" ;; esac
    done
    require_root
    require_cmd jq skopeo tar gzip sha256sum ss curl
    mkdir -p "$IMAGES_DIR" "$CACHE_DIR"
    WORK=$(mktemp -d "$BUILD_DIR/tmp.XXXXXX")
    for name in "${SELECTED[@]}"; do
        timed "image $name" "build_$name"
    done
    if [ -n "$registry" ]; then
        timed "push to $registry" push_all "$registry"
    else
        registry_start "$REGISTRY_DATA"
        timed "push to $SPRY_REGISTRY ($REGISTRY_DATA)" push_all "$SPRY_REGISTRY"
        registry_stop
    fi
    for name in "${SELECTED[@]}"; do
        printf '  %-10s %s  %s\n' "$name" "$(du -sh "$IMAGES_DIR/$name" | cut -f1)" "$IMAGES_DIR/$name" >&2
    done
    print_timings
}

main "$@"
