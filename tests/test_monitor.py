"""`purchase-intent monitor`: PSI by hand, a stable and a drifted window, JSON, exit code, gauges, report."""
from __future__ import annotations

import json
import math
import shutil
from datetime import datetime

import numpy as np
import pandas as pd
import pytest

from purchase_intent import cli, monitor, pipeline, report, runs
from purchase_intent.config import DataConfig, LabelConfig, TrainConfig
from purchase_intent.monitor import MonitorConfig, bin_counts, fit_bins, psi
from purchase_intent.simulate import SimConfig, write_events
from purchase_intent.workspace import Workspace

KEY = "monitor-test-key-0123"
AGE = "days_since_first_event"  # grows with the age of the log itself: drifts in any log


# ---------------------------------------------------------------------------------------------
# PSI against a hand computation
def test_psi_equals_the_hand_computation():
    # shares 0.5/0.3/0.2 -> 0.4/0.4/0.2: (0.4-0.5)ln(0.4/0.5) + (0.4-0.3)ln(0.4/0.3) + 0
    hand = -0.1 * math.log(0.8) + 0.1 * math.log(4 / 3)
    assert psi([50, 30, 20], [40, 40, 20]) == pytest.approx(hand, abs=1e-12)
    assert psi([10, 20], [1, 2]) == pytest.approx(0.0)  # the same shares, whatever the sizes
    # an empty bin counts as epsilon: shares 1/0 -> 0.5/0.5
    eps = 1e-4
    hand = (0.5 - 1.0) * math.log(0.5 / 1.0) + (0.5 - eps) * math.log(0.5 / eps)
    assert psi([10, 0], [5, 5], epsilon=eps) == pytest.approx(hand, rel=1e-12)
    assert psi([0, 0], [1, 2]) is None


def test_bins_are_training_deciles_or_values():
    ref = np.arange(100, dtype=float)
    bins = fit_bins(ref, 10)
    assert bins.kind == "numeric" and len(bins.edges) == 9
    assert bin_counts(bins, ref).tolist() == [10] * 10 + [0]  # ten deciles, no missing
    assert bin_counts(bins, np.array([-5.0, 1e9, np.nan])).tolist() == [1] + [0] * 8 + [1, 1]
    cat = fit_bins(np.array([0, 0, 1, 1, 2, np.nan]), 10)  # few distinct values: one bin each
    assert cat.kind == "categorical" and cat.categories.tolist() == [0, 1, 2]
    # bins 0, 1, 2, then unseen (3.0), then missing
    assert bin_counts(cat, np.array([0, 3, np.nan, 2, 2])).tolist() == [1, 0, 2, 1, 1]


# ---------------------------------------------------------------------------------------------
# a simulated shop with one logistic-regression run (7d horizon), and a copy whose last weeks drift
@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor")
    write_events(SimConfig(n_users=2500, days=49, seed=3), root / "sim.csv")
    ws = Workspace(root / "ws")
    pipeline.run(root / "sim.csv", DataConfig(format="csv"), LabelConfig(lookback="14d", horizon="7d", step="7d"),
                 models=["logreg"], workspace=ws, n_boot=100, report=False, quiet=True)
    return root, ws


@pytest.fixture(scope="module")
def drifted(shop):
    """The shop with every event of the last three weeks twice more (a shift in volume), ingested as new data."""
    root, ws = shop
    copy = Workspace(root / "ws-drifted")
    shutil.copytree(ws.root, copy.root)
    df = pd.read_csv(root / "sim.csv")
    last = df[df["ts"] >= df["ts"].max() - 21 * 86_400_000]
    extra = pd.concat([last.assign(ts=last["ts"] + k) for k in (1, 2)])
    extra = extra[extra["event"] != "purchase"]  # more browsing, the same buyers
    extra.to_csv(root / "more.csv", index=False)
    pipeline.ingest(root / "more.csv", DataConfig(format="csv"), copy, progress=False)
    return copy


