"""Cutoffs, user and session examples (the time split and backtest folds: ``test_splits.py``)."""
from __future__ import annotations

from datetime import datetime, timedelta

import duckdb
import pandas as pd
import pytest

from purchase_intent.config import LabelConfig
from purchase_intent.labels import build_examples, example_counts, make_cutoffs, single_example
from purchase_intent.splits import split_examples

D = timedelta(days=1)


def _con(rows) -> duckdb.DuckDBPyConnection:
    """rows: (user_id, ts, event[, session_id]) tuples -> a connection with an ``events`` table."""
    df = pd.DataFrame([r if len(r) == 4 else (*r, None) for r in rows],
                      columns=["user_id", "ts", "event", "session_id"])
    df["ts"] = pd.to_datetime(df["ts"], format="ISO8601").astype("datetime64[us]")
    df["item_id"], df["category"], df["price"] = "i1", "c1", 1.0
    con = duckdb.connect()
    con.register("df", df[["user_id", "ts", "event", "item_id", "category", "price", "session_id"]])
    con.execute("CREATE TABLE events AS SELECT * FROM df")
    return con


def test_cutoffs_fall_at_local_midnight_with_end_tolerance():
    # 2017-11-25 00:00 CST (UTC+8) .. 2017-12-03 23:59:23 CST, as in the Taobao log
    con = _con([("a", "2017-11-24 16:00:00", "view"), ("a", "2017-12-03 15:59:23", "view")])
    cfg = LabelConfig(lookback="3d", horizon="1d", step="1d", tz="Asia/Shanghai")
    cutoffs = make_cutoffs(con, cfg)
    # 11-28 .. 12-03 CST midnights; the last needs the tolerance (data end 37s before 12-04)
    assert cutoffs == [datetime(2017, 11, 27, 16) + i * D for i in range(6)]
    # a log that stops two hours early does not get the last day
    con = _con([("a", "2017-11-24 16:00:00", "view"), ("a", "2017-12-03 14:00:00", "view")])
    assert make_cutoffs(con, cfg)[-1] == datetime(2017, 12, 1, 16)


def test_cutoffs_are_dst_safe_and_anchored_at_the_end():
    con = _con([("a", "2024-03-01 00:00:00", "view"), ("a", "2024-04-20 00:00:00", "view")])
    cuts = make_cutoffs(con, LabelConfig(lookback="7d", horizon="7d", step="7d", tz="Europe/Berlin"))
    local = [pd.Timestamp(c).tz_localize("UTC").tz_convert("Europe/Berlin") for c in cuts]
    assert all((t.hour, t.minute) == (0, 0) for t in local)
    assert {t.utcoffset() for t in local} == {timedelta(hours=1), timedelta(hours=2)}  # across 2024-03-31
    assert all((b.date() - a.date()).days == 7 for a, b in zip(local, local[1:]))
    assert cuts[0] >= datetime(2024, 3, 8) and cuts[-1] + 7 * D <= datetime(2024, 4, 20)
    assert cuts[-1] + 14 * D > datetime(2024, 4, 20)  # the latest possible one
    # sub-day steps are multiples of the step since the epoch
    cuts = make_cutoffs(con, LabelConfig(lookback="1d", horizon="6h", step="6h"))
    assert all(c.hour % 6 == 0 and c.minute == 0 for c in cuts)


def test_user_examples_and_label_window_boundaries():
    con = _con([
        ("a", "2024-01-01 10:00", "view"), ("a", "2024-01-03 12:00", "view"),
        ("a", "2024-01-04 00:00", "purchase"),  # exactly at the 01-04 cutoff: inside [cutoff, cutoff + 1d)
        ("b", "2024-01-02 12:00", "view"), ("b", "2024-01-04 12:00", "view"),
        ("b", "2024-01-05 00:00", "purchase"),  # exactly at 01-04 + horizon: outside that window
        ("c", "2023-12-30 23:00", "view"),      # never in a lookback window
        ("z", "2024-01-07 23:59:59", "view"),   # ends the log (the 01-07 cutoff needs the tolerance)
    ])
    cfg = LabelConfig(lookback="2d", horizon="1d", step="1d")
    ex = build_examples(con, cfg)
    df = ex.to_pandas()
    got = {(r.user_id, r.cutoff.day): (r.label, r.period) for r in df.itertuples()}
    # cutoffs 01-02 .. 01-07 are periods 0..5; active = an event in [cutoff - 2d, cutoff)
    assert got == {
        ("a", 2): (0, 0), ("a", 3): (0, 1), ("a", 4): (1, 2), ("a", 5): (0, 3), ("a", 6): (0, 4),
        ("b", 3): (0, 1), ("b", 4): (0, 2), ("b", 5): (1, 3), ("b", 6): (0, 4), ("b", 7): (0, 5),
    }
    assert list(df["example_id"]) == list(range(len(df)))
    assert (df["label_end"] == df["cutoff"] + pd.Timedelta(days=1)).all()
    assert df["session_id"].isna().all() and df["session_start"].isna().all()
    assert [str(t) for t in ex.schema.types[:6]] == ["int64", "string", "timestamp[us]", "int32", "timestamp[us]",
                                                     "int32"]
    counts = example_counts(ex)
    assert counts["examples"] == 10 and counts["positives"] == 2 and counts["cutoffs"] == 6
    assert counts["dropped"] == {"users never active in a lookback window": 2}  # c, z


