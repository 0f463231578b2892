"""The estimator contract, checked for every model in the registry, plus sklearn's own checks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from purchase_intent.models import (
    MODELS,
    SEQUENCE_MODELS,
    Contributions,
    LightGBMModel,
    LogisticRegressionModel,
    NotEnoughData,
    check_min_data,
    load_model,
)

TABULAR_MODELS = [name for name in MODELS if name not in SEQUENCE_MODELS]
# One thread keeps LightGBM fast on small, busy CI machines (OpenMP spin-waits otherwise).
FAST = {"lightgbm": {"n_estimators": 30, "n_jobs": 1}}


def make_data(n=300, n_features=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_features))
    logit = 1.5 * X[:, 0] - X[:, 1] + 0.5 * X[:, 2] - 1.0
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    X[rng.random(X.shape) < 0.05] = np.nan  # missing values everywhere
    return X, y


def test_registry_names():
    assert set(MODELS) == {"logreg", "lightgbm", "transformer", "transformer_pt", "lightgbm_emb"}
    assert SEQUENCE_MODELS == {"transformer", "transformer_pt", "lightgbm_emb"}
    assert isinstance(MODELS["logreg"](C=0.5), LogisticRegressionModel)
    assert isinstance(MODELS["lightgbm"](num_leaves=7), LightGBMModel)
    with pytest.raises(ValueError, match="unknown model"):
        load_model("xgboost", "nowhere")


def test_transformer_builder():
    model = MODELS["transformer"]()
    for method in ("fit", "predict_proba", "contributions", "to_batch", "save"):
        assert callable(getattr(model, method)), method


@pytest.mark.parametrize("name", TABULAR_MODELS)
def test_contract(name, tmp_path):
    X, y = make_data()
    model = MODELS[name](random_state=0, **FAST.get(name, {}))
    params_before = model.get_params()
    assert model.fit(X[:200], y[:200], X_valid=X[200:], y_valid=y[200:]) is model
    assert model.get_params() == params_before  # fit never touches hyperparameters
    np.testing.assert_array_equal(model.classes_, [0, 1])
    proba = model.predict_proba(X)
    assert proba.shape == (len(X), 2)
    assert np.all((proba >= 0) & (proba <= 1))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert np.isfinite(proba).all()  # NaN inputs are handled
    assert set(np.unique(model.predict(X))) <= {0, 1}

    contrib = model.contributions(X)  # exact: n_steps changes nothing
    assert isinstance(contrib, Contributions) and contrib.events is None
    assert contrib.features.shape == (len(X), X.shape[1]) and contrib.base.shape == (len(X),)
    assert contrib.features.dtype == contrib.base.dtype == np.float64
    logit = np.log(proba[:, 1] / proba[:, 0])
    np.testing.assert_allclose(contrib.total(), logit, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(model.contributions(X, n_steps=2).features, contrib.features)

    model.save(tmp_path)
    loaded = load_model(name, tmp_path)
    np.testing.assert_array_equal(loaded.predict_proba(X), proba)
    assert loaded.get_params() == model.get_params()
    for path in tmp_path.iterdir():  # nothing pickled: every file is text
        path.read_text()

    again = MODELS[name](random_state=0, **FAST.get(name, {})).fit(X[:200], y[:200], X[200:], y[200:])
    np.testing.assert_array_equal(again.predict_proba(X), proba)


@pytest.mark.parametrize("name", TABULAR_MODELS)
def test_dataframe_feature_names_and_string_labels(name, tmp_path):
    X, y = make_data(n=200)
    df = pd.DataFrame(X, columns=["page views", "cart/adds", "price (eur)", "d", "e"])
    labels = np.where(y == 1, "buy", "no")
    model = MODELS[name](random_state=0, **FAST.get(name, {})).fit(df, labels)
    assert model.feature_names_ == list(df.columns)
    np.testing.assert_array_equal(model.classes_, ["buy", "no"])
    model.save(tmp_path)
    loaded = load_model(name, tmp_path)
    assert loaded.feature_names_ == list(df.columns)
    np.testing.assert_array_equal(loaded.predict_proba(df), model.predict_proba(df))
    with pytest.raises(ValueError, match="feature"):
        model.predict_proba(df.iloc[:, :3])


def test_logreg_matches_sigmoid_of_linear_model():
    X, y = make_data(n=400)
    model = LogisticRegressionModel(C=1.0).fit(X, y)
    Xi = np.where(np.isnan(X), np.nanmedian(X, axis=0), X)
    Z = (Xi - Xi.mean(axis=0)) / Xi.std(axis=0)
    expected = 1 / (1 + np.exp(-(Z @ model.coef_ + model.intercept_)))
    np.testing.assert_allclose(model.predict_proba(X)[:, 1], expected, rtol=1e-10)
    assert model.coef_[0] > 0 and model.coef_[1] < 0  # the signs of the simulated effects


def test_lightgbm_early_stopping_and_fixed_rounds():
    X, y = make_data(n=400)
    fixed = LightGBMModel(n_estimators=25, n_jobs=1, random_state=0).fit(X, y)
    assert fixed.best_iteration_ == 25
    stopped = LightGBMModel(n_estimators=500, early_stopping_rounds=5, learning_rate=0.3, n_jobs=1, random_state=0)
    stopped.fit(X[:300], y[:300], X_valid=X[300:], y_valid=y[300:])
    assert stopped.best_iteration_ < 500


def test_binary_only_and_one_class():
    X, _ = make_data(n=60)
    with pytest.raises(ValueError, match="one class"):
        LogisticRegressionModel().fit(X, np.zeros(60))
    with pytest.raises(ValueError, match="Only binary"):
        LightGBMModel(n_estimators=5, n_jobs=1).fit(X, np.arange(60) % 3)


def test_min_data_gate():
    assert check_min_data([1] * 100 + [0] * 150) == (100, 150)
    with pytest.raises(NotEnoughData, match=r"12 positives and 300 negatives.*--min-positives"):
        check_min_data([1] * 12 + [0] * 300)
    assert check_min_data([1] * 12 + [0] * 300, min_positives=10) == (12, 300)
    assert issubclass(NotEnoughData, ValueError)


# Both baselines pass every check with no expected failures: they are tagged binary-only
# (multi_class=False, so sklearn checks the "Only binary classification" error instead) and
# NaN-tolerant (allow_nan=True). save/load is outside sklearn's contract and tested above.
@parametrize_with_checks([LogisticRegressionModel(), LightGBMModel(n_estimators=20, n_jobs=1)])
def test_sklearn_compatible(estimator, check):
    check(estimator)
