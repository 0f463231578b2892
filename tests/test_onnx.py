"""ONNX export and ONNX Runtime inference: parity with PyTorch, the runtime switch, fallbacks."""
from __future__ import annotations

import json
import pickle
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from purchase_intent.models import load_model, load_onnx_model  # noqa: E402
from purchase_intent.models import onnx_inference as ox  # noqa: E402
from purchase_intent.models.classifier import TransformerClassifier  # noqa: E402
from purchase_intent.models.transformer import BehaviourTransformer, preset  # noqa: E402

SIZES = {"event": 7, "item": 31, "category": 5, "hour": 25}
ATOL = 1e-5


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


@pytest.mark.parametrize("inputs", [(True, True), (True, False), (False, True)], ids=["both", "sequence", "tabular"])
def test_onnx_logits_and_probabilities_match_torch(inputs):
    torch.manual_seed(0)
    seq, tab = inputs
    model = BehaviourTransformer(preset("tiny", field_sizes=SIZES, n_tabular=5, max_seq_len=24,
                                        use_sequence=seq, use_tabular=tab)).eval()
    scorer = ox.OnnxScorer(ox.export_onnx(model), n_threads=2)
    assert scorer.input_names == ox.input_names(model)
    # batch sizes on both sides of the single-thread session; lengths 1 .. max_seq_len; each batch
    # has a full row, an empty row and padded rows in between (random_batch)
    for i, (B, T) in enumerate([(1, 1), (1, 24), (2, 5), (5, 13), (9, 24), (40, 17)]):
        batch = ox.random_batch(model, B, T, seed=i)
        with torch.no_grad():
            ref = model(batch)[0].numpy()
        got = scorer.logits(batch)
        assert got.shape == (B,) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)
        np.testing.assert_allclose(_sigmoid(got), _sigmoid(ref), rtol=0, atol=ATOL)


def test_seed_ensemble_exports_one_graph_of_the_mean_logit():
    from purchase_intent.models.transformer import SeedEnsemble

    torch.manual_seed(0)
    cfg = preset("tiny", field_sizes=SIZES, n_tabular=5, max_seq_len=24)
    members = [BehaviourTransformer(cfg).eval() for _ in range(3)]
    ens = SeedEnsemble(members).eval()
    data = ox.export_onnx(ens)
    assert ox.check_parity(ens, data) <= ATOL
    batch = ox.random_batch(ens, 7, 24, seed=5)
    with torch.no_grad():
        mean = torch.stack([m(batch)[0] for m in members]).mean(0).numpy()
    np.testing.assert_allclose(ox.OnnxScorer(data).logits(batch), mean, rtol=0, atol=ATOL)


def test_padding_tokens_do_not_change_onnx_logits():
    torch.manual_seed(1)
    model = BehaviourTransformer(preset("tiny", field_sizes=SIZES, n_tabular=5, max_seq_len=16)).eval()
    scorer = ox.OnnxScorer(ox.export_onnx(model))
    batch = ox.random_batch(model, 6, 16, seed=3)
    noisy = dict(batch)
    noisy["tokens"] = torch.where(batch["mask"][..., None], batch["tokens"], torch.ones_like(batch["tokens"]))
    np.testing.assert_allclose(scorer.logits(noisy), scorer.logits(batch), rtol=0, atol=ATOL)


def test_check_parity_rejects_a_graph_of_other_weights():
    torch.manual_seed(0)
    cfg = preset("tiny", field_sizes=SIZES, n_tabular=5, max_seq_len=8)
    a, b = BehaviourTransformer(cfg).eval(), BehaviourTransformer(cfg).eval()
    data = ox.export_onnx(a)
    assert ox.check_parity(a, data) < ATOL
    with pytest.raises(ValueError, match="differ"):
        ox.check_parity(b, data)


# ---------------------------------------------------------------------------------------------
# through the estimator: save writes model.onnx, load runs it
def _data(n, seed, T=12):
    rng = np.random.default_rng(seed)
    L = rng.integers(0, T + 1, size=n)
    mask = np.arange(T)[None, :] >= (T - L)[:, None]
    X = {"event": (rng.integers(1, 6, size=(n, T)) * mask).astype(np.uint8),
         "item": (rng.integers(1, 50, size=(n, T)) * mask).astype(np.int16), "mask": mask,
         "tabular": rng.normal(size=(n, 3)).astype(np.float32)}
    X["tabular"][rng.random(n) < 0.1, 0] = np.nan
    y = ((X["event"] == 2).sum(1) + rng.normal(size=n) > 2).astype(int)
    return X, y