SESSIONS = [
    # s1: view, view, purchase, view -> label 1, sees two events
    ("u1", "2024-01-01 10:00", "view", "s1"), ("u1", "2024-01-01 10:05", "view", "s1"),
    ("u1", "2024-01-01 10:10", "purchase", "s1"), ("u1", "2024-01-01 10:12", "view", "s1"),
    # s2: view, cart -> label 0, sees both
    ("u1", "2024-01-02 09:00", "view", "s2"), ("u1", "2024-01-02 09:20", "cart", "s2"),
    # s3: starts with a purchase -> dropped
    ("u2", "2024-01-02 20:00", "purchase", "s3"), ("u2", "2024-01-02 20:01", "view", "s3"),
    # s4: five views -> label 0
    ("u2", "2024-01-03 08:00", "view", "s4"), ("u2", "2024-01-03 08:01", "view", "s4"),
    ("u2", "2024-01-03 08:02", "view", "s4"), ("u2", "2024-01-03 08:03", "view", "s4"),
    ("u2", "2024-01-03 08:04", "purchase", "s4"),
    # s5: the last session of the log may still be going on -> dropped
    ("u3", "2024-01-05 12:00", "view", "s5"),
]
US = pd.Timedelta(microseconds=1)


@pytest.mark.parametrize("ids", [True, False])
def test_session_examples(ids):
    con = _con(SESSIONS if ids else [r[:3] for r in SESSIONS])
    ex = build_examples(con, LabelConfig(task="session", step="1d"))
    df = ex.to_pandas()
    assert list(df["label"]) == [1, 0, 1]
    assert list(df["cutoff"]) == [pd.Timestamp("2024-01-01 10:05") + US, pd.Timestamp("2024-01-02 09:20") + US,
                                  pd.Timestamp("2024-01-03 08:03") + US]
    assert list(df["label_end"]) == [pd.Timestamp("2024-01-01 10:12") + US, pd.Timestamp("2024-01-02 09:20") + US,
                                     pd.Timestamp("2024-01-03 08:04") + US]
    starts = ("2024-01-01 10:00", "2024-01-02 09:00", "2024-01-03 08:00")
    assert list(df["session_start"]) == [pd.Timestamp(t) for t in starts]
    assert list(df["period"]) == [0, 1, 2]
    assert list(df["session_id"]) == (["s1", "s2", "s4"] if ids else
                                      ["gap@2024-01-01T10:00:00.000000", "gap@2024-01-02T09:00:00.000000",
                                       "gap@2024-01-03T08:00:00.000000"])
    counts = example_counts(ex)
    assert counts["session_ids"] == ("data" if ids else "gap") and counts["sessions"] == 5
    assert counts["dropped"] == {"no event before the cutoff": 1, "may continue after the end of the data": 1}


def test_session_gap_overrides_ids_and_prefix_limits_the_events_seen():
    con = _con(SESSIONS)
    # a 3-minute gap splits s1 into [10:00] [10:05] [10:10 purchase, 10:12] and s2 into [09:00] [09:20]
    ex = build_examples(con, LabelConfig(task="session", step="1d", session_gap="3min"))
    counts = example_counts(ex)
    assert counts["session_ids"] == "gap" and counts["dropped"]["no event before the cutoff"] == 2
    ex = ex.to_pandas()
    assert len(ex) == 5 and ex["session_id"].str.startswith("gap@").all() and ex["label"].sum() == 1
    # prefix 2: s4 is cut after its second event; s1 already after its second
    ex = build_examples(con, LabelConfig(task="session", step="1d", prefix=2)).to_pandas()
    assert list(ex["cutoff"]) == [pd.Timestamp("2024-01-01 10:05") + US, pd.Timestamp("2024-01-02 09:20") + US,
                                  pd.Timestamp("2024-01-03 08:01") + US]
    assert list(ex["label"]) == [1, 0, 1]


def test_session_periods_follow_local_midnight():
    con = _con([("a", "2017-11-25 15:58", "view"), ("a", "2017-11-25 15:59", "cart"),   # 23:59 CST
                ("b", "2017-11-25 16:01", "view"), ("b", "2017-11-25 16:02", "view"),   # 00:01 CST
                ("z", "2017-11-26 12:00", "view")])
    df = build_examples(con, LabelConfig(task="session", step="1d", tz="Asia/Shanghai")).to_pandas()
    assert dict(zip(df["user_id"], df["period"])) == {"a": 0, "b": 1}


def test_single_example_for_serving():
    con = _con(SESSIONS)
    at = datetime(2024, 1, 3, 9)
    one = single_example(con, "u2", at, LabelConfig(task="session")).to_pylist()[0]
    assert one["session_id"] == "s4" and one["session_start"] == datetime(2024, 1, 3, 8) and one["cutoff"] == at
    one = single_example(con, "u2", at, LabelConfig(task="user")).to_pylist()[0]
    assert one["session_start"] is None and one["user_id"] == "u2"


