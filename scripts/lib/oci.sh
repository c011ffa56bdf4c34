# OCI image layout writing and registry helpers, shared by build-test-images.sh and other image builders
# (e.g. the snapshotter's eStargz converter). Source it after lib/common.sh; do not execute it.
# shellcheck shell=bash

# A permissive signature policy of our own: skopeo otherwise depends on the host's /etc/containers/policy.json.
spry_skopeo_policy() {
    local policy="${TMPDIR:-/tmp}/spry-skopeo-policy.json"
    [ -f "$policy" ] || echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$policy"
    echo "$policy"
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# oci_layout_init DIR: an empty OCI image layout.
oci_layout_init() {
    local dir=$1
    rm -rf "$dir"
    mkdir -p "$dir/blobs/sha256"
    echo '{"imageLayoutVersion":"1.0.0"}' >"$dir/oci-layout"
}

# oci_add_blob DIR FILE: moves FILE into DIR's blob store; prints its sha256 hex digest.
oci_add_blob() {
    local dir=$1 file=$2 digest
    digest=$(sha256_of "$file")
    mv "$file" "$dir/blobs/sha256/$digest"
    echo "$digest"
}

# oci_tar_dir ROOTFS OUT_TAR [tar args...]: a reproducible tar of ROOTFS (sorted, mtime 0, numeric root owner).
# Extra args (e.g. --exclude=..., or paths relative to ROOTFS) are passed to tar; default is everything (.).
oci_tar_dir() {
    local rootfs=$1 out=$2
    shift 2
    [ $# -gt 0 ] || set -- .
    tar -C "$rootfs" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --xattrs \
        --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime -cf "$out" "$@"
}

# oci_write_image DIR REF CONFIG_JSON LAYER_TAR...: writes a single-manifest OCI layout in DIR.
#   REF is the tag stored as org.opencontainers.image.ref.name (used by `skopeo copy oci:DIR:REF`).
#   CONFIG_JSON is the image's runtime "config" object (Env, Cmd, WorkingDir, ...).
#   Each LAYER_TAR (uncompressed) is gzip-compressed into a layer; diff_ids are computed from the tar.
#   The layer tars are consumed (deleted).
oci_write_image() {
    local dir=$1 ref=$2 runtime_config=$3
    shift 3
    oci_layout_init "$dir"
    local layers_json='[]' diff_ids='[]' history='[]' tarfile diff_id digest size
    for tarfile in "$@"; do
        diff_id=$(sha256_of "$tarfile")
        gzip -n -6 -c "$tarfile" >"$tarfile.gz"
        rm -f "$tarfile"
        size=$(stat -c %s "$tarfile.gz")
        digest=$(oci_add_blob "$dir" "$tarfile.gz")
        layers_json=$(jq -c --arg d "sha256:$digest" --argjson s "$size" \
            '. + [{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":$d,"size":$s}]' <<<"$layers_json")
        diff_ids=$(jq -c --arg d "sha256:$diff_id" '. + [$d]' <<<"$diff_ids")
        history=$(jq -c --arg c "spry build-test-images: $(basename "$tarfile")" \
            '. + [{"created":"1970-01-01T00:00:00Z","created_by":$c}]' <<<"$history")
    done
    local config_file="$dir/config.json.tmp" config_digest config_size
    jq -n --argjson cfg "$runtime_config" --argjson diff "$diff_ids" --argjson hist "$history" \
        '{created:"1970-01-01T00:00:00Z",architecture:"amd64",os:"linux",config:$cfg,
          rootfs:{type:"layers",diff_ids:$diff},history:$hist}' >"$config_file"
    config_size=$(stat -c %s "$config_file")
    config_digest=$(oci_add_blob "$dir" "$config_file")
    local manifest_file="$dir/manifest.json.tmp" manifest_digest manifest_size
    jq -n --arg cd "sha256:$config_digest" --argjson cs "$config_size" --argjson layers "$layers_json" \
        '{schemaVersion:2,mediaType:"application/vnd.oci.image.manifest.v1+json",
          config:{mediaType:"application/vnd.oci.image.config.v1+json",digest:$cd,size:$cs},layers:$layers}' \
        >"$manifest_file"
    manifest_size=$(stat -c %s "$manifest_file")
    manifest_digest=$(oci_add_blob "$dir" "$manifest_file")
    jq -n --arg md "sha256:$manifest_digest" --argjson ms "$manifest_size" --arg ref "$ref" \
        '{schemaVersion:2,mediaType:"application/vnd.oci.image.index.v1+json",
          manifests:[{mediaType:"application/vnd.oci.image.manifest.v1+json",digest:$md,size:$ms,
                      platform:{architecture:"amd64",os:"linux"},
                      annotations:{"org.opencontainers.image.ref.name":$ref}}]}' >"$dir/index.json"
}

