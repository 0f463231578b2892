"""Where raw events come from: the format presets and one reader per file kind.

Each reader turns a source file into a DuckDB relation of text columns (every field read as text,
nothing dropped) plus ``_pos`` (its line or record number), ``_bad`` (the line could not be read as
a record) and ``_raw_text`` (the line as read, where the reader has it). ``events.ingest`` maps,
validates and stores what the reader yields; see :mod:`purchase_intent.events`.

CSV is read by DuckDB's parallel reader; a file it cannot parse (a lone carriage return, a stray
quote that would swallow the following lines) is read again one physical line per record
(``csv_lines_source``), so its bad lines become rejected rows instead of one failure.
"""
from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import duckdb
import pyarrow as pa

# Presets for public schemas. kind: how the file is read; names: columns of a header-less CSV; tz: the time
# zone of the shop's days where the source documents one (day-based cutoffs fall at its midnight).
PRESETS: dict[str, dict] = {
    "taobao": dict(kind="csv", names=["user_id", "item_id", "category_id", "behavior_type", "timestamp"],
                   mapping={"category": "category_id", "event": "behavior_type", "ts": "timestamp"},
                   ts_unit="s", event_map={"pv": "view", "cart": "cart", "fav": "wishlist", "buy": "purchase"},
                   tz="Asia/Shanghai"),  # Tianchi's description: the log's days are China time (UTC+8)
    "retailrocket": dict(kind="csv", mapping={"ts": "timestamp", "user_id": "visitorid", "item_id": "itemid"},
                         ts_unit="ms", event_map={"addtocart": "cart", "transaction": "purchase"}),
    "rees46": dict(kind="csv", mapping={"ts": "event_time", "event": "event_type", "item_id": "product_id",
                                        "category": "category_id", "session_id": "user_session"},
                   ts_unit="iso", event_map={}),
    "otto": dict(kind="otto", mapping={"user_id": "session", "session_id": "session", "item_id": "aid",
                                       "event": "type"},
                 ts_unit="ms", event_map={"clicks": "view", "carts": "cart", "orders": "purchase"}),
    "csv": dict(kind="csv"),
    "parquet": dict(kind="parquet"),
    "jsonl": dict(kind="jsonl"),
}


def preset_time_zone(fmt: str) -> Optional[str]:
    """The time zone a format's source documents for its days (e.g. ``taobao``: Asia/Shanghai), or None."""
    return PRESETS.get(fmt, {}).get("tz")


# --- SQL text ----------------------------------------------------------------------------------


def sql_ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def sql_literal(value: str) -> str:
    """A quoted SQL string literal."""
    return "'" + str(value).replace("'", "''") + "'"


