"""Ingest raw behaviour logs into the workspace as canonical, pseudonymised events.

    purchase-intent ingest UserBehavior.csv.gz --format taobao
    purchase-intent ingest events.csv --format csv --map user_id=visitor --event-map addtocart=cart

One pass per source file, all in DuckDB SQL: read every field as text, map columns and event
names, validate each row with one CASE expression (the first failing check is its reason),
pseudonymise the distinct user and session ids, and write accepted rows to one Parquet part.
Every row read ends up accepted, rejected (with a reason, its line number and raw content in
``rejects/<sha>.csv``) or filtered (outside ``since``/``until``); nothing is dropped silently.

A command commits atomically: parts and reject files are built in a temporary directory, moved
into place, and the manifest is replaced last (the commit point). A file whose content sha256
is already in the manifest is skipped.

Line numbers are 1-based physical lines of the source file (JSONL and CSV) or 1-based row
numbers (Parquet). For CSV, rows that DuckDB cannot parse carry DuckDB's own line number; other
rejected rows are located from their position in the file, which counts one line per record: a
quoted field spanning several lines, or a blank line in the middle of the file, shifts the line
numbers reported for later rows.

Raw ids never reach the workspace: in ``rejects/*.csv`` the ``raw`` column has the user and
session fields replaced by their pseudonyms wherever the field can be located (always for rows
that parsed; for unparsable lines when splitting on the delimiter finds the field, else the line
is kept as read).
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Optional

import duckdb
import pyarrow as pa

from purchase_intent.config import CANONICAL_COLUMNS, CANONICAL_EVENTS, DataConfig
from purchase_intent.privacy import key_id, load_key, pseudonym_table, pseudonymise
from purchase_intent.workspace import Workspace, atomic_write_json, fsync_dir, tmp_path

REASONS = ("malformed_line", "missing_user", "missing_ts", "bad_ts", "implausible_ts",
           "unknown_event", "bad_price", "negative_price")
MIN_TS = datetime(1990, 1, 1)
_MULT = {"s": 1e6, "ms": 1e3, "us": 1.0}

# Presets for public schemas. kind: how the file is read; names: columns of a header-less CSV.
PRESETS: dict[str, dict] = {
    "taobao": dict(kind="csv", names=["user_id", "item_id", "category_id", "behavior_type", "timestamp"],
                   mapping={"category": "category_id", "event": "behavior_type", "ts": "timestamp"},
                   ts_unit="s", event_map={"pv": "view", "cart": "cart", "fav": "wishlist", "buy": "purchase"}),
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


class IngestRejectedError(ValueError):
    """Strict mode: some rows were rejected, so nothing was stored."""

    def __init__(self, report: "IngestReport"):
        self.report = report
        super().__init__("strict mode: rows were rejected, nothing was stored\n" + report.summary())


@dataclass
class FileReport:
    source: str
    sha256: str
    rows_read: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    filtered: int = 0
    skipped: bool = False
    part: Optional[str] = None
    rejects_path: Optional[Path] = None
    seconds: float = 0.0


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
    def skipped(self) -> list[str]:
        return [f.source for f in self.files if f.skipped]

    @property
    def rejects_paths(self) -> list[Path]:
        return [f.rejects_path for f in self.files if f.rejects_path is not None]

    def summary(self) -> str:
        """Accepted, rejected by reason, filtered and skipped counts, one line each."""
        rej = self.rejected
        lines = [f"accepted  {self.accepted:>12,}",
                 f"rejected  {sum(rej.values()):>12,}" + "".join(f"\n  {k:<16}{v:>10,}" for k, v in rej.items()),
                 f"filtered  {self.filtered:>12,}"]
        if self.skipped:
            lines.append(f"skipped   {len(self.skipped):>12,} file(s) already ingested")
        lines += [f"rejects:  {p}" for p in self.rejects_paths]
        return "\n".join(lines)


# --- SQL helpers ---------------------------------------------------------------------------


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def snake_case(name: str) -> str:
    s = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name.strip())
    s = re.sub(r"[^0-9a-zA-Z]+", "_", s).strip("_").lower()
    return s if s and not s[0].isdigit() else f"x_{s}"


def _parse_time(text: Optional[str]) -> Optional[datetime]:
    if not text:
        return None
    t = datetime.fromisoformat(text.strip().replace(" UTC", "+00:00"))
    return t.astimezone(timezone.utc).replace(tzinfo=None) if t.tzinfo else t


def _ts_sql(col: str, num: str, unit: Optional[str]) -> str:
    """SQL turning a text timestamp ``col`` (``num``: the same as DOUBLE, or NULL) into TIMESTAMP
    (UTC): epoch numbers by unit (or by magnitude when the unit is unknown: < 1e11 seconds,
    < 1e14 milliseconds, else microseconds), other text as ISO 8601 (a zone-less time is UTC)."""
    mult = (str(_MULT[unit]) if unit in _MULT else
            f"(CASE WHEN abs({num}) < 1e11 THEN 1e6 WHEN abs({num}) < 1e14 THEN 1e3 ELSE 1 END)")
    return (f"(CASE WHEN {num} IS NOT NULL THEN TRY(make_timestamp(TRY_CAST(round({num} * {mult}) AS BIGINT))) "
            f"ELSE TRY_CAST({col} AS TIMESTAMPTZ) AT TIME ZONE 'UTC' END)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


# --- sources: each yields a relation of text columns plus _pos (line) and _bad ---------------


@dataclass
class _Source:
    sql: str  # SELECT producing _pos BIGINT, _bad BOOLEAN, _raw_text VARCHAR and the text columns
    columns: list[str]  # source column names, in file order
    pos_is_line: bool  # False for CSV: _pos is the record ordinal, mapped to a line afterwards
    delim: str = ","
    header_lines: int = 0
    read: Optional[str] = None  # CSV: the read_csv(...) call (the rows that parse, as text)


def _csv_source(con: duckdb.DuckDBPyConnection, path: Path, preset: dict) -> _Source:
    if "names" in preset:
        cols = preset["names"]
        spec = "{" + ", ".join(f"{_lit(c)}: 'VARCHAR'" for c in cols) + "}"
        opts = f"header = false, auto_detect = false, columns = {spec}, delim = ',', quote = '\"', escape = '\"'"
        delim, header = ",", 0
    else:  # the header line names the columns; the delimiter is the most frequent candidate in it
        with (gzip.open if _is_gzip(path) else open)(path, "rt", encoding="utf-8-sig", newline="") as f:
            first = f.readline()
        delim = max([",", "\t", ";", "|"], key=first.count)
        cols = next(csv.reader([first.rstrip("\r\n")], delimiter=delim))
        header = 1
        spec = "{" + ", ".join(f"{_lit(c)}: 'VARCHAR'" for c in cols) + "}"
        opts = (f"header = true, auto_detect = false, columns = {spec}, delim = {_lit(delim)}, "
                "quote = '\"', escape = '\"'")
    read = f"read_csv({_lit(path)}, {opts}, store_rejects = true, parallel = true)"
    sel = ", ".join(f"CAST({_q(c)} AS VARCHAR) AS {_q(c)}" for c in cols)
    sql = f"SELECT row_number() OVER () AS _pos, false AS _bad, NULL::VARCHAR AS _raw_text, {sel} FROM {read}"
    return _Source(sql, cols, pos_is_line=False, delim=delim, header_lines=header, read=read)


def _read_lines(path: Path) -> pa.Table:
    """Non-blank lines of a text file (plain or gzip) with their 1-based line numbers."""
    opener = gzip.open if _is_gzip(path) else open
    numbers, lines = [], []
    with opener(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if text.strip():
                numbers.append(i)
                lines.append(text)
    return pa.table({"line": pa.array(numbers, pa.int64()), "raw": pa.array(lines, pa.string())})


def _json_key(key: str) -> str:
    return _lit(key) if not key.startswith(("$", "/")) else _lit('$."' + key.replace('"', '\\"') + '"')


def _jsonl_source(con: duckdb.DuckDBPyConnection, path: Path, kind: str) -> _Source:
    con.register("jsonl_lines", _read_lines(path))
    con.execute("CREATE TEMP TABLE lines AS SELECT line, raw, ok, CASE WHEN ok THEN raw::JSON END AS j FROM ("
                "SELECT *, CASE WHEN json_valid(raw) THEN json_type(raw) = 'OBJECT' ELSE false END AS ok FROM jsonl_lines)")
    if kind == "otto":
        cols = ["session", "aid", "ts", "type"]
        sql = ("SELECT line AS _pos, NOT ok OR evs IS NULL AS _bad, "
               "CASE WHEN e IS NULL THEN raw ELSE '{\"session\":' || coalesce(json_extract(j, '$.session')::VARCHAR, 'null') "
               "|| ',\"events\":[' || e || ']}' END AS _raw_text, "
               "json_extract_string(j, '$.session') AS session, json_extract_string(e, '$.aid') AS aid, "
               "json_extract_string(e, '$.ts') AS ts, json_extract_string(e, '$.type') AS type "
               "FROM (SELECT *, TRY_CAST(json_extract(j, '$.events') AS JSON[]) AS evs FROM lines) "
               "LEFT JOIN LATERAL (SELECT unnest(coalesce(evs, [NULL::JSON])) AS e) ON true")
        # a malformed line (or one without an events array) gives one row with e = NULL
        return _Source(sql, cols, pos_is_line=True)
    keys = [r[0] for r in con.execute(
        "SELECT k FROM (SELECT unnest(json_keys(j)) AS k, line FROM lines WHERE ok) GROUP BY k ORDER BY min(line), k"
    ).fetchall()]
    sel = "".join(f", json_extract_string(j, {_json_key(k)}) AS {_q(k)}" for k in keys)
    return _Source(f"SELECT line AS _pos, NOT ok AS _bad, raw AS _raw_text{sel} FROM lines", keys, pos_is_line=True)


def _parquet_source(con: duckdb.DuckDBPyConnection, path: Path) -> _Source:
    read = f"read_parquet({_lit(path)}, file_row_number = true)"
    cols = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({_lit(path)})").fetchall()]
    sel = ", ".join(f"CAST({_q(c)} AS VARCHAR) AS {_q(c)}" for c in cols)
    return _Source(f"SELECT file_row_number + 1 AS _pos, false AS _bad, NULL::VARCHAR AS _raw_text, {sel} FROM {read}",
                   cols, pos_is_line=True)


def _resolve(cfg: DataConfig, preset: dict, columns: list[str]) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(canonical -> source column, raw event -> canonical event, extra source column -> name)."""
    mapping = {**preset.get("mapping", {}), **cfg.mapping}
    for c in CANONICAL_COLUMNS:
        if c not in mapping and c in columns:
            mapping[c] = c
    unknown = sorted(set(mapping) - set(CANONICAL_COLUMNS))
    if unknown:
        raise ValueError(f"--map names unknown canonical columns {unknown}; use {list(CANONICAL_COLUMNS)}")
    for canon, src in mapping.items():
        if src not in columns:
            raise ValueError(f"column {src!r} (for {canon}) is not in the file; its columns are {columns}")
    missing = [c for c in ("user_id", "ts", "event") if c not in mapping]
    if missing:
        raise ValueError(f"no column for {missing}; map them with --map {missing[0]}=COLUMN (columns: {columns})")
    events = {**{e: e for e in CANONICAL_EVENTS}, **preset.get("event_map", {}), **cfg.event_map}
    bad = sorted({v for v in events.values() if v not in CANONICAL_EVENTS})
    if bad:
        raise ValueError(f"--event-map targets {bad} are not canonical events {list(CANONICAL_EVENTS)}")
    taken, extras = set(CANONICAL_COLUMNS), {}
    for c in columns:
        if c in mapping.values():
            continue
        name = snake_case(c)
        while name in taken:
            name += "_extra"
        taken.add(name)
        extras[c] = name
    return mapping, events, extras


