#!/usr/bin/env bash
# The tabular features' piecewise-linear encoding (`--param tabular_bins=K`) through the CLI, on the simulated
# shop of the >= 200k-example goals (45,000 users x 90 days, seed 0: 206,175 examples):
#   benchmarks/bench_tabular_bins.sh OUT_DIR
# Runs, into the fresh workspace OUT_DIR/ws-sim (benchmarks/bench_variants.sh):
#   purchase-intent simulate; run --models lightgbm,transformer --backtest $BACKTEST
#   train (+ evaluate --backtest) transformer with tabular_bins=$BINS, and the features-only network
#   (inputs=tabular) with tabular_bins 0 and $BINS
# then benchmarks/paired_runs.py: each against its reference on the same examples (paired bootstrap).
# Environment: USERS (default 45000), DAYS (90), BINS (16), BACKTEST (default 0: the test window only), SEED (0).
set -euo pipefail
cd "$(dirname "$0")/.."
BINS=${BINS:-16}
MODELS=lightgbm,transformer PRETRAIN=0 LOG=tabular-bins.log \
  PAIRS=transformer_bins:transformer,transformer_bins:lightgbm,transformer:lightgbm,mlp_bins:mlp,mlp:lightgbm,mlp_bins:lightgbm \
  exec benchmarks/bench_variants.sh "${1:?usage: $0 OUT_DIR}" \
  "transformer_bins:transformer:--param tabular_bins=$BINS" \
  "mlp:transformer:--param inputs=tabular" \
  "mlp_bins:transformer:--param inputs=tabular --param tabular_bins=$BINS"
