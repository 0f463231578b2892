"""Event sequences: the last ``max_seq_len`` events of each example's user before its cutoff.

Each event becomes a token of several small integer fields (0 always means padding / missing):

=============  ==========================================================================
field          value
=============  ==========================================================================
``event``      1..7: view, cart, remove_from_cart, wishlist, purchase, other, checkout
               (``vocabulary.EVENT_CODES``; checkout came last so older codes kept their meaning)
``item``       1..item_buckets: ``1 + int(md5(item_id).hexdigest()[:15], 16) % item_buckets``
``category``   1..category_buckets, the same stable hash of ``category``
``price``      1..len(price_edges)+1: quantile bucket, edges fitted on train events only; or with
               ``price_bucketing="log"`` log-spaced edges over the fixed ``price_range`` (no data read)
``dt_cutoff``  1..time_buckets: log-spaced bucket of the seconds from the event to the cutoff
``dt_prev``    1 = no earlier event; 2..time_buckets+1: log bucket of seconds since the previous one
``hour``       1..24: hour of day (UTC) + 1
``weekday``    1..7: ISO day of week (Monday = 1)
``item_state`` 1..16: what the user did with this event's item *before* this event, over the
               whole history before the cutoff: ``1 + seen + 2 carted + 4 removed + 8 bought``
               (0 = no item id). A view of an item carted days ago reads ``1 + 1 + 2 = 4``: the
               revisit that precedes many purchases is one token, not a match attention must find.
``raw_event``  1..raw_event_buckets: the stable hash of the event name as the shop wrote it
               (``raw_event``; ``event`` where a workspace predates it): the sequence model sees
               the shop's own vocabulary ("page_view", "view_item_list", "Product Clicked"), also
               the names that ingest maps to ``other``
=============  ==========================================================================

Layout: chronological and **right-aligned**: the most recent event sits in the last column
``T - 1``, padding (mask False) fills the left. Column ``j`` of a width-``t`` batch is therefore
the event of recency rank ``t - 1 - j`` whatever the width, so a batch may be trimmed to its
longest real sequence by dropping leading columns without changing any token's position.

Only events with ``ts < cutoff`` of the example's user are read, in one SQL query per chunk of
examples; arrays are filled by vectorised scatter, never one Python object per event. The md5
hash is documented and stable across runs, machines and DuckDB versions (unlike ``hash()``).
``sequence_frame.build_sequences_frame`` gives the same arrays from in-memory events in numpy
(serving, where planning the SQL would cost more than the request budget).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from .config import from_dict
from .times import parse_duration
from .vocabulary import EVENT_CODES, OTHER_CODE, RAW_EVENT

SEQUENCE_FIELDS = ("event", "item", "category", "price", "dt_cutoff", "dt_prev", "hour", "weekday", "item_state",
                   "raw_event")
# the key of each example's cutoff (int64 microseconds since the epoch) in a sequence model's inputs beside the
# token arrays (runs.sequence_inputs); the rolling prior picks its encoder by it (models.prior)
CUTOFF_KEY = "cutoff_us"


@dataclass
class SequenceConfig:
    """How events become tokens (saved with the vocab in every run)."""

    max_seq_len: int = 200  # most recent events kept per example
    item_buckets: int = 20_000  # hash buckets for item ids (unseen ids still land in a bucket)
    category_buckets: int = 2_000  # hash buckets for categories
    raw_event_buckets: int = 256  # hash buckets for the shop's own event names (GA4 has ~40, Segment's spec ~50)
    price_buckets: int = 16  # number of price quantile buckets (fewer when prices have ties)
    # "quantile": edges are quantiles of the train events' prices; "log": price_buckets - 1 edges
    # log-spaced over price_range, fixed before any data is seen (public: what a DP model may use)
    price_bucketing: str = "quantile"
    price_range: tuple = (0.1, 10_000.0)  # lowest and highest edge of "log" bucketing (any currency unit)
    time_buckets: int = 32  # log-spaced buckets for time gaps, from 1 second ...
    time_max: str = "365d"  # ... to this duration (longer gaps share the last bucket)
    chunk_size: int = 20_000  # examples per SQL query (bounds memory for millions of examples)

    def __post_init__(self):
        if isinstance(self.price_range, list):  # as read back from JSON
            self.price_range = tuple(self.price_range)


@dataclass
class SequenceVocab:
    """Everything fitted for tokenisation: the config and the train-only price edges. JSON-safe."""

    cfg: SequenceConfig = field(default_factory=SequenceConfig)
    price_edges: list = field(default_factory=list)  # ascending, unique; len(edges)+1 buckets

    def field_sizes(self) -> dict[str, int]:
        """Embedding table size of each field (padding 0 included)."""
        c = self.cfg
        return {
            "event": len(EVENT_CODES) + 1,
            "item": c.item_buckets + 1,
            "category": c.category_buckets + 1,
            "price": len(self.price_edges) + 2,
            "dt_cutoff": c.time_buckets + 1,
            "dt_prev": c.time_buckets + 2,
            "hour": 25,
            "weekday": 8,
            "item_state": 17,
            "raw_event": c.raw_event_buckets + 1,
        }

    def to_dict(self) -> dict[str, Any]:
        cfg = dataclasses.asdict(self.cfg)
        cfg["price_range"] = [float(x) for x in cfg["price_range"]]  # as JSON gives it back
        return {"cfg": cfg, "price_edges": [float(x) for x in self.price_edges]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SequenceVocab":
        return cls(cfg=from_dict(SequenceConfig, d.get("cfg", {})), price_edges=list(d.get("price_edges", [])))


def stable_bucket(value: Optional[str], n_buckets: int) -> int:
    """The bucket SQL assigns to one id (reference implementation, used by tests and docs)."""
    if value is None:
        return 0
    return 1 + int(hashlib.md5(str(value).encode("utf-8")).hexdigest()[:15], 16) % n_buckets


def _hash_sql(col: str, n_buckets: int) -> str:
    # first 15 hex digits of md5 = a 60-bit non-negative BIGINT; identical to stable_bucket()
    return (f"CASE WHEN {col} IS NULL THEN 0 ELSE "
            f"1 + (('0x' || substr(md5(CAST({col} AS VARCHAR)), 1, 15))::BIGINT % {int(n_buckets)}) END")


def raw_event_sql(con, events: str = "events", alias: str = "e") -> str:
    """The SQL of an event's raw name: ``raw_event``, or ``event`` where it is NULL (rows of parts
    ingested before the column existed) or where ``events`` has no such column at all."""
    cols = {r[0] for r in con.execute(f"DESCRIBE {events}").fetchall()}
    return f"coalesce({alias}.{RAW_EVENT}, {alias}.event)" if RAW_EVENT in cols else f"{alias}.event"


def _examples_sql(con, examples: Any, name: str) -> str:
    """A table name for `examples` (a name already, or a DataFrame/Arrow table registered now)."""
    if isinstance(examples, str):
        return examples
    con.register(name, examples)
    return name


def _train_ids_sql(con, train: Any) -> str:
    if isinstance(train, str):
        return train
    ids = np.asarray(train, dtype=np.int64)
    con.register("_pi_train_ids", pd.DataFrame({"example_id": ids}))
    return "(SELECT x.* FROM examples x JOIN _pi_train_ids USING (example_id))"


def sequence_config(d: Any) -> SequenceConfig:
    """The :class:`SequenceConfig` of ``--param sequence={...}``; ValueError (one line) for a value
    that is not a mapping, an unknown key, or a bad ``price_bucketing`` / ``price_range``."""
    if d is None:
        return SequenceConfig()
    if not isinstance(d, dict):
        raise ValueError(f'sequence must be a JSON object such as {{"price_bucketing": "log"}}, got {d!r}')
    names = [f.name for f in dataclasses.fields(SequenceConfig)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"sequence has no setting {', '.join(map(repr, unknown))}; "
                         f"its settings are: {', '.join(names)}")
    cfg = SequenceConfig(**d)
    if cfg.price_bucketing not in ("quantile", "log"):
        raise ValueError(f"sequence price_bucketing must be 'quantile' or 'log', got {cfg.price_bucketing!r}")
    public_price_edges(cfg)  # checks price_range
    return cfg


def public_price_edges(cfg: SequenceConfig) -> list[float]:
    """The ``price_buckets - 1`` log-spaced edges of ``price_bucketing="log"`` from ``price_range``
    alone: the same for every data set, so they reveal nothing about anyone's prices."""
    try:
        lo, hi = (float(x) for x in cfg.price_range)
    except (TypeError, ValueError):
        raise ValueError(f"price_range must be two numbers [low, high], got {cfg.price_range!r}") from None
    if not (0 < lo < hi < float("inf")):
        raise ValueError(f"price_range must be two numbers with 0 < low < high, got {cfg.price_range!r}")
    n = max(int(cfg.price_buckets), 1) - 1
    if n < 1:
        return []
    if n == 1:
        return [float(np.sqrt(lo * hi))]
    return [float(x) for x in np.geomspace(lo, hi, n)]


