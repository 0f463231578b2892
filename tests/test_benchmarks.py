"""Benchmark scripts on a tiny real workspace: they must run on what the pipeline writes."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_explain import make_workspace

from purchase_intent import pipeline

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def backtested_ws(tmp_path_factory) -> Path:
    root = make_workspace(tmp_path_factory.mktemp("benchmarks") / "ws", n_users=200)
    for m in ("logreg", "lightgbm"):
        pipeline.evaluate(m, root, backtest=1, n_boot=0, quiet=True)
    return root


def test_order_signal_reads_only_test_rows_of_a_backtested_run(backtested_ws, capsys):
    ws = backtested_ws
    pred = pd.read_parquet(ws / "runs" / "logreg" / "predictions.parquet")
    test = pred[pred["split"] == "test"]
    # the case that broke it: backtest rows reuse example ids, with other probabilities
    assert set(pred["split"]) >= {"test", "backtest"} and pred["example_id"].duplicated().any()
    order_signal = load_script("order_signal")
    logits = order_signal.test_logits(str(ws), "logreg", pd.Index(test["example_id"]))
    p = test["probability"].clip(1e-9, 1 - 1e-9).to_numpy()
    np.testing.assert_allclose(logits.to_numpy(), np.log(p / (1 - p)))

    result = order_signal.main(["--workspace", str(ws), "--runs", "logreg"])
    out = capsys.readouterr().out
    assert "stacked on ['lightgbm', 'logreg', 'recent_revisit']" in out
    assert set(result["lightgbm_test_auc"]) == {"built features", "built features + order quantities"}
    assert 0.5 < result["stacked"]["logreg"]["held_out_auc"] <= 1.0


def test_order_signal_names_a_run_that_was_not_evaluated(backtested_ws):
    order_signal = load_script("order_signal")
    with pytest.raises(FileNotFoundError, match="evaluate run 'transformer' first"):
        order_signal.test_logits(str(backtested_ws), "transformer", pd.Index(["x"]))
    with pytest.raises(ValueError, match="no test prediction for 1 test examples"):
        order_signal.test_logits(str(backtested_ws), "logreg", pd.Index(["not-an-example"]))


def test_seed_subsets_mean_logit_against_the_reference(backtested_ws, capsys):
    from sklearn.metrics import roc_auc_score

    seed_subsets = load_script("seed_subsets")
    res = seed_subsets.main(["--workspace", str(backtested_ws), "--members", "logreg,lightgbm",
                             "--reference", "lightgbm", "--paired", "1;0-1", "--n-boot", "100"])
    assert set(res) == {"test", "backtest"}
    pred = {r: pd.read_parquet(backtested_ws / "runs" / r / "predictions.parquet").query("split == 'test'")
            .set_index("example_id").sort_index() for r in ("logreg", "lightgbm")}
    y = pred["lightgbm"]["label"].to_numpy()
    p_lr, p_gb = (pred[r]["probability"].clip(1e-9, 1 - 1e-9).to_numpy() for r in ("logreg", "lightgbm"))
    ref = roc_auc_score(y, p_gb)
    logit = (np.log(p_lr / (1 - p_lr)) + np.log(p_gb / (1 - p_gb))) / 2
    k1, k2 = res["test"]["subsets"]
    # the best single member: lightgbm against itself (0) or logreg
    assert k1["subsets"] == 2 and k1["max"] == pytest.approx(max(0.0, roc_auc_score(y, p_lr) - ref))
    assert k1["min"] == pytest.approx(roc_auc_score(y, p_lr) - ref)
    assert k2["subsets"] == 1 and k2["mean"] == pytest.approx(roc_auc_score(y, logit) - ref)
    same = res["test"]["paired"]["1"]
    assert same["roc_auc"] == {"diff": 0.0, "ci": [0.0, 0.0]} and same["pr_auc"]["ci"] == [0.0, 0.0]
    assert "k=2" in capsys.readouterr().out
    with pytest.raises(ValueError, match="member positions must lie in 0..1"):
        seed_subsets.main(["--workspace", str(backtested_ws), "--members", "logreg,lightgbm", "--paired", "0-2"])


def test_tabular_seeds_on_the_uci_table(shared_data, capsys):
    table = shared_data / "uci_online_shoppers_intention" / "online_shoppers_intention.csv"
    rows = load_script("tabular_seeds").main(["--table", str(table), "--label", "Revenue", "--seeds", "0",
                                              "--n-boot", "50"])
    by_model = {r["model"]: r for r in rows}
    assert set(by_model) == {"logreg", "lightgbm"} and by_model["lightgbm"]["reference"] is None
    lr = by_model["logreg"]
    assert lr["reference"] == "lightgbm" and lr["d_pr_auc_ci"][0] <= lr["d_pr_auc"] <= lr["d_pr_auc_ci"][1]
    assert lr["d_roc_auc"] == pytest.approx(lr["roc_auc"] - by_model["lightgbm"]["roc_auc"])
    assert "lightgbm: test ROC-AUC over seeds 0:" in capsys.readouterr().out


def test_sim_ceiling_scores_every_example_from_the_simulated_state(backtested_ws):
    from purchase_intent.simulate import SimConfig
    from purchase_intent.workspace import Workspace

    ws = Workspace(backtested_ws)
    pred = pd.read_parquet(backtested_ws / "runs" / "lightgbm" / "predictions.parquet")
    sim_ceiling = load_script("sim_ceiling")
    c = sim_ceiling.ceiling_frame(ws, SimConfig(n_users=200, days=42, seed=3), 7, 20, 0, pd.Index(pred["example_id"]))
    assert set(c.index) == set(pred["example_id"]) and c.between(0, 1).all()
    y = pred.drop_duplicates("example_id").set_index("example_id")["label"]
    assert c.loc[y.index][y == 1].mean() > c.loc[y.index][y == 0].mean()  # buyers had the higher chance
    with pytest.raises(SystemExit, match="not the simulated shop"):  # another shop's users
        sim_ceiling.ceiling_frame(ws, SimConfig(n_users=100, days=42, seed=3), 7, 2, 0, pd.Index(pred["example_id"]))
