"""Batch scores and audiences: who is scored, at which cutoff, ranks, deciles, chunking, audiences."""
from __future__ import annotations

import json
import math
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
from conftest import make_tiny_events

from purchase_intent import cli, commands, pipeline, runs
from purchase_intent.config import DataConfig, LabelConfig, TrainConfig
from purchase_intent.privacy import load_key, pseudonym_for, pseudonymise
from purchase_intent.score import ScoreConfig, describe, parse_share, score, summary_path
from purchase_intent.times import parse_time
from purchase_intent.workspace import Workspace

LOOKBACK = timedelta(days=7)


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A workspace with the tiny log ingested, built (7d lookback) and a logreg + LightGBM run."""
    root = tmp_path_factory.mktemp("score-ws")
    df = make_tiny_events(n_users=60, days=28)
    df.to_csv(root / "events.csv", index=False)
    ws = Workspace(root / "ws")
    pipeline.ingest(root / "events.csv", DataConfig(format="csv"), ws, progress=False)
    pipeline.build(LabelConfig(lookback="7d", horizon="3d", step="3d"), workspace=ws, quiet=True)
    for m in ("logreg", "lightgbm"):
        pipeline.train(m, train_cfg=TrainConfig(min_positives=1, min_negatives=1), workspace=ws, quiet=True)
    df["pid"] = pseudonymise(df["user_id"].tolist(), load_key(ws.root))
    return ws, df, root


def _active(df: pd.DataFrame, t) -> set[str]:
    t = pd.Timestamp(t)
    m = (df["ts"] >= t - LOOKBACK) & (df["ts"] < t)
    return set(df.loc[m, "pid"])


@pytest.mark.parametrize("model", ["logreg", "lightgbm"])
def test_scores_every_active_user_with_the_training_feature_path(shop, model, tmp_path):
    ws, df, _ = shop
    out = tmp_path / "scores.parquet"
    res = score(model, out, ScoreConfig(chunk_size=7), workspace=ws, progress=False)
    got = pd.read_parquet(out)
    end = df["ts"].max() + pd.Timedelta(microseconds=1)  # default cutoff: the last event counts
    assert pd.Timestamp(res.cutoff) == end
    assert (got["cutoff"] == end).all()
    assert set(got["user_id"]) == _active(df, end) and len(got) == res.n_scored == len(_active(df, end))
    assert list(got.columns) == ["user_id", "probability", "rank", "decile", "cutoff", "model", "version"]
    assert got["rank"].tolist() == list(range(1, len(got) + 1))
    assert got["probability"].is_monotonic_decreasing
    assert got["decile"].min() == 1 and got["decile"].max() == 10 and got["decile"].is_monotonic_increasing
    assert (got["model"] == model).all()
    loaded = runs.load_run(model, ws)
    meta, est = loaded.meta, loaded.model
    assert (got["version"] == meta["version"]).all()
    # the same probabilities as the shared feature path on the workspace events
    ex = pd.DataFrame({"user_id": got["user_id"], "cutoff": got["cutoff"].astype("datetime64[us]")})
    X = runs.inputs_for_examples(meta, est, ws.connect(), ex)
    np.testing.assert_allclose(got["probability"].to_numpy(), est.predict_proba(X)[:, 1], rtol=0, atol=1e-12)
    summary = json.loads(summary_path(out).read_text())
    assert summary["n_scored"] == len(got) and summary["audience"] is None
    assert math.isclose(summary["expected_buyers_all"], got["probability"].sum(), rel_tol=1e-9)


def test_chunk_size_does_not_change_the_output(shop, tmp_path):
    ws, _, _ = shop
    a = score("lightgbm", tmp_path / "a.parquet", ScoreConfig(chunk_size=4), workspace=ws, progress=False)
    b = score("lightgbm", tmp_path / "b.parquet", ScoreConfig(chunk_size=10_000), workspace=ws, progress=False)
    assert a.n_scored == b.n_scored
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "b.parquet"))


def test_at_sets_the_cutoff_and_later_events_are_not_read(shop, tmp_path):
    ws, df, root = shop
    at = pd.Timestamp("2024-03-15 12:00:00")
    res = score("logreg", tmp_path / "s.csv", ScoreConfig(at="2024-03-15T12:00:00Z"), workspace=ws, progress=False)
    got = pd.read_csv(tmp_path / "s.csv")
    assert pd.Timestamp(res.cutoff) == at
    assert set(got["user_id"]) == _active(df, at)
    # epoch seconds mean the same instant
    assert parse_time(str(at.timestamp())) == at.to_pydatetime()
    # a workspace holding only the events before `at` gives the same scores
    ws2 = Workspace(root / "ws-before")
    ws2.root.mkdir()
    (ws2.root / "pseudonym.key").write_bytes((ws.root / "pseudonym.key").read_bytes())  # same pseudonyms
    df[df["ts"] < at].drop(columns="pid").to_csv(root / "before.csv", index=False)
    pipeline.ingest(root / "before.csv", DataConfig(format="csv"), ws2, progress=False)
    score(str(ws.run_dir("logreg")), tmp_path / "s2.csv", ScoreConfig(at=str(at)), workspace=ws2, progress=False)
    got2 = pd.read_csv(tmp_path / "s2.csv")
    np.testing.assert_allclose(got2["probability"], got["probability"], atol=1e-12)
    assert got2["user_id"].tolist() == got["user_id"].tolist()


@pytest.mark.parametrize("rule, expected", [
    (dict(top="10%"), lambda n, p: int(math.ceil(0.1 * n))),
    (dict(top="0.5"), lambda n, p: int(math.ceil(0.5 * n))),
    (dict(top_n=5), lambda n, p: 5),
    (dict(min_probability=0.1), lambda n, p: int((p >= 0.1).sum())),
])
def test_audiences_keep_the_top_and_report_expected_precision_and_buyers(shop, tmp_path, rule, expected):
    ws, _, _ = shop
    score("lightgbm", tmp_path / "all.parquet", ScoreConfig(), workspace=ws, progress=False)
    full = pd.read_parquet(tmp_path / "all.parquet")
    out = tmp_path / "audience.csv.gz"
    # min_users=1: thresholds off, every count in the summary (the tiny shop's audiences hold a few users)
    res = score("lightgbm", out, ScoreConfig(**rule, min_users=1), workspace=ws, progress=False)
    aud = pd.read_csv(out)
    k = expected(len(full), full["probability"].to_numpy())
    assert len(aud) == res.n_rows == k
    assert aud["user_id"].tolist() == full["user_id"].head(k).tolist()
    summary = json.loads((tmp_path / "audience.summary.json").read_text())
    assert summary["audience"]["rule"] == next(iter(rule))
    assert math.isclose(summary["expected_buyers"], aud["probability"].sum(), rel_tol=1e-9)
    if k:
        assert math.isclose(summary["expected_precision"], aud["probability"].mean(), rel_tol=1e-9)
    assert summary["n_scored"] == len(full)


def test_bad_options_fail_with_a_clear_error(shop, tmp_path):
    ws, _, _ = shop
    with pytest.raises(ValueError, match="one of"):
        score("lightgbm", tmp_path / "x.parquet", ScoreConfig(top="10%", top_n=3), workspace=ws, progress=False)
    with pytest.raises(ValueError, match=".parquet, .csv"):
        score("lightgbm", tmp_path / "x.xlsx", ScoreConfig(), workspace=ws, progress=False)
    with pytest.raises(ValueError, match="nothing to score"):
        score("lightgbm", tmp_path / "x.parquet", ScoreConfig(at="2000-01-01"), workspace=ws, progress=False)
    with pytest.raises(FileNotFoundError):
        score("no-such-run", tmp_path / "x.parquet", ScoreConfig(), workspace=ws, progress=False)
    for at in ("1707955200000", "yesterday"):  # epoch milliseconds, a word: named as --at, with what to give
        with pytest.raises(ValueError, match=rf"--at '{at}' is not a time: give ISO 8601"):
            score("lightgbm", tmp_path / "x.parquet", ScoreConfig(at=at), workspace=ws, progress=False)
    with pytest.raises(ValueError, match=r"nothing to score \(the data ends at 2024-03-"):
        score("lightgbm", tmp_path / "x.parquet", ScoreConfig(at="2030-01-01"), workspace=ws, progress=False)
    for bad in ("0%", "150%", "-1", "abc"):
        with pytest.raises(ValueError, match="--top must be a share"):
            parse_share(bad)
    with pytest.raises(ValueError, match="write --top 10%; for 10 users, --top-n 10"):
        parse_share("10")
    assert not list(tmp_path.glob("x.*"))


def test_scoring_past_the_end_of_the_data_says_so(shop, tmp_path):
    ws, df, _ = shop
    after = (df["ts"].max() + pd.Timedelta("2D")).isoformat()
    r = score("lightgbm", tmp_path / "late.csv", ScoreConfig(at=after), workspace=ws, progress=False)
    assert r.data_end is not None and "--at is after the end of the data" in describe(r)
    on_time = score("lightgbm", tmp_path / "now.csv", ScoreConfig(), workspace=ws, progress=False)
    assert on_time.data_end is None and "after the end of the data" not in describe(on_time)


def test_score_command(shop, tmp_path, capsys):
    ws, _, _ = shop
    parser = cli.build_parser()
    a = parser.parse_args(["--workspace", str(ws.root), "score", "--run", "lightgbm", "--out",
                           str(tmp_path / "top.parquet"), "--top-n", "3", "--min-users", "1", "--quiet"])
    assert commands.COMMANDS[a.command](a) == 0
    printed = capsys.readouterr().out
    assert "expected precision" in printed and "expected buyers" in printed
    a = parser.parse_args(["--workspace", str(ws.root), "score", "--run", "lightgbm", "--out",
                           str(tmp_path / "top.parquet"), "--top-n", "3", "--quiet"])  # default k = 10
    assert commands.COMMANDS[a.command](a) == 0
    assert "fewer than 10 users (counts withheld" in capsys.readouterr().out
    assert len(pd.read_parquet(tmp_path / "top.parquet")) == 3
    with pytest.raises(SystemExit):  # the audience rules exclude each other
        parser.parse_args(["score", "--run", "x", "--out", "y.csv", "--top", "1%", "--top-n", "3"])


def test_thresholds_withhold_an_audience_of_fewer_than_k_users_from_the_summary(shop, tmp_path):
    ws, _, _ = shop
    out = tmp_path / "few.parquet"
    res = score("lightgbm", out, ScoreConfig(top_n=3, min_users=10), workspace=ws, progress=False)
    assert len(pd.read_parquet(out)) == 3  # the scores file keeps its rows: it is one row per user
    summary = json.loads(summary_path(out).read_text())
    assert summary["n_rows"] is None and summary["expected_buyers"] is None and summary["expected_precision"] is None
    assert {"n_rows", "expected_buyers", "expected_precision"} <= set(summary["withheld"])
    assert summary["min_users"] == 10 and res.n_rows is None
    assert "fewer than 10 users" in describe(res)
    # the same audience with k = 3 shows its counts
    shown = score("lightgbm", tmp_path / "shown.parquet", ScoreConfig(top_n=3, min_users=3), workspace=ws,
                  progress=False)
    assert shown.n_rows == 3 and shown.withheld == []
    with pytest.raises(ValueError, match="--min-users must be an integer >= 1"):
        score("lightgbm", out, ScoreConfig(min_users=0), workspace=ws, progress=False)


def test_reidentify_adds_the_key_holders_raw_ids_and_nothing_else(shop, tmp_path):
    ws, df, _ = shop
    full = score("lightgbm", tmp_path / "all.parquet", ScoreConfig(), workspace=ws, progress=False)
    scores = pd.read_parquet(full.out)
    # the key holder's ids: half of the shop's raw ids, and one id that is not a user
    raw_ids = sorted(df["user_id"].astype(str).unique())[::2]
    mapping = pseudonym_for(ws, raw_ids + ["not-a-user"])
    ids_file = tmp_path / "raw.csv"
    pd.DataFrame({"user_id": raw_ids + ["not-a-user"]}).to_csv(ids_file, index=False)
    res = score("lightgbm", tmp_path / "re.csv", ScoreConfig(reidentify=str(ids_file), min_users=1), workspace=ws,
                progress=False)
    got = pd.read_csv(res.out, dtype={"raw_user_id": str})
    assert got["user_id"].tolist() == scores["user_id"].tolist()
    expected = {p: r for r, p in mapping.items()}
    assert [None if pd.isna(r) else r for r in got["raw_user_id"]] == [expected.get(p) for p in got["user_id"]]
    assert res.reidentified == got["raw_user_id"].notna().sum() > 0
    assert "raw user ids" in describe(res)
    with pytest.raises(FileNotFoundError, match="--reidentify"):
        score("lightgbm", tmp_path / "x.csv", ScoreConfig(reidentify=str(tmp_path / "nope.csv")), workspace=ws,
              progress=False)
