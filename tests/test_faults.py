"""Faults: kill -9 at seeded random points of ingest, build, train and score; a full disk; a
read-only workspace; a corrupted run; a truncated events part. After a kill the workspace holds
what it held before or the finished step, and rerunning the step gives the uninterrupted result;
every other fault is one clear `error:` line from the CLI, and nothing already stored is lost."""
from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from purchase_intent import cli
from purchase_intent.simulate import SimConfig, write_events
from purchase_intent.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PURCHASE_INTENT_PSEUDONYM_KEY": "fault-tests-" + "k" * 32, "PYTHONHASHSEED": "0"}
STEPS = ["ingest", "build", "train", "score"]
# keys of JSON files that hold wall-clock times, durations or a fresh id, not results
VOLATILE = {"build_id", "version", "created", "ingested_at", "seconds", "fit_seconds", "users_per_second"}


def _argv(step: str, ws: Path, shop: Path) -> list[str]:
    args = {"ingest": ["ingest", str(shop)],
            "build": ["build", "--lookback", "7d", "--horizon", "3d", "--step", "3d"],
            "train": ["train", "--model", "logreg", "--min-positives", "1", "--min-negatives", "1"],
            "score": ["score", "--run", "logreg", "--out", str(ws / "scores.parquet"), "--quiet"]}[step]
    return [sys.executable, "-m", "purchase_intent.cli", "--workspace", str(ws), *args]


def _cli(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300, **kw)


