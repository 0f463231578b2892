"""How many seeds: every subset of several runs, scored by the mean of their logits, against a reference.

    python benchmarks/seed_subsets.py --workspace /tmp/pi-bq/sim-45000u \
        --members transformer,tx_seed1,tx_seed2,tx_seed3,tx_seed4 --reference lightgbm --paired '0-2;0-3'

The members are runs of one model trained with different seeds (``bench_quality.py --sections
seeds``). For each subset size k, every subset of k members is scored by the mean of its members'
logits (from their saved, calibrated ``predictions.parquet``: each member's logit carries its own
calibration, so this is a close proxy of the estimator's ``n_seeds``, which calibrates the mean
once), and its ROC-AUC difference to the reference run is reported as the mean over the subsets
with the smallest and largest, on the test window and, when all runs were backtested, on the
pooled backtest. ``--paired`` adds, for the given subsets (member positions, ``0-2`` = the first
three, ``0,2,4`` = those), the paired bootstrap 95% intervals of the ROC-AUC and PR-AUC differences
(``evaluate.paired_difference``, ``--n-boot`` resamples).
"""
from __future__ import annotations

import argparse
import itertools
import os

import numpy as np
import pandas as pd

SECTIONS = {"test": ["example_id"], "backtest": ["example_id", "fold"]}


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-9, 1 - 1e-9)
    return np.log(p / (1 - p))


def aligned(ws: str, runs: list[str], section: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Labels (n,) and probabilities (n, len(runs)) of ``section`` rows present in every run, or None."""
    keys = SECTIONS[section]
    merged = None
    for i, r in enumerate(runs):
        path = os.path.join(ws, "runs", r, "predictions.parquet")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: evaluate run {r!r} first")
        pred = pd.read_parquet(path)
        pred = pred[pred["split"] == section][keys + ["label", "probability"]]
        if pred.empty:
            return None
        pred = pred.rename(columns={"probability": f"p{i}", "label": f"y{i}"})
        merged = pred if merged is None else merged.merge(pred, on=keys)
    if merged is None or merged.empty:
        return None
    y = merged["y0"].to_numpy()
    if any((merged[f"y{i}"].to_numpy() != y).any() for i in range(1, len(runs))):
        raise ValueError(f"runs disagree on the {section} labels: were they evaluated on the same build?")
    return y.astype(int), merged[[f"p{i}" for i in range(len(runs))]].to_numpy(np.float64)


def subset_probability(p_members: np.ndarray, subset: tuple[int, ...]) -> np.ndarray:
    """The probability of the mean of the subset's logits."""
    return 1 / (1 + np.exp(-_logit(p_members[:, list(subset)]).mean(axis=1)))


def parse_subset(text: str, n: int) -> tuple[int, ...]:
    if "-" in text:
        lo, hi = (int(x) for x in text.split("-"))
        out = tuple(range(lo, hi + 1))
    else:
        out = tuple(int(x) for x in text.split(","))
    if not out or min(out) < 0 or max(out) >= n:
        raise ValueError(f"subset {text!r}: member positions must lie in 0..{n - 1}")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--members", required=True, help="comma-separated runs (one per seed)")
    ap.add_argument("--reference", default="lightgbm")
    ap.add_argument("--paired", default="", help="subsets for paired intervals, by ';' or spaces: '0-2;0,1,3'")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = ap.parse_args(argv)
    from purchase_intent.evaluate import paired_difference, roc_auc

    members = [m for m in args.members.split(",") if m]
    runs = members + [args.reference]
    result: dict = {}
    for section in SECTIONS:
        data = aligned(args.workspace, runs, section)
        if data is None:
            continue
        y, p = data
        ref_auc = roc_auc(y, p[:, -1])
        rows = []
        for k in range(1, len(members) + 1):
            subsets = itertools.combinations(range(len(members)), k)
            diffs = [roc_auc(y, subset_probability(p, s)) - ref_auc for s in subsets]
            rows.append({"k": k, "subsets": len(diffs), "mean": float(np.mean(diffs)), "min": float(min(diffs)),
                         "max": float(max(diffs))})
        paired = {}
        for text in (t for t in args.paired.replace(";", " ").split() if t):
            s = parse_subset(text, len(members))
            paired[text] = paired_difference(y, subset_probability(p, s), p[:, -1], ("roc_auc", "pr_auc"),
                                             n_boot=args.n_boot, seed=args.seed)
        result[section] = {"n": int(y.size), "reference_roc_auc": ref_auc, "subsets": rows, "paired": paired}
        print(f"{section} (n={y.size:,}): ΔROC-AUC of the mean-logit subsets vs {args.reference} "
              f"({ref_auc:.4f}); mean (smallest, largest)")
        for r in rows:
            extra = "" if r["subsets"] == 1 else f" ({r['min']:+.4f}, {r['max']:+.4f})"
            print(f"  k={r['k']}  {r['subsets']:3d} subsets  {r['mean']:+.4f}{extra}")
        for text, d in paired.items():
            names = ",".join(members[i] for i in parse_subset(text, len(members)))
            print(f"  paired, {names}: " + "; ".join(
                f"Δ{m} {v['diff']:+.4f} [{v['ci'][0]:+.4f}, {v['ci'][1]:+.4f}]" if v["ci"] else f"Δ{m} {v['diff']}"
                for m, v in d.items()) + f" ({args.n_boot} resamples)")
    if not result:
        raise ValueError("no test or backtest rows common to all runs")
    return result


if __name__ == "__main__":
    main()
