"""Pretraining and embedding speed, A/B: a base commit's ``models/pretraining.py`` against the current one.

    .venv/bin/python benchmarks/bench_pretrain_speed.py --rounds 3 --threads 2,1 --with-bucket

The data of ``bench_pretrain.py``'s speed part: a simulated shop (``--users`` x ``--days``, seed 0),
every user's events up to the last one at window 200, the ``--n`` longest histories (kept in user
order, as the product passes them); the tiny encoder, masked objective, one epoch at batch 256, CPU.

The base variant is ``purchase_intent/models/pretraining.py`` as of ``--base`` (read with ``git
show`` and imported beside the current package: the same encoder, collate and optimizer code); the
new variant is the working tree's, called as the product calls it (``pretrain_encoder`` and
``embed`` with their defaults); ``--with-bucket`` adds the working tree's with length-bucketed
batches (``bucket=True``: not the default, its gradients are noisier, see ``pretrain_encoder``).
The variants alternate within each round, for every thread count of ``--threads`` (torch intra-op
threads; empty = torch's default), and each starts from the same initial weights. The table gives
the median over rounds (min-max in brackets); ratios are of the medians. The base and new
``embed`` of one trained encoder agree to the max abs difference printed.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from purchase_intent import pipeline
from purchase_intent.config import DataConfig
from purchase_intent.models import pretraining as new
from purchase_intent.models.transformer import BehaviourTransformer, preset
from purchase_intent.sequences import SequenceConfig, build_sequences
from purchase_intent.simulate import SimConfig, write_events
from purchase_intent.train import TrainLoopConfig
from purchase_intent.workspace import Workspace

FIELDS = ["event", "category", "price", "dt_cutoff", "dt_prev", "hour", "weekday", "item_state"]
BASE = "4befeb6"  # the last commit before length-bucketed pretraining


def load_base(rev: str):
    """``purchase_intent/models/pretraining.py`` of commit ``rev`` as a module of the current package."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:purchase_intent/models/pretraining.py"], cwd=root,
                         check=True, capture_output=True, text=True).stdout
    path = Path("/tmp") / f"pretraining_{rev}.py"
    path.write_text(src)
    name = "purchase_intent.models._pretraining_base"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def speed_data(users: int, days: int, n: int, workdir: Path) -> tuple[dict, dict]:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    write_events(SimConfig(n_users=users, days=days, seed=0), workdir / "shop.csv.gz")
    ws = Workspace(workdir / "ws")
    pipeline.ingest(workdir / "shop.csv.gz", DataConfig(format="csv"), ws, progress=False)
    con = ws.connect()
    con.execute("CREATE TABLE sp AS SELECT (row_number() OVER (ORDER BY user_id) - 1)::BIGINT AS example_id, "
                "user_id, (SELECT max(ts) FROM events) AS cutoff FROM (SELECT DISTINCT user_id FROM events)")
    a = build_sequences(con, "sp", SequenceConfig(max_seq_len=200))
    sizes = {f: int(a[f].max()) + 1 for f in FIELDS}
    rows = np.sort(np.argsort(-a["mask"].sum(axis=1), kind="stable")[:n])  # the longest, in user order
    data = {f: a[f][rows] for f in FIELDS}
    data["mask"] = a["mask"][rows]
    return data, sizes


def run_variant(mod, data: dict, sizes: dict, **kw) -> dict:
    torch.manual_seed(0)
    net = BehaviourTransformer(preset("tiny", field_sizes=sizes, max_seq_len=200, use_tabular=False))
    res = mod.pretrain_encoder(mod.make_objective("masked", net), data, TrainLoopConfig(max_epochs=1, batch_size=256),
                               **kw)
    out = {"seq_per_s": res.sequences_per_s, "loss": res.history[-1], "net": net}
    for window in (200, 50):
        d = {k: v[:, -window:] for k, v in data.items()}
        t0 = time.perf_counter()
        mod.embed(net, d)
        out[f"embed_{window}"] = len(data["mask"]) / (time.perf_counter() - t0)
    return out


