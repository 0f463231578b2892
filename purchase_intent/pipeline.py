"""The Python API behind every command: ingest -> build -> train -> evaluate, and `run` for all four.

Use it from a notebook exactly as the CLI does::

    from purchase_intent import pipeline
    from purchase_intent.config import DataConfig, LabelConfig
    pipeline.ingest("events.csv.gz", DataConfig(format="csv"), workspace="ws")
    pipeline.build(LabelConfig(task="user", lookback="28d", horizon="7d"), workspace="ws")
    pipeline.train("lightgbm", workspace="ws")
    metrics = pipeline.evaluate("lightgbm", workspace="ws")

What each step writes to the workspace, and how, is :mod:`purchase_intent.runs`'s business.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import shutil
import tempfile
import time
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from . import distributed, runs, sequence_shards, splits, storage
from . import pretrain as pretraining
from .config import DataConfig, FeatureConfig, LabelConfig, TrainConfig, from_dict
from .dp import check_budget, check_share
from .dp_tabular import resolve_scaling
from .engine import EngineConfig
from .ensemble import evaluate_ensemble
from .evaluate import binary_metrics, comparison_table, expected_calibration_error, paired_auc_difference
from .event_database import DatabaseQuery
from .models import DP_MODELS, DP_REFUSED, MODELS, PRETRAINED_MODELS, NotEnoughData, check_min_data
from .models.prior import describe as describe_prior
from .monitor import TRAIN_WINDOW_JSON, window_of_build
from .prepare import build, ingest, log  # ingest and build: the Python API's, from here as before
from .report import write_report
from .runs import Built, jsonable, load_built, write_json
from .sequences import CUTOFF_KEY, SequenceVocab, fit_vocab, sequence_config
from .simulate import SimConfig, write_events
from .workspace import Workspace, as_workspace, atomic_write_json

BASELINES = ("logreg", "lightgbm")


# ---------------------------------------------------------------------------------------------
# train
_NOT_PARAMS = {"vocab": "it is fitted on the train split", "random_state": "use --seed"}


def model_parameters(name: str) -> list[str] | None:
    """The hyperparameters ``--param`` may set for model ``name``: its estimator's constructor
    arguments (read with inspect.signature), less those the pipeline sets itself, plus ``sequence``
    (a dict of SequenceConfig fields) for sequence models. None when the constructor takes any
    keyword (``**kwargs``), so that no list can be given."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    builder = MODELS[name]
    sig = inspect.signature(builder)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        cls = typing.get_type_hints(builder).get("return")  # the estimator class the builder returns
        if isinstance(cls, type):
            sig = inspect.signature(cls)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    variadic = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    names = [n for n, p in sig.parameters.items() if p.kind not in variadic and n not in _NOT_PARAMS]
    return names + (["sequence"] if runs.is_sequence_model(name) else [])


