#!/usr/bin/env bash
# Transformer throughput with the retained heap off and on, alternated in separate processes:
#   benchmarks/ab_retained_heap.sh [ROUNDS] [OUT_DIR] [-- bench_transformer.py arguments]
# Default arguments: --presets tiny,small --steps 4 --threads 2 (the runs in BENCHMARKS.md).
# Each round runs bench_transformer.py with PURCHASE_INTENT_RETAIN_HEAP=0 ("off"), then =1 ("on"),
# printing the 1-minute load before each; rows go to OUT_DIR/heap-{off,on}-ROUND.json and .log.
# Compare off and on within a round (the ratio), not across rounds: the shared machine drifts.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
out=${2:-/tmp/ab-retained-heap}
shift $(( $# < 2 ? $# : 2 ))
[[ ${1:-} == "--" ]] && shift
args=("$@")
(( ${#args[@]} )) || args=(--presets tiny,small --steps 4 --threads 2)
mkdir -p "$out"
for i in $(seq 1 "$rounds"); do
  for heap in off on; do
    flag=$([[ $heap == on ]] && echo 1 || echo 0)
    echo "== round $i, retained heap $heap, $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
    PURCHASE_INTENT_RETAIN_HEAP=$flag .venv/bin/python benchmarks/bench_transformer.py "${args[@]}" \
      --out "$out/heap-$heap-$i.json" | tee "$out/heap-$heap-$i.log"
  done
done
