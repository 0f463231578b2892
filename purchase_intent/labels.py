"""Examples and labels: cutoffs and the user and session tasks (the time split is in ``splits``).

An example is ``(example_id, user_id, cutoff, label, label_end, period[, session_id, session_start])``.
Whatever predicts it may read only that user's events with ``ts < cutoff``; the label is decided by
events in ``[cutoff, label_end)``.

* user task: at each cutoff, every user with an event in ``[cutoff - lookback, cutoff)`` is an
  example; ``label`` = at least one purchase in ``[cutoff, cutoff + horizon)``.
* session task: every session is an example; ``label`` = the session contains a purchase. The
  model sees the session's events before its first purchase (all of them if none) and, with
  ``prefix = K``, at most its first K events; the cutoff is 1us after the last event it sees.
  (Not the purchase time itself: a cutoff at the purchase for buyers and at the end for the
  others would tell the label through "time since the last event".)

The split by time into train / valid / test (and the backtest folds) is in :mod:`purchase_intent.splits`.

All timestamps are UTC, tz-naive. Day-based steps put cutoffs (and period edges) at midnight of
``LabelConfig.tz``; the arithmetic is on local calendar dates, so DST changes are handled.
"""
from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from .config import LabelConfig
from .times import EPOCH, duration_us, is_day_based, parse_duration

DEFAULT_SESSION_GAP = "30min"


def end_tolerance(horizon: timedelta) -> timedelta:
    """How far a window may reach past the end (or start) of the log: min(1% of its length, 1h).

    Logs usually stop a few seconds before a day boundary (Taobao's last event is 23:59:59 local),
    so without a tolerance the last full day would never get a cutoff.
    """
    return min(horizon / 100, timedelta(hours=1))


# --------------------------------------------------------------------------- time grids


def _local_midnight_utc(d: date, tz: ZoneInfo) -> datetime:
    """UTC (naive) instant of local midnight of calendar date ``d``."""
    local = datetime(d.year, d.month, d.day, tzinfo=tz)
    return local.astimezone(timezone.utc).replace(tzinfo=None)


def _local_date(t: datetime, tz: ZoneInfo) -> date:
    return t.replace(tzinfo=timezone.utc).astimezone(tz).date()