def check_params(name: str, params: dict) -> None:
    """Raise ValueError naming every parameter of ``params`` that model ``name`` does not have, with the
    list of those it has (and a model that cannot train with differential privacy given ``dp_*``)."""
    known = model_parameters(name)
    dp_keys = sorted(k for k in params if k.startswith("dp_"))
    if dp_keys and name not in DP_MODELS:
        raise ValueError(f"{name} cannot train with differential privacy ({', '.join(dp_keys)}): "
                         f"{DP_REFUSED.get(name, 'it has no DP training')}; DP models: {', '.join(DP_MODELS)}")
    for key in params:
        if key in _NOT_PARAMS:
            raise ValueError(f"--param {key} cannot be set for {name}: {_NOT_PARAMS[key]}")
    # a misspelt name (dp_epsilonn) is named as unknown before the DP checks read the dp_* ones
    unknown = [k for k in params if k not in known] if known is not None else []
    if unknown:
        raise ValueError(f"{name} has no parameter {', '.join(map(repr, unknown))}; its parameters are: "
                         f"{', '.join(known)}")
    if dp_keys and params.get("dp_epsilon") is None:
        raise ValueError(f"{', '.join(dp_keys)} given without dp_epsilon: add --param dp_epsilon=E for a DP model")
    if dp_keys:  # ε <= 0, δ outside (0, 1), a share outside (0, 1): refused before any data is read
        check_budget(params["dp_epsilon"], params.get("dp_delta"))
        if "dp_tabular_share" in params:
            check_share(params["dp_tabular_share"])
    if "tabular_scaling" in params or "dp_tabular_share" in params:  # an unknown scaling, 'train' with
        # dp_epsilon, 'dp' without it, a share that nothing would spend
        scaling = resolve_scaling(params.get("tabular_scaling"), params.get("dp_epsilon") is not None)
        if "dp_tabular_share" in params and scaling != "dp":
            raise ValueError(f"dp_tabular_share is the budget of tabular_scaling=\"dp\", and this fit's scaling is "
                             f"{scaling!r}: add --param tabular_scaling='\"dp\"' or leave dp_tabular_share out")
    if "sequence" in params:  # unknown settings, bad price bucketing: refused before any data is read
        sequence_config(params["sequence"])
    if params.get("stream_shard_rows") is not None:  # refused before any data is read
        sequence_shards.check_shard_rows(params["stream_shard_rows"])
    if name == "transformer_pt":  # its fine-tuning settings (type, range): refused before any data is read
        MODELS[name](**{k: v for k, v in params.items() if k != "sequence"}).check_finetune()
    if name == "logreg":  # numeric settings (type, range): refused before any data is read
        MODELS[name](**params).check_settings()
    if name in ("transformer", "transformer_pt"):  # numeric settings (type, range): refused before any data is read
        MODELS[name](**{k: v for k, v in params.items() if k != "sequence"}).check_settings()
    if name == "transformer":  # prior: refused before any data is read
        MODELS[name](**{k: v for k, v in params.items() if k != "sequence"}).check_prior()
    if "tabular_bins" in params and name in ("transformer", "transformer_pt"):  # refused before any data is read
        MODELS[name](**{k: v for k, v in params.items() if k != "sequence"}).check_tabular_bins(
            params.get("dp_epsilon") is not None)
    if name == "lightgbm_emb":  # embedding / prior: refused before any data is read
        MODELS[name](**{k: v for k, v in params.items() if k != "sequence"}).check_settings()
    if name in ("lightgbm", "lightgbm_emb"):  # LightGBM's settings (type, range): refused before any data is read
        lgb_params = {k: v for k, v in params.items() if k in model_parameters("lightgbm")}
        MODELS["lightgbm"](**lgb_params).check_settings()


def _reads_encoder(name: str, params: dict) -> bool:
    """Whether model ``name`` reads a pretrained folder: the pretrained models, and the Transformer
    with ``prior=true`` (the rolling encoders' prior)."""
    return name in PRETRAINED_MODELS or (name == "transformer" and params.get("prior") is True)


def _encoder_params(name: str, params: dict, ws: Workspace) -> dict:
    """``params`` with ``encoder`` set to the workspace's ``runs/pretrained`` for a model that reads
    a pretrained folder and was not given one."""
    if _reads_encoder(name, params) and not params.get("encoder"):
        return {**params, "encoder": str(ws.run_dir(pretraining.PRETRAINED_RUN))}
    return params


def _fit_vocab(name: str, built: Built, train_idx: np.ndarray, ws: Workspace, params: dict):
    """The token vocabulary of a sequence model: fitted on its train examples, or for a model on a
    pretrained encoder the encoder's own (so that each token means what it meant in pretraining)."""
    if not runs.is_sequence_model(name):
        return None
    if _reads_encoder(name, params):
        config = Path(params["encoder"]) / "config.json"
        if not config.exists():
            raise FileNotFoundError(f"{name} needs a pretrained encoder and {config.parent} holds none: "
                                    "run `purchase-intent pretrain` first (or give --param encoder=PATH)")
        return SequenceVocab.from_dict(json.loads(config.read_text())["vocab"])
    con = ws.connect()
    sub = built.examples.iloc[train_idx][["example_id", "user_id", "cutoff"]]
    runs.register_examples(con, sub, "train_examples")
    return fit_vocab(con, "train_examples", sequence_config(params.get("sequence")))


