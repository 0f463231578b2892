"""Ingest, build and batch scoring on Apache Spark (``--engine spark``), from the same definitions as DuckDB.

    purchase-intent ingest s3a://shop/events/ --format parquet --map user_id=visitor ... --engine spark
    purchase-intent build --task user --engine spark --spark-conf spark.master=spark://host:7077
    purchase-intent score --run lightgbm --engine spark

What runs on Spark: reading the raw Parquet (any path Spark reads: local, HDFS, S3 through the user's own
Spark configuration), validation and mapping (``events._stage_sql``), pseudonymisation
(``privacy.pseudonym_sql``: HMAC-SHA256 over the key blocks, which reach the executors as data), examples
(``labels``) and features (``features.features_sql``), and batch scoring (the run's LightGBM text model
or ONNX graph applied on executors with ``mapInPandas``). Every query is the DuckDB definition
transpiled by ``spark_sql.to_spark``. What stays on the driver: the time split (a few numbers per
cutoff), the workspace's files (the same layout and files as DuckDB's, so train, evaluate and report
work on them unchanged), and ranking the scores (DuckDB, out of core).
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Optional
from zoneinfo import ZoneInfo

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession

from . import labels
from .config import FeatureConfig, LabelConfig
from .engine import EngineConfig, EngineError
from .features import features_sql
from .spark_sql import PARAMS, SESSION_CONF, to_spark
from .times import duration_us
from .workspace import NothingIngestedError, Workspace

CANONICAL = ("user_id", "ts", "event", "item_id", "category", "price", "session_id")


def spark_session(cfg: EngineConfig) -> SparkSession:
    """The Spark session: the running one (e.g. a test's ``local[2]``) or a new one from the user's Spark
    configuration plus ``cfg.spark_conf``; our SQL settings (``spark_sql.SESSION_CONF``) on top."""
    builder = SparkSession.builder.appName("purchase-intent")
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
    """Run one DuckDB definition on Spark (transpiled by ``spark_sql.to_spark``)."""
    return spark.sql(to_spark(duckdb_sql))


def to_arrow(df: DataFrame) -> pa.Table:
    """A Spark result on the driver as Arrow, timestamps as naive UTC (DuckDB's ``TIMESTAMP``)."""
    table = df.toArrow()
    cols = [c.cast(pa.timestamp("us")) if pa.types.is_timestamp(c.type) else c for c in table.columns]
    return pa.table(cols, names=table.column_names)


def register_params(spark: SparkSession, params: dict[str, object]) -> None:
    """The query parameters as the one-row view ``_pi_params`` (see ``spark_sql.to_spark``)."""
    spark.createDataFrame([tuple(params.values())], list(params)).createOrReplaceTempView(PARAMS)


def register_events(spark: SparkSession, ws: Workspace) -> DataFrame:
    """The workspace's events as the view ``events`` (canonical columns; ts as TIMESTAMP in UTC)."""
    parts = ws.part_paths()
    if not parts:
        raise NothingIngestedError(f"no events in workspace {ws.root}: run `purchase-intent ingest PATH "
                                   "--format F` first")
    df = spark.read.option("mergeSchema", "true").parquet(*[str(p) for p in parts])
    missing = [c for c in CANONICAL if c not in df.columns]
    if missing:
        raise ValueError(f"the events of {ws.root} lack columns {missing}: ingest again with this version")
    df = df.selectExpr(*["CAST(ts AS TIMESTAMP) AS ts" if c == "ts" else c for c in CANONICAL])
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
        lo, hi = self.spark.sql("SELECT min(ts), max(ts) FROM events").collect()[0]
        if lo is None:
            raise ValueError("relation 'events' has no events")
        self.lo, self.hi = lo, hi

    @classmethod
    def for_workspace(cls, ws: Workspace, cfg: EngineConfig) -> "SparkBuild":
        spark = spark_session(cfg)
        return cls(spark, register_events(spark, ws))

    def suggest_step(self, cfg: LabelConfig) -> Optional[str]:
        return labels.suggest_step(_range_con(self.lo, self.hi), cfg)

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
