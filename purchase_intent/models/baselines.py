"""The two tabular baselines: logistic regression P(B=1|X) = sigmoid(theta^T x) and LightGBM.

Both follow the sklearn estimator contract (``__init__`` stores parameters, ``fit`` returns
``self``, fitted state ends in ``_``, ``predict_proba`` returns (n, 2)) and are binary only.
Both save to a directory without pickle: the logistic model as one JSON file, LightGBM as its
own text model file plus a small JSON. ``contributions(X)`` splits the log-odds into exact
per-feature terms and a base (:class:`~purchase_intent.models.attribution.Contributions`).

Missing values: the logistic model imputes each feature's train median; LightGBM handles NaN
natively.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data

from .. import dp as dpmod
from .. import dp_tabular
from ..workspace import atomic_write_text
from .attribution import Contributions
from .settings import Setting, check_settings

LOGREG_FILE = "logreg.json"
LIGHTGBM_FILE = "lightgbm.txt"
LIGHTGBM_META = "lightgbm.json"



def _validated(est, X) -> np.ndarray:
    """X as a float64 array checked against the fitted feature names.

    A frame whose columns are exactly the fitted ones, all float64 and finite-or-NaN, is taken as
    it is: the full sklearn check costs ~2 ms, most of a one-user request's model time.
    """
    names = getattr(est, "feature_names_in_", None)
    if (isinstance(X, pd.DataFrame) and names is not None and len(X.columns) == len(names)
            and X.columns.tolist() == names.tolist() and set(X.dtypes) == {np.dtype(np.float64)}):
        a = X.to_numpy(np.float64)
        if not np.isinf(a).any():
            return a
    return validate_data(est, X, reset=False, dtype=np.float64, ensure_all_finite="allow-nan")

class NotEnoughData(ValueError):
    """Raised when the training data has too few positives or negatives to fit a model."""


def check_min_data(y, min_positives: int = 100, min_negatives: int = 100, what: str = "train") -> tuple[int, int]:
    """Refuse to train on too few examples of either class.

    Parameters
    ----------
    y : array-like of shape (n,)
        Labels, 0/1 (or booleans).
    min_positives, min_negatives : int
        The gate; ``TrainConfig.min_positives`` / ``min_negatives``.
    what : str
        Name of the data set in the message.

    Returns
    -------
    (positives, negatives) : tuple of int

    Raises
    ------
    NotEnoughData
        With the counts and the flags that change the gate.
    """
    y = np.asarray(y).astype(np.int64).ravel()
    positives, negatives = int((y == 1).sum()), int((y == 0).sum())
    if positives < min_positives or negatives < min_negatives:
        raise NotEnoughData(
            f"not enough data in {what}: {positives} positives and {negatives} negatives, but at least "
            f"{min_positives} positives and {min_negatives} negatives are required. Use more data (a longer "
            f"period, more cutoffs) or lower the gate with --min-positives / --min-negatives."
        )
    return positives, negatives


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def _validate_fit(est, X, y) -> tuple[np.ndarray, np.ndarray]:
    """Check X/y, set classes_, n_features_in_, feature_names_; return float X and 0/1 y."""
    X, y = validate_data(est, X, y, dtype=np.float64, ensure_all_finite="allow-nan")
    return X, _fit_target(est, X.shape[1], y)


def is_row_source(X) -> bool:
    """X is rows left on disk (``runs.FeatureSubset``): named columns, ``len``, int and slice access
    to float64 rows, and a ``batch_size``."""
    return (not isinstance(X, (pd.DataFrame, np.ndarray)) and hasattr(X, "columns") and hasattr(X, "batch_size")
            and hasattr(X, "__getitem__") and hasattr(X, "__len__"))


def _validate_fit_rows(est, X, y) -> np.ndarray:
    """:func:`_validate_fit` for a row source: names from its columns, rows checked as they are read."""
    y = np.asarray(y).ravel()
    if len(y) != len(X):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)} labels")
    if len(X) == 0:
        raise ValueError("Found array with 0 sample(s) while a minimum of 1 is required.")
    est.feature_names_in_ = np.asarray([str(c) for c in X.columns], dtype=object)
    return _fit_target(est, len(X.columns), y)


def _fit_target(est, n_features: int, y) -> np.ndarray:
    est.n_features_in_ = n_features
    check_classification_targets(y)
    y_type = type_of_target(y, input_name="y", raise_unknown=True)
    if y_type != "binary":
        raise ValueError(f"Only binary classification is supported. The type of the target is {y_type}.")
    classes, y01 = np.unique(y, return_inverse=True)
    if classes.size != 2:
        raise ValueError(f"{type(est).__name__} needs both classes in y; got one class: {classes.tolist()}")
    est.classes_ = classes
    names = getattr(est, "feature_names_in_", None)
    est.feature_names_ = [str(c) for c in names] if names is not None else [f"x{i}" for i in range(n_features)]
    return y01.astype(np.int64)


def _encode_valid(est, X_valid, y_valid) -> tuple[np.ndarray, np.ndarray]:
    X_valid = validate_data(est, X_valid, reset=False, dtype=np.float64, ensure_all_finite="allow-nan")
    y_valid = np.asarray(y_valid).ravel()
    if not np.isin(y_valid, est.classes_).all():
        raise ValueError(f"y_valid has labels that are not in y: {np.setdiff1d(y_valid, est.classes_)[:5].tolist()}")
    return X_valid, np.searchsorted(est.classes_, y_valid).astype(np.int64)


def _state_common(est) -> dict:
    params = est.get_params()
    if not (params["random_state"] is None or isinstance(params["random_state"], (int, np.integer))):
        params["random_state"] = None  # a RandomState object is not JSON; the fitted state is saved anyway
    return {
        "params": {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()},
        "classes": est.classes_.tolist(),
        "feature_names": est.feature_names_,
        "feature_names_in": hasattr(est, "feature_names_in_"),
        "n_features_in": int(est.n_features_in_),
    }


def _restore_common(est, state: dict) -> None:
    est.classes_ = np.asarray(state["classes"])
    est.feature_names_ = list(state["feature_names"])
    est.n_features_in_ = int(state["n_features_in"])
    if state.get("feature_names_in"):
        est.feature_names_in_ = np.asarray(est.feature_names_, dtype=object)


class LogisticRegressionModel(ClassifierMixin, BaseEstimator):
    """L2 logistic regression on median-imputed, standardised features: P(B=1|x) = sigmoid(theta^T x).

    Parameters
    ----------
    C : float
        Inverse L2 regularisation strength (sklearn's ``LogisticRegression(C=...)``).
    max_iter : int
        Iterations of the L-BFGS solver.
    random_state : int, RandomState or None
        Passed to the solver (L-BFGS itself is deterministic).
    dp_epsilon, dp_delta, dp_max_grad_norm, dp_users_per_step, dp_examples_per_user, dp_epochs, dp_lr :
        With ``dp_epsilon`` set, fit theta by user-level DP-SGD (:mod:`purchase_intent.dp`, Adam at
        ``dp_lr``) instead of L-BFGS: (ε, δ)-DP per user; ``fit`` then needs ``groups`` (the user
        of each example). ``C`` is not used (the clipping and noise regularise).
    dp_feature_bound : float
        In DP mode the features are not imputed or standardised with exact train statistics:
        ``sign(x) * log1p(|x|)``, clipped to ``[-dp_feature_bound, dp_feature_bound]``, then (with
        ``tabular_scaling="dp"``) standardised with the DP release of their mean and scale and
        clipped to the bound again; NaN -> 0 (the released mean). Fixing the range uses no private
        data; it bounds every example's norm by ``dp_feature_bound * sqrt(n_features)``.
    tabular_scaling : {"train", "fixed", "dp"} or None
        "train": median imputation and standardisation with the train statistics (non-DP fits
        only); "fixed": the DP transform above with mean 0 and scale 1; "dp": with the mean and scale
        released under DP (:mod:`purchase_intent.dp_tabular`, ``dp_tabular_share`` of
        ``dp_epsilon``, accounted with the training). None: "train", or for a DP fit
        :data:`~purchase_intent.dp_tabular.DEFAULT_DP_SCALING`.
    dp_tabular_share : float
        With ``tabular_scaling="dp"``: the share of ``dp_epsilon`` that the release alone would
        spend; the training's noise is calibrated so that both composed spend at most ``dp_epsilon``.
    dp_noise_seed : int or None
        None (the default): the DP noise, the users sampled at each step and the release's noise are
        drawn from the operating system's entropy, so that nobody can replay them (``random_state``,
        saved with the run, seeds nothing of them). An int makes them reproducible, for tests and
        experiments: whoever knows it could replay the noise.

    Attributes
    ----------
    classes_ : ndarray of shape (2,)
    medians_, mean_, scale_ : ndarray of shape (n_features,)
        Train medians (imputation), train mean and standard deviation (standardisation).
    coef_ : ndarray of shape (n_features,)
        theta on the standardised features.
    intercept_ : float
    feature_names_ : list of str
    """

    def __init__(self, C: float = 1.0, max_iter: int = 1000, random_state=None, dp_epsilon=None, dp_delta=None,
                 dp_max_grad_norm: float = 1.0, dp_users_per_step: int = 512, dp_examples_per_user: int = 4,
                 dp_epochs: float = 10.0, dp_lr: float = 0.02, dp_feature_bound: float = 10.0,
                 tabular_scaling: Optional[str] = None, dp_tabular_share: float = 0.1,
                 dp_noise_seed: Optional[int] = None):
        self.C = C
        self.max_iter = max_iter
        self.random_state = random_state
        self.dp_epsilon = dp_epsilon
        self.dp_delta = dp_delta
        self.dp_max_grad_norm = dp_max_grad_norm
        self.dp_users_per_step = dp_users_per_step
        self.dp_examples_per_user = dp_examples_per_user
        self.dp_epochs = dp_epochs
        self.dp_lr = dp_lr
        self.dp_feature_bound = dp_feature_bound
        self.tabular_scaling = tabular_scaling
        self.dp_tabular_share = dp_tabular_share
        self.dp_noise_seed = dp_noise_seed

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        tags.classifier_tags.multi_class = False
        return tags

    def fit(self, X, y, X_valid=None, y_valid=None, groups=None) -> "LogisticRegressionModel":
        """Fit on (X, y); X_valid/y_valid are accepted for the shared contract and not used.

        With ``dp_epsilon``: DP-SGD over the users ``groups`` (n,), the user of each row.
        """
        X, y01 = _validate_fit(self, X, y)
        self.privacy_ = None
        dp_tabular.resolve_scaling(self.tabular_scaling, self.dp_epsilon is not None)
        if self.dp_epsilon is not None:
            return self._fit_dp(X, y01, groups)
        pipe = Pipeline([
            ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
            ("scale", StandardScaler()),
            ("clf", LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.random_state)),
        ]).fit(X, y01)
        self.medians_ = pipe["impute"].statistics_.astype(np.float64)
        self.mean_ = pipe["scale"].mean_.astype(np.float64)
        self.scale_ = pipe["scale"].scale_.astype(np.float64)
        self.coef_ = pipe["clf"].coef_.ravel().astype(np.float64)
        self.intercept_ = float(pipe["clf"].intercept_[0])
        self.n_iter_ = int(np.max(pipe["clf"].n_iter_))
        return self

    SETTINGS = (Setting("C", float, 0, lo_in=False), Setting("max_iter", int, 0),
                Setting("dp_max_grad_norm", float, 0, lo_in=False), Setting("dp_users_per_step", int, 1),
                Setting("dp_examples_per_user", int, 1), Setting("dp_epochs", float, 0, lo_in=False),
                Setting("dp_lr", float, 0, lo_in=False), Setting("dp_feature_bound", float, 0, lo_in=False),
                Setting("dp_noise_seed", int, 0, none=True))

    def check_settings(self) -> None:
        """Raise ValueError (one line) for a numeric setting of the wrong type or out of range."""
        check_settings("logreg", self, self.SETTINGS)

    def _fit_dp(self, X: np.ndarray, y01: np.ndarray, groups) -> "LogisticRegressionModel":
        self.check_settings()
        dpmod.check_budget(self.dp_epsilon, self.dp_delta)
        if groups is None or len(groups) != len(y01):
            raise ValueError("dp_epsilon needs the user of each train example: fit(X, y, groups=user_ids)")
        cfg = dpmod.DPConfig(epsilon=float(self.dp_epsilon), delta=self.dp_delta,
                             max_grad_norm=float(self.dp_max_grad_norm), users_per_step=int(self.dp_users_per_step),
                             examples_per_user=int(self.dp_examples_per_user), epochs=float(self.dp_epochs),
                             lr=float(self.dp_lr), noise_seed=self.dp_noise_seed)
        scaling = dp_tabular.resolve_scaling(self.tabular_scaling, True)
        if scaling == "dp":
            cfg = dataclasses.replace(cfg, tabular_share=dpmod.check_share(self.dp_tabular_share))
        groups = np.asarray(groups)
        dp_plan = dpmod.plan(cfg, len(np.unique(groups)))  # refuses before any training
        seed = self.random_state if isinstance(self.random_state, (int, np.integer)) else 0
        n = X.shape[1]
        self.transform_, self.medians_, self.mean_, self.scale_ = "dp", np.zeros(n), np.zeros(n), np.ones(n)
        release = None
        if scaling == "dp":  # the DP release of the mean and scale, accounted with the training
            t = dp_tabular.public_transform(X, float(self.dp_feature_bound))
            self.mean_, self.scale_, release = dp_tabular.release(
                t, groups, cfg.examples_per_user, dp_plan.release_noise_multiplier, float(self.dp_feature_bound),
                dpmod.noise_rng(cfg, 1), labels=y01)
        data = {"x": self._dp_features(X).astype(np.float32), "label": y01.astype(np.float32)}
        torch.manual_seed(int(seed))
        net = _LinearLogit(n)
        bias = dp_tabular.initial_bias(release)
        if bias is not None:  # the released share of positives: centred features no longer carry the mean logit
            torch.nn.init.constant_(net.linear.bias, bias)
        self.privacy_ = dpmod.train_dp(net, data, groups, cfg, dp_plan,
                                       lambda d, rows: {"x": torch.from_numpy(d["x"][rows])}, seed=int(seed))
        if release is not None:
            self.privacy_["tabular_release"] = release
        self.coef_ = net.linear.weight.detach().double().numpy().ravel()
        self.intercept_ = float(net.linear.bias.detach()[0])
        self.n_iter_ = int(dp_plan.steps)
        return self

    def _dp_features(self, X: np.ndarray) -> np.ndarray:
        """The DP transform: sign-log1p clipped to the bound, standardised with ``mean_`` and
        ``scale_`` (0 and 1 unless released under DP) and clipped again; NaN -> 0."""
        X = np.where(np.isinf(X), np.nan, X)
        b = float(self.dp_feature_bound)
        Z = np.clip((dp_tabular.public_transform(X, b) - self.mean_) / self.scale_, -b, b)
        return np.nan_to_num(Z, nan=0.0)

    def _standardise(self, X) -> np.ndarray:
        check_is_fitted(self, "coef_")
        X = _validated(self, X)
        if getattr(self, "transform_", "standard") == "dp":
            return self._dp_features(X)
        X = np.where(np.isnan(X), self.medians_, X)
        return (X - self.mean_) / self.scale_  # (n, F)

    def decision_function(self, X) -> np.ndarray:
        """Log-odds of class ``classes_[1]``, shape (n,)."""
        return self._standardise(X) @ self.coef_ + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        """Shape (n, 2): columns are P(classes_[0]), P(classes_[1])."""
        p1 = _sigmoid(self.decision_function(X))
        return np.column_stack([1.0 - p1, p1])

    def predict(self, X) -> np.ndarray:
        positive = self.decision_function(X) > 0
        return self.classes_[positive.astype(np.int64)]

    def contributions(self, X, *, n_steps: int = 32) -> Contributions:
        """Exact log-odds terms: coef * standardised value per feature, base the intercept.

        ``n_steps`` (the integration steps of approximate attributions) is ignored: nothing to integrate.
        """
        Z = self._standardise(X) * self.coef_  # (n, F)
        return Contributions(features=Z, base=np.full(Z.shape[0], self.intercept_, dtype=np.float64))

    def save(self, directory) -> Path:
        """Write ``logreg.json`` (parameters and all fitted arrays) into ``directory``."""
        check_is_fitted(self, "coef_")
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        state = {
            "estimator": "LogisticRegressionModel",
            **_state_common(self),
            "medians": self.medians_.tolist(),
            "mean": self.mean_.tolist(),
            "scale": self.scale_.tolist(),
            "coef": self.coef_.tolist(),
            "intercept": self.intercept_,
            "n_iter": self.n_iter_,
            "transform": getattr(self, "transform_", "standard"),
            "privacy": getattr(self, "privacy_", None),
        }
        atomic_write_text(path / LOGREG_FILE, json.dumps(state, indent=1))
        return path / LOGREG_FILE

    @classmethod
    def load(cls, directory) -> "LogisticRegressionModel":
        state = json.loads((Path(directory) / LOGREG_FILE).read_text())
        if state.get("estimator") != "LogisticRegressionModel":
            raise ValueError(f"{directory} does not hold a LogisticRegressionModel")
        model = cls(**state["params"])
        _restore_common(model, state)
        for name in ("medians", "mean", "scale", "coef"):
            setattr(model, name + "_", np.asarray(state[name], dtype=np.float64))
        model.intercept_ = float(state["intercept"])
        model.n_iter_ = int(state["n_iter"])
        model.transform_ = state.get("transform", "standard")
        model.privacy_ = state.get("privacy")
        return model


class _LinearLogit(torch.nn.Module):
    """theta^T x + b as a module for :func:`purchase_intent.dp.train_dp`: ``forward(batch) -> (logits, None)``."""

    def __init__(self, n_features: int):
        super().__init__()
        self.linear = torch.nn.Linear(n_features, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, batch: dict, labels=None):
        return self.linear(batch["x"]).squeeze(-1), None  # (B,)


# rows below which LightGBM predicts on one thread: waking its OpenMP team costs more than a few
# rows of trees, and on busy cores it is the whole tail (one row: p99 8.3 ms vs 0.1 ms on 2 cores)
SINGLE_THREAD_ROWS = 256


def _threads_for(n_rows: int) -> dict:
    return {"num_threads": 1} if n_rows <= SINGLE_THREAD_ROWS else {}


def _import_lightgbm():
    try:
        import lightgbm
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the LightGBM model needs the lightgbm package: pip install 'purchase-intent[lgbm]'"
        ) from e
    return lightgbm


def _row_sequence(lgb, X):
    """``X`` (a row source) as a ``lightgbm.Sequence``; a row with an infinite value is refused as
    the in-memory path refuses it."""
    class Rows(lgb.Sequence):
        batch_size = X.batch_size

        def __len__(self) -> int:
            return len(X)

        def __getitem__(self, key):
            a = X[key]
            if np.isinf(a).any():
                raise ValueError("Input X contains infinity or a value too large for dtype('float64').")
            return a

    return Rows()


class LightGBMModel(ClassifierMixin, BaseEstimator):
    """Gradient-boosted trees (LightGBM ``train()`` engine) for binary purchase prediction.

    With ``X_valid``/``y_valid`` in ``fit``, training stops when validation log loss has not improved
    for ``early_stopping_rounds`` rounds (at most ``n_estimators``); without them it grows exactly
    ``n_estimators`` trees. Training is deterministic for a fixed ``random_state`` and ``n_jobs``.

    Parameters
    ----------
    n_estimators : int
        Boosting rounds (the maximum when early stopping).
    learning_rate, num_leaves, min_child_samples, subsample, subsample_freq, colsample_bytree, reg_lambda
        LightGBM's ``learning_rate``, ``num_leaves``, ``min_data_in_leaf``, ``bagging_fraction``,
        ``bagging_freq``, ``feature_fraction`` and ``lambda_l2``.
    early_stopping_rounds : int
        Patience on the validation set (0 disables early stopping).
    n_jobs : int
        Threads.
    random_state : int, RandomState or None

    Attributes
    ----------
    booster_ : lightgbm.Booster
    best_iteration_ : int
        Number of trees used for prediction.
    classes_, feature_names_, n_features_in_
    """

    def __init__(self, n_estimators: int = 400, learning_rate: float = 0.05, num_leaves: int = 31,
                 min_child_samples: int = 20, subsample: float = 0.8, subsample_freq: int = 1,
                 colsample_bytree: float = 0.8, reg_lambda: float = 1.0, early_stopping_rounds: int = 50,
                 n_jobs: int = 2, random_state=None):
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.subsample = subsample
        self.subsample_freq = subsample_freq
        self.colsample_bytree = colsample_bytree
        self.reg_lambda = reg_lambda
        self.early_stopping_rounds = early_stopping_rounds
        self.n_jobs = n_jobs
        self.random_state = random_state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        tags.classifier_tags.multi_class = False
        return tags

    # LightGBM's own checks, made before any data is read
    SETTINGS = (Setting("n_estimators", int, 1), Setting("learning_rate", float, 0, lo_in=False),
                Setting("num_leaves", int, 2, 131072), Setting("min_child_samples", int, 0),
                Setting("subsample", float, 0, 1, lo_in=False), Setting("subsample_freq", int, 0),
                Setting("colsample_bytree", float, 0, 1, lo_in=False), Setting("reg_lambda", float, 0),
                Setting("early_stopping_rounds", int, 0), Setting("n_jobs", int))  # n_jobs ≤ 0: LightGBM's default

    def check_settings(self) -> None:
        """Raise ValueError (one line) for a setting of the wrong type or out of LightGBM's range, e.g.
        ``num_leaves="abc"`` or ``subsample=2`` (LightGBM itself would fail with a traceback)."""
        check_settings("lightgbm", self, self.SETTINGS)

    def _params(self, seed: int) -> dict:
        return {
            "objective": "binary",
            "metric": "binary_logloss",
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_child_samples,
            "bagging_fraction": self.subsample,
            "bagging_freq": self.subsample_freq,
            "feature_fraction": self.colsample_bytree,
            "lambda_l2": self.reg_lambda,
            "num_threads": self.n_jobs,
            "seed": seed,
            "deterministic": True,
            "force_col_wise": True,
            "verbose": -1,
        }

    def fit(self, X, y, X_valid=None, y_valid=None) -> "LightGBMModel":
        """Fit on (X, y), early-stopping on (X_valid, y_valid) when both are given."""
        self.check_settings()
        lgb = _import_lightgbm()
        if is_row_source(X):  # rows left on disk: LightGBM bins them batch by batch (lightgbm.Sequence)
            y01 = _validate_fit_rows(self, X, y)
            data = [_row_sequence(lgb, X)]
        else:
            data, y01 = _validate_fit(self, X, y)
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        # Generic names inside the booster: source column names may hold characters LightGBM rejects.
        booster_names = [f"f{i}" for i in range(self.n_features_in_)]
        train = lgb.Dataset(data, label=y01, feature_name=booster_names, free_raw_data=True)
        valid_sets, callbacks = [], []
        if X_valid is not None and y_valid is not None and self.early_stopping_rounds > 0:
            Xv, yv = _encode_valid(self, X_valid, y_valid)
            valid_sets = [lgb.Dataset(Xv, label=yv, reference=train)]
            callbacks = [lgb.early_stopping(int(self.early_stopping_rounds), verbose=False)]  # a Python int only
        self.booster_ = lgb.train(self._params(seed), train, num_boost_round=self.n_estimators,
                                  valid_sets=valid_sets, callbacks=callbacks)
        best = self.booster_.best_iteration
        self.best_iteration_ = int(best) if best and best > 0 else int(self.booster_.num_trees())
        return self

    def _check_X(self, X) -> np.ndarray:
        check_is_fitted(self, "booster_")
        return _validated(self, X)

    def predict_proba(self, X) -> np.ndarray:
        """Shape (n, 2): columns are P(classes_[0]), P(classes_[1])."""
        X = self._check_X(X)
        p1 = self.booster_.predict(X, num_iteration=self.best_iteration_, **_threads_for(len(X)))
        return np.column_stack([1.0 - p1, p1])

    def predict(self, X) -> np.ndarray:
        positive = self.predict_proba(X)[:, 1] > 0.5
        return self.classes_[positive.astype(np.int64)]

    def contributions(self, X, *, n_steps: int = 32) -> Contributions:
        """Exact TreeSHAP values in log-odds per feature, base the expected raw score.

        ``n_steps`` (the integration steps of approximate attributions) is ignored: TreeSHAP is exact.
        """
        X = self._check_X(X)
        C = self.booster_.predict(X, num_iteration=self.best_iteration_, pred_contrib=True, **_threads_for(len(X)))
        return Contributions(features=C[:, :-1], base=C[:, -1])  # (n, F+1): the last column is the bias

    def save(self, directory) -> Path:
        """Write ``lightgbm.txt`` (LightGBM's own model format) and ``lightgbm.json`` into ``directory``."""
        check_is_fitted(self, "booster_")
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / LIGHTGBM_FILE, self.booster_.model_to_string(num_iteration=-1))
        state = {"estimator": "LightGBMModel", **_state_common(self), "best_iteration": self.best_iteration_}
        atomic_write_text(path / LIGHTGBM_META, json.dumps(state, indent=1))
        return path / LIGHTGBM_FILE

    @classmethod
    def load(cls, directory) -> "LightGBMModel":
        lgb = _import_lightgbm()
        state = json.loads((Path(directory) / LIGHTGBM_META).read_text())
        if state.get("estimator") != "LightGBMModel":
            raise ValueError(f"{directory} does not hold a LightGBMModel")
        model = cls(**state["params"])
        _restore_common(model, state)
        model.booster_ = lgb.Booster(model_str=(Path(directory) / LIGHTGBM_FILE).read_text())
        model.best_iteration_ = int(state["best_iteration"])
        return model

