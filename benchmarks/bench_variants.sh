#!/usr/bin/env bash
# Variants of a model through the CLI, against their references on the same examples, on one simulated shop:
#   benchmarks/bench_variants.sh OUT_DIR RUN:MODEL:PARAMS ...
# e.g. (the shop of the >= 200k-example goals: 45,000 users x 90 days, seed 0: 206,175 examples)
#   MODELS=lightgbm,transformer_pt PRETRAIN=1 BACKTEST=3 PAIRS=transformer_pt_ema:transformer_pt,... \
#     benchmarks/bench_variants.sh OUT 'transformer_pt_ema:transformer_pt:--param ema_decay=0.998'
# Runs, into the fresh workspace OUT_DIR/ws-sim:
#   purchase-intent simulate; run --models $MODELS [--pretrain] [--backtest $BACKTEST]
#   for each RUN:MODEL:PARAMS: train --model MODEL --run RUN PARAMS, then evaluate --run RUN [--backtest]
# then benchmarks/paired_runs.py --pairs $PAIRS: each run against its reference (paired bootstrap).
# Environment: USERS (default 45000), DAYS (90), MODELS (lightgbm,transformer), PRETRAIN (0; 1 adds
# --pretrain to run), BACKTEST (default 0: the test window only), SEED (0), PAIRS (none: no table),
# LOG (variants.log, in OUT_DIR), REUSE (0; 1 keeps an existing OUT_DIR/ws-sim and only adds the variants).
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:?usage: $0 OUT_DIR RUN:MODEL:PARAMS ...}
shift
USERS=${USERS:-45000}
DAYS=${DAYS:-90}
MODELS=${MODELS:-lightgbm,transformer}
PRETRAIN=${PRETRAIN:-0}
BACKTEST=${BACKTEST:-0}
SEED=${SEED:-0}
PAIRS=${PAIRS:-}
PI=.venv/bin/purchase-intent
mkdir -p "$out"
ws=$out/ws-sim
log=$out/${LOG:-variants.log}
REUSE=${REUSE:-0}
if [ "$REUSE" != 1 ] || [ ! -d "$ws" ]; then REUSE=0; rm -rf "$ws"; fi

step() {  # step ARGS...: one CLI command, echoed and timed into the log
  echo "\$ ${*}" | tee -a "$log"
  local t0=$SECONDS
  "$@" 2>&1 | grep -v '^epoch\|^  epoch' | tee -a "$log"
  echo "== $((SECONDS - t0)) s, load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$log"
}
bt=()
if [ "$BACKTEST" -gt 0 ]; then bt=(--backtest "$BACKTEST"); fi
pt=()
if [ "$PRETRAIN" = 1 ]; then pt=(--pretrain); fi

if [ "$REUSE" = 0 ]; then : >"$log"; fi
echo "== $(date -u +%FT%TZ) nproc $(nproc), load $(cut -d' ' -f1-3 /proc/loadavg), commit" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo '?'), reuse $REUSE" | tee -a "$log"
if [ "$REUSE" = 0 ]; then
  step "$PI" simulate --users "$USERS" --days "$DAYS" --seed 0 --out "$out/sim.parquet"
  step "$PI" --workspace "$ws" run --data "$out/sim.parquet" --format parquet --models "$MODELS" \
    "${pt[@]}" "${bt[@]}" --seed "$SEED"
fi
for spec in "$@"; do
  IFS=: read -r run model params <<<"$spec"
  # shellcheck disable=SC2086
  step "$PI" --workspace "$ws" train --model "$model" --run "$run" $params --seed "$SEED"
  step "$PI" --workspace "$ws" evaluate --run "$run" "${bt[@]}"
done
if [ -n "$PAIRS" ]; then step .venv/bin/python benchmarks/paired_runs.py "$ws" --pairs "$PAIRS"; fi