def fit_model(name: str, params: dict, built: Built, train_idx: np.ndarray, valid_idx: np.ndarray,
              ws: Workspace, train_cfg: TrainConfig):
    """Fit a fresh model `name` on the rows train_idx (valid_idx for early stopping / calibration)."""
    y = built.examples["label"].to_numpy()
    try:
        check_min_data(y[train_idx], train_cfg.min_positives, train_cfg.min_negatives)
    except NotEnoughData as e:
        n_pos = {k: int(y[built.mask(k)].sum()) for k in ("train", "valid", "test", "gap")}
        raise NotEnoughData(f"{e} The built examples hold {int(y.sum()):,} positives in all ({len(y):,} examples; "
                            + ", ".join(f"{k} {v:,}" for k, v in n_pos.items()) + ").") from None
    params = _encoder_params(name, params, ws)
    train_idx = canonical_order(built, train_idx)
    vocab = _fit_vocab(name, built, train_idx, ws, params)
    model_params = {k: v for k, v in params.items() if k != "sequence"}
    if vocab is not None:
        model_params["vocab"] = vocab
    model = MODELS[name](random_state=train_cfg.seed, **model_params)
    if name == "transformer" and model.streams(len(train_idx)):
        return _fit_streamed(model, name, built, train_idx, valid_idx, ws, vocab, train_cfg.seed)
    X_train = runs.train_inputs(name, built, train_idx, ws, vocab)
    X_valid = runs.model_inputs(name, built, valid_idx, ws, vocab) if len(valid_idx) else None
    y_valid = y[valid_idx] if len(valid_idx) else None
    # a DP model accounts per user: it needs the user of each train example
    groups = {"groups": built.examples["user_id"].to_numpy()[train_idx]} if params.get("dp_epsilon") is not None else {}
    model.fit(X_train, y[train_idx], X_valid=X_valid, y_valid=y_valid, **groups)
    return model


# train splits up to this many rows are put in the key-independent order of canonical_order (in memory: 480 MB of
# float64 features at 60 features); larger ones are read from disk in their stored order (runs.FeatureSubset)
CANONICAL_MAX_ROWS = 500_000


def canonical_order(built: Built, idx: np.ndarray) -> np.ndarray:
    """The train rows ``idx`` in an order that a workspace's pseudonym key does not decide: by cutoff, then by
    a hash of each example's features and label (ties, identical rows, keep their order).

    Examples are numbered by cutoff and pseudonym, and a new workspace draws a random key, so the same log
    ingested twice gives its rows in two orders; LightGBM's bagging draws rows by position and the
    Transformer's batches follow them, so a model fitted on them differed with the key (a Taobao slice's
    LightGBM test ROC-AUC 0.572 against 0.551). A train split of more than :data:`CANONICAL_MAX_ROWS` rows is
    left in its stored order, which LightGBM reads from disk: there the key still acts as a seed."""
    idx = np.flatnonzero(idx) if np.asarray(idx).dtype == bool else np.asarray(idx)
    if len(idx) < 2 or len(idx) > CANONICAL_MAX_ROWS:
        return idx
    rows = built.features.iloc[idx].astype("float64") + 0.0  # -0.0 (from a sum's order) is 0.0 in the hash
    content = pd.util.hash_pandas_object(rows.assign(_label=built.examples["label"].to_numpy()[idx]),
                                         index=False).to_numpy()
    cutoffs = built.examples["cutoff"].to_numpy()[idx]
    return idx[np.lexsort((content, cutoffs))]


