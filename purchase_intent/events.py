"""Ingest raw behaviour logs into the workspace as canonical, pseudonymised events.

    purchase-intent ingest UserBehavior.csv.gz --format taobao
    purchase-intent ingest events.csv --format csv --map user_id=visitor --event-map addtocart=cart

Per source file, all in DuckDB SQL: read every field as text (a Parquet file's integer and DOUBLE
columns as numbers; the readers and format presets are in ``event_sources``), map columns and
event names, validate each row with one CASE expression (the first failing check is its reason),
pseudonymise the distinct user and session ids (a log's session ids row by row instead, where the
map of its sessions would not fit in memory), and write accepted rows to one Parquet part. A
Parquet file is read again where its rows are needed (counted, then written) instead of being
staged whole, and the rows of its part are stored in no particular order (every reader of the
events orders what it needs); other sources are staged in a temporary table once, and their parts
keep the file's order. Every row read ends up accepted, rejected (with a reason, its line number
and raw content in ``rejects/<sha>.csv``, see ``event_rejects``) or filtered (outside
``since``/``until``); nothing is dropped silently.

A command commits atomically: parts and reject files are built in a temporary directory, moved
into place, and the manifest is replaced last (the commit point). A file whose content sha256
is already in the manifest is skipped. A query on a database (``event_database.DatabaseQuery``) is
one more source: its rows are read into DuckDB and then go the same way as a file's.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable, Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import duckdb

from . import memory, storage
from .config import DataConfig
from .event_database import DatabaseQuery, QueryRows
from .event_rejects import collect_rejects
from .event_sources import (
    PRESETS,
    Source,
    csv_lines_source,
    csv_source,
    ga4_source,
    jsonl_source,
    parquet_source,
    segment_source,
    sql_ident,
    sql_literal,
    text_sql,
)
from .privacy import key_chain, key_id, load_key, pseudonym_params, pseudonym_sql
from .times import parse_time
from .vocabulary import CANONICAL_COLUMNS, CANONICAL_EVENTS, RAW_EVENT
from .workspace import Workspace, atomic_write_json, fsync_dir, tmp_path

REASONS = ("malformed_line", "not_utf8", "bad_field_type", "not_an_event", "duplicate_message", "missing_user",
           "missing_ts", "bad_ts", "implausible_ts", "unknown_event", "bad_price", "negative_price")
MIN_TS = datetime(1990, 1, 1)
# the lines DuckDB's CSV reader rejects (its reject_errors table) by reason: not_utf8 (bytes that are not
# UTF-8: a Latin-1 or cp1252 export) or malformed_line
MALFORMED_COUNTS_SQL = ("SELECT reason, count(*) FROM (SELECT CASE WHEN bool_or(error_type = 'INVALID ENCODING') "
                        "THEN 'not_utf8' ELSE 'malformed_line' END AS reason FROM reject_errors GROUP BY line) "
                        "GROUP BY reason")
UNMAPPED_SHOWN = 12  # unmapped event names listed in the summary (all of them are in the report and manifest)
_MULT = {"s": 1e6, "ms": 1e3, "us": 1.0, "ns": 1e-3}
# file kinds read again cheaply: their validated rows are a view, computed where they are used (counted, then
# joined to their pseudonyms and written), never held whole; the other kinds stage them in a table
STREAMED = ("parquet",)
# DuckDB's memory per row of a pseudonym map in the join (raw id, 32-character pseudonym, hash table entry):
# a log's session map (one row per session, millions) that would take more than half of what DuckDB may hold
# is not built; each row's session id is pseudonymised in SQL instead (same pseudonyms, no join to spill)
MAP_ROW_BYTES = 128

# the version of how ingest reads a file's values, recorded with each file in the manifest: a file read by an
# earlier one gets a note when new files join it (their ids or event names may have been read otherwise)
READER = 2
_READER_CHANGES = {  # what the reader of each earlier version did otherwise, up to this one
    0: "kept whole-number ids written as floats ('1001.0') apart from '1001', stored ids written 'NA', 'null' or "
       "'undefined' as one user instead of as missing, and matched event names in their case only",
    1: "kept whole-number ids written as floats in a text column ('1001.0', as pandas writes them to CSV) apart "
       "from '1001', and stored ids written 'NA', 'null' or 'undefined' as one user instead of as missing",
}


def _reader(entry: dict) -> int:
    """The reader version of a manifest entry (entries before ``settings`` were recorded: 0)."""
    return int(entry.get("reader", 1 if "settings" in entry else 0))



class IngestRejectedError(ValueError):
    """Strict mode: some rows were rejected, so nothing was stored."""

    def __init__(self, report: "IngestReport"):
        self.report = report
        super().__init__("strict mode: rows were rejected, nothing was stored\n" + report.summary())


class IngestNothingAcceptedError(ValueError):
    """Rows were read and every one was rejected, some for a reason of :data:`MISREAD`: nothing was stored (the
    same files can then be read again with other settings, which a stored load of no event would refuse)."""

    def __init__(self, report: "IngestReport"):
        self.report = report
        super().__init__("no row was accepted, nothing was stored; fix the reading (the hints below) and ingest "
                         "again\n" + report.summary(rejects=False))


# reasons whose rejected values ingest shows a few of (the field's text: never an id), with what to do
SAMPLED = {
    "bad_ts": ("ts", "ISO 8601 times and epoch numbers are read; give another layout with --ts-format, e.g. "
                     "'%m/%d/%Y %H:%M' or '%d.%m.%Y %H:%M:%S'"),
    "implausible_ts": ("ts", f"times before {MIN_TS.year} or in the future; epoch numbers are read by their "
                             "magnitude (--ts-unit s|ms|us|ns names the unit), and a date without its year cannot "
                             "be read"),
    "bad_price": ("price", "prices that do not read as numbers"),
    "unknown_event": (RAW_EVENT, "--event-map RAW=CANON maps a name"),
}
SAMPLES_SHOWN = 3
# reasons that say the reading is wrong (a layout, a unit, a column map, an encoding), not the rows: an ingest
# whose every row is rejected with one of them fails and stores nothing, so that it can be read again otherwise
# (an all-anonymous file, or one of Segment identify calls only, is stored as the empty load it is)
MISREAD = {"bad_ts", "implausible_ts", "missing_ts", "bad_price", "unknown_event", "malformed_line", "not_utf8",
           "bad_field_type"}


@dataclass
class FileReport:
    source: str
    sha256: str
    rows_read: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    filtered: int = 0
    unmapped: dict[str, int] = field(default_factory=dict)  # raw event name -> accepted rows stored as other
    skipped: bool = False
    part: Optional[str] = None
    rejects_path: Optional[Path] = None
    seconds: float = 0.0
    manifest: dict = field(default_factory=dict)  # fields of its manifest entry that replace the file's own
    samples: dict[str, list[str]] = field(default_factory=dict)  # SAMPLED reason -> a few of its texts


@dataclass
class IngestReport:
    files: list[FileReport] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return sum(f.accepted for f in self.files)

    @property
    def filtered(self) -> int:
        return sum(f.filtered for f in self.files)

    @property
    def rejected(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.files:
            for k, v in f.rejected.items():
                out[k] = out.get(k, 0) + v
        return dict(sorted(out.items()))

    @property
    def unmapped(self) -> dict[str, int]:
        """Raw event names no event map names, stored as ``other`` (their ``raw_event`` kept): name -> rows."""
        out: dict[str, int] = {}
        for f in self.files:
            for k, v in f.unmapped.items():
                out[k] = out.get(k, 0) + v
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def skipped(self) -> list[str]:
        return [f.source for f in self.files if f.skipped]

    @property
    def rejects_paths(self) -> list[Path]:
        return [f.rejects_path for f in self.files if f.rejects_path is not None]

    @property
    def samples(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for f in self.files:
            for k, v in f.samples.items():
                out[k] = list(dict.fromkeys(out.get(k, []) + v))[:SAMPLES_SHOWN]
        return out

    def summary(self, rejects: bool = True) -> str:
        """Accepted, rejected by reason (with a few values and what to do where most rows fail so), filtered
        and skipped counts, one line each; ``rejects``: the rejects files' lines."""
        rej = self.rejected
        lines = [f"accepted  {self.accepted:>12,}" + ("   (no row accepted: see the reasons below)"
                                                      if not self.accepted and (rej or self.filtered) else ""),
                 f"rejected  {sum(rej.values()):>12,}" + "".join(f"\n  {k:<16}{v:>10,}" for k, v in rej.items()),
                 f"filtered  {self.filtered:>12,}"]
        for reason, texts in self.samples.items():
            shown = ", ".join(repr(t[:40]) for t in texts)
            what = "names" if SAMPLED[reason][0] == RAW_EVENT else "values shaped"
            lines.insert(lines.index(next(x for x in lines if x.startswith("filtered"))),
                         f"  ({reason}: {what} {shown}: {SAMPLED[reason][1]})")
        if rej.get("not_utf8"):
            lines.insert(2, "  (not_utf8: lines whose bytes are not UTF-8, e.g. a Latin-1 or cp1252 export; convert "
                            "the file, e.g. iconv -f cp1252 -t utf-8 IN > OUT, and ingest that into a new workspace)")
        unmapped = self.unmapped
        if unmapped:
            shown = list(unmapped.items())[:UNMAPPED_SHOWN]
            lines.append(f"as other  {sum(unmapped.values()):>12,} events of {len(unmapped):,} unmapped event names "
                         "(--event-map RAW=CANON maps one; --strict-events rejects them)")
            lines += [f"  {k[:40]:<40}{v:>10,}" for k, v in shown]
            if len(unmapped) > len(shown):
                lines.append(f"  ... {len(unmapped) - len(shown):,} more names")
        if self.skipped:
            lines.append(f"skipped   {len(self.skipped):>12,} source(s): already ingested, or a query without new rows")
        if rejects:
            lines += [f"rejects:  {p}" for p in self.rejects_paths]
        return "\n".join(lines)