def test_a_stable_window_is_not_flagged(shop):
    _, ws = shop
    res = monitor.monitor("logreg", ws, MonitorConfig(n_boot=100, ignore=(AGE,)))
    assert res["verdict"] != "drift" and not res["reasons"]
    assert res["score"]["verdict"] == "stable" and res["score"]["psi"] < 0.1
    by_name = {f["name"]: f for f in res["features"]}
    assert by_name[AGE]["ignored"] and by_name[AGE]["verdict"] == "drift"  # measured, not counted
    assert res["latest_window"]["labels_matured"] and res["training_window"]["features_from"] == "build"
    perf = res["performance"]
    assert perf["roc_auc"] > 0.6 and perf["verdict"] in ("within", "above")
    assert perf["expected"]["source"] == "test"
    # the training window is kept in the run's folder, the result in monitor.json
    assert (ws.run_dir("logreg") / monitor.TRAIN_WINDOW_JSON).exists()
    assert json.loads((ws.run_dir("logreg") / runs.MONITOR_JSON).read_text())["verdict"] == res["verdict"]
    # without --ignore the age of the log is still left out of the verdict (it drifts in every log), and shown
    res = monitor.monitor("logreg", ws, MonitorConfig(n_boot=0))
    assert res["verdict"] != "drift" and not res["reasons"]
    assert {f["name"]: f for f in res["features"]}[AGE]["ignored"] and monitor.EXPECTED_DRIFT == (AGE,)


