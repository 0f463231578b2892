"""The leakage test: events at or after an example's cutoff never change its features.

For each cutoff T of the tiny log, events at or after T are perturbed (event type, item, category,
price, session id and time within [T, end] changed; events added, including exactly at T; events
deleted) and every example with cutoff <= T must keep exactly the same feature row. A last test
changes an event strictly before T and checks that some feature does move, so the test can fail.
"""
from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from purchase_intent.config import FeatureConfig, LabelConfig
from purchase_intent.features import compute_features
from purchase_intent.labels import build_examples

EVENTS = np.array(["view", "cart", "remove_from_cart", "wishlist", "purchase", "other"])


def _connect(events: pd.DataFrame) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET threads = 1")  # one thread: float sums in a fixed order, so rows compare exactly
    con.register("events_df", events)
    con.execute("CREATE TABLE events AS SELECT * FROM events_df")
    con.unregister("events_df")
    return con


def _features(events: pd.DataFrame, examples, cfg: FeatureConfig) -> pd.DataFrame:
    con = _connect(events)
    con.register("examples", examples)
    return compute_features(con, "examples", cfg)


def perturb_after(df: pd.DataFrame, t: pd.Timestamp, rng: np.random.Generator) -> pd.DataFrame:
    """Randomly change, move, delete and add events at or after ``t`` (never before it)."""
    df = df.copy()
    end = df["ts"].max() + pd.Timedelta(days=1)
    span_us = int((end - t) / pd.Timedelta(microseconds=1))
    after = np.flatnonzero((df["ts"] >= t).to_numpy())
    if len(after):
        pick = lambda p: after[rng.random(len(after)) < p]  # noqa: E731
        i = pick(0.5)
        df.loc[df.index[i], "event"] = rng.choice(EVENTS, len(i))
        i = pick(0.4)
        df.loc[df.index[i], "item_id"] = [f"i{k}" for k in rng.integers(0, 60, len(i))]
        i = pick(0.3)
        df.loc[df.index[i], "category"] = [f"c{k}" for k in rng.integers(0, 9, len(i))]
        i = pick(0.4)
        df.loc[df.index[i], "price"] = rng.uniform(1, 500, len(i))
        i = pick(0.2)
        df.loc[df.index[i], "session_id"] = [f"new-s{k}" for k in rng.integers(0, 5, len(i))]
        i = pick(0.4)
        df.loc[df.index[i], "ts"] = t + pd.to_timedelta(rng.integers(0, span_us, len(i)), unit="us")
        df = df.drop(index=df.index[pick(0.2)])
    n_new = int(rng.integers(5, 30))
    users = rng.choice(df["user_id"].unique(), n_new)
    new = pd.DataFrame({
        "user_id": users,
        "ts": t + pd.to_timedelta(np.where(rng.random(n_new) < 0.3, 0, rng.integers(0, span_us, n_new)), unit="us"),
        "event": rng.choice(EVENTS, n_new),
        "item_id": [f"i{k}" for k in rng.integers(0, 60, n_new)],
        "category": [f"c{k}" for k in rng.integers(0, 9, n_new)],
        "price": np.where(rng.random(n_new) < 0.2, np.nan, rng.uniform(1, 500, n_new)),
        "session_id": np.where(rng.random(n_new) < 0.5, None, [f"{u}-s0" for u in users]),
    })
    out = pd.concat([df, new], ignore_index=True)
    out["ts"] = out["ts"].astype("datetime64[us]")
    return out.sample(frac=1.0, random_state=int(rng.integers(1 << 31))).reset_index(drop=True)


TASKS = {
    "user": LabelConfig(task="user", lookback="7d", horizon="3d", step="2d", tz="Asia/Shanghai"),
    "session": LabelConfig(task="session", step="3d"),
    "session-gap-prefix": LabelConfig(task="session", step="3d", session_gap="20min", prefix=3),
}
FEATURE_CFGS = {
    "all-history": FeatureConfig(windows=("1d", "7d"), tz="Asia/Shanghai"),
    "bounded-history": FeatureConfig(windows=("1d", "7d"), history="10d"),
}


def _worlds(events: pd.DataFrame, examples: pa.Table, worlds: list[pd.DataFrame]):
    """Stack independent copies of the log (user ids prefixed ``w<k>:``) and of the examples, so one
    ``compute_features`` call evaluates every perturbed copy; users never interact in the SQL."""
    ex = examples.to_pandas()
    evs, exs = [], []
    for k, w in enumerate(worlds):
        evs.append(w.assign(user_id=f"w{k}:" + w["user_id"]))
        exs.append(ex.assign(user_id=f"w{k}:" + ex["user_id"], example_id=ex["example_id"] + k * len(ex)))
    return pd.concat(evs, ignore_index=True), pa.Table.from_pandas(pd.concat(exs, ignore_index=True),
                                                                     preserve_index=False)


def _check(base: np.ndarray, got: np.ndarray, msg: str) -> None:
    # same numbers; float sums may differ in the last bits because rows are scanned in another order
    np.testing.assert_allclose(got, base, rtol=1e-12, atol=1e-9, equal_nan=True, err_msg=msg)


@pytest.mark.parametrize("fname", list(FEATURE_CFGS))
@pytest.mark.parametrize("task", list(TASKS))
def test_events_at_or_after_cutoff_change_no_feature(tiny_events, task, fname):
    lcfg, fcfg = TASKS[task], FEATURE_CFGS[fname]
    examples = build_examples(_connect(tiny_events), lcfg)
    ex = examples.to_pandas()
    cutoffs = np.sort(ex["cutoff"].unique())
    times = [pd.Timestamp(t) for t in (cutoffs if task == "user" else cutoffs[:: max(1, len(cutoffs) // 6)])]
    plan = [(seed, t) for seed in range(3) for t in times]
    worlds = [tiny_events] + [perturb_after(tiny_events, t, np.random.default_rng([seed, i]))
                              for i, (seed, t) in enumerate(plan)]
    events, stacked = _worlds(tiny_events, examples, worlds)
    X = _features(events, stacked, fcfg).to_numpy()  # (n_worlds * n_examples, n_features)
    n = len(ex)
    base = X[:n]
    checked = 0
    for k, (seed, t) in enumerate(plan, start=1):
        keep = np.flatnonzero((ex["cutoff"] <= t).to_numpy())
        assert len(keep) > 0
        _check(base[keep], X[k * n + keep], f"leak: seed {seed}, perturbed at/after {t}")
        checked += len(keep)
    assert checked > 50


@pytest.mark.parametrize("task", list(TASKS))
def test_event_before_cutoff_does_change_features(tiny_events, task):
    """The opposite direction: the test above would notice a feature that ignored the past."""
    examples = build_examples(_connect(tiny_events), TASKS[task])
    ex = examples.to_pandas()
    picks = list(range(0, len(ex), max(1, len(ex) // 8)))
    worlds = [tiny_events]
    for i in picks:
        row = ex.iloc[i]
        mine = tiny_events.index[(tiny_events["user_id"] == row["user_id"]) & (tiny_events["ts"] < row["cutoff"])]
        before = tiny_events.copy()
        before.loc[mine[-1], "event"] = "purchase" if before.loc[mine[-1], "event"] != "purchase" else "view"
        worlds.append(before)
    events, stacked = _worlds(tiny_events, examples, worlds)
    X = _features(events, stacked, FeatureConfig(windows=("1d", "7d"))).to_numpy()
    n = len(ex)
    for k, i in enumerate(picks, start=1):
        assert not np.allclose(X[k * n + i], X[i], equal_nan=True), f"example {i} ignores its last event"
