"""Tabular mode over several split seeds: how much of a model comparison is the split alone.

    python benchmarks/tabular_seeds.py \
        --table ../shared/data/uci_online_shoppers_intention/online_shoppers_intention.csv --label Revenue

For each seed in ``--seeds`` (default 0-4) it runs ``tabular.run_table`` with the seeded stratified
70/10/20 split (the default protocol without ``--time-column``; the seed also seeds the models and
the bootstrap) and prints one line per model and seed: test ROC-AUC, PR-AUC, and the paired
difference to the best baseline with its bootstrap 95% interval for ROC-AUC and PR-AUC. The last
lines give each model's ROC-AUC range over the seeds. ``--json`` also writes the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", required=True, help="CSV or Parquet, one row per example")
    ap.add_argument("--label", required=True)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--models", default="logreg,lightgbm")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    from purchase_intent.tabular import run_table

    warnings.filterwarnings("ignore", message="no time column given")  # the protocol here, said in the docstring
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        t = time.perf_counter()
        res = run_table(args.table, args.label, models=args.models.split(","), seed=seed, n_boot=args.n_boot,
                        verbose=False)
        for name, m in res["models"].items():
            pair = res["paired"].get(name, {})
            rows.append({"seed": seed, "model": name, "n_test": m["test"]["n"], "roc_auc": m["test"]["roc_auc"],
                         "pr_auc": m["test"]["pr_auc"], "reference": pair.get("reference"),
                         "d_roc_auc": pair.get("diff"), "d_roc_auc_ci": pair.get("ci"),
                         "d_pr_auc": (pair.get("pr_auc") or {}).get("diff"),
                         "d_pr_auc_ci": (pair.get("pr_auc") or {}).get("ci")})
            r = rows[-1]
            paired = ("reference" if r["reference"] is None else
                      f"vs {r['reference']}: ΔROC-AUC {r['d_roc_auc']:+.4f} {_ci(r['d_roc_auc_ci'])}, "
                      f"ΔPR-AUC {r['d_pr_auc']:+.4f} {_ci(r['d_pr_auc_ci'])}")
            print(f"seed {seed} {name:9s} n={r['n_test']} ROC-AUC {r['roc_auc']:.4f} PR-AUC {r['pr_auc']:.4f} {paired}")
        print(f"  ({time.perf_counter() - t:.1f} s)")
    for name in args.models.split(","):
        aucs = [r["roc_auc"] for r in rows if r["model"] == name]
        print(f"{name}: test ROC-AUC over seeds {args.seeds}: {min(aucs):.4f}-{max(aucs):.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def _ci(ci) -> str:
    return "-" if not ci or ci[0] is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


if __name__ == "__main__":
    main()
