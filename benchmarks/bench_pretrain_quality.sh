#!/usr/bin/env bash
# Quality of the pretrained models through the CLI, one fresh workspace per dataset:
#   benchmarks/bench_pretrain_quality.sh [--quick] [--datasets LIST] OUT_DIR
# Each dataset runs `purchase-intent run ... --models lightgbm,transformer,lightgbm_emb,transformer_pt
# --pretrain --backtest K` into OUT_DIR/ws-NAME and tees the CLI's output to OUT_DIR/NAME.log; the
# pooled backtest table it prints (paired 95% intervals against the best baseline) is the result.
# OUT_DIR/timings.tsv gets one row per run: name, start, end, seconds, load average at start and end.
# After each run, the paired differences the table does not print (transformer_pt against the
# from-scratch transformer; the same function and 1,000 resamples as the table) go to NAME.pairs.txt.
#
# Datasets (LIST is comma-separated, run in the order given; default taobao-user,taobao-session,sim):
#   taobao-user     Taobao UserBehavior head slice, user task, as in README.md
#   taobao-session  the same slice, session task (30-minute gaps), as in README.md
#   sim             the simulated shop: `purchase-intent simulate --users 20000 --days 90 --seed 0`,
#                   default build (lookback 28d, horizon 7d, step 7d): 91k examples; SIM_USERS=45000
#                   gives 206k (the Transformer quality runs' size in BENCHMARKS.md)
# --quick: the simulated shop only, 3000 users x 80 days, --backtest 2 (a dry run of a few minutes).
# Environment: SIM_USERS, SIM_DAYS, BACKTEST override the sizes; DATA_DIR the datasets' folder
# (default ../shared/data); MODELS the model list; SEED the runs' --seed (default 0). Several seeds, one
# OUT_DIR each, are summarised by benchmarks/seed_summary.py.
# On 2 shared CPU cores: about 30 minutes by default, about an hour more with SIM_USERS=45000 (each
# Transformer trains K+1 times). Results of 2026-12-05: benchmarks/results/pretrain_quality.md.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
datasets=""
out=""
while (( $# )); do
  case $1 in
    --quick) quick=1 ;;
    --datasets) datasets=$2; shift ;;
    --datasets=*) datasets=${1#*=} ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    -*) echo "unknown option: $1" >&2; exit 2 ;;
    *) [[ -z $out ]] || { echo "one OUT_DIR only" >&2; exit 2; }; out=$1 ;;
  esac
  shift
done
[[ -n $out ]] || { echo "usage: $0 [--quick] [--datasets LIST] OUT_DIR" >&2; exit 2; }

if (( quick )); then
  : "${SIM_USERS:=3000}" "${SIM_DAYS:=80}" "${BACKTEST:=2}"
  datasets=${datasets:-sim}
fi
SIM_USERS=${SIM_USERS:-20000}
SIM_DAYS=${SIM_DAYS:-90}
BACKTEST=${BACKTEST:-3}
DATA_DIR=${DATA_DIR:-../shared/data}
MODELS=${MODELS:-lightgbm,transformer,lightgbm_emb,transformer_pt}
SEED=${SEED:-0}
datasets=${datasets:-taobao-user,taobao-session,sim}
PI=.venv/bin/purchase-intent
taobao=$DATA_DIR/taobao_userbehavior/UserBehavior_head.csv.gz
window=(--since 2017-11-25T00:00:00+08:00 --until 2017-12-04T00:00:00+08:00)

mkdir -p "$out"
out=$(cd "$out" && pwd)
timings=$out/timings.tsv
[[ -s $timings ]] || printf 'name\tstart_utc\tend_utc\tseconds\tload_start\tload_end\n' >"$timings"