def fit_vocab(con, train_examples: Any = "examples", cfg: Optional[SequenceConfig] = None) -> SequenceVocab:
    """Fit the price quantile edges on the events that train examples can see.

    Parameters
    ----------
    con : duckdb.DuckDBPyConnection
        Holds ``events`` (canonical schema) and, when ids are given, ``examples``.
    train_examples : str or array of int
        A table/relation name with ``user_id, cutoff`` of the train examples, or their example ids
        in the ``examples`` table.
    cfg : SequenceConfig, optional

    Returns
    -------
    SequenceVocab
        Price edges from the events of train users with ``ts <`` their latest train cutoff.
    """
    cfg = cfg or SequenceConfig()
    if cfg.price_bucketing == "log":  # fixed edges: no event is read
        return SequenceVocab(cfg=dataclasses.replace(cfg), price_edges=public_price_edges(cfg))
    if cfg.price_bucketing != "quantile":
        raise ValueError(f"price_bucketing must be 'quantile' or 'log', got {cfg.price_bucketing!r}")
    con.execute("SET enable_progress_bar = false")
    train_sql = _train_ids_sql(con, train_examples)
    n = max(int(cfg.price_buckets), 1)
    qs = ", ".join(f"{i / n:.6f}" for i in range(1, n))
    row = con.execute(
        f"""
        WITH lim AS (SELECT user_id, max(cutoff) AS c FROM {train_sql} GROUP BY user_id)
        SELECT quantile_cont(e.price, [{qs}]) FROM events e JOIN lim ON e.user_id = lim.user_id
        WHERE e.ts < lim.c AND e.price IS NOT NULL AND isfinite(e.price)
        """
    ).fetchone() if n > 1 else None
    edges = sorted({float(x) for x in (row[0] or [])}) if row and row[0] else []
    return SequenceVocab(cfg=dataclasses.replace(cfg), price_edges=edges)


