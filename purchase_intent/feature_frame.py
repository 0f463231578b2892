"""The feature definitions of ``features.py`` in numpy: for requests and batch scoring.

``compute_features_frame`` computes, from in-memory events (a DataFrame, an Arrow table or a
mapping of columns), exactly the features ``features.compute_features`` computes in SQL: the API
scores one request with it (no SQL to plan), and ``compute_features_for_users`` reads the users'
events at one cutoff from DuckDB and reduces them with it (batch scoring, no bucket joins).
``tests/test_features.py`` proves both forms equal on random logs and that events at or after a
cutoff are never read. A change of a definition goes into both modules.
"""
from __future__ import annotations

from datetime import datetime
from functools import lru_cache

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .config import FeatureConfig
from .features import DAYPARTS, SESSION_TYPES, WEEKDAYS, feature_docs
from .times import DAY_US, EPOCH, HOUR_US, ONE_US, duration_us
from .vocabulary import EVENT_TYPES


def compute_features_for_users(con: duckdb.DuckDBPyConnection, examples: pd.DataFrame,
                               cfg: FeatureConfig = FeatureConfig(), events: str = "events") -> pd.DataFrame:
    """``compute_features`` for examples with one cutoff per user (batch scoring), in numpy.

    Reads the examples' users' events with ``ts < max(cutoff)`` from ``con`` as Arrow and reduces
    them with ``compute_features_frame``, which bounds every example by its own cutoff. The same
    values as ``compute_features`` (tests prove it), several times faster at one cutoff, where the
    SQL's per-bucket join buys nothing. Each example expands its user's history, so use it for few
    examples per user; training examples (every user at every cutoff) go through
    ``compute_features``.

    Parameters
    ----------
    examples : DataFrame with example_id, user_id, cutoff (user task: no session_start).
    """
    if "session_start" in examples.columns and examples["session_start"].notna().any():
        raise ValueError("in-session features need compute_features (session-task examples)")
    if not len(examples):
        names = list(feature_docs(cfg))
        return pd.DataFrame(np.zeros((0, len(names))), columns=names, index=pd.Index([], np.int64, name="example_id"))
    # no lower bound even with a bounded history: the session gap of its first event reads the one before
    params = {"hi": np.asarray(examples["cutoff"], dtype="datetime64[us]").max().item()}
    # users come back as their number in `users` and events as an ENUM: Arrow gets both already
    # coded, which saves hashing their text
    kinds = ", ".join(f"'{t}'" for t in EVENT_TYPES)
    user_codes, users = pd.factorize(np.asarray(examples["user_id"], dtype=object))
    con.register("_feature_users", pa.table({"user_id": pa.array(list(users), pa.string()),
                                             "k": pa.array(np.arange(len(users)), pa.int64())}))
    try:
        tbl = con.sql(f"""
            SELECT u.k AS user_id, e.ts, CAST(CASE WHEN e.event IN ({kinds}) THEN e.event
                                                   WHEN e.event IS NOT NULL THEN 'other' END
                                              AS ENUM({kinds}, 'other')) AS event,
                   e.item_id, e.category, e.price, e.session_id
            FROM {events} e JOIN _feature_users u ON e.user_id = u.user_id
            WHERE e.ts < $hi""", params=params).to_arrow_table()
    finally:
        con.unregister("_feature_users")
    return compute_features_frame(tbl, examples.assign(user_id=user_codes), cfg)


# ---------------------------------------------------------------------------------------------
# the same definitions in numpy, as grouped reductions over all examples at once: no SQL to parse,
# bind and plan for one request, and no bucket joins for a whole log at one cutoff
_CODES = {t: i for i, t in enumerate(EVENT_TYPES)}  # other / unknown -> len(EVENT_TYPES), NULL -> -1
_N_CODES = len(EVENT_TYPES) + 2  # NULL, the event types, other: counted as code + 1


def _is_arrow(events) -> bool:
    return type(events).__module__.startswith("pyarrow")


