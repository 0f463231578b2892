"""Where raw events come from: the format presets and one reader per file kind.

Each reader turns a source file into a DuckDB relation of text columns (every field read as text,
nothing dropped) plus ``_pos`` (its line or record number), ``_bad`` (the line could not be read as
a record), ``_why`` (the reject reason of a bad record where the reader knows a better one than
``malformed_line``) and ``_raw_text`` (the line as read, where the reader has it). ``events.ingest``
maps, validates and stores what the reader yields; see :mod:`purchase_intent.events`.

Nested exports (``ga4``: the Google Analytics 4 BigQuery export; ``segment``: Segment /
RudderStack track calls) are flattened here in SQL, one row per item of ``items[]`` /
``properties.products[]``, into the canonical column names; see :func:`ga4_source` and
:func:`segment_source`.

CSV is read by DuckDB's parallel reader; a file it cannot parse (a lone carriage return, a stray
quote that would swallow the following lines) is read again one physical line per record
(``csv_lines_source``), so its bad lines become rejected rows instead of one failure.
"""
from __future__ import annotations

import csv
import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import duckdb
import pyarrow as pa

from .vocabulary import CANONICAL_COLUMNS

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
    # BigQuery's events_YYYYMMDD rows (Parquet or newline-delimited JSON), flattened by ga4_source; the default
    # event map covers GA4's recommended e-commerce events, every other name is stored as other (raw name kept)
    "ga4": dict(kind="ga4", ts_unit="us",
                event_map={"view_item": "view", "add_to_cart": "cart", "remove_from_cart": "remove_from_cart",
                           "add_to_wishlist": "wishlist", "begin_checkout": "checkout",
                           "add_shipping_info": "checkout", "add_payment_info": "checkout", "purchase": "purchase"}),
    # Segment / RudderStack track calls (JSON Lines) named by the Segment e-commerce spec, flattened by segment_source
    "segment": dict(kind="segment", ts_unit="iso",
                    event_map={"Product Viewed": "view", "Product Added": "cart", "Product Removed": "remove_from_cart",
                               "Product Added to Wishlist": "wishlist", "Checkout Started": "checkout",
                               "Checkout Step Completed": "checkout", "Payment Info Entered": "checkout",
                               "Order Completed": "purchase"}),
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


def _head(path: Path, n: int = 4096) -> bytes:
    """The first ``n`` bytes of the file's content (decompressed when it is gzip)."""
    with (gzip.open if is_gzip(path) else open)(path, "rb") as f:
        return f.read(n)


# files that public shop logs are often downloaded as (a Kaggle zip, an Excel workbook), by their first bytes
_NOT_CSV = [
    (b"PK\x03\x04", "a zip archive (or an Excel .xlsx workbook, which is one): unzip it, or save the sheet as CSV "
                    "(UTF-8), then ingest the CSV"),
    (b"\xd0\xcf\x11\xe0", "an Excel .xls workbook: save the sheet as CSV (UTF-8), then ingest the CSV"),
    (b"BZh", "bzip2-compressed: decompress it (bunzip2) or recompress it with gzip, which ingest reads"),  # + 1AY&SY
    (b"\xfd7zXZ\x00", "xz-compressed: decompress it (unxz) or recompress it with gzip, which ingest reads"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed: decompress it (unzstd) or recompress it with gzip, which ingest reads"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive: extract it, then ingest the CSV"),
]


def check_looks_like_csv(path: Path, header: bool = True) -> None:
    """Raise ValueError (one line) for a file given as CSV that is Parquet or JSON, or empty where a header
    line is expected, naming the --format to use, instead of reading its first bytes as a header. (An empty
    file of a format without a header, e.g. one day of a Taobao log, is 0 rows.)"""
    head = _head(path)
    if not head.strip():
        if header:
            raise ValueError(f"{path} is empty (no header line, no rows)")
        return
    if head.startswith(b"PAR1"):
        raise ValueError(f"{path} is a Parquet file, not CSV: use --format parquet")
    for magic, what in _NOT_CSV:
        if head.startswith(magic) and (magic != b"BZh" or re.match(rb"BZh[1-9]1AY&SY", head)):
            kind, _, advice = what.partition(": ")
            raise ValueError(f"{path} is {kind}, not CSV: {advice}")
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if first in (b"{", b"["):
        raise ValueError(f"{path} looks like JSON, not CSV: use --format jsonl (one JSON object per line), or "
                         f"ga4 / segment for those exports")


