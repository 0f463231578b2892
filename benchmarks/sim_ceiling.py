"""How far the models are from the best ranking the simulated shop allows.

    python benchmarks/sim_ceiling.py --users 20000 --days 90 --models lightgbm,transformer --backtest 3 --out OUT
    python benchmarks/sim_ceiling.py --users 20000 --days 90 --reuse --out OUT   # the workspace of an earlier run

Runs what a user runs: ``purchase-intent simulate --users U --days D --seed S`` then ``purchase-intent
--workspace OUT/ws run --data OUT/sim.parquet --format parquet --models M --backtest K`` (default
build: user task, 28d lookback, 7d horizon and step). Then, for every cutoff of the test window and of
the pooled backtest, ``simulate.purchase_chance`` gives each example's user the chance of a purchase
in the horizon given the simulator's whole latent state at the cutoff (the intent's random walk, the
in-market regime, the segment, the pending cart: ``--rollouts`` Monte Carlo futures). No model of the
log can rank better than that chance, so its ROC-AUC is a ceiling, and a loose one: much of that state
never shows in the log. Prints, per section, each model's ROC-AUC and PR-AUC, the ceiling's, and the
paired difference ceiling - model with its 95% interval (``evaluate.paired_auc_difference``); writes
the same as JSON to ``OUT/ceiling.json``.

Caveat: the label counts purchases in [cutoff, cutoff + horizon) of the log as written, so a user the
log drops from the examples (no event in the lookback) is not scored; each example's pseudonym is
matched to its simulated user through the workspace's key (``privacy.pseudonym_for``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from purchase_intent import privacy, runs, storage
from purchase_intent.evaluate import average_precision, paired_auc_difference, roc_auc
from purchase_intent.simulate import SimConfig, purchase_chance
from purchase_intent.workspace import Workspace

CLI = [sys.executable, "-m", "purchase_intent.cli"]


def _run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd[2:] if cmd[:2] == CLI[:2] else cmd), flush=True)
    subprocess.run(cmd, check=True)


def ceiling_frame(ws: Workspace, cfg: SimConfig, horizon_days: int, rollouts: int, seed: int,
                  example_ids: pd.Index) -> pd.Series:
    """The ceiling's chance for each example id (index), from the simulator's state at its cutoff."""
    ex = storage.read_frame(ws.examples_dir / runs.EXAMPLES, columns=["example_id", "user_id", "cutoff"])
    ex = ex.set_index("example_id")
    ex = ex.loc[example_ids.unique()]
    start = pd.Timestamp(cfg.start)
    days = ((pd.to_datetime(ex["cutoff"]) - start) / pd.Timedelta(days=1)).to_numpy()
    if not np.allclose(days, np.round(days)):
        raise SystemExit("the cutoffs are not at midnight of a simulated day: build with a day-based --step")
    ex["day"] = np.round(days).astype(int)
    raw = [f"u{i}" for i in range(cfg.n_users)]
    number = {p: i for i, p in enumerate(privacy.pseudonym_for(ws, raw)[r] for r in raw)}
    ex["user"] = ex["user_id"].map(number)
    if ex["user"].isna().any():
        raise SystemExit("some examples' users are not the simulated shop's: "
                         "give the --users/--days/--seed it was made with")
    chance = purchase_chance(cfg, sorted(ex["day"].unique()), horizon_days, n_rollouts=rollouts, seed=seed)
    return pd.Series([chance[d][u] for d, u in zip(ex["day"], ex["user"].astype(int))], index=ex.index)


def _fmt(x: dict) -> str:
    return f"{x['diff']:+.4f} [{x['ci'][0]:+.4f}, {x['ci'][1]:+.4f}]" if x.get("ci") else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--days", type=int, default=90)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default="lightgbm,transformer")
    ap.add_argument("--backtest", type=int, default=3)
    ap.add_argument("--horizon-days", type=int, default=7, help="the build's horizon (default build: 7d)")
    ap.add_argument("--rollouts", type=int, default=200)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--reuse", action="store_true", help="use OUT/ws as an earlier run left it")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    cfg = SimConfig(n_users=args.users, days=args.days, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    data, root = args.out / "sim.parquet", args.out / "ws"
    if not args.reuse:
        _run(CLI + ["simulate", "--users", str(args.users), "--days", str(args.days), "--seed", str(args.seed),
                    "--out", str(data)])
        _run(CLI + ["--workspace", str(root), "run", "--data", str(data), "--format", "parquet",
                    "--models", args.models, "--backtest", str(args.backtest), "--n-boot", "0"])
    ws = Workspace(root)
    models = [m for m in args.models.split(",") if ws.run_dir(m).exists()]
    preds = {m: runs.read_predictions(ws.run_dir(m)) for m in models}
    started = datetime.utcnow()
    ids = pd.Index(np.concatenate([p["example_id"].to_numpy() for p in preds.values()]))
    ceiling = ceiling_frame(ws, cfg, args.horizon_days, args.rollouts, args.seed, ids)
    result = {"users": args.users, "days": args.days, "seed": args.seed, "rollouts": args.rollouts,
              "ceiling_seconds": round((datetime.utcnow() - started).total_seconds(), 1), "sections": {}}
    print(f"\n{'section':<16} {'model':<12} {'n':>7} {'pos':>6} {'ROC-AUC':>8} {'PR-AUC':>7}   "
          f"ceiling - model: ΔROC-AUC [95% CI]       ΔPR-AUC [95% CI]")
    for section, label in (("test", "test window"), ("backtest", "pooled backtest")):
        rows = []
        for m, p in preds.items():
            s = p[p["split"] == section]
            if not len(s):
                continue
            y, c = s["label"].to_numpy(), ceiling.loc[s["example_id"]].to_numpy()
            d = paired_auc_difference(y, c, s["probability"].to_numpy(), n_boot=args.n_boot)
            rows.append({"model": m, "n": len(s), "positives": int(y.sum()),
                         "roc_auc": roc_auc(y, s["probability"]), "pr_auc": average_precision(y, s["probability"]),
                         "ceiling_roc_auc": roc_auc(y, c), "ceiling_pr_auc": average_precision(y, c),
                         "ceiling_minus_model": {"roc_auc": d["diff"], "ci": d["ci"], "pr_auc": d["pr_auc"]}})
            print(f"{label:<16} {m:<12} {len(s):>7} {int(y.sum()):>6} {rows[-1]['roc_auc']:>8.4f} "
                  f"{rows[-1]['pr_auc']:>7.4f}   {_fmt(d):<34} {_fmt(d['pr_auc'])}")
        if rows:
            print(f"{label:<16} {'(ceiling)':<12} {'':>7} {'':>6} {rows[0]['ceiling_roc_auc']:>8.4f} "
                  f"{rows[0]['ceiling_pr_auc']:>7.4f}")
        result["sections"][section] = rows
    (args.out / "ceiling.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
