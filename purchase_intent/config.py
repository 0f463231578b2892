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
    ts_unit: Optional[str] = None  # s | ms | us | iso; None = the preset's or auto-detect
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