# --- sources: each yields a relation of text columns plus _pos (line) and _bad ---------------


@dataclass
class Source:
    sql: str  # SELECT producing _pos BIGINT, _bad BOOLEAN, _raw_text VARCHAR and the text columns
    columns: list[str]  # source column names, in file order
    pos_is_line: bool  # False for CSV: _pos is the record ordinal, mapped to a line afterwards
    delim: str = ","
    header_lines: int = 0
    read: Optional[str] = None  # CSV: the read_csv(...) call (the rows that parse, as text)
    has_why: bool = False  # the SELECT also gives _why VARCHAR: the reason of a _bad record (NULL: malformed_line)
    raw_id_keys: Optional[list[str]] = None  # JSON keys of the raw record holding ids (default: the mapped columns)
    # JSON keys left out of a rejected record (device, location, traits: personal, and not needed to find a bad row)
    raw_drop_keys: tuple[str, ...] = ()
    rejects_as: Optional[str] = None  # the file kind whose raw form a rejected row takes (default: the format's)
    # columns the SELECT gives as numbers (types in EXACT_NUMBERS), not text: ingest reads a timestamp or price
    # of them as the number itself, the same value its text would parse to, and takes their text where it needs it
    numeric: frozenset[str] = frozenset()
    # the DOUBLE columns among them: a whole number's text is the integer's ("1001", not "1001.0"), so that an id
    # column that pandas wrote as float64 (an integer column with a missing value) names its ids as a CSV does
    doubles: frozenset[str] = frozenset()


# number types whose every value is the DOUBLE its text parses to (a FLOAT's or DECIMAL's text is not)
EXACT_NUMBERS = frozenset({"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER",
                           "DOUBLE"})


def text_sql(src: Source, column: str) -> str:
    """SQL giving the source column ``column`` as text (a DOUBLE's whole numbers as integers: ``Source.doubles``)."""
    c = sql_ident(column)
    if column in src.doubles:
        return (f"CASE WHEN {c} = floor({c}) AND abs({c}) < 9007199254740992 THEN CAST(CAST({c} AS BIGINT) AS VARCHAR) "
                f"ELSE CAST({c} AS VARCHAR) END")
    return f"CAST({c} AS VARCHAR)" if column in src.numeric else c


# a field that is a value, never a column's name: a number, or a date or time (2014-04-01T13:45:01.000Z, 1/4/2010)
_DATE_FIELD = re.compile(r"[0-9]{1,4}[-/.][0-9]{1,2}[-/.][0-9]{1,4}([ T][0-9:.+\-Z ]*)?")
_DATA_FIELD = re.compile(rf"[+-]?[0-9]+([.,][0-9]+)?|{_DATE_FIELD.pattern}")


def _header(first: str, delim: str, path: Path) -> list[str]:
    """Column names from a header line; a clear error when it cannot name the columns."""
    try:
        cols = next(csv.reader([first], delimiter=delim, strict=True), [])
    except csv.Error as e:
        raise ValueError(f"{path}: cannot read the header line: {e}") from None
    if not any(c.strip() for c in cols) or "\0" in first:
        raise ValueError(f"{path}: the first line is not a header naming the columns: {first[:80]!r}")
    # numbers and a date: a row of data (pandas' header of numbered columns, 0,1,2,3, has no date); its values,
    # ids among them, are not shown
    if (len(cols) > 1 and all(_DATA_FIELD.fullmatch(c.strip()) for c in cols)
            and any(_DATE_FIELD.fullmatch(c.strip()) for c in cols)):
        raise ValueError(f"{path}: the first line is a row of data (numbers and a date), not a header naming the "
                         f"columns: the file has no header line (Yoochoose's clicks, for one); write one in first, "
                         f"e.g. sed -i '1i session_id,ts,item_id,category' FILE, naming each of its {len(cols)} "
                         f"columns")
    if cols and cols[0] == "" and "" not in cols[1:] and "unnamed_0" not in cols:
        cols[0] = "unnamed_0"  # pandas' to_csv writes its index under an empty name: kept as an extra column
    dupes = sorted({c for c in cols if cols.count(c) > 1})
    if dupes or "" in cols:
        raise ValueError(f"{path}: the header names columns twice or leaves one unnamed: {first[:80]!r}; give "
                         f"every column its own name in the first line")
    return cols


