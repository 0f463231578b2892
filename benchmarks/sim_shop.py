"""A simulated shop ingested and built in a fresh workspace, for the quality benchmarks that draw labels.

    from sim_shop import simulated_shop     # scripts under benchmarks/ run with this folder on sys.path
    ws, built, (tr, va, te) = simulated_shop(Path("/tmp/work"), users=6000, days=63)
    rows = labelled_rows(built.examples, tr, fraction=0.1)  # the train examples of 10% of the users

The pseudonym key is fixed (``KEY``, not a secret): the users' pseudonyms order the users that label
fractions are drawn from, so one key makes one command draw the same users on every run.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from scipy import stats

from purchase_intent import pipeline
from purchase_intent.config import DataConfig, LabelConfig
from purchase_intent.privacy import KEY_ENV
from purchase_intent.runs import load_built
from purchase_intent.simulate import SimConfig, write_events
from purchase_intent.workspace import Workspace

KEY = "benchmark-sim-shop-not-secret"


def simulated_shop(work: Path, users: int, days: int, seed: int = 0):
    """(workspace, built examples, (train, valid, test) row indices) of the simulator's shop of ``users``
    users over ``days`` days (``seed``), ingested and built with the defaults into ``work/ws``
    (``work`` is emptied first)."""
    os.environ[KEY_ENV] = KEY
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ws = Workspace(work / "ws")
    shop = work / "shop.csv.gz"
    write_events(SimConfig(n_users=users, days=days, seed=seed), shop)
    pipeline.ingest(shop, DataConfig(format="csv"), ws, progress=False)
    pipeline.build(LabelConfig(), workspace=ws, quiet=True)
    built = load_built(ws)
    return ws, built, tuple(np.flatnonzero(built.mask(s)) for s in ("train", "valid", "test"))


def labelled_rows(examples, train_rows: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """The rows of ``train_rows`` whose user is among ``fraction`` of the users of ``examples``, drawn
    with ``seed`` (every row when ``fraction`` >= 1): a label budget cut by users, not by examples."""
    if fraction >= 1:
        return train_rows
    users = examples["user_id"].unique()
    keep = set(np.random.default_rng(seed).choice(users, int(len(users) * fraction), replace=False))
    return train_rows[examples["user_id"].iloc[train_rows].isin(keep).to_numpy()]


def t_interval(d: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-run differences ``d`` and its 95% t interval over the runs (NaN bounds
    for a single run)."""
    n = len(d)
    half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def write_results(out: str | Path, lines: list[str]) -> None:
    """Write a benchmark's Markdown ``lines`` to ``out`` (its folder made if need be) and print them."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