def _fit_streamed(model, name: str, built: Built, train_idx: np.ndarray, valid_idx: np.ndarray, ws: Workspace,
                  vocab, seed: int):
    """Fit ``model`` from the train split written as Parquet shards (this rank's only), valid in memory.

    The shards go to a temporary folder under ``runs/`` and are removed after the fit, whether it
    succeeds or not. Without a valid split, the latest ``valid_fraction`` of the train rows is held
    out, as the in-memory fit does.
    """
    y = built.examples["label"].to_numpy()
    if not len(valid_idx):
        n_valid = max(1, int(round(len(train_idx) * model.valid_fraction)))
        train_idx, valid_idx = train_idx[:-n_valid], train_idx[-n_valid:]

    drop = {model.drop_fields} if isinstance(model.drop_fields, str) else set(model.drop_fields or ())
    keep = model.max_seq_len  # the model reads only the last max_seq_len events: the shards hold no more

    def make_inputs(positions: np.ndarray) -> dict:
        X = runs.model_inputs(name, built, train_idx[positions], ws, vocab)
        X = {k: (v[:, -keep:] if keep and k != "tabular" else v) for k, v in X.items()
             if k not in ("example_id", CUTOFF_KEY) and k not in drop}
        return {**X, "label": y[train_idx[positions]].astype(np.int8)}

    X_valid = runs.model_inputs(name, built, valid_idx, ws, vocab)
    with sequence_shards.write_shards(ws.runs_dir, len(train_idx), model.stream_shard_rows, make_inputs,
                                      seed=seed) as shards:
        return model.fit(shards, None, X_valid=X_valid, y_valid=y[valid_idx])


# estimator parameters that say how and where to run, not what model to fit
_RUNTIME_PARAMS = {"vocab", "random_state", "n_jobs", "device", "checkpoint_dir", "progress", "stream_shard_rows"}


def _model_params(model: Any) -> dict:
    """Every hyperparameter of the fitted model (defaults resolved), so a backtest refits the same model."""
    params = model.get_params()
    if params.get("dp_epsilon") is None:  # a non-private model: its DP settings are unused (and refused alone)
        params = {k: v for k, v in params.items() if not k.startswith("dp_")}
    return jsonable({k: v for k, v in params.items() if k not in _RUNTIME_PARAMS})


def _refit_params(meta: dict) -> dict:
    """Parameters to refit a saved run with: its resolved ones, then those it was given.

    Runs saved before ``model_params`` was recorded refit with this version's defaults."""
    return {**meta.get("model_params", {}), **meta.get("params", {})}


def encoder_privacy_note(encoder_meta: Optional[dict]) -> Optional[dict]:
    """What a model fine-tuned on (or reading) a DP-pretrained encoder may claim: the encoder's (ε, δ)
    per user, and that the released model is not DP, since its own training reads the train users'
    examples without noise. None when the encoder was not pretrained with DP."""
    record = (encoder_meta or {}).get("privacy")
    if not record:
        return None
    return {"encoder": jsonable(record),
            "released_model": "not differentially private: the encoder's weights are "
                              f"{record.get('guarantee')}, but this model's own training reads the train users' "
                              "examples without noise, so the pipeline has no DP guarantee (for one, the downstream "
                              "training must be DP too; budgets on the same users then add up)"}


