"""The `purchase-intent` command: a thin argparse layer over `purchase_intent.pipeline`.

    purchase-intent quickstart
    purchase-intent ingest data/events.csv.gz --format csv --map user_id=visitor --map ts=event_time
    purchase-intent build --task user --lookback 28d --horizon 7d --step 7d
    purchase-intent train --model lightgbm
    purchase-intent evaluate --run lightgbm --backtest 3
    purchase-intent run --data UserBehavior.csv.gz --format taobao --lookback 3d --horizon 1d --step 1d
    purchase-intent ingest --data postgresql://shop@db:5432/shop --query "SELECT * FROM events" --since-last
    purchase-intent forget --user 12345
    purchase-intent rotate-key --new-key-file new.key

Flags map 1:1 onto the fields of the config dataclasses in `purchase_intent.config`; a flag not
given keeps the dataclass default. The workspace is `--workspace DIR`, else the environment variable
PURCHASE_INTENT_WORKSPACE, else ./pi-workspace. Global options (``--workspace``) go before or after the
command name: ``purchase-intent --workspace ws build`` and ``purchase-intent build --workspace ws`` are
the same. A new command is ``sub.add_parser(...)`` in ``build_parser`` and gets the global options itself.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from . import (
    distributed,
    erasure,
    explain,
    memory,
    monitor,
    pipeline,
    pretrain,
    report,
    retrain,
    rotation,
    runs,
    score,
    tracking,
)
from .config import DataConfig, FeatureConfig, LabelConfig, TrainConfig
from .engine import ENGINES, JAVA_PACKAGE, EngineConfig, check_engine, parse_spark_conf
from .ensemble import evaluate_ensemble
from .event_database import DatabaseQuery, is_database_url
from .privacy import KEY_ENV, pseudonym_for
from .serve.settings import API_KEYS_ENV, ServeSettings, read_api_keys
from .simulate import SimConfig, write_events
from .storage import ENCRYPTION_KEY_ENV, check_workspace, set_key_file
from .tabular import run_table
from .workspace import WORKSPACE_ENV, Workspace


def _pairs(values: Optional[list[str]], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        if "=" not in v:
            raise SystemExit(f"error: {flag} expects KEY=VALUE, got {v!r}")
        k, val = v.split("=", 1)
        out[k.strip()] = val.strip()
    return out


def _params(values: Optional[list[str]]) -> dict[str, Any]:
    """--param key=value; values are parsed as JSON when they can be (numbers, true/false, lists)."""
    out: dict[str, Any] = {}
    for k, v in _pairs(values, "--param").items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# global options: accepted before the command name (the main parser) and after it (every command)
def _add_global_flags(p: argparse.ArgumentParser, default_workspace: Any) -> None:
    p.add_argument("--workspace", default=default_workspace,
                   help="workspace folder (default: $PURCHASE_INTENT_WORKSPACE or ./pi-workspace)")
    p.add_argument("--encryption-key-file", metavar="PATH",
                   default=argparse.SUPPRESS if default_workspace is argparse.SUPPRESS else None,
                   help=f"encrypt the workspace at rest with the key in this file (kept outside the workspace; "
                        f"else ${ENCRYPTION_KEY_ENV}, if set; README, 'Encryption at rest')")
    p.add_argument("--memory-limit", metavar="SIZE", default=None if default_workspace is not argparse.SUPPRESS
                   else argparse.SUPPRESS,
                   help=f"memory DuckDB and the streamed batches may use, e.g. 4GB; DuckDB spills past it "
                        f"(default: ${memory.MEMORY_LIMIT_ENV}, else DuckDB's 80%% of RAM)")
    p.add_argument("--spill-dir", metavar="DIR", default=None if default_workspace is not argparse.SUPPRESS
                   else argparse.SUPPRESS,
                   help=f"encrypted workspace: the folder DuckDB may spill to past the memory limit (its spill "
                        f"files are plaintext: put it on an encrypted volume); without it an encrypted workspace never "
                        f"spills "
                        f"(default: ${memory.SPILL_DIR_ENV})")


class _CommandParser(argparse.ArgumentParser):
    """The parser of one command: it also takes the global options, after the command name.

    Their default is SUPPRESS, so a global option not repeated after the command keeps the value the
    main parser gave it (before the command name, or its default)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _add_global_flags(self, argparse.SUPPRESS)


