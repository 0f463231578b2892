"""Time ``explain`` for one user per model, and measure the Transformer's faithfulness.

    python benchmarks/bench_explain.py                              # simulated shop, all three models
    python benchmarks/bench_explain.py --workspace pi-workspace     # existing runs (e.g. after quickstart)
    python benchmarks/bench_explain.py --threads 2 --users 20

Without ``--workspace`` a simulated shop (``--shop-users`` users, 56 days) is ingested, built and
the models are trained into a temporary workspace (transformer: the ``small`` preset). Then, per
run, ``explain.explain_user`` is called for ``--users`` random active users at the end of the data
(after one warm-up call): the whole path a user's explanation takes (features + sequences from the
workspace, model, attribution, sentences). Prints one JSON line per run with the median / p90 /
max milliseconds, and for the Transformer the faithfulness curve on up to ``--faithfulness-n``
test examples (mean log-odds drop after removing the k most-attributed vs k random events).
Targets (issue): <= 200 ms per user for the baselines, <= 2 s for the small Transformer on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from purchase_intent import explain, pipeline, runs
from purchase_intent.config import DataConfig, FeatureConfig, LabelConfig, TrainConfig
from purchase_intent.simulate import SimConfig, write_events
from purchase_intent.workspace import Workspace


def make_workspace(root: Path, n_users: int, models: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_events(SimConfig(n_users=n_users, days=56, seed=0), root / "shop.csv.gz")
    pipeline.ingest(root / "shop.csv.gz", DataConfig(format="csv"), root, progress=False)
    pipeline.build(LabelConfig(), FeatureConfig(), root, quiet=True)
    params = {"transformer": {"preset": "small", "max_epochs": 3}}
    for m in models:
        pipeline.train(m, params=params.get(m), train_cfg=TrainConfig(min_positives=10, min_negatives=10),
                       workspace=root, quiet=True)
        pipeline.evaluate(m, root, n_boot=100, quiet=True)


def time_run(root: Path, run: str, n_users: int, seed: int) -> dict:
    con = Workspace(root).connect()
    users = [r[0] for r in con.execute(
        "SELECT DISTINCT user_id FROM events WHERE ts >= (SELECT max(ts) - INTERVAL 28 DAY FROM events) "
        "ORDER BY user_id").fetchall()]
    rng = np.random.default_rng(seed)
    pick = rng.choice(users, size=min(n_users, len(users)), replace=False)
    explain.explain_user(run, pick[0], workspace=root)  # warm-up: imports, model load caches
    ms = []
    for u in pick:
        t0 = time.perf_counter()
        explain.explain_user(run, u, workspace=root)
        ms.append(1000 * (time.perf_counter() - t0))
    return {"run": run, "users": len(ms), "median_ms": round(float(np.median(ms)), 1),
            "p90_ms": round(float(np.percentile(ms, 90)), 1), "max_ms": round(float(np.max(ms)), 1)}


def faithfulness(root: Path, run: str, n: int, seed: int) -> dict:
    loaded = runs.load_run(run, root)
    meta, model = loaded.meta, loaded.model
    built = runs.load_built(root)
    idx = np.flatnonzero(built.mask("test"))
    idx = np.sort(np.random.default_rng(seed).choice(idx, size=min(n, len(idx)), replace=False))
    X = runs.model_inputs(meta["model"], built, idx, Workspace(root), runs.model_vocab(model))
    attr = explain.attribute(meta, model, X)
    f = explain.faithfulness(model, X, attr, seed=seed)
    return {k: f[k] for k in ("k", "n", "top", "random")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", help="use the runs of this workspace instead of a simulated one")
    ap.add_argument("--runs", default="logreg,lightgbm,transformer")
    ap.add_argument("--shop-users", type=int, default=3000)
    ap.add_argument("--users", type=int, default=20, help="users explained per run")
    ap.add_argument("--faithfulness-n", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run_names = [r.strip() for r in a.runs.split(",") if r.strip()]
    tmp = None
    if a.workspace:
        root = Path(a.workspace)
    else:
        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name) / "ws"
        t0 = time.perf_counter()
        make_workspace(root, a.shop_users, run_names)
        print(json.dumps({"setup_seconds": round(time.perf_counter() - t0, 1), "shop_users": a.shop_users}))
    for run in run_names:
        row = time_run(root, run, a.users, a.seed)
        row["threads"] = a.threads
        if runs.is_sequence_model(runs.load_run(run, root).meta["model"]):
            row["faithfulness"] = faithfulness(root, run, a.faithfulness_n, a.seed)
        print(json.dumps(row), flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