def _excel_sep(line: str) -> str | None:
    """The delimiter an Excel-written CSV names on its first line (``sep=;``), else None."""
    m = re.fullmatch(r"\ufeff?sep=(.)", line.strip("\r\n"))
    return m.group(1) if m else None


def csv_source(con: duckdb.DuckDBPyConnection, path: Path, preset: dict) -> Source:
    check_looks_like_csv(path, header="names" not in preset)
    if "names" in preset:
        cols = preset["names"]
        spec = "{" + ", ".join(f"{sql_literal(c)}: 'VARCHAR'" for c in cols) + "}"
        opts = f"header = false, auto_detect = false, columns = {spec}, delim = ',', quote = '\"', escape = '\"'"
        delim, header = ",", 0
    else:  # the header line names the columns; the delimiter is the most frequent candidate in it
        with (gzip.open if is_gzip(path) else open)(path, "rt", encoding="utf-8-sig", errors="replace",
                                                    newline="") as f:
            first = f.readline().rstrip("\r\n")
            sep = _excel_sep(first)  # Excel's "sep=;" line, then the header
            if sep:
                first = f.readline().rstrip("\r\n")
        delim = sep or max([",", "\t", ";", "|"], key=first.count)
        cols = _header(first, delim, path)
        header = 2 if sep else 1
        spec = "{" + ", ".join(f"{sql_literal(c)}: 'VARCHAR'" for c in cols) + "}"
        opts = (f"header = true, auto_detect = false, columns = {spec}, delim = {sql_literal(delim)}, "
                "quote = '\"', escape = '\"'" + (", skip = 1" if sep else ""))
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
        sep = _excel_sep(texts[0])
        if sep:  # Excel's "sep=;" line
            numbers, texts = numbers[1:], texts[1:]
            if not texts:
                raise ValueError(f"{path}: the file is empty (no header line)")
        first = texts[0].lstrip("\ufeff")
        delim = sep or max([",", "\t", ";", "|"], key=first.count)
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


def check_json_lines(path: Path) -> None:
    """Raise ValueError (one line) for a JSON file that is not one object per line: an array (``[{...}, ...]``,
    as an API or a JSON export writes it) or an object spread over several lines (pretty-printed), which would be
    rejected line by line as malformed."""
    head = _head(path).lstrip(b"\xef\xbb\xbf \t\r\n")
    first = head.split(b"\n", 1)[0].strip()
    if head[:1] == b"[":
        raise ValueError(f"{path} is a JSON array, not JSON Lines (one object per line): convert it, e.g. "
                         f"jq -c '.[]' {path} > {path.stem}.jsonl")
    if first == b"{" or (first.startswith(b"{") and not first.endswith(b"}") and b"\n" in head):
        raise ValueError(f"{path} holds JSON objects over several lines (pretty-printed), not JSON Lines (one "
                         f"object per line): convert it, e.g. jq -c . {path} > {path.stem}.jsonl")


def jsonl_source(con: duckdb.DuckDBPyConnection, path: Path, kind: str) -> Source:
    check_json_lines(path)
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
    """Integer and DOUBLE columns as numbers (``Source.numeric``), every other column as text."""
    read = f"read_parquet({sql_literal(path)}, file_row_number = true)"
    types = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet("
                             f"{sql_literal(path)}))").fetchall())
    cols = list(types)
    numeric = frozenset(c for c, t in types.items() if t in EXACT_NUMBERS)
    sel = ", ".join(sql_ident(c) if c in numeric else f"CAST({sql_ident(c)} AS VARCHAR) AS {sql_ident(c)}"
                    for c in cols)
    return Source(f"SELECT file_row_number + 1 AS _pos, false AS _bad, NULL::VARCHAR AS _raw_text, {sel} FROM {read}",
                  cols, pos_is_line=True, numeric=numeric,
                  doubles=frozenset(c for c in numeric if types[c] == "DOUBLE"))



# --- nested exports: GA4 and Segment ------------------------------------------------------------
# A record whose nested field has the wrong type (items a string, event_params an object, a product
# that is no object) is _bad with _why = 'bad_field_type': rejected with its line, never a crash.
_SCALAR = "('VARCHAR', 'BIGINT', 'UBIGINT', 'DOUBLE', 'NULL')"  # json_type of a usable scalar (or absent: NULL)


