"""Time `purchase-intent monitor` on a simulated shop of N events (goal: 10M events in <= 1 minute).

    python benchmarks/bench_monitor.py --events 10_000_000
    python benchmarks/bench_monitor.py --events 1_000_000 --model logreg --repeat 3

Builds a workspace from ``benchmarks/make_sim_data.py`` output (the seeded simulator, Parquet),
through the CLI: ``ingest``, ``build`` (user task, 28d lookback, 7d horizon and step), ``train`` and
``evaluate`` of one model; then runs ``purchase-intent monitor --run MODEL`` ``--repeat`` times, each
in its own process (wall time, interpreter start and imports included), and prints one JSON line:
events, users, the users of both windows, the seconds of each preparation step and of each monitor
run, the monitor's own peak RSS and the load average.
``--workspace DIR`` keeps (and with ``--reuse`` reuses) the prepared workspace.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "purchase_intent.cli"]


def _run(args: list[str], env: dict) -> tuple[float, float]:
    """Run one CLI command; returns its wall seconds and its own peak RSS in MiB (raises with its
    output when it fails)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(CLI + args, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        if proc.returncode not in (0, 3):  # 3: monitor found drift (not a failure of the benchmark)
            log.seek(0)
            raise SystemExit(f"{' '.join(args[:3])} failed ({proc.returncode}):\n{log.read()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=lambda s: int(s.replace("_", "")), default=1_000_000)
    p.add_argument("--days", type=int, default=90)
    p.add_argument("--model", default="lightgbm", help="model of the monitored run (default lightgbm)")
    p.add_argument("--repeat", type=int, default=2, help="monitor runs, each in its own process")
    p.add_argument("--workspace", help="keep the prepared workspace here (default: a temporary folder)")
    p.add_argument("--reuse", action="store_true", help="reuse the prepared workspace of --workspace")
    p.add_argument("--training-from", choices=["build", "events"], default="build",
                   help="events: hide the build during the monitor runs (build.json renamed, then restored), so "
                        "that the training window is computed from the events, as after a rebuild")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-monitor-"))
    ws = Path(args.workspace) if args.workspace else tmp / "ws"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "PURCHASE_INTENT_PSEUDONYM_KEY": "bench-monitor-key"}
    steps: dict[str, float] = {}
    try:
        if not (args.reuse and (ws / "runs" / args.model / "metrics.json").exists()):
            shutil.rmtree(ws, ignore_errors=True)
            data = tmp / "sim.parquet"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(HERE / "make_sim_data.py"), "--events", str(args.events),
                            "--days", str(args.days), "--out", str(data)], env=env, check=True, capture_output=True)
            steps["simulate"] = time.perf_counter() - t0
            steps["ingest"], _ = _run(["--workspace", str(ws), "ingest", str(data), "--format", "parquet"], env)
            steps["build"], _ = _run(["--workspace", str(ws), "build", "--lookback", "28d", "--horizon", "7d",
                                   "--step", "7d"], env)
            steps["train"], _ = _run(["--workspace", str(ws), "train", "--model", args.model], env)
            steps["evaluate"], _ = _run(["--workspace", str(ws), "evaluate", "--run", args.model,
                                         "--n-boot", "200"], env)
        seconds, peaks = [], []
        build_json, hidden = ws / "examples" / "build.json", ws / "examples" / "build.json.hidden"
        if args.training_from == "events":
            build_json.rename(hidden)
        try:
            for _ in range(args.repeat):
                s, peak = _run(["--workspace", str(ws), "monitor", "--run", args.model], env)
                seconds.append(s)
                peaks.append(peak)
        finally:
            if hidden.exists():
                hidden.rename(build_json)
        result = json.loads((ws / "runs" / args.model / "monitor.json").read_text())
        manifest = json.loads((ws / "events" / "manifest.json").read_text())
        parts = [str(ws / "events" / p) for e in manifest["files"] for p in e["parts"]]
        n_events, n_users = duckdb.sql(f"SELECT count(*), count(DISTINCT user_id) FROM read_parquet({parts})"
                                       ).fetchall()[0]
        out = {
            "events": int(n_events), "users": int(n_users), "model": args.model,
            "training_window_users": result["training_window"]["n_compared"],
            "latest_window_users": result["latest_window"]["n"], "features": len(result["features"]),
            "verdict": result["verdict"], "monitor_internal_s": result["seconds"],
            "training_features_from": result["training_window"]["features_from"],
            "monitor_s": [round(s, 2) for s in seconds], "best_monitor_s": round(min(seconds), 2),
            "monitor_peak_rss_mib": round(max(peaks)),
            "prepare_s": {k: round(v, 1) for k, v in steps.items()},
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "cpus": os.cpu_count(),
        }
        print(json.dumps(out))
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
