"""Event sequences: layout, tokens, train-only price edges, chunking, and no leakage past the cutoff."""
from __future__ import annotations

import json

import duckdb
import numpy as np
import pandas as pd
import pytest
from test_leakage import perturb_after

from purchase_intent.sequence_frame import build_sequences_frame
from purchase_intent.sequences import (
    SEQUENCE_FIELDS,
    SequenceConfig,
    SequenceVocab,
    build_sequences,
    fit_vocab,
    stable_bucket,
)
from purchase_intent.vocabulary import EVENT_CODES

CUTOFFS = ["2024-03-08", "2024-03-15", "2024-03-19"]  # the tiny log runs to 2024-03-21: events after each


def _con(events: pd.DataFrame, examples: pd.DataFrame | None = None) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.register("events_df", events)
    con.execute("CREATE TABLE events AS SELECT * FROM events_df")
    if examples is not None:
        con.register("examples_df", examples)
        con.execute("CREATE TABLE examples AS SELECT * FROM examples_df")
    return con


def _examples(events: pd.DataFrame) -> pd.DataFrame:
    users = sorted(events["user_id"].unique())
    rows = [(c, u) for c in CUTOFFS for u in users]
    return pd.DataFrame({"example_id": np.arange(len(rows), dtype=np.int64),
                         "user_id": [u for _, u in rows],
                         "cutoff": pd.to_datetime([c for c, _ in rows]).astype("datetime64[us]")})


def _build(events, examples, cfg=None, vocab=None):
    cfg = cfg or SequenceConfig(max_seq_len=8)
    con = _con(events, examples)
    vocab = vocab or fit_vocab(con, "examples", cfg)
    return build_sequences(con, "examples", cfg, vocab), vocab


def test_tokens_match_the_events_right_aligned(tiny_events):
    ex = _examples(tiny_events)
    cfg = SequenceConfig(max_seq_len=8, item_buckets=97, category_buckets=13)
    seq, vocab = _build(tiny_events, ex, cfg)
    assert set(SEQUENCE_FIELDS) | {"mask", "example_id"} == set(seq)
    assert all(seq[f].shape == (len(ex), 8) for f in SEQUENCE_FIELDS)
    np.testing.assert_array_equal(seq["example_id"], ex["example_id"])
    for r in range(len(ex)):
        u, cut = ex.user_id[r], ex.cutoff[r]
        ev = tiny_events[(tiny_events.user_id == u) & (tiny_events.ts < cut)].sort_values("ts", kind="stable")
        n = min(len(ev), 8)
        m = seq["mask"][r]
        assert m.sum() == n and (not n or m[-n:].all())  # right-aligned: padding on the left
        assert (seq["event"][r][~m] == 0).all() and (seq["item"][r][~m] == 0).all()
        if n == 0:
            continue
        last = ev.iloc[-1]
        assert seq["event"][r, -1] == EVENT_CODES[last.event]
        assert seq["item"][r, -1] == stable_bucket(last.item_id, 97)
        assert seq["category"][r, -1] == stable_bucket(last.category, 13)
        assert seq["hour"][r, -1] == last.ts.hour + 1 and seq["weekday"][r, -1] == last.ts.isoweekday()
        assert sorted(seq["event"][r, -n:]) == sorted(EVENT_CODES[e] for e in ev.event.iloc[-n:])
        # time-to-cutoff buckets never increase towards the most recent event
        assert (np.diff(seq["dt_cutoff"][r, -n:].astype(int)) <= 0).all()
        if len(ev) <= 8:
            assert seq["dt_prev"][r, -n] == 1  # the first event of the history has no predecessor
    assert seq["price"][seq["mask"]].min() >= 1 and seq["price"].max() <= len(vocab.price_edges) + 1


