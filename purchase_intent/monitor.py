"""Drift of a run: the latest window of the data against the run's training window.

    purchase-intent monitor --run lightgbm
    purchase-intent monitor --run lightgbm --at 2017-12-03 --fail-on-drift --out drift.json

Two windows of examples, built exactly as batch scoring builds them (``purchase-intent score``:
every user with an event in the lookback before the cutoff, features of events ``ts < cutoff``,
the run's model):

* the **training window**: the examples at the run's last training cutoff (the newest population
  it learned from; its first and last training cutoffs are kept in ``runs/<run>/train_window.json``
  so that the run can be monitored after the workspace is rebuilt). While the workspace holds the
  run's own build, their features are read from it instead of computed again;
* the **latest window**: ``[T - horizon, T)``, where ``T`` is ``--at`` (default: the end of the
  data); its examples are the users active at the cutoff ``T - horizon`` and its labels are the
  purchases in the window, so they have matured whenever ``T`` lies within the data.

Session-task runs compare sessions instead of users, built as ``build`` builds them (the run's
session rules and prefix, features of each session's events before its cutoff; sessions that may
still be going on at the end of the data are left out, so every label has matured): the training
window is the sessions that started in the run's last training period (``[last training cutoff -
step, last training cutoff]``), the latest window those that started in ``[T - step, T)``.

Compared are the population stability index (PSI) of every feature and of the score,
``PSI = sum_b (a_b - e_b) * ln(a_b / e_b)`` over bins fitted on the training window (deciles of its
values; a feature with at most ``n_bins`` distinct values is binned by value, with one bin for
values training never saw; missing values get a bin of their own; an empty bin counts as
``epsilon``), the positive rate of each window and, when the labels have matured, the live ROC-AUC
with a bootstrap interval against the interval of the run's own evaluation (its pooled backtest
when it has one, else its test window).

Verdict, the usual rule of thumb for PSI: below 0.1 **stable**, 0.1 to 0.25 **moderate**, above
0.25 **drift**; and drift when the live ROC-AUC falls below the evaluation's interval. The result is
written to ``runs/<run>/monitor.json`` (or ``--out``), shown by ``report`` ("Drift") and exposed by
``serve`` as Prometheus gauges. With ``--fail-on-drift`` the command exits with ``DRIFT_EXIT`` (3)
on drift, for schedulers.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from . import runs, storage
from .config import DRIFT_EXIT as DRIFT_EXIT  # re-exported: the exit status is monitor's contract
from .config import LabelConfig, MonitorConfig
from .evaluate import roc_auc, roc_auc_ci
from .feature_frame import compute_features_for_users
from .labels import build_examples, end_tolerance
from .runs import Run
from .score import predict_users
from .times import ONE_US, parse_duration, parse_time
from .workspace import Workspace, as_workspace, atomic_write_json

TRAIN_WINDOW_JSON = "train_window.json"  # a run's training cutoffs, kept for monitoring after a rebuild
STABLE, MODERATE, DRIFT = "stable", "moderate", "drift"
# features whose distribution moves by construction, left out of the verdict (measured and shown all the same):
# the days since a user's first event grow with the age of the log itself, so they drift in every log
EXPECTED_DRIFT = ("days_since_first_event",)


class MonitorError(ValueError):
    """The run or the data cannot be monitored as asked (the message says why and what to do)."""


# ---------------------------------------------------------------------------------------------
# population stability
@dataclass
class Bins:
    """Bins fitted on reference values: inner quantile ``edges``, or ``categories`` (by value)."""

    edges: Optional[np.ndarray] = None  # (K-1,) increasing; bin k holds edges[k-1] <= x < edges[k]
    categories: Optional[np.ndarray] = None  # (K,) sorted distinct values

    @property
    def kind(self) -> str:
        return "categorical" if self.categories is not None else "numeric"


def fit_bins(reference: np.ndarray, n_bins: int = 10) -> Bins:
    """Bins of ``reference`` (NaN ignored): by value when it holds at most ``n_bins`` distinct values,
    else at its quantiles 1/n_bins .. (n_bins-1)/n_bins (ties merged, so bins may be fewer)."""
    x = np.asarray(reference, dtype=np.float64)
    x = x[~np.isnan(x)]
    values = np.unique(x)
    if len(values) <= n_bins:
        return Bins(categories=values)
    edges = np.unique(np.quantile(x, np.linspace(0, 1, n_bins + 1)[1:-1]))
    return Bins(edges=edges)


def bin_counts(bins: Bins, values: np.ndarray) -> np.ndarray:
    """Counts per bin of ``values``: the fitted bins, then (categorical) a bin for unseen values, then
    a bin for missing values (NaN)."""
    x = np.asarray(values, dtype=np.float64)
    missing = np.isnan(x)
    x = x[~missing]
    if bins.categories is not None:
        cats = bins.categories
        pos = np.searchsorted(cats, x)
        seen = (pos < len(cats)) & (cats[np.minimum(pos, len(cats) - 1)] == x) if len(cats) else np.zeros(len(x), bool)
        counts = np.bincount(pos[seen], minlength=len(cats)).astype(np.int64)
        return np.concatenate([counts, [int((~seen).sum()), int(missing.sum())]])
    idx = np.searchsorted(bins.edges, x, side="right")
    counts = np.bincount(idx, minlength=len(bins.edges) + 1).astype(np.int64)
    return np.concatenate([counts, [int(missing.sum())]])


def psi(expected_counts: np.ndarray, actual_counts: np.ndarray, epsilon: float = 1e-4) -> Optional[float]:
    """Population stability index of two count vectors over the same bins; None when either is empty.

    ``sum_b (a_b - e_b) * ln(a_b / e_b)`` with shares ``a_b``, ``e_b``; a share of 0 becomes ``epsilon``.
    """
    e = np.asarray(expected_counts, dtype=np.float64)
    a = np.asarray(actual_counts, dtype=np.float64)
    if e.sum() <= 0 or a.sum() <= 0:
        return None
    e = np.maximum(e / e.sum(), epsilon)
    a = np.maximum(a / a.sum(), epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


def stability(reference: np.ndarray, latest: np.ndarray, cfg: MonitorConfig) -> dict[str, Any]:
    """PSI of ``latest`` against ``reference`` on bins fitted on ``reference``, with its verdict."""
    bins = fit_bins(reference, cfg.n_bins)
    value = psi(bin_counts(bins, reference), bin_counts(bins, latest), cfg.epsilon)
    return {"psi": None if value is None else round(value, 6), "verdict": verdict(value, cfg), "kind": bins.kind}


def verdict(value: Optional[float], cfg: MonitorConfig) -> Optional[str]:
    """stable (PSI < moderate), moderate (up to drift) or drift (PSI > drift); None for no value."""
    if value is None:
        return None
    return DRIFT if value > cfg.drift else MODERATE if value >= cfg.moderate else STABLE


# ---------------------------------------------------------------------------------------------
# the windows
@dataclass
class Window:
    """The examples of one window: users active at ``cutoff``, their features, scores and labels."""

    cutoff: datetime
    end: datetime  # cutoff + horizon: the label window is [cutoff, end)
    features: pd.DataFrame  # (N, F) the run's features
    scores: np.ndarray  # (N,)
    labels: Optional[np.ndarray]  # (N,) 0/1, None when the label window reaches past the data

    @property
    def positive_rate(self) -> Optional[float]:
        return float(self.labels.mean()) if self.labels is not None and len(self.labels) else None


def training_window(ws: Workspace, run: Run) -> dict[str, Any]:
    """The run's training window: first and last training cutoff, examples and positives.

    Read from ``runs/<run>/train_window.json``; when that is missing and the workspace still holds
    the run's build, taken from the build and written there (so it survives a rebuild)."""
    path = run.dir / TRAIN_WINDOW_JSON
    if path.exists():
        return json.loads(path.read_text())
    meta = run.meta if run.meta.get("build_id") else (run.members[0].meta if run.members else run.meta)
    build_json = ws.examples_dir / runs.BUILD_JSON
    info = json.loads(build_json.read_text()) if build_json.exists() else {}
    if info.get("build_id") is None or info.get("build_id") != meta.get("build_id"):
        raise MonitorError(f"run {run.name!r} was trained on build {meta.get('build_id')}, the workspace now holds "
                           f"{info.get('build_id') or 'no build'}, and the run has no {TRAIN_WINDOW_JSON}: its "
                           "training window is unknown; train it again (or monitor the run that `retrain` promoted)")
    window = window_of_build(info)
    atomic_write_json(path, window)
    return window


