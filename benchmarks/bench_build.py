"""Time ``build`` for the user task: make_cutoffs + build_examples + compute_features.

    python benchmarks/bench_build.py --events 1000000
    python benchmarks/bench_build.py --events 10000000 --threads 2 --memory-limit 3GB

Generates a seeded synthetic log with numpy (users with sessions of a few events, a long-tailed
item catalogue, about 3% purchases) spanning 12 weekly cutoffs of LabelConfig(lookback=28d,
horizon=7d, step=7d), loads it into an in-memory DuckDB table ``events`` and prints one JSON line:
events, examples, features, seconds per stage, total seconds and peak RSS (MiB) of this process.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import duckdb
import numpy as np
import pandas as pd

from purchase_intent.config import FeatureConfig, LabelConfig
from purchase_intent.features import compute_features
from purchase_intent.labels import build_examples, make_cutoffs

EVENTS = np.array(["view", "cart", "remove_from_cart", "wishlist", "purchase"])
EVENT_P = [0.86, 0.07, 0.01, 0.03, 0.03]
SPAN_DAYS = 28 + 7 * 11 + 7 + 2  # lookback + 11 steps + horizon (+2 days of slack) = 12 cutoffs


def make_events(n_events: int, seed: int = 0, events_per_user: int = 50) -> pd.DataFrame:
    """A synthetic canonical log of about ``n_events`` rows (no session ids: sessions come from gaps)."""
    rng = np.random.default_rng(seed)
    n_users = max(1, n_events // events_per_user)
    n_sessions = max(1, n_events // 6)
    s_user = rng.integers(0, n_users, n_sessions)
    s_start = rng.integers(0, SPAN_DAYS * 86_400_000_000 - 4 * 3_600_000_000, n_sessions, dtype=np.int64)
    s_len = rng.geometric(1 / 6, n_sessions)
    s_len = s_len * n_events // s_len.sum()
    s_len = s_len + (np.arange(n_sessions) < n_events - s_len.sum())
    sess = np.repeat(np.arange(n_sessions), s_len)  # (n_events,)
    n = len(sess)
    step_us = rng.exponential(90e6, n).astype(np.int64) + 1_000_000
    offsets = np.cumsum(step_us) - np.repeat(np.cumsum(step_us)[np.cumsum(s_len) - s_len], s_len)
    ts = np.datetime64("2024-01-01T00:00:00", "us") + (s_start[sess] + offsets).astype("timedelta64[us]")
    item = (rng.pareto(1.2, n) * 1000).astype(np.int64) % 1_000_000
    return pd.DataFrame({
        "user_id": pd.array(s_user[sess].astype(str), dtype="string").astype(object),
        "ts": ts,
        "event": EVENTS[rng.choice(len(EVENTS), n, p=EVENT_P)],
        "item_id": item.astype(str),
        "category": (item % 5000).astype(str),
        "price": np.round(1 + (item % 997) * 0.7, 2),
        "session_id": None,
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-limit", default="3GB")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    con = duckdb.connect()
    con.execute(f"SET threads = {args.threads}; SET memory_limit = '{args.memory_limit}'; "
                "SET preserve_insertion_order = false")
    chunk = 2_000_000  # generate in chunks of users' sessions to keep pandas memory small
    con.execute("CREATE TABLE events (user_id VARCHAR, ts TIMESTAMP, event VARCHAR, item_id VARCHAR, "
                "category VARCHAR, price DOUBLE, session_id VARCHAR)")
    for i, start in enumerate(range(0, args.events, chunk)):
        df = make_events(min(chunk, args.events - start), seed=args.seed + i)
        df["user_id"] = "c" + str(i) + "-" + df["user_id"]  # chunks hold disjoint users
        con.register("events_df", df)
        con.execute("INSERT INTO events SELECT * FROM events_df")
        con.unregister("events_df")
        del df
    t_gen = time.perf_counter() - t0

    cfg = LabelConfig(task="user", lookback="28d", horizon="7d", step="7d")
    t1 = time.perf_counter()
    cutoffs = make_cutoffs(con, cfg)
    examples = build_examples(con, cfg)
    t2 = time.perf_counter()
    con.register("examples", examples)
    X = compute_features(con, "examples", FeatureConfig())
    t3 = time.perf_counter()
    print(json.dumps({
        "events": con.execute("SELECT count(*) FROM events").fetchall()[0][0],
        "users": con.execute("SELECT count(DISTINCT user_id) FROM events").fetchall()[0][0],
        "cutoffs": len(cutoffs), "examples": examples.num_rows, "features": X.shape[1],
        "positive_rate": round(float(np.mean(examples["label"].to_numpy())), 4),
        "threads": args.threads, "memory_limit": args.memory_limit,
        "generate_s": round(t_gen, 1), "examples_s": round(t2 - t1, 2), "features_s": round(t3 - t2, 2),
        "build_s": round(t3 - t1, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }))


if __name__ == "__main__":
    main()