def test_no_leakage_from_events_at_or_after_the_cutoff(tiny_events):
    ex = _examples(tiny_events)
    base, vocab = _build(tiny_events, ex)
    cut = pd.Timestamp(CUTOFFS[1])
    rng = np.random.default_rng(1)
    ev = tiny_events.copy()
    after = ev.ts >= cut
    # change, delete and add events at or after the middle cutoff
    ev.loc[after, "event"] = "purchase"
    ev.loc[after, "item_id"] = "changed"
    ev.loc[after, "price"] = 999.0
    ev = ev.drop(ev[after].sample(frac=0.3, random_state=0).index)
    extra = ev.sample(20, random_state=0).copy()
    extra["ts"] = (cut + pd.to_timedelta(rng.integers(0, 3 * 86400, 20), unit="s")).astype("datetime64[us]")
    extra.iloc[0, extra.columns.get_loc("ts")] = cut  # exactly at the cutoff: still invisible
    ev = pd.concat([ev, extra], ignore_index=True)
    pert, _ = _build(ev, ex, vocab=vocab)
    early = (ex.cutoff <= cut).to_numpy()
    for f in list(SEQUENCE_FIELDS) + ["mask"]:
        np.testing.assert_array_equal(base[f][early], pert[f][early], err_msg=f)
    assert any((base[f][~early] != pert[f][~early]).any() for f in SEQUENCE_FIELDS)