def window_of_build(info: dict) -> dict[str, Any]:
    """The training window of the build ``info`` (build.json): what ``train`` keeps with a run, so that a later
    rebuild (``retrain`` of another run) leaves it known."""
    train = info["split"]["splits"]["train"]
    return {"first_cutoff": train["first_cutoff"], "last_cutoff": train["last_cutoff"], "n": train["n"],
            "positives": train["positives"], "build_id": info["build_id"]}


def _active_users(con, cutoff: datetime, lookback) -> list[str]:
    rows = con.execute("SELECT DISTINCT user_id FROM events WHERE ts >= $lo AND ts < $hi AND user_id IS NOT NULL "
                       "ORDER BY user_id", {"lo": cutoff - lookback, "hi": cutoff}).fetchall()
    return [r[0] for r in rows]


def _buyers(con, lo: datetime, hi: datetime) -> set[str]:
    """Users with a purchase in [lo, hi): the label of the user task (``labels.build_examples``)."""
    rows = con.execute("SELECT DISTINCT user_id FROM events WHERE event = 'purchase' AND ts >= $lo AND ts < $hi",
                       {"lo": lo, "hi": hi}).fetchall()
    return {r[0] for r in rows}


def build_window(run: Run, con, cutoff: datetime, matured: bool, cfg: MonitorConfig) -> Window:
    """Features, scores and (when ``matured``) labels of every user active at ``cutoff``, in chunks;
    the same inputs and model call as ``purchase-intent score``."""
    horizon = parse_duration(run.meta["label_config"]["horizon"])
    users = _active_users(con, cutoff, run.lookback)
    if not users:
        raise MonitorError(f"no user has an event in [{cutoff - run.lookback}, {cutoff}): nothing to compare; "
                           "choose another --at")
    tabular = not run.members and not runs.is_sequence_model(run.model_name)
    frames, scores = [], []
    for k in range(0, len(users), cfg.chunk_size):
        chunk = users[k:k + cfg.chunk_size]
        ex = pd.DataFrame({"example_id": np.arange(len(chunk), dtype=np.int64),
                           "user_id": pd.array(chunk, dtype=object),
                           "cutoff": pd.Series([cutoff] * len(chunk), dtype="datetime64[us]")})
        X = runs.run_features(run.meta, compute_features_for_users(con, ex, run.feature_cfg))
        frames.append(X.reset_index(drop=True))
        if tabular:  # the features just computed are the model's whole input
            scores.append(np.asarray(run.model.predict_proba(X), dtype=np.float64)[:, 1])
        else:  # ensembles and sequence models: their own inputs, as `score` builds them
            scores.append(predict_users(run, con, chunk, cutoff))
    labels = None
    if matured:
        bought = _buyers(con, cutoff, cutoff + horizon)
        labels = np.fromiter((u in bought for u in users), dtype=np.int8, count=len(users))
    return Window(cutoff, cutoff + horizon, pd.concat(frames, ignore_index=True), np.concatenate(scores), labels)


