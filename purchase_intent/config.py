"""Typed configuration: one dataclass per component, saved with every artifact.

Every CLI flag maps 1:1 onto a field here. A config is saved with ``dataclasses.asdict`` and
rebuilt with ``Config(**d)`` (unknown keys from newer versions are dropped by ``from_dict``).
Durations are strings such as ``30min``, ``6h``, ``1d``, ``7d``, ``2w`` (read by
``times.parse_duration``) so that the saved JSON reads the way the command line was written.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

C = TypeVar("C")


def from_dict(cls: type[C], d: dict[str, Any]) -> C:
    """Rebuild a config dataclass from a saved dict, ignoring keys this version does not know."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class DataConfig:
    """How raw files become canonical events (``purchase-intent ingest``)."""

    format: str = "csv"  # taobao | retailrocket | rees46 | otto | ga4 | segment | csv | parquet | jsonl
    mapping: dict[str, str] = field(default_factory=dict)  # canonical column -> source column
    event_map: dict[str, str] = field(default_factory=dict)  # raw event name -> canonical event
    ts_unit: Optional[str] = None  # s | ms | us | ns | iso; None = the preset's or auto-detect
    ts_zone: Optional[str] = None  # IANA zone of timestamps written without one; None = UTC
    ts_format: Optional[str] = None  # strptime layout of text timestamps (e.g. %m/%d/%Y %H:%M); None = ISO 8601
    # a log without an event column (transactions only): every row is this canonical event, e.g. "purchase"
    all_events: Optional[str] = None
    keep_extras: bool = False  # store the columns no map names (as text); no model reads them
    strict: bool = False  # any rejected row makes the command fail (and store nothing)
    # an event name no map names is rejected (unknown_event) instead of stored as other with its raw name
    strict_events: bool = False
    since: Optional[str] = None  # ISO time; earlier events are counted as filtered
    until: Optional[str] = None  # ISO time; events at or after are counted as filtered


@dataclass
class LabelConfig:
    """Which examples exist and what their label is (``purchase-intent build``)."""

    # user: will the user buy in [cutoff, cutoff + horizon); session: does the session contain a purchase
    task: str = "user"
    lookback: str = "28d"  # user task: active = any event in [cutoff - lookback, cutoff)
    horizon: str = "7d"  # user task: label window length
    step: str = "7d"  # distance between cutoffs (user task) / width of a split period (session task)
    # day-based cutoffs fall at midnight of this time zone; None: the one the ingested data's preset documents
    # (taobao: Asia/Shanghai), else UTC (resolved by `build`, which records the zone it used)
    tz: Optional[str] = None
    # session task: split sessions at inactivity gaps (default: the data's session ids, else 30min)
    session_gap: Optional[str] = None
    prefix: Optional[int] = None  # session task: the model sees at most the first K events of the session
    valid_cutoffs: int = 1  # number of cutoffs (periods) in the validation split
    test_cutoffs: int = 1  # number of cutoffs (periods) in the test split


@dataclass
class FeatureConfig:
    """Tabular features computed in SQL from events before each cutoff."""

    windows: tuple[str, ...] = ("1d", "7d", "28d")  # count windows before the cutoff
    history: Optional[str] = None  # how far back any feature looks; None = all history
    session_gap: str = "30min"  # inactivity gap that splits sessions when the data has no session ids
    tz: str = "UTC"  # time zone of the hour-of-day / weekday activity shares


@dataclass
class TrainConfig:
    """Settings shared by every model's ``fit``."""

    min_positives: int = 100  # minimum-data gate: refuse to train below this many positives...
    min_negatives: int = 100  # ...or negatives in train
    seed: int = 0


# --- the commands' own settings -------------------------------------------------------------------
# The command line's choices and defaults come from here, so that parsing it needs none of the modules
# that run the commands (each of those re-exports its config under its old name).

