"""Time ``ingest`` of a CSV.gz against a plain DuckDB scan of the same file.

    python benchmarks/bench_ingest.py --events 1000000            # generates /tmp/bench_ingest_1000000.csv.gz
    python benchmarks/bench_ingest.py sim-10m.csv.gz --repeat 3   # e.g. written by benchmarks/make_sim_data.py

The file has the columns user_id, ts (epoch ms), event, item_id, category, price, session_id.
Without a path, a seeded log of ``--events`` rows is generated with numpy (about one distinct user
per 10 events and one session per 4 events).

Each measurement runs in its own child process, so its peak RSS is its own; the runs alternate
(scan, ingest, scan, ingest, ...) so that a change in the machine's load hits both alike:

* ``scan``: the baseline, ``SELECT count(*), count(user_id), ..., count(session_id)`` over
  ``read_csv`` with exactly the options ingest reads the file with (header, every column as
  VARCHAR, the delimiter, quote and escape; ``store_rejects``). Counting every column makes DuckDB
  parse every field, as ingest does.
* ``scan_auto``: ``SELECT count(*) FROM read_csv(path)`` with DuckDB's type detection (it parses
  ts and price as numbers, and counts rows without reading the other fields); reported for reference.
* ``ingest``: ``purchase_intent.events.ingest`` into a fresh workspace (validation, pseudonyms,
  Parquet part, manifest).

Seconds ``s`` are timed inside the child, after the imports; ``process_s`` is the whole child
process (Python start-up and imports included). Prints one JSON line: events, the 1-minute load
average before the runs, and per measurement the median, min and max seconds, the median process
seconds and the peak RSS (MiB); events per second and the ratio ingest / scan use the medians.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

EVENTS = np.array(["view", "cart", "remove_from_cart", "wishlist", "purchase"])


def generate(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_users, n_sessions = max(1, n // 10), max(1, n // 4)
    session = np.sort(rng.integers(0, n_sessions, n))
    user = (session * 2654435761) % n_users  # each session belongs to one user
    ts = 1_704_067_200_000 + session * (90 * 86_400_000 // n_sessions) + rng.integers(0, 1_800_000, n)
    item = rng.zipf(1.3, n) % 50_000
    table = pa.table({
        "user_id": pa.array([f"u{u}" for u in user]),
        "ts": pa.array(ts),
        "event": pa.array(EVENTS[rng.choice(5, n, p=[0.86, 0.07, 0.01, 0.03, 0.03])]),
        "item_id": pa.array(item.astype(str)),
        "category": pa.array((item % 40).astype(str)),
        "price": pa.array(np.round(rng.lognormal(3, 1, n), 2)),
        "session_id": pa.array([f"s{s}" for s in session]),
    })
    with gzip.GzipFile(path, "wb", compresslevel=1, mtime=0) as raw:
        pcsv.write_csv(table, raw)


SCAN = """
import time
import duckdb
from pathlib import Path
from purchase_intent.event_sources import PRESETS, csv_source, sql_ident
path = Path({path!r})
con = duckdb.connect()
con.execute("SET enable_progress_bar = false")
src = csv_source(con, path, PRESETS["csv"])  # the read_csv(...) call ingest uses
counts = ", ".join(f"count({{sql_ident(c)}})" for c in src.columns)
t0 = time.perf_counter()
n = con.sql(f"SELECT count(*), {{counts}} FROM {{src.read}}").fetchall()[0][0]
print(time.perf_counter() - t0, n)
"""

SCAN_AUTO = """
import time
import duckdb
t0 = time.perf_counter()
con = duckdb.connect()
con.execute("SET enable_progress_bar = false")
n = con.sql("SELECT count(*) FROM read_csv('{path}')").fetchall()[0][0]
print(time.perf_counter() - t0, n)
"""

INGEST = """
import time
from purchase_intent.config import DataConfig
from purchase_intent.events import ingest
t0 = time.perf_counter()
r = ingest({ws!r}, [{path!r}], DataConfig(format="csv"), progress=False)
print(time.perf_counter() - t0, r.files[0].rows_read, r.accepted, sum(r.rejected.values()))
"""


def run_child(code: str) -> tuple[list[str], float, float]:
    """(printed fields, process seconds, peak RSS MiB) of one child process running ``code``."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    if status != 0:
        raise RuntimeError(f"child failed: {code}")
    return out.strip().splitlines()[-1].split(), time.perf_counter() - t0, usage.ru_maxrss / 1024


def summary(runs: list[tuple[float, float, float]]) -> dict:
    secs = [s for s, _, _ in runs]
    return {"s": round(statistics.median(secs), 2), "min_s": round(min(secs), 2), "max_s": round(max(secs), 2),
            "process_s": round(statistics.median(p for _, p, _ in runs), 2),
            "peak_rss_mib": round(max(r for _, _, r in runs))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", help="a CSV.gz with the columns above (default: generate one)")
    ap.add_argument("--events", type=int, default=1_000_000, help="rows to generate when no path is given")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each measurement (default 1)")
    args = ap.parse_args()
    path = Path(args.path) if args.path else Path(tempfile.gettempdir()) / f"bench_ingest_{args.events}.csv.gz"
    if not path.exists():
        generate(path, args.events)
    load = os.getloadavg()[0]
    runs: dict[str, list[tuple[float, float, float]]] = {"scan": [], "scan_auto": [], "ingest": []}
    n = accepted = rejected = None
    for _ in range(args.repeat):
        (s, n), proc, rss = run_child(SCAN.format(path=str(path)))
        runs["scan"].append((float(s), proc, rss))
        (s, _), proc, rss = run_child(SCAN_AUTO.format(path=str(path)))
        runs["scan_auto"].append((float(s), proc, rss))
        ws = Path(tempfile.mkdtemp(prefix="bench_ingest_ws_"))
        try:
            (s, read, accepted, rejected), proc, rss = run_child(INGEST.format(ws=str(ws), path=str(path)))
        finally:
            shutil.rmtree(ws, ignore_errors=True)
        runs["ingest"].append((float(s), proc, rss))
        if int(read) != int(n):
            raise RuntimeError(f"ingest read {read} rows, the scan {n}")
    res = {name: summary(r) for name, r in runs.items()}
    n = int(n)
    print(json.dumps({
        "file": str(path), "events": n, "accepted": int(accepted), "rejected": int(rejected),
        "cpus": os.cpu_count(), "load_1min_before": round(load, 2), "repeat": args.repeat, **res,
        "ingest_events_per_s": round(n / res["ingest"]["s"]),
        "ingest_over_scan": round(res["ingest"]["s"] / res["scan"]["s"], 2),
    }))


if __name__ == "__main__":
    main()
