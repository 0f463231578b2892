"""Tabular features X: one SQL definition for a whole examples table and for one user at serving.

Every feature of an example is computed from ``hist``, the rows of its user that lie before its
cutoff, joined in one place:

    b.user_id = x.user_id AND b.bucket_end <= x.cutoff [AND b.bucket_end > x.cutoff - history]

where ``b`` holds the user's events aggregated per time bucket. Bucket edges are every cutoff,
cutoff - window, cutoff - history and session start of the examples table, so each bucket lies
entirely before or entirely at/after any cutoff, and every window is a union of whole buckets.
This keeps the join small (buckets, not events, per example) while staying exact. The per-event
columns computed first (session gaps) only read the same user's earlier events.
``tests/test_leakage.py`` perturbs events at or after each cutoff and checks that no feature moves;
``tests/test_features.py`` checks the values against a plain pandas implementation.

Time-relative features (windows, recency, days since first event) are measured back from the
cutoff. (Session cutoffs are 1us after the last event the model sees, so they carry no label.)

Missing values: counts are 0; recency, ratios with a zero denominator, shares of nothing and
price statistics without prices are NaN. Set DuckDB's ``threads`` and ``memory_limit`` on the
connection for large logs.

The same definitions are written a second time in numpy (``compute_features_frame``): the API
scores one request with it (no SQL to plan), and batch scoring at one cutoff reads the users'
events from DuckDB and reduces them with it (``compute_features_for_users``, no bucket joins).
``tests/test_features.py`` proves both forms equal on random logs and that later events are unread.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from functools import lru_cache

import duckdb
import numpy as np
import pandas as pd

from .config import FeatureConfig, parse_duration

EVENT_TYPES = ("view", "cart", "remove_from_cart", "wishlist", "purchase")
SESSION_TYPES = ("view", "cart", "remove_from_cart", "wishlist")
_HOUR_US = 3_600_000_000
_DAY_US = 24 * _HOUR_US
_DAYPARTS = {"night": (0, 6), "morning": (6, 12), "afternoon": (12, 18), "evening": (18, 24)}
_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# events with the same ts: those without a session id first (see ``features_sql``)
_TIE_ORDER = "ts, session_id IS NOT NULL"


@lru_cache(maxsize=256)
def _us(text: str) -> int:
    return parse_duration(text) // parse_duration("1us")


def feature_docs(cfg: FeatureConfig = FeatureConfig(), session: bool = False) -> dict[str, str]:
    """Name -> one-line doc of every column ``compute_features`` returns, in column order."""
    docs: dict[str, str] = {}
    for w in cfg.windows:
        docs[f"n_events_{w}"] = f"events in the last {w}"
        for t in EVENT_TYPES:
            docs[f"n_{t}_{w}"] = f"{t} events in the last {w}"
    docs["n_events_all"] = "events in the whole history"
    for t in EVENT_TYPES:
        docs[f"n_{t}_all"] = f"{t} events in the whole history (n_purchase_all: prior purchases)"
    docs["hours_since_last_event"] = "hours since the last event (NaN: none)"
    for t in EVENT_TYPES:
        docs[f"hours_since_last_{t}"] = f"hours since the last {t} event (NaN: none)"
    docs["days_since_first_event"] = "days since the first event in the history"
    docs["n_items"] = "distinct items interacted with"
    docs["n_categories"] = "distinct categories interacted with"
    docs["n_items_carted_not_bought"] = "distinct items carted and never purchased"
    docs["view_to_cart"] = "cart events per view event (NaN: no views)"
    docs["cart_to_purchase"] = "purchase events per cart event (NaN: no carts)"
    docs["spend"] = "sum of purchase prices (0: no purchases; NaN: purchases without prices)"
    docs["price_mean"] = "mean price of events with a price (NaN: no prices)"
    docs["price_max"] = "max price of events with a price (NaN: no prices)"
    docs["price_std"] = "standard deviation of event prices (NaN: fewer than 2 prices)"
    docs["cart_price_mean"] = "mean price of carted items (NaN: no priced carts)"
    docs["n_sessions"] = "sessions (data session ids, else inactivity gaps)"
    docs["events_per_session"] = "mean events per session"
    docs["minutes_per_session"] = "mean session duration in minutes (first to last event)"
    for name, (a, b) in _DAYPARTS.items():
        docs[f"share_{name}"] = f"share of events at local hours {a:02d}-{b:02d} (tz of the config)"
    for d in _WEEKDAYS:
        docs[f"share_{d}"] = f"share of events on {d} (local)"
    if session:
        for t in SESSION_TYPES:
            docs[f"ses_n_{t}"] = f"{t} events in the current session so far"
        docs["ses_n_events"] = "events in the current session so far"
        docs["ses_minutes"] = "minutes from the session start to its last event so far"
        docs["ses_n_items"] = "distinct items in the current session so far"
        docs["ses_n_items_carted"] = "distinct items carted in the current session so far"
    return docs


FEATURES: dict[str, str] = feature_docs(FeatureConfig(), session=True)  # default windows, both tasks


def _columns(con: duckdb.DuckDBPyConnection, relation: str) -> list[str]:
    return [r[0] for r in con.execute(f"DESCRIBE {relation}").fetchall()]


def features_sql(cfg: FeatureConfig, examples: str = "examples", events: str = "events",
                 session: bool = False, session_ids: bool = True) -> str:
    """The SQL of ``compute_features``: one row per example of ``examples`` (example_id first).

    ``session=True`` adds the in-session features; ``session_ids=False`` is a shortcut for logs
    without any session_id (one window sort less).
    """
    wins = {w: _us(w) for w in cfg.windows}
    hist_us = _us(cfg.history) if cfg.history else None
    lists = bool(hist_us)  # distinct sets within a bounded history need the sets themselves
    local = "ts" if cfg.tz == "UTC" else f"timezone('{cfg.tz}', ts AT TIME ZONE 'UTC')"
    iv = lambda us: f"INTERVAL '{us} microseconds'"  # noqa: E731
    # bucket edges: every cutoff, cutoff - window, cutoff - history and session start, so that each
    # window of each example is a union of whole buckets
    edges = ["SELECT cutoff AS t FROM x"] + [f"SELECT cutoff - {iv(u)} FROM x" for u in wins.values()]
    if hist_us:
        edges.append(f"SELECT cutoff - {iv(hist_us)} FROM x")
    if session:
        edges.append("SELECT session_start FROM x WHERE session_start IS NOT NULL")
    # seconds since the previous event of the same session (NULL: the event starts a session);
    # sessions are the data's session_id where the event has one, else inactivity gaps. Among
    # events with the same ts, those without a session id come first: then which of them gets
    # the gap to the previous ts (and which gets 0) never changes a sum or count, so features
    # do not depend on how rows happen to be stored (a whole log and one request agree)
    d_user = "(epoch_us(ts) - epoch_us(lag(ts) OVER wu)) / 1e6"
    by_gap = f"CASE WHEN {d_user} <= {_us(cfg.session_gap) / 1e6} THEN {d_user} END"
    sess_prev = (f"CASE WHEN session_id IS NULL THEN {by_gap} "
                 f"ELSE (epoch_us(ts) - epoch_us(lag(ts) OVER ws)) / 1e6 END" if session_ids else by_gap)

    per_bucket = ["count(event)::DOUBLE AS n_events", "max(ts) FILTER (WHERE event IS NOT NULL) AS last_ts",
                  "min(ts) FILTER (WHERE event IS NOT NULL) AS first_ts"]
    for t in EVENT_TYPES:
        per_bucket += [f"count(*) FILTER (WHERE event = '{t}')::DOUBLE AS n_{t}",
                       f"max(ts) FILTER (WHERE event = '{t}') AS last_{t}"]
    per_bucket += [
        "sum(price) FILTER (WHERE event = 'purchase') AS spend_sum",
        "count(price) FILTER (WHERE event = 'purchase') AS spend_n",
        "count(price) AS price_n", "sum(price) AS price_sum", "sum(price * price) AS price_sq",
        "max(price) AS price_max", "sum(price) FILTER (WHERE event = 'cart') AS cart_sum",
        "count(price) FILTER (WHERE event = 'cart') AS cart_n",
        "count(*) FILTER (WHERE event IS NOT NULL AND sess_prev_s IS NULL) AS n_sess",
        "sum(sess_prev_s) AS sess_s",
    ]
    per_bucket += [f"count(*) FILTER (WHERE hour BETWEEN {a} AND {b - 1}) AS h_{n}" for n, (a, b) in _DAYPARTS.items()]
    per_bucket += [f"count(*) FILTER (WHERE dow = {i + 1}) AS d_{d}" for i, d in enumerate(_WEEKDAYS)]
    if lists or session:
        per_bucket += ["list(DISTINCT item_id) FILTER (WHERE item_id IS NOT NULL) AS items",
                       "list(DISTINCT item_id) FILTER (WHERE item_id IS NOT NULL AND event = 'cart') AS carted"]
    if lists:
        per_bucket += ["list(DISTINCT category) FILTER (WHERE category IS NOT NULL) AS categories",
                       "list(DISTINCT item_id) FILTER (WHERE item_id IS NOT NULL AND event = 'purchase') AS bought"]

    ndist = lambda col, cond="": f"length(list_distinct(flatten(list({col}){cond})))"  # noqa: E731
    age = lambda col: f"(epoch_us(any_value(cutoff)) - epoch_us({col}))"  # noqa: E731
    out = {}
    for w, u in wins.items():
        within = f" FILTER (WHERE end_age < {u})"
        out[f"n_events_{w}"] = f"sum(n_events){within}"
        out.update({f"n_{t}_{w}": f"sum(n_{t}){within}" for t in EVENT_TYPES})
    out["n_events_all"] = "sum(n_events)"
    out.update({f"n_{t}_all": f"sum(n_{t})" for t in EVENT_TYPES})
    out["hours_since_last_event"] = f"{age('max(last_ts)')} / {_HOUR_US}"
    out.update({f"hours_since_last_{t}": f"{age(f'max(last_{t})')} / {_HOUR_US}" for t in EVENT_TYPES})
    out["days_since_first_event"] = f"{age('min(first_ts)')} / {_DAY_US}"
    if lists:
        out["n_items"], out["n_categories"] = ndist("items"), ndist("categories")
        # |carted - bought| = |carted + bought| - |bought|
        out["n_items_carted_not_bought"] = (f"length(list_distinct(list_concat(flatten(list(carted)), "
                                            f"flatten(list(bought))))) - {ndist('bought')}")
    else:
        out["n_items"], out["n_categories"] = "sum(f_item)", "sum(f_category)"
        out["n_items_carted_not_bought"] = "sum(f_cart) - sum(f_both)"
    out["view_to_cart"] = "sum(n_cart) / nullif(sum(n_view), 0)"
    out["cart_to_purchase"] = "sum(n_purchase) / nullif(sum(n_cart), 0)"
    out["spend"] = ("CASE WHEN coalesce(sum(n_purchase), 0) = 0 THEN 0 "
                    "WHEN sum(spend_n) > 0 THEN sum(spend_sum) END")
    out["price_mean"] = "sum(price_sum) / nullif(sum(price_n), 0)"
    out["price_max"] = "max(price_max)"
    out["price_std"] = ("CASE WHEN sum(price_n) > 1 THEN sqrt(greatest(sum(price_sq) - sum(price_sum) * sum(price_sum)"
                        " / sum(price_n), 0) / (sum(price_n) - 1)) END")
    out["cart_price_mean"] = "sum(cart_sum) / nullif(sum(cart_n), 0)"
    out["n_sessions"] = "sum(n_sess)"
    out["events_per_session"] = "sum(n_events) / nullif(sum(n_sess), 0)"
    out["minutes_per_session"] = "coalesce(sum(sess_s), 0) / 60 / nullif(sum(n_sess), 0)"
    out.update({f"share_{n}": f"sum(h_{n}) / nullif(sum(n_events), 0)" for n in _DAYPARTS})
    out.update({f"share_{d}": f"sum(d_{d}) / nullif(sum(n_events), 0)" for d in _WEEKDAYS})
    if session:
        ins = " FILTER (WHERE in_session)"
        out.update({f"ses_n_{t}": f"sum(n_{t}){ins}" for t in SESSION_TYPES})
        out["ses_n_events"] = f"sum(n_events){ins}"
        out["ses_minutes"] = f"(epoch_us(max(last_ts){ins}) - epoch_us(any_value(session_start))) / 6e7"
        out["ses_n_items"], out["ses_n_items_carted"] = ndist("items", ins), ndist("carted", ins)
    names = list(feature_docs(cfg, session))
    assert names == list(out), "feature_docs and features_sql disagree"
    counts = [n for n in names if n.startswith(("n_", "ses_n_"))]
    sel = [f"{'coalesce(' + q + ', 0)' if n in counts else q}::DOUBLE AS \"{n}\""
           for n, q in ((n, f'"{n}"') for n in names)]
    facts = "" if lists else """
    -- "facts" dated by the bucket of the event that made them true (an item first seen, first
    -- carted, carted and bought; a category first seen): bucket_end grows with ts, so the first
    -- event's bucket is min(bucket_end), and a fact counts at a cutoff iff that bucket ends by it
    ui AS (
        SELECT user_id, min(bucket_end) AS b_seen, min(bucket_end) FILTER (WHERE event = 'cart') AS b_cart,
               min(bucket_end) FILTER (WHERE event = 'purchase') AS b_buy
        FROM evb WHERE item_id IS NOT NULL GROUP BY user_id, item_id
    ),
    facts AS (
        SELECT user_id, bucket_end, count(*) FILTER (WHERE f = 'item')::DOUBLE AS f_item,
               count(*) FILTER (WHERE f = 'category')::DOUBLE AS f_category,
               count(*) FILTER (WHERE f = 'cart')::DOUBLE AS f_cart,
               count(*) FILTER (WHERE f = 'both')::DOUBLE AS f_both
        FROM (SELECT user_id, b_seen AS bucket_end, 'item' AS f FROM ui
              UNION ALL SELECT user_id, b_cart, 'cart' FROM ui WHERE b_cart IS NOT NULL
              UNION ALL SELECT user_id, greatest(b_cart, b_buy), 'both' FROM ui
                  WHERE b_cart IS NOT NULL AND b_buy IS NOT NULL
              UNION ALL SELECT user_id, min(bucket_end), 'category' FROM evb
                  WHERE category IS NOT NULL GROUP BY user_id, category)
        GROUP BY user_id, bucket_end
    ),"""
    hist_bound = f"AND b.bucket_end > x.cutoff - {iv(hist_us)}" if hist_us else ""
    return f"""
    WITH x AS (SELECT example_id, user_id, cutoff,
                      {"session_start" if session else "NULL::TIMESTAMP AS session_start"} FROM {examples}),
    edges AS (SELECT DISTINCT t FROM ({' UNION ALL '.join(edges)})),
    -- per-event columns; the windows end at the current row, so they only read earlier events
    -- (events at or after the last cutoff are in no history and are skipped)
    ev AS (
        SELECT user_id, ts, event, item_id, category, price, hour({local}) AS hour, isodow({local}) AS dow,
               {sess_prev} AS sess_prev_s
        FROM {events} WHERE user_id IN (SELECT DISTINCT user_id FROM x) AND ts < (SELECT max(cutoff) FROM x)
        WINDOW wu AS (PARTITION BY user_id ORDER BY {_TIE_ORDER}), ws AS (PARTITION BY user_id, session_id ORDER BY ts)
    ),
    -- "facts" dated by the event that made them true (an item first seen, first carted, carted and
    -- bought); a fact counts at a cutoff iff that event is before it, i.e. iff the fact was true
    -- each event goes to the bucket that ends at the first edge after it (later events: none)
    evb AS (SELECT ev.*, k.t AS bucket_end FROM ev ASOF JOIN edges k ON ev.ts < k.t),
    b0 AS (SELECT user_id, bucket_end, {', '.join(per_bucket)} FROM evb GROUP BY user_id, bucket_end),{facts}
    b AS ({"SELECT * FROM b0" if lists else "SELECT * EXCLUDE (f.user_id, f.bucket_end) FROM b0 LEFT JOIN facts f USING (user_id, bucket_end)"}),
    -- the one place where an example meets events: its user's buckets that end by its cutoff
    -- (every row of such a bucket has ts < bucket_end <= cutoff)
    hist AS (
        SELECT x.example_id, x.cutoff, x.session_start, b.*,
               epoch_us(x.cutoff) - epoch_us(b.bucket_end) AS end_age, b.bucket_end > x.session_start AS in_session
        FROM x JOIN b ON b.user_id = x.user_id AND b.bucket_end <= x.cutoff {hist_bound}
    ),
    a AS (SELECT example_id, {', '.join(f'{q} AS "{n}"' for n, q in out.items())} FROM hist GROUP BY example_id)
    SELECT x.example_id, {', '.join(sel)}
    FROM x LEFT JOIN a USING (example_id)
    ORDER BY x.example_id"""


def compute_features(con: duckdb.DuckDBPyConnection, examples: str = "examples",
                     cfg: FeatureConfig = FeatureConfig(), events: str = "events") -> pd.DataFrame:
    """Features of every example of the ``examples`` relation from the ``events`` relation.

    Parameters
    ----------
    con : connection holding both relations (a whole log, or one user's events for serving).
    examples : relation with example_id, user_id, cutoff[, session_start]; in-session features are
        added when some session_start is not NULL.
    cfg : FeatureConfig (windows, history, session_gap, tz).

    Returns
    -------
    pandas.DataFrame (n_examples, n_features) of float64, index ``example_id`` in ascending order,
    columns in the order of ``feature_docs(cfg, session)``.
    """
    cols = _columns(con, examples)
    session = "session_start" in cols and con.execute(
        f"SELECT count(session_start) > 0 FROM {examples}").fetchall()[0][0]
    ids = con.execute(f"SELECT count(session_id) > 0 FROM {events}").fetchall()[0][0]
    df = con.sql(features_sql(cfg, examples, events, session=bool(session), session_ids=bool(ids))).df()
    df = df.set_index("example_id")
    return df.astype("float64")


def compute_features_for_users(con: duckdb.DuckDBPyConnection, examples: pd.DataFrame,
                               cfg: FeatureConfig = FeatureConfig(), events: str = "events") -> pd.DataFrame:
    """``compute_features`` for examples with one cutoff per user (batch scoring), in numpy.

    Reads the examples' users' events with ``ts < max(cutoff)`` from ``con`` as Arrow and reduces
    them with ``compute_features_frame``, which bounds every example by its own cutoff. The same values as ``compute_features`` (tests prove
    it), several times faster at one cutoff, where the SQL's per-bucket join buys nothing. Each
    example expands its user's history, so use it for few examples per user; training examples
    (every user at every cutoff) go through ``compute_features``.

    Parameters
    ----------
    examples : DataFrame with example_id, user_id, cutoff (user task: no session_start).
    """
    import pyarrow as pa

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
_EPOCH, _ONE_US = datetime(1970, 1, 1), timedelta(microseconds=1)
_CODES = {t: i for i, t in enumerate(EVENT_TYPES)}  # other / unknown -> len(EVENT_TYPES), NULL -> -1
_N_CODES = len(EVENT_TYPES) + 2  # NULL, the event types, other: counted as code + 1


def _is_arrow(events) -> bool:
    return type(events).__module__.startswith("pyarrow")


def _codes(values) -> tuple[np.ndarray, list]:
    """(E,) int64 codes of equal values (NULL / NaN: -1) and the distinct values (code -> value).

    Codes only group equal values: no feature depends on their order."""
    if _is_arrow(values):
        import pyarrow.compute as pc

        import pyarrow as pa

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
        import pyarrow as pa

        return np.asarray(values.cast(pa.timestamp("us")).to_numpy(zero_copy_only=False), "datetime64[us]").astype(np.int64)
    if isinstance(values, list) and values and all(type(t) is datetime for t in values):  # 4x faster than numpy's parser
        return np.array([(t - _EPOCH) // _ONE_US for t in values], np.int64)
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
    hist_us = _us(cfg.history) if cfg.history else None
    x_lo = x_cut - hist_us if hist_us else np.full(R, np.iinfo(np.int64).min // 2)
    order, lo, hi = _sort_events(uid, ts, sid >= 0, x_uid, x_lo, x_cut)
    uid, ts, sid = uid[order], ts[order], sid[order]

    # the rows of every example's history, concatenated; seg = the example of each row
    lens = hi - lo
    seg = np.repeat(np.arange(R), lens)
    rows = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(lo, lens)
    sess = _session_gaps(uid, ts, sid, len(sids), _us(cfg.session_gap) / 1e6)[rows]
    src = order[rows]  # positions in the input
    ev = _event_codes(get("event"))[src]
    item, items = _codes(get("item_id"))
    item = item[src]
    cat = _codes(get("category"))[0][src]
    price = _prices(get("price"))[src]
    t, age = ts[rows], x_cut[seg] - ts[rows]
    if cfg.tz == "UTC":
        hour, dow = (t // _HOUR_US) % 24, (t // _DAY_US + 3) % 7 + 1
    else:
        loc = pd.DatetimeIndex(t.astype("datetime64[us]")).tz_localize("UTC").tz_convert(cfg.tz)
        hour, dow = np.asarray(loc.hour), np.asarray(loc.day_of_week) + 1
    real = ev >= 0
    nan = np.full(R, np.nan)

    def by_code(mask=None) -> np.ndarray:  # (R, N_CODES) counts: NULL, each event type, other
        k = seg * _N_CODES + ev + 1
        return np.bincount(k if mask is None else k[mask], minlength=R * _N_CODES).reshape(R, _N_CODES).astype(np.float64)

    def ratio(a, b):
        return np.where(b != 0, a / np.where(b != 0, b, 1), np.nan)

    def hours_since(mask) -> np.ndarray:
        last = _segment_max(seg[mask], t[mask], R)
        return np.where(np.bincount(seg[mask], minlength=R) > 0, (x_cut - last) / _HOUR_US, np.nan)

    out: dict[str, np.ndarray] = {}
    for w in cfg.windows:
        cnt = by_code(age <= _us(w))  # ts >= cutoff - w
        out[f"n_events_{w}"] = cnt[:, 1:].sum(axis=1)
        out.update({f"n_{name}_{w}": cnt[:, i + 1] for i, name in enumerate(EVENT_TYPES)})
    cnt = by_code()
    n_ev = cnt[:, 1:].sum(axis=1)
    out["n_events_all"] = n_ev
    out.update({f"n_{name}_all": cnt[:, i + 1] for i, name in enumerate(EVENT_TYPES)})
    out["hours_since_last_event"] = hours_since(real)
    out.update({f"hours_since_last_{name}": hours_since(ev == i) for i, name in enumerate(EVENT_TYPES)})
    first = -_segment_max(seg[real], -t[real], R)
    out["days_since_first_event"] = np.where(n_ev > 0, (x_cut - first) / _DAY_US, np.nan)
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
    for name, (h0, h1) in _DAYPARTS.items():
        out[f"share_{name}"] = ratio(np.bincount(seg[(hour >= h0) & (hour < h1)], minlength=R).astype(float), n_ev)
    for i, d in enumerate(_WEEKDAYS):
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
        import pyarrow as pa

        chunks = event_ids.chunks if isinstance(event_ids, pa.ChunkedArray) else [event_ids]
        return pa.chunked_array([*chunks, pa.array(list(example_ids), event_ids.type)], event_ids.type)
    ev = event_ids.tolist() if hasattr(event_ids, "tolist") else list(event_ids)
    return ev + list(example_ids)
