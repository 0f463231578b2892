"""Batch scoring on Apache Spark (``score --engine spark``): the run's model on the executors, never a pickle.

    purchase-intent score --run lightgbm --engine spark
    purchase-intent score --run transformer --engine spark

Every user with an event in ``[cutoff - lookback, cutoff)`` is one example at the cutoff, as in
``score._active_users_table``. Its features are ``features.features_sql`` (the DuckDB definition,
transpiled); the model runs on the executors, rebuilt there from what the run folder holds:

- tabular runs (``lightgbm``, ``logreg``): the model files (LightGBM's text model, logistic regression's
  JSON) through ``models.load_model``, applied with ``mapInPandas``;
- Transformer runs (``transformer``, ``transformer_pt``): config.json (vocab, tabular statistics,
  calibration) and the ONNX graph (``runs.saved_graph``), applied with ``mapInArrow``. Spark gathers each
  user's events with ``ts < cutoff`` into one row (``collect_list`` grouped by user, so a user is never
  split between two batches); the executors turn them into tokens with
  ``sequence_frame.build_sequences_frame`` (the numpy twin of ``sequences.build_sequences``, which the
  DuckDB path runs; ``tests/test_sequences.py`` proves both equal), add the tabular features
  (``runs.sequence_inputs``) and score with ONNX Runtime and the run's calibration
  (``predict_proba`` of ``models.load_onnx_model``: the same inputs and calibration as ``load_model``).

A user's whole history before the cutoff sits in one row (``dt_prev`` and ``item_state`` read all of
it): a bot with millions of events is one large row, as it is one large partition for the features.
Ensembles, ``lightgbm_emb`` (a PyTorch encoder inside LightGBM) and runs with ``prior=true`` (the
rolling encoders, ``models.prior``) are refused in one line.
"""
from __future__ import annotations

import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pyspark import TaskContext
from pyspark.sql import DataFrame, SparkSession

from . import runs
from .engine import EngineConfig
from .features import features_sql
from .models import ONNX_MODELS, load_model, load_onnx_model
from .models.onnx_inference import onnxruntime_available
from .sequence_frame import build_sequences_frame
from .spark_engine import one_line, register_events, spark_session, sql
from .vocabulary import RAW_EVENT
from .workspace import Workspace

TABULAR_MODELS = ("lightgbm", "logreg")
HISTORY_FIELDS = ("ts", "event", "item_id", "category", "price")  # what build_sequences_frame reads of an event
OUT_SCHEMA = "user_id string, probability double"


def _lit(t: datetime) -> str:
    return f"TIMESTAMP '{t.isoformat(sep=' ')}'"


def check_scorable(run: runs.Run) -> None:
    """Refuse, in one line and before Spark starts, a run that Spark cannot score."""
    if run.members or not (run.model_name in TABULAR_MODELS or run.model_name in ONNX_MODELS):
        raise ValueError(f"--engine spark scores {', '.join((*TABULAR_MODELS, *ONNX_MODELS))} runs; run "
                         f"{run.name!r} is a {run.model_name} run: score it with --engine duckdb")
    if getattr(run.model, "prior", False):  # the rolling encoders run in PyTorch, outside the ONNX graph
        raise ValueError(f"run {run.name!r} reads the rolling encoders' prior (prior=true), which --engine spark "
                         "does not compute: score it with --engine duckdb")


@one_line
def score_users(ws: Workspace, run: runs.Run, cutoff: datetime, lookback: timedelta, out_dir: Path,
                cfg: EngineConfig) -> int:
    """Probabilities of every user active in ``[cutoff - lookback, cutoff)`` written as Parquet files
    ``(user_id, probability)`` into ``out_dir`` by Spark; returns the number of users."""
    check_scorable(run)
    graph = runs.saved_graph(run) if run.model_name in ONNX_MODELS else None  # refused before Spark starts
    if graph is not None and not onnxruntime_available():
        raise ValueError(f"--engine spark scores run {run.name!r} with ONNX Runtime, which is not installed: "
                         "pip install 'purchase-intent[onnx]' (where the executors run too)")
    spark = spark_session(cfg)
    register_events(spark, ws, raw_event=graph is not None)
    # the ids are numbered once and kept (a local checkpoint, not a cache): numbering again after a lost
    # partition could give a user another id in the features than in the join below; a lost checkpoint
    # fails the job instead
    ex = spark.sql(f"""
        SELECT CAST(monotonically_increasing_id() AS BIGINT) AS example_id, user_id,
               {_lit(cutoff)} AS cutoff, CAST(NULL AS TIMESTAMP) AS session_start
        FROM (SELECT DISTINCT user_id FROM events WHERE ts >= {_lit(cutoff - lookback)}
              AND ts < {_lit(cutoff)} AND user_id IS NOT NULL)""").localCheckpoint(eager=True)
    shipped = None  # the broadcast model, released however the job ends
    try:
        ex.createOrReplaceTempView("examples")
        n = ex.count()
        if n == 0:
            return 0
        ids = spark.sql("SELECT count(session_id) > 0 FROM events").collect()[0][0]
        names = list(run.meta["feature_names"])
        feats = sql(spark, features_sql(run.feature_cfg, "examples", "events", session=False, session_ids=bool(ids)))
        X = ex.select("example_id", "user_id").join(feats, "example_id").select("user_id", *[f"`{c}`" for c in names])
        if graph is None:
            scored, shipped = _tabular(spark, run, X, names)
        else:
            scored, shipped = _sequences(spark, run, X, names, cutoff, *graph)
        scored.write.parquet(str(out_dir))
        return int(n)
    finally:
        if shipped is not None:
            shipped.unpersist()


