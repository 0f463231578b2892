#!/usr/bin/env bash
# The DP fits' tabular scaling, "fixed" (public constants) against "dp" (the DP release of each feature's
# mean and scale and of the share of positives, its ε accounted with the training), on small simulated
# shops, through the CLI:
#   benchmarks/bench_dp_scaling.sh OUT_DIR
# For each shop size U in SIZES: benchmarks/bench_variants.sh OUT_DIR/uU (simulate U users x DAYS days,
# `run --models logreg,transformer --backtest $BACKTEST`), then DP logistic regression and the DP
# Transformer at each ε in EPSILONS with `--param tabular_scaling=fixed` and `=dp` (`train`, `evaluate
# --backtest`), then benchmarks/paired_runs.py: dp against fixed, and each against its non-private model.
# Environment: SIZES (default "800 2000"), DAYS (90), EPSILONS (default "8 3"), BACKTEST (2), SEED (0).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: $0 OUT_DIR}
SIZES=${SIZES:-800 2000}
EPSILONS=${EPSILONS:-8 3}
for u in $SIZES; do
  variants=() pairs=()
  for e in $EPSILONS; do
    for m in logreg transformer; do
      for s in fixed dp; do
        variants+=("$m-dp$e-$s:$m:--param dp_epsilon=$e --param tabular_scaling=$s")
        pairs+=("$m-dp$e-$s:$m")
      done
      pairs+=("$m-dp$e-dp:$m-dp$e-fixed")
    done
  done
  USERS=$u MODELS=logreg,transformer PRETRAIN=0 BACKTEST=${BACKTEST:-2} LOG=dp-scaling.log \
    PAIRS=$(IFS=,; echo "${pairs[*]}") benchmarks/bench_variants.sh "$out/u$u" "${variants[@]}"
done