def _stage_sql(src: _Source, mapping: dict[str, str], events: dict[str, str], extras: dict[str, str],
               ts_unit: Optional[str], since: Optional[datetime], until: Optional[datetime], now: datetime) -> str:
    def col(canon: str) -> str:
        return _q(mapping[canon]) if canon in mapping else "NULL::VARCHAR"

    ev_case = "CASE trim(" + col("event") + ") " + " ".join(
        f"WHEN {_lit(k)} THEN {_lit(v)}" for k, v in events.items()) + " END"
    raw_list = "[" + ", ".join(_q(c) for c in src.columns) + "]"
    window = ""
    if since:
        window += f" OR _ts < TIMESTAMP {_lit(since)}"
    if until:
        window += f" OR _ts >= TIMESTAMP {_lit(until)}"
    window = f"WHEN {window[4:]} THEN 'filtered'" if window else ""
    extra_sel = "".join(f", {_q(c)} AS {_q(n)}" for c, n in extras.items())
    return f"""
    SELECT _pos, _user AS user_raw, _ts AS ts, _event AS event, _item AS item_id, _cat AS category,
           _price AS price, _session AS session_raw{extra_sel}, _reason AS reason,
           CASE WHEN _reason IS NOT NULL AND _reason <> 'filtered' THEN {raw_list} END AS _raw_list,
           CASE WHEN _reason IS NOT NULL AND _reason <> 'filtered' THEN _raw_text END AS _raw_text
    FROM (
      SELECT *, CASE
        WHEN _bad THEN 'malformed_line'
        WHEN _user IS NULL THEN 'missing_user'
        WHEN _ts_raw IS NULL THEN 'missing_ts'
        WHEN _ts IS NULL THEN 'bad_ts'
        WHEN _ts < TIMESTAMP {_lit(MIN_TS)} OR _ts > TIMESTAMP {_lit(now + timedelta(days=1))} THEN 'implausible_ts'
        WHEN _event IS NULL THEN 'unknown_event'
        WHEN _price_raw IS NOT NULL AND (_price IS NULL OR NOT isfinite(_price)) THEN 'bad_price'
        WHEN _price < 0 THEN 'negative_price'
        {window}
      END AS _reason
      FROM (
        SELECT *, {_ts_sql("_ts_raw", "_ts_num", ts_unit)} AS _ts, {ev_case} AS _event,
               TRY_CAST(_price_raw AS DOUBLE) AS _price
        FROM (  -- each text field is trimmed and parsed once
          SELECT *, NULLIF(trim({col('user_id')}), '') AS _user, NULLIF(trim({col('ts')}), '') AS _ts_raw,
                 TRY_CAST(NULLIF(trim({col('ts')}), '') AS DOUBLE) AS _ts_num,
                 NULLIF(trim({col('price')}), '') AS _price_raw,
                 NULLIF({col('item_id')}, '') AS _item, NULLIF({col('category')}, '') AS _cat,
                 NULLIF(trim({col('session_id')}), '') AS _session
          FROM ({src.sql})
        )
      )
    )"""


