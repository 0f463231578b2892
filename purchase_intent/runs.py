"""The artifact format of a workspace's built examples and runs, and the boundary into the models.

Everything above the models (explain, score, report, ensemble, pipeline, serve) reads and writes
artifacts through this module, so the file names and the way inputs are made for a model live here
once::

    examples/   examples.parquet (examples + split), features.parquet, build.json
    runs/NAME/  run.json, model/ (weights, config, vocab), predictions.parquet, metrics.json,
                stale.json (only after `forget`: the run learned from erased data; training again clears it),
                monitor.json (only after `monitor`: drift of the latest window)

A run directory is self-contained and loading it never unpickles; an ``ensemble`` run holds no
weights but names its member runs (name and version), which live next to it and load with it.
Model inputs for any examples (training rows, batch scoring, one API request) come from
:func:`inputs_for_examples` / :func:`model_inputs`: the same feature SQL and sequence builder, over
events with ``ts < cutoff``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from . import storage
from .config import FeatureConfig, LabelConfig, from_dict
from .features import compute_features
from .sequences import CUTOFF_KEY, SequenceVocab, build_sequences
from .times import ONE_US, parse_duration, parse_time
from .workspace import RUN_JSON, Workspace, as_workspace, atomic_dir, atomic_write_bytes, atomic_write_text

# file names of a build (under <workspace>/examples/) and of a run (under <workspace>/runs/NAME/)
EXAMPLES = "examples.parquet"
FEATURES = "features.parquet"
BUILD_JSON = "build.json"
MODEL_DIR = "model"
PREDICTIONS = "predictions.parquet"
METRICS_JSON = "metrics.json"
STALE_JSON = "stale.json"  # written by `forget` into every run trained on an erased user's data
MONITOR_JSON = "monitor.json"  # written by `monitor`: drift of the latest window against the training window
KEPT_VERSION = "kept_version"  # run.json key of a version `retrain` set aside (former champion, challenger)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, atomically (dataclasses, timestamps and numpy scalars as text)."""
    atomic_write_text(path, json.dumps(jsonable(obj), indent=2))


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (dataclasses as dicts, anything else unknown as its string)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    return json.loads(json.dumps(obj, default=str))


# ---------------------------------------------------------------------------------------------
# built examples
FEATURE_ROW_GROUP = 122_880  # rows per row group of features.parquet: what FeatureRows decodes at a time


