"""Events from a database: the rows of a SQL query on PostgreSQL, read as Arrow record batches.

    purchase-intent ingest --data postgresql://shop@db.internal:5432/shop --query "SELECT * FROM events"
    purchase-intent ingest --data postgresql://shop@db.internal/shop --query "SELECT ..." --since-last
    purchase-intent run --data postgresql://shop@db.internal/shop --query "SELECT ..." --map ts=created_at

The query runs through ADBC (``adbc_driver_postgresql``, the ``postgres`` extra), which reads the
rows with PostgreSQL's binary COPY and hands them over as Arrow record batches, which DuckDB pulls
one at a time while it stages them (``QueryRows``): no row becomes a Python object, and only the
time column is kept beside them. ``event_sources`` readers turn files into text columns; here every
column is cast to text the same way (as the Parquet reader does), so ``events.ingest`` maps,
validates, rejects and pseudonymises a query's rows exactly as it does a file's. ``_pos`` is the
row's number in the query's result (what ``rejects/*.csv`` calls its line).

Credentials never leave this module: ``str(query)`` is the URL without its password, and every
error is one line with the password removed. Pass the password in the URL, in ``$PGPASSWORD`` or
in ``~/.pgpass`` (libpq reads both). The session is read-only (unless the URL sets ``options``) and
its connect timeout is ``CONNECT_TIMEOUT_S`` seconds unless the URL sets ``connect_timeout``.

Identity. A query's source is its URL without the user and password (host, port, database) plus
the query text (stripped, trailing ``;`` removed): ``source_id``. A load of it is identified, for
re-ingest idempotence (what a file's sha256 is for a file), by the source, the ``--since-last``
lower bound, the number of rows read and the first and last event time read; the same query over
unchanged rows is skipped as "already ingested". A change that keeps the count and the time range
(an updated price) is not seen: use ``--since-last`` for tables that grow.

``--since-last`` wraps the query, ``SELECT * FROM (<query>) q WHERE q.<ts> > CAST($1 AS <type>)``,
with ``<ts>`` the column the mapping gives ``ts`` and ``$1`` the raw value of the newest event the
earlier loads of this source read (the newest valid, plausible time not filtered by
``--since/--until``, as the database wrote it). Rows without a time are read only by the first
load. The comparison is the database's: a timestamp or number column, or ISO 8601 text in one
format.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Optional
from urllib.parse import parse_qsl, quote, unquote

import duckdb
import numpy as np
import pyarrow as pa

from .event_sources import Source, sql_ident

SCHEMES = ("postgresql://", "postgres://")
CONNECT_TIMEOUT_S = 4  # per address tried; libpq may try two (IPv6 and IPv4), still within 10 s
DEFAULT_PORT = "5432"
_SECRET_PARAMS = ("password", "sslpassword")


class DatabaseError(ValueError):
    """The database cannot be reached or the query fails: one line, without credentials."""


def is_database_url(text: object) -> bool:
    """True for a ``postgresql://`` (or ``postgres://``) URL."""
    return isinstance(text, str) and text.lower().startswith(SCHEMES)


@dataclass(frozen=True)
class _Url:
    user: str
    password: str
    hosts: str  # host[:port][,host[:port]...] as written, or "" (then the host parameter or libpq's default)
    dbname: str
    params: list[tuple[str, str]]


def _split_url(url: str) -> _Url:
    """The parts of a libpq connection URI, ``postgresql://[user[:password]@][hosts][/dbname][?params]``."""
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    netloc, _, dbname = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    user, _, password = (userinfo if at else "").partition(":")
    params = parse_qsl(query, keep_blank_values=True)
    for k, v in params:
        if k == "password":
            password = v
        elif k == "user" and not user:
            user = v
        elif k == "dbname" and not dbname:
            dbname = v
    return _Url(unquote(user), unquote(password), hosts.lower(), unquote(dbname), params)


