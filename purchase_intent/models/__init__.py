"""Model registry: a visible dict of builder functions, one per model name.

Builders are plain functions taking keyword hyperparameters and returning an unfitted estimator
that follows the shared contract: ``fit(X, y, X_valid=None, y_valid=None) -> self``,
``predict_proba(X) -> (n, 2)``, ``contributions(X, *, n_steps=32) -> Contributions`` (additive
log-odds terms for explanations), ``save(directory)``, classmethod ``load(directory)``.
Tabular models take a 2-D feature matrix; models in ``SEQUENCE_MODELS`` take event sequences.
"""
from __future__ import annotations

from .attribution import Contributions
from .baselines import LightGBMModel, LogisticRegressionModel, NotEnoughData, check_min_data
from .classifier import TransformerClassifier


def make_logreg(**params) -> LogisticRegressionModel:
    """Logistic regression P(B=1|x) = sigmoid(theta^T x) on imputed, standardised features."""
    return LogisticRegressionModel(**params)


def make_lightgbm(**params) -> LightGBMModel:
    """LightGBM gradient-boosted trees (needs the ``lgbm`` extra)."""
    return LightGBMModel(**params)


def make_transformer(**params) -> TransformerClassifier:
    """The behaviour-sequence Transformer classifier over event sequences and tabular features."""
    return TransformerClassifier(**params)


MODELS = {"logreg": make_logreg, "lightgbm": make_lightgbm, "transformer": make_transformer}
SEQUENCE_MODELS = {"transformer"}


def load_model(name: str, directory):
    """Load a saved model of registry name ``name`` from ``directory`` (never unpickles)."""
    if name == "logreg":
        return LogisticRegressionModel.load(directory)
    if name == "lightgbm":
        return LightGBMModel.load(directory)
    if name == "transformer":
        return TransformerClassifier.load(directory)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


__all__ = [
    "Contributions",
    "MODELS",
    "SEQUENCE_MODELS",
    "LightGBMModel",
    "LogisticRegressionModel",
    "NotEnoughData",
    "TransformerClassifier",
    "check_min_data",
    "load_model",
    "make_lightgbm",
    "make_logreg",
    "make_transformer",
]