# --- rejects ---------------------------------------------------------------------------------


def _substitute_fields(fields: list, idx: dict[int, Optional[str]]) -> list:
    return [idx[i] if i in idx and idx[i] is not None and v is not None else v for i, v in enumerate(fields)]


def _join_csv(fields: list, delim: str) -> str:
    buf = io.StringIO()
    csv.writer(buf, delimiter=delim, lineterminator="").writerow(["" if v is None else v for v in fields])
    return buf.getvalue()


def _substitute_json(text: str, keys: list[str], key: bytes) -> str:
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):  # unparsable: replace `"key": "value"` / `"key": 123` textually
        for k in keys:
            pattern = r'("%s"\s*:\s*)("((?:[^"\\]|\\.)*)"|-?[0-9][0-9.eE+-]*)' % re.escape(k)
            text = re.sub(pattern, lambda m: m.group(1) + '"' + pseudonymise(
                [m.group(3) if m.group(3) is not None else m.group(2)], key)[0] + '"', text)
        return text
    for k in keys:
        if obj.get(k) is not None:
            obj[k] = pseudonymise([str(obj[k])], key)[0]
    return json.dumps(obj, separators=(",", ":"))


def _collect_rejects(con, src: _Source, kind: str, mapping: dict, key: bytes, source: str) -> list[tuple]:
    """Rows (source_file, line, reason, raw) of every rejected row, ordered by line."""
    id_cols = [mapping[c] for c in ("user_id", "session_id") if c in mapping]
    id_idx = [src.columns.index(c) for c in id_cols]
    semantic = con.execute(
        "SELECT s._pos, s.reason, s._raw_list, s._raw_text, m.pid, ms.pid FROM staged s "
        "LEFT JOIN user_map m ON s.user_raw = m.raw LEFT JOIN session_map ms ON s.session_raw = ms.raw "
        "WHERE s.reason IS NOT NULL AND s.reason <> 'filtered' ORDER BY s._pos").fetchall()
    malformed: list[tuple[int, str]] = []
    if kind == "csv":
        malformed = con.execute("SELECT line, any_value(csv_line) FROM reject_errors GROUP BY line ORDER BY line").fetchall()
    out, j = [], 0
    for pos, reason, raw_list, raw_text, upid, spid in semantic:
        if src.pos_is_line:
            line = pos
        else:  # record ordinal -> line: skip the header and the unparsable lines before it
            line = src.header_lines + pos + j
            while j < len(malformed) and malformed[j][0] <= line:
                j += 1
                line = src.header_lines + pos + j
        pids = dict(zip(id_idx, [upid, spid][: len(id_idx)]))
        if kind in ("jsonl", "otto"):
            raw = _substitute_json(raw_text, id_cols, key)
        elif kind == "parquet":
            raw = json.dumps(dict(zip(src.columns, _substitute_fields(raw_list, pids))), separators=(",", ":"))
        else:
            raw = _join_csv(_substitute_fields(raw_list, pids), src.delim)
        out.append((source, line, reason, raw))
    for line, text in malformed:
        if '"' not in text:
            fields = text.split(src.delim)
            present = {i: fields[i] for i in id_idx if i < len(fields) and fields[i]}
            if present:
                pids = dict(zip(present, pseudonymise(list(present.values()), key)))
                text = src.delim.join(_substitute_fields(fields, pids))
        out.append((source, line, "malformed_line", text))
    out.sort(key=lambda r: r[1])
    return out


