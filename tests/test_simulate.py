"""The seeded shop simulator: determinism, schema, time order, funnel, order-dependent signal, rhythm."""
from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from purchase_intent.simulate import EVENTS, SimConfig, iter_event_tables, purchase_chance, simulate, write_events

DAY = 86_400_000
TINY = SimConfig(n_users=300, days=20, seed=3, n_items=400, n_categories=12)


@pytest.fixture(scope="module")
def sim() -> pd.DataFrame:
    # big enough for stable rates (about 150k events), small enough to take well under a second
    return simulate(SimConfig(n_users=4_000, days=70, seed=1))


def _session_table(df: pd.DataFrame) -> pd.DataFrame:
    g = df.groupby("session_id")
    sess = g.agg(user_id=("user_id", "first"), t0=("ts", "min"), t1=("ts", "max"))
    for ev in ("cart", "remove_from_cart", "purchase"):
        sess[ev] = df["event"].eq(ev).groupby(df["session_id"]).any()
    return sess.reset_index()


def _buys_within(left: pd.DataFrame, df: pd.DataFrame, after: str, window_ms: int) -> pd.Series:
    """Per row of ``left``: does the user purchase in (left[after], left[after] + window]?"""
    buys = df.loc[df["event"] == "purchase", ["user_id", "ts"]].rename(columns={"ts": "tb"})
    m = left.reset_index(names="row")[["row", "user_id", after]].merge(buys, on="user_id", how="left")
    hit = (m["tb"] > m[after]) & (m["tb"] <= m[after] + window_ms)
    return hit.groupby(m["row"]).any().reindex(range(len(left)), fill_value=False).to_numpy()


def test_same_seed_same_frame_and_different_seed_differs():
    a, b = simulate(TINY), simulate(TINY)
    pd.testing.assert_frame_equal(a, b)
    c = simulate(SimConfig(**{**TINY.__dict__, "seed": 4}))
    assert len(a) > 0 and (len(a) != len(c) or not a.equals(c))


def test_schema_dtypes_and_values():
    df = simulate(TINY)
    assert list(df.columns) == ["user_id", "ts", "event", "item_id", "category", "price", "session_id"]
    assert df["ts"].dtype == np.int64 and df["price"].dtype == np.float64
    for col in ("user_id", "event", "item_id", "category", "session_id"):
        assert pd.api.types.is_string_dtype(df[col]), col
    assert not df.isna().any().any()
    assert set(df["event"]) == set(EVENTS)
    assert df["user_id"].str.fullmatch(r"u\d+").all() and df["item_id"].str.fullmatch(r"i\d+").all()
    assert df["category"].str.fullmatch(r"c\d+").all() and df["session_id"].str.fullmatch(r"s\d+").all()
    start = pd.Timestamp(TINY.start).value // 1_000_000
    assert df["ts"].min() >= start and df["ts"].max() < start + (TINY.days + 1) * DAY
    assert (df["price"] > 0).all()
    # an item always has the same category and price; a session belongs to one user
    assert df.groupby("item_id")[["category", "price"]].nunique().max().max() == 1
    assert df.groupby("session_id")["user_id"].nunique().max() == 1


def test_sorted_by_ts_and_day_chunks_are_in_time_order():
    df = simulate(TINY)
    assert df["ts"].is_monotonic_increasing
    assert df.index.equals(pd.RangeIndex(len(df)))
    tables = list(iter_event_tables(TINY))
    assert len(tables) == TINY.days
    for prev, nxt in zip(tables, tables[1:]):
        if prev.num_rows and nxt.num_rows:
            assert prev["ts"].to_numpy().max() <= nxt["ts"].to_numpy().min()
    chunked = pd.concat([t.to_pandas() for t in tables], ignore_index=True)
    pd.testing.assert_frame_equal(chunked, df)


