"""Rows and bytes at each stage of the feature SQL: what a distributed engine would shuffle.

    .venv/bin/python benchmarks/feature_sql_volume.py sim-1m.parquet sim-10m.parquet --memory-limit 4GB

For each file (make_sim_data.py, 114 days): ingest into a fresh workspace, make the user-task
examples (28d / 7d, weekly cutoffs) and count the rows of the stages of ``features.features_sql``
that a shuffle-based engine (Spark) repartitions: ``ev`` (the events, by user, for the session
window), ``b`` (per-user time buckets), ``x`` (the examples, by user, for the join), ``hist`` (the
example x bucket join, partially aggregated per example before any exchange) and the output (one
row per example). Bytes are the rows times their width in Spark's UnsafeRow format (8 bytes per
fixed-width column plus the strings' bytes, averaged over the data). Prints one JSON line per file.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from purchase_intent import memory, runs
from purchase_intent.config import DataConfig, FeatureConfig, LabelConfig
from purchase_intent.events import ingest
from purchase_intent.features import _planned_sql
from purchase_intent.labels import build_examples
from purchase_intent.workspace import Workspace


def stage_counts(con, sql: str) -> dict:
    """Rows of the CTEs ev, b, x, hist of the feature SQL (its WITH clause, re-used)."""
    head = sql[: sql.rindex("\n    SELECT ")]  # the WITH ... clause, without the final SELECT
    q = (head + "\n SELECT (SELECT count(*) FROM ev), (SELECT count(*) FROM b), (SELECT count(*) FROM x), "
         "(SELECT count(*) FROM hist)")
    ev, b, x, hist = con.execute(q).fetchall()[0]
    b_cols = len(con.execute(head + "\n SELECT * FROM b LIMIT 0").description)
    return {"ev": ev, "b": b, "x": x, "hist": hist, "b_columns": b_cols}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="+", type=Path)
    ap.add_argument("--memory-limit", default="4GB")
    args = ap.parse_args()
    memory.set_limit(args.memory_limit)
    os.environ.setdefault("PURCHASE_INTENT_PSEUDONYM_KEY", "bench-not-secret")
    for data in args.data:
        root = Path(tempfile.mkdtemp(prefix="pi-volume-"))
        try:
            ws = Workspace(root / "ws")
            ingest(ws, [data], DataConfig(format="parquet"), progress=False)
            con = ws.connect()
            t0 = time.perf_counter()
            ex = build_examples(con, LabelConfig()).to_pandas()
            runs.register_examples(con, ex)
            fcfg = FeatureConfig()
            sql, names = _planned_sql(con, "examples", fcfg, "events")
            counts = stage_counts(con, sql)
            # widths: fixed columns 8 bytes each, strings their mean length (UnsafeRow: 8-byte slot + bytes)
            s = con.execute("SELECT avg(length(user_id)), avg(length(coalesce(item_id, ''))), "
                            "avg(length(coalesce(category, ''))), avg(length(coalesce(session_id, ''))), "
                            "avg(length(event)), count(*) FROM events").fetchall()[0]
            ev_row = 8 * 8 + sum(s[:5])  # user, ts, event, item, category, price, session, sess_prev
            bytes_ = {"ev": counts["ev"] * ev_row, "b": counts["b"] * (8 * counts.pop("b_columns") + s[0]),
                      "x": counts["x"] * (8 * 4 + s[0]), "out": counts["x"] * 8 * (len(names) + 1)}
            print(json.dumps({"file": str(data), "events": s[5], "examples": len(ex), "features": len(names),
                              "rows": counts, "bytes": bytes_, "ev_row_bytes": round(ev_row, 1),
                              "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
            con.close()
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
