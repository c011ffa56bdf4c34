#!/usr/bin/env bash
# Fuzzes every parser of registry input in the snapshotter (snapshotter/fuzz, cargo-fuzz on
# the nightly toolchain), each target for a fixed time, and reports executions per target.
#
#   scripts/fuzz.sh [--seconds N] [--target NAME]... [--keep]
#
# Seeds are in snapshotter/fuzz/corpus/<target>/; new inputs go to
# snapshotter/fuzz/target/corpus/<target>/ unless --keep merges those that add coverage
# into the committed corpus. A crash stops the run with the input under
# snapshotter/fuzz/artifacts/<target>/: make it a regression test in the snapshotter.
# Writes target/bench/fuzz.json: {"seconds": N, "targets": {NAME: {"runs": N, "crashed": bool}}}.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
enable_error_trap
cd "$SPRY_ROOT"

seconds=60
keep=0
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds=$2; shift 2 ;;
        --target) targets+=("$2"); shift 2 ;;
        --keep) keep=1; shift ;;
        *) die "unknown argument '$1' (see the header of $0)" ;;
    esac
done

rustup toolchain list | grep -q '^nightly' || die "the nightly toolchain is needed (rustup toolchain install nightly)"
if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

fuzz_dir=snapshotter/fuzz
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cd "$fuzz_dir" && cargo +nightly fuzz list)
log "building ${#targets[@]} fuzz targets"
(cd "$fuzz_dir" && cargo +nightly fuzz build -O)

mkdir -p target/bench
report="{\"seconds\": $seconds, \"targets\": {"
sep=""
failed=()
for t in "${targets[@]}"; do
    work="$fuzz_dir/target/corpus/$t"
    mkdir -p "$work" "$fuzz_dir/corpus/$t"
    log "fuzzing $t for ${seconds}s"
    out="$fuzz_dir/target/$t.log"
    crashed=false
    # 2.5 GiB: a parser that allocates what an input declares fails here, not on a node.
    if ! (cd "$fuzz_dir" && cargo +nightly fuzz run -O "$t" "target/corpus/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2560 -timeout=10 -print_final_stats=1) >"$out" 2>&1; then
        crashed=true
        failed+=("$t")
        tail -30 "$out" >&2
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$out" | tail -1 | grep -o '[0-9]*$' || echo 0)
    log "$t: ${runs:-0} runs, crashed=$crashed"
    report+="$sep\"$t\": {\"runs\": ${runs:-0}, \"crashed\": $crashed}"
    sep=", "
    if [ "$keep" = 1 ] && [ "$crashed" = false ]; then
        (cd "$fuzz_dir" && cargo +nightly fuzz run -O "$t" "corpus/$t" "target/corpus/$t" -- -merge=1) >/dev/null 2>&1
    fi
done
printf '%s}}\n' "$report" > target/bench/fuzz.json
log "wrote target/bench/fuzz.json"
[ ${#failed[@]} -eq 0 ] || die "crashes in: ${failed[*]} (inputs under $fuzz_dir/artifacts/)"
