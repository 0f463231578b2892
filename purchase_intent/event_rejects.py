"""Rejected rows of an ingest: where each one is in its file and what it held, without raw ids.

Line numbers are 1-based physical lines of the source file (JSONL and CSV) or 1-based row
numbers (Parquet, a database query). For CSV, rows that DuckDB cannot parse carry DuckDB's own line number; other
rejected rows are located from their position in the file, which counts one line per record: a
quoted field spanning several lines, or a blank line in the middle of the file, shifts the line
numbers reported for later rows. A CSV read line by line (when DuckDB cannot parse it) reports
exact physical lines.

Raw ids never reach the workspace: in ``rejects/*.csv`` the ``raw`` column has the user and
session fields replaced by their pseudonyms wherever the field can be located (always for rows
that parsed; for unparsable lines when splitting on the delimiter finds the field, else the line
is kept as read).
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import re
from pathlib import Path
from typing import Optional

from .event_sources import Source, is_gzip, read_lines
from .privacy import pseudonymise_raw


def _substitute_fields(fields: list, idx: dict[int, Optional[str]]) -> list:
    return [idx[i] if i in idx and idx[i] is not None and v is not None else v for i, v in enumerate(fields)]


def _substitute_line(text: str, delim: str, id_idx: list[int], key: bytes) -> str:
    """An unparsable line with its id fields pseudonymised where splitting on the delimiter finds them."""
    if '"' in text:
        return text
    fields = text.split(delim)
    present = {i: fields[i] for i in id_idx if i < len(fields) and fields[i]}
    if not present:
        return text
    pids = dict(zip(present, pseudonymise_raw(list(present.values()), key)))
    return delim.join(_substitute_fields(fields, pids))


def _join_csv(fields: list, delim: str) -> str:
    buf = io.StringIO()
    csv.writer(buf, delimiter=delim, lineterminator="").writerow(["" if v is None else v for v in fields])
    return buf.getvalue()


def _substitute_json(text: str, keys: list[str], key: bytes, drop: tuple[str, ...] = ()) -> str:
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if not isinstance(obj, (dict, list)):  # unparsable: replace `"key": "value"` / `"key": 123` textually
        for k in keys:
            pattern = r'("%s"\s*:\s*)("((?:[^"\\]|\\.)*)"|-?[0-9][0-9.eE+-]*)' % re.escape(k)
            text = re.sub(pattern, lambda m: m.group(1) + '"' + pseudonymise_raw(
                [m.group(3) if m.group(3) is not None else m.group(2)], key)[0] + '"', text)
        return text
    return json.dumps(_substitute_obj(obj, set(keys), set(drop), key), separators=(",", ":"))


def _substitute_obj(obj, keys: set[str], drop: set[str], key: bytes):
    """``obj`` with the values of ``keys`` pseudonymised and ``drop`` removed at any depth (a Segment batch
    body nests its calls, each with its userId and context)."""
    if isinstance(obj, list):
        return [_substitute_obj(v, keys, drop, key) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for k, v in obj.items():
        if k in drop:
            continue
        if k in keys and v is not None:  # (an id that is an object, a bad_field_type, is pseudonymised whole)
            out[k] = pseudonymise_raw([str(v)], key)[0]
        else:
            out[k] = _substitute_obj(v, keys, drop, key)
    return out


def _lines_as_text(path: str, numbers: set[int]) -> dict[int, str]:
    """The physical lines ``numbers`` of the file ``path`` (plain or gzip), bytes that are not UTF-8 replaced by
    U+FFFD: for a line DuckDB rejects as not UTF-8, whose text it reports with the byte after a bad one dropped
    (often the delimiter, which would shift the fields and leave an id unpseudonymised)."""
    table = read_lines(Path(path))
    return {n: t for n, t in zip(table.column("line").to_pylist(), table.column("raw").to_pylist()) if n in numbers}


def _open_text(path: str):
    opener = gzip.open if is_gzip(Path(path)) else open
    return io.TextIOWrapper(opener(path, "rb"), encoding="utf-8", errors="replace", newline="")


def _lines_to_last_record(path: str) -> int:
    """The physical lines up to the file's last line that is not empty (trailing empty lines hold no record)."""
    last = 0
    with (gzip.open if is_gzip(Path(path)) else open)(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip(b"\r\n"):
                last = n
    return last


def _record_lines(path: str, delim: str, header_lines: int, malformed: set[int], ordinals: set[int]
                  ) -> tuple[dict[int, int], dict[int, int]]:
    """The physical line each record starts on, read with Python's csv module (which follows a quoted field
    across lines): for the parsed records ``ordinals`` (1-based among the records DuckDB's CSV reader keeps)
    and for DuckDB's ``malformed`` line numbers, which count a record spanning lines once and a blank line as
    one."""
    by_ordinal: dict[int, int] = {}
    by_line: dict[int, int] = {}
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter=delim)
        last, k = 0, 0
        for r, fields in enumerate(reader, 1):
            start, last = last + 1, reader.line_num
            if r <= header_lines:
                continue
            duck_line = r  # DuckDB's number: the header's lines, then one per record or blank line
            if duck_line in malformed:
                by_line[duck_line] = start
            elif fields:
                k += 1
                if k in ordinals:
                    by_ordinal[k] = start
            if len(by_ordinal) == len(ordinals) and len(by_line) == len(malformed):
                break
    return by_ordinal, by_line