# --- validation ------------------------------------------------------------------------------


def snake_case(name: str) -> str:
    s = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name.strip())
    s = re.sub(r"[^0-9a-zA-Z]+", "_", s).strip("_").lower()
    return s if s and not s[0].isdigit() else f"x_{s}"



def _parse_time(text: Optional[str]) -> Optional[datetime]:
    """``since`` / ``until`` of the config (ISO 8601; a naive time is UTC) as naive UTC, or None."""
    return parse_time(text) if text else None


def _ts_sql(col: str, num: str, unit: Optional[str], fmt: Optional[str] = None) -> str:
    """SQL turning a text timestamp ``col`` (``num``: the same as DOUBLE, or NULL) into TIMESTAMP
    (UTC): epoch numbers by unit (or by magnitude when the unit is unknown: < 1e11 seconds,
    < 1e14 milliseconds, < 1e17 microseconds, else nanoseconds; a whole number from 19000101 to 21001231
    that is a valid date, as YYYYMMDD), other text as ISO 8601 (a zone-less time in the session's zone,
    --ts-zone; an offset after a space, ``2024-01-14 06:24:36 +0100`` as Shopify writes it, is read too), or,
    with ``fmt`` (--ts-format), every value as text by that strptime layout."""
    if fmt:
        return f"(CAST(try_strptime({col}, {sql_literal(fmt)}) AS TIMESTAMPTZ) AT TIME ZONE 'UTC')"
    mult = (str(_MULT[unit]) if unit in _MULT else
            f"(CASE WHEN abs({num}) < 1e11 THEN 1e6 WHEN abs({num}) < 1e14 THEN 1e3 WHEN abs({num}) < 1e17 THEN 1 "
            f"ELSE 1e-3 END)")
    # without a unit, a whole number that reads as a date YYYYMMDD (19970101) is that date: as epoch seconds it
    # would fall in August 1970, which no log holds
    ymd = ("" if unit in _MULT else
           f"WHEN {num} BETWEEN 19000101 AND 21001231 AND {num} = floor({num}) "
           f"THEN TRY(CAST(strptime(CAST(CAST({num} AS BIGINT) AS VARCHAR), '%Y%m%d') AS TIMESTAMPTZ)) "
           f"AT TIME ZONE 'UTC' ")
    return (f"(CASE {ymd}WHEN {num} IS NOT NULL THEN TRY(make_timestamp(TRY_CAST(round({num} * {mult}) AS BIGINT))) "
            f"ELSE coalesce(TRY_CAST({col} AS TIMESTAMPTZ), TRY_CAST(replace(replace({col}, ' +', '+'), ' -', '-') "
            f"AS TIMESTAMPTZ)) AT TIME ZONE 'UTC' END)")



