"""Safe retraining: a challenger trained with the champion's settings replaces it only if not worse.

    purchase-intent retrain --run lightgbm
    purchase-intent retrain --run lightgbm --data events-2017-12.csv.gz --format taobao

The **champion** is the run at ``runs/<run>``: the name that ``serve --run <run>``, ``score`` and
``monitor`` use. ``retrain``

1. ingests the new files (``--data``, with the usual format and mapping flags), if any;
2. rebuilds the examples with the champion's label and feature configuration (run.json);
3. trains the **challenger** with the champion's model, parameters and training configuration
   into ``runs/<run>.challenger`` and evaluates it (with the champion's number of backtest folds);
4. scores both on the same latest window, the new build's test split, and takes the paired
   bootstrap interval of ROC-AUC(challenger) - ROC-AUC(champion) (``evaluate.paired_auc_difference``);
5. **promotes** the challenger unless it is worse beyond that interval (the whole interval below
   0); without an interval (one class only) the champion stays. Promotion swaps the two folders
   atomically: the challenger becomes ``runs/<run>``, the old champion is kept as the version
   ``runs/<run>.<its version>`` (loadable, e.g. to roll back with ``POST /v1/admin/reload``); a
   challenger that is not promoted is kept as ``runs/<run>.<its version>``;
6. after a promotion sends SIGHUP to every running ``serve`` of ``<run>`` (they record themselves in
   ``runs/.servers/``), which reloads the run in place (the server's hot swap);
7. appends the decision (windows, both versions, AUCs, the interval, the outcome and why, the
   servers signalled) to ``<workspace>/retrain-log.jsonl``.

All or nothing: steps 1–5 run inside ``workspace.all_or_nothing``. A retrain that fails after it
started (an error, Ctrl-C) puts the workspace back as it was, the new events and the rebuild
included, then appends a ``failed`` line; one killed outright (``kill -9``) is put back by the next
writing command. A server started while a retrain runs records itself in the tree that a failure
discards, so it is not signalled by a later promotion until it restarts.

Like every writing command it holds the workspace lock: while another command holds it, retrain
says so and changes nothing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from . import pipeline, runs
from .config import DataConfig, LabelConfig, RetrainConfig, TrainConfig, from_dict
from .evaluate import paired_auc_difference, roc_auc
from .monitor import MonitorError, training_window
from .serve.pidfile import signal_reload
from .times import parse_duration
from .workspace import Workspace, all_or_nothing, as_workspace, atomic_write_json, exchange, fsync_dir

AUDIT_LOG = "retrain-log.jsonl"
KEPT_VERSION = runs.KEPT_VERSION
CHALLENGER_SUFFIX = ".challenger"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$")


class RetrainError(ValueError):
    """The run cannot be retrained as asked (the message says why)."""


def audit_path(ws: Workspace) -> Path:
    return ws.root / AUDIT_LOG


def append_audit(ws: Workspace, entry: dict) -> None:
    """One JSON line appended to the audit log and flushed to disk."""
    path = audit_path(ws)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(runs.jsonable(entry), sort_keys=False) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_audit(ws: Workspace | str | Path) -> list[dict]:
    path = audit_path(as_workspace(ws))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def retrain(run: str, workspace=None, data: Optional[Sequence[str | Path]] = None,
            data_cfg: Optional[DataConfig] = None, cfg: Optional[RetrainConfig] = None) -> dict:
    """Train a challenger of champion ``run``, compare, promote if not worse; returns the decision
    (as appended to the audit log)."""
    cfg = cfg or RetrainConfig()
    ws = Workspace(as_workspace(workspace).root.resolve())  # a failure may swap the tree a relative path is in
    if not _NAME.match(run) or run.endswith(CHALLENGER_SUFFIX):
        raise RetrainError(f"retrain takes the name of a run under {ws.runs_dir} (letters, digits, '.', '_', '-'), "
                           f"got {run!r}")
    with ws.lock("retrain"):  # re-entrant: the CLI holds it already
        champion_dir = ws.runs_dir / run
        champion = runs.load_run_dir(champion_dir)  # a missing or damaged champion: an error, nothing changed
        if champion.model_name == runs.ENSEMBLE:
            raise RetrainError(f"run {run!r} is an ensemble: retrain its member runs, then rebuild it with "
                               "`purchase-intent ensemble`")
        started = time.time()
        challenger_dir = ws.runs_dir / (run + CHALLENGER_SUFFIX)
        try:
            with all_or_nothing(ws.root) as atomic:  # a failure puts back the events, build and runs as they were
                decision = _retrain(ws, run, champion, challenger_dir, data, data_cfg, cfg)
            decision["all_or_nothing"] = atomic
        except BaseException as e:
            shutil.rmtree(challenger_dir, ignore_errors=True)
            if not isinstance(e, (KeyboardInterrupt, RetrainError)):
                append_audit(ws, {"at": _now(), "run": run, "decision": "failed",
                                  "champion": {"version": champion.version},
                                  "error": f"{type(e).__name__}: {e}", "seconds": round(time.time() - started, 2)})
            raise
        if decision["decision"] == "promoted":  # after the commit: a server reloads the promoted run
            decision["reloaded_servers"] = signal_reload(ws.runs_dir, run) if cfg.reload else []
        decision["seconds"] = round(time.time() - started, 2)
        append_audit(ws, decision)
        return decision


def _retrain(ws: Workspace, run: str, champion: runs.Run, challenger_dir: Path, data, data_cfg, cfg) -> dict:
    meta = champion.meta
    try:  # kept in the champion's folder before the rebuild replaces its build
        champion_window = training_window(ws, champion)
    except MonitorError:
        champion_window = None
    ingested = None
    if data:
        report = pipeline.ingest(data, data_cfg or DataConfig(), ws, progress=False)
        ingested = {"files": [str(p) for p in data], "summary": report.summary()}
    label_cfg = from_dict(LabelConfig, meta["label_config"])
    built = pipeline.build(label_cfg, runs.run_feature_config(meta), ws, quiet=True)
    shutil.rmtree(challenger_dir, ignore_errors=True)  # what an interrupted retrain left
    pipeline.train(champion.model_name, run=challenger_dir.name, params=meta.get("params") or {},
                   train_cfg=from_dict(TrainConfig, meta.get("train_config") or {}), workspace=ws, quiet=True)
    folds = len(((runs.read_metrics(champion.dir).get("backtest") or {}).get("folds") or [])
                if (champion.dir / runs.METRICS_JSON).exists() else [])
    pipeline.evaluate(challenger_dir.name, ws, backtest=folds, n_boot=cfg.n_boot, quiet=True)
    challenger = runs.load_run_dir(challenger_dir)
    challenger_window = training_window(ws, challenger)  # written into its folder: it moves with it

    test_idx = np.flatnonzero(built.mask("test"))
    y = built.examples["label"].to_numpy()[test_idx]
    p_champion = _predict(champion, built, test_idx, ws)
    p_challenger = _predict(challenger, built, test_idx, ws)
    paired = paired_auc_difference(y, p_challenger, p_champion, n_boot=cfg.n_boot, seed=cfg.seed)
    window = built.info["split"]["splits"]["test"]

    overlap = None
    if champion_window is not None and window["first_cutoff"] and label_cfg.task == "user":
        seen_until = datetime.fromisoformat(champion_window["last_cutoff"]) + parse_duration(label_cfg.horizon)
        if seen_until > datetime.fromisoformat(window["first_cutoff"]):
            overlap = (f"the champion learned from labels up to {seen_until.isoformat()}, inside the comparison "
                       f"window (from {window['first_cutoff']})")
    ci = paired["ci"]
    if overlap:
        promote, reason = False, f"no fair comparison: {overlap}; the champion stays"
    elif ci is None:
        promote, reason = False, "no paired interval (the latest window holds one class only); the champion stays"
    elif ci[1] < 0:
        promote, reason = False, (f"the challenger is worse beyond the interval: ΔAUC {paired['diff']:+.4f}, "
                                  f"95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}] lies below 0")
    else:
        promote, reason = True, (f"the challenger is not worse: ΔAUC {paired['diff']:+.4f}, "
                                 f"95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}] reaches 0 or above")

    decision: dict[str, Any] = {
        "at": _now(), "run": run, "decision": "promoted" if promote else "kept", "reason": reason,
        "ingested": ingested,
        "window": {"split": "test", "first_cutoff": window["first_cutoff"], "last_cutoff": window["last_cutoff"],
                   "n": int(len(y)), "positives": int(y.sum())},
        "champion": {"version": champion.version, "roc_auc": roc_auc(y, p_champion),
                     "training_window": champion_window},
        "challenger": {"version": challenger.version, "roc_auc": roc_auc(y, p_challenger),
                       "training_window": challenger_window},
        "paired": {"diff": paired["diff"], "ci": ci, "n_boot": paired["n_boot"]},
    }
    if promote:
        archived = _free_name(ws, f"{run}.{champion.version}")
        _set_run_name(challenger_dir, run)
        _promote(challenger_dir, champion.dir, ws.runs_dir / archived)
        _set_run_name(ws.runs_dir / archived, archived, kept="former champion")
        decision["champion"]["kept_as"] = archived
        decision["challenger"]["now"] = run
        decision["ensembles_to_rebuild"] = _ensembles_of(ws, run)
    else:
        kept = _free_name(ws, f"{run}.{challenger.version}")
        _set_run_name(challenger_dir, kept, kept="challenger not promoted")
        os.replace(challenger_dir, ws.runs_dir / kept)
        fsync_dir(ws.runs_dir)
        decision["challenger"]["kept_as"] = kept
    return decision


def _predict(run: runs.Run, built: runs.Built, idx: np.ndarray, ws: Workspace) -> np.ndarray:
    """P(purchase) of ``run`` on the built examples at ``idx``, with the run's own feature order."""
    X = runs.model_inputs(run.model_name, built, idx, ws, run.vocab)
    if isinstance(X, pd.DataFrame):
        X = runs.run_features(run.meta, X)
    return np.asarray(run.model.predict_proba(X), dtype=np.float64)[:, 1]


