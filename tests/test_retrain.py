"""`purchase-intent retrain`: promotion and non-promotion, the audit log, the reload signal, the lock."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from purchase_intent import cli, pipeline, report, retrain, runs
from purchase_intent.config import DataConfig, LabelConfig
from purchase_intent.monitor import TRAIN_WINDOW_JSON
from purchase_intent.serve import pidfile
from purchase_intent.simulate import SimConfig, write_events
from purchase_intent.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
DAY_MS = 86_400_000


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A simulated shop of 56 days: the first 49 ingested with one logreg champion, the last week new."""
    root = tmp_path_factory.mktemp("retrain")
    write_events(SimConfig(n_users=2500, days=56, seed=5), root / "all.csv")
    df = pd.read_csv(root / "all.csv")
    split = df["ts"].min() + 49 * DAY_MS
    df[df["ts"] < split].to_csv(root / "old.csv", index=False)
    df[df["ts"] >= split].to_csv(root / "new-week.csv", index=False)
    ws = Workspace(root / "ws")
    pipeline.run(root / "old.csv", DataConfig(format="csv"), LabelConfig(lookback="14d", horizon="7d", step="7d"),
                 models=["logreg"], workspace=ws, n_boot=100, report=False, quiet=True)
    return root, ws, df


@pytest.fixture
def ws(base, tmp_path):
    """A fresh copy of the champion's workspace for each test (retrain changes it)."""
    root, ws, _ = base
    copy = Workspace(tmp_path / "ws")
    shutil.copytree(ws.root, copy.root)
    return copy


@pytest.fixture
def fake_server(ws, tmp_path):
    """A process recorded as a `serve` of run logreg that notes each SIGHUP it gets in a file."""
    flag = tmp_path / "hup"
    code = ("import pathlib, signal, sys, time; p = pathlib.Path(sys.argv[1]); "
            "signal.signal(signal.SIGHUP, lambda *a: p.write_text(p.read_text() + 'hup' if p.exists() else 'hup')); "
            "print('ready', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(flag), "serve"], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    record = ws.runs_dir / pidfile.SERVERS_DIR / f"{proc.pid}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"pid": proc.pid, "run": "logreg", "host": "127.0.0.1", "port": 1}))
    yield flag
    proc.kill()
    proc.wait()


