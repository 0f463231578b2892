"""Time ``ingest`` of a CSV(.gz) or Parquet file against a plain DuckDB scan of the same file.

    python benchmarks/bench_ingest.py --events 1000000            # generates /tmp/bench_ingest_1000000.csv.gz
    python benchmarks/bench_ingest.py sim-10m.csv.gz --repeat 3   # e.g. written by benchmarks/make_sim_data.py
    python benchmarks/bench_ingest.py sim-1m.csv.gz --repeat 6 --ab-pseudonyms
    python benchmarks/bench_ingest.py sim-1m.parquet --repeat 4 --src before=/tmp/base --src after=.

A ``.parquet`` path is ingested with ``--format parquet``, any other with ``--format csv``.
``--src NAME=DIR`` (repeatable) times the ingest of each source tree (``DIR`` first on the child's
``PYTHONPATH``; the child checks that ``purchase_intent`` came from there), alternating between them;
without it the tree this script runs from is timed as ``ingest``.

The file has the columns user_id, ts (epoch ms), event, item_id, category, price, session_id.
Without a path, a seeded log of ``--events`` rows is generated with numpy (about one distinct user
per 10 events and one session per 4 events).

Each measurement runs in its own child process, so its peak RSS is its own; the runs alternate
(scan, ingest, scan, ingest, ...) so that a change in the machine's load hits both alike:

* ``scan``: the baseline. CSV: ``SELECT count(*), count(user_id), ..., count(session_id)`` over
  ``read_csv`` with exactly the options ingest reads the file with (header, every column as
  VARCHAR, the delimiter, quote and escape; ``store_rejects``). Counting every column makes DuckDB
  parse every field, as ingest does. Parquet: ``SELECT sum(hash(c)) ...`` of every column over
  ``read_parquet`` on 2 threads, as ``bench_scale_steps.py``'s ``ingest_scan`` (every value decoded).
* ``scan_auto`` (CSV only): ``SELECT count(*) FROM read_csv(path)`` with DuckDB's type detection (it
  parses ts and price as numbers, and counts rows without reading the other fields); for reference.
* ``ingest``: ``purchase_intent.events.ingest`` into a fresh workspace (validation, pseudonyms,
  Parquet part, manifest). Every ingest uses one fixed key (``$PURCHASE_INTENT_PSEUDONYM_KEY``,
  unless already set), and each must store the same events and pseudonyms (an order-free
  fingerprint, taken after the timing).
* ``ingest_python`` (with ``--ab-pseudonyms``): the same, with the pseudonym maps computed in Python
  (``privacy.pseudonym_table``, hashlib on one thread, in batches handed to DuckDB through Arrow)
  instead of inside DuckDB (``privacy.pseudonym_sql``, ingest's own since 2026-12-07); it alternates
  with ``ingest`` (ingest, ingest_python, then ingest_python, ingest, ...). Both report ``map_s``,
  the median seconds spent building the two pseudonym maps.

Seconds ``s`` are timed inside the child, after the imports; ``process_s`` is the whole child
process (Python start-up and imports included). Prints one JSON line per file: events, the UTC
start and end, the 1-minute load average before and after its runs, and per measurement the median,
min and max seconds, the median process seconds and the peak RSS (MiB); events per second, the
ratio ingest / scan and the ratio of each variant to the first use the medians.
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

from purchase_intent.privacy import KEY_ENV

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

SCAN_PARQUET = """
import time
import duckdb
con = duckdb.connect()
con.execute("SET threads = 2")
con.execute("SET enable_progress_bar = false")
t0 = time.perf_counter()
cols = [r[0] for r in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [{path!r}]).fetchall()]
sums = ", ".join(f'sum(hash("{{c}}"))' for c in cols)
n = con.execute(f"SELECT count(*), {{sums}} FROM read_parquet(?)", [{path!r}]).fetchall()[0][0]
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
import duckdb
import purchase_intent
import purchase_intent.events as events
assert purchase_intent.__file__.startswith({src!r}), purchase_intent.__file__
from purchase_intent.config import DataConfig
{patch}
build_map, map_s = events._pseudonym_map, [0.0]
def timed_map(*args):
    t = time.perf_counter()
    build_map(*args)
    map_s[0] += time.perf_counter() - t
events._pseudonym_map = timed_map
t0 = time.perf_counter()
r = events.ingest({ws!r}, [{path!r}], DataConfig(format={fmt!r}), progress=False)
seconds = time.perf_counter() - t0
fp = duckdb.sql("SELECT count(*), sum(hash(user_id, session_id, ts, event, item_id)::HUGEINT) "
                "FROM read_parquet('{ws}/events/*.parquet')").fetchall()[0]  # order-free fingerprint
print(seconds, r.files[0].rows_read, r.accepted, sum(r.rejected.values()), map_s[0], "-".join(map(str, fp)))
"""

# --ab-pseudonyms: the pseudonym maps computed in Python (privacy.pseudonym_table: HMAC per distinct id on
# one thread, in batches handed over through Arrow) in place of ingest's own (privacy.pseudonym_sql in DuckDB)
PYTHON_MAPS = """
import pyarrow as pa
from purchase_intent import memory
from purchase_intent.privacy import pseudonym_table
def python_map(con, name, ids, key):
    reader = con.sql(ids).to_arrow_reader(memory.batch_rows(400))
    parts = [pseudonym_table(batch.column(0), key) for batch in reader]
    table = pa.concat_tables(parts) if parts else pa.table({"raw": pa.array([], pa.string()),
                                                            "pid": pa.array([], pa.string())})
    con.register("ids_arrow", table)
    con.execute(f"CREATE TEMP TABLE {name} AS SELECT * FROM ids_arrow")
    con.unregister("ids_arrow")