def window_from_build(run: Run, ws: Workspace, cutoff: datetime, con) -> Optional[Window]:
    """The training window at ``cutoff`` from the workspace's build, when it is the run's own build
    (its train examples at that cutoff: the same users, features and labels ``build_window`` would
    compute, already stored); None otherwise. Only the scores are computed."""
    d = ws.examples_dir
    try:
        info = json.loads((d / runs.BUILD_JSON).read_text())
    except (OSError, ValueError):
        return None
    meta = run.meta if run.meta.get("build_id") else (run.members[0].meta if run.members else run.meta)
    if info.get("build_id") != meta.get("build_id"):
        return None
    ex = storage.read_frame(d / runs.EXAMPLES, columns=["user_id", "cutoff", "label", "split"])
    rows = np.flatnonzero(((ex["cutoff"] == pd.Timestamp(cutoff)) & (ex["split"] == "train")).to_numpy())
    if not len(rows) or rows[-1] - rows[0] + 1 != len(rows):  # built examples are ordered by cutoff
        return None
    feats = runs.FeatureRows(d / runs.FEATURES).iloc[rows]  # those rows only, not the whole matrix
    X = runs.run_features(run.meta, feats)
    if not run.members and not runs.is_sequence_model(run.model_name):
        scores = np.asarray(run.model.predict_proba(X), dtype=np.float64)[:, 1]
    else:
        scores = predict_users(run, con, ex["user_id"].iloc[rows].tolist(), cutoff)
    horizon = parse_duration(run.meta["label_config"]["horizon"])
    return Window(cutoff, cutoff + horizon, X.reset_index(drop=True), scores,
                  ex["label"].to_numpy()[rows].astype(np.int8))


