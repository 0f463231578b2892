"""Time the pseudonym maps of ingest alone: HMAC-SHA256 in DuckDB SQL against Python per distinct id.

    python benchmarks/bench_pseudonyms.py sim-1m.csv.gz --repeat 10

Reads the distinct user and session ids of a CSV (columns user_id and session_id) into a DuckDB
table once, then builds both maps ``(raw, pid)`` the way ingest does, alternating the variants
(sql, python, python, sql, ...) so that a change in the machine's load hits both alike:

* ``sql``: ``CREATE TEMP TABLE ... AS SELECT raw, <privacy.pseudonym_sql> FROM (SELECT DISTINCT ...)``,
  on DuckDB's threads (``--threads``, default DuckDB's own).
* ``python``: the distinct ids to Arrow, ``privacy.pseudonym_table`` (hashlib, one thread),
  registered and copied into a DuckDB table.

Checks that both give the same pseudonyms, then prints one JSON line: ids, the load averages before
and after, and per variant the median, min and max wall seconds and the median CPU seconds (all
threads), and the ratio python / sql of the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import duckdb

from purchase_intent.privacy import pseudonym_params, pseudonym_sql, pseudonym_table


def build_sql(con: duckdb.DuckDBPyConnection, name: str, col: str, key: bytes) -> None:
    con.execute(f"CREATE TEMP TABLE {name} AS SELECT raw, {pseudonym_sql('raw')} AS pid "
                f"FROM (SELECT DISTINCT {col} AS raw FROM staged WHERE {col} IS NOT NULL)", pseudonym_params(key))


def build_python(con: duckdb.DuckDBPyConnection, name: str, col: str, key: bytes) -> None:
    ids = con.sql(f"SELECT DISTINCT {col} FROM staged WHERE {col} IS NOT NULL").to_arrow_table()
    con.register("ids_arrow", pseudonym_table(ids.column(0), key))
    con.execute(f"CREATE TEMP TABLE {name} AS SELECT * FROM ids_arrow")
    con.unregister("ids_arrow")


VARIANTS = {"sql": build_sql, "python": build_python}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a CSV (or .csv.gz) with the columns user_id and session_id")
    ap.add_argument("--repeat", type=int, default=10, help="runs of each variant (default 10)")
    ap.add_argument("--threads", type=int, help="DuckDB threads (default: DuckDB's own)")
    args = ap.parse_args()
    key = bytes(range(32))
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    if args.threads:
        con.execute(f"SET threads = {args.threads}")
    con.execute("CREATE TEMP TABLE staged AS SELECT user_id::VARCHAR AS user_raw, session_id::VARCHAR AS session_raw "
                f"FROM read_csv('{args.path}', all_varchar = true)")
    n_ids = sum(con.execute(f"SELECT count(DISTINCT {c}) FROM staged").fetchall()[0][0]
                for c in ("user_raw", "session_raw"))
    load_before = os.getloadavg()
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(args.repeat):
        for v in (VARIANTS if i % 2 == 0 else list(VARIANTS)[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            for col, name in (("user_raw", "user_map"), ("session_raw", "session_map")):
                VARIANTS[v](con, f"{name}_{v}", col, key)
            wall[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
        for name in ("user_map", "session_map"):
            diff = con.execute(f"SELECT count(*) FROM {name}_sql a FULL JOIN {name}_python b USING (raw) "
                               "WHERE a.pid IS DISTINCT FROM b.pid").fetchall()[0][0]
            if diff:
                raise RuntimeError(f"{name}: {diff} ids differ between the variants")
            for v in VARIANTS:
                con.execute(f"DROP TABLE {name}_{v}")
    res = {v: {"s": round(statistics.median(w), 3), "min_s": round(min(w), 3), "max_s": round(max(w), 3),
               "cpu_s": round(statistics.median(cpu[v]), 3)} for v, w in wall.items()}
    print(json.dumps({
        "file": args.path, "ids": n_ids, "cpus": os.cpu_count(),
        "threads": con.execute("SELECT current_setting('threads')").fetchall()[0][0],
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        "repeat": args.repeat, **res,
        "ids_per_s": {v: round(n_ids / r["s"]) for v, r in res.items()},
        "python_over_sql": round(res["python"]["s"] / res["sql"]["s"], 2),
    }))


if __name__ == "__main__":
    main()
