"""Tabular mode: label/time parsing, splits, encoding, and end-to-end runs on small tables."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from purchase_intent.models import NotEnoughData, load_model
from purchase_intent.tabular import (
    TableEncoder,
    parse_label,
    parse_time_column,
    run_table,
    split_by_time,
    split_stratified,
)

FAST = {"lightgbm": {"n_estimators": 40, "n_jobs": 1}}


def make_table(n=1200, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    pages = rng.poisson(5, n)
    visitor = rng.choice(["new", "returning", "other"], n, p=[0.3, 0.65, 0.05])
    duration = rng.exponential(60, n)
    duration[rng.random(n) < 0.1] = np.nan
    logit = 0.4 * pages - 3 + 1.0 * (visitor == "returning")
    label = rng.random(n) < 1 / (1 + np.exp(-logit))
    day = pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 90, n), unit="D")
    return pd.DataFrame({
        "session": [f"s{i}" for i in range(n)],  # unique text: dropped as high-cardinality
        "pages": pages,
        "duration": duration,
        "visitor": visitor,
        "weekend": rng.random(n) < 0.3,
        "day": day.strftime("%Y-%m-%d"),
        "bought": np.where(label, "yes", "no"),
    })


def test_parse_label():
    assert parse_label(pd.Series([True, False])).tolist() == [1, 0]
    assert parse_label(pd.Series(["TRUE", "false", "Yes", "no", "1", "0"])).tolist() == [1, 0, 1, 0, 1, 0]
    assert parse_label(pd.Series([1, 0, 1])).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="unexpected values"):
        parse_label(pd.Series(["yes", "maybe"]))
    with pytest.raises(ValueError, match="missing"):
        parse_label(pd.Series(["yes", None]))


def test_parse_time():
    months = parse_time_column(pd.Series(["Feb", "June", "Dec", "jan", "Sept", "March"]))
    assert months.tolist() == [2, 6, 12, 1, 9, 3]
    dates = parse_time_column(pd.Series(["2024-01-02", "2024-01-01 10:00"]))
    assert dates[0] > dates[1]
    assert parse_time_column(pd.Series([3, 1, 2])).tolist() == [3.0, 1.0, 2.0]


def test_split_by_time_keeps_order_and_ties():
    key = np.repeat(np.arange(10), [5, 30, 10, 10, 10, 5, 10, 10, 5, 5])
    rng = np.random.default_rng(0)
    key = rng.permutation(key)
    part = split_by_time(key)
    assert key[part == 0].max() < key[part == 1].min() and key[part == 1].max() < key[part == 2].min()
    for t in np.unique(key):  # a time value never straddles two splits
        assert np.unique(part[key == t]).size == 1
    assert abs((part == 0).mean() - 0.7) < 0.1
    with pytest.raises(ValueError, match="3 distinct"):
        split_by_time(np.array([1, 1, 2, 2]))


def test_split_stratified_is_seeded_and_balanced():
    y = (np.arange(1000) % 5 == 0).astype(int)
    a, b = split_stratified(y, seed=1), split_stratified(y, seed=1)
    np.testing.assert_array_equal(a, b)
    assert [(a == k).sum() for k in range(3)] == [700, 100, 200]
    for k in range(3):
        assert y[a == k].mean() == pytest.approx(0.2, abs=0.01)


def test_encoder_learns_categories_on_fit_data_only():
    train = pd.DataFrame({"x": [1.0, np.nan], "c": ["a", "b"], "id": ["u1", "u2"]})
    enc = TableEncoder(max_categories=1).fit(train[["x", "id"]])
    assert enc.dropped_ == ["id"] and enc.feature_names_ == ["x"]
    enc = TableEncoder().fit(train)
    assert enc.feature_names_ == ["x", "c=a", "c=b", "id=u1", "id=u2"]
    X = enc.transform(pd.DataFrame({"x": [2.0], "c": ["zzz"], "id": [None]}))
    np.testing.assert_array_equal(X, [[2.0, 0, 0, 0, 0]])  # unseen and missing -> all zeros


def test_run_table_time_split(tmp_path):
    path = tmp_path / "table.parquet"
    make_table().to_parquet(path)
    res = run_table(path, "bought", time_column="day", n_boot=50, min_positives=10, min_negatives=10,
                    model_params=FAST, out_dir=tmp_path / "out", verbose=False)
    split = res["split"]
    assert split["protocol"] == "time"
    assert split["train"]["time_last"] < split["valid"]["time_first"]
    assert split["valid"]["time_first"] <= split["valid"]["time_last"] < split["test"]["time_first"]
    assert "day" not in res["data"]["features"] and "session" in res["data"]["encoder"]["dropped"]
    assert "visitor=returning" in res["data"]["features"]
    for name in ("logreg", "lightgbm"):
        test = res["models"][name]["test"]
        assert test["n"] == split["test"]["n"] and test["roc_auc"] > 0.7
        assert 0 < res["models"][name]["f1"]["test_at_0.5"] <= 1
    assert res["paired"] and "ROC-AUC" in res["table"]
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["models"]["logreg"]["test"]["roc_auc"] == res["models"]["logreg"]["test"]["roc_auc"]
    assert load_model("lightgbm", tmp_path / "out" / "lightgbm").n_features_in_ == len(res["data"]["features"])


def test_run_table_without_time_warns(tmp_path):
    path = tmp_path / "table.csv"
    make_table(n=800, seed=1).to_csv(path, index=False)
    with pytest.warns(UserWarning, match="no time column"):
        res = run_table(path, "bought", models=("logreg",), n_boot=20, min_positives=10, min_negatives=10,
                        verbose=False)
    assert res["split"]["protocol"] == "stratified" and res["warnings"]
    assert res["split"]["test"]["n"] == 160
    assert "day" in res["data"]["encoder"]["dropped"]  # without a time column, day is just (high-cardinality) text
    with pytest.raises(NotEnoughData, match="--min-positives"):
        run_table(path, "bought", time_column="day", models=("logreg",), min_positives=10_000, verbose=False)
    with pytest.raises(ValueError, match="event sequences"):
        run_table(path, "bought", time_column="day", models=("transformer",), min_positives=1, verbose=False)


@pytest.mark.shared_data
def test_uci_online_shoppers(shared_data):
    path = shared_data / "uci_online_shoppers_intention" / "online_shoppers_intention.csv"
    if not path.exists():
        pytest.skip("UCI online shoppers data is absent")
    res = run_table(path, "Revenue", time_column="Month", n_boot=100,
                    model_params={"lightgbm": {"n_jobs": 1}}, verbose=False)
    assert res["split"]["test"]["time_first"] == "Dec"  # Feb..Oct train, Nov valid, Dec test
    assert res["models"]["lightgbm"]["test"]["roc_auc"] > 0.85
    assert res["models"]["logreg"]["test"]["roc_auc"] > 0.8
