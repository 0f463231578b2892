"""Paired ROC-AUC and PR-AUC differences between runs of one workspace, on the same examples.

    .venv/bin/python benchmarks/paired_runs.py WORKSPACE --pairs transformer_bins16:transformer,transformer:lightgbm

For each pair ``MODEL:REFERENCE`` and section (test window; pooled backtest where both runs have one), the
runs' saved predictions are compared as ``purchase-intent run`` compares a model with its reference
(``pipeline.paired_by_section``: the difference with a paired stratified-bootstrap 95% interval, the same
resamples for both runs). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sklearn.metrics import roc_auc_score

from purchase_intent import runs
from purchase_intent.pipeline import paired_by_section
from purchase_intent.workspace import Workspace

SECTIONS = {"test": "test window", "backtest": "pooled backtest"}


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
        missing = [r for r in (model, ref) if not (ws.run_dir(r) / runs.PREDICTIONS).exists()]
        if missing:  # not trained, or trained and not yet evaluated
            print(f"skipped {pair}: no predictions for {', '.join(missing)} (train and evaluate it first)",
                  file=sys.stderr)
            continue
        pm, pr = runs.read_predictions(ws.run_dir(model)), runs.read_predictions(ws.run_dir(ref))
        for section, d in paired_by_section(pm, pr, args.n_boot).items():
            j = pm[pm["split"] == section].merge(pr[pr["split"] == section], on=["example_id"] + (
                ["fold"] if section == "backtest" else []), suffixes=("", "_ref"))
            print(f"| {model} | {ref} | {SECTIONS[section]} | {len(j):,} "
                  f"| {roc_auc_score(j['label'], j['probability']):.4f} "
                  f"| {roc_auc_score(j['label'], j['probability_ref']):.4f} | {fmt(d)} | {fmt(d['pr_auc'])} |")


if __name__ == "__main__":
    main()
