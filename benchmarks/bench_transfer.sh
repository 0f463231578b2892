#!/usr/bin/env bash
# Does an encoder pretrained on a large shop help a small one? The CLI path, end to end:
#
#     benchmarks/bench_transfer.sh OUT_DIR            # A: 10,000 users; B: 1,500 users; 63 days each
#     A_USERS=3000 B_USERS=800 benchmarks/bench_transfer.sh OUT_DIR   # a quick dry run
#
# Shop A (simulator seed 1) is ingested and its encoder pretrained on every event. Shop B (seed 2, another
# population of users) runs twice, the same models and backtest each time:
#   own       `run --pretrain`                         B's encoder pretrained on B's events only
#   transfer  `run --pretrain --pretrain-init A/...`   A's encoder, then the same epochs on B's events
# LightGBM and the from-scratch Transformer are in both runs (the same seeds: the same results), so each
# table's paired intervals compare the pretrained models with them on the same examples. Logs: OUT_DIR/*.log.
set -euo pipefail
OUT=${1:?usage: bench_transfer.sh OUT_DIR}
PI=${PI:-.venv/bin/purchase-intent}
A_USERS=${A_USERS:-10000}
B_USERS=${B_USERS:-1500}
DAYS=${DAYS:-63}
BACKTEST=${BACKTEST:-2}
EPOCHS=${EPOCHS:-4}
MODELS=lightgbm,transformer,transformer_pt,lightgbm_emb
# one pseudonym key for both B workspaces: the same pseudonyms, so the same example order, so LightGBM and the
# from-scratch Transformer give the same results in both runs (with a key per workspace they differ by chance)
export PURCHASE_INTENT_PSEUDONYM_KEY=${PURCHASE_INTENT_PSEUDONYM_KEY:-bench-transfer-not-secret}
mkdir -p "$OUT"
echo "date: $(date -u +%FT%TZ); machine: $(nproc) cores, $(uname -m); load: $(cut -d' ' -f1-3 /proc/loadavg)" \
  | tee "$OUT/machine.log"
[ -f "$OUT/a.csv.gz" ] || $PI simulate --users "$A_USERS" --days "$DAYS" --seed 1 --out "$OUT/a.csv.gz"
[ -f "$OUT/b.csv.gz" ] || $PI simulate --users "$B_USERS" --days "$DAYS" --seed 2 --out "$OUT/b.csv.gz"

rm -rf "$OUT/ws-a" "$OUT/ws-b-own" "$OUT/ws-b-transfer"
start=$(date +%s)
$PI --workspace "$OUT/ws-a" ingest "$OUT/a.csv.gz" 2>&1 | tee "$OUT/a.log"
$PI --workspace "$OUT/ws-a" pretrain --cutoff all --epochs "$EPOCHS" 2>&1 | tee -a "$OUT/a.log"
echo "shop A: $(( $(date +%s) - start )) s" | tee -a "$OUT/a.log"

for variant in own transfer; do
  init=()
  [ "$variant" = transfer ] && init=(--pretrain-init "$OUT/ws-a/runs/pretrained")
  start=$(date +%s)
  $PI --workspace "$OUT/ws-b-$variant" run --data "$OUT/b.csv.gz" --models "$MODELS" --backtest "$BACKTEST" \
      --pretrain --pretrain-epochs "$EPOCHS" "${init[@]}" 2>&1 | tee "$OUT/b-$variant.log"
  echo "shop B, $variant encoder: $(( $(date +%s) - start )) s" | tee -a "$OUT/b-$variant.log"
done
echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.log"
