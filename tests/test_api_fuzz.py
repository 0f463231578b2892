"""Fuzz the scoring API against its own OpenAPI document (schemathesis, in process over ASGI).

For every operation the app documents, schemathesis generates valid and invalid requests from the
schema: none may be answered with a 5xx or hang (each call is timed), and without the API key
every route but the health checks must answer 401. Bounded: a few dozen examples per operation and
mode, well under a minute in all.
"""
from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from conftest import tiny_workspace  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from purchase_intent import pipeline  # noqa: E402
from purchase_intent.config import TrainConfig  # noqa: E402
from purchase_intent.serve.app import create_app  # noqa: E402
from purchase_intent.serve.settings import ServeSettings  # noqa: E402

KEY = "fuzz-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPEN = {"/healthz", "/readyz"}  # the only routes answered without a key
EXAMPLES = 15  # per operation and generation mode
MAX_SECONDS = 10.0  # one call slower than this counts as a hang


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app with its lifespan running (the run loaded), as schemathesis' ASGI transport calls it."""
    root = tmp_path_factory.mktemp("fuzz-ws")
    ws = tiny_workspace(root, n_users=30, days=21)
    pipeline.train("logreg", train_cfg=TrainConfig(min_positives=1, min_negatives=1), workspace=ws, quiet=True)
    app = create_app(ServeSettings(workspace=str(ws.root), run="logreg", api_keys=(KEY,)))
    with TestClient(app):  # runs the lifespan: app.state.serve stays set for the fuzzing calls
        yield app


def _operations(app) -> list:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/score", "/v1/score/batch", "/v1/users/{user_id}/score", "/metrics",
                                        "/v1/model", "/v1/admin/reload", "/healthz", "/readyz"}
    return [op for op in ops if op.path != "/v1/admin/reload"]  # swapping runs is not fuzzed


def _fuzz(op, mode, check) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        t0 = time.perf_counter()
        response = check(case)
        took = time.perf_counter() - t0
        assert response.status_code < 500, (op.path, case.body, response.text[:300])
        assert took < MAX_SECONDS, f"{op.method.upper()} {op.path} took {took:.1f}s"

    run()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_generated_request_gets_a_server_error(app, mode):
    t0 = time.perf_counter()
    fuzzed = 0
    for op in _operations(app):
        try:
            _fuzz(op, schemathesis.GenerationMode(mode), lambda case: case.call(headers=AUTH))
            fuzzed += 1
        except Unsatisfiable:  # nothing to make invalid: a route without parameters or body
            assert mode == "negative" and not list(op.iter_parameters()), op.path
    assert fuzzed >= 3
    assert time.perf_counter() - t0 < 60


def test_every_route_but_health_needs_the_key(app):
    def without_key(case):
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        r = case.call()
        if case.operation.path not in OPEN:
            assert r.status_code == 401, (case.operation.path, r.status_code, r.text[:200])
        return r

    def wrong_key(case):
        r = case.call(headers={"Authorization": "Bearer not-the-key-000"})
        if case.operation.path not in OPEN:
            assert r.status_code == 401, (case.operation.path, r.status_code, r.text[:200])
        return r

    for op in _operations(app):
        _fuzz(op, schemathesis.GenerationMode.POSITIVE, without_key)
        _fuzz(op, schemathesis.GenerationMode.POSITIVE, wrong_key)
    # converse: with the key the same routes are not 401, so the check above can fail
    client = TestClient(app)
    assert client.get("/v1/model", headers=AUTH).status_code == 200
    assert client.get("/v1/model").status_code == 401
