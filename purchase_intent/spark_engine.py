"""Ingest, build and batch scoring on Apache Spark (``--engine spark``), from the same definitions as DuckDB.

    purchase-intent ingest s3a://shop/events/ --format parquet --map user_id=visitor ... --engine spark
    purchase-intent build --task user --engine spark --spark-conf spark.master=spark://host:7077

What runs on Spark: reading the raw Parquet (any path Spark reads: local, HDFS, S3 through the user's own
Spark configuration), validation and mapping (``events._stage_sql``), pseudonymisation
(``privacy.pseudonym_sql``: HMAC-SHA256 over the key blocks, which reach the executors as data), examples
(``labels``) and features (``features.features_sql``); batch scoring (``score --engine spark``) is
``spark_scoring``, on the session and helpers of this module. Every query is the DuckDB definition
transpiled by ``spark_sql.to_spark``. What stays on the driver: the time split (a few numbers per
cutoff), the workspace's files (the same layout and files as DuckDB's, so train, evaluate and report
work on them unchanged), and ranking the scores (DuckDB, out of core).
"""
from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional
from zoneinfo import ZoneInfo

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
from py4j.protocol import Py4JError, Py4JJavaError
from pyspark.errors import PySparkException
from pyspark.sql import DataFrame, SparkSession

from . import labels, runs, storage
from .config import DataConfig, FeatureConfig, LabelConfig
from .engine import EngineConfig, EngineError
from .event_sources import PRESETS, Source, sql_ident
from .events import REASONS, FileReport, resolve_columns, stage_sql
from .features import features_sql
from .privacy import key_chain, pseudonym_params, pseudonym_sql
from .spark_sql import PARAMS, SESSION_CONF, split_ctes
from .times import duration_us, parse_time
from .vocabulary import RAW_EVENT
from .workspace import NothingIngestedError, Workspace

CANONICAL = ("user_id", "ts", "event", "item_id", "category", "price", "session_id")


_CACHED: dict[str, DataFrame] = {}  # the cached CTE views of the last queries (see ``sql``)


class SparkJobError(RuntimeError):
    """A Spark job failed (an unreadable path, an executor lost, out of memory): its first line."""


def summary_line(raw: str) -> str:
    """The line of a Spark error that says what went wrong: for a Python error on an executor, the last line
    of its traceback (``ValueError: ...``), not "Traceback (most recent call last):"; else the first line
    (with the next one where the first ends in a colon)."""
    lines = [ln.strip() for ln in raw.strip().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.endswith("Traceback (most recent call last):")), None)
    if start is not None:
        # the traceback runs until the JVM's own frames ("at org.apache...") or the driver's stack trace
        end = next((i for i in range(start + 1, len(lines))
                    if lines[i].startswith(("at ", "Driver stacktrace", "Caused by:", "JVM stacktrace"))), len(lines))
        if end - start > 1:
            return lines[end - 1]
    if not lines:
        return ""
    return lines[0] if not lines[0].endswith(":") or len(lines) == 1 else f"{lines[0]} {lines[1]}"


