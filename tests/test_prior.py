"""The rolling-origin prior: `pretrain --objective future --rolling` and models with `prior=true`.

Each example is read by the encoder pretrained on the events before its own cutoff: the tests prove
the choice of encoder, that the value depends on no event at or after the example's cutoff (and,
as the converse, that it does on events before it), and the user's whole path through the CLI.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import add_events_at, copy_workspace, csv_workspace

from purchase_intent import pipeline
from purchase_intent.config import DataConfig
from purchase_intent.models.prior import PRIOR_FEATURE, ROLLING_DIR, RollingPrior, to_us
from purchase_intent.pretrain import PretrainConfig, evaluation_cutoff, pretrain
from purchase_intent.runs import load_built, load_run, model_inputs
from purchase_intent.sequences import CUTOFF_KEY, SequenceVocab
from purchase_intent.simulate import SimConfig, write_events
from purchase_intent.workspace import Workspace

ROLLING = dict(objective="future", preset="tiny", max_seq_len=20, epochs=1, batch_size=64, seed=0, rolling=True)


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shop") / "shop.csv.gz"
    write_events(SimConfig(n_users=400, days=42, seed=7), path)
    return path


@pytest.fixture(scope="module")
def ws(shop, tmp_path_factory) -> Workspace:
    return csv_workspace(tmp_path_factory.mktemp("ws"), shop)


@pytest.fixture(scope="module")
def encoder(ws) -> Path:
    return pretrain(ws, PretrainConfig(**ROLLING))


def test_one_encoder_per_cutoff_and_one_on_every_event(ws, encoder):
    cfg = json.loads((encoder / "config.json").read_text())
    built = load_built(ws)
    ex_cuts = sorted(pd.Timestamp(c) for c in pd.unique(built.examples["cutoff"]))
    end = pd.Timestamp(ws.connect().execute("SELECT max(ts) FROM events").fetchone()[0]) + pd.Timedelta(1, "us")
    got = [pd.Timestamp(r["cutoff"]) for r in cfg["rolling"]]
    assert got == sorted(set(ex_cuts) | {pd.Timestamp(cfg["cutoff"]), end})
    prior = RollingPrior.load(encoder)
    assert len(prior.nets) == len(got) and prior.cutoffs_us.tolist() == [to_us(c.to_pydatetime()) for c in got]
    for folder, c in zip(prior.folders, got):  # each folder: an encoder, its cutoff, its head
        meta = json.loads((folder / "config.json").read_text())
        assert pd.Timestamp(meta["cutoff"]) == c and (folder / "future_head.safetensors").exists()
        assert meta["vocab"] == cfg["vocab"]  # one vocabulary: the tokens mean the same to every encoder
    # the vocabulary was fitted on the events before the earliest cutoff only
    con = ws.connect()
    con.execute("CREATE TEMP TABLE early AS SELECT 0::BIGINT AS example_id, user_id, ?::TIMESTAMP AS cutoff "
                "FROM (SELECT DISTINCT user_id FROM events WHERE ts < ?)", [got[0], got[0]])
    from purchase_intent.sequences import SequenceConfig, fit_vocab
    assert fit_vocab(con, "early", SequenceConfig(max_seq_len=20)).to_dict() == cfg["vocab"]


def test_each_example_is_read_by_the_latest_encoder_at_or_before_its_cutoff(encoder):
    prior = RollingPrior.load(encoder)
    c = prior.cutoffs_us
    which = prior.encoder_index(np.array([c[0] - 1, c[0], c[1] - 1, c[1], c[-1] + 10**9]))
    assert which.tolist() == [-1, 0, 0, 1, len(c) - 1]


def test_no_encoder_before_the_cutoff_or_no_event_gives_nan(ws, encoder):
    prior = RollingPrior.load(encoder)
    vocab = SequenceVocab.from_dict(json.loads((encoder / "config.json").read_text())["vocab"])
    X = model_inputs("lightgbm_emb", load_built(ws), np.arange(6), ws, vocab)
    X["mask"] = X["mask"].copy()
    X["mask"][0] = False  # no event
    X[CUTOFF_KEY] = X[CUTOFF_KEY].copy()
    X[CUTOFF_KEY][1] = prior.cutoffs_us[0] - 1  # before every encoder
    got = prior.logodds(X)
    assert np.isnan(got[:2]).all() and np.isfinite(got[2:][X["mask"][2:].any(axis=1)]).all()


def test_the_prior_reads_no_event_at_or_after_the_cutoff_and_does_read_those_before(ws, shop, tmp_path):
    """Leakage: events added at and after the first test cutoff leave the prior of every example up to
    it unchanged (same seeds, same events before each encoder's cutoff). Converse: events added two
    days before the second cutoff change the prior of the examples from that cutoff on, and not of
    those at the first."""
    ex = load_built(ws).examples
    t_test = pd.Timestamp(evaluation_cutoff(ws))
    cuts = sorted(pd.Timestamp(c) for c in pd.unique(ex["cutoff"]))
    idx = np.flatnonzero(ex["cutoff"].to_numpy() <= t_test.to_datetime64())
    first = ex["cutoff"].to_numpy()[idx] == cuts[0].to_datetime64()

    def prior_of(w: Workspace) -> np.ndarray:
        out = pretrain(w, PretrainConfig(**ROLLING), cutoff=t_test.to_pydatetime())
        vocab = SequenceVocab.from_dict(json.loads((out / "config.json").read_text())["vocab"])
        X = model_inputs("lightgbm_emb", load_built(w), idx, w, vocab)
        assert X[CUTOFF_KEY].tolist() == [to_us(c) for c in ex["cutoff"].iloc[idx]]
        return RollingPrior.load(out).logodds(X)

    base = prior_of(copy_workspace(ws, tmp_path / "base"))
    assert np.isfinite(base).mean() > 0.5
    after = copy_workspace(ws, tmp_path / "after")
    add_events_at(after, shop, t_test, "at")
    add_events_at(after, shop, t_test + pd.Timedelta(days=3), "later")
    np.testing.assert_array_equal(prior_of(after), base)
    before = copy_workspace(ws, tmp_path / "before")
    add_events_at(before, shop, cuts[1] - pd.Timedelta(days=2), "early")
    got = prior_of(before)
    np.testing.assert_array_equal(got[first], base[first])
    assert not np.allclose(got[~first], base[~first], equal_nan=True)


def test_rolling_needs_the_future_objective_and_built_examples(ws, shop, tmp_path):
    with pytest.raises(ValueError, match="--objective future"):
        pretrain(ws, PretrainConfig(**{**ROLLING, "objective": "masked"}))
    with pytest.raises(ValueError, match="no DP pretraining for the objective 'future'"):
        pretrain(ws, PretrainConfig(**ROLLING, dp_epsilon=8.0))
    w = Workspace(tmp_path / "unbuilt")
    pipeline.ingest(shop, DataConfig(format="csv"), w, progress=False)
    with pytest.raises(ValueError, match="run `purchase-intent build` first"):
        pretrain(w, PretrainConfig(**ROLLING))


PRIOR_MODELS = {"lightgbm_emb": ["--param", "embedding=false", "--param", "n_estimators=30"],
                "transformer_pt": ["--param", "max_epochs=1", "--param", "batch_size=256"],
                "transformer": ["--param", "max_epochs=1", "--param", "batch_size=256"]}


@pytest.mark.parametrize("model", list(PRIOR_MODELS))
def test_cli_rolling_pretrain_then_a_prior_model_trains_evaluates_scores_explains_and_serves(ws, shop, tmp_path,
                                                                                             capsys, model):
    """The user's path: `pretrain --objective future --rolling`, `train --model M --param prior=true`,
    `evaluate --backtest 1`, `score --reasons`, `explain`, `report`, and the API's score equal to the batch's."""
    from fastapi.testclient import TestClient

    from purchase_intent.cli import main
    from purchase_intent.privacy import load_key, pseudonymise
    from purchase_intent.serve.app import create_app
    from purchase_intent.serve.settings import ServeSettings

    w = copy_workspace(ws, tmp_path / "ws")
    root = str(w.root)
    assert main(["pretrain", "--workspace", root, "--objective", "future", "--rolling", "--preset", "tiny",
                 "--max-seq-len", "20", "--epochs", "1"]) == 0
    assert main(["train", "--workspace", root, "--model", model, "--run", "prior", "--param", "prior=true",
                 *PRIOR_MODELS[model], "--min-positives", "5", "--min-negatives", "5"]) == 0
    run = load_run("prior", w)
    assert run.model.extra_names_ == [PRIOR_FEATURE]
    assert run.meta["prior"]["cutoffs"] == run.model.prior_.cutoffs() and run.meta["prior"]["feature"] == PRIOR_FEATURE
    # the run reads the prior from its own copy of the rolling encoders
    X = model_inputs(model, load_built(w), np.arange(50), w, run.vocab)
    assert np.isfinite(run.model.prior_.logodds(X)).any()
    assert len(list((w.run_dir("prior") / "model" / "encoder" / ROLLING_DIR).iterdir())) == len(run.model.prior_.nets)
    assert main(["evaluate", "--workspace", root, "--run", "prior", "--backtest", "1", "--n-boot", "50"]) == 0
    capsys.readouterr()
    assert main(["score", "--workspace", root, "--run", "prior", "--reasons", "3", "--quiet"]) == 0
    scores = pd.read_parquet(re.findall(r"wrote (\S+)", capsys.readouterr().out)[0])
    assert scores["probability"].between(0, 1).all()
    user = scores.sort_values("probability").iloc[-1]
    assert main(["explain", "--workspace", root, "--run", "prior", "--user", user["user_id"], "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["reasons"]
    assert main(["report", "--workspace", root, "--run", "prior"]) == 0
    # the API computes the prior from the request's events, with the run's copy of the encoders
    raw_log = pd.read_csv(shop)
    raw_log["ts"] = pd.to_datetime(raw_log["ts"], unit="ms")
    raw = sorted(raw_log["user_id"].astype(str).unique())
    pid = dict(zip(raw, pseudonymise(raw, load_key(w.root))))
    scored = scores.set_index("user_id")
    users = [r for r in raw if pid[r] in scored.index][:3]
    at = pd.Timestamp(scored["cutoff"].iloc[0]).isoformat() + "Z"
    key = "test-key-0123456789"
    with TestClient(create_app(ServeSettings(workspace=root, run="prior", api_keys=(key,)))) as c:
        for r in users:
            ev = raw_log[raw_log["user_id"].astype(str) == r]
            events = [{"ts": t.isoformat() + "Z", "event": k, "item_id": str(i), "category": str(g), "price": p,
                       "session_id": str(s)} for t, k, i, g, p, s in
                      zip(ev["ts"], ev["event"], ev["item_id"], ev["category"], ev["price"], ev["session_id"])]
            got = c.post("/v1/score", json={"user_id": r, "at": at, "events": events},
                         headers={"Authorization": f"Bearer {key}"})
            assert got.status_code == 200, got.text
            assert abs(got.json()["probability"] - scored.loc[pid[r], "probability"]) < 1e-6


def test_bad_prior_settings_get_one_line(ws, tmp_path, capsys):
    from purchase_intent.cli import main
    w = copy_workspace(ws, tmp_path / "ws")
    root = str(w.root)
    assert main(["pretrain", "--workspace", root, "--preset", "tiny", "--max-seq-len", "20", "--epochs", "1"]) == 0
    capsys.readouterr()
    gates = ["--min-positives", "5", "--min-negatives", "5"]
    assert main(["train", "--workspace", root, "--model", "lightgbm_emb", "--param", "prior=true", *gates]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--rolling" in err
    for model, bad, says in (("lightgbm_emb", "prior=yes", "prior must be true or false"),
                             ("lightgbm_emb", "embedding=false", "needs prior=true"),
                             ("transformer_pt", "prior=1", "prior must be true or false"),
                             ("transformer", "prior=1", "prior must be true or false")):
        assert main(["train", "--workspace", root, "--model", model, "--param", bad]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    rc = main(["train", "--workspace", root, "--model", "transformer", "--param", "prior=true", "--param",
               "dp_epsilon=8"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "not differentially private" in err, err


def test_spark_scoring_refuses_a_prior_run_in_one_line():
    pytest.importorskip("pyspark")
    from types import SimpleNamespace

    from purchase_intent.spark_scoring import check_scorable
    run = SimpleNamespace(name="prior", members=[], model_name="transformer_pt", model=SimpleNamespace(prior=True))
    with pytest.raises(ValueError, match="--engine duckdb"):
        check_scorable(run)
    check_scorable(SimpleNamespace(name="pt", members=[], model_name="transformer_pt",
                                   model=SimpleNamespace(prior=False)))


def test_run_passes_pretrain_rolling_on_and_refuses_it_without_pretrain(tmp_path, capsys):
    from purchase_intent.cli import build_parser, main
    from purchase_intent.commands import _pretrain_cfg
    a = build_parser().parse_args(["run", "--pretrain", "--pretrain-objective", "future", "--pretrain-rolling"])
    cfg = _pretrain_cfg(a, "pretrain-", seed=0)
    assert cfg.rolling and cfg.objective == "future"
    assert not _pretrain_cfg(build_parser().parse_args(["run", "--pretrain"]), "pretrain-", seed=0).rolling
    rc = main(["--workspace", str(tmp_path / "ws"), "run", "--data", str(tmp_path / "none.csv"), "--pretrain-rolling"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "--pretrain-rolling" in err[0] and "add --pretrain" in err[0]
    assert not (tmp_path / "ws").exists()