@dataclass(frozen=True)
class DatabaseQuery:
    """One database source (``--data URL --query SQL [--since-last]``)."""

    url: str  # as given, password included: only ever handed to the driver
    query: str
    since_last: bool = False  # only rows after the newest event already ingested from this source
    after: Optional[str] = None  # set by `resumed`: the raw time value the rows must come after...
    after_column: Optional[str] = None  # ...in this column (the one the earlier loads read their time from)

    def __repr__(self) -> str:
        return (f"DatabaseQuery({self.public_url!r}, {self.query!r}, since_last={self.since_last}, "
                f"after={self.after!r})")

    def __str__(self) -> str:
        return self.public_url

    @property
    def public_url(self) -> str:
        """The URL without credentials and parameters (the host parameter kept): what logs and files show."""
        u = _split_url(self.url)
        host = [f"host={quote(v, safe='/')}" for k, v in u.params if k == "host"]
        return (f"postgresql://{quote(u.user) + '@' if u.user else ''}{u.hosts}/{quote(u.dbname)}"
                + (f"?{host[0]}" if host else ""))

    @property
    def sql(self) -> str:
        """The query text, stripped of surrounding space and trailing semicolons (it is wrapped in a subquery)."""
        return self.query.strip().rstrip(";").strip()

    @property
    def source_id(self) -> str:
        """Server, database and query: the same source whoever reads it and whatever the password."""
        u = _split_url(self.url)
        hosts = ",".join(h if ":" in h or h.startswith("[") else f"{h}:{DEFAULT_PORT}" for h in u.hosts.split(",")
                         if h) or ",".join(v for k, v in u.params if k == "host")
        text = json.dumps(["postgresql", hosts, u.dbname, self.sql])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def secrets(self) -> list[str]:
        """The password as written and as decoded (never shown)."""
        raw = self.url.split("://", 1)[1].partition("?")[0].rpartition("@")[0].partition(":")[2]
        out = {raw, unquote(raw), *(v for k, v in _split_url(self.url).params if k in _SECRET_PARAMS)}
        return sorted({s for s in out if s}, key=len, reverse=True)

    def connect_uri(self) -> str:
        """The URL for libpq: a connect timeout, an application name and a read-only session unless it sets them."""
        names = {k for k, _ in _split_url(self.url).params}
        extra = [(k, v) for k, v in (("connect_timeout", str(CONNECT_TIMEOUT_S)),
                                     ("application_name", "purchase-intent"),
                                     ("options", "-c default_transaction_read_only=on")) if k not in names]
        if not extra:
            return self.url
        return self.url + ("&" if "?" in self.url else "?") + "&".join(f"{k}={quote(v)}" for k, v in extra)

    def resumed(self, manifest: dict, progress: bool = True) -> "DatabaseQuery":
        """With ``since_last``: this query with ``after`` set to the newest event time the earlier loads of
        this source read (none: every row is read)."""
        if not self.since_last:
            return self
        loads = [e["database"] for e in manifest.get("files", [])
                 if (e.get("database") or {}).get("source_id") == self.source_id
                 and e["database"].get("newest") is not None]
        if not loads:
            if progress:
                print(f"{self}: no earlier load of this query; reading every row", file=sys.stderr)
            return dataclasses.replace(self, after=None, after_column=None)
        last = max(loads, key=lambda d: d["newest_ts"])
        if progress:
            print(f"{self}: rows after {last['newest_ts']} ({last['ts_column']} > {last['newest']}), the newest "
                  "event already ingested from this query", file=sys.stderr)
        return dataclasses.replace(self, after=last["newest"], after_column=last["ts_column"])

    def error(self, what: str, e: BaseException) -> DatabaseError:
        """One line: what failed, where (no credentials) and the server's own message."""
        return DatabaseError(self.scrub(f"{what} {self}: {_server_message(e)}"))

    def scrub(self, text: str) -> str:
        for s in self.secrets():
            text = text.replace(s, "***").replace(quote(s), "***")
        return text


def _server_message(e: BaseException) -> str:
    """The server's (or libpq's) message of a driver error, on one line: its ``ERROR:``/``FATAL:`` text,
    without the driver's prefixes, the position caret and the echoed query."""
    text = str(e).split("\n\nQuery was:")[0]
    m = re.search(r"(?:ERROR|FATAL):\s+(.*)", text)
    if m:
        return m.group(1).strip().rstrip(".")
    text = re.sub(r"^\w+: \[libpq\] (?:Failed to connect: )?", "", text.strip())
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__


def _driver():
    try:  # the postgres extra
        import adbc_driver_postgresql.dbapi as dbapi
    except ImportError as e:
        raise ImportError(f"reading from PostgreSQL needs the postgres extra ({e.name or 'adbc_driver_postgresql'} "
                          "is missing): pip install 'purchase-intent[postgres]'") from None
    return dbapi