class FeatureRows:
    """The feature matrix of a build, left in its Parquet file: ``iloc[idx]`` reads only rows ``idx``.

    What ``load_built`` gives as ``Built.features``, so that no step holds every example's features:
    ``iloc`` reads the file one row group at a time, keeps the rows asked for and returns them as a
    float64 DataFrame in the order asked (as ``DataFrame.iloc`` would). Memory: the rows returned
    plus one row group.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        meta = storage.read_metadata(self.path)
        self.columns = pd.Index(storage.read_schema(self.path).names)
        self._starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
        self.shape = (int(self._starts[-1]), len(self.columns))

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def iloc(self) -> "FeatureRows":
        return self

    def __getitem__(self, idx) -> pd.DataFrame:
        pos = np.arange(self.shape[0])[idx] if isinstance(idx, slice) else np.asarray(idx)
        if pos.dtype == bool:
            pos = np.flatnonzero(pos)
        pos = pos.astype(np.int64).reshape(-1)
        if len(pos) and (pos.min() < 0 or pos.max() >= self.shape[0]):
            raise IndexError(f"feature rows {pos.min()}..{pos.max()} outside 0..{self.shape[0] - 1}")
        order = np.argsort(pos, kind="stable")
        want = pos[order]
        out = np.empty((len(pos), self.shape[1]), np.float64)
        pf = storage.parquet_file(self.path)
        bounds = np.searchsorted(want, self._starts)
        for g in range(len(self._starts) - 1):
            a, b = bounds[g], bounds[g + 1]
            if a == b:
                continue
            tbl = pf.read_row_group(g)
            local = want[a:b] - self._starts[g]
            for j, col in enumerate(tbl.columns):
                out[order[a:b], j] = col.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)[local]
        return pd.DataFrame(out, columns=self.columns.copy())

    def to_frame(self) -> pd.DataFrame:
        """Every row (what a small build or a test may want whole)."""
        return self[slice(None)]


class FeatureSubset:
    """Rows ``positions`` (ascending) of a :class:`FeatureRows`, read one row group at a time.

    What a model that can take its train rows in batches gets instead of a frame (LightGBM builds
    its binned dataset from it through ``lightgbm.Sequence``), so that no step holds the float64
    train matrix: ``subset[i]`` is one row, ``subset[a:b]`` rows ``a..b-1`` as a (b - a, F) float64
    array. Memory: one decoded row group plus the rows asked for.
    """

    def __init__(self, rows: FeatureRows, positions: np.ndarray):
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(pos) and (np.any(np.diff(pos) < 0) or pos[0] < 0 or pos[-1] >= rows.shape[0]):
            raise IndexError(f"feature rows must be ascending positions inside 0..{rows.shape[0] - 1}")
        self.rows, self.positions = rows, pos
        self.columns = rows.columns
        self.shape = (len(pos), rows.shape[1])
        self.batch_size = FEATURE_ROW_GROUP
        self._group: tuple[int, np.ndarray] | None = None
        self._pf = None

    def __len__(self) -> int:
        return self.shape[0]

    def _decoded(self, g: int) -> np.ndarray:
        if self._group is None or self._group[0] != g:
            self._pf = self._pf or storage.parquet_file(self.rows.path)
            tbl = self._pf.read_row_group(g)
            a = np.empty((tbl.num_rows, self.shape[1]), np.float64)
            for j, col in enumerate(tbl.columns):
                a[:, j] = col.to_numpy(zero_copy_only=False)
            self._group = (g, a)
        return self._group[1]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):  # LightGBM samples rows one by one, in ascending order
            p = int(self.positions[key])
            g = int(np.searchsorted(self.rows._starts, p, side="right")) - 1
            return self._decoded(g)[p - self.rows._starts[g]]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("FeatureSubset takes an int or a contiguous slice")
        pos = self.positions[key]
        out = np.empty((len(pos), self.shape[1]), np.float64)
        starts = self.rows._starts
        groups = np.searchsorted(starts, pos, side="right") - 1
        bounds = np.flatnonzero(np.diff(groups)) + 1
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(pos)]):
            if a < b:
                g = int(groups[a])
                out[a:b] = self._decoded(g)[pos[a:b] - starts[g]]
        return out

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self[:], columns=self.columns.copy())


@dataclass
class Built:
    """The built examples of a workspace: one row per example, its split and its features."""

    examples: pd.DataFrame  # example_id, user_id, cutoff, label, label_end, period, split, ...
    features: pd.DataFrame | FeatureRows  # feature matrix in the examples' row order (``.iloc[idx]``)
    info: dict[str, Any]  # build.json

    @property
    def label_cfg(self) -> LabelConfig:
        return from_dict(LabelConfig, self.info["label_config"])

    @property
    def feature_cfg(self) -> FeatureConfig:
        return run_feature_config(self.info)

    def mask(self, split: str) -> np.ndarray:
        return (self.examples["split"] == split).to_numpy()


def save_built(workspace: Workspace, built: Built) -> None:
    """Write ``built`` to ``<workspace>/examples/`` as one atomic directory swap."""
    feats = built.features.to_frame() if isinstance(built.features, FeatureRows) else built.features
    write_built(workspace, built.examples, lambda path: storage.write_parquet(feats, path), lambda: built.info)


def write_built(workspace: Workspace, examples: pd.DataFrame, write_features: Callable[[Path], Any],
                info: Callable[[], dict]) -> None:
    """Write a build to ``<workspace>/examples/`` as one atomic directory swap.

    ``write_features(path)`` writes the feature matrix (rows in the examples' order) to the Parquet
    file ``path`` itself (``features.copy_features`` streams it from DuckDB); ``info()`` gives
    build.json once the features are written."""
    with atomic_dir(workspace.examples_dir) as tmp:
        write_features(tmp / FEATURES)
        storage.write_parquet(examples, tmp / EXAMPLES)
        (tmp / BUILD_JSON).write_text(json.dumps(info(), indent=2, default=str))


def load_built(workspace: Workspace | str | Path | None = None) -> Built:
    """Read what `build` wrote: the examples whole, the features left in their file (:class:`FeatureRows`)."""
    d = as_workspace(workspace).examples_dir
    if not (d / BUILD_JSON).exists():
        raise FileNotFoundError(f"no built examples in {d}: run `purchase-intent build` first")
    info = json.loads((d / BUILD_JSON).read_text())
    return Built(storage.read_frame(d / EXAMPLES), FeatureRows(d / FEATURES), info)


# ---------------------------------------------------------------------------------------------
# runs
@dataclass
class Run:
    """A saved run, loaded: its directory, run.json, the fitted estimator and what scoring needs of them."""

    dir: Path
    meta: dict
    model: Any
    feature_cfg: FeatureConfig = field(repr=False)
    vocab: SequenceVocab | None = field(default=None, repr=False)  # sequence models only

    @property
    def members(self) -> list["Run"]:
        """The member runs of an ensemble (empty for any other model)."""
        return list(self.model.members) if isinstance(self.model, EnsembleModel) else []

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def model_name(self) -> str:
        return self.meta["model"]

    @property
    def version(self) -> str:
        return str(self.meta.get("version", ""))

    @property
    def task(self) -> str:
        return self.meta["label_config"].get("task", "user")

    @property
    def label_cfg(self) -> LabelConfig:
        return from_dict(LabelConfig, self.meta["label_config"])

    @property
    def lookback(self) -> timedelta:
        return parse_duration(self.meta["label_config"]["lookback"])

    @property
    def stale(self) -> str | None:
        """Why this run (or a member of this ensemble) must be retrained, or None (read at each call)."""
        return stale_warning(self.dir) or next((w for m in self.members if (w := m.stale)), None)

    @property
    def info(self) -> dict[str, str]:
        lc = self.meta["label_config"]
        out = {"run": self.name, "model": self.model_name, "version": self.version, "task": self.task,
               "lookback": lc["lookback"], "horizon": lc["horizon"]}
        if self.members:
            out["members"] = ",".join(f"{m.name}@{m.version}" for m in self.members)
        return out


def save_run(run_dir: Path, meta: dict, model: Any) -> None:
    """Write a run (run.json and the model's own files) as one atomic directory swap."""
    with atomic_dir(run_dir) as tmp:
        model.save(tmp / MODEL_DIR)
        (tmp / RUN_JSON).write_text(json.dumps(meta, indent=2))


def _is_table_comparison(folder: Path) -> bool:
    """Whether ``folder`` is the out_dir of ``run --table`` (``tabular.run_table``: metrics.json with its table)."""
    try:
        return "table" in json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def read_meta(run_dir: Path) -> dict:
    """run.json of a run directory."""
    path = Path(run_dir) / RUN_JSON
    if not path.exists() and _is_table_comparison(Path(run_dir)):
        raise FileNotFoundError(f"{run_dir} holds the comparison of `run --table` (rows that are already one per "
                                "session or user), which scores nothing: train a model on events to score users")
    if not path.exists():
        raise FileNotFoundError(f"no run at {run_dir}: train one with `purchase-intent train`")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"run {run_dir} is damaged ({path.name}: {e}); train it again") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise ValueError(f"run {run_dir} is damaged ({path.name} names no model); train it again")
    return meta


def read_stale(run_dir: Path) -> dict | None:
    """The stale mark `forget` left in a run folder (reason, erased_at, users), or None."""
    path = Path(run_dir) / STALE_JSON
    try:
        mark = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {"reason": f"{STALE_JSON} is unreadable"}
    return mark if isinstance(mark, dict) else {"reason": f"{STALE_JSON} is unreadable"}


def stale_warning(run_dir: Path) -> str | None:
    """One line saying that the run in ``run_dir`` is stale and how to clear it, or None."""
    mark = read_stale(run_dir)
    if mark is None:
        return None
    since = f", the first at {mark['erased_at']}" if mark.get("erased_at") else ""
    return (f"run {Path(run_dir).name} is stale: {mark.get('reason', 'data it learned from was erased')}{since}; "
            "train it again to clear this")


ENSEMBLE = "ensemble"


class EnsembleModel:
    """The ``ensemble`` model: the mean of its member runs' calibrated probabilities.

    Its input is a list with one entry per member, each what that member eats (feature frame or
    sequence dict), as :func:`inputs_for_examples` builds it.
    """

    def __init__(self, members: list[Run]):
        self.members = members

    def predict_proba(self, X: list) -> np.ndarray:
        if not isinstance(X, list) or len(X) != len(self.members):
            raise ValueError(f"the ensemble scores a list of its {len(self.members)} members' inputs "
                             "(runs.inputs_for_examples); its held-out metrics come from its members' "
                             "predictions (ensemble.evaluate_ensemble)")
        p = np.mean([np.asarray(m.model.predict_proba(x), dtype=np.float64)[:, 1]
                     for m, x in zip(self.members, X)], axis=0)
        return np.column_stack([1.0 - p, p])


def ensemble_members(meta: dict) -> list[dict]:
    """The members an ensemble's run.json records, as ``{"run", "version"}`` dicts."""
    members = meta.get("members") or []
    out = [m if isinstance(m, dict) else {"run": str(m), "version": None} for m in members]
    if len(out) < 2:
        raise ValueError(f"ensemble run {meta.get('run')!r} records {len(out)} member(s); it needs at least two")
    return out


def load_run_dir(run_dir: Path) -> Run:
    """The run saved in ``run_dir`` (never unpickles); an ensemble loads its member runs, which
    live next to it in the same runs directory and must still be the versions it recorded."""
    meta = read_meta(run_dir)
    if meta["model"] == ENSEMBLE:
        return _load_ensemble(Path(run_dir), meta)
    from .models import load_model  # PyTorch and the model libraries: imported once a run is loaded
    from .models.onnx_inference import inference_mode

    if is_sequence_model(meta["model"]):  # a bad $PURCHASE_INTENT_INFERENCE named as such, not as a damaged run
        inference_mode()
    try:
        model = load_model(meta["model"], Path(run_dir) / MODEL_DIR)
    except (ValueError, KeyError, OSError, RuntimeError) as e:  # a truncated or foreign model file
        if isinstance(e, FileNotFoundError) and not (Path(run_dir) / MODEL_DIR).exists():
            raise FileNotFoundError(f"run {run_dir} has no model folder: train it again") from None
        raise ValueError(f"run {run_dir} is damaged ({type(e).__name__}: {e}); train it again") from None
    vocab = model_vocab(model) if is_sequence_model(meta["model"]) else None
    return Run(Path(run_dir), meta, model, run_feature_config(meta), vocab)


def _load_ensemble(run_dir: Path, meta: dict) -> Run:
    recorded = ensemble_members(meta)
    if "feature_names" not in meta or "feature_config" not in meta:
        raise ValueError(f"ensemble run {run_dir.name!r} was written by an older version (no member features "
                         "recorded): rebuild it with `purchase-intent run --models ...,ensemble`")
    members = []
    for m in recorded:
        name = m["run"]
        if not name or "/" in name or "\\" in name or name in (".", "..") or name == run_dir.name:
            raise ValueError(f"ensemble run {run_dir.name!r}: bad member name {name!r}")
        member_dir = run_dir.parent / name
        if not (member_dir / RUN_JSON).is_file():
            raise FileNotFoundError(f"ensemble run {run_dir.name!r}: its member run {name!r} is missing "
                                    f"from {run_dir.parent}")
        sub = load_run_dir(member_dir)
        if sub.model_name == ENSEMBLE:
            raise ValueError(f"ensemble run {run_dir.name!r}: member {name!r} is itself an ensemble")
        if m.get("version") is not None and sub.version != m["version"]:
            raise ValueError(f"ensemble run {run_dir.name!r}: member {name!r} is now version {sub.version}, "
                             f"the ensemble was built on {m['version']}; rebuild the ensemble")
        if sub.meta["label_config"] != meta["label_config"]:
            raise ValueError(f"ensemble run {run_dir.name!r}: member {name!r} has another label configuration")
        members.append(sub)
    return Run(run_dir, meta, EnsembleModel(members), run_feature_config(meta), None)


def load_run(run: str | Path, workspace: Workspace | str | Path | None = None) -> Run:
    """The run ``run``: a name under ``<workspace>/runs/`` or a path to a run directory."""
    return load_run_dir(as_workspace(workspace).run_dir(str(run)))


def read_metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / METRICS_JSON).read_text())