def _drop_volatile(obj):
    if isinstance(obj, dict):
        return {k: _drop_volatile(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_drop_volatile(v) for v in obj]
    return obj


class _Frame:
    """A stored table that compares equal to another up to float rounding."""

    def __init__(self, df: pd.DataFrame):
        self.df = df

    def __eq__(self, other) -> bool:
        a, b = self.df, getattr(other, "df", None)
        if b is None or list(a.columns) != list(b.columns) or a.shape != b.shape:
            return False
        floats = list(a.select_dtypes("float").columns)
        rest = [c for c in a.columns if c not in floats]
        return (a[rest].equals(b[rest]) and
                bool(np.allclose(a[floats].to_numpy(), b[floats].to_numpy(), rtol=1e-9, atol=1e-12, equal_nan=True)))

    def __repr__(self) -> str:
        return f"<table {self.df.shape}>"


def digest(ws: Path) -> dict[str, object]:
    """sha256 of every stored file (JSON without its wall-clock fields); temp entries are litter, not state."""
    out = {}
    for p in sorted(ws.rglob("*")):
        rel = p.relative_to(ws)
        if not p.is_file() or p.name == ".lock" or any(part.startswith((".tmp-", ".score-")) for part in rel.parts):
            continue
        data = p.read_bytes()
        if p.suffix == ".parquet" and rel.parts[0] == "examples":
            # features are sums computed in parallel: equal up to float rounding (~1e-13), not bit for bit
            out[str(rel)] = _Frame(pd.read_parquet(p))
            continue
        if p.suffix == ".json":
            try:
                data = json.dumps(_drop_volatile(json.loads(data)), sort_keys=True).encode()
            except ValueError:
                pass  # a damaged file: its bytes
        out[str(rel)] = hashlib.sha256(data).hexdigest()
    return out


def _diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def litter(ws: Path) -> list[str]:
    return [str(p.relative_to(ws)) for p in ws.rglob(".tmp-*")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted job (run in this process, to save the imports): the workspace digest after
    each step, a copy of the workspace before each step, and how long each step and the imports take."""
    root = tmp_path_factory.mktemp("faults")
    shop = root / "shop.csv"
    write_events(SimConfig(n_users=300, days=30, seed=0), shop)
    ws = root / "ws"
    ws.mkdir()
    states, digests, seconds = {}, {}, {}
    mp = pytest.MonkeyPatch()
    mp.setenv("PURCHASE_INTENT_PSEUDONYM_KEY", ENV["PURCHASE_INTENT_PSEUDONYM_KEY"])
    try:
        for step in STEPS:
            states[step] = root / f"before-{step}"
            shutil.copytree(ws, states[step])
            t0 = time.perf_counter()
            assert cli.main(_argv(step, ws, shop)[3:]) == 0
            seconds[step] = time.perf_counter() - t0
            digests[step] = digest(ws)
    finally:
        mp.undo()
    shutil.rmtree(ws)
    t0 = time.perf_counter()
    assert _cli([sys.executable, "-c", "import purchase_intent.cli"]).returncode == 0
    return dict(root=root, shop=shop, ws=ws, states=states, digests=digests, seconds=seconds,
                imports=time.perf_counter() - t0)


def _kill_and_rerun(reference, step: str, n_kills: int, seed: int) -> list[str]:
    """Kill the step ``n_kills`` times at seeded random points, then rerun it; returns what each kill left."""
    ref, ws = reference, reference["ws"]
    after = ref["digests"][step]
    rng = random.Random(f"{seed}-{step}")
    outcomes = []
    scale = 1.0  # halved after each kill that came too late: the reference's timings drift with the machine's load
    for k in range(n_kills):
        if k == 0 or outcomes[-1] == "after":  # from the state before the step (what the last kill left otherwise)
            if ws.exists():
                shutil.rmtree(ws)
            shutil.copytree(ref["states"][step], ws)
            before = digest(ws)
        proc = subprocess.Popen(_argv(step, ws, ref["shop"]), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # the child first imports (~`imports` s), then works (~`seconds`): kill mostly while it works
        time.sleep(scale * (rng.uniform(0.5, 1.0) * ref["imports"] + rng.uniform(0.0, 1.2) * ref["seconds"][step]))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # what the next command sees: it takes the lock, and a dead holder's record makes it first remove what
        # the killed one left half-written (e.g. an ingest part written just before its manifest)
        with Workspace(ws).lock("check"):
            pass
        now = digest(ws)
        assert now in (before, after), (f"kill -9 of {step} left neither before nor after: "
                                        f"{_diff(now, before)} differ from before, {_diff(now, after)} from after")
        outcomes.append("before" if now == before else "after")
        if proc.returncode == 0:  # the step had finished: kill sooner next time
            scale *= 0.5
    run = _cli(_argv(step, ws, ref["shop"]))
    assert run.returncode == 0, run.stderr
    assert digest(ws) == after  # the rerun gives the uninterrupted result
    assert litter(ws) == []  # and removes what the killed runs left half-written
    return outcomes


@pytest.mark.parametrize("step", ["ingest", "train"])  # all four steps, many kills: the slow test below
def test_kill_9_then_rerun_gives_the_uninterrupted_result(reference, step):
    _kill_and_rerun(reference, step, n_kills=1, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
def test_kill_9_many_times(reference, step):
    outcomes = _kill_and_rerun(reference, step, n_kills=10, seed=1)
    assert "before" in outcomes


# --- one clear line for every other fault ----------------------------------------------------------------


def _one_error_line(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 1, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    lines = [x for x in run.stderr.strip().splitlines() if x.strip()]
    assert lines and lines[-1].startswith("error: "), run.stderr
    return lines[-1]


@pytest.fixture
def trained(reference, tmp_path):
    """A workspace after ingest, build and train (a copy of the reference before score)."""
    ws = tmp_path / "ws"
    shutil.copytree(reference["states"]["score"], ws)
    return ws


def _limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    return apply


@pytest.mark.parametrize("step", ["train", pytest.param("ingest", marks=pytest.mark.slow)])
def test_disk_full_is_one_error_line_and_loses_nothing(reference, trained, step):
    ws = trained
    if step == "ingest":  # a second source file whose part does not fit
        src = ws.parent / "more.csv"
        write_events(SimConfig(n_users=300, days=30, seed=1), src)
        argv = _argv("ingest", ws, src)
    else:
        argv = _argv("train", ws, reference["shop"])[:-6] + ["--model", "logreg", "--run", "second",
                                                              "--min-positives", "1", "--min-negatives", "1"]
    before = digest(ws)
    run = _cli(argv, preexec_fn=_limit_file_size(4096))
    line = _one_error_line(run)
    assert "File too large" in line or "space" in line or "write" in line, line
    assert digest(ws) == before


def _read_only_mount_works(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    run = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro {probe} {probe} && touch {probe}/x"],
                         capture_output=True, text=True)
    return "Read-only file system" in run.stderr


@pytest.mark.parametrize("step", ["ingest", pytest.param("build", marks=pytest.mark.slow),
                                  pytest.param("train", marks=pytest.mark.slow)])
def test_read_only_workspace_is_one_error_line(reference, trained, tmp_path, step):
    if shutil.which("unshare") is None or not _read_only_mount_works(tmp_path):
        pytest.skip("needs `unshare -m` and a bind mount (root in a mount namespace)")
    ws = trained
    before = digest(ws)
    src = tmp_path / "more.csv"
    write_events(SimConfig(n_users=50, days=10, seed=2), src)
    argv = _argv(step, ws, src)
    if step == "train":
        argv += ["--run", "second"]
    # the workspace, mounted read-only in a private mount namespace for this one command
    run = _cli(["unshare", "-m", "sh", "-c", f'mount --bind -o ro "{ws}" "{ws}" && exec "$@"', "sh", *argv])
    line = _one_error_line(run)
    assert "Read-only file system" in line, line
    assert digest(ws) == before


@pytest.mark.parametrize("damage", ["garbage_run_json", pytest.param("truncated_model", marks=pytest.mark.slow)])
def test_corrupted_run_is_one_error_line(reference, trained, damage):
    ws = trained
    run_dir = ws / "runs" / "logreg"
    if damage == "truncated_model":
        model = next(p for p in (run_dir / "model").iterdir() if p.is_file())
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    else:
        (run_dir / "run.json").write_text("{not json")
    before = digest(ws)
    _one_error_line(_cli(_argv("score", ws, reference["shop"])))
    assert digest(ws) == before


def test_truncated_events_part_is_one_error_line(reference, trained):
    ws = trained
    part = next((ws / "events").glob("part-*.parquet"))
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    before = digest(ws)
    line = _one_error_line(_cli(_argv("build", ws, reference["shop"])))
    assert part.name in line or "events" in line, line
    assert digest(ws) == before
