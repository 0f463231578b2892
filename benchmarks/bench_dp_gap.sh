#!/usr/bin/env bash
# Where the DP Transformer's utility goes: train named variants of the Transformer into a workspace
# that benchmarks/bench_dp.sh made (it holds the non-private run `transformer`), evaluate each on the
# test window, and print each one's paired ROC-AUC / PR-AUC difference to `transformer`:
#   benchmarks/bench_dp_gap.sh WORKSPACE NAME='PARAMS' [NAME='PARAMS' ...]
# PARAMS are `train --param` values separated by spaces, e.g.
#   benchmarks/bench_dp_gap.sh out/ws-sim-10000x90 \
#     lr3e3='dp_epsilon=1000 dp_lr=3e-3' noprice='drop_fields=["item","price"]'
# Each variant becomes the run NAME (an existing run NAME is kept and only re-tabled, so a stopped
# call can be resumed with the same arguments). JOBS=2 trains two variants at a time, each in a copy
# of the workspace (WORKSPACE.copy-NAME), and moves its run back; default 1. The CLI's output goes to
# WORKSPACE/../gap.log (wall time and load per command), the table to stdout and WORKSPACE/../gap.txt.
# MODEL=logreg trains the variants as logistic regression (default transformer); REF=RUN tables the
# differences to the run RUN instead of the non-private run of MODEL (e.g. REF=transformer-dp8: a
# variant against the DP default; the table then goes to WORKSPACE/../gap-REF.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 2 ]] || { sed -n '2,12p' "$0" >&2; exit 2; }
ws=$(cd "$1" && pwd); shift
JOBS=${JOBS:-1}
MODEL=${MODEL:-transformer}
REF=${REF:-$MODEL}
PI=$PWD/.venv/bin/purchase-intent
log=$(dirname "$ws")/gap.log
[[ -d $ws/runs/$REF ]] || { echo "$ws has no run '$REF': run benchmarks/bench_dp.sh first" >&2; exit 2; }
table=$(dirname "$ws")/gap.txt
[[ $REF == "$MODEL" ]] || table=$(dirname "$ws")/gap-$REF.txt

# one VARIANT in workspace W: train and evaluate run NAME, logged with wall time and load
one() {
  local w=$1 name=$2 params=$3 args=() p t0=$SECONDS rc=0
  for p in $params; do args+=(--param "$p"); done
  {
    echo "\$ train --run $name ${args[*]} # start $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
    "$PI" --workspace "$w" train --model "$MODEL" --run "$name" "${args[@]}" \
      && "$PI" --workspace "$w" evaluate --run "$name" --backtest 0 || rc=$?
    echo "== $name: $((SECONDS - t0))s, rc $rc, load $(cut -d' ' -f1-3 /proc/loadavg)"
  } >"$w.$name.log" 2>&1
  cat "$w.$name.log" >>"$log"
}

names=() pending=()
for v in "$@"; do
  name=${v%%=*}; params=${v#*=}
  names+=("$name")
  [[ -d $ws/runs/$name ]] || pending+=("$name=$params")
done
i=0
while (( i < ${#pending[@]} )); do
  pids=()
  for (( j = 0; j < JOBS && i < ${#pending[@]}; j++, i++ )); do  # j counts this batch's jobs
    v=${pending[$i]}; name=${v%%=*}; params=${v#*=}
    if (( JOBS > 1 )); then
      c=$ws.copy-$name  # one copy per variant: two calls on one workspace never share a copy
      rm -rf "$c"; cp -r "$ws" "$c"
      ( one "$c" "$name" "$params"; [[ -d $c/runs/$name ]] && mv "$c/runs/$name" "$ws/runs/$name"
        rm -rf "$c" ) &
    else
      one "$ws" "$name" "$params" &
    fi
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
done

.venv/bin/python - "$ws" "$REF" "${names[@]}" <<'PY' | tee "$table"
import json
import sys

from purchase_intent import runs
from purchase_intent.pipeline import paired_by_section
from purchase_intent.workspace import Workspace

ws = Workspace(sys.argv[1])
ref_name = sys.argv[2]
ref = runs.read_predictions(ws.run_dir(ref_name))
m0 = json.loads((ws.run_dir(ref_name) / runs.METRICS_JSON).read_text())["test"]


def fmt(d):
    return f"{d['diff']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"


print(f"{'run':<14} {'ε spent':>8} {'steps':>5} {'ROC-AUC':>7} {'PR-AUC':>7} {'ΔROC-AUC [95% CI]':<26} ΔPR-AUC [95% CI]")
print(f"{ref_name:<14} {'-':>8} {'-':>5} {m0['roc_auc']:7.4f} {m0['pr_auc']:7.4f} (reference)")
for name in sys.argv[3:]:
    d = ws.run_dir(name)
    if not (d / runs.METRICS_JSON).exists():
        print(f"{name:<14} failed (see gap.log)")
        continue
    met = json.loads((d / runs.METRICS_JSON).read_text())
    pv = met.get("privacy") or {}
    diff = paired_by_section(runs.read_predictions(d), ref)["test"]
    eps = f"{pv['epsilon']:8.3f}" if pv else f"{'∞':>8}"
    steps = f"{pv['steps']:5d}" if pv else f"{'-':>5}"
    print(f"{name:<14} {eps} {steps} {met['test']['roc_auc']:7.4f} {met['test']['pr_auc']:7.4f} "
          f"{fmt(diff):<26} {fmt(diff['pr_auc'])}")
PY