# ---------------------------------------------------------------------------------------------
# flag groups, one per config dataclass
def _add_data_flags(p: argparse.ArgumentParser, positional: bool) -> None:
    if positional:
        p.add_argument("paths", nargs="*", metavar="PATH",
                       help="raw event files (CSV, CSV.gz, Parquet, JSON Lines) or folders of them")
    p.add_argument("--format", default="csv",
                   help="taobao | retailrocket | rees46 | otto | ga4 (GA4 BigQuery export, Parquet or NDJSON) | "
                        "segment (Segment / RudderStack tracks, JSON Lines) | csv | parquet | jsonl (default: csv)")
    p.add_argument("--map", action="append", metavar="CANON=COLUMN",
                   help="map a canonical field (user_id, ts, event, item_id, category, price, session_id) "
                        "to a source column; repeatable")
    p.add_argument("--event-map", action="append", metavar="RAW=CANON",
                   help="map a raw event name to view|cart|remove_from_cart|wishlist|checkout|purchase|other; "
                        "repeatable (names no map names are stored as other, their raw name kept)")
    p.add_argument("--ts-unit", choices=["s", "ms", "us", "iso"],
                   help="timestamp unit (default: the preset's, else detected)")
    p.add_argument("--strict", action="store_true", help="fail (and store nothing) if any row is rejected")
    p.add_argument("--strict-events", action="store_true",
                   help="reject (unknown_event) the rows whose event name no map names, instead of storing them "
                        "as other")
    p.add_argument("--since", help="keep events at or after this ISO time; earlier ones are counted as filtered")
    p.add_argument("--until", help="keep events before this ISO time; later ones are counted as filtered")


def _add_database_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--query", metavar="SQL",
                   help="with --data postgresql://USER@HOST:PORT/DB: the SELECT whose rows are the events (the same "
                        "--map, --event-map and validation as a file; pass the password in $PGPASSWORD or ~/.pgpass)")
    p.add_argument("--since-last", action="store_true",
                   help="database source: only rows after the newest event already ingested from this query")


def _sources(a: argparse.Namespace) -> list:
    """The files (``paths``, ``--data``) or the one database query (``--data URL --query SQL``) to ingest."""
    given = list(getattr(a, "paths", None) or []) + list(a.data or [])
    urls = [d for d in given if is_database_url(d)]
    if a.query is None:
        if urls:
            raise SystemExit("error: a database source needs --query \"SELECT ...\" (the rows to read)")
        if a.since_last:
            raise SystemExit("error: --since-last applies to a database source: --data postgresql://... --query ...")
        return given
    if len(urls) != 1 or len(given) != 1:
        raise SystemExit("error: --query reads from one database: give exactly one --data postgresql://USER@HOST/DB "
                         "and no files")
    return [DatabaseQuery(urls[0], a.query, since_last=a.since_last)]


def _data_cfg(a: argparse.Namespace) -> DataConfig:
    return DataConfig(format=a.format, mapping=_pairs(a.map, "--map"), event_map=_pairs(a.event_map, "--event-map"),
                      ts_unit=a.ts_unit, strict=a.strict, strict_events=a.strict_events, since=a.since, until=a.until)


def _add_label_flags(p: argparse.ArgumentParser) -> None:
    d = LabelConfig()
    p.add_argument("--task", choices=["user", "session"], default=d.task,
                   help="user: will the user buy in [cutoff, cutoff+horizon); "
                        "session: does the session contain a purchase")
    p.add_argument("--lookback", default=d.lookback,
                   help=f"active-user window before each cutoff (default {d.lookback})")
    p.add_argument("--horizon", default=d.horizon, help=f"label window after each cutoff (default {d.horizon})")
    p.add_argument("--step", default=d.step,
                   help=f"distance between cutoffs / width of a split period (default {d.step})")
    p.add_argument("--tz", default=d.tz, help="time zone whose midnight day-based cutoffs fall on (default: the one "
                                              "the data's preset documents, e.g. taobao: Asia/Shanghai; else UTC)")
    p.add_argument("--session-gap", help="session task: start a new session after this inactivity gap (e.g. 30min)")
    p.add_argument("--prefix", type=int, help="session task: the model sees at most the first K events of a session")
    p.add_argument("--valid-cutoffs", type=int, default=d.valid_cutoffs,
                   help="cutoffs (periods) in the validation split")
    p.add_argument("--test-cutoffs", type=int, default=d.test_cutoffs, help="cutoffs (periods) in the test split")
    f = FeatureConfig()
    p.add_argument("--windows", default=",".join(f.windows),
                   help=f"feature count windows (default {','.join(f.windows)})")
    p.add_argument("--history", help="how far back any feature looks (default: all history)")


def _label_cfg(a: argparse.Namespace) -> LabelConfig:
    return LabelConfig(task=a.task, lookback=a.lookback, horizon=a.horizon, step=a.step, tz=a.tz,
                       session_gap=a.session_gap, prefix=a.prefix, valid_cutoffs=a.valid_cutoffs,
                       test_cutoffs=a.test_cutoffs)