def session_windows(run: Run, con, ref_end: datetime, end: datetime) -> tuple[Window, Window]:
    """Session task: the sessions that started in ``[ref_end - step, ref_end]`` and in
    ``[end - step, end)``, with the features, scores and labels the build and the API give them."""
    lc = LabelConfig(**run.meta["label_config"])
    step = parse_duration(lc.step)
    ex = build_examples(con, lc).to_pandas()
    start = ex["session_start"]
    out = []
    for lo, in_window in ((ref_end - step, (start >= ref_end - step) & (start <= ref_end)),
                          (end - step, (start >= end - step) & (start < end))):
        rows = ex[in_window.to_numpy()]
        if rows.empty:
            raise MonitorError(f"no complete session started in [{lo}, {lo + step}): nothing to compare; "
                               "choose another --at")
        X = runs.inputs_for_examples(run.meta, run.model, con, rows[["user_id", "cutoff", "session_id",
                                                                     "session_start"]].reset_index(drop=True))
        scores = np.asarray(run.model.predict_proba(X), dtype=np.float64)[:, 1]
        first, meta = (X[0], run.members[0].meta) if isinstance(X, list) else (X, run.meta)  # ensemble: 1st member
        feats = first["tabular"] if isinstance(first, dict) else first  # sequence models: an array
        feats = pd.DataFrame(np.asarray(feats, dtype=np.float64), columns=meta["feature_names"])
        out.append(Window(lo, lo + step, feats, scores, rows["label"].to_numpy(np.int8)))
    return out[0], out[1]


def expected_interval(metrics: dict) -> dict[str, Any]:
    """The ROC-AUC interval the run's evaluation found: its pooled backtest's, else its test window's."""
    for source, block in (("backtest", (metrics.get("backtest") or {}).get("pooled")), ("test", metrics.get("test"))):
        if block and block.get("roc_auc_ci") and None not in block["roc_auc_ci"]:
            return {"source": source, "roc_auc": block.get("roc_auc"), "roc_auc_ci": block["roc_auc_ci"]}
    return {"source": None, "roc_auc": None, "roc_auc_ci": None}


# ---------------------------------------------------------------------------------------------
# the check
def monitor(run: str, workspace=None, cfg: MonitorConfig | None = None, out: str | Path | None = None) -> dict:
    """Compare the latest window with the run's training window; write and return the result.

    Parameters
    ----------
    run : a run name under ``<workspace>/runs/`` or a run directory (user or session task).
    cfg : the window end, the bins and the thresholds.
    out : where the JSON goes (default ``runs/<run>/monitor.json``, which ``serve`` and ``report`` read).

    Returns
    -------
    dict, as written: run, windows, positive_rate, score, features (by PSI, largest first),
    performance, verdict ("stable" | "moderate" | "drift") and the reasons for it.
    """
    cfg = cfg or MonitorConfig()
    if cfg.n_bins < 2 or not 0 < cfg.moderate <= cfg.drift or cfg.chunk_size < 1:
        raise MonitorError("monitor needs n_bins >= 2, 0 < moderate <= drift and chunk_size >= 1")
    ws = as_workspace(workspace)
    with ws.lock("monitor"):  # it writes monitor.json (and train_window.json); re-entrant under the CLI's lock
        return _monitor(run, ws, cfg, out)


