"""Time ``ingest`` of a CSV.gz against a plain DuckDB scan of the same file.

    python benchmarks/bench_ingest.py --events 1000000            # generates /tmp/bench_ingest_1000000.csv.gz
    python benchmarks/bench_ingest.py events.csv.gz               # e.g. written by simulate.write_events

The file has the columns user_id, ts (epoch ms), event, item_id, category, price, session_id.
Without a path, a seeded log of ``--events`` rows is generated with numpy (about one distinct user
per 10 events and one session per 4 events). Each measurement runs in its own child process:
the scan (``SELECT count(*) FROM read_csv(...)``) and the ingest into a fresh workspace. Prints one
JSON line: events, seconds for scan and ingest, events per second, the ratio ingest / scan and the
peak RSS (MiB) of each child.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
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


def run_child(code: str) -> tuple[float, float, str]:
    """(seconds, peak RSS MiB, stdout) of one child process running ``code``."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(f"child failed: {code}")
    return seconds, usage.ru_maxrss / 1024, out.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", help="a CSV.gz with the columns above (default: generate one)")
    ap.add_argument("--events", type=int, default=1_000_000, help="rows to generate when no path is given")
    args = ap.parse_args()
    path = Path(args.path) if args.path else Path(tempfile.gettempdir()) / f"bench_ingest_{args.events}.csv.gz"
    if not path.exists():
        generate(path, args.events)
    startup, _, _ = run_child("import duckdb, purchase_intent.events")
    scan_s, scan_rss, n = run_child(
        "import duckdb; print(duckdb.sql(\"SELECT count(*) FROM read_csv('%s')\").fetchall()[0][0])" % path)
    ws = Path(tempfile.mkdtemp(prefix="bench_ingest_ws_"))
    try:
        ingest_s, ingest_rss, out = run_child(
            "from purchase_intent.events import ingest; from purchase_intent.config import DataConfig; "
            f"r = ingest({str(ws)!r}, [{str(path)!r}], DataConfig(format='csv'), progress=False); "
            "print(r.accepted, sum(r.rejected.values()))")
    finally:
        shutil.rmtree(ws, ignore_errors=True)
    accepted, rejected = map(int, out.split())
    n = int(n)
    print(json.dumps({
        "events": n, "accepted": accepted, "rejected": rejected, "cpus": os.cpu_count(),
        "python_startup_s": round(startup, 2), "scan_s": round(scan_s, 2), "ingest_s": round(ingest_s, 2),
        "ingest_events_per_s": round(n / ingest_s), "ingest_over_scan": round(ingest_s / scan_s, 2),
        "scan_peak_rss_mib": round(scan_rss), "ingest_peak_rss_mib": round(ingest_rss),
    }))


if __name__ == "__main__":
    main()