# oci_push LAYOUT_DIR TAG REGISTRY NAME [DEST_TAG]: pushes oci:LAYOUT_DIR:TAG to plain-HTTP REGISTRY as
# NAME:DEST_TAG (DEST_TAG defaults to TAG).
oci_push() {
    local layout=$1 tag=$2 registry=$3 name=$4 dest_tag=${5:-$2}
    log "pushing $layout -> $registry/$name:$dest_tag"
    skopeo --policy "$(spry_skopeo_policy)" copy --quiet --dest-tls-verify=false \
        "oci:$layout:$tag" "docker://$registry/$name:$dest_tag"
}

# free_tcp_port: an unused 127.0.0.1 TCP port (best effort: nothing reserves it).
free_tcp_port() {
    local port
    for _ in $(seq 1 100); do
        port=$((20000 + RANDOM % 20000))
        if ! ss -Htln "sport = :$port" | grep -q .; then
            echo "$port"
            return
        fi
    done
    die "no free TCP port found"
}

# registry_start STORAGE_DIR: starts Debian's docker-registry on 127.0.0.1:<free port> with STORAGE_DIR;
# sets SPRY_REGISTRY (host:port) and SPRY_REGISTRY_PID. Stop it with registry_stop.
registry_start() {
    local storage=$1 port conf logfile
    require_cmd docker-registry curl
    mkdir -p "$storage"
    port=$(free_tcp_port)
    conf=$(mktemp --suffix=.yml)
    logfile=$(mktemp --suffix=-registry.log)
    SPRY_REGISTRY_FILES=("$conf" "$logfile")
    "$SPRY_ROOT/scripts/lib/registry-serve.sh" "$storage" "$port" "$conf" >"$logfile" 2>&1 &
    SPRY_REGISTRY_PID=$!
    SPRY_REGISTRY="127.0.0.1:$port"
    local i
    for i in $(seq 1 100); do
        if curl -fsS "http://$SPRY_REGISTRY/v2/" >/dev/null 2>&1; then
            log "registry up at $SPRY_REGISTRY (pid $SPRY_REGISTRY_PID, storage $storage)"
            return
        fi
        kill -0 "$SPRY_REGISTRY_PID" 2>/dev/null || die "docker-registry exited; log: $(tail -5 "$logfile")"
        sleep 0.1
    done
    registry_stop
    die "docker-registry did not answer on $SPRY_REGISTRY within 10s"
}

registry_stop() {
    if [ -n "${SPRY_REGISTRY_PID:-}" ]; then
        kill "$SPRY_REGISTRY_PID" 2>/dev/null || true
        wait "$SPRY_REGISTRY_PID" 2>/dev/null || true
        SPRY_REGISTRY_PID=
    fi
    if [ -n "${SPRY_REGISTRY_FILES+x}" ]; then
        rm -f "${SPRY_REGISTRY_FILES[@]}"
        unset SPRY_REGISTRY_FILES
    fi
}
