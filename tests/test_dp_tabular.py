"""The DP release of the tabular mean and scale (``tabular_scaling="dp"``): near the true statistics at
a large ε and noisy at a small one, one user's influence bounded whatever their number of examples, its
ε composed with the training's within the budget, a budget too small for it refused before training,
and nothing changed for non-DP fits or the fixed transform."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_workspace

from purchase_intent import cli, dp_tabular, pipeline, runs
from purchase_intent.config import TrainConfig
from purchase_intent.dp import DPConfig, PrivacyBudgetError, _epsilon, plan, train_dp
from purchase_intent.models.baselines import LogisticRegressionModel, _LinearLogit
from purchase_intent.models.classifier import TransformerClassifier

pytest.importorskip("opacus")

B = 10.0


def _tabular(n_users: int = 3000, per_user: int = 3, seed: int = 0):
    """Log-scale features N(mu, sd) per column (one column 40% missing), as raw values."""
    rng = np.random.default_rng(seed)
    mu, sd = np.array([2.0, 4.0, 0.5, 6.0]), np.array([0.5, 1.5, 0.2, 1.0])
    t = mu + sd * rng.normal(size=(n_users * per_user, 4))
    t[rng.random(len(t)) < 0.4, 3] = np.nan
    return np.expm1(t), np.repeat(np.arange(n_users), per_user), mu, sd


def _release(X, groups, epsilon, k=3, seed=0):
    p = plan(DPConfig(epsilon=epsilon, tabular_share=0.1), len(np.unique(groups)))
    t = dp_tabular.public_transform(X, B)
    return dp_tabular.release(t, groups, k, p.release_noise_multiplier, B, np.random.default_rng(seed))


def test_the_release_is_near_the_truth_at_a_large_epsilon_and_noisy_at_a_small_one():
    X, groups, mu, sd = _tabular()
    t = dp_tabular.public_transform(X, B)
    true_mean, true_sd = np.nanmean(t, axis=0), np.nanstd(t, axis=0)
    np.testing.assert_allclose(true_mean, mu, atol=0.05)
    mean, scale, record = _release(X, groups, epsilon=1000)
    assert record["features_fixed"] == 0 and record["n_features"] == 4
    np.testing.assert_allclose(mean, true_mean, atol=0.02)
    _, _, with_labels = dp_tabular.release(t, groups, 3, 0.01, B, np.random.default_rng(0),
                                           labels=(np.arange(len(t)) % 4 == 0))
    assert abs(with_labels["positive_rate"] - 0.25) < 0.01
    assert dp_tabular.initial_bias(with_labels) == pytest.approx(math.log(1 / 3), abs=0.05)
    np.testing.assert_allclose(scale, true_sd, rtol=0.1)  # sqrt(pi/2) * mean absolute deviation of a normal
    errors = {}
    for eps in (1000, 1.0):
        runs_ = [_release(X, groups, eps, seed=s) for s in range(5)]
        errors[eps] = np.mean([np.abs(m - true_mean).mean() for m, _, _ in runs_])
        assert all((s >= dp_tabular.SCALE_FLOOR).all() for _, s, _ in runs_)
    assert errors[1.0] > 10 * errors[1000]  # more noise at a smaller budget


def test_one_user_with_1000_examples_moves_the_sums_no_more_than_the_bound():
    X, groups, _, _ = _tabular(n_users=200)
    t = dp_tabular.public_transform(X, B)
    heavy = np.full((1000, 4), B)  # one user: 1,000 examples, every value at the bound
    heavy[::2] = -B
    t2, g2 = np.vstack([t, heavy]), np.concatenate([groups, np.full(1000, 10_000)])
    k, D = 2, dp_tabular.DEVIATION_BOUND
    centre = np.zeros(4)  # round 2 reads the released round-1 mean: the same for both datasets
    for seed in range(5):
        rows = dp_tabular.per_user_rows(g2, k, np.random.default_rng(seed))
        assert (g2[rows] == 10_000).sum() == k  # at most k examples of a user are read
        without = rows[g2[rows] != 10_000]
        a = dp_tabular.user_sums(t2, rows, centre, D)
        b = dp_tabular.user_sums(t2, without, centre, D)
        diffs = [np.abs(x - y) for x, y in zip(a, b)]
        assert (diffs[0] <= k).all() and (diffs[1] <= k * B).all() and (diffs[2] <= k * D).all()
        labels = np.ones(len(g2))  # the heavy user's examples all positive: rows and positives both move
        rows_and_positives = np.array([len(rows) - len(without), labels[rows].sum() - labels[without].sum()])
        assert (rows_and_positives <= k).all()
        w = dp_tabular.label_weight(4)
        normalised = np.concatenate([diffs[0] / k, diffs[1] / (k * B), diffs[2] / (k * D),
                                     w * rows_and_positives / k])
        bound = dp_tabular.sensitivity(4, labels=True)
        assert np.linalg.norm(normalised) <= bound + 1e-9  # the sensitivity the noise is for
        assert bound == pytest.approx(math.sqrt(4 * 4))  # 3F, and a quarter of it for the two label sums


def test_the_accountant_covers_release_and_training_within_the_budget():
    rng = np.random.default_rng(0)
    n_users, per_user = 400, 3
    x = rng.normal(size=(n_users * per_user, 4)).astype(np.float32)
    data = {"x": x, "label": (x[:, 0] > 0).astype(np.float32)}
    groups = np.repeat(np.arange(n_users), per_user)
    for eps in (2.0, 8.0):
        cfg = DPConfig(epsilon=eps, users_per_step=100, epochs=3, lr=0.05, tabular_share=0.2)
        p = plan(cfg, n_users)
        assert p.release_noise_multiplier is not None
        assert _epsilon([(p.release_noise_multiplier, 1.0, 1)], p.delta) <= 0.2 * eps  # the release's share
        record = train_dp(_LinearLogit(4), data, groups, cfg, p,
                          lambda d, rows: {"x": torch.from_numpy(d["x"][rows])}, seed=0)
        assert 0.95 * eps <= record["epsilon"] <= eps
        training_alone = _epsilon([(p.noise_multiplier, p.sample_rate, p.steps)], p.delta)
        assert record["epsilon"] > training_alone  # the release is in the accountant's ε
        assert record["release_noise_multiplier"] == p.release_noise_multiplier
    # without a share the plan is the one it always was: no release, Opacus's own calibration
    assert plan(DPConfig(epsilon=8, users_per_step=100, epochs=3), n_users).release_noise_multiplier is None


def test_a_budget_too_small_for_the_release_is_refused_before_training(monkeypatch):
    with pytest.raises(PrivacyBudgetError, match="too small a budget for the release of the tabular statistics"):
        plan(DPConfig(epsilon=0.3, tabular_share=0.1), 7597)
    with pytest.raises(PrivacyBudgetError, match="after the release of the tabular statistics"):
        plan(DPConfig(epsilon=0.5, tabular_share=0.9), 300)
    plan(DPConfig(epsilon=0.5), 300)  # the same budget without the release trains
    X, groups, _, _ = _tabular(n_users=300)
    y = (np.arange(len(X)) % 2).astype(int)

    def no_training(*a, **k):
        raise AssertionError("trained")
    monkeypatch.setattr("purchase_intent.dp.train_dp", no_training)
    with pytest.raises(PrivacyBudgetError, match="tabular statistics"):
        LogisticRegressionModel(dp_epsilon=0.5, tabular_scaling="dp", dp_tabular_share=0.9).fit(X, y, groups=groups)
    for share in (0, 1, 1.5, -0.1, "x"):
        with pytest.raises(PrivacyBudgetError, match=r"dp_tabular_share must be"):
            LogisticRegressionModel(dp_epsilon=8, tabular_scaling="dp", dp_tabular_share=share).fit(
                X, y, groups=groups)


def test_dp_logreg_standardises_with_the_release_and_the_fixed_transform_is_unchanged():
    X, groups, mu, sd = _tabular()
    y = (np.log1p(X[:, 0]) > 2).astype(int)
    kw = dict(dp_epsilon=8, dp_users_per_step=300, dp_epochs=2, dp_noise_seed=5)  # reproducible, to compare fits
    fixed = LogisticRegressionModel(tabular_scaling="fixed", **kw).fit(X, y, groups=groups)
    assert (fixed.mean_ == 0).all() and (fixed.scale_ == 1).all() and "tabular_release" not in fixed.privacy_
    m = LogisticRegressionModel(tabular_scaling="dp", **kw).fit(X, y, groups=groups)
    default = LogisticRegressionModel(**kw).fit(X, y, groups=groups)
    np.testing.assert_array_equal(default.coef_, m.coef_)  # the default DP mode is the release
    assert m.privacy_["epsilon"] <= 8 and m.privacy_["tabular_release"]["features_fixed"] == 0
    np.testing.assert_allclose(m.mean_, mu, atol=0.3)
    rate = m.privacy_["tabular_release"]["positive_rate"]
    assert abs(rate - y.mean()) < 0.1
    Z = m._standardise(X)
    assert np.isfinite(Z).all() and np.abs(Z).max() <= m.dp_feature_bound
    assert abs(np.nanmean(Z[:, 1])) < 0.3 and 0.7 < np.nanstd(Z[:, 1]) < 1.3  # centred and scaled


def test_dp_noise_is_secret_unless_a_noise_seed_is_given():
    """The noise, the users sampled and the release come from the OS's entropy: two fits with the same
    random_state (saved with the run) differ, so that no saved seed replays the noise; dp_noise_seed makes
    them reproducible, and the record says which."""
    X, groups, _, _ = _tabular(n_users=300)
    y = (np.log1p(X[:, 0]) > 2).astype(int)
    kw = dict(dp_epsilon=8, dp_users_per_step=100, dp_epochs=1, random_state=0)
    a, b = (LogisticRegressionModel(**kw).fit(X, y, groups=groups) for _ in range(2))
    assert not np.array_equal(a.coef_, b.coef_) and not np.array_equal(a.mean_, b.mean_)
    assert "not replayable" in a.privacy_["noise"] and a.privacy_["config"]["noise_seed"] is None
    c, d = (LogisticRegressionModel(dp_noise_seed=3, **kw).fit(X, y, groups=groups) for _ in range(2))
    np.testing.assert_array_equal(c.coef_, d.coef_)
    assert "replayable by whoever knows it" in c.privacy_["noise"]
    with pytest.raises(ValueError, match="dp_noise_seed must be a whole number"):
        TransformerClassifier(dp_epsilon=8, dp_noise_seed=-1).check_settings()


def test_non_dp_fits_are_unchanged():
    X, groups, _, _ = _tabular(n_users=300)
    y = (np.log1p(X[:, 0]) > 2).astype(int)
    a = LogisticRegressionModel().fit(X, y)
    b = LogisticRegressionModel(tabular_scaling="train").fit(X, y)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    assert a.privacy_ is None
    with pytest.raises(ValueError, match="needs dp_epsilon"):
        LogisticRegressionModel(tabular_scaling="dp").fit(X, y)
    with pytest.raises(ValueError, match="statistics of the private train data"):
        LogisticRegressionModel(dp_epsilon=8, tabular_scaling="train").fit(X, y, groups=groups)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("dp-tab-ws"), n_users=80, days=28)


def test_a_dp_transformer_run_records_the_release(ws):
    cfg = TrainConfig(min_positives=1, min_negatives=1)
    pipeline.train("transformer", run="transformer-dptab", train_cfg=cfg, workspace=ws, quiet=True,
                   params={"dp_epsilon": 8, "dp_epochs": 1, "tabular_scaling": "dp"})
    meta = json.loads((ws.run_dir("transformer-dptab") / "run.json").read_text())
    privacy = meta["privacy"]
    assert privacy["epsilon"] <= 8 and privacy["config"]["tabular_share"] == 0.1
    assert privacy["tabular_release"]["noise_multiplier"] == privacy["release_noise_multiplier"]
    model = runs.load_run("transformer-dptab", ws).model
    assert (model.tab_scale_ >= dp_tabular.SCALE_FLOOR).all()
    assert np.isfinite(model.to_batch(runs.model_inputs("transformer", runs.load_built(ws), np.arange(3), ws,
                                                        model.vocab_))["tabular"].numpy()).all()


def test_cli_refuses_bad_tabular_settings_in_one_line(ws, capsys):
    for params, match in ((["dp_epsilon=8", 'tabular_scaling="dp"', "dp_tabular_share=0"], "in (0, 1)"),
                          (["dp_epsilon=8", 'tabular_scaling="dp"', "dp_tabular_share=1"], "in (0, 1)"),
                          (['tabular_scaling="dp"'], "needs dp_epsilon"),
                          (["dp_epsilon=8", 'tabular_scaling="train"'], "private train data"),
                          (["dp_tabular_share=0.2"], "without dp_epsilon"),
                          (["dp_epsilon=8", 'tabular_scaling="fixed"', "dp_tabular_share=0.2"],
                           "budget of tabular_scaling")):
        argv = ["--workspace", str(ws.root), "train", "--model", "transformer", "--run", "refused"]
        for p in params:
            argv += ["--param", p]
        rc = cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert rc != 0 and match in err and len(err.splitlines()) == 1, err
        assert not ws.run_dir("refused").exists()


def test_dp_logreg_on_a_small_imbalanced_shop_ranks_above_chance_by_default():
    """Activity-like features (all positive, uncentred) and a rare label that rises with one of them, 600
    users: 12 DP steps. With the fixed transform every weight first moves the same way (against the majority
    class: Adam's per-coordinate steps) and the bias starts at 0, so the model ranks *below* chance; the
    default release centres the features and starts the bias at the released share of positives."""
    from sklearn.metrics import roc_auc_score
    X, groups, _, _ = _tabular(n_users=600)
    rng = np.random.default_rng(0)
    t = np.log1p(X[:, 0])
    y = (rng.random(len(X)) < 1 / (1 + np.exp(-(-2.6 + 3.0 * (t - 2))))).astype(int)
    assert 0.08 < y.mean() < 0.2
    auc = {}
    for scaling in ("fixed", None):
        m = LogisticRegressionModel(dp_epsilon=8, tabular_scaling=scaling, random_state=0,  # one noise draw:
                                    dp_noise_seed=0).fit(X, y, groups=groups)  # the test is of the transform
        assert m.privacy_["steps"] < 20 and m.privacy_["epsilon"] <= 8
        auc[scaling] = roc_auc_score(y, m.predict_proba(X)[:, 1])
    assert auc[None] > 0.7, auc
    assert auc["fixed"] < 0.5, auc  # the failure the default avoids (BENCHMARKS.md, small shops)
