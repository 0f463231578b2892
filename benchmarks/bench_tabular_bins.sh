#!/usr/bin/env bash
# The tabular features' piecewise-linear encoding (`--param tabular_bins=K`) through the CLI, on the simulated
# shop of the >= 200k-example goals (45,000 users x 90 days, seed 0: 206,175 examples):
#   benchmarks/bench_tabular_bins.sh OUT_DIR
# Runs, into the fresh workspace OUT_DIR/ws-sim:
#   purchase-intent simulate; run --models lightgbm,transformer --backtest $BACKTEST
#   train (+ evaluate --backtest) transformer with tabular_bins=$BINS, and the features-only network
#   (inputs=tabular) with tabular_bins 0 and $BINS
# then benchmarks/paired_runs.py: each against its reference on the same examples (paired bootstrap).
# Environment: USERS (default 45000), DAYS (90), BINS (16), BACKTEST (default 0: the test window only), SEED (0).
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:?usage: $0 OUT_DIR}
USERS=${USERS:-45000}
DAYS=${DAYS:-90}
BINS=${BINS:-16}
BACKTEST=${BACKTEST:-0}
SEED=${SEED:-0}
PI=.venv/bin/purchase-intent
mkdir -p "$out"
ws=$out/ws-sim
log=$out/tabular-bins.log
rm -rf "$ws"

step() {  # step ARGS...: one CLI command, echoed and timed into the log
  echo "\$ ${*}" | tee -a "$log"
  local t0=$SECONDS
  "$@" 2>&1 | grep -v '^epoch\|^  epoch' | tee -a "$log"
  echo "== $((SECONDS - t0)) s, load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$log"
}
bt=()
if [ "$BACKTEST" -gt 0 ]; then bt=(--backtest "$BACKTEST"); fi

echo "== $(date -u +%FT%TZ) nproc $(nproc), load $(cut -d' ' -f1-3 /proc/loadavg), commit" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo '?')" | tee "$log"
step "$PI" simulate --users "$USERS" --days "$DAYS" --seed 0 --out "$out/sim.parquet"
step "$PI" --workspace "$ws" run --data "$out/sim.parquet" --format parquet --models lightgbm,transformer \
  "${bt[@]}" --seed "$SEED"
for spec in "transformer_bins:transformer:--param tabular_bins=$BINS" \
            "mlp:transformer:--param inputs=tabular" \
            "mlp_bins:transformer:--param inputs=tabular --param tabular_bins=$BINS"; do
  IFS=: read -r run model params <<<"$spec"
  # shellcheck disable=SC2086
  step "$PI" --workspace "$ws" train --model "$model" --run "$run" $params --seed "$SEED"
  step "$PI" --workspace "$ws" evaluate --run "$run" "${bt[@]}"
done
step .venv/bin/python benchmarks/paired_runs.py "$ws" \
  --pairs transformer_bins:transformer,transformer_bins:lightgbm,transformer:lightgbm,mlp_bins:mlp,mlp:lightgbm,mlp_bins:lightgbm