def train(name: str, run: str | None = None, params: dict | None = None, train_cfg: TrainConfig | None = None,
          workspace=None, quiet: bool = False) -> Path:
    """Fit model `name` on the train split (valid for early stopping); save it as a run. Returns its directory."""
    ws = as_workspace(workspace)
    train_cfg = train_cfg or TrainConfig()
    params = dict(params or {})
    check_params(name, params)
    params = _encoder_params(name, params, ws)  # recorded in run.json: the encoder the run was fitted from
    built = load_built(ws)
    train_idx = np.flatnonzero(built.mask("train"))
    valid_idx = np.flatnonzero(built.mask("valid"))
    log(f"training {name} on {len(train_idx):,} examples (valid {len(valid_idx):,}) ...", quiet)
    t0 = time.perf_counter()
    model = fit_model(name, params, built, train_idx, valid_idx, ws, train_cfg)
    seconds = time.perf_counter() - t0
    y = built.examples["label"].to_numpy()
    run_dir = ws.run_dir(run or name)
    if not distributed.is_main():  # under torchrun every rank trains; only rank 0 writes the run
        return run_dir
    meta = {
        "run": run_dir.name,
        "model": name,
        "params": jsonable(params),
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
    if getattr(model, "privacy_", None):  # the accountant's (epsilon, delta) per user of a DP fit
        meta["privacy"] = jsonable(model.privacy_)
    encoder_privacy = encoder_privacy_note(getattr(model, "encoder_meta_", None))
    if encoder_privacy:  # a DP-pretrained encoder under a model whose own training is not DP
        meta["encoder_privacy"] = encoder_privacy
    if getattr(model, "prior_", None) is not None:  # the rolling encoders the run reads its prior with
        meta["prior"] = describe_prior(model.prior_)
    meta["version"] = f"{name}-" + hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:10]
    runs.save_run(run_dir, meta, model)
    atomic_write_json(run_dir / TRAIN_WINDOW_JSON, window_of_build(built.info))  # monitor's, after a rebuild
    log(f"saved run {run_dir} ({seconds:.1f}s)", quiet)
    return run_dir


# ---------------------------------------------------------------------------------------------
# evaluate
def _probabilities(model: Any, X: Any) -> np.ndarray:
    """P(purchase), shape (N,)."""
    return np.asarray(model.predict_proba(X))[:, 1]


def _uncalibrated(model: Any, X: Any) -> np.ndarray | None:
    """sigmoid(logit) before calibration, for models calibrated after fitting (else None), shape (N,)."""
    if not (hasattr(model, "decision_function") and hasattr(model, "calibrator_")):
        return None
    return 1.0 / (1.0 + np.exp(-np.asarray(model.decision_function(X), dtype=np.float64)))


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


def below_chance_warning(run: str, valid: dict, privacy: Optional[dict] = None) -> Optional[str]:
    """A line when the run ranks its valid examples below chance beyond the ROC-AUC's 95% interval (its
    scores point the wrong way: a model that learned nothing would sit at 0.5), else None. For a DP run
    (``privacy``, the accountant's record) it names the likely cause: too few noisy steps to learn from."""
    ci = valid.get("roc_auc_ci")
    if not ci or ci[1] is None or not ci[1] < 0.5:
        return None
    text = (f"run {run!r} ranks the valid examples below chance (ROC-AUC {valid['roc_auc']:.3f}, 95% CI "
            f"[{ci[0]:.3f}, {ci[1]:.3f}]): do not use its scores")
    if privacy:
        text += (f"; a DP fit of {privacy.get('steps', '?')} noisy steps on this few users did not learn: "
                 f"use more users, a larger dp_epsilon, or no DP")
    return text