# --- one file --------------------------------------------------------------------------------


def _ingest_file(path: Path, sha: str, cfg: DataConfig, key: bytes, stage: Path, now: datetime) -> FileReport:
    t0 = time.perf_counter()
    preset = PRESETS[cfg.format]
    kind = preset["kind"]
    report = FileReport(source=str(path), sha256=sha)
    con = duckdb.connect()
    # DuckDB spills (raw ids included) go to the system temp dir, never into the workspace
    tmpdir = Path(tempfile.mkdtemp(prefix="purchase-intent-ingest-"))
    try:
        con.execute(f"SET temp_directory = {_lit(tmpdir)}")
        con.execute("SET TimeZone = 'UTC'")
        con.execute("SET enable_progress_bar = false")
        con.execute("SET preserve_insertion_order = true")  # row_number() OVER () follows the file
        if kind == "csv":
            src = _csv_source(con, path, preset)
        elif kind == "parquet":
            src = _parquet_source(con, path)
        else:
            src = _jsonl_source(con, path, kind)
        mapping, events, extras = _resolve(cfg, preset, src.columns)
        ts_unit = cfg.ts_unit or preset.get("ts_unit")
        sql = _stage_sql(src, mapping, events, extras, ts_unit, _parse_time(cfg.since), _parse_time(cfg.until), now)
        con.execute(f"CREATE TEMP TABLE staged AS {sql}")

        counts = dict(con.execute("SELECT coalesce(reason, ''), count(*) FROM staged GROUP BY ALL").fetchall())
        report.accepted = counts.pop("", 0)
        report.filtered = counts.pop("filtered", 0)
        if kind == "csv":
            n_bad = con.execute("SELECT count(DISTINCT line) FROM reject_errors").fetchall()[0][0]
            if n_bad:
                counts["malformed_line"] = counts.get("malformed_line", 0) + n_bad
        report.rejected = {r: counts[r] for r in REASONS if counts.get(r)}
        report.rows_read = report.accepted + report.filtered + sum(report.rejected.values())
        if cfg.strict and report.rejected:
            return report

        # one map per column: the probes of the many rows into the few users' map stay in cache
        for col, name in (("user_raw", "user_map"), ("session_raw", "session_map")):
            ids = con.sql(f"SELECT DISTINCT {col} FROM staged WHERE {col} IS NOT NULL").to_arrow_table()
            con.register("ids_arrow", pseudonym_table(ids.column(0), key))
            con.execute(f"CREATE TEMP TABLE {name} AS SELECT * FROM ids_arrow")
            con.unregister("ids_arrow")

        if report.accepted:
            report.part = f"part-{sha[:16]}.parquet"
            extra_sel = "".join(f", s.{_q(n)}" for n in extras.values())
            con.execute(f"""COPY (
                SELECT m.pid AS user_id, s.ts, s.event, s.item_id, s.category, s.price, ms.pid AS session_id{extra_sel}
                FROM staged s JOIN user_map m ON s.user_raw = m.raw LEFT JOIN session_map ms ON s.session_raw = ms.raw
                WHERE s.reason IS NULL
            ) TO {_lit(stage / report.part)} (FORMAT parquet)""")
        if report.rejected:
            rows = _collect_rejects(con, src, kind, mapping, key, str(path))
            report.rejects_path = stage / f"{sha[:16]}.csv"
            with open(report.rejects_path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["source_file", "line", "reason", "raw"])
                w.writerows(rows)
    finally:
        con.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
    report.seconds = time.perf_counter() - t0
    return report


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def ingest(workspace: Workspace | str | Path, paths: Iterable[str | Path] | str | Path, cfg: DataConfig,
           progress: bool = True) -> IngestReport:
    """Read, validate, pseudonymise and store raw event files; all files land or none.

    Parameters
    ----------
    workspace : Workspace or path
        Destination workspace.
    paths : path or iterable of paths
        Source files (``.gz`` allowed for CSV and JSONL).
    cfg : DataConfig
        Format (a preset or ``csv``/``parquet``/``jsonl``), column and event maps, timestamp
        unit, strict mode and the ``since``/``until`` window.
    progress : bool
        Print one line per file to stderr.

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
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"no such file: {p}")
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    report = IngestReport()
    ws.root.mkdir(parents=True, exist_ok=True)
    with ws.lock():
        ws.recover()
        manifest = ws.read_manifest()
        key = load_key(ws.root)
        if manifest.get("key_id") and manifest["key_id"] != key_id(key):
            raise ValueError("the pseudonymisation key differs from the one this workspace was built with; "
                             "set PURCHASE_INTENT_PSEUDONYM_KEY back or use a new workspace")
        known = {e["sha256"] for e in manifest["files"]}
        stage = tmp_path(ws.events_dir / "ingest")
        stage.mkdir(parents=True)
        moved: list[Path] = []
        try:
            for p in paths:
                sha = _sha256(p)
                if sha in known:
                    report.files.append(FileReport(source=str(p), sha256=sha, skipped=True))
                    if progress:
                        print(f"skipped {p} (already ingested)", file=sys.stderr)
                    continue
                known.add(sha)
                fr = _ingest_file(p, sha, cfg, key, stage, now)
                report.files.append(fr)
                if progress:
                    print(f"{p}: {fr.accepted:,} accepted, {sum(fr.rejected.values()):,} rejected, "
                          f"{fr.filtered:,} filtered ({fr.seconds:.1f}s)", file=sys.stderr)
            if cfg.strict and report.rejected:
                raise IngestRejectedError(report)
            new = [f for f in report.files if not f.skipped]
            if not new:
                return report
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
                entries.append(dict(sha256=f.sha256, source=str(Path(f.source).resolve()), format=cfg.format,
                                    parts=[f.part] if f.part else [], rejects=rejects, rows_read=f.rows_read,
                                    accepted=f.accepted, rejected=f.rejected, filtered=f.filtered,
                                    ingested_at=now.isoformat(timespec="seconds") + "Z"))
            fsync_dir(ws.events_dir)
            fsync_dir(ws.rejects_dir)
            manifest = {**manifest, "key_id": key_id(key), "files": manifest["files"] + entries}
            atomic_write_json(ws.manifest_path, manifest)
            moved = []
        finally:
            for m in moved:  # the commit did not happen: take back what was moved in
                m.unlink(missing_ok=True)
            shutil.rmtree(stage, ignore_errors=True)
    return report
