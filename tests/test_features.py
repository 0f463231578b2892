"""Tabular features: documented columns, values against a plain pandas reference, one user = batch."""
from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from purchase_intent.config import FeatureConfig, LabelConfig
from purchase_intent.feature_frame import compute_features_for_users, compute_features_frame
from purchase_intent.features import DAYPARTS, FEATURES, WEEKDAYS, compute_features, feature_docs
from purchase_intent.labels import build_examples, single_example

USER = LabelConfig(task="user", lookback="7d", horizon="3d", step="2d")
SESSION = LabelConfig(task="session", step="3d")
CFG = FeatureConfig(windows=("1d", "7d"), tz="Asia/Shanghai")


def _con(events: pd.DataFrame) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.register("events_df", events)
    con.execute("CREATE TABLE events AS SELECT * FROM events_df")
    con.unregister("events_df")
    return con


def _build(events, lcfg, fcfg=CFG):
    con = _con(events)
    ex = build_examples(con, lcfg)
    con.register("examples", ex)
    return ex.to_pandas(), compute_features(con, "examples", fcfg)


def test_every_column_is_documented(tiny_events):
    for lcfg, session in ((USER, False), (SESSION, True)):
        ex, X = _build(tiny_events, lcfg)
        assert list(X.columns) == list(feature_docs(CFG, session))
        assert X.index.name == "example_id" and list(X.index) == list(ex["example_id"])
        assert (X.dtypes == "float64").all()
        assert all(isinstance(d, str) and d for d in feature_docs(CFG, session).values())
    _, X = _build(tiny_events, SESSION, FeatureConfig())
    assert list(X.columns) == list(FEATURES)  # FEATURES documents the default configuration


def _reference(events: pd.DataFrame, ex: pd.DataFrame) -> pd.DataFrame:
    """The same features, the slow obvious way, one example at a time."""
    rows = []
    for r in ex.itertuples():
        h = events[(events["user_id"] == r.user_id) & (events["ts"] < r.cutoff)]
        age_h = (r.cutoff - h["ts"]) / pd.Timedelta(hours=1)
        local = h["ts"].dt.tz_localize("UTC").dt.tz_convert("Asia/Shanghai")
        out = {"n_events_all": len(h), "days_since_first_event": age_h.max() / 24,
               "n_items": h["item_id"].nunique(), "n_categories": h["category"].nunique(),
               "n_items_carted_not_bought": len(set(h.item_id[h.event == "cart"])
                                                - set(h.item_id[h.event == "purchase"])),
               "spend": h.price[h.event == "purchase"].sum(), "price_mean": h.price.mean(),
               "price_max": h.price.max(), "price_std": h.price.std(ddof=1),
               "n_sessions": h["session_id"].nunique(),
               "minutes_per_session": h.groupby("session_id")["ts"].agg(
                   lambda t: (t.max() - t.min()).total_seconds()).sum() / 60 / max(h["session_id"].nunique(), 1),
               "share_night": (local.dt.hour < 6).mean(), "share_sun": (local.dt.day_of_week == 6).mean()}
        for t in ("view", "cart", "purchase", "wishlist"):
            out[f"n_{t}_all"] = (h.event == t).sum()
            out[f"hours_since_last_{t}"] = age_h[h.event == t].min()
            for w, hours in (("1d", 24), ("7d", 168)):
                out[f"n_{t}_{w}"] = ((h.event == t) & (age_h <= hours)).sum()
        if not pd.isna(r.session_start):
            s = h[h["ts"] >= r.session_start]
            out.update(ses_n_events=len(s), ses_n_view=(s.event == "view").sum(), ses_n_items=s.item_id.nunique(),
                       ses_n_items_carted=s.item_id[s.event == "cart"].nunique(),
                       ses_minutes=(s.ts.max() - r.session_start).total_seconds() / 60)
        rows.append(out)
    return pd.DataFrame(rows, index=ex["example_id"]).astype(float)


@pytest.mark.parametrize("lcfg", [USER, SESSION], ids=["user", "session"])
def test_values_match_a_pandas_reference(tiny_events, lcfg):
    ex, X = _build(tiny_events, lcfg)
    ref = _reference(tiny_events, ex)
    assert len(ref.columns) > 20
    pd.testing.assert_frame_equal(X[ref.columns], ref, check_names=False, rtol=1e-9, atol=1e-9)