def _rows(X, idx):
    return {k: v[idx] for k, v in X.items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny fitted classifier, saved; (directory, its predict_proba on X, X)."""
    X, y = _data(64, 0)
    Xv, yv = _data(32, 1)
    clf = TransformerClassifier(max_epochs=1, batch_size=32, random_state=0)
    clf.fit(X, y, X_valid=Xv, y_valid=yv)
    d = tmp_path_factory.mktemp("transformer") / "model"
    clf.save(d)
    return d, clf.predict_proba(X), X


class _Calls:
    """Counts OnnxScorer.logits calls (monkeypatched in)."""

    def __init__(self, monkeypatch):
        self.n, orig = 0, ox.OnnxScorer.logits

        def logits(scorer, batch):
            self.n += 1
            return orig(scorer, batch)

        monkeypatch.setattr(ox.OnnxScorer, "logits", logits)


def test_save_writes_onnx_and_loaded_model_matches_torch(saved, monkeypatch):
    d, p_fit, X = saved
    assert sorted(x.name for x in d.iterdir()) == ["config.json", "model.onnx", "model.safetensors"]
    meta = json.loads((d / "config.json").read_text())
    assert meta["onnx"]["sha256"] == ox.sha256((d / "model.onnx").read_bytes())
    calls = _Calls(monkeypatch)
    monkeypatch.setenv(ox.INFERENCE_ENV, "torch")
    torch_clf = load_model("transformer", d)
    monkeypatch.setenv(ox.INFERENCE_ENV, "onnx")
    onnx_clf = load_model("transformer", d)
    for idx in (np.arange(1), np.arange(3, 8), np.arange(64)):
        Xi = _rows(X, idx)
        monkeypatch.setenv(ox.INFERENCE_ENV, "torch")
        n0 = calls.n
        p_torch = torch_clf.predict_proba(Xi)
        assert calls.n == n0  # torch means torch
        monkeypatch.setenv(ox.INFERENCE_ENV, "onnx")
        p_onnx = onnx_clf.predict_proba(Xi)
        assert calls.n > n0
        np.testing.assert_allclose(p_onnx, p_torch, rtol=0, atol=ATOL)
        np.testing.assert_allclose(p_onnx, p_fit[idx], rtol=0, atol=ATOL)
        np.testing.assert_allclose(onnx_clf.decision_function(Xi), torch_clf.decision_function(Xi), rtol=0, atol=ATOL)


def test_refitting_a_loaded_model_drops_its_onnx_graph(saved, monkeypatch):
    d, _, X = saved
    monkeypatch.setenv(ox.INFERENCE_ENV, "onnx")
    clf = load_model("transformer", d)
    assert clf.onnx_path_ is not None
    X2, y2 = _data(64, 2)
    clf.set_params(random_state=1).fit(X2, y2, X_valid=_data(32, 3)[0], y_valid=_data(32, 3)[1])
    assert clf.onnx_path_ is None  # the refit weights are scored by PyTorch until saved again
    monkeypatch.setenv(ox.INFERENCE_ENV, "torch")
    p_torch = clf.predict_proba(_rows(X, np.arange(4)))
    monkeypatch.setenv(ox.INFERENCE_ENV, "onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "no usable model.onnx": PyTorch runs
        np.testing.assert_allclose(clf.predict_proba(_rows(X, np.arange(4))), p_torch, rtol=0, atol=ATOL)


def test_auto_uses_onnx_for_small_calls_and_torch_for_large(saved, monkeypatch):
    d, p_fit, X = saved
    monkeypatch.delenv(ox.INFERENCE_ENV, raising=False)
    clf = load_model("transformer", d)
    calls = _Calls(monkeypatch)
    small = np.arange(ox.AUTO_ONNX_MAX_ROWS)
    np.testing.assert_allclose(clf.predict_proba(_rows(X, small)), p_fit[small], rtol=0, atol=ATOL)
    assert calls.n == 1
    np.testing.assert_allclose(clf.predict_proba(X), p_fit, rtol=0, atol=ATOL)
    assert calls.n == 1


def test_torch_fallbacks(saved, monkeypatch, tmp_path):
    d, p_fit, X = saved
    one = _rows(X, np.arange(1))
    # onnxruntime missing: PyTorch, and a warning only when onnx was asked for
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setenv(ox.INFERENCE_ENV, "auto")
    clf = load_model("transformer", d)
    assert clf.onnx_path_ is None
    np.testing.assert_allclose(clf.predict_proba(one), p_fit[:1], rtol=0, atol=ATOL)
    monkeypatch.setenv(ox.INFERENCE_ENV, "onnx")
    counts = ox.fallback_counts()
    with pytest.warns(RuntimeWarning, match="running PyTorch"):
        np.testing.assert_allclose(clf.predict_proba(X), p_fit, rtol=0, atol=ATOL)
    # each fallback is counted by reason (the API shows them in /metrics), once per model
    assert ox.fallback_counts().get("no_graph", 0) == counts.get("no_graph", 0) + 1
    clf.predict_proba(X)
    assert ox.fallback_counts().get("no_graph", 0) == counts.get("no_graph", 0) + 1
    monkeypatch.delitem(sys.modules, "onnxruntime")
    monkeypatch.setenv(ox.INFERENCE_ENV, "auto")
    # a model.onnx that does not belong to these weights is ignored
    stale = tmp_path / "stale"
    stale.mkdir()
    for f in ("config.json", "model.safetensors"):
        (stale / f).write_bytes((d / f).read_bytes())
    (stale / "model.onnx").write_bytes(b"not this model")
    n_stale = ox.fallback_counts().get("stale_file", 0)
    with pytest.warns(RuntimeWarning, match="does not match"):
        clf = load_model("transformer", stale)
    assert clf.onnx_path_ is None and ox.fallback_counts().get("stale_file", 0) == n_stale + 1
    np.testing.assert_allclose(clf.predict_proba(one), p_fit[:1], rtol=0, atol=ATOL)
    # unknown switch value
    monkeypatch.setenv(ox.INFERENCE_ENV, "tensorrt")
    with pytest.raises(ValueError, match="PURCHASE_INTENT_INFERENCE"):
        clf.predict_proba(one)


def test_failed_export_warns_and_saves_a_torch_only_model(saved, monkeypatch, tmp_path):
    d, p_fit, X = saved
    clf = load_model("transformer", d)
    (tmp_path / "model.onnx").write_bytes(b"left over from an earlier save")

    def broken(model, exporter="torchscript"):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(ox, "export_onnx", broken)
    with pytest.warns(RuntimeWarning, match="ONNX export failed"):
        clf.save(tmp_path)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert "onnx" not in json.loads((tmp_path / "config.json").read_text())
    monkeypatch.setenv(ox.INFERENCE_ENV, "auto")
    loaded = load_model("transformer", tmp_path)
    assert loaded.onnx_path_ is None
    np.testing.assert_allclose(loaded.predict_proba(X), p_fit, rtol=0, atol=ATOL)


def test_loading_and_onnx_scoring_never_unpickle(saved, monkeypatch):
    d, p_fit, X = saved

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setenv(ox.INFERENCE_ENV, "onnx")
    clf = load_model("transformer", d)
    assert clf.onnx_path_ is not None
    np.testing.assert_allclose(clf.predict_proba(X), p_fit, rtol=0, atol=ATOL)


def test_a_model_from_its_config_and_graph_alone_scores_as_the_loaded_one(saved, monkeypatch):
    """``load_onnx_model`` (what Spark executors rebuild): config.json and model.onnx's bytes, no weights,
    the graph whatever PURCHASE_INTENT_INFERENCE says; the same probabilities as ``load_model``."""
    d, p_fit, X = saved
    config, graph = json.loads((d / "config.json").read_text()), (d / "model.onnx").read_bytes()
    monkeypatch.setenv(ox.INFERENCE_ENV, "onnx")
    want = load_model("transformer", d).predict_proba(X)
    monkeypatch.setenv(ox.INFERENCE_ENV, "torch")
    calls = _Calls(monkeypatch)
    clf = load_onnx_model("transformer", config, graph, n_threads=1)
    assert clf.model_ is None
    np.testing.assert_allclose(clf.predict_proba(X), want, rtol=0, atol=1e-7)  # the same graph, inputs, calibration
    assert calls.n > 0
    with pytest.raises(ValueError, match="does not match the saved weights"):
        load_onnx_model("transformer", config, graph + b"x")
    with pytest.raises(ValueError, match="records no model.onnx"):
        load_onnx_model("transformer", {k: v for k, v in config.items() if k != "onnx"}, graph)
    with pytest.raises(ValueError, match="has no ONNX graph"):
        load_onnx_model("lightgbm", config, graph)


@pytest.mark.slow
def test_dynamo_exporter_matches_torch():
    """The torch.export-based exporter (the fallback of the TorchScript one; about 10 s)."""
    torch.manual_seed(0)
    model = BehaviourTransformer(preset("tiny", field_sizes=SIZES, n_tabular=5, max_seq_len=16)).eval()
    assert ox.check_parity(model, ox.export_onnx(model, exporter="dynamo")) < ATOL
