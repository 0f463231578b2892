#!/usr/bin/env bash
# API latency and batch users/s of two source trees on one workspace, alternated:
#   benchmarks/bench_serve_ab.sh BASE_TREE [WORKSPACE] [ROUNDS]
# BASE_TREE is a checkout of the commit to compare against (e.g. `git worktree add /tmp/base HEAD~1`).
# The workspace must hold lightgbm and transformer runs, e.g. from
#   python benchmarks/bench_serve.py --workspace WORKSPACE --models lightgbm,transformer --users 3000
# Each round runs bench_serve.py --reuse with BASE_TREE first on PYTHONPATH, then with this tree.
# Results: WORKSPACE/../ab-{base,new}-ROUND.json and .log.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: benchmarks/bench_serve_ab.sh BASE_TREE [WORKSPACE] [ROUNDS]}
ws=${2:-bench-serve-ws}
rounds=${3:-2}
out=$(dirname "$ws")
args=(--workspace "$ws" --reuse --models lightgbm,transformer --concurrency 1,8 --duration 6)
for i in $(seq 1 "$rounds"); do
  PYTHONPATH="$base" .venv/bin/python benchmarks/bench_serve.py "${args[@]}" --out "$out/ab-base-$i.json" \
    | tee "$out/ab-base-$i.log"
  .venv/bin/python benchmarks/bench_serve.py "${args[@]}" --out "$out/ab-new-$i.json" | tee "$out/ab-new-$i.log"
done
