"""The two data steps before any model: ``ingest`` (raw logs -> canonical events) and ``build``
(events -> examples, time split and tabular features).

They need DuckDB, Arrow and pandas only, not PyTorch or scikit-learn: the ``ingest`` and ``build``
commands import this module (``commands``), not ``pipeline``, so that they start in about a second
instead of four. ``pipeline`` exports both for the Python API.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pandas as pd

from . import labels, runs, splits
from .config import DataConfig, FeatureConfig, LabelConfig
from .engine import EngineConfig, check_engine
from .event_database import DatabaseQuery
from .event_sources import preset_time_zone
from .events import ingest as ingest_events
from .features import compute_features, copy_features
from .runs import Built, jsonable, load_built
from .workspace import Workspace, as_workspace


def log(msg: str, quiet: bool = False) -> None:
    """Print one progress line, unless ``quiet``."""
    if not quiet:
        print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# ingest
def ingest(paths: str | Path | DatabaseQuery | Sequence[str | Path | DatabaseQuery], cfg: DataConfig, workspace=None,
           progress: bool = True, engine: EngineConfig | None = None):
    """Read, validate, pseudonymise and store raw event files (or a database query's rows). Returns the
    ingest report. ``engine=EngineConfig("spark")`` reads Parquet files on Spark (the same files result)."""
    if isinstance(paths, (str, Path, DatabaseQuery)):
        paths = [paths]
    ingest_file = None
    if engine is not None and engine.name != "duckdb":
        check_engine(engine)
        if any(isinstance(p, DatabaseQuery) for p in paths):
            raise ValueError("--engine spark ingests Parquet files; read a database with --engine duckdb")
        from .spark_engine import SparkIngest  # needs the spark extra
        ingest_file = SparkIngest(engine)
    return ingest_events(as_workspace(workspace), [p if isinstance(p, DatabaseQuery) else Path(p) for p in paths],
                         cfg, progress=progress, ingest_file=ingest_file)


# ---------------------------------------------------------------------------------------------
# build
def resolve_time_zone(ws: Workspace, tz: str | None, quiet: bool = True) -> str:
    """The time zone of day-based cutoffs: ``tz`` when given, else the one every ingested file was read in
    (``--ts-zone``) or its preset documents (all the same; e.g. taobao: Asia/Shanghai), else UTC. Raises
    ValueError for an unknown name."""
    how = "(--tz)"
    if tz is None:  # the zone the events were read in (--ts-zone), else the one their preset documents
        def zone(entry: dict) -> str | None:
            read_in = (entry.get("settings") or {}).get("ts_zone")
            return read_in if read_in not in (None, "UTC") else preset_time_zone(entry.get("format", ""))

        zones = {zone(e) for e in ws.read_manifest()["files"]}
        if len(zones) == 1 and None not in zones:
            tz, how = zones.pop(), ", the time zone of the ingested data (--tz to change)"
        else:
            tz, how = "UTC", "(--tz to change)"
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {tz!r}: use an IANA name such as UTC, Europe/Berlin or "
                         "America/New_York") from None
    log(f"day cutoffs at midnight {tz}{'' if how.startswith(',') else ' '}{how}", quiet)
    return tz


class _DuckDBBuild:
    """``build``'s three engine calls on DuckDB (``spark_engine.SparkBuild`` has the same on Spark)."""

    def __init__(self, ws: Workspace):
        self.con = ws.connect()

    def build_examples(self, cfg: LabelConfig):
        return labels.build_examples(self.con, cfg)

    def suggest_step(self, cfg: LabelConfig):
        return labels.suggest_step(self.con, cfg)

    def compute_features(self, ex: pd.DataFrame, cfg: FeatureConfig) -> pd.DataFrame:
        runs.register_examples(self.con, ex)
        return compute_features(self.con, "examples", cfg)

    def write_features(self, ex: pd.DataFrame, cfg: FeatureConfig, path: Path) -> list[str]:
        """The features of ``ex`` streamed by DuckDB to the Parquet file ``path`` (nothing in Python)."""
        runs.register_examples(self.con, ex)
        return copy_features(self.con, path, "examples", cfg)

    def close(self) -> None:
        self.con.close()


def _builder(ws: Workspace, engine: EngineConfig | None):
    engine = engine or EngineConfig()
    check_engine(engine)
    if engine.name == "spark":
        from .spark_engine import SparkBuild  # needs the spark extra
        return SparkBuild.for_workspace(ws, engine)
    return _DuckDBBuild(ws)


def _no_positives(ws: Workspace, n_examples: int, label_cfg: LabelConfig) -> str:
    """Why every label is 0, for the error of ``build``: no purchase among the events (and the event names
    stored as other, one of which may be the shop's purchase), or purchases outside every label window."""
    with ws.connect() as con:
        purchases = con.execute("SELECT count(*) FROM events WHERE event = 'purchase'").fetchall()[0][0]
        n_events, n_users = con.execute("SELECT count(*), count(DISTINCT user_id) FROM events").fetchall()[0]
    if purchases and label_cfg.task == "user" and n_events < 1.05 * n_users:
        return (f"no example has a purchase in its label window ({n_examples:,} examples, every label 0): the "
                f"{n_users:,} users hold {n_events:,} events, one each or nearly, so no purchase follows a user's "
                f"earlier events. Is the user id one per order (Olist's customer_id; its customer_unique_id names "
                f"the shopper)? Ingest with --map user_id=COLUMN naming the shopper, into a new workspace")
    if purchases and label_cfg.task == "session":
        return (f"no session has a purchase ({n_examples:,} sessions, every label 0; the events hold {purchases:,} "
                f"purchases, none in a session the split keeps): check --session-gap and --prefix")
    if purchases:
        return (f"no example has a purchase in its label window ({n_examples:,} examples, every label 0; the "
                f"events hold {purchases:,} purchases, all outside the windows): try a longer --horizon "
                f"(now {label_cfg.horizon}) or another --step")
    other: dict[str, int] = {}
    for entry in ws.read_manifest()["files"]:
        for name, n in (entry.get("unmapped_events") or {}).items():
            other[name] = other.get(name, 0) + int(n)
    names = ", ".join(f"{k!r} ({v:,})" for k, v in sorted(other.items(), key=lambda kv: -kv[1])[:6])
    hint = (f"; the events stored as other are named {names}: if one is the shop's purchase, ingest the log "
            f"into a new workspace with --event-map NAME=purchase" if other else
            "; map the shop's purchase event with --event-map NAME=purchase (in a new workspace)")
    return f"the events hold no purchase, so every label would be 0 ({n_examples:,} examples){hint}"


def build(label_cfg: LabelConfig, feature_cfg: FeatureConfig | None = None, workspace=None,
          quiet: bool = False, engine: EngineConfig | None = None) -> Built:
    """Examples (cutoffs x active users, or sessions) + time split + tabular features, on DuckDB or, with
    ``engine=EngineConfig("spark")``, on Spark (the same definitions and the same files)."""
    ws = as_workspace(workspace)
    feature_cfg = feature_cfg or FeatureConfig()
    label_cfg = dataclasses.replace(label_cfg, tz=resolve_time_zone(ws, label_cfg.tz, quiet))
    if label_cfg.task == "session" and label_cfg.session_gap:
        feature_cfg = dataclasses.replace(feature_cfg, session_gap=label_cfg.session_gap)
    # hour-of-day and weekday features read the clock of the shop's time zone
    feature_cfg = dataclasses.replace(feature_cfg, tz=label_cfg.tz)
    t0 = time.perf_counter()
    eng = _builder(ws, engine)
    log(f"building {label_cfg.task}-task examples ...", quiet)
    table = eng.build_examples(label_cfg)
    counts = labels.example_counts(table)
    ex = table.to_pandas()
    if len(ex) == 0:
        raise ValueError("no examples: the data is shorter than lookback + horizon, or no user is active")
    if not ex["label"].any():
        raise ValueError(_no_positives(ws, len(ex), label_cfg))
    try:
        split, split_info = splits.split_examples(ex, label_cfg)
    except splits.TooFewPeriods as e:
        step = eng.suggest_step(label_cfg)
        raise splits.TooFewPeriods(f"{e} (e.g. --step {step}, which fits this data)" if step else str(e)) from None
    log(describe_dropped(counts), quiet)
    ex["split"] = np.asarray(split)
    if not ex["example_id"].is_monotonic_increasing:  # the feature file's rows follow example_id
        raise RuntimeError("examples are not in example_id order; this is a bug, please report it")
    log(f"computing features for {len(ex):,} examples ...", quiet)
    names: list[str] = []

    def write_features(path: Path) -> None:
        names.extend(eng.write_features(ex, feature_cfg, path))

    def make_info() -> dict:
        info = {
            "label_config": asdict(label_cfg),
            "feature_config": asdict(feature_cfg),
            "feature_names": names,
            "n_examples": int(len(ex)),
            "positives": int(ex["label"].sum()),
            "dropped": dict(counts.get("dropped", {})),  # examples never made, by reason
            "split": jsonable(split_info),
            "seconds": round(time.perf_counter() - t0, 2),
            "engine": (engine or EngineConfig()).name,
        }
        info["build_id"] = hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return info

    try:
        runs.write_built(ws, ex, write_features, make_info)
    finally:
        eng.close()
    log(split_info.describe(), quiet)
    built = load_built(ws)
    log(f"built {len(ex):,} examples with {len(names)} features in {built.info['seconds']:.1f}s", quiet)
    return built


def describe_dropped(counts: dict) -> str:
    """One line per reason ``labels.build_examples`` left something out, e.g.
    ``dropped 3 sessions: may continue after the end of the data``."""
    unit = "sessions" if counts.get("task") == "session" else "users"
    of = f" of {counts[unit]:,} {unit}" if isinstance(counts.get(unit), int) else f" {unit}"
    dropped = counts.get("dropped", {})
    if not any(dropped.values()):
        return f"dropped nothing ({of.strip()})"
    return "\n".join(f"dropped {n:,}{of}: {reason.removeprefix(unit + ' ')}" for reason, n in dropped.items() if n)
