"""Time ``purchase-intent ingest`` from PostgreSQL against the same rows from a Parquet file.

    python benchmarks/bench_postgres.py                    # 1M events, 3 repeats
    python benchmarks/bench_postgres.py --events 200000 --repeat 3

Starts its own PostgreSQL server (``tests/pg_cluster.py``: initdb in a temp folder, a free port;
needs PostgreSQL's server binaries), simulates the shop (``purchase_intent.simulate``), keeps the
first ``--events`` rows, writes them to Parquet and loads the same rows into a table with COPY
(``user_id text, ts bigint, event text, item_id text, category text, price float8, session_id
text``; then ``VACUUM ANALYZE``). One warm-up ingest of each source goes untimed.

Then, alternating (db, parquet, then parquet, db, ...), each measurement is
``purchase-intent ingest`` into a fresh workspace with one fixed key, in its own child process:
``--data postgresql://... --query "SELECT * FROM events"`` or ``PATH --format parquet``. Seconds
``s`` are timed inside the child around ``cli.main`` (after the imports); ``process_s`` is the
whole child process. Both must store the same events and pseudonyms (an order-free fingerprint
of the stored events, checked after the timing).

After the ingests, the reads alone, in this process, ``--repeat`` times each: ``fetch_db`` (connect,
run the query and read every Arrow record batch through ADBC) and ``read_parquet``
(``pyarrow.parquet.read_table`` of the file).

Prints one JSON line: events, the 1-minute load average before and after, per source the median,
min and max seconds, the median process seconds and the peak RSS of the child (MiB), events per
second (median), and the ratio
db / parquet of the medians. The goal (issue 17): >= 500k events/s, or a ratio <= 2.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from purchase_intent.privacy import KEY_ENV
from purchase_intent.simulate import SimConfig, iter_event_tables

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pg_cluster import start_cluster  # noqa: E402

KEY = "00112233445566778899aabbccddeeff"
QUERY = "SELECT * FROM events"


def simulated(n: int, seed: int = 0) -> pa.Table:
    """The first ``n`` events of a simulated shop big enough to hold them (~50 events per user over 90 days)."""
    tables, rows = [], 0
    for t in iter_event_tables(SimConfig(n_users=max(100, n // 40), days=90, seed=seed)):
        tables.append(t)
        rows += t.num_rows
        if rows >= n:
            break
    table = pa.concat_tables(tables).slice(0, n)
    if table.num_rows < n:
        raise SystemExit(f"the simulated shop has only {table.num_rows:,} events")
    return table


def child(argv: list[str]) -> None:
    """One measurement: ``cli.main(argv)`` timed after the imports; prints seconds and the peak RSS (MiB)."""
    from purchase_intent import cli

    t0 = time.perf_counter()
    rc = cli.main(argv)
    s = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"ingest failed ({rc})")
    print(json.dumps({"s": s, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(argv: list[str]) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(argv)], capture_output=True, text=True,
                         env={**os.environ, KEY_ENV: KEY})
    if out.returncode:
        raise SystemExit(out.stderr)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - t0}


def fetch_seconds(url: str) -> float:
    """Connect, run the query and read every record batch (ADBC), nothing else."""
    import adbc_driver_postgresql.dbapi as dbapi

    t0 = time.perf_counter()
    with dbapi.connect(url) as conn, conn.cursor() as cur:
        cur.execute(QUERY)
        for _ in cur.fetch_record_batch():
            pass
    return time.perf_counter() - t0


def parquet_seconds(path: Path) -> float:
    t0 = time.perf_counter()
    pq.read_table(path)
    return time.perf_counter() - t0


def fingerprint(ws: Path) -> list:
    import duckdb

    parts = sorted(str(p) for p in (ws / "events").glob("part-*.parquet"))
    return duckdb.sql(f"SELECT count(*), sum(hash(user_id, ts, event, item_id, category, price, session_id)) "
                      f"FROM read_parquet({parts})").fetchall()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(json.loads(a.child))

    work = Path(tempfile.mkdtemp(prefix="bench-postgres-"))
    cluster = start_cluster()
    try:
        table = simulated(a.events)
        pq.write_table(table, work / "events.parquet")
        pcsv.write_csv(table, work / "events.csv")
        t0 = time.perf_counter()
        cluster.admin("CREATE TABLE events (user_id text, ts bigint, event text, item_id text, category text, "
                      "price double precision, session_id text)", "GRANT SELECT ON events TO shop")
        cluster.copy_csv("events", work / "events.csv")
        cluster.admin("VACUUM ANALYZE events")
        load_s = time.perf_counter() - t0
        sources = {"db": ["--data", cluster.url(), "--query", QUERY],
                   "parquet": [str(work / "events.parquet"), "--format", "parquet"]}

        def run(name: str, i: int) -> dict:
            ws = work / f"ws-{name}-{i}"
            m = measure(["ingest", "--workspace", str(ws), *sources[name]])
            m["fingerprint"] = fingerprint(ws)
            shutil.rmtree(ws)
            return m

        for name in sources:  # warm-up: caches, the server's buffers
            run(name, -1)
        load = [os.getloadavg()[0]]
        results: dict[str, list[dict]] = {name: [] for name in sources}
        for i in range(a.repeat):
            for name in (("db", "parquet") if i % 2 == 0 else ("parquet", "db")):
                results[name].append(run(name, i))
        reads = {"fetch_db": [], "read_parquet": []}  # the reads alone, in this process: where the gap comes from
        for i in range(a.repeat):
            reads["fetch_db"].append(fetch_seconds(cluster.url()))
            reads["read_parquet"].append(parquet_seconds(work / "events.parquet"))
        load.append(os.getloadavg()[0])
        prints = {tuple(m["fingerprint"]) for ms in results.values() for m in ms}
        if len(prints) != 1:
            raise SystemExit(f"the sources stored different events: {prints}")
        out = {"events": a.events, "copy_load_s": round(load_s, 2), "load_avg": [round(x, 2) for x in load]}
        for name, ms in results.items():
            s = [m["s"] for m in ms]
            out[name] = {"median_s": round(statistics.median(s), 3), "min_s": round(min(s), 3),
                         "max_s": round(max(s), 3),
                         "process_s": round(statistics.median(m["process_s"] for m in ms), 3),
                         "peak_rss_mib": round(max(m["rss_mib"] for m in ms)),
                         "events_per_s": round(a.events / statistics.median(s))}
        for name, s in reads.items():
            out[name] = {"median_s": round(statistics.median(s), 3), "min_s": round(min(s), 3),
                         "max_s": round(max(s), 3)}
        out["ratio_db_over_parquet"] = round(out["db"]["median_s"] / out["parquet"]["median_s"], 3)
        print(json.dumps(out))
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
