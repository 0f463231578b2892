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

The same definitions are written a second time in numpy, in ``feature_frame.py``
(``compute_features_frame``: one API request; ``compute_features_for_users``: batch scoring at one
cutoff). ``tests/test_features.py`` proves both forms equal on random logs and that later events
are unread. A change of a definition goes into both modules.
"""
from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd

from . import storage
from .config import FeatureConfig
from .times import DAY_US, HOUR_US, duration_us
from .vocabulary import EVENT_TYPES

SESSION_TYPES = ("view", "cart", "remove_from_cart", "wishlist", "checkout")  # counted within the current session
# local hours [a, b) of each part of the day, and the ISO weekdays (Monday = 1) of the activity shares
DAYPARTS = {"night": (0, 6), "morning": (6, 12), "afternoon": (12, 18), "evening": (18, 24)}
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# events with the same ts: those without a session id first (see ``features_sql``)
_TIE_ORDER = "ts, session_id IS NOT NULL"


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
    for name, (a, b) in DAYPARTS.items():
        docs[f"share_{name}"] = f"share of events at local hours {a:02d}-{b:02d} (tz of the config)"
    for d in WEEKDAYS:
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
                 session: bool = False, session_ids: bool = True, with_id: bool = True) -> str:
    """The SQL of ``compute_features``: one row per example of ``examples`` (example_id first).

    ``session=True`` adds the in-session features; ``session_ids=False`` is a shortcut for logs
    without any session_id (one window sort less); ``with_id=False`` leaves example_id out (rows
    are still in its order).
    """
    wins = {w: duration_us(w) for w in cfg.windows}
    hist_us = duration_us(cfg.history) if cfg.history else None
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
    by_gap = f"CASE WHEN {d_user} <= {duration_us(cfg.session_gap) / 1e6} THEN {d_user} END"
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
    per_bucket += [f"count(*) FILTER (WHERE hour BETWEEN {a} AND {b - 1}) AS h_{n}" for n, (a, b) in DAYPARTS.items()]
    per_bucket += [f"count(*) FILTER (WHERE dow = {i + 1}) AS d_{d}" for i, d in enumerate(WEEKDAYS)]
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
    out["hours_since_last_event"] = f"{age('max(last_ts)')} / {HOUR_US}"
    out.update({f"hours_since_last_{t}": f"{age(f'max(last_{t})')} / {HOUR_US}" for t in EVENT_TYPES})
    out["days_since_first_event"] = f"{age('min(first_ts)')} / {DAY_US}"
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
    out.update({f"share_{n}": f"sum(h_{n}) / nullif(sum(n_events), 0)" for n in DAYPARTS})
    out.update({f"share_{d}": f"sum(d_{d}) / nullif(sum(n_events), 0)" for d in WEEKDAYS})
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
    b AS ({"SELECT * FROM b0" if lists else
           "SELECT * EXCLUDE (f.user_id, f.bucket_end) FROM b0 LEFT JOIN facts f USING (user_id, bucket_end)"}),
    -- the one place where an example meets events: its user's buckets that end by its cutoff
    -- (every row of such a bucket has ts < bucket_end <= cutoff)
    hist AS (
        SELECT x.example_id, x.cutoff, x.session_start, b.*,
               epoch_us(x.cutoff) - epoch_us(b.bucket_end) AS end_age, b.bucket_end > x.session_start AS in_session
        FROM x JOIN b ON b.user_id = x.user_id AND b.bucket_end <= x.cutoff {hist_bound}
    ),
    a AS (SELECT example_id, {', '.join(f'{q} AS "{n}"' for n, q in out.items())} FROM hist GROUP BY example_id)
    SELECT {"x.example_id, " if with_id else ""}{', '.join(sel)}
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
    sql, _ = _planned_sql(con, examples, cfg, events)
    df = con.sql(sql).df()
    df = df.set_index("example_id")
    return df.astype("float64")


def _planned_sql(con: duckdb.DuckDBPyConnection, examples: str, cfg: FeatureConfig,
                 events: str, with_id: bool = True) -> tuple[str, list[str]]:
    """``features_sql`` for these relations (in-session features when some example has a session
    start; the shortcut for logs without session ids) and its feature names, in column order."""
    cols = _columns(con, examples)
    session = bool("session_start" in cols and con.execute(
        f"SELECT count(session_start) > 0 FROM {examples}").fetchall()[0][0])
    ids = con.execute(f"SELECT count(session_id) > 0 FROM {events}").fetchall()[0][0]
    return (features_sql(cfg, examples, events, session=session, session_ids=bool(ids), with_id=with_id),
            list(feature_docs(cfg, session)))


def copy_features(con: duckdb.DuckDBPyConnection, path: str | Path, examples: str = "examples",
                  cfg: FeatureConfig = FeatureConfig(), events: str = "events") -> list[str]:
    """``compute_features`` written straight to the Parquet file ``path`` by DuckDB (``COPY ... TO``).

    Nothing passes through Python: DuckDB streams the rows to the file within its ``memory_limit``
    (spilling the joins and sorts past it), so the size of the log bounds disk, not memory. Rows
    are in ascending ``example_id``; the columns are the features only (float64), without the id.
    Returns the feature names, in column order.
    """
    sql, names = _planned_sql(con, examples, cfg, events, with_id=False)
    storage.copy_to_parquet(con, sql, path, compression="zstd", row_group_size=122_880)  # runs.FEATURE_ROW_GROUP
    return names