def read_predictions(run_dir: Path) -> pd.DataFrame:
    return storage.read_frame(Path(run_dir) / PREDICTIONS)


def write_predictions(run_dir: Path, predictions: pd.DataFrame) -> None:
    atomic_write_bytes(Path(run_dir) / PREDICTIONS, storage.parquet_bytes(predictions))


# ---------------------------------------------------------------------------------------------
# the boundary into the models
def is_sequence_model(name: str) -> bool:
    """Whether model ``name`` eats event sequences (a dict of arrays) rather than the feature frame."""
    from .models import SEQUENCE_MODELS

    return name in SEQUENCE_MODELS


def model_vocab(model: Any) -> SequenceVocab | None:
    """The sequence vocabulary a fitted (or configured) sequence model reads its tokens with."""
    return getattr(model, "vocab_", None) or getattr(model, "vocab", None)


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


def register_examples(con, examples: pd.DataFrame, table: str = "examples") -> None:
    """``examples`` as the temporary DuckDB table ``table`` of ``con`` (what the feature SQL reads)."""
    con.register(f"{table}_df", examples)
    con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT * FROM {table}_df")
    con.unregister(f"{table}_df")


def align_features(feats: pd.DataFrame, examples: pd.DataFrame) -> pd.DataFrame:
    """Order feature rows like ``examples`` (by example_id) and keep only the feature columns, as float64."""
    if "example_id" in feats.columns:
        feats = feats.set_index("example_id")
    return feats.reindex(examples["example_id"].to_numpy()).astype("float64")


