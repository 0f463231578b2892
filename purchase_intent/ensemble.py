"""The `ensemble` model: the mean of its members' calibrated probabilities (default: Transformer + LightGBM).

It needs no training of its own. Its run directory records its members (run names and versions)
and the union of their features; loading it (``runs.load_run``) loads the member runs next to it,
so it scores (batch ``score``, the API) like any model, with the mean of their probabilities, and
explains with the mean of their contributions (``explain``). Its held-out metrics average, example
by example, the predictions that the members' runs wrote (valid, test and backtest folds), so they
are on exactly the same examples; members that did not predict the same examples (another backtest
K, or one without a backtest) are refused rather than silently joined on what they share.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from . import runs
from .evaluate import binary_metrics
from .workspace import Workspace

_KEYS = ["example_id", "split", "fold"]


def _keyed(f: pd.DataFrame) -> pd.DataFrame:
    f = f.copy()
    if "fold" not in f.columns:
        f["fold"] = -1
    f["fold"] = f["fold"].fillna(-1).astype(int)
    return f


def check_same_examples(frames: Sequence[pd.DataFrame], names: Sequence[str]) -> None:
    """ValueError unless every member predicted the same examples in every split and backtest fold."""
    keyed = [_keyed(f) for f in frames]
    ref_name = names[0]
    ref_folds = sorted(keyed[0].loc[keyed[0]["split"] == "backtest", "fold"].unique().tolist())
    for name, f in zip(names[1:], keyed[1:]):
        folds = sorted(f.loc[f["split"] == "backtest", "fold"].unique().tolist())
        if folds != ref_folds:
            def says(n, k):
                return f"{n} has {len(k)} backtest fold(s)" if k else f"{n} has no backtest"
            raise ValueError(f"ensemble members were backtested differently: {says(ref_name, ref_folds)}, "
                             f"{says(name, folds)}; run them with the same --backtest K")
    ref = keyed[0].set_index(_KEYS).index
    for name, f in zip(names[1:], keyed[1:]):
        idx = f.set_index(_KEYS).index
        if not (idx.is_unique and ref.is_unique) or len(idx) != len(ref) or not idx.isin(ref).all():
            only = len(idx.difference(ref)) + len(ref.difference(idx))
            raise ValueError(f"ensemble members {ref_name} and {name} predicted different examples "
                             f"({only} not shared, of {len(ref)} and {len(idx)}): train them on the same build")


def average_predictions(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Mean probability per (example_id, split, fold) over members (call ``check_same_examples`` first)."""
    parts = []
    for i, f in enumerate(frames):
        parts.append(_keyed(f).rename(columns={"probability": f"p{i}"}).set_index(_KEYS))
    joined = parts[0]
    for p in parts[1:]:
        joined = joined.join(p[[c for c in p.columns if c.startswith("p")]], how="inner")
    cols = [f"p{i}" for i in range(len(frames))]
    joined["probability"] = joined[cols].mean(axis=1)
    return joined.drop(columns=cols).reset_index()


def evaluate_ensemble(workspace: Workspace, members: Sequence[str], n_boot: int = 1000, run: str = "ensemble") -> dict:
    """Average the members' predictions and write runs/<run>/{run.json, predictions.parquet, metrics.json}.

    run.json records the members (``[{"run", "model", "version"}]``), the union of their feature
    names and the label and feature configuration, which is what ``runs.load_run`` needs to load
    the ensemble as a model.
    """
    members = list(members)
    if len(members) < 2:
        raise ValueError("the ensemble needs at least two trained members (transformer, lightgbm); "
                         f"got {members}")
    if run in members:
        raise ValueError(f"the ensemble run {run!r} cannot be one of its own members")
    metas = [runs.read_meta(workspace.run_dir(m)) for m in members]
    if any(m["model"] == runs.ENSEMBLE for m in metas):
        raise ValueError("an ensemble member cannot itself be an ensemble")
    if len({m["build_id"] for m in metas}) != 1:
        raise RuntimeError("ensemble members were trained on different builds")
    if len({repr(m["label_config"]) for m in metas}) != 1:
        raise ValueError("ensemble members have different label configurations")
    unevaluated = [m for m in members if not (workspace.run_dir(m) / runs.PREDICTIONS).exists()]
    if unevaluated:
        raise ValueError(f"{', '.join(map(repr, unevaluated))} {'has' if len(unevaluated) == 1 else 'have'} no "
                         f"predictions: evaluate {'it' if len(unevaluated) == 1 else 'them'} first "
                         f"(purchase-intent evaluate --run {unevaluated[0]}, with the --backtest K of the others)")
    frames = [runs.read_predictions(workspace.run_dir(m)) for m in members]
    check_same_examples(frames, members)
    pred = average_predictions(frames)
    described = [{"run": name, "model": m["model"], "version": m["version"]} for name, m in zip(members, metas)]
    metrics: dict[str, Any] = {"model": "ensemble", "members": described,
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
    names = list(dict.fromkeys(f for m in metas for f in m["feature_names"]))
    run_dir: Path = workspace.run_dir(run)
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {"run": run, "model": "ensemble", "members": described, "build_id": metas[0]["build_id"],
            "label_config": metas[0]["label_config"], "feature_config": metas[0]["feature_config"],
            "feature_names": names, "version": "ensemble-" + "-".join(m["version"] for m in metas)}
    runs.write_json(run_dir / runs.RUN_JSON, meta)
    runs.write_predictions(run_dir, pred)
    runs.write_json(run_dir / runs.METRICS_JSON, metrics)
    return metrics
