"""The Python API behind every command: ingest -> build -> train -> evaluate, and `run` for all four.

Use it from a notebook exactly as the CLI does::

    from purchase_intent import pipeline
    from purchase_intent.config import DataConfig, LabelConfig
    pipeline.ingest("events.csv.gz", DataConfig(format="csv"), workspace="ws")
    pipeline.build(LabelConfig(task="user", lookback="28d", horizon="7d"), workspace="ws")
    pipeline.train("lightgbm", workspace="ws")
    metrics = pipeline.evaluate("lightgbm", workspace="ws")

Workspace files this module writes (each written under a temporary name and renamed when complete):
``examples/`` (examples.parquet with the split, features.parquet, build.json) and ``runs/<name>/``
(run.json, model files, predictions.parquet, metrics.json).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .config import DataConfig, FeatureConfig, LabelConfig, TrainConfig, from_dict
from .workspace import Workspace, atomic_dir, atomic_write_bytes, atomic_write_text

BASELINES = ("logreg", "lightgbm")


def _ws(workspace: Workspace | str | Path | None) -> Workspace:
    return workspace if isinstance(workspace, Workspace) else Workspace(workspace)


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# ingest
def ingest(paths: str | Path | Sequence[str | Path], cfg: DataConfig, workspace=None, progress: bool = True):
    """Read, validate, pseudonymise and store raw event files. Returns the ingest report."""
    from .events import ingest as _ingest

    if isinstance(paths, (str, Path)):
        paths = [paths]
    return _ingest(_ws(workspace), [Path(p) for p in paths], cfg, progress=progress)


# ---------------------------------------------------------------------------------------------
# build
@dataclasses.dataclass
class Built:
    """The built examples of a workspace: one row per example, its split and its features."""

    examples: pd.DataFrame  # example_id, user_id, cutoff, label, label_end, period, split, ...
    features: pd.DataFrame  # example_id-ordered feature matrix (same row order as examples)
    info: dict[str, Any]  # build.json

    @property
    def label_cfg(self) -> LabelConfig:
        return from_dict(LabelConfig, self.info["label_config"])

    @property
    def feature_cfg(self) -> FeatureConfig:
        return run_feature_config(self.info)

    def mask(self, split: str) -> np.ndarray:
        return (self.examples["split"] == split).to_numpy()


def build(label_cfg: LabelConfig, feature_cfg: FeatureConfig | None = None, workspace=None, quiet: bool = False) -> Built:
    """Examples (cutoffs x active users, or sessions) + time split + tabular features."""
    from . import features, labels

    ws = _ws(workspace)
    feature_cfg = feature_cfg or FeatureConfig()
    if label_cfg.task == "session" and label_cfg.session_gap:
        feature_cfg = dataclasses.replace(feature_cfg, session_gap=label_cfg.session_gap)
    # hour-of-day and weekday features read the clock of the shop's time zone
    feature_cfg = dataclasses.replace(feature_cfg, tz=label_cfg.tz)
    t0 = time.perf_counter()
    con = ws.connect()
    _log(f"building {label_cfg.task}-task examples ...", quiet)
    examples = labels.build_examples(con, label_cfg)
    ex = examples.to_pandas() if hasattr(examples, "to_pandas") else pd.DataFrame(examples)
    if len(ex) == 0:
        raise ValueError("no examples: the data is shorter than lookback + horizon, or no user is active")
    split, split_info = labels.split_examples(ex, label_cfg)
    ex["split"] = np.asarray(split)
    _register_examples(con, ex)
    _log(f"computing features for {len(ex):,} examples ...", quiet)
    feats = features.compute_features(con, "examples", feature_cfg)
    feats = _align(feats, ex)
    _log(_describe(split_info), quiet)
    info = {
        "label_config": asdict(label_cfg),
        "feature_config": asdict(feature_cfg),
        "feature_names": list(feats.columns),
        "n_examples": int(len(ex)),
        "split": _jsonable(split_info),
        "events_fingerprint": ws.fingerprint() if hasattr(ws, "fingerprint") else None,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    info["build_id"] = hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:12]
    with atomic_dir(ws.examples_dir) as tmp:
        ex.to_parquet(tmp / "examples.parquet", index=False)
        feats.reset_index(drop=True).to_parquet(tmp / "features.parquet", index=False)
        (tmp / "build.json").write_text(json.dumps(info, indent=2, default=str))
    _log(f"built {len(ex):,} examples with {feats.shape[1]} features in {info['seconds']:.1f}s", quiet)
    return Built(ex, feats.reset_index(drop=True), info)


def _align(feats: pd.DataFrame, ex: pd.DataFrame) -> pd.DataFrame:
    """Order feature rows like the examples (by example_id) and keep only feature columns."""
    if "example_id" in feats.columns:
        feats = feats.set_index("example_id")
    return feats.reindex(ex["example_id"].to_numpy()).astype("float64")


def _describe(split_info: Any) -> str:
    if hasattr(split_info, "describe"):
        return split_info.describe()
    return json.dumps(_jsonable(split_info), indent=2, default=str)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        obj = asdict(obj)
    return json.loads(json.dumps(obj, default=str))


def load_built(workspace=None) -> Built:
    """Read what `build` wrote."""
    ws = _ws(workspace)
    d = ws.examples_dir
    if not (d / "build.json").exists():
        raise FileNotFoundError(f"no built examples in {d}: run `purchase-intent build` first")
    info = json.loads((d / "build.json").read_text())
    ex = pd.read_parquet(d / "examples.parquet")
    feats = pd.read_parquet(d / "features.parquet")
    return Built(ex, feats, info)


# ---------------------------------------------------------------------------------------------
# models: inputs, fit, runs
def _is_sequence_model(name: str) -> bool:
    from .models import SEQUENCE_MODELS

    return name in SEQUENCE_MODELS


def model_inputs(name: str, built: Built, idx: np.ndarray, ws: Workspace, vocab: Any = None):
    """What model `name` eats for the built examples at row positions `idx`.

    Baselines get the feature frame; sequence models a dict of arrays: "tabular" plus the event
    sequences of each example (built from the workspace's events, ts < cutoff only).
    """
    X_tab = built.features.iloc[idx]
    if not _is_sequence_model(name):
        return X_tab
    con = ws.connect()
    sub = built.examples.iloc[idx][["example_id", "user_id", "cutoff"]].copy()
    # sequences come back in example_id order: keep the requested order by renumbering
    sub["example_id"] = np.arange(len(sub), dtype=np.int64)
    _register_examples(con, sub)
    return _with_sequences(con, X_tab, vocab)


def run_feature_config(meta: dict) -> FeatureConfig:
    """The FeatureConfig saved in a run's or a build's metadata (windows as a tuple, as built)."""
    cfg = from_dict(FeatureConfig, meta["feature_config"])
    cfg.windows = tuple(cfg.windows)
    return cfg


def run_features(meta: dict, feats: pd.DataFrame) -> pd.DataFrame:
    """The run's feature columns of ``feats``, in its order; an error names any this code lacks."""
    missing = [c for c in meta["feature_names"] if c not in feats.columns]
    if missing:
        raise RuntimeError(f"features {missing} of the run are not computed by this version")
    return feats[meta["feature_names"]]


def _register_examples(con, examples: pd.DataFrame, table: str = "examples") -> None:
    con.register(f"{table}_df", examples)
    con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT * FROM {table}_df")
    con.unregister(f"{table}_df")


def _with_sequences(con, X_tab: pd.DataFrame, vocab: Any) -> dict:
    from .sequences import build_sequences

    X = dict(build_sequences(con, "examples", vocab.cfg if hasattr(vocab, "cfg") else None, vocab))
    X["tabular"] = X_tab.to_numpy(np.float32)
    return X


def inputs_for_examples(meta: dict, model: Any, con, examples: pd.DataFrame):
    """Model inputs for new examples (user_id, cutoff) over the `events` of connection `con`.

    The one path shared by batch scoring and the HTTP API: the same feature SQL and the same
    sequence builder as training, on whatever events `con` holds (a workspace or one request).
    `examples` needs user_id and cutoff (and session_id / session_start for the session task);
    rows come back in the order given.
    """
    from .features import compute_features

    ex = examples.copy()
    ex["example_id"] = np.arange(len(ex), dtype=np.int64)
    for col, default in (("label", 0), ("period", 0)):
        if col not in ex.columns:
            ex[col] = default
    _register_examples(con, ex)
    feats = run_features(meta, _align(compute_features(con, "examples", run_feature_config(meta)), ex))
    if not _is_sequence_model(meta["model"]):
        return feats
    return _with_sequences(con, feats, _model_vocab(model))


def _fit_vocab(name: str, built: Built, train_idx: np.ndarray, ws: Workspace, params: dict):
    if not _is_sequence_model(name):
        return None
    from .sequences import SequenceConfig, fit_vocab

    con = ws.connect()
    sub = built.examples.iloc[train_idx][["example_id", "user_id", "cutoff"]]
    _register_examples(con, sub, "train_examples")
    seq_cfg = SequenceConfig(**{k: v for k, v in params.get("sequence", {}).items()})
    return fit_vocab(con, "train_examples", seq_cfg)


def fit_model(name: str, params: dict, built: Built, train_idx: np.ndarray, valid_idx: np.ndarray,
              ws: Workspace, train_cfg: TrainConfig):
    """Fit a fresh model `name` on the rows train_idx (valid_idx for early stopping / calibration)."""
    from .models import MODELS
    from .models.baselines import check_min_data

    y = built.examples["label"].to_numpy()
    check_min_data(y[train_idx], train_cfg.min_positives, train_cfg.min_negatives)
    vocab = _fit_vocab(name, built, train_idx, ws, params)
    model_params = {k: v for k, v in params.items() if k != "sequence"}
    if vocab is not None:
        model_params["vocab"] = vocab
    model = MODELS[name](random_state=train_cfg.seed, **model_params)
    X_train = model_inputs(name, built, train_idx, ws, vocab)
    X_valid = model_inputs(name, built, valid_idx, ws, vocab) if len(valid_idx) else None
    y_valid = y[valid_idx] if len(valid_idx) else None
    model.fit(X_train, y[train_idx], X_valid=X_valid, y_valid=y_valid)
    return model


# estimator parameters that say how and where to run, not what model to fit
_RUNTIME_PARAMS = {"vocab", "random_state", "n_jobs", "device", "checkpoint_dir", "progress"}


def _model_params(model: Any) -> dict:
    """Every hyperparameter of the fitted model (defaults resolved), so a backtest refits the same model."""
    return _jsonable({k: v for k, v in model.get_params().items() if k not in _RUNTIME_PARAMS})


def _refit_params(meta: dict) -> dict:
    """Parameters to refit a saved run with: its resolved ones, then those it was given.

    Runs saved before ``model_params`` was recorded refit with this version's defaults."""
    return {**meta.get("model_params", {}), **meta.get("params", {})}


def _model_vocab(model: Any):
    return getattr(model, "vocab_", None) or getattr(model, "vocab", None)


def train(name: str, run: str | None = None, params: dict | None = None, train_cfg: TrainConfig | None = None,
          workspace=None, quiet: bool = False) -> Path:
    """Fit model `name` on the train split (valid for early stopping); save it as a run. Returns its directory."""
    ws = _ws(workspace)
    train_cfg = train_cfg or TrainConfig()
    params = dict(params or {})
    built = load_built(ws)
    train_idx = np.flatnonzero(built.mask("train"))
    valid_idx = np.flatnonzero(built.mask("valid"))
    _log(f"training {name} on {len(train_idx):,} examples (valid {len(valid_idx):,}) ...", quiet)
    t0 = time.perf_counter()
    model = fit_model(name, params, built, train_idx, valid_idx, ws, train_cfg)
    seconds = time.perf_counter() - t0
    y = built.examples["label"].to_numpy()
    run_dir = ws.run_dir(run or name)
    from .distributed import is_main

    if not is_main():  # under torchrun every rank trains; only rank 0 writes the run
        return run_dir
    meta = {
        "run": run_dir.name,
        "model": name,
        "params": _jsonable(params),
        "model_params": _model_params(model),
        "train_config": asdict(train_cfg),
        "build_id": built.info["build_id"],
        "label_config": built.info["label_config"],
        "feature_config": built.info["feature_config"],
        "feature_names": built.info["feature_names"],
        "train": {"n": int(len(train_idx)), "positives": int(y[train_idx].sum())},
        "fit_seconds": round(seconds, 2),
        "created": pd.Timestamp.now(tz="UTC").isoformat(),
    }
    meta["version"] = f"{name}-" + hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:10]
    with atomic_dir(run_dir) as tmp:
        model.save(tmp / "model")
        (tmp / "run.json").write_text(json.dumps(meta, indent=2))
    _log(f"saved run {run_dir} ({seconds:.1f}s)", quiet)
    return run_dir


