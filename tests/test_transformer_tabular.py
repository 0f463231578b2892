"""The Transformer's tabular transform: train standardisation, or fixed public constants (a DP fit's),
and what a missing feature becomes (tabular_nan)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from purchase_intent import pipeline
from purchase_intent.models import onnx_inference as ox
from purchase_intent.models.classifier import TransformerClassifier


def _data(n: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = rng.exponential(50.0, size=(n, 3))
    t[::3, 1] = np.nan  # "hours since a purchase" of users who never bought
    y = (rng.random(n) < 0.3).astype(int)
    y[:2] = [0, 1]
    return {"tabular": t}, y


def _fit(**kw):
    torch.set_num_threads(1)
    X, y = _data()
    clf = TransformerClassifier(inputs="tabular", max_epochs=1, batch_size=32, random_state=0, **kw)
    return clf.fit(X, y, X_valid=X, y_valid=y), X


def test_fixed_scaling_uses_no_statistic_and_tabular_nan_marks_missing():
    clf, X = _fit(tabular_scaling="fixed", tabular_nan=-1.0)
    assert not clf.tab_mean_.any() and (clf.tab_scale_ == 1).all()
    got = clf.to_batch(X)["tabular"].numpy()
    t = X["tabular"]
    miss = np.isnan(t)
    np.testing.assert_allclose(got[~miss], np.log1p(t[~miss]), rtol=1e-5)
    assert (got[miss] == -1.0).all()
    # another data set gets the same transform: nothing was fitted on the data
    clf2, _ = _fit(tabular_scaling="fixed", tabular_nan=-1.0)
    X2, _ = _data(seed=1)
    np.testing.assert_array_equal(clf.to_batch(X2)["tabular"].numpy(), clf2.to_batch(X2)["tabular"].numpy())


def test_default_missing_is_the_train_mean():
    clf, X = _fit()
    got = clf.to_batch(X)["tabular"].numpy()
    assert (got[np.isnan(X["tabular"])] == 0.0).all()
    assert abs(float(np.nanmean(got[:, 0]))) < 1e-5  # standardised with the train mean


def test_a_bad_tabular_scaling_is_refused():
    with pytest.raises(ValueError, match="'train', 'fixed' or 'dp'"):
        _fit(tabular_scaling="minmax")


def test_tabular_bins_are_train_quantiles_encoded_piecewise_linearly(tmp_path, monkeypatch):
    """tabular_bins=K: each feature's edges are the quantiles of the train values the network reads (from a
    histogram: within one histogram bin), and the MLP reads 0 below a bin, 1 above it, linear inside."""
    clf, X = _fit(tabular_bins=4)
    t = clf.to_batch(X)["tabular"].numpy()
    edges = clf.model_.tab_edges.numpy()
    assert edges.shape == (3, 5)
    width = 2 * 10.0 / 4096  # TABULAR_BOUND, TABULAR_HISTOGRAM
    for f in range(3):
        q = np.quantile(t[:, f], np.linspace(0, 1, 5), method="inverted_cdf")
        np.testing.assert_allclose(edges[f], q, atol=width * 1.01)
    row = torch.as_tensor(t[:1])
    got = clf.model_._tabular_in(row).numpy()[0]
    lo, hi = edges[:, :-1], edges[:, 1:]
    want = np.clip((t[0][:, None] - lo) / np.maximum(hi - lo, 1e-6), 0, 1).ravel()
    np.testing.assert_allclose(got, np.concatenate([t[0], want]), rtol=1e-5, atol=1e-6)
    # saved and loaded with the run; the ONNX graph scores as PyTorch does
    clf.save(tmp_path)
    assert (tmp_path / "model.onnx").exists()
    loaded = TransformerClassifier.load(tmp_path)
    np.testing.assert_array_equal(loaded.model_.tab_edges.numpy(), edges)
    fitted = clf.predict_proba(X)
    for runtime in ("torch", "onnx"):
        monkeypatch.setenv(ox.INFERENCE_ENV, runtime)
        np.testing.assert_allclose(TransformerClassifier.load(tmp_path).predict_proba(X), fitted, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bins, match", [(-1, "from 0 to 64"), (2.5, "from 0 to 64"), (True, "from 0 to 64")])
def test_a_bad_tabular_bins_is_refused(bins, match):
    with pytest.raises(ValueError, match=match):
        _fit(tabular_bins=bins)
    with pytest.raises(ValueError, match=match):  # before any data is read
        pipeline.check_params("transformer", {"tabular_bins": bins})


def test_tabular_bins_with_dp_is_refused_before_any_data_is_read():
    with pytest.raises(ValueError, match="tabular_bins with dp_epsilon"):
        pipeline.check_params("transformer", {"tabular_bins": 8, "dp_epsilon": 8.0})
    pipeline.check_params("transformer_pt", {"tabular_bins": 8})
