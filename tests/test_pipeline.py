"""End to end through the `purchase-intent` command and the pipeline API."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from purchase_intent import pipeline, runs
from purchase_intent.cli import main
from purchase_intent.config import DataConfig, LabelConfig, TrainConfig
from purchase_intent.simulate import SimConfig, write_events
from purchase_intent.workspace import Workspace

CLI = [sys.executable, "-m", "purchase_intent.cli"]


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shop") / "shop.csv.gz"
    write_events(SimConfig(n_users=1500, days=56, seed=3), path)
    return path


def test_every_command_has_help():
    out = subprocess.run(CLI + ["--help"], capture_output=True, text=True, check=True).stdout
    commands = ["ingest", "pseudonym", "build", "train", "evaluate", "run", "quickstart", "simulate",
                "score", "serve", "explain", "report"]
    for c in commands:
        assert c in out
        r = subprocess.run(CLI + [c, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage:" in r.stdout, c


def test_run_writes_metrics_backtest_and_paired_comparison(shop, tmp_path, capsys):
    ws = tmp_path / "ws"
    rc = main(["--workspace", str(ws), "run", "--data", str(shop), "--models", "logreg,lightgbm",
               "--lookback", "14d", "--horizon", "7d", "--step", "7d", "--backtest", "2", "--n-boot", "200",
               "--min-positives", "20", "--min-negatives", "20"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "ROC-AUC" in out and "pooled backtest" in out and "report:" in out
    for model in ("logreg", "lightgbm"):
        m = json.loads((ws / "runs" / model / "metrics.json").read_text())
        assert m["model"] == model and m["task"]["horizon"] == "7d"
        for key in ("n", "positives", "roc_auc", "roc_auc_ci", "pr_auc", "log_loss", "brier", "ece", "lift"):
            assert key in m["test"] and key in m["backtest"]["pooled"]
        assert set(m["test"]["lift"]) == {"top_1pct", "top_5pct", "top_10pct", "top_20pct"}
        assert len(m["backtest"]["folds"]) == 2
        assert m["backtest"]["pooled"]["n"] == sum(f["n"] for f in m["backtest"]["folds"])
        assert 0.5 < m["test"]["roc_auc"] <= 1.0
    paired = [json.loads((ws / "runs" / m / "metrics.json").read_text()).get("paired") for m in ("logreg", "lightgbm")]
    entry = next(p for p in paired if p)
    lo, hi = entry["test"]["ci"]
    assert lo <= entry["test"]["diff"] <= hi
    # the test window comes strictly after every training label window
    ex = pd.read_parquet(ws / "examples" / "examples.parquet")
    assert ex.loc[ex.split == "train", "label_end"].max() <= ex.loc[ex.split == "valid", "cutoff"].min()
    assert ex.loc[ex.split == "valid", "label_end"].max() <= ex.loc[ex.split == "test", "cutoff"].min()


def test_backtest_folds_train_only_on_the_past(shop, tmp_path):
    ws = tmp_path / "ws"
    pipeline.ingest(shop, DataConfig(format="csv"), ws, progress=False)
    built = pipeline.build(LabelConfig(lookback="14d", horizon="7d", step="7d"), workspace=ws, quiet=True)
    from purchase_intent.splits import backtest_folds

    for fold in backtest_folds(built.examples, 2, built.label_cfg):
        ex = built.examples
        assert ex["label_end"][fold.train_mask].max() <= ex["cutoff"][fold.valid_mask].min()
        assert ex["label_end"][fold.valid_mask].max() <= ex["cutoff"][fold.test_mask].min()


def test_minimum_data_gate_refuses_with_a_clear_message(shop, tmp_path, capsys):
    ws = tmp_path / "ws"
    pipeline.ingest(shop, DataConfig(format="csv"), ws, progress=False)
    pipeline.build(LabelConfig(lookback="14d", horizon="7d", step="7d"), workspace=ws, quiet=True)
    rc = main(["--workspace", str(ws), "train", "--model", "logreg", "--min-positives", "1000000"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "positives" in err and "--min-positives" in err
    assert not (ws / "runs" / "logreg").exists()


def test_evaluate_refuses_a_run_of_an_older_build(shop, tmp_path):
    ws = tmp_path / "ws"
    pipeline.ingest(shop, DataConfig(format="csv"), ws, progress=False)
    pipeline.build(LabelConfig(lookback="14d", horizon="7d", step="7d"), workspace=ws, quiet=True)
    pipeline.train("logreg", train_cfg=TrainConfig(min_positives=5, min_negatives=5), workspace=ws, quiet=True)
    pipeline.build(LabelConfig(lookback="7d", horizon="7d", step="7d"), workspace=ws, quiet=True)
    with pytest.raises(RuntimeError, match="retrain"):
        pipeline.evaluate("logreg", ws, n_boot=50)


def test_a_run_ranking_valid_examples_below_chance_is_flagged(shop, tmp_path, monkeypatch, capsys):
    ws = tmp_path / "ws"
    pipeline.ingest(shop, DataConfig(format="csv"), ws, progress=False)
    pipeline.build(LabelConfig(lookback="14d", horizon="7d", step="7d"), workspace=ws, quiet=True)
    pipeline.train("logreg", train_cfg=TrainConfig(min_positives=5, min_negatives=5), workspace=ws, quiet=True)
    assert "warnings" not in pipeline.evaluate("logreg", ws, n_boot=50)
    assert "below chance" not in capsys.readouterr().out
    scores = pipeline._probabilities
    monkeypatch.setattr(pipeline, "_probabilities", lambda model, X: 1.0 - scores(model, X))  # pointing the wrong way
    metrics = pipeline.evaluate("logreg", ws, n_boot=50)
    assert metrics["valid"]["roc_auc_ci"][1] < 0.5
    assert len(metrics["warnings"]) == 1 and "'logreg' ranks the valid examples below chance" in metrics["warnings"][0]
    assert json.loads((ws / "runs" / "logreg" / "metrics.json").read_text())["warnings"] == metrics["warnings"]
    assert "warning: run 'logreg' ranks the valid examples below chance" in capsys.readouterr().out
    from purchase_intent.report import write_report
    html = write_report(ws, runs=["logreg"], explain=False).read_text()
    assert "<b>Warning:</b> run &#x27;logreg&#x27; ranks the valid examples below chance" in html


def test_below_chance_warning_names_the_dp_cause_only_for_a_dp_run():
    valid = {"roc_auc": 0.3, "roc_auc_ci": [0.2, 0.4]}
    assert "noisy steps" not in pipeline.below_chance_warning("r", valid)
    assert "12 noisy steps" in pipeline.below_chance_warning("r", valid, {"steps": 12, "epsilon": 8})
    assert pipeline.below_chance_warning("r", {"roc_auc": 0.45, "roc_auc_ci": [0.38, 0.52]}) is None  # inside: noise
    assert pipeline.below_chance_warning("r", {"roc_auc": None, "roc_auc_ci": None}) is None  # one class only


def test_backtest_refits_with_the_parameters_the_run_was_trained_with(shop, tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    pipeline.ingest(shop, DataConfig(format="csv"), ws, progress=False)
    pipeline.build(LabelConfig(lookback="14d", horizon="7d", step="7d"), workspace=ws, quiet=True)
    gate = TrainConfig(min_positives=5, min_negatives=5)
    run = pipeline.train("logreg", params={"C": 0.5}, train_cfg=gate, workspace=ws, quiet=True)
    meta = json.loads((run / "run.json").read_text())
    # defaults resolved, runtime ones and (non-private) the dp_* ones left out
    assert meta["model_params"] == {"C": 0.5, "max_iter": 1000, "tabular_scaling": None}
    meta["model_params"]["max_iter"] = 321  # as if this version's default had changed since
    (run / "run.json").write_text(json.dumps(meta))
    seen, fit = [], pipeline.fit_model
    monkeypatch.setattr(pipeline, "fit_model", lambda name, params, *a: seen.append(params) or fit(name, params, *a))
    pipeline.evaluate("logreg", ws, backtest=2, n_boot=50, quiet=True)
    assert seen == [{"C": 0.5, "max_iter": 321, "tabular_scaling": None}] * 2


def test_bad_flags_get_clear_errors(tmp_path, capsys):
    ws = tmp_path / "ws"
    assert main(["--workspace", str(ws), "build"]) == 1
    assert "ingest" in capsys.readouterr().err.lower()
    with pytest.raises(SystemExit):
        main(["--workspace", str(ws), "ingest", "x.csv", "--map", "user_id"])


@pytest.mark.usefixtures("shared_data")
def test_taobao_head_user_task_end_to_end(shared_data, tmp_path, capsys):
    ws = tmp_path / "ws"
    rc = main(["--workspace", str(ws), "run", "--data",
               str(shared_data / "taobao_userbehavior" / "UserBehavior_head.csv.gz"), "--format", "taobao",
               "--since", "2017-11-25T00:00:00+08:00", "--until", "2017-12-04T00:00:00+08:00",
               "--lookback", "3d", "--horizon", "1d", "--step", "1d", "--tz", "Asia/Shanghai",
               "--models", "logreg,lightgbm", "--n-boot", "100"])
    assert rc == 0
    out = capsys.readouterr().out
    import re

    assert re.search(r"accepted\s+84,440\s+rejected\s+1\s+malformed_line\s+1\s+filtered\s+35", out)
    entry = json.loads((ws / "events" / "manifest.json").read_text())["files"][0]
    # exactly the truncated last line is rejected; the 35 stray timestamps are filtered, not rejected
    assert entry["rows_read"] == 84_476 and entry["rejected"] == {"malformed_line": 1} and entry["filtered"] == 35
    rejects = pd.read_csv(ws / entry["rejects"])
    assert rejects["line"].tolist() == [84_476]
    m = json.loads((ws / "runs" / "lightgbm" / "metrics.json").read_text())
    # next-day purchase of ~800 users is hard: the bar is only "better than chance"
    assert m["test"]["n"] == 813 and m["test"]["roc_auc"] > 0.5


def test_transformer_and_ensemble_runs_report_calibration(shop, tmp_path):
    ws = tmp_path / "ws"
    pipeline.ingest(shop, DataConfig(format="csv"), ws, progress=False)
    pipeline.build(LabelConfig(lookback="14d", horizon="7d", step="7d"), workspace=ws, quiet=True)
    cfg = TrainConfig(min_positives=20, min_negatives=20)
    for name, params in (("lightgbm", {}), ("transformer", {"max_epochs": 1})):
        pipeline.train(name, params=params, train_cfg=cfg, workspace=ws, quiet=True)
        pipeline.evaluate(name, ws, n_boot=50, quiet=True)
    m = json.loads((ws / "runs" / "transformer" / "metrics.json").read_text())
    cal = m["calibration"]
    assert cal["fitted_on"] == "valid"
    assert cal["valid_ece_after"] <= cal["valid_ece_before"] + 1e-9  # fitted there: can only help
    assert m["test"]["ece"] == pytest.approx(cal["test_ece_after"])
    from purchase_intent.ensemble import evaluate_ensemble
    from purchase_intent.workspace import Workspace

    e = evaluate_ensemble(Workspace(ws), ["transformer", "lightgbm"], n_boot=50)
    preds = {r: pd.read_parquet(ws / "runs" / r / "predictions.parquet")
             for r in ("transformer", "lightgbm", "ensemble")}
    t = preds["transformer"].query("split == 'test'").set_index("example_id")["probability"]
    g = preds["lightgbm"].query("split == 'test'").set_index("example_id")["probability"]
    ens = preds["ensemble"].query("split == 'test'").set_index("example_id")["probability"]
    np.testing.assert_allclose(ens.loc[t.index], (t + g.loc[t.index]) / 2)
    assert e["test"]["n"] == len(t)


def test_build_says_why_every_label_is_0(tmp_path):
    """A log whose purchase is named otherwise ('Order', stored as other) gets an error that names the
    candidates and --event-map, not a train gate that asks for more data; a log whose purchases all fall
    outside the label windows gets one that says so."""
    from purchase_intent.config import DataConfig, LabelConfig
    from tests.conftest import make_tiny_events

    df = make_tiny_events(n_users=40, days=21)
    renamed = df.assign(event=df["event"].replace({"purchase": "Order", "view": "PageView"}))
    renamed.to_csv(tmp_path / "renamed.csv", index=False)
    pipeline.ingest(tmp_path / "renamed.csv", DataConfig(format="csv"), tmp_path / "ws", progress=False)
    with pytest.raises(ValueError, match="the events hold no purchase") as e:
        pipeline.build(LabelConfig(lookback="7d", horizon="3d", step="3d"), workspace=tmp_path / "ws", quiet=True)
    assert "'Order' (" in str(e.value) and "--event-map NAME=purchase" in str(e.value)
    early = df[(df["event"] != "purchase") | (df["ts"] < pd.Timestamp("2024-03-02"))]  # purchases of day 1 only
    assert (early["event"] == "purchase").any()
    early.to_csv(tmp_path / "early.csv", index=False)
    pipeline.ingest(tmp_path / "early.csv", DataConfig(format="csv"), tmp_path / "ws2", progress=False)
    with pytest.raises(ValueError, match="all outside the windows"):
        pipeline.build(LabelConfig(lookback="7d", horizon="3d", step="3d"), workspace=tmp_path / "ws2", quiet=True)
    # Olist's orders: a user id per order, so every user holds one event
    orders = pd.DataFrame({"user_id": [f"order-{i}" for i in range(300)], "event": "purchase",
                           "ts": pd.date_range("2024-03-01", periods=300, freq="3h", tz="UTC")})
    orders.to_csv(tmp_path / "orders.csv", index=False)
    pipeline.ingest(tmp_path / "orders.csv", DataConfig(format="csv"), tmp_path / "ws3", progress=False)
    with pytest.raises(ValueError, match="one each or nearly, so no purchase follows .* one per order"):
        pipeline.build(LabelConfig(lookback="7d", horizon="3d", step="3d"), workspace=tmp_path / "ws3", quiet=True)


def test_a_backtest_fold_under_the_runs_gate_says_which_and_how_to_proceed(tmp_path):
    """The earliest fold's train split holds fewer positives than the gate the run was trained with: one
    line naming the fold, its counts and the gate, and the flags that help (not a flag evaluate lacks)."""
    from purchase_intent import splits
    from purchase_intent.config import TrainConfig
    from purchase_intent.models import NotEnoughData
    from purchase_intent.runs import load_built
    from tests.conftest import tiny_workspace

    ws = tiny_workspace(tmp_path, n_users=150, days=42)
    built = load_built(ws)
    y = built.examples["label"].to_numpy()
    folds = splits.backtest_folds(built.examples, 2, built.label_cfg)
    first = int(y[np.asarray(folds[0].train_mask)].sum())
    assert first < int(y[built.mask("train")].sum())
    pipeline.train("logreg", train_cfg=TrainConfig(min_positives=first + 1, min_negatives=10), workspace=ws,
                   quiet=True)
    with pytest.raises(NotEnoughData, match=rf"backtest fold 1 of 2 .* hold {first} positives .* gate of "
                                            rf"{first + 1} and 10 .*\(--backtest 1\)") as e:
        pipeline.evaluate("logreg", workspace=ws, backtest=2, quiet=True)
    assert "\n" not in str(e.value)


def test_a_split_without_positives_is_warned_of():
    from purchase_intent.splits import SplitInfo

    row = {"n": 24, "positives": 0, "positive_rate": 0.0, "periods": [5], "first_cutoff": "2024-03-01T00:00:00",
           "last_cutoff": "2024-03-01T00:00:00"}
    text = SplitInfo(splits={"train": {**row, "positives": 3, "periods": [1]}, "valid": row, "test": row}).describe()
    assert "warning: valid holds no positive example" in text and "--valid-cutoffs" in text
    assert "warning: test holds no positive example" in text
    ok = SplitInfo(splits={"valid": {**row, "positives": 1}}).describe()
    assert "warning" not in ok


def test_a_model_does_not_depend_on_the_workspace_key(tmp_path, monkeypatch):
    """The same log in two workspaces with two pseudonym keys: LightGBM (bagging draws rows by position) fits the
    same model, so the same test predictions and metrics. The rows reach it in a key-independent order."""
    from purchase_intent.config import DataConfig, LabelConfig, TrainConfig
    from purchase_intent.privacy import KEY_ENV
    from tests.conftest import make_tiny_events

    make_tiny_events(n_users=80, days=28).to_csv(tmp_path / "events.csv", index=False)
    got = []
    for w, key in (("a", "ab" * 32), ("b", "cd" * 32)):
        monkeypatch.setenv(KEY_ENV, key)
        pipeline.ingest(tmp_path / "events.csv", DataConfig(format="csv"), tmp_path / w, progress=False)
        pipeline.build(LabelConfig(lookback="7d", horizon="3d", step="3d"), workspace=tmp_path / w, quiet=True)
        pipeline.train("lightgbm", train_cfg=TrainConfig(min_positives=1, min_negatives=1), workspace=tmp_path / w,
                       quiet=True)
        assert (Workspace(tmp_path / w).run_dir("lightgbm") / "train_window.json").exists()  # kept by train
        m = pipeline.evaluate("lightgbm", tmp_path / w, n_boot=10, quiet=True)
        p = runs.read_predictions(Workspace(tmp_path / w).run_dir("lightgbm"))
        got.append((m["test"]["roc_auc"], np.sort(p.loc[p["split"] == "test", "probability"].to_numpy())))
    ex = [pd.read_parquet(tmp_path / w / "examples" / "examples.parquet") for w in ("a", "b")]
    assert not ex[0]["user_id"].equals(ex[1]["user_id"])  # two keys: the examples come in two orders
    assert got[0][0] == got[1][0]
    np.testing.assert_array_equal(got[0][1], got[1][1])