def test_the_training_window_from_the_build_equals_the_one_from_events(shop):
    """Read from the run's build or computed from the events: the same users, features, scores, labels."""
    _, ws = shop
    run = runs.load_run("logreg", ws)
    con = ws.connect()
    cutoff = datetime.fromisoformat(monitor.training_window(ws, run)["last_cutoff"])
    stored = monitor.window_from_build(run, ws, cutoff, con)
    computed = monitor.build_window(run, con, cutoff, True, MonitorConfig())
    assert stored is not None and len(stored.scores) == len(computed.scores) > 100
    assert list(stored.features.columns) == list(computed.features.columns)
    np.testing.assert_allclose(stored.features.to_numpy(), computed.features.to_numpy(), rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(stored.scores, computed.scores, rtol=1e-9)
    assert (stored.labels == computed.labels).all()
    run.meta = {**run.meta, "build_id": "another-build"}  # converse: not the run's build, not used
    assert monitor.window_from_build(run, ws, cutoff, con) is None


def test_a_drifted_window_is_detected_and_fails_the_scheduler(shop, drifted, tmp_path, capsys):
    out = tmp_path / "drift.json"
    own = drifted.run_dir("logreg") / runs.MONITOR_JSON
    before = own.read_bytes() if own.exists() else None
    rc = cli.main(["--workspace", str(drifted.root), "monitor", "--run", "logreg", "--ignore", AGE, "--n-boot", "50",
                   "--out", str(out), "--fail-on-drift"])
    assert rc == monitor.DRIFT_EXIT == 3
    res = json.loads(out.read_text())
    assert res["verdict"] == "drift"
    drifted_features = {f["name"] for f in res["features"] if f["verdict"] == "drift"}
    assert {"n_events_all", "n_view_all"} <= drifted_features
    assert res["score"]["psi"] > 0.1 and res["score"]["latest_mean"] != res["score"]["reference_mean"]
    assert any(r.startswith("feature n_events_all") for r in res["reasons"])
    assert "verdict: DRIFT" in capsys.readouterr().out
    assert (own.read_bytes() if own.exists() else None) == before  # --out: the run's own monitor.json untouched
    # converse: without --fail-on-drift the same check exits 0
    assert cli.main(["--workspace", str(drifted.root), "monitor", "--run", "logreg", "--ignore", AGE,
                     "--n-boot", "0", "--out", str(out)]) == 0


def test_labels_not_matured_and_bad_input(shop, capsys):
    _, ws = shop
    con = ws.connect()
    hi = con.execute("SELECT max(ts) FROM events").fetchall()[0][0]
    res = monitor.monitor("logreg", ws, MonitorConfig(at=(hi + pd.Timedelta(days=3)).isoformat(), n_boot=0,
                                                      ignore=(AGE,)))
    assert not res["latest_window"]["labels_matured"] and res["positive_rate"]["latest"] is None
    assert res["performance"]["roc_auc"] is None and "not matured" in res["performance"]["note"]
    # bad input: one line each, no traceback
    assert cli.main(["--workspace", str(ws.root), "monitor", "--run", "logreg", "--ignore", "no_such"]) == 1
    assert "not a feature" in capsys.readouterr().err
    assert cli.main(["--workspace", str(ws.root), "monitor", "--run", "logreg", "--at", "2000-01-01"]) == 1
    assert "choose a later --at" in capsys.readouterr().err
    assert cli.main(["--workspace", str(ws.root), "monitor", "--run", "nope"]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_metrics_expose_the_drift_gauges_and_the_old_names(shop):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from purchase_intent.serve.app import create_app
    from purchase_intent.serve.settings import ServeSettings

    _, ws = shop
    monitor.monitor("logreg", ws, MonitorConfig(n_boot=50, ignore=(AGE,)))
    settings = ServeSettings(workspace=str(ws.root), run="logreg", api_keys=(KEY,))
    auth = {"Authorization": f"Bearer {KEY}"}
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        assert a.get("/healthz").status_code == 200
        a.get("/v1/model", headers=auth)
        text = a.get("/metrics", headers=auth).text
        other = b.get("/metrics", headers=auth).text  # a second app in the process counts apart
    for name in ("purchase_intent_requests_total", "purchase_intent_request_duration_seconds_bucket",
                 "purchase_intent_reload_failures_total 0", "purchase_intent_last_reload_success_timestamp_seconds",
                 "purchase_intent_model_info{", "# TYPE purchase_intent_score histogram",
                 "# TYPE purchase_intent_onnx_fallbacks_total counter",
                 'purchase_intent_drift_psi{feature="n_events_all"}', "purchase_intent_drift_score_psi ",
                 'purchase_intent_drift_positive_rate{window="latest"}', "purchase_intent_drift_live_roc_auc ",
                 "purchase_intent_drift_expected_roc_auc_lower ", "purchase_intent_drift_detected 0.0",
                 "purchase_intent_drift_checked_timestamp_seconds "):
        assert name in text, name
    assert 'purchase_intent_requests_total{endpoint="/v1/model",method="GET",status="200"} 1.0' in text
    assert 'endpoint="/v1/model"' not in other
    # a new monitor result shows at the next scrape, without a reload
    (ws.run_dir("logreg") / runs.MONITOR_JSON).write_text(json.dumps({"verdict": "drift", "features": []}))
    with TestClient(create_app(settings)) as c:
        assert "purchase_intent_drift_detected 1.0" in c.get("/metrics", headers=auth).text
    (ws.run_dir("logreg") / runs.MONITOR_JSON).unlink()


def test_the_report_has_a_drift_section(shop, tmp_path):
    _, ws = shop
    monitor.monitor("logreg", ws, MonitorConfig(n_boot=0, ignore=(AGE,)))
    text = report.write_report(ws, ["logreg"], out=tmp_path / "r.html", explain=False).read_text()
    assert 'id="drift"' in text and "n_events_all" in text and "score PSI" in text
    (ws.run_dir("logreg") / runs.MONITOR_JSON).write_text("{}")  # a damaged one: a note, not a crash
    assert "run monitor again" in report.write_report(ws, ["logreg"], out=tmp_path / "r.html", explain=False
                                                      ).read_text()
    (ws.run_dir("logreg") / runs.MONITOR_JSON).unlink()  # converse: no monitor.json, no section
    assert 'id="drift"' not in report.write_report(ws, ["logreg"], out=tmp_path / "r.html", explain=False).read_text()


# ---------------------------------------------------------------------------------------------
# session-task runs: windows of sessions, built as `build` builds them
@pytest.fixture(scope="module")
def session_shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor-session")
    write_events(SimConfig(n_users=1500, days=35, seed=4), root / "sim.csv")
    ws = Workspace(root / "ws")
    pipeline.run(root / "sim.csv", DataConfig(format="csv"), LabelConfig(task="session", step="7d"),
                 models=["logreg"], workspace=ws, n_boot=50, report=False, quiet=True)
    return ws


def test_a_session_task_run_is_monitored_on_windows_of_sessions(session_shop, capsys):
    ws = session_shop
    run = runs.load_run("logreg", ws)
    con = ws.connect()
    last = datetime.fromisoformat(monitor.training_window(ws, run)["last_cutoff"])
    hi = con.execute("SELECT max(ts) FROM events").fetchall()[0][0]
    ref, new = monitor.session_windows(run, con, last, hi)
    # the training window's sessions have the features and labels the build stored for them
    ex = pd.read_parquet(ws.examples_dir / runs.EXAMPLES)
    feats = pd.read_parquet(ws.examples_dir / runs.FEATURES)
    rows = ((ex["session_start"] >= pd.Timestamp(ref.cutoff)) & (ex["session_start"] <= pd.Timestamp(last))).to_numpy()
    assert len(ref.scores) == rows.sum() > 50
    order = np.lexsort((ex["session_id"][rows].to_numpy(), ex["user_id"][rows].to_numpy(),
                        ex["cutoff"][rows].to_numpy()))
    stored = runs.run_features(run.meta, feats[rows]).to_numpy()[order]
    np.testing.assert_allclose(ref.features.to_numpy(), stored, rtol=1e-9, equal_nan=True)
    assert (ref.labels == ex["label"][rows].to_numpy()[order]).all()
    assert len(new.scores) > 50 and new.labels is not None
    # through the CLI: sessions, matured labels, a live ROC-AUC and a verdict
    assert cli.main(["--workspace", str(ws.root), "monitor", "--run", "logreg", "--ignore", AGE,
                     "--n-boot", "50"]) in (0,)
    out = capsys.readouterr().out
    assert "sessions" in out and "live ROC-AUC" in out
    res = json.loads((ws.run_dir("logreg") / runs.MONITOR_JSON).read_text())
    assert res["task"] == "session" and res["latest_window"]["labels_matured"]
    assert res["performance"]["roc_auc"] is not None and res["positive_rate"]["latest"] is not None
    # a window with no complete session: one line
    assert cli.main(["--workspace", str(ws.root), "monitor", "--run", "logreg", "--at", "2000-01-01"]) == 1
    assert "no complete session started" in capsys.readouterr().err


def test_a_session_task_sequence_run_is_monitored_too(session_shop):
    """A Transformer's inputs carry the tabular features as an array: monitor names them by the run's features."""
    ws = session_shop
    pipeline.train("transformer", run="seq", params={"max_epochs": 1, "preset": "tiny", "max_seq_len": 16},
                   train_cfg=TrainConfig(min_positives=1, min_negatives=1), workspace=ws)
    res = monitor.monitor("seq", ws, MonitorConfig(n_boot=0, ignore=(AGE,)))
    assert res["task"] == "session" and res["latest_window"]["n"] > 50
    names = {f["name"] for f in res["features"]}
    assert names == set(runs.load_run("seq", ws).meta["feature_names"])
    assert res["score"]["psi"] is not None


def test_a_run_of_another_workspace_is_refused_and_train_keeps_its_window(shop, tmp_path, capsys):
    """monitor --run PATH from another workspace would rebuild the training window from this workspace's events
    (it compared the new shop with itself: STABLE); train writes train_window.json, so that a rebuild does not
    leave the run's window unknown."""
    root, ws = shop
    assert (ws.run_dir("logreg") / monitor.TRAIN_WINDOW_JSON).exists()
    other = Workspace(tmp_path / "other")
    write_events(SimConfig(n_users=400, days=49, seed=9), tmp_path / "other.csv")
    pipeline.ingest(tmp_path / "other.csv", DataConfig(format="csv"), other, progress=False)
    rc = cli.main(["--workspace", str(other.root), "monitor", "--run", str(ws.run_dir("logreg"))])
    err = capsys.readouterr().err
    assert rc == 1 and "was trained in another workspace" in err and err.count("\n") == 1