# the models `train --model` and `run --models` accept (models.MODELS maps each to its estimator)
MODEL_NAMES = ("logreg", "lightgbm", "transformer", "transformer_pt", "lightgbm_emb")
# the self-supervised objectives of `pretrain --objective` (models.pretraining)
PRETRAIN_OBJECTIVES = ("masked", "contrastive", "next", "future")
# As Google Analytics' data thresholds: a count of fewer than MIN_USERS users (but more than none) is not
# printed in a report table or an audience summary (privacy.py applies it)
MIN_USERS = 10
DRIFT_EXIT = 3  # exit status of `monitor --fail-on-drift` when drift is found


@dataclass
class ScoreConfig:
    """What `purchase-intent score` scores and how the audience is cut."""

    at: Optional[str] = None  # scoring time T (ISO 8601 or epoch seconds); None = max(ts) + 1us
    chunk_size: int = 50_000  # users per chunk (features + model); bounds memory
    top: Optional[str] = None  # audience: the top share of users, e.g. "10%" (or a fraction "0.1")
    top_n: Optional[int] = None  # audience: the N most likely buyers
    min_probability: Optional[float] = None  # audience: everyone with probability >= P
    reasons: int = 0  # add each user's top K reasons as columns reason_k (text) and reason_k_contribution
    min_users: int = MIN_USERS  # the summary withholds a count of fewer users than this (1: show every count)
    reidentify: Optional[str] = None  # the key holder's file of raw user ids: adds a raw_user_id column


@dataclass
class MonitorConfig:
    """What `purchase-intent monitor` compares and how it judges."""

    at: Optional[str] = None  # end T of the latest window (ISO 8601 or epoch seconds); None = end of the data
    n_bins: int = 10  # quantile bins fitted on the training window (features and score)
    epsilon: float = 1e-4  # share given to an empty bin, so that ln(a / e) stays finite
    moderate: float = 0.1  # PSI at or above: moderate shift
    drift: float = 0.25  # PSI above: drift
    n_boot: int = 1000  # bootstrap resamples of the live ROC-AUC interval
    chunk_size: int = 50_000  # users per chunk (features + model); bounds memory
    seed: int = 0
    # features whose shift is expected and not to count in the verdict (still measured and reported),
    # e.g. days_since_first_event, which grows with the age of the log itself
    ignore: tuple[str, ...] = ()


@dataclass
class RetrainConfig:
    """How `purchase-intent retrain` compares and what it does after a promotion."""

    n_boot: int = 1000  # bootstrap resamples of the paired interval
    seed: int = 0  # seed of the bootstrap
    reload: bool = True  # SIGHUP the running servers of the run after a promotion


@dataclass
class PretrainConfig:
    """What ``pretrain`` trains (saved in the encoder's config.json)."""

    # PRETRAIN_OBJECTIVES; none won beyond the paired intervals (benchmarks/results/pretrain.md)
    objective: str = "masked"
    preset: str = "tiny"  # TransformerClassifier presets: tiny | small | base
    max_seq_len: int = 50  # most recent events per user (the classifier's default window)
    epochs: int = 4
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    dropout: float = 0.1
    seed: int = 0
    cutoff: Optional[str] = "auto"  # "auto" | "all" (every event) | an ISO 8601 time
    backtest: int = 0  # with cutoff="auto": the earliest of the last K backtest folds' test windows
    drop_fields: list = field(default_factory=lambda: ["item"])  # as TransformerClassifier's default
    d_model: Optional[int] = None  # None: the preset's (with init: the init encoder's; another value raises)
    # an encoder folder of another workspace to start from; its architecture, fields and buckets are kept
    init: Optional[str] = None
    # also one `future` encoder (with its head) per cutoff of the built examples and one on every event:
    # the rolling-origin prior of models/prior.py (each example read by the encoder of its own cutoff)
    rolling: bool = False
    # user-level DP-SGD (models/dp_pretraining.py, on dp.py): None = not private; the rest as `train`'s dp_*
    dp_epsilon: Optional[float] = None
    dp_delta: Optional[float] = None  # None = 1 / the users pretrained on
    dp_max_grad_norm: float = 1.0
    dp_users_per_step: int = 256
    dp_epochs: float = 5.0
    dp_lr: float = 2e-3


DP_PARAMS = ("dp_epsilon", "dp_delta", "dp_max_grad_norm", "dp_users_per_step", "dp_epochs", "dp_lr")
