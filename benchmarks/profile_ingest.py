"""Where one ``ingest`` spends its time: wall seconds per stage, in one process.

    python benchmarks/profile_ingest.py /work/scale-data/sim-1m.parquet --format parquet
    python benchmarks/profile_ingest.py sim-10m.csv.gz --format csv --memory-limit 2GB

Every statement ingest runs on its DuckDB connection is timed and put in a stage by what it does:

* ``sha256``: the content hash of the source file (the manifest's identity);
* ``stage``: reading the file, mapping columns and event names, validating each row
  (``CREATE TEMP TABLE staged``; for a reader that stages its own table first, that too; a Parquet
  file is not staged, its rows are read and validated where they are counted and written);
* ``counts``: accepted, rejected by reason and filtered counts, and the unmapped event names;
* ``maps``: the user and session pseudonym maps (the distinct ids and their HMAC);
* ``write``: the accepted rows joined to their pseudonyms and written as the Parquet part;
* ``rejects``: the rejected rows with their reasons, written to ``rejects/<sha>.csv``;
* ``other``: the rest (settings, the manifest, moving files into place).

Prints one JSON line: the file, events read, wall seconds in total and per stage, the process's
CPU seconds (all threads) in total and per stage (less sensitive than wall time to other jobs on a
shared machine), and the 1-minute load average before and after. Uses a fixed key unless
``$PURCHASE_INTENT_PSEUDONYM_KEY`` is set.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import duckdb

import purchase_intent.events as events
from purchase_intent.config import DataConfig
from purchase_intent.memory import MEMORY_LIMIT_ENV
from purchase_intent.privacy import KEY_ENV

SECONDS: dict[str, float] = {}
CPU_SECONDS: dict[str, float] = {}  # the process's CPU seconds (all threads: DuckDB's and Python's)
CURRENT: list[str] = []  # set while a Python function timed as one stage runs


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _add(stage: str, seconds: float, cpu: float) -> None:
    SECONDS[stage] = SECONDS.get(stage, 0.0) + seconds
    CPU_SECONDS[stage] = CPU_SECONDS.get(stage, 0.0) + cpu


def _stage_of(sql: str) -> str:
    text = " ".join(sql.split()).upper()
    if text.startswith("COPY"):
        return "write"
    if text.startswith("CREATE TEMP"):
        return "stage"
    if "FROM STAGED" in text or "FROM REJECT_ERRORS" in text:
        return "counts"
    return "other"


class TimedConnection:
    """A DuckDB connection whose ``execute`` calls are timed by stage (the rest is passed through)."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self._con = con

    def execute(self, sql, *args, **kwargs):
        if CURRENT:  # inside a stage timed as a whole
            return self._con.execute(sql, *args, **kwargs)
        t, c = time.perf_counter(), _cpu()
        try:
            return self._con.execute(sql, *args, **kwargs)
        finally:
            _add(_stage_of(sql), time.perf_counter() - t, _cpu() - c)

    def __getattr__(self, name):
        return getattr(self._con, name)


def _timed(stage: str, fn):
    def wrapper(*args, **kwargs):
        CURRENT.append(stage)
        t, c = time.perf_counter(), _cpu()
        try:
            return fn(*args, **kwargs)
        finally:
            CURRENT.pop()
            _add(stage, time.perf_counter() - t, _cpu() - c)
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="the source file")
    ap.add_argument("--format", default="parquet", help="ingest's --format (default parquet)")
    ap.add_argument("--memory-limit", help="as ingest's --memory-limit (e.g. 2GB)")
    args = ap.parse_args()
    os.environ.setdefault(KEY_ENV, "be5c" * 8)
    if args.memory_limit:
        os.environ[MEMORY_LIMIT_ENV] = args.memory_limit
    connect = duckdb.connect
    events.duckdb.connect = lambda *a, **k: TimedConnection(connect(*a, **k))
    events._sha256 = _timed("sha256", events._sha256)
    events._pseudonym_map = _timed("maps", events._pseudonym_map)
    events.collect_rejects = _timed("rejects", events.collect_rejects)
    load = os.getloadavg()[0]
    ws = Path(tempfile.mkdtemp(prefix="profile_ingest_ws_"))
    try:
        t0, c0 = time.perf_counter(), _cpu()
        report = events.ingest(ws, [args.path], DataConfig(format=args.format), progress=False)
        total, cpu = time.perf_counter() - t0, _cpu() - c0
    finally:
        duckdb.connect = connect
        shutil.rmtree(ws, ignore_errors=True)
    stages = {k: round(v, 2) for k, v in SECONDS.items() if k != "other"}
    stages["other"] = round(total - sum(v for k, v in SECONDS.items() if k != "other"), 2)
    cpu_stages = {k: round(v, 2) for k, v in CPU_SECONDS.items() if k != "other"}
    cpu_stages["other"] = round(cpu - sum(v for k, v in CPU_SECONDS.items() if k != "other"), 2)
    print(json.dumps({"file": args.path, "format": args.format, "events": report.files[0].rows_read,
                      "accepted": report.accepted, "rejected": sum(report.rejected.values()),
                      "s": round(total, 2), "stages": stages, "cpu_s": round(cpu, 2), "cpu_stages": cpu_stages,
                      "load_1min_before": round(load, 2),
                      "load_1min_after": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