def _taobao(con, path):
    con.execute(f"""
        CREATE TABLE events AS
        SELECT user_id::VARCHAR AS user_id, to_timestamp(ts)::TIMESTAMPTZ AT TIME ZONE 'UTC' AS ts,
               CASE behavior WHEN 'pv' THEN 'view' WHEN 'cart' THEN 'cart' WHEN 'fav' THEN 'wishlist'
                             WHEN 'buy' THEN 'purchase' END AS event,
               item_id::VARCHAR AS item_id, category_id::VARCHAR AS category, NULL::DOUBLE AS price,
               NULL::VARCHAR AS session_id
        FROM read_csv('{path}', header = false, ignore_errors = true, null_padding = false,
                      columns = {{'user_id': 'BIGINT', 'item_id': 'BIGINT', 'category_id': 'BIGINT',
                                 'behavior': 'VARCHAR', 'ts': 'BIGINT'}})
        WHERE ts IS NOT NULL
          AND to_timestamp(ts) >= TIMESTAMPTZ '2017-11-25 00:00:00+08'
          AND to_timestamp(ts) < TIMESTAMPTZ '2017-12-04 00:00:00+08'""")


@pytest.mark.shared_data
def test_taobao_head_user_task(shared_data):
    con = duckdb.connect()
    _taobao(con, shared_data / "taobao_userbehavior" / "UserBehavior_head.csv.gz")
    cfg = LabelConfig(lookback="3d", horizon="1d", step="1d", tz="Asia/Shanghai")
    cutoffs = make_cutoffs(con, cfg)
    assert cutoffs == [datetime(2017, 11, 27, 16) + i * D for i in range(6)]
    ex = build_examples(con, cfg)
    split, info = split_examples(ex, cfg)
    df = ex.to_pandas()
    rates = df.groupby("cutoff")["label"].agg(["size", "mean"])
    print("\n" + rates.to_string() + "\n" + info.describe())
    assert (rates["size"] > 300).all() and rates["mean"].between(0.05, 0.4).all()
    assert info.n_gap == 0 and info.splits["test"]["n"] == rates["size"].iloc[-1]


def test_suggest_step_names_the_largest_smaller_step_whose_split_fits():
    from purchase_intent.labels import suggest_step

    # 20 days of daily activity: lookback 7d + horizon 3d leave 2 weekly cutoffs, too few for a split
    rows = [(f"u{u}", f"2024-03-{d:02d}T10:00:00", "view") for u in range(3) for d in range(1, 21)]
    con = _con(rows)
    cfg = LabelConfig(lookback="7d", horizon="3d", step="7d")
    with pytest.raises(ValueError, match="smaller step"):
        split_examples(build_examples(con, cfg), cfg)
    step = suggest_step(con, cfg)
    assert step == "4d"  # the largest: 5d and 6d still leave too few cutoffs
    for too_big in ("5d", "6d"):
        c = LabelConfig(lookback="7d", horizon="3d", step=too_big)
        with pytest.raises(ValueError, match="periods cannot hold"):
            split_examples(build_examples(con, c), c)
    fitted = LabelConfig(lookback="7d", horizon="3d", step=step)
    split, _ = split_examples(build_examples(con, fitted), fitted)
    assert {"train", "valid", "test"} <= set(split)


def test_suggest_step_is_none_when_no_step_fits():
    from purchase_intent.labels import suggest_step

    rows = [("u1", f"2024-03-{d:02d}T10:00:00", "view") for d in range(1, 9)]  # 8 days: lookback 7d leaves none
    assert suggest_step(_con(rows), LabelConfig(lookback="7d", horizon="3d", step="7d")) is None


def test_a_suggested_step_leaves_train_examples_past_the_gap():
    """A horizon longer than a smaller step: a train cutoff whose label window reaches past the first valid
    cutoff is dropped into the gap. On 9 days (lookback 3d, horizon 2d) '--step 12h' was suggested, and it built
    no train example; no step fits there; on 10 days the 1d step's train periods all fell in the gap (an empty train
    split, now refused at build), and 12 days fit."""
    from purchase_intent.labels import suggest_step

    def log(days: int):
        return _con([(f"u{u}", f"2024-03-{d:02d}T{h:02d}:00:00", "view") for u in range(3)
                     for d in range(1, days + 1) for h in (1, 13)])

    cfg = LabelConfig(lookback="3d", horizon="2d", step="1d")
    assert suggest_step(log(9), cfg) is None
    with pytest.raises(ValueError):
        split_examples(build_examples(log(9), cfg), cfg)
    with pytest.raises(ValueError, match="no train example is left"):  # periods, but every train one in the gap
        split_examples(build_examples(log(10), cfg), cfg)
    split, _ = split_examples(build_examples(log(12), cfg), cfg)
    assert {"train", "valid", "test"} <= set(split)
