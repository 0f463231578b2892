"""Metrics against sklearn and brute force; bootstrap against a naive loop; edge cases."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, log_loss, roc_auc_score

from purchase_intent import evaluate as E

TEST_KEYS = {"n", "positives", "roc_auc", "roc_auc_ci", "pr_auc", "log_loss", "brier", "ece", "lift"}
TOPS = {"top_1pct", "top_5pct", "top_10pct", "top_20pct"}


def scores(n=2000, rate=0.1, signal=1.0, seed=0, decimals=None):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < rate).astype(int)
    p = 1 / (1 + np.exp(-(signal * y - 2 + rng.normal(size=n))))
    return y, (np.round(p, decimals) if decimals is not None else p)


@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_point_metrics_match_sklearn(decimals):
    y, p = scores(decimals=decimals)
    m = E.binary_metrics(y, p, n_boot=50)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert m["log_loss"] == pytest.approx(log_loss(y, p), abs=1e-9)
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert m["base_rate"] == pytest.approx(y.mean())
    assert TEST_KEYS <= set(m) and set(m["lift"]) == set(m["precision"]) == set(m["recall"]) == TOPS
    json.dumps(m, allow_nan=False)  # plain JSON, no NaN


def test_bootstrap_equals_naive_loop():
    y, p = scores(n=300, decimals=2)
    n_boot, seed = 40, 3
    fast = E._bootstrap_aucs(y, [p], n_boot, seed)[:, 0]
    # the same draws, done one resample at a time with sklearn
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    dp = rng.integers(0, pos.size, size=(n_boot, pos.size), dtype=np.int32)
    dn = rng.integers(0, neg.size, size=(n_boot, neg.size), dtype=np.int32)
    naive = [roc_auc_score(np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[p[pos[a]], p[neg[b]]])
             for a, b in zip(dp, dn)]
    np.testing.assert_allclose(fast, naive, atol=1e-12)


def test_ci_brackets_estimate_and_is_seeded():
    y, p = scores(n=3000)
    m1 = E.binary_metrics(y, p, n_boot=300, seed=1)
    m2 = E.binary_metrics(y, p, n_boot=300, seed=1)
    lo, hi = m1["roc_auc_ci"]
    assert lo < m1["roc_auc"] < hi and hi - lo < 0.1
    assert m1["roc_auc_ci"] == m2["roc_auc_ci"]
    assert E.binary_metrics(y, p, n_boot=0)["roc_auc_ci"] is None


def test_paired_difference():
    y, p = scores(n=3000)
    same = E.paired_auc_difference(y, p, p.copy(), n_boot=100)
    assert same["diff"] == 0 and same["ci"] == [0.0, 0.0]
    noisy = p + np.random.default_rng(9).normal(scale=0.1, size=p.size)
    d = E.paired_auc_difference(y, p, noisy, n_boot=200)
    assert d["diff"] == pytest.approx(roc_auc_score(y, p) - roc_auc_score(y, noisy))
    assert 0 < d["ci"][0] < d["diff"] < d["ci"][1]
    # the same draws for both models: far narrower than resampling each model independently
    a = E._bootstrap_aucs(y, [p], 200, seed=1)[:, 0]
    b = E._bootstrap_aucs(y, [noisy], 200, seed=2)[:, 0]
    unpaired = np.quantile(a - b, [0.025, 0.975])
    assert d["ci"][1] - d["ci"][0] < 0.5 * (unpaired[1] - unpaired[0])


def test_single_class_and_empty():
    m = E.binary_metrics(np.zeros(50, int), np.linspace(0, 1, 50))
    assert m["roc_auc"] is None and m["roc_auc_ci"] is None and m["pr_auc"] is None
    assert "one class" in m["notes"][0]
    assert m["lift"]["top_10pct"] is None and m["recall"]["top_10pct"] is None
    assert m["precision"]["top_10pct"] == 0.0 and m["log_loss"] is not None
    json.dumps(m, allow_nan=False)
    empty = E.binary_metrics([], [])
    assert empty["n"] == 0 and empty["roc_auc"] is None and empty["ece"] is None
    assert empty["lift"]["top_1pct"] is None
    json.dumps(empty, allow_nan=False)
    assert E.paired_auc_difference(np.ones(5, int), np.ones(5), np.ones(5))["diff"] is None


def test_lift_precision_recall():
    n = 1000
    y = np.zeros(n, int)
    y[:50] = 1  # base rate 5%
    perfect = np.linspace(1, 0, n)
    m = E.top_fraction_metrics(y, perfect)
    assert m["precision"]["top_1pct"] == 1.0 and m["lift"]["top_1pct"] == pytest.approx(20.0)
    assert m["recall"]["top_5pct"] == 1.0 and m["lift"]["top_10pct"] == pytest.approx(10.0)
    # all scores tied: the top bucket is an average over the tie, so lift is exactly 1
    flat = E.top_fraction_metrics(y, np.full(n, 0.3))
    assert flat["lift"]["top_1pct"] == pytest.approx(1.0) and flat["recall"]["top_20pct"] == pytest.approx(0.2)
    tiny = E.top_fraction_metrics([1, 0, 0], [0.9, 0.1, 0.2])  # top 1% of 3 is one example
    assert tiny["precision"]["top_1pct"] == 1.0


def test_ece_and_reliability():
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    y = (rng.random(p.size) < p).astype(int)
    assert E.expected_calibration_error(y, p) < 0.02
    assert E.expected_calibration_error(y, np.clip(p * 0.5, 0, 1)) > 0.2
    y2 = np.r_[np.ones(100, int), np.zeros(900, int)]
    assert E.expected_calibration_error(y2, np.full(1000, 0.5)) == pytest.approx(0.4)
    curve = E.reliability_curve(y, p, n_bins=10)
    assert sum(curve["count"]) == p.size and len(curve["count"]) == 10
    assert curve["mean_predicted"] == sorted(curve["mean_predicted"])


def test_f1_helpers():
    y, p = scores(n=500, signal=2.0)
    assert E.f1_at_threshold(y, p, 0.5) == pytest.approx(f1_score(y, p >= 0.5))
    t, f1 = E.best_f1_threshold(y, p)
    brute = max(2 * ((p >= s) & (y == 1)).sum() / ((p >= s).sum() + y.sum()) for s in np.unique(p))
    assert f1 == pytest.approx(brute) and E.f1_at_threshold(y, p, t) == pytest.approx(f1)
    assert E.best_f1_threshold(np.zeros(5, int), np.ones(5)) == (None, None)


def test_comparison_table():
    y, p = scores(n=1000)
    noisy = p + np.random.default_rng(1).normal(scale=0.5, size=p.size)
    probas = {"logreg": noisy, "lightgbm": p, "transformer": (p + noisy) / 2}
    results = {k: E.binary_metrics(y, v, n_boot=50) for k, v in probas.items()}
    paired = E.compare_to_reference(y, probas, n_boot=50)
    assert set(paired) == {"logreg", "transformer"} and paired["logreg"]["reference"] == "lightgbm"
    table = E.comparison_table(results, paired)
    lines = table.splitlines()
    assert len(lines) == 5 and "ROC-AUC" in lines[0]
    assert "(reference)" in lines[3] and "vs lightgbm" in lines[2]
    assert "ΔPR-AUC" in lines[0] and "Δlog loss" in lines[0] and "Δlift@10%" in lines[0]
    only_auc = {k: {"reference": v["reference"], "diff": v["diff"], "ci": v["ci"]} for k, v in paired.items()}
    assert "ΔPR-AUC" not in E.comparison_table(results, only_auc)  # older metrics.json: no empty columns
    json.dumps(paired, allow_nan=False)


def naive_paired_boot(y, p_model, p_ref, n_boot, seed):
    """The obvious way: draw as the fast code does, then score each resample with sklearn / top_fraction_metrics."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    dp = rng.integers(0, pos.size, size=(n_boot, pos.size), dtype=np.int32)
    dn = rng.integers(0, neg.size, size=(n_boot, neg.size), dtype=np.int32)
    out = {m: np.empty((n_boot, 2)) for m in ("roc_auc", "pr_auc", "log_loss", "lift_top_10pct")}
    for r, (a, b) in enumerate(zip(dp, dn)):
        idx = np.r_[pos[a], neg[b]]
        for k, p in enumerate((p_model, p_ref)):
            yy, pp = y[idx], p[idx]
            out["roc_auc"][r, k] = roc_auc_score(yy, pp)
            out["pr_auc"][r, k] = average_precision_score(yy, pp)
            out["log_loss"][r, k] = log_loss(yy, np.clip(pp, E._EPS, 1 - E._EPS), labels=[0, 1])
            out["lift_top_10pct"][r, k] = E.top_fraction_metrics(yy, pp)["lift"]["top_10pct"]
    return out