def _json_lines(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Temp table ``lines (line, raw, ok, j)``: one JSON object per line (NDJSON, plain or gzip) or per
    Parquet row (its nested columns as JSON, so both encodings go through one flattening)."""
    with open(path, "rb") as f:
        parquet = f.read(4) == b"PAR1"
    if parquet:
        con.execute(f"CREATE TEMP TABLE lines AS SELECT row_number() OVER () AS line, j::VARCHAR AS raw, "
                    f"true AS ok, j FROM (SELECT to_json(t) AS j FROM read_parquet({sql_literal(path)}) t)")
        return
    check_json_lines(path)
    con.register("json_lines", read_lines(path))
    con.execute("CREATE TEMP TABLE lines AS SELECT line, raw, ok, CASE WHEN ok THEN raw::JSON END AS j FROM ("
                "SELECT *, CASE WHEN json_valid(raw) THEN json_type(raw) = 'OBJECT' ELSE false END AS ok "
                "FROM json_lines)")
    con.unregister("json_lines")


def _one_per_item(list_sql: str, checks: str) -> str:
    """``LATERAL`` of the elements of a JSON array (one NULL row when it is empty or absent)."""
    return (f"LEFT JOIN LATERAL (SELECT unnest(CASE WHEN {checks} IS NULL AND len({list_sql}) > 0 "
            f"THEN {list_sql} ELSE [NULL::JSON] END) AS it) ON true")


def _fields(con: duckdb.DuckDBPyConnection, name: str, paths: dict[str, str]) -> None:
    """Temp table ``name``: ``lines`` plus one JSON column per path, all read in one pass over each
    record (each json_* call on the whole record would parse it again)."""
    sel = ", ".join(f"x[{i + 1}] AS {sql_ident(k)}" for i, k in enumerate(paths))
    lst = "[" + ", ".join(sql_literal(v) for v in paths.values()) + "]"
    con.execute(f"CREATE TEMP TABLE {name} AS SELECT * EXCLUDE (x), {sel} FROM "
                f"(SELECT line, raw, ok, json_extract(j, {lst}) AS x FROM lines)")


def _text(col: str) -> str:
    """The text of a JSON scalar (a string unquoted, a number as written), NULL for null or absent."""
    return f"json_extract_string({col}, '$')"


def _wrong(cols: list[str], types: str = _SCALAR) -> str:
    return " OR ".join(f"json_type({c}) NOT IN {types}" for c in cols)


def ga4_source(con: duckdb.DuckDBPyConnection, path: Path) -> Source:
    """One ``events_YYYYMMDD`` file of the GA4 BigQuery export (Parquet or NDJSON) as canonical text columns.

    Per Google's export schema: ``user_id`` when set, else ``user_pseudo_id``; ``event_timestamp``
    (microseconds, an INT64 that BigQuery's JSON export writes as a string); ``event_name``; the
    session is the user + the ``ga_session_id`` event parameter (``value.int_value``, else
    ``string_value``), as ``ga_session_id`` alone is unique only per user (and a session never
    spans two users: a sign-in within a session starts another user there anyway). One event per
    element of ``items[]`` (``item_id``, ``item_category``, ``price``); an event without items is
    one event without an item.
    """
    native = _ga4_parquet(con, path)
    if native is not None:
        return native
    _json_lines(con, path)
    _fields(con, "ga4_fields", {"uid": "$.user_id", "pid": "$.user_pseudo_id", "ts": "$.event_timestamp",
                                "name": "$.event_name", "items": "$.items", "params": "$.event_params"})
    items = "TRY_CAST(items AS JSON[])"
    con.execute(f"""CREATE TEMP TABLE ga4 AS SELECT *, CASE
        WHEN NOT ok THEN 'malformed_line'
        WHEN {_wrong(['items', 'params'], "('ARRAY', 'NULL')")}
          OR list_bool_or(list_transform({items}, lambda x: json_type(x) <> 'OBJECT'))
          OR {_wrong(['uid', 'pid', 'name', 'sid_int', 'sid_str'])} THEN 'bad_field_type'
        WHEN coalesce(NULLIF({_text('uid')}, ''), NULLIF({_text('pid')}, '')) IS NULL THEN 'missing_user'
        END AS why
        FROM (SELECT *, json_extract(sp, '$.value.int_value') AS sid_int,
                     json_extract(sp, '$.value.string_value') AS sid_str
              FROM (SELECT *, list_filter(TRY_CAST(params AS JSON[]),
                                          lambda p: json_extract_string(p, '$.key') = 'ga_session_id')[1] AS sp
                    FROM ga4_fields))""")
    uid = f"coalesce(NULLIF({_text('uid')}, ''), {_text('pid')})"
    sid = f"coalesce({_text('sid_int')}, NULLIF({_text('sid_str')}, ''))"
    sql = f"""SELECT line AS _pos, why IS NOT NULL AS _bad, why AS _why, raw AS _raw_text,
        {uid} AS user_id, {_text('ts')} AS ts, {_text('name')} AS event,
        {_set("json_extract_string(it, '$.item_id')")} AS item_id,
        {_set("json_extract_string(it, '$.item_category')")} AS category,
        json_extract_string(it, '$.price') AS price,
        CASE WHEN {sid} IS NOT NULL THEN {uid} || ':' || {sid} END AS session_id
        FROM ga4 {_one_per_item(items, 'why')}"""
    return Source(sql, list(CANONICAL_COLUMNS), pos_is_line=True, has_why=True,
                  raw_id_keys=GA4_ID_KEYS, raw_drop_keys=GA4_DROP_KEYS)


def _set(text: str) -> str:
    """GA4's placeholder for a value it did not get, ``(not set)``, as missing (not one item of every product)."""
    return f"NULLIF({text}, '(not set)')"


def _ga4_parquet(con: duckdb.DuckDBPyConnection, path: Path) -> Optional[Source]:
    """A Parquet export whose columns have the documented types, flattened from its structs directly
    (5x faster than through JSON); None when a column is missing or of another type (then each
    record goes through JSON, where a field of the wrong type rejects its row). Rejected rows keep
    their flattened fields (the nested record is not rebuilt for them)."""
    with open(path, "rb") as f:
        if f.read(4) != b"PAR1":
            return None
    types = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({sql_literal(path)})").fetchall()}
    if (any(types.get(c) != "VARCHAR" for c in ("user_id", "user_pseudo_id", "event_name"))
            or types.get("event_timestamp") not in ("BIGINT", "UBIGINT", "INTEGER", "DOUBLE", "VARCHAR")):
        return None
    uid = "coalesce(NULLIF(user_id, ''), user_pseudo_id)"
    sid = "coalesce(CAST(sv.int_value AS VARCHAR), NULLIF(sv.string_value, ''))"
    sql = f"""SELECT line AS _pos, false AS _bad, NULL::VARCHAR AS _why, NULL::VARCHAR AS _raw_text,
        {uid} AS user_id, CAST(event_timestamp AS VARCHAR) AS ts, event_name AS event,
        {_set("CAST(it.item_id AS VARCHAR)")} AS item_id, {_set("CAST(it.item_category AS VARCHAR)")} AS category,
        CAST(it.price AS VARCHAR) AS price, CASE WHEN {sid} IS NOT NULL THEN {uid} || ':' || {sid} END AS session_id
        FROM (SELECT row_number() OVER () AS line, user_id, user_pseudo_id, event_timestamp, event_name, items,
                     list_filter(event_params, lambda p: p.key = 'ga_session_id')[1].value AS sv
              FROM read_parquet({sql_literal(path)}))
        LEFT JOIN LATERAL (SELECT unnest(CASE WHEN len(items) > 0 THEN items ELSE [NULL] END) AS it) ON true"""
    try:  # binding checks every column and type the query reads
        con.execute(f"DESCRIBE {sql}")
    except duckdb.Error:
        return None
    return Source(sql, list(CANONICAL_COLUMNS), pos_is_line=True, rejects_as="parquet")


# the keys of a rejected record whose values are ids (pseudonymised) or hold personal data (dropped), at any
# depth of the record (a Segment batch body nests its calls): what the rejects file never keeps as sent
GA4_ID_KEYS = ["user_id", "user_pseudo_id"]
GA4_DROP_KEYS = ("user_properties", "device", "geo", "privacy_info", "collected_traffic_source",
                 "session_traffic_source_last_click")  # (the last two hold ad click ids: gclid, dclid)
SEGMENT_ID_KEYS = ["userId", "anonymousId", "previousId", "rudderId", "groupId"]
SEGMENT_DROP_KEYS = ("context", "traits", "request_ip")


def segment_source(con: duckdb.DuckDBPyConnection, path: Path) -> Source:
    """Segment / RudderStack track calls (JSON Lines) as canonical text columns.

    ``userId``, or ``anonymousId`` when it is empty; ``timestamp`` (ISO 8601); ``event`` (a
    ``page`` / ``screen`` call: its type, so it is stored as other; ``identify``, ``group`` and
    ``alias`` calls are no behaviour and are rejected as ``not_an_event``); one event per element of
    ``properties.products[]`` (``product_id``, else ``id``; ``category``; ``price``), else
    ``properties.product_id`` / ``category`` / ``price``. The session is RudderStack's
    ``context.sessionId`` where present (Segment's spec has none), per user. A call whose ``messageId`` an
    earlier line of the file has (Segment delivers at least once, and its archives keep the retries) is
    rejected as ``duplicate_message``.
    """
    _json_lines(con, path)
    _fields(con, "seg_fields", {"uid": "$.userId", "aid": "$.anonymousId", "ts": "$.timestamp", "name": "$.event",
                                "type": "$.type", "props": "$.properties", "products": "$.properties.products",
                                "sid": "$.context.sessionId", "ots": "$.originalTimestamp", "rat": "$.receivedAt",
                                "mid": "$.messageId"})
    products = "TRY_CAST(products AS JSON[])"
    con.execute(f"""CREATE TEMP TABLE seg AS SELECT *, CASE
        WHEN NOT ok THEN 'malformed_line'
        WHEN {_wrong(['props'], "('OBJECT', 'NULL')")} OR {_wrong(['products'], "('ARRAY', 'NULL')")}
          OR list_bool_or(list_transform({products}, lambda x: json_type(x) <> 'OBJECT'))
          OR {_wrong(['uid', 'aid', 'name', 'ts', 'type', 'sid'])} THEN 'bad_field_type'
        WHEN lower({_text('type')}) IN ('identify', 'group', 'alias') THEN 'not_an_event'
        WHEN coalesce(NULLIF({_text('uid')}, ''), NULLIF({_text('aid')}, '')) IS NULL THEN 'missing_user'
        WHEN {_text('mid')} IS NOT NULL
          AND row_number() OVER (PARTITION BY {_text('mid')} ORDER BY line) > 1 THEN 'duplicate_message'
        END AS why FROM seg_fields""")
    uid = f"coalesce(NULLIF({_text('uid')}, ''), {_text('aid')})"
    event = (f"coalesce({_text('name')}, CASE WHEN lower({_text('type')}) IN ('page', 'screen') "
             f"THEN lower({_text('type')}) END)")
    sid = f"NULLIF({_text('sid')}, '')"

    def prop(key: str) -> str:  # a product's own field; the top-level property of an event without products[]
        return (f"CASE WHEN it IS NULL THEN json_extract_string(props, '$.{key}') "
                f"ELSE json_extract_string(it, '$.{key}') END")
    # the spec's timestamp, which Segment sets from receivedAt and the client's clock; a call stored without it
    # (a raw HTTP API body) is read at its originalTimestamp, else when it was received
    ts = f"coalesce({_text('ts')}, {_text('ots')}, {_text('rat')})"
    sql = f"""SELECT line AS _pos, why IS NOT NULL AS _bad, why AS _why, raw AS _raw_text,
        {uid} AS user_id, {ts} AS ts, {event} AS event,
        coalesce(json_extract_string(it, '$.product_id'), json_extract_string(it, '$.id'),
                 json_extract_string(props, '$.product_id')) AS item_id,
        {prop('category')} AS category, {prop('price')} AS price,
        CASE WHEN {sid} IS NOT NULL THEN {uid} || ':' || {sid} END AS session_id
        FROM seg {_one_per_item(products, 'why')}"""
    return Source(sql, list(CANONICAL_COLUMNS), pos_is_line=True, has_why=True, raw_id_keys=SEGMENT_ID_KEYS,
                  raw_drop_keys=SEGMENT_DROP_KEYS)
