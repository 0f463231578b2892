"""Differential privacy: the accountant's ε meets the requested budget, a budget the data cannot give is
refused before training, users (not examples) are the unit, and DP runs record their ε in run.json,
metrics.json and the report; LightGBM refuses ``dp_epsilon``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_workspace

from purchase_intent import cli, pipeline, runs
from purchase_intent.config import TrainConfig
from purchase_intent.dp import DPConfig, PrivacyBudgetError, UserSampler, check_budget, plan, train_dp
from purchase_intent.models.baselines import LogisticRegressionModel, _LinearLogit

pytest.importorskip("opacus")


def _linear_data(n_users: int = 400, per_user: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = n_users * per_user
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(np.float32)
    groups = np.repeat(np.arange(n_users), per_user)
    return {"x": x, "label": y}, groups


def _collate(d, rows):
    return {"x": torch.from_numpy(d["x"][rows])}


def test_accountant_epsilon_is_within_and_close_to_the_budget():
    data, groups = _linear_data()
    for eps in (1.0, 4.0):
        cfg = DPConfig(epsilon=eps, users_per_step=100, epochs=3, lr=0.05)
        p = plan(cfg, 400)
        assert p.delta == pytest.approx(1 / 400) and p.sample_rate == pytest.approx(0.25) and p.steps == 12
        net = _LinearLogit(4)
        record = train_dp(net, data, groups, cfg, p, _collate, seed=1)
        assert record["unit"] == "user" and record["epsilon_target"] == eps
        assert 0.95 * eps <= record["epsilon"] <= eps  # calibrated noise: the budget, not far below it
    assert net.linear.weight[0, 0] > 0  # it learned the signal despite the noise (ε = 4)


def test_users_are_sampled_whole_with_at_most_k_examples():
    """A step's row of the per-user gradient holds examples of one user only, each user at most once."""
    groups = np.array(["a"] * 5 + ["b"] * 1 + ["c"] * 3)
    sampler = UserSampler(groups, k=2, rng=np.random.default_rng(0))
    rows, w = sampler.sample(1.0)
    assert rows.shape == (3, 2) and w.sum(axis=1).tolist() == [2, 1, 2]
    assert [set(groups[r]) for r in rows] == [{"a"}, {"b"}, {"c"}]
    assert len(set(rows[0])) == 2  # two distinct examples of user a
    n = [len(sampler.sample(0.3)[0]) for _ in range(2000)]
    assert abs(np.mean(n) - 0.9) < 0.1  # Poisson: each of 3 users with probability 0.3


@pytest.mark.parametrize("eps,delta,match", [(0, None, "> 0"), (-1, None, "> 0"), ("x", None, "a number"),
                                             (float("inf"), None, "no privacy"), (1, 1.0, r"in \(0, 1\)"),
                                             (1, 0, r"in \(0, 1\)")])
def test_invalid_budgets_are_refused(eps, delta, match):
    with pytest.raises(PrivacyBudgetError, match=match):
        check_budget(eps, delta)


def test_a_budget_the_data_cannot_give_is_refused_before_training():
    with pytest.raises(PrivacyBudgetError, match=r"cannot be met with 100 train users"):
        plan(DPConfig(epsilon=0.05), 100)
    assert plan(DPConfig(epsilon=8), 100).noise_multiplier < 10  # the same users give ε = 8
    with pytest.raises(PrivacyBudgetError, match="at least 2 users"):
        plan(DPConfig(epsilon=8), 1)


def test_dp_logreg_uses_fixed_transform_and_refuses_without_groups():
    data, groups = _linear_data(n_users=200, per_user=2)
    X, y = data["x"].astype(np.float64) * 100, data["label"].astype(int)
    with pytest.raises(ValueError, match="needs the user of each train example"):
        LogisticRegressionModel(dp_epsilon=8).fit(X, y)
    m = LogisticRegressionModel(dp_epsilon=8, dp_users_per_step=100, dp_epochs=3, dp_feature_bound=3,
                                tabular_scaling="fixed").fit(X, y, groups=groups)
    assert (m.mean_ == 0).all() and (m.scale_ == 1).all() and m.privacy_["epsilon"] <= 8
    Z = m._standardise(X)
    assert np.abs(Z).max() <= 3  # clipped to the fixed range
    np.testing.assert_allclose(Z, np.clip(np.sign(X) * np.log1p(np.abs(X)), -3, 3))


def test_lightgbm_and_pretrained_models_refuse_dp():
    with pytest.raises(ValueError, match="lightgbm cannot train with differential privacy.*no well-kept library"):
        pipeline.check_params("lightgbm", {"dp_epsilon": 3})
    with pytest.raises(ValueError, match="transformer_pt cannot train with differential privacy"):
        pipeline.check_params("transformer_pt", {"dp_epsilon": 3})
    pipeline.check_params("logreg", {"dp_epsilon": 3, "dp_delta": 1e-5})
    pipeline.check_params("transformer", {"dp_epsilon": 3})


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("dp-ws"), n_users=80, days=28)