@pytest.mark.parametrize("name", ["ev.csv", "ev.csv.gz", "ev.parquet"])
def test_write_events_round_trip(tmp_path, name):
    path = tmp_path / name
    rows = write_events(TINY, path)
    expected = simulate(TINY)
    assert rows == len(expected)
    if name.endswith(".parquet"):
        back = pd.read_parquet(path)
    else:
        if name.endswith(".gz"):
            assert gzip.open(path).read(9) == b'"user_id"'
        text_columns = ("user_id", "event", "item_id", "category", "session_id")
        back = pd.read_csv(path, dtype=dict.fromkeys(text_columns, str))
    pd.testing.assert_frame_equal(back, expected, check_dtype=False)
    assert back["ts"].dtype == np.int64
    assert not list(tmp_path.glob("*.tmp"))


def test_write_events_rejects_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="format"):
        write_events(TINY, tmp_path / "ev.xlsx")


def test_funnel_carted_items_are_bought_more_than_viewed_only(sim):
    pairs = (sim.assign(c=sim["event"] == "cart", b=sim["event"] == "purchase")
             .groupby(["user_id", "item_id"])[["c", "b"]].any())
    rates = pairs.groupby("c")["b"].mean()
    assert rates[True] > 0.2 and rates[True] > 10 * rates[False]
    counts = sim["event"].value_counts()
    assert counts["view"] > counts["cart"] > counts["purchase"] > counts["remove_from_cart"] > 0


def test_revisit_of_carted_item_predicts_purchase(sim):
    # for each (user, item) cart: the user's first later session (within 7 days) that buys nothing;
    # does it view the carted item again? Then: does the user buy within 7 days after that session?
    sess = _session_table(sim)
    carts = sim.loc[sim["event"] == "cart"].drop_duplicates(["user_id", "item_id"])[["user_id", "item_id", "ts"]]
    m = carts.merge(sess, on="user_id")
    m = m[(m["t0"] > m["ts"]) & (m["t0"] < m["ts"] + 7 * DAY) & ~m["purchase"]]
    m = m.sort_values("t0", kind="stable").drop_duplicates(["user_id", "item_id"]).reset_index(drop=True)
    views = sim.loc[sim["event"] == "view", ["session_id", "item_id"]].drop_duplicates().assign(seen=True)
    m = m.merge(views, on=["session_id", "item_id"], how="left")
    seen = m["seen"].eq(True).to_numpy()
    y = _buys_within(m, sim, "t1", 7 * DAY)
    assert seen.sum() > 100 and (~seen).sum() > 100
    # same counts of sessions and carts, different order: the revisit doubles the purchase rate
    assert y[seen].mean() > 1.5 * y[~seen].mean()


def test_remove_right_after_cart_lowers_later_purchases(sim):
    sess = _session_table(sim)
    s = sess[sess["cart"] & ~sess["purchase"]].reset_index(drop=True)
    y = _buys_within(s, sim, "t1", 14 * DAY)
    removed = s["remove_from_cart"].to_numpy()
    assert removed.sum() > 100
    assert y[removed].mean() < 0.7 * y[~removed].mean()


def test_comparing_then_carting_the_cheapest_is_bought_more_often(sim):
    # carts after views of >= 3 items of the cart's category in the same session: the pattern
    # "compare, view the cheapest again, cart it" is bought in-session more often than the rest
    ev = sim.reset_index(names="row")
    carts = ev.loc[ev["event"] == "cart", ["row", "session_id", "category", "item_id", "price", "ts"]]
    views = ev.loc[ev["event"] == "view", ["session_id", "category", "item_id", "price", "ts"]]
    m = carts.merge(views, on=["session_id", "category"], suffixes=("", "_v"))
    m = m[m["ts_v"] < m["ts"]]
    agg = m.groupby("row").agg(n=("item_id_v", "nunique"), low=("price_v", "min"), price=("price", "first"))
    again = m[m["item_id_v"] == m["item_id"]].groupby("row").size().reindex(agg.index, fill_value=0)
    buy_sessions = set(ev.loc[ev["event"] == "purchase", "session_id"])
    agg["bought"] = carts.set_index("row")["session_id"].isin(buy_sessions).reindex(agg.index)
    many = agg[agg["n"] >= 3]
    pattern = (many["price"] <= many["low"]) & (again.reindex(many.index) >= 2)
    other = many["price"] > many["low"]
    assert pattern.sum() > 100 and other.sum() > 100
    assert many.loc[pattern, "bought"].mean() > 1.4 * many.loc[other, "bought"].mean()


