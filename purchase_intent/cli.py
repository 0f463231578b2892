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
the same. A new command is ``sub.add_parser(...)`` in ``build_parser`` (it gets the global options itself)
and a ``cmd_*`` function in ``purchase_intent.commands`` (``COMMANDS``).

This module parses the command line from ``config`` and a few light modules only: a mistyped command
or flag, and ``--help``, are answered before PyTorch and the models are imported (``commands`` is
imported once the command line is valid).
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from . import memory
from .config import (
    DP_PARAMS,
    DRIFT_EXIT,
    MIN_USERS,
    MODEL_NAMES,
    PRETRAIN_OBJECTIVES,
    FeatureConfig,
    LabelConfig,
    MonitorConfig,
    PretrainConfig,
    RetrainConfig,
    ScoreConfig,
    TrainConfig,
)
from .engine import ENGINES, JAVA_PACKAGE
from .privacy import KEY_ENV, NEW_KEY_ENV
from .serve.settings import API_KEYS_ENV, ServeSettings
from .storage import ENCRYPTION_KEY_ENV
from .workspace import WORKSPACE_ENV


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
    main parser gave it (before the command name, or its default). ``doc_module`` names the module
    whose docstring is the command's ``--help`` description, read only when help is printed."""

    def __init__(self, *args, doc_module: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.doc_module = doc_module
        _add_global_flags(self, argparse.SUPPRESS)

    def format_help(self) -> str:
        if self.doc_module and self.description is None:
            self.description = module_doc(self.doc_module)
        return super().format_help()


def module_doc(name: str) -> Optional[str]:
    """The docstring of the package's module ``name``, read from its source without importing it (which
    would load what the module needs, PyTorch included)."""
    spec = importlib.util.find_spec(f"{__package__}.{name}")
    if spec is None or not spec.origin:
        return None
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8")), clean=False)


# ---------------------------------------------------------------------------------------------
# flag groups, one per config dataclass (commands.py turns them into the dataclasses)
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
    p.add_argument("--ts-unit", choices=["s", "ms", "us", "ns", "iso"],
                   help="timestamp unit (default: the preset's, else detected)")
    p.add_argument("--ts-format", metavar="LAYOUT",
                   help="strptime layout of the timestamps where they are not ISO 8601 or epoch numbers, e.g. "
                        "'%%m/%%d/%%Y %%H:%%M' for 12/1/2009 7:45 (%%d/%%m for day first; %%z reads an offset)")
    p.add_argument("--all-events", metavar="EVENT",
                   help="for a log without an event column (e.g. transactions only): every row is this event, "
                        "e.g. --all-events purchase")
    p.add_argument("--ts-zone", metavar="ZONE",
                   help="time zone of timestamps written without one (e.g. Asia/Shanghai; default UTC); times with an "
                        "offset and epoch numbers are absolute and keep their meaning")
    p.add_argument("--strict", action="store_true", help="fail (and store nothing) if any row is rejected")
    p.add_argument("--keep-extras", action="store_true",
                   help="also store the columns no --map names, as text (left out by default: no model reads them, "
                        "and they may identify people: e-mails, IP addresses)")
    p.add_argument("--strict-events", action="store_true",
                   help="reject (unknown_event) the rows whose event name no map names, instead of storing them "
                        "as other")
    p.add_argument("--since", help="keep events at or after this ISO time (UTC without an offset, whatever "
                                   "--ts-zone says); earlier ones are counted as filtered")
    p.add_argument("--until", help="keep events before this ISO time; later ones are counted as filtered")


def _add_database_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--query", metavar="SQL",
                   help="with --data postgresql://USER@HOST:PORT/DB: the SELECT whose rows are the events (the same "
                        "--map, --event-map and validation as a file; pass the password in $PGPASSWORD or ~/.pgpass)")
    p.add_argument("--since-last", action="store_true",
                   help="database source: only rows after the newest event already ingested from this query")


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


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--min-positives", type=int, default=d.min_positives,
                   help="refuse to train with fewer positives in train")
    p.add_argument("--min-negatives", type=int, default=d.min_negatives,
                   help="refuse to train with fewer negatives in train")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="model hyperparameter (e.g. --param C=0.5, --param preset=small); repeatable")


