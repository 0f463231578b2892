"""Leakage on every path that reads events: nothing at or after an example's cutoff T changes its output.

``test_leakage.py`` proves it for the SQL tabular features. Here the same perturbation
(``test_leakage.perturb_after``: events at or after T changed, moved within [T, end], deleted and
added, some exactly at T) is applied to the other paths, and each check has a converse proving it
can fail (a deliberate leak injected with monkeypatch: the cutoff read one day late):

- the SQL sequence builder (``sequences.build_sequences``) on user-task and session-task examples,
  across every cutoff and several random seeds of the perturbation;
- the HTTP API on a Transformer run, user task (request events, ``?explain=true`` reasons included)
  and session task;
- the known-user API route, batch ``score`` (with reasons) and ``explain`` at an earlier time than
  the end of the data, over a workspace whose stored events were perturbed after that time.
"""
from __future__ import annotations

import math
import shutil
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("torch")
from conftest import make_tiny_events  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_leakage import TASKS, _connect, _worlds, perturb_after  # noqa: E402

from purchase_intent import pipeline, runs  # noqa: E402
from purchase_intent import score as score_module  # noqa: E402
from purchase_intent.config import DataConfig, LabelConfig, TrainConfig  # noqa: E402
from purchase_intent.explain import explain_user  # noqa: E402
from purchase_intent.labels import build_examples  # noqa: E402
from purchase_intent.score import ScoreConfig, score  # noqa: E402
from purchase_intent.sequences import SEQUENCE_FIELDS, SequenceConfig, build_sequences, fit_vocab  # noqa: E402
from purchase_intent.serve import scoring  # noqa: E402
from purchase_intent.serve.app import create_app  # noqa: E402
from purchase_intent.serve.settings import ServeSettings  # noqa: E402
from purchase_intent.workspace import Workspace  # noqa: E402

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
TINY_TRANSFORMER = {"preset": "tiny", "max_epochs": 1}
LATE = timedelta(days=1)  # how late the deliberate leaks of the converse tests read the cutoff


def _late(examples: pd.DataFrame) -> pd.DataFrame:
    """The examples with their cutoffs one day late: a leak of everything in [T, T + 1 day)."""
    return examples.assign(cutoff=(pd.to_datetime(examples["cutoff"]) + LATE).astype("datetime64[us]"))


def _perturbed(events: pd.DataFrame, t: pd.Timestamp, seed) -> pd.DataFrame:
    """``perturb_after`` plus one added event exactly at ``t`` (so every perturbed log has one)."""
    rng = np.random.default_rng(seed)
    out = perturb_after(events, t, rng)
    at_t = out.iloc[[0]].assign(ts=t, event="purchase", item_id="at-t", price=123.0)
    out = pd.concat([out, at_t], ignore_index=True)
    out["ts"] = out["ts"].astype("datetime64[us]")
    return out