def test_bounded_history_path_agrees_when_the_bound_is_long(tiny_events):
    for lcfg in (USER, SESSION):
        _, X = _build(tiny_events, lcfg)
        _, Y = _build(tiny_events, lcfg, FeatureConfig(windows=CFG.windows, tz=CFG.tz, history="3650d"))
        pd.testing.assert_frame_equal(X, Y, rtol=1e-9, atol=1e-9)
    _, X = _build(tiny_events, USER)
    _, Z = _build(tiny_events, USER, FeatureConfig(windows=CFG.windows, tz=CFG.tz, history="1d"))
    assert (Z["n_events_all"] == Z["n_events_1d"]).all() and (Z["n_events_all"] <= X["n_events_all"]).all()


@pytest.mark.parametrize("lcfg", [USER, SESSION], ids=["user", "session"])
def test_one_user_at_serving_equals_batch(tiny_events, lcfg):
    ex, X = _build(tiny_events, lcfg)
    for i in (0, len(ex) // 2, len(ex) - 1):
        row = ex.iloc[i]
        mine = tiny_events[tiny_events["user_id"] == row["user_id"]]
        con = _con(mine)  # the request's events only
        one = single_example(con, row["user_id"], row["cutoff"].to_pydatetime(), lcfg)
        con.register("examples", one)
        got = compute_features(con, "examples", CFG)
        assert got.shape == (1, X.shape[1])
        np.testing.assert_allclose(got.to_numpy()[0], X.loc[row["example_id"]].to_numpy(), rtol=1e-9, equal_nan=True)


def test_missing_values_without_prices_or_history(tiny_events):
    ev = tiny_events.assign(price=np.nan)
    ex, X = _build(ev, USER)
    assert X[["price_mean", "price_max", "price_std", "cart_price_mean"]].isna().all().all()
    bought = X["n_purchase_all"] > 0
    assert X.loc[bought, "spend"].isna().all() and (X.loc[~bought, "spend"] == 0).all()
    assert (X.loc[X["n_cart_all"] == 0, "hours_since_last_cart"].isna()).all()
    dayparts = ("night", "morning", "afternoon", "evening")
    shares = X[[c for c in X.columns if c.startswith("share_") and c[6:] in dayparts]]
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)
    # an example whose user has no event before the cutoff: zero counts, NaN elsewhere
    con = _con(tiny_events)
    con.register("examples", pd.DataFrame({"example_id": [7], "user_id": ["u0"],
                                           "cutoff": [tiny_events["ts"].min().to_pydatetime()]}))
    one = compute_features(con, "examples", CFG)
    assert one.loc[7, "n_events_all"] == 0 and np.isnan(one.loc[7, "hours_since_last_event"])