def _perturbed(events: pd.DataFrame, t: pd.Timestamp, seed: int) -> pd.DataFrame:
    """``perturb_after`` (change, move, delete, add at or after ``t``), and the first real event at or
    after ``t`` moved to exactly ``t``."""
    out = perturb_after(events, t, np.random.default_rng([seed, int(t.value // 10**9)]))
    first = out.index[out.ts >= t][np.argmin(out.ts[out.ts >= t].to_numpy())]
    out.loc[first, ["ts", "event", "price"]] = [t, "purchase", 777.0]
    return out


def _train_ids(ex: pd.DataFrame, t: pd.Timestamp) -> np.ndarray:
    return ex.example_id[ex.cutoff <= t].to_numpy()


def _check_price_edges(events: pd.DataFrame, ex: pd.DataFrame, cfg: SequenceConfig, fit=fit_vocab) -> None:
    """Price edges fitted on the examples with cutoff <= T do not move when events at or after T do."""
    for t in map(pd.Timestamp, CUTOFFS):
        assert (events.ts >= t).sum() > 0  # real events to perturb
        base = fit(_con(events, ex), _train_ids(ex, t), cfg).price_edges
        for seed in range(3):
            got = fit(_con(_perturbed(events, t, seed), ex), _train_ids(ex, t), cfg).price_edges
            assert got == base, f"leak: price edges of train cutoffs <= {t.date()} moved (seed {seed})"


def test_price_edges_use_train_events_only(tiny_events):
    ex = _examples(tiny_events)
    con = _con(tiny_events, ex)
    cfg = SequenceConfig(max_seq_len=8, price_buckets=4)
    _check_price_edges(tiny_events, ex, cfg)
    v1 = fit_vocab(con, "examples", cfg)
    assert len(v1.price_edges) == 3
    v3 = fit_vocab(con, _train_ids(ex, pd.Timestamp(CUTOFFS[0])), cfg)
    assert v3.price_edges != v1.price_edges  # ids select the train examples from `examples`
    d = json.loads(json.dumps(v1.to_dict()))
    assert SequenceVocab.from_dict(d) == v1


def test_price_edge_check_catches_a_late_cutoff_and_sees_the_past(tiny_events):
    """Converses: edges fitted one day past the cutoff fail the check; a price just before T moves them."""
    ex = _examples(tiny_events)
    cfg = SequenceConfig(max_seq_len=8, price_buckets=4)

    def leaky(con, ids, cfg):
        con.execute("CREATE OR REPLACE TABLE examples AS SELECT * REPLACE (cutoff + INTERVAL 1 DAY AS cutoff) "
                    "FROM examples")
        return fit_vocab(con, ids, cfg)

    with pytest.raises(AssertionError, match="leak"):
        _check_price_edges(tiny_events, ex, cfg, fit=leaky)
    t = pd.Timestamp(CUTOFFS[1])
    ev = tiny_events.copy()
    ev.loc[(ev.ts < t) & (ev.ts >= t - pd.Timedelta(days=2)), "price"] = 1e6
    assert fit_vocab(_con(ev, ex), _train_ids(ex, t), cfg) != fit_vocab(_con(tiny_events, ex), _train_ids(ex, t), cfg)


def test_chunking_single_user_and_memmap(tiny_events, tmp_path):
    ex = _examples(tiny_events)
    full, vocab = _build(tiny_events, ex)
    small_chunks = SequenceConfig(max_seq_len=8, chunk_size=5)
    chunked = build_sequences(_con(tiny_events, ex), "examples", small_chunks, vocab, out_dir=tmp_path)
    for f in list(SEQUENCE_FIELDS) + ["mask"]:
        np.testing.assert_array_equal(full[f], np.asarray(chunked[f]))
    assert (tmp_path / "item.npy").exists()
    # serving: a connection with one user's events and one example (as a DataFrame) gives the same row
    r = 5 + len(ex) // 3
    one = ex.iloc[[r]].assign(example_id=0)
    con = _con(tiny_events[tiny_events.user_id == ex.user_id[r]])
    single = build_sequences(con, one, None, vocab)
    for f in SEQUENCE_FIELDS:
        np.testing.assert_array_equal(single[f][0], full[f][r])


def test_config_mismatch_and_unknown_user(tiny_events):
    ex = pd.DataFrame({"example_id": [0], "user_id": ["nobody"],
                       "cutoff": pd.to_datetime(["2024-03-20"]).astype("datetime64[us]")})
    seq, vocab = _build(tiny_events, ex)
    assert not seq["mask"].any() and seq["event"].sum() == 0
    with pytest.raises(ValueError, match="item_buckets"):
        build_sequences(_con(tiny_events, ex), "examples", SequenceConfig(item_buckets=7), vocab)


def test_stable_bucket_is_md5():
    assert stable_bucket("i1", 1000) == 1 + 706652275669948702 % 1000
    assert stable_bucket(None, 10) == 0


def test_item_state_reads_what_happened_to_the_item_before_each_event():
    t = pd.to_datetime(["2024-03-01 10:00", "2024-03-01 10:01", "2024-03-02 09:00", "2024-03-03 09:00",
                        "2024-03-03 09:01", "2024-03-04 09:00"]).astype("datetime64[us]")
    events = pd.DataFrame({"user_id": "u1", "ts": t,
                           "event": ["view", "cart", "view", "view", "purchase", "view"],
                           "item_id": ["a", "a", "b", "a", "a", None], "category": "c", "price": 1.0,
                           "session_id": None})
    ex = pd.DataFrame({"example_id": np.array([0, 1], dtype=np.int64), "user_id": "u1",
                       "cutoff": pd.to_datetime(["2024-03-03 09:00:30", "2024-03-05 00:00:00"]
                                                 ).astype("datetime64[us]")})
    seq, _ = _build(events, ex)
    # before 09:00:30 on 03-03: view a (new), cart a (seen), view b (new), view a (seen + carted)
    np.testing.assert_array_equal(seq["item_state"][0, -4:], [1, 2, 1, 4])
    assert not seq["mask"][0, :-4].any()
    # the later cutoff also sees the purchase (seen + carted) and a view without an item id (0)
    np.testing.assert_array_equal(seq["item_state"][1, -6:], [1, 2, 1, 4, 4, 0])


def _assert_same(sql: dict, frame: dict) -> None:
    assert set(sql) == set(frame)
    for name, a in sql.items():
        b = frame[name]
        assert np.asarray(a).dtype == b.dtype and np.asarray(a).shape == b.shape, name
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=name)


def _random_log(seed: int, n: int = 300) -> pd.DataFrame:
    """Few users, coarse timestamps (many ties in ts), NULL items/categories/prices/events, unknown
    event names; no two rows equal on all of (user, ts, event, item_id, category, price)."""
    rng = np.random.default_rng(seed)
    t0 = np.datetime64("2024-03-01T00:00:00", "us")
    ts = t0 + rng.integers(0, 20, n) * np.timedelta64(3600, "s") + rng.integers(0, 3, n) * np.timedelta64(1, "us")
    pick = lambda values, p_null: [None if rng.random() < p_null else values[i]  # noqa: E731
                                   for i in rng.integers(0, len(values), n)]
    df = pd.DataFrame({
        "user_id": pick(["u1", "u2", "u3", "ü4"], 0.0),
        "ts": ts.astype("datetime64[us]"),
        "event": pick(["view", "cart", "remove_from_cart", "wishlist", "checkout", "purchase", "other", "zoom"], 0.05),
        "item_id": pick(["a", "b", "c", "B", "é"], 0.2),
        "category": pick(["x", "y", "z"], 0.3),
        "price": [None if rng.random() < 0.25 else float(v) for v in rng.choice([1.0, 2.5, 10.0, 99.0], n)],
        "session_id": None,
    })
    return df.drop_duplicates(["user_id", "ts", "event", "item_id", "category", "price"]).reset_index(drop=True)


@pytest.mark.parametrize("seed,raw", [(0, False), (1, False), (2, True), (3, True)])
def test_frame_build_equals_sql_on_random_logs(seed, raw):
    events = _random_log(seed)
    rng = np.random.default_rng(100 + seed)
    if raw:  # raw names (NULL in parts of old workspaces: the canonical name), several per event
        events["raw_event"] = [None if rng.random() < 0.3 else v for v in
                               rng.choice(["view_item", "page_view", "begin_checkout", "Product Viewed"], len(events))]
    users = ["u1", "u2", "u3", "ü4", "nobody"]
    cut = np.datetime64("2024-03-01T00:00:00", "us") + rng.integers(0, 24 * 3600, 9) * np.timedelta64(1, "s")
    cut[0] = events.ts.iloc[0]  # exactly at an event: that event is not visible
    ex = pd.DataFrame({"example_id": rng.permutation(9).astype(np.int64) * 3,  # unordered, with gaps
                       "user_id": [users[i] for i in rng.integers(0, len(users), 9)],
                       "cutoff": cut.astype("datetime64[us]")})
    ex.loc[0, "user_id"] = events.user_id.iloc[0]
    for max_len in (4, 64):
        cfg = SequenceConfig(max_seq_len=max_len, item_buckets=7, category_buckets=3, time_buckets=8, time_max="1d",
                             raw_event_buckets=5)
        vocab = SequenceVocab(cfg=cfg, price_edges=[2.0, 10.0])
        sql = build_sequences(_con(events), ex, cfg, vocab)
        _assert_same(sql, build_sequences_frame(events, ex, cfg, vocab))
        cols = {c: events[c].tolist() for c in events.columns}  # the serving form: lists, None for NULL
        cols["ts"] = [t.to_pydatetime() for t in events.ts]
        cols["price"] = [None if np.isnan(p) else p for p in events.price]
        _assert_same(sql, build_sequences_frame(cols, ex, cfg, vocab))


def test_frame_build_equals_sql_on_tiny_events(tiny_events):
    ex = _examples(tiny_events)
    seq, vocab = _build(tiny_events, ex)
    _assert_same(seq, build_sequences_frame(tiny_events, ex, vocab.cfg, vocab))
    empty = build_sequences_frame(tiny_events.iloc[:0], ex, vocab.cfg, vocab)
    assert not empty["mask"].any() and empty["event"].shape == (len(ex), 8)
    with pytest.raises(ValueError, match="item_buckets"):
        build_sequences_frame(tiny_events, ex, SequenceConfig(item_buckets=7), vocab)


def _check_frame_ignores_the_future(events: pd.DataFrame, build=build_sequences_frame) -> int:
    """For each cutoff T and three seeds: events at or after T perturbed (some exactly at T); the rows
    of every example with cutoff <= T keep the same tokens. Returns the number of perturbed events."""
    ex = _examples(events)
    _, vocab = _build(events, ex)
    base = build(events, ex, vocab.cfg, vocab)
    moved = 0
    for t in map(pd.Timestamp, CUTOFFS):
        assert (events.ts >= t).sum() > 0  # real events at or after T
        early = (ex.cutoff <= t).to_numpy()
        for seed in range(3):
            ev = _perturbed(events, t, seed)
            assert (ev.ts == t).any()
            moved += int((ev.ts >= t).sum())
            got = build(ev, ex, vocab.cfg, vocab)
            for f in list(SEQUENCE_FIELDS) + ["mask"]:
                np.testing.assert_array_equal(got[f][early], base[f][early],
                                              err_msg=f"leak in {f}: seed {seed}, perturbed at/after {t}")
    return moved


def test_frame_build_ignores_events_at_or_after_each_cutoff(tiny_events):
    assert _check_frame_ignores_the_future(tiny_events) > 100


def test_frame_leak_check_catches_a_late_cutoff_and_sees_the_past(tiny_events):
    """Converses: the check fails for a builder that reads one day past the cutoff, and an event
    changed just before a cutoff does change that example's tokens."""
    def leaky(events, ex, cfg, vocab):
        late = ex.assign(cutoff=(ex.cutoff + pd.Timedelta(days=1)).astype("datetime64[us]"))
        return build_sequences_frame(events, late, cfg, vocab)

    with pytest.raises(AssertionError, match="leak in"):
        _check_frame_ignores_the_future(tiny_events, build=leaky)
    ex = _examples(tiny_events)
    base, vocab = _build(tiny_events, ex)
    t = pd.Timestamp(CUTOFFS[1])
    ev = tiny_events.copy()
    last = ev.index[ev.ts < t][-1]  # the last event before T (the log is sorted by ts)
    ev.loc[last, "event"] = "purchase" if ev.loc[last, "event"] != "purchase" else "view"
    got = build_sequences_frame(ev, ex, vocab.cfg, vocab)
    row = np.flatnonzero(((ex.user_id == ev.loc[last, "user_id"]) & (ex.cutoff == t)).to_numpy())
    assert (got["event"][row] != base["event"][row]).any()


def test_log_price_edges_are_fixed_before_any_data_is_read(tiny_events):
    """price_bucketing="log": the edges come from the config alone (no connection is even needed), so two
    shops with different prices get the same edges; they span price_range log-evenly and round-trip JSON."""
    cfg = SequenceConfig(max_seq_len=8, price_buckets=6, price_bucketing="log", price_range=(1.0, 10_000.0))
    v = fit_vocab(None, "examples", cfg)
    assert v.price_edges == pytest.approx([1.0, 10.0, 100.0, 1000.0, 10_000.0])
    ex = _examples(tiny_events)
    cheap = tiny_events.assign(price=tiny_events.price / 100)
    assert fit_vocab(_con(cheap, ex), "examples", cfg).price_edges == v.price_edges
    _check_price_edges(tiny_events, ex, cfg)
    assert SequenceVocab.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    # tokens: bucket by the fixed edges, whatever the train prices
    seq, _ = _build(tiny_events, ex, cfg, v)
    p = seq["price"][seq["mask"]]
    assert p.min() >= 1 and p.max() <= len(v.price_edges) + 1


@pytest.mark.parametrize("setting, match", [
    ({"price_bucketing": "linear"}, "must be 'quantile' or 'log'"),
    ({"price_bucketing": "log", "price_range": [0, 100]}, "0 < low < high"),
    ({"price_range": "cheap"}, "two numbers"),
    ({"price_buckts": 8}, "no setting 'price_buckts'"),
    ("log", "JSON object"),
])
def test_bad_sequence_settings_are_refused_before_any_data(setting, match):
    from purchase_intent.pipeline import check_params
    with pytest.raises(ValueError, match=match):
        check_params("transformer", {"sequence": setting})