def _with_sequences(con, X_tab: pd.DataFrame, vocab: SequenceVocab | None) -> dict:
    cutoffs = con.execute("SELECT epoch_us(cutoff) AS c FROM examples ORDER BY example_id").fetchnumpy()["c"]
    return sequence_inputs(build_sequences(con, "examples", vocab.cfg if vocab is not None else None, vocab), X_tab,
                           cutoffs)


def sequence_inputs(tokens: dict, X_tab: pd.DataFrame, cutoffs: Any = None) -> dict:
    """What a sequence model eats: the token arrays of ``sequences.build_sequences`` (or its numpy twin
    ``sequence_frame.build_sequences_frame``) plus ``"tabular"``, the run's features (rows in the same
    order) as float32, and ``"cutoff_us"``, each row's cutoff in microseconds since the epoch (what
    picks a rolling encoder, ``models.prior``), when ``cutoffs`` (times or int64 microseconds) is given."""
    X = dict(tokens)
    X["tabular"] = X_tab.to_numpy(np.float32)
    if cutoffs is not None:
        c = np.asarray(cutoffs)
        X[CUTOFF_KEY] = (c.astype("datetime64[us]").astype(np.int64) if np.issubdtype(c.dtype, np.datetime64)
                         else c.astype(np.int64))
    return X