# ---------------------------------------------------------------------------------------------
# tabular runs


def _model_files(run: runs.Run) -> dict[str, bytes]:
    """The run's model folder as ``{relative path: bytes}``: what the executors rebuild the model from
    (LightGBM's text model, logistic regression's JSON; ``models.load_model`` never unpickles)."""
    d = run.dir / runs.MODEL_DIR
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _tabular(spark: SparkSession, run: runs.Run, X: DataFrame, names: list[str]):
    files = spark.sparkContext.broadcast(_model_files(run))
    model_name = run.model_name

    def predict(batches):
        with tempfile.TemporaryDirectory(prefix="purchase-intent-model-") as d:
            for rel, data in files.value.items():
                (Path(d) / rel).parent.mkdir(parents=True, exist_ok=True)
                (Path(d) / rel).write_bytes(data)
            model = load_model(model_name, d)
        for pdf in batches:
            p = model.predict_proba(pdf[names].astype("float64"))[:, 1]
            yield pd.DataFrame({"user_id": pdf["user_id"], "probability": np.asarray(p, dtype=np.float64)})

    return X.mapInPandas(predict, OUT_SCHEMA), files


# ---------------------------------------------------------------------------------------------
# Transformer runs


def _sequences(spark: SparkSession, run: runs.Run, X: DataFrame, names: list[str], cutoff: datetime,
               config: dict, graph: bytes):
    """(user_id, probability) of the rows of ``X`` by the run's ONNX graph, on the executors."""
    fields = HISTORY_FIELDS + ((RAW_EVENT,) if RAW_EVENT in spark.table("events").columns else ())
    event = ", ".join(f"'{f}', " + ("unix_micros(e.ts)" if f == "ts" else f"e.{f}") for f in fields)
    # only events before the cutoff leave the events: the tokens and the features read nothing else
    history = spark.sql(f"""
        SELECT e.user_id, collect_list(named_struct({event})) AS history
        FROM events e LEFT SEMI JOIN examples x ON e.user_id = x.user_id
        WHERE e.ts < {_lit(cutoff)}
        GROUP BY e.user_id""")
    shipped = spark.sparkContext.broadcast((config, graph))  # the run's JSON and graph, as bytes
    model_name, at = run.model_name, np.datetime64(cutoff.replace(tzinfo=None), "us")

    def predict(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        ctx = TaskContext.get()
        model = load_onnx_model(model_name, *shipped.value, n_threads=ctx.cpus() if ctx is not None else 1)
        for batch in batches:
            yield score_histories(model, batch, names, at)

    return X.join(history, "user_id", "left").mapInArrow(predict, OUT_SCHEMA), shipped


def score_histories(model, batch: pa.RecordBatch, names: list[str], cutoff: np.datetime64) -> pa.RecordBatch:
    """Probabilities of one batch of users at ``cutoff``: columns ``user_id``, the features ``names`` and
    ``history`` (each user's events before the cutoff, a list of structs with ``ts`` in epoch
    microseconds); tokens by ``build_sequences_frame``, inputs by ``runs.sequence_inputs``."""
    users = batch.column("user_id").cast(pa.string())
    history = batch.column("history")
    owner = pc.list_parent_indices(history)  # (E,) the row of each event
    flat = history.flatten()  # a null history (no event before the cutoff) adds no event
    events = {f.name: col.to_numpy(zero_copy_only=False) for f, col in zip(flat.type, flat.flatten())}
    events["ts"] = events["ts"].astype(np.int64).astype("datetime64[us]")
    events["user_id"] = users.take(owner).to_numpy(zero_copy_only=False)
    n = batch.num_rows
    examples = pd.DataFrame({"example_id": np.arange(n, dtype=np.int64),
                             "user_id": users.to_numpy(zero_copy_only=False),
                             "cutoff": np.full(n, cutoff, dtype="datetime64[us]")})
    vocab = runs.model_vocab(model)
    tokens = build_sequences_frame(events, examples, vocab.cfg if vocab is not None else None, vocab)
    tab = pa.Table.from_batches([batch]).select(names).to_pandas().astype("float64")
    p = model.predict_proba(runs.sequence_inputs(tokens, tab))[:, 1]
    return pa.RecordBatch.from_arrays([users, pa.array(np.asarray(p, dtype=np.float64), pa.float64())],
                                      names=["user_id", "probability"])