@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_paired_bootstrap_equals_naive_loop(decimals):
    y, p = scores(n=400, decimals=decimals, seed=4)
    other = np.clip(p + np.random.default_rng(5).normal(scale=0.1, size=p.size), 0, 1)
    if decimals is not None:
        other = np.round(other, decimals)
    n_boot, seed = 30, 7
    metrics = ("roc_auc",) + E.PAIRED_METRICS
    fast = E._bootstrap_metrics(y, [p, other], n_boot, seed, metrics)
    naive = naive_paired_boot(y, p, other, n_boot, seed)
    for m in metrics:
        np.testing.assert_allclose(fast[m], naive[m], rtol=1e-9, atol=1e-12, err_msg=m)
    res = E.paired_difference(y, p, other, metrics, n_boot=n_boot, seed=seed)
    for m in metrics:
        assert res[m]["ci"] == pytest.approx(list(np.quantile(naive[m][:, 0] - naive[m][:, 1], [0.025, 0.975])))
    assert res["pr_auc"]["diff"] == pytest.approx(average_precision_score(y, p) - average_precision_score(y, other))
    assert res["log_loss"]["diff"] == pytest.approx(log_loss(y, p) - log_loss(y, other))


def test_paired_bootstrap_keeps_auc_draws_and_orders():
    y, p = scores(n=3000, decimals=3)
    noisy = np.round(np.clip(p + np.random.default_rng(9).normal(scale=0.3, size=p.size), 0, 1), 3)
    # ROC-AUC alone and ROC-AUC beside the other metrics: the very same numbers for the same seed
    alone = E._bootstrap_aucs(y, [p, noisy], 200, seed=3)
    d = E.paired_auc_difference(y, p, noisy, n_boot=200, seed=3)
    assert d["ci"] == E._percentile_ci(alone[:, 0] - alone[:, 1]) and d["n_boot"] == 200
    assert set(d) == {"diff", "ci", "n_boot", "pr_auc", "log_loss", "lift_top_10pct"}
    # identical predictions: every difference is exactly zero, in every resample
    same = E.paired_auc_difference(y, p, p.copy(), n_boot=100)
    for m in E.PAIRED_METRICS:
        assert same[m] == {"diff": 0.0, "ci": [0.0, 0.0]}, m
    # a clearly better model: intervals above zero (below zero for log loss, lower is better)
    assert 0 < d["pr_auc"]["ci"][0] < d["pr_auc"]["diff"] < d["pr_auc"]["ci"][1]
    assert 0 < d["lift_top_10pct"]["ci"][0] and d["log_loss"]["ci"][1] < 0
    # ... and the converse: swapping the models flips the intervals to the other side of zero
    r = E.paired_auc_difference(y, noisy, p, n_boot=200, seed=3)
    assert r["pr_auc"]["ci"][1] < 0 and r["lift_top_10pct"]["ci"][1] < 0 and r["log_loss"]["ci"][0] > 0
    json.dumps(d, allow_nan=False)


def test_paired_difference_edge_cases():
    y, p = scores(n=200)
    with pytest.raises(ValueError, match="unknown metric"):
        E.paired_difference(y, p, p, metrics=("accuracy",))
    one = E.paired_auc_difference(np.zeros(20, int), np.linspace(0, 1, 20), np.full(20, 0.5), n_boot=50)
    assert one["diff"] is None and one["pr_auc"] == {"diff": None, "ci": None}
    assert one["log_loss"]["diff"] is not None and one["log_loss"]["ci"] is None  # defined, but no stratified resample
    no_boot = E.paired_difference(y, p, 1 - p, n_boot=0)
    assert all(v["ci"] is None and v["diff"] is not None for v in no_boot.values())
    json.dumps(one, allow_nan=False)


@pytest.mark.slow
def test_bootstrap_speed_100k():
    y, p = scores(n=100_000, decimals=4)
    start = time.perf_counter()
    E.roc_auc_ci(y, p, n_boot=1000)
    assert time.perf_counter() - start < 10