def _promote(challenger_dir: Path, champion_dir: Path, archive_dir: Path) -> None:
    """The challenger at ``champion_dir`` and the old champion at ``archive_dir``; ``champion_dir``
    never misses where the kernel can exchange two names atomically (Linux)."""
    if exchange(challenger_dir, champion_dir):
        os.replace(challenger_dir, archive_dir)  # what was the champion
    else:
        os.replace(champion_dir, archive_dir)
        os.replace(challenger_dir, champion_dir)
    fsync_dir(champion_dir.parent)


def _set_run_name(run_dir: Path, name: str, kept: Optional[str] = None) -> None:
    """Rename the run in its run.json (its version and everything else stay); ``kept`` marks a version
    set aside (``kept_version``: why), which the default report leaves out."""
    meta = runs.read_meta(run_dir)
    meta["run"] = name
    if kept:
        meta[KEPT_VERSION] = {"role": kept, "at": _now()}
    atomic_write_json(run_dir / runs.RUN_JSON, meta)


def _free_name(ws: Workspace, name: str) -> str:
    out, k = name, 1
    while (ws.runs_dir / out).exists():
        k += 1
        out = f"{name}-{k}"
    return out


def _ensembles_of(ws: Workspace, run: str) -> list[str]:
    """Ensemble runs that name ``run`` as a member: they refuse to load until rebuilt."""
    out = []
    for d in sorted(ws.runs_dir.iterdir()) if ws.runs_dir.is_dir() else []:
        try:
            meta = runs.read_meta(d)
        except (FileNotFoundError, ValueError, OSError):
            continue
        if meta.get("model") == runs.ENSEMBLE and any(
                (m.get("run") if isinstance(m, dict) else m) == run for m in meta.get("members") or []):
            out.append(d.name)
    return out