def _codes(values) -> tuple[np.ndarray, list]:
    """(E,) int64 codes of equal values (NULL / NaN: -1) and the distinct values (code -> value).

    Codes only group equal values: no feature depends on their order."""
    if _is_arrow(values):
        enc = pc.dictionary_encode(values).combine_chunks()  # a dictionary array is kept as it is
        return np.asarray(enc.indices.cast(pa.int64()).fill_null(-1)), enc.dictionary.to_pylist()
    if isinstance(values, list):  # a request's few values: a dict is faster than a hash table build
        seen: dict = {}
        codes = [-1 if v is None or v != v else seen.setdefault(v, len(seen)) for v in values]
        return np.array(codes, np.int64), list(seen)
    codes, uniques = pd.factorize(np.asarray(values, dtype=object), use_na_sentinel=True)
    return codes.astype(np.int64, copy=False), list(uniques)


def _times(values) -> np.ndarray:
    """(E,) int64 microseconds since the epoch (naive UTC)."""
    if _is_arrow(values):
        us = values.cast(pa.timestamp("us")).to_numpy(zero_copy_only=False)
        return np.asarray(us, "datetime64[us]").astype(np.int64)
    # 4x faster than numpy's parser
    if isinstance(values, list) and values and all(type(t) is datetime for t in values):
        return np.array([(t - EPOCH) // ONE_US for t in values], np.int64)
    return np.asarray(values, "datetime64[us]").astype(np.int64)


def _prices(values) -> np.ndarray:
    if _is_arrow(values):
        return np.asarray(values.to_numpy(zero_copy_only=False), np.float64)  # NULL -> NaN
    try:
        return np.asarray(values, np.float64)  # None -> NaN
    except (TypeError, ValueError):
        return np.asarray(pd.to_numeric(pd.Series(values, dtype=object)), np.float64)


def _event_codes(values) -> np.ndarray:
    """(E,) int64: index in EVENT_TYPES, len(EVENT_TYPES) for other / unknown names, -1 for NULL."""
    codes, names = _codes(values)
    lut = np.array([_CODES.get(v, len(EVENT_TYPES)) for v in names] + [-1], np.int64)
    return lut[codes]  # code -1 picks the last entry


def _segment_max(seg: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, np.iinfo(np.int64).min, np.int64)
    np.maximum.at(out, seg, values)
    return out


def _unique(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values (np.unique, without its hashing: a plain sort is several times faster)."""
    k = np.sort(keys)
    return k[np.r_[True, k[1:] != k[:-1]]] if len(k) else k


def _n_distinct(seg: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """(n,) distinct non-negative values per segment (-1 = NULL is not counted)."""
    keep = values >= 0
    width = int(values.max(initial=0)) + 1
    return np.bincount(_unique(seg[keep] * width + values[keep]) // width, minlength=n).astype(np.float64)


def _session_gaps(uid: np.ndarray, ts: np.ndarray, sid: np.ndarray, n_sid: int, gap_s: float) -> np.ndarray:
    """``sess_prev_s`` of ``features_sql`` for events sorted by (user, ts): seconds since the
    previous event of the same session (data session id, else the user's previous event within
    ``gap_s``); NaN where the event starts a session. (E,) float64."""
    n = len(ts)
    d_user = np.full(n, np.nan)
    same = uid[1:] == uid[:-1]
    d_user[1:][same] = (ts[1:] - ts[:-1])[same] / 1e6
    out = np.where(d_user <= gap_s, d_user, np.nan)
    has = np.flatnonzero(sid >= 0)
    if len(has):
        key = uid[has] * (n_sid + 1) + sid[has]
        if int(key.max()) < 2 ** 62 // len(has):  # by session, then row (rows are in time order)
            by = np.argsort(key * len(has) + np.arange(len(has)))
        else:
            by = np.lexsort((np.arange(len(has)), key))
        order, k = has[by], key[by]
        d = np.full(len(order), np.nan)
        d[1:] = np.where(k[1:] == k[:-1], (ts[order][1:] - ts[order][:-1]) / 1e6, np.nan)
        out[order] = d
    return out


def _sort_events(uid, ts, has_sid, x_uid, x_lo, x_hi):
    """The order of the events by (user, ts, has session id) (``_TIE_ORDER``) and each example's
    history in it: rows [lo, hi) of its user with x_lo <= ts < x_hi. (E,), (R,), (R,) int64."""
    n_users = max(int(uid.max(initial=-1)), int(x_uid.max(initial=-1))) + 2
    t0 = int(ts.min()) - 1 if len(ts) else 0
    span = int(ts.max()) - t0 + 2 if len(ts) else 2
    if len(ts) and n_users * span < 2 ** 61:  # one int64 key: a plain argsort and one binary search
        key = (uid * span + (ts - t0)) * 2 + has_sid
        order = np.argsort(key)  # rows equal in all three give the same features in any order
        key = key[order]
        q = lambda t: (x_uid * span + np.clip(t - t0, 0, span - 1)) * 2  # noqa: E731
        lo, hi = np.searchsorted(key, q(x_lo), "left"), np.searchsorted(key, q(x_hi), "left")
    else:
        order = np.lexsort((has_sid, ts, uid))
        u, t = uid[order], ts[order]
        first, last = np.searchsorted(u, x_uid, "left"), np.searchsorted(u, x_uid, "right")
        lo = np.array([a + np.searchsorted(t[a:b], c, "left") for a, b, c in zip(first, last, x_lo)], np.int64)
        hi = np.array([a + np.searchsorted(t[a:b], c, "left") for a, b, c in zip(first, last, x_hi)], np.int64)
        lo, hi = lo.reshape(-1), hi.reshape(-1)
    missing = x_uid < 0
    lo[missing] = hi[missing] = 0
    return order, lo, np.maximum(hi, lo)


def compute_features_frame(events, examples: pd.DataFrame, cfg: FeatureConfig = FeatureConfig()) -> pd.DataFrame:
    """``compute_features`` for in-memory events, in numpy (serving, and batch scoring at one cutoff).

    The definitions are those of ``features_sql``; ``tests/test_features.py`` checks both agree on
    every feature (NaN where the SQL gives NULL) on random logs. Every example reads only the rows
    of its user with ``ts < cutoff`` (and ``ts >= cutoff - history``), picked by one binary search
    over the events sorted by (user, ts); each feature is then one grouped reduction over those rows.
    Memory and time grow with the sum of the examples' history lengths.

    Parameters
    ----------
    events : DataFrame, pyarrow Table or mapping of columns (user_id, ts, event, item_id, category,
        price, session_id), any row order; NaN / None are NULL.
    examples : DataFrame with example_id, user_id, cutoff[, session_start].

    Returns
    -------
    pandas.DataFrame (n_examples, n_features) of float64, exactly as ``compute_features``.
    """
    session = "session_start" in examples.columns and bool(examples["session_start"].notna().any())
    names = list(feature_docs(cfg, session))
    R = len(examples)
    x_ids = np.asarray(examples["example_id"], dtype=np.int64)
    x_cut = np.asarray(examples["cutoff"], dtype="datetime64[us]").astype(np.int64)
    get = (lambda c: events.column(c)) if _is_arrow(events) else (lambda c: events[c])  # noqa: E731

    # users of events and examples coded together; events sorted by (user, ts, has session id)
    uid_all, _ = _codes(_concat_ids(get("user_id"), examples["user_id"]))
    n_ev_rows = len(uid_all) - R
    uid, x_uid = uid_all[:n_ev_rows], uid_all[n_ev_rows:]
    ts = _times(get("ts"))
    sid, sids = _codes(get("session_id"))
    hist_us = duration_us(cfg.history) if cfg.history else None
    x_lo = x_cut - hist_us if hist_us else np.full(R, np.iinfo(np.int64).min // 2)
    order, lo, hi = _sort_events(uid, ts, sid >= 0, x_uid, x_lo, x_cut)
    uid, ts, sid = uid[order], ts[order], sid[order]

    # the rows of every example's history, concatenated; seg = the example of each row
    lens = hi - lo
    seg = np.repeat(np.arange(R), lens)
    rows = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(lo, lens)
    sess = _session_gaps(uid, ts, sid, len(sids), duration_us(cfg.session_gap) / 1e6)[rows]
    src = order[rows]  # positions in the input
    ev = _event_codes(get("event"))[src]
    item, items = _codes(get("item_id"))
    item = item[src]
    cat = _codes(get("category"))[0][src]
    price = _prices(get("price"))[src]
    t, age = ts[rows], x_cut[seg] - ts[rows]
    if cfg.tz == "UTC":
        hour, dow = (t // HOUR_US) % 24, (t // DAY_US + 3) % 7 + 1
    else:
        loc = pd.DatetimeIndex(t.astype("datetime64[us]")).tz_localize("UTC").tz_convert(cfg.tz)
        hour, dow = np.asarray(loc.hour), np.asarray(loc.day_of_week) + 1
    real = ev >= 0
    nan = np.full(R, np.nan)

    def by_code(mask=None) -> np.ndarray:  # (R, N_CODES) counts: NULL, each event type, other
        k = seg * _N_CODES + ev + 1
        counts = np.bincount(k if mask is None else k[mask], minlength=R * _N_CODES)
        return counts.reshape(R, _N_CODES).astype(np.float64)

    def ratio(a, b):
        return np.where(b != 0, a / np.where(b != 0, b, 1), np.nan)

    def hours_since(mask) -> np.ndarray:
        last = _segment_max(seg[mask], t[mask], R)
        return np.where(np.bincount(seg[mask], minlength=R) > 0, (x_cut - last) / HOUR_US, np.nan)

    out: dict[str, np.ndarray] = {}
    for w in cfg.windows:
        cnt = by_code(age <= duration_us(w))  # ts >= cutoff - w
        out[f"n_events_{w}"] = cnt[:, 1:].sum(axis=1)
        out.update({f"n_{name}_{w}": cnt[:, i + 1] for i, name in enumerate(EVENT_TYPES)})
    cnt = by_code()
    n_ev = cnt[:, 1:].sum(axis=1)
    out["n_events_all"] = n_ev
    out.update({f"n_{name}_all": cnt[:, i + 1] for i, name in enumerate(EVENT_TYPES)})
    out["hours_since_last_event"] = hours_since(real)
    out.update({f"hours_since_last_{name}": hours_since(ev == i) for i, name in enumerate(EVENT_TYPES)})
    first = -_segment_max(seg[real], -t[real], R)
    out["days_since_first_event"] = np.where(n_ev > 0, (x_cut - first) / DAY_US, np.nan)
    out["n_items"] = _n_distinct(seg, item, R)
    out["n_categories"] = _n_distinct(seg, cat, R)
    width = len(items) + 1
    pair = lambda m: _unique(seg[m] * width + item[m])  # noqa: E731
    carted, bought = pair((ev == _CODES["cart"]) & (item >= 0)), pair((ev == _CODES["purchase"]) & (item >= 0))
    if len(bought):
        carted = carted[bought[np.minimum(np.searchsorted(bought, carted), len(bought) - 1)] != carted]
    out["n_items_carted_not_bought"] = np.bincount(carted // width, minlength=R).astype(np.float64)
    n_view, n_cart, n_buy = (cnt[:, _CODES[k] + 1] for k in ("view", "cart", "purchase"))
    out["view_to_cart"] = ratio(n_cart, n_view)
    out["cart_to_purchase"] = ratio(n_buy, n_cart)
    has_p = ~np.isnan(price)
    p0 = np.where(has_p, price, 0.0)
    psum = lambda m, w=p0: np.bincount(seg[m], weights=w[m], minlength=R)  # noqa: E731
    buys = has_p & (ev == _CODES["purchase"])
    out["spend"] = np.where(n_buy == 0, 0.0, np.where(psum(buys, has_p.astype(float)) > 0, psum(buys), np.nan))
    pn, ps, psq = psum(has_p, has_p.astype(float)), psum(has_p), psum(has_p, p0 * p0)
    out["price_mean"] = ratio(ps, pn)
    pmax = np.full(R, -np.inf)
    np.maximum.at(pmax, seg[has_p], price[has_p])
    out["price_max"] = np.where(pn > 0, pmax, np.nan)
    std = np.sqrt(np.maximum(psq - ratio(ps * ps, pn), 0.0) / np.where(pn > 1, pn - 1, 1))
    out["price_std"] = np.where(pn > 1, std, np.nan)
    carts = has_p & (ev == _CODES["cart"])
    out["cart_price_mean"] = ratio(psum(carts), psum(carts, has_p.astype(float)))
    n_sess = np.bincount(seg[real & np.isnan(sess)], minlength=R).astype(np.float64)
    out["n_sessions"] = n_sess
    out["events_per_session"] = ratio(n_ev, n_sess)
    out["minutes_per_session"] = ratio(np.bincount(seg, weights=np.nan_to_num(sess), minlength=R) / 60, n_sess)
    for name, (h0, h1) in DAYPARTS.items():
        out[f"share_{name}"] = ratio(np.bincount(seg[(hour >= h0) & (hour < h1)], minlength=R).astype(float), n_ev)
    for i, d in enumerate(WEEKDAYS):
        out[f"share_{d}"] = ratio(np.bincount(seg[dow == i + 1], minlength=R).astype(float), n_ev)
    if session:
        x_start = np.asarray(examples["session_start"], dtype="datetime64[us]").astype(np.int64)
        has_start = np.asarray(pd.notna(examples["session_start"]))
        ins = has_start[seg] & (t >= x_start[seg])
        scnt = by_code(ins)
        out.update({f"ses_n_{name}": scnt[:, _CODES[name] + 1] for name in SESSION_TYPES})
        out["ses_n_events"] = scnt[:, 1:].sum(axis=1)
        last = _segment_max(seg[ins & real], t[ins & real], R)
        out["ses_minutes"] = np.where(out["ses_n_events"] > 0, (last - x_start) / 6e7, np.nan)
        out["ses_n_items"] = _n_distinct(seg[ins], item[ins], R)
        carted_in = ins & (ev == _CODES["cart"])
        out["ses_n_items_carted"] = _n_distinct(seg[carted_in], item[carted_in], R)
    # examples without history: counts 0, everything else NULL (as the SQL's LEFT JOIN)
    empty = lens == 0
    for n in names:
        if not n.startswith(("n_", "ses_n_")):
            out[n] = np.where(empty, nan, out[n])
    X = np.empty((R, len(names)))
    for j, n in enumerate(names):
        X[:, j] = out[n]
    df = pd.DataFrame(X, index=pd.Index(x_ids, name="example_id"), columns=_column_index(tuple(names)))
    return df if R < 2 or (np.diff(x_ids) > 0).all() else df.sort_index()


@lru_cache(maxsize=16)
def _column_index(names: tuple[str, ...]) -> pd.Index:
    return pd.Index(names)  # immutable: one per feature list, shared by every result


def _concat_ids(event_ids, example_ids) -> object:
    """The events' user ids followed by the examples' (to code both alike)."""
    if _is_arrow(event_ids):
        chunks = event_ids.chunks if isinstance(event_ids, pa.ChunkedArray) else [event_ids]
        return pa.chunked_array([*chunks, pa.array(list(example_ids), event_ids.type)], event_ids.type)
    ev = event_ids.tolist() if hasattr(event_ids, "tolist") else list(event_ids)
    return ev + list(example_ids)