def _random_log(seed: int, n_users: int = 6, n: int = 400, start: str = "2024-03-01T00:00:00") -> pd.DataFrame:
    """Events with every awkward case: NULL prices / items / categories / session ids, unknown
    events, tied timestamps, gaps around the session gap, users absent from the examples."""
    rng = np.random.default_rng(seed)
    start = np.datetime64(start, "us")
    step = rng.choice([0, 1, 59, 1799, 1800, 1801, 7200, 86400, 3 * 86400], size=n)  # seconds
    ts = start + (np.cumsum(step) * 1_000_000 // 3).astype("timedelta64[us]")
    users = rng.integers(0, n_users, size=n)
    item = rng.integers(0, 15, size=n)
    df = pd.DataFrame({
        "user_id": [f"u{u}" for u in users],
        "ts": ts[rng.permutation(n)],  # shuffled: the frame path must not rely on order
        "event": rng.choice(["view", "view", "cart", "remove_from_cart", "wishlist", "purchase", "other"], size=n),
        "item_id": np.where(rng.random(n) < 0.1, None, np.array([f"i{i}" for i in item], dtype=object)),
        "category": np.where(rng.random(n) < 0.1, None, np.array([f"c{i % 4}" for i in item], dtype=object)),
        "price": np.where(rng.random(n) < 0.2, np.nan, np.round(rng.uniform(1, 300, n), 2)),
        "session_id": np.where(rng.random(n) < 0.4, None,
                               np.array([f"s{u}-{k}" for u, k in zip(users, rng.integers(0, 4, n))], dtype=object)),
    })
    df["ts"] = df["ts"].astype("datetime64[us]")
    return df


def _random_examples(events: pd.DataFrame, seed: int, session: bool) -> pd.DataFrame:
    rng = np.random.default_rng(seed + 1)
    lo, hi = events["ts"].min(), events["ts"].max()
    n = 40
    cut = lo + (hi - lo) * rng.uniform(-0.05, 1.05, n)
    cut = np.where(rng.random(n) < 0.2, events["ts"].sample(n, random_state=seed, replace=True).to_numpy(), cut)
    ex = pd.DataFrame({"example_id": rng.permutation(n).astype(np.int64) + 10,
                       "user_id": [f"u{u}" for u in rng.integers(0, 8, n)],  # u6, u7: no events
                       "cutoff": pd.Series(cut).astype("datetime64[us]")})
    if session:
        start = ex["cutoff"] - pd.to_timedelta(rng.integers(0, 6 * 3600, n), unit="s")
        ex["session_start"] = start.where(rng.random(n) < 0.7).astype("datetime64[us]")
    return ex


@pytest.mark.parametrize("seed", range(6))
def test_numpy_path_equals_the_sql_path_on_random_logs(seed):
    events = _random_log(seed)
    session = seed % 2 == 1
    cfg = [FeatureConfig(), CFG, FeatureConfig(windows=("6h", "2d"), history="4d", session_gap="10min")][seed % 3]
    ex = _random_examples(events, seed, session)
    con = _con(events)
    con.register("examples", ex)
    want = compute_features(con, "examples", cfg)
    got = compute_features_frame(events, ex, cfg)
    assert list(got.columns) == list(want.columns) and list(got.index) == list(want.index)
    assert (got.dtypes == "float64").all()
    for c in want.columns:  # feature by feature, NaN where SQL gives NULL
        np.testing.assert_allclose(got[c].to_numpy(), want[c].to_numpy(), rtol=1e-9, atol=1e-9, equal_nan=True,
                                   err_msg=c)
    # tied timestamps: neither path depends on how the rows happen to be stored
    flipped = events.iloc[::-1].reset_index(drop=True)
    con2 = _con(flipped)
    con2.register("examples", ex)
    pd.testing.assert_frame_equal(compute_features(con2, "examples", cfg), want, rtol=1e-9, atol=1e-9)
    pd.testing.assert_frame_equal(compute_features_frame(flipped, ex, cfg), got, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("lcfg", [USER, SESSION], ids=["user", "session"])
def test_numpy_path_equals_the_sql_path_on_the_tiny_log(tiny_events, lcfg):
    ex, X = _build(tiny_events, lcfg)
    got = compute_features_frame(tiny_events, ex, CFG)
    pd.testing.assert_frame_equal(got, X, rtol=1e-9, atol=1e-9)
    # one user, from plain column lists (what the API holds), equals the batch row
    row = ex.iloc[len(ex) // 2]
    mine = tiny_events[tiny_events["user_id"] == row["user_id"]]
    cols = {c: mine[c].tolist() for c in mine.columns}
    one = compute_features_frame(cols, ex.iloc[[len(ex) // 2]], CFG)
    np.testing.assert_allclose(one.to_numpy()[0], X.loc[row["example_id"]].to_numpy(), rtol=1e-9, equal_nan=True)


@pytest.mark.parametrize("seed", range(3))
def test_numpy_path_reads_arrow_tables(seed):
    events = _random_log(seed)
    cfg = [FeatureConfig(), CFG, FeatureConfig(windows=("6h", "2d"), history="4d", session_gap="10min")][seed]
    ex = _random_examples(events, seed, session=seed == 1)
    want = compute_features_frame(events, ex, cfg)
    got = compute_features_frame(pa.Table.from_pandas(events, preserve_index=False), ex, cfg)
    pd.testing.assert_frame_equal(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_features_for_users_at_one_cutoff_equal_the_sql_and_ignore_later_events(seed):
    """The batch-scoring path (events read from DuckDB, reduced in numpy) equals the SQL, and
    events at or after the cutoff (changed, moved, added) do not move a feature."""
    events = _random_log(seed, n_users=8, n=600)
    cfg = [FeatureConfig(), CFG, FeatureConfig(windows=("6h", "2d"), history="4d", session_gap="10min")][seed % 3]
    lo, hi = events["ts"].min(), events["ts"].max()
    cutoff = (lo + (hi - lo) * [0.5, 0.8, 1.0, 0.3][seed]).floor("s")
    if seed == 2:
        cutoff = hi  # an event exactly at the cutoff is not read
    ex = pd.DataFrame({"example_id": np.arange(9, dtype=np.int64) + 100,
                       "user_id": [f"u{u}" for u in range(9)],  # u8 has no events
                       "cutoff": pd.Series([cutoff] * 9).astype("datetime64[us]")})
    con = _con(events)
    con.register("examples", ex)
    want = compute_features(con, "examples", cfg)
    got = compute_features_for_users(con, ex, cfg)
    assert list(got.columns) == list(want.columns) and list(got.index) == list(want.index)
    for c in want.columns:
        np.testing.assert_allclose(got[c].to_numpy(), want[c].to_numpy(), rtol=1e-9, atol=1e-9, equal_nan=True,
                                   err_msg=c)
    # perturb everything at or after the cutoff
    rng = np.random.default_rng(seed)
    late = events["ts"] >= cutoff
    moved = events.copy()
    moved.loc[late, "event"] = rng.choice(["view", "purchase", "cart", "other"], int(late.sum()))
    moved.loc[late, "price"] = rng.uniform(1, 999, int(late.sum()))
    extra = events.sample(20, random_state=seed).assign(ts=cutoff, item_id="new-item", event="purchase")
    moved = pd.concat([moved, extra], ignore_index=True)
    got2 = compute_features_for_users(_con(moved), ex, cfg)
    pd.testing.assert_frame_equal(got2, got, rtol=0, atol=0)


# Europe/Berlin switches to summer time on 2017-03-26 (02:00 CET -> 03:00 CEST): local hours and
# weekdays shift by one hour against UTC in the middle of these logs
BERLIN = "Europe/Berlin"
DST_CFGS = [FeatureConfig(windows=("1d", "7d"), tz=BERLIN),
            FeatureConfig(windows=("6h", "2d"), history="4d", session_gap="10min", tz=BERLIN)]


def _dst_log(seed: int, n_users: int = 6) -> pd.DataFrame:
    """``_random_log`` from 2017-03-20 up to 2017-04-02 (UTC), across the change to summer time."""
    logs = [_random_log(100 * seed + k, n_users=n_users, start="2017-03-20T00:00:00") for k in range(4)]
    events = pd.concat(logs, ignore_index=True)  # four logs of the same users: about 350 events in the range
    events = events[events["ts"] < pd.Timestamp("2017-04-02")].reset_index(drop=True)
    assert events["ts"].min() < pd.Timestamp("2017-03-26 01:00") < events["ts"].max()
    return events


def _local_shares(events: pd.DataFrame, ex: pd.DataFrame, cfg: FeatureConfig) -> pd.DataFrame:
    """share_<daypart> and share_<weekday> the obvious way: each example's history in local time."""
    rows = []
    for r in ex.itertuples():
        h = events[(events["user_id"] == r.user_id) & (events["ts"] < r.cutoff)]
        if cfg.history:
            h = h[h["ts"] >= r.cutoff - pd.Timedelta(days=int(cfg.history[:-1]))]
        local = h["ts"].dt.tz_localize("UTC").dt.tz_convert(cfg.tz)
        hour, dow = local.dt.hour, local.dt.day_of_week
        out = {f"share_{n}": ((hour >= a) & (hour < b)).mean() for n, (a, b) in DAYPARTS.items()}
        out.update({f"share_{d}": (dow == i).mean() for i, d in enumerate(WEEKDAYS)})
        rows.append(out)
    return pd.DataFrame(rows, index=pd.Index(ex["example_id"], name="example_id")).astype(float)


@pytest.mark.parametrize("seed", range(4))
def test_numpy_path_equals_the_sql_path_across_a_dst_change(seed):
    events = _dst_log(seed)
    cfg = DST_CFGS[seed % 2]
    ex = _random_examples(events, seed, session=seed >= 2)
    con = _con(events)
    con.register("examples", ex)
    want = compute_features(con, "examples", cfg)
    got = compute_features_frame(events, ex, cfg)
    assert list(got.columns) == list(want.columns) and list(got.index) == list(want.index)
    for c in want.columns:
        np.testing.assert_allclose(got[c].to_numpy(), want[c].to_numpy(), rtol=1e-9, atol=1e-9, equal_nan=True,
                                   err_msg=c)
    # the local hours and weekdays follow Berlin's clock on both sides of the change
    ref = _local_shares(events, ex.sort_values("example_id"), cfg)
    pd.testing.assert_frame_equal(want[ref.columns], ref, check_names=False, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cfg", DST_CFGS, ids=["all-history", "bounded-history"])
def test_features_for_users_equal_the_sql_across_a_dst_change(cfg):
    events = _dst_log(1, n_users=8)
    ex = pd.DataFrame({"example_id": np.arange(9, dtype=np.int64),
                       "user_id": [f"u{u}" for u in range(9)],  # u8 has no events
                       "cutoff": pd.Series([pd.Timestamp("2017-03-28 22:30")] * 9).astype("datetime64[us]")})
    con = _con(events)
    con.register("examples", ex)
    want = compute_features(con, "examples", cfg)
    got = compute_features_for_users(con, ex, cfg)
    pd.testing.assert_frame_equal(got, want, rtol=1e-9, atol=1e-9)
