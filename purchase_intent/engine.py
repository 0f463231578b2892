"""Which engine runs ingest, build and batch scoring: DuckDB (embedded, the default) or Apache Spark.

    purchase-intent build --task user --engine spark
    purchase-intent build --task user --engine spark --spark-conf spark.master=spark://host:7077

Both engines run the same SQL definitions (``labels``, ``features``, ``events``, ``privacy``); Spark
runs them transpiled by SQLGlot (``spark_sql``). Spark needs the ``spark`` extra
(``pip install 'purchase-intent[spark]'``: PySpark and SQLGlot) and a Java runtime from the system
(Debian: ``apt-get install openjdk-17-jre-headless``). :func:`check_engine` says which is missing in
one line, before anything starts.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import storage

ENGINES = ("duckdb", "spark")
JAVA_PACKAGE = "openjdk-17-jre-headless"


class EngineError(RuntimeError):
    """The chosen engine cannot run here (a missing extra or Java, an unknown name, a bad --spark-conf)."""


@dataclass
class EngineConfig:
    """The engine of ingest / build / score and, for Spark, the settings given on the command line.

    ``spark_conf`` entries (``--spark-conf key=value``) override the user's own Spark configuration
    (``$SPARK_CONF_DIR/spark-defaults.conf`` and the ``SPARK_*`` / ``PYSPARK_*`` environment, which
    Spark reads itself). Without ``spark.master`` anywhere, Spark runs in-process on every core
    (``local[*]``).
    """

    name: str = "duckdb"
    spark_conf: dict[str, str] = field(default_factory=dict)


def parse_spark_conf(items: list[str] | None) -> dict[str, str]:
    """``["spark.executor.memory=4g", ...]`` -> dict; a malformed item raises EngineError."""
    conf: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().startswith("spark."):
            raise EngineError(f"--spark-conf {item!r}: use KEY=VALUE with a Spark key, e.g. spark.driver.memory=4g")
        conf[key.strip()] = value.strip()
    return conf


def java_home() -> str | None:
    """The Java runtime Spark will start: ``$JAVA_HOME/bin/java`` or ``java`` on the PATH (None: none)."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return home
    java = shutil.which("java")
    return str(Path(java).resolve().parents[1]) if java else None


def check_engine(cfg: EngineConfig) -> None:
    """Raise EngineError (one line: what to install) unless ``cfg.name`` can run here."""
    if cfg.name not in ENGINES:
        raise EngineError(f"unknown engine {cfg.name!r}; use one of {', '.join(ENGINES)}")
    if cfg.name != "spark":
        return
    if storage.active():
        raise EngineError("--engine spark writes plain Parquet and cannot keep a workspace encrypted at rest: run "
                          f"these steps with the default engine (duckdb), or without {storage.ENCRYPTION_KEY_ENV}")
    missing = [m for m in ("pyspark", "sqlglot") if importlib.util.find_spec(m) is None]
    if missing:
        raise EngineError(f"--engine spark needs {' and '.join(missing)}: pip install 'purchase-intent[spark]'")
    if java_home() is None:
        raise EngineError(f"--engine spark needs a Java runtime (17 or later): apt-get install {JAVA_PACKAGE} "
                          "(or set JAVA_HOME)")
