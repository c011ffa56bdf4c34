# Building pinned upstream Go tools from the Go module proxy into $SPRY_DEPS_DIR, each with a stamp so a
# rerun with nothing changed does nothing. Shared by install-deps.sh and build-k8s.sh.

SPRY_DEPS_DIR=${SPRY_DEPS_DIR:-/opt/spry/deps}
DEPS_BIN="$SPRY_DEPS_DIR/bin"
STAMP_DIR="$SPRY_DEPS_DIR/stamps"

# Go toolchain: containerd 2.2 needs go >= 1.25. Prefer an installed Go; otherwise install golang-1.23 from
# backports and let GOTOOLCHAIN=auto fetch the exact toolchain from the Go module proxy (a Go module).
find_go() {
    if [ -n "${SPRY_GO:-}" ]; then
        echo "$SPRY_GO"
        return
    fi
    local candidate minor
    for candidate in "$(command -v go || true)" /usr/local/go/bin/go /usr/lib/go-1.2[0-9]/bin/go; do
        [ -n "$candidate" ] && [ -x "$candidate" ] || continue
        # Toolchain switching (GOTOOLCHAIN=auto) needs go >= 1.21; Debian bookworm's own golang is 1.19.
        minor=$("$candidate" env GOVERSION | sed -nE 's/^go1\.([0-9]+).*/\1/p')
        if [ -n "$minor" ] && [ "$minor" -ge 21 ]; then
            echo "$candidate"
            return
        fi
    done
    return 1
}

# go_env: picks the Go toolchain (find_go) and the environment every build here uses; dies with a hint
# when there is none.
go_env() {
    if [ -z "${GO:-}" ]; then
        GO=$(find_go) || die "no Go toolchain (>= 1.21) found: run scripts/install-deps.sh as root first"
    fi
    export GOTOOLCHAIN=auto GOFLAGS="-modcacherw" GO111MODULE=on
    log "using Go: $GO ($("$GO" version))"
}

# stamp_ok NAME CONTENT BIN...: true when NAME's stamp matches CONTENT and every BIN exists.
stamp_ok() {
    local name=$1 content=$2
    shift 2
    [ "$(cat "$STAMP_DIR/$name" 2>/dev/null)" = "$content" ] || return 1
    local b
    for b in "$@"; do [ -x "$DEPS_BIN/$b" ] || return 1; done
}
write_stamp() { mkdir -p "$STAMP_DIR" && printf '%s' "$2" >"$STAMP_DIR/$1"; }

# Source directory of a module version in the module cache (downloads it if needed).
module_dir() {
    local module=$1 version=$2 json dir
    # `go mod download -json` exits 1 on failure but still prints JSON whose .Error says why.
    json=$(cd /tmp && "$GO" mod download -json "$module@$version") || true
    dir=$(jq -r '.Dir // empty' <<<"$json" 2>/dev/null || true)
    if [ -z "$dir" ] || [ ! -d "$dir" ]; then
        die "could not download Go module $module@$version: $(jq -r '.Error // empty' <<<"$json" 2>/dev/null || echo "$json")"
    fi
    echo "$dir"
}
