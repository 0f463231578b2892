"""A differentially private release of the tabular features' per-feature mean and scale.

A DP model may not standardise its tabular features with the train mean and standard deviation:
they are statistics of the private data. Left unstandardised (``tabular_scaling="fixed"``), the
features cost the DP Transformer about half of its ROC-AUC gap (BENCHMARKS.md, "Where the DP
Transformer's gap comes from"). ``tabular_scaling="dp"`` releases the statistics with Gaussian noise
instead, under the same user-level guarantee, and the accountant composes the release with the
training's steps (:func:`purchase_intent.dp.plan`, :func:`purchase_intent.dp.train_dp`), so the ε
recorded covers both.

The release, per feature j, on the public transform ``t = clip(sign(x) * log1p(|x|), -B, B)`` (NaN
stays missing; ``B`` is the model's fixed feature bound):

1. at most ``k`` examples of each user are drawn (the training's ``dp_examples_per_user``): one user
   then moves the count of non-missing values by at most ``k``, their sum by at most ``k * B``;
2. round 1 releases, per feature, the count ``n_j`` of non-missing values and their sum ``S_j``;
   round 2 the sum ``A_j`` of ``|t - m_j|`` clipped to ``D`` (``DEVIATION_BOUND``) around the
   round-1 mean ``m_j = S~_j / n~_j``: a mean absolute deviation, whose per-example bound ``D`` enters
   the noise linearly where a sum of squares would enter it as ``B**2`` (100 at B = 10);
3. each of the 3F sums is divided by its per-user bound (``k``, ``k * B``, ``k * D``): one user moves
   every coordinate by at most 1 and the vector of all 3F coordinates by at most ``sqrt(3F)`` in L2.
   Each coordinate gets Gaussian noise of std ``noise_multiplier * sqrt(3F)``. The two rounds are
   Gaussian mechanisms whose Rényi divergences add (adaptive composition), to exactly that of one
   Gaussian mechanism with this noise multiplier over all 3F coordinates at sampling rate 1: the
   step the accountant records. With the labels, round 1 holds two more sums (the rows read and
   the positives among them, bound ``k`` each), each divided by ``k`` and multiplied by a public
   weight ``w`` with ``2 w**2 = F`` (``LABEL_SHARE`` = 1/4 of the squared sensitivity ``3F + 2 w**2 =
   4F``): the same argument with L2 sensitivity ``sqrt(4F)``. Without the weight the two label sums
   got the noise of the 3F + 2 coordinates (std ``noise_multiplier * sqrt(3F + 2) * k``), which on a
   small shop buried the positives under it (608 users at ε = 3: a released share of 0.148 against
   0.077, BENCHMARKS.md); with it their noise is ``noise_multiplier * sqrt(8) * k`` whatever F, and
   the features' grows by ``sqrt(4F / (3F + 2))`` (15% at F = 60).

Post-processing (no further privacy cost): mean ``m_j``, clipped to ``[-B, B]``; scale
``sqrt(pi / 2) * A~_j / n~_j`` (the standard deviation of a normal with that mean absolute
deviation), floored at ``SCALE_FLOOR`` so that noise cannot make a feature's scale ~0; a feature
whose noisy count is below ``MIN_COUNT_RATIO`` times the count's noise std (too few values to say
anything: a feature that is always missing) keeps the fixed constants, mean 0 and scale 1.
"""
from __future__ import annotations

import math

import numpy as np

# public constants of the release (fixed before any data is read)
DEVIATION_BOUND = 3.0  # D: each |t - m| is clipped to this before the absolute deviations are summed
SCALE_FLOOR = 0.1  # the released scale is at least this (a feature divided by it grows at most 10x)
MIN_COUNT_RATIO = 10.0  # a feature's noisy count must be this many times its noise std to be used
N_SUMS = 3  # per feature: count, sum, sum of absolute deviations
RATE_BOUNDS = (0.001, 0.999)  # the released share of positives is clipped to this (a finite log-odds)
LABEL_SHARE = 0.25  # the share of the release's squared L2 sensitivity given to its two label sums


