# Shared helpers for Spry's bash scripts. Source it; do not execute it.
# shellcheck shell=bash

# Repository root, whatever directory the caller runs from.
SPRY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export SPRY_ROOT

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

die() {
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}

# Reports the failing command and line, so CI logs say what broke rather than just "exit 1".
on_error() {
    local rc=$? line=$1 cmd=$2
    printf 'ERROR: %s: line %s: "%s" failed with exit status %s\n' "$(basename "$0")" "$line" "$cmd" "$rc" >&2
    exit "$rc"
}
enable_error_trap() {
    set -Eeuo pipefail
    trap 'on_error "$LINENO" "$BASH_COMMAND"' ERR
}

# The start every entry script shares: stop at the first failing command (naming it), run
# from the repository root, as root (they install packages, mount, boot VMs).
#   source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"; entry_script
entry_script() {
    enable_error_trap
    cd "$SPRY_ROOT"
    require_root
}

require_root() {
    [ "$(id -u)" -eq 0 ] || die "$(basename "$0") must run as root (it installs packages / mounts / runs registries)"
}

require_cmd() {
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || die "required command '$c' not found; run scripts/install-deps.sh first"
    done
}

# Timings: `timed STEP cmd...` runs cmd and records "STEP  N s" for the summary printed by print_timings.
SPRY_TIMINGS=()
timed() {
    local step=$1
    shift
    local start end
    start=$(date +%s)
    log "==> $step"
    "$@"
    end=$(date +%s)
    SPRY_TIMINGS+=("$(printf '%-40s %5ss' "$step" "$((end - start))")")
}
print_timings() {
    local t
    printf '\nTimings:\n' >&2
    for t in "${SPRY_TIMINGS[@]}"; do printf '  %s\n' "$t" >&2; done
}
