"""MLflow tracking: train / evaluate / run / track log parameters, metrics with intervals and the run folder
to a real MLflow file store; a URI that cannot be used fails before any work."""
from __future__ import annotations

import json
import time

import pytest
from conftest import tiny_workspace

from purchase_intent import cli, tracking

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("tracking"), n_users=60, days=28)


def _main(ws, *args) -> int:
    return cli.main(["--workspace", str(ws.root), *args])


def _runs(store, experiment="purchase-intent"):
    client = mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def test_train_and_evaluate_log_params_metrics_intervals_and_the_run_folder(ws, tmp_path, capsys):
    store = tmp_path / "mlruns"
    assert _main(ws, "train", "--model", "logreg", "--min-positives", "1", "--min-negatives", "1",
                 "--mlflow", str(store)) == 0
    assert _main(ws, "evaluate", "--run", "logreg", "--n-boot", "50", "--mlflow", store.as_uri(),
                 "--mlflow-experiment", "shop-a") == 0
    assert "logged run logreg to MLflow" in capsys.readouterr().out
    client, trained = _runs(store)
    assert len(trained) == 1 and trained[0].data.tags["purchase_intent.command"] == "train"
    _, evaluated = _runs(store, "shop-a")
    run = evaluated[0]
    meta = json.loads((ws.run_dir("logreg") / "run.json").read_text())
    metrics = json.loads((ws.run_dir("logreg") / "metrics.json").read_text())
    assert run.data.params["model"] == "logreg" and run.data.params["version"] == meta["version"]
    assert run.data.params["label_config.horizon"] == "3d"
    got = run.data.metrics
    assert got["test.roc_auc"] == pytest.approx(metrics["test"]["roc_auc"])
    lo, hi = metrics["test"]["roc_auc_ci"]
    assert got["test.roc_auc_ci_lo"] == pytest.approx(lo) and got["test.roc_auc_ci_hi"] == pytest.approx(hi)
    assert got["test.lift.top_10pct"] == pytest.approx(metrics["test"]["lift"]["top_10pct"])
    files = {f.path for f in client.list_artifacts(run.info.run_id, "run")}
    assert {"run/run.json", "run/metrics.json", "run/predictions.parquet", "run/model"} <= files


def test_track_logs_a_saved_run_and_leaves_scores_files_out(ws, tmp_path):
    store = tmp_path / "mlruns"
    assert _main(ws, "train", "--model", "logreg", "--min-positives", "1", "--min-negatives", "1") == 0
    assert _main(ws, "score", "--run", "logreg", "--quiet") == 0
    assert any(p.name.startswith("scores-") for p in ws.run_dir("logreg").iterdir())
    assert _main(ws, "track", "--run", "logreg", "--mlflow", str(store)) == 0
    client, logged = _runs(store)
    files = {f.path for f in client.list_artifacts(logged[0].info.run_id, "run")}
    assert files and not any("scores-" in f or f.endswith(".summary.json") for f in files)


def test_an_unusable_uri_fails_in_one_line_before_any_work(ws, tmp_path, capsys):
    before = sorted(p.name for p in (ws.root / "runs").iterdir())
    t0 = time.monotonic()
    code = _main(ws, "train", "--model", "lightgbm", "--run", "never", "--mlflow", "http://u:secret@127.0.0.1:9/")
    err = capsys.readouterr().err
    assert code == 1 and time.monotonic() - t0 < 30
    assert err.startswith("error: cannot use the MLflow tracking URI http://u:***@127.0.0.1:9/")
    assert "secret" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (ws.root / "runs").iterdir()) == before  # nothing trained
    assert _main(ws, "track", "--run", "logreg") == 1
    assert "track needs --mlflow URI" in capsys.readouterr().err


def test_flat_metrics_and_redact():
    m = {"test": {"roc_auc": 0.7, "roc_auc_ci": [0.6, 0.8], "notes": ["x"], "ece": None, "n": 10},
         "backtest": {"folds": [{"roc_auc": 0.5}, {"roc_auc": 0.6}]}, "model": "logreg"}
    assert tracking.flat_metrics(m) == {"test.roc_auc": 0.7, "test.roc_auc_ci_lo": 0.6, "test.roc_auc_ci_hi": 0.8,
                                        "test.n": 10.0, "backtest.folds.0.roc_auc": 0.5,
                                        "backtest.folds.1.roc_auc": 0.6}
    assert tracking.redact("https://ann:pw@host:5000/x") == "https://ann:***@host:5000/x"
    assert tracking.redact("http://host") == "http://host"