def _same(a, b, msg: str) -> None:
    """Equal results (nested dicts / lists); floats to 1e-9 (the same inputs give the same numbers)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), msg
        for k in a:
            _same(a[k], b[k], f"{msg}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), msg
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{msg}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-9, f"{msg}: {a!r} != {b!r}"
    else:
        assert a == b, f"{msg}: {a!r} != {b!r}"


# ---------------------------------------------------------------------------------------------
# the SQL sequence builder
def _sql_sequences(events: pd.DataFrame, examples: pd.DataFrame, vocab) -> dict:
    return build_sequences(_connect(events), examples[["example_id", "user_id", "cutoff"]], vocab.cfg, vocab)


def _check_sequence_builder(events: pd.DataFrame, examples, seeds, builder=_sql_sequences) -> int:
    """Every (seed, cutoff) world perturbed at or after the cutoff, built in one call on stacked
    copies of the log; rows with cutoff <= T must equal the unperturbed rows. Returns rows checked."""
    ex = examples.to_pandas()
    con = _connect(events)
    con.register("train_examples", ex[["user_id", "cutoff"]])
    vocab = fit_vocab(con, "train_examples", SequenceConfig(max_seq_len=12, price_buckets=6))
    times = [pd.Timestamp(t) for t in np.sort(ex["cutoff"].unique())]
    plan = [(s, t) for s in seeds for t in times]
    worlds = [events] + [_perturbed(events, t, [s, i]) for i, (s, t) in enumerate(plan)]
    assert all((w["ts"] == t).any() for (_, t), w in zip(plan, worlds[1:]))  # events exactly at T
    stacked_events, stacked = _worlds(events, examples, worlds)
    seq = builder(stacked_events, stacked.to_pandas(), vocab)
    n = len(ex)
    checked = 0
    for k, (s, t) in enumerate(plan, start=1):
        keep = np.flatnonzero((ex["cutoff"] <= t).to_numpy())
        for f in list(SEQUENCE_FIELDS) + ["mask"]:
            np.testing.assert_array_equal(seq[f][k * n + keep], seq[f][keep],
                                          err_msg=f"leak in {f}: seed {s}, perturbed at/after {t}")
        checked += len(keep)
    return checked


@pytest.fixture(scope="module")
def log() -> pd.DataFrame:
    return make_tiny_events(seed=3, n_users=14, days=24)


@pytest.mark.parametrize("task", list(TASKS))
def test_sql_sequences_ignore_events_at_or_after_the_cutoff(log, task):
    examples = build_examples(_connect(log), TASKS[task])
    assert _check_sequence_builder(log, examples, seeds=(0, 1, 2)) > 100


@pytest.mark.parametrize("task", ["user", "session"])
def test_sql_sequence_check_catches_a_late_cutoff(log, task):
    """Converse: a builder that reads the cutoff one day late fails the same check."""
    examples = build_examples(_connect(log), TASKS[task])

    def leaky(events, examples, vocab):
        return _sql_sequences(events, _late(examples), vocab)

    with pytest.raises(AssertionError, match="leak in"):
        _check_sequence_builder(log, examples, seeds=(0,), builder=leaky)


# ---------------------------------------------------------------------------------------------
# the HTTP API (request events) on Transformer runs: user task and session task
def _workspace(root, df: pd.DataFrame, label_cfg: LabelConfig, models=("transformer",)) -> Workspace:
    root.mkdir(parents=True, exist_ok=True)
    df.to_csv(root / "events.csv", index=False)
    ws = Workspace(root / "ws")
    pipeline.ingest(root / "events.csv", DataConfig(format="csv"), ws, progress=False)
    pipeline.build(label_cfg, workspace=ws, quiet=True)
    for m in models:
        pipeline.train(m, params=TINY_TRANSFORMER if m == "transformer" else None, workspace=ws, quiet=True,
                       train_cfg=TrainConfig(min_positives=1, min_negatives=1))
    return ws


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """28 days of 40 users, user-task runs (7d lookback, 3d horizon): a Transformer and, for the tabular
    batch-score path, logistic regression."""
    df = make_tiny_events(seed=5, n_users=40, days=28)
    ws = _workspace(tmp_path_factory.mktemp("leak-user"), df, LabelConfig(lookback="7d", horizon="3d", step="3d"),
                    models=("transformer", "logreg"))
    return ws, df


@pytest.fixture(scope="module")
def session_shop(tmp_path_factory):
    df = make_tiny_events(seed=6, n_users=40, days=21)
    return _workspace(tmp_path_factory.mktemp("leak-session"), df, LabelConfig(task="session", step="3d")), df


def _json_events(ev: pd.DataFrame) -> list[dict]:
    def value(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    return [{"ts": pd.Timestamp(t).isoformat() + "Z", "event": e, "item_id": value(i), "category": value(c),
             "price": value(p), "session_id": value(s)}
            for t, e, i, c, p, s in zip(ev["ts"], ev["event"], ev["item_id"], ev["category"], ev["price"],
                                        ev["session_id"])]


def _request_plan(df: pd.DataFrame, n_users: int) -> list[tuple[str, pd.Timestamp]]:
    """(raw user, at) pairs: users with events on both sides of ``at``; even ones exactly at an event."""
    plan = []
    for u, g in df.groupby("user_id", sort=True):
        ts = np.sort(g["ts"].unique())
        if len(ts) < 4:
            continue
        i = len(ts) // 2
        at = pd.Timestamp(ts[i]) if len(plan) % 2 == 0 else pd.Timestamp(ts[i]) + pd.Timedelta(seconds=1)
        plan.append((u, at))
        if len(plan) == n_users:
            break
    return plan


def _check_api(client: TestClient, df: pd.DataFrame, plan, seeds, explain: bool = True) -> int:
    """One batch request of the users' own events, then the same with their events at or after each
    user's ``at`` perturbed (seed by seed): probabilities, event counts, activity and reasons equal.
    Returns the number of perturbed events sent (events at or after ``at``)."""
    def same_instant(at: pd.Timestamp) -> list[dict]:  # `at` written as another offset and as epoch seconds
        return [{"ts": (at + pd.Timedelta(hours=2)).isoformat() + "+02:00", "event": "purchase"},
                {"ts": (at - pd.Timestamp("1970-01-01")) / pd.Timedelta(seconds=1), "event": "cart"}]

    def body(frames, extra=False):  # extra: two more events exactly at `at`
        return {"users": [{"user_id": u, "at": at.isoformat() + "Z",
                           "events": _json_events(frames[u]) + (same_instant(at) if extra else [])} for u, at in plan]}

    params = {"explain": "true", "top": 3} if explain else {}
    own = {u: df[df["user_id"] == u] for u, _ in plan}
    r = client.post("/v1/score/batch", json=body(own), headers=AUTH, params=params)
    assert r.status_code == 200, r.text
    base = r.json()["results"]
    sent = 0
    for seed in seeds:
        frames = {}
        for k, (u, at) in enumerate(plan):
            p = _perturbed(own[u], at, [seed, k])
            frames[u] = p[p["user_id"] == u].sort_values("ts", kind="stable")
            sent += int((frames[u]["ts"] >= at).sum())
        r = client.post("/v1/score/batch", json=body(frames, extra=True), headers=AUTH, params=params)
        assert r.status_code == 200, r.text
        _same(base, r.json()["results"], f"leak (seed {seed})")
    return sent


def _client(ws: Workspace, run: str = "transformer") -> TestClient:
    return TestClient(create_app(ServeSettings(workspace=str(ws.root), run=run, api_keys=(KEY,))))


def test_api_transformer_ignores_request_events_at_or_after_at(shop):
    ws, df = shop
    plan = _request_plan(df, 6)
    with _client(ws) as c:
        assert _check_api(c, df, plan, seeds=(0, 1, 2)) > 3 * len(plan)
        # a log without session ids: the perturbed events after `at` are the only ones that have one
        assert _check_api(c, df.assign(session_id=None), plan, seeds=(3,)) > len(plan)


def test_api_check_catches_a_late_cutoff_in_the_request_sequences(shop, monkeypatch):
    """Converse: request tokens built with the cutoff one day late fail the same check."""
    ws, df = shop
    frame_builder = scoring.build_sequences_frame
    monkeypatch.setattr(scoring, "build_sequences_frame",
                        lambda cols, ex, cfg, vocab: frame_builder(cols, _late(ex), cfg, vocab))
    with _client(ws) as c, pytest.raises(AssertionError, match="leak"):
        _check_api(c, df, _request_plan(df, 6), seeds=(0,), explain=False)


def test_api_session_task_ignores_request_events_at_or_after_at(session_shop):
    ws, df = session_shop
    plan = _request_plan(df, 6)
    with _client(ws) as c:
        assert c.get("/v1/model", headers=AUTH).json()["task"] == "session"
        assert _check_api(c, df, plan, seeds=(0, 1)) > 2 * len(plan)
        # sessions by inactivity gaps before `at`; only the perturbed events after it carry session ids
        assert _check_api(c, df.assign(session_id=None), plan, seeds=(2,)) > len(plan)


def test_api_session_check_catches_a_late_cutoff(session_shop, monkeypatch):
    """Converse: session-task inputs read one day past the cutoff fail the same check."""
    ws, df = session_shop
    inputs = runs.inputs_for_examples
    monkeypatch.setattr(runs, "inputs_for_examples", lambda meta, model, con, ex: inputs(meta, model, con, _late(ex)))
    with _client(ws) as c, pytest.raises(AssertionError, match="leak"):
        _check_api(c, df, _request_plan(df, 6), seeds=(0,), explain=False)


# ---------------------------------------------------------------------------------------------
# stored events: batch score, explain and the known-user route at an earlier time than the end
@pytest.fixture(scope="module")
def perturbed_shop(shop, tmp_path_factory):
    """A second workspace: the same key and run, its events perturbed at or after ``at`` (an event's
    time about two thirds into the log, so events lie exactly at it)."""
    ws, df = shop
    ts = np.sort(df["ts"].unique())
    at = pd.Timestamp(ts[int(len(ts) * 0.65)])
    root = tmp_path_factory.mktemp("leak-perturbed")
    pert = _perturbed(df, at, [7])
    pert.to_csv(root / "events.csv", index=False)
    wp = Workspace(root / "ws")
    wp.root.mkdir(parents=True)
    shutil.copy(ws.key_path, wp.key_path)  # the same pseudonyms
    pipeline.ingest(root / "events.csv", DataConfig(format="csv"), wp, progress=False)
    for run in ("transformer", "logreg"):
        shutil.copytree(ws.run_dir(run), wp.run_dir(run))
    n_stored = wp.connect().execute("SELECT count(*) FROM events").fetchall()[0][0]
    assert n_stored == len(pert)  # nothing perturbed was rejected at ingest
    return wp, at, pert


def _stored_outputs(ws: Workspace, at: pd.Timestamp, users: list[str], tmp_path) -> dict:
    """What every stored-events path answers at ``at``: batch scores with reasons (Transformer, and the
    tabular path of logistic regression), explain and the known-user API route (Transformer)."""
    got = {}
    for run in ("transformer", "logreg"):
        out = tmp_path / f"scores-{run}-{ws.root.parent.name}.parquet"
        score(run, out, ScoreConfig(at=at.isoformat(), reasons=3), workspace=ws, progress=False)
        got[f"scores-{run}"] = pd.read_parquet(out).to_dict(orient="list")
    got["explain"] = [explain_user("transformer", u, at=at.isoformat(), workspace=ws, top=3, ig_steps=8)
                      for u in users]
    with _client(ws) as c:
        got["api"] = [c.get(f"/v1/users/{u}/score", headers=AUTH,
                            params={"at": at.isoformat() + "Z", "explain": "true", "top": 3}).json() for u in users]
    return got


def _stored_users(df: pd.DataFrame, at: pd.Timestamp, k: int) -> list[str]:
    """Raw users with events both before and at or after ``at``."""
    before = set(df.loc[df["ts"] < at, "user_id"])
    after = df.loc[df["ts"] >= at, "user_id"]
    return sorted(before & set(after))[:k]


def test_score_explain_and_known_user_route_ignore_stored_events_at_or_after_at(shop, perturbed_shop, tmp_path):
    ws, df = shop
    wp, at, pert = perturbed_shop
    assert at < df["ts"].max() and (df["ts"] == at).any() and (pert["ts"] == at).sum() >= 2
    users = _stored_users(df, at, 3)
    assert len(users) == 3
    base = _stored_outputs(ws, at, users, tmp_path)
    scores = base["scores-transformer"]
    assert len(scores["user_id"]) >= 10 and None not in scores["reason_1"]
    assert all(e["reasons"] for e in base["explain"]) and all(a["reasons"] for a in base["api"])
    _same(base, _stored_outputs(wp, at, users, tmp_path), "leak")


def test_stored_events_check_catches_a_late_cutoff(shop, perturbed_shop, tmp_path, monkeypatch):
    """Converse: model inputs read one day past the cutoff make the same comparison fail."""
    ws, df = shop
    wp, at, _ = perturbed_shop
    inputs = runs.inputs_for_examples
    monkeypatch.setattr(runs, "inputs_for_examples", lambda meta, model, con, ex: inputs(meta, model, con, _late(ex)))
    features = score_module.compute_features_for_users
    monkeypatch.setattr(score_module, "compute_features_for_users", lambda con, ex, cfg: features(con, _late(ex), cfg))
    users = _stored_users(df, at, 3)
    base = _stored_outputs(ws, at, users, tmp_path)
    leaked = _stored_outputs(wp, at, users, tmp_path)
    for path in ("scores-transformer", "scores-logreg", "explain", "api"):  # each path's comparison fails on its own
        with pytest.raises(AssertionError, match="leak"):
            _same(base[path], leaked[path], f"leak in {path}")
