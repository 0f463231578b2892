"""Time `purchase-intent build` on DuckDB and on Spark (`--engine spark`), on the same workspace data.

    python benchmarks/bench_spark.py --events 1000000
    python benchmarks/bench_spark.py --events 1000000 3000000 --master 'local[2]' --out benchmarks/results/spark.json
    python benchmarks/bench_spark.py --events 1000000 --spark-conf spark.sql.shuffle.partitions=8 --no-metrics

For each size: the simulator's log (``make_sim_data.py``, 90 days) is written as Parquet and ingested
once with DuckDB; then ``purchase-intent build --task user`` (28d lookback, 7d horizon, 7d step) runs as
a separate process on each engine in turn (DuckDB, Spark, DuckDB, Spark, ... ``--repeat`` times), timed
wall-clock (Spark's includes starting its JVM, as a user's command does) and by the build's own
``seconds`` in ``examples/build.json``. Both builds must write the same examples (checked). Last, one
in-process Spark build reads Spark's own stage metrics (its status API): the number of stages and
the shuffle bytes written, which is what grows with the data on a cluster. Prints one JSON line per
size; ``--out`` writes them all as a JSON list.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sim_data import users_for_events  # noqa: E402

from purchase_intent.simulate import SimConfig, write_events  # noqa: E402

CLI = [sys.executable, "-m", "purchase_intent.cli"]
TASK = ["--task", "user", "--lookback", "28d", "--horizon", "7d", "--step", "7d"]


def _build(ws: Path, engine: str, master: str, conf: list[str]) -> dict:
    cmd = CLI + ["--workspace", str(ws), "build", *TASK, "--engine", engine]
    if engine == "spark":
        cmd += ["--spark-conf", f"spark.master={master}"] + [a for c in conf for a in ("--spark-conf", c)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")] or done.stderr.splitlines()[-1:]
        raise SystemExit(f"{engine} build failed after {wall:.0f}s: {errors[-1] if errors else done.returncode}")
    info = json.loads((ws / "examples" / "build.json").read_text())
    ex = pd.read_parquet(ws / "examples" / "examples.parquet", columns=["example_id", "user_id", "cutoff", "split"])
    return {"wall_s": round(wall, 2), "build_s": info["seconds"], "examples": info["n_examples"], "ex": ex}


def _stage_metrics(ws: Path, master: str) -> dict:
    """One in-process Spark build, then the stages of the application from Spark's status API."""
    from pyspark.sql import SparkSession

    from purchase_intent import pipeline
    from purchase_intent.config import LabelConfig
    from purchase_intent.engine import EngineConfig

    spark = (SparkSession.builder.master(master).config("spark.ui.enabled", "true")
             .config("spark.ui.showConsoleProgress", "false").config("spark.log.level", "ERROR").getOrCreate())
    pipeline.build(LabelConfig(task="user", lookback="28d", horizon="7d", step="7d"), workspace=ws, quiet=True,
                   engine=EngineConfig("spark"))
    url = f"{spark.sparkContext.uiWebUrl}/api/v1/applications/{spark.sparkContext.applicationId}/stages"
    stages = json.loads(urllib.request.urlopen(url, timeout=30).read())
    done = [s for s in stages if s.get("status") == "COMPLETE"]
    out = {"stages": len(done), "shuffle_stages": sum(1 for s in done if s.get("shuffleWriteBytes", 0) > 0),
           "shuffle_write_mib": round(sum(s.get("shuffleWriteBytes", 0) for s in done) / 2**20, 1),
           "shuffle_read_mib": round(sum(s.get("shuffleReadBytes", 0) for s in done) / 2**20, 1),
           "input_mib": round(sum(s.get("inputBytes", 0) for s in done) / 2**20, 1)}
    spark.stop()
    return out


def run(n_events: int, repeat: int, master: str, metrics: bool, conf: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-spark-") as d:
        d = Path(d)
        cfg = SimConfig(days=90, seed=0)
        cfg = replace(cfg, n_users=users_for_events(cfg, n_events))
        rows = write_events(cfg, d / "events.parquet")
        ws = d / "ws"
        env = {**os.environ, "PURCHASE_INTENT_PSEUDONYM_KEY": "00112233445566778899aabbccddeeff"}
        subprocess.run(CLI + ["--workspace", str(ws), "ingest", str(d / "events.parquet"), "--format", "parquet"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        times: dict[str, list[dict]] = {"duckdb": [], "spark": []}
        for _ in range(repeat):
            for engine in ("duckdb", "spark"):
                times[engine].append(_build(ws, engine, master, conf))
        a, b = times["duckdb"][-1].pop("ex"), times["spark"][-1].pop("ex")
        pd.testing.assert_frame_equal(a, b)  # the same examples and splits from both engines
        for rs in times.values():
            for r in rs:
                r.pop("ex", None)
        best = {e: min(r["wall_s"] for r in rs) for e, rs in times.items()}
        best_build = {e: min(r["build_s"] for r in rs) for e, rs in times.items()}
        out = {"events": rows, "users": cfg.n_users, "examples": times["duckdb"][0]["examples"], "master": master,
               "spark_conf": conf,
               "duckdb_wall_s": best["duckdb"], "spark_wall_s": best["spark"],
               "duckdb_build_s": best_build["duckdb"], "spark_build_s": best_build["spark"],
               "ratio_wall": round(best["spark"] / best["duckdb"], 2),
               "ratio_build": round(best_build["spark"] / best_build["duckdb"], 2), "runs": times,
               "load_average": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
        if metrics:
            out["spark_metrics"] = _stage_metrics(ws, master)
        return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", nargs="+", type=lambda s: int(s.replace("_", "")), default=[1_000_000])
    p.add_argument("--repeat", type=int, default=1, help="alternating builds per engine (best is reported)")
    p.add_argument("--master", default="local[2]", help="spark.master of the Spark builds (default local[2])")
    p.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE",
                   help="more Spark settings for the CLI builds (repeatable)")
    p.add_argument("--no-metrics", action="store_true", help="skip the in-process build that reads stage metrics")
    p.add_argument("--out", help="also write the results as a JSON list to this file")
    args = p.parse_args(argv)
    results = []
    for n in args.events:
        r = run(n, args.repeat, args.master, not args.no_metrics, args.spark_conf)
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