def load_run(run: str | Path, workspace=None):
    """(meta, model) of a saved run; loading never unpickles."""
    from .models import load_model

    ws = _ws(workspace)
    run_dir = ws.run_dir(str(run))
    if not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"no run at {run_dir}: train one with `purchase-intent train`")
    meta = json.loads((run_dir / "run.json").read_text())
    if meta["model"] == "ensemble":
        raise ValueError(f"run {run!r} averages the held-out predictions of {', '.join(meta['members'])} and has "
                         "no model of its own: score, serve or explain one of those runs")
    return meta, load_model(meta["model"], run_dir / "model")


# ---------------------------------------------------------------------------------------------
# evaluate
def _predict(model: Any, name: str, built: Built, idx: np.ndarray, ws: Workspace, uncalibrated: bool = False):
    """P(purchase) for the built examples at `idx`; with `uncalibrated`, also the model's raw sigmoid(logit)
    (for models calibrated after fitting, so metrics.json can show ECE before and after)."""
    if len(idx) == 0:
        return (np.zeros(0), None) if uncalibrated else np.zeros(0)
    X = model_inputs(name, built, idx, ws, _model_vocab(model))
    p = np.asarray(model.predict_proba(X))[:, 1]
    if not uncalibrated:
        return p
    raw = None
    if hasattr(model, "decision_function") and hasattr(model, "calibrator_"):
        raw = 1.0 / (1.0 + np.exp(-np.asarray(model.decision_function(X), dtype=np.float64)))
    return p, raw


