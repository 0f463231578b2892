"""The `ensemble` model: the mean of its members' calibrated probabilities (default: Transformer + LightGBM).

It needs no training of its own: it averages, example by example, the held-out predictions that the
members' runs wrote (valid, test and backtest folds), so its metrics are on exactly the same examples.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from . import runs
from .evaluate import binary_metrics
from .workspace import Workspace


def average_predictions(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Mean probability per (example_id, split, fold) over members that all scored that example."""
    keys = ["example_id", "split", "fold"]
    parts = []
    for i, f in enumerate(frames):
        f = f.copy()
        if "fold" not in f.columns:
            f["fold"] = -1
        f["fold"] = f["fold"].fillna(-1).astype(int)
        parts.append(f.rename(columns={"probability": f"p{i}"}).set_index(keys))
    joined = parts[0]
    for p in parts[1:]:
        joined = joined.join(p[[c for c in p.columns if c.startswith("p")]], how="inner")
    cols = [f"p{i}" for i in range(len(frames))]
    joined["probability"] = joined[cols].mean(axis=1)
    return joined.drop(columns=cols).reset_index()


def evaluate_ensemble(workspace: Workspace, members: Sequence[str], n_boot: int = 1000, run: str = "ensemble") -> dict:
    """Average the members' predictions and write runs/<run>/{run.json, predictions.parquet, metrics.json}."""
    if len(members) < 2:
        raise ValueError("the ensemble needs at least two trained members (transformer, lightgbm); "
                         f"got {list(members)}")
    metas = [runs.read_meta(workspace.run_dir(m)) for m in members]
    if len({m["build_id"] for m in metas}) != 1:
        raise RuntimeError("ensemble members were trained on different builds")
    pred = average_predictions([runs.read_predictions(workspace.run_dir(m)) for m in members])
    metrics: dict[str, Any] = {"model": "ensemble", "members": list(members),
                               "task": runs.read_metrics(workspace.run_dir(members[0]))["task"]}
    for split in ("valid", "test"):
        s = pred[pred["split"] == split]
        metrics[split] = binary_metrics(s["label"].to_numpy(), s["probability"].to_numpy(), n_boot=n_boot)
    bt = pred[pred["split"] == "backtest"]
    if len(bt):
        folds = []
        for k, s in bt.groupby("fold", sort=True):
            folds.append({"cutoff": str(pd.Timestamp(s["cutoff"].iloc[0])),
                          **binary_metrics(s["label"].to_numpy(), s["probability"].to_numpy(), n_boot=n_boot)})
        pooled = binary_metrics(bt["label"].to_numpy(), bt["probability"].to_numpy(), n_boot=n_boot)
        metrics["backtest"] = {"folds": folds, "pooled": pooled}
    run_dir: Path = workspace.run_dir(run)
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {"run": run, "model": "ensemble", "members": list(members), "build_id": metas[0]["build_id"],
            "label_config": metas[0]["label_config"], "version": "ensemble-" + "-".join(m["version"] for m in metas)}
    runs.write_json(run_dir / runs.RUN_JSON, meta)
    runs.write_predictions(run_dir, pred)
    runs.write_json(run_dir / runs.METRICS_JSON, metrics)
    return metrics