def evaluate(run: str, workspace=None, backtest: int = 0, n_boot: int = 1000, quiet: bool = False) -> dict:
    """Score the run's model on valid and test (and K backtest folds); write metrics.json.

    The backtest retrains a fresh model per fold with the run's parameters: each of the last K
    periods in turn is the test window, trained on everything before it (same gap rule).
    """
    ws = as_workspace(workspace)
    meta = runs.read_meta(ws.run_dir(run))
    if meta.get("model") == "ensemble":  # no model of its own: re-average its members' predictions
        return evaluate_ensemble(ws, [m["run"] for m in meta["members"]], n_boot=n_boot, run=run)
    loaded = runs.load_run(run, ws)
    meta, model, name = loaded.meta, loaded.model, loaded.model_name
    built = load_built(ws)
    if built.info["build_id"] != meta["build_id"]:
        raise RuntimeError(
            f"run {run!r} was trained on build {meta['build_id']}, but the workspace now holds build "
            f"{built.info['build_id']}: retrain it with `purchase-intent train --model {name}`"
        )
    y = built.examples["label"].to_numpy()
    metrics: dict[str, Any] = {
        "model": name,
        "version": meta["version"],
        "task": {k: built.info["label_config"][k] for k in ("task", "lookback", "horizon", "step")},
    }
    if meta.get("privacy"):  # a DP run: the guarantee the released model carries
        metrics["privacy"] = meta["privacy"]
    if meta.get("encoder_privacy"):  # the encoder's guarantee only: the released model is not DP
        metrics["encoder_privacy"] = meta["encoder_privacy"]
    p, raw, preds = {}, {}, []
    for split in ("valid", "test"):
        idx = np.flatnonzero(built.mask(split))
        X = runs.model_inputs(name, built, idx, ws, loaded.vocab) if len(idx) else None
        p[split] = _probabilities(model, X) if len(idx) else np.zeros(0)
        raw[split] = _uncalibrated(model, X) if len(idx) else None
        metrics[split] = binary_metrics(y[idx], p[split], n_boot=n_boot)
        preds.append(_pred_frame(built, idx, p[split], split))
    warning = below_chance_warning(run, metrics["valid"], meta.get("privacy"))
    if warning:
        metrics["warnings"] = [warning]
        log(f"warning: {warning}", quiet)
    if raw["test"] is not None:
        yv, yt = y[built.mask("valid")], y[built.mask("test")]
        metrics["calibration"] = {
            "method": getattr(model, "calibration", None), "fitted_on": "valid",
            "valid_ece_before": expected_calibration_error(yv, raw["valid"]),
            "valid_ece_after": expected_calibration_error(yv, p["valid"]),
            "test_ece_before": expected_calibration_error(yt, raw["test"]),
            "test_ece_after": expected_calibration_error(yt, p["test"]),
        }
    if backtest:
        folds = splits.backtest_folds(built.examples, backtest, built.label_cfg)
        fold_metrics, pooled_y, pooled_p = [], [], []
        train_cfg = from_dict(TrainConfig, meta.get("train_config", {}))
        for k, fold in enumerate(folds):
            tr, va, te = (np.flatnonzero(np.asarray(m)) for m in (fold.train_mask, fold.valid_mask, fold.test_mask))
            log(f"backtest fold {k + 1}/{len(folds)}: test cutoff {splits.human_time(fold.cutoff)}, "
                f"train {len(tr):,}, test {len(te):,}", quiet)
            y_tr = y[tr]
            try:
                check_min_data(y_tr, train_cfg.min_positives, train_cfg.min_negatives)
            except NotEnoughData:
                raise NotEnoughData(
                    f"backtest fold {k + 1} of {len(folds)} (test cutoff {splits.human_time(fold.cutoff)}): its train "
                    f"examples hold {int(y_tr.sum()):,} positives and {int((y_tr == 0).sum()):,} negatives, under the "
                    f"gate of {train_cfg.min_positives} and {train_cfg.min_negatives} this run was trained with: "
                    + (f"ask for the {len(folds) - k - 1} later fold(s) only (--backtest {len(folds) - k - 1}), or "
                       if len(folds) - k - 1 > 0 else "")
                    + "train the run again with a lower --min-positives / --min-negatives (its folds refit with "
                      "its gate)") from None
            fold_model = fit_model(name, _refit_params(meta), built, tr, va, ws, train_cfg)
            pk = _probabilities(fold_model, runs.model_inputs(name, built, te, ws, runs.model_vocab(fold_model))) \
                if len(te) else np.zeros(0)
            fold_metrics.append({"cutoff": str(fold.cutoff), **binary_metrics(y[te], pk, n_boot=n_boot)})
            pooled_y.append(y[te])
            pooled_p.append(pk)
            preds.append(_pred_frame(built, te, pk, "backtest", fold=k))
        metrics["backtest"] = {
            "folds": fold_metrics,
            "pooled": binary_metrics(np.concatenate(pooled_y), np.concatenate(pooled_p), n_boot=n_boot),
        }
    runs.write_predictions(loaded.dir, pd.concat(preds, ignore_index=True))
    write_json(loaded.dir / runs.METRICS_JSON, metrics)
    return metrics