def _pred_frame(built: Built, idx: np.ndarray, p: np.ndarray, split: str, fold: int | None = None) -> pd.DataFrame:
    ex = built.examples.iloc[idx]
    df = pd.DataFrame({
        "example_id": ex["example_id"].to_numpy(),
        "cutoff": ex["cutoff"].to_numpy(),
        "split": split,
        "label": ex["label"].to_numpy().astype(np.int8),
        "probability": p,
    })
    if fold is not None:
        df["fold"] = fold
    return df


def evaluate(run: str, workspace=None, backtest: int = 0, n_boot: int = 1000, quiet: bool = False) -> dict:
    """Score the run's model on valid and test (and K backtest folds); write metrics.json.

    The backtest retrains a fresh model per fold with the run's parameters: each of the last K
    periods in turn is the test window, trained on everything before it (same gap rule).
    """
    from . import labels
    from .evaluate import binary_metrics

    ws = _ws(workspace)
    meta, model = load_run(run, ws)
    name = meta["model"]
    built = load_built(ws)
    if built.info["build_id"] != meta["build_id"]:
        raise RuntimeError(
            f"run {run!r} was trained on build {meta['build_id']}, but the workspace now holds build "
            f"{built.info['build_id']}: retrain it with `purchase-intent train --model {name}`"
        )
    valid_idx = np.flatnonzero(built.mask("valid"))
    test_idx = np.flatnonzero(built.mask("test"))
    p_valid, raw_valid = _predict(model, name, built, valid_idx, ws, uncalibrated=True)
    p_test, raw_test = _predict(model, name, built, test_idx, ws, uncalibrated=True)
    y = built.examples["label"].to_numpy()
    metrics: dict[str, Any] = {
        "model": name,
        "version": meta["version"],
        "task": {k: built.info["label_config"][k] for k in ("task", "lookback", "horizon", "step")},
        "valid": binary_metrics(y[valid_idx], p_valid, n_boot=n_boot),
        "test": binary_metrics(y[test_idx], p_test, n_boot=n_boot),
    }
    if raw_test is not None:
        from .evaluate import expected_calibration_error as ece

        metrics["calibration"] = {
            "method": getattr(model, "calibration", None), "fitted_on": "valid",
            "valid_ece_before": ece(y[valid_idx], raw_valid), "valid_ece_after": ece(y[valid_idx], p_valid),
            "test_ece_before": ece(y[test_idx], raw_test), "test_ece_after": ece(y[test_idx], p_test),
        }
    preds = [_pred_frame(built, valid_idx, p_valid, "valid"), _pred_frame(built, test_idx, p_test, "test")]
    if backtest:
        folds = labels.backtest_folds(built.examples, backtest, built.label_cfg)
        fold_metrics, pooled_y, pooled_p = [], [], []
        train_cfg = from_dict(TrainConfig, meta.get("train_config", {}))
        for k, fold in enumerate(folds):
            tr, va, te = (np.flatnonzero(np.asarray(m)) for m in (fold.train_mask, fold.valid_mask, fold.test_mask))
            _log(f"backtest fold {k + 1}/{len(folds)}: test cutoff {fold.cutoff}, train {len(tr):,}, test {len(te):,}", quiet)
            fold_model = fit_model(name, _refit_params(meta), built, tr, va, ws, train_cfg)
            p = _predict(fold_model, name, built, te, ws)
            m = binary_metrics(y[te], p, n_boot=n_boot)
            fold_metrics.append({"cutoff": str(fold.cutoff), **m})
            pooled_y.append(y[te])
            pooled_p.append(p)
            preds.append(_pred_frame(built, te, p, "backtest", fold=k))
        metrics["backtest"] = {
            "folds": fold_metrics,
            "pooled": binary_metrics(np.concatenate(pooled_y), np.concatenate(pooled_p), n_boot=n_boot),
        }
    run_dir = ws.run_dir(run)
    atomic_write_bytes(run_dir / "predictions.parquet", pd.concat(preds, ignore_index=True).to_parquet(index=False))
    _write_json(run_dir / "metrics.json", metrics)
    return metrics


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2))


