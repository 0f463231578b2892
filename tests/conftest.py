"""Shared fixtures: a tiny canonical event log (about 200 events, 12 users, 21 days)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# ../shared/data next to the repository; PURCHASE_INTENT_SHARED_DATA points elsewhere (e.g. a clone in /tmp)
SHARED_DATA = Path(os.environ.get("PURCHASE_INTENT_SHARED_DATA")
                   or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def make_tiny_events(seed: int = 0, n_users: int = 12, days: int = 21) -> pd.DataFrame:
    """Canonical events: user_id, ts (UTC, tz-naive), event, item_id, category, price, session_id."""
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2024-03-01 00:00:00")
    rows = []
    for u in range(n_users):
        n_sessions = rng.integers(2, 6)
        for s in range(n_sessions):
            t = start + pd.Timedelta(seconds=int(rng.integers(0, days * 86400 - 7200)))
            for k in range(int(rng.integers(1, 8))):
                t = t + pd.Timedelta(seconds=int(rng.integers(5, 600)))
                ev = rng.choice(["view", "view", "view", "cart", "wishlist", "purchase"],
                                p=[0.3, 0.2, 0.2, 0.15, 0.05, 0.1])
                item = int(rng.integers(0, 40))
                rows.append(
                    dict(
                        user_id=f"u{u}",
                        ts=t,
                        event=str(ev),
                        item_id=f"i{item}",
                        category=f"c{item % 7}",
                        price=float(np.round(5 + item * 1.5, 2)),
                        session_id=f"u{u}-s{s}",
                    )
                )
    df = pd.DataFrame(rows).sort_values(["ts", "user_id"], kind="stable").reset_index(drop=True)
    df["ts"] = df["ts"].astype("datetime64[us]")
    return df


def tiny_workspace(root: Path, n_users: int, days: int):
    """The tiny log of ``n_users`` users over ``days`` days written to ``root/events.csv``, ingested
    into the workspace ``root/ws`` and built (user task: 7d lookback, 3d horizon, 3d step)."""
    from purchase_intent import pipeline
    from purchase_intent.config import DataConfig, LabelConfig
    from purchase_intent.workspace import Workspace

    make_tiny_events(n_users=n_users, days=days).to_csv(root / "events.csv", index=False)
    ws = Workspace(root / "ws")
    pipeline.ingest(root / "events.csv", DataConfig(format="csv"), ws, progress=False)
    pipeline.build(LabelConfig(lookback="7d", horizon="3d", step="3d"), workspace=ws, quiet=True)
    return ws


@pytest.fixture
def tiny_events() -> pd.DataFrame:
    return make_tiny_events()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def run_ranks(script: Path, arg: Path, world: int, timeout: float = 240) -> None:
    """Run ``python script arg`` as ``world`` ranks of one gloo group on this machine (the environment
    torchrun gives: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), one thread each; every rank
    must exit 0 (its output is the assertion message otherwise)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(repo)}
        procs.append(subprocess.Popen([sys.executable, str(script), str(arg)], env=env, cwd=repo,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        log, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, log


def csv_workspace(root: Path, log: Path, label_cfg=None):
    """The workspace ``root`` with the CSV event log ``log`` ingested and built (``label_cfg``,
    default a 14d lookback, 7d horizon and 7d step)."""
    from purchase_intent import pipeline
    from purchase_intent.config import DataConfig, LabelConfig
    from purchase_intent.workspace import Workspace

    ws = Workspace(root)
    pipeline.ingest(log, DataConfig(format="csv"), ws, progress=False)
    pipeline.build(label_cfg or LabelConfig(lookback="14d", horizon="7d", step="7d"), workspace=ws, quiet=True)
    return ws


def copy_workspace(ws, dst: Path):
    """A copy of workspace ``ws`` at ``dst`` without its runs (no encoder, no model)."""
    import shutil

    from purchase_intent.workspace import Workspace

    shutil.copytree(ws.root, dst, ignore=shutil.ignore_patterns("runs"))
    return Workspace(dst)


def add_events_at(w, log: Path, at, name: str) -> None:
    """Ingest into ``w``, as the file ``name``.csv, the first 400 rows of the CSV event log ``log``, all at ``at``."""
    from purchase_intent import pipeline
    from purchase_intent.config import DataConfig

    ev = pd.read_csv(log, nrows=400)
    ev["ts"] = pd.Timestamp(at).isoformat()
    path = w.root / f"{name}.csv"
    ev.to_csv(path, index=False)
    pipeline.ingest(path, DataConfig(format="csv"), w, progress=False)
