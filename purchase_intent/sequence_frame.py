"""The tokens of ``sequences.py`` in numpy: for the in-memory events of a few users (serving).

``build_sequences_frame`` gives, from in-memory events (a DataFrame or a mapping of columns),
exactly the arrays ``sequences.build_sequences`` gives in SQL: the API tokenises one request with
it (no SQL to plan). ``tests/test_sequences.py`` proves both forms equal on random logs. A change
of a token definition goes into both modules.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

import numpy as np
import pandas as pd

from .sequences import (
    SEQUENCE_FIELDS,
    SequenceConfig,
    SequenceVocab,
    checked_vocab,
    field_dtype,
    stable_bucket,
    time_edges,
)
from .times import DAY_US, EPOCH, HOUR_US, ONE_US
from .vocabulary import EVENT_CODES, OTHER_CODE, RAW_EVENT

_NAT = np.iinfo(np.int64).min


def _frame_col(events: Any, name: str) -> np.ndarray:
    """One events column of a frame or a mapping of lists: ``ts`` -> (E,) int64 epoch microseconds
    (NaT = int64 min), ``price`` -> float64 (NaN = NULL), others -> object with None for NULL."""
    v = events[name]
    if name == "ts":
        if isinstance(v, list) and v and all(type(x) is datetime for x in v):  # faster than numpy's parser
            return np.array([(x - EPOCH) // ONE_US for x in v], np.int64)
        return np.asarray(v, "datetime64[us]").astype(np.int64)
    if name == "price":
        try:
            return np.asarray(v, np.float64)  # None -> NaN
        except (TypeError, ValueError):
            return np.asarray(pd.to_numeric(pd.Series(v, dtype=object)), np.float64)
    out = np.array(list(v) if isinstance(v, list) else np.asarray(v, dtype=object), dtype=object)
    if len(out):
        out[np.asarray(pd.isna(out), bool)] = None  # NaN / NA from a frame are NULL, as in DuckDB
    return out


def _rank(values: np.ndarray) -> tuple[np.ndarray, list]:
    """(E,) int64 ascending sort rank of each value (strings by code point = DuckDB's byte order),
    NULL last (rank ``len(uniq)``), and the sorted distinct non-NULL values."""
    keys = values.tolist()
    uniq = sorted({k for k in keys if k is not None})
    at = {k: i for i, k in enumerate(uniq)}
    return np.array([at[k] if k is not None else len(uniq) for k in keys], np.int64), uniq


def _desc(rank: np.ndarray, k: int) -> np.ndarray:
    """Sort key of a descending order that keeps NULL (rank k) last, as DuckDB's NULLS LAST."""
    return np.where(rank == k, k, k - 1 - rank)


def build_sequences_frame(events: Any, examples: Any, cfg: Optional[SequenceConfig] = None,
                          vocab: Optional[SequenceVocab] = None) -> dict[str, np.ndarray]:
    """:func:`sequences.build_sequences` for in-memory events of a few users, in numpy (serving).

    The tokens are those of the SQL, written out: windows ordered by ``ts, event, item_id,
    category, price, raw_event`` (NULLS LAST, also when descending), ``dt_prev`` and ``item_state``
    over the whole visible history, the last ``max_seq_len`` events by recency rank. Rows that agree
    on all six sort keys are ordered by their position in ``events`` (the SQL leaves them unordered;
    only ``item_state`` can tell them apart). ``tests/test_sequences.py`` checks both agree.

    Parameters
    ----------
    events : DataFrame or mapping of columns (user_id, ts, event, item_id, category, price and,
        optionally, raw_event: where it is absent or NULL, the raw name is ``event``), any order;
        NaN / None are NULL.
    examples : DataFrame with ``example_id, user_id, cutoff``; only events with ``ts < cutoff``
        of the example's user are read.
    cfg, vocab : as :func:`sequences.build_sequences`.

    Returns
    -------
    dict
        As :func:`sequences.build_sequences`: ``SEQUENCE_FIELDS`` -> (N, T), ``"mask"`` -> (N, T) bool,
        ``"example_id"`` -> (N,) int64, rows in ``example_id`` order, right-aligned.
    """
    vocab, cfg = checked_vocab(cfg, vocab)
    x_ids = np.asarray(examples["example_id"], dtype=np.int64)
    x_order = np.argsort(x_ids, kind="stable")
    ids = x_ids[x_order]
    x_users = np.asarray(examples["user_id"], dtype=object)[x_order]
    x_cut = np.asarray(examples["cutoff"], dtype="datetime64[us]").astype(np.int64)[x_order]
    n, t = len(ids), int(cfg.max_seq_len)
    sizes = vocab.field_sizes()
    out = {f: np.zeros((n, t), dtype=field_dtype(sizes[f])) for f in SEQUENCE_FIELDS}
    out["mask"] = np.zeros((n, t), dtype=bool)
    out["example_id"] = ids

    uid = _frame_col(events, "user_id")
    ts = _frame_col(events, "ts")
    wanted = set(x_users.tolist())
    keep = np.flatnonzero(np.array([u is not None and u in wanted for u in uid.tolist()], bool) & (ts != _NAT))
    if not len(keep) or not n:
        return out
    uid, ts = uid[keep], ts[keep]
    ev, item, cat = (_frame_col(events, c)[keep] for c in ("event", "item_id", "category"))
    price = _frame_col(events, "price")[keep]
    # the raw name; where absent or NULL, the canonical one (the SQL's coalesce(raw_event, event))
    raw = _frame_col(events, RAW_EVENT)[keep] if RAW_EVENT in events else ev
    raw = np.array([r if r is not None else v for r, v in zip(raw.tolist(), ev.tolist())], dtype=object)
    e = len(keep)

    # ascending window order of the SQL (w_asc, w_item): user, ts, event, item_id, category, price
    u_r, _ = _rank(uid)
    ev_r, ev_u = _rank(ev)
    it_r, it_u = _rank(item)
    ca_r, ca_u = _rank(cat)
    rw_r, rw_u = _rank(raw)
    p_ok = ~np.isnan(price)
    p_u = np.unique(price[p_ok])
    p_r = np.where(p_ok, np.searchsorted(p_u, np.where(p_ok, price, 0.0)), len(p_u))
    asc = np.lexsort((np.arange(e), rw_r, p_r, ca_r, it_r, ev_r, ts, u_r))
    u_r, ts, ev, price = u_r[asc], ts[asc], ev[asc], price[asc]
    ev_r, it_r, ca_r, p_r, rw_r = ev_r[asc], it_r[asc], ca_r[asc], p_r[asc], rw_r[asc]
    pos = np.arange(e)
    # recency order (w_desc): every key descending, NULLs still last; exact ties: later row first
    desc = np.lexsort((-pos, _desc(rw_r, len(rw_u)), _desc(p_r, len(p_u)), _desc(ca_r, len(ca_u)),
                       _desc(it_r, len(it_u)),
                       _desc(ev_r, len(ev_u)), -ts, u_r))  # (E,) indices into the ascending arrays

    first = np.r_[True, u_r[1:] != u_r[:-1]]
    us_prev = np.r_[0.0, np.diff(ts).astype(np.float64)]
    us_prev[first] = np.nan  # lag() over the user's history: no earlier event

    # item_state: flags of the earlier events of the same (user, item), in ascending order
    g = np.lexsort((pos, it_r, u_r))
    g_start = np.r_[True, (u_r[g][1:] != u_r[g][:-1]) | (it_r[g][1:] != it_r[g][:-1])]
    start_of = np.maximum.accumulate(np.where(g_start, pos, 0))  # (E,) first row of each row's group
    state = 1 + (~g_start).astype(np.int64)
    for bit, name in ((2, "cart"), (4, "remove_from_cart"), (8, "purchase")):
        ind = (ev[g] == name).astype(np.int64)
        before = np.cumsum(ind) - ind  # such events earlier in the whole array
        state += bit * ((before - before[start_of]) > 0)
    item_state = np.zeros(e, dtype=np.int64)
    item_state[g] = np.where(it_r[g] != len(it_u), state, 0)

    event_tok = np.array([EVENT_CODES.get(v, OTHER_CODE) for v in ev.tolist()], dtype=np.int64)
    item_tok = np.array([stable_bucket(v, cfg.item_buckets) for v in it_u] + [0], np.int64)[it_r]
    cat_tok = np.array([stable_bucket(v, cfg.category_buckets) for v in ca_u] + [0], np.int64)[ca_r]
    raw_tok = np.array([stable_bucket(v, cfg.raw_event_buckets) for v in rw_u] + [0], np.int64)[rw_r]
    edges_p = np.asarray(vocab.price_edges, dtype=np.float64)
    price_tok = np.where(np.isfinite(price), 1 + np.searchsorted(edges_p, np.nan_to_num(price), side="right"), 0)
    hour = (ts // HOUR_US) % 24 + 1
    weekday = (ts // DAY_US + 3) % 7 + 1  # 1970-01-01 was a Thursday (ISO 4)

    # per example: its user's events before the cutoff (a ts prefix ascending, a suffix in `desc`)
    firsts = np.flatnonzero(first)
    seg = {uid[asc[a]]: (a, b) for a, b in zip(firsts, np.append(firsts[1:], e))}
    rows, cols, take, cuts = [], [], [], []
    for r in range(n):
        ab = seg.get(x_users[r])
        if ab is None:
            continue
        a, b = ab
        m = int(np.searchsorted(ts[a:b], x_cut[r], side="left"))  # events with ts < cutoff
        k = min(m, t)
        if k == 0:
            continue
        rows.append(np.full(k, r, np.int64))
        cols.append(t - 1 - np.arange(k))  # recency rank rn = 1..k -> column t - rn
        take.append(desc[b - m: b - m + k])
        cuts.append(np.full(k, x_cut[r], np.int64))
    if not rows:
        return out
    row, col, idx, cut = (np.concatenate(v) for v in (rows, cols, take, cuts))
    edges_t = time_edges(cfg)
    out["event"][row, col] = event_tok[idx]
    out["item"][row, col] = item_tok[idx]
    out["category"][row, col] = cat_tok[idx]
    out["price"][row, col] = price_tok[idx]
    out["dt_cutoff"][row, col] = 1 + np.searchsorted(edges_t, (cut - ts[idx]).astype(np.float64) / 1e6, side="right")
    prev_s = us_prev[idx] / 1e6
    out["dt_prev"][row, col] = np.where(np.isnan(prev_s), 1,
                                        2 + np.searchsorted(edges_t, np.nan_to_num(prev_s), side="right"))
    out["hour"][row, col] = hour[idx]
    out["weekday"][row, col] = weekday[idx]
    out["item_state"][row, col] = item_state[idx]
    out["raw_event"][row, col] = raw_tok[idx]
    out["mask"][row, col] = True
    return out
