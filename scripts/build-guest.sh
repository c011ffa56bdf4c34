#!/usr/bin/env bash
# Builds the guest: the static agent, then the kernel + initramfs (Rust builder in
# spry_shim::assets). Outputs land in build/guest/<hash>/, linked from build/guest/current/.
#
#   scripts/build-guest.sh [--agent PATH] [--output DIR] [--kernel-deb PATH] [--release]
#
# With --agent, the given binary is used as /init and the agent is not built. With
# --release the builder runs from the release build (the quickstart's), so a run that builds
# only release binaries does not also build the whole shim in the debug profile.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
enable_error_trap
cd "$SPRY_ROOT"
require_cmd cargo dpkg-deb apt-get
[ -x /usr/sbin/depmod ] || [ -x /sbin/depmod ] || die "depmod not found (apt-get install kmod)"

agent=""
profile=()
output="$SPRY_ROOT/build/guest"
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --agent) agent=$2; shift 2 ;;
        --output) output=$2; shift 2 ;;
        --kernel-deb) args+=("$1" "$2"); shift 2 ;;
        --release) profile=(--release); shift ;;
        *) die "unknown argument '$1' (see the header of $0)" ;;
    esac
done

if [ -z "$agent" ]; then
    # Profile "guest" (Cargo.toml): size-optimized, fat LTO, stripped.
    log "building spry-agent (static, profile guest)"
    RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --profile guest -p spry-agent --target x86_64-unknown-linux-gnu
    agent="$SPRY_ROOT/target/x86_64-unknown-linux-gnu/guest/spry-agent"
fi
# The guest has no dynamic loader: a dynamic /init fails with a bare ENOENT.
if file "$agent" 2>/dev/null | grep -q 'dynamically linked'; then
    die "$agent is dynamically linked; the guest needs a static binary"
fi

log "building guest assets with /init = $agent"
cargo run --quiet "${profile[@]}" -p spry-shim --bin spry -- assets build --agent "$agent" --output "$output" "${args[@]}"