def collect_rejects(con, src: Source, kind: str, mapping: dict, key: bytes, source: str) -> list[tuple]:
    """Rows (source_file, line, reason, raw) of every rejected row, ordered by line."""
    kind = src.rejects_as or kind
    id_cols = [mapping[c] for c in ("user_id", "session_id") if c in mapping]
    id_idx = [src.columns.index(c) for c in id_cols]
    semantic = con.execute(
        "SELECT s._pos, s.reason, s._raw_list, s._raw_text, m.pid, ms.pid FROM staged s "
        "LEFT JOIN user_map m ON s.user_raw = m.raw LEFT JOIN session_map ms ON s.session_raw = ms.raw "
        "WHERE s.reason IS NOT NULL AND s.reason <> 'filtered' ORDER BY s._pos").fetchall()
    malformed: list[tuple[int, str]] = []
    if kind == "csv":
        malformed = con.execute("SELECT line, any_value(csv_line), bool_or(error_type = 'INVALID ENCODING') "
                                "FROM reject_errors GROUP BY line ORDER BY line").fetchall()
    out, j = [], 0
    record_line: dict[int, int] = {}  # record ordinal -> physical line, where they differ
    malformed_line: dict[int, int] = {}  # DuckDB's line of a malformed record -> physical line
    if kind == "csv" and (semantic or malformed):  # a record that spans lines (a quoted newline), a blank line
        n_records = con.execute("SELECT count(*) FROM staged").fetchall()[0][0]
        if _lines_to_last_record(source) != src.header_lines + n_records + len(malformed):
            try:
                record_line, malformed_line = _record_lines(source, src.delim, src.header_lines,
                                                            {m[0] for m in malformed}, {int(r[0]) for r in semantic})
            except csv.Error:  # a field longer than Python's csv reads (131,072 characters): the record numbers
                record_line, malformed_line = {}, {}
    for pos, reason, raw_list, raw_text, upid, spid in semantic:
        if src.pos_is_line:
            line = pos
        elif pos in record_line:
            line = record_line[pos]
        else:  # record ordinal -> line: skip the header and the unparsable lines before it
            line = src.header_lines + pos + j
            while j < len(malformed) and malformed[j][0] <= line:
                j += 1
                line = src.header_lines + pos + j
        pids = dict(zip(id_idx, [upid, spid][: len(id_idx)]))
        if kind in ("jsonl", "otto", "ga4", "segment"):
            raw = _substitute_json(raw_text, src.raw_id_keys if src.raw_id_keys is not None else id_cols, key,
                                   src.raw_drop_keys)
        elif kind == "csv_lines" and reason == "malformed_line":  # a line that did not split into the columns
            raw = _substitute_line(raw_text, src.delim, id_idx, key)
        elif kind in ("parquet", "database"):
            raw = json.dumps(dict(zip(src.columns, _substitute_fields(raw_list, pids))), separators=(",", ":"))
        else:
            raw = _join_csv(_substitute_fields(raw_list, pids), src.delim)
        out.append((source, line, reason, raw))
    as_read = _lines_as_text(source, {malformed_line.get(line, line) for line, _, not_utf8 in malformed
                                      if not_utf8}) if any(m[2] for m in malformed) else {}
    for line, text, not_utf8 in malformed:
        line = malformed_line.get(line, line)
        out.append((source, line, "not_utf8" if not_utf8 else "malformed_line",
                    _substitute_line(as_read.get(line, text) if not_utf8 else text, src.delim, id_idx, key)))
    out.sort(key=lambda r: r[1])
    return out

