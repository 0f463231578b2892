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
from .pretrained import EmbeddingLightGBMModel, PretrainedTransformerClassifier


def make_logreg(**params) -> LogisticRegressionModel:
    """Logistic regression P(B=1|x) = sigmoid(theta^T x) on imputed, standardised features."""
    return LogisticRegressionModel(**params)


def make_lightgbm(**params) -> LightGBMModel:
    """LightGBM gradient-boosted trees (needs the ``lgbm`` extra)."""
    return LightGBMModel(**params)


def make_transformer(**params) -> TransformerClassifier:
    """The behaviour-sequence Transformer classifier over event sequences and tabular features."""
    return TransformerClassifier(**params)


def make_transformer_pt(**params) -> PretrainedTransformerClassifier:
    """The Transformer fine-tuned from the encoder of ``purchase-intent pretrain`` (param ``encoder``)."""
    return PretrainedTransformerClassifier(**params)


def make_lightgbm_emb(**params) -> EmbeddingLightGBMModel:
    """LightGBM on the tabular features plus the pretrained encoder's embedding of each history."""
    return EmbeddingLightGBMModel(**params)


MODELS = {"logreg": make_logreg, "lightgbm": make_lightgbm, "transformer": make_transformer,
          "transformer_pt": make_transformer_pt, "lightgbm_emb": make_lightgbm_emb}
SEQUENCE_MODELS = {"transformer", "transformer_pt", "lightgbm_emb"}
PRETRAINED_MODELS = {"transformer_pt", "lightgbm_emb"}  # their param ``encoder``: <workspace>/runs/pretrained
# models that train with user-level DP-SGD under ``dp_epsilon`` (purchase_intent/dp.py), and why the others refuse
DP_MODELS = ("logreg", "transformer")
DP_REFUSED = {
    "lightgbm": "no well-kept library offers differentially private gradient boosting",
    "lightgbm_emb": "no well-kept library offers differentially private gradient boosting",
    "transformer_pt": "fine-tuning from the pretrained encoder has no DP mode (the encoder itself can be: "
                      "pretrain --param dp_epsilon=E; the fine-tuned model is then still not DP)",
}


def load_model(name: str, directory):
    """Load a saved model of registry name ``name`` from ``directory`` (never unpickles)."""
    if name == "logreg":
        return LogisticRegressionModel.load(directory)
    if name == "lightgbm":
        return LightGBMModel.load(directory)
    if name == "transformer":
        return TransformerClassifier.load(directory)
    if name == "transformer_pt":
        return PretrainedTransformerClassifier.load(directory)
    if name == "lightgbm_emb":
        return EmbeddingLightGBMModel.load(directory)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


ONNX_MODELS = {"transformer": TransformerClassifier, "transformer_pt": PretrainedTransformerClassifier}


def load_onnx_model(name: str, config: dict, graph: bytes, n_threads: int | None = None):
    """A saved model of registry name ``name`` (one of ``ONNX_MODELS``) that scores with its ONNX graph
    only: its config.json (parsed) and the bytes of its model.onnx, no PyTorch weights."""
    if name not in ONNX_MODELS:
        raise ValueError(f"model {name!r} has no ONNX graph; these do: {', '.join(ONNX_MODELS)}")
    return ONNX_MODELS[name].load_onnx(config, graph, n_threads=n_threads)


__all__ = [
    "Contributions",
    "DP_MODELS",
    "DP_REFUSED",
    "EmbeddingLightGBMModel",
    "PRETRAINED_MODELS",
    "PretrainedTransformerClassifier",
    "MODELS",
    "SEQUENCE_MODELS",
    "LightGBMModel",
    "LogisticRegressionModel",
    "NotEnoughData",
    "ONNX_MODELS",
    "TransformerClassifier",
    "check_min_data",
    "load_model",
    "load_onnx_model",
    "make_lightgbm",
    "make_logreg",
    "make_lightgbm_emb",
    "make_transformer",
    "make_transformer_pt",
]
