#!/usr/bin/env bash
# Lazy-pull benchmark (stargz hello-bench style): python and busybox workloads, each pulled cold as
# (a) overlayfs full pull, (b) Spry lazy without prefetch, (c) Spry lazy with recorded prefetch, over a
# 100 Mbit/s netns+veth+tc link and unthrottled, in runc pods and in Spry pods, cold-booted (spry) and
# template clones (spry_template), whose VMs read lazy layers through the snapshotter's erofs images. Times pull, create and run-until-ready separately;
# reports medians, ratios, bytes fetched before ready, and sequential read throughput of the lazy FS
# (fully fetched) against overlayfs.
#
#   scripts/bench-lazypull.sh [--runs N] [--images python,busybox] [--links 100mbit|unlimited|both]
#                             [--runtimes all|runc,spry,spry_template] [--record-in runc|spry]
#                             [--read-only]
#
# --record-in: where the workload's reads for `lazy-prefetch` are recorded (default runc; spry: a
# cold Spry pod, whose VM reads the layers' erofs images with its own readahead).
# --read-only: only the read throughput (overlayfs, lazy with passthrough, lazy through the
# daemon), to target/bench/lazypull-read.{json,md}.
#
# Needs: scripts/install-deps.sh, scripts/build-test-images.sh, root. Writes target/bench/lazypull.json
# and target/bench/lazypull.md.

source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
entry_script

RUNS=3
IMAGES=python,busybox
LINKS=both
RUNTIMES=all
READ_ONLY=0
RECORD_IN=runc
while [ $# -gt 0 ]; do
    case $1 in
        --runs) RUNS=$2; shift 2 ;;
        --images) IMAGES=$2; shift 2 ;;
        --links) LINKS=$2; shift 2 ;;
        --runtimes) RUNTIMES=$2; shift 2 ;;
        --record-in) RECORD_IN=$2; shift 2 ;;
        --read-only) READ_ONLY=1; shift ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
for tool in tc ip docker-registry skopeo; do
    command -v "$tool" >/dev/null || die "$tool is missing: run scripts/install-deps.sh"
done

# The snapshotter is what is measured: release. The harness driving it can stay a debug build.
log "building spry-snapshotter (release)"
cargo build --release -p spry-snapshotter
# Spry pods: the guest and the release shim (its VMs read lazy layers through the snapshotter's images).
scripts/build-guest.sh
cargo build --release -p spry-shim --bins
log "running the benchmark: $RUNS run(s) per cell, images $IMAGES, links $LINKS"
SPRY_SNAPSHOTTER_BIN="$SPRY_ROOT/target/release/spry-snapshotter" \
SPRY_BENCH_RUNS=$RUNS SPRY_BENCH_IMAGES=$IMAGES SPRY_BENCH_LINKS=$LINKS SPRY_BENCH_READ_ONLY=$READ_ONLY \
SPRY_BENCH_RUNTIMES=$RUNTIMES SPRY_BENCH_RECORD_IN=$RECORD_IN \
SPRY_BENCH_OUT="$SPRY_ROOT/target/bench" \
    cargo test -p spry-integration --test lazy_pull_bench -- --ignored --nocapture --test-threads 1
log "report: target/bench/lazypull.md and target/bench/lazypull.json"
