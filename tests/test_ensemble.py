"""The `ensemble` run is a model: it records its members, loads them, scores with the mean of their
probabilities, explains with the mean of their contributions, and refuses members that did not
predict the same examples (another backtest K, or no backtest)."""
from __future__ import annotations

import json
import shutil

import duckdb
import numpy as np
import pandas as pd
import pytest
from conftest import tiny_workspace
from test_leakage import perturb_after

from purchase_intent import explain, pipeline, runs
from purchase_intent.config import TrainConfig
from purchase_intent.ensemble import evaluate_ensemble
from purchase_intent.report import write_report
from purchase_intent.score import ScoreConfig, default_out, describe, predict_users, score


def _has_transformer() -> bool:
    try:
        import purchase_intent.models.classifier  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Tiny workspace: logreg and lightgbm backtested with K=2, LightGBM copies with K=1 and none,
    and a Transformer (no backtest) when installed; the ensemble of logreg + lightgbm."""
    root = tmp_path_factory.mktemp("ensemble-ws")
    ws = tiny_workspace(root, n_users=60, days=28)
    cfg = TrainConfig(min_positives=1, min_negatives=1)
    for run, model, k in (("logreg", "logreg", 2), ("lightgbm", "lightgbm", 2), ("lightgbm-k1", "lightgbm", 1),
                          ("lightgbm-nobt", "lightgbm", 0)):
        pipeline.train(model, run=run, train_cfg=cfg, workspace=ws, quiet=True)
        pipeline.evaluate(run, ws, backtest=k, n_boot=20, quiet=True)
    if _has_transformer():
        pipeline.train("transformer", params={"preset": "tiny", "max_epochs": 1}, train_cfg=cfg, workspace=ws,
                       quiet=True)
        pipeline.evaluate("transformer", ws, n_boot=20, quiet=True)
    evaluate_ensemble(ws, ["logreg", "lightgbm"], n_boot=20)
    return ws


def test_members_backtested_differently_are_refused(ws):
    with pytest.raises(ValueError, match=r"lightgbm-k1 has 1 backtest fold"):
        evaluate_ensemble(ws, ["logreg", "lightgbm-k1"], n_boot=20, run="bad-ens")
    with pytest.raises(ValueError, match=r"lightgbm-nobt has no backtest"):
        evaluate_ensemble(ws, ["logreg", "lightgbm-nobt"], n_boot=20, run="bad-ens")
    with pytest.raises(ValueError, match="at least two"):
        evaluate_ensemble(ws, ["logreg"], n_boot=20, run="bad-ens")
    shutil.copytree(ws.run_dir("lightgbm"), ws.run_dir("lightgbm-unevaluated"))
    (ws.run_dir("lightgbm-unevaluated") / runs.PREDICTIONS).unlink()  # trained, never evaluated
    with pytest.raises(ValueError, match=r"'lightgbm-unevaluated' has no predictions: evaluate it first "
                                         r"\(purchase-intent evaluate --run lightgbm-unevaluated"):
        evaluate_ensemble(ws, ["logreg", "lightgbm-unevaluated"], n_boot=20, run="bad-ens")
    shutil.rmtree(ws.run_dir("lightgbm-unevaluated"))
    assert not ws.run_dir("bad-ens").exists()  # nothing written
    # converse: same K, so no example is dropped, and each probability is the members' mean
    ens = runs.read_predictions(ws.run_dir("ensemble")).set_index(["example_id", "split", "fold"]).sort_index()
    parts = []
    for m in ("logreg", "lightgbm"):
        p = runs.read_predictions(ws.run_dir(m))
        p["fold"] = p["fold"].fillna(-1).astype(int) if "fold" in p else -1
        parts.append(p.set_index(["example_id", "split", "fold"]).sort_index()["probability"])
    assert len(ens) == len(parts[0]) == len(parts[1]) and (ens.reset_index()["split"] == "backtest").any()
    np.testing.assert_allclose(ens["probability"], (parts[0] + parts[1]) / 2, rtol=0, atol=1e-12)


def test_the_run_records_and_loads_its_members(ws):
    meta = runs.read_meta(ws.run_dir("ensemble"))
    versions = {m: runs.read_meta(ws.run_dir(m))["version"] for m in ("logreg", "lightgbm")}
    assert [(m["run"], m["version"]) for m in meta["members"]] == list(versions.items())
    loaded = runs.load_run("ensemble", ws)
    assert [(m.name, m.version) for m in loaded.members] == list(versions.items())
    assert loaded.info["members"] == ",".join(f"{k}@{v}" for k, v in versions.items())
    assert runs.load_run("logreg", ws).members == [] and "members" not in runs.load_run("logreg", ws).info


def test_a_changed_or_missing_member_is_refused(ws):
    shutil.copytree(ws.run_dir("lightgbm"), ws.run_dir("lightgbm-copy"))
    evaluate_ensemble(ws, ["logreg", "lightgbm-copy"], n_boot=20, run="ens-copy")
    assert len(runs.load_run("ens-copy", ws).members) == 2  # converse: as built, it loads
    meta = json.loads((ws.run_dir("lightgbm-copy") / runs.RUN_JSON).read_text())
    (ws.run_dir("lightgbm-copy") / runs.RUN_JSON).write_text(json.dumps({**meta, "version": "retrained"}))
    with pytest.raises(ValueError, match="now version retrained.*rebuild the ensemble"):
        runs.load_run("ens-copy", ws)
    shutil.rmtree(ws.run_dir("lightgbm-copy"))
    with pytest.raises(FileNotFoundError, match="member run 'lightgbm-copy' is missing"):
        runs.load_run("ens-copy", ws)


def test_batch_scores_are_the_mean_of_the_members_and_out_has_a_default(ws):
    cfg = ScoreConfig(reasons=2)
    r = score("ensemble", None, cfg, workspace=ws, progress=False)
    cutoff = pd.Timestamp(r.cutoff).to_pydatetime()
    assert r.out == str(default_out(ws.run_dir("ensemble"), cutoff))
    assert r.out.endswith(f"scores-{cutoff.strftime('%Y%m%dT%H%M%S')}Z.parquet")
    assert r.members == [f"{m}@{runs.read_meta(ws.run_dir(m))['version']}" for m in ("logreg", "lightgbm")]
    assert "ensemble of 2 runs" in describe(r) and "logreg@" in describe(r)
    got = pd.read_parquet(r.out).set_index("user_id")["probability"]
    members = [pd.read_parquet(score(m, None, workspace=ws, progress=False).out).set_index("user_id")["probability"]
               for m in ("logreg", "lightgbm")]
    np.testing.assert_allclose(got.sort_index(), ((members[0] + members[1]) / 2).sort_index(), rtol=0, atol=1e-12)
    assert pd.read_parquet(r.out)["reason_1"].notna().all()


def _ensemble_of_two_kinds(ws) -> str:
    """A Transformer + LightGBM ensemble where the Transformer is installed (different inputs)."""
    if not _has_transformer():
        return "ensemble"
    if not ws.run_dir("ens-mixed").exists():
        evaluate_ensemble(ws, ["transformer", "lightgbm-nobt"], n_boot=20, run="ens-mixed")
    return "ens-mixed"


def test_contributions_are_the_mean_of_the_members(ws):
    run = _ensemble_of_two_kinds(ws)
    loaded = runs.load_run(run, ws)
    con = ws.connect()
    users = [u for (u,) in con.execute("SELECT DISTINCT user_id FROM events ORDER BY 1 LIMIT 5").fetchall()]
    ex = pd.DataFrame({"user_id": users, "cutoff": pd.Series([runs.resolve_cutoff(con)] * len(users),
                                                             dtype="datetime64[us]")})
    X = runs.inputs_for_examples(loaded.meta, loaded.model, con, ex)
    a = explain.attribute(loaded.meta, loaded.model, X, ig_steps=8)
    parts = [explain.attribute(m.meta, m.model, x, ig_steps=8) for m, x in zip(loaded.members, X)]
    assert a.feature_names == list(dict.fromkeys(f for p in parts for f in p.feature_names))
    for j, name in enumerate(a.feature_names):  # a member without the feature counts as 0
        want = sum(p.features[:, p.feature_names.index(name)] if name in p.feature_names else 0 for p in parts) / 2
        np.testing.assert_allclose(a.features[:, j], want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a.total(), np.mean([p.total() for p in parts], axis=0), rtol=0, atol=1e-9)
    with_events = [p for p in parts if p.events is not None]
    if with_events:
        np.testing.assert_allclose(a.events, with_events[0].events / 2, rtol=0, atol=1e-12)
    why = explain.explain_inputs(loaded.meta, loaded.model, X, top=3, ig_steps=8)
    assert len(why) == len(users) and all(1 <= len(w) <= 3 and w[0]["text"] for w in why)


def test_events_at_or_after_the_cutoff_change_no_ensemble_score(ws):
    """Leakage: perturbing events at/after T leaves every ensemble score at T unchanged; the converse
    (an event before T changed) moves some score, so the check can fail."""
    run = _ensemble_of_two_kinds(ws)
    loaded = runs.load_run(run, ws)
    events = ws.connect().execute(
        "SELECT user_id, ts, event, item_id, category, price, session_id FROM events").df()
    events["ts"] = events["ts"].astype("datetime64[us]")
    t = events["ts"].quantile(0.6).floor("h")
    users = sorted(events.loc[(events["ts"] < t) & (events["ts"] >= t - pd.Timedelta(days=7)), "user_id"].unique())

    def scores(df: pd.DataFrame) -> np.ndarray:
        con = duckdb.connect()
        con.execute("SET threads = 1")
        con.register("events_df", df)
        con.execute("CREATE TABLE events AS SELECT * FROM events_df")
        return predict_users(loaded, con, list(users), t.to_pydatetime())

    base = scores(events)
    for seed in range(2):
        np.testing.assert_array_equal(scores(perturb_after(events, t, np.random.default_rng(seed))), base)
    before = events.copy()
    mine = before.index[before["user_id"].isin(users) & (before["ts"] < t)]
    last = before.loc[mine].sort_values("ts").groupby("user_id").tail(1).index
    before.loc[last, "event"] = np.where(before.loc[last, "event"] == "cart", "view", "cart")
    assert np.abs(scores(before) - base).max() > 1e-6


def test_report_names_the_members(ws, tmp_path):
    out = write_report(ws, runs=["logreg", "lightgbm", "ensemble"], out=tmp_path / "r.html", explain=False)
    html = out.read_text()
    v = runs.read_meta(ws.run_dir("lightgbm"))["version"]
    assert "is an ensemble" in html and f"lightgbm (lightgbm, {v})" in html


def test_more_reasons_than_features_are_capped_with_a_note(ws, tmp_path, capsys):
    """--reasons 500 on a LightGBM run of 60 features: 60 reason columns and a note, not 500 mostly empty."""
    n = len(runs.read_meta(ws.run_dir("lightgbm"))["feature_names"])
    r = score("lightgbm", tmp_path / "s.parquet", ScoreConfig(reasons=n + 40), workspace=ws)
    cols = [c for c in pd.read_parquet(r.out).columns if c.startswith("reason_") and not c.endswith("contribution")]
    assert len(cols) == n and f"a user has at most {n} reasons" in capsys.readouterr().err