def _add_pretrain_flags(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The PretrainConfig flags; ``prefix`` ("pretrain-") when they sit beside other commands' flags."""
    d = PretrainConfig()
    p.add_argument(f"--{prefix}objective", choices=list(PRETRAIN_OBJECTIVES), default=d.objective,
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
    p.add_argument(f"--{prefix}rolling", action="store_true",
                   help="with --objective future: also one encoder per cutoff of the built examples, each on the "
                        "events before it, and one on every event, with their purchase heads (for --param prior=true)")
    p.add_argument(f"--{prefix}d-model", type=int, metavar="D",
                   help="encoder width (default: the preset's; with an init the init encoder's, and another raises)")
    p.add_argument(f"--{prefix}param", action="append", metavar="KEY=VALUE",
                   help="differential privacy: dp_epsilon=E (user-level DP-SGD; masked or next objective), and "
                        f"{', '.join(DP_PARAMS[1:])} as for train; repeatable")


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=ENGINES, default="duckdb",
                   help="duckdb (embedded, default) or spark: the same definitions on Apache Spark "
                        "(pip install 'purchase-intent[spark]' and Java 17: apt-get install " + JAVA_PACKAGE + ")")
    p.add_argument("--spark-conf", action="append", metavar="KEY=VALUE",
                   help="a Spark setting (repeatable), e.g. spark.master=spark://host:7077 or spark.driver.memory=4g; "
                        "on top of $SPARK_CONF_DIR/spark-defaults.conf and SPARK_* variables")
    p.set_defaults(check="engine")


def _add_tracking_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mlflow", metavar="URI",
                   help="also log the runs to MLflow: a tracking server (http://host:5000), databricks, or a "
                        "file store (file:///path or a folder); needs pip install 'purchase-intent[mlflow]'")
    p.add_argument("--mlflow-experiment", default="purchase-intent", metavar="NAME",
                   help="MLflow experiment (default purchase-intent; created when missing)")
    p.set_defaults(check="tracking")


def _add_score_parser(sub) -> None:
    d = ScoreConfig()
    p = sub.add_parser("score", help="score every active user (batch) and optionally cut an audience",
                       doc_module="score", formatter_class=argparse.RawDescriptionHelpFormatter)
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


SERVE_DOC = """The real-time scoring API (FastAPI) for one run; needs `pip install 'purchase-intent[serve]'`.

    PURCHASE_INTENT_API_KEYS=change-me-please purchase-intent serve --run lightgbm --port 8000
    curl -s localhost:8000/v1/score -H 'Authorization: Bearer change-me-please' \\
         -H 'Content-Type: application/json' \\
         -d '{"user_id": "u1", "events": [{"ts": "2017-12-02T10:00:00Z", "event": "view", "item_id": "i1"}]}'

Routes: POST /v1/score, POST /v1/score/batch, GET /v1/users/{user_id}/score (from the workspace's
events), POST /v1/admin/reload (swap in a run; `kill -HUP` reloads the current one), GET /v1/model,
GET /metrics (Prometheus), and without a key GET /healthz, GET /readyz, /docs.
"""


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


