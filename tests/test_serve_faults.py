"""Failures of the scoring API are handled with a reason a user can see, or raised; never swallowed.

A SIGHUP reload of a broken run keeps the old run serving and says so in /readyz and /metrics; an
ONNX graph that cannot be opened falls back to PyTorch and is counted in /metrics; a DuckDB
connection that fails to close at shutdown is logged and counted.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from conftest import tiny_workspace  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from purchase_intent import pipeline, runs  # noqa: E402
from purchase_intent.config import TrainConfig  # noqa: E402
from purchase_intent.serve import app as app_module  # noqa: E402
from purchase_intent.serve.app import create_app  # noqa: E402
from purchase_intent.serve.settings import ServeSettings  # noqa: E402
from purchase_intent.workspace import Workspace  # noqa: E402

KEY = "faults-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
REPO = Path(__file__).resolve().parents[1]
BODY = {"events": [{"ts": "2024-03-10T10:00:00Z", "event": "view", "item_id": "i1", "category": "c1"}]}


def _has_transformer() -> bool:
    try:
        import onnxruntime  # noqa: F401

        import purchase_intent.models.classifier  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-ws")
    ws = tiny_workspace(root, n_users=40, days=21)
    cfg = TrainConfig(min_positives=1, min_negatives=1)
    pipeline.train("logreg", train_cfg=cfg, workspace=ws, quiet=True)
    pipeline.train("lightgbm", train_cfg=cfg, workspace=ws, quiet=True)
    if _has_transformer():
        pipeline.train("transformer", params={"preset": "tiny", "max_epochs": 1}, train_cfg=cfg, workspace=ws,
                       quiet=True)
    return ws


def _copy_run(ws: Workspace, src: str, dst: str) -> Path:
    d = ws.run_dir(dst)
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(ws.run_dir(src), d)
    return d


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


# ---------------------------------------------------------------------------------------------
# a failed hot swap: the old run serves, /readyz and /metrics say what failed
def test_failed_reload_keeps_the_old_run_and_is_visible(ws):
    live = _copy_run(ws, "logreg", "live")
    version = runs.load_run("live", ws).version
    with TestClient(create_app(ServeSettings(workspace=str(ws.root), run="live", api_keys=(KEY,)))) as c:
        st = c.app.state.serve
        ready = c.get("/readyz").json()
        assert ready["reload"]["ok"] is True and ready["reload"]["last_failure"] is None
        gauge = "purchase_intent_last_reload_success_timestamp_seconds"
        first_ok = _metric(c.get("/metrics", headers=AUTH).text, gauge)
        assert first_ok is not None and abs(first_ok - time.time()) < 600
        # the run on disk breaks: its model files are gone
        shutil.rmtree(live / runs.MODEL_DIR)
        app_module._reload_quietly(st)  # what SIGHUP runs
        r = c.get("/readyz")
        assert r.status_code == 200, "the old run still serves: ready"
        rel = r.json()["reload"]
        assert rel["ok"] is False and rel["last_failure"]["run"] == "live" and rel["last_failure"]["error"]
        assert rel["last_failure"]["at"] >= rel["last_success_at"]
        s = c.post("/v1/score", json=BODY, headers=AUTH)
        assert s.status_code == 200 and s.json()["version"] == version
        text = c.get("/metrics", headers=AUTH).text
        assert "purchase_intent_reload_failures_total 1" in text
        assert 'purchase_intent_reloads_total{outcome="failed"} 1' in text
        assert _metric(text, gauge) == first_ok
        # the API's own reload answers the error too (not a 500) and counts it
        assert c.post("/v1/admin/reload", headers=AUTH).status_code in (404, 422, 500)
        assert "purchase_intent_reload_failures_total 2" in c.get("/metrics", headers=AUTH).text
        # converse: the run is fixed, the next reload succeeds and clears the failure
        shutil.copytree(ws.run_dir("logreg") / runs.MODEL_DIR, live / runs.MODEL_DIR)
        time.sleep(0.01)
        app_module._reload_quietly(st)
        rel = c.get("/readyz").json()["reload"]
        assert rel["ok"] is True and rel["last_failure"] is None
        text = c.get("/metrics", headers=AUTH).text
        assert _metric(text, gauge) > first_ok
        assert "purchase_intent_reload_failures_total 2" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, headers=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_sighup_reload_of_a_broken_run_over_http(ws, tmp_path):
    """The real server: SIGHUP with a broken run on disk; it keeps serving and reports the failure."""
    live = _copy_run(ws, "lightgbm", "live-http")
    port = _free_port()
    env = {**os.environ, "PURCHASE_INTENT_API_KEYS": KEY, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "purchase_intent.cli", "--workspace", str(ws.root), "serve", "--run", "live-http",
           "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"

    def ready() -> dict:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = _get(base + "/readyz")
                if status == 200:
                    return json.loads(body)
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)

    try:
        assert ready()["reload"]["ok"] is True
        (live / runs.RUN_JSON).write_text("{ not json")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while ready()["reload"]["ok"] is True:
            assert time.monotonic() < deadline, "the failed reload never showed in /readyz"
            time.sleep(0.2)
        rel = ready()["reload"]
        assert "is damaged" in rel["last_failure"]["error"] and proc.poll() is None
        status, text = _get(base + "/metrics", AUTH)
        assert status == 200 and b"purchase_intent_reload_failures_total 1" in text
    finally:
        proc.terminate()
        try:
            out = proc.communicate(timeout=20)[0].decode()
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0].decode()
    assert "reload failed, still serving" in out  # and the log says it


# ---------------------------------------------------------------------------------------------
# ONNX -> PyTorch fallbacks are counted
@pytest.mark.skipif(not _has_transformer(), reason="needs the transformer and onnxruntime")
def test_onnx_fallback_is_counted_in_metrics(ws, monkeypatch):
    from purchase_intent.models import onnx_inference as ox

    good = ws.run_dir("transformer") / runs.MODEL_DIR
    if not (good / ox.ONNX_FILE).exists():
        pytest.skip("this transformer run has no ONNX graph")
    bad = _copy_run(ws, "transformer", "transformer-badgraph") / runs.MODEL_DIR
    # a graph onnxruntime cannot open, recorded with its own hash (so it is not merely stale)
    (bad / ox.ONNX_FILE).write_bytes(b"\x08\x07garbage that is not an onnx graph")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["onnx"]["sha256"] = ox.sha256((bad / ox.ONNX_FILE).read_bytes())
    (bad / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv(ox.INFERENCE_ENV, "onnx")
    label = 'purchase_intent_onnx_fallbacks_total{reason="open_failed"}'

    def served(run: str) -> tuple[float, float]:
        """open_failed fallbacks before the app loads ``run`` and in /metrics after one request."""
        before = ox.fallback_counts().get("open_failed", 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "cannot open ...: running PyTorch"
            with TestClient(create_app(ServeSettings(workspace=str(ws.root), run=run, api_keys=(KEY,)))) as c:
                r = c.post("/v1/score", json=BODY, headers=AUTH)
                assert r.status_code == 200, r.text
                return before, _metric(c.get("/metrics", headers=AUTH).text, label) or 0.0

    before, after = served("transformer")  # converse: a good graph runs ONNX Runtime, nothing counted
    assert after == before
    before, after = served("transformer-badgraph")
    assert after == before + 1  # PyTorch answered, and /metrics shows why


# ---------------------------------------------------------------------------------------------
# shutdown: a connection that fails to close is logged and counted, the others still closed
def test_close_reports_a_connection_that_fails_to_close(ws, caplog):
    with TestClient(create_app(ServeSettings(workspace=str(ws.root), run="logreg", api_keys=(KEY,)))) as c:
        st = c.app.state.serve
        closed = []

        class Broken:
            def close(self):
                raise RuntimeError("disk gone")

        class Fine:
            def close(self):
                closed.append(True)

        st._cons[:] = [Broken(), Fine()]
        with caplog.at_level(logging.WARNING, logger="purchase_intent.serve"):
            st.close()
        assert closed == [True] and st._cons == []
        assert any("disk gone" in r.getMessage() for r in caplog.records)
        assert 'purchase_intent_errors_total{kind="close"} 1' in st.metrics.render()
        # converse: nothing fails, nothing logged or counted
        caplog.clear()
        st._cons[:] = [Fine()]
        st.close()
        assert not caplog.records and closed == [True, True]
        assert 'kind="close"} 2' not in st.metrics.render()