def is_gzip(path: Path) -> bool:
    """True when the file starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


# --- sources: each yields a relation of text columns plus _pos (line) and _bad ---------------


@dataclass
class Source:
    sql: str  # SELECT producing _pos BIGINT, _bad BOOLEAN, _raw_text VARCHAR and the text columns
    columns: list[str]  # source column names, in file order
    pos_is_line: bool  # False for CSV: _pos is the record ordinal, mapped to a line afterwards
    delim: str = ","
    header_lines: int = 0
    read: Optional[str] = None  # CSV: the read_csv(...) call (the rows that parse, as text)


def _header(first: str, delim: str, path: Path) -> list[str]:
    """Column names from a header line; a clear error when it cannot name the columns."""
    try:
        cols = next(csv.reader([first], delimiter=delim, strict=True), [])
    except csv.Error as e:
        raise ValueError(f"{path}: cannot read the header line: {e}") from None
    if not any(c.strip() for c in cols) or "\0" in first:
        raise ValueError(f"{path}: the first line is not a header naming the columns: {first[:80]!r}")
    dupes = sorted({c for c in cols if cols.count(c) > 1})
    if dupes or "" in cols:
        raise ValueError(f"{path}: the header names columns twice or leaves one unnamed: {first[:80]!r}")
    return cols


def csv_source(con: duckdb.DuckDBPyConnection, path: Path, preset: dict) -> Source:
    if "names" in preset:
        cols = preset["names"]
        spec = "{" + ", ".join(f"{sql_literal(c)}: 'VARCHAR'" for c in cols) + "}"
        opts = f"header = false, auto_detect = false, columns = {spec}, delim = ',', quote = '\"', escape = '\"'"
        delim, header = ",", 0
    else:  # the header line names the columns; the delimiter is the most frequent candidate in it
        with (gzip.open if is_gzip(path) else open)(path, "rt", encoding="utf-8-sig", errors="replace",
                                                    newline="") as f:
            first = f.readline().rstrip("\r\n")
        delim = max([",", "\t", ";", "|"], key=first.count)
        cols = _header(first, delim, path)
        header = 1
        spec = "{" + ", ".join(f"{sql_literal(c)}: 'VARCHAR'" for c in cols) + "}"
        opts = (f"header = true, auto_detect = false, columns = {spec}, delim = {sql_literal(delim)}, "
                "quote = '\"', escape = '\"'")
    read = f"read_csv({sql_literal(path)}, {opts}, store_rejects = true, parallel = true)"
    sel = ", ".join(f"CAST({sql_ident(c)} AS VARCHAR) AS {sql_ident(c)}" for c in cols)
    sql = f"SELECT row_number() OVER () AS _pos, false AS _bad, NULL::VARCHAR AS _raw_text, {sel} FROM {read}"
    return Source(sql, cols, pos_is_line=False, delim=delim, header_lines=header, read=read)


def csv_lines_source(con: duckdb.DuckDBPyConnection, path: Path, preset: dict) -> Source:
    """The CSV read one physical line per record: for files DuckDB's CSV reader cannot parse (a stray
    carriage return or quote, a line that swallows the rest of the file into one quoted field).

    Each line is split by Python's ``csv`` module; a line that does not split into exactly the
    columns (or holds a NUL byte, or starts a quoted field it does not close) is ``_bad``, with
    the line as read in ``_raw_text``. A quoted field spanning lines is malformed here.
    """
    lines = read_lines(path)
    numbers, texts = lines.column("line").to_pylist(), lines.column("raw").to_pylist()
    if "names" in preset:
        cols, delim, header = list(preset["names"]), ",", 0
    else:
        if not texts:
            raise ValueError(f"{path}: the file is empty (no header line)")
        first = texts[0].lstrip("\ufeff")
        delim = max([",", "\t", ";", "|"], key=first.count)
        cols = _header(first, delim, path)
        header = numbers[0]
        numbers, texts = numbers[1:], texts[1:]
    values: list[list] = [[] for _ in cols]
    bad = []
    for text in texts:
        try:
            fields = next(csv.reader([text], delimiter=delim, strict=True)) if "\0" not in text else None
        except csv.Error:
            fields = None
        ok = fields is not None and len(fields) == len(cols)
        bad.append(not ok)
        for v, f in zip(values, fields if ok else [None] * len(cols)):
            v.append(f)
    table = pa.table({"_pos": pa.array(numbers, pa.int64()), "_bad": pa.array(bad, pa.bool_()),
                      "_raw_text": pa.array(texts, pa.string()),
                      **{f"c{i}": pa.array(v, pa.string()) for i, v in enumerate(values)}})
    con.register("csv_lines_arrow", table)
    con.execute("CREATE TEMP TABLE csv_lines AS SELECT * FROM csv_lines_arrow")
    con.unregister("csv_lines_arrow")
    sel = "".join(f", c{i} AS {sql_ident(c)}" for i, c in enumerate(cols))
    return Source(f"SELECT _pos, _bad, _raw_text{sel} FROM csv_lines", cols, pos_is_line=True, delim=delim,
                  header_lines=header)


def read_lines(path: Path) -> pa.Table:
    """Non-blank lines of a text file (plain or gzip) with their 1-based line numbers."""
    opener = gzip.open if is_gzip(path) else open
    numbers, lines = [], []
    with opener(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if text.strip():
                numbers.append(i)
                lines.append(text)
    return pa.table({"line": pa.array(numbers, pa.int64()), "raw": pa.array(lines, pa.string())})


def _json_key(key: str) -> str:
    return sql_literal(key) if not key.startswith(("$", "/")) else sql_literal('$."' + key.replace('"', '\\"') + '"')


def jsonl_source(con: duckdb.DuckDBPyConnection, path: Path, kind: str) -> Source:
    con.register("jsonl_lines", read_lines(path))
    con.execute("CREATE TEMP TABLE lines AS SELECT line, raw, ok, CASE WHEN ok THEN raw::JSON END AS j FROM ("
                "SELECT *, CASE WHEN json_valid(raw) THEN json_type(raw) = 'OBJECT' ELSE false END AS ok "
                "FROM jsonl_lines)")
    if kind == "otto":
        cols = ["session", "aid", "ts", "type"]
        sql = ("SELECT line AS _pos, NOT ok OR evs IS NULL AS _bad, "
               "CASE WHEN e IS NULL THEN raw "
               "ELSE '{\"session\":' || coalesce(json_extract(j, '$.session')::VARCHAR, 'null') "
               "|| ',\"events\":[' || e || ']}' END AS _raw_text, "
               "json_extract_string(j, '$.session') AS session, json_extract_string(e, '$.aid') AS aid, "
               "json_extract_string(e, '$.ts') AS ts, json_extract_string(e, '$.type') AS type "
               "FROM (SELECT *, TRY_CAST(json_extract(j, '$.events') AS JSON[]) AS evs FROM lines) "
               "LEFT JOIN LATERAL (SELECT unnest(coalesce(evs, [NULL::JSON])) AS e) ON true")
        # a malformed line (or one without an events array) gives one row with e = NULL
        return Source(sql, cols, pos_is_line=True)
    keys = [r[0] for r in con.execute(
        "SELECT k FROM (SELECT unnest(json_keys(j)) AS k, line FROM lines WHERE ok) GROUP BY k ORDER BY min(line), k"
    ).fetchall()]
    sel = "".join(f", json_extract_string(j, {_json_key(k)}) AS {sql_ident(k)}" for k in keys)
    return Source(f"SELECT line AS _pos, NOT ok AS _bad, raw AS _raw_text{sel} FROM lines", keys, pos_is_line=True)


def parquet_source(con: duckdb.DuckDBPyConnection, path: Path) -> Source:
    read = f"read_parquet({sql_literal(path)}, file_row_number = true)"
    cols = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({sql_literal(path)})").fetchall()]
    sel = ", ".join(f"CAST({sql_ident(c)} AS VARCHAR) AS {sql_ident(c)}" for c in cols)
    return Source(f"SELECT file_row_number + 1 AS _pos, false AS _bad, NULL::VARCHAR AS _raw_text, {sel} FROM {read}",
                   cols, pos_is_line=True)