def one_line(fn):
    """Spark's errors (Java stack traces included) as one SparkJobError line, which ``cli.main`` prints."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (PySparkException, Py4JError) as e:
            raw = str(e)
            if isinstance(e, Py4JJavaError):  # "An error occurred while calling o145.getResult": say what
                try:
                    j = e.java_exception
                    while j.getCause() is not None:  # the root cause, not "Exception thrown in awaitResult:"
                        j = j.getCause()
                    raw = str(j.toString())
                except Py4JError:  # the JVM itself is gone (e.g. killed for memory)
                    pass
            text = summary_line(raw) or type(e).__name__
            if "OutOfMemoryError" in raw or "Java heap space" in raw:
                text += " (give Spark more memory: --spark-conf spark.driver.memory=6g, or executors on a cluster)"
            raise SparkJobError(f"Spark: {text}") from None
    return wrapper


def spark_session(cfg: EngineConfig) -> SparkSession:
    """The Spark session: the running one (e.g. a test's ``local[2]``) or a new one from the user's Spark
    configuration plus ``cfg.spark_conf``; our SQL settings (``spark_sql.SESSION_CONF``) on top."""
    builder = SparkSession.builder.appName("purchase-intent")
    # quiet by default: no progress bars or log lines in the command's output (--spark-conf overrides)
    builder = builder.config("spark.ui.showConsoleProgress", "false").config("spark.log.level", "ERROR")
    if not (os.environ.get("PYSPARK_PYTHON") or "spark.pyspark.python" in cfg.spark_conf):
        # Python workers (scoring's mapInPandas) run this interpreter, with this package, unless told otherwise
        os.environ["PYSPARK_PYTHON"] = sys.executable
    for k, v in cfg.spark_conf.items():
        builder = builder.config(k, v)
    try:
        spark = builder.getOrCreate()
    except Exception as e:  # the JVM did not start: Java missing or broken, a bad master URL
        raise EngineError(f"Spark did not start: {str(e).strip().splitlines()[0]} (check Java 17+ and "
                          "--spark-conf / SPARK_* settings)") from None
    for k, v in {**SESSION_CONF, "spark.sql.execution.arrow.pyspark.enabled": "true"}.items():
        spark.conf.set(k, v)
    return spark


def sql(spark: SparkSession, duckdb_sql: str) -> DataFrame:
    """Run one DuckDB definition on Spark (transpiled by ``spark_sql.split_ctes`` / ``to_spark``).

    Its top-level CTEs become temporary views, cached when read more than once (Spark would recompute
    them at every reference); they stay cached for the session's life of the view, i.e. until the next
    query that defines the same names.
    """
    ctes, final = split_ctes(duckdb_sql)
    for name, text, uses in ctes:
        old = _CACHED.pop(name, None)
        if old is not None:
            old.unpersist()
        df = spark.sql(text)
        if uses > 1:
            df = _CACHED[name] = df.cache()
        df.createOrReplaceTempView(name)
    return spark.sql(final)


def to_arrow(df: DataFrame) -> pa.Table:
    """A Spark result on the driver as Arrow, timestamps as naive UTC (DuckDB's ``TIMESTAMP``)."""
    table = df.toArrow()
    cols = [c.cast(pa.timestamp("us")) if pa.types.is_timestamp(c.type) else c for c in table.columns]
    return pa.table(cols, names=table.column_names)


def register_params(spark: SparkSession, params: dict[str, object]) -> None:
    """The query parameters as the one-row view ``_pi_params`` (see ``spark_sql.to_spark``)."""
    spark.createDataFrame([tuple(params.values())], list(params)).createOrReplaceTempView(PARAMS)


def register_events(spark: SparkSession, ws: Workspace, raw_event: bool = False) -> DataFrame:
    """The workspace's events as the view ``events`` (canonical columns; ts as TIMESTAMP in UTC), with
    ``raw_event`` too when asked and the parts hold it (NULL in parts ingested before it existed)."""
    parts = ws.part_paths()
    if not parts:
        raise NothingIngestedError(f"no events in workspace {ws.root}: run `purchase-intent ingest PATH "
                                   "--format F` first")
    df = spark.read.option("mergeSchema", "true").parquet(*[str(p) for p in parts])
    missing = [c for c in CANONICAL if c not in df.columns]
    if missing:
        raise ValueError(f"the events of {ws.root} lack columns {missing}: ingest again with this version")
    cols = CANONICAL + ((RAW_EVENT,) if raw_event and RAW_EVENT in df.columns else ())
    df = df.selectExpr(*["CAST(ts AS TIMESTAMP) AS ts" if c == "ts" else c for c in cols])
    df.createOrReplaceTempView("events")
    return df


def _times_view(spark: SparkSession, name: str, times: list[datetime]) -> None:
    pdf = pd.DataFrame({"period": np.arange(len(times), dtype=np.int32),
                        "t": pd.Series(pd.to_datetime(times), dtype="datetime64[us]")})
    spark.createDataFrame(pdf).selectExpr("CAST(period AS INT) AS period", "CAST(t AS TIMESTAMP) AS t") \
        .createOrReplaceTempView(name)


def _range_con(lo: datetime, hi: datetime) -> duckdb.DuckDBPyConnection:
    """A DuckDB relation ``events`` holding only the data's first and last time: all that the label
    helpers (``labels.make_cutoffs`` / ``suggest_step``) read of the events."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("CREATE TABLE events AS SELECT ts FROM (VALUES ($lo::TIMESTAMP), ($hi::TIMESTAMP)) t(ts)",
                {"lo": lo, "hi": hi})
    return con


class SparkBuild:
    """``build`` on Spark: examples (``labels``) and features (``features``) over the workspace's events.

    The same three calls that ``pipeline.build`` makes on DuckDB: ``build_examples``, ``suggest_step`` and
    ``compute_features``.
    """

    def __init__(self, spark: SparkSession, events: DataFrame):
        self.spark = spark
        events.createOrReplaceTempView("events")
        # as TIMESTAMP_NTZ: collect() would turn a TIMESTAMP into the Python process's local time
        lo, hi = self.spark.sql("SELECT CAST(min(ts) AS TIMESTAMP_NTZ), CAST(max(ts) AS TIMESTAMP_NTZ) "
                                "FROM events").collect()[0]
        if lo is None:
            raise ValueError("relation 'events' has no events")
        self.lo, self.hi = lo, hi

    @classmethod
    @one_line
    def for_workspace(cls, ws: Workspace, cfg: EngineConfig) -> "SparkBuild":
        spark = spark_session(cfg)
        return cls(spark, register_events(spark, ws))

    def suggest_step(self, cfg: LabelConfig) -> Optional[str]:
        return labels.suggest_step(_range_con(self.lo, self.hi), cfg)

    @one_line
    def build_examples(self, cfg: LabelConfig) -> pa.Table:
        """As ``labels.build_examples`` (same columns, order and counts metadata)."""
        if cfg.task == "user":
            table, counts = self._user_examples(cfg)
        elif cfg.task == "session":
            table, counts = self._session_examples(cfg)
        else:
            raise ValueError(f"unknown task {cfg.task!r}: use 'user' or 'session'")
        return table.replace_schema_metadata({b"purchase_intent.counts": json.dumps(counts).encode()})

    def _user_examples(self, cfg: LabelConfig) -> tuple[pa.Table, dict]:
        spark = self.spark
        cutoffs = labels.cutoffs_between(self.lo, self.hi, cfg)
        if not cutoffs:  # the DuckDB path's message, from the same check
            return labels.build_examples(_range_con(self.lo, self.hi), cfg), {}
        _times_view(spark, "_pi_cutoffs", cutoffs)
        table = to_arrow(sql(spark, labels.user_examples_sql(cfg, "events", "_pi_cutoffs")))
        n_users = spark.sql("SELECT count(DISTINCT user_id) FROM events").collect()[0][0]
        n_never = n_users - pa.compute.count_distinct(table["user_id"]).as_py()
        counts = {"task": "user", "cutoffs": len(cutoffs), "examples": table.num_rows,
                  "positives": int(pa.compute.sum(table["label"]).as_py() or 0), "users": n_users,
                  "dropped": {"users never active in a lookback window": n_never}}
        return table, counts

    def _session_examples(self, cfg: LabelConfig) -> tuple[pa.Table, dict]:
        spark = self.spark
        has_ids = spark.sql("SELECT count(session_id) > 0 FROM events").collect()[0][0]
        use_ids = bool(has_ids) and cfg.session_gap is None
        sql(spark, labels.sessions_sql("events", cfg, use_ids)).createOrReplaceTempView("_pi_sessions")
        gap_us = duration_us(cfg.session_gap or labels.DEFAULT_SESSION_GAP)
        cand = sql(spark, labels.session_candidates_sql("_pi_sessions", self.hi, gap_us)).cache()
        cand.createOrReplaceTempView("_pi_sess_ex")
        _times_view(spark, "_pi_periods",
                    labels.period_edges(self.lo, self.hi, labels.parse_duration(cfg.step), ZoneInfo(cfg.tz or "UTC")))
        n_total, n_empty, n_open = spark.sql("""
            SELECT count(*), count_if(cutoff IS NULL), count_if(cutoff IS NOT NULL AND open_at_end)
            FROM _pi_sess_ex""").collect()[0]
        table = to_arrow(sql(spark, labels.session_examples_sql("_pi_sess_ex", "_pi_periods")))
        cand.unpersist()
        counts = {"task": "session", "sessions": n_total, "session_ids": "data" if use_ids else "gap",
                  "examples": table.num_rows, "positives": int(pa.compute.sum(table["label"]).as_py() or 0),
                  "dropped": {"no event before the cutoff": n_empty,
                              "may continue after the end of the data": n_open}}
        return table, counts

    @one_line
    def compute_features(self, examples: pd.DataFrame, cfg: FeatureConfig) -> pd.DataFrame:
        """As ``features.compute_features`` over ``examples`` (example_id, user_id, cutoff[, session_start])."""
        spark = self.spark
        cols = [c for c in ("example_id", "user_id", "cutoff", "session_start") if c in examples.columns]
        ex = examples[cols].copy()
        for c in ("cutoff", "session_start"):
            if c in ex.columns:
                ex[c] = ex[c].astype("datetime64[us]")
        sdf = spark.createDataFrame(ex).selectExpr(
            *[f"CAST({c} AS TIMESTAMP) AS {c}" if c in ("cutoff", "session_start") else c for c in cols])
        sdf.createOrReplaceTempView("examples")
        session = "session_start" in cols and bool(examples["session_start"].notna().any())
        ids = spark.sql("SELECT count(session_id) > 0 FROM events").collect()[0][0]
        df = to_arrow(sql(spark, features_sql(cfg, "examples", "events", session=session,
                                              session_ids=bool(ids)))).to_pandas()
        return df.set_index("example_id").astype("float64")

    def write_features(self, examples: pd.DataFrame, cfg: FeatureConfig, path: Path) -> list[str]:
        """The features collected to the driver, in the examples' row order, written as the same Parquet
        file as DuckDB's; returns their names."""
        feats = runs.align_features(self.compute_features(examples, cfg), examples).reset_index(drop=True)
        storage.write_parquet(feats, path)
        return list(feats.columns)

    def close(self) -> None:
        """Nothing to close: the Spark session stays for the process (the next step reuses it)."""


# ---------------------------------------------------------------------------------------------
# ingest


class SparkIngest:
    """``events.ingest``'s per-file step on Spark, for Parquet sources: the same mapping and validation
    (``events.stage_sql``) and the same pseudonyms (``privacy.pseudonym_sql``), computed on the executors.

    The key's HMAC blocks reach the executors as the one-row relation ``_pi_params``; they are never part
    of a query's text or of a log line. The accepted rows are written as one Parquet part in the stage
    folder (``ts`` as a time without zone, as DuckDB writes it); rejected rows go to the same rejects CSV.
    """

    def __init__(self, cfg: EngineConfig):
        self.spark = spark_session(cfg)

    @one_line
    def __call__(self, path: Path, sha: str, cfg: DataConfig, key: bytes, stage: Path, now: datetime,
                 known: frozenset[str] = frozenset()) -> FileReport:
        t0 = time.perf_counter()
        preset = PRESETS[cfg.format]
        if preset["kind"] != "parquet":
            raise ValueError(f"--engine spark ingests Parquet (--format parquet); {path} is --format {cfg.format}: "
                             "ingest it with --engine duckdb")
        if cfg.ts_format:
            raise ValueError("--ts-format is read by --engine duckdb only: ingest with --engine duckdb, or write the "
                             "times as ISO 8601 or epoch numbers")
        if cfg.ts_zone and cfg.ts_zone != "UTC":
            raise ValueError(f"--ts-zone {cfg.ts_zone} is read by --engine duckdb only (Spark reads times without a "
                             "zone as UTC): ingest with --engine duckdb, or write the times with their offset")
        spark = self.spark
        report = FileReport(source=str(path), sha256=sha)
        raw = spark.read.parquet(str(path))
        columns = list(raw.columns)
        raw.selectExpr("*", "_metadata.row_index AS `_pi_row`").createOrReplaceTempView("_pi_raw")
        doubles = {c for c, t in raw.dtypes if t == "double"}  # whole numbers as integers, as event_sources.text_sql
        text = ", ".join(f"CASE WHEN `{c}` = floor(`{c}`) AND abs(`{c}`) < 9007199254740992 THEN CAST(CAST(`{c}` AS "
                         f"BIGINT) AS STRING) ELSE CAST(`{c}` AS STRING) END AS `{c}`" if c in doubles else
                         f"CAST(`{c}` AS STRING) AS `{c}`" for c in columns)
        spark.sql(f"SELECT `_pi_row` + 1 AS _pos, false AS _bad, CAST(NULL AS STRING) AS _raw_text, {text} "
                  "FROM _pi_raw").createOrReplaceTempView("_pi_src")
        src = Source('SELECT * FROM "_pi_src"', columns, pos_is_line=True)
        mapping, events, extras = resolve_columns(cfg, preset, columns)
        since, until = (parse_time(t) if t else None for t in (cfg.since, cfg.until))
        staged = sql(spark, stage_sql(src, mapping, events, extras, cfg.ts_unit or preset.get("ts_unit"), since, until,
                                      now, cfg.strict_events, cfg.all_events)).cache()
        try:
            staged.createOrReplaceTempView("staged")
            counts = {r[0] or "": r[1]
                      for r in spark.sql("SELECT reason, count(*) FROM staged GROUP BY reason").collect()}
            report.accepted = counts.pop("", 0)
            report.filtered = counts.pop("filtered", 0)
            report.rejected = {r: counts[r] for r in REASONS if counts.get(r)}
            report.rows_read = report.accepted + report.filtered + sum(report.rejected.values())
            report.unmapped = {r[0]: r[1] for r in spark.sql(
                f"SELECT {RAW_EVENT}, count(*) AS n FROM staged WHERE reason IS NULL AND _unmapped "
                f"GROUP BY {RAW_EVENT} ORDER BY n DESC, {RAW_EVENT}").collect()}
            if cfg.strict and report.rejected:
                return report
            register_params(spark, pseudonym_params(key))
            n_keys = len(key_chain(key))  # after rotate-key: every key of the chain, oldest first
            extra_sel = "".join(f", s.{sql_ident(n)}" for n in extras.values())
            ids = (f"{pseudonym_sql('s.user_raw', n_keys)} AS user_id, s.ts, s.event, s.item_id, "
                   f"s.category, s.price, {pseudonym_sql('s.session_raw', n_keys)} AS session_id")
            if report.accepted:
                report.part = f"part-{sha[:16]}.parquet"
                out = sql(spark, f"SELECT {ids}, s.{RAW_EVENT}{extra_sel} FROM staged s WHERE s.reason IS NULL")
                out = out.withColumn("ts", out["ts"].cast("timestamp_ntz"))
                folder = stage / f"spark-{sha[:16]}"
                out.repartition(1).write.parquet(str(folder))
                (part,) = sorted(folder.glob("part-*.parquet"))
                os.replace(part, stage / report.part)
                shutil.rmtree(folder)
            if report.rejected:
                report.rejects_path = stage / f"{sha[:16]}.csv"
                self._write_rejects(report.rejects_path, str(path), columns, mapping, n_keys)
        finally:
            staged.unpersist()
            self.spark.catalog.dropTempView(PARAMS)
        report.seconds = time.perf_counter() - t0
        return report

    def _write_rejects(self, out: Path, source: str, columns: list[str], mapping: dict[str, str],
                       n_keys: int = 1) -> None:
        """The rejects CSV of the DuckDB path for a Parquet source: each rejected row's fields as JSON, its
        user and session ids replaced by their pseudonyms."""
        ids = {mapping[c]: c for c in ("user_id", "session_id") if c in mapping}
        pids = {"user_id": pseudonym_sql("s.user_raw", n_keys), "session_id": pseudonym_sql("s.session_raw", n_keys)}
        # each field as the row's text (_raw_list, 1-based in DuckDB's SQL): staged renames extras (snake case) and
        # keeps a mapped column under its canonical name only, so a source column is not selected by its name
        # an id that reads as missing ('', 'NA') is written as it stands, as DuckDB's rejects write it
        raw_ids = {"user_id": "s.user_raw", "session_id": "s.session_raw"}
        sel = ", ".join((f"CASE WHEN {raw_ids[ids[c]]} IS NULL THEN s._raw_list[{i + 1}] ELSE {pids[ids[c]]} END"
                         if c in ids else f"s._raw_list[{i + 1}]") + f" AS _c{i}" for i, c in enumerate(columns))
        rows = sql(self.spark, f"SELECT s._pos, s.reason, {sel} FROM staged s "
                               "WHERE s.reason IS NOT NULL AND s.reason <> 'filtered' ORDER BY s._pos").collect()
        with open(out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["source_file", "line", "reason", "raw"])
            for r in rows:
                # a Parquet timestamp or date arrives as a Python datetime: its text, as DuckDB's rejects give it
                w.writerow([source, r[0], r[1], json.dumps(dict(zip(columns, r[2:])), separators=(",", ":"),
                                                           default=str)])
