#!/usr/bin/env bash
# registry-serve.sh STORAGE_DIR PORT CONFIG_FILE: runs Debian's docker-registry (distribution 2.8) in
# the foreground, serving STORAGE_DIR over plain HTTP on 127.0.0.1:PORT, with its config written to
# CONFIG_FILE. The one place the registry is configured and started: `registry_start` in
# scripts/lib/oci.sh and the test harness (integration/src/registry.rs) both run it. It execs the
# registry, so the caller's child PID is the registry's own. SPRY_REGISTRY_BIN names another binary.
set -euo pipefail
if [ $# -ne 3 ]; then
    echo "usage: $0 STORAGE_DIR PORT CONFIG_FILE" >&2
    exit 2
fi
storage=$1 port=$2 config=$3
cat >"$config" <<YAML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
YAML
exec "${SPRY_REGISTRY_BIN:-docker-registry}" serve "$config"
