"""Time `rotate-key` on a used workspace of the simulated shop, beside `forget` of one user (the same commit).

    python benchmarks/bench_rotate_key.py --users 5000 --days 60 --repeat 3

Builds one workspace (simulate -> ingest -> build -> train logreg -> score, with the key in the
workspace key file), then on fresh copies of it alternates `forget --user` of one user and
`rotate-key` (forget, rotate, forget, rotate, ...) so that a change in the machine's load hits both
alike. Checks after each rotation that the events hold no old pseudonym. Prints one JSON line: the
workspace's events and users, the load averages before and after, and per command the median, min
and max wall seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from purchase_intent import pipeline
from purchase_intent.cli import main as cli
from purchase_intent.config import TrainConfig
from purchase_intent.privacy import KEY_ENV
from purchase_intent.simulate import SimConfig, write_events


def _events(ws: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p, columns=["user_id"]) for p in sorted((ws / "events").glob("part-*.parquet"))])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", help="work folder (default: a temporary one, removed afterwards)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.pop(KEY_ENV, None)
    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="bench-rotate-"))
    try:
        src = root / "shop.csv.gz"
        write_events(SimConfig(n_users=a.users, days=a.days, seed=0), src)
        ws = root / "ws"
        assert cli(["--workspace", str(ws), "ingest", str(src)]) == 0
        assert cli(["--workspace", str(ws), "build"]) == 0
        pipeline.train("logreg", workspace=ws, quiet=True, train_cfg=TrainConfig(min_positives=1, min_negatives=1))
        assert cli(["--workspace", str(ws), "score", "--run", "logreg", "--quiet"]) == 0
        events = _events(ws)
        raw_user = str(pd.read_csv(src, usecols=["user_id"], nrows=1)["user_id"].iloc[0])
        key = root / "new.key"
        load_before = os.getloadavg()
        times: dict[str, list[float]] = {"forget": [], "rotate-key": []}
        for i in range(a.repeat):
            for name in ("forget", "rotate-key"):
                trial = root / f"trial-{i}-{name}"
                shutil.copytree(ws, trial)
                key.write_text(os.urandom(32).hex())
                args = (["forget", "--user", raw_user] if name == "forget"
                        else ["rotate-key", "--new-key-file", str(key)])
                t0 = time.perf_counter()
                assert cli(["--workspace", str(trial), *args]) == 0
                times[name].append(time.perf_counter() - t0)
                if name == "rotate-key":
                    assert not set(_events(trial)["user_id"]) & set(events["user_id"])
                shutil.rmtree(trial)
        result = {"users": int(events["user_id"].nunique()), "events": int(len(events)),
                  "load_before": [round(x, 2) for x in load_before],
                  "load_after": [round(x, 2) for x in os.getloadavg()],
                  **{name: {"median_s": round(statistics.median(t), 2), "min_s": round(min(t), 2),
                            "max_s": round(max(t), 2)} for name, t in times.items()}}
        print(json.dumps(result))
        return result
    finally:
        if not a.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
