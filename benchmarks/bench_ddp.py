"""The tiny Transformer on 1 process and on 2 torchrun processes (gloo), from streamed train shards.

    python benchmarks/bench_ddp.py                                  # 6,000 simulated users, 60 days
    python benchmarks/bench_ddp.py --users 6000 --shard-rows 2000 --repeat 2 --out benchmarks/results/ddp.json

A simulated shop is written, ingested and built through the CLI (``simulate``, ``ingest``,
``build --task user``) in a fresh workspace. Then each mode trains ``--model transformer`` through
the CLI, as a user runs it, and is evaluated (``evaluate --n-boot 50``):

* ``memory1``: one process, the train split in memory (``stream_shard_rows=null``);
* ``stream1``: one process, the train split streamed from shards of ``--shard-rows`` examples;
* ``stream2``: ``torchrun --nproc_per_node 2 -m purchase_intent.cli ... train``, the same shards
  shared between the two ranks (each writes and reads only its own);
* ``memory2`` (with ``--memory2``): two processes, each holding the whole train split (before).

Every mode uses the same global batch (``--batch-size``), ``--max-epochs`` epochs with no early
stop (``patience=0``) and ``OMP_NUM_THREADS=1`` per process. With ``--repeat 2`` the second round
runs the modes in the opposite order. Reported per run: the wall seconds of the train command; the
training loop's seconds per step (batching + forward/backward/step, from the run's
``train_result``; under torchrun the ranks step together, rank 0's times); train examples per
second over those seconds; the peak RSS (``VmHWM``) of every process of the command, polled from
/proc every 0.1 s; valid and test ROC-AUC. Prints one JSON object; ``--out`` also writes it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _cli(ws: Path, *args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "purchase_intent.cli", "--workspace", str(ws), *args],
                   check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def _hwm_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _run_polled(cmd: list[str], env: dict) -> tuple[float, dict[int, float]]:
    """Run ``cmd``; wall seconds and the peak RSS (MiB) of each of its python processes but torchrun's own."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, float] = {}
    done = threading.Event()

    def poll():
        while not done.is_set():
            for p in _descendants(proc.pid):
                if p == proc.pid and "torchrun" in cmd[0]:
                    continue  # the launcher, not a rank
                hwm = _hwm_mib(p)
                if hwm is not None:
                    peaks[p] = max(peaks.get(p, 0.0), hwm)
            time.sleep(0.1)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    _, err = proc.communicate()
    done.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return time.perf_counter() - t0, peaks


def run_mode(mode: str, ws: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    rows = "null" if mode.startswith("memory") else str(args.shard_rows)
    train = ["--workspace", str(ws), "train", "--model", "transformer",
             "--param", f"stream_shard_rows={rows}", "--param", f"batch_size={args.batch_size}",
             "--param", f"max_epochs={args.max_epochs}", "--param", "patience=0"]
    if mode.endswith("2"):
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "purchase_intent.cli", *train]
    else:
        cmd = [sys.executable, "-m", "purchase_intent.cli", *train]
    wall, peaks = _run_polled(cmd, env)
    _cli(ws, "evaluate", "--run", "transformer", "--n-boot", "50", env=env)
    run = ws / "runs" / "transformer"
    metrics = json.loads((run / "metrics.json").read_text())
    meta = json.loads((run / "run.json").read_text())
    tr = json.loads((run / "model" / "config.json").read_text())["train_result"]
    loop_s = tr["time_batching_s"] + tr["time_compute_s"]
    n_train = meta["train"]["n"]
    rss = sorted(peaks.values(), reverse=True)[:2 if mode.endswith("2") else 1]
    return {"mode": mode, "processes": 2 if mode.endswith("2") else 1, "wall_s": round(wall, 1),
            "fit_s": meta["fit_seconds"], "steps": tr["steps"], "epochs": tr["epochs_run"],
            "step_ms": round(1000 * loop_s / tr["steps"], 1),
            "batching_ms_per_step": round(1000 * tr["time_batching_s"] / tr["steps"], 2),
            "examples_per_s": round(tr["epochs_run"] * n_train / loop_s),
            "peak_rss_mib_per_process": [round(r) for r in rss],
            "valid_roc_auc": round(metrics["valid"]["roc_auc"], 4),
            "test_roc_auc": round(metrics["test"]["roc_auc"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=6000)
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--shard-rows", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-epochs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, choices=(1, 2))
    ap.add_argument("--memory2", action="store_true", help="also two processes with the train split in memory")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_ddp_"))
    ws = tmp / "ws"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "purchase_intent.cli", "simulate", "--users", str(args.users),
                    "--days", str(args.days), "--out", str(tmp / "events.parquet")], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    _cli(ws, "ingest", str(tmp / "events.parquet"), "--format", "parquet")
    _cli(ws, "build", "--task", "user")
    built = json.loads((ws / "examples" / "build.json").read_text())
    prep_s = time.perf_counter() - t0
    modes = ["memory1", "stream1", "stream2"] + (["memory2"] if args.memory2 else [])
    load0 = os.getloadavg()[0]
    runs = []
    for r in range(args.repeat):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            runs.append({"round": r, **run_mode(mode, ws, args)})
            print(json.dumps(runs[-1]), file=sys.stderr)
    meta = json.loads((ws / "runs" / "transformer" / "run.json").read_text())
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
           "cpus": os.cpu_count(), "load_avg_1min": [round(load0, 1), round(os.getloadavg()[0], 1)],
           "users": args.users, "days": args.days, "examples": built.get("n_examples"),
           "train_examples": meta["train"]["n"], "shard_rows": args.shard_rows, "batch_size": args.batch_size,
           "max_epochs": args.max_epochs, "prepare_s": round(prep_s, 1), "runs": runs}
    print(json.dumps(out))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
