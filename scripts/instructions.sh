#!/usr/bin/env bash
# Instructions per iteration of each state-tracking workload, ours against
# the flat bitmap, counted by valgrind's callgrind (docs/performance.md).
# Unlike time, the count does not move with a shared machine's load, so it
# shows small differences that timing cannot resolve. It is not time: a
# cache miss counts as one instruction. Not part of .ci/run.
#
#   scripts/instructions.sh                 # every workload
#   scripts/instructions.sh 2m_pair mixed_2m
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || {
    echo "valgrind is needed (apt-get install valgrind)" >&2
    exit 1
}

workloads=("$@")
if [ ${#workloads[@]} -eq 0 ]; then
    workloads=(4k_pair 4k_pair_4_listeners 2m_pair mixed_2m random_4k_1t replay_fragmented_1t)
fi

bench=$(cargo bench -p vmm --bench state_tracking --no-run --message-format=json 2>/dev/null |
    jq -r 'select(.reason == "compiler-artifact" and .target.name == "state_tracking") | .executable')
[ -x "$bench" ] || {
    echo "could not build the state_tracking bench" >&2
    exit 1
}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# Instructions inside counted_iterations for `iterations` iterations.
count() {
    local workload=$1 store=$2 iterations=$3
    STATE_TRACKING_COUNT="$workload:$store:$iterations" valgrind --tool=callgrind \
        --toggle-collect='*counted_iterations*' \
        --callgrind-out-file="$out/$workload.$store" "$bench" >/dev/null 2>&1
    awk '/^summary:/ { print $2 }' "$out/$workload.$store"
}

printf '%-22s %14s %14s %7s\n' workload flat_bitmap ram_block_attr ratio
for workload in "${workloads[@]}"; do
    case $workload in
    replay_fragmented_1t) iterations=3 ;;
    mixed_2m) iterations=200 ;;
    *) iterations=2000 ;;
    esac
    flat=$(count "$workload" flat "$iterations")
    ours=$(count "$workload" ours "$iterations")
    awk -v w="$workload" -v f="$flat" -v o="$ours" -v n="$iterations" \
        'BEGIN { printf "%-22s %14.1f %14.1f %7.3f\n", w, f / n, o / n, o / f }'
done