def test_dp_runs_record_the_accountants_epsilon(ws):
    cfg = TrainConfig(min_positives=1, min_negatives=1)
    built = runs.load_built(ws)
    n_users = built.examples.loc[built.mask("train"), "user_id"].nunique()
    for model, params in (("logreg", {"dp_epsilon": 8, "dp_epochs": 2}),
                          ("transformer", {"dp_epsilon": 8, "dp_epochs": 1, "preset": "tiny"})):
        pipeline.train(model, run=f"{model}-dp", params=params, train_cfg=cfg, workspace=ws, quiet=True)
        metrics = pipeline.evaluate(f"{model}-dp", ws, n_boot=10, quiet=True)
        meta = runs.read_meta(ws.run_dir(f"{model}-dp"))
        on_disk = json.loads((ws.run_dir(f"{model}-dp") / runs.METRICS_JSON).read_text())
        for rec in (meta["privacy"], metrics["privacy"], on_disk["privacy"]):
            assert rec["unit"] == "user" and 0.9 * 8 <= rec["epsilon"] <= 8
            assert "per user" in rec["guarantee"]
            assert rec["delta"] == pytest.approx(1 / n_users)
        assert metrics["test"]["n"] > 0
    # the saved DP transformer reloads with its record and scores the same
    loaded = runs.load_run("transformer-dp", ws)
    assert loaded.model.privacy_["epsilon"] <= 8 and loaded.model.model_config_.dropout == 0.0
    assert "price" not in loaded.model.model_config_.field_sizes
    from purchase_intent.report import write_report
    html = write_report(ws, runs=["logreg-dp", "transformer-dp"], explain=False).read_text()
    assert "accountant epsilon" in html and "per user" in html


def test_a_dp_transformer_keeps_the_price_field_only_with_public_edges(ws):
    """Quantile price edges are statistics of the train events: a DP fit leaves the field out. Edges
    fixed from price_range alone (price_bucketing="log") reveal nothing, and the field is kept."""
    from purchase_intent.sequences import SequenceConfig, public_price_edges
    cfg = TrainConfig(min_positives=1, min_negatives=1)
    seq = {"price_bucketing": "log", "price_range": [1.0, 1000.0], "price_buckets": 8}
    pipeline.train("transformer", run="transformer-dp-logprice", train_cfg=cfg, workspace=ws, quiet=True,
                   params={"dp_epsilon": 8, "dp_epochs": 1, "sequence": seq})
    model = runs.load_run("transformer-dp-logprice", ws).model
    assert model.vocab_.price_edges == public_price_edges(SequenceConfig(**seq))
    assert model.model_config_.field_sizes["price"] == len(model.vocab_.price_edges) + 2
    assert model.privacy_["epsilon"] <= 8


def test_cli_refuses_with_one_line(ws, capsys):
    before = sorted(p.name for p in ws.runs_dir.iterdir()) if ws.runs_dir.exists() else []
    for argv, match in (
            (["train", "--model", "lightgbm", "--param", "dp_epsilon=3"], "no well-kept library"),
            (["train", "--model", "logreg", "--param", "dp_epsilon=0.01", "--min-positives", "1",
              "--min-negatives", "1"], "cannot be met with"),
            (["train", "--model", "logreg", "--param", "dp_epsilon=-1"], "must be > 0"),
            (["train", "--model", "transformer", "--param", "dp_epsilon=8", "--param",
              'sequence={"price_bucketing": "log", "price_range": [10, 1]}'], "0 < low < high"),
            (["train", "--model", "transformer", "--param", 'tabular_scaling="none"', "--min-positives", "1",
              "--min-negatives", "1"], "'train', 'fixed' or 'dp'")):
        rc = cli.main(["--workspace", str(ws.root), *argv])
        err = capsys.readouterr().err.strip()
        assert rc != 0 and match in err and len(err.splitlines()) == 1, err
    after = sorted(p.name for p in ws.runs_dir.iterdir()) if ws.runs_dir.exists() else []
    assert before == after  # nothing written


def test_the_dp_forward_equals_the_models_own():
    from purchase_intent.models.classifier import _dp_logits
    from purchase_intent.models.transformer import BehaviourTransformer, preset

    torch.manual_seed(0)
    net = BehaviourTransformer(preset("tiny", field_sizes={"event": 7, "hour": 25}, n_tabular=3, dropout=0.0)).eval()
    batch = {"tokens": torch.randint(0, 7, (4, 6, 2)), "mask": torch.rand(4, 6) > 0.3, "tabular": torch.randn(4, 3)}
    torch.testing.assert_close(_dp_logits(net, batch), net(batch)[0])
