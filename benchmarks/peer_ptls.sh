#!/usr/bin/env bash
# Side-by-side with pytorch-lifestream (ptls): its CoLES + LightGBM recipe on exactly our examples and
# backtest folds, compared with our lightgbm and lightgbm_emb in the same run (benchmarks/peer_ptls.py).
#
#   benchmarks/peer_ptls.sh OUT_DIR [taobao|sim]      (from the repository root; default: taobao)
#
# Stages: our CLI (`run ... --models lightgbm,lightgbm_emb --pretrain --backtest K`) into OUT_DIR/ws,
# `peer_ptls.py export` (our venv), `peer_ptls.py fit` (the ptls venv), `peer_ptls.py compare` (our venv).
# Logs and the table go to OUT_DIR. Keep OUT_DIR outside the repository.
#
# The peer's virtualenv (PEER_PYTHON, default /work/bench-out/ptls-venv/bin/python) is separate from ours:
#   python3 -m venv V && V/bin/pip install torch==2.13.0 && \
#       V/bin/pip install pytorch-lifestream lightgbm duckdb pyarrow pandas scikit-learn
# (on a CPU-only machine install the CPU build of torch, e.g. from https://download.pytorch.org/whl/cpu)
#
# Environment knobs: PEER_PYTHON, PI (our CLI, default .venv/bin/purchase-intent), PY (our python,
# default .venv/bin/python), EPOCHS (CoLES epochs, default 20), FIT_ARGS (more `fit` options),
# SIM_USERS (default 3000), SIM_DAYS (default 63), SIM_BACKTEST (default 2).
set -euo pipefail

OUT=${1:?usage: benchmarks/peer_ptls.sh OUT_DIR [taobao|sim]}
DATA=${2:-taobao}
PEER_PYTHON=${PEER_PYTHON:-/work/bench-out/ptls-venv/bin/python}
PI=${PI:-.venv/bin/purchase-intent}
PY=${PY:-.venv/bin/python}
EPOCHS=${EPOCHS:-20}
FIT_ARGS=${FIT_ARGS:-}
mkdir -p "$OUT"
WS=$OUT/ws

stamp() { echo "$1 $(date -u +%FT%TZ) nproc=$(nproc) load=$(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.log"; }
stamp start

case $DATA in
  taobao)
    K=3
    set -x
    "$PI" --workspace "$WS" run --data ../shared/data/taobao_userbehavior/UserBehavior_head.csv.gz \
      --format taobao --since 2017-11-25T00:00:00+08:00 --until 2017-12-04T00:00:00+08:00 \
      --lookback 3d --horizon 1d --step 1d --backtest $K --models lightgbm,lightgbm_emb --pretrain \
      > "$OUT/ours.log" 2>&1
    { set +x; } 2>/dev/null
    ;;
  sim)
    K=${SIM_BACKTEST:-2}
    U=${SIM_USERS:-3000}
    D=${SIM_DAYS:-63}
    set -x
    "$PI" simulate --users "$U" --days "$D" --out "$OUT/sim-${U}u-${D}d.csv.gz" > "$OUT/simulate.log" 2>&1
    "$PI" --workspace "$WS" run --data "$OUT/sim-${U}u-${D}d.csv.gz" --format csv \
      --models lightgbm,lightgbm_emb --pretrain --backtest "$K" > "$OUT/ours.log" 2>&1
    { set +x; } 2>/dev/null
    ;;
  *) echo "unknown data set $DATA (taobao|sim)" >&2; exit 2 ;;
esac
stamp ours-done

set -x
"$PY" benchmarks/peer_ptls.py export --workspace "$WS" --backtest "$K" --out "$OUT/export" > "$OUT/export.log" 2>&1
# shellcheck disable=SC2086
"$PEER_PYTHON" benchmarks/peer_ptls.py fit --data "$OUT/export" --out "$OUT/peer" --epochs "$EPOCHS" $FIT_ARGS \
  > "$OUT/fit.log" 2>&1
{ set +x; } 2>/dev/null
stamp peer-done
set -x
"$PY" benchmarks/peer_ptls.py compare --workspace "$WS" --peer "$OUT/peer" --out "$OUT/table.md" \
  2>&1 | tee "$OUT/compare.log"
{ set +x; } 2>/dev/null
stamp end
