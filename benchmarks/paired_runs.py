"""Paired ROC-AUC and PR-AUC differences between runs of one workspace, on the same examples.

    .venv/bin/python benchmarks/paired_runs.py WORKSPACE --pairs transformer_bins16:transformer,transformer:lightgbm

For each pair ``MODEL:REFERENCE`` and section (test window; pooled backtest where both runs have one), the
runs' saved predictions are joined on their example (and fold) and compared with
``evaluate.paired_auc_difference``: the difference with a paired stratified-bootstrap 95% interval (the same
resamples for both runs). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from sklearn.metrics import roc_auc_score

from purchase_intent import runs
from purchase_intent.evaluate import paired_auc_difference
from purchase_intent.workspace import Workspace

SECTIONS = (("test", "test window"), ("backtest", "pooled backtest"))


def fmt(d: dict) -> str:
    return "-" if d.get("diff") is None else f"{d['diff']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--pairs", required=True, help="MODEL:REFERENCE,... (run names)")
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()
    ws = Workspace(args.workspace)
    print("| model | reference | section | n | model ROC-AUC | reference ROC-AUC | ΔROC-AUC [95% CI] "
          "| ΔPR-AUC [95% CI] |")
    print("|---|---|---|---:|---:|---:|---|---|")
    for pair in args.pairs.split(","):
        model, ref = pair.split(":")
        pm, pr = runs.read_predictions(ws.run_dir(model)), runs.read_predictions(ws.run_dir(ref))
        for section, label in SECTIONS:
            a, b = pm[pm["split"] == section], pr[pr["split"] == section]
            if a.empty or b.empty:
                continue
            key = [k for k in ("example_id", "fold") if k in a.columns and k in b.columns]
            j = a.merge(b, on=key, suffixes=("_m", "_r"))
            d = paired_auc_difference(j["label_m"].to_numpy(), j["probability_m"].to_numpy(),
                                      j["probability_r"].to_numpy(), n_boot=args.n_boot)
            print(f"| {model} | {ref} | {label} | {len(j):,} | {roc_auc_score(j['label_m'], j['probability_m']):.4f} "
                  f"| {roc_auc_score(j['label_m'], j['probability_r']):.4f} | {fmt(d)} | {fmt(d['pr_auc'])} |")


if __name__ == "__main__":
    main()