def compare(runs: Sequence[str], workspace=None, n_boot: int = 1000, quiet: bool = False) -> str:
    """Paired comparison of runs on the same examples; adds "paired" to each metrics.json; returns the table.

    The reference is the best baseline (logreg / lightgbm) by valid ROC-AUC. Each other model's
    ROC-AUC difference to it comes with a paired bootstrap 95% interval (same resamples for both),
    on the test window and, when present, on the pooled backtest.
    """
    from .evaluate import comparison_table, paired_auc_difference

    ws = _ws(workspace)
    metrics, preds = {}, {}
    for r in runs:
        d = ws.run_dir(r)
        metrics[r] = json.loads((d / "metrics.json").read_text())
        preds[r] = pd.read_parquet(d / "predictions.parquet")
    baselines = [r for r in runs if metrics[r]["model"] in BASELINES]
    reference = max(baselines, key=lambda r: metrics[r]["valid"].get("roc_auc") or 0.0) if baselines else None
    paired: dict[str, dict] = {}
    for r in runs:
        if reference is None or r == reference:
            continue
        entry: dict[str, Any] = {"reference": reference}
        for section, key in (("test", ["split"]), ("backtest", ["split", "fold"])):
            a = preds[r][preds[r]["split"] == section]
            b = preds[reference][preds[reference]["split"] == section]
            if len(a) == 0 or len(b) == 0:
                continue
            j = a.merge(b, on=["example_id"] + key[1:], suffixes=("", "_ref"))
            entry[section] = paired_auc_difference(j["label"].to_numpy(), j["probability"].to_numpy(),
                                                   j["probability_ref"].to_numpy(), n_boot=n_boot)
        paired[r] = entry
        metrics[r]["paired"] = entry
        _write_json(ws.run_dir(r) / "metrics.json", metrics[r])
    rows = {r: metrics[r]["test"] for r in runs}
    table = "test window\n" + comparison_table(rows, {r: {"reference": reference, **e["test"]} for r, e in paired.items() if "test" in e})
    if all("backtest" in metrics[r] for r in runs):
        rows_bt = {r: metrics[r]["backtest"]["pooled"] for r in runs}
        pb = {r: {"reference": reference, **e["backtest"]} for r, e in paired.items() if "backtest" in e}
        table += "\n\npooled backtest\n" + comparison_table(rows_bt, pb)
    if reference:
        table += f"\n\nΔAUC: difference to {reference} (best baseline by valid ROC-AUC), paired bootstrap 95% CI"
    return table


