"""The scoring API: parity with batch scores, auth, bad input, limits, metrics, hot swap, end to end."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("fastapi")
from conftest import make_tiny_events  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from purchase_intent import pipeline, runs  # noqa: E402
from purchase_intent.config import DataConfig, LabelConfig, TrainConfig  # noqa: E402
from purchase_intent.ensemble import evaluate_ensemble  # noqa: E402
from purchase_intent.score import ScoreConfig, score  # noqa: E402
from purchase_intent.serve.app import create_app  # noqa: E402
from purchase_intent.serve.settings import ServeSettings, read_api_keys, resolve_run_dir  # noqa: E402
from purchase_intent.workspace import Workspace  # noqa: E402

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
REPO = Path(__file__).resolve().parents[1]


def _model_types() -> list[str]:
    names = ["logreg", "lightgbm"]
    try:
        import purchase_intent.models.classifier  # noqa: F401

        names.append("transformer")
    except ImportError:
        pass
    return names


MODEL_TYPES = _model_types()
# a tabular and a sequence member where the Transformer is installed: different inputs, one score
ENSEMBLE_MEMBERS = ["transformer", "lightgbm"] if "transformer" in MODEL_TYPES else ["logreg", "lightgbm"]
TINY_TRANSFORMER = {"preset": "tiny", "max_epochs": 1}


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """Tiny log ingested and built (7d lookback, 3d horizon), one run per model type, batch scores."""
    root = tmp_path_factory.mktemp("serve-ws")
    df = make_tiny_events(n_users=60, days=28)
    df.to_csv(root / "events.csv", index=False)
    ws = Workspace(root / "ws")
    pipeline.ingest(root / "events.csv", DataConfig(format="csv"), ws, progress=False)
    pipeline.build(LabelConfig(lookback="7d", horizon="3d", step="3d"), workspace=ws, quiet=True)
    cfg = TrainConfig(min_positives=1, min_negatives=1)
    scores = {}
    for m in MODEL_TYPES:
        params = TINY_TRANSFORMER if m == "transformer" else None
        pipeline.train(m, params=params, train_cfg=cfg, workspace=ws, quiet=True)
        score(m, root / f"{m}.parquet", ScoreConfig(reasons=2), workspace=ws, progress=False)
        scores[m] = pd.read_parquet(root / f"{m}.parquet")
    if "transformer" in MODEL_TYPES:  # a seed ensemble: two networks, one mean logit
        pipeline.train("transformer", run="transformer-seeds", params={**TINY_TRANSFORMER, "n_seeds": 2},
                       train_cfg=cfg, workspace=ws, quiet=True)
        score("transformer-seeds", root / "transformer-seeds.parquet", ScoreConfig(reasons=2), workspace=ws,
              progress=False)
        scores["transformer-seeds"] = pd.read_parquet(root / "transformer-seeds.parquet")
    # the ensemble, a deployable model: its members' held-out predictions, then scored like any run
    for m in ENSEMBLE_MEMBERS:
        pipeline.evaluate(m, ws, n_boot=20, quiet=True)
    evaluate_ensemble(ws, ENSEMBLE_MEMBERS, n_boot=20)
    score("ensemble", root / "ensemble.parquet", ScoreConfig(reasons=2), workspace=ws, progress=False)
    scores["ensemble"] = pd.read_parquet(root / "ensemble.parquet")
    pipeline.train("lightgbm", run="lightgbm-b", params={"n_estimators": 7}, train_cfg=cfg, workspace=ws, quiet=True)
    return ws, df, scores


def _client(ws: Workspace, run: str = "lightgbm", **kw) -> TestClient:
    return TestClient(create_app(ServeSettings(workspace=str(ws.root), run=run, api_keys=(KEY,), **kw)))


@pytest.fixture(scope="module")
def client(shop):
    """One running app (LightGBM) shared by the tests that do not count or swap anything."""
    with _client(shop[0]) as c:
        yield c


def _events(df: pd.DataFrame, raw_user: str) -> list[dict]:
    ev = df[df["user_id"] == raw_user]
    return [{"ts": t.isoformat() + "Z", "event": e, "item_id": i, "category": c, "price": p, "session_id": s}
            for t, e, i, c, p, s in zip(ev["ts"], ev["event"], ev["item_id"], ev["category"], ev["price"],
                                        ev["session_id"])]


def _raw_users(ws: Workspace, df: pd.DataFrame, scored: pd.DataFrame, k: int) -> list[tuple[str, str]]:
    from purchase_intent.privacy import load_key, pseudonymise

    raw = sorted(df["user_id"].unique())
    pid = dict(zip(raw, pseudonymise(raw, load_key(ws.root))))
    return [(r, pid[r]) for r in raw if pid[r] in set(scored["user_id"])][:k]


RUNS = MODEL_TYPES + (["transformer-seeds"] if "transformer" in MODEL_TYPES else []) + ["ensemble"]


@pytest.mark.parametrize("run", RUNS)
def test_api_probability_equals_the_batch_score(shop, run):
    ws, df, scores = shop
    model = run.removesuffix("-seeds")
    batch = scores[run].set_index("user_id")
    at = batch["cutoff"].iloc[0].isoformat() + "Z"
    users = _raw_users(ws, df, scores[run], 4)
    with _client(ws, run=run) as c:
        items = []
        for raw, pid in users:
            want = batch.loc[pid, "probability"]
            r = c.post("/v1/score", json={"user_id": raw, "at": at, "events": _events(df, raw)}, headers=AUTH)
            assert r.status_code == 200, r.text
            body = r.json()
            assert abs(body["probability"] - want) < 1e-6
            assert body["model"] == model and body["version"] == batch["version"].iloc[0] and body["at"] == at
            assert body["user_id"] == pid and body["active"] is True
            # without `at`: the cutoff is the user's last event + 1us, the same as the end of the data
            g = c.get(f"/v1/users/{raw}/score", headers=AUTH, params={"at": at})
            assert g.status_code == 200 and abs(g.json()["probability"] - want) < 1e-6
            # the stored pseudonym too, as the README shows it (and as `explain --user` takes it)
            gp = c.get(f"/v1/users/{pid}/score", headers=AUTH, params={"at": at})
            assert gp.status_code == 200 and gp.json()["probability"] == g.json()["probability"]
            items.append({"user_id": raw, "at": at, "events": _events(df, raw)})
        r = c.post("/v1/score/batch", json={"users": items}, headers=AUTH)
        assert r.status_code == 200, r.text
        got = [x["probability"] for x in r.json()["results"]]
        np.testing.assert_allclose(got, [batch.loc[p, "probability"] for _, p in users], atol=1e-6, rtol=0)
        assert [x["user_id"] for x in r.json()["results"]] == [u for u, _ in users]


@pytest.mark.parametrize("run", RUNS)
def test_explain_true_returns_the_reasons_of_batch_scoring(shop, run):
    """?explain=true answers the same reasons as `score --reasons`, for the same user and cutoff."""
    ws, df, scores = shop
    batch = scores[run].set_index("user_id")
    at = batch["cutoff"].iloc[0].isoformat() + "Z"
    (raw, pid), = _raw_users(ws, df, scores[run], 1)
    with _client(ws, run=run) as c:
        r = c.post("/v1/score", params={"explain": "true", "top": 2},
                   json={"user_id": raw, "at": at, "events": _events(df, raw)}, headers=AUTH)
        assert r.status_code == 200, r.text
        reasons = r.json()["reasons"]
        assert 1 <= len(reasons) <= 2 and all({"contribution", "text"} <= set(x) for x in reasons)
        assert reasons[0]["text"] == batch.loc[pid, "reason_1"]
        assert abs(reasons[0]["contribution"] - batch.loc[pid, "reason_1_contribution"]) < 1e-4
        assert c.post("/v1/score", json={"user_id": raw, "at": at, "events": _events(df, raw)},
                      headers=AUTH).json()["reasons"] is None  # only when asked
        assert c.post("/v1/score", params={"explain": "true", "top": 0}, headers=AUTH,
                      json={"user_id": raw, "at": at, "events": _events(df, raw)}).status_code == 422
        g = c.get(f"/v1/users/{raw}/score", headers=AUTH, params={"at": at, "explain": "true", "top": 2})
        assert g.status_code == 200 and g.json()["reasons"][0]["text"] == batch.loc[pid, "reason_1"]


def test_events_at_or_after_at_are_ignored(shop, client):
    ws, df, scores = shop
    raw, _ = _raw_users(ws, df, scores["lightgbm"], 1)[0]
    events = _events(df, raw)
    at = events[len(events) // 2]["ts"]
    a = client.post("/v1/score", json={"at": at, "events": events}, headers=AUTH).json()
    b = client.post("/v1/score", json={"at": at, "events": [e for e in events if e["ts"] < at]}, headers=AUTH).json()
    assert a["probability"] == b["probability"] and a["n_events"] == b["n_events"]


def test_auth_is_required_except_for_health(client):
    body = {"events": [{"ts": "2024-03-10T10:00:00Z", "event": "view"}]}
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json()["status"] == "ready"
    routes = (("POST", "/v1/score", {"json": body}), ("POST", "/v1/score/batch", {"json": {"users": [body]}}),
              ("GET", "/v1/users/u1/score", {}), ("GET", "/metrics", {}), ("GET", "/v1/model", {}),
              ("POST", "/v1/admin/reload", {}))
    for headers in ({}, {"Authorization": "Bearer wrong-key-123"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
        for method, path, kw in routes:
            r = client.request(method, path, headers=headers, **kw)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
    assert client.post("/v1/score", json=body, headers=AUTH).status_code == 200


GOOD = {"ts": "2024-03-10T10:00:00Z", "event": "view", "item_id": "i1", "category": "c1", "price": 9.5,
        "session_id": "s1"}


def _with(**kw):
    return {"events": [{**GOOD, **kw}]}


BAD_REQUESTS = [
    ({}, "events"),  # missing field
    ({"events": []}, "events"),  # empty list
    ({"events": "view"}, "events"),  # wrong type
    ({"events": [{"event": "view"}]}, "ts"),  # missing ts
    ({"events": [{"ts": "2024-03-10T10:00:00Z"}]}, "event"),  # missing event
    (_with(event="buy"), "event"),  # unknown event name
    (_with(event=3), "event"),
    (_with(ts="yesterday"), "ts"),  # unparsable time
    (_with(ts="2024-13-45T99:00:00"), "ts"),
    (_with(ts=True), "ts"),
    (_with(ts=[1, 2]), "ts"),
    (_with(ts="2999-01-01T00:00:00Z"), "ts"),  # in the future
    (_with(ts=4102444800), "ts"),  # 2100 as epoch seconds
    (_with(ts=1e300), "ts"),  # huge number
    (_with(ts=10 ** 400), "ts"),  # an integer too large for a float
    (_with(ts=-5), "ts"),
    (_with(price=1e308), "price"),
    (_with(price=-1), "price"),
    (_with(price="cheap"), "price"),
    (_with(item_id="x" * 10_000), "item_id"),
    (_with(item_id={"a": 1}), "item_id"),
    (_with(item_id=True), "item_id"),  # ids are text or integers, not booleans...
    (_with(session_id=1.5), "session_id"),  # ...or fractions
    (_with(category=""), "category"),
    (_with(ts="2024-03-10T10:00:00Zulu"), "ts"),
    (_with(ts="0001-01-01T00:00:00+01:00"), "ts"),  # before year 1 in UTC
    ({**_with(), "events": [GOOD, "view"]}, "events"),
    (_with(colour="red"), "colour"),  # unknown field
    ({**_with(), "at": "not a time"}, "at"),
    ({**_with(), "at": "2999-01-01"}, "at"),
    ({**_with(), "at": "2024-03-01T00:00:00Z"}, "events"),  # no event before `at`
    ({**_with(), "user_id": ["a"]}, "user_id"),
    ([1, 2, 3], "body"),
]


@pytest.mark.parametrize("body, field", BAD_REQUESTS)
def test_bad_input_gets_a_4xx_naming_the_field(client, body, field):
    r = client.post("/v1/score", json=body, headers=AUTH)
    assert 400 <= r.status_code < 500, r.text
    assert field in r.json()["message"], r.json()
    r = client.post("/v1/score/batch", json={"users": [body]}, headers=AUTH)
    assert 400 <= r.status_code < 500 and (field in r.json()["message"] or field == "body"), r.text
    assert client.post("/v1/score", json=_with(), headers=AUTH).status_code == 200  # still serving


def test_integer_ids_and_time_forms_mean_the_same(client):
    """Integer ids are read as their decimal text; 'Z', 'z', an offset and epoch seconds are the same instant."""
    ev = {"ts": "2024-03-10T10:00:00Z", "event": "cart", "item_id": "17", "category": "3", "price": 5.0,
          "session_id": "9"}
    want = client.post("/v1/score", json={"user_id": "42", "events": [ev]}, headers=AUTH).json()
    as_int = {**ev, "item_id": 17, "category": 3, "session_id": 9}
    got = client.post("/v1/score", json={"user_id": 42, "events": [as_int]}, headers=AUTH).json()
    assert got["probability"] == want["probability"] and got["user_id"] == want["user_id"]
    for ts in ("2024-03-10T10:00:00z", "2024-03-10T12:00:00+02:00", 1710064800, "2024-03-10T10:00:00"):
        r = client.post("/v1/score", json={"user_id": "42", "events": [{**ev, "ts": ts}]}, headers=AUTH)
        assert r.status_code == 200 and r.json() == want, (ts, r.text)


def test_openapi_documents_the_request_bodies(client):
    spec = client.get("/openapi.json").json()
    for path, model in (("/v1/score", "ScoreRequest"), ("/v1/score/batch", "BatchRequest")):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
    schemas = spec["components"]["schemas"]
    assert {"ScoreRequest", "BatchRequest", "Event", "ScoreResponse"} <= set(schemas)
    assert set(schemas["Event"]["properties"]) == {"ts", "event", "item_id", "category", "price", "session_id",
                                                  "raw_event"}


def test_malformed_bodies_and_limits(shop):
    ws, _, _ = shop
    with _client(ws, max_events=3, max_users=2, max_body_bytes=1000) as c:
        h = {**AUTH, "Content-Type": "application/json"}
        for raw in (b"{", b"", b"nan", b'{"events": [{"ts": NaN, "event": "view"}]}', b"\xff\xfe"):
            r = c.post("/v1/score", content=raw, headers=h)
            assert r.status_code == 422, (raw, r.text)
        r = c.post("/v1/score", content='{"events": [], "user_id": "Müller"}'.encode("latin-1"), headers=h)
        assert r.status_code == 422 and "the body is not UTF-8" in r.json()["message"], r.text
        r = c.post("/v1/score", json={"events": [GOOD] * 4}, headers=AUTH)
        assert r.status_code == 422 and "events" in r.json()["message"]
        r = c.post("/v1/score/batch", json={"users": [_with()] * 3}, headers=AUTH)
        assert r.status_code == 422 and "users" in r.json()["message"]
        r = c.post("/v1/score/batch", json={"users": []}, headers=AUTH)
        assert r.status_code == 422 and "users" in r.json()["message"]
        twice = [{**_with(), "user_id": "a"}, {**_with(), "user_id": "a"}]
        r = c.post("/v1/score/batch", json={"users": twice}, headers=AUTH)
        assert r.status_code == 422 and "user_id" in r.json()["message"]
        r = c.post("/v1/score", json={"events": [{**GOOD, "item_id": "x" * 250}] * 3}, headers=AUTH)
        assert r.status_code == 413
        r = c.post("/v1/score", content=iter([b"{" + b" " * 1500 + b"}"]), headers=h)  # no Content-Length
        assert r.status_code == 413 and r.json()["message"].startswith("body: request body larger")
        # one error per field, without pydantic's union-member tags or its "Value error, " prefix
        r = c.post("/v1/score", json={"user_id": "", "events": [{**GOOD, "item_id": "x" * 300}]}, headers=AUTH)
        assert r.status_code == 422, r.text
        text = r.text
        assert "function-after" not in text and "constrained" not in text and "Value error, " not in text
        locs = [tuple(d["loc"]) for d in r.json()["detail"]]
        assert len(locs) == len(set(locs)) and ("body", "user_id") in locs
        r = c.post("/v1/score", json=_with())  # no key: the same shape as every other error
        assert r.status_code == 401 and "API key" in r.json()["message"] and r.json()["detail"][0]["msg"]
        assert c.get("/v1/users/nobody/score", headers=AUTH).status_code == 404
        r = c.get("/v1/users/nobody/score", params={"at": "soon"}, headers=AUTH)
        assert r.status_code == 422 and "at" in r.json()["message"] and "%2B" not in r.json()["message"]
        r = c.get("/v1/users/nobody/score?at=2024-02-26T01:00:00+01:00", headers=AUTH)  # the + unescaped
        assert r.status_code == 422 and "write the offset's + as %2B" in r.json()["message"]
        assert c.post("/v1/score", json=_with(), headers=AUTH).status_code == 200


def test_metrics_in_prometheus_format(shop):
    ws, _, _ = shop
    with _client(ws) as c:
        c.post("/v1/score", json=_with(), headers=AUTH)
        c.post("/v1/score", json=_with(event="buy"), headers=AUTH)
        c.post("/v1/score", json=_with())
        r = c.get("/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'purchase_intent_requests_total{endpoint="/v1/score",method="POST",status="200"} 1' in text
    assert 'purchase_intent_errors_total{kind="validation"} 1' in text
    assert 'purchase_intent_errors_total{kind="auth"} 1' in text
    assert 'purchase_intent_request_duration_seconds_bucket{endpoint="/v1/score",le="+Inf"} 3' in text
    assert "purchase_intent_score_count 1" in text
    for stage in ("parse", "features", "model"):
        assert f'purchase_intent_stage_seconds_count{{stage="{stage}"}} 1' in text
    info = next(line for line in text.splitlines() if line.startswith("purchase_intent_model_info{"))
    assert 'run="lightgbm"' in info and 'model="lightgbm"' in info  # the library sorts labels by name


def test_hot_swap_keeps_answering_and_reports_the_version(shop):
    ws, _, _ = shop
    versions = {r: runs.load_run(r, ws).version for r in ("lightgbm", "lightgbm-b")}
    with _client(ws) as c:
        seen, errors, stop = set(), [], threading.Event()

        def hammer():
            while not stop.is_set():
                r = c.post("/v1/score", json=_with(), headers=AUTH)
                if r.status_code != 200:
                    errors.append(r.text)
                else:
                    seen.add(r.json()["version"])

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        for run in ("lightgbm-b", "lightgbm", "lightgbm-b"):
            r = c.post("/v1/admin/reload", json={"run": run}, headers=AUTH)
            assert r.status_code == 200 and r.json()["version"] == versions[run]
            time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join()
        assert not errors and seen <= set(versions.values())
        assert c.post("/v1/score", json=_with(), headers=AUTH).json()["version"] == versions["lightgbm-b"]
        # the current run name is reloaded when none is given
        assert c.post("/v1/admin/reload", headers=AUTH).json()["previous_version"] == versions["lightgbm-b"]
        # only runs inside the runs directory
        for bad, status in (("../ws", 422), ("/etc", 422), ("no-such-run", 404), (str(ws.root / "examples"), 422)):
            r = c.post("/v1/admin/reload", json={"run": bad}, headers=AUTH)
            assert r.status_code == status and "run" in r.json()["message"], (bad, r.text)
        assert c.get("/v1/model", headers=AUTH).json()["run"] == "lightgbm-b"


def test_runs_are_only_loaded_from_the_runs_directory(shop, tmp_path):
    ws, _, _ = shop
    assert resolve_run_dir(ws.runs_dir, "lightgbm") == (ws.runs_dir / "lightgbm").resolve()
    assert resolve_run_dir(ws.runs_dir, str(ws.runs_dir / "lightgbm")).name == "lightgbm"
    outside = tmp_path / "evil"
    outside.mkdir()
    (outside / "run.json").write_text("{}")
    (ws.runs_dir / "link-out").symlink_to(outside)
    try:
        for bad in ("..", "../runs/lightgbm", str(outside), "link-out", "lightgbm/model"):
            with pytest.raises(ValueError):
                resolve_run_dir(ws.runs_dir, bad)
        with pytest.raises(ValueError):
            create_app(ServeSettings(workspace=str(ws.root), run="lightgbm", api_keys=()))
    finally:
        (ws.runs_dir / "link-out").unlink()


def test_api_keys_from_env_and_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# team keys\nfile-key-123456\n\n")
    want = ("env-key-1234567", "other-key-12345", "file-key-123456")
    assert read_api_keys("env-key-1234567, other-key-12345", f) == want
    assert read_api_keys("", None) == ()
    with pytest.raises(ValueError, match="shorter"):
        read_api_keys("abc", None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_command() -> list[str]:
    from purchase_intent import cli

    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    module = "purchase_intent.cli" if "serve" in sub.choices else "purchase_intent.serve.app"
    return [sys.executable, "-m", module]


def _http(method: str, url: str, body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_serve_end_to_end_over_http(shop, tmp_path):
    ws, df, scores = shop
    port = _free_port()
    key_file = tmp_path / "keys"
    key_file.write_text(KEY + "\n")
    env = {**os.environ, "PURCHASE_INTENT_API_KEYS": "env-key-abcdefgh", "PYTHONPATH": str(REPO)}
    cmd = _serve_command() + ["--workspace", str(ws.root), "serve", "--run", "lightgbm", "--port", str(port),
                              "--api-key-file", str(key_file)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _http("GET", base + "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        batch = scores["lightgbm"].set_index("user_id")
        raw, pid = _raw_users(ws, df, scores["lightgbm"], 1)[0]
        at = batch["cutoff"].iloc[0].isoformat() + "Z"
        for key in (KEY, "env-key-abcdefgh"):  # keys from the file and from the environment
            status, body = _http("POST", base + "/v1/score", {"user_id": raw, "at": at, "events": _events(df, raw)},
                                 {"Authorization": f"Bearer {key}"})
            assert status == 200 and abs(body["probability"] - batch.loc[pid, "probability"]) < 1e-6
        assert _http("POST", base + "/v1/score", {"events": []}, AUTH)[0] == 422
        assert _http("POST", base + "/v1/score", {"events": []})[0] == 401
        # SIGHUP reloads the run without stopping the server
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        status, info = _http("GET", base + "/v1/model", headers=AUTH)
        assert status == 200 and info["run"] == "lightgbm" and proc.poll() is None
        with urllib.request.urlopen(urllib.request.Request(base + "/metrics", headers=AUTH), timeout=30) as r:
            assert b'purchase_intent_reloads_total{outcome="ok"} 1' in r.read()
        assert _http("GET", base + "/openapi.json")[0] == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