events._pseudonym_map = python_map
"""


def run_child(code: str, src: str | None = None) -> tuple[list[str], float, float]:
    """(printed fields, process seconds, peak RSS MiB) of one child process running ``code`` (with the
    source tree ``src`` first on its ``PYTHONPATH``, when given)."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    t0 = time.perf_counter()
    # python -c puts its working folder first on sys.path: run a tree's child in that tree
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=src)
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
    ap.add_argument("path", nargs="*", help="CSV(.gz) or Parquet files with the columns above, each measured in "
                    "turn (default: generate a CSV.gz)")
    ap.add_argument("--events", type=int, default=1_000_000, help="rows to generate when no path is given")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each measurement (default 1)")
    ap.add_argument("--src", action="append", default=[], metavar="NAME=DIR",
                    help="time the ingest of the source tree DIR as NAME (repeatable; they alternate)")
    ap.add_argument("--ab-pseudonyms", action="store_true",
                    help="also time ingest with the pseudonym maps computed in Python (ingest_python), alternating "
                         "with ingest; each ingest also reports map_s, the seconds building the pseudonym maps")
    args = ap.parse_args()
    paths = [Path(p) for p in args.path] or [Path(tempfile.gettempdir()) / f"bench_ingest_{args.events}.csv.gz"]
    if not paths[0].exists() and not args.path:
        generate(paths[0], args.events)
    trees = dict(s.split("=", 1) for s in args.src)
    trees = {name: str(Path(d).resolve()) + os.sep for name, d in trees.items()}
    here = str(Path(__file__).resolve().parents[1]) + os.sep
    # name -> (patch, source tree)
    variants = ({name: ("", d) for name, d in trees.items()} if trees else {"ingest": ("", here)}) | (
        {"ingest_python": (PYTHON_MAPS, here)} if args.ab_pseudonyms else {})
    os.environ.setdefault(KEY_ENV, "be5c" * 8)  # one key for every ingest, so their pseudonyms compare
    for path in paths:
        print(json.dumps(bench_file(path.resolve(), variants, args.repeat) | {"src": trees or None}), flush=True)


def bench_file(path: Path, variants: dict[str, tuple[str, str]], repeat: int) -> dict:
    """The scan(s) and every variant's ingest of one file, ``repeat`` times, alternating."""
    fmt = "parquet" if path.suffix == ".parquet" else "csv"
    start, load = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), os.getloadavg()[0]
    scans = ["scan", "scan_auto"] if fmt == "csv" else ["scan"]
    runs: dict[str, list[tuple[float, float, float]]] = {**{s: [] for s in scans}, **{v: [] for v in variants}}
    map_s: dict[str, list[float]] = {v: [] for v in variants}
    n = accepted = rejected = None
    fingerprints: set[str] = set()
    for i in range(repeat):
        (s, n), proc, rss = run_child((SCAN if fmt == "csv" else SCAN_PARQUET).format(path=str(path)))
        runs["scan"].append((float(s), proc, rss))
        if fmt == "csv":
            (s, _), proc, rss = run_child(SCAN_AUTO.format(path=str(path)))
            runs["scan_auto"].append((float(s), proc, rss))
        order = list(variants) if i % 2 == 0 else list(variants)[::-1]  # A/B, then B/A
        for name in order:
            ws = Path(tempfile.mkdtemp(prefix="bench_ingest_ws_"))
            patch, src = variants[name]
            try:
                code = INGEST.format(ws=str(ws), path=str(path), patch=patch, fmt=fmt, src=src)
                (s, read, accepted, rejected, m, fp), proc, rss = run_child(code, src)
                fingerprints.add(fp)
                if len(fingerprints) > 1:
                    raise RuntimeError(f"{name} stored other events or pseudonyms than an earlier ingest")
            finally:
                shutil.rmtree(ws, ignore_errors=True)
            runs[name].append((float(s), proc, rss))
            map_s[name].append(float(m))
            if int(read) != int(n):
                raise RuntimeError(f"{name} read {read} rows, the scan {n}")
    res = {name: summary(r) for name, r in runs.items()}
    for name, secs in map_s.items():
        res[name]["map_s"] = round(statistics.median(secs), 2)
    n = int(n)
    first = next(iter(variants))
    return {
        "file": str(path), "format": fmt, "events": n, "accepted": int(accepted), "rejected": int(rejected),
        "utc_start": start, "utc_end": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "cpus": os.cpu_count(), "load_1min_before": round(load, 2), "load_1min_after": round(os.getloadavg()[0], 2),
        "repeat": repeat, **res,
        **{f"{v}_events_per_s": round(n / res[v]["s"]) for v in variants},
        **{f"{v}_over_scan": round(res[v]["s"] / res["scan"]["s"], 2) for v in variants},
        **{f"{v}_over_{first}": round(res[v]["s"] / res[first]["s"], 3) for v in list(variants)[1:]},
    }


if __name__ == "__main__":
    main()