def _feature_cfg(a: argparse.Namespace) -> FeatureConfig:
    return FeatureConfig(windows=tuple(w.strip() for w in a.windows.split(",") if w.strip()), history=a.history)


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--min-positives", type=int, default=d.min_positives,
                   help="refuse to train with fewer positives in train")
    p.add_argument("--min-negatives", type=int, default=d.min_negatives,
                   help="refuse to train with fewer negatives in train")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="model hyperparameter (e.g. --param C=0.5, --param preset=small); repeatable")


def _train_cfg(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(min_positives=a.min_positives, min_negatives=a.min_negatives, seed=a.seed)


def _add_pretrain_flags(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The PretrainConfig flags; ``prefix`` ("pretrain-") when they sit beside other commands' flags."""
    d = pretrain.PretrainConfig()
    p.add_argument(f"--{prefix}objective", choices=list(pretrain.OBJECTIVES), default=d.objective,
                   help=f"masked-event modelling, contrastive (two crops of one user), next-event or future "
                        f"(next events and purchases within 1/7/28 days of a random cutoff; default {d.objective})")
    p.add_argument(f"--{prefix}preset", choices=["tiny", "small", "base"], default=d.preset,
                   help=f"encoder size (default {d.preset})")
    p.add_argument(f"--{prefix}max-seq-len", type=int, default=d.max_seq_len,
                   help=f"most recent events per user (default {d.max_seq_len})")
    p.add_argument(f"--{prefix}epochs", type=int, default=d.epochs, help=f"passes over the users (default {d.epochs})")
    p.add_argument(f"--{prefix}batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument(f"--{prefix}lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument(f"--{prefix}init", metavar="PATH",
                   help="start from the encoder folder of another workspace (its runs/pretrained): its architecture, "
                        "fields and buckets are kept, the weights that keep their meaning here are copied, the rest "
                        "re-initialised (one line each); then the epochs run here (0 keeps the copy)")
    p.add_argument(f"--{prefix}d-model", type=int, metavar="D",
                   help="encoder width (default: the preset's; with an init the init encoder's, and another raises)")
    p.add_argument(f"--{prefix}param", action="append", metavar="KEY=VALUE",
                   help="differential privacy: dp_epsilon=E (user-level DP-SGD; masked or next objective), and "
                        f"{', '.join(pretrain.DP_PARAMS[1:])} as for train; repeatable")


def _pretrain_cfg(a: argparse.Namespace, prefix: str = "", **extra) -> pretrain.PretrainConfig:
    g = lambda name: getattr(a, prefix.replace("-", "_") + name)  # noqa: E731
    params = _params(g("param"))
    unknown = sorted(set(params) - set(pretrain.DP_PARAMS))
    if unknown:
        raise ValueError(f"unknown --{prefix}param {', '.join(unknown)}: pretrain takes "
                         f"{', '.join(pretrain.DP_PARAMS)} (its other settings are flags, see --help)")
    extra = {**params, **extra}
    return pretrain.PretrainConfig(objective=g("objective"), preset=g("preset"), max_seq_len=g("max_seq_len"),
                                   epochs=g("epochs"), batch_size=g("batch_size"), lr=g("lr"), init=g("init"),
                                   d_model=g("d_model"), **extra)


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=ENGINES, default="duckdb",
                   help="duckdb (embedded, default) or spark: the same definitions on Apache Spark "
                        "(pip install 'purchase-intent[spark]' and Java 17: apt-get install " + JAVA_PACKAGE + ")")
    p.add_argument("--spark-conf", action="append", metavar="KEY=VALUE",
                   help="a Spark setting (repeatable), e.g. spark.master=spark://host:7077 or spark.driver.memory=4g; "
                        "on top of $SPARK_CONF_DIR/spark-defaults.conf and SPARK_* variables")
    p.set_defaults(check=_check_engine)


def _engine(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(a.engine, parse_spark_conf(a.spark_conf))


def _check_engine(a: argparse.Namespace) -> None:
    """Before the workspace lock: Spark or Java missing costs one line and nothing else."""
    check_engine(_engine(a))
    if hasattr(a, "mlflow"):  # run: the tracking flags' own check too
        _check_tracking(a)
    given = [f for f in ("param", "init") if getattr(a, f"pretrain_{f}", None)]
    if given and not getattr(a, "pretrain", False):  # run: pretraining settings without the pretraining
        raise ValueError(f"{', '.join('--pretrain-' + f for f in given)} set the pretraining that --pretrain runs: "
                         "add --pretrain")


# ---------------------------------------------------------------------------------------------
# commands
def cmd_ingest(a: argparse.Namespace) -> int:
    sources = _sources(a)
    if not sources:
        raise SystemExit("error: ingest needs PATH... (files) or --data postgresql://... --query \"SELECT ...\"")
    report = pipeline.ingest(sources, _data_cfg(a), a.workspace, engine=_engine(a))
    print(report.summary())
    return 0


def cmd_pseudonym(a: argparse.Namespace) -> int:
    for raw, pseudo in pseudonym_for(Workspace(a.workspace), a.ids).items():
        print(f"{raw}\t{pseudo}")
    return 0


def cmd_build(a: argparse.Namespace) -> int:
    pipeline.build(_label_cfg(a), _feature_cfg(a), a.workspace, engine=_engine(a))
    return 0


def _add_tracking_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mlflow", metavar="URI",
                   help="also log the runs to MLflow: a tracking server (http://host:5000), databricks, or a "
                        "file store (file:///path or a folder); needs pip install 'purchase-intent[mlflow]'")
    p.add_argument("--mlflow-experiment", default="purchase-intent", metavar="NAME",
                   help="MLflow experiment (default purchase-intent; created when missing)")
    p.set_defaults(check=_check_tracking)


def _check_tracking(a: argparse.Namespace) -> None:
    """Before the command's work: a tracking URI that cannot be used costs one line and nothing else."""
    a.tracker = None
    if a.mlflow:
        if getattr(a, "table", None):
            raise ValueError("--mlflow logs workspace runs; it does not apply to tabular mode (--table)")
        a.tracker = tracking.Tracker(tracking.TrackingConfig(a.mlflow, a.mlflow_experiment))
    elif a.command == "track":
        raise ValueError("track needs --mlflow URI")


def _track(a: argparse.Namespace, names: list[str], tags: Optional[dict[str, str]] = None) -> None:
    tracker = getattr(a, "tracker", None)
    if tracker is None:
        return
    ws = Workspace(a.workspace)
    for name in names:
        if (ws.run_dir(name) / runs.RUN_JSON).exists() or Path(name).is_dir():
            run_id = tracker.log_run(ws, name, a.command, tags)
            print(f"logged run {name} to MLflow ({tracking.redact(a.mlflow)}), run id {run_id}")


def cmd_train(a: argparse.Namespace) -> int:
    pipeline.train(a.model, run=a.run, params=_params(a.param), train_cfg=_train_cfg(a), workspace=a.workspace)
    _track(a, [a.run or a.model])
    return 0


def cmd_track(a: argparse.Namespace) -> int:
    ws = Workspace(a.workspace)
    missing = [r for r in a.run if not (ws.run_dir(r) / runs.RUN_JSON).exists() and not Path(r).is_dir()]
    if missing:
        raise ValueError(f"no run {', '.join(map(repr, missing))} in {ws.root}: name a trained run")
    _track(a, a.run)
    return 0


def cmd_pretrain(a: argparse.Namespace) -> int:
    cfg = _pretrain_cfg(a, seed=a.seed, cutoff=a.cutoff, backtest=a.backtest)
    pretrain.pretrain(a.workspace, cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


def cmd_ensemble(a: argparse.Namespace) -> int:
    members = [m.strip() for m in a.members.split(",") if m.strip()]
    evaluate_ensemble(Workspace(a.workspace), members, n_boot=a.n_boot, run=a.run)
    print(pipeline.compare(members + [a.run], a.workspace, n_boot=a.n_boot))
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    pipeline.evaluate(a.run, a.workspace, backtest=a.backtest, n_boot=a.n_boot)
    print(pipeline.compare([a.run], a.workspace, n_boot=a.n_boot))
    _track(a, [a.run])
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    if a.table:
        if not a.label:
            raise SystemExit("error: --table needs --label COLUMN")
        run_table(a.table, a.label, time_column=a.time_column, models=models, seed=a.seed, n_boot=a.n_boot,
                  drop_columns=[c.strip() for c in (a.drop or "").split(",") if c.strip()],
                  min_positives=a.min_positives, min_negatives=a.min_negatives,
                  out_dir=os.path.join(a.workspace, "runs", "table"))  # prints the comparison table
        return 0
    if not a.data:
        raise SystemExit("error: run needs --data PATH (or --table FILE --label COLUMN)")
    data = _sources(a)
    params = {m: _params(a.param) for m in models} if a.param else None
    pretrained = [m for m in models if m in pipeline.PRETRAINED_MODELS]
    if pretrained and not a.pretrain and not Workspace(a.workspace).run_dir(pretrain.PRETRAINED_RUN).exists():
        raise SystemExit(f"error: {', '.join(pretrained)} need a pretrained encoder: add --pretrain")
    pt = _pretrain_cfg(a, "pretrain-", seed=a.seed) if a.pretrain else False
    pipeline.run(data, _data_cfg(a), _label_cfg(a), _feature_cfg(a), models=models, backtest=a.backtest,
                 train_cfg=_train_cfg(a), params=params, workspace=a.workspace, n_boot=a.n_boot, pretrain=pt,
                 engine=_engine(a))
    _track(a, models)
    return 0


def cmd_quickstart(a: argparse.Namespace) -> int:
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    pipeline.quickstart(a.workspace, models=models, n_users=a.users, days=a.days, seed=a.seed)
    return 0


def cmd_simulate(a: argparse.Namespace) -> int:
    n = write_events(SimConfig(n_users=a.users, days=a.days, seed=a.seed), a.out)
    print(f"wrote {n:,} simulated events to {a.out}")
    return 0


def cmd_score(a: argparse.Namespace) -> int:
    cfg = score.ScoreConfig(at=a.at, chunk_size=a.chunk_size, top=a.top, top_n=a.top_n,
                            min_probability=a.min_probability, reasons=a.reasons, min_users=a.min_users,
                            reidentify=a.reidentify)
    result = score.score(a.run, a.out, cfg, workspace=a.workspace, progress=not a.quiet, engine=_engine(a))
    print(score.describe(result))
    return 0


def _add_score_parser(sub) -> None:
    d = score.ScoreConfig()
    p = sub.add_parser("score", help="score every active user (batch) and optionally cut an audience",
                       description=score.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run name under <workspace>/runs/ or a path to a run directory")
    p.add_argument("--out", help="output file: .parquet, .csv or .csv.gz (default: a file in the run's folder; "
                                 "the path written is printed)")
    p.add_argument("--at", help="scoring time T, ISO 8601 or epoch seconds (UTC); default: end of the data")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help=f"users per chunk (default {d.chunk_size:,})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--top", help="audience: the top share of users, e.g. 10%%")
    g.add_argument("--top-n", type=int, help="audience: the N most likely buyers")
    g.add_argument("--min-probability", type=float, help="audience: users with probability >= P")
    p.add_argument("--reasons", type=int, default=d.reasons, metavar="K",
                   help="add each user's top K reasons as columns reason_k and reason_k_contribution (e.g. 3)")
    p.add_argument("--min-users", type=int, default=d.min_users, metavar="K",
                   help=f"thresholds: the summary withholds counts of fewer than K users (default {d.min_users}; "
                        "1 shows every count)")
    p.add_argument("--reidentify", metavar="FILE",
                   help="the key holder's file of raw user ids (CSV with a user_id column, or .txt, one per line): "
                        "adds their raw id as a column raw_user_id (the scores file then is personal data)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_engine_flags(p)
    p.set_defaults(func=cmd_score)


SERVE_DOC = """The real-time scoring API (FastAPI) for one run; needs `pip install 'purchase-intent[serve]'`.

    PURCHASE_INTENT_API_KEYS=change-me-please purchase-intent serve --run lightgbm --port 8000
    curl -s localhost:8000/v1/score -H 'Authorization: Bearer change-me-please' \\
         -H 'Content-Type: application/json' \\
         -d '{"user_id": "u1", "events": [{"ts": "2017-12-02T10:00:00Z", "event": "view", "item_id": "i1"}]}'

Routes: POST /v1/score, POST /v1/score/batch, GET /v1/users/{user_id}/score (from the workspace's
events), POST /v1/admin/reload (swap in a run; `kill -HUP` reloads the current one), GET /v1/model,
GET /metrics (Prometheus), and without a key GET /healthz, GET /readyz, /docs.
"""


def cmd_serve(a: argparse.Namespace) -> int:
    try:  # the [serve] extra
        import uvicorn

        from .serve.app import create_app
    except ImportError as e:
        raise ImportError(f"`serve` needs the serve extra ({e.name} is missing): "
                          "pip install 'purchase-intent[serve]'") from e
    settings = ServeSettings(workspace=a.workspace, run=a.run, runs_dir=a.runs_dir, host=a.host, port=a.port,
                             api_keys=read_api_keys(key_file=a.api_key_file), max_events=a.max_events,
                             max_users=a.max_users, max_body_bytes=a.max_body_bytes, log_level=a.log_level,
                             freeze_gc=True, record_pid=True)
    app = create_app(settings)
    print(f"serving run {settings.run!r} from {settings.runs_path.resolve()} on http://{settings.host}:{settings.port} "
          f"(docs: /docs; pid {os.getpid()}; `kill -HUP {os.getpid()}` reloads the run)", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False)
    return 0


def _add_serve_parser(sub) -> None:
    d = ServeSettings()
    p = sub.add_parser("serve", help="real-time scoring API (FastAPI) for one run",
                       description=SERVE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True,
                   help="run name under the runs directory (the only place runs are loaded from)")
    p.add_argument("--runs-dir", help="directory of runs (default: <workspace>/runs)")
    p.add_argument("--host", default=d.host, help=f"bind address (default {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port})")
    p.add_argument("--api-key-file",
                   help=f"file with one API key per line (merged with ${API_KEYS_ENV}, comma-separated)")
    p.add_argument("--max-events", type=int, default=d.max_events, help="events per user in a request (422 above)")
    p.add_argument("--max-users", type=int, default=d.max_users, help="users per batch request (422 above)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="request body size (413 above)")
    p.add_argument("--log-level", default=d.log_level, help="uvicorn log level (default warning)")
    p.set_defaults(func=cmd_serve)


# ---------------------------------------------------------------------------------------------
def cmd_explain(a: argparse.Namespace) -> int:
    e = explain.explain_user(a.run, a.user, at=a.at, workspace=a.workspace, top=a.top, ig_steps=a.ig_steps)
    stale = runs.stale_warning(Workspace(a.workspace).run_dir(a.run))
    if stale:  # the run learned from data since erased (`forget`)
        print(f"warning: {stale}", file=sys.stderr)
    print(json.dumps(e, indent=2, default=str) if a.json else explain.format_explanation(e))
    return 0


def _add_explain_parser(sub) -> None:
    p = sub.add_parser("explain", help="why a user gets their score: the top reasons, in log-odds")
    p.add_argument("--run", required=True, help="run name under <workspace>/runs/ or a path to a run directory")
    p.add_argument("--user", required=True, help="user id (raw: looked up with the workspace key; or the pseudonym)")
    p.add_argument("--at", help="scoring time T, ISO 8601 or epoch seconds (UTC); default: end of the data")
    p.add_argument("--top", type=int, default=5, help="number of reasons (default 5)")
    p.add_argument("--ig-steps", type=int, default=32, help="integrated-gradients steps (transformer)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_explain)


def cmd_report(a: argparse.Namespace) -> int:
    path = report.write_report(a.workspace, a.run or None, out=a.out, explain=not a.no_explain,
                               min_users=a.min_users)
    ws = Workspace(a.workspace)
    for line in report.stale_runs(ws, a.run or report.available_runs(ws)):
        print(f"warning: {line}", file=sys.stderr)
    print(f"report: {path.resolve()}")
    return 0


def cmd_forget(a: argparse.Namespace) -> int:
    print(erasure.describe(erasure.forget(a.workspace, users=a.user or [], pseudonyms=a.pseudonym or [])))
    return 0


def _check_forget(a: argparse.Namespace) -> None:
    """Before the lock: a forget with nobody named, or of no workspace, changes (and creates) nothing."""
    if not (a.user or a.pseudonym):
        raise ValueError("forget needs --user RAW_ID or --pseudonym P (repeatable)")
    if not Workspace(a.workspace).root.is_dir():
        raise ValueError(f"no workspace at {a.workspace}")


def _add_forget_parser(sub) -> None:
    p = sub.add_parser("forget", help="erase users' rows from the workspace on request (GDPR art. 17), in one commit",
                       description=erasure.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--user", action="append", metavar="RAW_ID",
                   help="raw user id, looked up with the workspace key (never stored); repeatable")
    p.add_argument("--pseudonym", action="append", metavar="P",
                   help="a pseudonym as `purchase-intent pseudonym` prints it; repeatable")
    p.set_defaults(func=cmd_forget, check=_check_forget)


def cmd_rotate_key(a: argparse.Namespace) -> int:
    print(rotation.describe(rotation.rotate_key(a.workspace, a.new_key)))
    return 0


def _check_rotate_key(a: argparse.Namespace) -> None:
    """Before the lock: no workspace, no new key or a bad one: one line, nothing created or changed."""
    if not Workspace(a.workspace).root.is_dir():
        raise ValueError(f"no workspace at {a.workspace}")
    if a.generate and os.environ.get(KEY_ENV):
        raise ValueError(f"--generate writes the key chain to the workspace key file, but the key is ${KEY_ENV}: "
                         "give the new key with --new-key-file (you set the variable to the chain afterwards)")
    a.new_key = rotation.read_new_key(a.new_key_file, a.generate)


def _add_rotate_key_parser(sub) -> None:
    p = sub.add_parser("rotate-key", help="re-pseudonymise the workspace under a new key, in one commit",
                       description=rotation.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-key-file", metavar="FILE",
                   help=f"the new key (hex, or text of at least 16 bytes); else ${rotation.NEW_KEY_ENV}")
    p.add_argument("--generate", action="store_true",
                   help="a random 32-byte new key, kept in the workspace key file (not with $" + KEY_ENV + ")")
    p.set_defaults(func=cmd_rotate_key, check=_check_rotate_key)


def cmd_monitor(a: argparse.Namespace) -> int:
    cfg = monitor.MonitorConfig(at=a.at, n_bins=a.bins, moderate=a.moderate, drift=a.drift, n_boot=a.n_boot,
                                chunk_size=a.chunk_size, ignore=tuple(a.ignore or ()))
    result = monitor.monitor(a.run, a.workspace, cfg, out=a.out)
    print(monitor.describe(result))
    if a.fail_on_drift and result["verdict"] == monitor.DRIFT:
        print(f"drift: exit {monitor.DRIFT_EXIT} (--fail-on-drift)", file=sys.stderr)
        return monitor.DRIFT_EXIT
    return 0


def _add_monitor_parser(sub) -> None:
    d = monitor.MonitorConfig()
    p = sub.add_parser("monitor", help="drift of the latest window against the run's training window (PSI, AUC)",
                       description=monitor.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run name under <workspace>/runs/ or a path to a run directory")
    p.add_argument("--at", help="end of the latest window, ISO 8601 or epoch seconds (UTC); default: end of the data")
    p.add_argument("--out", help="JSON file to write (default: runs/<run>/monitor.json, read by serve and report)")
    p.add_argument("--fail-on-drift", action="store_true",
                   help=f"exit with status {monitor.DRIFT_EXIT} when the verdict is drift (for schedulers)")
    p.add_argument("--bins", type=int, default=d.n_bins, help=f"quantile bins per feature (default {d.n_bins})")
    p.add_argument("--moderate", type=float, default=d.moderate,
                   help=f"PSI from which a shift is moderate (default {d.moderate})")
    p.add_argument("--drift", type=float, default=d.drift, help=f"PSI above which a shift is drift (default {d.drift})")
    p.add_argument("--n-boot", type=int, default=d.n_boot, help="bootstrap resamples of the live ROC-AUC interval")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help=f"users per chunk (default {d.chunk_size:,})")
    p.add_argument("--ignore", action="append", metavar="FEATURE",
                   help="a feature whose shift is expected (e.g. days_since_first_event): measured and reported, "
                        "not counted in the verdict; repeatable")
    p.set_defaults(func=cmd_monitor)


def cmd_retrain(a: argparse.Namespace) -> int:
    cfg = retrain.RetrainConfig(n_boot=a.n_boot, reload=not a.no_reload)
    decision = retrain.retrain(a.run, a.workspace, data=a.data, data_cfg=_data_cfg(a) if a.data else None, cfg=cfg)
    print(retrain.describe(decision))
    challenger = decision["challenger"]
    _track(a, [challenger.get("now") or challenger.get("kept_as")],
           {"retrain_decision": decision["decision"], "retrain_reason": decision["reason"],
            "retrain_champion_version": decision["champion"]["version"],
            "retrain_delta_roc_auc": decision["paired"]["diff"]})
    return 0


def _add_retrain_parser(sub) -> None:
    d = retrain.RetrainConfig()
    p = sub.add_parser("retrain", help="train a challenger with the champion's settings; promote it if not worse",
                       description=retrain.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the champion: a run name under <workspace>/runs/")
    p.add_argument("--data", nargs="+", metavar="PATH", help="new raw event files to ingest first")
    _add_data_flags(p, positional=False)
    p.add_argument("--n-boot", type=int, default=d.n_boot, help="bootstrap resamples of the paired interval")
    p.add_argument("--no-reload", action="store_true", help="do not signal running servers after a promotion")
    _add_tracking_flags(p)
    p.set_defaults(func=cmd_retrain)


def _add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML report of the data, the models and their reasons")
    p.add_argument("--run", action="append", metavar="NAME",
                   help="run to include (repeatable; default: every evaluated run)")
    p.add_argument("--out", help="output file (default: <workspace>/report.html)")
    p.add_argument("--no-explain", action="store_true", help="skip importance and example explanations (faster)")
    p.add_argument("--min-users", type=int, default=report.MIN_USERS, metavar="K",
                   help=f"thresholds: counts of fewer than K users are withheld from tables and charts "
                        f"(default {report.MIN_USERS}; 1 shows every count)")
    p.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="purchase-intent",
        description="Leak-free purchase-intent models from shop behaviour logs. "
        "Flags override the config defaults; nothing else is read.",
    )
    _add_global_flags(parser, os.environ.get(WORKSPACE_ENV, "pi-workspace"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)

    p = sub.add_parser("ingest", help="read, validate, pseudonymise and store raw event files")
    _add_data_flags(p, positional=True)
    p.add_argument("--data", nargs="+", metavar="PATH_OR_URL", help="more files, or a database URL (with --query)")
    _add_database_flags(p)
    _add_engine_flags(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("pseudonym", help="print the pseudonyms of your own user ids (needs the workspace key)")
    p.add_argument("ids", nargs="+", metavar="USER_ID")
    p.set_defaults(func=cmd_pseudonym)

    p = sub.add_parser("build", help="examples + time split + features from the ingested events")
    _add_label_flags(p)
    _add_engine_flags(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("train", help="fit one model on the built train split")
    p.add_argument("--model", required=True, choices=list(pipeline.MODELS))
    p.add_argument("--run", help="run name (default: the model name)")
    _add_train_flags(p)
    _add_tracking_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", help="self-supervised training of the sequence encoder -> runs/pretrained",
                       description=pretrain.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_pretrain_flags(p)
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--cutoff", default="auto",
                   help="read events before this time: auto (the start of the earliest test window of the built "
                        "examples; every event when none are built), all, or an ISO 8601 time")
    p.add_argument("--backtest", type=int, default=0, metavar="K",
                   help="with --cutoff auto: stop before the earliest of the last K backtest folds' test windows "
                        "(use the K you will evaluate with)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("ensemble", help="average the predictions of trained runs into one deployable run")
    p.add_argument("--members", required=True, help="comma-separated run names, e.g. transformer,lightgbm")
    p.add_argument("--run", default="ensemble", help="name of the ensemble's run (default ensemble)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("evaluate", help="held-out metrics of a run -> runs/NAME/metrics.json")
    p.add_argument("--run", required=True, help="run name under <workspace>/runs/ or a path to a run directory")
    p.add_argument("--backtest", type=int, default=0, metavar="K",
                   help="also rolling-origin evaluation over the last K cutoffs")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals")
    _add_tracking_flags(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("track", help="log saved runs to MLflow (parameters, metrics with intervals, the run folder)",
                       description=tracking.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, action="append", metavar="NAME", help="run name (repeatable)")
    _add_tracking_flags(p)
    p.set_defaults(func=cmd_track)

    p = sub.add_parser("run", help="ingest -> build -> train -> evaluate in one go, one table at the end")
    p.add_argument("--data", nargs="+", metavar="PATH", help="raw event files, or a database URL (with --query)")
    _add_data_flags(p, positional=False)
    _add_database_flags(p)
    _add_label_flags(p)
    _add_train_flags(p)
    p.add_argument("--models", default="logreg,lightgbm",
                   help=f"comma-separated: {','.join(pipeline.MODELS)},ensemble")
    p.add_argument("--pretrain", action="store_true",
                   help="pretrain the sequence encoder after the build (for transformer_pt, lightgbm_emb)")
    _add_pretrain_flags(p, prefix="pretrain-")
    p.add_argument("--backtest", type=int, default=0, metavar="K",
                   help="rolling-origin evaluation over the last K cutoffs")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--table", help="tabular mode: a file that already has one row per session or user")
    p.add_argument("--label", help="tabular mode: the label column")
    p.add_argument("--time-column", help="tabular mode: split by this column's order (else a seeded stratified split)")
    p.add_argument("--drop", help="tabular mode: comma-separated columns not to use as features")
    _add_tracking_flags(p)
    _add_engine_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("quickstart", help="`run` on the built-in seeded shop simulator")
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--days", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default="logreg,lightgbm,transformer,ensemble")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("simulate", help="write the simulated shop's events to a file (CSV, CSV.gz or Parquet)")
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--days", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_simulate)

    _add_score_parser(sub)
    _add_serve_parser(sub)
    _add_explain_parser(sub)
    _add_report_parser(sub)
    _add_forget_parser(sub)
    _add_rotate_key_parser(sub)
    _add_monitor_parser(sub)
    _add_retrain_parser(sub)
    return parser


# commands that write to the workspace: one at a time per workspace (Workspace.lock); the others only read
WRITING_COMMANDS = {"ingest", "build", "train", "evaluate", "run", "quickstart", "pretrain", "ensemble", "score",
                    "report", "forget", "rotate-key", "monitor", "retrain"}


# commands that do not use the workspace
NO_WORKSPACE_COMMANDS = {"simulate"}


def _workspace_lock(args: argparse.Namespace):
    if args.command not in WRITING_COMMANDS or not distributed.is_main():  # under torchrun rank 0 writes
        return contextlib.nullcontext()
    return Workspace(args.workspace).lock(args.command)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        memory.set_limit(getattr(args, "memory_limit", None))  # checked before anything is read
        memory.set_spill_dir(getattr(args, "spill_dir", None))
        memory.limit_bytes()  # a bad $PURCHASE_INTENT_MEMORY_LIMIT is refused here too
        set_key_file(getattr(args, "encryption_key_file", None))
        if args.command not in NO_WORKSPACE_COMMANDS:  # a missing or wrong key: refused before anything is read
            check_workspace(args.workspace)
        if getattr(args, "check", None) is not None:  # what can be refused before the lock is taken
            args.check(args)
        with _workspace_lock(args), memory.step(args.command):
            return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; the workspace is unchanged by the unfinished step", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, ImportError) as e:  # OSError includes FileNotFoundError
        msg = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror and e.filename else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 1
    finally:
        set_key_file(None)


if __name__ == "__main__":
    sys.exit(main())
