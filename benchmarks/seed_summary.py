"""The same CLI runs under several seeds: each model's ROC-AUC and each pair's difference, over the seeds.

    for s in 0 1 2; do
        SEED=$s benchmarks/bench_pretrain_quality.sh --datasets taobao-user,taobao-session out/seed$s
    done
    .venv/bin/python benchmarks/seed_summary.py out/seed0 out/seed1 out/seed2 --datasets taobao-user,taobao-session

Each OUT_DIR holds one seed's workspaces ``ws-NAME`` (``bench_pretrain_quality.sh`` with ``SEED``). For
each dataset, section (test window, pooled backtest) and pair ``MODEL:REFERENCE``, the difference in
ROC-AUC is computed per seed on the same examples, then given as the mean over the seeds with a 95% t
interval over them and the number of seeds in which it is above zero. A single run's paired bootstrap
interval covers the test examples' noise but not the spread between seeds (encoder and models), which
is what this adds.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

from purchase_intent import runs
from purchase_intent.workspace import Workspace

SECTIONS = (("test", "test window", []), ("backtest", "pooled backtest", ["fold"]))


def section_auc(ws: Workspace, model: str, section: str) -> tuple[float, "np.ndarray", "np.ndarray"] | None:
    """ROC-AUC of a run's predictions in a section, with its (example_id[, fold]) keys and labels; None
    when the run or the section is missing."""
    if not ws.run_dir(model).exists():
        return None
    p = runs.read_predictions(ws.run_dir(model))
    p = p[p["split"] == section]
    if p.empty:
        return None
    return roc_auc_score(p["label"], p["probability"]), p


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dirs", nargs="+", help="one bench_pretrain_quality.sh OUT_DIR per seed")
    ap.add_argument("--datasets", default="taobao-user,taobao-session", help="NAME of each ws-NAME workspace")
    ap.add_argument("--pairs", default="transformer_pt:transformer,lightgbm_emb:lightgbm,transformer_pt:lightgbm,"
                    "transformer:lightgbm", help="MODEL:REFERENCE,...")
    args = ap.parse_args()
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    models = list(dict.fromkeys(m for p in pairs for m in p))
    n = len(args.out_dirs)
    print(f"{n} seeds: {', '.join(args.out_dirs)}")
    models_rows, pair_rows = [], []
    for name in args.datasets.split(","):
        wss = [Workspace(Path(d) / f"ws-{name}") for d in args.out_dirs]
        for section, label, key in SECTIONS:
            got = {m: [section_auc(ws, m, section) for ws in wss] for m in models}
            for m, rs in got.items():
                if all(r is not None for r in rs):
                    auc = np.array([r[0] for r in rs])
                    models_rows.append(f"| {name} | {label} | {m} | {' / '.join(f'{v:.4f}' for v in auc)} | "
                                       f"{auc.mean():.4f} |")
            for model, ref in pairs:
                if any(r is None for r in got[model] + got[ref]):
                    continue
                for (_, a), (_, b) in zip(got[model], got[ref]):  # the same examples in both runs of a seed
                    ka = a[["example_id", *key]].sort_values(["example_id", *key]).to_numpy()
                    kb = b[["example_id", *key]].sort_values(["example_id", *key]).to_numpy()
                    if not np.array_equal(ka, kb):
                        raise SystemExit(f"error: {model} and {ref} in {name} were scored on other examples")
                d = np.array([r[0] for r in got[model]]) - np.array([r[0] for r in got[ref]])
                half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")
                pair_rows.append(f"| {name} | {label} | {model} | {ref} | {' / '.join(f'{v:+.4f}' for v in d)} | "
                                 f"{d.mean():+.4f} [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}] | "
                                 f"{int((d > 0).sum())} of {n} |")
    print("\n| dataset | section | model | ROC-AUC per seed | mean |\n|---|---|---|---|---|")
    print("\n".join(models_rows))
    print("\n| dataset | section | model | reference | ΔROC-AUC per seed | mean [95% t interval] | seeds > 0 |\n"
          "|---|---|---|---|---|---|---|")
    print("\n".join(pair_rows))

if __name__ == "__main__":
    main()
