#!/usr/bin/env bash
# Mutation testing of the core files (docs/testing.md): for each FILE, runs
# cargo-mutants over the owning crate's unit and property tests in a scratch
# copy of the tree (the working tree is never mutated) and prints
# "FILE caught/(caught+missed) percent". Slow (minutes per file); not part
# of .ci/run.
#
#   scripts/mutants.sh                      # the default core files
#   scripts/mutants.sh vmm/src/memory/conversion.rs ...
#   MUTANTS_FILTER='in (serve|exchange)$' scripts/mutants.sh vmm/src/api/http_server.rs
#                                           # only the mutants whose name matches
#   MUTANTS_TESTS='memory:: device_manager::' MUTANTS_TIMEOUT=60 scripts/mutants.sh FILE
#                                           # only those unit tests, a longer hang limit
#                                           # (a loaded machine)
#
# Output: one markdown table row per file, as docs/testing.md shows them
# (paste the rows as printed), then the missed mutants.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
command -v cargo-mutants >/dev/null 2>&1 || cargo install --locked cargo-mutants

files=("$@")
if [ ${#files[@]} -eq 0 ]; then
    files=(
        vm-device/src/dma_listener.rs
        vmm/src/memory/ram_block_attribute.rs
        vmm/src/memory/shared_bitmap.rs
        vmm/src/memory/conversion.rs
        vmm/src/memory/transaction.rs
        vm-device/src/dma_listener/batch.rs
        vfio-user-client/src/batch.rs
    )
fi

# Results stay in target/mutants/ (per file: caught.txt, missed.txt, ...).
results="$root/target/mutants"
mkdir -p "$results"
scratch=$(mktemp -d /tmp/ch-mutants.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
# A copy without build output; cargo-mutants then copies that again.
tar -C "$root" --exclude=./target --exclude=./.git -cf - . | tar -C "$scratch" -xf -
export CARGO_TARGET_DIR="$scratch/target"

# Lines in a result file (0 when it is absent or empty).
count() {
    if [ -s "$1" ]; then grep -c . "$1"; else echo 0; fi
}

for file in "${files[@]}"; do
    crate=${file%%/*}
    out="$results/$(echo "$file" | tr / _)"
    rm -rf "$out"
    # The unit tests take a few seconds; a mutant still running after 20 s
    # hangs. Hangs are listed apart: they count as caught because CI's
    # nextest profile kills a test after 3 minutes (.config/nextest.toml).
    filter=()
    if [ -n "${MUTANTS_FILTER:-}" ]; then
        filter=(-F "$MUTANTS_FILTER")
    fi
    # Test-name filters go to the test harness, after a second `--`.
    tests=()
    if [ -n "${MUTANTS_TESTS:-}" ]; then
        read -r -a names <<<"$MUTANTS_TESTS"
        tests=(-- "${names[@]}")
    fi
    (cd "$scratch" && cargo mutants -p "$crate" -f "$file" "${filter[@]}" \
        --timeout "${MUTANTS_TIMEOUT:-20}" --output "$out" -- --lib "${tests[@]}" \
        >/dev/null 2>&1) || true
    caught=$(count "$out/mutants.out/caught.txt")
    missed=$(count "$out/mutants.out/missed.txt")
    timeout=$(count "$out/mutants.out/timeout.txt")
    total=$((caught + missed))
    if [ "$total" -gt 0 ]; then
        pct=$((100 * caught / total))
    else
        pct=0
    fi
    unviable=$(count "$out/mutants.out/unviable.txt")
    if [ "$total" -eq 0 ] && [ "$timeout" -eq 0 ]; then
        echo "| \`$file\` | not measured: the unmutated tests failed or timed out (see $out/mutants.out/log/baseline.log) | | |"
        continue
    fi
    echo "| \`$file\` | $caught / $total ($pct %) | $timeout | $unviable |"
    if [ "$missed" -gt 0 ]; then
        sed 's/^/    missed: /' "$out/mutants.out/missed.txt"
    fi
done