def field_dtype(size: int) -> np.dtype:
    """The smallest integer dtype of a token field with ``size`` values (padding 0 included)."""
    return np.dtype(np.uint8) if size <= 256 else np.dtype(np.int16) if size <= 32767 else np.dtype(np.int32)


def time_edges(cfg: SequenceConfig) -> np.ndarray:
    """Upper edges (seconds) of the log-spaced time buckets of ``dt_cutoff`` and ``dt_prev``."""
    top = parse_duration(cfg.time_max).total_seconds()
    return np.geomspace(1.0, max(top, 2.0), cfg.time_buckets - 1)  # seconds; < 1 s is bucket 1


def checked_vocab(cfg: Optional[SequenceConfig], vocab: Optional[SequenceVocab]
                  ) -> tuple[SequenceVocab, SequenceConfig]:
    """The vocab and config to tokenise with; raises when their bucket counts differ."""
    vocab = vocab or SequenceVocab(cfg=cfg or SequenceConfig())
    cfg = cfg or vocab.cfg
    for name in ("item_buckets", "category_buckets", "raw_event_buckets", "time_buckets", "time_max"):
        if getattr(cfg, name) != getattr(vocab.cfg, name):
            raise ValueError(f"SequenceConfig.{name}={getattr(cfg, name)!r} differs from the vocab's "
                             f"{getattr(vocab.cfg, name)!r}: tokens would not match the trained model")
    return vocab, cfg


