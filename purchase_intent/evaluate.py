"""Evaluation: ranking, calibration and targeting metrics with bootstrap confidence intervals.

Every function takes the true labels ``y`` (0/1) and predicted probabilities ``p`` of class 1 and
returns plain Python values (floats, lists, ``None`` for undefined) so the result can be written
to ``runs/NAME/metrics.json`` as it is. Calibration (ECE, reliability curve) uses 10 equal-mass
bins; lift, precision and recall are measured in the top 1/5/10/20% of scores.

Bootstrap
---------
ROC-AUC intervals use a *stratified* bootstrap (as pROC does by default): each resample draws
``n_pos`` positives from the positives and ``n_neg`` negatives from the negatives, with
replacement. Class counts therefore stay fixed and no resample is degenerate (single-class).
The AUC of a resample is computed without re-sorting: the examples are sorted once, tied scores
form groups, and a resample is just a count per group, so
``AUC = sum_g pos_g * (neg_below_g + neg_g / 2) / (n_pos * n_neg)``. 1000 resamples of 100k
examples take about a second. Paired differences reuse the very same resample draws for both
models.

The same draws give paired intervals of PR-AUC, log loss and lift (``paired_difference``): PR-AUC
and lift come from counts per distinct score, highest first (precision and the top bucket are
cumulative sums), log loss from the sum of the drawn examples' losses. ROC-AUC draws and values
do not change when other metrics are computed beside it.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

TOP_FRACTIONS = {"top_1pct": 0.01, "top_5pct": 0.05, "top_10pct": 0.10, "top_20pct": 0.20}
_EPS = float(np.finfo(np.float64).eps)  # probabilities are clipped to [eps, 1 - eps] in log loss
_CELLS_PER_CHUNK = 4_000_000  # resamples x tie groups per chunk (~32 MB of int64 counts)
PAIRED_METRICS = ("pr_auc", "log_loss", "lift_top_10pct")  # paired beside ROC-AUC in metrics.json
BOOTSTRAP_METRICS = ("roc_auc", "pr_auc", "log_loss") + tuple(f"lift_{t}" for t in TOP_FRACTIONS)


def _float(x: Any) -> Optional[float]:
    """A plain float, or None for NaN/inf/None (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _as_arrays(y, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y and p have different lengths: {y.shape[0]} vs {p.shape[0]}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("y must contain only 0 and 1")
    if np.isnan(p).any():
        raise ValueError("p contains NaN")
    return y.astype(np.int64), p


# --------------------------------------------------------------------------------------------
# ROC-AUC, point estimate and bootstrap


def _tie_groups(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, int]:
    """Group id of each example, groups ordered by increasing score; tied scores share a group.

    Neighbouring groups that hold only positives (or only negatives) are merged: that leaves
    every AUC term unchanged and shrinks the number of groups to about 2 * min(n_pos, n_neg).
    """
    uniq, tie = np.unique(p, return_inverse=True)
    tie = tie.ravel()
    has_pos = np.bincount(tie, weights=y, minlength=uniq.size) > 0
    has_neg = np.bincount(tie, weights=1 - y, minlength=uniq.size) > 0
    kind = has_pos.astype(np.int8) + 2 * has_neg.astype(np.int8)  # 1 pos only, 2 neg only, 3 mixed
    new_run = np.r_[True, (kind[1:] != kind[:-1]) | (kind[1:] == 3)]
    run = np.cumsum(new_run) - 1
    return run[tie].astype(np.int32), int(run[-1]) + 1 if uniq.size else 0


def _auc_from_group_counts(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUC per row from per-group positive and negative counts, each (B, G)."""
    neg_below = np.cumsum(neg, axis=1) - neg  # negatives strictly below each group
    twice_num = (pos * (2 * neg_below + neg)).sum(axis=1)  # integer counts: exact
    return twice_num / (2.0 * pos.sum(axis=1) * neg.sum(axis=1))


def roc_auc(y, p) -> Optional[float]:
    """Rank-based ROC-AUC (ties count one half); None when y has a single class."""
    y, p = _as_arrays(y, p)
    if y.size == 0 or y.min() == y.max():
        return None
    group, n_groups = _tie_groups(p, y)
    pos = np.bincount(group[y == 1], minlength=n_groups)[None, :]
    neg = np.bincount(group[y == 0], minlength=n_groups)[None, :]
    return float(_auc_from_group_counts(pos, neg)[0])


def _ranked_groups(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Group of each positive and of each negative; groups are distinct scores in *decreasing* order.

    Neighbouring scores held only by negatives are merged: a run of them adds no recall and ends no
    top bucket with a positive, so PR-AUC and lift are unchanged (positive-only runs may not be
    merged: precision changes along them).
    """
    uniq, inv = np.unique(-s, return_inverse=True)
    inv = inv.ravel()
    neg_only = np.bincount(inv, weights=y, minlength=uniq.size) == 0
    new_run = np.r_[True, ~(neg_only[1:] & neg_only[:-1])]
    run = (np.cumsum(new_run) - 1).astype(np.int32)
    group = run[inv]
    return group[y == 1], group[y == 0], int(run[-1]) + 1 if uniq.size else 0


def _ranked_from_group_counts(pos: np.ndarray, neg: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """PR-AUC and lift@k per row from counts per distinct score (highest first), each (B, G)."""
    n_pos, n = pos.sum(axis=1), pos.sum(axis=1) + neg.sum(axis=1)  # (B,)
    tp = np.cumsum(pos, axis=1)  # (B, G) positives at or above each threshold
    n_pred = tp + np.cumsum(neg, axis=1)  # (B, G) examples at or above each threshold
    out = {}
    if "pr_auc" in names:  # sum over thresholds of recall gain x precision
        prec = np.divide(tp, n_pred, out=np.zeros(tp.shape), where=n_pred > 0)
        out["pr_auc"] = (pos * prec).sum(axis=1) / n_pos
    rows = np.arange(pos.shape[0])
    for name in names:
        if not name.startswith("lift_"):
            continue
        k = np.maximum(1, np.ceil(TOP_FRACTIONS[name[5:]] * n - 1e-9))  # (B,) bucket size
        t = np.argmax(n_pred >= k[:, None], axis=1)  # (B,) the tie group the bucket ends in
        cnt_t = pos[rows, t] + neg[rows, t]
        hits = tp[rows, t] - pos[rows, t] + (k - (n_pred[rows, t] - cnt_t)) * pos[rows, t] / cnt_t
        out[name] = (hits / k) / (n_pos / n)
    return out


def _bootstrap_metrics(y: np.ndarray, scores: list[np.ndarray], n_boot: int, seed: int,
                       metrics: tuple[str, ...] = ("roc_auc",)) -> dict[str, np.ndarray]:
    """Stratified bootstrap of several metrics, each (n_boot, len(scores)); all use the same draws.

    ``metrics`` are among ``BOOTSTRAP_METRICS``. Resample r draws ``n_pos`` positives and ``n_neg``
    negatives with replacement once, and every metric of every score is computed on that resample,
    so a difference between two scores (or two metrics) is paired. The draws depend only on
    ``seed``, the class counts and the ROC-AUC tie groups, never on which metrics are asked for:
    ROC-AUC intervals are the same whatever else is computed beside them.
    """
    unknown = set(metrics) - set(BOOTSTRAP_METRICS)
    if unknown:
        raise ValueError(f"unknown bootstrap metric(s): {sorted(unknown)}; known: {list(BOOTSTRAP_METRICS)}")
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    groups = []
    for s in scores:
        group, n_groups = _tie_groups(s, y)
        groups.append((group[y == 1], group[y == 0], n_groups))  # group of each positive / negative
    ranked_names = [m for m in metrics if m == "pr_auc" or m.startswith("lift_")]
    ranked = [_ranked_groups(s, y) for s in scores] if ranked_names else []
    losses = []
    if "log_loss" in metrics:
        for s in scores:
            q = np.clip(s, _EPS, 1.0 - _EPS)
            losses.append((-np.log(q[y == 1]), -np.log1p(-q[y == 0])))  # loss of each positive / negative
    max_groups = max(g for _, _, g in groups)
    chunk = max(1, min(n_boot, _CELLS_PER_CHUNK // max(max_groups, n_pos + n_neg)))
    rng = np.random.default_rng(seed)
    out = {m: np.empty((n_boot, len(scores))) for m in metrics}
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draw_pos = rng.integers(0, n_pos, size=(b, n_pos), dtype=np.int32)  # (b, n_pos)
        draw_neg = rng.integers(0, n_neg, size=(b, n_neg), dtype=np.int32)  # (b, n_neg)
        rows = slice(start, start + b)
        for k, (g_pos, g_neg, n_groups) in enumerate(groups):
            if "roc_auc" not in metrics:
                break
            offset = (np.arange(b, dtype=np.int64) * n_groups)[:, None]  # row r counts into [r*G, (r+1)*G)
            pos = np.bincount((g_pos[draw_pos] + offset).ravel(), minlength=b * n_groups)
            neg = np.bincount((g_neg[draw_neg] + offset).ravel(), minlength=b * n_groups)
            out["roc_auc"][rows, k] = _auc_from_group_counts(pos.reshape(b, n_groups), neg.reshape(b, n_groups))
        for k, (l_pos, l_neg) in enumerate(losses):
            out["log_loss"][rows, k] = (l_pos[draw_pos].sum(axis=1) + l_neg[draw_neg].sum(axis=1)) / (n_pos + n_neg)
        for k, (g_pos, g_neg, n_groups) in enumerate(ranked):  # n_groups <= n: the chunk fits here too
            offset = (np.arange(b, dtype=np.int64) * n_groups)[:, None]
            pos = np.bincount((g_pos[draw_pos] + offset).ravel(), minlength=b * n_groups)
            neg = np.bincount((g_neg[draw_neg] + offset).ravel(), minlength=b * n_groups)
            vals = _ranked_from_group_counts(pos.reshape(b, n_groups), neg.reshape(b, n_groups), ranked_names)
            for name, v in vals.items():
                out[name][rows, k] = v
    return out


def _bootstrap_aucs(y: np.ndarray, scores: list[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """Stratified bootstrap AUCs, shape (n_boot, len(scores)); every score uses the same draws."""
    return _bootstrap_metrics(y, scores, n_boot, seed, ("roc_auc",))["roc_auc"]


def _percentile_ci(values: np.ndarray, level: float = 0.95) -> list[Optional[float]]:
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return [_float(lo), _float(hi)]


def roc_auc_ci(y, p, n_boot: int = 1000, seed: int = 0) -> Optional[list[Optional[float]]]:
    """95% stratified-bootstrap interval of ROC-AUC; None when undefined or ``n_boot == 0``."""
    y, p = _as_arrays(y, p)
    if n_boot <= 0 or y.size == 0 or y.min() == y.max():
        return None
    return _percentile_ci(_bootstrap_aucs(y, [p], n_boot, seed)[:, 0])


def _point(metric: str, y: np.ndarray, p: np.ndarray) -> Optional[float]:
    """The point estimate of one of ``BOOTSTRAP_METRICS``."""
    if metric == "roc_auc":
        return roc_auc(y, p)
    if metric == "pr_auc":
        return average_precision(y, p)
    if metric == "log_loss":
        return log_loss(y, p)
    return top_fraction_metrics(y, p)["lift"][metric[5:]]


def paired_difference(y, p_model, p_reference, metrics: tuple[str, ...] = PAIRED_METRICS, n_boot: int = 1000,
                      seed: int = 0) -> dict[str, dict]:
    """metric(model) - metric(reference) for several metrics, each with a paired bootstrap 95% interval.

    One stratified bootstrap (see the module docstring) serves every metric and both models: each
    resample scores both on the very same examples. For ``log_loss`` lower is better, so a better
    model has a *negative* difference; for the others a positive one.

    Returns
    -------
    dict
        ``{metric: {"diff": float | None, "ci": [lo, hi] | None}}``; intervals are None when
        ``n_boot == 0`` or y has a single class (the stratified resample needs both).
    """
    y, p_model = _as_arrays(y, p_model)
    _, p_reference = _as_arrays(y, p_reference)
    out = {}
    for m in metrics:
        if m not in BOOTSTRAP_METRICS:
            raise ValueError(f"unknown metric {m!r}; known: {list(BOOTSTRAP_METRICS)}")
        a, b = _point(m, y, p_model), _point(m, y, p_reference)
        out[m] = {"diff": None if a is None or b is None else _float(a - b), "ci": None}
    if n_boot > 0 and y.size and 0 < y.sum() < y.size:
        boot = _bootstrap_metrics(y, [p_model, p_reference], n_boot, seed, tuple(metrics))
        for m in metrics:
            if out[m]["diff"] is not None:
                out[m]["ci"] = _percentile_ci(boot[m][:, 0] - boot[m][:, 1])
    return out


def paired_auc_difference(y, p_model, p_reference, n_boot: int = 1000, seed: int = 0) -> dict:
    """ROC-AUC(model) - ROC-AUC(reference) with a paired stratified-bootstrap 95% interval, and
    the same for PR-AUC, log loss and lift in the top 10%.

    Both models are scored on the same resample indices, so the interval reflects the
    difference between the models and not the sampling noise each one has alone. The ROC-AUC
    interval does not depend on the other metrics being computed (same draws, same seed).

    Returns
    -------
    dict
        ``{"diff": float | None, "ci": [lo, hi] | None, "n_boot": int}`` for ROC-AUC, plus
        ``"pr_auc"``, ``"log_loss"`` and ``"lift_top_10pct"``, each ``{"diff": .., "ci": ..}``
        (see ``paired_difference``).
    """
    y, p_model = _as_arrays(y, p_model)
    _, p_reference = _as_arrays(y, p_reference)
    res = paired_difference(y, p_model, p_reference, ("roc_auc",) + PAIRED_METRICS, n_boot, seed)
    auc = res.pop("roc_auc")
    if auc["diff"] is None:
        return {"diff": None, "ci": None, "n_boot": 0, **res}
    return {"diff": auc["diff"], "ci": auc["ci"], "n_boot": int(max(n_boot, 0)), **res}


# --------------------------------------------------------------------------------------------
# Other metrics


def average_precision(y, p) -> Optional[float]:
    """PR-AUC as average precision, sum_k (R_k - R_{k-1}) * P_k over distinct score thresholds.

    Same step-wise definition as sklearn's ``average_precision_score``; None without positives.
    """
    y, p = _as_arrays(y, p)
    positives = int(y.sum())
    if positives == 0:
        return None
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order]
    last_of_tie = np.r_[ps[1:] != ps[:-1], True]  # one threshold per distinct score
    tp = np.cumsum(ys)[last_of_tie]
    n_pred = (np.arange(ps.size) + 1)[last_of_tie]
    recall_gain = np.diff(np.r_[0, tp]) / positives
    return _float(np.sum(recall_gain * tp / n_pred))


def _equal_mass_bins(p: np.ndarray, n_bins: int) -> list[np.ndarray]:
    """Indices of ~n/n_bins examples per bin in increasing order of p; tied scores share a bin."""
    order = np.argsort(p, kind="mergesort")
    ps = p[order]
    first_of_tie = np.maximum.accumulate(np.where(np.r_[True, ps[1:] != ps[:-1]], np.arange(ps.size), 0))
    bin_of = first_of_tie * n_bins // ps.size  # the bin of the tie's first member, for all of it
    edges = np.flatnonzero(np.r_[True, bin_of[1:] != bin_of[:-1]])
    return np.split(order, edges[1:])


def reliability_curve(y, p, n_bins: int = 10) -> dict:
    """Mean predicted probability vs observed positive rate in equal-mass bins.

    Returns
    -------
    dict
        ``{"mean_predicted": [...], "fraction_positive": [...], "count": [...]}``, one entry per
        non-empty bin in increasing order of predicted probability.
    """
    y, p = _as_arrays(y, p)
    bins = _equal_mass_bins(p, n_bins) if p.size else []
    return {
        "mean_predicted": [float(p[b].mean()) for b in bins],
        "fraction_positive": [float(y[b].mean()) for b in bins],
        "count": [int(b.size) for b in bins],
    }


def expected_calibration_error(y, p, n_bins: int = 10) -> Optional[float]:
    """ECE over ``n_bins`` equal-mass bins: sum_b (n_b / n) * |mean(p_b) - mean(y_b)|.

    Equal-mass (quantile) bins rather than equal-width ones because purchase probabilities are
    mostly small: equal-width bins would put nearly every example into the first bin.
    """
    curve = reliability_curve(y, p, n_bins)
    n = sum(curve["count"])
    if n == 0:
        return None
    gaps = np.abs(np.asarray(curve["mean_predicted"]) - np.asarray(curve["fraction_positive"]))
    return float((np.asarray(curve["count"]) * gaps).sum() / n)


def _top_positives(y: np.ndarray, p: np.ndarray, k: int) -> float:
    """Expected positives among the k highest scores; a tie at the boundary is shared pro rata."""
    order = np.argsort(-p, kind="mergesort")
    threshold = p[order[k - 1]]
    above = p > threshold
    tied = p == threshold
    need = k - int(above.sum())
    return float(y[above].sum()) + need * float(y[tied].mean())


def top_fraction_metrics(y, p) -> dict:
    """Lift, precision and recall among the top 1/5/10/20% of scores.

    A bucket holds ``ceil(fraction * n)`` examples (at least one when ``n > 0``). Values are None
    when undefined (no examples; lift and recall without positives).
    """
    y, p = _as_arrays(y, p)
    n, positives = y.size, int(y.sum())
    base_rate = positives / n if n else None
    out: dict[str, dict] = {"lift": {}, "precision": {}, "recall": {}}
    for name, frac in TOP_FRACTIONS.items():
        if n == 0:
            prec = rec = lift = None
        else:
            k = max(1, math.ceil(frac * n - 1e-9))
            hits = _top_positives(y, p, k)
            prec = hits / k
            rec = hits / positives if positives else None
            lift = prec / base_rate if base_rate else None
        out["lift"][name] = _float(lift)
        out["precision"][name] = _float(prec)
        out["recall"][name] = _float(rec)
    return out


def log_loss(y, p) -> Optional[float]:
    y, p = _as_arrays(y, p)
    if y.size == 0:
        return None
    q = np.clip(p, _EPS, 1.0 - _EPS)
    return _float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))


def brier_score(y, p) -> Optional[float]:
    y, p = _as_arrays(y, p)
    return _float(np.mean((p - y) ** 2)) if y.size else None


def f1_at_threshold(y, p, threshold: float = 0.5) -> Optional[float]:
    """F1 of the rule ``p >= threshold``; None when there are no positives and no predictions."""
    y, p = _as_arrays(y, p)
    pred = p >= threshold
    tp = int((pred & (y == 1)).sum())
    denom = int(pred.sum()) + int(y.sum())
    return _float(2 * tp / denom) if denom else None


def best_f1_threshold(y, p) -> tuple[Optional[float], Optional[float]]:
    """The threshold (one of the scores) that maximises F1 of ``p >= threshold``, and that F1.

    Meant for validation data: choose the threshold there, then apply it to test.
    """
    y, p = _as_arrays(y, p)
    positives = int(y.sum())
    if positives == 0:
        return None, None
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order]
    last_of_tie = np.r_[ps[1:] != ps[:-1], True]  # a threshold must include all tied scores
    tp = np.cumsum(ys)[last_of_tie]
    n_pred = (np.arange(ps.size) + 1)[last_of_tie]
    f1 = 2 * tp / (n_pred + positives)
    best = int(np.argmax(f1))
    return float(ps[last_of_tie][best]), float(f1[best])


def binary_metrics(y, p, n_boot: int = 1000, seed: int = 0) -> dict:
    """All test metrics of one model, with the keys of ``metrics.json``'s ``"test"`` block.

    Parameters
    ----------
    y : array-like of shape (n,)
        True labels, 0 or 1.
    p : array-like of shape (n,)
        Predicted probability of label 1.
    n_boot : int
        Bootstrap resamples for the ROC-AUC interval (0 = no interval).
    seed : int
        Seed of the bootstrap.

    Returns
    -------
    dict
        ``n, positives, base_rate, roc_auc, roc_auc_ci, pr_auc, log_loss, brier, ece,
        lift, precision, recall`` (the last three keyed ``top_1pct`` .. ``top_20pct``) and
        ``notes`` (a list of strings explaining any value that is None).
    """
    y, p = _as_arrays(y, p)
    n, positives = int(y.size), int(y.sum())
    notes = []
    if n == 0:
        notes.append("no examples")
    elif positives in (0, n):
        notes.append(f"only one class in y ({'all positive' if positives else 'no positives'}): ROC-AUC undefined")
    out = {
        "n": n,
        "positives": positives,
        "base_rate": _float(positives / n) if n else None,
        "roc_auc": roc_auc(y, p),
        "roc_auc_ci": roc_auc_ci(y, p, n_boot=n_boot, seed=seed),
        "pr_auc": average_precision(y, p),
        "log_loss": log_loss(y, p),
        "brier": brier_score(y, p),
        "ece": expected_calibration_error(y, p),
    }
    out.update(top_fraction_metrics(y, p))
    out["notes"] = notes
    return out


# --------------------------------------------------------------------------------------------
# Comparing models


def compare_to_reference(y, probas: dict[str, np.ndarray], baselines=("logreg", "lightgbm"),
                         n_boot: int = 1000, seed: int = 0) -> dict:
    """Paired ΔAUC of every model against the best baseline (highest test ROC-AUC).

    Returns ``{model: {"reference": name, "diff": .., "ci": [lo, hi]}}`` for every model except
    the reference itself; empty when no baseline is among ``probas`` or none has an AUC.
    """
    aucs = {b: roc_auc(y, probas[b]) for b in baselines if b in probas}
    aucs = {b: a for b, a in aucs.items() if a is not None}
    if not aucs:
        return {}
    ref = max(aucs, key=aucs.get)
    out = {}
    for name, p in probas.items():
        if name != ref:
            out[name] = {"reference": ref, **paired_auc_difference(y, p, probas[ref], n_boot, seed)}
    return out


def _fmt(x: Optional[float], digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _fmt_ci(ci) -> str:
    return "" if not ci or ci[0] is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def _fmt_delta(d: Optional[dict]) -> str:
    return "-" if not d or d.get("diff") is None else f"{d['diff']:+.4f}{_fmt_ci(d.get('ci'))}"


_PAIRED_HEADS = {"pr_auc": "ΔPR-AUC [95% CI]", "log_loss": "Δlog loss [95% CI]", "lift_top_10pct": "Δlift@10% [95% CI]"}


def comparison_table(results: dict[str, dict], paired: Optional[dict[str, dict]] = None) -> str:
    """One plain-text table comparing models on their ``binary_metrics`` results.

    Parameters
    ----------
    results : dict
        Model name -> ``binary_metrics`` dict (test split).
    paired : dict, optional
        Model name -> ``{"reference": name, "diff": .., "ci": [..]}`` as returned by
        ``compare_to_reference``; shown as the ΔAUC column. The paired PR-AUC, log loss and
        lift@10% differences of ``paired_auc_difference`` get a column each when present.
    """
    paired = paired or {}
    extra = [m for m in PAIRED_METRICS if any(m in v for v in paired.values())]
    head = ["model", "n", "pos", "ROC-AUC [95% CI]", "PR-AUC", "log loss", "Brier", "ECE", "lift@10%",
            "ΔAUC vs best baseline [95% CI]"] + [_PAIRED_HEADS[m] for m in extra]
    rows = [head]
    for name, m in results.items():
        d = paired.get(name)
        if d is None or d.get("diff") is None:
            delta = "(reference)" if any(v.get("reference") == name for v in paired.values()) else "-"
        else:
            delta = f"{d['diff']:+.4f}{_fmt_ci(d.get('ci'))} vs {d.get('reference', '?')}"
        rows.append([
            name, str(m.get("n", "-")), str(m.get("positives", "-")),
            _fmt(m.get("roc_auc")) + _fmt_ci(m.get("roc_auc_ci")),
            _fmt(m.get("pr_auc")), _fmt(m.get("log_loss")), _fmt(m.get("brier")), _fmt(m.get("ece")),
            _fmt(m.get("lift", {}).get("top_10pct"), 2), delta,
        ] + [_fmt_delta((d or {}).get(k)) for k in extra])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