def saved_graph(run: Run) -> tuple[dict, bytes]:
    """config.json (parsed) and the bytes of model.onnx of a Transformer run (``ONNX_MODELS``): what
    scores it with ONNX Runtime alone (``models.load_onnx_model``), e.g. on Spark executors. A run
    without a graph, or with one its config.json does not record, is refused in one line."""
    from .models import ONNX_MODELS
    from .models.onnx_inference import ONNX_FILE
    from .models.onnx_inference import sha256 as onnx_sha256

    if run.model_name not in ONNX_MODELS:
        raise ValueError(f"run {run.name!r} is a {run.model_name} run; a saved ONNX graph scores "
                         f"{', '.join(ONNX_MODELS)} runs")
    d = run.dir / MODEL_DIR
    try:
        config = json.loads((d / "config.json").read_text())
        graph = (d / ONNX_FILE).read_bytes()
    except FileNotFoundError:
        config, graph = {}, b""
    entry = config.get("onnx") or {}
    if not graph or entry.get("file") != ONNX_FILE:
        raise ValueError(f"run {run.name!r} has no ONNX graph ({MODEL_DIR}/{ONNX_FILE}): install the onnx extra "
                         f"(pip install 'purchase-intent[onnx]') and train the run again, or score it with "
                         f"--engine duckdb")
    if onnx_sha256(graph) != entry.get("sha256"):
        raise ValueError(f"run {run.name!r}: {MODEL_DIR}/{ONNX_FILE} does not match the saved weights; "
                         "train the run again")
    return config, graph