def _wait_for(path: Path, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


def _tree(ws: Workspace) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(ws.root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(ws.root.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_a_challenger_not_worse_is_promoted_and_servers_reload(base, ws, fake_server, capsys):
    root = base[0]
    old = runs.load_run("logreg", ws)
    rc = cli.main(["--workspace", str(ws.root), "retrain", "--run", "logreg", "--data", str(root / "new-week.csv"),
                   "--format", "csv", "--n-boot", "200"])
    assert rc == 0
    printed = capsys.readouterr().out
    log = retrain.read_audit(ws)
    assert len(log) == 1
    d = log[0]
    assert d["decision"] == "promoted", d["reason"]
    lo, hi = d["paired"]["ci"]
    assert hi >= 0 and lo <= d["paired"]["diff"] <= hi
    assert d["ingested"]["files"] == [str(root / "new-week.csv")]
    # the comparison window is the new build's test split, one week later than the champion's own test window
    old_test = runs.read_metrics(old.dir)["test"]
    assert d["window"]["n"] > 0 and d["window"]["first_cutoff"] > d["champion"]["training_window"]["last_cutoff"]
    assert old_test["n"] > 0
    # runs/logreg is the challenger now; the old champion is kept as a loadable version
    now = runs.load_run("logreg", ws)
    assert now.version == d["challenger"]["version"] != old.version
    assert now.meta["run"] == "logreg" and (now.dir / runs.METRICS_JSON).exists()
    assert (now.dir / TRAIN_WINDOW_JSON).exists()
    kept = runs.load_run(d["champion"]["kept_as"], ws)
    assert kept.version == old.version and kept.meta["run"] == d["champion"]["kept_as"] == f"logreg.{old.version}"
    assert not (ws.runs_dir / "logreg.challenger").exists()
    assert kept.meta["kept_version"]["role"] == "former champion" and "kept_version" not in now.meta
    assert report.available_runs(ws) == ["logreg"]  # the default report leaves the kept version out
    # the running server was told to reload
    assert _wait_for(fake_server) and fake_server.read_text() == "hup"
    assert d["reloaded_servers"] and "PROMOTED" in printed and "signalled 1 running server" in printed


def test_a_worse_challenger_is_not_promoted(ws, fake_server, monkeypatch):
    """A challenger that learned from scrambled labels (its training labels permuted) loses beyond
    the interval, and the champion stays."""
    fit = pipeline.fit_model

    def scrambled(name, params, built, train_idx, valid_idx, ws_, train_cfg):
        ex = built.examples.copy()
        y = ex["label"].to_numpy().copy()
        y[train_idx] = np.random.default_rng(0).permutation(y[train_idx])
        ex["label"] = y
        return fit(name, params, runs.Built(ex, built.features, built.info), train_idx, valid_idx, ws_, train_cfg)

    monkeypatch.setattr(pipeline, "fit_model", scrambled)
    champion = runs.load_run("logreg", ws)
    run_json = (champion.dir / runs.RUN_JSON).read_bytes()
    d = retrain.retrain("logreg", ws, cfg=retrain.RetrainConfig(n_boot=200))
    assert d["decision"] == "kept", d
    assert d["paired"]["ci"][1] < 0 and d["challenger"]["roc_auc"] < d["champion"]["roc_auc"]
    assert "worse beyond the interval" in d["reason"]
    assert (ws.run_dir("logreg") / runs.RUN_JSON).read_bytes() == run_json  # the champion is untouched
    kept = runs.load_run(d["challenger"]["kept_as"], ws)
    assert kept.version == d["challenger"]["version"] and kept.meta["run"] == d["challenger"]["kept_as"]
    assert not (ws.runs_dir / "logreg.challenger").exists()
    assert [e["decision"] for e in retrain.read_audit(ws)] == ["kept"]
    time.sleep(0.3)
    assert not fake_server.exists()  # no promotion, no reload
    assert "reloaded_servers" not in d


def test_retrain_refuses_while_the_workspace_is_locked(ws, capsys):
    code = ("import sys, time; from purchase_intent.workspace import Workspace\n"
            "with Workspace(sys.argv[1]).lock('build'):\n    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(ws.root)], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == b"held"
        before = _tree(ws)
        rc = cli.main(["--workspace", str(ws.root), "retrain", "--run", "logreg"])
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1
        assert "another build is running" in err and "wait for it to finish" in err
        assert _tree(ws) == before  # nothing changed, no audit line
        assert not retrain.audit_path(ws).exists()
    finally:
        holder.kill()
        holder.wait()
    # converse: once the lock is free, the same command runs
    assert cli.main(["--workspace", str(ws.root), "retrain", "--run", "logreg", "--n-boot", "50",
                     "--no-reload"]) == 0
    assert len(retrain.read_audit(ws)) == 1


def test_bad_runs_are_refused_in_one_line(ws, capsys):
    before = _tree(ws)
    for args, words in ((["--run", "nope"], "no run"), (["--run", "../x"], "name of a run"),
                        (["--run", "logreg.challenger"], "name of a run")):
        assert cli.main(["--workspace", str(ws.root), "retrain", *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1
    assert _tree(ws) == before and not retrain.audit_path(ws).exists()


def test_a_failed_retrain_leaves_the_champion_and_says_so(ws, monkeypatch):
    """A challenger that fails to train: the champion stays, no challenger folder, a `failed` audit line."""
    def broken(*a, **k):
        raise RuntimeError("disk gone")

    champion = (ws.run_dir("logreg") / runs.RUN_JSON).read_bytes()
    monkeypatch.setattr(pipeline, "evaluate", broken)
    with pytest.raises(RuntimeError, match="disk gone"):
        retrain.retrain("logreg", ws, cfg=retrain.RetrainConfig(n_boot=0))
    assert (ws.run_dir("logreg") / runs.RUN_JSON).read_bytes() == champion
    assert not (ws.runs_dir / "logreg.challenger").exists()
    log = retrain.read_audit(ws)
    assert [e["decision"] for e in log] == ["failed"] and "disk gone" in log[0]["error"]


def _beside(ws: Workspace) -> list[str]:
    return sorted(p.name for p in ws.root.parent.iterdir() if p.name.endswith("-" + ws.root.name))


def test_a_retrain_that_fails_after_ingesting_puts_the_workspace_back(base, ws, monkeypatch):
    """New events ingested and the examples rebuilt, then the challenger fails: events, build and
    runs are as before; only the audit log has a new (`failed`) line."""
    def broken(*a, **k):
        raise RuntimeError("disk gone")

    before = _tree(ws)
    monkeypatch.setattr(pipeline, "evaluate", broken)
    with pytest.raises(RuntimeError, match="disk gone"):
        retrain.retrain("logreg", ws, data=[base[0] / "new-week.csv"], data_cfg=DataConfig(format="csv"),
                        cfg=retrain.RetrainConfig(n_boot=0))
    after = _tree(ws)
    assert after.pop(retrain.AUDIT_LOG) and after == before
    assert _beside(ws) == []  # no snapshot left
    assert [e["decision"] for e in retrain.read_audit(ws)] == ["failed"]


def test_a_retrain_killed_after_ingesting_is_put_back_by_the_next_command(base, ws):
    """kill -9 in the middle (after the new events and the rebuild): the next writing command's
    recovery swaps the snapshot back, so the workspace is exactly as before the retrain."""
    before = _tree(ws)
    code = ("import os, signal, sys\n"
            "from purchase_intent import pipeline, retrain\n"
            "from purchase_intent.config import DataConfig\n"
            "pipeline.evaluate = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
            "retrain.retrain('logreg', sys.argv[1], data=[sys.argv[2]], data_cfg=DataConfig(format='csv'),\n"
            "                cfg=retrain.RetrainConfig(n_boot=0))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ws.root), str(base[0] / "new-week.csv")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _tree(ws) != before and len(_beside(ws)) == 1  # the new events are in; the snapshot is beside
    with ws.lock("ingest"):  # any writing command: it finds the dead holder's record and recovers
        pass
    assert _tree(ws) == before and _beside(ws) == []


@pytest.mark.slow
def test_a_real_server_records_itself_and_reloads_the_promoted_run(ws, tmp_path):
    """`serve` writes runs/.servers/<pid>.json; `retrain` promotes and the live server answers with the new version."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = "retrain-test-key-0123"
    env = {**os.environ, "PURCHASE_INTENT_API_KEYS": key, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "purchase_intent.cli", "--workspace", str(ws.root), "serve",
                             "--run", "logreg", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=tmp_path)

    def version() -> str | None:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/model", headers={"Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return json.loads(r.read())["version"]
        except OSError:
            return None

    try:
        deadline = time.monotonic() + 60
        while version() is None:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        assert [r["pid"] for r in pidfile.servers(ws.runs_dir)] == [proc.pid]
        old = version()
        d = retrain.retrain("logreg", ws, cfg=retrain.RetrainConfig(n_boot=50))
        assert d["decision"] == "promoted" and d["reloaded_servers"] == [proc.pid]
        deadline = time.monotonic() + 30
        while version() == old:
            assert time.monotonic() < deadline, "the server never reloaded"
            time.sleep(0.2)
        assert version() == d["challenger"]["version"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not (ws.runs_dir / pidfile.SERVERS_DIR / f"{proc.pid}.json").exists()  # removed at shutdown


def test_retrain_logs_the_run_it_leaves_with_its_decision_to_mlflow(ws, tmp_path, capsys):
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    rc = cli.main(["--workspace", str(ws.root), "retrain", "--run", "logreg", "--n-boot", "100", "--no-reload",
                   "--mlflow", str(store), "--mlflow-experiment", "retraining"])
    assert rc == 0
    d = retrain.read_audit(ws)[-1]
    logged = d["challenger"].get("now") or d["challenger"]["kept_as"]
    assert f"logged run {logged} to MLflow" in capsys.readouterr().out
    client = mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("retraining").experiment_id])
    tags = found.data.tags
    assert tags["purchase_intent.command"] == "retrain" and tags["purchase_intent.run"] == logged
    assert tags["purchase_intent.retrain_decision"] == d["decision"]
    assert float(tags["purchase_intent.retrain_delta_roc_auc"]) == pytest.approx(d["paired"]["diff"])
    assert "test.roc_auc" in found.data.metrics
