"""Post-hoc calibration of logits, fitted on the validation split.

Temperature scaling ``p = sigmoid(z / t)`` keeps the ranking and fixes over/under-confidence;
Platt scaling ``p = sigmoid(a * z + b)`` also moves the base rate (useful when class weights or
a shifted label window changed it). Both are fitted by minimising the log loss; parameters are
plain floats, saved as JSON.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize, minimize_scalar

METHODS = ("none", "temperature", "platt")


def _nll(z: np.ndarray, y: np.ndarray, a: float, b: float) -> float:
    s = a * z + b
    return float(np.mean(np.logaddexp(0.0, s) - y * s))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature t > 0 minimising the log loss of ``sigmoid(logits / t)`` on (logits, y)."""
    z, y = np.asarray(logits, np.float64), np.asarray(y, np.float64)
    r = minimize_scalar(lambda lt: _nll(z, y, float(np.exp(-lt)), 0.0), bounds=(-5.0, 5.0), method="bounded")
    return float(np.exp(r.x))


def fit_platt(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) minimising the log loss of ``sigmoid(a * logits + b)``, with Platt's smoothed targets."""
    z, y = np.asarray(logits, np.float64), np.asarray(y, np.float64)
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    t = np.where(y > 0, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))  # Platt (1999): avoids overfitting

    def f(p):
        s = p[0] * z + p[1]
        sig = 1 / (1 + np.exp(-s))
        grad = sig - t
        return float(np.mean(np.logaddexp(0.0, s) - t * s)), np.array([np.mean(grad * z), np.mean(grad)])

    r = minimize(f, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    return float(r.x[0]), float(r.x[1])


@dataclass
class Calibrator:
    """``p = sigmoid(a * logit + b)``; temperature scaling is ``a = 1/t, b = 0``."""

    method: str = "none"
    a: float = 1.0
    b: float = 0.0

    def transform(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of the positive class, (N,)."""
        s = self.a * np.asarray(logits, np.float64) + self.b
        return 1.0 / (1.0 + np.exp(-s))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibrator":
        return cls(method=str(d.get("method", "none")), a=float(d.get("a", 1.0)), b=float(d.get("b", 0.0)))


def fit_calibrator(logits: np.ndarray, y: np.ndarray, method: str = "temperature") -> Calibrator:
    """Fit `method` (none, temperature, platt) on (logits, y); identity when y has one class."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration {method!r}: choose one of {', '.join(METHODS)}")
    y = np.asarray(y)
    if method == "none" or len(y) == 0 or y.min() == y.max():
        return Calibrator("none")
    if method == "temperature":
        return Calibrator("temperature", a=1.0 / fit_temperature(logits, y), b=0.0)
    a, b = fit_platt(logits, y)
    return Calibrator("platt", a=a, b=b)