def _sha256(path: Path, size: Optional[int] = None) -> str:
    """The sha256 of the file, or of its first ``size`` bytes."""
    h = hashlib.sha256()
    left = size
    with open(path, "rb") as f:
        while (left is None or left > 0) and (chunk := f.read(1 << 22 if left is None else min(left, 1 << 22))):
            h.update(chunk)
            left = None if left is None else left - len(chunk)
    return h.hexdigest()



def resolve_columns(cfg: DataConfig, preset: dict, columns: list[str]
             ) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(canonical -> source column, raw event -> canonical event, extra source column -> name)."""
    mapping = {**preset.get("mapping", {}), **cfg.mapping}
    for c in CANONICAL_COLUMNS:
        if c not in mapping and c in columns:
            mapping[c] = c
    unknown = sorted(set(mapping) - set(CANONICAL_COLUMNS))
    if unknown:
        raise ValueError(f"--map names unknown canonical columns {unknown}; use {list(CANONICAL_COLUMNS)}")
    one = len(columns) == 1 and len(columns[0].split()) > 1  # 'customer_id  date  price': not comma-separated
    hint = ("; the header reads as one column: a file separated by spaces is not read, convert it to CSV first "
            "(e.g. sed -E 's/^ +//; s/ +/,/g')" if one else "")
    for canon, src in mapping.items():
        if src not in columns:
            raise ValueError(f"column {src!r} (for {canon}) is not in the file; its columns are {columns}{hint}")
    if cfg.all_events is not None:
        if cfg.all_events not in CANONICAL_EVENTS:
            raise ValueError(f"--all-events {cfg.all_events!r} is not a canonical event; use one of "
                             f"{list(CANONICAL_EVENTS)}")
        if "event" in mapping:
            raise ValueError(f"--all-events {cfg.all_events} is for a log without an event column, and this one "
                             f"reads its events from column {mapping['event']!r}: leave one of them out")
    missing = [c for c in ("user_id", "ts", "event") if c not in mapping and not (c == "event" and cfg.all_events)]
    if missing:
        extra = " (or, for a log of one kind of event such as transactions, --all-events purchase)" \
            if missing == ["event"] else ""
        raise ValueError(f"no column for {missing}; map them with --map {missing[0]}=COLUMN{extra} "
                         f"(columns: {columns}){hint}")
    events = {**{e: e for e in CANONICAL_EVENTS}, **preset.get("event_map", {}), **cfg.event_map}
    bad = sorted({v for v in events.values() if v not in CANONICAL_EVENTS})
    if bad:
        raise ValueError(f"--event-map targets {bad} are not canonical events {list(CANONICAL_EVENTS)}")
    taken, extras = {*CANONICAL_COLUMNS, RAW_EVENT}, {}
    if not cfg.keep_extras:  # no model reads them, and they may identify people
        return mapping, events, extras
    for c in columns:
        if c in mapping.values():
            continue
        name = snake_case(c)
        while name in taken:
            name += "_extra"
        taken.add(name)
        extras[c] = name
    return mapping, events, extras


def stage_sql(src: Source, mapping: dict[str, str], events: dict[str, str], extras: dict[str, str],
               ts_unit: Optional[str], since: Optional[datetime], until: Optional[datetime], now: datetime,
               strict_events: bool = False, all_events: Optional[str] = None, ts_format: Optional[str] = None) -> str:
    def col(canon: str) -> str:  # the mapped column as text (the event of every row: --all-events)
        if canon == "event" and canon not in mapping and all_events:
            return sql_literal(all_events)
        return text_sql(src, mapping[canon]) if canon in mapping else "NULL::VARCHAR"

    def number(canon: str) -> Optional[str]:  # the mapped column as DOUBLE where the source gives it as a number
        return f"CAST({sql_ident(mapping[canon])} AS DOUBLE)" if mapping.get(canon) in src.numeric else None

    # a name no map names is stored as other (its raw name kept), or, with strict_events, rejected
    # a name matches exactly, or else in any case ('Purchase', 'VIEW') where its lower case names one event only
    folded: dict[str, set[str]] = {}
    for k, v in events.items():
        folded.setdefault(k.lower(), set()).add(v)
    ev_case = "CASE _raw_event " + " ".join(
        f"WHEN {sql_literal(k)} THEN {sql_literal(v)}" for k, v in events.items()) + " ELSE CASE lower(_raw_event) " + \
        " ".join(f"WHEN {sql_literal(k)} THEN {sql_literal(v.pop())}" for k, v in folded.items() if len(v) == 1) + \
        " END END"
    unmapped = "NULL" if strict_events else "'other'"
    unknown = "_raw_event IS NULL OR _event IS NULL" if strict_events else "_raw_event IS NULL"
    bad = "coalesce(_why, 'malformed_line')" if src.has_why else "'malformed_line'"
    raw_list = "[" + ", ".join(text_sql(src, c) for c in src.columns) + "]"
    window = ""
    if since:
        window += f" OR _ts < TIMESTAMP {sql_literal(since)}"
    if until:
        window += f" OR _ts >= TIMESTAMP {sql_literal(until)}"
    window = f"WHEN {window[4:]} THEN 'filtered'" if window else ""
    extra_sel = "".join(f", {text_sql(src, c)} AS {sql_ident(n)}" for c, n in extras.items())
    # a timestamp or price the source gives as a number is read as that number (its text would parse to the
    # same DOUBLE): _ts_raw / _price_raw, the text, are NULL for it and only _ts_num / _price are set
    ts_num, price_num = (None if ts_format else number("ts")), number("price")  # a layout reads the text
    ts_text = ("NULL::VARCHAR AS _ts_raw, " + ts_num if ts_num else
               f"NULLIF(trim({col('ts')}), '') AS _ts_raw, TRY_CAST(NULLIF(trim({col('ts')}), '') AS DOUBLE)")
    price_text = "NULL::VARCHAR" if price_num else f"NULLIF(trim({col('price')}), '')"
    return f"""
    SELECT _pos, _user AS user_raw, _ts AS ts, coalesce(_event, {unmapped}) AS event, _item AS item_id,
           _cat AS category, _price AS price, _session AS session_raw, _raw_event AS {RAW_EVENT},
           _event IS NULL AS _unmapped{extra_sel}, _reason AS reason,
           CASE WHEN _reason IS NOT NULL AND _reason <> 'filtered' THEN {raw_list} END AS _raw_list,
           CASE WHEN _reason IS NOT NULL AND _reason <> 'filtered' THEN _raw_text END AS _raw_text
    FROM (
      SELECT *, CASE
        WHEN _bad THEN {bad}
        WHEN _user IS NULL THEN 'missing_user'
        WHEN _ts_raw IS NULL AND _ts_num IS NULL THEN 'missing_ts'
        WHEN _ts IS NULL THEN 'bad_ts'
        WHEN _ts < TIMESTAMP {sql_literal(MIN_TS)}
          OR _ts > TIMESTAMP {sql_literal(now + timedelta(days=1))} THEN 'implausible_ts'
        WHEN {unknown} THEN 'unknown_event'
        WHEN (_price_raw IS NOT NULL AND _price IS NULL) OR NOT isfinite(_price) THEN 'bad_price'
        WHEN _price < 0 THEN 'negative_price'
        {window}
      END AS _reason
      FROM (
        SELECT *, {_ts_sql("_ts_raw", "_ts_num", ts_unit, ts_format)} AS _ts, {ev_case} AS _event,
               {price_num or price_sql("_price_raw")} AS _price
        FROM (  -- each text field is trimmed and parsed once
          SELECT *, {_id_of_trimmed('_user_t')} AS _user, {ts_text} AS _ts_num,
                 NULLIF(trim({col('event')}), '') AS _raw_event, {price_text} AS _price_raw,
                 NULLIF({col('item_id')}, '') AS _item, NULLIF({col('category')}, '') AS _cat,
                 {_id_of_trimmed('_session_t')} AS _session
          FROM (SELECT *, trim({col('user_id')}) AS _user_t, trim({col('session_id')}) AS _session_t
                FROM ({src.sql}))
        )
      )
    )"""



# a price as shops write it: the number, and before or after it at most a currency symbol or a three-letter
# code ("€9.99", "EUR 12,50", "12,50 zł", "R$ 5"); group 1 is the number with its separators
_CURRENCY = r"(?:[A-Z]{3}|R\$|[$€£¥₹₽₩₺₴₪฿₫]|zł|kr|Kč|Ft|lei)"
# (a space, no-break space or narrow no-break space may group thousands, "1 234,56", as French exports write)
_GROUP_SPACE = "[ \u00a0\u202f]"  # the characters themselves: RE2 reads no \\u escapes
_PRICE_TEXT = rf"^\s*(?:{_CURRENCY}\s*)?([+-]?\d[\d.,]*(?:{_GROUP_SPACE}\d{{3}}[\d.,]*)*)\s*{_CURRENCY}?\s*$"


def price_sql(text: str) -> str:
    """SQL reading the price text ``text`` as DOUBLE: as a number, or else without a currency symbol or code
    and with its separators read by their places: "1.234,56" and "1,234.56" are 1234.56 (the last
    separator is the decimal one), "12,50" is 12.5 (a comma before one or two digits is a decimal comma),
    "1,234" is 1234 (a comma before groups of three digits groups thousands), "0,0508" and "12,5083" are
    decimals (a comma after 0, or before other than three digits), "1 234,56" is 1234.56 (spaces grouping
    thousands). "1.234" stays 1.234. NULL where none of these reads it (a bad_price)."""
    m = f"regexp_extract({text}, {sql_literal(_PRICE_TEXT)}, 1)"
    for space in _GROUP_SPACE[1:-1]:  # the spaces the pattern let group thousands (as characters: Spark's chr
        m = f"replace({m}, '{space}', '')"  # is chr(n % 256))
    number = (f"CASE WHEN regexp_matches({m}, '^[+-]?[1-9]\\d{{0,2}}(\\.\\d{{3}})+,\\d+$') "
              f"THEN replace(replace({m}, '.', ''), ',', '.') "
              f"WHEN regexp_matches({m}, '^[+-]?[1-9]\\d{{0,2}}(,\\d{{3}})+(\\.\\d+)?$') THEN replace({m}, ',', '') "
              f"WHEN regexp_matches({m}, '^[+-]?(\\d+,(\\d{{1,2}}|\\d{{4,}})|0,\\d+)$') THEN replace({m}, ',', '.') "
              f"ELSE {m} END")
    return f"coalesce(TRY_CAST({text} AS DOUBLE), TRY_CAST({number} AS DOUBLE))"


# what exporters write for a missing id, as they spell it (R, pandas: NA, NaN, nan, None; SQL dumps: NULL, \N;
# JavaScript trackers: undefined, null); case-sensitive, so that a shopper named Nil or Nan stays one
MISSING_IDS = ("NA", "N/A", "n/a", "NaN", "nan", "None", "null", "NULL", "undefined", "\\N")


def _id_sql(text: str) -> str:
    """A user or session id as ingest reads it: trimmed, then :func:`_id_of_trimmed`."""
    return _id_of_trimmed(f"trim({text})")


def _id_of_trimmed(t: str) -> str:
    """The id of the trimmed text ``t`` (SQL): empty as NULL, and a whole number written as a float (``13085.0``,
    as pandas writes an integer column with a missing value to CSV) as the integer, so that it is the user
    ``13085`` of a file written otherwise (a Parquet DOUBLE column's ids: ``event_sources.text_sql``). The texts
    exporters write for a missing value (:data:`MISSING_IDS`: ``NA``, ``null``, ``undefined``, ``\\N``) are
    missing too, not one user who would hold every anonymous row. Only a text with a dot is matched against the
    pattern (no backslash, which Spark's SQL reads as an escape; no line break, before which Java's ``$``
    matches); ``t`` is read once per row where the caller names a column (stage_sql trims in a subquery)."""
    missing = ", ".join("chr(92) || 'N'" if m == "\\N" else sql_literal(m) for m in MISSING_IDS)
    return (f"NULLIF(CASE WHEN contains({t}, '.') AND regexp_matches({t}, '^-?[0-9]+[.]0+$') "
            f"AND NOT contains({t}, chr(10)) THEN split_part({t}, '.', 1) "
            f"WHEN {t} IN ({missing}) THEN NULL ELSE {t} END, '')")


def distinct_ids_sql(src: Source, mapping: dict[str, str], canon: str) -> str:
    """The distinct ids (``canon``: user_id or session_id) of the source's rows, as ``stage_sql`` reads them,
    and NULL where a row has none; read after the source's own values are made distinct (once per id, not once
    per row). NULL stays: a filter on it would be pushed by DuckDB below the DISTINCT, into the scan, and read
    every row's id there (a 10M-event ingest's maps took 2.9 -> 5.1 s); no join matches it."""
    if canon not in mapping:
        return "SELECT NULL::VARCHAR AS id WHERE false"
    # distinct texts (not numbers: -0.0 and 0.0 are one DOUBLE and two texts)
    return (f"SELECT DISTINCT {_id_sql('v')} AS id FROM (SELECT DISTINCT "
            f"{text_sql(src, mapping[canon])} AS v FROM ({src.sql}))")


def _pseudonym_map(con: duckdb.DuckDBPyConnection, name: str, ids: str, key: bytes) -> None:
    """Create the temp table ``name (raw, pid)``: the ids the query ``ids`` gives (distinct; a NULL maps to NULL)
    and their pseudonyms, computed inside DuckDB (``privacy.pseudonym_sql``: vectorised, on all of
    DuckDB's threads, spilled under the memory limit like any table).

    ``privacy.pseudonym_table`` computes the same pseudonyms in Python, one thread: on two free cores
    the SQL maps made a 10M-event ingest 15% faster, on two busy ones they were level with it
    (BENCHMARKS.md, "Ingest: pseudonyms in DuckDB SQL against Python HMAC")."""
    con.execute(f"CREATE TEMP TABLE {name} AS SELECT raw, {pseudonym_sql('raw', len(key_chain(key)))} AS pid "
                f"FROM ({ids}) AS t(raw)", pseudonym_params(key))


def _samples(con: duckdb.DuckDBPyConnection, src: Source, mapping: dict, report: FileReport) -> dict[str, list[str]]:
    """A few distinct shapes (:func:`value_shape`; event names as they are) of the field behind each
    :data:`SAMPLED` reason that rejected at least half of the file's rows (where a reading setting is most likely
    wrong; found at once then, even in a streamed file)."""
    out = {}
    for reason, (canon, _) in SAMPLED.items():
        if report.rejected.get(reason, 0) * 2 < max(report.rows_read, 1):
            continue
        if canon == RAW_EVENT:
            field_sql = RAW_EVENT
        elif mapping.get(canon) in src.columns:
            field_sql = f"_raw_list[{src.columns.index(mapping[canon]) + 1}]"
        else:
            continue
        rows = con.execute(f"SELECT DISTINCT f FROM (SELECT {field_sql} AS f FROM staged WHERE reason = $r "
                           f"AND {field_sql} IS NOT NULL LIMIT 100) LIMIT {SAMPLES_SHOWN}", {"r": reason}).fetchall()
        if rows:  # a time's or price's shape (a mis-mapped column may hold ids, which are never shown)
            texts = (str(r[0]) for r in rows)
            out[reason] = sorted(dict.fromkeys(texts if canon == RAW_EVENT else map(value_shape, texts)))
    return out


def value_shape(text: str) -> str:
    """``text`` with each digit as 9 and each letter as a or A (``1/4/2010 14:28`` -> ``9/9/9999 99:99``): the
    layout of a value, which --ts-format needs, without the value."""
    return re.sub(r"[^\W\d_]", lambda m: "A" if m.group(0).isupper() else "a", re.sub(r"\d", "9", text))


def sessions_per_row(n_sessions: int) -> bool:
    """Whether to pseudonymise each row's session id in SQL rather than build and join the session map of
    ``n_sessions`` sessions: when the map would take more than half of what DuckDB may hold
    (:data:`MAP_ROW_BYTES` a row). Its join would then spill, and grow faster than the log; in SQL every
    row costs the same (4 SHA-256 blocks, against a map's hash once per session and a probe per row:
    BENCHMARKS.md, "Session ids pseudonymised row by row past the memory limit")."""
    return n_sessions * MAP_ROW_BYTES > memory.duckdb_bytes() // 2


# --- one file --------------------------------------------------------------------------------


def _ingest_file(path: Path | DatabaseQuery, sha: Optional[str], cfg: DataConfig, key: bytes, stage: Path,
                 now: datetime, known: frozenset[str] = frozenset()) -> FileReport:
    """One source file (or database query, whose ``sha`` is None until its rows are read)."""
    t0 = time.perf_counter()
    preset = PRESETS[cfg.format]
    kind = preset["kind"]
    report = FileReport(source=str(path), sha256=sha)
    con = duckdb.connect()
    # DuckDB spills (raw ids included) go to the system temp dir, never into the workspace
    tmpdir = Path(tempfile.mkdtemp(prefix="purchase-intent-ingest-"))
    try:
        con.execute(f"SET temp_directory = {sql_literal(tmpdir)}")
        memory.configure(con)  # the user's memory limit (spills stay in tmpdir: they hold raw ids)
        # a timestamp written without a zone is read in --ts-zone (default UTC), then stored as UTC
        con.execute(f"SET TimeZone = {sql_literal(cfg.ts_zone or 'UTC')}")
        con.execute("SET enable_progress_bar = false")
        # a Parquet row carries its own number (file_row_number), so DuckDB may read it in any order, and its
        # stored rows have no order (every reader of the events orders what it needs). The other readers number
        # rows with row_number() OVER (), which follows the file only while insertion order is preserved, and
        # their parts keep the file's order (without it, their maps and write were no faster on 2 cores)
        streamed = kind in STREAMED
        con.execute(f"SET preserve_insertion_order = {str(not streamed).lower()}")
        ts_unit = cfg.ts_unit or preset.get("ts_unit")

        def stage_with(src: Source) -> tuple[dict, dict, dict]:
            mapping, events, extras = resolve_columns(cfg, preset, src.columns)
            sql = stage_sql(src, mapping, events, extras, ts_unit, _parse_time(cfg.since), _parse_time(cfg.until),
                             now, cfg.strict_events, cfg.all_events, cfg.ts_format)
            con.execute(f"CREATE TEMP {'VIEW' if streamed else 'TABLE'} staged AS {sql}")
            return mapping, events, extras

        try:
            if isinstance(path, DatabaseQuery):  # the rows of a query (event_database); identified once read
                kind = "database"
                with QueryRows(con, path, lambda cols: resolve_columns(cfg, preset, cols)[0]) as rows:
                    src = rows.source
                    mapping, events, extras = stage_with(src)  # the rows stream in here
                sha, report.manifest = rows.record()
                report.sha256 = sha
            elif kind == "csv":
                try:
                    src = csv_source(con, path, preset)
                    mapping, events, extras = stage_with(src)
                    # a stray quote makes DuckDB read the following lines as one field: read by line instead
                    swallowed = con.execute("SELECT count(*) FROM reject_errors "
                                            "WHERE contains(trim(csv_line, chr(13) || chr(10)), chr(10))").fetchall()
                    if swallowed[0][0]:
                        raise _ReadByLine
                except (duckdb.Error, _ReadByLine):  # e.g. "CSV Parser state machine reached an invalid state"
                    con.execute("DROP TABLE IF EXISTS staged")
                    kind = "csv_lines"
                    src = csv_lines_source(con, path, preset)
                    mapping, events, extras = stage_with(src)
            else:
                read = {"parquet": parquet_source, "ga4": ga4_source, "segment": segment_source}
                src = read[kind](con, path) if kind in read else jsonl_source(con, path, kind)
                mapping, events, extras = stage_with(src)
            # one pass: rows by reason, and accepted rows by the raw event name no map names; a streamed
            # source is read here first, every column of it (so a file that cannot be read fails here)
            touch = "".join(f", count({sql_ident(c)})" for c in
                            ("item_id", "category", *extras.values())) if streamed else ""
            rows_by = con.execute(
                f"SELECT coalesce(reason, ''), CASE WHEN reason IS NULL AND _unmapped THEN {RAW_EVENT} END, "
                f"count(*), approx_count_distinct(session_raw){touch} FROM staged GROUP BY ALL").fetchall()
        except duckdb.Error as e:
            raise ValueError(f"cannot read {path} as {cfg.format}: {_first_line(e)}") from None

        counts, unmapped, n_sessions = {}, {}, 0
        for reason, raw_event, n, sessions, *_ in rows_by:
            counts[reason] = counts.get(reason, 0) + n
            n_sessions += sessions  # an estimate (HyperLogLog), summed over the groups: at least the true count
            if raw_event is not None:
                unmapped[raw_event] = n
        report.accepted = counts.pop("", 0)
        report.filtered = counts.pop("filtered", 0)
        if kind == "csv":
            for reason, n_bad in con.execute(MALFORMED_COUNTS_SQL).fetchall():
                counts[reason] = counts.get(reason, 0) + n_bad
        report.rejected = {r: counts[r] for r in REASONS if counts.get(r)}
        report.rows_read = report.accepted + report.filtered + sum(report.rejected.values())
        report.unmapped = dict(sorted(unmapped.items(), key=lambda kv: (-kv[1], kv[0])))
        if kind == "database" and (sha in known or not report.rows_read):  # the same rows as a load before, or none
            return FileReport(source=str(path), sha256=sha, rows_read=report.rows_read, skipped=True)
        report.samples = _samples(con, src, mapping, report)
        if cfg.strict and report.rejected:
            return report

        # one map per column: the probes of the many rows into the few users' map stay in cache
        sessions_in_sql = sessions_per_row(n_sessions)
        for canon, col, name in (("user_id", "user_raw", "user_map"), ("session_id", "session_raw", "session_map")):
            if name == "session_map" and sessions_in_sql:
                continue
            ids = (distinct_ids_sql(src, mapping, canon) if streamed else
                   f"SELECT DISTINCT {col} FROM staged WHERE {col} IS NOT NULL")
            _pseudonym_map(con, name, ids, key)

        if report.accepted:
            report.part = f"part-{sha[:16]}.parquet"
            extra_sel = "".join(f", s.{sql_ident(n)}" for n in extras.values())
            session_pid, session_join, params = "ms.pid", "LEFT JOIN session_map ms ON s.session_raw = ms.raw", None
            if sessions_in_sql:
                session_pid, session_join = pseudonym_sql("s.session_raw", len(key_chain(key))), ""
                params = pseudonym_params(key)
            storage.copy_to_parquet(con, f"""
                SELECT m.pid AS user_id, s.ts, s.event, s.item_id, s.category, s.price, {session_pid} AS session_id,
                       s.{RAW_EVENT}{extra_sel}
                FROM staged s JOIN user_map m ON s.user_raw = m.raw {session_join}
                WHERE s.reason IS NULL""", stage / report.part, params=params)
        if report.rejected:
            if sessions_in_sql:  # the sessions of the rejected rows only (collect_rejects joins them)
                _pseudonym_map(con, "session_map", "SELECT DISTINCT session_raw FROM staged WHERE session_raw IS NOT "
                                                   "NULL AND reason IS NOT NULL AND reason <> 'filtered'", key)
            rows = collect_rejects(con, src, kind, mapping, key, str(path))
            report.rejects_path = stage / f"{sha[:16]}.csv"
            text = io.StringIO(newline="")
            w = csv.writer(text)
            w.writerow(["source_file", "line", "reason", "raw"])
            w.writerows(rows)
            report.rejects_path.write_bytes(storage.seal(text.getvalue().encode("utf-8")))
    finally:
        con.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
    report.seconds = time.perf_counter() - t0
    return report


class IngestWriteError(RuntimeError):
    """The workspace could not take the ingested events (disk full, read-only); nothing was stored."""


def _io_message(e: BaseException) -> str:
    """One line for an OS or DuckDB I/O error (DuckDB's carries a JSON record after the text)."""
    if isinstance(e, OSError):
        return f"{e.strerror or e}: {e.filename}" if e.filename else str(e)
    text = _first_line(e)
    m = re.search(r'"exception_message":"((?:[^"\\]|\\.)*)"', text)
    return m.group(1).replace('\\"', '"') if m else text


class _ReadByLine(Exception):
    """DuckDB's CSV reader merged lines of a malformed file: read it one line per record."""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _folder_files(path: Path) -> list[Path]:
    """A folder's files in name order (the daily ``events_YYYYMMDD`` files of an export), those of its sub-folders
    too, by their path in it (Segment's S3 archive: ``segment-logs/SOURCE/DAY/*.gz``), or ``[path]``. Names
    starting with ``.`` or ``_`` (``_SUCCESS``, ``.crc`` files) are left out, at any depth."""
    if not path.is_dir():
        return [path]
    files = sorted((f for f in path.rglob("*") if f.is_file()
                    and not any(part.startswith((".", "_")) for part in f.relative_to(path).parts)),
                   key=lambda f: f.relative_to(path).parts)
    if not files:
        raise FileNotFoundError(f"no files in the folder {path}: give the export's files or their folder")
    return files


_GA4_DAY = re.compile(r"events_(intraday_)?(\d{8})(?!\d)")  # (a sharded extract: events_20240301-000000000000.json)


def _without_superseded_intraday(paths: list, progress: bool) -> list:
    """GA4's ``events_intraday_YYYYMMDD`` tables hold a day's events until its daily ``events_YYYYMMDD`` table
    is written, which holds them all again: an intraday file whose daily file is among ``paths`` is left out
    (BigQuery's ``events_*`` wildcard exports both), with a note."""
    days = {m.group(2) for p in paths if isinstance(p, Path) and (m := _GA4_DAY.match(p.name)) and not m.group(1)}
    out = []
    for p in paths:
        m = _GA4_DAY.match(p.name) if isinstance(p, Path) else None
        if m and m.group(1) and m.group(2) in days:
            if progress:
                print(f"skipped {p} (the intraday table of a day whose daily table events_{m.group(2)} is given too, "
                      f"which holds its events)", file=sys.stderr)
            continue
        out.append(p)
    return out


def read_settings(cfg: DataConfig) -> dict:
    """The settings of ``cfg`` that decide what a file's rows become, as they apply (the format's preset merged
    in, a column or event mapped to itself left out, times as UTC ISO text), as the manifest records them with
    each file: format, column and event maps, the timestamp unit, strict event names, the time window."""
    preset = PRESETS[cfg.format]
    mapping = {k: v for k, v in {**preset.get("mapping", {}), **(cfg.mapping or {})}.items() if k != v}
    events = {k: v for k, v in {**preset.get("event_map", {}), **(cfg.event_map or {})}.items() if k != v}
    window = {k: (_parse_time(t).isoformat() if t else None) for k, t in (("since", cfg.since), ("until", cfg.until))}
    return {"format": cfg.format, "mapping": dict(sorted(mapping.items())), "event_map": dict(sorted(events.items())),
            "ts_unit": cfg.ts_unit or preset.get("ts_unit"), "ts_zone": cfg.ts_zone or "UTC",
            "ts_format": cfg.ts_format,
            "all_events": cfg.all_events, "keep_extras": bool(cfg.keep_extras),
            "strict_events": bool(cfg.strict_events), **window}


def _check_same_settings(path: Path, entry: dict, settings: dict) -> None:
    """Raise ValueError (one line) when ``path``, already in the manifest as ``entry``, is given again with
    settings that would read it otherwise: its stored events keep the old ones, so they would not apply."""
    then = entry.get("settings") or {"format": entry.get("format")}  # older manifests record the format only
    changed = [k for k in settings if k in then and then[k] != settings[k]]
    if changed:
        what = "; ".join(f"{k} {then[k]!r} then, {settings[k]!r} now" for k in changed)
        raise ValueError(f"{path} was ingested into this workspace before with other settings ({what}): its "
                         f"events are stored as read then, so the new settings would not apply; nothing was "
                         f"ingested. Ingest it into a new workspace (--workspace NEW) to read it with them")


def _check_not_grown(path: Path, sha: str, entries: list[dict]) -> None:
    """Raise ValueError (one line) when ``path`` was ingested before and has grown since: its first bytes are
    the file of that load (an export rows were appended to), so reading it whole would store the earlier rows
    twice. A file written over with other contents at the same path (the next day's export) is a new file."""
    source = str(path.resolve())
    size = path.stat().st_size
    for e in entries:
        n = e.get("size")
        if e.get("source") != source or not n or n >= size or e.get("sha256") == sha:
            continue
        if _sha256(path, n) == e["sha256"]:
            raise ValueError(f"{path} has grown since it was ingested ({e.get('ingested_at', 'before')}): its first "
                             f"{n:,} bytes are that file, so reading it whole would store those rows twice; nothing "
                             f"was ingested. Ingest only what was appended, e.g. tail -c +{n + 1} {path} > NEW (a "
                             f"CSV's header line first: head -n 1 {path} > NEW, then tail -c +{n + 1} {path} >> NEW), "
                             f"or every file into a new workspace")


def ingest(workspace: Workspace | str | Path, paths: Iterable[str | Path] | str | Path, cfg: DataConfig,
           progress: bool = True, ingest_file: Optional[Callable[..., FileReport]] = None) -> IngestReport:
    """Read, validate, pseudonymise and store raw event files; all files land or none.

    Parameters
    ----------
    workspace : Workspace or path
        Destination workspace.
    paths : path, DatabaseQuery or an iterable of them
        Source files (``.gz`` allowed for CSV and JSONL) or folders of them (each file of a
        folder, in name order, e.g. a GA4 export's ``events_YYYYMMDD`` files), or queries on a
        database (``event_database``).
    cfg : DataConfig
        Format (a preset or ``csv``/``parquet``/``jsonl``), column and event maps, timestamp
        unit, strict mode and the ``since``/``until`` window.
    progress : bool
        Print one line per file to stderr.
    ingest_file : callable, optional
        Reads one file into the stage folder, with the arguments and result of ``_ingest_file`` (DuckDB,
        the default); ``spark_engine.SparkIngest`` does it on Spark. The rest (key, manifest, moving the
        parts into place, all files or none) is the same for every engine.

    Returns
    -------
    IngestReport
        Per-file counts; ``accepted + sum(rejected) + filtered == rows read`` for every file.

    Raises
    ------
    IngestRejectedError
        In strict mode when any row is rejected (the workspace is left unchanged).
    """
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    if cfg.format not in PRESETS:
        raise ValueError(f"unknown format {cfg.format!r}; use one of {sorted(PRESETS)}")
    if cfg.ts_zone:
        try:
            ZoneInfo(cfg.ts_zone)
            duckdb.connect().execute(f"SET TimeZone = {sql_literal(cfg.ts_zone)}")  # Python knows a few DuckDB does not
        except (ZoneInfoNotFoundError, ValueError, duckdb.Error):
            raise ValueError(f"--ts-zone {cfg.ts_zone!r} is not a time zone: give an IANA name such as Europe/Berlin "
                             "or Asia/Shanghai") from None
    if cfg.ts_format:  # a layout DuckDB cannot read fails here, in one line, before any file is read
        try:
            duckdb.connect().execute("SELECT try_strptime('2024-01-01', $f)", {"f": cfg.ts_format}).fetchall()
        except duckdb.Error as e:
            raise ValueError(f"--ts-format {cfg.ts_format!r} is not a strptime layout DuckDB reads ({_first_line(e)}); "
                             "e.g. '%m/%d/%Y %H:%M' or '%d.%m.%Y %H:%M:%S'") from None
    window = {}
    for flag, text in (("since", cfg.since), ("until", cfg.until)):
        try:
            window[flag] = _parse_time(text)
        except ValueError:
            raise ValueError(f"--{flag} {text!r} is not a time: give ISO 8601 (2024-03-01, 2024-03-01T08:00:00+02:00) "
                             f"or epoch seconds") from None
    if window["since"] and window["until"] and window["since"] >= window["until"]:
        raise ValueError(f"--since {cfg.since} is not before --until {cfg.until}: every event would be filtered")
    if isinstance(paths, (str, Path, DatabaseQuery)):
        paths = [paths]
    paths = [p if isinstance(p, DatabaseQuery) else Path(p) for p in paths]
    paths = [f for p in paths for f in (_folder_files(p) if isinstance(p, Path) else [p])]
    if cfg.format == "ga4":
        paths = _without_superseded_intraday(paths, progress)
    for p in paths:
        if isinstance(p, Path) and not p.is_file():
            raise FileNotFoundError(f"no such file: {p}")
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    report = IngestReport()
    try:
        ws.root.mkdir(parents=True, exist_ok=True)
        with ws.lock("ingest"):
            ws.recover()
            manifest = ws.read_manifest()
            key = load_key(ws.root)
            if manifest.get("key_id") and manifest["key_id"] != key_id(key):
                raise ValueError("the pseudonymisation key differs from the one this workspace was built with; "
                                 "set PURCHASE_INTENT_PSEUDONYM_KEY back or use a new workspace")
            known = {e["sha256"] for e in manifest["files"]}
            entry_of = {e["sha256"]: e for e in manifest["files"]}
            settings = read_settings(cfg)
            stage = tmp_path(ws.events_dir / "ingest")
            stage.mkdir(parents=True)
            moved: list[Path] = []
            try:
                for p in paths:
                    if isinstance(p, DatabaseQuery):  # a query is identified by its rows, once read
                        p, sha = p.resumed(manifest, progress), None
                    else:
                        sha = _sha256(p)
                    if sha in known:
                        if sha in entry_of:  # (not a file given twice in this call)
                            _check_same_settings(p, entry_of[sha], settings)
                        report.files.append(FileReport(source=str(p), sha256=sha, skipped=True))
                        if progress:
                            print(f"skipped {p} (already ingested)", file=sys.stderr)
                        continue
                    if isinstance(p, Path):
                        _check_not_grown(p, sha, manifest["files"])
                    fr = (ingest_file or _ingest_file)(p, sha, cfg, key, stage, now, frozenset(known))
                    report.files.append(fr)
                    if fr.skipped:  # a query: the same rows as an earlier load, or none
                        if progress:
                            print(f"skipped {p} ({'already ingested' if fr.rows_read else 'no new rows'})",
                                  file=sys.stderr)
                        continue
                    if isinstance(p, Path):  # the size, so that the file grown by appended rows is known
                        fr.manifest.setdefault("size", p.stat().st_size)
                    known.add(fr.sha256)
                    if progress:
                        print(f"{p}: {fr.accepted:,} accepted, {sum(fr.rejected.values()):,} rejected, "
                              f"{fr.filtered:,} filtered ({fr.seconds:.1f}s)", file=sys.stderr)
                if cfg.strict and report.rejected:
                    raise IngestRejectedError(report)
                new = [f for f in report.files if not f.skipped]
                if new and not any(f.accepted for f in new) and MISREAD.intersection(report.rejected):
                    raise IngestNothingAcceptedError(report)
                if not new:
                    return report
                older = [e for e in manifest["files"] if _reader(e) < READER]
                if older and progress:  # read before ids and event names were read as they are now
                    print(f"note: {len(older)} file(s) of this workspace were read by an earlier version, which "
                          f"{_READER_CHANGES[min(map(_reader, older))]}; to read every file alike, ingest them "
                          "all into a new workspace", file=sys.stderr)
                ws.rejects_dir.mkdir(parents=True, exist_ok=True)
                entries = []
                for f in new:  # move parts and rejects into place; the manifest below commits them
                    if f.part:
                        _fsync_file(stage / f.part)
                        os.replace(stage / f.part, ws.events_dir / f.part)
                        moved.append(ws.events_dir / f.part)
                    rejects = None
                    if f.rejects_path:
                        _fsync_file(f.rejects_path)
                        dest = ws.rejects_dir / f.rejects_path.name
                        os.replace(f.rejects_path, dest)
                        moved.append(dest)
                        f.rejects_path, rejects = dest, f"rejects/{dest.name}"
                    entries.append({**dict(sha256=f.sha256, source=str(Path(f.source).resolve()), format=cfg.format,
                                           settings=settings, reader=READER,
                                           parts=[f.part] if f.part else [], rejects=rejects, rows_read=f.rows_read,
                                           unmapped_events=f.unmapped,
                                           accepted=f.accepted, rejected=f.rejected, filtered=f.filtered,
                                           ingested_at=now.isoformat(timespec="seconds") + "Z"), **f.manifest})
                fsync_dir(ws.events_dir)
                fsync_dir(ws.rejects_dir)
                manifest = {**manifest, "key_id": key_id(key), "files": manifest["files"] + entries}
                atomic_write_json(ws.manifest_path, manifest)
                moved = []
            finally:
                for m in moved:  # the commit did not happen: take back what was moved in
                    m.unlink(missing_ok=True)
                shutil.rmtree(stage, ignore_errors=True)
    except (duckdb.Error, OSError) as e:  # a full disk, a file size limit, a read-only workspace
        if isinstance(e, FileNotFoundError):
            raise
        raise IngestWriteError(f"ingest stopped, nothing was stored: {_io_message(e)}") from e
    return report