def _add_explain_parser(sub) -> None:
    p = sub.add_parser("explain", help="why a user gets their score: the top reasons, in log-odds")
    p.add_argument("--run", required=True, help="run name under <workspace>/runs/ or a path to a run directory")
    p.add_argument("--user", required=True, help="user id (raw: looked up with the workspace key; or the pseudonym)")
    p.add_argument("--at", help="scoring time T, ISO 8601 or epoch seconds (UTC); default: end of the data")
    p.add_argument("--top", type=int, default=5, help="number of reasons (default 5)")
    p.add_argument("--ig-steps", type=int, default=32, help="integrated-gradients steps (transformer)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _add_forget_parser(sub) -> None:
    p = sub.add_parser("forget", help="erase users' rows from the workspace on request (GDPR art. 17), in one commit",
                       doc_module="erasure", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--user", action="append", metavar="RAW_ID",
                   help="raw user id, looked up with the workspace key (never stored); repeatable")
    p.add_argument("--pseudonym", action="append", metavar="P",
                   help="a pseudonym as `purchase-intent pseudonym` prints it; repeatable")
    p.set_defaults(check="forget")


def _add_rotate_key_parser(sub) -> None:
    p = sub.add_parser("rotate-key", help="re-pseudonymise the workspace under a new key, in one commit",
                       doc_module="rotation", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-key-file", metavar="FILE",
                   help=f"the new key (hex, or text of at least 16 bytes); else ${NEW_KEY_ENV}")
    p.add_argument("--generate", action="store_true",
                   help="a random 32-byte new key, kept in the workspace key file (not with $" + KEY_ENV + ")")
    p.set_defaults(check="rotate-key")


def _add_monitor_parser(sub) -> None:
    d = MonitorConfig()
    p = sub.add_parser("monitor", help="drift of the latest window against the run's training window (PSI, AUC)",
                       doc_module="monitor", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run name under <workspace>/runs/ or a path to a run directory")
    p.add_argument("--at", help="end of the latest window, ISO 8601 or epoch seconds (UTC); default: end of the data")
    p.add_argument("--out", help="JSON file to write (default: runs/<run>/monitor.json, read by serve and report)")
    p.add_argument("--fail-on-drift", action="store_true",
                   help=f"exit with status {DRIFT_EXIT} when the verdict is drift (for schedulers)")
    p.add_argument("--bins", type=int, default=d.n_bins, help=f"quantile bins per feature (default {d.n_bins})")
    p.add_argument("--moderate", type=float, default=d.moderate,
                   help=f"PSI from which a shift is moderate (default {d.moderate})")
    p.add_argument("--drift", type=float, default=d.drift, help=f"PSI above which a shift is drift (default {d.drift})")
    p.add_argument("--n-boot", type=int, default=d.n_boot, help="bootstrap resamples of the live ROC-AUC interval")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help=f"users per chunk (default {d.chunk_size:,})")
    p.add_argument("--ignore", action="append", metavar="FEATURE",
                   help="a feature whose shift is expected (e.g. days_since_first_event): measured and reported, "
                        "not counted in the verdict; repeatable")


def _add_retrain_parser(sub) -> None:
    d = RetrainConfig()
    p = sub.add_parser("retrain", help="train a challenger with the champion's settings; promote it if not worse",
                       doc_module="retrain", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the champion: a run name under <workspace>/runs/")
    p.add_argument("--data", nargs="+", metavar="PATH", help="new raw event files to ingest first")
    _add_data_flags(p, positional=False)
    p.add_argument("--n-boot", type=int, default=d.n_boot, help="bootstrap resamples of the paired interval")
    p.add_argument("--no-reload", action="store_true", help="do not signal running servers after a promotion")
    _add_tracking_flags(p)


def _add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML report of the data, the models and their reasons")
    p.add_argument("--run", action="append", metavar="NAME",
                   help="run to include (repeatable; default: every evaluated run)")
    p.add_argument("--out", help="output file (default: <workspace>/report.html)")
    p.add_argument("--no-explain", action="store_true", help="skip importance and example explanations (faster)")
    p.add_argument("--min-users", type=int, default=MIN_USERS, metavar="K",
                   help=f"thresholds: counts of fewer than K users are withheld from tables and charts "
                        f"(default {MIN_USERS}; 1 shows every count)")


# ---------------------------------------------------------------------------------------------
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

    p = sub.add_parser("pseudonym", help="print the pseudonyms of your own user ids (needs the workspace key)")
    p.add_argument("ids", nargs="+", metavar="USER_ID")

    p = sub.add_parser("build", help="examples + time split + features from the ingested events")
    _add_label_flags(p)
    _add_engine_flags(p)

    p = sub.add_parser("train", help="fit one model on the built train split")
    p.add_argument("--model", required=True, choices=list(MODEL_NAMES))
    p.add_argument("--run", help="run name (default: the model name)")
    _add_train_flags(p)
    _add_tracking_flags(p)

    p = sub.add_parser("pretrain", help="self-supervised training of the sequence encoder -> runs/pretrained",
                       doc_module="pretrain", formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_pretrain_flags(p)
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--cutoff", default="auto",
                   help="read events before this time: auto (the start of the earliest test window of the built "
                        "examples; every event when none are built), all, or an ISO 8601 time")
    p.add_argument("--backtest", type=int, default=0, metavar="K",
                   help="with --cutoff auto: stop before the earliest of the last K backtest folds' test windows "
                        "(use the K you will evaluate with)")

    p = sub.add_parser("ensemble", help="average the predictions of trained runs into one deployable run")
    p.add_argument("--members", required=True, help="comma-separated run names, e.g. transformer,lightgbm")
    p.add_argument("--run", default="ensemble", help="name of the ensemble's run (default ensemble)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals")

    p = sub.add_parser("evaluate", help="held-out metrics of a run -> runs/NAME/metrics.json")
    p.add_argument("--run", required=True, help="run name under <workspace>/runs/ or a path to a run directory")
    p.add_argument("--backtest", type=int, default=0, metavar="K",
                   help="also rolling-origin evaluation over the last K cutoffs")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals")
    _add_tracking_flags(p)

    p = sub.add_parser("track", help="log saved runs to MLflow (parameters, metrics with intervals, the run folder)",
                       doc_module="tracking", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, action="append", metavar="NAME", help="run name (repeatable)")
    _add_tracking_flags(p)

    p = sub.add_parser("run", help="ingest -> build -> train -> evaluate in one go, one table at the end")
    p.add_argument("--data", nargs="+", metavar="PATH", help="raw event files, or a database URL (with --query)")
    _add_data_flags(p, positional=False)
    _add_database_flags(p)
    _add_label_flags(p)
    _add_train_flags(p)
    p.add_argument("--models", default="logreg,lightgbm",
                   help=f"comma-separated: {','.join(MODEL_NAMES)},ensemble (default: logreg,lightgbm)")
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

    p = sub.add_parser("quickstart", help="`run` on the built-in seeded shop simulator")
    _add_sim_flags(p)
    p.add_argument("--models", default="logreg,lightgbm,transformer,ensemble",
                   help="comma-separated models (default: logreg,lightgbm,transformer,ensemble)")

    p = sub.add_parser("simulate", help="write the simulated shop's events to a file (CSV, CSV.gz or Parquet)")
    _add_sim_flags(p)
    p.add_argument("--out", required=True, help="the file to write: .csv, .csv.gz or .parquet")

    _add_score_parser(sub)
    _add_serve_parser(sub)
    _add_explain_parser(sub)
    _add_report_parser(sub)
    _add_forget_parser(sub)
    _add_rotate_key_parser(sub)
    _add_monitor_parser(sub)
    _add_retrain_parser(sub)
    return parser


def _add_sim_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users", type=int, default=20_000, help="shoppers to simulate (default: 20000)")
    p.add_argument("--days", type=int, default=90, help="days of events (default: 90)")
    p.add_argument("--seed", type=int, default=0, help="the simulation's seed (default: 0)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)  # a mistyped command or flag ends here, in one line
    from . import commands  # the pipeline, PyTorch and the models: loaded once the command line is valid

    return commands.run(args)


if __name__ == "__main__":
    sys.exit(main())
