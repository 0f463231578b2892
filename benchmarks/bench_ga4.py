"""A GA4 export through `run --format ga4 --task session` against the same rows flattened by hand.

    python benchmarks/bench_ga4.py --users 3000 --days 42 --models logreg,lightgbm

The export is ``tests/ga4_fixture.py``'s: the seeded simulated shop written as the GA4 BigQuery
export (daily Parquet files, Google's nested schema), with the checkout funnel before each purchase
and a share of abandoned checkouts. Two workspaces with one pseudonym key:

* ``ga4``: ``purchase-intent run --data EXPORT --format ga4 --task session``, no --map, no --event-map;
* ``by_hand``: the same rows flattened by a DuckDB query of the kind a user would write (one row per
  item, user_id else user_pseudo_id, the ga_session_id parameter), then ``run --format csv`` with
  every event name mapped to ``other`` but ``purchase`` (which the labels need):
  ``--event-map remove_from_cart=other`` (the one other GA4 name that is a canonical one).

Both hold the same events, sessions and users, so they have the same examples; the script checks it
and prints, per model, test ROC-AUC of both and the paired bootstrap difference (ga4 - by_hand) with
its 95% interval (``evaluate.paired_auc_difference``, the same draws as ``compare``). One JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from ga4_fixture import ga4_rows, write_ga4  # noqa: E402

from purchase_intent import evaluate, runs  # noqa: E402
from purchase_intent.cli import main  # noqa: E402

FLATTEN = """
COPY (
  SELECT coalesce(NULLIF(user_id, ''), user_pseudo_id) AS user_id, event_timestamp AS ts_us,
         event_name AS event, it.item_id AS item_id, it.item_category AS category, it.price AS price,
         coalesce(NULLIF(user_id, ''), user_pseudo_id) || ':' ||
           list_filter(event_params, lambda p: p.key = 'ga_session_id')[1].value.int_value AS session_id
  FROM read_parquet('{src}/*.parquet')
  LEFT JOIN LATERAL (SELECT unnest(CASE WHEN len(items) > 0 THEN items ELSE [NULL] END) AS it) ON true
) TO '{dst}' (HEADER, DELIMITER ',')
"""


def test_scores(ws: Path, model: str):
    pred = runs.read_predictions(ws / "runs" / model)
    return pred[pred["split"] == "test"].sort_values("example_id").reset_index(drop=True)


def main_(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=3000)
    ap.add_argument("--days", type=int, default=42)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default="logreg,lightgbm")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--workdir", help="keep the export and workspaces here (default: a temporary folder)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("PURCHASE_INTENT_PSEUDONYM_KEY", "bench-ga4-fixed-key-0123456789")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-ga4-"))
    t0 = time.perf_counter()
    rows = ga4_rows(users=a.users, days=a.days, seed=a.seed)
    write_ga4(rows, work / "export", "parquet")
    flat = work / "by_hand.csv"
    duckdb.connect().execute(FLATTEN.format(src=work / "export", dst=flat))
    t_data = time.perf_counter() - t0

    common = ["--task", "session", "--models", a.models, "--seed", str(a.seed)]
    seconds = {}
    t0 = time.perf_counter()
    assert main(["--workspace", str(work / "ga4"), "run", "--data", str(work / "export"), "--format", "ga4",
                 *common]) == 0
    seconds["ga4"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    assert main(["--workspace", str(work / "by_hand"), "run", "--data", str(flat), "--format", "csv",
                 "--map", "ts=ts_us", "--ts-unit", "us", "--event-map", "remove_from_cart=other", *common]) == 0
    seconds["by_hand"] = round(time.perf_counter() - t0, 1)

    out = {"bench": "ga4", "users": a.users, "days": a.days, "seed": a.seed, "export_rows": len(rows),
           "data_s": round(t_data, 1), "run_s": seconds, "models": {}}
    for m in [x.strip() for x in a.models.split(",") if x.strip()]:
        g, h = test_scores(work / "ga4", m), test_scores(work / "by_hand", m)
        assert g["example_id"].equals(h["example_id"]) and g["label"].equals(h["label"]), "examples differ"
        y = g["label"].to_numpy()
        d = evaluate.paired_auc_difference(y, g["probability"].to_numpy(), h["probability"].to_numpy(),
                                           n_boot=a.n_boot, seed=0)
        out["models"][m] = {"n_test": int(len(y)), "positives": int(y.sum()),
                            "roc_auc_ga4": evaluate.roc_auc(y, g["probability"]),
                            "roc_auc_by_hand": evaluate.roc_auc(y, h["probability"]),
                            "diff": d.get("diff"), "ci": d.get("ci")}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main_()