def build_sequences(con, examples: Any = "examples", cfg: Optional[SequenceConfig] = None,
                    vocab: Optional[SequenceVocab] = None, out_dir: str | Path | None = None,
                    times: bool = False) -> dict[str, np.ndarray]:
    """Token arrays for every example, rows in ``example_id`` order.

    Parameters
    ----------
    con : duckdb.DuckDBPyConnection
        Holds ``events``; a workspace or a connection with one user's events (serving).
    examples : str or DataFrame
        Table name (or frame) with ``example_id, user_id, cutoff``.
    cfg : SequenceConfig, optional
        Defaults to ``vocab.cfg``; its bucket counts must equal the vocab's.
    vocab : SequenceVocab
        From :func:`fit_vocab` (price edges). Without one, price is left as 0 (missing).
    out_dir : path, optional
        Write the arrays as memory-mapped ``.npy`` files there (for millions of examples).
    times : bool
        Also ``"us_cut"`` (N, T) int64: microseconds from each event to its example's cutoff (0 for
        padding), which the ``future`` pretraining objective reads; not a token field.

    Returns
    -------
    dict
        ``SEQUENCE_FIELDS`` -> (N, T) small unsigned/signed ints, ``"mask"`` -> (N, T) bool
        (True = real event), ``"example_id"`` -> (N,) int64. T = ``max_seq_len``, right-aligned.
    """
    vocab, cfg = checked_vocab(cfg, vocab)
    con.execute("SET enable_progress_bar = false")
    ex = _examples_sql(con, examples, "_pi_seq_examples")
    ids = con.execute(f"SELECT example_id FROM {ex} ORDER BY example_id").fetchnumpy()["example_id"]
    ids = np.asarray(ids, dtype=np.int64)
    n, t = len(ids), int(cfg.max_seq_len)
    sizes = vocab.field_sizes()

    def alloc(name: str, dtype: np.dtype) -> np.ndarray:
        if out_dir is None:
            return np.zeros((n, t), dtype=dtype)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(Path(out_dir) / f"{name}.npy", mode="w+", dtype=dtype, shape=(n, t))

    out = {f: alloc(f, field_dtype(sizes[f])) for f in SEQUENCE_FIELDS}
    out["mask"] = alloc("mask", np.dtype(bool))
    if times:
        out["us_cut"] = alloc("us_cut", np.dtype(np.int64))
    edges_t = time_edges(cfg)
    edges_p = np.asarray(vocab.price_edges, dtype=np.float64)
    ev_case = " ".join(f"WHEN '{k}' THEN {v}" for k, v in EVENT_CODES.items())
    raw_col = raw_event_sql(con)
    for lo in range(0, n, max(int(cfg.chunk_size), 1)):
        chunk = ids[lo: lo + cfg.chunk_size]
        # rn = recency rank (1 = most recent); dt_prev uses the full history, not only the window
        rel = con.sql(
            f"""
            WITH x AS (SELECT example_id, user_id, cutoff FROM {ex}
                       WHERE example_id BETWEEN {int(chunk[0])} AND {int(chunk[-1])}),
            j AS (
              SELECT x.example_id, e.ts, e.event, e.item_id, e.category, e.price, {raw_col} AS raw_event,
                     epoch_us(x.cutoff) - epoch_us(e.ts) AS us_cut,
                     epoch_us(e.ts) - epoch_us(lag(e.ts) OVER w_asc) AS us_prev,
                     row_number() OVER w_desc AS rn,
                     count(*) OVER w_item AS it_seen,
                     max(CASE WHEN e.event = 'cart' THEN 2 ELSE 0 END) OVER w_item AS it_cart,
                     max(CASE WHEN e.event = 'remove_from_cart' THEN 4 ELSE 0 END) OVER w_item AS it_rm,
                     max(CASE WHEN e.event = 'purchase' THEN 8 ELSE 0 END) OVER w_item AS it_buy
              FROM x JOIN events e ON e.user_id = x.user_id AND e.ts < x.cutoff
              WINDOW w_asc AS (PARTITION BY x.example_id
                               ORDER BY e.ts, e.event, e.item_id, e.category, e.price, {raw_col}),
                     w_item AS (PARTITION BY x.example_id, e.item_id
                                ORDER BY e.ts, e.event, e.item_id, e.category, e.price, {raw_col}
                                ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING),
                     w_desc AS (PARTITION BY x.example_id
                                ORDER BY e.ts DESC, e.event DESC, e.item_id DESC, e.category DESC, e.price DESC,
                                         {raw_col} DESC)
            )
            SELECT example_id, rn,
                   CASE event {ev_case} ELSE {OTHER_CODE} END::UTINYINT AS event,
                   {_hash_sql('item_id', cfg.item_buckets)} AS item,
                   {_hash_sql('category', cfg.category_buckets)} AS category,
                   {_hash_sql('raw_event', cfg.raw_event_buckets)} AS raw_event,
                   price, us_cut, us_prev,
                   (hour(ts) + 1)::UTINYINT AS hour, isodow(ts)::UTINYINT AS weekday,
                   CASE WHEN item_id IS NULL THEN 0
                        ELSE 1 + least(it_seen, 1) + coalesce(it_cart, 0) + coalesce(it_rm, 0)
                             + coalesce(it_buy, 0) END::UTINYINT AS item_state
            FROM j WHERE rn <= {t}
            """
        )
        tbl = rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
        if tbl.num_rows == 0:
            continue
        col = {name: tbl.column(name).to_numpy() for name in tbl.column_names}  # NULL -> NaN
        row = lo + np.searchsorted(chunk, col["example_id"].astype(np.int64))  # (E,)
        pos = t - col["rn"].astype(np.int64)  # right-aligned: most recent -> column T-1
        out["event"][row, pos] = col["event"]
        out["item"][row, pos] = col["item"]
        out["category"][row, pos] = col["category"]
        price = np.asarray(col["price"], dtype=np.float64)  # NaN for NULL
        pb = 1 + np.searchsorted(edges_p, np.nan_to_num(price), side="right")
        out["price"][row, pos] = np.where(np.isfinite(price), pb, 0)
        if times:
            out["us_cut"][row, pos] = col["us_cut"]
        cut_s = np.asarray(col["us_cut"], dtype=np.float64) / 1e6
        out["dt_cutoff"][row, pos] = 1 + np.searchsorted(edges_t, cut_s, side="right")
        prev_s = np.asarray(col["us_prev"], dtype=np.float64) / 1e6  # NaN = no earlier event
        out["dt_prev"][row, pos] = np.where(np.isnan(prev_s), 1,
                                            2 + np.searchsorted(edges_t, np.nan_to_num(prev_s), side="right"))
        out["hour"][row, pos] = col["hour"]
        out["weekday"][row, pos] = col["weekday"]
        out["item_state"][row, pos] = col["item_state"]
        out["raw_event"][row, pos] = col["raw_event"]
        out["mask"][row, pos] = True
    if not isinstance(examples, str):
        con.unregister("_pi_seq_examples")
    out["example_id"] = ids
    return out