def _storage(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Extension columns (PostgreSQL's numeric, json, ... arrive as opaque extension types) as their storage."""
    if not any(isinstance(t, pa.ExtensionType) for t in batch.schema.types):
        return batch
    cols = [c.storage if isinstance(c.type, pa.ExtensionType) else c for c in batch.columns]
    return pa.RecordBatch.from_arrays(cols, names=batch.schema.names)


class QueryRows:
    """The rows of one query, streamed: ``with QueryRows(con, q, resolve) as rows:`` stage ``rows.source`` (a
    Source read once: DuckDB pulls the record batches from the server while it stages them), then ``record()``.

    ``resolve`` maps the result's column names to ``{canonical: column}`` (the ingest's mapping; it
    raises ValueError for a column that is not there); it runs before any row is read. Besides the
    rows DuckDB consumes, only the time column is kept (Arrow arrays, for the newest event's raw value).
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, q: DatabaseQuery, resolve: Callable[[list[str]], dict]):
        self.con, self.q, self.resolve = con, q, resolve
        self.ts_column: Optional[str] = None
        self._kept: list[pa.RecordBatch] = []  # (__row, the time column as read), per batch
        self._failure: Optional[DatabaseError] = None
        self._conn = self._cur = None
        self.source: Optional[Source] = None  # set on entering: the rows as text columns (read once)

    def __enter__(self) -> "QueryRows":
        q, dbapi = self.q, _driver()
        try:
            self._conn = dbapi.connect(q.connect_uri())
        except dbapi.Error as e:
            err = q.error("cannot connect to", e)
            if "password" in str(err):
                err = DatabaseError(f"{err} (the password goes in the URL, $PGPASSWORD or ~/.pgpass)")
            raise err from None
        try:
            cur = self._cur = self._conn.cursor()  # held: closing it would close the stream
            try:
                schema = cur.adbc_execute_schema(q.sql)
            except dbapi.Error as e:
                raise q.error("the query failed on", e) from None
            columns = list(schema.names)
            dupes = sorted({c for c in columns if columns.count(c) > 1})
            if dupes:
                raise DatabaseError(f"the query returns the column(s) {dupes} more than once: name each one "
                                    "(SELECT a.id AS order_id, ...)")
            ts = self.ts_column = self.resolve(columns)["ts"]
            sql, params = q.sql, None
            if q.after is not None and q.after_column != ts:
                raise DatabaseError(f"--since-last: the earlier loads of this query took the time from column "
                                    f"{q.after_column!r}, this one from {ts!r}; map ts as before (--map "
                                    f"ts={q.after_column}) or ingest without --since-last")
            if q.after is not None:
                pg_type = (schema.field(ts).metadata or {}).get(b"POSTGRESQL:type", b"text").decode()
                sql = f"SELECT * FROM ({q.sql}) AS q WHERE q.{sql_ident(ts)} > CAST($1 AS {sql_ident(pg_type)})"
                params = (q.after,)
            try:
                cur.execute(sql, params)
                reader = cur.fetch_record_batch()
            except dbapi.Error as e:
                raise q.error("the query failed on", e) from None
            plain = [pa.field(f.name, f.type.storage_type if isinstance(f.type, pa.ExtensionType) else f.type)
                     for f in reader.schema]
            out = pa.schema([pa.field("__row", pa.int64()), *plain])
            self.con.register("db_batches", pa.RecordBatchReader.from_batches(out, self._batches(reader, out, dbapi)))
        except BaseException:
            self._conn.close()
            raise
        sel = ", ".join(f"CAST({sql_ident(c)} AS VARCHAR) AS {sql_ident(c)}" for c in columns)
        self.source = Source(f"SELECT __row AS _pos, false AS _bad, NULL::VARCHAR AS _raw_text, {sel} FROM db_batches",
                             columns, pos_is_line=True)
        return self

    def _batches(self, reader: pa.RecordBatchReader, schema: pa.Schema, dbapi) -> Iterator[pa.RecordBatch]:
        """The batches with ``__row`` (1-based row number in the result) prepended; a driver error while they
        stream is kept (DuckDB, which pulls them, would bury its message) and raised by ``__exit__``."""
        n = 0
        try:
            for batch in reader:
                batch = _storage(batch)
                rows = pa.array(np.arange(n + 1, n + 1 + batch.num_rows, dtype=np.int64))
                n += batch.num_rows
                self._kept.append(pa.RecordBatch.from_arrays([rows, batch.column(self.ts_column)],
                                                             names=["__row", "raw"]))
                yield pa.RecordBatch.from_arrays([rows, *batch.columns], schema=schema)
        except (dbapi.Error, OSError) as e:  # e.g. division by zero on row N
            self._failure = self.q.error("the query failed on", e)
            raise self._failure from None

    def __exit__(self, kind, value, tb) -> None:
        self.con.unregister("db_batches")
        self._cur.close()
        self._conn.close()
        if self._failure is not None and isinstance(value, duckdb.Error):
            raise self._failure from None

    def record(self) -> tuple[str, dict]:
        """(identity, manifest fields) of the rows read and staged (the table ``staged``).

        The identity (the manifest's ``sha256`` for a file) hashes the source, the ``--since-last`` bound,
        the row count and the first and last event time; the fields record the source without credentials
        and the newest event time read, as the database wrote it (``--since-last`` resumes after it)."""
        q, con = self.q, self.con
        ok = ("ts IS NOT NULL AND reason IS DISTINCT FROM 'implausible_ts' AND reason IS DISTINCT FROM 'filtered'")
        n, first, last, pos = con.execute(f"SELECT count(*), min(ts) FILTER ({ok}), max(ts) FILTER ({ok}), "
                                          f"arg_max(_pos, ts) FILTER ({ok}) FROM staged").fetchall()[0]
        newest = None
        if pos is not None:  # the raw value of that row (row numbers run 1..n, batch after batch)
            kept = pa.Table.from_batches(self._kept)
            con.register("db_newest", kept.slice(pos - 1, 1))
            try:
                newest, row = con.execute("SELECT CAST(raw AS VARCHAR), __row FROM db_newest").fetchall()[0]
            finally:
                con.unregister("db_newest")
            assert row == pos
        first, last = (None if t is None else t.isoformat(timespec="microseconds") + "Z" for t in (first, last))
        identity = hashlib.sha256(json.dumps([q.source_id, q.after, n, first, last]).encode()).hexdigest()
        return identity, {"source": q.public_url,
                          "database": {"source_id": q.source_id, "url": q.public_url, "query": q.sql,
                                       "ts_column": self.ts_column, "after": q.after, "newest": newest,
                                       "newest_ts": last}}
