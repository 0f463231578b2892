#!/usr/bin/env bash
# The rolling-origin prior through the CLI on the Taobao UserBehavior head slice (user task), one seed:
#   SEED=0 benchmarks/bench_prior_cli.sh OUT_DIR
# Runs, into the fresh workspace OUT_DIR/ws-taobao-user (the README's Taobao window and user task):
#   purchase-intent run ... --models lightgbm,transformer --pretrain --pretrain-objective future --pretrain-rolling
#       --pretrain-max-seq-len 200 --pretrain-epochs 60 --backtest 3
#   purchase-intent train --model transformer --run transformer_prior --param prior=true;   evaluate --backtest 3
#   purchase-intent train --model lightgbm_emb --run lightgbm_prior --param prior=true --param embedding=false; evaluate
# and tees the output to OUT_DIR/taobao-user.log. Several seeds (one OUT_DIR each) are compared, paired on the
# same examples, by benchmarks/seed_summary.py (its command is printed at the end).
# Environment: SEED (default 0), BACKTEST (default 3), DATA_DIR (default ../shared/data), EPOCHS (default 60).
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:?usage: SEED=S $0 OUT_DIR}
SEED=${SEED:-0}
BACKTEST=${BACKTEST:-3}
EPOCHS=${EPOCHS:-60}
DATA_DIR=${DATA_DIR:-../shared/data}
PI=.venv/bin/purchase-intent
taobao=$DATA_DIR/taobao_userbehavior/UserBehavior_head.csv.gz
mkdir -p "$out"
ws=$out/ws-taobao-user
log=$out/taobao-user.log
rm -rf "$ws"

step() {  # step ARGS...: one CLI command, echoed and timed into the log
  echo "\$ ${*}" | tee -a "$log"
  local t0=$SECONDS
  "$@" 2>&1 | grep -v '^pretrain epoch' | tee -a "$log"
  echo "== $((SECONDS - t0)) s, load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$log"
}

echo "== $(date -u +%FT%TZ) seed $SEED, nproc $(nproc), load $(cut -d' ' -f1-3 /proc/loadavg), commit" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo '?')" | tee "$log"
step "$PI" --workspace "$ws" run --data "$taobao" --format taobao \
  --since 2017-11-25T00:00:00+08:00 --until 2017-12-04T00:00:00+08:00 --lookback 3d --horizon 1d --step 1d \
  --models lightgbm,transformer --pretrain --pretrain-objective future --pretrain-rolling \
  --pretrain-max-seq-len 200 --pretrain-epochs "$EPOCHS" --backtest "$BACKTEST" --seed "$SEED"
step "$PI" --workspace "$ws" train --model transformer --run transformer_prior --param prior=true --seed "$SEED"
step "$PI" --workspace "$ws" evaluate --run transformer_prior --backtest "$BACKTEST"
step "$PI" --workspace "$ws" train --model lightgbm_emb --run lightgbm_prior --param prior=true \
  --param embedding=false --seed "$SEED"
step "$PI" --workspace "$ws" evaluate --run lightgbm_prior --backtest "$BACKTEST"
echo "== done $(date -u +%FT%TZ); compare seeds with:" | tee -a "$log"
echo ".venv/bin/python benchmarks/seed_summary.py OUT_DIR_SEED0 OUT_DIR_SEED1 ... --datasets taobao-user" \
  "--pairs transformer_prior:transformer,transformer_prior:lightgbm,lightgbm_prior:lightgbm,transformer:lightgbm" \
  | tee -a "$log"