def paired_by_section(preds: pd.DataFrame, reference: pd.DataFrame, n_boot: int = 1000) -> dict[str, dict]:
    """``paired_auc_difference`` of two runs' saved predictions (``runs.read_predictions``) on the examples
    both predicted: per section, "test" (joined on the example) and "backtest" (on the example and fold),
    where both runs have it."""
    out = {}
    for section, key in (("test", []), ("backtest", ["fold"])):
        a, b = preds[preds["split"] == section], reference[reference["split"] == section]
        if len(a) == 0 or len(b) == 0:
            continue
        j = a.merge(b, on=["example_id"] + key, suffixes=("", "_ref"))
        out[section] = paired_auc_difference(j["label"].to_numpy(), j["probability"].to_numpy(),
                                             j["probability_ref"].to_numpy(), n_boot=n_boot)
    return out


def compare(run_names: Sequence[str], workspace=None, n_boot: int = 1000, quiet: bool = False) -> str:
    """Paired comparison of runs on the same examples; adds "paired" to each metrics.json; returns the table.

    The reference is the best baseline (logreg / lightgbm) by valid ROC-AUC. Each other model's
    ROC-AUC difference to it comes with a paired bootstrap 95% interval (same resamples for both),
    on the test window and, when present, on the pooled backtest.
    """
    ws = as_workspace(workspace)
    metrics, preds = {}, {}
    for r in run_names:
        metrics[r] = runs.read_metrics(ws.run_dir(r))
        preds[r] = runs.read_predictions(ws.run_dir(r))
    baselines = [r for r in run_names if metrics[r]["model"] in BASELINES]
    reference = max(baselines, key=lambda r: metrics[r]["valid"].get("roc_auc") or 0.0) if baselines else None
    paired: dict[str, dict] = {}
    for r in run_names:
        if reference is None or r == reference:
            continue
        entry: dict[str, Any] = {"reference": reference, **paired_by_section(preds[r], preds[reference], n_boot)}
        paired[r] = entry
        metrics[r]["paired"] = entry
        write_json(ws.run_dir(r) / runs.METRICS_JSON, metrics[r])
    rows = {r: metrics[r]["test"] for r in run_names}
    table = "test window\n" + comparison_table(
        rows, {r: {"reference": reference, **e["test"]} for r, e in paired.items() if "test" in e})
    if all("backtest" in metrics[r] for r in run_names):
        rows_bt = {r: metrics[r]["backtest"]["pooled"] for r in run_names}
        pb = {r: {"reference": reference, **e["backtest"]} for r, e in paired.items() if "backtest" in e}
        table += "\n\npooled backtest\n" + comparison_table(rows_bt, pb)
    if reference:
        table += (f"\n\nΔ: difference to {reference} (best baseline by valid ROC-AUC) in ROC-AUC, PR-AUC, log loss "
                  "(lower is better) and lift@10%, each with a paired bootstrap 95% CI (the same resamples for both)")
    return table


# ---------------------------------------------------------------------------------------------
# run and quickstart
def default_ensemble_members(trained: Sequence[str]) -> list[str]:
    """The runs ``run --models ...,ensemble`` averages: Transformer + LightGBM when both were trained
    (the pair the ensemble was measured with), else every model trained but logistic regression, else
    all of them."""
    trained = [m for m in trained if m != "ensemble"]
    if "transformer" in trained and "lightgbm" in trained:
        return ["transformer", "lightgbm"]
    strong = [m for m in trained if m != "logreg"]
    return strong if len(strong) >= 2 else trained


