"""Time and peak memory of every step, as a user runs them, at several sizes; growth exponents.

    .venv/bin/python benchmarks/make_sim_data.py --days 114 --events 1_000_000 --out sim-1m.parquet
    .venv/bin/python benchmarks/bench_scale_steps.py sim-1m.parquet sim-10m.parquet sim-30m.parquet \\
        --memory-limit 4GB --out benchmarks/results/scale_steps.json
    # the same steps on another source tree (e.g. the commit before a change), in the same run:
    .venv/bin/python benchmarks/bench_scale_steps.py sim-10m.parquet --src /tmp/base --label before

Each step is the `purchase-intent` command (``python -m purchase_intent.cli``) in its own child
process on a fresh workspace per file, in this order: ``ingest`` (``--format parquet``), ``build``
(user task, 28d lookback, 7d horizon, weekly cutoffs: 12 on 114 days), ``pretrain`` (only when
``--steps`` names it: the encoder's defaults, tiny and masked, with ``--pretrain-args``, by default
window 200), ``train lightgbm``,
``train transformer`` (preset tiny; ``--transformer-params``), ``backtest`` (``evaluate --run
lightgbm --backtest K``: K refits) and ``score`` (``score --run lightgbm``, every active user at the
end of the data). Seconds are the child's wall time; peak RSS is the child's own ``ru_maxrss``
(``os.wait4``), imports included. ``--memory-limit`` goes to every step through
``$PURCHASE_INTENT_MEMORY_LIMIT`` (a source tree without it ignores it). ``ingest_scan`` is a bare
DuckDB scan of the same Parquet file (every value of every column hashed and summed, so that
each is decoded: a count would be answered from the file's statistics), the reference for ingest.

Growth exponent b per step: the least-squares slope of log(seconds) against log(events) (and of
log(peak RSS)) over the sizes given. Writes one JSON file with every row and the fits, and prints
a Markdown table. ``--refit A.json B.json ...`` pools the rows of earlier runs (same label; the
later run of a step and size wins) and prints the table and the fits over all of them::

    .venv/bin/python benchmarks/bench_scale_steps.py --refit results/a.json results/b.json --label after
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

STEPS = ("ingest_scan", "ingest", "build", "pretrain", "lightgbm", "transformer", "backtest", "score")
DEFAULT_STEPS = tuple(s for s in STEPS if s != "pretrain")  # the steps of the earlier runs' commands
SCAN = """
import sys, duckdb
con = duckdb.connect(); con.execute("SET threads = 2")
cols = [r[0] for r in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [sys.argv[1]]).fetchall()]
sums = ", ".join(f'sum(hash("{c}"))' for c in cols)
con.execute("SELECT " + sums + " FROM read_parquet(?)", [sys.argv[1]]).fetchall()
"""


def run_child(cmd: list[str], env: dict, log: Path, cwd: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit status) of ``cmd`` run to completion in folder ``cwd``."""
    t0 = time.perf_counter()
    with open(log, "ab") as out:
        out.write(("$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, proc.returncode


def count_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def step_commands(name: str, data: Path, args) -> list[list[str]]:
    cli = [sys.executable, "-m", "purchase_intent.cli"]
    tparams = [x for kv in args.transformer_params.split(",") if kv for x in ("--param", kv)]
    return {
        "ingest_scan": [[sys.executable, "-c", SCAN, str(data)]],
        "ingest": [cli + ["ingest", str(data), "--format", "parquet"]],
        "build": [cli + ["build", "--task", "user", "--lookback", "28d", "--horizon", "7d", "--step", "7d"]],
        "pretrain": [cli + ["pretrain", *args.pretrain_args.split()]],
        "lightgbm": [cli + ["train", "--model", "lightgbm"]],
        "transformer": [cli + ["train", "--model", "transformer", "--param", "preset=tiny", *tparams]],
        "backtest": [cli + ["evaluate", "--run", "lightgbm", "--backtest", str(args.backtest), "--n-boot", "100"]],
        "score": [cli + ["score", "--run", "lightgbm", "--out", "scores.parquet", "--quiet"]],
    }[name]


def fit_exponent(events: list[int], values: list[float]) -> float | None:
    """Slope b of log(value) = a + b log(events); None with fewer than two sizes."""
    if len(set(events)) < 2:
        return None
    return float(np.polyfit(np.log(events), np.log(values), 1)[0])


def fit_all(steps, rows) -> dict:
    fits = {}
    for step in steps:
        ok = [r for r in rows if r["step"] == step and r["rc"] == 0]
        ev = [r["events"] for r in ok]
        fits[step] = {"b_time": fit_exponent(ev, [max(r["seconds"], 1e-3) for r in ok]),
                      "b_rss": fit_exponent(ev, [r["peak_rss_mib"] for r in ok])}
    return fits


def print_table(label: str, steps, rows, fits, note: str) -> None:
    sizes = sorted({r["events"] for r in rows})
    print(f"\n{label}: {note}")
    print("| step | " + " | ".join(f"{n:,} events s / MiB" for n in sizes) + " | b (time) | b (RSS) |")
    print("|---" * (len(sizes) + 3) + "|")
    fmt = lambda b: "-" if b is None else f"{b:.2f}"  # noqa: E731
    for step in steps:
        cells = []
        for n in sizes:
            r = next((r for r in rows if r["step"] == step and r["events"] == n), None)
            cells.append("-" if r is None else (f"{r['seconds']:.1f} / {r['peak_rss_mib']:,}" if r["rc"] == 0
                                                else f"failed (rc {r['rc']})"))
        print(f"| {step} | " + " | ".join(cells) + f" | {fmt(fits[step]['b_time'])} | {fmt(fits[step]['b_rss'])} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="*", type=Path, help="Parquet files of make_sim_data.py, smallest first")
    ap.add_argument("--refit", nargs="+", type=Path, metavar="JSON", help="pool these result files; run nothing")
    ap.add_argument("--steps", default=",".join(DEFAULT_STEPS),
                    help="comma-separated, of: " + ",".join(STEPS) + " (default: all but pretrain)")
    ap.add_argument("--memory-limit", help="passed to every step as $PURCHASE_INTENT_MEMORY_LIMIT")
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1],
                    help="source tree whose purchase_intent runs (default: this one)")
    ap.add_argument("--label", default="after", help="name of this source tree in the results")
    ap.add_argument("--transformer-params", default="max_epochs=1,batch_size=1024",
                    help="comma-separated KEY=VALUE for `train --model transformer`")
    ap.add_argument("--pretrain-args", default="--max-seq-len 200",
                    help="arguments of `pretrain` (space-separated; default: window 200, the rest its defaults)")
    ap.add_argument("--backtest", type=int, default=2, help="K of `evaluate --backtest K`")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-scale-steps"))
    ap.add_argument("--keep", action="store_true", help="keep each workspace (default: removed after its file)")
    ap.add_argument("--out", type=Path, help="JSON file of the results (appended to when it exists)")
    args = ap.parse_args()
    if args.refit:
        pooled: dict = {}
        for f in args.refit:  # a results file, or the JSON lines a run printed (one row each)
            text = f.read_text()
            results = json.loads(text) if text.lstrip().startswith("[") else [
                {"rows": [json.loads(line) for line in text.splitlines() if line.startswith("{")]}]
            for res in results:
                for r in res["rows"]:
                    if r["label"] == args.label:
                        pooled[(r["step"], r["events"])] = r
        rows = list(pooled.values())
        print_table(args.label, [s for s in STEPS if any(r["step"] == s for r in rows)], rows, fit_all(STEPS, rows),
                    "pooled from " + ", ".join(map(str, args.refit)))
        return
    if not args.data:
        raise SystemExit("give the data files (or --refit JSON files)")
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise SystemExit(f"unknown step(s) {bad}; choose from {','.join(STEPS)}")

    env = {**os.environ, "PYTHONPATH": str(args.src.resolve()),
           "PURCHASE_INTENT_PSEUDONYM_KEY": os.environ.get("PURCHASE_INTENT_PSEUDONYM_KEY", "bench-not-secret"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env.pop("PURCHASE_INTENT_MEMORY_LIMIT", None)
    if args.memory_limit:
        env["PURCHASE_INTENT_MEMORY_LIMIT"] = args.memory_limit
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = args.workdir / "steps.log"
    rows = []
    for data in args.data:
        data = data.resolve()
        n = count_rows(data)
        ws = args.workdir / f"ws-{args.label}-{n}"
        shutil.rmtree(ws, ignore_errors=True)
        ws.mkdir(parents=True)
        step_env = {**env, "PURCHASE_INTENT_WORKSPACE": str(ws)}
        for step in steps:
            load = open("/proc/loadavg").read().split()[0]
            seconds, rss, rc = 0.0, 0.0, 0
            for cmd in step_commands(step, data, args):
                s, r, rc = run_child(cmd, step_env, log, ws)  # score's --out lands in the workspace
                seconds, rss = seconds + s, max(rss, r)
                if rc:
                    break
            row = {"label": args.label, "events": n, "step": step, "seconds": round(seconds, 2),
                   "peak_rss_mib": round(rss), "rc": rc, "load1": float(load)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if rc and step in ("ingest", "build"):
                break
        if not args.keep:
            shutil.rmtree(ws, ignore_errors=True)

    fits = fit_all(steps, rows)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.0f} GiB",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "memory_limit": args.memory_limit, "label": args.label, "src": str(args.src),
        "transformer_params": args.transformer_params, "pretrain_args": args.pretrain_args, "rows": rows, "fits": fits,
    }
    if args.out:
        old = json.loads(args.out.read_text()) if args.out.exists() else []
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([*old, result], indent=1) + "\n")
    print_table(args.label, steps, rows, fits, f"memory limit {args.memory_limit or 'none'}; {result['machine']}")


if __name__ == "__main__":
    main()