def _now() -> str:
    return pd.Timestamp.now(tz="UTC").isoformat()


def describe(decision: dict) -> str:
    """The lines `purchase-intent retrain` prints."""
    w, ch, cc = decision["window"], decision["champion"], decision["challenger"]
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    lines = [f"latest window (test split): {w['first_cutoff'][:19]} .. {w['last_cutoff'][:19]}, "
             f"{w['n']:,} examples, {w['positives']:,} positives",
             f"champion   {ch['version']}: ROC-AUC {fmt(ch['roc_auc'])}",
             f"challenger {cc['version']}: ROC-AUC {fmt(cc['roc_auc'])}",
             f"{decision['decision'].upper()}: {decision['reason']}"]
    if decision["decision"] == "promoted":
        lines.append(f"runs/{decision['run']} is now {cc['version']}; the old champion is kept as "
                     f"runs/{ch['kept_as']}")
        servers = decision.get("reloaded_servers") or []
        lines.append(f"signalled {len(servers)} running server(s) to reload: {servers}" if servers
                     else "no running server of this run to reload")
        for e in decision.get("ensembles_to_rebuild") or []:
            lines.append(f"warning: ensemble run {e} names {decision['run']} and must be rebuilt "
                         "(`purchase-intent ensemble`)")
    else:
        lines.append(f"the challenger is kept as runs/{cc['kept_as']}")
    lines.append(f"decision appended to {AUDIT_LOG}")
    return "\n".join(lines)