# ---------------------------------------------------------------------------------------------
# run and quickstart
def run(data: str | Path | Sequence[str | Path] | None, data_cfg: DataConfig, label_cfg: LabelConfig,
        feature_cfg: FeatureConfig | None = None, models: Sequence[str] = BASELINES, backtest: int = 0,
        train_cfg: TrainConfig | None = None, params: dict[str, dict] | None = None, workspace=None,
        n_boot: int = 1000, report: bool = True, quiet: bool = False) -> str:
    """ingest -> build -> train -> evaluate for each model; returns (and prints) the comparison table.

    Each model's run is saved under ``<workspace>/runs/<model>``.
    """
    ws = _ws(workspace)
    if data is not None:
        _log(ingest(data, data_cfg, ws, progress=not quiet).summary(), quiet)
    build(label_cfg, feature_cfg, ws, quiet=quiet)
    params = params or {}
    done = []
    for name in models:
        if name == "ensemble":
            continue
        train(name, run=name, params=params.get(name), train_cfg=train_cfg, workspace=ws, quiet=quiet)
        evaluate(name, ws, backtest=backtest, n_boot=n_boot, quiet=quiet)
        done.append(name)
    if "ensemble" in models:
        from .ensemble import evaluate_ensemble

        evaluate_ensemble(ws, members=[m for m in done if m in ("transformer", "lightgbm")], n_boot=n_boot)
        done.append("ensemble")
    table = compare(done, ws, n_boot=n_boot, quiet=quiet)
    _log("\n" + table, quiet)
    if report:
        from .report import write_report

        _log(f"\nreport: {write_report(ws, done)}", quiet)
    return table


def quickstart(workspace=None, models: Sequence[str] = ("logreg", "lightgbm", "transformer", "ensemble"),
               n_users: int = 20_000, days: int = 90, seed: int = 0, quiet: bool = False) -> str:
    """`run` on the built-in seeded shop simulator (no data of yours needed)."""
    from .simulate import SimConfig, write_events

    ws = _ws(workspace)
    ws.root.mkdir(parents=True, exist_ok=True)
    sim_cfg = SimConfig(n_users=n_users, days=days, seed=seed)
    path = ws.root / f"simulated-shop-{n_users}u-{days}d-seed{seed}.csv.gz"
    if not path.exists():
        t0 = time.perf_counter()
        tmp = path.with_name(path.name + ".tmp.csv.gz")
        n = write_events(sim_cfg, tmp)
        tmp.replace(path)
        _log(f"simulated {n:,} events for {n_users:,} users over {days} days in {time.perf_counter() - t0:.1f}s -> {path}", quiet)
    return run(path, DataConfig(format="csv"), LabelConfig(), FeatureConfig(), models=models, workspace=ws, quiet=quiet)
