"""Time `purchase-intent score` on DuckDB and on Spark (`--engine spark`) for the same runs.

    python benchmarks/bench_spark_score.py --users 5000 --days 60
    python benchmarks/bench_spark_score.py --users 5000 --days 60 --models transformer lightgbm --repeat 2 \\
        --out benchmarks/results/spark_score.json

A simulated shop (``simulate.write_events``) is written as Parquet, ingested and built with DuckDB
(user task: 14d lookback, 7d horizon, 7d step), and each model of ``--models`` trained through the CLI
(the Transformer: tiny preset, one epoch, sequences of 50). Then ``purchase-intent score`` of each run
at the end of the data runs as its own process on each engine in turn (DuckDB, Spark, DuckDB, ...
``--repeat`` times): timed wall-clock (Spark's includes starting its JVM, as a user's command does) and
by the command's own ``seconds`` (the summary JSON). Both engines must give the same users and
probabilities to 1e-6 (checked). Prints one JSON line per model; ``--out`` writes them as a JSON list.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from purchase_intent.simulate import SimConfig, write_events

CLI = [sys.executable, "-m", "purchase_intent.cli"]
TASK = ["--task", "user", "--lookback", "14d", "--horizon", "7d", "--step", "7d"]
PARAMS = {"transformer": ["--param", "preset=tiny", "--param", "max_epochs=1", "--param", "max_seq_len=50"]}


def _cli(ws: Path, *args: str) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(CLI + ["--workspace", str(ws), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(args[:3])} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return time.perf_counter() - t0


def _score(ws: Path, run: str, engine: str, out: Path, master: str, conf: list[str]) -> dict:
    args = ["score", "--run", run, "--out", str(out), "--engine", engine]
    if engine == "spark":
        args += ["--spark-conf", f"spark.master={master}"] + [a for c in conf for a in ("--spark-conf", c)]
    wall = _cli(ws, *args)
    summary = json.loads(out.with_name(out.stem + ".summary.json").read_text())
    return {"wall_s": round(wall, 2), "score_s": summary["seconds"], "n_scored": summary["n_scored"]}


def run(users: int, days: int, models: list[str], repeat: int, master: str, conf: list[str]) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-spark-score-") as d:
        d = Path(d)
        rows = write_events(SimConfig(n_users=users, days=days, seed=0), d / "events.parquet")
        ws = d / "ws"
        _cli(ws, "ingest", str(d / "events.parquet"), "--format", "parquet")
        _cli(ws, "build", *TASK)
        for model in models:
            train_s = _cli(ws, "train", "--model", model, *PARAMS.get(model, []))
            times: dict[str, list[dict]] = {"duckdb": [], "spark": []}
            for r in range(repeat):
                for engine in ("duckdb", "spark"):
                    times[engine].append(_score(ws, model, engine, d / f"{model}-{engine}-{r}.parquet", master, conf))
            a, b = (pd.read_parquet(d / f"{model}-{e}-0.parquet").set_index("user_id")["probability"]
                    for e in ("duckdb", "spark"))
            assert sorted(a.index) == sorted(b.index), "the engines scored different users"
            diff = float(np.max(np.abs(b.reindex(a.index).to_numpy() - a.to_numpy())))
            assert diff <= 1e-6, f"{model}: Spark's probabilities differ from DuckDB's by {diff:.2e}"
            best = {e: min(x["wall_s"] for x in rs) for e, rs in times.items()}
            best_score = {e: min(x["score_s"] for x in rs) for e, rs in times.items()}
            results.append({
                "model": model, "events": rows, "users": users, "days": days, "scored": times["duckdb"][0]["n_scored"],
                "train_s": round(train_s, 1), "master": master, "spark_conf": conf,
                "duckdb_wall_s": best["duckdb"], "spark_wall_s": best["spark"],
                "duckdb_score_s": best_score["duckdb"], "spark_score_s": best_score["spark"],
                "ratio_wall": round(best["spark"] / best["duckdb"], 2),
                "ratio_score": round(best_score["spark"] / best_score["duckdb"], 2),
                "max_abs_diff": diff, "runs": times,
                "load_average": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()})
            print(json.dumps(results[-1]), flush=True)
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--days", type=int, default=60)
    p.add_argument("--models", nargs="+", default=["transformer"])
    p.add_argument("--repeat", type=int, default=1, help="alternating scorings per engine (best is reported)")
    p.add_argument("--master", default="local[2]", help="spark.master of the Spark scorings (default local[2])")
    p.add_argument("--spark-conf", action="append", default=["spark.sql.shuffle.partitions=8"], metavar="KEY=VALUE",
                   help="more Spark settings (default spark.sql.shuffle.partitions=8)")
    p.add_argument("--out", help="also write the results as a JSON list to this file")
    a = p.parse_args(argv)
    os.environ.setdefault("PURCHASE_INTENT_PSEUDONYM_KEY", "00112233445566778899aabbccddeeff")
    out = run(a.users, a.days, a.models, a.repeat, a.master, a.spark_conf)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
