"""Reasons per prediction: additivity, sentences, the CLI, and integrated gradients for the Transformer."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from purchase_intent import explain, pipeline, runs
from purchase_intent.config import DataConfig, FeatureConfig, LabelConfig, TrainConfig
from purchase_intent.models.attribution import integrated_gradients
from purchase_intent.models.transformer import BehaviourTransformer, preset
from purchase_intent.sequences import SEQUENCE_FIELDS
from purchase_intent.workspace import as_workspace


def make_workspace(root: Path, models=("logreg", "lightgbm"), n_users: int = 300, days: int = 42,
                   params: dict | None = None) -> Path:
    """A small simulated shop, ingested, built, trained and evaluated (tiny models, fast)."""
    from purchase_intent.simulate import SimConfig, write_events

    root.mkdir(parents=True, exist_ok=True)
    write_events(SimConfig(n_users=n_users, days=days, seed=3), root / "shop.csv")
    pipeline.ingest(root / "shop.csv", DataConfig(format="csv"), root, progress=False)
    pipeline.build(LabelConfig(lookback="14d", horizon="7d", step="7d"), FeatureConfig(), root, quiet=True)
    defaults = {"lightgbm": {"n_estimators": 30}}
    defaults.update(params or {})
    for m in models:
        pipeline.train(m, params=defaults.get(m), train_cfg=TrainConfig(min_positives=1, min_negatives=1),
                       workspace=root, quiet=True)
        pipeline.evaluate(m, root, n_boot=20, quiet=True)
    return root


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("explain") / "ws")


def _test_inputs(ws: Path, run: str, n: int = 50):
    loaded = runs.load_run(run, ws)
    built = runs.load_built(ws)
    idx = np.flatnonzero(built.mask("test"))[:n]
    return loaded.meta, loaded.model, runs.model_inputs(loaded.meta["model"], built, idx, as_workspace(ws), None)


@pytest.mark.parametrize("run", ["logreg", "lightgbm"])
def test_baseline_contributions_add_up_to_the_logit(ws, run):
    meta, model, X = _test_inputs(ws, run)
    attr = explain.attribute(meta, model, X)
    p = model.predict_proba(X)[:, 1]
    np.testing.assert_allclose(attr.total(), np.log(p / (1 - p)), atol=1e-6)
    assert attr.features.shape == (len(X), len(meta["feature_names"]))


@pytest.mark.parametrize("run", ["logreg", "lightgbm"])
def test_reasons_format_and_order(ws, run):
    meta, model, X = _test_inputs(ws, run, n=10)
    rs = explain.explain_inputs(meta, model, X, top=4)
    assert len(rs) == len(X)
    for row in rs:
        assert 1 <= len(row) <= 4
        sizes = [abs(r["contribution"]) for r in row]
        assert sizes == sorted(sizes, reverse=True)
        for r in row:
            assert r["feature"] in meta["feature_names"]
            assert isinstance(r["text"], str) and r["text"] and "_" not in r["text"]
            assert math.isfinite(r["contribution"])


def test_logreg_reasons_are_coef_times_standardised_value(ws):
    meta, model, X = _test_inputs(ws, "logreg", n=1)
    r = explain.explain_inputs(meta, model, X, top=1)[0][0]
    j = meta["feature_names"].index(r["feature"])
    x = X.to_numpy(dtype=float)[0, j]
    x = model.medians_[j] if np.isnan(x) else x
    assert r["contribution"] == pytest.approx(model.coef_[j] * (x - model.mean_[j]) / model.scale_[j])


@pytest.mark.parametrize("name, value, text", [
    ("n_cart_1d", 2, "added 2 items to the cart in the last 24 hours"),
    ("n_cart_7d", 1, "added 1 item to the cart in the last 7 days"),
    ("n_view_28d", 12, "viewed products 12 times in the last 28 days"),
    ("n_purchase_all", 0, "made no purchase in total"),
    ("hours_since_last_cart", 5.2, "last added an item to the cart 5 hours ago"),
    ("hours_since_last_purchase", float("nan"), "has never bought anything"),
    ("hours_since_last_event", 50, "was last active 2 days ago"),
    ("share_evening", 0.25, "does 25% of their browsing in the evening (18-24)"),
    ("cart_to_purchase", float("nan"), "has never added an item to the cart"),
    ("ses_n_cart", 3, "added 3 items to the cart in this session so far"),
])
def test_sentences(name, value, text):
    assert explain.feature_text(name, value) == text


def test_every_feature_has_a_sentence_without_raw_names():
    from purchase_intent.features import FEATURES

    for name in FEATURES:
        for value in (0.0, 1.0, 3.5, float("nan")):
            text = explain.feature_text(name, value)
            assert text and name not in text, (name, value, text)


def test_explain_user_cli(ws, capsys):
    from purchase_intent.workspace import Workspace

    con = Workspace(ws).connect()
    uid = con.execute("SELECT user_id FROM events WHERE event = 'cart' ORDER BY ts DESC LIMIT 1").fetchone()[0]
    cutoff = pd.Timestamp(con.execute("SELECT max(ts) FROM events").fetchone()[0]) + pd.Timedelta("1us")
    e = explain.explain_user("lightgbm", uid, workspace=ws, top=3)
    assert e["user_id"] == uid and pd.Timestamp(e["at"]) == cutoff
    assert len(e["reasons"]) == 3 and 0 < e["probability"] < 1 and e["active"] is True
    late = explain.explain_user("logreg", uid, at=str(cutoff + pd.Timedelta(days=400)), workspace=ws)
    assert late["active"] is False  # no event in the lookback: batch scores leave the user out
    assert "batch scores (`score`) leave the user out" in explain.format_explanation(late)
    assert e["logit"] == pytest.approx(math.log(e["probability"] / (1 - e["probability"])), abs=1e-6)
    # the same user a week earlier sees fewer events, so the reasons may differ but still add up
    earlier = explain.explain_user("logreg", uid, at=str(cutoff - pd.Timedelta(days=7)), workspace=ws)
    assert pd.Timestamp(earlier["at"]) == cutoff - pd.Timedelta(days=7)

    from purchase_intent import cli

    assert cli.main(["--workspace", str(ws), "explain", "--run", "logreg", "--user", uid, "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "probability of buying" in out and len(out.strip().splitlines()) == 4
    with pytest.raises(ValueError, match="no events"):
        explain.explain_user("logreg", "nobody-at-all", workspace=ws)
    with pytest.raises(ValueError, match="has no event before 2000-01-01"):  # as score, which refuses then
        explain.explain_user("logreg", uid, at="2000-01-01", workspace=ws)
    # the report shows a pseudonym's first 12 characters: they name the user too
    assert explain.explain_user("logreg", uid[:12], workspace=ws)["user_id"] == uid


def test_global_importance_is_mean_absolute_contribution(ws):
    meta, model, X = _test_inputs(ws, "lightgbm")
    attr = explain.attribute(meta, model, X)
    imp = explain.global_importance(attr)
    assert list(imp["mean_abs"]) == sorted(imp["mean_abs"], reverse=True)
    top = imp.iloc[0]
    j = meta["feature_names"].index(top["name"])
    assert top["mean_abs"] == pytest.approx(np.abs(attr.features[:, j]).mean())


# ---------------------------------------------------------------------------------------------
# integrated gradients on the Transformer module (a stand-in estimator around an untrained net)
class _TinySequenceModel:
    """Estimator-shaped wrapper around an untrained net: to_batch + contributions + predict_proba,
    like the Transformer classifier."""

    def __init__(self, n_tabular: int, vocab):
        torch.manual_seed(0)
        self.vocab_ = vocab
        self.net = BehaviourTransformer(preset("tiny", field_sizes=vocab.field_sizes(), n_tabular=n_tabular,
                                               max_seq_len=vocab.cfg.max_seq_len, dropout=0.0)).eval()

    def to_batch(self, X):
        b = {f: torch.as_tensor(np.asarray(X[f], dtype=np.int64)) for f in SEQUENCE_FIELDS}
        b["mask"] = torch.as_tensor(np.asarray(X["mask"], dtype=bool))
        b["tabular"] = torch.as_tensor(np.nan_to_num(np.log1p(np.abs(X["tabular"]))), dtype=torch.float32)
        return b

    def contributions(self, X, *, n_steps=32):
        return integrated_gradients(self.net, self.to_batch(X), X, n_steps=n_steps)

    def predict_proba(self, X):
        with torch.no_grad():
            logits, _ = self.net(self.to_batch(X))
        p = torch.sigmoid(logits).double().numpy()
        return np.column_stack([1 - p, p])


@pytest.fixture(scope="module")
def seq_case(ws):
    from purchase_intent.sequences import SequenceConfig, build_sequences, fit_vocab
    from purchase_intent.workspace import Workspace

    built = runs.load_built(ws)
    idx = np.flatnonzero(built.mask("test"))[:8]
    con = Workspace(ws).connect()
    ex = built.examples.iloc[idx][["user_id", "cutoff"]].reset_index(drop=True)
    ex["example_id"] = np.arange(len(ex))
    con.register("seq_examples", ex)
    vocab = fit_vocab(con, "seq_examples", SequenceConfig(max_seq_len=32, item_buckets=100, category_buckets=20))
    X = dict(build_sequences(con, "seq_examples", vocab=vocab))
    X["tabular"] = built.features.iloc[idx].to_numpy(np.float32)
    model = _TinySequenceModel(X["tabular"].shape[1], vocab)
    meta = {"model": "transformer", "feature_names": list(built.features.columns)}
    return meta, model, X, con, ex


def test_integrated_gradients_add_up_and_name_events(seq_case):
    meta, model, X, con, ex = seq_case
    attr = explain.attribute(meta, model, X, ig_steps=48)
    p = model.predict_proba(X)[:, 1]
    np.testing.assert_allclose(attr.total(), np.log(p / (1 - p)), atol=2e-3)  # integral error only
    assert attr.events.shape == X["mask"].shape
    assert np.all(attr.events[~X["mask"]] == 0)  # padding gets nothing
    events = explain.sequence_events(con, ex, X["mask"].shape[1])
    assert [len(e) for e in events] == list(X["mask"].sum(axis=1))
    rs = explain.reasons(attr, X, top=40, events=events)
    ev = [(i, r) for i, row in enumerate(rs) for r in row if r.get("group") == "event"]
    assert ev and all(r["text"].endswith("ago") for _, r in ev)
    T = X["mask"].shape[1]
    for i, r in ev:  # the raw event named in a reason is the token at that position of the sequence
        assert X["event"][i, T - 1 - r["recency_rank"]] == explain.EVENT_CODES[r["event"]]
        assert pd.Timestamp(r["ts"]) < ex["cutoff"].iloc[i]
    imp = explain.global_importance(attr)
    assert (imp["kind"] == "event type").any()
    by_time = explain.attribution_by_time(attr, events)
    assert sum(b["n_events"] for b in by_time) == int(X["mask"].sum())


def test_remove_events_repacks_to_the_right():
    mask = np.array([[False, True, True, True]])
    X = {"event": np.array([[0, 1, 2, 5]]), "mask": mask, "tabular": np.ones((1, 4))}
    out = explain.remove_events(X, np.array([[False, False, True, False]]))
    assert out["event"].tolist() == [[0, 0, 1, 5]] and out["mask"].tolist() == [[False, False, True, True]]
    assert out["tabular"] is X["tabular"]


def test_faithfulness_curve_shape(seq_case):
    meta, model, X, *_ = seq_case
    attr = explain.attribute(meta, model, X, ig_steps=16)
    f = explain.faithfulness(model, X, attr, ks=(1, 2))
    assert f["k"] == [1, 2] and len(f["top"]) == len(f["random"]) == 2
    assert np.all(np.isfinite(f["top"])) and np.all(np.isfinite(f["random"]))


class _AdditiveEventModel:
    """Log-odds = the sum of a fixed weight per event type over the real events: exact attributions."""

    weights = np.array([0.0, 0.1, 2.0, -0.5, 0.7, 1.3, 0.05, 0.3])

    def decision_function(self, X):
        return (self.weights[np.asarray(X["event"])] * np.asarray(X["mask"])).sum(axis=1)


def test_faithfulness_ranks_removals_by_attribution():
    # an untrained net moves its score by ~1e-4 per event, too little to rank; an additive model
    # whose attributions are exact gives a drop we can state: the top event's weight, per example
    rng = np.random.default_rng(3)
    n, T = 40, 12
    event = rng.integers(1, 8, size=(n, T))
    mask = np.arange(T)[None, :] >= rng.integers(0, T - 3, size=n)[:, None]
    X = {"event": event, "mask": mask, "tabular": np.zeros((n, 2))}
    model = _AdditiveEventModel()
    contrib = model.weights[event] * mask
    attr = explain.Attribution(feature_names=["a", "b"], features=np.zeros((n, 2)), base=np.zeros(n),
                               events=contrib)
    f = explain.faithfulness(model, X, attr, ks=(1, 3))
    assert f["top"][0] == pytest.approx(np.where(mask, contrib, -np.inf).max(axis=1).mean())
    top3 = np.sort(np.where(mask, contrib, -np.inf), axis=1)[:, -3:].sum(axis=1)
    assert f["top"][1] == pytest.approx(top3.mean())
    assert f["top"][0] > f["random"][0] + 0.5 and f["top"][1] > f["random"][1] + 1.0
    # ranking by the opposite of the attribution gives a curve below the random one
    g = explain.faithfulness(model, X, explain.Attribution(["a", "b"], np.zeros((n, 2)), np.zeros(n),
                                                           events=-contrib), ks=(1,))
    assert g["top"][0] < f["random"][0]
