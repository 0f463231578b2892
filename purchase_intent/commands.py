"""What each `purchase-intent` command does, once ``cli`` has parsed its command line.

``cli.main`` parses the command line first (from ``config`` and a few light modules), so that a
mistyped command or flag is refused at once; only then does it import this module. PyTorch and
the model libraries are imported by the commands that train or load a model, not here, so that
``ingest`` and ``build`` start in about a second. ``run(args)`` takes the parsed arguments to the
command's function ``cmd_*`` (``COMMANDS``), after the checks its flags ask for (``CHECKS``). The
``_*_cfg`` helpers turn flags into the config dataclasses of ``purchase_intent.config``, field by field.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import explain, memory, monitor, prepare, report, runs, score, tracking
from .config import (
    DP_PARAMS,
    DRIFT_EXIT,
    DataConfig,
    FeatureConfig,
    LabelConfig,
    MonitorConfig,
    PretrainConfig,
    RetrainConfig,
    ScoreConfig,
    TrainConfig,
)
from .engine import EngineConfig, check_engine, parse_spark_conf
from .ensemble import evaluate_ensemble
from .event_database import DatabaseQuery, is_database_url
from .privacy import KEY_ENV, pseudonym_for
from .serve.settings import ServeSettings, read_api_keys
from .simulate import SimConfig, write_events
from .storage import check_workspace, set_key_file
from .workspace import Workspace

# ``pipeline`` (train, evaluate, run), ``pretrain``, ``erasure``, ``rotation``, ``retrain`` and ``tabular`` import
# PyTorch or scikit-learn (about 3 s): the commands that need them import them, so that ``ingest``, ``build``,
# ``simulate`` and ``pseudonym`` start without them (a command that loads a run's model imports them then).


# ---------------------------------------------------------------------------------------------
# flags -> configs
def _pairs(values: Optional[list[str]], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        if "=" not in v:
            raise SystemExit(f"error: {flag} expects KEY=VALUE, got {v!r}")
        k, val = v.split("=", 1)
        if k.strip() in out and out[k.strip()] != val.strip():
            raise SystemExit(f"error: {flag} gives {k.strip()!r} twice ({out[k.strip()]!r} and {val.strip()!r}); "
                             f"give it once")
        out[k.strip()] = val.strip()
    return out


def _params_by_model(params: dict[str, Any], models: Sequence[str], known_of) -> dict[str, dict[str, Any]]:
    """``run``'s --param settings, each given to the models that have it (``max_epochs`` to the Transformers of
    ``--models lightgbm,transformer``, not to LightGBM, which would refuse it). A setting no model has, and a
    differential-privacy one (``dp_*``: a model without DP must refuse it, not train without it), go to every
    model, whose check then names what is wrong."""
    trained = [m for m in models if m != "ensemble"]
    known = {m: known_of(m) for m in trained}
    out: dict[str, dict[str, Any]] = {m: {} for m in trained}
    for k, v in params.items():
        takers = [m for m in trained if known[m] is None or k in known[m]]
        if not takers and not k.startswith("dp_") and len(trained) > 1:
            names = {n: m for m in trained for n in known[m] or ()}
            close = difflib.get_close_matches(k, list(names), n=1)
            hint = f": did you mean {close[0]} ({names[close[0]]})?" if close else \
                "; `purchase-intent train --model M --param X=1` lists a model's parameters"
            raise SystemExit(f"error: --param {k}: no model of {','.join(trained)} has it{hint}")
        for m in (trained if k.startswith("dp_") or not takers else takers):
            out[m][k] = v
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
                      ts_unit=a.ts_unit, ts_zone=a.ts_zone, ts_format=a.ts_format, all_events=a.all_events,
                      keep_extras=a.keep_extras, strict=a.strict,
                      strict_events=a.strict_events, since=a.since, until=a.until)


def _label_cfg(a: argparse.Namespace) -> LabelConfig:
    return LabelConfig(task=a.task, lookback=a.lookback, horizon=a.horizon, step=a.step, tz=a.tz,
                       session_gap=a.session_gap, prefix=a.prefix, valid_cutoffs=a.valid_cutoffs,
                       test_cutoffs=a.test_cutoffs)


def _feature_cfg(a: argparse.Namespace) -> FeatureConfig:
    return FeatureConfig(windows=tuple(w.strip() for w in a.windows.split(",") if w.strip()), history=a.history)


def _train_cfg(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(min_positives=a.min_positives, min_negatives=a.min_negatives, seed=a.seed)


def _pretrain_cfg(a: argparse.Namespace, prefix: str = "", **extra) -> PretrainConfig:
    g = lambda name: getattr(a, prefix.replace("-", "_") + name)  # noqa: E731
    params = _params(g("param"))
    unknown = sorted(set(params) - set(DP_PARAMS))
    if unknown:
        raise ValueError(f"unknown --{prefix}param {', '.join(unknown)}: pretrain takes "
                         f"{', '.join(DP_PARAMS)} (its other settings are flags, see --help)")
    extra = {**params, **extra}
    return PretrainConfig(objective=g("objective"), preset=g("preset"), max_seq_len=g("max_seq_len"),
                                   epochs=g("epochs"), batch_size=g("batch_size"), lr=g("lr"), init=g("init"),
                                   d_model=g("d_model"), rolling=g("rolling"), **extra)


def _engine(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(a.engine, parse_spark_conf(a.spark_conf))


def _check_engine(a: argparse.Namespace) -> None:
    """Before the workspace lock: Spark or Java missing costs one line and nothing else."""
    check_engine(_engine(a))
    if hasattr(a, "mlflow"):  # run: the tracking flags' own check too
        _check_tracking(a)
    given = [f for f in ("param", "init", "rolling") if getattr(a, f"pretrain_{f}", None)]
    if given and not getattr(a, "pretrain", False):  # run: pretraining settings without the pretraining
        raise ValueError(f"{', '.join('--pretrain-' + f for f in given)} set the pretraining that --pretrain runs: "
                         "add --pretrain")


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


def _check_forget(a: argparse.Namespace) -> None:
    """Before the lock: a forget with nobody named, or of no workspace, changes (and creates) nothing."""
    if not (a.user or a.pseudonym):
        raise ValueError("forget needs --user RAW_ID or --pseudonym P (repeatable)")
    if not Workspace(a.workspace).root.is_dir():
        raise ValueError(f"no workspace at {a.workspace}")


def _check_rotate_key(a: argparse.Namespace) -> None:
    """Before the lock: no workspace, no new key or a bad one: one line, nothing created or changed."""
    if not Workspace(a.workspace).root.is_dir():
        raise ValueError(f"no workspace at {a.workspace}")
    if a.generate and os.environ.get(KEY_ENV):
        raise ValueError(f"--generate writes the key chain to the workspace key file, but the key is ${KEY_ENV}: "
                         "give the new key with --new-key-file (you set the variable to the chain afterwards)")
    from . import rotation

    a.new_key = rotation.read_new_key(a.new_key_file, a.generate)


# ---------------------------------------------------------------------------------------------
# commands
def cmd_ingest(a: argparse.Namespace) -> int:
    sources = _sources(a)
    if not sources:
        raise SystemExit("error: ingest needs PATH... (files) or --data postgresql://... --query \"SELECT ...\"")
    report = prepare.ingest(sources, _data_cfg(a), a.workspace, engine=_engine(a))
    print(report.summary())
    return 0


def cmd_pseudonym(a: argparse.Namespace) -> int:
    if any(not i.strip() for i in a.ids):
        raise SystemExit("error: an empty id has no pseudonym (ingest stores no user without an id)")
    for raw, pseudo in pseudonym_for(Workspace(a.workspace), a.ids).items():
        print(f"{raw}\t{pseudo}")
    return 0


def cmd_build(a: argparse.Namespace) -> int:
    prepare.build(_label_cfg(a), _feature_cfg(a), a.workspace, engine=_engine(a))
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from . import pipeline

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
    from . import pretrain

    cfg = _pretrain_cfg(a, seed=a.seed, cutoff=a.cutoff, backtest=a.backtest)
    pretrain.pretrain(a.workspace, cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


def cmd_ensemble(a: argparse.Namespace) -> int:
    from . import pipeline

    members = [m.strip() for m in a.members.split(",") if m.strip()]
    evaluate_ensemble(Workspace(a.workspace), members, n_boot=a.n_boot, run=a.run)
    print(pipeline.compare(members + [a.run], a.workspace, n_boot=a.n_boot))
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from . import pipeline

    pipeline.evaluate(a.run, a.workspace, backtest=a.backtest, n_boot=a.n_boot)
    print(pipeline.compare([a.run], a.workspace, n_boot=a.n_boot))
    _track(a, [a.run])
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    if a.table:
        from .tabular import run_table

        if not a.label:
            raise SystemExit("error: --table needs --label COLUMN")
        if a.backtest:
            raise SystemExit("error: --backtest refits on an event log's periods; --table evaluates on one split "
                             "(by --time-column when given): leave --backtest out")
        with warnings.catch_warnings(record=True) as caught:  # a note for the user, not a Python warning
            warnings.simplefilter("always", UserWarning)
            run_table(a.table, a.label, time_column=a.time_column, models=models, seed=a.seed, n_boot=a.n_boot,
                      drop_columns=[c.strip() for c in (a.drop or "").split(",") if c.strip()],
                      min_positives=a.min_positives, min_negatives=a.min_negatives,
                      out_dir=os.path.join(a.workspace, "runs", "table"))  # prints the comparison table
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        return 0
    if not a.data:
        raise SystemExit("error: run needs --data PATH (or --table FILE --label COLUMN)")
    from . import pipeline, pretrain

    data = _sources(a)
    params = _params_by_model(_params(a.param), models, pipeline.model_parameters) if a.param else None
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
    from . import pipeline

    models = [m.strip() for m in a.models.split(",") if m.strip()]
    pipeline.quickstart(a.workspace, models=models, n_users=a.users, days=a.days, seed=a.seed)
    return 0


def cmd_simulate(a: argparse.Namespace) -> int:
    n = write_events(SimConfig(n_users=a.users, days=a.days, seed=a.seed), a.out)
    print(f"wrote {n:,} simulated events to {a.out}")
    return 0


def cmd_score(a: argparse.Namespace) -> int:
    cfg = ScoreConfig(at=a.at, chunk_size=a.chunk_size, top=a.top, top_n=a.top_n,
                            min_probability=a.min_probability, reasons=a.reasons, min_users=a.min_users,
                            reidentify=a.reidentify)
    result = score.score(a.run, a.out, cfg, workspace=a.workspace, progress=not a.quiet, engine=_engine(a))
    print(score.describe(result))
    return 0


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


def cmd_explain(a: argparse.Namespace) -> int:
    e = explain.explain_user(a.run, a.user, at=a.at, workspace=a.workspace, top=a.top, ig_steps=a.ig_steps)
    stale = runs.stale_warning(Workspace(a.workspace).run_dir(a.run))
    if stale:  # the run learned from data since erased (`forget`)
        print(f"warning: {stale}", file=sys.stderr)
    print(json.dumps(e, indent=2, default=str) if a.json else explain.format_explanation(e))
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    path = report.write_report(a.workspace, a.run or None, out=a.out, explain=not a.no_explain,
                               min_users=a.min_users)
    ws = Workspace(a.workspace)
    for line in report.stale_runs(ws, a.run or report.available_runs(ws)):
        print(f"warning: {line}", file=sys.stderr)
    print(f"report: {path.resolve()}")
    return 0


def cmd_forget(a: argparse.Namespace) -> int:
    from . import erasure

    print(erasure.describe(erasure.forget(a.workspace, users=a.user or [], pseudonyms=a.pseudonym or [])))
    return 0


def cmd_rotate_key(a: argparse.Namespace) -> int:
    from . import rotation

    print(rotation.describe(rotation.rotate_key(a.workspace, a.new_key)))
    return 0


def cmd_monitor(a: argparse.Namespace) -> int:
    cfg = MonitorConfig(at=a.at, n_bins=a.bins, moderate=a.moderate, drift=a.drift, n_boot=a.n_boot,
                                chunk_size=a.chunk_size, ignore=tuple(a.ignore or ()))
    result = monitor.monitor(a.run, a.workspace, cfg, out=a.out)
    print(monitor.describe(result))
    if a.fail_on_drift and result["verdict"] == monitor.DRIFT:
        print(f"drift: exit {DRIFT_EXIT} (--fail-on-drift)", file=sys.stderr)
        return DRIFT_EXIT
    return 0


def cmd_retrain(a: argparse.Namespace) -> int:
    from . import retrain

    cfg = RetrainConfig(n_boot=a.n_boot, reload=not a.no_reload)
    decision = retrain.retrain(a.run, a.workspace, data=a.data, data_cfg=_data_cfg(a) if a.data else None, cfg=cfg)
    print(retrain.describe(decision))
    challenger = decision["challenger"]
    _track(a, [challenger.get("now") or challenger.get("kept_as")],
           {"retrain_decision": decision["decision"], "retrain_reason": decision["reason"],
            "retrain_champion_version": decision["champion"]["version"],
            "retrain_delta_roc_auc": decision["paired"]["diff"]})
    return 0


WRITING_COMMANDS = {"ingest", "build", "train", "evaluate", "run", "quickstart", "pretrain", "ensemble", "score",
                    "report", "forget", "rotate-key", "monitor", "retrain"}


NO_WORKSPACE_COMMANDS = {"simulate"}


def _is_main_process() -> bool:
    """Not a torchrun worker of rank > 0 (torchrun's ``RANK``; no process group exists yet when a command
    starts, so this is what ``distributed.is_main`` answers then)."""
    return int(os.environ.get("RANK", 0)) == 0


def _workspace_lock(args: argparse.Namespace):
    if args.command not in WRITING_COMMANDS or not _is_main_process():  # under torchrun rank 0 writes
        return contextlib.nullcontext()
    return Workspace(args.workspace).lock(args.command)


# the commands by name (``args.command``), and the checks a command's flags ask for (``args.check``): what can be
# refused before the workspace lock is taken
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "ingest": cmd_ingest, "pseudonym": cmd_pseudonym, "build": cmd_build, "train": cmd_train, "pretrain": cmd_pretrain,
    "ensemble": cmd_ensemble, "evaluate": cmd_evaluate, "track": cmd_track, "run": cmd_run,
    "quickstart": cmd_quickstart, "simulate": cmd_simulate, "score": cmd_score, "serve": cmd_serve,
    "explain": cmd_explain, "report": cmd_report, "forget": cmd_forget, "rotate-key": cmd_rotate_key,
    "monitor": cmd_monitor, "retrain": cmd_retrain,
}
CHECKS: dict[str, Callable[[argparse.Namespace], None]] = {
    "engine": _check_engine, "tracking": _check_tracking, "forget": _check_forget, "rotate-key": _check_rotate_key,
}


def run(args: argparse.Namespace) -> int:
    """Run the command that ``cli.build_parser`` parsed into ``args``; its exit status.

    Bad input (a value, a file, a workspace) is answered with one line on stderr and status 1; an
    interrupt leaves the workspace as it was (status 130).
    """
    try:
        memory.set_limit(getattr(args, "memory_limit", None))  # checked before anything is read
        memory.set_spill_dir(getattr(args, "spill_dir", None))
        memory.limit_bytes()  # a bad $PURCHASE_INTENT_MEMORY_LIMIT is refused here too
        set_key_file(getattr(args, "encryption_key_file", None))
        if args.command not in NO_WORKSPACE_COMMANDS:  # a missing or wrong key: refused before anything is read
            check_workspace(args.workspace)
        if getattr(args, "check", None) is not None:  # what can be refused before the lock is taken
            CHECKS[args.check](args)
        with _workspace_lock(args), memory.step(args.command):
            return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted; the workspace is unchanged by the unfinished step", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, ImportError) as e:  # OSError includes FileNotFoundError
        msg = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror and e.filename else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 1
    finally:
        set_key_file(None)
