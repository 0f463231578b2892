"""The time split and the backtest folds: order by time, the gap rule, rolling test windows."""
from __future__ import annotations

from datetime import datetime, timedelta

import pandas as pd
import pytest

from purchase_intent.config import LabelConfig
from purchase_intent.splits import backtest_folds, split_examples

D = timedelta(days=1)


def _examples(n_periods=5, per=4, horizon=D, step=D):
    rows = []
    start = datetime(2024, 1, 1)
    for p in range(n_periods):
        for u in range(per):
            rows.append(dict(example_id=len(rows), user_id=f"u{u}", cutoff=start + p * step,
                             label=int((u + p) % 3 == 0), label_end=start + p * step + horizon, period=p))
    return pd.DataFrame(rows)


def test_split_orders_by_time_and_applies_the_gap_rule():
    cfg = LabelConfig(valid_cutoffs=1, test_cutoffs=1)
    df = _examples()
    split, info = split_examples(df, cfg)
    assert list(split) == ["train"] * 12 + ["valid"] * 4 + ["test"] * 4  # horizon == step: no gap
    assert info.n_gap == 0 and info.splits["test"]["periods"] == [4]
    assert info.splits["train"]["positive_rate"] == pytest.approx(df["label"][:12].mean())
    assert "valid" in str(info) and info.splits["valid"]["first_cutoff"] == "2024-01-04T00:00:00"
    # horizon 2d: period 3 would reach into test, so valid is period 2 and period 1 (reaching into
    # valid) is gap too; the validation split is never emptied by the gap rule
    df = _examples(horizon=2 * D)
    split, info = split_examples(df, cfg)
    assert list(split) == ["train"] * 4 + ["gap"] * 4 + ["valid"] * 4 + ["gap"] * 4 + ["test"] * 4
    assert info.n_gap == 8
    split, _ = split_examples(df, LabelConfig(valid_cutoffs=0, test_cutoffs=2))
    assert list(split) == ["train"] * 8 + ["gap"] * 4 + ["test"] * 8
    with pytest.raises(ValueError, match="periods"):
        split_examples(_examples(n_periods=2), cfg)


def test_backtest_folds_roll_the_test_window():
    df = _examples(n_periods=6)
    folds = backtest_folds(df, 3, LabelConfig(valid_cutoffs=1))
    assert [f.test_period for f in folds] == [3, 4, 5]
    for f in folds:
        p = df["period"].to_numpy()
        assert set(p[f.test_mask]) == {f.test_period} and set(p[f.valid_mask]) == {f.test_period - 1}
        assert set(p[f.train_mask]) == set(range(f.test_period - 1))
        assert not (f.train_mask & f.valid_mask).any() and not (f.valid_mask & f.test_mask).any()
        assert f.cutoff == datetime(2024, 1, 1) + f.test_period * D and f.n_gap == 0
    assert not folds[0].train_mask[df["period"] > 3].any()  # later periods are in no mask


def test_horizon_longer_than_step_skips_to_a_clean_valid_period():
    """With horizon 2d and step 1d the period right before test cannot be valid (its label window
    reaches into the test window): it becomes gap and the period before it is valid, not an empty split."""
    day = pd.Timedelta(days=1)
    t0 = pd.Timestamp("2024-01-10")
    rows = []
    for p in range(6):
        for u in range(4):
            rows.append(dict(period=p, cutoff=t0 + p * day, label_end=t0 + p * day + 2 * day, label=u % 2))
    ex = pd.DataFrame(rows)
    split, info = split_examples(ex, LabelConfig(horizon="2d", step="1d"))
    by_period = {p: set(split[ex["period"] == p]) for p in range(6)}
    assert by_period[5] == {"test"}
    assert by_period[4] == {"gap"}
    assert by_period[3] == {"valid"}
    assert by_period[2] == {"gap"} and by_period[1] == {"train"} and by_period[0] == {"train"}
    assert info.n_gap == 8
    valid_end = ex["label_end"][split == "valid"].max()
    assert valid_end <= ex["cutoff"][split == "test"].min()
    train_end = ex["label_end"][split == "train"].max()
    assert train_end <= ex["cutoff"][split == "valid"].min()


def test_human_time_drops_the_exclusive_bound_microsecond_but_keeps_real_ones():
    from purchase_intent.splits import human_time

    assert human_time(datetime(2019, 10, 1)) == "2019-10-01T00:00:00"
    # a session cutoff is 1us after the last event the model sees: printed as that event's time
    assert human_time("2019-10-01T00:00:00.000001") == "2019-10-01T00:00:00"
    assert human_time(datetime(2019, 10, 1, 12, 30, 5, 250_001)) == "2019-10-01T12:30:05.250"
    assert human_time(datetime(2019, 10, 1, 0, 0, 0, 123_456)) == "2019-10-01T00:00:00.123456"
    assert human_time(None) == "-"


def test_split_table_prints_session_cutoffs_without_the_stray_microsecond():
    df = _examples(n_periods=4)
    df["cutoff"] += timedelta(microseconds=1)  # as session examples are
    _, info = split_examples(df, LabelConfig())
    text = info.describe()
    assert ".000001" not in text and "2024-01-01T00:00:00 .. 2024-01-02T00:00:00" in text
    assert info.splits["train"]["first_cutoff"].endswith(".000001")  # the stored value stays exact


def test_too_few_periods_is_a_value_error_saying_what_to_change():
    from purchase_intent.splits import TooFewPeriods

    with pytest.raises(TooFewPeriods, match="smaller step") as e:
        split_examples(_examples(n_periods=2), LabelConfig())
    assert isinstance(e.value, ValueError)  # the command line prints it as one "error:" line