def _grid_floor(t: datetime, step: timedelta, tz: ZoneInfo, origin: date | None = None) -> datetime:
    """Latest grid point <= t. Day-based grids are local midnights every step days from ``origin``
    (default: all local midnights for a 1-day step, else the origin date must be given); other
    grids are multiples of ``step`` since the Unix epoch (UTC)."""
    if is_day_based(step):
        days = step.days
        d = _local_date(t, tz)
        if origin is not None:
            d = origin + timedelta(days=((d - origin).days // days) * days)
        while _local_midnight_utc(d, tz) > t:  # local midnight of t's date can only be <= t; guard DST oddities
            d -= timedelta(days=days)
        return _local_midnight_utc(d, tz)
    return EPOCH + ((t - EPOCH) // step) * step


def _grid_add(t: datetime, n: int, step: timedelta, tz: ZoneInfo) -> datetime:
    """Grid point ``n`` steps after grid point ``t`` (local calendar arithmetic for day steps)."""
    if is_day_based(step):
        return _local_midnight_utc(_local_date(t, tz) + timedelta(days=n * step.days), tz)
    return t + n * step


def data_range(con: duckdb.DuckDBPyConnection, events: str = "events") -> tuple[datetime, datetime]:
    """(min(ts), max(ts)) of an events relation; raises ValueError when it is empty."""
    lo, hi = con.execute(f"SELECT min(ts), max(ts) FROM {events}").fetchall()[0]
    if lo is None:
        raise ValueError(f"relation {events!r} has no events")
    return lo, hi


def make_cutoffs(con: duckdb.DuckDBPyConnection, cfg: LabelConfig, events: str = "events") -> list[datetime]:
    """Cutoffs of the user task, oldest first (UTC, tz-naive).

    The grid is anchored at the end of the data, so the most recent data are used: the last cutoff
    is the latest grid point with ``cutoff + horizon <= max(ts) + end_tolerance(horizon)``, and
    cutoffs go back by ``step`` while ``cutoff >= min(ts) + lookback - end_tolerance(lookback)``
    (a full lookback window, up to the same small tolerance at the start of the log).
    Day-based steps put every cutoff at local midnight of ``cfg.tz``; shorter steps use multiples
    of ``step`` since the Unix epoch.

    Returns
    -------
    list of datetime, possibly empty when the data span less than lookback + horizon.
    """
    return cutoffs_between(*data_range(con, events), cfg)


def cutoffs_between(lo: datetime, hi: datetime, cfg: LabelConfig) -> list[datetime]:
    """``make_cutoffs`` for data from ``lo`` to ``hi`` (min and max ts), whichever engine found them."""
    lookback, horizon, step = (parse_duration(x) for x in (cfg.lookback, cfg.horizon, cfg.step))
    tz = ZoneInfo(cfg.tz or "UTC")
    first_ok = lo + lookback - end_tolerance(lookback)  # logs also start a few seconds after midnight
    last = _grid_floor(hi + end_tolerance(horizon) - horizon, timedelta(days=1) if is_day_based(step) else step, tz)
    cutoffs = []
    n = 0
    while (c := _grid_add(last, -n, step, tz)) >= first_ok:
        cutoffs.append(c)
        n += 1
    return cutoffs[::-1]


def _split_fits(cutoffs: list[datetime], horizon: timedelta, n_test: int, n_valid: int) -> bool:
    """Whether cutoffs (one period each) hold the test, valid and train splits under the gap rule of
    ``splits.split_examples``: valid periods' label windows close by the first test cutoff, and a train
    period's by the first valid one (a train cutoff whose window reaches past it is dropped into the gap)."""
    if n_test < 1 or len(cutoffs) < n_test + n_valid + 1:
        return False
    first_test = cutoffs[-n_test]
    valid = [c for c in cutoffs[:-n_test] if c + horizon <= first_test][-n_valid:] if n_valid else []
    return len(valid) == n_valid and any(c + horizon <= (valid[0] if valid else first_test) for c in cutoffs)


def _smaller_steps(step: timedelta) -> list[timedelta]:
    """Candidate steps below ``step``, largest first: whole days, then 12h, 6h, 3h, 1h."""
    days = [timedelta(days=d) for d in range(int(step / timedelta(days=1)) - (is_day_based(step)), 0, -1)]
    hours = [timedelta(hours=h) for h in (12, 6, 3, 1)]
    return [s for s in days + hours if s < step]


def _duration_text(d: timedelta) -> str:
    return f"{d.days}d" if is_day_based(d) else f"{int(d // timedelta(hours=1))}h"


def suggest_step(con: duckdb.DuckDBPyConnection, cfg: LabelConfig, events: str = "events") -> str | None:
    """The largest step below ``cfg.step`` whose periods hold the test, valid and train splits of
    ``cfg`` on this data (e.g. ``"2d"``), or None when none does (the data are too short for the
    lookback and horizon). User task: the cutoffs ``make_cutoffs`` would give; session task: the periods
    of the data's time range."""
    step = parse_duration(cfg.step)
    horizon = parse_duration(cfg.horizon)
    lo, hi = data_range(con, events)
    tz = ZoneInfo(cfg.tz or "UTC")
    for cand in _smaller_steps(step):
        text = _duration_text(cand)
        if cfg.task == "session":
            n = len(period_edges(lo, hi, cand, tz))
            if n >= int(cfg.test_cutoffs) + int(cfg.valid_cutoffs) + 1:
                return text
        elif _split_fits(make_cutoffs(con, LabelConfig(**{**cfg.__dict__, "step": text}), events), horizon,
                         int(cfg.test_cutoffs), int(cfg.valid_cutoffs)):
            return text
    return None


def period_edges(start: datetime, end: datetime, step: timedelta, tz: ZoneInfo) -> list[datetime]:
    """Left edges of ``step``-wide periods covering [start, end]: local midnights for day steps
    (the first one at or before ``start``), else epoch-aligned multiples of ``step``."""
    first = _grid_floor(start, timedelta(days=1) if is_day_based(step) else step, tz)
    edges = [first]
    while (nxt := _grid_add(edges[-1], 1, step, tz)) <= end:
        edges.append(nxt)
    return edges


# --------------------------------------------------------------------------- sessions (SQL)


def sessionized_sql(events: str = "events", gap: str | timedelta = DEFAULT_SESSION_GAP, use_ids: bool = True) -> str:
    """SQL: every event of ``events`` plus ``sess_key`` and ``sess_prev_s``.

    ``sess_key`` is the data's ``session_id`` (when ``use_ids`` and the event has one), else
    ``'gap@<start time>'`` of an inactivity session: a new one starts when the previous event of the
    user is more than ``gap`` earlier. ``sess_prev_s`` is the seconds since the previous event of the
    same session (NULL for the first event of a session). Both only read the user's earlier events,
    so they are safe to use before any cutoff. Works on a whole log or one user's events.
    """
    gap_us = duration_us(gap)
    sid = "session_id" if use_ids else "NULL::VARCHAR"
    return f"""
    WITH g1 AS (
        SELECT *, (lag(ts) OVER (PARTITION BY user_id ORDER BY ts) IS NULL
                   OR epoch_us(ts) - epoch_us(lag(ts) OVER (PARTITION BY user_id ORDER BY ts)) > {gap_us}) AS _new
        FROM {events}
    ), g2 AS (
        SELECT *, max(CASE WHEN _new THEN ts END) OVER (
                PARTITION BY user_id ORDER BY ts RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS _gap_start
        FROM g1
    ), g3 AS (
        SELECT * EXCLUDE (_new, _gap_start),
               coalesce({sid}, 'gap@' || strftime(_gap_start, '%Y-%m-%dT%H:%M:%S.%f')) AS sess_key
        FROM g2
    )
    SELECT *, (epoch_us(ts) - epoch_us(lag(ts) OVER (PARTITION BY user_id, sess_key ORDER BY ts))) / 1e6 AS sess_prev_s
    FROM g3"""


def sessions_sql(events: str, cfg: LabelConfig, use_ids: bool = True) -> str:
    """SQL of one row per session of ``events``: user_id, session_id, session_start, session_end,
    n_events, first_purchase (NULL if none) and last_visible, the last event the model may see:
    the last one before the first purchase and, with ``cfg.prefix = K``, before the (K+1)-th event
    (NULL when there is none). Sessions are the data's session ids when ``use_ids`` and
    ``cfg.session_gap`` is None, else inactivity gaps of ``cfg.session_gap`` (default 30min).
    """
    gap = cfg.session_gap or DEFAULT_SESSION_GAP
    ids = use_ids and cfg.session_gap is None
    k = f"min(CASE WHEN _rn = {int(cfg.prefix) + 1} THEN ts END) OVER s" if cfg.prefix else "NULL::TIMESTAMP"
    return f"""
    SELECT user_id, sess_key AS session_id, min(ts) AS session_start, max(ts) AS session_end,
           count(*) AS n_events, min(ts) FILTER (WHERE event = 'purchase') AS first_purchase,
           max(ts) FILTER (WHERE _stop IS NULL OR ts < _stop) AS last_visible
    FROM (SELECT *, least(min(CASE WHEN event = 'purchase' THEN ts END) OVER s, {k}) AS _stop
          FROM (SELECT *, row_number() OVER (PARTITION BY user_id, sess_key ORDER BY ts) AS _rn
                FROM ({sessionized_sql(events, gap, ids)}))
          WINDOW s AS (PARTITION BY user_id, sess_key))
    GROUP BY user_id, sess_key"""


# --------------------------------------------------------------------------- examples


def build_examples(con: duckdb.DuckDBPyConnection, cfg: LabelConfig, events: str = "events") -> pa.Table:
    """Examples of ``cfg.task`` over the ``events`` relation.

    Returns
    -------
    pyarrow.Table with example_id BIGINT, user_id VARCHAR, cutoff TIMESTAMP, label INTEGER,
    label_end TIMESTAMP, period INTEGER, session_id VARCHAR, session_start TIMESTAMP, ordered by
    (cutoff, user_id, session_id). Schema metadata ``purchase_intent.counts`` holds a JSON dict of
    counts, including every dropped example by reason (see ``example_counts``).
    """
    if cfg.task == "user":
        table, counts = _user_examples(con, cfg, events)
    elif cfg.task == "session":
        table, counts = _session_examples(con, cfg, events)
    else:
        raise ValueError(f"unknown task {cfg.task!r}: use 'user' or 'session'")
    meta = {b"purchase_intent.counts": json.dumps(counts).encode()}
    return table.replace_schema_metadata(meta)


def example_counts(examples: pa.Table) -> dict:
    """The counts dict that ``build_examples`` stored in the table's schema metadata."""
    meta = examples.schema.metadata or {}
    return json.loads(meta.get(b"purchase_intent.counts", b"{}"))


_OUT = """SELECT (row_number() OVER (ORDER BY cutoff, user_id, session_id) - 1)::BIGINT AS example_id,
       user_id::VARCHAR AS user_id, cutoff::TIMESTAMP AS cutoff, label::INTEGER AS label,
       label_end::TIMESTAMP AS label_end, period::INTEGER AS period,
       session_id::VARCHAR AS session_id, session_start::TIMESTAMP AS session_start
FROM {src} ORDER BY example_id"""


def _cutoff_table(con: duckdb.DuckDBPyConnection, name: str, times: list[datetime]) -> None:
    df = pd.DataFrame({"period": np.arange(len(times), dtype=np.int32),
                       "t": pd.Series(pd.to_datetime(times), dtype="datetime64[us]")})
    con.register(name + "_df", df)
    con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT * FROM {name}_df")
    con.unregister(name + "_df")


def _user_examples(con, cfg: LabelConfig, events: str) -> tuple[pa.Table, dict]:
    cutoffs = make_cutoffs(con, cfg, events)
    if not cutoffs:
        lo, hi = data_range(con, events)
        span = hi - lo
        raise ValueError(f"data from {lo} to {hi} ({span.days}d {span.seconds // 3600}h) are too short for "
                         f"lookback {cfg.lookback} + horizon {cfg.horizon}: no cutoff fits; use more data or a "
                         f"shorter --lookback / --horizon")
    _cutoff_table(con, "_pi_cutoffs", cutoffs)
    table = con.sql(user_examples_sql(cfg, events, "_pi_cutoffs")).to_arrow_table()
    n_users = con.execute(f"SELECT count(DISTINCT user_id) FROM {events}").fetchall()[0][0]
    n_never = n_users - pa.compute.count_distinct(table["user_id"]).as_py()
    con.execute("DROP TABLE IF EXISTS _pi_cutoffs")
    counts = {"task": "user", "cutoffs": len(cutoffs), "examples": table.num_rows,
              "positives": int(pa.compute.sum(table["label"]).as_py() or 0), "users": n_users,
              "dropped": {"users never active in a lookback window": n_never}}
    return table, counts


def user_examples_sql(cfg: LabelConfig, events: str = "events", cutoffs: str = "_pi_cutoffs") -> str:
    """SQL of the user task's examples (the ``_OUT`` columns) from ``events`` and the relation ``cutoffs``
    ``(period INTEGER, t TIMESTAMP)`` of ``make_cutoffs``. Both engines run it (Spark: ``spark_sql``)."""
    lookback, horizon = parse_duration(cfg.lookback), parse_duration(cfg.horizon)
    # An event at ts makes its user active at cutoffs c in (ts, ts + lookback]; a purchase makes the
    # label 1 at cutoffs c in (ts - horizon, ts]. ASOF joins find those period ranges per event, so
    # nothing is materialised per (event, cutoff) pair.
    return f"""
    WITH ev AS (SELECT user_id, ts, event FROM {events}),
    act AS (
        SELECT DISTINCT e.user_id, coalesce(a.period + 1, 0) AS lo, b.period AS hi
        FROM ev e
        ASOF LEFT JOIN {cutoffs} a ON e.ts >= a.t
        ASOF LEFT JOIN {cutoffs} b ON e.ts + INTERVAL '{duration_us(lookback)} microseconds' >= b.t
    ),
    active AS (
        SELECT DISTINCT user_id, unnest(range(lo, hi + 1)) AS period FROM act WHERE hi >= lo
    ),
    buy AS (
        SELECT DISTINCT e.user_id, coalesce(a.period + 1, 0) AS lo, b.period AS hi
        FROM (SELECT * FROM ev WHERE event = 'purchase') e
        ASOF LEFT JOIN {cutoffs} a ON e.ts - INTERVAL '{duration_us(horizon)} microseconds' >= a.t
        ASOF LEFT JOIN {cutoffs} b ON e.ts >= b.t
    ),
    bought AS (
        SELECT DISTINCT user_id, unnest(range(lo, hi + 1)) AS period FROM buy WHERE hi >= lo
    ),
    ex AS (
        SELECT a.user_id, c.t AS cutoff, (b.user_id IS NOT NULL)::INTEGER AS label,
               c.t + INTERVAL '{duration_us(horizon)} microseconds' AS label_end, a.period,
               NULL::VARCHAR AS session_id, NULL::TIMESTAMP AS session_start
        FROM active a JOIN {cutoffs} c USING (period)
        LEFT JOIN bought b ON a.user_id = b.user_id AND a.period = b.period
    )
    {_OUT.format(src="ex")}"""


def _session_examples(con, cfg: LabelConfig, events: str) -> tuple[pa.Table, dict]:
    step = parse_duration(cfg.step)
    tz = ZoneInfo(cfg.tz or "UTC")
    has_ids = con.execute(f"SELECT count(session_id) > 0 FROM {events}").fetchall()[0][0]
    use_ids = bool(has_ids) and cfg.session_gap is None
    con.execute(f"CREATE OR REPLACE TEMP TABLE _pi_sessions AS {sessions_sql(events, cfg, use_ids)}")
    lo, hi = data_range(con, events)
    gap_us = duration_us(cfg.session_gap or DEFAULT_SESSION_GAP)
    _cutoff_table(con, "_pi_periods", period_edges(lo, hi, step, tz))
    con.execute(f"CREATE OR REPLACE TEMP TABLE _pi_sess_ex AS {session_candidates_sql('_pi_sessions', hi, gap_us)}")
    # sessions whose first event is at or after the cutoff (e.g. a purchase first) have nothing to
    # predict from; sessions that end within one gap of the last event may still be going on.
    n_total, n_empty, n_open = con.execute("""
        SELECT count(*), count(*) FILTER (WHERE cutoff IS NULL),
               count(*) FILTER (WHERE cutoff IS NOT NULL AND open_at_end) FROM _pi_sess_ex""").fetchall()[0]
    table = con.sql(session_examples_sql("_pi_sess_ex", "_pi_periods")).to_arrow_table()
    con.execute("DROP TABLE IF EXISTS _pi_sessions; DROP TABLE IF EXISTS _pi_sess_ex; DROP TABLE IF EXISTS _pi_periods")
    counts = {"task": "session", "sessions": n_total, "session_ids": "data" if use_ids else "gap",
              "examples": table.num_rows, "positives": int(pa.compute.sum(table["label"]).as_py() or 0),
              "dropped": {"no event before the cutoff": n_empty,
                          "may continue after the end of the data": n_open}}
    return table, counts


def session_candidates_sql(sessions: str, hi: datetime, gap_us: int) -> str:
    """SQL: the sessions of ``sessions`` (``sessions_sql``) with cutoff, label, label_end and ``open_at_end``
    (the session ends within one gap of ``hi``, the last event of the data, so it may still be going on)."""
    return f"""
    SELECT s.*, last_visible + INTERVAL 1 microsecond AS cutoff,
           (first_purchase IS NOT NULL)::INTEGER AS label,
           session_end + INTERVAL 1 microsecond AS label_end,
           epoch_us(session_end) > epoch_us(TIMESTAMP '{hi}') - {gap_us} AS open_at_end
    FROM {sessions} s"""


def session_examples_sql(candidates: str, periods: str) -> str:
    """SQL of the session task's examples (the ``_OUT`` columns) from ``session_candidates_sql``'s rows and
    the relation ``periods (period, t)`` of ``period_edges``. Both engines run it (Spark: ``spark_sql``)."""
    return f"""
    WITH ex AS (
        SELECT s.user_id, s.cutoff, s.label, s.label_end, p.period, s.session_id, s.session_start
        FROM (SELECT * FROM {candidates} WHERE cutoff IS NOT NULL AND NOT open_at_end) s
        ASOF JOIN {periods} p ON s.session_start >= p.t
    )
    {_OUT.format(src="ex")}"""


def single_example(con: duckdb.DuckDBPyConnection, user_id: str, at: datetime, cfg: LabelConfig,
                   events: str = "events") -> pa.Table:
    """One example row for scoring ``user_id`` at time ``at`` (the serving path).

    User task: cutoff = ``at``. Session task: the session of the user's last event before ``at``
    (same session rules as ``build_examples``), with cutoff = ``at``. ``label`` is -1 (unknown).
    """
    session_id, session_start = None, None
    if cfg.task == "session":
        has_ids = con.execute(f"SELECT count(session_id) > 0 FROM {events}").fetchall()[0][0]
        sql = sessions_sql(f"(SELECT * FROM {events} WHERE user_id = $u AND ts < $at)", cfg, bool(has_ids))
        rows = con.execute(f"SELECT session_id, session_start FROM ({sql}) ORDER BY session_end DESC LIMIT 1",
                           {"u": user_id, "at": at}).fetchall()
        if rows:
            session_id, session_start = rows[0]
    return pa.table({
        "example_id": pa.array([0], pa.int64()), "user_id": pa.array([user_id], pa.string()),
        "cutoff": pa.array([at], pa.timestamp("us")), "label": pa.array([-1], pa.int32()),
        "label_end": pa.array([None], pa.timestamp("us")), "period": pa.array([0], pa.int32()),
        "session_id": pa.array([session_id], pa.string()),
        "session_start": pa.array([session_start], pa.timestamp("us")),
    })