def fmt(values: list, digits: int = 0) -> str:
    return f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=6000)
    ap.add_argument("--days", type=int, default=63)
    ap.add_argument("--n", type=int, default=2048, help="longest histories used")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="", help="comma-separated torch thread counts (empty: torch's default)")
    ap.add_argument("--base", default=BASE, help="git revision of the base pretraining.py")
    ap.add_argument("--with-bucket", action="store_true", help="also new with length-bucketed batches (bucket=True)")
    ap.add_argument("--workdir", default="/tmp/bench_pretrain_speed")
    args = ap.parse_args()
    load0 = open("/proc/loadavg").read().split()[:3]
    t_start = time.perf_counter()
    base = load_base(args.base)
    data, sizes = speed_data(args.users, args.days, args.n, Path(args.workdir))
    lengths = data["mask"].sum(axis=1)
    thread_counts = [int(t) for t in args.threads.split(",") if t.strip()] or [torch.get_num_threads()]
    variants = [("base", base, {}), ("new", new, {})]
    if args.with_bucket:
        variants.append(("new, bucket=True", new, {"bucket": True}))
    got: dict = {}
    diff = 0.0
    for r in range(args.rounds):
        for th in thread_counts:
            torch.set_num_threads(th)
            for name, mod, kw in variants:
                out = run_variant(mod, data, sizes, **kw)
                for k, v in out.items():
                    if k != "net":
                        got.setdefault((th, name, k), []).append(v)
                print(f"round {r} threads {th} {name}: {out['seq_per_s']:.0f} seq/s, embed "
                      f"{out['embed_200']:.0f} / {out['embed_50']:.0f} users/s (load "
                      f"{open('/proc/loadavg').read().split()[0]})", flush=True)
                if r == 0 and name == "new":
                    diff = max(diff, float(np.abs(base.embed(out["net"], data) - new.embed(out["net"], data)).max()))
    load1 = open("/proc/loadavg").read().split()[:3]
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    cmd = (f".venv/bin/python benchmarks/bench_pretrain_speed.py --users {args.users} --days {args.days} "
           f"--n {args.n} --rounds {args.rounds} --threads {','.join(map(str, thread_counts))} --base {args.base}"
           + (" --with-bucket" if args.with_bucket else ""))
    lines = [f"## Pretraining speed A/B ({today})", "", f"Command: `{cmd}`", "",
             f"Machine: {platform.processor() or platform.machine()}, nproc {os.cpu_count()} (shared VM), "
             f"torch {torch.__version__}; load average at start {' '.join(load0)}, at end {' '.join(load1)}; "
             f"total {time.perf_counter() - t_start:.0f}s.", "",
             f"Tiny encoder, masked objective, the {args.n} longest histories of {args.users:,} simulated users "
             f"x {args.days} days at window 200 (mean {lengths.mean():.0f} events), one epoch at batch 256, CPU; "
             f"base = `models/pretraining.py` of {args.base}, new = the working tree's. Median over "
             f"{args.rounds} alternating rounds (min-max). Base and new embeddings of one encoder: max abs "
             f"difference {diff:.1e}.", "",
             "| threads | variant | pretraining sequences/s | final loss | embedding users/s, window 200 "
             "| embedding users/s, window 50 |", "|---|---|---|---|---|---|"]
    for th in thread_counts:
        for name, _, _ in variants:
            g = lambda k: got[(th, name, k)]  # noqa: E731
            lines.append(f"| {th} | {name} | {fmt(g('seq_per_s'))} | {fmt(g('loss'), 3)} | {fmt(g('embed_200'))} "
                         f"| {fmt(g('embed_50'))} |")
        ratio = [statistics.median(got[(th, 'new', k)]) / statistics.median(got[(th, 'base', k)])
                 for k in ("seq_per_s", "embed_200", "embed_50")]
        lines.append(f"| {th} | new / base | **{ratio[0]:.2f}x** | | **{ratio[1]:.2f}x** | **{ratio[2]:.2f}x** |")
        if args.with_bucket:
            r = statistics.median(got[(th, "new, bucket=True", "seq_per_s")]) / statistics.median(
                got[(th, "base", "seq_per_s")])
            lines.append(f"| {th} | new, bucket=True / base | {r:.2f}x | | | |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