def _monitor(run: str, ws: Workspace, cfg: MonitorConfig, out: str | Path | None) -> dict:
    t0 = time.perf_counter()
    loaded = runs.load_run(run, ws)
    lc = loaded.meta["label_config"]
    train = training_window(ws, loaded)
    con = ws.connect()
    lo, hi = con.execute("SELECT min(ts), max(ts) FROM events").fetchall()[0]
    end = parse_time(cfg.at) if cfg.at is not None else hi + ONE_US
    ref_cutoff = datetime.fromisoformat(train["last_cutoff"])
    if loaded.task == "session":
        ref, new = session_windows(loaded, con, ref_cutoff, end)
        matured, ref_source = True, "events"
    else:
        horizon = parse_duration(lc["horizon"])
        latest_cutoff = end - horizon
        if latest_cutoff - loaded.lookback < lo - end_tolerance(loaded.lookback):
            raise MonitorError(f"the latest window [{latest_cutoff}, {end}) needs the lookback {lc['lookback']} "
                               f"before it, but the data start at {lo}; choose a later --at")
        matured = end <= hi + ONE_US + end_tolerance(horizon)
        ref = window_from_build(loaded, ws, ref_cutoff, con)  # the stored training features, when they are the run's
        ref_source = "build" if ref is not None else "events"
        if ref is None and loaded.dir.resolve().parent != ws.runs_dir.resolve():
            raise MonitorError(f"run {run!r} was trained in another workspace ({loaded.dir.parent.parent}): its "
                               f"training window cannot be rebuilt from this workspace's events, which are not the "
                               f"ones it learned from; monitor it in its own workspace, with the new events ingested "
                               f"there")
        if ref is None:
            ref = build_window(loaded, con, ref_cutoff, True, cfg)
        new = build_window(loaded, con, latest_cutoff, matured, cfg)

    unknown = sorted(set(cfg.ignore) - set(ref.features.columns))
    if unknown:
        raise MonitorError(f"--ignore {', '.join(unknown)}: not a feature of run {loaded.name!r}; its features are "
                           f"{', '.join(ref.features.columns)}")
    ignored = set(cfg.ignore) | (set(EXPECTED_DRIFT) & set(ref.features.columns))
    features = [{"name": name, **stability(ref.features[name].to_numpy(), new.features[name].to_numpy(), cfg),
                 "ignored": name in ignored} for name in ref.features.columns]
    features.sort(key=lambda f: -1.0 if f["psi"] is None else f["psi"], reverse=True)
    score = stability(ref.scores, new.scores, cfg)
    score.update(reference_mean=round(float(ref.scores.mean()), 6), latest_mean=round(float(new.scores.mean()), 6))
    performance = _performance(loaded, new, cfg)

    counted = [f for f in features if not f["ignored"]]
    reasons = [f"feature {f['name']}: PSI {f['psi']:.3f} > {cfg.drift}" for f in counted if f["verdict"] == DRIFT]
    if score["verdict"] == DRIFT:
        reasons.append(f"score: PSI {score['psi']:.3f} > {cfg.drift}")
    if performance["verdict"] == "below":
        reasons.append(f"live ROC-AUC {performance['roc_auc']:.3f} below the {performance['expected']['source']} "
                       f"interval {_ci(performance['expected']['roc_auc_ci'])}")
    moderate = any(x["verdict"] == MODERATE for x in counted + [score])
    overall = DRIFT if reasons else MODERATE if moderate else STABLE
    now = time.time()
    result = {
        "run": loaded.name, "model": loaded.model_name, "version": loaded.version, "task": loaded.task,
        "checked_at": pd.Timestamp(now, unit="s", tz="UTC").isoformat(), "checked_at_epoch": round(now, 3),
        "config": asdict(cfg),
        "thresholds": {"stable_below": cfg.moderate, "drift_above": cfg.drift},
        "training_window": {**train, "compared_cutoff": ref.cutoff.isoformat(), "n_compared": len(ref.scores),
                            "features_from": ref_source},
        "latest_window": {"cutoff": new.cutoff.isoformat(), "end": new.end.isoformat(), "n": len(new.scores),
                          "labels_matured": matured},
        "positive_rate": {"training": _rate(train.get("positives"), train.get("n")),
                          "training_last_cutoff": ref.positive_rate, "latest": new.positive_rate},
        "score": score,
        "features": features,
        "performance": performance,
        "verdict": overall,
        "reasons": reasons,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    path = Path(out) if out else loaded.dir / runs.MONITOR_JSON
    atomic_write_json(path, runs.jsonable(result))
    result["path"] = str(path)
    return result


def _rate(positives: Any, n: Any) -> Optional[float]:
    return float(positives) / n if isinstance(positives, (int, float)) and isinstance(n, (int, float)) and n else None


def _performance(run: Run, new: Window, cfg: MonitorConfig) -> dict[str, Any]:
    """Live ROC-AUC of the latest window (when its labels have matured) against the evaluation's interval."""
    metrics_path = run.dir / runs.METRICS_JSON
    expected = expected_interval(runs.read_metrics(run.dir)) if metrics_path.exists() else expected_interval({})
    out: dict[str, Any] = {"roc_auc": None, "roc_auc_ci": None, "expected": expected, "verdict": None, "note": None}
    if new.labels is None:
        out["note"] = f"labels not matured: the label window ends at {new.end.isoformat()}, after the data"
        return out
    auc = roc_auc(new.labels, new.scores)
    if auc is None:
        out["note"] = "one class only in the latest window: ROC-AUC undefined"
        return out
    out["roc_auc"] = round(auc, 6)
    out["roc_auc_ci"] = roc_auc_ci(new.labels, new.scores, n_boot=cfg.n_boot, seed=cfg.seed)
    ci = expected["roc_auc_ci"]
    if ci is None:
        out["note"] = "the run has no evaluation interval (run `purchase-intent evaluate`)"
    else:
        out["verdict"] = "below" if auc < ci[0] else "above" if auc > ci[1] else "within"
    return out


def describe(result: dict, top: int = 10) -> str:
    """The lines `purchase-intent monitor` prints."""
    lw, tw = result["latest_window"], result["training_window"]
    rate = result["positive_rate"]
    pct = lambda x: "n/a" if x is None else f"{x:.2%}"  # noqa: E731
    unit, ref = ("sessions", "sessions from") if result.get("task") == "session" else ("users", "cutoff")
    lines = [f"run {result['run']} ({result['version']}): latest window {lw['cutoff'][:19]} .. {lw['end'][:19]} "
             f"({lw['n']:,} {unit}) vs training {ref} {tw['compared_cutoff'][:19]} ({tw['n_compared']:,} {unit})",
             f"positive rate: training {pct(rate['training'])}, latest {pct(rate['latest'])}",
             f"score PSI {result['score']['psi']:.4f} ({result['score']['verdict']})"]
    perf = result["performance"]
    if perf["roc_auc"] is not None:
        exp = perf["expected"]
        lines.append(f"live ROC-AUC {perf['roc_auc']:.4f} {_ci(perf['roc_auc_ci'])}; {exp['source'] or 'no'} "
                     f"interval {_ci(exp['roc_auc_ci'])}: {perf['verdict'] or 'not judged'}")
    else:
        lines.append(f"live ROC-AUC: {perf['note']}")
    lines.append(f"{'feature':40} {'PSI':>8}  verdict")
    for f in result["features"][:top]:
        value = "n/a" if f["psi"] is None else f"{f['psi']:.4f}"
        lines.append(f"{f['name'][:40]:40} {value:>8}  {f['verdict']}{' (ignored)' if f['ignored'] else ''}")
    if len(result["features"]) > top:
        lines.append(f"... {len(result['features']) - top} more in {result.get('path', 'the JSON')}")
    lines.append(f"verdict: {result['verdict'].upper()} (PSI < {result['thresholds']['stable_below']} stable, "
                 f"> {result['thresholds']['drift_above']} drift)" + "".join(f"\n  {r}" for r in result["reasons"]))
    lines.append(f"wrote {result.get('path')} in {result['seconds']:.1f}s")
    return "\n".join(lines)


def _ci(ci) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci and None not in ci else ""

