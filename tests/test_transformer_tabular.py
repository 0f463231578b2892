"""The Transformer's tabular transform: train standardisation, or fixed public constants (a DP fit's),
and what a missing feature becomes (tabular_nan)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

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
