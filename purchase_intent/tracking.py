"""Experiment tracking in MLflow, where teams already keep their runs.

    purchase-intent run --data events.csv --mlflow http://mlflow.internal:5000
    purchase-intent train --model lightgbm --mlflow file:///srv/mlruns --mlflow-experiment shop-a
    purchase-intent track --run lightgbm --mlflow http://mlflow.internal:5000   # an existing run, again

After `run`, `train` or `evaluate` has written its run folders, each run becomes one MLflow run of the
experiment (default ``purchase-intent``):

* parameters: the model, its version and build id, the estimator's parameters (``params.*``), the
  label, feature and training settings (``label_config.*``, ...);
* metrics: every number of ``metrics.json``, flattened with dots (``test.roc_auc``,
  ``backtest.pooled.pr_auc``, ``paired.test.diff``); a 95% interval ``[lo, hi]`` becomes two metrics,
  ``..._ci_lo`` and ``..._ci_hi``;
* artifacts: the run folder (``run.json``, ``metrics.json``, ``predictions.parquet``, the model) under
  ``run/`` and the workspace's ``report.html`` when there is one. Scores files (``scores-*``) are
  left out: they list users, and a tracking server is no place for them.

The tracking URI is checked before the command starts (reachable, experiment readable or created),
so a wrong URI costs one line and no work. The MLflow client is the ``mlflow-skinny`` package
(``pip install 'purchase-intent[mlflow]'``). MLflow 3 keeps its file store only on request: a
``file:`` URI (or a plain folder) is taken as that request. No credential of the URI is written
anywhere by this module; MLflow reads its own (``MLFLOW_TRACKING_TOKEN``, ...) from the environment.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional
from urllib.parse import urlsplit, urlunsplit

from . import runs
from .workspace import Workspace

MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter's value
_SKIP_ARTIFACTS = re.compile(r"^scores-.*|.*\.summary\.json$")


class TrackingError(RuntimeError):
    """The tracking server or store cannot be used (one line, for the CLI)."""


@dataclass
class TrackingConfig:
    """Where runs are logged: an MLflow tracking URI and the experiment's name."""

    uri: str  # http(s)://host:port, databricks, file:///path, or a folder
    experiment: str = "purchase-intent"
    timeout_s: int = 10  # per request to a tracking server


def redact(uri: str) -> str:
    """``uri`` without its password (``https://user:***@host/...``), for messages."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _store_uri(uri: str) -> str:
    if "://" not in uri and uri != "databricks":  # a plain folder
        return Path(uri).resolve().as_uri()
    return uri


class Tracker:
    """A checked connection to one experiment; ``log_run`` logs one run folder."""

    def __init__(self, cfg: TrackingConfig):
        self.cfg = cfg
        self.uri = _store_uri(cfg.uri)
        if self.uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.timeout_s))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise ImportError("--mlflow needs the MLflow client: pip install 'purchase-intent[mlflow]'") from e
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(cfg.experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(cfg.experiment)
        except Exception as e:  # MLflow raises its own exceptions and requests' ones: all mean "cannot use it"
            raise TrackingError(f"cannot use the MLflow tracking URI {redact(cfg.uri)}: "
                                f"{_scrub(_first_line(e), cfg.uri)}") from e

    def log_run(self, ws: Workspace, run: str, command: str, tags_extra: Optional[dict[str, str]] = None) -> str:
        """Log the run folder ``run`` of ``ws`` as one MLflow run; returns its MLflow run id.

        ``tags_extra``: more MLflow tags (``purchase_intent.`` is prefixed), e.g. a retraining decision."""
        from mlflow.entities import Metric, Param, RunTag

        run_dir = ws.run_dir(run) if not Path(run).is_dir() else Path(run)
        meta = runs.read_meta(run_dir)
        metrics = runs.read_metrics(run_dir) if (run_dir / runs.METRICS_JSON).exists() else {}
        try:
            tags = [RunTag("purchase_intent.command", command), RunTag("purchase_intent.run", run_dir.name),
                    RunTag("purchase_intent.version", str(meta.get("version", ""))),
                    RunTag("purchase_intent.model", str(meta.get("model", "")))]
            tags += [RunTag(f"purchase_intent.{k}", str(v)[:5000]) for k, v in (tags_extra or {}).items()]
            mlrun = self.client.create_run(self.experiment_id, run_name=f"{run_dir.name}@{meta.get('version', '')}",
                                           tags={t.key: t.value for t in tags})
            run_id = mlrun.info.run_id
            params = [Param(k, v) for k, v in run_params(meta).items()]
            values = [Metric(k, v, 0, 0) for k, v in flat_metrics(metrics).items()]
            for i in range(0, len(params), 100):  # MLflow's batch limit: 100 parameters per call
                self.client.log_batch(run_id, params=params[i:i + 100])
            for i in range(0, len(values), 1000):
                self.client.log_batch(run_id, metrics=values[i:i + 1000])
            with tempfile.TemporaryDirectory() as tmp:
                staged = Path(tmp) / "run"
                shutil.copytree(run_dir, staged, ignore=lambda d, names: [n for n in names
                                                                         if _SKIP_ARTIFACTS.match(n)])
                self.client.log_artifacts(run_id, str(staged), artifact_path="run")
            report = ws.root / "report.html"
            if report.exists():
                self.client.log_artifact(run_id, str(report))
            self.client.set_terminated(run_id)
        except Exception as e:
            raise TrackingError(f"logging run {run_dir.name} to MLflow ({redact(self.cfg.uri)}) failed: "
                                f"{_scrub(_first_line(e), self.cfg.uri)}; the run itself is saved in {run_dir}, "
                                f"log it again with "
                                f"`purchase-intent track --run {run_dir.name} --mlflow URI`") from e
        return run_id


def _scrub(text: str, uri: str) -> str:
    """``text`` (an error of the client, which may quote the URI) without the URI's password."""
    password = urlsplit(uri).password
    return text.replace(uri, redact(uri)).replace(password, "***") if password else text


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _flatten(obj: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(obj, (list, tuple)) and obj and all(isinstance(x, dict) for x in obj):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], obj


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def flat_metrics(metrics: dict) -> dict[str, float]:
    """Every finite number of ``metrics.json`` by its dotted path; an interval ``x_ci: [lo, hi]`` gives
    ``x_ci_lo`` and ``x_ci_hi``. Text, lists of other kinds and missing values are left out."""
    out: dict[str, float] = {}
    for key, v in _flatten(metrics):
        if isinstance(v, (list, tuple)) and len(v) == 2 and key.endswith("ci"):
            lo, hi = _number(v[0]), _number(v[1])
            if lo is not None and hi is not None:
                out[f"{key}_lo"], out[f"{key}_hi"] = lo, hi
        elif (x := _number(v)) is not None:
            out[key] = x
    return out


def run_params(meta: dict) -> dict[str, str]:
    """The settings of ``run.json`` as MLflow parameters (text, at most ``MAX_PARAM_CHARS`` each)."""
    keep = {k: meta.get(k) for k in ("model", "version", "build_id", "params", "train_config", "label_config",
                                     "feature_config") if meta.get(k) is not None}
    out = {}
    for key, v in _flatten(keep):
        if isinstance(v, (list, tuple)):
            v = ",".join(map(str, v))
        out[key] = str(v)[:MAX_PARAM_CHARS]
    return out