def public_transform(X: np.ndarray, bound: float, log: bool = True) -> np.ndarray:
    """``clip(sign(x) * log1p(|x|), -bound, bound)`` (without the log when ``log`` is False); NaN stays NaN."""
    t = np.asarray(X, dtype=np.float64)
    if log:
        t = np.sign(t) * np.log1p(np.abs(t))
    return np.clip(t, -bound, bound)


def label_weight(n_features: int) -> float:
    """``w``: each label sum, in units of its per-user bound, is multiplied by it before the noise, so that
    the two take ``LABEL_SHARE`` of the squared sensitivity: ``2 w**2 = LABEL_SHARE / (1 - LABEL_SHARE) * 3F``."""
    return math.sqrt(LABEL_SHARE / (1.0 - LABEL_SHARE) * N_SUMS * int(n_features) / 2.0)


def sensitivity(n_features: int, labels: bool) -> float:
    """The L2 norm by which one user moves the vector of released sums, each in units of its per-user bound
    (the label sums times :func:`label_weight`): ``sqrt(3F)``, with the labels ``sqrt(3F + 2 w**2)``."""
    return math.sqrt(N_SUMS * int(n_features) + (2.0 * label_weight(n_features) ** 2 if labels else 0.0))


def per_user_rows(groups: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``k`` random example rows of each user (every user once): the rows the statistics read."""
    users, inverse = np.unique(np.asarray(groups), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=len(users)))])
    rows = []
    for u in range(len(users)):
        mine = order[bounds[u]:bounds[u + 1]]
        rows.append(mine if len(mine) <= k else rng.choice(mine, k, replace=False))
    return np.sort(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)


def user_sums(t: np.ndarray, rows: np.ndarray, centre: np.ndarray | None,
              deviation_bound: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sums of rows ``rows`` of ``t`` (n, F): counts of non-missing values, their sum, and (with
    ``centre``) the sum of ``min(|t - centre|, deviation_bound)``; each (F,)."""
    sub = t[rows]
    ok = ~np.isnan(sub)
    vals = np.where(ok, sub, 0.0)
    dev = (np.where(ok, np.minimum(np.abs(sub - centre), deviation_bound), 0.0).sum(axis=0)
           if centre is not None else None)
    return ok.sum(axis=0).astype(np.float64), vals.sum(axis=0), dev


def release(t: np.ndarray, groups: np.ndarray, k: int, noise_multiplier: float, bound: float,
            rng: np.random.Generator, labels: np.ndarray | None = None, deviation_bound: float = DEVIATION_BOUND,
            scale_floor: float = SCALE_FLOOR) -> tuple[np.ndarray, np.ndarray, dict]:
    """The noisy per-feature mean and scale of ``t`` (n, F), already publicly transformed and clipped
    to ``[-bound, bound]`` (NaN = missing), under user-level DP with ``noise_multiplier``.

    Parameters
    ----------
    t : ndarray (n, F)
    groups : ndarray (n,)
        The user of each row.
    k : int
        At most this many rows of each user are read.
    noise_multiplier : float
        Of the one Gaussian mechanism over all 3F sums (L2 sensitivity ``sqrt(3F)`` in units of the
        per-user bounds; :func:`sensitivity` with the labels); :func:`purchase_intent.dp.plan`
        calibrates it from the budget's share.
    bound : float
        B: every value of ``t`` is in ``[-B, B]``.
    rng : numpy Generator
        For the rows drawn and the noise.
    labels : ndarray (n,) of 0/1, optional
        With labels, round 1 also releases the number of rows read and of positives among them (two
        more sums, per-user bound ``k`` each, weighted by :func:`label_weight`), and the record holds
        ``positive_rate``: the DP model's output bias starts at its log-odds (with centred features
        nothing else moves the mean logit, and a fixed number of Adam steps from 0 did not reach it;
        with uncentred ones a bias of 0 sent every weight against the majority class: BENCHMARKS.md).

    Returns
    -------
    mean, scale : ndarray (F,)
    record : dict
        JSON-safe: the mechanism's constants and how many features kept the fixed constants.
    """
    t = np.asarray(t, dtype=np.float64)
    if t.ndim != 2:
        raise ValueError(f"the tabular features must be (n, F), got shape {t.shape}")
    finite = t[~np.isnan(t)]
    if finite.size and np.abs(finite).max() > bound:
        raise ValueError(f"the tabular features must be clipped to [-{bound:g}, {bound:g}] before the release")
    k, F = int(k), t.shape[1]
    s = float(noise_multiplier) * sensitivity(F, labels is not None)  # noise std in units of the per-user bound
    rows = per_user_rows(groups, k, rng)
    # round 1: counts (per-user bound k) and sums (k * B)
    count, total, _ = user_sums(t, rows, None, deviation_bound)
    count = count + rng.normal(0.0, s * k, F)
    total = total + rng.normal(0.0, s * k * bound, F)
    usable = count >= MIN_COUNT_RATIO * s * k
    n = np.maximum(count, 1.0)
    mean = np.where(usable, np.clip(total / n, -bound, bound), 0.0)
    # round 2: absolute deviations around the round-1 mean (per-user bound k * D)
    _, _, dev = user_sums(t, rows, mean, deviation_bound)
    dev = dev + rng.normal(0.0, s * k * deviation_bound, F)
    scale = np.maximum(math.sqrt(math.pi / 2) * dev / n, scale_floor)
    scale = np.where(usable, scale, 1.0)
    record = {"mechanism": "Gaussian, one release of per-feature count, sum and absolute deviation "
                           "(two rounds), user-level",
              "noise_multiplier": float(noise_multiplier), "examples_per_user": k, "bound": float(bound),
              "deviation_bound": float(deviation_bound), "scale_floor": float(scale_floor),
              "n_features": int(F), "features_fixed": int((~usable).sum())}
    if labels is not None:
        y = np.asarray(labels, dtype=np.float64)[rows]
        w = label_weight(F)  # the weighted sum w * x / k gets noise s: x gets s * k / w
        n_rows = len(rows) + rng.normal(0.0, s * k / w)
        positives = y.sum() + rng.normal(0.0, s * k / w)
        record["positive_rate"] = float(np.clip(positives / max(n_rows, 1.0), RATE_BOUNDS[0], RATE_BOUNDS[1]))
    return mean, scale, record


def initial_bias(record: dict | None) -> float | None:
    """The log-odds of the released ``positive_rate`` (None without one)."""
    rate = (record or {}).get("positive_rate")
    return None if rate is None else float(math.log(rate / (1.0 - rate)))


# what a DP fit's tabular features get when tabular_scaling is not given (see BENCHMARKS.md, "Small shops:
# the fixed transform ranks below chance": with "fixed" DP fits of a few hundred users ranked below chance)
DEFAULT_DP_SCALING = "dp"
SCALINGS = ("train", "fixed", "dp")


def resolve_scaling(scaling, dp: bool) -> str:
    """The tabular scaling a fit uses: ``scaling``, or None's default (``"train"``, or for a DP fit
    ``DEFAULT_DP_SCALING``); a ValueError of one line for an unknown one or one that does not fit the mode."""
    if scaling is None:
        return DEFAULT_DP_SCALING if dp else "train"
    if scaling not in SCALINGS:
        raise ValueError(f"tabular_scaling must be 'train', 'fixed' or 'dp' (or null for the default), got {scaling!r}")
    if dp and scaling == "train":
        raise ValueError("tabular_scaling='train' standardises with statistics of the private train data: a DP fit "
                         "takes 'dp' (their DP release, its ε accounted) or 'fixed' (public constants)")
    if not dp and scaling == "dp":
        raise ValueError("tabular_scaling='dp' releases the tabular statistics with noise for a DP fit: it needs "
                         "dp_epsilon (without it, 'train' uses the exact statistics)")
    return scaling