def run(data: str | Path | DatabaseQuery | Sequence[str | Path | DatabaseQuery] | None, data_cfg: DataConfig,
        label_cfg: LabelConfig,
        feature_cfg: FeatureConfig | None = None, models: Sequence[str] = BASELINES, backtest: int = 0,
        train_cfg: TrainConfig | None = None, params: dict[str, dict] | None = None, workspace=None,
        n_boot: int = 1000, report: bool = True, quiet: bool = False,
        pretrain: bool | pretraining.PretrainConfig = False, engine: EngineConfig | None = None) -> str:
    """ingest -> build -> [pretrain] -> train -> evaluate for each model; returns (and prints) the
    comparison table. ``engine`` runs ingest and build (DuckDB by default, or Spark).

    Each model's run is saved under ``<workspace>/runs/<model>``. ``pretrain`` (True or a
    PretrainConfig) pretrains the sequence encoder after the build, on the events before the earliest
    test window (of the ``backtest`` folds too), for ``transformer_pt`` and ``lightgbm_emb``.
    """
    ws = as_workspace(workspace)
    params = params or {}
    for name in models:
        if name != "ensemble":
            check_params(name, params.get(name) or {})
    if data is not None:
        report = ingest(data, data_cfg, ws, progress=not quiet, engine=engine)
        log(report.summary(), quiet)
        if not report.accepted and not any(e.get("accepted") for e in ws.read_manifest()["files"]):
            why = ", ".join(f"{n:,} {k}" for k, n in {**report.rejected, "filtered": report.filtered}.items() if n)
            names = ", ".join(map(str, data)) if isinstance(data, (list, tuple)) else str(data)
            raise ValueError(f"ingest accepted no row of {names}" + (f" ({why})" if why else "") + ": nothing to build"
                             + (f"; the rejected rows and their reasons are in {report.rejects_paths[0].parent}"
                                if report.rejects_paths else ""))
    build(label_cfg, feature_cfg, ws, quiet=quiet, engine=engine)
    if pretrain:
        cfg = pretrain if isinstance(pretrain, pretraining.PretrainConfig) else pretraining.PretrainConfig()
        cfg = dataclasses.replace(cfg, backtest=max(cfg.backtest, backtest))
        pretraining.pretrain(ws, cfg, log=lambda m: log(m, quiet))
    done = []
    for name in models:
        if name == "ensemble":
            continue
        train(name, run=name, params=params.get(name), train_cfg=train_cfg, workspace=ws, quiet=quiet)
        evaluate(name, ws, backtest=backtest, n_boot=n_boot, quiet=quiet)
        done.append(name)
    if "ensemble" in models:
        evaluate_ensemble(ws, members=default_ensemble_members(done), n_boot=n_boot)
        done.append("ensemble")
    table = compare(done, ws, n_boot=n_boot, quiet=quiet)
    log("\n" + table, quiet)
    if report:
        log(f"\nreport: {write_report(ws, done)}", quiet)
    return table


def quickstart(workspace=None, models: Sequence[str] = ("logreg", "lightgbm", "transformer", "ensemble"),
               n_users: int = 20_000, days: int = 90, seed: int = 0, quiet: bool = False) -> str:
    """`run` on the built-in seeded shop simulator (no data of yours needed)."""
    ws = as_workspace(workspace)
    ws.root.mkdir(parents=True, exist_ok=True)
    sim_cfg = SimConfig(n_users=n_users, days=days, seed=seed)
    path = ws.root / f"simulated-shop-{n_users}u-{days}d-seed{seed}.csv.gz"
    if storage.active():  # an encrypted workspace keeps no plaintext log: the simulated one is made anew outside it
        scratch = Path(tempfile.mkdtemp(prefix="pi-simulated-shop-"))
        try:
            write_events(sim_cfg, scratch / path.name)
            return run(scratch / path.name, DataConfig(format="csv"), LabelConfig(), FeatureConfig(), models=models,
                       workspace=ws, quiet=quiet)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if not path.exists():
        t0 = time.perf_counter()
        tmp = path.with_name(path.name + ".tmp.csv.gz")
        n = write_events(sim_cfg, tmp)
        tmp.replace(path)
        log(f"simulated {n:,} events for {n_users:,} users over {days} days in {time.perf_counter() - t0:.1f}s "
            f"-> {path}", quiet)
    return run(path, DataConfig(format="csv"), LabelConfig(), FeatureConfig(), models=models, workspace=ws, quiet=quiet)