{
  echo "== $(date -u +%FT%TZ) $(uname -srm), nproc $(nproc), load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "== commit $(git rev-parse --short HEAD 2>/dev/null || echo '?');" \
    "uncommitted files in purchase_intent/: $(git status --short -- purchase_intent 2>/dev/null | wc -l)," \
    "diff sha1 $(git diff HEAD -- purchase_intent 2>/dev/null | sha1sum | cut -c1-12)"
  echo "== datasets $datasets; backtest $BACKTEST; models $MODELS; sim ${SIM_USERS}x${SIM_DAYS}; seed $SEED"
} | tee -a "$out/machine.txt"

# pairs WORKSPACE MODEL:REFERENCE,...: paired ROC-AUC and PR-AUC differences of two trained runs on the
# test window and the pooled backtest, computed as the CLI's table computes them against its reference
pairs() {
  .venv/bin/python - "$@" <<'PY'
import sys

from purchase_intent import runs
from purchase_intent.pipeline import paired_by_section
from purchase_intent.workspace import Workspace

ws = Workspace(sys.argv[1])
SECTIONS = {"test": "test window", "backtest": "pooled backtest"}


def fmt(d):
    return f"{d['diff']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]" if d["ci"] else f"{d['diff']:+.4f}"


print(f"{'model':<15} {'reference':<12} {'section':<16} {'ΔROC-AUC [95% CI]':<30} ΔPR-AUC [95% CI]")
for pair in sys.argv[2].split(","):
    model, ref = pair.split(":")
    if not (ws.run_dir(model).exists() and ws.run_dir(ref).exists()):
        continue
    pm, pr = runs.read_predictions(ws.run_dir(model)), runs.read_predictions(ws.run_dir(ref))
    for section, d in paired_by_section(pm, pr).items():
        print(f"{model:<15} {ref:<12} {SECTIONS[section]:<16} {fmt(d):<30} {fmt(d['pr_auc'])}")
PY
}

# run NAME ARGS...: `purchase-intent --workspace OUT/ws-NAME run ARGS... (common flags)` into a fresh workspace
run() {
  local name=$1; shift
  local ws=$out/ws-$name log=$out/$name.log
  rm -rf "$ws"
  local cmd=("$PI" --workspace "$ws" run "$@" --models "$MODELS" --pretrain --backtest "$BACKTEST" --seed "$SEED")
  local t0 load0 start
  start=$(date -u +%FT%TZ); load0=$(cut -d' ' -f1-3 /proc/loadavg); t0=$SECONDS
  {
    echo "== $name: start $start, nproc $(nproc), load $load0"
    echo "\$ ${cmd[*]}"
  } | tee "$log"
  /usr/bin/time -f "== max RSS %M KiB, %e s wall, %U s user, %S s sys" "${cmd[@]}" 2>&1 | tee -a "$log"
  local secs=$((SECONDS - t0)) end load1
  end=$(date -u +%FT%TZ); load1=$(cut -d' ' -f1-3 /proc/loadavg)
  echo "== $name: end $end, ${secs}s, load $load1" | tee -a "$log"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$start" "$end" "$secs" "$load0" "$load1" >>"$timings"
  pairs "$ws" transformer_pt:transformer,lightgbm_emb:lightgbm,transformer_pt:lightgbm | tee "$out/$name.pairs.txt"
}

IFS=, read -r -a names <<<"$datasets"
for name in "${names[@]}"; do
  case $name in
    taobao-user)
      run taobao-user --data "$taobao" --format taobao "${window[@]}" \
        --lookback 3d --horizon 1d --step 1d ;;
    taobao-session)
      run taobao-session --data "$taobao" --format taobao "${window[@]}" \
        --task session --session-gap 30min --step 1d ;;
    sim)
      events=$out/sim-${SIM_USERS}x${SIM_DAYS}-seed0.parquet
      [[ -s $events ]] || "$PI" simulate --users "$SIM_USERS" --days "$SIM_DAYS" --seed 0 --out "$events" \
        | tee -a "$out/machine.txt"
      run "sim-${SIM_USERS}x${SIM_DAYS}" --data "$events" --format parquet ;;
    *) echo "unknown dataset: $name (taobao-user, taobao-session, sim)" >&2; exit 2 ;;
  esac
done
echo "== done $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/machine.txt"