def test_daily_and_weekly_rhythm(sim):
    ts = pd.to_datetime(sim["ts"], unit="ms")
    per_hour = ts.dt.hour.value_counts().reindex(range(24), fill_value=0)
    assert per_hour[[19, 20, 21]].mean() > 3 * per_hour[[2, 3, 4]].mean()
    per_day = ts.dt.normalize().value_counts()
    weekend = per_day.index.day_of_week >= 5
    assert per_day[weekend].mean() > 1.1 * per_day[~weekend].mean()


def test_positive_rate_for_7d_horizon_28d_lookback(sim):
    start = pd.Timestamp("2024-01-01").value // 1_000_000
    rates = []
    for c in start + DAY * np.arange(28, 70 - 7 + 1, 7):
        active = set(sim.loc[(sim["ts"] >= c - 28 * DAY) & (sim["ts"] < c), "user_id"])
        window = sim[(sim["ts"] >= c) & (sim["ts"] < c + 7 * DAY) & (sim["event"] == "purchase")]
        rates.append(len(active & set(window["user_id"])) / len(active))
    assert 0.03 < np.mean(rates) < 0.2
    # many users never buy
    assert sim.loc[sim["event"] == "purchase", "user_id"].nunique() < 0.6 * sim["user_id"].nunique()


def test_rejects_impossible_catalogue():
    with pytest.raises(ValueError):
        simulate(SimConfig(n_users=10, days=2, n_items=5, n_categories=10))


def test_zero_days_gives_an_empty_frame_with_the_schema():
    df = simulate(SimConfig(n_users=10, days=0))
    assert len(df) == 0 and list(df.columns)[:2] == ["user_id", "ts"] and df["ts"].dtype == np.int64


def test_purchase_chance_is_calibrated_ranks_well_and_leaves_the_log_unchanged(sim):
    from sklearn.metrics import roc_auc_score

    cfg = SimConfig(n_users=4_000, days=70, seed=1)
    chance = purchase_chance(cfg, [35, 56], 7, n_rollouts=60)
    assert sorted(chance) == [35, 56]
    assert all(c.shape == (4_000,) and ((c >= 0) & (c <= 1)).all() for c in chance.values())
    ys, ps = [], []
    for d in (35, 56):
        lo, hi = d * DAY, (d + 7) * DAY
        ts = sim["ts"] - sim["ts"].min() // DAY * DAY  # ms since the first midnight
        buyers = sim.loc[(sim["event"] == "purchase") & (ts >= lo) & (ts < hi), "user_id"].str[1:].astype(int)
        active = sim.loc[(ts >= lo - 28 * DAY) & (ts < lo), "user_id"].str[1:].astype(int).unique()
        ys.append(np.isin(active, buyers.unique()))
        ps.append(chance[d][active])
    y, p = np.concatenate(ys), np.concatenate(ps)
    # the realised purchase rate is the mean chance, up to sampling noise (about 5k examples)
    assert abs(y.mean() - p.mean()) < 4 * np.sqrt(p.mean() * (1 - p.mean()) / len(y)) + 0.01
    assert roc_auc_score(y, p) > 0.85  # the latent state ranks far better than chance
    # deterministic, and the replay does not disturb the log it replays
    again = purchase_chance(cfg, [56], 7, n_rollouts=60)
    np.testing.assert_array_equal(again[56], chance[56])
    pd.testing.assert_frame_equal(simulate(cfg), sim)


def test_purchase_chance_rejects_days_outside_the_log():
    with pytest.raises(ValueError, match="days must lie"):
        purchase_chance(TINY, [TINY.days], 7)
    with pytest.raises(ValueError, match="n_rollouts"):
        purchase_chance(TINY, [3], 7, n_rollouts=0)