STREAMED_ROW_MODELS = ("lightgbm",)  # fitted from a FeatureSubset: the train matrix is never held whole


def train_inputs(name: str, built: Built, idx: np.ndarray, ws: Workspace, vocab: SequenceVocab | None = None):
    """What model ``name`` is fitted on for the built examples at ``idx``: :func:`model_inputs`, but
    for the models of ``STREAMED_ROW_MODELS`` the rows of ``features.parquet`` left on disk
    (:class:`FeatureSubset`) when ``idx`` is ascending, as the train split's positions are."""
    idx = np.asarray(idx)
    if (name in STREAMED_ROW_MODELS and isinstance(built.features, FeatureRows) and idx.dtype != bool
            and (len(idx) < 2 or bool(np.all(np.diff(idx) > 0)))):
        return FeatureSubset(built.features, idx)
    return model_inputs(name, built, idx, ws, vocab)


def model_inputs(name: str, built: Built, idx: np.ndarray, ws: Workspace, vocab: SequenceVocab | None = None):
    """What model ``name`` eats for the built examples at row positions ``idx``.

    Baselines get the feature frame; sequence models a dict of arrays: "tabular" plus the event
    sequences of each example (built from the workspace's events, ts < cutoff only).
    """
    X_tab = built.features.iloc[idx]
    if not is_sequence_model(name):
        return X_tab
    con = ws.connect()
    sub = built.examples.iloc[idx][["example_id", "user_id", "cutoff"]].copy()
    # sequences come back in example_id order: keep the requested order by renumbering
    sub["example_id"] = np.arange(len(sub), dtype=np.int64)
    register_examples(con, sub)
    return _with_sequences(con, X_tab, vocab)


def inputs_for_examples(meta: dict, model: Any, con, examples: pd.DataFrame):
    """Model inputs for new examples (user_id, cutoff) over the ``events`` of connection ``con``.

    The one path shared by batch scoring and the HTTP API: the same feature SQL and the same
    sequence builder as training, on whatever events ``con`` holds (a workspace or one request).
    ``examples`` needs user_id and cutoff (and session_id / session_start for the session task);
    rows come back in the order given.
    """
    if isinstance(model, EnsembleModel):
        return [inputs_for_examples(m.meta, m.model, con, examples) for m in model.members]
    ex = examples.copy()
    ex["example_id"] = np.arange(len(ex), dtype=np.int64)
    for col, default in (("label", 0), ("period", 0)):
        if col not in ex.columns:
            ex[col] = default
    register_examples(con, ex)
    feats = run_features(meta, align_features(compute_features(con, "examples", run_feature_config(meta)), ex))
    if not is_sequence_model(meta["model"]):
        return feats
    return _with_sequences(con, feats, model_vocab(model))


def resolve_cutoff(con, at: Any = None) -> datetime:
    """The scoring time: ``at`` parsed (ISO 8601 or epoch seconds), else the end of the data (``max(ts) + 1us``)."""
    if at is not None:
        try:
            return parse_time(at)
        except (ValueError, OverflowError):
            raise ValueError(f"--at {at!r} is not a time: give ISO 8601 (2024-03-01, 2024-03-01T08:00:00+02:00) "
                             f"or epoch seconds (not milliseconds)") from None
    hi = con.execute("SELECT max(ts) FROM events").fetchall()[0][0]
    if hi is None:
        raise ValueError("the workspace has no events: run `purchase-intent ingest` first")
    return hi + ONE_US
