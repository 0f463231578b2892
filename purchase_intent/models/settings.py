"""Numeric settings of a model checked before any data is read: one line for a value of the wrong type
or out of range (``--param num_leaves=abc``, ``--param lr=0,1``, ``--param dropout=2``), where the
library underneath would fail later with a traceback, or train on a meaningless value.

A model lists its settings as :class:`Setting` rows and calls :func:`check_settings` on itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Setting:
    """One numeric setting: its name, ``int`` or ``float``, its bounds, whether ``lo`` / ``hi`` are
    allowed, and whether None is (None for a setting whose default is None: the preset's or the data's)."""

    name: str
    kind: type
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_in: bool = True
    hi_in: bool = True
    none: bool = False

    def bounds(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'≥' if self.lo_in else '>'} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'≤' if self.hi_in else '<'} {self.hi:g}")
        return " and ".join(parts)

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.none
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            return False
        if self.kind is int and not isinstance(value, (int, np.integer)):  # 64.0: the libraries want an int
            return False
        v = float(value)
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v < self.lo if self.lo_in else v <= self.lo):
            return False
        return not (self.hi is not None and (v > self.hi if self.hi_in else v >= self.hi))


def check_settings(model: str, estimator: Any, settings: Sequence[Setting]) -> None:
    """Raise ValueError (one line) naming the first of ``settings`` whose value on ``estimator`` is of
    the wrong type or out of range, with its default as an example (the value ``--param`` takes)."""
    defaults = type(estimator)()
    for s in settings:
        value = getattr(estimator, s.name)
        if not s.accepts(value):
            what = "a whole number" if s.kind is int else "a number"
            bounds = s.bounds()
            example = getattr(defaults, s.name)
            hint = (" (set it with --seed)" if s.name == "random_state" else
                    f" (e.g. --param {s.name}={example})" if example is not None else "")
            raise ValueError(f"{model}: {s.name} must be {what}{' ' + bounds if bounds else ''}"
                             f"{' or left out' if s.none else ''}, got {value!r}{hint}")
